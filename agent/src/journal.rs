//! The station's local, append-only result journal: "no result lost".
//!
//! Owns the journal directory (`journal.id`, `journal.jsonl`), the durable append of every device
//! result before anyone may report it, the record of which results the broker has acknowledged
//! (or rejected for good), and crash recovery.
//!
//! Layout of `DIR`:
//! - `journal.id`: a random id (16 hex digits) created once, so result ids `"{journal_id}-{seq}"`
//!   are unique per station even if the journal is ever recreated;
//! - `journal.jsonl`: one JSON object per line, `{"kind":"result","seq":…,"result_id":…,"result":{…}}`,
//!   `{"kind":"reported","seq":…}`, `{"kind":"rejected","seq":…,"reason":…}`, or
//!   `{"kind":"begin","probe_id":…,"batch_id":…,"device_id":…}`: an install about to start on a
//!   probe (synced before the first SFI command), so that a board the agent was killed on after
//!   INSTALL took effect — readout protected, its certificate unreadable — is recognised on restart
//!   ([`Journal::interrupted`]) and its result recovered instead of lost.
//!
//! Durability: [`Journal::append`] writes the result line and `fsync`s it (and the directory when
//! the file was just created) before returning, so a caller reports to the broker only results
//! that survive a crash. Acknowledgements ([`Journal::mark_reported`], [`Journal::mark_rejected`])
//! are not synced: losing one only makes the reporter send that result again, which the broker
//! ignores by `result_id`.
//!
//! - `checkpoints.hex`: the newest signed audit checkpoint received per ledger ([`crate::witness`]),
//!   the station's witness of the broker's history (`flashgate agent journal --checkpoints`).
//!
//! Recovery on [`Journal::open`]: a torn last line (a crash in the middle of a write) is logged,
//! ignored and truncated away; any other malformed line is an error naming the file and line.
//! The journal file is locked (`flock`-style, exclusive) while open, so two daemons cannot share
//! one journal; [`Journal::read_entries`] reads it without the lock (for `flashgate agent journal`).

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use flashgate_proto::v1::{ProbeInfo, ReportInstallRequest, StageTiming};
use serde::{Deserialize, Serialize};

/// File name of the journal id inside the journal directory.
pub const ID_FILE: &str = "journal.id";
/// File name of the journal log inside the journal directory.
pub const LOG_FILE: &str = "journal.jsonl";

/// Status code of a host-side failure (link lost, probe gone) in [`DeviceResult::status_code`].
pub const HOST_FAILURE: u16 = 0xFFFF;

/// The outcome of one install attempt on one device, as journaled and reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceResult {
    /// Batch the device was installed for.
    pub batch_id: String,
    /// Device id (`hex(SHA-256(chip_pub))[0..32]`).
    pub device_id: String,
    /// 0 = installed, an SFI status code (profile §5), or [`HOST_FAILURE`].
    pub status_code: u16,
    /// The status in words.
    pub message: String,
    /// CRC-32 of the flash answered by INSTALL, when the install got that far.
    pub flash_crc: Option<u32>,
    /// Attempt number for this device on this station, from 1.
    pub attempt: u32,
    /// Stable probe id (USB serial number or port path).
    pub probe_id: String,
    /// Probe kind: `usb-serial`, `serial`, `tcp`, `sim`.
    pub probe_kind: String,
    /// Port the probe was reached on.
    pub probe_port: String,
    /// Stage timings: (stage, microseconds).
    pub timings: Vec<(String, u64)>,
    /// When the attempt finished, milliseconds since the Unix epoch.
    pub finished_at_ms: i64,
}

/// One journaled result with its sequence number and station-unique result id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Sequence number in this journal, from 1, consecutive.
    pub seq: u64,
    /// `"{journal_id}-{seq}"`: the broker's idempotency key for this result.
    pub result_id: String,
    /// The result.
    pub result: DeviceResult,
}

/// Where a journaled result stands with the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum EntryState {
    /// Not yet acknowledged by a broker.
    Unreported,
    /// Acknowledged by a broker (recorded now or earlier).
    Reported,
    /// Refused for good by a broker; kept in the journal, no longer sent.
    Rejected {
        /// Why the broker refused it.
        reason: String,
    },
}

impl EntryState {
    /// True when the result still waits to be reported.
    pub fn is_pending(&self) -> bool {
        matches!(self, EntryState::Unreported)
    }
}

impl std::fmt::Display for EntryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EntryState::Unreported => f.write_str("unreported"),
            EntryState::Reported => f.write_str("reported"),
            EntryState::Rejected { reason } => write!(f, "rejected: {reason}"),
        }
    }
}

