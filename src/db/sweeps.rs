//! The `sweeps`, `sweep_points` and `sweep_batches` tables: the durable job queue of sweeps.
//!
//! A point is the unit of work. A worker claims one with a lease (its id and an expiry in
//! Unix milliseconds) and renews the lease while it works; every write it makes checks, in
//! the same transaction, that it still holds the lease, so a worker that lost its point (it
//! stalled past the expiry, or the sweep was cancelled) cannot record anything. A point whose
//! lease expired goes back to the queue, and the next worker resumes it from its recorded
//! batches. Nothing here depends on SQLite beyond `BEGIN IMMEDIATE`; on a shared database the
//! same statements run with `SELECT … FOR UPDATE SKIP LOCKED`.

use serde::{Deserialize, Serialize};
use sqlx::{FromRow, SqliteConnection};

use super::connection::{finish, json_text, Db};
use crate::error::{Error, Result};

/// Where a sweep or a point is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "TEXT", rename_all = "snake_case")]
pub enum SweepStatus {
    /// Waiting for a worker.
    Queued,
    /// A worker holds it (a sweep: at least one point has started).
    Running,
    /// Finished with results.
    Done,
    /// Finished without results (a point), or with some points failed (a sweep).
    Failed,
    /// Cancelled; points finished before stay.
    Cancelled,
}

impl SweepStatus {
    /// Whether nothing more will happen to it.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }

    /// The name as stored and sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Who evaluates a sweep's points.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    sqlx::Type,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "TEXT", rename_all = "snake_case")]
pub enum Evaluator {
    /// hindsight's own workers: the EDM2 network the run records, EDM's Heun sampler.
    #[default]
    Builtin,
    /// The user's own code, over the HTTP lease protocol (`/evaluations/...`).
    External,
}

impl Evaluator {
    /// The name as stored and sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Builtin => "builtin",
            Self::External => "external",
        }
    }
}

/// How a lease ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "TEXT", rename_all = "snake_case")]
pub enum LeaseOutcome {
    /// The point was recorded.
    Done,
    /// The evaluator gave up on the point (its message says why).
    Failed,
    /// The evaluator stopped and gave the point back.
    Released,
    /// It ran out and another evaluator took the point.
    Expired,
    /// The sweep was cancelled.
    Cancelled,
}

/// A sweep with its totals.
#[derive(Clone, Debug, PartialEq, FromRow, Serialize, Deserialize)]
pub struct SweepRow {
    /// Row id.
    pub id: i64,
    /// The run's name.
    pub run: String,
    /// The run's row id.
    pub run_id: i64,
    /// The reference statistics' id (none: an external sweep with only user metrics).
    pub reference_id: Option<i64>,
    /// Who evaluates its points.
    pub evaluator: Evaluator,
    /// The validated request (`sweep::SweepSpec` as JSON; column `request`).
    #[sqlx(json, rename = "request")]
    pub spec: serde_json::Value,
    /// Status.
    pub status: SweepStatus,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC, once terminal.
    pub finished_at: Option<String>,
    /// Points in all.
    pub points: i64,
    /// Points done.
    pub points_done: i64,
    /// Points failed.
    pub points_failed: i64,
    /// Images whose features are recorded, over all points.
    pub images_done: i64,
}

