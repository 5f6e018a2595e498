//! Licences of the Flashgate SFI profile v1 (§4): the 132-byte licence layout and the open ECIES
//! construction on P-256 that wraps the firmware key for one chip — ECDH X coordinate `Z` used as
//! an AES-256 key, `KEK = AES-256-ECB_Z(ctx)`, `wrapped_key = AES-KW(KEK, K)` (RFC 3394) — plus a
//! software issuer (for labs and tests; production issuing happens inside the HSM) and opening on
//! the chip. This is a Flashgate construction, not ST's.

use std::fmt;

use aes::Aes256;
use aes::cipher::{BlockEncrypt, KeyInit};
use aes_kw::KekAes256;
use p256::{PublicKey, SecretKey};
use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::cert::{CertError, ChipCertificate, ChipKey, public_key_from_xy, public_key_to_xy};
use crate::protocol::SfiStatus;
use crate::sfi::{FirmwareKey, ImageNonce};

/// Length of a licence.
pub const LICENCE_LEN: usize = 132;
/// Licence magic.
pub const LICENCE_MAGIC: [u8; 4] = *b"FGL1";
/// The only licence version of the profile.
pub const LICENCE_VERSION: u16 = 1;
/// Length of an AES-KW-wrapped 16-byte key.
pub const WRAPPED_KEY_LEN: usize = 24;

/// 16 bytes naming a firmware key (the broker's choice, stable per key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Why a licence is invalid (all map to status `0x0102` licence invalid).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidLicence {
    /// Not exactly 132 bytes.
    #[error("a licence is exactly {LICENCE_LEN} bytes, found {found}")]
    Length {
        /// The length found.
        found: usize,
    },
    /// The magic is not `FGL1`.
    #[error("offset 0: field magic: expected \"FGL1\", found \"{}\"", .found.escape_ascii())]
    Magic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// The version is not 1.
    #[error("offset 4: field version: expected 1, found {found}")]
    Version {
        /// The version found.
        found: u16,
    },
    /// The flags are not 0.
    #[error("offset 6: field flags: expected 0, found {found:#06x}")]
    Flags {
        /// The flags found.
        found: u16,
    },
    /// `eph_pub` is not a P-256 point.
    #[error("offset 44: field eph_pub: not a valid P-256 public key")]
    EphemeralKey,
    /// AES-KW unwrap failed: the licence is for another chip or was modified.
    #[error("offset 108: field wrapped_key: key unwrap failed (licence issued for another chip, or modified)")]
    Unwrap,
}

/// Errors of issuing and opening licences.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LicenceError {
    /// The licence names a different product than the device's (status `0x0103`).
    #[error(
        "licence is for product \"{}\", this device is product \"{}\"",
        .licence.escape_ascii(),
        .device.escape_ascii()
    )]
    WrongProduct {
        /// The licence's product id.
        licence: [u8; 8],
        /// The device's own product id.
        device: [u8; 8],
    },
    /// The licence is malformed or does not open with this chip's key (status `0x0102`).
    #[error("licence invalid: {0}")]
    Invalid(#[from] InvalidLicence),
    /// Issuing refused: the certificate's chip key is unusable.
    #[error("cannot issue a licence: {0}")]
    Certificate(#[from] CertError),
    /// Issuing failed inside AES key wrap.
    #[error("cannot issue a licence: AES key wrap failed")]
    Wrap,
}

impl LicenceError {
    /// The SFI status a device answers for this error.
    pub fn sfi_status(&self) -> SfiStatus {
        match self {
            LicenceError::WrongProduct { .. } => SfiStatus::WrongProduct,
            _ => SfiStatus::LicenceInvalid,
        }
    }
}

/// A 132-byte licence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Licence {
    /// The product the licence is for.
    pub product_id: [u8; 8],
    /// Names the firmware key.
    pub key_id: KeyId,
    /// The image nonce `N`, which travels with the key.
    pub nonce: ImageNonce,
    /// The ephemeral public key, X||Y big-endian.
    pub eph_pub: [u8; 64],
    /// `AES-KW(KEK, K)`.
    pub wrapped_key: [u8; WRAPPED_KEY_LEN],
}

