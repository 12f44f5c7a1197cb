//! The API's wire types: what clients send and receive, with their OpenAPI schemas. Index
//! rows are converted here, so the storage layout can change without changing the API. A
//! library type that *is* a payload — the quality report
//! ([`crate::reconstruction::QualityReport`]), a metric's presentation
//! ([`crate::sweep::MetricInfo`]), a sweep's specification — derives its schema where it is
//! defined, so that there is one Rust type per payload. JSON columns are JSON objects here,
//! never JSON text inside a string; the only free-form objects on the wire are metadata a
//! user supplied (a run's, a snapshot's `__metadata__`).

pub mod evaluations;
pub mod sweeps;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::db::{ManifestEntry, ReconstructionRow, Run, RunSummary, SnapshotRow};
use crate::ingest::Ingested;
use crate::materialize::OutDtype;
use crate::reconstruction::{file_name, report, Plan, QualityReport};

/// A training run.
#[derive(Serialize, ToSchema)]
#[schema(as = Run)]
pub struct RunView {
    /// Row id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Training and network configuration, anything the trainer records (free-form,
    /// user-supplied).
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// RFC 3339 UTC.
    pub created_at: String,
}

impl From<Run> for RunView {
    fn from(r: Run) -> Self {
        RunView {
            id: r.id,
            name: r.name,
            description: r.description,
            metadata: r.metadata,
            created_at: r.created_at,
        }
    }
}

/// A run with totals, for listings.
#[derive(Serialize, ToSchema)]
#[schema(as = RunSummary)]
pub struct RunSummaryView {
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// Number of snapshots.
    pub snapshots: i64,
    /// Total bytes of the snapshots' files.
    pub bytes: i64,
    /// Earliest snapshot time.
    pub first_nimg: Option<i64>,
    /// Latest snapshot time.
    pub last_nimg: Option<i64>,
    /// When something last happened to the run (RFC 3339 UTC): created, a snapshot, a
    /// reconstruction, or a sweep created or ended.
    pub last_activity: String,
}

impl From<RunSummary> for RunSummaryView {
    fn from(r: RunSummary) -> Self {
        RunSummaryView {
            name: r.name,
            description: r.description,
            created_at: r.created_at,
            snapshots: r.snapshots,
            bytes: r.bytes,
            first_nimg: r.first_nimg,
            last_nimg: r.last_nimg,
            last_activity: r.last_activity,
        }
    }
}

/// One tensor of a run's manifest.
#[derive(Serialize, ToSchema)]
#[schema(as = ManifestEntry)]
pub struct ManifestEntryView {
    /// State-dict key.
    pub name: String,
    /// safetensors dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
}

impl From<ManifestEntry> for ManifestEntryView {
    fn from(e: ManifestEntry) -> Self {
        ManifestEntryView {
            name: e.name,
            dtype: e.dtype,
            shape: e.shape,
        }
    }
}

/// A stored snapshot.
#[derive(Serialize, ToSchema)]
#[schema(as = SnapshotRow)]
pub struct SnapshotView {
    /// Row id.
    pub id: i64,
    /// Training time in images.
    pub nimg: i64,
    /// EMA width.
    pub sigma_rel: f64,
    /// EMA exponent.
    pub gamma: f64,
    /// BLAKE3 digest of the file (hex).
    pub digest: String,
    /// File size.
    pub byte_size: i64,
    /// Number of tensors.
    pub tensor_count: i64,
    /// Elements per safetensors dtype, e.g. `{"F32": 1024}`.
    #[schema(value_type = std::collections::BTreeMap<String, u64>)]
    pub dtypes: serde_json::Value,
    /// The file's `__metadata__` as the trainer wrote it (free-form, user-supplied).
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// RFC 3339 UTC.
    pub created_at: String,
}

impl From<SnapshotRow> for SnapshotView {
    fn from(s: SnapshotRow) -> Self {
        SnapshotView {
            id: s.id,
            nimg: s.nimg,
            sigma_rel: s.sigma_rel,
            gamma: s.gamma,
            digest: s.digest,
            byte_size: s.byte_size,
            tensor_count: s.tensor_count,
            dtypes: s.dtypes,
            metadata: s.metadata,
            created_at: s.created_at,
        }
    }
}

/// A run with its manifest and stored reconstructions.
#[derive(Serialize, ToSchema)]
pub struct RunDetail {
    /// The run.
    pub run: RunView,
    /// Number of snapshots.
    pub snapshots: usize,
    /// Total bytes of the snapshots.
    pub bytes: u64,
    /// Latest snapshot time (reconstructions default to it).
    pub last_nimg: Option<i64>,
    /// The tensors every snapshot has.
    pub manifest: Vec<ManifestEntryView>,
    /// Reconstructions stored for this run, newest first.
    pub reconstructions: Vec<ReconstructionView>,
}

/// What an upload did.
#[derive(Serialize, ToSchema)]
#[schema(as = Ingested)]
pub struct IngestedView {
    /// Training time in images.
    pub nimg: u64,
    /// EMA width.
    pub sigma_rel: f64,
    /// Digest of the stored file (64 hex digits).
    pub digest: String,
    /// File size.
    pub bytes: u64,
    /// False when the same snapshot was already stored (idempotent re-upload).
    pub inserted: bool,
}

impl From<Ingested> for IngestedView {
    fn from(i: Ingested) -> Self {
        IngestedView {
            nimg: i.nimg,
            sigma_rel: i.sigma_rel,
            digest: i.digest.to_hex(),
            bytes: i.bytes,
            inserted: i.inserted,
        }
    }
}

