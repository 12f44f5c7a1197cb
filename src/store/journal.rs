//! The journal, `journal.jsonl`: one JSON line per snapshot recorded or deleted, appended
//! after the index committed, so that `rebuild-index` can give a lost index its snapshots back
//! with their runs, times, widths and update rules (which the blobs alone may not say).
//!
//! One line is one [`JournalRecord`], tagged by `"op"`:
//!
//! ```text
//! {"digest":"<64 hex>","gamma":6.94,"nimg":8388608,"op":"snapshot","profile":null,"run":"r","sigma_rel":0.05}
//! {"digest":"<64 hex>","nimg":8388608,"op":"delete","run":"r","sigma_rel":0.05}
//! ```
//!
//! Keys are written in sorted order (what journals written before the records were typed
//! hold, byte for byte); readers do not depend on it.
//!
//! The index stays the authority: a failed append is logged by its caller, not fatal, and
//! the journal is only read when the index is rebuilt. This is the one place where the store
//! names snapshot terms; it carries them without interpreting them.

use std::fs;
use std::io::{self, Write};

use serde::{Deserialize, Deserializer, Serialize};

use super::digest::Digest;
use super::layout::{io_err, BlobStore};
use crate::error::{Error, Result};
use crate::phema::RealisedProfile;

const JOURNAL: &str = "journal.jsonl";

/// One line of the journal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum JournalRecord {
    /// A snapshot was recorded in the index (a new row, not an idempotent re-import).
    Snapshot {
        /// Its run's name.
        run: String,
        /// Its blob.
        digest: Digest,
        /// Training time in images.
        nimg: u64,
        /// EMA width, σ_rel.
        sigma_rel: f64,
        /// The same width as EDM2's power-function exponent γ.
        gamma: f64,
        /// The EMA's update rule when it is not EDM2's (`null` for EDM2's). A profile this
        /// version cannot read is taken as absent (the blob's own `__metadata__` may still
        /// name it), as before the records were typed.
        #[serde(default, deserialize_with = "profile_or_none")]
        profile: Option<RealisedProfile>,
    },
    /// A snapshot was deleted: cancels the earlier `snapshot` records of the same run, digest,
    /// time and width (widths compared as the index compares them, `db::same_width`).
    Delete {
        /// Its run's name.
        run: String,
        /// Its blob.
        digest: Digest,
        /// Training time in images.
        nimg: u64,
        /// EMA width, σ_rel.
        sigma_rel: f64,
    },
}

/// A profile, or `None` when the value is `null` or not a profile this version reads.
fn profile_or_none<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<RealisedProfile>, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(value).ok())
}

impl JournalRecord {
    /// The record as one journal line, without its newline.
    pub fn to_line(&self) -> String {
        // Through `Value`, whose map sorts its keys: the lines come out as the journal's
        // first writer (`json!`) wrote them.
        serde_json::to_value(self)
            .expect("journal records serialise")
            .to_string()
    }

    /// Reads one journal line.
    ///
    /// Errors: [`JournalLineError::UnknownOp`] for a JSON object whose `op` this version does
    /// not know (written by a later version), [`JournalLineError::Unreadable`] for anything
    /// else that is not a record (not JSON, a field missing or of the wrong type, a digest
    /// that is not 64 hex digits).
    pub fn parse(line: &str) -> std::result::Result<Self, JournalLineError> {
        serde_json::from_str(line).map_err(|e| {
            #[derive(Deserialize)]
            struct Op {
                op: String,
            }
            match serde_json::from_str::<Op>(line) {
                Ok(Op { op }) if !matches!(op.as_str(), "snapshot" | "delete") => {
                    JournalLineError::UnknownOp(op)
                }
                _ => JournalLineError::Unreadable(e.to_string()),
            }
        })
    }
}

/// Why a complete journal line is not a [`JournalRecord`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JournalLineError {
    /// A well-formed line whose `op` this version does not know.
    #[error("unknown journal op {0:?}")]
    UnknownOp(String),
    /// A damaged line.
    #[error("unreadable journal line: {0}")]
    Unreadable(String),
}

/// The journal as read back: its records, and what could not be read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Journal {
    /// The records of the readable lines, oldest first.
    pub records: Vec<JournalRecord>,
    /// Complete lines that are not records (damaged; see [`JournalLineError::Unreadable`]).
    pub unreadable: usize,
    /// Well-formed lines whose `op` this version does not know, skipped (each one logged).
    pub unknown_ops: usize,
}

