//! NumPy arrays as files and as pickles, for float data: the `.npy` format (NumPy
//! `numpy/lib/_format_impl.py`, formerly `format.py`, versions 1–3), which pytorch-fid's `.npz`
//! statistics and hindsight's stored features use, and NumPy's pickles of arrays, which EDM2's
//! reference `.pkl` holds.
//!
//! `.npy` layout: `\x93NUMPY`, version (2 bytes), header length (2 bytes in v1, 4 in v2/3),
//! a Python dict literal `{'descr': '<f8', 'fortran_order': False, 'shape': (d, d), }` padded
//! with spaces and a newline so the data starts on a 64-byte boundary, then the data.
//!
//! The header is parsed as the literal it is ([`Header`]): strings in either quotes with
//! escapes, `True`/`False`, integers, tuples; exactly the keys `descr`, `fortran_order` and
//! `shape`, each once (NumPy refuses other keys; a duplicate is refused here too). Float
//! arrays of either byte order and either memory order are read; Fortran-order data is
//! transposed to row-major (C order), which every caller expects.

use std::io::Write;

use super::pickle::{Kind, Ref};
use crate::error::{Error, Result};

/// Longest `.npy` header read (NumPy's own default `max_header_size`).
pub const MAX_HEADER_BYTES: usize = 10_000;

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

/// An element type, as NumPy's `descr` (`<f8`, `|O`, …) or a pickled `numpy.dtype` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// An IEEE float of `size` bytes (4 or 8), little- or big-endian.
    Float {
        /// 4 (float32) or 8 (float64).
        size: usize,
        /// Stored most significant byte first (`>`).
        big_endian: bool,
    },
    /// Python objects (`|O`): in a `.npy`, the data is a pickle of the array.
    Object,
    /// Anything else, by its `descr` (`<i8`, `|u1`, `<f2`, a structured type …).
    Other(String),
}

impl Dtype {
    /// From a `descr` string: a byte order (`<`, `>`, `|`, `=`; optional) then a type code.
    /// `=` (the writer's native order) is kept as [`Dtype::Other`]: the order is unknown.
    pub fn from_descr(descr: &str) -> Dtype {
        let (order, code) = match descr.chars().next() {
            Some(c @ ('<' | '>' | '|' | '=')) => (c, &descr[1..]),
            _ => ('|', descr),
        };
        match (order, code) {
            ('<' | '|', "f4") => Dtype::Float {
                size: 4,
                big_endian: false,
            },
            ('<' | '|', "f8") => Dtype::Float {
                size: 8,
                big_endian: false,
            },
            ('>', "f4") => Dtype::Float {
                size: 4,
                big_endian: true,
            },
            ('>', "f8") => Dtype::Float {
                size: 8,
                big_endian: true,
            },
            ('|', "O" | "O8") => Dtype::Object,
            _ => Dtype::Other(descr.to_owned()),
        }
    }

    /// A name for messages: `float64`, `float32 (big-endian)`, `object`, `'<i8'`.
    pub fn name(&self) -> String {
        match self {
            Dtype::Float { size, big_endian } => {
                let bits = size * 8;
                if *big_endian {
                    format!("float{bits} (big-endian)")
                } else {
                    format!("float{bits}")
                }
            }
            Dtype::Object => "object".into(),
            Dtype::Other(d) => format!("{d:?}"),
        }
    }
}

/// A parsed `.npy` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The element type (`descr`).
    pub dtype: Dtype,
    /// Whether the data is in column-major (Fortran) order.
    pub fortran_order: bool,
    /// The shape; `[]` for a 0-d array.
    pub shape: Vec<usize>,
    /// Where the data starts in the file.
    pub data_offset: usize,
}

impl Header {
    /// `"shape [2048] float64"`, for messages.
    pub fn describe(&self) -> String {
        format!("shape {:?} {}", self.shape, self.dtype.name())
    }

    /// The number of elements, if it fits a `usize`.
    pub fn count(&self) -> Option<usize> {
        element_count(&self.shape)
    }
}

fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Reads the header of a `.npy`. `source` names it in errors.
///
/// Errors: no `\x93NUMPY` magic, an unknown version, a header longer than
/// [`MAX_HEADER_BYTES`] or running past the end, and any header that is not exactly
/// NumPy's dict literal (unknown, duplicate or missing keys; values of the wrong type).
pub fn read_header(bytes: &[u8], source: &str) -> Result<Header> {
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
        v => return Err(bad(&format!("unknown format version {v}"))),
    };
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(&format!(
            "a header of {header_len} bytes, more than {MAX_HEADER_BYTES} (the .npy header limit)"
        )));
    }
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("the header runs past the end"))?;
    let raw = &bytes[start..end];
    // Versions 1 and 2 are latin-1, version 3 UTF-8; the literal itself is ASCII.
    let text: String = if bytes[6] == 3 {
        std::str::from_utf8(raw)
            .map_err(|_| bad("a version-3 header that is not UTF-8"))?
            .to_owned()
    } else {
        raw.iter().map(|&b| b as char).collect()
    };
    let (descr, fortran_order, shape) = HeaderParser::new(&text).dict().map_err(|e| bad(&e))?;
    Ok(Header {
        dtype: Dtype::from_descr(&descr),
        fortran_order,
        shape,
        data_offset: end,
    })
}

/// A parser of the header's Python literal: `{'descr': …, 'fortran_order': …, 'shape': …}`.
/// No recursion: a tuple holds integers only.
struct HeaderParser<'a> {
    text: &'a str,
    pos: usize,
}

/// A value of the literal.
enum Literal {
    Str(String),
    Bool(bool),
    Int(u64),
    Tuple(Vec<u64>),
}

impl Literal {
    fn kind(&self) -> &'static str {
        match self {
            Literal::Str(_) => "a string",
            Literal::Bool(_) => "a boolean",
            Literal::Int(_) => "an integer",
            Literal::Tuple(_) => "a tuple",
        }
    }
}

impl<'a> HeaderParser<'a> {
    fn new(text: &'a str) -> Self {
        Self { text, pos: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.text[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn skip_space(&mut self) {
        let rest = self.rest();
        let trimmed = rest.trim_start_matches([' ', '\t', '\n', '\r', '\x0c']);
        self.pos += rest.len() - trimmed.len();
    }

    fn err(&self, what: &str) -> String {
        format!(
            "the header's dict literal: {what} at character {}",
            self.pos
        )
    }

    fn expect(&mut self, c: char) -> std::result::Result<(), String> {
        self.skip_space();
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            Ok(())
        } else {
            Err(self.err(&format!("{c:?} expected")))
        }
    }

    /// The whole header: the dict, then only whitespace.
    fn dict(&mut self) -> std::result::Result<(String, bool, Vec<usize>), String> {
        self.expect('{')?;
        let (mut descr, mut fortran, mut shape) = (None, None, None);
        loop {
            self.skip_space();
            if self.peek() == Some('}') {
                self.pos += 1;
                break;
            }
            let key = match self.value()? {
                Literal::Str(k) => k,
                other => return Err(self.err(&format!("a key that is {}", other.kind()))),
            };
            self.expect(':')?;
            let value = self.value()?;
            let slot_taken = match key.as_str() {
                "descr" => descr.replace(value).is_some(),
                "fortran_order" => fortran.replace(value).is_some(),
                "shape" => shape.replace(value).is_some(),
                other => {
                    return Err(format!(
                        "the header has the key {other:?}; a .npy header holds exactly 'descr', \
                         'fortran_order' and 'shape' (NumPy refuses other keys)"
                    ))
                }
            };
            if slot_taken {
                return Err(format!("the header gives {key:?} twice"));
            }
            self.skip_space();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some('}') => {}
                _ => return Err(self.err("',' or '}' expected")),
            }
        }
        self.skip_space();
        if self.pos != self.text.len() {
            return Err(self.err("text after the dict"));
        }
        let missing = |k: &str| format!("the header has no {k:?}");
        let descr = match descr.ok_or_else(|| missing("descr"))? {
            Literal::Str(s) => s,
            Literal::Tuple(_) => {
                return Err("'descr' is a tuple: a structured dtype, which is not read".into())
            }
            other => return Err(format!("'descr' is {}, not a string", other.kind())),
        };
        let fortran = match fortran.ok_or_else(|| missing("fortran_order"))? {
            Literal::Bool(b) => b,
            other => {
                return Err(format!(
                    "'fortran_order' is {}, not a boolean",
                    other.kind()
                ))
            }
        };
        let shape = match shape.ok_or_else(|| missing("shape"))? {
            Literal::Tuple(dims) => dims
                .into_iter()
                .map(|d| usize::try_from(d).map_err(|_| format!("a dimension of {d} is too large")))
                .collect::<std::result::Result<Vec<_>, _>>()?,
            other => return Err(format!("'shape' is {}, not a tuple", other.kind())),
        };
        Ok((descr, fortran, shape))
    }

    fn value(&mut self) -> std::result::Result<Literal, String> {
        self.skip_space();
        match self.peek() {
            Some(q @ ('\'' | '"')) => self.string(q).map(Literal::Str),
            Some('(') => self.tuple(),
            Some(c) if c.is_ascii_digit() => self.int().map(Literal::Int),
            Some('[') => {
                Err("'[' in the header: a structured dtype (a list), which is not read".into())
            }
            Some(_) => {
                let rest = self.rest();
                for (word, b) in [("True", true), ("False", false)] {
                    if rest.starts_with(word)
                        && !rest[word.len()..]
                            .starts_with(|c: char| c.is_alphanumeric() || c == '_')
                    {
                        self.pos += word.len();
                        return Ok(Literal::Bool(b));
                    }
                }
                Err(self.err("a string, True, False, an integer or a tuple expected"))
            }
            None => Err(self.err("the header ends")),
        }
    }

    /// A non-negative integer (a trailing `L`, as Python 2's NumPy wrote, is allowed).
    fn int(&mut self) -> std::result::Result<u64, String> {
        let rest = self.rest();
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| self.err("an integer too large"))?;
        self.pos += digits;
        if self.peek() == Some('L') {
            self.pos += 1;
        }
        if self
            .peek()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.')
        {
            return Err(self.err("a malformed integer"));
        }
        Ok(value)
    }

