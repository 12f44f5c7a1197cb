//! `hindsight ema-track` (hidden): runs the library's [`PowerEma`] tracker over a sequence of
//! values given as JSON on stdin and prints every EMA after every update, so that other
//! implementations (the Python client's `PowerEMA`) can be checked against this one.
//!
//! Input: `{"sigma_rels": [0.05, 0.10], "nimg0": 0, "initial": [x, …], "updates": [[nimg,
//! [x, …]], …]}` (`nimg0`, the time of `initial`, defaults to 0; every update must advance
//! the time). Output, one line: `{"sigma_rels": […], "gammas": […], "updates": [{"nimg": N,
//! "emas": [[one value per element] per width]}, …]}`. Values are `f32`, as the tracker keeps
//! them.

use std::io::Read;

use anyhow::Context;
use hindsight::phema::{PowerEma, Width};
use serde::{Deserialize, Serialize};

use super::common::print_json;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrackRequest {
    sigma_rels: Vec<f64>,
    #[serde(default)]
    nimg0: u64,
    initial: Vec<f32>,
    updates: Vec<(u64, Vec<f32>)>,
}

#[derive(Serialize)]
struct TrackedUpdate {
    nimg: u64,
    emas: Vec<Vec<f32>>,
}

#[derive(Serialize)]
struct TrackResponse {
    sigma_rels: Vec<f64>,
    gammas: Vec<f64>,
    updates: Vec<TrackedUpdate>,
}

/// Reads the request on stdin, tracks, prints the EMAs after each update.
pub fn run() -> anyhow::Result<()> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading stdin")?;
    let request: TrackRequest = serde_json::from_str(&text).context("the request")?;
    let widths: Vec<Width> = request
        .sigma_rels
        .iter()
        .map(|&s| Width::SigmaRel(s))
        .collect();
    let mut ema = PowerEma::new(&widths, request.nimg0, [("x", request.initial.as_slice())])?;
    let mut updates = Vec::with_capacity(request.updates.len());
    for (i, (nimg, values)) in request.updates.iter().enumerate() {
        ema.update(*nimg, &[values.as_slice()])
            .with_context(|| format!("updates[{i}]"))?;
        updates.push(TrackedUpdate {
            nimg: *nimg,
            emas: ema.emas().iter().map(|e| e.tensors[0].clone()).collect(),
        });
    }
    print_json(&TrackResponse {
        sigma_rels: ema.emas().iter().map(|e| e.sigma_rel).collect(),
        gammas: ema.emas().iter().map(|e| e.gamma).collect(),
        updates,
    })
}
