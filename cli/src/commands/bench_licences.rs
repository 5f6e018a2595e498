//! `flashgate bench licences`: a load generator for the broker's licence service. Owns the bench's
//! setup through `AdminService` (a fresh key, a tiny packed image, a batch open to the stations'
//! sites; or, with `--batch`, an existing batch read with `BatchStatus`, so the same batch can load a
//! central broker and then a site broker that mirrors it), the simulated chips (P-256 key pairs with certificates signed by a test vendor CA,
//! generated before the clock starts), the virtual stations (each its own mutual-TLS channel,
//! looping `IssueLicence` with a fresh chip per request), the statistics (licences/s, errors by
//! reason, latency percentiles) and a correctness check that sampled licences open for their chips
//! and unlock the image (fetched through `ImageService`). Exits non-zero when more than 1% of the measured requests failed. With
//! `--broker-pid` it also reports a separate broker process's CPU time per licence (`/proc/PID/stat`),
//! and with `--crypto-floor` the ratio of that to the same-run `openssl speed` floor. [`Bench`] and
//! [`Phase`] are shared with `bench flood`, which runs measured windows with and without a flood.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use flashgate_common::cert::{CERT_LEN, ChipKey, VendorCa};
use flashgate_common::family::Family;
use flashgate_common::licence::{LICENCE_LEN, Licence, open_licence};
use flashgate_common::pki::{self, Identity};
use flashgate_common::sfi::{self, ImageReader, ReaderOptions};
use flashgate_proto::errors::Refusal;
use flashgate_proto::transport::{self, TlsFiles};
use flashgate_proto::v1 as pb;
use flashgate_proto::v1::admin_service_client::AdminServiceClient;
use flashgate_proto::v1::image_service_client::ImageServiceClient;
use flashgate_proto::v1::licence_service_client::LicenceServiceClient;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;
use tonic::transport::Channel;

use super::bench_proc;
use super::client::{self, DEFAULT_BROKER, RpcResultExt, status_text};

/// Licences per second assumed when sizing the pre-generated chip pool without `--chips`.
pub const ASSUMED_RATE: u64 = 3000;
/// Largest chip pool generated without `--chips`; further chips are made during the run.
pub const MAX_DEFAULT_CHIPS: u64 = 500_000;
/// Size of the image the bench packs (one `F` area at the start of flash).
pub const IMAGE_AREA_LEN: usize = 1024;
/// Pause of a virtual station after a failed request, so a dead broker is not hammered.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Largest share of failed requests a bench run may have and still succeed.
pub const MAX_ERROR_RATE: f64 = 0.01;

/// Arguments of `flashgate bench licences`.
#[derive(Debug, Args)]
pub struct LicenceBenchArgs {
    /// Broker URL.
    #[arg(long, env = "FLASHGATE_BROKER", default_value = DEFAULT_BROKER, value_name = "URL",
          value_parser = super::client::parse_broker)]
    pub broker: String,
    /// PKI directory from `flashgate pki init` with an admin and station certificates.
    #[arg(long, value_name = "DIR")]
    pub pki: PathBuf,
    /// Test vendor CA private key (PKCS#8 PEM, from `flashgate sim vendor-ca`) the broker trusts.
    #[arg(long, value_name = "KEY_PEM")]
    pub vendor_ca_key: PathBuf,
    /// Concurrent virtual stations, each with its own TLS connection (certificates shared round-robin).
    #[arg(long, default_value_t = 64, value_parser = super::number_between(1u32, 10_000))]
    pub stations: u32,
    /// Measured duration, e.g. `30s`, `2m`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Warm-up before measuring (discarded).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Use only station certificates of this site.
    #[arg(long, value_name = "NAME")]
    pub site: Option<String>,
    /// Admin name in --pki used for the setup.
    #[arg(long, default_value = "admin", value_name = "NAME")]
    pub admin: String,
    /// Name the broker certificate must carry (default: the host of --broker).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Simulated chips to generate before the clock starts (default: 3000/s × (warmup + duration),
    /// at most 500,000); chips needed beyond these are generated during the run, outside the latency.
    #[arg(long)]
    pub chips: Option<u64>,
    /// Quota of the bench batch.
    #[arg(long, default_value_t = 10_000_000, value_parser = super::number_at_least(1i64))]
    pub quota: i64,
    /// Load this existing batch instead of creating one (no key, image or batch is made, and the batch
    /// is left open afterwards): its key id, image and product are read with `BatchStatus`, and sampled
    /// licences are checked against the image the broker serves (every area must authenticate and
    /// decrypt under the licence's key). For a site broker, the batch it mirrors from central.
    #[arg(long, value_name = "ID", conflicts_with = "quota")]
    pub batch: Option<String>,
    /// Licences to open with their chip's key after the run (0 to skip the check).
    #[arg(long, default_value_t = 100)]
    pub verify: usize,
    /// Open loop: the stations together send this many requests per second on a fixed schedule, and
    /// latency is measured from each request's scheduled time (no coordinated omission). 0: closed
    /// loop, each station sends its next request when the previous one is answered.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Process id of the broker when it runs as a separate process on this machine: its CPU time
    /// (utime + stime of all its threads, from `/proc/PID/stat`) over the measured window is reported,
    /// per licence issued.
    #[arg(long, value_name = "PID")]
    pub broker_pid: Option<u32>,
    /// After the run, measure one licence's crypto floor with `openssl speed -seconds 2 ecdhp256
    /// ecdsap256` (key generation + ECDSA verify + ECDH, P-256) and report the broker's CPU time per
    /// licence against it.
    #[arg(long, requires = "broker_pid")]
    pub crypto_floor: bool,
}

