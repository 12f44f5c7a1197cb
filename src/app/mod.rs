//! The embedded default deployment: an SQLite index and a local blob store under one data
//! directory, opened together ([`DataDir`]), and the upkeep that needs both ([`verify`],
//! [`gc`]), and reference statistics for the metrics ([`references`]).

mod data_dir;
mod maintain;
mod recovery;
pub mod references;

pub use data_dir::{lock_data_dir, DataDir, INDEX_FILE, LOCK_FILE, REBUILD_MARKER, STORE_DIR};
pub use maintain::{delete_snapshot, gc, verify, GcReport, VerifyReport};
pub use recovery::{recover, RecoveryReport, CLAIM_GRACE};
