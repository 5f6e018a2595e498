//! The station's witnesses of the broker's audit history: the newest signed audit checkpoint
//! (`flashgate-checkpoint-v1`, docs/protocol.md §3) the station has received in a licence response, one
//! per ledger, kept in `checkpoints.hex` beside the journal — one hex checkpoint per line, the witness
//! file format of `flashgate audit verify --witness` (`flashgate agent journal --checkpoints` prints it).
//!
//! Anyone holding such a checkpoint detects a rewrite of the ledger's history up to its seq. Bytes from
//! the network are parsed (exact length, domain, name rules) before they are kept; the signature is
//! checked by whoever verifies, against the audit keys they trust. A checkpoint replaces the held one of
//! its ledger only when its seq is higher; one at the same seq with another hash is evidence of a
//! rewrite: the held one is kept and the conflict logged. The file is replaced atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flashgate_common::checkpoint::{CHECKPOINT_LEN, SignedCheckpoint};

/// File name of the checkpoints inside the journal directory.
pub const CHECKPOINT_FILE: &str = "checkpoints.hex";
/// Most ledgers a station keeps a checkpoint of (beyond it, the ledger seen least recently is dropped).
pub const MAX_LEDGERS: usize = 16;
/// Largest checkpoint file read.
pub const MAX_FILE: u64 = 64 * 1024;

/// Why checkpoints could not be read or kept.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// The file could not be read or written.
    #[error("checkpoint file {path}: {op} failed: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A line of the file is not a checkpoint.
    #[error("checkpoint file {path} line {line}: {why}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// Bytes received are not a checkpoint.
    #[error("the broker sent a checkpoint that does not parse: {0}")]
    Received(flashgate_common::checkpoint::CheckpointError),
}

/// What [`Witnesses::note`] did with a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Noted {
    /// Kept: the newest of its ledger now.
    Kept,
    /// Not newer than the held one.
    Older,
    /// Same seq as the held one with another hash: a rewritten history; the held one stays.
    Conflict,
}

/// The checkpoints a station holds, by ledger id.
#[derive(Debug)]
pub struct Witnesses {
    path: PathBuf,
    held: Mutex<BTreeMap<[u8; 16], (u64, SignedCheckpoint)>>,
    order: Mutex<u64>,
}

/// Reads the checkpoints of the journal directory `dir` (none when the file does not exist).
pub fn read(dir: &Path) -> Result<Vec<SignedCheckpoint>, WitnessError> {
    use std::io::Read as _;
    let path = dir.join(CHECKPOINT_FILE);
    let io = |op| {
        let path = path.clone();
        move |source| WitnessError::Io { path, op, source }
    };
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("opening")(e)),
    };
    let mut text = String::new();
    f.take(MAX_FILE + 1).read_to_string(&mut text).map_err(io("reading"))?;
    if text.len() as u64 > MAX_FILE {
        return Err(WitnessError::Malformed { path, line: 0, why: format!("larger than {MAX_FILE} bytes") });
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let bad = |why: String| WitnessError::Malformed { path: path.clone(), line: i + 1, why };
        let bytes = hex::decode(t.split_whitespace().next().unwrap_or_default()).map_err(|e| bad(e.to_string()))?;
        out.push(SignedCheckpoint::parse(&bytes).map_err(|e| bad(e.to_string()))?);
    }
    Ok(out)
}

