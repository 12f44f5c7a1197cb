//! Liveness and the JSON answers for unknown routes and methods.

use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::Json;

use super::auth::{presented_token, Presented};
use super::error::{ApiError, ApiResult, ErrorCode};
use super::state::AppState;
use super::views::{AuthStatus, Health, TokenStatus};

/// Liveness: the index answers a query.
#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses((status = 200, description = "The server and its index are up", body = Health)))]
pub(super) async fn healthz(State(state): State<AppState>) -> ApiResult<Json<Health>> {
    state.data.db.runs().await?;
    Ok(Json(Health {
        status: "ok".into(),
    }))
}

/// Whether the bearer token this request carries may change state: a cheap check for a client
/// to run before a long training job, instead of learning of a bad token at its first upload.
#[utoipa::path(get, path = "/auth", tag = "meta",
    responses((status = 200, description = "How this request's token stands", body = AuthStatus)))]
pub(super) async fn auth_status(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Json<AuthStatus> {
    let hashes = &state.config.token_hashes;
    let token = match presented_token(&headers, hashes) {
        Presented::None => TokenStatus::None,
        Presented::Malformed | Presented::Invalid => TokenStatus::Invalid,
        Presented::Valid => TokenStatus::Valid,
    };
    let tokens_required = !hashes.is_empty();
    let can_write = match token {
        TokenStatus::Valid => true,
        TokenStatus::None | TokenStatus::Invalid => !tokens_required,
    };
    Json(AuthStatus {
        tokens_required,
        token,
        can_write,
    })
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
