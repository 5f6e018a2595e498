//! Fuzz the AN3155 host client's answer parsing (`flashgate_agent::bootloader`): one client
//! command runs against an in-memory fake device that replays the fuzz bytes as its answers.
//! The client must never panic and never hang: every command ends with a result or an error
//! within its bounded retries (time is paused, so timeouts cost nothing).
//!
//! Input: byte 0 picks the command, the rest are the device's answers, split at `0xA5 0x5A`
//! into pieces; the device sends the next piece each time the host has sent it something.

#![no_main]

use std::time::Duration;

use flashgate_agent::bootloader::{Bootloader, ClientConfig, Erase, MemoryImage, NoProgress};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// A small valid image (header + one empty-ish area) so `install_image` has something to send:
/// built once from the common crate's writer.
fn tiny_image() -> Vec<u8> {
    use flashgate_common::sfi::{AreaType, FirmwareKey, ImageNonce, PlainArea, image_to_vec};
    let areas = [PlainArea { area_type: AreaType::Firmware, address: 0x0800_0000, data: vec![0x11; 1500] }];
    image_to_vec(&FirmwareKey::new([7; 16]), &ImageNonce([9; 12]), &areas).expect("valid image")
}

/// Split the answers at the two-byte separator.
fn pieces(mut rest: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(pos) = rest.windows(2).position(|w| w == [0xA5, 0x5A]) {
        out.push(rest[..pos].to_vec());
        rest = &rest[pos + 2..];
    }
    out.push(rest.to_vec());
    out
}

/// The fake device: after each read of host bytes, send the next answer piece; keep reading
/// (and discarding) until the host hangs up.
async fn device(mut io: DuplexStream, answers: Vec<Vec<u8>>) {
    let mut answers = answers.into_iter();
    let mut buf = [0u8; 2048];
    loop {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if let Some(piece) = answers.next()
                    && io.write_all(&piece).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

async fn run_command(selector: u8, bl: &mut Bootloader<DuplexStream>) {
    match selector % 18 {
        0 => {
            let _ = bl.sync().await;
        }
        1 => {
            let _ = bl.get().await;
        }
        2 => {
            let _ = bl.get_version().await;
        }
        3 => {
            let _ = bl.get_id().await;
        }
        4 => {
            let _ = bl.read_memory(0x0800_0000, usize::from(selector) + 1).await;
        }
        5 => {
            let _ = bl.write_memory(0x0800_0000, &[0xAB; 16]).await;
        }
        6 => {
            let _ = bl.extended_erase(&Erase::Mass).await;
        }
        7 => {
            let _ = bl.extended_erase(&Erase::Pages(vec![0, 1, 2])).await;
        }
        8 => {
            let _ = bl.go(0x0800_0000).await;
        }
        9 => {
            let _ = bl.readout_protect().await;
        }
        10 => {
            let _ = bl.readout_unprotect().await;
        }
        11 => {
            let _ = bl.special(0x5F07, &[1, 2, 3]).await;
        }
        12 => {
            let _ = bl.extended_special(0x5F05, &[0, 0, 0, 0], &[0x55; 64]).await;
        }
        13 => {
            let _ = bl.get_certificate().await;
        }
        14 => {
            let _ = bl.get_state().await;
        }
        15 => {
            let _ = bl.install().await;
        }
        16 => {
            let _ = bl.abort().await;
        }
        _ => {
            let file = tiny_image();
            let mut image = MemoryImage::from_bytes(&file, None).expect("valid image");
            let _ = bl.install_image(&mut image, &[0x33; 132], &mut NoProgress).await;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let answers = pieces(rest);
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("runtime");
    rt.block_on(async move {
        let (host, dev) = tokio::io::duplex(64 * 1024);
        let device = tokio::spawn(device(dev, answers));
        let cfg = ClientConfig {
            ack_timeout: Duration::from_millis(20),
            erase_timeout: Duration::from_millis(50),
            install_timeout: Duration::from_millis(80),
            retries: 2,
            resync_quiet: Duration::from_millis(5),
            line_baud: None,
        };
        let mut bl = Bootloader::new(host, cfg);
        tokio::time::timeout(Duration::from_secs(3600), run_command(selector, &mut bl))
            .await
            .expect("a client command never hangs");
        drop(bl);
        let _ = device.await;
    });
});
