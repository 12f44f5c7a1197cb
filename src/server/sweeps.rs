//! Sweeps (`/sweeps…`) and reference statistics (`/references…`). The sweep work itself is
//! done by workers (one inside `hindsight serve`, more from `hindsight worker`) through the
//! queue in the index; these routes create, read, follow and cancel sweeps.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::Stream;
use serde::Deserialize;

use super::error::{body_rejection, parse_json, ApiError, ApiResult, ErrorBody};
use super::state::AppState;
use super::views::sweeps::{
    PointView, ReferenceList, ReferenceView, ShutdownNotice, SweepEstimate, SweepEvent, SweepList,
    SweepProgress, SweepRequestBody, SweepView,
};
use crate::app::references::{self, ReferenceOrigin};
use crate::db::{PointRow, SweepRow};
use crate::sweep;

fn parse_id(text: &str, what: &str) -> ApiResult<i64> {
    text.parse::<i64>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| ApiError::invalid(format!("{what}: {text:?} is not a positive integer id")))
}

async fn load(state: &AppState, id: i64) -> ApiResult<(SweepRow, Vec<PointRow>)> {
    let sweep = sweep::find(&state.data, id).await?;
    let points = state.data.db.sweep_points(id).await?;
    Ok((sweep, points))
}

/// Start a sweep: FID/KID of reconstructions over σ_rel (and training times).
#[utoipa::path(post, path = "/sweeps", tag = "sweeps",
    request_body = SweepRequestBody,
    responses(
        (status = 201, description = "Queued; follow `events_url` or poll `url`", body = SweepView),
        (status = 400, description = "Invalid request (the message names the field)", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 404, description = "No such run or reference statistics", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn post_sweep(
    State(state): State<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(body_rejection)?;
    let request: SweepRequestBody = parse_json(&body)?;
    let created = sweep::create(
        &state.data,
        request.into_request()?,
        &state.config.sweep_limits,
    )
    .await?;
    let (sweep, points) = load(&state, created.id).await?;
    let view = SweepView::new(&sweep, Some(&points))?;
    let mut response = (StatusCode::CREATED, Json(view)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/sweeps/{}", sweep.id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

/// Filter and page of `GET /sweeps`.
#[derive(Deserialize, utoipa::IntoParams)]
pub(super) struct SweepFilter {
    /// Only this run's sweeps.
    run: Option<String>,
    /// Sweeps per page, 1 to 500 (default 100).
    limit: Option<String>,
    /// Only sweeps with ids below this one: the `next_before` of the previous page.
    before: Option<String>,
}

/// Most sweeps in one page of `GET /sweeps`, and the default.
const SWEEP_PAGE_MAX: usize = 500;
const SWEEP_PAGE_DEFAULT: usize = 100;

/// List sweeps, newest first (without their points), a page at a time: follow
/// `next_before` for the next page.
#[utoipa::path(get, path = "/sweeps", tag = "sweeps",
    params(SweepFilter),
    responses(
        (status = 200, description = "Sweeps", body = SweepList),
        (status = 404, description = "No such run", body = ErrorBody),
    ))]
pub(super) async fn list_sweeps(
    State(state): State<AppState>,
    Query(filter): Query<SweepFilter>,
) -> ApiResult<Json<SweepList>> {
    let run_id = match &filter.run {
        Some(name) => Some(state.data.existing_run(name).await?.id),
        None => None,
    };
    let limit = match &filter.limit {
        None => SWEEP_PAGE_DEFAULT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=SWEEP_PAGE_MAX).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "limit: {text:?} is not a page size from 1 to {SWEEP_PAGE_MAX}"
                ))
            })?,
    };
    let before = filter
        .before
        .as_deref()
        .map(|text| parse_id(text, "before"))
        .transpose()?;
    // One more than the page: whether there is a next one.
    let mut rows = state.data.db.sweeps_page(run_id, before, limit + 1).await?;
    let next_before = (rows.len() > limit).then(|| {
        rows.truncate(limit);
        rows.last().map(|s| s.id)
    });
    let mut sweeps = Vec::with_capacity(rows.len());
    for s in &rows {
        let points = state.data.db.sweep_points(s.id).await?;
        // One unreadable row (logged) must not hide every other sweep.
        match SweepView::new(s, Some(&points)) {
            Ok(mut view) => {
                view.points = None;
                sweeps.push(view);
            }
            Err(e) => tracing::error!(sweep = s.id, error = %e.message, "listing a sweep"),
        }
    }
    Ok(Json(SweepList {
        sweeps,
        next_before: next_before.flatten(),
    }))
}

