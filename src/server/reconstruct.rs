//! `POST /reconstruct`, `GET /reconstructions/{id}` and the weights download.
//!
//! Single-flight: each missing reconstruction id is computed by one job at a time. A request
//! whose ids are already being computed waits on those jobs; the ids no job has yet are
//! computed together, in one materialization pass, by a new job that runs as its own task
//! (so a client that disconnects does not cancel work others wait for). Jobs leave the
//! in-flight table only after their rows are committed, under the table's lock, so a request
//! sees every id either in flight or stored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::{body_rejection, parse_json, AppState};
use crate::db::ReconstructionRow;
use crate::materialize::OutDtype;
use crate::phema::request::TargetSpec;
use crate::phema::{parse_float_list, parse_sigma_rel_list};
use crate::reconstruction::{self, file_name, Plan};

/// Failures are remembered this long, for clients polling a status URL.
const FAILURE_MEMORY: Duration = Duration::from_secs(600);

type JobResult = Result<(), ApiError>;
type Job = Shared<BoxFuture<'static, JobResult>>;

/// In-flight and recently failed reconstruction jobs.
#[derive(Default)]
pub(super) struct Jobs {
    in_flight: tokio::sync::Mutex<HashMap<String, Job>>,
    failed: std::sync::Mutex<HashMap<String, (Instant, ApiError)>>,
    passes: AtomicU64,
}

impl Jobs {
    pub(super) fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }

    fn failure(&self, id: &str) -> Option<ApiError> {
        let mut failed = self.failed.lock().expect("failure table");
        failed.retain(|_, (at, _)| at.elapsed() < FAILURE_MEMORY);
        failed.get(id).map(|(_, e)| e.clone())
    }
}

/// One width or several: a number, a list of numbers, or a string in EDM2's list syntax
/// (`"0.05,0.10,...,0.25"`).
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Widths {
    /// One value.
    One(f64),
    /// Several values.
    Many(Vec<f64>),
    /// EDM2's list syntax.
    List(String),
}

/// The body of `POST /reconstruct`. Give `sigma_rel` or `gamma` (or both: their targets are
/// concatenated). A single number gives a single reconstruction in the response; a list gives
/// `{"reconstructions": [...]}`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconstructRequest {
    /// The run's name.
    pub run: String,
    /// Target widths as relative standard deviations.
    #[serde(default)]
    pub sigma_rel: Option<Widths>,
    /// Target widths as power-function exponents.
    #[serde(default)]
    pub gamma: Option<Widths>,
    /// Training time to reconstruct at; defaults to the run's last snapshot.
    #[serde(default)]
    pub nimg: Option<u64>,
    /// Element type of the output: `f32` (default), `f16` or `bf16`.
    #[serde(default)]
    pub dtype: Option<OutDtype>,
    /// Longest wait, in seconds, before answering 202 with status URLs (default: the server's
    /// setting; 0 answers at once).
    #[serde(default)]
    pub wait_secs: Option<f64>,
}

/// A reconstruction as the API shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ReconstructionView {
    /// Id (the cache key, 64 hex digits).
    pub id: String,
    /// `ready` or `running`.
    pub status: String,
    /// Where to poll this reconstruction.
    pub status_url: String,
    /// Where to download the weights (once ready).
    pub weights_url: String,
    /// The run.
    pub run: String,
    /// Training time reconstructed at.
    pub nimg: u64,
    /// Target width.
    pub sigma_rel: f64,
    /// Target exponent.
    pub gamma: f64,
    /// Output element type.
    pub dtype: String,
    /// File name for the download.
    pub file_name: String,
    /// Digest of the safetensors file (when ready).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Its size in bytes (when ready).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byte_size: Option<u64>,
    /// True when the store already held it before this request.
    pub cached: bool,
    /// The solver's quality report and the weighted snapshots.
    #[schema(value_type = Object)]
    pub report: serde_json::Value,
    /// When it was stored (RFC 3339), when ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// Several reconstructions, in request order.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ReconstructionList {
    /// The reconstructions.
    pub reconstructions: Vec<ReconstructionView>,
}

