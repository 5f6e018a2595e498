//! The broker stopped in the middle of a batch and started again on the same ledger file, the same
//! HSM keystore and the same port, while the station agent keeps installing on a real-time
//! simulated line (three installs in flight when the broker stops, three more probes waiting for
//! a slot). Devices already licensed finish their installs; their results wait in the journal and
//! the reporter delivers them after the restart. Devices whose `IssueLicence` found no broker are not
//! failed: nothing is written to the chip or journalled, they wait on their fixtures ("waiting for
//! broker") and are tried again, without using up their attempts, until the new broker answers. In
//! the end: every device is installed at its first attempt with the expected CRC, the journal holds
//! exactly one result per device, all reported, every one at the broker exactly once (by result
//! id), no device holds two licences, and the batch's counts are the journal's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use flashgate_agent::broker_client::RetryPolicy;
use flashgate_agent::journal::EntryState;
use flashgate_agent::pipeline::StageEvent;
use flashgate_agent::runner::{RunEvent, RunOptions};
use flashgate_common::cert::VendorCa;
use flashgate_proto::v1 as pb;
use flashgate_sim::Simulator;
use flashgate_tests::agent::{
    StationSpec, TestStation, check_outcomes, fast_client, once_per_probe, seed_sized, sim_config, tcp_probes,
};
use flashgate_tests::broker::{BrokerSpec, World};

const TARGETS: usize = 6;
const IN_FLIGHT: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarted_mid_batch_loses_and_duplicates_nothing() {
    let vendor = VendorCa::generate(&mut rand::rngs::OsRng);
    let mut cfg = sim_config(&vendor, TARGETS);
    cfg.speed = 1.0; // 115200 baud in real time: an 8 KiB install takes most of a second
    let sim = Simulator::start(cfg).await.unwrap();
    let world = World::with_vendor(vendor);
    let mut broker = world.start_broker(BrokerSpec::default()).await;
    let seeded = seed_sized(&broker, "b-restart", 10, &["berlin"], 8 * 1024, 6).await;
    let crc = seeded.image.expected_flash_crc.unwrap();

    // Broker calls give up quickly (two rounds), so a licence request that finds no broker comes
    // back unreachable while the broker is down and the device waits for it.
    let spec = StationSpec {
        retry: RetryPolicy { attempts: 2, initial: Duration::from_millis(100), max: Duration::from_millis(200) },
        rpc_timeout: Duration::from_secs(5),
        bootloader: flashgate_agent::bootloader::ClientConfig { line_baud: Some(115_200), ..fast_client() },
        ..StationSpec::new(vec![broker.url()])
    };
    let station = TestStation::new(&world, spec);
    let opts = RunOptions {
        max_parallel: IN_FLIGHT,
        max_attempts: 1,
        poll_interval: Duration::from_millis(250),
        ..once_per_probe("b-restart")
    };
    let mut run = station.spawn_run(tcp_probes(&sim, "sim"), opts);

    // Three installs streaming ciphertext: stop the broker under them.
    let mut streaming = HashSet::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while streaming.len() < IN_FLIGHT {
        let e = tokio::time::timeout_at(deadline, run.events.recv()).await.expect("installs in flight").unwrap();
        if let RunEvent::Stage { probe, event: StageEvent::Install { done, .. }, .. } = &e
            && *done > 0
        {
            streaming.insert(probe.clone());
        }
        events.push(e);
    }
    let t = Instant::now();
    broker.shutdown().await;
    eprintln!("broker stopped in {:?} with {streaming:?} streaming", t.elapsed());
    let down = Instant::now();
    // Down long enough for the waiting probes' licence requests to find no broker (each gives up
    // after two rounds) and for the streaming installs to finish with no broker to report to.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let failed_meanwhile = station.entries().iter().filter(|(e, _)| e.result.status_code != 0).count();
    assert_eq!(failed_meanwhile, 0, "a device without a broker was journalled as failed");
    let unreported_meanwhile = station.journal().unreported_count();
    let successor = world.start_broker(broker.successor_spec("broker-2")).await;
    assert_eq!(successor.url(), station.ctx.broker.current_endpoint(), "the successor took over the address");
    eprintln!("broker back after {:?}: {unreported_meanwhile} result(s) waiting in the journal", down.elapsed());
    assert!(unreported_meanwhile > 0, "no result waited for the broker: the outage missed the batch");

    let summary = tokio::time::timeout(Duration::from_secs(60), run.task).await.expect("run ended").unwrap();
    while let Ok(e) = run.events.try_recv() {
        events.push(e);
    }
    eprintln!(
        "attempts per device: {:?}",
        summary.devices.iter().map(|d| (d.probe.clone(), d.attempts)).collect::<Vec<_>>()
    );
    assert_eq!(summary.devices.len(), TARGETS, "{summary:#?}");
    assert_eq!(summary.installed(), TARGETS, "every device installed once the broker was back: {summary:#?}");
    assert_eq!(check_outcomes(&summary, sim.targets(), &seeded.areas, crc), (TARGETS, 0));
    assert!(summary.devices.iter().all(|d| d.attempts == 1), "waiting for the broker used up attempts: {summary:#?}");
    let waited: HashSet<&str> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Stage { probe, event: StageEvent::WaitingForBroker, .. } => Some(probe.as_str()),
            _ => None,
        })
        .collect();
    eprintln!("probes that waited for the broker: {waited:?}");
    assert!(!waited.is_empty(), "no licence request met the outage; the test did not exercise the wait");

    // Nothing lost, nothing extra: one result per device, every one reported.
    assert_eq!(station.reporter().flush(Duration::from_secs(20)).await, 0, "results left unreported");
    let entries = station.entries();
    assert_eq!(entries.len(), TARGETS, "one journalled result per device: {entries:#?}");
    assert!(entries.iter().all(|(_, s)| *s == EntryState::Reported), "{entries:#?}");

    // Every reported result exactly once at the broker; one licence per device.
    let mut per_device: HashMap<String, BTreeSet<String>> = HashMap::new();
    for (e, _) in &entries {
        assert!(per_device.entry(e.result.device_id.clone()).or_default().insert(e.result_id.clone()));
    }
    let mut admin = successor.admin().await;
    let mut licensed = 0;
    for (device, result_ids) in &per_device {
        let h =
            admin.device_history(pb::DeviceHistoryRequest { device_id: device.clone() }).await.unwrap().into_inner();
        assert!(h.licences.len() <= 1, "device {device} holds {} licences: {h:?}", h.licences.len());
        licensed += h.licences.len();
        let reported: Vec<_> = h.installs.iter().map(|i| i.result_id.clone()).collect();
        let unique: BTreeSet<_> = reported.iter().cloned().collect();
        assert_eq!(reported.len(), unique.len(), "device {device}: a result recorded twice: {h:?}");
        assert_eq!(&unique, result_ids, "device {device}: the broker's results are the journal's");
    }
    let ok_entries = entries.iter().filter(|(e, _)| e.result.status_code == 0).count();
    let status = successor.batch_status("b-restart").await;
    assert_eq!(status.installed as usize, ok_entries, "{status:?}");
    assert_eq!(ok_entries, TARGETS);
    assert_eq!(status.issued as usize, licensed, "{status:?}");
    assert_eq!(status.issued as usize, TARGETS, "{status:?}");
    assert_eq!(status.failed, 0, "{status:?}");

    // The ledger's audit chain survived the restart.
    let v = admin.verify_audit(pb::VerifyAuditRequest {}).await.unwrap().into_inner();
    assert!(v.ok, "{v:?}");
    sim.shutdown().await.unwrap();
}
