//! Fuzz the signed-checkpoint parser (bytes a station receives in every licence response): never a
//! panic; whatever parses re-encodes to the same bytes; verification under a fixed key never panics.

#![no_main]

use flashgate_common::checkpoint::{CHECKPOINT_LEN, SignedCheckpoint};
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::SigningKey;

fuzz_target!(|data: &[u8]| {
    let Ok(cp) = SignedCheckpoint::parse(data) else {
        return;
    };
    assert_eq!(data.len(), CHECKPOINT_LEN);
    assert_eq!(cp.to_bytes().expect("a parsed checkpoint re-encodes").as_slice(), data);
    let key = SigningKey::from_slice(&[7u8; 32]).expect("fixed scalar");
    let _ = cp.verify(&[*key.verifying_key()]);
});
