//! What every handler shares: the settings and the state, built once by `hindsight serve`
//! (or a test) and cloned per request.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::jobs::Jobs;
use crate::app::DataDir;
use crate::error::{Error, Result};
use crate::sweep::external::{EvaluationConfig, Evaluations};
use crate::sweep::{Scorer, SweepLimits, WorkerConfig};

/// Server settings. Every field has a default suitable for a workstation: [`Default`] is the
/// one source of the defaults (`hindsight serve`'s flags show and use the same values), and
/// [`ServerConfig::validate`] the one place that checks them (the server refuses to start on
/// a config it rejects; nothing is clamped silently).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// BLAKE3 hashes of the accepted bearer tokens; empty means no authentication.
    pub token_hashes: Vec<blake3::Hash>,
    /// Largest JSON request body, in bytes.
    pub max_json_bytes: usize,
    /// Largest snapshot upload, in bytes.
    pub max_upload_bytes: u64,
    /// Uploads processed at once; more wait their turn.
    pub upload_concurrency: usize,
    /// How long `POST /reconstruct` waits for a computation before answering 202 with a
    /// status URL (a request may ask for less with `wait_secs`).
    pub reconstruct_wait: Duration,
    /// Hash snapshots while materializing and whole-file downloads while sending them.
    pub verify_reads: bool,
    /// Caps on sweep requests (images, points, seed sets, batch size).
    pub sweep_limits: SweepLimits,
    /// How often the server looks for changes in the sweeps that event streams follow (one
    /// query per followed sweep, however many clients follow it).
    pub sweep_event_poll: Duration,
    /// The sweep worker `serve_data_dir` runs beside the server (`None`: none; sweeps wait
    /// for `hindsight worker` processes).
    pub sweep_worker: Option<WorkerConfig>,
    /// NVIDIA's Inception weights for scoring sweeps, external ones included (default: the
    /// sweep worker's, else found as `metrics::locate_weights` finds them).
    pub fid_weights: Option<std::path::PathBuf>,
    /// How long an external evaluator's lease lasts from its claim and from each heartbeat
    /// or recorded write; a dead evaluator's point goes back to the queue after it.
    pub evaluation_lease: Duration,
    /// How long a client may take to send a request's headers once it has begun.
    pub header_read_timeout: Duration,
    /// An upload that sends no byte for this long is dropped (408) and its staging file
    /// removed.
    pub upload_idle_timeout: Duration,
    /// How long an upload waits for a free slot before it is answered 503 with
    /// `Retry-After`.
    pub upload_queue_wait: Duration,
    /// Uploads one client (IP address) may have in progress at once; more get 429. Keeps a
    /// few stalled or greedy clients from holding every slot.
    pub max_uploads_per_client: usize,
    /// After a shutdown signal, how long requests in flight may take to finish before
    /// their connections are closed.
    pub shutdown_grace: Duration,
    /// An upload must average at least this many bytes per second once its first
    /// `upload_idle_timeout` has passed (0: no minimum): a client that trickles a byte at a
    /// time cannot hold a slot for ever.
    pub upload_min_bytes_per_sec: u64,
    /// Most connections open at once. At the cap, the connection idle the longest is closed
    /// to make room; with none idle the server stops accepting until one closes.
    pub max_connections: usize,
    /// Most connections one client (IP address) may have open. At the cap, its connection
    /// idle the longest is closed to make room; with none idle a new one is answered 429
    /// and closed.
    pub max_connections_per_client: usize,
    /// A connection with no request in flight that receives nothing for this long is closed:
    /// a socket that never sends a byte, or a keep-alive connection between requests.
    pub idle_timeout: Duration,
    /// A response the client takes nothing of for this long (it stopped reading) has its
    /// connection dropped. Event streams send a keep-alive every 15 s, so this must be
    /// longer.
    pub send_timeout: Duration,
    /// Requests one client (IP address) may have in flight on all its connections; more
    /// are answered 429 at once.
    pub max_requests_per_client: usize,
    /// Answer only requests whose `Host` is a loopback name (`localhost`, `127.x.x.x`,
    /// `[::1]`, any port) or one of `allowed_hosts`: a server on loopback is then out of
    /// reach of DNS rebinding (a web page whose name resolves to 127.0.0.1). `serve` turns it
    /// on when it binds a loopback address.
    pub loopback_hosts_only: bool,
    /// More names `Host` may carry when `loopback_hosts_only` is on.
    pub allowed_hosts: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            token_hashes: Vec::new(),
            max_json_bytes: 64 << 10,
            max_upload_bytes: 64 << 30,
            upload_concurrency: 4,
            reconstruct_wait: Duration::from_secs(60),
            verify_reads: true,
            sweep_limits: SweepLimits::default(),
            sweep_event_poll: Duration::from_millis(500),
            sweep_worker: Some(WorkerConfig::default()),
            fid_weights: None,
            evaluation_lease: EvaluationConfig::default().lease,
            header_read_timeout: Duration::from_secs(10),
            upload_idle_timeout: Duration::from_secs(15),
            upload_queue_wait: Duration::from_secs(30),
            max_uploads_per_client: 2,
            shutdown_grace: Duration::from_secs(10),
            upload_min_bytes_per_sec: 8 << 10,
            max_connections: 4096,
            max_connections_per_client: 256,
            idle_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            max_requests_per_client: 256,
            loopback_hosts_only: true,
            allowed_hosts: Vec::new(),
        }
    }
}

/// Shortest and longest time a timeout setting may be.
const TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(86_400);

