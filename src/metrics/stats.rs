//! Reference statistics: the mean and the unbiased covariance of a set's features, in f64,
//! accumulated in one pass over batches (Chan, Golub & LeVeque's pairwise update, so a batch
//! at a time is exact and order does not matter beyond rounding), and read from and written
//! to the files the peers use: pytorch-fid's `.npz` (`mu`, `sigma`), EDM2's reference `.pkl`
//! (a pickled `{'fid': {'mu', 'sigma'}, …}` of NumPy arrays) and `numpy.save` of a
//! `{'mu', 'sigma'}` dict (a `.npy` of a pickled object array).
//!
//! Files are told apart by content ([`FeatureStats::parse`]), read under budgets
//! ([`MAX_FILE_BYTES`], [`MAX_DIMS`], [`MAX_NPZ_ENTRIES`], the `.npz` entry caps and
//! `pickle`'s limits), and refused with what they are and what is accepted ([`ACCEPTED`]).

use std::io::{Read, Write};
use std::path::Path;

use faer::Mat;

use super::npy;
use super::pickle::{self, Ref};
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

    /// Reads pytorch-fid's `.npz` (`mu`, `sigma`; float32 or float64).
    pub fn read_npz(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        Self::parse_npz(&read_file(path)?, &source)
    }

    /// Parses the bytes of a pytorch-fid `.npz` (`numpy.savez(mu=…, sigma=…)`, stored or
    /// deflated); `source` names them in errors.
    ///
    /// Only `mu.npy` and `sigma.npy` are inflated, each through a cap counted as it inflates
    /// (the sizes the archive declares are not trusted): `mu` at most [`MAX_DIMS`] float64,
    /// `sigma` at most `d × d` float64 for `mu`'s `d`, each plus a `.npy` header; so in total
    /// at most `8·(d + d²)` bytes and 20 KB. Errors name the limit passed
    /// ([`MAX_NPZ_ENTRIES`], the entry size limit, [`MAX_DIMS`]).
    pub fn parse_npz(bytes: &[u8], source: &str) -> Result<Self> {
        parse_npz(bytes, source, MAX_DIMS)
    }

    /// Reads EDM2's reference statistics: a pickle of `{'fid': {'mu': ndarray, 'sigma':
    /// ndarray}, …}` (`calculate_metrics.py ref`).
    pub fn read_edm2_pkl(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        Self::parse_edm2_pkl(&read_file(path)?, &source)
    }

    /// Parses the bytes of an EDM2 reference `.pkl` (any pickle protocol 2–5, NumPy 1.x or
    /// 2.x, float32 or float64 arrays in either byte and memory order; see
    /// [`npy::pickled_f64`]), or of a pickled `{'mu', 'sigma'}` dict; `source` names them in
    /// errors. The pickle is read under [`pickle`]'s budgets.
    pub fn parse_edm2_pkl(bytes: &[u8], source: &str) -> Result<Self> {
        parse_pkl(bytes, source, MAX_DIMS)
    }

    /// Parses a `.npy` holding a pickled `{'mu': ndarray, 'sigma': ndarray}` dict, as
    /// `numpy.save('ref.npy', {'mu': mu, 'sigma': sigma})` writes it (a 0-d object array,
    /// pytorch-fid issue #106); `source` names it in errors. A `.npy` of a plain array is
    /// refused with what it holds.
    pub fn parse_npy(bytes: &[u8], source: &str) -> Result<Self> {
        parse_npy(bytes, source, MAX_DIMS)
    }

    /// Reads statistics from a file, by its content (see [`FeatureStats::parse`]).
    pub fn read(path: &Path) -> Result<Self> {
        let source = path.display().to_string();
        Self::parse(&read_file(path)?, &source)
    }

    /// Parses statistics by content (magic bytes, not the name): a ZIP is a pytorch-fid
    /// `.npz`, a pickle (protocol 2+, `\x80`) an EDM2 `.pkl`, `\x93NUMPY` a `.npy` of a
    /// pickled dict. Anything else is refused saying what it looks like and what is accepted
    /// ([`ACCEPTED`]).
    pub fn parse(bytes: &[u8], source: &str) -> Result<Self> {
        Self::parse_at_most(bytes, source, MAX_DIMS)
    }

    /// [`FeatureStats::parse`], refusing statistics of more than `max_dims` dimensions
    /// (`max_dims` ≤ [`MAX_DIMS`]) before reading `sigma`: a server that stores only 2048-d
    /// statistics never inflates a larger `sigma`.
    pub fn parse_at_most(bytes: &[u8], source: &str, max_dims: usize) -> Result<Self> {
        let max_dims = max_dims.min(MAX_DIMS);
        if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
            parse_npz(bytes, source, max_dims)
        } else if bytes.first() == Some(&0x80) {
            parse_pkl(bytes, source, max_dims)
        } else if bytes.starts_with(b"\x93NUMPY") {
            parse_npy(bytes, source, max_dims)
        } else {
            Err(Error::invalid(
                source,
                format!(
                    "not an .npz (ZIP), a pickle or a .npy: it {}; {ACCEPTED}",
                    describe_start(bytes)
                ),
            ))
        }
    }
}

