//! The ema-pytorch door: checkpoint folders written by `PostHocEMA` (files `{index}.{step}.pt`,
//! each `torch.save` of a `KarrasEMA` state dict, fp16 by default), read with candle's pickle
//! reader and converted to safetensors before the usual ingest.
//!
//! Conversion: tensors under `ema_model.` keep their model names (the prefix is dropped); the
//! wrapper's bookkeeping buffers (`initted`, `step`) are left out. The EMA width comes from the
//! folder's `sigma_rels` by `index`, the time is `step × images_per_step` (ema-pytorch counts
//! update calls, not images), and the profile is computed from ema-pytorch's update rule with
//! the folder's `update_every` (its EMAs are not the power functions their `sigma_rels` name
//! unless `update_every` is 1). The converted bytes are deterministic, so re-importing a
//! folder is a no-op.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use candle_core::DType;

use super::file::{ingest_converted, IngestOptions, Ingested};
use super::resolve::Hints;
use crate::db::{Db, Run};
use crate::error::{blocking, Error, Result};
use crate::format::{write_safetensors, OutTensor};
use crate::phema::{RealisedProfile, Width};
use crate::store::BlobStore;

/// Parses `{index}.{step}.pt`.
pub fn parse_ema_pytorch_name(file_name: &str) -> Option<(usize, u64)> {
    let stem = file_name.strip_suffix(".pt")?;
    let (index, step) = stem.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(index) || !digits(step) {
        return None;
    }
    Some((index.parse().ok()?, step.parse().ok()?))
}

/// A tensor read from a checkpoint: safetensors dtype name, shape, little-endian bytes.
struct RawTensor {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn safetensors_dtype(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::U8 => "U8",
        _ => return None,
    })
}

