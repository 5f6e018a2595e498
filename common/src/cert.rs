//! Chip certificates of the Flashgate SFI profile v1 (§3): the 136-byte certificate
//! (`product_id || chip_pub || ECDSA-P256-SHA256 signature`), its verification against trusted
//! vendor CA keys, the chip's `device_id`, vendor CA keys (public and signing), and chip key pairs.

use std::fmt;

use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use p256::{PublicKey, SecretKey};
use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Length of a chip certificate.
pub const CERT_LEN: usize = 136;
/// Length of the signed part of a certificate (`product_id || chip_pub`).
pub const SIGNED_LEN: usize = 72;

/// Errors of certificates and keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// The certificate does not have exactly 136 bytes.
    #[error("chip certificate must be exactly {CERT_LEN} bytes, found {found}")]
    Length {
        /// The length found.
        found: usize,
    },
    /// `chip_pub` is not a point of P-256.
    #[error("offset 8: chip certificate field chip_pub: not a valid P-256 public key (x = {x_prefix}..)")]
    ChipKeyInvalid {
        /// First bytes of the X coordinate, hex.
        x_prefix: String,
    },
    /// The signature is not a valid ECDSA encoding (r or s zero or not below the group order).
    #[error("offset 72: chip certificate field signature: not a valid ECDSA P-256 signature (r or s out of range)")]
    SignatureMalformed,
    /// No trusted vendor CA key was configured.
    #[error("no trusted vendor CA key configured: refusing to trust certificate of device {device_id}")]
    NoTrustedKeys {
        /// The certificate's device id.
        device_id: DeviceId,
    },
    /// The signature verifies under none of the trusted keys.
    #[error(
        "certificate of device {device_id} (product {product_id:?}) is not signed by any of the {trusted} trusted vendor CA keys"
    )]
    Untrusted {
        /// The certificate's device id.
        device_id: DeviceId,
        /// The certificate's product id, as text.
        product_id: String,
        /// How many keys were tried.
        trusted: usize,
    },
    /// A vendor CA public key could not be decoded.
    #[error("vendor CA public key: {0}")]
    BadPublicKey(String),
    /// A private key (vendor CA or chip) could not be decoded or encoded.
    #[error("private key: {0}")]
    BadPrivateKey(String),
}

/// The chip's identity in ledgers and logs: `hex(SHA-256(chip_pub))[0..32]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    /// The device id of a chip public key (X||Y).
    pub fn from_chip_pub(chip_pub: &[u8; 64]) -> Self {
        let digest = Sha256::digest(chip_pub);
        Self(hex::encode(&digest[..16]))
    }

    /// The 32 lower-case hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Decode P-256 X||Y (big-endian) into a public key; rejects points not on the curve.
pub fn public_key_from_xy(xy: &[u8; 64]) -> Option<PublicKey> {
    let mut sec1 = [0u8; 65];
    sec1[0] = 0x04;
    sec1[1..].copy_from_slice(xy);
    PublicKey::from_sec1_bytes(&sec1).ok()
}

/// Encode a P-256 public key as X||Y (big-endian).
pub fn public_key_to_xy(key: &PublicKey) -> [u8; 64] {
    let point = key.to_encoded_point(false);
    let mut xy = [0u8; 64];
    // An uncompressed encoding of a valid (non-identity) public key is 0x04 || X || Y.
    if let (Some(x), Some(y)) = (point.x(), point.y()) {
        xy[..32].copy_from_slice(x);
        xy[32..].copy_from_slice(y);
    }
    xy
}

/// A 136-byte chip certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChipCertificate {
    /// ST's SFI product id, 8 ASCII characters.
    pub product_id: [u8; 8],
    /// The chip's P-256 public key, X||Y big-endian.
    pub chip_pub: [u8; 64],
    /// ECDSA-P256-SHA256 signature `r||s` (big-endian) by the vendor CA over the first 72 bytes.
    pub signature: [u8; 64],
}

impl ChipCertificate {
    /// Split a certificate into its fields (exactly 136 bytes; nothing verified yet).
    pub fn parse(bytes: &[u8]) -> Result<Self, CertError> {
        let b: &[u8; CERT_LEN] = bytes.try_into().map_err(|_| CertError::Length { found: bytes.len() })?;
        let mut c = Self { product_id: [0; 8], chip_pub: [0; 64], signature: [0; 64] };
        c.product_id.copy_from_slice(&b[..8]);
        c.chip_pub.copy_from_slice(&b[8..72]);
        c.signature.copy_from_slice(&b[72..]);
        Ok(c)
    }

