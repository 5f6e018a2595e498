//! The multi-site deployment of `deploy/compose/multi-site.yml` under faults, on a real Docker engine:
//! PostgreSQL, two brokers (each with its own SoftHSM2 token holding the same firmware key), four
//! stations on two sites, eight simulated STM32L4 targets each (32 devices) running in real time,
//! one batch with quota 28 for all of them. Station austin/2 is cut off the network first (`docker
//! network disconnect`, 20 s) so it gets the assignment only when it is back, its control stream
//! dead meanwhile. The batch is assigned through broker-1, every station's first endpoint, which
//! is killed (`docker kill`) right after, while the stations are acting on the assignment, and
//! started again 20 s later: the connected stations install and report their results meanwhile,
//! through broker-2. The three connected stations hold 24 devices, fewer than the quota, so the cut
//! station must still get 4 licences and 4 refusals once it is back.
//!
//! Pass ([`Observed::violations`]): exactly 28 devices installed, each with one licence and one
//! install report; the other 4 refused `QUOTA_EXHAUSTED` with no licence; the batch counts agree;
//! every station journal delivered, its results being the ledger's; the audit chain verifies; and
//! the logs show every connected station's calls failing over from the killed broker to the other
//! (and its control stream, where it was on the killed broker), and the cut station noticing the dead
//! link (HTTP/2 keep-alive) and attaching again once reconnected. Everything is read through
//! `flashgate admin`, `flashgate agent journal` and the containers' logs.
//!
//! Docker-only: it runs when `FLASHGATE_COMPOSE=1` (`make compose-test`, part of `make test` whenever
//! a Docker engine answers, and required when `CI=true`), after `deploy/docker/build.sh` built the
//! images. On failure every container's log is saved under `target/compose-faults/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use flashgate_tests::compose::{
    Compose, Expected, Observed, container_log, device_record, devices_in_sim_log, docker_available, journal_rows,
    refusals_in_audit, wait_for,
};
use serde_json::Value;

const PROJECT: &str = "flashgate-faults";
const TARGETS: usize = 8;
const QUOTA: usize = 28;
const BATCH: &str = "lot-faults";
/// 128 KiB of firmware: about 12 s per device on a real-time 115200-baud line.
const IMAGE_BYTES: usize = 128 * 1024;
const BROKERS: [&str; 2] = ["broker-1", "broker-2"];
/// (service, station as `admin station assign` names it, agent config).
const STATIONS: [(&str, &str, &str); 4] = [
    ("station-berlin-1", "berlin/1", "agent-berlin-1.toml"),
    ("station-berlin-2", "berlin/2", "agent-berlin-2.toml"),
    ("station-austin-1", "austin/1", "agent-austin-1.toml"),
    ("station-austin-2", "austin/2", "agent-austin-2.toml"),
];
const CUT: &str = "station-austin-2";
const CUT_IP: &str = "172.28.0.32";
const CUT_FOR: Duration = Duration::from_secs(20);
/// Longer than an install (about 12 s): the connected stations report their results while it is down.
const BROKER_DOWN_FOR: Duration = Duration::from_secs(20);
/// The kill comes this long after the last assignment (made through the broker killed, which pushes
/// it to its stations at once): they are asking it for licences and fetching the image.
const KILL_AFTER: Duration = Duration::from_millis(0);

/// Tears the project down when the test ends; on failure first saves every service's log.
struct Teardown<'a>(&'a Compose);

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/compose-faults");
            let _ = std::fs::create_dir_all(&dir);
            for service in ["db", "setup"].iter().chain(BROKERS.iter()).chain(STATIONS.iter().map(|s| &s.0)) {
                let _ = std::fs::write(dir.join(format!("{service}.log")), self.0.logs(service));
            }
            eprintln!("container logs saved in {}", dir.display());
        }
        if std::env::var_os("FLASHGATE_COMPOSE_KEEP").is_none() {
            self.0.down();
        }
    }
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// `admin --json ARGS` through the first broker that answers (one of them is down for a while).
fn admin_any(c: &Compose, args: &[&str]) -> Result<String, String> {
    let mut errors = Vec::new();
    for b in BROKERS {
        match c.admin(b, args) {
            Ok(out) => return Ok(out),
            Err(e) => errors.push(e),
        }
    }
    Err(errors.join("\n"))
}

fn batch_counts(c: &Compose) -> Result<(i64, i64, i64), String> {
    let b = json(&admin_any(c, &["batch", "status", BATCH])?);
    Ok((b["issued"].as_i64().unwrap_or(-1), b["installed"].as_i64().unwrap_or(-1), b["failed"].as_i64().unwrap_or(-1)))
}

fn stations(c: &Compose) -> Result<Vec<Value>, String> {
    Ok(json(&admin_any(c, &["stations"])?).as_array().cloned().unwrap_or_default())
}

fn journal(c: &Compose, service: &str, config: &str) -> Result<Vec<flashgate_tests::compose::JournalRow>, String> {
    journal_rows(&c.flashgate(service, &["agent", "journal", "--json", "--config", config])?)
}

