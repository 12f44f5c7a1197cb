//! Seed lists: `0-63`, `1,5,9`, or mixtures.

use crate::error::{Error, Result};

/// Longest range one list may hold.
const MAX_RANGE: u64 = 1_000_000;

/// Parses `0-63`, `1,5,9` or mixtures into seeds, in order. Errors name the part that is
/// not a number, a range that is empty or longer than a million seeds, or an empty list.
pub fn parse_seeds(text: &str) -> Result<Vec<u64>> {
    let bad = |reason: String| Error::invalid("seeds", reason);
    let number = |s: &str, part: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|e| bad(format!("seed {part:?}: {e}")))
    };
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a, part)?, number(b, part)?);
                if b < a || b - a > MAX_RANGE {
                    return Err(bad(format!("seed range {part:?} is empty or too large")));
                }
                out.extend(a..=b);
            }
            None => out.push(number(part, part)?),
        }
    }
    if out.is_empty() {
        return Err(bad("no seeds given".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_ranges() {
        assert_eq!(parse_seeds("0-3").unwrap(), [0, 1, 2, 3]);
        assert_eq!(parse_seeds("1,5, 9").unwrap(), [1, 5, 9]);
        assert_eq!(parse_seeds("7,2-3").unwrap(), [7, 2, 3]);
        for bad in ["", "3-1", "x", "0-2000000", "1,,a"] {
            assert!(parse_seeds(bad).is_err(), "{bad}");
        }
    }
}
