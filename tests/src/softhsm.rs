//! The process-wide SoftHSM2 fixture of a test binary (the pattern of `broker/tests/hsm_softhsm.rs`).
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, when the module is initialised (once per process). So on
//! first use [`fixture`] writes a configuration pointing at a temporary token directory, creates
//! every token in [`TOKENS`] (`softhsm2-util --init-token`, run as a child with that environment),
//! and sets `SOFTHSM2_CONF` for this process before any test loads the module (every test asks
//! for the fixture first). Each test uses its own token, by label.
//!
//! Without softhsm2 [`fixture`] returns `None` after printing why (the test then skips), unless
//! `FLASHGATE_REQUIRE_SOFTHSM=1`, in which case it panics.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use flashgate_broker::hsm::{Pkcs11Config, Pkcs11Hsm};
use zeroize::Zeroizing;

/// Token labels created by the fixture (one per test that needs a token).
pub const TOKENS: [&str; 4] = ["e2e-1", "e2e-2", "e2e-3", "e2e-4"];
/// The user PIN of every token.
pub const PIN: &str = "1234";

/// SoftHSM2 set up for this process.
pub struct SoftHsm2 {
    _dir: tempfile::TempDir,
    module: PathBuf,
}

impl SoftHsm2 {
    /// The PKCS#11 module path.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// The broker's configuration of token `label` with `sessions` sessions.
    pub fn config(&self, label: &str, sessions: usize) -> Pkcs11Config {
        let mut cfg = Pkcs11Config::new(&self.module, label, Zeroizing::new(PIN.to_string()));
        cfg.sessions = sessions;
        cfg
    }

    /// A broker HSM backend on token `label`.
    pub fn connect(&self, label: &str, sessions: usize) -> Pkcs11Hsm {
        Pkcs11Hsm::connect(self.config(label, sessions)).unwrap_or_else(|e| panic!("connect to token {label}: {e}"))
    }
}

fn find_module() -> Option<PathBuf> {
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib64/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// The fixture, or `None` (skip) when softhsm2 is not installed and not required.
pub fn fixture() -> Option<&'static SoftHsm2> {
    static FIXTURE: OnceLock<Option<SoftHsm2>> = OnceLock::new();
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
            let dir = tempfile::tempdir().expect("temp dir");
            let tokens = dir.path().join("tokens");
            std::fs::create_dir(&tokens).expect("token dir");
            let conf = dir.path().join("softhsm2.conf");
            std::fs::write(
                &conf,
                format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
            )
            .expect("write softhsm2.conf");
            for label in TOKENS {
                let out = Command::new("softhsm2-util")
                    .env("SOFTHSM2_CONF", &conf)
                    .args(["--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", "5678"])
                    .output()
                    .expect("run softhsm2-util");
                assert!(
                    out.status.success(),
                    "softhsm2-util --init-token {label}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            set_conf(&conf);
            Some(SoftHsm2 { _dir: dir, module })
        })
        .as_ref()
}

#[allow(unsafe_code)]
fn set_conf(conf: &Path) {
    // SAFETY: called once, inside the fixture's OnceLock initialisation, before any test thread
    // loads the PKCS#11 module (every test that uses SoftHSM2 waits on the fixture first); nothing
    // else in a test binary reads the environment from C code concurrently.
    unsafe { std::env::set_var("SOFTHSM2_CONF", conf) };
}
