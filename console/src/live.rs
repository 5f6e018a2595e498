//! The live picture of the line: a task that polls the broker's `ListStations` and `ListBatches`
//! every [`POLL_INTERVAL`], turns the answers into one JSON snapshot (published on a watch channel
//! the server-sent event streams follow) and keeps the devices finished per batch over time for the
//! rate chart.
//!
//! Polling rather than a watch stream from the broker: the broker has no admin-side watch RPC, and two
//! small RPCs a second per console are cheap for it (both read a few rows per station and batch); a
//! change reaches the page within one interval plus the poll's own time, which the snapshot carries
//! (`poll_ms`) and the page shows, inside the 2 s the line view promises.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flashgate_proto::v1 as pb;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::Admin;

/// How often the broker is polled.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Deadline of one poll's RPCs.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(5);
/// Width of one bucket of the rate chart.
pub const RATE_BUCKET_MS: i64 = 10_000;
/// Buckets kept per batch (one hour at [`RATE_BUCKET_MS`]).
pub const MAX_RATE_BUCKETS: usize = 360;
/// Batches whose rate is tracked (the newest first seen win; older ones are dropped).
pub const MAX_TRACKED_BATCHES: usize = 256;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// Devices finished (installed or failed) per batch, in buckets of [`RATE_BUCKET_MS`], as seen by
/// successive polls: the first poll of a batch sets its baseline, later increases go to the bucket
/// of the poll that saw them.
#[derive(Debug, Default)]
pub struct RateHistory {
    batches: BTreeMap<String, BatchRate>,
}

#[derive(Debug, Default)]
struct BatchRate {
    last_total: i64,
    /// Start of the bucket (ms) and devices finished in it, oldest first.
    buckets: VecDeque<(i64, u64)>,
}

impl RateHistory {
    /// Notes that `batch` had `finished` devices finished at `at_ms`.
    pub fn record(&mut self, batch: &str, at_ms: i64, finished: i64) {
        if !self.batches.contains_key(batch) {
            if self.batches.len() >= MAX_TRACKED_BATCHES {
                return;
            }
            self.batches.insert(batch.to_owned(), BatchRate { last_total: finished, buckets: VecDeque::new() });
            return;
        }
        let Some(rate) = self.batches.get_mut(batch) else { return };
        let delta = finished - rate.last_total;
        rate.last_total = finished;
        let start = at_ms - at_ms.rem_euclid(RATE_BUCKET_MS);
        let add = u64::try_from(delta).unwrap_or(0);
        match rate.buckets.back_mut() {
            Some((s, n)) if *s == start => *n += add,
            _ => {
                rate.buckets.push_back((start, add));
                while rate.buckets.len() > MAX_RATE_BUCKETS {
                    rate.buckets.pop_front();
                }
            }
        }
    }

    /// The rate chart of `batch`: `[{"at_ms", "devices", "per_minute"}]`, oldest first.
    pub fn series(&self, batch: &str) -> Value {
        let per_minute = 60_000.0 / RATE_BUCKET_MS as f64;
        let points: Vec<Value> = self
            .batches
            .get(batch)
            .map(|r| {
                r.buckets
                    .iter()
                    .map(|(at, n)| json!({"at_ms": at, "devices": n, "per_minute": *n as f64 * per_minute}))
                    .collect()
            })
            .unwrap_or_default();
        Value::Array(points)
    }
}

/// The JSON of a batch as the pages use it (counts, state, sites).
pub fn batch_json(b: &pb::BatchInfo) -> Value {
    let state = match pb::BatchState::try_from(b.state) {
        Ok(pb::BatchState::Open) => "open",
        Ok(pb::BatchState::Paused) => "paused",
        Ok(pb::BatchState::Closed) => "closed",
        _ => "unknown",
    };
    json!({
        "id": b.id,
        "product_id": b.product_id,
        "image_sha256": b.image_sha256,
        "quota": b.quota,
        "issued": b.issued,
        "installed": b.installed,
        "failed": b.failed,
        "in_flight": (b.issued - b.installed - b.failed).max(0),
        "remaining": b.remaining,
        "allowed_sites": b.allowed_sites,
        "state": state,
        "created_at_ms": b.created_at_ms,
    })
}

