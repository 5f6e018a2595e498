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
use std::path::{Path, PathBuf};
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

/// Longest a `command:` sink may run for one checkpoint before it is killed (a sink error).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Syslog priority of a checkpoint message: facility local0 (16), severity notice (5).
pub const SYSLOG_PRIORITY: u8 = 16 * 8 + 5;

/// An external append-only place every checkpoint is also written to (`[audit] checkpoint_sinks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// `file:PATH`: one hex line appended and synced to disk (the witness file format).
    File(PathBuf),
    /// `syslog:udp://HOST:PORT`: one RFC 5424 datagram to a collector (facility local0, severity notice,
    /// MSGID `checkpoint`) whose text is `flashgate-checkpoint-v1 HEX`.
    SyslogUdp(String),
    /// `syslog:unix:PATH`: the same text to a local syslog socket (`/dev/log`) in the BSD form it expects.
    SyslogUnix(PathBuf),
    /// `command:PROGRAM [ARG…]` (split on whitespace, no shell): run with the hex line on its standard
    /// input; a non-zero exit, or running longer than [`COMMAND_TIMEOUT`], is a sink error.
    Command(Vec<String>),
}

impl Sink {
    /// Parses one `checkpoint_sinks` entry; a relative file path is taken against `base`.
    pub fn parse(entry: &str, base: &Path) -> Result<Self, String> {
        let bad = |why: &str| {
            Err(format!(
                "{why}; expected file:PATH, syslog:udp://HOST:PORT, syslog:unix:PATH or command:PROGRAM [ARG…]"
            ))
        };
        if let Some(p) = entry.strip_prefix("file:") {
            if p.is_empty() {
                return bad("no path after file:");
            }
            let p = Path::new(p);
            return Ok(Self::File(if p.is_absolute() { p.to_path_buf() } else { base.join(p) }));
        }
        if let Some(addr) = entry.strip_prefix("syslog:udp://") {
            let Some((host, port)) = addr.rsplit_once(':') else { return bad("no :PORT after the syslog host") };
            if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return bad("a syslog target is HOST:PORT with a port from 1 to 65535");
            }
            return Ok(Self::SyslogUdp(addr.to_owned()));
        }
        if let Some(p) = entry.strip_prefix("syslog:unix:") {
            if !p.starts_with('/') {
                return bad("a syslog socket is an absolute path, e.g. syslog:unix:/dev/log");
            }
            return Ok(Self::SyslogUnix(PathBuf::from(p)));
        }
        if let Some(cmd) = entry.strip_prefix("command:") {
            let argv: Vec<String> = cmd.split_whitespace().map(str::to_owned).collect();
            if argv.first().is_none_or(|p| !p.starts_with('/')) {
                return bad("a command sink names its program by absolute path");
            }
            return Ok(Self::Command(argv));
        }
        bad("unknown sink kind")
    }

    /// How logs name it.
    pub fn describe(&self) -> String {
        match self {
            Self::File(p) => format!("file:{}", p.display()),
            Self::SyslogUdp(a) => format!("syslog:udp://{a}"),
            Self::SyslogUnix(p) => format!("syslog:unix:{}", p.display()),
            Self::Command(argv) => format!("command:{}", argv.join(" ")),
        }
    }
}

/// When to sign (from `[audit]`, see `crate::config::AuditSection`).
#[derive(Debug, Clone)]
pub struct CheckpointSettings {
    /// Sign after this many records appended by this broker.
    pub every_records: u64,
    /// Sign at least this often while the head moves.
    pub interval: Duration,
    /// Where every checkpoint is also written.
    pub sinks: Vec<Sink>,
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
    write_sinks(&state.checkpoints().settings.sinks, state.name(), &bytes).await;
    Ok(cp)
}

/// Writes `bytes` to every sink; failures are logged and counted (the checkpoint is in the ledger).
async fn write_sinks(sinks: &[Sink], broker: &str, bytes: &[u8; CHECKPOINT_LEN]) {
    for sink in sinks {
        if let Err(e) = write_sink(sink, broker, bytes).await {
            metrics::counter!(crate::service::metric::CHECKPOINT_SINK_ERRORS).increment(1);
            tracing::warn!(sink = %sink.describe(), error = %e, "could not write the audit checkpoint to its sink");
        }
    }
}

