//! The whole chain with a hardware-style HSM and a simulated chip: a broker whose pool is a
//! PKCS#11 token on SoftHSM2 generates the firmware key in the token and packs the image there
//! (`PackImage`); a simulated stm32l4 target (the simulator's vendor CA is the broker's trusted
//! vendor CA) gives its certificate over the AN3155 bootloader; the station obtains the licence
//! (`IssueLicence`), streams the image (`GetImage`: `ImageInfo` first, then chunks; size and SHA-256
//! checked), installs it with the agent's bootloader client, and the chip's INSTALL CRC equals the
//! `expected_flash_crc` the broker computed when packing. The install report is recorded once
//! (`BatchStatus.installed == 1`) and a repeat with the same `result_id` is not counted again.
//!
//! Skipped without softhsm2 unless `FLASHGATE_REQUIRE_SOFTHSM=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use flashgate_agent::bootloader::{Bootloader, ClientConfig, MemoryImage, NoProgress, TargetAddr, connect};
use flashgate_broker::hsm::HsmBackend;
use flashgate_common::cert::VendorCa;
use flashgate_common::family::Family;
use flashgate_common::protocol::SfiState;
use flashgate_common::sfi::expected_flash_crc;
use flashgate_proto::v1 as pb;
use flashgate_sim::{SimConfig, Simulator};
use flashgate_tests::broker::{BrokerSpec, L4_PRODUCT, World, sha256_hex};
use flashgate_tests::softhsm;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_packed_image_installs_on_a_simulated_chip() {
    let Some(fx) = softhsm::fixture() else { return };

    // A simulated stm32l4 with its own vendor CA, at full speed.
    let vendor = VendorCa::generate(&mut rand::rngs::OsRng);
    let mut cfg = SimConfig::new(Family::Stm32L4, 1, SocketAddr::from(([127, 0, 0, 1], 0)), vendor.clone());
    cfg.speed = 0.0;
    let sim = Simulator::start(cfg).await.unwrap();

    // The broker trusts the simulator's vendor CA; its only HSM is a SoftHSM2 token.
    let world = World::with_vendor(vendor);
    let token: Arc<dyn HsmBackend> = Arc::new(fx.connect(softhsm::TOKENS[0], 2));
    let broker = world.start_broker(BrokerSpec { members: Some(vec![token]), ..BrokerSpec::default() }).await;
    let key = broker.generate_key("fw-token").await;
    assert_eq!(key.backend, "pool");
    let (image, areas) = broker.pack_image(&key.key_id, 8 * 1024 + 123, 7).await;
    let profile = Family::Stm32L4.profile();
    let expected_crc = image.expected_flash_crc.expect("a packed image has an expected CRC");
    assert_eq!(expected_crc, expected_flash_crc(profile, &areas));
    assert_eq!(image.area_count, 1);
    broker.create_batch("b-hw", &image.sha256, 3, &["berlin"]).await;

    // The station reads the chip certificate over the bootloader.
    let addr = sim.tcp_addrs()[0];
    let target: TargetAddr = format!("tcp://{addr}").parse().unwrap();
    let client = ClientConfig { line_baud: None, ..ClientConfig::default() };
    let mut bl = Bootloader::new(connect(&target).await.unwrap(), client);
    bl.sync().await.unwrap();
    assert_eq!(bl.get_id().await.unwrap(), profile.pid);
    let cert = bl.get_certificate().await.unwrap();
    assert_eq!(cert, sim.target(0).unwrap().certificate().to_bytes());

    // Licence, then the image stream.
    let st = broker.station("berlin", 1).await;
    let lic = st.issue_raw("b-hw", cert.to_vec()).await.unwrap();
    assert!(!lic.reissued);
    assert_eq!(lic.image_sha256, image.sha256);
    let (info, bytes) = st.fetch_image(&lic.image_sha256, 0).await.unwrap();
    assert_eq!(info.image_sha256, image.sha256);
    assert_eq!(info.size, image.size);
    assert_eq!(bytes.len() as u64, info.size);
    assert_eq!(sha256_hex(&bytes), info.image_sha256);
    assert_eq!((info.family.as_str(), info.product_id.as_str()), ("stm32l4", L4_PRODUCT));
    assert_eq!(info.key_id, key.key_id);

    // Install with the agent's bootloader client.
    let mut sfi = MemoryImage::from_bytes(&bytes, Some(profile)).unwrap();
    let licence: [u8; 132] = lic.licence.as_slice().try_into().unwrap();
    let report = bl.install_image(&mut sfi, &licence, &mut NoProgress).await.unwrap();
    assert_eq!(report.crc, Some(expected_crc), "INSTALL's CRC must be the broker's expected flash CRC");
    assert_eq!(report.areas, 1);
    let handle = sim.target(0).unwrap();
    assert_eq!(handle.sfi_state(), SfiState::Installed);
    assert_eq!(&handle.flash_image()[..areas[0].data.len()], &areas[0].data[..]);

    // The install report, once.
    let report_req = pb::ReportInstallRequest {
        batch_id: "b-hw".into(),
        device_id: lic.device_id.clone(),
        status_code: 0,
        message: "installed".into(),
        timings: vec![pb::StageTiming {
            stage: "install".into(),
            micros: u64::try_from(report.duration.as_micros()).unwrap(),
        }],
        flash_crc: report.crc,
        attempt: 1,
        probe: Some(pb::ProbeInfo { probe_id: "sim-0".into(), kind: "sim".into(), port: target.to_string() }),
        result_id: "berlin-1/1".into(),
    };
    let mut licences = st.licences.clone();
    assert!(licences.report_install(report_req.clone()).await.unwrap().into_inner().recorded);
    let status = broker.batch_status("b-hw").await;
    assert_eq!((status.issued, status.installed, status.failed), (1, 1, 0));
    assert!(!licences.report_install(report_req).await.unwrap().into_inner().recorded, "a repeat is not recorded");
    let status = broker.batch_status("b-hw").await;
    assert_eq!((status.issued, status.installed, status.failed), (1, 1, 0));

    let mut admin = broker.admin().await;
    let history =
        admin.device_history(pb::DeviceHistoryRequest { device_id: lic.device_id.clone() }).await.unwrap().into_inner();
    assert_eq!(history.installs.len(), 1);
    assert_eq!(history.installs[0].flash_crc, Some(expected_crc));
    assert_eq!(history.installs[0].result_id, "berlin-1/1");
    let hsm = admin.hsm_status(pb::HsmStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(hsm.members.len(), 1);
    assert_eq!(hsm.members[0].name, format!("pkcs11:{}", softhsm::TOKENS[0]));
    assert!(hsm.members[0].healthy);
    assert!(hsm.members[0].requests >= 2, "PackImage and IssueLicence ran on the token: {:?}", hsm.members[0]);
    drop(bl);
    sim.shutdown().await.unwrap();
}
