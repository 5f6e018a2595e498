//! The software HSM, the broker's embedded default: firmware keys kept in a keystore file
//! encrypted under a key derived from a passphrase (`FLASHGATE_KEYSTORE_PASSPHRASE`, passed in by
//! the configuration), with the same licence math as the PKCS#11 backend done in RustCrypto.
//!
//! File format (JSON envelope, version 1):
//! `{"format":"flashgate-keystore","version":1,"kdf":{"alg":"argon2id","m_cost":…,"t_cost":…,
//! "p_cost":…,"salt":"<hex>"},"cipher":"aes-256-gcm","nonce":"<hex>","ciphertext":"<hex>"}`.
//! The AES-256-GCM key is argon2id(passphrase, salt); the AAD binds format, version and KDF
//! parameters; the plaintext is the binary key table `"FGKT" || u32 count || count × (key_id[16]
//! || key[16] || u16 label_len || label)` (little-endian), followed — once the broker has created
//! its audit-signing key — by `"FGAS" || scalar[32]`, the ECDSA P-256 private key that signs audit
//! checkpoints (created at the broker's first start, never leaves the keystore; a table without it
//! is read as before). The file is written atomically (temporary
//! file with mode 0600, fsync, rename, fsync of the directory); keys in memory are zeroized on drop.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use flashgate_common::cert::ChipCertificate;
use flashgate_common::licence::{KeyId, Licence, issue_with_os_ephemeral};
use flashgate_common::sfi::{FirmwareKey, ImageNonce, PlainArea, image_to_vec};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use rand::RngCore;
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{HsmBackend, HsmError, KeyInfo, check_label, licence_error, random_key_id};

const FORMAT: &str = "flashgate-keystore";
const VERSION: u32 = 1;
const TABLE_MAGIC: &[u8; 4] = b"FGKT";
/// Marks the audit-signing key after the key entries of the table.
const AUDIT_MAGIC: &[u8; 4] = b"FGAS";
const SALT_LEN: usize = 16;

/// argon2id parameters of the keystore key derivation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory cost in KiB.
    pub m_cost: u32,
    /// Number of passes.
    pub t_cost: u32,
    /// Degree of parallelism.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// OWASP's argon2id recommendation: 19 MiB, 2 passes, 1 lane.
    fn default() -> Self {
        Self { m_cost: 19 * 1024, t_cost: 2, p_cost: 1 }
    }
}

#[derive(Serialize, Deserialize)]
struct KdfSection {
    alg: String,
    #[serde(flatten)]
    params: KdfParams,
    salt: String,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: String,
    version: u32,
    kdf: KdfSection,
    cipher: String,
    nonce: String,
    ciphertext: String,
}

struct Entry {
    label: String,
    key: FirmwareKey,
}

/// The software HSM: a passphrase-protected keystore file and its keys in memory.
pub struct SoftHsm {
    name: String,
    path: PathBuf,
    params: KdfParams,
    salt: [u8; SALT_LEN],
    /// argon2id(passphrase, salt): the keystore encryption key (zeroized on drop).
    store_key: Zeroizing<[u8; 32]>,
    keys: RwLock<BTreeMap<KeyId, Entry>>,
    /// The audit-signing key, once created (zeroized on drop).
    audit: RwLock<Option<SigningKey>>,
    /// Serialises writers of the file (readers use `keys` only).
    write_lock: Mutex<()>,
    capacity: usize,
}

impl std::fmt::Debug for SoftHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftHsm").field("path", &self.path).field("params", &self.params).finish_non_exhaustive()
    }
}

/// Largest argon2id memory cost a keystore file may ask for, KiB (1 GiB): the parameters are read from
/// the file, so a tampered file could otherwise make opening it take all memory or hours.
pub const MAX_KDF_M_COST: u32 = 1 << 20;
/// Most argon2id passes a keystore file may ask for.
pub const MAX_KDF_T_COST: u32 = 16;
/// Most argon2id lanes a keystore file may ask for.
pub const MAX_KDF_P_COST: u32 = 16;

