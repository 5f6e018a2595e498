//! The station daemon (`flashgate agent serve`): runs whatever batch the broker assigns to this
//! station, on every probe, until the batch is exhausted, the broker pauses the station or the
//! operator stops the daemon.
//!
//! Owns the state machine between the broker's [`Command`]s (through a [`StationLink`]) and batch
//! runs ([`crate::runner::run_batch`] in [`RunMode::UntilExhausted`], one at a time, each in its own
//! task):
//!
//! - `Assign(b)` while idle starts `b`; while `b` runs it is a no-op (the broker repeats the
//!   assignment on every reconnection); while another batch runs (or is still stopping) that run is
//!   stopped — its in-flight devices finish — and `b` starts once it has ended.
//! - `Pause` stops the current run (in-flight devices finish) and forgets a pending assignment.
//! - A run that ends by itself (batch exhausted or closed) leaves the station idle until the next
//!   `Assign`.
//! - The stop signal (Ctrl-C) stops the run, waits for its in-flight devices and returns; the caller
//!   of [`serve`] then flushes the reporter and closes the link ([`run_daemon`] does both).
//!
//! Every [`RunEvent`] is counted (installed / refused / failed, for heartbeats and the summary),
//! handed to the link (progress, device results) and forwarded to the optional display. The link
//! reports the current batch and `running` until a run has ended, including while in-flight devices
//! finish after a pause. [`serve`] takes the run function as a parameter so tests drive the real
//! state machine with a scripted run.

use std::future::Future;
use std::time::Duration;

use flashgate_proto::transport::{TlsFiles, TransportError, client_config};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinError, JoinHandle};

use crate::config::AgentConfig;
use crate::pipeline::{DeviceOutcome, PipelineContext, ProbeTarget};
use crate::runner::{RunEvent, RunMode, RunOptions, RunSummary, run_batch_watching};
use crate::station::{Command, LinkOptions, StationError, StationLink};

/// How long [`run_daemon`] waits for the reporter to deliver the journal at the end.
pub const REPORTER_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`run_daemon`] waits for the link to send its last messages.
pub const LINK_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the daemon could not run (or stopped on its own).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The station certificate, key or CA did not load.
    #[error("station daemon: loading the station certificate {cert}: {source}")]
    Tls {
        /// The certificate file.
        cert: String,
        /// Why.
        source: TransportError,
    },
    /// The link to the broker could not be set up.
    #[error("station daemon: {0}")]
    Link(#[from] StationError),
    /// The link's task ended although the daemon did not close it (a bug); runs were stopped.
    #[error("station daemon: the station link to the broker stopped unexpectedly")]
    LinkStopped,
}

/// What the daemon did, since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonSummary {
    /// Runs started (one per assignment actually run).
    pub runs: u64,
    /// Devices installed.
    pub installed: u64,
    /// Devices refused a licence.
    pub refused: u64,
    /// Devices failed.
    pub failed: u64,
    /// Readout-protected boards found (nothing done to them).
    pub locked: u64,
    /// Journal entries the broker had not acknowledged when the daemon returned.
    pub unreported: usize,
}

/// The run options for `batch_id` from `[run]` (always [`RunMode::UntilExhausted`]).
pub fn run_options(cfg: &AgentConfig, batch_id: &str) -> RunOptions {
    RunOptions {
        batch_id: batch_id.to_owned(),
        mode: RunMode::UntilExhausted,
        max_parallel: cfg.run.max_parallel,
        max_attempts: cfg.run.max_attempts,
        poll_interval: cfg.run.poll_interval,
    }
}

