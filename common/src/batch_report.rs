//! The yield report of a batch (`flashgate-batch-report-v1`, `flashgate admin batch report`): built from
//! the batch's per-device rows ([`crate::device_export::DeviceRow`]) in one pass and bounded memory, per
//! site, per station and per probe — installs, failures by status, refusals by reason, first-pass yield,
//! mean and p95 time per stage (HdrHistogram, three significant digits), devices per hour.
//!
//! The broker builds it from one snapshot of its ledger; anyone can build the same report offline from a
//! devices export, since the rows are the input.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::device_export::{DeviceRow, status_words};

/// The report's format name.
pub const REPORT_FORMAT: &str = "flashgate-batch-report-v1";
/// Most (site, station, probe) groups a report keeps; attempts of further groups are counted under
/// site, station and probe [`OVERFLOW`], so memory stays bounded whatever stations report.
pub const MAX_REPORT_GROUPS: usize = 4096;
/// The group name attempts beyond [`MAX_REPORT_GROUPS`] are counted under.
pub const OVERFLOW: &str = "(other)";
/// Longest stage time the histograms hold (µs): one hour; longer times are clamped to it.
pub const MAX_STAGE_US: u64 = 3_600_000_000;
/// Most distinct stage names a group keeps (others are ignored).
pub const MAX_STAGES: usize = 32;

/// Time per stage in one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageStats {
    /// Attempts that reported the stage.
    pub count: u64,
    /// Mean (µs).
    pub mean_us: f64,
    /// 95th percentile (µs).
    pub p95_us: u64,
    /// Longest (µs).
    pub max_us: u64,
}

/// One row of the report: a site, a station of a site, or a probe of a station (the names that do not
/// apply are empty), or the whole batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupReport {
    /// Site ("" in the batch total).
    pub site: String,
    /// Station identity ("" in site rows and the total).
    pub station: String,
    /// Probe id ("" in site, station and total rows).
    pub probe: String,
    /// Install attempts reported.
    pub attempts: u64,
    /// Attempts that installed.
    pub installed: u64,
    /// Failed attempts by status, in words.
    pub failed: BTreeMap<String, u64>,
    /// Refusals by reason (station and site rows and the total: refusals have no probe).
    pub refused: BTreeMap<String, u64>,
    /// Devices whose first attempt ran here.
    pub first_attempts: u64,
    /// Of those, how many installed at that first attempt.
    pub first_pass: u64,
    /// `first_pass / first_attempts`, when there were first attempts.
    pub first_pass_yield: Option<f64>,
    /// Installs per hour between the first and the last report here, when they span time.
    pub devices_per_hour: Option<f64>,
    /// Time per stage.
    pub stages: BTreeMap<String, StageStats>,
    /// First report (ms since the Unix epoch; 0 when none).
    pub first_report_ms: i64,
    /// Last report (ms; 0 when none).
    pub last_report_ms: i64,
}

/// The report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchReport {
    /// [`REPORT_FORMAT`].
    pub format: String,
    /// The batch.
    pub batch_id: String,
    /// Devices the batch's rows name.
    pub devices: u64,
    /// Devices holding a licence.
    pub licensed: u64,
    /// Devices installed.
    pub installed: u64,
    /// The batch as a whole.
    pub total: GroupReport,
    /// Per site.
    pub sites: Vec<GroupReport>,
    /// Per station.
    pub stations: Vec<GroupReport>,
    /// Per probe of a station.
    pub probes: Vec<GroupReport>,
}

#[derive(Debug, Default)]
struct Group {
    attempts: u64,
    installed: u64,
    failed: BTreeMap<String, u64>,
    refused: BTreeMap<String, u64>,
    first_attempts: u64,
    first_pass: u64,
    stages: BTreeMap<String, Histogram<u64>>,
    first_ms: Option<i64>,
    last_ms: Option<i64>,
}

impl Group {
    fn attempt(&mut self, code: u16, at_ms: i64, timings: &BTreeMap<String, u64>) {
        self.attempts += 1;
        if code == 0 {
            self.installed += 1;
        } else {
            *self.failed.entry(status_words(code)).or_default() += 1;
        }
        self.first_ms = Some(self.first_ms.map_or(at_ms, |f| f.min(at_ms)));
        self.last_ms = Some(self.last_ms.map_or(at_ms, |l| l.max(at_ms)));
        for (stage, us) in timings {
            if !self.stages.contains_key(stage) {
                if self.stages.len() >= MAX_STAGES {
                    continue;
                }
                // 1 µs to an hour at three significant digits: valid bounds, so this cannot fail.
                let Ok(h) = Histogram::new_with_bounds(1, MAX_STAGE_US, 3) else { continue };
                self.stages.insert(stage.clone(), h);
            }
            if let Some(h) = self.stages.get_mut(stage) {
                h.saturating_record((*us).clamp(1, MAX_STAGE_US));
            }
        }
    }

