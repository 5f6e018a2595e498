//! `--json` for scripts (issue 12 item 8): `pack`, `sfi inspect`, `flash`, `agent run` and `demo` as a
//! script runs them — standard output parsed with serde_json holds the documented object(s) of
//! docs/json-output.md and nothing else, the fields agree with each other (pack's expected CRC is
//! inspect's and the chip's), and the exit codes are those without `--json`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::Value;

use crate::support::{BrokerProcess, create_batch, free_ports, init_line, ok, run, spawn_sim, write_agent_config};

/// The whole of stdout as exactly one JSON object.
fn one_object(stdout: &str) -> Value {
    let v: Value =
        serde_json::from_str(stdout).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{stdout}"));
    assert!(v.is_object(), "{v}");
    v
}

#[test]
fn pack_inspect_and_flash_print_one_object_each() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let firmware: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(dir.join("app.bin"), &firmware).unwrap();

    let pack = one_object(&ok(
        dir,
        &[
            "pack",
            "--family",
            "stm32l4",
            "--firmware",
            "app.bin@0x08000000",
            "--generate-key",
            "keys",
            "--max-area",
            "8K",
            "--out",
            "fw.sfi",
            "--json",
        ],
    ));
    assert_eq!(pack["image"], "fw.sfi", "{pack}");
    assert_eq!(pack["family"], "stm32l4");
    assert_eq!(pack["size"].as_u64(), Some(std::fs::metadata(dir.join("fw.sfi")).unwrap().len()));
    let areas = pack["areas"].as_array().unwrap();
    assert_eq!(areas.len(), 3, "20,000 bytes in areas of 8 KiB: {pack}");
    assert_eq!(areas[0]["index"], 1);
    assert_eq!(areas[0]["type"], "F");
    assert_eq!(areas[0]["address"].as_u64(), Some(0x0800_0000));
    assert_eq!(areas.iter().map(|a| a["size"].as_u64().unwrap()).sum::<u64>(), 20_000);
    assert_eq!(pack["generated_key"], true);
    assert_eq!(pack["fresh_nonce"], true);
    assert_eq!(pack["key"], "keys/key.bin");
    assert_eq!(pack["nonce"], "keys/nonce.bin");
    let crc = pack["expected_flash_crc"].as_u64().unwrap();

    // --json with the image on stdout cannot be: a usage error.
    let out = run(
        dir,
        &[
            "pack",
            "--family",
            "stm32l4",
            "--firmware",
            "app.bin@0x08000000",
            "--key",
            "keys/key.bin",
            "--out",
            "-",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty());

    let inspect = one_object(&ok(
        dir,
        &[
            "sfi",
            "inspect",
            "fw.sfi",
            "--key",
            "keys/key.bin",
            "--nonce",
            "keys/nonce.bin",
            "--family",
            "stm32l4",
            "--json",
        ],
    ));
    assert_eq!(inspect["verified"], true, "{inspect}");
    assert_eq!(inspect["version"], 1);
    assert_eq!(inspect["area_count"], 3);
    assert_eq!(inspect["family"], "stm32l4");
    assert_eq!(inspect["expected_flash_crc"].as_u64(), Some(crc), "inspect and pack agree on the CRC");
    assert_eq!(inspect["header_tag"].as_str().map(str::len), Some(32));
    let listed = inspect["areas"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|a| a["verified"] == true && a["tag"].as_str().is_some_and(|t| t.len() == 32)));
    assert_eq!(listed[1]["address"].as_u64(), Some(0x0800_2000));
    // Without the key: the structure only, no CRC.
    let bare = one_object(&ok(dir, &["sfi", "inspect", "fw.sfi", "--json"]));
    assert_eq!(bare["verified"], false);
    assert_eq!(bare["expected_flash_crc"], Value::Null);
    assert_eq!(bare["family"], Value::Null);
    // An image that does not verify: nothing on stdout, exit 65.
    std::fs::write(dir.join("other.key"), [7u8; 16]).unwrap();
    let out = run(dir, &["sfi", "inspect", "fw.sfi", "--key", "other.key", "--nonce", "keys/nonce.bin", "--json"]);
    assert_eq!(out.status.code(), Some(65), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));

    // flash: a simulated target, its certificate, a licence from the key files.
    ok(dir, &["sim", "vendor-ca", "--out", "vendor"]);
    let port = free_ports(1);
    let _sim = spawn_sim(dir, 1, "0", port, &[]);
    let target = format!("tcp://127.0.0.1:{port}");
    let mut tries = 0;
    while run(dir, &["cert", "--target", &target, "--out", "chip.cert"]).status.code() != Some(0) {
        tries += 1;
        assert!(tries < 50, "the simulator does not answer on {target}");
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(
        dir,
        &[
            "licence",
            "issue",
            "--cert",
            "chip.cert",
            "--vendor-ca-pub",
            "vendor/vendor-ca.pub",
            "--key",
            "keys/key.bin",
            "--nonce",
            "keys/nonce.bin",
            "--out",
            "lic.bin",
        ],
    );
    let wrong = (crc ^ 1).to_string();
    let out = run(
        dir,
        &["flash", "--target", &target, "--image", "fw.sfi", "--licence", "lic.bin", "--expect-crc", &wrong, "--json"],
    );
    // A CRC mismatch still reports the install, then exits 81 as without --json.
    assert_eq!(out.status.code(), Some(81), "{}", String::from_utf8_lossy(&out.stderr));
    let flash = one_object(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(flash["installed"], true, "{flash}");
    assert_eq!(flash["target"], target.as_str());
    assert_eq!(flash["image"], "fw.sfi");
    assert_eq!(flash["areas"], 3);
    assert_eq!(flash["flash_crc"].as_u64(), Some(crc), "the chip's CRC is the packed image's");
    assert_eq!(flash["expected_crc"].as_u64(), Some(crc ^ 1));
    assert_eq!(flash["crc_matches"], false);
    assert!(flash["bytes"].as_u64().unwrap() >= 20_000);
    assert!(flash["seconds"].as_f64().unwrap() > 0.0);
    assert!(flash["retries"].is_u64());
    // The chip is installed now (readout protected): refused, nothing on stdout, exit 81.
    let out = run(dir, &["flash", "--target", &target, "--image", "fw.sfi", "--licence", "lic.bin", "--json"]);
    assert_eq!(out.status.code(), Some(81));
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn agent_run_prints_one_object_per_device_then_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = init_line(dir);
    let broker = BrokerProcess::start(dir, &cfg);
    create_batch(dir, &broker.url, "lot-j", 2, &[0x3Cu8; 4096]);
    let port = free_ports(3);
    let _sim = spawn_sim(dir, 3, "0", port, &[]);
    write_agent_config(dir, &broker.url, port, 3, "");
    std::thread::sleep(Duration::from_millis(300));
    let out = run(dir, &["agent", "run", "--config", "agent.toml", "--batch", "lot-j", "--once", "--stats", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Quota 2 for 3 boards: one refused, exit 80 as without --json.
    assert_eq!(out.status.code(), Some(80), "{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\n{stdout}")))
        .collect();
    assert_eq!(lines.len(), 4, "three devices and a summary:\n{stdout}");
    let (devices, summary) = lines.split_at(3);
    assert!(devices.iter().all(|d| d["type"] == "device" && d["station"] == "berlin/1"), "{stdout}");
    let installed: Vec<&Value> = devices.iter().filter(|d| d["result"] == "installed").collect();
    let refused: Vec<&Value> = devices.iter().filter(|d| d["result"] == "refused").collect();
    assert_eq!((installed.len(), refused.len()), (2, 1), "{stdout}");
    for d in &installed {
        assert_eq!(d["device_id"].as_str().map(str::len), Some(32), "{d}");
        assert!(d["flash_crc"].is_u64(), "{d}");
        assert_eq!(d["attempts"], 1);
        assert_eq!(d["reason"], Value::Null);
        assert_eq!(d["message"], Value::Null);
    }
    assert_eq!(refused[0]["reason"], "QUOTA_EXHAUSTED", "{}", refused[0]);
    assert!(refused[0]["message"].is_string());
    assert_eq!(refused[0]["flash_crc"], Value::Null);
    let mut probes: Vec<&str> = devices.iter().map(|d| d["probe"].as_str().unwrap()).collect();
    probes.sort_unstable();
    assert_eq!(probes, ["fixture-1", "fixture-2", "fixture-3"]);

    let s = &summary[0];
    assert_eq!(s["type"], "summary", "{s}");
    assert_eq!(s["batch"], "lot-j");
    assert_eq!(s["station"], "berlin/1");
    assert_eq!((s["devices"].as_u64(), s["installed"].as_u64(), s["refused"].as_u64()), (Some(3), Some(2), Some(1)));
    assert_eq!((s["failed"].as_u64(), s["aborted"].as_u64(), s["locked"].as_u64()), (Some(0), Some(0), Some(0)));
    assert_eq!(s["stopped_by"], "QUOTA_EXHAUSTED");
    assert_eq!(s["interrupted"], Value::Null);
    assert_eq!(s["unreported"], 0);
    assert_eq!(s["exit_code"], 80);
    // The human parts went to stderr: the stats line and the error.
    assert!(stderr.contains("agent stats:") && stderr.contains("refused by the broker"), "{stderr}");
    drop(broker);
}

#[test]
fn the_demo_prints_its_outcome_as_one_object() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("demo");
    let demo_arg = demo.to_string_lossy().into_owned();
    let out =
        run(tmp.path(), &["demo", "--devices", "3", "--quota", "2", "--speed", "0", "--dir", &demo_arg, "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v = one_object(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(v["type"], "demo", "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!((v["devices"].as_u64(), v["installed"].as_u64(), v["refused"].as_u64()), (Some(3), Some(2), Some(1)));
    assert_eq!(
        (v["quota_refusals"].as_u64(), v["failed"].as_u64(), v["aborted"].as_u64()),
        (Some(1), Some(0), Some(0))
    );
    assert_eq!(v["unreported"], 0);
    assert_eq!(v["interrupted"], Value::Null);
    assert_eq!(v["batch"]["id"], "demo-lot-1");
    assert_eq!((v["batch"]["quota"].as_i64(), v["batch"]["issued"].as_i64()), (Some(2), Some(2)));
    assert_eq!((v["batch"]["installed"].as_i64(), v["batch"]["remaining"].as_i64()), (Some(2), Some(0)));
    assert_eq!(v["audit"]["ok"], true);
    assert!(v["audit"]["records"].as_u64().unwrap() > 0);
    assert!(v["broker"].as_str().unwrap().starts_with("https://127.0.0.1:"));
    assert_eq!(v["dir"], demo_arg.as_str());
    assert!(v["seconds"].as_f64().unwrap() > 0.0);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results.iter().filter(|d| d["result"] == "installed").count(), 2);
    assert!(results.iter().all(|d| d["station"] == "berlin/1" || d["station"] == "austin/1"));
    // The story is on stderr.
    assert!(stderr.contains("2 installed and verified"), "{stderr}");
}
