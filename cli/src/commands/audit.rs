//! `flashgate audit verify`: offline verification of an audit export (`flashgate admin audit export`)
//! with no broker and no database — the chain from the ledger id's genesis, every checkpoint's signature
//! under the trusted audit keys, every checkpoint and witness against the chain, and the licences and
//! batch counts against the `licence.issued` records (`flashgate_common::audit_export::verify`). Owns
//! reading the trust and witness files (bounded) and the report.

use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use flashgate_common::audit_export::{self, BatchTally, Report, VerifyError};
use flashgate_common::checkpoint::SignedCheckpoint;
use flashgate_common::conformance::{self, Certificate};
use flashgate_common::device_export::{self, DevicesSummary};
use p256::ecdsa::VerifyingKey;
use p256::pkcs8::DecodePublicKey as _;
use serde_json::json;

/// Largest trust or witness file read (bytes).
pub const MAX_KEY_OR_WITNESS_FILE: u64 = 64 * 1024 * 1024;
/// Most keys in the trust files together.
pub const MAX_TRUSTED_KEYS: usize = 1024;

/// `flashgate audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify an audit export offline: chain, ledger-id binding, checkpoint signatures and continuity,
    /// licences and batch counts, and every witness. Exits 0 when all of it holds, 1 naming the first
    /// seq, checkpoint or witness at fault.
    Verify(VerifyArgs),
}

/// `flashgate audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The export (`flashgate admin audit export --out FILE`).
    pub export: PathBuf,
    /// Audit public keys to trust: PEM files with one or more `PUBLIC KEY` blocks
    /// (`flashgate admin audit key --out FILE`), or DER SubjectPublicKeyInfo. Repeatable.
    #[arg(long, required = true, value_name = "KEYFILE")]
    pub trust: Vec<PathBuf>,
    /// Checkpoints kept outside the database: one hex checkpoint per line (`flashgate agent journal
    /// --checkpoints`, a broker's `file:` sink). Repeatable.
    #[arg(long, value_name = "FILE")]
    pub witness: Vec<PathBuf>,
    /// A certificate of conformance (`flashgate admin batch certificate`) to check against the export:
    /// its signature, the devices file it covers, and that file against the chain up to its checkpoint.
    /// The export must be taken after the certificate.
    #[arg(long, value_name = "FILE", requires = "devices")]
    pub certificate: Option<PathBuf>,
    /// The device export the certificate covers (BATCH.devices.jsonl).
    #[arg(long, value_name = "FILE", requires = "certificate")]
    pub devices: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A certificate read and checked on its own (signature, devices file), before the export is walked.
struct CertCheck {
    cert: Certificate,
    devices: DevicesSummary,
    checkpoint: SignedCheckpoint,
}

fn check_certificate(cert: &Path, devices: &Path, trusted: &[VerifyingKey]) -> Result<CertCheck> {
    let bytes = read_bounded(cert, "certificate")?;
    let c = Certificate::parse(&bytes).with_context(|| format!("certificate {}", cert.display()))?;
    let checkpoint = c.verify_signature(trusted).with_context(|| format!("certificate {}", cert.display()))?;
    let f = std::fs::File::open(devices).with_context(|| format!("opening the devices file {}", devices.display()))?;
    let len = f.metadata().with_context(|| format!("reading {}", devices.display()))?.len();
    let summary = device_export::summarise(BufReader::new(f))
        .with_context(|| format!("the devices file {} is not a whole device export", devices.display()))?;
    conformance::check_devices(&c, &summary, len)
        .with_context(|| format!("{} against the certificate {}", devices.display(), cert.display()))?;
    Ok(CertCheck { cert: c, devices: summary, checkpoint })
}

fn read_bounded(path: &Path, what: &str) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).with_context(|| format!("opening {what} {}", path.display()))?;
    let mut buf = Vec::new();
    f.take(MAX_KEY_OR_WITNESS_FILE + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    if buf.len() as u64 > MAX_KEY_OR_WITNESS_FILE {
        bail!("{what} {} is larger than {MAX_KEY_OR_WITNESS_FILE} bytes", path.display());
    }
    Ok(buf)
}

/// The P-256 public keys in a trust file: PEM `PUBLIC KEY` blocks (other lines ignored) or one DER SPKI.
pub fn read_trust(path: &Path) -> Result<Vec<VerifyingKey>> {
    let bytes = read_bounded(path, "trust file")?;
    let text = std::str::from_utf8(&bytes).ok().filter(|t| t.contains("-----BEGIN PUBLIC KEY-----"));
    let Some(text) = text else {
        let k = VerifyingKey::from_public_key_der(&bytes).map_err(|e| {
            anyhow::anyhow!("trust file {}: neither PEM PUBLIC KEY blocks nor a P-256 DER key: {e}", path.display())
        })?;
        return Ok(vec![k]);
    };
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN PUBLIC KEY-----") {
        let end_marker = "-----END PUBLIC KEY-----";
        let Some(end) = rest[start..].find(end_marker) else {
            bail!("trust file {}: a PUBLIC KEY block has no END line", path.display());
        };
        let block = &rest[start..start + end + end_marker.len()];
        let k = VerifyingKey::from_public_key_pem(block).map_err(|e| {
            anyhow::anyhow!("trust file {}: key {} is not a P-256 public key: {e}", path.display(), keys.len() + 1)
        })?;
        keys.push(k);
        rest = &rest[start + end + end_marker.len()..];
    }
    Ok(keys)
}

