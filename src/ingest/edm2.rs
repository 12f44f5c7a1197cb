//! The EDM2 door: the files NVlabs/edm2 writes, read without executing anything and converted
//! to safetensors before the usual ingest.
//!
//! - `network-snapshot-<kimg:07d>-<std:.3f>.pkl` (`training/training_loop.py`) and
//!   `phema-<kimg:07d>-<std:.3f>.pkl` (`reconstruct_phema.py`): `pickle.dump` of an `EasyDict`
//!   whose `ema` is the network (`training/networks_edm2.py`'s `Precond`) in fp16. Its modules
//!   are persistent classes (`torch_utils/persistence.py`): each pickles as
//!   `torch_utils.persistence._reconstruct_persistent_obj(meta)`, `meta` a dict holding the
//!   module's Python source (a string, never looked into) and its `state`, the module's
//!   `__dict__` (`_parameters`, `_buffers`, `_modules`, …). Tensors are
//!   `torch._utils._rebuild_parameter(tensor, …)` / `torch._utils._rebuild_tensor_v2(storage,
//!   offset, size, stride, …)`, each storage `torch.storage._load_from_bytes(bytes)` of a legacy
//!   (non-zip) `torch.save` of the storage ([`read_legacy_storage`]).
//! - `training-state-<kimg:07d>.pt` (`torch_utils/distributed.py`'s `CheckpointIO.save`): a zip
//!   `torch.save` of a dict of state dicts; only its `ema` entry is read, `{stds: [...], emas:
//!   [state_dict, ...]}` from `training/phema.py`'s `PowerFunctionEMA`: one fp32 snapshot per std.
//!
//! # Safety
//!
//! The pickles are parsed by [`crate::metrics::pickle`], which builds symbolic values and calls
//! nothing. On top of that every global a file names is checked against an allow-list of
//! exactly the names these files need ([`SNAPSHOT_GLOBALS`], [`TRAINING_STATE_GLOBALS`], and
//! the `torch.<T>Storage` types, which alone a legacy storage file may name) before anything
//! else is looked at: any other (`os.system`, `builtins.eval`, an unknown class rebuilt by its
//! `__reduce__`) refuses the whole file, naming the global and the file, and nothing is stored. Walks over the module tree are iterative and
//! bounded ([`MAX_MODULE_DEPTH`], [`MAX_MODULES`]).
//!
//! # Conversion
//!
//! Tensor names are what `net.state_dict()` gives (`unet.enc.8x8_conv.weight`, …): parameters
//! and persistent buffers of every module, prefixed by the module path; `None` entries and
//! buffers listed in `_non_persistent_buffers_set` are left out. Element types stay as stored
//! (fp16 snapshots stay fp16). The safetensors file is deterministic (sorted names, sorted
//! `__metadata__`: `nimg`, `sigma_rel`, `source`, and for pickles `hindsight.buffers`, the
//! sorted JSON array of the buffer names), so re-importing is a no-op. Times follow EDM2's
//! `kimg_to_nimg` ([`super::kimg_to_nimg`]): `nimg = (kimg·1000 + 999) // 1024 · 1024`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::Path;

use super::file::{ingest_converted, IngestOptions, Ingested};
use super::resolve::{kimg_to_nimg, parse_edm2_name, Hints};
use crate::db::{Db, Run};
use crate::error::{blocking, Error, Result};
use crate::format::{write_safetensors, OutTensor};
use crate::metrics::pickle::{self, Kind, Limits, NodeId, Pickle, Ref};
use crate::phema::Width;
use crate::store::BlobStore;

/// The globals an EDM2 snapshot pickle may name: its containers (`EasyDict`, `OrderedDict`),
/// persistent classes, `torch.nn.ModuleDict` (the U-Net's `enc`/`dec`), tensors and
/// parameters, storages as legacy `torch.save` bytes, protocol 2's bytes trick, and NumPy
/// arrays and scalars (`StabilityVAEEncoder` keeps its scale and bias as NumPy arrays).
pub const SNAPSHOT_GLOBALS: &[(&str, &str)] = &[
    ("dnnlib.util", "EasyDict"),
    ("collections", "OrderedDict"),
    ("torch_utils.persistence", "_reconstruct_persistent_obj"),
    ("torch.nn.modules.container", "ModuleDict"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.storage", "_load_from_bytes"),
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
];

/// Storage types (`torch.<T>Storage`, the only globals a legacy storage file may name) and
/// their safetensors element type and size in bytes.
const STORAGE_TYPES: &[(&str, &str, usize)] = &[
    ("HalfStorage", "F16", 2),
    ("BFloat16Storage", "BF16", 2),
    ("FloatStorage", "F32", 4),
    ("DoubleStorage", "F64", 8),
    ("LongStorage", "I64", 8),
    ("IntStorage", "I32", 4),
    ("ShortStorage", "I16", 2),
    ("CharStorage", "I8", 1),
    ("ByteStorage", "U8", 1),
    ("BoolStorage", "BOOL", 1),
];

/// The globals a `training-state-*.pt` may name besides `torch.<T>Storage`: EDM2's
/// `EasyDict` (its `state`), `OrderedDict` (state dicts), tensors, and protocol 2's bytes.
pub const TRAINING_STATE_GLOBALS: &[(&str, &str)] = &[
    ("dnnlib.util", "EasyDict"),
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("_codecs", "encode"),
];

/// Deepest module nesting walked (EDM2's networks nest 4 levels).
pub const MAX_MODULE_DEPTH: usize = 64;

/// Most modules visited in one network (a shared module counts once per path, as in
/// `state_dict()`).
pub const MAX_MODULES: usize = 1 << 16;

/// Largest EDM2 pickle read (the whole file is held in memory; EDM2-XXL's fp16 snapshot is
/// about 3 GB).
pub const MAX_EDM2_PICKLE_BYTES: usize = 16 << 30;

/// A tensor read from an EDM2 file: its `state_dict()` name, safetensors dtype, shape,
/// little-endian contiguous bytes, and whether the module holds it as a buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Edm2Tensor<'a> {
    /// `state_dict()` name.
    pub name: String,
    /// safetensors dtype (`F16`, `F32`, …).
    pub dtype: &'static str,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major little-endian data.
    pub data: Cow<'a, [u8]>,
    /// Registered with `register_buffer` (not a parameter).
    pub buffer: bool,
}

