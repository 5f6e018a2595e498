//! Firmware inputs for `flashgate pack` (the Trusted Package Creator equivalent): loading ELF
//! executables, Intel HEX files and raw binaries into address-tagged [`Segment`]s, laying those out
//! as program-word aligned `F` areas for a family's flash ([`layout`]), and reading option bytes
//! from a small CSV file into a `C` area ([`parse_option_bytes_csv`]).
//!
//! Everything here reads untrusted files: malformed input is an error naming the input, the line or
//! segment and what was wrong, never a panic.

use std::fmt;
use std::path::Path;

use object::LittleEndian;
use object::elf::{FileHeader32, FileHeader64, PT_LOAD};
use object::read::elf::{FileHeader, ProgramHeader};

use crate::family::FamilyProfile;
use crate::sfi::{AreaType, PlainArea};

/// A run of bytes destined for one address, with the input it came from (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Address of the first byte.
    pub address: u32,
    /// The bytes, in address order.
    pub data: Vec<u8>,
    /// Where the bytes came from, e.g. `fw.elf segment 1` or `app.hex line 12`.
    pub source: String,
}

impl Segment {
    /// One past the last address (as `u64`: a segment may end exactly at 4 GiB).
    pub fn end(&self) -> u64 {
        u64::from(self.address) + self.data.len() as u64
    }
}

/// An address range printed as `[0x08000000..0x08000100)`.
struct Range(u64, u64);

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[0x{:08X}..0x{:08X})", self.0, self.1)
    }
}

fn range(start: u64, end: u64) -> String {
    Range(start, end).to_string()
}

