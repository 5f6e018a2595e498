//! Family profiles of the SFI profile v1 §6: product ids, bootloader PIDs, flash geometry and
//! timings, and the option-byte record ids a `C` area may carry. The simulator models a device from
//! its profile; the packer and the image reader check addresses against it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// An option-byte record a `C` (configuration) area may set: `u32 id, u32 value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionByteDef {
    /// Record id as stored in the `C` area.
    pub id: u32,
    /// Register or field name, for people.
    pub name: &'static str,
    /// Value of an erased / factory-fresh device.
    pub default: u32,
}

/// Option-byte id 0: the readout-protection level byte (`0xAA` level 0, `0xCC` level 2, else level 1).
pub const OPTION_RDP: u32 = 0;
/// Option-byte id 1: the user option word (FLASH_OPTR / FLASH_OPTSR), written as a whole.
pub const OPTION_USER: u32 = 1;
/// Option-byte id 2: write protection, area A.
pub const OPTION_WRP_A: u32 = 2;
/// Option-byte id 3: write protection, area B.
pub const OPTION_WRP_B: u32 = 3;

/// Option-byte ids of the STM32H7 registers beyond the four every family has (model ids of the
/// simulator; in an H7 image they travel positionally, see [`ConfigLayout::Positional`]).
pub const OPTION_H7_OPTCCR: u32 = 4;
/// See [`OPTION_H7_OPTCCR`].
pub const OPTION_H7_PRAR1: u32 = 5;
/// See [`OPTION_H7_OPTCCR`].
pub const OPTION_H7_SCAR1: u32 = 6;
/// See [`OPTION_H7_OPTCCR`].
pub const OPTION_H7_BOOT: u32 = 7;
/// See [`OPTION_H7_OPTCCR`].
pub const OPTION_H7_PRAR2: u32 = 8;
/// See [`OPTION_H7_OPTCCR`].
pub const OPTION_H7_SCAR2: u32 = 9;

/// How a family's `C` (configuration) area lays out its option words (profile v1.1 §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigLayout {
    /// Flashgate's: records `u32 id, u32 value` (size a multiple of 8), ids from the family's
    /// [`FamilyProfile::option_bytes`].
    Pairs,
    /// ST's: the family's option registers in this order, one `u32` each, all of them (the size is
    /// exactly `4 ×` their number). Each word's `id` is the option byte it sets in the model.
    Positional(&'static [OptionByteDef]),
}

impl ConfigLayout {
    /// Size in bytes a `C` area of this layout must have: `Some(n)` for exactly `n`, `None` for a
    /// multiple of 8.
    pub fn exact_size(&self) -> Option<u32> {
        match self {
            Self::Pairs => None,
            Self::Positional(words) => Some(words.len() as u32 * 4),
        }
    }

    /// The option bytes a `C` area's plaintext sets, as `(id, value)`; `None` when its size does not
    /// fit the layout. Positional: the RDP byte is bits 15:8 of the first word (H7's OPTSR).
    pub fn records(&self, plain: &[u8]) -> Option<Vec<(u32, u32)>> {
        let word = |c: &[u8]| u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        match self {
            Self::Pairs => {
                if !plain.len().is_multiple_of(8) {
                    return None;
                }
                Some(plain.chunks_exact(8).map(|r| (word(&r[..4]), word(&r[4..]))).collect())
            }
            Self::Positional(words) => {
                if plain.len() != words.len() * 4 {
                    return None;
                }
                let mut out: Vec<(u32, u32)> =
                    words.iter().zip(plain.chunks_exact(4)).map(|(d, c)| (d.id, word(c))).collect();
                if let Some(&(id, optsr)) = out.first()
                    && id == OPTION_USER
                {
                    out.push((OPTION_RDP, (optsr >> 8) & 0xFF));
                }
                Some(out)
            }
        }
    }
}

/// RDP byte value for level 0 (no protection).
pub const RDP_LEVEL0: u8 = 0xAA;
/// RDP byte value the simulator uses for level 1.
pub const RDP_LEVEL1: u8 = 0xBB;
/// RDP byte value for level 2 (permanent).
pub const RDP_LEVEL2: u8 = 0xCC;

