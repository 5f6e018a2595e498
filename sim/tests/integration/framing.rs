//! Byte-exact AN3155 framing of the simulated bootloader, driven with hand-written host bytes
//! over an in-memory duplex.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use crate::support::{split_image, vectors};
use flashgate_common::family::Family;
use flashgate_common::protocol::SfiState;
use flashgate_sim::device::ChipIdentity;
use flashgate_sim::{LinkConfig, SimTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const ACK: u8 = 0x79;
const NACK: u8 = 0x1F;

fn target() -> SimTarget {
    let v = vectors();
    let id = ChipIdentity::new(v.chip.clone(), v.certificate.clone()).unwrap();
    let link = LinkConfig { frame_timeout: Duration::from_millis(100), ..LinkConfig::default() };
    SimTarget::with_identity(Family::Stm32L4, id, link)
}

async fn send(io: &mut DuplexStream, bytes: &[u8]) {
    io.write_all(bytes).await.unwrap();
}

/// Read exactly `expected.len()` bytes and compare.
async fn expect(io: &mut DuplexStream, expected: &[u8]) {
    let mut got = vec![0; expected.len()];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut got))
        .await
        .expect("device answered in time")
        .unwrap();
    assert_eq!(got, expected, "device bytes");
}

/// Assert that the device sends nothing for a while.
async fn expect_silence(io: &mut DuplexStream) {
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_millis(50), io.read(&mut b)).await;
    assert!(r.is_err(), "unexpected byte {:02X?}", b);
}

fn xor(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |a, b| a ^ b)
}

/// An Extended Special frame's host bytes after the command: buffer with size and XOR.
fn buffer(data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(data);
    v.push(xor(&v));
    v
}

#[tokio::test]
async fn standard_commands_are_byte_exact() {
    let t = target();
    let mut io = t.connect();
    // Before sync, other bytes are ignored.
    send(&mut io, &[0x00, 0xFF]).await;
    expect_silence(&mut io).await;
    send(&mut io, &[0x7F]).await;
    expect(&mut io, &[ACK]).await;
    // A second 0x7F while waiting for a command is ACKed.
    send(&mut io, &[0x7F]).await;
    expect(&mut io, &[ACK]).await;

    // Get.
    send(&mut io, &[0x00, 0xFF]).await;
    expect(&mut io, &[ACK, 11, 0x31, 0x00, 0x01, 0x02, 0x11, 0x21, 0x31, 0x44, 0x50, 0x51, 0x82, 0x92, ACK]).await;
    // Get Version.
    send(&mut io, &[0x01, 0xFE]).await;
    expect(&mut io, &[ACK, 0x31, 0x00, 0x00, ACK]).await;
    // Get ID.
    send(&mut io, &[0x02, 0xFD]).await;
    expect(&mut io, &[ACK, 0x01, 0x04, 0x62, ACK]).await;

    // Write Memory: 8 bytes at 0x08000000.
    send(&mut io, &[0x31, 0xCE]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x08, 0x00, 0x00, 0x00, 0x08]).await;
    expect(&mut io, &[ACK]).await;
    let data = [1u8, 2, 3, 4, 5, 6, 7, 8];
    let mut frame = vec![7u8];
    frame.extend_from_slice(&data);
    frame.push(xor(&frame));
    send(&mut io, &frame).await;
    expect(&mut io, &[ACK]).await;

    // Read Memory: 8 bytes back.
    send(&mut io, &[0x11, 0xEE]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x08, 0x00, 0x00, 0x00, 0x08]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x07, 0xF8]).await;
    expect(&mut io, &[ACK, 1, 2, 3, 4, 5, 6, 7, 8]).await;

    // Writing the same word again is a flash error: NACK.
    send(&mut io, &[0x31, 0xCE]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x08, 0x00, 0x00, 0x00, 0x08]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &frame).await;
    expect(&mut io, &[NACK]).await;

    // Extended Erase of page 0 (N = 0, one page number, XOR).
    send(&mut io, &[0x44, 0xBB]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x00, 0x00, 0x00, 0x00, 0x00]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x11, 0xEE]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x08, 0x00, 0x00, 0x00, 0x08]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x03, 0xFC]).await;
    expect(&mut io, &[ACK, 0xFF, 0xFF, 0xFF, 0xFF]).await;

    // Extended Erase: mass erase, and a page beyond the flash (NACK).
    send(&mut io, &[0x44, 0xBB, 0xFF, 0xFF, 0x00]).await;
    expect(&mut io, &[ACK, ACK]).await;
    send(&mut io, &[0x44, 0xBB, 0x00, 0x00, 0x01, 0x00, 0x01]).await;
    expect(&mut io, &[ACK, NACK]).await;
    // Bank 2 does not exist on the single-bank L462.
    send(&mut io, &[0x44, 0xBB, 0xFF, 0xFD, 0x02]).await;
    expect(&mut io, &[ACK, NACK]).await;

    // Bad complement, unknown command, bad address checksum.
    send(&mut io, &[0x11, 0x11]).await;
    expect(&mut io, &[NACK]).await;
    send(&mut io, &[0x43, 0xBC]).await;
    expect(&mut io, &[NACK]).await;
    send(&mut io, &[0x11, 0xEE]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x08, 0x00, 0x00, 0x00, 0x09]).await;
    expect(&mut io, &[NACK]).await;
    // Read outside flash and SRAM.
    send(&mut io, &[0x11, 0xEE]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x10, 0x00, 0x00, 0x00, 0x10]).await;
    expect(&mut io, &[NACK]).await;
    // Still in sync.
    send(&mut io, &[0x7F]).await;
    expect(&mut io, &[ACK]).await;
}

