//! The per-device record (`flashgate-devices-v1`): one JSON object per device of a batch with everything
//! the ledger knows of it — its chip certificate, its licence, every install attempt with its probe and
//! stage timings, its refusals, and the verdict. The broker writes these lines (`flashgate admin export
//! devices`, and inside a certificate of conformance, which signs their SHA-256); this module owns the
//! format, the verdict rule, the CSV rendering and the counts a reader derives from a file.
//!
//! The JSON lines are canonical: a [`DeviceRow`] serialises to exactly one byte string (fields in
//! declaration order, no whitespace), so the hash a broker signs is the hash of the file a reader holds.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit_export::Multiset;
use crate::protocol::SfiStatus;

/// The format name of the per-device lines.
pub const DEVICES_FORMAT: &str = "flashgate-devices-v1";
/// Longest line a reader accepts (bytes, newline included): a device with many attempts and refusals
/// stays far below it (the broker keeps at most [`MAX_ATTEMPTS_PER_DEVICE`] attempts per line).
pub const MAX_DEVICE_LINE: usize = 1 << 20;
/// Most attempts written for one device (the newest are kept; `attempts_total` says how many exist).
pub const MAX_ATTEMPTS_PER_DEVICE: usize = 256;
/// Most refusal rows written for one device (one row already counts repeats of a reason at a station).
pub const MAX_REFUSALS_PER_DEVICE: usize = 256;
/// Status code a station reports for a host-side failure (link lost, probe gone), profile §5.
pub const HOST_FAILURE: u16 = 0xFFFF;

/// What became of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Licensed, and at least one install report says installed.
    Installed,
    /// Install reports exist and every one is a failure.
    Failed,
    /// Licensed, no install report (yet).
    Licensed,
    /// Never licensed in this batch; refused at least once.
    Refused,
    /// Neither licensed nor refused, but reported (a failure before licensing).
    Unlicensed,
}

impl Verdict {
    /// The verdict in words, as `admin device` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Installed => "installed",
            Self::Failed => "failed",
            Self::Licensed => "licensed",
            Self::Refused => "refused",
            Self::Unlicensed => "unlicensed",
        }
    }

    /// The verdict of a device from what the ledger holds: the one rule every reader applies.
    pub fn of(licensed: bool, attempts: &[Attempt], refused: bool) -> Self {
        if licensed && attempts.iter().any(|a| a.status_code == 0) {
            Self::Installed
        } else if licensed && !attempts.is_empty() {
            Self::Failed
        } else if licensed {
            Self::Licensed
        } else if refused {
            Self::Refused
        } else {
            Self::Unlicensed
        }
    }
}

/// A device's licence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenceInfo {
    /// Station it was issued to first.
    pub station: String,
    /// That station's site.
    pub site: String,
    /// When (ms since the Unix epoch).
    pub issued_at_ms: i64,
    /// Hex key id the licence names (the batch image's key).
    pub key_id: String,
    /// Hex SHA-256 of the encrypted image of the batch.
    pub image_sha256: String,
    /// Hex SHA-256 of the licence bytes (the `licence_sha256` of its `licence.issued` audit record).
    pub licence_sha256: String,
    /// Other stations that were handed the same licence (a retry elsewhere), in order.
    pub reissued_to: Vec<String>,
}

/// One install attempt reported by a station.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attempt {
    /// Reporting station.
    pub station: String,
    /// Its idempotency key for the result.
    pub result_id: String,
    /// Attempt number for the device on that station (from 1).
    pub attempt: u32,
    /// Probe id ("" when the station did not say).
    pub probe_id: String,
    /// Probe kind ("" when the station did not say).
    pub probe_kind: String,
    /// SFI status code (0 installed; 0xFFFF host-side failure).
    pub status_code: u16,
    /// The status code in words ([`status_words`]).
    pub status: String,
    /// The station's message.
    pub message: String,
    /// Flash CRC-32 reported by INSTALL, when it got that far.
    pub flash_crc: Option<u32>,
    /// When the broker recorded the report (ms).
    pub reported_at_ms: i64,
    /// Time per stage in microseconds, by stage name.
    pub timings_us: BTreeMap<String, u64>,
}

