//! The multi-site docker-compose deployment (`deploy/compose/multi-site.yml`) driven from a test:
//! [`Compose`] runs `docker-compose` / `docker` for one project (up, exec, kill, network cut, logs,
//! down), and [`Observed`] + [`Observed::violations`] are the pass criteria of the fault scenario,
//! kept apart from Docker so that unit tests can show each invariant catching a broken outcome.
//!
//! Everything the checks read comes from the product's own interfaces: `flashgate admin` (batch
//! status, device history, audit export and verify), `flashgate agent journal` on each station, and
//! the containers' logs (the simulators' "target ready" lines name every device).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// One docker-compose project of `deploy/compose/multi-site.yml`.
#[derive(Debug)]
pub struct Compose {
    /// Project name (`-p`).
    pub project: String,
    file: PathBuf,
    env: Vec<(String, String)>,
}

/// Whether a Docker engine answers (`docker info`).
pub fn docker_available() -> bool {
    Command::new("docker").arg("info").output().map(|o| o.status.success()).unwrap_or(false)
}

impl Compose {
    /// The project `project` of the repository's `deploy/compose/multi-site.yml`, with `env` for
    /// compose's variable substitution (`FG_TARGETS`, `FG_SPEED`).
    pub fn multi_site(project: &str, env: &[(&str, &str)]) -> Self {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose/multi-site.yml");
        Self {
            project: project.to_owned(),
            file,
            env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        }
    }

    fn compose(&self) -> Command {
        let mut c = Command::new("docker-compose");
        c.arg("--ansi").arg("never").arg("-f").arg(&self.file).arg("-p").arg(&self.project);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs `docker-compose ARGS`; the output, whatever the exit status.
    pub fn try_run(&self, args: &[&str]) -> Output {
        self.compose().args(args).output().unwrap_or_else(|e| panic!("running docker-compose {args:?}: {e}"))
    }

    /// Runs `docker-compose ARGS` and returns its standard output; panics naming the command and
    /// its standard error when it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let o = self.try_run(args);
        assert!(
            o.status.success(),
            "docker-compose {} failed ({}): {}{}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Stops and removes the project's containers, network and volumes (nothing if it is not up).
    pub fn down(&self) {
        let _ = self.try_run(&["down", "-v", "--remove-orphans", "-t", "5"]);
    }

    /// The container id of `service`.
    pub fn container(&self, service: &str) -> String {
        let id = self.run(&["ps", "-q", service]).trim().to_owned();
        assert!(!id.is_empty(), "service {service} has no container");
        id
    }

    /// The network `container` is attached to (the project's `factory` network, named by compose).
    pub fn network_of(&self, container: &str) -> String {
        let names = self.docker(&[
            "inspect",
            "-f",
            "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}} {{end}}",
            container,
        ]);
        let names: Vec<&str> = names.split_whitespace().collect();
        assert_eq!(names.len(), 1, "container {container} is on networks {names:?}, expected one");
        names[0].to_owned()
    }

    /// `flashgate ARGS` inside `service` (working directory /fg); standard output.
    pub fn flashgate(&self, service: &str, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["exec", "-T", service, "flashgate"];
        full.extend_from_slice(args);
        let o = self.try_run(&full);
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(format!(
                "flashgate {} in {service} failed ({}): {}{}",
                args.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ))
        }
    }

    /// `flashgate admin --json ARGS` as operator `ops`, run inside `service` against its own broker
    /// (`broker-N` talks to `https://broker-N:7443`).
    pub fn admin(&self, broker: &str, args: &[&str]) -> Result<String, String> {
        let url = format!("https://{broker}:7443");
        let mut full = vec!["admin", "--pki", "pki", "--name", "ops", "--broker", url.as_str(), "--json"];
        full.extend_from_slice(args);
        self.flashgate(broker, &full)
    }

    /// `docker ARGS`; panics naming the command when it fails.
    pub fn docker(&self, args: &[&str]) -> String {
        let o = Command::new("docker").args(args).output().unwrap_or_else(|e| panic!("running docker {args:?}: {e}"));
        assert!(
            o.status.success(),
            "docker {} failed ({}): {}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Every log line of `service` (no colours, no prefixes).
    pub fn logs(&self, service: &str) -> String {
        let o = self.try_run(&["logs", "--no-color", "--no-log-prefix", service]);
        let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&o.stderr));
        s
    }
}

/// The log of `container` between `since` and `until` (`docker logs --since/--until`, both streams).
pub fn container_log(container: &str, since: SystemTime, until: Option<SystemTime>) -> String {
    let unix = |t: SystemTime| {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
    };
    let mut cmd = Command::new("docker");
    cmd.args(["logs", "--since", &unix(since)]);
    if let Some(u) = until {
        cmd.args(["--until", &unix(u)]);
    }
    let o = cmd.arg(container).output().unwrap_or_else(|e| panic!("running docker logs {container}: {e}"));
    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    s
}

/// Polls `f` every `every` until it returns `Some`, or panics with `what` (and the last value seen
/// by `f`, which it reports through `last`) after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, every: Duration, mut f: impl FnMut(&mut String) -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if let Some(v) = f(&mut last) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}; last seen: {last}");
        std::thread::sleep(every);
    }
}

