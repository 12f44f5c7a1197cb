//! The HTTP API through `app(state)`: every route, every error status, auth on and off, Range
//! and ETag, single-flight, uploads (whole, conflicting, cut off), plus real HTTP on a port.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::{json, Value};

use hindsight::server::{hash_token, parse_token_hashes, ServerConfig};

mod common;
use common::http::{
    assert_case_error, assert_error, delete, get, head, json_body, post_bytes, post_json,
    send_json, Expected, RequestExt, Server, CONFLICT, INTERNAL, INVALID_INPUT, LENGTH_REQUIRED,
    METHOD_NOT_ALLOWED, NOT_FOUND, PAYLOAD_TOO_LARGE, UNAUTHORIZED, UNPROCESSABLE,
};
use common::snapshot::SnapshotBuilder;

/// 416 for a Range that selects nothing of the file.
const RANGE_NOT_SATISFIABLE: Expected =
    (StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable");

const TOKEN: &str = "hs_test-token";

/// A snapshot file: f32 `w` [4, 8], f16 `h` [16], i64 `step`; values from a hash of (seed, j);
/// nimg and sigma_rel in its metadata.
fn snapshot(seed: u64, nimg: u64, sigma_rel: f64) -> Vec<u8> {
    let value = |j: u64| {
        let mut z = (seed * 1_000_003 + j).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z ^= z >> 29;
        ((z % 20_000) as f32 - 10_000.0) / 5000.0
    };
    let w: Vec<f32> = (0..32).map(value).collect();
    let h: Vec<f32> = (0..16).map(|j| value(100 + j)).collect();
    SnapshotBuilder::new()
        .f32("w", &[4, 8], &w)
        .f16("h", &[16], &h)
        .i64("step", &[], &[seed as i64])
        .meta("nimg", nimg)
        .meta("sigma_rel", sigma_rel)
        .bytes()
}

/// A snapshot with one F32 tensor `w` of `values` and the given `__metadata__`.
fn snapshot_of(values: &[f32], meta: &[(&str, &str)]) -> Vec<u8> {
    SnapshotBuilder::new()
        .f32("w", &[values.len()], values)
        .metas(meta)
        .bytes()
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

/// What these tests do to a server besides sending requests.
trait Uploads {
    /// Uploads [`run_snapshots`] into run `r`, each answered 201.
    async fn upload_all(&self);
}

impl Uploads for Server {
    async fn upload_all(&self) {
        for (_, _, bytes) in run_snapshots() {
            let (status, body) = self.json(upload("r", "", bytes)).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
    }
}

/// An upload of `bytes` as a snapshot of `run`, with the token.
fn upload(run: &str, query: &str, bytes: Vec<u8>) -> Request<Body> {
    let length = bytes.len().to_string();
    post_bytes(&format!("/runs/{run}/snapshots{query}"), bytes)
        .with_header(header::CONTENT_LENGTH, &length)
        .bearer(TOKEN)
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
            &json!({"run": "r", "sigma_rel": 0.07}),
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
            &json!({"run": "r", "sigma_rel": 0.07}),
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
            &json!({"run": "r", "gamma": gamma}),
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
            &json!({"run": "r", "sigma_rel": "0.06,0.08,...,0.12", "dtype": "f16", "nimg": 8_000_000}),
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

    let (status, headers, body) = server.send(head(&format!("/blobs/{digest}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    assert_eq!(
        headers[header::CONTENT_LENGTH],
        snaps[0]["byte_size"].to_string()
    );
    let (status, _, _) = server
        .send(head(&format!("/blobs/{}", "0".repeat(64))))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = server.send(head("/blobs/xyz")).await;
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

/// A server with small body limits (1 KiB of JSON, 4 KiB uploads) holding run `r`.
async fn server_with_small_limits() -> Server {
    let config = ServerConfig {
        max_json_bytes: 1024,
        max_upload_bytes: 4096,
        ..Default::default()
    };
    let server = Server::new(config).await;
    server.upload_all().await;
    server
}

/// Every refused reconstruction has the JSON error shape, its status and code, and a message
/// naming what is wrong.
#[tokio::test]
async fn refused_reconstructions_name_what_is_wrong() {
    let server = server_with_small_limits().await;
    let pad = "x".repeat(2000);
    let cases: Vec<(Value, Expected, &str)> = vec![
        (json!({"run": "r"}), INVALID_INPUT, "sigma_rel"),
        (
            json!({"run": "r", "gamma": "1,2,...,1e15"}),
            INVALID_INPUT,
            "at most 64",
        ),
        (
            json!({"run": "r", "sigma_rel": "1e-300,2e-300,...,1e300"}),
            INVALID_INPUT,
            "at most 64",
        ),
        (
            json!({"run": "r", "sigma_rel": 0.1, "colour": 1}),
            INVALID_INPUT,
            "colour",
        ),
        (
            json!({"run": "r", "sigma_rel": 0.5}),
            INVALID_INPUT,
            "sigma_rel",
        ),
        (
            json!({"run": "r", "sigma_rel": -1.0}),
            INVALID_INPUT,
            "sigma_rel",
        ),
        (
            json!({"run": "r", "sigma_rel": 0.1, "dtype": "f8"}),
            INVALID_INPUT,
            "dtype",
        ),
        (
            json!({"run": "r", "sigma_rel": 0.1, "nimg": 1}),
            INVALID_INPUT,
            "nimg",
        ),
        (
            json!({"run": "r", "sigma_rel": "0.1,x"}),
            INVALID_INPUT,
            "sigma_rel",
        ),
        (
            json!({"run": "r", "sigma_rel": 0.1, "wait_secs": -1}),
            INVALID_INPUT,
            "wait_secs",
        ),
        (json!({"run": "nope", "sigma_rel": 0.1}), NOT_FOUND, "nope"),
        (
            json!({"run": "r", "sigma_rel": 0.1, "pad": pad}),
            PAYLOAD_TOO_LARGE,
            "larger",
        ),
    ];
    for (body, expected, contains) in cases {
        let (status, answer) = server.json(post_json("/reconstruct", &body)).await;
        let case = format!("POST /reconstruct {body:.100}");
        assert_case_error(&case, status, &answer, expected, contains);
    }
    // Bodies that are not one JSON object, sent without a content type.
    for (text, contains) in [
        ("{not json", "request body"),
        (
            r#"{"run": "r", "sigma_rel": 0.1}xyz"#,
            "after the JSON object",
        ),
    ] {
        let (status, answer) = server.json(post_bytes("/reconstruct", text)).await;
        assert_case_error(text, status, &answer, INVALID_INPUT, contains);
    }
}

/// Refused queries name the parameter; the run named in the path must exist.
#[tokio::test]
async fn refused_queries_name_the_parameter() {
    let server = server_with_small_limits().await;
    let cases: [(&str, Expected, &str); 10] = [
        ("/runs/r/preview", INVALID_INPUT, "sigma_rel"),
        (
            "/runs/r/preview?sigma_rel=0.1&gamma=7",
            INVALID_INPUT,
            "exactly one of sigma_rel and gamma",
        ),
        (
            "/runs/r/preview?sigma_rel=abc",
            INVALID_INPUT,
            "sigma_rel: \"abc\" is not a number",
        ),
        ("/runs/r/preview?sigma_rel=0.3", INVALID_INPUT, "sigma_rel"),
        ("/runs/r/profiles.svg?gamma=-1", INVALID_INPUT, "gamma"),
        (
            "/runs/r/preview?sigma_rel=0.1&nimg=-5",
            INVALID_INPUT,
            "nimg",
        ),
        (
            "/runs/r/preview?sigma_rel=0.1&sigma_rel=0.2",
            INVALID_INPUT,
            "duplicate field `sigma_rel`",
        ),
        ("/runs/%FF/preview?sigma_rel=0.1", INVALID_INPUT, "UTF-8"),
        ("/sweeps?run=a&run=b", INVALID_INPUT, "duplicate"),
        ("/runs/nope/preview?sigma_rel=0.1", NOT_FOUND, "nope"),
    ];
    for (uri, expected, contains) in cases {
        let (status, answer) = server.json(get(uri)).await;
        assert_case_error(&format!("GET {uri}"), status, &answer, expected, contains);
    }
}

/// Unknown routes, runs and reconstructions, malformed ids and unknown methods get the JSON
/// error shape too.
#[tokio::test]
async fn unknown_routes_names_and_methods_get_the_json_error_shape() {
    let server = server_with_small_limits().await;
    let unknown = "a".repeat(64);
    let cases: Vec<(Request<Body>, Expected, &str)> = vec![
        (get("/ui/../Cargo.toml"), NOT_FOUND, ""),
        (get("/reconstructions/abc"), INVALID_INPUT, "64"),
        (
            get(&format!("/reconstructions/{unknown}")),
            NOT_FOUND,
            "POST /reconstruct",
        ),
        (
            get(&format!("/reconstructions/{unknown}/weights")),
            NOT_FOUND,
            "POST /reconstruct",
        ),
        (get("/runs/nope"), NOT_FOUND, "nope"),
        (get("/runs/nope/snapshots"), NOT_FOUND, "nope"),
        (get("/no/such/route"), NOT_FOUND, "/no/such/route"),
        (delete("/runs"), METHOD_NOT_ALLOWED, "DELETE"),
    ];
    for (request, expected, contains) in cases {
        let case = format!("{} {}", request.method(), request.uri());
        let (status, answer) = server.json(request).await;
        assert_case_error(&case, status, &answer, expected, contains);
    }
}

/// Refused uploads say why, and leave no file, no row and no run behind.
#[tokio::test]
async fn refused_uploads_say_why_and_leave_nothing() {
    let server = server_with_small_limits().await;
    let good = snapshot(9, 1, 0.05);
    let cases: Vec<(&str, Request<Body>, Expected, &str)> = vec![
        (
            "no Content-Length",
            post_bytes("/runs/r/snapshots", vec![0u8; 10]),
            LENGTH_REQUIRED,
            "Content-Length",
        ),
        (
            "over the upload limit",
            upload("r", "", vec![0u8; 5000]),
            PAYLOAD_TOO_LARGE,
            "4096",
        ),
        (
            "text",
            upload("r", "", b"not a safetensors file".to_vec()),
            INVALID_INPUT,
            "not a safetensors file: it is a text file",
        ),
        (
            "a time that is not a number",
            upload("r", "?nimg=abc", good.clone()),
            INVALID_INPUT,
            "query",
        ),
        (
            "both σ_rel and γ",
            upload("r", "?sigma_rel=0.1&gamma=7", good.clone()),
            INVALID_INPUT,
            "not both",
        ),
        (
            "a run name with a slash",
            upload("a%2Fb", "", good),
            INVALID_INPUT,
            "slashes",
        ),
        (
            "the time and width of a stored snapshot, other content",
            upload("r", "", snapshot(99, 4_000_000, 0.05)),
            CONFLICT,
            "different snapshot",
        ),
    ];
    for (case, request, expected, contains) in cases {
        let (status, answer) = server.json(request).await;
        assert_case_error(case, status, &answer, expected, contains);
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
            &json!({"run": "r", "sigma_rel": 0.07, "wait_secs": 0}),
        ))
        .await;
    if status == StatusCode::ACCEPTED {
        let url = body["status_url"].as_str().unwrap().to_owned();
        let mut polls = 0;
        loop {
            let (status, body) = server.json(get(&url)).await;
            if status != StatusCode::ACCEPTED {
                assert_error(status, &body, INTERNAL, "");
                break;
            }
            polls += 1;
            assert!(polls < 500, "the failure was never reported");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    } else {
        assert_error(status, &body, INTERNAL, "");
    }
    // Asked again (waiting): tried again, fails again, plainly.
    let (status, body) = server
        .json(post_json(
            "/reconstruct",
            &json!({"run": "r", "sigma_rel": 0.07}),
        ))
        .await;
    assert_error(status, &body, INTERNAL, "");
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

    let no_token = post_json("/reconstruct", &json!({"run": "r", "sigma_rel": 0.07}));
    let (status, headers, body) = server.send(no_token).await;
    let body = json_body(status, &body);
    assert_error(status, &body, UNAUTHORIZED, "");
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");

    let wrong =
        post_json("/reconstruct", &json!({"run": "r", "sigma_rel": 0.07})).bearer("hs_guess");
    let (status, body) = server.json(wrong).await;
    assert_error(status, &body, UNAUTHORIZED, "");

    let no_token_upload =
        upload("r", "", snapshot(50, 16_000_000, 0.05)).without_header(header::AUTHORIZATION);
    let (status, body) = server.json(no_token_upload).await;
    assert_error(status, &body, UNAUTHORIZED, "");

    for malformed in ["Bearer", "Bearer   ", "Basic aGk6aGk=", TOKEN] {
        let request = post_json("/reconstruct", &json!({"run": "r", "sigma_rel": 0.07}))
            .with_header(header::AUTHORIZATION, malformed);
        let (status, body) = server.json(request).await;
        assert_error(status, &body, UNAUTHORIZED, "");
    }
    // The scheme is case-insensitive (RFC 9110 §11.1); one or more spaces before the token.
    let mut body = Value::Null;
    for (scheme, sigma_rel) in [("bearer ", 0.06), ("BEARER  ", 0.06), ("Bearer ", 0.07)] {
        let request = post_json("/reconstruct", &json!({"run": "r", "sigma_rel": sigma_rel}))
            .with_header(header::AUTHORIZATION, &format!("{scheme}{TOKEN}"));
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
    let request =
        upload("r", "", snapshot(1, 4_000_000, 0.05)).without_header(header::AUTHORIZATION);
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
            &json!({"run": "r", "sigma_rel": 0.07}),
        ))
        .await;
    let url = body["weights_url"].as_str().unwrap().to_owned();
    let etag = format!("\"{}\"", body["digest"].as_str().unwrap());
    let (_, _, full) = server.send(get(&url)).await;
    let len = full.len();
    let with = |name: header::HeaderName, value: &str| get(&url).with_header(name, value);

    // Each Range header: the status, the part of the file sent, and the Content-Range where
    // one is checked.
    use StatusCode as S;
    let whole = format!("bytes 0-{}/{len}", len - 1);
    let first_100 = format!("bytes 0-99/{len}");
    let cases: Vec<(String, StatusCode, std::ops::Range<usize>, Option<String>)> = vec![
        (
            "bytes=10-99".into(),
            S::PARTIAL_CONTENT,
            10..100,
            Some(format!("bytes 10-99/{len}")),
        ),
        ("bytes=-16".into(), S::PARTIAL_CONTENT, len - 16..len, None),
        (
            format!("bytes={}-", len - 5),
            S::PARTIAL_CONTENT,
            len - 5..len,
            None,
        ),
        // A suffix longer than the file is the whole file (RFC 9110 §14.1.2), as a 206.
        (
            format!("bytes=-{}", len * 10),
            S::PARTIAL_CONTENT,
            0..len,
            Some(whole),
        ),
        // An end past the file is clamped; overlapping or adjacent ranges are coalesced.
        (
            format!("bytes={}-{}", len - 3, len * 2),
            S::PARTIAL_CONTENT,
            len - 3..len,
            None,
        ),
        (
            "bytes=0-49,10-99".into(),
            S::PARTIAL_CONTENT,
            0..100,
            Some(first_100.clone()),
        ),
        (
            "bytes=50-99,0-49".into(),
            S::PARTIAL_CONTENT,
            0..100,
            Some(first_100.clone()),
        ),
        (
            "bytes=0-99,20-30".into(),
            S::PARTIAL_CONTENT,
            0..100,
            Some(first_100),
        ),
        // One satisfiable range among unsatisfiable ones is served.
        (format!("bytes={len}-,0-9"), S::PARTIAL_CONTENT, 0..10, None),
        // Several disjoint ranges, or a malformed or reversed one: the whole file (RFC 9110
        // allows the first and requires ignoring the others).
        ("bytes=0-1,5-9".into(), S::OK, 0..len, None),
        ("lines=1-2".into(), S::OK, 0..len, None),
        ("bytes=5-2".into(), S::OK, 0..len, None),
        ("bytes=x-y".into(), S::OK, 0..len, None),
    ];
    for (range, status, part, content_range) in cases {
        let (got, headers, body) = server.send(with(header::RANGE, &range)).await;
        assert_eq!(
            (got, body.as_slice()),
            (status, &full[part.clone()]),
            "{range}"
        );
        assert_eq!(
            headers[header::CONTENT_LENGTH],
            part.len().to_string(),
            "{range}"
        );
        if let Some(content_range) = content_range {
            assert_eq!(headers[header::CONTENT_RANGE], content_range, "{range}");
        }
    }
    let (status, headers, body) = server
        .send(with(header::RANGE, &format!("bytes={len}-")))
        .await;
    let body = json_body(status, &body);
    assert_error(status, &body, RANGE_NOT_SATISFIABLE, "");
    assert_eq!(headers[header::CONTENT_RANGE], format!("bytes */{len}"));

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
    let request = with(header::RANGE, "bytes=0-9").with_header(header::IF_RANGE, &etag);
    assert_eq!(server.send(request).await.0, StatusCode::PARTIAL_CONTENT);
    let request = with(header::RANGE, "bytes=0-9").with_header(header::IF_RANGE, "\"old\"");
    let (status, _, body) = server.send(request).await;
    assert_eq!((status, body.len()), (StatusCode::OK, len));

    // HEAD gives the headers of the GET.
    let (status, headers, body) = server.send(head(&url)).await;
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
            send_json(&app, post_json("/reconstruct", &body)).await
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
            &json!({"run": "r", "sigma_rel": [0.06, 0.13], "dtype": "bf16"}),
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
            &json!({"run": "r", "sigma_rel": 0.08}),
        ))
        .await;
    let body = json_body(status, &body);
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
    let request = post_bytes("/runs/r/snapshots", Body::from_stream(stream))
        .with_header(header::CONTENT_LENGTH, &bytes.len().to_string());
    let (status, body) = server.json(request).await;
    assert_error(status, &body, INVALID_INPUT, "cut short");
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
    assert_error(status, &body, INVALID_INPUT, "nimg");
    let (status, body) = server
        .json(upload(
            "q",
            "?nimg=4000000&sigma_rel=0.08",
            snapshot(1, 4_000_000, 0.05),
        ))
        .await;
    assert_error(status, &body, INVALID_INPUT, "sigma_rel");
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
    let request = upload("q2", "", snapshot_of(&[2.0], &[]))
        .with_header("x-hindsight-nimg", "777")
        .with_header("x-hindsight-gamma", "16.97");
    let (status, body) = server.json(request).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["nimg"], 777);
    let request = upload("q2", "?nimg=778&gamma=16.97", snapshot_of(&[3.0], &[]))
        .with_header("x-hindsight-nimg", "779");
    let (status, body) = server.json(request).await;
    assert_error(status, &body, INVALID_INPUT, "");
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
            &json!({"run": "r", "sigma_rel": 0.07}),
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
        assert_error(status, &body, INVALID_INPUT, "");
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
        assert_error(status, &body, INVALID_INPUT, "");
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
    let no_tensors = SnapshotBuilder::new()
        .metas(&[("nimg", "2000"), ("sigma_rel", "0.05")])
        .bytes();
    let (status, body) = server.json(upload("r2", "", no_tensors)).await;
    assert_error(status, &body, INVALID_INPUT, "no tensors");
    assert!(server.data.db.run("r2").await.unwrap().is_none());
    // A reconstruction time beyond the index.
    let (status, body) = server
        .json(post_json(
            "/reconstruct",
            &json!({"run": "r", "sigma_rel": 0.05, "nimg": 9223372036854775808u64}),
        ))
        .await;
    assert_error(status, &body, INVALID_INPUT, "");
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
            &json!({"run": "r", "sigma_rel": 0.10, "dtype": "f16", "clamp_out_of_range": clamp}),
        )
    };
    let (status, body) = server.json(ask(false)).await;
    assert_error(status, &body, INVALID_INPUT, "");
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
            &json!({"run": "n", "sigma_rel": 0.05}),
        ))
        .await;
    assert_error(
        status,
        &body,
        UNPROCESSABLE,
        "tensor w holds a non-finite value (element 1)",
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
            &json!({"run": "r", "sigma_rel": 0.1}),
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
            .send(get(file).with_header(header::IF_NONE_MATCH, etag.to_str().unwrap()))
            .await;
        assert_eq!(status, StatusCode::NOT_MODIFIED, "{file}");
        assert!(body.is_empty());
    }
    let (status, _, _) = server.send(get("/ui/vendor/uplot/LICENSE")).await;
    assert_eq!(status, StatusCode::OK, "the licence ships with the library");
}
