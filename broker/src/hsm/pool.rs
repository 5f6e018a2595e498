//! The HSM pool: several [`HsmBackend`] members (tokens, modules or soft keystores) holding the
//! same firmware keys, behind one async API. It owns dispatch (the healthy member with the fewest
//! requests in flight relative to its capacity), failover (a device error marks the member
//! unhealthy and the request is retried on another member; logical refusals are returned at once),
//! re-probing of unhealthy members with `health()` on exponential backoff (a background task, and
//! lazily when no member is healthy), periodic health checks of healthy members, the tower layers
//! (load shedding, a concurrency limit equal to the sum of the members' capacities, a timeout), and
//! per-member status and metrics: histogram `flashgate_hsm_latency_seconds{member,op}` and gauge
//! `flashgate_hsm_member_healthy{member}`.
//!
//! Member calls run on tokio's blocking pool (`spawn_blocking`), except licences of a member whose
//! licence is a computation in memory ([`HsmBackend::licence_in_memory`], the soft keystore): those
//! run on the calling task, which saves two thread hand-offs per licence. A request that times out
//! releases its concurrency slot at once, but its blocking call finishes in the background and stays
//! counted in the member's in-flight figure until then.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use flashgate_common::cert::ChipCertificate;
use flashgate_common::licence::{KeyId, Licence};
use flashgate_common::sfi::{FirmwareKey, ImageNonce, PlainArea};
use tower::limit::ConcurrencyLimit;
use tower::load_shed::LoadShed;
use tower::timeout::Timeout;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

use super::{HsmBackend, HsmError, KeyInfo, random_key_id};

/// "Not scheduled": far enough to never come, small enough to add to any `Instant`.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Default admission limit per unit of member capacity (see [`PoolConfig::max_in_flight`]).
pub const QUEUE_FACTOR: usize = 64;

/// Pool tuning.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Deadline of one request, failovers included.
    pub timeout: Duration,
    /// First re-probe delay after a member fails.
    pub backoff_initial: Duration,
    /// Longest re-probe delay (the delay doubles per failed probe up to this).
    pub backoff_max: Duration,
    /// How often the background task looks for members to probe.
    pub probe_tick: Duration,
    /// How often a healthy member is health-checked (None: only on failures).
    pub health_interval: Option<Duration>,
    /// Requests admitted — running on a member or waiting for a free slot — before new ones are shed;
    /// None: [`QUEUE_FACTOR`] × the sum of the members' capacities. At most the sum of the capacities run
    /// at once; the others wait (asynchronously, within `timeout`) for a slot.
    pub max_in_flight: Option<usize>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            probe_tick: Duration::from_millis(50),
            health_interval: Some(Duration::from_secs(10)),
            max_in_flight: None,
        }
    }
}

/// One member's state as [`HsmPool::status`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberStatus {
    /// The backend's name.
    pub name: String,
    /// Whether requests are sent to it.
    pub healthy: bool,
    /// Requests running on it now.
    pub in_flight: usize,
    /// Its parallel sessions.
    pub capacity: usize,
    /// The last device error, if any (cleared when a probe succeeds).
    pub last_error: Option<String>,
    /// Consecutive failures (device errors and failed probes).
    pub consecutive_failures: u32,
    /// Requests completed (successfully or not).
    pub requests: u64,
    /// Requests that failed with a device error.
    pub device_errors: u64,
    /// Mean latency of completed requests.
    pub latency_mean: Duration,
    /// Largest latency seen.
    pub latency_max: Duration,
    /// Latency of the last request.
    pub latency_last: Duration,
    /// The public half of its audit-signing key, once [`HsmPool::ensure_audit_keys`] read or created it.
    pub audit_key: Option<p256::ecdsa::VerifyingKey>,
}

#[derive(Debug)]
struct Health {
    healthy: bool,
    last_error: Option<String>,
    failures: u32,
    /// When an unhealthy member is due for a probe, or a healthy one for a check.
    next_probe: Instant,
    probing: bool,
}