    /// `()`, `(5,)`, `(2, 3)`, `(2, 3,)` of integers; `(5)` is an integer, as in Python.
    fn tuple(&mut self) -> std::result::Result<Literal, String> {
        self.expect('(')?;
        let mut items = Vec::new();
        let mut comma = false;
        loop {
            self.skip_space();
            if self.peek() == Some(')') {
                self.pos += 1;
                break;
            }
            if !items.is_empty() && !comma {
                return Err(self.err("',' or ')' expected"));
            }
            match self.value()? {
                Literal::Int(i) => items.push(i),
                other => {
                    return Err(self.err(&format!(
                        "a tuple item that is {} (only shapes, of integers, are read)",
                        other.kind()
                    )))
                }
            }
            if items.len() > 64 {
                return Err(self.err("more than 64 dimensions"));
            }
            self.skip_space();
            comma = self.peek() == Some(',');
            if comma {
                self.pos += 1;
            }
        }
        if items.len() == 1 && !comma {
            return Ok(Literal::Int(items[0]));
        }
        Ok(Literal::Tuple(items))
    }

    /// A quoted string with Python's escapes (`\\`, `\'`, `\"`, `\n`, `\t`, `\r`, `\0`,
    /// `\xhh`, `\uhhhh`, `\Uhhhhhhhh`).
    fn string(&mut self, quote: char) -> std::result::Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                c if c == quote => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\n' => break,
                '\\' => {
                    let Some((_, e)) = chars.next() else { break };
                    let hex = |chars: &mut std::str::CharIndices, n: usize| {
                        let digits: String = chars.by_ref().take(n).map(|(_, c)| c).collect();
                        (digits.len() == n)
                            .then(|| u32::from_str_radix(&digits, 16).ok())
                            .flatten()
                            .and_then(char::from_u32)
                    };
                    let decoded = match e {
                        '\\' | '\'' | '"' => Some(e),
                        'n' => Some('\n'),
                        't' => Some('\t'),
                        'r' => Some('\r'),
                        '0' => Some('\0'),
                        'x' => hex(&mut chars, 2),
                        'u' => hex(&mut chars, 4),
                        'U' => hex(&mut chars, 8),
                        _ => None,
                    };
                    match decoded {
                        Some(d) => out.push(d),
                        None => {
                            return Err(self.err(&format!("an unknown escape \\{e} in a string")))
                        }
                    }
                }
                c => out.push(c),
            }
        }
        Err(self.err("an unterminated string"))
    }
}

