//! Whether two safetensors files hold the same tensors, whatever their bytes say otherwise.
//!
//! Two writers of one EMA state can produce different files: `__metadata__` in another key
//! order or with other keys, tensors laid out in another order, other header padding. A
//! snapshot re-uploaded after a resume must still be recognised as the one already stored
//! (issue 25: resuming never conflicts with itself), so the ingest compares *tensors* — names,
//! element types, shapes and data bytes — when the digests differ at one (nimg, σ_rel).

use std::io::{Read, Seek, SeekFrom};

use crate::error::{Error, Result};
use crate::format::{Header, TensorEntry};

/// Bytes compared per read.
const CHUNK: usize = 1 << 20;

/// Whether `a` (read from `file_a`) and `b` (from `file_b`) hold the same set of tensors with
/// equal dtypes, shapes and bytes. Metadata, header order and data layout are ignored. Reads
/// both data sections at most once; stops at the first difference.
///
/// Errors: reading either file (`source_a`, `source_b` name them).
pub fn same_tensors(
    a: &Header,
    file_a: &mut (impl Read + Seek),
    source_a: &str,
    b: &Header,
    file_b: &mut (impl Read + Seek),
    source_b: &str,
) -> Result<bool> {
    if a.tensors.len() != b.tensors.len() {
        return Ok(false);
    }
    let (ta, tb) = (by_name(a), by_name(b));
    let described_alike = ta.iter().zip(&tb).all(|(x, y)| {
        x.name == y.name && x.dtype == y.dtype && x.shape == y.shape && x.len == y.len
    });
    if !described_alike {
        return Ok(false);
    }
    let mut buf_a = vec![0u8; CHUNK];
    let mut buf_b = vec![0u8; CHUNK];
    for (x, y) in ta.iter().zip(&tb) {
        seek(file_a, a.data_start() + x.offset, source_a)?;
        seek(file_b, b.data_start() + y.offset, source_b)?;
        let mut left = x.len;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            file_a
                .read_exact(&mut buf_a[..n])
                .map_err(|e| Error::io(format!("reading {source_a}"), e))?;
            file_b
                .read_exact(&mut buf_b[..n])
                .map_err(|e| Error::io(format!("reading {source_b}"), e))?;
            if buf_a[..n] != buf_b[..n] {
                return Ok(false);
            }
            left -= n as u64;
        }
    }
    Ok(true)
}

fn by_name(h: &Header) -> Vec<&TensorEntry> {
    let mut v: Vec<&TensorEntry> = h.tensors.iter().collect();
    v.sort_by(|x, y| x.name.cmp(&y.name));
    v
}

fn seek(file: &mut impl Seek, at: u64, source: &str) -> Result<()> {
    file.seek(SeekFrom::Start(at))
        .map(|_| ())
        .map_err(|e| Error::io(format!("reading {source}"), e))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Cursor;

    use super::*;
    use crate::format::read_header;

    /// A safetensors file with `tensors` (name, F32 values) in the given order and metadata.
    fn file(tensors: &[(&str, &[f32])], metadata: &[(&str, &str)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let meta: BTreeMap<_, _> = metadata.iter().copied().collect();
        // The data section follows `tensors`' order, whatever order the JSON keys take.
        header.insert("__metadata__".into(), serde_json::to_value(meta).unwrap());
        let mut data = Vec::new();
        for (name, values) in tensors {
            let start = data.len();
            for v in *values {
                data.extend_from_slice(&v.to_le_bytes());
            }
            header.insert(
                (*name).into(),
                serde_json::json!({"dtype": "F32", "shape": [values.len()],
                    "data_offsets": [start, data.len()]}),
            );
        }
        let mut json = serde_json::to_vec(&header).unwrap();
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend(json);
        out.extend(data);
        out
    }

    fn compare(x: &[u8], y: &[u8]) -> bool {
        let hx = read_header(&mut Cursor::new(x), x.len() as u64, "x").unwrap();
        let hy = read_header(&mut Cursor::new(y), y.len() as u64, "y").unwrap();
        same_tensors(&hx, &mut Cursor::new(x), "x", &hy, &mut Cursor::new(y), "y").unwrap()
    }

    #[test]
    fn layout_and_metadata_do_not_matter_values_do() {
        let a = file(&[("a", &[1.0, 2.0]), ("b", &[3.0])], &[("nimg", "10")]);
        let b = file(
            &[("b", &[3.0]), ("a", &[1.0, 2.0])],
            &[("sigma_rel", "0.05"), ("nimg", "10")],
        );
        assert_ne!(a, b);
        assert!(compare(&a, &b));
        let c = file(&[("a", &[1.0, 2.5]), ("b", &[3.0])], &[("nimg", "10")]);
        assert!(!compare(&a, &c));
        let d = file(&[("a", &[1.0, 2.0]), ("c", &[3.0])], &[("nimg", "10")]);
        assert!(!compare(&a, &d));
        let e = file(&[("a", &[1.0, 2.0])], &[("nimg", "10")]);
        assert!(!compare(&a, &e));
    }
}
