//! "Formula weights": deterministic test weights that the EDM2 reference fixtures use, so any
//! tensor can be rebuilt bit-exactly from its key without shipping weight files.
//!
//! `u(name, i) = (splitmix64(fnv1a64(name) + i) >> 40) / 2^24` is in [0, 1) and exact in f32;
//! element i (row-major) of a tensor is `(2u − 1)·scale` (kind `sym`) or `offset + u·scale`
//! (kind `pos`), computed in f64 and rounded once to f32.

/// FNV-1a, 64 bits, over the UTF-8 bytes of `s`.
pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64's output function for one input.
pub fn splitmix64(x: u64) -> u64 {
    let x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The uniform value of element `i` of tensor `name`.
pub fn unit(name: &str, i: u64) -> f64 {
    (splitmix64(fnv1a64(name).wrapping_add(i)) >> 40) as f64 / (1u64 << 24) as f64
}

/// How a tensor's elements are drawn.
#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Symmetric: `(2u − 1)·scale`.
    Sym,
    /// Positive: `offset + u·scale`.
    Pos,
}

/// The `count` elements of tensor `name`.
pub fn values(name: &str, count: usize, kind: Kind, scale: f64, offset: f64) -> Vec<f32> {
    (0..count as u64)
        .map(|i| {
            let u = unit(name, i);
            let v = match kind {
                Kind::Sym => (2.0 * u - 1.0) * scale,
                Kind::Pos => offset + u * scale,
            };
            v as f32
        })
        .collect()
}
