//! The library's error type.
//!
//! Every variant says what was wrong in terms a user can act on; input errors name the
//! offending field with a path such as `targets[2].sigma_rel` so that the command line and the
//! HTTP server can point at it.

/// Errors produced by the library. More variants arrive with the store and the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A caller-supplied value is out of range or inconsistent with the others.
    #[error("{field}: {reason}")]
    InvalidInput {
        /// Path of the offending field, e.g. `snapshots[3].nimg`.
        field: String,
        /// What is wrong with it.
        reason: String,
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
