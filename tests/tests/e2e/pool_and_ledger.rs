//! The broker's HSM pool and shared ledger under load, end to end over mutual TLS:
//!
//! - a pool of two members holding the same imported key (through `AdminService.ImportKey`): one
//!   member is "unplugged" halfway through 200 licence requests from 16 concurrent stations, and
//!   not one request fails; every licence opens on its chip with the imported key, `HsmStatus`
//!   shows the member unhealthy (and healthy again once plugged back);
//! - two in-process brokers, each with its own soft HSM holding the same key under the same key id
//!   (`ImportKey` with `key_id`), on one throwaway PostgreSQL ledger: 64 concurrent requests split
//!   across both never exceed the shared quota of 8, and a device licensed at one broker gets the
//!   identical licence back from the other. Skipped without PostgreSQL unless
//!   `FLASHGATE_REQUIRE_POSTGRES=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flashgate_broker::hsm::{HsmBackend, PoolConfig, SoftHsm};
use flashgate_common::sfi::FirmwareKey;
use flashgate_proto::v1 as pb;
use flashgate_tests::broker::{BrokerSpec, SITES, STATIONS_PER_SITE, TestBroker, World, fast_kdf, reason};
use flashgate_tests::hsm::Switchable;
use flashgate_tests::pg::PgCluster;
use tokio::sync::Barrier;
use tonic::Code;
use zeroize::Zeroizing;

fn soft(dir: &std::path::Path, name: &str) -> Arc<dyn HsmBackend> {
    Arc::new(SoftHsm::create(&dir.join(format!("{name}.fgks")), &Zeroizing::new("e2e".into()), fast_kdf()).unwrap())
}

