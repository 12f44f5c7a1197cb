-- Reconstructed weights (issue 4): one row per stored output, keyed by everything that
-- determines its bytes, so that asking again is a lookup.
CREATE TABLE reconstructions (
    -- BLAKE3 (hex) over the key text: format version, every snapshot of the run that the
    -- solver saw (digest, nimg, sigma_rel), the target (gamma, nimg) and the output dtype.
    id         TEXT PRIMARY KEY CHECK (length(id) = 64),
    run_id     INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    nimg       INTEGER NOT NULL CHECK (nimg >= 0),
    sigma_rel  REAL NOT NULL CHECK (sigma_rel > 0),
    gamma      REAL NOT NULL,
    dtype      TEXT NOT NULL CHECK (dtype IN ('f32', 'f16', 'bf16')),
    -- The safetensors file in the blob store.
    digest     TEXT NOT NULL REFERENCES blobs (digest),
    byte_size  INTEGER NOT NULL CHECK (byte_size >= 0),
    -- JSON object: the solver's quality report and the weighted snapshots.
    report     TEXT NOT NULL CHECK (json_valid(report)),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX reconstructions_run ON reconstructions (run_id);
CREATE INDEX reconstructions_digest ON reconstructions (digest);
