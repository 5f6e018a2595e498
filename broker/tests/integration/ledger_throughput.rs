//! Throughput smoke of the group-commit writer on SQLite with durable commits (WAL, synchronous=FULL):
//! 64 concurrent callers issue licences for distinct devices; the rate and latency percentiles are printed,
//! not asserted (they depend on the disk). `FLASHGATE_LEDGER_SMOKE_N` sets the number of licences.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_throughput_smoke_sqlite_64_callers() {
    let n: usize = std::env::var("FLASHGATE_LEDGER_SMOKE_N").ok().and_then(|v| v.parse().ok()).unwrap_or(8000);
    let callers = 64;
    let dir = tempfile::tempdir().unwrap();
    let (l, _) = sqlite_ledger(&dir).await;
    seed(&l, "tp", n as i64, &[SITE], (None, None)).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = c;
            while i < n {
                let t = Instant::now();
                request_licence(&l, "tp", &device(i), 1).await.unwrap();
                lat.push(t.elapsed());
                i += callers;
            }
            lat
        }));
    }
    let mut lat: Vec<Duration> = Vec::with_capacity(n);
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    assert_eq!(l.batch("tp").await.unwrap().issued, n as i64);
    println!(
        "ledger throughput (SQLite, WAL, synchronous=FULL, {callers} callers, precheck+commit): {n} licences in \
         {:.2?} = {:.0}/s; latency p50 {:.2?} p99 {:.2?} max {:.2?}",
        elapsed,
        n as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1]
    );
    l.verify_audit().await.unwrap();

    // Open loop at the target rate: 64 stations together offering 2,000 licences/s for 3 s.
    let rate = 2000.0;
    let per_station = rate / callers as f64;
    let total = (rate * 3.0) as usize;
    seed(&l, "tp2", total as i64, &[SITE], (None, None)).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let period = Duration::from_secs_f64(1.0 / per_station);
            let mut next = tokio::time::Instant::now() + period.mul_f64(c as f64 / callers as f64);
            let mut i = c;
            while i < total {
                tokio::time::sleep_until(next).await;
                next += period;
                let t = Instant::now();
                request_licence(&l, "tp2", &device(i), 1).await.unwrap();
                lat.push(t.elapsed());
                i += callers;
            }
            lat
        }));
    }
    let mut lat: Vec<Duration> = Vec::with_capacity(total);
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "ledger open loop (SQLite durable, {callers} stations offering {rate:.0}/s): {total} licences in {:.2?} = \
         {:.0}/s; latency p50 {:.2?} p99 {:.2?} max {:.2?}",
        elapsed,
        total as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1]
    );
}
