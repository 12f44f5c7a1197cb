//! The wire contract from the server's side: every response and event has a schema in
//! `/openapi.json` (no free-form object except metadata a user supplied), the error codes
//! and warning codes are the Rust enums', every route is in the document, and the server's
//! settings are checked in one place. The clients' side (Python dataclasses, the web UI's
//! field accesses) is checked against the same document by
//! `clients/python/tests/test_contract.py`.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use hindsight::server::{AppState, ErrorCode, ServerConfig};

/// The document a server with default settings serves.
fn openapi() -> Value {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let data = hindsight::app::DataDir::open(dir.path()).await.unwrap();
        let config = ServerConfig {
            sweep_worker: None,
            ..Default::default()
        };
        let app = hindsight::server::app(AppState::new(data, config));
        let response = app
            .oneshot(
                Request::get("/openapi.json")
                    .header("host", "localhost")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    })
}

/// The component schema `name`.
fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["components"]["schemas"]
        .get(name)
        .unwrap_or_else(|| panic!("no component schema {name}"))
}

/// Whether `s` is an object schema that says nothing about its fields.
fn free_form(s: &Value) -> bool {
    let says_object = s["type"] == "object"
        || s["type"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "object"));
    says_object
        && s.get("properties").is_none()
        && s.get("additionalProperties").is_none()
        && s.get("$ref").is_none()
        && s.get("oneOf").is_none()
        && s.get("allOf").is_none()
}

/// Walks `s`, calling `visit(path, schema)` for every sub-schema.
fn walk(path: &str, s: &Value, visit: &mut dyn FnMut(&str, &Value)) {
    visit(path, s);
    if let Some(props) = s["properties"].as_object() {
        for (k, v) in props {
            walk(&format!("{path}.{k}"), v, visit);
        }
    }
    for key in ["oneOf", "allOf", "anyOf"] {
        for (i, v) in s[key].as_array().into_iter().flatten().enumerate() {
            walk(&format!("{path}/{key}[{i}]"), v, visit);
        }
    }
    if s.get("items").is_some() {
        walk(&format!("{path}[]"), &s["items"], visit);
    }
    if s["additionalProperties"].is_object() {
        walk(&format!("{path}{{}}"), &s["additionalProperties"], visit);
    }
}

#[test]
fn every_response_and_event_has_a_schema() {
    let doc = openapi();
    // Free-form objects only where a user supplied the content.
    let allowed: BTreeSet<&str> = ["Run.metadata", "SnapshotRow.metadata"].into();
    let mut free = Vec::new();
    for (name, s) in doc["components"]["schemas"].as_object().unwrap() {
        walk(name, s, &mut |path, sub| {
            if free_form(sub) && !allowed.contains(path) {
                free.push(path.to_owned());
            }
        });
    }
    assert!(free.is_empty(), "free-form objects on the wire: {free:?}");

    // Every JSON response (and the event stream) names a schema; only the document itself
    // is an open object.
    let mut unnamed = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (status, response) in op["responses"].as_object().unwrap() {
                for (media, content) in response["content"].as_object().into_iter().flatten() {
                    let s = &content["schema"];
                    let where_ = format!("{method} {path} {status} {media}");
                    // Files (weights, PNG, SVG, HTML, .npz) have no JSON fields to describe.
                    if !media.contains("json") || path == "/openapi.json" {
                        continue;
                    }
                    let typed = s.get("$ref").is_some() || s["items"].get("$ref").is_some();
                    if !typed || free_form(s) {
                        unnamed.push(where_);
                    }
                }
            }
        }
    }
    assert!(
        unnamed.is_empty(),
        "responses without a schema: {unnamed:?}"
    );

    // The event stream's frames: one variant per event, each with its payload's schema.
    let events = &doc["paths"]["/sweeps/{id}/events"]["get"]["responses"]["200"]["content"]
        ["text/event-stream"]["schema"];
    assert_eq!(
        events["$ref"], "#/components/schemas/SweepEvent",
        "{events}"
    );
    let variants = schema(&doc, "SweepEvent")["oneOf"].as_array().unwrap();
    let names: BTreeSet<String> = variants
        .iter()
        .map(|v| {
            let e = &v["properties"]["event"];
            e["enum"][0]
                .as_str()
                .or(e["const"].as_str())
                .unwrap()
                .to_owned()
        })
        .collect();
    let expected: BTreeSet<String> = ["sweep", "progress", "point", "end", "error", "shutdown"]
        .map(String::from)
        .into();
    assert_eq!(names, expected);
    for v in variants {
        assert!(
            v["properties"]["data"].get("$ref").is_some(),
            "an event without a typed payload: {v}"
        );
    }
}

