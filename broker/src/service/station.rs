//! `StationService`: the control stream between a station agent and the broker it is attached to.
//!
//! `Attach` is a bidirectional stream opened by a station (station identity only). The agent's first
//! message must be `Register` (else `INVALID_ARGUMENT`); the broker then records the station as online
//! in the ledger's `station_status`, answers at once with the station's current assignment (`Assign`
//! or `Pause`; nothing when an operator never assigned it) and from then on pushes every change of
//! that assignment. Heartbeats update `station_status` (at most one write per [`STATUS_WRITE_INTERVAL`]
//! per station); `DeviceProgress` / `DeviceDone` only update this broker's in-memory [`StationHub`].
//! When the stream ends the station is marked detached (offline).
//!
//! Assignments reach attached stations two ways: a change made through this broker is published to the
//! hub by `AdminService` and pushed at once; changes made through any other broker sharing the ledger
//! are picked up by [`poll_assignments`], which reads every assignment once per [`ASSIGNMENT_POLL`]
//! while stations are attached. Each assignment carries a ledger revision, so a stream pushes only
//! what is newer than what it last sent, whatever the brokers' clocks say.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use flashgate_proto::transport::RevocationList;
use flashgate_proto::v1 as pb;
use flashgate_proto::v1::station_service_server::StationService;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::auth::{self, StationCaller};
use super::licence::observe;
use super::status::refused;
use super::{BrokerState, metric, validate};
use crate::ledger::{Assignment, Ledger, LedgerError, RefusalReason, StationProbe, StationStatus, now_ms};

/// How often the assignments in the ledger are re-read while stations are attached (changes made
/// through other brokers reach a station within about this long).
pub const ASSIGNMENT_POLL: Duration = Duration::from_secs(1);
/// Least time between two `station_status` writes for one station (heartbeats in between are kept
/// in memory only).
pub const STATUS_WRITE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a new stream may take to send `Register`.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most `Attach` streams one station identity may have open on one broker at once (registered or not).
/// A station needs one; a new `Register` supersedes the older registered stream of the same identity (it
/// ends `UNAVAILABLE`), so a reconnecting station always gets in while a flood of streams is refused
/// `RESOURCE_EXHAUSTED` beyond this.
pub const MAX_ATTACH_PER_STATION: usize = 4;

/// The latest a station reported about one of its probes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbeActivity {
    /// Device on the probe (`""` before any).
    pub device_id: String,
    /// Stage of the device in progress (`identify`, `licence`, `image`, `install`, …), or `done`.
    pub stage: String,
    /// Progress within the stage.
    pub done: u64,
    /// Total of the stage.
    pub total: u64,
    /// Outcome of the last finished device: ok, and the agent's message.
    pub last_result: Option<(bool, String)>,
}

/// A station attached to this broker, as far as this broker knows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LiveStation {
    /// The status as last reported (also written to the ledger, rate-limited).
    pub status: StationStatus,
    /// Agent version from `Register`.
    pub agent_version: String,
    /// Latest activity per probe id.
    pub probes: BTreeMap<String, ProbeActivity>,
}

/// One open `Attach` stream in the hub.
struct StreamHandle {
    id: u64,
    serial: String,
    /// Set to the status the stream must end with.
    end: watch::Sender<Option<Status>>,
}

/// A stream's slot in the hub; dropping it frees the slot.
struct StreamSlot {
    hub: Arc<StationHub>,
    identity: String,
    id: u64,
    ended: watch::Receiver<Option<Status>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut map = self.hub.streams();
        if let Some(list) = map.get_mut(&self.identity) {
            list.retain(|h| h.id != self.id);
            if list.is_empty() {
                map.remove(&self.identity);
            }
        }
    }
}

/// Resolves with the status an operator-side event (revocation, a newer stream) ended this stream with.
async fn ended(rx: &mut watch::Receiver<Option<Status>>) -> Status {
    match rx.wait_for(Option::is_some).await {
        Ok(s) => s.clone().unwrap_or_else(|| Status::unavailable("stream ended")),
        // The sender lives in the hub for as long as the slot does.
        Err(_) => Status::unavailable("stream ended"),
    }
}

