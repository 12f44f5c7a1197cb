//! The HTTP API through `app(state)`: every route, every error status, auth on and off, Range
//! and ETag, single-flight, uploads (whole, conflicting, cut off), plus real HTTP on a port.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use hindsight::app::DataDir;
use hindsight::format::{write_safetensors, OutTensor};
use hindsight::server::{app, hash_token, parse_token_hashes, AppState, ServerConfig};

const TOKEN: &str = "hs_test-token";

/// A snapshot file: f32 `w` [4, 8], f16 `h` [16], i64 `step`; values from a hash of (seed, j);
/// nimg and sigma_rel in its metadata.
fn snapshot(seed: u64, nimg: u64, sigma_rel: f64) -> Vec<u8> {
    let value = |j: u64| {
        let mut z = (seed * 1_000_003 + j).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z ^= z >> 29;
        ((z % 20_000) as f32 - 10_000.0) / 5000.0
    };
    let w: Vec<u8> = (0..32).flat_map(|j| value(j).to_le_bytes()).collect();
    let h: Vec<u8> = (0..16)
        .flat_map(|j| half::f16::from_f32(value(100 + j)).to_le_bytes())
        .collect();
    let step = (seed as i64).to_le_bytes();
    let meta = BTreeMap::from([
        ("nimg".to_owned(), nimg.to_string()),
        ("sigma_rel".to_owned(), sigma_rel.to_string()),
    ]);
    let mut out = Vec::new();
    write_safetensors(
        &mut out,
        &[
            OutTensor {
                name: "w",
                dtype: "F32",
                shape: &[4, 8],
                data: &w,
            },
            OutTensor {
                name: "h",
                dtype: "F16",
                shape: &[16],
                data: &h,
            },
            OutTensor {
                name: "step",
                dtype: "I64",
                shape: &[],
                data: &step,
            },
        ],
        &meta,
    )
    .unwrap();
    out
}

/// The snapshots of run `r`: three times, two widths each.
fn run_snapshots() -> Vec<(u64, f64, Vec<u8>)> {
    let mut out = Vec::new();
    for (k, nimg) in [4_000_000u64, 8_000_000, 12_000_000]
        .into_iter()
        .enumerate()
    {
        for (j, sigma) in [0.05, 0.10].into_iter().enumerate() {
            let seed = (k * 2 + j) as u64;
            out.push((nimg, sigma, snapshot(seed, nimg, sigma)));
        }
    }
    out
}

struct Server {
    _dir: tempfile::TempDir,
    state: AppState,
    data: DataDir,
}

