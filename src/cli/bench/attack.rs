//! `hindsight bench attack`: the five ways an adversarial probe once took the server down or
//! pushed it to gigabytes (issue "Reliability 2"), replayed against a fresh `hindsight serve`
//! process on loopback with a token:
//! 1. deeply nested pickles posted as reference statistics (TUPLE1, MARK/LIST, REDUCE and
//!    BINPERSID chains);
//! 2. pickles whose memo references would multiply one large value;
//! 3. an `.npz` whose `mu.npy` inflates to 1 GiB;
//! 4. clients that request a 33.5 MB statistics file and never read;
//! 5. thousands of connections that never send a byte;
//! 6. 500 idle event streams on a sweep (they once cost a core of polling): the server's CPU
//!    time over 10 s with them open.
//!
//! For each: the answers, whether the server is still up, its peak resident memory during
//! the phase (VmHWM, reset between phases through `/proc/PID/clear_refs`) and the latency of
//! `GET /healthz` on fresh connections every 20 ms meanwhile. Targets: a 4xx (or a closed
//! connection) for every attack, peak RSS under 600 MiB, healthz under 100 ms. Exits 1 when
//! any is missed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

/// Options of `hindsight bench attack`.
#[derive(clap::Args)]
pub struct AttackArgs {
    /// Silent connections in the last phase (the probe opened 4100, above the default cap
    /// of 4096 connections).
    #[arg(long, default_value_t = 4100)]
    pub idle_connections: usize,
    /// Clients that request the statistics file and never read.
    #[arg(long, default_value_t = 100)]
    pub slow_readers: usize,
    /// Idle event streams in the last phase.
    #[arg(long, default_value_t = 500)]
    pub event_streams: usize,
    /// Largest peak RSS of the server allowed in any phase, MiB.
    #[arg(long, default_value_t = 600.0)]
    pub max_rss_mib: f64,
    /// Slowest `GET /healthz` allowed during any phase, milliseconds.
    #[arg(long, default_value_t = 100.0)]
    pub max_healthz_ms: f64,
    /// Only these phases (1–6, comma-separated); default all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<usize>,
    /// Print the phases as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What one phase measured.
#[derive(Debug, Serialize)]
pub struct PhaseReport {
    /// The attack.
    pub phase: String,
    /// The answers (status and the start of the message), or what the clients saw.
    pub outcome: String,
    /// Whether every answer was what the attack should get (a 4xx, or a closed
    /// connection).
    pub refused: bool,
    /// Whether the server process was still running afterwards.
    pub server_up: bool,
    /// Peak resident memory of the server during the phase, MiB.
    pub peak_rss_mib: f64,
    /// `GET /healthz` during the phase: requests, median and slowest, milliseconds.
    pub healthz_requests: usize,
    pub healthz_p50_ms: f64,
    pub healthz_max_ms: f64,
    /// Seconds the phase took.
    pub seconds: f64,
}

/// One attack: its outcome in words, and whether it was refused cleanly.
type Phase<'a> = dyn Fn() -> anyhow::Result<(String, bool)> + 'a;

/// Replays the attacks; see the module docs.
pub fn attack(args: AttackArgs) -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let data = temp.path().join("data");
    let token_file = temp.path().join("tokens");
    let token = hindsight::server::append_new_token(&token_file)?;
    let exe = std::env::current_exe()?;
    let token_arg = token_file.to_str().context("a non-UTF-8 path")?.to_owned();
    // A tiny trained run and pixel-projection reference statistics: a sweep to follow.
    let network = temp.path().join("network.json");
    std::fs::write(
        &network,
        r#"{"img_resolution": 8, "img_channels": 3, "label_dim": 0, "model_channels": 8,
            "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [],
            "logvar_channels": 8}"#,
    )?;
    let network = network.to_str().context("a non-UTF-8 path")?.to_owned();
    for args in [
        &[
            "train",
            "--run",
            "es",
            "--resolution",
            "8",
            "--batch",
            "8",
            "--total-kimg",
            "1",
            "--snapshot-kimg",
            "1",
            "--network",
            &network,
        ][..],
        &[
            "ref-stats",
            "procedural",
            "--pixel-projection",
            "--name",
            "ref",
            "--max-images",
            "16",
        ],
    ] {
        let out = std::process::Command::new(&exe)
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "hindsight {}: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let (mut server, addr) = super::chaos::start_server(
        &exe,
        &data,
        &["--token-file", &token_arg, "--max-connections", "4096"],
    )?;
    let pid = server.id();
    let client = Client {
        addr: addr.clone(),
        token,
    };
    let result = (|| -> anyhow::Result<Vec<PhaseReport>> {
        // A real 2048-d reference (33.5 MB) for the slow readers.
        let big = big_statistics(temp.path())?;
        let (status, body) = client.post("/references?name=big", &big)?;
        if status != 201 {
            bail!("importing the 2048-d statistics: {status} {body}");
        }
        let mut reports = Vec::new();
        let phases: Vec<(&str, Box<Phase>)> = vec![
            (
                "1 nested pickles (50k TUPLE1, 100k MARK/LIST, 100k REDUCE, 1M BINPERSID)",
                Box::new(|| client.post_each("deep", &nested_pickles())),
            ),
            (
                "2 memo copies (1 MiB × 2000 gets; nested memo lists)",
                Box::new(|| client.post_each("memo", &memo_pickles())),
            ),
            (
                "3 .npz whose mu.npy inflates to 1 GiB",
                Box::new(|| client.post_each("bomb", &[zip_bomb()?])),
            ),
            (
                "4 slow readers of a 33.5 MB statistics file",
                Box::new(|| slow_readers(&addr, args.slow_readers)),
            ),
            (
                "5 silent connections",
                Box::new(|| silent_connections(&addr, args.idle_connections)),
            ),
            (
                "6 idle event streams on a queued sweep",
                Box::new(|| event_streams(&client, pid, args.event_streams)),
            ),
        ];
        for (number, (name, run)) in phases.into_iter().enumerate() {
            if !args.only.is_empty() && !args.only.contains(&(number + 1)) {
                continue;
            }
            eprintln!("bench attack: phase {name}");
            let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
            let monitor = Healthz::start(&addr);
            let t = Instant::now();
            let (outcome, refused) = run()?;
            let seconds = t.elapsed().as_secs_f64();
            let (healthz_requests, healthz_p50_ms, healthz_max_ms) = monitor.stop();
            let server_up = server.try_wait()?.is_none();
            reports.push(PhaseReport {
                phase: name.to_owned(),
                outcome,
                refused,
                server_up,
                peak_rss_mib: super::load::peak_rss_mib(pid).unwrap_or(f64::NAN),
                healthz_requests,
                healthz_p50_ms,
                healthz_max_ms,
                seconds,
            });
            if !server_up {
                break;
            }
        }
        Ok(reports)
    })();
    let _ = server.kill();
    let _ = server.wait();
    let reports = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        println!(
            "{:<72} {:>8} {:>6} {:>9} {:>9} {:>9} {:>7}",
            "attack", "refused", "up", "peak MiB", "hz p50", "hz max", "s"
        );
        for r in &reports {
            println!(
                "{:<72} {:>8} {:>6} {:>9.0} {:>9.2} {:>9.2} {:>7.1}",
                r.phase,
                r.refused,
                r.server_up,
                r.peak_rss_mib,
                r.healthz_p50_ms,
                r.healthz_max_ms,
                r.seconds
            );
            println!("    {}", r.outcome);
        }
    }
    let mut failures = Vec::new();
    for r in &reports {
        if !r.refused || !r.server_up {
            failures.push(format!("{}: not refused cleanly ({})", r.phase, r.outcome));
        }
        if r.peak_rss_mib.is_nan() || r.peak_rss_mib > args.max_rss_mib {
            failures.push(format!("{}: peak RSS {:.0} MiB", r.phase, r.peak_rss_mib));
        }
        if r.healthz_requests == 0 || r.healthz_max_ms > args.max_healthz_ms {
            failures.push(format!(
                "{}: healthz up to {:.1} ms ({} requests)",
                r.phase, r.healthz_max_ms, r.healthz_requests
            ));
        }
    }
    let wanted = if args.only.is_empty() {
        6
    } else {
        args.only.len()
    };
    if reports.len() < wanted {
        failures.push("the server died before the last phase".into());
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

/// Raw HTTP/1.1 on fresh connections, with the token.
struct Client {
    addr: String,
    token: String,
}

impl Client {
    fn post(&self, path: &str, body: &[u8]) -> anyhow::Result<(u16, String)> {
        self.request(path, "application/octet-stream", body)
    }

    fn request(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, String)> {
        let mut tcp = TcpStream::connect(&self.addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(120)))?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: \
             {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            self.token,
            body.len()
        );
        tcp.write_all(head.as_bytes())?;
        // The server may answer (and close) before the whole body is sent.
        let _ = tcp.write_all(body);
        let mut raw = Vec::new();
        let _ = tcp.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_owned());
        Ok((status, body))
    }

    fn post_json(&self, path: &str, body: &[u8]) -> anyhow::Result<(u16, String)> {
        self.request(path, "application/json", body)
    }

    /// Posts each body as reference statistics; refused when every answer is a 4xx.
    fn post_each(&self, name: &str, bodies: &[Vec<u8>]) -> anyhow::Result<(String, bool)> {
        let mut outcome = Vec::new();
        let mut refused = true;
        for (i, body) in bodies.iter().enumerate() {
            let (status, text) = match self.post(&format!("/references?name={name}{i}"), body) {
                Ok(answer) => answer,
                Err(e) => {
                    refused = false;
                    outcome.push(format!("no answer: {e}"));
                    continue;
                }
            };
            refused &= (400..500).contains(&status);
            let message: String = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or(text)
                .chars()
                .take(90)
                .collect();
            outcome.push(format!("{status} {message}"));
        }
        Ok((outcome.join(" | "), refused))
    }
}