/// One storage: element type, element size, and its bytes (little-endian).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Storage<'a> {
    /// safetensors dtype.
    pub dtype: &'static str,
    /// Bytes per element.
    pub elem: usize,
    /// The storage's bytes (`numel × elem`).
    pub data: &'a [u8],
}

fn refuse(source: &str, reason: impl std::fmt::Display) -> Error {
    Error::invalid(source, reason.to_string())
}

fn storage_type(module: &str, name: &str) -> Option<(&'static str, usize)> {
    if module != "torch" {
        return None;
    }
    STORAGE_TYPES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|&(_, d, e)| (d, e))
}

/// Refuses `p` when it names a global outside `allowed` (and, with `storages`, outside the
/// `torch.<T>Storage` types). The error names the global and the file; nothing was run.
fn check_globals(
    p: &Pickle,
    allowed: &[(&str, &str)],
    storages: bool,
    source: &str,
    what: &str,
) -> Result<()> {
    for (module, name) in p.globals() {
        let known =
            allowed.contains(&(module, name)) || (storages && storage_type(module, name).is_some());
        if !known {
            return Err(refuse(
                source,
                format!(
                    "refused: the pickle names the global `{module}.{name}`, which {what} never \
                     needs; hindsight reads pickles without running them and accepts only the \
                     names those files use (nothing was run or stored)"
                ),
            ));
        }
    }
    Ok(())
}

/// The legacy magic number (`torch/serialization.py`'s `MAGIC_NUMBER`,
/// 0x1950a86a20f9469cfc6c) as its first pickle writes it: `LONG1` of 10 little-endian bytes.
const LEGACY_MAGIC: &[u8] = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";

/// Budgets of the small pickles inside a legacy storage file.
const STORAGE_PICKLE_LIMITS: Limits = Limits {
    max_bytes: usize::MAX,
    max_depth: 16,
    max_values: 4096,
    max_stack: 1024,
    max_memo_entries: 1024,
    max_decoded_bytes: 1 << 20,
};

/// Reads a legacy (non-zip) `torch.save` of one storage, as `torch.storage._load_from_bytes`
/// receives it: five pickles (the magic number, the protocol version 1001, `sys_info`, the
/// object — a persistent id `('storage', torch.<T>Storage, key, location, numel, None)` — and
/// the list of storage keys), then per key an int64 element count and the raw little-endian
/// data (`torch/serialization.py`'s `_legacy_save`).
///
/// Errors (naming `source`): another layout, a big-endian file, a storage view, a global other
/// than a known storage type, a count that disagrees with the id, or data that is short or
/// followed by more bytes.
pub fn read_legacy_storage<'a>(bytes: &'a [u8], source: &str) -> Result<Storage<'a>> {
    let bad = |why: String| {
        refuse(
            source,
            format!("not a legacy torch.save of a storage: {why}"),
        )
    };
    // 1. The magic number: an integer wider than the pickle reader's 64 bits, so compared
    // byte for byte after the PROTO opcode.
    let proto_len = if bytes.first() == Some(&0x80) { 2 } else { 0 };
    if bytes.len() < proto_len + LEGACY_MAGIC.len()
        || &bytes[proto_len..proto_len + LEGACY_MAGIC.len()] != LEGACY_MAGIC
    {
        return Err(bad("no magic number at the start".into()));
    }
    let mut pos = proto_len + LEGACY_MAGIC.len();
    let mut next = |what: &str| -> Result<Pickle> {
        let (p, used) = pickle::parse_prefix(&bytes[pos..], source, &STORAGE_PICKLE_LIMITS)
            .map_err(|e| bad(format!("{what}: {}", e.chain_text())))?;
        check_globals(&p, &[], true, source, "a storage")?;
        pos += used;
        Ok(p)
    };
    let version = next("the protocol version")?;
    if version.root().as_int() != Some(1001) {
        return Err(bad(format!(
            "protocol version {:?}, 1001 expected",
            version.root()
        )));
    }
    let info = next("sys_info")?;
    if info.root().get("little_endian").and_then(|v| v.as_bool()) != Some(true) {
        return Err(bad("written on a big-endian machine".into()));
    }
    let object = next("the storage")?;
    let id = object
        .root()
        .as_persistent()
        .ok_or_else(|| bad(format!("the object is {}", object.root().describe())))?;
    let part = |i: usize| id.item(i);
    if part(0).and_then(|v| v.as_str()) != Some("storage") {
        return Err(bad(format!("the persistent id is {}", id.describe())));
    }
    let (dtype, elem) = part(1)
        .and_then(|t| t.global())
        .and_then(|(m, n)| storage_type(m, n))
        .ok_or_else(|| bad("no storage type in the persistent id".into()))?;
    let key = part(2)
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("no storage key".into()))?
        .to_owned();
    let numel = part(4)
        .and_then(|v| v.as_int())
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| bad("no element count".into()))?;
    if part(5).is_some_and(|v| !v.is_none()) {
        return Err(bad(
            "a view of another storage (view_metadata is set)".into()
        ));
    }
    let keys = next("the storage keys")?;
    let listed: Vec<&str> = keys
        .root()
        .items()
        .map(|s| s.iter().filter_map(|k| k.as_str()).collect())
        .unwrap_or_default();
    if listed != [key.as_str()] {
        return Err(bad(format!(
            "storage keys {listed:?}, only the object's {key:?} expected"
        )));
    }
    let rest = &bytes[pos..];
    if rest.len() < 8 {
        return Err(bad("the data ends before the element count".into()));
    }
    let count = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
    if count != numel as u64 {
        return Err(bad(format!(
            "{count} elements written, the id says {numel}"
        )));
    }
    let len = numel
        .checked_mul(elem)
        .ok_or_else(|| bad("the storage size overflows".into()))?;
    let data = &rest[8..];
    if data.len() != len {
        return Err(bad(format!(
            "{} data bytes where {numel} {dtype} elements take {len}",
            data.len()
        )));
    }
    Ok(Storage { dtype, elem, data })
}

