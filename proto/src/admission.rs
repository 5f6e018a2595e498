//! Admission of TCP connections to the mutual-TLS server, so that clients that never authenticate cannot
//! stop the ones that do.
//!
//! Owns: the limits ([`AdmissionLimits`]: a deadline for a connection's first TLS bytes, a second one for
//! its whole handshake, caps on pending handshakes per source address and in total, a cap on open
//! connections per verified identity), the table of pending handshakes that sheds the **oldest** one
//! when a cap is reached (so `accept()` is never blocked and a fresh legitimate handshake is never the
//! one dropped), the per-identity connection permits carried by every accepted connection, and the
//! counters of what was dropped ([`AdmissionStats`]), which the accept loop logs as one summary line at
//! most every [`SUMMARY_INTERVAL`] instead of a line per dropped socket.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::AbortHandle;

/// Default deadline for a new connection's first TLS bytes (the ClientHello).
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default deadline for the whole TLS handshake, counted from the first bytes.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default cap on handshakes in progress, all sources together.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1024;
/// Default cap on handshakes in progress from one source address.
pub const DEFAULT_MAX_PENDING_PER_SOURCE: usize = 64;
/// Default cap on open connections of one verified identity (a station or admin needs one or two).
pub const DEFAULT_MAX_CONNECTIONS_PER_IDENTITY: usize = 32;
/// Least time between two summary log lines of dropped connections.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// A connection that has not sent its first TLS bytes this long after `accept` is dropped.
    pub first_byte_timeout: Duration,
    /// A TLS handshake not completed this long after its first bytes is dropped.
    pub handshake_timeout: Duration,
    /// At most this many handshakes in progress; a new connection beyond it sheds the oldest.
    pub max_pending_handshakes: usize,
    /// At most this many handshakes in progress from one source address; beyond it the oldest of that
    /// address is shed.
    pub max_pending_per_source: usize,
    /// At most this many open connections per verified identity; a further one is closed after its
    /// handshake.
    pub max_connections_per_identity: usize,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            first_byte_timeout: DEFAULT_FIRST_BYTE_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
            max_pending_per_source: DEFAULT_MAX_PENDING_PER_SOURCE,
            max_connections_per_identity: DEFAULT_MAX_CONNECTIONS_PER_IDENTITY,
        }
    }
}

/// What admission dropped, since the server started.
#[derive(Debug, Default)]
pub struct AdmissionStats {
    /// Connections that sent nothing within the first-byte deadline.
    pub first_byte_timeouts: AtomicU64,
    /// Handshakes not completed within the handshake deadline.
    pub handshake_timeouts: AtomicU64,
    /// Pending handshakes shed because their source address was at its cap.
    pub shed_per_source: AtomicU64,
    /// Pending handshakes shed because the total was at its cap.
    pub shed_total: AtomicU64,
    /// Verified connections closed because their identity was at its cap.
    pub identity_limit: AtomicU64,
}

/// A snapshot of [`AdmissionStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionCounts {
    /// See [`AdmissionStats::first_byte_timeouts`].
    pub first_byte_timeouts: u64,
    /// See [`AdmissionStats::handshake_timeouts`].
    pub handshake_timeouts: u64,
    /// See [`AdmissionStats::shed_per_source`].
    pub shed_per_source: u64,
    /// See [`AdmissionStats::shed_total`].
    pub shed_total: u64,
    /// See [`AdmissionStats::identity_limit`].
    pub identity_limit: u64,
}

impl AdmissionStats {
    /// The counters now.
    pub fn snapshot(&self) -> AdmissionCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AdmissionCounts {
            first_byte_timeouts: g(&self.first_byte_timeouts),
            handshake_timeouts: g(&self.handshake_timeouts),
            shed_per_source: g(&self.shed_per_source),
            shed_total: g(&self.shed_total),
            identity_limit: g(&self.identity_limit),
        }
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl AdmissionCounts {
    /// Whether nothing was dropped.
    pub fn is_zero(&self) -> bool {
        *self == AdmissionCounts::default()
    }

    /// The counts since `earlier`.
    pub fn since(&self, earlier: &AdmissionCounts) -> AdmissionCounts {
        AdmissionCounts {
            first_byte_timeouts: self.first_byte_timeouts - earlier.first_byte_timeouts,
            handshake_timeouts: self.handshake_timeouts - earlier.handshake_timeouts,
            shed_per_source: self.shed_per_source - earlier.shed_per_source,
            shed_total: self.shed_total - earlier.shed_total,
            identity_limit: self.identity_limit - earlier.identity_limit,
        }
    }
}

#[derive(Debug, Default)]
struct PendingInner {
    next: u64,
    /// Pending handshakes by age (ids only grow), with their task once spawned.
    by_age: BTreeMap<u64, (IpAddr, Option<AbortHandle>)>,
    by_source: HashMap<IpAddr, BTreeSet<u64>>,
}

impl PendingInner {
    fn remove(&mut self, id: u64) -> Option<AbortHandle> {
        let (ip, handle) = self.by_age.remove(&id)?;
        if let Some(set) = self.by_source.get_mut(&ip) {
            set.remove(&id);
            if set.is_empty() {
                self.by_source.remove(&ip);
            }
        }
        handle
    }
}

/// The handshakes in progress.
#[derive(Debug, Default)]
pub(crate) struct PendingHandshakes {
    inner: Mutex<PendingInner>,
}

/// Removes its handshake from the table when the handshake task ends (completes, fails or is aborted).
pub(crate) struct PendingGuard {
    table: Arc<PendingHandshakes>,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.table.lock().remove(self.id);
    }
}

