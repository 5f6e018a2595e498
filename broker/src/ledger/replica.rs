//! What a central broker keeps of its site brokers (schema v9, issue 14): each site ledger's audit stream
//! as replicated (`site_streams`, `site_audit`), the devices connected sites claimed before licensing them
//! (`device_claims`) and the licences a site issued offline for a device already held here from another
//! site (`licence_conflicts`).
//!
//! Owns [`Ledger::claim_device`] (one site per (batch, device)), [`Ledger::replicate`] (a batch of a site
//! ledger's records, checked against the chain this ledger holds of it and applied in one write
//! transaction), [`Ledger::note_site_head`] and [`Ledger::site_streams`].
//!
//! A replicated licence takes its unit from the caller's oldest active lease of the batch with units
//! outstanding (`leased -= 1, issued += 1`, the lease's `used += 1`), and is audited here as
//! `licence.replicated`. A licence for a device this ledger already holds from another site (or under
//! other bytes) is stored apart as a conflict and audited `licence.conflict`; its unit is used all the
//! same, so the quota stays an upper bound on the chips that could have been programmed. A licence with no
//! lease left to take its unit from is stored (the chip exists) and audited `licence.unleased`: its unit
//! comes from the batch's free quota when there is one; past the quota the schema's `issued <= quota`
//! cannot count it, and the record says `"counted": false` — a site issuing past its leases is broken or
//! hostile either way. `flashgate_common::audit::issuance` is the rule the reconciliations count by.

use std::collections::HashSet;

use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, Row};

use super::audit::{self, AuditEvent, AuditRecord, Head, genesis_hash, record_hash};
use super::leases::{LEASE_COLUMNS, Lease, lease_from_row};
use super::{Ledger, LedgerError, RefusalReason, begin_write, commit_write, load_batch, now_ms};

/// Most records one `replicate` call takes.
pub const MAX_REPLICATE_RECORDS: usize = 256;

/// One site ledger's stream as this ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteStream {
    /// The site ledger's id (32 hex digits).
    pub site_ledger_id: String,
    /// The site broker (identity URI).
    pub holder: String,
    /// Its site.
    pub site: String,
    /// The highest site seq held here.
    pub acked_seq: i64,
    /// The site's audit head as it last reported it.
    pub site_head_seq: i64,
    /// Hash of the site record at `acked_seq` (the genesis hash of the site ledger id at 0).
    pub head_hash: Vec<u8>,
    /// `at` of the record at `acked_seq` (site clock, ms).
    pub last_record_at: Option<i64>,
    /// Licences replicated into `licences` from this stream.
    pub licences: i64,
    /// Licences kept as conflicts.
    pub conflicts: i64,
    /// First contact (ms).
    pub created_at: i64,
    /// Last change (ms).
    pub updated_at: i64,
}

impl SiteStream {
    /// Records the site holds that this ledger does not (never negative).
    pub fn lag_records(&self) -> i64 {
        (self.site_head_seq - self.acked_seq).max(0)
    }

    /// How far behind the stream is, in ms at `now`: 0 when caught up, else the age of the last record
    /// held (or of the first contact, when none is).
    pub fn lag_ms(&self, now: i64) -> i64 {
        if self.lag_records() == 0 {
            return 0;
        }
        (now - self.last_record_at.unwrap_or(self.created_at)).max(0)
    }
}

/// A licence a site issued, as it replicates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteLicence {
    /// Batch.
    pub batch_id: String,
    /// Device.
    pub device_id: String,
    /// The licence bytes.
    pub licence: Vec<u8>,
    /// The chip certificate it was issued for.
    pub certificate: Vec<u8>,
    /// The station it was issued to.
    pub station: String,
    /// The station's site.
    pub site: String,
    /// When the site issued it (ms, site clock).
    pub issued_at: i64,
}

/// A refusal at a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteRefusal {
    /// Batch as asked for.
    pub batch_id: String,
    /// Device.
    pub device_id: String,
    /// Station.
    pub station: String,
    /// Site.
    pub site: String,
    /// A stable reason name ([`RefusalReason::from_name`]).
    pub reason: String,
    /// Its detail in words.
    pub detail: String,
}

/// An install report made at a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteInstall {
    /// Station.
    pub station: String,
    /// The station's idempotency key.
    pub result_id: String,
    /// Batch.
    pub batch_id: String,
    /// Device.
    pub device_id: String,
    /// Status code.
    pub status_code: u32,
    /// Message.
    pub message: String,
    /// CRC-32 of the flash.
    pub flash_crc: Option<u32>,
    /// Attempt.
    pub attempt: u32,
    /// Stage timings (JSON object, as stored).
    pub timings_json: String,
    /// When the site received it (ms, site clock).
    pub reported_at: i64,
}

/// The row a site record carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiteItem {
    /// With a `licence.issued` record.
    Licence(SiteLicence),
    /// With a `licence.refused` record.
    Refusal(SiteRefusal),
    /// With an `install.reported` record.
    Install(SiteInstall),
}

