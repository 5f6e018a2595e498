//! Fuzz the parsers of the files `flashgate audit verify` reads from a contract manufacturer: the audit
//! export (with a batch tally), the per-device export (`flashgate-devices-v1`) and the certificate of
//! conformance. The first byte picks the parser. Never a panic; whatever a devices file yields is
//! consistent with itself, and a parsed certificate's checks never panic.

#![no_main]

use flashgate_common::audit_export::{self, BatchTally};
use flashgate_common::conformance::{self, Certificate};
use flashgate_common::device_export;
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::SigningKey;

fuzz_target!(|data: &[u8]| {
    let Some((which, rest)) = data.split_first() else { return };
    let key = *SigningKey::from_slice(&[7u8; 32]).expect("fixed scalar").verifying_key();
    match which % 3 {
        0 => {
            let mut tally = BatchTally::new("B", u64::MAX);
            let _ = audit_export::verify_tallying(rest, &[key], &[], Some(&mut tally));
        }
        1 => {
            if let Ok(s) = device_export::summarise(rest) {
                assert!(s.counts.installed + s.counts.failed + s.counts.not_reported <= s.counts.issued);
                assert!(s.counts.devices >= s.counts.issued);
            }
        }
        _ => {
            if let Ok(c) = Certificate::parse(rest) {
                let _ = c.verify_signature(&[key]);
                if let Ok(s) = device_export::summarise(&b""[..]) {
                    let _ = conformance::check_devices(&c, &s, 0);
                }
            }
        }
    }
});
