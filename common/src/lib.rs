//! Flashgate SFI profile v1, shared by every component: the `.sfi` image format and its crypto,
//! chip certificates, licences, STM32 family profiles, firmware inputs for the packer, and the
//! AN3155 bootloader constants with the Flashgate SFI opcodes, and the X.509 identities and
//! development PKI of the networked components (`pki`), the audit chain's record and genesis hashes (`audit`), the audit export and its offline verification
//! (`audit_export`), and signed audit checkpoints (`checkpoint`).

pub mod atomic_file;
pub mod audit;
pub mod audit_export;
pub mod batch_report;
pub mod cert;
pub mod checkpoint;
pub mod conformance;
pub mod device_export;
pub mod family;
pub mod firmware;
pub mod gcm;
pub mod keyfile;
pub mod licence;
pub mod pki;
pub mod protocol;
pub mod settings;
pub mod sfi;
