//! Internal flash of one simulated STM32 with the semantics of the real part, per family profile:
//! erased bytes read `0xFF`, programming works in `program_word`-sized words and only into words
//! that are still erased (anything else is a flash error, as with the ECC-protected flash of the
//! L4/L5/WL/H7), erasing works per page (sector) or on the whole array. Every operation returns the
//! modelled duration from the family's datasheet timings; the caller decides how to spend it.

use std::time::Duration;

use flashgate_common::family::FamilyProfile;

/// Value of an erased flash byte.
pub const ERASED: u8 = 0xFF;

/// A flash operation the array refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlashError {
    /// The range does not lie inside internal flash.
    #[error("flash range 0x{address:08X}+{len} lies outside flash 0x{base:08X}..0x{end:08X}")]
    OutOfRange {
        /// First address of the range.
        address: u32,
        /// Length of the range in bytes.
        len: u64,
        /// First flash address.
        base: u32,
        /// One past the last flash address.
        end: u64,
    },
    /// A program operation touched a word that was not erased.
    #[error("flash word at 0x{address:08X} ({word} bytes) is not erased; erase its page first")]
    NotErased {
        /// Address of the offending program word.
        address: u32,
        /// Program word size in bytes.
        word: u32,
    },
    /// A page number beyond the last page.
    #[error("flash page {page} does not exist (the flash has {pages} pages)")]
    PageOutOfRange {
        /// The requested page.
        page: u32,
        /// Number of pages of the array.
        pages: u32,
    },
    /// A stored flash image does not have the size of the family's flash.
    #[error("flash image has {found} bytes, the family's flash has {expected}")]
    ImageSize {
        /// The family's flash size.
        expected: usize,
        /// Size of the offered image.
        found: usize,
    },
}

/// The flash array of one device.
#[derive(Clone)]
pub struct Flash {
    profile: &'static FamilyProfile,
    data: Vec<u8>,
    /// Byte range outside which the array is known to be erased (`None`: all erased); keeps
    /// `is_erased` cheap on large arrays.
    dirty: Option<(usize, usize)>,
}

impl PartialEq for Flash {
    fn eq(&self, other: &Self) -> bool {
        self.profile.family == other.profile.family && self.data == other.data
    }
}

impl Eq for Flash {}

impl std::fmt::Debug for Flash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flash")
            .field("family", &self.profile.family)
            .field("size", &self.data.len())
            .field("erased", &self.is_erased())
            .finish()
    }
}

impl Flash {
    /// A factory-fresh (fully erased) flash of the family.
    pub fn new(profile: &'static FamilyProfile) -> Self {
        Flash { profile, data: vec![ERASED; profile.flash_size as usize], dirty: None }
    }

    /// A flash holding a previously saved image (exactly `flash_size` bytes).
    pub fn from_image(profile: &'static FamilyProfile, data: Vec<u8>) -> Result<Self, FlashError> {
        if data.len() != profile.flash_size as usize {
            return Err(FlashError::ImageSize { expected: profile.flash_size as usize, found: data.len() });
        }
        let first = data.iter().position(|b| *b != ERASED);
        let last = data.iter().rposition(|b| *b != ERASED);
        let dirty = first.zip(last).map(|(f, l)| (f, l + 1));
        Ok(Flash { profile, data, dirty })
    }

