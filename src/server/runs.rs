//! Runs, their snapshots, and snapshot uploads.

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::{ApiError, ApiResult, ErrorBody, ErrorCode};
use super::state::AppState;
use super::views::{
    DeletedSnapshotView, IngestedView, ManifestEntryView, ReconstructionView, RunDetail,
    RunSummaryView, SnapshotView,
};
use crate::db::Run;
use crate::ingest::{ingest_reader, CutShort, Hints, Incoming, IngestOptions, RunForIngest};
use crate::phema::Width;
use crate::reconstruction::QualityReport;

/// Every run with its totals.
#[utoipa::path(get, path = "/runs", tag = "runs",
    responses((status = 200, description = "All runs, by name", body = [RunSummaryView])))]
pub(super) async fn list_runs(
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<RunSummaryView>>> {
    let runs = state.data.db.runs().await?;
    Ok(Json(runs.into_iter().map(RunSummaryView::from).collect()))
}

async fn run_named(state: &AppState, name: &str) -> ApiResult<Run> {
    state
        .data
        .db
        .run(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("run {name:?} does not exist")))
}

/// One run: manifest, totals, reconstructions.
#[utoipa::path(get, path = "/runs/{run}", tag = "runs",
    params(("run" = String, Path, description = "Run name")),
    responses(
        (status = 200, description = "The run", body = RunDetail),
        (status = 404, description = "No such run", body = ErrorBody),
    ))]
pub(super) async fn get_run(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<RunDetail>> {
    let run = run_named(&state, &name).await?;
    let snapshots = state.data.db.snapshots(run.id).await?;
    let manifest = state.data.db.manifest(run.id).await?;
    let reconstructions = state
        .data
        .db
        .reconstructions(run.id)
        .await?
        .iter()
        .map(|r| ReconstructionView::ready(r, true))
        .collect();
    Ok(Json(RunDetail {
        snapshots: snapshots.len(),
        bytes: snapshots.iter().map(|s| s.byte_size as u64).sum(),
        last_nimg: snapshots.iter().map(|s| s.nimg).max(),
        run: run.into(),
        manifest: manifest.into_iter().map(ManifestEntryView::from).collect(),
        reconstructions,
    }))
}

/// A run's snapshots, by time and width.
#[utoipa::path(get, path = "/runs/{run}/snapshots", tag = "snapshots",
    params(("run" = String, Path, description = "Run name")),
    responses(
        (status = 200, description = "The snapshots", body = [SnapshotView]),
        (status = 404, description = "No such run", body = ErrorBody),
    ))]
pub(super) async fn list_snapshots(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<SnapshotView>>> {
    let run = run_named(&state, &name).await?;
    let rows = state.data.db.snapshots(run.id).await?;
    Ok(Json(rows.into_iter().map(SnapshotView::from).collect()))
}

/// Where an upload's time and width come from (query string, or `X-Hindsight-Nimg`,
/// `X-Hindsight-Sigma-Rel`, `X-Hindsight-Gamma` headers; else the file's `__metadata__` or an
/// EDM2 `filename`).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UploadParams {
    /// Training time in images.
    pub nimg: Option<u64>,
    /// EMA width as a relative standard deviation.
    pub sigma_rel: Option<f64>,
    /// EMA width as an exponent.
    pub gamma: Option<f64>,
    /// The original file name, parsed the EDM2 way (`<prefix>-<kimg:07d>-<sigma:.3f>.safetensors`).
    pub filename: Option<String>,
    /// Refuse files whose floating-point tensors hold NaN or ±Inf.
    #[serde(default)]
    pub check_finite: bool,
}

fn header_number<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> ApiResult<Option<T>> {
    if headers.get_all(name).iter().count() > 1 {
        return Err(ApiError::invalid(format!(
            "header {name}: given more than once; give it once"
        )));
    }
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| ApiError::invalid(format!("header {name}: not a number"))),
    }
}

