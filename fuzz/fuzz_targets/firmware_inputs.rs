//! Fuzz the packer's firmware input parsers (`flashgate_common::firmware`): arbitrary bytes as an
//! ELF file and as Intel HEX text, and whatever they yield laid out for a family, plus the
//! option-byte CSV reader. Never a panic; a successful layout is sorted, disjoint, aligned to the
//! program word, within the area limit and inside flash, and keeps every input byte.
//!
//! The first input byte picks the family and the maximum area size; the rest is the file.

#![no_main]

use flashgate_common::family::Family;
use flashgate_common::firmware::{Segment, layout, load_elf, load_ihex, parse_option_bytes_csv};
use libfuzzer_sys::fuzz_target;

fn check_layout(segments: Vec<Segment>, family: Family, max_area: u32) {
    let profile = family.profile();
    let Ok(areas) = layout(segments.clone(), profile, max_area) else {
        return;
    };
    let word = u64::from(profile.program_word);
    let mut prev_end = 0u64;
    for a in &areas {
        let start = u64::from(a.address);
        let len = a.data.len() as u64;
        assert!(len > 0 && start % word == 0 && len % word == 0, "misaligned area");
        assert!(len <= u64::from(max_area), "area larger than the limit");
        assert!(start >= prev_end, "areas overlap or are unsorted");
        assert!(profile.flash_contains(a.address, len), "area outside flash");
        prev_end = start + len;
    }
    for s in &segments {
        for (i, b) in s.data.iter().enumerate() {
            let at = u64::from(s.address) + i as u64;
            let area = areas
                .iter()
                .find(|a| at >= u64::from(a.address) && at < u64::from(a.address) + a.data.len() as u64)
                .expect("every input byte lies in an area");
            assert_eq!(area.data[(at - u64::from(area.address)) as usize], *b, "byte changed");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, file)) = data.split_first() else {
        return;
    };
    let family = Family::ALL[usize::from(selector & 3)];
    let max_area = 8u32 << (selector >> 4);

    if let Ok(segments) = load_elf(file, "fuzz.elf") {
        assert!(segments.iter().all(|s| !s.data.is_empty() && s.end() <= 1 << 32));
        check_layout(segments, family, max_area);
    }
    let text = String::from_utf8_lossy(file);
    if let Ok(segments) = load_ihex(&text, "fuzz.hex") {
        assert!(segments.iter().all(|s| !s.data.is_empty() && s.end() <= 1 << 32));
        check_layout(segments, family, max_area);
    }
    if let Ok(area) = parse_option_bytes_csv(&text, family.profile()) {
        assert_eq!(area.address, 0);
        assert!(!area.data.is_empty() && area.data.len() % 8 == 0);
    }
});
