//! A small, bounded reader of Python pickles (protocols 2–5): enough to walk the object graphs
//! that hold FID weights and statistics — TorchScript archives' `data.pkl`, `torch.save`
//! state dicts, and EDM2's reference statistics (NumPy arrays in nested dicts) — without
//! executing anything. Classes are recorded by name, never resolved.
//!
//! The format is a stack machine of one-byte opcodes (CPython `Lib/pickletools.py` documents
//! each; `Lib/pickle.py`'s `_Unpickler` is the reference behaviour). Objects built by
//! `REDUCE`/`NEWOBJ`/`BUILD` stay symbolic ([`Kind::Object`]) and the caller interprets the
//! few classes it knows — with one exception: `_codecs.encode(text, 'latin1')`, which is how
//! protocol 2 writes Python 3 `bytes`, is decoded back to bytes here, as Python would.
//!
//! # Representation
//!
//! Every value lives in one arena ([`Pickle`]) and refers to others by index. The memo
//! stores indices, so `BINGET` shares the object exactly as Python does (a later `APPEND` to
//! a memoised list is seen through every reference to it) and costs nothing; dropping the
//! arena is flat, whatever the depth. Shared references make the graph a DAG, and mutation
//! through the memo can close cycles (a list appended to itself): callers that walk it must
//! bound their walk (depth and visits), never recurse on what the file chose.
//!
//! # Budgets
//!
//! Each is checked before the memory it guards is taken, and refusing names the limit:
//! [`MAX_PICKLE_BYTES`] (input), [`MAX_DEPTH`] (nesting of containers and objects as they are
//! built, and of open `MARK`s), [`MAX_VALUES`] (objects made plus references pushed, which
//! bounds every container slot), [`MAX_STACK`], [`MAX_MEMO_ENTRIES`] and
//! [`MAX_DECODED_BYTES`] (strings and bytes held). [`Limits`] gathers them; [`parse_with`]
//! takes others (tighter ones for a caller that knows its files are small).

use std::collections::HashMap;

use crate::error::{Error, Result};

/// Largest pickle accepted (the metadata of a checkpoint; tensor data lives elsewhere, except
/// in NumPy pickles of statistics: 2048² f64 is 32 MiB).
pub const MAX_PICKLE_BYTES: usize = 256 << 20;

/// Deepest nesting of containers and objects (and of open `MARK`s): the pickle depth limit.
/// A `torch.save` state dict nests about 5 levels, a TorchScript module tree about 20.
///
/// Depth is tracked as the graph is built: a container's rises when a part is added to it,
/// but containers that already hold it (through memo references) are not revisited, and
/// cycles have no depth. The limit stops deep construction; walks still bound themselves.
pub const MAX_DEPTH: usize = 1000;

/// Most values a pickle may make or reference: every object made and every memo reference
/// or `DUP` pushed counts one. Every container slot is filled from one, so this bounds the
/// arena in full (about 48 bytes a value at most).
pub const MAX_VALUES: usize = 1 << 21;

/// Most entries on the unpickler's stack at once.
pub const MAX_STACK: usize = 1 << 20;

/// Most distinct memo keys.
pub const MAX_MEMO_ENTRIES: usize = 1 << 20;

/// Most bytes of strings and bytes held in total (each payload counts once, however often it
/// is referenced).
pub const MAX_DECODED_BYTES: usize = 256 << 20;

/// The budgets of one parse (see the module docs); [`Limits::DEFAULT`] holds the constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest input, in bytes.
    pub max_bytes: usize,
    /// Deepest nesting of containers, objects and open `MARK`s.
    pub max_depth: usize,
    /// Most values made or referenced.
    pub max_values: usize,
    /// Most stack entries at once.
    pub max_stack: usize,
    /// Most distinct memo keys.
    pub max_memo_entries: usize,
    /// Most bytes of strings and bytes held in total.
    pub max_decoded_bytes: usize,
}

impl Limits {
    /// The crate's budgets: [`MAX_PICKLE_BYTES`], [`MAX_DEPTH`], [`MAX_VALUES`],
    /// [`MAX_STACK`], [`MAX_MEMO_ENTRIES`], [`MAX_DECODED_BYTES`].
    pub const DEFAULT: Limits = Limits {
        max_bytes: MAX_PICKLE_BYTES,
        max_depth: MAX_DEPTH,
        max_values: MAX_VALUES,
        max_stack: MAX_STACK,
        max_memo_entries: MAX_MEMO_ENTRIES,
        max_decoded_bytes: MAX_DECODED_BYTES,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// Index of a value in its [`Pickle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(u32);

/// A value as stored in the arena.
#[derive(Debug)]
enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Box<str>),
    /// `bytes`, `bytearray`, or a protocol-2 byte string (`BINSTRING`).
    Bytes(Box<[u8]>),
    Tuple(Box<[NodeId]>),
    List(Vec<NodeId>),
    Dict(Vec<(NodeId, NodeId)>),
    /// A `set` or `frozenset`, in the order written.
    Set(Vec<NodeId>),
    /// `module.name`: two `Str` nodes.
    Global(NodeId, NodeId),
    Object(Object),
    Persistent(NodeId),
}

/// `callable(*args)`, then `BUILD`'s state; items that `SETITEMS` / `APPENDS` gave it (as
/// `collections.OrderedDict` is filled) live in a dict / list node of their own.
#[derive(Debug)]
struct Object {
    callable: NodeId,
    args: NodeId,
    state: Option<NodeId>,
    dict: Option<NodeId>,
    list: Option<NodeId>,
}

/// A parsed pickle: its values in an arena, and the one `STOP` returned.
#[derive(Debug)]
pub struct Pickle {
    nodes: Vec<Node>,
    root: NodeId,
}

