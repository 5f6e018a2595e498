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

/// A child process killed when dropped (also when an assertion fails first).
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The first of `n` consecutive loopback ports that are free now (for a simulator's targets).
pub fn free_ports(n: u16) -> u16 {
    loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < 65000 - n && (1..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", port + i)).is_ok()) {
            return port;
        }
    }
}

/// A line's files in `dir`: a PKI (site berlin, station berlin/1, admin ops, broker-1), the
/// simulator's vendor CA in `vendor/`, and broker-1's configuration on an SQLite ledger (returned).
pub fn init_line(dir: &Path) -> PathBuf {
    ok(
        dir,
        &[
            "pki",
            "init",
            "--dir",
            "pki",
            "--trust-domain",
            "factory.test",
            "--site",
            "berlin",
            "--stations",
            "1",
            "--admin",
            "ops",
            "--broker",
            "broker-1",
        ],
    );
    ok(dir, &["sim", "vendor-ca", "--out", "vendor"]);
    write_config(dir, "broker-1", "sqlite://ledger.db")
}

/// Through `admin`: a key generated in the broker's HSM, `firmware` packed for STM32L4 at the start
/// of flash, and batch `batch` of `quota` for site berlin. Returns the image's SHA-256.
pub fn create_batch(dir: &Path, url: &str, batch: &str, quota: u32, firmware: &[u8]) -> String {
    let key = admin(dir, url, &["key", "generate", "--label", "fw"]);
    let key_id = key["key_id"].as_str().unwrap().to_owned();
    std::fs::write(dir.join("fw.bin"), firmware).unwrap();
    let img = admin(dir, url, &["image", "pack", "--key-id", &key_id, "--family", "stm32l4", "fw.bin@0x08000000"]);
    let sha = img["sha256"].as_str().unwrap().to_owned();
    let quota = quota.to_string();
    admin(
        dir,
        url,
        &["batch", "create", batch, "--product", "46201002", "--image", &sha, "--quota", &quota, "--site", "berlin"],
    );
    sha
}

/// A `flashgate sim` process with `targets` STM32L4 targets on consecutive ports from `port`.
pub fn spawn_sim(dir: &Path, targets: u16, speed: &str, port: u16, extra: &[&str]) -> Reaped {
    Reaped(
        Command::new(BIN)
            .args(["sim", "--targets", &targets.to_string(), "--speed", speed, "--vendor-ca", "vendor/vendor-ca.key"])
            .args(extra)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// `agent.toml` for station berlin/1 against `broker_url`, with static probes `fixture-1..=targets`
/// on consecutive ports from `port`, and `extra` TOML appended.
pub fn write_agent_config(dir: &Path, broker_url: &str, port: u16, targets: u16, extra: &str) {
    let mut probes = String::new();
    for i in 0..targets {
        probes.push_str(&format!(
            "[[probes.static]]\nid = \"fixture-{}\"\ntarget = \"tcp://127.0.0.1:{}\"\n",
            i + 1,
            port + i
        ));
    }
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "[broker]\nendpoints = [\"{broker_url}\"]\n[tls]\ncert = \"pki/stations/berlin-1.pem\"\n\
             key = \"pki/stations/berlin-1.key\"\nca = \"pki/ca.pem\"\n[state]\ndir = \"agent-state\"\n\
             [probes]\nusb_scan = false\n{probes}{extra}"
        ),
    )
    .unwrap();
}

/// The fixed loopback ports README.md's flows and the installed example configurations use: the
/// simulator's 7000..7003, the broker's 7443 and its metrics' 9464. Tests using them hold this lock
/// (other tests take ephemeral ports, which Linux draws from 32768 up, never these).
pub static FIXED_PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds [`FIXED_PORTS`] and waits until every port in `ports` is free on loopback (a process of an
/// earlier test may still be closing), or panics naming the first one still taken after a minute.
pub fn lock_fixed_ports(ports: &[u16]) -> std::sync::MutexGuard<'static, ()> {
    let guard = FIXED_PORTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for &port in ports {
        while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "port {port} on 127.0.0.1 is taken by another process (`ss -ltnp 'sport = :{port}'` names it); \
                 this test needs it free"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    guard
}

/// A bash script run in its own process group, so that whatever it starts in the background (`cmd
/// &`) is stopped with it: SIGTERM to the whole group on drop, SIGKILL to what is left a moment later.
pub struct ScriptGroup {
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl ScriptGroup {
    /// Runs `script` with `bash -euo pipefail` in `dir`, with the directory of the built `flashgate`
    /// first on PATH and no inherited `FLASHGATE_*` variable; output goes to `dir/../NAME.out|.err`
    /// (`log_dir`), so that background processes never hold a pipe of the test's.
    pub fn start(dir: &Path, log_dir: &Path, name: &str, script: &str) -> Self {
        use std::os::unix::process::CommandExt;
        let bin_dir = Path::new(BIN).parent().unwrap();
        let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
        let stdout = log_dir.join(format!("{name}.out"));
        let stderr = log_dir.join(format!("{name}.err"));
        let mut cmd = Command::new("bash");
        cmd.args(["-euo", "pipefail", "-c", script])
            .current_dir(dir)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .process_group(0);
        for (k, _) in std::env::vars() {
            if k.starts_with("FLASHGATE_") {
                cmd.env_remove(k);
            }
        }
        ScriptGroup { child: cmd.spawn().expect("run bash"), stdout, stderr }
    }

    /// Waits for the script itself (not what it left in the background), at most `timeout`.
    pub fn wait(&mut self, timeout: std::time::Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "the script ran longer than {timeout:?}\n{}", self.output());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// What the script printed so far, both streams.
    pub fn output(&self) -> String {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }
}

impl Drop for ScriptGroup {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, killpg};
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if killpg(group, Signal::SIGTERM).is_ok() {
            // bash itself first (a zombie would keep the group alive), then the rest: SIGTERM lets
            // the broker, agents and simulator close cleanly; what ignores it is killed.
            let _ = self.child.wait();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while killpg(group, None).is_ok() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = killpg(group, Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}
