//! Shared fixtures of the ledger integration tests: opening ledgers, seeding key/image/batch, building issue
//! requests, raw SQL access for tampering, and the invariant checks run against both SQLite and PostgreSQL.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod pg;

use std::sync::Arc;

use flashgate_broker::ledger::{
    Batch, BatchState, Dialect, IssueOutcome, IssueRecord, KeyRecord, Ledger, LedgerError, NewBatch, NewImage,
    Precheck, PrecheckRequest, RefusalReason,
};
use sqlx::Connection;
use tokio::sync::Barrier;

pub const PRODUCT: &str = "46201002";
pub const SITE: &str = "lyon";

/// A ledger on a fresh SQLite file in `dir`.
pub async fn sqlite_ledger(dir: &tempfile::TempDir) -> (Ledger, String) {
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    (Ledger::open(&url).await.expect("open sqlite ledger"), url)
}

/// Deterministic fake licence bytes (132 bytes) that differ per (device, attempt), as a real HSM's would.
pub fn licence_bytes(device: &str, attempt: u32) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut out = Vec::with_capacity(132);
    let mut ctr = 0u32;
    while out.len() < 132 {
        let d = Sha256::new().chain_update(device).chain_update(attempt.to_be_bytes()).chain_update(ctr.to_be_bytes());
        out.extend_from_slice(&d.finalize());
        ctr += 1;
    }
    out.truncate(132);
    out
}

pub fn device(i: usize) -> String {
    format!("{i:032x}")
}

/// Adds key "k1" (if missing) and an image, then a batch.
pub async fn seed(l: &Ledger, id: &str, quota: i64, sites: &[&str], window: (Option<i64>, Option<i64>)) -> Batch {
    let key = KeyRecord {
        key_id: "00112233445566778899aabbccddeeff".into(),
        label: "k1".into(),
        backend: "soft".into(),
        backend_ref: "k1".into(),
    };
    match l.add_key(&key, "admin").await {
        Ok(()) | Err(LedgerError::AlreadyExists { .. }) => {}
        Err(e) => panic!("add key: {e}"),
    }
    let image = format!("image for {id}").into_bytes();
    let meta = l.put_image(&new_image(&key.key_id, "stm32l4", PRODUCT), &image, "admin").await.expect("put image");
    l.create_batch(
        &NewBatch {
            id: id.into(),
            product_id: PRODUCT.into(),
            image_sha256: meta.sha256,
            quota,
            allowed_sites: sites.iter().map(|s| s.to_string()).collect(),
            not_before: window.0,
            not_after: window.1,
        },
        "admin",
    )
    .await
    .expect("create batch")
}

/// Image metadata for `put_image` (fixed nonce, one area, no expected CRC).
pub fn new_image(key_id: &str, family: &str, product: &str) -> NewImage {
    NewImage {
        key_id: key_id.into(),
        nonce: [7; 12],
        family: family.into(),
        product_id: product.into(),
        area_count: 1,
        expected_crc: None,
    }
}

pub fn issue_record(batch: &str, device: &str, attempt: u32) -> IssueRecord {
    IssueRecord {
        batch_id: batch.into(),
        device_id: device.into(),
        product_id: PRODUCT.into(),
        licence: licence_bytes(device, attempt),
        certificate: vec![0xC5; 136],
        station: "station-1".into(),
        site: SITE.into(),
        actor: "station-1".into(),
        lease_wait: false,
    }
}

pub fn precheck_request(batch: &str, device: &str) -> PrecheckRequest {
    PrecheckRequest {
        batch_id: batch.into(),
        device_id: device.into(),
        product_id: PRODUCT.into(),
        station: "station-1".into(),
        site: SITE.into(),
        actor: "station-1".into(),
        lease_wait: false,
    }
}

/// The full service flow: precheck, "HSM" computes a licence, commit.
pub async fn request_licence(l: &Ledger, batch: &str, device: &str, attempt: u32) -> Result<IssueOutcome, LedgerError> {
    match l.precheck(&precheck_request(batch, device)).await? {
        Precheck::Existing(bytes) => Ok(IssueOutcome::Existing(bytes)),
        Precheck::Proceed(_) => l.commit_issue(issue_record(batch, device, attempt)).await,
    }
}

/// Runs raw SQL statements on the ledger database, as an attacker or a test with direct access would.
pub async fn raw_sql(url: &str, statements: &[&str]) {
    let mut conn = sqlx::AnyConnection::connect(url).await.expect("raw connection");
    for s in statements {
        sqlx::raw_sql(s).execute(&mut conn).await.unwrap_or_else(|e| panic!("raw SQL {s:?}: {e}"));
    }
    conn.close().await.ok();
}

pub async fn raw_count(url: &str, sql: &str) -> i64 {
    use sqlx::Row;
    let mut conn = sqlx::AnyConnection::connect(url).await.expect("raw connection");
    let row = sqlx::query(sql).fetch_one(&mut conn).await.expect(sql);
    let n: i64 = row.try_get(0).expect("count");
    conn.close().await.ok();
    n
}

/// Statements that make every audit insert fail.
pub fn reject_audit_sql(d: Dialect) -> Vec<&'static str> {
    match d {
        Dialect::Sqlite => vec![
            "CREATE TRIGGER audit_reject BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit store rejects inserts'); END",
        ],
        Dialect::Postgres => vec![
            "CREATE FUNCTION audit_reject() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'audit store rejects inserts'; END $$",
            "CREATE TRIGGER audit_reject BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION audit_reject()",
        ],
    }
}

