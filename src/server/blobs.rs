//! Sending blobs (strong ETag = content digest, one `Range`, `If-None-Match`, `If-Range`)
//! and `HEAD /blobs/{digest}`.
//!
//! No byte of a damaged blob is sent as good. A whole-file download is hashed as it streams
//! and its last chunk is held back until the digest is confirmed: on a mismatch the
//! connection is cut before the last byte, so the client sees a short body (curl exits 18),
//! never a complete wrong one. A range, and `HEAD`, first check the whole blob
//! ([`crate::store::BlobStore::check_intact`]: once per blob while its file is unchanged).
//! Damage is logged and makes the blob unavailable (500) until it is replaced.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;

use super::error::{ApiError, ApiResult, ErrorBody, ErrorCode};
use super::state::AppState;
use crate::db::BlobState;
use crate::store::{BlobStatus, BlobStore, Digest};

fn etag_of(digest: &str) -> String {
    format!("\"{digest}\"")
}

/// Whether an `If-None-Match` value matches the ETag (`*` or any listed strong or weak tag).
fn none_match(value: &str, etag: &str) -> bool {
    value
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == etag || t.strip_prefix("W/") == Some(etag))
}

/// Bytes read from disk at a time for a response: a response holds about three chunks
/// (the one being read, the one held back until hashed, the one hyper is writing), however
/// large the file and however slowly the client reads.
const CHUNK_BYTES: usize = 64 << 10;

/// Streams the blob `digest_hex` as the response to a GET with `headers`: from disk in
/// [`CHUNK_BYTES`] chunks, so a response holds a few chunks (plus the kernel's socket
/// buffers) however large the blob and however slowly the client reads. `file_name` goes into
/// `Content-Disposition` (`attachment`) when given; `content_type` is the media type.
pub(super) async fn send_blob(
    state: &AppState,
    digest_hex: &str,
    file_name: Option<&str>,
    content_type: &'static str,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let digest: Digest = digest_hex.parse().map_err(ApiError::internal)?;
    let etag = etag_of(digest_hex);
    let etag_value = HeaderValue::from_str(&etag).map_err(ApiError::internal)?;
    if let Some(v) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        if none_match(v, &etag) {
            return Response::builder()
                .status(StatusCode::NOT_MODIFIED)
                .header(header::ETAG, etag_value)
                .body(Body::empty())
                .map_err(ApiError::internal);
        }
    }
    let path = state.data.store.path(&digest);
    if state.config.verify_reads && headers.contains_key(header::RANGE) {
        // A part cannot be checked against the digest: the whole blob is, first.
        check_intact(state, &digest).await?;
    }
    let mut file = tokio::fs::File::open(&path).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ApiError::internal(format!("blob {digest_hex} is missing from the store"))
        } else {
            ApiError::internal(format!("opening {}: {e}", path.display()))
        }
    })?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal(format!("reading {}: {e}", path.display())))?
        .len();
    // A Range applies unless If-Range names another version.
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.to_str().ok() == Some(etag.as_str()));
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(value) if if_range_ok => match http_range_header::parse_range_header(value) {
            // A syntactically invalid Range is ignored (RFC 9110 §14.2).
            Err(_) => None,
            Ok(parsed) => match satisfiable(&parsed, len) {
                Some(ranges) if ranges.len() == 1 => Some(ranges[0].clone()),
                // Several disjoint ranges: the whole file, which RFC 9110 allows.
                Some(_) => None,
                None => {
                    let mut response: Response = ApiError::new(
                        ErrorCode::RangeNotSatisfiable,
                        format!("{value} is outside the {len}-byte file"),
                    )
                    .into_response_with_range(len);
                    response.headers_mut().insert(header::ETAG, etag_value);
                    return Ok(response);
                }
            },
        },
        _ => None,
    };
    let mut builder = Response::builder()
        .header(header::ETAG, etag_value)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable");
    if let Some(name) = file_name {
        let disposition = format!("attachment; filename=\"{}\"", name.replace('"', "_"));
        builder = builder.header(header::CONTENT_DISPOSITION, disposition);
    }
    let response = match range {
        Some(r) => {
            use tokio::io::AsyncSeekExt;
            let (start, end) = (*r.start(), *r.end());
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(|e| ApiError::internal(format!("seeking {}: {e}", path.display())))?;
            builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
                .header(header::CONTENT_LENGTH, end - start + 1)
                .body(file_body(file, end - start + 1, None))
        }
        None => builder
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, len)
            .body(file_body(
                file,
                len,
                state
                    .config
                    .verify_reads
                    .then(|| (digest, state.data.store.clone())),
            )),
    };
    response.map_err(ApiError::internal)
}

