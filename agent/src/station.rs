//! The station's control stream to the broker (`StationService.Attach`, see
//! `proto/flashgate/v1/station.proto`): [`StationLink`] keeps one Attach stream open for the life of
//! the station daemon.
//!
//! Owns: the stream's lifecycle — connect, send `Register` (agent version, probes, current batch),
//! then a `Heartbeat` every [`LinkOptions::heartbeat_interval`] (probes, current batch, devices
//! ok/failed since start, running) and at once when the batch or the probes change; the translation
//! of the runner's [`RunEvent`]s into `DeviceProgress` (throttled: at most one per probe per
//! [`LinkOptions::progress_interval`], plus every stage change) and `DeviceDone`; and the broker's
//! `Assign` / `Pause` messages, delivered as [`Command`]s through [`StationLink::recv`].
//!
//! On any stream error or end the link reconnects with exponential backoff and jitter
//! ([`LinkOptions::reconnect_initial`] → [`LinkOptions::reconnect_max`]), moving to the next broker
//! endpoint each time (failover), and registers again; the broker then repeats the station's
//! current assignment, so a command may arrive more than once (the daemon treats a repeated
//! `Assign` of the running batch as a no-op). While disconnected, progress is dropped (it is stale
//! by the time the stream is back) and the last [`MAX_PENDING_DONE`] `DeviceDone`s are kept and
//! sent after the next `Register`. The stream is informational: every device result reaches the
//! broker reliably through the journal and `ReportInstall`, whatever happens to this stream.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use flashgate_proto::transport::{self, MtlsConnector, TransportError};
use flashgate_proto::v1::station_service_client::StationServiceClient;
use flashgate_proto::v1::{
    AgentMessage, BrokerMessage, DeviceDone, DeviceProgress, Heartbeat, ProbeInfo as PbProbe, Register, agent_message,
    broker_message,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::bootloader::InstallStage;
use crate::broker_client::RetryPolicy;
use crate::pipeline::{DeviceOutcome, StageEvent};
use crate::runner::RunEvent;

/// Default [`LinkOptions::heartbeat_interval`].
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Default [`LinkOptions::progress_interval`].
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// `DeviceDone` messages kept while the stream is down, sent after the next `Register`.
pub const MAX_PENDING_DONE: usize = 256;

/// Messages queued for the stream at most (a broker that stops reading does not grow memory; what
/// does not fit is dropped and the stream is considered dead).
const OUTBOUND_BUFFER: usize = 256;

/// What the broker tells the station to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run this batch on every probe until it is exhausted or the station is paused.
    Assign(String),
    /// Stop starting new devices (devices in flight finish); the reason in words.
    Pause(String),
}

/// What the station reports in `Register` and `Heartbeat`; kept current by the daemon through
/// [`StationLink::update_status`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StationStatus {
    /// The station's probes.
    pub probes: Vec<PbProbe>,
    /// Batch being run, `""` when idle.
    pub current_batch: String,
    /// Devices installed since the agent started.
    pub devices_ok: u64,
    /// Devices failed or refused since the agent started.
    pub devices_failed: u64,
    /// True while a batch is running (including while its in-flight devices finish after a pause).
    pub running: bool,
}

impl StationStatus {
    fn register(&self, agent_version: &str) -> AgentMessage {
        msg(agent_message::Msg::Register(Register {
            agent_version: agent_version.to_owned(),
            probes: self.probes.clone(),
            current_batch: self.current_batch.clone(),
        }))
    }

    fn heartbeat(&self) -> AgentMessage {
        msg(agent_message::Msg::Heartbeat(Heartbeat {
            probes: self.probes.clone(),
            current_batch: self.current_batch.clone(),
            devices_ok: self.devices_ok,
            devices_failed: self.devices_failed,
            running: self.running,
        }))
    }

    /// What makes the link send a heartbeat at once when it changes.
    fn headline(&self) -> (Vec<PbProbe>, String, bool) {
        (self.probes.clone(), self.current_batch.clone(), self.running)
    }
}

/// Resolves once the link is being closed (or its handle is gone).
async fn closed(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

fn msg(m: agent_message::Msg) -> AgentMessage {
    AgentMessage { msg: Some(m) }
}

/// Timings of a [`StationLink`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkOptions {
    /// Between heartbeats (`[station] heartbeat_interval`, default 5 s).
    pub heartbeat_interval: Duration,
    /// Least time between two `DeviceProgress` of one probe at the same stage (default 500 ms).
    pub progress_interval: Duration,
    /// Backoff before the first reconnection (doubling, with jitter; default 100 ms).
    pub reconnect_initial: Duration,
    /// Largest backoff between reconnections (default 5 s).
    pub reconnect_max: Duration,
    /// How long opening the stream may take before the endpoint counts as failed (default 10 s).
    pub attach_timeout: Duration,
    /// Version sent in `Register` (default: this crate's version).
    pub agent_version: String,
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            attach_timeout: Duration::from_secs(10),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

impl LinkOptions {
    /// Backoff after `failures` consecutive failed sessions (0-based), with jitter.
    fn backoff(&self, failures: u32) -> Duration {
        RetryPolicy { attempts: 1, initial: self.reconnect_initial, max: self.reconnect_max }.delay(failures)
    }
}

/// Why a [`StationLink`] could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StationError {
    /// No broker endpoint was given.
    #[error("station link: no broker endpoints configured")]
    NoEndpoints,
    /// An endpoint could not be set up (bad URI or TLS server name).
    #[error("station link to broker endpoint {endpoint}: {source}")]
    Endpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// Why it is unusable.
        source: TransportError,
    },
}

