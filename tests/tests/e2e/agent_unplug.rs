//! A probe unplugged in the middle of an install. The unplugged target runs in its own simulator
//! (real-time link, state directory) and that simulator is shut down as soon as the runner's events
//! show ciphertext reaching the chip; the other probes share another simulator.
//!
//! - Unplugged for good: that device ends `Failed` with a message naming the lost link, its first
//!   attempt is journalled and reported as a failure, the other probes install normally, and the chip,
//!   once powered again (the simulator restarted on its state directory), holds no plaintext and is
//!   not installed.
//! - Plugged back (the target's simulator restarted on the same port while the runner retries): the
//!   runner's next attempt installs it with the same licence, consuming no more quota.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use flashgate_agent::journal::{EntryState, HOST_FAILURE};
use flashgate_agent::pipeline::{DeviceOutcome, StageEvent};
use flashgate_agent::runner::{RunEvent, RunOptions};
use flashgate_common::cert::VendorCa;
use flashgate_common::protocol::SfiState;
use flashgate_proto::v1 as pb;
use flashgate_sim::{RunningSimulator, Simulator};
use flashgate_tests::agent::{
    SpawnedRun, StationSpec, TestStation, check_outcomes, fast_client, holds_plaintext, once_per_probe, seed_sized,
    sim_config, tcp_probe, tcp_probes,
};
use flashgate_tests::broker::{BrokerSpec, Seeded, TestBroker, World};

const OTHERS: usize = 3;
const IMAGE_LEN: usize = 12 * 1024;

struct Rig {
    vendor: VendorCa,
    others: RunningSimulator,
    broker: TestBroker,
    seeded: Seeded,
    station: TestStation,
    state: tempfile::TempDir,
}

/// The lone target: one stm32l4 on `listen`, real-time link at 115200 baud, state in `state`.
async fn lone_target(vendor: &VendorCa, listen: SocketAddr, state: &Path) -> RunningSimulator {
    let mut cfg = sim_config(vendor, 1);
    cfg.listen = listen;
    cfg.speed = 1.0;
    cfg.state_dir = Some(state.to_path_buf());
    Simulator::start(cfg).await.unwrap()
}

async fn rig(batch: &str) -> Rig {
    let vendor = VendorCa::generate(&mut rand::rngs::OsRng);
    let others = Simulator::start(sim_config(&vendor, OTHERS)).await.unwrap();
    let world = World::with_vendor(vendor.clone());
    let broker = world.start_broker(BrokerSpec::default()).await;
    let seeded = seed_sized(&broker, batch, 10, &["berlin"], IMAGE_LEN, 8).await;
    // Waits stretched by the frame's time on a 115200-baud line (the lone target runs in real time).
    let spec = StationSpec { bootloader: fast_client_on_a_line(), ..StationSpec::new(vec![broker.url()]) };
    let station = TestStation::new(&world, spec);
    Rig { vendor, others, broker, seeded, station, state: tempfile::tempdir().unwrap() }
}

fn fast_client_on_a_line() -> flashgate_agent::bootloader::ClientConfig {
    flashgate_agent::bootloader::ClientConfig { line_baud: Some(115_200), ..fast_client() }
}