/// Where tensors find their storages.
trait Storages<'a> {
    /// The storage a `_rebuild_tensor_v2` argument refers to.
    fn storage(&mut self, v: Ref<'a>) -> Result<Storage<'a>>;
}

/// The storages of a snapshot pickle: `_load_from_bytes(bytes)` objects, each parsed once.
struct PickledStorages<'a> {
    source: &'a str,
    seen: HashMap<NodeId, Storage<'a>>,
}

impl<'a> Storages<'a> for PickledStorages<'a> {
    fn storage(&mut self, v: Ref<'a>) -> Result<Storage<'a>> {
        if let Some(s) = self.seen.get(&v.id()) {
            return Ok(*s);
        }
        if v.global() != Some(("torch.storage", "_load_from_bytes")) {
            return Err(refuse(
                self.source,
                format!(
                    "a tensor's storage is {}, not torch.storage._load_from_bytes(…)",
                    v.describe()
                ),
            ));
        }
        let bytes = match v.kind() {
            Kind::Object { args, .. } => args.item(0).and_then(|b| b.as_bytes()),
            _ => None,
        }
        .ok_or_else(|| refuse(self.source, "_load_from_bytes without its bytes"))?;
        let s = read_legacy_storage(bytes, self.source)?;
        self.seen.insert(v.id(), s);
        Ok(s)
    }
}

