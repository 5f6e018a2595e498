//! The certificate of conformance of a batch (`flashgate-conformance-v1`, `flashgate admin batch
//! certificate`): what a broker states of a batch at one instant of its ledger — the batch, the counts of
//! its devices, the SHA-256 of the per-device export taken at that instant, and the signed checkpoint of
//! the audit head the export was taken at — signed with the broker's audit-signing key. This module owns
//! the format, signing input and the offline check ([`check`]) that `flashgate audit verify
//! --certificate` runs: the signature, the devices file against the certificate, and the devices file
//! against the audit chain up to the certificate's checkpoint.

use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::audit_export::BatchTally;
use crate::checkpoint::{CHECKPOINT_LEN, SignedCheckpoint};
use crate::device_export::{DeviceCounts, DevicesSummary};

/// The certificate's format name.
pub const CONFORMANCE_FORMAT: &str = "flashgate-conformance-v1";
/// Prefix of the signed bytes (distinct from the checkpoint's, so neither signature stands for the other).
pub const CONFORMANCE_DOMAIN: &[u8] = b"flashgate-conformance-v1\0";
/// Largest certificate file a reader accepts (bytes).
pub const MAX_CERTIFICATE: usize = 64 * 1024;

/// What the broker states (the signed part).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateBody {
    /// [`CONFORMANCE_FORMAT`].
    pub format: String,
    /// Hex ledger id.
    pub ledger_id: String,
    /// The broker that signed.
    pub broker: String,
    /// When (ms since the Unix epoch).
    pub issued_at_ms: i64,
    /// The batch.
    pub batch_id: String,
    /// Its product.
    pub product_id: String,
    /// Hex SHA-256 of its encrypted image.
    pub image_sha256: String,
    /// Hex key id of that image.
    pub key_id: String,
    /// Its quota.
    pub quota: i64,
    /// Its state at that instant (open, paused, closed).
    pub state: String,
    /// Counts over the per-device export.
    pub counts: DeviceCounts,
    /// Attempts the ledger holds for the batch.
    pub attempts: u64,
    /// Hex SHA-256 of the per-device export (`flashgate-devices-v1`), every byte.
    pub devices_sha256: String,
    /// Its length in bytes.
    pub devices_bytes: u64,
    /// Hex of the signed checkpoint of the audit head the export was taken at.
    pub checkpoint: String,
}

impl CertificateBody {
    /// The bytes the signature covers: [`CONFORMANCE_DOMAIN`] and the body's compact JSON.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = CONFORMANCE_DOMAIN.to_vec();
        // A struct of strings and integers always serialises.
        out.extend(serde_json::to_vec(self).unwrap_or_default());
        out
    }

    /// The checkpoint, parsed (its signature is not checked here).
    pub fn signed_checkpoint(&self) -> Result<SignedCheckpoint, CertificateError> {
        let bytes = hex::decode(&self.checkpoint).map_err(|e| CertificateError::Format(format!("checkpoint: {e}")))?;
        if bytes.len() != CHECKPOINT_LEN {
            return Err(CertificateError::Format(format!(
                "checkpoint is {} bytes, expected {CHECKPOINT_LEN}",
                bytes.len()
            )));
        }
        SignedCheckpoint::parse(&bytes).map_err(|e| CertificateError::Format(format!("checkpoint: {e}")))
    }
}

/// The certificate file: the body and its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// What is stated.
    pub body: CertificateBody,
    /// Hex `r || s` over [`CertificateBody::signed_bytes`].
    pub signature: String,
    /// Hex SHA-256 of the signing key's SubjectPublicKeyInfo (a hint; the signature decides).
    pub key_fingerprint: String,
}

impl Certificate {
    /// The file's text (pretty JSON and a newline).
    pub fn to_text(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Parses a certificate file.
    pub fn parse(bytes: &[u8]) -> Result<Self, CertificateError> {
        if bytes.len() > MAX_CERTIFICATE {
            return Err(CertificateError::Format(format!("larger than {MAX_CERTIFICATE} bytes")));
        }
        let c: Self = serde_json::from_slice(bytes).map_err(|e| CertificateError::Format(e.to_string()))?;
        if c.body.format != CONFORMANCE_FORMAT {
            return Err(CertificateError::Format(format!(
                "format {:?}, expected {CONFORMANCE_FORMAT:?}",
                c.body.format
            )));
        }
        Ok(c)
    }

    /// Verifies the signature and the checkpoint's under any of `trusted`.
    pub fn verify_signature(&self, trusted: &[VerifyingKey]) -> Result<SignedCheckpoint, CertificateError> {
        let raw = hex::decode(&self.signature).map_err(|e| CertificateError::Format(format!("signature: {e}")))?;
        let sig =
            Signature::from_slice(&raw).map_err(|_| CertificateError::Format("signature is not r || s".into()))?;
        let msg = self.body.signed_bytes();
        if !trusted.iter().any(|k| k.verify(&msg, &sig).is_ok()) {
            return Err(CertificateError::BadSignature);
        }
        let cp = self.body.signed_checkpoint()?;
        cp.verify(trusted).map_err(|e| CertificateError::Format(format!("checkpoint: {e}")))?;
        if hex::encode(cp.head.ledger_id) != self.body.ledger_id {
            return Err(CertificateError::Format(format!(
                "its checkpoint is of ledger {}, the certificate names ledger {}",
                hex::encode(cp.head.ledger_id),
                self.body.ledger_id
            )));
        }
        Ok(cp)
    }
}

/// Why a certificate does not hold.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// Not a certificate.
    #[error("certificate of conformance: {0}")]
    Format(String),
    /// No trusted key signed it (it was changed, or signed by another broker).
    #[error("certificate of conformance: the signature does not verify under any trusted key (changed after signing?)")]
    BadSignature,
    /// The devices file is not the one the certificate covers.
    #[error("devices file: {0}")]
    Devices(String),
    /// The devices file, or the certificate, disagrees with the audit chain.
    #[error("certificate against the audit chain: {0}")]
    Chain(String),
}