/// Query of the estimate: the sweep's size, as `POST /sweeps` would take it.
#[derive(Deserialize, utoipa::IntoParams)]
pub(super) struct EstimateQuery {
    /// Points; or give `sigma_rels` (and `nimgs`) to have them counted.
    points: Option<String>,
    /// EMA widths as `POST /sweeps` takes them: a list, or EDM2's `0.03,0.05,...,0.25`.
    sigma_rels: Option<String>,
    /// Training times, comma-separated (default: one, the run's last snapshot).
    nimgs: Option<String>,
    /// Images per seed set (default as `POST /sweeps`: 50 000 or the server's cap).
    num_images: Option<String>,
    /// Seed sets (default 1).
    seed_sets: Option<String>,
    /// Sampler steps (default 32).
    steps: Option<String>,
}

/// `text` as a whole number from `lo` to `hi`, or a 400 naming `field`.
fn count(text: &str, field: &str, lo: usize, hi: usize) -> ApiResult<usize> {
    text.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| (lo..=hi).contains(n))
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "{field}: {text:?} is not a whole number from {lo} to {hi}"
            ))
        })
}

/// How long a builtin sweep of the run would take on one worker: seconds in all and per
/// point, scaled from the timings of the newest finished points of the run's builtin sweeps
/// (else of a run with the same network configuration): sampling by denoiser evaluations
/// (2·steps − 1) and images, features and storing by images, reconstruction and metrics per
/// point. Nothing measured yet: `seconds` is null and `note` says so.
#[utoipa::path(get, path = "/runs/{run}/sweep-estimate", tag = "sweeps",
    params(("run" = String, Path, description = "The run's name"), EstimateQuery),
    responses(
        (status = 200, description = "The estimate and what it was measured on", body = SweepEstimate),
        (status = 400, description = "A bad parameter (the message names it)", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
    ))]
pub(super) async fn sweep_estimate(
    State(state): State<AppState>,
    Path(run): Path<String>,
    Query(query): Query<EstimateQuery>,
) -> ApiResult<Json<SweepEstimate>> {
    let limits = &state.config.sweep_limits;
    let nimgs = match &query.nimgs {
        None => 1,
        Some(text) if text.trim().is_empty() => 1,
        Some(text) => {
            for item in text.split(',') {
                item.trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        ApiError::invalid(format!(
                            "nimgs: {item:?} is not a whole number of training images"
                        ))
                    })?;
            }
            text.split(',').count()
        }
    };
    let points = match (&query.points, &query.sigma_rels) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "points: give points or sigma_rels, not both",
            ))
        }
        (Some(text), None) => count(text, "points", 1, limits.max_points)?,
        (None, Some(text)) => {
            let widths = super::reconstruct::widths(
                &super::reconstruct::Widths::List(text.clone()),
                "sigma_rels",
                false,
                crate::phema::MAX_LIST_VALUES,
            )?;
            let points = widths.len() * nimgs;
            if points == 0 || points > limits.max_points {
                return Err(ApiError::invalid(format!(
                    "sigma_rels: {points} points (sigma_rels × nimgs); from 1 to {}",
                    limits.max_points
                )));
            }
            points
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "points: give points (or sigma_rels, with nimgs for a 2-D sweep)",
            ))
        }
    };
    let num_images = match &query.num_images {
        Some(text) => count(text, "num_images", 2, limits.max_images)?,
        None => limits.max_images.min(50_000),
    };
    let seed_sets = match &query.seed_sets {
        Some(text) => count(text, "seed_sets", 1, limits.max_seed_sets)?,
        None => 1,
    };
    let steps = match &query.steps {
        Some(text) => count(text, "steps", 2, 1000)?,
        None => crate::sweep::SamplerSettings::default().steps,
    };
    let run = state.data.existing_run(&run).await?;
    let planned = sweep::estimate::Planned {
        points,
        num_images,
        seed_sets,
        steps,
    };
    let measured = sweep::estimate::measured(&state.data, &run).await?;
    let no_measurement = if sweep::run_network(&run).is_err() {
        "no estimate: the run records no network configuration, so the server cannot sample it \
         (its sweeps are external)"
    } else {
        "no measurement yet: no builtin sweep of this run (or of a run with the same network) \
         has finished a point on this server"
    };
    Ok(Json(SweepEstimate::new(
        &planned,
        measured.as_ref(),
        no_measurement,
    )))
}