/// Why a firmware input could not be loaded or laid out.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// The input file could not be read.
    #[error("cannot read {path}: {error}")]
    Io {
        /// Path as given.
        path: String,
        /// The operating system's error.
        #[source]
        error: std::io::Error,
    },
    /// The input specification (`file` or `file@address`) is unusable.
    #[error("input {spec:?}: {reason}")]
    InputSpec {
        /// The specification as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The ELF file is malformed or of a kind the packer does not take.
    #[error("{input}: not a usable ELF file: {reason}")]
    Elf {
        /// Input name.
        input: String,
        /// What is wrong.
        reason: String,
    },
    /// An Intel HEX record is malformed.
    #[error("{input} line {line}: {reason}")]
    Hex {
        /// Input name.
        input: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the record.
        reason: String,
    },
    /// The input holds no bytes to program.
    #[error("{input}: {reason}")]
    NoData {
        /// Input name.
        input: String,
        /// Why there is nothing (e.g. "no PT_LOAD segment with file data").
        reason: String,
    },
    /// Two segments claim the same bytes.
    #[error("{first} {} overlaps {second} {}", range(*first_start, *first_end), range(*second_start, *second_end))]
    Overlap {
        /// Source of the lower segment.
        first: String,
        /// Its first address.
        first_start: u64,
        /// One past its last address.
        first_end: u64,
        /// Source of the segment that starts inside it.
        second: String,
        /// Its first address.
        second_start: u64,
        /// One past its last address.
        second_end: u64,
    },
    /// A segment lies (partly) outside the family's internal flash.
    #[error("{input} {} lies outside the flash of {family} {}", range(*start, *end), range(*flash_start, *flash_end))]
    OutsideFlash {
        /// Source of the segment.
        input: String,
        /// Its first address.
        start: u64,
        /// One past its last address.
        end: u64,
        /// Family display name.
        family: &'static str,
        /// First flash address.
        flash_start: u64,
        /// One past the last flash address.
        flash_end: u64,
    },
    /// The largest area size asked of [`layout`] cannot hold one program word.
    #[error("maximum area size {max_area} bytes is smaller than the program word of {family} ({program_word} bytes)")]
    MaxAreaTooSmall {
        /// The requested maximum.
        max_area: u32,
        /// Family display name.
        family: &'static str,
        /// The family's program word.
        program_word: u32,
    },
    /// A line of the option-byte CSV is malformed.
    #[error("option bytes line {line}: {reason}")]
    OptionBytes {
        /// 1-based line number (0 for whole-file problems).
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// ELF magic bytes.
const ELF_MAGIC: [u8; 4] = [0x7F, b'E', b'L', b'F'];

/// Load every `PT_LOAD` segment that carries file data (`p_filesz > 0`) at its physical address
/// (`p_paddr`, the load address: initialised `.data` lives in flash, not at its RAM address).
/// `.bss`-style memory without file data is skipped; when `p_filesz < p_memsz` only the file part
/// is taken. 32-bit and 64-bit little-endian files are accepted; addresses must fit in 32 bits.
pub fn load_elf(bytes: &[u8], source: &str) -> Result<Vec<Segment>, FirmwareError> {
    let err = |reason: String| FirmwareError::Elf { input: source.to_string(), reason };
    if bytes.len() < 16 || bytes[..4] != ELF_MAGIC {
        return Err(err("missing ELF magic \\x7FELF at offset 0".into()));
    }
    if bytes[5] != 1 {
        return Err(err(format!("offset 5: EI_DATA is {} (only 1, little-endian, is supported)", bytes[5])));
    }
    let raw = match bytes[4] {
        1 => elf_load_segments::<FileHeader32<LittleEndian>>(bytes),
        2 => elf_load_segments::<FileHeader64<LittleEndian>>(bytes),
        other => {
            return Err(err(format!("offset 4: EI_CLASS is {other} (expected 1 or 2)")));
        }
    }
    .map_err(err)?;
    let segments: Vec<Segment> = raw
        .into_iter()
        .map(|(index, address, data)| Segment {
            address,
            data: data.to_vec(),
            source: format!("{source} segment {index}"),
        })
        .collect();
    if segments.is_empty() {
        return Err(FirmwareError::NoData {
            input: source.to_string(),
            reason: "no PT_LOAD segment with file data".into(),
        });
    }
    Ok(segments)
}

/// A loadable ELF segment: (program header index, physical address, file bytes).
type LoadSegment<'a> = (usize, u32, &'a [u8]);

/// The loadable segments of an ELF file.
fn elf_load_segments<H>(bytes: &[u8]) -> Result<Vec<LoadSegment<'_>>, String>
where
    H: FileHeader<Endian = LittleEndian>,
{
    let header = H::parse(bytes).map_err(|e| format!("file header: {e}"))?;
    let endian = LittleEndian;
    let phdrs = header.program_headers(endian, bytes).map_err(|e| format!("program headers: {e}"))?;
    let mut out = Vec::new();
    for (index, ph) in phdrs.iter().enumerate() {
        if ph.p_type(endian) != PT_LOAD {
            continue;
        }
        let filesz: u64 = ph.p_filesz(endian).into();
        if filesz == 0 {
            continue;
        }
        let paddr: u64 = ph.p_paddr(endian).into();
        let offset: u64 = ph.p_offset(endian).into();
        let data = ph.data(endian, bytes).map_err(|()| {
            format!(
                "program header {index}: file data at offset 0x{offset:X} size 0x{filesz:X} \
                 extends past the end of the file ({} bytes)",
                bytes.len()
            )
        })?;
        let end = paddr.saturating_add(filesz);
        let address = u32::try_from(paddr).ok().filter(|_| end <= 1 << 32).ok_or_else(|| {
            format!("program header {index}: physical address range {} does not fit in 32 bits", range(paddr, end))
        })?;
        out.push((index, address, data));
    }
    Ok(out)
}

/// Parse one hexadecimal byte pair from a record.
fn hex_byte(pair: &[u8]) -> Option<u8> {
    let hi = *pair.first()?;
    let lo = *pair.get(1)?;
    let digit = |c: u8| (c as char).to_digit(16);
    Some((digit(hi)? * 16 + digit(lo)?) as u8)
}

/// Load an Intel HEX file. Supported records: `00` data, `01` end of file (required, last),
/// `02` extended segment address, `04` extended linear address; `03` / `05` start addresses are
/// checked and ignored. Every record's checksum is verified. Contiguous data records become one
/// [`Segment`] named after the line of its first record. Blank lines are ignored.
///
/// Addresses are `base + offset` in 32-bit arithmetic (a record crossing a 64 KiB boundary
/// continues linearly, as most tools read it); a record that would pass 4 GiB is an error.
pub fn load_ihex(text: &str, source: &str) -> Result<Vec<Segment>, FirmwareError> {
    let err = |line: usize, reason: String| FirmwareError::Hex { input: source.to_string(), line, reason };
    let mut segments: Vec<Segment> = Vec::new();
    let mut base: u64 = 0;
    let mut eof_line: Option<usize> = None;
    for (i, raw_line) in text.lines().enumerate() {
        let line = i + 1;
        let rec = raw_line.trim();
        if rec.is_empty() {
            continue;
        }
        if let Some(eof) = eof_line {
            return Err(err(line, format!("record after the end-of-file record on line {eof}")));
        }
        let Some(body) = rec.strip_prefix(':') else {
            return Err(err(line, "record does not start with ':'".into()));
        };
        let body = body.as_bytes();
        if let Some(pos) = body.iter().position(|c| !c.is_ascii_hexdigit()) {
            return Err(err(
                line,
                format!("character {} of the record is not a hexadecimal digit: {:?}", pos + 2, char::from(body[pos])),
            ));
        }
        if body.len() % 2 != 0 {
            return Err(err(line, format!("odd number of hex digits ({})", body.len())));
        }
        let bytes: Vec<u8> = body.chunks(2).filter_map(hex_byte).collect();
        if bytes.len() < 5 {
            return Err(err(line, format!("record too short: {} bytes, need at least 5", bytes.len())));
        }
        let count = usize::from(bytes[0]);
        if bytes.len() != count + 5 {
            return Err(err(
                line,
                format!("byte count field says {count} data bytes but the record holds {}", bytes.len() - 5),
            ));
        }
        let sum = bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        if sum != 0 {
            let stored = bytes[bytes.len() - 1];
            let expected = stored.wrapping_sub(sum);
            return Err(err(line, format!("checksum mismatch: record has 0x{stored:02X}, computed 0x{expected:02X}")));
        }
        let offset = u64::from(u16::from_be_bytes([bytes[1], bytes[2]]));
        let kind = bytes[3];
        let payload = &bytes[4..4 + count];
        let need_len = |n: usize, what: &str| {
            if count == n {
                Ok(())
            } else {
                Err(err(line, format!("{what} record must hold {n} data bytes, holds {count}")))
            }
        };
        match kind {
            0x00 => {
                if payload.is_empty() {
                    continue;
                }
                let address = base + offset;
                let end = address + payload.len() as u64;
                if end > 1 << 32 {
                    return Err(err(line, format!("data {} extends past 4 GiB", range(address, end))));
                }
                match segments.last_mut() {
                    Some(last) if last.end() == address => last.data.extend_from_slice(payload),
                    _ => segments.push(Segment {
                        // Checked above: end <= 2^32, so address < 2^32.
                        address: address as u32,
                        data: payload.to_vec(),
                        source: format!("{source} line {line}"),
                    }),
                }
            }
            0x01 => {
                need_len(0, "end-of-file (01)")?;
                eof_line = Some(line);
            }
            0x02 => {
                need_len(2, "extended segment address (02)")?;
                base = u64::from(u16::from_be_bytes([payload[0], payload[1]])) << 4;
            }
            0x03 => need_len(4, "start segment address (03)")?,
            0x04 => {
                need_len(2, "extended linear address (04)")?;
                base = u64::from(u16::from_be_bytes([payload[0], payload[1]])) << 16;
            }
            0x05 => need_len(4, "start linear address (05)")?,
            other => {
                return Err(err(line, format!("unknown record type 0x{other:02X}")));
            }
        }
    }
    if eof_line.is_none() {
        return Err(FirmwareError::NoData {
            input: source.to_string(),
            reason: "no end-of-file record (:00000001FF): file truncated?".into(),
        });
    }
    if segments.is_empty() {
        return Err(FirmwareError::NoData { input: source.to_string(), reason: "no data records".into() });
    }
    Ok(segments)
}

/// A raw binary placed at `address` (one segment; an empty file gives none).
pub fn load_bin(bytes: &[u8], address: u32, source: &str) -> Vec<Segment> {
    if bytes.is_empty() {
        return Vec::new();
    }
    vec![Segment { address, data: bytes.to_vec(), source: source.to_string() }]
}

/// Parse `0x08040000`, `08040000h`-free plain forms: hexadecimal with `0x`, otherwise decimal.
fn parse_u32(text: &str) -> Option<u32> {
    let t = text.trim().replace('_', "");
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16).ok()
    } else {
        t.parse().ok()
    }
}

