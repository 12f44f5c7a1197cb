//! The trainer door: writes the EMAs of a [`PowerEma`] tracker as safetensors snapshots into
//! a run, through the same validation and recording as every other door. (The safetensors
//! codec itself is [`crate::format`].)

use std::collections::BTreeMap;
use std::io::Write;

use super::file::{ingest_file, IngestOptions, Ingested};
use super::resolve::Hints;
use crate::app::DataDir;
use crate::db::Run;
use crate::error::{Error, Result};
use crate::format::{write_safetensors, OutTensor};
use crate::phema::{PowerEma, Width};

/// Writes snapshots of a tracker into one run of a local data directory.
#[derive(Clone, Debug)]
pub struct SnapshotWriter {
    data: DataDir,
    run: Run,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
}

impl SnapshotWriter {
    /// Prepares to write into `run_name` (created with `run_metadata`, e.g. the training
    /// configuration, if it does not exist). `shapes` gives every tracked tensor's shape, in
    /// the tracker's order.
    pub async fn new(
        data: &DataDir,
        run_name: &str,
        run_metadata: &serde_json::Value,
        tracker: &PowerEma,
        shapes: &[Vec<usize>],
    ) -> Result<Self> {
        if shapes.len() != tracker.names().len() {
            return Err(Error::invalid(
                "shapes",
                format!(
                    "{} shapes for {} tracked tensors",
                    shapes.len(),
                    tracker.names().len()
                ),
            ));
        }
        for ((name, shape), len) in tracker
            .names()
            .iter()
            .zip(shapes)
            .zip(tracker.emas()[0].tensors.iter().map(Vec::len))
        {
            if shape.iter().product::<usize>() != len {
                return Err(Error::invalid(
                    format!("shapes.{name}"),
                    format!(
                        "shape {shape:?} holds {} elements, the tensor {len}",
                        shape.iter().product::<usize>()
                    ),
                ));
            }
        }
        let (run, _) = data.db.run_or_create_with(run_name, run_metadata).await?;
        Ok(Self {
            data: data.clone(),
            run,
            names: tracker.names().to_vec(),
            shapes: shapes.to_vec(),
        })
    }

    /// The run written into.
    pub fn run(&self) -> &Run {
        &self.run
    }

    /// Stores one snapshot per tracked width at the tracker's current time (f32 tensors,
    /// `__metadata__` with `nimg`, `sigma_rel` and `gamma`).
    pub async fn write(&self, tracker: &PowerEma) -> Result<Vec<Ingested>> {
        if tracker.names() != self.names.as_slice() {
            return Err(Error::invalid(
                "tracker",
                "tracks other tensors than the writer was created for",
            ));
        }
        let nimg = tracker.nimg();
        let mut out = Vec::with_capacity(tracker.emas().len());
        for ema in tracker.emas() {
            let bytes: Vec<Vec<u8>> = ema
                .tensors
                .iter()
                .map(|t| t.iter().flat_map(|v| v.to_le_bytes()).collect())
                .collect();
            let tensors: Vec<OutTensor<'_>> = self
                .names
                .iter()
                .zip(&self.shapes)
                .zip(&bytes)
                .map(|((name, shape), data)| OutTensor {
                    name,
                    dtype: "F32",
                    shape,
                    data,
                })
                .collect();
            let metadata: BTreeMap<String, String> = [
                ("nimg".to_owned(), nimg.to_string()),
                ("sigma_rel".to_owned(), ema.sigma_rel.to_string()),
                ("gamma".to_owned(), ema.gamma.to_string()),
                ("writer".to_owned(), "hindsight PowerEma".to_owned()),
            ]
            .into();
            // Staged in the store's own temporary directory (same file system), then ingested
            // like any other file.
            let mut staged = self.data.store.staging_file("snapshot-", ".safetensors")?;
            {
                let mut out = std::io::BufWriter::new(staged.as_file_mut());
                write_safetensors(&mut out, &tensors, &metadata)
                    .and_then(|_| out.flush())
                    .map_err(|e| Error::io("staging a snapshot", e))?;
            }
            let hints = Hints {
                nimg: Some(nimg),
                width: Some(Width::SigmaRel(ema.sigma_rel)),
                profile: None,
            };
            out.push(
                ingest_file(
                    &self.data.db,
                    &self.data.store,
                    &self.run,
                    staged.path(),
                    hints,
                    IngestOptions::default(),
                    |_| {},
                )
                .await?,
            );
        }
        Ok(out)
    }
}
