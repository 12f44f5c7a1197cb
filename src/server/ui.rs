//! The web UI: the static files of `web/`, embedded in the binary (so `cargo install` users
//! get them and they work offline), served at `/` and `/ui/…`.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ApiResult};

/// `(path under /ui/, content type, bytes)` of every embedded file.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../web/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../web/app.css"),
    ),
    (
        "vendor/uplot/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "vendor/uplot/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../web/vendor/uplot/uPlot.min.css"),
    ),
    (
        "vendor/uplot/LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../../web/vendor/uplot/LICENSE"),
    ),
];

/// The page may load only its own scripts and styles (uPlot and the page set inline style
/// attributes), images from this server, and talk to this server.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'";

/// Strong ETags of the embedded files, computed once.
fn etags() -> &'static Vec<String> {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        FILES
            .iter()
            .map(|(_, _, bytes)| format!("\"{}\"", &blake3::hash(bytes).to_hex()[..32]))
            .collect()
    })
}

fn serve(index: usize, headers: &HeaderMap) -> Response {
    let (_, content_type, bytes) = FILES[index];
    let etag = &etags()[index];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (StatusCode::OK, bytes).into_response()
    };
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// The UI's page.
pub(super) async fn index(headers: HeaderMap) -> Response {
    serve(0, &headers)
}

/// A file of the UI.
pub(super) async fn file(Path(path): Path<String>, headers: HeaderMap) -> ApiResult<Response> {
    FILES
        .iter()
        .position(|(p, _, _)| *p == path)
        .map(|i| serve(i, &headers))
        .ok_or_else(|| ApiError::not_found(format!("no file /ui/{path}")))
}
