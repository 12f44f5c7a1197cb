//! EDM2's list syntax for EMA widths: `0.05,0.10` or `0.010,0.015,...,0.250`.
//!
//! The token `...` stands for an evenly spaced run: it must follow at least two numbers (whose
//! difference is the step) and precede one (the end), and the end must lie a whole number of
//! steps past the number before `...` (within 1e-4 steps), as in EDM2's `reconstruct_phema.py`.
//! The result is sorted with duplicates removed, also as in EDM2.
//!
//! One deliberate difference: generated values are rounded to the number of decimals written
//! in the input, so `0.010,0.015,...,0.250` yields exactly the double nearest `0.020` rather
//! than `0.020000000000000004`. A width typed as `0.100` and one generated as `0.100` are then
//! the same number, and a target equal to a snapshot width is recognised as such.

use super::profile::check_sigma_rel;
use crate::error::{Error, Result};

/// Most values a list may expand to ([`parse_float_list`]); callers with a tighter bound (the
/// reconstruct route's 64 targets) pass theirs to [`parse_float_list_at_most`]. The count is
/// computed from the syntax before anything is allocated, so `1,2,...,1e15` costs nothing.
pub const MAX_LIST_VALUES: usize = 10_000;

/// Parses a σ_rel list and validates every value as a relative standard deviation.
///
/// ```
/// let list = hindsight::phema::parse_sigma_rel_list("0.05,0.10,...,0.25").unwrap();
/// assert_eq!(list, [0.05, 0.10, 0.15, 0.20, 0.25]);
/// assert!(hindsight::phema::parse_sigma_rel_list("0.1,0.2,...,0.3").is_err()); // 0.3 > sqrt(1/12)
/// ```
pub fn parse_sigma_rel_list(text: &str) -> Result<Vec<f64>> {
    let values = parse_float_list(text)?;
    for v in &values {
        check_sigma_rel(*v, "sigma_rel list")?;
    }
    Ok(values)
}

/// Parses the list syntax without range checks (also used for γ lists), at most
/// [`MAX_LIST_VALUES`] values.
pub fn parse_float_list(text: &str) -> Result<Vec<f64>> {
    parse_float_list_at_most(text, MAX_LIST_VALUES)
}

/// [`parse_sigma_rel_list`] with a bound on the values the list expands to.
pub fn parse_sigma_rel_list_at_most(text: &str, max: usize) -> Result<Vec<f64>> {
    let values = parse_float_list_at_most(text, max)?;
    for v in &values {
        check_sigma_rel(*v, "sigma_rel list")?;
    }
    Ok(values)
}

/// [`parse_float_list`] with a bound on the values the list expands to (counted from the
/// syntax before allocating; duplicates count).
///
/// Errors: a malformed list, or one of more than `max` values (naming how many it has).
pub fn parse_float_list_at_most(text: &str, max: usize) -> Result<Vec<f64>> {
    let field = "list";
    let expanded = expanded_len(text)?;
    if expanded > max as f64 {
        return Err(Error::invalid(
            field,
            if expanded.is_finite() && expanded < 1e18 {
                format!("the list has {expanded} values; at most {max} are allowed")
            } else {
                format!("the list has more than 10^18 values; at most {max} are allowed")
            },
        ));
    }
    let tokens: Vec<&str> = text.split(',').map(str::trim).collect();
    let mut raw: Vec<Option<(f64, usize)>> = Vec::with_capacity(tokens.len());
    for tok in &tokens {
        if *tok == "..." {
            raw.push(None);
            continue;
        }
        let value: f64 = tok
            .parse()
            .map_err(|_| Error::invalid(field, format!("`{tok}` is not a number")))?;
        if !value.is_finite() {
            return Err(Error::invalid(field, format!("`{tok}` is not finite")));
        }
        raw.push(Some((value, decimals(tok))));
    }
    let mut out = Vec::new();
    for (i, item) in raw.iter().enumerate() {
        if let Some((v, _)) = item {
            out.push(*v);
            continue;
        }
        let before = |k: usize| i.checked_sub(k).and_then(|p| raw[p]);
        let (Some((a, da)), Some((b, db))) = (before(2), before(1)) else {
            return Err(Error::invalid(
                field,
                "`...` must follow at least two numbers",
            ));
        };
        let Some(Some((end, de))) = raw.get(i + 1).copied() else {
            return Err(Error::invalid(field, "`...` must be followed by a number"));
        };
        if a == b {
            return Err(Error::invalid(
                field,
                "the two numbers before `...` must differ (their difference is the step)",
            ));
        }
        let step = b - a;
        let approx = (end - b) / step - 1.0;
        let count = approx.round();
        if !count.is_finite() || count > max as f64 {
            return Err(Error::invalid(
                field,
                format!("`{a},{b},...,{end}` has too many values; at most {max} are allowed"),
            ));
        }
        if count <= 0.0 {
            return Err(Error::invalid(
                field,
                format!("`{a},{b},...,{end}` describes an empty run"),
            ));
        }
        if (count - approx).abs() > 1e-4 {
            return Err(Error::invalid(
                field,
                format!("`{a},{b},...,{end}` is not evenly spaced: {end} is not a whole number of steps of {step} after {b}"),
            ));
        }
        let digits = da.max(db).max(de);
        let round = |x: f64| {
            let p = 10f64.powi(digits as i32);
            (x * p).round() / p
        };
        for k in 1..=count as usize {
            out.push(round(b + step * k as f64));
        }
    }
    out.sort_by(f64::total_cmp);
    out.dedup();
    if out.is_empty() {
        return Err(Error::invalid(field, "the list is empty"));
    }
    Ok(out)
}