/// A device's record at the broker (`flashgate admin device ID`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Licences issued for it (any batch).
    pub licences: usize,
    /// Its install reports: (result id, SFI status code).
    pub installs: Vec<(String, u32)>,
}

/// One row of a station's journal (`flashgate agent journal --json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRow {
    /// Result id.
    pub result_id: String,
    /// Device id.
    pub device_id: String,
    /// SFI status code (0 installed).
    pub status_code: u32,
    /// `reported`, `unreported`, or `rejected: …` (local-only results).
    pub state: String,
}

/// Everything the fault scenario observed at the end, from the product's interfaces.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Every device the stations' simulators served (from their logs), with its station.
    pub devices: BTreeMap<String, String>,
    /// The batch's (issued, installed, failed) counts from `admin batch status`.
    pub batch: (i64, i64, i64),
    /// Each device's ledger record.
    pub records: BTreeMap<String, DeviceRecord>,
    /// Refusal reasons per device, from the audit export's `licence.refused` records for the batch.
    pub refusals: BTreeMap<String, Vec<String>>,
    /// `admin audit verify`: ok, and the fault when not.
    pub audit_ok: (bool, String),
    /// Each station's journal.
    pub journals: BTreeMap<String, Vec<JournalRow>>,
}

/// What the scenario expects.
#[derive(Debug, Clone, Copy)]
pub struct Expected {
    /// Devices across all stations.
    pub devices: usize,
    /// The batch quota: exactly this many installs.
    pub installs: usize,
}

