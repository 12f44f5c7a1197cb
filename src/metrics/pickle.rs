//! A small, bounded reader of Python pickles (protocols 2–5): enough to walk the object graphs
//! that hold FID weights and statistics — TorchScript archives' `data.pkl`, `torch.save`
//! state dicts, and EDM2's reference statistics (NumPy arrays in nested dicts) — without
//! executing anything. Classes are recorded by name, never resolved; every size is bounded.
//!
//! The format: a stack machine of one-byte opcodes (CPython `Lib/pickletools.py` documents
//! each). Objects built by `NEWOBJ`/`REDUCE`/`BUILD` stay symbolic ([`Value::Object`]), and
//! the caller interprets the few classes it knows.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// A decoded pickle value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True`/`False`.
    Bool(bool),
    /// An integer (pickled ints beyond 64 bits are refused).
    Int(i64),
    /// A float.
    Float(f64),
    /// A `str`.
    Str(String),
    /// `bytes` (or a protocol-2 `str` of bytes).
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A dict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A global reference `module.name` (a class or function), unresolved.
    Global {
        /// The module.
        module: String,
        /// The name inside it.
        name: String,
    },
    /// An object: `callable(*args)` (`REDUCE` or `NEWOBJ`), then `__setstate__(state)` when
    /// `BUILD` gave one.
    Object {
        /// The class or function.
        callable: Box<Value>,
        /// Its arguments (a tuple).
        args: Box<Value>,
        /// The `BUILD` state, if any.
        state: Option<Box<Value>>,
    },
    /// A persistent id (`BINPERSID`): how pickles refer to out-of-band data, such as a torch
    /// archive's storages.
    Persistent(Box<Value>),
}

impl Value {
    /// The entries of a dict, or of an object whose state (or reduce arguments, for
    /// `OrderedDict`) is one.
    pub fn entries(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(items) => Some(items),
            Value::Object { args, state, .. } => match (args.as_ref(), state) {
                // collections.OrderedDict filled by SETITEMS after REDUCE keeps its items in
                // `args`' place (see `set_items`); its BUILD state is only `_metadata`.
                (Value::Dict(items), _) => Some(items),
                (_, Some(s)) => s.entries(),
                _ => None,
            },
            _ => None,
        }
    }

    /// The value under string key `key` of a dict-like value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries()?
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
            .map(|(_, v)| v)
    }

    /// `module.name` of a global, or of an object's callable.
    pub fn class_name(&self) -> Option<String> {
        match self {
            Value::Global { module, name } => Some(format!("{module}.{name}")),
            Value::Object { callable, .. } => callable.class_name(),
            _ => None,
        }
    }

    /// The integer, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The items of a tuple or list.
    pub fn items(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }
}

/// Largest pickle accepted (the metadata of a checkpoint; tensor data lives elsewhere, except
/// in NumPy pickles of statistics: 2048² f64 is 32 MiB).
pub const MAX_PICKLE_BYTES: usize = 256 << 20;

/// Parses a whole pickle. `source` names it in errors.
pub fn parse(bytes: &[u8], source: &str) -> Result<Value> {
    if bytes.len() > MAX_PICKLE_BYTES {
        return Err(Error::invalid(
            source,
            format!(
                "a {}-byte pickle is larger than {MAX_PICKLE_BYTES} bytes",
                bytes.len()
            ),
        ));
    }
    Machine {
        bytes,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        source,
    }
    .run()
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    source: &'a str,
}

