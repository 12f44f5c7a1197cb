//! The `runs` table: named training runs with free-form JSON metadata.

use serde::{Deserialize, Serialize};
use sqlx::FromRow;

use super::connection::{finish, json_text, Db};
use crate::error::{Error, Result};

/// A training run.
#[derive(Clone, Debug, PartialEq, FromRow, Serialize, Deserialize)]
pub struct Run {
    /// Row id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// JSON object: training and network configuration, anything the trainer records.
    #[sqlx(json)]
    pub metadata: serde_json::Value,
    /// RFC 3339 UTC.
    pub created_at: String,
}

/// A run with totals, for listings.
#[derive(Clone, Debug, PartialEq, FromRow, Serialize, Deserialize)]
pub struct RunSummary {
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
    /// When something last happened to the run (RFC 3339 UTC): its creation, its newest
    /// snapshot, reconstruction or sweep (creation or end), whichever is latest.
    pub last_activity: String,
}

/// Run names appear in URLs and file names: 1 to 200 characters, not blank, no leading or
/// trailing white space, no slashes, backslashes, control or invisible characters (zero-width
/// spaces and the like) and no white space but plain spaces, and not `.` or `..`.
pub fn check_run_name(name: &str) -> Result<()> {
    check_name("run", "a run name", name)
}

/// The rules of [`check_run_name`] for any user-chosen name (runs, reference statistics):
/// errors name `field` and call the name `what` ("a run name").
pub fn check_name(field: &str, what: &str, name: &str) -> Result<()> {
    let shown: String = name.chars().take(60).collect();
    let shown = if shown.len() < name.len() {
        format!("{shown:?}…")
    } else {
        format!("{shown:?}")
    };
    let bad = |reason: String| Err(Error::invalid(field, format!("{shown}: {reason}")));
    if name.is_empty() || name.chars().count() > 200 {
        return bad(format!("{what} has 1 to 200 characters"));
    }
    if name.trim().is_empty() {
        return bad(format!("{what} may not be blank"));
    }
    if name.trim() != name {
        return bad(format!("{what} may not begin or end with white space"));
    }
    if !unicode_normalization::is_nfc(name) {
        return bad(format!(
            "{what} must be in Unicode NFC (composed characters, as most keyboards type \
             them), so that two names that look the same are the same"
        ));
    }
    if name == "." || name == ".." {
        return bad(format!("not usable as {what}"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return bad(format!(
            "{what} may not contain slashes, backslashes or control characters"
        ));
    }
    if name
        .chars()
        .any(|c| invisible(c) || (c.is_whitespace() && c != ' '))
    {
        return bad(format!(
            "{what} may not contain invisible characters (zero-width spaces, direction \
             marks, byte-order marks) or white space other than plain spaces: two names that \
             look the same must name the same thing"
        ));
    }
    Ok(())
}

/// Characters that render as nothing (Unicode format characters and the usual fillers).
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{E0000}'..='\u{E007F}'
        | '\u{E0100}'..='\u{E01EF}' | '\u{2800}' | '\u{FFF9}'..='\u{FFFB}'
        | '\u{1D173}'..='\u{1D17A}' | '\u{1BCA0}'..='\u{1BCA3}' | '\u{FDD0}'..='\u{FDEF}'
        | '\u{E000}'..='\u{F8FF}' | '\u{F0000}'..='\u{10FFFF}')
}

const SELECT_RUN: &str = "SELECT id, name, description, metadata, created_at FROM runs";