/// An element type the readers below convert to.
trait Element: Copy {
    fn from_f32(v: f32) -> Self;
    fn from_f64(v: f64) -> Self;
}

impl Element for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Element for f64 {
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// Decodes float data of `shape` (`data` already checked to hold exactly its elements) into
/// row-major values.
fn decode<T: Element>(
    data: &[u8],
    size: usize,
    big_endian: bool,
    shape: &[usize],
    fortran: bool,
) -> Vec<T> {
    let values: Vec<T> = if size == 8 {
        data.chunks_exact(8)
            .map(|c| {
                let b: [u8; 8] = c.try_into().expect("8 bytes");
                T::from_f64(if big_endian {
                    f64::from_be_bytes(b)
                } else {
                    f64::from_le_bytes(b)
                })
            })
            .collect()
    } else {
        data.chunks_exact(4)
            .map(|c| {
                let b: [u8; 4] = c.try_into().expect("4 bytes");
                T::from_f32(if big_endian {
                    f32::from_be_bytes(b)
                } else {
                    f32::from_le_bytes(b)
                })
            })
            .collect()
    };
    if fortran {
        fortran_to_c(&values, shape)
    } else {
        values
    }
}

/// Column-major values of `shape` in row-major order: element `(i₀, …, iₙ₋₁)` sits at
/// `i₀ + d₀(i₁ + d₁(…))` in the input and `(…(i₀d₁ + i₁)d₂ + …)` in the output.
fn fortran_to_c<T: Copy>(values: &[T], shape: &[usize]) -> Vec<T> {
    if shape.len() < 2 || values.is_empty() {
        return values.to_vec();
    }
    let mut strides = vec![1usize; shape.len()];
    for k in 1..shape.len() {
        strides[k] = strides[k - 1] * shape[k - 1];
    }
    let mut out = Vec::with_capacity(values.len());
    let mut index = vec![0usize; shape.len()];
    let mut at = 0usize;
    for _ in 0..values.len() {
        out.push(values[at]);
        // Advance the row-major index, last axis fastest, keeping `at` in step.
        for k in (0..shape.len()).rev() {
            index[k] += 1;
            at += strides[k];
            if index[k] < shape[k] {
                break;
            }
            at -= strides[k] * shape[k];
            index[k] = 0;
        }
    }
    out
}

/// The shape and data of a float `.npy`, checked: the data holds exactly the elements the
/// shape says (so what is allocated is bounded by the input).
fn float_data<'a>(bytes: &'a [u8], source: &str) -> Result<(Header, usize, bool, &'a [u8])> {
    let header = read_header(bytes, source)?;
    let bad =
        |reason: String| Error::invalid(source, format!("not a readable .npy array: {reason}"));
    let Dtype::Float { size, big_endian } = header.dtype else {
        return Err(bad(format!(
            "an array of {}: only float32 and float64 arrays are read",
            header.describe()
        )));
    };
    let data = &bytes[header.data_offset..];
    let want = header
        .count()
        .and_then(|c| c.checked_mul(size))
        .ok_or_else(|| bad(format!("the shape {:?} overflows", header.shape)))?;
    if data.len() != want {
        return Err(bad(format!(
            "the shape {:?} of {} needs {want} bytes of data, and {} follow the header",
            header.shape,
            header.dtype.name(),
            data.len()
        )));
    }
    Ok((header, size, big_endian, data))
}

