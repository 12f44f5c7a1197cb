//! The library's error type, and the one helper that runs blocking work off the async
//! workers.
//!
//! Every variant says what was wrong in terms a user can act on; input errors name the
//! offending field with a path such as `targets[2].sigma_rel` so that the command line and the
//! HTTP server can point at it. Errors that wrap another keep it as their `source()` (the
//! database's `sqlx::Error`, an `std::io::Error`), so callers can inspect it; their own
//! message already includes the source's, and [`chain_text`] prints each message once.

/// Errors produced by the library.
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
    /// A byte stream ended or broke off before all the bytes it announced arrived: an upload
    /// whose client went away, or a file that changed while it was read. The client (or the
    /// file's writer) can fix it by sending it again.
    #[error("{source_name}: {reason}")]
    Incomplete {
        /// Names the stream (`upload`, a path).
        source_name: String,
        /// What arrived and what was expected.
        reason: String,
    },
    /// The request conflicts with what is stored (an existing name, a different snapshot
    /// at the same time and width).
    #[error("conflict: {0}")]
    Conflict(String),
    /// An external evaluator's lease on a sweep point ended or ran out: nothing was
    /// recorded; the evaluator claims again.
    #[error("{0}")]
    LeaseLost(String),
    /// Features an external evaluator computed differ from the server's on an audit image
    /// (another resize or normalisation): nothing was recorded.
    #[error("{0}")]
    AuditFailed(String),
    /// A sweep point cannot be finished yet: batches or metrics are missing (the message
    /// names them).
    #[error("{0}")]
    Unfinished(String),
    /// A configured bound on stored or queued work is reached (unfinished sweeps); the
    /// message names the bound. Trying again after work finishes can succeed.
    #[error("{0}")]
    LimitReached(String),
    /// The index could not be read or written.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The index's schema could not be brought up to date.
    #[error("migrating the index: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// The index holds something this version cannot make sense of (a row that vanished in
    /// the middle of an operation, a malformed JSON column).
    #[error("index: {0}")]
    Index(String),
    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Work handed to another thread (tokio's blocking pool, a writer thread) did not finish:
    /// it panicked or was cancelled.
    #[error("{what} did not finish: {reason}")]
    Task {
        /// What the task was doing.
        what: String,
        /// How it ended (the panic message, or cancellation).
        reason: String,
    },
    /// A tensor computation failed (candle: a shape mismatch inside the network, a device
    /// error, an out-of-memory on the GPU).
    #[error("tensor computation: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Reconstructed values do not fit the output element type (f16 holds ±65504): nothing was
    /// stored. Reconstruct as `f32` or `bf16`, or ask for clamping.
    #[error("{}", describe_out_of_range(dtype, tensors))]
    OutOfRange {
        /// The output type (`f16`).
        dtype: String,
        /// Every tensor (per target) with values out of range.
        tensors: Vec<OutOfRange>,
    },
    /// A stored snapshot holds a NaN or ±∞ where a reconstruction gives it a weight (it was
    /// stored without `--check-finite`).
    #[error(
        "snapshot {snapshot} (nimg {nimg}): tensor {tensor} holds a non-finite value (element \
         {element}), so no reconstruction that uses it can be finite; re-import that snapshot \
         from a good copy, or ask for times or widths that do not use it"
    )]
    NonFinite {
        /// The snapshot's digest.
        snapshot: String,
        /// Its training time.
        nimg: u64,
        /// The tensor.
        tensor: String,
        /// The first non-finite element's index in the tensor.
        element: u64,
    },
    /// A stored blob's content no longer matches its digest.
    #[error("blob {expected} is corrupt: {actual}")]
    Corrupt {
        /// The digest the blob is stored under.
        expected: String,
        /// What was found instead, as a phrase: `its content hashes to <digest>`, `its
        /// checksum is … where … was recorded`, `it is shorter than its header says`.
        actual: String,
    },
    /// A download failed or its content did not match the published checksum (nothing was
    /// kept).
    #[error("downloading {url}: {reason}")]
    Download {
        /// What was fetched.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// A named thing (a run, a reconstruction) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A blob that should be in the store is not.
    #[error("blob {0} is missing from the store")]
    MissingBlob(String),
    /// The index (`index.sqlite`) is missing, empty or damaged beside a store that holds
    /// data: nothing was opened or changed.
    #[error(
        "the index {path} is damaged: {reason}. Nothing was changed. Restore it from a backup \
         (with its -wal file), or rebuild it from the snapshots in the store with `hindsight \
         rebuild-index` (it moves the damaged file aside first)"
    )]
    IndexDamaged {
        /// The index file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
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

/// Values of one reconstructed tensor that its output type cannot hold.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OutOfRange {
    /// Which target of the pass (index into its weights).
    pub target: usize,
    /// The tensor.
    pub tensor: String,
    /// How many elements were out of range.
    pub elements: u64,
    /// The largest magnitude among them.
    pub max_abs: f64,
}