/// One record of a site ledger with what it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteRecord {
    /// The site's audit record, as stored and hashed there.
    pub audit: AuditRecord,
    /// Its row, for the events that carry one.
    pub item: Option<SiteItem>,
}

/// What one `replicate` call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replicated {
    /// The highest site seq now held.
    pub acked_seq: i64,
    /// Records at or below the acknowledged seq, skipped.
    pub skipped: u32,
    /// Records stored.
    pub stored: u32,
    /// Licences added to `licences`.
    pub licences: u32,
    /// Licences already held from the same site with the same bytes.
    pub duplicates: u32,
    /// Licences kept as conflicts.
    pub conflicts: u32,
    /// Licences with no lease to take their unit from.
    pub unleased: u32,
    /// Refusals recorded.
    pub refusals: u32,
    /// Install reports recorded (a report already held is not counted).
    pub installs: u32,
}

/// Where a replicated licence's unit came from.
enum Unit {
    /// One of the caller's leases.
    Lease(String),
    /// The batch's free quota (no lease had units left).
    Free,
    /// Nowhere: the batch's quota is spent (not counted in `issued`).
    Uncounted,
}

impl Unit {
    fn lease(&self) -> Option<&str> {
        match self {
            Self::Lease(id) => Some(id),
            _ => None,
        }
    }

    fn counted(&self) -> bool {
        !matches!(self, Self::Uncounted)
    }
}

/// A site ledger id: 32 lowercase hex digits, as bytes.
pub fn parse_site_ledger_id(id: &str) -> Result<[u8; 16], LedgerError> {
    let mut out = [0u8; 16];
    let lower = id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if id.len() != 32 || !lower || hex::decode_to_slice(id, &mut out).is_err() {
        return Err(LedgerError::Invalid {
            field: "site ledger id",
            value: audit_shown(id),
            why: "must be 32 lowercase hex digits",
        });
    }
    Ok(out)
}

const STREAM_COLUMNS: &str = "site_ledger_id, holder, site, acked_seq, site_head_seq, head_hash, last_record_at, \
     licences, conflicts, created_at, updated_at";

fn stream_from_row(r: &sqlx::any::AnyRow) -> Result<SiteStream, sqlx::Error> {
    Ok(SiteStream {
        site_ledger_id: r.try_get(0)?,
        holder: r.try_get(1)?,
        site: r.try_get(2)?,
        acked_seq: r.try_get(3)?,
        site_head_seq: r.try_get(4)?,
        head_hash: r.try_get(5)?,
        last_record_at: r.try_get(6)?,
        licences: r.try_get(7)?,
        conflicts: r.try_get(8)?,
        created_at: r.try_get(9)?,
        updated_at: r.try_get(10)?,
    })
}

