//! The install pipeline for one device on one probe: connect and sync, Get ID and family check,
//! GET_CERTIFICATE, IssueLicence (bounded retries; a retry gets the same licence), the encrypted image
//! from the local cache (fetched from the broker, SHA-256 checked), SET_LICENCE, header, areas in
//! chunks of at most 1024 bytes, INSTALL, the CRC check, then the result into the journal (fsync) and
//! on to the broker through the reporter. Device status codes become plain messages; a failed device
//! may be retried with the same licence, consuming no quota. When no broker answers (for the licence
//! or the image) the device is not failed: nothing was written to it, nothing is journalled, and the
//! outcome [`DeviceOutcome::BrokerUnreachable`] tells the runner to try it again once a broker answers.
//! An operator's abort abandons a device before INSTALL and journals it as failed ([`ABORTED`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flashgate_common::cert::ChipCertificate;
use flashgate_common::family::Family;
use flashgate_common::protocol::SfiStatus;
use flashgate_proto::v1::{IssueLicenceRequest, ProbeInfo as PbProbe};
use tokio::sync::watch;
use tracing::Instrument;

use flashgate_common::sfi::{AsyncImageReader, ImageReader, ReaderOptions};

use crate::bootloader::{Bootloader, BootloaderError, ClientConfig, InstallStage, Progress, TargetAddr, connect};
use crate::broker_client::{BrokerClient, BrokerError, ReporterHandle};
use crate::images::ImageCache;
use crate::journal::{DeviceResult, Journal, JournalError};

pub use crate::journal::HOST_FAILURE;

/// A probe's target, as the pipeline needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// Stable probe id.
    pub id: String,
    /// Probe kind (`usb-serial`, `serial`, `tcp`, `sim`).
    pub kind: String,
    /// Where the target is reached.
    pub addr: TargetAddr,
}

impl ProbeTarget {
    /// The probe as the API describes it (`ProbeInfo` of `IssueLicence` and the station stream).
    pub fn to_pb(&self) -> PbProbe {
        PbProbe { probe_id: self.id.clone(), kind: self.kind.clone(), port: self.addr.to_string() }
    }
}

/// What the pipeline shares across devices.
#[derive(Clone)]
pub struct PipelineContext {
    /// The broker(s).
    pub broker: BrokerClient,
    /// Encrypted images on disk.
    pub images: Arc<ImageCache>,
    /// The local result journal.
    pub journal: Arc<Journal>,
    /// Sends journal entries to the broker.
    pub reporter: Arc<ReporterHandle>,
    /// Bootloader timeouts and retries.
    pub bootloader: ClientConfig,
}

impl std::fmt::Debug for PipelineContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineContext").finish_non_exhaustive()
    }
}

/// A progress event of one probe, for the operator's display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageEvent {
    /// Talking to the bootloader (sync, Get ID, certificate).
    Identify,
    /// Asking the broker for the licence.
    Licence {
        /// The device.
        device_id: String,
    },
    /// Fetching the encrypted image.
    Image,
    /// No broker answered; the device waits on its fixture until one does.
    WaitingForBroker,
    /// The journal cannot be written ("PATH: reason"): the probe takes no new board until it can.
    JournalFault {
        /// The path and the reason.
        message: String,
    },
    /// Installing: bytes sent of total.
    Install {
        /// The stage.
        stage: InstallStage,
        /// Ciphertext bytes acknowledged.
        done: u64,
        /// Total ciphertext bytes.
        total: u64,
    },
}

