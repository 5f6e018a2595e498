-- Flashgate ledger schema v6 (PostgreSQL dialect): signed audit checkpoints (docs/protocol.md §3). Each row
-- is one flashgate-checkpoint-v1 (217 bytes) a broker signed over the chain head (seq, hash) with its HSM's
-- audit-signing key; seq, at and broker repeat fields of the signed bytes for queries. Not audited
-- themselves (a checkpoint record would move the head it signs); exported with the audit.
-- Keep in step with ../sqlite/0006_audit_checkpoints.sql.

CREATE TABLE audit_checkpoints (
    broker    TEXT NOT NULL,
    seq       BIGINT NOT NULL,
    at        BIGINT NOT NULL,                  -- unix seconds, as signed
    hash      BYTEA NOT NULL,
    bytes     BYTEA NOT NULL,
    stored_at BIGINT NOT NULL,
    PRIMARY KEY (broker, seq, at)
);
CREATE INDEX audit_checkpoints_by_seq ON audit_checkpoints (seq, at);
