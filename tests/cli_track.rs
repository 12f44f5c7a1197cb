//! The hidden `hindsight ema-track` command, which other trackers (the Python client's) are
//! checked against: its output after every update is the exact power-function average of the
//! values held since the previous update (EDM2 eq. 127 chained), it reports the exponents of
//! the widths, it refuses updates that do not advance time with one line naming the update,
//! and it stays out of `--help`.

use std::process::Output;

use serde_json::{json, Value};

mod common;

fn run(args: &[&str], stdin: &str) -> Output {
    common::run_with_stdin(
        args,
        stdin,
        &std::env::temp_dir().join("hindsight-cli-track-test"),
    )
}

/// The value held at step `k` of element `e` (exactly representable in f32).
fn value(k: u64, e: u64) -> f32 {
    ((k * 37 + e * 11) % 101) as f32 / 8.0 - 6.0
}

#[test]
fn every_update_is_the_closed_form_average() {
    let sigma_rels = [0.05, 0.10];
    for every in [1u64, 7, 100] {
        let batch = 32u64;
        let times: Vec<u64> = (1..=700 / every).map(|i| i * every * batch).collect();
        let updates: Vec<Value> = times
            .iter()
            .enumerate()
            .map(|(k, &t)| json!([t, [value(k as u64 + 1, 0), value(k as u64 + 1, 1)]]))
            .collect();
        let request = json!({
            "sigma_rels": sigma_rels,
            "initial": [value(0, 0), value(0, 1)],
            "updates": updates,
        });
        let out = run(&["ema-track"], &request.to_string());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let response: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
        let gammas: Vec<f64> = response["gammas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_f64().unwrap())
            .collect();
        for (s, g) in sigma_rels.iter().zip(&gammas) {
            let want = hindsight::phema::sigma_rel_to_gamma(*s, "s").unwrap();
            assert_eq!(*g, want);
        }
        let tracked = response["updates"].as_array().unwrap();
        assert_eq!(tracked.len(), times.len());
        for (i, step) in tracked.iter().enumerate() {
            let t_end = times[i] as f64;
            assert_eq!(step["nimg"].as_u64(), Some(times[i]));
            for (w, gamma) in gammas.iter().enumerate() {
                for e in 0..2u64 {
                    // Σ_j x_j ((t_j/T)^(γ+1) − (t_{j−1}/T)^(γ+1)); the update at t_j holds
                    // the value of step j + 1, and the first update replaces the initial value.
                    let mut expect = 0.0;
                    let mut prev = 0.0;
                    for (j, &t) in times[..=i].iter().enumerate() {
                        let t = t as f64;
                        let mass = (t / t_end).powf(gamma + 1.0) - (prev / t_end).powf(gamma + 1.0);
                        expect += f64::from(value(j as u64 + 1, e)) * mass;
                        prev = t;
                    }
                    let got = step["emas"][w][e as usize].as_f64().unwrap();
                    assert!(
                        (got - expect).abs() <= 2e-6 * 6.0,
                        "every {every}, update {i}, width {w}, element {e}: {got} vs {expect}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_late_first_update_keeps_the_initial_value_for_its_interval() {
    // Starting at nimg0 = 1000 with value 2, one update at 2000 with value 4: the initial
    // value stands for (0, 1000], so the EMA is 2 · (1/2)^(γ+1) + 4 · (1 − (1/2)^(γ+1)).
    let request =
        json!({"sigma_rels": [0.1], "nimg0": 1000, "initial": [2.0], "updates": [[2000, [4.0]]]});
    let out = run(&["ema-track"], &request.to_string());
    assert!(out.status.success());
    let response: Value = serde_json::from_slice(&out.stdout).unwrap();
    let gamma = response["gammas"][0].as_f64().unwrap();
    let h = 0.5f64.powf(gamma + 1.0);
    let got = response["updates"][0]["emas"][0][0].as_f64().unwrap();
    assert!((got - (2.0 * h + 4.0 * (1.0 - h))).abs() < 1e-6, "{got}");
}

#[test]
fn time_that_does_not_advance_is_refused_naming_the_update() {
    let request =
        json!({"sigma_rels": [0.05], "initial": [0.0], "updates": [[64, [1.0]], [64, [2.0]]]});
    let out = run(&["ema-track"], &request.to_string());
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: updates[1]"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn the_command_is_hidden_from_help() {
    let out = run(&["--help"], "");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("reconstruct"), "{help}");
    assert!(!help.contains("ema-track"), "{help}");
}
