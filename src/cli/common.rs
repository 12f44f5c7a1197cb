//! What every command shares: the async runtime, and printing for people and machines (the
//! quality-report table, JSON lines, sizes, progress bars).

use std::io::Write;

use hindsight::phema::TargetSolution;
use indicatif::{ProgressBar, ProgressStyle};

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Writes `value` as one line of JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// The quality report of solved targets as a table, one row per target.
pub fn print_table<'a>(
    solutions: impl IntoIterator<Item = &'a TargetSolution>,
) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>9} {:>9} {:>14} {:>5} {:>11} {:>9} {:>9} {:>9}  warnings",
        "sigma_rel", "gamma", "nimg", "used", "rel_error", "sum|w|", "gain", "cond"
    )?;
    for s in solutions {
        let warnings: Vec<String> = s
            .warnings
            .iter()
            .map(|w| serde_json::to_string(&w.code).unwrap_or_default())
            .collect();
        writeln!(
            out,
            "{:>9.4} {:>9.3} {:>14} {:>5} {:>11.3e} {:>9.3} {:>9.3} {:>9.2e}  {}",
            s.sigma_rel,
            s.gamma,
            s.nimg,
            s.used_snapshots,
            s.relative_error,
            s.coefficient_l1,
            s.noise_gain,
            s.condition_number,
            if warnings.is_empty() {
                "-".to_owned()
            } else {
                warnings.join(",").replace('"', "")
            }
        )?;
    }
    Ok(())
}

/// A progress bar with `template` (indicatif's syntax); hidden off a terminal.
pub fn bar(template: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
    bar
}

/// Runs an async command to completion on a fresh multi-threaded runtime.
pub fn block_on<T>(fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(fut)
}
