//! Runs, their snapshots, and snapshot uploads.

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ApiResult, ErrorBody};
use super::AppState;
use crate::db::{ManifestEntry, Run, RunSummary, SnapshotRow};
use crate::ingest::{ingest_reader, Hints, Incoming, IngestOptions, Ingested};
use crate::phema::Width;

/// A run with its manifest and stored reconstructions.
#[derive(Serialize, ToSchema)]
pub struct RunDetail {
    /// The run.
    pub run: Run,
    /// Number of snapshots.
    pub snapshots: usize,
    /// Total bytes of the snapshots.
    pub bytes: u64,
    /// Latest snapshot time (reconstructions default to it).
    pub last_nimg: Option<i64>,
    /// The tensors every snapshot has.
    pub manifest: Vec<ManifestEntry>,
    /// Reconstructions stored for this run, newest first.
    pub reconstructions: Vec<super::reconstruct::ReconstructionView>,
}

/// Every run with its totals.
#[utoipa::path(get, path = "/runs", tag = "runs",
    responses((status = 200, description = "All runs, by name", body = [RunSummary])))]
pub(super) async fn list_runs(State(state): State<AppState>) -> ApiResult<Json<Vec<RunSummary>>> {
    Ok(Json(state.data.db.runs().await?))
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
        .map(|r| super::reconstruct::ready_view(r, true))
        .collect();
    Ok(Json(RunDetail {
        snapshots: snapshots.len(),
        bytes: snapshots.iter().map(|s| s.byte_size as u64).sum(),
        last_nimg: snapshots.iter().map(|s| s.nimg).max(),
        run,
        manifest,
        reconstructions,
    }))
}

/// A run's snapshots, by time and width.
#[utoipa::path(get, path = "/runs/{run}/snapshots", tag = "snapshots",
    params(("run" = String, Path, description = "Run name")),
    responses(
        (status = 200, description = "The snapshots", body = [SnapshotRow]),
        (status = 404, description = "No such run", body = ErrorBody),
    ))]
pub(super) async fn list_snapshots(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<SnapshotRow>>> {
    let run = run_named(&state, &name).await?;
    Ok(Json(state.data.db.snapshots(run.id).await?))
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

/// Upload one snapshot (a safetensors file, streamed as the body, `Content-Length`
/// required). It is validated and hashed as it arrives and checked against the run's manifest
/// exactly as `hindsight import` does; nothing is stored unless the whole file arrives. The
/// run is created on its first snapshot.
#[utoipa::path(post, path = "/runs/{run}/snapshots", tag = "snapshots",
    params(("run" = String, Path, description = "Run name"), UploadParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The safetensors file"),
    responses(
        (status = 201, description = "Stored", body = Ingested),
        (status = 200, description = "The same snapshot was already stored", body = Ingested),
        (status = 400, description = "Invalid file or parameters", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 409, description = "A different snapshot is stored at this time and width", body = ErrorBody),
        (status = 411, description = "No Content-Length", body = ErrorBody),
        (status = 413, description = "Larger than the server's upload limit", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn upload_snapshot(
    State(state): State<AppState>,
    Path(name): Path<String>,
    uri: Uri,
    request: Request,
) -> ApiResult<Response> {
    let params: UploadParams = match uri.query() {
        None => UploadParams::default(),
        Some(_) => {
            axum::extract::Query::<UploadParams>::try_from_uri(&uri)
                .map_err(|e| ApiError::invalid(format!("query: {}", e.body_text())))?
                .0
        }
    };
    let headers = request.headers();
    let nimg = match params.nimg {
        Some(n) => Some(n),
        None => header_number::<u64>(headers, "x-hindsight-nimg")?,
    };
    let sigma_rel = match params.sigma_rel {
        Some(s) => Some(s),
        None => header_number::<f64>(headers, "x-hindsight-sigma-rel")?,
    };
    let gamma = match params.gamma {
        Some(g) => Some(g),
        None => header_number::<f64>(headers, "x-hindsight-gamma")?,
    };
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
    let len: u64 = match headers.get(header::CONTENT_LENGTH) {
        None => {
            return Err(ApiError::new(
                StatusCode::LENGTH_REQUIRED,
                "length_required",
                "uploads need a Content-Length header",
            ))
        }
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ApiError::invalid("Content-Length is not a number"))?,
    };
    if len > state.config.max_upload_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "{len} bytes is more than this server's upload limit of {} bytes",
                state.config.max_upload_bytes
            ),
        ));
    }
    crate::db::check_run_name(&name)?;
    let _permit = state
        .uploads
        .clone()
        .acquire_owned()
        .await
        .map_err(ApiError::internal)?;
    let existed = state.data.db.run(&name).await?.is_some();
    let run = state.data.db.run_or_create(&name).await?;
    let stream = request
        .into_body()
        .into_data_stream()
        .map_err(|e| std::io::Error::other(format!("the upload was cut short: {e}")));
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let file_name = params.filename.clone().unwrap_or_default();
    let ingested = ingest_reader(
        &state.data.db,
        &state.data.store,
        &run,
        Incoming {
            reader,
            len,
            source: "upload".into(),
            file_name,
        },
        Hints { nimg, width },
        IngestOptions {
            check_finite: params.check_finite,
        },
        |_| {},
    )
    .await;
    if ingested.is_err() && !existed {
        // A run this upload created stays only if the upload stored something.
        let _ = state.data.db.delete_run_if_empty(run.id).await;
    }
    let ingested = ingested.map_err(|e| match e {
        // A body that broke off is the client's problem, not the server's.
        crate::Error::Io { context, source } if source.to_string().contains("cut short") => {
            ApiError::invalid(format!("{context}: {source}"))
        }
        other => other.into(),
    })?;
    let status = if ingested.inserted {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(ingested)).into_response())
}
