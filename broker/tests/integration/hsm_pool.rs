//! HSM pool: failover on device errors, a member taken out mid-run, backoff re-probing, load
//! shedding, timeouts, and logical errors that must not fail over — with test-double members.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use flashgate_broker::hsm::{HsmBackend, HsmError, HsmPool, KeyInfo, PoolConfig};
use flashgate_common::cert::{ChipCertificate, ChipKey, VendorCa};
use flashgate_common::licence::{KeyId, Licence, issue_with_ephemeral, open_licence};
use flashgate_common::sfi::{FirmwareKey, ImageNonce, PlainArea, image_to_vec};
use rand::SeedableRng;
use rand::rngs::{OsRng, StdRng};

const PRODUCT: [u8; 8] = *b"46201002";
const KEY_ID: KeyId = KeyId([0xAB; 16]);

/// A member that does the real licence math in memory and can be told to fail like a device.
struct Double {
    name: String,
    key: FirmwareKey,
    capacity: usize,
    delay: Duration,
    /// Requests fail with a device error while set.
    failing: AtomicBool,
    /// Start failing once this many requests were served (usize::MAX: never).
    fail_after: AtomicUsize,
    /// Health probes fail while this is non-zero (decremented per probe).
    bad_probes: AtomicUsize,
    calls: AtomicUsize,
    probes: AtomicUsize,
}

impl Double {
    fn new(name: &str, capacity: usize, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            key: FirmwareKey::new([0x42; 16]),
            capacity,
            delay,
            failing: AtomicBool::new(false),
            fail_after: AtomicUsize::new(usize::MAX),
            bad_probes: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            probes: AtomicUsize::new(0),
        })
    }

    fn device_error(&self) -> HsmError {
        HsmError::Device { member: self.name.clone(), reason: "simulated CKR_DEVICE_ERROR".into() }
    }

    fn serve(&self) -> Result<(), HsmError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        if n >= self.fail_after.load(Ordering::SeqCst) {
            self.failing.store(true, Ordering::SeqCst);
        }
        if self.failing.load(Ordering::SeqCst) { Err(self.device_error()) } else { Ok(()) }
    }
}

