//! Site brokers (issue 14), in-process over real mutual TLS: a central broker and a site broker with
//! its own soft HSM (the firmware key imported under the same id, as the key ceremony does) and its own
//! SQLite ledger, linked through a TCP link the test cuts ([`flashgate_tests::netcut`]).
//!
//! The site mirrors the batch, issues from quota leases it tops up, and replicates every licence to
//! central. Online, a device central holds from another site is refused (`LICENSED_AT_OTHER_SITE`).
//! Cut off, it keeps issuing from its lease until the lease expires, then new devices wait (`UNAVAILABLE`
//! saying the lease expired, nothing recorded; a device holding its licence still gets it back), and a device licensed offline that
//! central meanwhile licensed at another site becomes a conflict on sync, not a second licence. When the
//! link returns it takes a new lease and catches up; a revocation and the batch's closing at central
//! reach it within its refresh interval, and every lease ends accounted for (granted = used + returned).
//! Both audit chains verify.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use flashgate_broker::config::UpstreamSection;
use flashgate_proto::v1 as pb;
use flashgate_tests::broker::{BrokerSpec, Station, TestBroker, TestChip, TestPki, World, reason};
use flashgate_tests::netcut::NetCut;
use tonic::Status;

const KEY: [u8; 16] = [0x5a; 16];
const TTL: Duration = Duration::from_secs(2);

/// `IssueLicence`, waiting out the moments when the site has used its units and the top-up is on its way
/// (`UNAVAILABLE`: the device waits, as a station keeps it on its fixture).
async fn issue_when_leased(st: &Station, batch: &str, chip: &TestChip) -> Result<pb::IssueLicenceResponse, Status> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match st.issue(batch, chip).await {
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r,
        }
    }
}

async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn central_issued(central: &TestBroker) -> i64 {
    central.batch_status("lot").await.issued
}

/// The site broker mirrors "lot" and holds units of it.
async fn mirrored_with_lease(site: &TestBroker) -> bool {
    let r = site.admin().await.batch_status(pb::BatchStatusRequest { id: "lot".into() }).await;
    r.is_ok_and(|b| b.into_inner().quota > 0)
}

/// Every lease of "lot" at central is settled with granted = used + returned.
async fn leases_settled(central: &TestBroker) -> bool {
    let leases = central
        .admin()
        .await
        .list_leases(pb::ListLeasesRequest { batch_id: "lot".into() })
        .await
        .unwrap()
        .into_inner()
        .leases;
    !leases.is_empty() && leases.iter().all(|l| l.granted == l.used + l.returned && l.state == "settled")
}

