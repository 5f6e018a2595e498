//! Signed audit checkpoints (issue 13): a broker's signature over the head of its audit chain
//! (ledger id, seq, hash, time, broker name) in one fixed, domain-separated byte layout, so a
//! checkpoint can be carried by licence responses, kept by stations, appended to external sinks
//! and verified offline with nothing but the broker's audit public key.
//! [`WitnessCheck`] holds an audit chain to such checkpoints kept outside the database (witnesses) and
//! names the witness a rewritten or truncated history contradicts.
//!
//! Layout (all integers big-endian, total [`CHECKPOINT_LEN`] = 217 bytes), see docs/protocol.md:
//!
//! ```text
//! offset len  field
//!      0  24  domain      "flashgate-checkpoint-v1" followed by one 0x00
//!     24  16  ledger_id   random id created with the ledger
//!     40   8  seq         seq of the head record (0: empty chain)
//!     48  32  hash        hash of the head record (the genesis hash for seq 0)
//!     80   8  at          unix time of signing, seconds (u64)
//!     88   1  name_len    length of the broker name, 1..=64
//!     89  64  name        broker name (printable ASCII), zero-padded to 64 bytes
//!    153  64  signature   ECDSA P-256 over SHA-256(bytes 0..153), r || s
//! ```
//!
//! The parser reads bytes from the network: it accepts exactly this length, the exact domain,
//! a name of printable ASCII with zero padding, and nothing else; it never panics.

use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};

/// The domain separator, NUL-terminated, at the start of every checkpoint.
pub const CHECKPOINT_DOMAIN: &[u8; 24] = b"flashgate-checkpoint-v1\0";
/// Length of the signed part (everything before the signature).
pub const CHECKPOINT_BODY_LEN: usize = 153;
/// Length of an encoded signed checkpoint.
pub const CHECKPOINT_LEN: usize = CHECKPOINT_BODY_LEN + 64;
/// What precedes the hex of a checkpoint in a log line (the broker's syslog sinks); a witness reader
/// takes the hex after it.
pub const CHECKPOINT_MARKER: &str = "flashgate-checkpoint-v1 ";
/// Longest broker name a checkpoint carries.
pub const MAX_BROKER_NAME: usize = 64;

/// Why checkpoint bytes were rejected or a checkpoint does not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    /// Not exactly [`CHECKPOINT_LEN`] bytes.
    #[error("a checkpoint is {CHECKPOINT_LEN} bytes, got {0}")]
    Length(usize),
    /// The domain separator is not `flashgate-checkpoint-v1`.
    #[error("not a flashgate-checkpoint-v1 (wrong domain separator)")]
    Domain,
    /// The broker name is empty, too long, not printable ASCII or not zero-padded.
    #[error("bad broker name: {0}")]
    Name(&'static str),
    /// The signature bytes are not a valid P-256 signature encoding.
    #[error("malformed signature")]
    MalformedSignature,
    /// The signature does not verify under any trusted key.
    #[error("signature of checkpoint seq {seq} from broker {broker:?} does not verify under any trusted key")]
    BadSignature {
        /// Seq of the checkpoint.
        seq: u64,
        /// Broker name it claims.
        broker: String,
    },
}

/// The signed fields of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointHead {
    /// Random id of the ledger, created with it and bound by its first record.
    pub ledger_id: [u8; 16],
    /// Seq of the head record (0 for an empty chain).
    pub seq: u64,
    /// Hash of the head record.
    pub hash: [u8; 32],
    /// Unix time of signing, seconds.
    pub at: u64,
    /// Name of the signing broker (1..=64 printable ASCII bytes).
    pub broker: String,
}

impl CheckpointHead {
    /// Validates the broker name (the only field with constraints).
    pub fn validate(&self) -> Result<(), CheckpointError> {
        validate_name(self.broker.as_bytes())
    }

    /// The signed bytes (the first [`CHECKPOINT_BODY_LEN`] bytes of the encoding).
    pub fn body(&self) -> Result<[u8; CHECKPOINT_BODY_LEN], CheckpointError> {
        self.validate()?;
        let mut b = [0u8; CHECKPOINT_BODY_LEN];
        b[0..24].copy_from_slice(CHECKPOINT_DOMAIN);
        b[24..40].copy_from_slice(&self.ledger_id);
        b[40..48].copy_from_slice(&self.seq.to_be_bytes());
        b[48..80].copy_from_slice(&self.hash);
        b[80..88].copy_from_slice(&self.at.to_be_bytes());
        let name = self.broker.as_bytes();
        // validate() bounds the name to 1..=64 bytes, so the length fits in one byte and the slice.
        b[88] = name.len() as u8;
        b[89..89 + name.len()].copy_from_slice(name);
        Ok(b)
    }

