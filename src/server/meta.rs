//! Liveness and the JSON answers for unknown routes and methods.

use axum::extract::State;
use axum::http::{Method, Uri};
use axum::Json;

use super::error::{ApiError, ApiResult, ErrorCode};
use super::state::AppState;
use super::views::Health;

/// Liveness: the index answers a query.
#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses((status = 200, description = "The server and its index are up", body = Health)))]
pub(super) async fn healthz(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    state.data.db.runs().await?;
    Ok(Json(Health {
        status: "ok".into(),
    }))
}

/// 404 for a path no route serves.
pub(super) async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

/// 405 for a method a route does not take.
pub(super) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on {}", uri.path()),
    )
}
