//! The station agent end to end with many probes at once: a simulator with 16 stm32l4 targets (the
//! broker trusts the simulator's vendor CA), one station running a batch once per probe through
//! `run_batch` over mutual-TLS gRPC. With quota 16 every device is installed with the broker's
//! expected flash CRC, the broker counts 16 installs once the reporter has flushed, and the journal
//! holds 16 results, all reported, each recorded once under its result id. With quota 12 for 16
//! targets, 12 are installed and 4 refused `QUOTA_EXHAUSTED` (a once-per-probe run still visits every
//! probe; so does an until-exhausted run, two installs at a time: boards already on a fixture get
//! their verdict), the refused chips are left untouched, and nothing is over-issued. A refusal, journalled as
//! already reported, never reaches the broker as an install report, even while the reporter is busy
//! with other results of the same station.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use flashgate_agent::journal::EntryState;
use flashgate_agent::pipeline::DeviceOutcome;
use flashgate_agent::runner::{RunEvent, RunMode, RunOptions, RunSummary};
use flashgate_common::cert::VendorCa;
use flashgate_common::protocol::SfiState;
use flashgate_proto::v1 as pb;
use flashgate_sim::Simulator;
use flashgate_tests::agent::{
    StationSpec, TestStation, check_outcomes, once_per_probe, seed_sized, sim_config, tcp_probes,
};
use flashgate_tests::broker::{BrokerSpec, World};

