//! The one builder of the safetensors snapshots the tests write.

use std::collections::BTreeMap;
use std::path::Path;

use hindsight::format::{write_safetensors, OutTensor};

/// A safetensors file put together tensor by tensor:
///
/// ```ignore
/// let bytes = SnapshotBuilder::new()
///     .f32("w", &[2, 2], &[1.0, 2.0, 3.0, 4.0])
///     .i64("step", &[], &[7])
///     .meta("nimg", 4_000_000)
///     .bytes();
/// ```
///
/// The tensors' data follow one another in the order they were added (hindsight's writer;
/// [`SnapshotBuilder::write_with_safetensors_crate`] writes with the reference writer
/// instead); `__metadata__` is written when any was given.
#[derive(Clone, Debug, Default)]
pub struct SnapshotBuilder {
    /// Name, safetensors dtype, shape, little-endian data.
    tensors: Vec<(String, &'static str, Vec<usize>, Vec<u8>)>,
    metadata: BTreeMap<String, String>,
}

impl SnapshotBuilder {
    /// A file with no tensors and no metadata yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds tensor `name` of safetensors `dtype` (`"F32"`, `"I64"`, …) and `shape`, from raw
    /// little-endian `data` (taken as given: a test may make it disagree with the shape).
    pub fn raw(mut self, name: &str, dtype: &'static str, shape: &[usize], data: Vec<u8>) -> Self {
        self.tensors
            .push((name.to_owned(), dtype, shape.to_vec(), data));
        self
    }

    /// Adds an F32 tensor of `shape` holding `values` (row-major).
    pub fn f32(self, name: &str, shape: &[usize], values: &[f32]) -> Self {
        check_len(name, shape, values.len());
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.raw(name, "F32", shape, data)
    }

    /// Adds an F16 tensor of `shape` holding `values` rounded to f16.
    pub fn f16(self, name: &str, shape: &[usize], values: &[f32]) -> Self {
        check_len(name, shape, values.len());
        let data = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        self.raw(name, "F16", shape, data)
    }

    /// Adds a BF16 tensor of `shape` holding `values` rounded to bf16.
    pub fn bf16(self, name: &str, shape: &[usize], values: &[f32]) -> Self {
        check_len(name, shape, values.len());
        let data = values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        self.raw(name, "BF16", shape, data)
    }

    /// Adds an I64 tensor of `shape` (`&[]` for a scalar) holding `values`.
    pub fn i64(self, name: &str, shape: &[usize], values: &[i64]) -> Self {
        check_len(name, shape, values.len());
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.raw(name, "I64", shape, data)
    }

    /// Sets `__metadata__[key]` to `value`.
    pub fn meta(mut self, key: &str, value: impl ToString) -> Self {
        self.metadata.insert(key.to_owned(), value.to_string());
        self
    }

    /// Sets each `(key, value)` of `pairs` in `__metadata__`.
    pub fn metas(self, pairs: &[(&str, &str)]) -> Self {
        pairs.iter().fold(self, |b, (k, v)| b.meta(k, v))
    }

    /// The file's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out).unwrap();
        out
    }

    /// Writes the file at `path` (streamed: a large tensor is not copied again).
    pub fn write(&self, path: &Path) {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
        self.write_to(&mut file).unwrap();
        std::io::Write::flush(&mut file).unwrap();
    }

    /// Writes the file at `path` with the `safetensors` crate, the format's reference writer
    /// (as the Python package writes files: its own tensor order), rather than hindsight's.
    pub fn write_with_safetensors_crate(&self, path: &Path) {
        let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(name, dtype, shape, data)| {
                let dtype: safetensors::Dtype =
                    serde_json::from_value(serde_json::json!(dtype)).unwrap();
                let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), data);
                (name.as_str(), view.unwrap())
            })
            .collect();
        let metadata =
            (!self.metadata.is_empty()).then(|| self.metadata.clone().into_iter().collect());
        safetensors::serialize_to_file(views, metadata, path).unwrap();
    }

    fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let tensors: Vec<OutTensor<'_>> = self
            .tensors
            .iter()
            .map(|(name, dtype, shape, data)| OutTensor {
                name,
                dtype,
                shape,
                data,
            })
            .collect();
        write_safetensors(out, &tensors, &self.metadata)
    }
}

#[track_caller]
fn check_len(name: &str, shape: &[usize], len: usize) {
    let elements: usize = shape.iter().product();
    assert_eq!(
        elements, len,
        "tensor {name}: shape {shape:?} holds {elements} values"
    );
}
