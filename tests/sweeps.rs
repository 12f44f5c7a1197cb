//! Sweeps through the library and the HTTP API: validation (4xx naming the field), the queue
//! (leases, expiry, lost leases, reconstruction pinning, cancel), and whole sweeps worked by
//! two workers at once. The feature network here has the formula weights (any machine runs
//! these); `sweep_e2e.rs` runs a sweep on NVIDIA's real weights and Fashion-MNIST.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};

use hindsight::app::DataDir;
use hindsight::db::{BatchWrite, ClaimFilter, LeaseOutcome, NewBatch, SweepStatus};
use hindsight::metrics::{FeatureStats, FEATURES};
use hindsight::server::{app, hash_token, parse_token_hashes, AppState, ServerConfig};
use hindsight::sweep::{self, SweepLimits, SweepRequest, Worker, WorkerConfig};

mod common;
use common::http::{
    assert_case_error, assert_error, delete, get, post_bytes, post_json, send, send_json, Expected,
    RequestExt, CONFLICT, INVALID_INPUT, LIMIT_REACHED, NOT_FOUND, UNAUTHORIZED,
};
use common::tiny::setup;

const TOKEN: &str = "hs_sweep-token";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn request(sigma_rels: &[f64], num_images: usize) -> SweepRequest {
    SweepRequest {
        run: "tiny".into(),
        evaluator: None,
        sigma_rels: sigma_rels.to_vec(),
        nimgs: None,
        metrics: None,
        num_images: Some(num_images),
        seed_sets: None,
        sampler: hindsight::sweep::SamplerRequest::Settings(hindsight::sweep::SamplerSettings {
            steps: 3,
            ..Default::default()
        }),
        reference: Some("proc".into()),
        batch: Some(2),
        kid_subsets: Some(10),
        kid_subset_size: None,
        allow_dataset_mismatch: false,
    }
}

fn worker(data: &DataDir, weights: &Path, lease: Duration) -> Arc<Worker> {
    Arc::new(Worker::new(
        data.clone(),
        WorkerConfig {
            weights: Some(weights.to_owned()),
            lease,
            ..Default::default()
        },
        Arc::new(|_| {}),
    ))
}

/// The API over `data`, with one token, a bound of 1000 images and no sweep worker.
fn api(data: &DataDir) -> Router {
    let config = ServerConfig {
        token_hashes: parse_token_hashes(&hash_token(TOKEN), "test").unwrap(),
        sweep_limits: SweepLimits {
            max_images: 1000,
            ..Default::default()
        },
        sweep_worker: None,
        ..Default::default()
    };
    app(AppState::new(data.clone(), config))
}

/// An upload of reference statistics `bytes` as `name` (no token).
fn upload_reference(name: &str, bytes: Vec<u8>) -> Request<Body> {
    post_bytes(&format!("/references?name={name}"), bytes)
}

/// `.npz` statistics of three 2048-d feature rows, without features (imported: no KID).
fn imported_statistics() -> Vec<u8> {
    let mut stats = FeatureStats::new(FEATURES);
    let rows: Vec<f32> = (0..3 * FEATURES).map(|i| (i % 7) as f32).collect();
    stats.add(&rows).unwrap();
    let mut npz = std::io::Cursor::new(Vec::new());
    stats.write_npz(&mut npz).unwrap();
    npz.into_inner()
}

