//! Issue 12 item 3: `flashgate broker --check` opens and validates every file the configuration
//! names (TLS, vendor CA keys, secrets, an existing keystore, the ledger's place), creates nothing,
//! names each problem and exits 78; a real start checks all of that before creating anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use crate::support::{BIN, PASSPHRASE, ok, write_config};

fn broker(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("broker")
        .args(args)
        .current_dir(dir)
        .env("FLASHGATE_KEYSTORE_PASSPHRASE", PASSPHRASE)
        .output()
        .unwrap()
}

#[test]
fn check_names_every_problem_creates_nothing_and_exits_78() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(
        dir,
        &["pki", "init", "--dir", "pki", "--trust-domain", "factory.test", "--site", "berlin", "--broker", "broker-1"],
    );
    let cfg = write_config(dir, "broker-1", "sqlite://ledger.db");
    let cfg = cfg.to_str().unwrap();
    // No vendor CA key yet, and the TLS certificate is missing.
    std::fs::rename(dir.join("pki/brokers/broker-1.pem"), dir.join("cert.away")).unwrap();
    let out = broker(dir, &["--config", cfg, "--check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("vendor/vendor-ca.pub"), "{err}");
    assert!(err.contains("broker-1.pem"), "{err}");
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(!dir.join("ledger.db").exists() && !dir.join("broker-1.fgks").exists(), "--check created files");

    // A real start refuses the same way, before creating the ledger or the keystore.
    let out = broker(dir, &["--config", cfg]);
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.join("ledger.db").exists() && !dir.join("broker-1.fgks").exists(), "a failed start created files");

    // Everything in place: OK, and still nothing created.
    std::fs::rename(dir.join("cert.away"), dir.join("pki/brokers/broker-1.pem")).unwrap();
    ok(dir, &["sim", "vendor-ca", "--out", "vendor"]);
    let out = broker(dir, &["--config", cfg, "--check"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
    assert!(!dir.join("ledger.db").exists() && !dir.join("broker-1.fgks").exists());

    // A ledger path that is not a database, and a missing passphrase.
    std::fs::write(dir.join("ledger.db"), b"not a database").unwrap();
    let out = Command::new(BIN)
        .args(["broker", "--config", cfg, "--check"])
        .current_dir(dir)
        .env_remove("FLASHGATE_KEYSTORE_PASSPHRASE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("not an SQLite database") && err.contains("FLASHGATE_KEYSTORE_PASSPHRASE"), "{err}");
}