impl Pickle {
    /// The value the pickle returns.
    pub fn root(&self) -> Ref<'_> {
        self.at(self.root)
    }

    /// The value at `id`.
    ///
    /// # Panics
    /// If `id` comes from another pickle and is out of range.
    pub fn at(&self, id: NodeId) -> Ref<'_> {
        assert!((id.0 as usize) < self.nodes.len(), "NodeId out of range");
        Ref { pickle: self, id }
    }

    /// How many values the arena holds.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the arena is empty (never, for a parsed pickle).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every global the pickle names (`GLOBAL` / `STACK_GLOBAL`), as `(module, name)`, in the
    /// order made, repeats included; a flat pass over the arena, never a walk. A global that
    /// was only named (pushed, never called) is listed too: callers that allow a fixed set of
    /// names check this list before looking at anything else.
    pub fn globals(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.nodes.iter().filter_map(|node| match node {
            Node::Global(m, n) => match (&self.nodes[m.0 as usize], &self.nodes[n.0 as usize]) {
                (Node::Str(m), Node::Str(n)) => Some((&**m, &**n)),
                _ => None,
            },
            _ => None,
        })
    }
}

/// A value of a [`Pickle`], to read: a copyable handle.
#[derive(Clone, Copy)]
pub struct Ref<'a> {
    pickle: &'a Pickle,
    id: NodeId,
}

impl std::fmt::Debug for Ref<'_> {
    /// One level only: the graph may be deep, shared or cyclic.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ref({}: {})", self.id.0, self.describe())
    }
}

/// What a value is, one level deep (the parts are further [`Ref`]s).
#[derive(Clone, Copy, Debug)]
pub enum Kind<'a> {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer (pickled ints beyond 64 bits are refused).
    Int(i64),
    /// A float.
    Float(f64),
    /// A `str`.
    Str(&'a str),
    /// `bytes` or `bytearray`.
    Bytes(&'a [u8]),
    /// A tuple.
    Tuple(Seq<'a>),
    /// A list.
    List(Seq<'a>),
    /// A dict, in insertion order.
    Dict(Entries<'a>),
    /// A set or frozenset.
    Set(Seq<'a>),
    /// A global reference `module.name` (a class or function), unresolved.
    Global {
        /// The module.
        module: &'a str,
        /// The name inside it.
        name: &'a str,
    },
    /// An object: `callable(*args)` (`REDUCE` or `NEWOBJ`), then `__setstate__(state)` when
    /// `BUILD` gave one.
    Object {
        /// The class or function.
        callable: Ref<'a>,
        /// Its arguments (normally a tuple).
        args: Ref<'a>,
        /// The `BUILD` state, if any.
        state: Option<Ref<'a>>,
    },
    /// A persistent id (`BINPERSID`): how pickles refer to data kept elsewhere, such as a
    /// torch archive's storages.
    Persistent(Ref<'a>),
}

/// The items of a tuple, list or set.
#[derive(Clone, Copy)]
pub struct Seq<'a> {
    pickle: &'a Pickle,
    ids: &'a [NodeId],
}

impl<'a> Seq<'a> {
    /// Number of items.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Item `i`.
    pub fn get(&self, i: usize) -> Option<Ref<'a>> {
        let pickle = self.pickle;
        self.ids.get(i).map(|&id| Ref { pickle, id })
    }

    /// The items in order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Ref<'a>> + ExactSizeIterator + 'a {
        let pickle = self.pickle;
        self.ids.iter().map(move |&id| Ref { pickle, id })
    }
}

impl std::fmt::Debug for Seq<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Seq(len {})", self.len())
    }
}

/// The entries of a dict (or of a dict-like object).
#[derive(Clone, Copy)]
pub struct Entries<'a> {
    pickle: &'a Pickle,
    pairs: &'a [(NodeId, NodeId)],
}

impl<'a> Entries<'a> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The entries in insertion order, as `(key, value)`.
    pub fn iter(
        &self,
    ) -> impl DoubleEndedIterator<Item = (Ref<'a>, Ref<'a>)> + ExactSizeIterator + 'a {
        let pickle = self.pickle;
        self.pairs
            .iter()
            .map(move |&(k, v)| (Ref { pickle, id: k }, Ref { pickle, id: v }))
    }

    /// The value under the string key `key`; the last one, as a Python dict keeps it, when a
    /// pickle sets it more than once.
    pub fn get(&self, key: &str) -> Option<Ref<'a>> {
        self.iter()
            .rev()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// The string keys, in order (for messages that list what a dict holds).
    pub fn str_keys(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.iter().filter_map(|(k, _)| k.as_str())
    }
}

impl std::fmt::Debug for Entries<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Entries(len {})", self.len())
    }
}

