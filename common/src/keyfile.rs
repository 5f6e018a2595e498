//! ST-style firmware key files: `key.bin` (16 raw bytes) and `nonce.bin` (12 raw bytes), as the
//! Trusted Package Creator takes them. Reading checks exact sizes; generating draws fresh random
//! values and writes the files with mode 0600 so only the owner can read the key.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::licence::KeyId;
use crate::sfi::{FirmwareKey, ImageNonce};

/// File name of a generated key.
pub const KEY_FILE: &str = "key.bin";
/// File name of a generated nonce.
pub const NONCE_FILE: &str = "nonce.bin";

/// A key or nonce file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file does not hold exactly the expected number of bytes.
    #[error("{path}: a {what} file holds exactly {expected} raw bytes, this one holds {actual}")]
    WrongSize {
        /// The file.
        path: PathBuf,
        /// `key` or `nonce`.
        what: &'static str,
        /// Required size.
        expected: usize,
        /// Size found.
        actual: usize,
    },
    /// Refused to overwrite an existing key or nonce file.
    #[error("{path}: already exists; refusing to overwrite a key or nonce file")]
    Exists {
        /// The file.
        path: PathBuf,
    },
}

fn read_exact_file<const N: usize>(path: &Path, what: &'static str) -> Result<Zeroizing<[u8; N]>, KeyFileError> {
    let bytes = Zeroizing::new(fs::read(path).map_err(|source| KeyFileError::Io { path: path.to_path_buf(), source })?);
    let mut out = Zeroizing::new([0u8; N]);
    if bytes.len() != N {
        return Err(KeyFileError::WrongSize { path: path.to_path_buf(), what, expected: N, actual: bytes.len() });
    }
    out.copy_from_slice(&bytes);
    Ok(out)
}

/// Read a 16-byte firmware key file.
pub fn read_key_file(path: &Path) -> Result<FirmwareKey, KeyFileError> {
    let raw = read_exact_file::<16>(path, "key")?;
    Ok(FirmwareKey::new(*raw))
}

/// Read a 12-byte image nonce file.
pub fn read_nonce_file(path: &Path) -> Result<ImageNonce, KeyFileError> {
    let raw = read_exact_file::<12>(path, "nonce")?;
    Ok(ImageNonce(*raw))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyFileError> {
    let io = |source| KeyFileError::Io { path: path.to_path_buf(), source };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyFileError::Exists { path: path.to_path_buf() }
        } else {
            io(e)
        }
    })?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Generate a fresh key and nonce, writing `DIR/key.bin` and `DIR/nonce.bin` with mode 0600.
/// Refuses to overwrite existing files. Returns the key, the nonce and the two paths.
pub fn generate_key_files(dir: &Path) -> Result<(FirmwareKey, ImageNonce, PathBuf, PathBuf), KeyFileError> {
    fs::create_dir_all(dir).map_err(|source| KeyFileError::Io { path: dir.to_path_buf(), source })?;
    let mut key = Zeroizing::new([0u8; 16]);
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(key.as_mut());
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let key_path = dir.join(KEY_FILE);
    let nonce_path = dir.join(NONCE_FILE);
    write_private(&key_path, key.as_ref())?;
    write_private(&nonce_path, &nonce)?;
    Ok((FirmwareKey::new(*key), ImageNonce(nonce), key_path, nonce_path))
}

/// Draw a fresh random image nonce (every packing needs a new one).
pub fn fresh_nonce() -> ImageNonce {
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    ImageNonce(nonce)
}

/// Suffix of the record, beside a key file, of the nonces already used with that key
/// (`key.bin.nonces`: one nonce in hex per line, appended and synced by every packing).
pub const USED_NONCES_SUFFIX: &str = ".nonces";

/// Largest used-nonce record read (1 MiB, about 40,000 packings of one key).
pub const MAX_USED_NONCES_FILE: u64 = 1 << 20;

fn used_nonces_path(key_path: &Path) -> PathBuf {
    let mut name = key_path.as_os_str().to_owned();
    name.push(USED_NONCES_SUFFIX);
    PathBuf::from(name)
}

/// Whether `nonce` was already used with the key in `key_path` (by a packing that recorded it).
pub fn nonce_used(key_path: &Path, nonce: &ImageNonce) -> Result<bool, KeyFileError> {
    let path = used_nonces_path(key_path);
    let io = |source| KeyFileError::Io { path: path.clone(), source };
    match fs::metadata(&path) {
        Ok(m) if m.len() > MAX_USED_NONCES_FILE => {
            return Err(io(std::io::Error::other(format!(
                "{} bytes; a used-nonce record is at most {MAX_USED_NONCES_FILE}",
                m.len()
            ))));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(e)),
    }
    let text = fs::read_to_string(&path).map_err(io)?;
    let want = hex::encode(nonce.0);
    Ok(text.lines().any(|l| l.trim().eq_ignore_ascii_case(&want)))
}

/// Record that `nonce` has been used with the key in `key_path` (appended, synced, mode 0600).
pub fn record_nonce(key_path: &Path, nonce: &ImageNonce) -> Result<(), KeyFileError> {
    let path = used_nonces_path(key_path);
    let io = |source| KeyFileError::Io { path: path.clone(), source };
    let mut options = fs::OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(&path).map_err(io)?;
    writeln!(f, "{}", hex::encode(nonce.0)).map_err(io)?;
    f.sync_all().map_err(io)
}

/// The key id the lab flow uses when none is given: the first 16 bytes of
/// SHA-256("Flashgate key id v1" || K). Stable per key; reveals nothing usable about `K`.
pub fn default_key_id(key: &FirmwareKey) -> KeyId {
    let mut h = Sha256::new();
    h.update(b"Flashgate key id v1");
    h.update(key.as_bytes());
    let digest = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    KeyId(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_then_read_back_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let (key, nonce, kp, np) = generate_key_files(dir.path()).unwrap();
        assert_eq!(read_key_file(&kp).unwrap().as_bytes(), key.as_bytes());
        assert_eq!(read_nonce_file(&np).unwrap().0, nonce.0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&kp).unwrap().permissions().mode() & 0o777, 0o600);
            assert_eq!(fs::metadata(&np).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(matches!(generate_key_files(dir.path()), Err(KeyFileError::Exists { .. })));
    }

    #[test]
    fn used_nonces_are_recorded_beside_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (_, nonce, kp, _) = generate_key_files(dir.path()).unwrap();
        assert!(!nonce_used(&kp, &nonce).unwrap());
        record_nonce(&kp, &nonce).unwrap();
        assert!(nonce_used(&kp, &nonce).unwrap());
        assert!(!nonce_used(&kp, &fresh_nonce()).unwrap());
        assert!(dir.path().join("key.bin.nonces").exists());
    }

    #[test]
    fn wrong_sizes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.bin");
        fs::write(&p, [0u8; 17]).unwrap();
        let msg = read_key_file(&p).unwrap_err().to_string();
        assert!(msg.contains("exactly 16") && msg.contains("holds 17"), "{msg}");
        let msg = read_nonce_file(&p).unwrap_err().to_string();
        assert!(msg.contains("exactly 12"), "{msg}");
    }
}