/// Reads a float32 or float64 array (either byte order, either memory order): its shape and
/// its values as f64, row-major. `source` names it in errors.
pub fn read_f64(bytes: &[u8], source: &str) -> Result<(Vec<usize>, Vec<f64>)> {
    let (header, size, big_endian, data) = float_data(bytes, source)?;
    let values = decode(data, size, big_endian, &header.shape, header.fortran_order);
    Ok((header.shape, values))
}

/// Reads a float32 or float64 array as f32 (features), row-major.
pub fn read_f32(bytes: &[u8], source: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let (header, size, big_endian, data) = float_data(bytes, source)?;
    let values = decode(data, size, big_endian, &header.shape, header.fortran_order);
    Ok((header.shape, values))
}

/// The header and data of an integer `.npy` whose `descr` is one of `accepted` (e.g. `|u1`),
/// checked to hold exactly the shape's elements of `size` bytes.
fn int_data<'a>(
    bytes: &'a [u8],
    source: &str,
    accepted: &[(&str, usize)],
    wanted: &str,
) -> Result<(Header, usize, String, &'a [u8])> {
    let header = read_header(bytes, source)?;
    let bad =
        |reason: String| Error::invalid(source, format!("not a readable .npy array: {reason}"));
    let descr = match &header.dtype {
        Dtype::Other(d) => d.clone(),
        _ => String::new(),
    };
    // One-byte types have no byte order: `<u1` and `|u1` are the same.
    let descr = match descr.strip_suffix('1') {
        Some(code) if code.len() == 2 && !code.starts_with('>') => format!("|{}1", &code[1..]),
        _ => descr,
    };
    let Some(&(_, size)) = accepted.iter().find(|(d, _)| *d == descr) else {
        return Err(Error::invalid(
            source,
            format!("an array of {}; {wanted}", header.describe()),
        ));
    };
    let data = &bytes[header.data_offset..];
    let want = header
        .count()
        .and_then(|c| c.checked_mul(size))
        .ok_or_else(|| bad(format!("the shape {:?} overflows", header.shape)))?;
    if data.len() != want {
        return Err(bad(format!(
            "the shape {:?} of {} needs {want} bytes of data, and {} follow the header",
            header.shape,
            header.dtype.name(),
            data.len()
        )));
    }
    Ok((header, size, descr, data))
}

/// Reads a `uint8` array (`|u1`; images): its shape and its values, row-major. Errors name
/// `source` and say what the array is instead.
pub fn read_u8(bytes: &[u8], source: &str) -> Result<(Vec<usize>, Vec<u8>)> {
    let (header, _, _, data) = int_data(bytes, source, &[("|u1", 1)], "uint8 is expected")?;
    let values = if header.fortran_order {
        fortran_to_c(data, &header.shape)
    } else {
        data.to_vec()
    };
    Ok((header.shape, values))
}

/// Reads a little-endian integer array (int8 … int64, uint8 … uint32) as i64, row-major.
pub fn read_ints(bytes: &[u8], source: &str) -> Result<(Vec<usize>, Vec<i64>)> {
    let accepted = [
        ("|u1", 1),
        ("|i1", 1),
        ("<u2", 2),
        ("<i2", 2),
        ("<u4", 4),
        ("<i4", 4),
        ("<i8", 8),
    ];
    let (header, size, descr, data) = int_data(
        bytes,
        source,
        &accepted,
        "integers (int8 to int64) are expected",
    )?;
    let signed = descr.contains('i');
    let values: Vec<i64> = data
        .chunks_exact(size)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..size].copy_from_slice(c);
            if signed && c[size - 1] & 0x80 != 0 {
                b[size..].fill(0xff);
            }
            i64::from_le_bytes(b)
        })
        .collect();
    let values = if header.fortran_order {
        fortran_to_c(&values, &header.shape)
    } else {
        values
    };
    Ok((header.shape, values))
}

/// Whether `(module, name)` is NumPy's `_reconstruct` (NumPy 1.x `numpy.core.multiarray`,
/// 2.x `numpy._core.multiarray`).
fn is_reconstruct(global: (&str, &str)) -> bool {
    matches!(
        global,
        (
            "numpy.core.multiarray" | "numpy._core.multiarray",
            "_reconstruct"
        )
    )
}

