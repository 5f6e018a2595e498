//! The AN3155 command client: frames every standard command of SFI profile v1 §5 byte for byte,
//! reads and checks the device's answers, and retries at frame level. A NACK, a timeout or a
//! garbled answer makes the client drain the line until it is quiet, resynchronise with `0x7F`
//! (ACK or NACK both mean "in sync") and resend the whole command, at most
//! [`ClientConfig::retries`] times. Each host frame goes out with one `write_all` and one flush;
//! answers are read through a buffer, so a command costs no more system calls than frames.
//!
//! The SFI opcodes on top of Special / Extended Special live in [`super::sfi`].

use std::time::Duration;

use flashgate_common::protocol::{
    ACK, CMD_EXTENDED_ERASE, CMD_EXTENDED_SPECIAL, CMD_GET, CMD_GET_ID, CMD_GET_VERSION, CMD_GO, CMD_READ_MEMORY,
    CMD_READOUT_PROTECT, CMD_READOUT_UNPROTECT, CMD_SPECIAL, CMD_WRITE_MEMORY, MASS_ERASE, MAX_EXTENDED_BUFFER,
    MAX_MEMORY_BLOCK, MAX_SPECIAL_BUFFER, NACK, SYNC, SfiOpcode, SfiState, SfiStatus, address_frame, command_frame,
    xor_checksum,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::time::{Instant, timeout};
use tracing::Instrument;

use super::error::BootloaderError;

/// Largest response data a Special command may announce before the client calls it garbled.
pub const MAX_RESPONSE_DATA: usize = MAX_EXTENDED_BUFFER;
/// Longest silence a resync waits for before its `0x7F` (after repeated failures).
const MAX_RESYNC_QUIET: Duration = Duration::from_secs(2);
/// Largest number of bytes a drain discards before it calls the line babbling.
const MAX_DRAIN: usize = 64 * 1024;

/// Timeouts and retry budget of a [`Bootloader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Wait for an ACK (or the next answer byte) after a frame, not counting the frame's own
    /// time on the wire (see `line_baud`). Also bounds each write.
    pub ack_timeout: Duration,
    /// Wait for one erase operation (a mass erase or one page): Extended Erase waits this per
    /// page listed, Readout Protect / Unprotect once; and the first answer byte of every SFI
    /// command that may touch flash waits this long (SET_LICENCE and ABORT mass-erase,
    /// and any SFI error in a session mass-erases before the device answers).
    pub erase_timeout: Duration,
    /// Wait for the answer to INSTALL (verification, option bytes, RDP).
    pub install_timeout: Duration,
    /// How many times a command is resent after a transient failure (so `retries + 1`
    /// attempts). Resynchronising after a failure has its own budget of the same size.
    pub retries: u32,
    /// The line counts as quiet (drained) once no byte arrived for this long; each failed
    /// resynchronisation attempt quadruples it (up to 2 s) so a device stuck in a frame times out.
    pub resync_quiet: Duration,
    /// Baud rate of the line, when known: every wait is extended by the time the frame or
    /// answer needs on the wire at 11 bits per byte. `None` adds nothing (in-memory links).
    pub line_baud: Option<u32>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            ack_timeout: Duration::from_millis(1000),
            erase_timeout: Duration::from_secs(5),
            install_timeout: Duration::from_secs(60),
            retries: 3,
            resync_quiet: Duration::from_millis(50),
            line_baud: Some(115_200),
        }
    }
}

/// Counters of a client's traffic, for logs, tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Commands completed successfully.
    pub commands: u64,
    /// Commands resent after a transient failure.
    pub retries: u64,
    /// Resynchronisations (`0x7F`) sent.
    pub resyncs: u64,
    /// Bytes written to the transport.
    pub bytes_sent: u64,
    /// Bytes read from the transport (including drained ones).
    pub bytes_received: u64,
}

/// Answer to Get Version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionInfo {
    /// Bootloader protocol version, e.g. `0x31` for 3.1.
    pub version: u8,
    /// The two option bytes the device reports (legacy, usually zero).
    pub option_bytes: [u8; 2],
}

