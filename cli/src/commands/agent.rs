//! `flashgate agent`: the station side. `agent serve --config agent.toml` is the station daemon: it
//! keeps a control stream open to the broker and runs whatever batch the broker assigns (`flashgate
//! admin station assign/pause`), on every probe, until it is exhausted or paused (Ctrl-C finishes
//! in-flight devices, reports and leaves; a second Ctrl-C quits at once). `agent run --config agent.toml
//! --batch ID` installs one given batch on every probe until it is exhausted or the operator stops it
//! (Ctrl-C finishes the devices in flight; a second Ctrl-C aborts them, each journalled as failed
//! before INSTALL, and the run exits 130), with progress bars and a summary table; both show
//! progress bars when stderr is a terminal and log lines otherwise. `agent probes` lists the probes
//! found; `agent journal` shows the local result history. `agent run --json` prints one JSON object per device as it finishes and a
//! summary object last, and nothing else on stdout (docs/json-output.md). The work lives in
//! `flashgate_agent`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use flashgate_agent::broker_client::{BrokerClient, Reporter};
use flashgate_agent::config::AgentConfig;
use flashgate_agent::daemon::run_daemon;
use flashgate_agent::images::ImageCache;
use flashgate_agent::journal::{EntryState, Journal};
use flashgate_agent::pipeline::{PipelineContext, ProbeTarget};
use flashgate_agent::probe::{ProbeEndpoint, ProbeInfo, ProbeWatcher, discover_report, format_probes, probes_json};
use flashgate_agent::runner::{RunMode, RunOptions, RunSummary, run_batch_stoppable, run_batch_watching_stoppable};
use flashgate_proto::transport::{TlsFiles, client_config};
use tokio::sync::{mpsc, watch};

use super::agent_ui;
use crate::output::{Table, ms_time};

/// `flashgate agent …`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// The station daemon: run the batches the broker assigns to this station until stopped.
    Serve(ServeArgs),
    /// Install a batch on every probe of this station.
    Run(RunArgs),
    /// List the probes this station would use (configured and discovered on USB).
    Probes(ConfigArgs),
    /// Show the local journal of device results.
    Journal(JournalArgs),
}

/// The configuration file.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The agent configuration (see deploy/config/agent.toml); `FLASHGATE_*` variables override it.
    #[arg(long, short, env = "FLASHGATE_AGENT_CONFIG")]
    pub config: PathBuf,
    /// Print JSON instead of a table (`agent run`: one object per device as it finishes, then a
    /// summary object; see docs/json-output.md).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// The batch to install.
    #[arg(long)]
    pub batch: String,
    /// Each probe installs one device, then the run ends (fixtures with one target each).
    #[arg(long)]
    pub once: bool,
    /// Print this process's resource use at the end (wall time, CPU time per device, peak memory).
    #[arg(long)]
    pub stats: bool,
    /// Extra probe targets (`tcp://host:port`, `serial:/dev/ttyUSB0?baud=115200`), added to the configured ones.
    #[arg(long = "probe", value_name = "TARGET")]
    pub probes: Vec<String>,
}

/// Arguments of `agent serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The agent configuration (see deploy/config/agent.toml); `FLASHGATE_*` variables override it.
    #[arg(long, short, env = "FLASHGATE_AGENT_CONFIG")]
    pub config: PathBuf,
    /// Extra probe targets (`tcp://host:port`, `serial:/dev/ttyUSB0?baud=115200`), added to the configured ones.
    #[arg(long = "probe", value_name = "TARGET")]
    pub probes: Vec<String>,
}

/// Arguments of `agent journal`.
#[derive(Debug, Args)]
pub struct JournalArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// Only results not yet acknowledged by the broker.
    #[arg(long)]
    pub pending: bool,
    /// Print the signed audit checkpoints this station holds (the newest per ledger), one hex line
    /// each: a witness file for `flashgate audit verify --witness`.
    #[arg(long, conflicts_with = "pending")]
    pub checkpoints: bool,
}

