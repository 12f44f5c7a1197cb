//! External evaluators over HTTP (`docs/EVALUATORS.md`): external sweeps with user metrics,
//! the lease protocol (claim, heartbeat, batches of images or audited features, metrics,
//! finish, fail), what a refused write leaves behind (nothing), expired leases, and what the
//! sweep shows afterwards (workers, failures, results by metric, the best point by goal).
//! The feature network has the formula weights, so any machine runs these; the Python
//! client's tests run the same protocol with NVIDIA's weights and a PyTorch model.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use serde_json::{json, Value};

use hindsight::app::DataDir;
use hindsight::metrics::{npy, FeatureExtractor, FeatureStats, FEATURES};
use hindsight::server::{app, hash_token, parse_token_hashes, AppState, ServerConfig};
use hindsight::sweep::{SweepLimits, Worker, WorkerConfig};

mod common;
use common::http::{
    assert_error, get, post_bytes, post_json, post_json_text, send, send_json, Expected,
    RequestExt, AUDIT_FAILED, CONFLICT, INVALID_INPUT, LEASE_EXPIRED, NOT_FOUND, UNAUTHORIZED,
    UNFINISHED,
};
use common::tiny::setup;

const TOKEN: &str = "hs_evaluator-token";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The API over `data` with one token, the formula weights for scoring, no builtin worker,
/// and evaluator leases of `lease`.
fn api(data: &DataDir, weights: &Path, lease: Duration) -> Router {
    let config = ServerConfig {
        token_hashes: parse_token_hashes(&hash_token(TOKEN), "test").unwrap(),
        sweep_limits: SweepLimits {
            max_images: 1000,
            ..Default::default()
        },
        sweep_worker: None,
        fid_weights: Some(weights.to_owned()),
        evaluation_lease: lease,
        ..Default::default()
    };
    app(AppState::new(data.clone(), config))
}

/// `n` deterministic 8×8 RGB images, `[n, 8, 8, 3]`, differing with `salt`.
fn images_nhwc(n: usize, salt: u32) -> Vec<u8> {
    (0..n * 8 * 8 * 3)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(salt * 97) >> 11) as u8)
        .collect()
}

fn nhwc_to_nchw(pixels: &[u8], n: usize, side: usize, c: usize) -> Vec<u8> {
    let plane = side * side;
    let mut out = vec![0u8; pixels.len()];
    for i in 0..n {
        for p in 0..plane {
            for ch in 0..c {
                out[i * c * plane + ch * plane + p] = pixels[i * c * plane + p * c + ch];
            }
        }
    }
    out
}

fn npy_u8(shape: &[usize], values: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    npy::write_u8(&mut out, shape, values).unwrap();
    out
}

fn npy_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    npy::write_f32(&mut out, shape, values).unwrap();
    out
}

