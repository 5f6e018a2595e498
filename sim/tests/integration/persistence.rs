//! `--state-dir` persistence across simulator restarts over TCP, and the vendor CA file helpers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::host::Host;
use flashgate_common::family::Family;
use flashgate_common::protocol::{SfiOpcode, SfiState};
use flashgate_sim::{RdpLevel, SimConfig, Simulator, StateError, dump_flash, load_vendor_ca, write_vendor_ca};
use tokio::net::TcpStream;

fn config(dir: &std::path::Path, ca_path: &std::path::Path) -> SimConfig {
    let ca = load_vendor_ca(ca_path).unwrap();
    let mut cfg = SimConfig::new(Family::Stm32L4, 2, "127.0.0.1:0".parse().unwrap(), ca);
    cfg.state_dir = Some(dir.join("state"));
    cfg.speed = 0.0;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = write_vendor_ca(dir.path()).unwrap();
    let sim = Simulator::start(config(dir.path(), &key)).await.unwrap();
    // Identities are created and saved on first start.
    let state = dir.path().join("state");
    assert!(state.join("target-0.json").exists() && state.join("target-1.flash").exists());
    let mode = std::fs::metadata(state.join("target-0.json")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the state file holds the chip's private scalar");
    let certs: Vec<_> = sim.targets().iter().map(|t| t.certificate()).collect();
    assert_ne!(certs[0], certs[1]);
    let ca_pub =
        flashgate_common::cert::VendorCaPublicKey::from_pem(&std::fs::read_to_string(&public).unwrap()).unwrap();
    certs[0].verify(std::slice::from_ref(&ca_pub)).unwrap();
    for line in sim.describe() {
        println!("{line}");
    }

    // Program target 1 over TCP, then raise RDP on it.
    let mut h = Host::new(TcpStream::connect(sim.tcp_addrs()[1]).await.unwrap());
    h.sync().await;
    h.write_memory(0x0800_0100, &[0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80]).await;
    assert_eq!(h.read_memory(0x0800_0100, 8).await, vec![0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80]);
    // A debounced flush reaches the disk without a shutdown.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(dump_flash(&state, 1).unwrap()[0x100..0x108], [0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80]);
    // A failed SFI session leaves state `failed` with its status.
    assert_eq!(h.extended(SfiOpcode::SetLicence as u16, &[], &[0u8; 132]).await, 0x0102);
    drop(h);
    sim.shutdown().await.unwrap();

    let sim = Simulator::start(config(dir.path(), &key)).await.unwrap();
    let again: Vec<_> = sim.targets().iter().map(|t| t.certificate()).collect();
    assert_eq!(certs, again, "identities are stable across restarts");
    let t1 = sim.target(1).unwrap();
    assert_eq!(t1.sfi_state(), SfiState::Failed);
    // SET_LICENCE mass-erased the flash before refusing the licence.
    assert!(t1.flash_image().iter().all(|b| *b == 0xFF));
    let mut h = Host::new(TcpStream::connect(sim.tcp_addrs()[1]).await.unwrap());
    h.sync().await;
    assert_eq!(h.special(SfiOpcode::GetState as u16, &[]).await, (vec![SfiState::Failed as u8, 0x01, 0x02], 0));
    h.write_memory(0x0800_0000, &[1, 2, 3, 4, 5, 6, 7, 8]).await;
    // Readout Protect: ACK, ACK, reset.
    h.io_send_readout_protect().await;
    drop(h);
    sim.shutdown().await.unwrap();

    let sim = Simulator::start(config(dir.path(), &key)).await.unwrap();
    let t1 = sim.target(1).unwrap();
    assert_eq!(t1.with_device(|d| d.rdp_level()), RdpLevel::Level1);
    assert_eq!(t1.flash_image()[..8], [1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(dump_flash(&state, 1).unwrap(), t1.flash_image());
    assert_eq!(sim.target(0).unwrap().with_device(|d| d.rdp_level()), RdpLevel::Level0);
    sim.shutdown().await.unwrap();
    assert!(matches!(dump_flash(&state, 5), Err(StateError::NoSuchTarget { target: 5, .. })));
}

#[tokio::test]
async fn restart_under_another_vendor_ca_keeps_the_device_id() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = write_vendor_ca(&dir.path().join("ca1")).unwrap();
    let (key2, _) = write_vendor_ca(&dir.path().join("ca2")).unwrap();
    let sim = Simulator::start(config(dir.path(), &key)).await.unwrap();
    let before = sim.target(0).unwrap().certificate();
    sim.shutdown().await.unwrap();
    let sim = Simulator::start(config(dir.path(), &key2)).await.unwrap();
    let after = sim.target(0).unwrap().certificate();
    assert_eq!(before.device_id(), after.device_id());
    after.verify(&[load_vendor_ca(&key2).unwrap().public_key()]).unwrap();
    sim.shutdown().await.unwrap();
    // Another family on the same state directory is refused.
    let mut cfg = config(dir.path(), &key);
    cfg.family = Family::Stm32H7;
    assert!(Simulator::start(cfg).await.is_err());
}

#[test]
fn vendor_ca_files() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = write_vendor_ca(dir.path()).unwrap();
    assert_eq!(key, dir.path().join("vendor-ca.key"));
    assert_eq!(public, dir.path().join("vendor-ca.pub"));
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let pem = std::fs::read_to_string(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8 PEM");
    assert!(std::fs::read_to_string(&public).unwrap().starts_with("-----BEGIN PUBLIC KEY-----"), "SPKI PEM");
    let ca = load_vendor_ca(&key).unwrap();
    assert_eq!(ca.public_key().to_pem(), std::fs::read_to_string(&public).unwrap());
    assert!(matches!(write_vendor_ca(dir.path()), Err(StateError::AlreadyExists { .. })));
    std::fs::write(dir.path().join("bad.key"), "nonsense").unwrap();
    let err = load_vendor_ca(&dir.path().join("bad.key")).unwrap_err();
    assert!(err.to_string().contains("bad.key"), "{err}");
}