/// The JSON of a station as the line view uses it: identity, site, online, last seen, assignment,
/// counts, and each probe with what it is doing now.
pub fn station_json(s: &pb::StationInfo) -> Value {
    let activity: BTreeMap<&str, &pb::ProbeActivity> = s.activity.iter().map(|a| (a.probe_id.as_str(), a)).collect();
    let mut ids: Vec<&str> = s.probes.iter().map(|p| p.probe_id.as_str()).collect();
    for a in &s.activity {
        if !ids.contains(&a.probe_id.as_str()) {
            ids.push(&a.probe_id);
        }
    }
    let probes: Vec<Value> = ids
        .iter()
        .map(|id| {
            let info = s.probes.iter().find(|p| p.probe_id == *id);
            let a = activity.get(id);
            json!({
                "probe_id": id,
                "kind": info.map(|p| p.kind.as_str()).unwrap_or(""),
                "port": info.map(|p| p.port.as_str()).unwrap_or(""),
                "present": info.is_some(),
                "device_id": a.map(|a| a.device_id.as_str()).unwrap_or(""),
                "stage": a.map(|a| a.stage.as_str()).unwrap_or(""),
                "done": a.map(|a| a.done).unwrap_or(0),
                "total": a.map(|a| a.total).unwrap_or(0),
                "finished": a.is_some_and(|a| a.finished),
                "last_ok": a.is_some_and(|a| a.last_ok),
                "last_message": a.map(|a| a.last_message.as_str()).unwrap_or(""),
            })
        })
        .collect();
    json!({
        "identity": s.identity,
        "name": station_name(&s.identity),
        "site": s.site,
        "online": s.online,
        "broker": s.broker,
        "last_seen_ms": s.last_seen_ms,
        "assigned_batch": s.assigned_batch,
        "paused": s.paused,
        "current_batch": s.current_batch,
        "devices_ok": s.devices_ok,
        "devices_failed": s.devices_failed,
        "licences": s.licences,
        "probes": probes,
    })
}

/// `station/N` of `spiffe://TD/site/SITE/station/N` (the whole identity when it has no such part).
fn station_name(identity: &str) -> &str {
    identity.find("/station/").map(|i| &identity[i + 1..]).unwrap_or(identity)
}

/// The published snapshot (JSON text) and the rate history behind it.
#[derive(Debug, Clone)]
pub struct Live {
    snapshot: watch::Receiver<Arc<String>>,
    rates: Arc<Mutex<RateHistory>>,
}

impl Live {
    /// The latest snapshot, as a receiver that sees every new one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<String>> {
        self.snapshot.clone()
    }

    /// The latest snapshot.
    pub fn latest(&self) -> Arc<String> {
        self.snapshot.borrow().clone()
    }

    /// The rate chart of `batch`.
    pub fn rate_series(&self, batch: &str) -> Value {
        self.rates.lock().unwrap_or_else(|p| p.into_inner()).series(batch)
    }
}

/// Starts the poller on `admin`; it stops when every [`Live`] clone (and so every receiver) is gone.
pub fn spawn(admin: Admin) -> Live {
    let (tx, rx) = watch::channel(Arc::new(snapshot_json(&[], &[], 0, None, 0)));
    let rates = Arc::new(Mutex::new(RateHistory::default()));
    let live = Live { snapshot: rx, rates: rates.clone() };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stations: Vec<pb::StationInfo> = Vec::new();
        let mut batches: Vec<pb::BatchInfo> = Vec::new();
        loop {
            tick.tick().await;
            if tx.is_closed() {
                break;
            }
            let started = Instant::now();
            let mut client = admin.client();
            let polled = tokio::time::timeout(POLL_TIMEOUT, async {
                let s = client.list_stations(pb::ListStationsRequest {}).await?.into_inner().stations;
                let b = client.list_batches(pb::ListBatchesRequest {}).await?.into_inner().batches;
                Ok::<_, tonic::Status>((s, b))
            })
            .await;
            let poll_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let at = now_ms();
            let error = match polled {
                Ok(Ok((s, b))) => {
                    stations = s;
                    batches = b;
                    let mut r = rates.lock().unwrap_or_else(|p| p.into_inner());
                    for b in &batches {
                        r.record(&b.id, at, b.installed + b.failed);
                    }
                    None
                }
                Ok(Err(status)) => Some(format!("polling the broker: {}", crate::status_text(&status))),
                Err(_) => Some(format!("polling the broker: no answer within {POLL_TIMEOUT:?}")),
            };
            if let Some(e) = &error {
                tracing::warn!(error = %e, "console poll failed");
            }
            let _ = tx.send(Arc::new(snapshot_json(&stations, &batches, at, error.as_deref(), poll_ms)));
        }
    });
    live
}

