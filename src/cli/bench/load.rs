//! `hindsight bench load`: many concurrent clients against a `hindsight serve` process on
//! loopback — whole and ranged downloads of a reconstruction, identical and distinct
//! reconstruct requests, snapshot uploads — for a fixed time; then the same downloads from a
//! plain static file server (tower-http's `ServeDir`, in this process) over the same file, for
//! scale. Reports requests, errors, p50/p99 latency per kind and the server's peak RSS.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Options of `hindsight bench load`.
#[derive(clap::Args)]
pub struct LoadArgs {
    /// Concurrent clients (one thread and one keep-alive connection each).
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// Seconds of load on each server.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Parameters per generated snapshot (fp16) and so per reconstruction (f32 downloads
    /// are twice as many bytes).
    #[arg(long, default_value_t = 250_000)]
    pub params: u64,
    /// Connections from another client address (127.0.0.2) that request the downloaded
    /// file and never read, held for the whole hindsight phase.
    #[arg(long, default_value_t = 100)]
    pub slow_readers: usize,
    /// Silent connections (never a byte sent) from 127.0.0.2, reopened as the server closes
    /// them, for the whole hindsight phase.
    #[arg(long, default_value_t = 2000)]
    pub idle_connections: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Latencies and outcomes of one kind of request.
#[derive(Debug, Default, Serialize)]
pub struct KindReport {
    /// Requests completed.
    pub requests: usize,
    /// Requests that failed (transport error, or a status other than the expected).
    pub errors: usize,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th-percentile latency, milliseconds.
    pub p99_ms: f64,
}

/// What `bench load` measured.
#[derive(Debug, Default, Serialize)]
pub struct LoadReport {
    /// Concurrent clients.
    pub clients: usize,
    /// Seconds of load per server.
    pub seconds: f64,
    /// hindsight, by kind of request.
    pub hindsight: BTreeMap<String, KindReport>,
    /// The static file server, by kind of request.
    pub serve_dir: BTreeMap<String, KindReport>,
    /// Peak resident memory of the `hindsight serve` process, MiB.
    pub server_peak_rss_mib: f64,
    /// Size of the downloaded file, bytes.
    pub file_bytes: u64,
    /// Slow readers held during the hindsight phase.
    pub slow_readers: usize,
    /// Silent connections kept during the hindsight phase, and how many times the server
    /// closed one (which was then reopened).
    pub idle_connections: usize,
    pub idle_closed_by_server: usize,
}

type Samples = Arc<Mutex<BTreeMap<&'static str, (Vec<f64>, usize)>>>;

/// The load test.
pub fn load(args: LoadArgs) -> anyhow::Result<()> {
    if args.clients == 0 || !args.seconds.is_finite() || args.seconds <= 0.0 {
        bail!("--clients and --seconds must be positive");
    }
    let temp = tempfile::tempdir()?;
    let snaps = temp.path().join("snaps");
    hindsight::bench::ensure_synthetic_snapshots(&snaps, 16, args.params, &())?;
    let data = temp.path().join("data");
    let exe = std::env::current_exe()?;
    let status = Command::new(&exe)
        .arg("--data-dir")
        .arg(&data)
        .args(["import", path_str(&snaps)?, "--run", "base"])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("importing the snapshots failed");
    }
    let upload = std::fs::read(first_file(&snaps)?)?;
    // Every client is 127.0.0.1: the per-client limit would refuse the uploads.
    let (mut server, addr) = super::chaos::start_server(
        &exe,
        &data,
        &[
            "--max-uploads-per-client",
            "1000",
            "--upload-concurrency",
            "8",
            "--max-requests-per-client",
            "1000",
        ],
    )?;
    let result = (|| -> anyhow::Result<LoadReport> {
        let agent = agent();
        let made = post_json(
            &agent,
            &format!("http://{addr}/reconstruct"),
            r#"{"run": "base", "sigma_rel": 0.07}"#,
        )?;
        let id = made["id"]
            .as_str()
            .context("no reconstruction id")?
            .to_owned();
        let digest = made["digest"].as_str().context("no digest")?.to_owned();
        let file_bytes = made["byte_size"].as_u64().unwrap_or(0);
        let weights = format!("http://{addr}/reconstructions/{id}/weights");
        let mut report = LoadReport {
            clients: args.clients,
            seconds: args.seconds,
            file_bytes,
            ..Default::default()
        };
        let attackers =
            Attackers::start(&addr, &weights, args.slow_readers, args.idle_connections)?;
        let samples = run_clients(args.clients, args.seconds, |i, rng, agent| match i % 10 {
            0..=3 => ("download", get(agent, &weights, None, 200)),
            4..=6 => {
                let start = rng.random_range(0..file_bytes.saturating_sub(65_536).max(1));
                (
                    "range",
                    get(agent, &weights, Some((start, start + 65_535)), 206),
                )
            }
            7 => (
                "reconstruct (same)",
                post_ok(
                    agent,
                    &format!("http://{addr}/reconstruct"),
                    r#"{"run": "base", "sigma_rel": 0.07}"#,
                ),
            ),
            8 => {
                let sigma = 0.03 + 0.01 * rng.random_range(0..15) as f64;
                let body = format!(r#"{{"run": "base", "sigma_rel": {sigma:.2}}}"#);
                (
                    "reconstruct (distinct)",
                    post_ok(agent, &format!("http://{addr}/reconstruct"), &body),
                )
            }
            _ => {
                let url = format!("http://{addr}/runs/load/snapshots?nimg=1000000&sigma_rel=0.05");
                ("upload", upload_ok(agent, &url, &upload))
            }
        });
        report.hindsight = summarise(samples);
        report.slow_readers = args.slow_readers;
        report.idle_connections = args.idle_connections;
        report.idle_closed_by_server = attackers.stop();
        report.server_peak_rss_mib = peak_rss_mib(server.id()).unwrap_or(0.0);
        // The peer: the same file from tower-http's ServeDir.
        let blob = data
            .join("store/blobs")
            .join(&digest[0..2])
            .join(&digest[2..4]);
        let peer = start_serve_dir(blob)?;
        let url = format!("http://{}/{digest}", peer.addr);
        let samples = run_clients(args.clients, args.seconds, |i, rng, agent| {
            if i % 10 < 4 || i % 10 >= 7 {
                ("download", get(agent, &url, None, 200))
            } else {
                let start = rng.random_range(0..file_bytes.saturating_sub(65_536).max(1));
                (
                    "range",
                    get(agent, &url, Some((start, start + 65_535)), 206),
                )
            }
        });
        report.serve_dir = summarise(samples);
        peer.stop.cancel();
        Ok(report)
    })();
    let _ = server.kill();
    let _ = server.wait();
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "load: {} clients × {:.0} s per server on loopback; file {} bytes; hindsight serve peak \
         RSS {:.0} MiB",
        report.clients, report.seconds, report.file_bytes, report.server_peak_rss_mib
    );
    println!(
        "meanwhile, from 127.0.0.2: {} slow readers of the file, {} silent connections ({} \
         closed by the server and reopened)",
        report.slow_readers, report.idle_connections, report.idle_closed_by_server
    );
    println!(
        "{:<24} {:>9} {:>7} {:>9} {:>9}   {:>9} {:>9} {:>9}",
        "kind", "requests", "errors", "p50 ms", "p99 ms", "peer req", "peer p50", "peer p99"
    );
    for (kind, r) in &report.hindsight {
        let peer = report.serve_dir.get(kind);
        println!(
            "{kind:<24} {:>9} {:>7} {:>9.2} {:>9.2}   {:>9} {:>9} {:>9}",
            r.requests,
            r.errors,
            r.p50_ms,
            r.p99_ms,
            peer.map_or("-".into(), |p| p.requests.to_string()),
            peer.map_or("-".into(), |p| format!("{:.2}", p.p50_ms)),
            peer.map_or("-".into(), |p| format!("{:.2}", p.p99_ms)),
        );
    }
    let errors: usize = report.hindsight.values().map(|r| r.errors).sum();
    if errors > 0 {
        bail!("{errors} request(s) failed");
    }
    Ok(())
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("a non-UTF-8 path")
}

