//! The group-commit writer: one task per ledger drains a queue of licence issues, externally decided refusals
//! and install reports, and commits as many as are waiting (up to `max_group`) in ONE transaction, then answers
//! each caller through its oneshot channel.
//!
//! Fail closed: if the group transaction fails for a database reason (including the audit insert), it is rolled
//! back and nothing in it is reported as committed; the items are then retried one per transaction so that a
//! single poisoned item cannot fail its neighbours, and every item that still fails gets the database error.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, AnyPool, Row};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::audit::{self, AuditEvent, AuditRecord, Head};
use super::checkpoints::Appended;
use super::error::{LedgerError, RefusalReason};
use super::model::{
    Batch, InstallOutcome, InstallReport, IssueOutcome, IssueRecord, RefusalRecord, ReissueRecord, now_ms,
};
use super::{Dialect, begin_write, load_batch};

/// One queued write.
pub(crate) enum Payload {
    Issue(IssueRecord),
    Refusal(RefusalRecord),
    Install(InstallReport),
    Reissue(ReissueRecord),
    /// A site broker's claim of a device before licensing it (not audited: it changes no count).
    Claim(ClaimRecord),
}

/// A device claimed for a site (`super::replica::claim_in`).
pub(crate) struct ClaimRecord {
    pub batch_id: String,
    pub device_id: String,
    pub site: String,
    pub holder: String,
}

/// What a committed write produced.
#[derive(Debug)]
pub(crate) enum Outcome {
    Issue(IssueOutcome),
    Refusal,
    Install(InstallOutcome),
    Reissue,
    /// Whether the claim was made now (false: the site held it already).
    Claim(bool),
}

/// A queued write and where to send its result.
pub(crate) struct WriteOp {
    pub payload: Payload,
    pub reply: oneshot::Sender<Result<Outcome, LedgerError>>,
}

/// Runs until every sender is dropped, committing groups of up to `max_group` operations.
pub(crate) async fn run(
    pool: AnyPool,
    dialect: Dialect,
    mut rx: mpsc::Receiver<WriteOp>,
    max_group: usize,
    appended: Arc<Appended>,
) {
    let mut buf = Vec::with_capacity(max_group);
    while rx.recv_many(&mut buf, max_group).await > 0 {
        let ops = std::mem::take(&mut buf);
        process(&pool, dialect, ops, &appended).await;
    }
    tracing::debug!("ledger writer stopped: all senders dropped");
}

#[derive(Default, Debug)]
struct Counts {
    issued: u64,
    existing: u64,
    refused: u64,
    installs: u64,
    duplicates: u64,
}

async fn process(pool: &AnyPool, dialect: Dialect, ops: Vec<WriteOp>, appended: &Appended) {
    let span = tracing::info_span!(
        "ledger.commit_group",
        items = ops.len(),
        issued = tracing::field::Empty,
        existing = tracing::field::Empty,
        refused = tracing::field::Empty,
        installs = tracing::field::Empty,
        duplicates = tracing::field::Empty,
    );
    let payloads: Vec<&Payload> = ops.iter().map(|o| &o.payload).collect();
    let mut counts = Counts::default();
    match run_group(pool, dialect, &payloads, &mut counts, appended).instrument(span.clone()).await {
        Ok(results) => {
            span.record("issued", counts.issued);
            span.record("existing", counts.existing);
            span.record("refused", counts.refused);
            span.record("installs", counts.installs);
            span.record("duplicates", counts.duplicates);
            // Counted at commit, so the metric equals the ledger even when a caller gave up waiting.
            metrics::counter!(crate::service::metric::LICENCES, "outcome" => "issued").increment(counts.issued);
            for (op, r) in ops.into_iter().zip(results) {
                // A caller that gave up waiting is not an error: its write is committed and a retry finds it.
                let _ = op.reply.send(r);
            }
        }
        Err(e) if ops.len() > 1 => {
            tracing::warn!(parent: &span, error = %e, items = ops.len(), "group commit rolled back; retrying items one by one");
            for op in ops {
                let mut c = Counts::default();
                let r = match run_group(pool, dialect, &[&op.payload], &mut c, appended).instrument(span.clone()).await
                {
                    Ok(mut v) => {
                        metrics::counter!(crate::service::metric::LICENCES, "outcome" => "issued").increment(c.issued);
                        v.pop().unwrap_or(Err(LedgerError::Internal { what: "empty group result" }))
                    }
                    Err(e) => Err(e),
                };
                let _ = op.reply.send(r);
            }
        }
        Err(e) => {
            tracing::warn!(parent: &span, error = %e, "ledger write rolled back");
            // At most one op here (larger groups take the branch above).
            if let Some(op) = ops.into_iter().next() {
                let _ = op.reply.send(Err(e));
            }
        }
    }
}