impl Licence {
    /// Parse a licence: exactly 132 bytes, magic `FGL1`, version 1, flags 0.
    pub fn parse(bytes: &[u8]) -> Result<Self, LicenceError> {
        let b: &[u8; LICENCE_LEN] = bytes.try_into().map_err(|_| InvalidLicence::Length { found: bytes.len() })?;
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&b[..4]);
        if magic != LICENCE_MAGIC {
            return Err(InvalidLicence::Magic { found: magic }.into());
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != LICENCE_VERSION {
            return Err(InvalidLicence::Version { found: version }.into());
        }
        let flags = u16::from_le_bytes([b[6], b[7]]);
        if flags != 0 {
            return Err(InvalidLicence::Flags { found: flags }.into());
        }
        let mut l = Licence {
            product_id: [0; 8],
            key_id: KeyId([0; 16]),
            nonce: ImageNonce([0; 12]),
            eph_pub: [0; 64],
            wrapped_key: [0; WRAPPED_KEY_LEN],
        };
        l.product_id.copy_from_slice(&b[8..16]);
        l.key_id.0.copy_from_slice(&b[16..32]);
        l.nonce.0.copy_from_slice(&b[32..44]);
        l.eph_pub.copy_from_slice(&b[44..108]);
        l.wrapped_key.copy_from_slice(&b[108..132]);
        Ok(l)
    }

    /// The licence's wire bytes.
    pub fn to_bytes(&self) -> [u8; LICENCE_LEN] {
        let mut b = [0u8; LICENCE_LEN];
        b[..4].copy_from_slice(&LICENCE_MAGIC);
        b[4..6].copy_from_slice(&LICENCE_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&0u16.to_le_bytes());
        b[8..16].copy_from_slice(&self.product_id);
        b[16..32].copy_from_slice(&self.key_id.0);
        b[32..44].copy_from_slice(&self.nonce.0);
        b[44..108].copy_from_slice(&self.eph_pub);
        b[108..132].copy_from_slice(&self.wrapped_key);
        b
    }
}

/// `ctx = SHA-256("FGL1" || product_id || key_id || nonce || chip_pub || eph_pub)`.
pub fn licence_context(
    product_id: &[u8; 8],
    key_id: &KeyId,
    nonce: &ImageNonce,
    chip_pub: &[u8; 64],
    eph_pub: &[u8; 64],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(LICENCE_MAGIC);
    h.update(product_id);
    h.update(key_id.0);
    h.update(nonce.0);
    h.update(chip_pub);
    h.update(eph_pub);
    h.finalize().into()
}

/// `KEK = AES-256-ECB_Z(ctx)`: the two 16-byte blocks of `ctx` encrypted under `Z`.
pub fn derive_kek(z: &[u8; 32], ctx: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let aes = Aes256::new(z.into());
    let mut kek = Zeroizing::new(*ctx);
    for block in kek.chunks_exact_mut(16) {
        aes.encrypt_block(block.into());
    }
    kek
}

/// `Z`: the raw X coordinate of ECDH(secret, public).
fn ecdh_z(secret: &SecretKey, public: &PublicKey) -> Zeroizing<[u8; 32]> {
    let shared = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), public.as_affine());
    let mut z = Zeroizing::new([0u8; 32]);
    z.copy_from_slice(shared.raw_secret_bytes());
    z
}

/// The KEK for a licence between `secret`'s holder and `peer` (`chip_pub`, `eph_pub` as in ctx).
fn licence_kek(
    secret: &SecretKey,
    peer: &PublicKey,
    product_id: &[u8; 8],
    key_id: &KeyId,
    nonce: &ImageNonce,
    chip_pub: &[u8; 64],
    eph_pub: &[u8; 64],
) -> KekAes256 {
    let z = ecdh_z(secret, peer);
    let ctx = licence_context(product_id, key_id, nonce, chip_pub, eph_pub);
    let kek = derive_kek(&z, &ctx);
    KekAes256::new(kek.as_ref().into())
}

