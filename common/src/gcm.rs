//! Streaming AES-128-GCM (96-bit IVs, 16-byte tags) for the device side: the simulator decrypts
//! an area chunk by chunk as it arrives and checks the tag when its last byte is in. Built from
//! AES-CTR (`ctr::Ctr32BE<aes::Aes128>`) and GHASH; for any chunking the output equals the
//! one-shot `aes-gcm` result (tested). Tags are compared in constant time.

use std::fmt;

use aes::Aes128;
use aes::cipher::{BlockEncrypt, KeyInit, KeyIvInit, StreamCipher};
use ghash::GHash;
use ghash::universal_hash::UniversalHash;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::sfi::FirmwareKey;

/// GCM's plaintext limit for one IV: 2^32 - 2 blocks of 16 bytes.
pub const MAX_GCM_DATA: u64 = ((1u64 << 32) - 2) * 16;

/// More data than GCM allows under one IV was fed to an encryptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("AES-GCM data limit exceeded: {total} bytes under one IV (limit {MAX_GCM_DATA})")]
pub struct GcmLimitExceeded {
    /// Bytes fed so far including the refused chunk.
    pub total: u64,
}

/// State shared by the encryptor and the decryptor.
struct GcmCore {
    ctr: ctr::Ctr32BE<Aes128>,
    ghash: GHash,
    /// Ciphertext bytes not yet hashed (less than one block).
    partial: [u8; 16],
    partial_len: usize,
    aad_len: u64,
    data_len: u64,
    /// `E_K(J0)`, XORed into the GHASH result.
    tag_mask: Zeroizing<[u8; 16]>,
    /// Set once the data limit was exceeded: the tag can no longer be trusted.
    exceeded: bool,
}

impl GcmCore {
    fn new(key: &FirmwareKey, iv: &[u8; 12], aad: &[u8]) -> Self {
        let aes = Aes128::new(key.as_bytes().into());
        let mut h = Zeroizing::new(ghash::Block::default());
        aes.encrypt_block(&mut h);
        let mut ghash = GHash::new(&h);
        ghash.update_padded(aad);

        let mut j0 = ghash::Block::default();
        j0[..12].copy_from_slice(iv);
        j0[15] = 1;
        aes.encrypt_block(&mut j0);
        let mut tag_mask = Zeroizing::new([0u8; 16]);
        tag_mask.copy_from_slice(&j0);

        let mut ctr_iv = [0u8; 16];
        ctr_iv[..12].copy_from_slice(iv);
        ctr_iv[15] = 2;
        let ctr = ctr::Ctr32BE::<Aes128>::new(key.as_bytes().into(), &ctr_iv.into());
        Self {
            ctr,
            ghash,
            partial: [0; 16],
            partial_len: 0,
            aad_len: aad.len() as u64,
            data_len: 0,
            tag_mask,
            exceeded: false,
        }
    }

    /// Account for `len` more bytes; false (and the core poisoned) if GCM's limit is exceeded.
    fn admit(&mut self, len: usize) -> bool {
        let total = self.data_len.saturating_add(len as u64);
        if self.exceeded || total > MAX_GCM_DATA {
            self.exceeded = true;
            return false;
        }
        self.data_len = total;
        true
    }

    /// XOR the keystream into `buf`; false (and the core poisoned) if the keystream ran out.
    fn keystream(&mut self, buf: &mut [u8]) -> bool {
        if self.ctr.try_apply_keystream(buf).is_err() {
            self.exceeded = true;
            return false;
        }
        true
    }

    /// Feed ciphertext to GHASH, buffering partial blocks.
    fn absorb(&mut self, mut data: &[u8]) {
        if self.partial_len > 0 {
            let take = (16 - self.partial_len).min(data.len());
            self.partial[self.partial_len..self.partial_len + take].copy_from_slice(&data[..take]);
            self.partial_len += take;
            data = &data[take..];
            if self.partial_len < 16 {
                return;
            }
            self.ghash.update(&[self.partial.into()]);
            self.partial_len = 0;
        }
        let mut blocks = data.chunks_exact(16);
        for block in &mut blocks {
            self.ghash.update(&[*ghash::Block::from_slice(block)]);
        }
        let rest = blocks.remainder();
        self.partial[..rest.len()].copy_from_slice(rest);
        self.partial_len = rest.len();
    }

