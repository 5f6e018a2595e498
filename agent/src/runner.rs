//! Running a batch on every probe of the station at once: one task per probe, one device per probe at
//! a time, at most `max_parallel` installs in flight. Each probe waits for a responding bootloader,
//! identifies the device, and installs it unless this run already handled it; a failed install is
//! retried (same licence, no quota) up to `max_attempts`. A device for which no broker answered (a
//! network cut, every broker down) is not failed: it waits on its fixture, tried again with growing
//! pauses (up to [`BROKER_WAIT_MAX`]) until a broker answers, without using up its attempts. The run ends when every probe is done
//! ([`RunMode::OncePerProbe`]), when the batch is exhausted or closed (a board already on a fixture
//! then still gets its verdict, a refusal that consumes nothing, so every board the run saw is either
//! installed or refused), or when the operator stops it — devices already being installed finish
//! first, unless the operator then aborts them ([`Stop::abort`]): each is abandoned before INSTALL
//! and journalled as failed ([`crate::pipeline::ABORTED`]), so no result is lost.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};

use crate::pipeline::{
    DeviceOutcome, Found, PipelineContext, ProbeTarget, StageEvent, aborted, install_device, look, record_locked,
    recover_interrupted,
};

/// When a probe's run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// Each probe handles one device, then stops (fixtures with one target each, demos, tests).
    OncePerProbe,
    /// Each probe keeps installing new devices (boards swapped by the operator) until the batch is
    /// exhausted or closed, or the run is stopped.
    UntilExhausted,
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The batch to install.
    pub batch_id: String,
    /// When to stop.
    pub mode: RunMode,
    /// Installs in flight at once (across probes).
    pub max_parallel: usize,
    /// Attempts per device (failed installs are retried with the same licence).
    pub max_attempts: u32,
    /// Wait between looks for a responding bootloader.
    pub poll_interval: Duration,
}

impl RunOptions {
    /// Defaults for `batch_id`: until exhausted, 64 in parallel, 3 attempts, 250 ms polling.
    pub fn new(batch_id: impl Into<String>) -> Self {
        Self {
            batch_id: batch_id.into(),
            mode: RunMode::UntilExhausted,
            max_parallel: 64,
            max_attempts: 3,
            poll_interval: Duration::from_millis(250),
        }
    }
}

/// What the operator's display is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEvent {
    /// The probe is waiting for a device.
    Waiting {
        /// Probe id.
        probe: String,
    },
    /// Progress on the probe's current device.
    Stage {
        /// Probe id.
        probe: String,
        /// Attempt number.
        attempt: u32,
        /// The stage.
        event: StageEvent,
    },
    /// A device is done (after its last attempt).
    Finished {
        /// Probe id.
        probe: String,
        /// Attempts used.
        attempts: u32,
        /// The outcome.
        outcome: DeviceOutcome,
    },
    /// The probe has stopped.
    ProbeDone {
        /// Probe id.
        probe: String,
    },
}

/// One device's final outcome in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Probe id.
    pub probe: String,
    /// Attempts used.
    pub attempts: u32,
    /// Outcome.
    pub outcome: DeviceOutcome,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Every device, in completion order.
    pub devices: Vec<DeviceRecord>,
    /// Why the run ended early, if it did (e.g. `QUOTA_EXHAUSTED`).
    pub stopped_by: Option<String>,
}

impl RunSummary {
    /// Devices installed.
    pub fn installed(&self) -> usize {
        self.devices.iter().filter(|d| matches!(d.outcome, DeviceOutcome::Installed { .. })).count()
    }
    /// Devices refused a licence.
    pub fn refused(&self) -> usize {
        self.devices.iter().filter(|d| matches!(d.outcome, DeviceOutcome::Refused { .. })).count()
    }
    /// Readout-protected boards found on a fixture (already installed, most likely; nothing done to them).
    pub fn locked(&self) -> usize {
        self.devices.iter().filter(|d| matches!(d.outcome, DeviceOutcome::Locked { .. })).count()
    }
    /// Devices that failed, or were still waiting for a broker when the run was stopped.
    pub fn failed(&self) -> usize {
        self.devices
            .iter()
            .filter(|d| matches!(d.outcome, DeviceOutcome::Failed { .. } | DeviceOutcome::BrokerUnreachable { .. }))
            .count()
    }
}

