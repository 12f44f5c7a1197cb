//! The web UI: the static files of `web/`, embedded in the binary (so `cargo install` users
//! get them and they work offline), served at `/` and `/ui/…`.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ApiResult};

/// `(path under /ui/, content type, bytes)` of every embedded file. The script is a tree of
/// ES modules (no build step): `app.js` imports `js/main.js`, which imports the rest; each
/// module is listed here, served as `text/javascript` like any script.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../web/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/app.js"),
    ),
    (
        "js/main.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/js/main.js"),
    ),
    (
        "js/api.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/js/api.js"),
    ),
    (
        "js/wire.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/js/wire.js"),
    ),
    (
        "js/dom.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/js/dom.js"),
    ),
    (
        "js/format.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/js/format.js"),
    ),
    (
        "js/chart.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/js/chart.js"),
    ),
    (
        "js/pages/runs.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/js/pages/runs.js"),
    ),
    (
        "js/pages/run.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/js/pages/run.js"),
    ),
    (
        "js/pages/sweep.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/js/pages/sweep.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../web/app.css"),
    ),
    (
        "vendor/uplot/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "vendor/uplot/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../web/vendor/uplot/uPlot.min.css"),
    ),
    (
        "vendor/uplot/LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../../web/vendor/uplot/LICENSE"),
    ),
];

/// The page may load only its own scripts and styles (uPlot and the page set inline style
/// attributes), images from this server, and talk to this server.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'";

/// Strong ETags of the embedded files, computed once.
fn etags() -> &'static Vec<String> {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        FILES
            .iter()
            .map(|(_, _, bytes)| format!("\"{}\"", &blake3::hash(bytes).to_hex()[..32]))
            .collect()
    })
}

fn serve(index: usize, headers: &HeaderMap) -> Response {
    let (_, content_type, bytes) = FILES[index];
    let etag = &etags()[index];
    // If-None-Match compares weakly (RFC 9110 §13.1.2): `W/"x"` matches `"x"`; `*` matches.
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag.as_str())
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (StatusCode::OK, bytes).into_response()
    };
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// The UI's page.
pub(super) async fn index(headers: HeaderMap) -> Response {
    serve(0, &headers)
}

/// A file of the UI.
pub(super) async fn file(Path(path): Path<String>, headers: HeaderMap) -> ApiResult<Response> {
    FILES
        .iter()
        .position(|(p, _, _)| *p == path)
        .map(|i| serve(i, &headers))
        .ok_or_else(|| ApiError::not_found(format!("no file /ui/{path}")))
}

/// `/ui` and `/ui/`: the page lives at `/`.
pub(super) async fn to_index() -> Response {
    (
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, HeaderValue::from_static("/"))],
    )
        .into_response()
}

/// An SVG picture made here (profiles, sweep curves): no caching, and headers that keep a
/// browser from running anything in it or guessing another type.
pub(super) fn svg_response(svg: String) -> Response {
    let mut response = (StatusCode::OK, svg).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("image/svg+xml"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::FILES;

    /// The module paths `source` imports (`import … from './x.js'`, `import './x.js'`, and
    /// the last line of an import over several lines, `} from './x.js'`).
    fn imports(source: &str) -> Vec<&str> {
        source
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("import ") || l.starts_with("} from "))
            .filter_map(|l| l.split(['\'', '"']).nth(1))
            .collect()
    }

    /// `target` relative to the directory of `from` (both paths under `/ui/`).
    fn resolve(from: &str, target: &str) -> String {
        let mut parts: Vec<&str> = from.split('/').collect();
        parts.pop();
        for part in target.split('/') {
            match part {
                "." => {}
                ".." => {
                    parts.pop();
                }
                p => parts.push(p),
            }
        }
        parts.join("/")
    }

    #[test]
    fn every_module_the_script_imports_is_embedded() {
        let embedded: Vec<&str> = FILES.iter().map(|(p, _, _)| *p).collect();
        for (path, _, bytes) in FILES.iter().filter(|(p, _, _)| p.ends_with(".js")) {
            let Ok(source) = std::str::from_utf8(bytes) else {
                continue; // the minified vendor script
            };
            for target in imports(source) {
                let resolved = resolve(path, target);
                assert!(
                    embedded.contains(&resolved.as_str()),
                    "{path} imports {target} ({resolved}), which src/server/ui.rs does not embed"
                );
            }
        }
    }

    #[test]
    fn every_file_of_web_js_is_embedded() {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push(path);
                }
            }
        }
        let web = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
        let mut found = Vec::new();
        walk(&web.join("js"), &mut found);
        assert!(!found.is_empty());
        for path in found {
            let rel = path
                .strip_prefix(&web)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            assert!(
                FILES.iter().any(|(p, _, _)| *p == rel),
                "web/{rel} is not embedded in src/server/ui.rs"
            );
        }
    }
}