fn describe_out_of_range(dtype: &str, tensors: &[OutOfRange]) -> String {
    let shown: Vec<String> = tensors
        .iter()
        .take(5)
        .map(|t| {
            format!(
                "tensor {} has {} element(s) beyond {dtype}'s range (largest magnitude {:.4e})",
                t.tensor, t.elements, t.max_abs
            )
        })
        .collect();
    let more = match tensors.len() {
        n if n > 5 => format!(" (and {} more tensors)", n - 5),
        _ => String::new(),
    };
    format!(
        "dtype: {}{more}; reconstruct as f32 or bf16, or allow clamping to the largest {dtype} \
         value (--clamp-out-of-range; \"clamp_out_of_range\": true in the API)",
        shown.join("; ")
    )
}

impl Error {
    /// Builds an [`Error::Io`] from an I/O error and a description of what was being done.
    /// When the disk is full (or a file-size limit or quota is reached) the context says so
    /// in words, whatever the platform's message.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        let mut context = context.into();
        if is_no_space(&source) {
            context.push_str(
                " (no space left: the disk is full or a file-size limit or quota was reached; \
                 nothing partial was kept)",
            );
        }
        Error::Io { context, source }
    }

    /// Builds an [`Error::InvalidInput`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::Task`] for a thread that panicked, from its panic payload.
    pub fn panicked(what: impl Into<String>, payload: &(dyn std::any::Any + Send)) -> Self {
        let reason = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "it panicked".to_owned());
        Error::Task {
            what: what.into(),
            reason: format!("panicked: {reason}"),
        }
    }

    /// The whole chain of messages in one line (`a: b: c`), each source once: what logs and
    /// the command line print.
    pub fn chain_text(&self) -> String {
        chain_text(self)
    }
}

/// Whether an I/O error means the disk (or a file-size limit, or a quota) is full: ENOSPC,
/// EFBIG or EDQUOT.
pub fn is_no_space(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge
    ) || e
        .raw_os_error()
        .is_some_and(|c| c == libc::ENOSPC || c == libc::EFBIG || c == libc::EDQUOT)
}

/// One line from an error and its sources, `outer: inner: …`, leaving out a source whose text
/// the line already ends with (wrappers that repeat their source in their own message).
pub fn chain_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = e.source();
    }
    line
}

/// Runs blocking work (file I/O, hashing, fsync, materialization) on tokio's blocking pool
/// and waits for it; a panic or cancellation becomes [`Error::Task`] naming `what`.
pub async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => Err(Error::panicked(what, &*e.into_panic())),
        Err(e) => Err(Error::Task {
            what: what.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_print_each_message_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = Error::io("opening x.safetensors", io);
        assert_eq!(e.chain_text(), "opening x.safetensors: No such file");
        let e = Error::invalid("targets[1].sigma_rel", "out of range");
        assert_eq!(e.chain_text(), "targets[1].sigma_rel: out of range");
    }

    #[tokio::test]
    async fn a_panicking_blocking_task_is_a_task_error() {
        let err = blocking::<()>("hashing a blob", || panic!("boom"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Task { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "hashing a blob did not finish: panicked: boom"
        );
        assert_eq!(blocking("adding", || Ok(1 + 1)).await.unwrap(), 2);
    }
}
