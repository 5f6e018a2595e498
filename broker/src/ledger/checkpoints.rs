//! Signed audit checkpoints in the ledger (`audit_checkpoints`, schema v6): storing the
//! `flashgate-checkpoint-v1` bytes a broker signed over the chain head, reading the newest (carried by
//! licence responses) and paging them for the export, and the counter of records this broker's writer
//! appended, which wakes the periodic signer (`crate::checkpoint`) every N records without touching the
//! database on the licence path.
//!
//! A checkpoint row is not an audit record (a record would move the head it signs); deleting rows is
//! what witnesses outside the database catch (`flashgate audit verify --witness`).

use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::{AnyConnection, Row};
use tokio::sync::Notify;

/// Records appended by this process's writer since the ledger was opened, and a wake-up for whoever
/// waits on it (the checkpoint signer). Updated once per committed group.
#[derive(Debug, Default)]
pub struct Appended {
    count: AtomicU64,
    notify: Notify,
}

impl Appended {
    /// Notes `n` records committed.
    pub(crate) fn add(&self, n: usize) {
        if n > 0 {
            self.count.fetch_add(n as u64, Ordering::AcqRel);
            self.notify.notify_one();
        }
    }

    /// Records committed so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves after the next commit (or at once if one happened since the last wait).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

/// One stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    /// Signing broker.
    pub broker: String,
    /// Seq of the head it signs.
    pub seq: i64,
    /// Unix time of signing, seconds.
    pub at: i64,
    /// The head's hash.
    pub hash: Vec<u8>,
    /// The 217 signed bytes.
    pub bytes: Vec<u8>,
}

pub(crate) async fn insert(conn: &mut AnyConnection, cp: &StoredCheckpoint, now_ms: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_checkpoints (broker, seq, at, hash, bytes, stored_at) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (broker, seq, at) DO NOTHING",
    )
    .bind(&cp.broker)
    .bind(cp.seq)
    .bind(cp.at)
    .bind(&cp.hash)
    .bind(&cp.bytes)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

const COLUMNS: &str = "broker, seq, at, hash, bytes";

fn from_row(r: &sqlx::any::AnyRow) -> Result<StoredCheckpoint, sqlx::Error> {
    Ok(StoredCheckpoint {
        broker: r.try_get(0)?,
        seq: r.try_get(1)?,
        at: r.try_get(2)?,
        hash: r.try_get(3)?,
        bytes: r.try_get(4)?,
    })
}

/// The newest checkpoint (highest seq, then latest time) of any broker on the ledger.
pub(crate) async fn latest(conn: &mut AnyConnection) -> Result<Option<StoredCheckpoint>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM audit_checkpoints ORDER BY seq DESC, at DESC, broker DESC LIMIT 1");
    sqlx::query(&sql).fetch_optional(&mut *conn).await?.as_ref().map(from_row).transpose()
}

/// Up to `limit` checkpoints after `(seq, at, broker)` in that order.
pub(crate) async fn page(
    conn: &mut AnyConnection,
    after: (i64, i64, &str),
    limit: i64,
) -> Result<Vec<StoredCheckpoint>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM audit_checkpoints WHERE seq > $1 OR (seq = $1 AND (at > $2 OR (at = $2 AND broker > $3))) \
         ORDER BY seq, at, broker LIMIT $4"
    );
    let rows = sqlx::query(&sql).bind(after.0).bind(after.1).bind(after.2).bind(limit).fetch_all(&mut *conn).await?;
    rows.iter().map(from_row).collect()
}
