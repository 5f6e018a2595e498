//! Every value the console takes from an HTTP request (path, query, form), bounded and checked
//! before it reaches the broker; the limits are the broker's own where it has one.

use flashgate_common::cert::{CERT_LEN, ChipCertificate};

use crate::ConsoleError;

/// Longest batch id (the broker's limit).
pub const MAX_BATCH_ID: usize = 64;
/// Length of a device id: `hex(SHA-256(chip_pub))[0..32]`.
pub const DEVICE_ID_LEN: usize = 32;
/// Longest device search text (a device id, or a pasted chip certificate in hex with separators).
pub const MAX_DEVICE_QUERY: usize = 1024;
/// Longest station identity URI.
pub const MAX_STATION: usize = 256;
/// Longest pause reason.
pub const MAX_REASON: usize = 200;
/// Largest action request body, bytes.
pub const MAX_ACTION_BODY: usize = 4096;

fn invalid(field: &'static str, why: impl Into<String>) -> ConsoleError {
    ConsoleError::Invalid { field, why: why.into() }
}

/// A batch id: 1 to [`MAX_BATCH_ID`] characters of letters, digits, `.`, `_` and `-`.
pub fn batch_id(value: &str) -> Result<&str, ConsoleError> {
    if value.is_empty() {
        return Err(invalid("batch", "is empty"));
    }
    if value.len() > MAX_BATCH_ID {
        return Err(invalid("batch", format!("is longer than {MAX_BATCH_ID} characters")));
    }
    if !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(invalid("batch", "may hold only letters, digits, '.', '_' and '-'"));
    }
    Ok(value)
}

/// A station identity: `spiffe://TD/site/SITE/station/N`, at most [`MAX_STATION`] bytes of
/// printable ASCII.
pub fn station(value: &str) -> Result<&str, ConsoleError> {
    if value.is_empty() {
        return Err(invalid("station", "is empty"));
    }
    if value.len() > MAX_STATION {
        return Err(invalid("station", format!("is longer than {MAX_STATION} characters")));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid("station", "may hold only printable ASCII without spaces"));
    }
    let Some(path) = value.strip_prefix("spiffe://") else {
        return Err(invalid("station", "is not a spiffe:// station identity"));
    };
    if !path.contains("/site/") || !path.contains("/station/") {
        return Err(invalid("station", "is not of the form spiffe://TD/site/SITE/station/N"));
    }
    Ok(value)
}

/// A pause reason: at most [`MAX_REASON`] characters, no control characters.
pub fn reason(value: &str) -> Result<&str, ConsoleError> {
    if value.chars().count() > MAX_REASON {
        return Err(invalid("reason", format!("is longer than {MAX_REASON} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid("reason", "holds control characters"));
    }
    Ok(value)
}

/// The device id a search names: a device id (32 hex digits, any case), or a chip certificate
/// pasted as hex (272 digits; spaces, colons and line breaks ignored) whose device id is taken.
pub fn device_query(value: &str) -> Result<String, ConsoleError> {
    if value.len() > MAX_DEVICE_QUERY {
        return Err(invalid("device", format!("is longer than {MAX_DEVICE_QUERY} characters")));
    }
    let digits: String = value.chars().filter(|c| !c.is_whitespace() && *c != ':').collect();
    if digits.is_empty() {
        return Err(invalid("device", "is empty"));
    }
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid("device", "is neither a device id nor a chip certificate in hex"));
    }
    match digits.len() {
        DEVICE_ID_LEN => Ok(digits.to_ascii_lowercase()),
        n if n == 2 * CERT_LEN => {
            let bytes = hex::decode(&digits).map_err(|e| invalid("device", e.to_string()))?;
            let cert = ChipCertificate::parse(&bytes).map_err(|e| invalid("device", e.to_string()))?;
            Ok(cert.device_id().to_string())
        }
        n => Err(invalid(
            "device",
            format!("has {n} hex digits: a device id has {DEVICE_ID_LEN}, a chip certificate {}", 2 * CERT_LEN),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn why(e: ConsoleError) -> String {
        e.to_string()
    }

    #[test]
    fn batch_ids() {
        assert_eq!(batch_id("b-16.v2_x").unwrap(), "b-16.v2_x");
        assert_eq!(why(batch_id("").unwrap_err()), "batch is empty");
        assert!(why(batch_id(&"b".repeat(65)).unwrap_err()).contains("longer than 64"));
        assert!(why(batch_id("b 1").unwrap_err()).contains("only letters"));
        assert!(why(batch_id("../x").unwrap_err()).contains("only letters"));
    }

    #[test]
    fn stations() {
        let s = "spiffe://factory.test/site/berlin/station/1";
        assert_eq!(station(s).unwrap(), s);
        assert!(why(station("https://x/site/a/station/1").unwrap_err()).contains("spiffe://"));
        assert!(why(station("spiffe://x/admin/ops").unwrap_err()).contains("form"));
        assert!(why(station("spiffe://x/site/a b/station/1").unwrap_err()).contains("printable"));
        assert!(why(station(&format!("{s}{}", "1".repeat(300))).unwrap_err()).contains("longer"));
    }

    #[test]
    fn reasons() {
        assert_eq!(reason("").unwrap(), "");
        assert_eq!(reason("lunch break").unwrap(), "lunch break");
        assert!(why(reason("a\nb").unwrap_err()).contains("control"));
        assert!(why(reason(&"x".repeat(201)).unwrap_err()).contains("longer than 200"));
    }

    #[test]
    fn device_queries() {
        let id = "0123456789ABCDEF0123456789abcdef";
        assert_eq!(device_query(id).unwrap(), id.to_ascii_lowercase());
        assert_eq!(device_query(&format!(" {id}\n")).unwrap(), id.to_ascii_lowercase());
        assert!(why(device_query("xyz").unwrap_err()).contains("neither"));
        assert!(why(device_query("abcd").unwrap_err()).contains("has 4 hex digits"));
        assert!(why(device_query(&"a".repeat(2000)).unwrap_err()).contains("longer than 1024"));
        // A pasted certificate: its device id is hex(SHA-256(chip_pub))[0..32].
        let mut cert = vec![b'4'; 8];
        cert.extend(std::iter::repeat_n(7u8, 64));
        cert.extend(std::iter::repeat_n(0u8, 64));
        let expected = flashgate_common::cert::ChipCertificate::parse(&cert).unwrap().device_id().to_string();
        let pasted: String =
            hex::encode(&cert).as_bytes().chunks(2).map(|c| format!("{}:", std::str::from_utf8(c).unwrap())).collect();
        assert_eq!(device_query(&pasted).unwrap(), expected);
    }
}
