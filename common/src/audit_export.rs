//! The audit export (`flashgate-audit-export-v1`) and its offline verification: the JSON-lines file a
//! broker writes from one database snapshot (`flashgate admin audit export`), and [`verify`], which
//! checks it with nothing but the brokers' audit public keys and, optionally, checkpoints kept outside
//! the database (witnesses: station journals, sink files) — no broker, no database.
//!
//! Lines, in this order (docs/protocol.md §3.2):
//!
//! ```text
//! {"type":"header","format":"flashgate-audit-export-v1","ledger_id":HEX16,"genesis":"bound"|"legacy",
//!  "broker":NAME,"exported_at_ms":MS,"head_seq":N,"head_hash":HEX32}
//! {"type":"checkpoint","checkpoint":HEX217,"seq":N,"broker":NAME,"at":UNIX_S}       every stored one
//! {"type":"record","seq":N,"at_ms":…,"actor":…,"event":…,"subject":…,"details_json":…,
//!  "prev_hash":HEX32,"hash":HEX32}                                                     seq 1..=head_seq
//! {"type":"licence","batch_id":…,"device_id":…,"station":…,"site":…,"issued_at_ms":…}  every licence
//! {"type":"batch","id":…,"quota":…,"issued":…}                                         every batch
//! {"type":"end","records":N,"checkpoints":N,"licences":N,"batches":N,"lines_sha256":HEX32}
//! ```
//!
//! `lines_sha256` is the SHA-256 of every byte before the `end` line, so a cut file is named truncated;
//! the records' integrity rests on the chain and the signed checkpoints, not on that hash.
//!
//! [`verify`] streams: memory is the checkpoints and witnesses, and per batch a count and a
//! multiset hash of its licences — never the records. Every line is bounded ([`MAX_LINE`]) and every
//! collection capped ([`MAX_CHECKPOINTS`], [`MAX_WITNESSES`], [`MAX_BATCHES`]).

mod scan;

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::BufRead;

use p256::ecdsa::VerifyingKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{Genesis, record_hash};
use crate::checkpoint::{
    CHECKPOINT_LEN, CHECKPOINT_MARKER, CheckpointError, SignedCheckpoint, Witness, WitnessCheck, WitnessError,
};

/// The `format` of the header line.
pub const EXPORT_FORMAT: &str = "flashgate-audit-export-v1";
/// Longest line accepted (bytes, newline included).
pub const MAX_LINE: usize = 1 << 20;
/// Most checkpoint lines in one export.
pub const MAX_CHECKPOINTS: usize = 1_000_000;
/// Most witness checkpoints (all files together).
pub const MAX_WITNESSES: usize = 100_000;
/// Most batches in one export.
pub const MAX_BATCHES: usize = 100_000;
/// Longest line of a witness file (a hex checkpoint is 434 characters).
pub const MAX_WITNESS_LINE: usize = 4096;

/// One line of the export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Line {
    /// The first line.
    Header(Header),
    /// One stored checkpoint.
    Checkpoint(CheckpointLine),
    /// One audit record.
    Record(RecordLine),
    /// One licence.
    Licence(LicenceLine),
    /// One batch's counts.
    Batch(BatchLine),
    /// The last line.
    End(EndLine),
}

/// The first line: what was exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// [`EXPORT_FORMAT`].
    pub format: String,
    /// Hex of the ledger id.
    pub ledger_id: String,
    /// `bound` or `legacy` ([`Genesis`]).
    pub genesis: String,
    /// The broker that wrote the export.
    pub broker: String,
    /// When (ms since the epoch).
    pub exported_at_ms: i64,
    /// The head of the snapshot.
    pub head_seq: i64,
    /// Hex hash of the head.
    pub head_hash: String,
}

/// A stored checkpoint; `seq`, `broker` and `at` repeat signed fields for readers (checked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointLine {
    /// Hex of the 217 bytes.
    pub checkpoint: String,
    /// Its head seq.
    pub seq: u64,
    /// Its broker.
    pub broker: String,
    /// Its signing time (unix seconds).
    pub at: u64,
}

/// An audit record, hashes in hex, `details_json` exactly as hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordLine {
    /// Position in the chain from 1.
    pub seq: i64,
    /// Time of the event (ms).
    pub at_ms: i64,
    /// Who.
    pub actor: String,
    /// Event name.
    pub event: String,
    /// What about.
    pub subject: String,
    /// Details as stored.
    pub details_json: String,
    /// Hex.
    pub prev_hash: String,
    /// Hex.
    pub hash: String,
}

/// A licence (the licence bytes and certificate are not exported).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicenceLine {
    /// Batch.
    pub batch_id: String,
    /// Device.
    pub device_id: String,
    /// Station it was first issued to.
    pub station: String,
    /// Its site.
    pub site: String,
    /// When (ms).
    pub issued_at_ms: i64,
}

/// A batch's quota and issued count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchLine {
    /// Batch id.
    pub id: String,
    /// Quota.
    pub quota: i64,
    /// Licences issued.
    pub issued: i64,
}

/// The last line: counts of every kind of line, and the hash of everything before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndLine {
    /// Record lines.
    pub records: u64,
    /// Checkpoint lines.
    pub checkpoints: u64,
    /// Licence lines.
    pub licences: u64,
    /// Batch lines.
    pub batches: u64,
    /// Hex SHA-256 of every byte before this line.
    pub lines_sha256: String,
}

/// Writes export lines and keeps what the `end` line needs.
#[derive(Debug, Default)]
pub struct ExportWriter {
    hash: Sha256,
    counts: [u64; 4],
}