pub fn allow_audit_sql(d: Dialect) -> Vec<&'static str> {
    match d {
        Dialect::Sqlite => vec!["DROP TRIGGER audit_reject"],
        Dialect::Postgres => vec!["DROP TRIGGER audit_reject ON audit", "DROP FUNCTION audit_reject()"],
    }
}

// ---------------------------------------------------------------------------------------------------------
// Invariant checks shared by the SQLite and PostgreSQL test files.

/// A retry returns the byte-identical licence and consumes nothing.
pub async fn check_retry_identical(l: &Ledger) {
    seed(l, "retry", 5, &[SITE], (None, None)).await;
    let d = device(1);
    let first = l.commit_issue(issue_record("retry", &d, 1)).await.unwrap();
    assert!(matches!(first, IssueOutcome::Issued(_)));
    assert_eq!(l.batch("retry").await.unwrap().issued, 1);
    // The HSM computes fresh bytes on a retry; the ledger must return the stored ones.
    let again = l.commit_issue(issue_record("retry", &d, 2)).await.unwrap();
    assert_eq!(again, IssueOutcome::Existing(first.licence().to_vec()));
    let via_precheck = request_licence(l, "retry", &d, 3).await.unwrap();
    assert_eq!(via_precheck.licence(), first.licence());
    assert_eq!(l.batch("retry").await.unwrap().issued, 1, "a retry consumed quota");
    assert_eq!(l.licence("retry", &d).await.unwrap().unwrap(), first.licence());
}

/// A device that already holds its licence and reaches the commit without a device lookup (the fast
/// precheck answers from a cached batch) gets its stored licence back only under the reissue rules: another
/// site or a closed batch is refused and audited, a paused batch still reissues, another station of the site
/// is audited once as `licence.reissued`; nothing is consumed.
pub async fn check_reissue_rules_at_commit(l: &Ledger) {
    seed(l, "re", 5, &[SITE], (None, None)).await;
    let d = device(7);
    let first = l.commit_issue(issue_record("re", &d, 1)).await.unwrap();
    let req = precheck_request("re", &d);
    // The first fast precheck reads the batch (and finds the licence); the next one answers from the cache.
    assert!(matches!(l.precheck_fast(&req).await.unwrap(), Precheck::Existing(_)));
    assert!(matches!(l.precheck_fast(&req).await.unwrap(), Precheck::Proceed(_)));
    let again = l.commit_issue(issue_record("re", &d, 2)).await.unwrap();
    assert_eq!(
        again,
        IssueOutcome::Existing(first.licence().to_vec()),
        "a retry at commit must return the stored bytes"
    );

    let mut elsewhere = issue_record("re", &d, 3);
    elsewhere.site = "porto".into();
    elsewhere.station = "station-9".into();
    elsewhere.actor = "station-9".into();
    let e = l.commit_issue(elsewhere).await.unwrap_err();
    assert_eq!(e.refusal(), Some(RefusalReason::SiteNotAllowed), "{e}");

    let reissued = |l: &Ledger| {
        let l = l.clone();
        async move { l.audit_page(0, 10_000).await.unwrap().iter().filter(|r| r.event == "licence.reissued").count() }
    };
    let mut moved = issue_record("re", &d, 4);
    moved.station = "station-2".into();
    moved.actor = "station-2".into();
    assert_eq!(l.commit_issue(moved.clone()).await.unwrap().licence(), first.licence());
    assert_eq!(l.commit_issue(moved).await.unwrap().licence(), first.licence());
    assert_eq!(reissued(l).await, 1, "a reissue to another station is audited once");

    l.set_batch_state("re", BatchState::Paused, "admin").await.unwrap();
    assert_eq!(l.commit_issue(issue_record("re", &d, 5)).await.unwrap().licence(), first.licence());
    assert!(matches!(l.precheck_fast(&req).await.unwrap(), Precheck::Existing(_)), "a paused batch still reissues");
    l.set_batch_state("re", BatchState::Closed, "admin").await.unwrap();
    let e = l.commit_issue(issue_record("re", &d, 6)).await.unwrap_err();
    assert_eq!(e.refusal(), Some(RefusalReason::BatchClosed), "{e}");
    let e = l.precheck_fast(&req).await.unwrap_err();
    assert_eq!(e.refusal(), Some(RefusalReason::BatchClosed), "{e}");

    assert_eq!(l.batch("re").await.unwrap().issued, 1, "reissues consumed quota");
    let refused = l.audit_page(0, 10_000).await.unwrap();
    let refused: Vec<_> = refused.iter().filter(|r| r.event == "licence.refused").collect();
    assert_eq!(refused.len(), 3, "each refusal at commit or precheck is audited");
    assert!(refused[0].details.contains("SITE_NOT_ALLOWED"));
    l.verify_audit().await.unwrap();
}

