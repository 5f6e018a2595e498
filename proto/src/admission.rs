//! Admission of TCP connections to the mutual-TLS server, so that clients that never authenticate cannot
//! stop the ones that do.
//!
//! Owns: the limits ([`AdmissionLimits`]: a deadline for a connection's first TLS bytes, a second one for
//! its whole handshake, a per-source rate of new handshakes with a queue of connections waiting for it,
//! caps on pending handshakes per source address and in total, a cap on open connections per verified
//! identity), the per-source gate ([`SourceGate`]) that holds connections beyond a source's rate
//! unread until the rate allows them in or their first-byte deadline passes, the table of pending
//! handshakes that sheds the **oldest** one when a cap is reached (so `accept()` is never blocked and a
//! fresh legitimate handshake is never the one dropped), the per-identity connection permits carried by
//! every accepted connection, and the counters of what was dropped ([`AdmissionStats`]), which the
//! accept loop logs as one summary line at most every [`SUMMARY_INTERVAL`] instead of a line per
//! dropped socket.
//!
//! Why a queue and not only shedding: a client with more sockets than a cap, reconnecting each one as
//! soon as it is closed, turns shed-the-oldest into a reconnect loop as fast as the machine allows
//! (15,000 connects/s in the issue-10 benchmark). Connections beyond a source's rate cost one
//! descriptor and no task while they wait, and are closed only at their first-byte deadline, so such a
//! loop runs at most at (its sockets / `first_byte_timeout`), while other sources are not slowed at
//! all. A source is an IPv4 address or an IPv6 /64 (one host's usual allocation).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Default deadline for a new connection's first TLS bytes (the ClientHello).
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default deadline for the whole TLS handshake, counted from the first bytes.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default cap on handshakes in progress, all sources together.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1024;
/// Default cap on handshakes in progress from one source address.
pub const DEFAULT_MAX_PENDING_PER_SOURCE: usize = 64;
/// Default rate of new handshakes one source may start, per second, once its burst is spent.
pub const DEFAULT_HANDSHAKE_RATE_PER_SOURCE: u32 = 200;
/// Default burst of handshakes one source may start at once (a site's stations reconnecting together
/// after a broker restart start at once up to this many, then at the rate).
pub const DEFAULT_HANDSHAKE_BURST_PER_SOURCE: u32 = 64;
/// Default cap on connections waiting for their source's rate, all sources together. Each costs one
/// file descriptor (the broker raises its soft open-file limit to the hard one at start, and the
/// effective cap is kept [`RESERVED_DESCRIPTORS`] below that limit).
pub const DEFAULT_MAX_WAITING: usize = 65_536;
/// Descriptors kept free of waiting connections for the ledger, the HSM and established connections.
pub const RESERVED_DESCRIPTORS: u64 = 4_096;
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
    /// New handshakes one source may start per second once its burst is spent; connections beyond
    /// wait unread (0: no rate, every connection starts its handshake at once).
    pub handshake_rate_per_source: u32,
    /// Handshakes one source may start at once before its rate applies.
    pub handshake_burst_per_source: u32,
    /// At most this many connections wait for their source's rate, in all; beyond it a new connection
    /// of a source that is over its rate is closed at once. One source has at most as many as its
    /// address has ports, so the default never closes a waiting connection of a single IPv4 client.
    pub max_waiting: usize,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            first_byte_timeout: DEFAULT_FIRST_BYTE_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
            max_pending_per_source: DEFAULT_MAX_PENDING_PER_SOURCE,
            max_connections_per_identity: DEFAULT_MAX_CONNECTIONS_PER_IDENTITY,
            handshake_rate_per_source: DEFAULT_HANDSHAKE_RATE_PER_SOURCE,
            handshake_burst_per_source: DEFAULT_HANDSHAKE_BURST_PER_SOURCE,
            max_waiting: DEFAULT_MAX_WAITING,
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
    /// Connections that waited for their source's rate until their first-byte deadline.
    pub waiting_timeouts: AtomicU64,
    /// Connections closed at once because [`AdmissionLimits::max_waiting`] were already waiting.
    pub waiting_full: AtomicU64,
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
    /// See [`AdmissionStats::waiting_timeouts`].
    pub waiting_timeouts: u64,
    /// See [`AdmissionStats::waiting_full`].
    pub waiting_full: u64,
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
            waiting_timeouts: g(&self.waiting_timeouts),
            waiting_full: g(&self.waiting_full),
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
            waiting_timeouts: self.waiting_timeouts - earlier.waiting_timeouts,
            waiting_full: self.waiting_full - earlier.waiting_full,
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
        let ip = source_key(ip);
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
            Some(ip) => t.by_source.get(&source_key(ip)).map_or(0, BTreeSet::len),
        }
    }
}