    fn report(&self, site: &str, station: &str, probe: &str) -> GroupReport {
        let (first, last) = (self.first_ms.unwrap_or(0), self.last_ms.unwrap_or(0));
        let hours = (last - first) as f64 / 3_600_000.0;
        GroupReport {
            site: site.into(),
            station: station.into(),
            probe: probe.into(),
            attempts: self.attempts,
            installed: self.installed,
            failed: self.failed.clone(),
            refused: self.refused.clone(),
            first_attempts: self.first_attempts,
            first_pass: self.first_pass,
            first_pass_yield: (self.first_attempts > 0).then(|| self.first_pass as f64 / self.first_attempts as f64),
            devices_per_hour: (hours > 0.0).then(|| self.installed as f64 / hours),
            stages: self
                .stages
                .iter()
                .map(|(k, h)| {
                    let s = StageStats {
                        count: h.len(),
                        mean_us: h.mean(),
                        p95_us: h.value_at_quantile(0.95),
                        max_us: h.max(),
                    };
                    (k.clone(), s)
                })
                .collect(),
            first_report_ms: first,
            last_report_ms: last,
        }
    }
}

/// The site in a station identity (`spiffe://TD/site/SITE/station/N`), "" when it names none.
pub fn site_of(station: &str) -> &str {
    station.split_once("/site/").and_then(|(_, rest)| rest.split('/').next()).unwrap_or("")
}

type Key = (String, String, String);

/// Builds a [`BatchReport`] from the rows of one batch, one row at a time.
#[derive(Debug, Default)]
pub struct ReportBuilder {
    batch_id: String,
    devices: u64,
    licensed: u64,
    installed: u64,
    total: Group,
    groups: BTreeMap<Key, Group>,
}

impl ReportBuilder {
    /// An empty report of `batch_id`.
    pub fn new(batch_id: impl Into<String>) -> Self {
        Self { batch_id: batch_id.into(), ..Self::default() }
    }

    /// The groups a (site, station, probe) counts in: the site, the station, the probe. Beyond
    /// [`MAX_REPORT_GROUPS`] new names fall into [`OVERFLOW`].
    fn keys(&mut self, site: &str, station: &str, probe: Option<&str>) -> Vec<Key> {
        let mut keys =
            vec![(site.to_owned(), String::new(), String::new()), (site.to_owned(), station.to_owned(), String::new())];
        if let Some(p) = probe {
            keys.push((site.to_owned(), station.to_owned(), p.to_owned()));
        }
        for k in &mut keys {
            if !self.groups.contains_key(k) && self.groups.len() >= MAX_REPORT_GROUPS {
                let o = || OVERFLOW.to_owned();
                *k = (
                    o(),
                    if k.1.is_empty() { String::new() } else { o() },
                    if k.2.is_empty() { String::new() } else { o() },
                );
            }
            self.groups.entry(k.clone()).or_default();
        }
        keys
    }

    /// Applies `f` to the groups `keys` and to the total.
    fn each(&mut self, keys: &[Key], mut f: impl FnMut(&mut Group)) {
        for k in keys {
            if let Some(g) = self.groups.get_mut(k) {
                f(g);
            }
        }
        f(&mut self.total);
    }

    /// Adds one device.
    pub fn add(&mut self, row: &DeviceRow) {
        self.devices += 1;
        self.licensed += u64::from(row.licence.is_some());
        self.installed += u64::from(row.verdict == crate::device_export::Verdict::Installed);
        let complete = row.attempts_total == row.attempts.len() as u64;
        for (i, a) in row.attempts.iter().enumerate() {
            let keys = self.keys(site_of(&a.station), &a.station, Some(&a.probe_id));
            let first = complete && i == 0;
            self.each(&keys, |g| {
                g.attempt(a.status_code, a.reported_at_ms, &a.timings_us);
                if first {
                    g.first_attempts += 1;
                    g.first_pass += u64::from(a.status_code == 0);
                }
            });
        }
        for r in &row.refusals {
            let keys = self.keys(&r.site, &r.station, None);
            self.each(&keys, |g| *g.refused.entry(r.reason.clone()).or_default() += r.count);
        }
    }