/// Run `flashgate audit …`.
pub fn run(cmd: AuditCommand) -> Result<()> {
    match cmd {
        AuditCommand::Verify(a) => verify(a),
    }
}

fn verify(a: VerifyArgs) -> Result<()> {
    let mut trusted = Vec::new();
    for p in &a.trust {
        trusted.extend(read_trust(p)?);
        if trusted.len() > MAX_TRUSTED_KEYS {
            bail!("more than {MAX_TRUSTED_KEYS} trusted keys");
        }
    }
    let mut witnesses: Vec<(String, SignedCheckpoint)> = Vec::new();
    for p in &a.witness {
        let bytes = read_bounded(p, "witness file")?;
        let text = String::from_utf8(bytes).with_context(|| format!("witness file {} is not text", p.display()))?;
        witnesses.extend(audit_export::read_witnesses(&p.display().to_string(), &text)?);
        if witnesses.len() > audit_export::MAX_WITNESSES {
            bail!("more than {} witness checkpoints", audit_export::MAX_WITNESSES);
        }
    }
    let cert = match (&a.certificate, &a.devices) {
        (Some(c), Some(d)) => Some(check_certificate(c, d, &trusted)?),
        _ => None,
    };
    let mut tally = None;
    if let Some(c) = &cert {
        witnesses.push((format!("certificate {}", c.cert.body.batch_id), c.checkpoint.clone()));
        tally = Some(BatchTally::new(&c.cert.body.batch_id, c.checkpoint.head.seq));
    }
    let file = std::fs::File::open(&a.export).with_context(|| format!("opening the export {}", a.export.display()))?;
    let result = audit_export::verify_tallying(BufReader::new(file), &trusted, &witnesses, tally.as_mut());
    report(&a, &result)?;
    if let Err(e) = result {
        return Err(anyhow::Error::new(e).context(format!("the audit export {} does not verify", a.export.display())));
    }
    if let (Some(c), Some(t)) = (&cert, &tally) {
        conformance::check_chain(&c.cert, &c.devices, t).context("the certificate of conformance does not hold")?;
        let n = &c.cert.body.counts;
        let line = format!(
            "certificate of conformance ok: batch {} by {}: {} devices, {} licensed, {} installed, {} failed, {} not reported, {} refusals, {} attempts; reconciled with the chain up to its checkpoint at seq {}",
            c.cert.body.batch_id,
            c.cert.body.broker,
            n.devices,
            n.issued,
            n.installed,
            n.failed,
            n.not_reported,
            n.refusals,
            c.devices.attempts_total,
            t.upto_seq
        );
        if a.json {
            println!(
                "{}",
                json!({ "certificate": { "ok": true, "batch_id": c.cert.body.batch_id, "counts": n, "checkpoint_seq": t.upto_seq } })
            );
        } else {
            println!("{line}");
        }
    }
    Ok(())
}

fn report(a: &VerifyArgs, result: &Result<Report, VerifyError>) -> Result<()> {
    if a.json {
        let v = match result {
            Ok(r) => json!({
                "ok": true,
                "ledger_id": r.ledger_id,
                "genesis": r.genesis.as_str(),
                "records": r.records,
                "head_hash": r.head_hash,
                "checkpoints": r.checkpoints,
                "witnesses": r.witnesses,
                "newest_checkpoint": r.newest_checkpoint,
                "unsigned_tail": r.unsigned_tail(),
                "licences": r.licences,
                "batches": r.batches,
            }),
            Err(e) => json!({ "ok": false, "fault": e.to_string() }),
        };
        println!("{v}");
        return Ok(());
    }
    if let Ok(r) = result {
        println!(
            "audit export ok: ledger {} ({}), {} records (head hash {}), {} checkpoints and {} witnesses verified",
            r.ledger_id,
            match r.genesis {
                flashgate_common::audit::Genesis::Bound => "chain bound to the ledger id",
                flashgate_common::audit::Genesis::Legacy => "legacy chain: its first record binds nothing",
            },
            r.records,
            r.head_hash,
            r.checkpoints,
            r.witnesses
        );
        println!(
            "{} licences and {} batches reconciled; newest checkpoint at seq {}: {} record(s) after it are covered by the chain only, not by a signature",
            r.licences,
            r.batches,
            r.newest_checkpoint,
            r.unsigned_tail()
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use p256::pkcs8::{EncodePublicKey as _, LineEnding};

    use super::*;

    #[test]
    fn trust_files_in_pem_with_several_keys_and_der() {
        let dir = tempfile::tempdir().unwrap();
        let a = p256::ecdsa::SigningKey::from_slice(&[3; 32]).unwrap();
        let b = p256::ecdsa::SigningKey::from_slice(&[4; 32]).unwrap();
        let pem = format!(
            "# member one\n{}# member two\n{}",
            a.verifying_key().to_public_key_pem(LineEnding::LF).unwrap(),
            b.verifying_key().to_public_key_pem(LineEnding::LF).unwrap()
        );
        let p = dir.path().join("keys.pem");
        std::fs::write(&p, pem).unwrap();
        assert_eq!(read_trust(&p).unwrap(), vec![*a.verifying_key(), *b.verifying_key()]);
        let d = dir.path().join("key.der");
        std::fs::write(&d, a.verifying_key().to_public_key_der().unwrap().as_bytes()).unwrap();
        assert_eq!(read_trust(&d).unwrap(), vec![*a.verifying_key()]);
        std::fs::write(&d, b"junk").unwrap();
        assert!(read_trust(&d).unwrap_err().to_string().contains("neither PEM"));
    }
}
