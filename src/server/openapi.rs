//! The route list and the OpenAPI document, made together: [`routes`] registers every
//! handler through utoipa-axum's `OpenApiRouter`, which takes each route's path and method from
//! the handler's `#[utoipa::path]` annotation, so a route cannot be served without being
//! documented (and the document cannot name a route that is not served). [`ApiDoc`] adds what
//! is not per route: title, tags, the bearer scheme, and the schemas no route names directly.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::{Extension, Json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use super::error::ApiResult;
use super::state::AppState;
use super::{blobs, error, evaluations, limits, meta, reconstruct, runs, sweeps, ui, views};

/// Largest reference-statistics upload: a 2048-d float64 `.npz` is 33.6 MB.
const REFERENCE_UPLOAD_LIMIT: usize = 128 << 20;

/// Largest batch upload of an external evaluator: 512 images of 256×256 RGB are 100 MB.
const EVALUATION_UPLOAD_LIMIT: usize = 256 << 20;

/// Largest upload of reference features: 50 000 × 2048 float32 are 410 MB.
const REFERENCE_FEATURES_LIMIT: usize = 512 << 20;

/// What the document says beyond its routes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "hindsight",
        description = "Post-hoc EMA of neural-network weights (EDM2, arXiv 2312.02696): \
                       reconstruct any EMA length from stored snapshots, and sweep sample \
                       quality (FID, KID) over EMA lengths."
    ),
    components(schemas(
        error::ErrorCode,
        views::sweeps::SweepEvent,
        views::sweeps::SweepProgress,
        views::sweeps::ShutdownNotice,
        views::evaluations::MetricValue,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "reconstructions", description = "Reconstruct and download EMA weights"),
        (name = "runs", description = "Training runs"),
        (name = "snapshots", description = "Stored EMA snapshots and uploads"),
        (name = "sweeps", description = "FID/KID of reconstructions over EMA lengths: the curve"),
        (name = "references", description = "Reference statistics of image sets for the metrics"),
        (name = "evaluations", description = "External evaluators: the user's own model evaluates sweep points under a lease (docs/EVALUATORS.md)"),
        (name = "meta", description = "Health and this document"),
        (name = "ui", description = "The web UI (HTML, JavaScript, CSS; embedded in the binary)"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every route of the server with its per-route limits, and the document describing them.
pub(super) fn routes(state: &AppState) -> OpenApiRouter<AppState> {
    let json_limit = state.config.max_json_bytes;
    let deadline = |limit: usize| {
        axum::middleware::from_fn_with_state((state.clone(), limit), limits::body_deadline)
    };
    let mut router = OpenApiRouter::with_openapi(ApiDoc::openapi())
        // Reconstructions.
        .routes(routes!(reconstruct::post_reconstruct).map(|r| {
            r.route_layer(deadline(json_limit))
                .layer(DefaultBodyLimit::max(json_limit))
        }))
        .routes(routes!(reconstruct::get_reconstruction))
        .routes(routes!(reconstruct::get_weights))
        // Runs and snapshots.
        .routes(routes!(runs::list_runs))
        .routes(routes!(runs::get_run))
        .routes(routes!(runs::preview))
        .routes(routes!(runs::profiles))
        .routes(
            routes!(runs::list_snapshots, runs::upload_snapshot)
                .map(|r| r.layer(DefaultBodyLimit::disable())),
        )
        .routes(routes!(runs::delete_snapshot))
        .routes(routes!(runs::download_snapshot))
        .routes(routes!(blobs::head_blob))
        // Sweeps and reference statistics.
        .routes(routes!(sweeps::post_sweep).map(|r| {
            r.route_layer(deadline(json_limit))
                .layer(DefaultBodyLimit::max(json_limit))
        }))
        .routes(routes!(sweeps::list_sweeps).map(|r| r.layer(DefaultBodyLimit::max(json_limit))))
        .routes(routes!(sweeps::get_sweep, sweeps::delete_sweep))
        .routes(routes!(sweeps::sweep_events))
        .routes(routes!(sweeps::sweep_plot))
        .routes(routes!(sweeps::sweep_estimate))
        .routes(routes!(sweeps::point_grid))
        .routes(
            routes!(sweeps::list_references, sweeps::post_reference).map(|r| {
                r.route_layer(deadline(REFERENCE_UPLOAD_LIMIT))
                    .layer(DefaultBodyLimit::max(REFERENCE_UPLOAD_LIMIT))
            }),
        )
        .routes(routes!(evaluations::reference_features).map(|r| {
            r.route_layer(deadline(REFERENCE_FEATURES_LIMIT))
                .layer(DefaultBodyLimit::max(REFERENCE_FEATURES_LIMIT))
        }))
        // External evaluators.
        .routes(routes!(evaluations::claim).map(|r| {
            r.route_layer(deadline(json_limit))
                .layer(DefaultBodyLimit::max(json_limit))
        }))
        .routes(routes!(evaluations::heartbeat))
        .routes(routes!(evaluations::fail).map(|r| {
            r.route_layer(deadline(json_limit))
                .layer(DefaultBodyLimit::max(json_limit))
        }))
        .routes(routes!(evaluations::batch).map(|r| {
            r.route_layer(deadline(EVALUATION_UPLOAD_LIMIT))
                .layer(DefaultBodyLimit::max(EVALUATION_UPLOAD_LIMIT))
        }))
        .routes(routes!(evaluations::metrics).map(|r| {
            r.route_layer(deadline(json_limit))
                .layer(DefaultBodyLimit::max(json_limit))
        }))
        .routes(routes!(evaluations::finish))
        .routes(routes!(sweeps::get_reference))
        .routes(routes!(sweeps::reference_npz))
        // The UI.
        .routes(routes!(ui_index))
        .routes(routes!(ui_redirect))
        .routes(routes!(ui_redirect_slash))
        .routes(routes!(ui_file))
        // Meta.
        .routes(routes!(meta::healthz))
        .routes(routes!(meta::auth_status))
        .routes(routes!(openapi_json));
    // The UI's catch-all is `{*path}` for axum; OpenAPI writes a parameter `{path}`.
    let paths = &mut router.get_openapi_mut().paths.paths;
    if let Some(item) = paths.remove("/ui/{*path}") {
        paths.insert("/ui/{path}".to_owned(), item);
    }
    router
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
pub(super) async fn openapi_json(
    Extension(doc): Extension<Arc<utoipa::openapi::OpenApi>>,
) -> Json<utoipa::openapi::OpenApi> {
    Json((*doc).clone())
}

/// The web UI's page.
#[utoipa::path(get, path = "/", tag = "ui",
    responses(
        (status = 200, description = "The page (HTML)", content_type = "text/html"),
        (status = 304, description = "Not modified (If-None-Match matched its ETag)"),
    ))]
pub(super) async fn ui_index(headers: HeaderMap) -> Response {
    ui::index(headers).await
}

/// `/ui`: a permanent redirect to `/`, where the page lives.
#[utoipa::path(get, path = "/ui", tag = "ui",
    responses((status = 308, description = "To `/`")))]
pub(super) async fn ui_redirect() -> Response {
    ui::to_index().await
}

/// `/ui/`: a permanent redirect to `/`, where the page lives.
#[utoipa::path(get, path = "/ui/", tag = "ui",
    responses((status = 308, description = "To `/`")))]
pub(super) async fn ui_redirect_slash() -> Response {
    ui::to_index().await
}

/// A file of the web UI (JavaScript modules, CSS, the vendored chart library).
#[utoipa::path(get, path = "/ui/{*path}", tag = "ui",
    params(("path" = String, Path, description = "The file's path under web/ (may hold `/`)")),
    responses(
        (status = 200, description = "The file"),
        (status = 304, description = "Not modified (If-None-Match matched its ETag)"),
        (status = 404, description = "No such file", body = error::ErrorBody),
    ))]
pub(super) async fn ui_file(path: Path<String>, headers: HeaderMap) -> ApiResult<Response> {
    ui::file(path, headers).await
}