/// Refusals of one reason at one station.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefusalInfo {
    /// Station that asked.
    pub station: String,
    /// Its site.
    pub site: String,
    /// Stable reason (QUOTA_EXHAUSTED, …).
    pub reason: String,
    /// The latest refusal's detail, in words.
    pub detail: String,
    /// How many times.
    pub count: u64,
    /// First and last time (ms).
    pub first_at_ms: i64,
    /// Last time (ms).
    pub last_at_ms: i64,
}

/// One device of a batch: one line of the export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRow {
    /// Batch.
    pub batch_id: String,
    /// hex(SHA-256(chip_pub))[0..32].
    pub device_id: String,
    /// What became of it.
    pub verdict: Verdict,
    /// Product id from the chip certificate ("" when never licensed).
    pub product_id: String,
    /// Hex of the 136-byte chip certificate ("" when never licensed): anyone can check it against the
    /// vendor CA keys.
    pub certificate: String,
    /// The licence, if one was issued.
    pub licence: Option<LicenceInfo>,
    /// Attempts in the order the broker recorded them (the newest [`MAX_ATTEMPTS_PER_DEVICE`]).
    pub attempts: Vec<Attempt>,
    /// How many attempts the ledger holds (more than `attempts.len()` when capped).
    pub attempts_total: u64,
    /// Refusals, oldest first.
    pub refusals: Vec<RefusalInfo>,
}

impl DeviceRow {
    /// The canonical line: compact JSON and a newline.
    pub fn to_line(&self) -> String {
        // Serialising a struct of strings, integers, maps with string keys and vectors cannot fail.
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Refusal events of this device (every repeat counted).
    pub fn refusal_count(&self) -> u64 {
        self.refusals.iter().map(|r| r.count).sum()
    }

    /// Whether the first attempt the ledger recorded installed.
    pub fn first_pass(&self) -> bool {
        self.attempts_total as usize == self.attempts.len() && self.attempts.first().is_some_and(|a| a.status_code == 0)
    }
}

/// The status code in words: the profile's name for SFI codes, "host-side failure" for 0xFFFF.
pub fn status_words(code: u16) -> String {
    if code == HOST_FAILURE {
        return "host-side failure (link or probe)".into();
    }
    match SfiStatus::from_code(code) {
        Some(SfiStatus::Ok) => "installed".into(),
        Some(s) => s.message().into(),
        None => format!("unknown status 0x{code:04x}"),
    }
}

/// Counts a reader derives from a devices file, and that a certificate of conformance states.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceCounts {
    /// Lines (devices).
    pub devices: u64,
    /// Devices holding a licence.
    pub issued: u64,
    /// Devices installed.
    pub installed: u64,
    /// Licensed devices whose every report is a failure.
    pub failed: u64,
    /// Licensed devices with no report.
    pub not_reported: u64,
    /// Refusal events (every repeat).
    pub refusals: u64,
    /// Devices whose first recorded attempt installed.
    pub first_pass: u64,
    /// Devices with at least one attempt.
    pub attempted: u64,
}

impl DeviceCounts {
    /// Adds one device.
    pub fn add(&mut self, row: &DeviceRow) {
        self.devices += 1;
        self.issued += u64::from(row.licence.is_some());
        match row.verdict {
            Verdict::Installed => self.installed += 1,
            Verdict::Failed => self.failed += 1,
            Verdict::Licensed => self.not_reported += 1,
            Verdict::Refused | Verdict::Unlicensed => {}
        }
        self.refusals += row.refusal_count();
        self.first_pass += u64::from(row.first_pass());
        self.attempted += u64::from(row.attempts_total > 0);
    }
}

/// Why a devices file was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// Reading failed.
    #[error("reading the devices file at line {line}: {source}")]
    Io {
        /// 1-based line.
        line: u64,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not a device row.
    #[error("devices file line {line}: {why}")]
    Line {
        /// 1-based line.
        line: u64,
        /// What is wrong.
        why: String,
    },
}

