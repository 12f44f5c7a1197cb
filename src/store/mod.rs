//! Content-addressed blob store: bytes and digests only (no SQL, no safetensors).
//!
//! Layout under the store's root:
//!
//! ```text
//! VERSION                      "hindsight-blobs 1": the on-disk format
//! blobs/ab/cd/abcd…(64 hex)    one file per blob, fanned out by the digest's first two bytes
//! tmp/                         writes in progress, on the same file system as blobs/
//! journal.jsonl                append-only records the index can be rebuilt from
//! ```
//!
//! Invariants:
//! - A path under `blobs/` never names a partial file. Writes go to a temporary file in `tmp/`,
//!   are hashed while written, fsynced, then renamed to the digest's path, and the directory
//!   is fsynced; a crash at any point leaves at most an orphan in `tmp/`, which
//!   [`BlobStore::clean_temp`] removes.
//! - Identical content is stored once: a finished write whose digest is already present just
//!   drops its temporary file. Two writers of the same content race harmlessly (rename over an
//!   identical file).
//! - Blobs are immutable once published. [`BlobStore::verify`] re-hashes them;
//!   [`VerifiedReader`] hashes while reading and fails at the end of a blob whose content no
//!   longer matches, so whole-blob reads check integrity for the cost of one BLAKE3 pass
//!   (several GB/s per core), cheap enough to leave on.
//! - Partial reads (HTTP ranges) and reuse without reading (a cached reconstruction, a hard
//!   link) go through [`BlobStore::check_intact`]: a full read that checks the content, then
//!   remembered against the file's identity and change time (`st_ino`, `st_size`, `st_ctime`;
//!   any write to the file changes its ctime, which nobody can set back) for at most
//!   [`REVERIFY_AFTER`].
//! - Every staging file is locked (`flock`) by its writer while it is open, so recovery tells
//!   a live writer's file from a crashed one's without guessing from ages.
//!
//! Which blobs are still wanted is the index's business (`db`); the store only removes what
//! it is told to.

mod digest;
mod writeback;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub use digest::{Checksum, ChecksumHasher, Digest};

use crate::error::{Error, Result};

/// The on-disk format this version reads and writes.
pub const FORMAT_VERSION: u32 = 1;

const VERSION_FILE: &str = "VERSION";
const BLOBS: &str = "blobs";
const TMP: &str = "tmp";
const JOURNAL: &str = "journal.jsonl";

fn version_line() -> String {
    format!("hindsight-blobs {FORMAT_VERSION}\n")
}

/// How long a successful [`BlobStore::check_intact`] is trusted while the file is unchanged;
/// after that, the next check reads the blob again (damage below the file system, which
/// leaves the ctime alone, is found within this time even without a full download).
pub const REVERIFY_AFTER: Duration = Duration::from_secs(6 * 3600);

/// A content-addressed store rooted at a directory.
#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
    /// Blobs whose content was checked, with the file's identity when it was.
    verified: Arc<Mutex<HashMap<Digest, (FileStamp, Instant)>>>,
}

/// What identifies a file's content without reading it: any write changes the ctime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> Self {
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
/// What [`BlobStore::verify`] found for one blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobStatus {
    /// The content hashes to the blob's name.
    Intact,
    /// No file under that digest.
    Missing,
    /// The content hashes to something else.
    Corrupt {
        /// What the content hashes to now.
        actual: Digest,
    },
}

fn io_err(context: impl FnOnce() -> String) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::io(context(), e)
}