/// How the operator ends a run: `finish` set to true takes no new device and lets the devices in
/// flight finish; `abort` set to true (after `finish`, or alone) also abandons the devices in flight
/// before INSTALL, journalling each as failed ([`crate::pipeline::ABORTED`]). A dropped sender never
/// stops or aborts.
#[derive(Debug, Clone)]
pub struct Stop {
    /// No new device; devices in flight finish.
    pub finish: watch::Receiver<bool>,
    /// Devices in flight are abandoned before INSTALL (implies `finish`).
    pub abort: watch::Receiver<bool>,
}

impl Stop {
    /// A stop that `finish` ends gracefully and nothing aborts.
    pub fn finish_only(finish: watch::Receiver<bool>) -> Self {
        let (_gone, abort) = watch::channel(false);
        Self { finish, abort }
    }
}

/// Pause between tries of a journal that cannot be written, while a probe waits for it.
pub const JOURNAL_RETRY: Duration = Duration::from_secs(1);

/// Longest pause between tries of a device that is waiting for a broker.
pub const BROKER_WAIT_MAX: Duration = Duration::from_secs(15);

/// The pause before the `n`th try (1-based) of a device waiting for a broker: 1 s doubling to [`BROKER_WAIT_MAX`].
fn broker_wait(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(4)).min(BROKER_WAIT_MAX)
}

/// Refusals after which no device of this batch can get a licence in this run.
fn ends_batch(reason: &str) -> bool {
    matches!(
        reason,
        "QUOTA_EXHAUSTED"
            | "BATCH_CLOSED"
            | "BATCH_EXPIRED"
            | "UNKNOWN_BATCH"
            | "SITE_NOT_ALLOWED"
            | "STATION_REVOKED"
            | "NOT_AUTHORISED"
            | crate::pipeline::STATION_REFUSED
    )
}

struct Shared {
    ctx: PipelineContext,
    opts: RunOptions,
    slots: Semaphore,
    exhausted: AtomicBool,
    stopped_by: std::sync::Mutex<Option<String>>,
    events: mpsc::UnboundedSender<RunEvent>,
    stop: watch::Receiver<bool>,
    abort: watch::Receiver<bool>,
}

impl Shared {
    /// Stopped by the operator, or (until-exhausted runs) the batch can issue nothing more. A
    /// once-per-probe run still visits every probe so each device gets its own answer.
    fn done(&self) -> bool {
        self.stopping() || self.batch_ended()
    }

    /// The operator stopped (or aborted) the run.
    fn stopping(&self) -> bool {
        *self.stop.borrow() || *self.abort.borrow()
    }

    /// An until-exhausted run whose batch can issue nothing more.
    fn batch_ended(&self) -> bool {
        self.opts.mode == RunMode::UntilExhausted && self.exhausted.load(Ordering::Acquire)
    }

    fn emit(&self, e: RunEvent) {
        let _ = self.events.send(e);
    }
}

/// Runs `opts.batch_id` on every probe until the run ends (see [`RunMode`]); `stop` set to true ends it
/// after in-flight devices finish. Events go to `events` (the receiver may be dropped).
pub async fn run_batch(
    ctx: PipelineContext,
    probes: Vec<ProbeTarget>,
    opts: RunOptions,
    events: mpsc::UnboundedSender<RunEvent>,
    stop: watch::Receiver<bool>,
) -> RunSummary {
    run_batch_stoppable(ctx, probes, opts, events, Stop::finish_only(stop)).await
}

/// [`run_batch`] that the operator can also abort ([`Stop`]).
pub async fn run_batch_stoppable(
    ctx: PipelineContext,
    probes: Vec<ProbeTarget>,
    opts: RunOptions,
    events: mpsc::UnboundedSender<RunEvent>,
    stop: Stop,
) -> RunSummary {
    let shared = shared(ctx, opts, events, stop);
    let mut tasks = tokio::task::JoinSet::new();
    // Fixed probes: their own stop flags never change.
    let (_never, mine) = watch::channel(false);
    for p in probes {
        tasks.spawn(probe_loop(shared.clone(), p, mine.clone()));
    }
    let mut summary = RunSummary::default();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(mut devices) => summary.devices.append(&mut devices),
            Err(e) => tracing::error!(error = %e, "probe task failed"),
        }
    }
    summary.stopped_by = shared.stopped_by.lock().unwrap_or_else(|p| p.into_inner()).clone();
    summary
}

