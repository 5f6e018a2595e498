//! The AN3155 device side of the simulator over any `AsyncRead + AsyncWrite + Unpin` byte stream:
//! sync, Get, Get Version, Get ID, Read Memory, Go, Write Memory, Extended Erase, Readout
//! Protect/Unprotect, and Special (0x50) / Extended Special (0x51) carrying the Flashgate SFI
//! opcodes (profile §5, contract "Device-side rules"), with the link pacing of `link`, the fault
//! injection of `fault` and the frame timeout.
//!
//! Framing choices beyond AN3155 and the contract:
//! * Before the first `0x7F` after a reset every byte is ignored (autobaud); `0x7F` while waiting
//!   for a command is ACKed.
//! * A buffer size over the limit (Special 128, Extended Special 1024) is consumed with its data
//!   and checksum and then NACKed, so the host's data bytes are never parsed as commands.
//! * Write Memory is lenient like the real ROMs: any length 1..=256 and any address; the flash
//!   model pads partial program words with `0xFF`.
//! * Extended Erase `0xFFFE`/`0xFFFD` erase bank 1/2 (see `Device::bank_erase`); other `0xFFFx`
//!   codes are NACKed.
//! * Go, Readout Protect and Readout Unprotect end with a chip reset: the bootloader waits for a
//!   new `0x7F`.
//! * Special / Extended Special ACK their last buffer at once; the answer (data, status, ACK)
//!   follows when the command is done, so a long wait (mass erase after a failure, INSTALL,
//!   ABORT) falls between that ACK and the first answer byte. A chunk goes to the one-chunk
//!   write buffer: only the next flash operation waits for its programming.
//! * Read Memory, Write Memory, Extended Erase and Go are NACKed right after the command bytes
//!   under RDP ≥ 1 and during an active SFI session.

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use flashgate_common::protocol::{
    ACK, BOOTLOADER_VERSION, CMD_EXTENDED_ERASE, CMD_EXTENDED_SPECIAL, CMD_GET, CMD_GET_ID, CMD_GET_VERSION, CMD_GO,
    CMD_READ_MEMORY, CMD_READOUT_PROTECT, CMD_READOUT_UNPROTECT, CMD_SPECIAL, CMD_WRITE_MEMORY, MAX_EXTENDED_BUFFER,
    MAX_SPECIAL_BUFFER, NACK, SUPPORTED_COMMANDS, SYNC, SfiOpcode, SfiStatus, xor_checksum,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::device::{Device, DeviceError};
use crate::fault::{Direction, FaultInjector, FaultStats};
use crate::link::Pacer;
use crate::server::TargetHandle;
use crate::state::Urgency;

/// A bootloader session that ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum BootloaderError {
    /// Reading from or writing to the byte stream failed.
    #[error("target {target}: byte stream failed: {source}")]
    Io {
        /// Target number.
        target: usize,
        /// What the stream said.
        source: io::Error,
    },
}

/// What a session did, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Commands executed (including NACKed ones).
    pub commands: u64,
    /// NACKs sent.
    pub nacks: u64,
    /// Frames abandoned because the frame timeout expired.
    pub timeouts: u64,
    /// Host-to-device fault injection counters.
    pub rx_faults: FaultStats,
    /// Device-to-host fault injection counters.
    pub tx_faults: FaultStats,
}

/// Why reading a frame stopped.
enum Stop {
    /// The frame timeout expired: abandon the frame.
    Timeout,
    /// The host closed the stream.
    Eof,
    /// The stream failed.
    Io(io::Error),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof => Stop::Eof,
            _ => Stop::Io(e),
        }
    }
}

/// What to do after a command.
enum Flow {
    Continue,
    /// The chip reset: wait for a new `0x7F`.
    Reset,
}

