//! The library's error type.
//!
//! Every variant says what was wrong in terms a user can act on; input errors name the
//! offending field with a path such as `targets[2].sigma_rel` so that the command line and the
//! HTTP server can point at it.

/// Errors produced by the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller-supplied value is out of range or inconsistent with the others.
    #[error("{field}: {reason}")]
    InvalidInput {
        /// Path of the offending field, e.g. `snapshots[3].nimg`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The snapshot profiles are linearly dependent to working precision, so the least-squares
    /// weights are not determined.
    #[error(
        "the snapshot profiles are linearly dependent to working precision \
         (Gram pivot {pivot:.3e} at snapshot {snapshot}); remove near-duplicate snapshots"
    )]
    SingularGram {
        /// Index (in the caller's order) of the snapshot whose profile is (nearly) a
        /// combination of the earlier ones.
        snapshot: usize,
        /// The pivot of the unit-diagonal Gram matrix that fell below the threshold.
        pivot: f64,
    },
}

impl Error {
    /// Builds an [`Error::InvalidInput`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