/// A journal failure. Messages name the file (and line) involved.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file system operation failed.
    #[error("journal: {op} {path}: {source}")]
    Io {
        /// What was being done (`creating`, `writing`, `syncing`, …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A line of the journal (other than a torn last one) is not a valid record.
    #[error("journal {path} line {line}: {reason}")]
    Malformed {
        /// The journal file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The journal id file does not hold an id.
    #[error("journal id {path}: {reason}")]
    BadId {
        /// The id file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Another process holds the journal open.
    #[error("journal {path} is locked by another process (is another agent running on this directory?)")]
    Locked {
        /// The journal file.
        path: PathBuf,
    },
    /// An acknowledgement names a sequence number that was never appended.
    #[error("journal {path}: no result with seq {seq} (next seq is {next})")]
    UnknownSeq {
        /// The journal file.
        path: PathBuf,
        /// The sequence number asked for.
        seq: u64,
        /// The next sequence number to be assigned.
        next: u64,
    },
    /// A previous write failed and could not be undone; the journal refuses further writes.
    #[error("journal {path} is unusable after a failed write that could not be rolled back; restart the agent")]
    Poisoned {
        /// The journal file.
        path: PathBuf,
    },
    /// The result could not be made durable: the journal file cannot be written (a full disk, a
    /// read-only mount, an I/O error). The result is held in memory, pending, with its own result id
    /// (never one a later append could reuse); it is written to the journal as soon as a write
    /// succeeds again, and may be delivered to a broker directly meanwhile.
    #[error("journal not writable: {}: {reason}", path.display())]
    NotDurable {
        /// The journal file.
        path: PathBuf,
        /// What the OS said.
        reason: String,
        /// The result as it is held, with its seq and result id.
        entry: Box<JournalEntry>,
    },
    /// A blocking journal task panicked or was cancelled.
    #[error("journal task failed: {0}")]
    Task(String),
    /// The station's audit checkpoints beside the journal are unreadable (see [`crate::witness`]).
    #[error("journal: {0}")]
    Witness(#[from] crate::witness::WitnessError),
}

/// One line of `journal.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum Line {
    Result { seq: u64, result_id: String, result: DeviceResult },
    Reported { seq: u64 },
    Rejected { seq: u64, reason: String },
    Begin { probe_id: String, batch_id: String, device_id: String },
}

/// An install that began on a probe and has no result yet (see [`Journal::begin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    /// The probe.
    pub probe_id: String,
    /// The batch.
    pub batch_id: String,
    /// The device being installed.
    pub device_id: String,
}

struct Inner {
    file: File,
    /// Length of the file up to the last complete line we wrote or recovered.
    len: u64,
    next_seq: u64,
    /// Results not yet reported or rejected, by seq.
    pending: BTreeMap<u64, JournalEntry>,
    poisoned: bool,
    /// Results that could not be written yet, by seq, with the acknowledgement line to write after
    /// each (when a broker acknowledged it meanwhile). Written back, in order, before any new line.
    held: BTreeMap<u64, (JournalEntry, Option<Line>)>,
    /// Why the journal cannot be written now ("PATH: reason"), while it cannot.
    fault: Option<String>,
    /// Writes that failed since the journal was opened.
    faults_seen: u64,
    /// Fault injection: after this many more writes succeed, every write fails with this error kind
    /// until cleared.
    inject: Option<(u64, std::io::ErrorKind)>,
    /// Installs begun without a result yet, by probe.
    intents: HashMap<String, Intent>,
}

/// The local result journal. Share it as `Arc<Journal>`; every method takes `&self`.
pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    journal_id: String,
    inner: Mutex<Inner>,
    /// The newest signed audit checkpoints received, per ledger (`checkpoints.hex`).
    witnesses: crate::witness::Witnesses,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("journal_id", &self.journal_id)
            .finish_non_exhaustive()
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JournalError + 'a {
    move |source| JournalError::Io { op, path: path.to_path_buf(), source }
}

/// `fsync` a directory so that a file created or renamed in it survives a crash.
fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("syncing directory", dir))
}

/// Read or create the journal id in `dir`.
fn load_or_create_id(dir: &Path) -> Result<String, JournalError> {
    let path = dir.join(ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(JournalError::BadId {
                    path,
                    reason: format!("expected 1 to 64 ASCII letters or digits, found {id:?}"),
                });
            }
            Ok(id.to_owned())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = hex::encode(rand::random::<[u8; 8]>());
            flashgate_common::atomic_file::write(
                &path,
                format!("{id}\n").as_bytes(),
                flashgate_common::atomic_file::PRIVATE_MODE,
            )
            .map_err(|e| JournalError::Io { op: e.op, path: e.path, source: e.source })?;
            tracing::info!(journal = %dir.display(), journal_id = %id, "created a new journal id");
            Ok(id)
        }
        Err(e) => Err(JournalError::Io { op: "reading", path, source: e }),
    }
}

/// What a scan of the journal file found.
struct Scan {
    /// Every result in seq order with its state.
    entries: BTreeMap<u64, (JournalEntry, EntryState)>,
    /// Installs begun and not followed by a result of their device, by probe.
    intents: HashMap<String, Intent>,
    /// Length of the valid prefix (everything but a torn last line).
    valid_len: u64,
    /// Bytes of a torn last line, if there was one, and its line number.
    torn: Option<(u64, u64)>,
}

