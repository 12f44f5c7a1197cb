//! Ingesting one safetensors file or stream: validate, decide (nimg, width) (`resolve`), copy
//! into the store while hashing (and optionally scanning for NaN/Inf, `finite`), then record
//! it in the index and the store's journal.
//!
//! Order of operations, so that a rejected file leaves nothing behind and GC can never
//! remove a blob an ingest is about to reference:
//! 1. header validation, width/time resolution, and read-only checks against the index
//!    (manifest, an existing different snapshot at the same time and width) — before any byte
//!    is copied;
//! 2. streaming copy into a temporary blob, hashing (and scanning) as it goes; any failure
//!    drops the temporary file;
//! 3. `claim_blob` (row `pending`), then publication (rename, or dedupe against the same
//!    content already present), then `record_snapshot` (row inserted, blob `valid`) in one
//!    transaction that re-checks the manifest and conflicts. If that transaction refuses
//!    the snapshot (a concurrent ingest took the slot, the manifest changed) or fails, the
//!    claim is released and the blob removed unless something else holds it.
//!
//! Two widths are one slot when they agree to [`crate::db::SLOT_TOLERANCE`] (relative): the same
//! σ_rel given as `gamma`, or off by a rounding, is the same snapshot, never a second row.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use serde::Serialize;

use super::finite::FiniteScanner;
use super::resolve::{resolve_profile, resolve_time_and_width, Hints};
use super::run::RunForIngest;
use super::same::same_tensors;
use crate::db::{same_width, Db, ManifestEntry, NewSnapshot, Recorded, Run};
use crate::error::{blocking, Error, Result};
use crate::format::{read_header, Header, TensorEntry};
use crate::store::{BlobStore, BlobWriter, Digest, JournalRecord};

/// Options for [`ingest_file`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IngestOptions {
    /// Refuse files whose floating-point tensors hold NaN or ±Inf.
    pub check_finite: bool,
}

/// What an ingest did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ingested {
    /// Training time in images.
    pub nimg: u64,
    /// EMA width.
    pub sigma_rel: f64,
    /// Digest of the stored file.
    pub digest: Digest,
    /// File size.
    pub bytes: u64,
    /// False when the same snapshot was already stored (idempotent re-import).
    pub inserted: bool,
}

fn manifest_of(tensors: &[TensorEntry]) -> Vec<ManifestEntry> {
    let mut m: Vec<ManifestEntry> = tensors
        .iter()
        .map(|t| ManifestEntry {
            name: t.name.clone(),
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
        })
        .collect();
    m.sort_by(|a, b| a.name.cmp(&b.name));
    m
}

/// Ingests the safetensors file at `path` into `run`. `progress` is called with the number of
/// bytes copied since its previous call. The file I/O, hashing and fsync run on tokio's
/// blocking pool, so several ingests may run at once (one file's fsync then overlaps the next
/// file's copy).
pub async fn ingest_file(
    db: &Db,
    store: &BlobStore,
    run: &Run,
    path: &Path,
    hints: Hints,
    options: IngestOptions,
    progress: impl FnMut(u64) + Send + 'static,
) -> Result<Ingested> {
    let source = path.display().to_string();
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    ingest_path(
        db, store, run, path, source, file_name, hints, options, progress,
    )
    .await
}

