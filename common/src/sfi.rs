//! The `.sfi` image file of the Flashgate SFI profile v1 (§2): header and area descriptor layouts,
//! the AES-128-GCM construction (header tag, per-area IVs and AADs), packing plain areas into an
//! image, and streaming readers (sync and tokio) that enforce every limit of §2 before allocating.
//!
//! The readers share one sans-io validator ([`ImageValidator`]): the sync and async readers only do
//! I/O and feed it the bytes they read, so both enforce exactly the same rules.

use std::fmt;
use std::io::{Read, Write};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce, Tag};
use rand::{CryptoRng, RngCore};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt};
use zeroize::Zeroizing;

use crate::family::FamilyProfile;

/// File magic, the first 8 bytes of every image.
pub const MAGIC: [u8; 8] = *b"SFIMAGIC";
/// The only image format version of the profile.
pub const IMAGE_VERSION: u16 = 1;
/// Length of the image header in bytes.
pub const HEADER_LEN: usize = 28;
/// Length of an area descriptor in bytes.
pub const DESCRIPTOR_LEN: usize = 30;
/// The only area version of the profile.
pub const AREA_VERSION: u8 = 0x17;
/// Largest number of areas in one image.
pub const MAX_AREAS: u16 = 1024;
/// Largest payload of one area (16 MiB).
pub const MAX_AREA_SIZE: u32 = 16 << 20;
/// Largest `.sfi` file a host loads whole before installing it (64 MiB): far above any family's
/// flash (2 MiB at most) with its headers and tags, small enough to hold in memory.
pub const MAX_IMAGE_FILE: u64 = 64 << 20;
/// Length of a GCM tag.
pub const TAG_LEN: usize = 16;

/// Room for option bytes in an image bound: far more than any family's `C` area.
const CONFIG_ROOM: u64 = 64 << 10;

/// The largest `.sfi` file that can hold an image for `profile`: its whole flash, the header, the
/// largest number of area descriptors and tags, and option bytes. A size announced above this is
/// refused before a byte is downloaded.
pub fn max_image_file(profile: &crate::family::FamilyProfile) -> u64 {
    profile.flash_size as u64 + HEADER_LEN as u64 + MAX_AREAS as u64 * (DESCRIPTOR_LEN + TAG_LEN) as u64 + CONFIG_ROOM
}
/// Size of one `C` area record of the pairs layout (`u32 id, u32 value`).
pub const CONFIG_RECORD_LEN: u32 = 8;
/// Size of one option word; every `C` area is a whole number of them.
pub const CONFIG_WORD_LEN: u32 = 4;

/// The size rule of `profile`'s `C` layout (profile v1.1 §2): pairs, a multiple of 8 bytes;
/// positional, exactly its words (STM32H7: 36 bytes).
pub fn check_config_size(profile: &FamilyProfile, size: u32) -> Result<(), Problem> {
    match profile.config_layout.exact_size() {
        Some(expected) if size != expected => {
            Err(Problem::ConfigSize { size, expected, words: expected / CONFIG_WORD_LEN, target: profile.display_name })
        }
        Some(_) => Ok(()),
        None if !size.is_multiple_of(CONFIG_RECORD_LEN) => Err(Problem::NotWholeRecords { size }),
        None => Ok(()),
    }
}

/// The AES-128 firmware key `K`. Zeroized on drop; `Debug` never prints it; equality is
/// constant-time.
#[derive(Clone)]
pub struct FirmwareKey(Zeroizing<[u8; 16]>);

impl FirmwareKey {
    /// Wrap raw key bytes.
    pub fn new(bytes: [u8; 16]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// A fresh random key.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut key = Zeroizing::new([0u8; 16]);
        rng.fill_bytes(key.as_mut());
        Self(key)
    }

    /// Wrap key bytes that already live in a zeroizing buffer.
    pub(crate) fn from_zeroizing(bytes: Zeroizing<[u8; 16]>) -> Self {
        Self(bytes)
    }

    /// The raw key bytes (handle with care).
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for FirmwareKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FirmwareKey(..)")
    }
}

impl PartialEq for FirmwareKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_slice().ct_eq(other.0.as_slice()).into()
    }
}

impl Eq for FirmwareKey {}

/// The 96-bit image nonce `N`. Not stored in the image; it travels with the key (in the licence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageNonce(pub [u8; 12]);

impl ImageNonce {
    /// A fresh random nonce: packing must draw a new one for every image.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut n = [0u8; 12];
        rng.fill_bytes(&mut n);
        Self(n)
    }

    /// The raw nonce bytes.
    pub fn as_bytes(&self) -> &[u8; 12] {
        &self.0
    }
}

/// The type of an area (the descriptor's ASCII `type` byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AreaType {
    /// `F`: firmware for internal flash.
    Firmware,
    /// `C`: configuration (option-byte records `u32 id, u32 value`).
    Config,
    /// `P`: pause between RAM-sized parts (empty payload).
    Pause,
    /// `R`: resume after a pause (empty payload).
    Resume,
    /// `M`: an embedded module file.
    Module,
    /// `E`: external flash (reserved in v1: parsed, never installed).
    External,
    /// `K`: on-chip key generation (reserved in v1: parsed, never installed).
    KeyGen,
}

impl AreaType {
    /// Every area type.
    pub const ALL: [AreaType; 7] =
        [Self::Firmware, Self::Config, Self::Pause, Self::Resume, Self::Module, Self::External, Self::KeyGen];

    /// The ASCII type byte.
    pub fn as_byte(self) -> u8 {
        match self {
            Self::Firmware => b'F',
            Self::Config => b'C',
            Self::Pause => b'P',
            Self::Resume => b'R',
            Self::Module => b'M',
            Self::External => b'E',
            Self::KeyGen => b'K',
        }
    }

    /// Decode a type byte; `None` for a type the profile does not define.
    pub fn from_byte(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_byte() == b)
    }

    /// Whether the area is programmed into internal flash at its address (`F` and `M`).
    pub fn is_flash(self) -> bool {
        matches!(self, Self::Firmware | Self::Module)
    }

    /// Whether v1 devices may install the area (everything but the reserved `E` and `K`).
    pub fn is_installable(self) -> bool {
        !matches!(self, Self::External | Self::KeyGen)
    }
}

impl fmt::Display for AreaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_byte() as char)
    }
}

/// Where in the file a malformed field sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The 28-byte image header.
    Header,
    /// The area at this 1-based position in the file (its descriptor or payload).
    Area(u16),
    /// After the last area.
    End,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Header => f.write_str("header"),
            Place::Area(i) => write!(f, "area {i}"),
            Place::End => f.write_str("end of image"),
        }
    }
}

