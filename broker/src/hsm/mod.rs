//! HSMs of the broker: the [`HsmBackend`] trait every key holder implements (blocking API), its
//! two backends — [`soft::SoftHsm`] (an encrypted keystore file, the embedded default) and
//! [`pkcs11::Pkcs11Hsm`] (a PKCS#11 token, licence math of profile §4 inside the token) — the
//! async [`pool::HsmPool`] that spreads requests over several members with failover, and the
//! error type [`HsmError`] that separates device failures (fail over) from logical refusals.
//!
//! Firmware keys are named by a 16-byte [`KeyId`] drawn at generation or import and stored with the
//! key, so the same key carries the same id in every pool member (see `docs/key-ceremony.md`).

pub mod pkcs11;
pub mod pool;
pub mod soft;

use std::path::{Path, PathBuf};
use std::time::Duration;

use flashgate_common::cert::ChipCertificate;
use flashgate_common::licence::{KeyId, Licence, LicenceError};
use flashgate_common::sfi::{FirmwareKey, ImageNonce, PlainArea, SfiError};
use rand::RngCore;
use zeroize::Zeroizing;

/// The public half of an audit-signing key (ECDSA P-256).
pub use p256::ecdsa::VerifyingKey as AuditPublicKey;
pub use pkcs11::{Pkcs11Config, Pkcs11Hsm};
pub use pool::{HsmPool, MemberStatus, PoolConfig};
pub use soft::{KdfParams, SoftHsm};

/// `CKA_LABEL` (and `CKA_ID`) of the audit-signing key pair on a PKCS#11 token.
pub const AUDIT_KEY_LABEL: &str = "flashgate-audit";

/// A firmware key as a backend lists it: its id and its human label (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyInfo {
    /// The 16-byte id carried in licences (`CKA_ID` in PKCS#11 tokens).
    pub key_id: KeyId,
    /// The label an operator gave the key (`CKA_LABEL`).
    pub label: String,
}

/// Draw a fresh random key id (16 bytes from the OS generator).
pub fn random_key_id() -> KeyId {
    let mut id = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut id);
    KeyId(id)
}

/// Something that holds firmware keys and does the profile's key operations with them, without
/// ever handing a key out. Blocking: async callers use `tokio::task::spawn_blocking` (the
/// [`HsmPool`] does, except for licences of backends whose
/// [`licence_in_memory`](HsmBackend::licence_in_memory) is true). Implementations must be safe to call from several threads at once, up to
/// [`capacity`](HsmBackend::capacity) calls in parallel.
pub trait HsmBackend: Send + Sync {
    /// A short name for logs, metrics and status (e.g. `soft:/var/lib/flashgate/keys.fgks`).
    fn name(&self) -> &str;

    /// Generate a new AES-128 firmware key inside the backend, under a fresh random key id.
    fn generate_key(&self, label: &str) -> Result<KeyInfo, HsmError>;

    /// Import a firmware key under a given key id (the key ceremony uses the same id in every member).
    fn import_key_with_id(&self, key_id: KeyId, label: &str, key: &FirmwareKey) -> Result<KeyInfo, HsmError>;

    /// Import a firmware key under a fresh random key id.
    fn import_key(&self, label: &str, key: &FirmwareKey) -> Result<KeyInfo, HsmError> {
        self.import_key_with_id(random_key_id(), label, key)
    }

    /// Whether the backend holds the key.
    fn has_key(&self, key_id: &KeyId) -> Result<bool, HsmError>;

    /// Every key the backend holds (ids and labels).
    fn list_keys(&self) -> Result<Vec<KeyInfo>, HsmError>;

    /// Issue a licence (profile §4) of key `key_id` with image nonce `nonce` for the chip of `cert`,
    /// with a fresh ephemeral key. The certificate MUST already have been verified against the
    /// trusted vendor CA keys by the caller; the backend only checks that its point is usable.
    fn issue_licence(&self, key_id: &KeyId, cert: &ChipCertificate, nonce: &ImageNonce) -> Result<Licence, HsmError>;