    /// Signs with a software key (soft keystore, tests). An HSM signs [`Self::body`] with CKM_ECDSA
    /// over its SHA-256 and the result is assembled with [`SignedCheckpoint::from_parts`].
    pub fn sign(self, key: &SigningKey) -> Result<SignedCheckpoint, CheckpointError> {
        let body = self.body()?;
        let sig: Signature = key.sign(&body);
        Ok(SignedCheckpoint { head: self, signature: sig.to_bytes().into() })
    }
}

/// A checkpoint with its signature (not yet verified unless it came from [`SignedCheckpoint::verify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// The signed fields.
    pub head: CheckpointHead,
    /// r || s.
    pub signature: [u8; 64],
}

fn validate_name(name: &[u8]) -> Result<(), CheckpointError> {
    if name.is_empty() {
        return Err(CheckpointError::Name("empty"));
    }
    if name.len() > MAX_BROKER_NAME {
        return Err(CheckpointError::Name("longer than 64 bytes"));
    }
    if !name.iter().all(|c| c.is_ascii_graphic()) {
        return Err(CheckpointError::Name("not printable ASCII without spaces"));
    }
    Ok(())
}

impl SignedCheckpoint {
    /// Assembles a checkpoint from its fields and an r || s signature made elsewhere (an HSM).
    pub fn from_parts(head: CheckpointHead, signature: [u8; 64]) -> Result<Self, CheckpointError> {
        head.validate()?;
        Ok(Self { head, signature })
    }

    /// The [`CHECKPOINT_LEN`]-byte encoding.
    pub fn to_bytes(&self) -> Result<[u8; CHECKPOINT_LEN], CheckpointError> {
        let mut out = [0u8; CHECKPOINT_LEN];
        out[..CHECKPOINT_BODY_LEN].copy_from_slice(&self.head.body()?);
        out[CHECKPOINT_BODY_LEN..].copy_from_slice(&self.signature);
        Ok(out)
    }

    /// Parses untrusted bytes (exact length, domain, name rules). Does not verify the signature.
    pub fn parse(bytes: &[u8]) -> Result<Self, CheckpointError> {
        if bytes.len() != CHECKPOINT_LEN {
            return Err(CheckpointError::Length(bytes.len()));
        }
        if &bytes[0..24] != CHECKPOINT_DOMAIN {
            return Err(CheckpointError::Domain);
        }
        let take = |r: std::ops::Range<usize>| -> [u8; 8] {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[r]);
            a
        };
        let mut ledger_id = [0u8; 16];
        ledger_id.copy_from_slice(&bytes[24..40]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[48..80]);
        let name_len = usize::from(bytes[88]);
        if name_len == 0 || name_len > MAX_BROKER_NAME {
            return Err(CheckpointError::Name("length outside 1..=64"));
        }
        let name = &bytes[89..89 + name_len];
        validate_name(name)?;
        if bytes[89 + name_len..CHECKPOINT_BODY_LEN].iter().any(|&b| b != 0) {
            return Err(CheckpointError::Name("padding is not zero"));
        }
        // validate_name accepted only ASCII, so this conversion is lossless.
        let broker = String::from_utf8_lossy(name).into_owned();
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&bytes[CHECKPOINT_BODY_LEN..]);
        Ok(Self {
            head: CheckpointHead {
                ledger_id,
                seq: u64::from_be_bytes(take(40..48)),
                hash,
                at: u64::from_be_bytes(take(80..88)),
                broker,
            },
            signature,
        })
    }

    /// Verifies the signature under any of `trusted`; returns the index of the key that verified.
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Result<usize, CheckpointError> {
        let body = self.head.body()?;
        let sig = Signature::from_slice(&self.signature).map_err(|_| CheckpointError::MalformedSignature)?;
        trusted
            .iter()
            .position(|k| k.verify(&body, &sig).is_ok())
            .ok_or_else(|| CheckpointError::BadSignature { seq: self.head.seq, broker: self.head.broker.clone() })
    }

    /// Whether `self` may precede `later` on one ledger: same ledger id and broker, seq not
    /// decreasing, and equal seqs name the same hash. A `false` means one of the two belongs to a
    /// rewritten history.
    pub fn consistent_with(&self, later: &Self) -> bool {
        let (a, b) = (&self.head, &later.head);
        a.ledger_id == b.ledger_id && a.seq <= b.seq && (a.seq != b.seq || a.hash == b.hash)
    }
}