/// The device end of the serial line: received bytes through fault injection into a queue,
/// transmitted bytes paced and through fault injection.
struct Port<S> {
    io: S,
    raw: Vec<u8>,
    rxq: VecDeque<u8>,
    scratch: Vec<u8>,
    tx: Vec<u8>,
    rx_fault: FaultInjector,
    tx_fault: FaultInjector,
    pacer: Pacer,
    frame_timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Port<S> {
    /// Read from the stream until at least one byte survives the line, or the deadline passes.
    async fn fill(&mut self, deadline: Option<Instant>) -> Result<(), Stop> {
        while self.rxq.is_empty() {
            let read = self.io.read(&mut self.raw);
            let n = match deadline {
                Some(d) => match tokio::time::timeout_at(d, read).await {
                    Ok(r) => r?,
                    Err(_) => return Err(Stop::Timeout),
                },
                None => read.await?,
            };
            if n == 0 {
                return Err(Stop::Eof);
            }
            self.pacer.on_received(n);
            self.scratch.clear();
            self.rx_fault.apply(&self.raw[..n], &mut self.scratch);
            self.rxq.extend(self.scratch.iter().copied());
        }
        Ok(())
    }

    /// The first byte of a command: no timeout.
    async fn command_byte(&mut self) -> Result<u8, Stop> {
        self.fill(None).await?;
        self.rxq.pop_front().ok_or(Stop::Eof)
    }

    /// A byte inside a frame: within the frame timeout.
    async fn byte(&mut self) -> Result<u8, Stop> {
        if self.rxq.is_empty() {
            self.fill(Some(Instant::now() + self.frame_timeout)).await?;
        }
        self.rxq.pop_front().ok_or(Stop::Eof)
    }

    /// `buf.len()` bytes of a frame, each within the frame timeout of the previous.
    async fn exact(&mut self, buf: &mut [u8]) -> Result<(), Stop> {
        let mut filled = 0;
        while filled < buf.len() {
            if self.rxq.is_empty() {
                self.fill(Some(Instant::now() + self.frame_timeout)).await?;
            }
            let n = (buf.len() - filled).min(self.rxq.len());
            for (dst, src) in buf[filled..filled + n].iter_mut().zip(self.rxq.drain(..n)) {
                *dst = src;
            }
            filled += n;
        }
        Ok(())
    }

    async fn vec(&mut self, len: usize) -> Result<Vec<u8>, Stop> {
        let mut v = vec![0; len];
        self.exact(&mut v).await?;
        Ok(v)
    }

    /// Send bytes after a turnaround, paced.
    async fn send(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        self.pacer.before_send(bytes.len()).await;
        self.transmit(bytes).await
    }

    /// Send bytes that follow the device's previous bytes (no turnaround), paced.
    async fn send_continued(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        self.pacer.before_send_continued(bytes.len()).await;
        self.transmit(bytes).await
    }

    async fn transmit(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        self.tx.clear();
        self.tx_fault.apply(bytes, &mut self.tx);
        self.io.write_all(&self.tx).await?;
        self.io.flush().await?;
        Ok(())
    }
}

/// Serve the bootloader of `target` over `io` until the host closes the stream.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    target: &TargetHandle,
) -> Result<SessionStats, BootloaderError> {
    let link = *target.link();
    let conn = target.next_connection_id();
    let mut session = Session {
        port: Port {
            io,
            raw: vec![0; 4096],
            rxq: VecDeque::new(),
            scratch: Vec::new(),
            tx: Vec::new(),
            rx_fault: FaultInjector::new(link.faults, target.index(), conn, Direction::HostToDevice),
            tx_fault: FaultInjector::new(link.faults, target.index(), conn, Direction::DeviceToHost),
            pacer: Pacer::new(&link),
            frame_timeout: link.frame_timeout,
        },
        target: target.clone(),
        stats: SessionStats::default(),
    };
    tracing::debug!(conn, "bootloader session started");
    let result = session.run().await;
    let mut stats = session.stats;
    stats.rx_faults = session.port.rx_fault.stats();
    stats.tx_faults = session.port.tx_fault.stats();
    tracing::debug!(conn, ?stats, "bootloader session ended");
    result.map(|()| stats).map_err(|source| BootloaderError::Io { target: target.index(), source })
}

struct Session<S> {
    port: Port<S>,
    target: TargetHandle,
    stats: SessionStats,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    async fn run(&mut self) -> Result<(), io::Error> {
        loop {
            match self.step().await {
                Ok(Flow::Continue) => {}
                Ok(Flow::Reset) => self.target.set_synced(false),
                Err(Stop::Timeout) => {
                    self.stats.timeouts += 1;
                    tracing::debug!("frame timeout: frame abandoned");
                }
                Err(Stop::Eof) => return Ok(()),
                Err(Stop::Io(e)) => return Err(e),
            }
        }
    }

    async fn nack(&mut self) -> Result<Flow, Stop> {
        self.stats.nacks += 1;
        self.port.send(&[NACK]).await?;
        Ok(Flow::Continue)
    }