/// Everything the simulator, packer and reader need to know about one STM32 family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyProfile {
    /// Which family this is.
    pub family: Family,
    /// Marketing name with the reference part, e.g. `STM32L4 (L462)`.
    pub display_name: &'static str,
    /// ST's public SFI product id, 8 ASCII characters.
    pub product_id: [u8; 8],
    /// Bootloader PID answered to Get ID.
    pub pid: u16,
    /// First address of internal flash.
    pub flash_base: u32,
    /// Size of internal flash in bytes.
    pub flash_size: u32,
    /// Erase granule (page or sector) in bytes.
    pub page_size: u32,
    /// Programming granule in bytes: only an erased word may be programmed.
    pub program_word: u32,
    /// Time to program one word.
    pub word_program_time: Duration,
    /// Time to erase one page or sector.
    pub page_erase_time: Duration,
    /// Time of a mass erase of the whole flash.
    pub mass_erase_time: Duration,
    /// Option-byte records a `C` area may set.
    pub option_bytes: &'static [OptionByteDef],
    /// How this family's `C` area lays out its words.
    pub config_layout: ConfigLayout,
}

const L4_OPTIONS: &[OptionByteDef] = &[
    OptionByteDef { id: OPTION_RDP, name: "RDP", default: RDP_LEVEL0 as u32 },
    OptionByteDef { id: OPTION_USER, name: "FLASH_OPTR", default: 0xFFEF_F8AA },
    OptionByteDef { id: OPTION_WRP_A, name: "FLASH_WRP1AR", default: 0xFF00_FFFF },
    OptionByteDef { id: OPTION_WRP_B, name: "FLASH_WRP1BR", default: 0xFF00_FFFF },
];

const L5_OPTIONS: &[OptionByteDef] = &[
    OptionByteDef { id: OPTION_RDP, name: "RDP", default: RDP_LEVEL0 as u32 },
    OptionByteDef { id: OPTION_USER, name: "FLASH_OPTR", default: 0x1FEF_F8AA },
    OptionByteDef { id: OPTION_WRP_A, name: "FLASH_WRP1AR", default: 0xFF80_FFFF },
    OptionByteDef { id: OPTION_WRP_B, name: "FLASH_WRP1BR", default: 0xFF80_FFFF },
];

const H7_OPTIONS: &[OptionByteDef] = &[
    OptionByteDef { id: OPTION_RDP, name: "RDP", default: RDP_LEVEL0 as u32 },
    OptionByteDef { id: OPTION_USER, name: "FLASH_OPTSR", default: 0x1FFE_AAF0 },
    OptionByteDef { id: OPTION_WRP_A, name: "FLASH_WPSN1R", default: 0x0000_00FF },
    OptionByteDef { id: OPTION_WRP_B, name: "FLASH_WPSN2R", default: 0x0000_00FF },
    OptionByteDef { id: OPTION_H7_OPTCCR, name: "FLASH_OPTCCR", default: 0 },
    OptionByteDef { id: OPTION_H7_PRAR1, name: "FLASH_PRAR1", default: 0x0000_00FF },
    OptionByteDef { id: OPTION_H7_SCAR1, name: "FLASH_SCAR1", default: 0x0000_00FF },
    OptionByteDef { id: OPTION_H7_BOOT, name: "FLASH_BOOT", default: 0x1FF0_0800 },
    OptionByteDef { id: OPTION_H7_PRAR2, name: "FLASH_PRAR2", default: 0x0000_00FF },
    OptionByteDef { id: OPTION_H7_SCAR2, name: "FLASH_SCAR2", default: 0x0000_00FF },
];

/// The STM32H7 `C` area as ST's tools write it: nine words. ST does not publish their order; this is
/// the order Flashgate assumes (profile v1.1 §2): OPTSR, OPTCCR, PRAR1, SCAR1, WPSN1, BOOT, PRAR2,
/// SCAR2, WPSN2 (the `_PRG` registers; RDP in bits 15:8 of OPTSR).
const H7_POSITIONAL: &[OptionByteDef] = &[
    OptionByteDef { id: OPTION_USER, name: "FLASH_OPTSR", default: 0x1FFE_AAF0 },
    OptionByteDef { id: OPTION_H7_OPTCCR, name: "FLASH_OPTCCR", default: 0 },
    OptionByteDef { id: OPTION_H7_PRAR1, name: "FLASH_PRAR1", default: 0x0000_00FF },
    OptionByteDef { id: OPTION_H7_SCAR1, name: "FLASH_SCAR1", default: 0x0000_00FF },
    OptionByteDef { id: OPTION_WRP_A, name: "FLASH_WPSN1R", default: 0x0000_00FF },
    OptionByteDef { id: OPTION_H7_BOOT, name: "FLASH_BOOT", default: 0x1FF0_0800 },
    OptionByteDef { id: OPTION_H7_PRAR2, name: "FLASH_PRAR2", default: 0x0000_00FF },
    OptionByteDef { id: OPTION_H7_SCAR2, name: "FLASH_SCAR2", default: 0x0000_00FF },
    OptionByteDef { id: OPTION_WRP_B, name: "FLASH_WPSN2R", default: 0x0000_00FF },
];

