//! `GET /runs/{run}/sweep-estimate`: how long a sweep would take, scaled from the timings of
//! finished points (of the run's own builtin sweeps, else of a run with the same network),
//! null when nothing was measured; bad parameters are 400s naming the field. And the sweeps'
//! `comparison_key`, which decides what the web UI may overlay.
//!
//! The sweeps are written to the index directly (no sampling): a point's recorded timings are
//! all the estimate reads.

use axum::http::StatusCode;
use serde_json::{json, Value};

use hindsight::db::{ClaimFilter, Evaluator};
use hindsight::server::ServerConfig;

mod common;
use common::http::{assert_error, get, Server, INVALID_INPUT, NOT_FOUND};

fn network(channels: u64) -> Value {
    json!({"img_resolution": 8, "img_channels": 3, "label_dim": 0, "model_channels": channels,
           "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [],
           "logvar_channels": 8})
}

/// A builtin sweep of `run` (4 sampler steps, `num_images` images, reference `reference`)
/// whose two points are finished with the same timings: per image 0.07 s sampling, 0.02 s
/// features, 0.01 s the rest; per point 2 s reconstructing and 1 s metrics. Returns its id.
async fn finished_sweep(
    server: &Server,
    run: &str,
    num_images: u64,
    reference: Option<i64>,
) -> i64 {
    let db = &server.data.db;
    let row = db.run(run).await.unwrap().unwrap();
    let spec = json!({
        "run": run, "evaluator": "builtin", "sigma_rels": [0.05, 0.1], "nimgs": [1000],
        "metrics": ["fid"], "num_images": num_images, "seed_sets": 1, "sampler": {"steps": 4},
        "reference_id": reference, "reference_name": reference.map(|_| "ref"), "batch": 10,
        "kid_subsets": 100, "kid_subset_size": 1000,
    });
    let id = db
        .insert_sweep(
            row.id,
            None,
            Evaluator::Builtin,
            &spec,
            &[(0.05, 1000), (0.1, 1000)],
            (32, 256),
        )
        .await
        .unwrap();
    let images = num_images as f64;
    for _ in 0..2 {
        let filter = ClaimFilter {
            sweep: Some(id),
            ..Default::default()
        };
        let claim = db
            .claim_point("w", 1, i64::MAX, filter)
            .await
            .unwrap()
            .unwrap();
        let result = json!({
            "fid": {"mean": 10.0, "std": null, "values": [10.0]},
            "num_images": num_images, "seed_sets": 1, "reconstruction": "r",
            "timings": {"reconstruct_s": 2.0, "batches_s": 0.1 * images,
                        "sample_s": 0.07 * images, "features_s": 0.02 * images,
                        "metrics_s": 1.0, "images_per_s": 10.0},
        });
        assert!(db
            .finish_point(id, claim.point.idx, &claim.owner, &result, None, None)
            .await
            .unwrap());
    }
    id
}

async fn estimate(server: &Server, run: &str, query: &str) -> Value {
    let (status, body) = server
        .json(get(&format!("/runs/{run}/sweep-estimate?{query}")))
        .await;
    assert_eq!(status, StatusCode::OK, "{query}: {body}");
    body
}

#[track_caller]
fn assert_seconds(body: &Value, expected: f64) {
    let got = body["seconds"].as_f64().unwrap_or_else(|| panic!("{body}"));
    assert!((got - expected).abs() < 1e-6, "{got} vs {expected}: {body}");
}