/// Load one input as given on the command line: `fw.elf`, `app.hex` or `blob.bin@0x08040000`.
/// ELF is recognised by its magic, Intel HEX by a `.hex`/`.ihex`/`.ihx` extension or a leading
/// `:`; anything else needs an explicit `@address` and is taken as raw binary.
pub fn load_input(spec: &str) -> Result<Vec<Segment>, FirmwareError> {
    let spec_err = |reason: String| FirmwareError::InputSpec { spec: spec.to_string(), reason };
    let (path, address) = match spec.rsplit_once('@') {
        Some((path, addr)) if !path.is_empty() && !Path::new(spec).exists() => {
            let address = parse_u32(addr).ok_or_else(|| {
                spec_err(format!("address {addr:?} is not a 32-bit number (write it as 0x08040000 or decimal)"))
            })?;
            (path, Some(address))
        }
        _ => (spec, None),
    };
    let bytes = std::fs::read(path).map_err(|error| FirmwareError::Io { path: path.to_string(), error })?;
    if let Some(address) = address {
        let segments = load_bin(&bytes, address, path);
        if segments.is_empty() {
            return Err(FirmwareError::NoData { input: path.to_string(), reason: "file is empty".into() });
        }
        return Ok(segments);
    }
    if bytes.starts_with(&ELF_MAGIC) {
        return load_elf(&bytes, path);
    }
    let ext = Path::new(path).extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let looks_hex = matches!(ext.as_deref(), Some("hex" | "ihex" | "ihx"))
        || bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b':');
    if looks_hex {
        let text = std::str::from_utf8(&bytes).map_err(|e| FirmwareError::Hex {
            input: path.to_string(),
            line: 1 + bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count(),
            reason: "not ASCII text".into(),
        })?;
        return load_ihex(text, path);
    }
    Err(spec_err(
        "neither ELF (no \\x7FELF magic) nor Intel HEX; for a raw binary give its address as \
         file.bin@0x08000000"
            .into(),
    ))
}

fn align_down(v: u64, word: u64) -> u64 {
    v - v % word
}

fn align_up(v: u64, word: u64) -> u64 {
    v.div_ceil(word) * word
}

/// Lay segments out as `F` areas for `family`: sort by address; refuse overlapping segments (the
/// error names both sources and ranges) and segments outside the family's flash; merge segments
/// that touch, or that would share a program word once padded; pad each area's start and end to
/// the family's program word with `0xFF`; split areas larger than `max_area` (rounded down to a
/// whole number of program words) at program-word boundaries. Returns the areas in address order.
/// Empty segments are ignored; no segments give no areas.
pub fn layout(
    mut segments: Vec<Segment>,
    family: &FamilyProfile,
    max_area: u32,
) -> Result<Vec<PlainArea>, FirmwareError> {
    let word = u64::from(family.program_word.max(1));
    let requested = max_area;
    let max_area = align_down(u64::from(max_area), word);
    if max_area == 0 {
        return Err(FirmwareError::MaxAreaTooSmall {
            max_area: requested,
            family: family.display_name,
            program_word: family.program_word,
        });
    }
    segments.retain(|s| !s.data.is_empty());
    for s in &segments {
        if !family.flash_contains(s.address, s.data.len() as u64) {
            return Err(FirmwareError::OutsideFlash {
                input: s.source.clone(),
                start: u64::from(s.address),
                end: s.end(),
                family: family.display_name,
                flash_start: u64::from(family.flash_base),
                flash_end: family.flash_end(),
            });
        }
    }
    segments.sort_by(|a, b| a.address.cmp(&b.address).then_with(|| a.end().cmp(&b.end())));
    // Overlap check: compare each segment with the furthest-reaching one before it.
    let mut reach: Option<&Segment> = None;
    for s in &segments {
        if let Some(prev) = reach
            && u64::from(s.address) < prev.end()
        {
            {
                return Err(FirmwareError::Overlap {
                    first: prev.source.clone(),
                    first_start: u64::from(prev.address),
                    first_end: prev.end(),
                    second: s.source.clone(),
                    second_start: u64::from(s.address),
                    second_end: s.end(),
                });
            }
        }
        if reach.is_none_or(|p| s.end() > p.end()) {
            reach = Some(s);
        }
    }
    // Group into padded, word-aligned runs.
    let mut groups: Vec<(u64, u64, Vec<&Segment>)> = Vec::new();
    for s in &segments {
        let start = align_down(u64::from(s.address), word);
        let end = align_up(s.end(), word);
        match groups.last_mut() {
            Some((_, g_end, members)) if start <= *g_end => {
                *g_end = (*g_end).max(end);
                members.push(s);
            }
            _ => groups.push((start, end, vec![s])),
        }
    }
    let mut areas = Vec::new();
    for (start, end, members) in groups {
        let mut image = vec![0xFFu8; (end - start) as usize];
        for s in members {
            let at = (u64::from(s.address) - start) as usize;
            image[at..at + s.data.len()].copy_from_slice(&s.data);
        }
        for (i, chunk) in image.chunks(max_area as usize).enumerate() {
            areas.push(PlainArea {
                area_type: AreaType::Firmware,
                // start + i * max_area < end <= flash_end <= 2^32: fits in u32.
                address: (start + i as u64 * max_area) as u32,
                data: chunk.to_vec(),
            });
        }
    }
    Ok(areas)
}