/// Runs `flashgate agent …`.
pub async fn run(cmd: AgentCommand) -> anyhow::Result<()> {
    match cmd {
        AgentCommand::Serve(a) => serve_cmd(a).await,
        AgentCommand::Run(a) => run_cmd(a).await,
        AgentCommand::Probes(a) => probes_cmd(a),
        AgentCommand::Journal(a) => journal_cmd(a),
    }
}

fn probe_targets(found: &[ProbeInfo], warn: bool) -> Vec<ProbeTarget> {
    let mut out = Vec::new();
    for p in found.iter().filter(|p| p.is_connectable()) {
        match p.endpoint() {
            Ok(ProbeEndpoint::Target(addr)) => {
                out.push(ProbeTarget { id: p.id.clone(), kind: p.kind.to_string(), addr })
            }
            Ok(ProbeEndpoint::Sim(n)) if warn => {
                eprintln!("warning: probe {}: sim:{n} targets exist only inside `flashgate demo`; skipped", p.id);
            }
            Err(e) if warn => eprintln!("warning: probe {}: {e}; skipped", p.id),
            _ => {}
        }
    }
    out
}

/// The probe list kept current by a [`ProbeWatcher`] re-scanning every `[probes] scan_interval`: probes
/// plugged in join a running batch, probes removed leave it.
/// `initial` (the probes found at start) stands until the watcher's first scan.
fn watch_probes(watcher: &ProbeWatcher, initial: Vec<ProbeTarget>) -> watch::Receiver<Vec<ProbeTarget>> {
    let mut found = watcher.subscribe();
    let first = probe_targets(&found.borrow_and_update(), false);
    let (tx, rx) = watch::channel(if first.is_empty() { initial } else { first });
    tokio::spawn(async move {
        while found.changed().await.is_ok() {
            let list = probe_targets(&found.borrow_and_update(), false);
            if tx.send(list).is_err() {
                break;
            }
        }
    });
    rx
}

/// What `agent run` and `agent serve` share: the configuration, the broker client, the journal
/// and its reporter, and the probes.
struct Station {
    cfg: AgentConfig,
    ctx: PipelineContext,
    probes: Vec<ProbeTarget>,
    /// Re-scans the probes while the station runs.
    watcher: ProbeWatcher,
}

impl Station {
    /// Loads `config`, opens the journal and image cache, starts the reporter (announcing results
    /// left from earlier runs) and finds the probes (the configured ones plus `extra_probes`).
    /// `require_probes`: fail when no probe is usable now (`agent run`); the daemon waits for probes instead.
    fn setup(config: &Path, extra_probes: &[String], require_probes: bool) -> anyhow::Result<Self> {
        let cfg = AgentConfig::load(config)?;
        if let Some(listen) = cfg.metrics.listen.as_deref().map(str::trim).filter(|l| !l.is_empty()) {
            let addr: std::net::SocketAddr =
                listen.parse().with_context(|| format!("[metrics] listen = {listen:?} is not a socket address"))?;
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .with_context(|| format!("starting the Prometheus exporter on {addr}"))?;
            eprintln!("metrics at http://{addr}/metrics");
        }
        let tls = client_config(&TlsFiles::new(&cfg.tls.cert, &cfg.tls.key, &cfg.tls.ca))
            .context("loading the station certificate")?;
        let broker = BrokerClient::new(cfg.broker.endpoints.clone(), tls, cfg.broker.server_name.clone())?;
        let journal = Arc::new(Journal::open(&cfg.journal_dir())?);
        let images = Arc::new(ImageCache::new(cfg.image_dir())?);
        let pending = journal.unreported_count();
        if pending > 0 {
            eprintln!("{pending} device result(s) from earlier runs not yet reported: sending them now");
        }
        let reporter = Arc::new(Reporter::spawn(journal.clone(), broker.clone()));

        let mut settings = cfg.probe_settings();
        for t in extra_probes {
            settings.probes.push(flashgate_agent::probe::ProbeConfig { id: None, target: t.clone() });
        }
        let found = discover_report(&settings)?;
        for w in &found.warnings {
            eprintln!("warning: {w}");
        }
        let probes = probe_targets(&found.probes, true);
        let watcher = ProbeWatcher::from_settings(&settings)?;
        if probes.is_empty() && !require_probes {
            eprintln!(
                "warning: no usable probe yet; waiting for one (configure [[probes.static]] in {} or plug in a \
                 USB-serial probe)",
                config.display()
            );
        } else if probes.is_empty() {
            bail!("no usable probe: configure [[probes.static]] in {} or plug in a USB-serial probe", config.display());
        }
        let mut bl = cfg.bootloader.client_config();
        bl.line_baud = None;
        let ctx = PipelineContext { broker, images, journal, reporter, bootloader: bl };
        Ok(Station { cfg, ctx, probes, watcher })
    }
}

