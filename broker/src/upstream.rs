//! A site broker's link to its central brokers (`[upstream]`, issue 14; docs/architecture.md, site
//! brokers). Owns the sync loop and the calls a site makes to central's `SiteService`:
//!
//! - every `refresh_interval`, [`UpstreamLink::tick`]: `SyncSite` (batch state, leases, revocations),
//!   mirroring each batch and its image into this broker's ledger ([`crate::ledger::upstream`]),
//!   replicating the ledger's records in order (`Replicate`, idempotent by seq), returning the unused
//!   units of leases that expired or of a closed batch, renewing leases with less than half their time
//!   to live left, and topping the units left up to `lease_units` when they fall to `low_water`;
//! - before licensing a device it has not licensed, [`UpstreamLink::claim`] asks central whether
//!   another site holds it (only while the link is up: cut off, a site cannot ask, and the conflict
//!   rule settles it on replication).
//!
//! The link's state is logged on every change (central lost, central back with how long it was gone)
//! and exported as metrics (`flashgate_upstream_up`, `flashgate_upstream_lag_records`,
//! `flashgate_upstream_offline_seconds`, `flashgate_upstream_units_left{batch}`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use flashgate_proto::transport::{self, TlsFiles};
use flashgate_proto::v1 as pb;
use flashgate_proto::v1::site_service_client::SiteServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::config::UpstreamSection;
use crate::ledger::replica::{SiteItem, SiteRecord};
use crate::ledger::upstream::{MirrorBatch, UpstreamLease};
use crate::ledger::{ANY_SITE, BatchState, LedgerError, NewImage, now_ms};
use crate::service::BrokerState;

/// Deadline of one call to central (a `Replicate` of a full page included).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of a `ClaimDevice` on the licence path: past it the device is licensed as if offline.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);
/// Records per `Replicate` call (central's limit).
pub const REPLICATE_PAGE: i64 = crate::ledger::replica::MAX_REPLICATE_RECORDS as i64;
/// Most `Replicate` calls in one tick; the rest follow in the next.
pub const REPLICATE_PAGES_PER_TICK: usize = 64;
/// A site that neither used nor wanted units of a batch for this many refresh intervals hands its
/// unused units back (it takes new ones when a device wants them again).
pub const IDLE_RETURN_REFRESHES: i64 = 10;
/// Largest image a site accepts from central (the .sfi reader's own limit).
pub const MAX_SITE_IMAGE: u64 = flashgate_common::sfi::MAX_IMAGE_FILE;

/// What went wrong talking to central.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The transport could not be built (certificate files, endpoint).
    #[error("upstream link: {0}")]
    Transport(#[from] transport::TransportError),
    /// No central broker answered.
    #[error("central broker {endpoint}: {rpc} failed: {code:?}: {message}")]
    Call {
        /// The endpoint tried last.
        endpoint: String,
        /// The RPC.
        rpc: &'static str,
        /// Its gRPC code.
        code: Code,
        /// Its message.
        message: String,
    },
    /// Central sent something this site cannot use.
    #[error("central broker {endpoint}: {rpc}: {what}")]
    Reply {
        /// The endpoint.
        endpoint: String,
        /// The RPC.
        rpc: &'static str,
        /// What is wrong with the reply.
        what: String,
    },
    /// This broker's own ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// What central said about a device this site is about to license.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The device is this site's (claimed now or before).
    Ours,
    /// Another site holds it: central's words.
    Elsewhere(String),
    /// Central was not asked or did not answer in time: licensed as offline.
    Offline,
}

/// A batch as central last reported it, and this site's demand for it.
#[derive(Debug, Clone, Copy, Default)]
struct BatchView {
    /// Central's batch is open.
    open: bool,
    /// Units central has neither issued nor leased.
    remaining: i64,
    /// Units central has leased to sites (some may come back).
    leased: i64,
    /// This site's `issued` at the last tick, and when it last changed (ms).
    issued: i64,
    active_at: i64,
    /// When a device last waited for units here (ms).
    wanted_at: i64,
}

