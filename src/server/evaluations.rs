//! The external-evaluator protocol (`/evaluations/...`): evaluators running the user's own
//! model claim points of external sweeps under a lease and report their images (or audited
//! features) and user metrics; `crate::sweep::external` does the work, these routes read the
//! requests and shape the answers (`docs/EVALUATORS.md`). Every route needs the write token.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::error::{body_rejection, parse_json, ApiError, ApiResult, ErrorBody};
use super::state::AppState;
use super::views::evaluations::{
    BatchRecorded, EvaluationClaim, FailRecorded, FailReport, Lease, MetricsRecorded, MetricsReport,
};
use super::views::sweeps::{PointView, ReferenceView};
use crate::sweep::external::lenient_json;
use crate::sweep::upload::Layout;

type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

fn lease_view(state: &AppState, s: &crate::sweep::external::LeaseState) -> Lease {
    Lease::new(s, state.evaluations.config().lease.as_secs_f64())
}

/// Claim a point of an external sweep to evaluate: the answer says what to evaluate
/// (σ_rel, nimg, the reconstruction to download, seeds, the sampler object) and how to
/// report it; 204 when no point is waiting.
#[utoipa::path(post, path = "/evaluations/claim", tag = "evaluations",
    request_body = EvaluationClaim,
    responses(
        (status = 200, description = "A lease on one point", body = Lease),
        (status = 204, description = "No point is waiting"),
        (status = 400, description = "Bad worker name, or a builtin sweep", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 404, description = "No such sweep or run", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn claim(State(state): State<AppState>, body: Body) -> ApiResult<Response> {
    let body = body.map_err(body_rejection)?;
    let request: EvaluationClaim = parse_json(&body)?;
    let claimed = state
        .evaluations
        .claim(&request.worker, request.sweep, request.run.as_deref())
        .await?;
    Ok(match claimed {
        Some(s) => Json(lease_view(&state, &s)).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// Extend a lease (call it every third of `lease_seconds`).
#[utoipa::path(post, path = "/evaluations/{lease}/heartbeat", tag = "evaluations",
    params(("lease" = String, Path, description = "The lease's id")),
    responses(
        (status = 200, description = "The lease, extended", body = Lease),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 404, description = "No such lease", body = ErrorBody),
        (status = 409, description = "The lease ran out or ended (`lease_expired`)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn heartbeat(
    State(state): State<AppState>,
    Path(lease): Path<String>,
) -> ApiResult<Json<Lease>> {
    let s = state.evaluations.heartbeat(&lease).await?;
    Ok(Json(lease_view(&state, &s)))
}

/// Give a point up: it goes back to the queue (failed for good after 3 attempts) and the
/// message is shown on the sweep's page.
#[utoipa::path(post, path = "/evaluations/{lease}/fail", tag = "evaluations",
    params(("lease" = String, Path, description = "The lease's id")),
    request_body = FailReport,
    responses(
        (status = 200, description = "Recorded; the lease ended", body = FailRecorded),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 404, description = "No such lease", body = ErrorBody),
        (status = 409, description = "The lease ran out or ended (`lease_expired`)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn fail(
    State(state): State<AppState>,
    Path(lease): Path<String>,
    body: Body,
) -> ApiResult<Json<FailRecorded>> {
    let body = body.map_err(body_rejection)?;
    let report: FailReport = parse_json(&body)?;
    let retry = state.evaluations.fail(&lease, &report.message).await?;
    Ok(Json(FailRecorded {
        lease_id: lease,
        retry,
    }))
}

/// Query of a batch upload.
#[derive(Deserialize, utoipa::IntoParams)]
pub(super) struct BatchQuery {
    /// `nhwc` or `nchw`: the images' axis order (default: read from where the 1 or 3
    /// channels are).
    layout: Option<String>,
}

fn layout(query: &BatchQuery) -> ApiResult<Option<Layout>> {
    query
        .layout
        .as_deref()
        .map(|l| l.parse::<Layout>().map_err(ApiError::from))
        .transpose()
}

/// Record batch `k` of the leased point: an `.npy` of uint8 images `[B,H,W,C]` or
/// `[B,C,H,W]` (the server computes their Inception features), or an `.npz` of `features`
/// (float32 `[B,2048]`) with `audit_images` (and `audit_index`), which the server checks
/// against its own Inception. The same bytes again are a no-op.
#[utoipa::path(post, path = "/evaluations/{lease}/batches/{k}", tag = "evaluations",
    params(
        ("lease" = String, Path, description = "The lease's id"),
        ("k" = u64, Path, description = "The batch's number"),
        BatchQuery,
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "An .npy of uint8 images, or an .npz of features and audit images"),
    responses(
        (status = 201, description = "Recorded", body = BatchRecorded),
        (status = 200, description = "Recorded before from the same bytes; nothing changed", body = BatchRecorded),
        (status = 400, description = "Bad batch number, shape, dtype or image size (the message names the part)", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 404, description = "No such lease", body = ErrorBody),
        (status = 409, description = "The lease ran out or ended (`lease_expired`), or the batch was recorded from other bytes (`conflict`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "The features differ from the server's on an audit image (`audit_failed`)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn batch(
    State(state): State<AppState>,
    Path((lease, k)): Path<(String, String)>,
    Query(query): Query<BatchQuery>,
    body: Body,
) -> ApiResult<Response> {
    let k: u64 = k
        .parse()
        .map_err(|_| ApiError::invalid(format!("batch: {k:?} is not a batch number")))?;
    let layout = layout(&query)?;
    let body = body.map_err(body_rejection)?;
    let receipt = state
        .evaluations
        .record_batch(&lease, k, body, layout)
        .await?;
    let status = if receipt.recorded {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(BatchRecorded::from(receipt))).into_response())
}

/// Report user metrics of the leased point: `{"val_loss": 0.79}` (one number for the
/// point) or `{"val_loss": [0.79, 0.81]}` (one per seed set). Names must be declared by the
/// sweep; values finite. The same values again are a no-op, other values a 409.
#[utoipa::path(post, path = "/evaluations/{lease}/metrics", tag = "evaluations",
    params(("lease" = String, Path, description = "The lease's id")),
    request_body = MetricsReport,
    responses(
        (status = 200, description = "Recorded", body = MetricsRecorded),
        (status = 400, description = "An undeclared metric, a value that is not a finite number, the wrong number of values (the message names `metrics.NAME`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 404, description = "No such lease", body = ErrorBody),
        (status = 409, description = "The lease ran out or ended, or the metric was recorded with another value", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn metrics(
    State(state): State<AppState>,
    Path(lease): Path<String>,
    body: Body,
) -> ApiResult<Json<MetricsRecorded>> {
    let body = body.map_err(body_rejection)?;
    let value = lenient_json(&body).map_err(|e| {
        ApiError::invalid(format!(
            "request body: not JSON ({e}); expected {{\"metric\": number, …}}"
        ))
    })?;
    let serde_json::Value::Object(map) = value else {
        return Err(ApiError::invalid(
            "request body: expected a JSON object of metrics ({\"val_loss\": 0.79})",
        ));
    };
    let recorded = state.evaluations.record_metrics(&lease, &map).await?;
    let s = state.evaluations.state(&lease).await?;
    let metrics_recorded: BTreeMap<String, Vec<f64>> = recorded.into_iter().collect();
    let missing = s
        .spec
        .user_metrics
        .iter()
        .filter(|m| !metrics_recorded.contains_key(&m.name))
        .map(|m| m.name.clone())
        .collect();
    Ok(Json(MetricsRecorded {
        metrics_recorded,
        missing,
    }))
}

/// Record the leased point: every batch and user metric must be in. The server computes
/// FID and KID from the recorded features and ends the lease.
#[utoipa::path(post, path = "/evaluations/{lease}/finish", tag = "evaluations",
    params(("lease" = String, Path, description = "The lease's id")),
    responses(
        (status = 200, description = "The point, recorded", body = PointView),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 404, description = "No such lease", body = ErrorBody),
        (status = 409, description = "The lease ran out or ended (`lease_expired`), or batches or metrics are missing (`unfinished`)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn finish(
    State(state): State<AppState>,
    Path(lease): Path<String>,
) -> ApiResult<Json<PointView>> {
    let point = state.evaluations.finish(&lease).await?;
    let sweep = crate::sweep::find(&state.data, point.sweep_id).await?;
    let per_point = crate::sweep::spec_of(&sweep)?.images_per_point();
    Ok(Json(PointView::new(&point, per_point)))
}

/// Query of a features upload.
#[derive(Deserialize, utoipa::IntoParams)]
pub(super) struct FeaturesQuery {
    /// The name to store the statistics under (unique).
    name: Option<String>,
    /// `nhwc` or `nchw`: the audit images' axis order (default: read from the channels).
    layout: Option<String>,
}

/// Make reference statistics from features an evaluator computed of the user's own images:
/// an `.npz` of `features` (float32 `[N,2048]`) and `audit_images` (uint8, at least 2;
/// positions `audit_index`), audited against the server's Inception. The features are kept,
/// so sweeps against them compute KID as well as FID.
#[utoipa::path(post, path = "/references/features", tag = "references",
    params(FeaturesQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored", body = ReferenceView),
        (status = 400, description = "Not features, wrong shape, or a bad name", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "The features differ from the server's on an audit image", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn reference_features(
    State(state): State<AppState>,
    Query(query): Query<FeaturesQuery>,
    body: Body,
) -> ApiResult<Response> {
    let name = query
        .name
        .clone()
        .ok_or_else(|| ApiError::invalid("name: give ?name=NAME for the statistics"))?;
    let layout = layout(&BatchQuery {
        layout: query.layout.clone(),
    })?;
    let body = body.map_err(body_rejection)?;
    let row = state
        .evaluations
        .reference_from_features(&name, body, layout)
        .await?;
    let mut response =
        (StatusCode::CREATED, Json(ReferenceView::from(row.clone()))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/references/{}", row.id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}