    async fn step(&mut self) -> Result<Flow, Stop> {
        let b = self.port.command_byte().await?;
        if !self.target.synced() {
            if b == SYNC {
                self.target.set_synced(true);
                self.port.send(&[ACK]).await?;
            }
            return Ok(Flow::Continue);
        }
        if b == SYNC {
            self.port.send(&[ACK]).await?;
            return Ok(Flow::Continue);
        }
        let complement = self.port.byte().await?;
        self.stats.commands += 1;
        if complement != !b {
            return self.nack().await;
        }
        tracing::trace!(command = format_args!("0x{b:02X}"), "command");
        match b {
            CMD_GET => {
                let mut r = vec![ACK, SUPPORTED_COMMANDS.len() as u8, BOOTLOADER_VERSION];
                r.extend_from_slice(&SUPPORTED_COMMANDS);
                r.push(ACK);
                self.port.send(&r).await?;
                Ok(Flow::Continue)
            }
            CMD_GET_VERSION => {
                self.port.send(&[ACK, BOOTLOADER_VERSION, 0x00, 0x00, ACK]).await?;
                Ok(Flow::Continue)
            }
            CMD_GET_ID => {
                let [hi, lo] = self.target.with_device(|d| d.profile().pid).to_be_bytes();
                self.port.send(&[ACK, 0x01, hi, lo, ACK]).await?;
                Ok(Flow::Continue)
            }
            CMD_READ_MEMORY => self.read_memory().await,
            CMD_GO => self.go().await,
            CMD_WRITE_MEMORY => self.write_memory().await,
            CMD_EXTENDED_ERASE => self.extended_erase().await,
            CMD_READOUT_PROTECT => self.readout_protect().await,
            CMD_READOUT_UNPROTECT => self.readout_unprotect().await,
            CMD_SPECIAL => self.special().await,
            CMD_EXTENDED_SPECIAL => self.extended_special().await,
            _ => self.nack().await,
        }
    }

    /// Read an address frame; `None` when its checksum is wrong.
    async fn address(&mut self) -> Result<Option<u32>, Stop> {
        let mut a = [0u8; 5];
        self.port.exact(&mut a).await?;
        if xor_checksum(&a[..4]) != a[4] {
            return Ok(None);
        }
        Ok(Some(u32::from_be_bytes([a[0], a[1], a[2], a[3]])))
    }

    fn access_refused(&self, what: &str) -> bool {
        match self.target.with_device(|d| d.access_check()) {
            Ok(()) => false,
            Err(e) => {
                tracing::debug!(error = %e, "{what} refused");
                true
            }
        }
    }

    async fn read_memory(&mut self) -> Result<Flow, Stop> {
        if self.access_refused("Read Memory") {
            return self.nack().await;
        }
        self.port.send(&[ACK]).await?;
        let Some(address) = self.address().await? else {
            return self.nack().await;
        };
        if !self.target.with_device(|d| d.address_valid(address)) {
            return self.nack().await;
        }
        self.port.send(&[ACK]).await?;
        let n = self.port.byte().await?;
        let c = self.port.byte().await?;
        if c != !n {
            return self.nack().await;
        }
        let len = usize::from(n) + 1;
        match self.target.with_device(|d| d.read_memory(address, len)) {
            Ok(data) => {
                let mut r = Vec::with_capacity(len + 1);
                r.push(ACK);
                r.extend_from_slice(&data);
                self.port.send(&r).await?;
                Ok(Flow::Continue)
            }
            Err(e) => {
                tracing::debug!(error = %e, "Read Memory refused");
                self.nack().await
            }
        }
    }

    async fn go(&mut self) -> Result<Flow, Stop> {
        if self.access_refused("Go") {
            return self.nack().await;
        }
        self.port.send(&[ACK]).await?;
        let Some(address) = self.address().await? else {
            return self.nack().await;
        };
        if let Err(e) = self.target.with_device(|d| d.go(address)) {
            tracing::debug!(error = %e, "Go refused");
            return self.nack().await;
        }
        let t = self.target.with_device(|d| d.reset());
        self.port.pacer.run_flash(t);
        self.target.changed(Urgency::Now);
        self.port.send(&[ACK]).await?;
        tracing::info!(address = format_args!("0x{address:08X}"), "Go: chip reset, waiting for 0x7F");
        Ok(Flow::Reset)
    }

