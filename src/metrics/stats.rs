//! Reference statistics: the mean and the unbiased covariance of a set's features, in f64,
//! accumulated in one pass over batches (Chan, Golub & LeVeque's pairwise update, so a batch
//! at a time is exact and order does not matter beyond rounding), and read from and written
//! to the files the peers use: pytorch-fid's `.npz` (`mu`, `sigma`) and EDM2's reference
//! `.pkl` (a pickled `{'fid': {'mu', 'sigma'}, …}` of NumPy arrays).

use std::io::{Read, Write};
use std::path::Path;

use faer::Mat;

use super::npy;
use super::pickle::{self, Value};
use crate::error::{Error, Result};

/// Mean and covariance of features, with the count they come from.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureStats {
    count: u64,
    mean: Vec<f64>,
    /// Sum of outer products of deviations from the mean (`d × d`, row-major); with
    /// `count == 0` and a known covariance (read from a file) it holds that covariance and
    /// `given` is set.
    comoment: Vec<f64>,
    given: bool,
}

impl FeatureStats {
    /// No features yet, of dimension `d`.
    pub fn new(d: usize) -> Self {
        Self {
            count: 0,
            mean: vec![0.0; d],
            comoment: vec![0.0; d * d],
            given: false,
        }
    }

    /// Statistics read from elsewhere: mean `d`, covariance `d × d` (row-major), from
    /// `count` samples (0 when unknown).
    pub fn from_parts(mean: Vec<f64>, covariance: Vec<f64>, count: u64) -> Result<Self> {
        let d = mean.len();
        if d == 0 {
            return Err(Error::invalid("statistics", "hold no values (mu is empty)"));
        }
        if covariance.len() != d * d {
            return Err(Error::invalid(
                "statistics",
                format!(
                    "a mean of {d} values needs a {d}×{d} covariance, not {} values",
                    covariance.len()
                ),
            ));
        }
        if mean.iter().chain(&covariance).any(|v| !v.is_finite()) {
            return Err(Error::invalid("statistics", "hold a NaN or an infinity"));
        }
        // A covariance is symmetric with a non-negative diagonal (positive semi-definite in
        // full: `FeatureStats::check_positive_semidefinite`).
        let scale = (0..d)
            .map(|i| covariance[i * d + i].abs())
            .fold(0f64, f64::max);
        if let Some(i) = (0..d).find(|&i| covariance[i * d + i] < 0.0) {
            return Err(Error::invalid(
                "statistics",
                format!(
                    "sigma[{i}, {i}] = {} is negative: not a covariance",
                    covariance[i * d + i]
                ),
            ));
        }
        for i in 0..d {
            for j in 0..i {
                let (a, b) = (covariance[i * d + j], covariance[j * d + i]);
                if (a - b).abs() > 1e-6 * scale.max(f64::MIN_POSITIVE) {
                    return Err(Error::invalid(
                        "statistics",
                        format!("sigma is not symmetric (sigma[{i}, {j}] = {a}, sigma[{j}, {i}] = {b}): not a covariance"),
                    ));
                }
            }
        }
        Ok(Self {
            count,
            mean,
            comoment: covariance,
            given: true,
        })
    }

    /// Dimension of the features.
    pub fn dims(&self) -> usize {
        self.mean.len()
    }

    /// Number of features seen (0 for statistics read without a count).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The mean.
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// The unbiased covariance (`Σ (x − μ)(x − μ)ᵀ / (n − 1)`), `d × d` row-major.
    pub fn covariance(&self) -> Vec<f64> {
        if self.given {
            return self.comoment.clone();
        }
        let denominator = (self.count.max(2) - 1) as f64;
        self.comoment.iter().map(|v| v / denominator).collect()
    }

    /// The same statistics, stating that they summarise `count` samples (for statistics read
    /// from a file that does not record it, when the count is known elsewhere).
    pub fn with_count(mut self, count: u64) -> Self {
        if self.given {
            self.count = count;
        }
        self
    }