    /// The certificate's wire bytes.
    pub fn to_bytes(&self) -> [u8; CERT_LEN] {
        let mut b = [0u8; CERT_LEN];
        b[..72].copy_from_slice(&self.signed_part());
        b[72..].copy_from_slice(&self.signature);
        b
    }

    /// The signed bytes: `product_id || chip_pub`.
    pub fn signed_part(&self) -> [u8; SIGNED_LEN] {
        let mut b = [0u8; SIGNED_LEN];
        b[..8].copy_from_slice(&self.product_id);
        b[8..].copy_from_slice(&self.chip_pub);
        b
    }

    /// The chip's public key; fails if `chip_pub` is not a point of P-256.
    pub fn chip_public_key(&self) -> Result<PublicKey, CertError> {
        public_key_from_xy(&self.chip_pub)
            .ok_or_else(|| CertError::ChipKeyInvalid { x_prefix: hex::encode(&self.chip_pub[..8]) })
    }

    /// Verify the certificate: `chip_pub` must be a valid P-256 point and the signature must
    /// verify under one of the `trusted` vendor CA keys. Never issue a licence for a certificate
    /// that does not pass this.
    pub fn verify(&self, trusted: &[VendorCaPublicKey]) -> Result<(), CertError> {
        self.chip_public_key()?;
        let signature = Signature::from_slice(&self.signature).map_err(|_| CertError::SignatureMalformed)?;
        if trusted.is_empty() {
            return Err(CertError::NoTrustedKeys { device_id: self.device_id() });
        }
        let message = self.signed_part();
        // ring's constant-time P-256 (about 5x faster than the pure-Rust verifier; this is on the
        // broker's per-licence path). Same acceptance rule: a valid (r, s) under the key.
        let sig = signature.to_bytes();
        if trusted.iter().any(|ca| {
            let point = ca.0.to_encoded_point(false);
            ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point.as_bytes())
                .verify(&message, &sig)
                .is_ok()
        }) {
            return Ok(());
        }
        Err(CertError::Untrusted {
            device_id: self.device_id(),
            product_id: self.product_id_str(),
            trusted: trusted.len(),
        })
    }

    /// `hex(SHA-256(chip_pub))[0..32]`.
    pub fn device_id(&self) -> DeviceId {
        DeviceId::from_chip_pub(&self.chip_pub)
    }

    /// The product id as text (non-ASCII bytes escaped).
    pub fn product_id_str(&self) -> String {
        self.product_id.escape_ascii().to_string()
    }
}

/// A trusted vendor CA public key (P-256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VendorCaPublicKey(VerifyingKey);

impl VendorCaPublicKey {
    /// From X||Y (big-endian); fails for points not on the curve.
    pub fn from_xy(xy: [u8; 64]) -> Result<Self, CertError> {
        public_key_from_xy(&xy)
            .map(|pk| Self(VerifyingKey::from(pk)))
            .ok_or_else(|| CertError::BadPublicKey(format!("X||Y {}.. is not a P-256 point", hex::encode(&xy[..8]))))
    }

    /// From a `PUBLIC KEY` (SubjectPublicKeyInfo) PEM document.
    pub fn from_pem(pem: &str) -> Result<Self, CertError> {
        VerifyingKey::from_public_key_pem(pem.trim())
            .map(Self)
            .map_err(|e| CertError::BadPublicKey(format!("not a P-256 SubjectPublicKeyInfo PEM: {e}")))
    }

    /// As a `PUBLIC KEY` (SubjectPublicKeyInfo) PEM document.
    #[allow(clippy::expect_used)]
    pub fn to_pem(&self) -> String {
        // Proven invariant: the encoder fails only on DER length overflow or an unencodable
        // algorithm identifier; a valid P-256 key always yields the same 91-byte SPKI structure.
        self.0.to_public_key_pem(LineEnding::LF).expect("SPKI encoding of a valid P-256 public key")
    }

    /// As X||Y (big-endian).
    pub fn to_xy(&self) -> [u8; 64] {
        public_key_to_xy(&PublicKey::from(&self.0))
    }
}

/// A vendor CA signing key (the simulator's test CA). Zeroized on drop; `Debug` shows only the
/// public key.
#[derive(Clone)]
pub struct VendorCa(SigningKey);

