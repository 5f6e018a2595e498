//! The station agent driven in-process against simulated targets and a [`TestBroker`]:
//!
//! - [`sim_config`] / [`tcp_probes`]: a simulator of stm32l4 targets on 127.0.0.1 ephemeral ports
//!   and the agent's probes for them (`tcp`, ids `sim-0`, `sim-1`, …).
//! - [`TestStation`]: one station (a PKI identity of the [`World`]) with its own temporary directory
//!   holding the journal and the image cache, a [`BrokerClient`] over mutual TLS to one or more
//!   broker endpoints, the reporter, and [`TestStation::run`] / [`TestStation::spawn_run`] around
//!   [`run_batch`].
//! - [`seed_sized`]: a key, an image of a chosen size and a batch on a broker.
//! - [`holds_plaintext`] / [`check_outcomes`]: what a target's flash holds after a run, and the
//!   all-or-nothing check of every device of a run against its simulated target.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flashgate_agent::bootloader::ClientConfig;
use flashgate_agent::broker_client::{BrokerClient, Reporter, ReporterHandle, RetryPolicy};
use flashgate_agent::images::ImageCache;
use flashgate_agent::journal::{EntryState, Journal, JournalEntry};
use flashgate_agent::pipeline::{DeviceOutcome, PipelineContext, ProbeTarget};
use flashgate_agent::runner::{RunEvent, RunMode, RunOptions, RunSummary, run_batch};
use flashgate_common::cert::VendorCa;
use flashgate_common::family::Family;
use flashgate_common::protocol::SfiState;
use flashgate_common::sfi::PlainArea;
use flashgate_sim::{RunningSimulator, SimConfig, TargetHandle};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::broker::{Seeded, TestBroker, TestPki, World};

/// A simulator configuration: `targets` stm32l4 targets certified by `vendor`, on ephemeral ports
/// of 127.0.0.1, without delays (speed 0) or faults.
pub fn sim_config(vendor: &VendorCa, targets: usize) -> SimConfig {
    let mut cfg = SimConfig::new(Family::Stm32L4, targets, SocketAddr::from(([127, 0, 0, 1], 0)), vendor.clone());
    cfg.speed = 0.0;
    cfg
}

/// A `tcp` probe named `id` for the target listening on `addr`.
pub fn tcp_probe(id: &str, addr: SocketAddr) -> ProbeTarget {
    ProbeTarget { id: id.into(), kind: "tcp".into(), addr: format!("tcp://{addr}").parse().expect("tcp address") }
}

/// One `tcp` probe per target of `sim`, named `{prefix}-{i}`.
pub fn tcp_probes(sim: &RunningSimulator, prefix: &str) -> Vec<ProbeTarget> {
    sim.tcp_addrs().iter().enumerate().map(|(i, a)| tcp_probe(&format!("{prefix}-{i}"), *a)).collect()
}

/// Bootloader timeouts for loopback targets: short waits, the default retry budget, no line time.
pub fn fast_client() -> ClientConfig {
    ClientConfig {
        ack_timeout: Duration::from_millis(200),
        erase_timeout: Duration::from_secs(1),
        install_timeout: Duration::from_secs(5),
        retries: 3,
        resync_quiet: Duration::from_millis(20),
        line_baud: None,
    }
}

/// Once-per-probe options for `batch`: every probe in parallel, `max_attempts` 3, 50 ms polling.
pub fn once_per_probe(batch: &str) -> RunOptions {
    RunOptions {
        mode: RunMode::OncePerProbe,
        max_parallel: 64,
        max_attempts: 3,
        poll_interval: Duration::from_millis(50),
        ..RunOptions::new(batch)
    }
}

/// A key generated in `broker`'s HSM, a one-area stm32l4 image of `len` bytes packed under it
/// (plaintext derived from `salt`) and batch `id` with `quota` for `sites`.
pub async fn seed_sized(broker: &TestBroker, id: &str, quota: i64, sites: &[&str], len: usize, salt: u8) -> Seeded {
    let key = broker.generate_key(&format!("fw-{id}")).await;
    let (image, areas) = broker.pack_image(&key.key_id, len, salt).await;
    let batch = broker.create_batch(id, &image.sha256, quota, sites).await;
    Seeded { key_id: key.key_id, image, areas, batch }
}

/// How a [`TestStation`] talks to its brokers and targets.
#[derive(Debug, Clone)]
pub struct StationSpec {
    /// Site of the station's identity.
    pub site: String,
    /// Station number within the site.
    pub number: u32,
    /// Broker endpoints (`https://…`), in failover order.
    pub endpoints: Vec<String>,
    /// Retries of broker calls.
    pub retry: RetryPolicy,
    /// Per-RPC deadline.
    pub rpc_timeout: Duration,
    /// Bootloader timeouts and retries.
    pub bootloader: ClientConfig,
}

impl StationSpec {
    /// Station 1 of `berlin` on `endpoints`, a quick retry policy (5 rounds from 50 ms up to
    /// 500 ms), a 10 s RPC deadline and [`fast_client`].
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            site: "berlin".into(),
            number: 1,
            endpoints,
            retry: RetryPolicy { attempts: 5, initial: Duration::from_millis(50), max: Duration::from_millis(500) },
            rpc_timeout: Duration::from_secs(10),
            bootloader: fast_client(),
        }
    }
}

/// A station agent in-process: journal and image cache in a temporary directory, broker client
/// over mutual TLS with the world's PKI, and a running reporter.
pub struct TestStation {
    /// What every device install shares.
    pub ctx: PipelineContext,
    dir: tempfile::TempDir,
}

