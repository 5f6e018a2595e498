//! The broker's checkpoint signer: it signs the head of the audit chain (`flashgate-checkpoint-v1`,
//! docs/protocol.md §3) with the audit-signing key of an HSM member — every N records its writer appends,
//! every T while the head moves (other brokers on a shared ledger move it too), at start, at shutdown
//! and on demand — stores each checkpoint in the ledger, appends it to the configured file sinks, and
//! keeps the newest in memory so that every licence response carries it at the cost of a 217-byte copy.
//!
//! Signing never runs on the licence path: the periodic task waits on the writer's commit counter
//! ([`crate::ledger::Appended`]) and a timer, reads the committed head, and asks the pool to sign; a
//! signature is verified against the member's public key before it is published.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flashgate_common::checkpoint::{CHECKPOINT_LEN, CheckpointError, CheckpointHead, SignedCheckpoint};

use crate::hsm::HsmError;
use crate::ledger::{LedgerError, StoredCheckpoint};
use crate::service::BrokerState;

/// How long the periodic signer waits after a failed signing before it tries again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Mode of a file sink the broker creates (a witness: readable by whoever audits).
pub const SINK_FILE_MODE: u32 = 0o644;

/// When to sign (from `[audit]`, see `crate::config::AuditSection`).
#[derive(Debug, Clone)]
pub struct CheckpointSettings {
    /// Sign after this many records appended by this broker.
    pub every_records: u64,
    /// Sign at least this often while the head moves.
    pub interval: Duration,
    /// Files every checkpoint is appended to (one hex line each).
    pub sinks: Vec<PathBuf>,
}

impl Default for CheckpointSettings {
    fn default() -> Self {
        Self {
            every_records: crate::config::DEFAULT_CHECKPOINT_EVERY_RECORDS,
            interval: crate::config::DEFAULT_CHECKPOINT_INTERVAL,
            sinks: Vec::new(),
        }
    }
}

