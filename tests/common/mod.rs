//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use hindsight::phema::{Snapshot, Target, Width};

/// Runs the `hindsight` binary with `args`, `stdin` as its standard input and `data_dir` as
/// `HINDSIGHT_DATA_DIR`; returns its exit status and output.
pub fn run_with_stdin(args: &[&str], stdin: &str, data_dir: &Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .args(args)
        .env("HINDSIGHT_DATA_DIR", data_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Snapshots at the given times, one per width at each time.
pub fn snapshots(times: &[u64], sigma_rels: &[f64]) -> Vec<Snapshot> {
    times
        .iter()
        .flat_map(|&t| {
            sigma_rels.iter().map(move |&s| Snapshot {
                nimg: t,
                width: Width::SigmaRel(s),
            })
        })
        .collect()
}

/// A σ_rel target at `nimg` (or the last snapshot when `None`).
pub fn target(sigma_rel: f64, nimg: Option<u64>) -> Target {
    Target {
        width: Width::SigmaRel(sigma_rel),
        nimg,
    }
}

/// Asserts `|got − expect| ≤ tol · max(1, |expect|)`.
#[track_caller]
pub fn assert_close(got: f64, expect: f64, tol: f64) {
    assert!(
        (got - expect).abs() <= tol * expect.abs().max(1.0),
        "got {got:e}, expected {expect:e} (tolerance {tol:e})"
    );
}
