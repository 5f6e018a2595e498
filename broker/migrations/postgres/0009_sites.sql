-- Flashgate ledger schema v9 (PostgreSQL dialect): site brokers (docs/architecture.md, site brokers).
-- Keep in step with ../sqlite/0009_sites.sql.
--
-- On a central broker: what its site brokers replicated (broker/src/ledger/replica.rs).
-- On a site broker: the batches it mirrors, its leases from central and how far central holds its
-- ledger (broker/src/ledger/upstream.rs).

-- Central: licences replicated from a site broker name it (its identity); NULL for licences issued here.
ALTER TABLE licences ADD COLUMN origin TEXT;

-- Central: one stream per site broker ledger, acknowledged up to acked_seq. head_hash is the hash of the
-- site record at acked_seq (the site ledger's genesis hash at 0), so the next record must chain from it.
CREATE TABLE site_streams (
    site_ledger_id TEXT PRIMARY KEY,            -- 32 hex digits
    holder         TEXT NOT NULL,               -- spiffe://TD/broker/NAME
    site           TEXT NOT NULL,
    acked_seq      BIGINT NOT NULL DEFAULT 0 CHECK (acked_seq >= 0),
    site_head_seq  BIGINT NOT NULL DEFAULT 0,       -- the site's audit head as it last reported it
    head_hash      BYTEA NOT NULL,
    last_record_at BIGINT,                     -- `at` of the record at acked_seq (site clock, ms)
    licences       BIGINT NOT NULL DEFAULT 0,
    conflicts      BIGINT NOT NULL DEFAULT 0,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);

-- Central: the site ledgers' audit records, verbatim (they verify against their own ledger's genesis).
CREATE TABLE site_audit (
    site_ledger_id TEXT NOT NULL REFERENCES site_streams (site_ledger_id),
    seq            BIGINT NOT NULL,
    at             BIGINT NOT NULL,
    actor          TEXT NOT NULL,
    event          TEXT NOT NULL,
    subject        TEXT NOT NULL,
    details        TEXT NOT NULL,
    prev_hash      BYTEA NOT NULL,
    hash           BYTEA NOT NULL,
    PRIMARY KEY (site_ledger_id, seq)
);

-- Central: a device claimed by a connected site before it licensed it (one site per batch and device).
CREATE TABLE device_claims (
    batch_id   TEXT NOT NULL REFERENCES batches (id),
    device_id  TEXT NOT NULL,
    site       TEXT NOT NULL,
    holder     TEXT NOT NULL,
    claimed_at BIGINT NOT NULL,
    PRIMARY KEY (batch_id, device_id)
);

-- Central: a licence a site issued offline for a device this ledger already held from another site. Kept,
-- audited and counted against the quota (its unit is used), never a second row in licences.
CREATE TABLE licence_conflicts (
    site_ledger_id TEXT NOT NULL,
    site_seq       BIGINT NOT NULL,
    batch_id       TEXT NOT NULL REFERENCES batches (id),
    device_id      TEXT NOT NULL,
    site           TEXT NOT NULL,
    station        TEXT NOT NULL,
    held_site      TEXT NOT NULL,               -- the site whose licence this ledger holds
    licence        BYTEA NOT NULL,
    certificate    BYTEA NOT NULL,
    issued_at      BIGINT NOT NULL,
    recorded_at    BIGINT NOT NULL,
    PRIMARY KEY (site_ledger_id, site_seq)
);

-- Site: issuing stops at the expiry of the site's leases for the batch (NULL on a central broker).
ALTER TABLE batches ADD COLUMN lease_expires_at BIGINT;
-- Site: drained by an operator (ms): no more units taken, unused ones handed back (NULL: not drained).
ALTER TABLE batches ADD COLUMN drained_at BIGINT;

-- Site: the leases this site broker holds from central, as central last reported them.
CREATE TABLE upstream_leases (
    id         TEXT PRIMARY KEY,                -- central's lease id
    batch_id   TEXT NOT NULL REFERENCES batches (id),
    granted    BIGINT NOT NULL CHECK (granted >= 1),
    returned   BIGINT NOT NULL DEFAULT 0 CHECK (returned >= 0),
    state      TEXT NOT NULL,                   -- central's state: active or settled
    granted_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    CHECK (returned <= granted)
);
CREATE INDEX upstream_leases_by_batch ON upstream_leases (batch_id);

-- Site: the seq up to which central acknowledged this ledger's records (single row).
CREATE TABLE upstream_cursor (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    acked_seq  BIGINT NOT NULL CHECK (acked_seq >= 0),
    updated_at BIGINT NOT NULL
);
