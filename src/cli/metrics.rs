//! `hindsight ref-stats`, `hindsight fid`, `hindsight references`: reference statistics and
//! metrics between image sets, in the shape pytorch-fid users know.

use std::path::{Path, PathBuf};

use anyhow::bail;
use hindsight::app::references::{self, ReferenceOrigin};
use hindsight::app::DataDir;
use hindsight::datasets::Dataset;
use hindsight::metrics::{frechet_distance_of, kid, statistics, FeatureExtractor, FeatureStats};

use super::common::{bar, block_on, print_json};

/// Options of `hindsight ref-stats`.
#[derive(clap::Args, Debug)]
pub struct RefStatsArgs {
    /// The image set: `fashion-mnist`, `fashion-mnist-test`, an `*-images-idx3-ubyte[.gz]`
    /// file, a folder or ZIP of PNGs (EDM2's dataset layout) — or a pytorch-fid `.npz` / EDM2
    /// `.pkl` to import as they are.
    pub dataset: String,
    /// Write pytorch-fid-compatible statistics here (`.npz` with `mu`, `sigma`, float64).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Store the statistics (and the features, for KID) in the data directory under this
    /// name, for sweeps to use.
    #[arg(long)]
    pub name: Option<String>,
    /// The Inception weights (default: $HINDSIGHT_FID_WEIGHTS, else the usual cache paths).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Use only the first N images of the set.
    #[arg(long)]
    pub max_images: Option<usize>,
    /// Images per Inception batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
}