    async fn write_memory(&mut self) -> Result<Flow, Stop> {
        if self.access_refused("Write Memory") {
            return self.nack().await;
        }
        self.port.send(&[ACK]).await?;
        let Some(address) = self.address().await? else {
            return self.nack().await;
        };
        if !self.target.with_device(|d| d.address_valid(address)) {
            return self.nack().await;
        }
        self.port.send(&[ACK]).await?;
        let n = self.port.byte().await?;
        let data = self.port.vec(usize::from(n) + 1).await?;
        let cs = self.port.byte().await?;
        if n ^ xor_checksum(&data) != cs {
            return self.nack().await;
        }
        self.port.pacer.wait_flash_idle();
        match self.target.with_device(|d| d.write_memory(address, &data)) {
            Ok(t) => {
                self.port.pacer.run_flash(t);
                self.target.changed(Urgency::Debounced);
                self.port.send(&[ACK]).await?;
                Ok(Flow::Continue)
            }
            Err(e) => {
                tracing::debug!(error = %e, "Write Memory refused");
                self.nack().await
            }
        }
    }

    async fn extended_erase(&mut self) -> Result<Flow, Stop> {
        if self.access_refused("Extended Erase") {
            return self.nack().await;
        }
        self.port.send(&[ACK]).await?;
        let mut nn = [0u8; 2];
        self.port.exact(&mut nn).await?;
        let n = u16::from_be_bytes(nn);
        let result = if n >= 0xFFF0 {
            let cs = self.port.byte().await?;
            if cs != nn[0] ^ nn[1] {
                return self.nack().await;
            }
            match n {
                0xFFFF => self.target.with_device(|d| d.mass_erase()),
                0xFFFE => self.target.with_device(|d| d.bank_erase(1)),
                0xFFFD => self.target.with_device(|d| d.bank_erase(2)),
                _ => return self.nack().await,
            }
        } else {
            let list = self.port.vec(2 * (usize::from(n) + 1)).await?;
            let cs = self.port.byte().await?;
            if xor_checksum(&nn) ^ xor_checksum(&list) != cs {
                return self.nack().await;
            }
            let pages: Vec<u16> = list.chunks_exact(2).map(|p| u16::from_be_bytes([p[0], p[1]])).collect();
            self.target.with_device(|d| d.erase_pages(&pages))
        };
        match result {
            Ok(t) => {
                self.port.pacer.run_flash(t);
                self.target.changed(Urgency::Now);
                self.port.send(&[ACK]).await?;
                Ok(Flow::Continue)
            }
            Err(e) => {
                tracing::debug!(error = %e, "Extended Erase refused");
                self.nack().await
            }
        }
    }

    async fn readout_protect(&mut self) -> Result<Flow, Stop> {
        self.readout_change("Readout Protect", "RDP level 1, chip reset", |d| d.readout_protect()).await
    }

    async fn readout_unprotect(&mut self) -> Result<Flow, Stop> {
        self.readout_change("Readout Unprotect", "mass erase, RDP level 0, chip reset", |d| d.readout_unprotect()).await
    }

    /// Readout Protect / Unprotect share one shape (AN3155): NACK under RDP level 2; otherwise ACK,
    /// do the change, reset the chip, and ACK again when done.
    async fn readout_change(
        &mut self,
        command: &str,
        done: &str,
        change: impl FnOnce(&mut Device) -> Result<Duration, DeviceError>,
    ) -> Result<Flow, Stop> {
        let level2 = self.target.with_device(|d| d.rdp_level() == crate::device::RdpLevel::Level2);
        if level2 {
            return self.nack().await;
        }
        self.port.send(&[ACK]).await?;
        self.port.pacer.wait_flash_idle();
        match self.target.with_device(|d| change(d).map(|t| t + d.reset())) {
            Ok(t) => {
                self.port.pacer.run_flash(t);
                self.target.changed(Urgency::Now);
                self.port.send_continued(&[ACK]).await?;
                tracing::info!("{command}: {done}");
                Ok(Flow::Reset)
            }
            Err(e) => {
                tracing::debug!(error = %e, "{command} refused");
                self.nack().await
            }
        }
    }

    /// Opcode frame of Special / Extended Special; `None` (after a NACK) when refused.
    async fn sfi_opcode(&mut self, frame: u8) -> Result<Option<SfiOpcode>, Stop> {
        let mut op = [0u8; 3];
        self.port.exact(&mut op).await?;
        if op[0] ^ op[1] != op[2] {
            self.nack().await?;
            return Ok(None);
        }
        match SfiOpcode::from_code(u16::from_be_bytes([op[0], op[1]])) {
            Some(opcode) if opcode.frame() == frame => {
                self.port.send(&[ACK]).await?;
                Ok(Some(opcode))
            }
            _ => {
                self.nack().await?;
                Ok(None)
            }
        }
    }