#[tokio::test]
async fn special_and_extended_special_are_byte_exact() {
    let v = vectors();
    let t = target();
    let mut io = t.connect();
    send(&mut io, &[0x7F]).await;
    expect(&mut io, &[ACK]).await;

    // Special GET_CERTIFICATE: data size 136 + certificate, status size 2 + 0x0000, ACK.
    send(&mut io, &[0x50, 0xAF]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x5F, 0x01, 0x5E]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x00, 0x00, 0x00]).await;
    let mut want = vec![ACK, 0x00, 0x88];
    want.extend_from_slice(&v.certificate.to_bytes());
    want.extend_from_slice(&[0x00, 0x02, 0x00, 0x00, ACK]);
    expect(&mut io, &want).await;

    // Special GET_STATE: idle, last status 0.
    send(&mut io, &[0x50, 0xAF, 0x5F, 0x07, 0x58, 0x00, 0x00, 0x00]).await;
    expect(&mut io, &[ACK, ACK, ACK, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, ACK]).await;

    // Extended Special SET_IMAGE_HEADER in Idle: status 0x0101.
    let img = split_image(&v.image);
    send(&mut io, &[0x51, 0xAE]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x5F, 0x03, 0x5C]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &buffer(&[])).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &buffer(&img.header)).await;
    expect(&mut io, &[ACK, 0x00, 0x02, 0x01, 0x01, ACK]).await;

    // Extended Special SET_LICENCE with the vector licence: ok.
    send(&mut io, &[0x51, 0xAE, 0x5F, 0x02, 0x5D]).await;
    expect(&mut io, &[ACK, ACK]).await;
    send(&mut io, &buffer(&[])).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &buffer(&v.licence)).await;
    expect(&mut io, &[ACK, 0x00, 0x02, 0x00, 0x00, ACK]).await;
    assert_eq!(t.handle().sfi_state(), SfiState::LicenceAccepted);

    // Unknown SFI opcode: NACK after the opcode; an 0x51 opcode in 0x50: NACK too.
    send(&mut io, &[0x50, 0xAF, 0x5F, 0x99, 0xC6]).await;
    expect(&mut io, &[ACK, NACK]).await;
    send(&mut io, &[0x50, 0xAF, 0x5F, 0x02, 0x5D]).await;
    expect(&mut io, &[ACK, NACK]).await;
    // Bad opcode checksum.
    send(&mut io, &[0x51, 0xAE, 0x5F, 0x03, 0x00]).await;
    expect(&mut io, &[ACK, NACK]).await;
    // Bad buffer checksum: NACK, state unchanged.
    let mut bad = buffer(&img.header);
    *bad.last_mut().unwrap() ^= 1;
    send(&mut io, &[0x51, 0xAE, 0x5F, 0x03, 0x5C]).await;
    expect(&mut io, &[ACK, ACK]).await;
    send(&mut io, &buffer(&[])).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &bad).await;
    expect(&mut io, &[NACK]).await;
    // Oversized buffer 1 (129 bytes): consumed, then NACK.
    send(&mut io, &[0x51, 0xAE, 0x5F, 0x03, 0x5C]).await;
    expect(&mut io, &[ACK, ACK]).await;
    send(&mut io, &buffer(&[0u8; 129])).await;
    expect(&mut io, &[NACK]).await;
    assert_eq!(t.handle().sfi_state(), SfiState::LicenceAccepted);

    // The real header: ok. Then WRITE_CHUNK before START_AREA: 0x0101 and the session fails.
    send(&mut io, &[0x51, 0xAE, 0x5F, 0x03, 0x5C]).await;
    expect(&mut io, &[ACK, ACK]).await;
    send(&mut io, &buffer(&[])).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &buffer(&img.header)).await;
    expect(&mut io, &[ACK, 0x00, 0x02, 0x00, 0x00, ACK]).await;
    send(&mut io, &[0x51, 0xAE, 0x5F, 0x05, 0x5A]).await;
    expect(&mut io, &[ACK, ACK]).await;
    send(&mut io, &buffer(&[0, 0, 0, 0])).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &buffer(&[0u8; 1024])).await;
    expect(&mut io, &[ACK, 0x00, 0x02, 0x01, 0x01, ACK]).await;
    assert_eq!(t.handle().sfi_state(), SfiState::Failed);
    // GET_STATE reports failed / 0x0101.
    send(&mut io, &[0x50, 0xAF, 0x5F, 0x07, 0x58, 0x00, 0x00, 0x00]).await;
    expect(&mut io, &[ACK, ACK, ACK, 0x00, 0x03, 0x06, 0x01, 0x01, 0x00, 0x02, 0x00, 0x00, ACK]).await;
}