/// How many values `text` expands to, from its numbers alone (∞ for runs whose step count
/// overflows); malformed lists count what they can and are refused by the parser.
fn expanded_len(text: &str) -> Result<f64> {
    let tokens: Vec<&str> = text.split(',').map(str::trim).collect();
    let number = |i: usize| tokens.get(i).and_then(|t| t.parse::<f64>().ok());
    let mut total = 0f64;
    for (i, tok) in tokens.iter().enumerate() {
        if *tok != "..." {
            total += 1.0;
            continue;
        }
        let (Some(a), Some(b), Some(end)) = (
            i.checked_sub(2).and_then(number),
            i.checked_sub(1).and_then(number),
            number(i + 1),
        ) else {
            continue;
        };
        if a == b {
            continue; // refused by the parser: the step is zero
        }
        // The run is b + step, …, end: `steps` values, the last of them the end, which
        // is counted as a number of its own.
        let steps = ((end - b) / (b - a)).round();
        if steps.is_nan() || steps <= 0.0 {
            continue;
        }
        total += steps - 1.0;
    }
    Ok(total)
}

/// Number of digits after the decimal point as written (0 for exponent notation).
fn decimals(token: &str) -> usize {
    if token.contains(['e', 'E']) {
        return 15;
    }
    token
        .split_once('.')
        .map_or(0, |(_, frac)| frac.len())
        .min(15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_runs_are_refused_before_allocating() {
        for text in [
            "1,2,...,1e15",
            "1e-300,2e-300,...,1e300",
            "1,2,...,10000000",
            "0,1e-320,...,1",
        ] {
            let err = parse_float_list(text).unwrap_err().to_string();
            assert!(err.contains("at most 10000"), "{text}: {err}");
        }
        let err = parse_float_list_at_most("0.05,0.10,...,4", 64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("80 values; at most 64"), "{err}");
        assert_eq!(
            parse_float_list_at_most("1,2,...,64", 64).unwrap().len(),
            64
        );
        assert_eq!(parse_float_list("1,2,...,10000").unwrap().len(), 10_000);
    }

    fn check(text: &str, expect: &[f64]) {
        assert_eq!(parse_float_list(text).unwrap(), expect, "{text}");
    }

    fn check_err(text: &str, needle: &str) {
        let err = parse_float_list(text).unwrap_err().to_string();
        assert!(err.contains(needle), "{text}: {err}");
    }

    #[test]
    fn expands_runs() {
        check("0.15", &[0.15]);
        check("0.10,0.05", &[0.05, 0.10]);
        check("0.01,0.02,...,0.05", &[0.01, 0.02, 0.03, 0.04, 0.05]);
        check("0.05,0.05,0.1", &[0.05, 0.1]);
        check("1,3,...,9,20", &[1.0, 3.0, 5.0, 7.0, 9.0, 20.0]);
        let list = parse_float_list("0.010,0.015,...,0.250").unwrap();
        assert_eq!(list.len(), 49);
        assert_eq!(list[2], 0.020);
        assert_eq!(list[48], 0.250);
    }

    #[test]
    fn rejects_what_edm2_rejects() {
        check_err("...,0.1", "follow at least two");
        check_err("0.1,...,0.3", "follow at least two");
        check_err("0.1,0.2,...", "followed by a number");
        check_err("0.1,0.2,...,...", "followed by a number");
        check_err("0.1,0.1,...,0.3", "must differ");
        check_err("0.1,0.2,...,0.2", "empty run");
        check_err("0.1,0.2,...,0.45", "not evenly spaced");
        check_err("0.1,abc", "`abc` is not a number");
        check_err("0.1,nan", "not finite");
        check_err("", "`` is not a number");
    }

    #[test]
    fn validates_sigma_rel_range() {
        assert!(parse_sigma_rel_list("0.05,0.10,...,0.25").is_ok());
        assert!(parse_sigma_rel_list("0.1,0.2,...,0.3").is_err());
        assert!(parse_sigma_rel_list("0,0.1").is_err());
    }
}