/// Writes one checkpoint to one sink.
pub async fn write_sink(sink: &Sink, broker: &str, bytes: &[u8; CHECKPOINT_LEN]) -> std::io::Result<()> {
    let hex = hex::encode(bytes);
    match sink {
        Sink::File(path) => {
            let (path, line) = (path.clone(), format!("{hex}\n"));
            blocking(move || append_line(&path, &line)).await
        }
        Sink::SyslogUdp(addr) => {
            let stamp = humantime::format_rfc3339_seconds(SystemTime::now());
            let msg = format!(
                "<{SYSLOG_PRIORITY}>1 {stamp} {broker} flashgate-broker {} checkpoint - {}{hex}",
                std::process::id(),
                flashgate_common::checkpoint::CHECKPOINT_MARKER
            );
            let sock = tokio::net::UdpSocket::bind(if addr.starts_with('[') { "[::]:0" } else { "0.0.0.0:0" }).await?;
            sock.send_to(msg.as_bytes(), addr.as_str()).await.map(|_| ())
        }
        Sink::SyslogUnix(path) => {
            let msg = format!(
                "<{SYSLOG_PRIORITY}>flashgate-broker[{}]: {}{hex}",
                std::process::id(),
                flashgate_common::checkpoint::CHECKPOINT_MARKER
            );
            let path = path.clone();
            blocking(move || std::os::unix::net::UnixDatagram::unbound()?.send_to(msg.as_bytes(), &path).map(|_| ()))
                .await
        }
        Sink::Command(argv) => {
            use tokio::io::AsyncWriteExt as _;
            let Some((program, args)) = argv.split_first() else { return Err(std::io::Error::other("empty command")) };
            let mut child = tokio::process::Command::new(program)
                .args(args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()?;
            let run = async {
                if let Some(mut stdin) = child.stdin.take() {
                    // A program that exits without reading is judged by its exit status, not the pipe.
                    match stdin.write_all(format!("{hex}\n").as_bytes()).await {
                        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e),
                        _ => {}
                    }
                }
                child.wait().await
            };
            match tokio::time::timeout(COMMAND_TIMEOUT, run).await {
                Ok(Ok(status)) if status.success() => Ok(()),
                Ok(Ok(status)) => Err(std::io::Error::other(format!("exited with {status}"))),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(std::io::Error::other(format!("still running after {COMMAND_TIMEOUT:?}: killed"))),
            }
        }
    }
}

async fn blocking(f: impl FnOnce() -> std::io::Result<()> + Send + 'static) -> std::io::Result<()> {
    tokio::task::spawn_blocking(f).await.map_err(std::io::Error::other)?
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use flashgate_common::audit_export::read_witnesses;
    use flashgate_common::checkpoint::CheckpointHead;
    use p256::ecdsa::SigningKey;

    use super::*;

    fn checkpoint() -> [u8; CHECKPOINT_LEN] {
        let key = SigningKey::from_slice(&[5; 32]).unwrap();
        let cp = CheckpointHead { ledger_id: [1; 16], seq: 42, hash: [2; 32], at: 3, broker: "broker-1".into() };
        cp.sign(&key).unwrap().to_bytes().unwrap()
    }

    #[test]
    fn sink_entries_parse_and_name_what_is_wrong() {
        let base = Path::new("/var/lib/fg");
        assert_eq!(Sink::parse("file:cp.hex", base).unwrap(), Sink::File(base.join("cp.hex")));
        assert_eq!(Sink::parse("syslog:udp://[::1]:514", base).unwrap(), Sink::SyslogUdp("[::1]:514".into()));
        for (bad, why) in [
            ("file:", "no path"),
            ("syslog:udp://host", "no :PORT"),
            ("syslog:udp://host:99999", "port from 1"),
            ("syslog:unix:log", "absolute path"),
            ("command:", "absolute path"),
            ("command:tee x", "absolute path"),
            ("http://x", "unknown sink kind"),
        ] {
            let e = Sink::parse(bad, base).unwrap_err();
            assert!(e.contains(why) && e.contains("expected file:PATH"), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn every_sink_kind_delivers_a_line_a_witness_reader_takes() {
        let cp = checkpoint();
        let want = SignedCheckpoint::parse(&cp).unwrap();
        let dir = tempfile::tempdir().unwrap();

        let file = dir.path().join("sink.hex");
        write_sink(&Sink::File(file.clone()), "broker-1", &cp).await.unwrap();
        write_sink(&Sink::File(file.clone()), "broker-1", &cp).await.unwrap();
        let got = read_witnesses("file", &std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(got.len(), 2, "appended, not replaced");

        let collector = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = collector.local_addr().unwrap().to_string();
        write_sink(&Sink::SyslogUdp(addr), "broker-1", &cp).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = collector.recv(&mut buf).await.unwrap();
        let msg = String::from_utf8(buf[..n].to_vec()).unwrap();
        assert!(msg.starts_with("<133>1 ") && msg.contains(" broker-1 flashgate-broker "), "{msg}");
        assert_eq!(read_witnesses("syslog", &msg).unwrap()[0].1, want);

        let sock = dir.path().join("log.sock");
        let local = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
        write_sink(&Sink::SyslogUnix(sock), "broker-1", &cp).await.unwrap();
        let n = local.recv(&mut buf).unwrap();
        let msg = String::from_utf8(buf[..n].to_vec()).unwrap();
        assert!(msg.starts_with("<133>flashgate-broker["), "{msg}");
        assert_eq!(read_witnesses("unix", &msg).unwrap()[0].1, want);

        let out = dir.path().join("tee.hex");
        let tee = Sink::parse(&format!("command:/usr/bin/tee -a {}", out.display()), dir.path()).unwrap();
        write_sink(&tee, "broker-1", &cp).await.unwrap();
        assert_eq!(read_witnesses("tee", &std::fs::read_to_string(&out).unwrap()).unwrap()[0].1, want);
        let e = write_sink(&Sink::Command(vec!["/bin/false".into()]), "broker-1", &cp).await.unwrap_err();
        assert!(e.to_string().contains("exited with"), "{e}");
        let e = write_sink(&Sink::Command(vec!["/nonexistent/prog".into()]), "broker-1", &cp).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    }
}