impl VendorCa {
    /// A fresh random CA key.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self(SigningKey::random(rng))
    }

    /// From the raw private scalar (big-endian); fails for 0 or values ≥ the group order.
    pub fn from_scalar(scalar: [u8; 32]) -> Result<Self, CertError> {
        let scalar = Zeroizing::new(scalar);
        SigningKey::from_bytes(scalar.as_ref().into())
            .map(Self)
            .map_err(|_| CertError::BadPrivateKey("scalar is 0 or not below the P-256 group order".into()))
    }

    /// From a PKCS#8 `PRIVATE KEY` PEM document (a SEC1 `EC PRIVATE KEY` is accepted too).
    pub fn from_pem(pem: &str) -> Result<Self, CertError> {
        let pem = pem.trim();
        if let Ok(k) = SigningKey::from_pkcs8_pem(pem) {
            return Ok(Self(k));
        }
        SecretKey::from_sec1_pem(pem)
            .map(|k| Self(SigningKey::from(k)))
            .map_err(|_| CertError::BadPrivateKey("not a P-256 PKCS#8 or SEC1 private key PEM".into()))
    }

    /// As a PKCS#8 `PRIVATE KEY` PEM document (zeroized on drop).
    #[allow(clippy::expect_used)]
    pub fn to_pem(&self) -> Zeroizing<String> {
        // Proven invariant: the encoder fails only on DER length overflow or an unencodable
        // algorithm identifier; a valid P-256 key always yields the same small fixed-layout
        // PKCS#8 structure.
        self.0.to_pkcs8_pem(LineEnding::LF).expect("PKCS#8 encoding of a valid P-256 private key")
    }

    /// The CA's public key.
    pub fn public_key(&self) -> VendorCaPublicKey {
        VendorCaPublicKey(*self.0.verifying_key())
    }

    /// Sign a certificate for `chip_pub` (deterministic ECDSA, RFC 6979).
    pub fn sign_certificate(&self, product_id: [u8; 8], chip_pub: [u8; 64]) -> ChipCertificate {
        let mut cert = ChipCertificate { product_id, chip_pub, signature: [0; 64] };
        let signature: Signature = self.0.sign(&cert.signed_part());
        cert.signature.copy_from_slice(&signature.to_bytes());
        cert
    }
}

impl fmt::Debug for VendorCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VendorCa").field("public_xy", &hex::encode(self.public_key().to_xy())).finish_non_exhaustive()
    }
}

/// A chip's P-256 key pair (the private half never leaves the chip; the simulator holds it).
/// Zeroized on drop; `Debug` shows only the public key.
#[derive(Clone)]
pub struct ChipKey(SecretKey);

impl ChipKey {
    /// A fresh random key pair.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self(SecretKey::random(rng))
    }

    /// From the raw private scalar (big-endian); fails for 0 or values ≥ the group order.
    pub fn from_scalar(scalar: [u8; 32]) -> Result<Self, CertError> {
        let scalar = Zeroizing::new(scalar);
        SecretKey::from_bytes(scalar.as_ref().into())
            .map(Self)
            .map_err(|_| CertError::BadPrivateKey("scalar is 0 or not below the P-256 group order".into()))
    }

    /// The raw private scalar (big-endian).
    pub fn to_scalar(&self) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        let bytes = Zeroizing::new(self.0.to_bytes());
        out.copy_from_slice(&bytes);
        out
    }

    /// The public key as X||Y (big-endian), as in the certificate.
    pub fn public_xy(&self) -> [u8; 64] {
        public_key_to_xy(&self.0.public_key())
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKey {
        self.0.public_key()
    }

    /// The private key, for ECDH.
    pub(crate) fn secret(&self) -> &SecretKey {
        &self.0
    }
}