/// Read and check every line of `path`. A last line that is incomplete or unparsable is torn;
/// any other problem is an error naming the line.
fn scan(file: &File, path: &Path) -> Result<Scan, JournalError> {
    let mut reader = BufReader::new(file);
    reader.seek(SeekFrom::Start(0)).map_err(io_err("reading", path))?;
    let mut entries: BTreeMap<u64, (JournalEntry, EntryState)> = BTreeMap::new();
    let mut intents: HashMap<String, Intent> = HashMap::new();
    let mut offset = 0u64;
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(io_err("reading", path))?;
        if n == 0 {
            return Ok(Scan { entries, valid_len: offset, torn: None, intents });
        }
        line_no += 1;
        let parsed = match buf.strip_suffix(b"\n") {
            Some(body) => serde_json::from_slice::<Line>(body).map_err(|e| e.to_string()),
            None => Err("line has no end (incomplete write)".to_owned()),
        };
        let line = match parsed {
            Ok(line) => line,
            Err(reason) => {
                let at_end = reader.fill_buf().map_err(io_err("reading", path))?.is_empty();
                if at_end {
                    return Ok(Scan { entries, valid_len: offset, torn: Some((line_no, n as u64)), intents });
                }
                return Err(JournalError::Malformed { path: path.to_path_buf(), line: line_no, reason });
            }
        };
        let bad = |reason: String| JournalError::Malformed { path: path.to_path_buf(), line: line_no, reason };
        let next_seq = entries.keys().next_back().map_or(1, |s| s + 1);
        match line {
            Line::Result { seq, result_id, result } => {
                if seq != next_seq {
                    return Err(bad(format!("result seq {seq}, expected {next_seq}")));
                }
                intents.retain(|_, i| i.device_id != result.device_id);
                entries.insert(seq, (JournalEntry { seq, result_id, result }, EntryState::Unreported));
            }
            Line::Reported { seq } => match entries.get_mut(&seq) {
                Some((_, state)) => {
                    // A rejected result stays rejected; a duplicate acknowledgement is harmless.
                    if state.is_pending() {
                        *state = EntryState::Reported;
                    }
                }
                None => return Err(bad(format!("acknowledgement of seq {seq}, which has no result before it"))),
            },
            Line::Rejected { seq, reason } => match entries.get_mut(&seq) {
                Some((_, state)) => {
                    if state.is_pending() {
                        *state = EntryState::Rejected { reason };
                    }
                }
                None => return Err(bad(format!("rejection of seq {seq}, which has no result before it"))),
            },
            Line::Begin { probe_id, batch_id, device_id } => {
                intents.insert(probe_id.clone(), Intent { probe_id, batch_id, device_id });
            }
        }
        offset += n as u64;
    }
}