    fn tag(mut self) -> [u8; 16] {
        if self.partial_len > 0 {
            self.ghash.update_padded(&self.partial[..self.partial_len]);
        }
        let mut lengths = ghash::Block::default();
        lengths[..8].copy_from_slice(&(self.aad_len * 8).to_be_bytes());
        lengths[8..].copy_from_slice(&(self.data_len * 8).to_be_bytes());
        self.ghash.update(&[lengths]);
        let s = self.ghash.finalize();
        let mut tag = [0u8; 16];
        for (t, (a, b)) in tag.iter_mut().zip(s.iter().zip(self.tag_mask.iter())) {
            *t = a ^ b;
        }
        tag
    }
}

/// Streaming AES-128-GCM encryption: `update` encrypts in place, any chunk sizes.
pub struct GcmEncryptor {
    core: GcmCore,
}

impl GcmEncryptor {
    /// Start encrypting under `key` and the 96-bit `iv`, authenticating `aad`.
    pub fn new(key: &FirmwareKey, iv: &[u8; 12], aad: &[u8]) -> Self {
        Self { core: GcmCore::new(key, iv, aad) }
    }

    /// Encrypt the next chunk in place. Fails (leaving the chunk zeroed, never reusing keystream)
    /// beyond GCM's limit of 2^36 - 32 bytes under one IV.
    pub fn update(&mut self, chunk: &mut [u8]) -> Result<(), GcmLimitExceeded> {
        if !self.core.admit(chunk.len()) || !self.core.keystream(chunk) {
            chunk.fill(0);
            return Err(GcmLimitExceeded { total: self.core.data_len.saturating_add(chunk.len() as u64) });
        }
        self.core.absorb(chunk);
        Ok(())
    }

    /// Bytes encrypted so far.
    pub fn processed(&self) -> u64 {
        self.core.data_len
    }

    /// The authentication tag.
    pub fn finish(self) -> [u8; 16] {
        self.core.tag()
    }
}

impl fmt::Debug for GcmEncryptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcmEncryptor").field("processed", &self.core.data_len).finish_non_exhaustive()
    }
}

/// Streaming AES-128-GCM decryption: `update` decrypts in place, any chunk sizes. The plaintext
/// is unauthenticated until [`GcmDecryptor::finish`] returns true: a device must be able to
/// discard (erase) everything it wrote if it does not.
pub struct GcmDecryptor {
    core: GcmCore,
}

impl GcmDecryptor {
    /// Start decrypting under `key` and the 96-bit `iv`, authenticating `aad`.
    pub fn new(key: &FirmwareKey, iv: &[u8; 12], aad: &[u8]) -> Self {
        Self { core: GcmCore::new(key, iv, aad) }
    }

    /// Decrypt the next chunk in place. Beyond GCM's limit of 2^36 - 32 bytes the chunk is
    /// zeroed instead and [`GcmDecryptor::finish`] will return false.
    pub fn update(&mut self, chunk: &mut [u8]) {
        if !self.core.admit(chunk.len()) {
            chunk.fill(0);
            return;
        }
        self.core.absorb(chunk);
        if !self.core.keystream(chunk) {
            chunk.fill(0);
        }
    }

    /// Bytes decrypted so far.
    pub fn processed(&self) -> u64 {
        self.core.data_len
    }

    /// Whether `tag` authenticates the AAD and every byte fed (constant-time comparison).
    pub fn finish(self, tag: &[u8; 16]) -> bool {
        let exceeded = self.core.exceeded;
        let expected = self.core.tag();
        bool::from(expected.ct_eq(tag)) && !exceeded
    }
}

