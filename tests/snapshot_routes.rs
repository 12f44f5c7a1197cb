//! Issue 25's server side, through `app(state)`: re-uploads of the same tensors in other bytes
//! are no-ops (resumed training never conflicts with itself), stored snapshots download
//! (`GET /runs/{run}/snapshots/{id}/file`), `GET /auth` reports a token before the first
//! upload, and reconstructions copy or average the buffers snapshots declare.

use axum::http::{header, StatusCode};
use serde_json::{json, Value};

use hindsight::server::{hash_token, parse_token_hashes, ServerConfig};

mod common;
use common::http::{
    assert_error, delete, get, post_bytes, post_json, RequestExt, Server, CONFLICT, INVALID_INPUT,
    NOT_FOUND,
};
use common::snapshot::SnapshotBuilder;

const TOKEN: &str = "hs_snapshot-routes";

/// Uploads and the state a refusal must leave as it was.
trait Snapshots {
    /// Uploads `bytes` into `run` with the token: status and JSON body.
    async fn upload(&self, run: &str, bytes: Vec<u8>) -> (StatusCode, Value);
    /// Rows of run `r` and blob files of the store.
    async fn counts(&self) -> (usize, usize);
}

impl Snapshots for Server {
    async fn upload(&self, run: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
        let length = bytes.len().to_string();
        let request = post_bytes(&format!("/runs/{run}/snapshots"), bytes)
            .with_header(header::CONTENT_LENGTH, &length)
            .bearer(TOKEN);
        self.json(request).await
    }

    async fn counts(&self) -> (usize, usize) {
        let (_, listing) = self.json(get("/runs/r/snapshots")).await;
        let rows = listing.as_array().map_or(0, Vec::len);
        let blobs = walk(&self.data.store.root().join("blobs"));
        assert!(
            blobs > 0 || rows == 0,
            "the store's blobs are where this test looks"
        );
        (rows, blobs)
    }
}

/// Files under `dir`, recursively.
fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| {
                let p = e.path();
                if p.is_dir() {
                    walk(&p)
                } else {
                    1
                }
            })
            .sum()
    })
}

/// Parameters `w`, a float buffer `running_mean` and an integer `step`, in the given tensor
/// order and with the metadata keys in the given order (the builder writes metadata sorted,
/// so the order of tensors is what varies the bytes).
fn snapshot(w: &[f32], mean: &[f32], step: i64, nimg: u64, sigma_rel: f64) -> SnapshotBuilder {
    SnapshotBuilder::new()
        .f32("w", &[w.len()], w)
        .f32("running_mean", &[mean.len()], mean)
        .i64("step", &[], &[step])
        .meta("nimg", nimg)
        .meta("sigma_rel", sigma_rel)
}

#[tokio::test]
async fn same_tensors_in_other_bytes_are_a_no_op_other_values_a_conflict() {
    let server = Server::new(ServerConfig::default()).await;
    let first = snapshot(&[1.0, 2.0, 3.0], &[0.5], 7, 1_000_000, 0.05).bytes();
    let (status, stored) = server.upload("r", first.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{stored}");
    let before = server.counts().await;

    // The same tensors, another writer's layout (tensor order) and extra metadata.
    let other_layout = SnapshotBuilder::new()
        .i64("step", &[], &[7])
        .f32("running_mean", &[1], &[0.5])
        .f32("w", &[3], &[1.0, 2.0, 3.0])
        .meta("sigma_rel", "0.05")
        .meta("nimg", "1000000")
        .meta("writer", "another process")
        .bytes();
    assert_ne!(other_layout, first);
    let (status, body) = server.upload("r", other_layout).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["inserted"], json!(false));
    assert_eq!(
        body["digest"], stored["digest"],
        "the stored snapshot's digest"
    );
    assert_eq!(server.counts().await, before, "no new row, no new blob");

    // One value differs: a conflict, and nothing is stored.
    let changed = snapshot(&[1.0, 2.0, 3.5], &[0.5], 7, 1_000_000, 0.05).bytes();
    let (status, body) = server.upload("r", changed).await;
    assert_error(status, &body, CONFLICT, "already has a different snapshot");
    // A buffer or the integer counter differing is a conflict too.
    for changed in [
        snapshot(&[1.0, 2.0, 3.0], &[0.25], 7, 1_000_000, 0.05),
        snapshot(&[1.0, 2.0, 3.0], &[0.5], 8, 1_000_000, 0.05),
    ] {
        let (status, body) = server.upload("r", changed.bytes()).await;
        assert_error(status, &body, CONFLICT, "different snapshot");
    }
    // Another update rule with the same tensors: a conflict naming the rule.
    let other_rule = snapshot(&[1.0, 2.0, 3.0], &[0.5], 7, 1_000_000, 0.05).meta(
        "profile",
        r#"{"kind":"ema_pytorch","update_every":10,"images_per_step":100000}"#,
    );
    let (status, body) = server.upload("r", other_rule.bytes()).await;
    assert_error(status, &body, CONFLICT, "another update rule");
    // A different tensor set is bad input (400), not a conflict.
    let fewer = SnapshotBuilder::new()
        .f32("w", &[3], &[1.0, 2.0, 3.0])
        .meta("nimg", "2000000")
        .meta("sigma_rel", "0.05")
        .bytes();
    let (status, body) = server.upload("r", fewer).await;
    assert_error(status, &body, INVALID_INPUT, "manifest");
    assert_eq!(server.counts().await, before, "refusals store nothing");
}

