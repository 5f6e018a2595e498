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
        Self::file("multi-site.yml", project, env)
    }

    /// The project `project` of the repository's `deploy/compose/FILE` (e.g. `sites.yml`), with `env`
    /// for compose's variable substitution.
    pub fn file(file: &str, project: &str, env: &[(&str, &str)]) -> Self {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose").join(file);
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

    /// Every network `container` is attached to, by name.
    pub fn networks_of(&self, container: &str) -> Vec<String> {
        self.docker(&["inspect", "-f", "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}} {{end}}", container])
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// The Prometheus text `service` serves on `127.0.0.1:PORT/metrics`, fetched inside its container
    /// (netcat: the images carry no HTTP client).
    pub fn metrics(&self, service: &str, port: u16) -> Result<String, String> {
        let script =
            format!("printf 'GET /metrics HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' | nc -w 3 127.0.0.1 {port}");
        let o = self.try_run(&["exec", "-T", service, "sh", "-c", &script]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if o.status.success() && out.starts_with("HTTP/") {
            Ok(out)
        } else {
            Err(format!(
                "scraping {service}:{port}/metrics failed ({}): {out}{}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ))
        }
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

pub mod sites {
    //! The pass criteria of the site-broker scenario (`deploy/compose/sites.yml`,
    //! `tests/tests/compose_faults.rs`): [`SitesObserved`] holds what the run left behind, read through
    //! the product's own interfaces (central's and each site broker's `admin export devices`, central's
    //! `admin audit export`, `admin lease list`, `admin audit verify` on every broker, the station
    //! journals, site-berlin's log and a metrics scrape during the cut), and
    //! [`SitesObserved::violations`] names every broken invariant. Kept apart from Docker so that the
    //! unit tests below can show each invariant catching a fabricated broken outcome.

    use std::collections::{BTreeMap, BTreeSet};

    use flashgate_common::device_export::DeviceRow;
    use serde_json::Value;

    use super::JournalRow;

    /// One lease of `admin lease list --json`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct LeaseRow {
        /// Lease id.
        pub id: String,
        /// The site it was granted to.
        pub site: String,
        /// Units granted.
        pub granted: i64,
        /// Units used by licences that reached central.
        pub used: i64,
        /// Units handed back.
        pub returned: i64,
        /// Units neither used nor returned.
        pub outstanding: i64,
        /// `active` or `settled`.
        pub state: String,
    }

    /// What central's audit chain says about the batch's licences.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct CentralAudit {
        /// Devices central licensed itself (`licence.issued`: a station fell back to central).
        pub direct: BTreeSet<String>,
        /// Devices whose licence a site replicated (`licence.replicated`), with that site.
        pub replicated: BTreeMap<String, String>,
        /// `licence.conflict` records (a device licensed at two sites), by device.
        pub conflicts: Vec<String>,
        /// `licence.unleased` records (a site licence with no lease unit), by device.
        pub unleased: Vec<String>,
    }

    /// The WAN cut as the product showed it.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct CutSeen {
        /// site-berlin logged `central broker unreachable` after the cut began.
        pub unreachable_logged: bool,
        /// … and then `central broker reachable` after the reconnection.
        pub reachable_logged: bool,
        /// A lag or link metric scraped during the cut that shows it (e.g. `flashgate_upstream_up 0`),
        /// in words; `None` when no scrape showed it.
        pub metric: Option<String>,
        /// Licences site-berlin issued while cut off (its own `batch status`, end minus start of the cut):
        /// the site kept producing from its lease.
        pub issued_offline: i64,
    }

    /// Everything the site-broker scenario observed at the end.
    #[derive(Debug, Clone, Default)]
    pub struct SitesObserved {
        /// Every device the stations' simulators served, with its station (service name).
        pub devices: BTreeMap<String, String>,
        /// Each station (service name) → its site.
        pub station_sites: BTreeMap<String, String>,
        /// Central's device export of the batch.
        pub central: Vec<DeviceRow>,
        /// Each site broker's device export of the batch, by site.
        pub sites: BTreeMap<String, Vec<DeviceRow>>,
        /// Central's audit records about the batch's licences.
        pub central_audit: CentralAudit,
        /// Central's leases of the batch.
        pub leases: Vec<LeaseRow>,
        /// `admin audit verify` per broker: ok, and the answer or fault.
        pub audits: BTreeMap<String, (bool, String)>,
        /// Each station's journal.
        pub journals: BTreeMap<String, Vec<JournalRow>>,
        /// The cut.
        pub cut: CutSeen,
    }

    /// What the scenario expects.
    #[derive(Debug, Clone)]
    pub struct SitesExpected {
        /// Devices across all stations.
        pub devices: usize,
        /// The batch quota: exactly this many licences globally.
        pub licences: usize,
        /// Every site that must have leased and whose ledger is compared.
        pub sites: Vec<String>,
        /// Every broker whose audit chain must verify.
        pub brokers: Vec<String>,
    }

    impl SitesObserved {
        /// Every broken invariant, in words (empty: the scenario passed):
        /// - every device the simulators served is in central's export exactly once, and nothing else
        ///   is; exactly `licences` of them hold a licence there, installed, its site the serving
        ///   station's; the others hold none and were refused `QUOTA_EXHAUSTED` (never another reason);
        /// - central's licences are the union of the site ledgers' (same device, site, station and
        ///   licence SHA-256) and those central issued itself to a station that fell back to it; no
        ///   device is licensed in two ledgers, and central recorded no conflict or unleased licence;
        /// - every lease is settled: granted == used + returned, nothing outstanding; the units the
        ///   leases' `used` count are the site ledgers' licences; every site leased;
        /// - every audit chain verifies; every station journal is delivered (each result of a licensed
        ///   device `reported` and the very result central holds, results of unlicensed devices kept
        ///   local);
        /// - the cut shows in site-berlin's log (unreachable, then reachable) and in a metric, and
        ///   site-berlin issued licences while it was cut off.
        pub fn violations(&self, want: &SitesExpected) -> Vec<String> {
            let mut v = Vec::new();
            if self.devices.len() != want.devices {
                v.push(format!(
                    "{} devices seen on the stations' simulators, expected {}",
                    self.devices.len(),
                    want.devices
                ));
            }
            // Central's export: one row per served device.
            let mut central: BTreeMap<&str, &DeviceRow> = BTreeMap::new();
            for row in &self.central {
                if central.insert(&row.device_id, row).is_some() {
                    v.push(format!("central's export lists device {} twice", row.device_id));
                }
                if !self.devices.contains_key(&row.device_id) {
                    v.push(format!(
                        "central's export names device {}, which no station's simulator served",
                        row.device_id
                    ));
                }
            }
            let site_of =
                |device: &str| self.devices.get(device).and_then(|s| self.station_sites.get(s)).map(String::as_str);
            let mut licensed = 0usize;
            let mut refused = 0usize;
            for device in self.devices.keys() {
                let Some(row) = central.get(device.as_str()) else {
                    v.push(format!("device {device} is missing from central's export: it got no verdict there"));
                    continue;
                };
                match &row.licence {
                    Some(l) => {
                        licensed += 1;
                        if Some(l.site.as_str()) != site_of(device) {
                            v.push(format!(
                                "device {device}: central's licence names site {:?}, its station is at {:?}",
                                l.site,
                                site_of(device)
                            ));
                        }
                        if !row.attempts.iter().any(|a| a.status_code == 0) {
                            v.push(format!(
                                "device {device} is licensed at central but no successful install is recorded"
                            ));
                        }
                        if !row.refusals.is_empty() {
                            v.push(format!("device {device} is both licensed and refused {:?}", reasons(row)));
                        }
                    }
                    None if row.refusals.is_empty() => {
                        v.push(format!(
                            "device {device} has neither a licence nor a refusal at central: it got no verdict"
                        ));
                    }
                    None if row.refusals.iter().any(|r| r.reason != "QUOTA_EXHAUSTED") => {
                        v.push(format!(
                            "device {device} was refused for {:?}, expected only QUOTA_EXHAUSTED",
                            reasons(row)
                        ));
                    }
                    None => refused += 1,
                }
            }
            if licensed != want.licences {
                v.push(format!("{licensed} licences at central, expected exactly {}", want.licences));
            }
            let refused_want = want.devices.saturating_sub(want.licences);
            if refused != refused_want {
                v.push(format!("{refused} devices refused QUOTA_EXHAUSTED, expected exactly {refused_want}"));
            }
            // Central = union of the site ledgers + what central issued itself.
            let mut held: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for want_site in &want.sites {
                if !self.sites.contains_key(want_site) {
                    v.push(format!("no device export from the site broker of {want_site}"));
                }
            }
            let mut site_licences = 0i64;
            for (site, rows) in &self.sites {
                for row in rows {
                    let Some(l) = &row.licence else { continue };
                    site_licences += 1;
                    held.entry(&row.device_id).or_default().push(format!("site {site}"));
                    if &l.site != site {
                        v.push(format!(
                            "device {}: site {site}'s ledger holds a licence naming site {}",
                            row.device_id, l.site
                        ));
                    }
                    match central.get(row.device_id.as_str()).and_then(|c| c.licence.as_ref()) {
                        None => v.push(format!(
                            "device {} is licensed in site {site}'s ledger but central holds no licence for it",
                            row.device_id
                        )),
                        Some(c) if (c.licence_sha256.as_str(), c.site.as_str(), c.station.as_str())
                            != (l.licence_sha256.as_str(), l.site.as_str(), l.station.as_str()) =>
                        {
                            v.push(format!(
                                "device {}: central's licence ({}, site {}, {}) differs from site {site}'s ({}, site {}, {})",
                                row.device_id, c.licence_sha256, c.site, c.station, l.licence_sha256, l.site, l.station
                            ))
                        }
                        Some(_) => {}
                    }
                }
            }
            for device in &self.central_audit.direct {
                held.entry(device).or_default().push("central".into());
            }
            for (device, places) in &held {
                if places.len() > 1 {
                    v.push(format!("device {device} holds {} licences: {}", places.len(), places.join(", ")));
                }
            }
            for row in self.central.iter().filter(|r| r.licence.is_some()) {
                if !held.contains_key(row.device_id.as_str()) {
                    v.push(format!(
                        "device {} is licensed at central but in neither site ledger, and central did not issue it",
                        row.device_id
                    ));
                }
            }
            for device in &self.central_audit.conflicts {
                v.push(format!("central recorded a licence conflict for device {device} (licensed at two sites)"));
            }
            for device in &self.central_audit.unleased {
                v.push(format!("central recorded an unleased site licence for device {device}"));
            }
            // Leases.
            for site in &want.sites {
                if !self.leases.iter().any(|l| &l.site == site) {
                    v.push(format!("site {site} never leased units of the batch"));
                }
            }
            for l in &self.leases {
                if l.granted != l.used + l.returned || l.outstanding != 0 || l.state != "settled" {
                    v.push(format!(
                        "lease {} of {} not accounted for: granted {}, used {}, returned {}, outstanding {}, {}",
                        l.id, l.site, l.granted, l.used, l.returned, l.outstanding, l.state
                    ));
                }
            }
            let used: i64 = self.leases.iter().map(|l| l.used).sum();
            if used != site_licences {
                v.push(format!("the leases used {used} units, the site ledgers hold {site_licences} licences"));
            }
            // Audit chains.
            for b in &want.brokers {
                match self.audits.get(b) {
                    None => v.push(format!("the audit chain of {b} was not verified")),
                    Some((false, why)) => v.push(format!("the audit chain of {b} does not verify: {why}")),
                    Some((true, _)) => {}
                }
            }
            // Journals.
            let mut journal_results: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
            for (station, rows) in &self.journals {
                for row in rows {
                    let licensed = central.get(row.device_id.as_str()).is_some_and(|c| c.licence.is_some());
                    match row.state.as_str() {
                        "reported" => {
                            journal_results.entry(&row.device_id).or_default().insert(&row.result_id);
                        }
                        s if s.starts_with("rejected: local only") && !licensed => {}
                        s if s.starts_with("rejected: local only") => v.push(format!(
                            "{station}: result {} of licensed device {} was kept local, not reported",
                            row.result_id, row.device_id
                        )),
                        other => v.push(format!(
                            "{station}: result {} of device {} is {other}, not delivered",
                            row.result_id, row.device_id
                        )),
                    }
                }
            }
            for row in &self.central {
                let ledger: BTreeSet<&str> = row.attempts.iter().map(|a| a.result_id.as_str()).collect();
                let journal = journal_results.get(row.device_id.as_str()).cloned().unwrap_or_default();
                if ledger != journal {
                    v.push(format!(
                        "device {}: central holds results {ledger:?}, the station journals {journal:?}",
                        row.device_id
                    ));
                }
            }
            // The cut.
            if !self.cut.unreachable_logged {
                v.push("site-berlin's log does not show central unreachable during the cut".into());
            }
            if !self.cut.reachable_logged {
                v.push("site-berlin's log does not show central reachable again after the cut".into());
            }
            if self.cut.issued_offline <= 0 {
                v.push(format!(
                    "site-berlin issued {} licences while cut off: the site did not keep producing from its lease",
                    self.cut.issued_offline
                ));
            }
            if self.cut.metric.is_none() {
                v.push("no metric scraped during the cut showed it (lag > 0 or upstream_up 0)".into());
            }
            v
        }
    }

    fn reasons(row: &DeviceRow) -> Vec<&str> {
        row.refusals.iter().map(|r| r.reason.as_str()).collect()
    }

    /// Parses `admin export devices --format jsonl` output.
    pub fn device_rows(jsonl: &str) -> Result<Vec<DeviceRow>, String> {
        jsonl
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("not a device row ({e}): {l}")))
            .collect()
    }

    /// Parses `admin --json lease list`.
    pub fn lease_rows(json: &str) -> Result<Vec<LeaseRow>, String> {
        let v: Value = serde_json::from_str(json).map_err(|e| format!("lease list is not JSON ({e}): {json}"))?;
        let rows = v.as_array().ok_or_else(|| format!("lease list is not a JSON array: {json}"))?;
        Ok(rows
            .iter()
            .map(|l| LeaseRow {
                id: l["id"].as_str().unwrap_or_default().to_owned(),
                site: l["site"].as_str().unwrap_or_default().to_owned(),
                granted: l["granted"].as_i64().unwrap_or(-1),
                used: l["used"].as_i64().unwrap_or(-1),
                returned: l["returned"].as_i64().unwrap_or(-1),
                outstanding: l["outstanding"].as_i64().unwrap_or(-1),
                state: l["state"].as_str().unwrap_or_default().to_owned(),
            })
            .collect())
    }

    /// Parses central's `admin --json audit export`: its licence records about devices of `batch`.
    pub fn central_audit(export: &str, batch: &str) -> CentralAudit {
        let mut out = CentralAudit::default();
        let prefix = format!("batch/{batch}/device/");
        for line in export.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(rec) = serde_json::from_str::<Value>(line) else { continue };
            let Some(device) = rec["subject"].as_str().and_then(|s| s.strip_prefix(&prefix)) else { continue };
            let details: Value =
                rec["details_json"].as_str().and_then(|d| serde_json::from_str(d).ok()).unwrap_or_default();
            match rec["event"].as_str().unwrap_or_default() {
                "licence.issued" => {
                    out.direct.insert(device.to_owned());
                }
                "licence.replicated" => {
                    out.replicated.insert(device.to_owned(), details["site"].as_str().unwrap_or("?").to_owned());
                }
                "licence.conflict" => out.conflicts.push(device.to_owned()),
                "licence.unleased" => out.unleased.push(device.to_owned()),
                _ => {}
            }
        }
        out
    }

    /// The value of the first sample `name` whose labels contain `label` (e.g. `site="berlin"`, or
    /// `""` for any) in Prometheus text.
    pub fn metric_value(text: &str, name: &str, label: &str) -> Option<f64> {
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            if !labels.contains(label) {
                return None;
            }
            value.split_whitespace().next()?.parse().ok()
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use flashgate_common::device_export::{Attempt, LicenceInfo, RefusalInfo, Verdict};

        fn want() -> SitesExpected {
            SitesExpected {
                devices: 5,
                licences: 4,
                sites: vec!["berlin".into(), "austin".into()],
                brokers: vec!["central".into(), "site-berlin".into(), "site-austin".into()],
            }
        }

        fn row(device: &str, station: &str, site: &str, licensed: bool) -> DeviceRow {
            DeviceRow {
                batch_id: "lot".into(),
                device_id: device.into(),
                verdict: if licensed { Verdict::Installed } else { Verdict::Refused },
                product_id: String::new(),
                certificate: String::new(),
                licence: licensed.then(|| LicenceInfo {
                    station: station.into(),
                    site: site.into(),
                    issued_at_ms: 1,
                    key_id: "k".into(),
                    image_sha256: "i".into(),
                    licence_sha256: format!("sha-{device}"),
                    reissued_to: vec![],
                }),
                attempts: if licensed {
                    vec![Attempt {
                        station: station.into(),
                        result_id: format!("r-{device}"),
                        attempt: 1,
                        probe_id: String::new(),
                        probe_kind: String::new(),
                        status_code: 0,
                        status: "installed".into(),
                        message: String::new(),
                        flash_crc: None,
                        reported_at_ms: 2,
                        timings_us: BTreeMap::new(),
                    }]
                } else {
                    vec![]
                },
                attempts_total: u64::from(licensed),
                refusals: if licensed {
                    vec![]
                } else {
                    vec![RefusalInfo {
                        station: station.into(),
                        site: site.into(),
                        reason: "QUOTA_EXHAUSTED".into(),
                        detail: String::new(),
                        count: 1,
                        first_at_ms: 1,
                        last_at_ms: 1,
                    }]
                },
            }
        }

        fn journal(device: &str, licensed: bool) -> JournalRow {
            JournalRow {
                result_id: format!("r-{device}"),
                device_id: device.into(),
                status_code: if licensed { 0 } else { 0xFFFF },
                state: if licensed { "reported".into() } else { "rejected: local only: no licence".into() },
            }
        }

        /// Five devices, quota 4: b1, b2 licensed at site berlin, b3 licensed by central itself while
        /// site-berlin was down, a1 licensed at site austin, a2 refused at austin.
        fn good() -> SitesObserved {
            let mut o = SitesObserved::default();
            for (d, s) in [("b1", "st-b"), ("b2", "st-b"), ("b3", "st-b"), ("a1", "st-a"), ("a2", "st-a")] {
                o.devices.insert(d.into(), s.into());
            }
            o.station_sites.insert("st-b".into(), "berlin".into());
            o.station_sites.insert("st-a".into(), "austin".into());
            o.central = vec![
                row("b1", "berlin/1", "berlin", true),
                row("b2", "berlin/1", "berlin", true),
                row("b3", "berlin/1", "berlin", true),
                row("a1", "austin/1", "austin", true),
                row("a2", "austin/1", "austin", false),
            ];
            o.sites.insert(
                "berlin".into(),
                vec![row("b1", "berlin/1", "berlin", true), row("b2", "berlin/1", "berlin", true)],
            );
            o.sites.insert(
                "austin".into(),
                vec![row("a1", "austin/1", "austin", true), row("a2", "austin/1", "austin", false)],
            );
            o.central_audit.direct.insert("b3".into());
            o.central_audit.replicated.insert("b1".into(), "berlin".into());
            o.central_audit.replicated.insert("b2".into(), "berlin".into());
            o.central_audit.replicated.insert("a1".into(), "austin".into());
            let lease = |id: &str, site: &str, granted, used, returned| LeaseRow {
                id: id.into(),
                site: site.into(),
                granted,
                used,
                returned,
                outstanding: granted - used - returned,
                state: "settled".into(),
            };
            o.leases = vec![lease("l1", "berlin", 2, 2, 0), lease("l2", "austin", 2, 1, 1)];
            for b in ["central", "site-berlin", "site-austin"] {
                o.audits.insert(b.into(), (true, "{\"ok\":true}".into()));
            }
            o.journals.insert("st-b".into(), vec![journal("b1", true), journal("b2", true), journal("b3", true)]);
            o.journals.insert("st-a".into(), vec![journal("a1", true), journal("a2", false)]);
            o.cut = CutSeen {
                unreachable_logged: true,
                reachable_logged: true,
                metric: Some("upstream_up 0".into()),
                issued_offline: 1,
            };
            o
        }

        #[test]
        fn a_correct_outcome_passes() {
            assert_eq!(good().violations(&want()), Vec::<String>::new());
        }

        #[test]
        fn one_licence_too_many_fails() {
            // The lease check broken: austin licensed a2 beyond its lease (41 of 40, in small).
            let mut o = good();
            o.central[4] = row("a2", "austin/1", "austin", true);
            o.sites.get_mut("austin").unwrap()[1] = row("a2", "austin/1", "austin", true);
            o.journals.get_mut("st-a").unwrap()[1] = journal("a2", true);
            let v = o.violations(&want());
            assert!(v.iter().any(|m| m.contains("5 licences at central, expected exactly 4")), "{v:?}");
            assert!(v.iter().any(|m| m.contains("0 devices refused QUOTA_EXHAUSTED, expected exactly 1")), "{v:?}");
            assert!(v.iter().any(|m| m.contains("the leases used 3 units, the site ledgers hold 4 licences")), "{v:?}");
        }

        #[test]
        fn a_lease_not_accounted_for_fails() {
            let mut o = good();
            o.leases[1].returned = 0; // granted 2, used 1, returned 0: one unit vanished
            o.leases[0].state = "active".into();
            o.leases[0].outstanding = 1;
            let v = o.violations(&want());
            assert!(
                v.iter().any(|m| m.contains("lease l2 of austin not accounted for: granted 2, used 1, returned 0")),
                "{v:?}"
            );
            assert!(
                v.iter().any(|m| m.contains("lease l1 of berlin not accounted for") && m.contains("active")),
                "{v:?}"
            );
            o.leases.retain(|l| l.site != "austin");
            let v = o.violations(&want());
            assert!(v.iter().any(|m| m.contains("site austin never leased")), "{v:?}");
        }

        #[test]
        fn a_central_licence_missing_from_the_union_fails() {
            // b2 lost from site-berlin's ledger: central holds a licence nobody issued.
            let mut o = good();
            o.sites.get_mut("berlin").unwrap().remove(1);
            let v = o.violations(&want());
            assert!(
                v.iter().any(|m| m.contains("device b2 is licensed at central but in neither site ledger")),
                "{v:?}"
            );
            // And the other way: a site licence that never reached central, or reached it altered.
            let mut o = good();
            o.central[0].licence = None;
            o.central[0].refusals = row("x", "berlin/1", "berlin", false).refusals;
            o.central[1].licence.as_mut().unwrap().licence_sha256 = "other".into();
            let v = o.violations(&want());
            assert!(
                v.iter()
                    .any(|m| m.contains("device b1 is licensed in site berlin's ledger but central holds no licence")),
                "{v:?}"
            );
            assert!(v.iter().any(|m| m.contains("device b2: central's licence (other, site berlin")), "{v:?}");
        }

        #[test]
        fn two_licences_for_one_device_fail() {
            // b1 licensed by site-berlin and again by central itself, and by site austin.
            let mut o = good();
            o.central_audit.direct.insert("b1".into());
            o.sites.get_mut("austin").unwrap().push(row("b1", "austin/1", "austin", true));
            o.central_audit.conflicts.push("b1".into());
            let v = o.violations(&want());
            assert!(
                v.iter().any(|m| m.contains("device b1 holds 3 licences: site austin, site berlin, central")),
                "{v:?}"
            );
            assert!(v.iter().any(|m| m.contains("licence conflict for device b1")), "{v:?}");
            let mut o = good();
            o.central.push(row("b1", "berlin/1", "berlin", true));
            let v = o.violations(&want());
            assert!(v.iter().any(|m| m.contains("central's export lists device b1 twice")), "{v:?}");
        }

        #[test]
        fn a_wrong_refusal_a_missing_verdict_or_a_wrong_site_fails() {
            let mut o = good();
            o.central[4].refusals[0].reason = "LEASE_EXPIRED".into();
            o.central[3].licence.as_mut().unwrap().site = "berlin".into();
            o.central.remove(2);
            let v = o.violations(&want());
            assert!(v.iter().any(|m| m.contains("device a2 was refused for [\"LEASE_EXPIRED\"]")), "{v:?}");
            assert!(v.iter().any(|m| m.contains("device a1: central's licence names site \"berlin\"")), "{v:?}");
            assert!(v.iter().any(|m| m.contains("device b3 is missing from central's export")), "{v:?}");
        }

        #[test]
        fn an_unverified_chain_an_undelivered_journal_or_an_invisible_cut_fails() {
            let mut o = good();
            o.audits.insert("site-austin".into(), (false, "record 9: hash mismatch".into()));
            o.audits.remove("central");
            o.journals.get_mut("st-b").unwrap()[0].state = "unreported".into();
            o.cut = CutSeen::default();
            let v = o.violations(&want());
            assert!(v.iter().any(|m| m.contains("the audit chain of site-austin does not verify: record 9")), "{v:?}");
            assert!(v.iter().any(|m| m.contains("the audit chain of central was not verified")), "{v:?}");
            assert!(v.iter().any(|m| m.contains("result r-b1 of device b1 is unreported, not delivered")), "{v:?}");
            assert!(v.iter().any(|m| m.contains("device b1: central holds results")), "{v:?}");
            assert!(v.iter().any(|m| m.contains("does not show central unreachable")), "{v:?}");
            assert!(v.iter().any(|m| m.contains("does not show central reachable again")), "{v:?}");
            assert!(v.iter().any(|m| m.contains("no metric scraped during the cut")), "{v:?}");
            assert!(v.iter().any(|m| m.contains("site-berlin issued 0 licences while cut off")), "{v:?}");
        }

        #[test]
        fn parsers_read_the_products_output() {
            let leases = r#"[{"id":"l1","batch_id":"lot","site":"berlin","holder":"site-berlin","granted":12,"used":9,"returned":3,"outstanding":0,"state":"settled","granted_at_ms":1,"expires_at_ms":2,"settled_at_ms":3}]"#;
            let l = lease_rows(leases).unwrap();
            assert_eq!((l[0].granted, l[0].used, l[0].returned, l[0].state.as_str()), (12, 9, 3, "settled"));
            let export = r#"{"seq":1,"event":"licence.issued","subject":"batch/lot/device/d1","details_json":"{}"}
{"seq":2,"event":"licence.replicated","subject":"batch/lot/device/d2","details_json":"{\"site\":\"austin\"}"}
{"seq":3,"event":"licence.conflict","subject":"batch/lot/device/d3","details_json":"{}"}
{"seq":4,"event":"licence.issued","subject":"batch/other/device/d9","details_json":"{}"}"#;
            let a = central_audit(export, "lot");
            assert_eq!(a.direct, ["d1".to_owned()].into_iter().collect());
            assert_eq!(a.replicated["d2"], "austin");
            assert_eq!(a.conflicts, vec!["d3".to_owned()]);
            let line = row("d1", "berlin/1", "berlin", true).to_line();
            assert_eq!(device_rows(&format!("{line}\n{line}")).unwrap().len(), 2);
            let text = "# HELP x\nflashgate_upstream_up 0\nflashgate_site_replication_lag_records{site=\"berlin\"} 7\n";
            assert_eq!(metric_value(text, "flashgate_upstream_up", ""), Some(0.0));
            assert_eq!(metric_value(text, "flashgate_site_replication_lag_records", "site=\"berlin\""), Some(7.0));
            assert_eq!(metric_value(text, "flashgate_site_replication_lag_records", "site=\"austin\""), None);
            assert_eq!(metric_value(text, "flashgate_upstream_lag_records", ""), None);
        }
    }
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
