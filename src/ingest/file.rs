//! Ingesting one safetensors file: validate, decide (nimg, width), copy into the store while
//! hashing (and optionally scanning for NaN/Inf), then record it in the index.
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

use super::run::RunForIngest;
use crate::db::{same_width, Db, ManifestEntry, NewSnapshot, Recorded, Run};
use crate::error::{blocking, Error, Result};
use crate::format::{read_header, Header, TensorEntry};
use crate::phema::{RealisedProfile, Width};
use crate::store::{BlobStore, Digest};

/// Where a file's training time and EMA width come from: explicit values, the safetensors
/// `__metadata__` (`nimg`, and `sigma_rel` or `gamma`), then an EDM2 file name
/// (`<prefix>-<kimg:07d>-<sigma:.3f>.safetensors`). An explicit value and the metadata that
/// disagree are refused (the same file cannot be two snapshots). Likewise the EMA's update rule
/// when it is not EDM2's: explicit, else `__metadata__.profile` (JSON, see
/// [`RealisedProfile`]), else EDM2's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hints {
    /// Training time in images.
    pub nimg: Option<u64>,
    /// EMA width.
    pub width: Option<Width>,
    /// The EMA's update rule.
    pub profile: Option<RealisedProfile>,
}

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

/// EDM2's mapping from the kimg in a file name back to nimg (`reconstruct_phema.py`): the
/// largest multiple of 1024 images whose thousands are `kimg`.
pub fn kimg_to_nimg(kimg: u64) -> Option<u64> {
    let nimg = (kimg.checked_mul(1000)?.checked_add(999)?) / 1024 * 1024;
    (nimg / 1000 == kimg).then_some(nimg)
}

/// Parses an EDM2 snapshot file name, `<prefix>-<kimg>-<sigma>.safetensors` (or `.pkl`):
/// returns `(nimg, sigma_rel)`.
pub fn parse_edm2_name(file_name: &str) -> Option<(u64, f64)> {
    let stem = file_name
        .strip_suffix(".safetensors")
        .or_else(|| file_name.strip_suffix(".pkl"))?;
    let (rest, sigma) = stem.rsplit_once('-')?;
    let (prefix, kimg) = rest.rsplit_once('-')?;
    if prefix.is_empty() || kimg.is_empty() || !kimg.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (int, frac) = sigma.split_once('.')?;
    if int.is_empty()
        || frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((kimg_to_nimg(kimg.parse().ok()?)?, sigma.parse().ok()?))
}

fn resolve_time_and_width(
    header: &Header,
    hints: &Hints,
    file_name: &str,
    source: &str,
) -> Result<(u64, Width)> {
    let meta = &header.metadata;
    let parse = |key: &str| -> Result<Option<f64>> {
        match meta.get(key) {
            None => Ok(None),
            Some(v) => v.trim().parse::<f64>().map(Some).map_err(|_| {
                Error::invalid(
                    format!("{source}: __metadata__.{key}"),
                    format!("`{v}` is not a number"),
                )
            }),
        }
    };
    let from_name = parse_edm2_name(file_name);
    let nimg = match (hints.nimg, meta.get("nimg")) {
        (Some(n), Some(v)) if v.trim().parse::<u64>().ok() != Some(n) => {
            return Err(Error::invalid(
                "nimg",
                format!(
                    "{n} was given, but the file's __metadata__ says nimg {v}: give the time \
                     only one way, or the same"
                ),
            ))
        }
        (Some(n), _) => Some(n),
        (None, Some(v)) => Some(v.trim().parse::<u64>().map_err(|_| {
            Error::invalid(
                format!("{source}: __metadata__.nimg"),
                format!("`{v}` is not a whole number of images"),
            )
        })?),
        (None, None) => from_name.map(|(n, _)| n),
    };
    if let Some(given) = hints.width {
        let said = match (parse("sigma_rel")?, parse("gamma")?) {
            (Some(s), _) => Some(Width::SigmaRel(s)),
            (None, Some(g)) => Some(Width::Gamma(g)),
            (None, None) => None,
        };
        if let Some(said) = said {
            let field = format!("{source}: __metadata__");
            let (a, b) = (given.resolve("width")?.0, said.resolve(&field)?.0);
            if !crate::db::same_width(a, b) {
                return Err(Error::invalid(
                    if matches!(given, Width::Gamma(_)) {
                        "gamma"
                    } else {
                        "sigma_rel"
                    },
                    format!(
                        "sigma_rel {a} was given, but the file's __metadata__ says sigma_rel \
                         {b}: give the width only one way, or the same"
                    ),
                ));
            }
        }
    }
    let width = match hints.width {
        Some(w) => Some(w),
        None => match (parse("sigma_rel")?, parse("gamma")?) {
            (Some(s), None) => Some(Width::SigmaRel(s)),
            (None, Some(g)) => Some(Width::Gamma(g)),
            // Both (as reconstructions and trackers write them): they must name one width.
            (Some(s), Some(g)) => {
                let expected = crate::phema::sigma_rel_to_gamma(
                    s,
                    &format!("{source}: __metadata__.sigma_rel"),
                )?;
                if (expected - g).abs() > 1e-6 * expected.abs().max(1.0) {
                    return Err(Error::invalid(
                        format!("{source}: __metadata__"),
                        format!(
                            "sigma_rel {s} and gamma {g} disagree (sigma_rel {s} is gamma \
                             {expected}); give one"
                        ),
                    ));
                }
                Some(Width::SigmaRel(s))
            }
            (None, None) => from_name.map(|(_, s)| Width::SigmaRel(s)),
        },
    };
    match (nimg, width) {
        (Some(n), Some(w)) => {
            crate::phema::check_nimg(n, &format!("{source}: nimg"))?;
            // An EDM2 file name that says otherwise (to its own precision: whole kimg,
            // σ_rel to 3 decimals) means the file is not what its name claims.
            if let Some((name_nimg, name_sigma)) = from_name {
                let sigma = w.resolve(&format!("{source}: sigma_rel"))?.0;
                let kimg_off = (n as f64 / 1000.0 - name_nimg as f64 / 1000.0).abs() >= 1.0;
                if kimg_off || (sigma - name_sigma).abs() > 0.0005 + 1e-12 {
                    return Err(Error::invalid(
                        "filename",
                        format!(
                            "{file_name:?} says nimg {name_nimg} and sigma_rel {name_sigma}, \
                             but the snapshot is at nimg {n} and sigma_rel {sigma}: rename the \
                             file or give the time and width only one way"
                        ),
                    ));
                }
            }
            Ok((n, w))
        }
        _ => Err(Error::invalid(
            source,
            "cannot tell the snapshot's training time and EMA width: name the file EDM2's way \
             (<prefix>-<kimg:07d>-<sigma:.3f>.safetensors) or put nimg and sigma_rel (or gamma) \
             in its __metadata__",
        )),
    }
}

