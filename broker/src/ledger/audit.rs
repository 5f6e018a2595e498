//! The hash-chained audit log: record hashing (canonical, length-prefixed encoding), appending inside the
//! caller's transaction, and verification of the whole chain.
//!
//! `hash(n) = SHA-256("flashgate-audit-v1" || lp(prev_hash) || be64(seq) || be64(at) || lp(actor) || lp(event)
//! || lp(subject) || lp(details))` where `lp(x) = be32(len(x)) || x` (implemented in
//! `flashgate_common::audit`, shared with the offline verifier). The `prev_hash` of the first record is the
//! genesis hash of the ledger's random id (`ledger_meta`), so a chain cannot start from an arbitrary hash;
//! ledgers created before schema v5 keep their 32-zero-byte start and are marked `legacy`. The single-row table `audit_head (seq, hash)` is read at the start of every writing transaction
//! (`FOR UPDATE` on PostgreSQL, which serialises brokers sharing one ledger; SQLite's `BEGIN IMMEDIATE` already
//! holds the write lock) and updated before commit. On its own the chain detects edits, deletions and reordering
//! by anyone who does not also rewrite every later record and the head; signed checkpoints
//! ([`super::checkpoints`]) and the witnesses that keep them detect those rewrites too.

pub use flashgate_common::audit::{Genesis, LEGACY_GENESIS_HASH, genesis_hash, record_hash};
use sqlx::{AnyConnection, Row};

use super::Dialect;
use super::error::{AuditFault, LedgerError};

/// One stored audit record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1, without gaps.
    pub seq: i64,
    /// Time of the event (ms since epoch).
    pub at: i64,
    /// Who caused it (station or admin identity, or "system").
    pub actor: String,
    /// Event name, e.g. `licence.issued`.
    pub event: String,
    /// What it is about, e.g. `batch/B1/device/0a1b…`.
    pub subject: String,
    /// JSON object with the event's details, hashed exactly as stored.
    pub details: String,
    /// Hash of the previous record (hex in JSON exports).
    #[serde(serialize_with = "ser_hex")]
    pub prev_hash: Vec<u8>,
    /// This record's hash (hex in JSON exports).
    #[serde(serialize_with = "ser_hex")]
    pub hash: Vec<u8>,
}

fn ser_hex<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v))
}

impl AuditRecord {
    /// Recomputes this record's hash from its fields.
    pub fn compute_hash(&self) -> [u8; 32] {
        record_hash(&self.prev_hash, self.seq, self.at, &self.actor, &self.event, &self.subject, &self.details)
    }
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct AuditEvent<'a> {
    /// Who caused it.
    pub actor: &'a str,
    /// Event name.
    pub event: &'a str,
    /// What it is about.
    pub subject: String,
    /// Details (serialised to JSON text once, then hashed as stored).
    pub details: serde_json::Value,
}

/// The chain head as seen inside one writing transaction.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub seq: i64,
    pub hash: Vec<u8>,
}

/// Reads (and on PostgreSQL locks) the audit head. Must be the first statement of every writing transaction so
/// that all writers take their locks in the same order.
pub(crate) async fn lock_head(conn: &mut AnyConnection, dialect: Dialect) -> Result<Head, sqlx::Error> {
    let sql = match dialect {
        Dialect::Sqlite => "SELECT seq, hash FROM audit_head WHERE id = 1",
        Dialect::Postgres => "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
    };
    let row = sqlx::query(sql).fetch_one(&mut *conn).await?;
    Ok(Head { seq: row.try_get(0)?, hash: row.try_get(1)? })
}

/// Computes the next record after `head` (seq, prev_hash, hash) and advances `head` in memory. The record is
/// not written: pass it to [`insert_records`] in the same transaction, then [`store_head`].
pub(crate) fn stage(head: &mut Head, at: i64, ev: AuditEvent<'_>) -> AuditRecord {
    let seq = head.seq + 1;
    let details = ev.details.to_string();
    let hash = record_hash(&head.hash, seq, at, ev.actor, ev.event, &ev.subject, &details);
    let prev_hash = std::mem::replace(&mut head.hash, hash.to_vec());
    head.seq = seq;
    AuditRecord {
        seq,
        at,
        actor: ev.actor.to_owned(),
        event: ev.event.to_owned(),
        subject: ev.subject,
        details,
        prev_hash,
        hash: hash.to_vec(),
    }
}

