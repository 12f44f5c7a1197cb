//! Post-hoc EMA mathematics: power-function profiles, the least-squares solve, and the
//! trainer-side tracker.
//!
//! Everything here follows Karras et al., "Analyzing and Improving the Training Dynamics of
//! Diffusion Models" (EDM2, CVPR 2024, arXiv 2312.02696), Appendix C; equation numbers refer to
//! the arXiv version. Times are training images (`nimg`) throughout.
//!
//! The module is pure: `f64` in, `f64` out, no I/O, no async, no candle.
//!
//! - [`profile`]: σ_rel ↔ γ (eqs. 123, 126), inner products (eq. 151), tracking β (eq. 127).
//! - [`solve()`]: the Gram system of Algorithm 3 for many targets at once, with a quality report.
//! - [`Tabulated`]: the profiles of EMAs updated by other rules (ema-pytorch's
//!   `update_every`, constant-β EMAs), exactly, for [`solve_realised`].
//! - [`PowerEma`]: EMAs of named `f32` tensors, exact for any update interval.
//! - [`parse_sigma_rel_list`]: EDM2's `0.010,0.015,...,0.250` list syntax.
//! - [`request`]: the JSON shapes of `hindsight solve` (shared with the HTTP server).

mod kernels;
mod linalg;
pub mod profile;
pub mod request;
mod sigma_list;
mod solve;
mod tabulated;
mod tracker;

pub use profile::{
    beta, check_nimg, gamma_to_sigma_rel, inner_product, sigma_rel_to_gamma, Profile, GAMMA_MAX,
    MAX_NIMG, SIGMA_REL_MAX, SIGMA_REL_MIN,
};
pub use sigma_list::{
    parse_float_list, parse_float_list_at_most, parse_sigma_rel_list, parse_sigma_rel_list_at_most,
    MAX_LIST_VALUES,
};
pub use solve::{
    sample_profiles, sample_profiles_realised, solve, solve_realised, ProfilePoint, Snapshot,
    SolveOptions, Target, TargetSolution, Warning, WarningCode, Width, MAX_SNAPSHOTS, MAX_TARGETS,
};
pub use tabulated::{RealisedProfile, Tabulated, MAX_PIECES};
pub use tracker::{realised_sigma_rel, PowerEma, TrackedEma, DEFAULT_SIGMA_RELS};