/// What Extended Erase should erase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Erase {
    /// The whole flash (page code `0xFFFF`).
    Mass,
    /// These pages (1 to 0xFFF0 of them).
    Pages(Vec<u16>),
}

/// Answer to Special (`0x50`): the response data and the status bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpecialResponse {
    /// Response data (`u16 data_size` + data on the wire).
    pub data: Vec<u8>,
    /// Status bytes (`u16 status_size` + status on the wire).
    pub status: Vec<u8>,
}

/// One host frame of a command: its bytes, how it is called in messages, how long its ACK
/// may take.
struct Frame {
    bytes: Vec<u8>,
    stage: &'static str,
    ack: Duration,
}

/// What the device sends after the last frame's ACK.
enum Expect {
    /// Nothing.
    Nothing,
    /// `N`, then `N + 1` bytes, then ACK (Get, Get ID); optionally exactly this many bytes.
    Counted(Option<usize>),
    /// Exactly this many bytes, then ACK (Get Version).
    Fixed(usize),
    /// Exactly this many bytes, no ACK (Read Memory).
    Raw(usize),
    /// A second ACK once the operation finished (Readout Protect / Unprotect).
    SecondAck(Duration),
    /// `u16 data_size` + data, `u16 status_size` + status, ACK; first byte within the duration.
    Special(Duration, Option<SfiOpcode>),
    /// `u16 status_size` + status, ACK; first byte within the duration.
    Status(Duration, Option<SfiOpcode>),
}

/// A whole command: its name for messages and spans, its frames, and its answer.
struct Request {
    command: String,
    frames: Vec<Frame>,
    expect: Expect,
}

/// The device's answer to one command.
#[derive(Debug, Default)]
pub(super) struct Reply {
    /// Data bytes (Get, Get ID, Get Version, Read Memory, Special response data).
    pub data: Vec<u8>,
    /// Status bytes (Special, Extended Special).
    pub status: Vec<u8>,
    /// How many times the command was sent before it succeeded.
    pub attempts: u32,
}

impl Reply {
    /// The SFI status, for replies already checked to carry a known 2-byte status.
    pub fn sfi_status(&self) -> SfiStatus {
        match self.status.as_slice() {
            [hi, lo] => SfiStatus::from_code(u16::from_be_bytes([*hi, *lo])),
            _ => None,
        }
        // `attempt` retries SFI replies without a known 2-byte status, so for them the
        // fallback is unreachable; an unchecked reply reports BadState rather than panic.
        .unwrap_or(SfiStatus::BadState)
    }
}

/// Response data length an SFI opcode must carry when its status is ok (`None`: any).
fn sfi_data_len(opcode: SfiOpcode) -> Option<usize> {
    match opcode {
        SfiOpcode::GetCertificate => Some(flashgate_common::cert::CERT_LEN),
        SfiOpcode::Install => Some(4),
        SfiOpcode::GetState => Some(3),
        _ => None,
    }
}

/// A size-prefixed buffer: `u16 size` MSB first, the data, XOR of size bytes and data.
fn buffer_frame(data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(data.len() + 3);
    // Callers bound data to ≤ 1024 bytes, so the length fits in u16.
    f.extend_from_slice(&(data.len() as u16).to_be_bytes());
    f.extend_from_slice(data);
    f.push(xor_checksum(&f));
    f
}

/// A 16-bit opcode MSB first plus its XOR.
fn opcode_frame(opcode: u16) -> Vec<u8> {
    let b = opcode.to_be_bytes();
    vec![b[0], b[1], b[0] ^ b[1]]
}

/// An AN3155 bootloader client over any byte stream.
pub struct Bootloader<T> {
    io: BufReader<T>,
    cfg: ClientConfig,
    stats: LinkStats,
    /// Whether the device has answered a `0x7F` since the client started or the device last
    /// reset (Go, Readout Protect and Readout Unprotect reset it).
    synced: bool,
}