/// What is wrong with a malformed field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The file ended inside a structure.
    #[error("file truncated (need {need} bytes, have {have})")]
    Truncated {
        /// Bytes the structure needs.
        need: u64,
        /// Bytes that were available.
        have: u64,
    },
    /// The magic is not `SFIMAGIC`.
    #[error("expected \"SFIMAGIC\", found \"{}\"", .found.escape_ascii())]
    BadMagic {
        /// The 8 bytes found.
        found: [u8; 8],
    },
    /// A field has a value other than the one required.
    #[error("expected {expected}, found {found}")]
    Unexpected {
        /// The required value.
        expected: u64,
        /// The value found.
        found: u64,
    },
    /// The area count is outside `1..=1024`.
    #[error("{found} is not from 1 to {MAX_AREAS}")]
    AreaCountOutOfRange {
        /// The count found.
        found: u16,
    },
    /// The type byte names no area type.
    #[error("unknown area type 0x{found:02X} ({:?})", char::from(*.found))]
    UnknownType {
        /// The type byte found.
        found: u8,
    },
    /// The area version is not 0x17.
    #[error("unsupported area version 0x{found:02X} (expected 0x17)")]
    UnsupportedAreaVersion {
        /// The version byte found.
        found: u8,
    },
    /// An area payload larger than 16 MiB.
    #[error("{size} exceeds the 16 MiB limit")]
    TooLarge {
        /// The size found.
        size: u64,
    },
    /// The declared structure would not fit in the file.
    #[error("needs the image to be at least {need} bytes long, but the file is {file_len} bytes")]
    BeyondFileEnd {
        /// Bytes the declared structure needs (from the start of the file).
        need: u64,
        /// The file length.
        file_len: u64,
    },
    /// Bytes follow the last area.
    #[error("{count} trailing byte(s) after the last area")]
    TrailingBytes {
        /// How many trailing bytes (at least; a stream of unknown length reports 1).
        count: u64,
    },
    /// A field that must be zero for this area type is not.
    #[error("must be 0 for a '{area_type}' area, found {found:#x}")]
    MustBeZero {
        /// The area type.
        area_type: AreaType,
        /// The value found.
        found: u64,
    },
    /// A `C` area size that is not a whole number of 8-byte records (a family with the pairs layout).
    #[error("{size} is not a multiple of the 8-byte option-byte record")]
    NotWholeRecords {
        /// The size found.
        size: u32,
    },
    /// A `C` area size that is not a whole number of 32-bit option words.
    #[error("{size} is not a multiple of the 4-byte option word")]
    NotWholeWords {
        /// The size found.
        size: u32,
    },
    /// A `C` area whose size is not the family's positional layout.
    #[error("{size} bytes, but a {target} `C` area holds exactly {expected} bytes ({words} option words)")]
    ConfigSize {
        /// The size found.
        size: u32,
        /// The size the family's layout has.
        expected: u32,
        /// Option words in that layout.
        words: u32,
        /// The family.
        target: &'static str,
    },
    /// An `F`/`M` area whose end is beyond the 32-bit address space.
    #[error("area [{start:#010x}, {end:#x}) extends past the 32-bit address space")]
    AddressOverflow {
        /// First address.
        start: u32,
        /// One past the last address.
        end: u64,
    },
    /// An `F`/`M` area outside the target's internal flash.
    #[error(
        "area [{start:#010x}, {end:#010x}) lies outside the flash [{flash_start:#010x}, {flash_end:#010x}) of {target}"
    )]
    OutsideFlash {
        /// First address.
        start: u32,
        /// One past the last address.
        end: u64,
        /// First flash address.
        flash_start: u32,
        /// One past the last flash address.
        flash_end: u64,
        /// The target family's display name.
        target: &'static str,
    },
    /// An `F`/`M` area address not aligned to the target's program word.
    #[error("{address:#010x} is not aligned to the {word}-byte program word of {target}")]
    Unaligned {
        /// The address found.
        address: u32,
        /// The program word in bytes.
        word: u32,
        /// The target family's display name.
        target: &'static str,
    },
    /// Two `F`/`M` areas overlap.
    #[error("area [{start:#010x}, {end:#010x}) overlaps area {other} [{other_start:#010x}, {other_end:#010x})")]
    Overlap {
        /// First address of this area.
        start: u32,
        /// One past the last address of this area.
        end: u64,
        /// Index of the earlier area.
        other: u16,
        /// First address of the earlier area.
        other_start: u32,
        /// One past the last address of the earlier area.
        other_end: u64,
    },
}

/// Errors of the image format, its crypto and its readers.
#[derive(Debug, thiserror::Error)]
pub enum SfiError {
    /// A malformed or out-of-limits field.
    #[error("offset {offset}: {place} field {field}: {problem}")]
    Malformed {
        /// Byte offset of the field in the file.
        offset: u64,
        /// Which structure the field belongs to.
        place: Place,
        /// The field's name as in the profile (`magic`, `area_count`, `size`, `payload`, …).
        field: &'static str,
        /// What is wrong.
        problem: Problem,
    },
    /// The header tag does not verify under the key and nonce.
    #[error("image header not authentic: the tag does not verify (wrong key or nonce, or the header was modified)")]
    HeaderNotAuthentic,
    /// An area tag does not verify under the key and nonce.
    #[error("area {index} not authentic: the tag does not verify (wrong key or nonce, or the area was modified)")]
    AreaNotAuthentic {
        /// The area's index.
        index: u16,
    },
    /// The ciphertext given for an area does not have the descriptor's size.
    #[error("area {index}: ciphertext is {found} bytes, the descriptor says {expected}")]
    LengthMismatch {
        /// The area's index.
        index: u16,
        /// The descriptor's size.
        expected: u32,
        /// The ciphertext length given.
        found: u64,
    },
    /// Packing was asked for an image with no areas or more than 1024.
    #[error("cannot pack {count} areas: an image holds 1 to {MAX_AREAS}")]
    AreaCount {
        /// The number of areas given.
        count: usize,
    },
    /// Packing was given an area payload larger than 16 MiB.
    #[error("cannot pack area {index}: {size} bytes exceed the 16 MiB limit")]
    AreaTooLarge {
        /// The 1-based position of the area.
        index: usize,
        /// The payload length.
        size: usize,
    },
    /// Reading or writing the image failed.
    #[error("I/O error at offset {offset}: {source}")]
    Io {
        /// Offset in the image where the I/O failed.
        offset: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A reader was used again after it returned an error.
    #[error("the image reader already failed at offset {offset}; it cannot continue")]
    ReaderFailed {
        /// Offset of the earlier failure.
        offset: u64,
    },
}

impl SfiError {
    /// The byte offset in the image the error refers to, when it refers to one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            SfiError::Malformed { offset, .. } | SfiError::Io { offset, .. } | SfiError::ReaderFailed { offset } => {
                Some(*offset)
            }
            _ => None,
        }
    }
}

fn malformed(offset: u64, place: Place, field: &'static str, problem: Problem) -> SfiError {
    SfiError::Malformed { offset, place, field, problem }
}

/// Header fields: (offset within the header, name).
const HEADER_FIELDS: [(usize, &str); 4] = [(0, "magic"), (8, "version"), (10, "area_count"), (12, "tag")];
/// Descriptor fields: (offset within the descriptor, name).
const DESCRIPTOR_FIELDS: [(usize, &str); 7] =
    [(0, "type"), (1, "area_version"), (2, "index"), (4, "size"), (8, "address"), (12, "area_count"), (14, "tag")];

/// The error for a structure of `need` bytes at `start` of which only `have` were available:
/// names the field that contains the first missing byte.
fn truncated(start: u64, place: Place, fields: &[(usize, &'static str)], need: usize, have: usize) -> SfiError {
    let (field_off, field) = fields.iter().rev().find(|(off, _)| *off <= have).copied().unwrap_or((0, "payload"));
    malformed(start + field_off as u64, place, field, Problem::Truncated { need: need as u64, have: have as u64 })
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The 28-byte image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    /// Format version (1).
    pub version: u16,
    /// Number of areas (1..=1024).
    pub area_count: u16,
    /// GCM tag over the first 12 header bytes.
    pub tag: [u8; 16],
}

impl ImageHeader {
    /// Parse and check a header: magic, version 1 and an area count in 1..=1024.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, SfiError> {
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&bytes[0..8]);
        if magic != MAGIC {
            return Err(malformed(0, Place::Header, "magic", Problem::BadMagic { found: magic }));
        }
        let version = le16(bytes, 8);
        if version != IMAGE_VERSION {
            return Err(malformed(
                8,
                Place::Header,
                "version",
                Problem::Unexpected { expected: IMAGE_VERSION.into(), found: version.into() },
            ));
        }
        let area_count = le16(bytes, 10);
        if area_count == 0 || area_count > MAX_AREAS {
            return Err(malformed(10, Place::Header, "area_count", Problem::AreaCountOutOfRange { found: area_count }));
        }
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&bytes[12..28]);
        Ok(Self { version, area_count, tag })
    }

    /// The header's wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..12].copy_from_slice(&self.aad());
        b[12..].copy_from_slice(&self.tag);
        b
    }

    /// The header tag's AAD: the first 12 header bytes (magic, version, area count).
    pub fn aad(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10..12].copy_from_slice(&self.area_count.to_le_bytes());
        b
    }
}

/// A 30-byte area descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaDescriptor {
    /// The area type.
    pub area_type: AreaType,
    /// Area version (0x17).
    pub version: u8,
    /// 1-based index, in file order.
    pub index: u16,
    /// Payload (ciphertext) length in bytes.
    pub size: u32,
    /// Destination address (meaning per type, see §2).
    pub address: u32,
    /// The header's area count, repeated.
    pub area_count: u16,
    /// GCM tag of the area.
    pub tag: [u8; 16],
}

impl AreaDescriptor {
    /// Parse one descriptor found at byte `offset` of the file (used in error messages), checking
    /// what makes it a v1 descriptor: a known type, area version 0x17 and size ≤ 16 MiB. The
    /// per-type rules ([`AreaDescriptor::check_type_rules`]) and the rules that need context (index
    /// sequence, area count, memory map, overlaps) are checked by [`ImageValidator`].
    pub fn parse(bytes: &[u8; DESCRIPTOR_LEN], offset: u64) -> Result<Self, SfiError> {
        Self::parse_at(bytes, offset, le16(bytes, 2))
    }

