//! `flashgate admin` guards and error text as an operator meets them, against a `flashgate broker`
//! process on SQLite: a batch for a site no station has is created with a warning (on stderr, or in
//! the `warnings` array with `--json`); one whose window is over is refused (exit 65, the end named);
//! an assignment to a station that never connected warns; revoking a serial never seen is refused
//! (exit 80, `--force` named) and `--force` pre-revokes it. A malformed `--broker` URL is a usage
//! error naming the URL, and a missing key file's cause is printed once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Output;

use crate::support::{BrokerProcess, admin, init_line, run};

fn admin_run(dir: &Path, url: &str, args: &[&str]) -> Output {
    let mut full = vec!["admin", "--broker", url, "--pki", "pki", "--name", "ops"];
    full.extend_from_slice(args);
    run(dir, &full)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn guards_refuse_or_warn_and_errors_say_each_thing_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = init_line(dir);

    // Before any broker: the URL is checked, the missing file's cause said once.
    let bad = run(dir, &["admin", "--broker", "https://127.0.0.1:35359.", "--pki", "pki", "--name", "ops", "hsm"]);
    assert_eq!(bad.status.code(), Some(64), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("https://127.0.0.1:35359.") && stderr(&bad).contains("from 1 to 65535"));
    let missing = admin_run(dir, "https://127.0.0.1:1", &["key", "import", "--label", "l", "--key", "no/key.bin"]);
    assert_eq!(missing.status.code(), Some(66), "{}", stderr(&missing));
    let text = stderr(&missing);
    assert!(text.contains("no/key.bin"), "{text}");
    assert_eq!(text.matches("(os error 2)").count(), 1, "{text}");

    let broker = BrokerProcess::start(dir, &cfg);
    let url = broker.url.clone();
    let key = admin(dir, &url, &["key", "generate", "--label", "fw"]);
    let key_id = key["key_id"].as_str().unwrap().to_owned();
    std::fs::write(dir.join("fw.bin"), vec![0xA5u8; 4096]).unwrap();
    let img = admin(dir, &url, &["image", "pack", "--key-id", &key_id, "--family", "stm32l4", "fw.bin@0x08000000"]);
    let sha = img["sha256"].as_str().unwrap().to_owned();
    let create = |id: &str, extra: &[&str]| {
        let mut args = vec!["batch", "create", id, "--product", "46201002", "--image", &sha, "--quota", "5"];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };

    // A site typo: created, with the warning in the JSON document.
    let args = create("lot-1", &["--site", "berln"]);
    let b = admin(dir, &url, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(b["id"], "lot-1");
    let warnings = b["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{b}");
    assert!(warnings[0].as_str().unwrap().contains("no station of site \"berln\""), "{b}");
    // …and on stderr without --json.
    let args = create("lot-2", &["--site", "berlin"]);
    let out = admin_run(dir, &url, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).starts_with("warning: no station of site \"berlin\""), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("lot-2"));

    // A window already over: refused as bad data, naming its end.
    let args = create("lot-old", &["--site", "berlin", "--not-after", "2020-01-01"]);
    let out = admin_run(dir, &url, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
    assert!(stderr(&out).contains("WINDOW_OVER") && stderr(&out).contains("2020-01-01T00:00:00Z"), "{}", stderr(&out));

    // A station that never connected: assigned, with a warning.
    let st = admin(dir, &url, &["station", "assign", "berlin/9", "lot-2"]);
    assert_eq!(st["assigned_batch"], "lot-2");
    let w = st["warnings"][0].as_str().unwrap();
    assert!(w.contains("spiffe://factory.test/site/berlin/station/9") && w.contains("never connected"), "{st}");

    // A serial never seen: refused, exit 80, pointing at --force; --force pre-revokes it.
    let out = admin_run(dir, &url, &["station", "revoke", "--serial", "deadbeef", "--reason", "typo"]);
    assert_eq!(out.status.code(), Some(80), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(text.contains("UNKNOWN_SERIAL") && text.contains("deadbeef") && text.contains("--force"), "{text}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("revoked"), "nothing may claim a revocation");
    let r = admin(dir, &url, &["station", "revoke", "--serial", "deadbeef", "--reason", "not yet used", "--force"]);
    assert_eq!(r["serials"][0], "deadbeef");
    assert!(r["warnings"][0].as_str().unwrap().contains("revoked in advance"), "{r}");

    // A broker URL with a path is refused the same way for every command that takes one.
    let out = run(
        dir,
        &["bench", "licences", "--broker", "https://127.0.0.1:7443/x", "--pki", "pki", "--vendor-ca-key", "k"],
    );
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("https://127.0.0.1:7443/x") && stderr(&out).contains("path"), "{}", stderr(&out));
}
