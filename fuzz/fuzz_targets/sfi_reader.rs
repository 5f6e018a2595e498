//! Fuzz the `.sfi` image reader: arbitrary bytes must give areas or an error naming an offset,
//! never a panic or an unbounded allocation. The async reader must agree with the sync one.

#![no_main]

use flashgate_common::family::Family;
use flashgate_common::sfi::{AsyncImageReader, EncryptedArea, ImageReader, ReaderOptions, SfiError};
use libfuzzer_sys::fuzz_target;

/// Read every area; the outcome as text so sync and async results compare.
fn read_sync(data: &[u8], opts: ReaderOptions) -> Result<Vec<EncryptedArea>, String> {
    let mut reader = ImageReader::new(data, opts).map_err(|e| e.to_string())?;
    let mut areas = Vec::new();
    loop {
        match reader.next_area() {
            Ok(Some(area)) => {
                assert_eq!(area.ciphertext.len() as u64, u64::from(area.descriptor.size));
                areas.push(area);
            }
            Ok(None) => return Ok(areas),
            Err(e) => {
                // A failed reader stays failed.
                assert!(matches!(reader.next_area(), Err(SfiError::ReaderFailed { .. })));
                return Err(e.to_string());
            }
        }
    }
}

async fn read_async(data: &[u8], opts: ReaderOptions) -> Result<Vec<EncryptedArea>, String> {
    let mut reader = AsyncImageReader::new(data, opts).await.map_err(|e| e.to_string())?;
    let mut areas = Vec::new();
    while let Some(area) = reader.next_area().await.map_err(|e| e.to_string())? {
        areas.push(area);
    }
    Ok(areas)
}

/// Run a future to completion. Reading from `&[u8]` never waits, so polling with a no-op waker
/// suffices and no runtime is built per input.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let options = [
        ReaderOptions::default(),
        ReaderOptions { file_len: Some(data.len() as u64), memory_map: Some(Family::Stm32L4.profile()) },
    ];
    for opts in options {
        let sync = read_sync(data, opts);
        let asynchronous = block_on(read_async(data, opts));
        assert_eq!(sync, asynchronous);
    }
});
