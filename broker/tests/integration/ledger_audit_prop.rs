//! Property tests of the audit chain: for random event sequences, any single mutation (edit of any field,
//! deletion, swap of two records, truncation) is detected by the verifier; and end to end on a real SQLite
//! ledger with the mutation applied in SQL.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::support::*;
use flashgate_broker::ledger::audit::{AuditRecord, LEGACY_GENESIS_HASH, Verifier, record_hash};
use flashgate_broker::ledger::{BatchState, LedgerError};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Mutation {
    Edit { at: usize, field: u8, salt: u8 },
    Delete { at: usize },
    Swap { a: usize, b: usize },
    Truncate { keep: usize },
}

fn build(events: &[(i64, String, String, String, String)]) -> Vec<AuditRecord> {
    let mut prev = LEGACY_GENESIS_HASH.to_vec();
    events
        .iter()
        .enumerate()
        .map(|(i, (at, actor, event, subject, details))| {
            let seq = i as i64 + 1;
            let hash = record_hash(&prev, seq, *at, actor, event, subject, details).to_vec();
            let r = AuditRecord {
                seq,
                at: *at,
                actor: actor.clone(),
                event: event.clone(),
                subject: subject.clone(),
                details: details.clone(),
                prev_hash: prev.clone(),
                hash: hash.clone(),
            };
            prev = hash;
            r
        })
        .collect()
}

fn verify(records: &[AuditRecord], head_seq: i64, head_hash: &[u8]) -> Result<(), LedgerError> {
    let mut v = Verifier::new(LEGACY_GENESIS_HASH);
    for r in records {
        v.push(r)?;
    }
    v.finish(head_seq, head_hash).map(|_| ())
}

fn mutate(mut rs: Vec<AuditRecord>, m: &Mutation) -> Vec<AuditRecord> {
    let n = rs.len();
    match *m {
        Mutation::Edit { at, field, salt } => {
            let r = &mut rs[at % n];
            let s = format!("~{salt}");
            match field % 7 {
                0 => r.at = r.at.wrapping_add(1 + i64::from(salt)),
                1 => r.actor.push_str(&s),
                2 => r.event.push_str(&s),
                3 => r.subject.push_str(&s),
                4 => r.details.push_str(&s),
                5 => r.prev_hash[usize::from(salt) % 32] ^= 1,
                _ => r.hash[usize::from(salt) % 32] ^= 1,
            }
        }
        Mutation::Delete { at } => {
            rs.remove(at % n);
        }
        Mutation::Swap { a, b } => {
            let (a, b) = (a % n, b % n);
            let (a, b) = if a == b { (a, (a + 1) % n) } else { (a, b) };
            if a != b {
                rs.swap(a, b);
                // An attacker renumbers so that the sequence looks contiguous.
                let (sa, sb) = (rs[a].seq, rs[b].seq);
                rs[a].seq = sb;
                rs[b].seq = sa;
            }
        }
        Mutation::Truncate { keep } => rs.truncate(keep % n),
    }
    rs
}

fn event_strategy() -> impl Strategy<Value = (i64, String, String, String, String)> {
    (
        0i64..4_000_000_000_000,
        "[a-z0-9-]{0,12}",
        prop::sample::select(vec!["licence.issued", "licence.refused", "install.reported", "batch.created"]),
        "[a-z0-9/]{0,24}",
        "\\{[a-z\":0-9,]{0,30}\\}",
    )
        .prop_map(|(at, actor, event, subject, details)| (at, actor, event.to_owned(), subject, details))
}

fn mutation_strategy() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>(), any::<u8>()).prop_map(|(at, field, salt)| Mutation::Edit { at, field, salt }),
        any::<usize>().prop_map(|at| Mutation::Delete { at }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap { a, b }),
        any::<usize>().prop_map(|keep| Mutation::Truncate { keep }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn ledger_audit_any_single_mutation_is_detected(
        events in prop::collection::vec(event_strategy(), 2..40),
        m in mutation_strategy(),
    ) {
        let rs = build(&events);
        let head = rs.last().unwrap().clone();
        prop_assert!(verify(&rs, head.seq, &head.hash).is_ok());
        let bad = mutate(rs.clone(), &m);
        prop_assume!(bad != rs);
        let r = verify(&bad, head.seq, &head.hash);
        prop_assert!(matches!(r, Err(LedgerError::AuditBroken { .. })), "mutation {:?} not detected", m);
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Issue(u8),
    Pause,
    Resume,
    Revoke(u8),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<u8>().prop_map(|d| Op::Issue(d % 12)),
        1 => Just(Op::Pause),
        1 => Just(Op::Resume),
        1 => any::<u8>().prop_map(|s| Op::Revoke(s % 4)),
    ]
}

#[derive(Debug, Clone, Copy)]
enum SqlMutation {
    Edit(usize),
    Delete(usize),
    Swap(usize),
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// End to end: random ledger activity on SQLite, then one mutation in SQL, then `verify_audit` fails.
    #[test]
    fn ledger_audit_sql_mutation_is_detected(
        ops in prop::collection::vec(op_strategy(), 1..20),
        m in prop_oneof![any::<usize>().prop_map(SqlMutation::Edit), any::<usize>().prop_map(SqlMutation::Delete),
                         any::<usize>().prop_map(SqlMutation::Swap)],
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (l, url) = sqlite_ledger(&dir).await;
            seed(&l, "p", 6, &[SITE], (None, None)).await;
            for op in &ops {
                match *op {
                    Op::Issue(d) => { let _ = l.commit_issue(issue_record("p", &device(d.into()), 1)).await; }
                    Op::Pause => { l.set_batch_state("p", BatchState::Paused, "admin").await.unwrap(); }
                    Op::Resume => { l.set_batch_state("p", BatchState::Open, "admin").await.unwrap(); }
                    Op::Revoke(s) => { l.revoke_station(&format!("{s:02x}"), "st", "test", "admin").await.unwrap(); }
                }
            }
            let n = l.verify_audit().await.unwrap().records as usize;
            let seq = |i: usize| (i % n) as i64 + 1;
            let stmts: Vec<String> = match m {
                SqlMutation::Edit(i) => vec![format!("UPDATE audit SET subject = subject || '!' WHERE seq = {}", seq(i))],
                SqlMutation::Delete(i) => vec![format!("DELETE FROM audit WHERE seq = {}", seq(i))],
                SqlMutation::Swap(i) => {
                    let a = seq(i).min(n as i64 - 1);
                    vec![
                        format!("UPDATE audit SET seq = -1 WHERE seq = {a}"),
                        format!("UPDATE audit SET seq = {a} WHERE seq = {}", a + 1),
                        format!("UPDATE audit SET seq = {} WHERE seq = -1", a + 1),
                    ]
                }
            };
            let refs: Vec<&str> = stmts.iter().map(String::as_str).collect();
            raw_sql(&url, &refs).await;
            let r = l.verify_audit().await;
            assert!(matches!(r, Err(LedgerError::AuditBroken { .. })), "{m:?} on {n} records: {r:?}");
        });
    }
}
