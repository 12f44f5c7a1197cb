-- Ingests holding a claim on each blob (issue 18): `claim_blob` adds one, recording the row that
-- refers to the blob (or giving up on it) takes it back. A refused ingest removes the blob it
-- published only when no other claim and no row holds it; a crashed ingest's claim is
-- recovered once past the grace period.
ALTER TABLE blobs ADD COLUMN claims INTEGER NOT NULL DEFAULT 0 CHECK (claims >= 0);