/// [`run_batch`] over a changing set of probes (a [`crate::probe::ProbeWatcher`]'s list): a probe that
/// appears gets its loop; a probe that disappears has its loop stopped — the device it was installing
/// fails on the lost link, cleanly, and its loop ends — and a probe that comes back starts again. The
/// run ends when `stop` is set or (until-exhausted runs) the batch is exhausted, after every device in
/// flight has finished; a once-per-probe run ends when every probe seen has handled its device.
pub async fn run_batch_watching(
    ctx: PipelineContext,
    probes: watch::Receiver<Vec<ProbeTarget>>,
    opts: RunOptions,
    events: mpsc::UnboundedSender<RunEvent>,
    stop: watch::Receiver<bool>,
) -> RunSummary {
    run_batch_watching_stoppable(ctx, probes, opts, events, Stop::finish_only(stop)).await
}

/// [`run_batch_watching`] that the operator can also abort ([`Stop`]).
pub async fn run_batch_watching_stoppable(
    ctx: PipelineContext,
    mut probes: watch::Receiver<Vec<ProbeTarget>>,
    opts: RunOptions,
    events: mpsc::UnboundedSender<RunEvent>,
    stop: Stop,
) -> RunSummary {
    let mut finish = stop.finish.clone();
    let shared = shared(ctx, opts, events, stop);
    let mut tasks = tokio::task::JoinSet::new();
    let mut running: HashMap<String, (watch::Sender<bool>, ProbeTarget)> = HashMap::new();
    let mut summary = RunSummary::default();
    let mut watcher_alive = true;
    loop {
        if !shared.done() {
            let want = probes.borrow_and_update().clone();
            let wanted: HashSet<&str> = want.iter().map(|p| p.id.as_str()).collect();
            running.retain(|id, (tx, _)| {
                let keep = wanted.contains(id.as_str());
                if !keep {
                    tracing::warn!(probe = %id, "probe gone: its loop stops (a device in flight fails on the lost link)");
                    let _ = tx.send(true);
                }
                keep
            });
            for p in want {
                let changed = running.get(&p.id).is_some_and(|(_, old)| *old != p);
                if changed && let Some((tx, _)) = running.remove(&p.id) {
                    let _ = tx.send(true);
                }
                if !running.contains_key(&p.id) {
                    tracing::info!(probe = %p.id, target = %p.addr, "probe present: starting its loop");
                    let (tx, rx) = watch::channel(false);
                    running.insert(p.id.clone(), (tx, p.clone()));
                    tasks.spawn(probe_loop(shared.clone(), p, rx));
                }
            }
        }
        if tasks.is_empty() && (shared.done() || (shared.opts.mode == RunMode::OncePerProbe && !running.is_empty())) {
            break;
        }
        tokio::select! {
            changed = probes.changed(), if watcher_alive => {
                if changed.is_err() {
                    watcher_alive = false;
                }
            }
            Some(r) = tasks.join_next() => match r {
                Ok(mut devices) => summary.devices.append(&mut devices),
                Err(e) => tracing::error!(error = %e, "probe task failed"),
            },
            _ = finish.wait_for(|s| *s), if !*finish.borrow() => {}
            () = aborted(shared.abort.clone()), if !*shared.abort.borrow() => {}
            else => break,
        }
        if tasks.is_empty() && !watcher_alive && !shared.done() && running.is_empty() {
            break;
        }
    }
    summary.stopped_by = shared.stopped_by.lock().unwrap_or_else(|p| p.into_inner()).clone();
    summary
}

fn shared(ctx: PipelineContext, opts: RunOptions, events: mpsc::UnboundedSender<RunEvent>, stop: Stop) -> Arc<Shared> {
    Arc::new(Shared {
        ctx,
        slots: Semaphore::new(opts.max_parallel.max(1)),
        opts,
        exhausted: AtomicBool::new(false),
        stopped_by: std::sync::Mutex::new(None),
        events,
        stop: stop.finish,
        abort: stop.abort,
    })
}

async fn sleep_or_stop(shared: &Shared, mine: &watch::Receiver<bool>, d: Duration) {
    let mut stop = shared.stop.clone();
    let mut mine = mine.clone();
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        _ = stop.wait_for(|s| *s) => {}
        () = aborted(shared.abort.clone()) => {}
        _ = mine.wait_for(|s| *s) => {}
    }
}

