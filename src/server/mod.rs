//! The HTTP server (axum): reconstructions on demand, downloads, uploads, listings.
//!
//! [`app`] builds the whole router from an [`AppState`]; `hindsight serve` and the tests use
//! the same function. This module alone knows HTTP status codes and the JSON error shape
//! ([`ApiError`], [`ErrorCode`]); what goes over the wire is its `views` and the library's
//! payload types that derive their schema (see `views`). CPU-heavy work
//! (materialization, hashing uploads) runs on the blocking pool, never on the async workers.
//!
//! The routes are listed once, in `openapi::routes`, which registers each handler with its
//! `#[utoipa::path]` annotation: the same list makes the router and `GET /openapi.json`, so
//! no route goes undocumented. Read the document (or `openapi.rs`) for the list.
//!
//! Files: `state` (settings, shared state), `jobs` (single-flight reconstruction jobs),
//! `views` (wire types), `error` (the error codes and shape, body parsing), `auth` (bearer
//! tokens), one file per route family (`reconstruct`, `runs`, `sweeps`, `blobs`, `meta`, `ui`),
//! `openapi` (the route list and the document), `connections` (connection limits), `watch`
//! (one poller for the sweeps event streams follow), `limits` (body deadlines).
//! `serve_data_dir` also runs one sweep worker (`crate::sweep::Worker`) beside the server.

use std::net::SocketAddr;
use std::path::Path;

use axum::Router;

use crate::app::DataDir;
use crate::error::{Error, Result};

mod auth;
mod blobs;
mod connections;
mod error;
mod evaluations;
mod jobs;
mod limits;
mod meta;
mod openapi;
mod reconstruct;
mod runs;
mod state;
mod sweeps;
mod ui;
mod views;
mod watch;

pub use auth::{append_new_token, hash_token, new_token, parse_token_hashes, read_token_file};
pub use error::{ApiError, ApiResult, ErrorCode};
pub use state::{AppState, ServerConfig};

/// The router with every route (each documented in `GET /openapi.json`, see `openapi`), the
/// auth middleware, and JSON 404/405 fallbacks.
pub fn app(state: AppState) -> Router {
    let (router, doc) = openapi::routes(&state).split_for_parts();
    router
        .layer(axum::Extension(std::sync::Arc::new(doc)))
        .fallback(meta::not_found)
        .method_not_allowed_fallback(meta::method_not_allowed)
        .layer(axum::middleware::map_response(error::json_rejections))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::same_origin,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Concurrent HTTP/2 streams per connection.
const HTTP2_MAX_STREAMS: u32 = 16;

/// How long an idle connection asked to close may take to say goodbye before it is dropped.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The answer to a request past [`ServerConfig::max_requests_per_client`].
fn too_many_requests(limit: usize) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut response = ApiError::new(
        error::ErrorCode::TooManyRequests,
        format!(
            "this address has more than {limit} requests in flight (the per-client limit); \
             wait for some to finish"
        ),
    )
    .into_response();
    response.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from_static("1"),
    );
    response
}

