-- Flashgate ledger schema v5 (sqlite dialect): the ledger's identity. One row, written by the first broker
-- that opens the ledger after this migration: a random 16-byte id, and how the audit chain starts —
-- 'bound' (the first record's prev_hash is the genesis hash of the id, docs/protocol.md §3) for a ledger
-- whose chain was empty then, 'legacy' (32 zero bytes) for one that already held records.
-- Keep in step with ../postgres/0005_ledger_id.sql.

CREATE TABLE ledger_meta (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    ledger_id  BLOB NOT NULL,
    genesis    TEXT NOT NULL CHECK (genesis IN ('bound', 'legacy')),
    created_at INTEGER NOT NULL
);