/// Rows per multi-row `INSERT` (8 binds each, well under SQLite's and PostgreSQL's bind limits).
const ROWS_PER_INSERT: usize = 64;

/// Inserts staged records with multi-row `INSERT`s.
pub(crate) async fn insert_records(conn: &mut AnyConnection, records: &[AuditRecord]) -> Result<(), sqlx::Error> {
    for chunk in records.chunks(ROWS_PER_INSERT) {
        let sql = super::multi_row_insert(
            "INSERT INTO audit (seq, at, actor, event, subject, details, prev_hash, hash) VALUES ",
            8,
            chunk.len(),
        );
        let mut q = sqlx::query(&sql);
        for r in chunk {
            q = q
                .bind(r.seq)
                .bind(r.at)
                .bind(&r.actor)
                .bind(&r.event)
                .bind(&r.subject)
                .bind(&r.details)
                .bind(&r.prev_hash)
                .bind(&r.hash);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Appends one record after `head` (advancing `head` in memory). Call [`store_head`] before committing.
pub(crate) async fn append(
    conn: &mut AnyConnection,
    head: &mut Head,
    at: i64,
    ev: AuditEvent<'_>,
) -> Result<(), sqlx::Error> {
    let r = stage(head, at, ev);
    insert_records(conn, std::slice::from_ref(&r)).await
}

/// Writes the in-memory head back to `audit_head`.
pub(crate) async fn store_head(conn: &mut AnyConnection, head: &Head) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
        .bind(head.seq)
        .bind(&head.hash)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Reads up to `limit` records with `seq > after`, in order.
pub(crate) async fn page(conn: &mut AnyConnection, after: i64, limit: i64) -> Result<Vec<AuditRecord>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT seq, at, actor, event, subject, details, prev_hash, hash FROM audit WHERE seq > $1 \
         ORDER BY seq LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(AuditRecord {
                seq: r.try_get(0)?,
                at: r.try_get(1)?,
                actor: r.try_get(2)?,
                event: r.try_get(3)?,
                subject: r.try_get(4)?,
                details: r.try_get(5)?,
                prev_hash: r.try_get(6)?,
                hash: r.try_get(7)?,
            })
        })
        .collect()
}

/// The audit subject of a device in a batch: `batch/BATCH/device/DEVICE`.
pub(crate) fn device_subject(batch_id: &str, device_id: &str) -> String {
    format!("batch/{batch_id}/device/{device_id}")
}

/// The (batch, device) of a subject written by [`device_subject`].
pub(crate) fn parse_device_subject(subject: &str) -> Option<(&str, &str)> {
    subject.strip_prefix("batch/")?.rsplit_once("/device/")
}

/// Result of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSummary {
    /// Number of records verified.
    pub records: i64,
    /// Sequence number of the head (equals `records`).
    pub head_seq: i64,
    /// Hex hash of the head record (the genesis hash for an empty log).
    pub head_hash: String,
    /// Hex of the ledger id.
    pub ledger_id: String,
    /// How the chain starts.
    pub genesis: Genesis,
}

/// Incremental verifier: feed records in `seq` order, then [`Verifier::finish`] with the head.
#[derive(Debug, Clone)]
pub struct Verifier {
    expected_seq: i64,
    prev_hash: Vec<u8>,
}

impl Verifier {
    /// A verifier expecting seq 1 with `first_prev_hash` (the ledger's [`Genesis::first_prev_hash`]).
    pub fn new(first_prev_hash: [u8; 32]) -> Self {
        Self { expected_seq: 1, prev_hash: first_prev_hash.to_vec() }
    }

