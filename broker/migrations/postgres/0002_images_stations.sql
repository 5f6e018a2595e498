-- Flashgate ledger schema v2 (postgres dialect): what an image needs to be licensed, and the stations seen.
-- Keep in step with ../sqlite/0002_images_stations.sql.

-- The image nonce travels with the key (profile §2: it is not in the .sfi file); every licence for the
-- image carries it. Not secret (it is in every licence), but bound to exactly one image.
ALTER TABLE images ADD COLUMN nonce TEXT NOT NULL DEFAULT '';          -- hex of the 12-byte nonce
ALTER TABLE images ADD COLUMN area_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE images ADD COLUMN expected_crc BIGINT;                        -- CRC-32 of flash after install, if known

-- Station certificates seen by a broker (bookkeeping for 'admin stations' and revocation by identity;
-- not audited: nothing is decided from it).
CREATE TABLE stations (
    identity   TEXT NOT NULL,              -- spiffe://TD/site/SITE/station/N
    serial     TEXT NOT NULL,              -- lowercase hex certificate serial
    site       TEXT NOT NULL,
    first_seen BIGINT NOT NULL,
    last_seen  BIGINT NOT NULL,
    PRIMARY KEY (identity, serial)
);
CREATE INDEX licences_by_device ON licences (device_id);
CREATE INDEX installs_by_device ON installs (device_id);
