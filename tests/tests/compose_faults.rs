//! The docker-compose deployments under faults, on a real Docker engine. Two scenarios, run one at a
//! time (a static lock: both use Docker heavily):
//!
//! **`multi_site_deployment_survives_a_broker_kill_and_a_station_cut`** (`deploy/compose/multi-site.yml`):
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
//! **`site_brokers_issue_through_a_wan_cut_and_a_site_broker_kill`** (`deploy/compose/sites.yml`,
//! issue 14): a central broker on PostgreSQL mapping site-berlin → berlin and site-austin → austin, two
//! site brokers (own SoftHSM2 token, own SQLite ledger in a volume, 12-unit leases topped up at 8,
//! 180 s time to live, 1 s refresh), four stations (site broker first, central second), twelve
//! real-time targets each (48 devices), one batch with quota 40, one install at a time per station.
//! 20 s after the assignment site-berlin is killed and started again 15 s later (its stations fall
//! back to central meanwhile); 60 s after the assignment berlin's WAN (site-berlin and its stations'
//! uplinks) is cut for 60 s, its LAN kept, so berlin issues from its lease alone. Then the batch is
//! closed at central and the leases settle.
//!
//! Pass ([`SitesObserved::violations`]): exactly 40 licences at central and 8 devices refused
//! `QUOTA_EXHAUSTED`; central's licences are the union of the two site ledgers' (device, site,
//! station, licence SHA-256) plus those central issued itself, no device licensed twice, no conflict;
//! every lease settled with granted == used + returned; every audit chain (central, both sites)
//! verifies; every station journal delivered; the cut shows in site-berlin's log (central unreachable,
//! then reachable) and in a metric scraped during it.
//!
//! Docker-only: both run when `FLASHGATE_COMPOSE=1` (`make compose-test`, part of `make test` whenever
//! a Docker engine answers, and required when `CI=true`), after `deploy/docker/build.sh` built the
//! images. On failure every container's log is saved under `target/compose-faults/` or
//! `target/compose-sites/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use flashgate_tests::compose::sites::{
    CutSeen, LeaseRow, SitesExpected, SitesObserved, central_audit, device_rows, lease_rows, metric_value,
};
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

/// Both scenarios use Docker heavily (and a 2-core machine): they run one at a time.
static DOCKER: Mutex<()> = Mutex::new(());

fn docker_lock() -> MutexGuard<'static, ()> {
    // A scenario that failed poisoned it; the next one still runs on its own.
    DOCKER.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tears the project down when the test ends; on failure first saves the log of every service
