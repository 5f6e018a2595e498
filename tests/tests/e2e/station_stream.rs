//! `StationService.Attach` end to end, with a raw tonic client standing in for the agent: a station
//! registers and gets its current assignment; `AdminService.AssignStation` / `PauseStation` reach
//! its stream within 2 s — also when made through another broker sharing the ledger (PostgreSQL when
//! installed, else a shared SQLite file); `ListStations` shows it online with its probes and counts
//! while attached and offline after; Attach must start with Register, is for stations only, and ends
//! with `UNAVAILABLE` (quickly) when the broker shuts down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use flashgate_proto::v1 as pb;
use flashgate_proto::v1::station_service_client::StationServiceClient;
use flashgate_tests::broker::{BrokerSpec, TRUST_DOMAIN, TestBroker, TestPki, World, reason};
use flashgate_tests::pg::PgCluster;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

/// A fake agent: what it sends, and the broker's messages.
struct FakeAgent {
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: tonic::Streaming<pb::BrokerMessage>,
}

fn register(probes: &[&str]) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Register(pb::Register {
            agent_version: "test".into(),
            probes: probes.iter().map(|p| probe(p)).collect(),
            current_batch: String::new(),
        })),
    }
}

fn probe(id: &str) -> pb::ProbeInfo {
    pb::ProbeInfo { probe_id: id.into(), kind: "sim".into(), port: format!("tcp://127.0.0.1:7000/{id}") }
}

fn heartbeat(batch: &str, ok: u64, failed: u64) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
            probes: vec![probe("p0"), probe("p1")],
            current_batch: batch.into(),
            devices_ok: ok,
            devices_failed: failed,
            running: !batch.is_empty(),
        })),
    }
}

fn uri(site: &str, n: u32) -> String {
    TestPki::station(site, n).to_uri()
}

fn assign(batch: &str) -> pb::broker_message::Msg {
    pb::broker_message::Msg::Assign(pb::Assign { batch_id: batch.into() })
}

fn pause(reason: &str) -> pb::broker_message::Msg {
    pb::broker_message::Msg::Pause(pb::Pause { reason: reason.into() })
}

impl FakeAgent {
    /// Opens Attach as station `n` of `site`, sending `first` as the first message.
    async fn attach(b: &TestBroker, site: &str, n: u32, first: pb::AgentMessage) -> Result<Self, Status> {
        let mut client = StationServiceClient::new(b.channel(&TestPki::station(site, n)).await);
        let (tx, rx) = mpsc::channel(16);
        tx.send(first).await.unwrap();
        let rx = client.attach(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self { tx, rx })
    }

    /// The next broker message within `within`: `None` on timeout.
    async fn next(&mut self, within: Duration) -> Option<Result<pb::broker_message::Msg, Status>> {
        match tokio::time::timeout(within, self.rx.message()).await {
            Err(_) => None,
            Ok(Ok(Some(m))) => Some(Ok(m.msg.expect("a broker message with content"))),
            Ok(Ok(None)) => Some(Err(Status::cancelled("stream ended"))),
            Ok(Err(s)) => Some(Err(s)),
        }
    }

    /// The next broker message, which must come within 2 s.
    async fn expect(&mut self) -> pb::broker_message::Msg {
        let started = Instant::now();
        let m = self.next(Duration::from_secs(2)).await.expect("a broker message within 2 s").unwrap();
        eprintln!("received {m:?} after {:?}", started.elapsed());
        m
    }

    async fn send(&self, m: pb::AgentMessage) {
        self.tx.send(m).await.unwrap();
    }
}

async fn station_info(b: &TestBroker, identity: &str) -> Option<pb::StationInfo> {
    let r = b.admin().await.list_stations(pb::ListStationsRequest {}).await.unwrap().into_inner();
    r.stations.into_iter().find(|s| s.identity == identity)
}