/// Whether `(module, name)` is NumPy's `_frombuffer` (protocol 5: `numpy.core.numeric` /
/// `numpy._core.numeric`).
fn is_frombuffer(global: (&str, &str)) -> bool {
    matches!(
        global,
        ("numpy.core.numeric" | "numpy._core.numeric", "_frombuffer")
    )
}

/// Whether `value` is a pickled NumPy array, in either form [`pickled_f64`] reads.
pub fn is_pickled_array(value: Ref) -> bool {
    value
        .global()
        .is_some_and(|g| is_reconstruct(g) || is_frombuffer(g))
}

/// A pickled `numpy.dtype`: `numpy.dtype('f8', False, True)` with `BUILD` state
/// `(3, '<', None, None, None, -1, -1, 0)` (NumPy's `arraydescr_reduce`): the type code and
/// the byte order (state item 1).
fn pickled_dtype(value: Ref) -> Option<Dtype> {
    if !matches!(value.global(), Some(("numpy", "dtype"))) {
        return None;
    }
    let Kind::Object { args, state, .. } = value.kind() else {
        return None;
    };
    let code = args.item(0)?.as_str()?;
    let order = match state {
        Some(s) => s.item(1)?.as_str()?,
        None => "|",
    };
    // The code may carry its own order ('<f8'); the state's wins, as NumPy's __setstate__.
    let code = code.trim_start_matches(['<', '>', '|', '=']);
    Some(Dtype::from_descr(&format!("{order}{code}")))
}

/// The parts of a pickled NumPy array: shape, dtype, Fortran order, and the data (bytes, or
/// for object arrays the list of objects).
struct PickledArray<'a> {
    shape: Vec<usize>,
    dtype: Dtype,
    fortran: bool,
    data: Ref<'a>,
}

/// The parts of a NumPy array pickled by NumPy itself, in either form:
///
/// - protocols 2–4 (and 5 for arrays NumPy does not hand over as buffers):
///   `numpy._core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')` then `BUILD` with the
///   state `(1, shape, dtype, is_fortran, data)` (`ndarray.__reduce__`/`__setstate__`; the
///   data is bytes, or a list for object arrays; the version item is absent in old pickles);
/// - protocol 5: `numpy._core.numeric._frombuffer(buffer, dtype, shape, order)` with the
///   buffer in band (`BYTEARRAY8`/`BINBYTES`), `order` `'C'` or `'F'`.
fn pickled_parts<'a>(value: Ref<'a>, what: &str) -> std::result::Result<PickledArray<'a>, String> {
    let global = value
        .global()
        .ok_or_else(|| format!("{what} is {}, not a NumPy array", value.describe()))?;
    let Kind::Object { args, state, .. } = value.kind() else {
        return Err(format!("{what} is {}, not a NumPy array", value.describe()));
    };
    let shape_of = |v: Ref| -> std::result::Result<Vec<usize>, String> {
        let items = v
            .items()
            .ok_or_else(|| format!("{what}'s shape is {}, not a tuple", v.describe()))?;
        if items.len() > 64 {
            return Err(format!("{what}'s shape has more than 64 dimensions"));
        }
        items
            .iter()
            .map(|d| {
                d.as_int()
                    .and_then(|d| usize::try_from(d).ok())
                    .ok_or_else(|| format!("{what}'s shape holds {}", d.describe()))
            })
            .collect()
    };
    let dtype_of = |v: Ref| {
        pickled_dtype(v)
            .ok_or_else(|| format!("{what}'s dtype is {}, not a numpy.dtype", v.describe()))
    };
    let malformed = |part: &str| format!("{what} is a malformed NumPy pickle ({part})");
    if is_reconstruct(global) {
        let state = state.ok_or_else(|| malformed("_reconstruct without a BUILD state"))?;
        let items = state
            .items()
            .ok_or_else(|| malformed("its state is not a tuple"))?;
        // (version, shape, dtype, fortran, data), or without the version.
        let skip = match items.len() {
            5 => 1,
            4 => 0,
            n => return Err(malformed(&format!("a state of {n} items, not 5"))),
        };
        let part = |i: usize| items.get(skip + i).expect("checked length");
        let fortran = part(2)
            .as_int()
            .ok_or_else(|| malformed("its Fortran flag is not a boolean"))?
            != 0;
        Ok(PickledArray {
            shape: shape_of(part(0))?,
            dtype: dtype_of(part(1))?,
            fortran,
            data: part(3),
        })
    } else if is_frombuffer(global) {
        let item = |i: usize| {
            args.item(i)
                .ok_or_else(|| malformed("_frombuffer with fewer than 4 arguments"))
        };
        let fortran = match item(3)?.as_str() {
            Some("C") => false,
            Some("F") => true,
            _ => return Err(malformed("an order that is neither 'C' nor 'F'")),
        };
        Ok(PickledArray {
            shape: shape_of(item(2)?)?,
            dtype: dtype_of(item(1)?)?,
            fortran,
            data: item(0)?,
        })
    } else {
        let (m, n) = global;
        Err(format!(
            "{what} is a {m}.{n} object, not a NumPy array (numpy _reconstruct or _frombuffer)"
        ))
    }
}