impl Db {
    /// Creates a run; an existing name is a conflict.
    pub async fn create_run(
        &self,
        name: &str,
        description: &str,
        metadata: &serde_json::Value,
    ) -> Result<Run> {
        if !metadata.is_object() {
            return Err(Error::invalid("metadata", "must be a JSON object"));
        }
        check_run_name(name)?;
        let result = sqlx::query_as::<_, Run>(
            "INSERT INTO runs (name, description, metadata) VALUES (?, ?, ?) \
             RETURNING id, name, description, metadata, created_at",
        )
        .bind(name)
        .bind(description)
        .bind(json_text(metadata))
        .fetch_one(self.pool())
        .await;
        match result {
            Ok(run) => Ok(run),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(Error::Conflict(format!("run {name:?} already exists")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The run with this name, if any.
    pub async fn run(&self, name: &str) -> Result<Option<Run>> {
        Ok(
            sqlx::query_as::<_, Run>(&format!("{SELECT_RUN} WHERE name = ?"))
                .bind(name)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// The run with this name, created (empty, with `metadata`) if it does not exist; the flag
    /// says whether this call created it.
    pub async fn run_or_create_with(
        &self,
        name: &str,
        metadata: &serde_json::Value,
    ) -> Result<(Run, bool)> {
        if let Some(run) = self.run(name).await? {
            return Ok((run, false));
        }
        match self.create_run(name, "", metadata).await {
            Ok(run) => Ok((run, true)),
            // Created concurrently by someone else: fine.
            Err(Error::Conflict(_)) => self
                .run(name)
                .await?
                .map(|run| (run, false))
                .ok_or_else(|| Error::Index(format!("run {name:?} vanished"))),
            Err(e) => Err(e),
        }
    }

    /// The run with this name, created empty if it does not exist.
    pub async fn run_or_create(&self, name: &str) -> Result<Run> {
        Ok(self
            .run_or_create_with(name, &serde_json::json!({}))
            .await?
            .0)
    }

    /// Deletes a run that has no snapshots and no reconstructions (one an ingest created and
    /// then failed to fill); returns whether it did.
    pub async fn delete_run_if_empty(&self, run_id: i64) -> Result<bool> {
        let mut conn = self.begin_immediate().await?;
        let result = sqlx::query(
            "DELETE FROM runs WHERE id = ? \
               AND NOT EXISTS (SELECT 1 FROM snapshots WHERE run_id = runs.id) \
               AND NOT EXISTS (SELECT 1 FROM reconstructions WHERE run_id = runs.id)",
        )
        .bind(run_id)
        .execute(&mut *conn)
        .await
        .map(|r| r.rows_affected() > 0)
        .map_err(Error::from);
        finish(&mut conn, result).await
    }

    /// Removes runs that an ingest created (no description, metadata `{}`) and that have
    /// stayed empty for longer than `grace`: no snapshot, manifest, reconstruction or sweep.
    /// Start-up recovery, for ingests killed before their first snapshot. Returns how many.
    pub async fn remove_abandoned_runs(&self, grace: std::time::Duration) -> Result<u64> {
        let cutoff = format!("-{} seconds", grace.as_secs());
        let mut conn = self.begin_immediate().await?;
        let result = sqlx::query(
            "DELETE FROM runs WHERE description = '' AND metadata = '{}' \
               AND created_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) \
               AND NOT EXISTS (SELECT 1 FROM snapshots WHERE run_id = runs.id) \
               AND NOT EXISTS (SELECT 1 FROM run_tensors WHERE run_id = runs.id) \
               AND NOT EXISTS (SELECT 1 FROM reconstructions WHERE run_id = runs.id) \
               AND NOT EXISTS (SELECT 1 FROM sweeps WHERE run_id = runs.id)",
        )
        .bind(cutoff)
        .execute(&mut *conn)
        .await
        .map(|r| r.rows_affected())
        .map_err(Error::from);
        finish(&mut conn, result).await
    }

    /// Every run with its totals, by name.
    pub async fn runs(&self) -> Result<Vec<RunSummary>> {
        Ok(sqlx::query_as::<_, RunSummary>(
            "SELECT r.name, r.description, r.created_at, \
                    COUNT(s.id) AS snapshots, COALESCE(SUM(s.byte_size), 0) AS bytes, \
                    MIN(s.nimg) AS first_nimg, MAX(s.nimg) AS last_nimg, \
                    MAX(r.created_at, COALESCE(MAX(s.created_at), ''), \
                        COALESCE((SELECT MAX(created_at) FROM reconstructions \
                                  WHERE run_id = r.id), ''), \
                        COALESCE((SELECT MAX(MAX(created_at, COALESCE(finished_at, ''))) \
                                  FROM sweeps WHERE run_id = r.id), '')) AS last_activity \
             FROM runs r LEFT JOIN snapshots s ON s.run_id = r.id \
             GROUP BY r.id ORDER BY r.name",
        )
        .fetch_all(self.pool())
        .await?)
    }
}
