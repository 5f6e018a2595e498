//! Ledger invariants on PostgreSQL, including two brokers (two `Ledger`s with separate pools) sharing one
//! database under concurrent load. Skips with a printed reason when PostgreSQL is not installed, unless
//! `FLASHGATE_REQUIRE_POSTGRES=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::support::pg::PgCluster;
use crate::support::*;
use flashgate_broker::ledger::{AuditFault, IssueOutcome, Ledger, LedgerError};

/// One cluster per test binary run would leak a server if a test panics; a cluster per test is cheap enough.
fn cluster() -> Option<PgCluster> {
    PgCluster::start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_pg_two_brokers_never_exceed_a_shared_quota() {
    let Some(pg) = cluster() else { return };
    let url = pg.create_db("quota");
    // Two brokers: two ledgers, separate pools and writer tasks, one database; they migrate concurrently.
    let (a, b) = tokio::join!(Ledger::open(&url), Ledger::open(&url));
    let (a, b) = (a.unwrap(), b.unwrap());
    seed(&a, "shared", 8, &[SITE], (None, None)).await;
    check_quota_under_concurrency(&[a.clone(), b.clone()], "shared", 64, 8).await;
    // A bigger round: 400 devices through both brokers against quota 150.
    seed(&a, "shared2", 150, &[SITE], (None, None)).await;
    check_quota_under_concurrency(&[a.clone(), b.clone()], "shared2", 400, 150).await;
    assert_eq!(raw_count(&url, "SELECT COUNT(*) FROM licences WHERE batch_id = 'shared2'").await, 150);
    b.verify_audit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_pg_same_device_through_two_brokers_yields_one_licence() {
    let Some(pg) = cluster() else { return };
    let url = pg.create_db("same");
    let a = Ledger::open(&url).await.unwrap();
    let b = Ledger::open(&url).await.unwrap();
    seed(&a, "dup", 10, &[SITE], (None, None)).await;
    let d = device(5);
    let mut tasks = Vec::new();
    for i in 0..40u32 {
        let l = if i % 2 == 0 { a.clone() } else { b.clone() };
        let d = d.clone();
        tasks.push(tokio::spawn(async move { l.commit_issue(issue_record("dup", &d, i)).await.unwrap() }));
    }
    let mut bytes = std::collections::HashSet::new();
    let mut issued = 0;
    for t in tasks {
        let o = t.await.unwrap();
        issued += usize::from(matches!(o, IssueOutcome::Issued(_)));
        bytes.insert(o.into_licence());
    }
    assert_eq!((issued, bytes.len()), (1, 1));
    assert_eq!(b.batch("dup").await.unwrap().issued, 1);
    check_same_device_concurrency(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_pg_retry_and_fail_closed() {
    let Some(pg) = cluster() else { return };
    let url = pg.create_db("inv");
    let l = Ledger::open(&url).await.unwrap();
    check_retry_identical(&l).await;
    check_reissue_rules_at_commit(&l).await;
    check_fail_closed(&l, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_pg_audit_tampering_is_detected() {
    let Some(pg) = cluster() else { return };
    let url = pg.create_db("audit");
    let l = Ledger::open(&url).await.unwrap();
    seed(&l, "aud", 3, &[SITE], (None, None)).await;
    for i in 0..5 {
        let _ = l.commit_issue(issue_record("aud", &device(i), 1)).await;
    }
    l.verify_audit().await.unwrap();
    raw_sql(&url, &["UPDATE audit SET actor = 'mallory' WHERE seq = 5"]).await;
    let e = l.verify_audit().await.unwrap_err();
    assert!(matches!(e, LedgerError::AuditBroken { seq: 5, why: AuditFault::Edited }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_pg_station_assignments_and_status_shared_by_two_brokers() {
    let Some(pg) = cluster() else { return };
    let url = pg.create_db("stations");
    let a = Ledger::open(&url).await.unwrap();
    let b = Ledger::open(&url).await.unwrap();
    check_station_control(&a, Some(&b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_pg_device_export_pages_every_device_once() {
    let Some(pg) = cluster() else { return };
    let l = Ledger::open(&pg.create_db("devices")).await.unwrap();
    check_device_export(&l).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_pg_from_before_v7_gets_its_refusals_from_the_audit_chain() {
    let Some(pg) = cluster() else { return };
    let url = pg.create_db("backfill");
    check_refusals_backfill(Ledger::open(&url).await.unwrap(), &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_pg_leases_and_licences_on_two_brokers_never_exceed_the_quota() {
    let Some(pg) = cluster() else { return };
    let url = pg.create_db("leases");
    let (a, b) = (Ledger::open(&url).await.unwrap(), Ledger::open(&url).await.unwrap());
    check_leases(&[a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_pg_replication_from_site_brokers_is_checked_idempotent_and_reconciled() {
    let Some(pg) = cluster() else { return };
    let url = pg.create_db("replication");
    check_replication(&Ledger::open(&url).await.unwrap()).await;
}