/// A devices file read through: its SHA-256, counts, and the batch it is of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicesSummary {
    /// Hex SHA-256 of every byte.
    pub sha256: String,
    /// Counts.
    pub counts: DeviceCounts,
    /// Batch ids seen (one for a well-formed file).
    pub batches: Vec<String>,
    /// The licensed devices, to reconcile with the chain's `licence.issued` records.
    pub licensed: Multiset,
    /// Every attempt listed, to reconcile with the chain's `install.reported` records
    /// (see [`crate::audit_export::BatchTally`]).
    pub attempts: Multiset,
    /// Attempts the ledger holds (the sum of `attempts_total`).
    pub attempts_total: u64,
    /// Devices with more attempts than a line lists ([`MAX_ATTEMPTS_PER_DEVICE`]).
    pub capped_devices: u64,
}

/// Reads a devices file (JSON lines) in bounded memory: each line parsed, checked canonical and counted,
/// devices in strictly increasing id order, the verdict matching its rule.
pub fn summarise(mut input: impl BufRead) -> Result<DevicesSummary, DevicesError> {
    let mut hash = Sha256::new();
    let mut counts = DeviceCounts::default();
    let mut batches: Vec<String> = Vec::new();
    let (mut licensed, mut attempts) = (Multiset::default(), Multiset::default());
    let (mut attempts_total, mut capped_devices) = (0u64, 0u64);
    let mut last: Option<(String, String)> = None;
    let mut buf = Vec::new();
    let mut line = 0u64;
    loop {
        buf.clear();
        let n = (&mut input)
            .take(MAX_DEVICE_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|source| DevicesError::Io { line: line + 1, source })?;
        if n == 0 {
            break;
        }
        line += 1;
        let bad = |why: String| DevicesError::Line { line, why };
        if n > MAX_DEVICE_LINE {
            return Err(bad(format!("longer than {MAX_DEVICE_LINE} bytes")));
        }
        if !buf.ends_with(b"\n") {
            return Err(bad("cut (no newline): the file is truncated".into()));
        }
        hash.update(&buf);
        let text = std::str::from_utf8(&buf).map_err(|_| bad("not UTF-8".into()))?;
        let row: DeviceRow = serde_json::from_str(text).map_err(|e| bad(format!("not a device row: {e}")))?;
        if row.to_line() != text {
            return Err(bad("not in canonical form (edited by hand?)".into()));
        }
        let verdict = Verdict::of(row.licence.is_some(), &row.attempts, !row.refusals.is_empty());
        if verdict != row.verdict {
            return Err(bad(format!(
                "device {} says {:?} but its licence and attempts make it {:?}",
                row.device_id, row.verdict, verdict
            )));
        }
        let key = (row.batch_id.clone(), row.device_id.clone());
        if let Some(prev) = &last
            && *prev >= key
        {
            return Err(bad(format!("device {} is out of order or repeated", row.device_id)));
        }
        if !batches.contains(&row.batch_id) {
            batches.push(row.batch_id.clone());
        }
        if row.attempts.len() > MAX_ATTEMPTS_PER_DEVICE || (row.attempts.len() as u64) > row.attempts_total {
            return Err(bad(format!(
                "device {} lists {} attempts of {} (at most {MAX_ATTEMPTS_PER_DEVICE})",
                row.device_id,
                row.attempts.len(),
                row.attempts_total
            )));
        }
        if row.refusals.len() > MAX_REFUSALS_PER_DEVICE {
            return Err(bad(format!("device {} lists more than {MAX_REFUSALS_PER_DEVICE} refusals", row.device_id)));
        }
        if row.licence.is_some() {
            licensed.add(&row.batch_id, &row.device_id);
        }
        for a in &row.attempts {
            attempts.add_parts(&attempt_parts(&row.device_id, a, &mut String::new()));
        }
        attempts_total += row.attempts_total;
        capped_devices += u64::from(row.attempts_total > row.attempts.len() as u64);
        counts.add(&row);
        last = Some(key);
    }
    Ok(DevicesSummary {
        sha256: hex::encode(hash.finalize()),
        counts,
        batches,
        licensed,
        attempts,
        attempts_total,
        capped_devices,
    })
}

