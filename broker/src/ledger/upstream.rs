//! A site broker's side of its ledger (schema v9, issue 14): the batches it mirrors from central, the
//! quota leases it holds from central, and how far central holds its records.
//!
//! A mirrored batch is an ordinary batch row, so every check of the licence path applies unchanged; what
//! differs is where its numbers come from. Its `quota` is the units central leased this site (granted
//! less returned, over its leases of the batch), so the writer's quota guard never lets the site issue
//! more than it was leased; its `lease_expires_at` is the latest expiry of its active leases, after
//! which new devices are refused with `LEASE_EXPIRED` (a site cut off longer than the lease's time to
//! live stops). Its state, window, product and allowed sites are central's, as of the last sync. Every
//! change is an audit record in the same transaction (`batch.mirrored`, `batch.mirror_changed`,
//! `lease.acquired`, `lease.extended`, `lease.returned`).
//!
//! Replication reads the audit chain in order with the rows its records are about
//! ([`Ledger::replication_page`]); the seq central acknowledged is kept in `upstream_cursor`.

use sqlx::{AnyConnection, Row};

use super::audit::{self, AuditEvent, AuditRecord, parse_device_subject};
use super::replica::{SiteInstall, SiteItem, SiteLicence, SiteRecord, SiteRefusal};
use super::{BatchState, Ledger, LedgerError, begin_write, commit_write, load_batch, load_image_meta, now_ms};
use crate::ledger::model::Batch;

/// A batch as central reports it, to mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorBatch {
    /// Batch id (the same at central and every site).
    pub id: String,
    /// Product id.
    pub product_id: String,
    /// Hex SHA-256 of its image (stored here before the batch is mirrored).
    pub image_sha256: String,
    /// Allowed sites.
    pub allowed_sites: Vec<String>,
    /// Validity window.
    pub not_before: Option<i64>,
    /// Validity window.
    pub not_after: Option<i64>,
    /// Central's state.
    pub state: BatchState,
}

/// A lease this site holds, as central last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamLease {
    /// Central's lease id.
    pub id: String,
    /// Batch.
    pub batch_id: String,
    /// Units granted.
    pub granted: i64,
    /// Units handed back.
    pub returned: i64,
    /// `active` or `settled`.
    pub state: String,
    /// Grant time (ms, central's clock).
    pub granted_at: i64,
    /// Expiry (ms, central's clock).
    pub expires_at: i64,
}

/// Recomputes a mirrored batch's quota (units leased here, never below what was issued here) and the
/// latest expiry of its active leases, from `upstream_leases`.
async fn apply_leases(conn: &mut AnyConnection, batch_id: &str) -> Result<(), sqlx::Error> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(granted - returned), 0) AS BIGINT), MAX(CASE WHEN state = 'active' THEN expires_at END), \
         COUNT(*) FROM upstream_leases WHERE batch_id = $1",
    )
    .bind(batch_id)
    .fetch_one(&mut *conn)
    .await?;
    let units: i64 = row.try_get(0)?;
    let active_expiry: Option<i64> = row.try_get(1)?;
    // No active lease: issuing stops now (new devices are refused until central grants one).
    let expires = active_expiry.unwrap_or(0);
    sqlx::query(
        "UPDATE batches SET quota = CASE WHEN $2 > issued THEN $2 ELSE issued END, lease_expires_at = $3 \
         WHERE id = $1",
    )
    .bind(batch_id)
    .bind(units)
    .bind(expires)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

