//! Bandwidth: parsing rates typed by people, and the token buckets that hold
//! the node's global upload and download limits.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};

/// Parse a rate such as `10MB/s`, `800KiB/s`, `100Mbit/s` or `5MB/s` into
/// bytes per second.
///
/// Units: `B` bytes; `bit` or `b` bits; decimal prefixes `k`, `M`, `G`, `T`
/// (powers of 1000) and binary prefixes `Ki`, `Mi`, `Gi`, `Ti` (powers of
/// 1024), in any case. The `/s` (or `ps`) suffix is optional and the number
/// may have a fraction (`1.5MB/s`). A bare number is bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, RateError> {
    let text = s.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(RateError::NoNumber(s.to_owned()));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| RateError::NoNumber(s.to_owned()))?;
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("/s")
        .or_else(|| unit.strip_suffix("ps"))
        .unwrap_or(unit);
    let (prefix, base) = split_unit(unit).ok_or_else(|| RateError::Unit(s.to_owned()))?;
    let multiplier = match prefix.to_ascii_lowercase().as_str() {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024.0 * 1024.0,
        "gi" => 1024.0 * 1024.0 * 1024.0,
        "ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(RateError::Unit(s.to_owned())),
    };
    let bytes = value * multiplier / if base == Base::Bits { 8.0 } else { 1.0 };
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(RateError::TooLarge(s.to_owned()));
    }
    let bytes = bytes.round() as u64;
    if bytes == 0 {
        return Err(RateError::Zero(s.to_owned()));
    }
    Ok(bytes)
}

#[derive(PartialEq, Eq)]
enum Base {
    Bytes,
    Bits,
}

/// Split `MiB` into (`Mi`, bytes), `Mbit` or `Mb` into (`M`, bits).
fn split_unit(unit: &str) -> Option<(&str, Base)> {
    if unit.is_empty() {
        return Some(("", Base::Bytes));
    }
    let lower = unit.to_ascii_lowercase();
    if lower.ends_with("bit") {
        return Some((&unit[..unit.len() - 3], Base::Bits));
    }
    if let Some(prefix) = unit.strip_suffix('B') {
        return Some((prefix, Base::Bytes));
    }
    if let Some(prefix) = unit.strip_suffix('b') {
        return Some((prefix, Base::Bits));
    }
    None
}

/// Why a rate could not be read.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RateError {
    /// The text does not start with a number.
    #[error("rate {0:?} does not start with a number (try 5MB/s)")]
    NoNumber(String),
    /// The unit is not one we know.
    #[error("rate {0:?} has an unknown unit (try B/s, kB/s, MB/s, KiB/s, MiB/s, Mbit/s)")]
    Unit(String),
    /// The rate is zero.
    #[error("rate {0:?} is zero")]
    Zero(String),
    /// The rate does not fit in 64 bits.
    #[error("rate {0:?} is too large")]
    TooLarge(String),
}

/// The largest piece of data one stream moves per token request, so that
/// many streams sharing a limit take turns in small steps.
pub(crate) const PIECE: usize = 16 * 1024;

/// A token bucket over bytes (a GCRA from `governor`).
///
/// One token stands for `unit` bytes, chosen so a token takes about a
/// microsecond to refill: governor counts time in whole nanoseconds per
/// token, and one-byte tokens would round badly above 100 MB/s.
#[derive(Debug)]
pub(crate) struct Limiter {
    bucket: RateLimiter<
        governor::state::NotKeyed,
        governor::state::InMemoryState,
        DefaultClock,
        governor::middleware::NoOpMiddleware<<DefaultClock as Clock>::Instant>,
    >,
    unit: u64,
    max_tokens: u32,
    #[cfg_attr(not(test), allow(dead_code))]
    period: Duration,
    /// Bytes taken from the bucket by streams that ended before they
    /// used them (a stream takes a piece's worth before it reads, and a
    /// request's last read rarely uses all of it): the next taker gets
    /// them first. Without this, a download made of many short request
    /// streams ran ~12% under its limit. At most one burst.
    spare: AtomicU64,
    /// Bytes granted from the bucket in all (tests).
    #[cfg(test)]
    pub(crate) drawn: AtomicU64,
}

impl Limiter {
    /// A limiter for `rate` bytes per second. The burst is a sixteenth of a
    /// second of traffic, but at least one piece and at most 4 MiB.
    pub(crate) fn new(rate: u64) -> Self {
        let rate = rate.max(1);
        let unit = (rate / 1_000_000).max(1);
        let period_ns = (u128::from(unit) * 1_000_000_000 / u128::from(rate)).max(1);
        let period = Duration::from_nanos(u64::try_from(period_ns).unwrap_or(u64::MAX));
        let burst_bytes = (rate / 16).clamp(PIECE as u64, 4 << 20);
        let max_tokens = u32::try_from(burst_bytes.div_ceil(unit))
            .unwrap_or(u32::MAX)
            .max(1);
        let burst = NonZeroU32::new(max_tokens).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        Limiter {
            bucket: RateLimiter::direct(quota),
            unit,
            max_tokens,
            period,
            spare: AtomicU64::new(0),
            #[cfg(test)]
            drawn: AtomicU64::new(0),
        }
    }