impl PendingGuard {
    /// The id to pass to [`PendingHandshakes::register`].
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

/// The source an address counts against: an IPv4 address (an IPv4-mapped IPv6 address as that IPv4
/// address) or an IPv6 /64, the prefix one host or one customer usually holds.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Raises this process's soft open-file limit to its hard limit (connections waiting at the gate each
/// hold a descriptor) and returns the soft limit now in force.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    Ok(hard.max(soft))
}

/// How many connections may wait at the gate under the current open-file limit: `configured`, but at
/// most that limit less [`RESERVED_DESCRIPTORS`] (0 when the limit is lower: a source over its rate then
/// has its new connections closed at once).
pub fn effective_max_waiting(configured: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    let room = usize::try_from(soft.saturating_sub(RESERVED_DESCRIPTORS)).unwrap_or(usize::MAX);
    configured.min(room)
}

/// A TCP connection on its way to a handshake: its socket, its peer, and when it was accepted (its
/// first-byte deadline counts from then, waiting at the gate included).
#[derive(Debug)]
pub struct Accepted {
    /// The socket, unread.
    pub tcp: TcpStream,
    /// The peer's address.
    pub remote: SocketAddr,
    /// When `accept()` returned it.
    pub at: Instant,
}

#[derive(Debug)]
struct Source {
    tokens: f64,
    refilled: Instant,
    queue: VecDeque<Accepted>,
}

impl Source {
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled = now;
    }
}

/// How often the gate lets waiting connections in while any wait.
pub const GATE_TICK: Duration = Duration::from_millis(10);
/// Sources the gate remembers before it forgets the idle ones (a full bucket and nothing waiting).
const GATE_SWEEP_AT: usize = 4_096;

/// The per-source rate of new handshakes, with the connections waiting for it.
///
/// Owned by the accept loop (no lock). A source starts handshakes at once while its token bucket
/// (`handshake_burst_per_source` tokens, refilled at `handshake_rate_per_source` per second) has a token
/// and nothing of it waits; otherwise its connection waits, unread and without a task, in arrival
/// order, until [`SourceGate::release`] lets it in or its first-byte deadline passes. When
/// `max_waiting` connections wait, a new one that would wait is closed at once.
#[derive(Debug)]
pub struct SourceGate {
    rate: f64,
    burst: f64,
    max_waiting: usize,
    first_byte: Duration,
    waiting: usize,
    due: Option<Instant>,
    sweep_at: usize,
    sources: HashMap<IpAddr, Source>,
}

impl SourceGate {
    /// A gate for `limits`, holding at most `max_waiting` connections (see [`effective_max_waiting`]).
    pub fn new(limits: &AdmissionLimits, max_waiting: usize) -> Self {
        SourceGate {
            rate: f64::from(limits.handshake_rate_per_source),
            burst: f64::from(limits.handshake_burst_per_source.max(1)),
            max_waiting,
            first_byte: limits.first_byte_timeout,
            waiting: 0,
            due: None,
            sweep_at: GATE_SWEEP_AT,
            sources: HashMap::new(),
        }
    }

    /// A connection just accepted: returned when its source may start its handshake now; otherwise it
    /// waits (or is closed when the gate is full, counted in `stats`).
    pub fn offer(&mut self, conn: Accepted, stats: &AdmissionStats) -> Option<Accepted> {
        if self.rate <= 0.0 {
            return Some(conn);
        }
        if self.sources.len() >= self.sweep_at {
            self.sweep(conn.at);
        }
        let (rate, burst) = (self.rate, self.burst);
        let source = self.sources.entry(source_key(conn.remote.ip())).or_insert_with(|| Source {
            tokens: burst,
            refilled: conn.at,
            queue: VecDeque::new(),
        });
        source.refill(conn.at, rate, burst);
        if source.queue.is_empty() && source.tokens >= 1.0 {
            source.tokens -= 1.0;
            return Some(conn);
        }
        if self.waiting >= self.max_waiting {
            AdmissionStats::bump(&stats.waiting_full);
            return None; // dropping `conn` closes it
        }
        source.queue.push_back(conn);
        self.waiting += 1;
        None
    }

