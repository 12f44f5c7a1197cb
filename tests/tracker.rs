//! The trainer-side tracker realises the declared power-function profile for any update
//! interval.
//!
//! Setting: training with batches of `BATCH` images; the tracker is updated every `k` steps
//! with the parameter's current value and the true image count. Let `t_i` be the update times
//! and `T` the last one. Three checks for `k` = 1, 7 and 100:
//! 1. Exactness: the EMA equals `Σ_i θ(t_i) ∫_{t_{i−1}}^{t_i} p_{γ,T}(τ) dτ`, the integral
//!    against the declared profile of the step function that holds each update's value since
//!    the previous update (f32 accumulation: 2e-6 relative).
//! 2. Convergence: for a smooth θ, the EMA is within `max|θ'| · k · BATCH` of the continuous
//!    integral `∫ p_{γ,T} θ`, computed in closed form for a polynomial.
//! 3. Realised width: tracking one-hot "impulse" parameters recovers the weight of every
//!    update interval; their standard deviation is the declared σ_rel to within the grid's
//!    resolution, while counting updates instead of images (β from the update count, as
//!    ema-pytorch does with `update_every > 1`) realises a far wider profile.

use hindsight::phema::{realised_sigma_rel, sigma_rel_to_gamma, PowerEma, Width};

const BATCH: u64 = 64;
const STEPS: u64 = 7_000;

/// `∫_{a}^{b} p_{γ,T}(τ) dτ = (b^(γ+1) − a^(γ+1)) / T^(γ+1)`.
fn mass(gamma: f64, a: f64, b: f64, t_end: f64) -> f64 {
    (b / t_end).powf(gamma + 1.0) - (a / t_end).powf(gamma + 1.0)
}

fn update_times(every: u64) -> Vec<u64> {
    (1..=STEPS / every).map(|i| i * every * BATCH).collect()
}

/// θ(τ) = 1 + 2u − 3u² + u³ with u = τ / T_ref.
fn theta(tau: f64, t_ref: f64) -> f64 {
    let u = tau / t_ref;
    1.0 + 2.0 * u - 3.0 * u * u + u * u * u
}

fn track(every: u64, sigma_rels: &[f64], value: impl Fn(f64) -> Vec<f32>) -> PowerEma {
    let widths: Vec<Width> = sigma_rels.iter().map(|&s| Width::SigmaRel(s)).collect();
    let init = value(0.0);
    let mut ema = PowerEma::new(&widths, 0, [("p", init.as_slice())]).unwrap();
    for t in update_times(every) {
        let v = value(t as f64);
        ema.update(t, &[v.as_slice()]).unwrap();
    }
    ema
}

#[test]
fn ema_is_the_profile_integral_of_the_held_values() {
    for every in [1, 7, 100] {
        let times = update_times(every);
        let t_end = *times.last().unwrap() as f64;
        let ema = track(every, &[0.05, 0.10], |t| vec![theta(t, t_end) as f32]);
        for tracked in ema.emas() {
            let mut expect = 0.0;
            let mut prev = 0.0;
            for &t in &times {
                let t = t as f64;
                expect += theta(t, t_end) as f32 as f64 * mass(tracked.gamma, prev, t, t_end);
                prev = t;
            }
            let got = tracked.tensors[0][0] as f64;
            assert!(
                ((got - expect) / expect).abs() < 2e-6,
                "every {every}, σ_rel {}: EMA {got} vs {expect}",
                tracked.sigma_rel
            );
        }
    }
}

#[test]
fn ema_converges_to_the_continuous_integral() {
    for every in [1, 7, 100] {
        let times = update_times(every);
        let t_end = *times.last().unwrap() as f64;
        let ema = track(every, &[0.05, 0.10], |t| vec![theta(t, t_end) as f32]);
        // max |dθ/dτ| over [0, T] is 2 / T (at u = 0), so a right-endpoint rule on a
        // probability measure is off by at most 2 · Δ / T.
        let bound = 2.0 * (every * BATCH) as f64 / t_end + 1e-6;
        for tracked in ema.emas() {
            let g = tracked.gamma;
            // ∫ p_{γ,T} u^k dτ = (γ + 1) / (γ + 1 + k).
            let m = |k: f64| (g + 1.0) / (g + 1.0 + k);
            let exact = 1.0 + 2.0 * m(1.0) - 3.0 * m(2.0) + m(3.0);
            let got = tracked.tensors[0][0] as f64;
            assert!(
                (got - exact).abs() <= bound,
                "every {every}, σ_rel {}: EMA {got} vs integral {exact} (bound {bound})",
                tracked.sigma_rel
            );
        }
    }
}