impl Ledger {
    /// Creates or updates the mirror of a central batch (its image must be stored here). A new mirror
    /// has no units until a lease is recorded ([`Ledger::record_upstream_leases`]).
    pub async fn mirror_batch(&self, b: &MirrorBatch, actor: &str) -> Result<Batch, LedgerError> {
        const OP: &str = "mirror batch";
        let db = LedgerError::db(OP);
        let (mut tx, mut head) = begin_write(&self.inner.write, self.inner.dialect).await.map_err(db)?;
        let now = now_ms();
        if load_image_meta(&mut tx, &b.image_sha256).await.map_err(LedgerError::db(OP))?.is_none() {
            return Err(LedgerError::NotFound { what: "image", id: b.image_sha256.clone() });
        }
        let sites = serde_json::to_string(&b.allowed_sites)
            .map_err(|_| LedgerError::Internal { what: "allowed sites do not serialise" })?;
        match load_batch(&mut tx, &b.id).await.map_err(LedgerError::db(OP))? {
            None => {
                sqlx::query(
                    "INSERT INTO batches (id, product_id, image_sha256, quota, issued, allowed_sites, not_before, \
                     not_after, state, created_at, created_by, lease_expires_at) \
                     VALUES ($1, $2, $3, 0, 0, $4, $5, $6, $7, $8, $9, 0)",
                )
                .bind(&b.id)
                .bind(&b.product_id)
                .bind(&b.image_sha256)
                .bind(&sites)
                .bind(b.not_before)
                .bind(b.not_after)
                .bind(b.state.as_str())
                .bind(now)
                .bind(actor)
                .execute(&mut *tx)
                .await
                .map_err(LedgerError::db(OP))?;
                let details = serde_json::json!({
                    "product_id": b.product_id, "image_sha256": b.image_sha256, "allowed_sites": b.allowed_sites,
                    "not_before": b.not_before, "not_after": b.not_after, "state": b.state.as_str(),
                });
                let ev = AuditEvent { actor, event: "batch.mirrored", subject: format!("batch/{}", b.id), details };
                audit::append(&mut tx, &mut head, now, ev).await.map_err(LedgerError::db(OP))?;
            }
            Some(cur) => {
                if cur.lease_expires_at.is_none() {
                    return Err(LedgerError::Invalid {
                        field: "batch",
                        value: b.id.clone(),
                        why: "exists here as a batch of this broker's own, not a mirror of central's",
                    });
                }
                let changed = cur.product_id != b.product_id
                    || cur.image_sha256 != b.image_sha256
                    || cur.allowed_sites != b.allowed_sites
                    || cur.not_before != b.not_before
                    || cur.not_after != b.not_after
                    || cur.state != b.state;
                if changed {
                    sqlx::query(
                        "UPDATE batches SET product_id = $2, image_sha256 = $3, allowed_sites = $4, not_before = $5, \
                         not_after = $6, state = $7 WHERE id = $1",
                    )
                    .bind(&b.id)
                    .bind(&b.product_id)
                    .bind(&b.image_sha256)
                    .bind(&sites)
                    .bind(b.not_before)
                    .bind(b.not_after)
                    .bind(b.state.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(LedgerError::db(OP))?;
                    let details = serde_json::json!({
                        "state": {"from": cur.state.as_str(), "to": b.state.as_str()},
                        "allowed_sites": b.allowed_sites, "not_before": b.not_before, "not_after": b.not_after,
                        "image_sha256": b.image_sha256, "product_id": b.product_id,
                    });
                    let ev = AuditEvent {
                        actor,
                        event: "batch.mirror_changed",
                        subject: format!("batch/{}", b.id),
                        details,
                    };
                    audit::append(&mut tx, &mut head, now, ev).await.map_err(LedgerError::db(OP))?;
                }
            }
        }
        let batch = load_batch(&mut tx, &b.id)
            .await
            .map_err(LedgerError::db(OP))?
            .ok_or(LedgerError::Internal { what: "mirrored batch vanished in its transaction" })?;
        commit_write(tx, &head, OP).await?;
        Ok(batch)
    }

    /// Records this site's leases of `batch_id` as central reports them (new ones audited
    /// `lease.acquired`, a later expiry `lease.extended`, more units handed back `lease.returned`), then
    /// sets the mirrored batch's quota and lease expiry from them. Leases central no longer lists are
    /// kept as they were.
    pub async fn record_upstream_leases(
        &self,
        batch_id: &str,
        leases: &[UpstreamLease],
        actor: &str,
    ) -> Result<Batch, LedgerError> {
        const OP: &str = "record upstream leases";
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        let now = now_ms();
        match load_batch(&mut tx, batch_id).await.map_err(LedgerError::db(OP))? {
            Some(b) if b.lease_expires_at.is_some() => {}
            Some(_) => {
                return Err(LedgerError::Invalid {
                    field: "batch",
                    value: batch_id.into(),
                    why: "is this broker's own batch, not a mirror of central's",
                });
            }
            None => return Err(LedgerError::NotFound { what: "batch", id: batch_id.into() }),
        }
        for l in leases.iter().filter(|l| l.batch_id == batch_id) {
            let before = sqlx::query("SELECT returned, expires_at FROM upstream_leases WHERE id = $1")
                .bind(&l.id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(LedgerError::db(OP))?
                .map(|r| Ok::<_, sqlx::Error>((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?)))
                .transpose()
                .map_err(LedgerError::db(OP))?;
            sqlx::query(
                "INSERT INTO upstream_leases (id, batch_id, granted, returned, state, granted_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET returned = excluded.returned, \
                 state = excluded.state, expires_at = excluded.expires_at",
            )
            .bind(&l.id)
            .bind(&l.batch_id)
            .bind(l.granted)
            .bind(l.returned)
            .bind(&l.state)
            .bind(l.granted_at)
            .bind(l.expires_at)
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::db(OP))?;
            let subject = format!("lease/{}", l.id);
            let event = match before {
                None => Some((
                    "lease.acquired",
                    serde_json::json!({"batch_id": batch_id, "granted": l.granted,
                    "expires_at": l.expires_at}),
                )),
                Some((returned, _)) if returned != l.returned => Some((
                    "lease.returned",
                    serde_json::json!({"batch_id": batch_id, "returned": l.returned, "granted": l.granted}),
                )),
                Some((_, expires)) if expires != l.expires_at => {
                    Some(("lease.extended", serde_json::json!({"batch_id": batch_id, "expires_at": l.expires_at})))
                }
                Some(_) => None,
            };
            if let Some((event, details)) = event {
                audit::append(&mut tx, &mut head, now, AuditEvent { actor, event, subject, details })
                    .await
                    .map_err(LedgerError::db(OP))?;
            }
        }
        apply_leases(&mut tx, batch_id).await.map_err(LedgerError::db(OP))?;
        let batch = load_batch(&mut tx, batch_id)
            .await
            .map_err(LedgerError::db(OP))?
            .ok_or(LedgerError::Internal { what: "mirrored batch vanished in its transaction" })?;
        commit_write(tx, &head, OP).await?;
        Ok(batch)
    }

    /// Takes up to `units` unused units out of a mirrored batch's quota (never below what was issued),
    /// before they are handed back to central, so that no licence can use them meanwhile; audited
    /// `lease.withheld`. Returns how many were taken. The next [`Ledger::record_upstream_leases`] sets the
    /// quota from central's figures again: units central did not take back become usable again.
    pub async fn withhold_units(&self, batch_id: &str, units: i64) -> Result<i64, LedgerError> {
        const OP: &str = "withhold lease units";
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        let b = load_batch(&mut tx, batch_id)
            .await
            .map_err(LedgerError::db(OP))?
            .ok_or_else(|| LedgerError::NotFound { what: "batch", id: batch_id.into() })?;
        let k = units.min(b.quota - b.issued).max(0);
        if k == 0 {
            tx.rollback().await.map_err(LedgerError::db(OP))?;
            return Ok(0);
        }
        // Writers are serialised, so `issued` is as read; the guard keeps it so if it is not.
        let n = sqlx::query("UPDATE batches SET quota = quota - $2 WHERE id = $1 AND quota - $2 >= issued")
            .bind(batch_id)
            .bind(k)
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::db(OP))?
            .rows_affected();
        if n != 1 {
            return Err(LedgerError::Internal { what: "quota guard refused to withhold units the ledger had counted" });
        }
        let details = serde_json::json!({"units": k, "quota": b.quota - k, "issued": b.issued});
        let ev =
            AuditEvent { actor: "upstream", event: "lease.withheld", subject: format!("batch/{batch_id}"), details };
        audit::append(&mut tx, &mut head, now_ms(), ev).await.map_err(LedgerError::db(OP))?;
        commit_write(tx, &head, OP).await?;
        Ok(k)
    }