/// A tensor's data, contiguous: borrowed when the view already is, gathered otherwise.
///
/// `offset` and `stride` count elements (as `_rebuild_tensor_v2` gives them). Errors: a view
/// that reaches outside its storage, a negative stride or offset.
pub fn tensor_data<'a>(
    storage: Storage<'a>,
    offset: i64,
    shape: &[usize],
    stride: &[i64],
    source: &str,
    name: &str,
) -> Result<Cow<'a, [u8]>> {
    let bad = |why: String| refuse(source, format!("tensor {name}: {why}"));
    if stride.len() != shape.len() {
        return Err(bad(format!(
            "{} strides for {} dimensions",
            stride.len(),
            shape.len()
        )));
    }
    let offset = usize::try_from(offset).map_err(|_| bad(format!("storage offset {offset}")))?;
    let stride: Vec<usize> = stride
        .iter()
        .map(|&s| usize::try_from(s).map_err(|_| bad(format!("negative stride {s}"))))
        .collect::<Result<_>>()?;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("its size overflows".into()))?;
    let elem = storage.elem;
    let storage_numel = storage.data.len() / elem;
    if numel == 0 {
        return Ok(Cow::Borrowed(&[]));
    }
    // The last element the view reaches.
    let last = shape
        .iter()
        .zip(&stride)
        .try_fold(offset, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?))
        .ok_or_else(|| bad("its extent overflows".into()))?;
    if last >= storage_numel {
        return Err(bad(format!(
            "shape {shape:?}, strides {stride:?} and offset {offset} reach element {last} of a \
             storage of {storage_numel}"
        )));
    }
    // Contiguous (row-major; a dimension of size 1 may have any stride, as in torch).
    let mut expect = 1usize;
    let mut contiguous = true;
    for (&d, &s) in shape.iter().zip(&stride).rev() {
        if d != 1 && s != expect {
            contiguous = false;
        }
        expect *= d;
    }
    if contiguous {
        return Ok(Cow::Borrowed(
            &storage.data[offset * elem..(offset + numel) * elem],
        ));
    }
    // A strided view: gather it element by element (bounded by numel ≤ the storage).
    if numel > storage_numel.max(1) * 64 {
        return Err(bad(format!(
            "a strided view of {numel} elements over a storage of {storage_numel}"
        )));
    }
    let mut out = Vec::with_capacity(numel * elem);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..numel {
        let at = offset
            + index
                .iter()
                .zip(&stride)
                .map(|(&i, &s)| i * s)
                .sum::<usize>();
        out.extend_from_slice(&storage.data[at * elem..(at + 1) * elem]);
        for dim in (0..shape.len()).rev() {
            index[dim] += 1;
            if index[dim] < shape[dim] {
                break;
            }
            index[dim] = 0;
        }
    }
    Ok(Cow::Owned(out))
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])` (or a
/// `_rebuild_parameter(_with_state)` around one) as a contiguous tensor.
fn read_tensor<'a>(
    v: Ref<'a>,
    storages: &mut dyn Storages<'a>,
    source: &str,
    name: &str,
    buffer: bool,
) -> Result<Edm2Tensor<'a>> {
    let bad = |why: String| refuse(source, format!("tensor {name}: {why}"));
    let args_of = |v: Ref<'a>| match v.kind() {
        Kind::Object { args, .. } => Some(args),
        _ => None,
    };
    let mut v = v;
    if matches!(
        v.global(),
        Some((
            "torch._utils",
            "_rebuild_parameter" | "_rebuild_parameter_with_state"
        ))
    ) {
        v = args_of(v)
            .and_then(|a| a.item(0))
            .ok_or_else(|| bad("a parameter without its tensor".into()))?;
    }
    if v.global() != Some(("torch._utils", "_rebuild_tensor_v2")) {
        return Err(bad(format!(
            "{} where a tensor (torch._utils._rebuild_tensor_v2) was expected",
            v.describe()
        )));
    }
    let args = args_of(v).ok_or_else(|| bad("no arguments".into()))?;
    let arg = |i: usize| args.item(i);
    let ints = |r: Option<Ref<'a>>, what: &str| -> Result<Vec<i64>> {
        let seq = r
            .and_then(|r| r.items())
            .ok_or_else(|| bad(format!("no {what}")))?;
        seq.iter()
            .map(|x| {
                x.as_int()
                    .ok_or_else(|| bad(format!("a {what} that is not ints")))
            })
            .collect()
    };
    let storage = storages.storage(arg(0).ok_or_else(|| bad("no storage".into()))?)?;
    let offset = arg(1)
        .and_then(|o| o.as_int())
        .ok_or_else(|| bad("no storage offset".into()))?;
    let shape: Vec<usize> = ints(arg(2), "size")?
        .into_iter()
        .map(|d| usize::try_from(d).map_err(|_| bad(format!("a dimension of {d}"))))
        .collect::<Result<_>>()?;
    let stride = ints(arg(3), "stride")?;
    if let Some(meta) = arg(6) {
        if meta.entries().is_some_and(|e| !e.is_empty()) {
            return Err(bad(
                "tensor metadata (conjugate or negative bit) is set; save it resolved".into(),
            ));
        }
    }
    let data = tensor_data(storage, offset, &shape, &stride, source, name)?;
    Ok(Edm2Tensor {
        name: name.to_owned(),
        dtype: storage.dtype,
        shape,
        data,
        buffer,
    })
}

/// The `__dict__` of a module object: a persistent class's `meta['state']`, or the `BUILD`
/// state of a plain `torch.nn` container (`ModuleDict`).
fn module_state<'a>(m: Ref<'a>) -> Option<Ref<'a>> {
    match (m.global()?, m.kind()) {
        (("torch_utils.persistence", "_reconstruct_persistent_obj"), Kind::Object { args, .. }) => {
            args.item(0)?.get("state")
        }
        (("torch.nn.modules.container", "ModuleDict"), Kind::Object { state, .. }) => state,
        _ => None,
    }
}

/// The tensors of the module `root` under their `state_dict()` names (parameters, then
/// persistent buffers, of each module; submodules' names prefixed). Iterative, at most
/// [`MAX_MODULE_DEPTH`] deep and [`MAX_MODULES`] modules.
fn module_tensors<'a>(
    root: Ref<'a>,
    storages: &mut dyn Storages<'a>,
    source: &str,
) -> Result<Vec<Edm2Tensor<'a>>> {
    let mut out = Vec::new();
    let mut stack = vec![(root, String::new(), 0usize)];
    let mut visits = 0usize;
    while let Some((module, prefix, depth)) = stack.pop() {
        visits += 1;
        if visits > MAX_MODULES {
            return Err(refuse(
                source,
                format!("more than {MAX_MODULES} modules in the network"),
            ));
        }
        if depth > MAX_MODULE_DEPTH {
            return Err(refuse(
                source,
                format!("modules nested deeper than {MAX_MODULE_DEPTH} levels at {prefix:?}"),
            ));
        }
        let here = if prefix.is_empty() {
            "the network".to_owned()
        } else {
            format!("module {}", prefix.trim_end_matches('.'))
        };
        let state = module_state(module).ok_or_else(|| {
            refuse(
                source,
                format!(
                    "{here} is {}, not an EDM2 or torch.nn module",
                    module.describe()
                ),
            )
        })?;
        let field = |key: &str| state.get(key).and_then(|d| d.entries());
        let non_persistent: Vec<&str> = state
            .get("_non_persistent_buffers_set")
            .and_then(|s| s.items())
            .map(|s| s.iter().filter_map(|n| n.as_str()).collect())
            .unwrap_or_default();
        for (key, buffer) in [("_parameters", false), ("_buffers", true)] {
            let entries = field(key).ok_or_else(|| {
                refuse(
                    source,
                    format!("{here} has no {key} dict: not a torch module"),
                )
            })?;
            for (k, v) in entries.iter() {
                let k = k
                    .as_str()
                    .ok_or_else(|| refuse(source, format!("{here}: a {key} key is not a str")))?;
                if v.is_none() || (buffer && non_persistent.contains(&k)) {
                    continue;
                }
                let name = format!("{prefix}{k}");
                out.push(read_tensor(v, storages, source, &name, buffer)?);
            }
        }
        let modules =
            field("_modules").ok_or_else(|| refuse(source, format!("{here} has no _modules")))?;
        for (k, v) in modules.iter() {
            let k = k
                .as_str()
                .ok_or_else(|| refuse(source, format!("{here}: a _modules key is not a str")))?;
            if !v.is_none() {
                stack.push((v, format!("{prefix}{k}."), depth + 1));
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = out.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(refuse(
            source,
            format!("tensor {} appears twice", w[0].name),
        ));
    }
    Ok(out)
}

/// Parses an EDM2 snapshot pickle (`network-snapshot-*.pkl`, `phema-*.pkl`): the globals are
/// checked against [`SNAPSHOT_GLOBALS`] before anything else. `source` names the file in
/// errors.
pub fn parse_snapshot_pickle(bytes: &[u8], source: &str) -> Result<Pickle> {
    let limits = Limits {
        max_bytes: MAX_EDM2_PICKLE_BYTES,
        max_decoded_bytes: MAX_EDM2_PICKLE_BYTES,
        ..Limits::DEFAULT
    };
    let p = pickle::parse_with(bytes, source, &limits)?;
    check_globals(&p, SNAPSHOT_GLOBALS, false, source, "an EDM2 snapshot")?;
    Ok(p)
}

/// The tensors of the `ema` network of a parsed EDM2 snapshot pickle, sorted by name, each
/// marked parameter or buffer. Tensor data borrows from `p` when contiguous.
///
/// Errors (naming `source`): no `ema` entry, a module or tensor of another shape than EDM2
/// writes, a storage that is not a legacy `torch.save`, a view outside its storage, no tensors.
pub fn snapshot_tensors<'a>(p: &'a Pickle, source: &'a str) -> Result<Vec<Edm2Tensor<'a>>> {
    let root = p.root();
    let ema = root.get("ema").ok_or_else(|| {
        let keys: Vec<&str> = root
            .entries()
            .map(|e| e.str_keys().collect())
            .unwrap_or_default();
        refuse(
            source,
            format!("no `ema` entry (it holds {keys:?}): not an EDM2 network snapshot pickle"),
        )
    })?;
    let mut storages = PickledStorages {
        source,
        seen: HashMap::new(),
    };
    let tensors = module_tensors(ema, &mut storages, source)?;
    if tensors.is_empty() {
        return Err(refuse(source, "the `ema` network holds no tensors"));
    }
    Ok(tensors)
}

/// The storages of a zip `torch.save`: persistent ids `('storage', torch.<T>Storage, key,
/// location, numel)`, data in the archive's `<prefix>/data/<key>` entries.
struct ZipStorages<'a> {
    source: &'a str,
    entries: &'a HashMap<String, Vec<u8>>,
}