impl BlobStore {
    /// Appends one record to the store's journal and makes it durable: one `write` of the
    /// whole line on a file opened for appending (so lines of concurrent writers do not
    /// interleave), then `fdatasync`. The journal is what `rebuild-index` replays when the
    /// index is lost; the index stays the authority.
    ///
    /// Errors: I/O.
    pub fn append_journal(&self, record: &JournalRecord) -> Result<()> {
        let path = self.root.join(JOURNAL);
        // JSON escapes control characters inside strings: a serialised record has no newline.
        let mut line = record.to_line();
        line.push('\n');
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(|| format!("opening {}", path.display())))?;
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(io_err(|| format!("appending to {}", path.display())))
    }

    /// The journal's records, oldest first. A last line cut short by a crash (no newline) is
    /// left out without a count; complete lines that are not records are counted in
    /// [`Journal::unreadable`], lines of an unknown `op` in [`Journal::unknown_ops`]. No
    /// journal is an empty one.
    ///
    /// Errors: I/O.
    pub fn journal(&self) -> Result<Journal> {
        let path = self.root.join(JOURNAL);
        let text = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Journal::default()),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut journal = Journal::default();
        for line in String::from_utf8_lossy(&text[..complete]).lines() {
            match JournalRecord::parse(line) {
                Ok(record) => journal.records.push(record),
                Err(JournalLineError::UnknownOp(op)) => {
                    tracing::warn!(
                        op,
                        "skipping a journal line of an op this version does not know"
                    );
                    journal.unknown_ops += 1;
                }
                Err(JournalLineError::Unreadable(_)) => journal.unreadable += 1,
            }
        }
        Ok(journal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    /// Lines as the journal's first writer (`serde_json::json!`, keys sorted) wrote them.
    fn old_lines() -> [String; 3] {
        [
            format!(
                r#"{{"digest":"{DIGEST}","gamma":6.940220937885672,"nimg":8388608,"op":"snapshot","profile":null,"run":"r","sigma_rel":0.05}}"#
            ),
            format!(
                r#"{{"digest":"{DIGEST}","gamma":16.97,"nimg":1024,"op":"snapshot","profile":{{"images_per_step":64,"kind":"ema_pytorch","update_every":10}},"run":"r","sigma_rel":0.1}}"#
            ),
            format!(
                r#"{{"digest":"{DIGEST}","nimg":8388608,"op":"delete","run":"r","sigma_rel":0.05}}"#
            ),
        ]
    }

    fn records() -> [JournalRecord; 3] {
        let digest: Digest = DIGEST.parse().unwrap();
        [
            JournalRecord::Snapshot {
                run: "r".into(),
                digest,
                nimg: 8388608,
                sigma_rel: 0.05,
                gamma: 6.940220937885672,
                profile: None,
            },
            JournalRecord::Snapshot {
                run: "r".into(),
                digest,
                nimg: 1024,
                sigma_rel: 0.1,
                gamma: 16.97,
                profile: Some(RealisedProfile::EmaPytorch {
                    update_every: 10,
                    images_per_step: 64,
                }),
            },
            JournalRecord::Delete {
                run: "r".into(),
                digest,
                nimg: 8388608,
                sigma_rel: 0.05,
            },
        ]
    }

    #[test]
    fn lines_the_untyped_writer_wrote_still_read() {
        for (line, record) in old_lines().iter().zip(records()) {
            assert_eq!(JournalRecord::parse(line), Ok(record), "{line}");
        }
        // Without a profile key (it defaults), and with extra keys (ignored).
        let line = format!(
            r#"{{"digest":"{DIGEST}","gamma":1.0,"nimg":0,"op":"snapshot","run":"r","sigma_rel":0.05,"later":1}}"#
        );
        assert!(matches!(
            JournalRecord::parse(&line),
            Ok(JournalRecord::Snapshot { profile: None, .. })
        ));
        // A profile this version cannot read is taken as absent, not a damaged line.
        let line = line.replace(r#""later":1"#, r#""profile":{"kind":"later"}"#);
        assert!(matches!(
            JournalRecord::parse(&line),
            Ok(JournalRecord::Snapshot { profile: None, .. })
        ));
    }

    #[test]
    fn records_are_written_as_the_untyped_writer_wrote_them_and_read_back() {
        for (line, record) in old_lines().iter().zip(records()) {
            assert_eq!(&record.to_line(), line);
            assert_eq!(JournalRecord::parse(&record.to_line()), Ok(record));
        }
    }

    #[test]
    fn unknown_ops_and_damaged_lines_are_told_apart() {
        assert_eq!(
            JournalRecord::parse(r#"{"op":"rename","run":"r"}"#),
            Err(JournalLineError::UnknownOp("rename".into()))
        );
        for damaged in [
            "{not json",
            r#"{"op":"delete","run":"r"}"#,
            r#"{"run":"r","nimg":1}"#,
            r#"{"digest":"xyz","nimg":1,"op":"delete","run":"r","sigma_rel":0.05}"#,
        ] {
            assert!(
                matches!(
                    JournalRecord::parse(damaged),
                    Err(JournalLineError::Unreadable(_))
                ),
                "{damaged}"
            );
        }
    }

    #[test]
    fn journal_reads_back_records_and_counts_what_it_skips() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(store.journal().unwrap(), Journal::default());
        for record in records() {
            store.append_journal(&record).unwrap();
        }
        let path = dir.path().join(JOURNAL);
        let mut text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, old_lines().join("\n") + "\n");
        // A damaged line, an unknown op, then a last line cut short by a crash.
        text.push_str("{not json\n{\"op\":\"rename\"}\n{\"digest\":\"af13");
        fs::write(&path, text).unwrap();
        assert_eq!(
            store.journal().unwrap(),
            Journal {
                records: records().to_vec(),
                unreadable: 1,
                unknown_ops: 1,
            }
        );
    }
}