impl ExportWriter {
    /// A writer that has written nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The text of `line` (newline included), counted and hashed. Call for every line in order, the
    /// header first, then [`ExportWriter::end`].
    pub fn line(&mut self, line: &Line) -> String {
        match line {
            Line::Record(_) => self.counts[0] += 1,
            Line::Checkpoint(_) => self.counts[1] += 1,
            Line::Licence(_) => self.counts[2] += 1,
            Line::Batch(_) => self.counts[3] += 1,
            Line::Header(_) | Line::End(_) => {}
        }
        // Serialising these plain structs cannot fail.
        let mut text = serde_json::to_string(line).unwrap_or_default();
        text.push('\n');
        self.hash.update(text.as_bytes());
        text
    }

    /// The `end` line.
    pub fn end(self) -> String {
        let [records, checkpoints, licences, batches] = self.counts;
        let end = Line::End(EndLine {
            records,
            checkpoints,
            licences,
            batches,
            lines_sha256: hex::encode(self.hash.finalize()),
        });
        let mut text = serde_json::to_string(&end).unwrap_or_default();
        text.push('\n');
        text
    }
}

/// Why an export does not verify. Every variant names the line, seq, checkpoint or witness at fault.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Reading the export failed.
    #[error("reading the export failed at line {line}: {source}")]
    Io {
        /// 1-based line number.
        line: u64,
        /// The error.
        source: std::io::Error,
    },
    /// A line is malformed or out of place.
    #[error("export line {line}: {why}")]
    Line {
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        why: String,
    },
    /// The export ends before its `end` line, or its `end` line does not match what precedes it.
    #[error("the export is truncated or cut: {why}")]
    Truncated {
        /// What is missing or differs.
        why: String,
    },
    /// The record chain itself is broken.
    #[error("audit chain broken at seq {seq}: {why}")]
    Chain {
        /// The first bad seq.
        seq: i64,
        /// What is wrong with it.
        why: String,
    },
    /// A checkpoint in the export does not verify or belongs to another ledger.
    #[error("checkpoint on export line {line}: {why}")]
    Checkpoint {
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        why: String,
    },
    /// A witness (a signed checkpoint from the export or from outside the database) contradicts the chain.
    #[error("{error}{}", after.as_ref().map(|(s, n)| format!("; the first rewritten record lies after seq {s}, which {n} vouches for")).unwrap_or_default())]
    Witness {
        /// How it contradicts the chain.
        error: WitnessError,
        /// The last witness the chain agreed with before (seq, name).
        after: Option<(u64, String)>,
    },
    /// A witness file is unusable, or one of its checkpoints does not verify.
    #[error("witness {name}: {why}")]
    BadWitness {
        /// `FILE:LINE`.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// The chain is intact but the licences or batch counts in the export do not match it.
    #[error("the export's licences do not match its chain: {0}")]
    Unreconciled(String),
    /// Nothing in the export or the witnesses is signed by a trusted key.
    #[error("no checkpoint in the export or the witnesses verifies under the trusted keys: nothing binds the chain")]
    Unsigned,
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Hex ledger id.
    pub ledger_id: String,
    /// How the chain starts.
    pub genesis: Genesis,
    /// Records verified (seq 1..=records).
    pub records: u64,
    /// Hex hash of the last record.
    pub head_hash: String,
    /// Checkpoints in the export, all verified.
    pub checkpoints: u64,
    /// Witness checkpoints from outside the export, all verified and agreeing.
    pub witnesses: u64,
    /// Seq of the newest checkpoint (export or witness).
    pub newest_checkpoint: u64,
    /// Licences reconciled with `licence.issued` records.
    pub licences: u64,
    /// Batches whose issued counts match.
    pub batches: u64,
}

impl Report {
    /// Records after the newest checkpoint: covered by the chain only, not by any signature.
    pub fn unsigned_tail(&self) -> u64 {
        self.records.saturating_sub(self.newest_checkpoint)
    }
}

/// Reads a witness file: one hex checkpoint per line (the format of `flashgate agent journal
/// --checkpoints` and of the broker's file sinks), or lines holding [`CHECKPOINT_MARKER`] and the hex
/// after it (the broker's syslog sinks, lines picked from a log by `grep flashgate-checkpoint-v1`); empty lines and lines starting with `#` are skipped,
/// and anything after the first whitespace of a line is ignored. Returns each checkpoint named
/// `NAME:LINE`. Signatures are not checked here.
pub fn read_witnesses(name: &str, text: &str) -> Result<Vec<(String, SignedCheckpoint)>, VerifyError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let label = format!("{name}:{}", i + 1);
        let bad = |why: String| VerifyError::BadWitness { name: label.clone(), why };
        if line.len() > MAX_WITNESS_LINE {
            return Err(bad(format!("line longer than {MAX_WITNESS_LINE} bytes")));
        }
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        // A syslog line (`… flashgate-checkpoint-v1 HEX`) carries it after the marker.
        let t = t.split_once(CHECKPOINT_MARKER).map_or(t, |(_, rest)| rest);
        let token = t.split_whitespace().next().unwrap_or_default();
        let bytes = hex::decode(token).map_err(|e| bad(format!("not hex: {e}")))?;
        let cp = SignedCheckpoint::parse(&bytes).map_err(|e| bad(e.to_string()))?;
        if out.len() >= MAX_WITNESSES {
            return Err(bad(format!("more than {MAX_WITNESSES} witness checkpoints")));
        }
        out.push((label, cp));
    }
    Ok(out)
}

