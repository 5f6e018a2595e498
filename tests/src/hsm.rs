//! HSM backends for fault scenarios: [`Switchable`] wraps any backend and can be "unplugged" (every
//! call, health checks included, then fails with [`HsmError::Device`], as a token pulled out of its
//! slot would) and plugged back, or slowed down (a fixed delay before each licence or image, to
//! keep requests in flight while a test does something else), with an optional capacity override
//! (how many calls the pool runs on it at once).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use flashgate_broker::hsm::{HsmBackend, HsmError, KeyInfo};
use flashgate_common::cert::ChipCertificate;
use flashgate_common::licence::{KeyId, Licence};
use flashgate_common::sfi::{FirmwareKey, ImageNonce, PlainArea};

/// A backend that delegates to `inner` unless unplugged; optionally slow.
pub struct Switchable {
    inner: Arc<dyn HsmBackend>,
    name: String,
    unplugged: AtomicBool,
    delay_ms: AtomicU64,
    licences: AtomicU64,
    capacity: Option<usize>,
}

impl Switchable {
    /// Wraps `inner` under the member name `name`.
    pub fn new(name: impl Into<String>, inner: Arc<dyn HsmBackend>) -> Arc<Self> {
        Self::build(name.into(), inner, None)
    }

    /// Wraps `inner`, announcing `capacity` parallel calls instead of the inner backend's.
    pub fn with_capacity(name: impl Into<String>, inner: Arc<dyn HsmBackend>, capacity: usize) -> Arc<Self> {
        Self::build(name.into(), inner, Some(capacity))
    }

    fn build(name: String, inner: Arc<dyn HsmBackend>, capacity: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            name,
            unplugged: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            licences: AtomicU64::new(0),
            capacity,
        })
    }

    /// From now on every call fails with a device error.
    pub fn unplug(&self) {
        self.unplugged.store(true, Ordering::SeqCst);
    }

    /// Calls reach the inner backend again.
    pub fn plug(&self) {
        self.unplugged.store(false, Ordering::SeqCst);
    }

    /// Sleep this long before each licence or image operation.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Licences this member returned successfully.
    pub fn licences_issued(&self) -> u64 {
        self.licences.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<(), HsmError> {
        if self.unplugged.load(Ordering::SeqCst) {
            return Err(HsmError::Device { member: self.name.clone(), reason: "unplugged".into() });
        }
        Ok(())
    }

    fn pause(&self) {
        let ms = self.delay_ms.load(Ordering::SeqCst);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
}

impl HsmBackend for Switchable {
    fn name(&self) -> &str {
        &self.name
    }

    fn generate_key(&self, label: &str) -> Result<KeyInfo, HsmError> {
        self.check()?;
        self.inner.generate_key(label)
    }

    fn import_key_with_id(&self, key_id: KeyId, label: &str, key: &FirmwareKey) -> Result<KeyInfo, HsmError> {
        self.check()?;
        self.inner.import_key_with_id(key_id, label, key)
    }

    fn has_key(&self, key_id: &KeyId) -> Result<bool, HsmError> {
        self.check()?;
        self.inner.has_key(key_id)
    }

    fn list_keys(&self) -> Result<Vec<KeyInfo>, HsmError> {
        self.check()?;
        self.inner.list_keys()
    }

    fn issue_licence(&self, key_id: &KeyId, cert: &ChipCertificate, nonce: &ImageNonce) -> Result<Licence, HsmError> {
        self.check()?;
        self.pause();
        let licence = self.inner.issue_licence(key_id, cert, nonce)?;
        // Pulled out while the operation ran: the answer is lost with the device.
        self.check()?;
        self.licences.fetch_add(1, Ordering::SeqCst);
        Ok(licence)
    }

    fn encrypt_image(&self, key_id: &KeyId, nonce: &ImageNonce, areas: &[PlainArea]) -> Result<Vec<u8>, HsmError> {
        self.check()?;
        self.pause();
        self.inner.encrypt_image(key_id, nonce, areas)
    }

    fn ensure_audit_key(&self) -> Result<flashgate_broker::hsm::AuditPublicKey, HsmError> {
        self.check()?;
        self.inner.ensure_audit_key()
    }

    fn sign_audit(&self, message: &[u8]) -> Result<[u8; 64], HsmError> {
        self.check()?;
        self.inner.sign_audit(message)
    }

    fn health(&self) -> Result<(), HsmError> {
        self.check()?;
        self.inner.health()
    }

    fn capacity(&self) -> usize {
        self.capacity.unwrap_or_else(|| self.inner.capacity())
    }
}
