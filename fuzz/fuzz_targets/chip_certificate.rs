//! Fuzz chip certificate parsing and verification against a fixed vendor CA key (the profile's
//! test vector CA): never a panic, and nothing but the genuine vector certificate may verify.

#![no_main]

use flashgate_common::cert::{ChipCertificate, VendorCaPublicKey};
use libfuzzer_sys::fuzz_target;

/// `vendor_ca_public_xy` of `shared/spec/vectors/sfi-profile-v1.json`.
const VENDOR_CA_XY: &str = "231d88b29381c9cf7d2f3fb5f57398b4223af115a144f6222d69a8623a19acab\
                            f2289a33a715edde604d1a4aeca666ee22e1449f4213f50c96a97f3885d4b255";

/// Decode a hex constant (no dependency beyond the crates under test).
fn unhex<const N: usize>(s: &str) -> [u8; N] {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    assert_eq!(digits.len(), 2 * N, "hex constant length");
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8).unwrap_or(0);
    std::array::from_fn(|i| nibble(digits[2 * i]) << 4 | nibble(digits[2 * i + 1]))
}

fuzz_target!(|data: &[u8]| {
    let ca = VendorCaPublicKey::from_xy(unhex(VENDOR_CA_XY)).expect("vector CA key");
    let Ok(cert) = ChipCertificate::parse(data) else {
        assert_ne!(data.len(), 136);
        return;
    };
    assert_eq!(cert.to_bytes().as_slice(), data);
    let _ = cert.device_id();
    let _ = cert.chip_public_key();
    if cert.verify(std::slice::from_ref(&ca)).is_ok() {
        // A verified certificate always carries a usable chip key.
        assert!(cert.chip_public_key().is_ok());
    }
});