/// Waits for ciphertext acknowledged by the chip on `probe`.
async fn wait_for_install_progress(run: &mut SpawnedRun, probe: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let e = tokio::time::timeout_at(deadline, run.events.recv())
            .await
            .expect("no install progress on the lone probe")
            .expect("the run ended before the lone probe installed anything");
        if let RunEvent::Stage { probe: p, event: StageEvent::Install { done, total, .. }, .. } = &e
            && p == probe
            && *done > 0
        {
            assert!(done < total, "the install finished before the probe could be unplugged");
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_unplugged_mid_install_fails_cleanly() {
    let r = rig("b-unplug").await;
    let lone = lone_target(&r.vendor, SocketAddr::from(([127, 0, 0, 1], 0)), r.state.path()).await;
    let lone_addr = lone.tcp_addrs()[0];
    let lone_handle = lone.target(0).unwrap().clone();
    let lone_device = lone_handle.certificate().device_id().to_string();
    let mut probes = tcp_probes(&r.others, "sim");
    probes.push(tcp_probe("lone", lone_addr));

    let mut run = r.station.spawn_run(probes, once_per_probe("b-unplug"));
    wait_for_install_progress(&mut run, "lone").await;
    lone.shutdown().await.unwrap(); // unplugged: the link is cut and the port refuses connections
    let summary = tokio::time::timeout(Duration::from_secs(30), run.task).await.expect("run ended").unwrap();
    eprintln!(
        "the chip right after the unplug (still powered): state {}, flash erased {}, holds plaintext {}",
        lone_handle.sfi_state(),
        lone_handle.with_device(|d| d.flash().is_erased()),
        holds_plaintext(&lone_handle, &r.seeded.areas)
    );

    // The others are unaffected.
    assert_eq!(summary.devices.len(), OTHERS + 1, "{summary:#?}");
    let crc = r.seeded.image.expected_flash_crc.unwrap();
    let others: Vec<_> = summary.devices.iter().filter(|d| d.probe != "lone").cloned().collect();
    let others_summary = flashgate_agent::runner::RunSummary { devices: others, stopped_by: None };
    assert_eq!(check_outcomes(&others_summary, r.others.targets(), &r.seeded.areas, crc), (OTHERS, 0));

    // The unplugged one failed, in words, after every attempt.
    let lone_rec = summary.devices.iter().find(|d| d.probe == "lone").unwrap();
    assert_eq!(lone_rec.attempts, 3, "{lone_rec:?}");
    let DeviceOutcome::Failed { status_code, message, .. } = &lone_rec.outcome else {
        panic!("the unplugged probe ended {:?}", lone_rec.outcome)
    };
    assert_eq!(*status_code, HOST_FAILURE);
    assert!(message.contains(&lone_addr.to_string()), "the message names the probe's port: {message}");

    // Its interrupted attempt is in the journal and reaches the broker as a failure.
    assert_eq!(r.station.reporter().flush(Duration::from_secs(20)).await, 0);
    let entries = r.station.entries();
    let lone_entries: Vec<_> = entries.iter().filter(|(e, _)| e.result.device_id == lone_device).collect();
    assert!(!lone_entries.is_empty(), "the interrupted install was not journalled: {entries:#?}");
    for (e, s) in &lone_entries {
        assert_eq!(*s, EntryState::Reported);
        assert_eq!(e.result.status_code, HOST_FAILURE, "{e:?}");
        assert_eq!(e.result.probe_id, "lone");
        eprintln!("journalled for the unplugged probe (attempt {}): {}", e.result.attempt, e.result.message);
    }
    assert_eq!(lone_entries[0].0.result.attempt, 1);
    let status = r.broker.batch_status("b-unplug").await;
    assert_eq!((status.issued, status.installed, status.failed), (OTHERS as i64 + 1, OTHERS as i64, 1));

    // Powered again (the simulator restarted on its state): no plaintext, not installed.
    let again = lone_target(&r.vendor, SocketAddr::from(([127, 0, 0, 1], 0)), r.state.path()).await;
    let t = again.target(0).unwrap();
    assert_eq!(t.certificate().device_id().to_string(), lone_device);
    assert_eq!(t.sfi_state(), SfiState::Failed);
    assert!(t.with_device(|d| d.flash().is_erased()), "programmed flash after the interrupted install");
    assert!(!holds_plaintext(t, &r.seeded.areas));
    again.shutdown().await.unwrap();
    r.others.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_plugged_back_is_retried_with_the_same_licence() {
    let r = rig("b-replug").await;
    let lone = lone_target(&r.vendor, SocketAddr::from(([127, 0, 0, 1], 0)), r.state.path()).await;
    let lone_addr = lone.tcp_addrs()[0];
    let lone_device = lone.target(0).unwrap().certificate().device_id().to_string();
    let mut probes = tcp_probes(&r.others, "sim");
    probes.push(tcp_probe("lone", lone_addr));

    let opts = RunOptions { max_attempts: 5, poll_interval: Duration::from_millis(300), ..once_per_probe("b-replug") };
    let mut run = r.station.spawn_run(probes, opts);
    wait_for_install_progress(&mut run, "lone").await;
    lone.shutdown().await.unwrap();
    // Plugged back at once, powered up again: same chip, same port.
    let back = lone_target(&r.vendor, lone_addr, r.state.path()).await;
    let summary = tokio::time::timeout(Duration::from_secs(30), run.task).await.expect("run ended").unwrap();

    assert_eq!(summary.devices.len(), OTHERS + 1, "{summary:#?}");
    let lone_rec = summary.devices.iter().find(|d| d.probe == "lone").unwrap();
    assert!(
        matches!(&lone_rec.outcome, DeviceOutcome::Installed { device_id, .. } if *device_id == lone_device),
        "{lone_rec:?}"
    );
    assert!(lone_rec.attempts >= 2, "{lone_rec:?}");
    let crc = r.seeded.image.expected_flash_crc.unwrap();
    let mut targets = r.others.targets().to_vec();
    targets.push(back.target(0).unwrap().clone());
    assert_eq!(check_outcomes(&summary, &targets, &r.seeded.areas, crc), (OTHERS + 1, 0));

    assert_eq!(r.station.reporter().flush(Duration::from_secs(20)).await, 0);
    let status = r.broker.batch_status("b-replug").await;
    assert_eq!((status.issued, status.installed, status.failed), (OTHERS as i64 + 1, OTHERS as i64 + 1, 0));
    let h = r
        .broker
        .admin()
        .await
        .device_history(pb::DeviceHistoryRequest { device_id: lone_device.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.licences.len(), 1, "the retry reused the licence: {h:?}");
    let journalled: Vec<_> =
        r.station.entries().into_iter().filter(|(e, _)| e.result.device_id == lone_device).collect();
    assert_eq!(h.installs.len(), journalled.len(), "{h:?}");
    assert_eq!(h.installs.iter().filter(|i| i.status_code == 0).count(), 1, "{h:?}");
    eprintln!(
        "plugged back: installed after {} attempts; journalled {:?}",
        lone_rec.attempts,
        journalled.iter().map(|(e, _)| (e.result.attempt, e.result.message.clone())).collect::<Vec<_>>()
    );
    back.shutdown().await.unwrap();
    r.others.shutdown().await.unwrap();
}
