//! `--state-dir` persistence: every target's identity (chip private scalar and certificate),
//! flash, option bytes, RDP and SFI state survive simulator restarts. Per target `target-N.json`
//! (mode 0600: it holds the chip's private scalar) and `target-N.flash` (the raw array), each
//! written atomically (temporary file, fsync, rename). Also the CLI helpers for the simulator's
//! test vendor CA (`vendor-ca.key` PKCS#8 PEM mode 0600, `vendor-ca.pub` SPKI PEM) and for dumping
//! a target's flash from its state directory.
//!
//! When to write is decided by the callers through a [`PersistSignal`]: state-changing commands
//! ask for an immediate flush, flash writes for a debounced one, and shutdown flushes everything.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flashgate_common::cert::{ChipCertificate, ChipKey, VendorCa};
use flashgate_common::family::{Family, FamilyProfile};
use flashgate_common::protocol::{SfiState, SfiStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use zeroize::{Zeroize, Zeroizing};

use crate::device::{ChipIdentity, Device};
use crate::flash::Flash;

/// Version of the state file format.
pub const STATE_FORMAT: u32 = 1;
/// Delay before a debounced flush.
pub const DEBOUNCE: Duration = Duration::from_millis(500);
/// File name of the vendor CA private key.
pub const VENDOR_CA_KEY: &str = "vendor-ca.key";
/// File name of the vendor CA public key.
pub const VENDOR_CA_PUB: &str = "vendor-ca.pub";

/// A state or key file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A state file could not be written whole.
    #[error(transparent)]
    Write(#[from] flashgate_common::atomic_file::WriteError),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file's content is malformed.
    #[error("{path}: field {field}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The offending field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The state was saved for another family.
    #[error("{path}: target was saved as {found}, the simulator runs {expected}; use another --state-dir")]
    FamilyMismatch {
        /// The file.
        path: PathBuf,
        /// Family in the file.
        found: Family,
        /// Configured family.
        expected: Family,
    },
    /// A file that must not be overwritten exists.
    #[error("{path} already exists; refusing to overwrite it")]
    AlreadyExists {
        /// The file.
        path: PathBuf,
    },
    /// A target has no saved state.
    #[error("{path}: no saved state for target {target}")]
    NoSuchTarget {
        /// The file looked for.
        path: PathBuf,
        /// Target number.
        target: usize,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_path_buf(), source }
}

/// How soon a change must reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// Flush as soon as possible (state transitions, erases, RDP changes).
    Now,
    /// Flush after [`DEBOUNCE`] (flash programming; many writes coalesce).
    Debounced,
}

/// A target's "something changed" flag for the persister task.
#[derive(Debug, Default)]
pub struct PersistSignal {
    notify: Notify,
    dirty: AtomicBool,
    urgent: AtomicBool,
}

impl PersistSignal {
    /// Record a change.
    pub fn mark(&self, urgency: Urgency) {
        self.dirty.store(true, Ordering::SeqCst);
        if urgency == Urgency::Now {
            self.urgent.store(true, Ordering::SeqCst);
        }
        self.notify.notify_one();
    }

    /// Wait for a change; an urgent change returns at once, a debounced one at most [`DEBOUNCE`]
    /// after it was marked (or earlier if an urgent change follows).
    pub async fn wait(&self) {
        loop {
            if self.dirty.load(Ordering::SeqCst) {
                if !self.urgent.load(Ordering::SeqCst) {
                    let deadline = tokio::time::Instant::now() + DEBOUNCE;
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep_until(deadline) => break,
                            _ = self.notify.notified() => {
                                if self.urgent.load(Ordering::SeqCst) {
                                    break;
                                }
                            }
                        }
                    }
                }
                self.dirty.store(false, Ordering::SeqCst);
                self.urgent.store(false, Ordering::SeqCst);
                return;
            }
            self.notify.notified().await;
        }
    }
}

/// Everything saved about one target, taken under the device lock.
#[derive(Clone)]
pub struct Snapshot {
    family: Family,
    chip_scalar: Zeroizing<[u8; 32]>,
    certificate: ChipCertificate,
    flash: Vec<u8>,
    options: BTreeMap<u32, u32>,
    rdp_byte: u8,
    state: SfiState,
    last_status: SfiStatus,
}

