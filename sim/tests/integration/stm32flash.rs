//! Debian's `stm32flash` writes, verifies and reads a plain binary through the simulator's
//! pseudo-terminal (skipped, with a message, when `stm32flash` is not installed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use flashgate_common::cert::VendorCa;
use flashgate_common::family::Family;
use flashgate_sim::{SimConfig, Simulator};

/// Whether stm32flash can run. `make test` sets FLASHGATE_REQUIRE_STM32FLASH=1 (and installs the
/// Debian package), so there a missing tool fails the test instead of skipping it.
fn stm32flash_available() -> bool {
    let found = Command::new("stm32flash").arg("-h").output().is_ok();
    if !found && std::env::var_os("FLASHGATE_REQUIRE_STM32FLASH").is_some_and(|v| v == "1") {
        panic!("stm32flash is required (FLASHGATE_REQUIRE_STM32FLASH=1) but not installed: apt-get install stm32flash");
    }
    found
}

/// Run stm32flash; print the command and its output without the per-block progress lines.
fn run(args: &[&str]) -> (bool, String) {
    println!("$ stm32flash {}", args.join(" "));
    let out = Command::new("stm32flash").args(args).output().expect("run stm32flash");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for line in text.lines() {
        let progress: Vec<&str> = line.split('\r').filter(|l| !l.trim().is_empty()).collect();
        match progress.as_slice() {
            [] => println!(),
            [one] => println!("{one}"),
            [first, .., last] => println!("{first} [...] {last}"),
        }
    }
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stm32flash_write_verify_read_over_pty() {
    if !stm32flash_available() {
        eprintln!("SKIPPED: stm32flash is not installed (apt-get install stm32flash) — test not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = VendorCa::generate(&mut rand::rngs::OsRng);
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut cfg = SimConfig::new(Family::Stm32L4, 1, listen, ca);
    cfg.pty = true;
    cfg.speed = 0.0;
    let sim = Simulator::start(cfg).await.unwrap();
    let pty = sim.pty_paths()[0].to_string_lossy().into_owned();

    // 5001 bytes: 19 full 256-byte blocks and a tail stm32flash pads to a multiple of 4.
    let image: Vec<u8> = (0..5001u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let file = dir.path().join("file.bin");
    std::fs::write(&file, &image).unwrap();
    let out_file = dir.path().join("out.bin");
    let file_s = file.to_string_lossy().into_owned();
    let out_s = out_file.to_string_lossy().into_owned();

    let pty2 = pty.clone();
    let (ok, text) = tokio::task::spawn_blocking(move || {
        run(&["-m", "8n1", "-b", "115200", "-w", &file_s, "-v", "-S", "0x08000000", &pty2])
    })
    .await
    .unwrap();
    assert!(ok, "stm32flash write failed:\n{text}");
    assert!(text.contains("Device ID    : 0x0462"), "{text}");
    assert!(text.contains("Done") || text.contains("100.00%"), "{text}");

    let pty3 = pty.clone();
    let (ok, text) =
        tokio::task::spawn_blocking(move || run(&["-m", "8n1", "-b", "115200", "-r", &out_s, &pty3])).await.unwrap();
    assert!(ok, "stm32flash read failed:\n{text}");
    let read = std::fs::read(&out_file).unwrap();
    assert_eq!(read.len(), 512 * 1024, "stm32flash reads the whole 512 KiB of a 0x462");
    assert_eq!(&read[..image.len()], &image[..]);
    assert!(read[image.len()..].iter().all(|b| *b == 0xFF));
    assert_eq!(sim.target(0).unwrap().flash_image(), read);
    assert!(Path::new(&pty).exists());
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stm32flash_in_real_time() {
    if !stm32flash_available() {
        eprintln!("SKIPPED: stm32flash is not installed (apt-get install stm32flash) — test not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = VendorCa::generate(&mut rand::rngs::OsRng);
    let mut cfg = SimConfig::new(Family::Stm32L4, 1, "127.0.0.1:0".parse().unwrap(), ca);
    cfg.pty = true;
    cfg.speed = 1.0;
    let sim = Simulator::start(cfg).await.unwrap();
    let pty = sim.pty_paths()[0].to_string_lossy().into_owned();
    let image: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let file = dir.path().join("rt.bin");
    std::fs::write(&file, &image).unwrap();
    let out_file = dir.path().join("rt-out.bin");
    let (file_s, out_s) = (file.to_string_lossy().into_owned(), out_file.to_string_lossy().into_owned());
    let start = std::time::Instant::now();
    let (ok, text) = tokio::task::spawn_blocking(move || {
        let (ok, text) = run(&["-m", "8n1", "-b", "115200", "-w", &file_s, "-v", "-S", "0x08000000", &pty]);
        if !ok {
            return (ok, text);
        }
        run(&["-m", "8n1", "-b", "115200", "-r", &out_s, "-S", "0x08000000:3000", &pty])
    })
    .await
    .unwrap();
    assert!(ok, "{text}");
    // Write + verify + read of 3000 bytes at 115200 baud is at least 3 × 3000 × 11 / 115200 s.
    let elapsed = start.elapsed();
    println!("real-time run took {elapsed:?}");
    assert!(elapsed.as_secs_f64() > 0.85, "pacing missing: {elapsed:?}");
    assert_eq!(std::fs::read(&out_file).unwrap(), image);
    sim.shutdown().await.unwrap();
}