fn revoked_status(identity: &str, serial: &str) -> Status {
    refused(RefusalReason::StationRevoked, format!("certificate serial {serial} of {identity} is revoked"), "", "")
}

/// The stations attached to this broker and the latest assignment of every station: shared by the
/// `Attach` streams, `AdminService` (which publishes its changes) and the assignment poller.
pub struct StationHub {
    live: Mutex<HashMap<String, LiveStation>>,
    /// Every open `Attach` stream by identity, with the way to end it.
    streams: Mutex<HashMap<String, Vec<StreamHandle>>>,
    assignments: watch::Sender<Arc<HashMap<String, Assignment>>>,
    closing: watch::Sender<bool>,
}

impl std::fmt::Debug for StationHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StationHub").field("attached", &self.attached_count()).finish_non_exhaustive()
    }
}

impl Default for StationHub {
    fn default() -> Self {
        Self::new()
    }
}

impl StationHub {
    /// An empty hub.
    pub fn new() -> Self {
        Self {
            live: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            assignments: watch::Sender::new(Arc::new(HashMap::new())),
            closing: watch::Sender::new(false),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, LiveStation>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many stations are attached to this broker.
    pub fn attached_count(&self) -> usize {
        self.live().len()
    }

    /// The stations attached to this broker, by identity.
    pub fn attached(&self) -> Vec<LiveStation> {
        let mut v: Vec<LiveStation> = self.live().values().cloned().collect();
        v.sort_by(|a, b| a.status.identity.cmp(&b.status.identity));
        v
    }

    /// The latest assignment known for `identity`.
    pub fn assignment(&self, identity: &str) -> Option<Assignment> {
        self.assignments.borrow().get(identity).cloned()
    }

    /// Publishes an assignment just committed through this broker: a stream of that station pushes it
    /// at once.
    pub fn publish(&self, a: Assignment) {
        self.merge(vec![a]);
    }

    /// Merges assignments read from the ledger, keeping the newer revision of each. Returns whether
    /// anything changed (streams are woken only then).
    pub fn merge(&self, list: Vec<Assignment>) -> bool {
        self.assignments.send_if_modified(|map| {
            let newer: Vec<Assignment> =
                list.into_iter().filter(|a| map.get(&a.identity).is_none_or(|old| a.revision > old.revision)).collect();
            if newer.is_empty() {
                return false;
            }
            let m = Arc::make_mut(map);
            for a in newer {
                m.insert(a.identity.clone(), a);
            }
            true
        })
    }

    /// Re-reads every assignment from the ledger. Returns whether anything changed.
    pub async fn refresh(&self, ledger: &Ledger) -> Result<bool, LedgerError> {
        Ok(self.merge(ledger.station_assignments().await?))
    }

    /// Ends every `Attach` stream (`UNAVAILABLE`: the agents reconnect, possibly elsewhere) and refuses
    /// new ones; called when the broker shuts down.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<StreamHandle>>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a stream slot for `identity` (certificate `serial`), or `None` when it already has
    /// [`MAX_ATTACH_PER_STATION`] streams open. The slot is freed when the returned guard drops.
    fn open_stream(self: &Arc<Self>, identity: &str, serial: &str) -> Option<StreamSlot> {
        let mut map = self.streams();
        let list = map.entry(identity.to_owned()).or_default();
        if list.len() >= MAX_ATTACH_PER_STATION {
            return None;
        }
        let id = rand::random::<u64>();
        let (end, ended) = watch::channel(None);
        list.push(StreamHandle { id, serial: serial.to_owned(), end });
        Some(StreamSlot { hub: Arc::clone(self), identity: identity.to_owned(), id, ended })
    }

    /// Ends every other stream of `identity` (a newer `Register` supersedes them).
    fn supersede(&self, identity: &str, keep: u64) {
        if let Some(list) = self.streams().get(identity) {
            for h in list.iter().filter(|h| h.id != keep) {
                h.end
                    .send_replace(Some(Status::unavailable("superseded by a newer Attach stream of the same station")));
            }
        }
    }

    /// Ends every open stream whose certificate serial is in `revoked`, with `STATION_REVOKED`. Returns how
    /// many were ended.
    pub fn end_revoked(&self, revoked: &dyn RevocationList) -> usize {
        let mut n = 0;
        for (identity, list) in self.streams().iter() {
            for h in list.iter().filter(|h| revoked.is_revoked(&h.serial)) {
                if h.end.borrow().is_none() {
                    tracing::warn!(station = %identity, serial = %h.serial,
                        "station certificate revoked: ending its Attach stream");
                    h.end.send_replace(Some(revoked_status(identity, &h.serial)));
                    n += 1;
                }
            }
        }
        n
    }

    /// Open `Attach` streams of `identity` (for tests and `admin stations`).
    pub fn open_streams(&self, identity: &str) -> usize {
        self.streams().get(identity).map_or(0, Vec::len)
    }

    fn attach(&self, live: LiveStation) {
        let n = {
            let mut map = self.live();
            map.insert(live.status.identity.clone(), live);
            map.len()
        };
        metrics::gauge!(metric::STATIONS_ATTACHED).set(n as f64);
    }

    /// Removes `identity` if `session` is still its stream (a newer stream of the same station stays).
    fn detach(&self, identity: &str, session: &str) {
        let n = {
            let mut map = self.live();
            if map.get(identity).is_some_and(|l| l.status.session == session) {
                map.remove(identity);
            }
            map.len()
        };
        metrics::gauge!(metric::STATIONS_ATTACHED).set(n as f64);
    }

    /// Applies `f` to the live entry of `identity` when `session` is its stream.
    fn update(&self, identity: &str, session: &str, f: impl FnOnce(&mut LiveStation)) {
        if let Some(l) = self.live().get_mut(identity).filter(|l| l.status.session == session) {
            f(l);
        }
    }
}

/// Re-reads the ledger's assignments every `every` while stations are attached to this broker, so a
/// change made through another broker reaches them. Runs until aborted.
pub async fn poll_assignments(state: BrokerState, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let hub = state.stations();
        if hub.attached_count() == 0 {
            continue;
        }
        match hub.refresh(state.ledger()).await {
            Ok(_) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "could not read station assignments from the ledger (retrying)");
            }
            Err(e) => tracing::debug!(error = %e, "station assignments still unreadable"),
        }
    }
}