/// Serves `app(state)` on `listener` until `shutdown` resolves, then stops accepting and
/// lets requests in flight (uploads included) finish for at most
/// [`ServerConfig::shutdown_grace`], after which their connections are closed: shutdown
/// takes bounded time whatever the clients do.
///
/// HTTP/1.1 and HTTP/2 (hyper). A client gets [`ServerConfig::header_read_timeout`] to send
/// its request headers once it has begun; a connection idle for
/// [`ServerConfig::idle_timeout`] (no request in flight, no byte received: a socket that never
/// sends anything, or a keep-alive connection between requests) is closed; and the caps on
/// open connections ([`ServerConfig::max_connections`] in all,
/// [`ServerConfig::max_connections_per_client`] per address) close idle connections to make
/// room rather than lock new clients out (`connections`); a response the client has not
/// read from for [`ServerConfig::send_timeout`] has its connection dropped; a client may have
/// [`ServerConfig::max_requests_per_client`] requests in flight (more get 429), at most
/// 16 per HTTP/2 connection. Each request carries the peer's
/// address (`axum::extract::ConnectInfo<SocketAddr>`) for per-client limits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    state.config.validate().map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("server settings: {e}"),
        )
    })?;
    let header_timeout = state.config.header_read_timeout;
    let idle_timeout = state.config.idle_timeout;
    let registry = connections::Connections::new(
        state.config.max_connections,
        state.config.max_connections_per_client,
    );
    let send_timeout = state.config.send_timeout;
    let max_requests_per_client = state.config.max_requests_per_client;
    let grace = state.config.shutdown_grace;
    let router = app(state);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    // Each HTTP/2 stream is a request in flight (counted per client below); a few per
    // connection are enough for any real client.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(HTTP2_MAX_STREAMS);
    let stopping = tokio_util::sync::CancellationToken::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    'accept: loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, a connection reset before accept: keep serving.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let admitted = loop {
            match registry.admit(peer.ip()) {
                Ok(a) => break a,
                // Every connection is busy: this one waits (in our hands, as it would in
                // the listen queue) for one to close or become idle.
                Err(connections::Refusal::ServerFull) => tokio::select! {
                    () = registry.changed() => {}
                    () = &mut shutdown => break 'accept,
                },
                Err(connections::Refusal::ClientBusy) => {
                    tracing::debug!(%peer, "connection refused: the client's connections are all busy");
                    // One short answer if the socket takes it at once, then close.
                    let body = serde_json::to_string(&error::ErrorBody {
                        error: error::ErrorDetail {
                            code: error::ErrorCode::TooManyConnections,
                            message: "this address has as many connections open as it may, all \
                                      busy; try again"
                                .into(),
                        },
                    })
                    .unwrap_or_default();
                    let answer = format!(
                        "HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\nContent-Type: \
                         application/json\r\nRetry-After: 1\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.try_write(answer.as_bytes());
                    continue 'accept;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let activity = admitted.activity.clone();
        let service =
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let guard = activity.begin();
                let busy = activity.client_requests() > max_requests_per_client;
                let mut request = request.map(axum::body::Body::new);
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                let response = router.clone().oneshot(request);
                async move {
                    let response = if busy {
                        too_many_requests(max_requests_per_client)
                    } else {
                        response.await?
                    };
                    Ok::<_, std::convert::Infallible>(response.map(|body| {
                        axum::body::Body::new(connections::GuardedBody::new(body, guard))
                    }))
                }
            });
        let io = TokioIo::new(connections::Tracked::new(stream, admitted.activity.clone()));
        let connection = builder.serve_connection(io, service).into_owned();
        let stopping = stopping.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let why = tokio::select! {
                done = connection.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = connections::idle_expired(&admitted.activity, idle_timeout) => "idle",
                () = admitted.close.cancelled() => "making room",
                () = connections::response_stalled(&admitted.activity, send_timeout) => {
                    tracing::info!(%peer, "dropping a connection whose client stopped reading");
                    return;
                }
                () = stopping.cancelled() => "shutting down",
            };
            tracing::debug!(%peer, why, "closing a connection");
            if why == "shutting down" && admitted.activity.is_idle() {
                // Nothing in flight: nothing to finish.
                return;
            }
            // A request in flight finishes (shutdown; bounded by the grace period); an idle
            // connection says goodbye (HTTP/2's GOAWAY) and is dropped after at most
            // CLOSE_WAIT, whether or not the client answers.
            connection.as_mut().graceful_shutdown();
            if why == "shutting down" {
                let _ = connection.await;
            } else {
                let _ = tokio::time::timeout(CLOSE_WAIT, connection).await;
            }
            drop(admitted);
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let open = registry.open();
    stopping.cancel();
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            open,
            grace_secs = grace.as_secs_f64(),
            "requests still in flight at the end of the shutdown grace period; closing their \
             connections"
        );
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// `hindsight serve`: opens the data directory (which recovers what killed writers left:
/// staging files, abandoned claims, empty runs), binds `addr`, tells `on_listening` the bound
/// address, and serves until `shutdown` resolves.
pub async fn serve_data_dir(
    data_dir: &Path,
    addr: SocketAddr,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    config.validate()?;
    let data = DataDir::open(data_dir).await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("binding {addr}"), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io(format!("binding {addr}"), e))?;
    on_listening(local);
    let stop = tokio_util::sync::CancellationToken::new();
    let worker_config = config.sweep_worker.clone();
    let state = AppState::new(data.clone(), config);
    // One set of feature networks for the builtin worker and external evaluations.
    let worker = worker_config.map(|worker_config| {
        let worker = std::sync::Arc::new(crate::sweep::Worker::with_scorer(
            data.clone(),
            worker_config,
            state.evaluations.scorer(),
            std::sync::Arc::new(log_worker_event),
        ));
        tracing::info!(worker = worker.id(), "sweep worker started");
        tokio::spawn(worker.run(stop.clone().cancelled_owned()))
    });
    let served = serve(listener, state.clone(), {
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
            state.shutdown.cancel();
        }
    })
    .await;
    stop.cancel();
    if let Some(w) = worker {
        let _ = w.await;
    }
    served.map_err(|e| Error::io(format!("serving on {local}"), e))
}

/// The server's sweep worker reports to the log.
fn log_worker_event(event: &crate::sweep::WorkerEvent) {
    use crate::sweep::WorkerEvent as E;
    match event {
        E::Claimed { point, .. } => tracing::info!(
            sweep = point.sweep_id,
            idx = point.idx,
            sigma_rel = point.sigma_rel,
            nimg = point.nimg,
            images_done = point.images_done,
            "sweep point claimed"
        ),
        E::Batch {
            sweep,
            idx,
            images,
            seconds,
        } => {
            tracing::debug!(sweep, idx, images, seconds, "sweep batch recorded")
        }
        E::Finished { sweep, idx, result } => tracing::info!(
            sweep,
            idx,
            fid = result.fid.as_ref().map(|m| m.mean),
            kid = result.kid.as_ref().map(|m| m.mean),
            "sweep point recorded"
        ),
        E::Failed {
            sweep,
            idx,
            error,
            retry,
        } => {
            tracing::warn!(sweep, idx, retry, error = %error, "sweep point failed")
        }
        E::Lost { sweep, idx } => tracing::info!(sweep, idx, "sweep point lease lost"),
    }
}

/// Resolves on Ctrl-C or SIGTERM: the signals that should stop a server gracefully.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
