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

/// A progress bar for the work `stage` ("training", "importing", …) drawn with `template`
/// (indicatif's syntax) on a terminal. When stderr is not a terminal (a log file, a pipe, a
/// service manager) the bar is hidden and a plain line goes to stderr every
/// [`log_interval`] instead — `[stage] done/total (percent), rate, ETA, message` — so that
/// long work in a log is never silent for longer than that. Amounts are bytes when the
/// template counts bytes, else the word after `{len}` in the template ("images", "steps").
pub fn bar(stage: &str, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let unit = if template.contains("bytes}") {
            LineUnit::Bytes
        } else {
            let word = template
                .split("{len}")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .filter(|w| w.chars().all(|c| c.is_ascii_alphabetic()))
                .unwrap_or("");
            LineUnit::Count(word.to_owned())
        };
        log_lines(stage.to_owned(), unit, bar.downgrade(), log_interval());
    }
    bar
}

/// Seconds between plain progress lines off a terminal: `HINDSIGHT_PROGRESS_SECS` (at least
/// 1), else 15.
pub fn log_interval() -> std::time::Duration {
    let secs = std::env::var("HINDSIGHT_PROGRESS_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&s| s >= 1)
        .unwrap_or(15);
    std::time::Duration::from_secs(secs)
}

/// What a progress line counts.
enum LineUnit {
    Bytes,
    /// Items, named by the word (may be empty).
    Count(String),
}

impl LineUnit {
    fn amount(&self, n: f64) -> String {
        match self {
            LineUnit::Bytes => human_bytes(n as u64),
            LineUnit::Count(_) => format!("{}", n.round() as u64),
        }
    }

    fn word(&self) -> &str {
        match self {
            LineUnit::Bytes => "",
            LineUnit::Count(w) => w,
        }
    }
}

/// One progress line: `[stage] 120/500 images (24%), 3.1 images/s, ETA 2m03s, message`.
fn progress_line(stage: &str, unit: &LineUnit, bar: &ProgressBar) -> String {
    let pos = bar.position();
    let mut line = format!("[{stage}] {}", unit.amount(pos as f64));
    let word = unit.word();
    match bar.length().filter(|&l| l > 0) {
        Some(len) => {
            line.push_str(&format!("/{}", unit.amount(len as f64)));
            if !word.is_empty() {
                line.push_str(&format!(" {word}"));
            }
            line.push_str(&format!(" ({:.0}%)", 100.0 * pos as f64 / len as f64));
        }
        None if !word.is_empty() => line.push_str(&format!(" {word}")),
        None => {}
    }
    let rate = bar.per_sec();
    if rate.is_finite() && rate > 0.0 {
        match unit {
            LineUnit::Bytes => line.push_str(&format!(", {}/s", human_bytes(rate as u64))),
            LineUnit::Count(w) => {
                let per = if w.is_empty() {
                    "/s".to_owned()
                } else {
                    format!(" {w}/s")
                };
                line.push_str(&format!(", {rate:.1}{per}"));
            }
        }
        if let Some(len) = bar.length().filter(|&l| l > pos) {
            let eta = ((len - pos) as f64 / rate).round() as u64;
            line.push_str(&format!(", ETA {}m{:02}s", eta / 60, eta % 60));
        }
    }
    let message = bar.message();
    if !message.trim().is_empty() {
        line.push_str(&format!(", {}", message.trim()));
    }
    line
}

/// Prints [`progress_line`] to stderr every `every` until the bar is finished or dropped (a
/// detached thread holding only a weak reference).
fn log_lines(
    stage: String,
    unit: LineUnit,
    bar: indicatif::WeakProgressBar,
    every: std::time::Duration,
) {
    let step = std::time::Duration::from_millis(200).min(every);
    std::thread::Builder::new()
        .name("progress-lines".into())
        .spawn(move || {
            let mut waited = std::time::Duration::ZERO;
            loop {
                std::thread::sleep(step);
                waited += step;
                let Some(bar) = bar.upgrade() else { return };
                if bar.is_finished() {
                    return;
                }
                if waited >= every {
                    waited = std::time::Duration::ZERO;
                    eprintln!("{}", progress_line(&stage, &unit, &bar));
                }
            }
        })
        .ok();
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
