//! Pacing model of the simulated UART link and of the device's flash controller timing.
//!
//! A byte costs 11 bit times at the configured baud (start, 8 data, parity, stop); every change of
//! direction (the device answering after receiving) costs one more byte time; flash operations
//! take their datasheet time. All of it is divided by the `speed` factor (0 = no delays at all,
//! 1 = real time). Time is kept as accumulated deadlines on a modelled device timeline (a cursor)
//! and spent with `tokio::time::sleep_until` only before the device sends, never per byte, so timer
//! granularity does not accumulate.
//!
//! The flash controller has a one-operation write buffer: a command may start a background flash
//! operation (`start_flash`) and the device goes on receiving; the next operation first waits
//! until the previous one is done (`wait_flash_idle`).

use std::time::Duration;

use tokio::time::Instant;

use crate::fault::FaultConfig;

/// Bits per byte on the wire: start + 8 data + parity + stop.
pub const BITS_PER_BYTE: u32 = 11;
/// Default baud rate (ST's highest tested rate for the UART bootloader).
pub const DEFAULT_BAUD: u32 = 115_200;
/// Default frame timeout (real time) between two bytes of one frame.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_millis(250);

/// If the host's next bytes arrive within this much (real time) after the modelled timeline's
/// cursor, they are taken as back-to-back with it; absorbs scheduler and timer jitter.
const JITTER_SLACK: Duration = Duration::from_millis(3);

/// Link parameters of one target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// Modelled baud rate.
    pub baud: u32,
    /// Speed factor: 1 = real time, 10 = ten times faster, 0 = no delays.
    pub speed: f64,
    /// Real-time limit between two bytes of one frame; on expiry the frame is abandoned.
    pub frame_timeout: Duration,
    /// Fault injection on the byte stream.
    pub faults: FaultConfig,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            baud: DEFAULT_BAUD,
            speed: 0.0,
            frame_timeout: DEFAULT_FRAME_TIMEOUT,
            faults: FaultConfig::default(),
        }
    }
}

impl LinkConfig {
    /// A link at `baud` and `speed` without faults.
    pub fn new(baud: u32, speed: f64) -> Self {
        LinkConfig { baud, speed, ..LinkConfig::default() }
    }

    /// Unscaled time of one byte on the wire.
    pub fn byte_time(&self) -> Duration {
        if self.baud == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(u64::from(BITS_PER_BYTE) * 1_000_000_000 / u64::from(self.baud))
    }

    /// Payload bytes per second the link can carry (unscaled).
    pub fn byte_rate(&self) -> f64 {
        f64::from(self.baud) / f64::from(BITS_PER_BYTE)
    }
}

/// The modelled timeline of one connection.
#[derive(Debug)]
pub struct Pacer {
    enabled: bool,
    speed: f64,
    byte_time: Duration,
    cursor: Instant,
    flash_idle_at: Instant,
}

impl Pacer {
    /// A pacer for `config`, starting now.
    pub fn new(config: &LinkConfig) -> Self {
        let enabled = config.speed > 0.0 && config.speed.is_finite();
        let now = Instant::now();
        let mut p = Pacer { enabled, speed: config.speed, byte_time: Duration::ZERO, cursor: now, flash_idle_at: now };
        p.byte_time = p.scale(config.byte_time());
        p
    }

    /// Whether delays are modelled at all (speed > 0).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// A modelled duration divided by the speed factor (zero when disabled).
    pub fn scale(&self, d: Duration) -> Duration {
        if !self.enabled {
            return Duration::ZERO;
        }
        d.div_f64(self.speed)
    }

    /// `n` bytes arrived from the host just now: they occupy the line for `n` byte times, starting
    /// when both the line was free and they arrived.
    pub fn on_received(&mut self, n: usize) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if now > self.cursor + JITTER_SLACK {
            self.cursor = now;
        }
        self.cursor += self.byte_time * n as u32;
    }

    /// Wait until the device may put `n` bytes on the line after a turnaround, and until they
    /// have been transmitted.
    pub async fn before_send(&mut self, n: usize) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if now > self.cursor + JITTER_SLACK {
            self.cursor = now;
        }
        self.cursor += self.byte_time * (n as u32 + 1);
        // A deadline already passed needs no timer (tokio would round it up to its next tick).
        if self.cursor > Instant::now() {
            tokio::time::sleep_until(self.cursor).await;
        }
    }

    /// Wait until `n` more bytes, sent right after the previous ones without a change of
    /// direction, have been transmitted.
    pub async fn before_send_continued(&mut self, n: usize) {
        if !self.enabled {
            return;
        }
        self.cursor += self.byte_time * n as u32;
        if self.cursor > Instant::now() {
            tokio::time::sleep_until(self.cursor).await;
        }
    }

    /// Advance the timeline until the previous flash operation is done.
    pub fn wait_flash_idle(&mut self) {
        if self.enabled && self.flash_idle_at > self.cursor {
            self.cursor = self.flash_idle_at;
        }
    }

    /// Start a flash operation of (unscaled) duration `d` now on the timeline, in the background.
    pub fn start_flash(&mut self, d: Duration) {
        if !self.enabled {
            return;
        }
        self.wait_flash_idle();
        self.flash_idle_at = self.cursor + self.scale(d);
    }

    /// Run a flash operation of (unscaled) duration `d` to completion on the timeline.
    pub fn run_flash(&mut self, d: Duration) {
        self.start_flash(d);
        self.wait_flash_idle();
    }

    /// The modelled time the device's timeline has reached.
    pub fn cursor(&self) -> Instant {
        self.cursor
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn byte_time_at_115200() {
        let c = LinkConfig::new(115_200, 1.0);
        assert_eq!(c.byte_time(), Duration::from_nanos(95_486));
        assert!((c.byte_rate() - 10_472.7).abs() < 0.1);
        let p = Pacer::new(&LinkConfig::new(115_200, 10.0));
        assert_eq!(p.scale(Duration::from_millis(100)), Duration::from_millis(10));
        let off = Pacer::new(&LinkConfig::new(115_200, 0.0));
        assert!(!off.enabled());
        assert_eq!(off.scale(Duration::from_secs(5)), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_accumulate() {
        let cfg = LinkConfig::new(11_000, 1.0); // 1 ms per byte
        let mut p = Pacer::new(&cfg);
        let t0 = Instant::now();
        p.on_received(100);
        p.before_send(1).await; // 100 + 1 turnaround + 1
        assert_eq!(Instant::now() - t0, Duration::from_millis(102));
        // Flash in the background overlaps the next reception.
        p.start_flash(Duration::from_millis(50));
        p.on_received(100);
        p.wait_flash_idle();
        p.before_send(1).await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(204));
        // A longer flash operation delays the answer.
        p.start_flash(Duration::from_millis(500));
        p.on_received(10);
        p.wait_flash_idle();
        p.before_send(1).await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(706));
    }
}
