//! The audit chain's hashing, shared by the broker (which appends and verifies records in its ledger)
//! and the offline verifier (`flashgate audit verify`, which has no database): the canonical record
//! hash and the genesis hash that binds a chain to the random id of its ledger.
//!
//! `hash(n) = SHA-256("flashgate-audit-v1" || lp(prev_hash) || be64(seq) || be64(at) || lp(actor) ||
//! lp(event) || lp(subject) || lp(details))` where `lp(x) = be32(len(x)) || x`. The `prev_hash` of the
//! first record is [`genesis_hash`]`(ledger_id)` = `SHA-256("flashgate-audit-genesis-v1\0" ||
//! ledger_id)`, so a chain cannot start from an arbitrary hash: its first record names the ledger it
//! was created in, and a signed checkpoint of that ledger (which carries the same id) covers it.
//! Ledgers created before the ledger id existed (schema v4 and older) start from
//! [`LEGACY_GENESIS_HASH`] (32 zero bytes); they are marked `legacy` and their first record binds
//! nothing.
//!
//! Also owns [`issuance`]: which audit events stand for a licence and which for a quota unit, the one
//! rule the broker's `verify_audit` and the offline verifier reconcile licences and issued counts by.

use sha2::{Digest, Sha256};

/// Domain separation prefix of every record hash.
pub const RECORD_DOMAIN: &[u8] = b"flashgate-audit-v1";
/// Domain separation prefix of the genesis hash.
pub const GENESIS_DOMAIN: &[u8] = b"flashgate-audit-genesis-v1\0";
/// The `prev_hash` of the first record of a ledger created before ledger ids (schema v4 and older).
pub const LEGACY_GENESIS_HASH: [u8; 32] = [0; 32];
/// Length of a ledger id.
pub const LEDGER_ID_LEN: usize = 16;

/// The `prev_hash` of the first record of the ledger `ledger_id` (and the head hash of its empty chain).
pub fn genesis_hash(ledger_id: &[u8; LEDGER_ID_LEN]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(GENESIS_DOMAIN);
    h.update(ledger_id);
    h.finalize().into()
}

/// How a chain starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Genesis {
    /// From [`genesis_hash`] of the ledger id (every ledger created with schema v5 or later).
    Bound,
    /// From [`LEGACY_GENESIS_HASH`] (a ledger created before ledger ids; its first record binds nothing).
    Legacy,
}

impl Genesis {
    /// The stable name stored in the ledger and written in exports: `bound` or `legacy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bound => "bound",
            Self::Legacy => "legacy",
        }
    }

    /// Parses [`Genesis::as_str`].
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "bound" => Some(Self::Bound),
            "legacy" => Some(Self::Legacy),
            _ => None,
        }
    }

    /// The `prev_hash` the first record of ledger `ledger_id` must carry.
    pub fn first_prev_hash(self, ledger_id: &[u8; LEDGER_ID_LEN]) -> [u8; 32] {
        match self {
            Self::Bound => genesis_hash(ledger_id),
            Self::Legacy => LEGACY_GENESIS_HASH,
        }
    }
}

/// Computes a record hash over the canonical encoding of its fields.
pub fn record_hash(
    prev_hash: &[u8],
    seq: i64,
    at: i64,
    actor: &str,
    event: &str,
    subject: &str,
    details: &str,
) -> [u8; 32] {
    fn lp(h: &mut Sha256, b: &[u8]) {
        // Fields longer than 4 GiB cannot be stored in the ledger; saturating keeps the encoding total.
        h.update(u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
        h.update(b);
    }
    let mut h = Sha256::new();
    h.update(RECORD_DOMAIN);
    lp(&mut h, prev_hash);
    h.update(seq.to_be_bytes());
    h.update(at.to_be_bytes());
    lp(&mut h, actor.as_bytes());
    lp(&mut h, event.as_bytes());
    lp(&mut h, subject.as_bytes());
    lp(&mut h, details.as_bytes());
    h.finalize().into()
}

/// What one audit record says of its batch's licences and issued count (the rule both reconciliations
/// follow): whether it stands for a licence row of its (batch, device) subject, and whether it stands for
/// one unit in the batch's `issued` count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Issuance {
    /// The record stands for the licence of its subject's (batch, device) in the licences table.
    pub licence: bool,
    /// The record stands for one unit of the batch's issued count.
    pub unit: bool,
}