/// A multiset of byte tuples in constant memory: a count and the wrapping sum of each member's SHA-256
/// (as four 64-bit words). Two multisets built from the same members in any order are equal; changing,
/// adding or dropping a member changes the sum except with negligible probability. Used to reconcile
/// the licences and attempts of an export with the records of the chain without holding either.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Multiset {
    /// Members added.
    pub count: u64,
    sum: [u64; 4],
}

impl Multiset {
    /// Adds the licence of `device` in `batch`.
    pub fn add(&mut self, batch: &str, device: &str) {
        let mut h = Sha256::new();
        h.update((batch.len() as u64).to_be_bytes());
        h.update(batch.as_bytes());
        h.update(device.as_bytes());
        self.add_digest(&h.finalize());
    }

    /// Adds the tuple `parts` (each length-prefixed, so `("ab","c")` and `("a","bc")` differ).
    pub fn add_parts(&mut self, parts: &[&[u8]]) {
        let mut h = Sha256::new();
        h.update(b"parts\0");
        for p in parts {
            h.update((p.len() as u64).to_be_bytes());
            h.update(p);
        }
        self.add_digest(&h.finalize());
    }

    fn add_digest(&mut self, d: &[u8]) {
        for (i, s) in self.sum.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&d[i * 8..i * 8 + 8]);
            *s = s.wrapping_add(u64::from_be_bytes(w));
        }
        self.count += 1;
    }
}

/// Lowercase hex of a hash, as the exporter writes it (compared before decoding, which is slower).
fn hex_lower(h: &[u8; 32]) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in h.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    out
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Where the reader is in the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Header,
    Checkpoints,
    Records,
    Licences,
    Batches,
    Ended,
}

/// Verifies an export read from `input` against the audit public keys `trusted` and the witness
/// checkpoints `witnesses` (named, e.g. by [`read_witnesses`]): the record chain from the genesis of the
/// ledger id, every checkpoint's signature and ledger, every checkpoint and witness against the chain
/// (a contradicted one is named, with the last one that agreed), the licences and batch counts against
/// the `licence.issued` records, and the `end` line against everything before it.
pub fn verify(
    input: impl BufRead,
    trusted: &[VerifyingKey],
    witnesses: &[(String, SignedCheckpoint)],
) -> Result<Report, VerifyError> {
    verify_tallying(input, trusted, witnesses, None)
}

/// What the chain says of one batch up to one seq (a certificate of conformance's checkpoint), tallied
/// by [`verify_tallying`] from the records the verification walks: the `licence.issued` devices, every
/// `install.reported` attempt as (device, station, result id, status code), and the `licence.refused`
/// records that name a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchTally {
    /// The batch.
    pub batch_id: String,
    /// Records with a greater seq are not counted.
    pub upto_seq: u64,
    /// Devices licensed (as [`Multiset::add`] of batch and device).
    pub issued: Multiset,
    /// Attempts reported ([`Multiset::add_parts`] of device, station, result id, decimal status code).
    pub attempts: Multiset,
    /// Refusals that name a device.
    pub refusals: u64,
}

impl BatchTally {
    /// An empty tally of `batch_id` up to `upto_seq`.
    pub fn new(batch_id: impl Into<String>, upto_seq: u64) -> Self {
        Self {
            batch_id: batch_id.into(),
            upto_seq,
            issued: Multiset::default(),
            attempts: Multiset::default(),
            refusals: 0,
        }
    }

    fn record(&mut self, r: &RecordRef<'_>) -> Result<(), String> {
        if u64::try_from(r.seq).unwrap_or(u64::MAX) > self.upto_seq {
            return Ok(());
        }
        let Some((batch, device)) = r.subject.strip_prefix("batch/").and_then(|s| s.rsplit_once("/device/")) else {
            return Ok(());
        };
        if batch != self.batch_id {
            return Ok(());
        }
        let is = crate::audit::issuance(&r.event, &r.details_json).map_err(|e| format!("seq {}: {e}", r.seq))?;
        if is.is_some_and(|i| i.licence) {
            self.issued.add(batch, device);
            return Ok(());
        }
        match &*r.event {
            "licence.refused" if !device.is_empty() => self.refusals += 1,
            "install.reported" => {
                #[derive(Deserialize)]
                struct Reported {
                    station: String,
                    result_id: String,
                    status_code: u64,
                }
                let d: Reported = serde_json::from_str(&r.details_json)
                    .map_err(|e| format!("install.reported record seq {}: details unreadable: {e}", r.seq))?;
                let code = d.status_code.to_string();
                self.attempts.add_parts(&[
                    device.as_bytes(),
                    d.station.as_bytes(),
                    d.result_id.as_bytes(),
                    code.as_bytes(),
                ]);
            }
            _ => {}
        }
        Ok(())
    }
}

/// A record line as the verifier reads it: fields borrowed from the input where they hold no escapes.
/// Record lines are nearly all of an export, so they skip the buffering an internally tagged [`Line`]
/// needs; any other line (or a record line whose `type` is not first) goes through [`Line`].
#[derive(Deserialize)]
struct RecordRef<'a> {
    #[serde(rename = "type", borrow)]
    _kind: Cow<'a, str>,
    seq: i64,
    at_ms: i64,
    #[serde(borrow)]
    actor: Cow<'a, str>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    subject: Cow<'a, str>,
    #[serde(borrow)]
    details_json: Cow<'a, str>,
    #[serde(borrow)]
    prev_hash: Cow<'a, str>,
    #[serde(borrow)]
    hash: Cow<'a, str>,
}

/// How every record line the exporter writes starts.
const RECORD_PREFIX: &str = "{\"type\":\"record\",";

