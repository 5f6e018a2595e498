//! One simulated STM32 chip as pure logic (no I/O, no clock): its identity (chip key and the
//! vendor-signed chip certificate), internal flash, a small SRAM, option bytes with the RDP level,
//! and the SFI state machine of profile §5 with the contract's device-side rules.
//!
//! Every operation returns its outcome and the modelled flash time it started; the bootloader
//! decides how that time overlaps the link (see `link`).
//!
//! Choices beyond the profile and contract (documented on the items below):
//! * Read Memory, Write Memory, Extended Erase and Go are refused while an SFI session is active
//!   (licence accepted .. areas complete): decrypted but not yet authenticated plaintext must never
//!   leave the chip, and nothing may be mixed into an image being installed.
//! * `last_status` (GET_STATE) is the status of the last session command (everything except
//!   GET_STATE and GET_CERTIFICATE).
//! * A device reset (Readout Protect, Go, simulator restart) during an active session fails it:
//!   mass erase, state `failed`.
//! * Any RDP level above 0 (not only `installed`) makes SFI commands other than GET_STATE answer
//!   `0x010A`; RDP level 2 also refuses Readout Unprotect (the chip is locked for good).

use std::collections::BTreeMap;
use std::time::Duration;

use flashgate_common::cert::{ChipCertificate, ChipKey, VendorCa};
use flashgate_common::family::{FamilyProfile, OPTION_RDP, RDP_LEVEL0, RDP_LEVEL1, RDP_LEVEL2};
use flashgate_common::gcm::GcmDecryptor;
use flashgate_common::licence::{Licence, open_licence};
use flashgate_common::protocol::{SfiOpcode, SfiState, SfiStatus};
use flashgate_common::sfi::{
    AreaDescriptor, AreaType, DESCRIPTOR_LEN, FirmwareKey, HEADER_LEN, ImageHeader, ImageNonce, area_iv, verify_header,
};
use zeroize::Zeroizing;

use crate::flash::{Flash, FlashError};

/// Start of the modelled SRAM.
pub const SRAM_BASE: u32 = 0x2000_0000;
/// Size of the modelled SRAM (volatile; not persisted).
pub const SRAM_SIZE: u32 = 128 * 1024;
/// Largest `C` area payload the device accepts (64 records).
pub const MAX_CONFIG_AREA: u32 = 64 * 8;

/// Readout protection level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RdpLevel {
    /// No protection.
    Level0,
    /// Flash not readable through the bootloader; regression mass-erases.
    Level1,
    /// Permanent protection.
    Level2,
}

impl std::fmt::Display for RdpLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RdpLevel::Level0 => "level 0",
            RdpLevel::Level1 => "level 1",
            RdpLevel::Level2 => "level 2",
        })
    }
}

impl RdpLevel {
    /// The level an RDP option byte value encodes (`0xAA` level 0, `0xCC` level 2, else level 1).
    pub fn from_byte(b: u8) -> Self {
        match b {
            RDP_LEVEL0 => RdpLevel::Level0,
            RDP_LEVEL2 => RdpLevel::Level2,
            _ => RdpLevel::Level1,
        }
    }
}

/// Why a device operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Readout protection forbids the operation.
    #[error("operation refused: readout protection is at {0}")]
    ReadoutProtected(RdpLevel),
    /// An SFI session is in progress.
    #[error("operation refused: an SFI session is active (state {0})")]
    SfiSessionActive(SfiState),
    /// The address range is outside flash and SRAM.
    #[error("address range 0x{address:08X}+{len} is outside flash and SRAM")]
    AddressOutOfRange {
        /// First address.
        address: u32,
        /// Length in bytes.
        len: u64,
    },
    /// The flash refused the operation.
    #[error(transparent)]
    Flash(#[from] FlashError),
    /// The family has no such bank.
    #[error("bank {bank} does not exist on {family}")]
    NoSuchBank {
        /// Requested bank (1 or 2).
        bank: u8,
        /// The family's display name.
        family: &'static str,
    },
}

/// A chip identity that does not hold together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The certificate certifies another public key.
    #[error("chip certificate is for public key {cert_pub}…, the chip key's public key is {key_pub}…")]
    KeyMismatch {
        /// First bytes of the certificate's key, hex.
        cert_pub: String,
        /// First bytes of the chip key's public key, hex.
        key_pub: String,
    },
}

/// A chip's key pair and its vendor-signed certificate.
#[derive(Clone)]
pub struct ChipIdentity {
    key: ChipKey,
    certificate: ChipCertificate,
}

impl std::fmt::Debug for ChipIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChipIdentity")
            .field("device_id", &self.certificate.device_id().to_string())
            .finish_non_exhaustive()
    }
}

impl ChipIdentity {
    /// An identity from a given key and certificate (e.g. the profile's test vectors). The
    /// certificate must certify the key's public half.
    pub fn new(key: ChipKey, certificate: ChipCertificate) -> Result<Self, IdentityError> {
        let key_pub = key.public_xy();
        if key_pub != certificate.chip_pub {
            return Err(IdentityError::KeyMismatch {
                cert_pub: hex::encode(&certificate.chip_pub[..8]),
                key_pub: hex::encode(&key_pub[..8]),
            });
        }
        Ok(ChipIdentity { key, certificate })
    }

    /// A fresh identity for a chip of `profile`, certified by `vendor_ca`.
    pub fn generate<R: rand::RngCore + rand::CryptoRng>(
        profile: &FamilyProfile,
        vendor_ca: &VendorCa,
        rng: &mut R,
    ) -> Self {
        let key = ChipKey::generate(rng);
        Self::certify(profile, vendor_ca, key)
    }

    /// A deterministic identity derived from `seed` (ChaCha20), for reproducible tests and demos.
    pub fn from_seed(profile: &FamilyProfile, vendor_ca: &VendorCa, seed: u64) -> Self {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        Self::generate(profile, vendor_ca, &mut rng)
    }

    /// Certify an existing chip key with `vendor_ca` for `profile`'s product.
    pub fn certify(profile: &FamilyProfile, vendor_ca: &VendorCa, key: ChipKey) -> Self {
        let certificate = vendor_ca.sign_certificate(profile.product_id, key.public_xy());
        ChipIdentity { key, certificate }
    }

    /// The chip's private key.
    pub fn key(&self) -> &ChipKey {
        &self.key
    }

    /// The chip's certificate.
    pub fn certificate(&self) -> &ChipCertificate {
        &self.certificate
    }
}

/// The answer of the device to one SFI command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SfiReply {
    /// Status code for the host.
    pub status: SfiStatus,
    /// Response data (Special only; empty for Extended Special).
    pub data: Vec<u8>,
    /// Modelled flash time the command started.
    pub flash_time: Duration,
    /// Whether the answer waits for that flash time (erases after a failure, INSTALL, ABORT)
    /// instead of letting it run in the background (chunk programming).
    pub synchronous: bool,
}

impl SfiReply {
    fn ok() -> Self {
        SfiReply { status: SfiStatus::Ok, data: Vec::new(), flash_time: Duration::ZERO, synchronous: false }
    }

    fn status(status: SfiStatus) -> Self {
        SfiReply { status, ..SfiReply::ok() }
    }
}

