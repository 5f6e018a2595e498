//! `flashgate bench flood`: licence latency with and without a connection flood from one source
//! address, in one run. The same virtual stations (see `bench licences`, whose arguments it takes) run a
//! measured window without a flood, then the flood starts and, once it has settled, a second window is
//! measured while it is kept up, then a third once the flood has stopped (it brackets the flooded window
//! against drift from other work on the machine); the report gives p50/p99 of every window and the
//! flooded window's ratios to the other two.
//!
//! The flood ([`Flood`]) runs on its own thread and runtime, so its tasks never delay the stations'
//! ones (they still share the machine's cores): `--idle` TCP connections that never send a byte and
//! `--stalled` ones that send the first 27 bytes of a ClientHello and then nothing, all bound to
//! `--source` (any 127.0.0.0/8 address reaches the loopback). Every socket the broker closes — shed
//! because its source is at its cap of pending handshakes, or dropped at the first-byte or handshake
//! deadline — is reconnected at once, so the flood keeps offering its full count for as long as it
//! runs (`--connect-rate` caps its connects per second instead). It counts connects, closes by the broker and connect failures, samples how many of its
//! sockets are open, and reports its own CPU time. The open-file limit is raised to fit.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::{Semaphore, watch};
use tonic::codegen::http::Uri;

use super::bench_licences::{Bench, LicenceBenchArgs, Phase, fmt_us};
use super::bench_proc;

/// The first bytes of a TLS ClientHello: a handshake record announcing 512 bytes, the handshake header
/// announcing 508, the legacy version and 16 of the 32 random bytes. A server waits for the rest.
pub const PARTIAL_CLIENT_HELLO: [u8; 27] = [
    0x16, 0x03, 0x01, 0x02, 0x00, // record: handshake, TLS 1.0 legacy version, 512 bytes
    0x01, 0x00, 0x01, 0xfc, // ClientHello, 508 bytes
    0x03, 0x03, // legacy_version TLS 1.2
    0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
];
/// A flood connect that has not completed after this long is abandoned and tried again (a full accept
/// queue makes the kernel drop SYNs, which are retried only after seconds).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause of a flood slot after a failed connect.
const CONNECT_BACKOFF: Duration = Duration::from_millis(50);
/// Pause between the end of the flood and the window after it: longer than the broker's default
/// handshake deadline, so nothing of the flood is left.
const AFTER_PAUSE: Duration = Duration::from_secs(6);
/// Descriptors kept free for the stations, the admin channel and the runtime.
const FD_HEADROOM: u64 = 512;

/// Arguments of `flashgate bench flood`.
#[derive(Debug, Args)]
pub struct FloodBenchArgs {
    /// Idle TCP connections in the flood (connect, then never send a byte).
    #[arg(long, default_value_t = 5000)]
    pub idle: u32,
    /// Stalled TLS handshakes in the flood (connect, send a partial ClientHello, then nothing).
    #[arg(long, default_value_t = 500)]
    pub stalled: u32,
    /// Source address of every flood connection (127.0.0.0/8 routes to the loopback).
    #[arg(long, default_value = "127.0.0.2")]
    pub source: IpAddr,
    /// Most connects per second the flood makes, all sockets together (0: reconnect each socket as soon
    /// as the broker closes it, as fast as this machine allows).
    #[arg(long, default_value_t = 0)]
    pub connect_rate: u32,
    /// How long the flood runs before its measured window starts (the window's own --warmup follows).
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// The licence load: the same arguments as `bench licences`.
    #[command(flatten)]
    pub load: LicenceBenchArgs,
}

/// What the flood did, counted as it runs.
#[derive(Debug, Default)]
struct FloodCounters {
    connects: AtomicU64,
    connect_failures: AtomicU64,
    closed_by_broker: AtomicU64,
    open: AtomicI64,
}

/// A snapshot of [`FloodCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloodCounts {
    /// Connections established.
    pub connects: u64,
    /// Connects that failed or timed out.
    pub connect_failures: u64,
    /// Connections the broker closed (shed or dropped at a deadline).
    pub closed_by_broker: u64,
}

impl FloodCounts {
    /// The counts since `earlier`.
    pub fn since(&self, earlier: &FloodCounts) -> FloodCounts {
        FloodCounts {
            connects: self.connects.saturating_sub(earlier.connects),
            connect_failures: self.connect_failures.saturating_sub(earlier.connect_failures),
            closed_by_broker: self.closed_by_broker.saturating_sub(earlier.closed_by_broker),
        }
    }
}

