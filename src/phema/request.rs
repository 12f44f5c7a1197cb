//! JSON request and response shapes for solving, shared by `hindsight solve` and the server.
//!
//! ```text
//! in:  {"snapshots": [{"nimg": 8388608, "sigma_rel": 0.05}, ...],
//!       "targets":   [{"sigma_rel": 0.1, "nimg": 2147483648}, {"gamma": 6.94}],
//!       "options": {...}?, "profile_points": 200?}
//! out: {"targets": [{"sigma_rel", "gamma", "nimg", "coefficients", "used_snapshots",
//!                    "relative_error", "coefficient_l1", "noise_gain", "condition_number",
//!                    "warnings", "profile"?}]}
//! ```

use serde::{Deserialize, Serialize};

use super::solve::{
    sample_profiles_realised, solve_realised, ProfilePoint, Snapshot, SolveOptions, Target,
    TargetSolution, Width,
};
use super::tabulated::{RealisedProfile, Tabulated};
use crate::error::{Error, Result};

/// A snapshot as written in JSON: `nimg` and exactly one of `sigma_rel`, `gamma`; with
/// `profile`, the rule its EMA was really updated by (`{"kind": "ema_pytorch", …}`,
/// `"constant_beta"`, `"tabulated"`; see [`RealisedProfile`]), whose exact profile the solve
/// then uses. A `constant_beta` or `tabulated` snapshot may leave its width out.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSpec {
    /// Training time in images.
    pub nimg: u64,
    /// Relative standard deviation of the snapshot's EMA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_rel: Option<f64>,
    /// Exponent of the snapshot's EMA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<f64>,
    /// The update rule, when it is not EDM2's power-function rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<RealisedProfile>,
}

/// A target as written in JSON: exactly one of `sigma_rel`, `gamma`; `nimg` optional.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// Relative standard deviation to reconstruct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_rel: Option<f64>,
    /// Exponent to reconstruct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<f64>,
    /// Training time; defaults to the last snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nimg: Option<u64>,
}

impl From<&Snapshot> for SnapshotSpec {
    fn from(s: &Snapshot) -> Self {
        let (sigma_rel, gamma) = match s.width {
            Width::SigmaRel(v) => (Some(v), None),
            Width::Gamma(v) => (None, Some(v)),
        };
        SnapshotSpec {
            nimg: s.nimg,
            sigma_rel,
            gamma,
            profile: None,
        }
    }
}

impl TargetSpec {
    /// A target of `width` at `nimg` (the last snapshot when `None`).
    pub fn new(width: Width, nimg: Option<u64>) -> Self {
        let (sigma_rel, gamma) = match width {
            Width::SigmaRel(v) => (Some(v), None),
            Width::Gamma(v) => (None, Some(v)),
        };
        TargetSpec {
            sigma_rel,
            gamma,
            nimg,
        }
    }

    /// One target per σ_rel, then one per γ, all at `nimg`: how the command line
    /// (`--sigma-rel`, `--gamma`, `--at-nimg`) and `POST /reconstruct` name targets.
    pub fn from_lists(sigma_rels: &[f64], gammas: &[f64], nimg: Option<u64>) -> Vec<Self> {
        let sigma_rels = sigma_rels.iter().map(|&v| Width::SigmaRel(v));
        let gammas = gammas.iter().map(|&v| Width::Gamma(v));
        sigma_rels
            .chain(gammas)
            .map(|w| TargetSpec::new(w, nimg))
            .collect()
    }
}

impl From<&Target> for TargetSpec {
    fn from(t: &Target) -> Self {
        TargetSpec::new(t.width, t.nimg)
    }
}

/// The body of a solve request.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SolveRequest {
    /// The stored snapshots.
    pub snapshots: Vec<SnapshotSpec>,
    /// The profiles to reconstruct.
    #[serde(default)]
    pub targets: Vec<TargetSpec>,
    /// Warning thresholds; defaults if absent.
    #[serde(default)]
    pub options: Option<SolveOptions>,
    /// When set, each result carries the target and reconstructed profiles sampled at this many
    /// evenly spaced times (2 to 2000), for plotting.
    #[serde(default)]
    pub profile_points: Option<usize>,
}

