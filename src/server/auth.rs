//! Bearer tokens. The server keeps only BLAKE3 hashes of its tokens (`blake3:<hex>` lines in
//! the token file); a request's token is hashed and compared in constant time. When tokens
//! are configured, every request that is not GET or HEAD needs one.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;

use super::error::{ApiError, ErrorCode};
use super::state::AppState;
use crate::error::{Error, Result};

/// The stored form of a token: `blake3:` and the hex digest of its bytes.
pub fn hash_token(token: &str) -> String {
    format!("blake3:{}", blake3::hash(token.as_bytes()).to_hex())
}

/// A fresh random token: `hs_` and 43 characters of URL-safe base64 of 32 random bytes.
pub fn new_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::io("drawing random bytes", std::io::Error::other(e.to_string())))?;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::from("hs_");
    let mut acc = 0u32;
    let mut bits = 0;
    for b in bytes {
        acc = (acc << 8) | b as u32;
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(ALPHABET[((acc >> bits) & 63) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (6 - bits)) & 63) as usize] as char);
    }
    Ok(out)
}

/// Parses a token file: one `blake3:<64 hex>` per line; blank lines and `#` comments are
/// ignored. Errors name the line.
pub fn parse_token_hashes(text: &str, source: &str) -> Result<Vec<blake3::Hash>> {
    let mut hashes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let hash = line
            .strip_prefix("blake3:")
            .and_then(|hex| blake3::Hash::from_hex(hex).ok())
            .ok_or_else(|| {
                Error::invalid(
                    format!("{source}:{}", i + 1),
                    "expected `blake3:<64 hex digits>` (see `hindsight token new`); tokens \
                     themselves are never stored",
                )
            })?;
        hashes.push(hash);
    }
    Ok(hashes)
}

/// Reads a token file (see [`parse_token_hashes`]); a file without any hash is an error.
pub fn read_token_file(path: &std::path::Path) -> Result<Vec<blake3::Hash>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let hashes = parse_token_hashes(&text, &path.display().to_string())?;
    if hashes.is_empty() {
        return Err(Error::invalid(
            path.display().to_string(),
            "holds no token hashes",
        ));
    }
    Ok(hashes)
}

/// Makes a new token and appends its hash (only) to the token file at `path`, created if
/// missing, durably. Returns the token, which is stored nowhere else.
pub fn append_new_token(path: &std::path::Path) -> Result<String> {
    use std::io::Write;
    let token = new_token()?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    writeln!(f, "{}", hash_token(&token))
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(token)
}

/// Middleware: refuses non-GET/HEAD requests without a valid bearer token when tokens are
/// configured.
pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> std::result::Result<Response, ApiError> {
    let hashes = &state.config.token_hashes;
    if hashes.is_empty() || matches!(*request.method(), Method::GET | Method::HEAD) {
        return Ok(next.run(request).await);
    }
    let unauthorized = |m: &str| ApiError::new(ErrorCode::Unauthorized, m);
    match presented_token(request.headers(), hashes) {
        Presented::None => Err(unauthorized(
            "this server needs a bearer token for requests that change state \
             (Authorization: Bearer <token>)",
        )),
        Presented::Malformed => Err(unauthorized(
            "the Authorization header must be `Bearer <token>`",
        )),
        Presented::Invalid => Err(unauthorized("the bearer token is not valid")),
        Presented::Valid => Ok(next.run(request).await),
    }
}

/// What a request's `Authorization` header holds, judged against the server's tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presented {
    /// No `Authorization` header.
    None,
    /// A header that is not `Bearer <token>`.
    Malformed,
    /// A bearer token that matches none of the server's (always so when it has none).
    Invalid,
    /// A bearer token the server knows.
    Valid,
}

/// Judges `headers`' bearer token against `hashes` (every hash compared, in constant time
/// each).
pub fn presented_token(headers: &HeaderMap, hashes: &[blake3::Hash]) -> Presented {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Presented::None;
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110 §11.1): `Bearer`, `bearer`, `BEARER`;
            // one or more spaces before the token.
            let (scheme, rest) = v.trim_start().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(rest)
        })
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Presented::Malformed;
    };
    let presented = blake3::hash(token.as_bytes());
    // `blake3::Hash` compares in constant time; every stored hash is compared.
    let mut ok = false;
    for h in hashes {
        ok |= *h == presented;
    }
    if ok {
        Presented::Valid
    } else {
        Presented::Invalid
    }
}