/// [`ingest_file`] of a safetensors file converted from another format into a staging file
/// (`staged`): messages name `source`, the file the user gave (an EDM2 pickle, an
/// ema-pytorch checkpoint), never the staging file; time and width come from `hints` only.
pub async fn ingest_converted(
    db: &Db,
    store: &BlobStore,
    run: &Run,
    staged: &Path,
    source: String,
    hints: Hints,
    options: IngestOptions,
) -> Result<Ingested> {
    ingest_path(
        db,
        store,
        run,
        staged,
        source,
        String::new(),
        hints,
        options,
        |_| {},
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn ingest_path(
    db: &Db,
    store: &BlobStore,
    run: &Run,
    path: &Path,
    source: String,
    file_name: String,
    hints: Hints,
    options: IngestOptions,
    progress: impl FnMut(u64) + Send + 'static,
) -> Result<Ingested> {
    let (file, len) = {
        let path = path.to_owned();
        let source = source.clone();
        blocking("opening a snapshot file", move || {
            let file = File::open(&path).map_err(|e| Error::io(format!("opening {source}"), e))?;
            let len = file
                .metadata()
                .map_err(|e| Error::io(format!("reading {source}"), e))?
                .len();
            Ok((file, len))
        })
        .await?
    };
    let reader = BufReader::with_capacity(1 << 20, file);
    ingest_reader(
        db,
        store,
        &RunForIngest::existing(run.clone()),
        Incoming {
            reader,
            len,
            source,
            file_name,
        },
        hints,
        options,
        progress,
    )
    .await
}
/// A safetensors file arriving as a byte stream (a file, an HTTP upload).
pub struct Incoming<R> {
    /// The bytes, from the first.
    pub reader: R,
    /// How many there are (the file size, an upload's `Content-Length`); a stream that ends
    /// early or runs on is refused.
    pub len: u64,
    /// Names the stream in messages.
    pub source: String,
    /// A file name to read an EDM2-style time and width from (may be empty).
    pub file_name: String,
}

/// Reads `bytes` into `buf` and keeps a copy: the header is parsed from the stream itself and
/// its bytes still go into the blob.
struct Recording<'a, R> {
    inner: &'a mut R,
    kept: Vec<u8>,
}

impl<R: Read> Read for Recording<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.kept.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Ingests a safetensors file from a stream, hashing as the bytes arrive: the header is read
/// and validated first, the read-only checks against the index run before the rest of the
/// stream is consumed, and nothing is published unless the whole stream arrived intact.
pub async fn ingest_reader<R: Read + Send + 'static>(
    db: &Db,
    store: &BlobStore,
    target: &RunForIngest,
    incoming: Incoming<R>,
    hints: Hints,
    options: IngestOptions,
    progress: impl FnMut(u64) + Send + 'static,
) -> Result<Ingested> {
    let Incoming {
        mut reader,
        len,
        source,
        file_name,
    } = incoming;
    let (header, prefix, reader) = {
        let source = source.clone();
        blocking("reading a snapshot's header", move || {
            let mut recording = Recording {
                inner: &mut reader,
                kept: Vec::new(),
            };
            let header = read_header(&mut recording, len, &source).map_err(incomplete_if_cut)?;
            let prefix = recording.kept;
            Ok((header, prefix, reader))
        })
        .await?
    };
    if header.tensors.is_empty() {
        return Err(Error::invalid(
            source,
            "holds no tensors (only metadata): a snapshot must hold the model's tensors",
        ));
    }
    let (nimg, width) = resolve_time_and_width(&header, &hints, &file_name, &source)?;
    let (sigma_rel, gamma) = width.resolve(&source)?;
    let profile = resolve_profile(&header, hints.profile, &source)?;
    if let Some(p) = &profile {
        // Refused now, not at the first reconstruction.
        p.realise(nimg, Some(gamma), &source)?;
    }
    let manifest = manifest_of(&header.tensors);

    // Read-only checks before copying anything (a run that does not exist yet has no
    // manifest).
    let expected = match target.get() {
        Some(run) => db.manifest(run.id).await?,
        None => Vec::new(),
    };
    if !expected.is_empty() {
        let diff = crate::db::manifest_differences(&expected, &manifest);
        if !diff.is_empty() {
            return Err(Error::invalid(
                source,
                format!(
                    "tensors differ from run {:?}'s manifest: {}",
                    target.name(),
                    crate::db::describe_differences(&diff)
                ),
            ));
        }
    }

    // Copy into a temporary blob, hashing (and optionally scanning) as we go.
    let mut writer = {
        let store = store.clone();
        let header = header.clone();
        let source = source.clone();
        blocking("copying a snapshot into the store", move || {
            copy_into_store(
                &store, reader, &prefix, &header, len, options, &source, progress,
            )
        })
        .await?
    };
    let digest = writer.digest_so_far();
    let checksum = writer.checksum_so_far().to_hex();
    let bytes = writer.len();

    // Existing snapshot at the same time and width: the same file, or other bytes holding the
    // same tensors (another writer's metadata or layout), is a no-op; other tensors are a
    // conflict. Checked before publishing so that a conflict leaves nothing behind.
    if let Some(run) = target.get() {
        let stored = db
            .snapshots(run.id)
            .await?
            .into_iter()
            .find(|s| s.nimg as u64 == nimg && same_width(s.sigma_rel, sigma_rel));
        if let Some(s) = stored.filter(|s| s.digest != digest.to_hex()) {
            let staged = writer.reopen_written()?;
            let same = {
                let store = store.clone();
                let header = header.clone();
                let source = source.clone();
                let stored_digest = s.digest.clone();
                blocking("comparing a snapshot with the stored one", move || {
                    same_tensors_as_stored(&store, &stored_digest, staged, &header, &source)
                })
                .await?
            };
            if !same {
                return Err(Error::Conflict(format!(
                    "{source}: run {:?} already has a different snapshot at nimg {nimg} \
                     sigma_rel {} (digest {}); delete it first to replace it",
                    run.name, s.sigma_rel, s.digest
                )));
            }
            let stored_profile = s.profile.clone();
            let profile_json = profile
                .as_ref()
                .map(|p| serde_json::to_value(p).expect("profiles serialise"));
            if stored_profile != profile_json {
                return Err(Error::Conflict(format!(
                    "{source}: run {:?} already has these tensors at nimg {nimg} sigma_rel {} \
                     with another update rule ({}); this file says {}",
                    run.name,
                    s.sigma_rel,
                    stored_profile.map_or("EDM2's".to_owned(), |p| p.to_string()),
                    profile_json.map_or("EDM2's".to_owned(), |p| p.to_string()),
                )));
            }
            // The staged copy is dropped with `writer`: nothing new is stored.
            return Ok(Ingested {
                nimg,
                sigma_rel: s.sigma_rel,
                digest: s
                    .digest
                    .parse::<Digest>()
                    .map_err(|_| Error::Index(format!("snapshot {}: bad digest", s.id)))?,
                bytes: s.byte_size as u64,
                inserted: false,
            });
        }
    }

    let run = target.run(db).await?;
    db.claim_blob(&digest.to_hex(), bytes, Some(&checksum))
        .await?;
    let published = blocking("publishing a snapshot", move || writer.finish()).await;
    if let Err(e) = published {
        release_claim(db, store, &digest).await;
        return Err(e);
    }
    let dtypes = dtype_summary(&header.tensors);
    let profile_json = profile
        .as_ref()
        .map(|p| serde_json::to_value(p).expect("profiles serialise"));
    let recorded = db
        .record_snapshot(
            run.id,
            &NewSnapshot {
                nimg,
                sigma_rel,
                gamma,
                digest: digest.to_hex(),
                byte_size: bytes,
                manifest,
                dtypes,
                metadata: serde_json::to_value(&header.metadata).expect("strings serialise"),
                profile: profile_json,
            },
        )
        .await;
    let recorded = match recorded {
        Ok(r) => r,
        Err(e) => {
            release_claim(db, store, &digest).await;
            return Err(e);
        }
    };
    if recorded == Recorded::Inserted {
        journal_snapshot(
            store,
            &JournalRecord::Snapshot {
                run: run.name.clone(),
                digest,
                nimg,
                sigma_rel,
                gamma,
                profile,
            },
        );
    }
    Ok(Ingested {
        nimg,
        sigma_rel,
        digest,
        bytes,
        inserted: recorded == Recorded::Inserted,
    })
}