/// The [`Issuance`] of a record with `event` and `details` (its JSON text), `None` for events that are
/// neither:
/// - `licence.issued` (issued here) and `licence.replicated` (issued by a site broker against its lease):
///   a licence and a unit;
/// - `licence.unleased` (a site's licence with no lease left to take its unit from): a licence, and a unit
///   when its details say `"counted": true` (the batch still had free quota);
/// - `licence.conflict` (a site's licence for a device held here from another site, kept apart): no
///   licence row, and a unit when `"counted": true`.
pub fn issuance(event: &str, details: &str) -> Result<Option<Issuance>, String> {
    let counted = || -> Result<bool, String> {
        let v: serde_json::Value =
            serde_json::from_str(details).map_err(|e| format!("{event} record: details are not JSON: {e}"))?;
        v.get("counted")
            .and_then(serde_json::Value::as_bool)
            .ok_or_else(|| format!("{event} record: details carry no boolean \"counted\""))
    };
    Ok(match event {
        "licence.issued" | "licence.replicated" => Some(Issuance { licence: true, unit: true }),
        "licence.unleased" => Some(Issuance { licence: true, unit: counted()? }),
        "licence.conflict" => Some(Issuance { licence: false, unit: counted()? }),
        _ => None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn genesis_depends_on_the_ledger_id_and_is_not_the_legacy_hash() {
        let a = genesis_hash(&[1; 16]);
        assert_ne!(a, genesis_hash(&[2; 16]));
        assert_ne!(a, LEGACY_GENESIS_HASH);
        assert_eq!(Genesis::Bound.first_prev_hash(&[1; 16]), a);
        assert_eq!(Genesis::Legacy.first_prev_hash(&[1; 16]), LEGACY_GENESIS_HASH);
        for g in [Genesis::Bound, Genesis::Legacy] {
            assert_eq!(Genesis::from_name(g.as_str()), Some(g));
        }
        assert_eq!(Genesis::from_name("zero"), None);
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        assert_ne!(record_hash(&[], 1, 1, "ab", "c", "", ""), record_hash(&[], 1, 1, "a", "bc", "", ""));
    }

    #[test]
    fn issuance_by_event() {
        let both = Issuance { licence: true, unit: true };
        assert_eq!(issuance("licence.issued", "not json").unwrap(), Some(both));
        assert_eq!(issuance("licence.replicated", "{}").unwrap(), Some(both));
        assert_eq!(
            issuance("licence.unleased", r#"{"counted":false}"#).unwrap(),
            Some(Issuance { licence: true, unit: false })
        );
        assert_eq!(
            issuance("licence.conflict", r#"{"counted":true}"#).unwrap(),
            Some(Issuance { licence: false, unit: true })
        );
        assert!(issuance("licence.conflict", "{}").unwrap_err().contains("counted"));
        assert!(issuance("licence.unleased", "{").is_err());
        assert_eq!(issuance("licence.refused", "{").unwrap(), None);
    }

    #[test]
    fn known_answer() {
        // Pins the encoding: a change here breaks every stored chain.
        let h = record_hash(&[0; 32], 1, 1000, "admin", "batch.created", "batch/b", "{}");
        let mut again = Sha256::new();
        again.update(b"flashgate-audit-v1");
        again.update(32u32.to_be_bytes());
        again.update([0u8; 32]);
        again.update(1i64.to_be_bytes());
        again.update(1000i64.to_be_bytes());
        for f in ["admin", "batch.created", "batch/b", "{}"] {
            again.update((f.len() as u32).to_be_bytes());
            again.update(f.as_bytes());
        }
        assert_eq!(h, <[u8; 32]>::from(again.finalize()));
    }
}
