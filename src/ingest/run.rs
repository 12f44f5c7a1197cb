//! The run an ingest writes into: created no earlier than the ingest's first snapshot is
//! recorded (uploads), or up front and removed again when the ingest fails (imports).

use tokio::sync::OnceCell;

use crate::db::{Db, Run};
use crate::error::Result;

/// The run an ingest writes into.
///
/// [`RunForIngest::open`] creates a missing run at once, and [`RunForIngest::abandon`]
/// removes it again when the ingest fails and nothing was stored in it.
/// [`RunForIngest::lazy`] creates it only when a snapshot is about to be recorded in it, so
/// that an upload cut off (or refused, or killed) before then leaves no empty run behind.
#[derive(Debug)]
pub struct RunForIngest {
    name: String,
    /// The run once it exists, and whether this value created it.
    run: OnceCell<(Run, bool)>,
}

impl RunForIngest {
    /// The run named `name` (checked with [`crate::db::check_run_name`]), created if missing.
    pub async fn open(db: &Db, name: &str) -> Result<Self> {
        crate::db::check_run_name(name)?;
        let (run, created) = db.run_or_create_with(name, &serde_json::json!({})).await?;
        Ok(Self {
            name: name.to_owned(),
            run: OnceCell::new_with(Some((run, created))),
        })
    }

    /// The run named `name` (checked), created by [`RunForIngest::run`] when first needed.
    pub async fn lazy(db: &Db, name: &str) -> Result<Self> {
        crate::db::check_run_name(name)?;
        let existing = db.run(name).await?;
        Ok(Self {
            name: name.to_owned(),
            run: OnceCell::new_with(existing.map(|r| (r, false))),
        })
    }

    /// An existing run.
    pub fn existing(run: Run) -> Self {
        Self {
            name: run.name.clone(),
            run: OnceCell::new_with(Some((run, false))),
        }
    }

    /// The run's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The run, if it exists yet.
    pub fn get(&self) -> Option<&Run> {
        self.run.get().map(|(r, _)| r)
    }

    /// The run, created now if it does not exist yet.
    pub async fn run(&self, db: &Db) -> Result<&Run> {
        let (run, _) = self
            .run
            .get_or_try_init(|| async {
                db.run_or_create_with(&self.name, &serde_json::json!({}))
                    .await
            })
            .await?;
        Ok(run)
    }

    /// After a failed ingest: deletes the run if this value created it and nothing was
    /// stored in it (by this ingest or a concurrent one). Returns whether it was deleted.
    pub async fn abandon(&self, db: &Db) -> Result<bool> {
        match self.run.get() {
            Some((run, true)) => db.delete_run_if_empty(run.id).await,
            _ => Ok(false),
        }
    }
}