impl fmt::Debug for GcmDecryptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcmDecryptor").field("processed", &self.core.data_len).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use aes_gcm::aead::{AeadInPlace, KeyInit as _};
    use aes_gcm::{Aes128Gcm, Nonce, Tag};
    use proptest::prelude::*;

    use super::*;

    /// One-shot reference: (ciphertext, tag).
    fn one_shot(key: &[u8; 16], iv: &[u8; 12], aad: &[u8], plaintext: &[u8]) -> (Vec<u8>, [u8; 16]) {
        let mut buf = plaintext.to_vec();
        let tag = Aes128Gcm::new(key.into()).encrypt_in_place_detached(Nonce::from_slice(iv), aad, &mut buf).unwrap();
        (buf, tag.into())
    }

    /// Split `len` bytes at the given cut points (sorted, deduplicated, clamped).
    fn chunks(len: usize, cuts: &[prop::sample::Index]) -> Vec<std::ops::Range<usize>> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(len + 1)).collect();
        points.push(0);
        points.push(len);
        points.sort_unstable();
        points.windows(2).map(|w| w[0]..w[1]).collect()
    }

    #[test]
    fn nist_test_case_2() {
        // GCM spec (McGrew & Viega) test case 2: zero key, zero IV, one zero block.
        let key = FirmwareKey::new([0; 16]);
        let mut enc = GcmEncryptor::new(&key, &[0; 12], &[]);
        let mut data = [0u8; 16];
        enc.update(&mut data).unwrap();
        assert_eq!(hex::encode(data), "0388dace60b6a392f328c2b971b2fe78");
        assert_eq!(hex::encode(enc.finish()), "ab6e47d42cec13bdf53a67b21257bddf");
        // Test case 1: empty plaintext.
        assert_eq!(hex::encode(GcmEncryptor::new(&key, &[0; 12], &[]).finish()), "58e2fccefa7e3061367f1d57a4e7455a");
    }

    #[test]
    fn the_data_limit_poisons_instead_of_reusing_keystream() {
        let key = FirmwareKey::new([1; 16]);
        let mut enc = GcmEncryptor::new(&key, &[2; 12], b"aad");
        enc.core.data_len = MAX_GCM_DATA - 4;
        let mut ok = [7u8; 4];
        enc.update(&mut ok).unwrap();
        let mut over = [7u8; 1];
        assert_eq!(enc.update(&mut over), Err(GcmLimitExceeded { total: MAX_GCM_DATA + 1 }));
        assert_eq!(over, [0]);
        let mut dec = GcmDecryptor::new(&key, &[2; 12], b"aad");
        dec.core.data_len = MAX_GCM_DATA;
        let mut chunk = [9u8; 3];
        dec.update(&mut chunk);
        assert_eq!(chunk, [0; 3]);
        let tag = dec.core.tag_mask_for_test();
        assert!(!dec.finish(&tag));
    }

    #[test]
    fn debug_shows_no_key_material() {
        let key = FirmwareKey::new([0xAB; 16]);
        let enc = GcmEncryptor::new(&key, &[0; 12], &[]);
        let dec = GcmDecryptor::new(&key, &[0; 12], &[]);
        assert_eq!(format!("{enc:?}"), "GcmEncryptor { processed: 0, .. }");
        assert_eq!(format!("{dec:?}"), "GcmDecryptor { processed: 0, .. }");
    }

    impl GcmCore {
        fn tag_mask_for_test(&self) -> [u8; 16] {
            *self.tag_mask
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn streaming_equals_one_shot(
            key in any::<[u8; 16]>(),
            iv in any::<[u8; 12]>(),
            aad in proptest::collection::vec(any::<u8>(), 0..70),
            plaintext in proptest::collection::vec(any::<u8>(), 0..300),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
            flip in any::<prop::sample::Index>(),
        ) {
            let (ciphertext, tag) = one_shot(&key, &iv, &aad, &plaintext);
            let fk = FirmwareKey::new(key);
            let parts = chunks(plaintext.len(), &cuts);

            let mut enc = GcmEncryptor::new(&fk, &iv, &aad);
            let mut buf = plaintext.clone();
            for r in &parts {
                enc.update(&mut buf[r.clone()]).unwrap();
            }
            prop_assert_eq!(enc.processed(), plaintext.len() as u64);
            prop_assert_eq!(&buf, &ciphertext);
            prop_assert_eq!(enc.finish(), tag);

            let mut dec = GcmDecryptor::new(&fk, &iv, &aad);
            let mut buf = ciphertext.clone();
            for r in &parts {
                dec.update(&mut buf[r.clone()]);
            }
            prop_assert_eq!(&buf, &plaintext);
            prop_assert!(dec.finish(&tag));

            // Any altered tag, ciphertext bit or AAD is refused.
            let mut bad_tag = tag;
            bad_tag[flip.index(16)] ^= 0x80;
            let mut dec = GcmDecryptor::new(&fk, &iv, &aad);
            let mut buf = ciphertext.clone();
            dec.update(&mut buf);
            prop_assert!(!dec.finish(&bad_tag));
            if !ciphertext.is_empty() {
                let mut buf = ciphertext.clone();
                buf[flip.index(ciphertext.len())] ^= 1;
                let mut dec = GcmDecryptor::new(&fk, &iv, &aad);
                dec.update(&mut buf);
                prop_assert!(!dec.finish(&tag));
            }
            let mut aad2 = aad.clone();
            aad2.push(0);
            let mut dec = GcmDecryptor::new(&fk, &iv, &aad2);
            let mut buf = ciphertext.clone();
            dec.update(&mut buf);
            prop_assert!(!dec.finish(&tag));
            // Sanity of the reference against aes-gcm's own decryption.
            let mut buf = ciphertext.clone();
            prop_assert!(Aes128Gcm::new((&key).into())
                .decrypt_in_place_detached(Nonce::from_slice(&iv), &aad, &mut buf, Tag::from_slice(&tag))
                .is_ok());
        }
    }
}