    /// Refuses a covariance with an eigenvalue below `−1e-6 ×` its largest (beyond rounding):
    /// the Fréchet distance of such "statistics" can come out negative. Costs one symmetric
    /// eigenvalue decomposition (about half a second at 2048-d); for statistics from files.
    pub fn check_positive_semidefinite(&self) -> Result<()> {
        let d = self.dims();
        let cov = self.covariance();
        let m = faer::MatRef::from_column_major_slice(&cov, d, d);
        let eig = m
            .self_adjoint_eigenvalues(faer::Side::Lower)
            .map_err(|e| Error::invalid("statistics", format!("eigenvalues failed: {e:?}")))?;
        let largest = eig.iter().cloned().fold(0f64, f64::max);
        let smallest = eig.iter().cloned().fold(f64::INFINITY, f64::min);
        if smallest < -1e-6 * largest.max(f64::MIN_POSITIVE) {
            return Err(Error::invalid(
                "statistics",
                format!(
                    "sigma has an eigenvalue of {smallest:e} (largest {largest:e}): not positive \
                     semi-definite, so not a covariance"
                ),
            ));
        }
        Ok(())
    }

    /// Adds a batch of `n` features (`n × d`, row-major f32).
    pub fn add(&mut self, features: &[f32]) -> Result<()> {
        let d = self.dims();
        if self.given {
            return Err(Error::invalid(
                "statistics",
                "statistics read from a file cannot take more features",
            ));
        }
        if !features.len().is_multiple_of(d) {
            return Err(Error::invalid(
                "features",
                format!("{} values are not rows of {d}", features.len()),
            ));
        }
        let n = features.len() / d;
        if n == 0 {
            return Ok(());
        }
        if features.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid("features", "hold a NaN or an infinity"));
        }
        let mut batch_mean = vec![0.0f64; d];
        for row in features.chunks_exact(d) {
            for (m, &v) in batch_mean.iter_mut().zip(row) {
                *m += v as f64;
            }
        }
        batch_mean.iter_mut().for_each(|m| *m /= n as f64);
        // The batch's own comoment, Xcᵀ Xc, as one product.
        let centred = Mat::from_fn(n, d, |i, j| features[i * d + j] as f64 - batch_mean[j]);
        let batch_comoment = centred.transpose() * &centred;
        // Chan et al.: M = M_a + M_b + δ δᵀ · n_a n_b / (n_a + n_b), δ = μ_b − μ_a.
        let (na, nb) = (self.count as f64, n as f64);
        let total = na + nb;
        let delta: Vec<f64> = batch_mean
            .iter()
            .zip(&self.mean)
            .map(|(b, a)| b - a)
            .collect();
        let w = na * nb / total;
        for i in 0..d {
            for j in 0..d {
                self.comoment[i * d + j] += batch_comoment[(i, j)] + delta[i] * delta[j] * w;
            }
        }
        for (m, dl) in self.mean.iter_mut().zip(&delta) {
            *m += dl * nb / total;
        }
        self.count += n as u64;
        Ok(())
    }

    /// pytorch-fid's `.npz`: `mu` (d) and `sigma` (d × d), float64.
    pub fn write_npz(&self, out: impl Write + std::io::Seek) -> Result<()> {
        let d = self.dims();
        let mut zip = zip::ZipWriter::new(out);
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        let io = |e: std::io::Error| Error::io("writing statistics", e);
        let zerr = |e: zip::result::ZipError| Error::io("writing statistics", e.into());
        zip.start_file("mu.npy", options).map_err(zerr)?;
        npy::write_f64(&mut zip, &[d], &self.mean).map_err(io)?;
        zip.start_file("sigma.npy", options).map_err(zerr)?;
        npy::write_f64(&mut zip, &[d, d], &self.covariance()).map_err(io)?;
        zip.finish().map_err(zerr)?;
        Ok(())
    }

    /// Reads pytorch-fid's `.npz` (`mu`, `sigma`; any float dtype).
    pub fn read_npz(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::io(format!("reading {source}"), e))?;
        Self::parse_npz(&bytes, &source)
    }

    /// Parses the bytes of a pytorch-fid `.npz`; `source` names them in errors.
    pub fn parse_npz(bytes: &[u8], source: &str) -> Result<Self> {
        let source = source.to_owned();
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
            .map_err(|e| Error::invalid(&source, format!("not an .npz (ZIP) file: {e}")))?;
        let mut read = |name: &str| -> Result<(Vec<usize>, Vec<f64>)> {
            let mut entry = archive.by_name(&format!("{name}.npy")).map_err(|_| {
                Error::invalid(
                    &source,
                    format!("no `{name}` array (pytorch-fid writes mu, sigma)"),
                )
            })?;
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| Error::io(format!("reading {source}"), e))?;
            npy::read_f64(&bytes, &format!("{source}: {name}"))
        };
        let (mu_shape, mu) = read("mu")?;
        let (sigma_shape, sigma) = read("sigma")?;
        let d = mu.len();
        if mu_shape.len() != 1 || sigma_shape != [d, d] {
            return Err(Error::invalid(
                &source,
                format!(
                    "mu has shape {mu_shape:?} and sigma {sigma_shape:?}; expected [d] and [d, d]"
                ),
            ));
        }
        Self::from_parts(mu, sigma, 0).map_err(|e| named(e, &source))
    }

    /// Reads EDM2's reference statistics: a pickle of `{'fid': {'mu': ndarray, 'sigma':
    /// ndarray}, …}` (`calculate_metrics.py ref`).
    pub fn read_edm2_pkl(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::io(format!("reading {source}"), e))?;
        Self::parse_edm2_pkl(&bytes, &source)
    }

    /// Parses the bytes of an EDM2 reference `.pkl`; `source` names them in errors.
    pub fn parse_edm2_pkl(bytes: &[u8], source: &str) -> Result<Self> {
        let source = source.to_owned();
        let value = pickle::parse(bytes, &source)?;
        let fid = value.get("fid").ok_or_else(|| {
            Error::invalid(
                &source,
                "no 'fid' entry (EDM2's reference statistics have one)",
            )
        })?;
        let array = |name: &str| -> Result<(Vec<usize>, Vec<f64>)> {
            let v = fid
                .get(name)
                .ok_or_else(|| Error::invalid(&source, format!("no fid.{name}")))?;
            numpy_array(v).ok_or_else(|| {
                Error::invalid(&source, format!("fid.{name} is not a NumPy float array"))
            })
        };
        let (mu_shape, mu) = array("mu")?;
        let (sigma_shape, sigma) = array("sigma")?;
        let d = mu.len();
        if mu_shape.len() != 1 || sigma_shape != [d, d] {
            return Err(Error::invalid(
                &source,
                format!("mu has shape {mu_shape:?} and sigma {sigma_shape:?}"),
            ));
        }
        Self::from_parts(mu, sigma, 0).map_err(|e| named(e, &source))
    }

    /// Reads statistics by file type: `.npz` (pytorch-fid) or `.pkl` (EDM2).
    pub fn read(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("npz") => Self::read_npz(path),
            Some("pkl") => Self::read_edm2_pkl(path),
            _ => Err(Error::invalid(
                path.display().to_string(),
                "statistics files are .npz (pytorch-fid: mu, sigma) or .pkl (EDM2)",
            )),
        }
    }

    /// Parses statistics by content: a ZIP is a pytorch-fid `.npz`, a pickle (protocol 2+,
    /// `\x80`) an EDM2 `.pkl`.
    pub fn parse(bytes: &[u8], source: &str) -> Result<Self> {
        match bytes.first() {
            Some(b'P') if bytes.starts_with(b"PK") => Self::parse_npz(bytes, source),
            Some(0x80) => Self::parse_edm2_pkl(bytes, source),
            _ => Err(Error::invalid(
                source,
                "neither a pytorch-fid .npz (mu, sigma) nor an EDM2 reference .pkl",
            )),
        }
    }
}

