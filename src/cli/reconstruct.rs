//! `hindsight reconstruct`: weights for any EMA length into a directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use hindsight::app::DataDir;
use hindsight::materialize::OutDtype;
use hindsight::phema::request::TargetSpec;
use hindsight::reconstruction::{reconstruct_to_dir, ExportOptions, Exported};

use super::common::{bar, block_on, print_json, print_table};
use super::solve::TargetArgs;

/// Options of `hindsight reconstruct`.
#[derive(clap::Args)]
pub struct ReconstructArgs {
    /// The run.
    #[arg(long)]
    run: String,
    /// The targets.
    #[command(flatten)]
    targets: TargetArgs,
    /// Element type of the reconstructed floating-point tensors.
    #[arg(long, default_value = "f32", value_parser = dtype_parser())]
    dtype: OutDtype,
    /// Directory to write into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// The quality report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Do not hash the snapshots while reading them (faster; damage then goes unnoticed
    /// until `hindsight verify`).
    #[arg(long)]
    no_verify: bool,
    /// Compute even when the store already holds the reconstruction.
    #[arg(long)]
    recompute: bool,
    /// Write independent copies instead of hard links to the store's read-only files.
    #[arg(long)]
    copy: bool,
    /// Clamp values beyond the output type's range (f16: ±65504) to it instead of refusing
    /// the reconstruction; the report and the file's metadata list the clamped tensors.
    #[arg(long)]
    clamp_out_of_range: bool,
    /// Float tensors the snapshots declare as buffers (`hindsight.buffers` in their
    /// metadata): `average` them like the parameters, or `copy` them from the newest
    /// snapshot with a non-zero weight, as EDM2's reconstruct_phema.py does.
    #[arg(long, value_name = "RULE", default_value = "average", value_parser = ["average", "copy"])]
    buffers: String,
    /// Print the process's peak resident memory to stderr at the end (benchmarks).
    #[arg(long, hide = true)]
    report_peak_rss: bool,
}

/// `--dtype`: the output types by name, each with its description in `--help`.
fn dtype_parser() -> impl TypedValueParser<Value = OutDtype> {
    PossibleValuesParser::new(
        OutDtype::ALL.map(|d| PossibleValue::new(d.as_str()).help(d.describe())),
    )
    .map(|name| {
        name.parse::<OutDtype>()
            .expect("one of the possible values")
    })
}

/// Reconstructs, prints the quality report, and says what was written.
pub fn run(data_dir: &Path, args: ReconstructArgs) -> anyhow::Result<()> {
    let targets = args.targets.required()?;
    let options = ExportOptions {
        verify: !args.no_verify,
        recompute: args.recompute,
        copy: args.copy,
        clamp: args.clamp_out_of_range,
        buffers: if args.buffers == "copy" {
            hindsight::materialize::Buffers::Copy
        } else {
            hindsight::materialize::Buffers::Average
        },
    };
    let exported = export(data_dir, &args.run, targets, args.dtype, &args.out, options)?;
    if args.report_peak_rss {
        eprintln!(
            "peak_rss_kib {}",
            hindsight::bench::peak_rss_kib().unwrap_or(0)
        );
    }
    if args.json {
        print_json(&hindsight::phema::request::SolveResponse::from(
            exported.solutions,
        ))
    } else {
        Ok(print_table(&exported.solutions)?)
    }
}

/// [`reconstruct_to_dir`] with a progress bar and a line saying what was written (shared
/// with the demo).
pub fn export(
    data_dir: &Path,
    run: &str,
    targets: Vec<TargetSpec>,
    dtype: OutDtype,
    out: &Path,
    options: ExportOptions,
) -> anyhow::Result<Exported> {
    let progress = bar(
        "reconstructing",
        "reconstructing {msg} {bar:30} {binary_bytes}/{binary_total_bytes} \
         {binary_bytes_per_sec} eta {eta}",
    );
    let exported = block_on(async {
        let data = DataDir::open(data_dir).await?;
        Ok(reconstruct_to_dir(
            &data,
            run,
            targets,
            dtype,
            out,
            options,
            Arc::new(progress.clone()),
        )
        .await?)
    })?;
    progress.finish_and_clear();
    for (file, report) in exported.files.iter().zip(&exported.reports) {
        for c in &report.clamped {
            eprintln!(
                "{}: tensor {} had {} value(s) beyond {}'s range (largest magnitude {}), \
                 clamped to its largest finite value",
                file.display(),
                c.tensor,
                c.elements,
                dtype.as_str(),
                serde_json::json!(c.max_abs)
            );
        }
    }
    eprintln!(
        "wrote {} file(s) to {} ({} computed, {} already in the store; {} hard-linked \
         to the store's read-only copy)",
        exported.files.len(),
        out.display(),
        exported.computed,
        exported.reused,
        exported.linked
    );
    Ok(exported)
}