/// A verified checkpoint held outside the database (a station's journal, an append-only sink, a
/// file), with the name a report uses for it. Check its signature before making a witness of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witness {
    /// Where it came from, e.g. `station-3 journal` or a file path.
    pub name: String,
    /// Seq of the record it vouches for (0: the empty chain).
    pub seq: u64,
    /// Hash that record must have (for seq 0: the genesis hash of the ledger).
    pub hash: [u8; 32],
}

impl Witness {
    /// From a (verified) signed checkpoint.
    pub fn from_checkpoint(name: impl Into<String>, cp: &SignedCheckpoint) -> Self {
        Self { name: name.into(), seq: cp.head.seq, hash: cp.head.hash }
    }
}

/// How a witness contradicts an audit chain; each names the witness and the first bad seq.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WitnessError {
    /// The chain's record at the witnessed seq has another hash: history up to it was rewritten.
    #[error(
        "witness {witness} (signed checkpoint at seq {seq}) contradicts the chain: the record at seq {seq} has \
         another hash (history rewritten at or before seq {seq})"
    )]
    HashDiffers {
        /// The witness's name.
        witness: String,
        /// The witnessed seq.
        seq: u64,
    },
    /// The chain ends before the witnessed seq: records were deleted and the head moved back.
    #[error(
        "witness {witness} (signed checkpoint at seq {seq}) contradicts the chain: the chain ends at seq \
         {chain_end}, first missing seq {first_missing} (records deleted and the head moved back)"
    )]
    ChainTooShort {
        /// The witness's name.
        witness: String,
        /// The witnessed seq.
        seq: u64,
        /// Last seq of the chain.
        chain_end: u64,
        /// `chain_end + 1`.
        first_missing: u64,
    },
}

/// Holds an audit chain to a set of witnesses: feed the hash of every record of an otherwise verified,
/// gap-free chain in seq order from 1 ([`WitnessCheck::record`]), then [`WitnessCheck::finish`] with the
/// last seq. Memory is the witnesses only.
#[derive(Debug, Clone, Default)]
pub struct WitnessCheck {
    /// Not yet reached, sorted by seq.
    pending: std::collections::VecDeque<Witness>,
    /// The hash a seq-0 witness (a checkpoint of the empty chain) must carry.
    genesis: [u8; 32],
    /// The last witness the chain agreed with: its seq and name.
    agreed: Option<(u64, String)>,
}

impl WitnessCheck {
    /// Checks against `witnesses` (any order), for a chain whose empty state hashes to all zeros (a
    /// ledger created before ledger ids, and the toy chains of tests).
    pub fn new(witnesses: Vec<Witness>) -> Self {
        Self::with_genesis(witnesses, [0u8; 32])
    }

    /// Checks against `witnesses` (any order), for a chain whose empty state (seq 0) hashes to `genesis`
    /// (`flashgate_common::audit::genesis_hash` of the ledger id).
    pub fn with_genesis(mut witnesses: Vec<Witness>, genesis: [u8; 32]) -> Self {
        witnesses.sort_by_key(|w| w.seq);
        Self { pending: witnesses.into(), genesis, agreed: None }
    }

    /// The last witness the chain agreed with so far (seq and name): after a [`WitnessError::HashDiffers`]
    /// the rewrite lies after this seq (or anywhere from seq 1 when `None`).
    pub fn last_agreed(&self) -> Option<(u64, &str)> {
        self.agreed.as_ref().map(|(s, n)| (*s, n.as_str()))
    }

    /// Pops the witnesses before `seq` (only seq 0 ones in a gap-free feed): they vouch for the genesis.
    fn genesis_before(&mut self, seq: u64) -> Result<(), WitnessError> {
        while let Some(w) = self.pending.front() {
            if w.seq >= seq {
                break;
            }
            if w.seq != 0 || w.hash != self.genesis {
                return Err(WitnessError::HashDiffers { witness: w.name.clone(), seq: w.seq });
            }
            if let Some(w) = self.pending.pop_front() {
                self.agreed = Some((w.seq, w.name));
            }
        }
        Ok(())
    }

    /// The record at `seq` has `hash`.
    pub fn record(&mut self, seq: u64, hash: &[u8; 32]) -> Result<(), WitnessError> {
        self.genesis_before(seq)?;
        while let Some(w) = self.pending.front() {
            if w.seq != seq {
                break;
            }
            if &w.hash != hash {
                return Err(WitnessError::HashDiffers { witness: w.name.clone(), seq });
            }
            if let Some(w) = self.pending.pop_front() {
                self.agreed = Some((w.seq, w.name));
            }
        }
        Ok(())
    }