/// The open control stream to the broker(s); see the module documentation. Dropping it stops the
/// link at once; [`StationLink::close`] first sends what is queued.
#[derive(Debug)]
pub struct StationLink {
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<RunEvent>,
    status: watch::Sender<StationStatus>,
    attached: watch::Receiver<Option<String>>,
    closing: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    /// Tasks feeding the status ([`StationLink::follow_probes`]); aborted with the link.
    followers: Vec<JoinHandle<()>>,
}

impl StationLink {
    /// A link to `endpoints` (`https://host:port`, in failover order) over mutual TLS with `tls`
    /// (the station certificate, as for [`crate::broker_client::BrokerClient::new`]); `server_name`
    /// overrides the name broker certificates must match. The link has its own HTTP/2 connections
    /// (with keep-alive, so a vanished broker is noticed). Starts connecting at once.
    pub fn new(
        endpoints: Vec<String>,
        tls: Arc<rustls::ClientConfig>,
        server_name: Option<String>,
        probes: Vec<PbProbe>,
        opts: LinkOptions,
    ) -> Result<Self, StationError> {
        let channels = endpoints
            .into_iter()
            .map(|e| {
                let channel = MtlsConnector::new(Arc::clone(&tls), server_name.as_deref()).and_then(|connector| {
                    // The endpoint's HTTP/2 keep-alive notices a broker that vanished without
                    // closing the connection within about ten seconds.
                    Ok(transport::endpoint(&e)?.connect_with_connector_lazy(connector))
                });
                match channel {
                    Ok(ch) => Ok((e, ch)),
                    Err(source) => Err(StationError::Endpoint { endpoint: e, source }),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_channels(channels, probes, opts)
    }

    /// A link over channels built by the caller, each with the name used in messages (tests use
    /// plain-TCP channels). Starts connecting at once; needs a Tokio runtime.
    pub fn from_channels(
        channels: Vec<(String, Channel)>,
        probes: Vec<PbProbe>,
        opts: LinkOptions,
    ) -> Result<Self, StationError> {
        if channels.is_empty() {
            return Err(StationError::NoEndpoints);
        }
        let (cmd_tx, commands) = mpsc::unbounded_channel();
        let (events, ev_rx) = mpsc::unbounded_channel();
        let (status, status_rx) = watch::channel(StationStatus { probes, ..StationStatus::default() });
        let (attached_tx, attached) = watch::channel(None);
        let (closing, closing_rx) = watch::channel(false);
        let task = LinkTask {
            channels,
            opts,
            commands: cmd_tx,
            events: ev_rx,
            status: status_rx,
            attached: attached_tx,
            closing: closing_rx,
            tracker: Tracker::default(),
            pending_done: VecDeque::new(),
        };
        Ok(StationLink {
            commands,
            events,
            status,
            attached,
            closing,
            task: Some(tokio::spawn(task.run())),
            followers: Vec::new(),
        })
    }

    /// The next command from the broker; `None` only when the link has stopped.
    pub async fn recv(&mut self) -> Option<Command> {
        self.commands.recv().await
    }

    /// Change what the next `Register` / `Heartbeat` says; a change of batch, running or probes is
    /// reported at once.
    pub fn update_status(&self, f: impl FnOnce(&mut StationStatus)) {
        self.status.send_modify(f);
    }

    /// Keep the reported probes equal to `probes` (a probe watcher's list) for as long as the link
    /// lives: a probe plugged in or removed is reported at once, not only at the next `Register`.
    pub fn follow_probes(&mut self, mut probes: watch::Receiver<Vec<crate::pipeline::ProbeTarget>>) {
        let status = self.status.clone();
        let mut closing = self.closing.subscribe();
        self.followers.push(tokio::spawn(async move {
            loop {
                let list: Vec<PbProbe> = probes.borrow_and_update().iter().map(|p| p.to_pb()).collect();
                status.send_if_modified(|s| {
                    let changed = s.probes != list;
                    if changed {
                        tracing::info!(probes = list.len(), "probe list changed; reporting it to the broker");
                        s.probes = list;
                    }
                    changed
                });
                tokio::select! {
                    changed = probes.changed() => if changed.is_err() { break },
                    _ = closing.wait_for(|c| *c) => break,
                }
            }
        }));
    }

    /// What the link reports now.
    pub fn status(&self) -> StationStatus {
        self.status.borrow().clone()
    }

    /// Hand a runner event to the link: stages become (throttled) `DeviceProgress`, finished
    /// devices `DeviceDone`. Never blocks.
    pub fn report(&self, event: &RunEvent) {
        if !matches!(event, RunEvent::ProbeDone { .. }) {
            let _ = self.events.send(event.clone());
        }
    }

    /// The endpoint the stream is attached to now, `None` while (re)connecting.
    pub fn attached(&self) -> Option<String> {
        self.attached.borrow().clone()
    }

    /// Watch [`StationLink::attached`].
    pub fn subscribe_attached(&self) -> watch::Receiver<Option<String>> {
        self.attached.clone()
    }

    /// Close the stream: when attached, send what is queued and a last heartbeat, then end the
    /// stream (waiting at most `timeout`); when not, stop reconnecting.
    pub async fn close(mut self, timeout: Duration) {
        let _ = self.closing.send(true);
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(timeout, &mut task).await.is_err()
        {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for StationLink {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        for f in &self.followers {
            f.abort();
        }
    }
}

/// Per-probe progress state: the device being installed and the last progress sent.
#[derive(Debug, Default)]
struct ProbeProgress {
    device_id: String,
    stage: &'static str,
    last_sent: Option<Instant>,
}

/// Turns runner events into `DeviceProgress` / `DeviceDone`, throttling progress.
#[derive(Debug, Default)]
struct Tracker {
    probes: HashMap<String, ProbeProgress>,
}

/// The stage name of `DeviceProgress` and its byte counts.
fn stage_of(event: &StageEvent) -> (&'static str, u64, u64) {
    match event {
        StageEvent::Identify => ("identify", 0, 0),
        StageEvent::Licence { .. } => ("licence", 0, 0),
        StageEvent::Image => ("image", 0, 0),
        StageEvent::WaitingForBroker => ("waiting for broker", 0, 0),
        StageEvent::JournalFault { .. } => ("journal not writable", 0, 0),
        StageEvent::Install { stage, done, total } => match stage {
            InstallStage::SetLicence
            | InstallStage::SetImageHeader
            | InstallStage::WriteArea { .. }
            | InstallStage::Install => ("install", *done, *total),
            InstallStage::Verify | InstallStage::Finished => ("verify", *done, *total),
        },
    }
}

fn done_message(outcome: &DeviceOutcome) -> (bool, String) {
    match outcome {
        DeviceOutcome::Installed { crc: Some(crc), .. } => (true, format!("installed, flash CRC {crc:#010x} verified")),
        DeviceOutcome::Installed { crc: None, .. } => (true, "installed".to_owned()),
        DeviceOutcome::Refused { reason, message, .. } => (false, format!("refused {reason}: {message}")),
        DeviceOutcome::Failed { status_code, message, .. } => {
            (false, format!("failed (status {status_code:#06x}): {message}"))
        }
        DeviceOutcome::BrokerUnreachable { message, .. } => {
            (false, format!("not installed, stopped while waiting for a broker: {message}"))
        }
        DeviceOutcome::Locked { message } => (false, format!("not installed: {message}")),
    }
}

impl Tracker {
    /// The message to send for `event` at `now`, if any.
    fn on_event(&mut self, event: RunEvent, now: Instant, interval: Duration) -> Option<agent_message::Msg> {
        match event {
            RunEvent::Waiting { probe } | RunEvent::ProbeDone { probe } => {
                self.probes.remove(&probe);
                None
            }
            RunEvent::Stage { probe, event, .. } => {
                let p = self.probes.entry(probe.clone()).or_default();
                if let StageEvent::Licence { device_id } = &event {
                    p.device_id.clone_from(device_id);
                }
                let (stage, done, total) = stage_of(&event);
                let due = p.stage != stage || p.last_sent.is_none_or(|t| now.duration_since(t) >= interval);
                if !due {
                    return None;
                }
                p.stage = stage;
                p.last_sent = Some(now);
                Some(agent_message::Msg::Progress(DeviceProgress {
                    probe_id: probe,
                    device_id: p.device_id.clone(),
                    stage: stage.to_owned(),
                    done,
                    total,
                }))
            }
            RunEvent::Finished { probe, outcome, .. } => {
                let known = self.probes.remove(&probe).map(|p| p.device_id).unwrap_or_default();
                let (ok, message) = done_message(&outcome);
                Some(agent_message::Msg::Done(DeviceDone {
                    device_id: outcome.device_id().map_or(known, str::to_owned),
                    probe_id: probe,
                    ok,
                    message,
                }))
            }
        }
    }
}

/// How a session ended.
enum SessionEnd {
    /// [`StationLink::close`] was called.
    Closed,
    /// The stream failed or ended; `attached` when it had been opened, `healthy` when it had been
    /// up long enough (or the broker had spoken) to start the backoff over.
    Failed { error: String, attached: bool, healthy: bool },
}

struct LinkTask {
    channels: Vec<(String, Channel)>,
    opts: LinkOptions,
    commands: mpsc::UnboundedSender<Command>,
    events: mpsc::UnboundedReceiver<RunEvent>,
    status: watch::Receiver<StationStatus>,
    attached: watch::Sender<Option<String>>,
    closing: watch::Receiver<bool>,
    tracker: Tracker,
    pending_done: VecDeque<AgentMessage>,
}

impl LinkTask {
    async fn run(mut self) {
        let n = self.channels.len();
        let mut idx = 0;
        let mut failures: u32 = 0;
        loop {
            if *self.closing.borrow() {
                return;
            }
            let (endpoint, channel) = self.channels[idx].clone();
            match self.session(&endpoint, channel).await {
                SessionEnd::Closed => return,
                SessionEnd::Failed { error, attached, healthy } => {
                    self.attached.send_replace(None);
                    metrics::gauge!("flashgate_agent_station_attached").set(0.0);
                    if healthy {
                        failures = 0;
                    }
                    if attached {
                        tracing::warn!(%endpoint, %error, "station stream to the broker lost; reconnecting");
                    } else if failures == 0 || failures.is_multiple_of(10) {
                        tracing::warn!(%endpoint, failures, %error, "cannot attach to the broker; retrying");
                    } else {
                        tracing::debug!(%endpoint, failures, %error, "station stream: attach failed");
                    }
                    let delay = self.opts.backoff(failures);
                    failures = failures.saturating_add(1);
                    if n > 1 {
                        let next = (idx + 1) % n;
                        tracing::info!(from = %endpoint, to = %self.channels[next].0, "station stream: trying the next broker");
                        idx = next;
                    }
                    if self.wait_disconnected(delay).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sleep `delay` while disconnected: progress is dropped, the last `DeviceDone`s kept. True
    /// when the link is being closed.
    async fn wait_disconnected(&mut self, delay: Duration) -> bool {
        let deadline = tokio::time::sleep(delay);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => return false,
                () = closed(&mut self.closing) => return true,
                ev = self.events.recv() => match ev {
                    Some(ev) => self.queue_offline(ev),
                    // The handle is gone: nothing more to say.
                    None => return true,
                },
            }
        }
    }

    fn queue_offline(&mut self, ev: RunEvent) {
        if let Some(m @ agent_message::Msg::Done(_)) =
            self.tracker.on_event(ev, Instant::now(), self.opts.progress_interval)
        {
            if self.pending_done.len() == MAX_PENDING_DONE {
                self.pending_done.pop_front();
            }
            self.pending_done.push_back(msg(m));
        }
    }

    /// One Attach stream, from connect to its end.
    async fn session(&mut self, endpoint: &str, channel: Channel) -> SessionEnd {
        let failed = |error: String, healthy: bool| SessionEnd::Failed { error, attached: false, healthy };
        let (tx, rx) = mpsc::channel::<AgentMessage>(OUTBOUND_BUFFER);
        // What Register says is the baseline: a change made while the Attach call is in flight is
        // then reported by the first heartbeat check below.
        let (register, mut last_headline) = {
            let s = self.status.borrow_and_update();
            (s.register(&self.opts.agent_version), s.headline())
        };
        if tx.try_send(register).is_err() {
            return failed("cannot queue Register".into(), false);
        }
        let mut client = StationServiceClient::new(channel);
        let attach = client.attach(ReceiverStream::new(rx));
        let mut inbound = tokio::select! {
            r = tokio::time::timeout(self.opts.attach_timeout, attach) => match r {
                Ok(Ok(resp)) => resp.into_inner(),
                Ok(Err(status)) => {
                    if flashgate_proto::tls_alert::auth_failure(&status).is_some() {
                        // Not an outage: said at every try, whatever the backoff count.
                        tracing::warn!(%endpoint, reason = %flashgate_proto::errors::describe_status(&status), "the broker refuses this station; retrying with backoff");
                    }
                    return failed(flashgate_proto::errors::describe_status(&status), false);
                }
                Err(_) => return failed(format!("no answer to Attach within {:?}", self.opts.attach_timeout), false),
            },
            () = closed(&mut self.closing) => return SessionEnd::Closed,
        };
        let started = Instant::now();
        let mut heard = false;
        self.attached.send_replace(Some(endpoint.to_owned()));
        metrics::gauge!("flashgate_agent_station_attached").set(1.0);
        metrics::counter!("flashgate_agent_station_attaches_total").increment(1);
        tracing::info!(%endpoint, "station attached to the broker");
        while let Some(done) = self.pending_done.pop_front() {
            if tx.try_send(done).is_err() {
                break;
            }
        }
        let hb = self.opts.heartbeat_interval.max(Duration::from_millis(1));
        let mut heartbeat = tokio::time::interval_at(Instant::now() + hb, hb);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let healthy = |heard: bool| heard || started.elapsed() >= hb;
        let failed = |error: String, healthy: bool| SessionEnd::Failed { error, attached: true, healthy };
        loop {
            let outgoing: Option<AgentMessage> = tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(m)) => {
                        heard = true;
                        self.on_broker_message(endpoint, m);
                        None
                    }
                    Ok(None) => return failed("the broker ended the stream".into(), healthy(heard)),
                    Err(status) => return failed(flashgate_proto::errors::describe_status(&status), healthy(heard)),
                },
                _ = heartbeat.tick() => {
                    let s = self.status.borrow_and_update();
                    last_headline = s.headline();
                    Some(s.heartbeat())
                },
                changed = self.status.changed() => {
                    if changed.is_err() {
                        // The handle is gone.
                        return SessionEnd::Closed;
                    }
                    let s = self.status.borrow_and_update();
                    let now = s.headline();
                    if now == last_headline {
                        None
                    } else {
                        last_headline = now;
                        heartbeat.reset();
                        Some(s.heartbeat())
                    }
                },
                ev = self.events.recv() => match ev {
                    Some(ev) => self.tracker.on_event(ev, Instant::now(), self.opts.progress_interval).map(msg),
                    None => return SessionEnd::Closed,
                },
                () = closed(&mut self.closing) => {
                    self.finish(&tx);
                    drop(tx);
                    // Let the broker see the end of our side; its answer ends the stream.
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        while let Ok(Some(_)) = inbound.message().await {}
                    })
                    .await;
                    return SessionEnd::Closed;
                },
            };
            if let Some(m) = outgoing
                && let Err(e) = tx.try_send(m)
            {
                // The broker does not read: the connection is as good as dead.
                return failed(format!("the broker stopped reading the stream ({e})"), healthy(heard));
            }
        }
    }

    /// Closing: send every queued event and a last heartbeat.
    fn finish(&mut self, tx: &mpsc::Sender<AgentMessage>) {
        while let Ok(ev) = self.events.try_recv() {
            if let Some(m) = self.tracker.on_event(ev, Instant::now(), self.opts.progress_interval) {
                let _ = tx.try_send(msg(m));
            }
        }
        let _ = tx.try_send(self.status.borrow().heartbeat());
    }

    fn on_broker_message(&self, endpoint: &str, m: BrokerMessage) {
        let cmd = match m.msg {
            Some(broker_message::Msg::Assign(a)) if a.batch_id.is_empty() => {
                tracing::warn!(%endpoint, "the broker assigned an empty batch id; treated as a pause");
                Command::Pause("the broker assigned no batch".into())
            }
            Some(broker_message::Msg::Assign(a)) => Command::Assign(a.batch_id),
            Some(broker_message::Msg::Pause(p)) => Command::Pause(p.reason),
            None => {
                tracing::warn!(%endpoint, "empty message from the broker on the station stream; ignored");
                return;
            }
        };
        tracing::debug!(%endpoint, ?cmd, "station command");
        let _ = self.commands.send(cmd);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::SocketAddr;
    use std::sync::Mutex;

    use flashgate_proto::v1::station_service_server::{StationService, StationServiceServer};
    use flashgate_proto::v1::{Assign, Pause};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
    use tonic::transport::{Endpoint, Server};
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    /// What the fake broker saw.
    #[derive(Default)]
    pub(crate) struct Seen {
        /// (session number, message), in arrival order.
        pub(crate) messages: Vec<(usize, agent_message::Msg)>,
        /// Senders to the open sessions' streams.
        pub(crate) sessions: Vec<mpsc::UnboundedSender<Result<BrokerMessage, Status>>>,
        /// Sessions whose request stream ended.
        pub(crate) ended: Vec<usize>,
    }

    /// A fake `StationService`: records every message; `initial` is sent at the start of each
    /// session (the broker repeats the current assignment).
    #[derive(Clone, Default)]
    pub(crate) struct FakeStation {
        pub(crate) seen: Arc<Mutex<Seen>>,
        pub(crate) initial: Arc<Mutex<Option<BrokerMessage>>>,
        changed: Arc<tokio::sync::Notify>,
    }

    #[tonic::async_trait]
    impl StationService for FakeStation {
        type AttachStream = UnboundedReceiverStream<Result<BrokerMessage, Status>>;

        async fn attach(
            &self,
            request: Request<Streaming<AgentMessage>>,
        ) -> Result<Response<Self::AttachStream>, Status> {
            let mut inbound = request.into_inner();
            let (tx, rx) = mpsc::unbounded_channel();
            if let Some(m) = self.initial.lock().unwrap().clone() {
                tx.send(Ok(m)).unwrap();
            }
            let session = {
                let mut seen = self.seen.lock().unwrap();
                seen.sessions.push(tx);
                seen.sessions.len() - 1
            };
            let me = self.clone();
            tokio::spawn(async move {
                while let Ok(Some(m)) = inbound.message().await {
                    if let Some(m) = m.msg {
                        me.seen.lock().unwrap().messages.push((session, m));
                        me.changed.notify_waiters();
                    }
                }
                me.seen.lock().unwrap().ended.push(session);
                me.changed.notify_waiters();
            });
            Ok(Response::new(UnboundedReceiverStream::new(rx)))
        }
    }

    impl FakeStation {
        /// Push `m` to the latest session.
        pub(crate) fn push(&self, m: broker_message::Msg) {
            let seen = self.seen.lock().unwrap();
            seen.sessions.last().unwrap().send(Ok(BrokerMessage { msg: Some(m) })).unwrap();
        }

        pub(crate) fn assign(&self, batch: &str) {
            self.push(broker_message::Msg::Assign(Assign { batch_id: batch.into() }));
        }

        pub(crate) fn pause(&self, reason: &str) {
            self.push(broker_message::Msg::Pause(Pause { reason: reason.into() }));
        }

        pub(crate) fn messages(&self) -> Vec<(usize, agent_message::Msg)> {
            self.seen.lock().unwrap().messages.clone()
        }

        /// Wait (at most 10 s) until `pred` holds for the messages seen.
        pub(crate) async fn wait_for(&self, what: &str, pred: impl Fn(&Seen) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let notified = self.changed.notified();
                if pred(&self.seen.lock().unwrap()) {
                    return;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    panic!("timed out waiting for {what}; seen {:?}", self.seen.lock().unwrap().messages);
                }
            }
        }

        /// Wait until a message matching `pred` arrives after the first `skip` messages; returns it.
        pub(crate) async fn next_matching(
            &self,
            skip: usize,
            what: &str,
            pred: impl Fn(&agent_message::Msg) -> bool,
        ) -> agent_message::Msg {
            self.wait_for(what, |s| s.messages.iter().skip(skip).any(|(_, m)| pred(m))).await;
            self.messages().into_iter().skip(skip).map(|(_, m)| m).find(|m| pred(m)).unwrap()
        }
    }

    /// A running fake server; dropping `stop` (or sending on it) shuts it down.
    pub(crate) struct FakeServer {
        pub(crate) addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<()>,
    }

    impl FakeServer {
        pub(crate) async fn start(fake: FakeStation, addr: Option<SocketAddr>) -> Self {
            let listener = TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap())).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                Server::builder()
                    .add_service(StationServiceServer::new(fake))
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
            FakeServer { addr, stop: Some(stop), task }
        }

        /// Shut down: stop accepting, end every stream with UNAVAILABLE (also those opened while
        /// shutting down), wait for the server.
        pub(crate) async fn kill(mut self, fake: &FakeStation) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.task.is_finished() {
                for s in &fake.seen.lock().unwrap().sessions {
                    let _ = s.send(Err(Status::unavailable("broker restarting")));
                }
                assert!(Instant::now() < deadline, "the fake station server does not stop");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (&mut self.task).await.unwrap();
        }
    }