async fn history(broker: &TestBroker, chip: &TestChip) -> pb::DeviceHistoryResponse {
    broker
        .admin()
        .await
        .device_history(pb::DeviceHistoryRequest { device_id: chip.device_id() })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_broker_issues_from_leases_through_a_cut_and_central_ends_with_every_licence() {
    let world = World::new();
    let central = world
        .start_broker(BrokerSpec {
            site_brokers: [("site-berlin".to_owned(), "berlin".to_owned())].into_iter().collect(),
            ..BrokerSpec::default()
        })
        .await;
    let key = central.import_key("fw", KEY, None).await;
    central.seed_batch_with_key("lot", &key.key_id, 16, &["berlin", "austin"]).await;
    let link = NetCut::start(central.addr()).await;
    let site = world
        .start_broker(BrokerSpec {
            name: "site-berlin".into(),
            identity: Some(TestPki::site_broker("berlin")),
            upstream: Some(UpstreamSection {
                site: "berlin".into(),
                endpoints: vec![link.url()],
                server_name: None,
                batches: vec!["lot".into()],
                lease_units: 6,
                low_water: 2,
                lease_ttl: TTL,
                refresh_interval: Duration::from_millis(200),
            }),
            ..BrokerSpec::default()
        })
        .await;
    site.import_key("fw", KEY, Some(&key.key_id)).await;

    // Online: the site mirrors the batch and its image, leases units and tops them up.
    until("the site mirrored the batch with a lease", || mirrored_with_lease(&site)).await;
    let st = site.station("berlin", 1).await;
    let mut at_site = Vec::new();
    for _ in 0..6 {
        let chip = world.chip();
        let r = issue_when_leased(&st, "lot", &chip).await.unwrap();
        chip.open(&r.licence).expect("the site's licence opens on the chip");
        at_site.push(chip);
    }
    let (_, image) = st.fetch_image(&site.batch_status("lot").await.image_sha256, 0).await.unwrap();
    assert!(!image.is_empty(), "the site serves central's image");
    until("central holds the site's six licences", || async { central_issued(&central).await == 6 }).await;
    let h = history(&central, &at_site[0]).await;
    assert_eq!(h.licences.len(), 1);
    assert_eq!(h.licences[0].site, "berlin", "{h:?}");

    // Online, a device central holds from another site is refused at the site, in words.
    let austin = central.station("austin", 1).await;
    let taken = world.chip();
    austin.issue("lot", &taken).await.unwrap();
    let e = st.issue("lot", &taken).await.unwrap_err();
    assert_eq!(reason(&e).as_deref(), Some("LICENSED_AT_OTHER_SITE"), "{e}");
    assert!(e.message().contains("austin"), "{e}");

    // Cut, with units left at the site: it issues from them, the first device offline also at austin.
    // (Topped up to 6 whenever 2 or fewer are left: at least 3 are left here.)
    until("the site topped its units up", || async {
        let b = site.batch_status("lot").await;
        b.quota - b.issued >= 3
    })
    .await;
    link.cut();
    let both = world.chip();
    let cut_at = Instant::now();
    let both_here = st.issue("lot", &both).await.is_ok();
    assert!(both_here, "issued offline from the lease");
    austin.issue("lot", &both).await.unwrap();
    let offline = world.chip();
    st.issue("lot", &offline).await.expect("still issuing offline from the lease");
    at_site.push(offline);
    // Past the lease's expiry (renewed at most at the cut, for TTL): units are left, yet new devices wait
    // (UNAVAILABLE, nothing recorded), saying why, since central may still have units for this site.
    tokio::time::sleep(TTL.saturating_sub(cut_at.elapsed()) + Duration::from_millis(500)).await;
    let expired = st.issue("lot", &world.chip()).await.unwrap_err();
    assert_eq!(expired.code(), tonic::Code::Unavailable, "{expired}");
    assert!(expired.message().contains("could not be renewed"), "{expired}");
    // A device holding its licence gets it back while the lease is expired (no unit is used).
    let again = st.issue("lot", &at_site[0]).await.unwrap();
    assert!(again.reissued);
    assert!(link.refused() > 0, "the site kept trying to reach central");

    // Restored: a new lease, issuing again, replication catches up.
    link.restore();
    let after = world.chip();
    issue_when_leased(&st, "lot", &after).await.unwrap();
    at_site.push(after);
    let site_licences = at_site.len() as i64 + i64::from(both_here);
    // Central: the site's licences, austin's two, and the conflict's unit (counted, not a licence).
    until("central caught up with the site", || async { central_issued(&central).await == site_licences + 2 }).await;
    let status = central.batch_status("lot").await;
    let berlin = status.sites.iter().find(|s| s.site == "berlin").expect("berlin in the batch status");
    assert!(berlin.leased > 0 && berlin.leased == status.leased, "units leased to berlin, unused: {status:?}");
    for chip in &at_site {
        let h = history(&central, chip).await;
        assert_eq!(h.licences.iter().map(|l| l.site.as_str()).collect::<Vec<_>>(), vec!["berlin"], "{h:?}");
    }
    if both_here {
        let h = history(&central, &both).await;
        assert_eq!(h.licences.len(), 1, "a conflict is never a second licence: {h:?}");
        assert_eq!(h.licences[0].site, "austin");
    }

    // A revocation at central reaches the site (until it does, the station may still license).
    let late = std::sync::atomic::AtomicI64::new(0);
    let revoked = TestPki::station("berlin", 2);
    central
        .admin()
        .await
        .revoke_station(pb::RevokeStationRequest {
            serial: world.pki.serial(&revoked),
            identity: revoked.to_uri(),
            reason: "stolen".into(),
            force: true,
        })
        .await
        .unwrap();
    until("the revocation reached the site", || async {
        match flashgate_proto::transport::connect(&site.url(), world.pki.client_tls(&revoked), None).await {
            Err(_) => true,
            Ok(ch) => {
                let st2 = Station::new(ch, revoked.clone());
                match st2.issue("lot", &world.chip()).await {
                    Ok(_) => {
                        late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        false
                    }
                    // Refused at the handshake (TLS alert certificate_revoked) or, on a connection opened
                    // before, by the request check.
                    Err(e) => {
                        reason(&e).as_deref() == Some("STATION_REVOKED")
                            || format!("{e:?}").contains("CertificateRevoked")
                    }
                }
            }
        }
    })
    .await;

    // Closing at central: the site refuses BATCH_CLOSED and hands back what it did not use.
    central
        .admin()
        .await
        .set_batch_state(pb::SetBatchStateRequest { id: "lot".into(), state: pb::BatchState::Closed as i32 })
        .await
        .unwrap();
    // Until the sync brings the change (within the refresh interval), the site may still license.
    until("the site refuses the closed batch", || async {
        match st.issue("lot", &world.chip()).await {
            Ok(_) => {
                late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                false
            }
            Err(e) => reason(&e).as_deref() == Some("BATCH_CLOSED"),
        }
    })
    .await;
    let site_licences = site_licences + late.into_inner();
    until("every lease is accounted for", || leases_settled(&central)).await;
    let status = central.batch_status("lot").await;
    assert_eq!((status.issued, status.leased), (site_licences + 2, 0), "{status:?}");
    // Per site: berlin's licences (its conflict apart), austin's two.
    let per_site: Vec<(&str, i64, i64, i64)> =
        status.sites.iter().map(|s| (s.site.as_str(), s.issued, s.leased, s.conflicts)).collect();
    assert_eq!(per_site, vec![("austin", 2, 0, 0), ("berlin", site_licences - 1, 0, 1)], "{status:?}");

    for b in [&central, &site] {
        let v = b.admin().await.verify_audit(pb::VerifyAuditRequest {}).await.unwrap().into_inner();
        assert!(v.ok, "{v:?}");
    }
}

fn site_upstream(central_url: String) -> UpstreamSection {
    UpstreamSection {
        site: "berlin".into(),
        endpoints: vec![central_url],
        server_name: None,
        batches: vec!["lot".into()],
        lease_units: 3,
        low_water: 1,
        lease_ttl: Duration::from_secs(30),
        refresh_interval: Duration::from_millis(200),
    }
}

/// A station configured with its site broker first and central second (`[broker] endpoints`) keeps
/// installing from central's own units while the site broker is down; the restarted site broker (same
/// ledger, keystore and address) carries on replicating, and no device holds two licences. Drained, the
/// site hands every unused unit back (its leases settle) and new devices wait; resumed, it licenses again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_falls_back_to_central_while_its_site_broker_is_down() {
    use flashgate_agent::broker_client::{BrokerClient, RetryPolicy};
    let world = World::new();
    let central = world
        .start_broker(BrokerSpec {
            site_brokers: [("site-berlin".to_owned(), "berlin".to_owned())].into_iter().collect(),
            ..BrokerSpec::default()
        })
        .await;
    let key = central.import_key("fw", KEY, None).await;
    central.seed_batch_with_key("lot", &key.key_id, 10, &["berlin"]).await;
    let site_spec = || BrokerSpec {
        name: "site-berlin".into(),
        identity: Some(TestPki::site_broker("berlin")),
        upstream: Some(site_upstream(central.url())),
        ..BrokerSpec::default()
    };
    let mut site = world.start_broker(site_spec()).await;
    site.import_key("fw", KEY, Some(&key.key_id)).await;
    until("the site mirrored the batch with a lease", || mirrored_with_lease(&site)).await;
    let client =
        BrokerClient::new(vec![site.url(), central.url()], world.pki.client_tls(&TestPki::station("berlin", 1)), None)
            .unwrap()
            .with_retry_policy(RetryPolicy {
                attempts: 3,
                initial: Duration::from_millis(100),
                max: Duration::from_millis(300),
            });
    let issue = |chip: &TestChip| pb::IssueLicenceRequest {
        batch_id: "lot".into(),
        chip_certificate: chip.cert_bytes(),
        probe: None,
    };

    let first = world.chip();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.issue_licence(issue(&first)).await {
            Ok(r) => {
                first.open(&r.licence).unwrap();
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the site broker never licensed: {e}"),
        }
    }
    assert_eq!(client.current_endpoint(), site.url(), "served by the site broker");
    until("central holds the site's licence", || async { central_issued(&central).await == 1 }).await;

    // The site broker goes down: the station's next device is licensed by central itself.
    let site_dir_spec = site.successor_spec("site-berlin");
    site.shutdown().await;
    let second = world.chip();
    let r = client.issue_licence(issue(&second)).await.expect("central licenses while the site broker is down");
    second.open(&r.licence).unwrap();
    assert_eq!(client.current_endpoint(), central.url(), "fell back to central");
    let h = history(&central, &second).await;
    assert_eq!(h.licences.len(), 1);

    // Back up on the same ledger and address: the first device's retry at the site is byte-identical.
    let site = world
        .start_broker(BrokerSpec {
            identity: Some(TestPki::site_broker("berlin")),
            upstream: Some(site_upstream(central.url())),
            ..site_dir_spec
        })
        .await;
    let st = site.station("berlin", 1).await;
    let again = issue_when_leased(&st, "lot", &first).await.unwrap();
    assert!(again.reissued, "{again:?}");
    // The install report of the device central licensed: the site broker never held it, so it answers
    // UNAVAILABLE (not a final refusal) and the station's client takes the report to central.
    let report = pb::ReportInstallRequest {
        batch_id: "lot".into(),
        device_id: second.device_id(),
        status_code: 0,
        message: "installed".into(),
        timings: Vec::new(),
        flash_crc: None,
        attempt: 1,
        probe: None,
        result_id: "r-second".into(),
    };
    let e = st.licences.clone().report_install(report.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    let fresh =
        BrokerClient::new(vec![site.url(), central.url()], world.pki.client_tls(&TestPki::station("berlin", 1)), None)
            .unwrap();
    assert!(fresh.report_install(report).await.unwrap(), "recorded at central");
    assert_eq!(central.batch_status("lot").await.installed, 1);
    let status = central.batch_status("lot").await;
    assert_eq!(status.issued, 2, "one licence per device across site and central: {status:?}");

    // Drained: the site hands its unused units back; its new devices wait (stations go to central).
    let drain = |resume| pb::DrainSiteRequest { batch_id: "lot".into(), resume };
    let e = central.admin().await.drain_site(drain(false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "central is no site broker: {e}");
    let r = site.admin().await.drain_site(drain(false)).await.unwrap().into_inner();
    assert!(r.drained, "{r:?}");
    until("the drained site's leases settle at central", || leases_settled(&central)).await;
    let e = st.issue("lot", &world.chip()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.message().contains("drained"), "{e}");
    assert_eq!(central.batch_status("lot").await.leased, 0);
    // Resumed: it takes units again.
    site.admin().await.drain_site(drain(true)).await.unwrap();
    issue_when_leased(&st, "lot", &world.chip()).await.expect("the resumed site licenses again");
    let v = site.admin().await.verify_audit(pb::VerifyAuditRequest {}).await.unwrap().into_inner();
    assert!(v.ok, "{v:?}");
}

/// At a site, running out of units is a wait while central may still grant some (units left there, or
/// leased to sites that may hand them back), and a refusal (`QUOTA_EXHAUSTED`) once central has none:
/// never more licences than the quota, and the last device is refused, not kept waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_waits_for_units_while_central_has_some_and_refuses_when_the_quota_is_spent() {
    let world = World::new();
    let central = world
        .start_broker(BrokerSpec {
            site_brokers: [("site-berlin".to_owned(), "berlin".to_owned())].into_iter().collect(),
            ..BrokerSpec::default()
        })
        .await;
    let key = central.import_key("fw", KEY, None).await;
    central.seed_batch_with_key("lot", &key.key_id, 3, &["berlin"]).await;
    let site = world
        .start_broker(BrokerSpec {
            name: "site-berlin".into(),
            identity: Some(TestPki::site_broker("berlin")),
            upstream: Some(UpstreamSection { lease_units: 2, low_water: 0, ..site_upstream(central.url()) }),
            ..BrokerSpec::default()
        })
        .await;
    site.import_key("fw", KEY, Some(&key.key_id)).await;
    let st = site.station("berlin", 1).await;
    let mut waited = 0;
    for _ in 0..3 {
        let chip = world.chip();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match st.issue("lot", &chip).await {
                Ok(_) => break,
                Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    waited += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("refused while central had units: {e}"),
            }
        }
    }
    assert!(waited > 0, "the third device waited for a second lease");
    let last = world.chip();
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        match st.issue("lot", &last).await {
            Ok(r) => panic!("a fourth licence for a quota of 3: {r:?}"),
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(reason(&e).as_deref(), Some("QUOTA_EXHAUSTED"), "{e}");
    until("central holds the three", || async { central_issued(&central).await == 3 }).await;
    let status = central.batch_status("lot").await;
    assert_eq!((status.issued, status.leased, status.remaining), (3, 0, 0), "{status:?}");
}