/// An `.npz` of `entries` (name without `.npy`, bytes).
fn npz(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    for (name, bytes) in entries {
        zip.start_file(format!("{name}.npy"), options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// Features of NHWC images with the formula weights, as an evaluator would compute them.
fn features_of(weights: &Path, nhwc: &[u8], n: usize) -> Vec<f32> {
    let extractor = FeatureExtractor::open(Some(weights)).unwrap();
    extractor
        .features(&nhwc_to_nchw(nhwc, n, 8, 3), n, 3, 8, 8)
        .unwrap()
}

async fn post(api: &Router, uri: &str, body: &Value) -> (StatusCode, Value) {
    send_json(api, post_json(uri, body).bearer(TOKEN)).await
}

async fn upload(api: &Router, lease: &str, k: u64, bytes: Vec<u8>) -> (StatusCode, Value) {
    send_json(
        api,
        post_bytes(&format!("/evaluations/{lease}/batches/{k}"), bytes).bearer(TOKEN),
    )
    .await
}

async fn create(api: &Router, body: Value) -> Value {
    let (status, sweep) = post(api, "/sweeps", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{sweep}");
    sweep
}

async fn claim(api: &Router, worker: &str, sweep: i64) -> Value {
    let (status, lease) = post(
        api,
        "/evaluations/claim",
        &json!({"worker": worker, "sweep": sweep}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{lease}");
    lease
}

fn external_sweep() -> Value {
    json!({"run": "tiny", "evaluator": "external", "sigma_rels": [0.05, 0.10],
           "reference": "proc", "num_images": 4, "batch": 2, "kid_subsets": 5,
           "metrics": ["fid", "kid", {"name": "val_loss", "goal": "min", "label": "validation loss"}],
           "sampler": {"steps": 3, "guidance": 1.5, "nested": {"kind": "heun"}}})
}

#[test]
fn an_external_point_is_evaluated_over_http_and_scored_as_builtin_points_are() {
    let s = setup();
    runtime().block_on(async {
        let data = DataDir::open(&s.path).await.unwrap();
        let api = api(&data, &s.weights, Duration::from_secs(60));
        let sweep = create(&api, external_sweep()).await;
        let id = sweep["id"].as_i64().unwrap();
        assert_eq!(sweep["spec"]["evaluator"], "external");
        // The user's sampler object comes back untouched.
        assert_eq!(
            sweep["spec"]["sampler"],
            json!({"steps": 3, "guidance": 1.5, "nested": {"kind": "heun"}})
        );
        let names: Vec<&str> = sweep["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["metric"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["fid", "kid", "val_loss"]);
        assert_eq!(sweep["metrics"][2]["kind"], "user");
        assert_eq!(sweep["metrics"][2]["label"], "validation loss");

        // hindsight's own worker leaves external points alone.
        let builtin = Worker::new(
            data.clone(),
            WorkerConfig {
                weights: Some(s.weights.clone()),
                ..Default::default()
            },
            Arc::new(|_| {}),
        );
        assert_eq!(builtin.run_until_idle().await.unwrap(), 0);

        // Without the token: refused.
        let (status, body) = send_json(
            &api,
            post_json("/evaluations/claim", &json!({"worker": "w"})),
        )
        .await;
        assert_error(status, &body, UNAUTHORIZED, "token");

        let lease = claim(&api, "gpu-1", id).await;
        let lease_id = lease["lease_id"].as_str().unwrap().to_owned();
        assert_eq!(lease["point"]["idx"], 0);
        assert_eq!(lease["batches"], 2);
        assert_eq!(lease["batches_done"], json!([]));
        assert_eq!(lease["seed_sets"], json!([{"set": 0, "first_seed": 0, "end_seed": 4}]));
        assert_eq!(lease["images"]["resolution"], 8);
        assert_eq!(lease["sampler"]["guidance"], 1.5);
        assert_eq!(lease["features"]["accepted"], true);
        // The reconstruction downloads, and its digest is its content's.
        let (status, _, weights) = send(&api, get(lease["reconstruction"]["url"].as_str().unwrap())).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            blake3::hash(&weights).to_hex().as_str(),
            lease["reconstruction"]["digest"].as_str().unwrap()
        );

        // Batch 0: images; the server computes their features.
        let first = images_nhwc(2, 1);
        let (status, body) = upload(&api, &lease_id, 0, npy_u8(&[2, 8, 8, 3], &first)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["features_by"], "server");
        // The same bytes again: a no-op; other bytes: a conflict.
        let (status, body) = upload(&api, &lease_id, 0, npy_u8(&[2, 8, 8, 3], &first)).await;
        assert_eq!((status, &body["recorded"]), (StatusCode::OK, &json!(false)), "{body}");
        let (status, body) =
            upload(&api, &lease_id, 0, npy_u8(&[2, 8, 8, 3], &images_nhwc(2, 9))).await;
        assert_error(status, &body, CONFLICT, "batch 0");

        // Batch 1: features computed by the evaluator, with two audit images (NCHW).
        let second = images_nhwc(2, 2);
        let features = features_of(&s.weights, &second, 2);
        let chw = nhwc_to_nchw(&second, 2, 8, 3);
        let body_npz = npz(&[
            ("features", npy_f32(&[2, FEATURES], &features)),
            ("audit_images", npy_u8(&[2, 3, 8, 8], &chw)),
        ]);
        let (status, body) = upload(&api, &lease_id, 1, body_npz).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["features_by"], "client");
        assert!(body["audit"]["max_relative_difference"].as_f64().unwrap() < 1e-6, "{body}");

        // Not finished until the user metric is in.
        let finish = format!("/evaluations/{lease_id}/finish");
        let (status, body) = post(&api, &finish, &json!({})).await;
        assert_error(status, &body, UNFINISHED, "val_loss");
        let metrics = format!("/evaluations/{lease_id}/metrics");
        let (status, body) = post(&api, &metrics, &json!({"val_loss": 0.5})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["missing"], json!([]));
        let (status, body) = post(&api, &metrics, &json!({"val_loss": 0.5})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = post(&api, &metrics, &json!({"val_loss": 0.6})).await;
        assert_error(status, &body, CONFLICT, "metrics.val_loss");

        let (status, point) = post(&api, &finish, &json!({})).await;
        assert_eq!(status, StatusCode::OK, "{point}");
        assert_eq!(point["status"], "done");
        let result = &point["result"];
        assert_eq!(result["features"], "mixed");
        assert_eq!(result["metrics"]["val_loss"]["value"], 0.5);
        // FID is the server's own computation on the four images' features.
        let mut all = features_of(&s.weights, &first, 2);
        all.extend_from_slice(&features);
        let mut stats = FeatureStats::new(FEATURES);
        stats.add(&all).unwrap();
        let reference = hindsight::app::references::stats(
            &data,
            &data.db.references().await.unwrap()[0],
        )
        .await
        .unwrap();
        let fid = hindsight::metrics::frechet_distance_of(&stats, &reference).unwrap();
        let got = result["fid"]["value"].as_f64().unwrap();
        assert!((got - fid).abs() <= 1e-6 * fid.abs(), "{got} vs {fid}");
        assert_eq!(result["metrics"]["fid"]["value"], result["fid"]["value"]);
        assert!(result["metrics"]["kid"]["value"].is_number());

        // The lease is over: writes under it are refused, naming why.
        let (status, body) =
            post(&api, &format!("/evaluations/{lease_id}/heartbeat"), &json!({})).await;
        assert_error(status, &body, LEASE_EXPIRED, "recorded");

        // The second point: a failure goes back to the queue with its message shown.
        let lease = claim(&api, "gpu-2", id).await;
        assert_eq!(lease["point"]["idx"], 1);
        let second_id = lease["lease_id"].as_str().unwrap().to_owned();
        let (status, view) = send_json(&api, get(&format!("/sweeps/{id}"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(view["workers"][0]["worker"], "gpu-2");
        assert_eq!(view["workers"][0]["idx"], 1);
        let (status, body) = post(
            &api,
            &format!("/evaluations/{second_id}/fail"),
            &json!({"message": "CUDA out of memory"}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["retry"], true);
        let (_, view) = send_json(&api, get(&format!("/sweeps/{id}"))).await;
        assert_eq!(view["workers"], json!([]));
        assert_eq!(view["failures"][0]["worker"], "gpu-2");
        assert_eq!(view["failures"][0]["outcome"], "failed");
        assert!(view["failures"][0]["message"]
            .as_str()
            .unwrap()
            .contains("CUDA out of memory"));
        assert_eq!(view["points"][1]["status"], "queued");
        assert_eq!(view["best"][2]["metric"], "val_loss");
        // The plot of the user metric.
        let (status, _, svg) = send(&api, get(&format!("/sweeps/{id}/plot.svg?metric=val_loss"))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(String::from_utf8_lossy(&svg).contains("validation loss"));
        // The grid of point 0 came from batch 0's images.
        let (status, _, png) = send(&api, get(&format!("/sweeps/{id}/points/0/grid.png"))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(png.starts_with(b"\x89PNG"));
    });
}

#[test]
fn bad_uploads_are_refused_by_name_and_record_nothing() {
    let s = setup();
    runtime().block_on(async {
        let data = DataDir::open(&s.path).await.unwrap();
        let api = api(&data, &s.weights, Duration::from_secs(60));
        let id = create(&api, external_sweep()).await["id"].as_i64().unwrap();
        let lease = claim(&api, "w", id).await;
        let lease_id = lease["lease_id"].as_str().unwrap().to_owned();
        let good = images_nhwc(2, 3);
        // Features of images resized without care: the audit catches them.
        let mut shifted = good.clone();
        shifted.rotate_left(3);
        let wrong_features = features_of(&s.weights, &shifted, 2);
        let garbage: Vec<u8> = (0..10_000_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let cases: Vec<(&str, u64, Vec<u8>, Expected, &str)> = vec![
            ("batch out of range", 2, npy_u8(&[2, 8, 8, 3], &good), INVALID_INPUT, "batch: 2 is out of range"),
            ("wrong batch size", 0, npy_u8(&[3, 8, 8, 3], &images_nhwc(3, 3)), INVALID_INPUT, "images: 3 images"),
            ("float images", 0, npy_f32(&[2, 8, 8, 3], &vec![0.5; 384]), INVALID_INPUT, "uint8"),
            ("another size", 0, npy_u8(&[2, 16, 16, 3], &vec![7; 1536]), INVALID_INPUT, "8×8"),
            ("no channel axis", 0, npy_u8(&[2, 8, 8, 4], &vec![7; 512]), INVALID_INPUT, "images"),
            ("10 MB of garbage", 0, garbage, INVALID_INPUT, "body"),
            (
                "features without audit images",
                0,
                npz(&[("features", npy_f32(&[2, FEATURES], &wrong_features))]),
                INVALID_INPUT,
                "audit_images",
            ),
            (
                "features of other images",
                0,
                npz(&[
                    ("features", npy_f32(&[2, FEATURES], &wrong_features)),
                    ("audit_images", npy_u8(&[2, 8, 8, 3], &good)),
                ]),
                AUDIT_FAILED,
                "audit_images[",
            ),
            (
                "features of the wrong width",
                0,
                npz(&[
                    ("features", npy_f32(&[2, 64], &[0.0; 128])),
                    ("audit_images", npy_u8(&[2, 8, 8, 3], &good)),
                ]),
                INVALID_INPUT,
                "features",
            ),
        ];
        for (what, k, bytes, expected, needle) in cases {
            let (status, body) = upload(&api, &lease_id, k, bytes).await;
            assert_error(status, &body, expected, needle);
            eprintln!("{what}: {}", body["error"]["message"]);
        }
        let metrics = format!("/evaluations/{lease_id}/metrics");
        for (what, text, needle) in [
            ("NaN", r#"{"val_loss": NaN}"#, "metrics.val_loss: NaN is not a finite number"),
            ("infinity", r#"{"val_loss": -Infinity}"#, "metrics.val_loss"),
            ("undeclared", r#"{"accuracy": 0.9}"#, "metrics.accuracy: not declared"),
            ("a string", r#"{"val_loss": "low"}"#, "metrics.val_loss"),
            ("too many values", r#"{"val_loss": [1, 2]}"#, "metrics.val_loss"),
            ("not an object", r#"[1]"#, "request body"),
        ] {
            let request = post_json_text(&metrics, text).bearer(TOKEN);
            let (status, body) = send_json(&api, request).await;
            assert_error(status, &body, INVALID_INPUT, needle);
            eprintln!("{what}: {}", body["error"]["message"]);
        }
        // Nothing of it was recorded.
        let (_, view) = send_json(&api, get(&format!("/sweeps/{id}"))).await;
        assert_eq!(view["images_done"], 0, "{view}");
        let (_, state) = post(&api, &format!("/evaluations/{lease_id}/heartbeat"), &json!({})).await;
        assert_eq!(state["batches_done"], json!([]));
        assert_eq!(state["metrics_recorded"], json!({}));
        // Unknown leases and bad claims.
        let (status, body) = upload(&api, "ls_nope", 0, npy_u8(&[2, 8, 8, 3], &good)).await;
        assert_error(status, &body, NOT_FOUND, "lease");
        let (status, body) = post(&api, "/evaluations/claim", &json!({"worker": ""})).await;
        assert_error(status, &body, INVALID_INPUT, "worker");
        let (status, body) =
            post(&api, "/evaluations/claim", &json!({"worker": "w", "sweep": 999})).await;
        assert_error(status, &body, NOT_FOUND, "sweep");
        let (status, body) =
            post(&api, "/evaluations/claim", &json!({"worker": "w", "run": "nope"})).await;
        assert_error(status, &body, NOT_FOUND, "run");
    });
}

#[test]
fn an_expired_lease_records_nothing_and_its_point_is_claimed_again() {
    let s = setup();
    runtime().block_on(async {
        let data = DataDir::open(&s.path).await.unwrap();
        // Long enough for the first upload's features on a busy machine.
        let api = api(&data, &s.weights, Duration::from_secs(4));
        let id = create(&api, external_sweep()).await["id"].as_i64().unwrap();
        let lease = claim(&api, "dying", id).await;
        let dead = lease["lease_id"].as_str().unwrap().to_owned();
        let (status, _) = upload(&api, &dead, 0, npy_u8(&[2, 8, 8, 3], &images_nhwc(2, 4))).await;
        assert_eq!(status, StatusCode::CREATED);
        tokio::time::sleep(Duration::from_millis(4300)).await;
        let (status, body) = upload(&api, &dead, 1, npy_u8(&[2, 8, 8, 3], &images_nhwc(2, 5))).await;
        assert_error(status, &body, LEASE_EXPIRED, "ran out");
        // The next evaluator resumes the point from its recorded batch.
        let lease = claim(&api, "fresh", id).await;
        assert_eq!(lease["point"]["idx"], 0);
        assert_eq!(lease["point"]["attempts"], 2);
        assert_eq!(lease["batches_done"], json!([0]));
        let (_, view) = send_json(&api, get(&format!("/sweeps/{id}"))).await;
        assert_eq!(view["failures"][0]["worker"], "dying");
        assert_eq!(view["failures"][0]["outcome"], "expired");
        assert_eq!(view["workers"][0]["worker"], "fresh");
        // The dead lease stays dead.
        let (status, body) = post(&api, &format!("/evaluations/{dead}/finish"), &json!({})).await;
        assert_error(status, &body, LEASE_EXPIRED, "another evaluator");
    });
}

#[test]
fn user_metric_sweeps_need_no_reference_and_rank_by_goal() {
    let s = setup();
    runtime().block_on(async {
        let data = DataDir::open(&s.path).await.unwrap();
        let api = api(&data, &s.weights, Duration::from_secs(60));
        let base = json!({"run": "tiny", "evaluator": "external", "sigma_rels": [0.05, 0.10],
                          "seed_sets": 2, "metrics": [{"name": "acc", "goal": "max"}]});
        // Refused shapes of such requests, by field.
        for (key, value, needle) in [
            ("num_images", json!(10), "num_images"),
            ("reference", json!("proc"), "reference"),
            ("metrics", json!([{"name": "Acc!", "goal": "max"}]), "metrics[0].name"),
            ("metrics", json!([{"name": "acc", "goal": "up"}]), "metrics[0]"),
            ("metrics", json!([{"name": "fid", "goal": "min"}]), "metrics[0].name"),
            ("metrics", json!([{"name": "a", "goal": "min"}, {"name": "a", "goal": "max"}]), "metrics[1]"),
            ("metrics", json!(["fid"]), "reference"),
            ("evaluator", json!("remote"), "evaluator"),
            ("sampler", json!([1]), "sampler"),
        ] {
            let mut body = base.clone();
            body[key] = value;
            let (status, answer) = post(&api, "/sweeps", &body).await;
            assert_error(status, &answer, INVALID_INPUT, needle);
        }
        // A builtin sweep takes no user metric.
        let mut builtin = base.clone();
        builtin["evaluator"] = json!("builtin");
        builtin["reference"] = json!("proc");
        let (status, answer) = post(&api, "/sweeps", &builtin).await;
        assert_error(status, &answer, INVALID_INPUT, "external");

        let id = create(&api, base).await["id"].as_i64().unwrap();
        for (k, values) in [[0.8, 0.82], [0.9, 0.88]].iter().enumerate() {
            let lease = claim(&api, "w", id).await;
            assert_eq!(lease["point"]["idx"], k);
            assert_eq!(lease["batches"], 0);
            let lease_id = lease["lease_id"].as_str().unwrap();
            let (status, body) = upload(&api, lease_id, 0, npy_u8(&[2, 8, 8, 3], &images_nhwc(2, 1))).await;
            assert_error(status, &body, INVALID_INPUT, "batch");
            let (status, body) = post(
                &api,
                &format!("/evaluations/{lease_id}/metrics"),
                &json!({"acc": values}),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let (status, point) =
                post(&api, &format!("/evaluations/{lease_id}/finish"), &json!({})).await;
            assert_eq!(status, StatusCode::OK, "{point}");
            assert_eq!(point["result"]["metrics"]["acc"]["values"], json!(values));
        }
        let (_, view) = send_json(&api, get(&format!("/sweeps/{id}"))).await;
        assert_eq!(view["status"], "done");
        // Higher is better: point 1.
        assert_eq!(view["best"][0]["metric"], "acc");
        assert_eq!(view["best"][0]["idx"], 1);
        assert!(view["best"][0]["error_bar"].as_f64().unwrap() > 0.0);
        assert_eq!(view["metrics"][0]["lower_is_better"], false);
        let (status, _) = post(&api, "/evaluations/claim", &json!({"worker": "w"})).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    });
}