/// The area being received.
struct AreaProgress {
    descriptor: AreaDescriptor,
    gcm: GcmDecryptor,
    received: u32,
    /// Plaintext of a partial program word not yet programmed.
    carry: Zeroizing<Vec<u8>>,
    /// Flash address where `carry` starts.
    next_address: u32,
    /// Plaintext of a `C` area.
    config: Zeroizing<Vec<u8>>,
}

/// An active SFI session (licence accepted .. areas complete).
struct Session {
    key: FirmwareKey,
    nonce: ImageNonce,
    header: Option<ImageHeader>,
    next_index: u16,
    area: Option<AreaProgress>,
    /// Flash ranges `[start, end)` of finished F/M areas, end rounded up to the program word.
    placed: Vec<(u64, u64)>,
    /// Option-byte records of finished C areas.
    options: Vec<(u32, u32)>,
}

impl Session {
    fn state(&self) -> SfiState {
        match (&self.header, &self.area) {
            (None, _) => SfiState::LicenceAccepted,
            (Some(_), Some(_)) => SfiState::AreaInProgress,
            (Some(h), None) if self.next_index > h.area_count => SfiState::AreasComplete,
            (Some(_), None) => SfiState::HeaderAccepted,
        }
    }
}

enum Phase {
    Idle,
    Failed,
    Installed,
    Active(Box<Session>),
}

/// The last accepted session command, for idempotent retries.
#[derive(PartialEq, Eq)]
struct Accepted {
    opcode: SfiOpcode,
    buf1: Vec<u8>,
    buf2: Vec<u8>,
}

/// One simulated chip.
pub struct Device {
    profile: &'static FamilyProfile,
    identity: ChipIdentity,
    flash: Flash,
    sram: Vec<u8>,
    options: BTreeMap<u32, u32>,
    phase: Phase,
    last_status: SfiStatus,
    last_accepted: Option<Accepted>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("family", &self.profile.family)
            .field("identity", &self.identity)
            .field("rdp", &self.rdp_level())
            .field("sfi_state", &self.sfi_state())
            .field("last_status", &self.last_status)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// A factory-fresh chip: erased flash, default option bytes, RDP level 0, SFI idle.
    pub fn new(profile: &'static FamilyProfile, identity: ChipIdentity) -> Self {
        let options = profile.option_bytes.iter().map(|o| (o.id, o.default)).collect();
        Device {
            profile,
            identity,
            flash: Flash::new(profile),
            sram: vec![0; SRAM_SIZE as usize],
            options,
            phase: Phase::Idle,
            last_status: SfiStatus::Ok,
            last_accepted: None,
        }
    }

    /// A chip restored from saved state. An SFI session that was active when the state was saved
    /// cannot be resumed (its keys lived in RAM): the chip comes back as after a reset during the
    /// session, with flash mass-erased and state `failed`.
    pub fn restore(
        profile: &'static FamilyProfile,
        identity: ChipIdentity,
        flash: Flash,
        options: BTreeMap<u32, u32>,
        state: SfiState,
        last_status: SfiStatus,
    ) -> Self {
        let mut d = Device::new(profile, identity);
        d.flash = flash;
        for (id, value) in options {
            d.options.insert(id, value);
        }
        d.last_status = last_status;
        d.phase = match state {
            SfiState::Idle => Phase::Idle,
            SfiState::Installed => Phase::Installed,
            SfiState::Failed => Phase::Failed,
            SfiState::LicenceAccepted
            | SfiState::HeaderAccepted
            | SfiState::AreaInProgress
            | SfiState::AreasComplete => {
                d.flash.mass_erase();
                Phase::Failed
            }
        };
        d
    }