impl<T> std::fmt::Debug for Bootloader<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootloader").field("cfg", &self.cfg).field("stats", &self.stats).finish()
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Bootloader<T> {
    /// A client over `io`. Nothing is sent until the first command, which synchronises first
    /// (see [`Self::sync`]) unless [`Self::sync`] was called.
    pub fn new(io: T, cfg: ClientConfig) -> Self {
        Bootloader { io: BufReader::with_capacity(4096, io), cfg, stats: LinkStats::default(), synced: false }
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// Traffic counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Give the transport back (unread buffered bytes are lost).
    pub fn into_inner(self) -> T {
        self.io.into_inner()
    }

    // ----- standard commands -------------------------------------------------------------

    /// Synchronise: drain the line, send `0x7F`, accept ACK (fresh autobaud) or NACK (already
    /// synchronised devices may take `0x7F` as an unknown command). Retried like a command.
    pub async fn sync(&mut self) -> Result<(), BootloaderError> {
        let span = tracing::debug_span!("bootloader", command = "sync");
        async {
            self.resync("sync").await?;
            self.synced = true;
            self.stats.commands += 1;
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Get (`0x00`): the bootloader version and the command codes it supports.
    pub async fn get(&mut self) -> Result<(u8, Vec<u8>), BootloaderError> {
        let req = self.simple("Get", CMD_GET, Expect::Counted(None));
        let mut data = self.execute(req).await?.data;
        // Counted answers hold at least one byte (N + 1 with N ≥ 0).
        let version = data.remove(0);
        Ok((version, data))
    }

    /// Get Version (`0x01`): the protocol version and two option bytes.
    pub async fn get_version(&mut self) -> Result<VersionInfo, BootloaderError> {
        let req = self.simple("Get Version", CMD_GET_VERSION, Expect::Fixed(3));
        let d = self.execute(req).await?.data;
        Ok(VersionInfo { version: d[0], option_bytes: [d[1], d[2]] })
    }

    /// Get ID (`0x02`): the product id (PID), e.g. `0x462`.
    pub async fn get_id(&mut self) -> Result<u16, BootloaderError> {
        let req = self.simple("Get ID", CMD_GET_ID, Expect::Counted(Some(2)));
        let d = self.execute(req).await?.data;
        Ok(u16::from_be_bytes([d[0], d[1]]))
    }

    /// Read Memory (`0x11`): `len` (1..=256) bytes from `address`.
    pub async fn read_memory(&mut self, address: u32, len: usize) -> Result<Vec<u8>, BootloaderError> {
        let command = format!("Read Memory at 0x{address:08X}");
        if !(1..=MAX_MEMORY_BLOCK).contains(&len) {
            return Err(BootloaderError::InvalidArgument {
                command,
                reason: format!("length {len} is not 1 to {MAX_MEMORY_BLOCK}"),
            });
        }
        let n = (len - 1) as u8;
        let frames = vec![
            self.frame(command_frame(CMD_READ_MEMORY).to_vec(), "the command byte"),
            self.frame(address_frame(address).to_vec(), "the address"),
            self.frame(vec![n, !n], "the length"),
        ];
        let req = Request { command, frames, expect: Expect::Raw(len) };
        Ok(self.execute(req).await?.data)
    }

    /// Write Memory (`0x31`): 1..=256 bytes, a multiple of 4, at `address`.
    pub async fn write_memory(&mut self, address: u32, data: &[u8]) -> Result<(), BootloaderError> {
        let command = format!("Write Memory at 0x{address:08X}");
        if data.is_empty() || data.len() > MAX_MEMORY_BLOCK || !data.len().is_multiple_of(4) {
            return Err(BootloaderError::InvalidArgument {
                command,
                reason: format!("length {} is not a multiple of 4 from 4 to {MAX_MEMORY_BLOCK}", data.len()),
            });
        }
        let mut payload = Vec::with_capacity(data.len() + 2);
        payload.push((data.len() - 1) as u8);
        payload.extend_from_slice(data);
        payload.push(xor_checksum(&payload));
        let frames = vec![
            self.frame(command_frame(CMD_WRITE_MEMORY).to_vec(), "the command byte"),
            self.frame(address_frame(address).to_vec(), "the address"),
            self.frame(payload, "the data"),
        ];
        self.execute(Request { command, frames, expect: Expect::Nothing }).await?;
        Ok(())
    }

    /// Extended Erase (`0x44`): mass erase or a list of pages. Waits up to
    /// [`ClientConfig::erase_timeout`] per page (once for a mass erase) for the erase to finish.
    pub async fn extended_erase(&mut self, erase: &Erase) -> Result<(), BootloaderError> {
        let (command, payload) = match erase {
            Erase::Mass => ("Extended Erase (mass)".to_string(), vec![(MASS_ERASE >> 8) as u8, MASS_ERASE as u8, 0x00]),
            Erase::Pages(pages) => {
                let command = format!("Extended Erase of {} pages", pages.len());
                if pages.is_empty() || pages.len() > 0xFFF0 {
                    return Err(BootloaderError::InvalidArgument {
                        command,
                        reason: format!("page count {} is not 1 to 65520", pages.len()),
                    });
                }
                let mut p = Vec::with_capacity(2 * pages.len() + 3);
                // pages.len() ≤ 0xFFF0 checked above.
                p.extend_from_slice(&((pages.len() - 1) as u16).to_be_bytes());
                for page in pages {
                    p.extend_from_slice(&page.to_be_bytes());
                }
                p.push(xor_checksum(&p));
                (command, p)
            }
        };
        let operations = match erase {
            Erase::Mass => 1,
            // ≤ 0xFFF0 pages, checked above.
            Erase::Pages(pages) => pages.len() as u32,
        };
        let erase_wait =
            self.cfg.erase_timeout.saturating_mul(operations).saturating_add(self.wire_time(payload.len()));
        let frames = vec![
            self.frame(command_frame(CMD_EXTENDED_ERASE).to_vec(), "the command byte"),
            Frame { bytes: payload, stage: "the page list", ack: erase_wait },
        ];
        self.execute(Request { command, frames, expect: Expect::Nothing }).await?;
        Ok(())
    }

    /// Go (`0x21`): jump to `address`. The device leaves its bootloader (the next command
    /// synchronises again).
    pub async fn go(&mut self, address: u32) -> Result<(), BootloaderError> {
        let command = format!("Go to 0x{address:08X}");
        let frames = vec![
            self.frame(command_frame(CMD_GO).to_vec(), "the command byte"),
            self.frame(address_frame(address).to_vec(), "the address"),
        ];
        self.execute(Request { command, frames, expect: Expect::Nothing }).await?;
        self.synced = false;
        Ok(())
    }

    /// Readout Protect (`0x82`): raise RDP to level 1; the device answers a second ACK when done
    /// and resets (the next command synchronises again).
    pub async fn readout_protect(&mut self) -> Result<(), BootloaderError> {
        let wait = self.cfg.erase_timeout;
        let req = self.simple("Readout Protect", CMD_READOUT_PROTECT, Expect::SecondAck(wait));
        self.execute(req).await?;
        self.synced = false;
        Ok(())
    }

    /// Readout Unprotect (`0x92`): mass erase and RDP back to level 0; second ACK when done,
    /// then the device resets (the next command synchronises again).
    pub async fn readout_unprotect(&mut self) -> Result<(), BootloaderError> {
        let wait = self.cfg.erase_timeout;
        let req = self.simple("Readout Unprotect", CMD_READOUT_UNPROTECT, Expect::SecondAck(wait));
        self.execute(req).await?;
        self.synced = false;
        Ok(())
    }

    /// Special (`0x50`): `opcode` with up to 128 bytes of data; returns the device's response
    /// data and status bytes as sent (no interpretation).
    pub async fn special(&mut self, opcode: u16, data: &[u8]) -> Result<SpecialResponse, BootloaderError> {
        let command = format!("Special 0x{opcode:04X}");
        let first = self.cfg.erase_timeout;
        let r = self.run_special(command, opcode, data, first, None).await?;
        Ok(SpecialResponse { data: r.data, status: r.status })
    }

    /// Extended Special (`0x51`): `opcode` with buffer 1 (≤ 128 bytes) and buffer 2 (≤ 1024
    /// bytes); returns the device's status bytes as sent.
    pub async fn extended_special(
        &mut self,
        opcode: u16,
        buf1: &[u8],
        buf2: &[u8],
    ) -> Result<Vec<u8>, BootloaderError> {
        let command = format!("Extended Special 0x{opcode:04X}");
        let first = self.cfg.erase_timeout;
        Ok(self.run_extended_special(command, opcode, buf1, buf2, first, None).await?.status)
    }

    // ----- building blocks shared with the SFI helpers -------------------------------------

    /// Special with an optional SFI opcode whose answer is checked inside each attempt (a
    /// status that is not a known 2-byte code, or data of the wrong size, counts as garbled
    /// and is retried).
    pub(super) async fn run_special(
        &mut self,
        command: String,
        opcode: u16,
        data: &[u8],
        first: Duration,
        sfi: Option<SfiOpcode>,
    ) -> Result<Reply, BootloaderError> {
        if data.len() > MAX_SPECIAL_BUFFER {
            return Err(BootloaderError::InvalidArgument {
                command,
                reason: format!("data of {} bytes exceeds {MAX_SPECIAL_BUFFER}", data.len()),
            });
        }
        // The device acknowledges the last buffer as soon as it has checked it and sends the
        // answer when the work (up to a mass erase) is done (docs/protocol.md): the ACK gets the
        // short ACK timeout, so a byte lost on the way in is noticed quickly, and only the first
        // answer byte gets the long `first` timeout.
        let frames = vec![
            self.frame(command_frame(CMD_SPECIAL).to_vec(), "the command byte"),
            self.frame(opcode_frame(opcode), "the opcode"),
            self.frame(buffer_frame(data), "the data buffer"),
        ];
        self.execute(Request { command, frames, expect: Expect::Special(first, sfi) }).await
    }

    /// Extended Special with an optional SFI opcode checked as in [`Self::run_special`].
    pub(super) async fn run_extended_special(
        &mut self,
        command: String,
        opcode: u16,
        buf1: &[u8],
        buf2: &[u8],
        first: Duration,
        sfi: Option<SfiOpcode>,
    ) -> Result<Reply, BootloaderError> {
        if buf1.len() > MAX_SPECIAL_BUFFER || buf2.len() > MAX_EXTENDED_BUFFER {
            return Err(BootloaderError::InvalidArgument {
                command,
                reason: format!(
                    "buffer sizes {} and {} exceed {MAX_SPECIAL_BUFFER} and {MAX_EXTENDED_BUFFER}",
                    buf1.len(),
                    buf2.len()
                ),
            });
        }
        // As in `run_special`: short wait for the last ACK, long wait for the answer.
        let frames = vec![
            self.frame(command_frame(CMD_EXTENDED_SPECIAL).to_vec(), "the command byte"),
            self.frame(opcode_frame(opcode), "the opcode"),
            self.frame(buffer_frame(buf1), "buffer 1"),
            self.frame(buffer_frame(buf2), "buffer 2"),
        ];
        self.execute(Request { command, frames, expect: Expect::Status(first, sfi) }).await
    }

    /// A one-frame command.
    fn simple(&self, command: &str, code: u8, expect: Expect) -> Request {
        Request {
            command: command.to_string(),
            frames: vec![self.frame(command_frame(code).to_vec(), "the command byte")],
            expect,
        }
    }

    /// A frame whose ACK is due within the ACK timeout plus its time on the wire.
    fn frame(&self, bytes: Vec<u8>, stage: &'static str) -> Frame {
        let ack = self.cfg.ack_timeout.saturating_add(self.wire_time(bytes.len()));
        Frame { bytes, stage, ack }
    }

    /// Time `bytes` take on the line at 11 bits per byte (zero when the baud rate is unknown).
    fn wire_time(&self, bytes: usize) -> Duration {
        match self.cfg.line_baud {
            Some(baud) if baud > 0 => Duration::from_micros((bytes as u64 * 11 * 1_000_000).div_ceil(u64::from(baud))),
            _ => Duration::ZERO,
        }
    }

    // ----- retry machinery -----------------------------------------------------------------

    /// Run a command with frame-level retry, inside a tracing span named after it.
    async fn execute(&mut self, req: Request) -> Result<Reply, BootloaderError> {
        let span = tracing::debug_span!("bootloader", command = %req.command);
        async {
            if !self.synced {
                self.resync("sync").await?;
                self.synced = true;
            }
            let mut attempts = 0u32;
            loop {
                attempts += 1;
                match self.attempt(&req).await {
                    Ok(mut reply) => {
                        reply.attempts = attempts;
                        self.stats.commands += 1;
                        tracing::trace!(attempts, "done");
                        return Ok(reply);
                    }
                    Err(e) if e.is_transient() && attempts <= self.cfg.retries => {
                        tracing::warn!(attempt = attempts, error = %e, "retrying after transient failure");
                        self.stats.retries += 1;
                        self.resync(&req.command).await?;
                    }
                    Err(e) if e.is_transient() => {
                        return Err(BootloaderError::RetriesExhausted {
                            command: req.command.clone(),
                            attempts,
                            last: Box::new(e),
                        });
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Drain until quiet, then `0x7F` until the device answers ACK or NACK; bounded.
    async fn resync(&mut self, after: &str) -> Result<(), BootloaderError> {
        let command = if after == "sync" { "sync (0x7F)".to_string() } else { format!("resync after {after}") };
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            self.stats.resyncs += 1;
            // Each failed attempt quadruples the silence before the next 0x7F (capped), so a
            // device stuck inside a frame (a corrupted size byte announcing a huge buffer
            // swallows every 0x7F as data) reaches its frame timeout and starts over.
            let quiet = (self.cfg.resync_quiet.saturating_mul(4u32.saturating_pow(attempts - 1)))
                .min(MAX_RESYNC_QUIET.max(self.cfg.resync_quiet));
            match self.resync_once(&command, quiet).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && attempts <= self.cfg.retries => {
                    tracing::debug!(attempt = attempts, error = %e, "resync failed");
                }
                Err(e) if e.is_transient() => {
                    return Err(BootloaderError::RetriesExhausted { command, attempts, last: Box::new(e) });
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn resync_once(&mut self, command: &str, quiet: Duration) -> Result<(), BootloaderError> {
        self.drain(command, quiet).await?;
        self.send(&[SYNC], command, "the sync byte 0x7F").await?;
        let b = self.read_byte(self.cfg.ack_timeout, command, "ACK or NACK to 0x7F").await?;
        if b == ACK || b == NACK {
            Ok(())
        } else {
            Err(self.garbled(command, "ACK or NACK to 0x7F", format!("got 0x{b:02X}")))
        }
    }

    /// Discard incoming bytes until none arrived for `quiet`.
    async fn drain(&mut self, command: &str, quiet: Duration) -> Result<(), BootloaderError> {
        let limit = self.cfg.ack_timeout.saturating_mul(4).max(quiet.saturating_mul(20));
        // Far-future deadlines saturate instead of overflowing.
        let deadline =
            Instant::now().checked_add(limit).unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        let mut drained = 0usize;
        loop {
            match timeout(quiet, self.io.fill_buf()).await {
                Err(_) => break,
                Ok(Ok([])) => {
                    return Err(BootloaderError::Closed {
                        command: command.to_string(),
                        stage: "the line to go quiet".into(),
                    });
                }
                Ok(Ok(buf)) => {
                    let n = buf.len();
                    self.io.consume(n);
                    drained += n;
                    self.stats.bytes_received += n as u64;
                }
                Ok(Err(error)) => {
                    return Err(BootloaderError::Io {
                        command: command.to_string(),
                        stage: "draining the line".into(),
                        error,
                    });
                }
            }
            if drained > MAX_DRAIN || Instant::now() >= deadline {
                return Err(self.garbled(
                    command,
                    "the line to go quiet",
                    format!("{drained} bytes kept arriving for {} ms", limit.as_millis()),
                ));
            }
        }
        if drained > 0 {
            tracing::debug!(drained, "drained stray bytes");
        }
        Ok(())
    }

    /// One attempt at a command: every frame and its ACK, then the answer.
    async fn attempt(&mut self, req: &Request) -> Result<Reply, BootloaderError> {
        let cmd = req.command.as_str();
        for f in &req.frames {
            self.send(&f.bytes, cmd, f.stage).await?;
            self.expect_ack(f.ack, cmd, f.stage).await?;
        }
        let ack = self.cfg.ack_timeout;
        let mut reply = Reply::default();
        match &req.expect {
            Expect::Nothing => {}
            Expect::Counted(exact) => {
                let n = usize::from(self.read_byte(ack, cmd, "the byte count").await?) + 1;
                if exact.is_some_and(|want| want != n) {
                    let want = exact.unwrap_or_default();
                    let detail = format!("byte count says {n} bytes follow, expected {want}");
                    return Err(self.garbled(cmd, "the byte count", detail));
                }
                reply.data = vec![0; n];
                self.read_exact(&mut reply.data, ack, cmd, "the answer").await?;
                self.expect_ack(ack, cmd, "the answer").await?;
            }
            Expect::Fixed(n) => {
                reply.data = vec![0; *n];
                self.read_exact(&mut reply.data, ack, cmd, "the answer").await?;
                self.expect_ack(ack, cmd, "the answer").await?;
            }
            Expect::Raw(n) => {
                reply.data = vec![0; *n];
                self.read_exact(&mut reply.data, ack, cmd, "the data").await?;
            }
            Expect::SecondAck(wait) => {
                self.expect_ack(*wait, cmd, "the operation").await?;
            }
            Expect::Special(first, sfi) => {
                let n = self.read_size(*first, cmd, "the response data size").await?;
                let bad_size = match sfi {
                    // An SFI answer carries its data on success and none on failure.
                    Some(op) => sfi_data_len(*op).is_some_and(|want| n != want && n != 0),
                    None => n > MAX_RESPONSE_DATA,
                };
                if bad_size {
                    let detail = format!("response data size {n} is impossible here");
                    return Err(self.garbled(cmd, "the response data size", detail));
                }
                reply.data = vec![0; n];
                self.read_exact(&mut reply.data, ack, cmd, "the response data").await?;
                reply.status = self.read_status(ack, cmd, sfi.is_some()).await?;
                self.expect_ack(ack, cmd, "the status").await?;
                if let Some(op) = sfi {
                    self.check_sfi(cmd, *op, &reply)?;
                }
            }
            Expect::Status(first, sfi) => {
                reply.status = self.read_status(*first, cmd, sfi.is_some()).await?;
                self.expect_ack(ack, cmd, "the status").await?;
                if let Some(op) = sfi {
                    self.check_sfi(cmd, *op, &reply)?;
                }
            }
        }
        Ok(reply)
    }

    /// `u16 status_size` + status; an SFI status must be 2 bytes.
    async fn read_status(&mut self, first: Duration, cmd: &str, sfi: bool) -> Result<Vec<u8>, BootloaderError> {
        let n = self.read_size(first, cmd, "the status size").await?;
        if (sfi && n != 2) || n > MAX_RESPONSE_DATA {
            let detail = format!("status size {n}, expected 2");
            return Err(self.garbled(cmd, "the status size", detail));
        }
        let mut status = vec![0; n];
        self.read_exact(&mut status, self.cfg.ack_timeout, cmd, "the status").await?;
        Ok(status)
    }

    /// Check an SFI answer: a known status, and on success data of the opcode's size (and a
    /// known state for GET_STATE). Anything else was garbled on the line.
    fn check_sfi(&self, cmd: &str, op: SfiOpcode, reply: &Reply) -> Result<(), BootloaderError> {
        let code = u16::from_be_bytes([reply.status[0], reply.status[1]]);
        let Some(status) = SfiStatus::from_code(code) else {
            return Err(self.garbled(cmd, "the status", format!("unknown status code 0x{code:04X}")));
        };
        if status == SfiStatus::Ok {
            if let Some(want) = sfi_data_len(op)
                && reply.data.len() != want
            {
                let detail = format!("{} bytes of response data, expected {want}", reply.data.len());
                return Err(self.garbled(cmd, "the response data", detail));
            }
            if op == SfiOpcode::GetState && SfiState::from_code(reply.data[0]).is_none() {
                let detail = format!("unknown state {}", reply.data[0]);
                return Err(self.garbled(cmd, "the response data", detail));
            }
        }
        Ok(())
    }

    // ----- byte-level I/O ------------------------------------------------------------------

    fn garbled(&self, cmd: &str, stage: &str, detail: String) -> BootloaderError {
        BootloaderError::Garbled { command: cmd.to_string(), stage: stage.to_string(), detail }
    }

    /// Write one frame whole and flush it, within the ACK timeout plus its wire time.
    async fn send(&mut self, bytes: &[u8], cmd: &str, stage: &str) -> Result<(), BootloaderError> {
        let limit = self.cfg.ack_timeout.saturating_add(self.wire_time(bytes.len()));
        let io = self.io.get_mut();
        let write = async {
            io.write_all(bytes).await?;
            io.flush().await
        };
        match timeout(limit, write).await {
            Ok(Ok(())) => {
                self.stats.bytes_sent += bytes.len() as u64;
                Ok(())
            }
            Ok(Err(error)) => {
                Err(BootloaderError::Io { command: cmd.to_string(), stage: format!("sending {stage}"), error })
            }
            Err(_) => Err(BootloaderError::Timeout {
                command: cmd.to_string(),
                stage: format!("the transport to accept {stage}"),
                after: limit,
            }),
        }
    }

    async fn expect_ack(&mut self, limit: Duration, cmd: &str, stage: &str) -> Result<(), BootloaderError> {
        match self.read_byte(limit, cmd, stage).await {
            Ok(ACK) => Ok(()),
            Ok(NACK) => Err(BootloaderError::Nack { command: cmd.to_string(), stage: stage.to_string() }),
            Ok(b) => Err(self.garbled(
                cmd,
                &format!("ACK after {stage}"),
                format!("expected ACK (0x79) or NACK (0x1F), got 0x{b:02X}"),
            )),
            Err(BootloaderError::Timeout { command, after, .. }) => {
                Err(BootloaderError::Timeout { command, stage: format!("ACK after {stage}"), after })
            }
            Err(e) => Err(e),
        }
    }

    async fn read_byte(&mut self, limit: Duration, cmd: &str, stage: &str) -> Result<u8, BootloaderError> {
        let mut b = [0u8; 1];
        self.read_timed(&mut b, limit, cmd, stage).await?;
        Ok(b[0])
    }

    async fn read_size(&mut self, first: Duration, cmd: &str, stage: &str) -> Result<usize, BootloaderError> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b, first, cmd, stage).await?;
        Ok(usize::from(u16::from_be_bytes(b)))
    }

    /// Read `buf.len()` bytes: the first within `first`, the rest within the ACK timeout plus
    /// their time on the wire.
    async fn read_exact(
        &mut self,
        buf: &mut [u8],
        first: Duration,
        cmd: &str,
        stage: &str,
    ) -> Result<(), BootloaderError> {
        let Some((head, rest)) = buf.split_first_mut() else {
            return Ok(());
        };
        self.read_timed(std::slice::from_mut(head), first, cmd, stage).await?;
        if !rest.is_empty() {
            let limit = self.cfg.ack_timeout.saturating_add(self.wire_time(rest.len()));
            self.read_timed(rest, limit, cmd, stage).await?;
        }
        Ok(())
    }

    async fn read_timed(
        &mut self,
        buf: &mut [u8],
        limit: Duration,
        cmd: &str,
        stage: &str,
    ) -> Result<(), BootloaderError> {
        match timeout(limit, self.io.read_exact(buf)).await {
            Ok(Ok(_)) => {
                self.stats.bytes_received += buf.len() as u64;
                Ok(())
            }
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(BootloaderError::Closed { command: cmd.to_string(), stage: stage.to_string() })
            }
            Ok(Err(error)) => {
                Err(BootloaderError::Io { command: cmd.to_string(), stage: format!("reading {stage}"), error })
            }
            Err(_) => {
                Err(BootloaderError::Timeout { command: cmd.to_string(), stage: stage.to_string(), after: limit })
            }
        }
    }
}