fn derive_store_key(passphrase: &str, salt: &[u8], p: KdfParams) -> Result<Zeroizing<[u8; 32]>, HsmError> {
    let kdf_err = |reason: String| HsmError::Kdf { m_cost: p.m_cost, t_cost: p.t_cost, p_cost: p.p_cost, reason };
    if p.m_cost > MAX_KDF_M_COST || p.t_cost > MAX_KDF_T_COST || p.p_cost > MAX_KDF_P_COST {
        return Err(kdf_err(format!(
            "beyond the limits (memory at most {MAX_KDF_M_COST} KiB, at most {MAX_KDF_T_COST} passes and \
             {MAX_KDF_P_COST} lanes)"
        )));
    }
    let params = argon2::Params::new(p.m_cost, p.t_cost, p.p_cost, Some(32)).map_err(|e| kdf_err(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon.hash_password_into(passphrase.as_bytes(), salt, out.as_mut()).map_err(|e| kdf_err(e.to_string()))?;
    Ok(out)
}

fn aad(params: &KdfParams, salt_hex: &str) -> String {
    format!("{FORMAT}/v{VERSION}/argon2id/m={}/t={}/p={}/salt={salt_hex}", params.m_cost, params.t_cost, params.p_cost)
}

impl SoftHsm {
    /// Create a new, empty keystore at `path` (refuses to overwrite an existing file).
    pub fn create(path: &Path, passphrase: &Zeroizing<String>, params: KdfParams) -> Result<Self, HsmError> {
        if passphrase.is_empty() {
            return Err(HsmError::EmptyPassphrase);
        }
        if path.exists() {
            return Err(HsmError::KeystoreIo {
                path: path.to_path_buf(),
                op: "create",
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "file already exists"),
            });
        }
        let mut salt = [0u8; SALT_LEN];
        OsRng.fill_bytes(&mut salt);
        let store_key = derive_store_key(passphrase, &salt, params)?;
        let hsm = Self::assemble(path, params, salt, store_key, BTreeMap::new(), None);
        hsm.persist(&BTreeMap::new(), None)?;
        Ok(hsm)
    }

    /// Open an existing keystore. A wrong passphrase is [`HsmError::WrongPassphrase`]; nothing is
    /// modified on any error.
    pub fn open(path: &Path, passphrase: &Zeroizing<String>) -> Result<Self, HsmError> {
        if passphrase.is_empty() {
            return Err(HsmError::EmptyPassphrase);
        }
        let io = |op| move |source| HsmError::KeystoreIo { path: path.to_path_buf(), op, source };
        let fmt_err = |reason: String| HsmError::KeystoreFormat { path: path.to_path_buf(), reason };
        let meta = std::fs::metadata(path).map_err(io("stat"))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "keystore file is readable by group or others; expected mode 0600");
        }
        let text = std::fs::read_to_string(path).map_err(io("read"))?;
        let env: Envelope =
            serde_json::from_str(&text).map_err(|e| fmt_err(format!("not a keystore envelope: {e}")))?;
        if env.format != FORMAT {
            return Err(fmt_err(format!("field format: expected {FORMAT:?}, found {:?}", env.format)));
        }
        if env.version != VERSION {
            return Err(fmt_err(format!("field version: expected {VERSION}, found {}", env.version)));
        }
        if env.kdf.alg != "argon2id" {
            return Err(fmt_err(format!("field kdf.alg: expected \"argon2id\", found {:?}", env.kdf.alg)));
        }
        if env.cipher != "aes-256-gcm" {
            return Err(fmt_err(format!("field cipher: expected \"aes-256-gcm\", found {:?}", env.cipher)));
        }
        let salt: [u8; SALT_LEN] = hex::decode(&env.kdf.salt)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| fmt_err(format!("field kdf.salt: expected {SALT_LEN} hex bytes")))?;
        let nonce: [u8; 12] = hex::decode(&env.nonce)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| fmt_err("field nonce: expected 12 hex bytes".to_string()))?;
        let ciphertext =
            hex::decode(&env.ciphertext).map_err(|e| fmt_err(format!("field ciphertext: not hex: {e}")))?;
        let params = env.kdf.params;
        let store_key = derive_store_key(passphrase, &salt, params)?;
        let cipher = Aes256Gcm::new(store_key.as_ref().into());
        let aad = aad(&params, &env.kdf.salt);
        let plain = Zeroizing::new(
            cipher
                .decrypt(Nonce::from_slice(&nonce), Payload { msg: &ciphertext, aad: aad.as_bytes() })
                .map_err(|_| HsmError::WrongPassphrase { path: path.to_path_buf() })?,
        );
        let (keys, audit) = parse_table(&plain).map_err(|reason| fmt_err(format!("key table: {reason}")))?;
        Ok(Self::assemble(path, params, salt, store_key, keys, audit))
    }

    /// Open the keystore at `path`, creating an empty one with `params` if there is no file.
    pub fn open_or_create(path: &Path, passphrase: &Zeroizing<String>, params: KdfParams) -> Result<Self, HsmError> {
        if path.exists() { Self::open(path, passphrase) } else { Self::create(path, passphrase, params) }
    }

    fn assemble(
        path: &Path,
        params: KdfParams,
        salt: [u8; SALT_LEN],
        store_key: Zeroizing<[u8; 32]>,
        keys: BTreeMap<KeyId, Entry>,
        audit: Option<SigningKey>,
    ) -> Self {
        Self {
            name: format!("soft:{}", path.display()),
            path: path.to_path_buf(),
            params,
            salt,
            store_key,
            keys: RwLock::new(keys),
            audit: RwLock::new(audit),
            write_lock: Mutex::new(()),
            capacity: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        }
    }

    /// The keystore file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Encrypt `keys` (and the audit-signing key) and replace the file atomically.
    fn persist(&self, keys: &BTreeMap<KeyId, Entry>, audit: Option<&SigningKey>) -> Result<(), HsmError> {
        let io = |op| move |source| HsmError::KeystoreIo { path: self.path.clone(), op, source };
        let plain = serialise_table(keys, audit);
        let salt_hex = hex::encode(self.salt);
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let cipher = Aes256Gcm::new(self.store_key.as_ref().into());
        let aad = aad(&self.params, &salt_hex);
        let ciphertext = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: &plain, aad: aad.as_bytes() })
            // AES-GCM encryption only fails beyond 64 GiB of plaintext; a key table is tiny.
            .map_err(|_| HsmError::KeystoreFormat { path: self.path.clone(), reason: "encryption failed".into() })?;
        let env = Envelope {
            format: FORMAT.into(),
            version: VERSION,
            kdf: KdfSection { alg: "argon2id".into(), params: self.params, salt: salt_hex },
            cipher: "aes-256-gcm".into(),
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(ciphertext),
        };
        let text = serde_json::to_string_pretty(&env)
            .map_err(|e| HsmError::KeystoreFormat { path: self.path.clone(), reason: e.to_string() })?;
        flashgate_common::atomic_file::write(&self.path, text.as_bytes(), flashgate_common::atomic_file::PRIVATE_MODE)
            .map_err(|e| io(e.op)(e.source))
    }

    /// Add a key: write the new table to disk first, then publish it in memory (no partial state).
    fn insert(&self, key_id: KeyId, label: &str, key: FirmwareKey) -> Result<KeyInfo, HsmError> {
        check_label(label)?;
        let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            if keys.contains_key(&key_id) {
                return Err(HsmError::DuplicateKey { member: self.name.clone(), key_id });
            }
            let mut next: BTreeMap<KeyId, Entry> =
                keys.iter().map(|(id, e)| (*id, Entry { label: e.label.clone(), key: e.key.clone() })).collect();
            next.insert(key_id, Entry { label: label.to_string(), key: key.clone() });
            let audit = self.audit.read().unwrap_or_else(|p| p.into_inner());
            self.persist(&next, audit.as_ref())?;
        }
        self.keys.write().unwrap_or_else(|p| p.into_inner()).insert(key_id, Entry { label: label.to_string(), key });
        tracing::info!(member = %self.name, %key_id, label, "firmware key stored");
        Ok(KeyInfo { key_id, label: label.to_string() })
    }

    fn with_key<T>(&self, key_id: &KeyId, f: impl FnOnce(&FirmwareKey) -> Result<T, HsmError>) -> Result<T, HsmError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let entry = keys.get(key_id).ok_or(HsmError::UnknownKey { member: self.name.clone(), key_id: *key_id })?;
        f(&entry.key)
    }
}

