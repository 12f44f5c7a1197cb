//! The training checkpoint: the trainer's whole state (parameters, Fourier buffers, Adam
//! moments and step, configuration), every tracked EMA, and the data stream's position, in one
//! safetensors file written atomically (temporary file, fsync, rename). `--resume` continues
//! bit-identically from it.
//!
//! Layout: the trainer's tensors under `param/`, `buffer/`, `adam_m/`, `adam_v/` (see
//! [`Trainer::checkpoint`]), EMA `k`'s copy of state-dict tensor `name` under `ema{k}/name`;
//! `__metadata__` holds the trainer's keys plus `ema_sigma_rels`, `ema_names` (JSON), `ema_nimg`
//! and `data_index`.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::trainer::Trainer;
use crate::error::{Error, Result};
use crate::format::{read_header, write_safetensors, OutTensor};
use crate::phema::{PowerEma, TrackedEma, Width};

/// Where a run's training files live: `<data-dir>/training/<run>/`.
pub fn training_dir(data_dir: &Path, run: &str) -> PathBuf {
    data_dir.join("training").join(run)
}

/// The run's checkpoint file.
pub fn checkpoint_path(data_dir: &Path, run: &str) -> PathBuf {
    training_dir(data_dir, run).join("checkpoint.safetensors")
}

/// The run's statistics, one JSON line per interval.
pub fn stats_path(data_dir: &Path, run: &str) -> PathBuf {
    training_dir(data_dir, run).join("stats.jsonl")
}

/// A tensor's values as a flat f32 vector.
pub(super) fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes the trainer, the EMAs and the data position to `path` atomically.
pub fn save(path: &Path, trainer: &Trainer, ema: &PowerEma, data_index: u64) -> Result<()> {
    let (tensors, mut meta) = trainer.checkpoint();
    let names = ema.names();
    let json = |v: serde_json::Result<String>| v.expect("plain values serialise");
    meta.insert(
        "ema_sigma_rels".into(),
        json(serde_json::to_string(
            &ema.emas().iter().map(|e| e.sigma_rel).collect::<Vec<_>>(),
        )),
    );
    meta.insert("ema_names".into(), json(serde_json::to_string(names)));
    meta.insert("ema_nimg".into(), ema.nimg().to_string());
    meta.insert("data_index".into(), data_index.to_string());
    // (name, shape, little-endian f32 bytes) of the trainer's tensors, then of every EMA
    // buffer (the EMA tracks the state dict, in its order).
    let mut entries: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.dims().to_vec(), le_bytes(&flat(t)?))))
        .collect::<Result<_>>()?;
    let state = trainer.state_dict();
    for (k, e) in ema.emas().iter().enumerate() {
        for ((name, values), (_, t)) in names.iter().zip(&e.tensors).zip(&state) {
            entries.push((
                format!("ema{k}/{name}"),
                t.dims().to_vec(),
                le_bytes(values),
            ));
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let out: Vec<OutTensor<'_>> = entries
        .iter()
        .map(|(n, s, b)| OutTensor {
            name: n,
            dtype: "F32",
            shape: s,
            data: b,
        })
        .collect();
    let dir = path.parent().expect("a checkpoint path has a directory");
    let io = |e: std::io::Error| Error::io(format!("writing {}", path.display()), e);
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        write_safetensors(&mut w, &out, &meta).map_err(io)?;
        std::io::Write::flush(&mut w).map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Reads a checkpoint written by [`save`]: the trainer (on `device`), the EMAs, and the data
/// stream's position.
pub fn load(path: &Path, device: &Device) -> Result<(Trainer, PowerEma, u64)> {
    let source = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(format!("reading {source}"), e))?;
    let header = read_header(&mut &bytes[..], bytes.len() as u64, &source)?;
    let meta = header.metadata;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
    let trainer = Trainer::restore(&tensors, &meta, device)?;
    let get = |k: &str| {
        meta.get(k)
            .map(String::as_str)
            .ok_or_else(|| Error::invalid(&source, format!("no {k} in the checkpoint's metadata")))
    };
    let parse_error = |k: &str| {
        let source = source.clone();
        let k = k.to_owned();
        move |e: &dyn std::fmt::Display| Error::invalid(&source, format!("{k}: {e}"))
    };
    let sigma_rels: Vec<f64> = serde_json::from_str(get("ema_sigma_rels")?)
        .map_err(|e| parse_error("ema_sigma_rels")(&e))?;
    let names: Vec<String> =
        serde_json::from_str(get("ema_names")?).map_err(|e| parse_error("ema_names")(&e))?;
    let mut emas = Vec::new();
    for (k, &sigma_rel) in sigma_rels.iter().enumerate() {
        let tensors = names
            .iter()
            .map(|n| {
                let t = tensors.get(&format!("ema{k}/{n}")).ok_or_else(|| {
                    Error::invalid(&source, format!("no tensor ema{k}/{n} in the checkpoint"))
                })?;
                flat(t)
            })
            .collect::<Result<Vec<_>>>()?;
        let (_, gamma) = Width::SigmaRel(sigma_rel).resolve("ema")?;
        emas.push(TrackedEma {
            sigma_rel,
            gamma,
            tensors,
        });
    }
    let ema_nimg = get("ema_nimg")?
        .parse()
        .map_err(|e| parse_error("ema_nimg")(&e))?;
    let ema = PowerEma::from_parts(names, emas, ema_nimg)?;
    let data_index = get("data_index")?
        .parse()
        .map_err(|e| parse_error("data_index")(&e))?;
    Ok((trainer, ema, data_index))
}
