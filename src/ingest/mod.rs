//! Getting snapshots into the store: one validation shared by every door (the Rust trainer
//! library, directory import, ema-pytorch checkpoints, HTTP upload).
//!
//! Every door ends in [`ingest_reader`] (files through [`ingest_file`]): header validation
//! ([`crate::format::read_header`]), checks against the run's manifest and existing
//! snapshots, a hashed copy into the store, and one transaction that records the snapshot.
//!
//! - `file`: one safetensors file or stream.
//! - `import`: a directory of files ([`import_dir`]), a few in flight at once.
//! - `ema_pytorch`: `PostHocEMA` checkpoint folders, converted to safetensors first.
//! - `trainer`: [`SnapshotWriter`], the door for Rust training loops.

mod ema_pytorch;
mod file;
mod import;
mod trainer;

pub use ema_pytorch::{convert_checkpoint, ingest_ema_pytorch, parse_ema_pytorch_name};
pub use file::{
    ingest_file, ingest_reader, kimg_to_nimg, parse_edm2_name, CutShort, Hints, Incoming,
    IngestOptions, Ingested,
};
pub use import::{import_dir, ImportReport, Source};
pub use trainer::SnapshotWriter;

use crate::db::{Db, Run};
use crate::error::Result;

/// The run an ingest writes into, created on the ingest's first snapshot: when the ingest
/// fails and the run was created for it and is still empty, [`RunForIngest::abandon`] removes
/// it again, so a refused upload or import leaves no empty run behind.
#[derive(Clone, Debug)]
pub struct RunForIngest {
    /// The run.
    pub run: Run,
    created: bool,
}

impl RunForIngest {
    /// The run named `name` (checked with [`crate::db::check_run_name`]), created if missing.
    pub async fn open(db: &Db, name: &str) -> Result<Self> {
        crate::db::check_run_name(name)?;
        let (run, created) = db.run_or_create_with(name, &serde_json::json!({})).await?;
        Ok(Self { run, created })
    }

    /// After a failed ingest: deletes the run if this ingest created it and nothing was
    /// stored in it (by this ingest or a concurrent one). Returns whether it was deleted.
    pub async fn abandon(&self, db: &Db) -> Result<bool> {
        if !self.created {
            return Ok(false);
        }
        db.delete_run_if_empty(self.run.id).await
    }
}
