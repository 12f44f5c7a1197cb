//! Reliability and security (issue 18), against a real `hindsight serve` process on loopback
//! and the real binary: damaged blobs are never handed out as good, stalled clients cannot
//! hold the server, boundary values and refused uploads leave nothing, one slot holds one
//! snapshot (and snapshots can be deleted), crash leftovers are recovered at start-up, a
//! damaged index stops the server before it can hide data, shutdown takes bounded time, and a
//! full disk gives a clear error with nothing partial.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::hindsight_ok;
use common::http::{exchange_on, Reply};
use common::snapshot::SnapshotBuilder;

/// A safetensors snapshot: one f32 tensor `w` of `n` values drawn from `seed`, with
/// `__metadata__`.
fn snapshot(n: usize, seed: u64, meta: &[(&str, &str)]) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    SnapshotBuilder::new()
        .f32("w", &[n], &values)
        .metas(meta)
        .bytes()
}

/// A directory of EDM2-named snapshots: σ_rel 0.05 and 0.10 at `times` × 1000 kimg steps.
fn snapshot_dir(dir: &Path, times: u64, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut seed = 1;
    for t in 1..=times {
        for s in [0.05, 0.10] {
            let name = format!("s-{:07}-{s:.3}.safetensors", t * 1000);
            std::fs::write(dir.join(name), snapshot(n, seed, &[])).unwrap();
            seed += 1;
        }
    }
}

/// A `hindsight serve` process on a free loopback port.
struct Server {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Server {
    fn start(data: &Path, args: &[&str]) -> Self {
        Self::start_with(data, args, |_| {})
    }

