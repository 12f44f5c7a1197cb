//! The `hindsight solve` command-line contract: JSON in on stdin, JSON out on stdout, and on
//! error a non-zero exit with one line on stderr naming the bad field.

use std::process::Output;

use serde_json::{json, Value};

mod common;

fn run(args: &[&str], stdin: &str) -> Output {
    common::run_with_stdin(
        args,
        stdin,
        &std::env::temp_dir().join("hindsight-cli-test"),
    )
}

fn solve_ok(request: &Value) -> Value {
    let out = run(&["solve"], &request.to_string());
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

#[track_caller]
fn solve_err(request: &str, field: &str) -> String {
    let out = run(&["solve"], request);
    assert!(!out.status.success(), "expected failure for {request}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.starts_with(&format!("error: {field}: ")),
        "{field} not named first in {stderr:?}"
    );
    stderr
}

fn example() -> Value {
    json!({
        "snapshots": [
            {"nimg": 8388608, "sigma_rel": 0.05}, {"nimg": 8388608, "sigma_rel": 0.10},
            {"nimg": 16777216, "sigma_rel": 0.05}, {"nimg": 16777216, "sigma_rel": 0.10},
            {"nimg": 25165824, "sigma_rel": 0.05}, {"nimg": 25165824, "sigma_rel": 0.10}
        ],
        "targets": [
            {"sigma_rel": 0.1, "nimg": 20000000},
            {"gamma": 6.94}
        ]
    })
}

#[test]
fn solves_and_reports() {
    let out = solve_ok(&example());
    let targets = out["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2);
    for t in targets {
        let c: Vec<f64> = t["coefficients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(c.len(), 6, "one coefficient per input snapshot");
        assert!((c.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        for key in [
            "sigma_rel",
            "gamma",
            "relative_error",
            "coefficient_l1",
            "noise_gain",
            "condition_number",
        ] {
            assert!(t[key].as_f64().unwrap().is_finite(), "{key}");
        }
        assert!(t["warnings"].is_array());
        assert!(t.get("profile").is_none());
    }
    // The first target sits between snapshots: the last two get nothing.
    assert_eq!(targets[0]["nimg"], 20000000);
    assert_eq!(targets[0]["coefficients"][4], 0.0);
    assert_eq!(targets[0]["used_snapshots"], 4);
    // The second defaults to the last snapshot and was given as γ.
    assert_eq!(targets[1]["nimg"], 25165824);
    assert_eq!(targets[1]["gamma"], 6.94);
}

#[test]
fn profiles_on_request() {
    let mut request = example();
    request["profile_points"] = json!(11);
    let out = solve_ok(&request);
    let profile = out["targets"][1]["profile"].as_array().unwrap();
    assert_eq!(profile.len(), 11);
    assert_eq!(profile[0]["nimg"], 0.0);
    assert_eq!(profile[10]["nimg"], 25165824.0);
    assert!(profile[10]["target"].as_f64().unwrap() > 0.0);
}

#[test]
fn partial_options_take_defaults() {
    let mut request = example();
    request["options"] = json!({"max_noise_gain": 0.5});
    let out = solve_ok(&request);
    let codes: Vec<&str> = out["targets"][0]["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["code"].as_str().unwrap())
        .collect();
    assert!(codes.contains(&"large_noise_gain"), "{codes:?}");
    // The other thresholds kept their defaults: without the option there is no such warning.
    let plain = solve_ok(&example());
    assert!(!plain["targets"][0]["warnings"]
        .to_string()
        .contains("large_noise_gain"));
    request["options"] = json!({"max_noise": 0.5});
    let out = run(&["solve"], &request.to_string());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: options.max_noise: "));
}

#[test]
fn list_syntax_on_the_command_line() {
    let mut request = example();
    request.as_object_mut().unwrap().remove("targets");
    let out = run(
        &[
            "solve",
            "--sigma-rel",
            "0.05,0.07,...,0.11",
            "--at-nimg",
            "20000000",
        ],
        &request.to_string(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let sigmas: Vec<f64> = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["sigma_rel"].as_f64().unwrap())
        .collect();
    assert_eq!(sigmas, [0.05, 0.07, 0.09, 0.11]);
    assert!(v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["nimg"] == 20000000));
    // Targets in both places are ambiguous.
    let out = run(&["solve", "--sigma-rel", "0.1"], &example().to_string());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: targets: "));
    let out = run(
        &["solve", "--sigma-rel", "0.1,0.2,...,0.45"],
        &request.to_string(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not evenly spaced"));
}

#[test]
fn plot_to_svg() {
    let path = std::env::temp_dir().join(format!("hindsight-plot-{}.svg", std::process::id()));
    let out = run(
        &["solve", "--plot", path.to_str().unwrap()],
        &example().to_string(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svg = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(svg.starts_with("<svg"));
    assert!(svg.contains("σ_rel 0.100") && svg.contains("σ_rel 0.100:"));
    // An unwritable path is a one-line error naming the option.
    let out = run(
        &["solve", "--plot", "/nonexistent-dir/x.svg"],
        &example().to_string(),
    );
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: --plot: writing"));
}

#[test]
fn a_closed_pipe_is_not_an_error() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    // Enough output (49 targets × 512 coefficients) to overflow the pipe buffer.
    let snapshots = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/examples/edm2-img512-snapshots.json"
    ))
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .args(["solve", "--sigma-rel", "0.010,0.015,...,0.250"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(snapshots.as_bytes())
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout); // like `| head -c 16`
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&first, br#"{"targets":[{"si"#);
}

#[test]
fn table_for_people() {
    let out = run(&["solve", "--table"], &example().to_string());
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().next().unwrap().contains("sigma_rel"));
    assert_eq!(text.lines().count(), 3);
}

#[test]
fn errors_name_the_field() {
    solve_err(
        r#"{"snapshots": [{"nimg": 100, "sigma_rel": 0.05}], "targets": [{"sigma_rel": 0.1}, {"sigma_rel": 0.1, "nimg": "x"}]}"#,
        "targets[1].nimg",
    );
    solve_err(
        r#"{"snapshots": [{"nimg": 100, "sigma_rel": 0.05}], "targets": [{"sigma_rel": 0.3}]}"#,
        "targets[0].sigma_rel",
    );
    solve_err(
        r#"{"snapshots": [{"nimg": 100, "sigma_rel": 0.05}], "targets": [{"sigma_rel": 0.1, "gamma": 3}]}"#,
        "targets[0]",
    );
    solve_err(
        r#"{"snapshots": [{"nimg": 100, "sigma_rel": 0.05}], "targets": [{"sigmarel": 0.1}]}"#,
        "targets[0].sigmarel",
    );
    solve_err(
        r#"{"snapshots": [{"nimg": -5, "sigma_rel": 0.05}], "targets": [{"sigma_rel": 0.1}]}"#,
        "snapshots[0].nimg",
    );
    solve_err(
        r#"{"snapshots": [{"nimg": 100}], "targets": [{"sigma_rel": 0.1}]}"#,
        "snapshots[0]",
    );
    solve_err(
        r#"{"snapshots": [{"nimg": 100, "sigma_rel": 0.05}], "targets": [{"sigma_rel": 0.1, "nimg": 101}]}"#,
        "targets[0].nimg",
    );
    solve_err(
        r#"{"snapshots": [{"nimg": 100, "sigma_rel": 0.05}], "targets": []}"#,
        "targets",
    );
    solve_err(
        r#"{"snapshots": [{"nimg": 100, "sigma_rel": 0.05}], "targets": [{"sigma_rel": 0.1}], "profile_points": 1}"#,
        "profile_points",
    );
    let msg = solve_err(r#"{"snapshots": [1e999]}"#, "snapshots[0]");
    assert!(msg.len() < 300, "{msg}");
    solve_err("not json", "request");
    solve_err("", "request");
}