    /// [`AreaDescriptor::parse`], naming the area by its position in the file in errors.
    fn parse_at(bytes: &[u8; DESCRIPTOR_LEN], offset: u64, position: u16) -> Result<Self, SfiError> {
        let place = Place::Area(position);
        let area_type = AreaType::from_byte(bytes[0])
            .ok_or_else(|| malformed(offset, place, "type", Problem::UnknownType { found: bytes[0] }))?;
        let version = bytes[1];
        if version != AREA_VERSION {
            return Err(malformed(
                offset + 1,
                place,
                "area_version",
                Problem::UnsupportedAreaVersion { found: version },
            ));
        }
        let size = le32(bytes, 4);
        if size > MAX_AREA_SIZE {
            return Err(malformed(offset + 4, place, "size", Problem::TooLarge { size: size.into() }));
        }
        let address = le32(bytes, 8);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&bytes[14..30]);
        Ok(Self { area_type, version, index: le16(bytes, 2), size, address, area_count: le16(bytes, 12), tag })
    }

    /// The per-type rules of §2 for a descriptor at byte `offset`: a `C` area has address 0 and
    /// whole 8-byte records, `P`/`R` areas are empty, and an `F`/`M` area ends within the 32-bit
    /// address space. (`E`/`K` are accepted here; installers refuse them.)
    pub fn check_type_rules(&self, offset: u64) -> Result<(), SfiError> {
        let place = Place::Area(self.index);
        let area_type = self.area_type;
        match area_type {
            AreaType::Config => {
                if self.address != 0 {
                    return Err(malformed(
                        offset + 8,
                        place,
                        "address",
                        Problem::MustBeZero { area_type, found: self.address.into() },
                    ));
                }
                // Structurally (no family known): any whole number of option words (profile v1.1).
                if !self.size.is_multiple_of(CONFIG_WORD_LEN) {
                    return Err(malformed(offset + 4, place, "size", Problem::NotWholeWords { size: self.size }));
                }
            }
            AreaType::Pause | AreaType::Resume => {
                if self.size != 0 {
                    return Err(malformed(
                        offset + 4,
                        place,
                        "size",
                        Problem::MustBeZero { area_type, found: self.size.into() },
                    ));
                }
            }
            AreaType::Firmware | AreaType::Module => {
                let end = self.end_address();
                if end > 1 << 32 {
                    return Err(malformed(
                        offset + 8,
                        place,
                        "address",
                        Problem::AddressOverflow { start: self.address, end },
                    ));
                }
            }
            AreaType::External | AreaType::KeyGen => {}
        }
        Ok(())
    }

    /// The descriptor's wire bytes.
    pub fn to_bytes(&self) -> [u8; DESCRIPTOR_LEN] {
        let mut b = [0u8; DESCRIPTOR_LEN];
        b[..14].copy_from_slice(&self.aad());
        b[14..].copy_from_slice(&self.tag);
        b
    }

    /// The area tag's AAD: the first 14 descriptor bytes.
    pub fn aad(&self) -> [u8; 14] {
        let mut b = [0u8; 14];
        b[0] = self.area_type.as_byte();
        b[1] = self.version;
        b[2..4].copy_from_slice(&self.index.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.address.to_le_bytes());
        b[12..14].copy_from_slice(&self.area_count.to_le_bytes());
        b
    }

    /// One past the last address of an `F`/`M` area (as `u64`: no overflow).
    pub fn end_address(&self) -> u64 {
        u64::from(self.address) + u64::from(self.size)
    }
}

/// The GCM IV of area `index` (1-based): `N[0..8] || be32(be32(N[8..12]) + index mod 2^32)`.
pub fn area_iv(nonce: &ImageNonce, index: u16) -> [u8; 12] {
    let n = nonce.as_bytes();
    let mut iv = [0u8; 12];
    iv[..8].copy_from_slice(&n[..8]);
    let ctr = u32::from_be_bytes([n[8], n[9], n[10], n[11]]).wrapping_add(u32::from(index));
    iv[8..].copy_from_slice(&ctr.to_be_bytes());
    iv
}

fn cipher(key: &FirmwareKey) -> Aes128Gcm {
    Aes128Gcm::new(key.as_bytes().into())
}

/// The header tag: GCM with IV `N`, AAD the first 12 header bytes, empty plaintext.
pub fn header_tag(key: &FirmwareKey, nonce: &ImageNonce, header_aad: &[u8; 12]) -> [u8; 16] {
    // No plaintext: the tag over the AAD alone.
    crate::gcm::GcmEncryptor::new(key, nonce.as_bytes(), header_aad).finish()
}

/// Check the header tag under the key and nonce (constant-time).
pub fn verify_header(key: &FirmwareKey, nonce: &ImageNonce, header: &ImageHeader) -> Result<(), SfiError> {
    let expected = header_tag(key, nonce, &header.aad());
    if bool::from(expected.ct_eq(&header.tag)) { Ok(()) } else { Err(SfiError::HeaderNotAuthentic) }
}

/// Encrypt one area: builds its descriptor (version 0x17, tag filled in) and returns the
/// ciphertext. Fails for payloads over 16 MiB and payloads the type does not allow.
pub fn encrypt_area(
    key: &FirmwareKey,
    nonce: &ImageNonce,
    area_type: AreaType,
    index: u16,
    address: u32,
    area_count: u16,
    plaintext: &[u8],
) -> Result<(AreaDescriptor, Vec<u8>), SfiError> {
    let size = u32::try_from(plaintext.len())
        .ok()
        .filter(|s| *s <= MAX_AREA_SIZE)
        .ok_or(SfiError::AreaTooLarge { index: index.into(), size: plaintext.len() })?;
    let mut desc = AreaDescriptor { area_type, version: AREA_VERSION, index, size, address, area_count, tag: [0; 16] };
    let mut buf = plaintext.to_vec();
    let tag = cipher(key)
        .encrypt_in_place_detached(Nonce::from_slice(&area_iv(nonce, index)), &desc.aad(), &mut buf)
        // Only fails beyond GCM's 64 GiB plaintext limit; the size is ≤ 16 MiB here.
        .map_err(|_| SfiError::AreaTooLarge { index: index.into(), size: plaintext.len() })?;
    desc.tag.copy_from_slice(&tag);
    Ok((desc, buf))
}

/// Authenticate and decrypt one area's ciphertext into a new buffer; `AreaNotAuthentic` if its
/// tag does not verify.
pub fn decrypt_area(
    key: &FirmwareKey,
    nonce: &ImageNonce,
    desc: &AreaDescriptor,
    ciphertext: &[u8],
) -> Result<Vec<u8>, SfiError> {
    let mut buf = ciphertext.to_vec();
    decrypt_area_in_place(key, nonce, desc, &mut buf)?;
    Ok(buf)
}

/// Authenticate and decrypt one area in place: on success `buf` holds the plaintext; on
/// `AreaNotAuthentic` it still holds the ciphertext (nothing unauthenticated is released).
pub fn decrypt_area_in_place(
    key: &FirmwareKey,
    nonce: &ImageNonce,
    desc: &AreaDescriptor,
    buf: &mut [u8],
) -> Result<(), SfiError> {
    if buf.len() as u64 != u64::from(desc.size) {
        return Err(SfiError::LengthMismatch { index: desc.index, expected: desc.size, found: buf.len() as u64 });
    }
    cipher(key)
        .decrypt_in_place_detached(
            Nonce::from_slice(&area_iv(nonce, desc.index)),
            &desc.aad(),
            buf,
            Tag::from_slice(&desc.tag),
        )
        .map_err(|_| SfiError::AreaNotAuthentic { index: desc.index })
}

/// One area in clear, as the packer produces it and a device installs it.
#[derive(Clone, PartialEq, Eq)]
pub struct PlainArea {
    /// The area type.
    pub area_type: AreaType,
    /// Destination address (0 for `C`).
    pub address: u32,
    /// The payload in clear.
    pub data: Vec<u8>,
}

impl fmt::Debug for PlainArea {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlainArea")
            .field("area_type", &self.area_type)
            .field("address", &format_args!("{:#010x}", self.address))
            .field("len", &self.data.len())
            .finish_non_exhaustive()
    }
}