    /// Drains a mirrored batch here (`drained`: new devices refused as exhausted, so stations go to
    /// central; the link hands every unused unit back) or resumes it; audited `batch.drained` /
    /// `batch.resumed`. Idempotent.
    pub async fn set_drained(&self, batch_id: &str, drained: bool, actor: &str) -> Result<Batch, LedgerError> {
        const OP: &str = "drain batch";
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        let b = load_batch(&mut tx, batch_id)
            .await
            .map_err(LedgerError::db(OP))?
            .ok_or_else(|| LedgerError::NotFound { what: "batch", id: batch_id.into() })?;
        if b.lease_expires_at.is_none() {
            return Err(LedgerError::Precondition {
                what: "batch",
                id: batch_id.into(),
                why: "it is not mirrored from central here: only a site broker's batches drain".into(),
            });
        }
        if b.drained_at.is_some() != drained {
            let now = now_ms();
            sqlx::query("UPDATE batches SET drained_at = $2 WHERE id = $1")
                .bind(batch_id)
                .bind(drained.then_some(now))
                .execute(&mut *tx)
                .await
                .map_err(LedgerError::db(OP))?;
            let event = if drained { "batch.drained" } else { "batch.resumed" };
            let details = serde_json::json!({"quota": b.quota, "issued": b.issued});
            let ev = AuditEvent { actor, event, subject: format!("batch/{batch_id}"), details };
            audit::append(&mut tx, &mut head, now, ev).await.map_err(LedgerError::db(OP))?;
        }
        let batch = load_batch(&mut tx, batch_id)
            .await
            .map_err(LedgerError::db(OP))?
            .ok_or(LedgerError::Internal { what: "drained batch vanished in its transaction" })?;
        commit_write(tx, &head, OP).await?;
        Ok(batch)
    }