    /// The report.
    pub fn finish(self) -> BatchReport {
        let mut out = BatchReport {
            format: REPORT_FORMAT.into(),
            batch_id: self.batch_id,
            devices: self.devices,
            licensed: self.licensed,
            installed: self.installed,
            total: self.total.report("", "", ""),
            sites: Vec::new(),
            stations: Vec::new(),
            probes: Vec::new(),
        };
        for ((site, station, probe), g) in &self.groups {
            let r = g.report(site, station, probe);
            match (station.is_empty(), probe.is_empty()) {
                (true, _) => out.sites.push(r),
                (false, true) => out.stations.push(r),
                (false, false) => out.probes.push(r),
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::device_export::{Attempt, RefusalInfo, Verdict};

    const S1: &str = "spiffe://f.test/site/lyon/station/1";
    const S2: &str = "spiffe://f.test/site/brno/station/2";

    fn attempt(station: &str, probe: &str, code: u16, at: i64, install_us: u64) -> Attempt {
        Attempt {
            station: station.into(),
            result_id: format!("{at}"),
            attempt: 1,
            probe_id: probe.into(),
            probe_kind: "sim".into(),
            status_code: code,
            status: status_words(code),
            message: String::new(),
            flash_crc: None,
            reported_at_ms: at,
            timings_us: BTreeMap::from([("install".into(), install_us)]),
        }
    }

    fn row(id: &str, attempts: Vec<Attempt>, refusals: Vec<RefusalInfo>) -> DeviceRow {
        DeviceRow {
            batch_id: "B".into(),
            device_id: id.into(),
            verdict: Verdict::of(true, &attempts, !refusals.is_empty()),
            product_id: String::new(),
            certificate: String::new(),
            licence: None,
            attempts_total: attempts.len() as u64,
            attempts,
            refusals,
        }
    }

    #[test]
    fn groups_yield_and_stage_times() {
        let mut b = ReportBuilder::new("B");
        b.add(&row("d1", vec![attempt(S1, "p0", 0, 0, 100)], vec![]));
        b.add(&row(
            "d2",
            vec![attempt(S1, "p1", 0x0009, 1_800_000, 300), attempt(S1, "p0", 0, 3_600_000, 200)],
            vec![],
        ));
        let refused = RefusalInfo {
            station: S2.into(),
            site: "brno".into(),
            reason: "QUOTA_EXHAUSTED".into(),
            detail: String::new(),
            count: 3,
            first_at_ms: 0,
            last_at_ms: 0,
        };
        b.add(&row("d3", vec![], vec![refused]));
        let r = b.finish();
        assert_eq!((r.devices, r.installed), (3, 2));
        assert_eq!((r.total.attempts, r.total.installed, r.total.first_attempts, r.total.first_pass), (3, 2, 2, 1));
        assert_eq!(r.total.first_pass_yield, Some(0.5));
        assert_eq!(r.total.devices_per_hour, Some(2.0));
        assert_eq!(r.total.refused.get("QUOTA_EXHAUSTED"), Some(&3));
        assert_eq!(r.total.stages["install"].count, 3);
        assert_eq!(r.total.stages["install"].mean_us, 200.0);
        assert_eq!(r.total.stages["install"].max_us, 300);
        assert_eq!(r.sites.iter().map(|s| s.site.as_str()).collect::<Vec<_>>(), ["brno", "lyon"]);
        assert_eq!(r.stations.len(), 2);
        let p0 = r.probes.iter().find(|p| p.probe == "p0").unwrap();
        assert_eq!((p0.attempts, p0.installed, p0.first_attempts, p0.first_pass), (2, 2, 1, 1));
        let p1 = r.probes.iter().find(|p| p.probe == "p1").unwrap();
        assert_eq!(p1.failed.values().sum::<u64>(), 1);
        assert_eq!(p1.first_pass_yield, Some(0.0));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<BatchReport>(&json).unwrap(), r);
    }

    #[test]
    fn groups_are_bounded() {
        let mut b = ReportBuilder::new("B");
        for i in 0..(MAX_REPORT_GROUPS + 10) {
            b.add(&row(&format!("d{i:06}"), vec![attempt(S1, &format!("p{i}"), 0, 0, 1)], vec![]));
        }
        let r = b.finish();
        assert!(r.sites.len() + r.stations.len() + r.probes.len() <= MAX_REPORT_GROUPS + 3);
        assert!(r.probes.iter().any(|p| p.probe == OVERFLOW));
        assert_eq!(r.total.attempts as usize, MAX_REPORT_GROUPS + 10);
    }

    #[test]
    fn site_of_station_identities() {
        assert_eq!(site_of(S1), "lyon");
        assert_eq!(site_of("spiffe://f.test/admin/ops"), "");
    }
}