/// Encrypt `areas` (indices 1..=n in order) into an image written to `out`; returns the number
/// of bytes written. The image is checked with the reader's rules (without a memory map) before
/// anything is written, so whatever this writes, [`ImageReader`] reads. Use a fresh nonce per image.
pub fn write_image(
    key: &FirmwareKey,
    nonce: &ImageNonce,
    areas: &[PlainArea],
    mut out: impl Write,
) -> Result<u64, SfiError> {
    let count = u16::try_from(areas.len())
        .ok()
        .filter(|c| (1..=MAX_AREAS).contains(c))
        .ok_or(SfiError::AreaCount { count: areas.len() })?;
    for (i, a) in areas.iter().enumerate() {
        if a.data.len() > MAX_AREA_SIZE as usize {
            return Err(SfiError::AreaTooLarge { index: i + 1, size: a.data.len() });
        }
    }
    let mut header = ImageHeader { version: IMAGE_VERSION, area_count: count, tag: [0; 16] };
    header.tag = header_tag(key, nonce, &header.aad());
    let header_bytes = header.to_bytes();
    let mut validator = ImageValidator::new(&header_bytes, ReaderOptions::default())?;
    // Validate every descriptor before writing (and before encrypting anything).
    for (position, a) in (1..=count).zip(areas) {
        let desc = AreaDescriptor {
            area_type: a.area_type,
            version: AREA_VERSION,
            index: position,
            // Checked ≤ 16 MiB above.
            size: a.data.len() as u32,
            address: a.address,
            area_count: count,
            tag: [0; 16],
        };
        validator.next_descriptor(&desc.to_bytes())?;
    }
    let mut written = 0u64;
    let mut put = |bytes: &[u8], written: &mut u64| -> Result<(), SfiError> {
        out.write_all(bytes).map_err(|source| SfiError::Io { offset: *written, source })?;
        *written += bytes.len() as u64;
        Ok(())
    };
    put(&header_bytes, &mut written)?;
    for (position, a) in (1..=count).zip(areas) {
        let (desc, ciphertext) = encrypt_area(key, nonce, a.area_type, position, a.address, count, &a.data)?;
        put(&desc.to_bytes(), &mut written)?;
        put(&ciphertext, &mut written)?;
    }
    out.flush().map_err(|source| SfiError::Io { offset: written, source })?;
    Ok(written)
}

/// [`write_image`] into a new `Vec`.
pub fn image_to_vec(key: &FirmwareKey, nonce: &ImageNonce, areas: &[PlainArea]) -> Result<Vec<u8>, SfiError> {
    let total: usize = HEADER_LEN + areas.iter().map(|a| DESCRIPTOR_LEN + a.data.len()).sum::<usize>();
    let mut v = Vec::with_capacity(total);
    write_image(key, nonce, areas, &mut v)?;
    Ok(v)
}

/// Read, authenticate and decrypt a whole in-memory image (header tag and every area tag).
pub fn decrypt_image(
    key: &FirmwareKey,
    nonce: &ImageNonce,
    image: &[u8],
    memory_map: Option<&'static FamilyProfile>,
) -> Result<Vec<PlainArea>, SfiError> {
    let opts = ReaderOptions { file_len: Some(image.len() as u64), memory_map };
    let mut reader = ImageReader::new(image, opts)?;
    verify_header(key, nonce, reader.header())?;
    let mut areas = Vec::with_capacity(reader.header().area_count.into());
    while let Some(area) = reader.next_area()? {
        let data = decrypt_area(key, nonce, &area.descriptor, &area.ciphertext)?;
        areas.push(PlainArea { area_type: area.descriptor.area_type, address: area.descriptor.address, data });
    }
    Ok(areas)
}

/// CRC-32 (IEEE) of the whole internal flash after installing the `F`/`M` areas into an erased
/// (all 0xFF) flash: what the device's INSTALL answers. Bytes outside flash are ignored.
pub fn expected_flash_crc(family: &FamilyProfile, areas: &[PlainArea]) -> u32 {
    let mut flash = vec![0xFFu8; family.flash_size as usize];
    for a in areas.iter().filter(|a| a.area_type.is_flash()) {
        let Some(start) = a.address.checked_sub(family.flash_base) else {
            continue;
        };
        let start = start as usize;
        if start >= flash.len() {
            continue;
        }
        let n = a.data.len().min(flash.len() - start);
        flash[start..start + n].copy_from_slice(&a.data[..n]);
    }
    crc32fast::hash(&flash)
}

/// What a reader checks beyond the format itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReaderOptions {
    /// The file's length when known: declared sizes must fit in it, and nothing may follow.
    pub file_len: Option<u64>,
    /// The target's memory map: `F`/`M` areas must lie in its flash, aligned to its program word.
    pub memory_map: Option<&'static FamilyProfile>,
}

/// Former name of [`ReaderOptions`].
pub type ReaderLimits = ReaderOptions;

/// One area as read from an image: descriptor and ciphertext, not yet authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedArea {
    /// The validated descriptor.
    pub descriptor: AreaDescriptor,
    /// Offset of the descriptor in the file.
    pub offset: u64,
    /// The ciphertext (`descriptor.size` bytes).
    pub ciphertext: Vec<u8>,
}

impl EncryptedArea {
    /// Offset of the ciphertext in the file.
    pub fn payload_offset(&self) -> u64 {
        self.offset + DESCRIPTOR_LEN as u64
    }

    /// Authenticate and decrypt the area into a new buffer.
    pub fn decrypt(&self, key: &FirmwareKey, nonce: &ImageNonce) -> Result<Vec<u8>, SfiError> {
        decrypt_area(key, nonce, &self.descriptor, &self.ciphertext)
    }

    /// Authenticate and decrypt the area in its own buffer (no copy: the fast path for readers
    /// that consume areas one at a time).
    pub fn into_plaintext(mut self, key: &FirmwareKey, nonce: &ImageNonce) -> Result<Vec<u8>, SfiError> {
        decrypt_area_in_place(key, nonce, &self.descriptor, &mut self.ciphertext)?;
        Ok(self.ciphertext)
    }
}

/// The sans-io rules of §2, fed with the header and then each descriptor in file order. The
/// readers use it; a device can use it on the descriptors it receives.
#[derive(Debug, Clone)]
pub struct ImageValidator {
    opts: ReaderOptions,
    header: ImageHeader,
    /// Areas accepted so far.
    seen: u16,
    /// Offset of the next descriptor (after the previous area's payload).
    position: u64,
    /// `F`/`M` ranges accepted so far, sorted by start: (start, end, index).
    flash_ranges: Vec<(u64, u64, u16)>,
}

impl ImageValidator {
    /// Parse and check the header (and, with a known file length, that the declared area count
    /// fits in the file).
    pub fn new(header_bytes: &[u8; HEADER_LEN], opts: ReaderOptions) -> Result<Self, SfiError> {
        let header = ImageHeader::parse(header_bytes)?;
        if let Some(file_len) = opts.file_len {
            let need = HEADER_LEN as u64 + u64::from(header.area_count) * DESCRIPTOR_LEN as u64;
            if need > file_len {
                return Err(malformed(10, Place::Header, "area_count", Problem::BeyondFileEnd { need, file_len }));
            }
        }
        Ok(Self { opts, header, seen: 0, position: HEADER_LEN as u64, flash_ranges: Vec::new() })
    }

    /// The validated header.
    pub fn header(&self) -> &ImageHeader {
        &self.header
    }

    /// Offset of the next descriptor, or of the end of the image once complete.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Whether every area the header declares has been accepted.
    pub fn is_complete(&self) -> bool {
        self.seen == self.header.area_count
    }

    /// 1-based position of the next area.
    fn next_position(&self) -> u16 {
        self.seen.saturating_add(1)
    }

    /// Check the next descriptor against everything seen so far; on success the validator moves
    /// past the descriptor and its payload.
    pub fn next_descriptor(&mut self, bytes: &[u8; DESCRIPTOR_LEN]) -> Result<AreaDescriptor, SfiError> {
        let offset = self.position;
        let position = self.next_position();
        let place = Place::Area(position);
        if self.is_complete() {
            return Err(self.trailing_error(DESCRIPTOR_LEN as u64));
        }
        let index = le16(bytes, 2);
        if index != position {
            return Err(malformed(
                offset + 2,
                place,
                "index",
                Problem::Unexpected { expected: position.into(), found: index.into() },
            ));
        }
        let desc = AreaDescriptor::parse_at(bytes, offset, position)?;
        desc.check_type_rules(offset)?;
        if desc.area_count != self.header.area_count {
            return Err(malformed(
                offset + 12,
                place,
                "area_count",
                Problem::Unexpected { expected: self.header.area_count.into(), found: desc.area_count.into() },
            ));
        }
        let end = offset + DESCRIPTOR_LEN as u64 + u64::from(desc.size);
        if let Some(file_len) = self.opts.file_len {
            // The remaining descriptors must fit too.
            let rest = u64::from(self.header.area_count - position) * DESCRIPTOR_LEN as u64;
            if end + rest > file_len {
                return Err(malformed(
                    offset + 4,
                    place,
                    "size",
                    Problem::BeyondFileEnd { need: end + rest, file_len },
                ));
            }
        }
        if desc.area_type.is_flash() {
            self.check_flash_range(&desc, offset, place)?;
        }
        if desc.area_type == AreaType::Config
            && let Some(map) = self.opts.memory_map
        {
            check_config_size(map, desc.size).map_err(|p| malformed(offset + 4, place, "size", p))?;
        }
        self.seen = position;
        self.position = end;
        Ok(desc)
    }

