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
//!
//! Files:
//! - `layout`: [`BlobStore`] itself, opening (the `VERSION` check) and where a digest's blob
//!   lives.
//! - `write`: staging files, [`BlobWriter`] (hash while writing, publish by fsync and rename),
//!   removal, clean-up of orphaned staging files.
//! - `read`: opening and checking blobs ([`BlobStatus`], [`VerifiedReader`], the remembered
//!   checks behind [`BlobStore::check_intact`]), listing.
//! - `journal`: [`JournalRecord`], the lines of `journal.jsonl`.
//! - `digest`: [`Digest`] (BLAKE3, names blobs) and [`Checksum`] (XXH3-128, the index's fast
//!   re-check).
//! - `writeback`: early writeback and page-cache dropping for long writes (Linux).

mod digest;
mod journal;
mod layout;
mod read;
mod write;
mod writeback;

pub use digest::{Checksum, ChecksumHasher, Digest};
pub use journal::{Journal, JournalLineError, JournalRecord};
pub use layout::{BlobStore, FORMAT_VERSION};
pub use read::{BlobStatus, VerifiedReader, REVERIFY_AFTER};
pub use write::BlobWriter;
