//! The station agent over a noisy UART: the simulator drops and corrupts bytes in both directions
//! (seeded, per target and connection). With light noise every device is installed through frame
//! retries and resynchronisation, each with the broker's expected flash CRC. With heavy noise each
//! device is either installed with the right CRC or fails cleanly: its chip is not `installed`, its
//! flash is erased and holds none of the plaintext. Either way each device got exactly one licence,
//! the broker has every journalled result exactly once, and the broker's counts match the journal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flashgate_agent::journal::EntryState;
use flashgate_common::cert::VendorCa;
use flashgate_proto::v1 as pb;
use flashgate_sim::Simulator;
use flashgate_tests::agent::{
    StationSpec, TestStation, check_outcomes, once_per_probe, seed_sized, sim_config, tcp_probes,
};
use flashgate_tests::broker::{BrokerSpec, TestBroker, World};

const TARGETS: usize = 8;

/// Runs a batch of 4 KiB + 100 bytes over `TARGETS` noisy targets; returns (installed, failed).
async fn noisy_run(batch: &str, drop_rate: f64, corrupt_rate: f64, seed: u64) -> (usize, usize) {
    let vendor = VendorCa::generate(&mut rand::rngs::OsRng);
    let mut cfg = sim_config(&vendor, TARGETS);
    cfg.drop_rate = drop_rate;
    cfg.corrupt_rate = corrupt_rate;
    cfg.seed = seed;
    cfg.frame_timeout = Duration::from_millis(100);
    let sim = Simulator::start(cfg).await.unwrap();
    let world = World::with_vendor(vendor);
    let broker = world.start_broker(BrokerSpec::default()).await;
    let seeded = seed_sized(&broker, batch, TARGETS as i64, &["berlin"], 4096 + 100, 5).await;
    let crc = seeded.image.expected_flash_crc.unwrap();

    let station = TestStation::new(&world, StationSpec::new(vec![broker.url()]));
    let t = Instant::now();
    let (summary, _) = station.run(tcp_probes(&sim, "noisy"), once_per_probe(batch), Duration::from_secs(90)).await;
    eprintln!(
        "drop {drop_rate} corrupt {corrupt_rate} seed {seed}: {} installed, {} failed in {:?}; attempts {:?}",
        summary.installed(),
        summary.failed(),
        t.elapsed(),
        summary.devices.iter().map(|d| d.attempts).collect::<Vec<_>>()
    );
    assert_eq!(summary.devices.len(), TARGETS, "{summary:#?}");
    assert_eq!(summary.refused(), 0, "{summary:#?}");
    let (ok, failed) = check_outcomes(&summary, sim.targets(), &seeded.areas, crc);
    assert_eq!(ok + failed, TARGETS);

    assert_eq!(station.reporter().flush(Duration::from_secs(20)).await, 0, "results left unreported");
    check_ledger(&broker, &station, batch, ok, failed).await;
    sim.shutdown().await.unwrap();
    (ok, failed)
}

/// Every journal entry is reported and at the broker exactly once; one licence per device; the
/// broker's counts are the run's.
async fn check_ledger(broker: &TestBroker, station: &TestStation, batch: &str, ok: usize, failed: usize) {
    let entries = station.entries();
    assert!(entries.iter().all(|(_, s)| *s == EntryState::Reported), "{entries:#?}");
    let mut per_device: HashMap<String, Vec<String>> = HashMap::new();
    for (e, _) in &entries {
        per_device.entry(e.result.device_id.clone()).or_default().push(e.result_id.clone());
    }
    let mut admin = broker.admin().await;
    for (device, result_ids) in &per_device {
        let h =
            admin.device_history(pb::DeviceHistoryRequest { device_id: device.clone() }).await.unwrap().into_inner();
        assert_eq!(h.licences.len(), 1, "device {device}: {h:?}");
        let mut reported: Vec<_> = h.installs.iter().map(|i| i.result_id.clone()).collect();
        let mut journalled = result_ids.clone();
        reported.sort();
        journalled.sort();
        assert_eq!(reported, journalled, "device {device}: each journalled result once at the broker");
    }
    let status = broker.batch_status(batch).await;
    assert_eq!(status.issued as usize, per_device.len());
    assert_eq!((status.installed as usize, status.failed as usize), (ok, failed), "{status:?}");
    let installs_in_journal = entries.iter().filter(|(e, _)| e.result.status_code == 0).count();
    assert_eq!(installs_in_journal, ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn light_noise_is_absorbed_by_frame_retries() {
    let (ok, failed) = noisy_run("b-light", 0.0002, 0.0002, 0x5EED_0001).await;
    assert_eq!((ok, failed), (TARGETS, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_noise_installs_or_fails_cleanly() {
    let (ok, failed) = noisy_run("b-heavy", 0.0005, 0.0005, 0x5EED_0002).await;
    assert_eq!(ok + failed, TARGETS);
}
