//! One module per subcommand: argument definitions and the glue to the libraries.

pub mod admin;
pub mod agent;
pub mod agent_ui;
pub mod audit;
pub mod bench;
pub mod bench_attach;
pub mod bench_flood;
pub mod bench_install;
pub mod bench_ledger;
pub mod bench_licences;
pub mod bench_proc;
pub mod broker;
pub mod client;
pub mod completions;
pub mod config;
pub mod console;
pub mod demo;
pub mod lab;
pub mod man;
pub mod pack;
pub mod pki;
pub mod sfi;
pub mod sim;
pub mod trace;

/// A clap value parser for a whole number from `min` to `max`, whose error says so in words
/// (clap's own `.range()` prints Rust syntax such as `2..=64`).
pub fn number_between<T>(min: T, max: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
{
    move |s: &str| match s.trim().parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(format!("expected a whole number from {min} to {max}")),
    }
}

/// A clap value parser for a whole number of at least `min` (and at most what `T` holds).
pub fn number_at_least<T>(min: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
{
    move |s: &str| match s.trim().parse::<T>() {
        Ok(v) if v >= min => Ok(v),
        _ => Err(format!("expected a whole number of at least {min}")),
    }
}

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
    use super::{number_at_least, number_between, parse_size};

    #[test]
    fn numbers_in_words() {
        let p = number_between(2u32, 64);
        assert_eq!(p("8"), Ok(8));
        assert_eq!(p("64"), Ok(64));
        assert_eq!(p("65").unwrap_err(), "expected a whole number from 2 to 64");
        assert_eq!(p("1").unwrap_err(), "expected a whole number from 2 to 64");
        assert_eq!(p("x").unwrap_err(), "expected a whole number from 2 to 64");
        let q = number_at_least(1i64);
        assert_eq!(q("10000000"), Ok(10_000_000));
        assert_eq!(q("0").unwrap_err(), "expected a whole number of at least 1");
    }

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
