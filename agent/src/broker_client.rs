//! The agent's connection to its broker(s), and the background reporter of journaled results.
//!
//! Owns: the list of broker endpoints (mutual-TLS channels from
//! [`flashgate_proto::transport::connect_lazy`], connected on first use) and which one is current;
//! failover and retries ([`RetryPolicy`]: exponential backoff with jitter between rounds); the
//! classification of gRPC failures (a Flashgate refusal is final and never retried; a
//! connection-level failure moves to the next endpoint; HSM load shedding backs off); the
//! `IssueLicence` / `ReportInstall` calls ([`BrokerClient`]); image fetches with failover
//! ([`BrokerClient::fetch_image`]); and the [`Reporter`] task that delivers every unreported
//! journal entry in order, forever, until the broker has it.
//!
//! Retry rules, per call: try the current endpoint; on `UNAVAILABLE`, `DEADLINE_EXCEEDED`,
//! `UNKNOWN` or `CANCELLED` (the connection failed or the broker cannot reach its ledger or HSMs)
//! move to the next endpoint, and after every endpoint failed once ("a round") sleep
//! [`RetryPolicy::delay`] and start another round, at most [`RetryPolicy::attempts`] rounds. A
//! `RESOURCE_EXHAUSTED` without a Flashgate `ErrorInfo` is HSM load shedding: back off and retry
//! the same endpoint (it counts as a round). Anything else, and above all any status carrying a
//! Flashgate refusal ([`Refusal::from_status`], e.g. `QUOTA_EXHAUSTED`), is returned at once.
//! Both RPCs are idempotent on the broker (per (batch, device) and per result id), so a retry after
//! an unknown outcome is safe.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flashgate_proto::errors::{Refusal, describe_status};
use flashgate_proto::transport::{self, TransportError};
use flashgate_proto::v1::image_service_client::ImageServiceClient;
use flashgate_proto::v1::licence_service_client::LicenceServiceClient;
use flashgate_proto::v1::{IssueLicenceRequest, IssueLicenceResponse, ReportInstallRequest};
use rand::Rng;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::images::{ImageCache, ImageError};
use crate::journal::{Journal, to_report};

/// Default per-RPC deadline of [`BrokerClient`].
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Rounds per call (a round tries every endpoint once); at least 1 is used.
    pub attempts: u32,
    /// Backoff after the first failed round.
    pub initial: Duration,
    /// Largest backoff.
    pub max: Duration,
}

impl Default for RetryPolicy {
    /// 5 rounds, backoff from 100 ms doubling up to 5 s.
    fn default() -> Self {
        RetryPolicy { attempts: 5, initial: Duration::from_millis(100), max: Duration::from_secs(5) }
    }
}

impl RetryPolicy {
    /// Backoff after failed round `round` (0-based): `initial · 2^round`, at most `max`, with
    /// jitter (uniform in the upper half of that, so concurrent stations spread out).
    pub fn delay(&self, round: u32) -> Duration {
        let base = self.initial.saturating_mul(1u32 << round.min(20)).min(self.max);
        let half = base / 2;
        let jitter_ns = u64::try_from((base - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rand::thread_rng().gen_range(0..=jitter_ns))
    }
}

/// How a failed call should be treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// A Flashgate refusal: final.
    Refused(Refusal),
    /// The connection or the broker's back end failed: try another endpoint.
    Connection,
    /// HSM load shedding (`RESOURCE_EXHAUSTED` without `ErrorInfo`): back off.
    Shed,
    /// Any other status: final.
    Other,
}

/// Classify `status` by the retry rules of this module.
pub(crate) fn classify(status: &Status) -> Failure {
    if let Some(refusal) = Refusal::from_status(status) {
        return Failure::Refused(refusal);
    }
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => Failure::Connection,
        Code::ResourceExhausted => Failure::Shed,
        _ => Failure::Other,
    }
}

