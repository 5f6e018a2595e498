//! The operator's view of a run: an indicatif multi-progress ([`Console`]) with one line per probe
//! (stage; a byte bar only while areas are written) and a status line per station (in flight,
//! installed, refused, failed, yield) when stderr is a terminal, every line fitted to the terminal's
//! width and cleared when its probe or the run ends; plain log lines otherwise. A finished device
//! gets one line that says how it ended with a mark (`✓ installed`, `✗ REFUSED`, `✗ FAILED`,
//! `✗ ABORTED`), never a full bar. Ctrl-C is answered at once ([`Console::interrupts`]): "finishing N
//! devices in flight; Ctrl-C again to abort them". With `--json` each device result is also one JSON
//! object on standard output ([`device_json`]). Used by `flashgate agent run`, `flashgate agent
//! serve` (one display across every batch the broker assigns) and `flashgate demo`; the summary
//! table at the end is [`summary_table`].

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use flashgate_agent::bootloader::InstallStage;
use flashgate_agent::pipeline::{DeviceOutcome, StageEvent};
use flashgate_agent::runner::{RunEvent, RunSummary, Stop};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nix::sys::termios::{LocalFlags, SetArg, Termios, tcgetattr, tcsetattr};
use tokio::sync::{mpsc, watch};

use crate::output::Table;

/// Columns assumed when the terminal does not say (and for output that is no terminal).
pub const DEFAULT_COLUMNS: usize = 80;

/// Fewest columns the layout is computed for (a narrower terminal wraps).
pub const MIN_COLUMNS: usize = 24;

/// The process's progress display on stderr, shared by every station shown (the demo has two): the
/// bars, the count of devices in flight (for the Ctrl-C answer) and the terminal's width.
#[derive(Clone)]
pub struct Console {
    multi: MultiProgress,
    tty: bool,
    in_flight: Arc<AtomicUsize>,
    /// The runs are over: Ctrl-C only stops, silently (e.g. `demo --keep` waiting for it).
    over: Arc<AtomicBool>,
    /// The terminal's settings before the bars, put back by [`Console::clear`]: while they are
    /// drawn the terminal does not echo Ctrl-C as `^C`, which would move the cursor under
    /// indicatif's feet (it leaves the cursor in the last column) and strand a bar line.
    saved: Arc<Mutex<Option<Termios>>>,
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Console {
    /// Bars on stderr when it is a terminal; plain lines otherwise.
    pub fn new() -> Self {
        let tty = std::io::stderr().is_terminal();
        let target = if tty { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let saved = if tty { quiet_ctrl_c() } else { None };
        Self {
            multi: MultiProgress::with_draw_target(target),
            tty,
            in_flight: Arc::new(AtomicUsize::new(0)),
            over: Arc::new(AtomicBool::new(false)),
            saved: Arc::new(Mutex::new(saved)),
        }
    }

    /// The terminal's columns (stderr), [`DEFAULT_COLUMNS`] when it is no terminal.
    pub fn columns(&self) -> usize {
        if !self.tty {
            return DEFAULT_COLUMNS;
        }
        match console::Term::stderr().size_checked() {
            Some((_, cols)) if cols > 0 => usize::from(cols),
            _ => DEFAULT_COLUMNS,
        }
    }

    /// A line on stderr above the bars, cut to the terminal's width (with `…`) on a terminal.
    pub fn line(&self, text: &str) {
        if self.tty {
            let fitted = fit(text, self.columns());
            if self.multi.println(&fitted).is_err() {
                eprintln!("{fitted}");
            }
        } else {
            eprintln!("{text}");
        }
    }

    /// A line on stdout (e.g. one JSON object), with the bars out of its way.
    pub fn stdout_line(&self, text: &str) {
        self.multi.suspend(|| println!("{text}"));
    }

    /// Removes every bar line from the terminal (at the end of a run) and puts the terminal's
    /// settings back.
    pub fn clear(&self) {
        let _ = self.multi.clear();
        if let Some(t) = self.saved.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &t);
        }
    }

