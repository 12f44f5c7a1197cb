//! `--check-finite`: scanning floating-point tensors for NaN and ±Inf while the file streams
//! into the store, chunk by chunk (an element may straddle two chunks), so that a refused file
//! costs no second read.

use crate::format::Header;

/// Scans floating-point tensors for NaN/Inf as the file streams by.
pub(super) struct FiniteScanner {
    /// (start, end, element size, dtype, name) of float tensors, in file order, absolute.
    spans: Vec<(u64, u64, usize, String, String)>,
    next: usize,
    pos: u64,
    /// Bytes of a partial element carried over from the previous chunk.
    carry: Vec<u8>,
    /// Whole elements of the current tensor already checked.
    checked: u64,
}

impl FiniteScanner {
    pub(super) fn new(header: &Header) -> Self {
        let base = header.data_start();
        let spans = header
            .tensors
            .iter()
            .filter(|t| t.is_float())
            .map(|t| {
                let size = match t.dtype.as_str() {
                    "F64" => 8,
                    "F32" => 4,
                    _ => 2,
                };
                let start = base + t.offset;
                (start, start + t.len, size, t.dtype.clone(), t.name.clone())
            })
            .collect();
        Self {
            spans,
            next: 0,
            pos: 0,
            carry: Vec::new(),
            checked: 0,
        }
    }

    pub(super) fn feed(&mut self, chunk: &[u8]) -> std::result::Result<(), String> {
        let chunk_start = self.pos;
        self.pos += chunk.len() as u64;
        while let Some((start, end, size, dtype, name)) = self.spans.get(self.next) {
            if *start >= self.pos {
                break;
            }
            let from = (*start).max(chunk_start);
            let to = (*end).min(self.pos);
            if from < to {
                self.carry.extend_from_slice(
                    &chunk[(from - chunk_start) as usize..(to - chunk_start) as usize],
                );
                let whole = self.carry.len() / size * size;
                if let Some(i) = first_non_finite(&self.carry[..whole], *size, dtype) {
                    return Err(format!(
                        "tensor {name} holds a non-finite value (element {}); refused by \
                         --check-finite",
                        self.checked + i as u64
                    ));
                }
                self.checked += (whole / size) as u64;
                self.carry.drain(..whole);
            }
            if *end > self.pos {
                break;
            }
            self.next += 1;
            self.carry.clear();
            self.checked = 0;
        }
        Ok(())
    }
}

fn first_non_finite(bytes: &[u8], size: usize, dtype: &str) -> Option<usize> {
    bytes.chunks_exact(size).position(|e| match dtype {
        "F64" => !f64::from_le_bytes(e.try_into().expect("8 bytes")).is_finite(),
        "F32" => !f32::from_le_bytes(e.try_into().expect("4 bytes")).is_finite(),
        // F16: exponent bits 10..15 all ones; BF16: bits 7..15 all ones.
        "F16" => u16::from_le_bytes([e[0], e[1]]) & 0x7c00 == 0x7c00,
        _ => u16::from_le_bytes([e[0], e[1]]) & 0x7f80 == 0x7f80,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::TensorEntry;

    #[test]
    fn non_finite_values_are_found_across_chunk_boundaries() {
        let header = Header {
            header_len: 0,
            tensors: vec![
                TensorEntry {
                    name: "a".into(),
                    dtype: "F16".into(),
                    shape: vec![3],
                    offset: 0,
                    len: 6,
                },
                TensorEntry {
                    name: "b".into(),
                    dtype: "F32".into(),
                    shape: vec![3],
                    offset: 6,
                    len: 12,
                },
            ],
            metadata: Default::default(),
            data_len: 18,
        };
        let mut data = vec![0u8; 8]; // the 8-byte length prefix (header_len 0)
        data.extend_from_slice(&[0x00, 0x3c, 0x00, 0x3c, 0x00, 0x3c]); // f16 ones
        for v in [1.0f32, f32::NAN, 2.0] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        for chunk in [1, 3, 5, 7, 64] {
            let mut s = FiniteScanner::new(&header);
            let err = data.chunks(chunk).try_for_each(|c| s.feed(c)).unwrap_err();
            assert!(
                err.contains("tensor b") && err.contains("element 1"),
                "{chunk}: {err}"
            );
        }
        data[18..22].copy_from_slice(&3.0f32.to_le_bytes());
        let mut s = FiniteScanner::new(&header);
        assert!(data.chunks(3).try_for_each(|c| s.feed(c)).is_ok());
        // f16 infinity in tensor a.
        data[10..12].copy_from_slice(&[0x00, 0x7c]);
        let mut s = FiniteScanner::new(&header);
        let err = s.feed(&data).unwrap_err();
        assert!(
            err.contains("tensor a") && err.contains("element 1"),
            "{err}"
        );
    }
}
