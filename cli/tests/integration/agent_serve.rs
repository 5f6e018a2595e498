//! The station daemon driven from the operator's side, all as separate processes: a `flashgate broker`
//! (soft HSM, SQLite), a `flashgate sim` with two targets, and `flashgate agent serve` attached to the
//! broker. Nothing installs until `flashgate admin station assign berlin/1 BATCH` is pushed over the
//! station's stream; then both devices install, `admin stations` shows the station online with its
//! probes and counts, and the daemon stops cleanly on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{
    BIN, BrokerProcess, PASSPHRASE, Reaped, admin, create_batch, free_ports, init_line, spawn_sim, write_agent_config,
};

#[test]
fn an_assignment_pushed_from_admin_reaches_the_daemon_and_installs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = init_line(dir);
    let broker = BrokerProcess::start(dir, &cfg);
    create_batch(dir, &broker.url, "lot-9", 5, &[0xA5u8; 8192]);
    let port = free_ports(2);
    let _sim = spawn_sim(dir, 2, "0", port, &[]);
    write_agent_config(dir, &broker.url, port, 2, "[station]\nheartbeat_interval = \"1s\"\n");
    let mut agent = Reaped(
        Command::new(BIN)
            .args(["agent", "serve", "--config", "agent.toml"])
            .current_dir(dir)
            .env("FLASHGATE_KEYSTORE_PASSPHRASE", PASSPHRASE)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );

    // Online and idle: nothing installs without an assignment.
    let station = "spiffe://factory.test/site/berlin/station/1";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = admin(dir, &broker.url, &["stations"]);
        let me = st.as_array().and_then(|a| a.iter().find(|s| s["identity"] == station)).cloned();
        if me.as_ref().is_some_and(|m| m["online"] == serde_json::Value::Bool(true)) {
            break;
        }
        assert!(Instant::now() < deadline, "the station never came online: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = admin(dir, &broker.url, &["batch", "status", "lot-9"]);
    assert_eq!(before["issued"].as_i64(), Some(0), "{before}");

    admin(dir, &broker.url, &["station", "assign", "berlin/1", "lot-9"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let s = admin(dir, &broker.url, &["batch", "status", "lot-9"]);
        if s["installed"].as_i64() == Some(2) {
            break s;
        }
        assert!(Instant::now() < deadline, "the assignment did not install both devices: {s}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(status["issued"].as_i64(), Some(2), "{status}");

    let st = admin(dir, &broker.url, &["stations"]);
    let me = st.as_array().and_then(|a| a.iter().find(|s| s["identity"] == station)).cloned().unwrap();
    assert_eq!(me["online"], serde_json::Value::Bool(true), "{me}");
    assert_eq!(me["assigned_batch"].as_str(), Some("lot-9"), "{me}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.0.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let code = agent.0.wait().unwrap();
    assert!(code.success(), "agent serve exits 0 on SIGTERM: {code:?}");
    assert!(broker.stop().success());
}

/// Issue 11 item 7: `agent run` tells a script what happened by its exit code: 80 when the broker
/// refused some boards (quota 1 for 2 boards), 77 when the broker refuses the station itself (its
/// certificate revoked), each with the reason in words.
#[test]
fn agent_run_exit_codes_tell_refusals_from_a_refused_station() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = init_line(dir);
    let broker = BrokerProcess::start(dir, &cfg);
    create_batch(dir, &broker.url, "lot-1", 1, &[0x5Au8; 4096]);
    let port = free_ports(2);
    let _sim = spawn_sim(dir, 2, "0", port, &[]);
    write_agent_config(dir, &broker.url, port, 2, "");
    std::thread::sleep(Duration::from_millis(300));
    let run = || {
        Command::new(BIN)
            .args(["agent", "run", "--config", "agent.toml", "--batch", "lot-1", "--once"])
            .current_dir(dir)
            .output()
            .unwrap()
    };
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(80), "quota 1 for 2 boards: {err}");
    assert!(err.contains("refused by the broker") && err.contains("QUOTA_EXHAUSTED"), "{err}");

    // The station's certificate revoked: 77, in words.
    let stations = admin(dir, &broker.url, &["stations"]);
    let serial = stations[0]["certificates"][0]["serial"].as_str().unwrap().to_owned();
    admin(dir, &broker.url, &["station", "revoke", "--serial", &serial, "--reason", "stolen"]);
    let started = Instant::now();
    let out = run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains("certificate revoked"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "the run waited for a broker");
}