impl UploadParams {
    /// The query string's parameters (all optional).
    fn from_uri(uri: &Uri) -> ApiResult<Self> {
        match uri.query() {
            None => Ok(UploadParams::default()),
            Some(_) => Ok(axum::extract::Query::<UploadParams>::try_from_uri(uri)
                .map_err(|e| ApiError::invalid(format!("query: {}", e.body_text())))?
                .0),
        }
    }

    /// Time and width from the query, else from the `X-Hindsight-*` headers.
    fn hints(&self, headers: &HeaderMap) -> ApiResult<Hints> {
        /// The query's value, else the header's; both given must agree.
        fn one<T: std::str::FromStr + PartialEq + std::fmt::Display + Copy>(
            query: Option<T>,
            headers: &HeaderMap,
            name: &str,
            field: &str,
        ) -> ApiResult<Option<T>> {
            let header = header_number::<T>(headers, name)?;
            match (query, header) {
                (Some(q), Some(h)) if q != h => Err(ApiError::invalid(format!(
                    "{field}: the query says {q}, header {name} says {h}; give it once"
                ))),
                (Some(q), _) => Ok(Some(q)),
                (None, h) => Ok(h),
            }
        }
        let nimg = one(self.nimg, headers, "x-hindsight-nimg", "nimg")?;
        let sigma_rel = one(
            self.sigma_rel,
            headers,
            "x-hindsight-sigma-rel",
            "sigma_rel",
        )?;
        let gamma = one(self.gamma, headers, "x-hindsight-gamma", "gamma")?;
        let width = match (sigma_rel, gamma) {
            (Some(s), None) => Some(Width::SigmaRel(s)),
            (None, Some(g)) => Some(Width::Gamma(g)),
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "give either sigma_rel or gamma, not both",
                ))
            }
        };
        Ok(Hints {
            nimg,
            width,
            profile: None,
        })
    }
}

/// The upload's `Content-Length`, required and within the server's limit.
fn upload_length(headers: &HeaderMap, limit: u64) -> ApiResult<u64> {
    let len: u64 = match headers.get(header::CONTENT_LENGTH) {
        None => {
            return Err(ApiError::new(
                ErrorCode::LengthRequired,
                "uploads need a Content-Length header",
            ))
        }
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ApiError::invalid("Content-Length is not a number"))?,
    };
    if len > limit {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("{len} bytes is more than this server's upload limit of {limit} bytes"),
        ));
    }
    Ok(len)
}

