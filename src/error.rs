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
    /// The request conflicts with what is stored (an existing name, a different snapshot
    /// at the same time and width).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The index could not be read or written.
    #[error("database: {0}")]
    Database(String),
    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A stored blob's content no longer matches its digest.
    #[error("blob {expected} is corrupt: its content hashes to {actual}")]
    Corrupt {
        /// The digest the blob is stored under.
        expected: String,
        /// The digest of what is on disk now.
        actual: String,
    },
    /// A named thing (a run, a reconstruction) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A blob that should be in the store is not.
    #[error("blob {0} is missing from the store")]
    MissingBlob(String),
    /// The store on disk has a layout this version does not know.
    #[error("{path}: unsupported store format ({found}); this hindsight reads format {supported}")]
    StoreFormat {
        /// The VERSION file.
        path: String,
        /// What it says.
        found: String,
        /// What we support.
        supported: u32,
    },
}

impl Error {
    /// Builds an [`Error::Io`] from an I/O error and a description of what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

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
