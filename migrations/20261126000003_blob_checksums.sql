-- The fast read-integrity checksum of each blob (XXH3-128, 32 hex digits), recorded when the
-- blob is written; reconstruction reads verify against it. NULL for blobs written before this
-- migration until `hindsight verify` fills it in (reads of those verify the BLAKE3 digest).
ALTER TABLE blobs ADD COLUMN checksum TEXT CHECK (checksum IS NULL OR length(checksum) = 32);