const TARGETS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_probes_install_concurrently() {
    let vendor = VendorCa::generate(&mut rand::rngs::OsRng);
    let sim = Simulator::start(sim_config(&vendor, TARGETS)).await.unwrap();
    let world = World::with_vendor(vendor);
    let broker = world.start_broker(BrokerSpec::default()).await;
    let seeded = seed_sized(&broker, "b-16", TARGETS as i64, &["berlin"], 6 * 1024 + 5, 3).await;
    let crc = seeded.image.expected_flash_crc.unwrap();

    let station = TestStation::new(&world, StationSpec::new(vec![broker.url()]));
    let (summary, events) = station.run(tcp_probes(&sim, "sim"), once_per_probe("b-16"), Duration::from_secs(60)).await;
    assert_eq!(summary.devices.len(), TARGETS, "{summary:#?}");
    assert_eq!(summary.installed(), TARGETS, "{summary:#?}");
    assert_eq!(summary.stopped_by, None);
    let (ok, not) = check_outcomes(&summary, sim.targets(), &seeded.areas, crc);
    assert_eq!((ok, not), (TARGETS, 0));
    // Every probe handled one distinct device, in parallel: more than one install was in flight.
    let probes: HashSet<_> = summary.devices.iter().map(|d| d.probe.clone()).collect();
    assert_eq!(probes.len(), TARGETS);
    let done = events.iter().filter(|e| matches!(e, RunEvent::ProbeDone { .. })).count();
    assert_eq!(done, TARGETS);
    assert!(max_in_flight(&events) > 1, "installs never overlapped");

    assert_eq!(station.reporter().flush(Duration::from_secs(20)).await, 0, "results left unreported");
    let status = broker.batch_status("b-16").await;
    assert_eq!((status.issued, status.installed, status.failed, status.remaining), (16, 16, 0, 0));

    let entries = station.entries();
    assert_eq!(entries.len(), TARGETS);
    let mut admin = broker.admin().await;
    for (e, state) in &entries {
        assert_eq!(*state, EntryState::Reported, "{e:?}");
        assert_eq!((e.result.status_code, e.result.flash_crc, e.result.attempt), (0, Some(crc), 1), "{e:?}");
        assert_eq!(e.result.batch_id, "b-16");
        let h = admin
            .device_history(pb::DeviceHistoryRequest { device_id: e.result.device_id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(h.licences.len(), 1, "{h:?}");
        assert_eq!(h.installs.len(), 1, "{h:?}");
        assert_eq!(h.installs[0].result_id, e.result_id);
        assert_eq!(h.installs[0].flash_crc, Some(crc));
    }
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_twelve_for_sixteen_probes_refuses_four() {
    quota_twelve_for_sixteen(once_per_probe("b-12")).await;
}

/// The station daemon's mode: the run ends with the batch, yet every board already on a fixture gets
/// its verdict. Two installs at a time, so when the thirteenth board is refused at least two more
/// probes hold boards still waiting for a slot; they are refused too, not silently left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_exhausted_every_board_on_a_fixture_gets_a_verdict() {
    let opts = RunOptions { mode: RunMode::UntilExhausted, max_parallel: 2, ..once_per_probe("b-12") };
    quota_twelve_for_sixteen(opts).await;
}

async fn quota_twelve_for_sixteen(opts: RunOptions) {
    let vendor = VendorCa::generate(&mut rand::rngs::OsRng);
    let sim = Simulator::start(sim_config(&vendor, TARGETS)).await.unwrap();
    let world = World::with_vendor(vendor);
    let broker = world.start_broker(BrokerSpec::default()).await;
    let seeded = seed_sized(&broker, "b-12", 12, &["berlin"], 4096, 9).await;
    let crc = seeded.image.expected_flash_crc.unwrap();

    let station = TestStation::new(&world, StationSpec::new(vec![broker.url()]));
    let (summary, _) = station.run(tcp_probes(&sim, "sim"), opts, Duration::from_secs(60)).await;
    assert_eq!(summary.devices.len(), TARGETS, "every probe is visited: {summary:#?}");
    assert_eq!((summary.installed(), summary.refused(), summary.failed()), (12, 4, 0), "{summary:#?}");
    assert_eq!(summary.stopped_by.as_deref(), Some("QUOTA_EXHAUSTED"));
    for d in &summary.devices {
        if let DeviceOutcome::Refused { reason, message, .. } = &d.outcome {
            assert_eq!(reason, "QUOTA_EXHAUSTED", "{message}");
            assert_eq!(d.attempts, 1, "a refusal is not retried");
        }
    }
    // Refused chips were never given a licence: untouched, erased, idle.
    let (ok, not) = check_outcomes(&summary, sim.targets(), &seeded.areas, crc);
    assert_eq!((ok, not), (12, 4));
    let idle = sim.targets().iter().filter(|t| t.sfi_state() == SfiState::Idle).count();
    assert_eq!(idle, 4);

    assert_eq!(station.reporter().flush(Duration::from_secs(20)).await, 0);
    let entries = station.entries();
    assert_eq!(entries.len(), TARGETS);
    // Installed devices are reported; refused ones (no licence) stay in the station's history only.
    for (e, st) in &entries {
        if e.result.status_code == 0 {
            assert_eq!(*st, EntryState::Reported, "{e:?}");
        } else {
            assert!(matches!(st, EntryState::Rejected { reason } if reason.starts_with("local only")), "{e:?} {st:?}");
        }
    }
    let installed = entries.iter().filter(|(e, _)| e.result.status_code == 0).count();
    assert_eq!(installed, 12);
    let refused: Vec<_> = entries.iter().filter(|(e, _)| e.result.status_code != 0).collect();
    assert!(refused.iter().all(|(e, _)| e.result.message.starts_with("refused (QUOTA_EXHAUSTED)")), "{refused:#?}");
    assert_refusals_stay_local(&broker, &summary).await;
    let status = broker.batch_status("b-12").await;
    assert_eq!((status.issued, status.installed, status.failed, status.remaining), (12, 12, 0, 0));
    sim.shutdown().await.unwrap();
}

/// A refusal is journalled as already reported (the broker recorded it itself); the reporter must
/// never send it as an install report. One station runs two batches at once: one installs device
/// after device (so the reporter is busy sending results), the other is refused device after device
/// (`QUOTA_EXHAUSTED` after its first licence), so refusals are journalled while the reporter works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_never_reach_the_broker_as_failed_installs() {
    const REFUSED: usize = 32;
    let vendor = VendorCa::generate(&mut rand::rngs::OsRng);
    let world = World::with_vendor(vendor.clone());
    let broker = world.start_broker(BrokerSpec::default()).await;
    let key = broker.generate_key("fw-race").await;
    let (image, _) = broker.pack_image(&key.key_id, 1024, 4).await;
    // The race is a matter of timing: a few rounds make it near certain to show.
    for round in 0..3 {
        let (b_busy, b_full) = (format!("b-busy-{round}"), format!("b-full-{round}"));
        broker.create_batch(&b_busy, &image.sha256, TARGETS as i64, &["berlin"]).await;
        broker.create_batch(&b_full, &image.sha256, 1, &["berlin"]).await;
        let busy = Simulator::start(sim_config(&vendor, TARGETS)).await.unwrap();
        let full = Simulator::start(sim_config(&vendor, REFUSED + 1)).await.unwrap();
        let station = TestStation::new(&world, StationSpec::new(vec![broker.url()]));
        let one_at_a_time = |batch: &str| RunOptions { max_parallel: 1, ..once_per_probe(batch) };
        let (installs, refusals) = tokio::join!(
            station.run(tcp_probes(&busy, "busy"), one_at_a_time(&b_busy), Duration::from_secs(60)),
            station.run(tcp_probes(&full, "full"), one_at_a_time(&b_full), Duration::from_secs(60)),
        );
        let (installs, refusals) = (installs.0, refusals.0);
        assert_eq!(installs.installed(), TARGETS, "{installs:#?}");
        assert_eq!((refusals.installed(), refusals.refused()), (1, REFUSED), "{refusals:#?}");
        assert_eq!(station.reporter().flush(Duration::from_secs(20)).await, 0);
        assert_refusals_stay_local(&broker, &refusals).await;
        let status = broker.batch_status(&b_full).await;
        assert_eq!((status.issued, status.installed, status.failed), (1, 1, 0), "round {round}");
        busy.shutdown().await.unwrap();
        full.shutdown().await.unwrap();
    }
}

/// No device refused in `summary` has an install report at the broker.
async fn assert_refusals_stay_local(broker: &flashgate_tests::broker::TestBroker, summary: &RunSummary) {
    let mut admin = broker.admin().await;
    for d in &summary.devices {
        if let DeviceOutcome::Refused { device_id, .. } = &d.outcome {
            let h = admin
                .device_history(pb::DeviceHistoryRequest { device_id: device_id.clone() })
                .await
                .unwrap()
                .into_inner();
            assert!(h.licences.is_empty(), "{h:?}");
            assert!(
                h.installs.is_empty(),
                "refused device {device_id} reached the broker as an install report (the reporter sent a \
                 refusal journalled as reported): {:?}",
                h.installs
            );
        }
    }
}

/// The largest number of probes between their first install progress and their `Finished` event at
/// one time.
fn max_in_flight(events: &[RunEvent]) -> usize {
    use flashgate_agent::pipeline::StageEvent;
    let mut live = HashSet::new();
    let mut max = 0;
    for e in events {
        match e {
            RunEvent::Stage { probe, event: StageEvent::Install { .. }, .. } => {
                live.insert(probe.clone());
                max = max.max(live.len());
            }
            RunEvent::Finished { probe, .. } => {
                live.remove(probe);
            }
            _ => {}
        }
    }
    max
}