/// A run started by [`TestStation::spawn_run`].
pub struct SpawnedRun {
    /// The run; resolves to its summary.
    pub task: JoinHandle<RunSummary>,
    /// The run's events, as they happen.
    pub events: mpsc::UnboundedReceiver<RunEvent>,
    /// Set to true to stop the run after in-flight devices.
    pub stop: watch::Sender<bool>,
}

impl TestStation {
    /// A station of `world` as `spec` says.
    pub fn new(world: &World, spec: StationSpec) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let tls = world.pki.client_tls(&TestPki::station(&spec.site, spec.number));
        let broker = BrokerClient::new(spec.endpoints, tls, None)
            .expect("broker client")
            .with_retry_policy(spec.retry)
            .with_rpc_timeout(spec.rpc_timeout);
        let images = Arc::new(ImageCache::new(dir.path().join("images")).expect("image cache"));
        let journal = Arc::new(Journal::open(&dir.path().join("journal")).expect("journal"));
        let reporter = Arc::new(Reporter::spawn(journal.clone(), broker.clone()));
        let ctx = PipelineContext { broker, images, journal, reporter, bootloader: spec.bootloader };
        Self { ctx, dir }
    }

    /// The station's temporary directory (`journal/`, `images/`).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The journal.
    pub fn journal(&self) -> &Arc<Journal> {
        &self.ctx.journal
    }

    /// The reporter.
    pub fn reporter(&self) -> &Arc<ReporterHandle> {
        &self.ctx.reporter
    }

    /// Every journal entry with its state.
    pub fn entries(&self) -> Vec<(JournalEntry, EntryState)> {
        self.ctx.journal.entries().expect("journal entries")
    }

    /// Starts `run_batch` over `probes` with `opts` in a task.
    pub fn spawn_run(&self, probes: Vec<ProbeTarget>, opts: RunOptions) -> SpawnedRun {
        let (tx, events) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_batch(self.ctx.clone(), probes, opts, tx, stop_rx));
        SpawnedRun { task, events, stop }
    }

    /// Runs `opts` over `probes` to the end (bounded by `limit`): the summary and every event.
    pub async fn run(
        &self,
        probes: Vec<ProbeTarget>,
        opts: RunOptions,
        limit: Duration,
    ) -> (RunSummary, Vec<RunEvent>) {
        let SpawnedRun { task, mut events, stop } = self.spawn_run(probes, opts);
        let summary = tokio::time::timeout(limit, task)
            .await
            .unwrap_or_else(|_| panic!("the run did not end within {limit:?}"))
            .expect("run task");
        drop(stop);
        let mut all = Vec::new();
        while let Ok(e) = events.try_recv() {
            all.push(e);
        }
        (summary, all)
    }
}

/// Whether `target`'s flash holds any of the plaintext of `areas` (each area's bytes, compared
/// 16 bytes at a time at their addresses; an all-`0xFF` window of the plaintext is skipped since
/// erased flash reads the same).
pub fn holds_plaintext(target: &TargetHandle, areas: &[PlainArea]) -> bool {
    let flash = target.flash_image();
    let base = Family::Stm32L4.profile().flash_base;
    areas.iter().any(|a| {
        let start = (a.address - base) as usize;
        a.data.chunks(16).enumerate().any(|(i, w)| {
            let at = start + i * 16;
            !w.iter().all(|b| *b == 0xFF) && flash.get(at..at + w.len()) == Some(w)
        })
    })
}

/// The all-or-nothing check of a run: for every device of `summary`, find its target among
/// `targets` by device id; an installed device reports `expected_crc` and its target is
/// `installed` with the plaintext of `areas` at its addresses; any other device's target is not
/// `installed`, its flash is fully erased and holds none of the plaintext. Returns
/// (installed, not installed).
pub fn check_outcomes(
    summary: &RunSummary,
    targets: &[TargetHandle],
    areas: &[PlainArea],
    expected_crc: u32,
) -> (usize, usize) {
    let by_id: HashMap<String, &TargetHandle> =
        targets.iter().map(|t| (t.certificate().device_id().to_string(), t)).collect();
    let (mut ok, mut not) = (0, 0);
    for d in &summary.devices {
        let id = d.outcome.device_id().unwrap_or_else(|| panic!("a device without id: {d:?}"));
        let t = by_id.get(id).unwrap_or_else(|| panic!("device {id} is none of the simulated targets"));
        match &d.outcome {
            DeviceOutcome::Installed { crc, .. } => {
                assert_eq!(*crc, Some(expected_crc), "INSTALL's CRC of {id} on {}", d.probe);
                assert_eq!(t.sfi_state(), SfiState::Installed, "{id} on {}", d.probe);
                assert_eq!(t.with_device(|dev| dev.flash().crc32()), expected_crc, "flash CRC of {id}");
                let flash = t.flash_image();
                let base = Family::Stm32L4.profile().flash_base;
                for a in areas {
                    let start = (a.address - base) as usize;
                    assert_eq!(&flash[start..start + a.data.len()], &a.data[..], "plaintext of {id}");
                }
                ok += 1;
            }
            other => {
                assert_ne!(t.sfi_state(), SfiState::Installed, "{id} on {} ended {other:?} but is installed", d.probe);
                assert!(t.with_device(|dev| dev.flash().is_erased()), "{id} ({other:?}) has programmed flash");
                assert!(!holds_plaintext(t, areas), "{id} ({other:?}) holds plaintext");
                not += 1;
            }
        }
    }
    (ok, not)
}