/// 64 concurrent requesters on distinct devices against quota 8: exactly 8 issued, 56 refused.
pub async fn check_quota_under_concurrency(ledgers: &[Ledger], batch: &str, requesters: usize, quota: i64) {
    let barrier = Arc::new(Barrier::new(requesters));
    let mut tasks = Vec::new();
    for i in 0..requesters {
        let l = ledgers[i % ledgers.len()].clone();
        let (b, barrier) = (batch.to_owned(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            request_licence(&l, &b, &device(i), 1).await
        }));
    }
    let (mut issued, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(IssueOutcome::Issued(_)) => issued += 1,
            Ok(IssueOutcome::Existing(_)) => panic!("distinct devices cannot have existing licences"),
            Err(e) => {
                assert_eq!(e.refusal(), Some(RefusalReason::QuotaExhausted), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!(issued, quota, "issued");
    assert_eq!(refused, requesters as i64 - quota, "refused");
    let b = ledgers[0].batch(batch).await.unwrap();
    assert_eq!(b.issued, quota);
    let s = ledgers[0].batch_status(batch).await.unwrap();
    assert_eq!(s.remaining, 0);
    ledgers[0].verify_audit().await.unwrap();
}

/// Concurrent requests for one device yield one licence.
pub async fn check_same_device_concurrency(l: &Ledger) {
    seed(l, "same", 100, &[SITE], (None, None)).await;
    let d = device(7);
    let barrier = Arc::new(Barrier::new(32));
    let mut tasks = Vec::new();
    for attempt in 0..32u32 {
        let (l, d, barrier) = (l.clone(), d.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            l.commit_issue(issue_record("same", &d, attempt)).await
        }));
    }
    let mut licences = std::collections::HashSet::new();
    let mut issued = 0;
    for t in tasks {
        let o = t.await.unwrap().unwrap();
        if matches!(o, IssueOutcome::Issued(_)) {
            issued += 1;
        }
        licences.insert(o.into_licence());
    }
    assert_eq!(issued, 1);
    assert_eq!(licences.len(), 1, "all callers must get the same bytes");
    assert_eq!(l.batch("same").await.unwrap().issued, 1);
}

/// If the audit record cannot be written, no licence is issued (and nothing is consumed).
pub async fn check_fail_closed(l: &Ledger, url: &str) {
    seed(l, "closed-fail", 10, &[SITE], (None, None)).await;
    let d = device(3);
    raw_sql(url, &reject_audit_sql(l.dialect())).await;
    // Several at once, so the group path and the one-by-one retry path both run.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let l = l.clone();
        tasks.push(tokio::spawn(async move { l.commit_issue(issue_record("closed-fail", &device(100 + i), 1)).await }));
    }
    let single = l.commit_issue(issue_record("closed-fail", &d, 1)).await;
    assert!(matches!(single, Err(LedgerError::Database { .. })), "{single:?}");
    for t in tasks {
        let r = t.await.unwrap();
        assert!(matches!(r, Err(LedgerError::Database { .. })), "{r:?}");
    }
    assert_eq!(l.licence("closed-fail", &d).await.unwrap(), None);
    assert_eq!(l.batch("closed-fail").await.unwrap().issued, 0);
    assert_eq!(raw_count(url, "SELECT COUNT(*) FROM licences WHERE batch_id = 'closed-fail'").await, 0);
    // Admin changes fail closed too.
    assert!(l.set_batch_state("closed-fail", BatchState::Paused, "admin").await.is_err());
    assert_eq!(l.batch("closed-fail").await.unwrap().state, BatchState::Open);
    raw_sql(url, &allow_audit_sql(l.dialect())).await;
    // The same device's retry now succeeds and consumes exactly one unit.
    let ok = l.commit_issue(issue_record("closed-fail", &d, 2)).await.unwrap();
    assert!(matches!(ok, IssueOutcome::Issued(_)));
    assert_eq!(l.batch("closed-fail").await.unwrap().issued, 1);
    l.verify_audit().await.unwrap();
}