fn warn_unreported(cfg: &AgentConfig, left: usize) {
    if left > 0 {
        eprintln!(
            "warning: {left} result(s) not yet acknowledged by the broker; they stay in {} and are sent on the next run",
            cfg.journal_dir().display()
        );
    }
}

async fn serve_cmd(a: ServeArgs) -> anyhow::Result<()> {
    let Station { cfg, ctx, probes, watcher } = Station::setup(&a.config, &a.probes, false)?;
    let label = station_label(&cfg);
    eprintln!(
        "{label}: {} probe(s); serving broker {} (Ctrl-C to stop); waiting for an assigned batch",
        probes.len(),
        cfg.broker.endpoints.join(", ")
    );
    // The daemon finishes the devices in flight on Ctrl-C or SIGTERM; a second Ctrl-C quits at once.
    let console = agent_ui::Console::new();
    let stop = console.interrupts(false);
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let ui = tokio::spawn(agent_ui::display(ev_rx, label, console.clone(), false));
    let outcome = run_daemon(&cfg, watch_probes(&watcher, probes), ctx, stop.finish, Some(ev_tx)).await;
    drop(watcher);
    let _ = ui.await;
    console.clear();
    let summary = outcome?;
    println!(
        "{} run(s): {} installed, {} refused, {} failed",
        summary.runs, summary.installed, summary.refused, summary.failed
    );
    warn_unreported(&cfg, summary.unreported);
    Ok(())
}

async fn run_cmd(a: RunArgs) -> anyhow::Result<()> {
    let Station { cfg, ctx, probes, watcher } = Station::setup(&a.common.config, &a.probes, true)?;
    let reporter = ctx.reporter.clone();
    let journal = ctx.journal.clone();
    let label = station_label(&cfg);
    let json = a.common.json;
    eprintln!("batch {}: {} probe(s), broker {}", a.batch, probes.len(), ctx.broker.current_endpoint());
    let opts = RunOptions {
        batch_id: a.batch.clone(),
        mode: if a.once { RunMode::OncePerProbe } else { RunMode::UntilExhausted },
        max_parallel: cfg.run.max_parallel,
        max_attempts: cfg.run.max_attempts,
        poll_interval: cfg.run.poll_interval,
    };
    let started = std::time::Instant::now();
    // Ctrl-C: the devices in flight finish; a second Ctrl-C aborts them (journalled, exit 130).
    let console = agent_ui::Console::new();
    let stop = console.interrupts(true);
    let (finished, aborted) = (stop.finish.clone(), stop.abort.clone());
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let ui = tokio::spawn(agent_ui::display(ev_rx, label.clone(), console.clone(), json));
    // One device per probe: the probes present now. Until exhausted: probes may come and go.
    let summary = if a.once {
        run_batch_stoppable(ctx, probes, opts, ev_tx, stop).await
    } else {
        run_batch_watching_stoppable(ctx, watch_probes(&watcher, probes), opts, ev_tx, stop).await
    };
    drop(watcher);
    let _ = ui.await;
    console.clear();
    let interrupted = if *aborted.borrow() {
        Some("abort")
    } else if *finished.borrow() {
        Some("finish")
    } else {
        None
    };

    // After an abort the operator wants out: less patience for an absent broker.
    let patience = if interrupted == Some("abort") { Duration::from_secs(10) } else { Duration::from_secs(30) };
    let left = reporter.flush(patience).await;
    if a.stats {
        print_stats(started.elapsed(), summary.devices.len(), json);
    }
    let result = run_exit(&summary, &journal, interrupted == Some("abort"));
    if json {
        // The exit code the run ends with, for a script that reads only standard output.
        let code = result.as_ref().err().map_or(0, |e| crate::exit::classify(e) as u8);
        println!("{}", summary_json(&label, &a.batch, &summary, interrupted, left, code));
    } else {
        println!("{}", agent_ui::summary_table(&[(label.clone(), &summary)]));
        println!(
            "{} installed, {} refused, {} failed{}",
            summary.installed(),
            summary.refused(),
            summary.failed(),
            summary.stopped_by.as_deref().map(|r| format!("; stopped: {r}")).unwrap_or_default()
        );
    }
    warn_unreported(&cfg, left);
    result
}