/// A broker call that failed. Messages name the RPC, the endpoint(s) and the reason.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No broker endpoint was configured.
    #[error("no broker endpoints configured")]
    NoEndpoints,
    /// An endpoint could not be set up (bad URI or TLS server name).
    #[error("broker endpoint {endpoint}: {source}")]
    Endpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// Why it is unusable.
        source: TransportError,
    },
    /// The broker refused the request for a Flashgate reason (e.g. `QUOTA_EXHAUSTED`); final.
    #[error("{rpc} at broker {endpoint}: {refusal}")]
    Refused {
        /// The RPC.
        rpc: &'static str,
        /// The endpoint that refused.
        endpoint: String,
        /// The refusal (reason, message, metadata).
        refusal: Box<Refusal>,
    },
    /// No endpoint answered (connection-level failures) within the retry policy.
    #[error("{rpc}: no broker reachable ({}) after {rounds} round(s); last error from {last_endpoint}: {last}", .endpoints.join(", "))]
    Unreachable {
        /// The RPC.
        rpc: &'static str,
        /// Every endpoint tried.
        endpoints: Vec<String>,
        /// Rounds tried.
        rounds: u32,
        /// The endpoint of the last failure.
        last_endpoint: String,
        /// The last failure in words.
        last: String,
    },
    /// The TLS handshake was refused for authorisation reasons (our certificate revoked, expired or of
    /// an unknown CA; or the broker's certificate not valid for its name) by every endpoint tried:
    /// not an outage, and final for the call.
    #[error("{rpc} at broker {endpoint}: {why}")]
    Unauthorised {
        /// The RPC.
        rpc: &'static str,
        /// The endpoint that refused last.
        endpoint: String,
        /// Why, in words.
        why: flashgate_proto::tls_alert::AuthFailure,
    },
    /// The broker answered with an error status that is not a refusal (e.g. `INVALID_ARGUMENT`,
    /// or `RESOURCE_EXHAUSTED` load shedding that outlasted the retry policy).
    #[error("{rpc} at broker {endpoint}: {}", describe_status(.status))]
    Status {
        /// The RPC.
        rpc: &'static str,
        /// The endpoint that answered.
        endpoint: String,
        /// The status.
        status: Box<Status>,
    },
}

impl BrokerError {
    /// The Flashgate refusal, when the broker refused.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            BrokerError::Refused { refusal, .. } => Some(refusal),
            _ => None,
        }
    }

    /// True when trying again later may succeed (no broker reachable, or load shedding).
    pub fn is_transient(&self) -> bool {
        match self {
            BrokerError::Unreachable { .. } => true,
            BrokerError::Status { status, .. } => matches!(classify(status), Failure::Connection | Failure::Shed),
            _ => false,
        }
    }

    /// True when the broker refused this particular request for good (malformed, unknown batch,
    /// batch not open to this site, …), as opposed to refusing the station as a whole
    /// (`STATION_REVOKED`, `NOT_AUTHORISED`, unauthenticated) or being unreachable. The reporter
    /// marks such a result rejected and moves on.
    pub fn rejects_request(&self) -> bool {
        match self {
            BrokerError::Refused { refusal, .. } => {
                !matches!(refusal.reason.as_str(), "STATION_REVOKED" | "NOT_AUTHORISED")
                    && matches!(
                        refusal.code,
                        Code::InvalidArgument
                            | Code::NotFound
                            | Code::FailedPrecondition
                            | Code::OutOfRange
                            | Code::AlreadyExists
                            | Code::PermissionDenied
                    )
            }
            BrokerError::Status { status, .. } => matches!(
                status.code(),
                Code::InvalidArgument
                    | Code::NotFound
                    | Code::FailedPrecondition
                    | Code::OutOfRange
                    | Code::AlreadyExists
            ),
            _ => false,
        }
    }
}

/// A connection to one or more brokers with failover. Cheap to clone; clones share which
/// endpoint is current.
#[derive(Debug, Clone)]
pub struct BrokerClient {
    endpoints: Arc<[(String, Channel)]>,
    current: Arc<AtomicUsize>,
    /// When calls last moved off the first endpoint (ms since the client was made; 0: on it).
    moved_off_first: Arc<std::sync::atomic::AtomicU64>,
    started: std::time::Instant,
    back_to_first_after: Duration,
    policy: RetryPolicy,
    rpc_timeout: Duration,
}

/// How long calls stay on a later endpoint after a failover before the first endpoint (a station's own
/// site broker, then central) is tried again.
pub const BACK_TO_FIRST_AFTER: Duration = Duration::from_secs(30);