/// `GET /healthz` on a fresh connection every 20 ms until stopped.
struct Healthz {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<f64>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Healthz {
    fn start(addr: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, samples, addr) = (stop.clone(), samples.clone(), addr.to_owned());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = healthz(&addr);
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    samples
                        .lock()
                        .expect("samples")
                        .push(if ok { ms } else { f64::INFINITY });
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Self {
            stop,
            samples,
            thread,
        }
    }

    /// Requests, median and slowest (infinite when one failed), milliseconds.
    fn stop(self) -> (usize, f64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let mut ms = std::mem::take(&mut *self.samples.lock().expect("samples"));
        ms.sort_by(f64::total_cmp);
        let p50 = ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN);
        (ms.len(), p50, ms.last().copied().unwrap_or(f64::NAN))
    }
}

fn healthz(addr: &str) -> bool {
    let Ok(mut tcp) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let head = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if tcp.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let mut raw = Vec::new();
    let _ = tcp.read_to_end(&mut raw);
    raw.starts_with(b"HTTP/1.1 200")
}

/// 2048-d statistics as a pytorch-fid `.npz` (mu 0, sigma the identity): 33.5 MB.
fn big_statistics(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let d = 2048;
    let mut sigma = vec![0.0; d * d];
    for i in 0..d {
        sigma[i * d + i] = 1.0;
    }
    let stats = hindsight::metrics::FeatureStats::from_parts(vec![0.0; d], sigma, 0)?;
    let path = dir.join("big.npz");
    stats.write_npz(std::fs::File::create(&path)?)?;
    Ok(std::fs::read(&path)?)
}