#[test]
fn impulses_recover_the_declared_profile() {
    for every in [1, 7, 100] {
        let times = update_times(every);
        let n = times.len();
        let t_end = *times.last().unwrap() as f64;
        // Parameter j is 1 during update interval j and 0 otherwise; the tracker sees it at
        // the interval's end.
        let ema = track(every, &[0.05, 0.10], |t| {
            let mut v = vec![0.0f32; n];
            if t > 0.0 {
                v[(t as u64 / (every * BATCH) - 1) as usize] = 1.0;
            }
            v
        });
        let mid: Vec<f64> = times
            .iter()
            .map(|&t| t as f64 - (every * BATCH) as f64 / 2.0)
            .collect();
        for tracked in ema.emas() {
            let weights: Vec<f64> = tracked.tensors[0].iter().map(|&w| w as f64).collect();
            let mut prev = 0.0;
            for (w, &t) in weights.iter().zip(&times) {
                let expect = mass(tracked.gamma, prev, t as f64, t_end);
                assert!((w - expect).abs() < 1e-6, "every {every}: {w} vs {expect}");
                prev = t as f64;
            }
            let realised = realised_sigma_rel(&mid, &weights);
            assert!(
                (realised - tracked.sigma_rel).abs() < 0.002,
                "every {every}: declared σ_rel {}, realised {realised}",
                tracked.sigma_rel
            );
        }
    }
}

#[test]
fn counting_updates_instead_of_images_widens_the_profile() {
    // The update-count rule: β = (1 − 1/s)^(γ+1) with s the training step, applied every 10
    // steps. For a declared σ_rel of 0.05 the realised width is several times larger.
    let every = 10;
    let gamma = sigma_rel_to_gamma(0.05, "sigma_rel").unwrap();
    let times = update_times(every);
    let n = times.len();
    let mut weights = vec![0.0f64; n];
    for (i, &t) in times.iter().enumerate() {
        let step = (t / BATCH) as f64;
        let beta = (1.0 - 1.0 / step).powf(gamma + 1.0);
        for w in weights.iter_mut().take(i) {
            *w *= beta;
        }
        weights[i] = 1.0 - beta;
    }
    let mid: Vec<f64> = times.iter().map(|&t| t as f64).collect();
    let naive = realised_sigma_rel(&mid, &weights);
    assert!(naive > 0.2, "update-count rule realised σ_rel {naive}");
    // The tracker, updated on the same grid with image counts, realises 0.05.
    let ema = track(every, &[0.05], |t| {
        let mut v = vec![0.0f32; n];
        if t > 0.0 {
            v[(t as u64 / (every * BATCH) - 1) as usize] = 1.0;
        }
        v
    });
    let ours: Vec<f64> = ema.emas()[0].tensors[0].iter().map(|&w| w as f64).collect();
    let realised = realised_sigma_rel(&mid, &ours);
    assert!(
        (realised - 0.05).abs() < 0.002,
        "tracker realised σ_rel {realised}"
    );
}

#[test]
fn misuse_is_an_error() {
    let data = [1.0f32, 2.0];
    let mut ema = PowerEma::with_default_widths(0, [("w", &data[..])]).unwrap();
    assert!(ema
        .update(0, &[&data])
        .unwrap_err()
        .to_string()
        .starts_with("nimg:"));
    assert!(ema
        .update(64, &[&data[..1]])
        .unwrap_err()
        .to_string()
        .contains("params.w"));
    assert!(ema.update(64, &[&data, &data]).is_err());
    ema.update(64, &[&data]).unwrap();
    assert_eq!(ema.nimg(), 64);
    // The first update spans all of training so far: β = 0 and the EMA is the parameter.
    assert_eq!(ema.emas()[0].tensors[0], data);
    assert!(ema.ema(0.10).is_some() && ema.ema(0.2).is_none());
    assert!(PowerEma::new(&[], 0, [("w", &data[..])]).is_err());
    assert!(PowerEma::new(&[Width::SigmaRel(0.5)], 0, [("w", &data[..])]).is_err());
    assert!(PowerEma::new(
        &[Width::SigmaRel(0.1)],
        0,
        [("w", &data[..]), ("w", &data[..])]
    )
    .is_err());
    // The tracker's state serialises for checkpoints.
    let json = serde_json::to_string(&ema).unwrap();
    let back: PowerEma = serde_json::from_str(&json).unwrap();
    assert_eq!(back, ema);
}