#[test]
fn multi_site_deployment_survives_a_broker_kill_and_a_station_cut() {
    if std::env::var("FLASHGATE_COMPOSE").as_deref() != Ok("1") {
        eprintln!("skipped: the docker-compose fault scenario runs with FLASHGATE_COMPOSE=1 (`make compose-test`)");
        return;
    }
    assert!(docker_available(), "FLASHGATE_COMPOSE=1 but no Docker engine answers `docker info`");
    let targets = TARGETS.to_string();
    let c = Compose::multi_site(PROJECT, &[("FG_TARGETS", &targets), ("FG_SPEED", "1")]);
    c.down(); // leftovers of an interrupted run
    let _teardown = Teardown(&c);
    let t0 = Instant::now();
    c.run(&["up", "-d"]);
    eprintln!("[{:>5.1}s] deployment up", t0.elapsed().as_secs_f64());

    // Both brokers answer; the key ceremony puts one firmware key into both tokens.
    for b in BROKERS {
        wait_for(&format!("{b} to answer"), Duration::from_secs(120), Duration::from_secs(1), |last| {
            c.admin(b, &["hsm"]).map_err(|e| *last = e).ok()
        });
    }
    let key = json(&c.admin("broker-1", &["key", "import", "--label", "fw", "--key", "key.bin"]).unwrap());
    let key_id = key["key_id"].as_str().expect("key id").to_owned();
    c.admin("broker-2", &["key", "import", "--label", "fw", "--key", "key.bin", "--key-id", &key_id]).unwrap();
    c.run(&["exec", "-T", "broker-1", "sh", "-c", &format!("head -c {IMAGE_BYTES} /dev/urandom > /tmp/fw.bin")]);
    let image = json(
        &c.admin("broker-1", &["image", "pack", "--key-id", &key_id, "--family", "stm32l4", "/tmp/fw.bin@0x08000000"])
            .unwrap(),
    );
    let sha = image["sha256"].as_str().expect("image sha256").to_owned();
    let quota = QUOTA.to_string();
    c.admin(
        "broker-2",
        &["batch", "create", BATCH, "--product", "46201002", "--image", &sha, "--quota", &quota, "--site", "berlin"]
            .into_iter()
            .chain(["--site", "austin"])
            .collect::<Vec<_>>(),
    )
    .unwrap();

    // Every station attached, with its eight probes.
    wait_for("4 stations online with 8 probes each", Duration::from_secs(120), Duration::from_secs(1), |last| {
        let s = stations(&c).map_err(|e| *last = e).ok()?;
        *last = format!("{s:?}");
        let ready = s.iter().filter(|s| s["online"] == true && s["probes"].as_array().map_or(0, Vec::len) == TARGETS);
        (ready.count() == STATIONS.len()).then_some(())
    });
    let attached: BTreeMap<String, String> = stations(&c)
        .unwrap()
        .iter()
        .map(|s| (s["identity"].as_str().unwrap_or("").to_owned(), s["broker"].as_str().unwrap_or("").to_owned()))
        .collect();
    eprintln!("[{:>5.1}s] stations attached: {attached:?}", t0.elapsed().as_secs_f64());
    // broker-1 is every station's first endpoint: their licence, image and report calls go to it.
    let (victim, survivor) = (BROKERS[0], BROKERS[1]);

    // The faults. Station austin/2 is cut off first, so the assignment reaches it only when it is
    // back. The batch is assigned through the broker about to be killed, which pushes it to its
    // stations at once; it is killed while they act on it (licences, image, installs), so their
    // later calls (the image, the reports) fail over to the other broker.
    let victim_id = c.container(victim);
    let cut_id = c.container(CUT);
    let network = c.network_of(&cut_id);
    c.docker(&["network", "disconnect", &network, &cut_id]);
    let cut = Instant::now();
    let cut_at = SystemTime::now();
    eprintln!("[{:>5.1}s] cut {CUT} off {network}", t0.elapsed().as_secs_f64());
    // The cut station first: the last assignment is still being acted on when the kill comes.
    for (_, station, _) in STATIONS.iter().rev() {
        c.admin(victim, &["station", "assign", station, BATCH]).unwrap();
    }
    let assigned = Instant::now();
    eprintln!("[{:>5.1}s] {BATCH} assigned to every station through {victim}", t0.elapsed().as_secs_f64());
    std::thread::sleep(KILL_AFTER.saturating_sub(assigned.elapsed()));
    c.docker(&["kill", &victim_id]);
    let killed = Instant::now();
    eprintln!("[{:>5.1}s] killed {victim} ({:?} after the assignment)", t0.elapsed().as_secs_f64(), assigned.elapsed());
    match batch_counts(&c) {
        Ok((issued, installed, _)) => eprintln!(
            "[{:>5.1}s] so far {issued} licences issued, {installed} installs reported",
            t0.elapsed().as_secs_f64()
        ),
        Err(e) => eprintln!("batch status unavailable: {e}"),
    }
    std::thread::sleep(BROKER_DOWN_FOR.saturating_sub(killed.elapsed()));
    c.run(&["start", victim]);
    eprintln!("[{:>5.1}s] started {victim} again", t0.elapsed().as_secs_f64());
    std::thread::sleep(CUT_FOR.saturating_sub(cut.elapsed()));
    let reconnected_at = SystemTime::now();
    c.docker(&["network", "connect", "--ip", CUT_IP, &network, &cut_id]);
    eprintln!("[{:>5.1}s] reconnected {CUT}", t0.elapsed().as_secs_f64());

    // The run settles: the quota installed and every journal delivered.
    wait_for("28 installs and every journal delivered", Duration::from_secs(240), Duration::from_secs(2), |last| {
        let counts = batch_counts(&c).map_err(|e| *last = e).ok()?;
        *last = format!("batch {counts:?}");
        if counts.1 + counts.2 < QUOTA as i64 {
            return None;
        }
        for (service, _, config) in STATIONS {
            let rows = journal(&c, service, config).map_err(|e| *last = e).ok()?;
            if let Some(r) = rows.iter().find(|r| r.state == "unreported") {
                *last = format!("{service}: {r:?} not yet reported");
                return None;
            }
        }
        Some(())
    });
    eprintln!("[{:>5.1}s] settled", t0.elapsed().as_secs_f64());
    // A refused device is decided once its station asks; give every station's last probes a moment.
    std::thread::sleep(Duration::from_secs(3));

    // What happened, from the product's interfaces.
    let mut observed = Observed { batch: batch_counts(&c).unwrap(), ..Observed::default() };
    for (service, _, config) in STATIONS {
        for device in devices_in_sim_log(&c.logs(service)) {
            if let Some(other) = observed.devices.insert(device.clone(), service.to_owned()) {
                panic!("device {device} served by both {other} and {service}");
            }
        }
        observed.journals.insert(service.to_owned(), journal(&c, service, config).unwrap());
    }
    for device in observed.devices.keys() {
        let record = device_record(&admin_any(&c, &["device", device]).unwrap()).unwrap();
        observed.records.insert(device.clone(), record);
    }
    let export = admin_any(&c, &["audit", "export"]).unwrap();
    observed.refusals = refusals_in_audit(&export, BATCH);
    observed.audit_ok = match admin_any(&c, &["audit", "verify"]) {
        Ok(out) => (json(&out)["ok"] == true, out),
        Err(e) => (false, e),
    };
    let installed = observed.records.values().filter(|r| r.installs.iter().any(|(_, s)| *s == 0)).count();
    eprintln!(
        "[{:>5.1}s] {} devices, {installed} installed, {} refused; batch (issued, installed, failed) {:?}; audit {}",
        t0.elapsed().as_secs_f64(),
        observed.devices.len(),
        observed.refusals.len(),
        observed.batch,
        if observed.audit_ok.0 { "verified" } else { "BROKEN" }
    );
    let violations = observed.violations(Expected { devices: STATIONS.len() * TARGETS, installs: QUOTA });
    assert!(violations.is_empty(), "the fault scenario broke invariants:\n- {}", violations.join("\n- "));

    // The failover is visible in the logs: every connected station's broker client moved its calls
    // from the killed broker to the other one (its results were reported while the killed broker
    // was down), and every station whose control stream was on the killed broker attached to the
    // other one.
    let victim_url = format!("https://{victim}:7443");
    let survivor_url = format!("https://{survivor}:7443");
    for (service, station, _) in STATIONS.iter().filter(|s| s.0 != CUT) {
        let log = c.logs(service);
        let failover = format!("broker failover from={victim_url} to={survivor_url}");
        assert!(log.contains(&failover), "{service}'s log does not show its calls failing over ({failover}):\n{log}");
        let held = attached.iter().any(|(id, b)| b == victim && id.ends_with(&station.replace('/', "/station/")));
        if held {
            let lost =
                log.lines().position(|l| l.contains("station stream to the broker lost") && l.contains(&victim_url));
            let moved = lost.is_some_and(|at| {
                log.lines().skip(at).any(|l| l.contains("station attached to the broker") && l.contains(&survivor_url))
            });
            assert!(moved, "{service}'s log does not show its stream failing over from {victim} to {survivor}:\n{log}");
        }
        eprintln!("{service}: calls failed over to {survivor}{}", if held { ", and its stream" } else { "" });
    }
    // The cut station noticed the dead link while it was cut off (HTTP/2 keep-alive), and attached
    // again once it was back. (Its results were delivered: checked above.)
    let during = container_log(&cut_id, cut_at, Some(reconnected_at));
    assert!(
        during.contains("station stream to the broker lost"),
        "{CUT} did not notice the cut within {CUT_FOR:?}; its log meanwhile:\n{during}"
    );
    let after = container_log(&cut_id, reconnected_at, None);
    assert!(
        after.contains("station attached to the broker"),
        "{CUT} did not attach again after it was reconnected; its log since:\n{after}"
    );
    eprintln!("{CUT} lost its stream while cut off and attached again after the reconnection");
}
