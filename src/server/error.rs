//! The HTTP error shape: `{"error": {"code": "...", "message": "..."}}` with a 4xx status for
//! what the client can fix, and a plain 500 for everything else (detail logged, not sent);
//! and reading request bodies into that shape.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::Error;

/// An error as clients see it.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `invalid_input`.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u32>,
}

/// The JSON body of every error response.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code: `invalid_input`, `not_found`, `conflict`,
    /// `unauthorized`, `payload_too_large`, `length_required`, `range_not_satisfiable`,
    /// `method_not_allowed`, `unprocessable` (the stored data a request needs is unusable,
    /// e.g. a snapshot holding NaN), `request_timeout` (an upload stalled),
    /// `too_many_requests` (a client's upload limit), `busy` (no upload slot in time),
    /// `insufficient_storage` (the server's disk is full), `internal`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error with a `Retry-After` header.
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 400 `invalid_input`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 500 `internal`, after logging what happened.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {detail}");
        Self::internal_logged()
    }

    /// 500 `internal` for an error already logged.
    fn internal_logged() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the server log has the details",
        )
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            // What the client sent: it can fix it.
            Error::InvalidInput { .. } | Error::Incomplete { .. } | Error::OutOfRange { .. } => {
                ApiError::invalid(e.to_string())
            }
            // The request is fine, the stored data it needs is not.
            Error::NonFinite { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unprocessable",
                e.to_string(),
            ),
            Error::NotFound(m) => ApiError::not_found(m),
            Error::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            Error::LimitReached(m) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "limit_reached", m).retry_after(30)
            }
            Error::Io { ref source, .. } if crate::error::is_no_space(source) => no_space(&e),
            Error::Database(sqlx::Error::Database(ref d)) if d.code().as_deref() == Some("13") => {
                // SQLITE_FULL: the index could not grow.
                no_space(&e)
            }
            other => {
                tracing::error!(error = %other.chain_text(), "internal error");
                ApiError::internal_logged()
            }
        }
    }
}

/// 507 for a full disk (logged).
fn no_space(e: &Error) -> ApiError {
    tracing::error!(error = %e.chain_text(), "out of disk space");
    ApiError::new(
        StatusCode::INSUFFICIENT_STORAGE,
        "insufficient_storage",
        "no space left on the server's disk: nothing was stored; free space (e.g. `hindsight \
         gc`) and try again",
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Result of a handler.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// Parses a JSON body with field paths in the error (`targets[1].nimg: …`).
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    // Every JSON body of this API is an object; say so rather than name an internal type.
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        None => {
            return Err(ApiError::invalid(
                "request body: empty; expected a JSON object",
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "request body: expected a JSON object ({…})",
            ))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path == "?" {
            ApiError::invalid(format!("request body: {inner}"))
        } else {
            ApiError::invalid(format!("{path}: {inner}"))
        }
    })?;
    // One JSON object and nothing after it but white space (`{…}xyz` is not a request).
    de.end().map_err(|e| {
        ApiError::invalid(format!(
            "request body: unexpected data after the JSON object ({e})"
        ))
    })?;
    Ok(value)
}

/// Maps a body-reading rejection (too large, cut off) to the JSON error shape.
pub(super) fn body_rejection(r: axum::extract::rejection::BytesRejection) -> ApiError {
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

/// Gives the JSON error shape to the plain-text 4xx answers axum's extractors make on their
/// own (a repeated query parameter, a path that is not UTF-8), so every error a client sees
/// is `{"error": {"code", "message"}}`.
pub(super) async fn json_rejections(response: Response) -> Response {
    let status = response.status();
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if !status.is_client_error() || !plain {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 64 << 10).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => status
            .canonical_reason()
            .unwrap_or("bad request")
            .to_owned(),
    };
    let code = match status {
        StatusCode::BAD_REQUEST => "invalid_input",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        _ => "client_error",
    };
    let mut out = ApiError::new(status, code, text).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}
