//! AN3155 bootloader framing constants and the Flashgate SFI opcodes, states and status codes
//! (SFI profile v1 §5). Shared by the simulator (device side) and the host client (agent side) so
//! both ends agree byte for byte.

use std::fmt;

/// Host's synchronisation byte (autobaud / resync).
pub const SYNC: u8 = 0x7F;
/// Positive acknowledge.
pub const ACK: u8 = 0x79;
/// Negative acknowledge.
pub const NACK: u8 = 0x1F;

/// Get: bootloader version and supported commands.
pub const CMD_GET: u8 = 0x00;
/// Get Version: version and two option bytes.
pub const CMD_GET_VERSION: u8 = 0x01;
/// Get ID: product id (PID).
pub const CMD_GET_ID: u8 = 0x02;
/// Read Memory (≤ 256 bytes).
pub const CMD_READ_MEMORY: u8 = 0x11;
/// Go: jump to address.
pub const CMD_GO: u8 = 0x21;
/// Write Memory (≤ 256 bytes, multiple of 4).
pub const CMD_WRITE_MEMORY: u8 = 0x31;
/// Extended Erase (two-byte page numbers; `0xFFFF` = mass erase).
pub const CMD_EXTENDED_ERASE: u8 = 0x44;
/// Special: opcode + one buffer (≤ 128 bytes) in, data + status out.
pub const CMD_SPECIAL: u8 = 0x50;
/// Extended Special: opcode + buffer 1 (≤ 128) + buffer 2 (≤ 1024) in, status out.
pub const CMD_EXTENDED_SPECIAL: u8 = 0x51;
/// Readout Protect (raise RDP to level 1).
pub const CMD_READOUT_PROTECT: u8 = 0x82;
/// Readout Unprotect (mass erase, RDP back to level 0).
pub const CMD_READOUT_UNPROTECT: u8 = 0x92;

/// Commands the simulator lists in its answer to Get, in this order.
pub const SUPPORTED_COMMANDS: [u8; 11] = [
    CMD_GET,
    CMD_GET_VERSION,
    CMD_GET_ID,
    CMD_READ_MEMORY,
    CMD_GO,
    CMD_WRITE_MEMORY,
    CMD_EXTENDED_ERASE,
    CMD_SPECIAL,
    CMD_EXTENDED_SPECIAL,
    CMD_READOUT_PROTECT,
    CMD_READOUT_UNPROTECT,
];

/// Bootloader protocol version the simulator reports (3.1, as on current STM32 ROMs).
pub const BOOTLOADER_VERSION: u8 = 0x31;

/// Largest Read Memory / Write Memory payload.
pub const MAX_MEMORY_BLOCK: usize = 256;
/// Largest Special buffer and Extended Special buffer 1.
pub const MAX_SPECIAL_BUFFER: usize = 128;
/// Largest Extended Special buffer 2 (and so the largest WRITE_CHUNK).
pub const MAX_EXTENDED_BUFFER: usize = 1024;
/// Extended Erase page number that requests a mass erase.
pub const MASS_ERASE: u16 = 0xFFFF;

/// XOR checksum of a byte sequence, as AN3155 uses everywhere.
pub fn xor_checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |acc, b| acc ^ b)
}

/// A command byte followed by its complement, as sent by the host.
pub fn command_frame(opcode: u8) -> [u8; 2] {
    [opcode, !opcode]
}

/// A 32-bit address MSB first followed by the XOR of its four bytes.
pub fn address_frame(address: u32) -> [u8; 5] {
    let b = address.to_be_bytes();
    [b[0], b[1], b[2], b[3], xor_checksum(&b)]
}

/// Flashgate SFI opcodes carried by Special (0x50) and Extended Special (0x51).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum SfiOpcode {
    /// 0x50: response data is the 136-byte chip certificate.
    GetCertificate = 0x5F01,
    /// 0x51: buffer 2 is the 132-byte licence.
    SetLicence = 0x5F02,
    /// 0x51: buffer 2 is the 28-byte image header.
    SetImageHeader = 0x5F03,
    /// 0x51: buffer 2 is the 30-byte area descriptor.
    StartArea = 0x5F04,
    /// 0x51: buffer 1 is the `u32` offset (MSB first), buffer 2 ≤ 1024 bytes of ciphertext.
    WriteChunk = 0x5F05,
    /// 0x50: verify, apply option bytes, raise RDP; response data is the `u32` flash CRC-32.
    Install = 0x5F06,
    /// 0x50: response data is `u8 state, u16 last_status`.
    GetState = 0x5F07,
    /// 0x50: mass-erase whatever was written.
    Abort = 0x5F08,
}

impl SfiOpcode {
    /// Every opcode, in numeric order.
    pub const ALL: [SfiOpcode; 8] = [
        Self::GetCertificate,
        Self::SetLicence,
        Self::SetImageHeader,
        Self::StartArea,
        Self::WriteChunk,
        Self::Install,
        Self::GetState,
        Self::Abort,
    ];

