//! The web console in real headless Chromium (issue 16's "done when"): a broker, a simulator with
//! three stm32l4 targets in real time (so installs take long enough for the line view to show them
//! moving) and a station daemon (`run_daemon`, the code of `flashgate agent serve`) start in-process;
//! the console (`flashgate-console`, as the admin) serves on an ephemeral loopback port and
//! chromedriver drives Chromium through it. The page shows the station come online; the test assigns
//! the batch by clicking (select, Assign, the confirmation), watches the probes' bars move and the
//! batch complete, compares the counts on the Batch page with `BatchStatus`, and saves screenshots of
//! the Line and Batch pages under the target directory (`console-line.png`, `console-batch.png`),
//! finds an installed device's record on the Device page and the verified chain on the Audit page. A
//! wallboard URL shows the same pages without actions, and its POST is refused.
//!
//! Skipped with a note when chromium or chromedriver is missing, unless `FLASHGATE_REQUIRE_CHROMIUM=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use flashgate_agent::config::{
    AgentConfig, BootloaderSection, BrokerSection, MetricsSection, ProbesSection, RunSection, StateSection,
    StationSection, TlsSection,
};
use flashgate_common::cert::VendorCa;
use flashgate_console::{Admin, Console, ConsoleInfo, Tokens};
use flashgate_sim::Simulator;
use flashgate_tests::agent::{StationSpec, TestStation, seed_sized, sim_config, tcp_probes};
use flashgate_tests::broker::{BrokerSpec, TestPki, World};
use flashgate_tests::webdriver::{self, Browser};
use tokio::sync::watch;