/// A point of a sweep, with its progress.
#[derive(Clone, Debug, PartialEq, FromRow, Serialize, Deserialize)]
pub struct PointRow {
    /// The sweep.
    pub sweep_id: i64,
    /// Position in the sweep (σ_rel fastest, then nimg).
    pub idx: i64,
    /// EMA width.
    pub sigma_rel: f64,
    /// Training time.
    pub nimg: i64,
    /// Status.
    pub status: SweepStatus,
    /// The open lease's id.
    pub lease_owner: Option<String>,
    /// The worker holding the open lease.
    pub lease_worker: Option<String>,
    /// Lease expiry, Unix milliseconds.
    pub lease_expires: Option<i64>,
    /// Claims so far.
    pub attempts: i64,
    /// The reconstruction whose images the recorded batches hold.
    pub reconstruction_id: Option<String>,
    /// Metrics and timings once done.
    #[sqlx(json(nullable))]
    pub result: Option<serde_json::Value>,
    /// Why it failed (or why its last attempt did).
    pub error: Option<String>,
    /// PNG grid of its first images.
    pub grid_digest: Option<String>,
    /// `.npz` statistics of all its images.
    pub stats_digest: Option<String>,
    /// RFC 3339 UTC, first claim.
    pub started_at: Option<String>,
    /// RFC 3339 UTC, once terminal.
    pub finished_at: Option<String>,
    /// Batches recorded (of the current reconstruction).
    pub batches_done: i64,
    /// Images in them.
    pub images_done: i64,
    /// Seconds spent in them.
    pub batch_seconds: f64,
}

/// A recorded batch of a point.
#[derive(Clone, Debug, PartialEq, FromRow, Serialize, Deserialize)]
pub struct BatchRow {
    /// Batch number (images `batch · size …`).
    pub batch: i64,
    /// Images in it.
    pub images: i64,
    /// `.npy` f32 features `[images, dims]`.
    pub features_digest: String,
    /// Seconds it took (sampling, features, storing).
    pub seconds: f64,
    /// Seconds of sampling.
    pub sample_seconds: f64,
    /// Seconds of features.
    pub features_seconds: f64,
    /// Who computed the features: `server` or `client`.
    pub features_by: String,
}

/// A point a worker holds.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The point.
    pub point: PointRow,
    /// Its sweep.
    pub sweep: SweepRow,
    /// The lease's id: what every later write of the worker names.
    pub owner: String,
    /// The worker.
    pub worker: String,
}

/// Which points a claim may take.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClaimFilter {
    /// Only points of sweeps evaluated so.
    pub evaluator: Evaluator,
    /// Only this sweep's points.
    pub sweep: Option<i64>,
    /// Only points of this run's sweeps (its row id).
    pub run_id: Option<i64>,
}

/// What recording a batch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchWrite {
    /// It is recorded now.
    Recorded,
    /// It was recorded already, from the same upload (or, builtin, the same worker's work).
    AlreadyRecorded,
    /// It was recorded already from a different upload: nothing changed.
    Different,
    /// The lease is lost (or the point's reconstruction is another): nothing recorded.
    LeaseLost,
}

/// A batch to record.
#[derive(Clone, Debug)]
pub struct NewBatch {
    /// Batch number.
    pub batch: i64,
    /// The reconstruction its images come from.
    pub reconstruction_id: String,
    /// Images.
    pub images: i64,
    /// Claimed blob of its features.
    pub features_digest: String,
    /// Seconds in all.
    pub seconds: f64,
    /// Seconds of sampling.
    pub sample_seconds: f64,
    /// Seconds of features.
    pub features_seconds: f64,
    /// Claimed blob of the point's image grid (first batch only).
    pub grid_digest: Option<String>,
    /// Who computed the features: `server` or `client`.
    pub features_by: &'static str,
    /// BLAKE3 (hex) of an uploaded batch's body: a repeated upload must match it.
    pub upload_digest: Option<String>,
}

const SWEEP_SELECT: &str = "SELECT s.id, runs.name AS run, s.run_id, s.reference_id, \
     s.evaluator, s.request, s.status, s.created_at, s.finished_at, \
     (SELECT count(*) FROM sweep_points p WHERE p.sweep_id = s.id) AS points, \
     (SELECT count(*) FROM sweep_points p WHERE p.sweep_id = s.id AND p.status = 'done') \
       AS points_done, \
     (SELECT count(*) FROM sweep_points p WHERE p.sweep_id = s.id AND p.status = 'failed') \
       AS points_failed, \
     (SELECT coalesce(sum(b.images), 0) FROM sweep_batches b JOIN sweep_points p \
        ON p.sweep_id = b.sweep_id AND p.idx = b.point_idx \
        AND p.reconstruction_id = b.reconstruction_id WHERE b.sweep_id = s.id) AS images_done \
     FROM sweeps s JOIN runs ON runs.id = s.run_id";

