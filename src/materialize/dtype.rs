//! Element types: what a reconstruction writes ([`OutDtype`]) and the sizes of what it reads.

use crate::error::{Error, Result};

/// Σ|w| above which accumulation switches from f32 to f64.
pub const F64_ACCUMULATION_L1: f64 = 4.0;

/// Element type of the reconstructed floating-point tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl OutDtype {
    /// Every output type, in the order the command line lists them.
    pub const ALL: [OutDtype; 3] = [OutDtype::F32, OutDtype::F16, OutDtype::BF16];

    /// What the type is, for help texts: `32-bit float`, `IEEE half`, `bfloat16`.
    pub fn describe(self) -> &'static str {
        match self {
            OutDtype::F32 => "32-bit float",
            OutDtype::F16 => "IEEE half",
            OutDtype::BF16 => "bfloat16",
        }
    }

    /// Lower-case name, as in requests and on the command line: `f32`, `f16`, `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutDtype::F32 => "f32",
            OutDtype::F16 => "f16",
            OutDtype::BF16 => "bf16",
        }
    }

    /// The largest finite value of the type.
    pub fn max_finite(self) -> f32 {
        match self {
            OutDtype::F32 => f32::MAX,
            OutDtype::F16 => 65504.0,
            OutDtype::BF16 => f32::from_bits(0x7f7f_0000),
        }
    }

    /// The smallest magnitude that rounds to ±∞ in this type: halfway between its largest
    /// finite value and the next power of two (f16: 65520; bf16: just below f32's own limit,
    /// so only sums near f32's range overflow it).
    pub(super) fn overflow_threshold(self) -> f32 {
        match self {
            OutDtype::F32 => f32::INFINITY,
            OutDtype::F16 => 65520.0,
            OutDtype::BF16 => f32::from_bits(0x7f7f_8000),
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            OutDtype::F32 => "F32",
            OutDtype::F16 => "F16",
            OutDtype::BF16 => "BF16",
        }
    }

    pub(super) fn size(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::F16 | OutDtype::BF16 => 2,
        }
    }
}

impl std::str::FromStr for OutDtype {
    type Err = Error;

    /// Parses `f32`, `f16` or `bf16` (as [`OutDtype::as_str`] writes them).
    fn from_str(s: &str) -> Result<Self> {
        OutDtype::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| Error::invalid("dtype", format!("{s:?} is not one of f32, f16, bf16")))
    }
}

/// Bytes per element of a safetensors dtype.
pub(super) fn element_size(dtype: &str) -> usize {
    match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}
