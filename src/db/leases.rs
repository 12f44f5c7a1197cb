//! The `sweep_leases` and `sweep_lease_metrics` tables: every lease taken on a sweep point
//! (what a sweep shows as its workers and failed attempts), and the user metrics an external
//! evaluator reported under its lease.
//!
//! External evaluators name their lease in every write; [`Db::live_lease`] turns a lease id
//! into its row or the error the client sees (no such lease; ended; ran out). The writes
//! themselves re-check the lease inside their transaction (`sweeps::holds` with the current
//! time), so a lease that runs out between the check and the write records nothing.

use serde::{Deserialize, Serialize};
use sqlx::FromRow;

use super::connection::{finish, Db};
use super::sweeps::{extend_lease, holds, Evaluator, LeaseOutcome};
use crate::error::{Error, Result};

/// One lease on a sweep point.
#[derive(Clone, Debug, PartialEq, FromRow, Serialize, Deserialize)]
pub struct LeaseRow {
    /// Its id (`ls_…`).
    pub lease_id: String,
    /// The sweep.
    pub sweep_id: i64,
    /// The point's index.
    pub point_idx: i64,
    /// The worker's name.
    pub worker: String,
    /// Builtin worker or external evaluator.
    pub evaluator: Evaluator,
    /// RFC 3339 UTC.
    pub claimed_at: String,
    /// RFC 3339 UTC: the last heartbeat or recorded write.
    pub heartbeat_at: String,
    /// Expiry, Unix milliseconds.
    pub expires_ms: i64,
    /// RFC 3339 UTC, once ended.
    pub ended_at: Option<String>,
    /// How it ended (`None`: open).
    pub outcome: Option<LeaseOutcome>,
    /// The evaluator's message (a failure's reason).
    pub message: Option<String>,
}

const LEASE_SELECT: &str = "SELECT lease_id, sweep_id, point_idx, worker, evaluator, claimed_at, \
     heartbeat_at, expires_ms, ended_at, outcome, message FROM sweep_leases";

