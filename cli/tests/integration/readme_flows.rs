//! Issue 12 item 1: README.md's shell blocks run as written. The ```sh blocks of the production flow
//! and of the lab flow are taken from README.md and run, each flow as one bash script (`set -euo
//! pipefail`), in a fresh directory with the built `flashgate` first on PATH, on the fixed loopback
//! ports the README names (checked free first). What a block starts in the background (`&`: the
//! broker, the station daemon, the simulators) is stopped with the script's process group afterwards.
//! Each flow's outcome is checked: devices installed by both stations and counted by the broker, the
//! chip's flash holding the firmware, and nothing written into the checkout. Every other ```sh block
//! of README.md must be one of the few that build or install from the checkout, named below.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{BIN, ScriptGroup, lock_fixed_ports};

/// The sections whose blocks are run here.
const PRODUCTION: &str = "Production flow (broker, stations)";
const LAB: &str = "Lab flow (one desk, no broker)";

/// Sections whose blocks build or install from the checkout (`cargo run`, `make test`, `cargo
/// install`): `make test` itself and the build it runs already exercise them.
const NOT_RUN: [&str; 2] = ["The two commands", "Installing `flashgate`"];

/// The loopback ports README.md's flows use: simulator targets, broker, broker metrics.
const PORTS: [u16; 6] = [7000, 7001, 7002, 7003, 7443, 9464];

/// Longest a flow's script may run (a debug build on a loaded two-core machine).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap()
}

/// `(section heading, block text)` of every ```sh block, in order.
fn sh_blocks(readme: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut block: Option<String> = None;
    for line in readme.lines() {
        match &mut block {
            Some(text) if line.trim_start().starts_with("```") => {
                out.push((section.clone(), std::mem::take(text)));
                block = None;
            }
            Some(text) => {
                text.push_str(line);
                text.push('\n');
            }
            None if line.trim() == "```sh" || line.trim() == "```bash" => block = Some(String::new()),
            None => {
                if let Some(h) = line.strip_prefix("## ") {
                    section = h.trim().to_string();
                }
            }
        }
    }
    assert!(block.is_none(), "README.md ends inside a ```sh block");
    out
}

/// The blocks of `section`, joined into one script.
fn section_script(section: &str) -> String {
    let blocks: Vec<String> = sh_blocks(&readme()).into_iter().filter(|(s, _)| s == section).map(|(_, b)| b).collect();
    assert!(!blocks.is_empty(), "README.md has no ```sh block under \"## {section}\"");
    blocks.join("\n")
}

#[test]
fn every_shell_block_of_the_readme_is_run_or_named() {
    let blocks = sh_blocks(&readme());
    for (section, block) in &blocks {
        assert!(
            section == PRODUCTION || section == LAB || NOT_RUN.contains(&section.as_str()),
            "README.md section \"## {section}\" has a ```sh block that no test runs:\n{block}\n\
             (add the section to cli/tests/integration/readme_flows.rs)"
        );
    }
    for section in [PRODUCTION, LAB] {
        assert!(blocks.iter().any(|(s, _)| s == section), "README.md lost its \"## {section}\" blocks");
    }
}

/// `flashgate admin … --json ARGS` against the README's broker, from the flow's directory.
fn admin_json(dir: &Path, args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["admin", "--broker", "https://127.0.0.1:7443", "--pki", "pki", "--name", "ops", "--json"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The files of `deploy/config/` in the checkout.
fn deploy_config_files() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config");
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn the_production_flow_runs_as_written() {
    let _ports = lock_fixed_ports(&PORTS);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("line");
    std::fs::create_dir(&dir).unwrap();
    let before = deploy_config_files();

    let mut script = ScriptGroup::start(&dir, tmp.path(), "production", &section_script(PRODUCTION));
    let status = script.wait(SCRIPT_TIMEOUT);
    assert!(status.success(), "README.md's production flow failed ({status}):\n{}", script.output());

    // berlin/2's `agent run --once` installed one board (exit 0 above); berlin/1's daemon installs the
    // board on its probe once assigned. Both are counted by the broker, which is still running.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = admin_json(&dir, &["batch", "status", "lot-7"]);
        if status.as_ref().is_some_and(|s| s["installed"].as_u64() == Some(2)) || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let status = status.unwrap_or_else(|| panic!("no batch status from the README's broker\n{}", script.output()));
    assert_eq!(status["installed"].as_u64(), Some(2), "{status}\n{}", script.output());
    assert_eq!(status["failed"].as_u64(), Some(0), "{status}");
    let journal = Command::new(BIN)
        .args(["agent", "journal", "--config", "agent-2.toml", "--json"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let entries: serde_json::Value = serde_json::from_slice(&journal.stdout).unwrap();
    assert_eq!(entries.as_array().map(Vec::len), Some(1), "berlin/2 journalled one device: {entries}");
    drop(script);

    // Everything the flow made is in its directory; nothing in the checkout.
    for f in
        ["pki/ca.pem", "broker.toml", "agent.toml", "agent-2.toml", "keys.fgks", "ledger.db", "vendor/vendor-ca.pub"]
    {
        assert!(dir.join(f).exists(), "the production flow did not make {f} in its directory");
    }
    assert!(dir.join("agent-state/journal").is_dir() && dir.join("agent-state-2/journal").is_dir());
    assert_eq!(deploy_config_files(), before, "the flow wrote into deploy/config/ of the checkout");
    assert_eq!(before, ["agent.toml", "broker.toml"]);
}

#[test]
fn the_lab_flow_runs_as_written() {
    let _ports = lock_fixed_ports(&PORTS);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("desk");
    std::fs::create_dir(&dir).unwrap();

    let mut script = ScriptGroup::start(&dir, tmp.path(), "lab", &section_script(LAB));
    let status = script.wait(SCRIPT_TIMEOUT);
    assert!(status.success(), "README.md's lab flow failed ({status}):\n{}", script.output());
    drop(script);

    // The chip holds both inputs where they were packed: app.bin at the start of flash, blob.bin at
    // 0x08040000.
    let flash = std::fs::read(dir.join("flash.bin")).unwrap();
    let app = std::fs::read(dir.join("app.bin")).unwrap();
    let blob = std::fs::read(dir.join("blob.bin")).unwrap();
    assert_eq!(&flash[..app.len()], &app[..], "flash.bin does not start with app.bin");
    assert_eq!(&flash[0x40000..0x40000 + blob.len()], &blob[..], "blob.bin is not at 0x08040000");
}