    fn check_flash_range(&mut self, desc: &AreaDescriptor, offset: u64, place: Place) -> Result<(), SfiError> {
        let (start, end) = (u64::from(desc.address), desc.end_address());
        if let Some(map) = self.opts.memory_map {
            if !map.flash_contains(desc.address, desc.size.into()) {
                return Err(malformed(
                    offset + 8,
                    place,
                    "address",
                    Problem::OutsideFlash {
                        start: desc.address,
                        end,
                        flash_start: map.flash_base,
                        flash_end: map.flash_end(),
                        target: map.display_name,
                    },
                ));
            }
            if map.program_word != 0 && !desc.address.is_multiple_of(map.program_word) {
                return Err(malformed(
                    offset + 8,
                    place,
                    "address",
                    Problem::Unaligned { address: desc.address, word: map.program_word, target: map.display_name },
                ));
            }
        }
        if start == end {
            return Ok(());
        }
        // Sorted, pairwise disjoint ranges: only the neighbours around the insertion point can
        // overlap the new one.
        let at = self.flash_ranges.partition_point(|r| r.0 < start);
        let neighbours = at.checked_sub(1).into_iter().chain(std::iter::once(at));
        for i in neighbours {
            if let Some(&(o_start, o_end, other)) = self.flash_ranges.get(i)
                && o_start < end
                && start < o_end
            {
                return Err(malformed(
                    offset + 8,
                    place,
                    "address",
                    Problem::Overlap {
                        start: desc.address,
                        end,
                        other,
                        // Ranges start at a u32 address.
                        other_start: o_start as u32,
                        other_end: o_end,
                    },
                ));
            }
        }
        self.flash_ranges.insert(at, (start, end, desc.index));
        Ok(())
    }

    /// The error for `count` bytes found after the last area.
    fn trailing_error(&self, count: u64) -> SfiError {
        malformed(self.position, Place::End, "trailing", Problem::TrailingBytes { count })
    }

    /// With a known file length: the error for bytes declared after the last area, if any.
    fn check_file_end(&self) -> Result<(), SfiError> {
        match self.opts.file_len {
            Some(len) if len > self.position => Err(self.trailing_error(len - self.position)),
            _ => Ok(()),
        }
    }

    /// The error for a payload of `need` bytes at `offset` of which only `have` arrived.
    fn truncated_payload(&self, offset: u64, need: u64, have: u64) -> SfiError {
        malformed(offset, Place::Area(self.seen), "payload", Problem::Truncated { need, have })
    }

    /// The error for a descriptor of which only `have` bytes arrived.
    fn truncated_descriptor(&self, have: usize) -> SfiError {
        truncated(self.position, Place::Area(self.next_position()), &DESCRIPTOR_FIELDS, DESCRIPTOR_LEN, have)
    }

    /// Initial capacity for a payload: all of it when the file length vouches for it, else a
    /// bounded amount that grows as bytes really arrive.
    fn payload_capacity(&self, size: u32) -> usize {
        const UNVOUCHED: u32 = 1 << 16;
        if self.opts.file_len.is_some() { size as usize } else { size.min(UNVOUCHED) as usize }
    }
}

fn truncated_header(have: usize) -> SfiError {
    truncated(0, Place::Header, &HEADER_FIELDS, HEADER_LEN, have)
}

/// The I/O of the sync and async readers, written once: `$aw` is `await` for the async reader.
/// All checks happen in [`ImageValidator`]; this only reads the bytes it asks for.
macro_rules! reader_body {
    (start, $inner:ident, $opts:ident, $read_full:ident $(, $aw:ident)?) => {{
        let mut header = [0u8; HEADER_LEN];
        let n = $read_full(&mut $inner, &mut header)$(.$aw)?.map_err(io_error(0))?;
        if n < HEADER_LEN {
            return Err(truncated_header(n));
        }
        ImageValidator::new(&header, $opts)?
    }};
    (next, $self:ident $(, $aw:ident)?) => {{
        match $self.state {
            ReadState::Done => return Ok(None),
            ReadState::Failed(offset) => return Err(SfiError::ReaderFailed { offset }),
            ReadState::Reading => {}
        }
        let result = $self.step()$(.$aw)?;
        $self.state = match &result {
            Ok(Some(_)) => ReadState::Reading,
            Ok(None) => ReadState::Done,
            Err(e) => ReadState::Failed(e.offset().unwrap_or($self.validator.position())),
        };
        result
    }};
    (step, $self:ident, $read_full:ident $(, $aw:ident)?) => {{
        let v = &mut $self.validator;
        if v.is_complete() {
            v.check_file_end()?;
            let mut probe = [0u8; 1];
            let n = $read_full(&mut $self.inner, &mut probe)$(.$aw)?.map_err(io_error(v.position()))?;
            if n != 0 {
                return Err(v.trailing_error(n as u64));
            }
            return Ok(None);
        }
        let offset = v.position();
        let mut bytes = [0u8; DESCRIPTOR_LEN];
        let n = $read_full(&mut $self.inner, &mut bytes)$(.$aw)?.map_err(io_error(offset))?;
        if n < DESCRIPTOR_LEN {
            return Err(v.truncated_descriptor(n));
        }
        let descriptor = v.next_descriptor(&bytes)?;
        let payload_at = offset + DESCRIPTOR_LEN as u64;
        let mut ciphertext = Vec::new();
        let capacity = v.payload_capacity(descriptor.size);
        ciphertext
            .try_reserve_exact(capacity)
            .map_err(|_| SfiError::Io { offset: payload_at, source: std::io::ErrorKind::OutOfMemory.into() })?;
        let got = if capacity == descriptor.size as usize {
            // The size is vouched for (the file is long enough): fill the buffer in one go.
            ciphertext.resize(capacity, 0);
            let got = $read_full(&mut $self.inner, &mut ciphertext)$(.$aw)?.map_err(io_error(payload_at))?;
            ciphertext.truncate(got);
            got
        } else {
            // Unknown length: grow only as bytes actually arrive.
            (&mut $self.inner)
                .take(descriptor.size.into())
                .read_to_end(&mut ciphertext)
                $(.$aw)?
                .map_err(io_error(payload_at))?
        };
        if got as u64 != u64::from(descriptor.size) {
            return Err(v.truncated_payload(payload_at, descriptor.size.into(), got as u64));
        }
        Ok(Some(EncryptedArea { descriptor, offset, ciphertext }))
    }};
}

/// Reader state shared by the sync and async readers.
#[derive(Debug)]
enum ReadState {
    /// More areas (or the end check) to come.
    Reading,
    /// Every area read and nothing after them.
    Done,
    /// An error was returned at this offset.
    Failed(u64),
}

/// Streaming reader of an image from a [`Read`]: validates the header on creation, then returns
/// one area at a time, checking every limit of §2 before allocating.
#[derive(Debug)]
pub struct ImageReader<R: Read> {
    inner: R,
    validator: ImageValidator,
    state: ReadState,
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

async fn read_full_async<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn io_error(offset: u64) -> impl FnOnce(std::io::Error) -> SfiError {
    move |source| SfiError::Io { offset, source }
}

impl<R: Read> ImageReader<R> {
    /// Read and validate the header.
    pub fn new(mut inner: R, opts: ReaderOptions) -> Result<Self, SfiError> {
        let validator = reader_body!(start, inner, opts, read_full);
        Ok(Self { inner, validator, state: ReadState::Reading })
    }

    /// The validated (not yet authenticated) header.
    pub fn header(&self) -> &ImageHeader {
        self.validator.header()
    }

    /// Offset of the next byte to read.
    pub fn position(&self) -> u64 {
        self.validator.position()
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next area, or `None` after the last one (once the end of the file was confirmed).
    /// After an error every further call fails with [`SfiError::ReaderFailed`].
    pub fn next_area(&mut self) -> Result<Option<EncryptedArea>, SfiError> {
        reader_body!(next, self)
    }

    fn step(&mut self) -> Result<Option<EncryptedArea>, SfiError> {
        reader_body!(step, self, read_full)
    }
}

/// Streaming reader of an image from a tokio [`AsyncRead`]; the same rules as [`ImageReader`].
#[derive(Debug)]
pub struct AsyncImageReader<R: AsyncRead + Unpin> {
    inner: R,
    validator: ImageValidator,
    state: ReadState,
}

impl<R: AsyncRead + Unpin> AsyncImageReader<R> {
    /// Read and validate the header.
    pub async fn new(mut inner: R, opts: ReaderOptions) -> Result<Self, SfiError> {
        let validator = reader_body!(start, inner, opts, read_full_async, await);
        Ok(Self { inner, validator, state: ReadState::Reading })
    }