/// The tuple an attempt adds to a [`Multiset`] — the same [`crate::audit_export::BatchTally`] adds for its
/// `install.reported` record. `code` is scratch space for the decimal status code.
fn attempt_parts<'a>(device: &'a str, a: &'a Attempt, code: &'a mut String) -> [&'a [u8]; 4] {
    *code = a.status_code.to_string();
    [device.as_bytes(), a.station.as_bytes(), a.result_id.as_bytes(), code.as_bytes()]
}

/// Column names of the CSV rendering, in order.
pub const CSV_COLUMNS: &[&str] = &[
    "batch_id",
    "device_id",
    "verdict",
    "product_id",
    "station",
    "site",
    "issued_at_ms",
    "key_id",
    "image_sha256",
    "licence_sha256",
    "reissued_to",
    "attempts_total",
    "last_station",
    "last_probe_id",
    "last_probe_kind",
    "last_status_code",
    "last_status",
    "last_message",
    "last_flash_crc",
    "last_reported_at_ms",
    "last_timings_us",
    "refusals",
    "refusal_reasons",
    "certificate",
    "attempts_json",
    "refusals_json",
];

/// Writes the CSV header line.
pub fn write_csv_header(out: &mut csv::Writer<impl Write>) -> csv::Result<()> {
    out.write_record(CSV_COLUMNS)
}