    /// Closes the waiting connections whose first-byte deadline has passed (counted in `stats`) and moves
    /// those their source's rate now allows, oldest first, into `out`.
    pub fn release(&mut self, now: Instant, stats: &AdmissionStats, out: &mut Vec<Accepted>) {
        self.due = None;
        let (rate, burst, first_byte) = (self.rate, self.burst, self.first_byte);
        for source in self.sources.values_mut().filter(|s| !s.queue.is_empty()) {
            while source.queue.front().is_some_and(|c| now.saturating_duration_since(c.at) >= first_byte) {
                source.queue.pop_front();
                self.waiting -= 1;
                AdmissionStats::bump(&stats.waiting_timeouts);
            }
            source.refill(now, rate, burst);
            while source.tokens >= 1.0 {
                let Some(conn) = source.queue.pop_front() else { break };
                source.tokens -= 1.0;
                self.waiting -= 1;
                out.push(conn);
            }
        }
    }

    /// When [`SourceGate::release`] should run next: `None` while nothing waits. The time is kept until
    /// `release` runs, so a stream of new connections arriving faster than [`GATE_TICK`] cannot keep
    /// pushing it back.
    pub fn next_release(&mut self, now: Instant) -> Option<Instant> {
        if self.waiting == 0 {
            self.due = None;
            return None;
        }
        Some(*self.due.get_or_insert(now + GATE_TICK))
    }