/// Upload one snapshot (a safetensors file, streamed as the body, `Content-Length`
/// required). It is validated and hashed as it arrives and checked against the run's manifest
/// exactly as `hindsight import` does; nothing is stored unless the whole file arrives. The
/// run is created on its first snapshot.
#[utoipa::path(post, path = "/runs/{run}/snapshots", tag = "snapshots",
    params(("run" = String, Path, description = "Run name"), UploadParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The safetensors file"),
    responses(
        (status = 201, description = "Stored", body = IngestedView),
        (status = 200, description = "The same snapshot was already stored", body = IngestedView),
        (status = 400, description = "Invalid file or parameters", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 409, description = "A different snapshot is stored at this time and width", body = ErrorBody),
        (status = 411, description = "No Content-Length", body = ErrorBody),
        (status = 413, description = "Larger than the server's upload limit", body = ErrorBody),
        (status = 408, description = "The upload stalled (nothing sent for the idle timeout); nothing was stored", body = ErrorBody),
        (status = 429, description = "This client has as many uploads in progress as it may (Retry-After)", body = ErrorBody),
        (status = 503, description = "No upload slot became free in time (Retry-After)", body = ErrorBody),
        (status = 507, description = "The server's disk is full; nothing was stored", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn upload_snapshot(
    State(state): State<AppState>,
    Path(name): Path<String>,
    uri: Uri,
    request: Request,
) -> ApiResult<Response> {
    let params = UploadParams::from_uri(&uri)?;
    let hints = params.hints(request.headers())?;
    let len = upload_length(request.headers(), state.config.max_upload_bytes)?;
    crate::db::check_run_name(&name)?;
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let _client = ClientUpload::enter(&state, peer)?;
    let _permit = match tokio::time::timeout(
        state.config.upload_queue_wait,
        state.uploads.clone().acquire_owned(),
    )
    .await
    {
        Ok(permit) => permit.map_err(ApiError::internal)?,
        Err(_) => {
            return Err(ApiError::new(
                ErrorCode::Busy,
                format!(
                    "every upload slot stayed busy for {} s; try again later",
                    state.config.upload_queue_wait.as_secs()
                ),
            )
            .retry_after(5))
        }
    };
    // A new run is created only when its first snapshot is recorded: an upload cut off or
    // refused before then leaves no empty run.
    let target = RunForIngest::lazy(&state.data.db, &name).await?;
    // A body that breaks off is the client's doing: ingest reports it as `Incomplete`. One
    // that stops arriving is dropped after the idle timeout (408).
    let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = idle_limited(
        request.into_body().into_data_stream(),
        state.config.upload_idle_timeout,
        state.config.upload_min_bytes_per_sec,
        stalled.clone(),
    );
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let ingested = ingest_reader(
        &state.data.db,
        &state.data.store,
        &target,
        Incoming {
            reader,
            len,
            source: "upload".into(),
            file_name: params.filename.clone().unwrap_or_default(),
        },
        hints,
        IngestOptions {
            check_finite: params.check_finite,
        },
        |_| {},
    )
    .await;
    if ingested.is_err() {
        // A run this upload created stays only if the upload stored something.
        let _ = target.abandon(&state.data.db).await;
    }
    if ingested.is_err() && stalled.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(peer = ?peer, run = %name, "upload stalled; dropped");
        return Err(ApiError::new(
            ErrorCode::RequestTimeout,
            format!(
                "the upload stalled (nothing for {} s, or under {} bytes/s on average) and was \
                 dropped; nothing was stored",
                state.config.upload_idle_timeout.as_secs(),
                state.config.upload_min_bytes_per_sec
            ),
        ));
    }
    let ingested = ingested?;
    let status = if ingested.inserted {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(IngestedView::from(ingested))).into_response())
}

/// An upload counted against its client's limit
/// ([`super::ServerConfig::max_uploads_per_client`]) until dropped.
struct ClientUpload {
    state: AppState,
    peer: Option<std::net::IpAddr>,
}

impl ClientUpload {
    /// Counts one more upload for `peer`, or 429 when it has as many as it may.
    fn enter(state: &AppState, peer: Option<std::net::IpAddr>) -> ApiResult<Self> {
        if let Some(ip) = peer {
            let mut counts = state.uploads_by_client.lock().expect("upload counts");
            let n = counts.entry(ip).or_default();
            if *n >= state.config.max_uploads_per_client.max(1) {
                return Err(ApiError::new(
                    ErrorCode::TooManyRequests,
                    format!(
                        "{ip} already has {n} upload(s) in progress, this server's limit per \
                         client; send the next when one finishes"
                    ),
                )
                .retry_after(2));
            }
            *n += 1;
        }
        Ok(Self {
            state: state.clone(),
            peer,
        })
    }
}

impl Drop for ClientUpload {
    fn drop(&mut self) {
        if let Some(ip) = self.peer {
            let mut counts = self.state.uploads_by_client.lock().expect("upload counts");
            if let Some(n) = counts.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&ip);
                }
            }
        }
    }
}