/// Read option bytes for a `C` area from CSV text: one `id,value` or `NAME,value` per line (names
/// from the family's option-byte table, case-insensitive), numbers in decimal or `0x` hex, `#`
/// starting a comment, blank lines ignored, an optional `id,value` / `name,value` header line.
/// Each id may appear once; `RDP` takes a byte value. Returns a `C` area at address 0 whose
/// payload is the records `u32 id, u32 value` (little-endian) in file order.
pub fn parse_option_bytes_csv(text: &str, family: &FamilyProfile) -> Result<PlainArea, FirmwareError> {
    if let crate::family::ConfigLayout::Positional(words) = family.config_layout {
        return parse_positional_csv(text, family, words);
    }
    let err = |line: usize, reason: String| FirmwareError::OptionBytes { line, reason };
    let known = || family.option_bytes.iter().map(|o| format!("{} ({})", o.name, o.id)).collect::<Vec<_>>().join(", ");
    let mut seen: Vec<u32> = Vec::new();
    let mut payload = Vec::new();
    let mut first = true;
    for (i, raw_line) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw_line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let fields: Vec<&str> = content.split(',').map(str::trim).collect();
        let was_first = std::mem::replace(&mut first, false);
        if was_first
            && fields.len() == 2
            && matches!(fields[0].to_ascii_lowercase().as_str(), "id" | "name")
            && fields[1].eq_ignore_ascii_case("value")
        {
            continue;
        }
        let [key, value] = fields.as_slice() else {
            return Err(err(line, format!("expected two fields \"id,value\", found {}", fields.len())));
        };
        let def = match parse_u32(key) {
            Some(id) => family.option_byte(id),
            None => family.option_bytes.iter().find(|o| o.name.eq_ignore_ascii_case(key)),
        }
        .ok_or_else(|| {
            err(line, format!("unknown option byte {key:?} for {}; known: {}", family.display_name, known()))
        })?;
        let value = parse_u32(value)
            .ok_or_else(|| err(line, format!("value {value:?} for {} is not a 32-bit number", def.name)))?;
        if def.id == crate::family::OPTION_RDP && value > 0xFF {
            return Err(err(line, format!("RDP is one byte, value 0x{value:X} is larger")));
        }
        if seen.contains(&def.id) {
            return Err(err(line, format!("option byte {} (id {}) set twice", def.name, def.id)));
        }
        seen.push(def.id);
        payload.extend_from_slice(&def.id.to_le_bytes());
        payload.extend_from_slice(&value.to_le_bytes());
    }
    if payload.is_empty() {
        return Err(err(0, "no option-byte records".into()));
    }
    Ok(PlainArea { area_type: AreaType::Config, address: 0, data: payload })
}

/// The `(name, value)` lines of an option-byte CSV (comments after `#`, an optional `name,value`
/// header), with their line numbers.
fn csv_lines(text: &str) -> Result<Vec<(usize, String, String)>, FirmwareError> {
    let err = |line: usize, reason: String| FirmwareError::OptionBytes { line, reason };
    let mut out = Vec::new();
    for (i, raw_line) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw_line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let fields: Vec<&str> = content.split(',').map(str::trim).collect();
        let [key, value] = fields.as_slice() else {
            return Err(err(line, format!("expected two fields \"name,value\", found {}", fields.len())));
        };
        if out.is_empty()
            && matches!(key.to_ascii_lowercase().as_str(), "id" | "name")
            && value.eq_ignore_ascii_case("value")
        {
            continue;
        }
        out.push((line, (*key).to_owned(), (*value).to_owned()));
    }
    Ok(out)
}