/// A sweep: status, points so far (results, timings, image grids) and the best point.
#[utoipa::path(get, path = "/sweeps/{id}", tag = "sweeps",
    params(("id" = i64, Path, description = "Sweep id")),
    responses(
        (status = 200, description = "The sweep", body = SweepView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such sweep", body = ErrorBody),
    ))]
pub(super) async fn get_sweep(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<SweepView>> {
    let id = parse_id(&id, "id")?;
    let (sweep, points) = load(&state, id).await?;
    let leases = state.data.db.sweep_leases(id).await?;
    Ok(Json(SweepView::new(&sweep, Some(&points))?.with_leases(
        &leases,
        &points,
        crate::sweep::now_ms(),
    )))
}

/// Cancel a sweep: unfinished points stop (a worker stops at its next batch); finished
/// points stay. Cancelling a finished sweep changes nothing.
#[utoipa::path(delete, path = "/sweeps/{id}", tag = "sweeps",
    params(("id" = i64, Path, description = "Sweep id")),
    responses(
        (status = 200, description = "The sweep after cancelling", body = SweepView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 404, description = "No such sweep", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn delete_sweep(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<SweepView>> {
    let id = parse_id(&id, "id")?;
    state
        .data
        .db
        .cancel_sweep(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no sweep {id} (see GET /sweeps)")))?;
    let (sweep, points) = load(&state, id).await?;
    Ok(Json(SweepView::new(&sweep, Some(&points))?))
}

/// What the event stream last told its client.
struct Seen {
    state: AppState,
    id: i64,
    points: HashMap<i64, (String, i64)>,
    started: bool,
    ended: bool,
}

/// The SSE frame of `e`: `event:` its name, `data:` its payload as JSON.
fn event(e: &SweepEvent) -> Event {
    let frame = Event::default().event(e.name());
    match e.data_json() {
        Ok(data) => frame.data(data),
        Err(_) => frame,
    }
}

impl Seen {
    /// The events since the last look (empty: nothing changed).
    async fn changes(&mut self) -> ApiResult<Vec<Event>> {
        let (sweep, points) = load(&self.state, self.id).await?;
        let per_point = sweep::spec_of(&sweep).map_or(0, |s| s.images_per_point());
        let mut events = Vec::new();
        if !self.started {
            self.started = true;
            events.push(event(&SweepEvent::Sweep(SweepView::new(
                &sweep,
                Some(&points),
            )?)));
            for p in &points {
                self.points
                    .insert(p.idx, (p.status.as_str().to_owned(), p.images_done));
            }
        } else {
            for p in &points {
                let now = (p.status.as_str().to_owned(), p.images_done);
                if self.points.get(&p.idx) == Some(&now) {
                    continue;
                }
                let status_changed = self.points.get(&p.idx).map(|s| &s.0) != Some(&now.0);
                self.points.insert(p.idx, now);
                let view = PointView::new(p, per_point);
                if status_changed && p.status.is_terminal() {
                    events.push(event(&SweepEvent::Point(view)));
                } else {
                    events.push(event(&SweepEvent::Progress(SweepProgress {
                        idx: p.idx,
                        sigma_rel: p.sigma_rel,
                        nimg: p.nimg,
                        status: view.status,
                        images_done: p.images_done,
                        images_total: per_point as i64,
                        sweep_images_done: sweep.images_done,
                    })));
                }
            }
        }
        if sweep.status.is_terminal() {
            self.ended = true;
            events.push(event(&SweepEvent::End(SweepView::new(
                &sweep,
                Some(&points),
            )?)));
        }
        Ok(events)
    }
}

/// Server-sent events of a sweep: `sweep` (the whole sweep, first), `progress` (a point's
/// images so far, per batch), `point` (a point finished, failed or was cancelled, with its
/// result), `end` (the sweep is finished; the stream closes), `shutdown` (the server is
/// stopping; the stream closes, the sweep goes on when it restarts). Works whichever process runs
/// the workers: the stream follows the index.
#[utoipa::path(get, path = "/sweeps/{id}/events", tag = "sweeps",
    params(("id" = i64, Path, description = "Sweep id")),
    responses(
        (status = 200, description = "Server-sent events; each frame's `event:` and `data:` are one SweepEvent's `event` and `data`", content_type = "text/event-stream", body = SweepEvent),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such sweep", body = ErrorBody),
    ))]
pub(super) async fn sweep_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let id = parse_id(&id, "id")?;
    sweep::find(&state.data, id).await?;
    let poll = state.config.sweep_event_poll;
    // Woken by the server's one watcher when the sweep changes (no polling per client).
    let changed = state
        .sweep_watcher
        .follow(id, &state.data, poll, &state.shutdown);
    let seen = Seen {
        state,
        id,
        points: HashMap::new(),
        started: false,
        ended: false,
    };
    let stream =
        futures_util::stream::unfold((seen, changed), |(mut seen, mut changed)| async move {
            if seen.ended {
                return None;
            }
            loop {
                match seen.changes().await {
                    Ok(events) if !events.is_empty() => {
                        let events: Vec<Result<Event, Infallible>> =
                            events.into_iter().map(Ok).collect();
                        return Some((futures_util::stream::iter(events), (seen, changed)));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        seen.ended = true;
                        let body = SweepEvent::Error(super::error::ErrorDetail {
                            code: e.code,
                            message: e.message,
                        });
                        return Some((
                            futures_util::stream::iter(vec![Ok(event(&body))]),
                            (seen, changed),
                        ));
                    }
                }
                let stopping = seen.state.shutdown.clone();
                tokio::select! {
                    woke = changed.changed() => {
                        if woke.is_err() {
                            // The watcher is gone: the server is stopping.
                            stopping.cancelled().await;
                        }
                    }
                    _ = stopping.cancelled() => {
                        seen.ended = true;
                        let body = SweepEvent::Shutdown(ShutdownNotice {
                            message: "the server is shutting down; reconnect to follow the sweep"
                                .into(),
                        });
                        return Some((
                            futures_util::stream::iter(vec![Ok(event(&body))]),
                            (seen, changed),
                        ));
                    }
                }
            }
        });
    use futures_util::StreamExt;
    Ok(Sse::new(stream.flatten()).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Query of the plot.
#[derive(Deserialize, utoipa::IntoParams)]
pub(super) struct PlotQuery {
    /// The metric's name: `fid` (default), `kid`, or a user metric's.
    metric: Option<String>,
}

/// The sweep's curve (metric vs σ_rel, ± std over seed sets, best point ringed) — with a
/// heat map over (σ_rel, nimg) for 2-D sweeps — as SVG.
#[utoipa::path(get, path = "/sweeps/{id}/plot.svg", tag = "sweeps",
    params(("id" = i64, Path, description = "Sweep id"), PlotQuery),
    responses(
        (status = 200, description = "SVG", content_type = "image/svg+xml", body = String),
        (status = 400, description = "Malformed id or unknown metric", body = ErrorBody),
        (status = 404, description = "No such sweep, or no finished point yet", body = ErrorBody),
    ))]
pub(super) async fn sweep_plot(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<PlotQuery>,
) -> ApiResult<Response> {
    let id = parse_id(&id, "id")?;
    let metric = query.metric.as_deref().unwrap_or("fid");
    let (sweep, points) = load(&state, id).await?;
    if let Ok(spec) = sweep::spec_of(&sweep) {
        if spec.metric_named(metric).is_none() {
            let names: Vec<String> = spec.metric_infos().into_iter().map(|m| m.metric).collect();
            let message = format!(
                "sweep {id} does not compute {metric} (its metrics: {})",
                names.join(", ")
            );
            // FID or KID left out of this sweep: not there; any other name: a bad parameter.
            return Err(if metric.parse::<crate::metrics::Metric>().is_ok() {
                ApiError::not_found(message)
            } else {
                ApiError::invalid(format!("metric: {message}"))
            });
        }
    }
    if !points.iter().any(|p| p.result.is_some()) {
        return Err(ApiError::not_found(format!(
            "sweep {id} has no finished point yet"
        )));
    }
    let svg = sweep::plot::sweep_svg(&sweep, &points, metric)
        .map_err(|e| ApiError::not_found(e.to_string()))?;
    Ok(super::ui::svg_response(svg))
}

/// A point's grid of its first sampled images (PNG).
#[utoipa::path(get, path = "/sweeps/{id}/points/{idx}/grid.png", tag = "sweeps",
    params(("id" = i64, Path, description = "Sweep id"), ("idx" = i64, Path, description = "Point index")),
    responses(
        (status = 200, description = "PNG", content_type = "image/png", body = Vec<u8>),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such point, or no images yet", body = ErrorBody),
    ))]
