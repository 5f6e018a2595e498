//! `flashgate demo`: the whole system on this machine, on the embedded defaults, with no hardware.
//!
//! A broker (soft HSM keystore, SQLite ledger, mutual-TLS gRPC on loopback), a development PKI, the
//! simulator's test vendor CA, two sites (berlin, austin) with one station each, simulated STM32L4
//! targets behind each station (realistic link and flash timing, scaled by `--speed`), a demo
//! firmware packed inside the HSM, and a batch whose quota is smaller than the number of devices.
//! Both stations' agents install in parallel with progress bars; the demo ends with a table (devices
//! installed and verified, devices refused for "quota exhausted"), the audit chain verified through
//! the admin API, and where the files are. `--keep` leaves the broker running to try `flashgate admin`.
//! Ctrl-C while the stations run finishes the devices in flight; a second Ctrl-C aborts them (each
//! journalled as failed); either way the demo then reports what was done and exits 130 unless every
//! device was handled as expected. Every line fits an 80-column terminal. `--json` prints one object
//! with the outcome at the end (docs/json-output.md) and tells the story on stderr.
//! Ctrl-C while the stations run finishes the devices in flight; a second Ctrl-C aborts them (each
//! journalled as failed); either way the demo then reports what was done and exits 130 unless every
//! device was handled as expected. Every line fits an 80-column terminal.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use flashgate_agent::bootloader::ClientConfig;
use flashgate_agent::broker_client::{BrokerClient, Reporter};
use flashgate_agent::images::ImageCache;
use flashgate_agent::journal::Journal;
use flashgate_agent::pipeline::{PipelineContext, ProbeTarget};
use flashgate_agent::runner::{RunMode, RunOptions, RunSummary, run_batch_stoppable};
use flashgate_broker::config::{
    BrokerConfig, HsmMemberConfig, HsmSection, LedgerSection, LimitsConfig, ListenConfig, PASSPHRASE_ENV, TlsConfig,
    VendorConfig,
};
use flashgate_common::family::Family;
use flashgate_common::pki::{self, Identity, PkiInit};
use flashgate_proto::transport::{TlsFiles, client_config, connect};
use flashgate_proto::v1 as pb;
use flashgate_proto::v1::admin_service_client::AdminServiceClient;
use flashgate_sim::{SimConfig, Simulator};
use rand::RngCore;
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use super::agent_ui;

const TRUST_DOMAIN: &str = "factory.test";
const SITES: [&str; 2] = ["berlin", "austin"];
const BATCH: &str = "demo-lot-1";

/// Arguments of `flashgate demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Simulated devices, shared between the two stations.
    #[arg(long, default_value_t = 8, value_parser = super::number_between(2u32, 64))]
    pub devices: u32,
    /// Licences the batch may issue.
    #[arg(long, default_value_t = 6)]
    pub quota: u32,
    /// Speed factor of the simulated link and flash (1 = real time at 115200 baud; 0 = no delays).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Leave the broker running afterwards and print how to try `flashgate admin` (Ctrl-C to stop).
    #[arg(long)]
    pub keep: bool,
    /// Directory for the demo's files, created with mode 0700; must not exist yet (default: a new,
    /// randomly named directory under the system temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print one JSON object with the outcome at the end (and nothing else on stdout; the story goes
    /// to stderr). See docs/json-output.md.
    #[arg(long)]
    pub json: bool,
}

/// A line for a person: on stdout, or on stderr when stdout holds the JSON (`--json`).
macro_rules! say {
    ($json:expr) => {
        if $json {
            eprintln!()
        } else {
            println!()
        }
    };
    ($json:expr, $($arg:tt)+) => {
        if $json {
            eprintln!($($arg)+)
        } else {
            println!($($arg)+)
        }
    };
}

/// A deterministic demo firmware: a 48 KiB application at the start of flash and a calibration table.
fn demo_areas(family: Family) -> Vec<pb::PlainArea> {
    let base = family.profile().flash_base;
    let app: Vec<u8> = (0..48 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let table: Vec<u8> = b"flashgate demo calibration table\n".iter().copied().cycle().take(4096).collect();
    vec![
        pb::PlainArea { kind: "F".into(), address: base, data: app },
        pb::PlainArea { kind: "F".into(), address: base + 0x4_0000, data: table },
    ]
}

/// The demo's directory, created fresh with mode 0700 (it holds the keystore passphrase and private
/// keys): a new randomly named directory under the temp dir, or `--dir`, which must not exist yet (a
/// directory someone else prepared could be readable by them).
fn demo_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    match given {
        None => {
            let dir = tempfile::Builder::new()
                .prefix("flashgate-demo-")
                .tempdir()
                .context("creating the demo directory under the temp dir")?;
            Ok(dir.keep())
        }
        Some(dir) => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                let why = anyhow::anyhow!(
                    "creating --dir {}: {e} (it must not exist yet: the demo writes secrets into it)",
                    dir.display()
                );
                let exit = if e.kind() == std::io::ErrorKind::AlreadyExists {
                    crate::exit::Exit::Usage
                } else {
                    crate::exit::Exit::Io
                };
                return Err(crate::exit::with(exit, why));
            }
            Ok(dir)
        }
    }
}