impl FloodCounters {
    fn snapshot(&self) -> FloodCounts {
        FloodCounts {
            connects: self.connects.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
            closed_by_broker: self.closed_by_broker.load(Ordering::Relaxed),
        }
    }
}

/// A running flood; [`Flood::stop`] ends it.
struct Flood {
    counters: Arc<FloodCounters>,
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<Result<Duration>>,
}

impl Flood {
    /// Starts `idle` + `stalled` connections from `source` to `target` on a thread of its own.
    fn start(target: SocketAddr, source: IpAddr, idle: u32, stalled: u32, connect_rate: u32) -> Result<Flood> {
        let counters = Arc::new(FloodCounters::default());
        let (stop, stopped) = watch::channel(false);
        let c = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name("bench-flood".into())
            .spawn(move || -> Result<Duration> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the flood's runtime")?;
                let cpu0 = thread_cpu()?;
                rt.block_on(async move {
                    let pacer = (connect_rate > 0).then(|| Arc::new(Semaphore::new(0)));
                    let mut slots = tokio::task::JoinSet::new();
                    if let Some(p) = &pacer {
                        slots.spawn(pace(Arc::clone(p), connect_rate, stopped.clone()));
                    }
                    for i in 0..idle + stalled {
                        let (c, stop, pacer) = (Arc::clone(&c), stopped.clone(), pacer.clone());
                        slots.spawn(slot(target, source, i >= idle, c, pacer, stop));
                    }
                    while slots.join_next().await.is_some() {}
                });
                Ok(thread_cpu()?.saturating_sub(cpu0))
            })
            .context("starting the flood thread")?;
        Ok(Flood { counters, stop, thread })
    }

    /// Stops every slot and returns the flood thread's CPU time.
    fn stop(self) -> Result<Duration> {
        let _ = self.stop.send(true);
        self.thread.join().map_err(|_| anyhow!("the flood thread panicked"))?
    }
}

/// CPU time of the calling thread (getrusage RUSAGE_THREAD).
fn thread_cpu() -> Result<Duration> {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_THREAD).context("getrusage(RUSAGE_THREAD)")?;
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
    };
    Ok(tv(u.user_time()) + tv(u.system_time()))
}

/// Adds `rate` connect permits per second to `permits` (at most a tenth of a second's worth banked),
/// until `stop`.
async fn pace(permits: Arc<Semaphore>, rate: u32, mut stop: watch::Receiver<bool>) {
    let per_tick = (rate as usize).div_ceil(100);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(per_tick as f64 / f64::from(rate)));
    let bank = (rate as usize / 10).max(per_tick);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let room = bank.saturating_sub(permits.available_permits());
                permits.add_permits(per_tick.min(room));
            }
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    permits.close();
}

/// One flood connection, reconnected whenever the broker closes it (after a permit of `pacer`, when
/// given), until `stop`.
async fn slot(
    target: SocketAddr,
    source: IpAddr,
    stalled: bool,
    c: Arc<FloodCounters>,
    pacer: Option<Arc<Semaphore>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = [0u8; 64];
    loop {
        if *stop.borrow() {
            break;
        }
        if let Some(p) = &pacer {
            match p.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => break,
            }
        }
        let connect = async {
            let socket = if source.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(source, 0))?;
            socket.connect(target).await
        };
        let connected = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect) => r.ok().and_then(Result::ok),
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some(mut tcp) = connected else {
            c.connect_failures.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(CONNECT_BACKOFF).await;
            continue;
        };
        c.connects.fetch_add(1, Ordering::Relaxed);
        c.open.fetch_add(1, Ordering::Relaxed);
        if stalled {
            let _ = tcp.write_all(&PARTIAL_CLIENT_HELLO).await;
        }
        // The broker never answers these; a read ends when it closes the connection.
        tokio::select! {
            _ = tcp.read(&mut buf) => {
                c.closed_by_broker.fetch_add(1, Ordering::Relaxed);
            }
            _ = stop.wait_for(|s| *s) => {}
        }
        c.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The broker's address from its `https://host:port` URL.
