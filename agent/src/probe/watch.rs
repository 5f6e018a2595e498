//! Periodic probe re-scan: [`ProbeWatcher`] runs a [`ProbeScanner`] (normally a [`Discoverer`],
//! in tests any closure) every interval on the blocking pool, diffs the result against the last
//! one ([`diff_probes`]) and sends [`ProbeEvent`]s, so the runner can fail the current device of a
//! probe that disappears and restart the probe when it comes back. The current list is also
//! published on a `watch` channel.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use super::{Discoverer, ProbeError, ProbeInfo, ProbeSettings};

/// Shortest re-scan interval the watcher accepts; shorter ones are raised to it.
pub const MIN_SCAN_INTERVAL: Duration = Duration::from_millis(50);

/// A change in the set of probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeEvent {
    /// A probe appeared (or reappeared, or changed: then it was first `Removed`).
    Added(ProbeInfo),
    /// The probe with this id is gone (or changed, and an `Added` follows).
    Removed(String),
}

/// Something that lists the probes present now. Called on the blocking thread pool.
pub trait ProbeScanner: Send + 'static {
    /// The probes present now; an error keeps the previous list (and is logged).
    fn scan(&mut self) -> Result<Vec<ProbeInfo>, ProbeError>;
}

impl<F> ProbeScanner for F
where
    F: FnMut() -> Result<Vec<ProbeInfo>, ProbeError> + Send + 'static,
{
    fn scan(&mut self) -> Result<Vec<ProbeInfo>, ProbeError> {
        self()
    }
}

/// A [`Discoverer`] scans by discovering; its warnings are logged when they change (not on
/// every pass).
struct DiscovererScanner {
    discoverer: Discoverer,
    last_warnings: Vec<String>,
}

impl ProbeScanner for DiscovererScanner {
    fn scan(&mut self) -> Result<Vec<ProbeInfo>, ProbeError> {
        let found = self.discoverer.scan();
        if found.warnings != self.last_warnings {
            for w in &found.warnings {
                tracing::warn!("probe discovery: {w}");
            }
            self.last_warnings = found.warnings;
        }
        Ok(found.probes)
    }
}

impl ProbeScanner for Discoverer {
    fn scan(&mut self) -> Result<Vec<ProbeInfo>, ProbeError> {
        Ok(Discoverer::scan(self).probes)
    }
}

/// The events that turn the probe list `old` into `new`: `Removed` for every id that is gone or
/// whose details changed, then `Added` for every new or changed probe, in `new`'s order.
pub fn diff_probes(old: &[ProbeInfo], new: &[ProbeInfo]) -> Vec<ProbeEvent> {
    let new_by_id: HashMap<&str, &ProbeInfo> = new.iter().map(|p| (p.id.as_str(), p)).collect();
    let old_by_id: HashMap<&str, &ProbeInfo> = old.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut events = Vec::new();
    let mut removed = HashSet::new();
    for p in old {
        if new_by_id.get(p.id.as_str()) != Some(&p) && removed.insert(p.id.as_str()) {
            events.push(ProbeEvent::Removed(p.id.clone()));
        }
    }
    for p in new {
        if old_by_id.get(p.id.as_str()) != Some(&p) {
            events.push(ProbeEvent::Added(p.clone()));
        }
    }
    events
}

/// A background task that re-scans probes and reports changes. The first scan reports every
/// probe as `Added`. Dropping the watcher stops the task.
#[derive(Debug)]
pub struct ProbeWatcher {
    events: mpsc::Receiver<ProbeEvent>,
    current: watch::Receiver<Vec<ProbeInfo>>,
    rescan: Arc<Notify>,
    task: JoinHandle<()>,
}

impl ProbeWatcher {
    /// Start watching with `scanner`, scanning at once and then every `interval` (at least
    /// [`MIN_SCAN_INTERVAL`]). Must be called inside a tokio runtime.
    pub fn spawn(scanner: impl ProbeScanner, interval: Duration) -> Self {
        let (tx, events) = mpsc::channel(256);
        let (current_tx, current) = watch::channel(Vec::new());
        let rescan = Arc::new(Notify::new());
        let task = tokio::spawn(run(scanner, interval.max(MIN_SCAN_INTERVAL), tx, current_tx, Arc::clone(&rescan)));
        Self { events, current, rescan, task }
    }

    /// Watch the probes `settings` describe (configured + USB), every `settings.scan_interval`.
    /// Fails only on a bad configuration. Must be called inside a tokio runtime.
    pub fn from_settings(settings: &ProbeSettings) -> Result<Self, ProbeError> {
        let scanner = DiscovererScanner { discoverer: Discoverer::new(settings)?, last_warnings: Vec::new() };
        Ok(Self::spawn(scanner, settings.scan_interval))
    }

    /// The next change; `None` once the watcher task has ended.
    pub async fn recv(&mut self) -> Option<ProbeEvent> {
        self.events.recv().await
    }

    /// The probes found by the latest successful scan (empty before the first).
    pub fn current(&self) -> Vec<ProbeInfo> {
        self.current.borrow().clone()
    }

    /// A receiver of the probe list, updated after every scan that changed it.
    pub fn subscribe(&self) -> watch::Receiver<Vec<ProbeInfo>> {
        self.current.clone()
    }

    /// Scan again now instead of waiting for the interval (e.g. after a connect failure).
    pub fn rescan_now(&self) {
        self.rescan.notify_one();
    }
}