fn broker_config(dir: &Path) -> Result<BrokerConfig> {
    let broker = Identity::broker(TRUST_DOMAIN, "broker-1")?;
    let (cert, key) = pki::identity_paths(&dir.join("pki"), &broker);
    Ok(BrokerConfig {
        name: "broker-1".into(),
        trust_domain: TRUST_DOMAIN.into(),
        listen: ListenConfig { grpc: "127.0.0.1:0".parse()?, metrics: None },
        tls: TlsConfig { cert, key, ca: pki::ca_cert_path(&dir.join("pki")) },
        vendor: VendorConfig { ca_keys: vec![dir.join("vendor").join(flashgate_sim::state::VENDOR_CA_PUB)] },
        ledger: LedgerSection {
            url: format!("sqlite://{}", dir.join("ledger.db").display()),
            max_group: 256,
            queue_depth: 4096,
            pg_connections: 8,
        },
        hsm: HsmSection {
            timeout: Duration::from_secs(5),
            max_in_flight: 0,
            members: vec![HsmMemberConfig::Soft { path: dir.join("keys.fgks"), passphrase_file: None }],
        },
        limits: LimitsConfig::default(),
        audit: Default::default(),
        site_brokers: Default::default(),
        upstream: None,
    })
}

/// One station: its simulated targets and its agent.
struct Station {
    label: String,
    sim: flashgate_sim::RunningSimulator,
    ctx: PipelineContext,
    probes: Vec<ProbeTarget>,
}