/// The body's chunks, as `std::io` results for ingest: a transport error is [`CutShort`];
/// no chunk within `idle`, or less than `min_rate` bytes per second on average once the
/// first `idle` has passed, ends the stream with one too (setting `stalled`).
fn idle_limited(
    body: axum::body::BodyDataStream,
    idle: std::time::Duration,
    min_rate: u64,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> impl futures_util::Stream<Item = std::io::Result<axum::body::Bytes>> + Send + Unpin {
    use futures_util::StreamExt;
    let start = tokio::time::Instant::now();
    let stall = move |stalled: &std::sync::atomic::AtomicBool, why: String| {
        stalled.store(true, std::sync::atomic::Ordering::Relaxed);
        Some((Err(CutShort::io_error(why)), None))
    };
    Box::pin(futures_util::stream::unfold(
        Some((body, 0u64)),
        move |state| {
            let stalled = stalled.clone();
            async move {
                let (mut body, received) = state?;
                match tokio::time::timeout(idle, body.next()).await {
                    Ok(Some(Ok(chunk))) => {
                        let received = received + chunk.len() as u64;
                        let elapsed = start.elapsed();
                        if min_rate > 0 && elapsed > idle {
                            let owed = min_rate as f64 * (elapsed - idle).as_secs_f64();
                            if (received as f64) < owed {
                                return stall(
                                    &stalled,
                                    format!(
                                        "{received} bytes in {:.0} s is below the minimum rate \
                                         of {min_rate} bytes/s",
                                        elapsed.as_secs_f64()
                                    ),
                                );
                            }
                        }
                        Some((Ok(chunk), Some((body, received))))
                    }
                    Ok(Some(Err(e))) => Some((Err(CutShort::io_error(e)), None)),
                    Ok(None) => None,
                    Err(_) => stall(&stalled, format!("no data for {} s", idle.as_secs_f64())),
                }
            }
        },
    ))
}

/// Delete one snapshot (by the `id` its listing gives). The row goes, and its file leaves
/// the store in the same transaction when nothing else refers to it. The run's stored
/// reconstructions stay (each is keyed by the snapshots it was computed from, so a request
/// after the delete computes anew). The way out of a run with a bad snapshot.
#[utoipa::path(delete, path = "/runs/{run}/snapshots/{id}", tag = "snapshots",
    params(("run" = String, Path, description = "Run name"),
           ("id" = i64, Path, description = "Snapshot id, from GET /runs/{run}/snapshots")),
    responses(
        (status = 200, description = "Deleted", body = DeletedSnapshotView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 404, description = "No such run or snapshot", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn delete_snapshot(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Json<DeletedSnapshotView>> {
    let id = snapshot_id(&id)?;
    let deleted = crate::app::delete_snapshot(&state.data, &name, id).await?;
    Ok(Json(DeletedSnapshotView {
        deleted: SnapshotView::from(deleted.snapshot),
        blob_removed: deleted.blob_removed,
    }))
}

/// Download one stored snapshot (by the `id` its listing gives): the safetensors file exactly
/// as stored, its strong `ETag` the content digest (BLAKE3, as `HEAD /blobs/{digest}`).
/// Supports `Range` (one range), `If-None-Match` and `If-Range`; the file name in
/// `Content-Disposition` is `<run>-snapshot-<nimg:010>-<sigma_rel:.3>.safetensors`.
#[utoipa::path(get, path = "/runs/{run}/snapshots/{id}/file", tag = "snapshots",
    params(("run" = String, Path, description = "Run name"),
           ("id" = i64, Path, description = "Snapshot id, from GET /runs/{run}/snapshots")),
    responses(
        (status = 200, description = "The whole file", content_type = "application/octet-stream"),
        (status = 206, description = "The requested range", content_type = "application/octet-stream"),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such run or snapshot", body = ErrorBody),
        (status = 416, description = "Range not satisfiable", body = ErrorBody),
    ))]
pub(super) async fn download_snapshot(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let id = snapshot_id(&id)?;
    let run = state.data.existing_run(&name).await?;
    let snapshot = state
        .data
        .db
        .snapshot(run.id, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("run {name:?} has no snapshot {id}")))?;
    let file_name = format!(
        "{}-snapshot-{:010}-{:.3}.safetensors",
        run.name, snapshot.nimg, snapshot.sigma_rel
    );
    super::blobs::send_blob(
        &state,
        &snapshot.digest,
        Some(&file_name),
        "application/octet-stream",
        &headers,
    )
    .await
}

/// A snapshot id from the path. Errors: 400 naming `id`.
fn snapshot_id(id: &str) -> ApiResult<i64> {
    id.parse()
        .map_err(|_| ApiError::invalid(format!("id: {id:?} is not a snapshot id (a whole number)")))
}

/// The target of a preview: one width (`sigma_rel` or `gamma`) and optionally a time.
#[derive(Debug, Deserialize, IntoParams)]
pub struct PreviewQuery {
    /// Target width as a relative standard deviation (give this or `gamma`).
    #[param(value_type = Option<f64>)]
    pub sigma_rel: Option<String>,
    /// Target width as a power-function exponent (give this or `sigma_rel`).
    #[param(value_type = Option<f64>)]
    pub gamma: Option<String>,
    /// Training time in images (default: the run's last snapshot).
    #[param(value_type = Option<u64>)]
    pub nimg: Option<String>,
}

impl PreviewQuery {
    fn targets(&self) -> ApiResult<Vec<crate::phema::request::TargetSpec>> {
        use crate::phema::request::TargetSpec;
        let number = |text: &str, field: &str| -> ApiResult<f64> {
            text.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| ApiError::invalid(format!("{field}: {text:?} is not a number")))
        };
        let nimg = match &self.nimg {
            None => None,
            Some(t) if t.trim().is_empty() => None,
            Some(t) => Some(t.trim().parse::<u64>().map_err(|_| {
                ApiError::invalid(format!("nimg: {t:?} is not a whole number of images"))
            })?),
        };
        // An empty field (an HTML form's blank input) is no field.
        let given = |v: &Option<String>| v.as_ref().filter(|t| !t.trim().is_empty()).cloned();
        let (sigma_rel, gamma) = (given(&self.sigma_rel), given(&self.gamma));
        let (sigma_rels, gammas) = match (&sigma_rel, &gamma) {
            (Some(s), None) => (vec![number(s, "sigma_rel")?], vec![]),
            (None, Some(g)) => (vec![], vec![number(g, "gamma")?]),
            _ => {
                return Err(ApiError::invalid(
                    "give exactly one of sigma_rel and gamma (one number)",
                ))
            }
        };
        Ok(TargetSpec::from_lists(&sigma_rels, &gammas, nimg))
    }

    async fn plan(&self, state: &AppState, run: &str) -> ApiResult<crate::reconstruction::Plan> {
        Ok(crate::reconstruction::plan(
            &state.data.db,
            run,
            self.targets()?,
            crate::materialize::OutDtype::F32,
        )
        .await?)
    }
}