/// The link (one per site broker).
pub struct UpstreamLink {
    cfg: UpstreamSection,
    clients: Vec<(String, SiteServiceClient<Channel>)>,
    current: AtomicUsize,
    up: AtomicBool,
    /// When the link last went down (ms), 0 while up.
    down_since: AtomicI64,
    /// When central last answered a sync (ms).
    last_ok: AtomicI64,
    /// Per batch: central's figures and this site's demand.
    views: std::sync::Mutex<BTreeMap<String, BatchView>>,
    /// Wakes the sync loop before its interval (a device is waiting for units).
    wake: tokio::sync::Notify,
    /// Batches of `[upstream] batches` central did not list at the last sync (warned once each).
    missing: std::sync::Mutex<HashSet<String>>,
}

impl std::fmt::Debug for UpstreamLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamLink")
            .field("site", &self.cfg.site)
            .field("endpoints", &self.cfg.endpoints)
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn ms_time(ms: i64) -> String {
    flashgate_common::pki::format_time(std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

impl UpstreamLink {
    /// A link to `cfg.endpoints` over mutual TLS with this broker's own certificate (`tls`); channels
    /// connect on first use and reconnect as needed.
    pub fn new(cfg: UpstreamSection, tls: &TlsFiles) -> Result<Self, UpstreamError> {
        let client_tls = transport::client_config(tls)?;
        let clients = cfg
            .endpoints
            .iter()
            .map(|e| {
                let channel = transport::connect_lazy(e, client_tls.clone(), cfg.server_name.as_deref())?;
                Ok((e.clone(), SiteServiceClient::new(channel)))
            })
            .collect::<Result<Vec<_>, transport::TransportError>>()?;
        Ok(Self {
            cfg,
            clients,
            current: AtomicUsize::new(0),
            up: AtomicBool::new(false),
            down_since: AtomicI64::new(now_ms()),
            last_ok: AtomicI64::new(0),
            views: std::sync::Mutex::new(BTreeMap::new()),
            wake: tokio::sync::Notify::new(),
            missing: std::sync::Mutex::new(HashSet::new()),
        })
    }

    fn views(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BatchView>> {
        self.views.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this site may still get units of `batch_id`: central is out of reach (it cannot tell),
    /// or its batch is open with units unleased or leased to sites (which come back when unused). When
    /// false, a site out of units refuses for good (`QUOTA_EXHAUSTED`).
    pub fn may_get_more(&self, batch_id: &str) -> bool {
        if !self.is_up() {
            return true;
        }
        self.views().get(batch_id).is_some_and(|v| v.open && (v.remaining > 0 || v.leased > 0))
    }

    /// Whether `[upstream] batches` names `batch_id` but no sync has mirrored it yet (a device for it waits).
    pub fn not_mirrored_yet(&self, batch_id: &str) -> bool {
        self.cfg.batches.iter().any(|b| b == batch_id) && !self.views().contains_key(batch_id)
    }

    /// Syncs with central now rather than at the next interval (an operator drained or resumed a batch).
    pub fn nudge(&self) {
        self.wake.notify_one();
    }

    /// A device is waiting for units of `batch_id`: the next sync asks central for a lease, now.
    pub fn want(&self, batch_id: &str) {
        if let Some(v) = self.views().get_mut(batch_id) {
            v.wanted_at = now_ms();
        }
        self.wake.notify_one();
    }

    /// Whether the site neither used nor wanted units of `batch_id` for [`IDLE_RETURN_REFRESHES`] refresh
    /// intervals: then its unused units go back to central for the stations and sites that need them.
    fn idle(&self, batch_id: &str) -> bool {
        let window =
            i64::try_from(self.cfg.refresh_interval.as_millis()).unwrap_or(i64::MAX / 16) * IDLE_RETURN_REFRESHES;
        let now = now_ms();
        self.views().get(batch_id).is_some_and(|v| now - v.active_at.max(v.wanted_at) >= window)
    }

    /// Whether the site used or wanted units of `batch_id` within half a lease's time to live: only then
    /// are its leases renewed and topped up, so that an idle site's units go back to central when its
    /// lease expires, for the sites that need them.
    fn in_demand(&self, batch_id: &str) -> bool {
        let half = i64::try_from(self.cfg.lease_ttl.as_millis() / 2).unwrap_or(i64::MAX);
        let now = now_ms();
        self.views().get(batch_id).is_some_and(|v| now - v.active_at.max(v.wanted_at) < half)
    }

    /// The site this broker serves.
    pub fn site(&self) -> &str {
        &self.cfg.site
    }

    /// Whether central answered the last sync.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Runs [`UpstreamLink::tick`] every refresh interval until the task is aborted.
    pub async fn run(self: Arc<Self>, state: BrokerState) {
        let mut tick = tokio::time::interval(self.cfg.refresh_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
            }
            if let Err(e) = self.tick(&state).await {
                match e {
                    UpstreamError::Call { .. } => self.mark_down(&state, &e).await,
                    _ => tracing::warn!(error = %e, "site broker sync with central failed"),
                }
            }
        }
    }

    async fn mark_down(&self, state: &BrokerState, e: &UpstreamError) {
        metrics::gauge!("flashgate_upstream_up").set(0.0);
        let now = now_ms();
        if self.up.swap(false, Ordering::Relaxed) {
            self.down_since.store(now, Ordering::Relaxed);
            let mut left = Vec::new();
            for id in &self.cfg.batches {
                if let Ok(b) = state.ledger().batch(id).await {
                    let until = b.lease_expires_at.map(ms_time).unwrap_or_default();
                    left.push(format!("{id}: {} units left until {until}", (b.quota - b.issued).max(0)));
                }
            }
            tracing::warn!(error = %e, leases = %left.join("; "),
                "central broker unreachable: this site issues from its leases until they are used up or expire");
        } else {
            let since = self.down_since.load(Ordering::Relaxed);
            metrics::gauge!("flashgate_upstream_offline_seconds").set((now - since) as f64 / 1000.0);
            tracing::debug!(error = %e, "central broker still unreachable");
        }
    }

    fn mark_up(&self) {
        metrics::gauge!("flashgate_upstream_up").set(1.0);
        metrics::gauge!("flashgate_upstream_offline_seconds").set(0.0);
        self.last_ok.store(now_ms(), Ordering::Relaxed);
        if !self.up.swap(true, Ordering::Relaxed) {
            let since = self.down_since.swap(0, Ordering::Relaxed);
            let secs = (now_ms() - since) as f64 / 1000.0;
            tracing::info!(
                offline_s = format!("{secs:.1}"),
                "central broker reachable: syncing leases and replicating"
            );
        }
    }

    /// One call to central, trying each endpoint once from the current one; moves to the next endpoint
    /// on a transport failure.
    async fn call<T, F, Fut>(&self, rpc: &'static str, timeout: Duration, f: F) -> Result<T, UpstreamError>
    where
        F: Fn(SiteServiceClient<Channel>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let n = self.clients.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for k in 0..n {
            let idx = (start + k) % n;
            let (endpoint, client) = &self.clients[idx];
            match tokio::time::timeout(timeout, f(client.clone(), timeout)).await {
                Ok(Ok(r)) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(r.into_inner());
                }
                Ok(Err(s)) if !matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown) => {
                    return Err(UpstreamError::Call {
                        endpoint: endpoint.clone(),
                        rpc,
                        code: s.code(),
                        message: s.message().to_owned(),
                    });
                }
                Ok(Err(s)) => last = Some((endpoint.clone(), s.code(), s.message().to_owned())),
                Err(_) => {
                    last = Some((endpoint.clone(), Code::DeadlineExceeded, format!("no answer within {timeout:?}")))
                }
            }
        }
        let (endpoint, code, message) =
            last.unwrap_or_else(|| (String::new(), Code::Unavailable, "no central broker endpoint".into()));
        Err(UpstreamError::Call { endpoint, rpc, code, message })
    }

    fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(timeout);
        r
    }

    /// Asks central whether `device_id` of `batch_id` may be licensed here (see [`Claim`]). Never waits
    /// longer than [`CLAIM_TIMEOUT`], and not at all while the link is down.
    pub async fn claim(&self, batch_id: &str, device_id: &str) -> Claim {
        if !self.is_up() {
            return Claim::Offline;
        }
        let msg = pb::ClaimDeviceRequest { batch_id: batch_id.into(), device_id: device_id.into() };
        let r = self
            .call("ClaimDevice", CLAIM_TIMEOUT, |mut c, t| {
                let msg = msg.clone();
                async move { c.claim_device(Self::request(msg, t)).await }
            })
            .await;
        match r {
            Ok(_) => Claim::Ours,
            Err(UpstreamError::Call { code: Code::FailedPrecondition, message, .. }) => Claim::Elsewhere(message),
            Err(e) => {
                tracing::warn!(error = %e, batch = batch_id, device = device_id,
                    "could not ask central about a new device: licensing it as offline");
                Claim::Offline
            }
        }
    }

    /// One sync with central (see the module header).
    pub async fn tick(&self, state: &BrokerState) -> Result<(), UpstreamError> {
        let ledger = state.ledger();
        let (head_seq, _) = ledger.audit_head().await?;
        let ledger_id = hex::encode(ledger.ledger_id());
        let req = pb::SyncSiteRequest {
            batch_ids: self.cfg.batches.clone(),
            site_ledger_id: ledger_id.clone(),
            site_head_seq: head_seq,
        };
        let sync = self
            .call("SyncSite", CALL_TIMEOUT, |mut c, t| {
                let req = req.clone();
                async move { c.sync_site(Self::request(req, t)).await }
            })
            .await?;
        self.mark_up();
        self.mirror_revocations(state, &sync.revoked).await?;
        let mut leases: BTreeMap<String, Vec<pb::LeaseInfo>> = BTreeMap::new();
        for l in &sync.leases {
            leases.entry(l.batch_id.clone()).or_default().push(l.clone());
        }
        let mut mirrored = Vec::new();
        for b in &sync.batches {
            match self.mirror(state, b, leases.get(&b.id).map(Vec::as_slice).unwrap_or(&[])).await {
                Ok(()) => mirrored.push(b.clone()),
                Err(e) => tracing::error!(batch = %b.id, error = %e, "cannot mirror batch from central"),
            }
        }
        {
            // Said once per batch while it is missing (central may not have created it yet).
            let mut missing = self.missing.lock().unwrap_or_else(|p| p.into_inner());
            for id in &self.cfg.batches {
                let at_central = sync.batches.iter().any(|b| &b.id == id);
                if !at_central && missing.insert(id.clone()) {
                    tracing::warn!(batch = %id, "central has no batch of this id ([upstream] batches names it); \
                        waiting for it");
                } else if at_central && missing.remove(id) {
                    tracing::info!(batch = %id, "batch now at central: mirroring it");
                }
            }
        }
        // Replication first: returns and lease accounting at central need every used unit to be there.
        let acked = if sync.site_ledger_id == ledger_id { sync.replicated_seq } else { 0 };
        let acked = self.replicate(state, acked, head_seq).await?;
        let caught_up = acked >= ledger.audit_head().await?.0;
        for b in &mirrored {
            self.manage_leases(state, b, leases.get(&b.id).map(Vec::as_slice).unwrap_or(&[]), sync.now_ms, caught_up)
                .await?;
        }
        Ok(())
    }

    async fn mirror_revocations(
        &self,
        state: &BrokerState,
        revoked: &[pb::RevokedSerial],
    ) -> Result<(), UpstreamError> {
        let known: HashSet<String> = state.ledger().revocations().await?.into_iter().map(|r| r.serial).collect();
        for r in revoked.iter().filter(|r| !known.contains(&r.serial)) {
            if r.serial.is_empty() || r.serial.len() > 64 || !r.serial.bytes().all(|b| b.is_ascii_hexdigit()) {
                tracing::warn!(serial = %r.serial.escape_debug(), "central listed a revoked serial that is not hex; skipped");
                continue;
            }
            state
                .ledger()
                .revoke_station(&r.serial, &r.identity, &format!("revoked at central: {}", r.reason), "upstream")
                .await?;
            state.revoke_now(&r.serial);
            tracing::info!(serial = %r.serial, identity = %r.identity, "revocation from central applied");
        }
        Ok(())
    }

    /// Stores the batch's image (once), mirrors the batch and records its leases.
    async fn mirror(
        &self,
        state: &BrokerState,
        b: &pb::BatchInfo,
        leases: &[pb::LeaseInfo],
    ) -> Result<(), UpstreamError> {
        let ledger = state.ledger();
        if ledger.image_meta(&b.image_sha256).await.is_err() {
            self.fetch_image(state, &b.image_sha256).await?;
        }
        let bs = pb::BatchState::try_from(b.state).unwrap_or(pb::BatchState::Unspecified);
        let state_here = match bs {
            pb::BatchState::Open => BatchState::Open,
            pb::BatchState::Paused => BatchState::Paused,
            _ => BatchState::Closed,
        };
        // A site broker serves its own site's stations only.
        let ours = b.allowed_sites.iter().any(|s| s == ANY_SITE || *s == self.cfg.site);
        let mirror = MirrorBatch {
            id: b.id.clone(),
            product_id: b.product_id.clone(),
            image_sha256: b.image_sha256.clone(),
            allowed_sites: if ours { vec![self.cfg.site.clone()] } else { Vec::new() },
            not_before: b.not_before_ms,
            not_after: b.not_after_ms,
            state: state_here,
        };
        ledger.mirror_batch(&mirror, "upstream").await?;
        let batch = ledger.record_upstream_leases(&b.id, &to_upstream(leases), "upstream").await?;
        {
            let now = now_ms();
            let mut views = self.views();
            let v = views.entry(b.id.clone()).or_insert(BatchView { active_at: now, ..BatchView::default() });
            v.open = bs == pb::BatchState::Open;
            v.remaining = b.remaining;
            v.leased = b.leased;
            if batch.issued != v.issued {
                v.issued = batch.issued;
                v.active_at = now;
            }
        }
        metrics::gauge!("flashgate_upstream_units_left", "batch" => b.id.clone())
            .set((batch.quota - batch.issued).max(0) as f64);
        Ok(())
    }

    async fn fetch_image(&self, state: &BrokerState, sha: &str) -> Result<(), UpstreamError> {
        let endpoint = self.clients[self.current.load(Ordering::Relaxed) % self.clients.len()].0.clone();
        let reply = |what: String| UpstreamError::Reply { endpoint: endpoint.clone(), rpc: "GetSiteImage", what };
        let req = pb::GetSiteImageRequest { image_sha256: sha.into() };
        let mut stream = self
            .call("GetSiteImage", CALL_TIMEOUT, |mut c, t| {
                let req = req.clone();
                async move { c.get_site_image(Self::request(req, t)).await }
            })
            .await?;
        let mut info = None;
        let mut bytes = Vec::new();
        loop {
            let item = tokio::time::timeout(CALL_TIMEOUT, stream.message())
                .await
                .map_err(|_| reply(format!("no chunk within {CALL_TIMEOUT:?}")))?
                .map_err(|s| reply(format!("stream broke: {:?}: {}", s.code(), s.message())))?;
            let Some(item) = item else { break };
            match item.item {
                Some(pb::site_image_chunk::Item::Info(i)) if info.is_none() => {
                    if i.size > MAX_SITE_IMAGE {
                        return Err(reply(format!("image of {} bytes exceeds {MAX_SITE_IMAGE}", i.size)));
                    }
                    info = Some(i);
                }
                Some(pb::site_image_chunk::Item::Chunk(c)) => {
                    let Some(i) = &info else { return Err(reply("a chunk came before the image's info".into())) };
                    if bytes.len() as u64 + c.len() as u64 > i.size {
                        return Err(reply(format!("more bytes than the announced {}", i.size)));
                    }
                    bytes.extend_from_slice(&c);
                }
                _ => return Err(reply("unexpected item in the image stream".into())),
            }
        }
        let info = info.ok_or_else(|| reply("the stream ended without the image's info".into()))?;
        if bytes.len() as u64 != info.size {
            return Err(reply(format!("{} of {} bytes received", bytes.len(), info.size)));
        }
        let mut nonce = [0u8; 12];
        hex::decode_to_slice(&info.nonce, &mut nonce)
            .map_err(|_| reply(format!("nonce {:?} is not 24 hex digits", info.nonce)))?;
        let img = NewImage {
            key_id: info.key_id.clone(),
            nonce,
            family: info.family.clone(),
            product_id: info.product_id.clone(),
            area_count: info.area_count,
            expected_crc: info.expected_crc,
        };
        match state.ledger().put_image(&img, &bytes, "upstream").await {
            Ok(meta) if meta.sha256 == sha => {
                tracing::info!(image = sha, size = bytes.len(), "image mirrored from central");
                Ok(())
            }
            Ok(meta) => Err(reply(format!("asked for image {sha}, received {}", meta.sha256))),
            Err(LedgerError::NotFound { what: "key", id }) => Err(UpstreamError::Reply {
                endpoint,
                rpc: "GetSiteImage",
                what: format!(
                    "image {sha} is encrypted under firmware key {id}, which this site broker's HSM does not hold: \
                     import it here with `flashgate admin key import --key-id {id}` (docs/key-ceremony.md)"
                ),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends every record after `acked` (up to [`REPLICATE_PAGES_PER_TICK`] pages); returns the seq
    /// central now holds.
    async fn replicate(&self, state: &BrokerState, mut acked: i64, head_seq: i64) -> Result<i64, UpstreamError> {
        let ledger = state.ledger();
        let ledger_id = hex::encode(ledger.ledger_id());
        for _ in 0..REPLICATE_PAGES_PER_TICK {
            let page = ledger.replication_page(acked, REPLICATE_PAGE).await?;
            let Some(last) = page.last().map(|i| i.audit.seq) else { break };
            let req = pb::ReplicateRequest {
                site_ledger_id: ledger_id.clone(),
                records: page.iter().map(site_record).collect(),
                site_head_seq: head_seq.max(last),
            };
            let r = self
                .call("Replicate", CALL_TIMEOUT, |mut c, t| {
                    let req = req.clone();
                    async move { c.replicate(Self::request(req, t)).await }
                })
                .await?;
            if r.conflicts > 0 {
                tracing::warn!(
                    conflicts = r.conflicts,
                    "central recorded licences of this site as conflicts: \
                    devices it held from another site (see `flashgate admin sites` at central)"
                );
            }
            if r.acked_seq <= acked {
                let endpoint = self.clients[self.current.load(Ordering::Relaxed) % self.clients.len()].0.clone();
                return Err(UpstreamError::Reply {
                    endpoint,
                    rpc: "Replicate",
                    what: format!("acknowledged seq {} after {acked}: no progress", r.acked_seq),
                });
            }
            acked = r.acked_seq;
            ledger.set_upstream_acked(acked).await?;
        }
        let (head, _) = ledger.audit_head().await?;
        metrics::gauge!("flashgate_upstream_lag_records").set((head - acked).max(0) as f64);
        Ok(acked)
    }

    /// Returns, renews and acquires this site's leases of one batch (see the module header).
    async fn manage_leases(
        &self,
        state: &BrokerState,
        b: &pb::BatchInfo,
        leases: &[pb::LeaseInfo],
        central_now: i64,
        caught_up: bool,
    ) -> Result<(), UpstreamError> {
        let ledger = state.ledger();
        let drained = ledger.batch(&b.id).await?.drained_at.is_some();
        let idle = self.idle(&b.id);
        let open = b.state == pb::BatchState::Open as i32 && !drained;
        let closed = b.state == pb::BatchState::Closed as i32;
        let ttl_ms = u64::try_from(self.cfg.lease_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut changed: Vec<pb::LeaseInfo> = Vec::new();
        for l in leases.iter().filter(|l| l.state == "active") {
            let expired = l.expires_at_ms <= central_now;
            if (closed || drained || idle || expired) && caught_up && l.outstanding > 0 {
                // Take the units out of this site's quota first (guarded against licences being issued
                // now), then hand them back; if central does not answer, the next sync restores them.
                let units = ledger.withhold_units(&b.id, l.outstanding).await?;
                if units == 0 {
                    continue;
                }
                let req = pb::ReturnLeaseRequest { lease_id: l.id.clone(), units };
                let info = self
                    .call("ReturnLease", CALL_TIMEOUT, |mut c, t| {
                        let req = req.clone();
                        async move { c.return_lease(Self::request(req, t)).await }
                    })
                    .await?;
                tracing::info!(lease = %l.id, batch = %b.id, units, why = if closed {
                    "batch closed"
                } else if drained {
                    "site drained"
                } else if idle {
                    "site idle"
                } else {
                    "lease expired"
                },
                    "lease units returned to central");
                changed.push(info);
            } else if open && !expired && l.expires_at_ms - central_now < i64::try_from(ttl_ms / 2).unwrap_or(i64::MAX)
            {
                let req = pb::RenewLeaseRequest { lease_id: l.id.clone(), ttl_ms };
                let info = self
                    .call("RenewLease", CALL_TIMEOUT, |mut c, t| {
                        let req = req.clone();
                        async move { c.renew_lease(Self::request(req, t)).await }
                    })
                    .await?;
                tracing::debug!(lease = %l.id, expires_at = %ms_time(info.expires_at_ms), "lease renewed");
                changed.push(info);
            }
        }
        if !changed.is_empty() {
            ledger.record_upstream_leases(&b.id, &to_upstream(&changed), "upstream").await?;
        }
        let batch = ledger.batch(&b.id).await?;
        let live = |l: &pb::LeaseInfo| {
            let now = changed.iter().find(|c| c.id == l.id).unwrap_or(l);
            now.state == "active" && now.expires_at_ms > central_now
        };
        let left = (batch.quota - batch.issued).max(0);
        // Units of expired leases still count in `left` until returned; a fresh lease is needed anyway
        // when none is live, or issuing would stop at the old expiry.
        if open && !idle && self.in_demand(&b.id) && (left <= self.cfg.low_water || !leases.iter().any(live)) {
            let units = (self.cfg.lease_units - left).max(1);
            let req = pb::AcquireLeaseRequest { batch_id: b.id.clone(), units, ttl_ms };
            match self
                .call("AcquireLease", CALL_TIMEOUT, |mut c, t| {
                    let req = req.clone();
                    async move { c.acquire_lease(Self::request(req, t)).await }
                })
                .await
            {
                Ok(grant) => {
                    if let Some(l) = grant.lease {
                        tracing::info!(lease = %l.id, batch = %b.id, granted = l.granted, asked = units,
                            expires_at = %ms_time(l.expires_at_ms), "quota lease acquired from central");
                        let batch = ledger.record_upstream_leases(&b.id, &to_upstream(&[l]), "upstream").await?;
                        metrics::gauge!("flashgate_upstream_units_left", "batch" => b.id.clone())
                            .set((batch.quota - batch.issued).max(0) as f64);
                    }
                }
                Err(UpstreamError::Call { code: Code::ResourceExhausted, message, .. }) => {
                    tracing::debug!(batch = %b.id, %message, "central has no more units of this batch to lease");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn to_upstream(leases: &[pb::LeaseInfo]) -> Vec<UpstreamLease> {
    leases
        .iter()
        .map(|l| UpstreamLease {
            id: l.id.clone(),
            batch_id: l.batch_id.clone(),
            granted: l.granted,
            returned: l.returned,
            state: l.state.clone(),
            granted_at: l.granted_at_ms,
            expires_at: l.expires_at_ms,
        })
        .collect()
}

fn site_record(item: &SiteRecord) -> pb::SiteRecord {
    let r = &item.audit;
    let audit = pb::AuditRecord {
        seq: r.seq,
        at_ms: r.at,
        actor: r.actor.clone(),
        event: r.event.clone(),
        subject: r.subject.clone(),
        details_json: r.details.clone(),
        prev_hash: hex::encode(&r.prev_hash),
        hash: hex::encode(&r.hash),
    };
    let item = match &item.item {
        Some(SiteItem::Licence(l)) => Some(pb::site_record::Item::Licence(pb::SiteLicence {
            batch_id: l.batch_id.clone(),
            device_id: l.device_id.clone(),
            licence: l.licence.clone(),
            certificate: l.certificate.clone(),
            station: l.station.clone(),
            site: l.site.clone(),
            issued_at_ms: l.issued_at,
        })),
        Some(SiteItem::Refusal(f)) => Some(pb::site_record::Item::Refusal(pb::SiteRefusal {
            batch_id: f.batch_id.clone(),
            device_id: f.device_id.clone(),
            station: f.station.clone(),
            site: f.site.clone(),
            reason: f.reason.clone(),
            detail: f.detail.clone(),
        })),
        Some(SiteItem::Install(i)) => Some(pb::site_record::Item::Install(pb::SiteInstall {
            station: i.station.clone(),
            result_id: i.result_id.clone(),
            batch_id: i.batch_id.clone(),
            device_id: i.device_id.clone(),
            status_code: i.status_code,
            message: i.message.clone(),
            flash_crc: i.flash_crc,
            attempt: i.attempt,
            timings_json: i.timings_json.clone(),
            reported_at_ms: i.reported_at,
        })),
        None => None,
    };
    pb::SiteRecord { audit: Some(audit), item }
}