/// Most feature dimensions a statistics file may hold (Inception's pool3 has 2048, DINOv2
/// up to 1536): `sigma` is then at most 8192² float64, 512 MiB. Checked on `mu` before
/// `sigma` is inflated or decoded.
pub const MAX_DIMS: usize = 8192;

/// Most entries an `.npz` may list (pytorch-fid's holds two).
pub const MAX_NPZ_ENTRIES: usize = 64;

/// Largest statistics file read: `mu` and `sigma` of [`MAX_DIMS`] as float64, uncompressed,
/// plus 1 MiB for headers.
pub const MAX_FILE_BYTES: u64 = 8 * (MAX_DIMS * MAX_DIMS + MAX_DIMS) as u64 + (1 << 20);

/// What statistics files are accepted, for messages.
pub const ACCEPTED: &str = "statistics are a pytorch-fid .npz (mu, sigma), an EDM2 reference \
     .pkl ({'fid': {'mu', 'sigma'}}), or a .npy of a pickled {'mu', 'sigma'} dict (numpy.save \
     of a dict)";

/// Room for a `.npy`'s magic, version, length and header (NumPy's largest) in an entry.
const NPY_PREFIX_BYTES: u64 = 12 + npy::MAX_HEADER_BYTES as u64;

/// The bytes of a statistics file, refused past [`MAX_FILE_BYTES`] before reading.
///
/// Errors: the file cannot be read (the message says what statistics files are), or is too
/// large.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let source = path.display().to_string();
    let io = |e| Error::io(format!("reading statistics file {source} ({ACCEPTED})"), e);
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len > MAX_FILE_BYTES {
        return Err(Error::invalid(
            &source,
            format!(
                "{len} bytes, more than {MAX_FILE_BYTES} (the statistics file size limit: \
                 {MAX_DIMS}-d float64 statistics)"
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::invalid(
            &source,
            format!("grew past {MAX_FILE_BYTES} bytes while read (the statistics file size limit)"),
        ));
    }
    Ok(bytes)
}

/// How the bytes of an unrecognised file begin, as a phrase ("is empty", "begins with the
/// text \"…\"").
fn describe_start(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(32)];
    if bytes.is_empty() {
        "is empty".into()
    } else if bytes.starts_with(b"\x1f\x8b") {
        "is gzip-compressed (decompress it first)".into()
    } else if let Some(text) = std::str::from_utf8(head)
        .ok()
        .filter(|t| t.chars().all(|c| !c.is_control() || c.is_whitespace()))
    {
        format!("begins with the text {text:?}")
    } else {
        let hex: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!("begins with the bytes {}", hex.join(" "))
    }
}

fn parse_npz(bytes: &[u8], source: &str, max_dims: usize) -> Result<FeatureStats> {
    let bad = |reason: String| Error::invalid(source, reason);
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| {
        bad(format!(
            "not an .npz (a readable ZIP archive): {e}; {ACCEPTED}"
        ))
    })?;
    if archive.len() > MAX_NPZ_ENTRIES {
        return Err(bad(format!(
            "a ZIP archive of {} entries, more than {MAX_NPZ_ENTRIES} (the .npz entry limit); \
             {ACCEPTED}",
            archive.len()
        )));
    }
    if archive.index_for_name("mu.npy").is_none() || archive.index_for_name("sigma.npy").is_none() {
        let names: Vec<String> = archive
            .file_names()
            .filter_map(|n| n.ok().map(|n| n.into_owned()))
            .collect();
        let torch = names.iter().any(|n| n.ends_with("data.pkl"));
        let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
        return Err(bad(format!(
            "a ZIP archive holding {}{} ({} entries{}), not a pytorch-fid .npz (which holds \
             mu.npy and sigma.npy); {ACCEPTED}",
            shown.join(", "),
            if names.len() > shown.len() {
                ", …"
            } else {
                ""
            },
            names.len(),
            if torch {
                "; a PyTorch archive, by its data.pkl"
            } else {
                ""
            },
        )));
    }
    // Inflates one entry through a cap: refused as soon as it passes `cap` bytes.
    let mut read = |name: &str, cap: u64, what: String| -> Result<Vec<u8>> {
        let mut entry = archive
            .by_name(name)
            .map_err(|e| bad(format!("{name}: {e}")))?;
        let mut out = Vec::new();
        (&mut entry)
            .take(cap + 1)
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("{name} does not inflate: {e}")))?;
        if out.len() as u64 > cap {
            return Err(bad(format!(
                "{name} inflates past {cap} bytes, more than {what} needs (the .npz entry size \
                 limit)"
            )));
        }
        Ok(out)
    };
    let mu_cap = NPY_PREFIX_BYTES + 8 * max_dims as u64;
    let mu_bytes = read("mu.npy", mu_cap, format!("a {max_dims}-value float64 mu"))?;
    let (mu_shape, mu) = npy::read_f64(&mu_bytes, &format!("{source}: mu"))?;
    drop(mu_bytes);
    let d = check_mu(&mu_shape, source, max_dims)?;
    let sigma_cap = NPY_PREFIX_BYTES + 8 * (d as u64) * (d as u64);
    let sigma_bytes = read("sigma.npy", sigma_cap, format!("a {d}×{d} float64 sigma"))?;
    let (sigma_shape, sigma) = npy::read_f64(&sigma_bytes, &format!("{source}: sigma"))?;
    drop(sigma_bytes);
    check_sigma(&sigma_shape, d, source)?;
    FeatureStats::from_parts(mu, sigma, 0).map_err(|e| named(e, source))
}