    /// Starts the server with `setup` applied to its command (resource limits).
    fn start_with(data: &Path, args: &[&str], setup: impl FnOnce(&mut Command)) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = data.with_extension(format!("serve-{port}.log"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_hindsight"));
        command
            .arg("--data-dir")
            .arg(data)
            .args(["serve", "--addr", &addr, "--no-sweep-worker"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        setup(&mut command);
        let mut child = command.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&addr).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the server exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "the server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Server { child, addr, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        exchange(&self.addr, None, method, path, headers, body)
    }

    fn json(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let r = self.request(
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange on a fresh connection from `from` (see [`connect`]), with a read
/// timeout of a minute.
fn exchange(
    addr: &str,
    from: Option<&str>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let tcp = connect(addr, from);
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let reply = exchange_on(tcp, addr, method, path, headers, body);
    assert!(reply.status != 0, "a response head");
    reply
}

/// A connection to `addr`, from the loopback address `from` when given (another client).
fn connect(addr: &str, from: Option<&str>) -> TcpStream {
    let Some(from) = from else {
        return TcpStream::connect(addr).unwrap();
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        socket.connect(addr.parse().unwrap()).await.unwrap()
    });
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}

fn blob_path(data: &Path, digest: &str) -> PathBuf {
    data.join("store/blobs")
        .join(&digest[0..2])
        .join(&digest[2..4])
        .join(digest)
}

/// Flips one bit of a stored blob in place (as a disk error or a stray write would).
fn damage(path: &Path, at: usize) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x10;
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all(&bytes).unwrap();
    f.sync_all().unwrap();
}

fn staging_files(data: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data.join("store/tmp"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn blob_files(data: &Path) -> usize {
    let mut n = 0;
    for a in std::fs::read_dir(data.join("store/blobs"))
        .unwrap()
        .flatten()
    {
        for b in std::fs::read_dir(a.path()).unwrap().flatten() {
            n += std::fs::read_dir(b.path()).unwrap().count();
        }
    }
    n
}

/// `hindsight reconstruct` of run `r` at σ_rel 0.07 into `out`; its output.
fn reconstruct_007(data: &Path, out: &Path) -> String {
    let out = out.to_str().unwrap();
    hindsight_ok(
        data,
        &[
            "reconstruct",
            "--run",
            "r",
            "--sigma-rel",
            "0.07",
            "--out",
            out,
        ],
    )
}

/// `hindsight import` of `dir/snaps` into run `r`.
fn import_snaps(data: &Path, dir: &Path) {
    let snaps = dir.join("snaps");
    hindsight_ok(data, &["import", snaps.to_str().unwrap(), "--run", "r"]);
}

fn hindsight(data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn damaged_reconstructions_are_never_served_cached_or_linked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    snapshot_dir(&dir.path().join("snaps"), 5, 200_000);
    import_snaps(&data, dir.path());
    let server = Server::start(&data, &[]);
    let (status, made) = server.json("POST", "/reconstruct", r#"{"run": "r", "sigma_rel": 0.07}"#);
    assert_eq!(status, 200, "{made}");
    let (id, digest) = (
        made["id"].as_str().unwrap().to_owned(),
        made["digest"].as_str().unwrap().to_owned(),
    );
    let weights = format!("/reconstructions/{id}/weights");
    let good = server.request("GET", &weights, &[], b"");
    assert!(good.status == 200 && good.complete);
    assert_eq!(blake3::hash(&good.body).to_hex().as_str(), digest);
    // A range before any damage works (and marks the blob checked).
    let r = server.request("GET", &weights, &[("Range", "bytes=100-199")], b"");
    assert_eq!((r.status, &r.body[..]), (206, &good.body[100..200]));

    // One flipped bit in the middle of the stored file.
    let path = blob_path(&data, &digest);
    let at = good.body.len() / 2;
    damage(&path, at);

    // The whole download is cut off before its last byte: never a complete, wrong body.
    let full = server.request("GET", &weights, &[], b"");
    assert_eq!(full.status, 200);
    assert!(!full.complete, "a damaged blob was sent whole");
    assert!(full.body.len() < good.body.len());
    // A range over the damaged byte (and any other) is refused, not sent.
    let range = format!("bytes={}-{}", at - 10, at + 10);
    let r = server.request("GET", &weights, &[("Range", &range)], b"");
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    let r = server.request("GET", &weights, &[("Range", "bytes=0-9")], b"");
    assert_eq!(r.status, 500);
    // HEAD does not claim the blob is there (so a client uploads it again).
    let r = server.request("HEAD", &format!("/blobs/{digest}"), &[], b"");
    assert_eq!(r.status, 404);
    // `verify` lists it.
    let out = hindsight(&data, &["verify"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("corrupt: {digest}")));
    // Asking again recomputes instead of answering "cached" with the damaged file; the good
    // copy replaces it.
    let (status, again) = server.json("POST", "/reconstruct", r#"{"run": "r", "sigma_rel": 0.07}"#);
    assert_eq!(status, 200);
    assert_eq!(again["cached"], false, "{again}");
    assert_eq!(again["digest"].as_str().unwrap(), digest);
    assert_eq!(std::fs::read(&path).unwrap(), good.body);
    let full = server.request("GET", &weights, &[], b"");
    assert!(full.complete && full.body == good.body);
    assert!(
        server.log().contains("damaged"),
        "the damage was not logged"
    );
    hindsight_ok(&data, &["verify"]);

    // The CLI recomputes rather than hard-linking a damaged blob.
    damage(&path, 7);
    let out_dir = dir.path().join("out");
    let printed = reconstruct_007(&data, &out_dir);
    let file = std::fs::read_dir(&out_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(std::fs::read(file).unwrap(), good.body, "{printed}");
}

#[test]
fn stalled_clients_are_dropped_and_never_hold_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(
        &data,
        &[
            "--upload-idle-secs",
            "1.5",
            "--header-read-timeout-secs",
            "1.5",
            "--shutdown-grace-secs",
            "1",
        ],
    );
    let big = snapshot(100_000, 1, &[("nimg", "1000"), ("sigma_rel", "0.05")]);
    // Four clients send headers and 1 KiB of a valid upload, then nothing.
    let started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(&server.addr).unwrap();
        let head = format!(
            "POST /runs/stall/snapshots HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
            big.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&big[..1024]).unwrap();
        stalled.push(s);
    }
    // And one sends half a request line.
    let mut half = TcpStream::connect(&server.addr).unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // A normal upload from another client goes through at once, and reads stay fast.
    let good = snapshot(1000, 2, &[("nimg", "1000"), ("sigma_rel", "0.05")]);
    let t = Instant::now();
    let r = exchange(
        &server.addr,
        Some("127.0.0.2"),
        "POST",
        "/runs/ok/snapshots",
        &[],
        &good,
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let t = Instant::now();
    assert_eq!(server.request("GET", "/healthz", &[], b"").status, 200);
    assert_eq!(server.request("GET", "/runs", &[], b"").status, 200);
    assert!(t.elapsed() < Duration::from_millis(500));
    // Per-client limit: two of the four stalled uploads were refused at once (429), the two
    // others are dropped when idle (408) and their staging files removed.
    let mut statuses = Vec::new();
    for s in &mut stalled {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        let line = String::from_utf8_lossy(&buf[..n]).to_string();
        statuses.push(line.split_whitespace().nth(1).unwrap_or("none").to_owned());
    }
    statuses.sort();
    assert_eq!(statuses, ["408", "408", "429", "429"]);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    half.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    let t = Instant::now();
    let n = half.read(&mut buf).unwrap_or(0);
    assert!(n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(
        staging_files(&data).is_empty(),
        "{:?}",
        staging_files(&data)
    );
    // The stalled uploads' run was never created.
    assert_eq!(server.request("GET", "/runs/stall", &[], b"").status, 404);

    // A client that trickles its upload (a byte every 200 ms: never idle) is dropped by the
    // minimum rate; one that stops sending a JSON body is dropped by the body deadline.
    let t = Instant::now();
    let mut trickle = TcpStream::connect(&server.addr).unwrap();
    let head = format!(
        "POST /runs/slow/snapshots HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        big.len()
    );
    trickle.write_all(head.as_bytes()).unwrap();
    trickle.write_all(&big[..256]).unwrap();
    let mut json = TcpStream::connect(&server.addr).unwrap();
    json.write_all(
        b"POST /reconstruct HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"run\"",
    )
    .unwrap();
    let mut answer = String::new();
    for byte in &big[256..] {
        if trickle.write_all(std::slice::from_ref(byte)).is_err() {
            break;
        }
        trickle
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 64];
        if let Ok(n) = trickle.read(&mut buf) {
            answer = String::from_utf8_lossy(&buf[..n]).to_string();
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the trickle was never dropped"
        );
    }
    assert!(answer.contains(" 408 "), "{answer:?}");
    json.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = json.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains(" 408 "));
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert!(staging_files(&data).is_empty());
}

#[test]
fn pages_of_other_sites_cannot_write_and_other_host_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--allowed-host", "box.lan"]);
    let port = server.addr.rsplit_once(':').unwrap().1.to_owned();
    let good = snapshot(1000, 1, &[("nimg", "1000"), ("sigma_rel", "0.05")]);
    let evil_host = format!("evil.example:{port}");
    let origin_evil = ("Origin", "http://evil.example");
    // DNS rebinding: a page of evil.example resolving to 127.0.0.1 names its own host.
    for (method, path) in [("GET", "/runs"), ("POST", "/runs/r/snapshots")] {
        let r = server.request(method, path, &[("Host", &evil_host), origin_evil], &good);
        assert_eq!(
            r.status,
            403,
            "{method} {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(String::from_utf8_lossy(&r.body).contains("DNS rebinding"));
    }
    // A cross-origin form or fetch to the right host: writes refused, nothing stored.
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let r = server.request(
            "POST",
            "/runs/r/snapshots",
            &[origin_evil, ("Content-Type", content_type)],
            &good,
        );
        assert_eq!(r.status, 403);
    }
    let r = server.request("DELETE", "/runs/r/snapshots/1", &[origin_evil], b"");
    assert_eq!(r.status, 403);
    assert_eq!(blob_files(&data), 0);
    // The same origin (the web UI), clients without Origin (curl, Python), loopback names
    // and allowed names work.
    let own = format!("http://{}", server.addr);
    let r = server.request("POST", "/runs/r/snapshots", &[("Origin", &own)], &good);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    for host in [
        format!("localhost:{port}"),
        format!("box.lan:{port}"),
        "[::1]".into(),
    ] {
        let r = server.request("GET", "/runs", &[("Host", &host)], b"");
        assert_eq!(r.status, 200, "{host}");
    }
}

#[test]
fn shutdown_is_bounded_with_a_client_stalled_mid_upload() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(
        &data,
        &["--upload-idle-secs", "600", "--shutdown-grace-secs", "1"],
    );
    let big = snapshot(100_000, 1, &[("nimg", "1000"), ("sigma_rel", "0.05")]);
    let mut s = TcpStream::connect(&server.addr).unwrap();
    let head = format!(
        "POST /runs/r/snapshots HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        big.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&big[..4096]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    // SAFETY: signalling our own child process.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "SIGTERM did not stop the server"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}: {}", server.log());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(server.log().contains("shutdown grace"), "{}", server.log());
    // Nothing of the cut upload survives a restart.
    hindsight_ok(&data, &["runs"]);
    assert!(staging_files(&data).is_empty());
    assert_eq!(blob_files(&data), 0);
}

#[test]
fn one_slot_holds_one_snapshot_and_snapshots_can_be_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tokens = dir.path().join("tokens");
    let token = hindsight_ok(
        dir.path(),
        &["token", "new", "--token-file", tokens.to_str().unwrap()],
    );
    let token = token.trim();
    let bearer = format!("Bearer {token}");
    let auth = [("Authorization", bearer.as_str())];
    let server = Server::start(&data, &["--token-file", tokens.to_str().unwrap()]);
    let first = snapshot(1000, 1, &[]);
    let other = snapshot(1000, 2, &[]);
    let r = server.request(
        "POST",
        "/runs/r/snapshots?nimg=2000000&sigma_rel=0.05",
        &auth,
        &first,
    );
    assert_eq!(r.status, 201);
    // γ for σ_rel 0.05 (EDM2 eq. 3's inverse), and σ_rel one ulp above 0.05.
    let gamma = hindsight::phema::Width::SigmaRel(0.05)
        .resolve("t")
        .unwrap()
        .1;
    let up = 0.05f64.next_up();
    for query in [format!("gamma={gamma}"), format!("sigma_rel={up}")] {
        let path = format!("/runs/r/snapshots?nimg=2000000&{query}");
        let r = server.request("POST", &path, &auth, &other);
        assert_eq!(
            r.status,
            409,
            "{query}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["code"], "conflict");
        // The same content in the same slot is the same snapshot: a no-op.
        let r = server.request("POST", &path, &auth, &first);
        assert_eq!(
            r.status,
            200,
            "{query}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let (_, snaps) = server.json("GET", "/runs/r/snapshots", "");
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");
    assert_eq!(blob_files(&data), 1, "a refused upload left a file");
    // Another slot, then reconstruct to make the run usable.
    let r = server.request(
        "POST",
        "/runs/r/snapshots?nimg=2000000&sigma_rel=0.10",
        &auth,
        &other,
    );
    assert_eq!(r.status, 201);
    // Delete: a token is needed; unknown ids are 404 by name; then the row and its file go.
    let (_, snaps) = server.json("GET", "/runs/r/snapshots", "");
    let id = snaps[0]["id"].as_i64().unwrap();
    let digest = snaps[0]["digest"].as_str().unwrap().to_owned();
    let r = server.request("DELETE", &format!("/runs/r/snapshots/{id}"), &[], b"");
    assert_eq!(r.status, 401);
    let r = server.request("DELETE", "/runs/r/snapshots/999999", &auth, b"");
    assert_eq!(r.status, 404);
    let r = server.request("DELETE", "/runs/r/snapshots/x", &auth, b"");
    assert_eq!(r.status, 400);
    let r = server.request("DELETE", &format!("/runs/r/snapshots/{id}"), &auth, b"");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let deleted: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(deleted["blob_removed"], true);
    assert!(!blob_path(&data, &digest).exists());
    // The slot is free again, for the other content.
    let r = server.request(
        "POST",
        "/runs/r/snapshots?nimg=2000000&sigma_rel=0.05",
        &auth,
        &other,
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    // The CLI deletes too; a blob another snapshot shares stays.
    let listing = hindsight_ok(&data, &["snapshots", "r", "--json"]);
    let rows: Value = serde_json::from_str(&listing).unwrap();
    let shared_id = rows[0]["id"].as_i64().unwrap().to_string();
    let printed = hindsight_ok(&data, &["snapshots", "r", "--delete", &shared_id]);
    assert!(printed.contains("other rows refer to it"), "{printed}");
    let out = hindsight(&data, &["snapshots", "r", "--delete", "424242"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot 424242"));
    hindsight_ok(&data, &["verify"]);
}

/// An upload: query string, headers, body.
type UploadCase = (String, Vec<(&'static str, String)>, Vec<u8>);

#[test]
fn boundary_values_and_refused_uploads_leave_no_file_and_gc_finds_strays() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let good = snapshot(1000, 1, &[]);
    let far = "9223372036854775808";
    let cases: Vec<UploadCase> = vec![
        (format!("?nimg={far}&sigma_rel=0.05"), vec![], good.clone()),
        (
            "?nimg=18446744073709551615&sigma_rel=0.05".into(),
            vec![],
            good.clone(),
        ),
        (
            "?nimg=1000&sigma_rel=0.28867513459481287".into(),
            vec![],
            good.clone(),
        ),
        (
            String::new(),
            vec![
                ("X-Hindsight-Nimg", far.to_owned()),
                ("X-Hindsight-Sigma-Rel", "0.05".into()),
            ],
            good.clone(),
        ),
        (
            String::new(),
            vec![
                ("X-Hindsight-Nimg", "1000".into()),
                ("X-Hindsight-Sigma-Rel", "0.28867513459481287".into()),
            ],
            good.clone(),
        ),
        (
            String::new(),
            vec![],
            snapshot(1000, 1, &[("nimg", far), ("sigma_rel", "0.05")]),
        ),
        (
            String::new(),
            vec![],
            snapshot(
                1000,
                1,
                &[("nimg", "1000"), ("sigma_rel", "0.28867513459481287")],
            ),
        ),
        (
            String::new(),
            vec![],
            snapshot(1000, 1, &[("nimg", "18446744073709551615"), ("gamma", "7")]),
        ),
    ];
    for (query, headers, body) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = server.request("POST", &format!("/runs/r/snapshots{query}"), &headers, body);
        let text = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 400, "{query} {headers:?}: {text}");
        assert!(
            text.contains("nimg") || text.contains("sigma_rel"),
            "{text}"
        );
        assert!(!text.contains("CHECK"), "{text}");
    }
    assert_eq!(server.request("GET", "/runs/r", &[], b"").status, 404);
    // A name EDM2's way that disagrees with the metadata; duplicate headers; run names
    // with invisible characters or not in NFC.
    let meta = snapshot(1000, 1, &[("nimg", "1000000"), ("sigma_rel", "0.05")]);
    let r = server.request(
        "POST",
        "/runs/r/snapshots?filename=x-0000007-0.100.safetensors",
        &[],
        &meta,
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("filename"));
    let r = server.request(
        "POST",
        "/runs/r/snapshots?filename=x-0001000-0.050.safetensors",
        &[],
        &meta,
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = server.request(
        "POST",
        "/runs/r/snapshots",
        &[
            ("X-Hindsight-Nimg", "2000"),
            ("X-Hindsight-Nimg", "3000"),
            ("X-Hindsight-Sigma-Rel", "0.05"),
        ],
        &good,
    );
    assert_eq!(r.status, 400);
    for name in ["r%E2%80%8B", "%EF%BB%BFr", "r%E2%A0%80", "cafe%CC%81"] {
        let r = server.request(
            "POST",
            &format!("/runs/{name}/snapshots?nimg=5&sigma_rel=0.05"),
            &[],
            &good,
        );
        assert_eq!(
            r.status,
            400,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let r = server.request("GET", "/runs/r/snapshots", &[], b"");
    let listed: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let r = server.request(
        "DELETE",
        &format!("/runs/r/snapshots/{}", listed[0]["id"]),
        &[],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(blob_files(&data), 0, "a refused upload left a blob file");
    assert!(staging_files(&data).is_empty());
    drop(server);
    // A blob file without an index row (a writer killed between publishing and recording,
    // by an older version) is found and removed by gc.
    let stray = snapshot(10, 9, &[]);
    let digest = blake3::hash(&stray).to_hex().to_string();
    let path = blob_path(&data, &digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &stray).unwrap();
    let printed = hindsight_ok(&data, &["gc", "--grace-secs", "0"]);
    assert!(
        printed.contains("1 blob file(s) without an index row removed"),
        "{printed}"
    );
    assert!(!path.exists());
}

#[test]
fn crash_leftovers_are_recovered_and_verify_tells_claims_from_data() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data_path = dir.path().join("data");
    snapshot_dir(&dir.path().join("snaps"), 2, 1000);
    hindsight_ok(
        &data_path,
        &[
            "import",
            dir.path().join("snaps").to_str().unwrap(),
            "--run",
            "r",
        ],
    );
    rt.block_on(async {
        let data = hindsight::app::DataDir::open(&data_path).await.unwrap();
        // (a) An ingest that claimed a blob and died before publishing it, and one that died
        // after publishing but before recording it.
        let lost = blake3::hash(b"never published").to_hex().to_string();
        data.db.claim_blob(&lost, 15, None).await.unwrap();
        let published = data
            .put_blob(b"published, never recorded".to_vec(), "test")
            .await
            .unwrap();
        // A claim on a blob a snapshot already uses (a re-import of the same file, killed).
        let snaps = data
            .db
            .snapshots(data.db.run("r").await.unwrap().unwrap().id)
            .await
            .unwrap();
        data.db
            .claim_blob(&snaps[0].digest, snaps[0].byte_size as u64, None)
            .await
            .unwrap();
        // (b) An import killed before its first snapshot: an empty run.
        data.db
            .run_or_create_with("killed", &serde_json::json!({}))
            .await
            .unwrap();
        // (c) A staging file of a dead writer, and one of a live writer (locked).
        let orphan = data.store.root().join("tmp/blob-orphan");
        std::fs::write(&orphan, b"partial").unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&orphan)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let live = data.store.staging_file("blob-", "").unwrap();
        live.as_file().set_modified(old).unwrap();

        // verify: the claims are not problems, nothing is missing.
        let report = hindsight::app::verify(&data, &()).await.unwrap();
        assert!(report.ok(), "{:?}", report.problems);
        assert_eq!(report.pending_claims, 2, "{report:?}");

        // Recovery past the grace period (zero here) cleans all of it, keeps the live file.
        let recovered = hindsight::app::recover(&data.db, &data.store, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(recovered.temp_files, 1, "{recovered:?}");
        assert_eq!(recovered.claims_restored, 1, "{recovered:?}");
        assert_eq!(recovered.claims_removed, 2, "{recovered:?}");
        assert_eq!(recovered.empty_runs, 1, "{recovered:?}");
        assert!(!orphan.exists() && live.path().exists());
        assert!(!data.store.contains(&published.parse().unwrap()));
        assert!(data.db.blob_state(&lost).await.unwrap().is_none());
        assert_eq!(
            data.db.blob_state(&snaps[0].digest).await.unwrap(),
            Some(hindsight::db::BlobState::Valid)
        );
        assert!(data.db.run("killed").await.unwrap().is_none());
        assert!(data.db.run("r").await.unwrap().is_some());
        let report = hindsight::app::verify(&data, &()).await.unwrap();
        assert!(report.ok() && report.pending_claims == 0, "{report:?}");
        // Within the grace period nothing is touched (an ingest may be in progress).
        data.db.claim_blob(&lost, 15, None).await.unwrap();
        let recovered = hindsight::app::recover(&data.db, &data.store, hindsight::app::CLAIM_GRACE)
            .await
            .unwrap();
        assert_eq!(recovered.claims_removed, 0);
        drop(live);
    });
    // (d) A refused ingest gives back its claim and removes what it published, unless
    // something else holds the blob.
    rt.block_on(async {
        let data = hindsight::app::DataDir::open(&data_path).await.unwrap();
        let d = data.put_blob(b"refused".to_vec(), "test").await.unwrap();
        let store = data.store.clone();
        let digest: hindsight::store::Digest = d.parse().unwrap();
        assert!(data
            .db
            .release_claim(&d, move || store.remove(&digest).map(|_| ()))
            .await
            .unwrap());
        assert!(!data.store.contains(&digest));
        assert!(data.db.blob_state(&d).await.unwrap().is_none());
        // Two claims (two ingests of the same content): the first release keeps the blob.
        let d = data.put_blob(b"shared".to_vec(), "test").await.unwrap();
        data.db.claim_blob(&d, 6, None).await.unwrap();
        let digest: hindsight::store::Digest = d.parse().unwrap();
        let store = data.store.clone();
        assert!(!data
            .db
            .release_claim(&d, move || store.remove(&digest).map(|_| ()))
            .await
            .unwrap());
        assert!(data.store.contains(&digest));
    });
}

#[test]
fn a_damaged_index_stops_every_command_before_it_hides_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    snapshot_dir(&dir.path().join("snaps"), 2, 1000);
    import_snaps(&data, dir.path());
    let index = data.join("index.sqlite");
    let blobs = blob_files(&data);
    for (what, damage_it) in [
        (
            "truncated to 0 bytes",
            Box::new(|p: &Path| {
                std::fs::write(p, b"").unwrap();
                let _ = std::fs::remove_file(p.with_extension("sqlite-wal"));
            }) as Box<dyn Fn(&Path)>,
        ),
        (
            "overwritten with garbage",
            Box::new(|p: &Path| {
                std::fs::write(p, vec![0x5a; 8192]).unwrap();
                let _ = std::fs::remove_file(p.with_extension("sqlite-wal"));
            }),
        ),
    ] {
        let wal = index.with_extension("sqlite-wal");
        let saved = (std::fs::read(&index).unwrap(), std::fs::read(&wal).ok());
        damage_it(&index);
        for args in [
            vec!["serve", "--addr", "127.0.0.1:0"],
            vec!["verify"],
            vec!["runs"],
            vec!["gc"],
        ] {
            let out = hindsight(&data, &args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{what}: {args:?} succeeded");
            assert!(
                err.contains("index") && err.contains("rebuild-index"),
                "{what}: {args:?}: {err}"
            );
        }
        // Nothing was removed.
        assert_eq!(blob_files(&data), blobs, "{what}");
        std::fs::write(&index, saved.0).unwrap();
        if let Some(w) = saved.1 {
            std::fs::write(&wal, w).unwrap();
        }
    }
    hindsight_ok(&data, &["verify"]);
    // A healthy index is not rebuilt; a lost one is, from the snapshots in the store, under
    // the run name a reconstruction recorded.
    let before = hindsight_ok(&data, &["snapshots", "r", "--json"]);
    let digests = |listing: &str| {
        let mut d: Vec<String> = serde_json::from_str::<Value>(listing)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["digest"].as_str().unwrap().to_owned())
            .collect();
        d.sort();
        d
    };
    reconstruct_007(&data, &dir.path().join("out"));
    let out = hindsight(&data, &["rebuild-index"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to rebuild"));
    std::fs::write(&index, b"").unwrap();
    let printed = hindsight_ok(&data, &["rebuild-index"]);
    assert!(printed.contains("run \"r\": 4 snapshot(s)"), "{printed}");
    assert!(
        printed.contains("1 other blob(s) are not indexed"),
        "{printed}"
    );
    assert_eq!(
        digests(&hindsight_ok(&data, &["snapshots", "r", "--json"])),
        digests(&before)
    );
    hindsight_ok(&data, &["verify"]);
    assert!(std::fs::read_dir(&data).unwrap().flatten().any(|e| e
        .file_name()
        .to_string_lossy()
        .starts_with("index.sqlite.damaged-")));
    // A journal line that names a run this version refuses does not stop the rebuild; the
    // rest is recovered and the line reported.
    let journal = data.join("store/journal.jsonl");
    let mut text = std::fs::read_to_string(&journal).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let mut bad = first.clone();
    bad["run"] = Value::from("in\u{200b}visible");
    text.push_str(&format!("{bad}\n{{not json\n"));
    std::fs::write(&journal, text).unwrap();
    std::fs::write(&index, b"").unwrap();
    let printed = hindsight_ok(&data, &["rebuild-index"]);
    assert!(printed.contains("run \"r\": 4 snapshot(s)"), "{printed}");
    assert!(printed.contains("refused: run"), "{printed}");
    assert!(
        printed.contains("1 line(s) of store/journal.jsonl could not be read"),
        "{printed}"
    );
    // A rebuild that did not finish keeps every command out, and one beside a running
    // server is refused.
    std::fs::write(data.join("index.sqlite.rebuilding"), b"").unwrap();
    let out = hindsight(&data, &["runs"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not finish"));
    std::fs::remove_file(data.join("index.sqlite.rebuilding")).unwrap();
    let server = Server::start(&data, &[]);
    let out = hindsight(&data, &["rebuild-index", "--force"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(server);
    hindsight_ok(&data, &["verify"]);
}

#[test]
fn a_full_disk_gives_a_clear_error_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    snapshot_dir(&dir.path().join("snaps"), 3, 300_000);
    import_snaps(&data, dir.path());
    let before = hindsight_ok(&data, &["snapshots", "r", "--json"]);
    // Files of the server may grow to 512 KiB (RLIMIT_FSIZE; a tmpfs needs mount rights):
    // a 1.2 MB snapshot or reconstruction does not fit, the index does.
    let server = Server::start_with(&data, &[], |command| limit_file_size(command, 512 << 10));
    let big = snapshot(300_000, 99, &[]);
    let r = server.request(
        "POST",
        "/runs/r/snapshots?nimg=9000000&sigma_rel=0.05",
        &[],
        &big,
    );
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(r.status, 507, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_storage");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no space"));
    let (status, body) = server.json("POST", "/reconstruct", r#"{"run": "r", "sigma_rel": 0.07}"#);
    assert_eq!(status, 507, "{body}");
    // Reads go on; nothing partial is visible; the earlier snapshots are intact.
    assert_eq!(server.request("GET", "/runs/r", &[], b"").status, 200);
    let (_, run) = server.json("GET", "/runs/r", "");
    assert!(run["reconstructions"].as_array().unwrap().is_empty());
    assert!(
        staging_files(&data).is_empty(),
        "{:?}",
        staging_files(&data)
    );
    drop(server);
    // The CLI's import says so in words too, and leaves nothing.
    let file = dir.path().join("big-0009000-0.050.safetensors");
    std::fs::write(&file, &big).unwrap();
    let mut import = Command::new(env!("CARGO_BIN_EXE_hindsight"));
    import
        .arg("--data-dir")
        .arg(&data)
        .arg("import")
        .arg(&file)
        .args(["--run", "new"]);
    limit_file_size(&mut import, 512 << 10);
    let out = import.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("no space left"), "{text}");
    assert!(staging_files(&data).is_empty());
    assert_eq!(hindsight_ok(&data, &["snapshots", "r", "--json"]), before);
    assert!(!hindsight(&data, &["snapshots", "new"]).status.success());
    hindsight_ok(&data, &["verify"]);
}

/// Limits the size of every file the command writes to `bytes` (RLIMIT_FSIZE), with SIGXFSZ
/// ignored so that writes fail with EFBIG: a full disk without mounting one.
fn limit_file_size(command: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The crash loop of `hindsight bench chaos`, shortened for CI (the benchmark runs 60 kills):
/// SIGKILL during imports, uploads and reconstructions (server and CLI); after each, recovery,
/// `verify`, every blob file hashed, every acknowledged snapshot present, imports resumed.
#[test]
fn crash_loop_short() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .args([
            "bench",
            "chaos",
            "--iterations",
            "12",
            "--seed",
            "7",
            "--json",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["failures"].as_array().unwrap().len(), 0, "{report}");
    let kills: u64 = report["kills"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(kills, 12);
    assert!(
        report["acknowledged_checked"].as_u64().unwrap() > 12 * 24,
        "{report}"
    );
    assert!(report["blob_files_checked"].as_u64().unwrap() > 0);
}

/// Peak resident memory (VmHWM) of process `pid`, MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib / 1024.0
}

/// 2048-d statistics (mean 0, identity covariance) written to `path` as a pytorch-fid
/// `.npz` (33.5 MB); returns its bytes.
fn inception_sized_npz(path: &Path) -> Vec<u8> {
    let d = 2048;
    let mut sigma = vec![0.0; d * d];
    for i in 0..d {
        sigma[i * d + i] = 1.0;
    }
    hindsight::metrics::FeatureStats::from_parts(vec![0.0; d], sigma, 0)
        .unwrap()
        .write_npz(std::fs::File::create(path).unwrap())
        .unwrap();
    std::fs::read(path).unwrap()
}

/// Milliseconds of one `GET /healthz` on a fresh connection (`None`: no 200).
fn healthz_ms(server: &Server) -> Option<f64> {
    let t = Instant::now();
    let r = server.request("GET", "/healthz", &[], b"");
    (r.status == 200).then(|| t.elapsed().as_secs_f64() * 1e3)
}

/// Reliability 2, item 5 of the probe: silent sockets are closed after the idle time and
/// cannot fill the connection cap, from another address or from the same one; a request
/// without a usable Host is refused.
#[test]
fn silent_connections_cannot_lock_clients_out() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(
        &data,
        &[
            "--max-connections",
            "64",
            "--max-connections-per-client",
            "32",
            "--idle-timeout-secs",
            "1.5",
        ],
    );
    // 200 silent connections from 127.0.0.2 and 100 from 127.0.0.1 (the probe's own
    // address): far past both caps.
    let mut silent: Vec<TcpStream> = (0..200)
        .map(|_| connect(&server.addr, Some("127.0.0.2")))
        .chain((0..100).map(|_| connect(&server.addr, None)))
        .collect();
    // Healthz answers meanwhile. From 127.0.0.1 itself, while its own flood is still being
    // closed (more than twice the per-client cap open), it may first get a 429 with
    // Retry-After, as a client would: it then tries again.
    for _ in 0..5 {
        let t = Instant::now();
        while healthz_ms(&server).is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "healthz did not answer while sockets sat silent"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // A client at 127.0.0.2 still gets in: its own idle connections make room.
    let r = exchange(&server.addr, Some("127.0.0.2"), "GET", "/runs", &[], b"");
    assert_eq!(r.status, 200);
    // After the idle time, every silent socket has been closed by the server: silently, or
    // (past twice the per-client cap) with a 429 naming the reason.
    std::thread::sleep(Duration::from_millis(2500));
    let mut answered = 0;
    for tcp in silent.iter_mut() {
        tcp.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut got = Vec::new();
        match tcp.read_to_end(&mut got) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("a silent connection is still open: {e}"),
        }
        let text = String::from_utf8_lossy(&got);
        assert!(
            got.is_empty()
                || (text.starts_with("HTTP/1.1 429") && text.contains("too_many_connections")),
            "{text}"
        );
        answered += usize::from(!got.is_empty());
    }
    assert!(answered < silent.len(), "most were let in, then closed");
    // A keep-alive connection idle between requests is closed the same way.
    let mut keep = connect(&server.addr, None);
    write!(
        keep,
        "GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n",
        server.addr
    )
    .unwrap();
    keep.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut first = [0u8; 256];
    let n = keep.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    let t = Instant::now();
    let mut rest = Vec::new();
    let _ = keep.read_to_end(&mut rest);
    assert!(
        t.elapsed() > Duration::from_millis(1000) && t.elapsed() < Duration::from_secs(4),
        "{:?}",
        t.elapsed()
    );
    // No Host, an empty one or one that is not ASCII: refused, naming Host.
    for head in [
        "GET /runs HTTP/1.1\r\nConnection: close\r\n\r\n"
            .as_bytes()
            .to_vec(),
        b"GET /runs HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /runs HTTP/1.1\r\nHost: b\xc3\xa4d.example\r\nConnection: close\r\n\r\n".to_vec(),
    ] {
        let mut tcp = connect(&server.addr, None);
        tcp.write_all(&head).unwrap();
        let mut raw = Vec::new();
        let _ = tcp.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(text.contains("Host"), "{text}");
    }
    let mut server = server;
    assert!(server.child.try_wait().unwrap().is_none());
}

/// Reliability 2, item 4 of the probe: clients that ask for a large statistics file and
/// never read hold a bounded amount of memory (the file streams from disk), and the server
/// keeps answering meanwhile.
#[test]
fn slow_readers_of_large_files_hold_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &[]);
    let path = dir.path().join("big.npz");
    let npz = inception_sized_npz(&path);
    let r = server.request("POST", "/references?name=big", &[], &npz);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let before = peak_rss_mib(server.child.id());
    let mut readers = Vec::new();
    for _ in 0..60 {
        let mut tcp = connect(&server.addr, None);
        write!(
            tcp,
            "GET /references/big/stats.npz HTTP/1.1\r\nHost: {}\r\n\r\n",
            server.addr
        )
        .unwrap();
        readers.push(tcp);
    }
    std::thread::sleep(Duration::from_secs(2));
    let ms = healthz_ms(&server).expect("healthz");
    let peak = peak_rss_mib(server.child.id());
    // Held whole, 60 copies would be 2 GB; streamed, each holds a chunk or two.
    assert!(
        peak - before < 300.0,
        "peak RSS grew from {before:.0} to {peak:.0} MiB with 60 slow readers"
    );
    assert!(ms < 2000.0, "healthz took {ms} ms");
    // The file is still served whole, and checked: its bytes are the stored ones.
    let r = server.request("GET", "/references/big/stats.npz", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.complete);
    assert_eq!(
        blake3::hash(&r.body),
        blake3::hash(&std::fs::read(&path).unwrap())
    );
    drop(readers);
    assert!(server.child.try_wait().unwrap().is_none());
}

/// Reference names follow the run-name rules: invisible and direction characters, padding
/// and slashes are refused, naming the field; nothing is stored.
#[test]
fn reference_names_follow_the_run_name_rules() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let npz = inception_sized_npz(&dir.path().join("s.npz"));
    for name in [
        "a%E2%80%8Bb",
        "a%E2%80%AEb",
        "%20padded",
        "a%2Fb",
        "123",
        "ok%0Anewline",
    ] {
        let r = server.request("POST", &format!("/references?name={name}"), &[], &npz);
        assert_eq!(
            r.status,
            400,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(
            v["error"]["message"].as_str().unwrap().contains("name"),
            "{v}"
        );
    }
    let r = server.request("GET", "/references", &[], b"");
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["references"].as_array().unwrap().len(), 0, "{v}");
    let r = server.request("POST", "/references?name=caf%C3%A9%20ref", &[], &npz);
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
}
