-- Snapshot store index (issue 3). Later issues add reconstructions, sweeps and metrics as new
-- tables that reference runs(id) and blobs(digest); nothing here needs to change for them.

-- A training run: a named set of snapshots with one tensor manifest.
CREATE TABLE runs (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    description TEXT NOT NULL DEFAULT '',
    -- Free-form JSON object: training config, network config, anything the trainer records.
    metadata    TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Content-addressed files in the blob store, with the state machine that makes garbage
-- collection safe against concurrent ingest:
--   pending -> valid    an ingest claims the digest before it publishes or reuses the file,
--                       and marks it valid in the transaction that inserts its referencing row;
--   valid   -> deleted  GC marks unreferenced rows (and long-abandoned pending ones), then
--                       deletes each file in a write transaction that re-checks the state;
--   deleted -> pending  an ingest of the same content resurrects the row before GC got to it.
CREATE TABLE blobs (
    digest     TEXT PRIMARY KEY CHECK (length(digest) = 64),
    size       INTEGER NOT NULL CHECK (size >= 0),
    state      TEXT NOT NULL CHECK (state IN ('pending', 'valid', 'deleted')),
    -- Unix seconds of the last state change (GC's grace period for pending rows).
    changed_at INTEGER NOT NULL
);
CREATE INDEX blobs_state ON blobs (state);

-- The tensors every snapshot of a run must have: names, dtypes and shapes.
CREATE TABLE run_tensors (
    run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    name   TEXT NOT NULL,
    dtype  TEXT NOT NULL,
    -- JSON array of dimensions.
    shape  TEXT NOT NULL CHECK (json_valid(shape)),
    PRIMARY KEY (run_id, name)
);

-- One stored EMA snapshot: the EMA of width sigma_rel (gamma) read out at nimg.
CREATE TABLE snapshots (
    id           INTEGER PRIMARY KEY,
    run_id       INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    nimg         INTEGER NOT NULL CHECK (nimg >= 0),
    sigma_rel    REAL NOT NULL CHECK (sigma_rel > 0 AND sigma_rel < 0.2887),
    gamma        REAL NOT NULL CHECK (gamma > 0),
    digest       TEXT NOT NULL REFERENCES blobs (digest),
    byte_size    INTEGER NOT NULL CHECK (byte_size >= 0),
    tensor_count INTEGER NOT NULL CHECK (tensor_count >= 0),
    -- JSON object: element count per dtype, e.g. {"F16": 34000000, "I64": 1}.
    dtypes       TEXT NOT NULL CHECK (json_valid(dtypes)),
    -- The file's safetensors __metadata__, as a JSON object of strings.
    metadata     TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (run_id, nimg, sigma_rel)
);
CREATE INDEX snapshots_digest ON snapshots (digest);
