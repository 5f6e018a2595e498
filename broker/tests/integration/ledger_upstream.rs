//! A site broker's ledger (schema v9, `flashgate_broker::ledger::upstream`): a mirrored batch issues
//! exactly the units its leases grant and stops at their expiry (`LEASE_EXPIRED`, reissues still
//! answered), withheld units cannot be issued, central's state reaches it, and replication reads every
//! record in order with the row it is about. Also central's side of the one-chip-two-sites rule when
//! the site that claimed a device replicates after the one that licensed it offline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flashgate_broker::ledger::replica::SiteItem;
use flashgate_broker::ledger::upstream::{MirrorBatch, UpstreamLease};
use flashgate_broker::ledger::{BatchState, InstallReport, IssueOutcome, LedgerError, RefusalReason, now_ms};

use crate::support::{SITE, SiteChain, device, request_licence, seed, sqlite_ledger};

fn lease(id: u8, granted: i64, returned: i64, expires_at: i64) -> UpstreamLease {
    UpstreamLease {
        id: format!("{id:032x}"),
        batch_id: "lot".into(),
        granted,
        returned,
        state: "active".into(),
        granted_at: i64::from(id),
        expires_at,
    }
}

fn refused(r: Result<IssueOutcome, LedgerError>) -> (RefusalReason, String) {
    match r {
        Err(LedgerError::Refused { reason, detail }) => (reason, detail),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_mirrored_batch_issues_its_leased_units_until_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let (l, _) = sqlite_ledger(&dir).await;
    // Central's image (and the key the ceremony imported here) are stored first.
    let own = seed(&l, "own", 1, &[SITE], (None, None)).await;
    let mut m = MirrorBatch {
        id: "lot".into(),
        product_id: own.product_id.clone(),
        image_sha256: own.image_sha256.clone(),
        allowed_sites: vec![SITE.into()],
        not_before: None,
        not_after: None,
        state: BatchState::Open,
    };
    let b = l.mirror_batch(&m, "upstream").await.unwrap();
    assert_eq!((b.quota, b.issued, b.lease_expires_at), (0, 0, Some(0)));
    let (reason, detail) = refused(request_licence(&l, "lot", &device(1), 0).await);
    assert_eq!(reason, RefusalReason::QuotaExhausted);
    assert!(detail.contains("no quota lease"), "{detail}");
    // Mirroring is idempotent; a batch of this broker's own is not a mirror.
    l.mirror_batch(&m, "upstream").await.unwrap();
    let own_mirror = MirrorBatch { id: "own".into(), ..m.clone() };
    assert!(matches!(l.mirror_batch(&own_mirror, "upstream").await, Err(LedgerError::Invalid { .. })));

    // A lease of 3: three devices, then the site's own words for an exhausted lease.
    let later = now_ms() + 60_000;
    let b = l.record_upstream_leases("lot", &[lease(1, 3, 0, later)], "upstream").await.unwrap();
    assert_eq!((b.quota, b.lease_expires_at), (3, Some(later)));
    for i in 1..=3 {
        assert!(matches!(request_licence(&l, "lot", &device(i), 0).await.unwrap(), IssueOutcome::Issued(_)));
    }
    let (reason, detail) = refused(request_licence(&l, "lot", &device(4), 0).await);
    assert_eq!(reason, RefusalReason::QuotaExhausted);
    assert!(detail.contains("central leased"), "{detail}");

    // A second lease of 2; one used, the other withheld for a return: it cannot be issued meanwhile.
    l.record_upstream_leases("lot", &[lease(2, 2, 0, later)], "upstream").await.unwrap();
    assert!(matches!(request_licence(&l, "lot", &device(4), 0).await.unwrap(), IssueOutcome::Issued(_)));
    assert_eq!(l.withhold_units("lot", 5).await.unwrap(), 1, "only the one unused unit");
    assert_eq!(l.withhold_units("lot", 5).await.unwrap(), 0);
    assert_eq!(refused(request_licence(&l, "lot", &device(5), 0).await).0, RefusalReason::QuotaExhausted);
    // Central did not take it back: the next sync restores it; then central took it back: gone for good.
    let b = l.record_upstream_leases("lot", &[lease(2, 2, 0, later)], "upstream").await.unwrap();
    assert_eq!(b.quota - b.issued, 1);
    let b = l.record_upstream_leases("lot", &[lease(2, 2, 1, later)], "upstream").await.unwrap();
    assert_eq!((b.quota, b.issued), (4, 4));

    // Expired leases: new devices refused in words, a device holding its licence still gets it back.
    let past = now_ms() - 1;
    l.record_upstream_leases("lot", &[lease(1, 3, 0, past), lease(2, 2, 1, past), lease(3, 1, 0, past)], "upstream")
        .await
        .unwrap();
    let (reason, detail) = refused(request_licence(&l, "lot", &device(6), 0).await);
    assert_eq!(reason, RefusalReason::LeaseExpired);
    assert!(detail.contains("could not be renewed"), "{detail}");
    assert!(matches!(request_licence(&l, "lot", &device(2), 1).await.unwrap(), IssueOutcome::Existing(_)));
    let leases = l.upstream_leases("lot").await.unwrap();
    assert_eq!(leases.len(), 3);

    // Central closed the batch: the mirror follows, audited.
    m.state = BatchState::Closed;
    l.record_upstream_leases("lot", &[lease(3, 1, 0, later)], "upstream").await.unwrap();
    l.mirror_batch(&m, "upstream").await.unwrap();
    assert_eq!(refused(request_licence(&l, "lot", &device(7), 0).await).0, RefusalReason::BatchClosed);

    // An install report, for replication below.
    l.report_install(InstallReport {
        station: "station-1".into(),
        result_id: "r-1".into(),
        batch_id: "lot".into(),
        device_id: device(1),
        status_code: 0,
        message: "installed".into(),
        flash_crc: Some(0xDEAD_BEEF),
        attempt: 1,
        timings_json: r#"{"install_ms":12}"#.into(),
        actor: "station-1".into(),
    })
    .await
    .unwrap();

    // Replication reads the whole chain in order, each record with its row.
    let (head, _) = l.audit_head().await.unwrap();
    let mut items = Vec::new();
    let mut after = 0;
    loop {
        let page = l.replication_page(after, 7).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.audit.seq;
        items.extend(page);
    }
    assert_eq!(items.len() as i64, head);
    assert!(items.windows(2).all(|w| w[1].audit.seq == w[0].audit.seq + 1 && w[1].audit.prev_hash == w[0].audit.hash));
    let licences: Vec<_> = items
        .iter()
        .filter_map(|i| match &i.item {
            Some(SiteItem::Licence(x)) => Some(x),
            _ => None,
        })
        .collect();
    assert_eq!(licences.len(), 4, "four devices licensed here");
    assert!(licences.iter().all(|x| x.batch_id == "lot" && x.site == SITE && x.licence.len() == 132));
    let refusals = items.iter().filter(|i| matches!(i.item, Some(SiteItem::Refusal(_)))).count();
    assert!(refusals >= 5, "{refusals}");
    let install = items.iter().find_map(|i| match &i.item {
        Some(SiteItem::Install(x)) => Some(x),
        _ => None,
    });
    let install = install.expect("the install report is replicated");
    assert_eq!((install.flash_crc, install.timings_json.as_str()), (Some(0xDEAD_BEEF), r#"{"install_ms":12}"#));
    for ev in [
        "batch.mirrored",
        "lease.acquired",
        "lease.withheld",
        "lease.returned",
        "lease.extended",
        "batch.mirror_changed",
    ] {
        assert!(items.iter().any(|i| i.audit.event == ev), "no {ev} record");
    }

    // The cursor only moves forward; the chain verifies.
    assert_eq!(l.upstream_acked().await.unwrap(), 0);
    l.set_upstream_acked(5).await.unwrap();
    l.set_upstream_acked(3).await.unwrap();
    assert_eq!(l.upstream_acked().await.unwrap(), 5);
    l.verify_audit().await.unwrap();
}

/// The one-chip-two-sites rule when the site that asked first is not the first to replicate: a device
/// claimed by a connected site and licensed offline by another is the offline site's conflict, and the
/// claiming site's licence, arriving later, is the one central keeps.
#[tokio::test]
async fn a_licence_for_a_device_another_site_claimed_is_the_conflict_whichever_arrives_first() {
    use flashgate_broker::ledger::leases::LeaseRequest;
    const A: &str = "spiffe://t/broker/site-a";
    const B: &str = "spiffe://t/broker/site-b";
    let dir = tempfile::tempdir().unwrap();
    let (l, _) = sqlite_ledger(&dir).await;
    seed(&l, "clm", 5, &[SITE, "austin"], (None, None)).await;
    let lease = |holder: &str, site: &str| LeaseRequest {
        batch_id: "clm".into(),
        site: site.into(),
        holder: holder.into(),
        units: 2,
        ttl: std::time::Duration::from_secs(600),
    };
    l.grant_lease(&lease(A, SITE), "central").await.unwrap();
    l.grant_lease(&lease(B, "austin"), "central").await.unwrap();
    assert!(l.claim_device("clm", &device(1), "austin", B).await.unwrap());
    let mut a = SiteChain::new([0xA5; 16]);
    a.licence("clm", &device(1), SITE);
    let r = l.replicate(A, SITE, &a.hex_id(), 1, &a.records).await.unwrap();
    assert_eq!((r.licences, r.conflicts), (0, 1), "{r:?}");
    assert_eq!(l.licence("clm", &device(1)).await.unwrap(), None, "no licence kept from the offline site");
    let mut b = SiteChain::new([0xB5; 16]);
    let kept = b.licence("clm", &device(1), "austin");
    let r = l.replicate(B, "austin", &b.hex_id(), 1, &b.records).await.unwrap();
    assert_eq!((r.licences, r.conflicts), (1, 0), "{r:?}");
    assert_eq!(l.licence("clm", &device(1)).await.unwrap(), Some(kept));
    let batch = l.batch("clm").await.unwrap();
    assert_eq!((batch.issued, batch.leased), (2, 2), "both units counted: {batch:?}");
    l.verify_audit().await.unwrap();
}
