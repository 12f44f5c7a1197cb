//! The store's type and its directory: opening (and the `VERSION` check), where a digest's
//! blob lives, and the few file-system helpers the writer and reader share.
//!
//! [`BlobStore`] also holds the record of blobs whose content was checked (a file's identity
//! and ctime when it was, see `FileStamp`): reads consult it, and the writer adds to it
//! when it publishes.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;
#[cfg(not(unix))]
use std::time::SystemTime;

use super::digest::Digest;
use crate::error::{Error, Result};

/// The on-disk format this version reads and writes.
pub const FORMAT_VERSION: u32 = 1;

const VERSION_FILE: &str = "VERSION";
pub(super) const BLOBS: &str = "blobs";
pub(super) const TMP: &str = "tmp";

fn version_line() -> String {
    format!("hindsight-blobs {FORMAT_VERSION}\n")
}

/// A content-addressed store rooted at a directory.
#[derive(Clone, Debug)]
pub struct BlobStore {
    pub(super) root: PathBuf,
    /// Blobs whose content was checked, with the file's identity when it was.
    pub(super) verified: Arc<Mutex<HashMap<Digest, (FileStamp, Instant)>>>,
}

/// What identifies a file's content without reading it: any write changes the ctime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    ctime_ns: i128,
}

impl FileStamp {
    pub(super) fn of(meta: &fs::Metadata) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            Self {
                dev: meta.dev(),
                ino: meta.ino(),
                size: meta.len(),
                ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            }
        }
        #[cfg(not(unix))]
        {
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i128);
            Self {
                dev: 0,
                ino: 0,
                size: meta.len(),
                ctime_ns: modified,
            }
        }
    }
}

pub(super) fn io_err(context: impl FnOnce() -> String) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::io(context(), e)
}

/// Fsyncs a directory so that a rename or creation inside it is durable.
pub(super) fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err(|| format!("syncing directory {}", path.display())))
}

impl BlobStore {
    /// Opens the store at `root`, creating it if it does not exist. Refuses a store written in
    /// another format.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for dir in [root.clone(), root.join(BLOBS), root.join(TMP)] {
            fs::create_dir_all(&dir)
                .map_err(io_err(|| format!("creating directory {}", dir.display())))?;
        }
        let version = root.join(VERSION_FILE);
        match fs::read_to_string(&version) {
            Ok(found) => {
                if found != version_line() {
                    return Err(Error::StoreFormat {
                        path: version.display().to_string(),
                        found: found.trim().to_owned(),
                        supported: FORMAT_VERSION,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Written like a blob: temporary file, fsync, rename, fsync the directory.
                let mut tmp = tempfile::NamedTempFile::new_in(root.join(TMP))
                    .map_err(io_err(|| format!("creating {}", version.display())))?;
                tmp.write_all(version_line().as_bytes())
                    .and_then(|_| tmp.as_file().sync_all())
                    .map_err(io_err(|| format!("writing {}", version.display())))?;
                tmp.persist(&version)
                    .map_err(|e| Error::io(format!("creating {}", version.display()), e.error))?;
                sync_dir(&root)?;
            }
            Err(e) => return Err(Error::io(format!("reading {}", version.display()), e)),
        }
        Ok(Self {
            root,
            verified: Arc::default(),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with this digest lives (whether or not it exists).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.root
            .join(BLOBS)
            .join(&hex[0..2])
            .join(&hex[2..4])
            .join(hex)
    }

    /// Whether a blob with this digest is present.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Size in bytes of a present blob.
    pub fn size(&self, digest: &Digest) -> Result<u64> {
        let path = self.path(digest);
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(Error::MissingBlob(digest.to_hex()))
            }
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }
}

pub(super) fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(|| format!("listing {}", dir.display())))?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}