/// A float32 or float64 NumPy array pickled by NumPy (see the forms above; NumPy 1.x and 2.x
/// module names; either byte order; C or Fortran order): its shape and values as f64,
/// row-major. `what` names it in messages (`fid.mu`); the message is the error's reason.
///
/// Errors: not an array, a dtype other than float32/float64, data whose length does not
/// match the shape.
pub fn pickled_f64(value: Ref, what: &str) -> std::result::Result<(Vec<usize>, Vec<f64>), String> {
    let array = pickled_parts(value, what)?;
    let Dtype::Float { size, big_endian } = array.dtype else {
        return Err(format!(
            "{what} is a NumPy array of {}, not float32 or float64",
            array.dtype.name()
        ));
    };
    let data = array
        .data
        .as_bytes()
        .ok_or_else(|| format!("{what}'s data is {}, not bytes", array.data.describe()))?;
    let want = element_count(&array.shape)
        .and_then(|c| c.checked_mul(size))
        .ok_or_else(|| format!("{what}'s shape {:?} overflows", array.shape))?;
    if data.len() != want {
        return Err(format!(
            "{what} has shape {:?} of {} ({want} bytes) but {} bytes of data",
            array.shape,
            array.dtype.name(),
            data.len()
        ));
    }
    let values = decode(data, size, big_endian, &array.shape, array.fortran);
    Ok((array.shape, values))
}