/// `mu`'s dimension, checked: one axis, 1 to `max_dims` values.
fn check_mu(shape: &[usize], source: &str, max_dims: usize) -> Result<usize> {
    match *shape {
        [d] if d > max_dims => Err(Error::invalid(
            source,
            format!(
                "mu holds {d} values: {d}-dimensional statistics, more than the {max_dims} read \
                 here (the statistics dimension limit)"
            ),
        )),
        [d] if d > 0 => Ok(d),
        _ => Err(Error::invalid(
            source,
            format!("mu has shape {shape:?}; expected [d] with d ≥ 1"),
        )),
    }
}

fn check_sigma(shape: &[usize], d: usize, source: &str) -> Result<()> {
    if shape != [d, d] {
        return Err(Error::invalid(
            source,
            format!("mu has shape [{d}] and sigma {shape:?}; expected [d] and [d, d]"),
        ));
    }
    Ok(())
}

fn parse_pkl(bytes: &[u8], source: &str, max_dims: usize) -> Result<FeatureStats> {
    let pickle = pickle::parse(bytes, source)?;
    let root = pickle.root();
    if let Some(fid) = root.get("fid") {
        return from_dict(fid, "fid.", source, max_dims);
    }
    if root.get("mu").is_some() {
        return from_dict(root, "", source, max_dims);
    }
    let keys: Vec<String> = root
        .entries()
        .map(|e| e.str_keys().take(8).map(|k| format!("{k:?}")).collect())
        .unwrap_or_default();
    Err(Error::invalid(
        source,
        format!(
            "a pickle of {}{} with no 'fid' entry (EDM2's reference statistics are {{'fid': \
             {{'mu', 'sigma'}}}}); {ACCEPTED}",
            root.describe(),
            if keys.is_empty() {
                String::new()
            } else {
                format!(" (keys {})", keys.join(", "))
            }
        ),
    ))
}

fn parse_npy(bytes: &[u8], source: &str, max_dims: usize) -> Result<FeatureStats> {
    let header = npy::read_header(bytes, source)?;
    if header.dtype != npy::Dtype::Object {
        return Err(Error::invalid(
            source,
            format!(
                "a NumPy .npy array of {}, not statistics: {ACCEPTED}",
                header.describe()
            ),
        ));
    }
    let pickle = pickle::parse(&bytes[header.data_offset..], source)?;
    let root = pickle.root();
    let dict = if npy::is_pickled_array(root) {
        let (shape, items) =
            npy::pickled_objects(root, "the array").map_err(|r| Error::invalid(source, r))?;
        match items.as_slice() {
            [one] => *one,
            _ => {
                return Err(Error::invalid(
                    source,
                    format!(
                        "a NumPy .npy object array of shape {shape:?}, not one {{'mu', 'sigma'}} \
                         dict; {ACCEPTED}"
                    ),
                ))
            }
        }
    } else {
        root
    };
    if dict.entries().is_none() {
        return Err(Error::invalid(
            source,
            format!(
                "a NumPy .npy object array holding {}, not a {{'mu', 'sigma'}} dict; {ACCEPTED}",
                dict.describe()
            ),
        ));
    }
    from_dict(dict, "", source, max_dims)
}

