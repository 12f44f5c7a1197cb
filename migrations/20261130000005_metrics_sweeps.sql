-- Reference statistics and sweeps (issue 15).

-- Statistics of a reference image set for FID (and its features for KID), reusable by every
-- sweep. Computed by `hindsight ref-stats` or imported from pytorch-fid .npz / EDM2 .pkl.
CREATE TABLE reference_stats (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    -- What the statistics were computed from: a dataset description or an imported file.
    source          TEXT NOT NULL,
    -- The feature network, e.g. "inception-2015-12-05 pool3".
    feature_network TEXT NOT NULL,
    -- BLAKE3 (hex) of the weights file the features came from; NULL for imported statistics,
    -- whose network is taken on trust.
    weights_digest  TEXT,
    -- The preprocessing pipeline ('nvidia' or 'pytorch-fid'); NULL when imported.
    preprocess      TEXT,
    dims            INTEGER NOT NULL CHECK (dims > 0),
    -- Images the statistics summarise (0 when an imported file does not say).
    count           INTEGER NOT NULL CHECK (count >= 0),
    -- pytorch-fid .npz (mu, sigma; float64) in the blob store.
    stats_digest    TEXT NOT NULL REFERENCES blobs (digest),
    -- .npy float32 [count, dims]: the features themselves, for KID. NULL when imported.
    features_digest TEXT REFERENCES blobs (digest),
    -- Image geometry of the reference set, when known.
    resolution      INTEGER,
    channels        INTEGER,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX reference_stats_stats ON reference_stats (stats_digest);
CREATE INDEX reference_stats_features ON reference_stats (features_digest);

-- A sweep: metrics of a run's reconstructions over σ_rel (and optionally training time).
CREATE TABLE sweeps (
    id           INTEGER PRIMARY KEY,
    run_id       INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    reference_id INTEGER NOT NULL REFERENCES reference_stats (id),
    -- JSON object: the validated request (sampler, num_images, seed_sets, metrics, batch).
    request      TEXT NOT NULL CHECK (json_valid(request)),
    status       TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at  TEXT
);
CREATE INDEX sweeps_status ON sweeps (status);

-- One point of a sweep: a (sigma_rel, nimg) pair, the unit of work a worker leases.
CREATE TABLE sweep_points (
    sweep_id          INTEGER NOT NULL REFERENCES sweeps (id) ON DELETE CASCADE,
    idx               INTEGER NOT NULL CHECK (idx >= 0),
    sigma_rel         REAL NOT NULL CHECK (sigma_rel > 0 AND sigma_rel < 0.2887),
    nimg              INTEGER NOT NULL CHECK (nimg >= 0),
    status            TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    -- The lease: which worker holds the point and until when (Unix milliseconds).
    lease_owner       TEXT,
    lease_expires     INTEGER,
    attempts          INTEGER NOT NULL DEFAULT 0,
    -- The reconstruction whose images the stored batches hold; fixed when the first batch is
    -- recorded, so that features of two different reconstructions never mix.
    reconstruction_id TEXT,
    -- JSON object once done: metrics per seed set, mean and std, timings.
    result            TEXT CHECK (result IS NULL OR json_valid(result)),
    error             TEXT,
    -- A PNG grid of the first images, and the generated set's statistics (.npz).
    grid_digest       TEXT REFERENCES blobs (digest),
    stats_digest      TEXT REFERENCES blobs (digest),
    started_at        TEXT,
    finished_at       TEXT,
    PRIMARY KEY (sweep_id, idx)
);
CREATE INDEX sweep_points_status ON sweep_points (status, lease_expires);
CREATE INDEX sweep_points_grid ON sweep_points (grid_digest);
CREATE INDEX sweep_points_stats ON sweep_points (stats_digest);

-- A finished batch of a point: the features of its images (.npy float32 [n, dims]), so that
-- a resumed point samples only what is missing.
CREATE TABLE sweep_batches (
    sweep_id          INTEGER NOT NULL,
    point_idx         INTEGER NOT NULL,
    batch             INTEGER NOT NULL CHECK (batch >= 0),
    reconstruction_id TEXT NOT NULL,
    images            INTEGER NOT NULL CHECK (images > 0),
    features_digest   TEXT NOT NULL REFERENCES blobs (digest),
    -- Wall-clock seconds of the batch, and of its sampling and feature parts.
    seconds           REAL NOT NULL,
    sample_seconds    REAL NOT NULL DEFAULT 0,
    features_seconds  REAL NOT NULL DEFAULT 0,
    created_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (sweep_id, point_idx, batch),
    FOREIGN KEY (sweep_id, point_idx) REFERENCES sweep_points (sweep_id, idx) ON DELETE CASCADE
);
CREATE INDEX sweep_batches_features ON sweep_batches (features_digest);

-- Every blob digest some row refers to; garbage collection keeps exactly these.
CREATE VIEW blob_references (digest) AS
    SELECT digest FROM snapshots
    UNION ALL SELECT digest FROM reconstructions
    UNION ALL SELECT stats_digest FROM reference_stats
    UNION ALL SELECT features_digest FROM reference_stats WHERE features_digest IS NOT NULL
    UNION ALL SELECT grid_digest FROM sweep_points WHERE grid_digest IS NOT NULL
    UNION ALL SELECT stats_digest FROM sweep_points WHERE stats_digest IS NOT NULL
    UNION ALL SELECT features_digest FROM sweep_batches;