/// under `target/DIR/`.
struct Teardown<'a>(&'a Compose, &'static str, Vec<&'static str>);

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target").join(self.1);
            let _ = std::fs::create_dir_all(&dir);
            for service in &self.2 {
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
    let _docker = docker_lock();
    let targets = TARGETS.to_string();
    let c = Compose::multi_site(PROJECT, &[("FG_TARGETS", &targets), ("FG_SPEED", "1")]);
    c.down(); // leftovers of an interrupted run
    let services = ["db", "setup"].into_iter().chain(BROKERS).chain(STATIONS.iter().map(|s| s.0)).collect();
    let _teardown = Teardown(&c, "compose-faults", services);
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

// --- Site brokers (deploy/compose/sites.yml) ---------------------------------------------------------

const SITES_PROJECT: &str = "flashgate-sites";
const SITES_TARGETS: usize = 12;
const SITES_QUOTA: usize = 40;
/// The batch the site brokers mirror (sites.yml's default FG_BATCH).
const SITES_BATCH: &str = "lot-sites";
/// 192 KiB of firmware: about 17 s per device on a real-time 115200-baud line, one device at a time per
/// station (`[run] max_parallel = 1`), so a site uses about 7 units during the 60 s cut.
const SITES_IMAGE_BYTES: usize = 192 * 1024;
const CENTRAL: &str = "central";
/// (site broker service, site).
const SITE_BROKERS: [(&str, &str); 2] = [("site-berlin", "berlin"), ("site-austin", "austin")];
/// (service, station as `admin station assign` names it, agent config, its site broker, its site).
const SITE_STATIONS: [(&str, &str, &str, &str, &str); 4] = [
    ("station-berlin-1", "berlin/1", "agent-berlin-1.toml", "site-berlin", "berlin"),
    ("station-berlin-2", "berlin/2", "agent-berlin-2.toml", "site-berlin", "berlin"),
    ("station-austin-1", "austin/1", "agent-austin-1.toml", "site-austin", "austin"),
    ("station-austin-2", "austin/2", "agent-austin-2.toml", "site-austin", "austin"),
];
/// Berlin's side of the WAN: its site broker and its stations' uplinks, with their `wan` addresses.
const BERLIN_WAN: [(&str, &str); 3] =
    [("site-berlin", "172.29.0.21"), ("station-berlin-1", "172.29.0.31"), ("station-berlin-2", "172.29.0.32")];
const KILL_AT: Duration = Duration::from_secs(20);
const KILLED_FOR: Duration = Duration::from_secs(15);
const WAN_CUT_AT: Duration = Duration::from_secs(60);
const WAN_CUT_FOR: Duration = Duration::from_secs(60);

fn elapsed(t0: Instant) -> String {
    format!("[{:>5.1}s]", t0.elapsed().as_secs_f64())
}

/// Central's batch status: (issued, leased).
fn central_counts(c: &Compose) -> Result<(i64, i64), String> {
    let b = json(&c.admin(CENTRAL, &["batch", "status", SITES_BATCH])?);
    Ok((b["issued"].as_i64().unwrap_or(-1), b["leased"].as_i64().unwrap_or(-1)))
}

/// `admin sites --json` at central, one line per site: `site held/head lag licences conflicts`.
fn sites_line(c: &Compose) -> String {
    match c.admin(CENTRAL, &["sites"]) {
        Ok(out) => json(&out)
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|s| {
                format!(
                    "{} held {}/{} lag {} licences {} conflicts {}",
                    s["site"].as_str().unwrap_or("?"),
                    s["acked_seq"],
                    s["site_head_seq"],
                    s["lag_records"],
                    s["licences"],
                    s["conflicts"]
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(e) => e,
    }
}

/// Licences issued by `broker` for the batch, from its own `batch status`.
fn issued_at(c: &Compose, broker: &str) -> i64 {
    let b = json(&c.admin(broker, &["batch", "status", SITES_BATCH]).unwrap());
    b["issued"].as_i64().unwrap_or(-1)
}

/// What a metrics scrape during the cut shows of it, if anything.
fn cut_in_metrics(c: &Compose) -> Option<String> {
    let mut seen = Vec::new();
    if let Ok(text) = c.metrics("site-berlin", 9464) {
        if metric_value(&text, "flashgate_upstream_up", "") == Some(0.0) {
            seen.push("site-berlin flashgate_upstream_up 0".to_owned());
        }
        if let Some(n) = metric_value(&text, "flashgate_upstream_lag_records", "").filter(|n| *n > 0.0) {
            seen.push(format!("site-berlin flashgate_upstream_lag_records {n}"));
        }
        if let Some(n) = metric_value(&text, "flashgate_upstream_offline_seconds", "").filter(|n| *n > 0.0) {
            seen.push(format!("site-berlin flashgate_upstream_offline_seconds {n}"));
        }
    }
    if let Ok(text) = c.metrics(CENTRAL, 9464)
        && let Some(n) =
            metric_value(&text, "flashgate_site_replication_lag_records", "site=\"berlin\"").filter(|n| *n > 0.0)
    {
        seen.push(format!("central flashgate_site_replication_lag_records{{site=\"berlin\"}} {n}"));
    }
    (!seen.is_empty()).then(|| seen.join(", "))
}

#[test]
fn site_brokers_issue_through_a_wan_cut_and_a_site_broker_kill() {
    if std::env::var("FLASHGATE_COMPOSE").as_deref() != Ok("1") {
        eprintln!("skipped: the docker-compose site scenario runs with FLASHGATE_COMPOSE=1 (`make compose-test`)");
        return;
    }
    assert!(docker_available(), "FLASHGATE_COMPOSE=1 but no Docker engine answers `docker info`");
    let _docker = docker_lock();
    let targets = SITES_TARGETS.to_string();
    let c = Compose::file("sites.yml", SITES_PROJECT, &[("FG_TARGETS", &targets), ("FG_SPEED", "1")]);
    c.down(); // leftovers of an interrupted run
    let services = ["db", "setup", CENTRAL]
        .into_iter()
        .chain(SITE_BROKERS.iter().map(|s| s.0))
        .chain(SITE_STATIONS.iter().map(|s| s.0))
        .collect();
    let _teardown = Teardown(&c, "compose-sites", services);
    let t0 = Instant::now();
    c.run(&["up", "-d"]);
    eprintln!("{} deployment up", elapsed(t0));

    // Every broker answers; the key ceremony puts one firmware key into the three tokens.
    let brokers: Vec<&str> = std::iter::once(CENTRAL).chain(SITE_BROKERS.iter().map(|s| s.0)).collect();
    for b in &brokers {
        wait_for(&format!("{b} to answer"), Duration::from_secs(120), Duration::from_secs(1), |last| {
            c.admin(b, &["hsm"]).map_err(|e| *last = e).ok()
        });
    }
    let key = json(&c.admin(CENTRAL, &["key", "import", "--label", "fw", "--key", "key.bin"]).unwrap());
    let key_id = key["key_id"].as_str().expect("key id").to_owned();
    for (site_broker, _) in SITE_BROKERS {
        c.admin(site_broker, &["key", "import", "--label", "fw", "--key", "key.bin", "--key-id", &key_id]).unwrap();
    }
    c.run(&["exec", "-T", CENTRAL, "sh", "-c", &format!("head -c {SITES_IMAGE_BYTES} /dev/urandom > /tmp/fw.bin")]);
    let image = json(
        &c.admin(CENTRAL, &["image", "pack", "--key-id", &key_id, "--family", "stm32l4", "/tmp/fw.bin@0x08000000"])
            .unwrap(),
    );
    let sha = image["sha256"].as_str().expect("image sha256").to_owned();
    let quota = SITES_QUOTA.to_string();
    c.admin(
        CENTRAL,
        &["batch", "create", SITES_BATCH, "--product", "46201002", "--image", &sha, "--quota", &quota]
            .into_iter()
            .chain(["--site", "berlin", "--site", "austin"])
            .collect::<Vec<_>>(),
    )
    .unwrap();
    eprintln!(
        "{} key in every token, image {sha} packed, {SITES_BATCH} created at central (quota {SITES_QUOTA})",
        elapsed(t0)
    );

    // Each site broker mirrors the batch and takes its first lease; its stations attach to it.
    for (site_broker, _) in SITE_BROKERS {
        wait_for(
            &format!("{site_broker} to mirror {SITES_BATCH} and lease"),
            Duration::from_secs(60),
            Duration::from_secs(1),
            |last| {
                let b = json(&c.admin(site_broker, &["batch", "status", SITES_BATCH]).map_err(|e| *last = e).ok()?);
                *last = b.to_string();
                (b["quota"].as_i64().unwrap_or(0) > 0).then_some(())
            },
        );
        wait_for(
            &format!("2 stations on {site_broker} with {SITES_TARGETS} probes each"),
            Duration::from_secs(120),
            Duration::from_secs(1),
            |last| {
                let s = json(&c.admin(site_broker, &["stations"]).map_err(|e| *last = e).ok()?);
                *last = s.to_string();
                let ready = s
                    .as_array()?
                    .iter()
                    .filter(|s| s["online"] == true && s["probes"].as_array().map_or(0, Vec::len) == SITES_TARGETS);
                (ready.count() == 2).then_some(())
            },
        );
    }
    eprintln!(
        "{} both sites mirrored the batch and leased; central {:?}; stations attached",
        elapsed(t0),
        central_counts(&c)
    );

    // Every device the simulators serve (printed at start).
    let mut devices: BTreeMap<String, String> = BTreeMap::new();
    for (service, ..) in SITE_STATIONS {
        for device in devices_in_sim_log(&c.logs(service)) {
            if let Some(other) = devices.insert(device.clone(), service.to_owned()) {
                panic!("device {device} served by both {other} and {service}");
            }
        }
    }
    assert_eq!(devices.len(), SITE_STATIONS.len() * SITES_TARGETS, "devices in the simulators' logs: {devices:?}");

    // The batch is assigned to each station at its site broker and at central (its fallback).
    for (_, station, _, site_broker, _) in SITE_STATIONS {
        c.admin(site_broker, &["station", "assign", station, SITES_BATCH]).unwrap();
        c.admin(CENTRAL, &["station", "assign", station, SITES_BATCH]).unwrap();
    }
    let assigned = Instant::now();
    eprintln!("{} {SITES_BATCH} assigned to every station", elapsed(t0));

    // Fault 1: site-berlin killed, then started again on the same ledger and token volumes.
    let berlin_id = c.container("site-berlin");
    std::thread::sleep(KILL_AT.saturating_sub(assigned.elapsed()));
    eprintln!("{} before the kill: central (issued, leased) {:?}; {}", elapsed(t0), central_counts(&c), sites_line(&c));
    c.docker(&["kill", &berlin_id]);
    let killed = Instant::now();
    eprintln!("{} killed site-berlin", elapsed(t0));
    std::thread::sleep(KILLED_FOR.saturating_sub(killed.elapsed()));
    c.run(&["start", "site-berlin"]);
    let started = Instant::now();
    wait_for("site-berlin to answer again", Duration::from_secs(60), Duration::from_millis(500), |last| {
        c.admin("site-berlin", &["hsm"]).map_err(|e| *last = e).ok()
    });
    eprintln!(
        "{} site-berlin started again, answering {:.1}s later; central {:?}; {}",
        elapsed(t0),
        started.elapsed().as_secs_f64(),
        central_counts(&c),
        sites_line(&c)
    );

    // Fault 2: berlin's WAN cut (its site broker and its stations' uplinks) for 60 s; the site LAN stays.
    std::thread::sleep(WAN_CUT_AT.saturating_sub(assigned.elapsed()));
    let wan = c
        .networks_of(&berlin_id)
        .into_iter()
        .find(|n| n.ends_with("_wan"))
        .unwrap_or_else(|| panic!("site-berlin is on no *_wan network: {:?}", c.networks_of(&berlin_id)));
    let cut_ids: Vec<(String, &str)> = BERLIN_WAN.iter().map(|(s, ip)| (c.container(s), *ip)).collect();
    let berlin_issued_before = issued_at(&c, "site-berlin");
    let cut_at = SystemTime::now();
    for (id, _) in &cut_ids {
        c.docker(&["network", "disconnect", &wan, id]);
    }
    let cut = Instant::now();
    eprintln!("{} cut berlin off {wan}; central {:?}", elapsed(t0), central_counts(&c));
    let mut metric = None;
    while cut.elapsed() < WAN_CUT_FOR {
        std::thread::sleep(Duration::from_secs(5).min(WAN_CUT_FOR.saturating_sub(cut.elapsed())));
        if metric.is_none() && cut.elapsed() < WAN_CUT_FOR {
            metric = cut_in_metrics(&c);
            if let Some(m) = &metric {
                eprintln!("{} during the cut: {m}", elapsed(t0));
            }
        }
    }
    let berlin_issued_offline = issued_at(&c, "site-berlin") - berlin_issued_before;
    let reconnected_at = SystemTime::now();
    for (id, ip) in &cut_ids {
        c.docker(&["network", "connect", "--ip", ip, &wan, id]);
    }
    eprintln!(
        "{} reconnected berlin (site-berlin issued {berlin_issued_offline} licences while cut off); central {:?}; {}",
        elapsed(t0),
        central_counts(&c),
        sites_line(&c)
    );

    // The run settles: every device got its verdict on its station, every journal delivered.
    wait_for(
        "every device's verdict journalled and delivered",
        Duration::from_secs(480),
        Duration::from_secs(3),
        |last| {
            for (service, _, config, ..) in SITE_STATIONS {
                let rows = journal(&c, service, config).map_err(|e| *last = e).ok()?;
                if let Some(r) = rows.iter().find(|r| r.state == "unreported") {
                    *last = format!("{service}: {r:?} not yet reported; central {:?}", central_counts(&c));
                    return None;
                }
                let done: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.device_id.as_str()).collect();
                let waiting = devices.iter().filter(|(d, s)| *s == service && !done.contains(d.as_str())).count();
                if waiting > 0 {
                    *last = format!("{service}: {waiting} devices without a verdict; central {:?}", central_counts(&c));
                    return None;
                }
            }
            Some(())
        },
    );
    eprintln!(
        "{} every verdict journalled and delivered; central {:?}; {}",
        elapsed(t0),
        central_counts(&c),
        sites_line(&c)
    );

    // The batch closes at central; the site brokers hand back what they did not use, and catch up.
    c.admin(CENTRAL, &["batch", "close", SITES_BATCH]).unwrap();
    let closed = Instant::now();
    let leases = wait_for(
        "every lease settled and every site caught up",
        Duration::from_secs(120),
        Duration::from_secs(2),
        |last| {
            let leases =
                lease_rows(&c.admin(CENTRAL, &["lease", "list", "--batch", SITES_BATCH]).map_err(|e| *last = e).ok()?)
                    .map_err(|e| *last = e)
                    .ok()?;
            let sites = json(&c.admin(CENTRAL, &["sites"]).map_err(|e| *last = e).ok()?);
            *last = format!("leases {leases:?}; sites {sites}");
            let caught_up = sites
                .as_array()
                .is_some_and(|a| a.len() == SITE_BROKERS.len() && a.iter().all(|s| s["lag_records"] == 0));
            (caught_up && leases.iter().all(|l| l.state == "settled")).then_some(leases)
        },
    );
    eprintln!(
        "{} batch closed; leases settled {:.1}s later; {}",
        elapsed(t0),
        closed.elapsed().as_secs_f64(),
        sites_line(&c)
    );

    // What happened, from the product's interfaces.
    let export = |broker: &str| {
        device_rows(&c.admin(broker, &["export", "devices", "--batch", SITES_BATCH, "--format", "jsonl"]).unwrap())
            .unwrap()
    };
    let mut observed = SitesObserved {
        devices,
        station_sites: SITE_STATIONS.iter().map(|s| (s.0.to_owned(), s.4.to_owned())).collect(),
        central: export(CENTRAL),
        central_audit: central_audit(&c.admin(CENTRAL, &["audit", "export"]).unwrap(), SITES_BATCH),
        leases,
        ..SitesObserved::default()
    };
    for (site_broker, site) in SITE_BROKERS {
        observed.sites.insert(site.to_owned(), export(site_broker));
    }
    for b in &brokers {
        let verdict = match c.admin(b, &["audit", "verify"]) {
            Ok(out) => (json(&out)["ok"] == true, out),
            Err(e) => (false, e),
        };
        observed.audits.insert((*b).to_owned(), verdict);
    }
    for (service, _, config, ..) in SITE_STATIONS {
        observed.journals.insert(service.to_owned(), journal(&c, service, config).unwrap());
    }
    let during = container_log(&berlin_id, cut_at, Some(reconnected_at));
    let after = container_log(&berlin_id, reconnected_at, None);
    observed.cut = CutSeen {
        unreachable_logged: during.contains("central broker unreachable"),
        reachable_logged: after.contains("central broker reachable"),
        metric,
        issued_offline: berlin_issued_offline,
    };
    for line in during
        .lines()
        .chain(after.lines())
        .filter(|l| l.contains("central broker unreachable") || l.contains("central broker reachable"))
    {
        eprintln!("site-berlin: {line}");
    }

    // The figures.
    let licensed = observed.central.iter().filter(|r| r.licence.is_some()).count();
    let refused = observed.central.iter().filter(|r| r.licence.is_none() && !r.refusals.is_empty()).count();
    eprintln!(
        "{} {} devices; central: {licensed} licensed ({} issued by central itself), {refused} refused",
        elapsed(t0),
        observed.devices.len(),
        observed.central_audit.direct.len()
    );
    for (site, rows) in &observed.sites {
        let site_leases: Vec<&LeaseRow> = observed.leases.iter().filter(|l| &l.site == site).collect();
        eprintln!(
            "  {site}: {} licences in its ledger; {} leases (granted {}, used {}, returned {})",
            rows.iter().filter(|r| r.licence.is_some()).count(),
            site_leases.len(),
            site_leases.iter().map(|l| l.granted).sum::<i64>(),
            site_leases.iter().map(|l| l.used).sum::<i64>(),
            site_leases.iter().map(|l| l.returned).sum::<i64>()
        );
    }
    for (service, ..) in SITE_STATIONS {
        let log = c.logs(service);
        let failovers = log.lines().filter(|l| l.contains("broker failover")).count();
        eprintln!("  {service}: {failovers} broker failovers in its log");
    }
    let violations = observed.violations(&SitesExpected {
        devices: SITE_STATIONS.len() * SITES_TARGETS,
        licences: SITES_QUOTA,
        sites: SITE_BROKERS.iter().map(|s| s.1.to_owned()).collect(),
        brokers: brokers.iter().map(|b| (*b).to_owned()).collect(),
    });
    assert!(violations.is_empty(), "the site scenario broke invariants:\n- {}", violations.join("\n- "));
}