/// Records a new snapshot in the store's journal (what `rebuild-index` replays). A failure
/// is logged: the index, already committed, is the authority.
/// Whether the staged upload (`staged`, described by `header`) holds the same tensors as the
/// stored blob `stored_digest`. Errors: reading either (a missing or unreadable stored blob
/// is an error, not "different").
fn same_tensors_as_stored(
    store: &BlobStore,
    stored_digest: &str,
    mut staged: File,
    header: &Header,
    source: &str,
) -> Result<bool> {
    let digest = stored_digest
        .parse::<Digest>()
        .map_err(|_| Error::Index(format!("a stored snapshot's digest {stored_digest:?}")))?;
    let file = store.open_blob(&digest)?;
    let stored_len = file
        .metadata()
        .map_err(|e| Error::io(format!("reading blob {stored_digest}"), e))?
        .len();
    let mut stored = BufReader::new(file);
    let stored_source = format!("stored snapshot {stored_digest}");
    let stored_header = read_header(&mut stored, stored_len, &stored_source)?;
    same_tensors(
        &stored_header,
        &mut stored,
        &stored_source,
        header,
        &mut staged,
        source,
    )
}

fn journal_snapshot(store: &BlobStore, record: &JournalRecord) {
    if let Err(e) = store.append_journal(record) {
        tracing::warn!(error = %e.chain_text(), "appending a snapshot to the store's journal");
    }
}

