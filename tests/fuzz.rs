//! Fuzzing (issue 18) with proptest: the safetensors header parser, the EDM2 list syntax and
//! every JSON body and query the API parses, on random and mutated inputs. Each must answer
//! (Ok or a clear error; a 4xx for HTTP, never a 500 or a panic) and allocate within its
//! stated cap: a counting global allocator records the largest single allocation.
//!
//! CI runs the default number of cases per target (`FUZZ_CASES`, 2 000); the benchmark
//! figure in BENCHMARKS.md comes from `FUZZ_CASES=200000 cargo test --release --test fuzz`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tower::ServiceExt;

use hindsight::format::{read_header, write_safetensors, OutTensor, MAX_HEADER_BYTES};
use hindsight::phema::{parse_float_list_at_most, parse_sigma_rel_list, MAX_LIST_VALUES};

/// Counts the largest single allocation of a thread while its `TRACKING` is on (the tests
/// of this file run in parallel threads; each measures only its own allocations).
struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: defers every call to the system allocator; only updates thread-local counters
// (const-initialised, no destructors, so they never allocate).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let out = f();
    TRACKING.with(|t| t.set(false));
    (out, LARGEST.with(|l| l.get()))
}

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// A valid safetensors file with a few tensors and metadata.
fn valid_file() -> Vec<u8> {
    let a: Vec<u8> = (0..24).map(|i| i as u8).collect();
    let b: Vec<u8> = vec![0x3c; 8];
    let mut out = Vec::new();
    write_safetensors(
        &mut out,
        &[
            OutTensor {
                name: "net.a",
                dtype: "F32",
                shape: &[2, 3],
                data: &a,
            },
            OutTensor {
                name: "net.b",
                dtype: "F16",
                shape: &[4],
                data: &b,
            },
        ],
        &BTreeMap::from([
            ("nimg".to_owned(), "1000".to_owned()),
            ("sigma_rel".to_owned(), "0.05".to_owned()),
        ]),
    )
    .unwrap();
    out
}

/// A mutation of `base`: flipped bytes, a changed length prefix, text spliced into the
/// JSON header, or a truncation.
fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = base.len();
    let splice = prop::sample::select(vec![
        "\"shape\":[18446744073709551615,18446744073709551615]",
        "\"data_offsets\":[0,18446744073709551615]",
        "\"dtype\":\"F64\"",
        "\"__metadata__\":{\"nimg\":\"9223372036854775808\"}",
        "{}",
        "[",
        "\u{0}",
        "\"shape\":[-1]",
        "\"data_offsets\":[24,0]",
        "1e999",
    ]);
    (
        prop::collection::vec((0..n, any::<u8>()), 0..8),
        prop::option::of(any::<u64>()),
        prop::option::of((8..n, splice)),
        prop::option::of(0..n),
    )
        .prop_map(move |(flips, len, insert, cut)| {
            let mut b = base.clone();
            for (i, v) in flips {
                b[i] ^= v;
            }
            if let Some(l) = len {
                b[..8].copy_from_slice(&l.to_le_bytes());
            }
            if let Some((at, text)) = insert {
                let at = at.min(b.len());
                b.splice(at..at, text.bytes());
            }
            if let Some(c) = cut {
                b.truncate(c.max(1));
            }
            b
        })
}