/// Station assignments (audited, validated against the batch) and station status (upserted, detached
/// only by the stream that wrote it), on `l` — and, when given, as seen by `other` on the same database.
pub async fn check_station_control(l: &Ledger, other: Option<&Ledger>) {
    use flashgate_broker::ledger::{StationProbe, StationStatus, now_ms};
    let station = format!("spiffe://factory.test/site/{SITE}/station/1");
    let elsewhere = "spiffe://factory.test/site/porto/station/1";
    seed(l, "sc", 10, &[SITE], (None, None)).await;
    seed(l, "sc-any", 10, &["*"], (None, None)).await;
    seed(l, "sc-closed", 10, &[SITE], (None, None)).await;
    l.set_batch_state("sc-closed", BatchState::Closed, "admin").await.unwrap();
    assert_eq!(l.station_assignment(&station).await.unwrap(), None);

    // Refusals name what failed and change nothing.
    let e = l.assign_station(&station, "nope", "admin").await.unwrap_err();
    assert!(matches!(e, LedgerError::NotFound { what: "batch", .. }), "{e}");
    let e = l.assign_station("spiffe://factory.test/admin/ops", "sc", "admin").await.unwrap_err();
    assert!(matches!(e, LedgerError::Invalid { field: "station identity", .. }), "{e}");
    let e = l.assign_station(elsewhere, "sc", "admin").await.unwrap_err();
    assert!(matches!(e, LedgerError::Precondition { .. }) && e.to_string().contains("\"porto\""), "{e}");
    let e = l.assign_station(&station, "sc-closed", "admin").await.unwrap_err();
    assert!(matches!(e, LedgerError::Precondition { .. }) && e.to_string().contains("closed"), "{e}");
    assert!(l.station_assignments().await.unwrap().is_empty());

    // Assign, pause (the batch stays recorded), assign again: each change is a new revision.
    let a = l.assign_station(&station, "sc", "admin").await.unwrap();
    assert_eq!((a.batch_id.as_str(), a.paused, a.revision, a.updated_by.as_str()), ("sc", false, 1, "admin"));
    let p = l.pause_station(&station, "line stop", "ops").await.unwrap();
    assert_eq!((p.batch_id.as_str(), p.paused, p.reason.as_str(), p.revision), ("sc", true, "line stop", 2));
    let b = l.assign_station(elsewhere, "sc-any", "admin").await.unwrap();
    assert_eq!(b.revision, 1);
    let pause_only = l.pause_station("spiffe://factory.test/site/lyon/station/2", "", "admin").await.unwrap();
    assert_eq!((pause_only.batch_id.as_str(), pause_only.paused), ("", true));
    let again = l.assign_station(&station, "sc", "admin").await.unwrap();
    assert_eq!((again.paused, again.reason.as_str(), again.revision), (false, "", 3));
    let reader = other.unwrap_or(l);
    assert_eq!(reader.station_assignment(&station).await.unwrap(), Some(again));
    assert_eq!(reader.station_assignments().await.unwrap().len(), 3);
    let events = l.audit_page(0, 10_000).await.unwrap();
    let count = |ev: &str| events.iter().filter(|r| r.event == ev).count();
    assert_eq!((count("station.assigned"), count("station.paused")), (3, 2));
    let paused = events.iter().find(|r| r.event == "station.paused").unwrap();
    assert_eq!(paused.subject, format!("station/{station}"));
    assert!(paused.details.contains("line stop") && paused.actor == "ops", "{paused:?}");
    l.verify_audit().await.unwrap();

    // Status: upserted, online while attached and fresh, detached only by its own session.
    let now = now_ms();
    let mut s = StationStatus {
        identity: station.clone(),
        site: SITE.into(),
        broker: "broker-a".into(),
        session: "s1".into(),
        attached: true,
        probes: vec![StationProbe { probe_id: "p0".into(), kind: "sim".into(), port: "tcp://127.0.0.1:7000".into() }],
        current_batch: "sc".into(),
        devices_ok: 3,
        devices_failed: 1,
        running: true,
        updated_at: now,
    };
    l.put_station_status(&s).await.unwrap();
    assert_eq!(reader.station_statuses().await.unwrap(), vec![s.clone()]);
    assert!(s.online(now_ms()));
    // The station reattached (to another broker): the old stream's end must not mark it offline.
    s.session = "s2".into();
    s.broker = "broker-b".into();
    s.devices_ok = 4;
    l.put_station_status(&s).await.unwrap();
    assert!(!l.mark_station_detached(&station, "s1").await.unwrap());
    let got = reader.station_statuses().await.unwrap();
    assert_eq!(got.len(), 1);
    assert!(got[0].online(now_ms()) && got[0].broker == "broker-b" && got[0].devices_ok == 4, "{got:?}");
    assert!(l.mark_station_detached(&station, "s2").await.unwrap());
    let got = reader.station_statuses().await.unwrap();
    assert!(!got[0].attached && !got[0].online(now_ms()) && got[0].probes == s.probes, "{got:?}");
    // Status is bookkeeping: not audited.
    assert_eq!(l.audit_page(0, 10_000).await.unwrap().len(), events.len());
}