impl Witnesses {
    /// The checkpoints held in the journal directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, WitnessError> {
        let mut held = BTreeMap::new();
        for (i, cp) in read(dir)?.into_iter().enumerate() {
            held.insert(cp.head.ledger_id, (i as u64, cp));
        }
        let n = held.len() as u64;
        Ok(Self { path: dir.join(CHECKPOINT_FILE), held: Mutex::new(held), order: Mutex::new(n) })
    }

    /// The checkpoints held, by ledger id.
    pub fn held(&self) -> Vec<SignedCheckpoint> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).values().map(|(_, c)| c.clone()).collect()
    }

    /// Keeps `bytes` (from a licence response) if it parses and is newer than the held checkpoint of its
    /// ledger. Empty bytes (a broker without checkpoints) are ignored.
    pub fn note(&self, bytes: &[u8]) -> Result<Option<Noted>, WitnessError> {
        if bytes.is_empty() {
            return Ok(None);
        }
        let cp = SignedCheckpoint::parse(bytes).map_err(WitnessError::Received)?;
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, cur)) = held.get(&cp.head.ledger_id) {
            if cur.head.seq == cp.head.seq && cur.head.hash != cp.head.hash {
                tracing::error!(
                    seq = cp.head.seq,
                    held = %hex::encode(cur.head.hash),
                    received = %hex::encode(cp.head.hash),
                    broker = %cp.head.broker,
                    "the broker presented an audit checkpoint that contradicts the one this station holds \
                     (a rewritten history); keeping the held one"
                );
                return Ok(Some(Noted::Conflict));
            }
            if cur.head.seq >= cp.head.seq {
                return Ok(Some(Noted::Older));
            }
        }
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        *order += 1;
        let mut next = held.clone();
        next.insert(cp.head.ledger_id, (*order, cp));
        while next.len() > MAX_LEDGERS {
            let oldest = next.iter().min_by_key(|(_, (o, _))| *o).map(|(k, _)| *k);
            match oldest {
                Some(k) => next.remove(&k),
                None => break,
            };
        }
        let mut text = String::from("# newest signed audit checkpoint per ledger seen by this station (hex)\n");
        for (_, c) in next.values() {
            // A parsed checkpoint re-encodes (its fields were validated when parsed).
            let bytes: [u8; CHECKPOINT_LEN] = c.to_bytes().map_err(WitnessError::Received)?;
            text.push_str(&hex::encode(bytes));
            text.push('\n');
        }
        flashgate_common::atomic_file::write(&self.path, text.as_bytes(), flashgate_common::atomic_file::PUBLIC_MODE)
            .map_err(|e| WitnessError::Io { path: self.path.clone(), op: e.op, source: e.source })?;
        *held = next;
        Ok(Some(Noted::Kept))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use flashgate_common::checkpoint::CheckpointHead;
    use p256::ecdsa::SigningKey;

    use super::*;

    fn cp(ledger: u8, seq: u64, hash: u8) -> Vec<u8> {
        let key = SigningKey::from_slice(&[7; 32]).unwrap();
        let head = CheckpointHead { ledger_id: [ledger; 16], seq, hash: [hash; 32], at: 1, broker: "b".into() };
        head.sign(&key).unwrap().to_bytes().unwrap().to_vec()
    }

    #[test]
    fn keeps_the_newest_per_ledger_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let w = Witnesses::open(dir.path()).unwrap();
        assert_eq!(w.note(&[]).unwrap(), None);
        assert_eq!(w.note(&cp(1, 5, 5)).unwrap(), Some(Noted::Kept));
        assert_eq!(w.note(&cp(1, 4, 4)).unwrap(), Some(Noted::Older));
        assert_eq!(w.note(&cp(1, 5, 9)).unwrap(), Some(Noted::Conflict));
        assert_eq!(w.note(&cp(1, 9, 9)).unwrap(), Some(Noted::Kept));
        assert_eq!(w.note(&cp(2, 1, 1)).unwrap(), Some(Noted::Kept));
        assert!(matches!(w.note(&[0; 10]), Err(WitnessError::Received(_))));
        let back = read(dir.path()).unwrap();
        assert_eq!(back.iter().map(|c| (c.head.ledger_id[0], c.head.seq)).collect::<Vec<_>>(), vec![(1, 9), (2, 1)]);
        let again = Witnesses::open(dir.path()).unwrap();
        assert_eq!(again.note(&cp(1, 8, 8)).unwrap(), Some(Noted::Older));
    }

    #[test]
    fn at_most_max_ledgers_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let w = Witnesses::open(dir.path()).unwrap();
        for l in 0..=MAX_LEDGERS as u8 {
            w.note(&cp(l, 1, 1)).unwrap();
        }
        let held = w.held();
        assert_eq!(held.len(), MAX_LEDGERS);
        assert!(!held.iter().any(|c| c.head.ledger_id == [0; 16]), "the least recently kept ledger is dropped");
    }

    #[test]
    fn malformed_files_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CHECKPOINT_FILE), format!("# c\n{}\nzz\n", hex::encode(cp(1, 1, 1)))).unwrap();
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
    }
}
