//! `hindsight import | runs | snapshots`: the store from the command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use hindsight::app::DataDir;
use hindsight::ingest::{import_dir, IngestOptions, Source};

use super::common::{bar, block_on, human_bytes, print_json};

/// Input formats of `hindsight import`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// safetensors files named the EDM2 way or carrying nimg and sigma_rel in __metadata__.
    Safetensors,
    /// ema-pytorch PostHocEMA checkpoint folders.
    EmaPytorch,
    /// NVlabs/edm2's own files: network-snapshot-*.pkl (phema-*.pkl when given as the file),
    /// or the EMAs of training-state-*.pt; read without running anything.
    Edm2,
}

/// Options of `hindsight import`.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// Directory holding the snapshot files.
    dir: PathBuf,
    /// Run to import into.
    #[arg(long)]
    run: String,
    /// Refuse files whose floating-point tensors hold NaN or Inf.
    #[arg(long)]
    check_finite: bool,
    /// `safetensors` (EDM2 names or metadata), `ema-pytorch` (PostHocEMA checkpoint folders:
    /// {index}.{step}.pt) or `edm2` (NVlabs/edm2's network-snapshot-<kimg>-<std>.pkl; in a
    /// folder without those, the EMAs of its training-state-<kimg>.pt; a phema-*.pkl
    /// reconstruction only when given as the file). Pickles are read without running anything:
    /// a pickle naming any global EDM2 does not use (os.system, …) is refused. Time from
    /// the name, as EDM2 maps it back: nimg = (kimg·1000 + 999) // 1024 · 1024. Default:
    /// safetensors, or edm2 when the folder (or file) holds EDM2's files and no .safetensors.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// ema-pytorch: the sigma_rels of the EMA indices, in order (e.g. 0.05,0.28).
    #[arg(long, value_name = "LIST")]
    sigma_rels: Option<String>,
    /// ema-pytorch: training images per EMA step (time = step × this).
    #[arg(long, value_name = "N")]
    images_per_step: Option<u64>,
    /// ema-pytorch: the `update_every` its EMAs used (ema-pytorch's default is 100). Its EMAs
    /// are the power functions their sigma_rels name only with 1; hindsight computes the
    /// profile they really have from this, and the quality report tells the truth.
    #[arg(long, value_name = "K")]
    update_every: Option<u64>,
}

impl ImportArgs {
    /// The source the flags describe, with the ema-pytorch flags required for that format
    /// and refused for the other.
    fn source(&self) -> anyhow::Result<Source> {
        let format = self.format.unwrap_or_else(|| detect_format(&self.dir));
        match format {
            Format::Safetensors | Format::Edm2 => {
                if self.sigma_rels.is_some()
                    || self.images_per_step.is_some()
                    || self.update_every.is_some()
                {
                    bail!(
                        "--sigma-rels, --images-per-step and --update-every apply to --format \
                         ema-pytorch only"
                    );
                }
                Ok(if format == Format::Edm2 {
                    Source::Edm2
                } else {
                    Source::Safetensors
                })
            }
            Format::EmaPytorch => {
                let list = self.sigma_rels.as_deref().context(
                    "--format ema-pytorch needs --sigma-rels: the sigma_rel of each EMA index, in order",
                )?;
                let widths = list
                    .split(',')
                    .map(|token| {
                        token
                            .trim()
                            .parse::<f64>()
                            .with_context(|| format!("--sigma-rels: `{token}` is not a number"))
                    })
                    .collect::<anyhow::Result<Vec<f64>>>()?;
                let images_per_step = self.images_per_step.context(
                    "--format ema-pytorch needs --images-per-step: ema-pytorch counts steps, hindsight counts images",
                )?;
                let update_every = self.update_every.context(
                    "--format ema-pytorch needs --update-every: the update_every its EMAs were \
                     made with (ema-pytorch's default is 100; its EMAs are what their sigma_rels \
                     say only with 1)",
                )?;
                Source::ema_pytorch(&widths, images_per_step, update_every).map_err(|e| match e {
                    hindsight::Error::InvalidInput { field, reason } => {
                        anyhow::anyhow!("--{}: {reason}", field.replace('_', "-"))
                    }
                    other => other.into(),
                })
            }
        }
    }
}

/// The format of `hindsight import` without `--format`: `edm2` when `dir` is one of EDM2's
/// files, or a folder with EDM2's files and no `.safetensors`; `safetensors` otherwise.
fn detect_format(dir: &Path) -> Format {
    let name_of = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .unwrap_or_default()
    };
    let is_edm2 = |p: &Path| hindsight::ingest::parse_edm2_file_name(&name_of(p)).is_some();
    if dir.is_file() {
        return if is_edm2(dir) {
            Format::Edm2
        } else {
            Format::Safetensors
        };
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Format::Safetensors;
    };
    let files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    let safetensors = files
        .iter()
        .any(|p| p.extension().is_some_and(|e| e == "safetensors"));
    let edm2 = files.iter().filter(|p| is_edm2(p)).count();
    if !safetensors && edm2 > 0 {
        Format::Edm2
    } else {
        if edm2 > 0 {
            eprintln!(
                "note: {} holds .safetensors files, which are imported; its {edm2} EDM2 \
                 file(s) (.pkl, training-state-*.pt) are not — import those with --format edm2",
                dir.display()
            );
        }
        Format::Safetensors
    }
}