    /// The chain ended at `chain_end` (0: empty): no witness may lie beyond it.
    pub fn finish(mut self, chain_end: u64) -> Result<(), WitnessError> {
        self.genesis_before(1)?;
        match self.pending.into_iter().find(|w| w.seq > chain_end) {
            Some(w) => Err(WitnessError::ChainTooShort {
                witness: w.name,
                seq: w.seq,
                chain_end,
                first_missing: chain_end.saturating_add(1),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> SigningKey {
        SigningKey::from_slice(&[7u8; 32]).unwrap()
    }

    fn head(seq: u64) -> CheckpointHead {
        CheckpointHead {
            ledger_id: [0xa5; 16],
            seq,
            hash: [seq as u8; 32],
            at: 1_800_000_000,
            broker: "broker-a".into(),
        }
    }

    #[test]
    fn round_trip_and_verify() {
        let cp = head(42).sign(&key()).unwrap();
        let bytes = cp.to_bytes().unwrap();
        assert_eq!(bytes.len(), CHECKPOINT_LEN);
        assert_eq!(&bytes[..24], CHECKPOINT_DOMAIN);
        assert_eq!(&bytes[40..48], &42u64.to_be_bytes());
        assert_eq!(bytes[88], 8);
        let back = SignedCheckpoint::parse(&bytes).unwrap();
        assert_eq!(back, cp);
        let other = SigningKey::from_slice(&[9u8; 32]).unwrap();
        assert_eq!(back.verify(&[*other.verifying_key(), *key().verifying_key()]), Ok(1));
    }

    #[test]
    fn every_signed_byte_is_covered() {
        let bytes = head(3).sign(&key()).unwrap().to_bytes().unwrap();
        let vk = [*key().verifying_key()];
        for i in 24..88 {
            let mut b = bytes;
            b[i] ^= 1;
            let cp = SignedCheckpoint::parse(&b).unwrap();
            assert!(cp.verify(&vk).is_err(), "flipping byte {i} must break the signature");
        }
        let mut b = bytes;
        b[89] = b'c';
        assert!(SignedCheckpoint::parse(&b).unwrap().verify(&vk).is_err());
    }

    #[test]
    fn rejects_malformed() {
        let bytes = head(1).sign(&key()).unwrap().to_bytes().unwrap();
        assert_eq!(SignedCheckpoint::parse(&bytes[..216]), Err(CheckpointError::Length(216)));
        let mut b = bytes;
        b[3] = b'X';
        assert_eq!(SignedCheckpoint::parse(&b), Err(CheckpointError::Domain));
        let mut b = bytes;
        b[88] = 0;
        assert!(matches!(SignedCheckpoint::parse(&b), Err(CheckpointError::Name(_))));
        let mut b = bytes;
        b[88] = 65;
        assert!(matches!(SignedCheckpoint::parse(&b), Err(CheckpointError::Name(_))));
        let mut b = bytes;
        b[120] = 1;
        assert!(matches!(SignedCheckpoint::parse(&b), Err(CheckpointError::Name(_))));
        let mut h = head(1);
        h.broker = "has space".into();
        assert!(h.sign(&key()).is_err());
        let mut h = head(1);
        h.broker = "x".repeat(65);
        assert!(h.body().is_err());
    }

    #[test]
    fn consistency() {
        let a = head(5).sign(&key()).unwrap();
        let b = head(9).sign(&key()).unwrap();
        assert!(a.consistent_with(&b));
        assert!(!b.consistent_with(&a), "the head moved back");
        let mut fork = head(5);
        fork.hash = [0xff; 32];
        let fork = fork.sign(&key()).unwrap();
        assert!(!a.consistent_with(&fork), "same seq, other hash: a rewrite");
        let mut other_ledger = head(9);
        other_ledger.ledger_id = [1; 16];
        assert!(!a.consistent_with(&other_ledger.sign(&key()).unwrap()));
    }

    /// A toy hash chain (the broker's record hash is another function; the witness logic only sees hashes).
    fn toy_chain(data: &[String]) -> Vec<[u8; 32]> {
        use sha2::{Digest, Sha256};
        let mut prev = [0u8; 32];
        data.iter()
            .enumerate()
            .map(|(i, d)| {
                let mut h = Sha256::new();
                h.update(prev);
                h.update((i as u64 + 1).to_be_bytes());
                h.update(d.as_bytes());
                prev = h.finalize().into();
                prev
            })
            .collect()
    }

    fn check(hashes: &[[u8; 32]], ws: Vec<Witness>) -> Result<(), WitnessError> {
        let mut c = WitnessCheck::new(ws);
        for (i, h) in hashes.iter().enumerate() {
            c.record(i as u64 + 1, h)?;
        }
        c.finish(hashes.len() as u64)
    }

    fn w(name: &str, hashes: &[[u8; 32]], seq: u64) -> Witness {
        Witness { name: name.into(), seq, hash: hashes[seq as usize - 1] }
    }

    #[test]
    fn intact_chain_agrees_with_witnesses() {
        let data: Vec<String> = (0..200).map(|i| format!("record {i}")).collect();
        let c = toy_chain(&data);
        let genesis = Witness { name: "empty".into(), seq: 0, hash: [0; 32] };
        assert_eq!(check(&c, vec![w("b", &c, 150), w("a", &c, 10), w("g", &c, 1), genesis.clone()]), Ok(()));
        assert_eq!(check(&[], vec![genesis]), Ok(()));
        let cp = head(150).sign(&key()).unwrap();
        assert_eq!(Witness::from_checkpoint("f", &cp).seq, 150);
    }

    #[test]
    fn truncation_with_head_moved_back_is_named() {
        // Issue 13, rewrite 1: the last 3 records deleted and the head moved back.
        let data: Vec<String> = (0..200).map(|i| format!("record {i}")).collect();
        let c = toy_chain(&data);
        let e = check(&c[..197], vec![w("old sink", &c, 120), w("station-2 journal", &c, 199)]).unwrap_err();
        assert_eq!(
            e,
            WitnessError::ChainTooShort {
                witness: "station-2 journal".into(),
                seq: 199,
                chain_end: 197,
                first_missing: 198
            }
        );
        assert!(e.to_string().contains("station-2 journal"), "{e}");
        // Witnesses at or before the new head cannot see it: the undetectable window.
        assert_eq!(check(&c[..197], vec![w("old sink", &c, 197)]), Ok(()));
    }

    #[test]
    fn rechained_edit_is_named_at_the_first_witness_after_it() {
        // Issue 13, rewrite 2: record 75 edited and the 126 records from it to the head re-chained.
        let mut data: Vec<String> = (0..200).map(|i| format!("record {i}")).collect();
        let c = toy_chain(&data);
        data[74] = "record 74, quota 999".into();
        let forged = toy_chain(&data);
        assert_eq!(forged.iter().zip(&c).filter(|(a, b)| a != b).count(), 126);
        let e =
            check(&forged, vec![w("sink", &c, 50), w("station-1 journal", &c, 100), w("later", &c, 180)]).unwrap_err();
        assert_eq!(e, WitnessError::HashDiffers { witness: "station-1 journal".into(), seq: 100 });
        // The rewrite lies after the last witness that agreed.
        let mut wc = WitnessCheck::new(vec![w("sink", &c, 50), w("station-1 journal", &c, 100)]);
        let first_bad = (1..=200u64).find(|&s| wc.record(s, &forged[s as usize - 1]).is_err()).unwrap();
        assert_eq!(first_bad, 100);
        assert_eq!(wc.last_agreed(), Some((50, "sink")));
        // A bad genesis witness is named too.
        let bad = Witness { name: "bogus".into(), seq: 0, hash: [1; 32] };
        assert_eq!(check(&c, vec![bad]), Err(WitnessError::HashDiffers { witness: "bogus".into(), seq: 0 }));
        // With a ledger's genesis, a seq-0 witness must carry it (not zeros).
        let g = [9u8; 32];
        let ok = WitnessCheck::with_genesis(vec![Witness { name: "empty".into(), seq: 0, hash: g }], g);
        assert_eq!(ok.finish(0), Ok(()));
        let zero = WitnessCheck::with_genesis(vec![Witness { name: "zero".into(), seq: 0, hash: [0; 32] }], g);
        assert_eq!(zero.finish(0), Err(WitnessError::HashDiffers { witness: "zero".into(), seq: 0 }));
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(cp) = SignedCheckpoint::parse(&data) {
                let back = cp.to_bytes().unwrap();
                prop_assert_eq!(back.as_slice(), data.as_slice());
            }
        }

        #[test]
        fn valid_heads_round_trip(seq in any::<u64>(), at in any::<u64>(), id in any::<[u8; 16]>(),
                                  name in "[!-~]{1,64}") {
            let h = CheckpointHead { ledger_id: id, seq, hash: [1; 32], at, broker: name };
            let cp = SignedCheckpoint::from_parts(h, [3; 64]).unwrap();
            prop_assert_eq!(SignedCheckpoint::parse(&cp.to_bytes().unwrap()).unwrap(), cp);
        }
    }
}