/// The outcome of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceOutcome {
    /// Installed and verified (INSTALL's CRC matched when the broker knew it).
    Installed {
        /// The device.
        device_id: String,
        /// INSTALL's CRC, when its answer arrived.
        crc: Option<u32>,
    },
    /// The broker refused the licence (quota exhausted, batch paused, …); nothing was written to the device.
    Refused {
        /// The device.
        device_id: String,
        /// The stable refusal reason, e.g. `QUOTA_EXHAUSTED`.
        reason: String,
        /// The broker's message.
        message: String,
    },
    /// No broker answered when the device needed one (its licence or the image), after the broker
    /// client's retries and failover; nothing was written to the device and nothing journalled. Not a
    /// verdict: the runner tries the device again once a broker answers (final only when the run is
    /// stopped meanwhile).
    BrokerUnreachable {
        /// The device.
        device_id: String,
        /// The last error, in words.
        message: String,
    },
    /// The board on the fixture is readout protected (already installed, most likely): its certificate
    /// cannot be read, so no licence was asked for and nothing was written to it.
    Locked {
        /// What the probe shows.
        message: String,
    },
    /// The install failed (device status or host-side failure); the device holds no plaintext.
    Failed {
        /// The device, when its certificate was read.
        device_id: Option<String>,
        /// SFI status code, or [`HOST_FAILURE`].
        status_code: u16,
        /// What went wrong, in words.
        message: String,
    },
}

/// How the message of a device aborted by the operator begins (a [`DeviceOutcome::Failed`] whose
/// result is journalled and reported like any failure: the licence stays valid for a retry).
pub const ABORTED: &str = "aborted by the operator";

impl DeviceOutcome {
    /// A device whose install the operator aborted ([`ABORTED`]) before INSTALL was sent.
    pub fn is_aborted(&self) -> bool {
        matches!(self, Self::Failed { message, .. } if message.starts_with(ABORTED))
    }

    /// The device id, when known.
    pub fn device_id(&self) -> Option<&str> {
        match self {
            Self::Installed { device_id, .. }
            | Self::Refused { device_id, .. }
            | Self::BrokerUnreachable { device_id, .. } => Some(device_id),
            Self::Failed { device_id, .. } => device_id.as_deref(),
            Self::Locked { .. } => None,
        }
    }
}

/// A bootloader error in words, with the SFI status code when the device answered one.
pub fn describe_bootloader_error(e: &BootloaderError) -> (u16, String) {
    match e.device_status() {
        Some(s) => (s.code(), format!("device refused: {} (status {:#06x})", s.message(), s.code())),
        None => (HOST_FAILURE, e.to_string()),
    }
}

/// The device identity read from a target before installing: its family and certificate.
#[derive(Debug, Clone)]
pub struct Identified {
    /// Family from Get ID.
    pub family: Family,
    /// The raw 136-byte certificate.
    pub certificate: Vec<u8>,
    /// `hex(SHA-256(chip_pub))[0..32]`.
    pub device_id: String,
}

/// The refusal reason of a device whose station the broker refused at the TLS handshake.
pub const STATION_REFUSED: &str = "STATION_REFUSED";

/// What the message of a locked board says on its probe and in the journal.
pub const LOCKED_MESSAGE: &str = "device is readout protected (already installed?)";

/// An open bootloader session on an identified device: one session per board, from the runner's look
/// at the fixture to the verdict, passed into [`install_device`] (a board swapped in between would
/// otherwise go unnoticed until the chip refused its licence).
pub struct Session {
    /// The open, synchronised bootloader.
    pub bootloader: Bootloader<Box<dyn crate::bootloader::Transport>>,
    /// What identification found.
    pub device: Identified,
    /// How long connecting and identifying took (the journal's `identify` timing).
    pub identified_in: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("device", &self.device.device_id).finish_non_exhaustive()
    }
}

/// What a look at a probe's fixture found.
#[derive(Debug)]
pub enum Found {
    /// No bootloader answered, or it answered something that is no device of the profile.
    Nothing {
        /// Why, in words (for logs).
        why: String,
    },
    /// A readout-protected board: [`LOCKED_MESSAGE`].
    Locked,
    /// An identified device, its session open.
    Device(Box<Session>),
}