/// Stores [`imported_statistics`] as reference `imported`.
async fn import_reference(api: &Router) {
    let request = upload_reference("imported", imported_statistics()).bearer(TOKEN);
    let (status, body) = send_json(api, request).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// A valid sweep request: run `tiny` against `proc`, 4 images, 3 sampler steps.
fn base_sweep() -> Value {
    json!({"run": "tiny", "sigma_rels": [0.05, 0.1], "num_images": 4,
           "reference": "proc", "sampler": {"steps": 3}})
}

/// [`base_sweep`] with `key` set to `value`.
fn sweep_with(key: &str, value: Value) -> Value {
    let mut body = base_sweep();
    body[key] = value;
    body
}

/// A sweep of EDM2's list syntax over every stored time (2-D: 4 widths × 2 times), against
/// reference 1 (`proc`, by id).
async fn two_d_sweep(data: &DataDir) -> Value {
    let run = data.db.run("tiny").await.unwrap().unwrap();
    let mut times: Vec<i64> = data
        .db
        .snapshots(run.id)
        .await
        .unwrap()
        .iter()
        .map(|s| s.nimg)
        .collect();
    times.dedup();
    json!({"run": "tiny", "sigma_rels": "0.05,0.10,...,0.20",
           "nimgs": times, "num_images": 4, "reference": 1})
}

/// Reference statistics are checked on upload: a token, a free name that is not all digits,
/// `.npz` contents, 2048 dimensions, a covariance that is one.
#[test]
fn reference_uploads_are_checked() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path()).await.unwrap();
        let api = api(&data);
        // 16-d statistics (the wrong network).
        let small = {
            let mut stats = FeatureStats::new(16);
            stats.add(&[0.5; 48]).unwrap();
            let mut npz = std::io::Cursor::new(Vec::new());
            stats.write_npz(&mut npz).unwrap();
            npz.into_inner()
        };
        // Statistics that are not a covariance: negative variances, and a matrix that is
        // symmetric with a positive diagonal but not positive semi-definite.
        let npz = |sigma: Vec<f64>| {
            let mut cursor = std::io::Cursor::new(Vec::new());
            FeatureStats::from_parts(vec![0.0; FEATURES], sigma, 0).map(|s| {
                s.write_npz(&mut cursor).unwrap();
                cursor.into_inner()
            })
        };
        let d = FEATURES;
        let mut negative = vec![0.0; d * d];
        (0..d).for_each(|i| negative[i * d + i] = -1.0);
        assert!(npz(negative).unwrap_err().to_string().contains("negative"));
        let mut indefinite = vec![0.0; d * d];
        (0..d).for_each(|i| indefinite[i * d + i] = 1.0);
        indefinite[1] = 5.0;
        indefinite[d] = 5.0;

        let good = imported_statistics();
        let (status, body) = send_json(&api, upload_reference("imported", good.clone())).await;
        assert_error(status, &body, UNAUTHORIZED, "");
        let request = upload_reference("imported", good.clone()).bearer(TOKEN);
        let (status, body) = send_json(&api, request).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["has_features"], false);
        let cases: Vec<(&str, Vec<u8>, Expected, &str)> = vec![
            ("imported", good, CONFLICT, "imported"),
            ("tiny16", small, INVALID_INPUT, "16-dimensional"),
            ("junk", b"not statistics".to_vec(), INVALID_INPUT, "npz"),
            ("12", b"x".to_vec(), INVALID_INPUT, "digits"),
            (
                "indefinite",
                npz(indefinite).unwrap(),
                INVALID_INPUT,
                "positive semi-definite",
            ),
        ];
        for (name, bytes, expected, contains) in cases {
            let request = upload_reference(name, bytes).bearer(TOKEN);
            let (status, body) = send_json(&api, request).await;
            assert_case_error(name, status, &body, expected, contains);
        }
        // Only the accepted upload was stored.
        let (status, body) = send_json(&api, get("/references")).await;
        assert_eq!(status, StatusCode::OK);
        let names: Vec<&str> = body["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["imported"], "{body}");
    });
}

