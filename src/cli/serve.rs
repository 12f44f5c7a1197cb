//! `hindsight serve` and `hindsight token`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::common::block_on;
use anyhow::bail;
use clap::Subcommand;
use hindsight::server::{self, ServerConfig};
use hindsight::sweep::{SweepLimits, WorkerConfig};

/// The flag of `hindsight serve` that sets a [`ServerConfig`] field (as
/// [`ServerConfig::validate`] names it).
fn flag_of(field: &str) -> String {
    match field {
        "upload_idle_timeout" => "--upload-idle-secs".into(),
        "header_read_timeout" => "--header-read-timeout-secs".into(),
        "shutdown_grace" => "--shutdown-grace-secs".into(),
        "idle_timeout" => "--idle-timeout-secs".into(),
        "send_timeout" => "--send-timeout-secs".into(),
        "reconstruct_wait" => "--reconstruct-wait-secs".into(),
        "sweep_worker.lease" => "--sweep-lease-secs".into(),
        "evaluation_lease" => "--evaluation-lease-secs".into(),
        "sweep_limits.max_images" => "--max-sweep-images".into(),
        "sweep_limits.max_unfinished_per_run" => "--max-unfinished-sweeps-per-run".into(),
        "sweep_limits.max_unfinished" => "--max-unfinished-sweeps".into(),
        other => format!("--{}", other.replace('_', "-")),
    }
}

/// Options of `hindsight serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on. Anything but loopback needs --token-file (or
    /// --insecure-no-auth).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// File of accepted token hashes, one `blake3:<hex>` per line (see `hindsight token
    /// new`). With tokens, every request that is not GET or HEAD needs `Authorization:
    /// Bearer <token>`.
    #[arg(long, env = "HINDSIGHT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Allow a non-loopback address without tokens.
    #[arg(long)]
    insecure_no_auth: bool,
    /// Largest snapshot upload, in bytes.
    #[arg(long, default_value_t = ServerConfig::default().max_upload_bytes)]
    max_upload_bytes: u64,
    /// Uploads processed at once.
    #[arg(long, default_value_t = ServerConfig::default().upload_concurrency)]
    upload_concurrency: usize,
    /// Uploads one client (IP address) may have in progress at once; more get 429.
    #[arg(long, default_value_t = ServerConfig::default().max_uploads_per_client)]
    max_uploads_per_client: usize,
    /// An upload that sends nothing for this many seconds is dropped (408).
    #[arg(long, default_value_t = ServerConfig::default().upload_idle_timeout.as_secs_f64())]
    upload_idle_secs: f64,
    /// Seconds a client has to send a request's headers once it has begun.
    #[arg(long, default_value_t = ServerConfig::default().header_read_timeout.as_secs_f64())]
    header_read_timeout_secs: f64,
    /// On Ctrl-C or SIGTERM, seconds requests in flight get to finish before their
    /// connections are closed.
    #[arg(long, default_value_t = ServerConfig::default().shutdown_grace.as_secs_f64())]
    shutdown_grace_secs: f64,
    /// An upload must average at least this many bytes per second after its first
    /// --upload-idle-secs (0: no minimum); slower ones are dropped (408).
    #[arg(long, default_value_t = ServerConfig::default().upload_min_bytes_per_sec)]
    upload_min_bytes_per_sec: u64,
    /// Most connections open at once. At the cap the connection idle the longest is closed
    /// to make room; with none idle, new ones wait to be accepted.
    #[arg(long, default_value_t = ServerConfig::default().max_connections)]
    max_connections: usize,
    /// Most connections one client (IP address) may have open. At the cap its connection
    /// idle the longest is closed; with none idle, a new one is answered 429.
    #[arg(long, default_value_t = ServerConfig::default().max_connections_per_client)]
    max_connections_per_client: usize,
    /// Seconds a connection with no request in flight may send nothing before it is closed
    /// (a silent socket, or a keep-alive connection between requests).
    #[arg(long, default_value_t = ServerConfig::default().idle_timeout.as_secs_f64())]
    idle_timeout_secs: f64,
    /// Seconds a response may wait for its client to read more before the connection is
    /// dropped (a client that stopped reading). At least 20 (event streams send a keep-alive
    /// every 15 s).
    #[arg(long, default_value_t = ServerConfig::default().send_timeout.as_secs_f64())]
    send_timeout_secs: f64,
    /// Requests one client (IP address) may have in flight at once, on all its connections;
    /// more get 429.
    #[arg(long, default_value_t = ServerConfig::default().max_requests_per_client)]
    max_requests_per_client: usize,
    /// A name the `Host` header may carry besides localhost, 127.0.0.1 and [::1] when
    /// serving a loopback address (requests naming other hosts are refused, against DNS
    /// rebinding). Repeatable.
    #[arg(long = "allowed-host", value_name = "NAME")]
    allowed_hosts: Vec<String>,
    /// How long POST /reconstruct waits before answering 202 with a status URL.
    #[arg(long, default_value_t = ServerConfig::default().reconstruct_wait.as_secs_f64())]
    reconstruct_wait_secs: f64,
    /// Do not hash snapshots while materializing, nor downloads while sending them.
    #[arg(long)]
    no_verify: bool,
    /// Run no sweep worker in the server (sweeps then wait for `hindsight worker`).
    #[arg(long)]
    no_sweep_worker: bool,
    /// The sweep worker's lease in seconds: after a crash, a point is resumed this long
    /// after its last heartbeat.
    #[arg(long, default_value_t = WorkerConfig::default().lease.as_secs_f64())]
    sweep_lease_secs: f64,
    /// An external evaluator's lease in seconds: a point whose evaluator died (no heartbeat)
    /// goes back to the queue this long after its last heartbeat or upload.
    #[arg(long, default_value_t = ServerConfig::default().evaluation_lease.as_secs_f64())]
    evaluation_lease_secs: f64,
    /// Most images per seed set a sweep may ask for.
    #[arg(long, default_value_t = SweepLimits::default().max_images)]
    max_sweep_images: usize,
    /// Most unfinished (queued or running) sweeps of one run; more are refused (429).
    #[arg(long, default_value_t = SweepLimits::default().max_unfinished_per_run)]
    max_unfinished_sweeps_per_run: usize,
    /// Most unfinished sweeps in all; more are refused (429).
    #[arg(long, default_value_t = SweepLimits::default().max_unfinished)]
    max_unfinished_sweeps: usize,
    /// The Inception weights for sweeps (default: $HINDSIGHT_FID_WEIGHTS, else the usual
    /// cache paths).
    #[arg(long)]
    fid_weights: Option<PathBuf>,
}