/// Connect, sync and identify the device on `addr`, keeping the session open.
pub async fn look(addr: &TargetAddr, cfg: &ClientConfig) -> Found {
    let started = Instant::now();
    let mut bl = match open(addr, cfg).await {
        Ok(bl) => bl,
        Err(e) => return Found::Nothing { why: e.to_string() },
    };
    match identify(&mut bl).await {
        Ok(device) => Found::Device(Box::new(Session { bootloader: bl, device, identified_in: started.elapsed() })),
        Err((code, _)) if code == SfiStatus::ReadoutProtected.code() => Found::Locked,
        Err((_, why)) => Found::Nothing { why },
    }
}

/// Connects to a target and syncs; returns the bootloader session.
pub async fn open(
    addr: &TargetAddr,
    cfg: &ClientConfig,
) -> Result<Bootloader<Box<dyn crate::bootloader::Transport>>, BootloaderError> {
    let io = connect(addr).await?;
    let mut bl = Bootloader::new(io, cfg.clone());
    bl.sync().await?;
    Ok(bl)
}

/// Get ID, family check and GET_CERTIFICATE.
pub async fn identify<T: crate::bootloader::Transport>(bl: &mut Bootloader<T>) -> Result<Identified, (u16, String)> {
    let pid = bl.get_id().await.map_err(|e| describe_bootloader_error(&e))?;
    let family = Family::from_pid(pid)
        .ok_or_else(|| (HOST_FAILURE, format!("Get ID answered PID {pid:#05x}, which is no family of the profile")))?;
    let raw = bl.get_certificate().await.map_err(|e| describe_bootloader_error(&e))?;
    let cert = ChipCertificate::parse(&raw)
        .map_err(|e| (HOST_FAILURE, format!("the chip certificate does not parse: {e}")))?;
    if Family::from_product_id(&cert.product_id) != Some(family) {
        return Err((
            HOST_FAILURE,
            format!("Get ID says {family} but the chip certificate names product {}", cert.product_id_str()),
        ));
    }
    Ok(Identified { family, certificate: raw.to_vec(), device_id: cert.device_id().to_string() })
}

/// Runs the pipeline for the device of `session` on `target` for `batch_id` (attempt number `attempt`
/// for this device on this station), journals the result and hands it to the reporter. `events`
/// receives progress. `abort` set to true (the operator's second Ctrl-C) abandons the device where it
/// is — unless INSTALL was already sent, whose answer is then awaited (the chip decides from there
/// on, and an unknown result would be lost) — and journals it as failed with [`ABORTED`]: a licensed
/// device's result is reported to the broker like any failure; the next attempt on the board aborts
/// the chip's open SFI session, which erases what it received.
/// A dropped `abort` sender means no abort.
pub async fn install_device(
    ctx: &PipelineContext,
    target: &ProbeTarget,
    session: Session,
    batch_id: &str,
    attempt: u32,
    events: &(dyn Fn(StageEvent) + Send + Sync),
    abort: &watch::Receiver<bool>,
) -> DeviceOutcome {
    let span = tracing::info_span!("device", probe = %target.id, batch = %batch_id, device = %session.device.device_id);
    async {
        let started = Instant::now();
        let mut timings: Vec<(String, u64)> = Vec::new();
        let mut licensed = false;
        let device_id = session.device.device_id.clone();
        // Set once INSTALL is on its way: from then on the chip decides, and the verdict is awaited.
        let committed = AtomicBool::new(false);
        let watched = |e: StageEvent| {
            if let StageEvent::Install {
                stage: InstallStage::Install | InstallStage::Verify | InstallStage::Finished,
                ..
            } = &e
            {
                committed.store(true, Ordering::Release);
            }
            events(e);
        };
        let outcome = {
            let work = run(ctx, target, session, batch_id, &watched, &mut timings, &mut licensed);
            tokio::pin!(work);
            tokio::select! {
                biased;
                o = &mut work => o,
                () = aborted(abort.clone()) => {
                    if committed.load(Ordering::Acquire) {
                        tracing::info!("abort asked after INSTALL was sent: waiting for the chip's verdict");
                        work.await
                    } else {
                        tracing::info!("aborted by the operator before INSTALL");
                        DeviceOutcome::Failed {
                            device_id: Some(device_id.clone()),
                            status_code: HOST_FAILURE,
                            message: format!(
                                "{ABORTED} before INSTALL: not installed (the next attempt on this board \
                                 erases what it received; the licence stays valid)"
                            ),
                        }
                    }
                }
            }
        };
        timings.push(("total".into(), started.elapsed().as_micros() as u64));
        let result = match &outcome {
            DeviceOutcome::Installed { .. } => "installed",
            DeviceOutcome::Refused { .. } => "refused",
            DeviceOutcome::BrokerUnreachable { .. } => "broker_unreachable",
            DeviceOutcome::Failed { .. } => "failed",
            DeviceOutcome::Locked { .. } => "locked",
        };
        metrics::counter!("flashgate_agent_devices_total", "result" => result).increment(1);
        metrics::histogram!("flashgate_agent_device_seconds", "result" => result)
            .record(started.elapsed().as_secs_f64());
        match record(ctx, target, batch_id, attempt, &outcome, licensed, timings).await {
            Ok(()) => outcome,
            // A result that cannot be made durable is never counted as done.
            Err(why) => DeviceOutcome::Failed {
                device_id: outcome.device_id().map(str::to_owned),
                status_code: HOST_FAILURE,
                message: format!("{}, but the result is not durable: {why}", outcome_word(&outcome)),
            },
        }
    }
    .instrument(span)
    .await
}