#[test]
fn codes_and_labels_are_the_rust_enums() {
    let doc = openapi();
    // Error codes: the enum, each with one status.
    let codes: BTreeSet<&str> = schema(&doc, "ErrorCode")["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let ours: BTreeSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(codes, ours);
    for code in ErrorCode::ALL {
        let status = code.status();
        assert!(
            status.is_client_error() || status.is_server_error(),
            "{code}: {status}"
        );
        assert_eq!(
            serde_json::to_value(code).unwrap(),
            Value::String(code.as_str().into())
        );
    }
    // The error body's code is that enum.
    let detail = schema(&doc, "ErrorDetail");
    assert_eq!(
        detail["properties"]["code"]["$ref"],
        "#/components/schemas/ErrorCode"
    );
    // Quality warnings: one enum, clamping included.
    let warning_codes: Vec<&str> = schema(&doc, "WarningCode")["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for code in [
        "large_profile_error",
        "large_noise_gain",
        "ill_conditioned",
        "dependent_snapshots",
        "clamped_out_of_range",
    ] {
        assert!(warning_codes.contains(&code), "{code} in {warning_codes:?}");
    }
    // A sweep carries its metrics' presentation; a point's result its error bars.
    let sweep = &schema(&doc, "Sweep")["properties"];
    assert_eq!(
        sweep["metrics"]["items"]["$ref"],
        "#/components/schemas/MetricInfo"
    );
    let info = &schema(&doc, "MetricInfo")["properties"];
    for field in [
        "metric",
        "label",
        "short_label",
        "scale",
        "axis_label",
        "lower_is_better",
        "fallback",
    ] {
        assert!(info.get(field).is_some(), "MetricInfo.{field}");
    }
    let result = &schema(&doc, "MetricResult")["properties"];
    for field in ["value", "mean", "std", "values", "std_errors", "error_bar"] {
        assert!(result.get(field).is_some(), "MetricResult.{field}");
    }
}

#[test]
fn every_documented_route_is_served() {
    // The router is made from the same list as the document (`server::openapi::routes`), so
    // every served route is documented; here the other direction: every documented path and
    // method reaches a handler (not the 404 / 405 fallbacks).
    let doc = openapi();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "{:?}", paths.keys());
    assert!(
        !paths.keys().any(|p| p.contains('*')),
        "an axum wildcard leaked into the document: {:?}",
        paths.keys()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let data = hindsight::app::DataDir::open(dir.path()).await.unwrap();
        let config = ServerConfig {
            sweep_worker: None,
            ..Default::default()
        };
        let app = hindsight::server::app(AppState::new(data, config));
        for (path, item) in paths {
            // Path parameters filled with well-formed values: ids are numbers.
            let uri = path
                .replace("{id}", "1")
                .replace("{idx}", "0")
                .replace("{run}", "r")
                .replace("{key}", "1")
                .replace("{digest}", &"0".repeat(64))
                .replace("{path}", "app.js");
            for method in item.as_object().unwrap().keys() {
                let method = method.to_uppercase();
                let response = app
                    .clone()
                    .oneshot(
                        Request::builder()
                            .method(method.as_str())
                            .uri(&uri)
                            .header("host", "localhost")
                            .body(Body::empty())
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                let status = response.status();
                let bytes = response.into_body().collect().await.unwrap().to_bytes();
                let text = String::from_utf8_lossy(&bytes);
                assert!(
                    status != StatusCode::METHOD_NOT_ALLOWED && !text.contains("no route for"),
                    "{method} {uri} (documented as {path}): {status} {text}"
                );
            }
        }
    });
}

#[test]
fn server_settings_are_checked_in_one_place() {
    ServerConfig::default().validate().unwrap();
    let defaults = ServerConfig::default;
    let secs = std::time::Duration::from_secs_f64;
    let cases: Vec<(&str, ServerConfig)> = vec![
        (
            "upload_concurrency",
            ServerConfig {
                upload_concurrency: 0,
                ..defaults()
            },
        ),
        (
            "max_connections_per_client",
            ServerConfig {
                max_connections_per_client: 0,
                ..defaults()
            },
        ),
        (
            "send_timeout",
            ServerConfig {
                send_timeout: secs(5.0),
                ..defaults()
            },
        ),
        (
            "idle_timeout",
            ServerConfig {
                idle_timeout: secs(0.01),
                ..defaults()
            },
        ),
        (
            "sweep_limits.max_images",
            ServerConfig {
                sweep_limits: hindsight::sweep::SweepLimits {
                    max_images: 1,
                    ..Default::default()
                },
                ..defaults()
            },
        ),
        (
            "sweep_limits.max_unfinished",
            ServerConfig {
                sweep_limits: hindsight::sweep::SweepLimits {
                    max_unfinished: 0,
                    ..Default::default()
                },
                ..defaults()
            },
        ),
        (
            "sweep_worker.lease",
            ServerConfig {
                sweep_worker: Some(hindsight::sweep::WorkerConfig {
                    lease: secs(0.5),
                    ..Default::default()
                }),
                ..defaults()
            },
        ),
    ];
    for (field, config) in cases {
        match config.validate() {
            Err(hindsight::Error::InvalidInput { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected a refusal naming it, got {other:?}"),
        }
    }
}

#[test]
fn serve_flags_show_the_library_defaults_and_name_themselves_in_refusals() {
    let bin = env!("CARGO_BIN_EXE_hindsight");
    let help = std::process::Command::new(bin)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let d = ServerConfig::default();
    for (flag, value) in [
        (
            "--max-connections-per-client",
            d.max_connections_per_client.to_string(),
        ),
        (
            "--send-timeout-secs",
            d.send_timeout.as_secs_f64().to_string(),
        ),
        (
            "--max-unfinished-sweeps",
            d.sweep_limits.max_unfinished.to_string(),
        ),
    ] {
        let at = help
            .find(&format!("{flag} <"))
            .unwrap_or_else(|| panic!("{flag} in {help}"));
        let rest = &help[at..];
        let default = format!("[default: {value}]");
        let next_flag = rest[2..].find("\n      --").map_or(rest.len(), |i| i + 2);
        assert!(
            rest[..next_flag].contains(&default),
            "{flag}: {default} in {}",
            &rest[..next_flag]
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin)
        .args(["--data-dir"])
        .arg(dir.path())
        .args(["serve", "--addr", "127.0.0.1:0", "--send-timeout-secs", "5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--send-timeout-secs: 5 s; must be at least 20 s"),
        "{stderr}"
    );
}
