//! The server's connections: how many are open, from whom, and which are idle.
//!
//! A connection is *idle* when no request is in flight on it (none started, or the last
//! response's body has been sent or dropped) — a socket that never sent a byte, and a
//! keep-alive connection between requests, alike. Idle connections cost the server a slot
//! and nothing else, so they are the ones given up under pressure:
//! - one idle for [`ServerConfig::idle_timeout`](super::ServerConfig::idle_timeout) (no byte
//!   read, no request in flight) is closed;
//! - when a new connection would pass [`max_connections`](super::ServerConfig::max_connections)
//!   in all, or [`max_connections_per_client`](super::ServerConfig::max_connections_per_client)
//!   from its address, the connection idle the longest (of that address, for the per-client
//!   cap) is closed to make room. Only when none is idle does the per-client cap refuse the
//!   new connection (a one-line 429 answer, then close), and the total cap make it wait in
//!   the listen queue.
//!
//! So silent sockets cannot lock other clients out, whoever opens them, and a busy
//! connection (an upload, a download, an event stream) is never cut to make room.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Milliseconds since `EPOCH`, the clock of [`Activity`].
fn now_ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// What a connection is doing: requests in flight, and when it last read a byte or
/// finished a request.
pub(super) struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
    /// Response bodies not yet sent or dropped, and when one was last asked for data.
    responses: AtomicUsize,
    body_polled_ms: AtomicU64,
    /// The client's requests in flight on all its connections (shared by its connections).
    client: Arc<AtomicUsize>,
}

impl Activity {
    fn new(epoch: Instant, client: Arc<AtomicUsize>) -> Self {
        Self {
            epoch,
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(now_ms(epoch)),
            responses: AtomicUsize::new(0),
            body_polled_ms: AtomicU64::new(now_ms(epoch)),
            client,
        }
    }

    /// How long a response has waited for the client to take more of it: the time since
    /// any response body on this connection was last asked for data, while one is unsent.
    /// hyper stops asking when the client stops reading (HTTP/1's socket buffer is full,
    /// HTTP/2's flow-control window is closed); an event stream is asked at least at every
    /// keep-alive (15 s).
    fn stalled_for(&self) -> Option<Duration> {
        if self.responses.load(Ordering::Acquire) == 0 {
            return None;
        }
        let last = self.body_polled_ms.load(Ordering::Relaxed);
        Some(Duration::from_millis(
            now_ms(self.epoch).saturating_sub(last),
        ))
    }

    /// Whether no request is in flight on this connection.
    pub(super) fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Requests in flight from this connection's client, on all its connections.
    pub(super) fn client_requests(&self) -> usize {
        self.client.load(Ordering::Acquire)
    }

    fn touch(&self) {
        self.last_ms.store(now_ms(self.epoch), Ordering::Relaxed);
    }

    /// How long the connection has been idle (`None`: a request is in flight).
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = self.last_ms.load(Ordering::Relaxed);
        Some(Duration::from_millis(
            now_ms(self.epoch).saturating_sub(last),
        ))
    }

    /// Marks a request in flight until the returned guard is dropped (with the response's
    /// body, or with the request if it is abandoned).
    pub(super) fn begin(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.client.fetch_add(1, Ordering::AcqRel);
        self.touch();
        RequestGuard(self.clone())
    }
}