/// The station daemon on `probes` (a changing list: probes plugged in join the run, probes removed
/// leave it): attaches to the brokers of `cfg` (station certificate of
/// `[tls]`, heartbeats every `[station] heartbeat_interval`), runs what they assign with `ctx`
/// until `stop` becomes true, then waits for in-flight devices, flushes the reporter (at most
/// [`REPORTER_FLUSH_TIMEOUT`]) and closes the link. Run events also go to `events` when given
/// (the sender is dropped on return).
pub async fn run_daemon(
    cfg: &AgentConfig,
    probes: watch::Receiver<Vec<ProbeTarget>>,
    ctx: PipelineContext,
    stop: watch::Receiver<bool>,
    events: Option<mpsc::UnboundedSender<RunEvent>>,
) -> Result<DaemonSummary, DaemonError> {
    let tls = client_config(&TlsFiles::new(&cfg.tls.cert, &cfg.tls.key, &cfg.tls.ca))
        .map_err(|source| DaemonError::Tls { cert: cfg.tls.cert.display().to_string(), source })?;
    let opts = LinkOptions { heartbeat_interval: cfg.station.heartbeat_interval, ..LinkOptions::default() };
    let mut link = StationLink::new(
        cfg.broker.endpoints.clone(),
        tls,
        cfg.broker.server_name.clone(),
        probes.borrow().iter().map(ProbeTarget::to_pb).collect(),
        opts,
    )?;
    link.follow_probes(probes.clone());
    let run_ctx = ctx.clone();
    let start = move |opts: RunOptions, events: mpsc::UnboundedSender<RunEvent>, stop: watch::Receiver<bool>| {
        run_batch_watching(run_ctx.clone(), probes.clone(), opts, events, stop)
    };
    let outcome = serve(&mut link, start, run_options(cfg, ""), stop, events).await;
    let unreported = ctx.reporter.flush(REPORTER_FLUSH_TIMEOUT).await;
    link.close(LINK_CLOSE_TIMEOUT).await;
    outcome.map(|summary| DaemonSummary { unreported, ..summary })
}

/// The run in progress.
struct Current {
    batch: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<RunSummary>,
    /// Told to stop; its in-flight devices are finishing.
    stopping: bool,
}

impl Current {
    fn request_stop(&mut self) {
        if !self.stopping {
            self.stopping = true;
            let _ = self.stop.send(true);
        }
    }
}

/// Resolves when the current run ends; never while there is none.
async fn run_ended(current: &mut Option<Current>) -> Result<RunSummary, JoinError> {
    match current {
        Some(c) => (&mut c.task).await,
        None => std::future::pending().await,
    }
}

/// Resolves with true once `stop` is true, with false when its sender is gone (no stop can come).
async fn stop_requested(stop: &mut watch::Receiver<bool>) -> bool {
    stop.wait_for(|s| *s).await.is_ok()
}