/// Why a checkpoint could not be signed or stored.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointFailure {
    /// Reading the head or storing the checkpoint failed.
    #[error("audit checkpoint: {0}")]
    Ledger(#[from] LedgerError),
    /// No member could sign.
    #[error("audit checkpoint: signing failed: {0}")]
    Hsm(#[from] HsmError),
    /// The head or the broker name does not fit the format, or the member's signature does not verify.
    #[error("audit checkpoint: {0}")]
    Format(#[from] CheckpointError),
    /// The stored head is not a 32-byte hash.
    #[error("audit checkpoint: the audit head at seq {seq} holds a {len}-byte hash, expected 32")]
    Head {
        /// The head's seq.
        seq: i64,
        /// The stored hash's length.
        len: usize,
    },
}

#[derive(Debug, Default)]
struct Last {
    /// (seq, hash) of the last checkpoint this broker signed, if any.
    head: Option<(i64, Vec<u8>)>,
    /// The writer's commit counter when it was signed.
    appended: u64,
}

/// The signer's state, shared through [`BrokerState`].
#[derive(Debug)]
pub struct Checkpoints {
    settings: CheckpointSettings,
    latest: RwLock<Option<[u8; CHECKPOINT_LEN]>>,
    /// Serialises signings; holds what was signed last.
    last: tokio::sync::Mutex<Last>,
}

impl Checkpoints {
    /// A signer with `settings` and nothing signed yet.
    pub fn new(settings: CheckpointSettings) -> Self {
        Self { settings, latest: RwLock::new(None), last: tokio::sync::Mutex::new(Last::default()) }
    }

    /// The settings.
    pub fn settings(&self) -> &CheckpointSettings {
        &self.settings
    }

    /// The newest checkpoint known to this broker (signed here or read from the ledger at start), as the
    /// 217 bytes licence responses carry.
    pub fn latest(&self) -> Option<Vec<u8>> {
        self.latest.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|b| b.to_vec())
    }

    fn publish(&self, bytes: [u8; CHECKPOINT_LEN], seq: u64) {
        let mut latest = self.latest.write().unwrap_or_else(|p| p.into_inner());
        // Never replace a newer head (another broker's, read from the ledger) with an older one.
        let newer = latest.as_ref().and_then(|b| SignedCheckpoint::parse(b).ok()).is_none_or(|cur| cur.head.seq <= seq);
        if newer {
            *latest = Some(bytes);
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Signs the committed head now (on demand, at start and shutdown, and from the periodic task), stores the
/// checkpoint and writes it to the sinks. `why` is logged.
pub async fn sign_now(state: &BrokerState, why: &'static str) -> Result<SignedCheckpoint, CheckpointFailure> {
    let mut last = state.checkpoints().last.lock().await;
    sign_locked(state, &mut last, why).await
}

/// Signs when the committed head differs from the last checkpoint this broker signed; `None` when it does not.
pub async fn sign_if_moved(
    state: &BrokerState,
    why: &'static str,
) -> Result<Option<SignedCheckpoint>, CheckpointFailure> {
    let mut last = state.checkpoints().last.lock().await;
    let head = state.ledger().audit_head().await?;
    if last.head.as_ref() == Some(&head) {
        last.appended = state.ledger().appended().count();
        return Ok(None);
    }
    sign_locked(state, &mut last, why).await.map(Some)
}

async fn sign_locked(
    state: &BrokerState,
    last: &mut Last,
    why: &'static str,
) -> Result<SignedCheckpoint, CheckpointFailure> {
    let appended = state.ledger().appended().count();
    let (seq, hash) = state.ledger().audit_head().await?;
    let cp = sign_head(state, seq, hash, why).await?;
    last.head = Some((seq, cp.head.hash.to_vec()));
    last.appended = appended;
    Ok(cp)
}

/// Signs, verifies, stores, publishes and sinks a checkpoint of the head (`seq`, `hash`) — the committed
/// head, or the head of a snapshot a certificate of conformance was taken at (a head the chain held).
pub async fn sign_head(
    state: &BrokerState,
    seq: i64,
    hash: Vec<u8>,
    why: &'static str,
) -> Result<SignedCheckpoint, CheckpointFailure> {
    let hash32: [u8; 32] = hash.as_slice().try_into().map_err(|_| CheckpointFailure::Head { seq, len: hash.len() })?;
    let head = CheckpointHead {
        ledger_id: state.ledger().ledger_id(),
        seq: u64::try_from(seq).map_err(|_| CheckpointFailure::Head { seq, len: hash.len() })?,
        hash: hash32,
        at: unix_now(),
        broker: state.name().to_owned(),
    };
    let body = head.body()?;
    let (signature, key) = state.pool().sign_audit(body.to_vec()).await?;
    let cp = SignedCheckpoint::from_parts(head, signature)?;
    // A member that signed with another key (or garbled the signature) must not publish it.
    cp.verify(&[key])?;
    let bytes = cp.to_bytes()?;
    state
        .ledger()
        .store_checkpoint(&StoredCheckpoint {
            broker: cp.head.broker.clone(),
            seq,
            at: i64::try_from(cp.head.at).unwrap_or(i64::MAX),
            hash,
            bytes: bytes.to_vec(),
        })
        .await?;
    state.checkpoints().publish(bytes, cp.head.seq);
    metrics::counter!(crate::service::metric::CHECKPOINTS).increment(1);
    tracing::info!(seq, hash = %hex::encode(hash32), why, "audit checkpoint signed");
    write_sinks(&state.checkpoints().settings.sinks, &bytes).await;
    Ok(cp)
}

/// Appends `bytes` as one hex line to every sink; failures are logged (the checkpoint is in the ledger).
async fn write_sinks(sinks: &[PathBuf], bytes: &[u8; CHECKPOINT_LEN]) {
    if sinks.is_empty() {
        return;
    }
    let line = format!("{}\n", hex::encode(bytes));
    let sinks = sinks.to_vec();
    let r = tokio::task::spawn_blocking(move || {
        for path in &sinks {
            if let Err(e) = append_line(path, &line) {
                metrics::counter!(crate::service::metric::CHECKPOINT_SINK_ERRORS).increment(1);
                tracing::warn!(sink = %path.display(), error = %e, "could not append the audit checkpoint to its sink");
            }
        }
    })
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "checkpoint sink task failed");
    }
}

fn append_line(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().append(true).create(true).mode(SINK_FILE_MODE).open(path)?;
    f.write_all(line.as_bytes())?;
    f.sync_data()
}

/// At start: publishes the newest checkpoint in the ledger, then signs the head if it moved since.
pub async fn start(state: &BrokerState) {
    match state.ledger().latest_checkpoint().await {
        Ok(Some(cp)) => match <[u8; CHECKPOINT_LEN]>::try_from(cp.bytes.as_slice()) {
            Ok(b) if SignedCheckpoint::parse(&b).is_ok() => {
                state.checkpoints().publish(b, u64::try_from(cp.seq).unwrap_or(0));
                if cp.broker == state.name() {
                    state.checkpoints().last.lock().await.head = Some((cp.seq, cp.hash));
                }
            }
            _ => tracing::warn!(seq = cp.seq, broker = %cp.broker, "stored audit checkpoint does not parse; ignored"),
        },
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the newest audit checkpoint"),
    }
    if let Err(e) = sign_if_moved(state, "start").await {
        tracing::warn!(error = %e, "could not sign an audit checkpoint at start");
    }
}

/// The periodic signer; runs until aborted.
pub async fn run(state: BrokerState) {
    let settings = state.checkpoints().settings.clone();
    let appended = state.ledger().appended().clone();
    let mut next = tokio::time::Instant::now() + settings.interval;
    loop {
        let since = appended.count().saturating_sub(state.checkpoints().last.lock().await.appended);
        if since >= settings.every_records {
            if let Err(e) = sign_if_moved(&state, "records").await {
                tracing::warn!(error = %e, "could not sign an audit checkpoint");
                // Do not spin on a failing HSM or ledger.
                tokio::time::sleep(RETRY_AFTER).await;
            }
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep_until(next) => {
                next = tokio::time::Instant::now() + settings.interval;
                if let Err(e) = sign_if_moved(&state, "interval").await {
                    tracing::warn!(error = %e, "could not sign an audit checkpoint");
                }
            }
            () = appended.changed() => {}
        }
    }
}