async fn hsm_members(broker: &TestBroker) -> Vec<pb::HsmMember> {
    broker.admin().await.hsm_status(pb::HsmStatusRequest {}).await.unwrap().into_inner().members
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_member_pulled_mid_run_fails_no_request() {
    let world = World::new();
    let keys = tempfile::tempdir().unwrap();
    let a = Switchable::new("soft-a", soft(keys.path(), "a"));
    let b = Switchable::new("soft-b", soft(keys.path(), "b"));
    // Each operation takes a little while, so requests are in flight on both members when one goes.
    a.set_delay(Duration::from_millis(3));
    b.set_delay(Duration::from_millis(3));
    let pool = PoolConfig {
        max_in_flight: Some(64),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        ..PoolConfig::default()
    };
    let members: Vec<Arc<dyn HsmBackend>> = vec![a.clone(), b.clone()];
    let broker = world.start_broker(BrokerSpec { members: Some(members), pool, ..BrokerSpec::default() }).await;

    // A two-member pool cannot generate a key (the members would differ); the key is imported.
    let e = broker.admin().await.generate_key(pb::GenerateKeyRequest { label: "fw-gen".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let key = [0x3C; 16];
    let info = broker.import_key("fw-pool", key, None).await;
    let seeded = broker.seed_batch_with_key("b-pool", &info.key_id, 1000, &["*"]).await;

    const STATIONS: usize = 16;
    const TOTAL: usize = 200;
    let started = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..STATIONS {
        let station = broker.station(SITES[i % 2], (i / 2) as u32 % STATIONS_PER_SITE + 1).await;
        let (world, started, completed, a) = (world.clone(), started.clone(), completed.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            while started.fetch_add(1, Ordering::SeqCst) < TOTAL {
                let chip = world.chip();
                let r = station.issue("b-pool", &chip).await;
                if completed.fetch_add(1, Ordering::SeqCst) + 1 == TOTAL / 2 {
                    a.unplug();
                }
                results.push((chip, r));
            }
            results
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.unwrap());
    }
    assert_eq!(results.len(), TOTAL);
    let failures: Vec<String> =
        results.iter().filter_map(|(_, r)| r.as_ref().err()).map(|s| format!("{s:?}")).collect();
    assert!(
        failures.is_empty(),
        "{} of {TOTAL} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    let mut devices = HashSet::new();
    for (chip, r) in &results {
        let r = r.as_ref().unwrap();
        assert!(!r.reissued);
        let (k, _) = chip.open(&r.licence).expect("every licence opens on its chip");
        assert_eq!(k, FirmwareKey::new(key), "every licence carries the imported key");
        devices.insert(r.device_id.clone());
    }
    assert_eq!(devices.len(), TOTAL);
    assert_eq!(broker.batch_status("b-pool").await.issued, TOTAL as i64);
    assert_eq!(seeded.batch.quota, 1000);
    // Both members worked; every licence came from exactly one of them.
    assert!(a.licences_issued() > 0 && b.licences_issued() > 0, "a {} b {}", a.licences_issued(), b.licences_issued());
    assert_eq!(a.licences_issued() + b.licences_issued(), TOTAL as u64);

    let members = hsm_members(&broker).await;
    let ma = members.iter().find(|m| m.name == "soft-a").unwrap();
    let mb = members.iter().find(|m| m.name == "soft-b").unwrap();
    assert!(!ma.healthy, "the pulled member must be reported unhealthy: {ma:?}");
    assert!(ma.last_error.contains("unplugged"), "{ma:?}");
    assert!(ma.device_errors >= 1, "requests must have failed over from the pulled member: {ma:?}");
    assert!(mb.healthy, "{mb:?}");
    assert!(mb.device_errors == 0, "{mb:?}");

    // Plugged back, the pool's probes bring it back.
    a.plug();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if hsm_members(&broker).await.iter().any(|m| m.name == "soft-a" && m.healthy) {
            break;
        }
        assert!(Instant::now() < deadline, "the member never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_on_one_postgres_never_exceed_a_shared_quota() {
    let Some(pg) = PgCluster::start() else { return };
    let url = pg.create_db("flashgate_e2e");
    let world = World::new();
    let keys = tempfile::tempdir().unwrap();
    let roomy = || PoolConfig { max_in_flight: Some(64), ..PoolConfig::default() };
    let spec = |name: &str, member: Arc<dyn HsmBackend>| BrokerSpec {
        name: name.into(),
        ledger_url: Some(url.clone()),
        members: Some(vec![member]),
        pool: roomy(),
        ..BrokerSpec::default()
    };
    let one = world.start_broker(spec("broker-a", soft(keys.path(), "a"))).await;
    let two = world.start_broker(spec("broker-b", soft(keys.path(), "b"))).await;

    // The key ceremony: the same key under the same id into each broker's HSM.
    let key = [0x77; 16];
    let info = one.import_key("fw-shared", key, None).await;
    let info2 = two.import_key("fw-shared", key, Some(&info.key_id)).await;
    assert_eq!(info2.key_id, info.key_id);
    let seeded = one.seed_batch_with_key("b-shared", &info.key_id, 8, &["*"]).await;
    assert_eq!(two.batch_status("b-shared").await.quota, 8, "the second broker sees the batch");

    const N: usize = 64;
    let barrier = Arc::new(Barrier::new(N));
    let mut tasks = Vec::new();
    for i in 0..N {
        let broker = if i % 2 == 0 { &one } else { &two };
        let station = broker.station(SITES[(i / 2) % 2], (i / 4) as u32 % STATIONS_PER_SITE + 1).await;
        let (chip, barrier) = (world.chip(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            (i, chip.clone(), station.issue("b-shared", &chip).await)
        }));
    }
    let mut issued = Vec::new();
    for t in tasks {
        let (i, chip, r) = t.await.unwrap();
        match r {
            Ok(r) => {
                assert_eq!(chip.open(&r.licence).unwrap().0, FirmwareKey::new(key));
                issued.push((i, chip, r));
            }
            Err(s) => {
                assert_eq!(reason(&s).as_deref(), Some("QUOTA_EXHAUSTED"), "unexpected failure: {s:?}");
                assert_eq!(s.code(), Code::ResourceExhausted);
            }
        }
    }
    assert_eq!(issued.len(), 8, "two brokers together issued {} licences for a quota of 8", issued.len());
    for b in [&one, &two] {
        let s = b.batch_status("b-shared").await;
        assert_eq!((s.issued, s.remaining), (8, 0));
    }
    assert_eq!(seeded.image.sha256, two.batch_status("b-shared").await.image_sha256);

    // A device licensed at one broker gets the identical licence from the other.
    let (i, chip, first) = &issued[0];
    let other = if i % 2 == 0 { &two } else { &one };
    let again = other.station("berlin", 1).await.issue("b-shared", chip).await.unwrap();
    assert!(again.reissued);
    assert_eq!(&again.licence, &first.licence);

    // One audit chain for both brokers, intact.
    let v = two.admin().await.verify_audit(pb::VerifyAuditRequest {}).await.unwrap().into_inner();
    assert!(v.ok, "{v:?}");
    let (mut one, mut two) = (one, two);
    one.shutdown().await;
    two.shutdown().await;
    drop(pg);
}
