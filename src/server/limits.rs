//! Bounds on what a client can hold: a deadline for reading request bodies (the JSON and
//! reference-statistics routes; uploads have their own idle timeout and minimum rate in
//! `runs`).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::error::{ApiError, ErrorCode};
use super::state::AppState;

/// Middleware: reads the whole request body within a deadline of the upload idle timeout
/// plus the body's length at the minimum upload rate, then hands it on. A client that
/// sends its body slowly, or not at all, gets 408 instead of holding a connection and a
/// task for ever. A body larger than `limit` bytes is refused (413) before or while it is read.
pub async fn body_deadline(
    State((state, limit)): State<(AppState, usize)>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let announced = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if announced > limit as u64 {
        return Err(too_large(limit));
    }
    let rate = state.config.upload_min_bytes_per_sec.max(1);
    let deadline =
        state.config.upload_idle_timeout + std::time::Duration::from_secs(announced / rate);
    let bytes = match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e))
            if std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) =>
        {
            return Err(too_large(limit))
        }
        Ok(Err(e)) => {
            return Err(ApiError::invalid(format!(
                "request body: it could not be read ({e})"
            )))
        }
        Err(_) => {
            return Err(ApiError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "the request body did not arrive within {} s",
                    deadline.as_secs()
                ),
            ))
        }
    };
    Ok(next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await)
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("request body: larger than this route's limit of {limit} bytes"),
    )
}
