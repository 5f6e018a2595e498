//! The running simulator: `SimConfig`, `Simulator::start` serving target `i` as a raw byte stream
//! on TCP port `listen.port() + i` (one connection at a time per target; a new connection replaces
//! the previous one, which may be dead without the simulator knowing) and, with `pty`, on a
//! pseudo-terminal; the persister tasks of `--state-dir`; and `SimTarget`, the in-memory entry
//! point (a bootloader over a tokio duplex) for tests and the demo.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flashgate_common::cert::{ChipCertificate, VendorCa};
use flashgate_common::family::Family;
use flashgate_common::protocol::SfiState;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::bootloader;
use crate::device::{ChipIdentity, Device};
use crate::fault::FaultConfig;
use crate::link::{DEFAULT_BAUD, DEFAULT_FRAME_TIMEOUT, LinkConfig};
use crate::state::{self, PersistSignal, Snapshot, StateError, Urgency};

/// Buffer size of the in-memory duplex of `SimTarget::connect`.
const DUPLEX_BUFFER: usize = 64 * 1024;

/// The simulator could not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A configuration value is unusable.
    #[error("invalid simulator configuration: {field} = {value}: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A TCP port could not be bound.
    #[error("target {target}: cannot listen on {addr}: {source}")]
    Bind {
        /// Target number.
        target: usize,
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A pseudo-terminal could not be opened.
    #[error("target {target}: cannot open a pseudo-terminal: {source}")]
    Pty {
        /// Target number.
        target: usize,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The state directory could not be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// A background task failed.
    #[error("simulator task failed: {0}")]
    Task(String),
}

/// Configuration of a simulator run.
pub struct SimConfig {
    /// Family of every target.
    pub family: Family,
    /// Number of targets.
    pub targets: usize,
    /// Address of target 0; target `i` listens on port `listen.port() + i` (port 0: every target
    /// gets an ephemeral port, see `RunningSimulator::tcp_addrs`).
    pub listen: SocketAddr,
    /// The vendor CA that certifies the targets' chip keys.
    pub vendor_ca: VendorCa,
    /// Persist targets here across restarts.
    pub state_dir: Option<PathBuf>,
    /// Speed factor: 1 = real time, 0 = no delays.
    pub speed: f64,
    /// Modelled baud rate.
    pub baud: u32,
    /// Also serve each target on a pseudo-terminal.
    pub pty: bool,
    /// Probability per byte of a dropped byte.
    pub drop_rate: f64,
    /// Probability per byte of a corrupted byte.
    pub corrupt_rate: f64,
    /// Fault injection seed.
    pub seed: u64,
    /// Real-time limit between two bytes of a frame.
    pub frame_timeout: Duration,
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("family", &self.family)
            .field("targets", &self.targets)
            .field("listen", &self.listen)
            .field("state_dir", &self.state_dir)
            .field("speed", &self.speed)
            .field("baud", &self.baud)
            .field("pty", &self.pty)
            .field("drop_rate", &self.drop_rate)
            .field("corrupt_rate", &self.corrupt_rate)
            .field("seed", &self.seed)
            .field("frame_timeout", &self.frame_timeout)
            .finish_non_exhaustive()
    }
}

impl SimConfig {
    /// Defaults: real time (speed 1), 115200 baud, no pty, no faults, seed 0, 250 ms frame
    /// timeout, no state directory.
    pub fn new(family: Family, targets: usize, listen: SocketAddr, vendor_ca: VendorCa) -> Self {
        SimConfig {
            family,
            targets,
            listen,
            vendor_ca,
            state_dir: None,
            speed: 1.0,
            baud: DEFAULT_BAUD,
            pty: false,
            drop_rate: 0.0,
            corrupt_rate: 0.0,
            seed: 0,
            frame_timeout: DEFAULT_FRAME_TIMEOUT,
        }
    }

