//! Where a snapshot sits: its training time (`nimg`), EMA width (σ_rel or γ) and update rule,
//! from explicit [`Hints`], the safetensors `__metadata__`, or an EDM2 file name
//! (`<prefix>-<kimg:07d>-<sigma:.3f>.safetensors`). Two sources that disagree are refused:
//! the same file cannot be two snapshots.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use crate::error::{Error, Result};
use crate::format::{read_header, Header};
use crate::phema::{RealisedProfile, Width};

/// Where a file's training time and EMA width come from: explicit values, the safetensors
/// `__metadata__` (`nimg`, and `sigma_rel` or `gamma`), then an EDM2 file name
/// (`<prefix>-<kimg:07d>-<sigma:.3f>.safetensors`). An explicit value and the metadata that
/// disagree are refused (the same file cannot be two snapshots). Likewise the EMA's update rule
/// when it is not EDM2's: explicit, else `__metadata__.profile` (JSON, see
/// [`RealisedProfile`]), else EDM2's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hints {
    /// Training time in images.
    pub nimg: Option<u64>,
    /// EMA width.
    pub width: Option<Width>,
    /// The EMA's update rule.
    pub profile: Option<RealisedProfile>,
}

/// EDM2's mapping from the kimg in a file name back to nimg (`reconstruct_phema.py`): the
/// largest multiple of 1024 images whose thousands are `kimg`.
pub fn kimg_to_nimg(kimg: u64) -> Option<u64> {
    let nimg = (kimg.checked_mul(1000)?.checked_add(999)?) / 1024 * 1024;
    (nimg / 1000 == kimg).then_some(nimg)
}

/// Parses an EDM2 snapshot file name, `<prefix>-<kimg>-<sigma>.safetensors` (or `.pkl`):
/// returns `(nimg, sigma_rel)`.
pub fn parse_edm2_name(file_name: &str) -> Option<(u64, f64)> {
    let stem = file_name
        .strip_suffix(".safetensors")
        .or_else(|| file_name.strip_suffix(".pkl"))?;
    let (rest, sigma) = stem.rsplit_once('-')?;
    let (prefix, kimg) = rest.rsplit_once('-')?;
    if prefix.is_empty() || kimg.is_empty() || !kimg.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (int, frac) = sigma.split_once('.')?;
    if int.is_empty()
        || frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((kimg_to_nimg(kimg.parse().ok()?)?, sigma.parse().ok()?))
}

