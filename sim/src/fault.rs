//! Fault injection on the simulated UART byte stream: each byte independently is dropped with
//! probability `drop_rate` or corrupted (XOR with a random non-zero mask) with probability
//! `corrupt_rate`. The RNG is ChaCha8 seeded from the configured seed, with one independent stream
//! per (target, connection, direction), so a run is reproducible byte for byte from its seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Probabilities and seed of fault injection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultConfig {
    /// Probability per byte that it is lost.
    pub drop_rate: f64,
    /// Probability per byte that it is corrupted.
    pub corrupt_rate: f64,
    /// Seed of the RNG.
    pub seed: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig { drop_rate: 0.0, corrupt_rate: 0.0, seed: 0 }
    }
}

impl FaultConfig {
    /// Whether any fault can happen.
    pub fn is_active(&self) -> bool {
        self.drop_rate > 0.0 || self.corrupt_rate > 0.0
    }
}

/// Direction of a byte stream on the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Host to device.
    HostToDevice,
    /// Device to host.
    DeviceToHost,
}

/// Counters of what an injector did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Bytes seen.
    pub bytes: u64,
    /// Bytes dropped.
    pub dropped: u64,
    /// Bytes corrupted.
    pub corrupted: u64,
}

/// A seeded fault injector for one direction of one connection.
#[derive(Debug, Clone)]
pub struct FaultInjector {
    config: FaultConfig,
    rng: ChaCha8Rng,
    stats: FaultStats,
}

impl FaultInjector {
    /// An injector for `direction` of connection `connection` of target `target`.
    pub fn new(config: FaultConfig, target: usize, connection: u64, direction: Direction) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let dir = match direction {
            Direction::HostToDevice => 0,
            Direction::DeviceToHost => 1,
        };
        // Stream number: target in the high 24 bits, connection and direction below.
        let stream = ((target as u64 & 0xFF_FFFF) << 40) | ((connection & 0x7F_FFFF_FFFF) << 1) | dir;
        rng.set_stream(stream);
        FaultInjector { config, rng, stats: FaultStats::default() }
    }

    /// What the injector did so far.
    pub fn stats(&self) -> FaultStats {
        self.stats
    }

    /// Pass `input` through the faulty line, appending what arrives to `out`.
    pub fn apply(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if !self.config.is_active() {
            out.extend_from_slice(input);
            self.stats.bytes += input.len() as u64;
            return;
        }
        for &b in input {
            self.stats.bytes += 1;
            let r: f64 = self.rng.r#gen();
            if r < self.config.drop_rate {
                self.stats.dropped += 1;
            } else if r < self.config.drop_rate + self.config.corrupt_rate {
                let mask: u8 = self.rng.gen_range(1..=255);
                self.stats.corrupted += 1;
                out.push(b ^ mask);
            } else {
                out.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn run(seed: u64, conn: u64) -> (Vec<u8>, FaultStats) {
        let cfg = FaultConfig { drop_rate: 0.05, corrupt_rate: 0.05, seed };
        let mut f = FaultInjector::new(cfg, 0, conn, Direction::HostToDevice);
        let input: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        for chunk in input.chunks(100) {
            f.apply(chunk, &mut out);
        }
        (out, f.stats())
    }

    #[test]
    fn reproducible_by_seed() {
        let (a, sa) = run(42, 0);
        let (b, sb) = run(42, 0);
        assert_eq!(a, b);
        assert_eq!(sa, sb);
        assert!(sa.dropped > 100 && sa.dropped < 330, "{sa:?}");
        assert!(sa.corrupted > 100 && sa.corrupted < 330, "{sa:?}");
        assert_eq!(a.len() as u64, 4096 - sa.dropped);
        let (c, _) = run(43, 0);
        assert_ne!(a, c);
        let (d, _) = run(42, 1);
        assert_ne!(a, d);
    }

    #[test]
    fn inactive_is_transparent() {
        let mut f = FaultInjector::new(FaultConfig::default(), 3, 7, Direction::DeviceToHost);
        let mut out = Vec::new();
        f.apply(b"hello", &mut out);
        assert_eq!(out, b"hello");
        assert_eq!(f.stats().bytes, 5);
    }
}
