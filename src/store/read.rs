//! Reading: opening blobs, checking their content ([`BlobStore::verify`], the remembered
//! [`BlobStore::check_intact`], [`VerifiedReader`] for whole reads), and listing what is
//! present.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::time::{Duration, Instant, SystemTime};

use super::digest::{Checksum, ChecksumHasher, Digest};
use super::layout::{io_err, read_dir_sorted, BlobStore, FileStamp, BLOBS};
use crate::error::{Error, Result};

/// How long a successful [`BlobStore::check_intact`] is trusted while the file is unchanged;
/// after that, the next check reads the blob again (damage below the file system, which
/// leaves the ctime alone, is found within this time even without a full download).
pub const REVERIFY_AFTER: Duration = Duration::from_secs(6 * 3600);

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

impl BlobStore {
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
    pub(super) fn remember_intact(&self, digest: &Digest) {
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

    /// Files under `blobs/` that are named like blobs but that `known` does not list, last
    /// modified at least `age` ago: blobs published by a writer that died before the index
    /// recorded them (or whose index row is gone). For `gc`, which removes them.
    pub fn unindexed(&self, known: &HashSet<String>, age: Duration) -> Result<Vec<Digest>> {
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