/// One probe: `mine` set to true (the probe disappeared) ends it like the run's stop does.
async fn probe_loop(shared: Arc<Shared>, probe: ProbeTarget, mine: watch::Receiver<bool>) -> Vec<DeviceRecord> {
    let gone = |m: &watch::Receiver<bool>| *m.borrow();
    let mut records = Vec::new();
    let mut handled: HashSet<String> = HashSet::new();
    let mut waiting_announced = false;
    let mut locked_seen = false;
    let mut fault_announced = false;
    // A board already on the fixture when the batch runs out still gets its verdict (the broker refuses
    // it, consuming nothing), so that every board the run saw is either installed or refused; only
    // waiting for *new* boards ends with the batch. The operator's stop ends the loop at once.
    while !shared.stopping() && !gone(&mine) {
        // A result that cannot be made durable is never counted as done: while the journal cannot be
        // written no new board is taken (held results are retried; a once-per-probe run ends).
        if shared.ctx.journal.fault().is_some() {
            let journal = shared.ctx.journal.clone();
            let retried = tokio::task::spawn_blocking(move || journal.retry()).await;
            if let Ok(Err(message)) = retried {
                if !fault_announced {
                    tracing::error!(probe = %probe.id, "journal not writable: {message}; taking no new board");
                    shared.emit(RunEvent::Stage {
                        probe: probe.id.clone(),
                        attempt: 0,
                        event: StageEvent::JournalFault { message },
                    });
                    fault_announced = true;
                    waiting_announced = false;
                }
                if shared.opts.mode == RunMode::OncePerProbe || shared.batch_ended() {
                    break;
                }
                sleep_or_stop(&shared, &mine, JOURNAL_RETRY).await;
                continue;
            }
        }
        fault_announced = false;
        if !waiting_announced {
            shared.emit(RunEvent::Waiting { probe: probe.id.clone() });
            waiting_announced = true;
        }
        // A responding bootloader with a device this run has not handled yet? Its session stays
        // open into the install.
        let session = match look(&probe.addr, &shared.ctx.bootloader).await {
            Found::Device(session) => {
                locked_seen = false;
                *session
            }
            Found::Locked => {
                // A board the agent was stopped on after INSTALL took effect: its result is recovered.
                if let Some(intent) = shared.ctx.journal.interrupted(&probe.id)
                    && let Some(outcome) = recover_interrupted(&shared.ctx, &probe, &intent).await
                {
                    handled.insert(intent.device_id.clone());
                    shared.emit(RunEvent::Finished { probe: probe.id.clone(), attempts: 1, outcome: outcome.clone() });
                    records.push(DeviceRecord { probe: probe.id.clone(), attempts: 1, outcome });
                    locked_seen = true;
                    waiting_announced = false;
                    if shared.opts.mode == RunMode::OncePerProbe {
                        break;
                    }
                    continue;
                }
                // Journalled and shown once per board: it stays locked until someone takes it off.
                if !locked_seen {
                    locked_seen = true;
                    let outcome = record_locked(&shared.ctx, &probe, &shared.opts.batch_id).await;
                    tracing::warn!(probe = %probe.id, "{}", crate::pipeline::LOCKED_MESSAGE);
                    shared.emit(RunEvent::Finished { probe: probe.id.clone(), attempts: 0, outcome: outcome.clone() });
                    records.push(DeviceRecord { probe: probe.id.clone(), attempts: 0, outcome });
                    waiting_announced = false;
                    if shared.opts.mode == RunMode::OncePerProbe {
                        break;
                    }
                }
                if shared.batch_ended() {
                    break;
                }
                sleep_or_stop(&shared, &mine, shared.opts.poll_interval).await;
                continue;
            }
            Found::Nothing { .. } => {
                locked_seen = false;
                if shared.batch_ended() {
                    break;
                }
                sleep_or_stop(&shared, &mine, shared.opts.poll_interval).await;
                continue;
            }
        };
        let device = session.device.device_id.clone();
        if handled.contains(&device) {
            if shared.opts.mode == RunMode::OncePerProbe || shared.batch_ended() {
                break;
            }
            sleep_or_stop(&shared, &mine, shared.opts.poll_interval).await;
            continue;
        }
        let Ok(_slot) = shared.slots.acquire().await else { break };
        if shared.stopping() || gone(&mine) {
            break;
        }
        if shared.ctx.journal.fault().is_some() {
            // The journal failed while this board waited for a slot: it is not taken.
            continue;
        }
        let mut attempt = 1;
        let mut broker_waits = 0u32;
        let mut session = Some(session);
        let outcome = loop {
            let s2 = shared.clone();
            let pid = probe.id.clone();
            let emit = move |event: StageEvent| s2.emit(RunEvent::Stage { probe: pid.clone(), attempt, event });
            // A retry opens a new session and must find the same board (the one the licence is for).
            let current = match session.take() {
                Some(s) => s,
                None => match look(&probe.addr, &shared.ctx.bootloader).await {
                    Found::Device(s) if s.device.device_id == device => *s,
                    Found::Device(s) => {
                        tracing::warn!(probe = %probe.id, was = %device, now = %s.device.device_id, "a different board is on the fixture; leaving the previous one");
                        break DeviceOutcome::Failed {
                            device_id: Some(device.clone()),
                            status_code: crate::pipeline::HOST_FAILURE,
                            message: format!(
                                "the board was replaced by device {} before it was installed",
                                s.device.device_id
                            ),
                        };
                    }
                    other => {
                        let why = match other {
                            Found::Nothing { why } => why,
                            _ => crate::pipeline::LOCKED_MESSAGE.to_owned(),
                        };
                        let outcome = DeviceOutcome::Failed {
                            device_id: None,
                            status_code: crate::pipeline::HOST_FAILURE,
                            message: format!("device {device} no longer answers: {why}"),
                        };
                        if attempt < shared.opts.max_attempts && !shared.stopping() && !gone(&mine) {
                            attempt += 1;
                            sleep_or_stop(&shared, &mine, shared.opts.poll_interval).await;
                            continue;
                        }
                        break outcome;
                    }
                },
            };
            emit(StageEvent::Identify);
            let outcome =
                install_device(&shared.ctx, &probe, current, &shared.opts.batch_id, attempt, &emit, &shared.abort)
                    .await;
            match &outcome {
                DeviceOutcome::BrokerUnreachable { message, .. } if !shared.stopping() && !gone(&mine) => {
                    broker_waits += 1;
                    let pause = broker_wait(broker_waits);
                    if broker_waits == 1 || broker_waits.is_multiple_of(10) {
                        tracing::warn!(probe = %probe.id, tries = broker_waits, %message, ?pause, "no broker reachable; the device waits on its fixture");
                    }
                    shared.emit(RunEvent::Stage {
                        probe: probe.id.clone(),
                        attempt,
                        event: StageEvent::WaitingForBroker,
                    });
                    sleep_or_stop(&shared, &mine, pause).await;
                }
                DeviceOutcome::Failed { message, .. }
                    if attempt < shared.opts.max_attempts
                        && !shared.stopping()
                        && shared.ctx.journal.fault().is_none() =>
                {
                    tracing::warn!(probe = %probe.id, attempt, %message, "install failed; retrying with the same licence");
                    attempt += 1;
                    sleep_or_stop(&shared, &mine, shared.opts.poll_interval).await;
                }
                _ => break outcome,
            }
        };
        if let DeviceOutcome::Refused { reason, .. } = &outcome
            && ends_batch(reason)
        {
            if !shared.exhausted.swap(true, Ordering::AcqRel) {
                tracing::info!(reason = %reason, "batch can issue no more licences: finishing in-flight devices");
            }
            shared.stopped_by.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| reason.clone());
        }
        handled.insert(outcome.device_id().unwrap_or(&device).to_owned());
        shared.emit(RunEvent::Finished { probe: probe.id.clone(), attempts: attempt, outcome: outcome.clone() });
        records.push(DeviceRecord { probe: probe.id.clone(), attempts: attempt, outcome });
        waiting_announced = false;
        // The board just handled stays on the fixture, and an installed one is now readout
        // protected: that is not a new locked board (only one put there after the fixture was empty).
        locked_seen = true;
        if shared.opts.mode == RunMode::OncePerProbe {
            break;
        }
    }
    shared.emit(RunEvent::ProbeDone { probe: probe.id.clone() });
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_waits_grow_to_their_cap() {
        let waits: Vec<u64> = (1..=7).map(|n| broker_wait(n).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 15, 15, 15]);
        assert_eq!(broker_wait(u32::MAX), BROKER_WAIT_MAX);
    }
}