/// The probe's nested pickles: a 50 000-deep TUPLE1 chain, 100 000 nested MARK/LIST, a
/// 100 000-deep REDUCE chain and a 1 000 000-deep BINPERSID chain.
fn nested_pickles() -> Vec<Vec<u8>> {
    let mut tuples = b"\x80\x02)".to_vec();
    tuples.extend(std::iter::repeat_n(0x85u8, 50_000));
    tuples.push(b'.');
    let mut lists = b"\x80\x02".to_vec();
    lists.extend(std::iter::repeat_n(b'(', 100_000));
    lists.extend(std::iter::repeat_n(b'l', 100_000));
    lists.push(b'.');
    // f, f, …, f, None, then (TUPLE1, REDUCE) × n: f((f((… (None,) …),)),).
    let mut reduce = b"\x80\x02".to_vec();
    for _ in 0..100_000 {
        reduce.extend_from_slice(b"cm\nf\n");
    }
    reduce.push(b'N');
    for _ in 0..100_000 {
        reduce.extend_from_slice(b"\x85R");
    }
    reduce.push(b'.');
    let mut persistent = b"\x80\x02N".to_vec();
    persistent.extend(std::iter::repeat_n(b'Q', 1_000_000));
    persistent.push(b'.');
    vec![tuples, lists, reduce, persistent]
}

/// The probe's memo pickles: 1 MiB of bytes memoised once and fetched 2000 times; and
/// lists of four references to the previous list, 60 deep (4⁶⁰ leaves if copied).
fn memo_pickles() -> Vec<Vec<u8>> {
    let mut gets = b"\x80\x02B".to_vec();
    gets.extend_from_slice(&(1u32 << 20).to_le_bytes());
    gets.extend(std::iter::repeat_n(b'x', 1 << 20));
    gets.extend_from_slice(b"q\x00");
    gets.extend_from_slice(b"(");
    for _ in 0..2000 {
        gets.extend_from_slice(b"h\x00");
    }
    gets.extend_from_slice(b"l.");
    let mut nested = b"\x80\x02]q\x00".to_vec();
    for _ in 0..60 {
        nested.extend_from_slice(b"(h\x00h\x00h\x00h\x00lq\x00");
    }
    nested.push(b'.');
    vec![gets, nested]
}

