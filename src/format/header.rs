//! Validation of a safetensors header read from a stream, without loading the tensor data.
//!
//! Format: an 8-byte little-endian header length `n`, `n` bytes of JSON mapping tensor names
//! to `{dtype, shape, data_offsets}` (plus an optional `__metadata__` map of strings), then the
//! data. Every door into the store calls [`read_header`] first, so a malformed file is refused
//! before a byte of it is stored.

use std::collections::BTreeMap;
use std::io::Read;

use safetensors::tensor::{Dtype, Metadata};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest header accepted (the safetensors crate allows 100 MB; a model with thousands of
/// tensors needs well under 1 MB, and the server parses headers of uploads from the network).
pub const MAX_HEADER_BYTES: u64 = 16 << 20;

/// One tensor as the header describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Tensor name (a state-dict key).
    pub name: String,
    /// Element type as safetensors writes it (`F16`, `BF16`, `F32`, `I64`, …).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Start of the tensor's bytes, from the start of the data section.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl TensorEntry {
    /// Whether the tensor holds floating-point values (averaged by reconstructions; other
    /// tensors, such as step counters, are copied).
    pub fn is_float(&self) -> bool {
        matches!(self.dtype.as_str(), "F16" | "BF16" | "F32" | "F64")
    }
}

/// A validated header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Length of the JSON header in bytes (the data starts at `8 + header_len`).
    pub header_len: u64,
    /// Tensors in data order.
    pub tensors: Vec<TensorEntry>,
    /// The `__metadata__` map (empty if absent).
    pub metadata: BTreeMap<String, String>,
    /// Length of the data section.
    pub data_len: u64,
}

impl Header {
    /// Offset of the data section in the file.
    pub fn data_start(&self) -> u64 {
        8 + self.header_len
    }
}

/// What a file whose first 8 bytes are `head` is, when it is a common mistake for a
/// safetensors file: a Git LFS pointer (the weights were never pulled), a web page (a
/// download link saved instead of the file), a ZIP or pickle (a PyTorch `.pt`/`.pth`
/// checkpoint renamed), other well-known formats, or plain text.
fn sniff(head: &[u8; 8]) -> Option<&'static str> {
    let lower: Vec<u8> = head.iter().map(u8::to_ascii_lowercase).collect();
    let kind = if head == b"version " {
        "a Git LFS pointer, not the weights it points to (run `git lfs pull`, or download the \
         file itself)"
    } else if lower.starts_with(b"<!doctyp") || lower.starts_with(b"<html") {
        "an HTML page (a download that returned a web page instead of the file?)"
    } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        "a ZIP archive (a PyTorch checkpoint saved with torch.save, .pt/.pth?); convert it with \
         safetensors.torch.save_file, or import ema-pytorch folders with --format ema-pytorch"
    } else if head[0] == 0x80 && (2..=5).contains(&head[1]) {
        "a Python pickle (an old-style PyTorch .pt/.pth/.pkl checkpoint?); convert it with \
         safetensors.torch.save_file"
    } else if head.starts_with(b"\x93NUMPY") {
        "a NumPy .npy array"
    } else if head.starts_with(&[0x1f, 0x8b]) {
        "gzip-compressed (decompress it first)"
    } else if head.starts_with(b"\x89HDF") {
        "an HDF5 file (Keras .h5?)"
    } else if head.starts_with(b"\x89PNG") {
        "a PNG image"
    } else if head
        .iter()
        .all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace())
    {
        "a text file"
    } else {
        return None;
    };
    Some(kind)
}

fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}")
}

