//! The run an ingest writes into, and undoing its creation when the ingest fails.

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