    /// A `u16 size` + data + XOR buffer; `None` when oversized or the checksum is wrong (the whole
    /// buffer is consumed first in both cases).
    async fn buffer(&mut self, limit: usize) -> Result<Option<Vec<u8>>, Stop> {
        let mut size = [0u8; 2];
        self.port.exact(&mut size).await?;
        let len = usize::from(u16::from_be_bytes(size));
        let data = self.port.vec(len).await?;
        let cs = self.port.byte().await?;
        if len > limit || xor_checksum(&size) ^ xor_checksum(&data) != cs {
            return Ok(None);
        }
        Ok(Some(data))
    }

    /// Run an SFI command on the device with the write-buffer timing.
    fn execute(&mut self, opcode: SfiOpcode, buf1: &[u8], buf2: &[u8]) -> crate::device::SfiReply {
        let touches_flash = !matches!(opcode, SfiOpcode::GetState | SfiOpcode::GetCertificate);
        if touches_flash {
            // One-operation write buffer: wait for the previous flash operation.
            self.port.pacer.wait_flash_idle();
        }
        let reply = self.target.with_device(|d| d.sfi(opcode, buf1, buf2));
        if reply.synchronous {
            self.port.pacer.run_flash(reply.flash_time);
        } else {
            self.port.pacer.start_flash(reply.flash_time);
        }
        if touches_flash {
            let urgency = match (opcode, reply.status) {
                (SfiOpcode::WriteChunk, SfiStatus::Ok) => Urgency::Debounced,
                _ => Urgency::Now,
            };
            self.target.changed(urgency);
        }
        if reply.status != SfiStatus::Ok {
            tracing::info!(opcode = %opcode, status = %reply.status, "SFI command refused");
        } else {
            tracing::debug!(opcode = %opcode, "SFI command ok");
        }
        reply
    }

    async fn special(&mut self) -> Result<Flow, Stop> {
        self.port.send(&[ACK]).await?;
        let Some(opcode) = self.sfi_opcode(CMD_SPECIAL).await? else {
            return Ok(Flow::Continue);
        };
        let Some(data) = self.buffer(MAX_SPECIAL_BUFFER).await? else {
            return self.nack().await;
        };
        // ACK the frame at once; the answer follows when the command is done.
        self.port.send(&[ACK]).await?;
        let reply = self.execute(opcode, &data, &[]);
        if matches!(opcode, SfiOpcode::Install | SfiOpcode::Abort) || reply.status != SfiStatus::Ok {
            self.target.persist_now().await;
        }
        let mut r = Vec::with_capacity(reply.data.len() + 8);
        r.extend_from_slice(&(reply.data.len() as u16).to_be_bytes());
        r.extend_from_slice(&reply.data);
        r.extend_from_slice(&2u16.to_be_bytes());
        r.extend_from_slice(&reply.status.code().to_be_bytes());
        r.push(ACK);
        self.port.send_continued(&r).await?;
        Ok(Flow::Continue)
    }

    async fn extended_special(&mut self) -> Result<Flow, Stop> {
        self.port.send(&[ACK]).await?;
        let Some(opcode) = self.sfi_opcode(CMD_EXTENDED_SPECIAL).await? else {
            return Ok(Flow::Continue);
        };
        let Some(buf1) = self.buffer(MAX_SPECIAL_BUFFER).await? else {
            return self.nack().await;
        };
        self.port.send(&[ACK]).await?;
        let Some(buf2) = self.buffer(MAX_EXTENDED_BUFFER).await? else {
            return self.nack().await;
        };
        // ACK the frame at once (a chunk goes to the write buffer); the status follows when
        // the command is done.
        self.port.send(&[ACK]).await?;
        let reply = self.execute(opcode, &buf1, &buf2);
        if reply.status != SfiStatus::Ok {
            // The session failed (the flash was mass-erased): on disk before the answer.
            self.target.persist_now().await;
        }
        let [hi, lo] = reply.status.code().to_be_bytes();
        self.port.send_continued(&[0x00, 0x02, hi, lo, ACK]).await?;
        Ok(Flow::Continue)
    }
}