/// Reads and validates the header of a safetensors file of `file_len` bytes from `reader`
/// (positioned at the start of the file). `source` names the file in error messages.
///
/// Refused, each with its own message: files shorter than 8 bytes; a header longer than
/// [`MAX_HEADER_BYTES`] or than the file; a header that is not UTF-8 JSON of the safetensors
/// shape; unknown dtypes; shapes whose element count overflows; offsets that do not tile the
/// data section in order, or disagree with dtype × shape; data that ends past the end of the
/// file; and trailing bytes after the last tensor.
pub fn read_header(reader: &mut impl Read, file_len: u64, source: &str) -> Result<Header> {
    let bad = |reason: String| Error::invalid(source, reason);
    if file_len < 8 {
        return Err(bad(format!(
            "{file_len} bytes is too short for a safetensors file (no header length)"
        )));
    }
    let mut len_bytes = [0u8; 8];
    reader
        .read_exact(&mut len_bytes)
        .map_err(|e| Error::io(format!("{source}: reading the header length"), e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
        // An implausible length is usually another kind of file: say which.
        if let Some(kind) = sniff(&len_bytes) {
            return Err(bad(format!("not a safetensors file: it is {kind}")));
        }
    }
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes"
        )));
    }
    if header_len > file_len - 8 {
        return Err(bad(format!(
            "header length {header_len} runs past the end of the {file_len}-byte file"
        )));
    }
    let mut json = vec![0u8; header_len as usize];
    reader
        .read_exact(&mut json)
        .map_err(|e| Error::io(format!("{source}: reading the header"), e))?;
    let text =
        std::str::from_utf8(&json).map_err(|e| bad(format!("the header is not UTF-8: {e}")))?;
    // Deserialising `Metadata` also validates it: offsets tile the data in order and agree
    // with dtype × shape, and element counts do not overflow.
    let metadata: Metadata = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| bad(format!("invalid safetensors header: {e}")))?;
    let data_len = metadata.data_len() as u64;
    let data_start = 8 + header_len;
    let expected = data_start
        .checked_add(data_len)
        .ok_or_else(|| bad("tensor data length overflows".to_owned()))?;
    if expected > file_len {
        return Err(bad(format!(
            "tensor data ends at byte {expected}, past the end of the {file_len}-byte file"
        )));
    }
    if expected < file_len {
        return Err(bad(format!(
            "{} trailing bytes after the last tensor (data ends at byte {expected} of {file_len})",
            file_len - expected
        )));
    }
    let infos = metadata.tensors();
    let mut tensors: Vec<TensorEntry> = infos
        .iter()
        .map(|(name, info)| TensorEntry {
            name: name.clone(),
            dtype: dtype_name(info.dtype),
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            offset: info.data_offsets.0 as u64,
            len: (info.data_offsets.1 - info.data_offsets.0) as u64,
        })
        .collect();
    tensors.sort_by_key(|t| t.offset);
    let metadata = metadata
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok(Header {
        header_len,
        tensors,
        metadata,
        data_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file from a header JSON string and a data length.
    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend(std::iter::repeat_n(0u8, data_len));
        out
    }

    fn check(bytes: &[u8]) -> Result<Header> {
        read_header(&mut &bytes[..], bytes.len() as u64, "x.safetensors")
    }

    #[track_caller]
    fn refused(bytes: &[u8], needle: &str) {
        let err = check(bytes).unwrap_err().to_string();
        assert!(err.starts_with("x.safetensors: "), "{err}");
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
    }

    const GOOD: &str = r#"{"__metadata__":{"nimg":"8388608","sigma_rel":"0.05"},"b":{"dtype":"F16","shape":[2,3],"data_offsets":[16,28]},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"step":{"dtype":"I64","shape":[],"data_offsets":[28,36]}}"#;

    #[test]
    fn a_good_header_is_read_in_data_order() {
        let h = check(&file(GOOD, 36)).unwrap();
        let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "step"]);
        assert_eq!(h.tensors[1].dtype, "F16");
        assert_eq!(h.tensors[1].shape, [2, 3]);
        assert_eq!((h.tensors[1].offset, h.tensors[1].len), (16, 12));
        assert!(h.tensors[0].is_float() && !h.tensors[2].is_float());
        assert_eq!(h.metadata["nimg"], "8388608");
        assert_eq!(h.data_len, 36);
        assert_eq!(h.data_start(), 8 + GOOD.len() as u64);
        // Space padding after the JSON (which writers use for alignment) is allowed.
        let padded = format!("{GOOD}    ");
        assert_eq!(check(&file(&padded, 36)).unwrap().tensors.len(), 3);
    }

    #[test]
    fn malformed_headers_are_refused_precisely() {
        refused(b"1234", "too short");
        let mut huge = (MAX_HEADER_BYTES + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        refused(&huge, "exceeds the limit");
        let mut past = 1000u64.to_le_bytes().to_vec();
        past.extend_from_slice(b"{}");
        refused(&past, "runs past the end");
        refused(&file("{\"a\": nope}", 0), "invalid safetensors header");
        let mut not_utf8 = 2u64.to_le_bytes().to_vec();
        not_utf8.extend_from_slice(&[0xff, 0xfe]);
        refused(&not_utf8, "not UTF-8");
        refused(
            &file(
                r#"{"a":{"dtype":"F17","shape":[1],"data_offsets":[0,4]}}"#,
                4,
            ),
            "invalid safetensors header",
        );
        // Element count overflows usize.
        refused(
            &file(
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#,
                4,
            ),
            "invalid safetensors header",
        );
        // Offsets that disagree with dtype × shape, leave gaps, or overlap.
        refused(
            &file(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                4,
            ),
            "invalid safetensors header",
        );
        refused(
            &file(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
            ),
            "invalid safetensors header",
        );
        refused(
            &file(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
            ),
            "invalid safetensors header",
        );
        // Other kinds of files say what they are, not that their "header length" is absurd.
        let lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n";
        refused(lfs, "not a safetensors file: it is a Git LFS pointer");
        refused(lfs, "git lfs pull");
        refused(
            b"<!DOCTYPE html><html><body>Sign in</body></html>",
            "it is an HTML page",
        );
        refused(b"<html>\n<head></head></html>", "it is an HTML page");
        let mut zip = b"PK\x03\x04\x14\x00\x00\x00".to_vec();
        zip.extend([0u8; 100]);
        refused(&zip, "it is a ZIP archive (a PyTorch checkpoint");
        let mut pickle = b"\x80\x02}q\x00(X\x05\x00".to_vec();
        pickle.extend([0u8; 64]);
        refused(&pickle, "it is a Python pickle");
        refused(b"model weights, see the README\n", "it is a text file");
        let mut npy = b"\x93NUMPY\x01\x00".to_vec();
        npy.extend([0u8; 64]);
        refused(&npy, "NumPy");
        // A plausible-looking length that is longer than the file is still that.
        let mut short = 64u64.to_le_bytes().to_vec();
        short.extend_from_slice(b"{}");
        refused(&short, "runs past the end of the 10-byte file");
        // Data past the end of the file, and trailing bytes.
        refused(&file(GOOD, 30), "past the end of the");
        refused(&file(GOOD, 40), "4 trailing bytes");
    }
}