/// Options of `hindsight fid`.
#[derive(clap::Args, Debug)]
pub struct FidArgs {
    /// One side: a dataset (as for ref-stats), a `.npz` / `.pkl` statistics file, or the name
    /// of stored reference statistics.
    pub a: String,
    /// The other side, likewise.
    pub b: String,
    /// The Inception weights (default: $HINDSIGHT_FID_WEIGHTS, else the usual cache paths).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Use only the first N images of each image set.
    #[arg(long)]
    pub max_images: Option<usize>,
    /// Images per Inception batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// KID: random subsets averaged.
    #[arg(long, default_value_t = 100)]
    pub kid_subsets: usize,
    /// KID: features per subset (at most; fewer when a side has fewer).
    #[arg(long, default_value_t = 1000)]
    pub kid_subset_size: usize,
    /// Print one line of JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Options of `hindsight references`.
#[derive(clap::Args, Debug)]
pub struct ReferencesArgs {
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn is_stats_file(s: &str) -> bool {
    s.ends_with(".npz") || s.ends_with(".pkl")
}

/// Features of a dataset with a progress bar.
fn dataset_features(
    extractor: &FeatureExtractor,
    source: &str,
    max_images: Option<usize>,
    batch: usize,
) -> anyhow::Result<(Dataset, Vec<f32>)> {
    let dataset = Dataset::open(source, 32, 0, 0)?;
    let progress = bar("features {bar:30} {pos}/{len} images {per_sec} ETA {eta} {msg}");
    progress.set_message(source.to_owned());
    let features = hindsight::model::on_compute_pool(|| {
        extractor.dataset_features(&dataset, max_images, batch, &progress)
    })?;
    progress.finish_and_clear();
    Ok((dataset, features))
}

/// Computes (or imports) reference statistics; writes them to --out and/or stores them.
pub fn ref_stats(data_dir: &Path, args: RefStatsArgs) -> anyhow::Result<()> {
    if args.out.is_none() && args.name.is_none() {
        bail!("say where the statistics go: --out FILE.npz and/or --name NAME (stored)");
    }
    if args.batch == 0 || args.max_images == Some(0) {
        bail!("--batch and --max-images must be positive");
    }
    if let Some(name) = &args.name {
        references::check_reference_name(name)?;
    }
    if let Some(out) = &args.out {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
        if parent.is_some_and(|p| !p.is_dir()) {
            bail!("--out {}: its directory does not exist", out.display());
        }
    }
    if is_stats_file(&args.dataset) {
        let path = Path::new(&args.dataset);
        let bytes =
            std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let stats = FeatureStats::parse(&bytes, &args.dataset)?;
        if let Some(out) = &args.out {
            write_npz(&stats, out)?;
        }
        if let Some(name) = args.name {
            let row = block_on(async {
                let data = DataDir::open(data_dir).await?;
                let origin = ReferenceOrigin {
                    name,
                    source: args.dataset.clone(),
                    resolution: None,
                    channels: None,
                };
                Ok(references::import(&data, origin, &bytes).await?)
            })?;
            eprintln!(
                "stored reference statistics {:?} (id {}, {}-d, imported: no features, so no KID)",
                row.name, row.id, row.dims
            );
        }
        return Ok(());
    }
    let extractor = FeatureExtractor::open(args.weights.as_deref())?;
    eprintln!("feature network: {}", extractor.identity());
    let started = std::time::Instant::now();
    let (dataset, features) =
        dataset_features(&extractor, &args.dataset, args.max_images, args.batch)?;
    let stats = statistics(&features, hindsight::metrics::FEATURES)?;
    let n = stats.count();
    eprintln!(
        "{n} images ({}×{}, {} channel(s)) in {:.1} s",
        dataset.resolution(),
        dataset.resolution(),
        dataset.channels(),
        started.elapsed().as_secs_f64()
    );
    if let Some(out) = &args.out {
        write_npz(&stats, out)?;
        eprintln!("wrote {}", out.display());
    }
    if let Some(name) = args.name {
        let source = match args.max_images {
            Some(m) if m < dataset.len() => format!("{} (first {m} images)", args.dataset),
            _ => args.dataset.clone(),
        };
        let origin = ReferenceOrigin {
            name,
            source,
            resolution: Some(dataset.resolution()),
            channels: Some(dataset.channels()),
        };
        let row = block_on(async {
            let data = DataDir::open(data_dir).await?;
            Ok(references::store_computed(&data, origin, &stats, &features, &extractor).await?)
        })?;
        eprintln!(
            "stored reference statistics {:?} (id {}) in {}",
            row.name,
            row.id,
            data_dir.display()
        );
    }
    Ok(())
}

fn write_npz(stats: &FeatureStats, out: &Path) -> anyhow::Result<()> {
    let tmp = out.with_extension("npz.partial");
    let file = std::fs::File::create(&tmp)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", tmp.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    stats.write_npz(&mut writer)?;
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(&tmp, out)
        .map_err(|e| anyhow::anyhow!("renaming into {}: {e}", out.display()))?;
    Ok(())
}

/// One side of `hindsight fid`: statistics, and features where it is an image set (or a
/// stored reference that kept them).
struct Side {
    stats: FeatureStats,
    features: Option<Vec<f32>>,
}

fn side(
    data_dir: &Path,
    source: &str,
    extractor: &mut Option<FeatureExtractor>,
    args: &FidArgs,
) -> anyhow::Result<Side> {
    if is_stats_file(source) {
        return Ok(Side {
            stats: FeatureStats::read(Path::new(source))?,
            features: None,
        });
    }
    let looks_like_data = Path::new(source).exists() || source.starts_with("fashion-mnist");
    if !looks_like_data && data_dir.join(hindsight::app::INDEX_FILE).exists() {
        let stored = block_on(async {
            let data = DataDir::open(data_dir).await?;
            match references::find(&data, source).await {
                Ok(row) => Ok(Some((
                    references::stats(&data, &row).await?,
                    references::features(&data, &row).await?,
                ))),
                Err(hindsight::Error::NotFound(_)) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })?;
        if let Some((stats, features)) = stored {
            return Ok(Side { stats, features });
        }
    }
    if extractor.is_none() {
        let e = FeatureExtractor::open(args.weights.as_deref())?;
        eprintln!("feature network: {}", e.identity());
        *extractor = Some(e);
    }
    let e = extractor.as_ref().expect("opened above");
    let (_, features) = dataset_features(e, source, args.max_images, args.batch)?;
    Ok(Side {
        stats: statistics(&features, hindsight::metrics::FEATURES)?,
        features: Some(features),
    })
}

/// FID (and KID where both sides have features) between two sets.
pub fn fid(data_dir: &Path, args: FidArgs) -> anyhow::Result<()> {
    if args.batch == 0 || args.max_images == Some(0) {
        bail!("--batch and --max-images must be positive");
    }
    let mut extractor = None;
    let a = side(data_dir, &args.a, &mut extractor, &args)?;
    let b = side(data_dir, &args.b, &mut extractor, &args)?;
    if a.stats.dims() != b.stats.dims() {
        bail!(
            "{} has {}-d statistics and {} {}-d ones; they come from different networks",
            args.a,
            a.stats.dims(),
            args.b,
            b.stats.dims()
        );
    }
    let started = std::time::Instant::now();
    let fid = frechet_distance_of(&a.stats, &b.stats)?;
    let fid_seconds = started.elapsed().as_secs_f64();
    let kid = match (&a.features, &b.features) {
        (Some(x), Some(y)) => Some(kid(
            x,
            y,
            a.stats.dims(),
            args.kid_subsets,
            args.kid_subset_size,
            0,
        )?),
        _ => None,
    };
    if args.json {
        return print_json(&serde_json::json!({
            "a": args.a, "b": args.b,
            "count_a": a.stats.count(), "count_b": b.stats.count(),
            "fid": fid, "kid": kid, "fid_seconds": fid_seconds,
        }));
    }
    println!("FID  {fid:.4}");
    match kid {
        Some(k) => println!(
            "KID  {:.6} ± {:.6} ({} subsets of {})",
            k.mean, k.std_error, k.subsets, k.subset_size
        ),
        None => {
            println!("KID  - (needs features on both sides; statistics files have none)")
        }
    }
    Ok(())
}

/// Lists stored reference statistics.
pub fn list(data_dir: &Path, args: ReferencesArgs) -> anyhow::Result<()> {
    let rows = block_on(async {
        let data = DataDir::open(data_dir).await?;
        Ok(data.db.references().await?)
    })?;
    if args.json {
        for r in &rows {
            print_json(r)?;
        }
        return Ok(());
    }
    println!(
        "{:>4}  {:<24} {:>7} {:>5} {:>4}  {:<12} source",
        "id", "name", "images", "dims", "KID", "weights"
    );
    for r in rows {
        println!(
            "{:>4}  {:<24} {:>7} {:>5} {:>4}  {:<12} {}",
            r.id,
            r.name,
            r.count,
            r.dims,
            if r.features_digest.is_some() {
                "yes"
            } else {
                "no"
            },
            r.weights_digest
                .as_deref()
                .map_or("imported".to_owned(), |d| d[..12].to_owned()),
            r.source
        );
    }
    Ok(())
}