    pub(crate) fn channel(addr: SocketAddr) -> (String, Channel) {
        let uri = format!("http://{addr}");
        let ch = Endpoint::from_shared(uri.clone()).unwrap().connect_timeout(Duration::from_secs(2)).connect_lazy();
        (uri, ch)
    }

    pub(crate) fn fast() -> LinkOptions {
        LinkOptions {
            heartbeat_interval: Duration::from_millis(50),
            progress_interval: Duration::from_millis(500),
            reconnect_initial: Duration::from_millis(10),
            reconnect_max: Duration::from_millis(100),
            attach_timeout: Duration::from_secs(2),
            ..LinkOptions::default()
        }
    }

    pub(crate) fn probes() -> Vec<PbProbe> {
        vec![
            PbProbe { probe_id: "p1".into(), kind: "tcp".into(), port: "tcp://127.0.0.1:7001".into() },
            PbProbe { probe_id: "p2".into(), kind: "tcp".into(), port: "tcp://127.0.0.1:7002".into() },
        ]
    }

    fn is_register(m: &agent_message::Msg) -> bool {
        matches!(m, agent_message::Msg::Register(_))
    }

    fn is_heartbeat(m: &agent_message::Msg) -> bool {
        matches!(m, agent_message::Msg::Heartbeat(_))
    }