// ---------------------------------------------------------------------------------------------
// Statistics (pure)
// ---------------------------------------------------------------------------------------------

/// The nearest-rank `q`-quantile (0..=1) of ascending `sorted` values; 0 when empty.
pub fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latency figures in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Latency {
    /// Median.
    pub p50: u32,
    /// 99th percentile.
    pub p99: u32,
    /// 99.9th percentile.
    pub p999: u32,
    /// Largest.
    pub max: u32,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Latency {
    /// Sort `samples` (microseconds) and summarize them.
    pub fn of(samples: &mut [u32]) -> Latency {
        samples.sort_unstable();
        let sum: u64 = samples.iter().map(|&v| u64::from(v)).sum();
        Latency {
            p50: percentile(samples, 0.50),
            p99: percentile(samples, 0.99),
            p999: percentile(samples, 0.999),
            max: samples.last().copied().unwrap_or(0),
            mean: if samples.is_empty() { 0.0 } else { sum as f64 / samples.len() as f64 },
        }
    }
}

/// Microseconds as `0.123 ms` / `12.3 ms` / `1.23 s`.
pub fn fmt_us(us: u32) -> String {
    let ms = f64::from(us) / 1000.0;
    if ms < 1.0 {
        format!("{ms:.3} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

/// The default chip pool: the assumed rate over warmup + duration, capped.
pub fn default_chip_count(warmup: Duration, duration: Duration) -> u64 {
    let secs = (warmup + duration).as_secs_f64();
    ((ASSUMED_RATE as f64 * secs).ceil() as u64).clamp(1, MAX_DEFAULT_CHIPS)
}

/// What one virtual station measured.
#[derive(Debug, Default)]
struct StationStats {
    ok: u64,
    latencies_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
    examples: BTreeMap<String, String>,
    reissued: u64,
    unmeasured: u64,
    chips_generated: u64,
    samples: Vec<Sample>,
}

impl StationStats {
    fn error(&mut self, reason: String, example: String) {
        *self.errors.entry(reason.clone()).or_default() += 1;
        self.examples.entry(reason).or_insert(example);
    }

    fn merge(&mut self, other: StationStats) {
        self.ok += other.ok;
        self.latencies_us.extend(other.latencies_us);
        for (reason, n) in other.errors {
            *self.errors.entry(reason).or_default() += n;
        }
        for (reason, example) in other.examples {
            self.examples.entry(reason).or_insert(example);
        }
        self.reissued += other.reissued;
        self.unmeasured += other.unmeasured;
        self.chips_generated += other.chips_generated;
        self.samples.extend(other.samples);
    }
}

/// The failure share of a run: errors / (ok + errors); 0 for no requests.
pub fn error_rate(ok: u64, errors: u64) -> f64 {
    let attempts = ok + errors;
    if attempts == 0 { 0.0 } else { errors as f64 / attempts as f64 }
}

// ---------------------------------------------------------------------------------------------
// Simulated chips
// ---------------------------------------------------------------------------------------------

/// A simulated chip: its key pair and its vendor-signed certificate.
#[derive(Clone)]
struct Chip {
    key: ChipKey,
    cert: [u8; CERT_LEN],
    device_id: String,
}

impl Chip {
    fn generate(ca: &VendorCa, product: [u8; 8], rng: &mut StdRng) -> Chip {
        let key = ChipKey::generate(rng);
        let cert = ca.sign_certificate(product, key.public_xy());
        Chip { device_id: cert.device_id().to_string(), cert: cert.to_bytes(), key }
    }
}

/// A licence kept for the correctness check, with the chip it was issued for.
#[derive(Debug, Clone)]
struct Sample {
    chip_key: ChipKey,
    licence: Vec<u8>,
}

/// Chips generated before the clock starts, handed out once each.
struct ChipPool {
    chips: Vec<Chip>,
    next: AtomicUsize,
}

impl ChipPool {
    fn take(&self) -> Option<&Chip> {
        self.chips.get(self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// Generate `count` chips on blocking threads, one per core.
async fn pregenerate(ca: Arc<VendorCa>, product: [u8; 8], count: u64) -> Result<Vec<Chip>> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as u64;
    let threads = threads.clamp(1, count.max(1));
    let mut handles = Vec::new();
    for t in 0..threads {
        let share = count / threads + u64::from(t < count % threads);
        let ca = ca.clone();
        handles.push(tokio::task::spawn_blocking(move || {
            let mut rng = StdRng::from_entropy();
            (0..share).map(|_| Chip::generate(&ca, product, &mut rng)).collect::<Vec<_>>()
        }));
    }
    let mut chips = Vec::with_capacity(count as usize);
    for h in handles {
        chips.extend(h.await.context("chip generation thread failed")?);
    }
    Ok(chips)
}

// ---------------------------------------------------------------------------------------------
// Stations
// ---------------------------------------------------------------------------------------------

/// One station certificate of the PKI directory.
#[derive(Debug, Clone)]
pub(super) struct StationCert {
    /// The station's identity.
    pub(super) identity: Identity,
    /// Its site.
    pub(super) site: String,
    /// Its certificate, key and CA files.
    pub(super) files: TlsFiles,
}

/// Every station certificate in `DIR/stations` (of `site`, when given), sorted by file name.
pub(super) fn station_certs(dir: &Path, site: Option<&str>) -> Result<Vec<StationCert>> {
    let stations_dir = dir.join("stations");
    let entries = std::fs::read_dir(&stations_dir)
        .with_context(|| format!("listing station certificates in {}", stations_dir.display()))?;
    let mut pems: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pem"))
        .collect();
    pems.sort();
    let ca = pki::ca_cert_path(dir);
    let mut certs = Vec::new();
    for pem in pems {
        let info =
            pki::read_cert_info(&pem).with_context(|| format!("reading station certificate {}", pem.display()))?;
        let Identity::Station { site: cert_site, .. } = &info.identity else {
            continue;
        };
        if site.is_some_and(|s| s != cert_site) {
            continue;
        }
        certs.push(StationCert {
            site: cert_site.clone(),
            files: TlsFiles::new(&pem, pem.with_extension("key"), &ca),
            identity: info.identity,
        });
    }
    if certs.is_empty() {
        bail!(
            "no station certificates{} in {} (create some with `flashgate pki init --dir {} --site berlin --stations 4`)",
            site.map(|s| format!(" of site {s:?}")).unwrap_or_default(),
            stations_dir.display(),
            dir.display()
        );
    }
    Ok(certs)
}

/// The measured window.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    warmup_end: Instant,
    end: Instant,
    /// Open loop: the interval between one station's requests.
    interval: Option<Duration>,
}

/// What every virtual station shares.
struct Shared {
    batch_id: String,
    key_id: String,
    product: [u8; 8],
    ca: Arc<VendorCa>,
    pool: ChipPool,
    clock: Clock,
    /// Keep every n-th success as a sample, up to `sample_max` per station.
    sample_every: u64,
    sample_max: usize,
    /// Number of virtual stations (open-loop phase offsets).
    stations: u32,
}

/// Check a licence response against the chip and batch it was for.
fn check_response(r: &pb::IssueLicenceResponse, chip: &Chip, key_id: &str) -> Result<(), String> {
    if r.licence.len() != LICENCE_LEN {
        return Err(format!("licence of {} bytes, expected {LICENCE_LEN}", r.licence.len()));
    }
    Licence::parse(&r.licence).map_err(|e| format!("unparseable licence: {e}"))?;
    if r.device_id != chip.device_id {
        return Err(format!("device id {:?}, expected {:?}", r.device_id, chip.device_id));
    }
    if !r.key_id.eq_ignore_ascii_case(key_id) {
        return Err(format!("key id {:?}, expected {key_id:?}", r.key_id));
    }
    Ok(())
}

async fn station_loop(index: u32, channel: Channel, shared: Arc<Shared>) -> StationStats {
    let mut client = LicenceServiceClient::new(channel);
    let probe = pb::ProbeInfo { probe_id: format!("bench-{index}"), kind: "sim".into(), port: "bench".into() };
    let mut stats = StationStats::default();
    let clock = shared.clock;
    // Open loop: station i starts at i/stations of an interval and then keeps its schedule.
    let mut scheduled =
        clock.interval.map(|iv| clock.start + iv.mul_f64(f64::from(index) / f64::from(shared.stations)));
    while Instant::now() < clock.end {
        let generated;
        let chip = match shared.pool.take() {
            Some(chip) => chip,
            None => {
                let (ca, product) = (shared.ca.clone(), shared.product);
                let made =
                    tokio::task::spawn_blocking(move || Chip::generate(&ca, product, &mut StdRng::from_entropy()));
                match made.await {
                    Ok(chip) => {
                        stats.chips_generated += 1;
                        generated = chip;
                        &generated
                    }
                    Err(e) => {
                        stats.error("CHIP_GENERATION".into(), e.to_string());
                        break;
                    }
                }
            }
        };
        let request = pb::IssueLicenceRequest {
            batch_id: shared.batch_id.clone(),
            chip_certificate: chip.cert.to_vec(),
            probe: Some(probe.clone()),
        };
        let t0 = match (scheduled, clock.interval) {
            (Some(at), Some(iv)) => {
                tokio::time::sleep_until(at.into()).await;
                scheduled = Some(at + iv);
                at
            }
            _ => Instant::now(),
        };
        if t0 >= clock.end {
            break;
        }
        let result = client.issue_licence(request).await;
        let t1 = Instant::now();
        let measured = t0 >= clock.warmup_end && t1 <= clock.end;
        let failed = match (result, measured) {
            (Ok(_), false) => {
                stats.unmeasured += 1;
                false
            }
            (Err(_), false) => {
                stats.unmeasured += 1;
                true
            }
            (Ok(response), true) => {
                let r = response.into_inner();
                match check_response(&r, chip, &shared.key_id) {
                    Ok(()) => {
                        stats.ok += 1;
                        stats.latencies_us.push(u32::try_from((t1 - t0).as_micros()).unwrap_or(u32::MAX));
                        stats.reissued += u64::from(r.reissued);
                        if stats.samples.len() < shared.sample_max && stats.ok % shared.sample_every == 1 {
                            stats.samples.push(Sample { chip_key: chip.key.clone(), licence: r.licence });
                        }
                        false
                    }
                    Err(e) => {
                        stats.error("BAD_RESPONSE".into(), format!("device {}: {e}", chip.device_id));
                        true
                    }
                }
            }
            (Err(status), true) => {
                let reason =
                    Refusal::from_status(&status).map(|r| r.reason).unwrap_or_else(|| format!("{:?}", status.code()));
                stats.error(reason, status_text(&status));
                true
            }
        };
        if failed {
            tokio::time::sleep(ERROR_BACKOFF).await;
        }
    }
    stats
}

// ---------------------------------------------------------------------------------------------
// Setup and verification
// ---------------------------------------------------------------------------------------------

/// The batch the bench loads: created by its setup, or an existing one (`--batch`).
struct Setup {
    batch_id: String,
    key_id: String,
    image_sha256: String,
    /// The plaintext of the image's single area, when the bench packed it; `None` for an existing batch.
    plaintext: Option<Vec<u8>>,
    /// Whether the bench created the batch (and closes it afterwards).
    created: bool,
}

/// The bench image's plaintext: a recognisable pattern.
fn image_plaintext() -> Vec<u8> {
    (0..IMAGE_AREA_LEN).map(|i| (i as u8).wrapping_mul(13).wrapping_add(7)).collect()
}

async fn setup(
    admin: &mut AdminServiceClient<Channel>,
    family: Family,
    sites: Vec<String>,
    quota: i64,
) -> Result<Setup> {
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let label = format!("bench-{stamp}");
    let key = admin
        .generate_key(pb::GenerateKeyRequest { label: label.clone() })
        .await
        .rpc(&format!("bench setup: generating key {label:?}"))?;
    let profile = family.profile();
    let plaintext = image_plaintext();
    let image = admin
        .pack_image(pb::PackImageRequest {
            key_id: key.key_id.clone(),
            family: family.name().to_string(),
            product_id: profile.product_id_str().to_string(),
            areas: vec![pb::PlainArea { kind: "F".into(), address: profile.flash_base, data: plaintext.clone() }],
        })
        .await
        .rpc(&format!("bench setup: packing a {IMAGE_AREA_LEN}-byte image under key {}", key.key_id))?;
    let batch = admin
        .create_batch(pb::CreateBatchRequest {
            id: label.clone(),
            product_id: profile.product_id_str().to_string(),
            image_sha256: image.sha256.clone(),
            quota,
            allowed_sites: sites,
            not_before_ms: None,
            not_after_ms: None,
        })
        .await
        .rpc(&format!("bench setup: creating batch {label}"))?;
    if batch.state != pb::BatchState::Open as i32 {
        admin
            .set_batch_state(pb::SetBatchStateRequest { id: label.clone(), state: pb::BatchState::Open as i32 })
            .await
            .rpc(&format!("bench setup: opening batch {label}"))?;
    }
    Ok(Setup {
        batch_id: label,
        key_id: key.key_id,
        image_sha256: image.sha256,
        plaintext: Some(plaintext),
        created: true,
    })
}

/// An existing batch, read with `BatchStatus`, and the product id its chips must carry.
async fn existing(admin: &mut AdminServiceClient<Channel>, id: &str) -> Result<(Setup, [u8; 8])> {
    let b =
        admin.batch_status(pb::BatchStatusRequest { id: id.to_string() }).await.rpc(&format!("reading batch {id}"))?;
    let product: [u8; 8] = b
        .product_id
        .as_bytes()
        .try_into()
        .map_err(|_| anyhow!("batch {id} has product id {:?}, not 8 characters", b.product_id))?;
    if b.state != pb::BatchState::Open as i32 {
        bail!("batch {id} is not open (state {})", b.state().as_str_name());
    }
    if b.quota - b.issued - b.leased <= 0 {
        eprintln!(
            "warning: batch {id} shows no unit left here (quota {}, issued {}, leased {})",
            b.quota, b.issued, b.leased
        );
    }
    let setup =
        Setup { batch_id: b.id, key_id: b.key_id, image_sha256: b.image_sha256, plaintext: None, created: false };
    Ok((setup, product))
}

/// Fetch a whole image with `ImageService.GetImage`.
async fn fetch_image(channel: Channel, sha256: &str) -> Result<Vec<u8>> {
    let mut client = ImageServiceClient::new(channel);
    let mut stream = client
        .get_image(pb::GetImageRequest { image_sha256: sha256.to_string(), offset: 0 })
        .await
        .rpc(&format!("fetching image {sha256}"))?;
    let mut size = None;
    let mut bytes = Vec::new();
    while let Some(item) =
        stream.message().await.map_err(|s| anyhow!("fetching image {sha256}: {}", status_text(&s)))?
    {
        match item.item {
            Some(pb::get_image_response::Item::Info(info)) => size = Some(info.size),
            Some(pb::get_image_response::Item::Chunk(chunk)) => bytes.extend_from_slice(&chunk),
            None => {}
        }
    }
    match size {
        Some(n) if n == bytes.len() as u64 => Ok(bytes),
        Some(n) => bail!("fetching image {sha256}: got {} bytes, the image has {n}", bytes.len()),
        None => bail!("fetching image {sha256}: no ImageInfo in the stream"),
    }
}

/// Open every sample's licence with its chip key; when the image is known, check that the key and
/// nonce recovered authenticate its header and every area (AES-GCM), and, when the `plaintext` packed
/// is known, that the image is one area decrypting to it.
fn verify_samples(
    samples: &[Sample],
    product: &[u8; 8],
    image: Option<&[u8]>,
    plaintext: Option<&[u8]>,
) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let check = || -> Result<(), String> {
            let licence = Licence::parse(&s.licence).map_err(|e| e.to_string())?;
            let (key, nonce) = open_licence(&licence, &s.chip_key, product).map_err(|e| format!("open: {e}"))?;
            let Some(image) = image else { return Ok(()) };
            let opts = ReaderOptions { file_len: Some(image.len() as u64), memory_map: None };
            let mut reader = ImageReader::new(std::io::Cursor::new(image), opts).map_err(|e| format!("image: {e}"))?;
            sfi::verify_header(&key, &nonce, reader.header()).map_err(|e| format!("image header: {e}"))?;
            let mut areas = Vec::new();
            while let Some(area) = reader.next_area().map_err(|e| format!("image area {}: {e}", areas.len()))? {
                let plain =
                    area.into_plaintext(&key, &nonce).map_err(|e| format!("image area {}: {e}", areas.len()))?;
                areas.push(plain);
            }
            if areas.is_empty() {
                return Err("image has no area".into());
            }
            if let Some(plaintext) = plaintext
                && (areas.len() != 1 || areas[0] != plaintext)
            {
                return Err("image areas decrypt to other bytes than were packed".into());
            }
            Ok(())
        };
        if let Err(e) = check() {
            failures.push(format!("sample {i}: {e}"));
        }
    }
    failures
}

// ---------------------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------------------

/// A bench set up on the broker: the vendor CA of its chips, the station certificates it uses and the
/// batch it created.
pub(super) struct Bench {
    ca: Arc<VendorCa>,
    product: [u8; 8],
    used: Vec<StationCert>,
    setup: Setup,
    admin: AdminServiceClient<Channel>,
}

impl Bench {
    /// Loads the vendor CA and station certificates of `args` and creates the bench batch as the admin.
    pub(super) async fn open(args: &LicenceBenchArgs) -> Result<Bench> {
        if args.duration.is_zero() {
            bail!("--duration must be longer than 0");
        }
        let family = Family::Stm32L4;
        let product = family.profile().product_id;
        let server_name = args.server_name.as_deref();
        let ca = Arc::new(
            flashgate_sim::load_vendor_ca(&args.vendor_ca_key)
                .with_context(|| format!("loading the vendor CA key {}", args.vendor_ca_key.display()))?,
        );
        let certs = station_certs(&args.pki, args.site.as_deref())?;
        let used: Vec<StationCert> = certs.into_iter().take(args.stations as usize).collect();
        let sites: Vec<String> = used.iter().map(|c| c.site.clone()).collect::<BTreeSet<_>>().into_iter().collect();

        // Setup as the admin.
        let admin_files = client::admin_files(&args.pki, &args.admin)?;
        let admin_channel = client::channel(&args.broker, &admin_files, server_name).await?;
        let mut admin = AdminServiceClient::new(admin_channel);
        let (setup, product) = match &args.batch {
            Some(id) => {
                let (setup, product) = existing(&mut admin, id).await?;
                eprintln!(
                    "existing batch {} (image {}, key {}, product {}); stations of {}",
                    setup.batch_id,
                    setup.image_sha256,
                    setup.key_id,
                    String::from_utf8_lossy(&product),
                    sites.join(", ")
                );
                (setup, product)
            }
            None => {
                let setup = setup(&mut admin, family, sites.clone(), args.quota).await?;
                eprintln!(
                    "bench batch {} (image {}, key {}) open to {}",
                    setup.batch_id,
                    setup.image_sha256,
                    setup.key_id,
                    sites.join(", ")
                );
                (setup, product)
            }
        };
        Ok(Bench { ca, product, used, setup, admin })
    }

    /// Station certificates in use.
    pub(super) fn certificates(&self) -> usize {
        self.used.len()
    }

    /// Best effort: leaves no open bench batch behind (an existing batch, `--batch`, stays as it was).
    pub(super) async fn close(mut self) {
        if !self.setup.created {
            return;
        }
        let id = self.setup.batch_id.clone();
        if let Err(e) = self
            .admin
            .set_batch_state(pb::SetBatchStateRequest { id: id.clone(), state: pb::BatchState::Closed as i32 })
            .await
            .rpc(&format!("closing bench batch {id}"))
        {
            eprintln!("warning: {}", crate::output::error_text(&e));
        }
    }

    /// One mutual-TLS connection per virtual station (certificates shared round-robin).
    pub(super) async fn connect_stations(&self, args: &LicenceBenchArgs) -> Result<Vec<Channel>> {
        let server_name = args.server_name.as_deref();
        let mut configs = Vec::with_capacity(self.used.len());
        for c in &self.used {
            let tls = transport::client_config(&c.files)
                .with_context(|| format!("loading the TLS files of station {}", c.identity.to_uri()))?;
            configs.push((tls, c));
        }
        let mut channels = Vec::with_capacity(args.stations as usize);
        for i in 0..args.stations as usize {
            let (tls, c) = &configs[i % configs.len()];
            let ch = transport::connect(&args.broker, tls.clone(), server_name).await.with_context(|| {
                format!("virtual station {i} ({}) connecting to broker {}", c.identity.to_uri(), args.broker)
            })?;
            channels.push(ch);
        }
        Ok(channels)
    }

    /// One measured window: fresh chips, `args.warmup` then `args.duration` of requests from every
    /// station over `channels`, and the broker's CPU time over the measured part (with `--broker-pid`).
    pub(super) async fn run_phase(&self, args: &LicenceBenchArgs, channels: &[Channel]) -> Result<Phase> {
        // Chips first: connections opened before a long generation would sit idle and go stale (HTTP/2
        // keep-alive keeps them up meanwhile).
        let chip_count = args.chips.unwrap_or_else(|| default_chip_count(args.warmup, args.duration));
        eprintln!("generating {chip_count} simulated chips…");
        let t = Instant::now();
        let chips = pregenerate(self.ca.clone(), self.product, chip_count).await?;
        eprintln!("generated {} chips in {:.1} s", chips.len(), t.elapsed().as_secs_f64());

        let per_station = args.verify.div_ceil(args.stations as usize);
        let start = Instant::now();
        let interval = (args.rate > 0.0).then(|| Duration::from_secs_f64(f64::from(args.stations) / args.rate));
        let clock =
            Clock { start, warmup_end: start + args.warmup, end: start + args.warmup + args.duration, interval };
        let shared = Arc::new(Shared {
            batch_id: self.setup.batch_id.clone(),
            key_id: self.setup.key_id.clone(),
            product: self.product,
            ca: self.ca.clone(),
            pool: ChipPool { chips, next: AtomicUsize::new(0) },
            clock,
            sample_every: 50,
            sample_max: per_station,
            stations: args.stations,
        });
        eprintln!(
            "running {} virtual stations ({} certificates) for {} after {} warm-up…",
            args.stations,
            self.used.len(),
            humantime::format_duration(args.duration),
            humantime::format_duration(args.warmup)
        );
        // The broker's CPU time at the start and the end of the measured window.
        let cpu = args.broker_pid.map(|pid| {
            tokio::spawn(async move {
                tokio::time::sleep_until(clock.warmup_end.into()).await;
                let before = bench_proc::process_cpu(pid)?;
                tokio::time::sleep_until(clock.end.into()).await;
                let after = bench_proc::process_cpu(pid)?;
                Ok::<_, anyhow::Error>(after.since(&before))
            })
        });
        let mut tasks = tokio::task::JoinSet::new();
        for (i, ch) in channels.iter().enumerate() {
            tasks.spawn(station_loop(i as u32, ch.clone(), shared.clone()));
        }
        let mut stats = StationStats::default();
        while let Some(done) = tasks.join_next().await {
            stats.merge(done.context("a virtual station task failed")?);
        }
        let broker_cpu = match cpu {
            Some(task) => Some(task.await.context("the broker CPU sampler failed")??),
            None => None,
        };
        let latency = Latency::of(&mut stats.latencies_us);
        Ok(Phase { pregenerated: shared.pool.chips.len() as u64, broker_cpu, latency, stats })
    }
}

/// What one measured window gave.
pub(super) struct Phase {
    stats: StationStats,
    /// Chips generated before the clock started.
    pregenerated: u64,
    /// The broker's CPU time (utime and stime of `--broker-pid`) over the measured window.
    pub(super) broker_cpu: Option<bench_proc::Cpu>,
    /// Latency of the successful requests.
    pub(super) latency: Latency,
}

impl Phase {
    /// Licences issued within the measured window.
    pub(super) fn ok(&self) -> u64 {
        self.stats.ok
    }

    /// Failed requests within the measured window.
    pub(super) fn errors(&self) -> u64 {
        self.stats.errors.values().sum()
    }

    /// Failed requests by reason, with one example each.
    pub(super) fn error_reasons(&self) -> impl Iterator<Item = (&String, &u64, Option<&String>)> {
        self.stats.errors.iter().map(|(r, n)| (r, n, self.stats.examples.get(r)))
    }

    /// The broker's CPU time per licence issued in the window.
    pub(super) fn cpu_per_licence(&self) -> Option<Duration> {
        let cpu = self.broker_cpu?.total();
        (self.stats.ok > 0).then(|| cpu.div_f64(self.stats.ok as f64))
    }

    /// Fails when too many requests failed or none completed.
    pub(super) fn check(&self, what: &str) -> Result<()> {
        let errors = self.errors();
        if self.stats.ok + errors == 0 {
            bail!("{what}: no request completed within the measured window");
        }
        let err_rate = error_rate(self.stats.ok, errors);
        if err_rate > MAX_ERROR_RATE {
            bail!(
                "{what}: {errors} of {} requests failed ({:.2}%, more than {:.0}% allowed)",
                self.stats.ok + errors,
                100.0 * err_rate,
                100.0 * MAX_ERROR_RATE
            );
        }
        Ok(())
    }

    /// Warns when the pre-generated chips ran out.
    pub(super) fn note_chips(&self) {
        if self.stats.chips_generated > 0 {
            eprintln!(
                "note: the {} pre-generated chips ran out; {} more were generated during the run \
                 (outside the latency, but on the same CPUs): raise --chips",
                self.pregenerated, self.stats.chips_generated
            );
        }
    }
}

/// Run `flashgate bench licences`.
pub async fn run(args: LicenceBenchArgs) -> Result<()> {
    let bench = Bench::open(&args).await?;
    let outcome = measure(&args, &bench).await;
    bench.close().await;
    outcome
}

async fn measure(args: &LicenceBenchArgs, bench: &Bench) -> Result<()> {
    let channels = bench.connect_stations(args).await?;
    let image_channel = channels.first().cloned();
    let mut phase = bench.run_phase(args, &channels).await?;
    let floor = if args.crypto_floor {
        eprintln!("measuring the crypto floor: openssl {} ecdsap256…", bench_proc::OPENSSL_SPEED.join(" "));
        Some(bench_proc::CryptoFloor::measure()?.0)
    } else {
        None
    };

    // Correctness check on a sample, with the image when the broker serves it.
    let setup = &bench.setup;
    let product = bench.product;
    let samples: Vec<Sample> = phase.stats.samples.drain(..).take(args.verify).collect();
    let mut image_note = None;
    let image = match (&image_channel, samples.is_empty()) {
        (Some(ch), false) => match fetch_image(ch.clone(), &setup.image_sha256).await {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                image_note = Some(format!("image not checked: {}", crate::output::error_text(&e)));
                None
            }
        },
        _ => None,
    };
    let failures = verify_samples(&samples, &product, image.as_deref(), setup.plaintext.as_deref());

    let stats = &phase.stats;
    let errors = phase.errors();
    let latency = phase.latency;
    let rate = stats.ok as f64 / args.duration.as_secs_f64();
    let err_rate = error_rate(stats.ok, errors);
    let cpu_per_licence = phase.cpu_per_licence();
    if args.json {
        let report = json!({
            "broker": args.broker,
            "batch_id": setup.batch_id,
            "existing_batch": !setup.created,
            "image_sha256": setup.image_sha256,
            "key_id": setup.key_id,
            "stations": args.stations,
            "certificates": bench.certificates(),
            "duration_s": args.duration.as_secs_f64(),
            "warmup_s": args.warmup.as_secs_f64(),
            "licences": stats.ok,
            "licences_per_s": rate,
            "offered_rate": if args.rate > 0.0 { Some(args.rate) } else { None },
            "errors": stats.errors,
            "error_count": errors,
            "error_rate": err_rate,
            "error_examples": stats.examples,
            "latency_us": {
                "p50": latency.p50, "p99": latency.p99, "p999": latency.p999, "max": latency.max, "mean": latency.mean,
            },
            "reissued": stats.reissued,
            "unmeasured_requests": stats.unmeasured,
            "chips_pregenerated": phase.pregenerated,
            "chips_generated_during_run": stats.chips_generated,
            "verified": samples.len() - failures.len(),
            "verify_failures": failures,
            "image_checked": image.is_some(),
            "broker_cpu_s": phase.broker_cpu.map(|c| c.total().as_secs_f64()),
            "broker_cpu_user_s": phase.broker_cpu.map(|c| c.user.as_secs_f64()),
            "broker_cpu_system_s": phase.broker_cpu.map(|c| c.system.as_secs_f64()),
            "broker_cpu_per_licence_us": cpu_per_licence.map(|d| d.as_secs_f64() * 1e6),
            "crypto_floor_us": floor.map(|f| f.per_licence().as_secs_f64() * 1e6),
        });
        println!("{report}");
    } else {
        print!("{}", report_text(args, bench.certificates(), stats, rate, errors, &latency));
        let image_part = match (&image, &setup.plaintext) {
            (None, _) => "",
            (Some(_), Some(_)) => " and unlock the image",
            (Some(_), None) => " and unlock the batch's image (every area authenticates and decrypts)",
        };
        if samples.is_empty() {
            println!("verified      - (no licence sampled)");
        } else {
            println!(
                "verified      {} of {} sampled licences open for their chips{image_part}",
                samples.len() - failures.len(),
                samples.len()
            );
        }
        if let Some(note) = &image_note {
            println!("              ({note})");
        }
        for f in &failures {
            println!("  FAILED {f}");
        }
        if let (Some(cpu), Some(pid)) = (phase.broker_cpu, args.broker_pid) {
            println!(
                "broker CPU    {:.2} s over the measured window: user {:.2} s + system {:.2} s (utime + stime of \
                 pid {pid}, all threads, from /proc/{pid}/stat)",
                cpu.total().as_secs_f64(),
                cpu.user.as_secs_f64(),
                cpu.system.as_secs_f64()
            );
            if let Some(per) = cpu_per_licence {
                let n = stats.ok.max(1) as f64;
                println!(
                    "CPU/licence   {:.0} µs (user {:.0} + system {:.0})",
                    per.as_secs_f64() * 1e6,
                    cpu.user.as_secs_f64() * 1e6 / n,
                    cpu.system.as_secs_f64() * 1e6 / n
                );
            }
        }
        if let (Some(f), Some(per)) = (floor, cpu_per_licence) {
            let floor_us = f.per_licence().as_secs_f64() * 1e6;
            println!(
                "crypto floor  {floor_us:.0} µs = keygen {:.1} (ECDSA sign as proxy) + verify {:.1} + ECDH {:.1} µs \
                 (openssl speed, same run)",
                1e6 / f.sign_per_s,
                1e6 / f.verify_per_s,
                1e6 / f.ecdh_per_s
            );
            println!("ratio         {:.2}x the crypto floor (target ≤ 2x)", per.as_secs_f64() * 1e6 / floor_us);
        }
    }
    phase.note_chips();
    phase.check("licence bench")?;
    if !failures.is_empty() {
        bail!("{} of {} sampled licences failed the check: {}", failures.len(), samples.len(), failures[0]);
    }
    Ok(())
}

fn report_text(
    args: &LicenceBenchArgs,
    certificates: usize,
    stats: &StationStats,
    rate: f64,
    errors: u64,
    latency: &Latency,
) -> String {
    let mode =
        if args.rate > 0.0 { format!("open loop at {:.0} requests/s", args.rate) } else { "closed loop".to_owned() };
    let mut out = format!(
        "licence bench: {} virtual stations ({certificates} certificates), {mode}, {} measured after {} warm-up\n",
        args.stations,
        humantime::format_duration(args.duration),
        humantime::format_duration(args.warmup)
    );
    out += &format!("licences/s    {rate:.1}\n");
    out += &format!("total         {}\n", stats.ok);
    out += &format!("errors        {errors} ({:.2}%)\n", 100.0 * error_rate(stats.ok, errors));
    if !stats.errors.is_empty() {
        let mut t = crate::output::Table::new(["  reason", "count", "example"]).right(&[1]);
        for (reason, n) in &stats.errors {
            t.row([format!("  {reason}"), n.to_string(), stats.examples.get(reason).cloned().unwrap_or_default()]);
        }
        out += &t.render();
    }
    if stats.ok == 0 {
        out += "latency       - (no licence issued)\n";
    } else {
        out += &format!(
            "latency       p50 {}  p99 {}  p99.9 {}  max {}  mean {} (successful requests)\n",
            fmt_us(latency.p50),
            fmt_us(latency.p99),
            fmt_us(latency.p999),
            fmt_us(latency.max),
            fmt_us(latency.mean.round() as u32)
        );
    }
    if stats.reissued > 0 {
        out += &format!("reissued      {} (fresh chips should never be reissued)\n", stats.reissued);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 500);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&v, 0.999), 999);
        assert_eq!(percentile(&v, 1.0), 1000);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[7], 0.999), 7);
        let mut w = vec![30, 10, 20, 40];
        let l = Latency::of(&mut w);
        assert_eq!(w, [10, 20, 30, 40]);
        assert_eq!((l.p50, l.p99, l.p999, l.max), (20, 40, 40, 40));
        assert!((l.mean - 25.0).abs() < 1e-9);
        assert_eq!(Latency::of(&mut []), Latency::default());
    }

    #[test]
    fn rates_and_formats() {
        assert_eq!(error_rate(0, 0), 0.0);
        assert!((error_rate(99, 1) - 0.01).abs() < 1e-12);
        assert!(error_rate(98, 2) > MAX_ERROR_RATE);
        assert!(error_rate(990, 10) <= MAX_ERROR_RATE);
        assert_eq!(fmt_us(250), "0.250 ms");
        assert_eq!(fmt_us(12_345), "12.3 ms");
        assert_eq!(fmt_us(2_500_000), "2.50 s");
        assert_eq!(default_chip_count(Duration::from_secs(2), Duration::from_secs(30)), 96_000);
        assert_eq!(default_chip_count(Duration::ZERO, Duration::from_secs(3600)), MAX_DEFAULT_CHIPS);
    }

    #[test]
    fn stats_merge() {
        let mut a = StationStats { ok: 2, latencies_us: vec![1, 2], ..Default::default() };
        a.error("QUOTA_EXHAUSTED".into(), "first".into());
        let mut b = StationStats { ok: 1, latencies_us: vec![3], ..Default::default() };
        b.error("QUOTA_EXHAUSTED".into(), "second".into());
        b.error("Unavailable".into(), "down".into());
        a.merge(b);
        assert_eq!(a.ok, 3);
        assert_eq!(a.latencies_us, [1, 2, 3]);
        assert_eq!(json!(a.errors), json!({"QUOTA_EXHAUSTED": 2, "Unavailable": 1}));
        assert_eq!(a.examples["QUOTA_EXHAUSTED"], "first");
    }

    #[test]
    fn responses_and_samples_are_checked() {
        let mut rng = StdRng::seed_from_u64(7);
        let ca = VendorCa::generate(&mut rng);
        let product = *b"46201002";
        let chip = Chip::generate(&ca, product, &mut rng);
        let key = sfi::FirmwareKey::new([9; 16]);
        let nonce = sfi::ImageNonce([4; 12]);
        let key_id = flashgate_common::licence::KeyId([1; 16]);
        let issuer = flashgate_common::licence::SoftIssuer::new(key_id, key.clone(), nonce);
        let cert = flashgate_common::cert::ChipCertificate::parse(&chip.cert).unwrap();
        let licence = issuer.issue(&cert, &mut rng).unwrap().to_bytes().to_vec();
        let response = pb::IssueLicenceResponse {
            licence: licence.clone(),
            key_id: key_id.to_string(),
            device_id: chip.device_id.clone(),
            ..Default::default()
        };
        assert_eq!(check_response(&response, &chip, &key_id.to_string()), Ok(()));
        let wrong = pb::IssueLicenceResponse { device_id: "00".into(), ..response.clone() };
        assert!(check_response(&wrong, &chip, &key_id.to_string()).unwrap_err().contains("device id"));
        let short = pb::IssueLicenceResponse { licence: vec![0; 10], ..response };
        assert!(check_response(&short, &chip, &key_id.to_string()).unwrap_err().contains("10 bytes"));

        let plaintext = image_plaintext();
        let area = sfi::PlainArea { area_type: sfi::AreaType::Firmware, address: 0x0800_0000, data: plaintext.clone() };
        let mut image = Vec::new();
        sfi::write_image(&key, &nonce, &[area], &mut image).unwrap();
        let good = Sample { chip_key: chip.key.clone(), licence: licence.clone() };
        let good = std::slice::from_ref(&good);
        assert!(verify_samples(good, &product, Some(&image), Some(&plaintext)).is_empty());
        assert!(verify_samples(good, &product, None, Some(&plaintext)).is_empty());
        // An existing batch (`--batch`): the plaintext is unknown, every area must still authenticate.
        assert!(verify_samples(good, &product, Some(&image), None).is_empty());
        let other_plain = vec![0u8; plaintext.len()];
        let failures = verify_samples(good, &product, Some(&image), Some(&other_plain));
        assert!(failures[0].contains("other bytes"), "{failures:?}");
        let mut tampered = image.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let failures = verify_samples(good, &product, Some(&tampered), None);
        assert!(failures[0].contains("image"), "{failures:?}");
        let other = Chip::generate(&ca, product, &mut rng);
        let bad = Sample { chip_key: other.key, licence };
        let failures = verify_samples(&[good[0].clone(), bad], &product, Some(&image), None);
        assert_eq!(failures.len(), 1);
        assert!(failures[0].starts_with("sample 1: open"), "{failures:?}");
    }
}
