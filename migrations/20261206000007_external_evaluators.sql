-- External evaluators (issue 24): sweeps whose points are evaluated by the user's own code
-- over HTTP leases; user-named metrics; a record of every lease (attempt).
--
-- `sweeps.reference_id` becomes nullable (an external sweep with only user metrics has no
-- reference statistics), which SQLite can only do by rebuilding the table: a new table, the
-- rows copied, the old one dropped, the new one renamed (SQLite's documented procedure).
-- `db::Db::open` runs migrations on a connection with foreign keys off, so dropping the old
-- table cascades nothing to the points, and checks every foreign key afterwards.
CREATE TABLE sweeps_rebuilt (
    id           INTEGER PRIMARY KEY,
    run_id       INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    reference_id INTEGER REFERENCES reference_stats (id),
    request      TEXT NOT NULL CHECK (json_valid(request)),
    status       TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at  TEXT,
    evaluator    TEXT NOT NULL DEFAULT 'builtin' CHECK (evaluator IN ('builtin', 'external'))
);
INSERT INTO sweeps_rebuilt (id, run_id, reference_id, request, status, created_at, finished_at)
    SELECT id, run_id, reference_id, request, status, created_at, finished_at FROM sweeps;
DROP TABLE sweeps;
ALTER TABLE sweeps_rebuilt RENAME TO sweeps;
CREATE INDEX sweeps_status ON sweeps (status);
CREATE INDEX sweeps_evaluator ON sweeps (evaluator, status);

-- Who computed a batch's features, and (uploads) the BLAKE3 of the uploaded body, so that a
-- repeated upload is recognised as the same (a no-op) or refused as different.
ALTER TABLE sweep_batches ADD COLUMN features_by TEXT NOT NULL DEFAULT 'server'
    CHECK (features_by IN ('server', 'client'));
ALTER TABLE sweep_batches ADD COLUMN upload_digest TEXT;

-- Every lease taken on a point, builtin or external: the workers a sweep shows (open
-- leases) and its failed attempts. `sweep_points.lease_owner` holds the open lease's id.
CREATE TABLE sweep_leases (
    lease_id     TEXT PRIMARY KEY,
    sweep_id     INTEGER NOT NULL,
    point_idx    INTEGER NOT NULL,
    worker       TEXT NOT NULL,
    evaluator    TEXT NOT NULL CHECK (evaluator IN ('builtin', 'external')),
    claimed_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    heartbeat_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- Unix milliseconds.
    expires_ms   INTEGER NOT NULL,
    ended_at     TEXT,
    -- NULL while open; then done, failed (the evaluator gave up, `message` says why),
    -- released (a graceful stop), expired (taken over after its expiry) or cancelled.
    outcome      TEXT CHECK (outcome IS NULL OR
                             outcome IN ('done', 'failed', 'released', 'expired', 'cancelled')),
    message      TEXT,
    FOREIGN KEY (sweep_id, point_idx) REFERENCES sweep_points (sweep_id, idx) ON DELETE CASCADE
);
CREATE INDEX sweep_leases_point ON sweep_leases (sweep_id, point_idx);
CREATE INDEX sweep_leases_open ON sweep_leases (worker) WHERE outcome IS NULL;

-- User metrics an external evaluator reported under a lease, recorded with the point's
-- result when the lease finishes it. `value_list`: a JSON array, one number per seed set,
-- or of one number for the whole point.
CREATE TABLE sweep_lease_metrics (
    lease_id   TEXT NOT NULL REFERENCES sweep_leases (lease_id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    value_list TEXT NOT NULL CHECK (json_valid(value_list)),
    PRIMARY KEY (lease_id, name)
);
