//! PKCS#11 backend against SoftHSM2: licences issued inside the token open on the chip side,
//! image encryption in the token equals `common::sfi::write_image`, the key-file ceremony puts the
//! same key into two tokens that both issue valid licences, the audit-signing key pair generated on
//! the token once (found again by label after a reconnect) signs checkpoints that verify, and a
//! throughput smoke figure.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, when the module is initialised (once per process). So this
//! binary has one process-wide fixture: on first use it writes a configuration pointing at a
//! temporary token directory, creates every token the tests use (`softhsm2-util --init-token`, run
//! as a child with that environment), and sets `SOFTHSM2_CONF` for this process before any test
//! loads the module (all tests wait on the fixture first). Each test uses its own token.
//! Without softhsm2 the tests are skipped with a printed reason, unless
//! `FLASHGATE_REQUIRE_SOFTHSM=1`, in which case they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use flashgate_broker::hsm::{HsmBackend, HsmError, HsmPool, Pkcs11Config, Pkcs11Hsm, PoolConfig, read_key_files};
use flashgate_common::cert::{ChipCertificate, ChipKey, VendorCa};
use flashgate_common::licence::{KeyId, open_licence};
use flashgate_common::sfi::{AreaType, FirmwareKey, ImageNonce, PlainArea, decrypt_image, image_to_vec};
use rand::SeedableRng;
use rand::rngs::StdRng;
use zeroize::Zeroizing;

const PRODUCT: [u8; 8] = *b"46201002";
const TOKENS: [&str; 6] = ["fg-lic", "fg-img", "fg-a", "fg-b", "fg-perf", "fg-audit"];
const PIN: &str = "1234";

struct Fixture {
    _dir: tempfile::TempDir,
    module: PathBuf,
}

fn find_module() -> Option<PathBuf> {
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib64/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let required = std::env::var("FLASHGATE_REQUIRE_SOFTHSM").is_ok_and(|v| v == "1");
            let util_ok = Command::new("softhsm2-util").arg("--version").output().is_ok_and(|o| o.status.success());
            let module = find_module();
            let (true, Some(module)) = (util_ok, module) else {
                let reason =
                    "softhsm2 is not installed (softhsm2-util or libsofthsm2.so missing; apt-get install softhsm2)";
                assert!(!required, "FLASHGATE_REQUIRE_SOFTHSM=1 but {reason}");
                eprintln!("SKIPPED: {reason}");
                return None;
            };
            let dir = tempfile::tempdir().unwrap();
            let tokens = dir.path().join("tokens");
            std::fs::create_dir(&tokens).unwrap();
            let conf = dir.path().join("softhsm2.conf");
            std::fs::write(
                &conf,
                format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
            )
            .unwrap();
            for label in TOKENS {
                let out = Command::new("softhsm2-util")
                    .env("SOFTHSM2_CONF", &conf)
                    .args(["--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", "5678"])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "softhsm2-util --init-token {label}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            set_conf(&conf);
            Some(Fixture { _dir: dir, module })
        })
        .as_ref()
}

#[allow(unsafe_code)]
fn set_conf(conf: &Path) {
    // SAFETY: called once, inside the fixture's OnceLock initialisation, before any test thread
    // loads the PKCS#11 module (every test waits on the fixture first); nothing else in this test
    // binary reads the environment from C code concurrently.
    unsafe { std::env::set_var("SOFTHSM2_CONF", conf) };
}

fn connect(fx: &Fixture, token: &str, sessions: usize) -> Pkcs11Hsm {
    let mut cfg = Pkcs11Config::new(&fx.module, token, Zeroizing::new(PIN.to_string()));
    cfg.sessions = sessions;
    Pkcs11Hsm::connect(cfg).unwrap()
}

fn chip(seed: u64) -> (ChipKey, ChipCertificate) {
    let mut rng = StdRng::seed_from_u64(seed);
    let ca = VendorCa::generate(&mut rng);
    let chip = ChipKey::generate(&mut rng);
    let cert = ca.sign_certificate(PRODUCT, chip.public_xy());
    cert.verify(&[ca.public_key()]).unwrap();
    (chip, cert)
}