/// Issue a licence with a given ephemeral key (deterministic; for test vectors and HSM-equivalent
/// checks). Does NOT verify the certificate: callers must [`ChipCertificate::verify`] it first.
pub fn issue_with_ephemeral(
    eph_secret: &SecretKey,
    cert: &ChipCertificate,
    key_id: &KeyId,
    key: &FirmwareKey,
    nonce: &ImageNonce,
) -> Result<Licence, LicenceError> {
    let chip_pub = cert.chip_public_key()?;
    let eph_pub = public_key_to_xy(&eph_secret.public_key());
    let kek = licence_kek(eph_secret, &chip_pub, &cert.product_id, key_id, nonce, &cert.chip_pub, &eph_pub);
    let mut wrapped_key = [0u8; WRAPPED_KEY_LEN];
    kek.wrap(key.as_bytes(), &mut wrapped_key).map_err(|_| LicenceError::Wrap)?;
    Ok(Licence { product_id: cert.product_id, key_id: *key_id, nonce: *nonce, eph_pub, wrapped_key })
}

/// Issue a licence with a fresh ephemeral key drawn from the OS, with ring's constant-time P-256 for
/// the key generation and ECDH (about 4x faster than [`issue_with_ephemeral`]'s pure-Rust arithmetic;
/// the soft HSM uses it on the broker's hot path). The bytes follow profile §4 exactly as
/// [`issue_with_ephemeral`] does. Does NOT verify the certificate: callers must do it first.
pub fn issue_with_os_ephemeral(
    cert: &ChipCertificate,
    key_id: &KeyId,
    key: &FirmwareKey,
    nonce: &ImageNonce,
) -> Result<Licence, LicenceError> {
    use ring::agreement::{ECDH_P256, EphemeralPrivateKey, UnparsedPublicKey, agree_ephemeral};
    let rng = ring::rand::SystemRandom::new();
    let eph = EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(|_| LicenceError::Wrap)?;
    let eph_point = eph.compute_public_key().map_err(|_| LicenceError::Wrap)?;
    let mut eph_pub = [0u8; 64];
    match eph_point.as_ref() {
        [0x04, xy @ ..] if xy.len() == 64 => eph_pub.copy_from_slice(xy),
        _ => return Err(LicenceError::Wrap),
    }
    let mut peer = [0u8; 65];
    peer[0] = 0x04;
    peer[1..].copy_from_slice(&cert.chip_pub);
    let mut z = Zeroizing::new([0u8; 32]);
    agree_ephemeral(eph, &UnparsedPublicKey::new(&ECDH_P256, &peer), |shared| {
        if shared.len() == 32 {
            z.copy_from_slice(shared);
        }
    })
    .map_err(|_| LicenceError::Certificate(CertError::ChipKeyInvalid { x_prefix: hex::encode(&cert.chip_pub[..8]) }))?;
    let ctx = licence_context(&cert.product_id, key_id, nonce, &cert.chip_pub, &eph_pub);
    let kek = KekAes256::new(derive_kek(&z, &ctx).as_ref().into());
    let mut wrapped_key = [0u8; WRAPPED_KEY_LEN];
    kek.wrap(key.as_bytes(), &mut wrapped_key).map_err(|_| LicenceError::Wrap)?;
    Ok(Licence { product_id: cert.product_id, key_id: *key_id, nonce: *nonce, eph_pub, wrapped_key })
}

/// A software licence issuer holding the firmware key in memory (labs and tests; production keys
/// stay inside the HSM). It does NOT verify certificates: callers must
/// [`ChipCertificate::verify`] every certificate against the trusted vendor CA keys first, or
/// anyone could obtain the firmware key with a self-made certificate.
#[derive(Debug, Clone)]
pub struct SoftIssuer {
    /// Names the key in issued licences.
    pub key_id: KeyId,
    /// The firmware key (zeroized on drop, never printed).
    pub key: FirmwareKey,
    /// The image nonce that travels with the key.
    pub nonce: ImageNonce,
}

impl SoftIssuer {
    /// An issuer for one firmware key and nonce.
    pub fn new(key_id: KeyId, key: FirmwareKey, nonce: ImageNonce) -> Self {
        Self { key_id, key, nonce }
    }