fn urls(id: &str) -> (String, String) {
    (
        format!("/reconstructions/{id}"),
        format!("/reconstructions/{id}/weights"),
    )
}

pub(super) fn ready_view(row: &ReconstructionRow, cached: bool) -> ReconstructionView {
    let (status_url, weights_url) = urls(&row.id);
    ReconstructionView {
        id: row.id.clone(),
        status: "ready".into(),
        status_url,
        weights_url,
        run: row.run.clone(),
        nimg: row.nimg as u64,
        sigma_rel: row.sigma_rel,
        gamma: row.gamma,
        dtype: row.dtype.clone(),
        file_name: file_name(&row.run, row.nimg, row.sigma_rel),
        digest: Some(row.digest.clone()),
        byte_size: Some(row.byte_size as u64),
        cached,
        report: serde_json::from_str(&row.report).unwrap_or_default(),
        created_at: Some(row.created_at.clone()),
    }
}

fn running_view(plan: &Plan, t: usize) -> ReconstructionView {
    let target = &plan.targets[t];
    let s = &target.solution;
    let (status_url, weights_url) = urls(&target.id);
    ReconstructionView {
        id: target.id.clone(),
        status: "running".into(),
        status_url,
        weights_url,
        run: plan.run.name.clone(),
        nimg: s.nimg,
        sigma_rel: s.sigma_rel,
        gamma: s.gamma,
        dtype: plan.dtype.as_str().into(),
        file_name: file_name(&plan.run.name, s.nimg as i64, s.sigma_rel),
        digest: None,
        byte_size: None,
        cached: false,
        report: reconstruction::report(plan, target),
        created_at: None,
    }
}

fn widths(w: &Widths, field: &str, gamma: bool) -> ApiResult<Vec<f64>> {
    match w {
        Widths::One(v) => Ok(vec![*v]),
        Widths::Many(v) => Ok(v.clone()),
        Widths::List(text) => {
            let parsed = if gamma {
                parse_float_list(text)
            } else {
                parse_sigma_rel_list(text)
            };
            parsed.map_err(|e| ApiError::invalid(format!("{field}: {e}")))
        }
    }
}

async fn stored(state: &AppState, id: &str) -> ApiResult<Option<ReconstructionRow>> {
    Ok(reconstruction::stored(&state.data, id).await?)
}

