//! Quota leases (schema v8, issue 14): units of a batch's quota handed to a site broker, which issues
//! against them with its own HSM and ledger while its WAN link is up or down. This module owns the
//! central side: granting a lease atomically against the batch quota (`issued + leased + units <=
//! quota`, in one guarded UPDATE, so concurrent grants and licences on any number of brokers sharing the
//! ledger never exceed it), renewing a lease's expiry while its holder is connected, returning unused
//! units, and listing leases. Every grant, renewal and return is an audit record in the same transaction.
//!
//! Units a site used stay in `batches.leased` until its licences reach central (replication), which
//! moves each from `leased` to `issued`; so a lease is settled when `used + returned == granted`.

use std::time::Duration;

use rand::RngCore as _;
use sqlx::{AnyConnection, Row};

use super::audit::{self, AuditEvent};
use super::error::RefusalReason;
use super::{Ledger, LedgerError, begin_write, commit_write, load_batch, now_ms};

/// Most units one lease may grant.
pub const MAX_LEASE_UNITS: i64 = 1_000_000;
/// Shortest lease.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
/// Longest lease: a site cut off longer than this stops issuing.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where a lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Units may be used.
    Active,
    /// Every unit is used or returned.
    Settled,
}

impl LeaseState {
    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Settled => "settled",
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "active" => Ok(Self::Active),
            "settled" => Ok(Self::Settled),
            other => Err(format!("lease state {other:?} is not active or settled")),
        }
    }
}

/// A lease as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// 32 hex digits.
    pub id: String,
    /// Batch.
    pub batch_id: String,
    /// The site it serves.
    pub site: String,
    /// The site broker holding it (identity URI).
    pub holder: String,
    /// Units granted.
    pub granted: i64,
    /// Units whose licences reached central.
    pub used: i64,
    /// Units handed back.
    pub returned: i64,
    /// State.
    pub state: LeaseState,
    /// When granted (ms since the Unix epoch).
    pub granted_at: i64,
    /// When the holder must stop issuing against it (ms).
    pub expires_at: i64,
    /// When it was settled (ms).
    pub settled_at: Option<i64>,
}

impl Lease {
    /// Units neither used nor returned: counted against the quota at central, usable at the site.
    pub fn outstanding(&self) -> i64 {
        self.granted - self.used - self.returned
    }
}

/// What a site broker asks for.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    /// Batch.
    pub batch_id: String,
    /// The site it will serve (must be allowed by the batch).
    pub site: String,
    /// The site broker (identity URI).
    pub holder: String,
    /// Units wanted; fewer are granted when the quota has fewer left.
    pub units: i64,
    /// How long the lease lasts.
    pub ttl: Duration,
}

pub(super) const LEASE_COLUMNS: &str =
    "id, batch_id, site, holder, granted, used, returned, state, granted_at, expires_at, settled_at";

pub(super) fn lease_from_row(r: &sqlx::any::AnyRow) -> Result<Lease, sqlx::Error> {
    let state: String = r.try_get(7)?;
    Ok(Lease {
        id: r.try_get(0)?,
        batch_id: r.try_get(1)?,
        site: r.try_get(2)?,
        holder: r.try_get(3)?,
        granted: r.try_get(4)?,
        used: r.try_get(5)?,
        returned: r.try_get(6)?,
        state: LeaseState::parse(&state).map_err(|e| sqlx::Error::Decode(e.into()))?,
        granted_at: r.try_get(8)?,
        expires_at: r.try_get(9)?,
        settled_at: r.try_get(10)?,
    })
}

/// A lease's time to live must lie within [`MIN_LEASE_TTL`] ..= [`MAX_LEASE_TTL`].
fn check_ttl(ttl: Duration) -> Result<(), LedgerError> {
    if ttl < MIN_LEASE_TTL || ttl > MAX_LEASE_TTL {
        return Err(LedgerError::Invalid {
            field: "lease ttl",
            value: format!("{ttl:?}"),
            why: "must be between 1 s and 7 days",
        });
    }
    Ok(())
}

