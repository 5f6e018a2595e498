-- Flashgate ledger schema v8 (SQLite dialect): quota leases for site brokers (docs/architecture.md, site
-- brokers). A lease hands `granted` units of a batch's quota to one site broker, which issues against it
-- with its own HSM and ledger; central keeps `batches.leased`, the units granted and not yet used or
-- returned, so that issued + leased never exceeds the quota (the writer's quota guard and the grant both
-- check it in the same statement). Every grant and return is an audit record.
-- Keep in step with ../postgres/0008_leases.sql.

ALTER TABLE batches ADD COLUMN leased INTEGER NOT NULL DEFAULT 0 CHECK (leased >= 0);

CREATE TABLE leases (
    id         TEXT PRIMARY KEY,                -- 32 hex digits, assigned by the granting broker
    batch_id   TEXT NOT NULL REFERENCES batches (id),
    site       TEXT NOT NULL,
    holder     TEXT NOT NULL,                   -- the site broker's identity, spiffe://TD/broker/NAME
    granted    INTEGER NOT NULL CHECK (granted >= 1),
    used       INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
    returned   INTEGER NOT NULL DEFAULT 0 CHECK (returned >= 0),
    state      TEXT NOT NULL CHECK (state IN ('active', 'settled')),
    granted_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    settled_at INTEGER,
    CHECK (used + returned <= granted)
);
CREATE INDEX leases_by_batch ON leases (batch_id, state);