    async fn recv_cmd(link: &mut StationLink) -> Command {
        tokio::time::timeout(Duration::from_secs(10), link.recv()).await.unwrap().unwrap()
    }

    /// A probe plugged in (or removed) after the link started is reported at once, in a heartbeat.
    #[tokio::test]
    async fn probe_changes_are_reported_as_they_happen() {
        use crate::bootloader::TargetAddr;
        use crate::pipeline::ProbeTarget;
        let target = |id: &str, port: u16| ProbeTarget {
            id: id.into(),
            kind: "tcp".into(),
            addr: TargetAddr::Tcp(format!("127.0.0.1:{port}")),
        };
        let fake = FakeStation::default();
        let server = FakeServer::start(fake.clone(), None).await;
        let opts = LinkOptions { heartbeat_interval: Duration::from_secs(3600), ..fast() };
        let (tx, rx) = watch::channel(vec![target("p1", 7001)]);
        let mut link = StationLink::from_channels(vec![channel(server.addr)], Vec::new(), opts).unwrap();
        link.follow_probes(rx);
        let ids = |h: &flashgate_proto::v1::Heartbeat| h.probes.iter().map(|p| p.probe_id.clone()).collect::<Vec<_>>();
        let heartbeat_with = |want: Vec<&'static str>| {
            move |s: &Seen| {
                s.messages.iter().any(|(_, m)| matches!(m, agent_message::Msg::Heartbeat(h) if ids(h) == want))
            }
        };
        fake.wait_for("a heartbeat naming p1", heartbeat_with(vec!["p1"])).await;
        tx.send_replace(vec![target("p1", 7001), target("p2", 7002)]);
        fake.wait_for("a heartbeat naming p1 and p2", heartbeat_with(vec!["p1", "p2"])).await;
        tx.send_replace(vec![target("p2", 7002)]);
        fake.wait_for("a heartbeat naming only p2", heartbeat_with(vec!["p2"])).await;
        assert_eq!(link.status().probes.len(), 1);
        link.close(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn registers_first_then_heartbeats_and_delivers_commands() {
        let fake = FakeStation::default();
        let server = FakeServer::start(fake.clone(), None).await;
        let mut link = StationLink::from_channels(vec![channel(server.addr)], probes(), fast()).unwrap();

        fake.wait_for("three heartbeats", |s| s.messages.iter().filter(|(_, m)| is_heartbeat(m)).count() >= 3).await;
        let msgs = fake.messages();
        let agent_message::Msg::Register(r) = &msgs[0].1 else { panic!("first message is not Register: {msgs:?}") };
        assert_eq!(r.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(r.probes, probes());
        assert_eq!(r.current_batch, "");
        assert_eq!(msgs.iter().filter(|(_, m)| is_register(m)).count(), 1);
        let agent_message::Msg::Heartbeat(h) = &msgs[1].1 else { panic!("{msgs:?}") };
        assert_eq!(h.probes, probes());
        assert!(!h.running);
        assert_eq!(link.attached(), Some(format!("http://{}", server.addr)));

        fake.assign("b-1");
        assert_eq!(recv_cmd(&mut link).await, Command::Assign("b-1".into()));
        fake.pause("operator");
        assert_eq!(recv_cmd(&mut link).await, Command::Pause("operator".into()));

        // A status change is reported at once.
        let before = fake.messages().len();
        link.update_status(|s| {
            s.current_batch = "b-1".into();
            s.running = true;
            s.devices_ok = 3;
        });
        let hb = fake
            .next_matching(
                before,
                "a running heartbeat",
                |m| matches!(m, agent_message::Msg::Heartbeat(h) if h.running && h.current_batch == "b-1"),
            )
            .await;
        let agent_message::Msg::Heartbeat(hb) = hb else { unreachable!() };
        assert_eq!(hb.devices_ok, 3);

        link.close(Duration::from_secs(5)).await;
        fake.wait_for("the stream to end", |s| s.ended == [0]).await;
    }

    #[tokio::test]
    async fn reconnects_and_registers_again_after_a_broker_restart() {
        let fake = FakeStation::default();
        *fake.initial.lock().unwrap() =
            Some(BrokerMessage { msg: Some(broker_message::Msg::Assign(Assign { batch_id: "b-7".into() })) });
        let server = FakeServer::start(fake.clone(), None).await;
        let addr = server.addr;
        let mut link = StationLink::from_channels(vec![channel(addr)], probes(), fast()).unwrap();
        assert_eq!(recv_cmd(&mut link).await, Command::Assign("b-7".into()));
        link.update_status(|s| s.current_batch = "b-7".into());

        server.kill(&fake).await;
        let mut attached = link.subscribe_attached();
        tokio::time::timeout(Duration::from_secs(5), attached.wait_for(Option::is_none)).await.unwrap().unwrap();
        // Down for a while: the link keeps trying with backoff.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let server = FakeServer::start(fake.clone(), Some(addr)).await;

        // The broker repeats the assignment on the new session.
        assert_eq!(recv_cmd(&mut link).await, Command::Assign("b-7".into()));
        fake.wait_for("a heartbeat on the second session", |s| {
            s.messages.iter().any(|(n, m)| *n == 1 && is_heartbeat(m))
        })
        .await;
        let second: Vec<_> = fake.messages().into_iter().filter(|(n, _)| *n == 1).collect();
        let agent_message::Msg::Register(r) = &second[0].1 else { panic!("{second:?}") };
        assert_eq!(r.current_batch, "b-7");
        assert_eq!(r.probes, probes());
        assert_eq!(link.attached(), Some(format!("http://{addr}")));
        link.close(Duration::from_secs(5)).await;
        server.kill(&fake).await;
    }

    #[tokio::test]
    async fn fails_over_to_the_next_endpoint() {
        // A port nothing listens on, then a live fake.
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let fake = FakeStation::default();
        let server = FakeServer::start(fake.clone(), None).await;
        let link = StationLink::from_channels(vec![channel(dead), channel(server.addr)], probes(), fast()).unwrap();
        fake.wait_for("Register", |s| s.messages.iter().any(|(_, m)| is_register(m))).await;
        let mut attached = link.subscribe_attached();
        let to =
            tokio::time::timeout(Duration::from_secs(5), attached.wait_for(Option::is_some)).await.unwrap().unwrap();
        assert_eq!(*to, Some(format!("http://{}", server.addr)));
        drop(to);
        link.close(Duration::from_secs(5)).await;
        server.kill(&fake).await;
    }

    fn stage(probe: &str, event: StageEvent) -> RunEvent {
        RunEvent::Stage { probe: probe.into(), attempt: 1, event }
    }

    fn install(done: u64) -> StageEvent {
        StageEvent::Install { stage: InstallStage::WriteArea { index: 1, area_type: area_type() }, done, total: 4096 }
    }

    fn area_type() -> flashgate_common::sfi::AreaType {
        flashgate_common::sfi::AreaType::Firmware
    }

    #[tokio::test(start_paused = true)]
    async fn progress_is_throttled_per_probe_but_stage_changes_pass() {
        let mut t = Tracker::default();
        let iv = Duration::from_millis(500);
        let now = Instant::now();
        let sent = |t: &mut Tracker, ev, at| t.on_event(ev, at, iv);
        assert!(sent(&mut t, RunEvent::Waiting { probe: "p1".into() }, now).is_none());
        assert!(sent(&mut t, stage("p1", StageEvent::Identify), now).is_some());
        let m = sent(&mut t, stage("p1", StageEvent::Licence { device_id: "d1".into() }), now).unwrap();
        assert!(matches!(m, agent_message::Msg::Progress(p) if p.stage == "licence" && p.device_id == "d1"));
        assert!(sent(&mut t, stage("p1", StageEvent::Image), now).is_some());
        // Install chunks: the first passes (stage change), the next ones within 500 ms do not.
        let m = sent(&mut t, stage("p1", install(1024)), now).unwrap();
        assert!(
            matches!(m, agent_message::Msg::Progress(p) if p.stage == "install" && p.done == 1024 && p.total == 4096)
        );
        assert!(sent(&mut t, stage("p1", install(2048)), now + Duration::from_millis(100)).is_none());
        // Another probe has its own clock.
        assert!(sent(&mut t, stage("p2", install(10)), now + Duration::from_millis(100)).is_some());
        assert!(sent(&mut t, stage("p1", install(3072)), now + Duration::from_millis(499)).is_none());
        let m = sent(&mut t, stage("p1", install(4096)), now + Duration::from_millis(500)).unwrap();
        assert!(matches!(m, agent_message::Msg::Progress(p) if p.done == 4096 && p.device_id == "d1"));
        let verify = StageEvent::Install { stage: InstallStage::Verify, done: 4096, total: 4096 };
        assert!(sent(&mut t, stage("p1", verify), now + Duration::from_millis(501)).is_some());
        let outcome = DeviceOutcome::Installed { device_id: "d1".into(), crc: Some(0xdead_beef) };
        let m = sent(&mut t, RunEvent::Finished { probe: "p1".into(), attempts: 1, outcome }, now).unwrap();
        let agent_message::Msg::Done(d) = m else { panic!() };
        assert_eq!((d.probe_id.as_str(), d.device_id.as_str(), d.ok), ("p1", "d1", true));
        assert!(d.message.contains("0xdeadbeef"), "{}", d.message);
        // A failure before the certificate was read: the device is unknown.
        let outcome = DeviceOutcome::Failed { device_id: None, status_code: 0xffff, message: "no sync".into() };
        let m = sent(&mut t, RunEvent::Finished { probe: "p2".into(), attempts: 3, outcome }, now).unwrap();
        let agent_message::Msg::Done(d) = m else { panic!() };
        assert_eq!((d.device_id.as_str(), d.ok), ("", false));
        assert!(d.message.contains("no sync"));
    }

    #[tokio::test]
    async fn progress_and_done_reach_the_broker_and_dones_survive_an_outage() {
        let fake = FakeStation::default();
        let server = FakeServer::start(fake.clone(), None).await;
        let addr = server.addr;
        let link = StationLink::from_channels(vec![channel(addr)], probes(), fast()).unwrap();
        fake.wait_for("Register", |s| s.messages.iter().any(|(_, m)| is_register(m))).await;
        link.report(&stage("p1", StageEvent::Licence { device_id: "d1".into() }));
        link.report(&stage("p1", install(100)));
        link.report(&stage("p1", install(200)));
        let outcome = DeviceOutcome::Refused {
            device_id: "d1".into(),
            reason: "QUOTA_EXHAUSTED".into(),
            message: "8 of 8".into(),
        };
        link.report(&RunEvent::Finished { probe: "p1".into(), attempts: 1, outcome });
        fake.wait_for("DeviceDone", |s| s.messages.iter().any(|(_, m)| matches!(m, agent_message::Msg::Done(_)))).await;
        let progress: Vec<_> = fake
            .messages()
            .into_iter()
            .filter_map(|(_, m)| match m {
                agent_message::Msg::Progress(p) => Some((p.stage, p.done)),
                _ => None,
            })
            .collect();
        assert_eq!(progress, [("licence".to_owned(), 0), ("install".to_owned(), 100)]);

        // Down: a device finishes meanwhile; its DeviceDone follows the next Register.
        server.kill(&fake).await;
        let mut attached = link.subscribe_attached();
        tokio::time::timeout(Duration::from_secs(5), attached.wait_for(Option::is_none)).await.unwrap().unwrap();
        link.report(&stage("p2", install(1)));
        let outcome = DeviceOutcome::Installed { device_id: "d2".into(), crc: None };
        link.report(&RunEvent::Finished { probe: "p2".into(), attempts: 1, outcome });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let server = FakeServer::start(fake.clone(), Some(addr)).await;
        fake.wait_for("the replayed DeviceDone", |s| {
            s.messages.iter().any(|(n, m)| *n == 1 && matches!(m, agent_message::Msg::Done(d) if d.device_id == "d2"))
        })
        .await;
        let second: Vec<_> = fake.messages().into_iter().filter(|(n, _)| *n == 1).map(|(_, m)| m).collect();
        assert!(is_register(&second[0]), "{second:?}");
        assert!(
            !second.iter().any(|m| matches!(m, agent_message::Msg::Progress(_))),
            "stale progress sent: {second:?}"
        );
        link.close(Duration::from_secs(5)).await;
        server.kill(&fake).await;
    }

    #[test]
    fn no_endpoints_is_an_error() {
        let err = StationLink::from_channels(Vec::new(), Vec::new(), LinkOptions::default()).unwrap_err();
        assert!(matches!(err, StationError::NoEndpoints));
    }
}