/// An error about "statistics" restated as about the file `source`.
fn named(e: Error, source: &str) -> Error {
    match e {
        Error::InvalidInput { reason, .. } => Error::invalid(source, reason),
        other => other,
    }
}

/// A NumPy array pickled by NumPy (`numpy.core.multiarray._reconstruct` with a `BUILD` state
/// `(version, shape, dtype, fortran_order, raw bytes)`) of little-endian f32 or f64, as
/// `(shape, values)`.
fn numpy_array(v: &Value) -> Option<(Vec<usize>, Vec<f64>)> {
    let Value::Object {
        callable,
        state: Some(state),
        ..
    } = v
    else {
        return None;
    };
    if !callable.class_name()?.ends_with("_reconstruct") {
        return None;
    }
    let state = state.items()?;
    let (shape, dtype, fortran, raw) = (state.get(1)?, state.get(2)?, state.get(3)?, state.get(4)?);
    let shape: Vec<usize> = shape
        .items()?
        .iter()
        .map(|d| d.as_int().map(|d| d as usize))
        .collect::<Option<_>>()?;
    // dtype: numpy.dtype('f8', …) with BUILD state (3, '<', …).
    let Value::Object { args, state, .. } = dtype else {
        return None;
    };
    let kind = args.items()?.first()?.as_str()?.to_owned();
    let order = state
        .as_ref()
        .and_then(|s| s.items()?.get(1)?.as_str().map(str::to_owned))
        .unwrap_or_else(|| "<".to_owned());
    if order == ">" || fortran.as_int()? != 0 {
        return None;
    }
    let bytes = match raw {
        Value::Bytes(b) => b,
        _ => return None,
    };
    let values: Vec<f64> = match kind.as_str() {
        "f8" => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        "f4" => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64)
            .collect(),
        _ => return None,
    };
    (values.len() == shape.iter().product::<usize>()).then_some((shape, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_accumulate_to_the_two_pass_statistics() {
        let (n, d) = (37, 4);
        let rows: Vec<f32> = (0..n * d)
            .map(|k| ((k * 7919 % 101) as f32 - 50.0) / 17.0 + (k % d) as f32)
            .collect();
        let mut stats = FeatureStats::new(d);
        for chunk in rows.chunks(5 * d) {
            stats.add(chunk).unwrap();
        }
        assert_eq!(stats.count(), n as u64);
        let mean: Vec<f64> = (0..d)
            .map(|j| (0..n).map(|i| rows[i * d + j] as f64).sum::<f64>() / n as f64)
            .collect();
        let cov = stats.covariance();
        for a in 0..d {
            assert!((stats.mean()[a] - mean[a]).abs() < 1e-12);
            for b in 0..d {
                let c: f64 = (0..n)
                    .map(|i| {
                        (rows[i * d + a] as f64 - mean[a]) * (rows[i * d + b] as f64 - mean[b])
                    })
                    .sum::<f64>()
                    / (n - 1) as f64;
                assert!((cov[a * d + b] - c).abs() < 1e-10, "{a},{b}");
            }
        }
    }

    #[test]
    fn npz_round_trip() {
        let stats = FeatureStats::from_parts(vec![1.0, -2.0], vec![2.0, 0.5, 0.5, 3.0], 9).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.npz");
        stats
            .write_npz(std::fs::File::create(&path).unwrap())
            .unwrap();
        let back = FeatureStats::read(&path).unwrap();
        assert_eq!(back.mean(), stats.mean());
        assert_eq!(back.covariance(), stats.covariance());
    }
}