/// Reconstruct weights for one or more EMA lengths.
#[utoipa::path(post, path = "/reconstruct", tag = "reconstructions",
    request_body = ReconstructRequest,
    responses(
        (status = 200, description = "Ready: one reconstruction (scalar request) or a list", body = ReconstructionView),
        (status = 202, description = "Still computing; poll `status_url`", body = ReconstructionList),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn post_reconstruct(
    State(state): State<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(body_rejection)?;
    let request: ReconstructRequest = parse_json(&body)?;
    let scalar = matches!(
        (&request.sigma_rel, &request.gamma),
        (Some(Widths::One(_)), None) | (None, Some(Widths::One(_)))
    );
    let mut targets = Vec::new();
    if let Some(w) = &request.sigma_rel {
        for v in widths(w, "sigma_rel", false)? {
            targets.push(TargetSpec {
                sigma_rel: Some(v),
                gamma: None,
                nimg: request.nimg,
            });
        }
    }
    if let Some(w) = &request.gamma {
        for v in widths(w, "gamma", true)? {
            targets.push(TargetSpec {
                sigma_rel: None,
                gamma: Some(v),
                nimg: request.nimg,
            });
        }
    }
    if targets.is_empty() {
        return Err(ApiError::invalid(
            "give the targets as sigma_rel or gamma (a number, a list, or EDM2's \"0.05,0.10,...,0.25\")",
        ));
    }
    let wait = match request.wait_secs {
        None => state.config.reconstruct_wait,
        Some(s) if s.is_finite() && (0.0..=3600.0).contains(&s) => {
            Duration::from_secs_f64(s).min(state.config.reconstruct_wait)
        }
        Some(s) => {
            return Err(ApiError::invalid(format!(
                "wait_secs: {s} is out of range (0 to 3600)"
            )))
        }
    };
    let plan = Arc::new(
        reconstruction::plan(
            &state.data.db,
            &request.run,
            targets,
            request.dtype.unwrap_or(OutDtype::F32),
        )
        .await?,
    );

    // What is stored, what others compute, what this request must start.
    let mut cached: HashMap<String, ReconstructionRow> = HashMap::new();
    for t in &plan.targets {
        if !cached.contains_key(&t.id) {
            if let Some(row) = stored(&state, &t.id).await? {
                cached.insert(t.id.clone(), row);
            }
        }
    }
    let mut waits: Vec<Job> = Vec::new();
    {
        let mut in_flight = state.jobs.in_flight.lock().await;
        let mut fresh = Vec::new();
        for (t, target) in plan.targets.iter().enumerate() {
            if cached.contains_key(&target.id)
                || fresh
                    .iter()
                    .any(|&f: &usize| plan.targets[f].id == target.id)
            {
                continue;
            }
            if let Some(job) = in_flight.get(&target.id) {
                waits.push(job.clone());
            } else if let Some(row) = stored(&state, &target.id).await? {
                // A job finished between the first look and taking the lock.
                cached.insert(target.id.clone(), row);
            } else {
                fresh.push(t);
            }
        }
        if !fresh.is_empty() {
            let job = start_job(&state, plan.clone(), fresh.clone());
            for &t in &fresh {
                in_flight.insert(plan.targets[t].id.clone(), job.clone());
            }
            waits.push(job);
        }
    }
    let all = futures_util::future::join_all(waits);
    let finished = tokio::time::timeout(wait, all).await;
    let mut views = Vec::with_capacity(plan.targets.len());
    let mut running = false;
    match finished {
        Ok(results) => {
            for r in results {
                r?;
            }
        }
        Err(_) => running = true,
    }
    for (t, target) in plan.targets.iter().enumerate() {
        if let Some(row) = cached.get(&target.id) {
            views.push(ready_view(row, true));
        } else if let Some(row) = stored(&state, &target.id).await? {
            views.push(ready_view(&row, false));
        } else if running {
            views.push(running_view(&plan, t));
        } else {
            return Err(ApiError::internal(format!(
                "reconstruction {} finished but is not stored",
                target.id
            )));
        }
    }
    let status = if running {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let mut response = if scalar {
        (status, Json(views.remove(0))).into_response()
    } else {
        (
            status,
            Json(ReconstructionList {
                reconstructions: views,
            }),
        )
            .into_response()
    };
    if running && plan.targets.len() == 1 {
        if let Ok(v) = HeaderValue::from_str(&urls(&plan.targets[0].id).0) {
            response.headers_mut().insert(header::LOCATION, v);
        }
    }
    Ok(response)
}

/// Starts one materialization pass for targets `which` of `plan` as its own task.
fn start_job(state: &AppState, plan: Arc<Plan>, which: Vec<usize>) -> Job {
    let task_state = state.clone();
    let handle = tokio::spawn(async move {
        let state = task_state;
        state.jobs.passes.fetch_add(1, Ordering::Relaxed);
        let result = reconstruction::materialize_targets(
            &state.data,
            &plan,
            &which,
            state.config.verify_reads,
            Arc::new(|_| {}),
        )
        .await
        .map(|_| ())
        .map_err(ApiError::from);
        let mut in_flight = state.jobs.in_flight.lock().await;
        for &t in &which {
            let id = &plan.targets[t].id;
            in_flight.remove(id);
            if let Err(e) = &result {
                state
                    .jobs
                    .failed
                    .lock()
                    .expect("failure table")
                    .insert(id.clone(), (Instant::now(), e.clone()));
            }
        }
        result
    });
    async move {
        handle
            .await
            .unwrap_or_else(|e| Err(ApiError::internal(format!("reconstruction task: {e}"))))
    }
    .boxed()
    .shared()
}

fn check_id(id: &str) -> ApiResult<()> {
    if id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "id: `{id}` is not a reconstruction id (64 lower-case hex digits)"
        )))
    }
}