/// Ledger form of a reported probe.
pub(crate) fn probe_record(p: &pb::ProbeInfo) -> StationProbe {
    StationProbe { probe_id: p.probe_id.clone(), kind: p.kind.clone(), port: p.port.clone() }
}

/// Wire form of a stored probe.
pub(crate) fn probe_info(p: &StationProbe) -> pb::ProbeInfo {
    pb::ProbeInfo { probe_id: p.probe_id.clone(), kind: p.kind.clone(), port: p.port.clone() }
}

/// A probe's latest activity as `AdminService.ListStations` shows it.
pub(crate) fn probe_activity(probe_id: &str, a: &ProbeActivity) -> pb::ProbeActivity {
    let (finished, last_ok, last_message) = match &a.last_result {
        Some((ok, message)) => (true, *ok, message.clone()),
        None => (false, false, String::new()),
    };
    pb::ProbeActivity {
        probe_id: probe_id.to_owned(),
        device_id: a.device_id.clone(),
        stage: a.stage.clone(),
        done: a.done,
        total: a.total,
        finished,
        last_ok,
        last_message,
    }
}

/// What the broker sends for an assignment: `Pause` when paused, `Assign` when a batch is assigned.
pub(crate) fn assignment_message(a: &Assignment) -> Option<pb::BrokerMessage> {
    let msg = if a.paused {
        pb::broker_message::Msg::Pause(pb::Pause { reason: a.reason.clone() })
    } else if !a.batch_id.is_empty() {
        pb::broker_message::Msg::Assign(pb::Assign { batch_id: a.batch_id.clone() })
    } else {
        return None;
    };
    Some(pb::BrokerMessage { msg: Some(msg) })
}