async fn broker_addr(url: &str) -> Result<SocketAddr> {
    let uri: Uri = url.parse().with_context(|| format!("broker URL {url:?}"))?;
    let authority = uri.authority().ok_or_else(|| anyhow!("broker URL {url:?} has no host"))?;
    let hostport =
        if authority.port().is_some() { authority.as_str().to_owned() } else { format!("{}:443", authority.host()) };
    tokio::net::lookup_host(&hostport)
        .await
        .with_context(|| format!("resolving {hostport}"))?
        .next()
        .ok_or_else(|| anyhow!("{hostport} resolves to no address"))
}

/// Samples the flood's open-socket gauge every 100 ms until `stop`: (min, mean, max).
async fn sample_open(c: Arc<FloodCounters>, mut stop: watch::Receiver<bool>) -> (i64, f64, i64) {
    let (mut min, mut max, mut sum, mut n) = (i64::MAX, i64::MIN, 0i64, 0i64);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let v = c.open.load(Ordering::Relaxed);
                min = min.min(v);
                max = max.max(v);
                sum += v;
                n += 1;
            }
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    if n == 0 { (0, 0.0, 0) } else { (min, sum as f64 / n as f64, max) }
}

/// What the flood did during the flooded window.
struct FloodWindow {
    counts: FloodCounts,
    elapsed: Duration,
    open: (i64, f64, i64),
}

/// Run `flashgate bench flood`.
pub async fn run(args: FloodBenchArgs) -> Result<()> {
    if args.load.json || args.load.crypto_floor {
        bail!("bench flood prints its text report only (no --json, no --crypto-floor)");
    }
    let flood_sockets = u64::from(args.idle) + u64::from(args.stalled);
    let limit = bench_proc::raise_fd_limit(flood_sockets + u64::from(args.load.stations) + FD_HEADROOM)?;
    eprintln!("open-file limit (RLIMIT_NOFILE) {limit}");
    let target = broker_addr(&args.load.broker).await?;
    let bench = Bench::open(&args.load).await?;
    let outcome = measure(&args, &bench, target).await;
    bench.close().await;
    outcome
}

async fn measure(args: &FloodBenchArgs, bench: &Bench, target: SocketAddr) -> Result<()> {
    let load = &args.load;
    let channels = bench.connect_stations(load).await?;

    eprintln!("window 1: no flood");
    let quiet = bench.run_phase(load, &channels).await?;

    eprintln!(
        "starting the flood: {} idle + {} stalled-handshake connections from {} to {target}, settling for {}",
        args.idle,
        args.stalled,
        args.source,
        humantime::format_duration(args.settle)
    );
    let flood = Flood::start(target, args.source, args.idle, args.stalled, args.connect_rate)?;
    tokio::time::sleep(args.settle).await;
    eprintln!("window 2: under the flood");
    let (stop_sampler, sampler_stop) = watch::channel(false);
    let sampler = tokio::spawn(sample_open(Arc::clone(&flood.counters), sampler_stop));
    let before = flood.counters.snapshot();
    let t = Instant::now();
    let flooded = bench.run_phase(load, &channels).await;
    let counts = flood.counters.snapshot().since(&before);
    let elapsed = t.elapsed();
    let _ = stop_sampler.send(true);
    let open = sampler.await.context("the flood sampler failed")?;
    let total = flood.counters.snapshot();
    let flood_cpu = flood.stop()?;
    let flooded = flooded?;
    let window = FloodWindow { counts, elapsed, open };
    // A last window without the flood, once the broker has dropped what was left of it (its handshake
    // deadline), shows how much the machine's background moved between the first two.
    tokio::time::sleep(AFTER_PAUSE).await;
    eprintln!("window 3: no flood, after it");
    let after = bench.run_phase(load, &channels).await?;

    print!("{}", report(args, bench.certificates(), [&quiet, &flooded, &after], &window, total, flood_cpu));
    for p in [&quiet, &flooded, &after] {
        p.note_chips();
    }
    quiet.check("window without flood")?;
    flooded.check("window under the flood")?;
    after.check("window after the flood")?;
    if window.counts.connects == 0 {
        bail!("the flood made no connection during its window: nothing was measured under a flood");
    }
    Ok(())
}

fn ratio(a: u32, b: u32) -> String {
    if b == 0 { "-".into() } else { format!("{:.2}x", f64::from(a) / f64::from(b)) }
}

