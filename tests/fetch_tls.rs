//! Downloads behind a TLS-intercepting proxy (issue 26): a CONNECT proxy on loopback
//! (`HTTPS_PROXY`) in front of an HTTPS server whose certificate is signed by a certificate
//! authority of the test's own. With `SSL_CERT_FILE` naming that CA the download succeeds
//! through the proxy; with another CA it fails with `UnknownIssuer` and a hint saying what
//! to do; `NO_PROXY` bypasses the proxy.
//!
//! The downloader loads its trust roots once per process, so each case runs in a child
//! process: this test binary re-run with `FETCH_TLS_CHILD` set, filtered to [`child`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

const BODY: &[u8] = b"weights, as the proxy's CA vouches";

/// A CA named `name` and a `localhost` certificate it signed: (CA PEM, leaf DER, leaf key
/// DER).
fn authority(name: &str) -> (String, Vec<u8>, Vec<u8>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, name);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .unwrap();
    (ca_cert.pem(), leaf.der().to_vec(), leaf_key.serialize_der())
}

/// An HTTPS server on loopback answering every request with [`BODY`]; returns its port.
fn https_server(leaf: Vec<u8>, key: Vec<u8>) -> u16 {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from(leaf)],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
        )
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let mut tcp = stream;
                let mut conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tls.read(&mut byte).unwrap_or(0) == 0 {
                        return; // the client refused the certificate
                    }
                    head.push(byte[0]);
                }
                let _ = write!(
                    tls,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    BODY.len()
                );
                let _ = tls.write_all(BODY);
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    port
}

/// A CONNECT proxy on loopback; returns its port and the targets it was asked for.
fn connect_proxy() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let record = record.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(client.try_clone().unwrap());
                let mut first = String::new();
                reader.read_line(&mut first).unwrap();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                }
                let target = first.split_whitespace().nth(1).unwrap_or("").to_owned();
                record.lock().unwrap().push(first.trim().to_owned());
                let port = target.rsplit(':').next().unwrap_or("443");
                let upstream = TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap()));
                let Ok(upstream) = upstream else { return };
                let mut client = client;
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .unwrap();
                let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                let mut u1 = upstream;
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut reader, &mut u1);
                    let _ = u1.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut u2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
                let _ = up.join();
            });
        }
    });
    (port, seen)
}

/// Runs [`child`] in a fresh process with `env`; returns (success, its output).
fn run_child(env: &[(&str, String)]) -> (bool, String) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "child", "--nocapture", "--test-threads", "1"])
        .env("FETCH_TLS_CHILD", "1");
    for var in [
        "ALL_PROXY",
        "all_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ] {
        command.env_remove(var);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The child: downloads `FETCH_TLS_URL` and prints the outcome.
#[test]
fn child() {
    if std::env::var_os("FETCH_TLS_CHILD").is_none() {
        return;
    }
    let url = std::env::var("FETCH_TLS_URL").unwrap();
    match hindsight::fetch::get(&url, 1 << 20, &()) {
        Ok(body) => {
            assert_eq!(body, BODY);
            println!("DOWNLOADED");
        }
        Err(e) => panic!("DOWNLOAD FAILED: {e}"),
    }
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn downloads_through_a_proxy_trust_its_ca_from_ssl_cert_file() {
    if std::env::var_os("FETCH_TLS_CHILD").is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, leaf, key) = authority("hindsight test proxy CA");
    let (other_ca, _, _) = authority("some other CA");
    let server = https_server(leaf, key);
    let (proxy, seen) = connect_proxy();
    let url = format!("https://localhost:{server}/default_1.pt");
    let ca_file = write(&dir.path().join("proxy-ca.pem"), &ca_pem);
    let other_file = write(&dir.path().join("other-ca.pem"), &other_ca);
    let proxy_url = format!("http://127.0.0.1:{proxy}");

    // The proxy's CA trusted through SSL_CERT_FILE: downloaded, through the proxy.
    let (ok, out) = run_child(&[
        ("FETCH_TLS_URL", url.clone()),
        ("HTTPS_PROXY", proxy_url.clone()),
        ("SSL_CERT_FILE", ca_file.clone()),
    ]);
    assert!(ok && out.contains("DOWNLOADED"), "{out}");
    let asked = seen.lock().unwrap().clone();
    assert_eq!(asked, vec![format!("CONNECT localhost:{server} HTTP/1.1")]);

    // The same through SSL_CERT_DIR (a directory of PEM files, as c_rehash leaves them or not).
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    write(&certs.join("proxy-ca.pem"), &ca_pem);
    let (ok, out) = run_child(&[
        ("FETCH_TLS_URL", url.clone()),
        ("HTTPS_PROXY", proxy_url.clone()),
        ("SSL_CERT_DIR", certs.to_str().unwrap().to_owned()),
    ]);
    assert!(ok && out.contains("DOWNLOADED"), "{out}");

    // Another CA: refused, and the message says what to do.
    let (ok, out) = run_child(&[
        ("FETCH_TLS_URL", url.clone()),
        ("HTTPS_PROXY", proxy_url.clone()),
        ("SSL_CERT_FILE", other_file),
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("UnknownIssuer"), "{out}");
    assert!(out.contains("SSL_CERT_FILE"), "the hint: {out}");

    // NO_PROXY: straight to the server, the proxy not asked.
    let before = seen.lock().unwrap().len();
    let (ok, out) = run_child(&[
        ("FETCH_TLS_URL", url),
        ("HTTPS_PROXY", proxy_url),
        ("NO_PROXY", "localhost".to_owned()),
        ("SSL_CERT_FILE", ca_file),
    ]);
    assert!(ok && out.contains("DOWNLOADED"), "{out}");
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "NO_PROXY bypasses the proxy"
    );
}