impl Observed {
    /// Every broken invariant, in words (empty: the scenario passed):
    /// - every device was seen, and got exactly one verdict at the broker: `installs` devices hold
    ///   exactly one licence and exactly one install report, successful; the other `devices −
    ///   installs` hold no licence and no report and were refused `QUOTA_EXHAUSTED` (never another
    ///   reason);
    /// - no device holds two licences; the batch counts agree (issued = installed = quota, none
    ///   failed);
    /// - every station journal is fully delivered: each licensed result is `reported` and is the very
    ///   result the ledger holds for that device; results of unlicensed devices stay local;
    /// - the audit chain verifies.
    pub fn violations(&self, want: Expected) -> Vec<String> {
        let mut v = Vec::new();
        if self.devices.len() != want.devices {
            v.push(format!(
                "{} devices seen on the stations' simulators, expected {}",
                self.devices.len(),
                want.devices
            ));
        }
        let refused_want = want.devices.saturating_sub(want.installs);
        let (issued, installed, failed) = self.batch;
        if (issued, installed, failed) != (want.installs as i64, want.installs as i64, 0) {
            v.push(format!(
                "batch counts issued {issued}, installed {installed}, failed {failed}; expected {0}, {0}, 0",
                want.installs
            ));
        }
        let mut installed_devices = BTreeSet::new();
        let mut refused_devices = BTreeSet::new();
        for device in self.devices.keys() {
            let r = self.records.get(device).cloned().unwrap_or_default();
            if r.licences > 1 {
                v.push(format!("device {device} holds {} licences", r.licences));
            }
            let ok = r.installs.iter().filter(|(_, s)| *s == 0).count();
            match (r.licences, r.installs.len()) {
                (0, 0) => {
                    let reasons = self.refusals.get(device).cloned().unwrap_or_default();
                    if reasons.is_empty() {
                        v.push(format!("device {device} has neither a licence nor a refusal: it got no verdict"));
                    } else if reasons.iter().any(|r| r != "QUOTA_EXHAUSTED") {
                        v.push(format!("device {device} was refused for {reasons:?}, expected only QUOTA_EXHAUSTED"));
                    } else {
                        refused_devices.insert(device.clone());
                    }
                }
                (1, 1) if ok == 1 => {
                    installed_devices.insert(device.clone());
                }
                (l, n) => v.push(format!(
                    "device {device}: {l} licence(s) and {n} install report(s) ({ok} successful): {:?}; expected one \
                     licence and one successful report, or neither",
                    r.installs
                )),
            }
            if r.licences > 0 && self.refusals.contains_key(device) {
                v.push(format!("device {device} is both licensed and refused {:?}", self.refusals[device]));
            }
        }
        if installed_devices.len() != want.installs {
            v.push(format!("{} devices installed, expected exactly {}", installed_devices.len(), want.installs));
        }
        if refused_devices.len() != refused_want {
            v.push(format!("{} devices refused, expected exactly {refused_want}", refused_devices.len()));
        }
        for device in self.records.keys().chain(self.refusals.keys()) {
            if !self.devices.contains_key(device) {
                v.push(format!("the ledger names device {device}, which no station's simulator served"));
            }
        }
        // Journals: everything delivered, and the ledger's results are the stations' results.
        let mut journal_results: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (station, rows) in &self.journals {
            for row in rows {
                match row.state.as_str() {
                    "reported" => {
                        journal_results.entry(&row.device_id).or_default().insert(&row.result_id);
                    }
                    s if s.starts_with("rejected: local only") => {
                        if self.records.get(&row.device_id).is_some_and(|r| r.licences > 0) {
                            v.push(format!(
                                "{station}: result {} of licensed device {} was kept local, not reported",
                                row.result_id, row.device_id
                            ));
                        }
                    }
                    other => v.push(format!(
                        "{station}: result {} of device {} is {other}, not delivered",
                        row.result_id, row.device_id
                    )),
                }
            }
        }
        for (device, r) in &self.records {
            let ledger: BTreeSet<&str> = r.installs.iter().map(|(id, _)| id.as_str()).collect();
            let journal = journal_results.get(device.as_str()).cloned().unwrap_or_default();
            if ledger != journal {
                v.push(format!(
                    "device {device}: the ledger holds results {ledger:?}, the station journals {journal:?}"
                ));
            }
        }
        if !self.audit_ok.0 {
            v.push(format!("the audit chain does not verify: {}", self.audit_ok.1));
        }
        v
    }
}

/// Device ids from a simulator's output: the `target N: … device_id ID …` lines `flashgate sim`
/// prints at start (or its `target ready … device_id=ID` log records).
pub fn devices_in_sim_log(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.starts_with("target ") || l.contains("target ready"))
        .filter_map(|l| l.split("device_id").nth(1))
        .filter_map(|rest| rest.trim_start_matches('=').split_whitespace().next())
        .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
        .collect()
}

