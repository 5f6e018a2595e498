//! Issue 12 item 2: the systemd units of `deploy/systemd/` and the example configurations of
//! `deploy/config/` work together. The units pass `systemd-analyze verify` in a temporary root that
//! holds the built binary at their `ExecStart=` path and this host's system units; the example
//! configurations, installed where the units say into a temporary root standing in for `/etc`,
//! `/var/lib` and `/run/credentials`, pass `broker --check` and run — the broker and an agent started
//! with what systemd gives the units (`STATE_DIRECTORY`, `CREDENTIALS_DIRECTORY` holding the
//! `LoadCredential=` files, no passphrase in the environment) write only below `var/lib`, and a
//! device is installed through them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::{BIN, Reaped, admin, create_batch, lock_fixed_ports, spawn_sim};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The settings of a unit file this test relies on.
#[derive(Debug, Default)]
struct Unit {
    exec: Vec<String>,
    configuration_directory: String,
    state_directory: String,
    /// `LoadCredential=NAME:SOURCE` pairs.
    credentials: Vec<(String, String)>,
}

fn unit(name: &str) -> Unit {
    let text = std::fs::read_to_string(repo().join("deploy/systemd").join(name)).unwrap();
    let mut u = Unit::default();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.split_once('=') else { continue };
        match key {
            "ExecStart" | "ExecStartPre" => u.exec.push(value.to_string()),
            "ConfigurationDirectory" => u.configuration_directory = value.to_string(),
            "StateDirectory" => u.state_directory = value.to_string(),
            "LoadCredential" => {
                let (n, src) = value.split_once(':').unwrap_or_else(|| panic!("{name}: LoadCredential={value}"));
                u.credentials.push((n.to_string(), src.to_string()));
            }
            _ => {}
        }
    }
    u
}

/// The `--config` file of a unit's `ExecStart=`, checked to lie in its `ConfigurationDirectory=`.
fn config_path(name: &str, u: &Unit) -> String {
    let start = u.exec.iter().find(|e| !e.ends_with("--check")).unwrap_or_else(|| panic!("{name}: no ExecStart"));
    let words: Vec<&str> = start.split_whitespace().collect();
    let config = words.iter().skip_while(|w| **w != "--config").nth(1).unwrap_or_else(|| panic!("{start}"));
    assert_eq!(
        Path::new(config).parent(),
        Some(Path::new("/etc").join(&u.configuration_directory).as_path()),
        "{name}: --config {config} is not in ConfigurationDirectory={}",
        u.configuration_directory
    );
    (*config).to_string()
}

/// `root` + an absolute path.
fn under(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

/// Every file below `dir`, relative.
fn files(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        assert!(
            std::env::var_os("FLASHGATE_REQUIRE_SYSTEMD_ANALYZE").is_none(),
            "FLASHGATE_REQUIRE_SYSTEMD_ANALYZE is set but systemd-analyze is not installed"
        );
        eprintln!("skipping: systemd-analyze is not installed (Debian: apt-get install systemd)");
        return;
    };
    assert!(version.status.success());
    let units = ["flashgate-broker.service", "flashgate-agent.service"];
    // A root of its own: the host's system units (sysinit.target and the rest the units pull in), the
    // units under test in etc/systemd/system, and the built binary where ExecStart= looks for it.
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    std::fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
    let copied = Command::new("cp").arg("-a").arg("/usr/lib/systemd/system").arg(r.join("usr/lib/systemd/")).status();
    assert!(copied.unwrap().success(), "copying /usr/lib/systemd/system into the verification root");
    let mut binaries = BTreeSet::new();
    for name in units {
        std::fs::copy(repo().join("deploy/systemd").join(name), r.join("etc/systemd/system").join(name)).unwrap();
        for exec in unit(name).exec {
            binaries.insert(exec.split_whitespace().next().unwrap().to_string());
        }
    }
    assert_eq!(binaries.iter().collect::<Vec<_>>(), ["/usr/local/bin/flashgate"], "the units run one binary");
    let bin = under(r, "/usr/local/bin/flashgate");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    if std::fs::hard_link(BIN, &bin).is_err() {
        std::fs::copy(BIN, &bin).unwrap();
    }
    let out = Command::new("systemd-analyze").arg("verify").arg(format!("--root={}", r.display())).args(units).output();
    let out = out.unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Unknown keys and bad values are only warnings to systemd-analyze (exit 0): any output fails.
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify {units:?}:\n{said}");
}