/// The satisfiable ranges of a syntactically valid Range header over a `len`-byte file, sorted
/// with overlapping and adjacent ones merged (RFC 9110 §14.1.2): a suffix longer than the file
/// is the whole file, an end past the file is clamped, a range starting past the end is
/// unsatisfiable and left out. `None` when nothing is satisfiable
/// (416). A reversed range (`5-2`) makes the header invalid: an empty list (the whole
/// file).
fn satisfiable(
    parsed: &http_range_header::ParsedRanges,
    len: u64,
) -> Option<Vec<std::ops::RangeInclusive<u64>>> {
    use http_range_header::{EndPosition, StartPosition};
    // `last < first` makes the header invalid, hence ignored (RFC 9110 §14.1.1): the whole
    // file (an empty list here).
    if parsed.ranges.iter().any(
        |r| matches!((r.start, r.end), (StartPosition::Index(a), EndPosition::Index(b)) if a > b),
    ) {
        return Some(Vec::new());
    }
    let mut ranges: Vec<(u64, u64)> = parsed
        .ranges
        .iter()
        .filter_map(|r| {
            let (start, end) = match (r.start, r.end) {
                (StartPosition::FromLast(0), _) => return None,
                (StartPosition::FromLast(n), _) => (len.saturating_sub(n), len.checked_sub(1)?),
                (StartPosition::Index(a), EndPosition::LastByte) => (a, len.checked_sub(1)?),
                (StartPosition::Index(a), EndPosition::Index(b)) => (a, b.min(len.checked_sub(1)?)),
            };
            (start <= end && start < len).then_some((start, end))
        })
        .collect();
    if ranges.is_empty() {
        return None;
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    Some(merged.into_iter().map(|(a, b)| a..=b).collect())
}

impl ApiError {
    fn into_response_with_range(self, len: u64) -> Response {
        use axum::response::IntoResponse;
        let mut response = self.into_response();
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
            response.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        response
    }
}

/// Whether the store holds a blob (so clients can skip uploading it); `Content-Length` is its
/// size.
#[utoipa::path(head, path = "/blobs/{digest}", tag = "snapshots",
    params(("digest" = String, Path, description = "BLAKE3 digest, 64 hex digits")),
    responses(
        (status = 200, description = "Present; Content-Length is its size"),
        (status = 400, description = "Malformed digest", body = ErrorBody),
        (status = 404, description = "Not in the store"),
    ))]
pub(super) async fn head_blob(
    State(state): State<AppState>,
    Path(digest_hex): Path<String>,
) -> ApiResult<Response> {
    let digest: Digest = digest_hex
        .parse()
        .map_err(|e: crate::Error| ApiError::invalid(format!("digest: {e}")))?;
    let present = state.data.db.blob_state(&digest.to_hex()).await? == Some(BlobState::Valid)
        && state.data.store.contains(&digest);
    if !present {
        return Err(ApiError::not_found(format!("no blob {digest}")));
    }
    // A damaged copy is as good as none: the client uploads it again, which replaces it.
    if state.config.verify_reads && check_intact(&state, &digest).await.is_err() {
        return Err(ApiError::not_found(format!(
            "no intact blob {digest} (the stored copy is damaged; uploading it again repairs it)"
        )));
    }
    let size = state.data.store.size(&digest)?;
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_LENGTH, size)
        .header(header::ETAG, etag_of(&digest.to_hex()))
        .body(Body::empty())
        .map_err(ApiError::internal)
}

/// Checks the whole blob before a part of it is sent: 500 (logged) when it is damaged or
/// missing.
async fn check_intact(state: &AppState, digest: &Digest) -> ApiResult<()> {
    if state.data.store.known_intact(digest) {
        return Ok(());
    }
    let checksum = state
        .data
        .db
        .blob_checksums(&[digest.to_hex()])
        .await?
        .pop()
        .flatten()
        .and_then(|c| c.parse::<crate::store::Checksum>().ok());
    let (store, d) = (state.data.store.clone(), *digest);
    let status = crate::error::blocking("checking a blob", move || {
        store.check_intact(&d, checksum.as_ref())
    })
    .await?;
    match status {
        BlobStatus::Intact => Ok(()),
        BlobStatus::Missing => Err(ApiError::internal(format!(
            "blob {digest} is missing from the store"
        ))),
        BlobStatus::Corrupt { actual } => Err(ApiError::internal(format!(
            "blob {digest} is damaged (its content hashes to {actual}); nothing was sent; \
             `hindsight verify` lists it"
        ))),
    }
}

/// A whole-file body that is hashed as it streams, holding each chunk back until the next
/// one is read, so that the last chunk goes out only once the digest is confirmed.
struct Checked {
    chunks: tokio_util::io::ReaderStream<tokio::io::Take<tokio::fs::File>>,
    held: Option<Bytes>,
    hasher: blake3::Hasher,
    expected: Digest,
    store: BlobStore,
    done: bool,
}

/// Makes a streamed body from a file region. With `verify` (the expected digest), a
/// whole-file read is checked as in [`Checked`]: on a mismatch the stream ends with an
/// error before the last chunk, so the client sees a truncated response, not wrong bytes,
/// and the store forgets that the blob was ever found intact.
fn file_body(file: tokio::fs::File, len: u64, verify: Option<(Digest, BlobStore)>) -> Body {
    use tokio::io::AsyncReadExt;
    let chunks = tokio_util::io::ReaderStream::with_capacity(file.take(len), CHUNK_BYTES);
    let Some((expected, store)) = verify else {
        return Body::from_stream(chunks);
    };
    let state = Checked {
        chunks,
        held: None,
        hasher: blake3::Hasher::new(),
        expected,
        store,
        done: false,
    };
    Body::from_stream(futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            match s.chunks.next().await {
                Some(Ok(chunk)) => {
                    s.hasher.update(&chunk);
                    if let Some(previous) = s.held.replace(chunk) {
                        return Some((Ok(previous), s));
                    }
                }
                Some(Err(e)) => {
                    s.done = true;
                    return Some((Err(e), s));
                }
                None => {
                    s.done = true;
                    let actual = Digest::from(s.hasher.finalize());
                    if actual == s.expected {
                        return s.held.take().map(|last| (Ok(last), s));
                    }
                    s.store.forget_verified(&s.expected);
                    tracing::error!(
                        digest = %s.expected,
                        actual = %actual,
                        "a stored blob is damaged; its download was cut off before the last \
                         byte (`hindsight verify` lists it)"
                    );
                    return Some((Err(std::io::Error::other("stored blob is damaged")), s));
                }
            }
        }
    }))
}