async fn station(dir: &Path, site: &str, targets: u32, speed: f64, url: &str, vendor_key: &Path) -> Result<Station> {
    let vendor = flashgate_sim::load_vendor_ca(vendor_key)?;
    let mut sc = SimConfig::new(Family::Stm32L4, targets as usize, "127.0.0.1:0".parse()?, vendor);
    sc.speed = speed;
    let sim = Simulator::start(sc).await.with_context(|| format!("starting {site}'s simulated targets"))?;
    let id = Identity::station(TRUST_DOMAIN, site, 1)?;
    let tls = client_config(&TlsFiles::for_identity(&dir.join("pki"), &id))?;
    let broker = BrokerClient::new(vec![url.to_owned()], tls, None)?;
    let state = dir.join("stations").join(format!("{site}-1"));
    let journal = Arc::new(Journal::open(&state.join("journal"))?);
    let images = Arc::new(ImageCache::new(state.join("images"))?);
    let reporter = Arc::new(Reporter::spawn(journal.clone(), broker.clone()));
    // The simulated link runs faster than real time: wire-time allowances would only slow retries.
    let bootloader = ClientConfig { line_baud: None, ..ClientConfig::default() };
    let probes = sim
        .tcp_addrs()
        .iter()
        .enumerate()
        .map(|(i, a)| {
            Ok(ProbeTarget {
                id: format!("fixture-{}", i + 1),
                kind: "tcp".into(),
                addr: format!("tcp://{a}").parse()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Station {
        label: format!("{site}/1"),
        sim,
        ctx: PipelineContext { broker, images, journal, reporter, bootloader },
        probes,
    })
}

/// Run `flashgate demo`.
pub async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let json = args.json;
    let dir = demo_dir(args.dir.clone())?;
    say!(
        json,
        "Flashgate demo: broker + 2 sites, {} simulated STM32L4 devices, batch quota {}",
        args.devices,
        args.quota
    );
    say!(json, "files: {}", dir.display());

    // 1. PKI, vendor CA, broker (soft HSM + SQLite, embedded defaults).
    let layout = pki::init_dev_pki(
        &dir.join("pki"),
        &PkiInit {
            trust_domain: TRUST_DOMAIN.into(),
            sites: SITES.iter().map(|s| s.to_string()).collect(),
            stations_per_site: 1,
            admins: vec!["ops".into()],
            ..PkiInit::default()
        },
    )
    .context("creating the development PKI")?;
    let (vendor_key, _) = flashgate_sim::write_vendor_ca(&dir.join("vendor")).context("creating the test vendor CA")?;
    let mut pass = Zeroizing::new([0u8; 24]);
    rand::rngs::OsRng.fill_bytes(pass.as_mut());
    let passphrase = Zeroizing::new(hex::encode(pass.as_ref()));
    flashgate_common::atomic_file::write(
        &dir.join("keystore-passphrase"),
        passphrase.as_bytes(),
        flashgate_common::atomic_file::PRIVATE_MODE,
    )?;
    let cfg = broker_config(&dir)?;
    let env = |k: &str| (k == PASSPHRASE_ENV).then(|| passphrase.to_string());
    let broker = flashgate_broker::server::start(&cfg, &dir, &env).await.context("starting the broker")?;
    let url = broker.url();
    say!(json, "✓ broker on {url} (soft HSM, SQLite ledger), {} certificates", layout.files().count());

    // 2. As the operator: a firmware key in the HSM, the image packed inside it, a batch.
    let admin_id = Identity::admin(TRUST_DOMAIN, "ops")?;
    let admin_tls = client_config(&TlsFiles::for_identity(&dir.join("pki"), &admin_id))?;
    let mut admin = AdminServiceClient::new(connect(&url, admin_tls, None).await?).max_decoding_message_size(64 << 20);
    let key = admin.generate_key(pb::GenerateKeyRequest { label: "demo-firmware".into() }).await?.into_inner();
    let image = admin
        .pack_image(pb::PackImageRequest {
            key_id: key.key_id.clone(),
            family: "stm32l4".into(),
            product_id: String::new(),
            areas: demo_areas(Family::Stm32L4),
        })
        .await?
        .into_inner();
    admin
        .create_batch(pb::CreateBatchRequest {
            id: BATCH.into(),
            product_id: image.product_id.clone(),
            image_sha256: image.sha256.clone(),
            quota: i64::from(args.quota),
            allowed_sites: SITES.iter().map(|s| s.to_string()).collect(),
            not_before_ms: None,
            not_after_ms: None,
        })
        .await?;
    say!(json, "✓ key {} generated in the HSM", key.key_id);
    say!(json, "✓ image {}… packed inside the HSM ({} bytes)", &image.sha256[..16], image.size);
    say!(json, "✓ batch {BATCH}: quota {} for {}", args.quota, SITES.join(", "));

    // 3. Two stations, each with its simulated targets and its agent; both run at once.
    let split = [args.devices.div_ceil(2), args.devices / 2];
    let mut stations = Vec::new();
    for (site, n) in SITES.iter().zip(split) {
        stations.push(station(&dir, site, n, args.speed, &url, &vendor_key).await?);
    }
    // Ctrl-C: the devices in flight finish; a second Ctrl-C aborts them (journalled as failed).
    let console = agent_ui::Console::new();
    let stop = console.interrupts(true);
    let mut runs = tokio::task::JoinSet::new();
    let mut uis = Vec::new();
    for s in &stations {
        let (tx, rx) = mpsc::unbounded_channel();
        uis.push(tokio::spawn(agent_ui::display(rx, s.label.clone(), console.clone(), false)));
        let opts = RunOptions { mode: RunMode::OncePerProbe, ..RunOptions::new(BATCH) };
        let (ctx, probes, label, stop) = (s.ctx.clone(), s.probes.clone(), s.label.clone(), stop.clone());
        runs.spawn(async move { (label, run_batch_stoppable(ctx, probes, opts, tx, stop).await) });
    }
    let mut summaries: Vec<(String, RunSummary)> = Vec::new();
    while let Some(r) = runs.join_next().await {
        summaries.push(r.context("station task")?);
    }
    for u in uis {
        let _ = u.await;
    }
    console.clear();
    let (stopped, aborted) = (*stop.finish.borrow(), *stop.abort.borrow());
    summaries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut unreported = 0;
    for s in &stations {
        unreported += s.ctx.reporter.flush(Duration::from_secs(15)).await;
    }

    // 4. The outcome, as the stations saw it and as the broker's ledger and audit chain record it.
    let rows: Vec<(String, &RunSummary)> = summaries.iter().map(|(l, s)| (l.clone(), s)).collect();
    say!(json);
    if json {
        eprint!("{}", agent_ui::summary_table(&rows));
    } else {
        print!("{}", agent_ui::summary_table(&rows));
    }
    let installed: usize = summaries.iter().map(|(_, s)| s.installed()).sum();
    let refused: usize = summaries.iter().map(|(_, s)| s.refused()).sum();
    let failed: usize = summaries.iter().map(|(_, s)| s.failed()).sum();
    let quota_refusals = summaries
        .iter()
        .flat_map(|(_, s)| &s.devices)
        .filter(|d| matches!(&d.outcome, flashgate_agent::pipeline::DeviceOutcome::Refused { reason, .. } if reason == "QUOTA_EXHAUSTED"))
        .count();
    let status = admin.batch_status(pb::BatchStatusRequest { id: BATCH.into() }).await?.into_inner();
    let audit = admin.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner();
    say!(json);
    say!(json, "{installed} installed and verified, {quota_refusals} refused for \"quota exhausted\", {failed} failed");
    say!(
        json,
        "ledger: batch {BATCH} issued {} of {}, {} installed reports, {} remaining",
        status.issued,
        status.quota,
        status.installed,
        status.remaining
    );
    if audit.ok {
        say!(json, "audit chain verified: {} records, head {}…", audit.records, &audit.head_hash[..16]);
    } else {
        say!(json, "AUDIT CHAIN BROKEN at seq {}: {}", audit.broken_seq, audit.fault);
    }
    say!(json, "finished in {:.1} s", started.elapsed().as_secs_f64());
    say!(json, "files in {}:", dir.display());
    say!(json, "  pki/                 development CA, broker/admin/station certificates");
    say!(json, "  vendor/              the simulator's test vendor CA (vendor-ca.pub trusted)");
    say!(json, "  keys.fgks            soft HSM keystore (passphrase: keystore-passphrase)");
    say!(json, "  ledger.db            SQLite ledger: batches, licences, reports, audit");
    say!(json, "  stations/*/journal   each station's local result journal");

    let want_installed = args.quota.min(args.devices) as usize;
    let want_refused = (args.devices - args.quota.min(args.devices)) as usize;
    let ok = audit.ok
        && failed == 0
        && unreported == 0
        && installed == want_installed
        && refused == want_refused
        && quota_refusals == want_refused
        && status.installed == want_installed as i64;

    if json {
        let devices: Vec<_> = summaries
            .iter()
            .flat_map(|(station, s)| s.devices.iter().map(move |d| (station, d)))
            .map(|(station, d)| agent_ui::device_json(station, &d.probe, d.attempts, &d.outcome))
            .collect();
        let aborted_devices = summaries.iter().flat_map(|(_, s)| &s.devices).filter(|d| d.outcome.is_aborted()).count();
        println!(
            "{}",
            serde_json::json!({
                "type": "demo",
                "ok": ok && !aborted,
                "devices": devices.len(),
                "installed": installed,
                "refused": refused,
                "quota_refusals": quota_refusals,
                "failed": failed,
                "aborted": aborted_devices,
                "unreported": unreported,
                "interrupted": if aborted { Some("abort") } else if stopped { Some("finish") } else { None },
                "batch": {
                    "id": BATCH,
                    "quota": status.quota,
                    "issued": status.issued,
                    "installed": status.installed,
                    "remaining": status.remaining,
                },
                "audit": { "ok": audit.ok, "records": audit.records, "head_hash": audit.head_hash },
                "broker": url,
                "dir": dir.display().to_string(),
                "seconds": started.elapsed().as_secs_f64(),
                "results": devices,
            })
        );
    }
    if args.keep && !stopped {
        console.over();
        say!(json);
        say!(json, "The broker keeps running on {url}. Try, in another terminal:");
        let pki_dir = dir.join("pki");
        say!(json, "  flashgate admin --broker {url} --pki {} --name ops batch status {BATCH}", pki_dir.display());
        say!(json, "  flashgate admin --broker {url} --pki {} --name ops stations", pki_dir.display());
        say!(json, "  flashgate admin --broker {url} --pki {} --name ops audit verify", pki_dir.display());
        say!(json, "Ctrl-C to stop.");
        let mut stopping = stop.finish.clone();
        let _ = stopping.wait_for(|s| *s).await;
    }
    for s in stations {
        s.sim.shutdown().await?;
    }
    broker.shutdown().await?;
    if aborted || (stopped && !ok) {
        let aborted_devices = summaries.iter().flat_map(|(_, s)| &s.devices).filter(|d| d.outcome.is_aborted()).count();
        return Err(crate::exit::with(
            crate::exit::Exit::Interrupted,
            anyhow::anyhow!(
                "stopped by Ctrl-C: {installed} installed, {refused} refused, {failed} failed ({aborted_devices} \
                 aborted)"
            ),
        ));
    }
    if !ok {
        bail!(
            "the demo did not end as expected: {installed} installed (want {want_installed}), {refused} refused \
             (want {want_refused}), {failed} failed, {unreported} unreported, audit ok = {}",
            audit.ok
        );
    }
    Ok(())
}
