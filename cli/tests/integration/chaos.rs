//! Chaos on the station (issue 11 item 9): `flashgate agent run` is killed with SIGKILL at random
//! points of a batch 50 times (and the broker too, at other random points, every 10th round),
//! restarting each. In the end every device has exactly one verdict: one licence, one installed
//! result at the broker and in the journal, device by device; no failed report was caused by an
//! interruption alone (an interrupted SFI session is aborted on the next attempt; a board killed
//! after INSTALL is recognised by the journal's begin record and its result recovered). The seed is
//! printed; `FLASHGATE_CHAOS_SEED=N` replays a run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::support::{BIN, BrokerProcess, PASSPHRASE, admin, ok, write_config};

const TARGETS: u16 = 6;
const KILLS: usize = 50;

struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port_base() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = l.local_addr().unwrap().port();
    drop(l);
    // A base with room for the targets after it, away from the ephemeral range's start.
    if p > 60_000 { p - 1_000 } else { p }
}

fn write_agent_config(dir: &Path, broker_url: &str, port: u16) {
    let mut probes = String::new();
    for i in 0..TARGETS {
        probes
            .push_str(&format!("[[probes.static]]\nid = \"fixture-{i}\"\ntarget = \"tcp://127.0.0.1:{}\"\n", port + i));
    }
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "[broker]\nendpoints = [\"{broker_url}\"]\n[tls]\ncert = \"pki/stations/berlin-1.pem\"\n\
             key = \"pki/stations/berlin-1.key\"\nca = \"pki/ca.pem\"\n[state]\ndir = \"agent-state\"\n\
             [probes]\nusb_scan = false\n{probes}"
        ),
    )
    .unwrap();
}

fn agent_run(dir: &Path) -> Reaped {
    Reaped(
        Command::new(BIN)
            .args(["agent", "run", "--config", "agent.toml", "--batch", "lot-c", "--once"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn kill9(child: &mut Reaped) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), nix::sys::signal::Signal::SIGKILL);
    let _ = child.0.wait();
}

#[test]
fn agent_and_broker_killed_at_random_points_lose_and_duplicate_nothing() {
    let seed: u64 =
        std::env::var("FLASHGATE_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("chaos seed {seed} (FLASHGATE_CHAOS_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
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
    let cfg = write_config(dir, "broker-1", "sqlite://ledger.db");
    let mut broker = BrokerProcess::start(dir, &cfg);
    let key = admin(dir, &broker.url, &["key", "generate", "--label", "fw"]);
    let key_id = key["key_id"].as_str().unwrap().to_owned();
    std::fs::write(dir.join("fw.bin"), (0..16_384u32).map(|i| (i * 13) as u8).collect::<Vec<u8>>()).unwrap();
    let img =
        admin(dir, &broker.url, &["image", "pack", "--key-id", &key_id, "--family", "stm32l4", "fw.bin@0x08000000"]);
    let sha = img["sha256"].as_str().unwrap().to_owned();
    let quota = TARGETS.to_string();
    admin(
        dir,
        &broker.url,
        &["batch", "create", "lot-c", "--product", "46201002", "--image", &sha, "--quota", &quota, "--site", "berlin"],
    );
    // Real-time-ish targets (speed 8: an install takes a few hundred ms), so kills land mid-install.
    let port = free_port_base();
    let _sim = Reaped(
        Command::new(BIN)
            .args(["sim", "--targets", &TARGETS.to_string(), "--speed", "8", "--state-dir", "simstate"])
            .args(["--vendor-ca", "vendor/vendor-ca.key", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    write_agent_config(dir, &broker.url, port);
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    for round in 0..KILLS {
        let mut agent = agent_run(dir);
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..700)));
        if round % 10 == 9 {
            // The broker dies at another point of the same run; the agent meets a dead broker too.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(broker.child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = broker.child.wait();
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
            broker = BrokerProcess::start(dir, &cfg);
            write_agent_config(dir, &broker.url, port);
            std::thread::sleep(Duration::from_millis(rng.gen_range(20..400)));
        }
        kill9(&mut agent);
    }
    eprintln!("{KILLS} kills in {:?}", started.elapsed());

    // Then runs that are left alone, until every device has its verdict.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = Command::new(BIN)
            .args(["agent", "run", "--config", "agent.toml", "--batch", "lot-c", "--once"])
            .current_dir(dir)
            .env("FLASHGATE_KEYSTORE_PASSPHRASE", PASSPHRASE)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        let s = admin(dir, &broker.url, &["batch", "status", "lot-c"]);
        if s["installed"].as_i64() == Some(i64::from(TARGETS)) {
            eprintln!("final run exit {status:?}; batch {s}");
            break;
        }
        assert!(Instant::now() < deadline, "the line never completed after the chaos: {s}");
    }
    let s = admin(dir, &broker.url, &["batch", "status", "lot-c"]);
    assert_eq!(s["issued"].as_i64(), Some(i64::from(TARGETS)), "{s}");
    assert_eq!(s["failed"].as_i64(), Some(0), "a failed report caused by an interruption alone: {s}");

    // The journal, device by device, against the ledger.
    let text = std::fs::read_to_string(dir.join("agent-state/journal/journal.jsonl")).unwrap();
    let mut journal_installed: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["kind"] == "result" && v["result"]["status_code"] == 0 {
            *journal_installed.entry(v["result"]["device_id"].as_str().unwrap().to_owned()).or_default() += 1;
        }
    }
    assert_eq!(journal_installed.len(), usize::from(TARGETS), "{journal_installed:?}");
    let mut seen = HashSet::new();
    for (device, n) in &journal_installed {
        assert_eq!(*n, 1, "device {device} has {n} installed results in the journal");
        let h = admin(dir, &broker.url, &["device", device]);
        assert_eq!(h["licences"].as_array().unwrap().len(), 1, "{h}");
        let installs = h["installs"].as_array().unwrap();
        assert_eq!(installs.len(), 1, "one verdict per device: {h}");
        assert_eq!(installs[0]["status_code"], 0, "{h}");
        seen.insert(device.clone());
    }
    assert_eq!(seen.len(), usize::from(TARGETS));
    admin(dir, &broker.url, &["audit", "verify"]);
    assert!(broker.stop().success());
}
