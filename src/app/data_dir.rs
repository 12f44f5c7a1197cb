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

impl DataDir {
    /// Stores `bytes` as a blob and claims it (`pending`): the transaction that records the
    /// row referring to it marks it valid. Returns its digest (hex). `what` names the content
    /// in errors.
    pub async fn put_blob(&self, bytes: Vec<u8>, what: &str) -> Result<String> {
        use std::io::Write;
        let store = self.store.clone();
        let context = format!("storing {what}");
        let writer = crate::error::blocking(&context.clone(), move || {
            let mut writer = store.writer()?;
            writer
                .write_all(&bytes)
                .map_err(|e| Error::io(context, e))?;
            Ok(writer)
        })
        .await?;
        let digest = writer.digest_so_far().to_hex();
        let checksum = writer.checksum_so_far().to_hex();
        self.db
            .claim_blob(&digest, writer.len(), Some(&checksum))
            .await?;
        crate::error::blocking(&format!("publishing {what}"), move || writer.finish()).await?;
        Ok(digest)
    }

    /// The whole content of blob `digest`, checked against its digest while read.
    pub async fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        use std::io::Read;
        let digest: crate::store::Digest = digest.parse()?;
        let store = self.store.clone();
        crate::error::blocking("reading a blob", move || {
            let mut bytes = Vec::new();
            store
                .open_verified(&digest)?
                .read_to_end(&mut bytes)
                .map_err(|e| Error::io(format!("reading blob {}", digest.to_hex()), e))?;
            Ok(bytes)
        })
        .await
    }
}