fn message_kind(m: &pb::AgentMessage) -> &'static str {
    match m.msg {
        Some(pb::agent_message::Msg::Register(_)) => "Register",
        Some(pb::agent_message::Msg::Heartbeat(_)) => "Heartbeat",
        Some(pb::agent_message::Msg::Progress(_)) => "DeviceProgress",
        Some(pb::agent_message::Msg::Done(_)) => "DeviceDone",
        None => "an empty message",
    }
}

/// The `StationService` implementation.
#[derive(Debug, Clone)]
pub struct Stations {
    state: BrokerState,
}

impl Stations {
    /// The service over `state`.
    pub fn new(state: BrokerState) -> Self {
        Self { state }
    }
}

type AttachStream = Pin<Box<dyn Stream<Item = Result<pb::BrokerMessage, Status>> + Send + 'static>>;
type Outbound = mpsc::Sender<Result<pb::BrokerMessage, Status>>;

/// One `Attach` stream after `Register`.
struct Session {
    state: BrokerState,
    caller: StationCaller,
    tx: Outbound,
    /// The station's status and agent version (its probes' activity lives in the hub only).
    live: LiveStation,
    last_write: Instant,
    /// Revision of the assignment last pushed.
    sent: Option<i64>,
}

/// Checks the fields of a `Register` (or the probe list and batch of a `Heartbeat`).
fn check_station_fields(what: &str, probes: &[pb::ProbeInfo], current_batch: &str) -> Result<(), Status> {
    validate::probes(&format!("{what}.probes"), probes)?;
    if !current_batch.is_empty() {
        validate::batch_id(&format!("{what}.current_batch"), current_batch)?;
    }
    Ok(())
}

fn check_register(r: &pb::Register) -> Result<(), Status> {
    validate::optional_identifier("register.agent_version", &r.agent_version, validate::MAX_AGENT_VERSION)?;
    check_station_fields("register", &r.probes, &r.current_batch)
}

impl Session {
    fn identity(&self) -> &str {
        &self.caller.uri
    }

    fn session(&self) -> &str {
        &self.live.status.session
    }

    /// The station's certificate is still good: not revoked, not expired. Checked on every message and
    /// before every push.
    fn still_valid(&self) -> Result<(), Status> {
        if self.state.revoked().is_revoked(&self.caller.serial) {
            tracing::warn!(serial = %self.caller.serial, "station certificate revoked: ending its Attach stream");
            return Err(revoked_status(&self.caller.uri, &self.caller.serial));
        }
        if SystemTime::now() >= self.caller.not_after {
            tracing::warn!(serial = %self.caller.serial, "station certificate expired: ending its Attach stream");
            return Err(auth::expired(&self.caller.uri, &self.caller.serial, self.caller.not_after));
        }
        Ok(())
    }

    /// Writes the station's status to the ledger now; failures are logged (bookkeeping).
    async fn write_status(&mut self) {
        self.live.status.updated_at = now_ms();
        self.last_write = Instant::now();
        if let Err(e) = self.state.ledger().put_station_status(&self.live.status).await {
            tracing::warn!(error = %e, "could not record the station status in the ledger");
        }
    }

    /// Pushes `a` unless a newer or equal revision was pushed already. `Ok(false)` when the station is
    /// gone; `Err` when its certificate was revoked or expired meanwhile.
    async fn push(&mut self, a: &Assignment) -> Result<bool, Status> {
        if self.sent.is_some_and(|r| a.revision <= r) {
            return Ok(true);
        }
        self.still_valid()?;
        self.sent = Some(a.revision);
        let Some(msg) = assignment_message(a) else { return Ok(true) };
        tracing::info!(batch = %a.batch_id, paused = a.paused, revision = a.revision, "assignment pushed to the station");
        Ok(self.tx.send(Ok(msg)).await.is_ok())
    }

    /// Applies `f` to the hub's activity of `probe_id`, refusing a probe beyond [`validate::MAX_PROBES`].
    fn activity(&self, field: &str, probe_id: &str, f: impl FnOnce(&mut ProbeActivity)) -> Result<(), Status> {
        let mut over = false;
        self.state.stations().update(self.identity(), self.session(), |l| {
            if !l.probes.contains_key(probe_id) && l.probes.len() >= validate::MAX_PROBES {
                over = true;
                return;
            }
            f(l.probes.entry(probe_id.to_owned()).or_default());
        });
        if over {
            return Err(validate::invalid(
                field,
                format!("names more distinct probes than the limit of {}", validate::MAX_PROBES),
            ));
        }
        Ok(())
    }