/// Reads the `ema_model.*` tensors of a `torch.save` zip file, with the prefix removed.
///
/// The walk over the pickled state dict uses candle's pickle machinery, but entries outside
/// `ema_model.` (the wrapper's `initted` flag and `step` counter) are skipped without a look,
/// where candle's own loader would complain on stderr about their storage types.
fn read_ema_tensors(path: &Path) -> std::result::Result<Vec<RawTensor>, String> {
    use candle_core::pickle::{Object, Stack};
    use std::io::{BufReader, Read};

    let err = |e: &dyn std::fmt::Display| e.to_string();
    let file = std::fs::File::open(path).map_err(|e| err(&e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| err(&e))?;
    let names = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<Vec<String>, _>>()
        .map_err(|e| err(&e))?;
    let pkl = names
        .into_iter()
        .find(|n| n.ends_with("data.pkl"))
        .ok_or("no data.pkl inside")?;
    let mut stack = Stack::empty();
    {
        let entry = zip.by_name(&pkl).map_err(|e| err(&e))?;
        stack
            .read_loop(&mut BufReader::new(entry))
            .map_err(|e| err(&e))?;
    }
    let Object::Dict(entries) = stack.finalize().map_err(|e| err(&e))? else {
        return Err("the pickle is not a state dict".into());
    };
    let dir = std::path::PathBuf::from(pkl.strip_suffix(".pkl").unwrap_or(&pkl));
    let mut out = Vec::new();
    for (key, value) in entries {
        let Object::Unicode(name) = &key else {
            continue;
        };
        let Some(short) = name.strip_prefix("ema_model.") else {
            continue;
        };
        let short = short.to_owned();
        let info = value
            .into_tensor_info(key, &dir)
            .map_err(|e| format!("tensor {short}: {e}"))?
            .ok_or_else(|| format!("tensor {short}: not a plain tensor"))?;
        if !info.layout.is_contiguous() {
            return Err(format!(
                "tensor {short}: non-contiguous storage is not supported"
            ));
        }
        let dtype = safetensors_dtype(info.dtype)
            .ok_or_else(|| format!("tensor {short}: unsupported dtype {:?}", info.dtype))?;
        let len = info.layout.shape().elem_count() * info.dtype.size_in_bytes();
        let mut reader = zip.by_name(&info.path).map_err(|e| err(&e))?;
        // candle's layouts for pickled tensors carry the storage offset in bytes.
        std::io::copy(
            &mut reader.by_ref().take(info.layout.start_offset() as u64),
            &mut std::io::sink(),
        )
        .map_err(|e| err(&e))?;
        let mut data = vec![0u8; len];
        reader
            .read_exact(&mut data)
            .map_err(|e| format!("tensor {short}: storage too short: {e}"))?;
        out.push(RawTensor {
            name: short,
            dtype,
            shape: info.layout.dims().to_vec(),
            data,
        });
    }
    Ok(out)
}

/// Converts one checkpoint to safetensors bytes written to `out`; returns the tensor count.
pub fn convert_checkpoint(
    path: &Path,
    metadata: &BTreeMap<String, String>,
    out: &mut impl Write,
) -> Result<usize> {
    let source = path.display().to_string();
    let mut kept = read_ema_tensors(path)
        .map_err(|e| Error::invalid(&source, format!("not a readable PyTorch checkpoint: {e}")))?;
    if kept.is_empty() {
        return Err(Error::invalid(
            &source,
            "no ema_model.* tensors: not an ema-pytorch KarrasEMA checkpoint",
        ));
    }
    kept.sort_by(|a, b| a.name.cmp(&b.name));
    let views: Vec<OutTensor<'_>> = kept
        .iter()
        .map(|t| OutTensor {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            data: &t.data,
        })
        .collect();
    write_safetensors(out, &views, metadata)
        .map_err(|e| Error::io(format!("converting {source}"), e))?;
    Ok(views.len())
}

/// How a `PostHocEMA` folder was written: what its file names and EMAs mean.
#[derive(Clone, Debug, PartialEq)]
pub struct EmaPytorchSettings {
    /// The `sigma_rels` given to `PostHocEMA`, in EMA index order.
    pub sigma_rels: Vec<f64>,
    /// Training images per optimizer step (one `update()` call each).
    pub images_per_step: u64,
    /// `update_every` of its EMAs (ema-pytorch's default is 100).
    pub update_every: u64,
}

/// Imports one ema-pytorch checkpoint into `run`: `sigma_rels[index]` is the file's declared
/// width, `step × images_per_step` its time, and its profile the one ema-pytorch's update rule
/// really gives ([`crate::phema::Tabulated::ema_pytorch`]), stored with the snapshot.
pub async fn ingest_ema_pytorch(
    db: &Db,
    store: &BlobStore,
    run: &Run,
    path: &Path,
    settings: &EmaPytorchSettings,
    options: IngestOptions,
) -> Result<Ingested> {
    let EmaPytorchSettings {
        sigma_rels,
        images_per_step,
        update_every,
    } = settings;
    let (images_per_step, update_every) = (*images_per_step, *update_every);
    let source = path.display().to_string();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let (index, step) = parse_ema_pytorch_name(name).ok_or_else(|| {
        Error::invalid(
            &source,
            "not an ema-pytorch checkpoint name ({index}.{step}.pt)",
        )
    })?;
    let sigma_rel = *sigma_rels.get(index).ok_or_else(|| {
        Error::invalid(
            &source,
            format!(
                "EMA index {index} but only {} sigma_rels were given",
                sigma_rels.len()
            ),
        )
    })?;
    let nimg = step
        .checked_mul(images_per_step)
        .ok_or_else(|| Error::invalid(&source, "step × images_per_step overflows"))?;
    let profile = RealisedProfile::EmaPytorch {
        update_every,
        images_per_step,
    };
    let metadata: BTreeMap<String, String> = [
        ("nimg".to_owned(), nimg.to_string()),
        ("sigma_rel".to_owned(), sigma_rel.to_string()),
        ("source".to_owned(), "ema-pytorch".to_owned()),
        ("step".to_owned(), step.to_string()),
        (
            "profile".to_owned(),
            serde_json::to_string(&profile).expect("profiles serialise"),
        ),
    ]
    .into();
    let mut staged = store.staging_file("ema-pytorch-", ".safetensors")?;
    {
        let path = path.to_owned();
        let file = staged
            .as_file_mut()
            .try_clone()
            .map_err(|e| Error::io("staging a converted checkpoint", e))?;
        blocking("converting an ema-pytorch checkpoint", move || {
            let mut out = std::io::BufWriter::new(file);
            convert_checkpoint(&path, &metadata, &mut out)?;
            out.flush()
                .map_err(|e| Error::io("staging a converted checkpoint", e))
        })
        .await?;
    }
    let hints = Hints {
        nimg: Some(nimg),
        width: Some(Width::SigmaRel(sigma_rel)),
        profile: Some(profile),
    };
    let source = path.display().to_string();
    ingest_converted(db, store, run, staged.path(), source, hints, options).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_ema_pytorch_name("0.1000.pt"), Some((0, 1000)));
        assert_eq!(parse_ema_pytorch_name("12.5.pt"), Some((12, 5)));
        for bad in ["0.pt", "a.1.pt", "0.1.pth", "0..pt", ".1.pt", "0.1.2.pt"] {
            assert_eq!(parse_ema_pytorch_name(bad), None, "{bad}");
        }
    }
}
