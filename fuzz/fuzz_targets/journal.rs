//! Fuzz the agent's journal recovery with arbitrary file contents (a disk can hand back anything):
//! reading and opening never panic; when the journal opens, an append survives a reopen and the
//! earlier entries are unchanged.

#![no_main]

use flashgate_agent::journal::{DeviceResult, ID_FILE, Journal, LOG_FILE};
use libfuzzer_sys::fuzz_target;

fn result() -> DeviceResult {
    DeviceResult {
        batch_id: "b".into(),
        device_id: "00112233445566778899aabbccddeeff".into(),
        status_code: 0,
        message: "installed".into(),
        flash_crc: Some(1),
        attempt: 1,
        probe_id: "p".into(),
        probe_kind: "tcp".into(),
        probe_port: "tcp://127.0.0.1:1".into(),
        timings: vec![("total".into(), 1)],
        finished_at_ms: 1,
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("fg-journal-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join(ID_FILE), "0123456789abcdef\n").expect("id file");
    std::fs::write(dir.join(LOG_FILE), data).expect("log file");
    let _ = Journal::read_entries(&dir);
    if let Ok(j) = Journal::open(&dir) {
        let before = j.entries().expect("entries of an open journal");
        let e = j.append(result()).expect("append");
        drop(j);
        let j = Journal::open(&dir).expect("reopen after append");
        let after = j.entries().expect("entries after reopen");
        assert_eq!(after.len(), before.len() + 1);
        assert_eq!(after.last().map(|(x, _)| x.seq), Some(e.seq));
    }
    let _ = std::fs::remove_dir_all(&dir);
});