    /// Encrypt plaintext areas into an `.sfi` image (profile §2) under key `key_id` and `nonce`,
    /// byte for byte what `flashgate_common::sfi::write_image` produces. The caller must use a
    /// fresh nonce per image.
    fn encrypt_image(&self, key_id: &KeyId, nonce: &ImageNonce, areas: &[PlainArea]) -> Result<Vec<u8>, HsmError>;

    /// The public half of this member's audit-signing key (ECDSA P-256), creating the key inside the
    /// member if it has none yet (soft keystore: stored encrypted in the keystore; PKCS#11: a key pair
    /// generated on the token with label [`AUDIT_KEY_LABEL`], `CKA_SIGN`, non-extractable). The broker
    /// calls it at start. Backends without one answer [`HsmError::Unsupported`].
    fn ensure_audit_key(&self) -> Result<AuditPublicKey, HsmError> {
        Err(HsmError::Unsupported(format!("HSM \"{}\" has no audit-signing key", self.name())))
    }

    /// Sign `message` with the audit-signing key: ECDSA P-256 over SHA-256(message), `r || s`.
    /// [`HsmError::NoAuditKey`] before [`HsmBackend::ensure_audit_key`] created it.
    fn sign_audit(&self, message: &[u8]) -> Result<[u8; 64], HsmError> {
        let _ = message;
        Err(HsmError::Unsupported(format!("HSM \"{}\" has no audit-signing key", self.name())))
    }

    /// Check the backend can serve requests (a cheap round trip to the device).
    fn health(&self) -> Result<(), HsmError>;

    /// How many calls the backend serves in parallel (its session pool size); at least 1.
    fn capacity(&self) -> usize;

    /// Whether [`issue_licence`](HsmBackend::issue_licence) is a bounded computation in memory — no
    /// device, no I/O, no lock held across I/O — that the pool may run on the calling task instead of
    /// tokio's blocking pool. True for the soft keystore (one key generation, one ECDH, one key wrap:
    /// tens of microseconds, less than the two thread wake-ups a hand-off to the blocking pool costs);
    /// device backends keep the default, false.
    fn licence_in_memory(&self) -> bool {
        false
    }
}