/// The elements of a pickled NumPy object array (`dtype=object`, as `numpy.save` writes a
/// dict: a 0-d object array), in stored order, with its shape.
pub fn pickled_objects<'a>(
    value: Ref<'a>,
    what: &str,
) -> std::result::Result<(Vec<usize>, Vec<Ref<'a>>), String> {
    let array = pickled_parts(value, what)?;
    if array.dtype != Dtype::Object {
        return Err(format!(
            "{what} is a NumPy array of {}, not of objects",
            array.dtype.name()
        ));
    }
    let items = array
        .data
        .items()
        .ok_or_else(|| format!("{what}'s objects are {}, not a list", array.data.describe()))?;
    if Some(items.len()) != element_count(&array.shape) {
        return Err(format!(
            "{what} has shape {:?} but {} objects",
            array.shape,
            items.len()
        ));
    }
    Ok((array.shape, items.iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    #[track_caller]
    fn check(header: &str, expected: std::result::Result<(&str, bool, &[usize]), &str>) {
        let got = read_header(&npy(header, &[]), "x");
        match (got, expected) {
            (Ok(h), Ok((descr, fortran, shape))) => {
                assert_eq!(h.dtype, Dtype::from_descr(descr), "{header}");
                assert_eq!(
                    (h.fortran_order, h.shape.as_slice()),
                    (fortran, shape),
                    "{header}"
                );
            }
            (Err(e), Err(needle)) => {
                let e = e.to_string();
                assert!(e.contains(needle), "{header}: {e}");
            }
            (got, _) => panic!("{header}: {got:?}"),
        }
    }

    #[test]
    fn the_header_is_parsed_as_the_python_literal_it_is() {
        check(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2048, 2048), }     \n",
            Ok(("<f8", false, &[2048, 2048])),
        );
        check(
            "{\"descr\":\"<f4\",\"fortran_order\":True,\"shape\":(5,)}",
            Ok(("<f4", true, &[5])),
        );
        check(
            "{'descr': '|O', 'fortran_order': False, 'shape': (), }",
            Ok(("|O", false, &[])),
        );
        check(
            "  {'shape': (3, 4,), 'descr': '>f8', 'fortran_order': False}\n",
            Ok((">f8", false, &[3, 4])),
        );
        check(
            "{'descr': '\\x3cf8', 'fortran_order': False, 'shape': (2L, 3L)}",
            Ok(("<f8", false, &[2, 3])),
        );
        // The trick of issue "Reliability 2": an extra key whose text holds another descr.
        check(
            "{'descr': '|u1', 'note': \"'descr': '<f8', 'shape': (2,)\", 'fortran_order': False, 'shape': (16,), }",
            Err("the key \"note\""),
        );
        check(
            "{'descr': '<f8', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}",
            Err("\"descr\" twice"),
        );
        check(
            "{'descr': '<f8', 'fortran_order': False}",
            Err("no \"shape\""),
        );
        check(
            "{'descr': '<f8', 'fortran_order': 0, 'shape': (1,)}",
            Err("not a boolean"),
        );
        check(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (5)}",
            Err("not a tuple"),
        );
        check(
            "{'descr': '<f8', 'fortran_order': False, 'shape': )(3, 3), }",
            Err("expected"),
        );
        check(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (1,)} x",
            Err("text after"),
        );
        check(
            "{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (1,)}",
            Err("structured"),
        );
        check(
            "{'descr': '<f8', 'fortran_order': Falsey, 'shape': (1,)}",
            Err("expected"),
        );
        check(
            "{'descr': '<f8, 'fortran_order': False, 'shape': (1,)}",
            Err("expected"),
        );
        check(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (-1,)}",
            Err("expected"),
        );
        check(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999999999999999,)}",
            Err("too large"),
        );
    }

    /// Found by `tests/fuzz.rs`: a shape that does not start with `(` (here `)(3, 3)`)
    /// sliced the header out of order and panicked.
    #[test]
    fn a_shape_that_is_not_a_tuple_is_an_error() {
        let bytes = npy(
            "{'descr': '<f8', 'fortran_order': False, 'shape': )(3, 3), }",
            &[],
        );
        assert!(read_f64(&bytes, "x").is_err());
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

    #[test]
    fn fortran_order_and_big_endian_arrays_are_read_row_major() {
        // [[1, 2, 3], [4, 5, 6]] stored column-major: 1 4 2 5 3 6, big-endian f8.
        let data: Vec<u8> = [1.0f64, 4.0, 2.0, 5.0, 3.0, 6.0]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let bytes = npy(
            "{'descr': '>f8', 'fortran_order': True, 'shape': (2, 3), }",
            &data,
        );
        assert_eq!(
            read_f64(&bytes, "x").unwrap(),
            (vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        );
        // A 2×2×2 array of 0..8 (row-major), stored column-major as f4.
        let f_order = [0f32, 4.0, 2.0, 6.0, 1.0, 5.0, 3.0, 7.0];
        let data: Vec<u8> = f_order.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = npy(
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2, 2), }",
            &data,
        );
        let (_, values) = read_f32(&bytes, "x").unwrap();
        assert_eq!(values, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        // Other dtypes are named.
        let bytes = npy(
            "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }",
            &[0; 8],
        );
        let err = read_f64(&bytes, "x").unwrap_err().to_string();
        assert!(err.contains("shape [1] \"<i8\""), "{err}");
    }

    #[test]
    fn oversized_headers_are_refused_before_reading_them() {
        let mut bytes = b"\x93NUMPY\x02\x00".to_vec();
        bytes.extend(u32::MAX.to_le_bytes());
        let err = read_header(&bytes, "x").unwrap_err().to_string();
        assert!(err.contains("(the .npy header limit)"), "{err}");
    }
}
