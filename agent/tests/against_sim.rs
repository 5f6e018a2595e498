//! The host client against the simulator's in-memory target (`flashgate_sim::SimTarget`): the
//! profile's vector image installed end to end with the vector licence, readout protection
//! afterwards, recovery through retries under seeded drop/corrupt fault injection, and link
//! efficiency at 115200 baud on the simulator's modelled timeline (time is paused, so the
//! modelled time is measured exactly).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use flashgate_agent::bootloader::{
    Bootloader, BootloaderError, ClientConfig, InstallStage, LICENCE_LEN, MemoryImage, NoProgress, Progress,
};
use flashgate_common::cert::{ChipCertificate, ChipKey};
use flashgate_common::family::Family;
use flashgate_common::protocol::SfiState;
use flashgate_common::sfi::{AreaType, FirmwareKey, ImageNonce, PlainArea, expected_flash_crc, image_to_vec};
use flashgate_sim::device::ChipIdentity;
use flashgate_sim::{FaultConfig, LinkConfig, SimTarget};

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/spec/vectors/");

struct Vectors {
    chip: ChipKey,
    certificate: ChipCertificate,
    key: FirmwareKey,
    nonce: ImageNonce,
    licence: [u8; LICENCE_LEN],
    image: Vec<u8>,
    areas: Vec<PlainArea>,
}

fn field(v: &serde_json::Value, name: &str) -> Vec<u8> {
    hex::decode(v[name].as_str().unwrap()).unwrap()
}

fn vectors() -> Vectors {
    let text = std::fs::read_to_string(format!("{VECTORS}sfi-profile-v1.json")).unwrap_or_else(|e| {
        panic!("reading the reference vectors in {VECTORS} (../shared/spec/vectors next to the project): {e}")
    });
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let areas = v["areas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| PlainArea {
            area_type: AreaType::from_byte(a["type"].as_str().unwrap().as_bytes()[0]).unwrap(),
            address: a["address"].as_u64().unwrap() as u32,
            data: field(a, "plaintext"),
        })
        .collect();
    Vectors {
        chip: ChipKey::from_scalar(field(&v, "chip_private_scalar").try_into().unwrap()).unwrap(),
        certificate: ChipCertificate::parse(&field(&v, "chip_certificate")).unwrap(),
        key: FirmwareKey::new(field(&v, "firmware_key").try_into().unwrap()),
        nonce: ImageNonce(field(&v, "image_nonce").try_into().unwrap()),
        licence: field(&v, "licence").try_into().unwrap(),
        image: std::fs::read(format!("{VECTORS}image-v1.sfi"))
            .unwrap_or_else(|e| panic!("reading {VECTORS}image-v1.sfi: {e}")),
        areas,
    }
}

/// An STM32L4 target with the vector chip identity (so the vector licence opens on it).
fn vector_target(v: &Vectors, link: LinkConfig) -> SimTarget {
    let id = ChipIdentity::new(v.chip.clone(), v.certificate.clone()).unwrap();
    SimTarget::with_identity(Family::Stm32L4, id, link)
}

fn fast_config() -> ClientConfig {
    ClientConfig {
        ack_timeout: Duration::from_millis(100),
        erase_timeout: Duration::from_millis(400),
        install_timeout: Duration::from_secs(2),
        retries: 8,
        resync_quiet: Duration::from_millis(10),
        line_baud: None,
    }
}

#[tokio::test(start_paused = true)]
async fn vector_image_installs_end_to_end() {
    let v = vectors();
    let target = vector_target(&v, LinkConfig::default());
    let mut bl = Bootloader::new(target.connect(), fast_config());
    bl.sync().await.unwrap();
    assert_eq!(bl.get_id().await.unwrap(), 0x462);
    let cert = bl.get_certificate().await.unwrap();
    assert_eq!(cert, v.certificate.to_bytes());
    assert_eq!(bl.get_state().await.unwrap().0, SfiState::Idle);

    let family = Family::Stm32L4.profile();
    let mut image = MemoryImage::from_bytes(&v.image, Some(family)).unwrap();
    let mut stages = Vec::new();
    let mut sink = |p: &Progress| {
        if stages.last() != Some(&p.stage) {
            stages.push(p.stage);
        }
    };
    let report = bl.install_image(&mut image, &v.licence, &mut sink).await.unwrap();
    assert_eq!(report.crc, Some(expected_flash_crc(family, &v.areas)));
    assert_eq!(report.areas, 3);
    assert_eq!(report.bytes, 1000 + 2000 + 16);
    assert_eq!(report.link.retries, 0);
    assert_eq!(stages.first(), Some(&InstallStage::SetLicence));
    assert_eq!(stages.last(), Some(&InstallStage::Finished));
    assert!(stages.contains(&InstallStage::WriteArea { index: 3, area_type: AreaType::Config }));
    assert_eq!(target.handle().sfi_state(), SfiState::Installed);

    // Installed: readout protected, SFI commands refused, GET_STATE still answers.
    let e = bl.read_memory(0x0800_0000, 16).await.unwrap_err();
    assert!(matches!(e, BootloaderError::RetriesExhausted { .. }), "{e}");
    assert!(e.to_string().contains("NACK"), "{e}");
    let e = bl.set_licence(&v.licence).await.unwrap_err();
    assert_eq!(e.to_string(), "SET_LICENCE failed: device is readout protected (status 0x010A)");
    assert_eq!(bl.get_state().await.unwrap().0, SfiState::Installed);

    // Readout Unprotect mass-erases; the client resynchronises after the reset by itself.
    bl.readout_unprotect().await.unwrap();
    assert_eq!(bl.read_memory(0x0800_0000, 16).await.unwrap(), vec![0xFF; 16]);
}

