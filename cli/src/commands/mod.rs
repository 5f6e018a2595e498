//! One module per subcommand: argument definitions and the glue to the libraries.

pub mod admin;
pub mod agent;
pub mod agent_ui;
pub mod bench;
pub mod bench_attach;
pub mod bench_flood;
pub mod bench_install;
pub mod bench_licences;
pub mod bench_proc;
pub mod broker;
pub mod client;
pub mod demo;
pub mod lab;
pub mod pack;
pub mod pki;
pub mod sfi;
pub mod sim;

/// Parse `0x…` hexadecimal or decimal, with an optional `K`/`KiB`/`M`/`MiB` suffix, for sizes and addresses.
pub fn parse_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("KiB").or_else(|| t.strip_suffix('K')) {
        (n, 1024u64)
    } else if let Some(n) = t.strip_suffix("MiB").or_else(|| t.strip_suffix('M')) {
        (n, 1024 * 1024)
    } else {
        (t, 1)
    };
    let value = if let Some(h) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        num.parse::<u64>()
    }
    .map_err(|e| format!("{s:?} is not a number ({e})"))?;
    u32::try_from(value * mult).map_err(|_| format!("{s:?} does not fit in 32 bits"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("5G").is_err());
        assert!(parse_size("0x1_0000_0000").is_err());
    }
}