/// The stream of `site_ledger_id` inside a write transaction, created at first contact (acked 0, head the
/// genesis hash of the id). A stream belongs to the holder that opened it: another caller is refused.
async fn stream_for(
    conn: &mut AnyConnection,
    id: &[u8; 16],
    holder: &str,
    site: &str,
    now: i64,
    op: &'static str,
) -> Result<SiteStream, LedgerError> {
    let hex_id = hex::encode(id);
    let row = sqlx::query(&format!("SELECT {STREAM_COLUMNS} FROM site_streams WHERE site_ledger_id = $1"))
        .bind(&hex_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(LedgerError::db(op))?;
    if let Some(row) = row {
        let s = stream_from_row(&row).map_err(LedgerError::db(op))?;
        if s.holder != holder || s.site != site {
            return Err(LedgerError::Precondition {
                what: "site ledger",
                id: hex_id,
                why: format!("is the stream of {} (site {:?}), not of {holder} (site {site:?})", s.holder, s.site),
            });
        }
        return Ok(s);
    }
    let s = SiteStream {
        site_ledger_id: hex_id,
        holder: holder.to_owned(),
        site: site.to_owned(),
        acked_seq: 0,
        site_head_seq: 0,
        head_hash: genesis_hash(id).to_vec(),
        last_record_at: None,
        licences: 0,
        conflicts: 0,
        created_at: now,
        updated_at: now,
    };
    sqlx::query(&format!(
        "INSERT INTO site_streams ({STREAM_COLUMNS}) VALUES ($1, $2, $3, 0, 0, $4, NULL, 0, 0, $5, $5)"
    ))
    .bind(&s.site_ledger_id)
    .bind(&s.holder)
    .bind(&s.site)
    .bind(&s.head_hash)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(LedgerError::db(op))?;
    Ok(s)
}

async fn store_stream(conn: &mut AnyConnection, s: &SiteStream, op: &'static str) -> Result<(), LedgerError> {
    sqlx::query(
        "UPDATE site_streams SET acked_seq = $2, site_head_seq = $3, head_hash = $4, last_record_at = $5, \
         licences = $6, conflicts = $7, updated_at = $8 WHERE site_ledger_id = $1",
    )
    .bind(&s.site_ledger_id)
    .bind(s.acked_seq)
    .bind(s.site_head_seq)
    .bind(&s.head_hash)
    .bind(s.last_record_at)
    .bind(s.licences)
    .bind(s.conflicts)
    .bind(s.updated_at)
    .execute(&mut *conn)
    .await
    .map_err(LedgerError::db(op))?;
    Ok(())
}

/// Takes one unit for a replicated licence of `batch_id`: from `holder`'s oldest active lease of the batch
/// with units outstanding (settled when its last unit is used), else from the batch's free quota, else
/// none.
async fn take_unit(
    conn: &mut AnyConnection,
    batch_id: &str,
    holder: &str,
    now: i64,
    op: &'static str,
) -> Result<Unit, LedgerError> {
    let row = sqlx::query(&format!(
        "SELECT {LEASE_COLUMNS} FROM leases WHERE holder = $1 AND batch_id = $2 AND state = 'active' \
         AND used + returned < granted ORDER BY granted_at, id LIMIT 1"
    ))
    .bind(holder)
    .bind(batch_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(LedgerError::db(op))?;
    if let Some(row) = row {
        let mut lease = lease_from_row(&row).map_err(LedgerError::db(op))?;
        lease.used += 1;
        let settled = lease.outstanding() == 0;
        sqlx::query(
            "UPDATE leases SET used = $2, state = $3, settled_at = $4 WHERE id = $1 AND used + returned < granted",
        )
        .bind(&lease.id)
        .bind(lease.used)
        .bind(if settled { "settled" } else { "active" })
        .bind(if settled { Some(now) } else { None })
        .execute(&mut *conn)
        .await
        .map_err(LedgerError::db(op))?;
        let n =
            sqlx::query("UPDATE batches SET leased = leased - 1, issued = issued + 1 WHERE id = $1 AND leased >= 1")
                .bind(batch_id)
                .execute(&mut *conn)
                .await
                .map_err(LedgerError::db(op))?
                .rows_affected();
        if n != 1 {
            return Err(LedgerError::Internal { what: "a lease holds units its batch does not count as leased" });
        }
        return Ok(Unit::Lease(lease.id));
    }
    let n = sqlx::query("UPDATE batches SET issued = issued + 1 WHERE id = $1 AND issued + leased + 1 <= quota")
        .bind(batch_id)
        .execute(&mut *conn)
        .await
        .map_err(LedgerError::db(op))?
        .rows_affected();
    Ok(if n == 1 { Unit::Free } else { Unit::Uncounted })
}

/// The licence-bearing fields a site record's details must carry: its `licence_sha256`.
fn details_licence_sha256(details: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(details).ok()?;
    v.get("licence_sha256")?.as_str().map(str::to_owned)
}

/// Checks that a record's row matches the record (event, subject and, for a licence, its hash), so that
/// what is applied here is what the site's chain vouches for.
fn check_item(r: &SiteRecord, site: &str) -> Result<(), String> {
    let (want_event, batch, device) = match &r.item {
        None => {
            return match r.audit.event.as_str() {
                e @ ("licence.issued" | "licence.refused" | "install.reported") => {
                    Err(format!("a {e} record carries no row"))
                }
                _ => Ok(()),
            };
        }
        Some(SiteItem::Licence(l)) => ("licence.issued", &l.batch_id, &l.device_id),
        Some(SiteItem::Refusal(f)) => ("licence.refused", &f.batch_id, &f.device_id),
        Some(SiteItem::Install(i)) => ("install.reported", &i.batch_id, &i.device_id),
    };
    if r.audit.event != want_event {
        return Err(format!("a {} record carries the row of a {want_event} record", audit_shown(&r.audit.event)));
    }
    let subject = audit::device_subject(batch, device);
    if r.audit.subject != subject {
        return Err(format!(
            "its row is about {} but the record's subject is {}",
            audit_shown(&subject),
            audit_shown(&r.audit.subject)
        ));
    }
    if let Some(SiteItem::Licence(l)) = &r.item {
        let sha = hex::encode(Sha256::digest(&l.licence));
        match details_licence_sha256(&r.audit.details) {
            Some(d) if d == sha => {}
            Some(d) => {
                return Err(format!(
                    "its licence hashes to {sha} but the record names licence_sha256 {}",
                    audit_shown(&d)
                ));
            }
            None => return Err("the record's details carry no licence_sha256".into()),
        }
        if l.site != site {
            return Err(format!("its licence names site {:?}, the caller serves site {site:?}", audit_shown(&l.site)));
        }
    }
    Ok(())
}

/// Most bytes of a value from a site shown in an error or log line.
const SHOWN_PREFIX: usize = 48;

/// A value from a site in a bounded, escaped form (at most [`SHOWN_PREFIX`] bytes, cut at a character
/// boundary, the full length noted when cut).
fn audit_shown(v: &str) -> String {
    let mut cut = v.len().min(SHOWN_PREFIX);
    while !v.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out: String = v[..cut].chars().flat_map(char::escape_debug).collect();
    if cut < v.len() {
        out.push_str(&format!("… ({} bytes)", v.len()));
    }
    out
}

impl Ledger {
    /// Claims device `device_id` of batch `batch_id` for `site` (asked by a connected site broker before it
    /// licenses a device it has not licensed itself). Refused `LICENSED_AT_OTHER_SITE`, naming the site,
    /// when this ledger holds a licence of the device from another site or a claim by another site;
    /// `UNKNOWN_BATCH` / `SITE_NOT_ALLOWED` for a batch that does not exist or does not allow the site.
    /// Returns whether this call made the claim (false when `site` held it already).
    pub async fn claim_device(
        &self,
        batch_id: &str,
        device_id: &str,
        site: &str,
        holder: &str,
    ) -> Result<bool, LedgerError> {
        // Through the group-commit writer: a claim per new device at every site would otherwise be a
        // transaction of its own on the single writer (BENCHMARKS.md, site brokers).
        let claim = super::writer::ClaimRecord {
            batch_id: batch_id.into(),
            device_id: device_id.into(),
            site: site.into(),
            holder: holder.into(),
        };
        match self.submit(super::writer::Payload::Claim(claim)).await? {
            super::writer::Outcome::Claim(made) => Ok(made),
            _ => Err(LedgerError::Internal { what: "writer answered a claim with another outcome" }),
        }
    }

    /// Records the audit head a site broker reports for its ledger `site_ledger_id` (opening its stream at
    /// first contact): the lag figures of [`SiteStream`]. Returns the stream.
    pub async fn note_site_head(
        &self,
        holder: &str,
        site: &str,
        site_ledger_id: &str,
        site_head_seq: i64,
    ) -> Result<SiteStream, LedgerError> {
        const OP: &str = "note a site ledger's head";
        let id = parse_site_ledger_id(site_ledger_id)?;
        check_head_seq(site_head_seq)?;
        let (mut tx, head) = begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        let now = now_ms();
        let mut s = stream_for(&mut tx, &id, holder, site, now, OP).await?;
        s.site_head_seq = site_head_seq.max(s.acked_seq);
        s.updated_at = now;
        store_stream(&mut tx, &s, OP).await?;
        commit_write(tx, &head, OP).await?;
        Ok(s)
    }

    /// Every site stream, most recently updated first.
    pub async fn site_streams(&self) -> Result<Vec<SiteStream>, LedgerError> {
        const OP: &str = "list site streams";
        let mut conn = self.read_conn().await?;
        let rows =
            sqlx::query(&format!("SELECT {STREAM_COLUMNS} FROM site_streams ORDER BY updated_at DESC, site_ledger_id"))
                .fetch_all(&mut *conn)
                .await
                .map_err(LedgerError::db(OP))?;
        rows.iter().map(stream_from_row).collect::<Result<_, _>>().map_err(LedgerError::db(OP))
    }

    /// The leases `holder` holds of the batches named, newest first.
    pub async fn leases_of(&self, holder: &str, batch_ids: &[String]) -> Result<Vec<Lease>, LedgerError> {
        const OP: &str = "list a site broker's leases";
        let mut conn = self.read_conn().await?;
        let rows =
            sqlx::query(&format!("SELECT {LEASE_COLUMNS} FROM leases WHERE holder = $1 ORDER BY granted_at DESC, id"))
                .bind(holder)
                .fetch_all(&mut *conn)
                .await
                .map_err(LedgerError::db(OP))?;
        let wanted: HashSet<&str> = batch_ids.iter().map(String::as_str).collect();
        let mut out = Vec::new();
        for r in &rows {
            let l = lease_from_row(r).map_err(LedgerError::db(OP))?;
            if wanted.is_empty() || wanted.contains(l.batch_id.as_str()) {
                out.push(l);
            }
        }
        Ok(out)
    }

    /// Applies records of site ledger `site_ledger_id` sent by `holder` (serving `site`) in one write
    /// transaction: records at or below the acknowledged seq are skipped; the rest must follow it without a
    /// gap, each chaining from the previous hash (the genesis hash of the site ledger id first) with its
    /// hash recomputed, and each row matching its record — else nothing is stored and the first bad seq is
    /// named ([`LedgerError::SiteChain`]). Each record is kept verbatim in `site_audit`; licences, refusals
    /// and install reports are applied as the module header says; one `site.replicated` record audits the
    /// request here (none when every record was skipped).
    pub async fn replicate(
        &self,
        holder: &str,
        site: &str,
        site_ledger_id: &str,
        site_head_seq: i64,
        records: &[SiteRecord],
    ) -> Result<Replicated, LedgerError> {
        const OP: &str = "replicate site records";
        let id = parse_site_ledger_id(site_ledger_id)?;
        check_head_seq(site_head_seq)?;
        if records.is_empty() || records.len() > MAX_REPLICATE_RECORDS {
            return Err(LedgerError::Invalid {
                field: "replicated records",
                value: records.len().to_string(),
                why: "must be 1 ..= 256 records",
            });
        }
        let (mut tx, mut head) =
            begin_write(&self.inner.write, self.inner.dialect).await.map_err(LedgerError::db(OP))?;
        let now = now_ms();
        let mut s = stream_for(&mut tx, &id, holder, site, now, OP).await?;
        let mut out = Replicated::default();
        let mut staged: Vec<AuditRecord> = Vec::new();
        let mut touched: HashSet<String> = HashSet::new();
        let from_seq = s.acked_seq + 1;
        let sid = s.site_ledger_id.clone();
        for r in records {
            if r.audit.seq <= s.acked_seq {
                out.skipped += 1;
                continue;
            }
            let broken = |seq: i64, why: String| LedgerError::SiteChain { site_ledger_id: sid.clone(), seq, why };
            let expected = s.acked_seq + 1;
            if r.audit.seq != expected {
                return Err(broken(
                    expected,
                    format!("expected seq {expected}, found seq {} (records missing)", r.audit.seq),
                ));
            }
            if r.audit.prev_hash != s.head_hash {
                return Err(broken(
                    r.audit.seq,
                    if r.audit.seq == 1 {
                        "prev_hash is not the genesis hash of the site ledger id".into()
                    } else {
                        format!("prev_hash is not the hash of seq {} held here", s.acked_seq)
                    },
                ));
            }
            let a = &r.audit;
            let h = record_hash(&a.prev_hash, a.seq, a.at, &a.actor, &a.event, &a.subject, &a.details);
            if a.hash[..] != h[..] {
                return Err(broken(a.seq, "its hash differs from the hash recomputed from its fields (edited)".into()));
            }
            check_item(r, site).map_err(|why| broken(a.seq, why))?;
            sqlx::query(
                "INSERT INTO site_audit (site_ledger_id, seq, at, actor, event, subject, details, prev_hash, hash) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(&sid)
            .bind(a.seq)
            .bind(a.at)
            .bind(&a.actor)
            .bind(&a.event)
            .bind(&a.subject)
            .bind(&a.details)
            .bind(&a.prev_hash)
            .bind(&a.hash)
            .execute(&mut *tx)
            .await
            .map_err(LedgerError::db(OP))?;
            let ctx = Ctx { holder, site_ledger_id: &sid, seq: a.seq, now };
            match &r.item {
                None => {}
                Some(SiteItem::Licence(l)) => {
                    touched.insert(l.batch_id.clone());
                    apply_licence(&mut tx, &mut head, &mut staged, &ctx, l, &mut out, &mut s).await?;
                }
                Some(SiteItem::Refusal(f)) => {
                    apply_refusal(&mut tx, &mut head, &mut staged, &ctx, a.at, f, &mut out).await?
                }
                Some(SiteItem::Install(i)) => apply_install(&mut tx, &mut head, &mut staged, &ctx, i, &mut out).await?,
            }
            s.acked_seq = a.seq;
            s.head_hash = h.to_vec();
            s.last_record_at = Some(a.at);
            out.stored += 1;
        }
        s.site_head_seq = site_head_seq.max(s.acked_seq);
        s.updated_at = now;
        out.acked_seq = s.acked_seq;
        if out.stored > 0 {
            let details = serde_json::json!({
                "holder": holder,
                "site": site,
                "site_ledger_id": s.site_ledger_id,
                "from_seq": from_seq,
                "to_seq": s.acked_seq,
                "head_hash": hex::encode(&s.head_hash),
                "records": out.stored,
                "licences": out.licences,
                "duplicates": out.duplicates,
                "conflicts": out.conflicts,
                "unleased": out.unleased,
                "refusals": out.refusals,
                "installs": out.installs,
            });
            let ev = AuditEvent {
                actor: holder,
                event: "site.replicated",
                subject: format!("site/{site}/ledger/{}", s.site_ledger_id),
                details,
            };
            staged.push(audit::stage(&mut head, now, ev));
        }
        store_stream(&mut tx, &s, OP).await?;
        audit::insert_records(&mut tx, &staged).await.map_err(LedgerError::db(OP))?;
        commit_write(tx, &head, OP).await?;
        self.inner.appended.add(staged.len());
        for b in &touched {
            self.forget_batch(b);
        }
        Ok(out)
    }
}

/// A reported site head seq is never negative.
fn check_head_seq(seq: i64) -> Result<(), LedgerError> {
    if seq < 0 {
        return Err(LedgerError::Invalid {
            field: "site head seq",
            value: seq.to_string(),
            why: "must not be negative",
        });
    }
    Ok(())
}

/// What every applied row is audited with.
struct Ctx<'a> {
    holder: &'a str,
    site_ledger_id: &'a str,
    seq: i64,
    now: i64,
}

impl Ctx<'_> {
    fn broken(&self, why: String) -> LedgerError {
        LedgerError::SiteChain { site_ledger_id: self.site_ledger_id.to_owned(), seq: self.seq, why }
    }
}

async fn apply_licence(
    conn: &mut AnyConnection,
    head: &mut Head,
    staged: &mut Vec<AuditRecord>,
    ctx: &Ctx<'_>,
    l: &SiteLicence,
    out: &mut Replicated,
    stream: &mut SiteStream,
) -> Result<(), LedgerError> {
    const OP: &str = "replicate a site licence";
    if load_batch(conn, &l.batch_id).await.map_err(LedgerError::db(OP))?.is_none() {
        return Err(
            ctx.broken(format!("its licence names batch {:?}, which does not exist here", audit_shown(&l.batch_id)))
        );
    }
    let held = sqlx::query("SELECT licence, site FROM licences WHERE batch_id = $1 AND device_id = $2")
        .bind(&l.batch_id)
        .bind(&l.device_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(LedgerError::db(OP))?;
    let held = match held {
        Some(row) => Some((
            row.try_get::<Vec<u8>, _>(0).map_err(LedgerError::db(OP))?,
            row.try_get::<String, _>(1).map_err(LedgerError::db(OP))?,
        )),
        // Not licensed here yet, but claimed by another site while connected: that site asked first, so
        // this (offline) licence is the conflict, whichever of the two reaches central first.
        None => sqlx::query("SELECT site FROM device_claims WHERE batch_id = $1 AND device_id = $2 AND site <> $3")
            .bind(&l.batch_id)
            .bind(&l.device_id)
            .bind(&l.site)
            .fetch_optional(&mut *conn)
            .await
            .map_err(LedgerError::db(OP))?
            .map(|row| row.try_get::<String, _>(0).map(|site| (Vec::new(), site)))
            .transpose()
            .map_err(LedgerError::db(OP))?,
    };
    let sha = hex::encode(Sha256::digest(&l.licence));
    let subject = audit::device_subject(&l.batch_id, &l.device_id);
    match held {
        Some((bytes, held_site)) if bytes == l.licence && held_site == l.site => {
            out.duplicates += 1;
        }
        Some((_, held_site)) => {
            let unit = take_unit(conn, &l.batch_id, ctx.holder, ctx.now, OP).await?;
            sqlx::query(
                "INSERT INTO licence_conflicts (site_ledger_id, site_seq, batch_id, device_id, site, station, held_site, \
                 licence, certificate, issued_at, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(ctx.site_ledger_id)
            .bind(ctx.seq)
            .bind(&l.batch_id)
            .bind(&l.device_id)
            .bind(&l.site)
            .bind(&l.station)
            .bind(&held_site)
            .bind(&l.licence)
            .bind(&l.certificate)
            .bind(l.issued_at)
            .bind(ctx.now)
            .execute(&mut *conn)
            .await
            .map_err(LedgerError::db(OP))?;
            tracing::warn!(batch = %l.batch_id, device = %l.device_id, site = %l.site, held_site = %held_site,
                site_ledger = ctx.site_ledger_id, seq = ctx.seq, "a site licensed a device held here from another site: kept as a conflict");
            let details = serde_json::json!({
                "site": l.site,
                "held_site": held_site,
                "station": l.station,
                "site_ledger_id": ctx.site_ledger_id,
                "site_seq": ctx.seq,
                "licence_sha256": sha,
                "lease": unit.lease(),
                "counted": unit.counted(),
            });
            let ev = AuditEvent { actor: ctx.holder, event: "licence.conflict", subject, details };
            staged.push(audit::stage(head, ctx.now, ev));
            out.conflicts += 1;
            stream.conflicts += 1;
        }
        None => {
            let unit = take_unit(conn, &l.batch_id, ctx.holder, ctx.now, OP).await?;
            sqlx::query(
                "INSERT INTO licences (batch_id, device_id, licence, certificate, station, site, issued_at, origin) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&l.batch_id)
            .bind(&l.device_id)
            .bind(&l.licence)
            .bind(&l.certificate)
            .bind(&l.station)
            .bind(&l.site)
            .bind(l.issued_at)
            .bind(ctx.holder)
            .execute(&mut *conn)
            .await
            .map_err(LedgerError::db(OP))?;
            let event = match &unit {
                Unit::Lease(_) => "licence.replicated",
                Unit::Free | Unit::Uncounted => {
                    tracing::error!(batch = %l.batch_id, device = %l.device_id, site = %l.site, holder = ctx.holder,
                        counted = unit.counted(), "a site replicated a licence with no lease left to take its unit from");
                    out.unleased += 1;
                    "licence.unleased"
                }
            };
            let mut details = serde_json::json!({
                "site": l.site,
                "station": l.station,
                "site_ledger_id": ctx.site_ledger_id,
                "site_seq": ctx.seq,
                "licence_sha256": sha,
                "lease": unit.lease(),
            });
            if event == "licence.unleased" {
                details["counted"] = serde_json::Value::Bool(unit.counted());
            }
            let ev = AuditEvent { actor: ctx.holder, event, subject, details };
            staged.push(audit::stage(head, ctx.now, ev));
            out.licences += 1;
            stream.licences += 1;
        }
    }
    Ok(())
}

/// A site's refusal into `refusals` (the upsert of the writer's `upsert_refusals`, with the site record's
/// time), audited here as `licence.refused` so that the device export and the chain agree.
async fn apply_refusal(
    conn: &mut AnyConnection,
    head: &mut Head,
    staged: &mut Vec<AuditRecord>,
    ctx: &Ctx<'_>,
    at: i64,
    f: &SiteRefusal,
    out: &mut Replicated,
) -> Result<(), LedgerError> {
    const OP: &str = "replicate a site refusal";
    let reason = RefusalReason::from_name(&f.reason).ok_or_else(|| LedgerError::Invalid {
        field: "site refusal reason",
        value: format!("{} (site seq {})", audit_shown(&f.reason), ctx.seq),
        why: "is not a known refusal reason",
    })?;
    let rec = super::model::RefusalRecord {
        batch_id: f.batch_id.clone(),
        device_id: f.device_id.clone(),
        station: f.station.clone(),
        site: f.site.clone(),
        actor: ctx.holder.to_owned(),
        reason,
        detail: f.detail.clone(),
    };
    super::writer::upsert_refusals(conn, std::slice::from_ref(&rec), at).await.map_err(LedgerError::db(OP))?;
    let details = serde_json::json!({
        "reason": reason.as_str(),
        "detail": f.detail,
        "station": f.station,
        "site": f.site,
        "site_ledger_id": ctx.site_ledger_id,
        "site_seq": ctx.seq,
    });
    let ev = AuditEvent {
        actor: ctx.holder,
        event: "licence.refused",
        subject: audit::device_subject(&f.batch_id, &f.device_id),
        details,
    };
    staged.push(audit::stage(head, ctx.now, ev));
    out.refusals += 1;
    Ok(())
}

/// A site's install report into `installs` (once per (station, result id)), audited here as
/// `install.reported` when new, so that the device export and the chain agree.
async fn apply_install(
    conn: &mut AnyConnection,
    head: &mut Head,
    staged: &mut Vec<AuditRecord>,
    ctx: &Ctx<'_>,
    i: &SiteInstall,
    out: &mut Replicated,
) -> Result<(), LedgerError> {
    const OP: &str = "replicate a site install report";
    if load_batch(conn, &i.batch_id).await.map_err(LedgerError::db(OP))?.is_none() {
        return Err(ctx.broken(format!(
            "its install report names batch {:?}, which does not exist here",
            audit_shown(&i.batch_id)
        )));
    }
    let n = sqlx::query(
        "INSERT INTO installs (station, result_id, batch_id, device_id, status_code, message, flash_crc, attempt, \
         timings, reported_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (station, result_id) DO NOTHING",
    )
    .bind(&i.station)
    .bind(&i.result_id)
    .bind(&i.batch_id)
    .bind(&i.device_id)
    .bind(i64::from(i.status_code))
    .bind(&i.message)
    .bind(i.flash_crc.map(i64::from))
    .bind(i64::from(i.attempt))
    .bind(&i.timings_json)
    .bind(i.reported_at)
    .execute(&mut *conn)
    .await
    .map_err(LedgerError::db(OP))?
    .rows_affected();
    if n == 0 {
        return Ok(());
    }
    let details = serde_json::json!({
        "station": i.station,
        "result_id": i.result_id,
        "status_code": i.status_code,
        "message": i.message,
        "flash_crc": i.flash_crc,
        "attempt": i.attempt,
        "site_ledger_id": ctx.site_ledger_id,
        "site_seq": ctx.seq,
    });
    let ev = AuditEvent {
        actor: ctx.holder,
        event: "install.reported",
        subject: audit::device_subject(&i.batch_id, &i.device_id),
        details,
    };
    staged.push(audit::stage(head, ctx.now, ev));
    out.installs += 1;
    Ok(())
}

/// The claim of [`Ledger::claim_device`] inside the writer's group transaction: `Ok(Err(_))` is a refusal
/// (nothing written), `Ok(Ok(made))` the claim.
pub(crate) async fn claim_in(
    conn: &mut AnyConnection,
    now: i64,
    c: &super::writer::ClaimRecord,
) -> Result<Result<bool, LedgerError>, sqlx::Error> {
    let (batch_id, device_id, site) = (c.batch_id.as_str(), c.device_id.as_str(), c.site.as_str());
    let Some(b) = load_batch(conn, batch_id).await? else {
        return Ok(Err(LedgerError::Refused {
            reason: RefusalReason::UnknownBatch,
            detail: format!("batch {:?} does not exist", audit_shown(batch_id)),
        }));
    };
    if !b.allowed_sites.iter().any(|s| s == super::ANY_SITE || s == site) {
        return Ok(Err(LedgerError::Refused {
            reason: RefusalReason::SiteNotAllowed,
            detail: format!("site {site:?} may not use batch {:?}", b.id),
        }));
    }
    let held = sqlx::query("SELECT site FROM licences WHERE batch_id = $1 AND device_id = $2")
        .bind(batch_id)
        .bind(device_id)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(row) = held {
        let other: String = row.try_get(0)?;
        if other != site {
            return Ok(Err(LedgerError::Refused {
                reason: RefusalReason::LicensedAtOtherSite,
                detail: format!("device {device_id} of batch {batch_id:?} is licensed at site {other:?}"),
            }));
        }
    }
    let claim = sqlx::query("SELECT site FROM device_claims WHERE batch_id = $1 AND device_id = $2")
        .bind(batch_id)
        .bind(device_id)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(row) = claim {
        let other: String = row.try_get(0)?;
        if other != site {
            return Ok(Err(LedgerError::Refused {
                reason: RefusalReason::LicensedAtOtherSite,
                detail: format!("device {device_id} of batch {batch_id:?} is claimed by site {other:?}"),
            }));
        }
        return Ok(Ok(false));
    }
    sqlx::query(
        "INSERT INTO device_claims (batch_id, device_id, site, holder, claimed_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(batch_id)
    .bind(device_id)
    .bind(site)
    .bind(&c.holder)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(Ok(true))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn site_ledger_ids_are_32_lowercase_hex_digits() {
        assert_eq!(parse_site_ledger_id(&"0a".repeat(16)).unwrap(), [0x0a; 16]);
        for bad in ["", &"0A".repeat(16), &"0a".repeat(17), &"zz".repeat(16)] {
            assert!(matches!(parse_site_ledger_id(bad), Err(LedgerError::Invalid { field: "site ledger id", .. })));
        }
    }

    #[test]
    fn lag_is_zero_when_caught_up_and_never_negative() {
        let mut s = SiteStream {
            site_ledger_id: "0".repeat(32),
            holder: "h".into(),
            site: "berlin".into(),
            acked_seq: 5,
            site_head_seq: 5,
            head_hash: vec![],
            last_record_at: Some(1_000),
            licences: 0,
            conflicts: 0,
            created_at: 500,
            updated_at: 1_000,
        };
        assert_eq!((s.lag_records(), s.lag_ms(9_000)), (0, 0));
        s.site_head_seq = 8;
        assert_eq!((s.lag_records(), s.lag_ms(9_000)), (3, 8_000));
        s.last_record_at = None;
        assert_eq!(s.lag_ms(9_000), 8_500);
        assert_eq!(s.lag_ms(0), 0);
    }

    fn rec(event: &str, subject: &str, details: &str, item: Option<SiteItem>) -> SiteRecord {
        SiteRecord {
            audit: AuditRecord {
                seq: 1,
                at: 1,
                actor: "a".into(),
                event: event.into(),
                subject: subject.into(),
                details: details.into(),
                prev_hash: vec![],
                hash: vec![],
            },
            item,
        }
    }

    #[test]
    fn rows_must_match_their_records() {
        let lic = SiteLicence {
            batch_id: "b".into(),
            device_id: "d".into(),
            licence: b"L".to_vec(),
            certificate: vec![],
            station: "s".into(),
            site: "berlin".into(),
            issued_at: 1,
        };
        let sha = hex::encode(Sha256::digest(b"L"));
        let good = format!(r#"{{"licence_sha256":"{sha}"}}"#);
        let item = Some(SiteItem::Licence(lic));
        assert!(check_item(&rec("licence.issued", "batch/b/device/d", &good, item.clone()), "berlin").is_ok());
        let e = check_item(&rec("licence.issued", "batch/b/device/d", &good, item.clone()), "austin").unwrap_err();
        assert!(e.contains("austin"), "{e}");
        let e = check_item(&rec("licence.issued", "batch/b/device/x", &good, item.clone()), "berlin").unwrap_err();
        assert!(e.contains("subject"), "{e}");
        let e = check_item(
            &rec("licence.issued", "batch/b/device/d", r#"{"licence_sha256":"00"}"#, item.clone()),
            "berlin",
        )
        .unwrap_err();
        assert!(e.contains("hashes to"), "{e}");
        let e = check_item(&rec("install.reported", "batch/b/device/d", &good, item), "berlin").unwrap_err();
        assert!(e.contains("row of a licence.issued"), "{e}");
        let e = check_item(&rec("licence.issued", "batch/b/device/d", &good, None), "berlin").unwrap_err();
        assert!(e.contains("carries no row"), "{e}");
        assert!(check_item(&rec("lease.granted", "lease/x", "{}", None), "berlin").is_ok());
    }
}
