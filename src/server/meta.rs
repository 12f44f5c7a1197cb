//! Liveness and the JSON answers for unknown routes and methods.

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::Json;

use super::error::{ApiError, ApiResult};
use super::state::AppState;

/// Liveness: the index answers a query.
#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses((status = 200, description = "The server and its index are up", body = Object)))]
pub(super) async fn healthz(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    state.data.db.runs().await?;
    Ok(Json(serde_json::json!({"status": "ok"})))
}

/// 404 for a path no route serves.
pub(super) async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

/// 405 for a method a route does not take.
pub(super) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
