-- Flashgate ledger schema v1 (SQLite dialect). Timestamps are Unix epoch milliseconds.
-- Keep in step with ../postgres/0001_ledger.sql: same tables, columns and constraints.

CREATE TABLE keys (
    key_id      TEXT PRIMARY KEY,          -- hex of the 16-byte licence key_id
    label       TEXT NOT NULL,
    backend     TEXT NOT NULL,             -- e.g. "soft", "pkcs11"
    backend_ref TEXT NOT NULL,             -- backend-specific locator (token label, object label)
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL
);

CREATE TABLE images (
    sha256      TEXT PRIMARY KEY,          -- hex SHA-256 of the whole encrypted .sfi file
    key_id      TEXT NOT NULL REFERENCES keys (key_id),
    family      TEXT NOT NULL,
    product_id  TEXT NOT NULL,
    size        INTEGER NOT NULL CHECK (size >= 0),
    chunk_count INTEGER NOT NULL CHECK (chunk_count >= 0),
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL
);

CREATE TABLE image_chunks (
    sha256 TEXT NOT NULL REFERENCES images (sha256),
    idx    INTEGER NOT NULL,
    bytes  BLOB NOT NULL,
    PRIMARY KEY (sha256, idx)
);

CREATE TABLE batches (
    id            TEXT PRIMARY KEY,
    product_id    TEXT NOT NULL,
    image_sha256  TEXT NOT NULL REFERENCES images (sha256),
    quota         INTEGER NOT NULL CHECK (quota >= 0),
    issued        INTEGER NOT NULL DEFAULT 0 CHECK (issued >= 0 AND issued <= quota),
    allowed_sites TEXT NOT NULL,           -- JSON array of site names; "*" allows every site
    not_before    INTEGER,
    not_after     INTEGER,
    state         TEXT NOT NULL CHECK (state IN ('open', 'paused', 'closed')),
    created_at    INTEGER NOT NULL,
    created_by    TEXT NOT NULL
);

CREATE TABLE licences (
    batch_id    TEXT NOT NULL REFERENCES batches (id),
    device_id   TEXT NOT NULL,
    licence     BLOB NOT NULL,
    certificate BLOB NOT NULL,
    station     TEXT NOT NULL,
    site        TEXT NOT NULL,
    issued_at   INTEGER NOT NULL,
    PRIMARY KEY (batch_id, device_id)
);

CREATE TABLE installs (
    station     TEXT NOT NULL,
    result_id   TEXT NOT NULL,
    batch_id    TEXT NOT NULL REFERENCES batches (id),
    device_id   TEXT NOT NULL,
    status_code INTEGER NOT NULL,
    message     TEXT NOT NULL,
    flash_crc   INTEGER,
    attempt     INTEGER NOT NULL,
    timings     TEXT NOT NULL,             -- JSON object
    reported_at INTEGER NOT NULL,
    PRIMARY KEY (station, result_id)
);
CREATE INDEX installs_by_batch ON installs (batch_id, device_id, status_code);

CREATE TABLE revocations (
    serial     TEXT PRIMARY KEY,
    identity   TEXT NOT NULL,
    reason     TEXT NOT NULL,
    revoked_at INTEGER NOT NULL,
    revoked_by TEXT NOT NULL
);

CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY,
    at        INTEGER NOT NULL,
    actor     TEXT NOT NULL,
    event     TEXT NOT NULL,
    subject   TEXT NOT NULL,
    details   TEXT NOT NULL,               -- JSON object, hashed as stored
    prev_hash BLOB NOT NULL,
    hash      BLOB NOT NULL
);

CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash BLOB NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, zeroblob(32));