impl<'a> Storages<'a> for ZipStorages<'a> {
    fn storage(&mut self, v: Ref<'a>) -> Result<Storage<'a>> {
        let bad = |why: &str| refuse(self.source, format!("a tensor's storage: {why}"));
        let id = v
            .as_persistent()
            .ok_or_else(|| bad("not a persistent id"))?;
        let part = |i: usize| id.item(i);
        if part(0).and_then(|v| v.as_str()) != Some("storage") {
            return Err(bad("not a ('storage', …) persistent id"));
        }
        let (dtype, elem) = part(1)
            .and_then(|t| t.global())
            .and_then(|(m, n)| storage_type(m, n))
            .ok_or_else(|| bad("an unknown storage type"))?;
        let key = part(2)
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("no key"))?;
        let numel = part(4)
            .and_then(|v| v.as_int())
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| bad("no element count"))?;
        let data = self
            .entries
            .get(key)
            .ok_or_else(|| bad(&format!("data/{key} is missing from the archive")))?;
        let len = numel
            .checked_mul(elem)
            .ok_or_else(|| bad("size overflows"))?;
        if data.len() < len {
            return Err(bad(&format!(
                "data/{key} holds {} bytes, {numel} {dtype} elements take {len}",
                data.len()
            )));
        }
        Ok(Storage {
            dtype,
            elem,
            data: &data[..len],
        })
    }
}

/// A training state read from a `training-state-*.pt`: its archive entries (kept for the
/// tensors to borrow from) and pickle.
pub struct TrainingState {
    source: String,
    pickle: Pickle,
    data: HashMap<String, Vec<u8>>,
}

/// Largest `training-state-*.pt` entry read into memory.
const MAX_ENTRY_BYTES: u64 = 16 << 30;

impl TrainingState {
    /// Reads `path`, a zip `torch.save` (`CheckpointIO.save`): its `data.pkl` (globals checked
    /// against [`TRAINING_STATE_GLOBALS`] and the storage types) and its `data/<key>` entries.
    /// Big-endian archives are refused.
    pub fn read(path: &Path) -> Result<TrainingState> {
        let source = path.display().to_string();
        let bad =
            |why: String| refuse(&source, format!("not a readable torch.save archive: {why}"));
        let file =
            std::fs::File::open(path).map_err(|e| Error::io(format!("reading {source}"), e))?;
        let mut zip =
            zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| bad(e.to_string()))?;
        let names = zip
            .file_names()
            .map(|n| n.map(|n| n.into_owned()))
            .collect::<std::result::Result<Vec<String>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let pkl = names
            .iter()
            .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
            .ok_or_else(|| bad("no data.pkl inside".into()))?
            .clone();
        let prefix = pkl.strip_suffix("data.pkl").unwrap_or("").to_owned();
        let mut read = |name: &str| -> Result<Vec<u8>> {
            let entry = zip.by_name(name).map_err(|e| bad(format!("{name}: {e}")))?;
            if entry.size() > MAX_ENTRY_BYTES {
                return Err(bad(format!(
                    "{name} is larger than {MAX_ENTRY_BYTES} bytes"
                )));
            }
            let mut out = Vec::with_capacity(entry.size() as usize);
            entry
                .take(MAX_ENTRY_BYTES)
                .read_to_end(&mut out)
                .map_err(|e| bad(format!("{name}: {e}")))?;
            Ok(out)
        };
        if names.iter().any(|n| *n == format!("{prefix}byteorder")) {
            let order = read(&format!("{prefix}byteorder"))?;
            if order.trim_ascii() != b"little" {
                return Err(bad("written on a big-endian machine".into()));
            }
        }
        let pickle = pickle::parse(&read(&pkl)?, &source)?;
        check_globals(
            &pickle,
            TRAINING_STATE_GLOBALS,
            true,
            &source,
            "an EDM2 training state",
        )?;
        let data_prefix = format!("{prefix}data/");
        let mut data = HashMap::new();
        for name in &names {
            if let Some(key) = name.strip_prefix(&data_prefix) {
                data.insert(key.to_owned(), read(name)?);
            }
        }
        Ok(TrainingState {
            source,
            pickle,
            data,
        })
    }

    /// The EMAs: `(std, tensors)` per entry of `ema.stds` / `ema.emas`, tensors sorted by name.
    /// A state dict does not say which entries are buffers: every tensor has `buffer` false.
    ///
    /// Errors: no `ema` entry or not `{stds, emas}` of equal lengths, a std that is not a
    /// number, an entry that is not a tensor.
    pub fn emas(&self) -> Result<Vec<(f64, Vec<Edm2Tensor<'_>>)>> {
        let source = self.source.as_str();
        let root = self.pickle.root();
        let ema = root.get("ema").ok_or_else(|| {
            refuse(
                source,
                "no `ema` entry: not an EDM2 training state (CheckpointIO)",
            )
        })?;
        let seq = |key: &str| {
            ema.get(key).and_then(|v| v.items()).ok_or_else(|| {
                refuse(
                    source,
                    format!("ema has no `{key}` list: not PowerFunctionEMA's state"),
                )
            })
        };
        let (stds, emas) = (seq("stds")?, seq("emas")?);
        if stds.len() != emas.len() {
            return Err(refuse(
                source,
                format!(
                    "ema holds {} stds but {} state dicts",
                    stds.len(),
                    emas.len()
                ),
            ));
        }
        let mut storages = ZipStorages {
            source,
            entries: &self.data,
        };
        let mut out = Vec::new();
        for (std, dict) in stds.iter().zip(emas.iter()) {
            let std = std
                .as_float()
                .ok_or_else(|| refuse(source, format!("a std is {}", std.describe())))?;
            let entries = dict.entries().ok_or_else(|| {
                refuse(
                    source,
                    format!("ema state dict of std {std} is {}", dict.describe()),
                )
            })?;
            let mut tensors = Vec::with_capacity(entries.len());
            for (k, v) in entries.iter() {
                let name = k
                    .as_str()
                    .ok_or_else(|| refuse(source, "a state dict key is not a str"))?;
                tensors.push(read_tensor(v, &mut storages, source, name, false)?);
            }
            tensors.sort_by(|a, b| a.name.cmp(&b.name));
            if tensors.is_empty() {
                return Err(refuse(
                    source,
                    format!("the EMA of std {std} holds no tensors"),
                ));
            }
            out.push((std, tensors));
        }
        Ok(out)
    }
}