    /// Handles one agent message; `Err` ends the stream with that status.
    async fn handle(&mut self, m: pb::AgentMessage) -> Result<(), Status> {
        self.still_valid()?;
        match m.msg {
            Some(pb::agent_message::Msg::Register(r)) => {
                check_register(&r)?;
                // A repeated Register refreshes what the station has; the assignment stays as pushed.
                self.live.agent_version = r.agent_version;
                self.live.status.probes = r.probes.iter().map(probe_record).collect();
                self.live.status.running = !r.current_batch.is_empty();
                self.live.status.current_batch = r.current_batch;
                self.write_status().await;
            }
            Some(pb::agent_message::Msg::Heartbeat(h)) => {
                check_station_fields("heartbeat", &h.probes, &h.current_batch)?;
                let s = &mut self.live.status;
                s.probes = h.probes.iter().map(probe_record).collect();
                s.current_batch = h.current_batch;
                s.devices_ok = h.devices_ok;
                s.devices_failed = h.devices_failed;
                s.running = h.running;
                if self.last_write.elapsed() >= STATUS_WRITE_INTERVAL {
                    self.write_status().await;
                }
            }
            Some(pb::agent_message::Msg::Progress(p)) => {
                validate::identifier("progress.probe_id", &p.probe_id, validate::MAX_PROBE_ID)?;
                validate::optional_identifier("progress.device_id", &p.device_id, validate::DEVICE_ID_LEN)?;
                validate::optional_identifier("progress.stage", &p.stage, validate::MAX_STAGE)?;
                tracing::debug!(probe = %p.probe_id, device = %p.device_id, stage = %p.stage, done = p.done,
                    total = p.total, "device progress");
                return self.activity("progress.probe_id", &p.probe_id, |a| {
                    a.device_id = p.device_id;
                    a.stage = p.stage;
                    a.done = p.done;
                    a.total = p.total;
                });
            }
            Some(pb::agent_message::Msg::Done(d)) => {
                validate::identifier("done.probe_id", &d.probe_id, validate::MAX_PROBE_ID)?;
                validate::optional_identifier("done.device_id", &d.device_id, validate::DEVICE_ID_LEN)?;
                validate::text("done.message", &d.message, validate::MAX_MESSAGE)?;
                tracing::debug!(probe = %d.probe_id, device = %d.device_id, ok = d.ok,
                    message = %validate::shown(&d.message), "device done");
                return self.activity("done.probe_id", &d.probe_id, |a| {
                    a.device_id = d.device_id;
                    a.stage = "done".into();
                    a.last_result = Some((d.ok, d.message));
                });
            }
            None => {
                tracing::debug!("empty agent message ignored");
                return Ok(());
            }
        }
        // Keep the hub's copy of the status in step (Register / Heartbeat).
        let status = self.live.status.clone();
        let version = self.live.agent_version.clone();
        self.state.stations().update(&self.caller.uri, &self.live.status.session, |l| {
            l.status = status;
            l.agent_version = version;
        });
        Ok(())
    }
}

/// Resolves once the hub is closed (the broker is shutting down).
async fn shut_down(closing: &mut watch::Receiver<bool>) {
    // An error means the hub is gone: the broker is stopping too.
    let _ = closing.wait_for(|c| *c).await;
}

/// Resolves when a certificate valid until `not_after` expires.
async fn expiry(not_after: SystemTime) {
    let left = not_after.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
    tokio::time::sleep(left).await;
}

