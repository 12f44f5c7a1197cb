//! A data directory: the SQLite index and the blob store under one path, opened together.

use std::path::{Path, PathBuf};

use crate::db::Db;
use crate::error::{Error, Result};
use crate::store::BlobStore;

/// File name of the index inside the data directory.
pub const INDEX_FILE: &str = "index.sqlite";
/// Directory of the blob store inside the data directory.
pub const STORE_DIR: &str = "store";

/// Marker of an index rebuild in progress (or one that failed): while it exists, the data
/// directory does not open.
pub const REBUILD_MARKER: &str = "index.sqlite.rebuilding";
/// The lock file: every process that opens the data directory holds a shared lock on it;
/// `rebuild-index` needs it exclusively.
pub const LOCK_FILE: &str = "lock";

/// The index and the store of one data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    /// The directory.
    pub path: PathBuf,
    /// The SQLite index.
    pub db: Db,
    /// The blob store.
    pub store: BlobStore,
    /// The shared lock on [`LOCK_FILE`], held while any clone lives.
    _lock: std::sync::Arc<std::fs::File>,
}

/// Takes the data directory's lock, shared (every user) or exclusive (`rebuild-index`).
pub fn lock_data_dir(path: &Path, exclusive: bool) -> Result<std::fs::File> {
    let lock_path = path.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(format!("opening {}", lock_path.display()), e))?;
    let taken = if exclusive {
        file.try_lock()
    } else {
        file.try_lock_shared()
    };
    match taken {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Conflict(if exclusive {
            format!(
                "another hindsight process (a server, a worker, a command) has {} open; stop \
                 it first",
                path.display()
            )
        } else {
            format!(
                "{} is being rebuilt by `hindsight rebuild-index`; wait for it to finish",
                path.display()
            )
        })),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(Error::io(format!("locking {}", lock_path.display()), e))
        }
    }
}

impl DataDir {
    /// Opens (creating if needed) the data directory at `path`, then recovers what crashed
    /// writers left ([`super::recovery::recover`]: staging files, abandoned claims, empty runs).
    ///
    /// Errors: [`Error::IndexDamaged`] when the index is missing or empty beside a store that
    /// holds blobs (it was deleted or truncated: starting on an empty index would hide every
    /// snapshot, and `gc` would then delete them), or when SQLite finds it damaged. Nothing
    /// is changed then; the message says how to restore or rebuild it.
    pub async fn open(path: &Path) -> Result<Self> {
        let data = Self::open_without_recovery(path).await?;
        super::recovery::recover(&data.db, &data.store, super::recovery::CLAIM_GRACE).await?;
        Ok(data)
    }

    /// [`DataDir::open`] without the start-up recovery (for tools that inspect a data
    /// directory as it is).
    pub async fn open_without_recovery(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path)
            .map_err(|e| Error::io(format!("creating data directory {}", path.display()), e))?;
        let lock = lock_data_dir(path, false)?;
        Self::open_locked(path, lock).await
    }

    /// Opens the data directory with `lock` already held (shared or exclusive).
    pub async fn open_locked(path: &Path, lock: std::fs::File) -> Result<Self> {
        let index = path.join(INDEX_FILE);
        if path.join(REBUILD_MARKER).exists() {
            return Err(Error::IndexDamaged {
                path: index.display().to_string(),
                reason: "a rebuild of it did not finish".into(),
            });
        }
        let blobs = store_blob_count(&path.join(STORE_DIR), 1);
        if blobs > 0 && index_is_empty(&index) {
            return Err(Error::IndexDamaged {
                path: index.display().to_string(),
                reason: "it is missing or empty, but the store beside it holds blobs".into(),
            });
        }
        let db = Db::open(&index)
            .await
            .map_err(|e| damaged_index(&index, e))?;
        if let Some(problem) = db
            .quick_check()
            .await
            .map_err(|e| damaged_index(&index, e))?
        {
            return Err(Error::IndexDamaged {
                path: index.display().to_string(),
                reason: format!("SQLite's integrity check fails: {problem}"),
            });
        }
        let store = BlobStore::open(path.join(STORE_DIR))?;
        Ok(Self {
            path: path.to_owned(),
            db,
            store,
            _lock: std::sync::Arc::new(lock),
        })
    }

    /// The run named `name`, or [`Error::NotFound`].
    pub async fn existing_run(&self, name: &str) -> Result<crate::db::Run> {
        self.db
            .run(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("run {name:?} does not exist")))
    }
}

/// Whether the index file at `path` is missing or empty. (SQLite writes the first page of a
/// new index, which records WAL mode, into the main file when it creates it: an index in
/// use is never 0 bytes, whatever its write-ahead log holds.)
fn index_is_empty(path: &Path) -> bool {
    std::fs::metadata(path).map_or(0, |m| m.len()) == 0
}

/// Blob files under `store/blobs`, counting no further than `limit`.
fn store_blob_count(store: &Path, limit: usize) -> usize {
    let mut n = 0;
    let Ok(level1) = std::fs::read_dir(store.join("blobs")) else {
        return 0;
    };
    for a in level1.flatten() {
        for b in std::fs::read_dir(a.path()).into_iter().flatten().flatten() {
            n += std::fs::read_dir(b.path())
                .into_iter()
                .flatten()
                .flatten()
                .count();
            if n >= limit {
                return n;
            }
        }
    }
    n
}

/// An error opening the index, as [`Error::IndexDamaged`] when SQLite says the file is not a
/// database or is malformed.
fn damaged_index(path: &Path, e: Error) -> Error {
    let text = e.chain_text();
    let damaged = [
        "file is not a database",
        "malformed",
        "disk image",
        "corrupt",
    ];
    if damaged.iter().any(|d| text.contains(d)) {
        Error::IndexDamaged {
            path: path.display().to_string(),
            reason: text,
        }
    } else {
        e
    }
}

impl DataDir {
    /// A data directory from parts already opened, with its lock held (for
    /// `rebuild-index`, which builds a new index while the rebuild marker keeps everyone
    /// else out).
    pub(crate) fn assemble(path: &Path, db: Db, store: BlobStore, lock: std::fs::File) -> Self {
        Self {
            path: path.to_owned(),
            db,
            store,
            _lock: std::sync::Arc::new(lock),
        }
    }

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