    /// The validated (not yet authenticated) header.
    pub fn header(&self) -> &ImageHeader {
        self.validator.header()
    }

    /// Offset of the next byte to read.
    pub fn position(&self) -> u64 {
        self.validator.position()
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next area, or `None` after the last one (once the end of the file was confirmed).
    /// After an error every further call fails with [`SfiError::ReaderFailed`].
    pub async fn next_area(&mut self) -> Result<Option<EncryptedArea>, SfiError> {
        reader_body!(next, self, await)
    }

    async fn step(&mut self) -> Result<Option<EncryptedArea>, SfiError> {
        reader_body!(step, self, read_full_async, await)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn in_place_decryption_releases_plaintext_only_when_authentic() {
        let key = FirmwareKey::new([3; 16]);
        let nonce = ImageNonce([4; 12]);
        let plain = vec![0x42u8; 3000];
        let (desc, ct) = encrypt_area(&key, &nonce, AreaType::Firmware, 1, 0x0800_0000, 1, &plain).unwrap();
        let area = EncryptedArea { descriptor: desc.clone(), offset: 28, ciphertext: ct.clone() };
        assert_eq!(area.into_plaintext(&key, &nonce).unwrap(), plain);

        let mut tampered = ct.clone();
        tampered[10] ^= 1;
        let mut buf = tampered.clone();
        assert!(matches!(
            decrypt_area_in_place(&key, &nonce, &desc, &mut buf),
            Err(SfiError::AreaNotAuthentic { index: 1 })
        ));
        assert_eq!(buf, tampered, "a failed tag must leave the ciphertext untouched");
        assert!(matches!(
            decrypt_area_in_place(&key, &nonce, &desc, &mut buf[..10]),
            Err(SfiError::LengthMismatch { .. })
        ));
    }
    use crate::family::Family;

    const KEY: [u8; 16] = *b"0123456789abcdef";
    const NONCE: [u8; 12] = *b"nonce-of-12b";

    fn key() -> FirmwareKey {
        FirmwareKey::new(KEY)
    }

    fn nonce() -> ImageNonce {
        ImageNonce(NONCE)
    }

    fn fw(address: u32, len: usize) -> PlainArea {
        PlainArea { area_type: AreaType::Firmware, address, data: (0..len).map(|i| i as u8).collect() }
    }

    fn sample() -> Vec<u8> {
        image_to_vec(&key(), &nonce(), &[fw(0x0800_0000, 100), fw(0x0800_1000, 40)]).unwrap()
    }

    /// Read a whole image with the sync reader; errors as text.
    fn read_all(bytes: &[u8], opts: ReaderOptions) -> Result<Vec<EncryptedArea>, String> {
        let mut r = ImageReader::new(bytes, opts).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        while let Some(a) = r.next_area().map_err(|e| e.to_string())? {
            out.push(a);
        }
        Ok(out)
    }

    /// The same with the async reader.
    fn read_all_async(bytes: &[u8], opts: ReaderOptions) -> Result<Vec<EncryptedArea>, String> {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut r = AsyncImageReader::new(bytes, opts).await.map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            while let Some(a) = r.next_area().await.map_err(|e| e.to_string())? {
                out.push(a);
            }
            Ok(out)
        })
    }

    fn read_err(bytes: &[u8], opts: ReaderOptions) -> String {
        let sync = read_all(bytes, opts).unwrap_err();
        assert_eq!(read_all_async(bytes, opts).unwrap_err(), sync);
        sync
    }

    fn known_len(bytes: &[u8]) -> ReaderOptions {
        ReaderOptions { file_len: Some(bytes.len() as u64), memory_map: None }
    }

    fn l4(bytes: &[u8]) -> ReaderOptions {
        ReaderOptions { file_len: Some(bytes.len() as u64), memory_map: Some(Family::Stm32L4.profile()) }
    }

    /// Rewrite descriptor `position` (1-based) of an image in place.
    fn patch_descriptor(image: &mut [u8], position: usize, f: impl FnOnce(&mut [u8])) {
        let mut at = HEADER_LEN;
        for _ in 1..position {
            at += DESCRIPTOR_LEN + le32(image, at + 4) as usize;
        }
        f(&mut image[at..at + DESCRIPTOR_LEN]);
    }

    #[test]
    fn area_iv_adds_the_index_big_endian_mod_2_32() {
        let n = ImageNonce([1, 2, 3, 4, 5, 6, 7, 8, 0x00, 0x00, 0x00, 0xFF]);
        assert_eq!(area_iv(&n, 1), [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 1, 0]);
        let n = ImageNonce([0; 8].into_iter().chain([0xFF; 4]).collect::<Vec<_>>().try_into().unwrap());
        assert_eq!(area_iv(&n, 2)[8..], [0, 0, 0, 1]);
        assert_eq!(area_iv(&n, 0), *n.as_bytes());
    }

    #[test]
    fn area_types_round_trip() {
        for t in AreaType::ALL {
            assert_eq!(AreaType::from_byte(t.as_byte()), Some(t));
        }
        assert_eq!(AreaType::from_byte(b'X'), None);
        assert!(AreaType::Firmware.is_flash() && AreaType::Module.is_flash() && !AreaType::Config.is_flash());
        assert!(!AreaType::External.is_installable() && !AreaType::KeyGen.is_installable());
    }

    #[test]
    fn firmware_key_is_never_printed() {
        assert_eq!(format!("{:?}", key()), "FirmwareKey(..)");
        let area = fw(0x0800_0000, 3);
        assert!(!format!("{area:?}").contains("[0, 1, 2]"));
    }

    #[test]
    fn header_errors_name_offset_and_field() {
        let good = sample();
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(
            read_err(&b, ReaderOptions::default()),
            "offset 0: header field magic: expected \"SFIMAGIC\", found \"XFIMAGIC\""
        );
        let mut b = good.clone();
        b[8] = 2;
        assert_eq!(read_err(&b, ReaderOptions::default()), "offset 8: header field version: expected 1, found 2");
        for count in [0u16, 1025] {
            let mut b = good.clone();
            b[10..12].copy_from_slice(&count.to_le_bytes());
            assert_eq!(
                read_err(&b, ReaderOptions::default()),
                format!("offset 10: header field area_count: {count} is not from 1 to 1024")
            );
        }
        assert_eq!(
            read_err(&good[..9], ReaderOptions::default()),
            "offset 8: header field version: file truncated (need 28 bytes, have 9)"
        );
        assert_eq!(
            read_err(&good[..12], ReaderOptions::default()),
            "offset 12: header field tag: file truncated (need 28 bytes, have 12)"
        );
        assert_eq!(
            read_err(&[], ReaderOptions::default()),
            "offset 0: header field magic: file truncated (need 28 bytes, have 0)"
        );
        // 1024 areas cannot fit in this file: refused before reading any descriptor.
        let mut b = good.clone();
        b[10..12].copy_from_slice(&1024u16.to_le_bytes());
        assert_eq!(
            read_err(&b, known_len(&b)),
            "offset 10: header field area_count: needs the image to be at least 30748 bytes long, but the file is 228 bytes"
        );
    }

