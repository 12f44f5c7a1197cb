//! Writing: staging files, [`BlobWriter`] (hash while writing, then publish by fsync and
//! rename), removal, and the clean-up of staging files whose writers are gone.
//!
//! A blob path never names a partial file: bytes go to a locked staging file in `tmp/`, and
//! [`BlobWriter::finish`] makes them durable before the rename that publishes them. The
//! index's claim on a digest (`db`'s `pending` row) comes before `finish` and its record
//! after; that order is the ingest's, the store only provides the steps.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::digest::{Checksum, ChecksumHasher, Digest};
use super::layout::{io_err, read_dir_sorted, sync_dir, BlobStore, TMP};
use super::read::BlobStatus;
use super::writeback;
use crate::error::{Error, Result};

impl BlobStore {
    /// Starts writing a new blob. Nothing is visible until [`BlobWriter::finish`]; dropping the
    /// writer discards what was written.
    pub fn writer(&self) -> Result<BlobWriter> {
        let tmp = self.staging_file("blob-", "")?;
        Ok(BlobWriter {
            store: self.clone(),
            file: io::BufWriter::with_capacity(1 << 20, tmp),
            hasher: blake3::Hasher::new(),
            checksum: ChecksumHasher::new(),
            len: 0,
            writeback: None,
        })
    }

    /// A scratch file in the store's staging directory (same file system as the blobs, so a
    /// file staged here can be moved or hard-linked in without a copy), named
    /// `<prefix>…<suffix>`. It is deleted when dropped; one left behind by a crash is an
    /// orphan that [`BlobStore::clean_temp`] removes. Nobody else builds paths under `tmp/`.
    /// The file is locked (`flock`, exclusive) for as long as it is open, which tells
    /// [`BlobStore::clean_temp`] that its writer is alive.
    pub fn staging_file(&self, prefix: &str, suffix: &str) -> Result<tempfile::NamedTempFile> {
        let dir = self.root.join(TMP);
        let file = tempfile::Builder::new()
            .prefix(prefix)
            .suffix(suffix)
            .tempfile_in(&dir)
            .map_err(io_err(|| format!("creating a file in {}", dir.display())))?;
        file.as_file()
            .try_lock()
            .map_err(|e| Error::io(format!("locking {}", file.path().display()), e.into()))?;
        Ok(file)
    }

    /// Stores everything `reader` yields; returns the digest and the size.
    pub fn put(&self, mut reader: impl Read) -> Result<(Digest, u64)> {
        let mut writer = self.writer()?;
        io::copy(&mut reader, &mut writer).map_err(io_err(|| "copying into the store".into()))?;
        writer.finish()
    }

    /// Removes a blob; returns whether it was there.
    pub fn remove(&self, digest: &Digest) -> Result<bool> {
        let path = self.path(digest);
        self.forget_verified(digest);
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(parent) = path.parent() {
                    sync_dir(parent)?;
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }

    /// Removes staging files left by writers that are gone: files no live writer holds
    /// locked (see [`staging_file`](Self::staging_file)) and last modified at least `age`
    /// ago (`age` covers the instant between a file's creation and its lock, and writers of
    /// older versions that did not lock). Returns how many were removed.
    pub fn clean_temp(&self, age: Duration) -> Result<usize> {
        let now = SystemTime::now();
        let mut removed = 0;
        for path in read_dir_sorted(&self.root.join(TMP))? {
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
            };
            let modified = meta
                .modified()
                .map_err(io_err(|| format!("reading {}", path.display())))?;
            if now.duration_since(modified).unwrap_or_default() < age || !meta.is_file() {
                continue;
            }
            if held_by_a_writer(&path)? {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("removing {}", path.display()), e)),
            }
        }
        Ok(removed)
    }

    /// Temporary files present now (writes in progress or orphans).
    pub fn temp_files(&self) -> Result<Vec<PathBuf>> {
        read_dir_sorted(&self.root.join(TMP))
    }
}

/// Whether a live writer holds the staging file at `path` locked.
fn held_by_a_writer(path: &Path) -> Result<bool> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
    };
    match file.try_lock() {
        Ok(()) => Ok(false),
        Err(fs::TryLockError::WouldBlock) => Ok(true),
        Err(fs::TryLockError::Error(e)) => Err(Error::io(format!("locking {}", path.display()), e)),
    }
}

/// A blob being written: hashes as it writes; published by [`BlobWriter::finish`].
pub struct BlobWriter {
    store: BlobStore,
    file: io::BufWriter<tempfile::NamedTempFile>,
    hasher: blake3::Hasher,
    checksum: ChecksumHasher,
    len: u64,
    writeback: Option<Writeback>,
}

/// Early-writeback state of a [`BlobWriter`].
#[derive(Clone, Copy)]
struct Writeback {
    /// Start of the range whose writeback was started last.
    previous: u64,
    /// Its end: the next range starts here.
    started: u64,
    /// Whether ranges are waited for and dropped from the page cache once written back.
    drop_cached: bool,
}