const WL_OPTIONS: &[OptionByteDef] = &[
    OptionByteDef { id: OPTION_RDP, name: "RDP", default: RDP_LEVEL0 as u32 },
    OptionByteDef { id: OPTION_USER, name: "FLASH_OPTR", default: 0x3FEF_F0AA },
    OptionByteDef { id: OPTION_WRP_A, name: "FLASH_WRP1AR", default: 0xFF80_FFFF },
    OptionByteDef { id: OPTION_WRP_B, name: "FLASH_WRP1BR", default: 0xFF80_FFFF },
];

static L4: FamilyProfile = FamilyProfile {
    family: Family::Stm32L4,
    display_name: "STM32L4 (L462)",
    product_id: *b"46201002",
    pid: 0x462,
    flash_base: 0x0800_0000,
    flash_size: 512 * 1024,
    page_size: 2 * 1024,
    program_word: 8,
    word_program_time: Duration::from_micros(82),
    page_erase_time: Duration::from_millis(22),
    mass_erase_time: Duration::from_millis(22),
    option_bytes: L4_OPTIONS,
    config_layout: ConfigLayout::Pairs,
};

static H7: FamilyProfile = FamilyProfile {
    family: Family::Stm32H7,
    display_name: "STM32H7 (H753)",
    product_id: *b"45002001",
    pid: 0x450,
    flash_base: 0x0800_0000,
    flash_size: 2 * 1024 * 1024,
    page_size: 128 * 1024,
    program_word: 32,
    word_program_time: Duration::from_micros(100),
    page_erase_time: Duration::from_secs(1),
    mass_erase_time: Duration::from_secs(2),
    option_bytes: H7_OPTIONS,
    config_layout: ConfigLayout::Positional(H7_POSITIONAL),
};

static L5: FamilyProfile = FamilyProfile {
    family: Family::Stm32L5,
    display_name: "STM32L5 (L552)",
    product_id: *b"47201003",
    pid: 0x472,
    flash_base: 0x0800_0000,
    flash_size: 512 * 1024,
    page_size: 2 * 1024,
    program_word: 8,
    word_program_time: Duration::from_micros(82),
    page_erase_time: Duration::from_millis(22),
    mass_erase_time: Duration::from_millis(22),
    option_bytes: L5_OPTIONS,
    config_layout: ConfigLayout::Pairs,
};

static WL: FamilyProfile = FamilyProfile {
    family: Family::Stm32Wl,
    display_name: "STM32WL (WL55)",
    product_id: *b"49701005",
    pid: 0x497,
    flash_base: 0x0800_0000,
    flash_size: 256 * 1024,
    page_size: 2 * 1024,
    program_word: 8,
    word_program_time: Duration::from_micros(82),
    page_erase_time: Duration::from_millis(22),
    mass_erase_time: Duration::from_millis(22),
    option_bytes: WL_OPTIONS,
    config_layout: ConfigLayout::Pairs,
};

/// The four STM32 families of the profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// STM32L4 (L462).
    Stm32L4,
    /// STM32H7 (H753).
    Stm32H7,
    /// STM32L5 (L552).
    Stm32L5,
    /// STM32WL (WL55).
    Stm32Wl,
}

/// A family name, product id or PID that names no family of the profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown STM32 family {0:?} (expected one of stm32l4, stm32h7, stm32l5, stm32wl)")]
pub struct UnknownFamily(pub String);

impl Family {
    /// Every family of the profile.
    pub const ALL: [Family; 4] = [Family::Stm32L4, Family::Stm32H7, Family::Stm32L5, Family::Stm32Wl];

