//! Unit tests of the host client against in-memory fake devices: a scripted one that checks the
//! host's exact bytes and answers from a script (framing, NACK/timeout/garbled → retry, bounded
//! retries), and a lenient SFI acceptor for the install pipeline (chunking, offsets, progress).
//! Time is paused, so timeouts elapse instantly and deterministically.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flashgate_common::protocol::{ACK, NACK, SUPPORTED_COMMANDS, SfiOpcode, SfiState, SfiStatus};
use flashgate_common::sfi::{AreaType, FirmwareKey, ImageNonce, PlainArea, image_to_vec};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
use tokio::task::JoinHandle;

use super::*;

/// One step of a scripted device.
enum Step {
    /// Read exactly these bytes from the host (a mismatch fails the test).
    Expect(Vec<u8>),
    /// Send these bytes to the host.
    Reply(Vec<u8>),
    /// Read and discard this many bytes (a frame the device "lost").
    Swallow(usize),
}
use Step::*;

fn ex(b: &[u8]) -> Step {
    Expect(b.to_vec())
}
fn re(b: &[u8]) -> Step {
    Reply(b.to_vec())
}

/// Run a script on the device end; returns an error describing the first mismatch.
fn scripted(script: Vec<Step>) -> (DuplexStream, JoinHandle<Result<(), String>>) {
    let (host, mut dev) = duplex(64 * 1024);
    let task = tokio::spawn(async move {
        for (i, step) in script.into_iter().enumerate() {
            match step {
                Expect(want) => {
                    let mut got = vec![0u8; want.len()];
                    dev.read_exact(&mut got).await.map_err(|e| format!("step {i}: {e}"))?;
                    if got != want {
                        return Err(format!("step {i}: host sent {got:02X?}, expected {want:02X?}"));
                    }
                }
                Reply(bytes) => dev.write_all(&bytes).await.map_err(|e| e.to_string())?,
                Swallow(n) => {
                    let mut got = vec![0u8; n];
                    dev.read_exact(&mut got).await.map_err(|e| format!("step {i}: {e}"))?;
                }
            }
        }
        // Keep the line open until the host is done.
        let mut rest = Vec::new();
        let _ = dev.read_to_end(&mut rest).await;
        if rest.is_empty() { Ok(()) } else { Err(format!("host sent extra bytes {rest:02X?}")) }
    });
    (host, task)
}

fn cfg() -> ClientConfig {
    ClientConfig {
        ack_timeout: Duration::from_millis(100),
        erase_timeout: Duration::from_millis(500),
        install_timeout: Duration::from_millis(900),
        retries: 2,
        resync_quiet: Duration::from_millis(10),
        line_baud: None,
    }
}

/// A client already synchronised (the script must start with the sync exchange).
fn sync_steps() -> Vec<Step> {
    vec![ex(&[0x7F]), re(&[ACK])]
}

async fn run<F, Fut, R>(script: Vec<Step>, f: F) -> R
where
    F: FnOnce(Bootloader<DuplexStream>) -> Fut,
    Fut: std::future::Future<Output = (R, Bootloader<DuplexStream>)>,
{
    let (host, task) = scripted(script);
    let (r, bl) = f(Bootloader::new(host, cfg())).await;
    drop(bl);
    task.await.unwrap().unwrap();
    r
}