fn serialise_table(keys: &BTreeMap<KeyId, Entry>, audit: Option<&SigningKey>) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(8 + keys.len() * 64 + 36));
    out.extend_from_slice(TABLE_MAGIC);
    out.extend_from_slice(&(keys.len() as u32).to_le_bytes());
    for (id, e) in keys {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(e.key.as_bytes());
        // Labels are checked to be ≤ 64 bytes on insert.
        out.extend_from_slice(&(e.label.len() as u16).to_le_bytes());
        out.extend_from_slice(e.label.as_bytes());
    }
    if let Some(k) = audit {
        out.extend_from_slice(AUDIT_MAGIC);
        let scalar = Zeroizing::new(<[u8; 32]>::from(k.to_bytes()));
        out.extend_from_slice(scalar.as_ref());
    }
    out
}

type Table = (BTreeMap<KeyId, Entry>, Option<SigningKey>);

fn parse_table(b: &[u8]) -> Result<Table, String> {
    let take = |pos: &mut usize, n: usize| -> Result<&[u8], String> {
        let s = b.get(*pos..*pos + n).ok_or_else(|| format!("offset {}: truncated (need {n} bytes)", *pos))?;
        *pos += n;
        Ok(s)
    };
    let mut pos = 0;
    if take(&mut pos, 4)? != TABLE_MAGIC {
        return Err("offset 0: field magic: expected \"FGKT\"".into());
    }
    let count = u32::from_le_bytes(take(&mut pos, 4)?.try_into().map_err(|_| "count")?);
    let mut keys = BTreeMap::new();
    for i in 0..count {
        let at = pos;
        let mut id = [0u8; 16];
        id.copy_from_slice(take(&mut pos, 16)?);
        let mut key = Zeroizing::new([0u8; 16]);
        key.copy_from_slice(take(&mut pos, 16)?);
        let len = u16::from_le_bytes(take(&mut pos, 2)?.try_into().map_err(|_| "label length")?);
        let label = std::str::from_utf8(take(&mut pos, len.into())?)
            .map_err(|_| format!("offset {at}: entry {i} field label: not UTF-8"))?
            .to_string();
        if keys.insert(KeyId(id), Entry { label, key: FirmwareKey::new(*key) }).is_some() {
            return Err(format!("offset {at}: entry {i} field key_id: duplicate id {}", KeyId(id)));
        }
    }
    let mut audit = None;
    if b.len() > pos && b[pos..].starts_with(AUDIT_MAGIC) {
        let at = pos;
        pos += AUDIT_MAGIC.len();
        let scalar = Zeroizing::new(<[u8; 32]>::try_from(take(&mut pos, 32)?).map_err(|_| "audit key")?);
        audit = Some(
            SigningKey::from_slice(scalar.as_ref())
                .map_err(|_| format!("offset {at}: the audit-signing key is not a P-256 scalar"))?,
        );
    }
    if pos != b.len() {
        return Err(format!("offset {pos}: {} trailing bytes", b.len() - pos));
    }
    Ok((keys, audit))
}

