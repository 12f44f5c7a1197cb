//! `POST /reconstruct`, `GET /reconstructions/{id}` and the weights download. Computation is
//! single-flight (see `jobs`): concurrent requests for the same target share one pass.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;

use super::error::{body_rejection, parse_json, ApiError, ApiResult, ErrorBody};
use super::jobs::Job;
use super::state::AppState;
use super::views::{
    urls, BuffersView, DtypeView, ReconstructResponse, ReconstructionList, ReconstructionPending,
    ReconstructionView,
};
use crate::db::ReconstructionRow;
use crate::materialize::{Buffers, OutDtype};
use crate::phema::request::TargetSpec;
use crate::phema::{parse_float_list_at_most, parse_sigma_rel_list_at_most};
use crate::reconstruction::{self, file_name, OutputOptions, Plan};

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
    pub dtype: Option<DtypeView>,
    /// Longest wait, in seconds, before answering 202 with status URLs (default: the server's
    /// setting; 0 answers at once).
    #[serde(default)]
    pub wait_secs: Option<f64>,
    /// Clamp values beyond the output type's range (f16: ±65504) to it instead of refusing
    /// the request (default false); the report lists the clamped tensors.
    #[serde(default)]
    pub clamp_out_of_range: bool,
    /// Float tensors the snapshots declare as buffers: `average` (default: averaged like the
    /// parameters) or `copy` (taken from the newest snapshot with a non-zero weight, as
    /// EDM2's `reconstruct_phema.py` does; 400 naming `buffers` when a snapshot does not
    /// declare its buffers). Integer tensors are always copied.
    #[serde(default)]
    pub buffers: Option<BuffersView>,
}

impl ReconstructRequest {
    /// Whether the request names one target with a plain number (answered with one
    /// reconstruction rather than a list).
    fn scalar(&self) -> bool {
        matches!(
            (&self.sigma_rel, &self.gamma),
            (Some(Widths::One(_)), None) | (None, Some(Widths::One(_)))
        )
    }

    /// The targets: every σ_rel, then every γ, at `nimg`.
    fn targets(&self) -> ApiResult<Vec<TargetSpec>> {
        let list = |w: &Option<Widths>, field: &str, gamma: bool| match w {
            None => Ok(Vec::new()),
            Some(w) => widths(w, field, gamma, crate::reconstruction::MAX_TARGETS),
        };
        let sigma_rels = list(&self.sigma_rel, "sigma_rel", false)?;
        let gammas = list(&self.gamma, "gamma", true)?;
        let targets = TargetSpec::from_lists(&sigma_rels, &gammas, self.nimg);
        if targets.is_empty() {
            return Err(ApiError::invalid(
                "give the targets as sigma_rel or gamma (a number, a list, or EDM2's \"0.05,0.10,...,0.25\")",
            ));
        }
        Ok(targets)
    }

    /// How long to wait before answering 202: the request's `wait_secs`, capped by the
    /// server's setting.
    fn wait(&self, server_wait: Duration) -> ApiResult<Duration> {
        match self.wait_secs {
            None => Ok(server_wait),
            Some(s) if s.is_finite() && (0.0..=3600.0).contains(&s) => {
                Ok(Duration::from_secs_f64(s).min(server_wait))
            }
            Some(s) => Err(ApiError::invalid(format!(
                "wait_secs: {s} is out of range (0 to 3600)"
            ))),
        }
    }
}

/// The values of `w`; EDM2's list syntax may expand to at most `max` values.
pub(crate) fn widths(w: &Widths, field: &str, gamma: bool, max: usize) -> ApiResult<Vec<f64>> {
    match w {
        Widths::One(v) => Ok(vec![*v]),
        Widths::Many(v) => Ok(v.clone()),
        Widths::List(text) => {
            let parsed = if gamma {
                parse_float_list_at_most(text, max)
            } else {
                parse_sigma_rel_list_at_most(text, max)
            };
            parsed.map_err(|e| ApiError::invalid(format!("{field}: {e}")))
        }
    }
}

/// A stored reconstruction whose blob was checked intact: what a request may be answered
/// with as already computed.
async fn stored(state: &AppState, id: &str) -> ApiResult<Option<ReconstructionRow>> {
    Ok(reconstruction::stored(&state.data, id).await?)
}

/// A stored reconstruction whose blob file is present (not read): for status and downloads
/// (which check every byte they send).
async fn listed(state: &AppState, id: &str) -> ApiResult<Option<ReconstructionRow>> {
    Ok(reconstruction::listed(&state.data, id).await?)
}