#[tokio::test]
async fn frame_timeout_abandons_the_frame() {
    let t = target();
    let mut io = t.connect();
    send(&mut io, &[0x7F]).await;
    expect(&mut io, &[ACK]).await;
    // Half an address, then silence beyond the 100 ms frame timeout.
    send(&mut io, &[0x11, 0xEE]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x08, 0x00]).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    // The device waits for a command again: 0x7F is ACKed, Get ID works.
    send(&mut io, &[0x7F]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x02, 0xFD]).await;
    expect(&mut io, &[ACK, 0x01, 0x04, 0x62, ACK]).await;
    // A lone command byte times out silently too.
    send(&mut io, &[0x02]).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    expect_silence(&mut io).await;
    send(&mut io, &[0x01, 0xFE]).await;
    expect(&mut io, &[ACK, 0x31, 0x00, 0x00, ACK]).await;
}

#[tokio::test]
async fn readout_protect_and_unprotect_ack_twice_then_reset() {
    let t = target();
    let mut io = t.connect();
    send(&mut io, &[0x7F]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x31, 0xCE, 0x08, 0x00, 0x00, 0x00, 0x08]).await;
    expect(&mut io, &[ACK, ACK]).await;
    send(&mut io, &[3, 0xAA, 0xBB, 0xCC, 0xDD, 3 ^ 0xAA ^ 0xBB ^ 0xCC ^ 0xDD]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x82, 0x7D]).await;
    expect(&mut io, &[ACK, ACK]).await;
    // After the reset the device ignores everything until 0x7F.
    send(&mut io, &[0x02, 0xFD]).await;
    expect_silence(&mut io).await;
    send(&mut io, &[0x7F]).await;
    expect(&mut io, &[ACK]).await;
    // Read Memory is refused under RDP 1 right after the command.
    send(&mut io, &[0x11, 0xEE]).await;
    expect(&mut io, &[NACK]).await;
    send(&mut io, &[0x31, 0xCE]).await;
    expect(&mut io, &[NACK]).await;
    send(&mut io, &[0x21, 0xDE]).await;
    expect(&mut io, &[NACK]).await;
    send(&mut io, &[0x44, 0xBB]).await;
    expect(&mut io, &[NACK]).await;
    // SFI commands answer 0x010A, GET_STATE works.
    send(&mut io, &[0x50, 0xAF, 0x5F, 0x01, 0x5E, 0x00, 0x00, 0x00]).await;
    expect(&mut io, &[ACK, ACK, ACK, 0x00, 0x00, 0x00, 0x02, 0x01, 0x0A, ACK]).await;
    assert_eq!(t.handle().flash_image()[..4], [0xAA, 0xBB, 0xCC, 0xDD]);
    // Readout Unprotect: two ACKs, mass erase, reset.
    send(&mut io, &[0x92, 0x6D]).await;
    expect(&mut io, &[ACK, ACK]).await;
    send(&mut io, &[0x7F]).await;
    expect(&mut io, &[ACK]).await;
    send(&mut io, &[0x11, 0xEE, 0x08, 0x00, 0x00, 0x00, 0x08]).await;
    expect(&mut io, &[ACK, ACK]).await;
    send(&mut io, &[0x03, 0xFC]).await;
    expect(&mut io, &[ACK, 0xFF, 0xFF, 0xFF, 0xFF]).await;
    // Go to flash: ACK, ACK, then a reset.
    send(&mut io, &[0x21, 0xDE, 0x08, 0x00, 0x00, 0x00, 0x08]).await;
    expect(&mut io, &[ACK, ACK]).await;
    send(&mut io, &[0x02, 0xFD]).await;
    expect_silence(&mut io).await;
}

#[tokio::test]
async fn a_new_connection_replaces_the_old_one() {
    let t = target();
    let mut first = t.connect();
    send(&mut first, &[0x7F]).await;
    expect(&mut first, &[ACK]).await;
    let mut second = t.connect();
    // The device stays synced across connections (same UART, new host process).
    send(&mut second, &[0x02, 0xFD]).await;
    expect(&mut second, &[ACK, 0x01, 0x04, 0x62, ACK]).await;
    // The first connection was closed.
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(1), first.read(&mut b)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0);
}
