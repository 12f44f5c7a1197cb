//! Reading the inputs: each snapshot blob at explicit offsets, tensor by tensor, hashing as it
//! goes when its tensors are read in file order (else it is verified by [`Cursor::verify_all`]
//! before the pass), so that a damaged input fails the reconstruction before anything is
//! published.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};
use crate::store::{Checksum, ChecksumHasher, Digest};

/// How an input's bytes are checked as they are read.
pub(super) enum Check {
    /// Against its recorded XXH3-128 checksum.
    Checksum(Box<ChecksumHasher>, Checksum),
    /// Against its BLAKE3 digest (no checksum recorded).
    Digest(Box<blake3::Hasher>),
}

/// One input being read: an open blob, where the next read starts, and the running hash
/// (which covers the file's first `hashed` bytes).
pub(super) struct Cursor {
    pub(super) file: File,
    pub(super) digest: Digest,
    pub(super) pos: u64,
    pub(super) hashed: u64,
    pub(super) check: Option<Check>,
}

/// Bytes read at a time by [`Cursor::verify_all`].
const VERIFY_CHUNK: usize = 1 << 20;

impl Cursor {
    /// A cursor at the start of `file`, checking against `check` (if any) as it reads.
    pub(super) fn new(file: File, digest: Digest, check: Option<Check>) -> Self {
        Self {
            file,
            digest,
            pos: 0,
            hashed: 0,
            check,
        }
    }

    /// The next read starts at byte `pos` of the file.
    pub(super) fn seek(&mut self, pos: u64) {
        self.pos = pos;
    }

    /// Reads the whole file front to back and checks it, leaving a cursor that no longer
    /// checks (for inputs whose tensors are not read in file order).
    pub(super) fn verify_all(mut self) -> Result<Self> {
        let mut buf = vec![0u8; VERIFY_CHUNK];
        let len = self.len()?;
        self.seek(0);
        while self.pos < len {
            let n = ((len - self.pos) as usize).min(VERIFY_CHUNK);
            self.read(&mut buf[..n])?;
        }
        let (file, digest) = (self.file.try_clone(), self.digest);
        self.finish()?;
        let file = file.map_err(|e| Error::io(format!("reading blob {digest}"), e))?;
        Ok(Cursor::new(file, digest, None))
    }

    fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| Error::io(format!("reading blob {}", self.digest), e))?
            .len())
    }

    /// Reads `buf.len()` bytes at the current position. A checking cursor must read in file
    /// order (the pass only checks inputs it reads that way); empty reads never matter.
    pub(super) fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.file.read_exact_at(buf, self.pos).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Corrupt {
                    expected: self.digest.to_hex(),
                    actual: "it is shorter than its header says".into(),
                }
            } else {
                Error::io(format!("reading blob {}", self.digest), e)
            }
        })?;
        // Inputs are checked in the pass only when it reads them in file order.
        debug_assert!(self.check.is_none() || self.pos == self.hashed);
        self.pos += buf.len() as u64;
        match self.check.as_mut() {
            Some(Check::Checksum(h, _)) => h.update(buf),
            Some(Check::Digest(h)) => {
                h.update(buf);
            }
            None => {}
        }
        if self.check.is_some() {
            self.hashed = self.pos;
        }
        Ok(())
    }

    /// Checks the checksum or digest of everything read, after reading whatever follows the
    /// last tensor.
    pub(super) fn finish(mut self) -> Result<()> {
        if self.check.is_none() {
            return Ok(());
        }
        let len = self.len()?;
        if len > self.hashed {
            self.seek(self.hashed);
            let mut rest = vec![0u8; (len - self.hashed) as usize];
            self.read(&mut rest)?;
        }
        match self.check {
            Some(Check::Checksum(h, expected)) => {
                let actual = h.finish();
                if actual != expected {
                    return Err(Error::Corrupt {
                        expected: self.digest.to_hex(),
                        actual: format!(
                            "its content changed (checksum {actual} where {expected} was \
                             recorded); `hindsight verify` lists it, and storing the same \
                             snapshot again repairs it"
                        ),
                    });
                }
            }
            Some(Check::Digest(h)) => {
                let actual = Digest::from(h.finalize());
                if actual != self.digest {
                    return Err(Error::Corrupt {
                        expected: self.digest.to_hex(),
                        actual: format!("its content hashes to {actual}"),
                    });
                }
            }
            None => {}
        }
        Ok(())
    }
}