    #[test]
    fn descriptor_errors_name_offset_area_and_field() {
        let good = sample();
        type Patch = Box<dyn Fn(&mut [u8])>;
        let cases: Vec<(Patch, &str)> = vec![
            (Box::new(|d| d[2] = 3), "offset 30: area 1 field index: expected 1, found 3"),
            (Box::new(|d| d[0] = b'Z'), "offset 28: area 1 field type: unknown area type 0x5A ('Z')"),
            (
                Box::new(|d| d[1] = 0x18),
                "offset 29: area 1 field area_version: unsupported area version 0x18 (expected 0x17)",
            ),
            (
                Box::new(|d| d[4..8].copy_from_slice(&20_000_000u32.to_le_bytes())),
                "offset 32: area 1 field size: 20000000 exceeds the 16 MiB limit",
            ),
            (Box::new(|d| d[12] = 3), "offset 40: area 1 field area_count: expected 2, found 3"),
            (
                Box::new(|d| d[4..8].copy_from_slice(&1000u32.to_le_bytes())),
                "offset 32: area 1 field size: needs the image to be at least 1088 bytes long, but the file is 228 bytes",
            ),
        ];
        for (patch, message) in cases {
            let mut b = good.clone();
            patch_descriptor(&mut b, 1, patch);
            assert_eq!(read_err(&b, known_len(&b)), message);
        }
        // Second area: offsets count from the start of the file.
        let mut b = good.clone();
        patch_descriptor(&mut b, 2, |d| d[2] = 1);
        assert_eq!(read_err(&b, known_len(&b)), "offset 160: area 2 field index: expected 2, found 1");
        // Without a known length, a size beyond the data is a truncated payload.
        let mut b = good.clone();
        patch_descriptor(&mut b, 2, |d| d[4..8].copy_from_slice(&1000u32.to_le_bytes()));
        assert_eq!(
            read_err(&b, ReaderOptions::default()),
            "offset 188: area 2 field payload: file truncated (need 1000 bytes, have 40)"
        );
        // Truncated descriptor.
        assert_eq!(
            read_err(&good[..158 + 9], ReaderOptions::default()),
            "offset 166: area 2 field address: file truncated (need 30 bytes, have 9)"
        );
        assert_eq!(
            read_err(&good[..158], ReaderOptions::default()),
            "offset 158: area 2 field type: file truncated (need 30 bytes, have 0)"
        );
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut b = sample();
        b.extend_from_slice(b"xyz");
        assert_eq!(
            read_err(&b, known_len(&b)),
            "offset 228: end of image field trailing: 3 trailing byte(s) after the last area"
        );
        assert_eq!(
            read_err(&b, ReaderOptions::default()),
            "offset 228: end of image field trailing: 1 trailing byte(s) after the last area"
        );
        // A declared length longer than the data is caught as well.
        let b = sample();
        let opts = ReaderOptions { file_len: Some(b.len() as u64 + 1), memory_map: None };
        assert!(read_err(&b, opts).contains("1 trailing byte(s)"));
    }

    #[test]
    fn type_rules() {
        let image = |areas: &[PlainArea]| -> Vec<u8> {
            // Build with a valid layout, then patch (write_image refuses invalid areas).
            image_to_vec(&key(), &nonce(), areas).unwrap()
        };
        let config = PlainArea { area_type: AreaType::Config, address: 0, data: vec![0; 8] };
        let mut b = image(std::slice::from_ref(&config));
        patch_descriptor(&mut b, 1, |d| d[8] = 4);
        assert_eq!(read_err(&b, known_len(&b)), "offset 36: area 1 field address: must be 0 for a 'C' area, found 0x4");
        // Profile v1.1: structurally any whole number of option words; with a family, its layout.
        let mut b = image(std::slice::from_ref(&config));
        patch_descriptor(&mut b, 1, |d| d[4] = 6);
        b.truncate(b.len() - 2);
        assert_eq!(
            read_err(&b, known_len(&b)),
            "offset 32: area 1 field size: 6 is not a multiple of the 4-byte option word"
        );
        let mut b = image(std::slice::from_ref(&config));
        patch_descriptor(&mut b, 1, |d| d[4] = 4);
        b.truncate(b.len() - 4);
        assert!(read_all(&b, known_len(&b)).is_ok(), "4 bytes: one option word, structurally fine");
        let l4 = ReaderOptions { file_len: Some(b.len() as u64), memory_map: Some(Family::Stm32L4.profile()) };
        assert_eq!(
            read_err(&b, l4),
            "offset 32: area 1 field size: 4 is not a multiple of the 8-byte option-byte record"
        );
        let h7 = ReaderOptions { file_len: Some(b.len() as u64), memory_map: Some(Family::Stm32H7.profile()) };
        assert_eq!(
            read_err(&b, h7),
            "offset 32: area 1 field size: 4 bytes, but a STM32H7 (H753) `C` area holds exactly 36 bytes (9 option words)"
        );
        let pause = PlainArea { area_type: AreaType::Pause, address: 0x2000_0000, data: vec![] };
        let mut b = image(&[pause]);
        patch_descriptor(&mut b, 1, |d| d[4] = 1);
        b.push(0);
        assert_eq!(read_err(&b, known_len(&b)), "offset 32: area 1 field size: must be 0 for a 'P' area, found 0x1");
        let mut b = image(&[fw(0xFFFF_FF00, 0x100)]);
        patch_descriptor(&mut b, 1, |d| d[8] = 1);
        assert_eq!(
            read_err(&b, known_len(&b)),
            "offset 36: area 1 field address: area [0xffffff01, 0x100000001) extends past the 32-bit address space"
        );
        // E and K areas parse (installers refuse them).
        let reserved = [
            PlainArea { area_type: AreaType::External, address: 0x9000_0000, data: vec![1, 2, 3] },
            PlainArea { area_type: AreaType::KeyGen, address: 0, data: vec![] },
        ];
        let b = image(&reserved);
        assert_eq!(decrypt_image(&key(), &nonce(), &b, None).unwrap(), reserved);
    }

    #[test]
    fn memory_map_and_overlaps() {
        let b = image_to_vec(&key(), &nonce(), &[fw(0x0807_FF00, 0x100)]).unwrap();
        assert!(read_all(&b, l4(&b)).is_ok());
        let b = image_to_vec(&key(), &nonce(), &[fw(0x0807_FF00, 0x101)]).unwrap();
        assert_eq!(
            read_err(&b, l4(&b)),
            "offset 36: area 1 field address: area [0x0807ff00, 0x08080001) lies outside the flash \
             [0x08000000, 0x08080000) of STM32L4 (L462)"
        );
        assert!(read_all(&b, known_len(&b)).is_ok());
        let b = image_to_vec(&key(), &nonce(), &[fw(0x0800_0004, 4)]).unwrap();
        assert_eq!(
            read_err(&b, l4(&b)),
            "offset 36: area 1 field address: 0x08000004 is not aligned to the 8-byte program word of STM32L4 (L462)"
        );
        // Overlaps are refused with or without a memory map, in any order.
        let mut b = image_to_vec(&key(), &nonce(), &[fw(0x0800_0100, 0x100), fw(0x0800_0000, 0x100)]).unwrap();
        assert!(read_all(&b, l4(&b)).is_ok());
        patch_descriptor(&mut b, 2, |d| d[8] = 0x08);
        assert_eq!(
            read_err(&b, known_len(&b)),
            "offset 322: area 2 field address: area [0x08000008, 0x08000108) overlaps area 1 [0x08000100, 0x08000200)"
        );
        let b = image_to_vec(&key(), &nonce(), &[fw(0x0800_0000, 0x10), fw(0x0800_0010, 0x10)]);
        assert!(b.is_ok(), "touching areas do not overlap");
        let err = image_to_vec(&key(), &nonce(), &[fw(0x0800_0000, 0x10), fw(0x0800_000F, 0x10)]).unwrap_err();
        assert!(err.to_string().contains("overlaps area 1"), "{err}");
        // Empty flash areas overlap nothing.
        assert!(image_to_vec(&key(), &nonce(), &[fw(0x0800_0000, 0x10), fw(0x0800_0008, 0)]).is_ok());
        // A module overlapping firmware.
        let m = PlainArea { area_type: AreaType::Module, ..fw(0x0800_0008, 4) };
        assert!(image_to_vec(&key(), &nonce(), &[fw(0x0800_0000, 0x10), m]).is_err());
    }

    #[test]
    fn reader_stays_failed_after_an_error() {
        let mut b = sample();
        patch_descriptor(&mut b, 2, |d| d[2] = 9);
        let mut r = ImageReader::new(b.as_slice(), known_len(&b)).unwrap();
        assert!(r.next_area().unwrap().is_some());
        let e = r.next_area().unwrap_err();
        assert_eq!(e.offset(), Some(160));
        assert!(matches!(r.next_area(), Err(SfiError::ReaderFailed { offset: 160 })));
        // And a finished reader keeps answering None.
        let b = sample();
        let mut r = ImageReader::new(b.as_slice(), known_len(&b)).unwrap();
        while r.next_area().unwrap().is_some() {}
        assert!(r.next_area().unwrap().is_none());
        assert_eq!(r.position(), b.len() as u64);
    }

    /// A reader that returns one byte per call and an `Interrupted` error in between.
    struct Trickle<'a> {
        data: &'a [u8],
        interrupt: bool,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let Some((first, rest)) = self.data.split_first() else { return Ok(0) };
            if buf.is_empty() {
                return Ok(0);
            }
            buf[0] = *first;
            self.data = rest;
            Ok(1)
        }
    }

    #[test]
    fn short_reads_and_interrupts() {
        let b = sample();
        let mut r = ImageReader::new(Trickle { data: &b, interrupt: false }, ReaderOptions::default()).unwrap();
        let mut n = 0;
        while let Some(a) = r.next_area().unwrap() {
            a.decrypt(&key(), &nonce()).unwrap();
            n += 1;
        }
        assert_eq!(n, 2);
    }