    /// The link parameters every target uses.
    pub fn link_config(&self) -> LinkConfig {
        LinkConfig {
            baud: self.baud,
            speed: self.speed,
            frame_timeout: self.frame_timeout,
            faults: FaultConfig { drop_rate: self.drop_rate, corrupt_rate: self.corrupt_rate, seed: self.seed },
        }
    }

    fn validate(&self) -> Result<(), SimError> {
        let bad = |field, value: String, reason| Err(SimError::Config { field, value, reason });
        if self.targets == 0 {
            return bad("targets", "0".into(), "at least one target is needed");
        }
        if usize::from(self.listen.port()) + self.targets > 65_536 && self.listen.port() != 0 {
            return bad("listen", self.listen.to_string(), "port + targets exceeds 65535");
        }
        if !(self.speed >= 0.0 && self.speed.is_finite()) {
            return bad("speed", self.speed.to_string(), "must be 0 (no delays) or a positive factor");
        }
        if self.baud == 0 {
            return bad("baud", "0".into(), "must be positive");
        }
        for (field, rate) in [("drop_rate", self.drop_rate), ("corrupt_rate", self.corrupt_rate)] {
            if !(0.0..=1.0).contains(&rate) {
                return bad(field, rate.to_string(), "must be a probability between 0 and 1");
            }
        }
        if self.drop_rate + self.corrupt_rate > 1.0 {
            return bad(
                "drop_rate + corrupt_rate",
                (self.drop_rate + self.corrupt_rate).to_string(),
                "must not exceed 1",
            );
        }
        Ok(())
    }
}

struct TargetInner {
    index: usize,
    device: Mutex<Device>,
    synced: AtomicBool,
    link: LinkConfig,
    next_connection: AtomicU64,
    persist: PersistSignal,
    /// Serialises saves of this target so the newest snapshot is always the last written.
    save_lock: Mutex<()>,
    /// The state directory, when the simulator persists (`--state-dir`).
    state_dir: std::sync::OnceLock<PathBuf>,
}

/// Shared access to one simulated target (its device and bootloader line state).
#[derive(Clone)]
pub struct TargetHandle {
    inner: Arc<TargetInner>,
}

impl std::fmt::Debug for TargetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetHandle").field("index", &self.inner.index).finish_non_exhaustive()
    }
}