/// Resolves when `abort` turns true; never when its sender is gone without having aborted.
pub async fn aborted(mut abort: watch::Receiver<bool>) {
    if abort.wait_for(|a| *a).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn lap(timings: &mut Vec<(String, u64)>, stage: &str, since: &mut Instant) {
    timings.push((stage.to_owned(), since.elapsed().as_micros() as u64));
    *since = Instant::now();
}

async fn run(
    ctx: &PipelineContext,
    target: &ProbeTarget,
    session: Session,
    batch_id: &str,
    events: &(dyn Fn(StageEvent) + Send + Sync),
    timings: &mut Vec<(String, u64)>,
    licensed: &mut bool,
) -> DeviceOutcome {
    let failed = |device_id: Option<String>, (status_code, message): (u16, String)| DeviceOutcome::Failed {
        device_id,
        status_code,
        message,
    };
    let Session { bootloader: mut bl, device: id, identified_in } = session;
    timings.push(("identify".to_owned(), identified_in.as_micros() as u64));
    let mut t = Instant::now();

    events(StageEvent::Licence { device_id: id.device_id.clone() });
    let req = IssueLicenceRequest {
        batch_id: batch_id.to_owned(),
        chip_certificate: id.certificate.clone(),
        probe: Some(target.to_pb()),
    };
    let lic = match ctx.broker.issue_licence(req).await {
        Ok(r) => {
            // A witness of the ledger's history: a 217-byte parse and, when newer, one small file write.
            ctx.journal.note_checkpoint(&r.checkpoint);
            r
        }
        Err(BrokerError::Refused { refusal, .. }) => {
            return DeviceOutcome::Refused {
                device_id: id.device_id,
                reason: refusal.reason,
                message: refusal.message,
            };
        }
        Err(BrokerError::Unauthorised { why, .. }) => {
            // The station itself is refused (revoked, expired, foreign CA, broker name mismatch):
            // a refusal that ends the run, not an outage to wait out.
            return DeviceOutcome::Refused {
                device_id: id.device_id,
                reason: STATION_REFUSED.to_owned(),
                message: why.to_string(),
            };
        }
        Err(e @ BrokerError::Unreachable { .. }) => {
            return DeviceOutcome::BrokerUnreachable { device_id: id.device_id, message: format!("no licence: {e}") };
        }
        Err(e) => return failed(Some(id.device_id), (HOST_FAILURE, format!("no licence: {e}"))),
    };
    lap(timings, "licence", &mut t);
    *licensed = true;
    if lic.family != id.family.name() {
        return failed(
            Some(id.device_id),
            (HOST_FAILURE, format!("the chip is {} but batch {batch_id}'s image is for {}", id.family, lic.family)),
        );
    }
    let licence: [u8; 132] = match lic.licence.as_slice().try_into() {
        Ok(l) => l,
        Err(_) => {
            return failed(
                Some(id.device_id),
                (HOST_FAILURE, format!("the broker sent a {}-byte licence (expected 132)", lic.licence.len())),
            );
        }
    };

    events(StageEvent::Image);
    let expect = crate::images::Expect {
        size: Some(lic.image_size),
        max: flashgate_common::sfi::max_image_file(id.family.profile()),
    };
    let path = match ctx.broker.fetch_image(&ctx.images, &lic.image_sha256, expect).await {
        Ok(p) => p,
        Err(e) if e.is_retryable() => {
            return DeviceOutcome::BrokerUnreachable {
                device_id: id.device_id,
                message: format!("image {}: {e}", lic.image_sha256),
            };
        }
        Err(e) => return failed(Some(id.device_id), (HOST_FAILURE, format!("image {}: {e}", lic.image_sha256))),
    };
    // The whole image is checked (structure, sizes, the family's memory map) before the first byte
    // goes to the chip, then streamed from disk for the install: never held in memory whole.
    // Once per image and family per process (a cached image does not change), not once per device.
    let total = match ctx.images.checked(&lic.image_sha256, id.family) {
        Some(total) => total,
        None => match check_image(&path, id.family).await {
            Ok(total) => {
                ctx.images.note_checked(&lic.image_sha256, id.family, total);
                total
            }
            Err(e) => return failed(Some(id.device_id), (HOST_FAILURE, format!("image {}: {e}", lic.image_sha256))),
        },
    };
    let mut image = match open_image(&path, id.family).await {
        Ok(i) => i,
        Err(e) => return failed(Some(id.device_id), (HOST_FAILURE, format!("image {}: {e}", lic.image_sha256))),
    };
    lap(timings, "image", &mut t);

    // Durably noted before the first SFI command: if the agent dies after INSTALL took effect, the
    // board (then readout protected) is recognised on restart and its result recovered.
    if let Err(e) = ctx.journal.begin(&target.id, batch_id, &id.device_id) {
        // Nothing was written to the device: no result to journal or report (the board is not
        // taken; the runner sees the journal fault and takes no other either).
        return failed(None, (HOST_FAILURE, format!("device {} not installed: {e}", id.device_id)));
    }
    let mut progress = |p: &Progress| events(StageEvent::Install { stage: p.stage, done: p.done, total });
    let report = match bl.install_image(&mut image, &licence, &mut progress).await {
        Ok(r) => r,
        Err(e) => return failed(Some(id.device_id), describe_bootloader_error(&e)),
    };
    lap(timings, "install", &mut t);
    if let (Some(want), Some(got)) = (lic.expected_flash_crc, report.crc)
        && want != got
    {
        return failed(
            Some(id.device_id),
            (HOST_FAILURE, format!("flash CRC {got:#010x} after INSTALL differs from the image's {want:#010x}")),
        );
    }
    DeviceOutcome::Installed { device_id: id.device_id, crc: report.crc }
}

type ImageFile = AsyncImageReader<tokio::io::BufReader<tokio::fs::File>>;

/// Read the whole image at `path` once, checking its structure against `family`'s memory map
/// without keeping it; its ciphertext length.
async fn check_image(path: &std::path::Path, family: Family) -> Result<u64, String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        let len = file.metadata().map_err(|e| format!("reading {}: {e}", path.display()))?.len();
        let opts = ReaderOptions { file_len: Some(len), memory_map: Some(family.profile()) };
        let mut reader = ImageReader::new(std::io::BufReader::new(file), opts).map_err(|e| e.to_string())?;
        let mut total = 0u64;
        while let Some(area) = reader.next_area().map_err(|e| e.to_string())? {
            total += area.ciphertext.len() as u64;
        }
        Ok(total)
    })
    .await
    .map_err(|e| format!("checking the image: {e}"))?
}