/// Statistics from a dict-like pickled value with `mu` and `sigma` NumPy arrays; `prefix`
/// names the dict in messages (`fid.`).
fn from_dict(dict: Ref, prefix: &str, source: &str, max_dims: usize) -> Result<FeatureStats> {
    if dict.entries().is_none() {
        return Err(Error::invalid(
            source,
            format!(
                "{} is {}, not a dict of mu and sigma",
                prefix.trim_end_matches('.'),
                dict.describe()
            ),
        ));
    }
    let array = |name: &str| -> Result<(Vec<usize>, Vec<f64>)> {
        let what = format!("{prefix}{name}");
        let v = dict
            .get(name)
            .ok_or_else(|| Error::invalid(source, format!("no {what}")))?;
        npy::pickled_f64(v, &what).map_err(|reason| Error::invalid(source, reason))
    };
    let (mu_shape, mu) = array("mu")?;
    let d = check_mu(&mu_shape, source, max_dims)?;
    let (sigma_shape, sigma) = array("sigma")?;
    check_sigma(&sigma_shape, d, source)?;
    FeatureStats::from_parts(mu, sigma, 0).map_err(|e| named(e, source))
}

/// An error about "statistics" restated as about the file `source`.
fn named(e: Error, source: &str) -> Error {
    match e {
        Error::InvalidInput { reason, .. } => Error::invalid(source, reason),
        other => other,
    }
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

    /// An archive with `entries` as (name, bytes, deflated?), written in one pass.
    fn zip_of(entries: &[(&str, &[u8], bool)]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, bytes, deflate) in entries {
            let method = if *deflate {
                zip::CompressionMethod::Deflated
            } else {
                zip::CompressionMethod::Stored
            };
            let options = zip::write::SimpleFileOptions::default().compression_method(method);
            zip.start_file(*name, options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    fn npy_f64(shape: &[usize], values: &[f64]) -> Vec<u8> {
        let mut out = Vec::new();
        npy::write_f64(&mut out, shape, values).unwrap();
        out
    }

    #[track_caller]
    fn refused(bytes: &[u8], needle: &str) {
        let err = FeatureStats::parse(bytes, "x").unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }

    #[test]
    fn npz_entries_are_capped_while_they_inflate() {
        let mu = npy_f64(&[2], &[1.0, 2.0]);
        let sigma = npy_f64(&[2, 2], &[2.0, 0.5, 0.5, 3.0]);
        let good = zip_of(&[("mu.npy", &mu, true), ("sigma.npy", &sigma, true)]);
        assert_eq!(FeatureStats::parse(&good, "x").unwrap().dims(), 2);
        // mu.npy inflating to 16 MiB of zeros: refused once past a MAX_DIMS-value mu.
        let zeros = vec![0u8; 16 << 20];
        let bomb = zip_of(&[("mu.npy", &zeros, true), ("sigma.npy", &sigma, true)]);
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        refused(&bomb, "mu.npy inflates past 75548 bytes, more than a 8192-value float64 mu needs (the .npz entry size limit)");
        // sigma.npy is capped by mu's dimension: 2×2 here, so 32 bytes of data and a header.
        let big_sigma = npy_f64(&[2, 2], &[0.0; 4]);
        let mut padded = big_sigma.clone();
        padded.extend(vec![0u8; 20_000]);
        let bomb = zip_of(&[("mu.npy", &mu, true), ("sigma.npy", &padded, true)]);
        refused(
            &bomb,
            "sigma.npy inflates past 10044 bytes, more than a 2×2 float64 sigma needs",
        );
        // More dimensions than asked for are refused before sigma is read.
        let err = FeatureStats::parse_at_most(&good, "x", 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2-dimensional statistics, more than the 1 read here (the statistics dimension limit)"), "{err}");
        // An archive of many entries.
        let names: Vec<String> = (0..=MAX_NPZ_ENTRIES).map(|i| format!("e{i}")).collect();
        let many: Vec<(&str, &[u8], bool)> = names
            .iter()
            .map(|n| (n.as_str(), &b""[..], false))
            .collect();
        refused(&zip_of(&many), "(the .npz entry limit)");
        // A corrupt deflate stream is an input error, not an I/O one.
        let mut corrupt = good.clone();
        let at = corrupt.windows(6).position(|w| w == b"mu.npy").unwrap() + 6;
        for b in &mut corrupt[at..at + 8] {
            *b ^= 0x55;
        }
        assert!(matches!(
            FeatureStats::parse(&corrupt, "x"),
            Err(Error::InvalidInput { .. })
        ));
    }

    #[test]
    fn statistics_are_told_apart_by_content() {
        let mu = npy_f64(&[2], &[1.0, 2.0]);
        refused(&mu, "x: a NumPy .npy array of shape [2] float64, not statistics: statistics are a pytorch-fid .npz (mu, sigma), an EDM2 reference .pkl");
        refused(b"", "it is empty");
        refused(b"\x00\x01\x02", "begins with the bytes 00 01 02");
        // A pickle of a dict of the wrong things.
        refused(
            b"\x80\x04}\x94\x8c\x03fid\x94K\x01s.",
            "fid is the int 1, not a dict of mu and sigma",
        );
        refused(
            b"\x80\x04}\x94\x8c\x02mu\x94K\x01s.",
            "mu is the int 1, not a NumPy array",
        );
    }
}
