//! Process accounting for the benchmarks: the CPU time (`/proc/PID/stat` utime and stime, all threads)
//! and resident memory (`/proc/PID/status` VmRSS / VmHWM) of another process, such as a broker started
//! by the bench scripts; resetting a process's peak RSS (`/proc/PID/clear_refs`); this process's
//! open-file limit; and the crypto floor of one licence from `openssl speed` (one P-256 key
//! generation, one ECDSA P-256 verify, one ECDH P-256) that the broker's CPU time per licence is
//! compared with.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// CPU time a process used so far, all its threads together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cpu {
    /// utime: in user space.
    pub user: Duration,
    /// stime: in the kernel on its behalf (system calls, page faults).
    pub system: Duration,
}

impl Cpu {
    /// User + system.
    pub fn total(&self) -> Duration {
        self.user + self.system
    }

    /// The time used since `earlier`.
    pub fn since(&self, earlier: &Cpu) -> Cpu {
        Cpu { user: self.user.saturating_sub(earlier.user), system: self.system.saturating_sub(earlier.system) }
    }
}

/// CPU time `pid` used so far (utime and stime of every thread), from `/proc/PID/stat`.
pub fn process_cpu(pid: u32) -> Result<Cpu> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let (user, system) = stat_cpu_ticks(&text).ok_or_else(|| anyhow!("{path}: no utime/stime fields"))?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .context("sysconf(_SC_CLK_TCK)")?
        .filter(|&hz| hz > 0)
        .ok_or_else(|| anyhow!("sysconf(_SC_CLK_TCK) gave no clock-tick rate"))?;
    let secs = |ticks: u64| Duration::from_secs_f64(ticks as f64 / hz as f64);
    Ok(Cpu { user: secs(user), system: secs(system) })
}

/// (utime, stime) in clock ticks from the text of `/proc/PID/stat` (fields 14 and 15; the command name
/// in field 2 may hold spaces and parentheses, so fields are counted after its last `)`).
pub fn stat_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime, stime))
}

/// Resident memory of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Memory {
    /// VmRSS, bytes: resident now.
    pub rss: u64,
    /// VmHWM, bytes: the peak resident size since the process started or its peak was last reset.
    pub hwm: u64,
}

/// VmRSS and VmHWM of `pid`, from `/proc/PID/status`.
pub fn process_memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status_memory(&text).ok_or_else(|| anyhow!("{path}: no VmRSS/VmHWM lines"))
}

/// VmRSS and VmHWM from the text of `/proc/PID/status` (`VmRSS:   12345 kB`).
pub fn status_memory(status: &str) -> Option<Memory> {
    let field = |name: &str| {
        status.lines().find_map(|l| {
            let v = l.strip_prefix(name)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim();
            v.parse::<u64>().ok().map(|kb| kb * 1024)
        })
    };
    Some(Memory { rss: field("VmRSS")?, hwm: field("VmHWM")? })
}

/// Resets the peak resident size (VmHWM) of `pid` to its current RSS (`echo 5 > /proc/PID/clear_refs`,
/// Linux 4.0 or later; the process must be ours).
pub fn reset_peak_memory(pid: u32) -> Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("writing 5 to {path} (resetting the peak RSS)"))
}

/// Raises this process's soft open-file limit (RLIMIT_NOFILE) to at least `needed` descriptors, up to
/// the hard limit. Returns the soft limit now in force; fails when the hard limit is below `needed`.
pub fn raise_fd_limit(needed: u64) -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft >= needed {
        return Ok(soft);
    }
    if hard < needed {
        bail!(
            "{needed} open files needed, but the hard RLIMIT_NOFILE is {hard} (raise it, e.g. `ulimit -Hn {needed}` \
             as root, or ask for fewer sockets)"
        );
    }
    setrlimit(Resource::RLIMIT_NOFILE, needed, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    Ok(needed)
}

/// Bytes as `12.3 MiB`.
pub fn fmt_mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// The command whose output [`CryptoFloor::parse`] reads.
pub const OPENSSL_SPEED: [&str; 4] = ["speed", "-seconds", "2", "ecdhp256"];