#[tokio::test]
async fn estimates_scale_measured_points_and_never_invent_one() {
    let server = Server::new(ServerConfig {
        sweep_worker: None,
        ..Default::default()
    })
    .await;
    let db = &server.data.db;
    db.create_run("a", "", &json!({"network": network(8)}))
        .await
        .unwrap();
    db.create_run("b", "", &json!({"network": network(8)}))
        .await
        .unwrap();
    db.create_run("other", "", &json!({"network": network(16)}))
        .await
        .unwrap();
    db.create_run("external", "", &json!({})).await.unwrap();
    // 3 points × 200 images × 2 sets at 8 steps: sampling (0.07 s at 4 steps, 7 denoiser
    // evaluations) becomes 0.07 · 15/7 = 0.15 s per image; with features and the rest
    // 0.18 s × 400 images + 3 s per point = 75 s, 225 s in all.
    let query = "points=3&num_images=200&seed_sets=2&steps=8";

    // Nothing measured anywhere: no number.
    let none = estimate(&server, "a", query).await;
    assert!(
        none["seconds"].is_null() && none["basis"].is_null(),
        "{none}"
    );
    assert!(
        none["note"]
            .as_str()
            .unwrap()
            .contains("no measurement yet"),
        "{none}"
    );
    assert_eq!(
        (none["points"].as_u64(), none["images"].as_u64()),
        (Some(3), Some(1200))
    );

    // Run b has measured points: its own estimate, and a's (the same network) falls back on it.
    let sweep = finished_sweep(&server, "b", 100, None).await;
    let own = estimate(&server, "b", query).await;
    assert_seconds(&own, 225.0);
    assert!(
        (own["point_seconds"].as_f64().unwrap() - 75.0).abs() < 1e-6,
        "{own}"
    );
    let basis = &own["basis"];
    assert_eq!(basis["sweep"].as_i64(), Some(sweep), "{own}");
    assert_eq!(basis["same_run"], true);
    assert_eq!(
        (basis["points"].as_u64(), basis["steps"].as_u64()),
        (Some(2), Some(4))
    );
    assert!(
        (basis["images_per_s"].as_f64().unwrap() - 10.0).abs() < 1e-9,
        "{own}"
    );
    assert!(
        own["note"]
            .as_str()
            .unwrap()
            .contains(&format!("sweep #{sweep}")),
        "{own}"
    );
    let borrowed = estimate(&server, "a", query).await;
    assert_seconds(&borrowed, 225.0);
    assert_eq!(borrowed["basis"]["run"], "b");
    assert_eq!(borrowed["basis"]["same_run"], false);
    assert!(
        borrowed["note"].as_str().unwrap().contains("“b”"),
        "{borrowed}"
    );
    // Another network, or none: nothing to scale from.
    for run in ["other", "external"] {
        let body = estimate(&server, run, query).await;
        assert!(body["seconds"].is_null(), "{run}: {body}");
    }

    // The points counted from σ_rel in EDM2's list syntax and the training times; defaults
    // as POST /sweeps (1 seed set, 32 steps).
    let listed = estimate(
        &server,
        "b",
        "sigma_rels=0.05,0.10,...,0.25&nimgs=1000,2000&num_images=100",
    )
    .await;
    assert_eq!(listed["points"].as_u64(), Some(10), "{listed}");
    let sample = 0.07 * 63.0 / 7.0;
    assert_seconds(&listed, 10.0 * (3.0 + 100.0 * (sample + 0.03)));

    // Bad parameters: 400 naming the field; an unknown run: 404.
    for (query, field) in [
        ("points=3&num_images=many", "num_images"),
        ("points=3&num_images=1", "num_images"),
        ("points=3&steps=1", "steps"),
        ("points=3&seed_sets=0", "seed_sets"),
        ("points=0", "points"),
        ("points=x", "points"),
        ("num_images=100", "points"),
        ("points=2&sigma_rels=0.1", "points"),
        ("sigma_rels=0.1,zero", "sigma_rels"),
        ("sigma_rels=0.1&nimgs=10,x", "nimgs"),
    ] {
        let (status, body) = server
            .json(get(&format!("/runs/b/sweep-estimate?{query}")))
            .await;
        assert_error(status, &body, INVALID_INPUT, &format!("{field}:"));
    }
    let (status, body) = server
        .json(get("/runs/nobody/sweep-estimate?points=1"))
        .await;
    assert_error(status, &body, NOT_FOUND, "nobody");

    // The route and its schema are in the OpenAPI document.
    let (_, doc) = server.json(get("/openapi.json")).await;
    assert!(
        doc["paths"]["/runs/{run}/sweep-estimate"]["get"].is_object(),
        "the route is documented"
    );
    for schema in ["SweepEstimate", "EstimateBasis"] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
    }
}

#[tokio::test]
async fn sweeps_compare_on_reference_images_and_seed_sets() {
    let server = Server::new(ServerConfig {
        sweep_worker: None,
        ..Default::default()
    })
    .await;
    let db = &server.data.db;
    db.create_run("b", "", &json!({"network": network(8)}))
        .await
        .unwrap();
    let key = |id: i64| {
        let server = &server;
        async move {
            let (status, body) = server.json(get(&format!("/sweeps/{id}"))).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["comparison_key"].as_str().unwrap().to_owned()
        }
    };
    let a = finished_sweep(&server, "b", 100, Some(1)).await;
    let same = finished_sweep(&server, "b", 100, Some(1)).await;
    let fewer = finished_sweep(&server, "b", 50, Some(1)).await;
    let (ka, ksame, kfewer) = (key(a).await, key(same).await, key(fewer).await);
    assert_eq!(ka, ksame);
    assert_ne!(ka, kfewer);
    assert!(ka.contains("100 images") && ka.contains("#1"), "{ka}");
    // The listing carries it too.
    let (_, list) = server.json(get("/sweeps")).await;
    assert!(list["sweeps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["comparison_key"].is_string()));
}