#[tokio::test(start_paused = true)]
async fn standard_commands_exact_bytes() {
    let mut script = sync_steps();
    // Get
    script.extend([ex(&[0x00, 0xFF]), re(&[ACK, 11, 0x31]), re(&SUPPORTED_COMMANDS), re(&[ACK])]);
    // Get Version
    script.extend([ex(&[0x01, 0xFE]), re(&[ACK, 0x31, 0, 0, ACK])]);
    // Get ID
    script.extend([ex(&[0x02, 0xFD]), re(&[ACK, 1, 0x04, 0x62, ACK])]);
    // Read Memory 4 bytes at 0x08000000
    script.extend([
        ex(&[0x11, 0xEE]),
        re(&[ACK]),
        ex(&[0x08, 0, 0, 0, 0x08]),
        re(&[ACK]),
        ex(&[0x03, 0xFC]),
        re(&[ACK, 0xDE, 0xAD, 0xBE, 0xEF]),
    ]);
    // Write Memory 4 bytes at 0x08000100
    script.extend([
        ex(&[0x31, 0xCE]),
        re(&[ACK]),
        ex(&[0x08, 0, 0x01, 0, 0x09]),
        re(&[ACK]),
        ex(&[0x03, 1, 2, 3, 4, 0x07]),
        re(&[ACK]),
    ]);
    // Extended Erase mass, then pages 1 and 2
    script.extend([ex(&[0x44, 0xBB]), re(&[ACK]), ex(&[0xFF, 0xFF, 0x00]), re(&[ACK])]);
    script.extend([ex(&[0x44, 0xBB]), re(&[ACK]), ex(&[0, 1, 0, 1, 0, 2, 0x02]), re(&[ACK])]);
    // Special 0x5F07 with no data
    script.extend([
        ex(&[0x50, 0xAF]),
        re(&[ACK]),
        ex(&[0x5F, 0x07, 0x58]),
        re(&[ACK]),
        ex(&[0x00, 0x00, 0x00]),
        re(&[ACK, 0x00, 0x03, 5, 0, 0, 0x00, 0x02, 0x00, 0x00, ACK]),
    ]);
    // Extended Special 0x5F05, buffer 1 = offset 4096, buffer 2 = 3 bytes
    script.extend([
        ex(&[0x51, 0xAE]),
        re(&[ACK]),
        ex(&[0x5F, 0x05, 0x5A]),
        re(&[ACK]),
        ex(&[0x00, 0x04, 0x00, 0x00, 0x10, 0x00, 0x14]),
        re(&[ACK]),
        ex(&[0x00, 0x03, 1, 2, 3, 0x03]),
        re(&[ACK, 0x00, 0x02, 0x00, 0x00, ACK]),
    ]);
    // Go, then the next command resynchronises first (the device reset).
    script.extend([ex(&[0x21, 0xDE]), re(&[ACK]), ex(&[0x08, 0, 0, 0, 0x08]), re(&[ACK])]);
    // Readout Protect (after the resync), Readout Unprotect (after another).
    script.extend([ex(&[0x7F]), re(&[ACK]), ex(&[0x82, 0x7D]), re(&[ACK, ACK])]);
    script.extend([ex(&[0x7F]), re(&[ACK]), ex(&[0x92, 0x6D]), re(&[ACK, ACK])]);

    run(script, |mut bl| async move {
        bl.sync().await.unwrap();
        let (version, cmds) = bl.get().await.unwrap();
        assert_eq!((version, cmds.as_slice()), (0x31, &SUPPORTED_COMMANDS[..]));
        let v = bl.get_version().await.unwrap();
        assert_eq!(v, VersionInfo { version: 0x31, option_bytes: [0, 0] });
        assert_eq!(bl.get_id().await.unwrap(), 0x462);
        assert_eq!(bl.read_memory(0x0800_0000, 4).await.unwrap(), vec![0xDE, 0xAD, 0xBE, 0xEF]);
        bl.write_memory(0x0800_0100, &[1, 2, 3, 4]).await.unwrap();
        bl.extended_erase(&Erase::Mass).await.unwrap();
        bl.extended_erase(&Erase::Pages(vec![1, 2])).await.unwrap();
        let r = bl.special(0x5F07, &[]).await.unwrap();
        assert_eq!(r, SpecialResponse { data: vec![5, 0, 0], status: vec![0, 0] });
        let status = bl.extended_special(0x5F05, &4096u32.to_be_bytes(), &[1, 2, 3]).await.unwrap();
        assert_eq!(status, vec![0, 0]);
        bl.go(0x0800_0000).await.unwrap();
        bl.readout_protect().await.unwrap();
        bl.readout_unprotect().await.unwrap();
        let stats = bl.stats();
        assert_eq!(stats.retries, 0);
        assert_eq!(stats.commands, 13);
        ((), bl)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn first_command_synchronises() {
    let script = vec![ex(&[0x7F]), re(&[NACK]), ex(&[0x02, 0xFD]), re(&[ACK, 1, 0x04, 0x50, ACK])];
    let pid = run(script, |mut bl| async move { (bl.get_id().await.unwrap(), bl) }).await;
    assert_eq!(pid, 0x450);
}

#[tokio::test(start_paused = true)]
async fn argument_limits_are_refused_without_traffic() {
    run(vec![], |mut bl| async move {
        let e = bl.read_memory(0x0800_0000, 257).await.unwrap_err().to_string();
        assert_eq!(e, "Read Memory at 0x08000000: length 257 is not 1 to 256");
        let e = bl.write_memory(0x0800_0000, &[1, 2, 3]).await.unwrap_err().to_string();
        assert!(e.contains("length 3 is not a multiple of 4"), "{e}");
        assert!(bl.extended_erase(&Erase::Pages(vec![])).await.is_err());
        assert!(bl.special(1, &[0; 129]).await.is_err());
        assert!(bl.extended_special(1, &[], &[0; 1025]).await.is_err());
        assert!(bl.write_chunk(0, &[0; 1025]).await.is_err());
        ((), bl)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn nack_then_resync_then_resend() {
    let mut script = sync_steps();
    script.extend([
        ex(&[0x02, 0xFD]),
        re(&[NACK]),
        ex(&[0x7F]),
        re(&[ACK]),
        ex(&[0x02, 0xFD]),
        re(&[ACK, 1, 0x04, 0x62, ACK]),
    ]);
    run(script, |mut bl| async move {
        bl.sync().await.unwrap();
        assert_eq!(bl.get_id().await.unwrap(), 0x462);
        assert_eq!(bl.stats().retries, 1);
        ((), bl)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn timeout_then_resync_then_resend() {
    // The device loses the whole address frame (it stays silent), then answers the resync:
    // its frame timeout had expired, so 0x7F is a fresh command and gets ACK.
    let mut script = sync_steps();
    script.extend([
        ex(&[0x11, 0xEE]),
        re(&[ACK]),
        Swallow(5),
        ex(&[0x7F]),
        re(&[ACK]),
        ex(&[0x11, 0xEE]),
        re(&[ACK]),
        ex(&[0x08, 0, 0, 0, 0x08]),
        re(&[ACK]),
        ex(&[0x00, 0xFF]),
        re(&[ACK, 0x42]),
    ]);
    run(script, |mut bl| async move {
        bl.sync().await.unwrap();
        assert_eq!(bl.read_memory(0x0800_0000, 1).await.unwrap(), vec![0x42]);
        assert_eq!(bl.stats().retries, 1);
        ((), bl)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn garbled_answer_is_drained_and_retried() {
    // A corrupted ACK followed by junk: the host drains the junk, resyncs, resends.
    let mut script = sync_steps();
    script.extend([
        ex(&[0x01, 0xFE]),
        re(&[0x42, 0x31, 0, 0, ACK]),
        ex(&[0x7F]),
        re(&[ACK]),
        ex(&[0x01, 0xFE]),
        re(&[ACK, 0x31, 0, 0, ACK]),
    ]);
    run(script, |mut bl| async move {
        bl.sync().await.unwrap();
        assert_eq!(bl.get_version().await.unwrap().version, 0x31);
        let s = bl.stats();
        assert_eq!((s.retries, s.resyncs), (1, 2));
        ((), bl)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn garbled_sfi_status_is_retried() {
    // Status size corrupted (0x0102 instead of 0x0002), then an unknown status code.
    let frame = |s: &mut Vec<Step>, answer: &[u8]| {
        s.extend([ex(&[0x50, 0xAF]), re(&[ACK]), ex(&[0x5F, 0x07, 0x58]), re(&[ACK]), ex(&[0, 0, 0]), re(answer)]);
    };
    let mut script = sync_steps();
    frame(&mut script, &[ACK, 0, 3, 5, 0, 0, 0x01, 0x02, 0, 0, ACK]);
    script.extend([ex(&[0x7F]), re(&[ACK])]);
    frame(&mut script, &[ACK, 0, 3, 5, 0, 0, 0, 2, 0x40, 0, ACK]);
    script.extend([ex(&[0x7F]), re(&[ACK])]);
    frame(&mut script, &[ACK, 0, 3, 6, 0x01, 0x05, 0, 2, 0, 0, ACK]);
    run(script, |mut bl| async move {
        bl.sync().await.unwrap();
        let (state, last) = bl.get_state().await.unwrap();
        assert_eq!((state, last), (SfiState::Failed, 0x0105));
        assert_eq!(bl.stats().retries, 2);
        ((), bl)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn bounded_retries_give_a_clear_error() {
    let mut script = sync_steps();
    for _ in 0..2 {
        script.extend([ex(&[0x02, 0xFD]), re(&[NACK]), ex(&[0x7F]), re(&[ACK])]);
    }
    script.extend([ex(&[0x02, 0xFD]), re(&[NACK])]);
    run(script, |mut bl| async move {
        bl.sync().await.unwrap();
        let e = bl.get_id().await.unwrap_err();
        assert!(matches!(e, BootloaderError::RetriesExhausted { attempts: 3, .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "Get ID: gave up after 3 attempts: device answered NACK to the command byte of Get ID"
        );
        ((), bl)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn silent_device_times_out_with_context() {
    // Nobody answers at all: sync gives up after its bounded attempts.
    let (host, _dev) = duplex(1024);
    let mut bl = Bootloader::new(host, cfg());
    let e = bl.sync().await.unwrap_err().to_string();
    assert_eq!(
        e,
        "sync (0x7F): gave up after 3 attempts: timeout after 100 ms waiting for ACK or NACK \
         to 0x7F of sync (0x7F)"
    );
}

fn ext_special_ok(s: &mut Vec<Step>, opcode: u16, buf1: &[u8], buf2: &[u8], status: u16) {
    let op = opcode.to_be_bytes();
    let mut b1 = (buf1.len() as u16).to_be_bytes().to_vec();
    b1.extend_from_slice(buf1);
    b1.push(b1.iter().fold(0, |a, b| a ^ b));
    let mut b2 = (buf2.len() as u16).to_be_bytes().to_vec();
    b2.extend_from_slice(buf2);
    b2.push(b2.iter().fold(0, |a, b| a ^ b));
    let st = status.to_be_bytes();
    s.extend([
        ex(&[0x51, 0xAE]),
        re(&[ACK]),
        ex(&[op[0], op[1], op[0] ^ op[1]]),
        re(&[ACK]),
        Expect(b1),
        re(&[ACK]),
        Expect(b2),
        re(&[ACK, 0, 2, st[0], st[1], ACK]),
    ]);
}

fn special_ok(s: &mut Vec<Step>, opcode: u16, data: &[u8], status: u16) {
    let op = opcode.to_be_bytes();
    let mut answer = vec![ACK];
    answer.extend_from_slice(&(data.len() as u16).to_be_bytes());
    answer.extend_from_slice(data);
    answer.extend_from_slice(&[0, 2]);
    answer.extend_from_slice(&status.to_be_bytes());
    answer.push(ACK);
    s.extend([
        ex(&[0x50, 0xAF]),
        re(&[ACK]),
        ex(&[op[0], op[1], op[0] ^ op[1]]),
        re(&[ACK]),
        ex(&[0, 0, 0]),
        Reply(answer),
    ]);
}

#[tokio::test(start_paused = true)]
async fn device_status_becomes_plain_error() {
    let mut script = sync_steps();
    ext_special_ok(&mut script, 0x5F05, &[0, 0, 4, 0], &[9; 16], 0x0105);
    ext_special_ok(&mut script, 0x5F02, &[], &[7; 132], 0x0102);
    run(script, |mut bl| async move {
        bl.sync().await.unwrap();
        let e = bl.write_chunk(1024, &[9; 16]).await.unwrap_err();
        assert_eq!(e.device_status(), Some(SfiStatus::AreaNotAuthentic));
        assert_eq!(e.to_string(), "WRITE_CHUNK failed: area not authentic (status 0x0105)");
        let e = bl.set_licence(&[7; 132]).await.unwrap_err();
        assert_eq!(e.to_string(), "SET_LICENCE failed: licence invalid (status 0x0102)");
        ((), bl)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn certificate_read_twice_until_equal() {
    let good = [0xC5u8; CERTIFICATE_LEN];
    let mut bad = good;
    bad[100] ^= 0x10;
    let mut script = sync_steps();
    special_ok(&mut script, 0x5F01, &bad, 0);
    special_ok(&mut script, 0x5F01, &good, 0);
    special_ok(&mut script, 0x5F01, &good, 0);
    let cert = run(script, |mut bl| async move { (bl.get_certificate().await.unwrap(), bl) }).await;
    assert_eq!(cert, good);

    let mut script = sync_steps();
    for i in 0..4u8 {
        let mut c = good;
        c[0] = i;
        special_ok(&mut script, 0x5F01, &c, 0);
    }
    run(script, |mut bl| async move {
        let e = bl.get_certificate().await.unwrap_err();
        assert!(matches!(e, BootloaderError::CertificateUnstable { reads: 4 }), "{e:?}");
        ((), bl)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn install_answer_lost_is_recognised() {
    let mut script = sync_steps();
    // INSTALL executes, but the answer's final ACK is corrupted.
    script.extend([
        ex(&[0x50, 0xAF]),
        re(&[ACK]),
        ex(&[0x5F, 0x06, 0x59]),
        re(&[ACK]),
        ex(&[0, 0, 0]),
        re(&[ACK, 0, 4, 1, 2, 3, 4, 0, 2, 0, 0, 0x7A]),
        ex(&[0x7F]),
        re(&[ACK]),
    ]);
    special_ok(&mut script, 0x5F06, &[], 0x010A);
    special_ok(&mut script, 0x5F07, &[5, 0, 0], 0);
    run(script, |mut bl| async move {
        let e = bl.install().await.unwrap_err();
        assert!(matches!(e, BootloaderError::InstallAnswerLost), "{e:?}");
        ((), bl)
    })
    .await;
}

/// What the lenient SFI acceptor saw: (opcode, buffer 1, buffer 2 or Special data).
type Seen = Arc<Mutex<Vec<(u16, Vec<u8>, Vec<u8>)>>>;

/// A device that accepts every Special / Extended Special with status ok (INSTALL answers a
/// fixed CRC, GET_STATE says installed) and records what it received.
fn acceptor() -> (DuplexStream, Seen) {
    let (host, mut dev) = duplex(64 * 1024);
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 2];
        async fn buffer(dev: &mut DuplexStream) -> std::io::Result<Vec<u8>> {
            let mut size = [0u8; 2];
            dev.read_exact(&mut size).await?;
            let mut data = vec![0u8; usize::from(u16::from_be_bytes(size)) + 1];
            dev.read_exact(&mut data).await?;
            data.pop();
            Ok(data)
        }
        loop {
            if dev.read_exact(&mut buf[..1]).await.is_err() {
                return;
            }
            if buf[0] == 0x7F {
                let _ = dev.write_all(&[ACK]).await;
                continue;
            }
            let mut rest = [0u8; 1];
            let _ = dev.read_exact(&mut rest).await;
            let cmd = buf[0];
            let _ = dev.write_all(&[ACK]).await;
            let mut op = [0u8; 3];
            let _ = dev.read_exact(&mut op).await;
            let opcode = u16::from_be_bytes([op[0], op[1]]);
            let _ = dev.write_all(&[ACK]).await;
            let Ok(b1) = buffer(&mut dev).await else {
                return;
            };
            if cmd == 0x51 {
                let _ = dev.write_all(&[ACK]).await;
                let Ok(b2) = buffer(&mut dev).await else {
                    return;
                };
                log.lock().unwrap().push((opcode, b1, b2));
                let _ = dev.write_all(&[ACK, 0, 2, 0, 0, ACK]).await;
            } else {
                let licensed = log.lock().unwrap().iter().any(|s| s.0 == 0x5F02);
                log.lock().unwrap().push((opcode, b1, vec![]));
                let data: &[u8] = match opcode {
                    0x5F06 => &[0xCA, 0xFE, 0xF0, 0x0D],
                    // Idle before the session, installed after it.
                    0x5F07 if licensed => &[5, 0, 0],
                    0x5F07 => &[0, 0, 0],
                    _ => &[],
                };
                let mut answer = vec![ACK];
                answer.extend_from_slice(&(data.len() as u16).to_be_bytes());
                answer.extend_from_slice(data);
                answer.extend_from_slice(&[0, 2, 0, 0, ACK]);
                let _ = dev.write_all(&answer).await;
            }
        }
    });
    (host, seen)
}

#[tokio::test(start_paused = true)]
async fn install_image_sends_everything_in_order_with_progress() {
    let key = FirmwareKey::new([1; 16]);
    let nonce = ImageNonce([2; 12]);
    let areas = vec![
        PlainArea { area_type: AreaType::Firmware, address: 0x0800_0000, data: vec![0xAB; 2500] },
        PlainArea { area_type: AreaType::Firmware, address: 0x0800_1000, data: vec![0xCD; 1024] },
        PlainArea {
            area_type: AreaType::Config,
            address: 0,
            data: [0u32.to_le_bytes(), 0xBBu32.to_le_bytes()].concat(),
        },
    ];
    let file = image_to_vec(&key, &nonce, &areas).unwrap();
    let mut image = MemoryImage::from_bytes(&file, None).unwrap();
    let (host, seen) = acceptor();
    let mut bl = Bootloader::new(host, cfg());
    let mut reports = Vec::new();
    let mut sink = |p: &Progress| reports.push(*p);
    let report = bl.install_image(&mut image, &[3; LICENCE_LEN], &mut sink).await.unwrap();
    assert_eq!(report.crc, Some(0xCAFE_F00D));
    assert_eq!(report.areas, 3);
    assert_eq!(report.bytes, 2500 + 1024 + 8);
    assert_eq!(report.link.retries, 0);

    let seen = seen.lock().unwrap().clone();
    let ops: Vec<u16> = seen.iter().map(|s| s.0).collect();
    assert_eq!(
        ops,
        vec![0x5F07, 0x5F02, 0x5F03, 0x5F04, 0x5F05, 0x5F05, 0x5F05, 0x5F04, 0x5F05, 0x5F04, 0x5F05, 0x5F06, 0x5F07]
    );
    let seen = &seen[1..];
    assert_eq!(seen[0].2, vec![3; LICENCE_LEN]);
    assert_eq!(seen[1].2, file[..28].to_vec());
    assert_eq!(seen[2].2, file[28..58].to_vec());
    let chunks: Vec<(Vec<u8>, usize)> = seen[3..6].iter().map(|s| (s.1.clone(), s.2.len())).collect();
    assert_eq!(
        chunks,
        vec![
            (0u32.to_be_bytes().to_vec(), 1024),
            (1024u32.to_be_bytes().to_vec(), 1024),
            (2048u32.to_be_bytes().to_vec(), 452)
        ]
    );
    assert_eq!(seen[3].2, file[58..58 + 1024].to_vec());

    let total = Some(2500 + 1024 + 8);
    assert_eq!(reports.first(), Some(&Progress { stage: InstallStage::SetLicence, done: 0, total }));
    assert_eq!(reports.last(), Some(&Progress { stage: InstallStage::Finished, done: 3532, total }));
    assert!(reports.windows(2).all(|w| w[0].done <= w[1].done));
    assert!(reports.contains(&Progress {
        stage: InstallStage::WriteArea { index: 1, area_type: AreaType::Firmware },
        done: 2048,
        total
    }));
}

#[tokio::test(start_paused = true)]
async fn install_image_stops_at_device_error_without_abort() {
    let key = FirmwareKey::new([1; 16]);
    let nonce = ImageNonce([2; 12]);
    let areas = vec![PlainArea { area_type: AreaType::Firmware, address: 0x0800_0000, data: vec![1; 8] }];
    let file = image_to_vec(&key, &nonce, &areas).unwrap();
    let mut image = MemoryImage::from_bytes(&file, None).unwrap();
    let mut script = sync_steps();
    special_ok(&mut script, 0x5F07, &[0, 0, 0], 0);
    ext_special_ok(&mut script, 0x5F02, &[], &[4; LICENCE_LEN], 0);
    ext_special_ok(&mut script, 0x5F03, &[], &file[..28], 0x0104);
    run(script, |mut bl| async move {
        let e = bl.install_image(&mut image, &[4; LICENCE_LEN], &mut NoProgress).await.unwrap_err();
        assert_eq!(e.to_string(), "SET_IMAGE_HEADER failed: image header not authentic (status 0x0104)");
        ((), bl)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn install_image_aborts_when_the_source_fails() {
    struct Failing;
    impl AreaSource for Failing {
        fn header_bytes(&self) -> [u8; 28] {
            [0; 28]
        }
        fn next_area(
            &mut self,
        ) -> impl std::future::Future<
            Output = Result<Option<flashgate_common::sfi::EncryptedArea>, flashgate_common::sfi::SfiError>,
        > + Send {
            std::future::ready(Err(flashgate_common::sfi::SfiError::Io {
                offset: 28,
                source: std::io::Error::other("disk gone"),
            }))
        }
    }
    let (host, seen) = acceptor();
    let mut bl = Bootloader::new(host, cfg());
    let e = bl.install_image(&mut Failing, &[0; LICENCE_LEN], &mut NoProgress).await.unwrap_err();
    assert!(matches!(e, BootloaderError::Image(_)), "{e:?}");
    let ops: Vec<u16> = seen.lock().unwrap().iter().map(|s| s.0).collect();
    assert_eq!(ops, vec![0x5F07, 0x5F02, 0x5F03, SfiOpcode::Abort.code()]);
}