impl<'a> Ref<'a> {
    fn node(&self) -> &'a Node {
        &self.pickle.nodes[self.id.0 as usize]
    }

    fn to(&self, id: NodeId) -> Ref<'a> {
        Ref {
            pickle: self.pickle,
            id,
        }
    }

    /// Its index in the pickle (equal ids are the same Python object).
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// What it is, one level deep.
    pub fn kind(&self) -> Kind<'a> {
        let pickle = self.pickle;
        match self.node() {
            Node::None => Kind::None,
            Node::Bool(b) => Kind::Bool(*b),
            Node::Int(i) => Kind::Int(*i),
            Node::Float(x) => Kind::Float(*x),
            Node::Str(s) => Kind::Str(s),
            Node::Bytes(b) => Kind::Bytes(b),
            Node::Tuple(ids) => Kind::Tuple(Seq { pickle, ids }),
            Node::List(ids) => Kind::List(Seq { pickle, ids }),
            Node::Set(ids) => Kind::Set(Seq { pickle, ids }),
            Node::Dict(pairs) => Kind::Dict(Entries { pickle, pairs }),
            Node::Global(m, n) => Kind::Global {
                module: self.to(*m).as_str().unwrap_or_default(),
                name: self.to(*n).as_str().unwrap_or_default(),
            },
            Node::Object(o) => Kind::Object {
                callable: self.to(o.callable),
                args: self.to(o.args),
                state: o.state.map(|s| self.to(s)),
            },
            Node::Persistent(id) => Kind::Persistent(self.to(*id)),
        }
    }

    /// The entries of a dict, or of an object that is one: an object filled by `SETITEMS`
    /// (`collections.OrderedDict`), else one whose `BUILD` state is a dict (or such an
    /// object). One hop at most: never a walk.
    pub fn entries(&self) -> Option<Entries<'a>> {
        let pickle = self.pickle;
        let dict_of = |node: &'a Node| match node {
            Node::Dict(pairs) => Some(Entries { pickle, pairs }),
            _ => None,
        };
        match self.node() {
            Node::Dict(pairs) => Some(Entries { pickle, pairs }),
            Node::Object(o) => {
                if let Some(d) = o.dict {
                    return dict_of(self.to(d).node());
                }
                match self.to(o.state?).node() {
                    Node::Dict(pairs) => Some(Entries { pickle, pairs }),
                    Node::Object(Object { dict: Some(d), .. }) => dict_of(self.to(*d).node()),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// The value under string key `key` of a dict-like value (see [`Ref::entries`]).
    pub fn get(&self, key: &str) -> Option<Ref<'a>> {
        self.entries()?.get(key)
    }

    /// The items of a tuple, list or set, or of an object filled by `APPENDS`.
    pub fn items(&self) -> Option<Seq<'a>> {
        let pickle = self.pickle;
        match self.node() {
            Node::Tuple(ids) => Some(Seq { pickle, ids }),
            Node::List(ids) | Node::Set(ids) => Some(Seq { pickle, ids }),
            Node::Object(Object { list: Some(l), .. }) => match self.to(*l).node() {
                Node::List(ids) => Some(Seq { pickle, ids }),
                _ => None,
            },
            _ => None,
        }
    }

    /// Item `i` of a tuple, list or set.
    pub fn item(&self, i: usize) -> Option<Ref<'a>> {
        self.items()?.get(i)
    }

    /// `(module, name)` of a global, or of an object whose callable is a global.
    pub fn global(&self) -> Option<(&'a str, &'a str)> {
        let names = |m: NodeId, n: NodeId| Some((self.to(m).as_str()?, self.to(n).as_str()?));
        match self.node() {
            Node::Global(m, n) => names(*m, *n),
            Node::Object(o) => match self.to(o.callable).node() {
                Node::Global(m, n) => names(*m, *n),
                _ => None,
            },
            _ => None,
        }
    }

    /// `module.name` of a global, or of an object's callable (see [`Ref::global`]).
    pub fn class_name(&self) -> Option<String> {
        self.global().map(|(m, n)| format!("{m}.{n}"))
    }

    /// The integer, if this is one (`True`/`False` count as 1/0, as in Python).
    pub fn as_int(&self) -> Option<i64> {
        match self.node() {
            Node::Int(i) => Some(*i),
            Node::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The float (or integer, as a float).
    pub fn as_float(&self) -> Option<f64> {
        match self.node() {
            Node::Float(x) => Some(*x),
            Node::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self.node() {
            Node::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&'a str> {
        match self.node() {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The bytes of a `bytes` or `bytearray`.
    pub fn as_bytes(&self) -> Option<&'a [u8]> {
        match self.node() {
            Node::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The object a persistent id names (`BINPERSID`'s argument), if this is one.
    pub fn as_persistent(&self) -> Option<Ref<'a>> {
        match self.node() {
            Node::Persistent(id) => Some(self.to(*id)),
            _ => None,
        }
    }

    /// Whether this is `None`.
    pub fn is_none(&self) -> bool {
        matches!(self.node(), Node::None)
    }

    /// A short phrase for messages ("a dict", "a numpy.dtype object"); one level, never a walk.
    pub fn describe(&self) -> String {
        match self.node() {
            Node::None => "None".into(),
            Node::Bool(b) => if *b { "True" } else { "False" }.into(),
            Node::Int(i) => format!("the int {i}"),
            Node::Float(x) => format!("the float {x}"),
            Node::Str(s) => format!("a str of {} characters", s.chars().count()),
            Node::Bytes(b) => format!("{} bytes", b.len()),
            Node::Tuple(v) => format!("a tuple of {}", v.len()),
            Node::List(v) => format!("a list of {}", v.len()),
            Node::Set(v) => format!("a set of {}", v.len()),
            Node::Dict(v) => format!("a dict of {} entries", v.len()),
            Node::Global(..) => match self.global() {
                Some((m, n)) => format!("the global {m}.{n}"),
                None => "a global".into(),
            },
            Node::Object(_) => match self.class_name() {
                Some(c) => format!("a {c} object"),
                None => "an object".into(),
            },
            Node::Persistent(_) => "a persistent id".into(),
        }
    }
}

/// Parses a whole pickle. `source` names it in errors.
///
/// Errors ([`Error::InvalidInput`], each naming the byte offset): a truncated or malformed
/// pickle, an unsupported opcode (protocols 0–1's text opcodes, extension codes), an
/// out-of-band buffer (protocol 5 with `buffer_callback`: the data is not in the file), and
/// any budget passed (the message names the limit).
pub fn parse(bytes: &[u8], source: &str) -> Result<Pickle> {
    parse_with(bytes, source, &Limits::DEFAULT)
}

/// [`parse`] under other budgets.
pub fn parse_with(bytes: &[u8], source: &str, limits: &Limits) -> Result<Pickle> {
    parse_prefix(bytes, source, limits).map(|(pickle, _)| pickle)
}

/// The pickle at the start of `bytes` (up to its `STOP`), and how many bytes it took: for
/// formats that write several pickles and raw data one after the other (PyTorch's legacy
/// `torch.save`). Bytes after the `STOP` are not looked at. Errors as [`parse_with`]; the size
/// limit applies to the whole of `bytes`.
pub fn parse_prefix(bytes: &[u8], source: &str, limits: &Limits) -> Result<(Pickle, usize)> {
    if bytes.len() > limits.max_bytes {
        return Err(Error::invalid(
            source,
            format!(
                "a {}-byte pickle is larger than {} bytes (the pickle size limit)",
                bytes.len(),
                limits.max_bytes
            ),
        ));
    }
    Machine {
        bytes,
        pos: 0,
        op_at: 0,
        limits: *limits,
        nodes: Vec::new(),
        depth: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        encoded: HashMap::new(),
        values: 0,
        decoded: 0,
        source,
    }
    .run()
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Where the opcode being run starts, for messages.
    op_at: usize,
    limits: Limits,
    nodes: Vec<Node>,
    /// Nesting of each node as built: 1 for scalars, one more than its deepest part for
    /// containers and objects (raised when a part is added later).
    depth: Vec<u32>,
    stack: Vec<NodeId>,
    marks: Vec<usize>,
    memo: HashMap<u32, NodeId>,
    /// `_codecs.encode` results by their text's node: immutable, so shared, and a text
    /// referenced many times is decoded once.
    encoded: HashMap<NodeId, NodeId>,
    values: usize,
    decoded: usize,
    source: &'a str,
}

impl<'a> Machine<'a> {
    fn bad(&self, reason: impl std::fmt::Display) -> Error {
        Error::invalid(
            self.source,
            format!("not a readable pickle at byte {}: {reason}", self.op_at),
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
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

    /// A payload length, checked against what is left and against the decoded-bytes budget
    /// (before anything is copied).
    fn payload_len(&mut self, n: u64) -> Result<usize> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(self.bad(format!("a length of {n} bytes runs past the end")));
        }
        self.charge_bytes(n as usize)?;
        Ok(n as usize)
    }

    fn charge_bytes(&mut self, n: usize) -> Result<()> {
        self.decoded = self.decoded.saturating_add(n);
        if self.decoded > self.limits.max_decoded_bytes {
            return Err(self.bad(format!(
                "more than {} bytes of strings and bytes (the pickle decoded-size limit)",
                self.limits.max_decoded_bytes
            )));
        }
        Ok(())
    }

    /// A `\n`-terminated line of a text opcode (`GLOBAL`), at most 4 KiB.
    fn line(&mut self) -> Result<String> {
        let rest = &self.bytes[self.pos..];
        let end = rest
            .iter()
            .take(4096)
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.bad("an unterminated or over-long GLOBAL line"))?;
        self.charge_bytes(end)?;
        let text = std::str::from_utf8(&rest[..end])
            .map_err(|_| self.bad("a GLOBAL line that is not UTF-8"))?
            .to_owned();
        self.pos += end + 1;
        Ok(text)
    }

    fn count_value(&mut self) -> Result<()> {
        self.values += 1;
        if self.values > self.limits.max_values {
            return Err(self.bad(format!(
                "more than {} values (the pickle value limit)",
                self.limits.max_values
            )));
        }
        Ok(())
    }

    fn push_id(&mut self, id: NodeId) -> Result<()> {
        if self.stack.len() >= self.limits.max_stack {
            return Err(self.bad(format!(
                "a stack of more than {} entries (the pickle stack limit)",
                self.limits.max_stack
            )));
        }
        self.stack.push(id);
        Ok(())
    }

    fn too_deep(&self) -> Error {
        self.bad(format!(
            "nesting deeper than {} levels (the pickle depth limit)",
            self.limits.max_depth
        ))
    }

    /// Makes a node of nesting `depth` (not yet pushed).
    fn make(&mut self, node: Node, depth: usize) -> Result<NodeId> {
        self.count_value()?;
        if depth > self.limits.max_depth {
            return Err(self.too_deep());
        }
        let id = NodeId(
            u32::try_from(self.nodes.len())
                .map_err(|_| self.bad("more values than a u32 counts"))?,
        );
        self.nodes.push(node);
        self.depth.push(depth as u32);
        Ok(id)
    }

    fn push_new(&mut self, node: Node, depth: usize) -> Result<()> {
        let id = self.make(node, depth)?;
        self.push_id(id)
    }

    fn push_scalar(&mut self, node: Node) -> Result<()> {
        self.push_new(node, 1)
    }

    /// A reference to an existing value pushed again (memo, `DUP`).
    fn push_ref(&mut self, id: NodeId) -> Result<()> {
        self.count_value()?;
        self.push_id(id)
    }

    fn depth_of(&self, id: NodeId) -> usize {
        self.depth[id.0 as usize] as usize
    }

    /// One more than the deepest of `parts`.
    fn depth_above(&self, parts: impl IntoIterator<Item = NodeId>) -> usize {
        1 + parts
            .into_iter()
            .map(|p| self.depth_of(p))
            .max()
            .unwrap_or(0)
    }

    /// `parent` now also holds `parts`: its depth rises to cover them.
    fn deepen(&mut self, parent: NodeId, parts: impl IntoIterator<Item = NodeId>) -> Result<()> {
        let need = self.depth_above(parts);
        if need > self.limits.max_depth {
            return Err(self.too_deep());
        }
        let d = &mut self.depth[parent.0 as usize];
        *d = (*d).max(need as u32);
        Ok(())
    }

    fn pop(&mut self) -> Result<NodeId> {
        self.stack
            .pop()
            .ok_or_else(|| self.bad("the stack is empty"))
    }

    fn top(&self) -> Result<NodeId> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.bad("the stack is empty"))
    }

    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0 as usize]
    }

    fn mark(&mut self) -> Result<()> {
        if self.marks.len() >= self.limits.max_depth {
            return Err(self.bad(format!(
                "MARKs nested deeper than {} levels (the pickle depth limit)",
                self.limits.max_depth
            )));
        }
        self.marks.push(self.stack.len());
        Ok(())
    }

    /// The values above the last mark, removing them and the mark.
    fn pop_mark(&mut self) -> Result<Vec<NodeId>> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.bad("no MARK to pop to"))?;
        if mark > self.stack.len() {
            return Err(self.bad("a MARK above the top of the stack"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn str_node(&mut self, n: usize) -> Result<()> {
        let bytes = self.take(n)?;
        let text = std::str::from_utf8(bytes)
            .map_err(|_| self.bad("a str that is not UTF-8"))?
            .into();
        self.push_scalar(Node::Str(text))
    }

    fn bytes_node(&mut self, n: usize) -> Result<()> {
        let bytes = self.take(n)?.into();
        self.push_scalar(Node::Bytes(bytes))
    }

    fn memo_get(&mut self, key: u32) -> Result<()> {
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| self.bad(format!("memo entry {key} was never stored")))?;
        self.push_ref(id)
    }

    fn memo_put(&mut self, key: u32) -> Result<()> {
        let id = self.top()?;
        if self.memo.len() >= self.limits.max_memo_entries && !self.memo.contains_key(&key) {
            return Err(self.bad(format!(
                "more than {} memo entries (the pickle memo limit)",
                self.limits.max_memo_entries
            )));
        }
        self.memo.insert(key, id);
        Ok(())
    }

    /// The dict node `SETITEMS` fills for the value on top: a dict, or an object's own dict
    /// (made on first use, as `collections.OrderedDict` is filled after `REDUCE`).
    fn dict_target(&mut self) -> Result<NodeId> {
        let top = self.top()?;
        match self.node(top) {
            Node::Dict(_) => Ok(top),
            Node::Object(o) => match o.dict {
                Some(d) => Ok(d),
                None => {
                    let d = self.make(Node::Dict(Vec::new()), 1)?;
                    if let Node::Object(o) = &mut self.nodes[top.0 as usize] {
                        o.dict = Some(d);
                    }
                    self.deepen(top, [d])?;
                    Ok(d)
                }
            },
            _ => Err(self.bad("SETITEM(S) on something that is neither a dict nor an object")),
        }
    }

    /// The list node `APPEND(S)` fills for the value on top (see [`Machine::dict_target`]).
    fn list_target(&mut self) -> Result<NodeId> {
        let top = self.top()?;
        match self.node(top) {
            Node::List(_) => Ok(top),
            Node::Object(o) => match o.list {
                Some(l) => Ok(l),
                None => {
                    let l = self.make(Node::List(Vec::new()), 1)?;
                    if let Node::Object(o) = &mut self.nodes[top.0 as usize] {
                        o.list = Some(l);
                    }
                    self.deepen(top, [l])?;
                    Ok(l)
                }
            },
            _ => Err(self.bad("APPEND(S) on something that is neither a list nor an object")),
        }
    }

    fn set_items(&mut self, items: Vec<NodeId>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(self.bad("SETITEMS with an odd number of values"));
        }
        let target = self.dict_target()?;
        let top = self.top()?;
        self.deepen(target, items.iter().copied())?;
        if top != target {
            self.deepen(top, [target])?;
        }
        if let Node::Dict(d) = &mut self.nodes[target.0 as usize] {
            d.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<NodeId>) -> Result<()> {
        let target = self.list_target()?;
        let top = self.top()?;
        self.deepen(target, items.iter().copied())?;
        if top != target {
            self.deepen(top, [target])?;
        }
        if let Node::List(l) = &mut self.nodes[target.0 as usize] {
            l.extend(items);
        }
        Ok(())
    }

    /// `REDUCE` / `NEWOBJ`: an object, except `_codecs.encode(text, 'latin1')` (protocol 2's
    /// `bytes`) and `bytes()`, which become the bytes they make.
    fn reduce(&mut self, callable: NodeId, args: NodeId) -> Result<()> {
        if let Some(bytes) = self.known_bytes(callable, args)? {
            return self.push_ref(bytes);
        }
        let depth = self.depth_above([callable, args]);
        self.push_new(
            Node::Object(Object {
                callable,
                args,
                state: None,
                dict: None,
                list: None,
            }),
            depth,
        )
    }

    fn as_str(&self, id: NodeId) -> Option<&str> {
        match self.node(id) {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The bytes node `callable(*args)` makes, when it is one of the calls that make bytes.
    fn known_bytes(&mut self, callable: NodeId, args: NodeId) -> Result<Option<NodeId>> {
        let &Node::Global(m, n) = self.node(callable) else {
            return Ok(None);
        };
        let Node::Tuple(items) = self.node(args) else {
            return Ok(None);
        };
        let (module, name) = (self.as_str(m).unwrap_or(""), self.as_str(n).unwrap_or(""));
        match (module, name, &items[..]) {
            ("_codecs", "encode", &[text, encoding]) => {
                let (Some(s), Some(encoding)) = (self.as_str(text), self.as_str(encoding)) else {
                    return Ok(None);
                };
                let latin1 = match encoding
                    .to_ascii_lowercase()
                    .replace(['-', '_'], "")
                    .as_str()
                {
                    "latin1" | "iso88591" => true,
                    "utf8" => false,
                    _ => return Ok(None),
                };
                if let Some(&done) = self.encoded.get(&text) {
                    return Ok(Some(done));
                }
                let len = if latin1 { s.chars().count() } else { s.len() };
                // Charged before the copy is made.
                self.charge_bytes(len)?;
                let s = self.as_str(text).expect("a str, checked above");
                let mut out = Vec::with_capacity(len);
                if latin1 {
                    if let Some(c) = s.chars().find(|&c| c as u32 > 0xff) {
                        return Err(self.bad(format!(
                            "_codecs.encode(…, 'latin1') of the character {c:?}, which latin-1 \
                             cannot encode"
                        )));
                    }
                    out.extend(s.chars().map(|c| c as u8));
                } else {
                    out.extend_from_slice(s.as_bytes());
                }
                let id = self.make(Node::Bytes(out.into()), 1)?;
                self.encoded.insert(text, id);
                Ok(Some(id))
            }
            ("__builtin__" | "builtins", "bytes", []) => {
                Ok(Some(self.make(Node::Bytes(Box::new([])), 1)?))
            }
            _ => Ok(None),
        }
    }

    fn run(mut self) -> Result<(Pickle, usize)> {
        loop {
            self.op_at = self.pos;
            let op = self.u8()?;
            match op {
                // PROTO
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(self.bad(format!("unsupported protocol {proto}")));
                    }
                }
                // FRAME: a length we do not need (the whole pickle is in memory).
                0x95 => {
                    self.take(8)?;
                }
                // STOP
                b'.' => {
                    let root = self.pop()?;
                    return Ok((
                        Pickle {
                            nodes: self.nodes,
                            root,
                        },
                        self.pos,
                    ));
                }
                b'(' => self.mark()?,
                // POP_MARK
                b'1' => {
                    self.pop_mark()?;
                }
                // POP
                b'0' => {
                    self.pop()?;
                }
                // DUP
                b'2' => {
                    let top = self.top()?;
                    self.push_ref(top)?;
                }
                b'N' => self.push_scalar(Node::None)?,
                0x88 => self.push_scalar(Node::Bool(true))?,
                0x89 => self.push_scalar(Node::Bool(false))?,
                // BININT, BININT1, BININT2
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push_scalar(Node::Int(v as i64))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push_scalar(Node::Int(v as i64))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push_scalar(Node::Int(v as i64))?;
                }
                // LONG1, LONG4: a little-endian two's-complement integer of n bytes.
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as u64
                    } else {
                        u32::from_le_bytes(self.le()?) as u64
                    };
                    if n > 8 {
                        return Err(self.bad("an integer wider than 64 bits"));
                    }
                    let raw = self.take(n as usize)?;
                    let mut buf = if raw.last().is_some_and(|&b| b & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..raw.len()].copy_from_slice(raw);
                    self.push_scalar(Node::Int(i64::from_le_bytes(buf)))?;
                }
                // BINFLOAT (big-endian)
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push_scalar(Node::Float(v))?;
                }
                // BINUNICODE8, BINUNICODE, SHORT_BINUNICODE
                0x8d => {
                    let n = u64::from_le_bytes(self.le()?);
                    let n = self.payload_len(n)?;
                    self.str_node(n)?;
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.le()?) as u64;
                    let n = self.payload_len(n)?;
                    self.str_node(n)?;
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    let n = self.payload_len(n)?;
                    self.str_node(n)?;
                }
                // BINSTRING, SHORT_BINSTRING (Python 2 byte strings)
                b'T' => {
                    let n = u32::from_le_bytes(self.le()?) as u64;
                    let n = self.payload_len(n)?;
                    self.bytes_node(n)?;
                }
                b'U' => {
                    let n = self.u8()? as u64;
                    let n = self.payload_len(n)?;
                    self.bytes_node(n)?;
                }
                // BINBYTES8, BYTEARRAY8, BINBYTES, SHORT_BINBYTES
                0x8e | 0x96 => {
                    let n = u64::from_le_bytes(self.le()?);
                    let n = self.payload_len(n)?;
                    self.bytes_node(n)?;
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.le()?) as u64;
                    let n = self.payload_len(n)?;
                    self.bytes_node(n)?;
                }
                b'C' => {
                    let n = self.u8()? as u64;
                    let n = self.payload_len(n)?;
                    self.bytes_node(n)?;
                }
                // NEXT_BUFFER, READONLY_BUFFER
                0x97 | 0x98 => {
                    return Err(self.bad(
                        "an out-of-band buffer (NEXT_BUFFER/READONLY_BUFFER): the file was \
                         written with pickle protocol 5 and a buffer_callback, so its array \
                         data is not in it; write it again without buffer_callback",
                    ));
                }
                b')' => self.push_new(Node::Tuple(Box::new([])), 1)?,
                b']' => self.push_new(Node::List(Vec::new()), 1)?,
                b'}' => self.push_new(Node::Dict(Vec::new()), 1)?,
                0x8f => self.push_new(Node::Set(Vec::new()), 1)?,
                // TUPLE
                b't' => {
                    let items = self.pop_mark()?;
                    let depth = self.depth_above(items.iter().copied());
                    self.push_new(Node::Tuple(items.into()), depth)?;
                }
                // TUPLE1, TUPLE2, TUPLE3
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.bad("TUPLEn with too few values on the stack"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let depth = self.depth_above(items.iter().copied());
                    self.push_new(Node::Tuple(items.into()), depth)?;
                }
                // LIST, FROZENSET
                b'l' | 0x91 => {
                    let items = self.pop_mark()?;
                    let depth = self.depth_above(items.iter().copied());
                    let node = if op == b'l' {
                        Node::List(items)
                    } else {
                        Node::Set(items)
                    };
                    self.push_new(node, depth)?;
                }
                // DICT
                b'd' => {
                    let items = self.pop_mark()?;
                    self.push_new(Node::Dict(Vec::new()), 1)?;
                    self.set_items(items)?;
                }
                // APPEND, APPENDS
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                // SETITEM, SETITEMS
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                // ADDITEMS
                0x90 => {
                    let items = self.pop_mark()?;
                    let top = self.top()?;
                    if !matches!(self.node(top), Node::Set(_)) {
                        return Err(self.bad("ADDITEMS on something that is not a set"));
                    }
                    self.deepen(top, items.iter().copied())?;
                    if let Node::Set(s) = &mut self.nodes[top.0 as usize] {
                        s.extend(items);
                    }
                }
                // GLOBAL "module\nname\n"; STACK_GLOBAL
                b'c' => {
                    let module = self.line()?;
                    let module = self.make(Node::Str(module.into()), 1)?;
                    let name = self.line()?;
                    let name = self.make(Node::Str(name.into()), 1)?;
                    self.push_new(Node::Global(module, name), 2)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    if self.as_str(module).is_none() || self.as_str(name).is_none() {
                        return Err(self.bad("STACK_GLOBAL without two strings"));
                    }
                    self.push_new(Node::Global(module, name), 2)?;
                }
                // REDUCE, NEWOBJ
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.reduce(callable, args)?;
                }
                // BUILD
                b'b' => {
                    let state = self.pop()?;
                    let top = self.top()?;
                    if !matches!(self.node(top), Node::Object(_)) {
                        return Err(self.bad("BUILD on something that is not an object"));
                    }
                    self.deepen(top, [state])?;
                    if let Node::Object(o) = &mut self.nodes[top.0 as usize] {
                        o.state = Some(state);
                    }
                }
                // BINPERSID
                b'Q' => {
                    let id = self.pop()?;
                    let depth = self.depth_above([id]);
                    self.push_new(Node::Persistent(id), depth)?;
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
                    let k =
                        u32::try_from(self.memo.len()).map_err(|_| self.bad("the memo is full"))?;
                    self.memo_put(k)?;
                }
                other => {
                    return Err(self.bad(format!(
                        "unsupported opcode 0x{other:02x} (protocols 2–5's binary opcodes are \
                         read; text opcodes of protocols 0–1, extension codes and NEWOBJ_EX \
                         are not)"
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn refused(bytes: &[u8], needle: &str) {
        let err = parse(bytes, "t").unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }

    #[test]
    fn nested_containers_objects_and_memo() {
        // pickle.dumps({'fid': {'mu': 1.5, 'n': [1, 300, -2]}, 't': (True, None)}, protocol=2)
        let bytes: &[u8] = b"\x80\x02}q\x00(X\x03\x00\x00\x00fidq\x01}q\x02(X\x02\x00\x00\x00muq\x03G?\xf8\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00nq\x04]q\x05(K\x01M,\x01J\xfe\xff\xff\xffeuX\x01\x00\x00\x00tq\x06\x88N\x86q\x07u.";
        let p = parse(bytes, "t").unwrap();
        let root = p.root();
        let fid = root.get("fid").unwrap();
        assert_eq!(fid.get("mu").unwrap().as_float(), Some(1.5));
        let n: Vec<i64> = fid
            .get("n")
            .unwrap()
            .items()
            .unwrap()
            .iter()
            .map(|v| v.as_int().unwrap())
            .collect();
        assert_eq!(n, [1, 300, -2]);
        let t = root.get("t").unwrap();
        assert!(matches!(t.kind(), Kind::Tuple(s) if s.len() == 2));
        assert_eq!(t.item(0).unwrap().as_bool(), Some(true));
        assert!(t.item(1).unwrap().is_none());
        let keys: Vec<&str> = root.entries().unwrap().str_keys().collect();
        assert_eq!(keys, ["fid", "t"]);
    }

    #[test]
    fn truncated_and_hostile_pickles_are_errors_not_panics() {
        for bad in [
            &b"\x80\x02}q\x00(X\x03\x00"[..],
            b"\x80\x02X\xff\xff\xff\x7f",
            b"\x80\x02h\x05.",
            b"\x80\x02u.",
            b"\x80\x09.",
            b"\x80\x02K\x01b.",
            b"\x80\x02N]a(t.",
            b"",
        ] {
            assert!(parse(bad, "x").is_err(), "{bad:?}");
        }
    }

    /// Memo references share the object, as in Python: appending to a list after it was
    /// memoised is seen through every reference, and a list can hold itself.
    #[test]
    fn memo_references_share_and_may_form_cycles() {
        // l = []; d = {'a': l, 'b': l}; l.append(7), written as pickle would after the fact:
        // EMPTY_LIST BINPUT 0, EMPTY_DICT, 'a' BINGET 0, 'b' BINGET 0 SETITEMS, then
        // BINGET 0 K7 APPEND POP.
        let bytes = b"\x80\x02]q\x00}(X\x01\x00\x00\x00ah\x00X\x01\x00\x00\x00bh\x00uh\x00K\x07a0.";
        let p = parse(bytes, "t").unwrap();
        let (a, b) = (p.root().get("a").unwrap(), p.root().get("b").unwrap());
        assert_eq!(a.id(), b.id());
        assert_eq!(b.item(0).unwrap().as_int(), Some(7));
        // A list appended to itself: l = []; l.append(l).
        let p = parse(b"\x80\x02]q\x00h\x00a.", "t").unwrap();
        let l = p.root();
        assert_eq!(l.item(0).unwrap().id(), l.id());
        assert_eq!(format!("{l:?}"), format!("Ref({}: a list of 1)", l.id().0));
    }

    /// The reproductions of issue "Reliability 2": each was a stack overflow (in `Drop` of
    /// nested boxes) or gigabytes of deep copies; each is now refused early or parsed flat.
    #[test]
    fn depth_bombs_are_refused_by_the_depth_limit() {
        let limit = "(the pickle depth limit)";
        // 50 000 nested 1-tuples.
        let mut b = b"\x80\x02)".to_vec();
        b.extend(std::iter::repeat_n(0x85u8, 50_000));
        b.push(b'.');
        refused(&b, limit);
        // 100 000 MARKs, then 100 000 LISTs.
        let mut b = b"\x80\x02".to_vec();
        b.extend(std::iter::repeat_n(b'(', 100_000));
        b.extend(std::iter::repeat_n(b'l', 100_000));
        b.push(b'.');
        refused(&b, limit);
        // 100 000 EMPTY_LISTs, then 100 000 APPENDs: each list into the one below it.
        let mut b = b"\x80\x02".to_vec();
        b.extend(std::iter::repeat_n(b']', 100_000));
        b.extend(std::iter::repeat_n(b'a', 99_999));
        b.push(b'.');
        refused(&b, limit);
        // A chain of 100 000 REDUCEs, each object the argument of the next: the callable
        // 100 000 times (one GLOBAL, then memo references), (), then (TUPLE1, REDUCE) × 100 000.
        let mut b = b"\x80\x02cbuiltins\nlist\nq\x00".to_vec();
        for _ in 1..100_000 {
            b.extend(b"h\x00");
        }
        b.push(b')');
        for _ in 0..100_000 {
            b.extend(b"\x85R");
        }
        b.push(b'.');
        refused(&b, limit);
        // 1 000 000 BINPERSIDs.
        let mut b = b"\x80\x02N".to_vec();
        b.extend(std::iter::repeat_n(b'Q', 1_000_000));
        b.push(b'.');
        refused(&b, limit);
        // Just under the limit parses, and drops, fine.
        let mut b = b"\x80\x02)".to_vec();
        b.extend(std::iter::repeat_n(0x85u8, MAX_DEPTH - 1));
        b.push(b'.');
        assert!(parse(&b, "t").is_ok());
    }

    #[test]
    fn memo_storms_share_instead_of_copying() {
        // 1 MiB of bytes memoised once, then fetched 2000 times (was 2 GB of copies).
        let mut b = b"\x80\x03B\x00\x00\x10\x00".to_vec();
        b.extend(std::iter::repeat_n(0u8, 1 << 20));
        b.extend(b"q\x00");
        for _ in 0..2000 {
            b.extend(b"h\x00");
        }
        b.extend(b"\x87.");
        let p = parse(&b, "t").unwrap();
        assert_eq!(p.len(), 2); // the bytes and the tuple
        let t = p.root();
        assert!((0..3).all(|i| t.item(i).unwrap().id() == t.item(0).unwrap().id()));
        // A doubling tree of lists from memo references: each level is a list of two
        // references to the previous one; 2^400 paths, 401 lists.
        let mut b = b"\x80\x02]q\x00".to_vec();
        for _ in 0..400 {
            b.extend(b"(h\x00h\x00lq\x00");
        }
        b.push(b'.');
        let p = parse(&b, "t").unwrap();
        assert_eq!(p.len(), 401);
    }

    #[test]
    fn budgets_on_values_stack_memo_and_bytes_name_their_limits() {
        // The stack: more pushes than MAX_STACK without popping.
        let mut b = b"\x80\x02Nq\x00".to_vec();
        for _ in 0..=MAX_STACK {
            b.extend(b"h\x00");
        }
        refused(&b, "(the pickle stack limit)");
        // Values: references to one None appended to one list, each counted.
        let mut b = b"\x80\x02]Nq\x000".to_vec();
        for _ in 0..=MAX_VALUES {
            b.extend(b"h\x00a");
        }
        refused(&b, "(the pickle value limit)");
        // The memo: distinct LONG_BINPUT keys.
        let mut b = b"\x80\x02N".to_vec();
        for k in 0..=MAX_MEMO_ENTRIES as u32 {
            b.push(b'r');
            b.extend(k.to_le_bytes());
        }
        refused(&b, "(the pickle memo limit)");
        // Decoded bytes, under a budget of 1 KiB: 600 bytes of text, and the 600 bytes
        // _codecs.encode makes of it.
        let limits = Limits {
            max_decoded_bytes: 1024,
            ..Limits::DEFAULT
        };
        let mut b = b"\x80\x02c_codecs\nencode\nX\x58\x02\x00\x00".to_vec();
        b.extend([b'a'; 600]);
        b.extend(b"X\x06\x00\x00\x00latin1\x86R.");
        let err = parse_with(&b, "t", &limits).unwrap_err().to_string();
        assert!(err.contains("(the pickle decoded-size limit)"), "{err}");
        assert!(parse(&b, "t").is_ok());
        // The other budgets, tightened, name themselves the same way.
        let tight = |f: fn(&mut Limits)| {
            let mut l = Limits::DEFAULT;
            f(&mut l);
            l
        };
        for (limits, bytes, needle) in [
            (
                tight(|l| l.max_bytes = 3),
                &b"\x80\x02N."[..],
                "(the pickle size limit)",
            ),
            (
                tight(|l| l.max_depth = 2),
                b"\x80\x02)\x85\x85.",
                "(the pickle depth limit)",
            ),
            (
                tight(|l| l.max_depth = 2),
                b"\x80\x02(((t.",
                "(the pickle depth limit)",
            ),
            (
                tight(|l| l.max_values = 3),
                b"\x80\x02NNNN.",
                "(the pickle value limit)",
            ),
            (
                tight(|l| l.max_stack = 2),
                b"\x80\x02NNN.",
                "(the pickle stack limit)",
            ),
            (
                tight(|l| l.max_memo_entries = 1),
                b"\x80\x02Nq\x00q\x01.",
                "(the pickle memo limit)",
            ),
        ] {
            let err = parse_with(bytes, "t", &limits).unwrap_err().to_string();
            assert!(err.contains(needle), "{bytes:?}: {err}");
        }
    }

    #[test]
    fn globals_are_listed_and_pickles_read_one_after_another() {
        // GLOBAL os.system (named, never called), then STACK_GLOBAL posix.system called.
        let bytes = b"\x80\x04cos\nsystem\n0\x8c\x05posix\x8c\x06system\x93N\x85R.\x80\x02K\x07.";
        let (p, used) = parse_prefix(bytes, "t", &Limits::DEFAULT).unwrap();
        let globals: Vec<(&str, &str)> = p.globals().collect();
        assert_eq!(globals, [("os", "system"), ("posix", "system")]);
        let (second, rest) = parse_prefix(&bytes[used..], "t", &Limits::DEFAULT).unwrap();
        assert_eq!(second.root().as_int(), Some(7));
        assert_eq!(used + rest, bytes.len());
        assert_eq!(second.globals().count(), 0);
    }

    #[test]
    fn protocol_2_bytes_and_out_of_band_buffers() {
        // _codecs.encode('\x00é\xff', 'latin1') -> b'\x00\xe9\xff'
        let mut bytes = b"\x80\x02c_codecs\nencode\nX\x05\x00\x00\x00\x00".to_vec();
        bytes.extend("é\u{ff}".as_bytes());
        bytes.extend(b"X\x06\x00\x00\x00latin1\x86R.");
        let p = parse(&bytes, "t").unwrap();
        assert_eq!(p.root().as_bytes(), Some(&b"\x00\xe9\xff"[..]));
        // A character beyond latin-1 is refused, not mangled.
        let mut bytes = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00".to_vec();
        bytes.extend("€".as_bytes());
        bytes.extend(b"X\x06\x00\x00\x00latin1\x86R.");
        refused(&bytes, "latin-1 cannot encode");
        // builtins.bytes() is b''.
        let p = parse(b"\x80\x02c__builtin__\nbytes\n)R.", "t").unwrap();
        assert_eq!(p.root().as_bytes(), Some(&b""[..]));
        // NEXT_BUFFER names buffer_callback.
        refused(b"\x80\x05\x97.", "buffer_callback");
        refused(b"\x80\x05\x97\x98.", "out-of-band");
    }
}
