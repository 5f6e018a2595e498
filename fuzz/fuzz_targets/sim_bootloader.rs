//! Fuzz the simulator's AN3155 bootloader (device side): arbitrary host bytes over an in-memory
//! duplex at speed 0 must never panic, and the session must end when the host closes the stream.
//!
//! The first input byte selects an optional valid prefix so the fuzzer also reaches the deeper SFI
//! states: bit 0 sends `0x7F` (sync), bit 1 also a SET_LICENCE with the profile's vector licence,
//! bit 2 also the vector image's SET_IMAGE_HEADER. The device is the vector chip.

#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use flashgate_common::cert::{ChipKey, VendorCa};
use flashgate_common::family::Family;
use flashgate_sim::device::{ChipIdentity, Device};
use flashgate_sim::{LinkConfig, SimTarget};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `vendor_ca_private_scalar` of `shared/spec/vectors/sfi-profile-v1.json`.
const CA_SCALAR: &str = "040671066a2b38434875ff71a88456c5a0cdad808427779d1fc682096c0f82d4";
/// `chip_private_scalar` of the vectors.
const CHIP_SCALAR: &str = "0d56f4679d26c40ab8ac53db8ac78f4abbd0f7292abcd371c2e2c7ea18a3c5e8";
/// `licence` of the vectors.
const LICENCE: &str = "46474c31010000003436323031303032ddd07d97f2ec0096c82e99d796509d3aa0a1a2a3a4a5a6a7a8a9aaab\
34103a08b570bfd7bc97e417bfd457b50c18e30c78818d6f8f8285761be0c095f2e00c055993f62a0d31739405eaf7221d1c975ee33e47e9\
90d3d7bb2e34e99a8c87d745ebe335e09fe1351b1aaee88c426562eed0db69f4";
/// The 28-byte header of `image-v1.sfi`.
const HEADER: &str = "5346494d4147494301000300b1d004dd64c6cc472600ad2bc210199c4617";

/// Decode a hex constant.
fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8).unwrap_or(0);
    digits.chunks_exact(2).map(|p| nibble(p[0]) << 4 | nibble(p[1])).collect()
}

fn identity() -> &'static ChipIdentity {
    static ID: OnceLock<ChipIdentity> = OnceLock::new();
    ID.get_or_init(|| {
        let ca = VendorCa::from_scalar(unhex(CA_SCALAR).try_into().expect("32 bytes")).expect("vector CA");
        let chip = ChipKey::from_scalar(unhex(CHIP_SCALAR).try_into().expect("32 bytes")).expect("vector chip");
        ChipIdentity::certify(Family::Stm32L4.profile(), &ca, chip)
    })
}

/// An Extended Special frame carrying `buf2` (empty buffer 1), as a host sends it.
fn extended(opcode: u16, buf2: &[u8]) -> Vec<u8> {
    let op = opcode.to_be_bytes();
    let mut v = vec![0x51, 0xAE, op[0], op[1], op[0] ^ op[1], 0x00, 0x00, 0x00];
    let mut b = (buf2.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(buf2);
    let cs = b.iter().fold(0, |a, x| a ^ x);
    v.extend_from_slice(&b);
    v.push(cs);
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = Vec::with_capacity(data.len() + 200);
    if mode & 1 != 0 {
        input.push(0x7F);
        if mode & 2 != 0 {
            input.extend_from_slice(&extended(0x5F02, &unhex(LICENCE)));
            if mode & 4 != 0 {
                input.extend_from_slice(&extended(0x5F03, &unhex(HEADER)));
            }
        }
    }
    input.extend_from_slice(rest);

    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async move {
        let link = LinkConfig { speed: 0.0, frame_timeout: Duration::from_millis(50), ..LinkConfig::default() };
        let target = SimTarget::from_device(Device::new(Family::Stm32L4.profile(), identity().clone()), link);
        let io = target.connect();
        let (mut rd, mut wr) = tokio::io::split(io);
        let writer = async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        let reader = async move {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        };
        let (_, out) = tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(writer, reader) })
            .await
            .expect("the bootloader session ends when the host closes the stream");
        // Every answer byte of a session that started with sync is an ACK, a NACK or payload;
        // nothing to check byte-wise beyond not panicking, but the device never answers more
        // than it was asked: bounded by a generous factor of the input.
        assert!(out.len() <= 64 + data.len() * 300, "runaway output: {} bytes", out.len());
        // A session at RDP 0 never leaves plaintext of a failed session in flash.
        let state = target.handle().sfi_state();
        if state == flashgate_common::protocol::SfiState::Failed {
            assert!(target.handle().with_device(|d| d.flash().is_erased()));
        }
    });
});
