//! Property test of quota leases as a state machine (schema v8): random sequences of licences, grants of
//! random sizes to a few site brokers, and returns of random units, on a real SQLite ledger. After every
//! operation: issued + leased never exceeds the quota, `leased` equals the sum of the leases' outstanding
//! units, a grant never exceeds what was left, and the audit chain verifies at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use crate::support::*;
use flashgate_broker::ledger::LedgerError;
use flashgate_broker::ledger::leases::LeaseRequest;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Licence(u16),
    Grant { holder: u8, units: i64 },
    Return { pick: usize, units: i64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<u16>().prop_map(Op::Licence),
        (0u8..3, 1i64..8).prop_map(|(holder, units)| Op::Grant { holder, units }),
        (any::<usize>(), 0i64..6).prop_map(|(pick, units)| Op::Return { pick, units }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn leases_and_licences_never_exceed_the_quota(ops in prop::collection::vec(op(), 1..40), quota in 1i64..20) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (l, _) = sqlite_ledger(&dir).await;
            seed(&l, "q", quota, &[SITE], (None, None)).await;
            let mut leases = Vec::new();
            for op in &ops {
                let before = l.batch("q").await.unwrap();
                match op {
                    Op::Licence(d) => match request_licence(&l, "q", &device(usize::from(*d)), 1).await {
                        Ok(_) | Err(LedgerError::Refused { .. }) => {}
                        Err(e) => panic!("{e}"),
                    },
                    Op::Grant { holder, units } => {
                        let req = LeaseRequest {
                            batch_id: "q".into(),
                            site: SITE.into(),
                            holder: format!("spiffe://t/broker/site-{holder}"),
                            units: *units,
                            ttl: Duration::from_secs(60),
                        };
                        match l.grant_lease(&req, "central").await {
                            Ok(g) => {
                                assert!(g.granted <= *units && g.granted <= before.remaining(), "{g:?} {before:?}");
                                leases.push(g);
                            }
                            Err(LedgerError::Refused { .. }) => assert_eq!(before.remaining(), 0, "{before:?}"),
                            Err(e) => panic!("{e}"),
                        }
                    }
                    Op::Return { pick, units } if !leases.is_empty() => {
                        let i = pick % leases.len();
                        let lease = &leases[i];
                        match l.return_lease(&lease.id, &lease.holder, *units, &lease.holder).await {
                            Ok(after) => leases[i] = after,
                            Err(LedgerError::Invalid { .. }) => assert!(*units > lease.outstanding()),
                            Err(e) => panic!("{e}"),
                        }
                    }
                    Op::Return { .. } => {}
                }
                let b = l.batch("q").await.unwrap();
                assert!(b.issued + b.leased <= b.quota, "{b:?} after {op:?}");
                assert_eq!(b.leased, leases.iter().map(|x| x.outstanding()).sum::<i64>(), "{b:?} after {op:?}");
            }
            l.verify_audit().await.unwrap();
        });
    }
}