    /// Connections waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Forgets the sources with nothing waiting and a full bucket (they start like new ones), and sets
    /// the next sweep at twice what remains, so sweeping stays amortised O(1) per connection.
    fn sweep(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.sources.retain(|_, s| {
            s.refill(now, rate, burst);
            !s.queue.is_empty() || s.tokens < burst
        });
        self.sweep_at = (self.sources.len() * 2).max(GATE_SWEEP_AT);
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

    /// `n` accepted connections from 127.0.0.`last`, stamped `at`, with the client ends to watch.
    async fn accepted(n: usize, last: u8, at: Instant) -> (Vec<Accepted>, Vec<tokio::net::TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mut server, mut client) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::from(([127, 0, 0, last], 0))).unwrap();
            client.push(socket.connect(addr).await.unwrap());
            let (tcp, remote) = listener.accept().await.unwrap();
            server.push(Accepted { tcp, remote, at });
        }
        (server, client)
    }

    fn gate_limits(rate: u32, burst: u32, first_byte: Duration) -> AdmissionLimits {
        AdmissionLimits {
            handshake_rate_per_source: rate,
            handshake_burst_per_source: burst,
            first_byte_timeout: first_byte,
            ..AdmissionLimits::default()
        }
    }

    async fn closed_by_server(client: &mut tokio::net::TcpStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_secs(5), client.read(&mut b)).await, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test]
    async fn a_source_starts_its_burst_at_once_then_waits_for_its_rate_in_order() {
        let t0 = Instant::now();
        let stats = AdmissionStats::default();
        let mut gate = SourceGate::new(&gate_limits(100, 3, Duration::from_secs(2)), 100);
        let (conns, _clients) = accepted(6, 2, t0).await;
        let ports: Vec<u16> = conns.iter().map(|c| c.remote.port()).collect();
        let started: Vec<_> = conns.into_iter().filter_map(|c| gate.offer(c, &stats)).collect();
        assert_eq!(started.len(), 3, "the burst starts at once");
        assert_eq!(gate.waiting(), 3);
        // Another source is not slowed by the first one's queue.
        let (other, _c2) = accepted(1, 3, t0).await;
        assert!(gate.offer(other.into_iter().next().unwrap(), &stats).is_some());
        // 100 per second: nothing after 5 ms, one after 15 ms, the rest by 35 ms, oldest first.
        let mut out = Vec::new();
        gate.release(t0 + Duration::from_millis(5), &stats, &mut out);
        assert!(out.is_empty());
        gate.release(t0 + Duration::from_millis(15), &stats, &mut out);
        assert_eq!(out.len(), 1);
        gate.release(t0 + Duration::from_millis(35), &stats, &mut out);
        assert_eq!(out.iter().map(|c| c.remote.port()).collect::<Vec<_>>(), ports[3..]);
        assert_eq!(gate.waiting(), 0);
        assert!(gate.next_release(t0).is_none());
        assert!(stats.snapshot().is_zero(), "nothing was dropped");
    }

    #[tokio::test]
    async fn new_connections_do_not_push_the_release_back() {
        let t0 = Instant::now();
        let stats = AdmissionStats::default();
        let mut gate = SourceGate::new(&gate_limits(100, 1, Duration::from_secs(2)), 100);
        let (conns, _clients) = accepted(3, 2, t0).await;
        for c in conns {
            let _ = gate.offer(c, &stats);
        }
        let due = gate.next_release(t0).unwrap();
        // Asked again and again as connections keep arriving, the gate keeps its time.
        assert_eq!(gate.next_release(t0 + Duration::from_millis(4)), Some(due));
        assert_eq!(gate.next_release(t0 + Duration::from_millis(9)), Some(due));
        gate.release(due, &stats, &mut Vec::new());
        assert!(gate.next_release(due).unwrap() > due);
    }

    #[tokio::test]
    async fn a_waiting_connection_is_closed_at_its_first_byte_deadline() {
        let t0 = Instant::now();
        let stats = AdmissionStats::default();
        let mut gate = SourceGate::new(&gate_limits(1, 1, Duration::from_millis(100)), 100);
        let (conns, mut clients) = accepted(3, 2, t0).await;
        for c in conns {
            let _ = gate.offer(c, &stats);
        }
        assert_eq!(gate.waiting(), 2);
        let mut out = Vec::new();
        // At 1 per second no token has come back by the 100 ms deadline: both are closed, not started.
        gate.release(t0 + Duration::from_millis(100), &stats, &mut out);
        assert!(out.is_empty());
        assert_eq!(gate.waiting(), 0);
        assert_eq!(stats.snapshot().waiting_timeouts, 2);
        assert!(closed_by_server(&mut clients[1]).await);
        assert!(closed_by_server(&mut clients[2]).await);
    }

    #[tokio::test]
    async fn a_full_gate_closes_the_newcomer_at_once() {
        let t0 = Instant::now();
        let stats = AdmissionStats::default();
        let mut gate = SourceGate::new(&gate_limits(1, 1, Duration::from_secs(2)), 1);
        let (conns, mut clients) = accepted(3, 2, t0).await;
        let started: Vec<_> = conns.into_iter().filter_map(|c| gate.offer(c, &stats)).collect();
        assert_eq!(started.len(), 1);
        assert_eq!(gate.waiting(), 1, "the second waits, the third finds the gate full");
        assert_eq!(stats.snapshot().waiting_full, 1);
        assert!(closed_by_server(&mut clients[2]).await);
    }

    #[tokio::test]
    async fn no_rate_means_no_gate() {
        let stats = AdmissionStats::default();
        let mut gate = SourceGate::new(&gate_limits(0, 1, Duration::from_secs(2)), 0);
        let (conns, _clients) = accepted(5, 2, Instant::now()).await;
        assert_eq!(conns.into_iter().filter_map(|c| gate.offer(c, &stats)).count(), 5);
    }

    #[tokio::test]
    async fn idle_sources_are_forgotten() {
        let t0 = Instant::now();
        let stats = AdmissionStats::default();
        let mut gate = SourceGate::new(&gate_limits(1_000, 1, Duration::from_secs(2)), 10);
        let (conns, _clients) = accepted(1, 2, t0).await;
        let _started = gate.offer(conns.into_iter().next().unwrap(), &stats);
        assert_eq!(gate.sources.len(), 1);
        gate.sweep(t0 + Duration::from_secs(1));
        assert!(gate.sources.is_empty(), "a refilled source with nothing waiting is dropped");
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(source_key(v6("2001:db8:1:2:aaaa::1")), v6("2001:db8:1:2::"));
        assert_eq!(source_key(v6("2001:db8:1:2:bbbb::9")), source_key(v6("2001:db8:1:2::77")));
        assert_ne!(source_key(v6("2001:db8:1:3::1")), source_key(v6("2001:db8:1:2::1")));
        assert_eq!(source_key(v6("::ffff:10.0.0.7")), IpAddr::from([10, 0, 0, 7]));
        assert_eq!(source_key(ip(7)), ip(7));
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