#[test]
fn safetensors_header_parser_never_panics_and_stays_within_its_cap() {
    let base = valid_file();
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        mutated(base.clone()),
    ];
    let refused = std::cell::Cell::new(0u32);
    let largest_seen = std::cell::Cell::new(0usize);
    runner()
        .run(&strategy, |bytes| {
            let (result, largest) =
                largest_allocation(|| read_header(&mut &bytes[..], bytes.len() as u64, "fuzz"));
            largest_seen.set(largest_seen.get().max(largest));
            // The header is read into one buffer of at most its stated length: never more
            // than the file, never more than MAX_HEADER_BYTES.
            prop_assert!(
                largest as u64 <= (bytes.len() as u64).min(MAX_HEADER_BYTES) + 4096,
                "allocated {largest} bytes for a {}-byte file",
                bytes.len()
            );
            if result.is_err() {
                refused.set(refused.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    let (refused, largest_seen) = (refused.get(), largest_seen.get());
    assert!(
        refused < cases(),
        "every input was refused: the fuzzer never reaches a good file"
    );
    assert!(
        refused > 0,
        "no input was refused: the fuzzer is not reaching the checks"
    );
    eprintln!(
        "safetensors header: {} cases, {refused} refused, largest allocation {largest_seen} B",
        cases()
    );
}

#[test]
fn list_syntax_never_panics_and_never_allocates_past_its_cap() {
    let piece = prop_oneof![
        "[0-9]{1,3}(\\.[0-9]{0,3})?(e-?[0-9]{1,3})?",
        Just("...".to_owned()),
        Just("1e-300".to_owned()),
        Just("1e300".to_owned()),
        Just("NaN".to_owned()),
        Just("inf".to_owned()),
        Just("-0".to_owned()),
        Just(" ".to_owned()),
        ".{0,4}",
    ];
    let strategy = prop::collection::vec(piece, 0..8).prop_map(|p| p.join(","));
    let cap = 64;
    runner()
        .run(&strategy, |text| {
            let (result, largest) = largest_allocation(|| parse_float_list_at_most(&text, cap));
            if let Ok(values) = &result {
                prop_assert!(values.len() <= cap, "{text:?} gave {} values", values.len());
            }
            // The values themselves (≤ cap f64) and the error message are all it allocates.
            prop_assert!(largest <= 64 * 1024, "{text:?}: allocated {largest} bytes");
            let _ = parse_sigma_rel_list(&text);
            Ok(())
        })
        .unwrap();
    // The default cap on hostile lists, without allocating them.
    for text in ["1,2,...,1e15", "1e-300,2e-300,...,1e300", "0,1e-300,...,1"] {
        let (result, largest) =
            largest_allocation(|| parse_float_list_at_most(text, MAX_LIST_VALUES));
        assert!(result.is_err(), "{text}");
        assert!(largest < 64 * 1024, "{text}: {largest}");
    }
}

#[test]
fn statistics_file_parsers_never_panic_and_stay_within_their_caps() {
    // .npy (inside pytorch-fid's .npz) and pickle (EDM2's .pkl), as POST /references reads
    // them: random bytes, and mutations of a valid .npy and of pickle-looking prefixes.
    let mut npy = Vec::new();
    hindsight::metrics::npy::write_f64(&mut npy, &[3, 3], &[0.5; 9]).unwrap();
    let pickle_start = prop::sample::select(vec![
        b"\x80\x04\x95".to_vec(),
        b"\x80\x02}q\x00(X\x02\x00\x00\x00mu".to_vec(),
        b"\x80\x04]\x94(K\x01K\x02e.".to_vec(),
        b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\x7f".to_vec(),
        b"(((((((((((((((((((((((((((((((((((((((((((((((((".to_vec(),
    ]);
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        mutated(npy),
        (pickle_start, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(mut a, b)| {
            a.extend(b);
            a
        }),
    ];
    runner()
        .run(&strategy, |bytes| {
            let (_, largest) = largest_allocation(|| {
                let _ = hindsight::metrics::npy::read_f64(&bytes, "fuzz");
                let _ = hindsight::metrics::npy::read_f32(&bytes, "fuzz");
                let _ = hindsight::metrics::pickle::parse(&bytes, "fuzz");
            });
            // Nothing bigger than the input itself, give or take fixed buffers.
            prop_assert!(
                largest <= 8 * bytes.len() + 64 * 1024,
                "allocated {largest} bytes for {} input bytes",
                bytes.len()
            );
            Ok(())
        })
        .unwrap();
}

/// A random JSON value, nested a few levels, biased towards the API's field names.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let key = prop_oneof![
        Just("run".to_owned()),
        Just("sigma_rel".to_owned()),
        Just("gamma".to_owned()),
        Just("nimg".to_owned()),
        Just("dtype".to_owned()),
        Just("wait_secs".to_owned()),
        Just("targets".to_owned()),
        Just("sigma_rels".to_owned()),
        Just("nimgs".to_owned()),
        Just("reference".to_owned()),
        Just("num_images".to_owned()),
        Just("seed_sets".to_owned()),
        Just("sampler".to_owned()),
        Just("metrics".to_owned()),
        Just("batch".to_owned()),
        "[a-z_]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(vec![
            "r",
            "",
            "0.05",
            "0.01,0.02,...,0.2",
            "1,2,...,1e15",
            "1e-300,2e-300,...,1e300",
            "f16",
            "bf16",
            "fid",
            "kid",
            "9223372036854775808",
            "0.28867513459481287",
            "NaN",
        ])
        .prop_map(|s| Value::String(s.to_owned())),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A request of the right shape with hostile values: reaches the solver and the sweep
/// planner, not only the parser.
fn shaped_request() -> impl Strategy<Value = (&'static str, String)> {
    use serde_json::{json, Value};
    let number = prop_oneof![
        1 => any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        8 => (0.03..0.25f64).prop_map(Value::from),
        2 => Just(json!("0.05,0.1")),
        1 => any::<u64>().prop_map(Value::from),
        1 => Just(json!(0.28867513459481287)),
        1 => Just(json!(1e-300)),
        1 => Just(json!("0.01,0.02,...,0.2")),
        1 => Just(json!("1e-300,2e-300,...,1e300")),
        1 => Just(json!([0.05, 0.1, -1])),
        1 => Just(json!(9223372036854775808u64)),
    ];
    let nimg = prop_oneof![
        6 => Just(Value::Null),
        3 => (0u64..2_000_000).prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => (0u64..3_000_000).prop_map(Value::from),
        1 => Just(json!(-1)),
        1 => Just(json!(1.5)),
        1 => Just(json!([1000, 2000000])),
    ];
    let run = prop::sample::select(vec!["r", "r", "r", "r", "nope", "", " r"]);
    let dtype = prop::sample::select(vec!["f32", "f32", "f16", "bf16", "f64", ""]);
    (run, number, nimg, dtype, any::<bool>(), 0u32..3).prop_map(
        |(run, width, nimg, dtype, gamma, kind)| {
            let key = if gamma { "gamma" } else { "sigma_rel" };
            // γ of the same EMAs is two orders of magnitude larger than σ_rel.
            let width = match (&width, gamma) {
                (Value::Number(n), true) => json!(n.as_f64().unwrap_or(0.0) * 60.0),
                _ => width,
            };
            match kind {
                0 => ("/reconstruct", json!({"run": run, key: width, "nimg": nimg, "dtype": dtype, "wait_secs": 0}).to_string()),
                1 => ("/reconstruct", json!({"run": run, key: width, "nimg": nimg, "clamp_out_of_range": gamma, "wait_secs": 0}).to_string()),
                _ => ("/sweeps", json!({"run": run, "sigma_rels": width, "nimgs": nimg, "reference": "none", "num_images": nimg}).to_string()),
            }
        },
    )
}