/// A Unix-ms instant as RFC 3339 UTC (what error messages and the wire show).
pub fn ms_to_rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Db {
    /// A lease by id.
    pub async fn lease(&self, id: &str) -> Result<Option<LeaseRow>> {
        Ok(
            sqlx::query_as::<_, LeaseRow>(&format!("{LEASE_SELECT} WHERE lease_id = ?"))
                .bind(id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Every lease of a sweep, oldest first.
    pub async fn sweep_leases(&self, sweep: i64) -> Result<Vec<LeaseRow>> {
        Ok(sqlx::query_as::<_, LeaseRow>(&format!(
            "{LEASE_SELECT} WHERE sweep_id = ? ORDER BY claimed_at, lease_id"
        ))
        .bind(sweep)
        .fetch_all(self.pool())
        .await?)
    }

    /// Lease `id` if it is open and has not run out at `now` (Unix ms):
    /// [`Error::NotFound`] for an unknown id, [`Error::LeaseLost`] for one that ended, ran
    /// out, or whose sweep was cancelled.
    pub async fn live_lease(&self, id: &str, now: i64) -> Result<LeaseRow> {
        let row = self.lease(id).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "lease: no lease {id:?} (claim a point with POST /evaluations/claim)"
            ))
        })?;
        if let Some(outcome) = row.outcome {
            let how = match outcome {
                LeaseOutcome::Done => "the point is recorded",
                LeaseOutcome::Failed => "its evaluator reported a failure",
                LeaseOutcome::Released => "its evaluator gave the point back",
                LeaseOutcome::Expired => "it ran out and another evaluator took the point",
                LeaseOutcome::Cancelled => "the sweep was cancelled",
            };
            return Err(Error::LeaseLost(format!(
                "lease {id} ended at {}: {how}; claim again",
                row.ended_at.as_deref().unwrap_or("?")
            )));
        }
        let mut conn = self.pool().acquire().await?;
        if !holds(&mut conn, row.sweep_id, row.point_idx, id, Some(now)).await? {
            return Err(Error::LeaseLost(if row.expires_ms < now {
                format!(
                    "lease {id} ran out at {} (no heartbeat or write since {}); the point went \
                     back to the queue: claim again",
                    ms_to_rfc3339(row.expires_ms),
                    row.heartbeat_at
                )
            } else {
                format!("lease {id} no longer holds its point (the sweep was cancelled)")
            }));
        }
        Ok(row)
    }

    /// A heartbeat: extends live lease `id` to `expires`. Errors as [`Db::live_lease`].
    pub async fn heartbeat_lease(&self, id: &str, now: i64, expires: i64) -> Result<LeaseRow> {
        let row = self.live_lease(id, now).await?;
        let mut conn = self.begin_immediate().await?;
        let result = async {
            if !holds(&mut conn, row.sweep_id, row.point_idx, id, Some(now)).await? {
                return Ok(false);
            }
            extend_lease(&mut conn, row.sweep_id, row.point_idx, id, expires).await?;
            Ok(true)
        }
        .await;
        if !finish(&mut conn, result).await? {
            // Lost between the two looks: report it as the first look would now.
            self.live_lease(id, now).await?;
            return Err(Error::LeaseLost(format!("lease {id} was lost")));
        }
        Ok(self.lease(id).await?.unwrap_or(row))
    }

    /// Records user metrics under live lease `id` (and extends it to `expires`). A metric
    /// recorded already is left alone when its values are equal and refused
    /// ([`Error::Conflict`], nothing recorded) when they differ.
    pub async fn record_lease_metrics(
        &self,
        id: &str,
        now: i64,
        expires: i64,
        values: &[(String, Vec<f64>)],
    ) -> Result<()> {
        let row = self.live_lease(id, now).await?;
        let mut conn = self.begin_immediate().await?;
        let result = async {
            if !holds(&mut conn, row.sweep_id, row.point_idx, id, Some(now)).await? {
                return Err(Error::LeaseLost(format!(
                    "lease {id} ran out while recording; claim again"
                )));
            }
            for (name, list) in values {
                let recorded: Option<String> = sqlx::query_scalar(
                    "SELECT value_list FROM sweep_lease_metrics WHERE lease_id = ? AND name = ?",
                )
                .bind(id)
                .bind(name)
                .fetch_optional(&mut *conn)
                .await?;
                let text = serde_json::to_string(list).map_err(|e| Error::Index(e.to_string()))?;
                match recorded {
                    Some(old) => {
                        let old: Vec<f64> = serde_json::from_str(&old)
                            .map_err(|e| Error::Index(format!("a recorded metric: {e}")))?;
                        if old != *list {
                            return Err(Error::Conflict(format!(
                                "metrics.{name}: already recorded under this lease as {old:?}, \
                                 not {list:?}"
                            )));
                        }
                    }
                    None => {
                        sqlx::query(
                            "INSERT INTO sweep_lease_metrics (lease_id, name, value_list) \
                             VALUES (?, ?, ?)",
                        )
                        .bind(id)
                        .bind(name)
                        .bind(text)
                        .execute(&mut *conn)
                        .await?;
                    }
                }
            }
            extend_lease(&mut conn, row.sweep_id, row.point_idx, id, expires).await?;
            Ok(())
        }
        .await;
        finish(&mut conn, result).await
    }

    /// The user metrics recorded under lease `id`, by name.
    pub async fn lease_metrics(&self, id: &str) -> Result<Vec<(String, Vec<f64>)>> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT name, value_list FROM sweep_lease_metrics WHERE lease_id = ? ORDER BY name",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|(name, text)| {
                let values = serde_json::from_str(&text)
                    .map_err(|e| Error::Index(format!("metric {name}: {e}")))?;
                Ok((name, values))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_ms_as_rfc3339() {
        assert_eq!(ms_to_rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(ms_to_rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(ms_to_rfc3339(1_796_601_600_000), "2026-12-07T00:00:00.000Z");
    }
}
