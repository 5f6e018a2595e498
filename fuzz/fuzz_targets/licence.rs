//! Fuzz licence parsing and opening with a fixed chip key (the profile's test vector chip):
//! never a panic; a licence for another product is always "wrong product".

#![no_main]

use flashgate_common::cert::ChipKey;
use flashgate_common::licence::{Licence, LicenceError, open_licence};
use libfuzzer_sys::fuzz_target;

/// `chip_private_scalar` of `shared/spec/vectors/sfi-profile-v1.json`.
const CHIP_SCALAR: &str = "0d56f4679d26c40ab8ac53db8ac78f4abbd0f7292abcd371c2e2c7ea18a3c5e8";
const PRODUCT_ID: [u8; 8] = *b"46201002";

/// Decode a hex constant (no dependency beyond the crates under test).
fn unhex<const N: usize>(s: &str) -> [u8; N] {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    assert_eq!(digits.len(), 2 * N, "hex constant length");
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8).unwrap_or(0);
    std::array::from_fn(|i| nibble(digits[2 * i]) << 4 | nibble(digits[2 * i + 1]))
}

fuzz_target!(|data: &[u8]| {
    let chip = ChipKey::from_scalar(unhex(CHIP_SCALAR)).expect("vector chip key");
    let Ok(licence) = Licence::parse(data) else {
        return;
    };
    assert_eq!(licence.to_bytes().as_slice(), data);
    match open_licence(&licence, &chip, &PRODUCT_ID) {
        Ok((_key, nonce)) => assert_eq!(nonce, licence.nonce),
        Err(LicenceError::WrongProduct { licence: theirs, device }) => {
            assert_ne!(theirs, PRODUCT_ID);
            assert_eq!(device, PRODUCT_ID);
        }
        Err(LicenceError::Invalid(_)) => {}
        Err(other) => panic!("unexpected error opening a licence: {other}"),
    }
});