/// ST's positional `C` layout (STM32H7: nine words in the order of `words`): each CSV line names a
/// register (with or without `FLASH_` and `_PRG`) or `RDP` (bits 15:8 of the first word, OPTSR);
/// registers not named keep their factory defaults. Always exactly `4 × words` bytes.
fn parse_positional_csv(
    text: &str,
    family: &FamilyProfile,
    words: &'static [crate::family::OptionByteDef],
) -> Result<PlainArea, FirmwareError> {
    let err = |line: usize, reason: String| FirmwareError::OptionBytes { line, reason };
    let bare = |n: &str| {
        let u = n.to_ascii_uppercase();
        let u = u.strip_prefix("FLASH_").unwrap_or(&u).to_owned();
        let u = u.strip_suffix("_PRG").unwrap_or(&u).to_owned();
        u.strip_suffix('R').filter(|s| s.starts_with("WPSN")).map(str::to_owned).unwrap_or(u)
    };
    let known = || words.iter().map(|w| w.name).collect::<Vec<_>>().join(", ");
    let mut values: Vec<Option<u32>> = vec![None; words.len()];
    let mut rdp: Option<u32> = None;
    let lines = csv_lines(text)?;
    if lines.is_empty() {
        return Err(err(0, "no option-byte lines".into()));
    }
    for (line, key, value) in lines {
        let v =
            parse_u32(&value).ok_or_else(|| err(line, format!("value {value:?} for {key} is not a 32-bit number")))?;
        if key.eq_ignore_ascii_case("RDP") {
            if v > 0xFF {
                return Err(err(line, format!("RDP is one byte, value 0x{v:X} is larger")));
            }
            if rdp.replace(v).is_some() {
                return Err(err(line, "RDP set twice".into()));
            }
            continue;
        }
        let at = words.iter().position(|w| bare(w.name) == bare(&key)).ok_or_else(|| {
            err(
                line,
                format!(
                    "unknown option register {key:?} for {}; known, in the order Flashgate assumes: {}, and RDP",
                    family.display_name,
                    known()
                ),
            )
        })?;
        if values[at].replace(v).is_some() {
            return Err(err(line, format!("option register {} set twice", words[at].name)));
        }
    }
    let mut payload = Vec::with_capacity(words.len() * 4);
    for (i, w) in words.iter().enumerate() {
        let mut v = values[i].unwrap_or(w.default);
        if i == 0
            && let Some(r) = rdp
        {
            v = (v & !0xFF00) | (r << 8);
        }
        payload.extend_from_slice(&v.to_le_bytes());
    }
    Ok(PlainArea { area_type: AreaType::Config, address: 0, data: payload })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::family::Family;
    use proptest::prelude::*;

    fn l4() -> &'static FamilyProfile {
        Family::Stm32L4.profile()
    }

    /// Program headers for a hand-built ELF: (p_type, paddr, vaddr, file bytes, memsz).
    struct Ph {
        kind: u32,
        paddr: u64,
        vaddr: u64,
        data: Vec<u8>,
        memsz: u64,
    }

    fn load(paddr: u64, data: &[u8]) -> Ph {
        Ph { kind: 1, paddr, vaddr: paddr, data: data.to_vec(), memsz: data.len() as u64 }
    }

    /// Build a little-endian ELF executable (32- or 64-bit) with these program headers.
    fn build_elf(is64: bool, phs: &[Ph]) -> Vec<u8> {
        let (ehsize, phentsize) = if is64 { (64usize, 56usize) } else { (52, 32) };
        let phoff = ehsize;
        let mut data_off = phoff + phentsize * phs.len();
        let mut out = vec![0u8; data_off];
        out[..4].copy_from_slice(&ELF_MAGIC);
        out[4] = if is64 { 2 } else { 1 };
        out[5] = 1; // little-endian
        out[6] = 1; // EV_CURRENT
        let put16 = |o: &mut Vec<u8>, at: usize, v: u16| o[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let put32 = |o: &mut Vec<u8>, at: usize, v: u32| o[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let put64 = |o: &mut Vec<u8>, at: usize, v: u64| o[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put16(&mut out, 16, 2); // ET_EXEC
        put16(&mut out, 18, if is64 { 62 } else { 40 }); // x86-64 / ARM
        put32(&mut out, 20, 1);
        if is64 {
            put64(&mut out, 32, phoff as u64);
            put16(&mut out, 52, ehsize as u16);
            put16(&mut out, 54, phentsize as u16);
            put16(&mut out, 56, phs.len() as u16);
        } else {
            put32(&mut out, 28, phoff as u32);
            put16(&mut out, 40, ehsize as u16);
            put16(&mut out, 42, phentsize as u16);
            put16(&mut out, 44, phs.len() as u16);
        }
        let mut blobs = Vec::new();
        for (i, ph) in phs.iter().enumerate() {
            let at = phoff + i * phentsize;
            let filesz = ph.data.len() as u64;
            let off = if filesz == 0 { 0 } else { data_off as u64 };
            if is64 {
                put32(&mut out, at, ph.kind);
                put32(&mut out, at + 4, 5);
                put64(&mut out, at + 8, off);
                put64(&mut out, at + 16, ph.vaddr);
                put64(&mut out, at + 24, ph.paddr);
                put64(&mut out, at + 32, filesz);
                put64(&mut out, at + 40, ph.memsz);
                put64(&mut out, at + 48, 4);
            } else {
                put32(&mut out, at, ph.kind);
                put32(&mut out, at + 4, off as u32);
                put32(&mut out, at + 8, ph.vaddr as u32);
                put32(&mut out, at + 12, ph.paddr as u32);
                put32(&mut out, at + 16, filesz as u32);
                put32(&mut out, at + 20, ph.memsz as u32);
                put32(&mut out, at + 24, 5);
                put32(&mut out, at + 28, 4);
            }
            data_off += ph.data.len();
            blobs.extend_from_slice(&ph.data);
        }
        out.extend_from_slice(&blobs);
        out
    }

    #[test]
    fn elf32_uses_paddr_and_skips_bss_and_non_load() {
        let text = vec![0x11u8; 100];
        let data = vec![0x22u8; 12];
        let phs = [
            load(0x0800_0000, &text),
            // .data: runs in RAM, loaded from flash right after .text
            Ph { kind: 1, paddr: 0x0800_0064, vaddr: 0x2000_0000, data: data.clone(), memsz: 16 },
            // .bss: no file data
            Ph { kind: 1, paddr: 0x2000_0010, vaddr: 0x2000_0010, data: vec![], memsz: 256 },
            // PT_NOTE with data
            Ph { kind: 4, paddr: 0, vaddr: 0, data: vec![1, 2, 3], memsz: 3 },
        ];
        let elf = build_elf(false, &phs);
        let segs = load_elf(&elf, "fw.elf").unwrap();
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0].address, 0x0800_0000);
        assert_eq!(segs[0].data, text);
        assert_eq!(segs[0].source, "fw.elf segment 0");
        assert_eq!(segs[1].address, 0x0800_0064);
        assert_eq!(segs[1].data, data);
        let areas = layout(segs, l4(), 64 * 1024).unwrap();
        assert_eq!(areas.len(), 1);
        assert_eq!(areas[0].address, 0x0800_0000);
        assert_eq!(areas[0].data.len(), 112);
        assert_eq!(&areas[0].data[100..112], &data[..]);
    }

    #[test]
    fn elf64_is_accepted_and_large_addresses_refused() {
        let elf = build_elf(true, &[load(0x0800_1000, &[1, 2, 3, 4, 5, 6, 7, 8])]);
        let segs = load_elf(&elf, "fw64.elf").unwrap();
        assert_eq!(
            segs,
            vec![Segment {
                address: 0x0800_1000,
                data: vec![1, 2, 3, 4, 5, 6, 7, 8],
                source: "fw64.elf segment 0".into()
            }]
        );
        let elf = build_elf(true, &[load(0x1_0000_0000, &[1])]);
        let e = load_elf(&elf, "big.elf").unwrap_err().to_string();
        assert!(e.contains("does not fit in 32 bits"), "{e}");
        let elf = build_elf(false, &[load(0xFFFF_FFFC, &[1; 8])]);
        assert!(load_elf(&elf, "wrap.elf").is_err());
    }

    #[test]
    fn elf_errors_are_readable() {
        let e = load_elf(b"hello", "x.elf").unwrap_err().to_string();
        assert_eq!(e, "x.elf: not a usable ELF file: missing ELF magic \\x7FELF at offset 0");
        let mut elf = build_elf(false, &[load(0x0800_0000, &[1; 4])]);
        elf[5] = 2;
        let e = load_elf(&elf, "be.elf").unwrap_err().to_string();
        assert!(e.contains("little-endian"), "{e}");
        let elf = build_elf(false, &[load(0x0800_0000, &[1; 64])]);
        let e = load_elf(&elf[..elf.len() - 10], "cut.elf").unwrap_err().to_string();
        assert!(e.contains("program header 0") && e.contains("past the end"), "{e}");
        let elf = build_elf(false, &[Ph { kind: 1, paddr: 0x2000_0000, vaddr: 0, data: vec![], memsz: 64 }]);
        let e = load_elf(&elf, "bss.elf").unwrap_err().to_string();
        assert_eq!(e, "bss.elf: no PT_LOAD segment with file data");
        // Truncated headers never panic.
        let elf = build_elf(true, &[load(0x0800_0000, &[1; 64])]);
        for n in 0..elf.len() {
            let _ = load_elf(&elf[..n], "t.elf");
        }
    }

    fn hex_record(kind: u8, offset: u16, data: &[u8]) -> String {
        let mut bytes = vec![data.len() as u8, (offset >> 8) as u8, offset as u8, kind];
        bytes.extend_from_slice(data);
        let sum = bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        bytes.push(sum.wrapping_neg());
        format!(":{}", hex::encode_upper(bytes))
    }

    #[test]
    fn ihex_records_and_addressing() {
        let text = [
            hex_record(4, 0, &[0x08, 0x00]),
            hex_record(0, 0x0000, &[1, 2, 3, 4]),
            hex_record(0, 0x0004, &[5, 6, 7, 8]),
            hex_record(0, 0x0100, &[9]),
            hex_record(2, 0, &[0x10, 0x00]), // segment 0x1000 -> base 0x10000
            hex_record(0, 0x0010, &[0xAA]),
            hex_record(5, 0, &[0x08, 0, 0, 0x41]),
            hex_record(3, 0, &[0, 0, 0, 0]),
            hex_record(1, 0, &[]),
            String::new(),
        ]
        .join("\r\n");
        let segs = load_ihex(&text, "app.hex").unwrap();
        assert_eq!(segs.len(), 3);
        assert_eq!((segs[0].address, segs[0].data.clone()), (0x0800_0000, vec![1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(segs[0].source, "app.hex line 2");
        assert_eq!((segs[1].address, segs[1].data.clone()), (0x0800_0100, vec![9]));
        assert_eq!((segs[2].address, segs[2].data.clone()), (0x0001_0010, vec![0xAA]));
    }

    #[test]
    fn ihex_errors_name_line_and_problem() {
        let good = hex_record(0, 0, &[1, 2, 3, 4]);
        let eof = hex_record(1, 0, &[]);
        let check = |text: String, want: &str| {
            let e = load_ihex(&text, "app.hex").unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        };
        let mut bad_sum = good.clone();
        bad_sum.replace_range(bad_sum.len() - 2.., "00");
        check(format!("{good}\n{bad_sum}\n{eof}"), "app.hex line 2: checksum mismatch: record has 0x00, computed 0xF2");
        check(format!("{good}\n0000000001FF\n{eof}"), "line 2: record does not start with ':'");
        check(format!(":0000000G01FF\n{eof}"), "line 1: character 9 of the record is not a hexadecimal digit: 'G'");
        check(format!(":000000001\n{eof}"), "line 1: odd number of hex digits");
        check(format!(":0000\n{eof}"), "line 1: record too short");
        check(format!(":05000000FB\n{eof}"), "byte count field says 5 data bytes but the record holds 0");
        check(format!("{}\n{eof}", hex_record(6, 0, &[])), "line 1: unknown record type 0x06");
        check(
            format!("{}\n{eof}", hex_record(4, 0, &[1])),
            "extended linear address (04) record must hold 2 data bytes, holds 1",
        );
        check(good.clone(), "app.hex: no end-of-file record");
        check(format!("{eof}\n{good}"), "line 2: record after the end-of-file record on line 1");
        check(eof.clone(), "app.hex: no data records");
        check(
            format!("{}\n{}\n{eof}", hex_record(4, 0, &[0xFF, 0xFF]), hex_record(0, 0xFFFF, &[1, 2])),
            "line 2: data [0xFFFFFFFF..0x100000001) extends past 4 GiB",
        );
    }

    #[test]
    fn load_input_detects_formats() {
        let dir = tempfile::tempdir().unwrap();
        let elf_path = dir.path().join("fw.out");
        std::fs::write(&elf_path, build_elf(false, &[load(0x0800_0000, &[7; 16])])).unwrap();
        let hex_path = dir.path().join("app.hex");
        std::fs::write(&hex_path, format!("{}\n{}\n", hex_record(0, 0, &[1]), hex_record(1, 0, &[]))).unwrap();
        let bin_path = dir.path().join("blob.bin");
        std::fs::write(&bin_path, [9u8; 5]).unwrap();

        let segs = load_input(elf_path.to_str().unwrap()).unwrap();
        assert_eq!(segs[0].data, vec![7; 16]);
        let segs = load_input(hex_path.to_str().unwrap()).unwrap();
        assert_eq!(segs[0].data, vec![1]);
        let spec = format!("{}@0x08040000", bin_path.display());
        let segs = load_input(&spec).unwrap();
        assert_eq!(segs[0].address, 0x0804_0000);
        assert_eq!(segs[0].source, bin_path.display().to_string());
        let segs = load_input(&format!("{}@4096", bin_path.display())).unwrap();
        assert_eq!(segs[0].address, 4096);

        let e = load_input(bin_path.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("file.bin@0x08000000"), "{e}");
        let e = load_input(&format!("{}@0x1zz", bin_path.display())).unwrap_err().to_string();
        assert!(e.contains("address \"0x1zz\" is not a 32-bit number"), "{e}");
        let e = load_input("/nonexistent/fw.elf").unwrap_err().to_string();
        assert!(e.starts_with("cannot read /nonexistent/fw.elf:"), "{e}");
    }

    fn seg(address: u32, data: &[u8], source: &str) -> Segment {
        Segment { address, data: data.to_vec(), source: source.into() }
    }

    #[test]
    fn layout_refuses_overlap_naming_both() {
        let e = layout(
            vec![seg(0x0800_0010, &[0; 16], "b.bin"), seg(0x0800_0000, &[0; 0x20], "fw.elf segment 0")],
            l4(),
            4096,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "fw.elf segment 0 [0x08000000..0x08000020) overlaps b.bin [0x08000010..0x08000020)");
        // A segment nested in a long one and a later one that overlaps the long one.
        let e = layout(vec![seg(0x0800_0000, &[0; 0x100], "long"), seg(0x0800_0000, &[0; 0x10], "short")], l4(), 4096)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("short [0x08000000..0x08000010) overlaps long"), "{e}");
    }

    #[test]
    fn layout_refuses_outside_flash() {
        let e = layout(vec![seg(0x0807_FFFC, &[0; 8], "x.bin")], l4(), 4096).unwrap_err().to_string();
        assert_eq!(
            e,
            "x.bin [0x0807FFFC..0x08080004) lies outside the flash of STM32L4 (L462) [0x08000000..0x08080000)"
        );
        assert!(layout(vec![seg(0x2000_0000, &[0], "ram")], l4(), 4096).is_err());
        let e = layout(vec![seg(0x0800_0000, &[0], "a")], l4(), 7).unwrap_err().to_string();
        assert_eq!(e, "maximum area size 7 bytes is smaller than the program word of STM32L4 (L462) (8 bytes)");
    }

    #[test]
    fn layout_pads_merges_and_splits() {
        // Two segments sharing a program word merge; the gap is 0xFF.
        let areas = layout(
            vec![seg(0x0800_0003, &[1, 2], "a"), seg(0x0800_0009, &[3], "b"), seg(0x0800_0100, &[4; 20], "c")],
            l4(),
            16,
        )
        .unwrap();
        let got: Vec<(u32, Vec<u8>)> = areas.iter().map(|a| (a.address, a.data.clone())).collect();
        let mut first = vec![0xFF; 16];
        first[3] = 1;
        first[4] = 2;
        first[9] = 3;
        let mut third = vec![0xFF; 8];
        third[..4].copy_from_slice(&[4; 4]);
        assert_eq!(got, vec![(0x0800_0000, first), (0x0800_0100, vec![4; 16]), (0x0800_0110, third),]);
        assert!(areas.iter().all(|a| a.area_type == AreaType::Firmware));
        // max_area that is not a word multiple is rounded down.
        let areas = layout(vec![seg(0x0800_0000, &[5; 40], "a")], l4(), 20).unwrap();
        assert_eq!(areas.iter().map(|a| a.data.len()).collect::<Vec<_>>(), vec![16, 16, 8]);
        assert!(layout(vec![], l4(), 16).unwrap().is_empty());
    }

    #[test]
    fn option_bytes_csv() {
        let text = "# option bytes\nid,value\nRDP,0xBB\n1, 0xFFEFF8AA # user\n\nflash_wrp1ar,4278255615\n";
        let area = parse_option_bytes_csv(text, l4()).unwrap();
        assert_eq!(area.area_type, AreaType::Config);
        assert_eq!(area.address, 0);
        let mut want = Vec::new();
        for (id, v) in [(0u32, 0xBBu32), (1, 0xFFEF_F8AA), (2, 4_278_255_615)] {
            want.extend_from_slice(&id.to_le_bytes());
            want.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(area.data, want);
        let check = |text: &str, want: &str| {
            let e = parse_option_bytes_csv(text, l4()).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        };
        check("RDP,0xBB\nRDP,0xAA", "line 2: option byte RDP (id 0) set twice");
        check("FOO,1", "line 1: unknown option byte \"FOO\" for STM32L4 (L462); known: RDP (0), FLASH_OPTR (1)");
        check("9,1", "unknown option byte \"9\"");
        check("RDP,0x1BB", "RDP is one byte");
        check("RDP,banana", "value \"banana\" for RDP is not a 32-bit number");
        check("RDP", "line 1: expected two fields");
        check("# nothing\n", "line 0: no option-byte records");
        // STM32H7: ST's positional layout, nine words, defaults for what the CSV does not name, RDP
        // folded into OPTSR bits 15:8 (profile v1.1 §2).
        let h7 =
            parse_option_bytes_csv("FLASH_OPTSR_PRG,0x1FFEAAF0\nRDP,0xBB\nBOOT,0x12345678", Family::Stm32H7.profile())
                .unwrap();
        assert_eq!(h7.data.len(), 36);
        let word = |i: usize| u32::from_le_bytes(h7.data[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(word(0), 0x1FFE_BBF0, "RDP in OPTSR bits 15:8");
        assert_eq!(word(5), 0x1234_5678, "BOOT is the sixth word");
        assert_eq!(word(8), 0x0000_00FF, "WPSN2 keeps its default");
        let e = parse_option_bytes_csv("USER,1", Family::Stm32H7.profile()).unwrap_err().to_string();
        assert!(e.contains("known, in the order Flashgate assumes: FLASH_OPTSR, FLASH_OPTCCR"), "{e}");
    }

    proptest! {
        #[test]
        fn layout_is_aligned_disjoint_and_lossless(
            raw in proptest::collection::vec((0u32..4096, proptest::collection::vec(any::<u8>(), 1..64)), 0..12),
            max_area in 8u32..200,
            family_ix in 0usize..4,
        ) {
            let family = Family::ALL[family_ix].profile();
            // Make segments disjoint by placing them one after another with random gaps.
            let mut at = u64::from(family.flash_base);
            let mut segments = Vec::new();
            for (i, (gap, data)) in raw.into_iter().enumerate() {
                at += u64::from(gap % 97);
                segments.push(Segment { address: at as u32, data: data.clone(), source: format!("s{i}") });
                at += data.len() as u64;
            }
            let result = layout(segments.clone(), family, max_area);
            let word = u64::from(family.program_word);
            if u64::from(max_area) < word {
                prop_assert!(result.is_err());
                return Ok(());
            }
            let areas = result.unwrap();
            let limit = u64::from(max_area) / word * word;
            let mut prev_end = 0u64;
            for a in &areas {
                let start = u64::from(a.address);
                prop_assert_eq!(start % word, 0);
                prop_assert_eq!(a.data.len() as u64 % word, 0);
                prop_assert!(!a.data.is_empty());
                prop_assert!(a.data.len() as u64 <= limit);
                prop_assert!(start >= prev_end, "areas overlap or are unsorted");
                prop_assert!(family.flash_contains(a.address, a.data.len() as u64));
                prev_end = start + a.data.len() as u64;
            }
            // Every input byte is present; every other byte in the areas is padding 0xFF.
            let mut covered = std::collections::BTreeMap::new();
            for s in &segments {
                for (i, b) in s.data.iter().enumerate() {
                    covered.insert(u64::from(s.address) + i as u64, *b);
                }
            }
            let mut found = 0usize;
            for a in &areas {
                for (i, b) in a.data.iter().enumerate() {
                    match covered.get(&(u64::from(a.address) + i as u64)) {
                        Some(want) => { prop_assert_eq!(b, want); found += 1; }
                        None => prop_assert_eq!(*b, 0xFF),
                    }
                }
            }
            prop_assert_eq!(found, covered.len());
        }

        #[test]
        fn ihex_round_trips_with_ihex_crate(
            address in 0x0800_0000u32..0x0807_0000,
            data in proptest::collection::vec(any::<u8>(), 1..700),
        ) {
            let mut records = Vec::new();
            let mut upper = None;
            let mut done = 0usize;
            while done < data.len() {
                let abs = address + done as u32;
                if upper != Some(abs >> 16) {
                    upper = Some(abs >> 16);
                    records.push(ihex::Record::ExtendedLinearAddress((abs >> 16) as u16));
                }
                let room = 0x1_0000 - (abs & 0xFFFF) as usize;
                let n = 16.min(room).min(data.len() - done);
                records.push(ihex::Record::Data { offset: abs as u16, value: data[done..done + n].to_vec() });
                done += n;
            }
            records.push(ihex::Record::EndOfFile);
            let text = ihex::create_object_file_representation(&records).unwrap();
            let segs = load_ihex(&text, "p.hex").unwrap();
            let joined: Vec<u8> = segs.iter().flat_map(|s| s.data.clone()).collect();
            prop_assert_eq!(segs[0].address, address);
            prop_assert_eq!(joined, data);
        }

        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = load_elf(&bytes, "f");
            let mut elfish = ELF_MAGIC.to_vec();
            elfish.extend_from_slice(&bytes);
            let _ = load_elf(&elfish, "f");
            let _ = load_ihex(&String::from_utf8_lossy(&bytes), "f");
        }
    }
}
