//! `hindsight ref-stats`, `hindsight fid`, `hindsight references`: reference statistics and
//! metrics between image sets, in the shape pytorch-fid users know.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::bail;
use hindsight::app::references::{self, ReferenceOrigin};
use hindsight::app::DataDir;
use hindsight::datasets::Dataset;
use hindsight::metrics::kid::KidMethod;
use hindsight::metrics::{frechet_distance_of, kid, statistics, FeatureExtractor, FeatureStats};

use super::common::{bar, block_on, print_json};

/// Options of `hindsight ref-stats`.
#[derive(clap::Args, Debug)]
pub struct RefStatsArgs {
    /// The image set: `fashion-mnist`, `fashion-mnist-test`, an `*-images-idx3-ubyte[.gz]`
    /// file, a folder or ZIP of images (PNG, JPEG, WebP, BMP, TIFF, GIF, …; EDM2's dataset
    /// layout) — or a pytorch-fid `.npz`, an EDM2 `.pkl` or a `.npy` of a pickled {'mu',
    /// 'sigma'} dict to import as they are.
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
    /// Use the fallback feature network, a fixed random projection of the pixels, instead of
    /// Inception (for machines without the weights). Sweeps against these statistics report
    /// Fréchet distance and KID on pixel projections: NOT FID, never comparable with it.
    #[arg(long, conflicts_with = "weights")]
    pub pixel_projection: bool,
}

