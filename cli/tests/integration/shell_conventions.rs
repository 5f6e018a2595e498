//! `flashgate completions` and `flashgate man` as a user runs them: the built binary prints a bash
//! completion script that knows the `admin` subcommand (zsh and fish scripts too, `--out` writes a
//! file), and writes one roff page per command into `--out DIR`, each starting with the roff title
//! header and, where `man` is installed, formatting without a warning.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use crate::support::{ok, run};

#[test]
fn completion_scripts_know_the_subcommands() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bash = ok(dir, &["completions", "bash"]);
    assert!(!bash.is_empty());
    assert!(bash.contains("admin") && bash.contains("flashgate"), "{bash}");
    assert!(bash.contains("complete -F"), "not a bash completion script:\n{bash}");
    // Nested subcommands and their flags are completed too.
    assert!(bash.contains("revoke") && bash.contains("--reason"), "{bash}");

    let zsh = ok(dir, &["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef flashgate"), "{}", &zsh[..zsh.len().min(200)]);
    let fish = ok(dir, &["completions", "fish"]);
    assert!(fish.contains("complete -c flashgate") && fish.contains("admin"), "{fish}");

    ok(dir, &["completions", "bash", "--out", "flashgate.bash"]);
    assert_eq!(std::fs::read_to_string(dir.join("flashgate.bash")).unwrap(), bash);

    let out = run(dir, &["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(64), "an unknown shell is a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("tcsh"));
}

#[test]
fn manual_pages_are_written_one_per_command() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = run(dir, &["man", "--out", "man/man1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pages = dir.join("man/man1");
    let mut names: Vec<String> =
        std::fs::read_dir(&pages).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    for expected in [
        "flashgate.1",
        "flashgate-admin.1",
        "flashgate-admin-station-revoke.1",
        "flashgate-admin-batch-create.1",
        "flashgate-completions.1",
        "flashgate-man.1",
        "flashgate-agent-run.1",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n.contains("-help")), "help pages: {names:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("wrote {} manual pages", names.len())), "{stderr}");

    for name in &names {
        let roff = std::fs::read_to_string(pages.join(name)).unwrap();
        let title = name.trim_end_matches(".1");
        let th = roff.lines().find(|l| l.starts_with(".TH ")).unwrap_or_else(|| panic!("{name}: no .TH line"));
        assert!(th.replace("\\-", "-").to_ascii_lowercase().contains(title), "{name}: {th}");
        assert!(roff.contains(".SH NAME") && roff.contains(".SH SYNOPSIS"), "{name}");
    }
    let top = std::fs::read_to_string(pages.join("flashgate.1")).unwrap();
    assert!(top.contains("Exit codes") && top.contains("admin"), "the top page lists subcommands and exit codes");
    let revoke = std::fs::read_to_string(pages.join("flashgate-admin-station-revoke.1")).unwrap();
    assert!(revoke.contains("reason") && revoke.contains("serial"), "{revoke}");

    // Where man(1) is installed, each page formats cleanly.
    let man_available = Command::new("man").arg("--version").output().is_ok_and(|o| o.status.success());
    if man_available {
        for name in ["flashgate.1", "flashgate-admin-station-revoke.1"] {
            let out = Command::new("man")
                .args(["-l", "-P", "cat"])
                .arg(pages.join(name))
                .env("MANWIDTH", "80")
                .env("MAN_KEEP_FORMATTING", "0")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "man -l {name}: {}", String::from_utf8_lossy(&out.stderr));
            assert!(text.contains("flashgate"), "man -l {name} printed:\n{text}");
        }
    }
}