/// Gives back the claim of an ingest that stored nothing, removing the blob when nothing else
/// holds it. A failure here is logged, not returned: the ingest's own error is what the caller
/// needs, and start-up recovery retries abandoned claims.
async fn release_claim(db: &Db, store: &BlobStore, digest: &Digest) {
    let file_store = store.clone();
    let d = *digest;
    if let Err(e) = db
        .release_claim(&digest.to_hex(), move || file_store.remove(&d).map(|_| ()))
        .await
    {
        tracing::warn!(digest = %digest, error = %e.chain_text(), "releasing a refused ingest's claim");
    }
}

/// The error a stream's reader returns (wrapped in an `std::io::Error`) when the bytes stop
/// arriving for good: a client that went away mid-upload. Ingest turns it into
/// [`Error::Incomplete`], which is the sender's to fix, rather than a storage failure.
#[derive(Debug, thiserror::Error)]
#[error("the upload was cut short: {0}")]
pub struct CutShort(pub String);

impl CutShort {
    /// Wraps an error of the underlying transport as an `std::io::Error` carrying `CutShort`.
    pub fn io_error(cause: impl std::fmt::Display) -> std::io::Error {
        std::io::Error::other(CutShort(cause.to_string()))
    }
}

/// The `CutShort` inside a read error, if that is what it is.
fn cut_short(e: &std::io::Error) -> Option<&CutShort> {
    e.get_ref()?.downcast_ref::<CutShort>()
}

/// A read error that is a cut-off stream becomes [`Error::Incomplete`]; others pass.
fn incomplete_if_cut(e: Error) -> Error {
    match e {
        Error::Io { context, source } => match cut_short(&source) {
            Some(cut) => Error::Incomplete {
                source_name: context,
                reason: cut.to_string(),
            },
            None => Error::Io { context, source },
        },
        other => other,
    }
}

/// Streams the whole file (`prefix`, already read, then the rest of `reader`) into an
/// unpublished blob, scanning floats when asked.
#[allow(clippy::too_many_arguments)]
fn copy_into_store(
    store: &BlobStore,
    mut reader: impl Read,
    prefix: &[u8],
    header: &Header,
    file_len: u64,
    options: IngestOptions,
    source: &str,
    mut progress: impl FnMut(u64),
) -> Result<BlobWriter> {
    let mut writer = store.writer()?.with_streaming_writeback();
    let mut scanner = options.check_finite.then(|| FiniteScanner::new(header));
    if let Some(s) = scanner.as_mut() {
        s.feed(prefix)
            .map_err(|reason| Error::invalid(source, reason))?;
    }
    writer
        .write_all(prefix)
        .map_err(|e| Error::io(format!("copying {source} into the store"), e))?;
    progress(prefix.len() as u64);
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = prefix.len() as u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| incomplete_if_cut(Error::io(format!("reading {source}"), e)))?;
        if n == 0 {
            break;
        }
        if let Some(s) = scanner.as_mut() {
            s.feed(&buf[..n])
                .map_err(|reason| Error::invalid(source, reason))?;
        }
        writer
            .write_all(&buf[..n])
            .map_err(|e| Error::io(format!("copying {source} into the store"), e))?;
        copied += n as u64;
        progress(n as u64);
    }
    if copied != file_len {
        return Err(Error::Incomplete {
            source_name: source.to_owned(),
            reason: format!(
                "expected {file_len} bytes but read {copied} (the file changed while it was \
                 read, or the upload was cut short)"
            ),
        });
    }
    Ok(writer)
}

fn dtype_summary(tensors: &[TensorEntry]) -> serde_json::Value {
    let mut counts = std::collections::BTreeMap::<&str, u64>::new();
    for t in tensors {
        *counts.entry(t.dtype.as_str()).or_default() += t.shape.iter().product::<u64>();
    }
    serde_json::to_value(counts).expect("counts serialise")
}