/// Serves until Ctrl-C or SIGTERM.
pub fn run(data_dir: &Path, args: ServeArgs) -> anyhow::Result<()> {
    let token_hashes = match &args.token_file {
        Some(path) => server::read_token_file(path)?,
        None => Vec::new(),
    };
    let addr = args.addr;
    if !addr.ip().is_loopback() && token_hashes.is_empty() && !args.insecure_no_auth {
        bail!(
            "refusing to serve {addr} without authentication: give --token-file (see \
             `hindsight token new`), bind 127.0.0.1, or pass --insecure-no-auth"
        );
    }
    let auth = if token_hashes.is_empty() {
        "no authentication".to_owned()
    } else {
        format!("{} token(s) for writes", token_hashes.len())
    };
    let secs = |flag: &str, value: f64| {
        std::time::Duration::try_from_secs_f64(value)
            .map_err(|_| anyhow::anyhow!("{flag}: {value} is not a number of seconds ≥ 0"))
    };
    let defaults = ServerConfig::default();
    let sweep_worker = if args.no_sweep_worker {
        None
    } else {
        Some(WorkerConfig {
            lease: secs("--sweep-lease-secs", args.sweep_lease_secs)?,
            weights: args.fid_weights.clone(),
            verify_reads: !args.no_verify,
            ..Default::default()
        })
    };
    let config = ServerConfig {
        token_hashes,
        sweep_worker,
        fid_weights: args.fid_weights.clone(),
        evaluation_lease: secs("--evaluation-lease-secs", args.evaluation_lease_secs)?,
        sweep_limits: SweepLimits {
            max_images: args.max_sweep_images,
            max_unfinished_per_run: args.max_unfinished_sweeps_per_run,
            max_unfinished: args.max_unfinished_sweeps,
            ..defaults.sweep_limits
        },
        max_upload_bytes: args.max_upload_bytes,
        upload_concurrency: args.upload_concurrency,
        reconstruct_wait: secs("--reconstruct-wait-secs", args.reconstruct_wait_secs)?,
        verify_reads: !args.no_verify,
        max_uploads_per_client: args.max_uploads_per_client,
        upload_idle_timeout: secs("--upload-idle-secs", args.upload_idle_secs)?,
        header_read_timeout: secs("--header-read-timeout-secs", args.header_read_timeout_secs)?,
        shutdown_grace: secs("--shutdown-grace-secs", args.shutdown_grace_secs)?,
        upload_min_bytes_per_sec: args.upload_min_bytes_per_sec,
        max_connections: args.max_connections,
        max_connections_per_client: args.max_connections_per_client,
        idle_timeout: secs("--idle-timeout-secs", args.idle_timeout_secs)?,
        send_timeout: secs("--send-timeout-secs", args.send_timeout_secs)?,
        max_requests_per_client: args.max_requests_per_client,
        loopback_hosts_only: addr.ip().is_loopback(),
        allowed_hosts: args.allowed_hosts.clone(),
        ..defaults
    };
    // The library checks the settings; the command line names its flags.
    if let Err(hindsight::Error::InvalidInput { field, reason }) = config.validate() {
        bail!("{}: {reason}", flag_of(&field));
    }
    let shutdown = async {
        server::shutdown_signal().await;
        eprintln!("shutting down: finishing requests in flight");
    };
    block_on(async {
        server::serve_data_dir(data_dir, addr, config, shutdown, |local| {
            eprintln!(
                "hindsight serving {} on http://{local} ({auth}); API description at \
                 /openapi.json",
                data_dir.display()
            )
        })
        .await?;
        eprintln!("stopped");
        Ok(())
    })
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a new random token: prints it once on stdout and appends only its hash to the
    /// token file (created if missing).
    New {
        /// The token file `hindsight serve --token-file` reads.
        #[arg(long, env = "HINDSIGHT_TOKEN_FILE")]
        token_file: PathBuf,
    },
}