/// `hindsight import`.
pub fn import(data_dir: &Path, args: ImportArgs) -> anyhow::Result<()> {
    let source = args.source()?;
    let options = IngestOptions {
        check_finite: args.check_finite,
    };
    import_files(data_dir, &args.dir, &args.run, &source, options)
}

/// Imports a directory with a progress bar, printing refusals as they happen and a summary
/// line; fails when a file was refused (shared with the demo).
pub fn import_files(
    data_dir: &Path,
    dir: &Path,
    run: &str,
    source: &Source,
    options: IngestOptions,
) -> anyhow::Result<()> {
    block_on(async {
        let data = DataDir::open(data_dir).await?;
        let progress = bar(
            "importing",
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        );
        let report =
            import_dir(&data, dir, run, source, options, Arc::new(progress.clone())).await?;
        progress.finish_and_clear();
        println!(
            "run {run}: {} imported, {} already present, {} refused; {} in {:.1} s ({}/s)",
            report.inserted,
            report.present,
            report.refused.len(),
            human_bytes(report.bytes),
            report.secs,
            human_bytes((report.bytes as f64 / report.secs.max(1e-9)) as u64)
        );
        if !report.refused.is_empty() {
            if report.run_removed {
                eprintln!("run {run:?} was not created: nothing was imported");
            }
            let names: Vec<&str> = report.refused.iter().map(|(n, _)| n.as_str()).collect();
            bail!("{} file(s) refused: {}", names.len(), names.join(", "));
        }
        Ok(())
    })
}

/// Options of `hindsight runs`.
#[derive(clap::Args)]
pub struct RunsArgs {
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Lists the runs.
pub fn runs(data_dir: &Path, args: RunsArgs) -> anyhow::Result<()> {
    let runs = block_on(async { Ok(DataDir::open(data_dir).await?.db.runs().await?) })?;
    if args.json {
        return print_json(&runs);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<30} {:>9} {:>11} {:>14} {:>14}  created",
        "run", "snapshots", "size", "first nimg", "last nimg"
    )?;
    for r in runs {
        writeln!(
            out,
            "{:<30} {:>9} {:>11} {:>14} {:>14}  {}",
            r.name,
            r.snapshots,
            human_bytes(r.bytes as u64),
            r.first_nimg.map_or("-".into(), |v| v.to_string()),
            r.last_nimg.map_or("-".into(), |v| v.to_string()),
            r.created_at
        )?;
    }
    Ok(())
}

/// Options of `hindsight snapshots`.
#[derive(clap::Args)]
pub struct SnapshotsArgs {
    /// The run.
    run: String,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Delete the snapshot with this id (the first column of the listing) instead; its file
    /// leaves the store when nothing else refers to it.
    #[arg(long, value_name = "ID")]
    delete: Option<i64>,
}

/// Lists a run's snapshots.
pub fn snapshots(data_dir: &Path, args: SnapshotsArgs) -> anyhow::Result<()> {
    if let Some(id) = args.delete {
        let deleted = block_on(async {
            let data = DataDir::open(data_dir).await?;
            Ok(hindsight::app::delete_snapshot(&data, &args.run, id).await?)
        })?;
        if args.json {
            return print_json(&deleted);
        }
        let s = &deleted.snapshot;
        println!(
            "deleted snapshot {id} of run {:?} (nimg {}, sigma_rel {}, {}){}",
            args.run,
            s.nimg,
            s.sigma_rel,
            &s.digest[..16],
            if deleted.blob_removed {
                "; its file was removed from the store"
            } else {
                "; its file stays (other rows refer to it)"
            }
        );
        return Ok(());
    }
    let rows = block_on(async {
        let data = DataDir::open(data_dir).await?;
        let run = data.existing_run(&args.run).await?;
        Ok(data.db.snapshots(run.id).await?)
    })?;
    if args.json {
        return print_json(&rows);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>6} {:>14} {:>9} {:>8} {:>11} {:>8}  digest",
        "id", "nimg", "sigma_rel", "gamma", "size", "tensors"
    )?;
    for s in rows {
        writeln!(
            out,
            "{:>6} {:>14} {:>9.4} {:>8.3} {:>11} {:>8}  {}",
            s.id,
            s.nimg,
            s.sigma_rel,
            s.gamma,
            human_bytes(s.byte_size as u64),
            s.tensor_count,
            &s.digest[..16]
        )?;
    }
    Ok(())
}