    /// The family's profile.
    pub fn profile(self) -> &'static FamilyProfile {
        match self {
            Family::Stm32L4 => &L4,
            Family::Stm32H7 => &H7,
            Family::Stm32L5 => &L5,
            Family::Stm32Wl => &WL,
        }
    }

    /// Lower-case command-line name, e.g. `stm32l4`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Stm32L4 => "stm32l4",
            Family::Stm32H7 => "stm32h7",
            Family::Stm32L5 => "stm32l5",
            Family::Stm32Wl => "stm32wl",
        }
    }

    /// The family whose SFI product id this is.
    pub fn from_product_id(product_id: &[u8; 8]) -> Option<Family> {
        Self::ALL.into_iter().find(|f| &f.profile().product_id == product_id)
    }

    /// The family whose bootloader answers Get ID with this PID.
    pub fn from_pid(pid: u16) -> Option<Family> {
        Self::ALL.into_iter().find(|f| f.profile().pid == pid)
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Family {
    type Err = UnknownFamily;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|f| f.name() == lower || f.name().trim_start_matches("stm32") == lower)
            .ok_or_else(|| UnknownFamily(s.to_string()))
    }
}

impl FamilyProfile {
    /// One past the last flash address.
    pub fn flash_end(&self) -> u64 {
        u64::from(self.flash_base) + u64::from(self.flash_size)
    }

    /// Whether `[address, address + len)` lies inside internal flash.
    pub fn flash_contains(&self, address: u32, len: u64) -> bool {
        let start = u64::from(address);
        start >= u64::from(self.flash_base) && start + len <= self.flash_end()
    }

    /// Number of pages (erase granules) in flash.
    pub fn page_count(&self) -> u32 {
        self.flash_size / self.page_size
    }

    /// The option-byte definition with this record id.
    pub fn option_byte(&self, id: u32) -> Option<&'static OptionByteDef> {
        self.option_bytes.iter().find(|o| o.id == id)
    }

    /// Product id as text (it is ASCII by construction).
    pub fn product_id_str(&self) -> &str {
        std::str::from_utf8(&self.product_id).unwrap_or("????????")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        for f in Family::ALL {
            let p = f.profile();
            assert_eq!(Family::from_product_id(&p.product_id), Some(f));
            assert_eq!(Family::from_pid(p.pid), Some(f));
            assert_eq!(f.name().parse::<Family>(), Ok(f));
            assert_eq!(p.flash_size % p.page_size, 0);
            assert_eq!(p.page_size % p.program_word, 0);
        }
        assert_eq!("L4".parse::<Family>(), Ok(Family::Stm32L4));
        assert!("stm32f4".parse::<Family>().is_err());
        let l4 = Family::Stm32L4.profile();
        assert!(l4.flash_contains(0x0800_0000, 512 * 1024));
        assert!(!l4.flash_contains(0x0800_0000, 512 * 1024 + 1));
        assert!(!l4.flash_contains(0x07FF_FFFF, 1));
        assert_eq!(l4.product_id_str(), "46201002");
    }

    /// docs/protocol.md's option-byte table names what `pack` accepts: the profiles' names.
    #[test]
    fn the_protocol_doc_names_the_option_bytes_as_pack_does() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md")).unwrap();
        let rows: Vec<Vec<String>> = doc
            .lines()
            .skip_while(|l| !l.starts_with("### Option-byte record ids"))
            .skip(1)
            // That section only: the next heading ends it.
            .take_while(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with("| ") && l.as_bytes().get(2).is_some_and(u8::is_ascii_digit))
            .map(|l| l.split('|').map(|c| c.trim().trim_matches('`').to_string()).collect())
            .take_while(|cells: &Vec<String>| cells.len() == 6)
            .collect();
        assert_eq!(rows.len(), 4, "the option-byte table of docs/protocol.md: {rows:?}");
        for row in &rows {
            let id: u32 = row[1].parse().unwrap();
            for (family, name) in [
                (Family::Stm32L4, &row[2]),
                (Family::Stm32L5, &row[2]),
                (Family::Stm32Wl, &row[2]),
                (Family::Stm32H7, &row[3]),
            ] {
                let def = family.profile().option_byte(id).unwrap();
                assert_eq!(def.name, name, "option byte {id} of {family} in docs/protocol.md");
            }
        }
    }
}