    /// Bytes granted but not used (a stream that ended): kept for the
    /// next taker, up to one burst.
    pub(crate) fn give_back(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let cap = u64::from(self.max_tokens) * self.unit;
        let _ = self
            .spare
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_add(bytes as u64).min(cap))
            });
    }

    /// Take tokens for up to `bytes` bytes: the number of bytes granted
    /// (never more than one burst, possibly a little more than asked as
    /// tokens are whole), or how long to wait before asking again.
    pub(crate) fn try_take(&self, bytes: usize) -> Result<usize, Duration> {
        let spare = self.spare.swap(0, Ordering::Relaxed);
        if spare > 0 {
            let granted = spare.min(bytes.max(1) as u64);
            if spare > granted {
                self.give_back((spare - granted) as usize);
            }
            return Ok(granted as usize);
        }
        let tokens = (bytes.max(1) as u64).div_ceil(self.unit);
        let tokens = u32::try_from(tokens)
            .unwrap_or(u32::MAX)
            .clamp(1, self.max_tokens);
        let n = NonZeroU32::new(tokens).unwrap_or(NonZeroU32::MIN);
        match self.bucket.check_n(n) {
            Ok(Ok(())) => {
                #[cfg(test)]
                self.drawn
                    .fetch_add(u64::from(tokens) * self.unit, Ordering::Relaxed);
                Ok((u64::from(tokens) * self.unit) as usize)
            }
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.bucket.clock().now())),
            // cannot happen: tokens <= max_tokens; wait a little and retry
            Err(_) => Err(Duration::from_millis(1)),
        }
    }

    /// Wait until tokens for up to `bytes` bytes are granted.
    pub(crate) async fn take(&self, bytes: usize) -> usize {
        loop {
            match self.try_take(bytes) {
                Ok(granted) => return granted,
                Err(wait) => tokio::time::sleep(wait.max(Duration::from_micros(100))).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        let check = |s: &str, want: u64| assert_eq!(parse_rate(s), Ok(want), "{s}");
        check("10MB/s", 10_000_000);
        check("5MB/s", 5_000_000);
        check("800KiB/s", 800 * 1024);
        check("100Mbit/s", 12_500_000);
        check("100Mb/s", 12_500_000);
        check("100mbit", 12_500_000);
        check("1.5 MiB/s", 1_572_864);
        check("2GB/s", 2_000_000_000);
        check("1GiB/s", 1 << 30);
        check("8Gibit/s", 1 << 30);
        check("64kB/s", 64_000);
        check("64KB", 64_000);
        check("1000", 1000);
        check("1000B/s", 1000);
        check(" 8kbps ", 1000);
    }

    #[test]
    fn bad_rates() {
        for s in [
            "",
            "MB/s",
            "10XB/s",
            "10 parsecs",
            "0MB/s",
            "1.2.3MB/s",
            "-5MB/s",
            "1e999",
        ] {
            assert!(parse_rate(s).is_err(), "{s:?} parsed");
        }
        assert!(
            parse_rate("10XB/s")
                .unwrap_err()
                .to_string()
                .contains("unknown unit")
        );
    }

    #[test]
    fn bytes_given_back_go_to_the_next_taker_without_waiting() {
        let l = Limiter::new(1_000_000);
        // Empty the bucket (one burst), then it makes the caller wait.
        while l.try_take(PIECE).is_ok() {}
        assert!(l.try_take(PIECE).is_err());
        l.give_back(10_000);
        assert_eq!(l.try_take(4_000), Ok(4_000));
        assert_eq!(l.try_take(PIECE), Ok(6_000));
        assert!(l.try_take(PIECE).is_err());
        // Never more than one burst is kept.
        l.give_back(usize::MAX);
        let burst = (u64::from(l.max_tokens) * l.unit) as usize;
        assert_eq!(l.try_take(usize::MAX), Ok(burst));
    }

    #[test]
    fn limiter_units_keep_the_rate_exact() {
        for rate in [1_000u64, 5_000_000, 300_000_000, 1 << 30, 40_000_000_000] {
            let l = Limiter::new(rate);
            let tokens_per_s = 1e9 / l.period.as_nanos() as f64;
            let got = tokens_per_s * l.unit as f64;
            assert!((got / rate as f64 - 1.0).abs() < 0.01, "{rate}: {got}");
        }
    }
}
