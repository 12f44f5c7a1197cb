//! HTTP for the tests: requests to `app(state)` in process (built with [`get`], [`post_json`],
//! …; sent with [`send`] or [`send_json`]), the API's error shape ([`assert_error`]), and a
//! plain HTTP/1.1 client over TCP for a server on a port ([`exchange`], [`http`]).
//!
//! Requests sent in process carry `Host: localhost` unless they name a host of their own, as
//! every HTTP/1.1 client's do: the server refuses a request without one. Tests of malformed
//! requests write their bytes to a `TcpStream` themselves.

use std::io::{Read, Write};
use std::net::TcpStream;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// A status and the error code the API sends with it, as [`assert_error`] expects them.
pub type Expected = (StatusCode, &'static str);

/// 400: the request is wrong; the message names what.
pub const INVALID_INPUT: Expected = (StatusCode::BAD_REQUEST, "invalid_input");
/// 401: a write without a valid bearer token.
pub const UNAUTHORIZED: Expected = (StatusCode::UNAUTHORIZED, "unauthorized");
/// 404: no such run, reconstruction, sweep, reference or route.
pub const NOT_FOUND: Expected = (StatusCode::NOT_FOUND, "not_found");
/// 405: the route exists, the method does not.
pub const METHOD_NOT_ALLOWED: Expected = (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
/// 409: the same slot holds something else.
pub const CONFLICT: Expected = (StatusCode::CONFLICT, "conflict");
/// 409: an evaluator's lease ran out or ended.
pub const LEASE_EXPIRED: Expected = (StatusCode::CONFLICT, "lease_expired");
/// 409: a sweep point cannot be finished yet.
pub const UNFINISHED: Expected = (StatusCode::CONFLICT, "unfinished");
/// 422: uploaded features differ from the server's on an audit image.
pub const AUDIT_FAILED: Expected = (StatusCode::UNPROCESSABLE_ENTITY, "audit_failed");
/// 411: an upload without `Content-Length`.
pub const LENGTH_REQUIRED: Expected = (StatusCode::LENGTH_REQUIRED, "length_required");
/// 413: a body over its limit.
pub const PAYLOAD_TOO_LARGE: Expected = (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
/// 422: the request is fine, the stored data it needs is not.
pub const UNPROCESSABLE: Expected = (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable");
/// 429: a bound on unfinished work is reached.
pub const LIMIT_REACHED: Expected = (StatusCode::TOO_MANY_REQUESTS, "limit_reached");
/// 500: the detail is in the server's log only.
pub const INTERNAL: Expected = (StatusCode::INTERNAL_SERVER_ERROR, "internal");

/// `GET uri`.
pub fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

/// `HEAD uri`.
pub fn head(uri: &str) -> Request<Body> {
    Request::head(uri).body(Body::empty()).unwrap()
}

/// `DELETE uri`.
pub fn delete(uri: &str) -> Request<Body> {
    Request::delete(uri).body(Body::empty()).unwrap()
}

/// `POST uri` with `body` as `application/json`.
pub fn post_json(uri: &str, body: &Value) -> Request<Body> {
    post_json_text(uri, body.to_string())
}

/// `POST uri` with `text` (JSON or not) as `application/json`.
pub fn post_json_text(uri: &str, text: impl Into<String>) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(text.into()))
        .unwrap()
}

/// `POST uri` with `bytes` and no headers at all (no type, no length).
pub fn post_bytes(uri: &str, bytes: impl Into<Body>) -> Request<Body> {
    Request::post(uri).body(bytes.into()).unwrap()
}

/// Headers added to a built request.
pub trait RequestExt: Sized {
    /// Sets `name: value`, replacing any earlier value.
    fn with_header(self, name: impl header::IntoHeaderName, value: &str) -> Self;

    /// Removes every `name` header.
    fn without_header(self, name: header::HeaderName) -> Self;

    /// `Authorization: Bearer token`.
    fn bearer(self, token: &str) -> Self {
        self.with_header(header::AUTHORIZATION, &format!("Bearer {token}"))
    }
}

impl RequestExt for Request<Body> {
    fn with_header(mut self, name: impl header::IntoHeaderName, value: &str) -> Self {
        self.headers_mut()
            .insert(name, HeaderValue::from_str(value).unwrap());
        self
    }

    fn without_header(mut self, name: header::HeaderName) -> Self {
        self.headers_mut().remove(name);
        self
    }
}

/// Sends `request` to `app` (with `Host: localhost` unless it has a host); the answer's
/// status, headers and body.
pub async fn send(app: &Router, mut request: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
    request
        .headers_mut()
        .entry(header::HOST)
        .or_insert(HeaderValue::from_static("localhost"));
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body.to_vec())
}

/// [`send`], for an answer in JSON: its status and body (`Null` when empty). Fails the test,
/// showing the body, when the body is not JSON.
pub async fn send_json(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let (status, _, body) = send(app, request).await;
    (status, json_body(status, &body))
}

/// `body` as JSON (`Null` when empty); fails the test, showing it, when it is not JSON.
#[track_caller]
pub fn json_body(status: StatusCode, body: &[u8]) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON ({status}): {}", String::from_utf8_lossy(body)))
}

