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

use crate::support::{
    BIN, BrokerProcess, PASSPHRASE, Reaped, admin, create_batch, free_ports, init_line, spawn_sim, write_agent_config,
};

const TARGETS: u16 = 6;
const KILLS: usize = 50;

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
    let cfg = init_line(dir);
    let mut broker = BrokerProcess::start(dir, &cfg);
    let firmware: Vec<u8> = (0..16_384u32).map(|i| (i * 13) as u8).collect();
    create_batch(dir, &broker.url, "lot-c", u32::from(TARGETS), &firmware);
    // Real-time-ish targets (speed 8: an install takes a few hundred ms), so kills land mid-install.
    let port = free_ports(TARGETS);
    let _sim = spawn_sim(dir, TARGETS, "8", port, &["--state-dir", "simstate"]);
    write_agent_config(dir, &broker.url, port, TARGETS, "");
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
            write_agent_config(dir, &broker.url, port, TARGETS, "");
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
