//! Licence issuing end to end over mutual-TLS gRPC against an in-process broker (soft keystore,
//! SQLite ledger): an idempotent retry returns the byte-identical licence and consumes nothing, and
//! the licence opens on that chip only, giving the key and nonce that decrypt the batch's image;
//! 64 concurrent requesters on separate connections never get more than the quota (exactly 8
//! licences, 56 `QUOTA_EXHAUSTED`), and 16 concurrent requests for one chip all get one licence;
//! the audit chain verifies after issues and refusals, and an edit made directly in the SQLite
//! file is reported with the edited record's sequence number.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;

use flashgate_broker::hsm::PoolConfig;
use flashgate_common::sfi::decrypt_image;
use flashgate_proto::v1 as pb;
use flashgate_tests::broker::{BrokerSpec, L4_PRODUCT, SITES, STATIONS_PER_SITE, World, reason, sha256_hex};
use sqlx::Connection;
use tokio::sync::Barrier;
use tokio_stream::StreamExt;
use tonic::Code;

/// A pool that queues up to 64 requests instead of shedding, so every concurrent request reaches
/// the HSM and the ledger's commit (the race the quota must survive).
fn roomy_pool() -> PoolConfig {
    PoolConfig { max_in_flight: Some(64), ..PoolConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_returns_the_identical_licence_and_consumes_nothing() {
    let world = World::new();
    let broker = world.start_broker(BrokerSpec::default()).await;
    let seeded = broker.seed_batch("b-retry", 4, &["berlin"]).await;
    assert_eq!(seeded.batch.issued, 0);
    assert_eq!(seeded.batch.remaining, 4);
    let chip = world.chip();

    let st = broker.station("berlin", 1).await;
    let first = st.issue("b-retry", &chip).await.unwrap();
    assert!(!first.reissued);
    assert_eq!(first.licence.len(), 132);
    assert_eq!(first.device_id, chip.device_id());
    assert_eq!(first.key_id, seeded.key_id);
    assert_eq!(first.image_sha256, seeded.image.sha256);
    assert_eq!(first.image_size, seeded.image.size);
    assert_eq!(first.family, "stm32l4");
    assert_eq!(first.product_id, L4_PRODUCT);

    // The retry, from another station on another connection.
    let st2 = broker.station("berlin", 2).await;
    let second = st2.issue("b-retry", &chip).await.unwrap();
    assert!(second.reissued, "a retry must say it was reissued");
    assert_eq!(second.licence, first.licence, "a retry must return the byte-identical licence");
    assert_eq!(second.key_id, first.key_id);
    assert_eq!(second.image_sha256, first.image_sha256);
    // And once more on the first connection.
    let third = st.issue("b-retry", &chip).await.unwrap();
    assert!(third.reissued);
    assert_eq!(third.licence, first.licence);

    let status = broker.batch_status("b-retry").await;
    assert_eq!(status.issued, 1);
    assert_eq!(status.remaining, 3);

    // The chip opens it; the key and nonce decrypt the batch's image to what was packed.
    let (key, nonce) = chip.open(&first.licence).expect("the licence opens on its chip");
    let (info, bytes) = st.fetch_image(&first.image_sha256, 0).await.unwrap();
    assert_eq!(info.size, seeded.image.size);
    assert_eq!(sha256_hex(&bytes), seeded.image.sha256);
    let areas = decrypt_image(&key, &nonce, &bytes, None).expect("the recovered key decrypts the image");
    assert_eq!(areas, seeded.areas);
    // Another chip (same product, same vendor) cannot open it.
    assert!(world.chip().open(&first.licence).is_err());

    // The ledger's device history holds exactly that licence.
    let history = broker
        .admin()
        .await
        .device_history(pb::DeviceHistoryRequest { device_id: chip.device_id() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.licences.len(), 1);
    assert_eq!(history.licences[0].licence, first.licence);
    assert_eq!(history.licences[0].station, "spiffe://factory.test/site/berlin/station/1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requesters_never_exceed_the_quota() {
    let world = World::new();
    let broker = Arc::new(world.start_broker(BrokerSpec { pool: roomy_pool(), ..BrokerSpec::default() }).await);
    let seeded = broker.seed_batch("b-quota", 8, &["*"]).await;

    // 64 distinct chips, 64 separate connections from the 16 station identities, fired together.
    const N: usize = 64;
    let barrier = Arc::new(Barrier::new(N));
    let mut tasks = Vec::new();
    for i in 0..N {
        let site = SITES[i % SITES.len()];
        let n = (i / SITES.len()) as u32 % STATIONS_PER_SITE + 1;
        let station = broker.station(site, n).await;
        let chip = world.chip();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            (chip.clone(), station.issue("b-quota", &chip).await)
        }));
    }
    let mut issued = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            (chip, Ok(r)) => {
                assert!(!r.reissued);
                chip.open(&r.licence).expect("every licence returned opens on its chip");
                issued.push(r);
            }
            (_, Err(s)) => {
                assert_eq!(reason(&s).as_deref(), Some("QUOTA_EXHAUSTED"), "unexpected failure: {s:?}");
                assert_eq!(s.code(), Code::ResourceExhausted);
                refused += 1;
            }
        }
    }
    assert_eq!(issued.len(), 8, "exactly the quota is issued");
    assert_eq!(refused, N - 8);
    let devices: HashSet<_> = issued.iter().map(|r| r.device_id.clone()).collect();
    assert_eq!(devices.len(), 8);
    let status = broker.batch_status("b-quota").await;
    assert_eq!(status.issued, 8);
    assert_eq!(status.remaining, 0);
    assert_eq!(status.quota, 8);

    // 16 concurrent first requests for ONE chip: one licence, everyone gets its bytes.
    let one = broker.create_batch("b-one", &seeded.image.sha256, 8, &["*"]).await;
    assert_eq!(one.issued, 0);
    let chip = world.chip();
    let barrier = Arc::new(Barrier::new(16));
    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let station = broker.station(SITES[(i % 2) as usize], i / 2 + 1).await;
        let (chip, barrier) = (chip.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            station.issue("b-one", &chip).await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap().expect("every request for one chip succeeds"));
    }
    let distinct: HashSet<_> = answers.iter().map(|r| r.licence.clone()).collect();
    assert_eq!(distinct.len(), 1, "every requester gets the same licence bytes");
    assert_eq!(answers.iter().filter(|r| !r.reissued).count(), 1, "exactly one request issued it");
    chip.open(&answers[0].licence).unwrap();
    let status = broker.batch_status("b-one").await;
    assert_eq!(status.issued, 1);
    assert_eq!(status.remaining, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_chain_verifies_and_a_direct_edit_is_reported() {
    let world = World::new();
    let broker = world.start_broker(BrokerSpec::default()).await;
    broker.seed_batch("b-audit", 2, &["berlin"]).await;
    let st = broker.station("berlin", 1).await;
    // Issues, a retry, and refusals of several kinds.
    let first = world.chip();
    st.issue("b-audit", &first).await.unwrap();
    st.issue("b-audit", &world.chip()).await.unwrap();
    assert!(st.issue("b-audit", &first).await.unwrap().reissued);
    assert_eq!(reason(&st.issue("b-audit", &world.chip()).await.unwrap_err()).as_deref(), Some("QUOTA_EXHAUSTED"));
    assert_eq!(
        reason(&st.issue("b-audit", &world.forged_chip()).await.unwrap_err()).as_deref(),
        Some("CERT_UNVERIFIED")
    );
    let austin = broker.station("austin", 1).await;
    assert_eq!(reason(&austin.issue("b-audit", &world.chip()).await.unwrap_err()).as_deref(), Some("SITE_NOT_ALLOWED"));

    let mut admin = broker.admin().await;
    let v = admin.verify_audit(pb::VerifyAuditRequest {}).await.unwrap().into_inner();
    assert!(v.ok, "fresh chain must verify: {v:?}");
    assert!(v.records >= 8, "{v:?}");
    assert_eq!(v.head_seq, v.records);
    assert_eq!(v.head_hash.len(), 64);

    let records: Vec<pb::AuditRecord> = admin
        .export_audit(pb::ExportAuditRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap();
    assert_eq!(records.len() as i64, v.records);
    assert_eq!(records.last().unwrap().hash, v.head_hash);
    let events: Vec<&str> = records.iter().map(|r| r.event.as_str()).collect();
    for e in ["key.added", "image.added", "batch.created", "licence.issued", "licence.refused"] {
        assert!(events.contains(&e), "no {e} record in {events:?}");
    }
    assert_eq!(events.iter().filter(|e| **e == "licence.issued").count(), 2);
    let refusals: Vec<&pb::AuditRecord> = records.iter().filter(|r| r.event == "licence.refused").collect();
    for want in ["QUOTA_EXHAUSTED", "CERT_UNVERIFIED", "SITE_NOT_ALLOWED"] {
        assert!(refusals.iter().any(|r| r.details_json.contains(want)), "no refusal record with {want}");
    }
    let target = records.iter().find(|r| r.event == "licence.issued").unwrap();
    assert_eq!(target.actor, "spiffe://factory.test/site/berlin/station/1");

    // Edit that record directly in the SQLite file, behind the broker's back.
    let path = broker.ledger_url().strip_prefix("sqlite://").unwrap().to_owned();
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{path}")).await.unwrap();
    let changed = sqlx::query("UPDATE audit SET actor = $1 WHERE seq = $2")
        .bind("spiffe://factory.test/site/austin/station/2")
        .bind(target.seq)
        .execute(&mut conn)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(changed, 1);
    conn.close().await.unwrap();

    let v = admin.verify_audit(pb::VerifyAuditRequest {}).await.unwrap().into_inner();
    assert!(!v.ok, "an edited record must break verification: {v:?}");
    assert_eq!(v.broken_seq, target.seq, "the edited record is named: {v:?}");
    assert!(!v.fault.is_empty());
}

/// Quota leases over `SiteService` (issue 14): a site broker named in `[site_brokers]` gets a lease for
/// its own site, which shows in `BatchStatus` (leased, not in remaining) and `ListLeases` and keeps
/// stations from the leased units; it hands units back. Admins, stations and unlisted brokers are
/// refused, and bad ids are named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_brokers_lease_quota_and_stations_are_kept_from_it() {
    use flashgate_proto::v1::site_service_client::SiteServiceClient;
    use flashgate_tests::broker::TestPki;
    let world = World::new();
    let spec = BrokerSpec {
        site_brokers: [("broker-1".to_owned(), "berlin".to_owned())].into_iter().collect(),
        ..BrokerSpec::default()
    };
    let broker = world.start_broker(spec).await;
    broker.seed_batch("lot", 5, &["berlin"]).await;
    let mut site = SiteServiceClient::new(broker.channel(&TestPki::broker()).await);
    let ask = |units: i64| pb::AcquireLeaseRequest { batch_id: "lot".into(), units, ttl_ms: 60_000 };
    let grant = site.acquire_lease(ask(3)).await.unwrap().into_inner();
    let lease = grant.lease.unwrap();
    assert_eq!((lease.granted, lease.site.as_str()), (3, "berlin"));
    assert_eq!(lease.holder, "spiffe://factory.test/broker/broker-1");
    assert_eq!(grant.batch.unwrap().leased, 3);
    let status = broker.batch_status("lot").await;
    assert_eq!((status.issued, status.leased, status.remaining), (0, 3, 2), "{status:?}");
    let mut admin = broker.admin().await;
    let listed = admin.list_leases(pb::ListLeasesRequest { batch_id: "lot".into() }).await.unwrap().into_inner();
    assert_eq!(listed.leases.len(), 1);
    assert_eq!((listed.leases[0].id.as_str(), listed.leases[0].outstanding), (lease.id.as_str(), 3));
    let e = admin.list_leases(pb::ListLeasesRequest { batch_id: "a/b".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // Stations get the 2 units left; then a device waits (UNAVAILABLE, nothing recorded: the leased units
    // may come back) naming the leased units. A second lease is refused QUOTA_EXHAUSTED.
    let st = broker.station("berlin", 1).await;
    for _ in 0..2 {
        st.issue("lot", &world.chip()).await.unwrap();
    }
    let e = st.issue("lot", &world.chip()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("leased 3") && e.message().contains("waits"), "{e}");
    let e = site.acquire_lease(ask(1)).await.unwrap_err();
    assert_eq!(reason(&e).as_deref(), Some("QUOTA_EXHAUSTED"), "{e}");

    // Renewed while connected: the expiry moves; a bad ttl is named.
    let renewed = site
        .renew_lease(pb::RenewLeaseRequest { lease_id: lease.id.clone(), ttl_ms: 3_600_000 })
        .await
        .unwrap()
        .into_inner();
    assert!(renewed.expires_at_ms > lease.expires_at_ms, "{renewed:?}");
    let e = site.renew_lease(pb::RenewLeaseRequest { lease_id: lease.id.clone(), ttl_ms: 10 }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // Units handed back go to stations again.
    let back = site.return_lease(pb::ReturnLeaseRequest { lease_id: lease.id.clone(), units: 2 }).await.unwrap();
    assert_eq!(back.into_inner().outstanding, 1);
    st.issue("lot", &world.chip()).await.unwrap();
    let e = site.return_lease(pb::ReturnLeaseRequest { lease_id: lease.id.clone(), units: 5 }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = site.return_lease(pb::ReturnLeaseRequest { lease_id: "xyz".into(), units: 1 }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // Only listed site brokers: an admin and a station are the wrong role; an unlisted broker is named.
    let mut as_admin = SiteServiceClient::new(broker.channel(&TestPki::admin()).await);
    let e = as_admin.acquire_lease(ask(1)).await.unwrap_err();
    assert_eq!(reason(&e).as_deref(), Some("NOT_AUTHORISED"), "{e}");
    let mut as_station = SiteServiceClient::new(broker.channel(&TestPki::station("berlin", 1)).await);
    assert_eq!(reason(&as_station.acquire_lease(ask(1)).await.unwrap_err()).as_deref(), Some("NOT_AUTHORISED"));
    let other = world.start_broker(BrokerSpec::default()).await;
    let mut unlisted = SiteServiceClient::new(other.channel(&TestPki::broker()).await);
    let e = unlisted.acquire_lease(ask(1)).await.unwrap_err();
    assert_eq!(reason(&e).as_deref(), Some("NOT_AUTHORISED"), "{e}");
    assert!(e.message().contains("[site_brokers]"), "{e}");
}

/// The rest of `SiteService` over mutual TLS (issue 14): a site broker syncs its batches, leases and the
/// revocations; fetches its batch's image (info first, then chunks of at most 64 KiB that hash to the
/// image id); claims a device; replicates a licence record, whose unit moves from leased to issued; a
/// broken record is FAILED_PRECONDITION naming its seq; `ListSites` shows the stream and the audit
/// chain still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_brokers_sync_fetch_images_claim_and_replicate() {
    use flashgate_proto::v1::site_service_client::SiteServiceClient;
    use flashgate_tests::broker::TestPki;
    use sha2::{Digest, Sha256};
    let world = World::new();
    let spec = BrokerSpec {
        site_brokers: [("broker-1".to_owned(), "berlin".to_owned())].into_iter().collect(),
        ..BrokerSpec::default()
    };
    let broker = world.start_broker(spec).await;
    let seeded = broker.seed_batch("lot", 5, &["berlin"]).await;
    let mut site = SiteServiceClient::new(broker.channel(&TestPki::broker()).await);
    let lease = site
        .acquire_lease(pb::AcquireLeaseRequest { batch_id: "lot".into(), units: 2, ttl_ms: 60_000 })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    let ledger_id = "5e".repeat(16);
    let sync = |ids: Vec<String>, head: i64| pb::SyncSiteRequest {
        batch_ids: ids,
        site_ledger_id: ledger_id.clone(),
        site_head_seq: head,
    };
    let s = site.sync_site(sync(vec!["lot".into(), "unknown".into()], 1)).await.unwrap().into_inner();
    assert_eq!(s.batches.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(), ["lot"]);
    assert_eq!((s.leases.len(), s.replicated_seq, s.site_ledger_id.as_str()), (1, 0, ledger_id.as_str()));
    assert!(s.now_ms > 0);
    let e = site.sync_site(sync((0..65).map(|i| format!("b{i}")).collect(), 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("64"), "{e}");

    // The image: info first, then chunks.
    let mut stream = site
        .get_site_image(pb::GetSiteImageRequest { image_sha256: seeded.image.sha256.clone() })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    let Some(pb::site_image_chunk::Item::Info(info)) = first.item else { panic!("info first: {first:?}") };
    assert_eq!((info.image_sha256.as_str(), info.nonce.len()), (seeded.image.sha256.as_str(), 24));
    let mut bytes = Vec::new();
    while let Some(m) = stream.next().await {
        let Some(pb::site_image_chunk::Item::Chunk(c)) = m.unwrap().item else { panic!("chunks after the info") };
        assert!(c.len() <= 64 * 1024);
        bytes.extend_from_slice(&c);
    }
    assert_eq!((bytes.len() as u64, sha256_hex(&bytes)), (info.size, seeded.image.sha256.clone()));

    // A claim, then the site's licence of that device replicated.
    let device = "ab".repeat(16);
    let claim = pb::ClaimDeviceRequest { batch_id: "lot".into(), device_id: device.clone() };
    assert!(site.claim_device(claim.clone()).await.unwrap().into_inner().claimed);
    assert!(!site.claim_device(claim).await.unwrap().into_inner().claimed);
    let licence = vec![0x4c; 132];
    let details = serde_json::json!({"station": "spiffe://factory.test/station/berlin/1", "site": "berlin",
        "licence_sha256": hex::encode(Sha256::digest(&licence))})
    .to_string();
    let mut id = [0u8; 16];
    hex::decode_to_slice(&ledger_id, &mut id).unwrap();
    let prev = flashgate_common::audit::genesis_hash(&id);
    let subject = format!("batch/lot/device/{device}");
    let h = flashgate_common::audit::record_hash(&prev, 1, 1000, "site", "licence.issued", &subject, &details);
    let record = pb::SiteRecord {
        audit: Some(pb::AuditRecord {
            seq: 1,
            at_ms: 1000,
            actor: "site".into(),
            event: "licence.issued".into(),
            subject,
            details_json: details,
            prev_hash: hex::encode(prev),
            hash: hex::encode(h),
        }),
        item: Some(pb::site_record::Item::Licence(pb::SiteLicence {
            batch_id: "lot".into(),
            device_id: device.clone(),
            licence,
            certificate: vec![0xC5; 136],
            station: "spiffe://factory.test/station/berlin/1".into(),
            site: "berlin".into(),
            issued_at_ms: 1000,
        })),
    };
    let mut edited = record.clone();
    edited.audit.as_mut().unwrap().at_ms = 1001;
    let replicate = |records: Vec<pb::SiteRecord>| pb::ReplicateRequest {
        site_ledger_id: ledger_id.clone(),
        records,
        site_head_seq: 1,
    };
    let e = site.replicate(replicate(vec![edited])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("seq 1"), "{e}");
    for _ in 0..2 {
        let r = site.replicate(replicate(vec![record.clone()])).await.unwrap().into_inner();
        assert_eq!((r.acked_seq, r.conflicts), (1, 0));
    }
    let status = broker.batch_status("lot").await;
    assert_eq!((status.issued, status.leased), (1, 1), "{status:?}");
    let s = site.sync_site(sync(vec!["lot".into()], 1)).await.unwrap().into_inner();
    assert_eq!(s.replicated_seq, 1);
    assert_eq!((s.leases[0].id.as_str(), s.leases[0].used), (lease.id.as_str(), 1));

    let mut admin = broker.admin().await;
    let sites = admin.list_sites(pb::ListSitesRequest {}).await.unwrap().into_inner().sites;
    assert_eq!(sites.len(), 1);
    let x = &sites[0];
    assert_eq!((x.site.as_str(), x.acked_seq, x.lag_records, x.licences, x.outstanding_units), ("berlin", 1, 0, 1, 1));
    admin.verify_audit(pb::VerifyAuditRequest {}).await.unwrap();
}