/// Runs one `Attach` stream: waits for `Register`, then serves the station until it goes away.
async fn run(
    state: BrokerState,
    caller: StationCaller,
    mut slot: StreamSlot,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: Outbound,
) {
    let mut closing = state.stations().closing.subscribe();
    let first = tokio::select! {
        first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.next()) => first,
        () = shut_down(&mut closing) => Ok(None),
        st = ended(&mut slot.ended) => {
            let _ = tx.send(Err(st)).await;
            return;
        }
    };
    let register = match first {
        Err(_) => {
            let _ = tx
                .send(Err(Status::invalid_argument(format!(
                    "no Register within {} s of opening Attach",
                    REGISTER_TIMEOUT.as_secs()
                ))))
                .await;
            return;
        }
        Ok(None) => return,
        Ok(Some(Err(s))) => {
            tracing::debug!(code = ?s.code(), "Attach stream broke before Register");
            return;
        }
        Ok(Some(Ok(m))) => match m.msg {
            Some(pb::agent_message::Msg::Register(r)) => r,
            _ => {
                tracing::warn!(got = message_kind(&m), "refused: Attach must start with Register");
                let _ = tx
                    .send(Err(Status::invalid_argument(format!(
                        "the first message on Attach must be Register, got {}",
                        message_kind(&m)
                    ))))
                    .await;
                return;
            }
        },
    };
    if let Err(st) = check_register(&register) {
        tracing::warn!(reason = %st.message(), "refused: invalid Register");
        let _ = tx.send(Err(st)).await;
        return;
    }
    // One registered stream per station: an older one (a connection the station gave up on) ends.
    state.stations().supersede(&caller.uri, slot.id);
    let session_id = format!("{:016x}", rand::random::<u64>());
    let status = StationStatus {
        identity: caller.uri.clone(),
        site: caller.site.clone(),
        broker: state.name().to_owned(),
        session: session_id.clone(),
        attached: true,
        probes: register.probes.iter().map(probe_record).collect(),
        running: !register.current_batch.is_empty(),
        current_batch: register.current_batch,
        devices_ok: 0,
        devices_failed: 0,
        updated_at: now_ms(),
    };
    let not_after = caller.not_after;
    let live = LiveStation { status, agent_version: register.agent_version, probes: BTreeMap::new() };
    let mut s = Session { state: state.clone(), caller, tx, live, last_write: Instant::now(), sent: None };
    tracing::Span::current().record("session", session_id.as_str());
    s.write_status().await;
    state.stations().attach(s.live.clone());
    tracing::info!(agent_version = %s.live.agent_version, probes = s.live.status.probes.len(),
        current_batch = %s.live.status.current_batch, "station attached");

    // The current assignment, straight from the ledger (the hub's copy may be older: its poller sleeps
    // while no station is attached).
    let mut assignments = state.stations().assignments.subscribe();
    assignments.borrow_and_update();
    let mut alive = Ok(true);
    match state.ledger().station_assignment(s.identity()).await {
        Ok(Some(a)) => {
            alive = s.push(&a).await;
            state.stations().merge(vec![a]);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the station's assignment (the poller retries)"),
    }
    // Anything published meanwhile (or a newer revision than the one just read).
    if matches!(alive, Ok(true))
        && let Some(a) = state.stations().assignment(s.identity())
    {
        alive = s.push(&a).await;
    }

    let mut end: Option<Status> = None;
    loop {
        match alive {
            Ok(true) => {}
            Ok(false) => break,
            Err(st) => {
                end = Some(st);
                break;
            }
        }
        tokio::select! {
            msg = inbound.next() => match msg {
                None => {
                    tracing::debug!("station closed its Attach stream");
                    break;
                }
                Some(Err(st)) => {
                    tracing::debug!(code = ?st.code(), message = %validate::shown(st.message()), "Attach stream broke");
                    break;
                }
                Some(Ok(m)) => {
                    if let Err(st) = s.handle(m).await {
                        if st.code() == tonic::Code::InvalidArgument {
                            tracing::warn!(reason = %st.message(), "ending the Attach stream: invalid message");
                        }
                        end = Some(st);
                        break;
                    }
                }
            },
            changed = assignments.changed() => {
                if changed.is_err() {
                    break;
                }
                let a = assignments.borrow_and_update().get(s.identity()).cloned();
                if let Some(a) = a {
                    alive = s.push(&a).await;
                }
            }
            () = shut_down(&mut closing) => {
                end = Some(Status::unavailable(format!("broker {} is shutting down; reconnect", state.name())));
                break;
            }
            st = ended(&mut slot.ended) => {
                tracing::info!(reason = %st.message(), "Attach stream ended by the broker");
                end = Some(st);
                break;
            }
            () = expiry(not_after) => {
                alive = s.still_valid().map(|()| true);
            }
            () = s.tx.closed() => {
                tracing::debug!("station stopped reading its Attach stream");
                break;
            }
        }
    }
    if let Some(st) = end {
        let _ = s.tx.send(Err(st)).await;
    }
    state.stations().detach(s.identity(), &session_id);
    if let Err(e) = state.ledger().mark_station_detached(s.identity(), &session_id).await {
        tracing::warn!(error = %e, "could not mark the station detached in the ledger");
    }
    drop(slot);
    tracing::info!("station detached");
}