/// The snapshot's `(nimg, width)`: explicit values first, then `__metadata__`, then the EDM2
/// file name; and the checks that the sources which say something agree.
///
/// Errors: [`Error::InvalidInput`] when sources disagree, a value is not a number, or no
/// source gives both.
pub(super) fn resolve_time_and_width(
    header: &Header,
    hints: &Hints,
    file_name: &str,
    source: &str,
) -> Result<(u64, Width)> {
    let meta = &header.metadata;
    let parse = |key: &str| -> Result<Option<f64>> {
        match meta.get(key) {
            None => Ok(None),
            Some(v) => v.trim().parse::<f64>().map(Some).map_err(|_| {
                Error::invalid(
                    format!("{source}: __metadata__.{key}"),
                    format!("`{v}` is not a number"),
                )
            }),
        }
    };
    let from_name = parse_edm2_name(file_name);
    let nimg = match (hints.nimg, meta.get("nimg")) {
        (Some(n), Some(v)) if v.trim().parse::<u64>().ok() != Some(n) => {
            return Err(Error::invalid(
                "nimg",
                format!(
                    "{n} was given, but the file's __metadata__ says nimg {v}: give the time \
                     only one way, or the same"
                ),
            ))
        }
        (Some(n), _) => Some(n),
        (None, Some(v)) => Some(v.trim().parse::<u64>().map_err(|_| {
            Error::invalid(
                format!("{source}: __metadata__.nimg"),
                format!("`{v}` is not a whole number of images"),
            )
        })?),
        (None, None) => from_name.map(|(n, _)| n),
    };
    if let Some(given) = hints.width {
        let said = match (parse("sigma_rel")?, parse("gamma")?) {
            (Some(s), _) => Some(Width::SigmaRel(s)),
            (None, Some(g)) => Some(Width::Gamma(g)),
            (None, None) => None,
        };
        if let Some(said) = said {
            let field = format!("{source}: __metadata__");
            let (a, b) = (given.resolve("width")?.0, said.resolve(&field)?.0);
            if !crate::db::same_width(a, b) {
                return Err(Error::invalid(
                    if matches!(given, Width::Gamma(_)) {
                        "gamma"
                    } else {
                        "sigma_rel"
                    },
                    format!(
                        "sigma_rel {a} was given, but the file's __metadata__ says sigma_rel \
                         {b}: give the width only one way, or the same"
                    ),
                ));
            }
        }
    }
    let width = match hints.width {
        Some(w) => Some(w),
        None => match (parse("sigma_rel")?, parse("gamma")?) {
            (Some(s), None) => Some(Width::SigmaRel(s)),
            (None, Some(g)) => Some(Width::Gamma(g)),
            // Both (as reconstructions and trackers write them): they must name one width.
            (Some(s), Some(g)) => {
                let expected = crate::phema::sigma_rel_to_gamma(
                    s,
                    &format!("{source}: __metadata__.sigma_rel"),
                )?;
                if (expected - g).abs() > 1e-6 * expected.abs().max(1.0) {
                    return Err(Error::invalid(
                        format!("{source}: __metadata__"),
                        format!(
                            "sigma_rel {s} and gamma {g} disagree (sigma_rel {s} is gamma \
                             {expected}); give one"
                        ),
                    ));
                }
                Some(Width::SigmaRel(s))
            }
            (None, None) => from_name.map(|(_, s)| Width::SigmaRel(s)),
        },
    };
    match (nimg, width) {
        (Some(n), Some(w)) => {
            crate::phema::check_nimg(n, &format!("{source}: nimg"))?;
            // An EDM2 file name that says otherwise (to its own precision: whole kimg,
            // σ_rel to 3 decimals) means the file is not what its name claims.
            if let Some((name_nimg, name_sigma)) = from_name {
                let sigma = w.resolve(&format!("{source}: sigma_rel"))?.0;
                let kimg_off = (n as f64 / 1000.0 - name_nimg as f64 / 1000.0).abs() >= 1.0;
                if kimg_off || (sigma - name_sigma).abs() > 0.0005 + 1e-12 {
                    return Err(Error::invalid(
                        "filename",
                        format!(
                            "{file_name:?} says nimg {name_nimg} and sigma_rel {name_sigma}, \
                             but the snapshot is at nimg {n} and sigma_rel {sigma}: rename the \
                             file or give the time and width only one way"
                        ),
                    ));
                }
            }
            Ok((n, w))
        }
        _ => Err(Error::invalid(
            source,
            "cannot tell the snapshot's training time and EMA width: name the file EDM2's way \
             (<prefix>-<kimg:07d>-<sigma:.3f>.safetensors) or put nimg and sigma_rel (or gamma) \
             in its __metadata__",
        )),
    }
}

/// The update rule: `explicit`, else the JSON in `__metadata__.profile`, else EDM2's (`None`).
pub(super) fn resolve_profile(
    header: &Header,
    explicit: Option<RealisedProfile>,
    source: &str,
) -> Result<Option<RealisedProfile>> {
    if explicit.is_some() {
        return Ok(explicit);
    }
    match header.metadata.get("profile") {
        None => Ok(None),
        Some(text) => serde_json::from_str(text).map(Some).map_err(|e| {
            Error::invalid(
                format!("{source}: __metadata__.profile"),
                format!("not an update rule ({e})"),
            )
        }),
    }
}

/// The (nimg, σ_rel) slot the safetensors file at `path` would be stored at, from its
/// `__metadata__` or EDM2 name; `None` when that cannot be told (its ingest will say why).
/// Directory imports use it to order files that claim the same slot.
pub(super) fn slot_of(path: &Path) -> Option<(u64, u64)> {
    let file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let source = path.display().to_string();
    let header = read_header(&mut BufReader::new(file), len, &source).ok()?;
    let file_name = path.file_name()?.to_str()?;
    let (nimg, width) =
        resolve_time_and_width(&header, &Hints::default(), file_name, &source).ok()?;
    let (sigma_rel, _) = width.resolve(&source).ok()?;
    Some((nimg, sigma_rel.to_bits()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edm2_names() {
        assert_eq!(
            parse_edm2_name("phema-0008388-0.050.safetensors"),
            Some((8388608, 0.05))
        );
        assert_eq!(
            parse_edm2_name("edm2-img512-xs-2147483-0.100.pkl"),
            Some((2147483648, 0.1))
        );
        for bad in [
            "phema-0008192.safetensors",
            "-0008192-0.050.safetensors",
            "phema-8x92-0.050.safetensors",
            "phema-0008192-0.05x.safetensors",
            "phema-0008192-0.050.bin",
            "phema-0008192-.050.safetensors",
        ] {
            assert_eq!(parse_edm2_name(bad), None, "{bad}");
        }
        // EDM2's kimg→nimg rounds to whole batches of 1024 images.
        assert_eq!(kimg_to_nimg(8388), Some(8388608));
        assert_eq!(kimg_to_nimg(8192), Some(8192000));
        assert_eq!(kimg_to_nimg(1), Some(1024));
        assert_eq!(kimg_to_nimg(0), Some(0));
    }
}