/// One snapshot: `{"at_ms", "poll_ms", "error", "stations": [...], "batches": [...]}`.
pub fn snapshot_json(
    stations: &[pb::StationInfo],
    batches: &[pb::BatchInfo],
    at_ms: i64,
    error: Option<&str>,
    poll_ms: u64,
) -> String {
    json!({
        "at_ms": at_ms,
        "poll_ms": poll_ms,
        "error": error,
        "stations": stations.iter().map(station_json).collect::<Vec<_>>(),
        "batches": batches.iter().map(batch_json).collect::<Vec<_>>(),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rates_count_increases_per_bucket() {
        let mut r = RateHistory::default();
        r.record("b", 1_000, 5); // baseline
        assert_eq!(r.series("b"), json!([]));
        r.record("b", 2_000, 7);
        r.record("b", 9_000, 8);
        r.record("b", 12_000, 8);
        r.record("b", 25_000, 11);
        let s = r.series("b");
        let devices: Vec<u64> = s.as_array().unwrap().iter().map(|p| p["devices"].as_u64().unwrap()).collect();
        assert_eq!(devices, vec![3, 0, 3]);
        assert_eq!(s[0]["per_minute"], 18.0);
        assert_eq!(s[2]["at_ms"], 20_000);
        assert_eq!(r.series("other"), json!([]));
    }

    #[test]
    fn rate_history_is_bounded() {
        let mut r = RateHistory::default();
        for i in 0..(MAX_RATE_BUCKETS as i64 + 50) {
            r.record("b", i * RATE_BUCKET_MS, i);
        }
        assert_eq!(r.series("b").as_array().unwrap().len(), MAX_RATE_BUCKETS);
        for i in 0..(MAX_TRACKED_BATCHES + 10) {
            r.record(&format!("x{i}"), 0, 0);
        }
        assert_eq!(r.batches.len(), MAX_TRACKED_BATCHES);
    }

    #[test]
    fn stations_show_probe_activity() {
        let s = pb::StationInfo {
            identity: "spiffe://f.test/site/berlin/station/1".into(),
            site: "berlin".into(),
            online: true,
            probes: vec![
                pb::ProbeInfo { probe_id: "p0".into(), kind: "sim".into(), port: "tcp://h:1".into() },
                pb::ProbeInfo { probe_id: "p1".into(), kind: "sim".into(), port: "tcp://h:2".into() },
            ],
            activity: vec![pb::ProbeActivity {
                probe_id: "p0".into(),
                device_id: "d".into(),
                stage: "install".into(),
                done: 2,
                total: 3,
                ..Default::default()
            }],
            ..Default::default()
        };
        let j = station_json(&s);
        assert_eq!(j["name"], "station/1");
        assert_eq!(j["probes"][0]["stage"], "install");
        assert_eq!((j["probes"][0]["done"].as_u64(), j["probes"][0]["total"].as_u64()), (Some(2), Some(3)));
        assert_eq!(j["probes"][1]["stage"], "");
        assert_eq!(j["probes"][1]["present"], true);
    }

    #[test]
    fn batches_show_counts_in_flight() {
        let b = pb::BatchInfo {
            id: "b1".into(),
            quota: 10,
            issued: 6,
            installed: 4,
            failed: 1,
            remaining: 4,
            state: pb::BatchState::Paused as i32,
            ..Default::default()
        };
        let j = batch_json(&b);
        assert_eq!((j["in_flight"].as_i64(), j["state"].as_str()), (Some(1), Some("paused")));
        let snap: Value = serde_json::from_str(&snapshot_json(&[], &[b], 5, Some("down"), 3)).unwrap();
        assert_eq!((snap["error"].as_str(), snap["batches"][0]["id"].as_str()), (Some("down"), Some("b1")));
    }
}