const POINT_SELECT: &str = "SELECT p.sweep_id, p.idx, p.sigma_rel, p.nimg, p.status, \
     p.lease_owner, (SELECT l.worker FROM sweep_leases l WHERE l.lease_id = p.lease_owner) \
       AS lease_worker, p.lease_expires, p.attempts, p.reconstruction_id, p.result, p.error, \
     p.grid_digest, p.stats_digest, p.started_at, p.finished_at, \
     count(b.batch) AS batches_done, coalesce(sum(b.images), 0) AS images_done, \
     coalesce(sum(b.seconds), 0.0) AS batch_seconds \
     FROM sweep_points p LEFT JOIN sweep_batches b ON b.sweep_id = p.sweep_id \
       AND b.point_idx = p.idx AND b.reconstruction_id = p.reconstruction_id";

const NOW_TEXT: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// Whether lease `owner` holds point (`sweep`, `idx`) and it is running; with `now` (Unix
/// ms), also whether the lease has not run out (external evaluators' writes are strict: an
/// expired lease records nothing even before another evaluator takes the point).
pub(super) async fn holds(
    conn: &mut SqliteConnection,
    sweep: i64,
    idx: i64,
    owner: &str,
    now: Option<i64>,
) -> Result<bool> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sweep_points p JOIN sweeps s ON s.id = p.sweep_id \
         WHERE p.sweep_id = ? AND p.idx = ? AND p.lease_owner = ? AND p.status = 'running' \
         AND s.status = 'running' AND (?4 IS NULL OR p.lease_expires >= ?4)",
    )
    .bind(sweep)
    .bind(idx)
    .bind(owner)
    .bind(now)
    .fetch_one(conn)
    .await?;
    Ok(n == 1)
}

/// Closes lease `lease` with `outcome` (and `message`), if it is open.
pub(super) async fn end_lease(
    conn: &mut SqliteConnection,
    lease: &str,
    outcome: LeaseOutcome,
    message: Option<&str>,
) -> Result<()> {
    sqlx::query(&format!(
        "UPDATE sweep_leases SET outcome = ?, message = ?, ended_at = {NOW_TEXT} \
         WHERE lease_id = ? AND outcome IS NULL"
    ))
    .bind(outcome)
    .bind(message)
    .bind(lease)
    .execute(conn)
    .await?;
    Ok(())
}

/// Sets the expiry of lease `lease` (point and lease row) to `expires` and notes a heartbeat.
pub(super) async fn extend_lease(
    conn: &mut SqliteConnection,
    sweep: i64,
    idx: i64,
    lease: &str,
    expires: i64,
) -> Result<()> {
    sqlx::query("UPDATE sweep_points SET lease_expires = ? WHERE sweep_id = ? AND idx = ?")
        .bind(expires)
        .bind(sweep)
        .bind(idx)
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!(
        "UPDATE sweep_leases SET expires_ms = ?, heartbeat_at = {NOW_TEXT} WHERE lease_id = ?"
    ))
    .bind(expires)
    .bind(lease)
    .execute(conn)
    .await?;
    Ok(())
}

/// A new lease id: `ls_` and 32 hex digits of 128 random bits.
pub fn new_lease_id() -> String {
    format!("ls_{:032x}", rand::random::<u128>())
}