fn areas() -> Vec<PlainArea> {
    vec![
        PlainArea {
            area_type: AreaType::Firmware,
            address: 0x0800_0000,
            data: (0..1000u32).map(|i| i as u8).collect(),
        },
        PlainArea { area_type: AreaType::Pause, address: 0x2000_0000, data: vec![] },
        PlainArea { area_type: AreaType::Resume, address: 0x2000_0000, data: vec![] },
        PlainArea { area_type: AreaType::Config, address: 0, data: vec![0; 8] },
    ]
}

#[test]
fn hsm_softhsm_licence_from_generated_key_opens_on_the_chip() {
    let Some(fx) = fixture() else { return };
    let hsm = connect(fx, "fg-lic", 2);
    assert_eq!(hsm.name(), "pkcs11:fg-lic");
    hsm.health().unwrap();
    let info = hsm.generate_key("fw-generated").unwrap();
    assert!(hsm.has_key(&info.key_id).unwrap());
    assert_eq!(hsm.list_keys().unwrap(), vec![info.clone()]);
    let (chip, cert) = chip(1);
    let nonce = ImageNonce([7; 12]);
    let lic = hsm.issue_licence(&info.key_id, &cert, &nonce).unwrap();
    let (key, n) = open_licence(&lic, &chip, &PRODUCT).expect("a SoftHSM2 licence opens on the chip");
    assert_eq!(n, nonce);
    // The key the chip recovered decrypts an image the token encrypted.
    let image = hsm.encrypt_image(&info.key_id, &nonce, &areas()).unwrap();
    assert_eq!(decrypt_image(&key, &nonce, &image, None).unwrap(), areas());
    // Another chip cannot open it; a second licence uses a fresh ephemeral key.
    assert!(open_licence(&lic, &chip_other(), &PRODUCT).is_err());
    let lic2 = hsm.issue_licence(&info.key_id, &cert, &nonce).unwrap();
    assert_ne!(lic.eph_pub, lic2.eph_pub);
    // Unknown keys are a logical error.
    let e = hsm.issue_licence(&KeyId([0; 16]), &cert, &nonce).unwrap_err();
    assert!(matches!(e, HsmError::UnknownKey { .. }) && !e.is_device_error(), "{e}");
}

#[test]
fn hsm_softhsm_audit_key_is_generated_once_and_signs_checkpoints() {
    use flashgate_common::checkpoint::{CheckpointHead, SignedCheckpoint};
    let Some(fx) = fixture() else { return };
    let hsm = connect(fx, "fg-audit", 2);
    let e = hsm.sign_audit(b"before").unwrap_err();
    assert!(matches!(e, HsmError::NoAuditKey { .. }), "{e}");
    let vk = hsm.ensure_audit_key().unwrap();
    assert_eq!(hsm.ensure_audit_key().unwrap(), vk, "the key pair is generated once");
    // Another connection (a broker restart) finds the same key pair on the token by its label.
    let again = connect(fx, "fg-audit", 1);
    assert_eq!(again.ensure_audit_key().unwrap(), vk);
    let head =
        CheckpointHead { ledger_id: [3; 16], seq: 42, hash: [9; 32], at: 1_800_000_000, broker: "broker-1".into() };
    let sig = again.sign_audit(&head.body().unwrap()).unwrap();
    let cp = SignedCheckpoint::from_parts(head, sig).unwrap();
    assert_eq!(cp.verify(&[vk]), Ok(0), "CKM_ECDSA over SHA-256 of the body verifies as a checkpoint signature");
    // Firmware keys are not confused with it.
    assert!(hsm.list_keys().unwrap().is_empty());
}

fn chip_other() -> ChipKey {
    ChipKey::generate(&mut StdRng::seed_from_u64(999))
}