/// Options of `hindsight fid`.
#[derive(clap::Args, Debug)]
pub struct FidArgs {
    /// One side: a dataset (as for ref-stats), a `.npz` / `.pkl` / `.npy` statistics file, or
    /// the name of stored reference statistics.
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
    /// KID: features per subset (at most). When a side has no more than this, subsets would
    /// all be that whole side: KID is then one estimate on the whole sets, with a jackknife
    /// standard error (and a warning saying so).
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

/// Says on stderr what was read from an image folder: `SOURCE: 64 images (32 PNG, 32 JPEG)`,
/// as a warning naming the files skipped when there are any, and a note per conversion
/// (alpha dropped, 16-bit grey clipped, CMYK). Returns the warning, if any.
fn report_folder(dataset: &Dataset, source: &str) -> Option<String> {
    let folder = dataset.folder()?;
    let report = folder.report();
    for note in report.notes() {
        eprintln!("note: {source}: {note}");
    }
    match report.skipped_summary() {
        Some(skipped) => {
            let warning = format!("{source}: {}; {skipped}", folder.summary());
            eprintln!("warning: {warning}");
            Some(warning)
        }
        None => {
            eprintln!("{source}: {}", folder.summary());
            None
        }
    }
}

/// Whether a side names a statistics file: `.npz`, `.pkl` or `.npy` (read by content, so a
/// misnamed one still reads; other names are datasets, which may be ZIPs too).
fn is_stats_file(s: &str) -> bool {
    [".npz", ".pkl", ".npy"].iter().any(|ext| s.ends_with(ext))
}

/// Features of a dataset with a progress bar (`limit`: its first images only).
fn dataset_features(
    extractor: &FeatureExtractor,
    dataset: &Dataset,
    source: &str,
    limit: Option<usize>,
    batch: usize,
) -> anyhow::Result<Vec<f32>> {
    let progress = bar(
        "features",
        "features {bar:30} {pos}/{len} images {per_sec} ETA {eta} {msg}",
    );
    progress.set_message(source.to_owned());
    let features = hindsight::model::on_compute_pool(|| {
        extractor.dataset_features(dataset, limit, batch, &progress)
    })?;
    progress.finish_and_clear();
    Ok(features)
}

/// Computes (or imports) reference statistics; writes them to --out and/or stores them.
pub fn ref_stats(data_dir: &Path, args: RefStatsArgs) -> anyhow::Result<()> {
    if args.out.is_none() && args.name.is_none() {
        bail!("say where the statistics go: --out FILE.npz and/or --name NAME (stored)");
    }
    if args.batch == 0 || args.max_images.is_some_and(|m| m < 2) {
        bail!("--batch must be positive and --max-images at least 2");
    }
    if let Some(name) = &args.name {
        references::check_reference_name(name)?;
        // Before any work: a taken name is refused now, not after the features.
        let taken = block_on(async {
            let data = DataDir::open(data_dir).await?;
            Ok(data.db.reference_named(name).await?.is_some())
        })?;
        if taken {
            bail!("reference statistics named {name:?} exist already (see `hindsight references`)");
        }
    }
    if let Some(out) = &args.out {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
        if parent.is_some_and(|p| !p.is_dir()) {
            bail!("--out {}: its directory does not exist", out.display());
        }
    }
    if is_stats_file(&args.dataset) {
        let path = Path::new(&args.dataset);
        let bytes = hindsight::metrics::stats::read_file(path)?;
        let stats = FeatureStats::parse(&bytes, &args.dataset)?;
        stats
            .check_positive_semidefinite()
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.dataset))?;
        if let Some(out) = &args.out {
            write_npz(&stats, out)?;
            eprintln!("wrote {} ({}-d statistics)", out.display(), stats.dims());
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
    // The dataset first: a bad path or an empty set is reported before the network loads.
    let dataset = Dataset::open(&args.dataset, 32, 0, 0)?;
    report_folder(&dataset, &args.dataset);
    let full = dataset.len();
    let count = args.max_images.map_or(full, |m| m.min(full));
    if count < 2 {
        bail!(
            "{}: {count} image(s); statistics need at least 2",
            args.dataset
        );
    }
    let extractor = if args.pixel_projection {
        FeatureExtractor::pixel_projection()
    } else {
        FeatureExtractor::open(args.weights.as_deref())?
    };
    eprintln!("feature network: {}", extractor.identity());
    let started = std::time::Instant::now();
    let features = dataset_features(&extractor, &dataset, &args.dataset, Some(count), args.batch)?;
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
        let source = if count < full {
            format!("{} (first {count} images)", args.dataset)
        } else {
            args.dataset.clone()
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

/// One side of `hindsight fid`, before any features are computed.
enum Side {
    /// Statistics (a file, or stored ones with their features when kept), and the geometry of
    /// the images behind them when known.
    Stats(FeatureStats, Option<Vec<f32>>, Option<(usize, usize)>),
    /// An image set to run the network over, how many of its images, and the warning about
    /// files skipped in it.
    Images(Dataset, usize, Option<String>),
}

/// Resolves one side without running the network: a statistics file, stored reference
/// statistics (by name or id, when no file or dataset of that name exists), or a dataset.
fn resolve(data_dir: &Path, source: &str, args: &FidArgs) -> anyhow::Result<Side> {
    if is_stats_file(source) {
        let stats = FeatureStats::read(Path::new(source))?;
        stats
            .check_positive_semidefinite()
            .map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        return Ok(Side::Stats(stats, None, None));
    }
    let looks_like_data = Path::new(source).exists() || source.starts_with("fashion-mnist");
    if !looks_like_data && data_dir.join(hindsight::app::INDEX_FILE).exists() {
        let stored = block_on(async {
            let data = DataDir::open(data_dir).await?;
            match references::find(&data, source).await {
                Ok(row) => Ok(Some((
                    references::stats(&data, &row).await?,
                    references::features(&data, &row).await?,
                    row.resolution.zip(row.channels),
                ))),
                Err(hindsight::Error::NotFound(_)) => Ok(None),
                Err(e) => Err(e.into()),
            }
        })?;
        if let Some((stats, features, geometry)) = stored {
            let geometry = geometry.map(|(r, c)| (r as usize, c as usize));
            return Ok(Side::Stats(stats, features, geometry));
        }
    }
    let dataset = Dataset::open(source, 32, 0, 0)?;
    let warning = report_folder(&dataset, source);
    let count = args
        .max_images
        .map_or(dataset.len(), |m| m.min(dataset.len()));
    if count < 2 {
        bail!("{source}: {count} image(s); statistics need at least 2");
    }
    Ok(Side::Images(dataset, count, warning))
}

/// FID (and KID where both sides have features) between two sets.
pub fn fid(data_dir: &Path, args: FidArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if args.batch == 0 || args.max_images.is_some_and(|m| m < 2) {
        bail!("--batch must be positive and --max-images at least 2");
    }
    if args.kid_subsets == 0 || args.kid_subset_size < 2 {
        bail!("--kid-subsets must be positive and --kid-subset-size at least 2");
    }
    let sides = [
        resolve(data_dir, &args.a, &args)?,
        resolve(data_dir, &args.b, &args)?,
    ];
    let mut extractor = None;
    let mut resolved = Vec::new();
    let mut warnings = Vec::new();
    let mut read = Vec::new();
    for (side, source) in sides.into_iter().zip([&args.a, &args.b]) {
        read.push(match &side {
            Side::Images(dataset, ..) => dataset.folder().map(|f| f.report_json()),
            Side::Stats(..) => None,
        });
        resolved.push(match side {
            Side::Stats(stats, features, geometry) => (stats, features, geometry),
            Side::Images(dataset, count, warning) => {
                warnings.extend(warning);
                if extractor.is_none() {
                    let e = FeatureExtractor::open(args.weights.as_deref())?;
                    eprintln!("feature network: {}", e.identity());
                    extractor = Some(e);
                }
                let e = extractor.as_ref().expect("opened above");
                let features = dataset_features(e, &dataset, source, Some(count), args.batch)?;
                let geometry = Some((dataset.resolution(), dataset.channels()));
                (
                    statistics(&features, hindsight::metrics::FEATURES)?,
                    Some(features),
                    geometry,
                )
            }
        });
    }
    let (b, a) = (resolved.pop().expect("two"), resolved.pop().expect("two"));
    if a.0.dims() != b.0.dims() {
        bail!(
            "{} has {}-d statistics and {} {}-d ones; they come from different networks",
            args.a,
            a.0.dims(),
            args.b,
            b.0.dims()
        );
    }
    if let (Some((ra, ca)), Some((rb, cb))) = (a.2, b.2) {
        if (ra, ca) != (rb, cb) {
            eprintln!(
                "warning: {} holds {ra}×{ra} images with {ca} channel(s) and {} {rb}×{rb} with \
                 {cb}: FID compares them after resizing to 299×299 (and replicating grey), which \
                 is not the same as comparing images of one kind",
                args.a, args.b
            );
        }
    }
    let started = std::time::Instant::now();
    let fid = frechet_distance_of(&a.0, &b.0)?;
    let fid_seconds = started.elapsed().as_secs_f64();
    // KID where both sides have features; a set too small for it leaves FID standing.
    let kid = match (&a.1, &b.1) {
        (Some(x), Some(y)) => Some(kid(
            x,
            y,
            a.0.dims(),
            args.kid_subsets,
            args.kid_subset_size,
            0,
        )),
        _ => None,
    };
    if let Some(Ok(k)) = &kid {
        if let Some(w) = k.warning() {
            eprintln!("warning: {w}");
            warnings.push(w);
        }
    }
    if args.json {
        let (kid_value, kid_error) = match &kid {
            Some(Ok(k)) => (serde_json::json!(k), None),
            Some(Err(e)) => (serde_json::Value::Null, Some(e.to_string())),
            None => (serde_json::Value::Null, None),
        };
        return print_json(&serde_json::json!({
            "a": args.a, "b": args.b,
            "count_a": a.0.count(), "count_b": b.0.count(),
            "read_a": read[0], "read_b": read[1],
            "fid": fid, "kid": kid_value, "kid_error": kid_error, "fid_seconds": fid_seconds,
            "warnings": warnings,
        }));
    }
    writeln!(out, "FID  {fid:.4}")?;
    match kid {
        Some(Ok(k)) if k.method == KidMethod::Jackknife => writeln!(
            out,
            "KID  {:.6} ± {:.6} (whole sets of {} and {} features, jackknife standard error)",
            k.mean, k.std_error, k.sizes[0], k.sizes[1]
        )?,
        Some(Ok(k)) => writeln!(
            out,
            "KID  {:.6} ± {:.6} ({} subsets of {})",
            k.mean, k.std_error, k.subsets, k.subset_size
        )?,
        Some(Err(e)) => writeln!(out, "KID  - ({e})")?,
        None => writeln!(
            out,
            "KID  - (needs features on both sides; statistics files have none)"
        )?,
    }
    Ok(())
}

/// Lists stored reference statistics.
pub fn list(data_dir: &Path, args: ReferencesArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
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
    writeln!(
        out,
        "{:>4}  {:<24} {:>7} {:>5} {:>4}  {:<12} source",
        "id", "name", "images", "dims", "KID", "weights"
    )?;
    for r in rows {
        writeln!(
            out,
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
        )?;
    }
    Ok(())
}