fn first_file(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.sort();
    files.into_iter().next().context("no snapshot generated")
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .max_idle_connections_per_host(4)
        .build()
        .into()
}

/// Runs `clients` threads for `seconds`, each calling `request(client index, rng, agent)`
/// in a loop; collects (kind, latency, ok).
fn run_clients(
    clients: usize,
    seconds: f64,
    request: impl Fn(usize, &mut rand::rngs::StdRng, &ureq::Agent) -> (&'static str, bool) + Send + Sync,
) -> Samples {
    let samples: Samples = Arc::default();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    std::thread::scope(|scope| {
        for i in 0..clients {
            let (samples, request) = (samples.clone(), &request);
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn_scoped(scope, move || {
                    let agent = agent();
                    let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
                    let mut mine: Vec<(&'static str, f64, bool)> = Vec::new();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        let (kind, ok) = request(i, &mut rng, &agent);
                        mine.push((kind, t.elapsed().as_secs_f64() * 1e3, ok));
                    }
                    let mut all = samples.lock().expect("samples");
                    for (kind, ms, ok) in mine {
                        let entry = all.entry(kind).or_default();
                        entry.0.push(ms);
                        if !ok {
                            entry.1 += 1;
                        }
                    }
                })
                .expect("a client thread");
        }
    });
    samples
}

fn summarise(samples: Samples) -> BTreeMap<String, KindReport> {
    let mut all = samples.lock().expect("samples");
    std::mem::take(&mut *all)
        .into_iter()
        .map(|(kind, (mut ms, errors))| {
            ms.sort_by(f64::total_cmp);
            let at = |q: f64| {
                ms.get(((ms.len() as f64 - 1.0) * q).round() as usize)
                    .copied()
                    .unwrap_or(0.0)
            };
            (
                kind.to_owned(),
                KindReport {
                    requests: ms.len(),
                    errors,
                    p50_ms: at(0.5),
                    p99_ms: at(0.99),
                },
            )
        })
        .collect()
}

/// A GET, its whole body read; ok when the status is `expect` and the body is complete.
fn get(agent: &ureq::Agent, url: &str, range: Option<(u64, u64)>, expect: u16) -> bool {
    let mut request = agent.get(url);
    if let Some((a, b)) = range {
        request = request.header("Range", &format!("bytes={a}-{b}"));
    }
    let Ok(mut response) = request.call() else {
        return false;
    };
    let status = response.status().as_u16();
    let mut sink = std::io::sink();
    let read = std::io::copy(
        &mut response.body_mut().with_config().limit(u64::MAX).reader(),
        &mut sink,
    );
    status == expect && read.is_ok()
}

fn post_ok(agent: &ureq::Agent, url: &str, body: &str) -> bool {
    match agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(body.as_bytes())
    {
        Ok(mut r) => {
            let ok = r.status().as_u16() == 200;
            let _ = r.body_mut().read_to_string();
            ok
        }
        Err(_) => false,
    }
}

fn upload_ok(agent: &ureq::Agent, url: &str, bytes: &[u8]) -> bool {
    match agent.post(url).send(bytes) {
        Ok(mut r) => {
            let ok = matches!(r.status().as_u16(), 200 | 201);
            let _ = r.body_mut().read_to_string();
            ok
        }
        Err(_) => false,
    }
}

fn post_json(agent: &ureq::Agent, url: &str, body: &str) -> anyhow::Result<serde_json::Value> {
    let mut r = agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(body.as_bytes())?;
    let mut text = String::new();
    r.body_mut().as_reader().read_to_string(&mut text)?;
    if r.status().as_u16() != 200 {
        bail!("{url}: {} {text}", r.status());
    }
    Ok(serde_json::from_str(&text)?)
}

/// Peak resident memory of process `pid` (VmHWM), MiB.
pub(super) fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// tower-http's `ServeDir` over `dir`, on its own runtime thread.
struct Peer {
    addr: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
}

fn start_serve_dir(dir: PathBuf) -> anyhow::Result<Peer> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app =
                axum::Router::new().fallback_service(tower_http::services::ServeDir::new(dir));
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
        });
    });
    Ok(Peer { addr, stop })
}

