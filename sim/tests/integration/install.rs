//! SFI installation through the bootloader: the vector image end to end, link efficiency with
//! pacing (flash programming must overlap the link), and reproducible fault injection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::time::Instant;

use crate::host::Host;
use crate::support::{expected_flash, split_image, valid_image_of, vectors};
use flashgate_common::family::Family;
use flashgate_common::protocol::{SfiOpcode, SfiState};
use flashgate_common::sfi::{AreaType, PlainArea};
use flashgate_sim::device::ChipIdentity;
use flashgate_sim::{FaultConfig, LinkConfig, SimTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn vector_target(link: LinkConfig) -> SimTarget {
    let v = vectors();
    let id = ChipIdentity::new(v.chip.clone(), v.certificate.clone()).unwrap();
    SimTarget::with_identity(Family::Stm32L4, id, link)
}

const OP_LICENCE: u16 = SfiOpcode::SetLicence as u16;
const OP_HEADER: u16 = SfiOpcode::SetImageHeader as u16;
const OP_AREA: u16 = SfiOpcode::StartArea as u16;
const OP_CHUNK: u16 = SfiOpcode::WriteChunk as u16;
const OP_INSTALL: u16 = SfiOpcode::Install as u16;
const OP_STATE: u16 = SfiOpcode::GetState as u16;

#[tokio::test]
async fn vector_image_installs_over_the_bootloader() {
    let v = vectors();
    let t = vector_target(LinkConfig::default());
    let mut h = Host::new(t.connect());
    h.sync().await;
    let (cert, status) = h.special(SfiOpcode::GetCertificate as u16, &[]).await;
    assert_eq!((cert.as_slice(), status), (&v.certificate.to_bytes()[..], 0));
    let img = split_image(&v.image);
    assert_eq!(h.extended(OP_LICENCE, &[], &v.licence).await, 0);
    assert_eq!(h.extended(OP_HEADER, &[], &img.header).await, 0);
    for (desc, ct) in &img.areas {
        assert_eq!(h.extended(OP_AREA, &[], desc).await, 0);
        for (i, c) in ct.chunks(1024).enumerate() {
            assert_eq!(h.extended(OP_CHUNK, &((i * 1024) as u32).to_be_bytes(), c).await, 0);
        }
    }
    let (crc, status) = h.special(OP_INSTALL, &[]).await;
    assert_eq!(status, 0);
    let expected = expected_flash(&v.areas);
    assert_eq!(crc, crc32fast::hash(&expected).to_be_bytes().to_vec(), "INSTALL answers the CRC MSB first");
    assert_eq!(h.special(OP_STATE, &[]).await, (vec![SfiState::Installed as u8, 0, 0], 0));
    assert_eq!(t.handle().flash_image(), expected);
}

/// Install a `size`-byte firmware area at `speed` and return the fraction of the link's payload
/// capacity the WRITE_CHUNK phase achieved.
async fn efficiency(family: Family, speed: f64, size: usize) -> f64 {
    let v = vectors();
    let link = LinkConfig::new(115_200, speed);
    let profile = family.profile();
    let identity = ChipIdentity::certify(profile, &v.vendor_ca, v.chip.clone());
    let licence = crate::support::licence_for(&v, identity.certificate());
    let t = SimTarget::with_identity(family, identity, link);
    let data: Vec<u8> = (0..size as u32).map(|i| (i * 31 + 7) as u8).collect();
    let areas = [PlainArea { area_type: AreaType::Firmware, address: profile.flash_base, data }];
    let img = split_image(&valid_image_of(&v, &areas));
    let mut h = Host::new(t.connect());
    h.sync().await;
    assert_eq!(h.extended(OP_LICENCE, &[], &licence).await, 0);
    assert_eq!(h.extended(OP_HEADER, &[], &img.header).await, 0);
    let (desc, ct) = &img.areas[0];
    assert_eq!(h.extended(OP_AREA, &[], desc).await, 0);
    let start = Instant::now();
    for (i, c) in ct.chunks(1024).enumerate() {
        assert_eq!(h.extended(OP_CHUNK, &((i * 1024) as u32).to_be_bytes(), c).await, 0);
    }
    let elapsed = start.elapsed();
    let (_, status) = h.special(OP_INSTALL, &[]).await;
    assert_eq!(status, 0);
    let ideal = Duration::from_secs_f64(size as f64 / (link.byte_rate() * speed));
    let eff = ideal.as_secs_f64() / elapsed.as_secs_f64();
    println!("{family}: {size} B at speed {speed}: {elapsed:?} (ideal payload time {ideal:?}) = {:.1}%", eff * 100.0);
    eff
}

/// On the simulator's modelled timeline (tokio's paused clock): the figure does not depend on how
/// loaded the machine running the tests is (a wall-clock version failed under load).
#[tokio::test(start_paused = true)]
async fn write_chunks_use_at_least_90_percent_of_the_link() {
    let eff = efficiency(Family::Stm32L4, 2.0, 16 * 1024).await;
    assert!(eff >= 0.90, "link efficiency {:.1}% < 90%", eff * 100.0);
    // The modelled protocol overhead caps it below 100% (1052 byte times per 1024 B chunk).
    assert!(eff <= 0.99, "pacing too fast: {:.1}%", eff * 100.0);
    // H7: 32-byte words at 100 µs and a 2 s mass erase; programming still overlaps the link.
    let eff = efficiency(Family::Stm32H7, 2.0, 16 * 1024).await;
    assert!(eff >= 0.90, "H7 link efficiency {:.1}% < 90%", eff * 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "real time (speed 1): about 7 s; run with --ignored"]
async fn write_chunks_in_real_time() {
    let eff = efficiency(Family::Stm32L4, 1.0, 64 * 1024).await;
    assert!(eff >= 0.90, "link efficiency {:.1}% < 90%", eff * 100.0);
}

/// Feed a fixed host byte sequence through a faulty link and collect what the device sends.
async fn faulty_transcript(seed: u64) -> Vec<u8> {
    let faults = FaultConfig { drop_rate: 0.02, corrupt_rate: 0.02, seed };
    let link = LinkConfig { faults, frame_timeout: Duration::from_secs(30), ..LinkConfig::default() };
    let t = vector_target(link);
    let mut io = t.connect();
    let mut out = Vec::new();
    for i in 0..60u8 {
        let cmd: &[u8] = match i % 4 {
            0 => &[0x7F],
            1 => &[0x02, 0xFD],
            2 => &[0x00, 0xFF],
            _ => &[0x50, 0xAF, 0x5F, 0x07, 0x58, 0x00, 0x00, 0x00],
        };
        io.write_all(cmd).await.unwrap();
        // Collect until the device is quiet.
        loop {
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(20), io.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
    }
    out
}

#[tokio::test]
async fn fault_injection_is_reproducible_by_seed() {
    let a = faulty_transcript(1234).await;
    let b = faulty_transcript(1234).await;
    let c = faulty_transcript(999).await;
    assert_eq!(a, b, "same seed, same faults");
    assert_ne!(a, c, "another seed, other faults");
    // Faults did happen: a clean run answers differently.
    let clean = {
        let t = vector_target(LinkConfig::default());
        let mut io = t.connect();
        io.write_all(&[0x7F, 0x02, 0xFD]).await.unwrap();
        let mut buf = [0u8; 6];
        io.read_exact(&mut buf).await.unwrap();
        buf
    };
    assert_eq!(clean, [0x79, 0x79, 0x01, 0x04, 0x62, 0x79]);
    assert!(a.contains(&0x1F) || a.len() < 60 * 5, "expected NACKs or lost bytes under faults");
}

/// Profile v1.1 §2: an STM32H7 image carries ST's positional `C` area (nine words, 36 bytes), as
/// ST's tools write it; the H7 target applies it word by word (RDP from OPTSR bits 15:8), and refuses
/// a `C` area in Flashgate's pairs layout (not 36 bytes).
#[tokio::test(start_paused = true)]
async fn an_h7_image_with_st_s_positional_option_words_installs() {
    use flashgate_common::family::{OPTION_H7_BOOT, OPTION_USER};
    let v = vectors();
    let family = Family::Stm32H7;
    let profile = family.profile();
    let install = |config: Vec<u8>| {
        let v = &v;
        async move {
            let identity = ChipIdentity::certify(profile, &v.vendor_ca, v.chip.clone());
            let licence = crate::support::licence_for(v, identity.certificate());
            let t = SimTarget::with_identity(family, identity, LinkConfig::default());
            let areas = [
                PlainArea { area_type: AreaType::Firmware, address: profile.flash_base, data: vec![0x42; 64] },
                PlainArea { area_type: AreaType::Config, address: 0, data: config },
            ];
            let img = split_image(&valid_image_of(v, &areas));
            let mut h = Host::new(t.connect());
            h.sync().await;
            let mut statuses =
                vec![h.extended(OP_LICENCE, &[], &licence).await, h.extended(OP_HEADER, &[], &img.header).await];
            for (desc, ct) in &img.areas {
                statuses.push(h.extended(OP_AREA, &[], desc).await);
                for (i, c) in ct.chunks(1024).enumerate() {
                    statuses.push(h.extended(OP_CHUNK, &((i * 1024) as u32).to_be_bytes(), c).await);
                }
            }
            statuses.push(h.special(OP_INSTALL, &[]).await.1);
            (t, statuses)
        }
    };
    let csv = "FLASH_OPTSR_PRG,0x1FFEAAF0\nRDP,0xCC\nFLASH_BOOT_PRG,0x1FF00900\n";
    let config = flashgate_common::firmware::parse_option_bytes_csv(csv, profile).unwrap().data;
    assert_eq!(config.len(), 36);
    let (t, statuses) = install(config).await;
    assert!(statuses.iter().all(|s| *s == 0), "{statuses:x?}");
    t.handle().with_device(|d| {
        assert_eq!(d.option_bytes()[&OPTION_USER], 0x1FFE_CCF0);
        assert_eq!(d.option_bytes()[&OPTION_H7_BOOT], 0x1FF0_0900);
        assert_eq!(d.rdp_level(), flashgate_sim::RdpLevel::Level2, "RDP from OPTSR bits 15:8");
    });

    // Pairs (8-byte records) are not an H7 `C` area: refused at START_AREA.
    let mut pairs = 1u32.to_le_bytes().to_vec();
    pairs.extend_from_slice(&0x1FFE_AAF0u32.to_le_bytes());
    let (t, statuses) = install(pairs).await;
    assert!(statuses.contains(&0x0106), "{statuses:x?}");
    assert_ne!(t.handle().sfi_state(), SfiState::Installed);
}