/// A request in flight on a connection (see [`Activity::begin`]).
pub(super) struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.client.fetch_sub(1, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Entry {
    peer: IpAddr,
    activity: Arc<Activity>,
    close: CancellationToken,
}

/// Per client address: open connections, and requests in flight on all of them.
#[derive(Default)]
struct ClientCounts {
    connections: usize,
    requests: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    open: HashMap<u64, Entry>,
    per_client: HashMap<IpAddr, ClientCounts>,
}

impl Table {
    /// Asks the connection idle the longest (of `peer` only, when given) to close; whether
    /// there was one. One already asked is not asked again.
    fn evict_idlest(&mut self, peer: Option<IpAddr>) -> bool {
        let idlest = self
            .open
            .values()
            .filter(|e| peer.is_none_or(|p| e.peer == p) && !e.close.is_cancelled())
            .filter_map(|e| e.activity.idle_for().map(|idle| (idle, e)))
            .max_by_key(|(idle, _)| *idle);
        match idlest {
            Some((_, entry)) => {
                entry.close.cancel();
                true
            }
            None => false,
        }
    }

    /// Open connections (of `peer` only, when given): `(all, not yet asked to close)`.
    fn count(&self, peer: Option<IpAddr>) -> (usize, usize) {
        let mut all = 0;
        let mut live = 0;
        for e in self.open.values() {
            if peer.is_none_or(|p| e.peer == p) {
                all += 1;
                live += usize::from(!e.close.is_cancelled());
            }
        }
        (all, live)
    }
}

/// Why a connection was not admitted.
#[derive(Debug)]
pub(super) enum Refusal {
    /// Its address has `max_connections_per_client` busy connections open.
    ClientBusy,
    /// The server has `max_connections` busy connections open.
    ServerFull,
}

/// The registry of open connections (one per server).
pub(super) struct Connections {
    epoch: Instant,
    max_total: usize,
    max_per_client: usize,
    table: Mutex<Table>,
    /// Woken whenever a connection closes.
    closed: tokio::sync::Notify,
}

/// An admitted connection: its activity (for the IO wrapper and the service), the token
/// that asks it to close, and its slot, given back on drop.
pub(super) struct Admitted {
    pub activity: Arc<Activity>,
    pub close: CancellationToken,
    id: u64,
    registry: Arc<Connections>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut table = self.registry.table.lock().expect("connection table");
        if let Some(entry) = table.open.remove(&self.id) {
            if let Some(counts) = table.per_client.get_mut(&entry.peer) {
                counts.connections -= 1;
                if counts.connections == 0 {
                    table.per_client.remove(&entry.peer);
                }
            }
        }
        drop(table);
        self.registry.closed.notify_waiters();
    }
}

impl Connections {
    /// A registry for at most `max_total` connections, `max_per_client` per address.
    pub(super) fn new(max_total: usize, max_per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            max_total: max_total.max(1),
            max_per_client: max_per_client.max(1),
            table: Mutex::default(),
            closed: tokio::sync::Notify::new(),
        })
    }

    /// Waits until a connection closes, or 100 ms (a busy connection may have become idle
    /// without closing): then [`Connections::admit`] is worth trying again.
    pub(super) async fn changed(&self) {
        let _ = tokio::time::timeout(Duration::from_millis(100), self.closed.notified()).await;
    }

    /// Registers a connection from `peer`, just accepted. At the per-client cap, the
    /// connection of that address idle the longest is asked to close (none idle: refused,
    /// [`Refusal::ClientBusy`]); at the total cap, the idlest of all (none idle:
    /// [`Refusal::ServerFull`], try again after [`Connections::changed`]). The new connection
    /// itself is never the one closed. Connections asked to close count until they have
    /// closed, against a hard ceiling of twice each cap: however fast they are replaced,
    /// the sockets open stay bounded.
    pub(super) fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Refusal> {
        let mut table = self.table.lock().expect("connection table");
        let (all, live) = table.count(Some(peer));
        if all >= 2 * self.max_per_client
            || (live >= self.max_per_client && !table.evict_idlest(Some(peer)))
        {
            return Err(Refusal::ClientBusy);
        }
        let (all, live) = table.count(None);
        if all >= 2 * self.max_total || (live >= self.max_total && !table.evict_idlest(None)) {
            return Err(Refusal::ServerFull);
        }
        let id = table.next_id;
        table.next_id += 1;
        let client = table.per_client.entry(peer).or_default();
        client.connections += 1;
        let activity = Arc::new(Activity::new(self.epoch, client.requests.clone()));
        let close = CancellationToken::new();
        table.open.insert(
            id,
            Entry {
                peer,
                activity: activity.clone(),
                close: close.clone(),
            },
        );
        Ok(Admitted {
            activity,
            close,
            id,
            registry: self.clone(),
        })
    }

    /// Connections open now (for logs and tests).
    pub(super) fn open(&self) -> usize {
        self.table.lock().expect("connection table").open.len()
    }
}