impl Machine<'_> {
    fn bad(&self, reason: impl Into<String>) -> Error {
        Error::invalid(
            self.source,
            format!(
                "not a readable pickle at byte {}: {}",
                self.pos,
                reason.into()
            ),
        )
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.bytes.len() - self.pos < n {
            return Err(self.bad(format!("{n} more bytes expected, the data ends")));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    /// A length for a following payload, checked against what is left.
    fn len(&mut self, n: u64) -> Result<usize> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(self.bad(format!("a length of {n} bytes runs past the end")));
        }
        Ok(n as usize)
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.bytes[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.bad("unterminated line"))?;
        let text = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(text)
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack
            .pop()
            .ok_or_else(|| self.bad("the stack is empty"))
    }

    fn top(&mut self) -> Result<&mut Value> {
        let pos = self.pos;
        let source = self.source;
        self.stack.last_mut().ok_or_else(|| {
            Error::invalid(
                source,
                format!("not a readable pickle at byte {pos}: the stack is empty"),
            )
        })
    }

    /// The values above the last mark, removing them and the mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self.marks.pop().ok_or_else(|| self.bad("no mark"))?;
        if mark > self.stack.len() {
            return Err(self.bad("a mark above the stack"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn str(&mut self, n: usize) -> Result<Value> {
        let bytes = self.take(n)?.to_vec();
        String::from_utf8(bytes)
            .map(Value::Str)
            .map_err(|_| self.bad("a str that is not UTF-8"))
    }

    fn bytes_value(&mut self, n: usize) -> Result<Value> {
        Ok(Value::Bytes(self.take(n)?.to_vec()))
    }

    fn memo_get(&mut self, key: u32) -> Result<()> {
        let value = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| self.bad(format!("memo entry {key} was never stored")))?;
        self.stack.push(value);
        Ok(())
    }

    fn memo_put(&mut self, key: u32) -> Result<()> {
        let value = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| self.bad("the stack is empty"))?;
        self.memo.insert(key, value);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(self.bad("SETITEMS with an odd number of values"));
        }
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        match self.top()? {
            Value::Dict(d) => d.extend(pairs),
            // An object built by REDUCE (OrderedDict, defaultdict) filled by SETITEMS: keep
            // the items as its (dict) arguments.
            Value::Object { args, .. } => match args.as_mut() {
                Value::Dict(d) => d.extend(pairs),
                other => *other = Value::Dict(pairs),
            },
            _ => return Err(self.bad("SETITEMS on something that is not a dict")),
        }
        Ok(())
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(self.bad(format!("unsupported protocol {proto}")));
                    }
                }
                // FRAME: a length we do not need.
                0x95 => {
                    self.take(8)?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.stack.push(Value::Int(v as i64));
                }
                // LONG1: a little-endian two's-complement integer of n bytes.
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(self.bad("an integer wider than 64 bits"));
                    }
                    let raw = self.take(n)?;
                    let mut buf = if raw.last().is_some_and(|&b| b & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(raw);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.stack.push(Value::Float(v));
                }
                // BINUNICODE8, BINUNICODE, SHORT_BINUNICODE
                0x8d => {
                    let n = u64::from_le_bytes(self.le()?);
                    let n = self.len(n)?;
                    let v = self.str(n)?;
                    self.stack.push(v);
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.le()?) as u64;
                    let n = self.len(n)?;
                    let v = self.str(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.str(n)?;
                    self.stack.push(v);
                }
                // BINSTRING, SHORT_BINSTRING (protocol-2 byte strings)
                b'T' => {
                    let n = u32::from_le_bytes(self.le()?) as u64;
                    let n = self.len(n)?;
                    let v = self.bytes_value(n)?;
                    self.stack.push(v);
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let v = self.bytes_value(n)?;
                    self.stack.push(v);
                }
                // BINBYTES8, BINBYTES, SHORT_BINBYTES, BYTEARRAY8
                0x8e | 0x96 => {
                    let n = u64::from_le_bytes(self.le()?);
                    let n = self.len(n)?;
                    let v = self.bytes_value(n)?;
                    self.stack.push(v);
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.le()?) as u64;
                    let n = self.len(n)?;
                    let v = self.bytes_value(n)?;
                    self.stack.push(v);
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let v = self.bytes_value(n)?;
                    self.stack.push(v);
                }
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.bad("TUPLEn with too few values"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(Vec::new()));
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => return Err(self.bad("APPEND to something that is not a list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err(self.bad("APPENDS to something that is not a list")),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                // GLOBAL "module\nname\n"; STACK_GLOBAL
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global { module, name });
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => {
                            self.stack.push(Value::Global { module, name })
                        }
                        _ => return Err(self.bad("STACK_GLOBAL without two strings")),
                    }
                }
                // REDUCE, NEWOBJ
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.stack.push(Value::Object {
                        callable: Box::new(callable),
                        args: Box::new(args),
                        state: None,
                    });
                }
                b'b' => {
                    let state = self.pop()?;
                    match self.top()? {
                        Value::Object { state: s, .. } => *s = Some(Box::new(state)),
                        _ => return Err(self.bad("BUILD on something that is not an object")),
                    }
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.stack.push(Value::Persistent(Box::new(id)));
                }
                // BINGET, LONG_BINGET, BINPUT, LONG_BINPUT, MEMOIZE
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_get(k)?;
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?;
                }
                b'0' => {
                    self.pop()?;
                }
                other => {
                    return Err(self.bad(format!("unsupported opcode 0x{other:02x}")));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_containers_objects_and_memo() {
        // pickle.dumps({'fid': {'mu': 1.5, 'n': [1, 300, -2]}, 't': (True, None)}, protocol=2)
        let bytes: &[u8] = b"\x80\x02}q\x00(X\x03\x00\x00\x00fidq\x01}q\x02(X\x02\x00\x00\x00muq\x03G?\xf8\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00nq\x04]q\x05(K\x01M,\x01J\xfe\xff\xff\xffeuX\x01\x00\x00\x00tq\x06\x88N\x86q\x07u.";
        let v = parse(bytes, "t").unwrap();
        assert_eq!(v.get("fid").unwrap().get("mu"), Some(&Value::Float(1.5)));
        assert_eq!(
            v.get("fid").unwrap().get("n").unwrap().items().unwrap(),
            [Value::Int(1), Value::Int(300), Value::Int(-2)]
        );
        assert_eq!(
            v.get("t"),
            Some(&Value::Tuple(vec![Value::Bool(true), Value::None]))
        );
    }

    #[test]
    fn truncated_and_hostile_pickles_are_errors_not_panics() {
        for bad in [
            &b"\x80\x02}q\x00(X\x03\x00"[..],
            b"\x80\x02X\xff\xff\xff\x7f",
            b"\x80\x02h\x05.",
            b"\x80\x02u.",
            b"\x80\x09.",
            b"",
        ] {
            assert!(parse(bad, "x").is_err(), "{bad:?}");
        }
    }
}
