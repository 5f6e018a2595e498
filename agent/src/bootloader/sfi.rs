//! The Flashgate SFI opcodes (profile v1 §5) on top of Special / Extended Special, and the
//! install pipeline that sends a licence, an image header and every encrypted area to a device,
//! then INSTALL, reporting progress as it goes ([`Bootloader::install_image`]).
//!
//! Device statuses become [`BootloaderError::Device`]. Answers carry no checksum, so each
//! attempt checks their shape (a known 2-byte status, data of the opcode's size) and a mangled
//! one is retried like a NACK; the chip certificate is read twice and must match.

use std::collections::VecDeque;
use std::future::Future;
use std::io::Read;
use std::time::{Duration, Instant};

use flashgate_common::family::FamilyProfile;
use flashgate_common::protocol::{MAX_EXTENDED_BUFFER, SfiOpcode, SfiState, SfiStatus};
use flashgate_common::sfi::{
    AreaType, AsyncImageReader, DESCRIPTOR_LEN, EncryptedArea, HEADER_LEN, ImageReader, ReaderOptions, SfiError,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use super::client::{Bootloader, LinkStats, Reply};
use super::error::BootloaderError;

/// Length of the chip certificate GET_CERTIFICATE returns (profile §3).
pub const CERTIFICATE_LEN: usize = flashgate_common::cert::CERT_LEN;
/// Length of a licence SET_LICENCE carries (profile §4).
pub const LICENCE_LEN: usize = flashgate_common::licence::LICENCE_LEN;
/// Largest WRITE_CHUNK payload.
pub const MAX_CHUNK: usize = MAX_EXTENDED_BUFFER;

/// Where an install is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallStage {
    /// Sending the licence (the device mass-erases its flash first).
    SetLicence,
    /// Sending the image header.
    SetImageHeader,
    /// Sending an area's descriptor and ciphertext.
    WriteArea {
        /// The area's 1-based index.
        index: u16,
        /// The area's type.
        area_type: AreaType,
    },
    /// INSTALL: the device verifies, applies option bytes and raises RDP.
    Install,
    /// GET_STATE after INSTALL.
    Verify,
    /// Installed.
    Finished,
}

/// One progress report: the stage and the ciphertext bytes sent so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The current stage.
    pub stage: InstallStage,
    /// Ciphertext bytes acknowledged by the device so far.
    pub done: u64,
    /// Ciphertext bytes of the whole image, when the source knows it.
    pub total: Option<u64>,
}

/// Receives progress reports during [`Bootloader::install_image`] (like probe-rs's flash
/// progress): one at every stage change and one after every chunk. Closures `FnMut(&Progress)`
/// implement it.
pub trait InstallProgress: Send {
    /// One report.
    fn report(&mut self, progress: &Progress);
}

impl<F: FnMut(&Progress) + Send> InstallProgress for F {
    fn report(&mut self, progress: &Progress) {
        self(progress)
    }
}

/// A progress sink that ignores every report.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl InstallProgress for NoProgress {
    fn report(&mut self, _progress: &Progress) {}
}

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    /// CRC-32 of the whole flash as INSTALL answered it; `None` when INSTALL took effect but
    /// its answer was lost on the line (GET_STATE then confirmed `installed`).
    pub crc: Option<u32>,
    /// Areas sent.
    pub areas: u16,
    /// Ciphertext bytes sent.
    pub bytes: u64,
    /// Wall-clock time from SET_LICENCE to the final GET_STATE.
    pub duration: Duration,
    /// Link counters over the install (retries, resyncs, bytes on the wire).
    pub link: LinkStats,
}

/// A source of an encrypted image for [`Bootloader::install_image`]: its header bytes, then its
/// areas in file order. Implemented by the common crate's [`ImageReader`] (blocking reads; fine
/// for files and memory) and [`AsyncImageReader`], and by [`MemoryImage`].
pub trait AreaSource: Send {
    /// The 28 header bytes as they are in the file.
    fn header_bytes(&self) -> [u8; HEADER_LEN];
    /// Ciphertext bytes of all areas, when known (for progress totals).
    fn total_ciphertext(&self) -> Option<u64> {
        None
    }
    /// The next area, or `None` after the last.
    fn next_area(&mut self) -> impl Future<Output = Result<Option<EncryptedArea>, SfiError>> + Send;
}

impl<R: Read + Send> AreaSource for ImageReader<R> {
    fn header_bytes(&self) -> [u8; HEADER_LEN] {
        self.header().to_bytes()
    }

    fn next_area(&mut self) -> impl Future<Output = Result<Option<EncryptedArea>, SfiError>> + Send {
        std::future::ready(ImageReader::next_area(self))
    }
}