/// Middleware against cross-site requests to a server with no tokens (or a browser holding
/// one): refuses (403 `forbidden`) a request whose `Host` is not this server's when
/// [`super::ServerConfig::loopback_hosts_only`] is on (DNS rebinding), and any request that
/// changes state (not GET, HEAD or OPTIONS) sent by a web page of another origin (its
/// `Origin` names another host than `Host`). Clients that are not browsers send no `Origin`
/// and are unaffected; the web UI is same-origin.
pub async fn same_origin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> std::result::Result<Response, ApiError> {
    let forbidden = |m: String| ApiError::new(ErrorCode::Forbidden, m);
    if request.headers().get_all(header::HOST).iter().count() > 1
        || request.headers().get_all(header::ORIGIN).iter().count() > 1
    {
        return Err(ApiError::invalid("Host and Origin may each be given once"));
    }
    // An absolute-form target's authority wins over Host (RFC 9112 §3.2.2). A request that
    // names no host, or one that is not visible ASCII, is refused like a foreign one: it
    // could otherwise slip past the loopback check below.
    // HTTP/1.1 requires the Host header even with an absolute-form target (RFC 9112 §3.2);
    // HTTP/2 names the host in `:authority`, which hyper puts in the URI.
    let http1 = request.version() < axum::http::Version::HTTP_2;
    if http1 && !request.headers().contains_key(header::HOST) {
        return Err(ApiError::invalid(
            "Host: the request names no host (HTTP/1.1 requires a Host header, RFC 9112 §3.2)",
        ));
    }
    let host = match request.uri().authority() {
        Some(a) => a.to_string(),
        None => match request.headers().get(header::HOST) {
            None => {
                return Err(ApiError::invalid(
                    "Host: the request names no host (HTTP/1.1 requires a Host header, RFC \
                     9112 §3.2)",
                ))
            }
            Some(v) => match v.to_str() {
                Ok(h) if !h.is_empty() => h.to_owned(),
                _ => {
                    return Err(ApiError::invalid(
                        "Host: not a host name (empty, or not visible ASCII)",
                    ))
                }
            },
        },
    };
    if state.config.loopback_hosts_only && !host_allowed(&host, &state.config.allowed_hosts) {
        return Err(forbidden(format!(
            "Host {host:?} is not this server's: a server on a loopback address answers only \
             localhost, 127.0.0.1 and [::1] (protection against DNS rebinding); start it with \
             --allowed-host {} to add that name",
            host_name(&host)
        )));
    }
    if !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        if let Some(origin) = request.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let authority = origin.split_once("://").map_or("", |(_, a)| a);
            let same = host.eq_ignore_ascii_case(authority);
            if !same {
                return Err(forbidden(format!(
                    "a web page of another origin ({origin}) may not change this server's \
                     data"
                )));
            }
        }
    }
    Ok(next.run(request).await)
}

/// The name part of a `Host` value (without the port; IPv6 in brackets).
fn host_name(host: &str) -> &str {
    split_host(host).map_or(host, |(name, _)| name)
}

/// A `Host` value as (name, port): `name`, `name:port`, `[v6]` or `[v6]:port`, the port all
/// digits; `None` for anything else (text after `]`, an empty name, unbracketed IPv6).
fn split_host(host: &str) -> Option<(&str, Option<&str>)> {
    let (name, port) = if host.starts_with('[') {
        let end = host.find(']')?;
        let (name, rest) = host.split_at(end + 1);
        match rest {
            "" => (name, None),
            _ => (name, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    (!name.is_empty() && port_ok).then_some((name, port))
}

/// Whether `label` is a DNS label: 1–63 letters, digits and hyphens, not starting or
/// ending with a hyphen.
fn dns_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Whether `Host` names this loopback server: `localhost` or a name under it (RFC 6761:
/// such names resolve to loopback), `127.x.x.x`, `[::1]`, or one of `extra`, with any port
/// (one trailing dot allowed, as DNS spells absolute names).
fn host_allowed(host: &str, extra: &[String]) -> bool {
    let Some((name, _)) = split_host(host) else {
        return false;
    };
    let name = name.to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name);
    let under_localhost = name == "localhost"
        || name
            .strip_suffix(".localhost")
            .is_some_and(|sub| sub.split('.').all(dns_label));
    under_localhost
        || name == "[::1]"
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
        || extra.iter().any(|e| e.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn loopback_hosts_and_only_those() {
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "127.9.9.9",
            "[::1]:80",
            "LOCALHOST.",
            "app.localhost:8080",
        ] {
            assert!(host_allowed(ok, &[]), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "10.0.0.1",
            "[::2]:80",
            "localhost:80, evil.example",
            "localhost:x",
            "",
            "localhost..",
            ".localhost",
            "..localhost",
            "-.localhost",
            "%65vil.localhost",
            "[::1]x",
            "[::1]]",
            "[::1]:",
            "::1",
            "localhost:",
        ] {
            assert!(!host_allowed(bad, &[]), "{bad}");
        }
        assert!(host_allowed("box.lan:8080", &["box.lan".to_owned()]));
    }
}