/// Errors of HSM backends and of the pool. [`HsmError::is_device_error`] tells failures of the
/// device or its transport (another pool member may succeed) from logical refusals (every member
/// would refuse the same way). Messages never contain key material or PINs.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// No key with this id in the backend.
    #[error("no firmware key with id {key_id} in HSM \"{member}\"")]
    UnknownKey {
        /// The backend's name.
        member: String,
        /// The id asked for.
        key_id: KeyId,
    },
    /// A key with this id already exists (ids are unique per backend).
    #[error("HSM \"{member}\" already holds a key with id {key_id}")]
    DuplicateKey {
        /// The backend's name.
        member: String,
        /// The id.
        key_id: KeyId,
    },
    /// The member has no audit-signing key yet (`ensure_audit_key` was not called).
    #[error("HSM \"{member}\" holds no audit-signing key yet")]
    NoAuditKey {
        /// The backend's name.
        member: String,
    },
    /// The label is empty or too long.
    #[error("invalid key label {label:?}: {reason}")]
    InvalidLabel {
        /// The label given.
        label: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The certificate's chip key is unusable (not a P-256 point) or the licence math refused.
    #[error("cannot issue a licence for device {device_id}: {source}")]
    Licence {
        /// The chip's device id (`hex(SHA-256(chip_pub))[0..32]`).
        device_id: String,
        /// What refused.
        source: LicenceError,
    },
    /// The plaintext areas do not make a valid image.
    #[error("cannot encrypt the image: {0}")]
    Image(#[from] SfiError),
    /// The keystore passphrase is wrong (or the file was altered): the keystore did not decrypt.
    #[error("keystore {path}: wrong passphrase (or the file was altered): it does not decrypt")]
    WrongPassphrase {
        /// The keystore file.
        path: PathBuf,
    },
    /// The keystore file could not be read or written.
    #[error("keystore {path}: {op} failed: {source}")]
    KeystoreIo {
        /// The file.
        path: PathBuf,
        /// What was being done (`read`, `write temporary file`, `rename`, …).
        op: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The keystore file is malformed.
    #[error("keystore {path}: malformed: {reason}")]
    KeystoreFormat {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The keystore passphrase is empty.
    #[error("the keystore passphrase (FLASHGATE_KEYSTORE_PASSPHRASE) is empty")]
    EmptyPassphrase,
    /// The key derivation (argon2id) refused its parameters.
    #[error("keystore key derivation (argon2id m={m_cost} KiB t={t_cost} p={p_cost}) failed: {reason}")]
    Kdf {
        /// Memory cost in KiB.
        m_cost: u32,
        /// Iterations.
        t_cost: u32,
        /// Parallelism.
        p_cost: u32,
        /// The KDF's error.
        reason: String,
    },
    /// A PKCS#11 call failed on the token (a device error: the pool fails over).
    #[error("PKCS#11 {function}{} on token \"{token}\" failed: {rv}", mechanism.map(|m| format!("({m})")).unwrap_or_default())]
    Pkcs11 {
        /// The PKCS#11 function (`C_DeriveKey`, …).
        function: &'static str,
        /// The mechanism, when the call takes one (`CKM_ECDH1_DERIVE`, …).
        mechanism: Option<&'static str>,
        /// The token label.
        token: String,
        /// The return value or library error (`CKR_DEVICE_ERROR`, …).
        rv: String,
    },
    /// The PKCS#11 module could not be loaded or initialised.
    #[error("PKCS#11 module {path}: {reason}")]
    Module {
        /// The module path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// No slot holds a token with this label.
    #[error("PKCS#11 module {module}: no token labelled \"{label}\" (tokens present: {present})")]
    TokenNotFound {
        /// The module path.
        module: PathBuf,
        /// The label asked for.
        label: String,
        /// The labels found, comma-separated.
        present: String,
    },
    /// The token answered something the profile cannot use (e.g. a malformed EC point).
    #[error("token \"{token}\" returned an unusable {what}: {reason}")]
    TokenReply {
        /// The token label.
        token: String,
        /// What was returned (`CKA_EC_POINT`, wrapped key, …).
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A device failure reported by a backend that is not PKCS#11 (e.g. a test double, a lost link).
    #[error("HSM \"{member}\" device failure: {reason}")]
    Device {
        /// The backend's name.
        member: String,
        /// What failed.
        reason: String,
    },
    /// All pool members that were tried failed with device errors.
    #[error("all {attempts} HSM pool member(s) tried failed; last error: {last}")]
    AllMembersFailed {
        /// How many members were tried.
        attempts: usize,
        /// The last device error.
        last: Box<HsmError>,
    },
    /// The pool has no healthy member to send the request to.
    #[error("no healthy HSM in the pool ({members} member(s), all marked unhealthy)")]
    NoHealthyMember {
        /// How many members the pool has.
        members: usize,
    },
    /// The pool is saturated (its admission limit is reached): the request was shed instead of queued.
    #[error("HSM pool overloaded: {capacity} requests already admitted (running or queued), request shed")]
    Overloaded {
        /// The pool's total capacity.
        capacity: usize,
    },
    /// The request did not finish in time.
    #[error("HSM {op} timed out after {after:?}")]
    Timeout {
        /// The operation (`issue_licence`, `encrypt_image`).
        op: &'static str,
        /// The configured timeout.
        after: Duration,
    },
    /// The operation is not possible on this pool as configured.
    #[error("HSM pool: {0}")]
    Unsupported(String),
    /// A blocking HSM task panicked or was cancelled.
    #[error("HSM task for \"{member}\" did not complete: {reason}")]
    Task {
        /// The member the task ran on.
        member: String,
        /// Why.
        reason: String,
    },
}

impl HsmError {
    /// Whether the error is a failure of the device or its transport (another member may
    /// succeed: the pool fails over and marks the member unhealthy) rather than a logical refusal
    /// that every member would repeat (unknown key, unusable certificate, bad image, overload).
    pub fn is_device_error(&self) -> bool {
        matches!(
            self,
            HsmError::Pkcs11 { .. }
                | HsmError::Module { .. }
                | HsmError::TokenNotFound { .. }
                | HsmError::TokenReply { .. }
                | HsmError::Device { .. }
                | HsmError::KeystoreIo { .. }
                | HsmError::Task { .. }
        )
    }
}

/// Validate a key label: 1..=64 bytes, printable, no control characters.
pub(crate) fn check_label(label: &str) -> Result<(), HsmError> {
    let bad = |reason| Err(HsmError::InvalidLabel { label: label.to_string(), reason });
    if label.is_empty() {
        return bad("empty");
    }
    if label.len() > 64 {
        return bad("longer than 64 bytes");
    }
    if label.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    Ok(())
}

/// Read ST-style key files: `key.bin` (the 16-byte AES-128 firmware key) and `nonce.bin` (the
/// 12-byte image nonce), as `flashgate pack --generate-key` writes them. Used by the key
/// ceremony's import path; the caller destroys the files afterwards.
pub fn read_key_files(key_path: &Path, nonce_path: &Path) -> Result<(FirmwareKey, ImageNonce), HsmError> {
    let read = |path: &Path, want: usize| -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| HsmError::KeystoreIo {
            path: path.to_path_buf(),
            op: "read key file",
            source,
        })?);
        if bytes.len() != want {
            return Err(HsmError::KeystoreFormat {
                path: path.to_path_buf(),
                reason: format!("expected exactly {want} bytes, found {}", bytes.len()),
            });
        }
        Ok(bytes)
    };
    let key_bytes = read(key_path, 16)?;
    let nonce_bytes = read(nonce_path, 12)?;
    let mut key = Zeroizing::new([0u8; 16]);
    key.copy_from_slice(&key_bytes);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&nonce_bytes);
    Ok((FirmwareKey::new(*key), ImageNonce(nonce)))
}

/// Map a licence-math error to [`HsmError::Licence`] naming the device.
pub(crate) fn licence_error(cert: &ChipCertificate, source: LicenceError) -> HsmError {
    HsmError::Licence { device_id: cert.device_id().to_string(), source }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn device_errors_are_classified() {
        assert!(HsmError::Device { member: "a".into(), reason: "x".into() }.is_device_error());
        assert!(!HsmError::UnknownKey { member: "a".into(), key_id: KeyId([0; 16]) }.is_device_error());
        assert!(!HsmError::Overloaded { capacity: 1 }.is_device_error());
    }

    #[test]
    fn pkcs11_error_message_names_function_mechanism_and_token() {
        let e = HsmError::Pkcs11 {
            function: "C_DeriveKey",
            mechanism: Some("CKM_ECDH1_DERIVE"),
            token: "fg-test-1".into(),
            rv: "CKR_DEVICE_ERROR".into(),
        };
        assert_eq!(
            e.to_string(),
            "PKCS#11 C_DeriveKey(CKM_ECDH1_DERIVE) on token \"fg-test-1\" failed: CKR_DEVICE_ERROR"
        );
    }

    #[test]
    fn labels_are_checked() {
        assert!(check_label("fw-2025").is_ok());
        assert!(check_label("").is_err());
        assert!(check_label("a\nb").is_err());
        assert!(check_label(&"x".repeat(65)).is_err());
    }

    #[test]
    fn key_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key.bin"), [7u8; 16]).unwrap();
        std::fs::write(dir.path().join("nonce.bin"), [9u8; 12]).unwrap();
        let (k, n) = read_key_files(&dir.path().join("key.bin"), &dir.path().join("nonce.bin")).unwrap();
        assert_eq!(k.as_bytes(), &[7u8; 16]);
        assert_eq!(n.0, [9u8; 12]);
        std::fs::write(dir.path().join("nonce.bin"), [9u8; 11]).unwrap();
        let e = read_key_files(&dir.path().join("key.bin"), &dir.path().join("nonce.bin")).unwrap_err();
        assert!(e.to_string().contains("expected exactly 12 bytes, found 11"), "{e}");
    }
}