impl<R: AsyncRead + Unpin + Send> AreaSource for AsyncImageReader<R> {
    fn header_bytes(&self) -> [u8; HEADER_LEN] {
        self.header().to_bytes()
    }

    fn next_area(&mut self) -> impl Future<Output = Result<Option<EncryptedArea>, SfiError>> + Send {
        AsyncImageReader::next_area(self)
    }
}

/// A whole image read into memory and validated (every area read before anything is sent, so a
/// malformed file is refused before the device's flash is touched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryImage {
    header: [u8; HEADER_LEN],
    areas: VecDeque<EncryptedArea>,
    total: u64,
}

impl MemoryImage {
    /// Read and validate an image file's bytes (against `memory_map` when given).
    pub fn from_bytes(bytes: &[u8], memory_map: Option<&'static FamilyProfile>) -> Result<Self, SfiError> {
        let opts = ReaderOptions { file_len: Some(bytes.len() as u64), memory_map };
        let mut reader = ImageReader::new(bytes, opts)?;
        let header = reader.header().to_bytes();
        let mut areas = VecDeque::new();
        while let Some(area) = reader.next_area()? {
            areas.push_back(area);
        }
        let total = areas.iter().map(|a| a.ciphertext.len() as u64).sum();
        Ok(MemoryImage { header, areas, total })
    }

    /// The areas still to be sent.
    pub fn areas(&self) -> impl Iterator<Item = &EncryptedArea> {
        self.areas.iter()
    }
}

impl AreaSource for MemoryImage {
    fn header_bytes(&self) -> [u8; HEADER_LEN] {
        self.header
    }

    fn total_ciphertext(&self) -> Option<u64> {
        Some(self.total)
    }

    fn next_area(&mut self) -> impl Future<Output = Result<Option<EncryptedArea>, SfiError>> + Send {
        std::future::ready(Ok(self.areas.pop_front()))
    }
}

