//! Bounds and checks on every field a station sends, applied before any work, log line, span field,
//! error message or audit record sees the value (docs/security-model.md lists them).
//!
//! Owns: the named limits ([`MAX_BATCH_ID`], [`MAX_RESULT_ID`], [`MAX_MESSAGE`], [`MAX_PROBE_ID`],
//! [`MAX_PROBES`], [`MAX_TIMINGS`], …), the per-service decode limits ([`STATION_DECODE_LIMIT`]), the
//! field checks that refuse with `INVALID_ARGUMENT` naming the field and its limit — never echoing the
//! value — and [`shown`], the bounded, escaped form in which a value may appear in a log line or an
//! audit record when it has to appear at all.

use tonic::Status;

/// Longest batch id in bytes (the same rule as `CreateBatch`: 1 to 64 bytes, no `/`, no control
/// characters).
pub const MAX_BATCH_ID: usize = 64;
/// Longest `result_id` (the station's idempotency key of an install report), bytes.
pub const MAX_RESULT_ID: usize = 128;
/// Longest free-text `message` of an install report or `DeviceDone`, bytes.
pub const MAX_MESSAGE: usize = 1024;
/// Longest probe id, probe kind or probe port, bytes.
pub const MAX_PROBE_ID: usize = 128;
/// Most probes one station may report.
pub const MAX_PROBES: usize = 256;
/// Most stage timings in one install report.
pub const MAX_TIMINGS: usize = 32;
/// Longest stage name (of a timing or a `DeviceProgress`), bytes.
pub const MAX_STAGE: usize = 32;
/// Longest agent version string, bytes.
pub const MAX_AGENT_VERSION: usize = 64;
/// Largest chip certificate accepted for parsing, bytes (a profile-v1 certificate is far smaller).
pub const MAX_CHIP_CERTIFICATE: usize = 4096;
/// Device ids are `hex(SHA-256(chip_pub))[0..32]`.
pub const DEVICE_ID_LEN: usize = 32;
/// Image ids are the lowercase hex SHA-256 of the `.sfi` file.
pub const IMAGE_SHA256_LEN: usize = 64;
/// Decode limit of `LicenceService`, `ImageService` and `StationService` requests and stream messages:
/// the largest legitimate one (a heartbeat with [`MAX_PROBES`] probes of maximal ids) stays well below.
pub const STATION_DECODE_LIMIT: usize = 16 * 1024;
/// Largest message `SiteService` decodes: a `Replicate` of its most records
/// ([`crate::ledger::replica::MAX_REPLICATE_RECORDS`]), each with fields at their limits (details, timings and
/// message of a few KiB each), fits with room to spare.
pub const SITE_DECODE_LIMIT: usize = 4 * 1024 * 1024;
/// How many bytes of an untrusted value [`shown`] keeps.
pub const SHOWN_PREFIX: usize = 48;

/// `INVALID_ARGUMENT` naming `field` and what is wrong with it (the value itself is not echoed).
pub fn invalid(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// A non-empty identifier of at most `max` bytes without control characters.
pub fn identifier(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid(field, "is empty"));
    }
    optional_identifier(field, value, max)
}

/// Like [`identifier`], but the empty string is allowed.
pub fn optional_identifier(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(invalid(field, format!("is {} bytes long, the limit is {max}", value.len())));
    }
    if has_control(value) {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(())
}

/// Free text of at most `max` bytes (control characters allowed; they are escaped wherever shown).
pub fn text(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(invalid(field, format!("is {} bytes long, the limit is {max}", value.len())));
    }
    Ok(())
}

/// A batch id by the rule of `CreateBatch`.
pub fn batch_id(field: &str, value: &str) -> Result<(), Status> {
    identifier(field, value, MAX_BATCH_ID)?;
    if value.contains('/') {
        return Err(invalid(field, "contains '/'"));
    }
    Ok(())
}

/// Exactly `len` lowercase hex digits.
fn hex_id(field: &str, value: &str, len: usize, what: &str) -> Result<(), Status> {
    if value.len() != len || !value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(invalid(field, format!("must be {len} lowercase hex digits ({what})")));
    }
    Ok(())
}

/// A device id: 32 lowercase hex digits.
pub fn device_id(field: &str, value: &str) -> Result<(), Status> {
    hex_id(field, value, DEVICE_ID_LEN, "hex(SHA-256(chip public key))[0..32]")
}

/// An image id: 64 lowercase hex digits.
pub fn image_sha256(field: &str, value: &str) -> Result<(), Status> {
    hex_id(field, value, IMAGE_SHA256_LEN, "the SHA-256 of the .sfi file")
}