/// What `DELETE /runs/{run}/snapshots/{id}` did.
#[derive(Serialize, ToSchema)]
#[schema(as = DeletedSnapshot)]
pub struct DeletedSnapshotView {
    /// The snapshot that was deleted.
    pub deleted: SnapshotView,
    /// Whether its file left the store (false when other rows still refer to it).
    pub blob_removed: bool,
}

/// Element type of reconstructed floating-point tensors, as requests name it.
#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = OutDtype)]
pub enum DtypeView {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl From<DtypeView> for OutDtype {
    fn from(d: DtypeView) -> Self {
        match d {
            DtypeView::F32 => OutDtype::F32,
            DtypeView::F16 => OutDtype::F16,
            DtypeView::BF16 => OutDtype::BF16,
        }
    }
}

/// What a reconstruction does with the float tensors the snapshots declare as buffers
/// (`hindsight.buffers` in their `__metadata__`).
#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = Buffers)]
pub enum BuffersView {
    /// Averaged with the parameters' weights (the default; needs no declaration).
    Average,
    /// Copied from the newest snapshot with a non-zero weight, as EDM2's
    /// `reconstruct_phema.py` does; every snapshot must declare its buffers.
    Copy,
}

impl From<BuffersView> for crate::materialize::Buffers {
    fn from(b: BuffersView) -> Self {
        match b {
            BuffersView::Average => Self::Average,
            BuffersView::Copy => Self::Copy,
        }
    }
}

/// A reconstruction as the API shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ReconstructionView {
    /// Id (the cache key, 64 hex digits).
    pub id: String,
    /// `ready` or `running`.
    pub status: String,
    /// Where to poll this reconstruction.
    pub status_url: String,
    /// Where to download the weights (once ready).
    pub weights_url: String,
    /// The run.
    pub run: String,
    /// Training time reconstructed at.
    pub nimg: u64,
    /// Target width.
    pub sigma_rel: f64,
    /// Target exponent.
    pub gamma: f64,
    /// Output element type.
    pub dtype: String,
    /// File name for the download.
    pub file_name: String,
    /// Digest of the safetensors file (when ready).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Its size in bytes (when ready).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byte_size: Option<u64>,
    /// True when the store already held it before this request.
    pub cached: bool,
    /// The solver's quality report and the weighted snapshots.
    pub report: QualityReport,
    /// When it was stored (RFC 3339), when ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// Several reconstructions, in request order.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ReconstructionList {
    /// The reconstructions.
    pub reconstructions: Vec<ReconstructionView>,
}

/// `(status URL, weights URL)` of reconstruction `id`.
pub fn urls(id: &str) -> (String, String) {
    (
        format!("/reconstructions/{id}"),
        format!("/reconstructions/{id}/weights"),
    )
}

impl ReconstructionView {
    /// A stored reconstruction; `cached` says whether it was stored before this request.
    pub fn ready(row: &ReconstructionRow, cached: bool) -> Self {
        let (status_url, weights_url) = urls(&row.id);
        ReconstructionView {
            id: row.id.clone(),
            status: "ready".into(),
            status_url,
            weights_url,
            run: row.run.clone(),
            nimg: row.nimg as u64,
            sigma_rel: row.sigma_rel,
            gamma: row.gamma,
            dtype: row.dtype.clone(),
            file_name: file_name(&row.run, row.nimg, row.sigma_rel),
            digest: Some(row.digest.clone()),
            byte_size: Some(row.byte_size as u64),
            cached,
            report: row.report.clone(),
            created_at: Some(row.created_at.clone()),
        }
    }

    /// Target `t` of `plan`, still being computed.
    pub fn running(plan: &Plan, t: usize) -> Self {
        let target = &plan.targets[t];
        let s = &target.solution;
        let (status_url, weights_url) = urls(&target.id);
        ReconstructionView {
            id: target.id.clone(),
            status: "running".into(),
            status_url,
            weights_url,
            run: plan.run.name.clone(),
            nimg: s.nimg,
            sigma_rel: s.sigma_rel,
            gamma: s.gamma,
            dtype: plan.dtype.as_str().into(),
            file_name: file_name(&plan.run.name, s.nimg as i64, s.sigma_rel),
            digest: None,
            byte_size: None,
            cached: false,
            report: report(plan, target),
            created_at: None,
        }
    }
}

/// The answer to `POST /reconstruct`: one reconstruction for a scalar request, a list for a
/// list (in request order); with status 202 the ones still computing say `running`.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ReconstructResponse {
    /// A scalar request's reconstruction.
    One(Box<ReconstructionView>),
    /// A list request's reconstructions.
    Many(ReconstructionList),
}

/// A reconstruction still being computed (`GET /reconstructions/{id}` answers 202).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ReconstructionPending {
    /// Its id (64 hex digits).
    pub id: String,
    /// Always `running`.
    pub status: String,
    /// Where to ask again.
    pub status_url: String,
    /// Where the weights will be.
    pub weights_url: String,
}

/// How a request's bearer token stands (`GET /auth`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TokenStatus {
    /// No `Authorization: Bearer` header was sent.
    None,
    /// A token (or a malformed `Authorization` header) the server does not accept.
    Invalid,
    /// A token the server knows.
    Valid,
}

/// `GET /auth`: whether this client may change state (upload, delete, start sweeps, evaluate)
/// with the token it sent. Reports; never answers 401 itself.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AuthStatus {
    /// Whether the server needs a token for requests other than GET and HEAD.
    pub tokens_required: bool,
    /// The token this request carried, judged against the server's tokens.
    pub token: TokenStatus,
    /// Whether a request that changes state, sent with the same header, would pass the token
    /// check: false when tokens are required and the token is missing or invalid. (A server
    /// without tokens lets everything through, and reports a token it does not know as
    /// `invalid`: a client configured with one may be pointed at the wrong server.)
    pub can_write: bool,
}

/// `GET /healthz`: the server and its index answer.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}
