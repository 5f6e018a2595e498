//! Shared by the process-level tests: the `flashgate` binary, a broker child process (its address read
//! from its first line, SIGTERM to stop), a broker configuration on loopback, and `flashgate admin --json`.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_flashgate");
pub const PASSPHRASE: &str = "correct horse battery staple";

pub fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("FLASHGATE_KEYSTORE_PASSPHRASE", PASSPHRASE)
        .output()
        .expect("run flashgate")
}

pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "flashgate {args:?} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A `flashgate broker` child; SIGTERM on drop.
pub struct BrokerProcess {
    pub child: Child,
    pub url: String,
}

impl BrokerProcess {
    pub fn start(dir: &Path, config: &Path) -> Self {
        let mut child = Command::new(BIN)
            .args(["--log", "info", "broker", "--config"])
            .arg(config)
            .current_dir(dir)
            .env("FLASHGATE_KEYSTORE_PASSPHRASE", PASSPHRASE)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn broker");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().expect("broker printed nothing").unwrap();
        let addr = line
            .split(" serving gRPC on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line from broker: {line}"))
            .to_owned();
        // Keep draining stdout so the broker never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        BrokerProcess { child, url: format!("https://{addr}") }
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write_config(dir: &Path, name: &str, ledger_url: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"name = "{name}"
trust_domain = "factory.test"
[listen]
grpc = "127.0.0.1:0"
[tls]
cert = "pki/brokers/{name}.pem"
key = "pki/brokers/{name}.key"
ca = "pki/ca.pem"
[vendor]
ca_keys = ["vendor/vendor-ca.pub"]
[ledger]
url = "{ledger_url}"
[hsm]
timeout = "10s"
[[hsm.members]]
kind = "soft"
path = "{name}.fgks"
"#
        ),
    )
    .unwrap();
    path
}

pub fn admin(dir: &Path, url: &str, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["admin", "--broker", url, "--pki", "pki", "--name", "ops", "--json"];
    full.extend_from_slice(args);
    let out = ok(dir, &full);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("admin {args:?} printed no JSON ({e}): {out}"))
}