/// Lease `id` read inside a write transaction, refused (`why`) unless `holder` holds it.
async fn held_lease(
    conn: &mut AnyConnection,
    id: &str,
    holder: &str,
    op: &'static str,
    why: &'static str,
) -> Result<Lease, LedgerError> {
    let row = sqlx::query(&format!("SELECT {LEASE_COLUMNS} FROM leases WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(LedgerError::db(op))?
        .ok_or_else(|| LedgerError::NotFound { what: "lease", id: id.to_owned() })?;
    let lease = lease_from_row(&row).map_err(LedgerError::db(op))?;
    if lease.holder != holder {
        return Err(LedgerError::Invalid { field: "lease holder", value: holder.to_owned(), why });
    }
    Ok(lease)
}

impl Ledger {
    /// Grants a lease of up to `req.units` units of the batch's quota to a site broker: the batch must
    /// exist, be open, be within its window and allow the site; at least one unit must be left. Audited
    /// as `lease.granted`.
    pub async fn grant_lease(&self, req: &LeaseRequest, actor: &str) -> Result<Lease, LedgerError> {
        const OP: &str = "grant lease";
        if !(1..=MAX_LEASE_UNITS).contains(&req.units) {
            return Err(LedgerError::Invalid {
                field: "lease units",
                value: req.units.to_string(),
                why: "must be between 1 and 1,000,000",
            });
        }
        check_ttl(req.ttl)?;
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        let b = load_batch(&mut tx, &req.batch_id)
            .await
            .map_err(LedgerError::db(OP))?
            .ok_or_else(|| LedgerError::NotFound { what: "batch", id: req.batch_id.clone() })?;
        let now = now_ms();
        if let Err((reason, detail)) = b.check(now, &req.site, &b.product_id) {
            return Err(LedgerError::Refused { reason, detail });
        }
        let units = req.units.min(b.quota - b.issued - b.leased);
        if units < 1 {
            return Err(LedgerError::Refused {
                reason: RefusalReason::QuotaExhausted,
                detail: format!(
                    "batch {:?} has issued {} and leased {} of {} licences",
                    b.id, b.issued, b.leased, b.quota
                ),
            });
        }
        // The authoritative guard, as for licences: the same statement checks and takes the units.
        let n = sqlx::query(
            "UPDATE batches SET leased = leased + $2 WHERE id = $1 AND state = 'open' AND issued + leased + $2 <= quota",
        )
        .bind(&b.id)
        .bind(units)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::db(OP))?
        .rows_affected();
        if n != 1 {
            return Err(LedgerError::Internal { what: "lease quota guard refused units the ledger had checked" });
        }
        let mut raw = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let ttl_ms = i64::try_from(req.ttl.as_millis()).unwrap_or(i64::MAX);
        let lease = Lease {
            id: hex::encode(raw),
            batch_id: b.id.clone(),
            site: req.site.clone(),
            holder: req.holder.clone(),
            granted: units,
            used: 0,
            returned: 0,
            state: LeaseState::Active,
            granted_at: now,
            expires_at: now.saturating_add(ttl_ms),
            settled_at: None,
        };
        sqlx::query(&format!(
            "INSERT INTO leases ({LEASE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, 0, 0, 'active', $6, $7, NULL)"
        ))
        .bind(&lease.id)
        .bind(&lease.batch_id)
        .bind(&lease.site)
        .bind(&lease.holder)
        .bind(lease.granted)
        .bind(lease.granted_at)
        .bind(lease.expires_at)
        .execute(&mut *tx)
        .await
        .map_err(LedgerError::db(OP))?;
        let details = serde_json::json!({
            "batch": lease.batch_id,
            "site": lease.site,
            "holder": lease.holder,
            "asked": req.units,
            "granted": lease.granted,
            "expires_at": lease.expires_at,
        });
        let ev = AuditEvent { actor, event: "lease.granted", subject: format!("lease/{}", lease.id), details };
        audit::append(&mut tx, &mut head, now, ev).await.map_err(LedgerError::db(OP))?;
        commit_write(tx, &head, OP).await?;
        self.forget_batch(&b.id);
        Ok(lease)
    }

    /// Hands `units` unused units of lease `id` back to the batch (a site drained, its lease expired or
    /// its batch closed); only its holder may. Settles the lease once every unit is used or returned.
    /// Audited as `lease.returned`.
    pub async fn return_lease(&self, id: &str, holder: &str, units: i64, actor: &str) -> Result<Lease, LedgerError> {
        const OP: &str = "return lease units";
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        let mut lease =
            held_lease(&mut tx, id, holder, OP, "only the site broker holding a lease may return its units").await?;
        if units < 0 || units > lease.outstanding() {
            return Err(LedgerError::Invalid {
                field: "returned units",
                value: units.to_string(),
                why: "must be between 0 and the lease's outstanding units",
            });
        }
        let now = now_ms();
        lease.returned += units;
        if lease.outstanding() == 0 {
            lease.state = LeaseState::Settled;
            lease.settled_at = Some(now);
        }
        sqlx::query("UPDATE leases SET returned = $2, state = $3, settled_at = $4 WHERE id = $1")
            .bind(&lease.id)
            .bind(lease.returned)
            .bind(lease.state.as_str())
            .bind(lease.settled_at)
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::db(OP))?;
        sqlx::query("UPDATE batches SET leased = leased - $2 WHERE id = $1")
            .bind(&lease.batch_id)
            .bind(units)
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::db(OP))?;
        let details = serde_json::json!({
            "batch": lease.batch_id,
            "units": units,
            "used": lease.used,
            "returned": lease.returned,
            "granted": lease.granted,
            "state": lease.state.as_str(),
        });
        let ev = AuditEvent { actor, event: "lease.returned", subject: format!("lease/{}", lease.id), details };
        audit::append(&mut tx, &mut head, now, ev).await.map_err(LedgerError::db(OP))?;
        commit_write(tx, &head, OP).await?;
        self.forget_batch(&lease.batch_id);
        Ok(lease)
    }

    /// Extends active lease `id` to expire `ttl` from now (its holder renews while connected; a site cut
    /// off from central cannot, and stops issuing at the old expiry). Audited as `lease.renewed`.
    pub async fn renew_lease(&self, id: &str, holder: &str, ttl: Duration, actor: &str) -> Result<Lease, LedgerError> {
        const OP: &str = "renew lease";
        check_ttl(ttl)?;
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        let mut lease =
            held_lease(&mut tx, id, holder, OP, "only the site broker holding a lease may renew it").await?;
        let now = now_ms();
        if lease.state != LeaseState::Active || lease.expires_at <= now {
            return Err(LedgerError::Invalid {
                field: "lease",
                value: id.to_owned(),
                why: "only an active lease that has not expired can be renewed (acquire a new one)",
            });
        }
        lease.expires_at = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        sqlx::query("UPDATE leases SET expires_at = $2 WHERE id = $1")
            .bind(&lease.id)
            .bind(lease.expires_at)
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::db(OP))?;
        let details = serde_json::json!({ "batch": lease.batch_id, "expires_at": lease.expires_at });
        let ev = AuditEvent { actor, event: "lease.renewed", subject: format!("lease/{}", lease.id), details };
        audit::append(&mut tx, &mut head, now, ev).await.map_err(LedgerError::db(OP))?;
        commit_write(tx, &head, OP).await?;
        Ok(lease)
    }

    /// Leases, newest first, of one batch or all (at most `limit`).
    pub async fn leases(&self, batch_id: Option<&str>, limit: i64) -> Result<Vec<Lease>, LedgerError> {
        const OP: &str = "list leases";
        let mut conn = self.read_conn().await?;
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM leases WHERE ($1 = '' OR batch_id = $1) ORDER BY granted_at DESC, id LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(batch_id.unwrap_or_default())
            .bind(limit)
            .fetch_all(&mut *conn)
            .await
            .map_err(LedgerError::db(OP))?;
        rows.iter().map(lease_from_row).collect::<Result<_, _>>().map_err(LedgerError::db(OP))
    }
}
