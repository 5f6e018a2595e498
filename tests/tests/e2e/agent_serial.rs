//! The station agent through a serial probe: a simulated stm32l4 served on a pseudo-terminal (as
//! `flashgate sim --pty` does) and reached as `serial:/dev/pts/N?baud=115200&parity=none` (a pty
//! carries no parity). The batch installs through the whole pipeline with the expected flash CRC,
//! the result is journalled with the probe's kind and port and reaches the broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use flashgate_agent::journal::EntryState;
use flashgate_agent::pipeline::ProbeTarget;
use flashgate_common::cert::VendorCa;
use flashgate_sim::Simulator;
use flashgate_tests::agent::{
    StationSpec, TestStation, check_outcomes, fast_client, once_per_probe, seed_sized, sim_config,
};
use flashgate_tests::broker::{BrokerSpec, World};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_probe_on_a_pty_installs() {
    let vendor = VendorCa::generate(&mut rand::rngs::OsRng);
    let mut cfg = sim_config(&vendor, 1);
    cfg.pty = true;
    let sim = Simulator::start(cfg).await.unwrap();
    let pty = sim.pty_paths()[0].display().to_string();
    let world = World::with_vendor(vendor);
    let broker = world.start_broker(BrokerSpec::default()).await;
    let seeded = seed_sized(&broker, "b-serial", 2, &["berlin"], 5000, 2).await;
    let crc = seeded.image.expected_flash_crc.unwrap();

    let spec = StationSpec {
        bootloader: flashgate_agent::bootloader::ClientConfig { line_baud: Some(115_200), ..fast_client() },
        ..StationSpec::new(vec![broker.url()])
    };
    let station = TestStation::new(&world, spec);
    let addr = format!("serial:{pty}?baud=115200&parity=none");
    let probe = ProbeTarget { id: "pty-0".into(), kind: "serial".into(), addr: addr.parse().unwrap() };
    let (summary, _) = station.run(vec![probe], once_per_probe("b-serial"), Duration::from_secs(30)).await;
    assert_eq!((summary.installed(), summary.devices.len()), (1, 1), "{summary:#?}");
    assert_eq!(summary.devices[0].attempts, 1, "{summary:#?}");
    assert_eq!(check_outcomes(&summary, sim.targets(), &seeded.areas, crc), (1, 0));

    assert_eq!(station.reporter().flush(Duration::from_secs(10)).await, 0);
    let entries = station.entries();
    assert_eq!(entries.len(), 1);
    let (e, state) = &entries[0];
    assert_eq!(*state, EntryState::Reported);
    assert_eq!((e.result.status_code, e.result.flash_crc), (0, Some(crc)));
    assert_eq!((e.result.probe_kind.as_str(), e.result.probe_port.as_str()), ("serial", addr.as_str()));
    let status = broker.batch_status("b-serial").await;
    assert_eq!((status.issued, status.installed, status.failed), (1, 1, 0));
    sim.shutdown().await.unwrap();
}