    /// The runs are over: a Ctrl-C from now on only sets the [`Stop`]'s `finish`, without a word.
    pub fn over(&self) {
        self.over.store(true, Ordering::Release);
    }

    /// Devices being installed now, across every station shown.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Answers Ctrl-C (or SIGTERM) on the terminal at once and turns it into a [`Stop`]: the first
    /// says "stopping: finishing N devices in flight; Ctrl-C again to abort them" and sets
    /// `finish`; a second Ctrl-C sets `abort` (when `abortable`; otherwise it quits at once with
    /// status 130, as a third Ctrl-C always does).
    pub fn interrupts(&self, abortable: bool) -> Stop {
        let (finish_tx, finish) = watch::channel(false);
        let (abort_tx, abort) = watch::channel(false);
        let console = self.clone();
        tokio::spawn(async move {
            super::broker::shutdown_signal().await;
            if console.over.load(Ordering::Acquire) {
                let _ = finish_tx.send(true);
                std::future::pending::<()>().await;
            }
            let n = console.in_flight();
            let again = if abortable { "Ctrl-C again to abort them" } else { "Ctrl-C again to quit at once" };
            console.line(&format!("stopping: finishing {} in flight; {again}", devices(n)));
            let _ = finish_tx.send(true);
            if tokio::signal::ctrl_c().await.is_ok() {
                if !abortable {
                    console.clear();
                    std::process::exit(crate::exit::Exit::Interrupted as i32);
                }
                let n = console.in_flight();
                console.line(&format!("aborting {} in flight; Ctrl-C again to quit at once", devices(n)));
                let _ = abort_tx.send(true);
                if tokio::signal::ctrl_c().await.is_ok() {
                    console.clear();
                    std::process::exit(crate::exit::Exit::Interrupted as i32);
                }
            }
            // The senders stay alive: a dropped one would read as "stop waiting" to the runner.
            std::future::pending::<()>().await;
            drop((finish_tx, abort_tx));
        });
        Stop { finish, abort }
    }

    fn busy(&self, was: &mut bool, now: bool) {
        if *was != now {
            if now {
                self.in_flight.fetch_add(1, Ordering::AcqRel);
            } else {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
            *was = now;
        }
    }
}

/// Turns off the terminal's `^C` echo (ECHOCTL) when standard input is one; the settings before.
fn quiet_ctrl_c() -> Option<Termios> {
    if !std::io::stdin().is_terminal() {
        return None;
    }
    let before = tcgetattr(std::io::stdin()).ok()?;
    let mut quiet = before.clone();
    quiet.local_flags.remove(LocalFlags::ECHOCTL);
    tcsetattr(std::io::stdin(), SetArg::TCSANOW, &quiet).ok()?;
    Some(before)
}

/// `1 device` / `3 devices`.
fn devices(n: usize) -> String {
    if n == 1 { "1 device".to_owned() } else { format!("{n} devices") }
}

/// `text` cut to fit `columns - 1` characters (the last column is left free: a line that fills it
/// makes some terminals wrap), ending in `…` when cut.
pub fn fit(text: &str, columns: usize) -> String {
    let max = columns.max(MIN_COLUMNS) - 1;
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// How a probe line is laid out for a terminal width: column widths that add up to less than it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    /// The `station/probe` prefix.
    prefix: usize,
    /// The message of a probe between installs (to the end of the line).
    msg: usize,
    /// The stage word while installing.
    stage: usize,
    /// The byte bar (between brackets), when there is room.
    bar: Option<usize>,
    /// Rate and ETA after the percentage.
    rate: bool,
}

/// Width of `{msg}` while installing (`area 12 #3`).
const STAGE_COLUMNS: usize = 11;
/// `" {percent:>3}%"`.
const PERCENT_COLUMNS: usize = 5;
/// `" {binary_bytes_per_sec:>13!} {eta:>3!}"`.
const RATE_COLUMNS: usize = 18;
/// Narrowest bar worth drawing.
const MIN_BAR: usize = 6;

impl Layout {
    fn for_columns(columns: usize) -> Self {
        let usable = columns.max(MIN_COLUMNS) - 1;
        let prefix = 20.min(usable / 3);
        // prefix, space, stage, " [", bar, "]", percent
        let fixed = prefix + 1 + STAGE_COLUMNS + 2 + 1 + PERCENT_COLUMNS;
        let (bar, rate) = if usable >= fixed + RATE_COLUMNS + 16 {
            (Some(usable - fixed - RATE_COLUMNS), true)
        } else if usable >= fixed + MIN_BAR {
            (Some(usable - fixed), false)
        } else {
            (None, false)
        };
        let stage = STAGE_COLUMNS.min(usable - prefix - 1 - PERCENT_COLUMNS);
        Self { prefix, msg: usable - prefix - 1, stage, bar, rate }
    }