pub(super) async fn point_grid(
    State(state): State<AppState>,
    Path((id, idx)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let id = parse_id(&id, "id")?;
    let idx: i64 = idx
        .parse()
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| ApiError::invalid(format!("idx: {idx:?} is not a point index")))?;
    let (_, points) = load(&state, id).await?;
    let point = points
        .iter()
        .find(|p| p.idx == idx)
        .ok_or_else(|| ApiError::not_found(format!("sweep {id} has no point {idx}")))?;
    let digest = point.grid_digest.as_ref().ok_or_else(|| {
        ApiError::not_found(format!("point {idx} of sweep {id} has no images yet"))
    })?;
    super::blobs::send_blob(&state, digest, None, "image/png", &headers).await
}

/// List stored reference statistics.
#[utoipa::path(get, path = "/references", tag = "references",
    responses((status = 200, description = "By name", body = ReferenceList)))]
pub(super) async fn list_references(
    State(state): State<AppState>,
) -> ApiResult<Json<ReferenceList>> {
    let rows = state.data.db.references().await?;
    Ok(Json(ReferenceList {
        references: rows.into_iter().map(ReferenceView::from).collect(),
    }))
}

/// Reference statistics by id or name.
#[utoipa::path(get, path = "/references/{key}", tag = "references",
    params(("key" = String, Path, description = "Id or name")),
    responses(
        (status = 200, description = "The reference statistics", body = ReferenceView),
        (status = 404, description = "No such reference statistics", body = ErrorBody),
    ))]