/// Turn a checked SFI reply into the caller's result.
fn sfi_result(opcode: SfiOpcode, reply: Reply) -> Result<Reply, BootloaderError> {
    match reply.sfi_status() {
        SfiStatus::Ok => Ok(reply),
        status => Err(BootloaderError::Device { opcode, status }),
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Bootloader<T> {
    /// An SFI command carried by Special.
    async fn sfi_special(&mut self, opcode: SfiOpcode, first: Duration) -> Result<Reply, BootloaderError> {
        let reply = self.run_special(opcode.name().to_string(), opcode.code(), &[], first, Some(opcode)).await?;
        sfi_result(opcode, reply)
    }

    /// An SFI command carried by Extended Special.
    async fn sfi_extended(
        &mut self,
        command: String,
        opcode: SfiOpcode,
        buf1: &[u8],
        buf2: &[u8],
    ) -> Result<Reply, BootloaderError> {
        let first = self.config().erase_timeout;
        let reply = self.run_extended_special(command, opcode.code(), buf1, buf2, first, Some(opcode)).await?;
        sfi_result(opcode, reply)
    }

    /// GET_CERTIFICATE: the 136-byte chip certificate. Read twice (responses carry no
    /// checksum) and returned only when two consecutive reads agree; up to `retries` extra
    /// reads are made before giving up with [`BootloaderError::CertificateUnstable`].
    pub async fn get_certificate(&mut self) -> Result<[u8; CERTIFICATE_LEN], BootloaderError> {
        let wait = self.config().ack_timeout;
        let read = |reply: Reply| -> [u8; CERTIFICATE_LEN] {
            let mut cert = [0u8; CERTIFICATE_LEN];
            // The reply was checked to hold exactly CERTIFICATE_LEN bytes.
            cert.copy_from_slice(&reply.data[..CERTIFICATE_LEN]);
            cert
        };
        let mut previous = read(self.sfi_special(SfiOpcode::GetCertificate, wait).await?);
        let mut reads = 1;
        loop {
            let current = read(self.sfi_special(SfiOpcode::GetCertificate, wait).await?);
            reads += 1;
            if current == previous {
                return Ok(current);
            }
            tracing::warn!(reads, "chip certificate differs between reads");
            if reads > self.config().retries + 1 {
                return Err(BootloaderError::CertificateUnstable { reads });
            }
            previous = current;
        }
    }

    /// SET_LICENCE: the 132-byte licence. The device mass-erases its flash and opens the
    /// licence ("licence invalid", "licence is for another product" on failure).
    pub async fn set_licence(&mut self, licence: &[u8; LICENCE_LEN]) -> Result<(), BootloaderError> {
        let op = SfiOpcode::SetLicence;
        self.sfi_extended(op.name().into(), op, &[], licence).await?;
        Ok(())
    }

    /// SET_IMAGE_HEADER: the 28-byte image header (its tag is checked against the licence's key).
    pub async fn set_image_header(&mut self, header: &[u8; HEADER_LEN]) -> Result<(), BootloaderError> {
        let op = SfiOpcode::SetImageHeader;
        self.sfi_extended(op.name().into(), op, &[], header).await?;
        Ok(())
    }

    /// START_AREA: the 30-byte descriptor of the next area.
    pub async fn start_area(&mut self, descriptor: &[u8; DESCRIPTOR_LEN]) -> Result<(), BootloaderError> {
        let op = SfiOpcode::StartArea;
        let index = u16::from_le_bytes([descriptor[2], descriptor[3]]);
        self.sfi_extended(format!("START_AREA of area {index}"), op, &[], descriptor).await?;
        Ok(())
    }

    /// WRITE_CHUNK: up to 1024 bytes of the current area's ciphertext at `offset` within it.
    pub async fn write_chunk(&mut self, offset: u32, data: &[u8]) -> Result<(), BootloaderError> {
        let op = SfiOpcode::WriteChunk;
        let command = format!("WRITE_CHUNK at offset {offset}");
        self.sfi_extended(command, op, &offset.to_be_bytes(), data).await?;
        Ok(())
    }

    /// INSTALL: the device verifies everything, applies option bytes, raises RDP and answers
    /// the CRC-32 of its whole flash. When a retried INSTALL is answered "readout protected"
    /// and GET_STATE says `installed`, the first attempt took effect but its answer was lost:
    /// that is [`BootloaderError::InstallAnswerLost`].
    pub async fn install(&mut self) -> Result<u32, BootloaderError> {
        let op = SfiOpcode::Install;
        let wait = self.config().install_timeout;
        let reply = self.run_special(op.name().into(), op.code(), &[], wait, Some(op)).await?;
        match reply.sfi_status() {
            // Checked: an ok INSTALL reply holds exactly 4 bytes.
            SfiStatus::Ok => Ok(u32::from_be_bytes([reply.data[0], reply.data[1], reply.data[2], reply.data[3]])),
            SfiStatus::ReadoutProtected if reply.attempts > 1 => match self.get_state().await? {
                (SfiState::Installed, _) => Err(BootloaderError::InstallAnswerLost),
                _ => Err(BootloaderError::Device { opcode: op, status: SfiStatus::ReadoutProtected }),
            },
            status => Err(BootloaderError::Device { opcode: op, status }),
        }
    }

    /// GET_STATE: the device's SFI state and the last status it answered.
    pub async fn get_state(&mut self) -> Result<(SfiState, u16), BootloaderError> {
        let wait = self.config().ack_timeout;
        let reply = self.sfi_special(SfiOpcode::GetState, wait).await?;
        let d = &reply.data;
        // Checked: an ok GET_STATE reply holds 3 bytes and a known state.
        let state = SfiState::from_code(d[0]).unwrap_or(SfiState::Failed);
        Ok((state, u16::from_be_bytes([d[1], d[2]])))
    }

    /// ABORT: the device mass-erases whatever was written and the session ends (`failed`).
    /// A retried ABORT refused with a status is accepted when GET_STATE shows the session
    /// ended (`failed` or `idle`).
    pub async fn abort(&mut self) -> Result<(), BootloaderError> {
        let op = SfiOpcode::Abort;
        let wait = self.config().erase_timeout;
        let reply = self.run_special(op.name().into(), op.code(), &[], wait, Some(op)).await?;
        match reply.sfi_status() {
            SfiStatus::Ok => Ok(()),
            status => {
                if reply.attempts > 1 && matches!(self.get_state().await?.0, SfiState::Failed | SfiState::Idle) {
                    return Ok(());
                }
                Err(BootloaderError::Device { opcode: op, status })
            }
        }
    }

    /// Before a new session: GET_STATE, and an SFI session left open by an interrupted install (the
    /// host killed, the link dropped, Ctrl-C) is ended with ABORT — the device mass-erases what that
    /// session wrote — so SET_LICENCE is not refused as out of sequence and the attempt is not lost.
    /// A device already installed is refused here, before its licence is sent.
    pub async fn end_interrupted_session(&mut self) -> Result<(), BootloaderError> {
        let (state, last_status) = self.get_state().await?;
        match state {
            SfiState::Idle | SfiState::Failed => Ok(()),
            SfiState::Installed => {
                Err(BootloaderError::Device { opcode: SfiOpcode::SetLicence, status: SfiStatus::ReadoutProtected })
            }
            SfiState::LicenceAccepted
            | SfiState::HeaderAccepted
            | SfiState::AreaInProgress
            | SfiState::AreasComplete => {
                tracing::warn!(
                    %state,
                    last_status = format_args!("{last_status:#06x}"),
                    "an interrupted SFI session is still open on the device; aborting it before installing"
                );
                self.abort().await
            }
        }
    }

    /// Install an encrypted image: GET_STATE (an interrupted session is aborted first), SET_LICENCE, SET_IMAGE_HEADER, then for each area
    /// START_AREA and WRITE_CHUNKs of at most 1024 bytes, then INSTALL, then GET_STATE, which
    /// must say `installed`. Progress goes to `progress` at every stage and after every chunk.
    ///
    /// A device status ends the install at once (the device has already mass-erased and
    /// failed the session). Any other failure after the licence was accepted (the image
    /// source failing, the link giving up) sends a best-effort ABORT so no plaintext stays in
    /// flash, then returns the original error.
    pub async fn install_image<S: AreaSource>(
        &mut self,
        image: &mut S,
        licence: &[u8; LICENCE_LEN],
        progress: &mut dyn InstallProgress,
    ) -> Result<InstallReport, BootloaderError> {
        let span = tracing::info_span!("install_image");
        self.install_image_inner(image, licence, progress).instrument(span).await
    }

    async fn install_image_inner<S: AreaSource>(
        &mut self,
        image: &mut S,
        licence: &[u8; LICENCE_LEN],
        progress: &mut dyn InstallProgress,
    ) -> Result<InstallReport, BootloaderError> {
        let started = Instant::now();
        let before = self.stats();
        let total = image.total_ciphertext();
        let mut done = 0u64;
        self.end_interrupted_session().await?;
        progress.report(&Progress { stage: InstallStage::SetLicence, done, total });
        self.set_licence(licence).await?;
        let result = self.install_after_licence(image, progress, total, &mut done).await;
        let (crc, areas) = match result {
            Ok(v) => v,
            Err(e) => {
                if e.device_status().is_none() {
                    tracing::warn!(error = %e, "install interrupted; aborting the session");
                    if let Err(abort) = self.abort().await {
                        tracing::warn!(error = %abort, "ABORT after a failed install failed too");
                    }
                }
                return Err(e);
            }
        };
        progress.report(&Progress { stage: InstallStage::Verify, done, total });
        let (state, last_status) = self.get_state().await?;
        if state != SfiState::Installed {
            return Err(BootloaderError::NotInstalled { state, last_status });
        }
        progress.report(&Progress { stage: InstallStage::Finished, done, total });
        let after = self.stats();
        let link = LinkStats {
            commands: after.commands - before.commands,
            retries: after.retries - before.retries,
            resyncs: after.resyncs - before.resyncs,
            bytes_sent: after.bytes_sent - before.bytes_sent,
            bytes_received: after.bytes_received - before.bytes_received,
        };
        let report = InstallReport { crc, areas, bytes: done, duration: started.elapsed(), link };
        tracing::info!(?report, "image installed");
        Ok(report)
    }

    /// Header, areas and INSTALL; returns the CRC (if its answer arrived) and the area count.
    async fn install_after_licence<S: AreaSource>(
        &mut self,
        image: &mut S,
        progress: &mut dyn InstallProgress,
        total: Option<u64>,
        done: &mut u64,
    ) -> Result<(Option<u32>, u16), BootloaderError> {
        progress.report(&Progress { stage: InstallStage::SetImageHeader, done: *done, total });
        self.set_image_header(&image.header_bytes()).await?;
        let mut areas = 0u16;
        while let Some(area) = image.next_area().await? {
            let d = &area.descriptor;
            let stage = InstallStage::WriteArea { index: d.index, area_type: d.area_type };
            progress.report(&Progress { stage, done: *done, total });
            self.start_area(&d.to_bytes()).await?;
            let mut offset = 0u32;
            for chunk in area.ciphertext.chunks(MAX_CHUNK) {
                self.write_chunk(offset, chunk).await?;
                // Chunks are ≤ 1024 bytes and areas ≤ 16 MiB, so this cannot overflow.
                offset += chunk.len() as u32;
                *done += chunk.len() as u64;
                progress.report(&Progress { stage, done: *done, total });
            }
            areas = areas.saturating_add(1);
        }
        progress.report(&Progress { stage: InstallStage::Install, done: *done, total });
        match self.install().await {
            Ok(crc) => Ok((Some(crc), areas)),
            Err(BootloaderError::InstallAnswerLost) => {
                tracing::warn!("INSTALL took effect but its answer (the flash CRC) was lost");
                Ok((None, areas))
            }
            Err(e) => Err(e),
        }
    }
}