impl Drop for ProbeWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    scanner: impl ProbeScanner,
    interval: Duration,
    tx: mpsc::Sender<ProbeEvent>,
    current: watch::Sender<Vec<ProbeInfo>>,
    rescan: Arc<Notify>,
) {
    let mut scanner = Some(scanner);
    let mut last: Vec<ProbeInfo> = Vec::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = rescan.notified() => ticker.reset(),
        }
        let Some(mut s) = scanner.take() else { return };
        let joined = tokio::task::spawn_blocking(move || {
            let result = s.scan();
            (s, result)
        })
        .await;
        let found = match joined {
            Ok((s, result)) => {
                scanner = Some(s);
                result
            }
            Err(e) => {
                tracing::error!(error = %e, "probe scanner panicked; probe watching stops");
                return;
            }
        };
        let probes = match found {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "probe scan failed; keeping the previous probe list");
                continue;
            }
        };
        let events = diff_probes(&last, &probes);
        if events.is_empty() {
            continue;
        }
        current.send_replace(probes.clone());
        last = probes;
        for event in events {
            match &event {
                ProbeEvent::Added(p) => tracing::info!(probe = %p.id, target = %p.target, "probe added"),
                ProbeEvent::Removed(id) => tracing::info!(probe = %id, "probe removed"),
            }
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::probe::ProbeSpec;

    fn probe(spec: &str) -> ProbeInfo {
        spec.parse::<ProbeSpec>().unwrap().to_info()
    }

    #[test]
    fn diff_reports_removals_then_additions() {
        let a = probe("sim:1?id=a");
        let b = probe("sim:2?id=b");
        let b2 = probe("sim:3?id=b");
        let c = probe("sim:4?id=c");
        assert_eq!(diff_probes(&[], std::slice::from_ref(&a)), [ProbeEvent::Added(a.clone())]);
        assert_eq!(diff_probes(&[a.clone(), b.clone()], &[a.clone(), b.clone()]), []);
        assert_eq!(
            diff_probes(&[a.clone(), b.clone()], &[b2.clone(), c.clone()]),
            [
                ProbeEvent::Removed("a".into()),
                ProbeEvent::Removed("b".into()),
                ProbeEvent::Added(b2),
                ProbeEvent::Added(c)
            ]
        );
    }

    /// A scanner that returns scripted lists in turn (the last one forever) and counts scans.
    fn scripted(lists: Vec<Result<Vec<ProbeInfo>, ProbeError>>) -> (impl ProbeScanner, Arc<Mutex<usize>>) {
        let count = Arc::new(Mutex::new(0usize));
        let counter = Arc::clone(&count);
        let scanner = move || {
            let mut n = counter.lock().unwrap();
            let i = (*n).min(lists.len() - 1);
            *n += 1;
            lists[i].clone()
        };
        (scanner, count)
    }

    #[tokio::test(start_paused = true)]
    async fn watcher_reports_probes_coming_and_going() {
        let a = probe("sim:1?id=a");
        let b = probe("tcp://h:7000?id=b");
        let glitch = Err(ProbeError::Spec { spec: "x".into(), reason: "scan failed".into() });
        let (scanner, count) = scripted(vec![
            Ok(vec![a.clone(), b.clone()]),
            Ok(vec![a.clone(), b.clone()]),
            Ok(vec![a.clone()]),
            glitch,
            Ok(vec![a.clone(), b.clone()]),
        ]);
        let mut w = ProbeWatcher::spawn(scanner, Duration::from_secs(1));
        assert_eq!(w.recv().await, Some(ProbeEvent::Added(a.clone())));
        assert_eq!(w.recv().await, Some(ProbeEvent::Added(b.clone())));
        assert_eq!(w.current(), vec![a.clone(), b.clone()]);
        assert_eq!(w.recv().await, Some(ProbeEvent::Removed("b".into())));
        assert_eq!(w.current(), vec![a.clone()]);
        // The failed scan changes nothing; the next one brings b back.
        assert_eq!(w.recv().await, Some(ProbeEvent::Added(b.clone())));
        assert_eq!(*count.lock().unwrap(), 5);
        let mut sub = w.subscribe();
        assert_eq!(*sub.borrow_and_update(), vec![a, b]);
        // Nothing else happens: the list stays the same.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(w.events.try_recv().is_err());
        assert!(!sub.has_changed().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn rescan_now_does_not_wait_for_the_interval() {
        let a = probe("sim:1?id=a");
        let (scanner, count) = scripted(vec![Ok(vec![]), Ok(vec![a.clone()])]);
        let mut w = ProbeWatcher::spawn(scanner, Duration::from_secs(3600));
        while *count.lock().unwrap() == 0 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let start = tokio::time::Instant::now();
        w.rescan_now();
        assert_eq!(w.recv().await, Some(ProbeEvent::Added(a)));
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn watcher_from_settings_lists_configured_probes() {
        let settings = ProbeSettings {
            probes: vec![crate::probe::ProbeConfig::new("sim:7")],
            usb_scan: false,
            ..ProbeSettings::default()
        };
        let mut w = ProbeWatcher::from_settings(&settings).unwrap();
        match w.recv().await {
            Some(ProbeEvent::Added(p)) => assert_eq!(p.id, "sim:7"),
            other => panic!("unexpected {other:?}"),
        }
        let bad = ProbeSettings { probes: vec![crate::probe::ProbeConfig::new("sim:x")], ..ProbeSettings::default() };
        assert!(ProbeWatcher::from_settings(&bad).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_watcher_stops_scanning() {
        let (scanner, count) = scripted(vec![Ok(vec![probe("sim:1")])]);
        let mut w = ProbeWatcher::spawn(scanner, Duration::from_secs(1));
        assert!(w.recv().await.is_some());
        drop(w);
        let before = *count.lock().unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(*count.lock().unwrap(), before);
    }
}