pub(super) async fn get_reference(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> ApiResult<Json<ReferenceView>> {
    Ok(Json(references::find(&state.data, &key).await?.into()))
}

/// The statistics as a pytorch-fid `.npz` (`mu`, `sigma`, float64).
#[utoipa::path(get, path = "/references/{key}/stats.npz", tag = "references",
    params(("key" = String, Path, description = "Id or name")),
    responses(
        (status = 200, description = "The .npz", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, description = "No such reference statistics", body = ErrorBody),
    ))]
pub(super) async fn reference_npz(
    State(state): State<AppState>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let row = references::find(&state.data, &key).await?;
    let name = format!("reference-{}.npz", row.id);
    super::blobs::send_blob(
        &state,
        &row.stats_digest,
        Some(&name),
        "application/octet-stream",
        &headers,
    )
    .await
}

/// Query of the import.
#[derive(Deserialize, utoipa::IntoParams)]
pub(super) struct ImportQuery {
    /// The name to store them under (unique).
    name: Option<String>,
}

/// Import reference statistics: the body is a pytorch-fid `.npz` (`mu`, `sigma`), an EDM2
/// reference `.pkl`, or a `.npy` of a pickled `{'mu', 'sigma'}` dict. They keep no features,
/// so sweeps against them compute FID only.
#[utoipa::path(post, path = "/references", tag = "references",
    params(ImportQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored", body = ReferenceView),
        (status = 400, description = "Not statistics, wrong dimension, or a bad name", body = ErrorBody),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorBody),
        (status = 409, description = "The name is taken", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(super) async fn post_reference(
    State(state): State<AppState>,
    Query(query): Query<ImportQuery>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(body_rejection)?;
    let name = query
        .name
        .ok_or_else(|| ApiError::invalid("name: give ?name=NAME for the statistics"))?;
    let origin = ReferenceOrigin {
        source: format!("uploaded as {name:?}"),
        name,
        resolution: None,
        channels: None,
    };
    // Parsing is CPU work on untrusted bytes: off the async workers, refusing more than
    // FEATURES dimensions before sigma is read.
    references::check_reference_name(&origin.name)?;
    let source = origin.source.clone();
    let stats = crate::error::blocking("reading the uploaded statistics", move || {
        crate::metrics::FeatureStats::parse_at_most(&body, &source, crate::metrics::FEATURES)
    })
    .await?;
    let row = references::import_stats(&state.data, origin, stats).await?;
    let mut response =
        (StatusCode::CREATED, Json(ReferenceView::from(row.clone()))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/references/{}", row.id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}