#[derive(Debug, Default)]
struct Stats {
    requests: u64,
    device_errors: u64,
    total: Duration,
    max: Duration,
    last: Duration,
}

struct Member {
    backend: Arc<dyn HsmBackend>,
    name: String,
    capacity: usize,
    in_flight: AtomicUsize,
    health: Mutex<Health>,
    stats: Mutex<Stats>,
    audit_key: Mutex<Option<p256::ecdsa::VerifyingKey>>,
}

struct Inner {
    members: Vec<Member>,
    config: PoolConfig,
    /// One permit per parallel slot of all members: requests beyond it wait here, not on blocking threads.
    slots: tokio::sync::Semaphore,
}

/// The work a pool request does on one member.
#[derive(Clone)]
enum Request {
    Licence { key_id: KeyId, cert: Box<ChipCertificate>, nonce: ImageNonce },
    Image { key_id: KeyId, nonce: ImageNonce, areas: Arc<Vec<PlainArea>> },
}

enum Reply {
    Licence(Licence),
    Image(Vec<u8>),
}

impl Request {
    fn op(&self) -> &'static str {
        match self {
            Request::Licence { .. } => "issue_licence",
            Request::Image { .. } => "encrypt_image",
        }
    }

    fn run(&self, backend: &dyn HsmBackend) -> Result<Reply, HsmError> {
        match self {
            Request::Licence { key_id, cert, nonce } => backend.issue_licence(key_id, cert, nonce).map(Reply::Licence),
            Request::Image { key_id, nonce, areas } => backend.encrypt_image(key_id, nonce, areas).map(Reply::Image),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain counters behind: still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a call in flight on a member until dropped (when the blocking call ends, even if the
/// request that started it timed out).
struct InFlight {
    inner: Arc<Inner>,
    idx: usize,
    op: &'static str,
    started: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let m = &self.inner.members[self.idx];
        m.in_flight.fetch_sub(1, Ordering::AcqRel);
        let took = self.started.elapsed();
        let mut s = lock(&m.stats);
        s.requests += 1;
        s.total += took;
        s.max = s.max.max(took);
        s.last = took;
        drop(s);
        metrics::histogram!("flashgate_hsm_latency_seconds", "member" => m.name.clone(), "op" => self.op)
            .record(took.as_secs_f64());
    }
}

impl Inner {
    fn backoff(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(20);
        self.config.backoff_initial.saturating_mul(1u32 << shift).min(self.config.backoff_max)
    }

    /// The healthy, untried member with the fewest requests in flight relative to its capacity.
    fn pick(&self, tried: &[bool]) -> Option<usize> {
        let mut best: Option<(usize, usize, usize)> = None; // (idx, in_flight, capacity)
        for (i, m) in self.members.iter().enumerate() {
            if tried[i] || !lock(&m.health).healthy {
                continue;
            }
            let load = m.in_flight.load(Ordering::Acquire);
            let better = match best {
                None => true,
                // load/cap < best_load/best_cap, without division.
                Some((_, bl, bc)) => load * bc < bl * m.capacity,
            };
            if better {
                best = Some((i, load, m.capacity));
            }
        }
        best.map(|(i, _, _)| i)
    }

    fn mark_failed(&self, idx: usize, error: &HsmError) {
        let m = &self.members[idx];
        let mut h = lock(&m.health);
        let was_healthy = h.healthy;
        h.healthy = false;
        h.failures = h.failures.saturating_add(1);
        h.last_error = Some(error.to_string());
        h.next_probe = Instant::now() + self.backoff(h.failures);
        drop(h);
        lock(&m.stats).device_errors += 1;
        metrics::gauge!("flashgate_hsm_member_healthy", "member" => m.name.clone()).set(0.0);
        if was_healthy {
            tracing::warn!(member = %m.name, error = %error, "HSM member marked unhealthy; failing over");
        }
    }

    /// Probe one member with `health()` (blocking pool); updates its state. Returns whether healthy.
    async fn probe(self: &Arc<Self>, idx: usize) -> bool {
        {
            let mut h = lock(&self.members[idx].health);
            if h.probing {
                return h.healthy;
            }
            h.probing = true;
        }
        let backend = self.members[idx].backend.clone();
        let result = spawn_member(&self.members[idx].name, move || backend.health()).await;
        let m = &self.members[idx];
        let mut h = lock(&m.health);
        h.probing = false;
        match result {
            Ok(()) => {
                if !h.healthy {
                    tracing::info!(member = %m.name, "HSM member healthy again");
                }
                h.healthy = true;
                h.failures = 0;
                h.last_error = None;
                h.next_probe = Instant::now() + self.config.health_interval.unwrap_or(NEVER);
                metrics::gauge!("flashgate_hsm_member_healthy", "member" => m.name.clone()).set(1.0);
                true
            }
            Err(e) => {
                if h.healthy {
                    tracing::warn!(member = %m.name, error = %e, "HSM member failed its health check");
                }
                h.healthy = false;
                h.failures = h.failures.saturating_add(1);
                h.last_error = Some(e.to_string());
                h.next_probe = Instant::now() + self.backoff(h.failures);
                metrics::gauge!("flashgate_hsm_member_healthy", "member" => m.name.clone()).set(0.0);
                false
            }
        }
    }

    /// Probe every member that is due (unhealthy past its backoff, or healthy past its check interval).
    async fn probe_due(self: &Arc<Self>, include_healthy: bool) {
        let now = Instant::now();
        for i in 0..self.members.len() {
            let due = {
                let h = lock(&self.members[i].health);
                !h.probing && h.next_probe <= now && (include_healthy || !h.healthy)
            };
            if due {
                self.probe(i).await;
            }
        }
    }

    async fn run_on(self: &Arc<Self>, idx: usize, req: Request) -> Result<Reply, HsmError> {
        let m = &self.members[idx];
        m.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight { inner: self.clone(), idx, op: req.op(), started: Instant::now() };
        let backend = m.backend.clone();
        if matches!(req, Request::Licence { .. }) && backend.licence_in_memory() {
            let _guard = guard;
            return req.run(backend.as_ref());
        }
        match tokio::task::spawn_blocking(move || {
            let _guard = guard;
            req.run(backend.as_ref())
        })
        .await
        {
            Ok(r) => r,
            Err(e) => Err(HsmError::Task { member: m.name.clone(), reason: e.to_string() }),
        }
    }

    async fn dispatch(self: Arc<Self>, req: Request) -> Result<Reply, HsmError> {
        let n = self.members.len();
        let mut tried = vec![false; n];
        let mut attempts = 0;
        let mut last: Option<HsmError> = None;
        let mut reprobed = false;
        loop {
            let idx = match self.pick(&tried) {
                Some(i) => i,
                None if attempts == 0 && !reprobed => {
                    // Nothing healthy: probe whatever is due before giving up.
                    reprobed = true;
                    self.probe_due(false).await;
                    continue;
                }
                None => break,
            };
            tried[idx] = true;
            attempts += 1;
            // The semaphore is never closed; if it were, running unthrottled is still correct.
            let _slot = self.slots.acquire().await.ok();
            match self.run_on(idx, req.clone()).await {
                Ok(r) => {
                    let mut h = lock(&self.members[idx].health);
                    h.failures = 0;
                    return Ok(r);
                }
                Err(e) if e.is_device_error() => {
                    self.mark_failed(idx, &e);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        match last {
            Some(e) => Err(HsmError::AllMembersFailed { attempts, last: Box::new(e) }),
            None => Err(HsmError::NoHealthyMember { members: n }),
        }
    }
}

/// The innermost tower service: dispatch with failover.
#[derive(Clone)]
struct Dispatch(Arc<Inner>);

impl Service<Request> for Dispatch {
    type Response = Reply;
    type Error = HsmError;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, HsmError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        Box::pin(self.0.clone().dispatch(req))
    }
}

type Stack = LoadShed<ConcurrencyLimit<Timeout<Dispatch>>>;

/// A pool of HSM members holding the same keys, with failover, health probes and load shedding.
/// Create it inside a tokio runtime (it starts a background prober that stops with the pool).
pub struct HsmPool {
    inner: Arc<Inner>,
    stack: Stack,
    limit: usize,
}

impl std::fmt::Debug for HsmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmPool")
            .field("members", &self.inner.members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>())
            .field("limit", &self.limit)
            .finish()
    }
}

impl HsmPool {
    /// A pool of `members` (at least one). All start healthy; the first failure or health check
    /// says otherwise.
    pub fn new(members: Vec<Arc<dyn HsmBackend>>, config: PoolConfig) -> Result<Self, HsmError> {
        if members.is_empty() {
            return Err(HsmError::Unsupported("an HSM pool needs at least one member".into()));
        }
        let now = Instant::now();
        let first_check = config.health_interval.map(|i| now + i).unwrap_or(now + NEVER);
        let members: Vec<Member> = members
            .into_iter()
            .map(|backend| {
                let name = backend.name().to_string();
                metrics::gauge!("flashgate_hsm_member_healthy", "member" => name.clone()).set(1.0);
                Member {
                    capacity: backend.capacity().max(1),
                    name,
                    backend,
                    in_flight: AtomicUsize::new(0),
                    health: Mutex::new(Health {
                        healthy: true,
                        last_error: None,
                        failures: 0,
                        next_probe: first_check,
                        probing: false,
                    }),
                    stats: Mutex::new(Stats::default()),
                    audit_key: Mutex::new(None),
                }
            })
            .collect();
        let slots: usize = members.iter().map(|m| m.capacity).sum();
        let limit = config.max_in_flight.unwrap_or(slots * QUEUE_FACTOR).max(1);
        let inner = Arc::new(Inner { members, config, slots: tokio::sync::Semaphore::new(slots.max(1)) });
        let stack = ServiceBuilder::new()
            .load_shed()
            .concurrency_limit(limit)
            .timeout(inner.config.timeout)
            .service(Dispatch(inner.clone()));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(prober(Arc::downgrade(&inner)));
        } else {
            tracing::warn!("HSM pool created outside a tokio runtime: unhealthy members are re-probed lazily only");
        }
        Ok(Self { inner, stack, limit })
    }

    /// Requests the pool runs at once before shedding.
    pub fn capacity(&self) -> usize {
        self.limit
    }

    /// Issue a licence (profile §4) on the least busy healthy member, failing over on device errors.
    /// The certificate must already be verified against the trusted vendor CA keys.
    pub async fn issue_licence(
        &self,
        key_id: KeyId,
        cert: ChipCertificate,
        nonce: ImageNonce,
    ) -> Result<Licence, HsmError> {
        match self.call(Request::Licence { key_id, cert: Box::new(cert), nonce }).await? {
            Reply::Licence(l) => Ok(l),
            Reply::Image(_) => Err(HsmError::Unsupported("member answered a licence request with an image".into())),
        }
    }

    /// Encrypt plaintext areas into an `.sfi` image under `key_id` and a fresh `nonce` inside a member.
    pub async fn encrypt_image(
        &self,
        key_id: KeyId,
        nonce: ImageNonce,
        areas: Vec<PlainArea>,
    ) -> Result<Vec<u8>, HsmError> {
        match self.call(Request::Image { key_id, nonce, areas: Arc::new(areas) }).await? {
            Reply::Image(i) => Ok(i),
            Reply::Licence(_) => Err(HsmError::Unsupported("member answered an image request with a licence".into())),
        }
    }

    async fn call(&self, req: Request) -> Result<Reply, HsmError> {
        let op = req.op();
        let map = |e: BoxError| -> HsmError {
            if e.is::<tower::load_shed::error::Overloaded>() {
                return HsmError::Overloaded { capacity: self.limit };
            }
            if e.is::<tower::timeout::error::Elapsed>() {
                return HsmError::Timeout { op, after: self.inner.config.timeout };
            }
            match e.downcast::<HsmError>() {
                Ok(h) => *h,
                Err(other) => HsmError::Task { member: "pool".into(), reason: other.to_string() },
            }
        };
        let mut svc = self.stack.clone();
        let ready = svc.ready().await.map_err(map)?;
        ready.call(req).await.map_err(map)
    }

    /// Import a firmware key into every member under one fresh key id (the key-file ceremony).
    pub async fn import_key(&self, label: &str, key: FirmwareKey) -> Result<KeyInfo, HsmError> {
        self.import_key_with_id(random_key_id(), label, key).await
    }

    /// Import a firmware key into every member under `key_id`. Members that already hold the id
    /// are skipped, so a failed import can be completed by calling again with the same id.
    pub async fn import_key_with_id(&self, key_id: KeyId, label: &str, key: FirmwareKey) -> Result<KeyInfo, HsmError> {
        let key = Arc::new(key);
        for m in &self.inner.members {
            let (backend, key, label) = (m.backend.clone(), key.clone(), label.to_string());
            spawn_member(&m.name, move || {
                if backend.has_key(&key_id)? {
                    return Ok(());
                }
                backend.import_key_with_id(key_id, &label, &key).map(|_| ())
            })
            .await?;
        }
        Ok(KeyInfo { key_id, label: label.to_string() })
    }

    /// Generate a key inside the HSM. Only for a single-member pool: with several members the
    /// same key must reach every member through the key ceremony (`docs/key-ceremony.md`).
    pub async fn generate_key(&self, label: &str) -> Result<KeyInfo, HsmError> {
        if self.inner.members.len() != 1 {
            return Err(HsmError::Unsupported(format!(
                "cannot generate a key in a pool of {} members: every member must hold the same key; \
                 use the key ceremony (docs/key-ceremony.md): import from key files, or generate in one \
                 token and wrap/unwrap it into the others",
                self.inner.members.len()
            )));
        }
        let m = &self.inner.members[0];
        let (backend, label) = (m.backend.clone(), label.to_string());
        spawn_member(&m.name, move || backend.generate_key(&label)).await
    }

    /// Whether every member holds the key.
    pub async fn has_key(&self, key_id: KeyId) -> Result<bool, HsmError> {
        for m in &self.inner.members {
            let backend = m.backend.clone();
            if !spawn_member(&m.name, move || backend.has_key(&key_id)).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The keys of the first healthy member (all members hold the same keys after the ceremony).
    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>, HsmError> {
        let tried = vec![false; self.inner.members.len()];
        let idx = self.inner.pick(&tried).ok_or(HsmError::NoHealthyMember { members: self.inner.members.len() })?;
        let m = &self.inner.members[idx];
        let backend = m.backend.clone();
        spawn_member(&m.name, move || backend.list_keys()).await
    }

    /// Reads — creating it where missing — every member's audit-signing key (the broker does this at
    /// start). Returns how many members have one; members that cannot (a backend without audit keys,
    /// a device failure) are logged and skipped, and a later call retries them.
    pub async fn ensure_audit_keys(&self) -> usize {
        let mut n = 0;
        for m in &self.inner.members {
            if lock(&m.audit_key).is_some() {
                n += 1;
                continue;
            }
            let backend = m.backend.clone();
            match spawn_member(&m.name, move || backend.ensure_audit_key()).await {
                Ok(vk) => {
                    *lock(&m.audit_key) = Some(vk);
                    n += 1;
                }
                Err(e) => tracing::warn!(member = %m.name, error = %e, "HSM member has no audit-signing key"),
            }
        }
        n
    }

    /// Every member's audit-signing public key known so far, with the member's name.
    pub fn audit_keys(&self) -> Vec<(String, p256::ecdsa::VerifyingKey)> {
        self.inner.members.iter().filter_map(|m| lock(&m.audit_key).map(|k| (m.name.clone(), k))).collect()
    }

    /// Signs `message` with the audit-signing key of a healthy member that has one, failing over on
    /// device errors. Returns `r || s` and the public key that verifies it.
    pub async fn sign_audit(&self, message: Vec<u8>) -> Result<([u8; 64], p256::ecdsa::VerifyingKey), HsmError> {
        let message = Arc::new(message);
        let mut last = None;
        let mut tried = vec![false; self.inner.members.len()];
        while let Some(idx) = self.inner.pick(&tried) {
            tried[idx] = true;
            let m = &self.inner.members[idx];
            let Some(vk) = *lock(&m.audit_key) else { continue };
            let (backend, msg) = (m.backend.clone(), message.clone());
            let r = tokio::time::timeout(
                self.inner.config.timeout,
                spawn_member(&m.name, move || backend.sign_audit(&msg)),
            )
            .await
            .unwrap_or(Err(HsmError::Timeout { op: "sign_audit", after: self.inner.config.timeout }));
            match r {
                Ok(sig) => return Ok((sig, vk)),
                Err(e) if e.is_device_error() => {
                    self.inner.mark_failed(idx, &e);
                    last = Some(e);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => e,
            None => HsmError::Unsupported(
                "no healthy HSM member holds an audit-signing key: checkpoints cannot be signed".into(),
            ),
        })
    }

    /// Take a member out of dispatch (as if it had failed) until a health probe succeeds again.
    /// Returns false if no member has this name.
    pub fn mark_unhealthy(&self, name: &str, reason: &str) -> bool {
        let mut found = false;
        for (i, m) in self.inner.members.iter().enumerate() {
            if m.name == name {
                found = true;
                self.inner.mark_failed(i, &HsmError::Device { member: name.to_string(), reason: reason.to_string() });
            }
        }
        found
    }

    /// Probe every member now with `health()`; returns how many are healthy.
    pub async fn check_health(&self) -> usize {
        let mut healthy = 0;
        for i in 0..self.inner.members.len() {
            if self.inner.probe(i).await {
                healthy += 1;
            }
        }
        healthy
    }

    /// Whether every member computes licences in memory ([`HsmBackend::licence_in_memory`]): then a
    /// licence costs less than the ledger round trip that would avoid computing it twice for a retry, and
    /// the licence service skips that lookup (`Ledger::precheck_fast`).
    pub fn licences_in_memory(&self) -> bool {
        self.inner.members.iter().all(|m| m.backend.licence_in_memory())
    }

    /// Per-member state.
    pub fn status(&self) -> Vec<MemberStatus> {
        self.inner
            .members
            .iter()
            .map(|m| {
                let h = lock(&m.health);
                let s = lock(&m.stats);
                MemberStatus {
                    name: m.name.clone(),
                    healthy: h.healthy,
                    in_flight: m.in_flight.load(Ordering::Acquire),
                    capacity: m.capacity,
                    last_error: h.last_error.clone(),
                    consecutive_failures: h.failures,
                    requests: s.requests,
                    device_errors: s.device_errors,
                    latency_mean: if s.requests == 0 {
                        Duration::ZERO
                    } else {
                        s.total / u32::try_from(s.requests).unwrap_or(u32::MAX)
                    },
                    latency_max: s.max,
                    latency_last: s.last,
                    audit_key: *lock(&m.audit_key),
                }
            })
            .collect()
    }
}

/// Run a blocking admin call on a member.
async fn spawn_member<T: Send + 'static>(
    member: &str,
    f: impl FnOnce() -> Result<T, HsmError> + Send + 'static,
) -> Result<T, HsmError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(HsmError::Task { member: member.to_string(), reason: e.to_string() }))
}

/// Background task: re-probes unhealthy members past their backoff and checks healthy ones
/// periodically; ends when the pool is dropped.
async fn prober(weak: Weak<Inner>) {
    loop {
        let tick = match weak.upgrade() {
            Some(inner) => {
                inner.probe_due(true).await;
                inner.config.probe_tick
            }
            None => return,
        };
        tokio::time::sleep(tick).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let config = PoolConfig {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            ..PoolConfig::default()
        };
        let inner = Inner { members: Vec::new(), config, slots: tokio::sync::Semaphore::new(1) };
        let got: Vec<u128> = (1..=6).map(|f| inner.backoff(f).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(inner.backoff(u32::MAX), Duration::from_secs(1));
    }
}