    /// The widest line this layout draws while installing.
    #[cfg(test)]
    fn install_width(&self) -> usize {
        let bar = self.bar.map_or(0, |b| b + 3);
        self.prefix + 1 + self.stage + bar + PERCENT_COLUMNS + if self.rate { RATE_COLUMNS } else { 0 }
    }

    /// A probe between installs: its prefix and what it is doing, no bar.
    fn idle(&self) -> String {
        format!("{{prefix:<{p}!}} {{msg:<{m}!}}", p = self.prefix, m = self.msg)
    }

    /// A probe writing areas: stage, bar, percentage, and rate and ETA when there is room.
    fn install(&self) -> String {
        let mut t = format!("{{prefix:<{p}!}} {{msg:<{s}!}}", p = self.prefix, s = self.stage);
        if let Some(b) = self.bar {
            t.push_str(&format!(" [{{bar:{b}}}]"));
        }
        t.push_str(" {percent:>3}%");
        if self.rate {
            t.push_str(" {binary_bytes_per_sec:>13!} {eta:>3!}");
        }
        t
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
}

fn stage_name(e: &StageEvent) -> String {
    match e {
        StageEvent::Identify => "identify".into(),
        StageEvent::Licence { .. } => "licence".into(),
        StageEvent::Image => "image".into(),
        StageEvent::WaitingForBroker => "waiting for a broker".into(),
        StageEvent::JournalFault { message } => format!("journal not writable: {message}"),
        StageEvent::Install { stage, .. } => match stage {
            InstallStage::SetLicence => "set licence".into(),
            InstallStage::SetImageHeader => "header".into(),
            InstallStage::WriteArea { index, .. } => format!("area {index}"),
            InstallStage::Install => "install".into(),
            InstallStage::Verify => "verify".into(),
            InstallStage::Finished => "done".into(),
        },
    }
}

/// How a device ended, in one word a script can match: `installed`, `refused`, `aborted`, `failed`,
/// `not_installed` (stopped while waiting for a broker) or `locked`.
pub fn result_word(o: &DeviceOutcome) -> &'static str {
    match o {
        DeviceOutcome::Installed { .. } => "installed",
        DeviceOutcome::Refused { .. } => "refused",
        DeviceOutcome::Failed { .. } if o.is_aborted() => "aborted",
        DeviceOutcome::Failed { .. } => "failed",
        DeviceOutcome::BrokerUnreachable { .. } => "not_installed",
        DeviceOutcome::Locked { .. } => "locked",
    }
}

/// A one-line description of an outcome, starting with a mark: `✓` installed, `✗` anything else.
pub fn outcome_words(o: &DeviceOutcome) -> String {
    match o {
        DeviceOutcome::Installed { crc: Some(c), .. } => format!("✓ installed, flash CRC {c:#010x} verified"),
        DeviceOutcome::Installed { crc: None, .. } => "✓ installed (CRC answer lost; state verified)".into(),
        DeviceOutcome::Refused { reason, message, .. } => format!("✗ REFUSED {reason}: {message}"),
        DeviceOutcome::Failed { message, .. } if o.is_aborted() => format!("✗ ABORTED: {message}"),
        DeviceOutcome::Failed { message, .. } => format!("✗ FAILED: {message}"),
        DeviceOutcome::BrokerUnreachable { message, .. } => {
            format!("✗ NOT INSTALLED: stopped while waiting for a broker ({message})")
        }
        DeviceOutcome::Locked { message } => format!("✗ not installed: {message}"),
    }
}

/// A device result as one JSON object (`agent run --json`; fields in docs/json-output.md).
pub fn device_json(station: &str, probe: &str, attempts: u32, o: &DeviceOutcome) -> serde_json::Value {
    let (reason, message, status_code, crc) = match o {
        DeviceOutcome::Installed { crc, .. } => (None, None, None, *crc),
        DeviceOutcome::Refused { reason, message, .. } => (Some(reason.as_str()), Some(message.as_str()), None, None),
        DeviceOutcome::Failed { status_code, message, .. } => (None, Some(message.as_str()), Some(*status_code), None),
        DeviceOutcome::BrokerUnreachable { message, .. } | DeviceOutcome::Locked { message } => {
            (None, Some(message.as_str()), None, None)
        }
    };
    serde_json::json!({
        "type": "device",
        "station": station,
        "probe": probe,
        "device_id": o.device_id(),
        "attempts": attempts,
        "result": result_word(o),
        "reason": reason,
        "message": message,
        "status_code": status_code,
        "flash_crc": crc,
    })
}

/// `yield 83%`, or `yield —` when no device was installed or failed (refusals do not count).
pub fn yield_words(ok: usize, failed: usize) -> String {
    if ok + failed == 0 {
        "yield —".to_owned()
    } else {
        format!("yield {:.0}%", 100.0 * ok as f64 / (ok + failed) as f64)
    }
}

/// One probe's line on the terminal.
struct ProbeLine {
    bar: ProgressBar,
    /// Drawn with the byte bar (areas being written) rather than as a stage word.
    installing: bool,
    /// A device is being handled (counted in [`Console::in_flight`]).
    busy: bool,
}

/// Consumes run events until the channel closes, drawing a line per probe (terminal) or log lines.
/// `label` prefixes every line (the station, e.g. `berlin/1`). With `json`, every finished device is
/// also one [`device_json`] line on stdout.
pub async fn display(mut events: mpsc::UnboundedReceiver<RunEvent>, label: String, console: Console, json: bool) {
    let tty = console.tty;
    let multi = console.multi.clone();
    let layout = Layout::for_columns(console.columns());
    let (idle, install) = (style(&layout.idle()), style(&layout.install()));
    let status = multi.add(ProgressBar::new_spinner());
    status.set_style(style(&format!("{{msg:<{}!}}", layout.prefix + 1 + layout.msg)));
    let mut lines: BTreeMap<String, ProbeLine> = BTreeMap::new();
    let (mut ok, mut refused, mut failed) = (0usize, 0usize, 0usize);
    let counts = |ok: usize, refused: usize, failed: usize| {
        format!("{ok} installed, {refused} refused, {failed} failed ({})", yield_words(ok, failed))
    };
    let show_status = |lines: &BTreeMap<String, ProbeLine>, ok: usize, refused: usize, failed: usize| {
        let busy = lines.values().filter(|l| l.busy).count();
        status.set_message(format!("{label}: {busy} in flight · {}", counts(ok, refused, failed)));
    };
    show_status(&lines, 0, 0, 0);
    while let Some(ev) = events.recv().await {
        let probe = match &ev {
            RunEvent::Waiting { probe }
            | RunEvent::Stage { probe, .. }
            | RunEvent::Finished { probe, .. }
            | RunEvent::ProbeDone { probe } => probe.clone(),
        };
        if let RunEvent::ProbeDone { .. } = ev {
            // The probe's line leaves the terminal (a later run of `agent serve` draws a new one).
            if let Some(mut line) = lines.remove(&probe) {
                console.busy(&mut line.busy, false);
                line.bar.finish_and_clear();
                multi.remove(&line.bar);
            }
            show_status(&lines, ok, refused, failed);
            continue;
        }
        let line = lines.entry(probe.clone()).or_insert_with(|| {
            let bar = multi.insert_before(&status, ProgressBar::new(0));
            bar.set_style(idle.clone());
            bar.set_prefix(format!("{label}/{probe}"));
            ProbeLine { bar, installing: false, busy: false }
        });
        match ev {
            RunEvent::Waiting { .. } => {
                console.busy(&mut line.busy, false);
                if line.installing {
                    line.bar.set_style(idle.clone());
                    line.installing = false;
                }
                line.bar.set_message("waiting for a device");
                if !tty {
                    eprintln!("{label}/{probe}: waiting for a device");
                }
            }
            RunEvent::Stage { attempt, event, .. } => {
                let journal_fault = matches!(event, StageEvent::JournalFault { .. });
                console.busy(&mut line.busy, !journal_fault);
                let mut msg = stage_name(&event);
                if attempt > 1 {
                    msg = format!("{msg} #{attempt}");
                }
                if let StageEvent::Install { done, total, .. } = event {
                    if !line.installing {
                        line.bar.set_style(install.clone());
                        line.installing = true;
                    }
                    line.bar.set_length(total);
                    line.bar.set_position(done);
                } else {
                    if line.installing {
                        line.bar.set_style(idle.clone());
                        line.installing = false;
                    }
                    if !tty {
                        eprintln!("{label}/{probe}: {msg}");
                    }
                }
                line.bar.set_message(msg);
            }
            RunEvent::Finished { attempts, outcome, .. } => {
                console.busy(&mut line.busy, false);
                match &outcome {
                    DeviceOutcome::Installed { .. } => ok += 1,
                    DeviceOutcome::Refused { .. } => refused += 1,
                    DeviceOutcome::Failed { .. } | DeviceOutcome::BrokerUnreachable { .. } => failed += 1,
                    DeviceOutcome::Locked { .. } => {}
                }
                // No full bar for what was not installed: the line says how the device ended.
                line.bar.set_style(idle.clone());
                line.installing = false;
                line.bar.set_message(match &outcome {
                    DeviceOutcome::Installed { .. } => "✓ installed".to_owned(),
                    DeviceOutcome::Refused { reason, .. } => format!("✗ REFUSED {reason}"),
                    DeviceOutcome::Failed { .. } if outcome.is_aborted() => "✗ ABORTED".to_owned(),
                    DeviceOutcome::Failed { .. } => "✗ FAILED".to_owned(),
                    DeviceOutcome::BrokerUnreachable { .. } => "✗ NOT INSTALLED".to_owned(),
                    DeviceOutcome::Locked { .. } => "✗ LOCKED".to_owned(),
                });
                let device = outcome.device_id().map(short_id).unwrap_or_else(|| "?".to_owned());
                console.line(&format!("{label}/{probe}: device {device} {}", outcome_words(&outcome)));
                if json {
                    console.stdout_line(&device_json(&label, &probe, attempts, &outcome).to_string());
                }
            }
            RunEvent::ProbeDone { .. } => {}
        }
        show_status(&lines, ok, refused, failed);
    }
    for (_, mut line) in std::mem::take(&mut lines) {
        console.busy(&mut line.busy, false);
        line.bar.finish_and_clear();
        multi.remove(&line.bar);
    }
    status.finish_and_clear();
    multi.remove(&status);
    console.line(&format!("{label}: {} of {} devices", counts(ok, refused, failed), ok + refused + failed));
}

/// The first 12 hex digits of a device id, with `…` (the whole id is in the table and the journal).
fn short_id(id: &str) -> String {
    if id.chars().count() > 12 { format!("{}…", id.chars().take(12).collect::<String>()) } else { id.to_owned() }
}

/// The summary table of a run (one row per device). On a terminal each line is cut to its width.
pub fn summary_table(rows: &[(String, &RunSummary)]) -> String {
    let tty = std::io::stdout().is_terminal();
    let mut t = Table::new(["station", "probe", "device", "attempts", "result"]);
    for (station, s) in rows {
        let mut devices: Vec<_> = s.devices.iter().collect();
        devices.sort_by(|a, b| a.probe.cmp(&b.probe));
        for d in devices {
            let id = d.outcome.device_id().unwrap_or("-");
            t.row([
                station.clone(),
                d.probe.clone(),
                if tty { short_id(id) } else { id.to_owned() },
                d.attempts.to_string(),
                outcome_words(&d.outcome),
            ]);
        }
    }
    let text = t.render();
    if !tty {
        return text;
    }
    let columns = match console::Term::stdout().size_checked() {
        Some((_, cols)) if cols > 0 => usize::from(cols),
        _ => DEFAULT_COLUMNS,
    };
    let mut out = String::new();
    for line in text.lines() {
        out.push_str(&fit(line, columns));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_fits_its_terminal() {
        for columns in MIN_COLUMNS..=300 {
            let l = Layout::for_columns(columns);
            assert!(l.install_width() < columns, "{columns} columns: install line {}", l.install_width());
            assert!(l.prefix + 1 + l.msg < columns, "{columns} columns: idle line");
        }
        let at80 = Layout::for_columns(80);
        assert!(at80.rate && at80.bar.is_some_and(|b| b >= 16), "80 columns show bar, rate and ETA: {at80:?}");
        assert_eq!(at80.prefix, 20);
        assert!(Layout::for_columns(40).bar.is_some(), "{:?}", Layout::for_columns(40));
        assert!(!Layout::for_columns(40).rate);
        // Narrower than the minimum: laid out for the minimum.
        assert_eq!(Layout::for_columns(10), Layout::for_columns(MIN_COLUMNS));
    }

    #[test]
    fn templates_parse() {
        for columns in [24, 40, 60, 80, 120, 200] {
            let l = Layout::for_columns(columns);
            for t in [l.idle(), l.install()] {
                assert!(ProgressStyle::with_template(&t).is_ok(), "{t}");
            }
        }
    }

    #[test]
    fn lines_are_cut_to_the_width() {
        assert_eq!(fit("short", 80), "short");
        let long = "x".repeat(200);
        let cut = fit(&long, 80);
        assert_eq!(cut.chars().count(), 79);
        assert!(cut.ends_with('…'));
        assert_eq!(fit(&"y".repeat(79), 80).chars().count(), 79);
    }

    #[test]
    fn no_yield_for_nothing() {
        assert_eq!(yield_words(0, 0), "yield —");
        assert_eq!(yield_words(3, 1), "yield 75%");
        assert_eq!(yield_words(0, 2), "yield 0%");
    }

    #[test]
    fn refusals_and_aborts_read_differently_from_installs() {
        let ok = DeviceOutcome::Installed { device_id: "d".into(), crc: Some(1) };
        let refused = DeviceOutcome::Refused {
            device_id: "d".into(),
            reason: "QUOTA_EXHAUSTED".into(),
            message: "quota 6 used".into(),
        };
        let aborted = DeviceOutcome::Failed {
            device_id: Some("d".into()),
            status_code: flashgate_agent::pipeline::HOST_FAILURE,
            message: format!("{} before INSTALL", flashgate_agent::pipeline::ABORTED),
        };
        assert!(outcome_words(&ok).starts_with("✓ installed"));
        assert!(outcome_words(&refused).starts_with("✗ REFUSED QUOTA_EXHAUSTED"));
        assert!(outcome_words(&aborted).starts_with("✗ ABORTED"));
        let j = device_json("berlin/1", "fixture-1", 1, &refused);
        assert_eq!(j["result"], "refused");
        assert_eq!(j["reason"], "QUOTA_EXHAUSTED");
        assert_eq!(device_json("s", "p", 1, &aborted)["result"], "aborted");
        assert_eq!(device_json("s", "p", 1, &ok)["flash_crc"], 1);
    }
}