#[test]
fn hsm_softhsm_import_and_encrypt_image_equal_write_image() {
    let Some(fx) = fixture() else { return };
    let hsm = connect(fx, "fg-img", 2);
    let key = FirmwareKey::new(*b"0123456789abcdef");
    let info = hsm.import_key("fw-imported", &key).unwrap();
    let e = hsm.import_key_with_id(info.key_id, "again", &key).unwrap_err();
    assert!(matches!(e, HsmError::DuplicateKey { .. }), "{e}");
    let nonce = ImageNonce([0xC3; 12]);
    assert_eq!(
        hsm.encrypt_image(&info.key_id, &nonce, &areas()).unwrap(),
        image_to_vec(&key, &nonce, &areas()).unwrap()
    );
    // A nonce whose counter wraps (area IVs add the index mod 2^32).
    let nonce = ImageNonce([0xFF; 12]);
    assert_eq!(
        hsm.encrypt_image(&info.key_id, &nonce, &areas()).unwrap(),
        image_to_vec(&key, &nonce, &areas()).unwrap()
    );
    // Invalid images are refused before the token is used.
    assert!(matches!(hsm.encrypt_image(&info.key_id, &nonce, &[]).unwrap_err(), HsmError::Image(_)));
    let (chip, cert) = chip(2);
    let lic = hsm.issue_licence(&info.key_id, &cert, &nonce).unwrap();
    assert_eq!(open_licence(&lic, &chip, &PRODUCT).unwrap().0, key);
    // Token selection is by label; a missing label names the tokens present.
    let e = Pkcs11Hsm::connect(Pkcs11Config::new(&fx.module, "no-such-token", Zeroizing::new(PIN.into()))).unwrap_err();
    assert!(matches!(e, HsmError::TokenNotFound { .. }) && e.to_string().contains("fg-img"), "{e}");
    // A wrong PIN is a C_Login error that does not echo the PIN.
    let e = Pkcs11Hsm::connect(Pkcs11Config::new(&fx.module, "fg-perf", Zeroizing::new("99999".into()))).unwrap_err();
    assert!(e.to_string().contains("C_Login") && !e.to_string().contains("99999"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_softhsm_key_file_ceremony_two_tokens_both_issue() {
    let Some(fx) = fixture() else { return };
    // ST-style key files, as `flashgate pack --generate-key` writes them.
    let files = tempfile::tempdir().unwrap();
    let (key_path, nonce_path) = (files.path().join("key.bin"), files.path().join("nonce.bin"));
    std::fs::write(&key_path, [0x5A; 16]).unwrap();
    std::fs::write(&nonce_path, [0x01; 12]).unwrap();
    let (key, nonce) = read_key_files(&key_path, &nonce_path).unwrap();
    let a: Arc<dyn HsmBackend> = Arc::new(connect(fx, "fg-a", 2));
    let b: Arc<dyn HsmBackend> = Arc::new(connect(fx, "fg-b", 2));
    let pool = HsmPool::new(vec![a.clone(), b.clone()], PoolConfig::default()).unwrap();
    let info = pool.import_key("fw-ceremony", key.clone()).await.unwrap();
    // Then the files are destroyed.
    std::fs::remove_file(&key_path).unwrap();
    std::fs::remove_file(&nonce_path).unwrap();
    assert!(pool.has_key(info.key_id).await.unwrap());
    assert_eq!(a.list_keys().unwrap(), b.list_keys().unwrap(), "same key id and label in both tokens");
    // Verification step: each member issues a licence that opens with a test chip.
    let (chip, cert) = chip(3);
    for m in [&a, &b] {
        let lic = m.issue_licence(&info.key_id, &cert, &nonce).unwrap();
        assert_eq!(open_licence(&lic, &chip, &PRODUCT).unwrap(), (key.clone(), nonce), "member {}", m.name());
    }
    // Through the pool, with one token pulled.
    assert!(pool.mark_unhealthy("pkcs11:fg-a", "maintenance"));
    let lic = pool.issue_licence(info.key_id, cert.clone(), nonce).await.unwrap();
    assert_eq!(open_licence(&lic, &chip, &PRODUCT).unwrap().0, key);
    assert_eq!(pool.status()[1].requests, 1);
}

#[test]
fn hsm_softhsm_throughput_smoke() {
    let Some(fx) = fixture() else { return };
    let sessions = 4;
    let hsm = Arc::new(connect(fx, "fg-perf", sessions));
    let info = hsm.generate_key("fw-perf").unwrap();
    let (_, cert) = chip(4);
    let per_thread = 150;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..sessions {
            let (hsm, cert) = (hsm.clone(), cert.clone());
            s.spawn(move || {
                for _ in 0..per_thread {
                    hsm.issue_licence(&info.key_id, &cert, &ImageNonce([1; 12])).unwrap();
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64().max(Duration::from_micros(1).as_secs_f64());
    println!(
        "SoftHSM2: {} licences on {sessions} sessions in {secs:.3} s = {:.0} licences/s",
        sessions * per_thread,
        (sessions * per_thread) as f64 / secs
    );
}