#[test]
fn the_example_configurations_installed_as_the_units_say_check_and_run() {
    let broker_unit = unit("flashgate-broker.service");
    let agent_unit = unit("flashgate-agent.service");
    let broker_toml = config_path("flashgate-broker.service", &broker_unit);
    let agent_toml = config_path("flashgate-agent.service", &agent_unit);
    assert_eq!(broker_toml, "/etc/flashgate/broker.toml");
    assert_eq!(agent_toml, "/etc/flashgate/agent.toml");
    assert!(
        broker_unit.exec.iter().any(|e| e.ends_with(&format!("--config {broker_toml} --check"))),
        "the broker unit checks its configuration first: {:?}",
        broker_unit.exec
    );
    let passphrase = flashgate_broker::config::PASSPHRASE_CREDENTIAL;
    let Some((_, passphrase_source)) = broker_unit.credentials.iter().find(|(n, _)| n == passphrase) else {
        panic!("the broker unit loads no {passphrase} credential: {:?}", broker_unit.credentials)
    };

    // The root: /etc/flashgate as the units' comments list it, the state directories systemd creates,
    // the credentials directory systemd fills from the LoadCredential= sources.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let etc = under(&root, "/etc/flashgate");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::copy(repo().join("deploy/config/broker.toml"), under(&root, &broker_toml)).unwrap();
    std::fs::copy(repo().join("deploy/config/agent.toml"), under(&root, &agent_toml)).unwrap();
    let pki = etc.join("pki");
    let init = Command::new(BIN)
        .args(["pki", "init", "--dir"])
        .arg(&pki)
        .args(["--trust-domain", "factory.test", "--site", "berlin", "--stations", "1", "--admin", "ops"])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let vendor = Command::new(BIN).args(["sim", "vendor-ca", "--out"]).arg(etc.join("vendor")).output().unwrap();
    assert!(vendor.status.success());
    let source = under(&root, passphrase_source);
    std::fs::create_dir_all(source.parent().unwrap()).unwrap();
    std::fs::write(&source, "correct horse battery staple\n").unwrap();
    let credentials = under(&root, "/run/credentials/flashgate-broker.service");
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::copy(&source, credentials.join(passphrase)).unwrap();
    let broker_state = under(&root, &format!("/var/lib/{}", broker_unit.state_directory));
    let agent_state = under(&root, &format!("/var/lib/{}", agent_unit.state_directory));
    std::fs::create_dir_all(&broker_state).unwrap();
    std::fs::create_dir_all(&agent_state).unwrap();
    let etc_before = files(&etc);

    let broker_cmd = || {
        let mut c = Command::new(BIN);
        c.arg("broker")
            .arg("--config")
            .arg(under(&root, &broker_toml))
            .current_dir(&broker_state)
            .env("STATE_DIRECTORY", &broker_state)
            .env("CREDENTIALS_DIRECTORY", &credentials)
            .env_remove("FLASHGATE_KEYSTORE_PASSPHRASE");
        c
    };
    // ExecStartPre=: the check passes, creating nothing.
    let out = broker_cmd().arg("--check").output().unwrap();
    assert!(out.status.success(), "broker --check:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(files(&broker_state).is_empty(), "--check created {:?}", files(&broker_state));
    // Without the credential (a unit missing LoadCredential=) the check names the ways to give it.
    let out = broker_cmd().arg("--check").env_remove("CREDENTIALS_DIRECTORY").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("LoadCredential") && err.contains(passphrase), "{err}");

    // ExecStart=: on the example's own ports (0.0.0.0:7443, metrics 127.0.0.1:9464), as installed.
    let _ports = lock_fixed_ports(&[7000, 7443, 9464]);
    let mut child = broker_cmd().stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("the broker printed nothing").unwrap();
    std::thread::spawn(move || for _ in lines {});
    let broker = Reaped(child);
    assert!(first.contains("serving gRPC on 0.0.0.0:7443"), "{first}");
    assert!(first.contains(&broker_state.join("ledger.db").display().to_string()), "ledger in the state dir: {first}");

    // An operator's desk: the admin identity and the vendor CA of the installed PKI.
    let desk = tmp.path().join("desk");
    std::fs::create_dir(&desk).unwrap();
    std::os::unix::fs::symlink(&pki, desk.join("pki")).unwrap();
    std::os::unix::fs::symlink(etc.join("vendor"), desk.join("vendor")).unwrap();
    create_batch(&desk, "https://127.0.0.1:7443", "lot-1", 10, &[0xA5u8; 8192]);
    let _sim = spawn_sim(&desk, 1, "0", 7000, &[]);

    // The agent as its unit runs it (one device: --once), with the example's probe and broker.
    let out = Command::new(BIN)
        .args(["agent", "run", "--batch", "lot-1", "--once", "--config"])
        .arg(under(&root, &agent_toml))
        .current_dir(&agent_state)
        .env("STATE_DIRECTORY", &agent_state)
        .output()
        .unwrap();
    assert!(out.status.success(), "agent run:\n{}", String::from_utf8_lossy(&out.stderr));
    let status = admin(&desk, "https://127.0.0.1:7443", &["batch", "status", "lot-1"]);
    assert_eq!(status["installed"].as_u64(), Some(1), "{status}");
    drop(broker);

    // Written: only the state directories. /etc/flashgate is as it was installed.
    assert_eq!(files(&etc), etc_before, "the broker or the agent wrote into /etc/flashgate");
    let state = files(&broker_state);
    assert!(state.contains(Path::new("keys.fgks")) && state.contains(Path::new("ledger.db")), "{state:?}");
    assert!(agent_state.join("agent-state/journal").is_dir(), "{:?}", files(&agent_state));
}