/// Bytes written between early-writeback starts.
const EARLY_WRITEBACK_BYTES: u64 = 16 << 20;

impl BlobWriter {
    /// Starts writing the blob back to disk every 16 MiB as it is written, so that the disk
    /// works while the blob is produced and the fsync in [`finish`](Self::finish) only waits
    /// for the tail (Linux would otherwise hold the data back until dirty memory reaches its
    /// background threshold, gigabytes on big machines). The blob stays in the page cache,
    /// for a reader who wants it next. Durability still comes from `finish`.
    pub fn with_early_writeback(mut self) -> Self {
        self.writeback = Some(Writeback {
            previous: 0,
            started: 0,
            drop_cached: false,
        });
        self
    }

    /// Early writeback as in [`with_early_writeback`](Self::with_early_writeback), and each
    /// 16 MiB range, once written back, is waited for and dropped from the page cache. For
    /// bulk ingest: a multi-gigabyte import streams to disk at the disk's pace in a few
    /// dozen MiB of memory instead of evicting the rest of the page cache.
    pub fn with_streaming_writeback(mut self) -> Self {
        self.writeback = Some(Writeback {
            previous: 0,
            started: 0,
            drop_cached: true,
        });
        self
    }

    fn maybe_start_writeback(&mut self) {
        let Some(w) = self.writeback else {
            return;
        };
        if self.len - w.started < EARLY_WRITEBACK_BYTES || self.file.flush().is_err() {
            return;
        }
        let file = self.file.get_ref().as_file();
        writeback::start(file, w.started, self.len - w.started);
        if w.drop_cached && w.started > w.previous {
            writeback::wait_and_drop(file, w.previous, w.started - w.previous);
        }
        self.writeback = Some(Writeback {
            previous: w.started,
            started: self.len,
            drop_cached: w.drop_cached,
        });
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A new handle on what was written so far, for reading it back before publishing
    /// (the writer keeps writing through its own handle).
    ///
    /// Errors: flushing the buffered bytes or reopening the staging file.
    pub fn reopen_written(&mut self) -> Result<File> {
        self.file
            .flush()
            .map_err(|e| Error::io("flushing a new blob", e))?;
        self.file
            .get_ref()
            .reopen()
            .map_err(|e| Error::io("reopening a new blob", e))
    }

    /// The digest of what was written so far.
    pub fn digest_so_far(&self) -> Digest {
        Digest::from(self.hasher.finalize())
    }

    /// The [`Checksum`] of what was written so far.
    pub fn checksum_so_far(&self) -> Checksum {
        self.checksum.finish()
    }

    /// Makes the blob durable and visible under its digest: fsync, rename, fsync the directory.
    /// If the store already has this content, the new copy is dropped instead.
    pub fn finish(self) -> Result<(Digest, u64)> {
        let digest = Digest::from(self.hasher.finalize());
        let len = self.len;
        let tmp = self
            .file
            .into_inner()
            .map_err(|e| Error::io("flushing a new blob", e.into_error()))?;
        let path = self.store.path(&digest);
        if fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == len)
            && matches!(self.store.verify(&digest), Ok(BlobStatus::Intact))
        {
            // Dedupe: identical content is already published (checked, not assumed: one read
            // of the present copy). The temporary file goes away. A present file of another
            // size or other content is damaged, and the rename below replaces it atomically
            // with the good copy.
            drop(tmp);
            self.store.remember_intact(&digest);
            return Ok((digest, len));
        }
        // Published blobs are read-only: a hard link handed out by `hindsight reconstruct`
        // cannot be edited in place by accident (replacing the file is still possible).
        let mut permissions = tmp
            .as_file()
            .metadata()
            .map_err(io_err(|| "reading a new blob's permissions".into()))?
            .permissions();
        // Mode 0444 (what the README promises): the staging file was created 0600.
        #[cfg(unix)]
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o444);
        #[cfg(not(unix))]
        permissions.set_readonly(true);
        tmp.as_file()
            .set_permissions(permissions)
            .map_err(io_err(|| "making a new blob read-only".into()))?;
        tmp.as_file()
            .sync_all()
            .map_err(io_err(|| "syncing a new blob".into()))?;
        let parent = path.parent().expect("blob paths have parents");
        let created_dirs = !parent.is_dir();
        fs::create_dir_all(parent).map_err(io_err(|| format!("creating {}", parent.display())))?;
        tmp.persist(&path)
            .map_err(|e| Error::io(format!("publishing {}", path.display()), e.error))?;
        sync_dir(parent)?;
        if created_dirs {
            // The fan-out directories themselves must survive a crash too.
            if let Some(grand) = parent.parent() {
                sync_dir(grand)?;
                if let Some(blobs) = grand.parent() {
                    sync_dir(blobs)?;
                }
            }
        }
        self.store.remember_intact(&digest);
        Ok((digest, len))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.checksum.update(&buf[..n]);
        self.len += n as u64;
        self.maybe_start_writeback();
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}