    /// Issue a licence for `cert`'s chip with a fresh ephemeral key (destroyed afterwards).
    /// The certificate must have been verified by the caller.
    pub fn issue<R: RngCore + CryptoRng>(&self, cert: &ChipCertificate, rng: &mut R) -> Result<Licence, LicenceError> {
        let eph = SecretKey::random(rng);
        issue_with_ephemeral(&eph, cert, &self.key_id, &self.key, &self.nonce)
    }
}

/// Open a licence on the chip: the product must be the chip's own, then the key is unwrapped
/// with the chip's private key. Returns the firmware key and the image nonce.
pub fn open_licence(
    licence: &Licence,
    chip: &ChipKey,
    own_product_id: &[u8; 8],
) -> Result<(FirmwareKey, ImageNonce), LicenceError> {
    if &licence.product_id != own_product_id {
        return Err(LicenceError::WrongProduct { licence: licence.product_id, device: *own_product_id });
    }
    let eph_pub = public_key_from_xy(&licence.eph_pub).ok_or(InvalidLicence::EphemeralKey)?;
    let chip_pub = chip.public_xy();
    let kek = licence_kek(
        chip.secret(),
        &eph_pub,
        &licence.product_id,
        &licence.key_id,
        &licence.nonce,
        &chip_pub,
        &licence.eph_pub,
    );
    let mut key = Zeroizing::new([0u8; 16]);
    kek.unwrap(&licence.wrapped_key, key.as_mut()).map_err(|_| InvalidLicence::Unwrap)?;
    Ok((FirmwareKey::from_zeroizing(key), licence.nonce))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::cert::VendorCa;

    const PRODUCT: [u8; 8] = *b"46201002";

    fn setup(seed: u64) -> (ChipKey, ChipCertificate, SoftIssuer, StdRng) {
        let mut rng = StdRng::seed_from_u64(seed);
        let ca = VendorCa::generate(&mut rng);
        let chip = ChipKey::generate(&mut rng);
        let cert = ca.sign_certificate(PRODUCT, chip.public_xy());
        let issuer = SoftIssuer::new(KeyId([3; 16]), FirmwareKey::generate(&mut rng), ImageNonce::generate(&mut rng));
        (chip, cert, issuer, rng)
    }

    #[test]
    fn parse_errors_are_invalid_and_name_the_field() {
        let (_, cert, issuer, mut rng) = setup(1);
        let good = issuer.issue(&cert, &mut rng).unwrap().to_bytes();
        let err = |b: &[u8]| Licence::parse(b).unwrap_err();
        assert_eq!(err(&good[..131]), LicenceError::Invalid(InvalidLicence::Length { found: 131 }));
        let mut b = good;
        b[0] = b'X';
        assert_eq!(err(&b).to_string(), "licence invalid: offset 0: field magic: expected \"FGL1\", found \"XGL1\"");
        let mut b = good;
        b[4] = 2;
        assert_eq!(err(&b).to_string(), "licence invalid: offset 4: field version: expected 1, found 2");
        let mut b = good;
        b[7] = 1;
        assert_eq!(err(&b).to_string(), "licence invalid: offset 6: field flags: expected 0, found 0x0100");
        for b in [&good[..131], &b[..]] {
            assert_eq!(err(b).sfi_status(), SfiStatus::LicenceInvalid);
        }
    }

    #[test]
    fn open_checks_product_then_key() {
        let (chip, cert, issuer, mut rng) = setup(2);
        let licence = issuer.issue(&cert, &mut rng).unwrap();
        let (key, nonce) = open_licence(&licence, &chip, &PRODUCT).unwrap();
        assert_eq!((key, nonce), (issuer.key.clone(), issuer.nonce));
        // Each issue uses a fresh ephemeral key; every licence opens.
        let again = issuer.issue(&cert, &mut rng).unwrap();
        assert_ne!(again.eph_pub, licence.eph_pub);
        assert!(open_licence(&again, &chip, &PRODUCT).is_ok());
        // Another chip: invalid.
        let other = ChipKey::generate(&mut rng);
        assert_eq!(open_licence(&licence, &other, &PRODUCT), Err(InvalidLicence::Unwrap.into()));
        // Fields bound by ctx: key id and nonce changes make the unwrap fail.
        let l = Licence { key_id: KeyId([4; 16]), ..licence.clone() };
        assert_eq!(open_licence(&l, &chip, &PRODUCT), Err(InvalidLicence::Unwrap.into()));
        let l = Licence { nonce: ImageNonce([0; 12]), ..licence.clone() };
        assert_eq!(open_licence(&l, &chip, &PRODUCT), Err(InvalidLicence::Unwrap.into()));
        // An ephemeral key off the curve.
        let l = Licence { eph_pub: [1; 64], ..licence.clone() };
        assert_eq!(open_licence(&l, &chip, &PRODUCT), Err(InvalidLicence::EphemeralKey.into()));
        // Wrong product is checked first.
        let l = Licence { product_id: *b"47201003", eph_pub: [1; 64], ..licence };
        assert!(matches!(open_licence(&l, &chip, &PRODUCT), Err(LicenceError::WrongProduct { .. })));
    }

    #[test]
    fn issuing_refuses_an_unusable_chip_key() {
        let (_, mut cert, issuer, mut rng) = setup(3);
        cert.chip_pub = [7; 64];
        assert!(matches!(
            issuer.issue(&cert, &mut rng),
            Err(LicenceError::Certificate(CertError::ChipKeyInvalid { .. }))
        ));
    }

    #[test]
    fn ring_issuance_opens_on_the_chip_and_refuses_bad_points() {
        let (chip, mut cert, issuer, _) = setup(4);
        for _ in 0..4 {
            let l = issue_with_os_ephemeral(&cert, &issuer.key_id, &issuer.key, &issuer.nonce).unwrap();
            let l = Licence::parse(&l.to_bytes()).unwrap();
            let (k, n) = open_licence(&l, &chip, &PRODUCT).unwrap();
            assert_eq!(k.as_bytes(), issuer.key.as_bytes());
            assert_eq!(n, issuer.nonce);
        }
        cert.chip_pub = [7; 64];
        assert!(matches!(
            issue_with_os_ephemeral(&cert, &issuer.key_id, &issuer.key, &issuer.nonce),
            Err(LicenceError::Certificate(CertError::ChipKeyInvalid { .. }))
        ));
    }

    #[test]
    fn debug_never_prints_the_firmware_key() {
        let issuer = SoftIssuer::new(KeyId([0; 16]), FirmwareKey::new([0x5A; 16]), ImageNonce([0; 12]));
        let text = format!("{issuer:?}");
        assert!(text.contains("FirmwareKey(..)") && !text.contains("90, 90"), "{text}");
    }

    #[test]
    fn kek_is_aes256_ecb_of_ctx() {
        // FIPS-197 C.3: AES-256 of 00112233..ff under key 000102..1f.
        let z: [u8; 32] = std::array::from_fn(|i| i as u8);
        let mut ctx = [0u8; 32];
        for half in ctx.chunks_mut(16) {
            half.copy_from_slice(&hex::decode("00112233445566778899aabbccddeeff").unwrap());
        }
        let kek = derive_kek(&z, &ctx);
        assert_eq!(hex::encode(&kek[..16]), "8ea2b7ca516745bfeafc49904b496089");
        assert_eq!(kek[..16], kek[16..]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn licence_round_trip(seed in any::<u64>(), key in any::<[u8; 16]>(), nonce in any::<[u8; 12]>(), key_id in any::<[u8; 16]>()) {
            let (chip, cert, _, mut rng) = setup(seed);
            let issuer = SoftIssuer::new(KeyId(key_id), FirmwareKey::new(key), ImageNonce(nonce));
            let licence = issuer.issue(&cert, &mut rng).unwrap();
            let bytes = licence.to_bytes();
            prop_assert_eq!(&bytes[..4], b"FGL1");
            let parsed = Licence::parse(&bytes).unwrap();
            prop_assert_eq!(&parsed, &licence);
            let (k, n) = open_licence(&parsed, &chip, &PRODUCT).unwrap();
            prop_assert_eq!(k.as_bytes(), &key);
            prop_assert_eq!(n, ImageNonce(nonce));
        }
    }
}