#[tokio::test]
async fn stored_snapshots_download_with_etag_and_range() {
    let server = Server::new(ServerConfig::default()).await;
    let bytes = snapshot(&[1.0, 2.0, 3.0], &[0.5], 7, 1_000_000, 0.10).bytes();
    let (status, stored) = server.upload("r", bytes.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{stored}");
    let (_, listing) = server.json(get("/runs/r/snapshots")).await;
    let id = listing[0]["id"].as_i64().unwrap();

    let (status, headers, body) = server
        .send(get(&format!("/runs/r/snapshots/{id}/file")))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, bytes, "the file exactly as uploaded");
    let digest = stored["digest"].as_str().unwrap();
    assert_eq!(headers[header::ETAG], format!("\"{digest}\""));
    let disposition = headers[header::CONTENT_DISPOSITION].to_str().unwrap();
    assert!(
        disposition.contains("r-snapshot-0001000000-0.100.safetensors"),
        "{disposition}"
    );

    let ranged =
        get(&format!("/runs/r/snapshots/{id}/file")).with_header(header::RANGE, "bytes=0-7");
    let (status, _, body) = server.send(ranged).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, bytes[..8]);
    let cached = get(&format!("/runs/r/snapshots/{id}/file"))
        .with_header(header::IF_NONE_MATCH, &format!("\"{digest}\""));
    assert_eq!(server.send(cached).await.0, StatusCode::NOT_MODIFIED);

    for (uri, needle) in [
        (format!("/runs/r/snapshots/{}/file", id + 1), "no snapshot"),
        (format!("/runs/nope/snapshots/{id}/file"), "nope"),
    ] {
        let (status, body) = server.json(get(&uri)).await;
        assert_error(status, &body, NOT_FOUND, needle);
    }
    let (status, body) = server.json(get("/runs/r/snapshots/x1/file")).await;
    assert_error(status, &body, INVALID_INPUT, "id");

    // Deleted: gone from the route too.
    let request = delete(&format!("/runs/r/snapshots/{id}")).bearer(TOKEN);
    assert_eq!(server.send(request).await.0, StatusCode::OK);
    let (status, body) = server
        .json(get(&format!("/runs/r/snapshots/{id}/file")))
        .await;
    assert_error(status, &body, NOT_FOUND, "no snapshot");
}

#[tokio::test]
async fn auth_reports_the_token_without_refusing() {
    let with_tokens = ServerConfig {
        token_hashes: parse_token_hashes(&hash_token(TOKEN), "tokens").unwrap(),
        ..Default::default()
    };
    let server = Server::new(with_tokens).await;
    let cases = [
        (None, "none", false),
        (Some(format!("Bearer {TOKEN}")), "valid", true),
        (Some("Bearer hs_guess".to_owned()), "invalid", false),
        (Some("Basic aGk6aGk=".to_owned()), "invalid", false),
    ];
    for (header_value, token, can_write) in cases {
        let mut request = get("/auth");
        if let Some(v) = &header_value {
            request = request.with_header(header::AUTHORIZATION, v);
        }
        let (status, body) = server.json(request).await;
        assert_eq!(status, StatusCode::OK, "{header_value:?}: {body}");
        assert_eq!(
            body,
            json!({"tokens_required": true, "token": token, "can_write": can_write}),
            "{header_value:?}"
        );
    }

    let open = Server::new(ServerConfig::default()).await;
    let (_, body) = open.json(get("/auth")).await;
    assert_eq!(
        body,
        json!({"tokens_required": false, "token": "none", "can_write": true})
    );
    let (_, body) = open.json(get("/auth").bearer("hs_other")).await;
    assert_eq!(
        body,
        json!({"tokens_required": false, "token": "invalid", "can_write": true})
    );
}