/// Waits up to 5 s for the station's listing to satisfy `ok`.
async fn wait_station(b: &TestBroker, identity: &str, what: &str, ok: impl Fn(&pb::StationInfo) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = station_info(b, identity).await;
        if s.as_ref().is_some_and(&ok) {
            return;
        }
        assert!(Instant::now() < deadline, "{identity} never became {what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignments_reach_the_attached_station_and_its_status_is_listed() {
    let world = World::new();
    let b = world.start_broker(BrokerSpec::default()).await;
    b.seed_batch("b1", 10, &["berlin"]).await;
    b.seed_batch("b-austin", 10, &["austin"]).await;
    let me = uri("berlin", 1);

    // Never assigned: nothing is pushed, but the station is online with its probes.
    let mut agent = FakeAgent::attach(&b, "berlin", 1, register(&["p0", "p1"])).await.unwrap();
    assert!(agent.next(Duration::from_millis(500)).await.is_none(), "nothing to push before an assignment");
    let s = station_info(&b, &me).await.expect("listed");
    assert!(s.online, "{s:?}");
    assert_eq!((s.broker.as_str(), s.site.as_str(), s.probes.len()), ("broker-1", "berlin", 2));
    assert_eq!(s.probes[1], probe("p1"));
    assert_eq!(s.certificates.len(), 1, "the Attach connection notes the certificate");

    // Assigned through this broker: pushed at once.
    let admin = || async { b.admin().await };
    let info = admin()
        .await
        .assign_station(pb::AssignStationRequest { station: me.clone(), batch_id: "b1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.assigned_batch.as_str(), info.paused, info.online), ("b1", false, true));
    assert_eq!(agent.expect().await, assign("b1"));

    let info = admin()
        .await
        .pause_station(pb::PauseStationRequest { station: me.clone(), reason: "line stop".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.assigned_batch.as_str(), info.paused), ("b1", true));
    assert_eq!(agent.expect().await, pause("line stop"));

    // Heartbeats are written at most every 2 s: the first one after that shows in the listing.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    agent.send(heartbeat("b1", 3, 1)).await;
    wait_station(&b, &me, "reported", |s| (s.devices_ok, s.devices_failed) == (3, 1)).await;
    let s = station_info(&b, &me).await.unwrap();
    assert_eq!((s.current_batch.as_str(), s.online, s.paused), ("b1", true, true));
    // Progress and results are kept in the broker's memory, per probe.
    agent
        .send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Done(pb::DeviceDone {
                probe_id: "p0".into(),
                device_id: "d1".into(),
                ok: true,
                message: "installed".into(),
            })),
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let live = b.running().state().stations().attached();
        if live.iter().any(|l| l.probes.get("p0").is_some_and(|p| p.last_result == Some((true, "installed".into())))) {
            assert_eq!(live.len(), 1);
            break;
        }
        assert!(Instant::now() < deadline, "DeviceDone never reached the hub: {live:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A reconnecting agent gets the current assignment on Register; the old stream's end leaves the
    // station online (the new stream owns its status).
    let mut again = FakeAgent::attach(&b, "berlin", 1, register(&["p0"])).await.unwrap();
    assert_eq!(again.expect().await, pause("line stop"));
    drop(agent);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = station_info(&b, &me).await.unwrap();
    assert!(s.online && s.probes.len() == 1, "{s:?}");
    admin()
        .await
        .assign_station(pb::AssignStationRequest { station: me.clone(), batch_id: "b1".into() })
        .await
        .unwrap();
    assert_eq!(again.expect().await, assign("b1"));
    drop(again);
    wait_station(&b, &me, "offline", |s| !s.online && s.broker.is_empty()).await;
    let s = station_info(&b, &me).await.unwrap();
    assert_eq!((s.assigned_batch.as_str(), s.paused), ("b1", false), "the assignment outlives the stream");

    // Refusals: unknown batch, a batch of another site, not a station, another trust domain.
    let mut a = admin().await;
    let e = a.assign_station(pb::AssignStationRequest { station: me.clone(), batch_id: "nope".into() }).await;
    assert_eq!(e.unwrap_err().code(), Code::NotFound);
    let e = a.assign_station(pb::AssignStationRequest { station: me.clone(), batch_id: "b-austin".into() }).await;
    let e = e.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("berlin") && e.message().contains("b-austin"), "{e:?}");
    let admin_uri = TestPki::admin().to_uri();
    let e = a.pause_station(pb::PauseStationRequest { station: admin_uri, reason: String::new() }).await;
    assert_eq!(e.unwrap_err().code(), Code::InvalidArgument);
    let foreign = "spiffe://other.test/site/berlin/station/1".to_string();
    let e = a.assign_station(pb::AssignStationRequest { station: foreign, batch_id: "b1".into() }).await;
    let e = e.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains(TRUST_DOMAIN), "{e:?}");

    // A station that never connected can be assigned, and is listed with its assignment.
    let later = uri("berlin", 7);
    let info = a
        .assign_station(pb::AssignStationRequest { station: later.clone(), batch_id: "b1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.site.as_str(), info.assigned_batch.as_str(), info.online), ("berlin", "b1", false));
    assert!(info.certificates.is_empty());

    // Every change is audited with the admin as actor.
    let mut audit = a.export_audit(pb::ExportAuditRequest { after_seq: 0 }).await.unwrap().into_inner();
    let mut events = Vec::new();
    while let Some(r) = audit.message().await.unwrap() {
        events.push((r.event, r.subject, r.actor));
    }
    let station_events: Vec<_> = events.iter().filter(|e| e.0.starts_with("station.")).collect();
    assert_eq!(station_events.len(), 4, "{station_events:?}");
    assert!(station_events.iter().all(|e| e.2 == TestPki::admin().to_uri()));
    assert_eq!(station_events[1].0, "station.paused");
    assert_eq!(station_events[3].1, format!("station/{later}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_starts_with_register_and_is_for_stations_only() {
    let world = World::new();
    let mut b = world.start_broker(BrokerSpec::default()).await;

    let mut agent = FakeAgent::attach(&b, "berlin", 2, heartbeat("", 0, 0)).await.unwrap();
    let e = agent.next(Duration::from_secs(2)).await.expect("an answer").unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("Register"), "{e:?}");
    assert!(station_info(&b, &uri("berlin", 2)).await.is_none_or(|s| !s.online));

    let (tx, rx) = mpsc::channel(1);
    tx.send(register(&[])).await.unwrap();
    let mut as_admin = StationServiceClient::new(b.channel(&TestPki::admin()).await);
    let e = as_admin.attach(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!((e.code(), reason(&e).as_deref()), (Code::PermissionDenied, Some("NOT_AUTHORISED")), "{e:?}");

    // Shutting down ends attached streams with UNAVAILABLE at once instead of waiting out the grace.
    let mut agent = FakeAgent::attach(&b, "austin", 3, register(&["p0"])).await.unwrap();
    wait_station(&b, &uri("austin", 3), "online", |s| s.online).await;
    let started = Instant::now();
    b.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(10), "shutdown took {:?}", started.elapsed());
    let e = agent.next(Duration::from_secs(2)).await.expect("the stream ends").unwrap_err();
    assert!(matches!(e.code(), Code::Unavailable | Code::Cancelled | Code::Unknown), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_made_through_another_broker_reaches_the_station() {
    let pg = PgCluster::start();
    let sqlite = tempfile::tempdir().unwrap();
    let url = match &pg {
        Some(pg) => pg.create_db("flashgate_stations"),
        None => format!("sqlite://{}", sqlite.path().join("shared.db").display()),
    };
    let world = World::new();
    let spec = |name: &str| BrokerSpec { name: name.into(), ledger_url: Some(url.clone()), ..BrokerSpec::default() };
    let one = world.start_broker(spec("broker-a")).await;
    let two = world.start_broker(spec("broker-b")).await;
    one.seed_batch("shared", 10, &["*"]).await;
    let me = uri("austin", 1);

    let mut agent = FakeAgent::attach(&one, "austin", 1, register(&["p0"])).await.unwrap();
    assert!(agent.next(Duration::from_millis(300)).await.is_none());
    let s = station_info(&two, &me).await.expect("the other broker lists the station");
    assert!(s.online && s.broker == "broker-a", "{s:?}");

    let started = Instant::now();
    two.admin()
        .await
        .assign_station(pb::AssignStationRequest { station: me.clone(), batch_id: "shared".into() })
        .await
        .unwrap();
    assert_eq!(agent.expect().await, assign("shared"));
    eprintln!("assignment through broker-b reached broker-a's station after {:?}", started.elapsed());
    two.admin()
        .await
        .pause_station(pb::PauseStationRequest { station: me.clone(), reason: "audit".into() })
        .await
        .unwrap();
    assert_eq!(agent.expect().await, pause("audit"));
    assert!(agent.next(Duration::from_millis(1500)).await.is_none(), "each change is pushed once");

    drop(agent);
    wait_station(&two, &me, "offline", |s| !s.online).await;
}

/// What the review did: thousands of `Attach` streams and `DeviceProgress` messages with unique huge probe
/// ids, and a revoked station's idle stream that kept receiving pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_streams_are_capped_superseded_and_ended_by_revocation() {
    let world = World::new();
    let b = world.start_broker(BrokerSpec::default()).await;
    b.seed_batch("b-cap", 10, &["berlin"]).await;
    let me = uri("berlin", 1);
    let hub = b.running().state().stations().clone();

    // A newer Register supersedes the older stream of the same station: at most one registered.
    let mut first = FakeAgent::attach(&b, "berlin", 1, register(&["p0"])).await.unwrap();
    wait_station(&b, &me, "online", |s| s.online).await;
    let mut second = FakeAgent::attach(&b, "berlin", 1, register(&["p0"])).await.unwrap();
    let e = first.next(Duration::from_secs(2)).await.expect("the older stream ends").unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("superseded"), "{e:?}");

    // Streams that never register are capped per station (the superseded one's slot is freed first).
    let deadline = Instant::now() + Duration::from_secs(10);
    while hub.open_streams(&me) > 1 {
        assert!(Instant::now() < deadline, "the superseded stream never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = StationServiceClient::new(b.channel(&TestPki::station("berlin", 1)).await);
    let mut idle = Vec::new();
    let mut refused = None;
    for _ in 0..10 {
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(1);
        match client.attach(ReceiverStream::new(rx)).await {
            Ok(s) => idle.push((tx, s)),
            Err(s) => {
                refused = Some(s);
                break;
            }
        }
    }
    let refused = refused.expect("a further Attach is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(hub.open_streams(&me), flashgate_broker::service::station::MAX_ATTACH_PER_STATION);
    assert_eq!(idle.len(), flashgate_broker::service::station::MAX_ATTACH_PER_STATION - 1);
    drop(idle);

    // Probe ids: long ones are refused, and distinct ones are capped (the stream ends).
    let progress = |id: String| pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Progress(pb::DeviceProgress {
            probe_id: id,
            device_id: String::new(),
            stage: "identify".into(),
            done: 0,
            total: 1,
        })),
    };
    for i in 0..256 {
        second.send(progress(format!("p{i}"))).await;
    }
    second.send(progress("one-too-many".into())).await;
    let e = second.next(Duration::from_secs(5)).await.expect("the stream ends").unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("256"), "{e:?}");
    // The ended and dropped streams free their slots once the broker has seen them go.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hub.open_streams(&me) > 0 {
        assert!(Instant::now() < deadline, "{} streams still open", hub.open_streams(&me));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut third = FakeAgent::attach(&b, "berlin", 1, register(&["p0"])).await.unwrap();
    third.send(progress("x".repeat(129))).await;
    let e = third.next(Duration::from_secs(5)).await.expect("the stream ends").unwrap_err();
    assert_eq!(e.message(), "progress.probe_id: is 129 bytes long, the limit is 128");

    // A revoked station's idle stream ends at once, and gets no assignment pushed after it.
    let mut idle = FakeAgent::attach(&b, "berlin", 2, register(&["p0"])).await.unwrap();
    wait_station(&b, &uri("berlin", 2), "online", |s| s.online).await;
    let serial = world.pki.serial(&TestPki::station("berlin", 2));
    let mut admin = b.admin().await;
    admin
        .revoke_station(pb::RevokeStationRequest {
            serial,
            identity: String::new(),
            reason: "stolen".into(),
            force: false,
        })
        .await
        .unwrap();
    let e = idle.next(Duration::from_secs(5)).await.expect("the revoked stream ends").unwrap_err();
    assert_eq!(reason(&e).as_deref(), Some("STATION_REVOKED"), "{e:?}");
    admin
        .assign_station(pb::AssignStationRequest { station: uri("berlin", 2), batch_id: "b-cap".into() })
        .await
        .unwrap();
    assert!(idle.next(Duration::from_millis(500)).await.is_none_or(|m| m.is_err()));
}