/// An `.npz` of 1 MB or so whose `mu.npy` (float64, 2²⁷ zeros) inflates to 1 GiB.
fn zip_bomb() -> anyhow::Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut out);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(Some(9));
    zip.start_file("mu.npy", options)?;
    let n: u64 = 1 << 27;
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': ({n},), }}");
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    zip.write_all(b"\x93NUMPY\x01\x00")?;
    zip.write_all(&(header.len() as u16).to_le_bytes())?;
    zip.write_all(header.as_bytes())?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(n * 8) >> 20 {
        zip.write_all(&zeros)?;
    }
    zip.start_file("sigma.npy", options)?;
    zip.write_all(b"\x93NUMPY\x01\x00")?;
    let mut header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 1), }".to_owned();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    zip.write_all(&(header.len() as u16).to_le_bytes())?;
    zip.write_all(header.as_bytes())?;
    zip.write_all(&1f64.to_le_bytes())?;
    zip.finish()?;
    Ok(out.into_inner())
}

/// `clients` connections that ask for the 33.5 MB statistics file and never read; held for
/// five seconds. Refused means: the server kept answering (the phase's healthz says how
/// well) and its memory stayed bounded (the phase's peak RSS).
fn slow_readers(addr: &str, clients: usize) -> anyhow::Result<(String, bool)> {
    let mut held = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut tcp = TcpStream::connect(addr)?;
        let head = format!("GET /references/big/stats.npz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        tcp.write_all(head.as_bytes())?;
        held.push(tcp);
    }
    std::thread::sleep(Duration::from_secs(5));
    Ok((
        format!("{clients} clients held a download open for 5 s without reading"),
        true,
    ))
}

/// `count` connections that never send a byte, opened as fast as the server accepts them
/// and held until it closes them (or 15 s pass). Refused means: the server closed them
/// (idle time-out, or room made for newer connections).
fn silent_connections(addr: &str, count: usize) -> anyhow::Result<(String, bool)> {
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    for _ in 0..count {
        match TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(2)) {
            Ok(tcp) => {
                tcp.set_nonblocking(true)?;
                held.push(tcp);
            }
            Err(_) => failed += 1,
        }
    }
    let opened = held.len();
    let t = Instant::now();
    let mut open = opened;
    while t.elapsed() < Duration::from_secs(15) {
        open = held
            .iter()
            .filter(|tcp| {
                let mut tcp: &TcpStream = tcp;
                let mut byte = [0u8; 1];
                // A closed connection reads 0 (EOF) or an error; an open one would block.
                matches!(tcp.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count();
        if open == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok((
        format!(
            "{opened} silent connections opened ({failed} failed to connect); {open} still \
             open after {:.1} s",
            t.elapsed().as_secs_f64()
        ),
        open == 0,
    ))
}

/// CPU seconds (user + system) the process `pid` has used.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("a /proc stat line")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz.max(1.0))
}

/// `streams` clients follow a queued sweep's events (nothing changes: no worker runs) for
/// 10 s; passes when the server spends under 5 % of a core on them.
fn event_streams(client: &Client, pid: u32, streams: usize) -> anyhow::Result<(String, bool)> {
    let body = br#"{"run": "es", "reference": "ref", "sigma_rels": [0.05], "num_images": 4,
        "batch": 2, "sampler": {"steps": 3}}"#;
    let (status, text) = client.post_json("/sweeps", body)?;
    if status != 201 {
        bail!("creating a sweep to follow: {status} {text}");
    }
    let id = serde_json::from_str::<serde_json::Value>(&text)?["id"]
        .as_i64()
        .context("a sweep id")?;
    let mut held = Vec::with_capacity(streams);
    // From 127.0.0.10, .11, …: 200 per address, under the per-client cap of busy connections.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let target: std::net::SocketAddr = client.addr.parse()?;
    for i in 0..streams {
        let from: std::net::SocketAddr = format!("127.0.0.{}:0", 10 + i / 200).parse()?;
        let tcp = rt.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(from)?;
            socket.connect(target).await
        })?;
        let mut tcp = tcp.into_std()?;
        tcp.set_nonblocking(false)?;
        write!(
            tcp,
            "GET /sweeps/{id}/events HTTP/1.1\r\nHost: {}\r\n\r\n",
            client.addr
        )?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        // The first event (the whole sweep) arrives at once.
        let mut first = [0u8; 512];
        let n = tcp.read(&mut first)?;
        if !String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200") {
            bail!("an event stream was refused");
        }
        held.push(tcp);
    }
    let before = cpu_seconds(pid)?;
    std::thread::sleep(Duration::from_secs(10));
    let used = cpu_seconds(pid)? - before;
    Ok((
        format!(
            "{streams} streams open for 10 s: the server used {:.2} CPU s ({:.1} % of a core), \
             the phase's ~500 healthz requests included",
            used,
            used * 10.0
        ),
        used < 0.5,
    ))
}