fn dbe(source: sqlx::Error) -> LedgerError {
    LedgerError::Database { op: "commit ledger group", source }
}

/// Commits `items` in one transaction with a handful of statements per group (one existence query, one quota
/// update and one multi-row licence insert per batch, multi-row audit inserts). `Err` means the whole
/// transaction was rolled back; `Ok` holds each item's logical result (a refusal is a committed, audited
/// outcome).
async fn run_group(
    pool: &AnyPool,
    dialect: Dialect,
    items: &[&Payload],
    counts: &mut Counts,
    appended: &Appended,
) -> Result<Vec<Result<Outcome, LedgerError>>, LedgerError> {
    let (mut tx, mut head) = begin_write(pool, dialect).await.map_err(dbe)?;
    let conn: &mut AnyConnection = &mut tx;
    let now = now_ms();
    let mut batches: HashMap<String, Option<Batch>> = HashMap::new();
    let mut staged: Vec<AuditRecord> = Vec::new();
    let mut known = existing_for(conn, items).await.map_err(dbe)?;
    let mut new_licences: Vec<&IssueRecord> = Vec::new();
    let mut refused: Vec<RefusalRecord> = Vec::new();
    let mut taken: HashMap<&str, i64> = HashMap::new();
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let r = match item {
            Payload::Issue(rec) => {
                let key = (rec.batch_id.clone(), rec.device_id.clone());
                if let Some((existing, first_station)) = known.get(&key) {
                    // The device already holds its licence (two requests for a new device at once, or a request
                    // that skipped the precheck's device lookup): a reissue, under the reissue rules — state
                    // (a paused batch still reissues), window, product and site — exactly as the precheck applies them.
                    let batch = cached_batch(conn, &mut batches, &rec.batch_id).await.map_err(dbe)?;
                    let refusal = match batch.as_ref() {
                        None => Some((RefusalReason::UnknownBatch, format!("batch {:?} does not exist", rec.batch_id))),
                        Some(b) => b.check_reissue(now, &rec.site, &rec.product_id).err(),
                    };
                    if let Some((reason, detail)) = refusal {
                        let r = refusal_of(rec, reason, &detail);
                        staged.push(stage_refusal(&mut head, now, &r));
                        refused.push(r);
                        counts.refused += 1;
                        out.push(Err(LedgerError::Refused { reason, detail }));
                        continue;
                    }
                    counts.existing += 1;
                    if *first_station != rec.station {
                        let reissue = ReissueRecord {
                            batch_id: rec.batch_id.clone(),
                            device_id: rec.device_id.clone(),
                            station: rec.station.clone(),
                            site: rec.site.clone(),
                            first_station: first_station.clone(),
                            actor: rec.actor.clone(),
                        };
                        reissue_one(conn, &mut head, &mut staged, now, &reissue).await.map_err(dbe)?;
                    }
                    out.push(Ok(Outcome::Issue(IssueOutcome::Existing(existing.clone()))));
                    continue;
                }
                let batch = cached_batch(conn, &mut batches, &rec.batch_id).await.map_err(dbe)?;
                let refusal = match batch.as_ref() {
                    None => Some((RefusalReason::UnknownBatch, format!("batch {:?} does not exist", rec.batch_id))),
                    Some(b) => match b.check(now, &rec.site, &rec.product_id) {
                        Err(r) => Some(r),
                        Ok(()) if b.remaining() == 0 => Some((RefusalReason::QuotaExhausted, b.exhausted())),
                        Ok(()) => None,
                    },
                };
                if let (Some((reason, detail)), Some(b)) = (&refusal, batch.as_ref())
                    && rec.lease_wait
                    && b.waits_for_units(*reason)
                {
                    // The device waits for units that may come back: nothing recorded.
                    out.push(Err(LedgerError::LeaseWait { detail: detail.clone() }));
                    continue;
                }
                match (refusal, batch) {
                    (Some((reason, detail)), _) => {
                        let r = refusal_of(rec, reason, &detail);
                        staged.push(stage_refusal(&mut head, now, &r));
                        refused.push(r);
                        counts.refused += 1;
                        Err(LedgerError::Refused { reason, detail })
                    }
                    (None, Some(b)) => {
                        // Take the unit in memory; the conditional UPDATE below makes it durable and guards it.
                        b.issued += 1;
                        *taken.entry(rec.batch_id.as_str()).or_default() += 1;
                        let details = serde_json::json!({
                            "station": rec.station,
                            "site": rec.site,
                            "product_id": rec.product_id,
                            "licence_sha256": hex::encode(Sha256::digest(&rec.licence)),
                            "issued": b.issued,
                            "quota": b.quota,
                        });
                        let ev = AuditEvent {
                            actor: &rec.actor,
                            event: "licence.issued",
                            subject: audit::device_subject(&rec.batch_id, &rec.device_id),
                            details,
                        };
                        staged.push(audit::stage(&mut head, now, ev));
                        known.insert(key, (rec.licence.clone(), rec.station.clone()));
                        new_licences.push(rec);
                        counts.issued += 1;
                        Ok(Outcome::Issue(IssueOutcome::Issued(rec.licence.clone())))
                    }
                    (None, None) => Err(LedgerError::Internal { what: "issue accepted without a batch" }),
                }
            }
            Payload::Refusal(rec) => {
                staged.push(stage_refusal(&mut head, now, rec));
                refused.push(rec.clone());
                counts.refused += 1;
                Ok(Outcome::Refusal)
            }
            Payload::Install(rep) => {
                install_one(conn, &mut head, &mut staged, &mut batches, now, rep, counts).await.map_err(dbe)?
            }
            Payload::Reissue(rec) => {
                reissue_one(conn, &mut head, &mut staged, now, rec).await.map_err(dbe)?;
                Ok(Outcome::Reissue)
            }
            Payload::Claim(c) => super::replica::claim_in(conn, now, c).await.map_err(dbe)?.map(Outcome::Claim),
        };
        out.push(r);
    }
    for (batch_id, k) in &taken {
        // The authoritative quota guard. Writers are serialised (SQLite write lock; audit_head row lock on
        // PostgreSQL) and the batch row was read inside this transaction, so it matches the in-memory count;
        // if it does not (someone wrote the table outside the ledger), fail closed: roll everything back.
        let n = sqlx::query(
            "UPDATE batches SET issued = issued + $2 WHERE id = $1 AND state = 'open' AND issued + leased + $2 <= quota",
        )
        .bind(*batch_id)
        .bind(*k)
        .execute(&mut *conn)
        .await
        .map_err(dbe)?
        .rows_affected();
        if n != 1 {
            return Err(LedgerError::Internal {
                what: "quota guard refused units the ledger had checked; rolled back",
            });
        }
    }
    insert_licences(conn, &new_licences, now).await.map_err(dbe)?;
    upsert_refusals(conn, &refused, now).await.map_err(dbe)?;
    audit::insert_records(conn, &staged).await.map_err(dbe)?;
    audit::store_head(conn, &head).await.map_err(dbe)?;
    tx.commit().await.map_err(dbe)?;
    appended.add(staged.len());
    Ok(out)
}

