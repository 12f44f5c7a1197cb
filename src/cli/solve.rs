//! `hindsight solve`: coefficients and the quality report, from a JSON request or a stored
//! run.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use hindsight::phema::request::{SolveRequest, TargetSpec};
use hindsight::phema::{parse_float_list, parse_sigma_rel_list};

use super::common::{block_on, print_json, print_table};

/// Options of `hindsight solve`.
#[derive(clap::Args)]
pub struct SolveArgs {
    /// Print a table for people instead of JSON.
    #[arg(long)]
    table: bool,
    /// Targets on the command line (replacing the request's "targets", which may then be
    /// omitted).
    #[command(flatten)]
    targets: TargetArgs,
    /// Also draw each target's profile beside its reconstruction into this SVG file.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Take the snapshots from this stored run (in `hindsight snapshots RUN` order) instead
    /// of reading a request on stdin; targets come from --sigma-rel/--gamma.
    #[arg(long, value_name = "RUN")]
    run: Option<String>,
}

/// Targets given on the command line, in EDM2's list syntax.
#[derive(clap::Args)]
pub struct TargetArgs {
    /// Target widths as a list, e.g. `0.010,0.015,...,0.250`.
    #[arg(long, value_name = "LIST")]
    sigma_rel: Option<String>,
    /// Target widths as exponents γ, same list syntax (combined with --sigma-rel).
    #[arg(long, value_name = "LIST")]
    gamma: Option<String>,
    /// Training time of these targets (default: the last snapshot).
    #[arg(long, value_name = "NIMG")]
    at_nimg: Option<u64>,
}

impl TargetArgs {
    fn given(&self) -> bool {
        self.sigma_rel.is_some() || self.gamma.is_some()
    }

    /// The targets, validated; empty when none were given.
    pub fn parse(&self) -> anyhow::Result<Vec<TargetSpec>> {
        let sigma_rels = match &self.sigma_rel {
            Some(list) => parse_sigma_rel_list(list).context("--sigma-rel")?,
            None => Vec::new(),
        };
        let gammas = match &self.gamma {
            Some(list) => parse_float_list(list).context("--gamma")?,
            None => Vec::new(),
        };
        Ok(TargetSpec::from_lists(&sigma_rels, &gammas, self.at_nimg))
    }

    /// The targets; at least one must be given.
    pub fn required(&self) -> anyhow::Result<Vec<TargetSpec>> {
        let targets = self.parse()?;
        if targets.is_empty() {
            bail!("give the targets with --sigma-rel and/or --gamma");
        }
        Ok(targets)
    }
}

/// Solves and prints JSON (or a table), and draws the profiles when asked.
pub fn run(data_dir: &Path, args: SolveArgs) -> anyhow::Result<()> {
    let SolveArgs {
        table,
        targets,
        plot,
        run,
    } = args;
    let mut request = match run {
        Some(name) => {
            if !targets.given() {
                bail!("--run: give the targets with --sigma-rel and/or --gamma");
            }
            block_on(stored_snapshots(data_dir, &name))?
        }
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the request from stdin")?;
            SolveRequest::from_json(&text)?
        }
    };
    if targets.given() {
        if !request.targets.is_empty() {
            bail!("targets: given both in the request and on the command line; use one");
        }
        request.targets = targets.parse()?;
    } else if targets.at_nimg.is_some() {
        bail!("--at-nimg: only applies to --sigma-rel/--gamma targets");
    }
    let response = request.solve()?;
    if let Some(path) = plot {
        let solutions: Vec<_> = response
            .targets
            .iter()
            .map(|t| t.solution.clone())
            .collect();
        let (snapshots, realised) = request.realised()?;
        let svg = hindsight::plot::profiles_svg(&snapshots, &realised, &solutions)?;
        std::fs::write(&path, svg)
            .with_context(|| format!("--plot: writing {}", path.display()))?;
    }
    if table {
        print_table(response.targets.iter().map(|t| &t.solution))?;
    } else {
        print_json(&response)?;
    }
    Ok(())
}

/// A solve request holding a stored run's snapshots (and no targets yet).
async fn stored_snapshots(data_dir: &Path, run: &str) -> anyhow::Result<SolveRequest> {
    let data = hindsight::app::DataDir::open(data_dir).await?;
    let row = data.existing_run(run).await?;
    let snapshots = data.db.snapshots(row.id).await?;
    if snapshots.is_empty() {
        bail!("run {run:?} has no snapshots yet");
    }
    Ok(hindsight::reconstruction::solve_request(&snapshots)?)
}