#[test]
fn sweep_requests_are_checked_field_by_field() {
    let s = setup();
    runtime().block_on(async {
        let data = DataDir::open(&s.path).await.unwrap();
        let api = api(&data);
        import_reference(&api).await;
        // One field of a valid request changed: refused, naming the field.
        let cases: Vec<(&str, Value, Expected, &str)> = vec![
            ("run", json!("nope"), NOT_FOUND, "run"),
            ("reference", json!("nope"), NOT_FOUND, "reference"),
            ("reference", json!(999), NOT_FOUND, "reference"),
            (
                "sigma_rels",
                json!([0.05, 0.3]),
                INVALID_INPUT,
                "sigma_rels[1]",
            ),
            ("sigma_rels", json!([0.0]), INVALID_INPUT, "sigma_rels[0]"),
            (
                "sigma_rels",
                json!("0.05,0.04,...,0.1"),
                INVALID_INPUT,
                "sigma_rels",
            ),
            ("sigma_rels", json!([]), INVALID_INPUT, "sigma_rels"),
            (
                "sigma_rels",
                json!([0.05, 0.05]),
                INVALID_INPUT,
                "sigma_rels[1]",
            ),
            ("sigma_rels", json!(["0.1"]), INVALID_INPUT, "sigma_rels[0]"),
            ("sigma_rels", json!({"a": 1}), INVALID_INPUT, "sigma_rels"),
            ("nimgs", json!([5000]), INVALID_INPUT, "nimgs[0]"),
            ("nimgs", json!([0]), INVALID_INPUT, "nimgs[0]"),
            ("nimgs", json!(-3), INVALID_INPUT, "nimgs"),
            ("nimgs", json!([1000, -5]), INVALID_INPUT, "nimgs[1]"),
            ("nimgs", json!(1500.5), INVALID_INPUT, "nimgs"),
            ("num_images", json!(1), INVALID_INPUT, "num_images"),
            ("num_images", json!(1001), INVALID_INPUT, "num_images"),
            ("seed_sets", json!(0), INVALID_INPUT, "seed_sets"),
            ("batch", json!(0), INVALID_INPUT, "batch"),
            ("metrics", json!(["fid", "is"]), INVALID_INPUT, "metrics[1]"),
            ("metrics", json!([]), INVALID_INPUT, "metrics"),
            // A repeated metric is refused, naming the repeat (it used to be kept twice).
            (
                "metrics",
                json!(["fid", "kid", "fid"]),
                INVALID_INPUT,
                "metrics[2]: \"fid\" is already metrics[0]",
            ),
            (
                "metrics",
                json!(["kid", "KID"]),
                INVALID_INPUT,
                "metrics[1]: \"kid\" is already metrics[0]",
            ),
            (
                "sampler",
                json!({"steps": 1}),
                INVALID_INPUT,
                "sampler.steps",
            ),
            ("sampler", json!({"stpes": 8}), INVALID_INPUT, "sampler"),
            (
                "sampler",
                json!({"sigma_min": -1.0}),
                INVALID_INPUT,
                "sigma_min",
            ),
            (
                "sampler",
                json!({"sigma_max": 1e308, "rho": 1e308}),
                INVALID_INPUT,
                "sampler.sigma_max",
            ),
            (
                "sampler",
                json!({"rho": 1e308}),
                INVALID_INPUT,
                "sampler.rho",
            ),
            ("sigma_rel", json!(0.1), INVALID_INPUT, "sigma_rel"),
            ("kid_subsets", json!(0), INVALID_INPUT, "kid_subsets"),
        ];
        for (key, value, expected, contains) in cases {
            let case = format!("{key}: {value}");
            let request = post_json("/sweeps", &sweep_with(key, value)).bearer(TOKEN);
            let (status, body) = send_json(&api, request).await;
            assert_case_error(&case, status, &body, expected, contains);
        }
        // Whole requests that are refused.
        let mut kid_on_imported = sweep_with("reference", json!("imported"));
        kid_on_imported["metrics"] = json!(["fid", "kid"]);
        let cases: Vec<(&str, Value, Expected, &str)> = vec![
            ("not an object", json!([]), INVALID_INPUT, "JSON object"),
            (
                "a reference never stored",
                json!({"run": "tiny", "sigma_rels": [0.1], "reference": "tiny16"}),
                NOT_FOUND,
                "reference",
            ),
            (
                "KID against statistics without features",
                kid_on_imported,
                INVALID_INPUT,
                "metrics",
            ),
        ];
        for (case, body, expected, contains) in cases {
            let request = post_json("/sweeps", &body).bearer(TOKEN);
            let (status, answer) = send_json(&api, request).await;
            assert_case_error(case, status, &answer, expected, contains);
        }
        let (status, body) = send_json(&api, post_json("/sweeps", &base_sweep())).await;
        assert_error(status, &body, UNAUTHORIZED, "");
        // Nothing was queued by the refused requests.
        assert!(data.db.sweeps(None).await.unwrap().is_empty());

        // A run without a network configuration cannot be sampled by the builtin worker (its
        // sweeps are external by default: the user's code evaluates them).
        data.db.create_run("bare", "", &json!({})).await.unwrap();
        let mut bare = sweep_with("run", json!("bare"));
        bare["evaluator"] = json!("builtin");
        let request = post_json("/sweeps", &bare).bearer(TOKEN);
        let (status, body) = send_json(&api, request).await;
        assert_error(status, &body, INVALID_INPUT, "network");

        // FID only against imported statistics: accepted, KID left out by default.
        let request = post_json("/sweeps", &sweep_with("reference", json!("imported")));
        let (status, body) = send_json(&api, request.bearer(TOKEN)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["spec"]["metrics"], json!(["fid"]));
        // Uploaded statistics say nothing of their data: the sweep says it is unchecked.
        assert!(
            body["spec"]["warnings"].to_string().contains("is not checked"),
            "{body}"
        );
        assert_eq!(body["points"].as_array().unwrap().len(), 2);
        // EDM2's list syntax and a 2-D sweep.
        let request = post_json("/sweeps", &two_d_sweep(&data).await).bearer(TOKEN);
        let (status, body) = send_json(&api, request).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["points_total"], 8, "{body}");
        assert_eq!(body["spec"]["metrics"], json!(["fid", "kid"]));
        // How each metric is shown is decided here, on the server, and sent with the sweep.
        assert_eq!(
            body["metrics"],
            json!([
                {"metric": "fid", "label": "FID", "short_label": "FID", "scale": 1.0,
                 "axis_label": "FID", "lower_is_better": true, "fallback": false, "kind": "fid"},
                {"metric": "kid", "label": "KID", "short_label": "KID", "scale": 1000.0,
                 "axis_label": "KID ×10³", "lower_is_better": true, "fallback": false, "kind": "kid"},
            ])
        );

        // Statistics of another dataset than the run's (Fashion-MNIST's grey test set; `tiny`
        // was trained on the procedural colour images): refused naming `reference` and both
        // datasets, nothing queued; allowed on purpose, the sweep says so.
        let origin = hindsight::app::references::ReferenceOrigin {
            name: "fm".into(),
            source: "fashion-mnist-test (first 32 images)".into(),
            resolution: Some(32),
            channels: Some(1),
        };
        hindsight::app::references::import(&data, origin, &imported_statistics())
            .await
            .unwrap();
        let before = data.db.sweeps(None).await.unwrap().len();
        let other = sweep_with("reference", json!("fm"));
        let (status, body) = send_json(&api, post_json("/sweeps", &other).bearer(TOKEN)).await;
        assert_error(status, &body, INVALID_INPUT, "reference");
        let message = body.to_string();
        for needle in ["procedural", "fashion-mnist-test", "allow_dataset_mismatch"] {
            assert!(message.contains(needle), "{needle}: {message}");
        }
        assert_eq!(data.db.sweeps(None).await.unwrap().len(), before);
        let mut forced = other.clone();
        forced["allow_dataset_mismatch"] = json!(true);
        let (status, body) = send_json(&api, post_json("/sweeps", &forced).bearer(TOKEN)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert!(
            body["spec"]["warnings"]
                .to_string()
                .contains("allowed by allow_dataset_mismatch"),
            "{body}"
        );
        forced["allow_dataset_mismatch"] = json!("yes");
        let (status, body) = send_json(&api, post_json("/sweeps", &forced).bearer(TOKEN)).await;
        assert_error(status, &body, INVALID_INPUT, "allow_dataset_mismatch");
    });
}

