//! `flashgate bench attach-flood`: a separate broker process's resident memory under the "item 3"
//! flood of issue 10 — stations filling their `Attach` streams with probe state — against its idle RSS.
//!
//! Every station certificate of `--pki` (of `--site`, when given) gets one mutual-TLS connection and
//! `--streams` tasks on it that each, in a loop: open `Attach` (more than the broker's cap per station,
//! so some are refused), `Register` with as many probes of 128-byte id, kind and port as fit in the
//! station services' 16 KiB decode limit, then send `DeviceProgress` and `DeviceDone` (1 KiB message)
//! with fresh unique 128-byte probe ids and fat `Heartbeat`s until the broker ends the stream (the
//! distinct-probe cap, a newer `Register` of the same station superseding it), and start again. Every
//! `--oversize-every`-th stream instead sends a `DeviceProgress` with a 4 MiB probe id, the review's
//! original message. Memory comes from `/proc/PID/status` of `--broker-pid`: VmRSS before the flood
//! (idle), VmHWM during it (the peak is reset through `/proc/PID/clear_refs` when the flood starts;
//! without that reset VmHWM counts from the broker's start), VmRSS at its end and after it stopped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use flashgate_proto::transport;
use flashgate_proto::v1 as pb;
use flashgate_proto::v1::station_service_client::StationServiceClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::bench_licences::station_certs;
use super::bench_proc::{self, Memory, fmt_mib};
use super::client::DEFAULT_BROKER;

/// Length of the flood's probe ids, kinds and ports: the broker's limit.
pub const PROBE_FIELD_LEN: usize = 128;
/// Length of a `DeviceDone` message: the broker's limit.
pub const DONE_MESSAGE_LEN: usize = 1024;
/// Probes listed in a flood `Register` / `Heartbeat`: what fits in the 16 KiB decode limit with
/// 128-byte id, kind and port.
pub const LISTED_PROBES: usize = 40;
/// The review's probe id size.
pub const OVERSIZE_PROBE_ID: usize = 4 << 20;
/// Pause of a flood task after its stream was refused or broke.
const REOPEN_BACKOFF: Duration = Duration::from_millis(20);

/// Arguments of `flashgate bench attach-flood`.
#[derive(Debug, Args)]
pub struct AttachFloodArgs {
    /// Broker URL.
    #[arg(long, env = "FLASHGATE_BROKER", default_value = DEFAULT_BROKER, value_name = "URL")]
    pub broker: String,
    /// PKI directory from `flashgate pki init` with station certificates.
    #[arg(long, value_name = "DIR")]
    pub pki: PathBuf,
    /// Use only station certificates of this site.
    #[arg(long, value_name = "NAME")]
    pub site: Option<String>,
    /// Name the broker certificate must carry (default: the host of --broker).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Process id of the broker (a separate process on this machine) whose memory is read.
    #[arg(long, value_name = "PID")]
    pub broker_pid: u32,
    /// Concurrent `Attach` streams attempted per station (the broker admits 4).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub streams: u32,
    /// How long the flood runs.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Every n-th stream sends one `DeviceProgress` with a 4 MiB probe id instead (0: never).
    #[arg(long, default_value_t = 16)]
    pub oversize_every: u64,
}

/// What the flood did.
#[derive(Debug, Default)]
struct Counters {
    streams: AtomicU64,
    messages: AtomicU64,
    bytes: AtomicU64,
    /// How streams ended, by gRPC code (`OK` when the broker closed one cleanly).
    ended: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn ended(&self, how: String) {
        *self.ended.lock().unwrap_or_else(|p| p.into_inner()).entry(how).or_default() += 1;
    }
}

/// A string of exactly `len` bytes: `prefix` padded with `pad`.
fn padded(prefix: &str, pad: char, len: usize) -> String {
    let mut s = String::with_capacity(len);
    s.push_str(&prefix[..prefix.len().min(len)]);
    while s.len() < len {
        s.push(pad);
    }
    s
}

/// The fattest probe list a flood `Register` / `Heartbeat` carries.
fn fat_probes(tag: &str) -> Vec<pb::ProbeInfo> {
    (0..LISTED_PROBES)
        .map(|i| pb::ProbeInfo {
            probe_id: padded(&format!("{tag}-listed-{i}-"), 'l', PROBE_FIELD_LEN),
            kind: padded("kind-", 'k', PROBE_FIELD_LEN),
            port: padded("port-", 't', PROBE_FIELD_LEN),
        })
        .collect()
}