    /// Checks the next record.
    pub fn push(&mut self, r: &AuditRecord) -> Result<(), LedgerError> {
        if r.seq != self.expected_seq {
            return Err(LedgerError::AuditBroken {
                seq: self.expected_seq,
                why: AuditFault::Gap { expected: self.expected_seq, found: r.seq },
            });
        }
        if r.prev_hash != self.prev_hash {
            let why = if r.seq == 1 { AuditFault::Genesis } else { AuditFault::PrevHashMismatch };
            return Err(LedgerError::AuditBroken { seq: r.seq, why });
        }
        let h = r.compute_hash();
        if r.hash[..] != h[..] {
            return Err(LedgerError::AuditBroken { seq: r.seq, why: AuditFault::Edited });
        }
        self.expected_seq += 1;
        self.prev_hash = h.to_vec();
        Ok(())
    }

    /// Checks that the chain ends exactly at the head.
    pub fn finish(self, head_seq: i64, head_hash: &[u8]) -> Result<AuditSummary, LedgerError> {
        let chain_seq = self.expected_seq - 1;
        if chain_seq != head_seq || self.prev_hash != head_hash {
            return Err(LedgerError::AuditBroken {
                seq: chain_seq.min(head_seq) + 1,
                why: AuditFault::HeadMismatch { head_seq, chain_seq },
            });
        }
        Ok(AuditSummary {
            records: chain_seq,
            head_seq,
            head_hash: hex::encode(&self.prev_hash),
            ledger_id: String::new(),
            genesis: Genesis::Bound,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditRecord> {
        let mut prev = genesis_hash(&[7; 16]).to_vec();
        (1..=n)
            .map(|seq| {
                let mut r = AuditRecord {
                    seq,
                    at: 1000 + seq,
                    actor: "admin".into(),
                    event: "batch.created".into(),
                    subject: format!("batch/{seq}"),
                    details: "{}".into(),
                    prev_hash: prev.clone(),
                    hash: vec![],
                };
                r.hash = r.compute_hash().to_vec();
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    fn verify(rs: &[AuditRecord], head: &AuditRecord) -> Result<AuditSummary, LedgerError> {
        let mut v = Verifier::new(genesis_hash(&[7; 16]));
        for r in rs {
            v.push(r)?;
        }
        v.finish(head.seq, &head.hash)
    }

    #[test]
    fn intact_chain_verifies() {
        let c = chain(5);
        let s = verify(&c, &c[4]).unwrap();
        assert_eq!(s.records, 5);
    }

    #[test]
    fn a_chain_from_another_genesis_is_refused_at_seq_1() {
        let c = chain(3);
        let mut v = Verifier::new(genesis_hash(&[8; 16]));
        assert!(matches!(v.push(&c[0]), Err(LedgerError::AuditBroken { seq: 1, why: AuditFault::Genesis })));
        let mut v = Verifier::new(LEGACY_GENESIS_HASH);
        assert!(matches!(v.push(&c[0]), Err(LedgerError::AuditBroken { seq: 1, why: AuditFault::Genesis })));
    }

    #[test]
    fn detects_edit_delete_reorder_truncate() {
        let c = chain(5);
        let mut e = c.clone();
        e[2].details = "{\"x\":1}".into();
        assert!(matches!(verify(&e, &c[4]), Err(LedgerError::AuditBroken { seq: 3, why: AuditFault::Edited })));
        let mut d = c.clone();
        d.remove(1);
        assert!(matches!(verify(&d, &c[4]), Err(LedgerError::AuditBroken { seq: 2, why: AuditFault::Gap { .. } })));
        let mut o = c.clone();
        o.swap(1, 2);
        (o[1].seq, o[2].seq) = (2, 3);
        assert!(matches!(
            verify(&o, &c[4]),
            Err(LedgerError::AuditBroken { seq: 2, why: AuditFault::PrevHashMismatch })
        ));
        let t = &c[..4];
        assert!(matches!(verify(t, &c[4]), Err(LedgerError::AuditBroken { why: AuditFault::HeadMismatch { .. }, .. })));
    }
}