impl Snapshot {
    /// Capture `device`.
    pub fn of(device: &Device) -> Self {
        Snapshot {
            family: device.profile().family,
            chip_scalar: device.identity().key().to_scalar(),
            certificate: device.identity().certificate().clone(),
            flash: device.flash().as_bytes().to_vec(),
            options: device.option_bytes().clone(),
            rdp_byte: device.rdp_byte(),
            state: device.sfi_state(),
            last_status: device.last_status(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct TargetFile {
    format: u32,
    family: Family,
    product_id: String,
    device_id: String,
    chip_private_scalar: String,
    certificate: String,
    option_bytes: BTreeMap<u32, u32>,
    rdp_byte: u8,
    sfi_state: u8,
    sfi_state_name: String,
    last_status: u16,
}

impl Drop for TargetFile {
    fn drop(&mut self) {
        self.chip_private_scalar.zeroize();
    }
}

/// Paths of target `index`'s state files: (`target-N.json`, `target-N.flash`).
pub fn target_paths(dir: &Path, index: usize) -> (PathBuf, PathBuf) {
    (dir.join(format!("target-{index}.json")), dir.join(format!("target-{index}.flash")))
}

/// Write `bytes` to `path` atomically ([`flashgate_common::atomic_file`]).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StateError> {
    Ok(flashgate_common::atomic_file::write(path, bytes, mode)?)
}

/// Save target `index` into `dir`.
pub fn save(dir: &Path, index: usize, snap: &Snapshot) -> Result<(), StateError> {
    let (json_path, flash_path) = target_paths(dir, index);
    write_atomic(&flash_path, &snap.flash, 0o600)?;
    let file = TargetFile {
        format: STATE_FORMAT,
        family: snap.family,
        product_id: snap.family.profile().product_id_str().to_string(),
        device_id: snap.certificate.device_id().to_string(),
        chip_private_scalar: hex::encode(*snap.chip_scalar),
        certificate: hex::encode(snap.certificate.to_bytes()),
        option_bytes: snap.options.clone(),
        rdp_byte: snap.rdp_byte,
        sfi_state: snap.state as u8,
        sfi_state_name: snap.state.name().to_string(),
        last_status: snap.last_status.code(),
    };
    let json = Zeroizing::new(serde_json::to_vec_pretty(&file).map_err(|e| StateError::Malformed {
        path: json_path.clone(),
        field: "(file)",
        message: e.to_string(),
    })?);
    write_atomic(&json_path, &json, 0o600)
}

/// Load target `index` from `dir`; `Ok(None)` when it has no saved state yet.
pub fn load(dir: &Path, index: usize, profile: &'static FamilyProfile) -> Result<Option<Device>, StateError> {
    let (json_path, flash_path) = target_paths(dir, index);
    let text = match fs::read(&json_path) {
        Ok(t) => Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&json_path)(e)),
    };
    let malformed =
        |field: &'static str, message: String| StateError::Malformed { path: json_path.clone(), field, message };
    let file: TargetFile = serde_json::from_slice(&text).map_err(|e| malformed("(file)", e.to_string()))?;
    if file.format != STATE_FORMAT {
        return Err(malformed("format", format!("expected {STATE_FORMAT}, found {}", file.format)));
    }
    if file.family != profile.family {
        return Err(StateError::FamilyMismatch { path: json_path, found: file.family, expected: profile.family });
    }
    let mut scalar = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(&file.chip_private_scalar, &mut scalar[..])
        .map_err(|e| malformed("chip_private_scalar", e.to_string()))?;
    let key = ChipKey::from_scalar(*scalar).map_err(|e| malformed("chip_private_scalar", e.to_string()))?;
    let cert_bytes = hex::decode(&file.certificate).map_err(|e| malformed("certificate", e.to_string()))?;
    let certificate = ChipCertificate::parse(&cert_bytes).map_err(|e| malformed("certificate", e.to_string()))?;
    let identity = ChipIdentity::new(key, certificate).map_err(|e| malformed("certificate", e.to_string()))?;
    let state = SfiState::from_code(file.sfi_state)
        .ok_or_else(|| malformed("sfi_state", format!("unknown state {}", file.sfi_state)))?;
    let last_status = SfiStatus::from_code(file.last_status)
        .ok_or_else(|| malformed("last_status", format!("unknown status 0x{:04X}", file.last_status)))?;
    let flash_bytes = fs::read(&flash_path).map_err(io_err(&flash_path))?;
    let flash = Flash::from_image(profile, flash_bytes).map_err(|e| StateError::Malformed {
        path: flash_path.clone(),
        field: "(flash image)",
        message: e.to_string(),
    })?;
    Ok(Some(Device::restore(profile, identity, flash, file.option_bytes.clone(), state, last_status)))
}

/// The saved flash of target `target` in `state_dir`.
pub fn dump_flash(state_dir: &Path, target: usize) -> Result<Vec<u8>, StateError> {
    let (json_path, flash_path) = target_paths(state_dir, target);
    if !json_path.exists() && !flash_path.exists() {
        return Err(StateError::NoSuchTarget { path: json_path, target });
    }
    fs::read(&flash_path).map_err(io_err(&flash_path))
}

/// Generate a fresh test vendor CA and write `dir/vendor-ca.key` (PKCS#8 PEM, mode 0600) and
/// `dir/vendor-ca.pub` (SPKI PEM). Refuses to overwrite an existing key.
pub fn write_vendor_ca(dir: &Path) -> Result<(PathBuf, PathBuf), StateError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let key_path = dir.join(VENDOR_CA_KEY);
    let pub_path = dir.join(VENDOR_CA_PUB);
    if key_path.exists() {
        return Err(StateError::AlreadyExists { path: key_path });
    }
    let ca = VendorCa::generate(&mut rand::rngs::OsRng);
    let pem = ca.to_pem();
    write_atomic(&key_path, pem.as_bytes(), 0o600)?;
    let public = ca.public_key().to_pem();
    write_atomic(&pub_path, public.as_bytes(), 0o644)?;
    Ok((key_path, pub_path))
}

/// Load a vendor CA private key (PKCS#8 PEM).
pub fn load_vendor_ca(path: &Path) -> Result<VendorCa, StateError> {
    let pem = Zeroizing::new(fs::read_to_string(path).map_err(io_err(path))?);
    VendorCa::from_pem(&pem).map_err(|e| StateError::Malformed {
        path: path.to_path_buf(),
        field: "(PKCS#8 PEM private key)",
        message: e.to_string(),
    })
}