/// A reconstruction's report; 202 while it is being computed.
#[utoipa::path(get, path = "/reconstructions/{id}", tag = "reconstructions",
    params(("id" = String, Path, description = "Reconstruction id")),
    responses(
        (status = 200, description = "Ready", body = ReconstructionView),
        (status = 202, description = "Still computing", body = Object),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        (status = 500, description = "The computation failed", body = ErrorBody),
    ))]
pub(super) async fn get_reconstruction(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    check_id(&id)?;
    if let Some(row) = stored(&state, &id).await? {
        return Ok(Json(ready_view(&row, true)).into_response());
    }
    if state.jobs.in_flight.lock().await.contains_key(&id) {
        let (status_url, weights_url) = urls(&id);
        return Ok((
            StatusCode::ACCEPTED,
            Json(serde_json::json!({
                "id": id, "status": "running", "status_url": status_url, "weights_url": weights_url
            })),
        )
            .into_response());
    }
    if let Some(e) = state.jobs.failure(&id) {
        return Err(e);
    }
    Err(ApiError::not_found(format!(
        "no reconstruction {id} (ask for it with POST /reconstruct)"
    )))
}

/// Download a reconstruction's safetensors file. Supports `Range` (one range),
/// `If-None-Match` and `If-Range` against its strong `ETag` (the content digest).
#[utoipa::path(get, path = "/reconstructions/{id}/weights", tag = "reconstructions",
    params(("id" = String, Path, description = "Reconstruction id")),
    responses(
        (status = 200, description = "The whole file", content_type = "application/octet-stream"),
        (status = 206, description = "The requested range", content_type = "application/octet-stream"),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "Unknown or not ready", body = ErrorBody),
        (status = 416, description = "Range not satisfiable", body = ErrorBody),
    ))]
pub(super) async fn get_weights(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    check_id(&id)?;
    let Some(row) = stored(&state, &id).await? else {
        let running = state.jobs.in_flight.lock().await.contains_key(&id);
        return Err(ApiError::not_found(if running {
            format!("reconstruction {id} is still being computed; poll /reconstructions/{id}")
        } else {
            format!("no reconstruction {id} (ask for it with POST /reconstruct)")
        }));
    };
    let name = file_name(&row.run, row.nimg, row.sigma_rel);
    super::blobs::send_blob(&state, &row.digest, &name, &headers).await
}

/// Makes a streamed body from a file region, hashing a whole-file read when `verify` names
/// the expected digest: a mismatch ends the stream with an error, so the client sees a
/// truncated response rather than wrong bytes.
pub(super) fn file_body(
    file: tokio::fs::File,
    len: u64,
    verify: Option<crate::store::Digest>,
) -> Body {
    use tokio::io::AsyncReadExt;
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 << 10);
    match verify {
        None => Body::from_stream(stream),
        Some(expected) => {
            let hasher = Arc::new(std::sync::Mutex::new(blake3::Hasher::new()));
            let h = hasher.clone();
            let checked = stream.map(move |chunk| {
                if let Ok(c) = &chunk {
                    h.lock().expect("hasher").update(c);
                }
                chunk
            });
            let tail = futures_util::stream::once(async move {
                let actual = crate::store::Digest::from(hasher.lock().expect("hasher").finalize());
                if actual == expected {
                    None
                } else {
                    tracing::error!(
                        "blob {expected} is corrupt (hashes to {actual}); download aborted"
                    );
                    Some(Err(std::io::Error::other("stored blob is corrupt")))
                }
            })
            .filter_map(futures_util::future::ready);
            Body::from_stream(checked.chain(tail))
        }
    }
}