/// Fsyncs a directory so that a rename or creation inside it is durable.
fn sync_dir(path: &Path) -> Result<()> {
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

    /// Opens a blob for reading, without checking its content.
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.path(digest);
        File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::MissingBlob(digest.to_hex())
            } else {
                Error::io(format!("opening {}", path.display()), e)
            }
        })
    }

    /// Opens a blob for a whole, sequential read that checks its content: the reader fails at
    /// the end of the blob if the bytes read do not hash to `digest`.
    pub fn open_verified(&self, digest: &Digest) -> Result<VerifiedReader<BufReader<File>>> {
        let file = self.open_blob(digest)?;
        Ok(VerifiedReader::new(
            BufReader::with_capacity(1 << 20, file),
            *digest,
        ))
    }

    /// Re-hashes one blob.
    pub fn verify(&self, digest: &Digest) -> Result<BlobStatus> {
        Ok(self.rehash(digest, None)?.0)
    }

    /// Re-hashes one blob and computes its [`Checksum`] in the same read (the checksum is
    /// `None` unless the blob is intact).
    pub fn verify_with_checksum(&self, digest: &Digest) -> Result<(BlobStatus, Option<Checksum>)> {
        self.rehash(digest, Some(ChecksumHasher::new()))
    }

    /// Whether the blob's content is what it should be, for handing it out without reading
    /// it (a cached result, a hard link, a byte range): a full read the first time, checked
    /// against `checksum` (XXH3-128, fast) when the index recorded one, else against the
    /// BLAKE3 digest; then trusted while the file keeps its identity and ctime, for at most
    /// [`REVERIFY_AFTER`]. A damaged or missing blob is forgotten, so it is read again next
    /// time. Blocking (a full read): call it off the async workers.
    pub fn check_intact(&self, digest: &Digest, checksum: Option<&Checksum>) -> Result<BlobStatus> {
        let path = self.path(digest);
        let stamp = match fs::metadata(&path) {
            Ok(m) => FileStamp::of(&m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget_verified(digest);
                return Ok(BlobStatus::Missing);
            }
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        if let Some((known, at)) = self.verified.lock().expect("verified").get(digest) {
            if *known == stamp && at.elapsed() < REVERIFY_AFTER {
                return Ok(BlobStatus::Intact);
            }
        }
        let status = match checksum {
            Some(expected) => {
                let file = self.open_blob(digest)?;
                let mut hasher = ChecksumHasher::new();
                let mut reader = BufReader::with_capacity(1 << 20, file);
                loop {
                    let buf = reader
                        .fill_buf()
                        .map_err(io_err(|| format!("reading {}", path.display())))?;
                    if buf.is_empty() {
                        break;
                    }
                    hasher.update(buf);
                    let n = buf.len();
                    reader.consume(n);
                }
                if hasher.finish() == *expected {
                    BlobStatus::Intact
                } else {
                    // Name what it hashes to now (the slower hash, once, for the report).
                    self.verify(digest)?
                }
            }
            None => self.verify(digest)?,
        };
        if status == BlobStatus::Intact {
            self.verified
                .lock()
                .expect("verified")
                .insert(*digest, (stamp, Instant::now()));
        } else {
            self.forget_verified(digest);
        }
        Ok(status)
    }

    /// Whether [`check_intact`](Self::check_intact) would answer `Intact` without reading:
    /// the blob was found intact, the file is unchanged since, and that was less than
    /// [`REVERIFY_AFTER`] ago. One `stat`.
    pub fn known_intact(&self, digest: &Digest) -> bool {
        let Ok(meta) = fs::metadata(self.path(digest)) else {
            return false;
        };
        let stamp = FileStamp::of(&meta);
        self.verified
            .lock()
            .expect("verified")
            .get(digest)
            .is_some_and(|(known, at)| *known == stamp && at.elapsed() < REVERIFY_AFTER)
    }

    /// Records that the blob's file, as it is now, holds the right content (its writer hashed
    /// every byte it published).
    fn remember_intact(&self, digest: &Digest) {
        if let Ok(meta) = fs::metadata(self.path(digest)) {
            self.verified
                .lock()
                .expect("verified")
                .insert(*digest, (FileStamp::of(&meta), Instant::now()));
        }
    }

    /// Drops what [`check_intact`](Self::check_intact) remembered about a blob (after a read
    /// found it damaged).
    pub fn forget_verified(&self, digest: &Digest) {
        self.verified.lock().expect("verified").remove(digest);
    }

    /// Reads a blob whole, hashing it and, when given one, feeding `checksum` too.
    fn rehash(
        &self,
        digest: &Digest,
        mut checksum: Option<ChecksumHasher>,
    ) -> Result<(BlobStatus, Option<Checksum>)> {
        let file = match self.open_blob(digest) {
            Ok(f) => f,
            Err(Error::MissingBlob(_)) => return Ok((BlobStatus::Missing, None)),
            Err(e) => return Err(e),
        };
        let mut hasher = blake3::Hasher::new();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        loop {
            let buf = reader.fill_buf().map_err(io_err(|| {
                format!("reading {}", self.path(digest).display())
            }))?;
            if buf.is_empty() {
                break;
            }
            hasher.update(buf);
            if let Some(c) = checksum.as_mut() {
                c.update(buf);
            }
            let n = buf.len();
            reader.consume(n);
        }
        let actual = Digest::from(hasher.finalize());
        Ok(if actual == *digest {
            (BlobStatus::Intact, checksum.map(|c| c.finish()))
        } else {
            (BlobStatus::Corrupt { actual }, None)
        })
    }

    /// Every blob present, in digest order. Files under `blobs/` whose names are not digests
    /// (or sit in the wrong fan-out directory) are ignored.
    pub fn list(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        let blobs = self.root.join(BLOBS);
        for a in read_dir_sorted(&blobs)?.into_iter().filter(|p| p.is_dir()) {
            for b in read_dir_sorted(&a)?.into_iter().filter(|p| p.is_dir()) {
                for f in read_dir_sorted(&b)? {
                    let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    if let Ok(d) = name.parse::<Digest>() {
                        if self.path(&d) == f {
                            out.push(d);
                        }
                    }
                }
            }
        }
        out.sort();
        Ok(out)
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

    /// Files under `blobs/` that are named like blobs but that `known` does not list, last
    /// modified at least `age` ago: blobs published by a writer that died before the index
    /// recorded them (or whose index row is gone). For `gc`, which removes them.
    pub fn unindexed(
        &self,
        known: &std::collections::HashSet<String>,
        age: Duration,
    ) -> Result<Vec<Digest>> {
        let now = SystemTime::now();
        let mut out = Vec::new();
        for digest in self.list()? {
            if known.contains(&digest.to_hex()) {
                continue;
            }
            let old_enough = fs::metadata(self.path(&digest))
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() >= age)
                .unwrap_or(false);
            if old_enough {
                out.push(digest);
            }
        }
        Ok(out)
    }

    /// Appends one line (a JSON record, no newline inside) to the store's journal and makes it
    /// durable: one `write` of the whole line on a file opened for appending (so lines of
    /// concurrent writers do not interleave), then `fdatasync`. The journal is what
    /// `rebuild-index` replays when the index is lost; the index stays the authority.
    pub fn append_journal(&self, line: &str) -> Result<()> {
        let path = self.root.join(JOURNAL);
        let mut record = line.replace('\n', " ");
        record.push('\n');
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(|| format!("opening {}", path.display())))?;
        file.write_all(record.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(io_err(|| format!("appending to {}", path.display())))
    }

    /// The journal's complete lines, oldest first (a line cut short by a crash is left out).
    pub fn journal(&self) -> Result<Vec<String>> {
        let path = self.root.join(JOURNAL);
        let text = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        Ok(String::from_utf8_lossy(&text[..complete])
            .lines()
            .map(str::to_owned)
            .collect())
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

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
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

/// Reads a blob while hashing it; the read that reaches the end fails with
/// `io::ErrorKind::InvalidData` if the content does not match the expected digest.
pub struct VerifiedReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    expected: Digest,
    done: bool,
}

impl<R: Read> VerifiedReader<R> {
    /// Wraps `inner`, which must yield the whole blob from its start.
    pub fn new(inner: R, expected: Digest) -> Self {
        Self {
            inner,
            hasher: blake3::Hasher::new(),
            expected,
            done: false,
        }
    }
}

impl<R: Read> Read for VerifiedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let actual = Digest::from(self.hasher.finalize());
            if actual != self.expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    Error::Corrupt {
                        expected: self.expected.to_hex(),
                        actual: format!("its content hashes to {actual}"),
                    },
                ));
            }
            self.done = true;
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