impl PendingHandshakes {
    fn lock(&self) -> std::sync::MutexGuard<'_, PendingInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new handshake from `ip`: sheds (aborts) the oldest handshake of that source when it is at
    /// `per_source`, then the oldest of all when the total is at `total`. Returns the guard of the new
    /// entry; [`PendingHandshakes::register`] then attaches its task.
    pub(crate) fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        total: usize,
        per_source: usize,
        stats: &AdmissionStats,
    ) -> PendingGuard {
        let mut t = self.lock();
        let mut shed = Vec::new();
        while t.by_source.get(&ip).is_some_and(|s| s.len() >= per_source.max(1)) {
            let Some(oldest) = t.by_source.get(&ip).and_then(|s| s.first().copied()) else { break };
            shed.push(t.remove(oldest));
            AdmissionStats::bump(&stats.shed_per_source);
        }
        while t.by_age.len() >= total.max(1) {
            let Some(oldest) = t.by_age.keys().next().copied() else { break };
            shed.push(t.remove(oldest));
            AdmissionStats::bump(&stats.shed_total);
        }
        let id = t.next;
        t.next += 1;
        t.by_age.insert(id, (ip, None));
        t.by_source.entry(ip).or_default().insert(id);
        drop(t);
        for h in shed.into_iter().flatten() {
            h.abort();
        }
        PendingGuard { table: Arc::clone(self), id }
    }

    /// Attaches the task of a handshake admitted with `guard` (if it has not ended already).
    pub(crate) fn register(&self, guard_id: u64, handle: AbortHandle) {
        if let Some(entry) = self.lock().by_age.get_mut(&guard_id) {
            entry.1 = Some(handle);
        }
    }

    /// Handshakes in progress: in total, and from `ip`.
    pub(crate) fn len(&self, ip: Option<IpAddr>) -> usize {
        let t = self.lock();
        match ip {
            None => t.by_age.len(),
            Some(ip) => t.by_source.get(&ip).map_or(0, BTreeSet::len),
        }
    }
}

impl PendingGuard {
    /// The id to pass to [`PendingHandshakes::register`].
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

/// Open connections per verified identity.
#[derive(Debug)]
pub(crate) struct IdentityConnections {
    max: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One open connection of an identity; dropping it (when the connection closes) frees the slot.
#[derive(Debug)]
pub struct IdentityPermit {
    table: Arc<IdentityConnections>,
    identity: String,
}

impl Drop for IdentityPermit {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.identity);
            }
        }
    }
}

impl IdentityConnections {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(IdentityConnections { max: max.max(1), open: Mutex::new(HashMap::new()) })
    }

    /// A permit for one more connection of `identity`, or `None` when it has [`Self::max`] open.
    pub(crate) fn acquire(self: &Arc<Self>, identity: &str) -> Option<IdentityPermit> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(identity.to_owned()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IdentityPermit { table: Arc::clone(self), identity: identity.to_owned() })
    }

    /// Open connections of `identity`.
    #[cfg(test)]
    pub(crate) fn count(&self, identity: &str) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(identity).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[tokio::test]
    async fn the_oldest_of_a_source_is_shed_at_its_cap() {
        let table = Arc::new(PendingHandshakes::default());
        let stats = AdmissionStats::default();
        let mut tasks = Vec::new();
        let mut guards = Vec::new();
        for _ in 0..3 {
            let g = table.admit(ip(2), 100, 3, &stats);
            let task = tokio::spawn(std::future::pending::<()>());
            table.register(g.id(), task.abort_handle());
            tasks.push(task);
            guards.push(g);
        }
        assert_eq!(table.len(Some(ip(2))), 3);
        // The fourth from the same address sheds the first; another address is not touched.
        let _g4 = table.admit(ip(2), 100, 3, &stats);
        let _other = table.admit(ip(1), 100, 3, &stats);
        assert_eq!(table.len(Some(ip(2))), 3);
        assert_eq!(table.len(Some(ip(1))), 1);
        assert!(tasks.remove(0).await.unwrap_err().is_cancelled());
        assert_eq!(stats.snapshot().shed_per_source, 1);
        // A guard dropped after its entry was shed changes nothing.
        drop(guards.remove(0));
        assert_eq!(table.len(None), 4);
    }

    #[tokio::test]
    async fn the_oldest_of_all_is_shed_at_the_total_cap() {
        let table = Arc::new(PendingHandshakes::default());
        let stats = AdmissionStats::default();
        let first = table.admit(ip(9), 2, 10, &stats);
        let task = tokio::spawn(std::future::pending::<()>());
        table.register(first.id(), task.abort_handle());
        let _second = table.admit(ip(8), 2, 10, &stats);
        let _third = table.admit(ip(7), 2, 10, &stats);
        assert_eq!(table.len(None), 2);
        assert_eq!(table.len(Some(ip(9))), 0);
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(stats.snapshot().shed_total, 1);
        assert_eq!(stats.snapshot().since(&AdmissionCounts::default()).shed_total, 1);
    }

    #[test]
    fn identity_permits_are_capped_and_freed() {
        let t = IdentityConnections::new(2);
        let a = t.acquire("spiffe://x/admin/ops").unwrap();
        let _b = t.acquire("spiffe://x/admin/ops").unwrap();
        assert!(t.acquire("spiffe://x/admin/ops").is_none());
        assert!(t.acquire("spiffe://x/site/berlin/station/1").is_some());
        drop(a);
        assert_eq!(t.count("spiffe://x/admin/ops"), 1);
        assert!(t.acquire("spiffe://x/admin/ops").is_some());
    }
}