#[tokio::test(start_paused = true)]
async fn wrong_chip_refuses_the_licence_in_plain_words() {
    let v = vectors();
    // The same product, another chip: the vector licence cannot be opened there.
    let ca = flashgate_common::cert::VendorCa::from_scalar(
        field(
            &serde_json::from_str(&std::fs::read_to_string(format!("{VECTORS}sfi-profile-v1.json")).unwrap_or_else(
                |e| {
                    panic!(
                        "reading the reference vectors in {VECTORS} (../shared/spec/vectors next to the project): {e}"
                    )
                },
            ))
            .unwrap(),
            "vendor_ca_private_scalar",
        )
        .try_into()
        .unwrap(),
    )
    .unwrap();
    let target = SimTarget::new(Family::Stm32L4, &ca, 7, LinkConfig::default());
    let mut bl = Bootloader::new(target.connect(), fast_config());
    let mut image = MemoryImage::from_bytes(&v.image, None).unwrap();
    let e = bl.install_image(&mut image, &v.licence, &mut NoProgress).await.unwrap_err();
    assert_eq!(e.to_string(), "SET_LICENCE failed: licence invalid (status 0x0102)");
}

/// A larger image under the vector key and nonce (the vector licence carries that key), so
/// fault injection has many frames to hit.
fn big_image(v: &Vectors) -> (Vec<u8>, Vec<PlainArea>) {
    let data: Vec<u8> = (0..48 * 1024u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let areas = vec![
        PlainArea { area_type: AreaType::Firmware, address: 0x0800_0000, data },
        PlainArea { area_type: AreaType::Firmware, address: 0x0801_0000, data: vec![0x5A; 5000] },
    ];
    (image_to_vec(&v.key, &v.nonce, &areas).unwrap(), areas)
}

#[tokio::test(start_paused = true)]
async fn install_survives_dropped_and_corrupted_bytes() {
    let v = vectors();
    let (file, areas) = big_image(&v);
    let family = Family::Stm32L4.profile();
    let mut total_retries = 0;
    for seed in [1u64, 2, 3] {
        let link =
            LinkConfig { faults: FaultConfig { drop_rate: 1e-4, corrupt_rate: 1e-4, seed }, ..LinkConfig::default() };
        let target = vector_target(&v, link);
        let mut bl = Bootloader::new(target.connect(), fast_config());
        let mut image = MemoryImage::from_bytes(&file, Some(family)).unwrap();
        let report = bl
            .install_image(&mut image, &v.licence, &mut NoProgress)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        if let Some(crc) = report.crc {
            assert_eq!(crc, expected_flash_crc(family, &areas), "seed {seed}");
        }
        assert_eq!(target.handle().sfi_state(), SfiState::Installed);
        let flash = target.handle().flash_image();
        assert_eq!(&flash[..48 * 1024], &areas[0].data[..], "seed {seed}");
        assert_eq!(&flash[0x1_0000..0x1_0000 + 5000], &areas[1].data[..], "seed {seed}");
        total_retries += report.link.retries;
    }
    assert!(total_retries > 0, "fault injection never made the client retry");
}

#[tokio::test(start_paused = true)]
async fn link_efficiency_at_115200_baud() {
    // Real-time pacing on the simulator's timeline (speed 1); with paused tokio time the
    // elapsed time is exactly the modelled link + flash time.
    let v = vectors();
    let (file, _) = big_image(&v);
    let link = LinkConfig { baud: 115_200, speed: 1.0, ..LinkConfig::default() };
    let target = vector_target(&v, link);
    let cfg = ClientConfig { line_baud: Some(115_200), ..ClientConfig::default() };
    let mut bl = Bootloader::new(target.connect(), cfg);
    bl.sync().await.unwrap();
    let mut image = MemoryImage::from_bytes(&file, Some(Family::Stm32L4.profile())).unwrap();
    let started = tokio::time::Instant::now();
    let report = bl.install_image(&mut image, &v.licence, &mut NoProgress).await.unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let payload_time = report.bytes as f64 * 11.0 / 115_200.0;
    let efficiency = payload_time / elapsed;
    eprintln!(
        "{} payload bytes in {elapsed:.3} s of modelled time: {:.1} % of the link's capacity",
        report.bytes,
        efficiency * 100.0
    );
    assert!(efficiency >= 0.90, "efficiency {:.3} below 90 %", efficiency);
}

/// The simulator served over TCP and a pseudo-terminal, reached through [`connect`] with
/// `tcp://` and `serial:` addresses (a pty carries no parity, hence `parity=none`).
#[tokio::test]
async fn tcp_and_serial_transports_reach_the_simulator() {
    use flashgate_agent::bootloader::{TargetAddr, connect};
    use flashgate_sim::{SimConfig, Simulator};

    let text = std::fs::read_to_string(format!("{VECTORS}sfi-profile-v1.json")).unwrap_or_else(|e| {
        panic!("reading the reference vectors in {VECTORS} (../shared/spec/vectors next to the project): {e}")
    });
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ca_scalar = field(&json, "vendor_ca_private_scalar").try_into().unwrap();
    let ca = flashgate_common::cert::VendorCa::from_scalar(ca_scalar).unwrap();
    let mut cfg = SimConfig::new(Family::Stm32H7, 1, "127.0.0.1:0".parse().unwrap(), ca);
    cfg.speed = 0.0;
    cfg.pty = true;
    let sim = Simulator::start(cfg).await.unwrap();

    let tcp: TargetAddr = format!("tcp://{}", sim.tcp_addrs()[0]).parse().unwrap();
    let mut bl = Bootloader::new(connect(&tcp).await.unwrap(), fast_config());
    assert_eq!(bl.get_id().await.unwrap(), 0x450);
    let cert = bl.get_certificate().await.unwrap();
    assert_eq!(&cert[..8], b"45002001");
    drop(bl);

    let path = sim.pty_paths()[0].display().to_string();
    let serial: TargetAddr = format!("serial:{path}?baud=115200&parity=none").parse().unwrap();
    let mut bl = Bootloader::new(connect(&serial).await.unwrap(), fast_config());
    assert_eq!(bl.get_id().await.unwrap(), 0x450);
    assert_eq!(bl.get_state().await.unwrap().0, SfiState::Idle);
    drop(bl);
    sim.shutdown().await.unwrap();
}

/// Issue 11 item 3: an install interrupted after the licence and the header were accepted (the host
/// killed, the link dropped) leaves the device's SFI session open; the next install on a new
/// connection reads GET_STATE, aborts that session and installs at its first try, instead of failing
/// once with SET_LICENCE "command out of sequence". An installed board is refused before its licence
/// is sent.
#[tokio::test(start_paused = true)]
async fn an_interrupted_session_is_aborted_before_the_next_install() {
    let v = vectors();
    let target = vector_target(&v, LinkConfig::default());
    let family = Family::Stm32L4.profile();
    {
        let mut bl = Bootloader::new(target.connect(), fast_config());
        bl.sync().await.unwrap();
        bl.set_licence(&v.licence).await.unwrap();
        let image = MemoryImage::from_bytes(&v.image, Some(family)).unwrap();
        use flashgate_agent::bootloader::AreaSource;
        bl.set_image_header(&image.header_bytes()).await.unwrap();
        // The connection drops here, mid-session.
    }
    assert_eq!(target.handle().sfi_state(), SfiState::HeaderAccepted);

    let mut bl = Bootloader::new(target.connect(), fast_config());
    bl.sync().await.unwrap();
    let mut image = MemoryImage::from_bytes(&v.image, Some(family)).unwrap();
    let report = bl.install_image(&mut image, &v.licence, &mut NoProgress).await.unwrap();
    assert_eq!(report.crc, Some(expected_flash_crc(family, &v.areas)));
    assert_eq!(target.handle().sfi_state(), SfiState::Installed);

    // Installed and readout protected: refused at GET_STATE, nothing sent.
    let mut image = MemoryImage::from_bytes(&v.image, Some(family)).unwrap();
    let e = bl.install_image(&mut image, &v.licence, &mut NoProgress).await.unwrap_err();
    assert!(e.to_string().contains("readout protected"), "{e}");
}
