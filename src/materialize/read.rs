//! Reading the inputs: each snapshot blob front to back at an explicit offset, hashing as it
//! goes, so that a damaged input fails the reconstruction before anything is published.

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

/// One input being read: an open blob, where the next read starts, and the running hash.
pub(super) struct Cursor {
    pub(super) file: File,
    pub(super) digest: Digest,
    pub(super) pos: u64,
    pub(super) check: Option<Check>,
}

impl Cursor {
    pub(super) fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, self.pos).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Corrupt {
                    expected: self.digest.to_hex(),
                    actual: "(the blob is shorter than its header says)".into(),
                }
            } else {
                Error::io(format!("reading blob {}", self.digest), e)
            }
        })?;
        self.pos += buf.len() as u64;
        match self.check.as_mut() {
            Some(Check::Checksum(h, _)) => h.update(buf),
            Some(Check::Digest(h)) => {
                h.update(buf);
            }
            None => {}
        }
        Ok(())
    }

    /// Checks the checksum or digest of everything read, after reading whatever follows the
    /// last tensor.
    pub(super) fn finish(mut self) -> Result<()> {
        if self.check.is_none() {
            return Ok(());
        }
        let len = self
            .file
            .metadata()
            .map_err(|e| Error::io(format!("reading blob {}", self.digest), e))?
            .len();
        if len > self.pos {
            let mut rest = vec![0u8; (len - self.pos) as usize];
            self.read(&mut rest)?;
        }
        match self.check {
            Some(Check::Checksum(h, expected)) => {
                let actual = h.finish();
                if actual != expected {
                    return Err(Error::Corrupt {
                        expected: self.digest.to_hex(),
                        actual: format!(
                            "(content changed: checksum {actual}, recorded {expected})"
                        ),
                    });
                }
            }
            Some(Check::Digest(h)) => {
                let actual = Digest::from(h.finalize());
                if actual != self.digest {
                    return Err(Error::Corrupt {
                        expected: self.digest.to_hex(),
                        actual: actual.to_hex(),
                    });
                }
            }
            None => {}
        }
        Ok(())
    }
}