/// One target's result as written in JSON.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct TargetOutput {
    /// The solution and its quality report.
    #[serde(flatten)]
    pub solution: TargetSolution,
    /// Sampled profiles, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Vec<ProfilePoint>>,
}

/// The body of a solve response.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct SolveResponse {
    /// One entry per requested target, in request order.
    pub targets: Vec<TargetOutput>,
}

impl From<Vec<TargetSolution>> for SolveResponse {
    /// A response without sampled profiles.
    fn from(solutions: Vec<TargetSolution>) -> Self {
        SolveResponse {
            targets: solutions
                .into_iter()
                .map(|solution| TargetOutput {
                    solution,
                    profile: None,
                })
                .collect(),
        }
    }
}

fn width(sigma_rel: Option<f64>, gamma: Option<f64>, field: &str) -> Result<Width> {
    match (sigma_rel, gamma) {
        (Some(s), None) => Ok(Width::SigmaRel(s)),
        (None, Some(g)) => Ok(Width::Gamma(g)),
        (Some(_), Some(_)) => Err(Error::invalid(
            field,
            "give either sigma_rel or gamma, not both",
        )),
        (None, None) => Err(Error::invalid(field, "missing sigma_rel (or gamma)")),
    }
}

impl SolveRequest {
    /// Parses a request from JSON text; errors name the offending field
    /// (e.g. `targets[1].nimg: invalid type: string "x", expected u64`).
    pub fn from_json(text: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "request".to_owned()
            } else {
                path
            };
            Error::invalid(field, e.into_inner().to_string())
        })
    }

    /// The snapshots as the solver takes them (validating that each gives one width).
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        Ok(self.realised()?.0)
    }

    /// The snapshots and their realised profiles (`None`: the power function of the width),
    /// as [`solve_realised`] takes them. A snapshot without a width but with a profile that
    /// needs none is labelled with the profile's own σ_rel.
    pub fn realised(&self) -> Result<(Vec<Snapshot>, Vec<Option<Tabulated>>)> {
        let mut snapshots = Vec::with_capacity(self.snapshots.len());
        let mut tables = Vec::with_capacity(self.snapshots.len());
        for (i, s) in self.snapshots.iter().enumerate() {
            let field = format!("snapshots[{i}]");
            let (width, table) = match (&s.profile, s.sigma_rel, s.gamma) {
                (Some(profile), None, None) => {
                    let table = profile.realise(s.nimg, None, &field)?;
                    // A label only: ordering and duplicates.
                    let label = table.sigma_rel().clamp(1e-6, 0.288);
                    (Width::SigmaRel(label), Some(table))
                }
                (profile, sigma_rel, gamma) => {
                    let width = width(sigma_rel, gamma, &field)?;
                    let table = match profile {
                        Some(p) => {
                            let (_, gamma) = width.resolve(&field)?;
                            Some(p.realise(s.nimg, Some(gamma), &field)?)
                        }
                        None => None,
                    };
                    (width, table)
                }
            };
            snapshots.push(Snapshot {
                nimg: s.nimg,
                width,
            });
            tables.push(table);
        }
        Ok((snapshots, tables))
    }

    /// Validates and solves.
    pub fn solve(&self) -> Result<SolveResponse> {
        let (snapshots, realised) = self.realised()?;
        let targets = self
            .targets
            .iter()
            .enumerate()
            .map(|(j, t)| {
                Ok(Target {
                    width: width(t.sigma_rel, t.gamma, &format!("targets[{j}]"))?,
                    nimg: t.nimg,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if targets.is_empty() {
            return Err(Error::invalid("targets", "at least one target is needed"));
        }
        if let Some(p) = self.profile_points {
            if !(2..=2000).contains(&p) {
                return Err(Error::invalid(
                    "profile_points",
                    format!("{p} is out of range: use 2 to 2000"),
                ));
            }
        }
        let options = self.options.unwrap_or_default();
        let solutions = solve_realised(&snapshots, &realised, &targets, &options)?;
        let targets = solutions
            .into_iter()
            .map(|solution| {
                let profile = match self.profile_points {
                    Some(p) => Some(sample_profiles_realised(
                        &snapshots, &realised, &solution, 0.0, p,
                    )?),
                    None => None,
                };
                Ok(TargetOutput { solution, profile })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SolveResponse { targets })
    }
}