    #[test]
    fn async_reader_futures_are_send() {
        fn assert_send<T: Send>(t: T) -> T {
            t
        }
        let b = sample();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut r = assert_send(AsyncImageReader::new(b.as_slice(), known_len(&b))).await.unwrap();
            assert!(assert_send(r.next_area()).await.unwrap().is_some());
            assert_eq!(r.position(), 158);
        });
    }

    #[test]
    fn io_errors_name_the_offset() {
        #[derive(Debug)]
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk on fire"))
            }
        }
        let e = ImageReader::new(Failing, ReaderOptions::default()).unwrap_err();
        assert_eq!(e.to_string(), "I/O error at offset 0: disk on fire");
    }

    #[test]
    fn authentication() {
        let b = sample();
        let mut r = ImageReader::new(b.as_slice(), known_len(&b)).unwrap();
        verify_header(&key(), &nonce(), r.header()).unwrap();
        assert!(matches!(verify_header(&key(), &ImageNonce([0; 12]), r.header()), Err(SfiError::HeaderNotAuthentic)));
        let a = r.next_area().unwrap().unwrap();
        assert_eq!(a.payload_offset(), 58);
        assert_eq!(a.decrypt(&key(), &nonce()).unwrap(), fw(0, 100).data);
        let mut d = a.descriptor.clone();
        d.address += 8;
        assert!(matches!(
            decrypt_area(&key(), &nonce(), &d, &a.ciphertext),
            Err(SfiError::AreaNotAuthentic { index: 1 })
        ));
        assert!(matches!(
            decrypt_area(&key(), &nonce(), &a.descriptor, &a.ciphertext[1..]),
            Err(SfiError::LengthMismatch { index: 1, expected: 100, found: 99 })
        ));
        // The header and descriptor byte layouts round trip.
        assert_eq!(r.header().to_bytes()[..], b[..28]);
        assert_eq!(a.descriptor.to_bytes()[..], b[28..58]);
        assert_eq!(AreaDescriptor::parse(&a.descriptor.to_bytes(), 28).unwrap(), a.descriptor);
    }

    #[test]
    fn write_image_refuses_what_the_reader_would() {
        assert!(matches!(image_to_vec(&key(), &nonce(), &[]), Err(SfiError::AreaCount { count: 0 })));
        let many = vec![PlainArea { area_type: AreaType::Pause, address: 0, data: vec![] }; 1025];
        assert!(matches!(image_to_vec(&key(), &nonce(), &many), Err(SfiError::AreaCount { count: 1025 })));
        let max = vec![PlainArea { area_type: AreaType::Pause, address: 0, data: vec![] }; 1024];
        let b = image_to_vec(&key(), &nonce(), &max).unwrap();
        assert_eq!(decrypt_image(&key(), &nonce(), &b, None).unwrap().len(), 1024);
        let big = fw(0x0800_0000, MAX_AREA_SIZE as usize + 1);
        assert!(matches!(
            image_to_vec(&key(), &nonce(), &[big]),
            Err(SfiError::AreaTooLarge { index: 1, size }) if size == MAX_AREA_SIZE as usize + 1
        ));
        let bad_config = PlainArea { area_type: AreaType::Config, address: 0, data: vec![0; 7] };
        assert!(image_to_vec(&key(), &nonce(), &[bad_config]).is_err());
        // Write errors name the offset.
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::StorageFull.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let e = write_image(&key(), &nonce(), &[fw(0x0800_0000, 4)], Full).unwrap_err();
        assert!(matches!(e, SfiError::Io { offset: 0, .. }), "{e}");
    }

    #[test]
    fn the_size_limit_is_16_mib_inclusive() {
        let mut d = AreaDescriptor {
            area_type: AreaType::Firmware,
            version: AREA_VERSION,
            index: 1,
            size: MAX_AREA_SIZE,
            address: 0x0800_0000,
            area_count: 1,
            tag: [0; 16],
        };
        assert_eq!(AreaDescriptor::parse(&d.to_bytes(), 28).unwrap(), d);
        d.size += 1;
        assert_eq!(
            AreaDescriptor::parse(&d.to_bytes(), 28).unwrap_err().to_string(),
            "offset 32: area 1 field size: 16777217 exceeds the 16 MiB limit"
        );
        // A 16 MiB claim on a short stream of unknown length fails as truncated without
        // reserving the claimed size up front.
        let mut b = image_to_vec(&key(), &nonce(), &[fw(0x0800_0000, 8)]).unwrap();
        patch_descriptor(&mut b, 1, |d| d[4..8].copy_from_slice(&MAX_AREA_SIZE.to_le_bytes()));
        assert_eq!(
            read_err(&b, ReaderOptions::default()),
            "offset 58: area 1 field payload: file truncated (need 16777216 bytes, have 8)"
        );
    }

    #[test]
    fn expected_flash_crc_installs_flash_areas_only() {
        let p = Family::Stm32Wl.profile();
        let erased = crc32fast::hash(&vec![0xFF; p.flash_size as usize]);
        let config = PlainArea { area_type: AreaType::Config, address: 0, data: vec![0; 8] };
        assert_eq!(expected_flash_crc(p, std::slice::from_ref(&config)), erased);
        let area = fw(p.flash_base + 16, 4);
        let mut flash = vec![0xFF; p.flash_size as usize];
        flash[16..20].copy_from_slice(&area.data);
        assert_eq!(expected_flash_crc(p, &[area, config]), crc32fast::hash(&flash));
        // Out-of-flash bytes are ignored rather than panicking.
        let tail = fw(p.flash_base + p.flash_size - 2, 4);
        let _ = expected_flash_crc(p, &[tail, fw(0, 4), fw(u32::MAX, 1)]);
    }

    /// Random valid area lists: non-overlapping F/M areas in L4 flash, C records, P/R, E/K.
    fn areas_strategy() -> impl Strategy<Value = Vec<PlainArea>> {
        let area = (0u8..7, 0u32..64, proptest::collection::vec(any::<u8>(), 0..200));
        proptest::collection::vec(area, 1..12).prop_map(|raw| {
            let mut next = 0x0800_0000u32;
            raw.into_iter()
                .map(|(kind, gap, data)| {
                    let area_type = AreaType::ALL[kind as usize];
                    match area_type {
                        AreaType::Firmware | AreaType::Module => {
                            let address = next + gap * 8;
                            next = address + (data.len() as u32).div_ceil(8) * 8;
                            PlainArea { area_type, address, data }
                        }
                        AreaType::Config => {
                            let n = data.len() / 8 * 8;
                            PlainArea { area_type, address: 0, data: data[..n].to_vec() }
                        }
                        AreaType::Pause | AreaType::Resume => PlainArea { area_type, address: gap, data: vec![] },
                        AreaType::External | AreaType::KeyGen => PlainArea { area_type, address: gap, data },
                    }
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn image_round_trip(areas in areas_strategy(), k in any::<[u8; 16]>(), n in any::<[u8; 12]>()) {
            let (key, nonce) = (FirmwareKey::new(k), ImageNonce(n));
            let b = image_to_vec(&key, &nonce, &areas).unwrap();
            let expected_len = HEADER_LEN + areas.iter().map(|a| DESCRIPTOR_LEN + a.data.len()).sum::<usize>();
            prop_assert_eq!(b.len(), expected_len);
            let opts = l4(&b);
            prop_assert_eq!(&decrypt_image(&key, &nonce, &b, opts.memory_map).unwrap(), &areas);
            prop_assert_eq!(read_all(&b, opts), read_all_async(&b, opts));
            let other = FirmwareKey::new(k.map(|x| x ^ 1));
            prop_assert!(matches!(decrypt_image(&other, &nonce, &b, None), Err(SfiError::HeaderNotAuthentic)));
        }

        #[test]
        fn readers_never_panic_and_agree(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            for opts in [ReaderOptions::default(), known_len(&bytes), l4(&bytes)] {
                prop_assert_eq!(read_all(&bytes, opts), read_all_async(&bytes, opts));
            }
        }

        #[test]
        fn readers_agree_on_mutated_images(
            areas in areas_strategy(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut b = image_to_vec(&key(), &nonce(), &areas).unwrap();
            for (at, value) in edits {
                let i = at.index(b.len());
                b[i] = value;
            }
            if truncate {
                b.truncate(cut.index(b.len()));
            }
            for opts in [ReaderOptions::default(), known_len(&b), l4(&b)] {
                let sync = read_all(&b, opts);
                prop_assert_eq!(&sync, &read_all_async(&b, opts));
                if let Ok(read) = sync {
                    for a in read {
                        prop_assert_eq!(a.ciphertext.len() as u64, u64::from(a.descriptor.size));
                    }
                }
            }
        }
    }
}