/// Writes one device as a CSV row: the licence and the latest attempt flattened, and every attempt and
/// refusal in full as JSON in the last two columns, so no field is lost.
pub fn write_csv_row(out: &mut csv::Writer<impl Write>, row: &DeviceRow) -> csv::Result<()> {
    let lic = row.licence.as_ref();
    let last = row.attempts.last();
    let s = |v: Option<String>| v.unwrap_or_default();
    let timings = last
        .map(|a| a.timings_us.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";"))
        .unwrap_or_default();
    let reasons = {
        let mut by: BTreeMap<&str, u64> = BTreeMap::new();
        for r in &row.refusals {
            *by.entry(&r.reason).or_default() += r.count;
        }
        by.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(";")
    };
    let fields: Vec<String> = vec![
        row.batch_id.clone(),
        row.device_id.clone(),
        row.verdict.as_str().into(),
        row.product_id.clone(),
        s(lic.map(|l| l.station.clone())),
        s(lic.map(|l| l.site.clone())),
        s(lic.map(|l| l.issued_at_ms.to_string())),
        s(lic.map(|l| l.key_id.clone())),
        s(lic.map(|l| l.image_sha256.clone())),
        s(lic.map(|l| l.licence_sha256.clone())),
        s(lic.map(|l| l.reissued_to.join(";"))),
        row.attempts_total.to_string(),
        s(last.map(|a| a.station.clone())),
        s(last.map(|a| a.probe_id.clone())),
        s(last.map(|a| a.probe_kind.clone())),
        s(last.map(|a| a.status_code.to_string())),
        s(last.map(|a| a.status.clone())),
        s(last.map(|a| a.message.clone())),
        s(last.and_then(|a| a.flash_crc).map(|c| format!("{c:08x}"))),
        s(last.map(|a| a.reported_at_ms.to_string())),
        timings,
        row.refusal_count().to_string(),
        reasons,
        row.certificate.clone(),
        serde_json::to_string(&row.attempts).unwrap_or_default(),
        serde_json::to_string(&row.refusals).unwrap_or_default(),
    ];
    out.write_record(&fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(code: u16) -> Attempt {
        Attempt {
            station: "spiffe://f.test/site/a/station/1".into(),
            result_id: "1".into(),
            attempt: 1,
            probe_id: "p0".into(),
            probe_kind: "sim".into(),
            status_code: code,
            status: status_words(code),
            message: "m, with \"quotes\"".into(),
            flash_crc: Some(0xdead_beef),
            reported_at_ms: 5,
            timings_us: BTreeMap::from([("install".into(), 7), ("licence".into(), 3)]),
        }
    }

    fn row(id: &str, attempts: Vec<Attempt>, licensed: bool) -> DeviceRow {
        let licence = licensed.then(|| LicenceInfo {
            station: "s".into(),
            site: "a".into(),
            issued_at_ms: 1,
            key_id: "00".into(),
            image_sha256: "11".into(),
            licence_sha256: "22".into(),
            reissued_to: vec![],
        });
        DeviceRow {
            batch_id: "B".into(),
            device_id: id.into(),
            verdict: Verdict::of(licensed, &attempts, false),
            product_id: "46201002".into(),
            certificate: "ab".into(),
            licence,
            attempts_total: attempts.len() as u64,
            attempts,
            refusals: vec![],
        }
    }

    #[test]
    fn verdict_rule() {
        assert_eq!(Verdict::of(true, &[attempt(9), attempt(0)], false), Verdict::Installed);
        assert_eq!(Verdict::of(true, &[attempt(9)], false), Verdict::Failed);
        assert_eq!(Verdict::of(true, &[], true), Verdict::Licensed);
        assert_eq!(Verdict::of(false, &[], true), Verdict::Refused);
        assert_eq!(Verdict::of(false, &[attempt(0xFFFF)], false), Verdict::Unlicensed);
        assert_eq!(Verdict::of(false, &[attempt(0)], false), Verdict::Unlicensed, "no install without a licence");
    }

    #[test]
    fn summary_counts_and_hash_the_bytes() {
        let text = [row("a1", vec![attempt(0)], true), row("a2", vec![attempt(9), attempt(0)], true)]
            .iter()
            .map(DeviceRow::to_line)
            .collect::<String>();
        let s = summarise(text.as_bytes()).unwrap();
        assert_eq!(s.sha256, hex::encode(Sha256::digest(text.as_bytes())));
        assert_eq!((s.counts.devices, s.counts.issued, s.counts.installed, s.counts.first_pass), (2, 2, 2, 1));
        assert_eq!(s.batches, vec!["B".to_owned()]);
    }

    #[test]
    fn summary_refuses_cut_reordered_edited_and_lying_lines() {
        let a = row("a1", vec![], true).to_line();
        let b = row("a2", vec![attempt(9)], true).to_line();
        let cut = format!("{a}{}", &b[..b.len() - 1]);
        assert!(summarise(cut.as_bytes()).unwrap_err().to_string().contains("truncated"));
        let swapped = format!("{b}{a}");
        assert!(summarise(swapped.as_bytes()).unwrap_err().to_string().contains("out of order"));
        let spaced = a.replacen(':', ": ", 1);
        assert!(summarise(spaced.as_bytes()).unwrap_err().to_string().contains("canonical"));
        let lying = b.replace("\"verdict\":\"failed\"", "\"verdict\":\"installed\"");
        assert!(summarise(lying.as_bytes()).unwrap_err().to_string().contains("make it Failed"));
        let long = format!("{}\n", "x".repeat(MAX_DEVICE_LINE));
        assert!(summarise(long.as_bytes()).unwrap_err().to_string().contains("longer than"));
    }

    #[test]
    fn csv_keeps_every_field() {
        let r = row("a1", vec![attempt(0)], true);
        let mut w = csv::Writer::from_writer(Vec::new());
        write_csv_header(&mut w).unwrap();
        write_csv_row(&mut w, &r).unwrap();
        let bytes = w.into_inner().unwrap();
        let mut rd = csv::Reader::from_reader(&bytes[..]);
        assert_eq!(rd.headers().unwrap().len(), CSV_COLUMNS.len());
        let rec = rd.records().next().unwrap().unwrap();
        assert_eq!(&rec[2], "installed");
        assert_eq!(&rec[17], "m, with \"quotes\"");
        assert_eq!(&rec[18], "deadbeef");
        assert_eq!(&rec[20], "install=7;licence=3");
        let attempts: Vec<Attempt> = serde_json::from_str(&rec[24]).unwrap();
        assert_eq!(attempts, r.attempts);
    }
}