impl HsmBackend for SoftHsm {
    fn name(&self) -> &str {
        &self.name
    }

    fn generate_key(&self, label: &str) -> Result<KeyInfo, HsmError> {
        self.insert(random_key_id(), label, FirmwareKey::generate(&mut OsRng))
    }

    fn import_key_with_id(&self, key_id: KeyId, label: &str, key: &FirmwareKey) -> Result<KeyInfo, HsmError> {
        self.insert(key_id, label, key.clone())
    }

    fn has_key(&self, key_id: &KeyId) -> Result<bool, HsmError> {
        Ok(self.keys.read().unwrap_or_else(|p| p.into_inner()).contains_key(key_id))
    }

    fn list_keys(&self) -> Result<Vec<KeyInfo>, HsmError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        Ok(keys.iter().map(|(id, e)| KeyInfo { key_id: *id, label: e.label.clone() }).collect())
    }

    fn issue_licence(&self, key_id: &KeyId, cert: &ChipCertificate, nonce: &ImageNonce) -> Result<Licence, HsmError> {
        self.with_key(key_id, |key| {
            // A fresh ephemeral key per licence (ring; destroyed inside the ECDH).
            issue_with_os_ephemeral(cert, key_id, key, nonce).map_err(|e| licence_error(cert, e))
        })
    }

    fn encrypt_image(&self, key_id: &KeyId, nonce: &ImageNonce, areas: &[PlainArea]) -> Result<Vec<u8>, HsmError> {
        self.with_key(key_id, |key| Ok(image_to_vec(key, nonce, areas)?))
    }

    fn ensure_audit_key(&self) -> Result<VerifyingKey, HsmError> {
        if let Some(k) = self.audit.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(*k.verifying_key());
        }
        let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = self.audit.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(*k.verifying_key());
        }
        let key = SigningKey::random(&mut OsRng);
        {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            self.persist(&keys, Some(&key))?;
        }
        let vk = *key.verifying_key();
        *self.audit.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
        tracing::info!(member = %self.name, "audit-signing key (ECDSA P-256) created in the keystore");
        Ok(vk)
    }

    fn sign_audit(&self, message: &[u8]) -> Result<[u8; 64], HsmError> {
        let audit = self.audit.read().unwrap_or_else(|p| p.into_inner());
        let key = audit.as_ref().ok_or_else(|| HsmError::NoAuditKey { member: self.name.clone() })?;
        let sig: Signature = key.sign(message);
        Ok(sig.to_bytes().into())
    }

    fn health(&self) -> Result<(), HsmError> {
        std::fs::metadata(&self.path).map(|_| ()).map_err(|source| HsmError::KeystoreIo {
            path: self.path.clone(),
            op: "stat",
            source,
        })
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn licence_in_memory(&self) -> bool {
        // `issue_licence` reads the key table under a read lock that writers hold only for an insert
        // (the keystore file is written before the lock is taken), then computes: no I/O.
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn table_round_trip_and_truncation() {
        let mut keys = BTreeMap::new();
        keys.insert(KeyId([1; 16]), Entry { label: "a".into(), key: FirmwareKey::new([2; 16]) });
        keys.insert(KeyId([3; 16]), Entry { label: "bé".into(), key: FirmwareKey::new([4; 16]) });
        let bytes = serialise_table(&keys, None);
        let (back, audit) = parse_table(&bytes).unwrap();
        assert!(audit.is_none());
        assert_eq!(back.len(), 2);
        assert_eq!(back[&KeyId([3; 16])].label, "bé");
        assert_eq!(back[&KeyId([3; 16])].key.as_bytes(), &[4; 16]);
        let e = parse_table(&bytes[..bytes.len() - 1]).err().unwrap();
        assert!(e.contains("truncated"), "{e}");
        // With the audit-signing key after the entries.
        let ak = SigningKey::from_slice(&[5; 32]).unwrap();
        let bytes = serialise_table(&keys, Some(&ak));
        let (back, audit) = parse_table(&bytes).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(audit.unwrap().to_bytes(), ak.to_bytes());
        let e = parse_table(&bytes[..bytes.len() - 1]).err().unwrap();
        assert!(e.contains("truncated"), "{e}");
        let mut zero = bytes.to_vec();
        let n = zero.len();
        zero[n - 32..].fill(0);
        let e = parse_table(&zero).err().unwrap();
        assert!(e.contains("not a P-256 scalar"), "{e}");
    }

    #[test]
    fn audit_key_is_created_once_stored_encrypted_and_signs() {
        use flashgate_common::checkpoint::{CheckpointHead, SignedCheckpoint};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.fgks");
        let pass = Zeroizing::new("pw".to_string());
        let fast = KdfParams { m_cost: 8, t_cost: 1, p_cost: 1 };
        let hsm = SoftHsm::create(&path, &pass, fast).unwrap();
        assert!(matches!(hsm.sign_audit(b"x"), Err(HsmError::NoAuditKey { .. })));
        let fw = hsm.generate_key("fw").unwrap();
        let vk = hsm.ensure_audit_key().unwrap();
        assert_eq!(hsm.ensure_audit_key().unwrap(), vk);
        let scalar = hsm.audit.read().unwrap().as_ref().unwrap().to_bytes();
        let file = std::fs::read_to_string(&path).unwrap();
        assert!(!file.contains(&hex::encode(scalar)), "the audit key is stored encrypted");
        // Reopened: the same audit key and the firmware keys, and keys added later keep it.
        let back = SoftHsm::open(&path, &pass).unwrap();
        assert_eq!(back.ensure_audit_key().unwrap(), vk);
        assert!(back.has_key(&fw.key_id).unwrap());
        back.generate_key("fw-2").unwrap();
        let again = SoftHsm::open(&path, &pass).unwrap();
        assert_eq!(again.ensure_audit_key().unwrap(), vk);
        let head = CheckpointHead { ledger_id: [1; 16], seq: 7, hash: [2; 32], at: 3, broker: "b".into() };
        let cp = SignedCheckpoint::from_parts(head.clone(), again.sign_audit(&head.body().unwrap()).unwrap()).unwrap();
        assert_eq!(cp.verify(&[vk]), Ok(0));
    }

    #[test]
    fn kdf_parameters_from_the_file_are_bounded() {
        let salt = [7u8; SALT_LEN];
        let at_edge = KdfParams { m_cost: 8, t_cost: MAX_KDF_T_COST, p_cost: 1 };
        assert!(derive_store_key("pw", &salt, at_edge).is_ok());
        for p in [
            KdfParams { m_cost: MAX_KDF_M_COST + 1, t_cost: 1, p_cost: 1 },
            KdfParams { m_cost: 8, t_cost: MAX_KDF_T_COST + 1, p_cost: 1 },
            KdfParams { m_cost: 64, t_cost: 1, p_cost: MAX_KDF_P_COST + 1 },
        ] {
            let e = derive_store_key("pw", &salt, p).err().unwrap().to_string();
            assert!(e.contains("beyond the limits"), "{e}");
        }
    }
}
