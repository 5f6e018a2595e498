//! Ledger invariants on SQLite (the default single-broker store): one licence per device, quota under
//! concurrency, durability and crash behaviour, fail-closed auditing, install reports, refusal reasons, and
//! tamper detection of the audit chain.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::support::*;
use flashgate_broker::ledger::audit::{AuditRecord, Genesis, LEGACY_GENESIS_HASH, genesis_hash};
use flashgate_broker::ledger::{
    AuditFault, BatchState, InstallOutcome, InstallReport, IssueOutcome, Ledger, LedgerError, Precheck, RefusalReason,
    RefusalRecord, now_ms,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_retry_returns_identical_licence_and_consumes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (l, _) = sqlite_ledger(&dir).await;
    check_retry_identical(&l).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_reissue_rules_hold_at_commit_without_a_device_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let (l, _) = sqlite_ledger(&dir).await;
    check_reissue_rules_at_commit(&l).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_quota_never_exceeded_by_64_concurrent_requesters() {
    let dir = tempfile::tempdir().unwrap();
    let (l, _) = sqlite_ledger(&dir).await;
    seed(&l, "q8", 8, &[SITE], (None, None)).await;
    check_quota_under_concurrency(std::slice::from_ref(&l), "q8", 64, 8).await;
    let events = l.audit_page(0, 10_000).await.unwrap();
    assert_eq!(events.iter().filter(|r| r.event == "licence.issued").count(), 8);
    let refused: Vec<_> = events.iter().filter(|r| r.event == "licence.refused").collect();
    assert_eq!(refused.len(), 56);
    assert!(refused.iter().all(|r| r.details.contains("QUOTA_EXHAUSTED")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_quota_never_exceeded_without_precheck() {
    // Commit directly (as if every precheck raced): the transactional guard alone must hold the quota.
    let dir = tempfile::tempdir().unwrap();
    let (l, _) = sqlite_ledger(&dir).await;
    seed(&l, "raw", 8, &[SITE], (None, None)).await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let l = l.clone();
        tasks.push(tokio::spawn(async move { l.commit_issue(issue_record("raw", &device(i), 1)).await }));
    }
    let mut issued = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => issued += 1,
            Err(e) => assert_eq!(e.refusal(), Some(RefusalReason::QuotaExhausted), "{e}"),
        }
    }
    assert_eq!(issued, 8);
    assert_eq!(l.batch("raw").await.unwrap().issued, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_concurrent_requests_for_one_device_yield_one_licence() {
    let dir = tempfile::tempdir().unwrap();
    let (l, _) = sqlite_ledger(&dir).await;
    check_same_device_concurrency(&l).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_fails_closed_when_audit_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let (l, url) = sqlite_ledger(&dir).await;
    check_fail_closed(&l, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_unit_is_durable_before_the_licence_is_returned() {
    let dir = tempfile::tempdir().unwrap();
    let (l, url) = sqlite_ledger(&dir).await;
    seed(&l, "dur", 3, &[SITE], (None, None)).await;
    let got = l.commit_issue(issue_record("dur", &device(1), 1)).await.unwrap();
    // A second, independent handle (another process would see the same) sees the unit and the licence.
    let other = Ledger::open(&url).await.unwrap();
    assert_eq!(other.batch("dur").await.unwrap().issued, 1);
    assert_eq!(other.licence("dur", &device(1)).await.unwrap().unwrap(), got.licence());
    assert_eq!(raw_count(&url, "SELECT COUNT(*) FROM audit WHERE event = 'licence.issued'").await, 1);
}

#[test]
fn ledger_crash_wastes_nothing_and_retries_reuse_the_licence() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    // Run 1: 64 stations request 4 devices each; the runtime is torn down abruptly once some licences have been
    // answered, with others in flight (a crash: pending transactions are never committed).
    let devices = 256;
    let answered: Vec<(usize, Vec<u8>)> = {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let url2 = url.clone();
        let a2 = answered.clone();
        rt.block_on(async move {
            let l = Ledger::open(&url2).await.unwrap();
            seed(&l, "crash", 1000, &[SITE], (None, None)).await;
            for s in 0..64 {
                let (l, a) = (l.clone(), a2.clone());
                tokio::spawn(async move {
                    for i in (s..devices).step_by(64) {
                        if let Ok(o) = l.commit_issue(issue_record("crash", &device(i), 1)).await {
                            a.lock().unwrap().push((i, o.into_licence()));
                        }
                    }
                });
            }
            while a2.lock().unwrap().len() < 40 {
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
        });
        rt.shutdown_background();
        answered.lock().unwrap().clone()
    };
    // Run 2: reopen; every committed unit has its licence, every answered licence is durable and identical.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let l = Ledger::open(&url).await.unwrap();
        let before = l.batch("crash").await.unwrap().issued;
        assert_eq!(before, raw_count(&url, "SELECT COUNT(*) FROM licences WHERE batch_id = 'crash'").await);
        assert!(before >= answered.len() as i64);
        l.verify_audit().await.unwrap();
        for (i, bytes) in &answered {
            let again = l.commit_issue(issue_record("crash", &device(*i), 2)).await.unwrap();
            assert_eq!(again, IssueOutcome::Existing(bytes.clone()), "device {i}");
        }
        assert!(before < devices as i64, "the crash came too late to leave anything in flight");
        // Every device retries: nothing was wasted, 256 devices cost exactly 256 units.
        for i in 0..devices {
            l.commit_issue(issue_record("crash", &device(i), 3)).await.unwrap();
        }
        assert_eq!(l.batch("crash").await.unwrap().issued, devices as i64);
        eprintln!("crash test: {} answered before the crash, {before} committed", answered.len());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_install_reports_are_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let (l, _) = sqlite_ledger(&dir).await;
    seed(&l, "inst", 10, &[SITE], (None, None)).await;
    for i in 0..3 {
        l.commit_issue(issue_record("inst", &device(i), 1)).await.unwrap();
    }
    let report = |result_id: &str, dev: usize, status: u16| InstallReport {
        station: "station-1".into(),
        result_id: result_id.into(),
        batch_id: "inst".into(),
        device_id: device(dev),
        status_code: status,
        message: if status == 0 { "installed".into() } else { "area 2 not authentic".into() },
        flash_crc: (status == 0).then_some(0xDEAD_BEEF),
        attempt: 1,
        timings_json: r#"{"flash_ms":1200}"#.into(),
        actor: "station-1".into(),
    };
    // Device 0: ok, reported three times concurrently (retries); device 1: failed then ok; device 2: failed.
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let l = l.clone();
        let r = report("r0", 0, 0);
        tasks.push(tokio::spawn(async move { l.report_install(r).await.unwrap() }));
    }
    let outcomes: Vec<_> = futures_join(tasks).await;
    assert_eq!(outcomes.iter().filter(|o| **o == InstallOutcome::Recorded).count(), 1);
    assert_eq!(l.report_install(report("r1a", 1, 0x0105)).await.unwrap(), InstallOutcome::Recorded);
    assert_eq!(l.report_install(report("r1b", 1, 0)).await.unwrap(), InstallOutcome::Recorded);
    assert_eq!(l.report_install(report("r2", 2, 0x0105)).await.unwrap(), InstallOutcome::Recorded);
    assert_eq!(l.report_install(report("r2", 2, 0x0105)).await.unwrap(), InstallOutcome::Duplicate);
    let s = l.batch_status("inst").await.unwrap();
    assert_eq!((s.issued, s.installed, s.failed, s.remaining), (3, 2, 1, 7));
    let audit = l.audit_page(0, 1000).await.unwrap();
    assert_eq!(audit.iter().filter(|r| r.event == "install.reported").count(), 4);
    // Unknown batch, bad timings.
    let mut bad = report("r9", 0, 0);
    bad.batch_id = "nope".into();
    assert!(matches!(l.report_install(bad).await, Err(LedgerError::NotFound { what: "batch", .. })));
    let mut bad = report("r10", 0, 0);
    bad.timings_json = "[1]".into();
    assert!(matches!(l.report_install(bad).await, Err(LedgerError::Invalid { .. })));
}

async fn futures_join<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_refusal_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let (l, _) = sqlite_ledger(&dir).await;
    let now = now_ms();
    seed(&l, "paused", 5, &[SITE], (None, None)).await;
    l.set_batch_state("paused", BatchState::Paused, "admin").await.unwrap();
    seed(&l, "closed", 5, &[SITE], (None, None)).await;
    l.set_batch_state("closed", BatchState::Closed, "admin").await.unwrap();
    seed(&l, "expired", 5, &[SITE], (Some(now - 20_000), Some(now - 10_000))).await;
    seed(&l, "future", 5, &[SITE], (Some(now + 3_600_000), None)).await;
    seed(&l, "elsewhere", 5, &["porto"], (None, None)).await;
    seed(&l, "open", 5, &["*"], (Some(now - 1000), Some(now + 3_600_000))).await;
    seed(&l, "empty", 0, &[SITE], (None, None)).await;
    let cases = [
        ("paused", RefusalReason::BatchPaused),
        ("closed", RefusalReason::BatchClosed),
        ("expired", RefusalReason::BatchExpired),
        ("future", RefusalReason::BatchNotStarted),
        ("elsewhere", RefusalReason::SiteNotAllowed),
        ("empty", RefusalReason::QuotaExhausted),
        ("missing", RefusalReason::UnknownBatch),
    ];
    for (batch, reason) in cases {
        // Both the precheck and the commit (which re-checks) refuse with the same reason.
        let pre = l.precheck(&precheck_request(batch, &device(1))).await.unwrap_err();
        assert_eq!(pre.refusal(), Some(reason), "precheck {batch}: {pre}");
        let commit = l.commit_issue(issue_record(batch, &device(1), 1)).await.unwrap_err();
        assert_eq!(commit.refusal(), Some(reason), "commit {batch}: {commit}");
    }
    let mut wrong = issue_record("open", &device(1), 1);
    wrong.product_id = "45002001".into();
    let e = l.commit_issue(wrong).await.unwrap_err();
    assert_eq!(e.refusal(), Some(RefusalReason::ProductMismatch));
    assert!(e.to_string().contains("45002001") && e.to_string().contains("PRODUCT_MISMATCH"), "{e}");
    let mut pre = precheck_request("open", &device(1));
    pre.product_id = "45002001".into();
    assert_eq!(l.precheck(&pre).await.unwrap_err().refusal(), Some(RefusalReason::ProductMismatch));
    assert!(matches!(l.precheck(&precheck_request("open", &device(1))).await.unwrap(), Precheck::Proceed(_)));
    // No quota was consumed by any refusal; every refusal is audited with its reason.
    for b in ["paused", "closed", "expired", "future", "elsewhere", "open", "empty"] {
        assert_eq!(l.batch(b).await.unwrap().issued, 0, "{b}");
    }
    // A closed batch stays closed.
    assert!(l.set_batch_state("closed", BatchState::Open, "admin").await.is_err());
    // Refusals decided by the service are audited too.
    l.record_refusal(RefusalRecord {
        batch_id: "open".into(),
        device_id: device(2),
        station: "station-9".into(),
        site: SITE.into(),
        actor: "station-9".into(),
        reason: RefusalReason::CertUnverified,
        detail: "signature does not verify".into(),
    })
    .await
    .unwrap();
    let audit = l.audit_page(0, 1000).await.unwrap();
    let refusals: Vec<_> = audit.iter().filter(|r| r.event == "licence.refused").collect();
    assert_eq!(refusals.len(), 2 * cases.len() + 2 + 1);
    for name in ["BATCH_PAUSED", "BATCH_CLOSED", "BATCH_EXPIRED", "BATCH_NOT_STARTED", "SITE_NOT_ALLOWED"] {
        assert!(refusals.iter().any(|r| r.details.contains(name)), "{name} not audited");
    }
    assert!(refusals.iter().any(|r| r.details.contains("CERT_UNVERIFIED")));
    l.verify_audit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_admin_changes_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let (l, _) = sqlite_ledger(&dir).await;
    let b = seed(&l, "adm", 5, &[SITE], (None, None)).await;
    l.set_batch_state("adm", BatchState::Paused, "admin").await.unwrap();
    let r = l.revoke_station("0badc0de", "station-3", "stolen laptop", "admin").await.unwrap();
    assert_eq!(r.identity, "station-3");
    // Revoking twice is idempotent and audited once.
    l.revoke_station("0badc0de", "station-3", "again", "admin").await.unwrap();
    assert_eq!(l.revocations().await.unwrap().len(), 1);
    let (meta, bytes) = l.image(&b.image_sha256).await.unwrap();
    assert_eq!(bytes, b"image for adm");
    assert_eq!(meta.size, bytes.len() as i64);
    let events: Vec<String> = l.audit_page(0, 100).await.unwrap().into_iter().map(|r| r.event).collect();
    assert_eq!(events, ["key.added", "image.added", "batch.created", "batch.state_changed", "station.revoked"]);
    let mut out = Vec::new();
    assert_eq!(l.export_audit(&mut out).await.unwrap(), 5);
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8(out).unwrap().lines().next().unwrap()).unwrap();
    // The first record starts from the genesis hash of the ledger's id, not from zeros.
    assert_eq!(first["prev_hash"], hex::encode(genesis_hash(&l.ledger_id())));
    let s = l.verify_audit().await.unwrap();
    assert_eq!(s.records, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_large_image_round_trips_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (l, url) = sqlite_ledger(&dir).await;
    seed(&l, "img", 1, &[SITE], (None, None)).await;
    let big: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
    let meta = l
        .put_image(&new_image("00112233445566778899aabbccddeeff", "stm32h7", "45002001"), &big, "admin")
        .await
        .unwrap();
    assert_eq!(
        raw_count(&url, &format!("SELECT COUNT(*) FROM image_chunks WHERE sha256 = '{}'", meta.sha256)).await,
        3
    );
    assert_eq!(l.image(&meta.sha256).await.unwrap().1, big);
    raw_sql(&url, &[&format!("DELETE FROM image_chunks WHERE sha256 = '{}' AND idx = 1", meta.sha256)]).await;
    assert!(matches!(l.image(&meta.sha256).await, Err(LedgerError::Corrupt { .. })));
}

/// Builds a ledger with at least 10 audit records and returns it with its URL.
async fn audited_ledger(dir: &tempfile::TempDir) -> (Ledger, String) {
    let (l, url) = sqlite_ledger(dir).await;
    seed(&l, "aud", 3, &[SITE], (None, None)).await;
    for i in 0..8 {
        let _ = l.commit_issue(issue_record("aud", &device(i), 1)).await;
    }
    assert!(l.verify_audit().await.unwrap().records >= 10);
    (l, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_audit_verify_detects_edited_record() {
    let dir = tempfile::tempdir().unwrap();
    let (l, url) = audited_ledger(&dir).await;
    raw_sql(&url, &["UPDATE audit SET details = replace(details, 'station-1', 'station-2') WHERE seq = 5"]).await;
    let e = l.verify_audit().await.unwrap_err();
    assert!(matches!(e, LedgerError::AuditBroken { seq: 5, why: AuditFault::Edited }), "{e}");
    assert!(e.to_string().contains("seq 5"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_audit_verify_detects_deleted_record() {
    let dir = tempfile::tempdir().unwrap();
    let (l, url) = audited_ledger(&dir).await;
    raw_sql(&url, &["DELETE FROM audit WHERE seq = 4"]).await;
    let e = l.verify_audit().await.unwrap_err();
    assert!(matches!(e, LedgerError::AuditBroken { seq: 4, why: AuditFault::Gap { expected: 4, found: 5 } }), "{e}");
    // Deleting the newest record is caught by the head.
    let dir2 = tempfile::tempdir().unwrap();
    let (l2, url2) = audited_ledger(&dir2).await;
    raw_sql(&url2, &["DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)"]).await;
    let e = l2.verify_audit().await.unwrap_err();
    assert!(matches!(e, LedgerError::AuditBroken { why: AuditFault::HeadMismatch { .. }, .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_audit_verify_detects_reordered_pair() {
    let dir = tempfile::tempdir().unwrap();
    let (l, url) = audited_ledger(&dir).await;
    raw_sql(
        &url,
        &[
            "UPDATE audit SET seq = -7 WHERE seq = 7",
            "UPDATE audit SET seq = 7 WHERE seq = 6",
            "UPDATE audit SET seq = 6 WHERE seq = -7",
        ],
    )
    .await;
    let e = l.verify_audit().await.unwrap_err();
    assert!(matches!(e, LedgerError::AuditBroken { seq: 6, why: AuditFault::PrevHashMismatch }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_rejects_in_memory_and_unknown_urls() {
    assert!(matches!(Ledger::open("sqlite::memory:").await, Err(LedgerError::Invalid { .. })));
    assert!(matches!(Ledger::open("mysql://x").await, Err(LedgerError::Invalid { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_station_assignments_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let (l, url) = sqlite_ledger(&dir).await;
    let other = Ledger::open(&url).await.unwrap();
    check_station_control(&l, Some(&other)).await;
}

/// A ledger with 5 licences of batch `rec` (quota 10): its last 3 audit records are `licence.issued`.
async fn licensed_ledger(dir: &tempfile::TempDir) -> (Ledger, String) {
    let (l, url) = sqlite_ledger(dir).await;
    seed(&l, "rec", 10, &[SITE], (None, None)).await;
    for i in 0..5 {
        l.commit_issue(issue_record("rec", &device(i), 1)).await.unwrap();
    }
    l.verify_audit().await.unwrap();
    (l, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_audit_verify_detects_trailing_deletion_with_the_head_moved_back() {
    let dir = tempfile::tempdir().unwrap();
    let (l, url) = licensed_ledger(&dir).await;
    raw_sql(
        &url,
        &[
            "DELETE FROM audit WHERE seq > (SELECT MAX(seq) - 3 FROM audit)",
            "UPDATE audit_head SET seq = (SELECT MAX(seq) FROM audit), \
             hash = (SELECT hash FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)) WHERE id = 1",
        ],
    )
    .await;
    let e = l.verify_audit().await.unwrap_err();
    assert!(matches!(e, LedgerError::AuditBroken { why: AuditFault::Unreconciled(_), .. }), "{e}");
    assert!(e.to_string().contains("has no licence.issued record"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_audit_verify_detects_an_edit_with_the_chain_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let (l, url) = licensed_ledger(&dir).await;
    // Edit one licence.issued record's device, then re-chain every record after it and the head, as
    // someone with write access to the database would.
    let mut records = l.audit_page(0, 10_000).await.unwrap();
    let edited = records.iter().position(|r| r.event == "licence.issued").unwrap();
    records[edited].subject = format!("batch/rec/device/{}", device(99));
    let mut statements = Vec::new();
    for i in edited..records.len() {
        if i > 0 {
            records[i].prev_hash = records[i - 1].hash.clone();
        }
        records[i].hash = records[i].compute_hash().to_vec();
        let r = &records[i];
        statements.push(format!(
            "UPDATE audit SET subject = '{}', prev_hash = x'{}', hash = x'{}' WHERE seq = {}",
            r.subject,
            hex::encode(&r.prev_hash),
            hex::encode(&r.hash),
            r.seq
        ));
    }
    let last = records.last().unwrap();
    statements.push(format!("UPDATE audit_head SET hash = x'{}' WHERE id = 1", hex::encode(&last.hash)));
    let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
    raw_sql(&url, &refs).await;
    let e = l.verify_audit().await.unwrap_err();
    assert!(matches!(e, LedgerError::AuditBroken { why: AuditFault::Unreconciled(_), .. }), "{e}");
    assert!(e.to_string().contains(&device(0)) || e.to_string().contains(&device(99)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // A world-readable file left by an older version is narrowed too.
    let path = dir.path().join("ledger.db");
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let url = format!("sqlite://{}", path.display());
    let l = Ledger::open(&url).await.unwrap();
    seed(&l, "modes", 3, &[SITE], (None, None)).await;
    for p in [path.clone(), dir.path().join("ledger.db-wal")] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", p.display());
    }
}

/// SQL that re-chains `records[from..]` (after editing them) from `first_prev` (or the hash of the record
/// before `from`) and moves the head to the last one, as someone with write access to the database would.
fn rechain_sql(records: &mut [AuditRecord], from: usize, first_prev: Option<Vec<u8>>) -> Vec<String> {
    let mut statements = Vec::new();
    for i in from..records.len() {
        records[i].prev_hash = match (i, &first_prev) {
            (0, Some(p)) => p.clone(),
            (0, None) => records[0].prev_hash.clone(),
            _ => records[i - 1].hash.clone(),
        };
        records[i].hash = records[i].compute_hash().to_vec();
        let r = &records[i];
        statements.push(format!(
            "UPDATE audit SET subject = '{}', details = '{}', prev_hash = x'{}', hash = x'{}' WHERE seq = {}",
            r.subject,
            r.details.replace('\'', "''"),
            hex::encode(&r.prev_hash),
            hex::encode(&r.hash),
            r.seq
        ));
    }
    if let Some(last) = records.last() {
        statements.push(format!(
            "UPDATE audit_head SET seq = {}, hash = x'{}' WHERE id = 1",
            last.seq,
            hex::encode(&last.hash)
        ));
    }
    statements
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_id_is_created_with_the_ledger_and_bound_by_the_first_record() {
    let dir = tempfile::tempdir().unwrap();
    let (l, url) = audited_ledger(&dir).await;
    let id = l.ledger_id();
    assert_ne!(id, [0; 16]);
    assert_eq!(l.genesis(), Genesis::Bound);
    assert_eq!(Ledger::open(&url).await.unwrap().ledger_id(), id, "the id is stored, not drawn per opening");
    let other = tempfile::tempdir().unwrap();
    assert_ne!(sqlite_ledger(&other).await.0.ledger_id(), id, "each ledger draws its own id");
    let s = l.verify_audit().await.unwrap();
    assert_eq!(s.ledger_id, hex::encode(id));
    let mut records = l.audit_page(0, 10_000).await.unwrap();
    assert_eq!(records[0].prev_hash, genesis_hash(&id).to_vec());

    // The whole chain re-built from zeros (as an old ledger would start): refused at seq 1.
    let statements = rechain_sql(&mut records, 0, Some(LEGACY_GENESIS_HASH.to_vec()));
    raw_sql(&url, &statements.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let e = l.verify_audit().await.unwrap_err();
    assert!(matches!(e, LedgerError::AuditBroken { seq: 1, why: AuditFault::Genesis }), "{e}");
    assert!(e.to_string().contains("genesis hash of the ledger id"), "{e}");

    // …and re-built from another ledger id's genesis, with ledger_meta edited to match: the identity differs
    // from the one the broker opened.
    let forged = [0x42u8; 16];
    let mut statements = rechain_sql(&mut records, 0, Some(genesis_hash(&forged).to_vec()));
    statements.push(format!("UPDATE ledger_meta SET ledger_id = x'{}' WHERE id = 1", hex::encode(forged)));
    raw_sql(&url, &statements.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let e = l.verify_audit().await.unwrap_err();
    assert!(matches!(e, LedgerError::AuditBroken { seq: 0, why: AuditFault::Identity(_) }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_created_before_ledger_ids_gets_one_and_stays_legacy() {
    let dir = tempfile::tempdir().unwrap();
    let (l, url) = audited_ledger(&dir).await;
    // Make it what schema v4 left behind: a chain from zeros, no ledger_meta, migration 5 not applied.
    let mut records = l.audit_page(0, 10_000).await.unwrap();
    let n = records.len();
    let mut statements = rechain_sql(&mut records, 0, Some(LEGACY_GENESIS_HASH.to_vec()));
    statements.push("DROP TABLE ledger_meta".into());
    statements.push("DELETE FROM _sqlx_migrations WHERE version = 5".into());
    raw_sql(&url, &statements.iter().map(String::as_str).collect::<Vec<_>>()).await;
    l.close().await;

    let l = Ledger::open(&url).await.unwrap();
    assert_eq!(l.genesis(), Genesis::Legacy);
    let s = l.verify_audit().await.unwrap();
    assert_eq!(s.records as usize, n + 1, "one ledger.id_assigned record appended");
    assert_eq!(s.genesis, Genesis::Legacy);
    let last = l.audit_page(n as i64, 10).await.unwrap().pop().unwrap();
    assert_eq!(last.event, "ledger.id_assigned");
    assert!(last.details.contains(&hex::encode(l.ledger_id())), "{}", last.details);
    // Opening again changes nothing.
    let again = Ledger::open(&url).await.unwrap();
    assert_eq!((again.ledger_id(), again.genesis()), (l.ledger_id(), Genesis::Legacy));
    assert_eq!(again.verify_audit().await.unwrap().records as usize, n + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_device_export_pages_every_device_once() {
    let dir = tempfile::tempdir().unwrap();
    let (l, _) = sqlite_ledger(&dir).await;
    check_device_export(&l).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_from_before_v7_gets_its_refusals_from_the_audit_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (l, url) = sqlite_ledger(&dir).await;
    check_refusals_backfill(l, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_leases_take_quota_beside_licences_and_return_it() {
    let dir = tempfile::tempdir().unwrap();
    let (l, _) = sqlite_ledger(&dir).await;
    check_leases(&[l]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_replication_from_site_brokers_is_checked_idempotent_and_reconciled() {
    let dir = tempfile::tempdir().unwrap();
    let (l, _) = sqlite_ledger(&dir).await;
    check_replication(&l).await;
}
