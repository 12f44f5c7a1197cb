//! NumPy's `.npy` format (numpy `lib/format.py`, versions 1–3) for float arrays: what
//! pytorch-fid's `.npz` statistics hold, and the features hindsight keeps for KID.
//!
//! Layout: `\x93NUMPY`, version (2 bytes), header length (2 bytes in v1, 4 in v2/3), a Python
//! dict literal `{'descr': '<f8', 'fortran_order': False, 'shape': (d, d), }` padded with
//! spaces and a newline so the data starts on a 64-byte boundary, then the data.

use std::io::Write;

use crate::error::{Error, Result};

/// Writes a C-order little-endian f64 array (format version 1.0).
pub fn write_f64(out: &mut impl Write, shape: &[usize], values: &[f64]) -> std::io::Result<()> {
    write_header(out, "<f8", shape)?;
    for v in values {
        out.write_all(&v.to_le_bytes())?;
    }
    Ok(())
}

/// Writes a C-order little-endian f32 array (format version 1.0): features `[n, d]`.
pub fn write_f32(out: &mut impl Write, shape: &[usize], values: &[f32]) -> std::io::Result<()> {
    write_header(out, "<f4", shape)?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    out.write_all(&bytes)
}

/// Writes a C-order `uint8` array (format version 1.0), e.g. images for a peer to read.
pub fn write_u8(out: &mut impl Write, shape: &[usize], values: &[u8]) -> std::io::Result<()> {
    write_header(out, "|u1", shape)?;
    out.write_all(values)
}

fn write_header(out: &mut impl Write, descr: &str, shape: &[usize]) -> std::io::Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic (6) + version (2) + length (2) + header + newline, to a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    out.write_all(b"\x93NUMPY\x01\x00")?;
    out.write_all(&(header.len() as u16).to_le_bytes())?;
    out.write_all(header.as_bytes())
}

/// Reads a C-order little-endian `<f8` or `<f4` array: its shape and values as f64. `source`
/// names it in errors.
pub fn read_f64(bytes: &[u8], source: &str) -> Result<(Vec<usize>, Vec<f64>)> {
    let (shape, size, data) = parse(bytes, source)?;
    let values = if size == 8 {
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    } else {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64)
            .collect()
    };
    Ok((shape, values))
}

/// Reads a C-order little-endian `<f4` or `<f8` array as f32 (features).
pub fn read_f32(bytes: &[u8], source: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let (shape, size, data) = parse(bytes, source)?;
    let values = if size == 4 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect()
    };
    Ok((shape, values))
}

/// The shape, element size and data of a float array.
fn parse<'a>(bytes: &'a [u8], source: &str) -> Result<(Vec<usize>, usize, &'a [u8])> {
    let bad = |reason: &str| Error::invalid(source, format!("not a readable .npy array: {reason}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("no \\x93NUMPY magic"));
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize,
            12,
        ),
        _ => return Err(bad("unknown format version")),
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("the header runs past the end"))?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| bad("header not text"))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}':"))? + key.len() + 3;
        Some(header[at..].trim_start())
    };
    let descr = field("descr").ok_or_else(|| bad("no descr"))?;
    let size = if descr.starts_with("'<f8'") {
        8
    } else if descr.starts_with("'<f4'") {
        4
    } else {
        return Err(bad("only little-endian float32/float64 arrays are read"));
    };
    if field("fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err(bad("Fortran-order arrays are not read"));
    }
    let shape_text = field("shape").ok_or_else(|| bad("no shape"))?;
    let inner = shape_text
        .strip_prefix('(')
        .ok_or_else(|| bad("the shape is not a tuple"))?;
    let close = inner.find(')').ok_or_else(|| bad("unterminated shape"))?;
    let shape: Vec<usize> = inner[..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad("a shape that is not numbers"))
        })
        .collect::<Result<_>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("the shape overflows"))?;
    let data = &bytes[end..];
    if Some(data.len()) != count.checked_mul(size) {
        return Err(bad("the data does not match the shape"));
    }
    Ok((shape, size, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `tests/fuzz.rs`: a shape that does not start with `(` (here `)(3, 3)`)
    /// sliced the header out of order and panicked.
    #[test]
    fn a_shape_that_is_not_a_tuple_is_an_error() {
        let header = "{'descr': '<f8', 'fortran_order': False, 'shape': )(3, 3), }";
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        let err = read_f64(&bytes, "x").unwrap_err().to_string();
        assert!(err.contains("not a tuple"), "{err}");
    }

    #[test]
    fn round_trip_and_header_alignment() {
        let mut bytes = Vec::new();
        write_f64(&mut bytes, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5]).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let (shape, values) = read_f64(&bytes, "x").unwrap();
        assert_eq!(shape, [2, 3]);
        assert_eq!(values, [1.0, 2.0, 3.0, 4.0, 5.0, -6.5]);
        // numpy.save(np.arange(3, dtype='<f4')) as NumPy writes it.
        let mut np =
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }"
                .to_vec();
        while np.len() < 127 {
            np.push(b' ');
        }
        np.push(b'\n');
        for v in [0f32, 1.0, 2.0] {
            np.extend(v.to_le_bytes());
        }
        assert_eq!(read_f64(&np, "np").unwrap(), (vec![3], vec![0.0, 1.0, 2.0]));
        assert!(read_f64(&np[..np.len() - 1], "np").is_err());
    }
}