/// One parsed line.
enum Parsed<'a> {
    Record(RecordRef<'a>),
    Licence(LicenceRef<'a>),
    Other(Line),
}

/// A licence line as the verifier reads it (fields borrowed where they hold no escapes; the station,
/// site and time are not checked by anything, so they are not read).
#[derive(Deserialize)]
struct LicenceRef<'a> {
    #[serde(rename = "type", borrow)]
    _kind: Cow<'a, str>,
    #[serde(borrow)]
    batch_id: Cow<'a, str>,
    #[serde(borrow)]
    device_id: Cow<'a, str>,
}

/// How every licence line the exporter writes starts.
const LICENCE_PREFIX: &str = "{\"type\":\"licence\",";

fn parse_line(text: &str) -> Result<Parsed<'_>, serde_json::Error> {
    if text.starts_with(RECORD_PREFIX) {
        if let Some(r) = scan::scan(text) {
            return Ok(Parsed::Record(r));
        }
        return serde_json::from_str(text).map(Parsed::Record);
    }
    if text.starts_with(LICENCE_PREFIX) {
        return serde_json::from_str(text).map(Parsed::Licence);
    }
    Ok(match serde_json::from_str::<Line>(text)? {
        Line::Record(r) => Parsed::Record(RecordRef {
            _kind: Cow::Borrowed("record"),
            seq: r.seq,
            at_ms: r.at_ms,
            actor: Cow::Owned(r.actor),
            event: Cow::Owned(r.event),
            subject: Cow::Owned(r.subject),
            details_json: Cow::Owned(r.details_json),
            prev_hash: Cow::Owned(r.prev_hash),
            hash: Cow::Owned(r.hash),
        }),
        Line::Licence(l) => Parsed::Licence(LicenceRef {
            _kind: Cow::Borrowed("licence"),
            batch_id: Cow::Owned(l.batch_id),
            device_id: Cow::Owned(l.device_id),
        }),
        other => Parsed::Other(other),
    })
}

/// SHA-256 of the lines computed on a second thread (blocks of [`HASH_BLOCK`] bytes handed over a bounded
/// channel), so hashing every byte runs beside parsing them; inline when no thread can be started.
struct LinesHash {
    block: Vec<u8>,
    worker: Option<(std::sync::mpsc::SyncSender<Vec<u8>>, std::thread::JoinHandle<Sha256>)>,
    inline: Sha256,
}

/// Bytes handed to the hashing thread at a time.
const HASH_BLOCK: usize = 1 << 18;

impl LinesHash {
    fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let worker = std::thread::Builder::new()
            .name("audit-lines-sha256".into())
            .spawn(move || {
                let mut h = Sha256::new();
                for block in rx {
                    h.update(&block);
                }
                h
            })
            .ok()
            .map(|j| (tx, j));
        Self { block: Vec::with_capacity(HASH_BLOCK), worker, inline: Sha256::new() }
    }

    fn update(&mut self, bytes: &[u8]) {
        let Some((tx, _)) = &self.worker else {
            self.inline.update(bytes);
            return;
        };
        self.block.extend_from_slice(bytes);
        if self.block.len() >= HASH_BLOCK {
            let full = std::mem::replace(&mut self.block, Vec::with_capacity(HASH_BLOCK));
            if let Err(std::sync::mpsc::SendError(full)) = tx.send(full) {
                // The thread is gone (it cannot panic on its own): hash here from now on, after what it had.
                self.inline.update(&full);
            }
        }
    }

    fn finish(self) -> [u8; 32] {
        let Some((tx, worker)) = self.worker else { return self.inline.finalize().into() };
        let _ = tx.send(self.block);
        drop(tx);
        match worker.join() {
            Ok(h) => h.finalize().into(),
            // Unreachable in practice (the loop above does not panic); an all-zero digest fails the check.
            Err(_) => [0; 32],
        }
    }
}

/// What the chain holds of one batch's issuance: the licences its records stand for and the units they
/// count ([`crate::audit::issuance`]).
#[derive(Debug, Default, Clone, Copy)]
struct Issued {
    licences: Multiset,
    units: u64,
}