/// Writes `tensors` (sorted by name) as a safetensors file with `metadata`; adds
/// `hindsight.buffers` (sorted JSON array of the buffer names) when `declare_buffers`.
pub fn write_converted(
    tensors: &[Edm2Tensor<'_>],
    mut metadata: BTreeMap<String, String>,
    declare_buffers: bool,
    out: &mut impl Write,
) -> std::io::Result<()> {
    if declare_buffers {
        let buffers: Vec<&str> = tensors
            .iter()
            .filter(|t| t.buffer)
            .map(|t| t.name.as_str())
            .collect();
        metadata.insert(
            "hindsight.buffers".into(),
            serde_json::to_string(&buffers).expect("strings serialise"),
        );
    }
    let views: Vec<OutTensor<'_>> = tensors
        .iter()
        .map(|t| OutTensor {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            data: &t.data,
        })
        .collect();
    write_safetensors(out, &views, &metadata)
}

/// Which EDM2 file a name is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Edm2File {
    /// `<prefix>-<kimg>-<std>.pkl` (`network-snapshot-…`, `phema-…`): `(nimg, std)`.
    Pickle(u64, f64),
    /// `training-state-<kimg>.pt`: `nimg`.
    TrainingState(u64),
}

/// Recognises EDM2's file names, with EDM2's kimg → nimg rule ([`kimg_to_nimg`]).
pub fn parse_edm2_file_name(file_name: &str) -> Option<Edm2File> {
    if let Some(kimg) = file_name
        .strip_prefix("training-state-")
        .and_then(|s| s.strip_suffix(".pt"))
    {
        if kimg.is_empty() || !kimg.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        return Some(Edm2File::TrainingState(kimg_to_nimg(kimg.parse().ok()?)?));
    }
    if !file_name.ends_with(".pkl") {
        return None;
    }
    let (nimg, std) = parse_edm2_name(file_name)?;
    Some(Edm2File::Pickle(nimg, std))
}

/// Converts and ingests one EDM2 file into `run`: a snapshot pickle gives one snapshot, a
/// training state one per EMA std. Everything is read and checked before anything is stored;
/// for a training state, a refusal of its second EMA (a conflict) leaves the first stored.
///
/// Errors: a name EDM2 does not write (a `.pkl` without `-<kimg>-<std>`, e.g. a traditional
/// EMA's `network-snapshot-<kimg>.pkl`), a refused global, an unreadable file, and the ingest's
/// own refusals (manifest, conflicts).
pub async fn ingest_edm2(
    db: &Db,
    store: &BlobStore,
    run: &Run,
    path: &Path,
    options: IngestOptions,
) -> Result<Vec<Ingested>> {
    let source = path.display().to_string();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    let kind = parse_edm2_file_name(&name).ok_or_else(|| {
        refuse(
            &source,
            "not an EDM2 file name: <prefix>-<kimg>-<std>.pkl (a power-function EMA snapshot \
             such as network-snapshot-0008388-0.050.pkl) or training-state-<kimg>.pt",
        )
    })?;
    // Convert everything first (staged files, one read of the file), then ingest.
    let staged = {
        let (path, store) = (path.to_owned(), store.clone());
        blocking("converting an EDM2 file", move || {
            convert(&path, kind, &store)
        })
        .await?
    };
    let mut done = Vec::with_capacity(staged.len());
    for (nimg, std, file) in &staged {
        let hints = Hints {
            nimg: Some(*nimg),
            width: Some(Width::SigmaRel(*std)),
            profile: None,
        };
        // Messages name the EDM2 file (and the std, for a training state's EMAs).
        let named = match kind {
            Edm2File::TrainingState(_) => format!("{source} (ema std {std})"),
            _ => source.clone(),
        };
        done.push(ingest_converted(db, store, run, file.path(), named, hints, options).await?);
    }
    Ok(done)
}

/// Writes the safetensors files of the EDM2 file at `path` into staging files of `store`:
/// `(nimg, std, file)` per snapshot (one for a pickle, one per EMA of a training state).
fn convert(
    path: &Path,
    kind: Edm2File,
    store: &BlobStore,
) -> Result<Vec<(u64, f64, tempfile::NamedTempFile)>> {
    let source = path.display().to_string();
    let write = |nimg: u64, std: f64, tensors: &[Edm2Tensor<'_>], pickle: bool| {
        let metadata: BTreeMap<String, String> = [
            ("nimg".to_owned(), nimg.to_string()),
            ("sigma_rel".to_owned(), std.to_string()),
            (
                "source".to_owned(),
                if pickle {
                    "edm2-pickle"
                } else {
                    "edm2-training-state"
                }
                .to_owned(),
            ),
        ]
        .into();
        let file = store.staging_file("edm2-", ".safetensors")?;
        let mut out = std::io::BufWriter::new(file.as_file());
        write_converted(tensors, metadata, pickle, &mut out)
            .and_then(|()| out.flush())
            .map_err(|e| Error::io(format!("converting {source}"), e))?;
        drop(out);
        Ok((nimg, std, file))
    };
    match kind {
        Edm2File::Pickle(nimg, std) => {
            let bytes = read_bounded(path, &source)?;
            let p = parse_snapshot_pickle(&bytes, &source)?;
            let tensors = snapshot_tensors(&p, &source)?;
            Ok(vec![write(nimg, std, &tensors, true)?])
        }
        Edm2File::TrainingState(nimg) => {
            let state = TrainingState::read(path)?;
            state
                .emas()?
                .iter()
                .map(|(std, tensors)| write(nimg, *std, tensors, false))
                .collect()
        }
    }
}