impl fmt::Debug for ChipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChipKey").field("public_xy", &hex::encode(self.public_xy())).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn rng(seed: u64) -> StdRng {
        StdRng::seed_from_u64(seed)
    }

    #[test]
    fn parse_requires_exactly_136_bytes() {
        assert_eq!(ChipCertificate::parse(&[0; 135]), Err(CertError::Length { found: 135 }));
        assert_eq!(ChipCertificate::parse(&[0; 137]), Err(CertError::Length { found: 137 }));
        assert_eq!(CertError::Length { found: 3 }.to_string(), "chip certificate must be exactly 136 bytes, found 3");
        let c = ChipCertificate::parse(&[0; 136]).unwrap();
        assert_eq!(c.to_bytes(), [0; 136]);
    }

    #[test]
    fn verify_refuses_bad_points_and_signatures() {
        let ca = VendorCa::generate(&mut rng(1));
        let chip = ChipKey::generate(&mut rng(2));
        let good = ca.sign_certificate(*b"46201002", chip.public_xy());
        good.verify(&[ca.public_key()]).unwrap();
        assert_eq!(good.chip_public_key().unwrap(), chip.public_key());

        // chip_pub off the curve: refused even with a valid CA signature over it.
        let mut off = chip.public_xy();
        off[63] ^= 1;
        let c = ca.sign_certificate(*b"46201002", off);
        assert!(matches!(c.verify(&[ca.public_key()]), Err(CertError::ChipKeyInvalid { .. })));
        // The identity is not encodable as X||Y: all-zero is refused.
        let c = ca.sign_certificate(*b"46201002", [0; 64]);
        assert!(matches!(c.verify(&[ca.public_key()]), Err(CertError::ChipKeyInvalid { .. })));

        // r = 0 or s = 0 or values ≥ n.
        for sig in [[0u8; 64], [0xFF; 64]] {
            let c = ChipCertificate { signature: sig, ..good.clone() };
            assert_eq!(c.verify(&[ca.public_key()]), Err(CertError::SignatureMalformed));
        }
        // Another product id under the same signature.
        let c = ChipCertificate { product_id: *b"45002001", ..good.clone() };
        assert!(matches!(c.verify(&[ca.public_key()]), Err(CertError::Untrusted { .. })));
        let e = c.verify(&[ca.public_key()]).unwrap_err().to_string();
        assert!(e.contains(&c.device_id().to_string()) && e.contains("\"45002001\""), "{e}");
    }

    #[test]
    fn keys_from_scalars_and_pem() {
        assert!(ChipKey::from_scalar([0; 32]).is_err());
        assert!(ChipKey::from_scalar([0xFF; 32]).is_err());
        assert!(VendorCa::from_scalar([0; 32]).is_err());
        let chip = ChipKey::generate(&mut rng(3));
        assert_eq!(ChipKey::from_scalar(*chip.to_scalar()).unwrap().public_xy(), chip.public_xy());
        assert!(VendorCaPublicKey::from_xy([0; 64]).is_err());
        assert!(VendorCaPublicKey::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").is_err());
        assert!(VendorCa::from_pem("not a key").is_err());
        let ca = VendorCa::generate(&mut rng(4));
        let pem = ca.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(VendorCa::from_pem(&pem).unwrap().public_key(), ca.public_key());
        // SEC1 "EC PRIVATE KEY" (openssl ecparam -genkey) is accepted too.
        let sec1 = SecretKey::from(ca.0.clone()).to_sec1_pem(LineEnding::LF).unwrap();
        assert_eq!(VendorCa::from_pem(&sec1).unwrap().public_key(), ca.public_key());
        let public_pem = ca.public_key().to_pem();
        assert!(public_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(VendorCaPublicKey::from_pem(&public_pem).unwrap(), ca.public_key());
        assert_eq!(VendorCaPublicKey::from_xy(ca.public_key().to_xy()).unwrap(), ca.public_key());
    }

    #[test]
    fn debug_never_prints_private_keys() {
        let chip = ChipKey::generate(&mut rng(5));
        let ca = VendorCa::generate(&mut rng(6));
        let scalar = hex::encode(*chip.to_scalar());
        let ca_scalar = hex::encode(ca.0.to_bytes());
        let text = format!("{chip:?} {ca:?}");
        assert!(!text.contains(&scalar) && !text.contains(&ca_scalar), "{text}");
        assert!(text.contains(&hex::encode(chip.public_xy())));
    }

    #[test]
    fn device_id_is_32_hex_digits_of_sha256() {
        let id = DeviceId::from_chip_pub(&[0; 64]);
        assert_eq!(id.as_str().len(), 32);
        assert_eq!(id.as_str(), &hex::encode(Sha256::digest([0u8; 64]))[..32]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn certificate_round_trip(seed in any::<u64>(), product_id in any::<[u8; 8]>()) {
            let mut r = rng(seed);
            let ca = VendorCa::generate(&mut r);
            let other = VendorCa::generate(&mut r);
            let chip = ChipKey::generate(&mut r);
            let cert = ca.sign_certificate(product_id, chip.public_xy());
            let parsed = ChipCertificate::parse(&cert.to_bytes()).unwrap();
            prop_assert_eq!(&parsed, &cert);
            prop_assert!(parsed.verify(&[other.public_key(), ca.public_key()]).is_ok());
            let refused = parsed.verify(&[other.public_key()]).is_err();
            prop_assert!(refused);
            prop_assert_eq!(parsed.device_id(), DeviceId::from_chip_pub(&chip.public_xy()));
        }
    }
}
