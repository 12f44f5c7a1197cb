//! A deterministic safetensors writer: the same tensors and metadata always give the same
//! bytes, which content addressing needs. (The safetensors crate takes `__metadata__` as a
//! `HashMap`, whose iteration order differs from run to run.)

use std::collections::BTreeMap;
use std::io::Write;

use serde_json::{json, Map, Value};

/// One tensor to write: name, safetensors dtype name, shape, and its little-endian bytes.
pub struct OutTensor<'a> {
    /// State-dict key.
    pub name: &'a str,
    /// `F32`, `F16`, `BF16`, `I64`, …
    pub dtype: &'a str,
    /// Shape.
    pub shape: &'a [usize],
    /// Raw little-endian data.
    pub data: &'a [u8],
}

/// A tensor's entry in a header to be written: the data follows later, `len` bytes of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutTensorInfo {
    /// State-dict key.
    pub name: String,
    /// safetensors dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes of data.
    pub len: u64,
}

/// Writes the length prefix and the header of a safetensors file whose tensors' data will
/// follow in the order given: `__metadata__` with sorted keys, padded with spaces to a
/// multiple of 8 bytes (as the reference writer does).
pub fn write_safetensors_header(
    out: &mut (impl Write + ?Sized),
    tensors: &[OutTensorInfo],
    metadata: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.len;
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    // serde_json's Map keeps insertion order only with `preserve_order`; without it keys are
    // sorted, which is just as deterministic.
    let mut text = serde_json::to_string(&Value::Object(header))?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    out.write_all(&(text.len() as u64).to_le_bytes())?;
    out.write_all(text.as_bytes())
}

/// Writes a whole safetensors file: the header (see [`write_safetensors_header`]), then the
/// tensors' data in the given order.
pub fn write_safetensors(
    out: &mut impl Write,
    tensors: &[OutTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let infos: Vec<OutTensorInfo> = tensors
        .iter()
        .map(|t| OutTensorInfo {
            name: t.name.to_owned(),
            dtype: t.dtype.to_owned(),
            shape: t.shape.to_vec(),
            len: t.data.len() as u64,
        })
        .collect();
    write_safetensors_header(out, &infos, metadata)?;
    for t in tensors {
        out.write_all(t.data)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::header::read_header;

    #[test]
    fn same_input_same_bytes_and_a_valid_file() {
        let a: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let b = 5i64.to_le_bytes();
        let tensors = [
            OutTensor {
                name: "w",
                dtype: "F32",
                shape: &[2],
                data: &a,
            },
            OutTensor {
                name: "step",
                dtype: "I64",
                shape: &[],
                data: &b,
            },
        ];
        let meta: BTreeMap<String, String> = [
            ("z".into(), "1".into()),
            ("a".into(), "2".into()),
            ("m".into(), "3".into()),
        ]
        .into();
        let mut first = Vec::new();
        write_safetensors(&mut first, &tensors, &meta).unwrap();
        for _ in 0..5 {
            let mut again = Vec::new();
            write_safetensors(&mut again, &tensors, &meta).unwrap();
            assert_eq!(again, first);
        }
        let header = read_header(&mut &first[..], first.len() as u64, "t").unwrap();
        assert_eq!(header.header_len % 8, 0);
        assert_eq!(header.metadata, meta);
        assert_eq!(header.tensors.len(), 2);
        // The reference reader agrees.
        let st = safetensors::SafeTensors::deserialize(&first).unwrap();
        assert_eq!(st.tensor("w").unwrap().data(), &a[..]);
    }
}
