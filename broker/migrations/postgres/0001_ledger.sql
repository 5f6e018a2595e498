-- Flashgate ledger schema v1 (PostgreSQL dialect). Timestamps are Unix epoch milliseconds.
-- Keep in step with ../sqlite/0001_ledger.sql: same tables, columns and constraints.

CREATE TABLE keys (
    key_id      TEXT PRIMARY KEY,          -- hex of the 16-byte licence key_id
    label       TEXT NOT NULL,
    backend     TEXT NOT NULL,             -- e.g. "soft", "pkcs11"
    backend_ref TEXT NOT NULL,             -- backend-specific locator (token label, object label)
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL
);

CREATE TABLE images (
    sha256      TEXT PRIMARY KEY,          -- hex SHA-256 of the whole encrypted .sfi file
    key_id      TEXT NOT NULL REFERENCES keys (key_id),
    family      TEXT NOT NULL,
    product_id  TEXT NOT NULL,
    size        BIGINT NOT NULL CHECK (size >= 0),
    chunk_count BIGINT NOT NULL CHECK (chunk_count >= 0),
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL
);

CREATE TABLE image_chunks (
    sha256 TEXT NOT NULL REFERENCES images (sha256),
    idx    BIGINT NOT NULL,
    bytes  BYTEA NOT NULL,
    PRIMARY KEY (sha256, idx)
);

CREATE TABLE batches (
    id            TEXT PRIMARY KEY,
    product_id    TEXT NOT NULL,
    image_sha256  TEXT NOT NULL REFERENCES images (sha256),
    quota         BIGINT NOT NULL CHECK (quota >= 0),
    issued        BIGINT NOT NULL DEFAULT 0 CHECK (issued >= 0 AND issued <= quota),
    allowed_sites TEXT NOT NULL,           -- JSON array of site names; "*" allows every site
    not_before    BIGINT,
    not_after     BIGINT,
    state         TEXT NOT NULL CHECK (state IN ('open', 'paused', 'closed')),
    created_at    BIGINT NOT NULL,
    created_by    TEXT NOT NULL
);

CREATE TABLE licences (
    batch_id    TEXT NOT NULL REFERENCES batches (id),
    device_id   TEXT NOT NULL,
    licence     BYTEA NOT NULL,
    certificate BYTEA NOT NULL,
    station     TEXT NOT NULL,
    site        TEXT NOT NULL,
    issued_at   BIGINT NOT NULL,
    PRIMARY KEY (batch_id, device_id)
);

CREATE TABLE installs (
    station     TEXT NOT NULL,
    result_id   TEXT NOT NULL,
    batch_id    TEXT NOT NULL REFERENCES batches (id),
    device_id   TEXT NOT NULL,
    status_code BIGINT NOT NULL,
    message     TEXT NOT NULL,
    flash_crc   BIGINT,
    attempt     BIGINT NOT NULL,
    timings     TEXT NOT NULL,             -- JSON object
    reported_at BIGINT NOT NULL,
    PRIMARY KEY (station, result_id)
);
CREATE INDEX installs_by_batch ON installs (batch_id, device_id, status_code);

CREATE TABLE revocations (
    serial     TEXT PRIMARY KEY,
    identity   TEXT NOT NULL,
    reason     TEXT NOT NULL,
    revoked_at BIGINT NOT NULL,
    revoked_by TEXT NOT NULL
);

CREATE TABLE audit (
    seq       BIGINT PRIMARY KEY,
    at        BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    event     TEXT NOT NULL,
    subject   TEXT NOT NULL,
    details   TEXT NOT NULL,               -- JSON object, hashed as stored
    prev_hash BYTEA NOT NULL,
    hash      BYTEA NOT NULL
);

CREATE TABLE audit_head (
    id   BIGINT PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash BYTEA NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, decode(repeat('00', 32), 'hex'));