impl BrokerClient {
    /// A client for `endpoints` (`https://host:port`, tried in this order) over mutual TLS with
    /// `tls` (see [`transport::client_config`]); `server_name` overrides the name broker
    /// certificates must match. Connects lazily: nothing is dialled until the first call.
    pub fn new(
        endpoints: Vec<String>,
        tls: Arc<rustls::ClientConfig>,
        server_name: Option<String>,
    ) -> Result<Self, BrokerError> {
        let channels = endpoints
            .into_iter()
            .map(|e| match transport::connect_lazy(&e, Arc::clone(&tls), server_name.as_deref()) {
                Ok(ch) => Ok((e, ch)),
                Err(source) => Err(BrokerError::Endpoint { endpoint: e, source }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_channels(channels)
    }

    /// A client over channels built by the caller, each with the name used in messages (tests
    /// use plain-TCP channels).
    pub fn from_channels(channels: Vec<(String, Channel)>) -> Result<Self, BrokerError> {
        if channels.is_empty() {
            return Err(BrokerError::NoEndpoints);
        }
        Ok(BrokerClient {
            endpoints: channels.into(),
            current: Arc::new(AtomicUsize::new(0)),
            moved_off_first: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            started: std::time::Instant::now(),
            back_to_first_after: BACK_TO_FIRST_AFTER,
            policy: RetryPolicy::default(),
            rpc_timeout: DEFAULT_RPC_TIMEOUT,
        })
    }

    /// Try the first endpoint again this long after moving off it (default [`BACK_TO_FIRST_AFTER`]).
    pub fn with_back_to_first_after(mut self, after: Duration) -> Self {
        self.back_to_first_after = after;
        self
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// Use `policy` for retries.
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Give up on a single RPC attempt after `timeout` (counts as `DEADLINE_EXCEEDED`).
    pub fn with_rpc_timeout(mut self, timeout: Duration) -> Self {
        self.rpc_timeout = timeout;
        self
    }

    /// The retry policy in use.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.policy
    }

    /// Every endpoint, in failover order.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.iter().map(|(e, _)| e.clone()).collect()
    }

    fn current_index(&self) -> usize {
        let idx = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        let since = self.moved_off_first.load(Ordering::Relaxed);
        if idx != 0
            && since != 0
            && self.elapsed_ms().saturating_sub(since)
                >= u64::try_from(self.back_to_first_after.as_millis()).unwrap_or(u64::MAX)
            && self.current.compare_exchange(idx, 0, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.moved_off_first.store(0, Ordering::Relaxed);
            tracing::info!(from = %self.endpoints[idx].0, to = %self.endpoints[0].0, "trying the first broker again");
            return 0;
        }
        idx
    }

    /// The endpoint calls go to now.
    pub fn current_endpoint(&self) -> String {
        self.endpoints[self.current_index()].0.clone()
    }

    /// Move on from endpoint `failed` (unless another caller already did).
    fn rotate_from(&self, failed: usize) {
        let next = (failed + 1) % self.endpoints.len();
        if next != failed && self.current.compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            if failed == 0 {
                self.moved_off_first.store(self.elapsed_ms(), Ordering::Relaxed);
            }
            metrics::counter!("flashgate_agent_broker_failovers_total").increment(1);
            tracing::info!(from = %self.endpoints[failed].0, to = %self.endpoints[next].0, "broker failover");
        }
    }

    /// An `ImageService` client on the current endpoint.
    pub fn image_client(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.endpoints[self.current_index()].1.clone())
    }

