//! Faults of the station itself (issue 11 item 1): a journal that cannot be written. The first
//! board's result cannot be made durable, so it is delivered to the broker directly and counted only
//! because the broker acknowledged it; from then on no new board is taken — each waiting probe says
//! "journal not writable: PATH: reason" — and the untouched boards stay idle. Once writes succeed
//! again, the held result reaches the journal, already marked reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use flashgate_agent::journal::EntryState;
use flashgate_agent::pipeline::StageEvent;
use flashgate_agent::runner::{RunEvent, RunOptions};
use flashgate_common::cert::VendorCa;
use flashgate_common::protocol::SfiState;
use flashgate_sim::Simulator;
use flashgate_tests::agent::{StationSpec, TestStation, once_per_probe, seed_sized, sim_config, tcp_probes};
use flashgate_tests::broker::{BrokerSpec, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_that_cannot_be_written_stops_the_station_and_loses_nothing() {
    let vendor = VendorCa::generate(&mut rand::rngs::OsRng);
    let sim = Simulator::start(sim_config(&vendor, 3)).await.unwrap();
    let world = World::with_vendor(vendor);
    let broker = world.start_broker(BrokerSpec::default()).await;
    seed_sized(&broker, "b-disk", 3, &["berlin"], 4096, 5).await;

    let station = TestStation::new(&world, StationSpec::new(vec![broker.url()]));
    // The disk fills up during the first device: its install began (one line), its result does not
    // fit (the seam a full tmpfs would hit: every later write fails).
    station.journal().inject_write_fault_after(1, Some(std::io::ErrorKind::StorageFull));
    let opts = RunOptions { max_parallel: 1, ..once_per_probe("b-disk") };
    let (summary, events) = station.run(tcp_probes(&sim, "sim"), opts, Duration::from_secs(60)).await;

    // One board was taken; its result was acknowledged by the broker before it counted.
    assert_eq!(summary.installed(), 1, "{summary:#?}");
    assert_eq!(summary.devices.len(), 1, "no board is taken once the journal fails: {summary:#?}");
    let status = broker.batch_status("b-disk").await;
    assert_eq!((status.issued, status.installed), (1, 1), "{status:?}");
    let faults: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::Stage { event: StageEvent::JournalFault { message }, .. } => Some(message.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(faults.len(), 2, "each waiting probe says why: {events:#?}");
    let journal_file = station.dir().join("journal").join("journal.jsonl").display().to_string();
    for m in &faults {
        assert!(m.contains(&journal_file) && m.contains("injected"), "{m}");
    }
    let idle = sim.targets().iter().filter(|t| t.sfi_state() == SfiState::Idle).count();
    assert_eq!(idle, 2, "the boards not taken are untouched");
    assert!(station.journal().faults_seen() > 0);
    assert_eq!(station.journal().held_count(), 1);
    assert!(station.entries().is_empty(), "nothing reached the file yet");

    // The disk has room again: the held result is written, already acknowledged.
    station.journal().inject_write_fault(None);
    station.journal().retry().unwrap();
    let entries = station.entries();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].1, EntryState::Reported);
    assert_eq!(entries[0].0.result.status_code, 0);
    assert_eq!(station.reporter().flush(Duration::from_secs(10)).await, 0);
    sim.shutdown().await.unwrap();
}

/// Issue 11 item 6: a board already installed (readout protected) is not an empty fixture. A new
/// run on it says "device is readout protected (already installed?)", journals that as its own
/// outcome for the station's history, and asks the broker for no licence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_board_is_named_and_journalled_without_a_licence() {
    use flashgate_agent::pipeline::{DeviceOutcome, LOCKED_MESSAGE};
    let vendor = VendorCa::generate(&mut rand::rngs::OsRng);
    let sim = Simulator::start(sim_config(&vendor, 1)).await.unwrap();
    let world = World::with_vendor(vendor);
    let broker = world.start_broker(BrokerSpec::default()).await;
    seed_sized(&broker, "b-lock", 2, &["berlin"], 2048, 6).await;
    let station = TestStation::new(&world, StationSpec::new(vec![broker.url()]));
    let (first, _) = station.run(tcp_probes(&sim, "sim"), once_per_probe("b-lock"), Duration::from_secs(30)).await;
    assert_eq!(first.installed(), 1, "{first:#?}");

    let (second, _) = station.run(tcp_probes(&sim, "sim"), once_per_probe("b-lock"), Duration::from_secs(30)).await;
    assert_eq!(second.devices.len(), 1, "{second:#?}");
    assert_eq!(second.locked(), 1, "{second:#?}");
    assert!(matches!(&second.devices[0].outcome, DeviceOutcome::Locked { message } if message == LOCKED_MESSAGE));
    let status = broker.batch_status("b-lock").await;
    assert_eq!(status.issued, 1, "no licence was asked for the locked board: {status:?}");
    let entries = station.entries();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[1].0.result.status_code, 0x010A);
    assert_eq!(entries[1].0.result.message, LOCKED_MESSAGE);
    assert!(matches!(entries[1].1, EntryState::Rejected { .. }), "history only: {:?}", entries[1].1);
    sim.shutdown().await.unwrap();
}

/// Issue 11 item 2: an authorisation failure is not an outage. A revoked station is refused at the
/// TLS handshake; its probes say "refused by the broker: certificate revoked" and the run ends at
/// once, instead of waiting for a broker forever; nothing is written to the boards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_station_is_told_so_and_stops() {
    use flashgate_agent::pipeline::{DeviceOutcome, STATION_REFUSED};
    use flashgate_proto::v1 as pb;
    use flashgate_tests::broker::TestPki;
    let vendor = VendorCa::generate(&mut rand::rngs::OsRng);
    let sim = Simulator::start(sim_config(&vendor, 2)).await.unwrap();
    let world = World::with_vendor(vendor);
    let broker = world.start_broker(BrokerSpec::default()).await;
    seed_sized(&broker, "b-rev", 4, &["berlin"], 2048, 7).await;
    broker.seed_batch("b-seen", 1, &["berlin"]).await;
    // The ledger has seen the station's certificate; then it is revoked.
    broker.station("berlin", 1).await.issue("b-seen", &world.chip()).await.unwrap();
    let serial = world.pki.serial(&TestPki::station("berlin", 1));
    let req = pb::RevokeStationRequest { serial, identity: String::new(), reason: "stolen".into(), force: false };
    broker.admin().await.revoke_station(req).await.unwrap();

    let station = TestStation::new(&world, StationSpec::new(vec![broker.url()]));
    let started = std::time::Instant::now();
    let (summary, _) = station.run(tcp_probes(&sim, "sim"), once_per_probe("b-rev"), Duration::from_secs(60)).await;
    assert!(started.elapsed() < Duration::from_secs(30), "the run waited for a broker: {summary:#?}");
    assert_eq!(summary.devices.len(), 2, "{summary:#?}");
    for d in &summary.devices {
        match &d.outcome {
            DeviceOutcome::Refused { reason, message, .. } => {
                assert_eq!(reason, STATION_REFUSED);
                assert_eq!(message, "refused by the broker: certificate revoked");
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(sim.targets().iter().all(|t| t.sfi_state() == SfiState::Idle));
    sim.shutdown().await.unwrap();
}