/// Resolves when `activity` has been idle (no request in flight, no byte read) for
/// `timeout`.
pub(super) async fn idle_expired(activity: &Activity, timeout: Duration) {
    loop {
        match activity.idle_for() {
            Some(idle) if idle >= timeout => return,
            Some(idle) => tokio::time::sleep(timeout - idle).await,
            // Busy: look again after a while (cheap; one timer per connection).
            None => tokio::time::sleep(timeout.max(Duration::from_millis(100))).await,
        }
    }
}

/// Resolves when a response on `activity`'s connection has waited `timeout` for the client
/// to read more of it (see [`Activity::stalled_for`]).
pub(super) async fn response_stalled(activity: &Activity, timeout: Duration) {
    loop {
        match activity.stalled_for() {
            Some(stalled) if stalled >= timeout => return,
            Some(stalled) => tokio::time::sleep(timeout - stalled).await,
            None => tokio::time::sleep(timeout.max(Duration::from_millis(100))).await,
        }
    }
}

/// A socket that records, in its [`Activity`], when it last read a byte.
pub(super) struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Tracked<T> {
    pub(super) fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A response body that keeps its request counted as in flight until it is sent or
/// dropped.
pub(super) struct GuardedBody {
    inner: axum::body::Body,
    guard: RequestGuard,
}

impl GuardedBody {
    pub(super) fn new(inner: axum::body::Body, guard: RequestGuard) -> Self {
        let activity = &guard.0;
        activity.responses.fetch_add(1, Ordering::AcqRel);
        activity
            .body_polled_ms
            .store(now_ms(activity.epoch), Ordering::Relaxed);
        Self { inner, guard }
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        self.guard.0.responses.fetch_sub(1, Ordering::AcqRel);
    }
}

impl hyper::body::Body for GuardedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let activity = &self.guard.0;
        activity
            .body_polled_ms
            .store(now_ms(activity.epoch), Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_idlest_connection_makes_room_and_busy_ones_are_kept() {
        let registry = Connections::new(3, 2);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let first = registry.admit(a).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = registry.admit(a).unwrap();
        // Per client: a third from `a` makes the older idle one close.
        let third = registry.admit(a).unwrap();
        assert!(first.close.is_cancelled());
        assert!(!second.close.is_cancelled());
        // With both of `a`'s live connections busy, a fourth is refused.
        let busy2 = second.activity.begin();
        let busy3 = third.activity.begin();
        assert!(matches!(registry.admit(a), Err(Refusal::ClientBusy)));
        // Requests are counted per client, across its connections.
        assert_eq!(second.activity.client_requests(), 2);
        // In all (3): `first`, asked to close, does not count against the cap; `b` gets in.
        let other = registry.admit(b).unwrap();
        drop(first);
        assert_eq!(registry.open(), 3);
        // At the total cap, a newcomer makes the idlest other connection close (`other`)...
        let newcomer = registry.admit(b).unwrap();
        assert!(other.close.is_cancelled());
        assert!(!newcomer.close.is_cancelled());
        // ...and with every live connection busy, the next one waits: the newcomer just
        // accepted is not closed for it.
        let busy_new = newcomer.activity.begin();
        assert!(matches!(registry.admit(b), Err(Refusal::ServerFull)));
        assert!(!newcomer.close.is_cancelled());
        // However fast idle connections are replaced, open sockets stay under twice the cap.
        drop((busy2, busy3, busy_new));
        let c: IpAddr = "127.0.0.4".parse().unwrap();
        let mut kept = Vec::new();
        for _ in 0..20 {
            if let Ok(admitted) = registry.admit(c) {
                kept.push(admitted);
            }
            assert!(registry.open() <= 6, "{}", registry.open());
        }
        drop(other);
    }

    #[tokio::test]
    async fn idle_expires_only_without_requests_in_flight() {
        let registry = Connections::new(8, 8);
        let c = registry.admit("127.0.0.1".parse().unwrap()).ok().unwrap();
        let guard = c.activity.begin();
        let expired = tokio::time::timeout(
            Duration::from_millis(150),
            idle_expired(&c.activity, Duration::from_millis(50)),
        )
        .await;
        assert!(expired.is_err(), "a busy connection is not idle");
        drop(guard);
        let t = Instant::now();
        idle_expired(&c.activity, Duration::from_millis(50)).await;
        assert!(t.elapsed() >= Duration::from_millis(40));
    }
}