/// Parses `admin --json audit export` output: refusal reasons per device of `batch`.
pub fn refusals_in_audit(export: &str, batch: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let prefix = format!("batch/{batch}/device/");
    for line in export.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(rec) = serde_json::from_str::<Value>(line) else { continue };
        if rec["event"] != "licence.refused" {
            continue;
        }
        let Some(device) = rec["subject"].as_str().and_then(|s| s.strip_prefix(&prefix)) else { continue };
        let details: Value =
            rec["details_json"].as_str().and_then(|d| serde_json::from_str(d).ok()).unwrap_or_default();
        out.entry(device.to_owned()).or_default().push(details["reason"].as_str().unwrap_or("?").to_owned());
    }
    out
}

/// Parses `admin --json device ID`.
pub fn device_record(json: &str) -> Result<DeviceRecord, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("device history is not JSON ({e}): {json}"))?;
    let licences = v["licences"].as_array().map_or(0, Vec::len);
    let installs = v["installs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    (
                        i["result_id"].as_str().unwrap_or_default().to_owned(),
                        i["status_code"].as_u64().unwrap_or(0) as u32,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(DeviceRecord { licences, installs })
}

/// Parses `agent journal --json`.
pub fn journal_rows(json: &str) -> Result<Vec<JournalRow>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("journal is not JSON ({e}): {json}"))?;
    let rows = v.as_array().ok_or_else(|| format!("journal is not a JSON array: {json}"))?;
    Ok(rows
        .iter()
        .map(|r| JournalRow {
            result_id: r["result_id"].as_str().unwrap_or_default().to_owned(),
            device_id: r["device_id"].as_str().unwrap_or_default().to_owned(),
            status_code: r["status_code"].as_u64().unwrap_or(0) as u32,
            state: r["state"].as_str().unwrap_or_default().to_owned(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANT: Expected = Expected { devices: 4, installs: 3 };

    /// Four devices on two stations, quota 3: three installed and reported, one refused.
    fn good() -> Observed {
        let mut o = Observed { batch: (3, 3, 0), audit_ok: (true, String::new()), ..Observed::default() };
        for (i, station) in ["s1", "s1", "s2", "s2"].iter().enumerate() {
            o.devices.insert(format!("d{i}"), (*station).to_owned());
        }
        for i in 0..3 {
            o.records.insert(format!("d{i}"), DeviceRecord { licences: 1, installs: vec![(format!("r{i}"), 0)] });
            o.journals.entry(o.devices[&format!("d{i}")].clone()).or_default().push(JournalRow {
                result_id: format!("r{i}"),
                device_id: format!("d{i}"),
                status_code: 0,
                state: "reported".into(),
            });
        }
        o.records.insert("d3".into(), DeviceRecord::default());
        o.refusals.insert("d3".into(), vec!["QUOTA_EXHAUSTED".into()]);
        o.journals.get_mut("s2").unwrap().push(JournalRow {
            result_id: "r3".into(),
            device_id: "d3".into(),
            status_code: 0xFFFF,
            state: "rejected: local only: no licence was issued for this device (nothing to report)".into(),
        });
        o
    }

    #[test]
    fn a_correct_outcome_passes() {
        assert_eq!(good().violations(WANT), Vec::<String>::new());
    }

    #[test]
    fn an_over_issued_batch_fails() {
        // The quota check disabled: the fourth device licensed and installed too.
        let mut o = good();
        o.batch = (4, 4, 0);
        o.refusals.clear();
        o.records.insert("d3".into(), DeviceRecord { licences: 1, installs: vec![("r3".into(), 0)] });
        o.journals.get_mut("s2").unwrap()[1].state = "reported".into();
        let v = o.violations(WANT);
        assert!(v.iter().any(|m| m.contains("4 devices installed, expected exactly 3")), "{v:?}");
        assert!(v.iter().any(|m| m.contains("batch counts issued 4")), "{v:?}");
    }

    #[test]
    fn a_duplicated_result_or_a_second_licence_fails() {
        let mut o = good();
        o.records.get_mut("d1").unwrap().installs.push(("r1-again".into(), 0));
        o.records.get_mut("d2").unwrap().licences = 2;
        let v = o.violations(WANT);
        assert!(v.iter().any(|m| m.contains("device d1: 1 licence(s) and 2 install report(s)")), "{v:?}");
        assert!(v.iter().any(|m| m.contains("device d2 holds 2 licences")), "{v:?}");
    }

    #[test]
    fn a_lost_or_undelivered_result_fails() {
        let mut o = good();
        o.records.get_mut("d0").unwrap().installs.clear();
        o.journals.get_mut("s2").unwrap()[0].state = "unreported".into();
        let v = o.violations(WANT);
        assert!(v.iter().any(|m| m.contains("device d0: 1 licence(s) and 0 install report(s)")), "{v:?}");
        assert!(v.iter().any(|m| m.contains("is unreported, not delivered")), "{v:?}");
        assert!(v.iter().any(|m| m.contains("device d0: the ledger holds results {}")), "{v:?}");
    }

    #[test]
    fn a_device_without_a_verdict_or_refused_for_another_reason_fails() {
        let mut o = good();
        o.refusals.insert("d3".into(), vec!["SITE_NOT_ALLOWED".into()]);
        let v = o.violations(WANT);
        assert!(v.iter().any(|m| m.contains("refused for [\"SITE_NOT_ALLOWED\"]")), "{v:?}");
        o.refusals.clear();
        let v = o.violations(WANT);
        assert!(v.iter().any(|m| m.contains("device d3 has neither a licence nor a refusal")), "{v:?}");
    }

    #[test]
    fn a_broken_audit_chain_fails() {
        let mut o = good();
        o.audit_ok = (false, "record 17: hash mismatch".into());
        assert_eq!(o.violations(WANT), vec!["the audit chain does not verify: record 17: hash mismatch".to_owned()]);
    }

    #[test]
    fn log_and_json_parsers_read_the_products_output() {
        let log = "target 0: STM32L4 (L462) tcp://127.0.0.1:7000 device_id 360e83587080859c80f1ea762e689d70 sfi \
                   idle rdp level 0\nserving 1 stm32l4 target(s)\n2026-11-24T10:00:00.000Z  INFO flashgate_sim::server: \
                   target ready target=1 family=stm32l4 device_id=00112233445566778899aabbccddeeff\nother line\n";
        assert_eq!(
            devices_in_sim_log(log),
            vec!["360e83587080859c80f1ea762e689d70".to_owned(), "00112233445566778899aabbccddeeff".to_owned()]
        );
        let export = r#"{"seq":5,"event":"licence.refused","subject":"batch/lot/device/d3","details_json":"{\"reason\":\"QUOTA_EXHAUSTED\"}"}
{"seq":6,"event":"licence.issued","subject":"batch/lot/device/d1","details_json":"{}"}
{"seq":7,"event":"licence.refused","subject":"batch/other/device/d9","details_json":"{\"reason\":\"BATCH_CLOSED\"}"}"#;
        let r = refusals_in_audit(export, "lot");
        assert_eq!(r.len(), 1);
        assert_eq!(r["d3"], vec!["QUOTA_EXHAUSTED".to_owned()]);
        let d = device_record(r#"{"device_id":"d1","licences":[{}],"installs":[{"result_id":"x","status_code":0}]}"#)
            .unwrap();
        assert_eq!(d, DeviceRecord { licences: 1, installs: vec![("x".into(), 0)] });
        let j = journal_rows(r#"[{"result_id":"x","device_id":"d1","status_code":0,"state":"reported"}]"#).unwrap();
        assert_eq!(j[0].state, "reported");
    }
}