impl TargetHandle {
    /// A handle owning `device`, target number `index`.
    pub fn new(index: usize, device: Device, link: LinkConfig) -> Self {
        TargetHandle {
            inner: Arc::new(TargetInner {
                index,
                device: Mutex::new(device),
                synced: AtomicBool::new(false),
                link,
                next_connection: AtomicU64::new(0),
                persist: PersistSignal::default(),
                save_lock: Mutex::new(()),
                state_dir: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Target number.
    pub fn index(&self) -> usize {
        self.inner.index
    }

    /// The link parameters.
    pub fn link(&self) -> &LinkConfig {
        &self.inner.link
    }

    /// Run `f` on the device under its lock (keep it short: never across an await).
    pub fn with_device<R>(&self, f: impl FnOnce(&mut Device) -> R) -> R {
        // A panic while holding the lock cannot leave the device half-updated in a way that
        // matters more than stopping the simulator would; keep serving.
        let mut guard = self.inner.device.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut guard)
    }

    /// The chip certificate.
    pub fn certificate(&self) -> ChipCertificate {
        self.with_device(|d| d.identity().certificate().clone())
    }

    /// A copy of the whole flash.
    pub fn flash_image(&self) -> Vec<u8> {
        self.with_device(|d| d.flash().as_bytes().to_vec())
    }

    /// The SFI state.
    pub fn sfi_state(&self) -> SfiState {
        self.with_device(|d| d.sfi_state())
    }

    /// Whether the bootloader has seen `0x7F` since the last reset.
    pub fn synced(&self) -> bool {
        self.inner.synced.load(Ordering::SeqCst)
    }

    pub(crate) fn set_synced(&self, synced: bool) {
        self.inner.synced.store(synced, Ordering::SeqCst);
    }

    pub(crate) fn next_connection_id(&self) -> u64 {
        self.inner.next_connection.fetch_add(1, Ordering::SeqCst)
    }

    pub(crate) fn changed(&self, urgency: Urgency) {
        self.inner.persist.mark(urgency);
    }

    /// Save the state now, before the bootloader answers (an install's end: INSTALL, a failure, ABORT),
    /// so that `flashgate sim dump` run next, while the simulator runs, shows what the chip holds.
    pub(crate) async fn persist_now(&self) {
        let Some(dir) = self.inner.state_dir.get().cloned() else { return };
        let t = self.clone();
        match tokio::task::spawn_blocking(move || t.save_now(&dir)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(target = self.index(), error = %e, "saving state failed"),
            Err(e) => tracing::error!(target = self.index(), error = %e, "state saver task failed"),
        }
    }

    /// Save the current state into `dir` (blocking file I/O; saves of one target never overlap,
    /// and each takes its snapshot under the save lock, so the newest state is written last).
    fn save_now(&self, dir: &Path) -> Result<(), StateError> {
        let _guard = self.inner.save_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let snap = self.with_device(|d| Snapshot::of(d));
        state::save(dir, self.index(), &snap)
    }

    /// Serve this target's bootloader over `io` until the stream closes, in a tracing span.
    pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&self, io: S, transport: &str) {
        let span = tracing::info_span!("target", index = self.index(), transport);
        async {
            match bootloader::serve(io, self).await {
                Ok(stats) => tracing::info!(
                    commands = stats.commands,
                    nacks = stats.nacks,
                    timeouts = stats.timeouts,
                    "connection closed"
                ),
                Err(e) => tracing::warn!(error = %e, "connection failed"),
            }
        }
        .instrument(span)
        .await
    }
}

/// One connection slot per target: a new connection replaces (aborts) the previous one.
#[derive(Default)]
struct Slot {
    current: Mutex<Option<JoinHandle<()>>>,
}

impl Slot {
    fn replace(&self, task: JoinHandle<()>) -> bool {
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let replaced = cur.as_ref().is_some_and(|t| !t.is_finished());
        if let Some(old) = cur.replace(task) {
            old.abort();
        }
        replaced
    }

    fn abort(&self) {
        if let Some(old) = self.current.lock().unwrap_or_else(PoisonError::into_inner).take() {
            old.abort();
        }
    }
}

/// Entry point of the TCP/pty simulator.
#[derive(Debug)]
pub struct Simulator;

/// A running simulator.
pub struct RunningSimulator {
    family: Family,
    state_dir: Option<PathBuf>,
    targets: Vec<TargetHandle>,
    tcp_addrs: Vec<SocketAddr>,
    pty_paths: Vec<PathBuf>,
    /// Slave descriptors kept open so the masters never see EIO.
    _pty_slaves: Vec<std::os::fd::OwnedFd>,
    slots: Vec<Arc<Slot>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for RunningSimulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningSimulator")
            .field("family", &self.family)
            .field("state_dir", &self.state_dir)
            .field("tcp_addrs", &self.tcp_addrs)
            .field("pty_paths", &self.pty_paths)
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Start serving `cfg.targets` targets. Identities are loaded from the state directory (and
    /// created and saved there on first start), or generated at random without one.
    pub async fn start(cfg: SimConfig) -> Result<RunningSimulator, SimError> {
        cfg.validate()?;
        let profile = cfg.family.profile();
        if let Some(dir) = &cfg.state_dir {
            std::fs::create_dir_all(dir).map_err(|source| StateError::Io { path: dir.clone(), source })?;
        }
        let link = cfg.link_config();
        let mut targets = Vec::with_capacity(cfg.targets);
        for i in 0..cfg.targets {
            let device = match &cfg.state_dir {
                Some(dir) => load_or_create(dir, i, &cfg)?,
                None => Device::new(profile, ChipIdentity::generate(profile, &cfg.vendor_ca, &mut rand::rngs::OsRng)),
            };
            targets.push(TargetHandle::new(i, device, link));
        }
        let mut running = RunningSimulator {
            family: cfg.family,
            state_dir: cfg.state_dir.clone(),
            targets: targets.clone(),
            tcp_addrs: Vec::new(),
            pty_paths: Vec::new(),
            _pty_slaves: Vec::new(),
            slots: Vec::new(),
            tasks: Vec::new(),
        };
        for target in &targets {
            let i = target.index();
            let port = if cfg.listen.port() == 0 { 0 } else { cfg.listen.port() + i as u16 };
            let addr = SocketAddr::new(cfg.listen.ip(), port);
            let listener =
                TcpListener::bind(addr).await.map_err(|source| SimError::Bind { target: i, addr, source })?;
            let local = listener.local_addr().map_err(|source| SimError::Bind { target: i, addr, source })?;
            running.tcp_addrs.push(local);
            let slot = Arc::new(Slot::default());
            running.slots.push(slot.clone());
            running.tasks.push(tokio::spawn(accept_loop(listener, target.clone(), slot)));
            if cfg.pty {
                let pty = crate::pty::open().map_err(|source| SimError::Pty { target: i, source })?;
                running.pty_paths.push(pty.path.clone());
                running._pty_slaves.push(pty.slave);
                let t = target.clone();
                let master = pty.master;
                running.tasks.push(tokio::spawn(async move { t.serve(master, "pty").await }));
            }
            if let Some(dir) = &cfg.state_dir {
                let _ = target.inner.state_dir.set(dir.clone());
                running.tasks.push(tokio::spawn(persist_loop(dir.clone(), target.clone())));
            }
            tracing::info!(
                target = i,
                family = %cfg.family,
                tcp = %local,
                device_id = %target.certificate().device_id(),
                "target ready"
            );
        }
        Ok(running)
    }
}

fn load_or_create(dir: &Path, index: usize, cfg: &SimConfig) -> Result<Device, SimError> {
    let profile = cfg.family.profile();
    let mut device = match state::load(dir, index, profile)? {
        Some(d) => d,
        None => {
            let identity = ChipIdentity::generate(profile, &cfg.vendor_ca, &mut rand::rngs::OsRng);
            tracing::info!(target = index, device_id = %identity.certificate().device_id(), "new chip identity");
            Device::new(profile, identity)
        }
    };
    let cert = device.identity().certificate().clone();
    if cert.verify(&[cfg.vendor_ca.public_key()]).is_err() {
        tracing::warn!(
            target = index,
            device_id = %cert.device_id(),
            "stored certificate is not signed by the configured vendor CA; re-certifying the same chip key"
        );
        device.recertify(&cfg.vendor_ca);
    }
    state::save(dir, index, &Snapshot::of(&device))?;
    Ok(device)
}

async fn accept_loop(listener: TcpListener, target: TargetHandle, slot: Arc<Slot>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(target = target.index(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Latency matters more than packet count on a line standing for a UART.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let t = target.clone();
        let task = tokio::spawn(async move {
            let span = tracing::info_span!("tcp", %peer);
            t.serve(stream, "tcp").instrument(span).await
        });
        if slot.replace(task) {
            tracing::info!(target = target.index(), %peer, "new connection replaces the previous one");
        } else {
            tracing::info!(target = target.index(), %peer, "connection accepted");
        }
    }
}

async fn persist_loop(dir: PathBuf, target: TargetHandle) {
    loop {
        target.inner.persist.wait().await;
        let (d, t) = (dir.clone(), target.clone());
        let index = target.index();
        match tokio::task::spawn_blocking(move || t.save_now(&d)).await {
            Ok(Ok(())) => tracing::trace!(target = index, "state saved"),
            Ok(Err(e)) => tracing::error!(target = index, error = %e, "saving state failed"),
            Err(e) => tracing::error!(target = index, error = %e, "state saver task failed"),
        }
    }
}

impl RunningSimulator {
    /// TCP address of every target, by target number.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    /// Pseudo-terminal path of every target (empty without `pty`).
    pub fn pty_paths(&self) -> &[PathBuf] {
        &self.pty_paths
    }

    /// Target `i`.
    pub fn target(&self, i: usize) -> Option<&TargetHandle> {
        self.targets.get(i)
    }

    /// Every target.
    pub fn targets(&self) -> &[TargetHandle] {
        &self.targets
    }

    /// One line per target for operators: number, family, TCP address, pty, device id, state.
    pub fn describe(&self) -> Vec<String> {
        self.targets
            .iter()
            .map(|t| {
                let i = t.index();
                let (device_id, state, rdp) = t.with_device(|d| {
                    (d.identity().certificate().device_id().to_string(), d.sfi_state(), d.rdp_level())
                });
                let pty = self.pty_paths.get(i).map(|p| format!(" pty {}", p.display())).unwrap_or_default();
                format!(
                    "target {i}: {} tcp://{}{pty} device_id {device_id} sfi {state} rdp {rdp}",
                    self.family.profile().display_name,
                    self.tcp_addrs.get(i).map(|a| a.to_string()).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Stop serving and save every target's state.
    pub async fn shutdown(mut self) -> Result<(), SimError> {
        for slot in &self.slots {
            slot.abort();
        }
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks.drain(..) {
            if let Err(e) = task.await
                && !e.is_cancelled()
            {
                return Err(SimError::Task(e.to_string()));
            }
        }
        if let Some(dir) = &self.state_dir {
            for t in &self.targets {
                let (d, t) = (dir.clone(), t.clone());
                tokio::task::spawn_blocking(move || t.save_now(&d))
                    .await
                    .map_err(|e| SimError::Task(e.to_string()))??;
            }
        }
        tracing::info!("simulator stopped");
        Ok(())
    }
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        for slot in &self.slots {
            slot.abort();
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One target in memory: the bootloader over a tokio duplex, for tests and the demo.
pub struct SimTarget {
    handle: TargetHandle,
    slot: Slot,
}

impl std::fmt::Debug for SimTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimTarget").field("handle", &self.handle).finish_non_exhaustive()
    }
}

impl SimTarget {
    /// A factory-fresh chip of `family` whose identity is derived from `seed`, certified by
    /// `vendor_ca`.
    pub fn new(family: Family, vendor_ca: &VendorCa, seed: u64, link: LinkConfig) -> Self {
        let profile = family.profile();
        Self::from_device(Device::new(profile, ChipIdentity::from_seed(profile, vendor_ca, seed)), link)
    }

    /// A factory-fresh chip with a given identity (e.g. the profile's vector chip).
    pub fn with_identity(family: Family, identity: ChipIdentity, link: LinkConfig) -> Self {
        Self::from_device(Device::new(family.profile(), identity), link)
    }

    /// A target around an existing device.
    pub fn from_device(device: Device, link: LinkConfig) -> Self {
        SimTarget { handle: TargetHandle::new(0, device, link), slot: Slot::default() }
    }

    /// Connect: the host end of a fresh duplex whose other end the bootloader serves (replacing
    /// any previous connection). Must be called inside a tokio runtime.
    pub fn connect(&self) -> DuplexStream {
        let (host, device) = tokio::io::duplex(DUPLEX_BUFFER);
        let t = self.handle.clone();
        self.slot.replace(tokio::spawn(async move { t.serve(device, "memory").await }));
        host
    }

    /// The target's handle (device access).
    pub fn handle(&self) -> &TargetHandle {
        &self.handle
    }

    /// The chip certificate.
    pub fn certificate(&self) -> ChipCertificate {
        self.handle.certificate()
    }
}

impl Drop for SimTarget {
    fn drop(&mut self) {
        self.slot.abort();
    }
}