async fn cached_batch<'a>(
    conn: &mut AnyConnection,
    cache: &'a mut HashMap<String, Option<Batch>>,
    id: &str,
) -> Result<&'a mut Option<Batch>, sqlx::Error> {
    if !cache.contains_key(id) {
        let b = load_batch(conn, id).await?;
        cache.insert(id.to_owned(), b);
    }
    // Present: inserted just above when it was missing.
    Ok(cache.entry(id.to_owned()).or_insert(None))
}

/// Licences already stored for the group's (batch, device) pairs, with the station each was first issued to:
/// one query per batch and 256 devices.
async fn existing_for(
    conn: &mut AnyConnection,
    items: &[&Payload],
) -> Result<HashMap<(String, String), (Vec<u8>, String)>, sqlx::Error> {
    let mut by_batch: HashMap<&str, Vec<&str>> = HashMap::new();
    for item in items {
        if let Payload::Issue(r) = item {
            by_batch.entry(&r.batch_id).or_default().push(&r.device_id);
        }
    }
    let mut found = HashMap::new();
    for (batch_id, devices) in by_batch {
        for chunk in devices.chunks(256) {
            let placeholders: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
            let sql = format!(
                "SELECT device_id, licence, station FROM licences WHERE batch_id = $1 AND device_id IN ({})",
                placeholders.join(", ")
            );
            let mut q = sqlx::query(&sql).bind(batch_id);
            for d in chunk {
                q = q.bind(*d);
            }
            for row in q.fetch_all(&mut *conn).await? {
                found.insert((batch_id.to_owned(), row.try_get(0)?), (row.try_get(1)?, row.try_get(2)?));
            }
        }
    }
    Ok(found)
}