/// The daemon's state machine (see the module documentation) on an open `link`: `start` starts a
/// run (its options are `template` with the assigned batch id) and must end it soon after its stop
/// receiver turns true. Returns once `stop` is true and the current run has ended; the link stays
/// open (its status says idle) for the caller to flush and close.
pub async fn serve<F, Fut>(
    link: &mut StationLink,
    mut start: F,
    template: RunOptions,
    mut stop: watch::Receiver<bool>,
    ui: Option<mpsc::UnboundedSender<RunEvent>>,
) -> Result<DaemonSummary, DaemonError>
where
    F: FnMut(RunOptions, mpsc::UnboundedSender<RunEvent>, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = RunSummary> + Send + 'static,
{
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<RunEvent>();
    let mut current: Option<Current> = None;
    // The batch to start once the current run has ended.
    let mut next: Option<String> = None;
    let mut shutting_down = false;
    let mut stop_gone = false;
    let mut outcome = Ok(());
    let mut summary = DaemonSummary::default();

    let mut start_run = |batch: String, link: &StationLink, summary: &mut DaemonSummary| -> Current {
        tracing::info!(batch = %batch, "running batch");
        let (stop_tx, stop_rx) = watch::channel(false);
        let opts = RunOptions { batch_id: batch.clone(), ..template.clone() };
        let task = tokio::spawn(start(opts, ev_tx.clone(), stop_rx));
        summary.runs += 1;
        link.update_status(|s| {
            s.current_batch.clone_from(&batch);
            s.running = true;
        });
        Current { batch, stop: stop_tx, task, stopping: false }
    };

    loop {
        if shutting_down && current.is_none() {
            break;
        }
        tokio::select! {
            // Events first, so a run's events are all counted before its end is seen.
            biased;
            Some(ev) = ev_rx.recv() => {
                if let RunEvent::Finished { outcome, .. } = &ev {
                    let ok = matches!(outcome, DeviceOutcome::Installed { .. });
                    match outcome {
                        DeviceOutcome::Installed { .. } => summary.installed += 1,
                        DeviceOutcome::Refused { .. } => summary.refused += 1,
                        DeviceOutcome::Failed { .. } | DeviceOutcome::BrokerUnreachable { .. } => summary.failed += 1,
                        DeviceOutcome::Locked { .. } => summary.locked += 1,
                    }
                    link.update_status(|s| if ok { s.devices_ok += 1 } else { s.devices_failed += 1 });
                }
                link.report(&ev);
                if let Some(ui) = &ui {
                    let _ = ui.send(ev);
                }
            }
            ended = run_ended(&mut current), if current.is_some() => {
                let batch = current.take().map(|c| c.batch).unwrap_or_default();
                match ended {
                    Ok(run) => tracing::info!(
                        batch = %batch,
                        installed = run.installed(),
                        refused = run.refused(),
                        failed = run.failed(),
                        stopped_by = run.stopped_by.as_deref().unwrap_or("-"),
                        "run ended"
                    ),
                    Err(e) => tracing::error!(batch = %batch, error = %e, "the run's task failed"),
                }
                match next.take().filter(|_| !shutting_down) {
                    Some(b) => current = Some(start_run(b, link, &mut summary)),
                    None => {
                        link.update_status(|s| {
                            s.current_batch.clear();
                            s.running = false;
                        });
                        if !shutting_down {
                            tracing::info!("idle: waiting for the broker to assign a batch");
                        }
                    }
                }
            }
            requested = stop_requested(&mut stop), if !shutting_down && !stop_gone => {
                if requested {
                    tracing::debug!("stop requested: finishing the devices in flight");
                    shutting_down = true;
                    next = None;
                    if let Some(c) = current.as_mut() {
                        c.request_stop();
                    }
                } else {
                    stop_gone = true;
                }
            }
            cmd = link.recv(), if !shutting_down => match cmd {
                Some(Command::Assign(batch)) => match current.as_mut() {
                    Some(c) if c.batch == batch && !c.stopping => {
                        tracing::debug!(batch = %batch, "assignment repeated; already running it");
                        next = None;
                    }
                    Some(c) => {
                        tracing::info!(from = %c.batch, to = %batch, "assignment changed: finishing the devices in flight first");
                        c.request_stop();
                        next = Some(batch);
                    }
                    None => current = Some(start_run(batch, link, &mut summary)),
                },
                Some(Command::Pause(reason)) => {
                    next = None;
                    match current.as_mut() {
                        Some(c) if !c.stopping => {
                            tracing::info!(batch = %c.batch, reason = %reason, "paused: finishing the devices in flight");
                            c.request_stop();
                        }
                        _ => tracing::info!(reason = %reason, "paused"),
                    }
                }
                None => {
                    tracing::error!("the station link stopped; stopping the run");
                    outcome = Err(DaemonError::LinkStopped);
                    shutting_down = true;
                    next = None;
                    if let Some(c) = current.as_mut() {
                        c.request_stop();
                    }
                }
            },
        }
    }
    // Events sent after the last run ended (none expected), then the display's end.
    while let Ok(ev) = ev_rx.try_recv() {
        link.report(&ev);
        if let Some(ui) = &ui {
            let _ = ui.send(ev);
        }
    }
    outcome.map(|()| summary)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::{Arc, Mutex};

    use flashgate_proto::v1::agent_message::Msg;
    use tokio::time::Instant;

    use super::*;
    use crate::pipeline::StageEvent;
    use crate::station::tests::{FakeServer, FakeStation, channel, fast, probes};

    /// What the scripted runs did: (batch, started | ended).
    #[derive(Clone, Default)]
    struct Script {
        log: Arc<Mutex<Vec<(String, &'static str)>>>,
        /// The running batch ends by itself (runs dry) once this is notified.
        exhaust: Arc<tokio::sync::Notify>,
        changed: Arc<tokio::sync::Notify>,
    }

    impl Script {
        /// A run that installs one device, then waits for its stop (or "exhaustion"), then
        /// finishes one more device in flight before ending.
        fn start(
            &self,
        ) -> impl FnMut(
            RunOptions,
            mpsc::UnboundedSender<RunEvent>,
            watch::Receiver<bool>,
        ) -> std::pin::Pin<Box<dyn Future<Output = RunSummary> + Send>>
        + use<> {
            let me = self.clone();
            move |opts, events, mut stop| {
                let me = me.clone();
                Box::pin(async move {
                    let batch = opts.batch_id.clone();
                    assert_eq!(opts.mode, RunMode::UntilExhausted);
                    me.log.lock().unwrap().push((batch.clone(), "started"));
                    me.changed.notify_waiters();
                    let probe = "p1".to_owned();
                    let dev = |n: &str| format!("{batch}-{n}");
                    events.send(RunEvent::Waiting { probe: probe.clone() }).unwrap();
                    let licence = StageEvent::Licence { device_id: dev("a") };
                    events.send(RunEvent::Stage { probe: probe.clone(), attempt: 1, event: licence }).unwrap();
                    let installed = DeviceOutcome::Installed { device_id: dev("a"), crc: None };
                    events.send(RunEvent::Finished { probe: probe.clone(), attempts: 1, outcome: installed }).unwrap();
                    let exhausted = tokio::select! {
                        _ = stop.wait_for(|s| *s) => false,
                        () = me.exhaust.notified() => true,
                    };
                    // The device in flight finishes (here: refused, as the batch ran dry).
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let refused = DeviceOutcome::Refused {
                        device_id: dev("b"),
                        reason: "QUOTA_EXHAUSTED".into(),
                        message: "none left".into(),
                    };
                    events.send(RunEvent::Finished { probe: probe.clone(), attempts: 1, outcome: refused }).unwrap();
                    events.send(RunEvent::ProbeDone { probe }).unwrap();
                    me.log.lock().unwrap().push((batch, "ended"));
                    me.changed.notify_waiters();
                    RunSummary { devices: Vec::new(), stopped_by: exhausted.then(|| "QUOTA_EXHAUSTED".to_owned()) }
                })
            }
        }

        fn log(&self) -> Vec<(String, &'static str)> {
            self.log.lock().unwrap().clone()
        }

        async fn wait_log(&self, what: &str, pred: impl Fn(&[(String, &'static str)]) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let notified = self.changed.notified();
                if pred(&self.log()) {
                    return;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    panic!("timed out waiting for {what}; runs: {:?}", self.log());
                }
            }
        }
    }

    fn entry(batch: &str, what: &'static str) -> (String, &'static str) {
        (batch.to_owned(), what)
    }

    /// Waits for a heartbeat after message `skip` matching `pred`.
    async fn heartbeat(
        fake: &FakeStation,
        skip: usize,
        what: &str,
        pred: impl Fn(&flashgate_proto::v1::Heartbeat) -> bool,
    ) {
        fake.next_matching(skip, what, |m| matches!(m, Msg::Heartbeat(h) if pred(h))).await;
    }

    #[tokio::test]
    async fn assign_runs_pause_stops_switch_waits_for_in_flight_and_exhaustion_idles() {
        let fake = FakeStation::default();
        let server = FakeServer::start(fake.clone(), None).await;
        let mut link = StationLink::from_channels(vec![channel(server.addr)], probes(), fast()).unwrap();
        let script = Script::default();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (ui_tx, mut ui_rx) = mpsc::unbounded_channel();
        let start = script.start();
        let daemon = tokio::spawn(async move {
            let r = serve(&mut link, start, RunOptions::new(""), stop_rx, Some(ui_tx)).await;
            (r, link)
        });
        fake.wait_for("Register", |s| s.messages.iter().any(|(_, m)| matches!(m, Msg::Register(_)))).await;

        // Assign starts a run; heartbeats say running, with the device counted.
        fake.assign("b1");
        script.wait_log("b1 to start", |l| l == [entry("b1", "started")]).await;
        heartbeat(&fake, 0, "running b1", |h| h.running && h.current_batch == "b1" && h.devices_ok == 1).await;
        fake.wait_for("b1's DeviceDone", |s| {
            s.messages.iter().any(|(_, m)| matches!(m, Msg::Done(d) if d.device_id == "b1-a" && d.ok))
        })
        .await;
        // Repeated (as after a reconnection): no new run.
        fake.assign("b1");

        // Pause stops it after the device in flight; then idle.
        let mark = fake.messages().len();
        fake.pause("operator says stop");
        script.wait_log("b1 to end", |l| l.len() == 2).await;
        heartbeat(&fake, mark, "idle after the pause", |h| {
            !h.running && h.current_batch.is_empty() && h.devices_failed == 1
        })
        .await;
        assert_eq!(script.log(), [entry("b1", "started"), entry("b1", "ended")]);

        // Assign b2, then b3 while b2 runs: b2 finishes its device in flight before b3 starts.
        fake.assign("b2");
        script.wait_log("b2 to start", |l| l.len() == 3).await;
        fake.assign("b3");
        script.wait_log("b3 to start", |l| l.len() == 5).await;
        assert_eq!(&script.log()[2..], [entry("b2", "started"), entry("b2", "ended"), entry("b3", "started")]);
        let mark = fake.messages().len();
        heartbeat(&fake, 0, "running b3", |h| h.running && h.current_batch == "b3").await;

        // b3 runs dry by itself: idle, and nothing starts until the next Assign.
        script.exhaust.notify_one();
        script.wait_log("b3 to end", |l| l.len() == 6).await;
        heartbeat(&fake, mark, "idle after exhaustion", |h| !h.running && h.current_batch.is_empty()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(script.log().len(), 6);

        // Assign b4, then Ctrl-C: the run stops, in-flight devices finish, serve returns.
        fake.assign("b4");
        script.wait_log("b4 to start", |l| l.len() == 7).await;
        stop_tx.send(true).unwrap();
        let (summary, link) = tokio::time::timeout(Duration::from_secs(10), daemon).await.unwrap().unwrap();
        let summary = summary.unwrap();
        assert_eq!(script.log().last(), Some(&entry("b4", "ended")));
        assert_eq!(
            summary,
            DaemonSummary { runs: 4, installed: 4, refused: 4, failed: 0, locked: 0, unreported: 0 },
            "b1, b2, b3, b4: one installed and one refused each"
        );
        let status = link.status();
        assert!(!status.running && status.current_batch.is_empty());
        assert_eq!((status.devices_ok, status.devices_failed), (4, 4));
        link.close(Duration::from_secs(5)).await;
        fake.wait_for("the stream to end", |s| s.ended == [0]).await;
        // The last heartbeat (sent on close) says idle with every device counted.
        let last_hb = fake
            .messages()
            .into_iter()
            .rev()
            .find_map(|(_, m)| match m {
                Msg::Heartbeat(h) => Some(h),
                _ => None,
            })
            .unwrap();
        assert!(!last_hb.running && last_hb.devices_ok == 4 && last_hb.devices_failed == 4, "{last_hb:?}");

        // The display saw every event, and its channel closed.
        let mut finished = 0;
        while let Some(ev) = ui_rx.recv().await {
            finished += usize::from(matches!(ev, RunEvent::Finished { .. }));
        }
        assert_eq!(finished, 8);
        server.kill(&fake).await;
    }

    #[tokio::test]
    async fn stop_while_idle_returns_at_once_and_a_pending_switch_is_dropped() {
        let fake = FakeStation::default();
        let server = FakeServer::start(fake.clone(), None).await;
        let mut link = StationLink::from_channels(vec![channel(server.addr)], probes(), fast()).unwrap();
        let script = Script::default();
        let (stop_tx, stop_rx) = watch::channel(false);
        stop_tx.send(true).unwrap();
        let summary = tokio::time::timeout(
            Duration::from_secs(5),
            serve(&mut link, script.start(), RunOptions::new(""), stop_rx, None),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(summary, DaemonSummary::default());

        // Assign, then switch and pause before the first run has ended: only b1 ever runs.
        let (stop_tx, stop_rx) = watch::channel(false);
        let start = script.start();
        let daemon = tokio::spawn(async move {
            let r = serve(&mut link, start, RunOptions::new(""), stop_rx, None).await;
            (r, link)
        });
        fake.wait_for("Register", |s| s.messages.iter().any(|(_, m)| matches!(m, Msg::Register(_)))).await;
        fake.assign("b1");
        script.wait_log("b1 to start", |l| l.len() == 1).await;
        fake.assign("b2");
        fake.pause("changed my mind");
        script.wait_log("b1 to end", |l| l.len() == 2).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(script.log(), [entry("b1", "started"), entry("b1", "ended")]);
        stop_tx.send(true).unwrap();
        let (summary, link) = tokio::time::timeout(Duration::from_secs(10), daemon).await.unwrap().unwrap();
        assert_eq!(summary.unwrap().runs, 1);
        link.close(Duration::from_secs(5)).await;
        server.kill(&fake).await;
    }
}