/// The solver's quality report for one target, without reconstructing anything (a
/// millisecond solve): profile error, noise gain, condition number, the weighted snapshots
/// and warnings when the width is out of the snapshots' reach. The same report a
/// reconstruction stores (EDM2 §3, eq. 7's least-squares fit).
#[utoipa::path(get, path = "/runs/{run}/preview", tag = "runs",
    params(("run" = String, Path, description = "Run name"), PreviewQuery),
    responses(
        (status = 200, description = "The quality report", body = QualityReport),
        (status = 400, description = "Invalid target, naming the field", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
    ))]
pub(super) async fn preview(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<PreviewQuery>,
) -> ApiResult<Json<QualityReport>> {
    let plan = query.plan(&state, &name).await?;
    Ok(Json(crate::reconstruction::report(&plan, &plan.targets[0])))
}

/// The target's EMA profile beside the one the snapshots reconstruct (SVG), for the same
/// query as `/runs/{run}/preview`.
#[utoipa::path(get, path = "/runs/{run}/profiles.svg", tag = "runs",
    params(("run" = String, Path, description = "Run name"), PreviewQuery),
    responses(
        (status = 200, description = "SVG", content_type = "image/svg+xml", body = String),
        (status = 400, description = "Invalid target, naming the field", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
    ))]
pub(super) async fn profiles(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<PreviewQuery>,
) -> ApiResult<Response> {
    let plan = query.plan(&state, &name).await?;
    let (snapshots, realised) =
        crate::reconstruction::solve_request(&plan.snapshots)?.realised()?;
    let solutions: Vec<_> = plan.targets.iter().map(|t| t.solution.clone()).collect();
    let svg = crate::plot::profiles_svg(&snapshots, &realised, &solutions)?;
    Ok(super::ui::svg_response(svg))
}