/// The per-device export across page boundaries (`DEVICE_PAGE` devices a page): 1,203 licensed devices,
/// every third reported (failed, then installed), two refused devices (one three times at one station,
/// counted as one row of count 3); rows in id order, each device
/// once, counts and verdicts as the rule says, and `device_rows` agreeing with the export.
pub async fn check_device_export(l: &Ledger) {
    use flashgate_broker::ledger::devices::DEVICE_PAGE;
    use flashgate_broker::ledger::{InstallReport, RefusalRecord};
    use flashgate_common::device_export::Verdict;
    let n = 2 * DEVICE_PAGE as usize + 203;
    seed(l, "exp", n as i64, &[SITE], (None, None)).await;
    let mut tasks = Vec::new();
    for c in 0..16 {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while i < n {
                request_licence(&l, "exp", &device(i), 1).await.unwrap();
                i += 16;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let report = |i: usize, result: &str, code: u16| InstallReport {
        station: "station-1".into(),
        result_id: result.into(),
        batch_id: "exp".into(),
        device_id: device(i),
        status_code: code,
        message: String::new(),
        flash_crc: Some(7),
        attempt: 1,
        timings_json: r#"{"install_us":1000,"probe":{"id":"p0","kind":"sim","port":"x"}}"#.into(),
        actor: "station-1".into(),
    };
    for i in (0..n).step_by(3) {
        l.report_install(report(i, &format!("a{i}"), 9)).await.unwrap();
        l.report_install(report(i, &format!("b{i}"), 0)).await.unwrap();
    }
    let refuse = |i: usize| RefusalRecord {
        batch_id: "exp".into(),
        device_id: device(i),
        station: "station-2".into(),
        site: SITE.into(),
        actor: "station-2".into(),
        reason: RefusalReason::QuotaExhausted,
        detail: "quota spent".into(),
    };
    for _ in 0..3 {
        l.record_refusal(refuse(n + 1)).await.unwrap();
    }
    l.record_refusal(refuse(n + 2)).await.unwrap();
    let mut rows = Vec::new();
    let done = l
        .for_each_device("exp", |row| {
            rows.push(row);
            async { Ok(()) }
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), n + 2, "every licensed and refused device once");
    assert!(rows.windows(2).all(|w| w[0].device_id < w[1].device_id), "in id order, no repeats");
    let c = done.counts;
    let reported = n.div_ceil(3) as u64;
    assert_eq!((c.devices, c.issued, c.installed, c.failed), (n as u64 + 2, n as u64, reported, 0));
    assert_eq!((c.not_reported, c.refusals, c.first_pass), (n as u64 - reported, 4, 0));
    assert_eq!(done.attempts, 2 * reported);
    let r0 = &rows[0];
    assert_eq!(r0.verdict, Verdict::Installed);
    assert_eq!(r0.attempts.iter().map(|a| a.status_code).collect::<Vec<_>>(), [9, 0]);
    assert_eq!((r0.attempts[1].probe_id.as_str(), r0.attempts[1].timings_us["install"]), ("p0", 1000));
    let refused = rows.iter().find(|r| r.device_id == device(n + 1)).unwrap();
    assert_eq!((refused.verdict, refused.refusals.len(), refused.refusals[0].count), (Verdict::Refused, 1, 3));
    assert_eq!(l.device_rows(&device(0)).await.unwrap(), vec![rows[0].clone()]);
    assert_eq!(l.device_rows(&device(n + 9)).await.unwrap(), vec![], "an unknown device has no record");
    let e = l.for_each_device("nope", |_| async { Ok(()) }).await.unwrap_err();
    assert!(matches!(e, LedgerError::NotFound { what: "batch", .. }), "{e}");
}

/// A ledger from before schema v7 (refusals only in the audit chain) gets its `refusals` rows from the
/// `licence.refused` records when it is opened: repeats at one station counted, other stations apart.
pub async fn check_refusals_backfill(l: Ledger, url: &str) {
    use flashgate_broker::ledger::RefusalRecord;
    seed(&l, "old", 1, &[SITE], (None, None)).await;
    let refuse = |station: &str| RefusalRecord {
        batch_id: "old".into(),
        device_id: device(1),
        station: station.into(),
        site: SITE.into(),
        actor: station.into(),
        reason: RefusalReason::CertUnverified,
        detail: "signature does not verify".into(),
    };
    for s in ["station-1", "station-1", "station-2"] {
        l.record_refusal(refuse(s)).await.unwrap();
    }
    l.close().await;
    raw_sql(url, &["DROP TABLE refusals", "DELETE FROM _sqlx_migrations WHERE version = 7"]).await;
    let l = Ledger::open(url).await.unwrap();
    let rows = l.device_rows(&device(1)).await.unwrap();
    let got: Vec<(String, String, u64)> =
        rows[0].refusals.iter().map(|r| (r.station.clone(), r.reason.clone(), r.count)).collect();
    assert_eq!(
        got,
        [("station-1".into(), "CERT_UNVERIFIED".into(), 2), ("station-2".into(), "CERT_UNVERIFIED".into(), 1)],
        "{rows:?}"
    );
    assert_eq!(rows[0].refusals[0].detail, "signature does not verify");
}

/// Quota leases (schema v8): a grant takes units from the batch quota against licences and other grants
/// on every ledger handle (`ledgers` may share one database), a return gives them back, and issued +
/// leased never exceeds the quota; the holder alone returns, never more than is outstanding; every
/// grant and return is audited and the chain verifies.
pub async fn check_leases(ledgers: &[Ledger]) {
    use flashgate_broker::ledger::leases::{LeaseRequest, LeaseState};
    let l = &ledgers[0];
    seed(l, "leased", 20, &[SITE], (None, None)).await;
    let req = |units: i64, holder: &str| LeaseRequest {
        batch_id: "leased".into(),
        site: SITE.into(),
        holder: holder.into(),
        units,
        ttl: std::time::Duration::from_secs(600),
    };
    let a = l.grant_lease(&req(8, "spiffe://t/broker/site-a"), "central").await.unwrap();
    assert_eq!((a.granted, a.outstanding(), a.state), (8, 8, LeaseState::Active));
    assert_eq!(l.batch("leased").await.unwrap().leased, 8);
    let mut refused = 0;
    for i in 0..14 {
        match request_licence(l, "leased", &device(i), 1).await {
            Ok(_) => {}
            Err(LedgerError::Refused { reason: RefusalReason::QuotaExhausted, detail }) => {
                assert!(detail.contains("leased 8"), "{detail}");
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(refused, 2, "12 licences fit beside the 8 leased units");
    // Per site (an aggregate over leases, which PostgreSQL sums as NUMERIC unless cast).
    let status = l.batch_status("leased").await.unwrap();
    let here = status.sites.iter().find(|s| s.site == SITE).expect("the site in the batch status");
    assert_eq!((here.issued, here.leased, here.conflicts), (12, 8, 0), "{status:?}");
    let e = l.grant_lease(&req(1, "spiffe://t/broker/site-b"), "central").await.unwrap_err();
    assert!(matches!(e, LedgerError::Refused { reason: RefusalReason::QuotaExhausted, .. }), "{e}");
    let mut other_site = req(1, "spiffe://t/broker/site-b");
    other_site.site = "nowhere".into();
    let e = l.grant_lease(&other_site, "central").await.unwrap_err();
    assert!(matches!(e, LedgerError::Refused { reason: RefusalReason::SiteNotAllowed, .. }), "{e}");
    assert!(l.return_lease(&a.id, "spiffe://t/broker/site-b", 1, "x").await.is_err(), "only the holder returns");
    assert!(l.return_lease(&a.id, &a.holder, 9, "x").await.is_err(), "never more than outstanding");
    let ttl = std::time::Duration::from_secs(3600);
    let renewed = l.renew_lease(&a.id, &a.holder, ttl, &a.holder).await.unwrap();
    assert!(renewed.expires_at > a.expires_at, "renewing moves the expiry");
    assert!(l.renew_lease(&a.id, "spiffe://t/broker/site-b", ttl, "x").await.is_err(), "only the holder renews");
    let back = l.return_lease(&a.id, &a.holder, 5, &a.holder).await.unwrap();
    assert_eq!((back.returned, back.outstanding(), back.state), (5, 3, LeaseState::Active));

    // Grants and licences racing on every handle: 5 units left, asked by 10 licences and 3 grants of 2.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let l = ledgers[i % ledgers.len()].clone();
        tasks
            .push(tokio::spawn(async move { request_licence(&l, "leased", &device(100 + i), 1).await.is_ok() as i64 }));
    }
    for i in 0..3 {
        let l = ledgers[i % ledgers.len()].clone();
        let r = req(2, &format!("spiffe://t/broker/race-{i}"));
        tasks.push(tokio::spawn(async move { l.grant_lease(&r, "central").await.map_or(0, |g| g.granted) }));
    }
    let mut taken = 0;
    for t in tasks {
        taken += t.await.unwrap();
    }
    let b = l.batch("leased").await.unwrap();
    assert_eq!(taken, 5, "exactly the 5 free units were taken by licences and grants together");
    assert_eq!(b.issued + b.leased, b.quota, "{b:?}");
    let settled = l.return_lease(&a.id, &a.holder, 3, &a.holder).await.unwrap();
    assert_eq!((settled.state, settled.outstanding()), (LeaseState::Settled, 0));
    assert!(settled.settled_at.is_some());
    assert!(l.renew_lease(&a.id, &a.holder, ttl, &a.holder).await.is_err(), "a settled lease is not renewed");
    let listed = l.leases(Some("leased"), 100).await.unwrap();
    let leased_now = l.batch("leased").await.unwrap().leased;
    assert_eq!(listed.iter().map(|x| x.outstanding()).sum::<i64>(), leased_now, "{listed:?}");
    assert_eq!(leased_now, b.leased - 3, "the settled lease's last 3 units came back");
    assert_eq!(l.leases(None, 100).await.unwrap().len(), listed.len());
    let events: Vec<String> = l.audit_page(0, 100_000).await.unwrap().into_iter().map(|r| r.event).collect();
    assert_eq!(events.iter().filter(|e| *e == "lease.returned").count(), 2);
    assert!(events.iter().any(|e| e == "lease.granted"));
    assert_eq!(events.iter().filter(|e| *e == "lease.renewed").count(), 1);
    l.verify_audit().await.unwrap();
}

/// A site broker's audit chain, built as its ledger would (from the genesis hash of its ledger id), with
/// the rows its licence, refusal and install records carry.
pub struct SiteChain {
    pub id: [u8; 16],
    pub records: Vec<flashgate_broker::ledger::replica::SiteRecord>,
    prev: Vec<u8>,
}

impl SiteChain {
    pub fn new(id: [u8; 16]) -> Self {
        Self { id, records: Vec::new(), prev: flashgate_common::audit::genesis_hash(&id).to_vec() }
    }

    pub fn hex_id(&self) -> String {
        hex::encode(self.id)
    }

    /// Appends a record (hashed over the chain) carrying `item`.
    pub fn push(
        &mut self,
        event: &str,
        subject: &str,
        details: serde_json::Value,
        item: Option<flashgate_broker::ledger::replica::SiteItem>,
    ) {
        use flashgate_broker::ledger::AuditRecord;
        let seq = self.records.len() as i64 + 1;
        let details = details.to_string();
        let at = 1_700_000_000_000 + seq;
        let hash = flashgate_common::audit::record_hash(&self.prev, seq, at, "site", event, subject, &details);
        let audit = AuditRecord {
            seq,
            at,
            actor: "site".into(),
            event: event.into(),
            subject: subject.into(),
            details,
            prev_hash: std::mem::replace(&mut self.prev, hash.to_vec()),
            hash: hash.to_vec(),
        };
        self.records.push(flashgate_broker::ledger::replica::SiteRecord { audit, item });
    }

    /// A `licence.issued` record of `device` in `batch` at `site`, with its licence.
    pub fn licence(&mut self, batch: &str, device: &str, site: &str) -> Vec<u8> {
        use flashgate_broker::ledger::replica::{SiteItem, SiteLicence};
        use sha2::{Digest, Sha256};
        let licence = licence_bytes(&format!("{site}/{device}"), 1);
        let details = serde_json::json!({"station": "station-s", "site": site,
            "licence_sha256": hex::encode(Sha256::digest(&licence))});
        let item = SiteItem::Licence(SiteLicence {
            batch_id: batch.into(),
            device_id: device.into(),
            licence: licence.clone(),
            certificate: vec![0xC5; 136],
            station: "station-s".into(),
            site: site.into(),
            issued_at: 1_700_000_000_000,
        });
        self.push("licence.issued", &format!("batch/{batch}/device/{device}"), details, Some(item));
        licence
    }
}

/// Issue 14: what central keeps of a site broker's ledger, on any store. Replication is idempotent;
/// gaps, edits and broken links are refused naming the seq with nothing stored; a licence for a device
/// held from another site is a conflict (its unit used, the licences table unchanged); claims keep one
/// site per device; leases balance (granted == used + returned); the central chain verifies, in the
/// ledger and offline from an export.
pub async fn check_replication(l: &Ledger) {
    use flashgate_broker::ledger::leases::{LeaseRequest, LeaseState};
    use flashgate_broker::ledger::replica::{SiteInstall, SiteItem, SiteRefusal};
    const A: &str = "spiffe://t/broker/site-a";
    const B: &str = "spiffe://t/broker/site-b";
    const OTHER: &str = "austin";
    seed(l, "rep", 10, &[SITE, OTHER], (None, None)).await;
    let lease = |holder: &str, site: &str, units: i64| LeaseRequest {
        batch_id: "rep".into(),
        site: site.into(),
        holder: holder.into(),
        units,
        ttl: std::time::Duration::from_secs(600),
    };
    let la = l.grant_lease(&lease(A, SITE, 3), "central").await.unwrap();
    let lb = l.grant_lease(&lease(B, OTHER, 2), "central").await.unwrap();

    // Site A: a lease record, a licence, a refusal, an install report, another licence.
    let mut a = SiteChain::new([0xA1; 16]);
    a.push("lease.acquired", "lease/x", serde_json::json!({}), None);
    let lic1 = a.licence("rep", &device(1), SITE);
    let refusal = SiteRefusal {
        batch_id: "rep".into(),
        device_id: device(9),
        station: "station-s".into(),
        site: SITE.into(),
        reason: "PRODUCT_MISMATCH".into(),
        detail: "chip product id differs".into(),
    };
    a.push(
        "licence.refused",
        &format!("batch/rep/device/{}", device(9)),
        serde_json::json!({}),
        Some(SiteItem::Refusal(refusal)),
    );
    let install = SiteInstall {
        station: "station-s".into(),
        result_id: "r-1".into(),
        batch_id: "rep".into(),
        device_id: device(1),
        status_code: 0,
        message: "ok".into(),
        flash_crc: Some(7),
        attempt: 1,
        timings_json: "{}".into(),
        reported_at: 1_700_000_000_100,
    };
    a.push(
        "install.reported",
        &format!("batch/rep/device/{}", device(1)),
        serde_json::json!({}),
        Some(SiteItem::Install(install)),
    );
    a.licence("rep", &device(2), SITE);

    let first = l.replicate(A, SITE, &a.hex_id(), 3, &a.records[..3]).await.unwrap();
    assert_eq!((first.acked_seq, first.stored, first.licences, first.refusals), (3, 3, 1, 1), "{first:?}");
    let all = l.replicate(A, SITE, &a.hex_id(), 5, &a.records).await.unwrap();
    assert_eq!((all.acked_seq, all.skipped, all.stored, all.licences, all.installs), (5, 3, 2, 1, 1), "{all:?}");
    let audit_len = l.audit_page(0, 100_000).await.unwrap().len();
    let batch = l.batch("rep").await.unwrap();
    // The same records again: the same answer, nothing doubled.
    let again = l.replicate(A, SITE, &a.hex_id(), 5, &a.records).await.unwrap();
    assert_eq!((again.acked_seq, again.skipped, again.stored), (5, 5, 0), "{again:?}");
    assert_eq!(l.audit_page(0, 100_000).await.unwrap().len(), audit_len, "a retry appends nothing");
    assert_eq!(l.batch("rep").await.unwrap(), batch);
    assert_eq!((batch.issued, batch.leased), (2, 3), "two units moved from leased to issued");
    assert_eq!(l.licence("rep", &device(1)).await.unwrap(), Some(lic1));

    // Hostile or flaky sites: a gap, an edited record, a broken link -- refused naming the seq, nothing stored.
    let stream_before = l.site_streams().await.unwrap();
    let mut ahead = SiteChain::new(a.id);
    ahead.records = a.records.clone();
    ahead.prev = a.records[4].audit.hash.clone();
    ahead.licence("rep", &device(3), SITE); // seq 6
    ahead.licence("rep", &device(4), SITE); // seq 7
    let expect_refused = |r: Result<_, LedgerError>, seq: i64, words: &str| match r {
        Err(LedgerError::SiteChain { seq: s, why, .. }) => {
            assert_eq!(s, seq, "{why}");
            assert!(why.contains(words), "{why}");
        }
        other => panic!("expected a refusal at seq {seq}: {other:?}"),
    };
    expect_refused(l.replicate(A, SITE, &a.hex_id(), 7, &ahead.records[6..]).await.map(|_| ()), 6, "expected seq 6");
    let mut edited = ahead.records[5].clone();
    edited.audit.details = edited.audit.details.replace("station-s", "station-x");
    expect_refused(l.replicate(A, SITE, &a.hex_id(), 7, &[edited]).await.map(|_| ()), 6, "edited");
    let mut relinked = ahead.records[5].clone();
    relinked.audit.prev_hash = vec![0x55; 32];
    expect_refused(l.replicate(A, SITE, &a.hex_id(), 7, &[relinked]).await.map(|_| ()), 6, "prev_hash");
    // Seq 6 good, seq 7 broken: the whole request is refused, seq 6 is not kept either.
    let mut bad7 = ahead.records[6].clone();
    bad7.audit.hash = vec![0; 32];
    expect_refused(
        l.replicate(A, SITE, &a.hex_id(), 7, &[ahead.records[5].clone(), bad7]).await.map(|_| ()),
        7,
        "edited",
    );
    // Another site broker may not write into A's stream.
    let e = l.replicate(B, OTHER, &a.hex_id(), 7, &ahead.records[5..6]).await.unwrap_err();
    assert!(matches!(e, LedgerError::Precondition { .. }), "{e}");
    assert_eq!(l.site_streams().await.unwrap(), stream_before, "nothing of a refused request is stored");
    assert_eq!(l.batch("rep").await.unwrap(), batch);
    assert_eq!(l.licence("rep", &device(3)).await.unwrap(), None);

    // A site chain that does not start at its ledger id's genesis.
    let mut alien = SiteChain::new([0xEE; 16]);
    alien.push("x", "y", serde_json::json!({}), None);
    expect_refused(l.replicate(A, SITE, &hex::encode([0xEF; 16]), 1, &alien.records).await.map(|_| ()), 1, "genesis");

    // Claims: one site per device.
    assert!(l.claim_device("rep", &device(5), OTHER, B).await.unwrap());
    assert!(!l.claim_device("rep", &device(5), OTHER, B).await.unwrap(), "idempotent");
    let e = l.claim_device("rep", &device(5), SITE, A).await.unwrap_err();
    assert!(
        matches!(&e, LedgerError::Refused { reason: RefusalReason::LicensedAtOtherSite, detail } if detail.contains(OTHER)),
        "{e}"
    );
    let e = l.claim_device("rep", &device(1), OTHER, B).await.unwrap_err();
    assert!(
        matches!(&e, LedgerError::Refused { reason: RefusalReason::LicensedAtOtherSite, detail } if detail.contains(SITE)),
        "{e}"
    );
    assert!(l.claim_device("rep", &device(1), SITE, A).await.unwrap(), "its own site may claim it");
    let e = l.claim_device("nope", &device(1), SITE, A).await.unwrap_err();
    assert_eq!(e.refusal(), Some(RefusalReason::UnknownBatch), "{e}");

    // Site B licensed device 1 offline (held here from site A): a conflict, its unit used, licences unchanged.
    let held = l.licence("rep", &device(1)).await.unwrap();
    let mut b = SiteChain::new([0xB2; 16]);
    b.licence("rep", &device(1), OTHER);
    let r = l.replicate(B, OTHER, &b.hex_id(), 1, &b.records).await.unwrap();
    assert_eq!((r.acked_seq, r.conflicts, r.licences), (1, 1, 0), "{r:?}");
    assert_eq!(l.licence("rep", &device(1)).await.unwrap(), held, "the licences table keeps site A's licence");
    let events = l.audit_page(0, 100_000).await.unwrap();
    let conflict = events.iter().find(|r| r.event == "licence.conflict").expect("a licence.conflict record");
    assert!(conflict.details.contains(SITE) && conflict.details.contains(OTHER), "{}", conflict.details);
    assert!(conflict.details.contains(&lb.id), "the unit came from B's lease: {}", conflict.details);

    // Site A uses its last leased unit, then licenses past its leases: recorded, loudly.
    let mut more = SiteChain::new(a.id);
    more.records = a.records.clone();
    more.prev = a.records[4].audit.hash.clone();
    more.licence("rep", &device(3), SITE);
    more.licence("rep", &device(6), SITE);
    let r = l.replicate(A, SITE, &a.hex_id(), 7, &more.records[5..]).await.unwrap();
    assert_eq!((r.acked_seq, r.licences, r.unleased), (7, 2, 1), "{r:?}");
    let events = l.audit_page(0, 100_000).await.unwrap();
    let unleased = events.iter().find(|r| r.event == "licence.unleased").expect("a licence.unleased record");
    assert!(unleased.details.contains("\"counted\":true"), "free quota took it: {}", unleased.details);
    assert_eq!(events.iter().filter(|r| r.event == "licence.replicated").count(), 3);
    assert_eq!(events.iter().filter(|r| r.event == "site.replicated").count(), 4);

    // A central licence beside them, then B hands back what it did not use.
    request_licence(l, "rep", &device(7), 1).await.unwrap();
    l.return_lease(&lb.id, B, 1, B).await.unwrap();
    let leases = l.leases(Some("rep"), 100).await.unwrap();
    for x in &leases {
        assert_eq!(x.granted, x.used + x.returned, "{x:?}");
        assert_eq!(x.state, LeaseState::Settled, "{x:?}");
    }
    let a_lease = leases.iter().find(|x| x.id == la.id).unwrap();
    assert_eq!((a_lease.used, a_lease.returned), (3, 0));
    let b_final = l.batch("rep").await.unwrap();
    // Units: d1, d2, d3 (A's lease), d6 (free quota), the conflict (B's lease), d7 (central).
    assert_eq!((b_final.issued, b_final.leased), (6, 0), "{b_final:?}");
    let streams = l.site_streams().await.unwrap();
    let sa = streams.iter().find(|s| s.holder == A).unwrap();
    assert_eq!((sa.acked_seq, sa.site_head_seq, sa.licences, sa.conflicts, sa.lag_records()), (7, 7, 4, 0, 0));
    let sb = streams.iter().find(|s| s.holder == B).unwrap();
    assert_eq!((sb.acked_seq, sb.conflicts), (1, 1));
    let noted = l.note_site_head(B, OTHER, &b.hex_id(), 9).await.unwrap();
    assert_eq!(noted.lag_records(), 8);

    // Central's own verification holds with replicated, unleased and conflicting licences.
    l.verify_audit().await.unwrap();
    verify_export_offline(l).await;
}

/// Exports `l`'s audit bundle and verifies it with the offline verifier, a checkpoint of its head signed
/// by a test key standing witness.
pub async fn verify_export_offline(l: &Ledger) {
    use flashgate_common::checkpoint::CheckpointHead;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
    let collect = tokio::spawn(async move {
        let mut out = String::new();
        while let Some(line) = rx.recv().await {
            out.push_str(&line);
        }
        out
    });
    l.export_bundle("central", &tx).await.unwrap();
    drop(tx);
    let text = collect.await.unwrap();
    let (seq, hash) = l.audit_head().await.unwrap();
    let key = p256::ecdsa::SigningKey::from_slice(&[9; 32]).unwrap();
    let cp = CheckpointHead {
        ledger_id: l.ledger_id(),
        seq: seq as u64,
        hash: hash.as_slice().try_into().unwrap(),
        at: 1,
        broker: "central".into(),
    }
    .sign(&key)
    .unwrap();
    let report = flashgate_common::audit_export::verify(
        text.as_bytes(),
        &[*key.verifying_key()],
        &[("test witness".into(), cp)],
    )
    .unwrap_or_else(|e| panic!("the export does not verify offline: {e}"));
    assert_eq!(report.records, seq as u64);
}