impl Server {
    async fn new(config: ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path()).await.unwrap();
        let state = AppState::new(data.clone(), config);
        Self {
            _dir: dir,
            state,
            data,
        }
    }

    fn app(&self) -> Router {
        app(self.state.clone())
    }

    async fn send(
        &self,
        mut request: Request<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        // As every HTTP/1.1 client does (the server refuses a request with no Host).
        request
            .headers_mut()
            .entry(axum::http::header::HOST)
            .or_insert(axum::http::HeaderValue::from_static("localhost"));
        let response = self.app().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, headers, body)
    }

    async fn json(&self, request: Request<Body>) -> (StatusCode, Value) {
        let (status, _, body) = self.send(request).await;
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or_else(|_| {
                panic!("not JSON ({status}): {}", String::from_utf8_lossy(&body))
            })
        };
        (status, value)
    }

    async fn upload_all(&self) {
        for (_, _, bytes) in run_snapshots() {
            let (status, body) = self.json(upload("r", "", bytes)).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
    }
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn post_json(uri: &str, body: Value) -> Request<Body> {
    Request::post(uri)
        .header(header::HOST, "localhost")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn upload(run: &str, query: &str, bytes: Vec<u8>) -> Request<Body> {
    Request::post(format!("/runs/{run}/snapshots{query}"))
        .header(header::CONTENT_LENGTH, bytes.len())
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::from(bytes))
        .unwrap()
}

#[track_caller]
fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// Direct f64 weighted sums of the snapshots' float tensors with the report's weights.
fn expected_sums(report: &Value, files: &[(u64, f64, Vec<u8>)]) -> BTreeMap<String, Vec<f64>> {
    let mut sums: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for input in report["inputs"].as_array().unwrap() {
        let nimg = input["nimg"].as_u64().unwrap();
        let sigma = input["sigma_rel"].as_f64().unwrap();
        let w = input["weight"].as_f64().unwrap();
        let (_, _, bytes) = files.iter().find(|f| f.0 == nimg && f.1 == sigma).unwrap();
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        for name in ["w", "h"] {
            let values = floats(&st, name);
            let acc = sums
                .entry(name.to_owned())
                .or_insert_with(|| vec![0.0; values.len()]);
            for (a, v) in acc.iter_mut().zip(values) {
                *a += w * v;
            }
        }
    }
    sums
}

fn floats(st: &safetensors::SafeTensors<'_>, name: &str) -> Vec<f64> {
    let t = st.tensor(name).unwrap();
    match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::F16 => t
            .data()
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn upload_reconstruct_download_matches_direct_sums() {
    let server = Server::new(ServerConfig::default()).await;
    server.upload_all().await;
    let files = run_snapshots();

    let (status, body) = server
        .json(post_json(
            "/reconstruct",
            json!({"run": "r", "sigma_rel": 0.07}),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["cached"], false);
    assert_eq!(body["nimg"], 12_000_000);
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 64);
    assert_eq!(
        body["weights_url"],
        format!("/reconstructions/{id}/weights")
    );
    let report = &body["report"];
    assert!(report["relative_error"].as_f64().unwrap() < 0.2, "{report}");
    let weight_sum: f64 = report["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["weight"].as_f64().unwrap())
        .sum();
    assert!((weight_sum - 1.0).abs() < 1e-9);

    let (status, headers, bytes) = server
        .send(get(&format!("/reconstructions/{id}/weights")))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_LENGTH], bytes.len().to_string());
    assert_eq!(
        headers[header::ETAG],
        format!("\"{}\"", body["digest"].as_str().unwrap())
    );
    assert_eq!(headers[header::ACCEPT_RANGES], "bytes");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let expected = expected_sums(report, &files);
    for (name, want) in &expected {
        let got = floats(&st, name);
        assert_eq!(st.tensor(name).unwrap().dtype(), safetensors::Dtype::F32);
        for (g, w) in got.iter().zip(want) {
            // f32 accumulation and output: a few ulps of the largest term.
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{name}: {g} vs {w}"
            );
        }
    }
    // Non-float tensors come from the newest snapshot with a weight.
    let step = st.tensor("step").unwrap().data().to_vec();
    assert!([4i64, 5].iter().any(|s| s.to_le_bytes().to_vec() == step));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["run"], "r");
    assert_eq!(meta["hindsight_reconstruction"], id);
    assert_eq!(meta["accumulation"], "f32");

    // Asking again is a lookup; f16 and gamma spellings are their own entries.
    let (status, again) = server
        .json(post_json(
            "/reconstruct",
            json!({"run": "r", "sigma_rel": 0.07}),
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["id"], id.as_str());
    assert_eq!(again["cached"], true);
    assert_eq!(server.state.materialization_passes(), 1);
    let gamma = body["gamma"].as_f64().unwrap();
    let (_, by_gamma) = server
        .json(post_json(
            "/reconstruct",
            json!({"run": "r", "gamma": gamma}),
        ))
        .await;
    assert_eq!(
        by_gamma["id"],
        id.as_str(),
        "sigma_rel and the same gamma share one entry"
    );
    assert_eq!(server.state.materialization_passes(), 1);

    // A list (EDM2 syntax) gives a list, computed in one pass; f16 output.
    let (status, list) = server
        .json(post_json(
            "/reconstruct",
            json!({"run": "r", "sigma_rel": "0.06,0.08,...,0.12", "dtype": "f16", "nimg": 8_000_000}),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let items = list["reconstructions"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    assert!(items
        .iter()
        .all(|i| i["dtype"] == "f16" && i["nimg"] == 8_000_000));
    assert_eq!(server.state.materialization_passes(), 2);

    // The report endpoint and the run's listing show it.
    let (status, got) = server.json(get(&format!("/reconstructions/{id}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["digest"], body["digest"]);
    let (status, run) = server.json(get("/runs/r")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(run["snapshots"], 6);
    assert_eq!(run["reconstructions"].as_array().unwrap().len(), 5);
    assert_eq!(run["manifest"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn listings_health_blobs_and_openapi() {
    let server = Server::new(ServerConfig::default()).await;
    server.upload_all().await;
    let (status, runs) = server.json(get("/runs")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(runs[0]["name"], "r");
    assert_eq!(runs[0]["snapshots"], 6);
    let (status, snaps) = server.json(get("/runs/r/snapshots")).await;
    assert_eq!(status, StatusCode::OK);
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 6);
    let digest = snaps[0]["digest"].as_str().unwrap();
    // JSON columns are JSON objects, not JSON text inside strings.
    assert!(snaps[0]["dtypes"]["F32"].is_u64(), "{}", snaps[0]);
    assert!(snaps[0]["metadata"]["nimg"].is_string(), "{}", snaps[0]);
    let (status, run) = server.json(get("/runs/r")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(run["run"]["metadata"].is_object(), "{run}");
    // The schemas say so too.
    let (_, doc) = server.json(get("/openapi.json")).await;
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["Run"]["properties"]["metadata"]["type"], "object");
    assert_eq!(
        schemas["SnapshotRow"]["properties"]["dtypes"]["type"],
        "object"
    );

    let head = |uri: String| Request::head(uri).body(Body::empty()).unwrap();
    let (status, headers, body) = server.send(head(format!("/blobs/{digest}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    assert_eq!(
        headers[header::CONTENT_LENGTH],
        snaps[0]["byte_size"].to_string()
    );
    let (status, _, _) = server
        .send(head(format!("/blobs/{}", "0".repeat(64))))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = server.send(head("/blobs/xyz".into())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, health) = server.json(get("/healthz")).await;
    assert_eq!(
        (status, health["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );

    let (status, doc) = server.json(get("/openapi.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/reconstruct", "post"),
        ("/reconstructions/{id}", "get"),
        ("/reconstructions/{id}/weights", "get"),
        ("/runs", "get"),
        ("/runs/{run}", "get"),
        ("/runs/{run}/snapshots", "get"),
        ("/runs/{run}/snapshots", "post"),
        ("/blobs/{digest}", "head"),
        ("/healthz", "get"),
        ("/openapi.json", "get"),
    ] {
        assert!(
            paths[path][method].is_object(),
            "{method} {path} missing from the document"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test]
async fn every_error_status_has_the_json_shape() {
    let config = ServerConfig {
        max_json_bytes: 1024,
        max_upload_bytes: 4096,
        ..Default::default()
    };
    let server = Server::new(config).await;
    server.upload_all().await;
    use StatusCode as S;
    let cases: Vec<(Request<Body>, StatusCode, &str, &str)> = vec![
        (
            post_json("/reconstruct", json!({"run": "r"})),
            S::BAD_REQUEST,
            "invalid_input",
            "sigma_rel",
        ),
        (
            Request::post("/reconstruct")
                .body(Body::from("{not json"))
                .unwrap(),
            S::BAD_REQUEST,
            "invalid_input",
            "request body",
        ),
        (
            Request::post("/reconstruct")
                .body(Body::from(r#"{"run": "r", "sigma_rel": 0.1}xyz"#))
                .unwrap(),
            S::BAD_REQUEST,
            "invalid_input",
            "after the JSON object",
        ),
        (
            post_json("/reconstruct", json!({"run": "r", "gamma": "1,2,...,1e15"})),
            S::BAD_REQUEST,
            "invalid_input",
            "at most 64",
        ),
        (
            post_json(
                "/reconstruct",
                json!({"run": "r", "sigma_rel": "1e-300,2e-300,...,1e300"}),
            ),
            S::BAD_REQUEST,
            "invalid_input",
            "at most 64",
        ),
        (
            get("/runs/r/preview"),
            S::BAD_REQUEST,
            "invalid_input",
            "sigma_rel",
        ),
        (
            get("/runs/r/preview?sigma_rel=0.1&gamma=7"),
            S::BAD_REQUEST,
            "invalid_input",
            "exactly one of sigma_rel and gamma",
        ),
        (
            get("/runs/r/preview?sigma_rel=abc"),
            S::BAD_REQUEST,
            "invalid_input",
            "sigma_rel: \"abc\" is not a number",
        ),
        (
            get("/runs/r/preview?sigma_rel=0.3"),
            S::BAD_REQUEST,
            "invalid_input",
            "sigma_rel",
        ),
        (
            get("/runs/r/profiles.svg?gamma=-1"),
            S::BAD_REQUEST,
            "invalid_input",
            "gamma",
        ),
        (
            get("/runs/r/preview?sigma_rel=0.1&nimg=-5"),
            S::BAD_REQUEST,
            "invalid_input",
            "nimg",
        ),
        (
            get("/runs/nope/preview?sigma_rel=0.1"),
            S::NOT_FOUND,
            "not_found",
            "nope",
        ),
        (get("/ui/../Cargo.toml"), S::NOT_FOUND, "not_found", ""),
        (
            get("/runs/r/preview?sigma_rel=0.1&sigma_rel=0.2"),
            S::BAD_REQUEST,
            "invalid_input",
            "duplicate field `sigma_rel`",
        ),
        (
            get("/runs/%FF/preview?sigma_rel=0.1"),
            S::BAD_REQUEST,
            "invalid_input",
            "UTF-8",
        ),
        (
            get("/sweeps?run=a&run=b"),
            S::BAD_REQUEST,
            "invalid_input",
            "duplicate",
        ),
        (
            post_json(
                "/reconstruct",
                json!({"run": "r", "sigma_rel": 0.1, "colour": 1}),
            ),
            S::BAD_REQUEST,
            "invalid_input",
            "colour",
        ),
        (
            post_json("/reconstruct", json!({"run": "r", "sigma_rel": 0.5})),
            S::BAD_REQUEST,
            "invalid_input",
            "sigma_rel",
        ),
        (
            post_json("/reconstruct", json!({"run": "r", "sigma_rel": -1.0})),
            S::BAD_REQUEST,
            "invalid_input",
            "sigma_rel",
        ),
        (
            post_json(
                "/reconstruct",
                json!({"run": "r", "sigma_rel": 0.1, "dtype": "f8"}),
            ),
            S::BAD_REQUEST,
            "invalid_input",
            "dtype",
        ),
        (
            post_json(
                "/reconstruct",
                json!({"run": "r", "sigma_rel": 0.1, "nimg": 1}),
            ),
            S::BAD_REQUEST,
            "invalid_input",
            "nimg",
        ),
        (
            post_json("/reconstruct", json!({"run": "r", "sigma_rel": "0.1,x"})),
            S::BAD_REQUEST,
            "invalid_input",
            "sigma_rel",
        ),
        (
            post_json(
                "/reconstruct",
                json!({"run": "r", "sigma_rel": 0.1, "wait_secs": -1}),
            ),
            S::BAD_REQUEST,
            "invalid_input",
            "wait_secs",
        ),
        (
            post_json("/reconstruct", json!({"run": "nope", "sigma_rel": 0.1})),
            S::NOT_FOUND,
            "not_found",
            "nope",
        ),
        (
            post_json(
                "/reconstruct",
                json!({"run": "r", "sigma_rel": 0.1, "pad": "x".repeat(2000)}),
            ),
            S::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "larger",
        ),
        (
            get("/reconstructions/abc"),
            S::BAD_REQUEST,
            "invalid_input",
            "64",
        ),
        (
            get(&format!("/reconstructions/{}", "a".repeat(64))),
            S::NOT_FOUND,
            "not_found",
            "POST /reconstruct",
        ),
        (
            get(&format!("/reconstructions/{}/weights", "a".repeat(64))),
            S::NOT_FOUND,
            "not_found",
            "POST /reconstruct",
        ),
        (get("/runs/nope"), S::NOT_FOUND, "not_found", "nope"),
        (
            get("/runs/nope/snapshots"),
            S::NOT_FOUND,
            "not_found",
            "nope",
        ),
        (
            get("/no/such/route"),
            S::NOT_FOUND,
            "not_found",
            "/no/such/route",
        ),
        (
            Request::delete("/runs").body(Body::empty()).unwrap(),
            S::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "DELETE",
        ),
        (
            Request::post("/runs/r/snapshots")
                .body(Body::from(vec![0u8; 10]))
                .unwrap(),
            S::LENGTH_REQUIRED,
            "length_required",
            "Content-Length",
        ),
        (
            upload("r", "", vec![0u8; 5000]),
            S::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "4096",
        ),
        (
            upload("r", "", b"not a safetensors file".to_vec()),
            S::BAD_REQUEST,
            "invalid_input",
            "not a safetensors file: it is a text file",
        ),
        (
            upload("r", "?nimg=abc", snapshot(9, 1, 0.05)),
            S::BAD_REQUEST,
            "invalid_input",
            "query",
        ),
        (
            upload("r", "?sigma_rel=0.1&gamma=7", snapshot(9, 1, 0.05)),
            S::BAD_REQUEST,
            "invalid_input",
            "not both",
        ),
        (
            upload("a%2Fb", "", snapshot(9, 1, 0.05)),
            S::BAD_REQUEST,
            "invalid_input",
            "slashes",
        ),
        // Same time and width as a stored snapshot, other content.
        (
            upload("r", "", snapshot(99, 4_000_000, 0.05)),
            S::CONFLICT,
            "conflict",
            "different snapshot",
        ),
    ];
    for (request, status, code, needle) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let (got, body) = server.json(request).await;
        assert_error(got, &body, status, code);
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{what}: {message:?} should mention {needle:?}"
        );
    }
    // None of the refused uploads left anything behind.
    let (_, snaps) = server.json(get("/runs/r/snapshots")).await;
    assert_eq!(snaps.as_array().unwrap().len(), 6);
    assert!(server.data.store.temp_files().unwrap().is_empty());
    assert!(server.data.db.run("a/b").await.unwrap().is_none());
}

#[tokio::test]
async fn a_corrupt_snapshot_gives_a_plain_500() {
    let server = Server::new(ServerConfig::default()).await;
    server.upload_all().await;
    for s in server
        .json(get("/runs/r/snapshots"))
        .await
        .1
        .as_array()
        .unwrap()
    {
        let path = server
            .data
            .store
            .path(&s["digest"].as_str().unwrap().parse().unwrap());
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
    // Asked without waiting: 202 and a status URL that reports the failure once known.
    let (status, body) = server
        .json(post_json(
            "/reconstruct",
            json!({"run": "r", "sigma_rel": 0.07, "wait_secs": 0}),
        ))
        .await;
    if status == StatusCode::ACCEPTED {
        let url = body["status_url"].as_str().unwrap().to_owned();
        let mut polls = 0;
        loop {
            let (status, body) = server.json(get(&url)).await;
            if status != StatusCode::ACCEPTED {
                assert_error(status, &body, StatusCode::INTERNAL_SERVER_ERROR, "internal");
                break;
            }
            polls += 1;
            assert!(polls < 500, "the failure was never reported");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    } else {
        assert_error(status, &body, StatusCode::INTERNAL_SERVER_ERROR, "internal");
    }
    // Asked again (waiting): tried again, fails again, plainly.
    let (status, body) = server
        .json(post_json(
            "/reconstruct",
            json!({"run": "r", "sigma_rel": 0.07}),
        ))
        .await;
    assert_error(status, &body, StatusCode::INTERNAL_SERVER_ERROR, "internal");
    // Internal detail (paths, digests) stays in the log.
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("corrupt") && !message.contains('/'),
        "{message}"
    );
    // Nothing was recorded.
    let (_, run) = server.json(get("/runs/r")).await;
    assert!(run["reconstructions"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn auth_on_refuses_writes_without_a_valid_token() {
    let config = ServerConfig {
        token_hashes: parse_token_hashes(&format!("# ci\n{}\n", hash_token(TOKEN)), "tokens")
            .unwrap(),
        ..Default::default()
    };
    let server = Server::new(config).await;
    server.upload_all().await; // `upload` carries the token

    let no_token = post_json("/reconstruct", json!({"run": "r", "sigma_rel": 0.07}));
    let (status, headers, body) = server.send(no_token).await;
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");

    let mut wrong = post_json("/reconstruct", json!({"run": "r", "sigma_rel": 0.07}));
    wrong
        .headers_mut()
        .insert(header::AUTHORIZATION, "Bearer hs_guess".parse().unwrap());
    let (status, body) = server.json(wrong).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");

    let mut no_token_upload = upload("r", "", snapshot(50, 16_000_000, 0.05));
    no_token_upload.headers_mut().remove(header::AUTHORIZATION);
    let (status, body) = server.json(no_token_upload).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");

    for malformed in ["Bearer", "Bearer   ", "Basic aGk6aGk=", TOKEN] {
        let mut request = post_json("/reconstruct", json!({"run": "r", "sigma_rel": 0.07}));
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, malformed.parse().unwrap());
        let (status, body) = server.json(request).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    // The scheme is case-insensitive (RFC 9110 §11.1); one or more spaces before the token.
    let mut body = Value::Null;
    for (scheme, sigma_rel) in [("bearer ", 0.06), ("BEARER  ", 0.06), ("Bearer ", 0.07)] {
        let mut request = post_json("/reconstruct", json!({"run": "r", "sigma_rel": sigma_rel}));
        request.headers_mut().insert(
            header::AUTHORIZATION,
            format!("{scheme}{TOKEN}").parse().unwrap(),
        );
        let (status, answer) = server.json(request).await;
        assert_eq!(status, StatusCode::OK, "{scheme}: {answer}");
        body = answer;
    }
    // Reads stay open.
    let id = body["id"].as_str().unwrap();
    assert_eq!(server.json(get("/runs")).await.0, StatusCode::OK);
    assert_eq!(
        server
            .send(get(&format!("/reconstructions/{id}/weights")))
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn auth_off_accepts_writes_without_tokens() {
    let server = Server::new(ServerConfig::default()).await;
    let mut request = upload("r", "", snapshot(1, 4_000_000, 0.05));
    request.headers_mut().remove(header::AUTHORIZATION);
    assert_eq!(server.json(request).await.0, StatusCode::CREATED);
}

#[test]
fn token_files_hold_hashes_only() {
    let token = hindsight::server::new_token().unwrap();
    assert!(token.starts_with("hs_") && token.len() > 40);
    assert_ne!(token, hindsight::server::new_token().unwrap());
    let line = hash_token(&token);
    assert!(line.starts_with("blake3:") && !line.contains(&token));
    assert_eq!(parse_token_hashes(&line, "f").unwrap().len(), 1);
    let err = parse_token_hashes("# x\n\nplain-token\n", "tokens.txt").unwrap_err();
    assert!(err.to_string().starts_with("tokens.txt:3:"), "{err}");
}

#[tokio::test]
async fn range_etag_and_conditional_requests() {
    let server = Server::new(ServerConfig::default()).await;
    server.upload_all().await;
    let (_, body) = server
        .json(post_json(
            "/reconstruct",
            json!({"run": "r", "sigma_rel": 0.07}),
        ))
        .await;
    let url = body["weights_url"].as_str().unwrap().to_owned();
    let etag = format!("\"{}\"", body["digest"].as_str().unwrap());
    let (_, _, full) = server.send(get(&url)).await;
    let len = full.len();
    let with = |name: header::HeaderName, value: &str| {
        Request::get(&url)
            .header(name, value)
            .body(Body::empty())
            .unwrap()
    };

    let (status, headers, part) = server.send(with(header::RANGE, "bytes=10-99")).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part, full[10..100]);
    assert_eq!(headers[header::CONTENT_RANGE], format!("bytes 10-99/{len}"));
    assert_eq!(headers[header::CONTENT_LENGTH], "90");

    let (status, _, tail) = server.send(with(header::RANGE, "bytes=-16")).await;
    assert_eq!(
        (status, tail.as_slice()),
        (StatusCode::PARTIAL_CONTENT, &full[len - 16..])
    );
    let (status, _, rest) = server
        .send(with(header::RANGE, &format!("bytes={}-", len - 5)))
        .await;
    assert_eq!(
        (status, rest.as_slice()),
        (StatusCode::PARTIAL_CONTENT, &full[len - 5..])
    );

    let (status, headers, body) = server
        .send(with(header::RANGE, &format!("bytes={len}-")))
        .await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(headers[header::CONTENT_RANGE], format!("bytes */{len}"));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "range_not_satisfiable");

    // A suffix longer than the file is the whole file (RFC 9110 §14.1.2), as a 206.
    let (status, headers, body) = server
        .send(with(header::RANGE, &format!("bytes=-{}", len * 10)))
        .await;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::PARTIAL_CONTENT, &full[..])
    );
    assert_eq!(
        headers[header::CONTENT_RANGE],
        format!("bytes 0-{}/{len}", len - 1)
    );
    // An end past the file is clamped; overlapping or adjacent ranges are coalesced.
    let (status, _, body) = server
        .send(with(
            header::RANGE,
            &format!("bytes={}-{}", len - 3, len * 2),
        ))
        .await;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::PARTIAL_CONTENT, &full[len - 3..])
    );
    for value in ["bytes=0-49,10-99", "bytes=50-99,0-49", "bytes=0-99,20-30"] {
        let (status, headers, body) = server.send(with(header::RANGE, value)).await;
        assert_eq!(
            (status, body.as_slice()),
            (StatusCode::PARTIAL_CONTENT, &full[..100]),
            "{value}"
        );
        assert_eq!(headers[header::CONTENT_RANGE], format!("bytes 0-99/{len}"));
    }
    // One satisfiable range among unsatisfiable ones is served.
    let (status, _, body) = server
        .send(with(header::RANGE, &format!("bytes={len}-,0-9")))
        .await;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::PARTIAL_CONTENT, &full[..10])
    );

    // Several disjoint ranges, or a malformed or reversed one: the whole file (RFC 9110
    // allows the first and requires ignoring the others).
    for value in ["bytes=0-1,5-9", "lines=1-2", "bytes=5-2", "bytes=x-y"] {
        let (status, _, body) = server.send(with(header::RANGE, value)).await;
        assert_eq!((status, body.len()), (StatusCode::OK, len), "{value}");
    }

    let (status, headers, body) = server.send(with(header::IF_NONE_MATCH, &etag)).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert!(body.is_empty());
    assert_eq!(headers[header::ETAG], etag.as_str());
    let (status, _, _) = server
        .send(with(header::IF_NONE_MATCH, "\"other\", *"))
        .await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    let (status, _, _) = server.send(with(header::IF_NONE_MATCH, "\"other\"")).await;
    assert_eq!(status, StatusCode::OK);

    // If-Range with the current ETag honours the Range; with another, sends everything.
    let mut request = with(header::RANGE, "bytes=0-9");
    request
        .headers_mut()
        .insert(header::IF_RANGE, etag.parse().unwrap());
    assert_eq!(server.send(request).await.0, StatusCode::PARTIAL_CONTENT);
    let mut request = with(header::RANGE, "bytes=0-9");
    request
        .headers_mut()
        .insert(header::IF_RANGE, "\"old\"".parse().unwrap());
    let (status, _, body) = server.send(request).await;
    assert_eq!((status, body.len()), (StatusCode::OK, len));

    // HEAD gives the headers of the GET.
    let (status, headers, body) = server
        .send(Request::head(&url).body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    assert_eq!(headers[header::CONTENT_LENGTH], len.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_requests_are_computed_once() {
    let server = Server::new(ServerConfig::default()).await;
    server.upload_all().await;
    let body = json!({"run": "r", "sigma_rel": [0.06, 0.11], "dtype": "bf16"});
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let app = server.app();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let response = app.oneshot(post_json("/reconstruct", body)).await.unwrap();
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap())
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        for r in body["reconstructions"].as_array().unwrap() {
            ids.insert(r["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(ids.len(), 2);
    assert_eq!(
        server.state.materialization_passes(),
        1,
        "twelve identical requests, one pass"
    );
    // A request overlapping an earlier one computes only what is new.
    let (_, more) = server
        .json(post_json(
            "/reconstruct",
            json!({"run": "r", "sigma_rel": [0.06, 0.13], "dtype": "bf16"}),
        ))
        .await;
    let items = more["reconstructions"].as_array().unwrap();
    assert_eq!(
        (items[0]["cached"].as_bool(), items[1]["cached"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(server.state.materialization_passes(), 2);
}

#[tokio::test]
async fn slow_requests_get_202_and_a_status_url() {
    let config = ServerConfig {
        reconstruct_wait: Duration::ZERO,
        ..Default::default()
    };
    let server = Server::new(config).await;
    server.upload_all().await;
    let (status, headers, body) = server
        .send(post_json(
            "/reconstruct",
            json!({"run": "r", "sigma_rel": 0.08}),
        ))
        .await;
    let body: Value = serde_json::from_slice(&body).unwrap();
    let status_url = body["status_url"].as_str().unwrap().to_owned();
    if status == StatusCode::ACCEPTED {
        assert_eq!(body["status"], "running");
        assert_eq!(headers[header::LOCATION], status_url.as_str());
    } else {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let mut polls = 0;
    loop {
        let (status, report) = server.json(get(&status_url)).await;
        if status == StatusCode::OK {
            assert_eq!(report["status"], "ready");
            break;
        }
        assert_eq!(status, StatusCode::ACCEPTED, "{report}");
        polls += 1;
        assert!(polls < 500, "never finished");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _, _) = server.send(get(&format!("{status_url}/weights"))).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn an_upload_cut_off_midway_leaves_nothing() {
    let server = Server::new(ServerConfig::default()).await;
    let bytes = snapshot(3, 4_000_000, 0.05);
    let half = bytes[..bytes.len() / 2].to_vec();
    let stream = futures_util::stream::iter(vec![
        Ok::<_, std::io::Error>(axum::body::Bytes::from(half)),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "client went away",
        )),
    ]);
    let request = Request::post("/runs/r/snapshots")
        .header(header::CONTENT_LENGTH, bytes.len())
        .body(Body::from_stream(stream))
        .unwrap();
    let (status, body) = server.json(request).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cut short"),
        "{body}"
    );
    assert!(server.data.store.list().unwrap().is_empty());
    assert!(server.data.store.temp_files().unwrap().is_empty());
    // Not even the run it would have created.
    assert!(server.data.db.run("r").await.unwrap().is_none());
    assert_eq!(server.json(get("/runs")).await.1, json!([]));
    // The same file sent whole afterwards is stored.
    assert_eq!(
        server.json(upload("r", "", bytes)).await.0,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn uploads_take_time_and_width_from_query_headers_or_metadata() {
    let server = Server::new(ServerConfig::default()).await;
    // Metadata says (4e6, 0.05): a query that agrees is fine, one that disagrees is refused
    // by name (the same file cannot be two snapshots).
    let (status, body) = server
        .json(upload(
            "q",
            "?nimg=123456&sigma_rel=0.08&check_finite=true",
            snapshot(1, 4_000_000, 0.05),
        ))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("nimg"),
        "{body}"
    );
    let (status, body) = server
        .json(upload(
            "q",
            "?nimg=4000000&sigma_rel=0.08",
            snapshot(1, 4_000_000, 0.05),
        ))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sigma_rel"),
        "{body}"
    );
    let (status, body) = server
        .json(upload(
            "q",
            "?nimg=4000000&sigma_rel=0.05&check_finite=true",
            snapshot(1, 4_000_000, 0.05),
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // A file without metadata takes both from the headers; the query and a header that
    // disagree are refused.
    let mut request = upload("q2", "", snapshot_of(&[2.0], &[]));
    request
        .headers_mut()
        .insert("x-hindsight-nimg", "777".parse().unwrap());
    request
        .headers_mut()
        .insert("x-hindsight-gamma", "16.97".parse().unwrap());
    let (status, body) = server.json(request).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["nimg"], 777);
    let mut request = upload("q2", "?nimg=778&gamma=16.97", snapshot_of(&[3.0], &[]));
    request
        .headers_mut()
        .insert("x-hindsight-nimg", "779".parse().unwrap());
    let (status, body) = server.json(request).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    // The same bytes again: 200, nothing new.
    let (status, body) = server
        .json(upload(
            "q",
            "?nimg=4000000&sigma_rel=0.05",
            snapshot(1, 4_000_000, 0.05),
        ))
        .await;
    assert_eq!(
        (status, body["inserted"].as_bool()),
        (StatusCode::OK, Some(false))
    );
}

/// Real HTTP over TCP: a streamed download, an upload cut off by a closed socket, and a
/// graceful shutdown that lets an upload in flight finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_http_download_cut_upload_and_graceful_shutdown() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::new(ServerConfig::default()).await;
    server.upload_all().await;
    let (_, body) = server
        .json(post_json(
            "/reconstruct",
            json!({"run": "r", "sigma_rel": 0.07}),
        ))
        .await;
    let (_, _, expected) = server
        .send(get(body["weights_url"].as_str().unwrap()))
        .await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(hindsight::server::serve(
        listener,
        server.state.clone(),
        async {
            let _ = stopped.await;
        },
    ));

    // Download.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        body["weights_url"].as_str().unwrap()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&response[..split]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains(&format!("content-length: {}", expected.len())),
        "{head}"
    );
    assert_eq!(&response[split..], expected.as_slice());

    // An upload whose client disappears halfway.
    let bytes = snapshot(60, 20_000_000, 0.05);
    let blobs_before = server.data.store.list().unwrap().len();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /runs/r/snapshots HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        bytes.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
    drop(tcp);
    let mut settled = false;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if server.data.store.temp_files().unwrap().is_empty() {
            settled = true;
            break;
        }
    }
    assert!(settled, "the cut upload's temporary file was not removed");
    assert_eq!(server.data.store.list().unwrap().len(), blobs_before);
    let (_, snaps) = server.json(get("/runs/r/snapshots")).await;
    assert_eq!(snaps.as_array().unwrap().len(), 6);

    // Shutdown while an upload is in flight: it completes, then the server stops.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tcp.write_all(&bytes[bytes.len() / 2..]).await.unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the server stops after the upload")
        .unwrap()
        .unwrap();
    let (_, snaps) = server.json(get("/runs/r/snapshots")).await;
    assert_eq!(snaps.as_array().unwrap().len(), 7);
}

/// A snapshot with one F32 tensor `w` of `values` and the given `__metadata__`.
fn snapshot_of(values: &[f32], meta: &[(&str, &str)]) -> Vec<u8> {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let meta: BTreeMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut out = Vec::new();
    write_safetensors(
        &mut out,
        &[OutTensor {
            name: "w",
            dtype: "F32",
            shape: &[values.len()],
            data: &data,
        }],
        &meta,
    )
    .unwrap();
    out
}

#[tokio::test]
async fn numbers_beyond_the_index_are_400s_naming_the_field_and_leave_nothing() {
    let server = Server::new(ServerConfig::default()).await;
    let far = "9223372036854775808"; // 2^63
    let good = snapshot_of(&[1.0], &[("nimg", "1000"), ("sigma_rel", "0.05")]);
    for (what, request) in [
        (
            "metadata",
            upload(
                "r",
                "",
                snapshot_of(&[1.0], &[("nimg", far), ("sigma_rel", "0.05")]),
            ),
        ),
        (
            "query",
            upload("r", &format!("?nimg={far}&sigma_rel=0.05"), good.clone()),
        ),
        (
            "u64::MAX in the query",
            upload(
                "r",
                "?nimg=18446744073709551615&sigma_rel=0.05",
                good.clone(),
            ),
        ),
        (
            "σ_rel nearest sqrt(1/12)",
            upload(
                "r",
                "?nimg=1000&sigma_rel=0.28867513459481287",
                good.clone(),
            ),
        ),
    ] {
        let (status, body) = server.json(request).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("nimg") || message.contains("sigma_rel"),
            "{what}: {message}"
        );
        assert!(!message.contains("CHECK"), "{what}: {message}");
    }
    // Blank and padded run names, and files without tensors.
    for run in ["%20%20%20", "%20r", "r%09"] {
        let (status, body) = server.json(upload(run, "", good.clone())).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    }
    let (status, body) = server
        .json(upload(
            "r",
            "",
            snapshot_of(&[], &[("nimg", "1000"), ("sigma_rel", "0.05")])
                .into_iter()
                .collect(),
        ))
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "a zero-element tensor is a tensor: {body}"
    );
    let mut no_tensors = Vec::new();
    write_safetensors(
        &mut no_tensors,
        &[],
        &BTreeMap::from([
            ("nimg".to_owned(), "2000".to_owned()),
            ("sigma_rel".to_owned(), "0.05".to_owned()),
        ]),
    )
    .unwrap();
    let (status, body) = server.json(upload("r2", "", no_tensors)).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no tensors"));
    assert!(server.data.db.run("r2").await.unwrap().is_none());
    // A reconstruction time beyond the index.
    let (status, body) = server
        .json(post_json(
            "/reconstruct",
            json!({"run": "r", "sigma_rel": 0.05, "nimg": 9223372036854775808u64}),
        ))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    assert!(server.data.store.temp_files().unwrap().is_empty());
}

#[tokio::test]
async fn values_beyond_f16_and_non_finite_snapshots_get_clear_answers() {
    let server = Server::new(ServerConfig::default()).await;
    for (nimg, sigma) in [("1000", "0.05"), ("2000", "0.10")] {
        let bytes = snapshot_of(
            &[7e4, 1e5, -1e5, 1.0],
            &[("nimg", nimg), ("sigma_rel", sigma)],
        );
        assert_eq!(
            server.json(upload("r", "", bytes)).await.0,
            StatusCode::CREATED
        );
    }
    let ask = |clamp: bool| {
        post_json(
            "/reconstruct",
            json!({"run": "r", "sigma_rel": 0.10, "dtype": "f16", "clamp_out_of_range": clamp}),
        )
    };
    let (status, body) = server.json(ask(false)).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_input");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("dtype: tensor w has 3 element(s) beyond f16's range"),
        "{message}"
    );
    let (status, body) = server.json(ask(true)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["report"]["clamped"][0]["tensor"], "w");
    assert!(body["report"]["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["code"] == "clamped_out_of_range"));
    // A NaN stored without check_finite: 422, naming the snapshot and the tensor.
    let nan = snapshot_of(&[1.0, f32::NAN], &[("nimg", "1000"), ("sigma_rel", "0.05")]);
    assert_eq!(
        server.json(upload("n", "", nan)).await.0,
        StatusCode::CREATED
    );
    let (status, body) = server
        .json(post_json(
            "/reconstruct",
            json!({"run": "n", "sigma_rel": 0.05}),
        ))
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unprocessable",
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("tensor w holds a non-finite value (element 1)"),
        "{message}"
    );
}

#[tokio::test]
async fn preview_matches_the_reconstruction_report_and_the_ui_is_served() {
    let server = Server::new(ServerConfig::default()).await;
    server.upload_all().await;
    // The preview: the report a reconstruction of the same target stores, nothing computed.
    let (status, preview) = server.json(get("/runs/r/preview?sigma_rel=0.1")).await;
    assert_eq!(status, StatusCode::OK, "{preview}");
    assert_eq!(preview["sigma_rel"], 0.1);
    let (status, by_gamma) = server
        .json(get(&format!(
            "/runs/r/preview?gamma={}",
            preview["gamma"].as_f64().unwrap()
        )))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        by_gamma["inputs"], preview["inputs"],
        "σ_rel or its γ: one target"
    );
    let (_, stored) = server.json(get("/runs/r")).await;
    assert!(stored["reconstructions"].as_array().unwrap().is_empty());
    let (status, made) = server
        .json(post_json(
            "/reconstruct",
            json!({"run": "r", "sigma_rel": 0.1}),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{made}");
    for field in [
        "relative_error",
        "noise_gain",
        "condition_number",
        "coefficient_l1",
        "inputs",
        "warnings",
        "nimg",
    ] {
        assert_eq!(made["report"][field], preview[field], "{field}");
    }
    let (status, headers, svg) = server
        .send(get("/runs/r/profiles.svg?sigma_rel=0.1&nimg=8000000"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "image/svg+xml");
    assert!(String::from_utf8(svg).unwrap().contains("<svg"));

    // The UI: the page, its files, revalidation, and the headers that keep it to itself.
    let (status, headers, page) = server.send(get("/")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(headers[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    let page = String::from_utf8(page).unwrap();
    for file in [
        "/ui/app.js",
        "/ui/app.css",
        "/ui/vendor/uplot/uPlot.iife.min.js",
    ] {
        assert!(page.contains(file), "{file}");
        let (status, headers, body) = server.send(get(file)).await;
        assert_eq!(status, StatusCode::OK, "{file}");
        assert!(!body.is_empty());
        let etag = headers[header::ETAG].clone();
        let (status, _, body) = server
            .send(
                Request::get(file)
                    .header(header::IF_NONE_MATCH, etag)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_MODIFIED, "{file}");
        assert!(body.is_empty());
    }
    let (status, _, _) = server.send(get("/ui/vendor/uplot/LICENSE")).await;
    assert_eq!(status, StatusCode::OK, "the licence ships with the library");
}