/// The sweep routes refuse malformed and unknown ids, plots and grids of what is not there,
/// and cancelling without a token; listings filter by run; OpenAPI documents them.
#[test]
fn sweep_routes_refuse_what_is_not_there() {
    let s = setup();
    runtime().block_on(async {
        let data = DataDir::open(&s.path).await.unwrap();
        let api = api(&data);
        import_reference(&api).await;
        let mut created = Vec::new();
        for body in [
            sweep_with("reference", json!("imported")),
            two_d_sweep(&data).await,
        ] {
            let request = post_json("/sweeps", &body).bearer(TOKEN);
            let (status, body) = send_json(&api, request).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            created.push(body["id"].as_i64().unwrap());
        }
        let [fid_only, id] = created[..] else {
            unreachable!()
        };
        let cases: Vec<(String, Expected, &str)> = vec![
            ("/sweeps/abc".into(), INVALID_INPUT, "id"),
            ("/sweeps/0".into(), INVALID_INPUT, "id"),
            ("/sweeps/-1/events".into(), INVALID_INPUT, "id"),
            ("/sweeps/999".into(), NOT_FOUND, "999"),
            (
                format!("/sweeps/{id}/plot.svg"),
                NOT_FOUND,
                "no finished point",
            ),
            (
                format!("/sweeps/{fid_only}/plot.svg?metric=kid"),
                NOT_FOUND,
                "does not compute kid",
            ),
            (
                format!("/sweeps/{id}/plot.svg?metric=is"),
                INVALID_INPUT,
                "metric",
            ),
            (
                format!("/sweeps/{id}/points/0/grid.png"),
                NOT_FOUND,
                "no images",
            ),
            ("/sweeps?run=nope".into(), NOT_FOUND, "nope"),
        ];
        for (uri, expected, contains) in cases {
            let (status, body) = send_json(&api, get(&uri)).await;
            assert_case_error(&format!("GET {uri}"), status, &body, expected, contains);
        }
        let cancel = delete(&format!("/sweeps/{id}"));
        let (status, body) = send_json(&api, cancel).await;
        assert_error(status, &body, UNAUTHORIZED, "");
        let cancel = delete(&format!("/sweeps/{id}")).bearer(TOKEN);
        let (status, body) = send_json(&api, cancel).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "cancelled");
        assert!(body["points"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"] == "cancelled"));
        let (status, body) = send_json(&api, get("/sweeps?run=tiny")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["sweeps"].as_array().unwrap().len(), 2, "{body}");
        // The OpenAPI document describes the new routes.
        let (_, doc) = send_json(&api, get("/openapi.json")).await;
        for path in [
            "/sweeps",
            "/sweeps/{id}",
            "/sweeps/{id}/events",
            "/references",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} undocumented");
        }
    });
}

