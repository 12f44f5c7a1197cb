//! The post-hoc EMA mathematics against numbers computed by the EDM2 reference implementation
//! (`training/phema.py`, float64), stored in `tests/fixtures/phema_vectors.json` (copied from
//! the project's shared reference data; see its README for how it was made).
//!
//! Tolerances: conversions, inner products and β to 1e-12 relative; coefficients to 1e-9
//! relative to the largest |coefficient| of their target; profile errors to 1e-9 absolute;
//! condition numbers to 1e-6 relative (the reference's smallest eigenvalue itself carries a
//! relative rounding error near cond · ε ≈ 1e-7).

use hindsight::phema::{
    self, beta, gamma_to_sigma_rel, inner_product, sigma_rel_to_gamma, Profile, Snapshot,
    SolveOptions, Target, Width,
};
use serde_json::Value;

fn fixture() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/phema_vectors.json"
    ))
    .expect("fixture present");
    serde_json::from_str(&text).expect("fixture parses")
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[track_caller]
fn check_rel(got: f64, expect: f64, tol: f64, what: &str) {
    let err = if expect == 0.0 {
        got.abs()
    } else {
        ((got - expect) / expect).abs()
    };
    assert!(
        err <= tol,
        "{what}: got {got:e}, expected {expect:e} (rel. error {err:e} > {tol:e})"
    );
}

#[test]
fn sigma_rel_to_gamma_matches_reference() {
    let data = fixture();
    let cases = data["sigma_rel_to_gamma"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let sigma = f(case, "sigma_rel");
        let gamma = sigma_rel_to_gamma(sigma, "sigma_rel").unwrap();
        check_rel(gamma, f(case, "gamma"), 1e-12, &format!("γ(σ={sigma})"));
        let back = gamma_to_sigma_rel(gamma, "gamma").unwrap();
        check_rel(back, f(case, "back"), 1e-12, &format!("σ(γ(σ={sigma}))"));
    }
}

#[test]
fn gamma_to_sigma_rel_matches_reference() {
    let data = fixture();
    for case in data["gamma_to_sigma_rel"].as_array().unwrap() {
        let gamma = f(case, "gamma");
        let sigma = gamma_to_sigma_rel(gamma, "gamma").unwrap();
        check_rel(sigma, f(case, "sigma_rel"), 1e-12, &format!("σ(γ={gamma})"));
    }
}

#[test]
fn inner_products_match_reference() {
    let data = fixture();
    for case in data["inner_products"].as_array().unwrap() {
        let profile = |t: &str, s: &str| Profile {
            nimg: f(case, t),
            gamma: sigma_rel_to_gamma(f(case, s), s).unwrap(),
        };
        let a = profile("a_nimg", "a_sigma_rel");
        let b = profile("b_nimg", "b_sigma_rel");
        check_rel(
            inner_product(a, b),
            f(case, "inner_product"),
            1e-12,
            &format!("{case}"),
        );
    }
}

#[test]
fn betas_match_reference() {
    let data = fixture();
    for case in data["betas"].as_array().unwrap() {
        let gamma = sigma_rel_to_gamma(f(case, "sigma_rel"), "sigma_rel").unwrap();
        let got = beta(gamma, f(case, "t_next"), f(case, "t_delta"));
        let expect = f(case, "beta");
        // β = 0 exactly when the update spans all of training so far.
        check_rel(got, expect, 1e-12, &format!("{case}"));
    }
}

#[test]
fn reconstructions_match_reference() {
    let data = fixture();
    let cases = data["reconstructions"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let snapshots: Vec<Snapshot> = case["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| Snapshot {
                nimg: s["nimg"].as_u64().unwrap(),
                width: Width::SigmaRel(f(s, "sigma_rel")),
            })
            .collect();
        let target_nimg = case["target_nimg"].as_u64().unwrap();
        let sigmas: Vec<f64> = case["target_sigma_rel"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let targets: Vec<Target> = sigmas
            .iter()
            .map(|&s| Target {
                width: Width::SigmaRel(s),
                nimg: Some(target_nimg),
            })
            .collect();
        let used: Vec<usize> = case["used_snapshot_indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let solved = phema::solve(&snapshots, &targets, &SolveOptions::default()).unwrap();
        let coefficients = case["coefficients"].as_array().unwrap();
        let errors = case["relative_profile_error"].as_array().unwrap();
        for (j, sol) in solved.iter().enumerate() {
            assert_eq!(sol.used_snapshots, used.len(), "{name}");
            let expect: Vec<f64> = coefficients[j]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let scale = expect.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let mut worst = 0.0f64;
            for (k, &i) in used.iter().enumerate() {
                worst = worst.max((sol.coefficients[i] - expect[k]).abs() / scale);
            }
            // Snapshots that are not used get exactly zero weight.
            for (i, w) in sol.coefficients.iter().enumerate() {
                if !used.contains(&i) {
                    assert_eq!(*w, 0.0, "{name}: unused snapshot {i}");
                }
            }
            let err_expect = errors[j].as_f64().unwrap();
            eprintln!(
                "{name} σ={}: coef diff {worst:.2e}, error {:.6e} vs {:.6e} (diff {:.1e}), cond {:.6e} vs {:.6e}, gain {:.3} l1 {:.3}",
                sigmas[j], sol.relative_error, err_expect, (sol.relative_error - err_expect).abs(),
                sol.condition_number, f(case, "gram_condition_number"), sol.noise_gain, sol.coefficient_l1
            );
            assert!(
                worst <= 1e-9,
                "{name} σ={}: coefficients differ by {worst:e} of max",
                sigmas[j]
            );
            assert!(
                (sol.relative_error - err_expect).abs() <= 1e-9,
                "{name} σ={}: profile error {} vs {err_expect}",
                sigmas[j],
                sol.relative_error
            );
            check_rel(
                sol.condition_number,
                f(case, "gram_condition_number"),
                1e-6,
                &format!("{name}: condition number"),
            );
        }
    }
}