async fn insert_licences(conn: &mut AnyConnection, recs: &[&IssueRecord], now: i64) -> Result<(), sqlx::Error> {
    for chunk in recs.chunks(64) {
        let sql = super::multi_row_insert(
            "INSERT INTO licences (batch_id, device_id, licence, certificate, station, site, issued_at) VALUES ",
            7,
            chunk.len(),
        );
        let mut q = sqlx::query(&sql);
        for r in chunk {
            q = q
                .bind(&r.batch_id)
                .bind(&r.device_id)
                .bind(&r.licence)
                .bind(&r.certificate)
                .bind(&r.station)
                .bind(&r.site)
                .bind(now);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// One row per (batch, device, station, reason) in `refusals`, counting repeats (schema v7); also for
/// refusals replicated from site brokers (`super::replica`), at the site's time.
pub(super) async fn upsert_refusals(
    conn: &mut AnyConnection,
    recs: &[RefusalRecord],
    now: i64,
) -> Result<(), sqlx::Error> {
    for r in recs {
        sqlx::query(
            "INSERT INTO refusals (batch_id, device_id, station, site, reason, detail, count, first_at, last_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 1, $7, $7) ON CONFLICT (batch_id, device_id, station, reason) \
             DO UPDATE SET count = refusals.count + 1, detail = excluded.detail, last_at = excluded.last_at",
        )
        .bind(&r.batch_id)
        .bind(&r.device_id)
        .bind(&r.station)
        .bind(&r.site)
        .bind(r.reason.as_str())
        .bind(&r.detail)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

fn refusal_of(rec: &IssueRecord, reason: RefusalReason, detail: &str) -> RefusalRecord {
    RefusalRecord {
        batch_id: rec.batch_id.clone(),
        device_id: rec.device_id.clone(),
        station: rec.station.clone(),
        site: rec.site.clone(),
        actor: rec.actor.clone(),
        reason,
        detail: detail.to_owned(),
    }
}

fn stage_refusal(head: &mut Head, now: i64, r: &RefusalRecord) -> AuditRecord {
    audit::stage(
        head,
        now,
        AuditEvent {
            actor: &r.actor,
            event: "licence.refused",
            subject: audit::device_subject(&r.batch_id, &r.device_id),
            details: serde_json::json!({
                "reason": r.reason.as_str(),
                "detail": r.detail,
                "station": r.station,
                "site": r.site,
            }),
        },
    )
}

/// Notes `rec.station` as a holder of the licence and audits `licence.reissued`, the first time only.
async fn reissue_one(
    conn: &mut AnyConnection,
    head: &mut Head,
    staged: &mut Vec<AuditRecord>,
    now: i64,
    rec: &ReissueRecord,
) -> Result<(), sqlx::Error> {
    let n = sqlx::query(
        "INSERT INTO licence_reissues (batch_id, device_id, station, site, reissued_at) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (batch_id, device_id, station) DO NOTHING",
    )
    .bind(&rec.batch_id)
    .bind(&rec.device_id)
    .bind(&rec.station)
    .bind(&rec.site)
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if n == 1 {
        staged.push(audit::stage(
            head,
            now,
            AuditEvent {
                actor: &rec.actor,
                event: "licence.reissued",
                subject: audit::device_subject(&rec.batch_id, &rec.device_id),
                details: serde_json::json!({
                    "station": rec.station,
                    "site": rec.site,
                    "first_station": rec.first_station,
                }),
            },
        ));
    }
    Ok(())
}

pub(crate) async fn existing_licence(
    conn: &mut AnyConnection,
    batch_id: &str,
    device_id: &str,
) -> Result<Option<Vec<u8>>, sqlx::Error> {
    let row = sqlx::query("SELECT licence FROM licences WHERE batch_id = $1 AND device_id = $2")
        .bind(batch_id)
        .bind(device_id)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| r.try_get::<Vec<u8>, _>(0)).transpose()
}

async fn install_one(
    conn: &mut AnyConnection,
    head: &mut Head,
    staged: &mut Vec<AuditRecord>,
    batches: &mut HashMap<String, Option<Batch>>,
    now: i64,
    rep: &InstallReport,
    counts: &mut Counts,
) -> Result<Result<Outcome, LedgerError>, sqlx::Error> {
    if cached_batch(conn, batches, &rep.batch_id).await?.is_none() {
        return Ok(Err(LedgerError::NotFound { what: "batch", id: rep.batch_id.clone() }));
    }
    let n = sqlx::query(
        "INSERT INTO installs (station, result_id, batch_id, device_id, status_code, message, flash_crc, attempt, \
         timings, reported_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (station, result_id) DO NOTHING",
    )
    .bind(&rep.station)
    .bind(&rep.result_id)
    .bind(&rep.batch_id)
    .bind(&rep.device_id)
    .bind(i64::from(rep.status_code))
    .bind(&rep.message)
    .bind(rep.flash_crc.map(i64::from))
    .bind(i64::from(rep.attempt))
    .bind(&rep.timings_json)
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if n == 0 {
        counts.duplicates += 1;
        return Ok(Ok(Outcome::Install(InstallOutcome::Duplicate)));
    }
    staged.push(audit::stage(
        head,
        now,
        AuditEvent {
            actor: &rep.actor,
            event: "install.reported",
            subject: audit::device_subject(&rep.batch_id, &rep.device_id),
            details: serde_json::json!({
                "station": rep.station,
                "result_id": rep.result_id,
                "status_code": rep.status_code,
                "message": rep.message,
                "flash_crc": rep.flash_crc,
                "attempt": rep.attempt,
            }),
        },
    ));
    counts.installs += 1;
    Ok(Ok(Outcome::Install(InstallOutcome::Recorded)))
}