    /// The family profile.
    pub fn profile(&self) -> &'static FamilyProfile {
        self.profile
    }

    /// The chip's identity.
    pub fn identity(&self) -> &ChipIdentity {
        &self.identity
    }

    /// Replace the certificate (same key) with one signed by `vendor_ca`; used when the simulator
    /// restarts under a different vendor CA so the chip keeps its device id.
    pub fn recertify(&mut self, vendor_ca: &VendorCa) {
        self.identity = ChipIdentity::certify(self.profile, vendor_ca, self.identity.key.clone());
    }

    /// The flash array.
    pub fn flash(&self) -> &Flash {
        &self.flash
    }

    /// The option bytes, by record id.
    pub fn option_bytes(&self) -> &BTreeMap<u32, u32> {
        &self.options
    }

    /// The RDP option byte value.
    pub fn rdp_byte(&self) -> u8 {
        // Only the low byte encodes the level, as in FLASH_OPTR.
        (self.options.get(&OPTION_RDP).copied().unwrap_or(u32::from(RDP_LEVEL0)) & 0xFF) as u8
    }

    /// The readout protection level.
    pub fn rdp_level(&self) -> RdpLevel {
        RdpLevel::from_byte(self.rdp_byte())
    }

    fn set_rdp_byte(&mut self, b: u8) {
        let v = self.options.get(&OPTION_RDP).copied().unwrap_or(0);
        self.options.insert(OPTION_RDP, (v & !0xFF) | u32::from(b));
    }

    /// The SFI state as GET_STATE reports it.
    pub fn sfi_state(&self) -> SfiState {
        match &self.phase {
            Phase::Idle => SfiState::Idle,
            Phase::Failed => SfiState::Failed,
            Phase::Installed => SfiState::Installed,
            Phase::Active(s) => s.state(),
        }
    }

    /// The status of the last session command.
    pub fn last_status(&self) -> SfiStatus {
        self.last_status
    }

    fn session_active(&self) -> bool {
        matches!(self.phase, Phase::Active(_))
    }

    /// Whether Read/Write Memory, Extended Erase and Go are allowed now: refused under RDP ≥ 1 and
    /// while an SFI session is active.
    pub fn access_check(&self) -> Result<(), DeviceError> {
        let rdp = self.rdp_level();
        if rdp != RdpLevel::Level0 {
            return Err(DeviceError::ReadoutProtected(rdp));
        }
        if self.session_active() {
            return Err(DeviceError::SfiSessionActive(self.sfi_state()));
        }
        Ok(())
    }

    fn sram_range(address: u32, len: u64) -> Option<usize> {
        let start = u64::from(address);
        let base = u64::from(SRAM_BASE);
        (start >= base && start + len <= base + u64::from(SRAM_SIZE)).then(|| (start - base) as usize)
    }

    /// Whether `address` may start a Read/Write Memory or Go (flash or SRAM).
    pub fn address_valid(&self, address: u32) -> bool {
        self.flash.contains(address, 1) || Self::sram_range(address, 1).is_some()
    }

    /// Read Memory: `len` bytes of flash or SRAM.
    pub fn read_memory(&self, address: u32, len: usize) -> Result<Vec<u8>, DeviceError> {
        self.access_check()?;
        if self.flash.contains(address, len as u64) {
            return Ok(self.flash.read(address, len)?.to_vec());
        }
        match Self::sram_range(address, len as u64) {
            Some(start) => Ok(self.sram[start..start + len].to_vec()),
            None => Err(DeviceError::AddressOutOfRange { address, len: len as u64 }),
        }
    }

    /// Write Memory: program flash (only erased words) or write SRAM. Returns the modelled time.
    pub fn write_memory(&mut self, address: u32, data: &[u8]) -> Result<Duration, DeviceError> {
        self.access_check()?;
        if self.flash.contains(address, data.len() as u64) {
            return Ok(self.flash.program(address, data)?);
        }
        match Self::sram_range(address, data.len() as u64) {
            Some(start) => {
                self.sram[start..start + data.len()].copy_from_slice(data);
                Ok(Duration::ZERO)
            }
            None => Err(DeviceError::AddressOutOfRange { address, len: data.len() as u64 }),
        }
    }

    /// Go: check that execution may start at `address`.
    pub fn go(&self, address: u32) -> Result<(), DeviceError> {
        self.access_check()?;
        if !self.address_valid(address) {
            return Err(DeviceError::AddressOutOfRange { address, len: 1 });
        }
        Ok(())
    }

    /// Extended Erase of a page list (all checked before any is erased).
    pub fn erase_pages(&mut self, pages: &[u16]) -> Result<Duration, DeviceError> {
        self.access_check()?;
        let pages: Vec<u32> = pages.iter().map(|p| u32::from(*p)).collect();
        Ok(self.flash.erase_pages(&pages)?)
    }

    /// Extended Erase `0xFFFF`: mass erase.
    pub fn mass_erase(&mut self) -> Result<Duration, DeviceError> {
        self.access_check()?;
        Ok(self.flash.mass_erase())
    }

    /// Number of flash banks: two on the dual-bank H7 and L5 (halves of the array), one elsewhere.
    pub fn bank_count(&self) -> u8 {
        use flashgate_common::family::Family;
        match self.profile.family {
            Family::Stm32H7 | Family::Stm32L5 => 2,
            Family::Stm32L4 | Family::Stm32Wl => 1,
        }
    }

    /// Extended Erase `0xFFFE` (bank 1) / `0xFFFD` (bank 2). On a single-bank part bank 1 is the
    /// whole array and bank 2 does not exist.
    pub fn bank_erase(&mut self, bank: u8) -> Result<Duration, DeviceError> {
        self.access_check()?;
        let banks = self.bank_count();
        if bank == 0 || bank > banks {
            return Err(DeviceError::NoSuchBank { bank, family: self.profile.display_name });
        }
        let pages = self.flash.page_count() / u32::from(banks);
        Ok(self.flash.erase_page_range(u32::from(bank - 1) * pages, pages)?)
    }

    /// Readout Protect: raise RDP to level 1 (the bootloader then resets the chip).
    pub fn readout_protect(&mut self) -> Result<Duration, DeviceError> {
        match self.rdp_level() {
            RdpLevel::Level2 => Err(DeviceError::ReadoutProtected(RdpLevel::Level2)),
            RdpLevel::Level1 => Ok(self.profile.page_erase_time),
            RdpLevel::Level0 => {
                self.set_rdp_byte(RDP_LEVEL1);
                Ok(self.profile.page_erase_time)
            }
        }
    }

    /// Readout Unprotect: mass erase, RDP back to level 0, SFI back to idle. Refused at level 2.
    pub fn readout_unprotect(&mut self) -> Result<Duration, DeviceError> {
        if self.rdp_level() == RdpLevel::Level2 {
            return Err(DeviceError::ReadoutProtected(RdpLevel::Level2));
        }
        let t = self.flash.mass_erase();
        self.set_rdp_byte(RDP_LEVEL0);
        self.phase = Phase::Idle;
        self.last_status = SfiStatus::Ok;
        self.last_accepted = None;
        Ok(t + self.profile.page_erase_time)
    }

    /// A chip reset: an active SFI session is lost, which fails it (mass erase). Returns the
    /// modelled time.
    pub fn reset(&mut self) -> Duration {
        self.sram.fill(0);
        if self.session_active() {
            self.phase = Phase::Failed;
            self.last_accepted = None;
            return self.flash.mass_erase();
        }
        Duration::ZERO
    }

    /// Execute one Flashgate SFI command. Special commands pass their data as `buf1` and an empty
    /// `buf2`.
    pub fn sfi(&mut self, opcode: SfiOpcode, buf1: &[u8], buf2: &[u8]) -> SfiReply {
        if opcode == SfiOpcode::GetState {
            let state = self.sfi_state() as u8;
            let [hi, lo] = self.last_status.code().to_be_bytes();
            return SfiReply { data: vec![state, hi, lo], ..SfiReply::ok() };
        }
        if self.rdp_level() != RdpLevel::Level0 || matches!(self.phase, Phase::Installed) {
            if opcode != SfiOpcode::GetCertificate {
                self.last_status = SfiStatus::ReadoutProtected;
            }
            return SfiReply::status(SfiStatus::ReadoutProtected);
        }
        if opcode == SfiOpcode::GetCertificate {
            return SfiReply { data: self.identity.certificate.to_bytes().to_vec(), ..SfiReply::ok() };
        }
        let this = Accepted { opcode, buf1: buf1.to_vec(), buf2: buf2.to_vec() };
        if self.session_active() && self.last_accepted.as_ref() == Some(&this) {
            // Idempotent retry of the last accepted command: answer Ok again without effect.
            self.last_status = SfiStatus::Ok;
            return SfiReply::ok();
        }
        let reply = match opcode {
            SfiOpcode::SetLicence => self.set_licence(buf2),
            SfiOpcode::SetImageHeader => self.set_image_header(buf2),
            SfiOpcode::StartArea => self.start_area(buf2),
            SfiOpcode::WriteChunk => self.write_chunk(buf1, buf2),
            SfiOpcode::Install => self.install(),
            SfiOpcode::Abort => self.abort(),
            // Handled above; kept for exhaustiveness.
            SfiOpcode::GetState | SfiOpcode::GetCertificate => SfiReply::status(SfiStatus::BadState),
        };
        self.last_status = reply.status;
        let records = matches!(
            opcode,
            SfiOpcode::SetLicence | SfiOpcode::SetImageHeader | SfiOpcode::StartArea | SfiOpcode::WriteChunk
        );
        if reply.status == SfiStatus::Ok && records && self.session_active() {
            self.last_accepted = Some(this);
        } else if reply.status != SfiStatus::Ok || !self.session_active() {
            self.last_accepted = None;
        }
        reply
    }

    /// An error in an active session: mass erase, state `failed`. Outside a session the error is
    /// only answered.
    fn fail(&mut self, status: SfiStatus) -> SfiReply {
        if !self.session_active() {
            return SfiReply::status(status);
        }
        self.phase = Phase::Failed;
        let t = self.flash.mass_erase();
        SfiReply { status, data: Vec::new(), flash_time: t, synchronous: true }
    }

    fn session(&mut self) -> Option<&mut Session> {
        match &mut self.phase {
            Phase::Active(s) => Some(s),
            _ => None,
        }
    }

    fn set_licence(&mut self, buf: &[u8]) -> SfiReply {
        match self.phase {
            Phase::Idle | Phase::Failed => {}
            Phase::Active(_) | Phase::Installed => return self.fail(SfiStatus::BadState),
        }
        let erase = self.flash.mass_erase();
        let opened = Licence::parse(buf).and_then(|l| open_licence(&l, &self.identity.key, &self.profile.product_id));
        match opened {
            Ok((key, nonce)) => {
                self.phase = Phase::Active(Box::new(Session {
                    key,
                    nonce,
                    header: None,
                    next_index: 1,
                    area: None,
                    placed: Vec::new(),
                    options: Vec::new(),
                }));
                SfiReply { flash_time: erase, ..SfiReply::ok() }
            }
            Err(e) => {
                let status = e.sfi_status();
                tracing::debug!(error = %e, "licence refused");
                self.phase = Phase::Failed;
                SfiReply { status, data: Vec::new(), flash_time: erase, synchronous: true }
            }
        }
    }

    fn set_image_header(&mut self, buf: &[u8]) -> SfiReply {
        let Some(session) = self.session() else {
            return SfiReply::status(SfiStatus::BadState);
        };
        if session.header.is_some() {
            return self.fail(SfiStatus::BadState);
        }
        let Ok(bytes) = <&[u8; HEADER_LEN]>::try_from(buf) else {
            return self.fail(SfiStatus::HeaderNotAuthentic);
        };
        let header = match ImageHeader::parse(bytes) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = %e, "image header refused");
                return self.fail(SfiStatus::HeaderNotAuthentic);
            }
        };
        if verify_header(&session.key, &session.nonce, &header).is_err() {
            return self.fail(SfiStatus::HeaderNotAuthentic);
        }
        session.header = Some(header);
        session.next_index = 1;
        SfiReply::ok()
    }

    fn start_area(&mut self, buf: &[u8]) -> SfiReply {
        let profile = self.profile;
        let Some(session) = self.session() else {
            return SfiReply::status(SfiStatus::BadState);
        };
        let Some(header) = &session.header else {
            return self.fail(SfiStatus::BadState);
        };
        if session.area.is_some() || session.next_index > header.area_count {
            return self.fail(SfiStatus::BadState);
        }
        let area_count = header.area_count;
        let Ok(bytes) = <&[u8; DESCRIPTOR_LEN]>::try_from(buf) else {
            return self.fail(SfiStatus::AreaNotAuthentic);
        };
        let descriptor = match AreaDescriptor::parse(bytes, 0) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "area descriptor refused");
                return self.fail(SfiStatus::AreaNotAuthentic);
            }
        };
        if descriptor.index != session.next_index || descriptor.area_count != area_count {
            return self.fail(SfiStatus::BadState);
        }
        let word = u64::from(profile.program_word);
        match descriptor.area_type {
            AreaType::External | AreaType::KeyGen => {
                return self.fail(SfiStatus::AddressOutOfRange);
            }
            AreaType::Firmware | AreaType::Module => {
                let start = u64::from(descriptor.address);
                if start % word != 0 || !profile.flash_contains(descriptor.address, u64::from(descriptor.size)) {
                    return self.fail(SfiStatus::AddressOutOfRange);
                }
                let end = (start + u64::from(descriptor.size)).div_ceil(word) * word;
                if session.placed.iter().any(|&(s, e)| start < e && s < end) {
                    return self.fail(SfiStatus::AreaOverlap);
                }
            }
            AreaType::Config => {
                if descriptor.address != 0
                    || descriptor.size > MAX_CONFIG_AREA
                    || flashgate_common::sfi::check_config_size(profile, descriptor.size).is_err()
                {
                    return self.fail(SfiStatus::AddressOutOfRange);
                }
            }
            AreaType::Pause | AreaType::Resume => {
                if descriptor.size != 0 {
                    return self.fail(SfiStatus::AddressOutOfRange);
                }
            }
        }
        let iv = area_iv(&session.nonce, descriptor.index);
        let gcm = GcmDecryptor::new(&session.key, &iv, &descriptor.aad());
        let progress = AreaProgress {
            next_address: descriptor.address,
            descriptor,
            gcm,
            received: 0,
            carry: Zeroizing::new(Vec::new()),
            config: Zeroizing::new(Vec::new()),
        };
        if progress.descriptor.size == 0 {
            return self.finish_area(progress, Duration::ZERO);
        }
        session.area = Some(progress);
        SfiReply::ok()
    }

    fn write_chunk(&mut self, buf1: &[u8], buf2: &[u8]) -> SfiReply {
        let Phase::Active(session) = &mut self.phase else {
            return SfiReply::status(SfiStatus::BadState);
        };
        let Some(area) = session.area.as_mut() else {
            return self.fail(SfiStatus::BadState);
        };
        let Ok(offset) = <[u8; 4]>::try_from(buf1).map(u32::from_be_bytes) else {
            return self.fail(SfiStatus::BadState);
        };
        if offset != area.received {
            return self.fail(SfiStatus::ChunkOutOfOrder);
        }
        if buf2.is_empty() {
            return SfiReply::ok();
        }
        let size = area.descriptor.size;
        if u64::from(area.received) + buf2.len() as u64 > u64::from(size) {
            return self.fail(SfiStatus::ChunkOutOfOrder);
        }
        let mut plain = Zeroizing::new(buf2.to_vec());
        area.gcm.update(&mut plain);
        area.received += buf2.len() as u32;
        let last = area.received == size;
        let mut time = Duration::ZERO;
        match area.descriptor.area_type {
            AreaType::Config => area.config.extend_from_slice(&plain),
            _ => {
                area.carry.extend_from_slice(&plain);
                let word = self.profile.program_word as usize;
                let n = if last { area.carry.len() } else { area.carry.len() / word * word };
                if n > 0 {
                    match self.flash.program(area.next_address, &area.carry[..n]) {
                        Ok(t) => time = t,
                        Err(e) => {
                            tracing::warn!(error = %e, "flash error during SFI");
                            return self.fail(SfiStatus::FlashError);
                        }
                    }
                    area.next_address += n as u32;
                    area.carry.drain(..n);
                }
            }
        }
        if !last {
            return SfiReply { flash_time: time, ..SfiReply::ok() };
        }
        let Some(area) = self.session().and_then(|s| s.area.take()) else {
            // Proven invariant: the area was present a few lines above and nothing removed it.
            return self.fail(SfiStatus::BadState);
        };
        self.finish_area(area, time)
    }

    /// Check the tag of a fully received area and record it.
    fn finish_area(&mut self, area: AreaProgress, time: Duration) -> SfiReply {
        let AreaProgress { descriptor, gcm, config, .. } = area;
        if !gcm.finish(&descriptor.tag) {
            let mut r = self.fail(SfiStatus::AreaNotAuthentic);
            r.flash_time += time;
            return r;
        }
        let profile = self.profile;
        let word = u64::from(profile.program_word);
        let Some(session) = self.session() else {
            return SfiReply::status(SfiStatus::BadState);
        };
        match descriptor.area_type {
            AreaType::Firmware | AreaType::Module => {
                let start = u64::from(descriptor.address);
                let end = (start + u64::from(descriptor.size)).div_ceil(word) * word;
                if end > start {
                    session.placed.push((start, end));
                }
            }
            AreaType::Config => {
                // The family's layout (pairs, or ST's positional words); the size was checked at
                // START_AREA.
                if let Some(records) = profile.config_layout.records(&config) {
                    session.options.extend(records);
                }
            }
            _ => {}
        }
        session.next_index += 1;
        SfiReply { flash_time: time, ..SfiReply::ok() }
    }

    fn install(&mut self) -> SfiReply {
        let profile = self.profile;
        let state = self.sfi_state();
        let Some(session) = self.session() else {
            return SfiReply::status(SfiStatus::BadState);
        };
        if state != SfiState::AreasComplete {
            return self.fail(SfiStatus::BadState);
        }
        let records = std::mem::take(&mut session.options);
        if let Some((id, value)) = records.iter().find(|(id, _)| profile.option_byte(*id).is_none()) {
            tracing::debug!(id, value, "unknown option-byte record");
            return self.fail(SfiStatus::AddressOutOfRange);
        }
        for (id, value) in records {
            self.options.insert(id, value);
        }
        if self.rdp_level() == RdpLevel::Level0 {
            self.set_rdp_byte(RDP_LEVEL1);
        }
        self.phase = Phase::Installed;
        let crc = self.flash.crc32();
        SfiReply {
            status: SfiStatus::Ok,
            data: crc.to_be_bytes().to_vec(),
            flash_time: profile.page_erase_time,
            synchronous: true,
        }
    }

    fn abort(&mut self) -> SfiReply {
        if !self.session_active() {
            return SfiReply::ok();
        }
        let mut r = self.fail(SfiStatus::Ok);
        r.status = SfiStatus::Ok;
        r
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::test_support::{SplitImage, Vectors, expected_flash, image_of, licence_for, split_image, vectors};
    use flashgate_common::family::{Family, OPTION_USER};
    use flashgate_common::sfi::PlainArea;

    const CHUNK: usize = 1024;

    fn l4() -> &'static FamilyProfile {
        Family::Stm32L4.profile()
    }

    fn vector_device(v: &Vectors) -> Device {
        Device::new(l4(), ChipIdentity::new(v.chip.clone(), v.certificate.clone()).unwrap())
    }

    fn st(d: &mut Device, op: SfiOpcode, b1: &[u8], b2: &[u8]) -> SfiStatus {
        d.sfi(op, b1, b2).status
    }

    fn chunk(d: &mut Device, offset: usize, data: &[u8]) -> SfiStatus {
        st(d, SfiOpcode::WriteChunk, &(offset as u32).to_be_bytes(), data)
    }

    /// Send the whole image (licence, header, areas) without INSTALL; every status must be Ok.
    fn send_image(d: &mut Device, licence: &[u8], img: &SplitImage) {
        assert_eq!(st(d, SfiOpcode::SetLicence, &[], licence), SfiStatus::Ok);
        assert_eq!(d.sfi_state(), SfiState::LicenceAccepted);
        assert_eq!(st(d, SfiOpcode::SetImageHeader, &[], &img.header), SfiStatus::Ok);
        assert_eq!(d.sfi_state(), SfiState::HeaderAccepted);
        for (desc, ct) in &img.areas {
            assert_eq!(st(d, SfiOpcode::StartArea, &[], desc), SfiStatus::Ok);
            for (i, c) in ct.chunks(CHUNK).enumerate() {
                assert_eq!(d.sfi_state(), SfiState::AreaInProgress);
                assert_eq!(chunk(d, i * CHUNK, c), SfiStatus::Ok);
            }
        }
        assert_eq!(d.sfi_state(), SfiState::AreasComplete);
    }

    fn assert_failed_erased(d: &Device) {
        assert_eq!(d.sfi_state(), SfiState::Failed);
        assert!(d.flash().is_erased(), "flash must be all 0xFF after a failure");
    }

    #[test]
    fn full_install_of_vector_image() {
        let v = vectors();
        let mut d = vector_device(&v);
        let img = split_image(&v.image);
        send_image(&mut d, &v.licence, &img);
        let reply = d.sfi(SfiOpcode::Install, &[], &[]);
        assert_eq!(reply.status, SfiStatus::Ok);
        assert!(reply.synchronous);
        let expected = expected_flash(&v.areas);
        let crc = u32::from_be_bytes(reply.data.try_into().unwrap());
        assert_eq!(crc, crc32fast::hash(&expected));
        assert_eq!(crc, flashgate_common::sfi::expected_flash_crc(l4(), &v.areas));
        assert_eq!(d.flash().as_bytes(), &expected[..]);
        assert_eq!(d.sfi_state(), SfiState::Installed);
        // The C area set FLASH_OPTR and RDP 0xAA; INSTALL raised RDP to level 1 anyway.
        assert_eq!(d.option_bytes()[&OPTION_USER], 0xFFEF_F8AA);
        assert_eq!(d.rdp_level(), RdpLevel::Level1);
        assert_eq!(d.rdp_byte(), RDP_LEVEL1);
        // GET_STATE works; everything else answers 0x010A; memory access is refused.
        assert_eq!(d.sfi(SfiOpcode::GetState, &[], &[]).data, vec![SfiState::Installed as u8, 0, 0]);
        assert_eq!(st(&mut d, SfiOpcode::GetCertificate, &[], &[]), SfiStatus::ReadoutProtected);
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::ReadoutProtected);
        assert_eq!(st(&mut d, SfiOpcode::Abort, &[], &[]), SfiStatus::ReadoutProtected);
        assert_eq!(d.sfi_state(), SfiState::Installed);
        assert_eq!(d.read_memory(0x0800_0000, 16), Err(DeviceError::ReadoutProtected(RdpLevel::Level1)));
        assert!(d.write_memory(0x0800_8000, &[0; 8]).is_err());
        assert!(d.go(0x0800_0000).is_err());
        assert!(d.mass_erase().is_err());
        assert_eq!(d.flash().as_bytes(), &expected[..]);
    }

    #[test]
    fn readout_unprotect_mass_erases_and_reopens() {
        let v = vectors();
        let mut d = vector_device(&v);
        send_image(&mut d, &v.licence, &split_image(&v.image));
        assert_eq!(st(&mut d, SfiOpcode::Install, &[], &[]), SfiStatus::Ok);
        let t = d.readout_unprotect().unwrap();
        assert!(t >= l4().mass_erase_time);
        assert!(d.flash().is_erased());
        assert_eq!(d.rdp_level(), RdpLevel::Level0);
        assert_eq!(d.sfi_state(), SfiState::Idle);
        assert_eq!(d.read_memory(0x0800_0000, 4).unwrap(), vec![0xFF; 4]);
        // A new installation works again.
        send_image(&mut d, &v.licence, &split_image(&v.image));
        assert_eq!(st(&mut d, SfiOpcode::Install, &[], &[]), SfiStatus::Ok);
    }

    #[test]
    fn bad_area_tag_fails_and_erases() {
        let v = vectors();
        let mut d = vector_device(&v);
        let mut img = split_image(&v.image);
        // Corrupt the last ciphertext byte of area 2: plaintext is programmed, then the tag fails.
        let last = img.areas[1].1.len() - 1;
        img.areas[1].1[last] ^= 1;
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::SetImageHeader, &[], &img.header), SfiStatus::Ok);
        let (desc, ct) = &img.areas[0];
        assert_eq!(st(&mut d, SfiOpcode::StartArea, &[], desc), SfiStatus::Ok);
        assert_eq!(chunk(&mut d, 0, ct), SfiStatus::Ok);
        assert!(!d.flash().is_erased());
        let (desc, ct) = &img.areas[1];
        assert_eq!(st(&mut d, SfiOpcode::StartArea, &[], desc), SfiStatus::Ok);
        assert_eq!(chunk(&mut d, 0, &ct[..1024]), SfiStatus::Ok);
        let reply = d.sfi(SfiOpcode::WriteChunk, &1024u32.to_be_bytes(), &ct[1024..]);
        assert_eq!(reply.status, SfiStatus::AreaNotAuthentic);
        assert!(reply.synchronous);
        assert_failed_erased(&d);
        assert_eq!(d.sfi(SfiOpcode::GetState, &[], &[]).data, vec![SfiState::Failed as u8, 0x01, 0x05]);
        // A new session may start from Failed.
        send_image(&mut d, &v.licence, &split_image(&v.image));
    }

    #[test]
    fn bad_header_tag_fails() {
        let v = vectors();
        let mut d = vector_device(&v);
        let mut img = split_image(&v.image);
        img.header[27] ^= 0x80;
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::SetImageHeader, &[], &img.header), SfiStatus::HeaderNotAuthentic);
        assert_failed_erased(&d);
    }

    #[test]
    fn abort_midway_erases() {
        let v = vectors();
        let mut d = vector_device(&v);
        let img = split_image(&v.image);
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::SetImageHeader, &[], &img.header), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::StartArea, &[], &img.areas[0].0), SfiStatus::Ok);
        assert_eq!(chunk(&mut d, 0, &img.areas[0].1[..512]), SfiStatus::Ok);
        assert!(!d.flash().is_erased());
        let reply = d.sfi(SfiOpcode::Abort, &[], &[]);
        assert_eq!(reply.status, SfiStatus::Ok);
        assert!(reply.synchronous);
        assert_failed_erased(&d);
        // ABORT outside a session is a harmless Ok.
        assert_eq!(st(&mut d, SfiOpcode::Abort, &[], &[]), SfiStatus::Ok);
        assert_eq!(d.sfi_state(), SfiState::Failed);
    }

    #[test]
    fn wrong_product_licence() {
        let v = vectors();
        let mut d = vector_device(&v);
        let mut licence = v.licence.clone();
        licence[8..16].copy_from_slice(b"45002001");
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &licence), SfiStatus::WrongProduct);
        assert_failed_erased(&d);
        // The same chip on another family's profile refuses the vector licence too.
        let mut h7 = Device::new(
            Family::Stm32H7.profile(),
            ChipIdentity::certify(Family::Stm32H7.profile(), &v.vendor_ca, v.chip.clone()),
        );
        assert_eq!(st(&mut h7, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::WrongProduct);
    }

    #[test]
    fn licence_for_other_chip_is_invalid() {
        let v = vectors();
        let mut d = Device::new(l4(), ChipIdentity::certify(l4(), &v.vendor_ca, v.other_chip.clone()));
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::LicenceInvalid);
        assert_eq!(d.sfi(SfiOpcode::GetState, &[], &[]).data, vec![SfiState::Failed as u8, 0x01, 0x02]);
        // Garbage of the right and wrong length.
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &[0u8; 132]), SfiStatus::LicenceInvalid);
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &[1, 2, 3]), SfiStatus::LicenceInvalid);
        // But a licence issued for this chip opens.
        let own = licence_for(&v, d.identity().certificate());
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &own), SfiStatus::Ok);
    }

    #[test]
    fn out_of_order_chunk_fails() {
        let v = vectors();
        let mut d = vector_device(&v);
        let img = split_image(&v.image);
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::SetImageHeader, &[], &img.header), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::StartArea, &[], &img.areas[1].0), SfiStatus::BadState);
        assert_failed_erased(&d);

        let mut d = vector_device(&v);
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::SetImageHeader, &[], &img.header), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::StartArea, &[], &img.areas[0].0), SfiStatus::Ok);
        assert_eq!(chunk(&mut d, 0, &img.areas[0].1[..256]), SfiStatus::Ok);
        // A gap.
        assert_eq!(chunk(&mut d, 512, &img.areas[0].1[512..768]), SfiStatus::ChunkOutOfOrder);
        assert_failed_erased(&d);

        let mut d = vector_device(&v);
        send_image(&mut d, &v.licence, &img);
        // Past the end of an area.
        let mut d2 = vector_device(&v);
        assert_eq!(st(&mut d2, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::Ok);
        assert_eq!(st(&mut d2, SfiOpcode::SetImageHeader, &[], &img.header), SfiStatus::Ok);
        assert_eq!(st(&mut d2, SfiOpcode::StartArea, &[], &img.areas[0].0), SfiStatus::Ok);
        let mut long = img.areas[0].1.clone();
        long.push(0);
        assert_eq!(chunk(&mut d2, 0, &long), SfiStatus::ChunkOutOfOrder);
        assert_failed_erased(&d2);
        // Chunk after the last area / INSTALL before the end.
        assert_eq!(chunk(&mut d, 0, &[1, 2, 3]), SfiStatus::BadState);
        assert_failed_erased(&d);
    }

    #[test]
    fn install_before_areas_complete_fails() {
        let v = vectors();
        let mut d = vector_device(&v);
        let img = split_image(&v.image);
        assert_eq!(st(&mut d, SfiOpcode::Install, &[], &[]), SfiStatus::BadState);
        assert_eq!(d.sfi_state(), SfiState::Idle);
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::SetImageHeader, &[], &img.header), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::Install, &[], &[]), SfiStatus::BadState);
        assert_failed_erased(&d);
    }

    #[test]
    fn duplicate_commands_are_idempotent() {
        let v = vectors();
        let mut d = vector_device(&v);
        let img = split_image(&v.image);
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::Ok);
        assert_eq!(d.sfi_state(), SfiState::LicenceAccepted);
        assert_eq!(st(&mut d, SfiOpcode::SetImageHeader, &[], &img.header), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::SetImageHeader, &[], &img.header), SfiStatus::Ok);
        for (desc, ct) in &img.areas {
            assert_eq!(st(&mut d, SfiOpcode::StartArea, &[], desc), SfiStatus::Ok);
            assert_eq!(st(&mut d, SfiOpcode::StartArea, &[], desc), SfiStatus::Ok);
            for (i, c) in ct.chunks(CHUNK).enumerate() {
                assert_eq!(chunk(&mut d, i * CHUNK, c), SfiStatus::Ok);
                let again = d.sfi(SfiOpcode::WriteChunk, &((i * CHUNK) as u32).to_be_bytes(), c);
                assert_eq!(again.status, SfiStatus::Ok);
                assert_eq!(again.flash_time, Duration::ZERO, "a retry must not program again");
            }
        }
        assert_eq!(d.sfi_state(), SfiState::AreasComplete);
        let reply = d.sfi(SfiOpcode::Install, &[], &[]);
        assert_eq!(reply.status, SfiStatus::Ok);
        assert_eq!(d.flash().as_bytes(), &expected_flash(&v.areas)[..]);
    }

    #[test]
    fn non_identical_repeats_fail() {
        let v = vectors();
        let img = split_image(&v.image);
        // A different licence in LicenceAccepted.
        let mut d = vector_device(&v);
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::Ok);
        let mut other = v.licence.clone();
        other[131] ^= 1;
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &other), SfiStatus::BadState);
        assert_failed_erased(&d);
        // The identical licence after the header is out of sequence.
        let mut d = vector_device(&v);
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::SetImageHeader, &[], &img.header), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::BadState);
        assert_failed_erased(&d);
    }

    #[test]
    fn repeated_chunk_not_last_fails() {
        let v = vectors();
        let img = split_image(&v.image);
        let mut d = vector_device(&v);
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::SetImageHeader, &[], &img.header), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::StartArea, &[], &img.areas[1].0), SfiStatus::BadState);
        let mut d = vector_device(&v);
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::SetImageHeader, &[], &img.header), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::StartArea, &[], &img.areas[0].0), SfiStatus::Ok);
        let ct = &img.areas[0].1;
        assert_eq!(chunk(&mut d, 0, &ct[..256]), SfiStatus::Ok);
        assert_eq!(chunk(&mut d, 256, &ct[256..512]), SfiStatus::Ok);
        assert_eq!(chunk(&mut d, 0, &ct[..256]), SfiStatus::ChunkOutOfOrder);
        assert_failed_erased(&d);
    }

    fn install_areas(areas: &[PlainArea]) -> (Device, Vec<SfiStatus>) {
        let v = vectors();
        let mut d = vector_device(&v);
        let img = split_image(&image_of(&v, areas));
        let mut statuses = vec![
            st(&mut d, SfiOpcode::SetLicence, &[], &v.licence),
            st(&mut d, SfiOpcode::SetImageHeader, &[], &img.header),
        ];
        for (desc, ct) in &img.areas {
            statuses.push(st(&mut d, SfiOpcode::StartArea, &[], desc));
            for (i, c) in ct.chunks(100).enumerate() {
                statuses.push(chunk(&mut d, i * 100, c));
            }
        }
        statuses.push(st(&mut d, SfiOpcode::Install, &[], &[]));
        (d, statuses)
    }

    fn f(address: u32, data: Vec<u8>) -> PlainArea {
        PlainArea { area_type: AreaType::Firmware, address, data }
    }

    #[test]
    fn odd_sizes_pad_the_last_word_and_empty_areas_work() {
        let data: Vec<u8> = (0..1003u32).map(|i| (i * 7) as u8).collect();
        let areas = vec![
            f(0x0800_4000, data.clone()),
            PlainArea { area_type: AreaType::Pause, address: 0x1234, data: vec![] },
            PlainArea { area_type: AreaType::Resume, address: 0x1234, data: vec![] },
            f(0x0800_4000 + 1008, vec![0xAB; 16]),
        ];
        let (d, statuses) = install_areas(&areas);
        assert!(statuses.iter().all(|s| *s == SfiStatus::Ok), "{statuses:?}");
        assert_eq!(d.sfi_state(), SfiState::Installed);
        let flash = d.flash().as_bytes();
        assert_eq!(&flash[0x4000..0x4000 + 1003], &data[..]);
        assert_eq!(&flash[0x4000 + 1003..0x4000 + 1008], &[0xFF; 5]);
        assert_eq!(&flash[0x4000 + 1008..0x4000 + 1024], &[0xAB; 16]);
    }

    #[test]
    fn area_rules() {
        // Overlap (inside the padded last word of the previous area).
        let (d, s) = install_areas(&[f(0x0800_0000, vec![1; 12]), f(0x0800_0008, vec![2; 8])]);
        assert!(s.contains(&SfiStatus::AreaOverlap), "{s:?}");
        assert_failed_erased(&d);
        // Misaligned to the program word.
        let (d, s) = install_areas(&[f(0x0800_0004, vec![1; 8])]);
        assert!(s.contains(&SfiStatus::AddressOutOfRange), "{s:?}");
        assert_failed_erased(&d);
        // Outside flash.
        let (d, s) = install_areas(&[f(0x0807_FFF8, vec![1; 16])]);
        assert!(s.contains(&SfiStatus::AddressOutOfRange), "{s:?}");
        assert_failed_erased(&d);
        // Reserved E area.
        let (d, s) =
            install_areas(&[PlainArea { area_type: AreaType::External, address: 0x9000_0000, data: vec![0; 8] }]);
        assert!(s.contains(&SfiStatus::AddressOutOfRange), "{s:?}");
        assert_failed_erased(&d);
        // Unknown option-byte id: refused at INSTALL.
        let mut rec = 77u32.to_le_bytes().to_vec();
        rec.extend_from_slice(&1u32.to_le_bytes());
        let (d, s) = install_areas(&[
            f(0x0800_0000, vec![1; 8]),
            PlainArea { area_type: AreaType::Config, address: 0, data: rec },
        ]);
        assert_eq!(s.last(), Some(&SfiStatus::AddressOutOfRange), "{s:?}");
        assert_failed_erased(&d);
        assert_eq!(d.rdp_level(), RdpLevel::Level0);
    }

    #[test]
    fn config_area_can_raise_rdp_to_level2() {
        let mut rec = OPTION_RDP.to_le_bytes().to_vec();
        rec.extend_from_slice(&u32::from(RDP_LEVEL2).to_le_bytes());
        let (mut d, s) = install_areas(&[
            f(0x0800_0000, vec![1; 8]),
            PlainArea { area_type: AreaType::Config, address: 0, data: rec },
        ]);
        assert!(s.iter().all(|s| *s == SfiStatus::Ok), "{s:?}");
        assert_eq!(d.rdp_level(), RdpLevel::Level2);
        assert!(d.readout_unprotect().is_err());
        assert!(d.readout_protect().is_err());
        assert_eq!(d.sfi_state(), SfiState::Installed);
    }

    #[test]
    fn memory_access_refused_during_session_and_reset_fails_it() {
        let v = vectors();
        let mut d = vector_device(&v);
        let img = split_image(&v.image);
        assert_eq!(d.write_memory(0x0800_0000, &[1; 8]), Ok(Duration::from_micros(82)));
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::Ok);
        // SET_LICENCE mass-erased what Write Memory put there.
        assert!(d.flash().is_erased());
        assert_eq!(st(&mut d, SfiOpcode::SetImageHeader, &[], &img.header), SfiStatus::Ok);
        assert_eq!(st(&mut d, SfiOpcode::StartArea, &[], &img.areas[0].0), SfiStatus::Ok);
        assert_eq!(chunk(&mut d, 0, &img.areas[0].1[..64]), SfiStatus::Ok);
        assert!(matches!(d.read_memory(0x0800_0000, 64), Err(DeviceError::SfiSessionActive(_))));
        assert!(d.write_memory(0x0800_1000, &[0; 8]).is_err());
        assert!(d.erase_pages(&[0]).is_err());
        assert!(d.go(0x0800_0000).is_err());
        d.reset();
        assert_failed_erased(&d);
        assert_eq!(d.read_memory(0x0800_0000, 4).unwrap(), vec![0xFF; 4]);
    }

    #[test]
    fn readout_protect_blocks_sfi_and_memory() {
        let v = vectors();
        let mut d = vector_device(&v);
        d.readout_protect().unwrap();
        assert_eq!(d.rdp_level(), RdpLevel::Level1);
        assert_eq!(st(&mut d, SfiOpcode::SetLicence, &[], &v.licence), SfiStatus::ReadoutProtected);
        assert_eq!(d.sfi(SfiOpcode::GetState, &[], &[]).data, vec![0, 0x01, 0x0A]);
        assert!(d.read_memory(0x0800_0000, 4).is_err());
        d.readout_unprotect().unwrap();
        assert_eq!(d.sfi(SfiOpcode::GetCertificate, &[], &[]).data, v.certificate.to_bytes().to_vec());
    }

    #[test]
    fn banks_and_sram() {
        let v = vectors();
        let mut d = vector_device(&v);
        assert_eq!(d.bank_count(), 1);
        assert!(d.bank_erase(2).is_err());
        d.write_memory(0x0807_F000, &[0; 8]).unwrap();
        d.bank_erase(1).unwrap();
        assert!(d.flash().is_erased());
        d.write_memory(SRAM_BASE + 16, &[1, 2, 3]).unwrap();
        assert_eq!(d.read_memory(SRAM_BASE + 16, 3).unwrap(), vec![1, 2, 3]);
        assert!(d.read_memory(SRAM_BASE + SRAM_SIZE - 1, 2).is_err());
        let mut h7 = Device::new(
            Family::Stm32H7.profile(),
            ChipIdentity::generate(Family::Stm32H7.profile(), &v.vendor_ca, &mut rand::rngs::OsRng),
        );
        h7.write_memory(0x0810_0000, &[0; 32]).unwrap();
        h7.write_memory(0x0800_0000, &[0; 32]).unwrap();
        h7.bank_erase(2).unwrap();
        assert_eq!(h7.read_memory(0x0810_0000, 1).unwrap(), vec![0xFF]);
        assert_eq!(h7.read_memory(0x0800_0000, 1).unwrap(), vec![0]);
    }

    #[test]
    fn identity_must_match_certificate() {
        let v = vectors();
        assert!(ChipIdentity::new(v.other_chip.clone(), v.certificate.clone()).is_err());
        let id = ChipIdentity::from_seed(l4(), &v.vendor_ca, 7);
        assert_eq!(
            id.certificate().to_bytes(),
            ChipIdentity::from_seed(l4(), &v.vendor_ca, 7).certificate().to_bytes()
        );
        id.certificate().verify(&[v.vendor_ca.public_key()]).unwrap();
        assert_eq!(&id.certificate().product_id, b"46201002");
    }

    #[test]
    fn restore_of_active_session_fails_it() {
        let v = vectors();
        let d = Device::restore(
            l4(),
            ChipIdentity::new(v.chip.clone(), v.certificate.clone()).unwrap(),
            Flash::from_image(l4(), vec![0; 512 * 1024]).unwrap(),
            BTreeMap::new(),
            SfiState::AreaInProgress,
            SfiStatus::Ok,
        );
        assert_failed_erased(&d);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Cmd {
            Licence(bool),
            Header(bool),
            Area(usize, bool),
            Chunk { area: usize, start: usize, len: usize, corrupt: bool },
            Install,
            Abort,
            GetState,
            Cert,
            Unprotect,
            Reset,
        }

        fn cmd() -> impl Strategy<Value = Cmd> {
            prop_oneof![
                any::<bool>().prop_map(Cmd::Licence),
                any::<bool>().prop_map(Cmd::Header),
                (0..3usize, any::<bool>()).prop_map(|(a, c)| Cmd::Area(a, c)),
                (0..3usize, 0..2100usize, 0..1100usize, prop::bool::weighted(0.1))
                    .prop_map(|(area, start, len, corrupt)| Cmd::Chunk { area, start, len, corrupt }),
                Just(Cmd::Install),
                Just(Cmd::Abort),
                Just(Cmd::GetState),
                Just(Cmd::Cert),
                Just(Cmd::Unprotect),
                Just(Cmd::Reset),
            ]
        }

        fn plan() -> impl Strategy<Value = Vec<Cmd>> {
            // Mostly the right sequence, with random commands mixed in.
            prop::collection::vec(cmd(), 0..60)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
            #[test]
            fn random_sfi_sequences_never_leak_plaintext(cmds in plan(), follow_script in any::<bool>()) {
                let v = vectors();
                let img = split_image(&v.image);
                let mut d = vector_device(&v);
                let mut script: Vec<Cmd> = Vec::new();
                if follow_script {
                    script.push(Cmd::Licence(true));
                    script.push(Cmd::Header(true));
                    for (a, (_, ct)) in img.areas.iter().enumerate() {
                        script.push(Cmd::Area(a, true));
                        let mut at = 0;
                        while at < ct.len() {
                            let len = 700.min(ct.len() - at);
                            script.push(Cmd::Chunk { area: a, start: at, len, corrupt: false });
                            at += len;
                        }
                    }
                }
                // Interleave the random commands into the script.
                let mut all = Vec::new();
                let mut rnd = cmds.into_iter();
                for c in script {
                    all.push(c);
                    if let Some(r) = rnd.next() { all.push(r); }
                }
                all.extend(rnd);
                all.push(Cmd::Install);
                for c in all {
                    match c {
                        Cmd::Licence(good) => {
                            let l = if good { v.licence.clone() } else { vec![0x46; 132] };
                            d.sfi(SfiOpcode::SetLicence, &[], &l);
                        }
                        Cmd::Header(good) => {
                            let mut h = img.header.clone();
                            if !good { h[20] ^= 1; }
                            d.sfi(SfiOpcode::SetImageHeader, &[], &h);
                        }
                        Cmd::Area(a, good) => {
                            let mut desc = img.areas[a].0.clone();
                            if !good { desc[29] ^= 1; }
                            d.sfi(SfiOpcode::StartArea, &[], &desc);
                        }
                        Cmd::Chunk { area, start, len, corrupt } => {
                            let ct = &img.areas[area].1;
                            let s = start.min(ct.len());
                            let e = (s + len).min(ct.len());
                            let mut data = ct[s..e].to_vec();
                            if corrupt && !data.is_empty() { data[0] ^= 0x55; }
                            d.sfi(SfiOpcode::WriteChunk, &(s as u32).to_be_bytes(), &data);
                        }
                        Cmd::Install => { d.sfi(SfiOpcode::Install, &[], &[]); }
                        Cmd::Abort => { d.sfi(SfiOpcode::Abort, &[], &[]); }
                        Cmd::GetState => {
                            let r = d.sfi(SfiOpcode::GetState, &[], &[]);
                            prop_assert_eq!(r.data.len(), 3);
                            prop_assert_eq!(r.data[0], d.sfi_state() as u8);
                        }
                        Cmd::Cert => { d.sfi(SfiOpcode::GetCertificate, &[], &[]); }
                        Cmd::Unprotect => { let _ = d.readout_unprotect(); }
                        Cmd::Reset => { d.reset(); }
                    }
                    match d.sfi_state() {
                        SfiState::Failed => prop_assert!(d.flash().is_erased(), "plaintext left after failure"),
                        SfiState::Idle => prop_assert!(d.flash().is_erased()),
                        SfiState::Installed => {
                            prop_assert_eq!(d.flash().as_bytes(), &expected_flash(&v.areas)[..]);
                            prop_assert!(d.rdp_level() >= RdpLevel::Level1);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}
