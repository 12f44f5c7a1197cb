//! The HTTP server (axum): reconstructions on demand, downloads, uploads, listings.
//!
//! [`app`] builds the whole router from an [`AppState`]; `hindsight serve` and the tests use
//! the same function. This module alone knows HTTP status codes and the JSON error shape
//! ([`ApiError`]). CPU-heavy work (materialization, hashing uploads) runs on the blocking
//! pool, never on the async workers.
//!
//! Routes (all documented in `GET /openapi.json`):
//! - `POST /reconstruct` — solve and materialize (cached, single-flight, 202 when slow)
//! - `GET /reconstructions/{id}`, `GET /reconstructions/{id}/weights` (Range, ETag)
//! - `GET /runs`, `GET /runs/{run}`, `GET /runs/{run}/snapshots`
//! - `POST /runs/{run}/snapshots` — streaming upload of one safetensors snapshot
//! - `HEAD /blobs/{digest}`, `GET /healthz`, `GET /openapi.json`

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, head, post};
use axum::Router;
use tokio::sync::Semaphore;

use crate::app::DataDir;

mod auth;
mod blobs;
mod error;
mod openapi;
mod reconstruct;
mod runs;

pub use auth::{hash_token, new_token, parse_token_hashes};
pub use error::{ApiError, ApiResult};
pub use openapi::ApiDoc;

/// Server settings. Every field has a default suitable for a workstation.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// BLAKE3 hashes of the accepted bearer tokens; empty means no authentication.
    pub token_hashes: Vec<blake3::Hash>,
    /// Largest JSON request body, in bytes.
    pub max_json_bytes: usize,
    /// Largest snapshot upload, in bytes.
    pub max_upload_bytes: u64,
    /// Uploads processed at once; more wait their turn.
    pub upload_concurrency: usize,
    /// How long `POST /reconstruct` waits for a computation before answering 202 with a
    /// status URL (a request may ask for less with `wait_secs`).
    pub reconstruct_wait: Duration,
    /// Hash snapshots while materializing and whole-file downloads while sending them.
    pub verify_reads: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            token_hashes: Vec::new(),
            max_json_bytes: 64 << 10,
            max_upload_bytes: 64 << 30,
            upload_concurrency: 4,
            reconstruct_wait: Duration::from_secs(60),
            verify_reads: true,
        }
    }
}

/// Everything a handler needs, cloned per request (all fields are shared handles).
#[derive(Clone)]
pub struct AppState {
    /// The index and the blob store.
    pub data: DataDir,
    /// Settings.
    pub config: Arc<ServerConfig>,
    jobs: Arc<reconstruct::Jobs>,
    uploads: Arc<Semaphore>,
}

impl AppState {
    /// State over an opened data directory.
    pub fn new(data: DataDir, config: ServerConfig) -> Self {
        let uploads = Arc::new(Semaphore::new(config.upload_concurrency.max(1)));
        Self {
            data,
            config: Arc::new(config),
            jobs: Arc::default(),
            uploads,
        }
    }

    /// How many materialization passes this server has started (for tests and metrics).
    pub fn materialization_passes(&self) -> u64 {
        self.jobs.passes()
    }
}

/// The router with every route, the auth middleware, and JSON 404/405 fallbacks.
pub fn app(state: AppState) -> Router {
    let json_limit = state.config.max_json_bytes;
    Router::new()
        .route(
            "/reconstruct",
            post(reconstruct::post_reconstruct).layer(DefaultBodyLimit::max(json_limit)),
        )
        .route(
            "/reconstructions/{id}",
            get(reconstruct::get_reconstruction),
        )
        .route(
            "/reconstructions/{id}/weights",
            get(reconstruct::get_weights),
        )
        .route("/runs", get(runs::list_runs))
        .route("/runs/{run}", get(runs::get_run))
        .route(
            "/runs/{run}/snapshots",
            get(runs::list_snapshots)
                .post(runs::upload_snapshot)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/blobs/{digest}", head(blobs::head_blob))
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Serves `app(state)` on `listener` until `shutdown` resolves, then stops accepting and
/// lets requests in flight (uploads included) finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Liveness: the index answers a query.
#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses((status = 200, description = "The server and its index are up", body = Object)))]
pub(crate) async fn healthz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    state.data.db.runs().await?;
    Ok(axum::Json(serde_json::json!({"status": "ok"})))
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Parses a JSON body with field paths in the error (`targets[1].nimg: …`).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path == "?" {
            ApiError::invalid(format!("request body: {inner}"))
        } else {
            ApiError::invalid(format!("{path}: {inner}"))
        }
    })
}

/// Maps a body-reading rejection (too large, cut off) to the JSON error shape.
pub(crate) fn body_rejection(r: axum::extract::rejection::BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than this server accepts",
        )
    } else {
        ApiError::invalid(format!("reading the request body: {}", r.body_text()))
    }
}