/// Ends the sweep if no point is left to do: `failed` if a point failed, else `done`.
async fn settle(conn: &mut SqliteConnection, sweep: i64) -> Result<()> {
    sqlx::query(&format!(
        "UPDATE sweeps SET finished_at = {NOW_TEXT}, status = CASE WHEN EXISTS \
           (SELECT 1 FROM sweep_points WHERE sweep_id = ?1 AND status = 'failed') \
           THEN 'failed' ELSE 'done' END \
         WHERE id = ?1 AND status IN ('queued', 'running') AND NOT EXISTS \
           (SELECT 1 FROM sweep_points WHERE sweep_id = ?1 AND status IN ('queued', 'running'))"
    ))
    .bind(sweep)
    .execute(conn)
    .await?;
    Ok(())
}

impl Db {
    /// Records a new sweep over `points` (σ_rel, nimg), all queued. Returns its id.
    ///
    /// `max_unfinished` = (per run, in all): with that many sweeps queued or running, the
    /// new one is refused ([`Error::LimitReached`]), checked in the same transaction as the
    /// insert.
    pub async fn insert_sweep(
        &self,
        run_id: i64,
        reference_id: Option<i64>,
        evaluator: Evaluator,
        request: &serde_json::Value,
        points: &[(f64, u64)],
        max_unfinished: (usize, usize),
    ) -> Result<i64> {
        let mut conn = self.begin_immediate().await?;
        let result = async {
            let (of_run, in_all): (i64, i64) = sqlx::query_as(
                "SELECT COALESCE(SUM(run_id = ?), 0), COUNT(*) FROM sweeps \
                 WHERE status IN ('queued', 'running')",
            )
            .bind(run_id)
            .fetch_one(&mut *conn)
            .await?;
            let (per_run, total) = max_unfinished;
            if of_run as usize >= per_run {
                return Err(Error::LimitReached(format!(
                    "the run has {of_run} unfinished sweeps, the most this server keeps \
                     queued per run ({per_run}); wait for one to finish or cancel one"
                )));
            }
            if in_all as usize >= total {
                return Err(Error::LimitReached(format!(
                    "the server has {in_all} unfinished sweeps, the most it keeps queued \
                     ({total}); wait for one to finish or cancel one"
                )));
            }
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO sweeps (run_id, reference_id, evaluator, request, status) \
                 VALUES (?, ?, ?, ?, 'queued') RETURNING id",
            )
            .bind(run_id)
            .bind(reference_id)
            .bind(evaluator)
            .bind(json_text(request))
            .fetch_one(&mut *conn)
            .await?;
            for (idx, &(sigma_rel, nimg)) in points.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO sweep_points (sweep_id, idx, sigma_rel, nimg, status) \
                     VALUES (?, ?, ?, ?, 'queued')",
                )
                .bind(id)
                .bind(idx as i64)
                .bind(sigma_rel)
                .bind(nimg as i64)
                .execute(&mut *conn)
                .await?;
            }
            Ok(id)
        }
        .await;
        finish(&mut conn, result).await
    }

    /// A sweep by id.
    pub async fn sweep(&self, id: i64) -> Result<Option<SweepRow>> {
        Ok(
            sqlx::query_as::<_, SweepRow>(&format!("{SWEEP_SELECT} WHERE s.id = ?"))
                .bind(id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Every sweep, newest first (of one run when `run_id` is given).
    pub async fn sweeps(&self, run_id: Option<i64>) -> Result<Vec<SweepRow>> {
        Ok(sqlx::query_as::<_, SweepRow>(&format!(
            "{SWEEP_SELECT} WHERE ?1 IS NULL OR s.run_id = ?1 ORDER BY s.id DESC"
        ))
        .bind(run_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// One page of sweeps, newest first: at most `limit`, with ids below `before` when
    /// given (the last id of the previous page), of one run when `run_id` is given.
    pub async fn sweeps_page(
        &self,
        run_id: Option<i64>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<SweepRow>> {
        Ok(sqlx::query_as::<_, SweepRow>(&format!(
            "{SWEEP_SELECT} WHERE (?1 IS NULL OR s.run_id = ?1) AND (?2 IS NULL OR s.id < ?2) \
             ORDER BY s.id DESC LIMIT ?3"
        ))
        .bind(run_id)
        .bind(before)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?)
    }

    /// A cheap summary of a sweep's state that changes whenever anything an observer sees
    /// changes (its status, a point's status or reconstruction, a batch recorded): what the
    /// server's event-stream watcher polls. `None` when there is no such sweep.
    pub async fn sweep_fingerprint(&self, id: i64) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT s.status || '|' || \
               (SELECT count(*) || ':' || coalesce(sum(b.images), 0) FROM sweep_batches b \
                WHERE b.sweep_id = s.id) || '|' || \
               coalesce((SELECT group_concat(p.status || coalesce(p.reconstruction_id, '') \
                 || coalesce(p.attempts, 0), ',') FROM sweep_points p WHERE p.sweep_id = s.id), '') \
             FROM sweeps s WHERE s.id = ?",
        )
        .bind(id)
        .fetch_optional(self.pool())
        .await?)
    }

    /// The points of a sweep, in order.
    pub async fn sweep_points(&self, sweep: i64) -> Result<Vec<PointRow>> {
        Ok(sqlx::query_as::<_, PointRow>(&format!(
            "{POINT_SELECT} WHERE p.sweep_id = ? GROUP BY p.sweep_id, p.idx ORDER BY p.idx"
        ))
        .bind(sweep)
        .fetch_all(self.pool())
        .await?)
    }

    async fn sweep_point(&self, sweep: i64, idx: i64) -> Result<PointRow> {
        sqlx::query_as::<_, PointRow>(&format!(
            "{POINT_SELECT} WHERE p.sweep_id = ? AND p.idx = ? GROUP BY p.sweep_id, p.idx"
        ))
        .bind(sweep)
        .bind(idx)
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| Error::Index(format!("sweep {sweep} point {idx} vanished")))
    }

    /// The recorded batches of a point for `reconstruction_id`, in order.
    pub async fn sweep_batches(
        &self,
        sweep: i64,
        idx: i64,
        reconstruction_id: &str,
    ) -> Result<Vec<BatchRow>> {
        Ok(sqlx::query_as::<_, BatchRow>(
            "SELECT batch, images, features_digest, seconds, sample_seconds, features_seconds, \
             features_by FROM sweep_batches \
             WHERE sweep_id = ? AND point_idx = ? AND reconstruction_id = ? ORDER BY batch",
        )
        .bind(sweep)
        .bind(idx)
        .bind(reconstruction_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// The BLAKE3 of the upload batch `batch` of a point was recorded from (`None`: not an
    /// upload, or no such batch).
    pub async fn batch_upload_digest(
        &self,
        sweep: i64,
        idx: i64,
        batch: i64,
        reconstruction_id: &str,
    ) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT upload_digest FROM sweep_batches WHERE sweep_id = ? AND point_idx = ? \
             AND batch = ? AND reconstruction_id = ?",
        )
        .bind(sweep)
        .bind(idx)
        .bind(batch)
        .bind(reconstruction_id)
        .fetch_optional(self.pool())
        .await?
        .flatten())
    }

    /// Claims the first point to do — queued, or running under an expired lease — for
    /// `worker` until `expires` (Unix ms), among the points `filter` allows. `now` is the
    /// current Unix ms. A new lease is recorded (an expired one the point had is closed as
    /// `expired`); the sweep becomes `running`.
    pub async fn claim_point(
        &self,
        worker: &str,
        now: i64,
        expires: i64,
        filter: ClaimFilter,
    ) -> Result<Option<Claim>> {
        let lease = new_lease_id();
        let mut conn = self.begin_immediate().await?;
        let result = async {
            let found: Option<(i64, i64, Option<String>)> = sqlx::query_as(
                "SELECT p.sweep_id, p.idx, p.lease_owner FROM sweep_points p \
                 JOIN sweeps s ON s.id = p.sweep_id \
                 WHERE s.status IN ('queued', 'running') AND s.evaluator = ?3 \
                   AND (p.status = 'queued' OR (p.status = 'running' AND p.lease_expires < ?1)) \
                   AND (?2 IS NULL OR p.sweep_id = ?2) AND (?4 IS NULL OR s.run_id = ?4) \
                 ORDER BY p.sweep_id, p.idx LIMIT 1",
            )
            .bind(now)
            .bind(filter.sweep)
            .bind(filter.evaluator)
            .bind(filter.run_id)
            .fetch_optional(&mut *conn)
            .await?;
            let Some((sweep, idx, previous)) = found else {
                return Ok(None);
            };
            if let Some(previous) = previous {
                end_lease(&mut conn, &previous, LeaseOutcome::Expired, None).await?;
            }
            sqlx::query(
                "INSERT INTO sweep_leases (lease_id, sweep_id, point_idx, worker, evaluator, \
                 expires_ms) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(&lease)
            .bind(sweep)
            .bind(idx)
            .bind(worker)
            .bind(filter.evaluator)
            .bind(expires)
            .execute(&mut *conn)
            .await?;
            sqlx::query(&format!(
                "UPDATE sweep_points SET status = 'running', lease_owner = ?, lease_expires = ?, \
                 attempts = attempts + 1, started_at = coalesce(started_at, {NOW_TEXT}) \
                 WHERE sweep_id = ? AND idx = ?"
            ))
            .bind(&lease)
            .bind(expires)
            .bind(sweep)
            .bind(idx)
            .execute(&mut *conn)
            .await?;
            sqlx::query("UPDATE sweeps SET status = 'running' WHERE id = ? AND status = 'queued'")
                .bind(sweep)
                .execute(&mut *conn)
                .await?;
            Ok(Some((sweep, idx)))
        }
        .await;
        let Some((sweep, idx)) = finish(&mut conn, result).await? else {
            return Ok(None);
        };
        let sweep_row = self
            .sweep(sweep)
            .await?
            .ok_or_else(|| Error::Index(format!("sweep {sweep} vanished")))?;
        Ok(Some(Claim {
            point: self.sweep_point(sweep, idx).await?,
            sweep: sweep_row,
            owner: lease,
            worker: worker.to_owned(),
        }))
    }

    /// Extends lease `owner` on a point to `expires`; false when it no longer holds it
    /// (expired and taken, or the sweep was cancelled).
    pub async fn renew_lease(
        &self,
        sweep: i64,
        idx: i64,
        owner: &str,
        expires: i64,
    ) -> Result<bool> {
        let mut conn = self.begin_immediate().await?;
        let result = async {
            if !holds(&mut conn, sweep, idx, owner, None).await? {
                return Ok(false);
            }
            extend_lease(&mut conn, sweep, idx, owner, expires).await?;
            Ok(true)
        }
        .await;
        finish(&mut conn, result).await
    }

    /// Fixes the reconstruction a point's images come from. Batches recorded for another
    /// reconstruction (the run gained snapshots since, so the solve changed) are dropped, so
    /// that features of two reconstructions never mix. False when the lease is lost.
    pub async fn pin_reconstruction(
        &self,
        sweep: i64,
        idx: i64,
        owner: &str,
        reconstruction_id: &str,
    ) -> Result<bool> {
        let mut conn = self.begin_immediate().await?;
        let result = async {
            if !holds(&mut conn, sweep, idx, owner, None).await? {
                return Ok(false);
            }
            let dropped = sqlx::query(
                "DELETE FROM sweep_batches WHERE sweep_id = ? AND point_idx = ? \
                 AND reconstruction_id != ?",
            )
            .bind(sweep)
            .bind(idx)
            .bind(reconstruction_id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            let grid = if dropped > 0 {
                ", grid_digest = NULL"
            } else {
                ""
            };
            sqlx::query(&format!(
                "UPDATE sweep_points SET reconstruction_id = ?{grid} \
                 WHERE sweep_id = ? AND idx = ?"
            ))
            .bind(reconstruction_id)
            .bind(sweep)
            .bind(idx)
            .execute(&mut *conn)
            .await?;
            Ok(true)
        }
        .await;
        finish(&mut conn, result).await
    }

    /// Records a finished batch (and the grid, with the first) and extends the lease to
    /// `expires`; with `strict` (now, Unix ms) the lease must not have run out. Records
    /// nothing when the lease is lost or the point's reconstruction is another
    /// ([`BatchWrite::LeaseLost`]). A batch already recorded is left as it was: an upload
    /// (`upload_digest`) is then compared with the recorded one.
    pub async fn record_batch(
        &self,
        sweep: i64,
        idx: i64,
        owner: &str,
        batch: &NewBatch,
        expires: i64,
        strict: Option<i64>,
    ) -> Result<BatchWrite> {
        let mut conn = self.begin_immediate().await?;
        let result = async {
            if !holds(&mut conn, sweep, idx, owner, strict).await? {
                return Ok(BatchWrite::LeaseLost);
            }
            let pinned: Option<String> = sqlx::query_scalar(
                "SELECT reconstruction_id FROM sweep_points WHERE sweep_id = ? AND idx = ?",
            )
            .bind(sweep)
            .bind(idx)
            .fetch_one(&mut *conn)
            .await?;
            if pinned.as_deref() != Some(batch.reconstruction_id.as_str()) {
                return Ok(BatchWrite::LeaseLost);
            }
            let existing: Option<Option<String>> = sqlx::query_scalar(
                "SELECT upload_digest FROM sweep_batches WHERE sweep_id = ? AND point_idx = ? \
                 AND batch = ? AND reconstruction_id = ?",
            )
            .bind(sweep)
            .bind(idx)
            .bind(batch.batch)
            .bind(&batch.reconstruction_id)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(recorded) = existing {
                extend_lease(&mut conn, sweep, idx, owner, expires).await?;
                return Ok(if recorded == batch.upload_digest {
                    BatchWrite::AlreadyRecorded
                } else {
                    BatchWrite::Different
                });
            }
            sqlx::query(
                "INSERT INTO sweep_batches (sweep_id, point_idx, batch, reconstruction_id, \
                 images, features_digest, seconds, sample_seconds, features_seconds, \
                 features_by, upload_digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(sweep)
            .bind(idx)
            .bind(batch.batch)
            .bind(&batch.reconstruction_id)
            .bind(batch.images)
            .bind(&batch.features_digest)
            .bind(batch.seconds)
            .bind(batch.sample_seconds)
            .bind(batch.features_seconds)
            .bind(batch.features_by)
            .bind(&batch.upload_digest)
            .execute(&mut *conn)
            .await?;
            super::blobs::mark_valid(&mut conn, &batch.features_digest).await?;
            if let Some(grid) = &batch.grid_digest {
                sqlx::query(
                    "UPDATE sweep_points SET grid_digest = ? WHERE sweep_id = ? AND idx = ?",
                )
                .bind(grid)
                .bind(sweep)
                .bind(idx)
                .execute(&mut *conn)
                .await?;
                super::blobs::mark_valid(&mut conn, grid).await?;
            }
            extend_lease(&mut conn, sweep, idx, owner, expires).await?;
            Ok(BatchWrite::Recorded)
        }
        .await;
        finish(&mut conn, result).await
    }

    /// Records a point's result (and its statistics blob) once: false, recording nothing,
    /// when the lease is lost. Ends the sweep when it was the last point.
    pub async fn finish_point(
        &self,
        sweep: i64,
        idx: i64,
        owner: &str,
        result: &serde_json::Value,
        stats_digest: Option<&str>,
        strict: Option<i64>,
    ) -> Result<bool> {
        let mut conn = self.begin_immediate().await?;
        let outcome = async {
            if !holds(&mut conn, sweep, idx, owner, strict).await? {
                return Ok(false);
            }
            end_lease(&mut conn, owner, LeaseOutcome::Done, None).await?;
            sqlx::query(&format!(
                "UPDATE sweep_points SET status = 'done', result = ?, stats_digest = ?, \
                 error = NULL, lease_owner = NULL, lease_expires = NULL, \
                 finished_at = {NOW_TEXT} WHERE sweep_id = ? AND idx = ?"
            ))
            .bind(json_text(result))
            .bind(stats_digest)
            .bind(sweep)
            .bind(idx)
            .execute(&mut *conn)
            .await?;
            if let Some(digest) = stats_digest {
                super::blobs::mark_valid(&mut conn, digest).await?;
            }
            settle(&mut conn, sweep).await?;
            Ok(true)
        }
        .await;
        finish(&mut conn, outcome).await
    }

    /// Gives up on a point for `error`: back to the queue when `retry` (a later worker tries
    /// again), else `failed`. The lease is closed as `outcome` (`Failed`, or `Released` for a
    /// graceful stop). False when the lease was lost already.
    pub async fn fail_point(
        &self,
        sweep: i64,
        idx: i64,
        owner: &str,
        error: &str,
        retry: bool,
        outcome: LeaseOutcome,
        strict: Option<i64>,
    ) -> Result<bool> {
        let mut conn = self.begin_immediate().await?;
        let outcome = async {
            if !holds(&mut conn, sweep, idx, owner, strict).await? {
                return Ok(false);
            }
            end_lease(&mut conn, owner, outcome, Some(error)).await?;
            let (status, finished) = if retry {
                ("queued", "NULL".to_owned())
            } else {
                ("failed", NOW_TEXT.to_owned())
            };
            sqlx::query(&format!(
                "UPDATE sweep_points SET status = '{status}', error = ?, lease_owner = NULL, \
                 lease_expires = NULL, finished_at = {finished} WHERE sweep_id = ? AND idx = ?"
            ))
            .bind(error)
            .bind(sweep)
            .bind(idx)
            .execute(&mut *conn)
            .await?;
            settle(&mut conn, sweep).await?;
            Ok(true)
        }
        .await;
        finish(&mut conn, outcome).await
    }

    /// Cancels a sweep: it and its unfinished points become `cancelled` (workers holding a
    /// point lose their lease at their next write). Returns the sweep, or `None` if there is
    /// no such sweep; a sweep already finished is returned unchanged.
    pub async fn cancel_sweep(&self, id: i64) -> Result<Option<SweepRow>> {
        let mut conn = self.begin_immediate().await?;
        let result = async {
            let changed = sqlx::query(&format!(
                "UPDATE sweeps SET status = 'cancelled', finished_at = {NOW_TEXT} \
                 WHERE id = ? AND status IN ('queued', 'running')"
            ))
            .bind(id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if changed == 1 {
                sqlx::query(&format!(
                    "UPDATE sweep_leases SET outcome = 'cancelled', ended_at = {NOW_TEXT} \
                     WHERE sweep_id = ? AND outcome IS NULL"
                ))
                .bind(id)
                .execute(&mut *conn)
                .await?;
                sqlx::query(&format!(
                    "UPDATE sweep_points SET status = 'cancelled', lease_owner = NULL, \
                     lease_expires = NULL, finished_at = {NOW_TEXT} \
                     WHERE sweep_id = ? AND status IN ('queued', 'running')"
                ))
                .bind(id)
                .execute(&mut *conn)
                .await?;
            }
            Ok(())
        }
        .await;
        finish(&mut conn, result).await?;
        self.sweep(id).await
    }
}
