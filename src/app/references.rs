//! Reference statistics in the data directory: computed from a dataset with the feature
//! network (kept with their features, for KID), or imported from a pytorch-fid `.npz` / EDM2
//! `.pkl`; found by id or name; read back for metrics.

use super::DataDir;
use crate::db::{NewReference, ReferenceRow};
use crate::error::{Error, Result};
use crate::metrics::{npy, FeatureExtractor, FeatureStats, FEATURES};

/// The feature network of computed FID statistics and of imported ones (taken on trust).
pub const FEATURE_NETWORK: &str = crate::metrics::INCEPTION_NETWORK;

/// Where reference statistics came from, beyond their numbers.
#[derive(Clone, Debug)]
pub struct ReferenceOrigin {
    /// The name to store them under (unique).
    pub name: String,
    /// The dataset or file.
    pub source: String,
    /// Image side of the set, when known.
    pub resolution: Option<usize>,
    /// Image channels of the set, when known.
    pub channels: Option<usize>,
}

/// Checks a reference name: the rules of run names ([`crate::db::check_name`]: 1–200
/// characters, no invisible or control characters, slashes, or surrounding white space, NFC),
/// not all digits (those are ids), and not `features` (a route).
pub fn check_reference_name(name: &str) -> Result<()> {
    crate::db::check_name("name", "a reference name", name)?;
    if name.chars().all(|c| c.is_ascii_digit()) || name.parse::<i64>().is_ok() {
        return Err(Error::invalid(
            "name",
            format!("{name:?}: a reference name may not be a number or all digits (those are ids)"),
        ));
    }
    if name == "features" {
        // `POST /references/features` is the route for client-computed features.
        return Err(Error::invalid(
            "name",
            "\"features\" names a route of the API (POST /references/features); choose another",
        ));
    }
    Ok(())
}

/// Stores statistics and features computed here by `extractor`: the `.npz` and the `.npy`
/// go into the store and one row into the index.
///
/// Errors: a taken or bad name, features that are not rows of the statistics' dimension.
pub async fn store_computed(
    data: &DataDir,
    origin: ReferenceOrigin,
    stats: &FeatureStats,
    features: &[f32],
    extractor: &FeatureExtractor,
) -> Result<ReferenceRow> {
    check_reference_name(&origin.name)?;
    let d = stats.dims();
    if features.len() != stats.count() as usize * d {
        return Err(Error::invalid(
            "features",
            format!(
                "{} values are not {} rows of {d}",
                features.len(),
                stats.count()
            ),
        ));
    }
    taken(data, &origin.name).await?;
    let mut npz = std::io::Cursor::new(Vec::new());
    stats.write_npz(&mut npz)?;
    let stats_digest = data
        .put_blob(npz.into_inner(), "reference statistics")
        .await?;
    let mut npy_bytes = Vec::with_capacity(features.len() * 4 + 128);
    npy::write_f32(&mut npy_bytes, &[stats.count() as usize, d], features)
        .map_err(|e| Error::io("encoding features", e))?;
    let features_digest = data.put_blob(npy_bytes, "reference features").await?;
    data.db
        .record_reference(&NewReference {
            name: origin.name,
            source: origin.source,
            feature_network: extractor.feature_network().to_owned(),
            weights_digest: Some(extractor.digest.clone()),
            preprocess: Some(extractor.preprocess_name().to_owned()),
            dims: d,
            count: stats.count(),
            stats_digest,
            features_digest: Some(features_digest),
            resolution: origin.resolution,
            channels: origin.channels,
        })
        .await
}

/// Imports statistics from the bytes of a pytorch-fid `.npz` or an EDM2 `.pkl` (told apart by
/// content). They keep no features, so KID cannot use them, and their feature network is
/// taken on trust (it must be 2048-d, as inception-2015-12-05's pool3 is).
pub async fn import(data: &DataDir, origin: ReferenceOrigin, bytes: &[u8]) -> Result<ReferenceRow> {
    check_reference_name(&origin.name)?;
    let stats = FeatureStats::parse(bytes, &origin.source)?;
    import_stats(data, origin, stats).await
}

/// [`import`] of statistics already parsed (the server parses uploads on the blocking pool,
/// with [`FeatureStats::parse_at_most`] `FEATURES`).
pub async fn import_stats(
    data: &DataDir,
    origin: ReferenceOrigin,
    stats: FeatureStats,
) -> Result<ReferenceRow> {
    check_reference_name(&origin.name)?;
    if stats.dims() != FEATURES {
        return Err(Error::invalid(
            "statistics",
            format!(
                "{}-dimensional statistics; FID here uses {FEATURES}-d Inception features",
                stats.dims()
            ),
        ));
    }
    taken(data, &origin.name).await?;
    {
        let stats = stats.clone();
        crate::error::blocking("checking the covariance", move || {
            stats.check_positive_semidefinite()
        })
        .await
        .map_err(|e| match e {
            Error::InvalidInput { reason, .. } => Error::invalid(&origin.source, reason),
            other => other,
        })?;
    }
    // Stored as written here (float64 .npz), whichever format came in.
    let mut npz = std::io::Cursor::new(Vec::new());
    stats.write_npz(&mut npz)?;
    let stats_digest = data
        .put_blob(npz.into_inner(), "reference statistics")
        .await?;
    data.db
        .record_reference(&NewReference {
            name: origin.name,
            source: origin.source,
            feature_network: FEATURE_NETWORK.to_owned(),
            weights_digest: None,
            preprocess: None,
            dims: stats.dims(),
            count: stats.count(),
            stats_digest,
            features_digest: None,
            resolution: origin.resolution,
            channels: origin.channels,
        })
        .await
}

async fn taken(data: &DataDir, name: &str) -> Result<()> {
    if data.db.reference_named(name).await?.is_some() {
        return Err(Error::Conflict(format!(
            "reference statistics named {name:?} exist already"
        )));
    }
    Ok(())
}

/// The reference `key` names: its numeric id or its name.
///
/// Errors: [`Error::NotFound`] naming `key`.
pub async fn find(data: &DataDir, key: &str) -> Result<ReferenceRow> {
    // Only the canonical spelling of a positive id is an id (`3`, not `+3`, `03` or `3 `):
    // a name can never be mistaken for another reference's id.
    let row = match key.parse::<i64>() {
        Ok(id) if id > 0 && id.to_string() == key => data.db.reference(id).await?,
        _ => None,
    };
    let row = match row {
        Some(r) => Some(r),
        None => data.db.reference_named(key).await?,
    };
    row.ok_or_else(|| Error::NotFound(format!("no reference statistics {key:?}")))
}

/// The statistics of a stored reference.
pub async fn stats(data: &DataDir, row: &ReferenceRow) -> Result<FeatureStats> {
    let bytes = data.read_blob(&row.stats_digest).await?;
    Ok(
        FeatureStats::parse_npz(&bytes, &format!("reference statistics {:?}", row.name))?
            .with_count(row.count.max(0) as u64),
    )
}

/// The features of a stored reference (f32 `[count, dims]`), or `None` for imported ones.
pub async fn features(data: &DataDir, row: &ReferenceRow) -> Result<Option<Vec<f32>>> {
    let Some(digest) = &row.features_digest else {
        return Ok(None);
    };
    let bytes = data.read_blob(digest).await?;
    let (shape, values) = npy::read_f32(&bytes, &format!("reference features {:?}", row.name))?;
    if shape.len() != 2 || shape[1] != row.dims as usize {
        return Err(Error::Index(format!(
            "reference features {:?} have shape {shape:?}, not [n, {}]",
            row.name, row.dims
        )));
    }
    Ok(Some(values))
}