/// Hostile clients from 127.0.0.2 during the hindsight phase: slow readers (a GET of the
/// file, never read) and silent connections, reopened whenever the server closes one.
struct Attackers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<usize>>,
}

impl Attackers {
    fn start(addr: &str, url: &str, slow: usize, idle: usize) -> anyhow::Result<Self> {
        use std::io::Write;
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let path = url
            .split_once("//")
            .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_owned()))
            .context("a URL with a path")?;
        let target: std::net::SocketAddr = addr.parse()?;
        let (flag, host) = (stop.clone(), addr.to_owned());
        let thread = std::thread::spawn(move || -> anyhow::Result<usize> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let connect = || -> anyhow::Result<std::net::TcpStream> {
                let tcp = rt.block_on(async {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    socket.bind("127.0.0.2:0".parse().expect("an address"))?;
                    socket.connect(target).await
                })?;
                let tcp = tcp.into_std()?;
                tcp.set_nonblocking(true)?;
                Ok(tcp)
            };
            let mut readers = Vec::with_capacity(slow);
            for _ in 0..slow {
                let mut tcp = connect()?;
                tcp.set_nonblocking(false)?;
                write!(tcp, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")?;
                readers.push(tcp);
            }
            let mut silent: Vec<std::net::TcpStream> = (0..idle)
                .map(|_| connect())
                .collect::<anyhow::Result<_>>()?;
            let mut closed = 0;
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                for tcp in silent.iter_mut() {
                    let mut byte = [0u8; 1];
                    let open = matches!(std::io::Read::read(tcp, &mut byte),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
                    if !open {
                        closed += 1;
                        if let Ok(fresh) = connect() {
                            *tcp = fresh;
                        }
                    }
                }
            }
            drop(readers);
            Ok(closed)
        });
        Ok(Self { stop, thread })
    }

    /// Stops them; how many silent connections the server closed.
    fn stop(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.thread.join() {
            Ok(Ok(closed)) => closed,
            Ok(Err(e)) => {
                eprintln!("bench load: the hostile clients failed: {e:#}");
                0
            }
            Err(_) => 0,
        }
    }
}