/// The update rule: `explicit`, else the JSON in `__metadata__.profile`, else EDM2's (`None`).
fn resolve_profile(
    header: &Header,
    explicit: Option<RealisedProfile>,
    source: &str,
) -> Result<Option<RealisedProfile>> {
    if explicit.is_some() {
        return Ok(explicit);
    }
    match header.metadata.get("profile") {
        None => Ok(None),
        Some(text) => serde_json::from_str(text).map(Some).map_err(|e| {
            Error::invalid(
                format!("{source}: __metadata__.profile"),
                format!("not an update rule ({e})"),
            )
        }),
    }
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

/// The (nimg, σ_rel) slot the safetensors file at `path` would be stored at, from its
/// `__metadata__` or EDM2 name; `None` when that cannot be told (its ingest will say why).
/// Directory imports use it to order files that claim the same slot.
pub(super) fn slot_of(path: &Path) -> Option<(u64, u64)> {
    let file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let source = path.display().to_string();
    let header = read_header(&mut BufReader::new(file), len, &source).ok()?;
    let file_name = path.file_name()?.to_str()?;
    let (nimg, width) =
        resolve_time_and_width(&header, &Hints::default(), file_name, &source).ok()?;
    let (sigma_rel, _) = width.resolve(&source).ok()?;
    Some((nimg, sigma_rel.to_bits()))
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
    let writer = {
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

    // Existing snapshot at the same time and width: same content is a no-op, other content a
    // conflict. Checked before publishing so that a conflict leaves nothing behind.
    if let Some(run) = target.get() {
        for s in db.snapshots(run.id).await? {
            if s.nimg as u64 == nimg
                && same_width(s.sigma_rel, sigma_rel)
                && s.digest != digest.to_hex()
            {
                return Err(Error::Conflict(format!(
                    "{source}: run {:?} already has a different snapshot at nimg {nimg} \
                     sigma_rel {} (digest {}); delete it first to replace it",
                    run.name, s.sigma_rel, s.digest
                )));
            }
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
    let journal_profile = profile.map(|p| serde_json::to_value(p).expect("profiles serialise"));
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
                profile: journal_profile.clone(),
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
            &run.name,
            &digest,
            nimg,
            sigma_rel,
            gamma,
            &journal_profile,
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
fn journal_snapshot(
    store: &BlobStore,
    run: &str,
    digest: &Digest,
    nimg: u64,
    sigma_rel: f64,
    gamma: f64,
    profile: &Option<serde_json::Value>,
) {
    let line = serde_json::json!({
        "op": "snapshot", "run": run, "digest": digest.to_hex(), "nimg": nimg,
        "sigma_rel": sigma_rel, "gamma": gamma, "profile": profile,
    });
    if let Err(e) = store.append_journal(&line.to_string()) {
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
) -> Result<crate::store::BlobWriter> {
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

/// Scans floating-point tensors for NaN/Inf as the file streams by.
struct FiniteScanner {
    /// (start, end, element size, dtype, name) of float tensors, in file order, absolute.
    spans: Vec<(u64, u64, usize, String, String)>,
    next: usize,
    pos: u64,
    /// Bytes of a partial element carried over from the previous chunk.
    carry: Vec<u8>,
    /// Whole elements of the current tensor already checked.
    checked: u64,
}

impl FiniteScanner {
    fn new(header: &Header) -> Self {
        let base = header.data_start();
        let spans = header
            .tensors
            .iter()
            .filter(|t| t.is_float())
            .map(|t| {
                let size = match t.dtype.as_str() {
                    "F64" => 8,
                    "F32" => 4,
                    _ => 2,
                };
                let start = base + t.offset;
                (start, start + t.len, size, t.dtype.clone(), t.name.clone())
            })
            .collect();
        Self {
            spans,
            next: 0,
            pos: 0,
            carry: Vec::new(),
            checked: 0,
        }
    }

    fn feed(&mut self, chunk: &[u8]) -> std::result::Result<(), String> {
        let chunk_start = self.pos;
        self.pos += chunk.len() as u64;
        while let Some((start, end, size, dtype, name)) = self.spans.get(self.next) {
            if *start >= self.pos {
                break;
            }
            let from = (*start).max(chunk_start);
            let to = (*end).min(self.pos);
            if from < to {
                self.carry.extend_from_slice(
                    &chunk[(from - chunk_start) as usize..(to - chunk_start) as usize],
                );
                let whole = self.carry.len() / size * size;
                if let Some(i) = first_non_finite(&self.carry[..whole], *size, dtype) {
                    return Err(format!(
                        "tensor {name} holds a non-finite value (element {}); refused by \
                         --check-finite",
                        self.checked + i as u64
                    ));
                }
                self.checked += (whole / size) as u64;
                self.carry.drain(..whole);
            }
            if *end > self.pos {
                break;
            }
            self.next += 1;
            self.carry.clear();
            self.checked = 0;
        }
        Ok(())
    }
}

fn first_non_finite(bytes: &[u8], size: usize, dtype: &str) -> Option<usize> {
    bytes.chunks_exact(size).position(|e| match dtype {
        "F64" => !f64::from_le_bytes(e.try_into().expect("8 bytes")).is_finite(),
        "F32" => !f32::from_le_bytes(e.try_into().expect("4 bytes")).is_finite(),
        // F16: exponent bits 10..15 all ones; BF16: bits 7..15 all ones.
        "F16" => u16::from_le_bytes([e[0], e[1]]) & 0x7c00 == 0x7c00,
        _ => u16::from_le_bytes([e[0], e[1]]) & 0x7f80 == 0x7f80,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edm2_names() {
        assert_eq!(
            parse_edm2_name("phema-0008388-0.050.safetensors"),
            Some((8388608, 0.05))
        );
        assert_eq!(
            parse_edm2_name("edm2-img512-xs-2147483-0.100.pkl"),
            Some((2147483648, 0.1))
        );
        for bad in [
            "phema-0008192.safetensors",
            "-0008192-0.050.safetensors",
            "phema-8x92-0.050.safetensors",
            "phema-0008192-0.05x.safetensors",
            "phema-0008192-0.050.bin",
            "phema-0008192-.050.safetensors",
        ] {
            assert_eq!(parse_edm2_name(bad), None, "{bad}");
        }
        // EDM2's kimg→nimg rounds to whole batches of 1024 images.
        assert_eq!(kimg_to_nimg(8388), Some(8388608));
        assert_eq!(kimg_to_nimg(8192), Some(8192000));
        assert_eq!(kimg_to_nimg(1), Some(1024));
        assert_eq!(kimg_to_nimg(0), Some(0));
    }

    #[test]
    fn non_finite_values_are_found_across_chunk_boundaries() {
        let header = Header {
            header_len: 0,
            tensors: vec![
                TensorEntry {
                    name: "a".into(),
                    dtype: "F16".into(),
                    shape: vec![3],
                    offset: 0,
                    len: 6,
                },
                TensorEntry {
                    name: "b".into(),
                    dtype: "F32".into(),
                    shape: vec![3],
                    offset: 6,
                    len: 12,
                },
            ],
            metadata: Default::default(),
            data_len: 18,
        };
        let mut data = vec![0u8; 8]; // the 8-byte length prefix (header_len 0)
        data.extend_from_slice(&[0x00, 0x3c, 0x00, 0x3c, 0x00, 0x3c]); // f16 ones
        for v in [1.0f32, f32::NAN, 2.0] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        for chunk in [1, 3, 5, 7, 64] {
            let mut s = FiniteScanner::new(&header);
            let err = data.chunks(chunk).try_for_each(|c| s.feed(c)).unwrap_err();
            assert!(
                err.contains("tensor b") && err.contains("element 1"),
                "{chunk}: {err}"
            );
        }
        data[18..22].copy_from_slice(&3.0f32.to_le_bytes());
        let mut s = FiniteScanner::new(&header);
        assert!(data.chunks(3).try_for_each(|c| s.feed(c)).is_ok());
        // f16 infinity in tensor a.
        data[10..12].copy_from_slice(&[0x00, 0x7c]);
        let mut s = FiniteScanner::new(&header);
        let err = s.feed(&data).unwrap_err();
        assert!(
            err.contains("tensor a") && err.contains("element 1"),
            "{err}"
        );
    }
}