/// `hindsight token new`.
pub fn token(command: TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::New { token_file } = command;
    let token = server::append_new_token(&token_file)?;
    println!("{token}");
    eprintln!(
        "added its hash to {}; the token itself is not stored anywhere, keep it now",
        token_file.display()
    );
    Ok(())
}

/// Refuses an address the demo cannot serve the UI on: not loopback (it serves without
/// tokens), or taken by another process.
pub fn check_ui_addr(addr: SocketAddr) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        bail!(
            "--addr {addr}: the demo serves without tokens, so only on loopback (127.0.0.1); \
             use `hindsight serve --token-file` for other addresses"
        );
    }
    if addr.port() != 0 {
        std::net::TcpListener::bind(addr).map_err(|e| {
            anyhow::anyhow!(
                "--addr {addr}: {e} (is another server there? pass --addr 127.0.0.1:PORT, or \
                 --no-serve)"
            )
        })?;
    }
    Ok(())
}

/// Serves the data directory on `addr` with the defaults of `hindsight serve` (no tokens,
/// so loopback only; a sweep worker using `weights`) until Ctrl-C or SIGTERM, as the demo's
/// last stage.
pub fn serve_ui(
    data_dir: &Path,
    addr: SocketAddr,
    weights: Option<PathBuf>,
    on_listening: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    check_ui_addr(addr)?;
    let config = ServerConfig {
        sweep_worker: Some(hindsight::sweep::WorkerConfig {
            weights,
            ..Default::default()
        }),
        ..Default::default()
    };
    block_on(async {
        server::serve_data_dir(
            data_dir,
            addr,
            config,
            server::shutdown_signal(),
            on_listening,
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!("{e} (is another server on {addr}? pass --addr 127.0.0.1:PORT)")
        })?;
        eprintln!("stopped");
        Ok(())
    })
}
