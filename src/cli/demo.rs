//! `hindsight demo`: the main job on a fresh machine, end to end.

use std::path::{Path, PathBuf};

use hindsight::ingest::{IngestOptions, Source};
use hindsight::materialize::OutDtype;
use hindsight::phema::request::TargetSpec;
use hindsight::reconstruction::ExportOptions;

use super::common::{bar, print_table};

/// Options of `hindsight demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Parameters per snapshot.
    #[arg(long, default_value_t = 2_000_000)]
    params: u64,
    /// Snapshots (half at each width).
    #[arg(long, default_value_t = 32)]
    snapshots: usize,
    /// Where the reconstructed weights go.
    #[arg(long, default_value = "reconstructions")]
    out: PathBuf,
}

/// Generates, imports, reconstructs, and says what to do next.
pub fn run(data_dir: &Path, args: DemoArgs) -> anyhow::Result<()> {
    let input = data_dir.join("demo-snapshots");
    let progress = bar("generating {bar:30} {pos}/{len}");
    hindsight::bench::ensure_synthetic_snapshots(&input, args.snapshots, args.params, &progress)?;
    progress.finish_and_clear();
    let options = IngestOptions { check_finite: true };
    super::store::import_files(data_dir, &input, "demo", &Source::Safetensors, options)?;
    let sigma_rels = hindsight::phema::parse_sigma_rel_list("0.050,0.075,...,0.250")?;
    let exported = super::reconstruct::export(
        data_dir,
        "demo",
        TargetSpec::from_lists(&sigma_rels, &[], None),
        OutDtype::F16,
        &args.out,
        ExportOptions::default(),
    )?;
    print_table(&exported.solutions)?;
    eprintln!(
        "\nnext: `hindsight serve` and POST /reconstruct {{\"run\": \"demo\", \"sigma_rel\": 0.13}} \
         (see README), or `hindsight reconstruct --run demo --sigma-rel LIST --out DIR`"
    );
    Ok(())
}
