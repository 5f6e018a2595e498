-- Flashgate ledger schema v6 (sqlite dialect): signed audit checkpoints (docs/protocol.md §3). Each row is
-- one flashgate-checkpoint-v1 (217 bytes) a broker signed over the chain head (seq, hash) with its HSM's
-- audit-signing key; seq, at and broker repeat fields of the signed bytes for queries. Not audited
-- themselves (a checkpoint record would move the head it signs); exported with the audit.
-- Keep in step with ../postgres/0006_audit_checkpoints.sql.

CREATE TABLE audit_checkpoints (
    broker    TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    at        INTEGER NOT NULL,                 -- unix seconds, as signed
    hash      BLOB NOT NULL,
    bytes     BLOB NOT NULL,
    stored_at INTEGER NOT NULL,
    PRIMARY KEY (broker, seq, at)
);
CREATE INDEX audit_checkpoints_by_seq ON audit_checkpoints (seq, at);