/// Open the image at `path` to stream it area by area.
async fn open_image(path: &std::path::Path, family: Family) -> Result<ImageFile, String> {
    let file = tokio::fs::File::open(path).await.map_err(|e| format!("opening {}: {e}", path.display()))?;
    let len = file.metadata().await.map_err(|e| format!("reading {}: {e}", path.display()))?.len();
    let opts = ReaderOptions { file_len: Some(len), memory_map: Some(family.profile()) };
    AsyncImageReader::new(tokio::io::BufReader::new(file), opts).await.map_err(|e| e.to_string())
}

fn outcome_word(o: &DeviceOutcome) -> &'static str {
    match o {
        DeviceOutcome::Installed { .. } => "installed",
        DeviceOutcome::Refused { .. } => "refused",
        DeviceOutcome::Locked { .. } => "locked",
        DeviceOutcome::Failed { .. } | DeviceOutcome::BrokerUnreachable { .. } => "failed",
    }
}

/// Journals the outcome (fsync) and wakes the reporter. When the journal cannot be written, the
/// result is held in memory and delivered to a broker directly; `Err` (why, in words) when it is
/// neither on disk nor acknowledged by a broker. Devices that got no licence (refused, or the
/// broker unreachable) are journalled for this station's history only: the broker counts installs of
/// licensed devices, and recorded every refusal itself.
async fn record(
    ctx: &PipelineContext,
    target: &ProbeTarget,
    batch_id: &str,
    attempt: u32,
    outcome: &DeviceOutcome,
    licensed: bool,
    timings: Vec<(String, u64)>,
) -> Result<(), String> {
    let (status_code, message, flash_crc) = match outcome {
        DeviceOutcome::Installed { crc, .. } => (SfiStatus::Ok.code(), "installed".to_owned(), *crc),
        DeviceOutcome::Refused { reason, message, .. } => {
            (HOST_FAILURE, format!("refused ({reason}): {message}"), None)
        }
        DeviceOutcome::Failed { status_code, message, .. } => (*status_code, message.clone(), None),
        DeviceOutcome::Locked { message } => (SfiStatus::ReadoutProtected.code(), message.clone(), None),
        DeviceOutcome::BrokerUnreachable { device_id, message } => {
            // Nothing happened to the device: there is no result to keep, it will be tried again.
            tracing::warn!(probe = %target.id, device = %device_id, %message, "no broker reachable; nothing written to the device");
            return Ok(());
        }
    };
    // A locked board's certificate could not be read: journalled under no device id, on this station only.
    let device_id = match outcome {
        DeviceOutcome::Locked { .. } => Some(""),
        other => other.device_id(),
    };
    let Some(device_id) = device_id else {
        // Nothing identified the device: there is nothing to count against a batch.
        tracing::warn!(probe = %target.id, %message, "device failed before it was identified");
        return Ok(());
    };
    let result = DeviceResult {
        batch_id: batch_id.to_owned(),
        device_id: device_id.to_owned(),
        status_code,
        message,
        flash_crc,
        attempt,
        probe_id: target.id.clone(),
        probe_kind: target.kind.clone(),
        probe_port: target.addr.to_string(),
        timings,
        finished_at_ms: now_ms(),
    };
    if !licensed {
        let why = "local only: no licence was issued for this device (nothing to report)".to_owned();
        // History only (the broker recorded the refusal itself): a failure here loses nothing the
        // broker needs, but the station still stops taking boards until the journal is writable.
        if let Err(e) = ctx.journal.append_local_async(result, why).await {
            tracing::error!(error = %e, device = device_id, "could not journal the device result");
        }
        return Ok(());
    }
    match ctx.journal.append_async(result).await {
        Ok(_) => {
            ctx.reporter.notify();
            Ok(())
        }
        Err(JournalError::NotDurable { reason, entry, path }) => {
            // Held in memory: deliver it now, and count it only once a broker acknowledged it.
            let why = format!("journal not writable: {}: {reason}", path.display());
            match ctx.broker.report_install(crate::journal::to_report(&entry)).await {
                Ok(_) => {
                    let _ = ctx.journal.mark_reported(entry.seq);
                    tracing::warn!(device = device_id, result_id = %entry.result_id, "{why}; the result was delivered to the broker directly");
                    Ok(())
                }
                Err(e) => {
                    ctx.reporter.notify();
                    Err(format!("{why}; no broker acknowledged it either ({e}); held in memory"))
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, device = device_id, "could not journal the device result");
            Err(e.to_string())
        }
    }
}

/// A locked board on `target` whose install the journal shows as begun and never finished (the agent
/// was killed after INSTALL took effect): if GET_STATE says installed, its result is recorded as
/// installed (INSTALL's CRC was never seen) and reported like any other. `None` when the board is
/// not installed after all (the intent is then forgotten).
pub async fn recover_interrupted(
    ctx: &PipelineContext,
    target: &ProbeTarget,
    intent: &crate::journal::Intent,
) -> Option<DeviceOutcome> {
    let mut bl = open(&target.addr, &ctx.bootloader).await.ok()?;
    let (state, _) = bl.get_state().await.ok()?;
    if state != flashgate_common::protocol::SfiState::Installed {
        ctx.journal.clear_interrupted(&target.id);
        return None;
    }
    tracing::warn!(probe = %target.id, device = %intent.device_id, batch = %intent.batch_id, "recovered an install interrupted after INSTALL: the board reports installed");
    let outcome = DeviceOutcome::Installed { device_id: intent.device_id.clone(), crc: None };
    let timings = vec![("recovered".to_owned(), 0)];
    match record(ctx, target, &intent.batch_id, 1, &outcome, true, timings).await {
        Ok(()) => Some(outcome),
        Err(why) => Some(DeviceOutcome::Failed {
            device_id: Some(intent.device_id.clone()),
            status_code: HOST_FAILURE,
            message: format!("installed, but the result is not durable: {why}"),
        }),
    }
}

/// Journal a readout-protected board found on `target` (its own outcome; no licence was asked for).
pub async fn record_locked(ctx: &PipelineContext, target: &ProbeTarget, batch_id: &str) -> DeviceOutcome {
    let outcome = DeviceOutcome::Locked { message: LOCKED_MESSAGE.to_owned() };
    let _ = record(ctx, target, batch_id, 1, &outcome, false, Vec::new()).await;
    outcome
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// How long to wait between attempts to find a responding bootloader on a probe.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_abort_resolves_once_set_and_never_when_its_sender_is_gone() {
        let (tx, rx) = watch::channel(false);
        let waiting = tokio::spawn(aborted(rx.clone()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        tx.send(true).unwrap_or_default();
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("abort seen").expect("task");

        let (gone, rx) = watch::channel(false);
        drop(gone);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), aborted(rx)).await.is_err(),
            "a dropped sender aborted"
        );
    }

    #[test]
    fn an_aborted_outcome_is_a_failure_that_says_so() {
        let o = DeviceOutcome::Failed {
            device_id: Some("d".into()),
            status_code: HOST_FAILURE,
            message: format!("{ABORTED} before INSTALL"),
        };
        assert!(o.is_aborted());
        let f = DeviceOutcome::Failed { device_id: None, status_code: HOST_FAILURE, message: "link lost".into() };
        assert!(!f.is_aborted());
    }
}