    /// The family profile the array follows.
    pub fn profile(&self) -> &'static FamilyProfile {
        self.profile
    }

    /// The whole array, from `flash_base`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    /// Whether `[address, address + len)` lies inside the array.
    pub fn contains(&self, address: u32, len: u64) -> bool {
        self.profile.flash_contains(address, len)
    }

    fn check_range(&self, address: u32, len: u64) -> Result<usize, FlashError> {
        if !self.contains(address, len) {
            return Err(FlashError::OutOfRange {
                address,
                len,
                base: self.profile.flash_base,
                end: self.profile.flash_end(),
            });
        }
        Ok((address - self.profile.flash_base) as usize)
    }

    /// Read `len` bytes at `address`.
    pub fn read(&self, address: u32, len: usize) -> Result<&[u8], FlashError> {
        let start = self.check_range(address, len as u64)?;
        Ok(&self.data[start..start + len])
    }

    /// Program `data` at `address`. Every program word the range touches must be erased (bytes of
    /// a touched word outside the range stay `0xFF` but the word counts as programmed). Nothing is
    /// written when any word is not erased. Returns the modelled programming time.
    pub fn program(&mut self, address: u32, data: &[u8]) -> Result<Duration, FlashError> {
        if data.is_empty() {
            return Ok(Duration::ZERO);
        }
        let start = self.check_range(address, data.len() as u64)?;
        let word = self.profile.program_word as usize;
        let first_word = start / word * word;
        let end_word = (start + data.len()).div_ceil(word) * word;
        for w in (first_word..end_word).step_by(word) {
            if self.data[w..w + word].iter().any(|b| *b != ERASED) {
                return Err(FlashError::NotErased {
                    address: self.profile.flash_base + w as u32,
                    word: self.profile.program_word,
                });
            }
        }
        self.data[start..start + data.len()].copy_from_slice(data);
        self.mark_dirty(start, start + data.len());
        let words = ((end_word - first_word) / word) as u32;
        Ok(self.profile.word_program_time * words)
    }

    fn mark_dirty(&mut self, start: usize, end: usize) {
        self.dirty = Some(match self.dirty {
            None => (start, end),
            Some((s, e)) => (s.min(start), e.max(end)),
        });
    }

    /// Number of pages of the array.
    pub fn page_count(&self) -> u32 {
        self.profile.page_count()
    }

    /// Erase the listed pages (all are checked before any is erased). Returns the modelled time.
    pub fn erase_pages(&mut self, pages: &[u32]) -> Result<Duration, FlashError> {
        let count = self.page_count();
        if let Some(&page) = pages.iter().find(|p| **p >= count) {
            return Err(FlashError::PageOutOfRange { page, pages: count });
        }
        let size = self.profile.page_size as usize;
        for &page in pages {
            let start = page as usize * size;
            self.data[start..start + size].fill(ERASED);
        }
        Ok(self.profile.page_erase_time * pages.len() as u32)
    }

    /// Erase `count` consecutive pages from `first`.
    pub fn erase_page_range(&mut self, first: u32, count: u32) -> Result<Duration, FlashError> {
        let pages: Vec<u32> = (first..first.saturating_add(count)).collect();
        self.erase_pages(&pages)
    }

    /// Erase the whole array. Returns the modelled time.
    pub fn mass_erase(&mut self) -> Duration {
        if let Some((s, e)) = self.dirty.take() {
            self.data[s..e].fill(ERASED);
        }
        self.profile.mass_erase_time
    }

    /// Whether every byte is erased.
    pub fn is_erased(&self) -> bool {
        match self.dirty {
            None => true,
            Some((s, e)) => self.data[s..e].iter().all(|b| *b == ERASED),
        }
    }

    /// CRC-32 (IEEE, as `crc32fast`) of the whole array.
    pub fn crc32(&self) -> u32 {
        crc32fast::hash(&self.data)
    }

    /// The page holding `address`, if inside flash.
    pub fn page_of(&self, address: u32) -> Option<u32> {
        self.contains(address, 1).then(|| (address - self.profile.flash_base) / self.profile.page_size)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use flashgate_common::family::Family;

    fn l4() -> Flash {
        Flash::new(Family::Stm32L4.profile())
    }

    #[test]
    fn fresh_flash_is_erased() {
        let f = l4();
        assert_eq!(f.as_bytes().len(), 512 * 1024);
        assert!(f.is_erased());
        assert_eq!(f.read(0x0800_0000, 4).unwrap(), &[0xFF; 4]);
    }

    #[test]
    fn program_then_reprogram_fails() {
        let mut f = l4();
        let t = f.program(0x0800_0000, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert_eq!(t, Duration::from_micros(82));
        assert_eq!(f.read(0x0800_0000, 8).unwrap(), &[1, 2, 3, 4, 5, 6, 7, 8]);
        let err = f.program(0x0800_0000, &[0; 8]).unwrap_err();
        assert_eq!(err, FlashError::NotErased { address: 0x0800_0000, word: 8 });
        // A partial word counts as programmed: the other half cannot be written afterwards.
        f.program(0x0800_0008, &[9, 9, 9, 9]).unwrap();
        assert_eq!(f.read(0x0800_0008, 8).unwrap(), &[9, 9, 9, 9, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert!(matches!(
            f.program(0x0800_000C, &[1, 1, 1, 1]),
            Err(FlashError::NotErased { address: 0x0800_0008, .. })
        ));
    }

    #[test]
    fn failed_program_writes_nothing() {
        let mut f = l4();
        f.program(0x0800_0010, &[0; 8]).unwrap();
        let before = f.clone();
        assert!(f.program(0x0800_0000, &[0xAB; 24]).is_err());
        assert_eq!(f, before);
    }

    #[test]
    fn range_checks() {
        let mut f = l4();
        assert!(matches!(f.program(0x0807_FFFC, &[0; 8]), Err(FlashError::OutOfRange { .. })));
        assert!(f.read(0x0808_0000, 1).is_err());
        assert!(f.read(0x07FF_FFFF, 1).is_err());
        assert_eq!(f.erase_pages(&[256]), Err(FlashError::PageOutOfRange { page: 256, pages: 256 }));
    }

    #[test]
    fn erase_page_and_mass_erase_with_timings() {
        let mut f = l4();
        f.program(0x0800_0800, &[0x11; 16]).unwrap();
        f.program(0x0800_1000, &[0x22; 16]).unwrap();
        let t = f.erase_pages(&[1]).unwrap();
        assert_eq!(t, Duration::from_millis(22));
        assert_eq!(f.read(0x0800_0800, 16).unwrap(), &[0xFF; 16]);
        assert_eq!(f.read(0x0800_1000, 16).unwrap(), &[0x22; 16]);
        assert_eq!(f.page_of(0x0800_1000), Some(2));
        // Programming works again after the erase.
        f.program(0x0800_0800, &[0x33; 8]).unwrap();
        assert_eq!(f.mass_erase(), Duration::from_millis(22));
        assert!(f.is_erased());
        assert_eq!(f.crc32(), crc32fast::hash(&vec![0xFF; 512 * 1024]));
    }

    #[test]
    fn h7_words_are_32_bytes() {
        let mut f = Flash::new(Family::Stm32H7.profile());
        let t = f.program(0x0800_0000, &[0; 64]).unwrap();
        assert_eq!(t, Duration::from_micros(200));
        assert_eq!(f.erase_pages(&[0, 1]).unwrap(), Duration::from_secs(2));
        assert!(Flash::from_image(Family::Stm32H7.profile(), vec![0; 10]).is_err());
    }
}