const TARGETS: usize = 3;
const BATCH: &str = "b-console";
/// Generous: a debug build on a busy machine.
const LONG: Duration = Duration::from_secs(120);

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_shows_the_line_and_assigns_a_batch_in_chromium() {
    let Some((chromium, chromedriver)) = webdriver::tools() else { return };
    let vendor = VendorCa::generate(&mut rand::rngs::OsRng);
    let mut sim_cfg = sim_config(&vendor, TARGETS);
    // Real time at 115200 baud: a 24 KiB image takes a few seconds per device.
    sim_cfg.speed = 1.0;
    let sim = Simulator::start(sim_cfg).await.unwrap();
    let world = World::with_vendor(vendor);
    let broker = world.start_broker(BrokerSpec::default()).await;
    seed_sized(&broker, BATCH, TARGETS as i64, &["berlin"], 24 * 1024, 7).await;

    // The station daemon, as `flashgate agent serve` runs it.
    let station = TestStation::new(&world, StationSpec::new(vec![broker.url()]));
    let files = world.pki.files(&TestPki::station("berlin", 1));
    let cfg = AgentConfig {
        broker: BrokerSection { endpoints: vec![broker.url()], server_name: None },
        tls: TlsSection { cert: files.cert.clone(), key: files.key.clone(), ca: files.ca.clone() },
        state: StateSection { dir: station.dir().to_path_buf() },
        probes: ProbesSection { usb_scan: false, ..ProbesSection::default() },
        run: RunSection { max_parallel: TARGETS, max_attempts: 3, poll_interval: Duration::from_millis(100) },
        bootloader: BootloaderSection::default(),
        metrics: MetricsSection::default(),
        station: StationSection { heartbeat_interval: Duration::from_millis(500) },
    };
    let (_probes_tx, probes_rx) = watch::channel(tcp_probes(&sim, "sim"));
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = station.ctx.clone();
    let daemon =
        tokio::spawn(async move { flashgate_agent::daemon::run_daemon(&cfg, probes_rx, ctx, stop_rx, None).await });

    // The console, as `flashgate console --wallboard` runs it.
    let tokens = Tokens::generate(true);
    let admin = Admin::new(broker.channel(&TestPki::admin()).await);
    let console = Console::start(admin, tokens.clone(), ConsoleInfo { broker: broker.url(), admin: "admin".into() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (admin_url, wall_url) = flashgate_console::urls(listener.local_addr().unwrap(), &tokens);
    let wall_url = wall_url.unwrap();
    let server = tokio::spawn(flashgate_console::serve(listener, console, std::future::pending()));

    let browser = Browser::start(&chromium, &chromedriver).await;
    eprintln!("console test: Chromium session started, console at {}", admin_url.split('?').next().unwrap());
    browser.goto(&admin_url).await;
    // The station comes online on the Line page.
    browser.wait_for("article.station[data-online=\"true\"] .probes li[data-probe=\"sim-2\"]", LONG).await;
    assert_eq!(browser.text("#role").await.as_deref(), Some("admin: admin"));
    assert_eq!(browser.text("article.station .assigned").await.as_deref(), Some("none"));

    eprintln!("console test: the station is online on the page");
    // Assign the batch by clicking: choose it, Assign, then the confirmation naming what will happen.
    browser.click(&format!("article.station select.assign-batch option[value=\"{BATCH}\"]")).await;
    browser.click("article.station button.assign").await;
    let question = browser.text("#confirm-text").await.unwrap();
    assert!(question.contains(BATCH) && question.contains("station/1"), "{question}");
    browser.click("#confirm-ok").await;
    browser.wait_for("#notice p", LONG).await;
    let notice = browser.text("#notice p").await.unwrap();
    assert!(notice.starts_with("Done: assigned batch b-console"), "{notice}");

    eprintln!("console test: assigned by clicking: {notice}");
    // Watch the probes' bars move until every device is installed.
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut shot = false;
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let states = browser
            .script(
                "return [...document.querySelectorAll('.probes li')].map(li => \
                 li.dataset.probe + ':' + li.dataset.stage + ':' + li.dataset.done + '/' + li.dataset.total);",
            )
            .await;
        for s in states.as_array().unwrap() {
            seen.insert(s.as_str().unwrap().to_owned());
        }
        let moving = seen.iter().filter(|s| !s.ends_with(":0/0") && !s.contains(":done:")).count();
        if !shot && moving >= 2 {
            // The line mid-batch: bars part-way.
            browser.screenshot(&target_dir().join("console-line.png")).await;
            shot = true;
        }
        let ok = browser.text("article.station .devices-ok").await.unwrap_or_default();
        if ok == TARGETS.to_string() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the batch did not complete on the page; seen {seen:#?}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let in_progress: BTreeSet<&str> =
        seen.iter().filter(|s| !s.ends_with(":0/0") && !s.contains(":done:")).map(String::as_str).collect();
    assert!(in_progress.len() >= 2, "the bars never showed progress: {seen:#?}");
    assert!(seen.iter().any(|s| s.contains(":done:")), "no probe showed its device done: {seen:#?}");
    if !shot {
        browser.screenshot(&target_dir().join("console-line.png")).await;
    }

    eprintln!("console test: {} probe states seen, {} in progress", seen.len(), in_progress.len());
    // The Batch page: its counts are the broker's.
    let status = broker.batch_status(BATCH).await;
    assert_eq!((status.issued, status.installed, status.failed, status.remaining), (3, 3, 0, 0));
    browser.goto(&format!("{}#/batch/{BATCH}", admin_url.split('?').next().unwrap())).await;
    browser.wait_for("#first-pass-yield", LONG).await;
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        if browser.text("#count-installed").await.as_deref() == Some("3") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the Batch page never showed 3 installed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (id, want) in [
        ("issued", status.issued),
        ("installed", status.installed),
        ("failed", status.failed),
        ("remaining", status.remaining),
        ("quota", status.quota),
        ("refused", 0),
        ("in_flight", 0),
    ] {
        assert_eq!(browser.text(&format!("#count-{id}")).await, Some(want.to_string()), "count {id}");
    }
    assert_eq!(browser.text("#first-pass-yield").await.as_deref(), Some("100.0 %"));
    assert!(browser.find("a[href$=\"/devices.csv\"]").await.is_some());
    browser.screenshot(&target_dir().join("console-batch.png")).await;

    // The Device page: the whole record of one installed device.
    let device = station.entries()[0].0.result.device_id.clone();
    browser.goto(&format!("{}#/device/{device}", admin_url.split('?').next().unwrap())).await;
    browser.wait_for("#device-result .verdict-installed", LONG).await;
    let record = browser.text("#device-result").await.unwrap();
    assert!(record.contains(&device) && record.contains(BATCH) && record.contains("Licence"), "{record}");
    // The Audit page: the chain verifies.
    browser.goto(&format!("{}#/audit", admin_url.split('?').next().unwrap())).await;
    browser.wait_for("#audit-ok", LONG).await;
    assert_eq!(browser.text("#audit-ok").await.as_deref(), Some("verified"));

    // The wallboard: the same line, no actions, and a POST is refused.
    browser.goto(&wall_url).await;
    browser.wait_for("article.station[data-online=\"true\"]", LONG).await;
    assert_eq!(browser.text("#role").await.as_deref(), Some("wallboard (read-only)"));
    assert!(browser.find("button.assign").await.is_none(), "the wallboard shows no action");
    let refused = browser
        .script(
            "const x = new XMLHttpRequest(); x.open('POST', '/api/action', false); \
             x.setRequestHeader('content-type', 'application/json'); x.send('{\"action\":\"pause_batch\",\"batch\":\"b-console\"}'); \
             return x.status;",
        )
        .await;
    assert_eq!(refused, 403);
    assert_eq!(broker.batch_status(BATCH).await.state, flashgate_proto::v1::BatchState::Open as i32);

    browser.quit().await;
    stop_tx.send(true).unwrap();
    let summary = tokio::time::timeout(LONG, daemon).await.unwrap().unwrap().unwrap();
    assert_eq!(summary.installed, TARGETS as u64);
    server.abort();
    sim.shutdown().await.unwrap();
}