    /// Run `call` under the retry rules of this module.
    async fn call<T, F, Fut>(&self, rpc: &'static str, mut call: F) -> Result<T, BrokerError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let n = self.endpoints.len();
        let rounds = self.policy.attempts.max(1);
        let mut last: Option<(usize, Status)> = None;
        for round in 0..rounds {
            if round > 0 {
                tokio::time::sleep(self.policy.delay(round - 1)).await;
            }
            let mut tried = 0;
            let mut unauthorised = None;
            while tried < n {
                let idx = self.current_index();
                let (endpoint, channel) = &self.endpoints[idx];
                let outcome = match tokio::time::timeout(self.rpc_timeout, call(channel.clone())).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(Status::deadline_exceeded(format!("no answer within {:?}", self.rpc_timeout))),
                };
                let status = match outcome {
                    Ok(v) => return Ok(v),
                    Err(status) => status,
                };
                match classify(&status) {
                    Failure::Refused(refusal) => {
                        return Err(BrokerError::Refused {
                            rpc,
                            endpoint: endpoint.clone(),
                            refusal: Box::new(refusal),
                        });
                    }
                    Failure::Other => {
                        return Err(BrokerError::Status { rpc, endpoint: endpoint.clone(), status: Box::new(status) });
                    }
                    Failure::Connection => {
                        if let Some(why) = flashgate_proto::tls_alert::auth_failure(&status) {
                            unauthorised = Some((endpoint.clone(), why));
                        }
                        tracing::debug!(rpc, endpoint = %endpoint, round, status = %describe_status(&status), "broker call failed; trying the next endpoint");
                        self.rotate_from(idx);
                        last = Some((idx, status));
                        tried += 1;
                    }
                    Failure::Shed => {
                        tracing::debug!(rpc, endpoint = %endpoint, round, status = %describe_status(&status), "broker shed the call; backing off");
                        last = Some((idx, status));
                        break;
                    }
                }
            }
            // Every endpoint failed and one refused us at the handshake: no round will change that.
            if tried == n
                && let Some((endpoint, why)) = unauthorised
            {
                return Err(BrokerError::Unauthorised { rpc, endpoint, why });
            }
        }
        match last {
            Some((idx, status)) if classify(&status) == Failure::Shed => {
                Err(BrokerError::Status { rpc, endpoint: self.endpoints[idx].0.clone(), status: Box::new(status) })
            }
            Some((idx, status)) => Err(BrokerError::Unreachable {
                rpc,
                endpoints: self.endpoints(),
                rounds,
                last_endpoint: self.endpoints[idx].0.clone(),
                last: describe_status(&status),
            }),
            // Unreachable: at least one round with at least one endpoint ran.
            None => Err(BrokerError::NoEndpoints),
        }
    }

    /// `IssueLicence` with failover and retries; a refusal is returned at once.
    pub async fn issue_licence(&self, req: IssueLicenceRequest) -> Result<IssueLicenceResponse, BrokerError> {
        self.call("IssueLicence", |ch| {
            let req = req.clone();
            async move { LicenceServiceClient::new(ch).issue_licence(req).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// `ReportInstall` with failover and retries: `Ok(true)` when the broker recorded the result
    /// now, `Ok(false)` when it already had it.
    pub async fn report_install(&self, req: ReportInstallRequest) -> Result<bool, BrokerError> {
        self.call("ReportInstall", |ch| {
            let req = req.clone();
            async move { LicenceServiceClient::new(ch).report_install(req).await.map(|r| r.into_inner().recorded) }
        })
        .await
    }

    /// Fetch image `sha256` into `cache` (resuming partial downloads), failing over between
    /// endpoints on retryable failures, at most `attempts × endpoints` tries in all.
    pub async fn fetch_image(
        &self,
        cache: &ImageCache,
        sha256: &str,
        expect: crate::images::Expect,
    ) -> Result<PathBuf, ImageError> {
        let n = self.endpoints.len();
        let total = n * self.policy.attempts.max(1) as usize;
        let mut attempt = 0usize;
        loop {
            let idx = self.current_index();
            let mut client = ImageServiceClient::new(self.endpoints[idx].1.clone());
            match cache.fetch_expecting(&mut client, sha256, expect).await {
                Ok(path) => return Ok(path),
                Err(e) if e.is_retryable() && attempt + 1 < total => {
                    tracing::warn!(endpoint = %self.endpoints[idx].0, attempt, error = %e, "image fetch failed; retrying");
                    attempt += 1;
                    if e.is_connection_failure() && n > 1 {
                        self.rotate_from(idx);
                        if !attempt.is_multiple_of(n) {
                            continue;
                        }
                    }
                    tokio::time::sleep(self.policy.delay(u32::try_from(attempt / n).unwrap_or(u32::MAX))).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The background task delivering journaled results to the broker; see [`Reporter::spawn`].
#[derive(Debug)]
pub struct Reporter;

/// Handle of a running [`Reporter`]; dropping it stops the task.
#[derive(Debug)]
pub struct ReporterHandle {
    journal: Arc<Journal>,
    wake: Arc<Notify>,
    progress: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Reporter {
    /// Start delivering every unreported entry of `journal` through `client`, in seq order: each
    /// is marked reported once the broker answers (recorded now or already), marked rejected
    /// (with a log line naming the entry) when the broker refuses it for good, and retried
    /// forever with backoff while no broker is reachable. Call [`ReporterHandle::notify`] after
    /// each append.
    pub fn spawn(journal: Arc<Journal>, client: BrokerClient) -> ReporterHandle {
        let wake = Arc::new(Notify::new());
        let (tx, rx) = watch::channel(0u64);
        let task = tokio::spawn(run(Arc::clone(&journal), client, Arc::clone(&wake), tx));
        ReporterHandle { journal, wake, progress: rx, task }
    }
}

impl ReporterHandle {
    /// Wake the reporter: a new entry was appended.
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    /// Wait until every entry is reported (or rejected), or `timeout` passes; returns how many
    /// remain unreported.
    pub async fn flush(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut progress = self.progress.clone();
        loop {
            let remaining = self.journal.unreported_count();
            if remaining == 0 || self.task.is_finished() {
                return remaining;
            }
            self.wake.notify_one();
            match tokio::time::timeout_at(deadline, progress.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.journal.unreported_count(),
            }
        }
    }

    /// Stop the reporter. An entry being sent stays unreported and is sent again next time
    /// (the broker ignores the duplicate).
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for ReporterHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(journal: Arc<Journal>, client: BrokerClient, wake: Arc<Notify>, progress: watch::Sender<u64>) {
    let policy = client.retry_policy();
    let mut failures: u32 = 0;
    loop {
        let pending = journal.unreported();
        metrics::gauge!("flashgate_agent_journal_unreported").set(pending.len() as f64);
        if pending.is_empty() {
            wake.notified().await;
            continue;
        }
        'entries: for entry in pending {
            loop {
                let outcome = client.report_install(to_report(&entry)).await;
                let marked = match &outcome {
                    Ok(recorded) => {
                        if failures > 0 {
                            tracing::info!(after_failures = failures, "broker reachable again; reporting resumed");
                        }
                        tracing::debug!(seq = entry.seq, result_id = %entry.result_id, recorded, "result reported");
                        journal.mark_reported(entry.seq)
                    }
                    Err(e) if e.rejects_request() => {
                        tracing::error!(
                            seq = entry.seq,
                            result_id = %entry.result_id,
                            batch = %entry.result.batch_id,
                            device = %entry.result.device_id,
                            status_code = entry.result.status_code,
                            error = %e,
                            "broker rejected the result for good; marked rejected in the journal"
                        );
                        journal.mark_rejected(entry.seq, &e.to_string())
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        if failures == 1 || failures.is_multiple_of(10) {
                            tracing::warn!(seq = entry.seq, result_id = %entry.result_id, failures, error = %e, "cannot report result; will retry");
                        } else {
                            tracing::debug!(seq = entry.seq, failures, error = %e, "cannot report result; will retry");
                        }
                        tokio::time::sleep(policy.delay(failures.saturating_sub(1))).await;
                        continue;
                    }
                };
                failures = 0;
                if let Err(e) = marked {
                    // The broker has it but the journal could not say so: it will be sent again
                    // (a harmless duplicate). Back off so a broken disk does not spin.
                    tracing::error!(seq = entry.seq, result_id = %entry.result_id, error = %e, "cannot mark a result in the journal");
                    tokio::time::sleep(policy.max).await;
                    break 'entries;
                }
                progress.send_modify(|n| *n += 1);
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    use flashgate_proto::errors::refusal;
    use flashgate_proto::v1::licence_service_server::{LicenceService, LicenceServiceServer};
    use flashgate_proto::v1::{ReportInstallResponse, image_service_server::ImageServiceServer};
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::transport::{Endpoint, Server};
    use tonic::{Request, Response};

    use super::*;
    use crate::journal::tests::sample;

    #[derive(Default)]
    struct Fake {
        issue_calls: AtomicUsize,
        report_calls: AtomicUsize,
        refuse: AtomicBool,
        shed: AtomicUsize,
        down: AtomicBool,
        /// IssueLicence answers UNAVAILABLE.
        issue_down: AtomicBool,
        /// result_id → times seen.
        seen: Mutex<HashMap<String, usize>>,
        /// result_ids answered with INVALID_ARGUMENT.
        reject: Mutex<Vec<String>>,
    }

    #[derive(Clone, Default)]
    struct FakeBroker(Arc<Fake>);

    #[tonic::async_trait]
    impl LicenceService for FakeBroker {
        async fn issue_licence(
            &self,
            request: Request<IssueLicenceRequest>,
        ) -> Result<Response<IssueLicenceResponse>, Status> {
            self.0.issue_calls.fetch_add(1, Ordering::SeqCst);
            let r = request.into_inner();
            if self.0.issue_down.load(Ordering::SeqCst) {
                return Err(Status::unavailable("site broker waiting for a lease"));
            }
            if self.0.refuse.load(Ordering::SeqCst) {
                return Err(refusal(
                    Code::ResourceExhausted,
                    "QUOTA_EXHAUSTED",
                    format!("batch {} has issued 8 of 8", r.batch_id),
                    [("batch_id", r.batch_id.clone())],
                ));
            }
            if self.0.shed.load(Ordering::SeqCst) > 0 {
                self.0.shed.fetch_sub(1, Ordering::SeqCst);
                return Err(Status::resource_exhausted("HSM pool saturated"));
            }
            Ok(Response::new(IssueLicenceResponse {
                licence: vec![7; 132],
                device_id: "d".repeat(32),
                image_sha256: "ab".repeat(32),
                ..Default::default()
            }))
        }

        async fn report_install(
            &self,
            request: Request<ReportInstallRequest>,
        ) -> Result<Response<ReportInstallResponse>, Status> {
            self.0.report_calls.fetch_add(1, Ordering::SeqCst);
            if self.0.down.load(Ordering::SeqCst) {
                return Err(Status::unavailable("ledger unreachable"));
            }
            let r = request.into_inner();
            if self.0.reject.lock().unwrap().contains(&r.result_id) {
                return Err(Status::invalid_argument(format!("device_id {:?} is not 32 hex characters", r.device_id)));
            }
            let mut seen = self.0.seen.lock().unwrap();
            let n = seen.entry(r.result_id).or_insert(0);
            *n += 1;
            Ok(Response::new(ReportInstallResponse { recorded: *n == 1 }))
        }
    }

    async fn serve_on(fake: FakeBroker, listener: TcpListener) {
        tokio::spawn(async move {
            Server::builder()
                .add_service(LicenceServiceServer::new(fake))
                .add_service(ImageServiceServer::new(crate::images::tests::FakeImages::default()))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
    }

    async fn live(fake: FakeBroker) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        serve_on(fake, listener).await;
        addr
    }

    /// A port nothing listens on.
    async fn dead() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    fn channel(addr: SocketAddr) -> (String, Channel) {
        let uri = format!("http://{addr}");
        let ch = Endpoint::from_shared(uri.clone()).unwrap().connect_timeout(Duration::from_secs(2)).connect_lazy();
        (uri, ch)
    }

    fn fast() -> RetryPolicy {
        RetryPolicy { attempts: 3, initial: Duration::from_millis(5), max: Duration::from_millis(40) }
    }

    fn client(addrs: &[SocketAddr]) -> BrokerClient {
        BrokerClient::from_channels(addrs.iter().map(|a| channel(*a)).collect()).unwrap().with_retry_policy(fast())
    }

    fn issue_req() -> IssueLicenceRequest {
        IssueLicenceRequest { batch_id: "b1".into(), chip_certificate: vec![0; 136], probe: None }
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let p = RetryPolicy::default();
        for round in 0..40 {
            let base = Duration::from_millis(100).saturating_mul(1 << round.min(20)).min(Duration::from_secs(5));
            let d = p.delay(round);
            assert!(d >= base / 2 && d <= base, "round {round}: {d:?} vs {base:?}");
        }
        assert!(p.delay(30) >= Duration::from_millis(2500));
    }

    #[test]
    fn classification() {
        assert_eq!(classify(&Status::unavailable("x")), Failure::Connection);
        assert_eq!(classify(&Status::deadline_exceeded("x")), Failure::Connection);
        assert_eq!(classify(&Status::unknown("x")), Failure::Connection);
        assert_eq!(classify(&Status::resource_exhausted("shed")), Failure::Shed);
        assert_eq!(classify(&Status::invalid_argument("x")), Failure::Other);
        let quota = refusal(Code::ResourceExhausted, "QUOTA_EXHAUSTED", "none left", []);
        assert!(matches!(classify(&quota), Failure::Refused(r) if r.reason == "QUOTA_EXHAUSTED"));
        let e = |status| BrokerError::Status { rpc: "ReportInstall", endpoint: "x".into(), status: Box::new(status) };
        assert!(e(Status::invalid_argument("bad")).rejects_request());
        assert!(!e(Status::permission_denied("who?")).rejects_request());
        assert!(!e(Status::unavailable("down")).rejects_request());
        assert!(e(Status::unavailable("down")).is_transient());
        let r = |code, reason: &str| BrokerError::Refused {
            rpc: "ReportInstall",
            endpoint: "x".into(),
            refusal: Box::new(Refusal {
                code,
                reason: reason.into(),
                message: String::new(),
                metadata: HashMap::new(),
            }),
        };
        assert!(r(Code::PermissionDenied, "SITE_NOT_ALLOWED").rejects_request());
        assert!(r(Code::NotFound, "UNKNOWN_BATCH").rejects_request());
        assert!(!r(Code::PermissionDenied, "STATION_REVOKED").rejects_request());
        assert!(!r(Code::ResourceExhausted, "QUOTA_EXHAUSTED").rejects_request());
    }

    #[tokio::test]
    async fn fails_over_from_a_dead_endpoint() {
        let fake = FakeBroker::default();
        let (d, l) = (dead().await, live(fake.clone()).await);
        let c = client(&[d, l]);
        let resp = c.issue_licence(issue_req()).await.unwrap();
        assert_eq!(resp.licence.len(), 132);
        assert_eq!(c.current_endpoint(), format!("http://{l}"));
        // A clone shares the current endpoint and stays on the live one.
        assert!(c.clone().report_install(crate::journal::to_report(&entry(1))).await.unwrap());
        assert_eq!(fake.0.issue_calls.load(Ordering::SeqCst), 1);
        assert_eq!(c.current_endpoint(), format!("http://{l}"));
    }

    #[tokio::test]
    async fn all_dead_is_unreachable_naming_every_endpoint() {
        let (a, b) = (dead().await, dead().await);
        let c = client(&[a, b]);
        let err = c.issue_licence(issue_req()).await.unwrap_err();
        assert!(matches!(err, BrokerError::Unreachable { rounds: 3, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&a.to_string()) && msg.contains(&b.to_string()) && msg.contains("IssueLicence"), "{msg}");
        assert!(err.is_transient());
    }

    #[tokio::test]
    async fn a_refusal_is_not_retried() {
        let fake = FakeBroker::default();
        fake.0.refuse.store(true, Ordering::SeqCst);
        let (d, l) = (dead().await, live(fake.clone()).await);
        let c = client(&[l, d]);
        let err = c.issue_licence(issue_req()).await.unwrap_err();
        assert_eq!(err.refusal().map(|r| r.reason.as_str()), Some("QUOTA_EXHAUSTED"));
        assert_eq!(fake.0.issue_calls.load(Ordering::SeqCst), 1);
        let msg = err.to_string();
        assert!(msg.contains("QUOTA_EXHAUSTED") && msg.contains(&l.to_string()), "{msg}");
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn load_shedding_is_retried_then_reported() {
        let fake = FakeBroker::default();
        fake.0.shed.store(2, Ordering::SeqCst);
        let c = client(&[live(fake.clone()).await]);
        c.issue_licence(issue_req()).await.unwrap();
        assert_eq!(fake.0.issue_calls.load(Ordering::SeqCst), 3);

        fake.0.shed.store(10, Ordering::SeqCst);
        let err = c.issue_licence(issue_req()).await.unwrap_err();
        assert!(matches!(&err, BrokerError::Status { status, .. } if status.code() == Code::ResourceExhausted));
        assert_eq!(fake.0.issue_calls.load(Ordering::SeqCst), 6);
        assert!(err.to_string().contains("HSM pool saturated"), "{err}");
    }

    /// A station whose own site broker could not answer moves to central, and goes back to the site
    /// broker once it has had time to recover, rather than staying on central for good.
    #[tokio::test]
    async fn goes_back_to_the_first_endpoint_after_a_while() {
        let (first, second) = (FakeBroker::default(), FakeBroker::default());
        first.0.issue_down.store(true, Ordering::SeqCst);
        let (a, b) = (live(first.clone()).await, live(second.clone()).await);
        let c = client(&[a, b]).with_back_to_first_after(Duration::from_millis(200));
        c.issue_licence(issue_req()).await.unwrap();
        assert_eq!(c.current_endpoint(), format!("http://{b}"));
        c.issue_licence(issue_req()).await.unwrap();
        assert_eq!(second.0.issue_calls.load(Ordering::SeqCst), 2, "stays on the second meanwhile");
        first.0.issue_down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(250)).await;
        c.issue_licence(issue_req()).await.unwrap();
        assert_eq!(c.current_endpoint(), format!("http://{a}"));
        assert_eq!(first.0.issue_calls.load(Ordering::SeqCst), 2, "the first was asked again");
        // Still down when tried again: back to the second at once, for another while.
        first.0.issue_down.store(true, Ordering::SeqCst);
        c.issue_licence(issue_req()).await.unwrap();
        assert_eq!(c.current_endpoint(), format!("http://{b}"));
    }

    #[tokio::test]
    async fn a_hung_broker_times_out() {
        // Accepts TCP but never speaks HTTP/2.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let c = client(&[addr])
            .with_retry_policy(RetryPolicy { attempts: 1, ..fast() })
            .with_rpc_timeout(Duration::from_millis(200));
        let err = c.issue_licence(issue_req()).await.unwrap_err();
        assert!(err.to_string().contains("no answer within"), "{err}");
    }

    fn entry(i: u32) -> crate::journal::JournalEntry {
        crate::journal::JournalEntry { seq: u64::from(i), result_id: format!("t-{i}"), result: sample(i) }
    }

    #[tokio::test]
    async fn reporter_delivers_everything_once_across_an_outage() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(Journal::open(dir.path()).unwrap());
        let fake = FakeBroker::default();
        // The broker's port is closed at first.
        let addr = dead().await;
        let c = client(&[addr]);
        let reporter = Reporter::spawn(Arc::clone(&journal), c);
        for i in 0..5 {
            journal.append(sample(i)).unwrap();
            reporter.notify();
        }
        assert_eq!(reporter.flush(Duration::from_millis(300)).await, 5);

        // Up, but its back end is unavailable for a while.
        fake.0.down.store(true, Ordering::SeqCst);
        serve_on(fake.clone(), TcpListener::bind(addr).await.unwrap()).await;
        for i in 5..8 {
            journal.append(sample(i)).unwrap();
            reporter.notify();
        }
        assert_eq!(reporter.flush(Duration::from_millis(300)).await, 8);
        assert!(fake.0.report_calls.load(Ordering::SeqCst) > 0);

        fake.0.down.store(false, Ordering::SeqCst);
        assert_eq!(reporter.flush(Duration::from_secs(20)).await, 0);
        for i in 8..12 {
            journal.append(sample(i)).unwrap();
            reporter.notify();
        }
        assert_eq!(reporter.flush(Duration::from_secs(20)).await, 0);

        let seen = fake.0.seen.lock().unwrap().clone();
        let ids: Vec<String> = journal.entries().unwrap().into_iter().map(|(e, _)| e.result_id).collect();
        assert_eq!(ids.len(), 12);
        assert_eq!(seen.len(), 12);
        for id in &ids {
            assert!(seen.contains_key(id), "{id} never reached the broker");
        }
        assert!(journal.entries().unwrap().iter().all(|(_, s)| *s == crate::journal::EntryState::Reported));
        reporter.shutdown().await;
    }

    #[tokio::test]
    async fn reporter_replays_after_restart_and_skips_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeBroker::default();
        let addr = live(fake.clone()).await;
        let journal = Arc::new(Journal::open(dir.path()).unwrap());
        for i in 0..4 {
            journal.append(sample(i)).unwrap();
        }
        let bad = format!("{}-2", journal.journal_id());
        fake.0.reject.lock().unwrap().push(bad.clone());
        // Pretend entry 1 was delivered but its acknowledgement was lost.
        fake.0.seen.lock().unwrap().insert(format!("{}-1", journal.journal_id()), 1);

        let reporter = Reporter::spawn(Arc::clone(&journal), client(&[addr]));
        assert_eq!(reporter.flush(Duration::from_secs(20)).await, 0);
        drop(reporter);

        let entries = journal.entries().unwrap();
        let states: Vec<String> = entries.iter().map(|(_, s)| s.to_string()).collect();
        assert_eq!(states[0], "reported");
        assert!(states[1].starts_with("rejected: ReportInstall at broker http://") && states[1].contains("32 hex"));
        assert_eq!(&states[2..], ["reported", "reported"]);
        let seen = fake.0.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[&format!("{}-1", journal.journal_id())], 2, "replayed duplicate answered recorded=false");
        assert!(!seen.contains_key(&bad));
        // Rejected once, not retried.
        assert_eq!(fake.0.report_calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn images_fail_over_too() {
        let fake = FakeBroker::default();
        let (d, l) = (dead().await, live(fake).await);
        let c = client(&[d, l]);
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(cache_dir.path()).unwrap();
        let (sha, data) = crate::images::tests::fixed_image();
        let path = c.fetch_image(&cache, &sha, crate::images::Expect::any()).await.unwrap();
        assert_eq!(std::fs::read(path).unwrap(), data);
        assert_eq!(c.current_endpoint(), format!("http://{l}"));
    }
}
