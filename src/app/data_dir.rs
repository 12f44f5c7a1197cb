//! A data directory: the SQLite index and the blob store under one path, opened together.

use std::path::{Path, PathBuf};

use crate::db::Db;
use crate::error::{Error, Result};
use crate::store::BlobStore;

/// File name of the index inside the data directory.
pub const INDEX_FILE: &str = "index.sqlite";
/// Directory of the blob store inside the data directory.
pub const STORE_DIR: &str = "store";

/// The index and the store of one data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    /// The directory.
    pub path: PathBuf,
    /// The SQLite index.
    pub db: Db,
    /// The blob store.
    pub store: BlobStore,
}

impl DataDir {
    /// Opens (creating if needed) the data directory at `path`.
    pub async fn open(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path)
            .map_err(|e| Error::io(format!("creating data directory {}", path.display()), e))?;
        let db = Db::open(&path.join(INDEX_FILE)).await?;
        let store = BlobStore::open(path.join(STORE_DIR))?;
        Ok(Self {
            path: path.to_owned(),
            db,
            store,
        })
    }

    /// The run named `name`, or [`Error::NotFound`] saying how to list the runs.
    pub async fn existing_run(&self, name: &str) -> Result<crate::db::Run> {
        self.db.run(name).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "run {name:?} does not exist (see `hindsight runs`)"
            ))
        })
    }
}