fn read_bounded(path: &Path, source: &str) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("reading {source}"), e))?
        .len();
    if len > MAX_EDM2_PICKLE_BYTES as u64 {
        return Err(refuse(
            source,
            format!("a {len}-byte pickle is larger than {MAX_EDM2_PICKLE_BYTES} bytes"),
        ));
    }
    std::fs::read(path).map_err(|e| Error::io(format!("reading {source}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `BINUNICODE` of `text`.
    fn s(text: &str) -> Vec<u8> {
        let mut out = vec![b'X'];
        out.extend((text.len() as u32).to_le_bytes());
        out.extend(text.as_bytes());
        out
    }

    /// A legacy `torch.save` of one storage of type `storage` (a `GLOBAL` line such as
    /// `torch\nHalfStorage`), `numel` elements, with `count` written before `data`.
    fn legacy(storage: &str, numel: i32, count: u64, data: &[u8]) -> Vec<u8> {
        let mut b = b"\x80\x02".to_vec();
        b.extend(LEGACY_MAGIC);
        b.extend(b"\x80\x02M\xe9\x03.");
        b.extend(b"\x80\x02}");
        b.extend(s("little_endian"));
        b.extend(b"\x88s.");
        b.extend(b"\x80\x02(");
        b.extend(s("storage"));
        b.extend(format!("c{storage}\n").as_bytes());
        b.extend(s("94123"));
        b.extend(s("cpu"));
        b.push(b'J');
        b.extend(numel.to_le_bytes());
        b.extend(b"NtQ.");
        b.extend(b"\x80\x02]");
        b.extend(s("94123"));
        b.extend(b"a.");
        b.extend(count.to_le_bytes());
        b.extend(data);
        b
    }

    fn halves(values: &[f32]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect()
    }

    #[test]
    fn legacy_storages_are_read() {
        let data = halves(&[1.0, -2.5, 0.125]);
        let bytes = legacy("torch\nHalfStorage", 3, 3, &data);
        let st = read_legacy_storage(&bytes, "t").unwrap();
        assert_eq!((st.dtype, st.elem, st.data), ("F16", 2, &data[..]));
        let floats: Vec<u8> = [1f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = legacy("torch\nFloatStorage", 2, 2, &floats);
        let st = read_legacy_storage(&bytes, "t").unwrap();
        assert_eq!((st.dtype, st.elem), ("F32", 4));
    }

    #[track_caller]
    fn refused(bytes: &[u8], needle: &str) {
        let err = read_legacy_storage(bytes, "file.pkl")
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err}");
        assert!(err.contains("file.pkl"), "{err}");
    }

    #[test]
    fn corrupt_or_truncated_storages_are_clear_errors_not_panics() {
        let data = halves(&[1.0, 2.0, 3.0]);
        let good = legacy("torch\nHalfStorage", 3, 3, &data);
        for cut in 0..good.len() {
            assert!(
                read_legacy_storage(&good[..cut], "t").is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        refused(&longer, "7 data bytes where 3 F16 elements take 6");
        refused(
            &legacy("torch\nHalfStorage", 3, 4, &data),
            "4 elements written, the id says 3",
        );
        let mut wrong = good.clone();
        wrong[5] ^= 1;
        refused(&wrong, "no magic number");
        refused(
            &legacy("torch\nFooStorage", 3, 3, &data),
            "the global `torch.FooStorage`",
        );
        refused(&legacy("os\nsystem", 3, 3, &data), "the global `os.system`");
        // Written on a big-endian machine: little_endian False.
        let pos = good
            .windows(13)
            .position(|w| w == b"little_endian")
            .unwrap();
        let mut be = good.clone();
        be[pos + 13] = 0x89;
        refused(&be, "big-endian");
        // A storage view (view_metadata set).
        let view = legacy("torch\nHalfStorage", 3, 3, &data);
        let n = view.windows(4).position(|w| w == b"NtQ.").unwrap();
        let mut v = view[..n].to_vec();
        v.extend(b"(");
        v.extend(s("1"));
        v.extend(b"K\x00K\x06t");
        v.extend(&view[n + 1..]);
        refused(&v, "a view of another storage");
    }

    fn storage<'a>(data: &'a [u8], dtype: &'static str, elem: usize) -> Storage<'a> {
        Storage { dtype, elem, data }
    }

    #[test]
    fn strided_views_are_gathered_and_out_of_range_views_refused() {
        let raw: Vec<u8> = (0u8..6).collect();
        let st = storage(&raw, "U8", 1);
        // The transpose of a 2×3 matrix: shape [3, 2], strides [1, 3].
        let t = tensor_data(st, 0, &[3, 2], &[1, 3], "f", "w").unwrap();
        assert!(matches!(t, Cow::Owned(_)));
        assert_eq!(&*t, &[0, 3, 1, 4, 2, 5]);
        // Contiguous with an offset, and a size-1 dimension with any stride: borrowed.
        let t = tensor_data(st, 2, &[2, 1, 2], &[2, 99, 1], "f", "w").unwrap();
        assert!(matches!(t, Cow::Borrowed(_)));
        assert_eq!(&*t, &[2, 3, 4, 5]);
        // Empty and scalar tensors.
        assert!(tensor_data(st, 0, &[0, 4], &[4, 1], "f", "w")
            .unwrap()
            .is_empty());
        assert_eq!(&*tensor_data(st, 5, &[], &[], "f", "w").unwrap(), &[5]);
        // f16 elements: strides count elements, not bytes.
        let h = halves(&[0.0, 1.0, 2.0, 3.0]);
        let t = tensor_data(storage(&h, "F16", 2), 0, &[2, 2], &[1, 2], "f", "w").unwrap();
        assert_eq!(&*t, &halves(&[0.0, 2.0, 1.0, 3.0])[..]);
        for (offset, shape, stride, needle) in [
            (
                0i64,
                &[3usize, 3][..],
                &[3i64, 1][..],
                "reach element 8 of a storage of 6",
            ),
            (5, &[2], &[1], "reach element 6"),
            (-1, &[1], &[1], "storage offset -1"),
            (0, &[2, 2], &[-1, 1], "negative stride -1"),
            (0, &[2], &[1, 1], "2 strides for 1 dimensions"),
        ] {
            let err = tensor_data(st, offset, shape, stride, "f.pkl", "w")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(needle) && err.contains("f.pkl") && err.contains("tensor w"),
                "{err}"
            );
        }
    }

    /// `{'ema': ModuleDict ∘ … ∘ ModuleDict}`, `levels` deep, each level's `_modules` holding
    /// the next under `a`.
    fn nested_modules(levels: usize) -> Vec<u8> {
        let mut b = b"\x80\x04}".to_vec();
        b.extend(s("ema"));
        for _ in 0..levels {
            b.extend(b"ctorch.nn.modules.container\nModuleDict\n)\x81}(");
            b.extend(s("_parameters"));
            b.push(b'}');
            b.extend(s("_buffers"));
            b.push(b'}');
            b.extend(s("_modules"));
            b.push(b'}');
            b.extend(s("a"));
        }
        b.push(b'N');
        for _ in 0..levels {
            b.extend(b"sub");
        }
        b.extend(b"s.");
        b
    }

    #[test]
    fn module_walks_are_bounded() {
        let ok = parse_snapshot_pickle(&nested_modules(3), "t").unwrap();
        let err = snapshot_tensors(&ok, "t").unwrap_err().to_string();
        assert!(err.contains("holds no tensors"), "{err}");
        let deep =
            parse_snapshot_pickle(&nested_modules(MAX_MODULE_DEPTH + 2), "deep.pkl").unwrap();
        let err = snapshot_tensors(&deep, "deep.pkl").unwrap_err().to_string();
        assert!(
            err.contains(&format!("nested deeper than {MAX_MODULE_DEPTH} levels"))
                && err.contains("deep.pkl"),
            "{err}"
        );
    }

    #[test]
    fn pickles_that_are_not_snapshots_say_what_they_hold() {
        // {'net': None}: no ema.
        let mut b = b"\x80\x04}".to_vec();
        b.extend(s("net"));
        b.extend(b"Ns.");
        let p = parse_snapshot_pickle(&b, "x.pkl").unwrap();
        let err = snapshot_tensors(&p, "x.pkl").unwrap_err().to_string();
        assert!(err.contains("no `ema` entry (it holds [\"net\"])"), "{err}");
        // ema is a plain dict, not a module.
        let mut b = b"\x80\x04}".to_vec();
        b.extend(s("ema"));
        b.extend(b"}s.");
        let p = parse_snapshot_pickle(&b, "x.pkl").unwrap();
        let err = snapshot_tensors(&p, "x.pkl").unwrap_err().to_string();
        assert!(
            err.contains("the network is a dict of 0 entries, not an EDM2"),
            "{err}"
        );
    }

    /// EDM2's own snapshot pickle (the committed fixture): every prefix of it is a clear error,
    /// never a panic; the whole file gives EDM2's state_dict() names with the buffers marked.
    #[test]
    fn a_real_snapshot_and_its_truncations() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/edm2_pkl/run/network-snapshot-0000004-0.050.pkl");
        let bytes = std::fs::read(path).unwrap();
        let p = parse_snapshot_pickle(&bytes, "f").unwrap();
        let tensors = snapshot_tensors(&p, "f").unwrap();
        let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        assert!(names.contains(&"unet.enc.8x8_conv.weight"), "{names:?}");
        assert!(names.contains(&"unet.out_gain"), "{names:?}");
        let buffers: Vec<&str> = tensors
            .iter()
            .filter(|t| t.buffer)
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(
            buffers,
            [
                "logvar_fourier.freqs",
                "logvar_fourier.phases",
                "unet.emb_fourier.freqs",
                "unet.emb_fourier.phases"
            ]
        );
        assert!(tensors.iter().all(|t| t.dtype == "F16"));
        for cut in (0..bytes.len()).step_by(97) {
            let r = parse_snapshot_pickle(&bytes[..cut], "f")
                .and_then(|p| snapshot_tensors(&p, "f").map(|t| t.len()));
            assert!(r.is_err(), "cut at {cut}");
        }
        // A byte flipped inside a storage's legacy bytes: refused, naming the file.
        let at = bytes
            .windows(LEGACY_MAGIC.len())
            .position(|w| w == LEGACY_MAGIC)
            .unwrap();
        let mut bad = bytes.clone();
        bad[at + 3] ^= 0xff;
        let err = parse_snapshot_pickle(&bad, "f.pkl")
            .and_then(|p| snapshot_tensors(&p, "f.pkl").map(|t| t.len()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("f.pkl") && err.contains("no magic number"),
            "{err}"
        );
    }

    #[test]
    fn file_names() {
        assert_eq!(
            parse_edm2_file_name("network-snapshot-0008388-0.050.pkl"),
            Some(Edm2File::Pickle(8_388_608, 0.05))
        );
        assert_eq!(
            parse_edm2_file_name("training-state-0000012.pt"),
            Some(Edm2File::TrainingState(12_288))
        );
        for bad in [
            "network-snapshot-0008388.pkl",
            "training-state-.pt",
            "training-state-12a.pt",
            "network-snapshot-0008388-0.050.safetensors",
            "0.1000.pt",
        ] {
            assert_eq!(parse_edm2_file_name(bad), None, "{bad}");
        }
    }
}