fn agent(msg: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(msg) }
}

/// The `n`-th message after `Register` on a stream: mostly progress and results of new probes, and a
/// heartbeat every 16th.
fn flood_message(tag: &str, n: u64, probes: &[pb::ProbeInfo]) -> pb::AgentMessage {
    let probe_id = padded(&format!("{tag}-{n}-"), 'p', PROBE_FIELD_LEN);
    let device_id = format!("{:032x}", u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    match n % 16 {
        15 => agent(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
            probes: probes.to_vec(),
            current_batch: String::new(),
            devices_ok: n,
            devices_failed: 0,
            running: false,
        })),
        k if k % 2 == 0 => agent(pb::agent_message::Msg::Progress(pb::DeviceProgress {
            probe_id,
            device_id,
            stage: "install".into(),
            done: n,
            total: n + 1,
        })),
        _ => agent(pb::agent_message::Msg::Done(pb::DeviceDone {
            probe_id,
            device_id,
            ok: false,
            message: padded("flood result ", 'm', DONE_MESSAGE_LEN),
        })),
    }
}

/// One flood task on one station's connection: opens streams and fills them until `stop`.
async fn flood_task(
    channel: Channel,
    station: usize,
    task: u32,
    oversize_every: u64,
    c: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let mut client = StationServiceClient::new(channel);
    let probes = fat_probes(&format!("s{station}t{task}"));
    let mut round = 0u64;
    loop {
        if *stop.borrow() {
            break;
        }
        round += 1;
        let opened = c.streams.fetch_add(1, Ordering::Relaxed) + 1;
        let tag = format!("s{station}t{task}r{round}");
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(8);
        let register = agent(pb::agent_message::Msg::Register(pb::Register {
            agent_version: "bench-attach-flood".into(),
            probes: probes.clone(),
            current_batch: String::new(),
        }));
        if tx.send(register).await.is_err() {
            break;
        }
        let response = tokio::select! {
            r = client.attach(ReceiverStream::new(rx)) => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let mut inbound = match response {
            Ok(r) => r.into_inner(),
            Err(status) => {
                c.ended(format!("{:?} (refused at open)", status.code()));
                tokio::time::sleep(REOPEN_BACKOFF).await;
                continue;
            }
        };
        let oversize = oversize_every > 0 && opened.is_multiple_of(oversize_every);
        let mut n = 0u64;
        let how = loop {
            let next = if oversize && n == 0 {
                agent(pb::agent_message::Msg::Progress(pb::DeviceProgress {
                    probe_id: padded(&tag, 'X', OVERSIZE_PROBE_ID),
                    ..Default::default()
                }))
            } else {
                flood_message(&tag, n, &probes)
            };
            let size = prost::Message::encoded_len(&next) as u64;
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(_)) => continue,
                    Ok(None) => break "OK".to_string(),
                    Err(st) => break format!("{:?}", st.code()),
                },
                sent = tx.send(next) => {
                    if sent.is_err() {
                        break "request stream closed".to_string();
                    }
                    n += 1;
                    c.messages.fetch_add(1, Ordering::Relaxed);
                    c.bytes.fetch_add(size, Ordering::Relaxed);
                }
                _ = stop.wait_for(|s| *s) => break "stopped by the bench".to_string(),
            }
        };
        c.ended(how);
        tokio::time::sleep(REOPEN_BACKOFF).await;
    }
}