#[test]
fn every_json_body_and_query_gets_an_answer_never_a_500() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (app, routes) = rt.block_on(async {
        let data = hindsight::app::DataDir::open(dir.path()).await.unwrap();
        // A run with two snapshots, so that valid-looking requests reach the solver.
        let run = data
            .db
            .create_run("r", "", &serde_json::json!({}))
            .await
            .unwrap();
        for (i, sigma) in [(1u64, 0.05), (2, 0.10)] {
            let values: Vec<u8> = (0..16)
                .flat_map(|k| (k as f32 * sigma as f32).to_le_bytes())
                .collect();
            let mut bytes = Vec::new();
            write_safetensors(
                &mut bytes,
                &[OutTensor {
                    name: "w",
                    dtype: "F32",
                    shape: &[16],
                    data: &values,
                }],
                &BTreeMap::from([
                    ("nimg".to_owned(), (i * 1_000_000).to_string()),
                    ("sigma_rel".to_owned(), sigma.to_string()),
                ]),
            )
            .unwrap();
            let path = dir.path().join(format!("s{i}.safetensors"));
            std::fs::write(&path, &bytes).unwrap();
            hindsight::ingest::ingest_file(
                &data.db,
                &data.store,
                &run,
                &path,
                Default::default(),
                Default::default(),
                |_| {},
            )
            .await
            .unwrap();
        }
        let config = hindsight::server::ServerConfig {
            sweep_worker: None,
            reconstruct_wait: std::time::Duration::from_secs(5),
            ..Default::default()
        };
        let app = hindsight::server::app(hindsight::server::AppState::new(data, config));
        (app, ["/reconstruct", "/sweeps"])
    });
    let strategy = prop_oneof![
        2 => (
            prop::sample::select(routes.to_vec()),
            prop_oneof![
                3 => json_value().prop_map(|v| v.to_string()),
                1 => ".{0,40}",
                1 => json_value().prop_map(|v| format!("{v}xyz")),
            ],
        ),
        3 => shaped_request(),
    ];
    let statuses: std::cell::RefCell<BTreeMap<u16, u32>> = Default::default();
    let config = Config {
        cases: (cases() / 4).max(100),
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new(config)
        .run(&strategy, |(route, body)| {
            let request = Request::post(route)
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(Body::from(body.clone()))
                .unwrap();
            let (status, text) = rt.block_on(async {
                let response = app.clone().oneshot(request).await.unwrap();
                let status = response.status();
                let bytes = response.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&bytes).to_string())
            });
            *statuses.borrow_mut().entry(status.as_u16()).or_default() += 1;
            prop_assert!(
                status != StatusCode::INTERNAL_SERVER_ERROR,
                "{route} {body:?}: {status} {text}"
            );
            if !status.is_success() {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| TestCaseError::fail(format!("{route} {body:?}: {e}: {text}")))?;
                prop_assert!(v["error"]["code"].is_string(), "{text}");
            }
            Ok(())
        })
        .unwrap();
    // Queries: the preview's parameters.
    let query = (".{0,12}", ".{0,12}", ".{0,12}");
    TestRunner::new(Config {
        cases: (cases() / 4).max(100),
        failure_persistence: None,
        ..Config::default()
    })
    .run(&query, |(s, g, n)| {
        let enc = |t: &str| t.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
        let uri = format!(
            "/runs/r/preview?sigma_rel={}&gamma={}&nimg={}",
            enc(&s),
            enc(&g),
            enc(&n)
        );
        let status = rt.block_on(async {
            app.clone()
                .oneshot(
                    Request::get(&uri)
                        .header("host", "localhost")
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap()
                .status()
        });
        prop_assert!(status != StatusCode::INTERNAL_SERVER_ERROR, "{uri}");
        Ok(())
    })
    .unwrap();
    let statuses = statuses.into_inner();
    eprintln!("JSON bodies: statuses {statuses:?}");
    assert!(statuses.keys().any(|s| *s == 400), "no request was refused");
    assert!(
        statuses.keys().any(|s| *s < 300),
        "no request was accepted: the fuzzer never reaches the solver"
    );
}