#[tonic::async_trait]
impl StationService for Stations {
    type AttachStream = AttachStream;

    async fn attach(&self, req: Request<Streaming<pb::AgentMessage>>) -> Result<Response<Self::AttachStream>, Status> {
        let started = Instant::now();
        let result = async {
            let caller = auth::station(&self.state, &req)?;
            if *self.state.stations().closing.borrow() {
                return Err(Status::unavailable(format!("broker {} is shutting down", self.state.name())));
            }
            let Some(slot) = self.state.stations().open_stream(&caller.uri, &caller.serial) else {
                tracing::warn!(station = %caller.uri, limit = MAX_ATTACH_PER_STATION,
                    "refused: too many Attach streams of one station");
                return Err(Status::resource_exhausted(format!(
                    "{} already has {MAX_ATTACH_PER_STATION} Attach streams open on this broker",
                    caller.uri
                )));
            };
            self.state.note_station(&caller.uri, &caller.site, &caller.serial).await;
            let (tx, rx) = mpsc::channel(16);
            let span = tracing::info_span!("station_stream", station = %caller.uri, session = tracing::field::Empty);
            tokio::spawn(run(self.state.clone(), caller, slot, req.into_inner(), tx).instrument(span));
            Ok(Box::pin(ReceiverStream::new(rx)) as AttachStream)
        }
        .instrument(tracing::info_span!("rpc", rpc = "Attach"))
        .await;
        observe("Attach", started, &result);
        result.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(identity: &str, batch: &str, paused: bool, revision: i64) -> Assignment {
        Assignment {
            identity: identity.into(),
            batch_id: batch.into(),
            paused,
            reason: if paused { "lunch".into() } else { String::new() },
            revision,
            updated_at: 0,
            updated_by: "admin".into(),
        }
    }

    #[test]
    fn messages_of_assignments() {
        let m = assignment_message(&assignment("s", "b1", false, 1)).unwrap();
        assert_eq!(m.msg, Some(pb::broker_message::Msg::Assign(pb::Assign { batch_id: "b1".into() })));
        let m = assignment_message(&assignment("s", "b1", true, 2)).unwrap();
        assert_eq!(m.msg, Some(pb::broker_message::Msg::Pause(pb::Pause { reason: "lunch".into() })));
        assert!(assignment_message(&assignment("s", "", false, 3)).is_none());
    }

    #[test]
    fn the_hub_keeps_the_newest_revision() {
        let hub = Arc::new(StationHub::new());
        let mut rx = hub.assignments.subscribe();
        assert!(hub.merge(vec![assignment("a", "b1", false, 2)]));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // An older read (a poll that started before a publish) changes nothing and wakes nobody.
        assert!(!hub.merge(vec![assignment("a", "b0", false, 1)]));
        assert!(!rx.has_changed().unwrap());
        hub.publish(assignment("a", "b1", true, 3));
        assert!(hub.assignment("a").unwrap().paused);
        assert!(hub.assignment("b").is_none());
    }

    #[test]
    fn only_the_current_session_detaches() {
        let hub = Arc::new(StationHub::new());
        let live = |session: &str| LiveStation {
            status: StationStatus { identity: "s".into(), session: session.into(), ..Default::default() },
            ..Default::default()
        };
        hub.attach(live("one"));
        hub.attach(live("two"));
        hub.detach("s", "one");
        assert_eq!(hub.attached_count(), 1);
        hub.detach("s", "two");
        assert_eq!(hub.attached_count(), 0);
    }
}
