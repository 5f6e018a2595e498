//! The broker as a service, end to end over mutual TLS: `GetImage` streams `ImageInfo` then chunks
//! of at most 64 KiB and resumes from any offset (the bytes from an offset are the image's tail;
//! an offset past the end is `OUT_OF_RANGE`); the gRPC health service reports every Flashgate
//! service SERVING; and a graceful shutdown lets the licence requests in flight when it is called
//! finish successfully, durably committed, while new connections are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use flashgate_broker::config::LimitsConfig;
use flashgate_broker::hsm::{HsmBackend, PoolConfig, SoftHsm};
use flashgate_broker::ledger::Ledger;
use flashgate_proto::transport;
use flashgate_tests::broker::{BrokerSpec, TestPki, World, fast_kdf, sha256_hex};
use flashgate_tests::hsm::Switchable;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use zeroize::Zeroizing;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_stream_resumes_from_an_offset() {
    let world = World::new();
    let broker = world.start_broker(BrokerSpec::default()).await;
    let key = broker.generate_key("fw-big").await;
    // Larger than two stream chunks, with an odd tail.
    let (image, _) = broker.pack_image(&key.key_id, 150 * 1024 + 77, 1).await;
    broker.create_batch("b-img", &image.sha256, 1, &["austin"]).await;
    let st = broker.station("austin", 2).await;

    let (info, whole) = st.fetch_image(&image.sha256, 0).await.unwrap();
    assert_eq!(info.size, image.size);
    assert_eq!(whole.len() as u64, image.size);
    assert_eq!(sha256_hex(&whole), image.sha256);
    for offset in [1u64, 65_536, 70_001, image.size - 1, image.size] {
        let (info, tail) = st.fetch_image(&image.sha256, offset).await.unwrap();
        assert_eq!(info.size, image.size, "ImageInfo always gives the whole size");
        assert_eq!(tail, whole[offset as usize..], "bytes from offset {offset}");
    }
    let e = st.fetch_image(&image.sha256, image.size + 1).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let e = st.fetch_image(&"0".repeat(64), 0).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_reports_serving() {
    let world = World::new();
    let broker = world.start_broker(BrokerSpec::default()).await;
    for id in [TestPki::station("berlin", 1), TestPki::admin()] {
        let mut health = HealthClient::new(broker.channel(&id).await);
        for service in ["", "flashgate.v1.LicenceService", "flashgate.v1.ImageService", "flashgate.v1.AdminService"] {
            let reply: HealthCheckResponse =
                health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
            assert_eq!(reply.status(), ServingStatus::Serving, "service {service:?} as {}", id.to_uri());
        }
        let e = health.check(HealthCheckRequest { service: "no.such.Service".into() }).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_completes_requests_in_flight() {
    let world = World::new();
    let keys = tempfile::tempdir().unwrap();
    let soft: Arc<dyn HsmBackend> =
        Arc::new(SoftHsm::create(&keys.path().join("k.fgks"), &Zeroizing::new("e2e".into()), fast_kdf()).unwrap());
    // Room for every request below to run in the member at once.
    let slow = Switchable::with_capacity("slow-soft", soft, 8);
    let spec = BrokerSpec {
        members: Some(vec![slow.clone() as Arc<dyn HsmBackend>]),
        pool: PoolConfig { max_in_flight: Some(16), ..PoolConfig::default() },
        limits: LimitsConfig { shutdown_grace: Duration::from_secs(10), ..LimitsConfig::default() },
        ..BrokerSpec::default()
    };
    let mut broker = world.start_broker(spec).await;
    broker.seed_batch("b-stop", 100, &["*"]).await;
    let url = broker.url();
    let ledger_url = broker.ledger_url().to_owned();

    // Six requests on six connections, each held in the HSM for 400 ms.
    const N: usize = 6;
    slow.set_delay(Duration::from_millis(400));
    let mut tasks = Vec::new();
    for i in 0..N {
        let station = broker.station(if i % 2 == 0 { "berlin" } else { "austin" }, (i / 2) as u32 + 1).await;
        let chip = world.chip();
        tasks.push(tokio::spawn(async move { (chip.clone(), station.issue("b-stop", &chip).await) }));
    }
    // Wait until all of them are inside the HSM.
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.running().state().pool().status().iter().map(|m| m.in_flight).sum::<usize>() < N {
        assert!(Instant::now() < deadline, "requests never reached the HSM");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let t = Instant::now();
    broker.shutdown().await;
    let took = t.elapsed();
    let mut licences = Vec::new();
    for task in tasks {
        let (chip, r) = task.await.unwrap();
        let r = r.unwrap_or_else(|s| panic!("a request in flight at shutdown failed: {s:?}"));
        chip.open(&r.licence).unwrap();
        licences.push((chip, r));
    }
    assert!(took >= Duration::from_millis(100), "shutdown returned before the requests finished ({took:?})");

    // Stopped: new connections are refused.
    let tls = world.pki.client_tls(&TestPki::station("berlin", 1));
    assert!(transport::connect(&url, tls, None).await.is_err(), "the broker still accepts connections");

    // Every answered licence was committed durably.
    let ledger = Ledger::open(&ledger_url).await.unwrap();
    assert_eq!(ledger.batch("b-stop").await.unwrap().issued, N as i64);
    for (chip, r) in &licences {
        assert_eq!(ledger.licence("b-stop", &chip.device_id()).await.unwrap().as_deref(), Some(&r.licence[..]));
    }
    ledger.close().await;
}