fn report(
    args: &FloodBenchArgs,
    certificates: usize,
    [quiet, flooded, after]: [&Phase; 3],
    w: &FloodWindow,
    total: FloodCounts,
    flood_cpu: Duration,
) -> String {
    let load = &args.load;
    let mode = if load.rate > 0.0 { format!("open loop at {:.0} requests/s", load.rate) } else { "closed loop".into() };
    let mut out = format!(
        "licence latency with and without a flood: {} virtual stations ({certificates} certificates), {mode}, \
         each window {} measured after {} warm-up\n\n",
        load.stations,
        humantime::format_duration(load.duration),
        humantime::format_duration(load.warmup)
    );
    out += "| window | licences/s | p50 | p99 | p99.9 | max | errors | broker CPU/licence |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for (name, p) in [("1. no flood", quiet), ("2. under the flood", flooded), ("3. no flood, after it", after)] {
        let cpu = p.cpu_per_licence().map_or_else(|| "-".into(), |d| format!("{:.0} µs", d.as_secs_f64() * 1e6));
        out += &format!(
            "| {name} | {:.1} | {} | {} | {} | {} | {} | {cpu} |\n",
            p.ok() as f64 / load.duration.as_secs_f64(),
            fmt_us(p.latency.p50),
            fmt_us(p.latency.p99),
            fmt_us(p.latency.p999),
            fmt_us(p.latency.max),
            p.errors()
        );
    }
    out += "\n";
    out += &format!(
        "p99 under the flood / p99 without (window 2 / window 1): {} (target ≤ 2x); p50: {}\n",
        ratio(flooded.latency.p99, quiet.latency.p99),
        ratio(flooded.latency.p50, quiet.latency.p50)
    );
    out += &format!(
        "against the window after the flood (2 / 3): p99 {}, p50 {}\n",
        ratio(flooded.latency.p99, after.latency.p99),
        ratio(flooded.latency.p50, after.latency.p50)
    );
    for (name, p) in [("window 1", quiet), ("window 2", flooded), ("window 3", after)] {
        for (reason, n, example) in p.error_reasons() {
            out += &format!("errors ({name}): {reason} × {n}: {}\n", example.map_or("", String::as_str));
        }
    }
    let secs = w.elapsed.as_secs_f64().max(1e-9);
    out += &format!(
        "flood: {} idle + {} stalled-handshake connections from {}, each reconnected as soon as the broker closes it{};\n\
         during the flooded window ({:.1} s): {} connects ({:.0}/s), {} closed by the broker ({:.0}/s), {} connect \
         failures or timeouts; flood sockets open (connected, not yet closed by the broker) min {} / mean {:.0} / max {};\n\
         whole flood: {} connects, {} closed by the broker, flood thread CPU {:.2} s\n",
        args.idle,
        args.stalled,
        args.source,
        if args.connect_rate > 0 {
            format!(" (at most {} connects/s in all)", args.connect_rate)
        } else {
            String::new()
        },
        secs,
        w.counts.connects,
        w.counts.connects as f64 / secs,
        w.counts.closed_by_broker,
        w.counts.closed_by_broker as f64 / secs,
        w.counts.connect_failures,
        w.open.0,
        w.open.1,
        w.open.2,
        total.connects,
        total.closed_by_broker,
        flood_cpu.as_secs_f64()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_client_hello_announces_more_than_it_sends() {
        let record_len = usize::from(u16::from_be_bytes([PARTIAL_CLIENT_HELLO[3], PARTIAL_CLIENT_HELLO[4]]));
        assert_eq!(PARTIAL_CLIENT_HELLO[0], 0x16);
        assert!(record_len > PARTIAL_CLIENT_HELLO.len() - 5);
        assert_eq!(PARTIAL_CLIENT_HELLO[5], 0x01);
    }

    #[test]
    fn counts_and_ratios() {
        let a = FloodCounts { connects: 10, connect_failures: 1, closed_by_broker: 8 };
        let b = FloodCounts { connects: 25, connect_failures: 1, closed_by_broker: 20 };
        assert_eq!(b.since(&a), FloodCounts { connects: 15, connect_failures: 0, closed_by_broker: 12 });
        assert_eq!(ratio(300, 200), "1.50x");
        assert_eq!(ratio(1, 0), "-");
    }

    #[tokio::test]
    async fn broker_urls_resolve() {
        assert_eq!(broker_addr("https://127.0.0.1:7443").await.unwrap(), "127.0.0.1:7443".parse().unwrap());
        assert_eq!(broker_addr("https://[::1]:9").await.unwrap(), "[::1]:9".parse().unwrap());
        assert!(broker_addr("no-scheme").await.is_err());
    }
}