/// One licence's public-key operations as OpenSSL performs them on this machine, now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CryptoFloor {
    /// ECDSA P-256 signatures per second (stands in for key generation: both are one fixed-base
    /// scalar multiplication; a signature adds a modular inversion, so this slightly overstates it).
    pub sign_per_s: f64,
    /// ECDSA P-256 verifications per second.
    pub verify_per_s: f64,
    /// ECDH P-256 derivations per second.
    pub ecdh_per_s: f64,
}

impl CryptoFloor {
    /// Runs `openssl speed -seconds 2 ecdhp256 ecdsap256` and parses its table.
    pub fn measure() -> Result<(CryptoFloor, String)> {
        let out = std::process::Command::new("openssl")
            .args(OPENSSL_SPEED)
            .arg("ecdsap256")
            .output()
            .context("running `openssl speed` (is openssl installed?)")?;
        if !out.status.success() {
            bail!("`openssl speed` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let floor = CryptoFloor::parse(&text).ok_or_else(|| anyhow!("no P-256 ECDSA/ECDH rows in `openssl speed`"))?;
        Ok((floor, text))
    }

    /// From `openssl speed` output: the `256 bits ecdsa (nistp256)` row (…, sign/s, verify/s) and the
    /// `256 bits ecdh (nistp256)` row (…, op/s).
    pub fn parse(text: &str) -> Option<CryptoFloor> {
        let numbers = |line: &str| -> Vec<f64> {
            line.split_whitespace().filter(|w| !w.ends_with('s')).filter_map(|w| w.parse().ok()).collect()
        };
        let ecdsa = text.lines().find(|l| l.contains("ecdsa (nistp256)")).map(numbers)?;
        let ecdh = text.lines().find(|l| l.contains("ecdh (nistp256)")).map(numbers)?;
        // Rows start with the key size (256); the rates are the last columns.
        let (&verify_per_s, rest) = ecdsa.split_last()?;
        let &sign_per_s = rest.last()?;
        let &ecdh_per_s = ecdh.last()?;
        let floor = CryptoFloor { sign_per_s, verify_per_s, ecdh_per_s };
        (ecdsa.len() >= 3 && ecdh.len() >= 2 && floor.per_licence() > Duration::ZERO).then_some(floor)
    }

    /// One key generation + one verify + one ECDH.
    pub fn per_licence(&self) -> Duration {
        let secs = [self.sign_per_s, self.verify_per_s, self.ecdh_per_s]
            .iter()
            .map(|r| if *r > 0.0 { 1.0 / r } else { f64::INFINITY })
            .sum::<f64>();
        if secs.is_finite() { Duration::from_secs_f64(secs) } else { Duration::ZERO }
    }
}

/// Whether `/proc/PID` exists.
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_the_command_name() {
        let stat = "4242 (flash gate) (x)) S 1 4242 4242 0 -1 4194560 2000 0 0 0 731 269 0 0 20 0 9 0 100 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some((731, 269)));
        assert_eq!(stat_cpu_ticks("12 (x) S 1"), None);
        assert_eq!(stat_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn status_memory_lines() {
        let status = "Name:\tflashgate\nVmPeak:\t  900 kB\nVmHWM:\t   30720 kB\nVmRSS:\t   20480 kB\n";
        assert_eq!(status_memory(status), Some(Memory { rss: 20 << 20, hwm: 30 << 20 }));
        assert_eq!(status_memory("VmRSS: 1 kB\n"), None);
        assert_eq!(fmt_mib(3 << 19), "1.5 MiB");
    }

    #[test]
    fn openssl_speed_rows() {
        let text = "version: 3.0.19\n\
                    \x20                             sign    verify    sign/s verify/s\n\
                    \x20256 bits ecdsa (nistp256)   0.0000s   0.0001s  50000.0  20000.0\n\
                    \x20                             op      op/s\n\
                    \x20256 bits ecdh (nistp256)   0.0000s  25000.0\n";
        let f = CryptoFloor::parse(text).unwrap();
        assert_eq!(f, CryptoFloor { sign_per_s: 50000.0, verify_per_s: 20000.0, ecdh_per_s: 25000.0 });
        // 20 µs + 50 µs + 40 µs.
        assert_eq!((f.per_licence().as_secs_f64() * 1e6).round(), 110.0);
        assert_eq!(CryptoFloor::parse("256 bits ecdh (nistp256)   0.0000s  25000.0\n"), None);
    }
}