#[test]
fn the_queue_leases_points_and_refuses_stale_workers() {
    let s = setup();
    runtime().block_on(async {
        let data = DataDir::open(&s.path).await.unwrap();
        let created = sweep::create(&data, request(&[0.05, 0.1], 4), &SweepLimits::default())
            .await
            .unwrap();
        let db = &data.db;
        let id = created.id;
        // Worker A's lease has run out the moment it is taken.
        let a = db
            .claim_point("A", 1000, 999, ClaimFilter::default())
            .await
            .unwrap()
            .unwrap();
        let a_lease = a.owner.clone();
        assert_eq!((a.point.idx, a.point.attempts), (0, 1));
        let b = db
            .claim_point(
                "B",
                2000,
                i64::MAX,
                ClaimFilter {
                    sweep: Some(id),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .unwrap();
        let b_lease = b.owner.clone();
        assert_ne!(a_lease, b_lease, "every claim is a new lease");
        assert_eq!(
            (b.point.idx, b.point.attempts),
            (0, 2),
            "B takes the expired point"
        );
        assert!(!db.pin_reconstruction(id, 0, &a_lease, "r1").await.unwrap());
        assert!(db.pin_reconstruction(id, 0, &b_lease, "r1").await.unwrap());
        let batch = |n: i64, digest: &str| NewBatch {
            batch: n,
            reconstruction_id: "r1".into(),
            images: 2,
            features_digest: digest.into(),
            seconds: 0.1,
            sample_seconds: 0.05,
            features_seconds: 0.05,
            grid_digest: None,
            features_by: "server",
            upload_digest: None,
        };
        let blob = data.put_blob(vec![1, 2, 3], "test").await.unwrap();
        assert_eq!(
            db.record_batch(id, 0, &a_lease, &batch(0, &blob), i64::MAX, None)
                .await
                .unwrap(),
            BatchWrite::LeaseLost
        );
        assert_eq!(
            db.record_batch(id, 0, &b_lease, &batch(0, &blob), i64::MAX, None)
                .await
                .unwrap(),
            BatchWrite::Recorded
        );
        assert_eq!(db.sweep_batches(id, 0, "r1").await.unwrap().len(), 1);
        // The run changed: another reconstruction; the old features go.
        assert!(db.pin_reconstruction(id, 0, &b_lease, "r2").await.unwrap());
        assert!(db.sweep_batches(id, 0, "r1").await.unwrap().is_empty());
        let mut wrong = batch(1, &blob);
        wrong.reconstruction_id = "r1".into();
        assert_eq!(
            db.record_batch(id, 0, &b_lease, &wrong, i64::MAX, None)
                .await
                .unwrap(),
            BatchWrite::LeaseLost,
            "features of another reconstruction are refused"
        );
        assert!(!db
            .finish_point(id, 0, &a_lease, &json!({}), Some(&blob), None)
            .await
            .unwrap());
        assert!(db
            .finish_point(id, 0, &b_lease, &json!({"x": 1}), Some(&blob), None)
            .await
            .unwrap());
        assert!(
            !db.finish_point(id, 0, &b_lease, &json!({"x": 2}), Some(&blob), None)
                .await
                .unwrap(),
            "a point is recorded once"
        );
        // Every claim is on record: A's lease ran out and B took the point over.
        let leases = db.sweep_leases(id).await.unwrap();
        assert_eq!(leases[0].worker, "A");
        assert_eq!(leases[0].outcome, Some(LeaseOutcome::Expired));
        assert_eq!(leases[1].outcome, Some(LeaseOutcome::Done));
        let points = db.sweep_points(id).await.unwrap();
        assert_eq!(points[0].result, Some(json!({"x": 1})));
        assert_eq!(points[0].status, SweepStatus::Done);
        // Cancelling takes the lease from whoever holds point 1.
        let c = db
            .claim_point("C", 3000, i64::MAX, ClaimFilter::default())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.point.idx, 1);
        let cancelled = db.cancel_sweep(id).await.unwrap().unwrap();
        assert_eq!(cancelled.status, SweepStatus::Cancelled);
        assert!(!db.renew_lease(id, 1, &c.owner, i64::MAX).await.unwrap());
        assert_eq!(
            db.sweep_leases(id).await.unwrap()[2].outcome,
            Some(LeaseOutcome::Cancelled)
        );
        assert!(db
            .claim_point("D", 4000, i64::MAX, ClaimFilter::default())
            .await
            .unwrap()
            .is_none());
        let points = db.sweep_points(id).await.unwrap();
        assert_eq!(points[0].status, SweepStatus::Done, "finished points stay");
        assert_eq!(points[1].status, SweepStatus::Cancelled);
        // Garbage collection keeps what sweeps and references refer to.
        let report = hindsight::app::gc(&data, Duration::ZERO).await.unwrap();
        let _ = report;
        assert!(data.read_blob(&blob).await.is_ok());
        for r in db.references().await.unwrap() {
            assert!(data.read_blob(&r.stats_digest).await.is_ok());
            assert!(data
                .read_blob(r.features_digest.as_ref().unwrap())
                .await
                .is_ok());
        }
    });
}

#[test]
fn two_workers_finish_a_sweep_and_a_dead_workers_point_is_resumed() {
    let s = setup();
    runtime().block_on(async {
        let data = DataDir::open(&s.path).await.unwrap();
        let mut req = request(&[0.05, 0.08, 0.12], 4);
        req.seed_sets = Some(2);
        let created = sweep::create(&data, req, &SweepLimits::default())
            .await
            .unwrap();
        let id = created.id;
        // A worker that claims point 0 and dies: its lease runs out in 1.5 s.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let ghost = data
            .db
            .claim_point(
                "ghost",
                now,
                now + 1500,
                ClaimFilter {
                    sweep: Some(id),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ghost.point.idx, 0);
        let (w1, w2) = (
            worker(&data, &s.weights, Duration::from_secs(30)),
            worker(&data, &s.weights, Duration::from_secs(30)),
        );
        let (n1, n2) = tokio::join!(w1.run_until_idle(), w2.run_until_idle());
        let mut worked = n1.unwrap() + n2.unwrap();
        tokio::time::sleep(Duration::from_millis(1600)).await;
        worked += w1.run_until_idle().await.unwrap();
        assert_eq!(
            worked, 3,
            "each point once, the dead worker's after its lease ran out"
        );
        let sweep = sweep::find(&data, id).await.unwrap();
        assert_eq!(sweep.status, SweepStatus::Done);
        let points = data.db.sweep_points(id).await.unwrap();
        for p in &points {
            assert_eq!(p.status, SweepStatus::Done, "{p:?}");
            assert_eq!(p.attempts, if p.idx == 0 { 2 } else { 1 }, "{p:?}");
            // 2 seed sets × 4 images in batches of 2: four batches, each recorded once.
            assert_eq!((p.batches_done, p.images_done), (4, 8), "{p:?}");
            let r: hindsight::sweep::PointResult =
                serde_json::from_value(p.result.clone().unwrap()).unwrap();
            let fid = r.fid.unwrap();
            assert_eq!(fid.values.len(), 2);
            assert!(
                fid.values.iter().all(|v| v.is_finite() && *v > 0.0),
                "{fid:?}"
            );
            assert!(fid.std.unwrap().is_finite());
            let kid = r.kid.unwrap();
            assert_eq!(kid.std_errors.as_ref().unwrap().len(), 2);
            assert!(p.grid_digest.is_some() && p.stats_digest.is_some());
            let stats = data
                .read_blob(p.stats_digest.as_ref().unwrap())
                .await
                .unwrap();
            assert_eq!(
                FeatureStats::parse_npz(&stats, "x").unwrap().dims(),
                FEATURES
            );
        }
        // Same seeds at every point: identical weights would give identical features. Here
        // the widths differ, so the FIDs do too.
        let fids: Vec<f64> = points
            .iter()
            .map(|p| p.result.as_ref().unwrap()["fid"]["mean"].as_f64().unwrap())
            .collect();
        assert!(fids[0] != fids[1] && fids[1] != fids[2], "{fids:?}");
        // Reconstructions were cached like any other.
        let run = data.db.run("tiny").await.unwrap().unwrap();
        assert_eq!(data.db.reconstructions(run.id).await.unwrap().len(), 3);
        // The API shows it all: the best point, the plot, the grids.
        let api = api(&data);
        let (status, body) = send_json(&api, get(&format!("/sweeps/{id}"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "done");
        assert_eq!(body["images_done"], 24);
        assert_eq!(body["images_total"], 24);
        let best = &body["best"][0];
        assert_eq!(best["metric"], "fid");
        let min = fids.iter().cloned().fold(f64::MAX, f64::min);
        assert_eq!(best["value"].as_f64().unwrap(), min);
        // Each point's result is typed: value = mean, and the error bar the server decided
        // (two seed sets here: their standard deviation, for FID and KID alike).
        for p in body["points"].as_array().unwrap() {
            let r = &p["result"];
            assert_eq!(r["seed_sets"], 2, "{p}");
            for m in ["fid", "kid"] {
                assert_eq!(r[m]["value"], r[m]["mean"], "{p}");
                assert_eq!(r[m]["error_bar"], r[m]["std"], "{p}");
                assert!(r[m]["error_bar"].as_f64().unwrap() > 0.0, "{p}");
            }
        }
        let (status, _, svg) = send(&api, get(&format!("/sweeps/{id}/plot.svg?metric=kid"))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(String::from_utf8(svg).unwrap().starts_with("<svg"));
        let (status, _, png) = send(&api, get(&format!("/sweeps/{id}/points/2/grid.png"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // The event stream of a finished sweep: the sweep, then its end.
        let (status, _, events) = send(&api, get(&format!("/sweeps/{id}/events"))).await;
        assert_eq!(status, StatusCode::OK);
        let events = String::from_utf8(events).unwrap();
        assert!(events.starts_with("event: sweep"), "{events}");
        assert!(events.contains("event: end"), "{events}");
        // Every frame's data is one JSON payload of its event's schema (`SweepEvent`).
        for frame in events.split("\n\n").filter(|f| f.starts_with("event:")) {
            let data = frame
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or_else(|| panic!("a frame without data: {frame}"));
            let data: Value = serde_json::from_str(data).unwrap();
            assert_eq!(data["metrics"][0]["metric"], "fid", "{frame}");
        }
    });
}

#[test]
fn an_open_event_stream_does_not_hold_up_shutdown() {
    let s = setup();
    runtime().block_on(async {
        let data = DataDir::open(&s.path).await.unwrap();
        // Queued and never worked (no worker): the stream would run forever.
        let created = sweep::create(&data, request(&[0.05], 4), &SweepLimits::default())
            .await
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let config = ServerConfig {
            sweep_worker: None,
            ..Default::default()
        };
        let path = s.path.clone();
        let server = tokio::spawn(async move {
            hindsight::server::serve_data_dir(
                &path,
                "127.0.0.1:0".parse().unwrap(),
                config,
                async {
                    let _ = stopped.await;
                },
                |addr| {
                    let _ = addr_tx.send(addr);
                },
            )
            .await
        });
        let addr = addr_rx.await.unwrap().to_string();
        let id = created.id;
        let events = tokio::task::spawn_blocking(move || {
            common::http(&addr, "GET", &format!("/sweeps/{id}/events"), None, None)
        });
        tokio::time::sleep(Duration::from_millis(800)).await;
        let asked = std::time::Instant::now();
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops promptly")
            .unwrap()
            .unwrap();
        assert!(asked.elapsed() < Duration::from_secs(5));
        let (status, body) = events.await.unwrap();
        assert_eq!(status, 200);
        assert!(body.starts_with("event: sweep"), "{body}");
        assert!(body.contains("event: shutdown"), "{body}");
    });
}

/// Reliability 2: unfinished sweeps are bounded per run and in all (429 naming the bound,
/// nothing stored), cancelling one makes room, and `GET /sweeps` answers a page at a time
/// (`limit`, `before`, `next_before`), every sweep exactly once.
#[test]
fn unfinished_sweeps_are_bounded_and_listings_paginate() {
    let s = setup();
    runtime().block_on(async {
        let data = DataDir::open(&s.path).await.unwrap();
        let config = ServerConfig {
            token_hashes: parse_token_hashes(&hash_token(TOKEN), "test").unwrap(),
            sweep_limits: SweepLimits {
                max_images: 1000,
                max_unfinished_per_run: 5,
                max_unfinished: 6,
                ..Default::default()
            },
            sweep_worker: None,
            ..Default::default()
        };
        let api = app(AppState::new(data.clone(), config));
        let body = json!({"run": "tiny", "reference": "proc", "sigma_rels": [0.05],
                          "num_images": 4, "batch": 2, "sampler": {"steps": 3}});
        let mut ids = Vec::new();
        for _ in 0..5 {
            let (status, v) = send_json(&api, post_json("/sweeps", &body).bearer(TOKEN)).await;
            assert_eq!(status, StatusCode::CREATED, "{v}");
            ids.push(v["id"].as_i64().unwrap());
        }
        let (status, v) = send_json(&api, post_json("/sweeps", &body).bearer(TOKEN)).await;
        assert_error(status, &v, LIMIT_REACHED, "per run (5)");
        let (_, list) = send_json(&api, get("/sweeps")).await;
        assert_eq!(
            list["sweeps"].as_array().unwrap().len(),
            5,
            "nothing stored"
        );
        // Cancelling one makes room again.
        let cancel = delete(&format!("/sweeps/{}", ids[0])).bearer(TOKEN);
        assert_eq!(send(&api, cancel).await.0, StatusCode::OK);
        let (status, v) = send_json(&api, post_json("/sweeps", &body).bearer(TOKEN)).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        ids.push(v["id"].as_i64().unwrap());
        // Pages of 2, newest first, each sweep once.
        let mut seen = Vec::new();
        let mut uri = "/sweeps?limit=2".to_owned();
        loop {
            let (status, page) = send_json(&api, get(&uri)).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            let sweeps = page["sweeps"].as_array().unwrap();
            assert!(sweeps.len() <= 2);
            seen.extend(sweeps.iter().map(|s| s["id"].as_i64().unwrap()));
            match page["next_before"].as_i64() {
                Some(before) => uri = format!("/sweeps?limit=2&run=tiny&before={before}"),
                None => break,
            }
        }
        let mut expected = ids.clone();
        expected.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(seen, expected);
        for bad in ["limit=0", "limit=501", "limit=x", "before=-1", "before=x"] {
            let (status, v) = send_json(&api, get(&format!("/sweeps?{bad}"))).await;
            let field = bad.split('=').next().unwrap();
            assert_case_error(bad, status, &v, INVALID_INPUT, field);
        }
    });
}
