//! Soft HSM backend: keystore round trip, wrong passphrase, file mode, licences that open on the
//! chip side and equal common's math, image encryption equal to `write_image`, and a throughput
//! smoke figure (printed, not asserted).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Instant;

use flashgate_broker::hsm::{HsmBackend, HsmError, KdfParams, SoftHsm};
use flashgate_common::cert::{ChipKey, VendorCa};
use flashgate_common::licence::{KeyId, open_licence};
use flashgate_common::sfi::{AreaType, FirmwareKey, ImageNonce, PlainArea, decrypt_image, image_to_vec};
use rand::SeedableRng;
use rand::rngs::StdRng;
use zeroize::Zeroizing;

const PRODUCT: [u8; 8] = *b"46201002";

/// Cheap KDF parameters so tests stay fast (production uses `KdfParams::default()`).
fn fast() -> KdfParams {
    KdfParams { m_cost: 64, t_cost: 1, p_cost: 1 }
}

fn pass(s: &str) -> Zeroizing<String> {
    Zeroizing::new(s.to_string())
}

#[test]
fn hsm_soft_keystore_round_trip_and_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.fgks");
    let hsm = SoftHsm::create(&path, &pass("correct horse"), fast()).unwrap();
    let a = hsm.generate_key("fw-a").unwrap();
    let b = hsm.import_key("fw-b", &FirmwareKey::new([0x11; 16])).unwrap();
    assert_ne!(a.key_id, b.key_id);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "keystore mode {mode:o}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"argon2id\""), "{text}");
    assert!(!text.contains(&hex::encode([0x11u8; 16])), "key in clear in the file");
    drop(hsm);

    let hsm = SoftHsm::open(&path, &pass("correct horse")).unwrap();
    let mut keys = hsm.list_keys().unwrap();
    keys.sort_by(|x, y| x.label.cmp(&y.label));
    assert_eq!(keys, vec![a.clone(), b.clone()]);
    assert!(hsm.has_key(&b.key_id).unwrap());
    assert!(!hsm.has_key(&KeyId([0; 16])).unwrap());
    // Duplicate ids are refused and leave the file as it was.
    let before = std::fs::read(&path).unwrap();
    let e = hsm.import_key_with_id(b.key_id, "again", &FirmwareKey::new([1; 16])).unwrap_err();
    assert!(matches!(e, HsmError::DuplicateKey { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // No temporary files left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    assert!(hsm.health().is_ok());
    assert!(hsm.capacity() >= 1);
    // The same key id and image nonce give the same image as common's writer with the imported key.
    let nonce = ImageNonce([5; 12]);
    let areas = vec![PlainArea { area_type: AreaType::Firmware, address: 0x0800_0000, data: vec![0xA5; 100] }];
    assert_eq!(
        hsm.encrypt_image(&b.key_id, &nonce, &areas).unwrap(),
        image_to_vec(&FirmwareKey::new([0x11; 16]), &nonce, &areas).unwrap()
    );
}

#[test]
fn hsm_soft_wrong_passphrase_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.fgks");
    let hsm = SoftHsm::create(&path, &pass("right"), fast()).unwrap();
    hsm.generate_key("fw").unwrap();
    drop(hsm);
    let before = std::fs::read(&path).unwrap();
    let e = SoftHsm::open(&path, &pass("wrong")).unwrap_err();
    assert!(matches!(e, HsmError::WrongPassphrase { .. }), "{e}");
    assert!(e.to_string().contains("wrong passphrase"), "{e}");
    assert!(!e.to_string().contains("wrong\""), "passphrase echoed: {e}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "file changed by a failed open");
    assert!(matches!(SoftHsm::open(&path, &pass("")).unwrap_err(), HsmError::EmptyPassphrase));
    // Creating over an existing keystore is refused.
    assert!(SoftHsm::create(&path, &pass("right"), fast()).is_err());
    // A tampered file is refused the same way (GCM authenticates everything).
    let text = std::fs::read_to_string(&path).unwrap().replace("\"t_cost\": 1", "\"t_cost\": 2");
    std::fs::write(&path, text).unwrap();
    assert!(matches!(SoftHsm::open(&path, &pass("right")).unwrap_err(), HsmError::WrongPassphrase { .. }));
    // Garbage is a format error naming the problem.
    std::fs::write(&path, "{}").unwrap();
    let e = SoftHsm::open(&path, &pass("right")).unwrap_err();
    assert!(matches!(e, HsmError::KeystoreFormat { .. }), "{e}");
}

#[test]
fn hsm_soft_licence_opens_on_the_chip_and_matches_common() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = SoftHsm::create(&dir.path().join("k.fgks"), &pass("p"), fast()).unwrap();
    let key = FirmwareKey::new([0x42; 16]);
    let info = hsm.import_key("fw", &key).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let ca = VendorCa::generate(&mut rng);
    let chip = ChipKey::generate(&mut rng);
    let cert = ca.sign_certificate(PRODUCT, chip.public_xy());
    cert.verify(&[ca.public_key()]).unwrap();
    let nonce = ImageNonce([3; 12]);
    let lic = hsm.issue_licence(&info.key_id, &cert, &nonce).unwrap();
    assert_eq!(lic.key_id, info.key_id);
    let (k, n) = open_licence(&lic, &chip, &PRODUCT).unwrap();
    assert_eq!(k, key);
    assert_eq!(n, nonce);
    // Fresh ephemeral key per licence.
    let lic2 = hsm.issue_licence(&info.key_id, &cert, &nonce).unwrap();
    assert_ne!(lic.eph_pub, lic2.eph_pub);
    // Another chip cannot open it.
    let other = ChipKey::generate(&mut rng);
    assert!(open_licence(&lic, &other, &PRODUCT).is_err());
    // Unknown key is a logical error.
    let e = hsm.issue_licence(&KeyId([9; 16]), &cert, &nonce).unwrap_err();
    assert!(matches!(e, HsmError::UnknownKey { .. }) && !e.is_device_error(), "{e}");
    // An image made in the HSM decrypts with the key the licence carries.
    let areas = vec![
        PlainArea { area_type: AreaType::Firmware, address: 0x0800_0000, data: (0..=255).collect() },
        PlainArea { area_type: AreaType::Config, address: 0, data: vec![0; 8] },
    ];
    let image = hsm.encrypt_image(&info.key_id, &nonce, &areas).unwrap();
    assert_eq!(decrypt_image(&k, &n, &image, None).unwrap(), areas);
}

#[test]
fn hsm_soft_throughput_smoke() {
    let dir = tempfile::tempdir().unwrap();
    let hsm = Arc::new(SoftHsm::create(&dir.path().join("k.fgks"), &pass("p"), fast()).unwrap());
    let info = hsm.generate_key("fw").unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let ca = VendorCa::generate(&mut rng);
    let cert = ca.sign_certificate(PRODUCT, ChipKey::generate(&mut rng).public_xy());
    let threads = 2;
    let per_thread = 500;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (hsm, cert) = (hsm.clone(), cert.clone());
            s.spawn(move || {
                for _ in 0..per_thread {
                    hsm.issue_licence(&info.key_id, &cert, &ImageNonce([1; 12])).unwrap();
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    println!(
        "soft HSM: {} licences on {threads} threads in {secs:.3} s = {:.0} licences/s ({} build)",
        threads * per_thread,
        (threads * per_thread) as f64 / secs,
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
}