    /// The opcode's wire value.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// Decode a wire value; `None` for opcodes this profile does not define.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.code() == code)
    }

    /// Which bootloader command carries this opcode (0x50 or 0x51).
    pub fn frame(self) -> u8 {
        match self {
            Self::GetCertificate | Self::Install | Self::GetState | Self::Abort => CMD_SPECIAL,
            Self::SetLicence | Self::SetImageHeader | Self::StartArea | Self::WriteChunk => CMD_EXTENDED_SPECIAL,
        }
    }

    /// Upper-case name as in the profile's table.
    pub fn name(self) -> &'static str {
        match self {
            Self::GetCertificate => "GET_CERTIFICATE",
            Self::SetLicence => "SET_LICENCE",
            Self::SetImageHeader => "SET_IMAGE_HEADER",
            Self::StartArea => "START_AREA",
            Self::WriteChunk => "WRITE_CHUNK",
            Self::Install => "INSTALL",
            Self::GetState => "GET_STATE",
            Self::Abort => "ABORT",
        }
    }
}

impl fmt::Display for SfiOpcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:04X})", self.name(), self.code())
    }
}

/// SFI status codes returned in the status field of Special / Extended Special.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum SfiStatus {
    /// Success.
    Ok = 0x0000,
    /// Command not valid in the current state or out of sequence.
    BadState = 0x0101,
    /// The licence could not be opened with this chip's key.
    LicenceInvalid = 0x0102,
    /// The licence names a different product.
    WrongProduct = 0x0103,
    /// The image header tag does not verify.
    HeaderNotAuthentic = 0x0104,
    /// An area tag does not verify.
    AreaNotAuthentic = 0x0105,
    /// An area lies outside the device's memory map (or is not installable).
    AddressOutOfRange = 0x0106,
    /// An area overlaps an earlier one.
    AreaOverlap = 0x0107,
    /// A chunk arrived at an unexpected offset.
    ChunkOutOfOrder = 0x0108,
    /// Flash programming or erase failed.
    FlashError = 0x0109,
    /// The device is readout protected (SFI already installed).
    ReadoutProtected = 0x010A,
}

impl SfiStatus {
    /// Every status, in numeric order.
    pub const ALL: [SfiStatus; 11] = [
        Self::Ok,
        Self::BadState,
        Self::LicenceInvalid,
        Self::WrongProduct,
        Self::HeaderNotAuthentic,
        Self::AreaNotAuthentic,
        Self::AddressOutOfRange,
        Self::AreaOverlap,
        Self::ChunkOutOfOrder,
        Self::FlashError,
        Self::ReadoutProtected,
    ];

    /// The status's wire value.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// Decode a wire value; `None` for codes this profile does not define.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }

    /// The status in words, for operators.
    pub fn message(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::BadState => "command out of sequence (bad state)",
            Self::LicenceInvalid => "licence invalid",
            Self::WrongProduct => "licence is for another product",
            Self::HeaderNotAuthentic => "image header not authentic",
            Self::AreaNotAuthentic => "area not authentic",
            Self::AddressOutOfRange => "address out of range",
            Self::AreaOverlap => "area overlaps an earlier area",
            Self::ChunkOutOfOrder => "chunk out of order",
            Self::FlashError => "flash error",
            Self::ReadoutProtected => "device is readout protected",
        }
    }
}

impl fmt::Display for SfiStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:04X})", self.message(), self.code())
    }
}

/// The device's SFI state as reported by GET_STATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SfiState {
    /// No SFI session in progress.
    Idle = 0,
    /// A licence was accepted; the image header is expected next.
    LicenceAccepted = 1,
    /// The header was verified; areas may start.
    HeaderAccepted = 2,
    /// An area is being received.
    AreaInProgress = 3,
    /// Every area verified; INSTALL may be sent.
    AreasComplete = 4,
    /// Installed and readout protected.
    Installed = 5,
    /// A failure or ABORT mass-erased the flash; a new session may start.
    Failed = 6,
}

impl SfiState {
    /// Every state, in numeric order.
    pub const ALL: [SfiState; 7] = [
        Self::Idle,
        Self::LicenceAccepted,
        Self::HeaderAccepted,
        Self::AreaInProgress,
        Self::AreasComplete,
        Self::Installed,
        Self::Failed,
    ];

    /// Decode a wire value.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as u8 == code)
    }

    /// Lower-case name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::LicenceAccepted => "licence-accepted",
            Self::HeaderAccepted => "header-accepted",
            Self::AreaInProgress => "area-in-progress",
            Self::AreasComplete => "areas-complete",
            Self::Installed => "installed",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for SfiState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for op in SfiOpcode::ALL {
            assert_eq!(SfiOpcode::from_code(op.code()), Some(op));
        }
        for s in SfiStatus::ALL {
            assert_eq!(SfiStatus::from_code(s.code()), Some(s));
        }
        for s in SfiState::ALL {
            assert_eq!(SfiState::from_code(s as u8), Some(s));
        }
        assert_eq!(SfiStatus::from_code(0x0199), None);
    }

    #[test]
    fn framing_helpers() {
        assert_eq!(command_frame(CMD_GET_ID), [0x02, 0xFD]);
        assert_eq!(address_frame(0x0800_0000), [0x08, 0, 0, 0, 0x08]);
        assert_eq!(xor_checksum(&[0x5F, 0x01]), 0x5E);
        assert_eq!(SfiStatus::AreaNotAuthentic.message(), "area not authentic");
    }
}
