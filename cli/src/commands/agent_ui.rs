//! The operator's view of a run: an indicatif multi-progress with one bar per probe (stage, bytes,
//! rate, ETA) and a summary line (ok, refused, failed, yield) when stderr is a terminal; plain log
//! lines otherwise; and the summary table at the end. Used by `flashgate agent run`, `flashgate agent
//! serve` (one display across every batch the broker assigns) and `flashgate demo`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use flashgate_agent::bootloader::InstallStage;
use flashgate_agent::pipeline::{DeviceOutcome, StageEvent};
use flashgate_agent::runner::{RunEvent, RunSummary};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;

use crate::output::Table;

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

/// A one-line description of an outcome.
pub fn outcome_words(o: &DeviceOutcome) -> String {
    match o {
        DeviceOutcome::Installed { crc: Some(c), .. } => format!("installed, flash CRC {c:#010x} verified"),
        DeviceOutcome::Installed { crc: None, .. } => "installed (CRC answer lost; state verified)".into(),
        DeviceOutcome::Refused { reason, message, .. } => format!("refused {reason}: {message}"),
        DeviceOutcome::Failed { message, .. } => format!("failed: {message}"),
        DeviceOutcome::BrokerUnreachable { message, .. } => {
            format!("not installed: stopped while waiting for a broker ({message})")
        }
        DeviceOutcome::Locked { message } => format!("not installed: {message}"),
    }
}

/// Consumes run events until the channel closes, drawing bars (terminal) or log lines.
/// `label` prefixes every line (e.g. the station name in the demo).
pub async fn display(mut events: mpsc::UnboundedReceiver<RunEvent>, label: String, multi: Option<MultiProgress>) {
    let tty = std::io::stderr().is_terminal();
    let multi = multi.unwrap_or_else(|| {
        MultiProgress::with_draw_target(if tty { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() })
    });
    let style = ProgressStyle::with_template(
        "{prefix:>22} {msg:<14} [{bar:28}] {bytes:>9}/{total_bytes:<9} {binary_bytes_per_sec:>11} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let summary = multi.add(ProgressBar::new_spinner());
    let mut bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let (mut ok, mut refused, mut failed) = (0u32, 0u32, 0u32);
    let update_summary = |ok: u32, refused: u32, failed: u32| {
        let total = ok + refused + failed;
        let yield_pct = if ok + failed == 0 { 100.0 } else { 100.0 * f64::from(ok) / f64::from(ok + failed) };
        summary.set_message(format!(
            "{label}: {ok} ok, {refused} refused, {failed} failed of {total} devices (yield {yield_pct:.0}%)"
        ));
    };
    update_summary(0, 0, 0);
    while let Some(ev) = events.recv().await {
        let probe = match &ev {
            RunEvent::Waiting { probe }
            | RunEvent::Stage { probe, .. }
            | RunEvent::Finished { probe, .. }
            | RunEvent::ProbeDone { probe } => probe.clone(),
        };
        let bar = bars
            .entry(probe.clone())
            .or_insert_with(|| {
                let b = multi.insert_before(&summary, ProgressBar::new(0));
                b.set_style(style.clone());
                b.set_prefix(format!("{label}/{probe}"));
                b
            })
            .clone();
        match ev {
            RunEvent::Waiting { .. } => {
                // A probe of a later run (`agent serve`): its bar was finished when the last run ended.
                if bar.is_finished() {
                    bar.reset();
                }
                bar.set_message("waiting");
                if !tty {
                    eprintln!("{label}/{probe}: waiting for a device");
                }
            }
            RunEvent::Stage { attempt, event, .. } => {
                let mut msg = stage_name(&event);
                if attempt > 1 {
                    msg = format!("{msg} #{attempt}");
                }
                if let StageEvent::Install { done, total, .. } = event {
                    bar.set_length(total);
                    bar.set_position(done);
                } else if !tty {
                    eprintln!("{label}/{probe}: {msg}");
                }
                bar.set_message(msg);
            }
            RunEvent::Finished { outcome, .. } => {
                match &outcome {
                    DeviceOutcome::Installed { .. } => ok += 1,
                    DeviceOutcome::Refused { .. } => refused += 1,
                    DeviceOutcome::Failed { .. } | DeviceOutcome::BrokerUnreachable { .. } => failed += 1,
                    DeviceOutcome::Locked { .. } => {}
                }
                let words = outcome_words(&outcome);
                let device = outcome.device_id().unwrap_or("?").to_owned();
                bar.set_message(match &outcome {
                    DeviceOutcome::Installed { .. } => "installed".to_owned(),
                    DeviceOutcome::Refused { reason, .. } => reason.to_lowercase(),
                    DeviceOutcome::Failed { .. } => "FAILED".to_owned(),
                    DeviceOutcome::BrokerUnreachable { .. } => "NOT INSTALLED".to_owned(),
                    DeviceOutcome::Locked { .. } => "LOCKED".to_owned(),
                });
                if tty {
                    multi.println(format!("{label}/{probe}: device {device}: {words}")).ok();
                } else {
                    eprintln!("{label}/{probe}: device {device}: {words}");
                }
                update_summary(ok, refused, failed);
            }
            RunEvent::ProbeDone { .. } => bar.finish(),
        }
    }
    summary.finish();
    // Let the last frame draw.
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// The summary table of a run (one row per device).
pub fn summary_table(rows: &[(String, &RunSummary)]) -> String {
    let mut t = Table::new(["station", "probe", "device", "attempts", "result"]);
    for (station, s) in rows {
        let mut devices: Vec<_> = s.devices.iter().collect();
        devices.sort_by(|a, b| a.probe.cmp(&b.probe));
        for d in devices {
            t.row([
                station.clone(),
                d.probe.clone(),
                d.outcome.device_id().unwrap_or("-").to_owned(),
                d.attempts.to_string(),
                outcome_words(&d.outcome),
            ]);
        }
    }
    t.render()
}