/// Run `flashgate bench attach-flood`.
pub async fn run(args: AttachFloodArgs) -> Result<()> {
    let pid = args.broker_pid;
    if !bench_proc::process_exists(pid) {
        bail!("no process {pid} (--broker-pid)");
    }
    let certs = station_certs(&args.pki, args.site.as_deref())?;
    let mut channels = Vec::with_capacity(certs.len());
    for c in &certs {
        let tls = transport::client_config(&c.files)
            .with_context(|| format!("loading the TLS files of station {}", c.identity.to_uri()))?;
        let ch = transport::connect(&args.broker, tls, args.server_name.as_deref())
            .await
            .with_context(|| format!("station {} connecting to broker {}", c.identity.to_uri(), args.broker))?;
        channels.push(ch);
    }
    // Idle: the broker with these connections open and nothing else happening.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = bench_proc::process_memory(pid)?;
    let reset = bench_proc::reset_peak_memory(pid);
    if let Err(e) = &reset {
        eprintln!("warning: {e:#}: the peak below is VmHWM since the broker started");
    }

    eprintln!(
        "flooding {} stations × {} Attach streams for {}…",
        certs.len(),
        args.streams,
        humantime::format_duration(args.duration)
    );
    let counters = Arc::new(Counters::default());
    let (stop, stopped) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, ch) in channels.iter().enumerate() {
        for t in 0..args.streams {
            tasks.spawn(flood_task(ch.clone(), i, t, args.oversize_every, Arc::clone(&counters), stopped.clone()));
        }
    }
    let t = Instant::now();
    // The RSS during the flood, sampled every 100 ms (VmHWM gives the exact peak).
    let mut rss_max = 0u64;
    while t.elapsed() < args.duration {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss_max = rss_max.max(bench_proc::process_memory(pid)?.rss);
    }
    let during: Memory = bench_proc::process_memory(pid)?;
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    let elapsed = t.elapsed();
    drop(channels);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = bench_proc::process_memory(pid)?;

    let secs = elapsed.as_secs_f64();
    let messages = counters.messages.load(Ordering::Relaxed);
    let bytes = counters.bytes.load(Ordering::Relaxed);
    let streams = counters.streams.load(Ordering::Relaxed);
    let peak = during.hwm.max(rss_max);
    println!(
        "attach flood: {} station certificates × {} Attach streams, {:.1} s; peak from VmHWM{}",
        certs.len(),
        args.streams,
        secs,
        if reset.is_ok() { " reset at the flood's start (/proc/PID/clear_refs)" } else { " since the broker started" }
    );
    println!();
    println!("| broker (pid {pid}, /proc/{pid}/status) | resident |");
    println!("|---|---:|");
    println!("| idle, before the flood (VmRSS) | {} |", fmt_mib(idle.rss));
    println!("| peak during the flood (VmHWM) | {} |", fmt_mib(peak));
    println!("| at the flood's end (VmRSS) | {} |", fmt_mib(during.rss));
    println!("| 2 s after the flood stopped (VmRSS) | {} |", fmt_mib(after.rss));
    println!();
    println!("peak / idle: {:.2}x (target < 2x)", peak as f64 / idle.rss.max(1) as f64);
    println!(
        "sent: {streams} Attach streams opened ({:.0}/s), {messages} messages after Register ({:.0}/s, {} MiB)",
        streams as f64 / secs,
        messages as f64 / secs,
        bytes >> 20
    );
    let ended = counters.ended.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let list: Vec<String> = ended.iter().map(|(how, n)| format!("{how} {n}")).collect();
    println!("streams ended: {}", list.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flood_messages_sit_at_the_limits() {
        assert_eq!(padded("abc", 'x', 6), "abcxxx");
        assert_eq!(padded("abcdef", 'x', 3), "abc");
        let probes = fat_probes("t");
        assert_eq!(probes.len(), LISTED_PROBES);
        assert!(probes.iter().all(|p| p.probe_id.len() == PROBE_FIELD_LEN && p.port.len() == PROBE_FIELD_LEN));
        let register =
            agent(pb::agent_message::Msg::Register(pb::Register { probes: probes.clone(), ..Default::default() }));
        assert!(prost::Message::encoded_len(&register) < 16 * 1024);
        let heartbeat = flood_message("t", 15, &probes);
        assert!(prost::Message::encoded_len(&heartbeat) < 16 * 1024);
        match flood_message("t", 2, &probes).msg {
            Some(pb::agent_message::Msg::Progress(p)) => assert_eq!(p.probe_id.len(), PROBE_FIELD_LEN),
            other => panic!("{other:?}"),
        }
        match flood_message("t", 3, &probes).msg {
            Some(pb::agent_message::Msg::Done(d)) => assert_eq!(d.message.len(), DONE_MESSAGE_LEN),
            other => panic!("{other:?}"),
        }
    }
}