/// f32 values of tensor `name` in a safetensors file.
fn floats(bytes: &[u8], name: &str) -> Vec<f32> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let view = st.tensor(name).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    view.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Reconstructs run `r` at `sigma_rel` with `buffers` (or the default); the file's bytes and
/// the reconstruction's report.
async fn reconstruct(server: &Server, buffers: Option<&str>) -> (StatusCode, Value, Vec<u8>) {
    let mut request = json!({"run": "r", "sigma_rel": 0.08});
    if let Some(b) = buffers {
        request["buffers"] = json!(b);
    }
    let (status, body) = server
        .json(post_json("/reconstruct", &request).bearer(TOKEN))
        .await;
    if status != StatusCode::OK {
        return (status, body, Vec::new());
    }
    let id = body["id"].as_str().unwrap();
    let (_, _, file) = server
        .send(get(&format!("/reconstructions/{id}/weights")))
        .await;
    (status, body, file)
}

#[tokio::test]
async fn declared_buffers_are_averaged_or_copied_from_the_newest_snapshot() {
    let server = Server::new(ServerConfig::default()).await;
    // Three times, two widths; the buffer differs per snapshot so averaging shows.
    let mut k = 0.0f32;
    for nimg in [1_000_000u64, 2_000_000, 3_000_000] {
        for sigma_rel in [0.05, 0.10] {
            k += 1.0;
            let file = snapshot(&[k, 2.0 * k], &[10.0 * k], k as i64, nimg, sigma_rel)
                .meta("hindsight.buffers", r#"["running_mean"]"#);
            let (status, body) = server.upload("r", file.bytes()).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
    }
    let (status, averaged_body, averaged) = reconstruct(&server, None).await;
    assert_eq!(status, StatusCode::OK, "{averaged_body}");
    let (status, copied_body, copied) = reconstruct(&server, Some("copy")).await;
    assert_eq!(status, StatusCode::OK, "{copied_body}");
    assert_ne!(
        averaged_body["id"], copied_body["id"],
        "the rule is part of the key"
    );
    // Same parameters either way; the buffer is the newest weighed snapshot's exactly.
    assert_eq!(floats(&averaged, "w"), floats(&copied, "w"));
    // The newest weighed input: the last at the largest nimg (σ_rel 0.10, k = 6).
    let inputs = copied_body["report"]["inputs"].as_array().unwrap();
    let newest = inputs
        .iter()
        .filter(|i| i["weight"].as_f64().unwrap() != 0.0)
        .map(|i| i["nimg"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(newest, 3_000_000);
    assert_eq!(floats(&copied, "running_mean"), vec![60.0]);
    let mean = floats(&averaged, "running_mean")[0];
    assert!(
        mean != 60.0 && mean > 10.0 && mean < 60.0,
        "averaged: {mean}"
    );
    // The file says what was copied.
    let st = safetensors::SafeTensors::read_metadata(&copied).unwrap().1;
    let meta = st.metadata().clone().unwrap();
    assert!(
        meta["copied_from_newest_snapshot"].contains("running_mean"),
        "{meta:?}"
    );

    // A run whose snapshots do not declare their buffers: `copy` is refused by name.
    let undeclared = snapshot(&[1.0, 2.0], &[3.0], 1, 4_000_000, 0.05).bytes();
    let (status, body) = server.upload("plain", undeclared).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let request = json!({"run": "plain", "sigma_rel": 0.05, "buffers": "copy"});
    let (status, body) = server
        .json(post_json("/reconstruct", &request).bearer(TOKEN))
        .await;
    assert_error(status, &body, INVALID_INPUT, "buffers");
    let request = json!({"run": "plain", "sigma_rel": 0.05, "buffers": "newest"});
    let (status, body) = server
        .json(post_json("/reconstruct", &request).bearer(TOKEN))
        .await;
    assert_error(status, &body, INVALID_INPUT, "buffers");
}