    /// This site's leases of `batch_id` as last recorded, oldest first.
    pub async fn upstream_leases(&self, batch_id: &str) -> Result<Vec<UpstreamLease>, LedgerError> {
        const OP: &str = "read upstream leases";
        let mut conn = self.read_conn().await?;
        let rows = sqlx::query(
            "SELECT id, batch_id, granted, returned, state, granted_at, expires_at FROM upstream_leases \
             WHERE batch_id = $1 ORDER BY granted_at, id",
        )
        .bind(batch_id)
        .fetch_all(&mut *conn)
        .await
        .map_err(LedgerError::db(OP))?;
        rows.iter()
            .map(|r| {
                Ok(UpstreamLease {
                    id: r.try_get(0)?,
                    batch_id: r.try_get(1)?,
                    granted: r.try_get(2)?,
                    returned: r.try_get(3)?,
                    state: r.try_get(4)?,
                    granted_at: r.try_get(5)?,
                    expires_at: r.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(LedgerError::db(OP))
    }

    /// The seq up to which central acknowledged this ledger's records (0 before the first).
    pub async fn upstream_acked(&self) -> Result<i64, LedgerError> {
        let mut conn = self.read_conn().await?;
        let row = sqlx::query("SELECT acked_seq FROM upstream_cursor WHERE id = 1")
            .fetch_optional(&mut *conn)
            .await
            .map_err(LedgerError::db("read upstream cursor"))?;
        row.map(|r| r.try_get::<i64, _>(0))
            .transpose()
            .map_err(LedgerError::db("read upstream cursor"))
            .map(|s| s.unwrap_or(0))
    }

    /// Records that central holds this ledger up to `seq` (never moves back).
    pub async fn set_upstream_acked(&self, seq: i64) -> Result<(), LedgerError> {
        const OP: &str = "write upstream cursor";
        let mut conn = self.inner.write.acquire().await.map_err(LedgerError::db(OP))?;
        sqlx::query(
            "INSERT INTO upstream_cursor (id, acked_seq, updated_at) VALUES (1, $1, $2) ON CONFLICT (id) DO UPDATE \
             SET acked_seq = CASE WHEN excluded.acked_seq > upstream_cursor.acked_seq THEN excluded.acked_seq \
             ELSE upstream_cursor.acked_seq END, updated_at = excluded.updated_at",
        )
        .bind(seq)
        .bind(now_ms())
        .execute(&mut *conn)
        .await
        .map_err(LedgerError::db(OP))?;
        Ok(())
    }

    /// Up to `limit` audit records after `after_seq`, each with the row it is about.
    pub async fn replication_page(&self, after_seq: i64, limit: i64) -> Result<Vec<SiteRecord>, LedgerError> {
        const OP: &str = "read records to replicate";
        let mut conn = self.read_conn().await?;
        let records = audit::page(&mut conn, after_seq, limit).await.map_err(LedgerError::db(OP))?;
        let mut out = Vec::with_capacity(records.len());
        for audit in records {
            let item = item_of(&mut conn, &audit).await.map_err(LedgerError::db(OP))?;
            out.push(SiteRecord { audit, item });
        }
        Ok(out)
    }
}

/// The row `record` is about. A record whose row is missing (written by hand) carries none: central
/// still holds the record itself, and the site's own `admin audit verify` names what is wrong.
async fn item_of(conn: &mut AnyConnection, record: &AuditRecord) -> Result<Option<SiteItem>, sqlx::Error> {
    let details: serde_json::Value = serde_json::from_str(&record.details).unwrap_or(serde_json::Value::Null);
    let text = |k: &str| details.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let Some((batch_id, device_id)) = parse_device_subject(&record.subject) else {
        return Ok(None);
    };
    match record.event.as_str() {
        "licence.issued" => {
            let row = sqlx::query(
                "SELECT licence, certificate, station, site, issued_at FROM licences WHERE batch_id = $1 AND \
                 device_id = $2",
            )
            .bind(batch_id)
            .bind(device_id)
            .fetch_optional(&mut *conn)
            .await?;
            Ok(match row {
                None => None,
                Some(r) => Some(SiteItem::Licence(SiteLicence {
                    batch_id: batch_id.into(),
                    device_id: device_id.into(),
                    licence: r.try_get(0)?,
                    certificate: r.try_get(1)?,
                    station: r.try_get(2)?,
                    site: r.try_get(3)?,
                    issued_at: r.try_get(4)?,
                })),
            })
        }
        "licence.refused" => Ok(Some(SiteItem::Refusal(SiteRefusal {
            batch_id: batch_id.into(),
            device_id: device_id.into(),
            station: text("station"),
            site: text("site"),
            reason: text("reason"),
            detail: text("detail"),
        }))),
        "install.reported" => {
            let row = sqlx::query(
                "SELECT status_code, message, flash_crc, attempt, timings, reported_at FROM installs \
                 WHERE station = $1 AND result_id = $2",
            )
            .bind(text("station"))
            .bind(text("result_id"))
            .fetch_optional(&mut *conn)
            .await?;
            Ok(match row {
                None => None,
                Some(r) => Some(SiteItem::Install(SiteInstall {
                    station: text("station"),
                    result_id: text("result_id"),
                    batch_id: batch_id.into(),
                    device_id: device_id.into(),
                    status_code: u32::try_from(r.try_get::<i64, _>(0)?).unwrap_or(u32::MAX),
                    message: r.try_get(1)?,
                    flash_crc: r.try_get::<Option<i64>, _>(2)?.and_then(|c| u32::try_from(c).ok()),
                    attempt: u32::try_from(r.try_get::<i64, _>(3)?).unwrap_or(0),
                    timings_json: r.try_get(4)?,
                    reported_at: r.try_get(5)?,
                })),
            })
        }
        _ => Ok(None),
    }
}