/// Checks a devices file (read by [`crate::device_export::summarise`]) against the certificate: the same
/// bytes, one batch, the counts stated.
pub fn check_devices(cert: &Certificate, devices: &DevicesSummary, bytes: u64) -> Result<(), CertificateError> {
    let b = &cert.body;
    let bad = |why: String| Err(CertificateError::Devices(why));
    if devices.sha256 != b.devices_sha256 || bytes != b.devices_bytes {
        return bad(format!(
            "SHA-256 {} over {bytes} bytes, the certificate covers {} over {} bytes (a different or truncated export)",
            devices.sha256, b.devices_sha256, b.devices_bytes
        ));
    }
    if devices.batches.iter().any(|x| *x != b.batch_id) {
        return bad(format!("holds batches {:?}, the certificate is of batch {:?}", devices.batches, b.batch_id));
    }
    if devices.counts != b.counts || devices.attempts_total != b.attempts {
        return bad(format!(
            "counts {:?} with {} attempts, the certificate states {:?} with {} attempts",
            devices.counts, devices.attempts_total, b.counts, b.attempts
        ));
    }
    Ok(())
}

/// Checks the devices file against what the chain records of the batch up to the certificate's checkpoint
/// (tallied by [`crate::audit_export::verify_tallying`] with the checkpoint as a witness): the licensed
/// devices are the `licence.issued` ones, the attempts are the `install.reported` ones, the refusals
/// their records.
pub fn check_chain(cert: &Certificate, devices: &DevicesSummary, tally: &BatchTally) -> Result<(), CertificateError> {
    let bad = |why: String| Err(CertificateError::Chain(why));
    if tally.batch_id != cert.body.batch_id {
        return bad(format!("tallied batch {:?}, the certificate is of {:?}", tally.batch_id, cert.body.batch_id));
    }
    if tally.issued != devices.licensed {
        return bad(format!(
            "the export lists {} licensed devices, the chain up to seq {} holds {} licence.issued records{}",
            devices.licensed.count,
            tally.upto_seq,
            tally.issued.count,
            if tally.issued.count == devices.licensed.count { " for other devices" } else { "" }
        ));
    }
    if tally.attempts.count != devices.attempts_total {
        return bad(format!(
            "the export counts {} attempts, the chain up to seq {} holds {} install.reported records",
            devices.attempts_total, tally.upto_seq, tally.attempts.count
        ));
    }
    if devices.capped_devices == 0 && tally.attempts != devices.attempts {
        return bad(format!(
            "the {} attempts of the export are not the {} install.reported records of the chain (a status, station or device changed)",
            devices.attempts_total, tally.attempts.count
        ));
    }
    if tally.refusals != devices.counts.refusals {
        return bad(format!(
            "the export counts {} refusals, the chain up to seq {} holds {} licence.refused records",
            devices.counts.refusals, tally.upto_seq, tally.refusals
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer as _;

    use super::*;
    use crate::checkpoint::CheckpointHead;

    fn signed(key: &SigningKey) -> Certificate {
        let cp =
            CheckpointHead { ledger_id: [7; 16], seq: 5, hash: [1; 32], at: 9, broker: "b".into() }.sign(key).unwrap();
        let body = CertificateBody {
            format: CONFORMANCE_FORMAT.into(),
            ledger_id: hex::encode([7u8; 16]),
            broker: "b".into(),
            issued_at_ms: 1,
            batch_id: "B".into(),
            product_id: "P".into(),
            image_sha256: "00".into(),
            key_id: "11".into(),
            quota: 10,
            state: "open".into(),
            counts: DeviceCounts { devices: 3, issued: 3, installed: 2, ..DeviceCounts::default() },
            attempts: 3,
            devices_sha256: "ab".into(),
            devices_bytes: 100,
            checkpoint: hex::encode(cp.to_bytes().unwrap()),
        };
        let sig: Signature = key.sign(&body.signed_bytes());
        Certificate { body, signature: hex::encode(sig.to_bytes()), key_fingerprint: String::new() }
    }

    #[test]
    fn a_signed_certificate_verifies_and_a_changed_count_does_not() {
        let key = SigningKey::from_slice(&[3; 32]).unwrap();
        let cert = signed(&key);
        let parsed = Certificate::parse(cert.to_text().as_bytes()).unwrap();
        assert_eq!(parsed.verify_signature(&[*key.verifying_key()]).unwrap().head.seq, 5);
        let text = cert.to_text().replace("\"installed\": 2", "\"installed\": 3");
        assert_ne!(text, cert.to_text());
        let forged = Certificate::parse(text.as_bytes()).unwrap();
        assert!(matches!(forged.verify_signature(&[*key.verifying_key()]), Err(CertificateError::BadSignature)));
        let other = SigningKey::from_slice(&[4; 32]).unwrap();
        assert!(cert.verify_signature(&[*other.verifying_key()]).is_err());
    }

    #[test]
    fn parse_refuses_other_formats_and_big_files() {
        let key = SigningKey::from_slice(&[3; 32]).unwrap();
        let text = signed(&key).to_text().replace(CONFORMANCE_FORMAT, "flashgate-conformance-v0");
        assert!(Certificate::parse(text.as_bytes()).unwrap_err().to_string().contains("expected"));
        assert!(Certificate::parse(&vec![b' '; MAX_CERTIFICATE + 1]).unwrap_err().to_string().contains("larger"));
    }
}
