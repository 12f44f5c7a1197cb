//! The HTTP error shape: `{"error": {"code": "...", "message": "..."}}` with a 4xx status for
//! what the client can fix, and a plain 500 for everything else (detail logged, not sent);
//! and reading request bodies into that shape.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::Error;

/// Every machine-readable error code of the API, each with its HTTP status: the one list
/// the server, the OpenAPI document (`ErrorCode`) and the clients share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: a request field, parameter or header is malformed; the message names it.
    InvalidInput,
    /// 401: a bearer token is needed (or the one given is not accepted).
    Unauthorized,
    /// 403: the request's `Host` or `Origin` is not one this server answers.
    Forbidden,
    /// 404: no such run, snapshot, reconstruction, sweep, reference statistics or route.
    NotFound,
    /// 405: the route does not take this method.
    MethodNotAllowed,
    /// 408: an upload or request body stalled and was dropped; nothing was stored.
    RequestTimeout,
    /// 409: the request conflicts with what is stored (an existing name, another snapshot at
    /// the same time and width).
    Conflict,
    /// 409: an evaluator's lease ran out, ended, or its sweep was cancelled; nothing was
    /// recorded: claim again.
    LeaseExpired,
    /// 409: a sweep point cannot be finished yet (batches or metrics missing; the message
    /// names them).
    Unfinished,
    /// 411: an upload without `Content-Length`.
    LengthRequired,
    /// 413: the body is larger than this route accepts.
    PayloadTooLarge,
    /// 415: a body of a media type the route does not take.
    UnsupportedMediaType,
    /// 416: a `Range` outside the file.
    RangeNotSatisfiable,
    /// 422: the stored data the request needs is unusable (e.g. a snapshot holding NaN).
    Unprocessable,
    /// 422: an evaluator's features differ from the server's on an audit image (another
    /// resize or normalisation); the message names the image and the difference.
    AuditFailed,
    /// 429: a per-client limit (uploads or requests in flight); `Retry-After` may say when.
    TooManyRequests,
    /// 429: a per-client connection limit, answered before the connection is closed.
    TooManyConnections,
    /// 429: a bound on stored or queued work (unfinished sweeps); `Retry-After` says when to
    /// try again.
    LimitReached,
    /// 4xx: another client error of the HTTP layer; the status says which.
    ClientError,
    /// 500: the server failed; its log has the details.
    Internal,
    /// 503: no upload slot came free in time; try again later.
    Busy,
    /// 507: the server's disk is full; nothing was stored.
    InsufficientStorage,
}

impl ErrorCode {
    /// The HTTP status that goes with the code.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidInput => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::Conflict | ErrorCode::LeaseExpired | ErrorCode::Unfinished => {
                StatusCode::CONFLICT
            }
            ErrorCode::LengthRequired => StatusCode::LENGTH_REQUIRED,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::Unprocessable | ErrorCode::AuditFailed => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::TooManyRequests
            | ErrorCode::TooManyConnections
            | ErrorCode::LimitReached => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::ClientError => StatusCode::BAD_REQUEST,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
        }
    }

    /// The code as the wire writes it (`invalid_input`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Conflict => "conflict",
            ErrorCode::LeaseExpired => "lease_expired",
            ErrorCode::Unfinished => "unfinished",
            ErrorCode::LengthRequired => "length_required",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RangeNotSatisfiable => "range_not_satisfiable",
            ErrorCode::Unprocessable => "unprocessable",
            ErrorCode::AuditFailed => "audit_failed",
            ErrorCode::TooManyRequests => "too_many_requests",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::LimitReached => "limit_reached",
            ErrorCode::ClientError => "client_error",
            ErrorCode::Internal => "internal",
            ErrorCode::Busy => "busy",
            ErrorCode::InsufficientStorage => "insufficient_storage",
        }
    }

    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 22] = [
        ErrorCode::InvalidInput,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::RequestTimeout,
        ErrorCode::Conflict,
        ErrorCode::LeaseExpired,
        ErrorCode::Unfinished,
        ErrorCode::LengthRequired,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::RangeNotSatisfiable,
        ErrorCode::Unprocessable,
        ErrorCode::AuditFailed,
        ErrorCode::TooManyRequests,
        ErrorCode::TooManyConnections,
        ErrorCode::LimitReached,
        ErrorCode::ClientError,
        ErrorCode::Internal,
        ErrorCode::Busy,
        ErrorCode::InsufficientStorage,
    ];
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as clients see it.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// HTTP status: the code's, except for [`ErrorCode::ClientError`].
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: ErrorCode,
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
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code (its HTTP status is fixed by it).
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    /// An error with this code (and the code's status) and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: code.status(),
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
        Self::new(ErrorCode::InvalidInput, message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// 500 `internal`, after logging what happened.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {detail}");
        Self::internal_logged()
    }

    /// 500 `internal` for an error already logged.
    fn internal_logged() -> Self {
        Self::new(
            ErrorCode::Internal,
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
            Error::NonFinite { .. } => ApiError::new(ErrorCode::Unprocessable, e.to_string()),
            Error::NotFound(m) => ApiError::not_found(m),
            Error::Conflict(m) => ApiError::new(ErrorCode::Conflict, m),
            Error::LeaseLost(m) => ApiError::new(ErrorCode::LeaseExpired, m),
            Error::Unfinished(m) => ApiError::new(ErrorCode::Unfinished, m),
            Error::AuditFailed(m) => ApiError::new(ErrorCode::AuditFailed, m),
            Error::LimitReached(m) => ApiError::new(ErrorCode::LimitReached, m).retry_after(30),
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
    tracing::error!(error = %e.chain_text(), "out of disk space (`hindsight gc` frees unreferenced blobs)");
    ApiError::new(
        ErrorCode::InsufficientStorage,
        "no space left on the server's disk: nothing was stored; try again once its operator \
         has freed space",
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
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
            ErrorCode::PayloadTooLarge,
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
    let code = ErrorCode::ALL
        .into_iter()
        .find(|c| c.status() == status && *c != ErrorCode::ClientError)
        .unwrap_or(ErrorCode::ClientError);
    let mut error = ApiError::new(code, text);
    error.status = status;
    let mut out = error.into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}