/// A reported probe: id, kind and port each an identifier of at most [`MAX_PROBE_ID`] bytes.
pub fn probe(field: &str, p: &flashgate_proto::v1::ProbeInfo) -> Result<(), Status> {
    identifier(&format!("{field}.probe_id"), &p.probe_id, MAX_PROBE_ID)?;
    optional_identifier(&format!("{field}.kind"), &p.kind, MAX_PROBE_ID)?;
    optional_identifier(&format!("{field}.port"), &p.port, MAX_PROBE_ID)?;
    Ok(())
}

/// A station's probe list: at most [`MAX_PROBES`], each valid.
pub fn probes(field: &str, list: &[flashgate_proto::v1::ProbeInfo]) -> Result<(), Status> {
    if list.len() > MAX_PROBES {
        return Err(invalid(field, format!("lists {} probes, the limit is {MAX_PROBES}", list.len())));
    }
    list.iter().enumerate().try_for_each(|(i, p)| probe(&format!("{field}[{i}]"), p))
}

/// A value from a request in a bounded, escaped form for logs and audit records: at most
/// [`SHOWN_PREFIX`] bytes (cut at a character boundary), control characters escaped, and the full
/// length noted when cut.
pub fn shown(value: &str) -> String {
    let mut cut = value.len().min(SHOWN_PREFIX);
    while !value.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out: String = value[..cut].chars().flat_map(char::escape_debug).collect();
    if cut < value.len() {
        out.push_str(&format!("… ({} bytes)", value.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn identifiers_at_their_edge() {
        assert!(identifier("f", &"a".repeat(MAX_RESULT_ID), MAX_RESULT_ID).is_ok());
        let e = identifier("result_id", &"a".repeat(MAX_RESULT_ID + 1), MAX_RESULT_ID).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.message(), "result_id: is 129 bytes long, the limit is 128");
        assert!(identifier("f", "", 8).is_err());
        assert!(optional_identifier("f", "", 8).is_ok());
        let e = identifier("batch_id", "a\0b", 8).unwrap_err();
        assert!(e.message().contains("control"), "{}", e.message());
        assert!(!e.message().contains("a\0b"));
    }

    #[test]
    fn batch_ids_follow_create_batch() {
        assert!(batch_id("batch_id", &"b".repeat(64)).is_ok());
        assert!(batch_id("batch_id", &"b".repeat(65)).is_err());
        assert!(batch_id("batch_id", "lot/7").is_err());
        assert!(batch_id("batch_id", "lot\n7").is_err());
        assert!(batch_id("batch_id", "").is_err());
        // 64 bytes, not 64 characters.
        assert!(batch_id("batch_id", &"é".repeat(33)).is_err());
    }

    #[test]
    fn hex_ids() {
        assert!(device_id("device_id", &"0a".repeat(16)).is_ok());
        assert!(device_id("device_id", &"0A".repeat(16)).is_err());
        assert!(device_id("device_id", &"0a".repeat(17)).is_err());
        assert!(image_sha256("image_sha256", &"f".repeat(64)).is_ok());
        let e = image_sha256("image_sha256", &"x".repeat(8_000_000)).unwrap_err();
        assert!(e.message().len() < 100);
    }

    #[test]
    fn probe_lists_are_capped() {
        let p = |id: &str| flashgate_proto::v1::ProbeInfo { probe_id: id.into(), kind: "tcp".into(), port: "x".into() };
        let list: Vec<_> = (0..MAX_PROBES).map(|i| p(&i.to_string())).collect();
        assert!(probes("probes", &list).is_ok());
        let mut more = list.clone();
        more.push(p("x"));
        assert_eq!(probes("probes", &more).unwrap_err().message(), "probes: lists 257 probes, the limit is 256");
        let e = probes("probes", &[p(&"i".repeat(MAX_PROBE_ID + 1))]).unwrap_err();
        assert_eq!(e.message(), "probes[0].probe_id: is 129 bytes long, the limit is 128");
    }

    #[test]
    fn shown_values_are_bounded_and_escaped() {
        assert_eq!(shown("lot-7"), "lot-7");
        assert_eq!(shown("a\0b\n"), "a\\0b\\n");
        let long = shown(&"x".repeat(8 << 20));
        assert!(long.len() < 80, "{long}");
        assert!(long.ends_with("(8388608 bytes)"));
        // Cut at a character boundary.
        let s = shown(&"é".repeat(100));
        assert!(s.starts_with("éé"));
    }
}