/// [`verify`], and, with `tally`, counts what the chain records of one batch up to a seq as it walks.
pub fn verify_tallying(
    mut input: impl BufRead,
    trusted: &[VerifyingKey],
    witnesses: &[(String, SignedCheckpoint)],
    mut tally: Option<&mut BatchTally>,
) -> Result<Report, VerifyError> {
    let mut lineno = 0u64;
    let mut stage = Stage::Header;
    let mut hash = Some(LinesHash::new());
    let mut header: Option<(Header, [u8; 16], Genesis)> = None;
    let mut signed: Vec<Witness> = Vec::new();
    let mut newest = 0u64;
    let mut check: Option<WitnessCheck> = None;
    let mut prev: [u8; 32] = [0; 32];
    let mut last_seq = 0i64;
    let mut issued: HashMap<String, Issued> = HashMap::new();
    let mut licensed: HashMap<String, Multiset> = HashMap::new();
    let mut batches_seen = 0u64;
    let mut counts = [0u64; 4];
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = std::io::Read::take(std::io::Read::by_ref(&mut input), MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|source| VerifyError::Io { line: lineno + 1, source })?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let bad = |why: String| VerifyError::Line { line: lineno, why };
        if n > MAX_LINE {
            return Err(bad(format!("longer than {MAX_LINE} bytes")));
        }
        if !buf.ends_with(b"\n") {
            return Err(VerifyError::Truncated { why: format!("line {lineno} is cut (no newline)") });
        }
        if stage == Stage::Ended {
            return Err(bad("data after the end line".into()));
        }
        let text = std::str::from_utf8(&buf).map_err(|_| bad("not UTF-8".into()))?;
        let line = parse_line(text).map_err(|e| bad(format!("not an export line: {e}")))?;
        let next = match &line {
            Parsed::Other(Line::Header(_)) => Stage::Header,
            Parsed::Other(Line::Checkpoint(_)) => Stage::Checkpoints,
            Parsed::Record(_) | Parsed::Other(Line::Record(_)) => Stage::Records,
            Parsed::Licence(_) | Parsed::Other(Line::Licence(_)) => Stage::Licences,
            Parsed::Other(Line::Batch(_)) => Stage::Batches,
            Parsed::Other(Line::End(_)) => Stage::Ended,
        };
        if (header.is_none() && next != Stage::Header) || (header.is_some() && next <= Stage::Header) {
            return Err(bad("the header must be the first line, and only it".into()));
        }
        if next < stage {
            return Err(bad(format!("a {next:?} line after {stage:?} lines (out of order)")));
        }
        // Leaving the checkpoints: the witness set is complete.
        if next > Stage::Checkpoints && check.is_none() {
            let Some((_, id, genesis)) = &header else { return Err(bad("no header".into())) };
            let mut all = std::mem::take(&mut signed);
            for (name, cp) in witnesses {
                cp.verify(trusted).map_err(|e| VerifyError::BadWitness { name: name.clone(), why: e.to_string() })?;
                if &cp.head.ledger_id != id {
                    return Err(VerifyError::BadWitness {
                        name: name.clone(),
                        why: format!(
                            "signed for ledger {}, the export is of ledger {}",
                            hex::encode(cp.head.ledger_id),
                            hex::encode(id)
                        ),
                    });
                }
                newest = newest.max(cp.head.seq);
                all.push(Witness::from_checkpoint(format!("witness {name}"), cp));
            }
            if all.is_empty() {
                return Err(VerifyError::Unsigned);
            }
            check = Some(WitnessCheck::with_genesis(all, genesis.first_prev_hash(id)));
            prev = genesis.first_prev_hash(id);
        }
        stage = next;
        match line {
            Parsed::Other(Line::Header(h)) => {
                if h.format != EXPORT_FORMAT {
                    return Err(bad(format!("format {:?}, expected {EXPORT_FORMAT:?}", h.format)));
                }
                let mut id = [0u8; 16];
                hex::decode_to_slice(&h.ledger_id, &mut id)
                    .map_err(|_| bad(format!("ledger_id {:?} is not 32 hex digits", h.ledger_id)))?;
                let genesis = Genesis::from_name(&h.genesis)
                    .ok_or_else(|| bad(format!("genesis {:?} is not bound or legacy", h.genesis)))?;
                header = Some((h, id, genesis));
            }
            Parsed::Other(Line::Checkpoint(c)) => {
                counts[1] += 1;
                if counts[1] as usize > MAX_CHECKPOINTS {
                    return Err(bad(format!("more than {MAX_CHECKPOINTS} checkpoints")));
                }
                let cbad = |why: String| VerifyError::Checkpoint { line: lineno, why };
                let bytes = hex::decode(&c.checkpoint).map_err(|e| cbad(format!("not hex: {e}")))?;
                if bytes.len() != CHECKPOINT_LEN {
                    return Err(cbad(CheckpointError::Length(bytes.len()).to_string()));
                }
                let cp = SignedCheckpoint::parse(&bytes).map_err(|e| cbad(e.to_string()))?;
                cp.verify(trusted).map_err(|e| cbad(e.to_string()))?;
                let Some((_, id, _)) = &header else { return Err(bad("no header".into())) };
                if &cp.head.ledger_id != id {
                    return Err(cbad(format!(
                        "signed for ledger {}, the export is of ledger {}",
                        hex::encode(cp.head.ledger_id),
                        hex::encode(id)
                    )));
                }
                if (c.seq, c.at, c.broker.as_str()) != (cp.head.seq, cp.head.at, cp.head.broker.as_str()) {
                    return Err(cbad("its seq, at or broker field differs from the signed bytes".into()));
                }
                newest = newest.max(cp.head.seq);
                signed.push(Witness::from_checkpoint(
                    format!(
                        "checkpoint seq {} signed by {} at {} (export line {lineno})",
                        cp.head.seq, cp.head.broker, cp.head.at
                    ),
                    &cp,
                ));
            }
            // parse_line turns every record line into Parsed::Record.
            Parsed::Other(Line::Record(_)) => {}
            Parsed::Record(r) => {
                counts[0] += 1;
                let chain = |why: String| VerifyError::Chain { seq: r.seq, why };
                if r.seq != last_seq + 1 {
                    return Err(VerifyError::Chain {
                        seq: last_seq + 1,
                        why: format!("expected seq {}, found seq {} (records missing: deleted)", last_seq + 1, r.seq),
                    });
                }
                let stored_prev = if r.prev_hash.as_bytes() == hex_lower(&prev) {
                    prev
                } else {
                    hex32(&r.prev_hash).ok_or_else(|| chain("prev_hash is not 32 hex bytes".into()))?
                };
                if stored_prev != prev {
                    return Err(chain(if r.seq == 1 {
                        "the first record does not start from the genesis hash of the ledger id".into()
                    } else {
                        "prev_hash is not the hash of the preceding record (records reordered or replaced)".into()
                    }));
                }
                let h = record_hash(&prev, r.seq, r.at_ms, &r.actor, &r.event, &r.subject, &r.details_json);
                if r.hash.as_bytes() != hex_lower(&h) && hex32(&r.hash) != Some(h) {
                    return Err(chain("stored hash differs from the recomputed hash (record edited)".into()));
                }
                if let Some(c) = check.as_mut()
                    && let Err(error) = c.record(r.seq as u64, &h)
                {
                    let after = c.last_agreed().map(|(s, n)| (s, n.to_owned()));
                    return Err(VerifyError::Witness { error, after });
                }
                if let Some(t) = tally.as_deref_mut() {
                    t.record(&r).map_err(|why| VerifyError::Chain { seq: r.seq, why })?;
                }
                // Licences and units by crate::audit::issuance: licence.issued and licence.replicated are
                // both; licence.unleased a licence, licence.conflict none, each a unit when counted.
                if let Some(is) = crate::audit::issuance(&r.event, &r.details_json).map_err(chain)?
                    && let Some((batch, device)) =
                        r.subject.strip_prefix("batch/").and_then(|s| s.rsplit_once("/device/"))
                {
                    if issued.len() >= MAX_BATCHES && !issued.contains_key(batch) {
                        return Err(bad(format!("more than {MAX_BATCHES} batches")));
                    }
                    let t = match issued.get_mut(batch) {
                        Some(t) => t,
                        None => issued.entry(batch.to_owned()).or_default(),
                    };
                    if is.licence {
                        t.licences.add(batch, device);
                    }
                    if is.unit {
                        t.units += 1;
                    }
                }
                prev = h;
                last_seq = r.seq;
            }
            // parse_line turns every licence line into Parsed::Licence.
            Parsed::Other(Line::Licence(_)) => {}
            Parsed::Licence(l) => {
                counts[2] += 1;
                let full = licensed.len() >= MAX_BATCHES;
                match licensed.get_mut(&*l.batch_id) {
                    Some(m) => m.add(&l.batch_id, &l.device_id),
                    None if full => {
                        return Err(bad(format!("more than {MAX_BATCHES} batches")));
                    }
                    None => licensed.entry(l.batch_id.to_string()).or_default().add(&l.batch_id, &l.device_id),
                }
            }
            Parsed::Other(Line::Batch(b)) => {
                counts[3] += 1;
                batches_seen += 1;
                let tally = issued.get(&b.id).copied().unwrap_or_default();
                let records = tally.licences;
                let lic = licensed.remove(&b.id).unwrap_or_default();
                if u64::try_from(b.issued).ok() != Some(tally.units) {
                    return Err(VerifyError::Unreconciled(format!(
                        "batch {:?} counts {} issued licences but the chain holds {} licence.issued records{}",
                        b.id,
                        b.issued,
                        tally.units,
                        if tally.units == records.count {
                            ""
                        } else {
                            " (with replicated, conflict and unleased units)"
                        }
                    )));
                }
                if lic != records {
                    return Err(VerifyError::Unreconciled(format!(
                        "batch {:?}: {} licences in the export, {} licence.issued records in the chain{}",
                        b.id,
                        lic.count,
                        records.count,
                        if lic.count == records.count { ", for other devices" } else { "" }
                    )));
                }
                issued.remove(&b.id);
            }
            Parsed::Other(Line::End(e)) => {
                let got = hex::encode(hash.take().map(LinesHash::finish).unwrap_or_default());
                if e.lines_sha256 != got {
                    return Err(VerifyError::Truncated {
                        why: format!(
                            "the end line's lines_sha256 {} differs from the lines before it ({got})",
                            e.lines_sha256
                        ),
                    });
                }
                let want = [e.records, e.checkpoints, e.licences, e.batches];
                if want != counts {
                    return Err(VerifyError::Truncated {
                        why: format!(
                            "the end line counts (records, checkpoints, licences, batches) {want:?}, the export holds {counts:?}"
                        ),
                    });
                }
                continue;
            }
        }
        if let Some(h) = hash.as_mut() {
            h.update(&buf);
        }
    }
    if stage != Stage::Ended {
        return Err(VerifyError::Truncated {
            why: format!("no end line after {lineno} lines (last record seq {last_seq})"),
        });
    }
    let Some((h, _, genesis)) = header else {
        return Err(VerifyError::Truncated { why: "empty export".into() });
    };
    if let Some((batch, n)) = issued
        .iter()
        .map(|(b, t)| (b, t.units.max(t.licences.count)))
        .chain(licensed.iter().map(|(b, m)| (b, m.count)))
        .next()
    {
        return Err(VerifyError::Unreconciled(format!(
            "batch {batch:?} has {n} licence.issued records or licences but no batch line"
        )));
    }
    if h.head_seq != last_seq || hex32(&h.head_hash) != Some(prev) {
        return Err(VerifyError::Chain {
            seq: last_seq.min(h.head_seq) + 1,
            why: format!(
                "the header names head seq {} hash {} but the records end at seq {last_seq} hash {}",
                h.head_seq,
                h.head_hash,
                hex::encode(prev)
            ),
        });
    }
    let check = check.ok_or(VerifyError::Unsigned)?;
    check.finish(last_seq as u64).map_err(|error| VerifyError::Witness { error, after: None })?;
    Ok(Report {
        ledger_id: h.ledger_id,
        genesis,
        records: last_seq as u64,
        head_hash: hex::encode(prev),
        checkpoints: counts[1],
        witnesses: witnesses.len() as u64,
        newest_checkpoint: newest,
        licences: counts[2],
        batches: batches_seen,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use p256::ecdsa::SigningKey;

    use super::*;
    use crate::audit::genesis_hash;
    use crate::checkpoint::CheckpointHead;

    const ID: [u8; 16] = [0x11; 16];

    fn key() -> SigningKey {
        SigningKey::from_slice(&[5; 32]).unwrap()
    }

    /// Records: `n` fillers, then licence.issued for devices d0..d{lic}; checkpoints at `cps`.
    struct Build {
        records: Vec<RecordLine>,
        cps: Vec<u64>,
        licences: Vec<(String, String)>,
        batches: Vec<(String, i64)>,
    }

    fn records(n: usize, lic: usize, pad: usize) -> Vec<RecordLine> {
        let mut prev = genesis_hash(&ID);
        (1..=(n + lic) as i64)
            .map(|seq| {
                let (event, subject) = if seq as usize > n {
                    ("licence.issued".to_owned(), format!("batch/b1/device/d{}", seq as usize - n - 1))
                } else {
                    ("test.filler".to_owned(), format!("filler/{seq}"))
                };
                let details = if seq == 1 { format!("{{\"pad\":\"{}\"}}", "x".repeat(pad)) } else { "{}".to_owned() };
                let h = record_hash(&prev, seq, 1000 + seq, "admin", &event, &subject, &details);
                let r = RecordLine {
                    seq,
                    at_ms: 1000 + seq,
                    actor: "admin".into(),
                    event,
                    subject,
                    details_json: details,
                    prev_hash: hex::encode(prev),
                    hash: hex::encode(h),
                };
                prev = h;
                r
            })
            .collect()
    }

    fn build(n: usize, lic: usize, cps: &[u64]) -> Build {
        Build {
            records: records(n, lic, 0),
            cps: cps.to_vec(),
            licences: (0..lic).map(|i| ("b1".to_owned(), format!("d{i}"))).collect(),
            batches: vec![("b1".to_owned(), lic as i64)],
        }
    }

    fn hash_at(records: &[RecordLine], seq: u64) -> [u8; 32] {
        if seq == 0 { genesis_hash(&ID) } else { hex32(&records[seq as usize - 1].hash).unwrap() }
    }

    fn text(b: &Build) -> String {
        let mut w = ExportWriter::new();
        let (head_seq, head_hash) =
            b.records.last().map_or((0, hex::encode(genesis_hash(&ID))), |r| (r.seq, r.hash.clone()));
        let mut out = w.line(&Line::Header(Header {
            format: EXPORT_FORMAT.into(),
            ledger_id: hex::encode(ID),
            genesis: "bound".into(),
            broker: "broker-1".into(),
            exported_at_ms: 1,
            head_seq,
            head_hash,
        }));
        for &seq in &b.cps {
            let head =
                CheckpointHead { ledger_id: ID, seq, hash: hash_at(&b.records, seq), at: 7, broker: "broker-1".into() };
            let cp = head.sign(&key()).unwrap();
            out += &w.line(&Line::Checkpoint(CheckpointLine {
                checkpoint: hex::encode(cp.to_bytes().unwrap()),
                seq,
                broker: "broker-1".into(),
                at: 7,
            }));
        }
        for r in &b.records {
            out += &w.line(&Line::Record(r.clone()));
        }
        for (batch, device) in &b.licences {
            out += &w.line(&Line::Licence(LicenceLine {
                batch_id: batch.clone(),
                device_id: device.clone(),
                station: "s".into(),
                site: "berlin".into(),
                issued_at_ms: 1,
            }));
        }
        for (id, issued) in &b.batches {
            out += &w.line(&Line::Batch(BatchLine { id: id.clone(), quota: 100, issued: *issued }));
        }
        out + &w.end()
    }

    fn run(t: &str) -> Result<Report, VerifyError> {
        verify(t.as_bytes(), &[*key().verifying_key()], &[])
    }

    #[test]
    fn a_whole_export_verifies() {
        let r = run(&text(&build(40, 3, &[0, 20, 43]))).unwrap();
        assert_eq!((r.records, r.checkpoints, r.licences, r.batches, r.newest_checkpoint), (43, 3, 3, 1, 43));
        assert_eq!(r.unsigned_tail(), 0);
        let r = run(&text(&build(40, 3, &[20]))).unwrap();
        assert_eq!(r.unsigned_tail(), 23, "records after the newest checkpoint are covered by the chain only");
        // An empty ledger with its genesis checkpoint.
        assert_eq!(run(&text(&build(0, 0, &[0]))).unwrap().records, 0);
    }

    #[test]
    fn nothing_signed_is_refused() {
        assert!(matches!(run(&text(&build(5, 0, &[]))), Err(VerifyError::Unsigned)));
    }

    #[test]
    fn an_edited_or_missing_record_is_named() {
        let mut b = build(30, 0, &[30]);
        b.records[9].actor = "mallory".into();
        let e = run(&text(&b)).unwrap_err();
        assert!(matches!(e, VerifyError::Chain { seq: 10, .. }), "{e}");
        assert!(e.to_string().contains("record edited"), "{e}");
        let mut b = build(30, 0, &[20]);
        b.records.remove(4);
        let e = run(&text(&b)).unwrap_err();
        assert!(matches!(e, VerifyError::Chain { seq: 5, .. }), "{e}");
        // A chain from another ledger's genesis, re-chained whole, is refused at seq 1.
        let mut b = build(3, 0, &[]);
        let mut prev = genesis_hash(&[0x22; 16]);
        for r in &mut b.records {
            r.prev_hash = hex::encode(prev);
            prev = record_hash(&prev, r.seq, r.at_ms, &r.actor, &r.event, &r.subject, &r.details_json);
            r.hash = hex::encode(prev);
        }
        b.cps = vec![3];
        let e = run(&text(&b)).unwrap_err();
        assert!(matches!(e, VerifyError::Chain { seq: 1, .. }), "{e}");
        assert!(e.to_string().contains("genesis hash of the ledger id"), "{e}");
    }

    #[test]
    fn licences_and_batch_counts_are_reconciled() {
        let mut b = build(5, 3, &[8]);
        b.licences.push(("b1".into(), "extra".into()));
        let e = run(&text(&b)).unwrap_err();
        assert!(e.to_string().contains("4 licences in the export, 3 licence.issued records"), "{e}");
        let mut b = build(5, 3, &[8]);
        b.licences[0].1 = "other".into();
        let e = run(&text(&b)).unwrap_err();
        assert!(e.to_string().contains("for other devices"), "{e}");
        let mut b = build(5, 3, &[8]);
        b.batches[0].1 = 2;
        let e = run(&text(&b)).unwrap_err();
        assert!(e.to_string().contains("counts 2 issued licences but the chain holds 3"), "{e}");
        let mut b = build(5, 3, &[8]);
        b.batches.clear();
        let e = run(&text(&b)).unwrap_err();
        assert!(e.to_string().contains("no batch line"), "{e}");
    }

    #[test]
    fn truncation_reordering_and_a_forged_end_are_named() {
        let t = text(&build(10, 1, &[11]));
        let lines: Vec<&str> = t.lines().collect();
        let without_end = lines[..lines.len() - 1].join("\n") + "\n";
        assert!(matches!(run(&without_end), Err(VerifyError::Truncated { .. })));
        assert!(matches!(run(&t[..t.len() - 1]), Err(VerifyError::Truncated { .. })));
        // Lines dropped from the middle with the end line kept: its counts and hash differ.
        let mut dropped = lines.clone();
        dropped.remove(lines.len() - 3); // the licence line
        let e = run(&(dropped.join("\n") + "\n")).unwrap_err();
        assert!(matches!(e, VerifyError::Truncated { .. } | VerifyError::Unreconciled(_)), "{e}");
        let mut swapped = lines.clone();
        swapped.swap(lines.len() - 4, lines.len() - 3); // the licence before the last record
        let e = run(&(swapped.join("\n") + "\n")).unwrap_err();
        assert!(e.to_string().contains("out of order"), "{e}");
        let mut twice = lines.clone();
        twice.push(lines[lines.len() - 1]);
        let e = run(&(twice.join("\n") + "\n")).unwrap_err();
        assert!(e.to_string().contains("after the end line"), "{e}");
    }

    #[test]
    fn witnesses_name_the_rewrite() {
        let b = build(50, 0, &[50]);
        let original = b.records.clone();
        let sign = |seq: u64| {
            CheckpointHead { ledger_id: ID, seq, hash: hash_at(&original, seq), at: 9, broker: "broker-1".into() }
                .sign(&key())
                .unwrap()
        };
        // The last 3 records deleted, the head moved back and the stored checkpoints re-signed at the new
        // head (the broker signs whatever head it finds): the station's witness at seq 49 names it.
        let mut short = build(47, 0, &[47]);
        short.records.truncate(47);
        let w = vec![("station-1:2".to_owned(), sign(49))];
        let e = verify(text(&short).as_bytes(), &[*key().verifying_key()], &w).unwrap_err();
        assert!(e.to_string().contains("station-1:2") && e.to_string().contains("first missing seq 48"), "{e}");
        // A witness of another ledger or with a bad signature is refused, named.
        let mut other = sign(10);
        other.head.ledger_id = [0x33; 16];
        let other = other.head.sign(&key()).unwrap();
        let e = verify(text(&b).as_bytes(), &[*key().verifying_key()], &[("x:1".into(), other)]).unwrap_err();
        assert!(matches!(e, VerifyError::BadWitness { .. }) && e.to_string().contains("x:1"), "{e}");
        let mut forged = sign(10);
        forged.signature[5] ^= 1;
        let e = verify(text(&b).as_bytes(), &[*key().verifying_key()], &[("y:1".into(), forged)]).unwrap_err();
        assert!(matches!(e, VerifyError::BadWitness { .. }), "{e}");
    }

    #[test]
    fn lines_are_bounded_at_max_line() {
        let mut b = build(2, 0, &[2]);
        // Pad record 1's details so that its line is exactly MAX_LINE bytes, then one more.
        let base = {
            let mut w = ExportWriter::new();
            w.line(&Line::Record(records(2, 0, 0)[0].clone())).len()
        };
        let pad = MAX_LINE - base;
        b.records = records(2, 0, pad);
        let t = text(&b);
        assert!(t.lines().any(|l| l.len() + 1 == MAX_LINE));
        run(&t).expect("a line of exactly MAX_LINE bytes is accepted");
        b.records = records(2, 0, pad + 1);
        let e = run(&text(&b)).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
    }

    #[test]
    fn witness_files_skip_comments_and_name_bad_lines() {
        let cp =
            CheckpointHead { ledger_id: ID, seq: 1, hash: [1; 32], at: 1, broker: "b".into() }.sign(&key()).unwrap();
        let hexcp = hex::encode(cp.to_bytes().unwrap());
        let got = read_witnesses("f", &format!("# comment\n\n{hexcp} trailing words\n")).unwrap();
        assert_eq!(got, vec![("f:3".to_owned(), cp.clone())]);
        let syslog = format!("Dec  3 18:55:00 host flashgate-broker[7]: {CHECKPOINT_MARKER}{hexcp}\n");
        assert_eq!(read_witnesses("s", &syslog).unwrap(), vec![("s:1".to_owned(), cp)], "a syslog line");
        let e = read_witnesses("f", &format!("{hexcp}\nabcd\n")).unwrap_err();
        assert!(e.to_string().contains("f:2"), "{e}");
        let e = read_witnesses("f", &"a".repeat(MAX_WITNESS_LINE + 1)).unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
    }
}