/// The last line of `agent run --json` (fields in docs/json-output.md).
fn summary_json(
    station: &str,
    batch: &str,
    s: &RunSummary,
    interrupted: Option<&str>,
    unreported: usize,
    exit_code: u8,
) -> serde_json::Value {
    serde_json::json!({
        "type": "summary",
        "station": station,
        "batch": batch,
        "devices": s.devices.len(),
        "installed": s.installed(),
        "refused": s.refused(),
        "failed": s.failed(),
        "aborted": s.devices.iter().filter(|d| d.outcome.is_aborted()).count(),
        "locked": s.locked(),
        "stopped_by": s.stopped_by,
        "interrupted": interrupted,
        "unreported": unreported,
        "exit_code": exit_code,
    })
}

/// How `agent run` ends: a result that could not be journalled (74) first, then an operator's abort
/// (130), then failed devices (81), then refusals (80); 0 when every device seen was installed.
fn run_exit(summary: &RunSummary, journal: &Journal, aborted: bool) -> anyhow::Result<()> {
    use crate::exit::{Exit, with};
    if journal.faults_seen() > 0 {
        let now = journal.fault().map(|f| format!("; still failing: {f}")).unwrap_or_default();
        return Err(with(
            Exit::Io,
            anyhow::anyhow!(
                "the journal could not be written during the run ({} result(s) still held in memory){now}",
                journal.held_count()
            ),
        ));
    }
    if aborted {
        let n = summary.devices.iter().filter(|d| d.outcome.is_aborted()).count();
        return Err(with(
            Exit::Interrupted,
            anyhow::anyhow!(
                "aborted by the operator: {n} device(s) in flight were abandoned before INSTALL and journalled as \
                 failed (not installed; their licences stay valid for a retry)"
            ),
        ));
    }
    let station_refused = summary.devices.iter().find_map(|d| match &d.outcome {
        flashgate_agent::pipeline::DeviceOutcome::Refused { reason, message, .. }
            if reason == flashgate_agent::pipeline::STATION_REFUSED =>
        {
            Some(message.clone())
        }
        _ => None,
    });
    if let Some(why) = station_refused {
        return Err(with(Exit::NoPerm, anyhow::anyhow!("this station is {why}")));
    }
    if summary.failed() > 0 {
        return Err(with(
            Exit::DeviceFailed,
            anyhow::anyhow!(
                "{} device(s) failed (see the table above and `flashgate agent journal --pending`)",
                summary.failed()
            ),
        ));
    }
    if summary.refused() > 0 {
        return Err(with(
            Exit::Refused,
            anyhow::anyhow!(
                "{} device(s) refused by the broker{}",
                summary.refused(),
                summary.stopped_by.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

/// Wall time, CPU time (user + system) per device and peak resident memory of this process.
/// On stderr with `--json` (stdout then holds JSON only).
fn print_stats(wall: Duration, devices: usize, to_stderr: bool) {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            let cpu = tv(u.user_time()) + tv(u.system_time());
            let line = format!(
                "agent stats: {devices} devices, wall {:.2} s, CPU {cpu:.2} s ({:.1} ms per device), peak RSS {:.1} MiB",
                wall.as_secs_f64(),
                1000.0 * cpu / devices.max(1) as f64,
                u.max_rss() as f64 / 1024.0
            );
            if to_stderr {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
        Err(e) => eprintln!("warning: getrusage failed: {e}"),
    }
}

fn station_label(cfg: &AgentConfig) -> String {
    flashgate_common::pki::read_cert_info(&cfg.tls.cert)
        .map(|i| match i.identity {
            flashgate_common::pki::Identity::Station { site, station, .. } => format!("{site}/{station}"),
            other => other.to_uri(),
        })
        .unwrap_or_else(|_| "station".into())
}

fn probes_cmd(a: ConfigArgs) -> anyhow::Result<()> {
    let cfg = AgentConfig::load(&a.config)?;
    let found = discover_report(&cfg.probe_settings())?;
    if a.json {
        println!("{}", serde_json::json!({"probes": probes_json(&found.probes), "warnings": found.warnings}));
    } else {
        print!("{}", format_probes(&found.probes));
        for w in &found.warnings {
            eprintln!("warning: {w}");
        }
    }
    Ok(())
}

/// `agent journal --checkpoints`: the witness file on stdout (comment lines describe each checkpoint).
fn checkpoints_cmd(dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let held = flashgate_agent::witness::read(dir)?;
    if json {
        let rows: Vec<_> = held
            .iter()
            .map(|c| {
                serde_json::json!({
                    "checkpoint": c.to_bytes().map(hex::encode).unwrap_or_default(),
                    "ledger_id": hex::encode(c.head.ledger_id), "seq": c.head.seq,
                    "hash": hex::encode(c.head.hash), "at": c.head.at, "broker": c.head.broker,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if held.is_empty() {
        eprintln!("no audit checkpoint received yet in {}", dir.display());
    }
    for c in &held {
        println!(
            "# ledger {} seq {} hash {} signed by {} at {}",
            hex::encode(c.head.ledger_id),
            c.head.seq,
            hex::encode(c.head.hash),
            c.head.broker,
            c.head.at
        );
        println!("{}", c.to_bytes().map(hex::encode).unwrap_or_default());
    }
    Ok(())
}

fn journal_cmd(a: JournalArgs) -> anyhow::Result<()> {
    let cfg = AgentConfig::load(&a.common.config)?;
    if a.checkpoints {
        return checkpoints_cmd(&cfg.journal_dir(), a.common.json);
    }
    let entries = Journal::read_entries(&cfg.journal_dir())?;
    let entries: Vec<_> = entries.into_iter().filter(|(_, st)| !a.pending || st.is_pending()).collect();
    if a.common.json {
        let rows: Vec<_> = entries
            .iter()
            .map(|(e, st)| {
                serde_json::json!({
                    "seq": e.seq, "result_id": e.result_id, "state": st.to_string(),
                    "batch_id": e.result.batch_id, "device_id": e.result.device_id,
                    "status_code": e.result.status_code, "message": e.result.message,
                    "flash_crc": e.result.flash_crc, "attempt": e.result.attempt, "probe": e.result.probe_id,
                    "finished_at_ms": e.result.finished_at_ms,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    let mut t = Table::new(["seq", "finished", "batch", "device", "probe", "status", "message", "broker"]);
    for (e, st) in &entries {
        t.row([
            e.seq.to_string(),
            ms_time(e.result.finished_at_ms),
            e.result.batch_id.clone(),
            e.result.device_id.clone(),
            e.result.probe_id.clone(),
            format!("{:#06x}", e.result.status_code),
            e.result.message.clone(),
            match st {
                EntryState::Unreported => "pending".to_owned(),
                other => other.to_string(),
            },
        ]);
    }
    print!("{}", t.render());
    Ok(())
}