impl ServerConfig {
    /// Checks every setting; the error names the field (`send_timeout: …`) and what it must
    /// be. `serve` and `serve_data_dir` call it before they bind anything.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for the first setting out of range: a count that must be at
    /// least 1 is 0, a timeout is outside 0.1 s … 1 day, `send_timeout` is shorter than the
    /// event streams' keep-alive (15 s) allows (20 s), the sweep caps are below what one sweep
    /// needs, or a sweep worker's lease is outside 1 s … 1 day.
    pub fn validate(&self) -> Result<()> {
        let at_least_one = [
            ("max_json_bytes", self.max_json_bytes as u64),
            ("max_upload_bytes", self.max_upload_bytes),
            ("upload_concurrency", self.upload_concurrency as u64),
            ("max_uploads_per_client", self.max_uploads_per_client as u64),
            ("max_connections", self.max_connections as u64),
            (
                "max_connections_per_client",
                self.max_connections_per_client as u64,
            ),
            (
                "max_requests_per_client",
                self.max_requests_per_client as u64,
            ),
            (
                "sweep_limits.max_points",
                self.sweep_limits.max_points as u64,
            ),
            (
                "sweep_limits.max_seed_sets",
                self.sweep_limits.max_seed_sets as u64,
            ),
            ("sweep_limits.max_batch", self.sweep_limits.max_batch as u64),
            (
                "sweep_limits.max_unfinished_per_run",
                self.sweep_limits.max_unfinished_per_run as u64,
            ),
            (
                "sweep_limits.max_unfinished",
                self.sweep_limits.max_unfinished as u64,
            ),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return Err(Error::invalid(field, "must be at least 1"));
            }
        }
        if self.sweep_limits.max_images < 2 {
            return Err(Error::invalid(
                "sweep_limits.max_images",
                format!(
                    "{}; must be at least 2 (KID and FID need two images)",
                    self.sweep_limits.max_images
                ),
            ));
        }
        let timeouts = [
            ("header_read_timeout", self.header_read_timeout),
            ("upload_idle_timeout", self.upload_idle_timeout),
            ("upload_queue_wait", self.upload_queue_wait),
            ("shutdown_grace", self.shutdown_grace),
            ("idle_timeout", self.idle_timeout),
            ("send_timeout", self.send_timeout),
            ("sweep_event_poll", self.sweep_event_poll),
        ];
        for (field, value) in timeouts {
            if !TIMEOUT_RANGE.contains(&value) {
                return Err(Error::invalid(
                    field,
                    format!(
                        "{} s; must be between 0.1 s and 86400 s",
                        value.as_secs_f64()
                    ),
                ));
            }
        }
        if self.send_timeout < Duration::from_secs(20) {
            return Err(Error::invalid(
                "send_timeout",
                format!(
                    "{} s; must be at least 20 s (event streams send a keep-alive every 15 s)",
                    self.send_timeout.as_secs_f64()
                ),
            ));
        }
        if self.reconstruct_wait > Duration::from_secs(86_400) {
            return Err(Error::invalid(
                "reconstruct_wait",
                "must be at most 86400 s",
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&self.evaluation_lease)
        {
            return Err(Error::invalid(
                "evaluation_lease",
                format!(
                    "{} s; between 1 s and a day",
                    self.evaluation_lease.as_secs_f64()
                ),
            ));
        }
        if let Some(worker) = &self.sweep_worker {
            if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&worker.lease) {
                return Err(Error::invalid(
                    "sweep_worker.lease",
                    format!(
                        "{} s; must be between 1 s and 86400 s",
                        worker.lease.as_secs_f64()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Everything a handler needs, cloned per request (all fields are shared handles).
#[derive(Clone)]
pub struct AppState {
    /// The index and the blob store.
    pub data: DataDir,
    /// Settings.
    pub config: Arc<ServerConfig>,
    pub(super) jobs: Arc<Jobs>,
    pub(super) uploads: Arc<Semaphore>,
    /// Uploads in progress per client address.
    pub(super) uploads_by_client:
        Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    /// Wakes sweep event streams when their sweep changes (one poller for all).
    pub(super) sweep_watcher: Arc<super::watch::SweepWatcher>,
    /// The external-evaluator protocol (`/evaluations/...`), scoring with the same networks
    /// as the server's builtin worker.
    pub evaluations: Arc<Evaluations>,
    /// Cancelled when the server begins to shut down: long-lived responses (event streams)
    /// end, so that the graceful shutdown does not wait on them.
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl AppState {
    /// State over an opened data directory.
    pub fn new(data: DataDir, config: ServerConfig) -> Self {
        let uploads = Arc::new(Semaphore::new(config.upload_concurrency.max(1)));
        let weights = config
            .fid_weights
            .clone()
            .or_else(|| config.sweep_worker.as_ref().and_then(|w| w.weights.clone()));
        let scorer = Arc::new(Scorer::new(data.clone(), weights));
        let evaluations = Arc::new(Evaluations::new(
            data.clone(),
            scorer,
            EvaluationConfig {
                lease: config.evaluation_lease,
                verify_reads: config.verify_reads,
                ..EvaluationConfig::default()
            },
        ));
        Self {
            evaluations,
            data,
            config: Arc::new(config),
            jobs: Arc::default(),
            uploads,
            uploads_by_client: Arc::default(),
            sweep_watcher: Arc::default(),
            shutdown: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// How many materialization passes this server has started (for tests and metrics).
    pub fn materialization_passes(&self) -> u64 {
        self.jobs.passes()
    }
}