impl Journal {
    /// Open (creating if needed) the journal in `dir`: create the directory, the journal id and
    /// the log file, lock the log, and recover it (a torn last line is truncated away).
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
        let journal_id = load_or_create_id(dir)?;
        let path = dir.join(LOG_FILE);
        let existed = path.try_exists().map_err(io_err("checking", &path))?;
        let file =
            OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(io_err("opening", &path))?;
        if !existed {
            file.sync_all().map_err(io_err("syncing", &path))?;
            sync_dir(dir)?;
        }
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(JournalError::Locked { path }),
            Err(std::fs::TryLockError::Error(e)) => return Err(JournalError::Io { op: "locking", path, source: e }),
        }
        let scan = scan(&file, &path)?;
        if let Some((line, bytes)) = scan.torn {
            tracing::warn!(
                journal = %path.display(),
                line,
                bytes,
                "dropping a torn last line of the journal (a crash during a write; that result was never acknowledged)"
            );
            file.set_len(scan.valid_len).map_err(io_err("truncating", &path))?;
            file.sync_all().map_err(io_err("syncing", &path))?;
        }
        let next_seq = scan.entries.keys().next_back().map_or(1, |s| s + 1);
        let pending: BTreeMap<u64, JournalEntry> = scan
            .entries
            .into_iter()
            .filter(|(_, (_, state))| state.is_pending())
            .map(|(seq, (entry, _))| (seq, entry))
            .collect();
        tracing::debug!(journal = %path.display(), next_seq, unreported = pending.len(), "journal opened");
        let witnesses = crate::witness::Witnesses::open(dir)?;
        Ok(Journal {
            witnesses,
            dir: dir.to_path_buf(),
            path,
            journal_id,
            inner: Mutex::new(Inner {
                file,
                len: scan.valid_len,
                next_seq,
                pending,
                poisoned: false,
                held: BTreeMap::new(),
                fault: None,
                faults_seen: 0,
                inject: None,
                intents: scan.intents,
            }),
        })
    }

    /// Every result of the journal in `dir` with its state, without locking or repairing it (a
    /// torn last line is skipped). For inspecting the journal of a running agent.
    pub fn read_entries(dir: &Path) -> Result<Vec<(JournalEntry, EntryState)>, JournalError> {
        let path = dir.join(LOG_FILE);
        let file = File::open(&path).map_err(io_err("opening", &path))?;
        Ok(scan(&file, &path)?.entries.into_values().collect())
    }

    /// Keeps the signed audit checkpoint of a licence response if it is the newest of its ledger
    /// ([`crate::witness`]). A checkpoint that does not parse, or that cannot be written, is logged and
    /// dropped: it never fails the install.
    pub fn note_checkpoint(&self, bytes: &[u8]) {
        match self.witnesses.note(bytes) {
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "audit checkpoint not kept"),
        }
    }

    /// The signed audit checkpoints this station holds, one per ledger.
    pub fn checkpoints(&self) -> Vec<flashgate_common::checkpoint::SignedCheckpoint> {
        self.witnesses.held()
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The random id of this journal, the prefix of every result id.
    pub fn journal_id(&self) -> &str {
        &self.journal_id
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves `Inner` consistent (every write rolls back or
        // poisons explicitly), so a poisoned mutex is safe to keep using.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write `line` at the end of the journal, `fsync` it when `sync`; on failure undo the partial
    /// write so that the file still ends with a complete line.
    fn write_line(&self, inner: &mut Inner, line: &Line, sync: bool) -> Result<(), JournalError> {
        if inner.poisoned {
            return Err(JournalError::Poisoned { path: self.path.clone() });
        }
        let mut bytes = serde_json::to_vec(line).map_err(|e| JournalError::Io {
            op: "encoding a line for",
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        bytes.push(b'\n');
        let mut result = match inner.inject {
            Some((0, kind)) => Err(std::io::Error::new(kind, "injected write fault")),
            Some((left, kind)) => {
                inner.inject = Some((left - 1, kind));
                inner.file.write_all(&bytes)
            }
            None => inner.file.write_all(&bytes),
        }
        .map_err(io_err("writing", &self.path));
        if result.is_ok() && sync {
            result = inner.file.sync_data().map_err(io_err("syncing", &self.path));
        }
        match result {
            Ok(()) => {
                inner.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                inner.faults_seen += 1;
                inner.fault = Some(match &e {
                    JournalError::Io { source, .. } => format!("{}: {source}", self.path.display()),
                    other => other.to_string(),
                });
                // Roll back whatever part of the line reached the file, so that later lines never
                // follow a torn one (which recovery would refuse as a malformed line).
                let len = inner.len;
                let rollback = inner.file.set_len(len).and_then(|()| inner.file.sync_data());
                if let Err(re) = rollback {
                    tracing::error!(journal = %self.path.display(), error = %re, "rolling back a failed journal write failed");
                    inner.poisoned = true;
                }
                Err(e)
            }
        }
    }

    /// Append `r` with the next sequence number and make it durable (`fsync`) before returning.
    /// Only after this returns may the result be reported to a broker. When the file cannot be
    /// written the result is held in memory and [`JournalError::NotDurable`] returned with it.
    pub fn append(&self, r: DeviceResult) -> Result<JournalEntry, JournalError> {
        let mut inner = self.lock();
        self.flush_held(&mut inner);
        let seq = inner.next_seq;
        if inner.held.is_empty() && !inner.poisoned {
            let result_id = format!("{}-{seq}", self.journal_id);
            let line = Line::Result { seq, result_id: result_id.clone(), result: r.clone() };
            if self.write_line(&mut inner, &line, true).is_ok() {
                let entry = JournalEntry { seq, result_id, result: r };
                inner.next_seq = seq + 1;
                inner.fault = None;
                let device = entry.result.device_id.clone();
                inner.intents.retain(|_, i| i.device_id != device);
                inner.pending.insert(seq, entry.clone());
                metrics::counter!("flashgate_agent_journal_appends_total").increment(1);
                return Ok(entry);
            }
        }
        // Held: a result id of its own, so that a restart (which assigns seqs from the file) can never
        // give a later result the id this one may already have at a broker.
        let result_id = format!("{}-{seq}-{}", self.journal_id, hex::encode(rand::random::<[u8; 4]>()));
        let entry = JournalEntry { seq, result_id, result: r };
        inner.next_seq = seq + 1;
        let device = entry.result.device_id.clone();
        inner.intents.retain(|_, i| i.device_id != device);
        inner.pending.insert(seq, entry.clone());
        inner.held.insert(seq, (entry.clone(), None));
        metrics::gauge!("flashgate_agent_journal_held").set(inner.held.len() as f64);
        let reason = inner.fault.clone().unwrap_or_else(|| "journal is unusable".into());
        tracing::error!(journal = %self.path.display(), seq, result_id = %entry.result_id, %reason, "result not durable; held in memory");
        Err(JournalError::NotDurable { path: self.path.clone(), reason, entry: Box::new(entry) })
    }

    /// Write held results back (in seq order, each with its acknowledgement); stops at the first
    /// failure. Clears the fault when nothing is left held.
    fn flush_held(&self, inner: &mut Inner) {
        while let Some((&seq, _)) = inner.held.first_key_value() {
            let Some((entry, after)) = inner.held.get(&seq).cloned() else { break };
            let line = Line::Result { seq, result_id: entry.result_id.clone(), result: entry.result.clone() };
            if self.write_line(inner, &line, after.is_none()).is_err() {
                return;
            }
            if let Some(after) = &after
                && self.write_line(inner, after, true).is_err()
            {
                // The result is on disk; its acknowledgement is not: it stays pending and is sent
                // again (a harmless duplicate the broker recognises by result id).
                inner.pending.insert(seq, entry);
                inner.held.remove(&seq);
                return;
            }
            inner.held.remove(&seq);
            tracing::info!(journal = %self.path.display(), seq, "held result written to the journal");
        }
        metrics::gauge!("flashgate_agent_journal_held").set(0.0);
        if !inner.poisoned && inner.inject.is_none() {
            inner.fault = None;
        }
    }

    /// Record, durably, that an install of `device_id` (batch `batch_id`) is about to start on
    /// `probe_id`; a later result of that device closes it. Written before the first SFI command.
    pub fn begin(&self, probe_id: &str, batch_id: &str, device_id: &str) -> Result<(), JournalError> {
        let mut inner = self.lock();
        self.flush_held(&mut inner);
        if !inner.held.is_empty() {
            return Err(JournalError::Io {
                op: "writing",
                path: self.path.clone(),
                source: std::io::Error::other(inner.fault.clone().unwrap_or_default()),
            });
        }
        let line = Line::Begin { probe_id: probe_id.into(), batch_id: batch_id.into(), device_id: device_id.into() };
        self.write_line(&mut inner, &line, true)?;
        inner.intents.insert(
            probe_id.to_owned(),
            Intent { probe_id: probe_id.into(), batch_id: batch_id.into(), device_id: device_id.into() },
        );
        Ok(())
    }

    /// The install that began on `probe_id` and has no result: the agent was stopped in the middle.
    pub fn interrupted(&self, probe_id: &str) -> Option<Intent> {
        self.lock().intents.get(probe_id).cloned()
    }

    /// Forget the interrupted install on `probe_id` (its board turned out not to be installed; the
    /// next install on it begins afresh). In memory only: a later result or begin supersedes the line.
    pub fn clear_interrupted(&self, probe_id: &str) {
        self.lock().intents.remove(probe_id);
    }

    /// Try to write held results back now; `Err` with the reason while the journal still cannot be
    /// written.
    pub fn retry(&self) -> Result<(), String> {
        let mut inner = self.lock();
        self.flush_held(&mut inner);
        match &inner.fault {
            Some(f) => Err(f.clone()),
            None => Ok(()),
        }
    }

    /// Why the journal cannot be written, while it cannot ("PATH: reason").
    pub fn fault(&self) -> Option<String> {
        self.lock().fault.clone()
    }

    /// Writes that failed since the journal was opened.
    pub fn faults_seen(&self) -> u64 {
        self.lock().faults_seen
    }

    /// Results held in memory, not yet written to the journal.
    pub fn held_count(&self) -> usize {
        self.lock().held.len()
    }

    /// Fault injection, for tests and drills: from now on every write fails with `kind` (as a full
    /// disk fails with `StorageFull`), until called with `None`.
    pub fn inject_write_fault(&self, kind: Option<std::io::ErrorKind>) {
        self.inject_write_fault_after(0, kind);
    }

    /// [`Journal::inject_write_fault`] once `writes` more writes have succeeded (the disk fills up
    /// part way through a device: its install began, its result does not fit).
    pub fn inject_write_fault_after(&self, writes: u64, kind: Option<std::io::ErrorKind>) {
        let mut inner = self.lock();
        inner.inject = kind.map(|k| (writes, k));
        if kind.is_none() && inner.held.is_empty() && !inner.poisoned {
            inner.fault = None;
        }
    }

    /// Append a result that is for this station's history only and must never be sent to a broker
    /// (a device that got no licence: refused, or the broker unreachable). The result and its
    /// `rejected` mark (with `why`) are written and synced together under one lock, so the reporter
    /// never sees it pending. (A crash between the two lines leaves it pending; the broker then
    /// refuses the report — no licence for that device — and the reporter marks it rejected.)
    pub fn append_local(&self, r: DeviceResult, why: &str) -> Result<JournalEntry, JournalError> {
        let mut inner = self.lock();
        self.flush_held(&mut inner);
        if !inner.held.is_empty() {
            // Held results go first; a history-only line is not held (it is never reported).
            let reason = inner.fault.clone().unwrap_or_default();
            let entry = JournalEntry { seq: 0, result_id: String::new(), result: r };
            return Err(JournalError::NotDurable { path: self.path.clone(), reason, entry: Box::new(entry) });
        }
        let seq = inner.next_seq;
        let result_id = format!("{}-{seq}", self.journal_id);
        let line = Line::Result { seq, result_id: result_id.clone(), result: r.clone() };
        self.write_line(&mut inner, &line, false)?;
        inner.next_seq = seq + 1;
        self.write_line(&mut inner, &Line::Rejected { seq, reason: why.to_owned() }, true)?;
        metrics::counter!("flashgate_agent_journal_appends_total").increment(1);
        Ok(JournalEntry { seq, result_id, result: r })
    }

    /// [`Journal::append_local`] on tokio's blocking pool, for async callers.
    pub async fn append_local_async(
        self: &Arc<Self>,
        r: DeviceResult,
        why: String,
    ) -> Result<JournalEntry, JournalError> {
        let journal = Arc::clone(self);
        tokio::task::spawn_blocking(move || journal.append_local(r, &why))
            .await
            .map_err(|e| JournalError::Task(e.to_string()))?
    }

    /// [`Journal::append`] on tokio's blocking pool, for async callers.
    pub async fn append_async(self: &Arc<Self>, r: DeviceResult) -> Result<JournalEntry, JournalError> {
        let journal = Arc::clone(self);
        tokio::task::spawn_blocking(move || journal.append(r)).await.map_err(|e| JournalError::Task(e.to_string()))?
    }

    fn check_seq(&self, inner: &Inner, seq: u64) -> Result<(), JournalError> {
        if seq == 0 || seq >= inner.next_seq {
            return Err(JournalError::UnknownSeq { path: self.path.clone(), seq, next: inner.next_seq });
        }
        Ok(())
    }

    /// Record that a broker acknowledged result `seq`. Not synced (a lost acknowledgement only
    /// causes a duplicate report). Acknowledging a result that is no longer pending does nothing.
    pub fn mark_reported(&self, seq: u64) -> Result<(), JournalError> {
        let mut inner = self.lock();
        self.check_seq(&inner, seq)?;
        if !inner.pending.contains_key(&seq) {
            return Ok(());
        }
        if let Some(held) = inner.held.get_mut(&seq) {
            // Not on disk yet: the acknowledgement follows the result when it is written.
            held.1 = Some(Line::Reported { seq });
            inner.pending.remove(&seq);
            return Ok(());
        }
        self.write_line(&mut inner, &Line::Reported { seq }, false)?;
        inner.pending.remove(&seq);
        Ok(())
    }

    /// Record that a broker refused result `seq` for good (`reason` says why), so that it is no
    /// longer sent. The result stays in the journal. Does nothing if `seq` is no longer pending.
    pub fn mark_rejected(&self, seq: u64, reason: &str) -> Result<(), JournalError> {
        let mut inner = self.lock();
        self.check_seq(&inner, seq)?;
        if !inner.pending.contains_key(&seq) {
            return Ok(());
        }
        if let Some(held) = inner.held.get_mut(&seq) {
            held.1 = Some(Line::Rejected { seq, reason: reason.to_owned() });
            inner.pending.remove(&seq);
            return Ok(());
        }
        self.write_line(&mut inner, &Line::Rejected { seq, reason: reason.to_owned() }, true)?;
        inner.pending.remove(&seq);
        Ok(())
    }

    /// Results not yet reported or rejected, in seq order.
    pub fn unreported(&self) -> Vec<JournalEntry> {
        self.lock().pending.values().cloned().collect()
    }

    /// How many results are not yet reported or rejected.
    pub fn unreported_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// The sequence number the next [`Journal::append`] will assign.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// Every result in the journal with its state, in seq order (reads the file).
    pub fn entries(&self) -> Result<Vec<(JournalEntry, EntryState)>, JournalError> {
        let inner = self.lock();
        let file = File::open(&self.path).map_err(io_err("opening", &self.path))?;
        let scan = scan(&file, &self.path)?;
        drop(inner);
        Ok(scan.entries.into_values().collect())
    }
}

/// The `ReportInstall` request for a journaled result.
pub fn to_report(e: &JournalEntry) -> ReportInstallRequest {
    let r = &e.result;
    ReportInstallRequest {
        batch_id: r.batch_id.clone(),
        device_id: r.device_id.clone(),
        status_code: u32::from(r.status_code),
        message: r.message.clone(),
        timings: r
            .timings
            .iter()
            .map(|(stage, micros)| StageTiming { stage: stage.clone(), micros: *micros })
            .collect(),
        flash_crc: r.flash_crc,
        attempt: r.attempt,
        probe: Some(ProbeInfo { probe_id: r.probe_id.clone(), kind: r.probe_kind.clone(), port: r.probe_port.clone() }),
        result_id: e.result_id.clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample(i: u32) -> DeviceResult {
        DeviceResult {
            batch_id: "b1".into(),
            device_id: format!("dev{i:04}"),
            status_code: if i.is_multiple_of(3) { 0 } else { 0x0102 },
            message: if i.is_multiple_of(3) {
                "installed".into()
            } else {
                "area 2 not authentic \"quoted\"\nnewline".into()
            },
            flash_crc: i.is_multiple_of(2).then_some(0xDEAD_0000 | i),
            attempt: 1 + i % 2,
            probe_id: "FT1234".into(),
            probe_kind: "usb-serial".into(),
            probe_port: "/dev/ttyUSB0".into(),
            timings: vec![("connect".into(), 1200), ("install".into(), u64::from(i) * 7)],
            finished_at_ms: 1_700_000_000_000 + i64::from(i),
        }
    }

    /// The same on a real full disk: the journal on a 16 KiB tmpfs (mounted where the machine
    /// allows it, as root in CI; skipped with the reason otherwise). Appends fill it, the first that
    /// does not fit is held with the OS's "No space left on device", nothing already durable is lost.
    #[test]
    fn a_full_tmpfs_holds_results_instead_of_losing_them() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("small");
        std::fs::create_dir(&mnt).unwrap();
        let out =
            std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=16k", "tmpfs"]).arg(&mnt).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                eprintln!("SKIPPED: cannot mount a tmpfs here: {}", String::from_utf8_lossy(&o.stderr).trim());
                return;
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                return;
            }
        }
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(mnt.clone());
        let j = Journal::open(&mnt).unwrap();
        let mut durable = Vec::new();
        let held = loop {
            assert!(durable.len() < 1000, "a 16 KiB tmpfs never filled");
            match j.append(sample(durable.len() as u32 + 1)) {
                Ok(e) => durable.push(e.seq),
                Err(JournalError::NotDurable { reason, entry, .. }) => break (reason, entry),
                Err(e) => panic!("{e}"),
            }
        };
        assert!(held.0.contains("No space left on device"), "{}", held.0);
        assert_eq!(j.held_count(), 1);
        assert_eq!(j.unreported_count(), durable.len() + 1);
        drop(j);
        let j = Journal::open(&mnt).unwrap();
        assert_eq!(j.unreported().iter().map(|e| e.seq).collect::<Vec<_>>(), durable, "every durable result survives");
    }

    /// Issue 11 item 1: a result the journal cannot write is never silently dropped. It is held in
    /// memory (pending, under a result id a restart can never reuse), the fault is named with the
    /// path, no other line is written out of order meanwhile, and once writes succeed again the held
    /// results reach the file in seq order with their acknowledgements; a reopen sees all of them.
    #[test]
    fn a_result_that_cannot_be_written_is_held_then_written_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let first = j.append(sample(1)).unwrap();
        j.inject_write_fault(Some(std::io::ErrorKind::StorageFull));
        let e = j.append(sample(2)).unwrap_err();
        let JournalError::NotDurable { entry, .. } = &e else { panic!("{e}") };
        let msg = e.to_string();
        assert!(msg.starts_with("journal not writable: ") && msg.contains(LOG_FILE), "{msg}");
        assert_eq!(entry.seq, 2);
        assert_ne!(entry.result_id, format!("{}-2", j.journal_id()), "a held result has an id of its own");
        let held2 = entry.result_id.clone();
        let fault = j.fault().unwrap();
        assert!(fault.contains(LOG_FILE) && fault.contains("injected"), "{fault}");
        assert!(j.faults_seen() >= 1);
        let e3 = j.append(sample(3)).unwrap_err();
        let JournalError::NotDurable { entry: e3, .. } = e3 else { panic!() };
        assert_eq!(j.held_count(), 2);
        assert_eq!(j.unreported().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        // A broker acknowledged seq 2 meanwhile (delivered directly).
        j.mark_reported(2).unwrap();
        // History-only lines wait for the held ones.
        assert!(matches!(j.append_local(sample(9), "local").unwrap_err(), JournalError::NotDurable { .. }));
        assert!(j.retry().is_err());

        j.inject_write_fault(None);
        j.retry().unwrap();
        assert_eq!(j.fault(), None);
        assert_eq!(j.held_count(), 0);
        let fourth = j.append(sample(4)).unwrap();
        assert_eq!(fourth.seq, 4);
        drop(j);

        let j = Journal::open(dir.path()).unwrap();
        let entries = j.entries().unwrap();
        let ids: Vec<_> = entries.iter().map(|(e, _)| e.result_id.clone()).collect();
        assert_eq!(ids, vec![first.result_id, held2, e3.result_id.clone(), fourth.result_id]);
        let states: Vec<_> = entries.iter().map(|(_, s)| s.clone()).collect();
        assert_eq!(states[1], EntryState::Reported);
        assert_eq!(states[2], EntryState::Unreported);
        assert_eq!(j.unreported().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 3, 4]);
    }

    #[test]
    fn append_ack_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let id = j.journal_id().to_owned();
        assert_eq!(id.len(), 16);
        let a = j.append(sample(1)).unwrap();
        let b = j.append(sample(2)).unwrap();
        let c = j.append(sample(3)).unwrap();
        assert_eq!((a.seq, b.seq, c.seq), (1, 2, 3));
        assert_eq!(a.result_id, format!("{id}-1"));
        j.mark_reported(2).unwrap();
        j.mark_reported(2).unwrap();
        j.mark_rejected(3, "INVALID_ARGUMENT: bad batch").unwrap();
        assert_eq!(j.unreported(), vec![a.clone()]);
        assert!(matches!(j.mark_reported(4), Err(JournalError::UnknownSeq { seq: 4, next: 4, .. })));
        assert!(matches!(j.mark_reported(0), Err(JournalError::UnknownSeq { .. })));
        // Locked while open.
        let msg = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("locked") && msg.contains(LOG_FILE), "{msg}");
        drop(j);

        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.journal_id(), id);
        assert_eq!(j.unreported(), vec![a.clone()]);
        assert_eq!(j.next_seq(), 4);
        let states: Vec<EntryState> = j.entries().unwrap().into_iter().map(|(_, s)| s).collect();
        assert_eq!(
            states,
            vec![
                EntryState::Unreported,
                EntryState::Reported,
                EntryState::Rejected { reason: "INVALID_ARGUMENT: bad batch".into() }
            ]
        );
        let d = j.append(sample(4)).unwrap();
        assert_eq!(d.result_id, format!("{id}-4"));
        assert_eq!(Journal::read_entries(dir.path()).unwrap().len(), 4);
        assert_eq!(d.result, sample(4));
    }

    #[test]
    fn report_request_carries_every_field() {
        let e = JournalEntry { seq: 7, result_id: "abc-7".into(), result: sample(2) };
        let r = to_report(&e);
        assert_eq!(r.result_id, "abc-7");
        assert_eq!(r.status_code, 0x0102);
        assert_eq!(r.flash_crc, Some(0xDEAD_0002));
        assert_eq!(r.timings.len(), 2);
        assert_eq!(r.timings[1].stage, "install");
        assert_eq!(r.timings[1].micros, 14);
        let p = r.probe.unwrap();
        assert_eq!((p.probe_id.as_str(), p.kind.as_str(), p.port.as_str()), ("FT1234", "usb-serial", "/dev/ttyUSB0"));
        assert_eq!(r.attempt, 1);
        assert_eq!(r.device_id, "dev0002");
    }

    #[test]
    fn malformed_middle_line_is_an_error_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            for i in 0..3 {
                j.append(sample(i)).unwrap();
            }
        }
        let path = dir.path().join(LOG_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines[1] = "{\"kind\":\"result\",garbage";
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let msg = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(msg.contains(&path.display().to_string()) && msg.contains("line 2"), "{msg}");

        // An acknowledgement of an unknown seq is an error too.
        lines[1] = "{\"kind\":\"reported\",\"seq\":9}";
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let msg = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("line 2") && msg.contains("seq 9"), "{msg}");
    }

    #[test]
    fn bad_id_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(ID_FILE), "not/an id\n").unwrap();
        let msg = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(msg.contains(ID_FILE) && msg.contains("not/an id"), "{msg}");
    }

    #[test]
    fn truncating_the_last_line_anywhere_keeps_every_earlier_entry() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        for i in 0..4 {
            j.append(sample(i)).unwrap();
        }
        j.mark_reported(2).unwrap();
        j.append(sample(9)).unwrap();
        let before: Vec<_> = j.entries().unwrap().into_iter().take(4).collect();
        drop(j);
        let path = dir.path().join(LOG_FILE);
        let full = std::fs::read(&path).unwrap();
        let last_start = full[..full.len() - 1].iter().rposition(|&b| b == b'\n').unwrap() + 1;
        for cut in last_start..full.len() {
            let copy = tempfile::tempdir().unwrap();
            std::fs::copy(dir.path().join(ID_FILE), copy.path().join(ID_FILE)).unwrap();
            std::fs::write(copy.path().join(LOG_FILE), &full[..cut]).unwrap();
            let j = Journal::open(copy.path()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            assert_eq!(j.entries().unwrap(), before, "cut at {cut}");
            assert_eq!(j.next_seq(), 5);
            assert_eq!(std::fs::metadata(copy.path().join(LOG_FILE)).unwrap().len(), last_start as u64);
            // The journal keeps working after the repair (checked at some cuts: fsyncs are slow).
            if cut % 16 == 0 || cut + 1 == full.len() {
                assert_eq!(j.append(sample(5)).unwrap().seq, 5);
                drop(j);
                assert_eq!(Journal::open(copy.path()).unwrap().unreported().len(), 4);
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u32),
        Ack(usize),
        Reject(usize),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => any::<u32>().prop_map(Op::Append),
            2 => any::<usize>().prop_map(Op::Ack),
            1 => any::<usize>().prop_map(Op::Reject),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn any_history_survives_reopen(ops in proptest::collection::vec(op(), 0..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut j = Journal::open(dir.path()).unwrap();
            let mut model: Vec<(JournalEntry, EntryState)> = Vec::new();
            for op in ops {
                match op {
                    Op::Append(i) => {
                        let e = j.append(sample(i)).unwrap();
                        prop_assert_eq!(e.seq as usize, model.len() + 1);
                        model.push((e, EntryState::Unreported));
                    }
                    Op::Ack(k) | Op::Reject(k) if model.is_empty() => { let _ = k; }
                    Op::Ack(k) => {
                        let k = k % model.len();
                        j.mark_reported(model[k].0.seq).unwrap();
                        if model[k].1.is_pending() { model[k].1 = EntryState::Reported; }
                    }
                    Op::Reject(k) => {
                        let k = k % model.len();
                        j.mark_rejected(model[k].0.seq, "refused").unwrap();
                        if model[k].1.is_pending() { model[k].1 = EntryState::Rejected { reason: "refused".into() }; }
                    }
                    Op::Reopen => {
                        drop(j);
                        j = Journal::open(dir.path()).unwrap();
                    }
                }
            }
            drop(j);
            let j = Journal::open(dir.path()).unwrap();
            prop_assert_eq!(j.entries().unwrap(), model.clone());
            let pending: Vec<JournalEntry> =
                model.iter().filter(|(_, s)| s.is_pending()).map(|(e, _)| e.clone()).collect();
            prop_assert_eq!(j.unreported(), pending);
            prop_assert_eq!(j.next_seq() as usize, model.len() + 1);
        }
    }

    #[tokio::test]
    async fn concurrent_appends_get_distinct_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(Journal::open(dir.path()).unwrap());
        let mut tasks = Vec::new();
        for i in 0..16 {
            let j = Arc::clone(&j);
            tasks.push(tokio::spawn(async move { j.append_async(sample(i)).await.unwrap().seq }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=16).collect::<Vec<u64>>());
        drop(j);
        assert_eq!(Journal::open(dir.path()).unwrap().unreported().len(), 16);
    }
}