/// Reconstruct weights for one or more EMA lengths.
#[utoipa::path(post, path = "/reconstruct", tag = "reconstructions",
    request_body = ReconstructRequest,
    responses(
        (status = 200, description = "Ready: one reconstruction (scalar request) or a list", body = ReconstructResponse),
        (status = 202, description = "Still computing; poll each `status_url`", body = ReconstructResponse),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 507, description = "The server's disk is full; nothing was stored", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn post_reconstruct(
    State(state): State<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(body_rejection)?;
    let request: ReconstructRequest = parse_json(&body)?;
    let targets = request.targets()?;
    let wait = request.wait(state.config.reconstruct_wait)?;
    let output = OutputOptions {
        dtype: request.dtype.map_or(OutDtype::F32, OutDtype::from),
        clamp: request.clamp_out_of_range,
        buffers: request.buffers.map_or(Buffers::Average, Buffers::from),
    };
    let plan = Arc::new(reconstruction::plan(&state.data.db, &request.run, targets, output).await?);
    let (cached, waits) = claim(&state, &plan).await?;
    let running = match tokio::time::timeout(wait, futures_util::future::join_all(waits)).await {
        Ok(results) => {
            for r in results {
                r?;
            }
            false
        }
        Err(_) => true,
    };
    let mut views = Vec::with_capacity(plan.targets.len());
    for (t, target) in plan.targets.iter().enumerate() {
        if let Some(row) = cached.get(&target.id) {
            views.push(ReconstructionView::ready(row, true));
        } else if let Some(row) = stored(&state, &target.id).await? {
            views.push(ReconstructionView::ready(&row, false));
        } else if running {
            views.push(ReconstructionView::running(&plan, t));
        } else {
            return Err(ApiError::internal(format!(
                "reconstruction {} finished but is not stored",
                target.id
            )));
        }
    }
    Ok(respond(&plan, views, request.scalar(), running))
}

/// What is stored, what others compute, what this request must start: returns the stored
/// rows by id and the jobs to wait on (at most one of them new).
async fn claim(
    state: &AppState,
    plan: &Arc<Plan>,
) -> ApiResult<(HashMap<String, ReconstructionRow>, Vec<Job>)> {
    let mut cached: HashMap<String, ReconstructionRow> = HashMap::new();
    for t in &plan.targets {
        if !cached.contains_key(&t.id) {
            if let Some(row) = stored(state, &t.id).await? {
                cached.insert(t.id.clone(), row);
            }
        }
    }
    let mut waits: Vec<Job> = Vec::new();
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
        } else if let Some(row) = stored(state, &target.id).await? {
            // A job finished between the first look and taking the lock.
            cached.insert(target.id.clone(), row);
        } else {
            fresh.push(t);
        }
    }
    if !fresh.is_empty() {
        let job = state.jobs.start(
            &state.data,
            state.config.verify_reads,
            plan.clone(),
            fresh.clone(),
        );
        for &t in &fresh {
            in_flight.insert(plan.targets[t].id.clone(), job.clone());
        }
        waits.push(job);
    }
    Ok((cached, waits))
}

/// 200 when everything is ready, else 202 (with `Location` for a single target); one view
/// for a scalar request, else the list.
fn respond(
    plan: &Plan,
    mut views: Vec<ReconstructionView>,
    scalar: bool,
    running: bool,
) -> Response {
    let status = if running {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let body = if scalar {
        ReconstructResponse::One(Box::new(views.remove(0)))
    } else {
        ReconstructResponse::Many(ReconstructionList {
            reconstructions: views,
        })
    };
    let mut response = (status, Json(body)).into_response();
    if running && plan.targets.len() == 1 {
        if let Ok(v) = HeaderValue::from_str(&urls(&plan.targets[0].id).0) {
            response.headers_mut().insert(header::LOCATION, v);
        }
    }
    response
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
        (status = 202, description = "Still computing", body = ReconstructionPending),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        (status = 500, description = "The computation failed", body = ErrorBody),
    ))]
pub(super) async fn get_reconstruction(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    check_id(&id)?;
    if let Some(row) = listed(&state, &id).await? {
        return Ok(Json(ReconstructionView::ready(&row, true)).into_response());
    }
    if state.jobs.in_flight.lock().await.contains_key(&id) {
        let (status_url, weights_url) = urls(&id);
        return Ok((
            StatusCode::ACCEPTED,
            Json(ReconstructionPending {
                id,
                status: "running".into(),
                status_url,
                weights_url,
            }),
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
    let Some(row) = listed(&state, &id).await? else {
        let running = state.jobs.in_flight.lock().await.contains_key(&id);
        return Err(ApiError::not_found(if running {
            format!("reconstruction {id} is still being computed; poll /reconstructions/{id}")
        } else {
            format!("no reconstruction {id} (ask for it with POST /reconstruct)")
        }));
    };
    let name = file_name(&row.run, row.nimg, row.sigma_rel);
    super::blobs::send_blob(
        &state,
        &row.digest,
        Some(&name),
        "application/octet-stream",
        &headers,
    )
    .await
}
