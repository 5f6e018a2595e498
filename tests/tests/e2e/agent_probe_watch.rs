//! A batch over a changing set of probes (what the agent's probe watcher feeds it): a probe plugged in
//! while the batch runs joins it and installs its device; a probe that disappears has its loop stopped
//! and the others carry on; stopping the run ends it with every device accounted for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use flashgate_agent::pipeline::DeviceOutcome;
use flashgate_agent::runner::{RunEvent, RunMode, RunOptions, run_batch_watching};
use flashgate_common::cert::VendorCa;
use flashgate_sim::Simulator;
use flashgate_tests::agent::{StationSpec, TestStation, seed_sized, sim_config, tcp_probes};
use flashgate_tests::broker::{BrokerSpec, World};
use tokio::sync::{mpsc, watch};

async fn until(events: &mut mpsc::UnboundedReceiver<RunEvent>, what: &str, mut f: impl FnMut(&RunEvent) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let e = tokio::time::timeout_at(deadline, events.recv()).await.unwrap_or_else(|_| panic!("no {what}")).unwrap();
        if f(&e) {
            return;
        }
    }
}

fn installed(probe: &str) -> impl Fn(&RunEvent) -> bool + '_ {
    move |e| matches!(e, RunEvent::Finished { probe: p, outcome: DeviceOutcome::Installed { .. }, .. } if p == probe)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_join_and_leave_a_running_batch() {
    let vendor = VendorCa::generate(&mut rand::rngs::OsRng);
    let sim = Simulator::start(sim_config(&vendor, 3)).await.unwrap();
    let world = World::with_vendor(vendor);
    let broker = world.start_broker(BrokerSpec::default()).await;
    seed_sized(&broker, "b-watch", 10, &["berlin"], 3000, 5).await;
    let station = TestStation::new(&world, StationSpec::new(vec![broker.url()]));
    let all = tcp_probes(&sim, "p");

    let (probes_tx, probes_rx) = watch::channel(vec![all[0].clone()]);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ev_tx, mut events) = mpsc::unbounded_channel();
    let opts = RunOptions {
        mode: RunMode::UntilExhausted,
        poll_interval: Duration::from_millis(50),
        ..RunOptions::new("b-watch")
    };
    let run = tokio::spawn(run_batch_watching(station.ctx.clone(), probes_rx, opts, ev_tx, stop_rx));

    until(&mut events, "install on the first probe", installed(&all[0].id)).await;
    // Two more probes plugged in: both join the running batch.
    probes_tx.send(all.clone()).unwrap();
    let mut joined = std::collections::HashSet::new();
    until(&mut events, "installs on the two new probes", |e| {
        if let RunEvent::Finished { probe, outcome: DeviceOutcome::Installed { .. }, .. } = e {
            joined.insert(probe.clone());
        }
        joined.len() == 2
    })
    .await;
    // The first probe disappears: its loop ends, the others keep running.
    probes_tx.send(all[1..].to_vec()).unwrap();
    until(
        &mut events,
        "the first probe's loop to end",
        |e| matches!(e, RunEvent::ProbeDone { probe } if *probe == all[0].id),
    )
    .await;
    assert!(!run.is_finished(), "the run goes on with the remaining probes");

    stop_tx.send(true).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(30), run).await.expect("run stops").unwrap();
    assert_eq!((summary.installed(), summary.refused(), summary.failed()), (3, 0, 0), "{summary:#?}");
    let status = broker.batch_status("b-watch").await;
    assert_eq!(status.issued, 3);
    sim.shutdown().await.unwrap();
}