impl HsmBackend for Double {
    fn name(&self) -> &str {
        &self.name
    }
    fn generate_key(&self, _label: &str) -> Result<KeyInfo, HsmError> {
        Err(HsmError::Unsupported("double".into()))
    }
    fn import_key_with_id(&self, key_id: KeyId, label: &str, _key: &FirmwareKey) -> Result<KeyInfo, HsmError> {
        Ok(KeyInfo { key_id, label: label.into() })
    }
    fn has_key(&self, key_id: &KeyId) -> Result<bool, HsmError> {
        Ok(*key_id == KEY_ID)
    }
    fn list_keys(&self) -> Result<Vec<KeyInfo>, HsmError> {
        Ok(vec![KeyInfo { key_id: KEY_ID, label: "fw".into() }])
    }
    fn issue_licence(&self, key_id: &KeyId, cert: &ChipCertificate, nonce: &ImageNonce) -> Result<Licence, HsmError> {
        if *key_id != KEY_ID {
            return Err(HsmError::UnknownKey { member: self.name.clone(), key_id: *key_id });
        }
        self.serve()?;
        let eph = p256::SecretKey::random(&mut OsRng);
        Ok(issue_with_ephemeral(&eph, cert, key_id, &self.key, nonce).unwrap())
    }
    fn encrypt_image(&self, _key_id: &KeyId, nonce: &ImageNonce, areas: &[PlainArea]) -> Result<Vec<u8>, HsmError> {
        self.serve()?;
        Ok(image_to_vec(&self.key, nonce, areas)?)
    }
    fn health(&self) -> Result<(), HsmError> {
        self.probes.fetch_add(1, Ordering::SeqCst);
        let bad = self.bad_probes.load(Ordering::SeqCst);
        if bad > 0 {
            self.bad_probes.store(bad - 1, Ordering::SeqCst);
            return Err(self.device_error());
        }
        // A member that passes its probe serves again.
        self.failing.store(false, Ordering::SeqCst);
        self.fail_after.store(usize::MAX, Ordering::SeqCst);
        Ok(())
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
}

fn chip() -> (ChipKey, ChipCertificate) {
    let mut rng = StdRng::seed_from_u64(11);
    let ca = VendorCa::generate(&mut rng);
    let chip = ChipKey::generate(&mut rng);
    let cert = ca.sign_certificate(PRODUCT, chip.public_xy());
    (chip, cert)
}

fn config() -> PoolConfig {
    PoolConfig {
        timeout: Duration::from_secs(10),
        backoff_initial: Duration::from_secs(60),
        backoff_max: Duration::from_secs(60),
        probe_tick: Duration::from_millis(5),
        health_interval: None,
        max_in_flight: Some(1000),
    }
}

fn members(ds: &[&Arc<Double>]) -> Vec<Arc<dyn HsmBackend>> {
    ds.iter().map(|d| (*d).clone() as Arc<dyn HsmBackend>).collect()
}

async fn run_many(pool: &Arc<HsmPool>, cert: &ChipCertificate, chip: &ChipKey, n: usize) {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (pool, cert) = (pool.clone(), cert.clone());
        tasks.push(tokio::spawn(async move { pool.issue_licence(KEY_ID, cert, ImageNonce([1; 12])).await }));
    }
    for t in tasks {
        let lic = t.await.unwrap().expect("every request must succeed");
        open_licence(&lic, chip, &PRODUCT).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hsm_pool_fails_over_on_device_error_mid_run() {
    let a = Double::new("a", 4, Duration::from_millis(1));
    let b = Double::new("b", 4, Duration::from_millis(1));
    a.fail_after.store(20, Ordering::SeqCst);
    let pool = Arc::new(HsmPool::new(members(&[&a, &b]), config()).unwrap());
    let (chip, cert) = chip();
    run_many(&pool, &cert, &chip, 300).await;
    let st = pool.status();
    assert!(!st[0].healthy, "{st:?}");
    assert!(st[0].last_error.as_deref().unwrap().contains("simulated CKR_DEVICE_ERROR"), "{st:?}");
    assert!(st[0].device_errors >= 1);
    assert!(st[1].healthy);
    assert!(b.calls.load(Ordering::SeqCst) >= 250, "b served {}", b.calls.load(Ordering::SeqCst));
    assert_eq!(st.iter().map(|s| s.in_flight).sum::<usize>(), 0);
    assert!(st[1].latency_max >= st[1].latency_mean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hsm_pool_member_removed_mid_run_without_failed_requests() {
    let a = Double::new("a", 2, Duration::from_millis(2));
    let b = Double::new("b", 2, Duration::from_millis(2));
    let pool = Arc::new(HsmPool::new(members(&[&a, &b]), config()).unwrap());
    let (chip, cert) = chip();
    let runner = {
        let (pool, cert, chip) = (pool.clone(), cert.clone(), chip.to_scalar());
        tokio::spawn(async move {
            let chip = ChipKey::from_scalar(*chip).unwrap();
            run_many(&pool, &cert, &chip, 400).await
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    // The member is pulled: it fails everything from now on and is taken out of dispatch.
    a.failing.store(true, Ordering::SeqCst);
    a.bad_probes.store(usize::MAX, Ordering::SeqCst);
    assert!(pool.mark_unhealthy("a", "removed by operator"));
    runner.await.unwrap();
    let st = pool.status();
    assert!(!st[0].healthy, "{st:?}");
    // Requests already queued on `a` when it was pulled failed over; new ones never reach it.
    let calls_after = a.calls.load(Ordering::SeqCst);
    run_many(&pool, &cert, &chip, 50).await;
    assert_eq!(a.calls.load(Ordering::SeqCst), calls_after, "{:?}", pool.status());
    assert!(!pool.mark_unhealthy("nope", "x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_pool_reprobes_unhealthy_member_with_backoff() {
    let a = Double::new("a", 1, Duration::ZERO);
    let b = Double::new("b", 1, Duration::ZERO);
    a.failing.store(true, Ordering::SeqCst);
    a.bad_probes.store(2, Ordering::SeqCst);
    let cfg =
        PoolConfig { backoff_initial: Duration::from_millis(20), backoff_max: Duration::from_millis(200), ..config() };
    let pool = HsmPool::new(members(&[&a, &b]), cfg).unwrap();
    let (chip, cert) = chip();
    // First request lands on `a` (both idle), fails over to `b`.
    let lic = pool.issue_licence(KEY_ID, cert.clone(), ImageNonce([1; 12])).await.unwrap();
    open_licence(&lic, &chip, &PRODUCT).unwrap();
    assert!(!pool.status()[0].healthy);
    // Two failed probes (20 ms, 40 ms backoff), then a good one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !pool.status()[0].healthy {
        assert!(tokio::time::Instant::now() < deadline, "never re-probed healthy: {:?}", pool.status());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(a.probes.load(Ordering::SeqCst), 3);
    let st = &pool.status()[0];
    assert_eq!(st.consecutive_failures, 0);
    assert_eq!(st.last_error, None);
    // And it serves again.
    let before = a.calls.load(Ordering::SeqCst);
    for _ in 0..4 {
        pool.issue_licence(KEY_ID, cert.clone(), ImageNonce([1; 12])).await.unwrap();
    }
    assert!(a.calls.load(Ordering::SeqCst) > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_pool_sheds_load_when_saturated() {
    let a = Double::new("a", 1, Duration::from_millis(300));
    // By default a pool admits QUEUE_FACTOR requests per slot (the rest wait for a slot).
    let default = HsmPool::new(members(&[&a]), PoolConfig { max_in_flight: None, ..config() }).unwrap();
    assert_eq!(default.capacity(), flashgate_broker::hsm::pool::QUEUE_FACTOR);
    drop(default);
    let cfg = PoolConfig { max_in_flight: Some(1), ..config() };
    let pool = Arc::new(HsmPool::new(members(&[&a]), cfg).unwrap());
    assert_eq!(pool.capacity(), 1);
    let (_, cert) = chip();
    let first = {
        let (pool, cert) = (pool.clone(), cert.clone());
        tokio::spawn(async move { pool.issue_licence(KEY_ID, cert, ImageNonce([1; 12])).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e = pool.issue_licence(KEY_ID, cert.clone(), ImageNonce([1; 12])).await.unwrap_err();
    assert!(matches!(e, HsmError::Overloaded { capacity: 1 }), "{e}");
    first.await.unwrap().unwrap();
    // Capacity is back.
    pool.issue_licence(KEY_ID, cert, ImageNonce([1; 12])).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_pool_times_out() {
    let a = Double::new("a", 1, Duration::from_millis(400));
    let cfg = PoolConfig { timeout: Duration::from_millis(50), ..config() };
    let pool = HsmPool::new(members(&[&a]), cfg).unwrap();
    let (_, cert) = chip();
    let e = pool.issue_licence(KEY_ID, cert, ImageNonce([1; 12])).await.unwrap_err();
    assert!(matches!(e, HsmError::Timeout { op: "issue_licence", .. }), "{e}");
    // The blocking call is still counted until it ends.
    assert_eq!(pool.status()[0].in_flight, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pool.status()[0].in_flight, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_pool_logical_errors_do_not_fail_over() {
    let a = Double::new("a", 1, Duration::ZERO);
    let b = Double::new("b", 1, Duration::ZERO);
    let pool = HsmPool::new(members(&[&a, &b]), config()).unwrap();
    let (_, cert) = chip();
    let e = pool.issue_licence(KeyId([1; 16]), cert, ImageNonce([1; 12])).await.unwrap_err();
    assert!(matches!(e, HsmError::UnknownKey { .. }), "{e}");
    assert!(pool.status().iter().all(|s| s.healthy));
    // Bad image input is logical too.
    let e = pool.encrypt_image(KEY_ID, ImageNonce([1; 12]), vec![]).await.unwrap_err();
    assert!(matches!(e, HsmError::Image(_)), "{e}");
    assert!(pool.status().iter().all(|s| s.healthy && s.device_errors == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_pool_all_members_failing() {
    let a = Double::new("a", 1, Duration::ZERO);
    let b = Double::new("b", 1, Duration::ZERO);
    for d in [&a, &b] {
        d.failing.store(true, Ordering::SeqCst);
        d.bad_probes.store(usize::MAX, Ordering::SeqCst);
    }
    let pool = HsmPool::new(members(&[&a, &b]), config()).unwrap();
    let (_, cert) = chip();
    let e = pool.issue_licence(KEY_ID, cert.clone(), ImageNonce([1; 12])).await.unwrap_err();
    assert!(matches!(e, HsmError::AllMembersFailed { attempts: 2, .. }), "{e}");
    let e = pool.issue_licence(KEY_ID, cert, ImageNonce([1; 12])).await.unwrap_err();
    assert!(matches!(e, HsmError::NoHealthyMember { members: 2 }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_pool_admin_operations() {
    let a = Double::new("a", 1, Duration::ZERO);
    let b = Double::new("b", 1, Duration::ZERO);
    let pool = HsmPool::new(members(&[&a, &b]), config()).unwrap();
    assert!(pool.has_key(KEY_ID).await.unwrap());
    assert!(!pool.has_key(KeyId([0; 16])).await.unwrap());
    assert_eq!(pool.list_keys().await.unwrap().len(), 1);
    let e = pool.generate_key("fw").await.unwrap_err();
    assert!(e.to_string().contains("key ceremony"), "{e}");
    assert_eq!(pool.check_health().await, 2);
    assert!(HsmPool::new(vec![], config()).is_err());
}