/// Asserts that an answer is the API's error: `expected`'s status, `{"error": {"code":
/// expected's code, "message": …}}` with a message that is not empty and contains
/// `contains`.
#[track_caller]
pub fn assert_error(status: StatusCode, body: &Value, expected: Expected, contains: &str) {
    if let Some(problem) = error_mismatch(status, body, expected, contains) {
        panic!("{problem}");
    }
}

/// [`assert_error`] for one case of a table: a failure names `case`.
#[track_caller]
pub fn assert_case_error(
    case: &str,
    status: StatusCode,
    body: &Value,
    expected: Expected,
    contains: &str,
) {
    if let Some(problem) = error_mismatch(status, body, expected, contains) {
        panic!("{case}: {problem}");
    }
}

/// What keeps an answer from being the error [`assert_error`] expects, if anything.
fn error_mismatch(
    status: StatusCode,
    body: &Value,
    (expected_status, code): Expected,
    contains: &str,
) -> Option<String> {
    let message = body["error"]["message"].as_str().unwrap_or_default();
    if status != expected_status {
        Some(format!(
            "status {status}, expected {expected_status}: {body}"
        ))
    } else if body["error"]["code"] != code {
        Some(format!(
            "code {}, expected {code:?}: {body}",
            body["error"]["code"]
        ))
    } else if message.is_empty() {
        Some(format!("no message: {body}"))
    } else if !message.contains(contains) {
        Some(format!("{message:?} should mention {contains:?}"))
    } else {
        None
    }
}

/// The answer to a request made over TCP.
pub struct Reply {
    /// The status code (0 when the answer has no status line).
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    /// The body, chunked transfer coding removed.
    pub body: Vec<u8>,
    /// Whether the body has all the bytes `Content-Length` announced (true without one).
    pub complete: bool,
}

/// One HTTP/1.1 exchange on a fresh connection to `addr` (`Connection: close`): `Host: addr`
/// unless `headers` name one, `headers`, and `Content-Length` for a body or a POST.
pub fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    exchange_on(
        TcpStream::connect(addr).unwrap(),
        addr,
        method,
        path,
        headers,
        body,
    )
}

/// [`exchange`] on the connection `tcp` (made to `addr`); the answer is read to its end (or
/// to the connection's read timeout).
pub fn exchange_on(
    mut tcp: TcpStream,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).unwrap();
    tcp.write_all(body).unwrap();
    let mut raw = Vec::new();
    let _ = tcp.read_to_end(&mut raw);
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, body) = match split {
        Some(at) => (&raw[..at], &raw[at + 4..]),
        None => (&raw[..], &[][..]),
    };
    let head = String::from_utf8_lossy(head).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    let announced = header("content-length").and_then(|v| v.parse::<usize>().ok());
    Reply {
        status,
        complete: announced.is_none_or(|n| n == body.len()),
        head,
        body,
    }
}

/// A chunked body's data, up to its last chunk (or as far as it is whole).
fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = s.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&s[..eol]);
        let size = size.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(size, 16).unwrap_or(0);
        let rest = &s[eol + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        s = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// [`exchange`] as an API client makes it: status and body text. `token` adds a bearer
/// header; a body (or a POST) is sent as `application/json`.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let body = body.unwrap_or("");
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = Vec::new();
    if let Some(b) = &bearer {
        headers.push(("Authorization", b.as_str()));
    }
    if !body.is_empty() || method == "POST" {
        headers.push(("Content-Type", "application/json"));
    }
    let reply = exchange(addr, method, path, &headers, body.as_bytes());
    (
        reply.status,
        String::from_utf8_lossy(&reply.body).to_string(),
    )
}

/// A server in process: `app(state)` over a data directory in a fresh temporary folder, with
/// [`send`] and [`send_json`] as methods.
pub struct Server {
    _dir: tempfile::TempDir,
    /// The server's state.
    pub state: hindsight::server::AppState,
    /// Its data directory (index and store).
    pub data: hindsight::app::DataDir,
}

impl Server {
    /// A server with `config` on an empty data directory.
    pub async fn new(config: hindsight::server::ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = hindsight::app::DataDir::open(dir.path()).await.unwrap();
        let state = hindsight::server::AppState::new(data.clone(), config);
        Self {
            _dir: dir,
            state,
            data,
        }
    }

    /// The router, as `hindsight serve` builds it.
    pub fn app(&self) -> Router {
        hindsight::server::app(self.state.clone())
    }

    /// Sends `request`: status, headers, body.
    pub async fn send(&self, request: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
        send(&self.app(), request).await
    }

    /// Sends `request`: status and JSON body.
    pub async fn json(&self, request: Request<Body>) -> (StatusCode, Value) {
        send_json(&self.app(), request).await
    }
}
