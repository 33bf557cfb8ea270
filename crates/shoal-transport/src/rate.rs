//! Bandwidth: parsing rates typed by people, and the token buckets that hold
//! the node's global upload and download limits.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

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

/// The smallest burst: at low limits a piece is a sixteenth of a second of
/// traffic, down to this (at 1 KiB/s, 512 bytes every half second; a
/// 16 KiB piece came every 16 s, and the 10 s silence timers of the peer
/// and of the download took the stream for dead).
const MIN_BURST: u64 = 512;

/// A token bucket over bytes that grants in the order asked (a GCRA by
/// reservation).
///
/// Written here rather than taken from `governor`: governor answers "not
/// yet, try again in d", keeping no queue, so streams sharing a limit that
/// woke together raced for each refill and the same one could lose every
/// race (a stream starved past the 10 s its peer waits, at 1 MiB/s with
/// eight streams). Here a request reserves its bytes at once and is told
/// when they are its own; reservations are served in the order made.
#[derive(Debug)]
pub(crate) struct Limiter {
    rate: u64,
    /// A burst's bytes, and how long the bucket takes to earn them.
    burst: u64,
    tau: Duration,
    /// The largest grant: a piece, or a burst if that is smaller.
    piece: usize,
    /// When the bucket is full again if nothing more is taken (the
    /// theoretical arrival time); every reservation moves it on.
    tat: Mutex<Instant>,
    /// Bytes taken by streams that ended before they used them (a stream
    /// takes a piece's worth before it reads, and a request's last read
    /// rarely uses all of it): the next taker gets them first. Without
    /// this, a download made of many short request streams ran ~12% under
    /// its limit. At most one burst.
    spare: AtomicU64,
    /// Bytes granted from the bucket in all (tests).
    #[cfg(test)]
    pub(crate) drawn: AtomicU64,
}

impl Limiter {
    /// A limiter for `rate` bytes per second. The burst is a sixteenth of a
    /// second of traffic, but at least [`MIN_BURST`] and at most 4 MiB.
    pub(crate) fn new(rate: u64) -> Self {
        let rate = rate.max(1);
        let burst = (rate / 16).clamp(MIN_BURST, 4 << 20);
        let mut l = Limiter {
            rate,
            burst,
            tau: Duration::ZERO,
            piece: usize::try_from(burst).map_or(PIECE, |b| b.min(PIECE)),
            tat: Mutex::new(Instant::now()),
            spare: AtomicU64::new(0),
            #[cfg(test)]
            drawn: AtomicU64::new(0),
        };
        l.tau = l.cost(burst);
        l
    }

    /// How long the bucket takes to earn `bytes`.
    fn cost(&self, bytes: u64) -> Duration {
        let ns = u128::from(bytes) * 1_000_000_000 / u128::from(self.rate);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Bytes granted but not used (a stream that ended): kept for the
    /// next taker, up to one burst; the rest goes back into the bucket
    /// (the reservations made after it come no sooner, later ones do).
    pub(crate) fn give_back(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let cap = self.burst;
        let mut over = 0;
        let _ = self
            .spare
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                let total = s.saturating_add(bytes as u64);
                over = total.saturating_sub(cap);
                Some(total.min(cap))
            });
        if over > 0 {
            let now = Instant::now();
            let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
            let back = (*tat).checked_sub(self.cost(over)).unwrap_or(now);
            *tat = back.max(now);
            #[cfg(test)]
            self.drawn.fetch_sub(
                over.min(self.drawn.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
        }
    }

    /// Reserve up to `bytes` bytes (at least one, at most a piece): the
    /// bytes granted, and the instant from which they may move (now, or
    /// later when the bucket is empty; reservations made before this one
    /// come first).
    pub(crate) fn reserve(&self, bytes: usize) -> (usize, Instant) {
        let now = Instant::now();
        let spare = self.spare.swap(0, Ordering::Relaxed);
        if spare > 0 {
            let granted = spare.min(bytes.max(1) as u64);
            if spare > granted {
                self.give_back((spare - granted) as usize);
            }
            return (granted as usize, now);
        }
        let granted = bytes.clamp(1, self.piece);
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let next = (*tat).max(now) + self.cost(granted as u64);
        *tat = next;
        drop(tat);
        #[cfg(test)]
        self.drawn.fetch_add(granted as u64, Ordering::Relaxed);
        (
            granted,
            next.checked_sub(self.tau).map_or(now, |t| t.max(now)),
        )
    }

    /// Wait until up to `bytes` bytes are granted (streams wait through
    /// their `Credit`, which keeps a reservation across cancellation).
    #[cfg(test)]
    pub(crate) async fn take(&self, bytes: usize) -> usize {
        let (granted, at) = self.reserve(bytes);
        tokio::time::sleep_until(at).await;
        granted
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

    #[tokio::test(start_paused = true)]
    async fn bytes_given_back_go_to_the_next_taker_without_waiting() {
        let l = Limiter::new(1_000_000);
        // Take what the full bucket holds: granted now; then the caller
        // waits.
        let mut taken = 0;
        while l.reserve(PIECE).1 == Instant::now() {
            taken += PIECE;
        }
        assert!(taken as u64 <= l.burst && taken as u64 + 2 * PIECE as u64 > l.burst);
        l.give_back(10_000);
        assert_eq!(l.reserve(4_000), (4_000, Instant::now()));
        assert_eq!(l.reserve(PIECE), (6_000, Instant::now()));
        assert!(l.reserve(PIECE).1 > Instant::now());
        // Never more than one burst is kept.
        l.give_back(usize::MAX);
        assert_eq!(l.reserve(usize::MAX), (l.burst as usize, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_holds_and_turns_come_in_the_order_asked() {
        for rate in [1_000u64, 5_000_000, 300_000_000, 1 << 30, 40_000_000_000] {
            let l = Limiter::new(rate);
            let start = Instant::now();
            // A second's worth after the first burst, reserved by turns:
            // the last is due one second on, and each after the one before.
            let mut bytes = 0u64;
            let mut last = start;
            while bytes < l.burst + rate {
                let (n, at) = l.reserve(PIECE);
                assert!(at >= last, "{rate}: served out of turn");
                last = at;
                bytes += n as u64;
            }
            let took = (last - start).as_secs_f64();
            let due = (bytes - l.burst) as f64 / rate as f64;
            assert!((0.99..1.1).contains(&due), "{rate}: {due}");
            assert!(
                (took / due - 1.0).abs() < 0.01,
                "{rate}: {due} s worth took {took} s"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_low_limit_grants_small_pieces_often() {
        // At 1 KiB/s: 512 bytes every half second, not 16 KiB every 16 s.
        let l = Limiter::new(1024);
        let (n, _) = l.reserve(PIECE);
        assert_eq!(n, 512);
        let (n, at) = l.reserve(PIECE);
        assert_eq!(n, 512);
        assert!(at - Instant::now() <= Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn streams_waiting_together_all_get_their_turn() {
        // Eight takers at 64 KiB/s, each taking a piece then sleeping a
        // little: each gets its share, none starves (with governor's
        // try-again answers, the same taker could lose every race).
        let l = std::sync::Arc::new(Limiter::new(64 * 1024));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = 0usize;
                let mut longest = Duration::ZERO;
                let end = Instant::now() + Duration::from_secs(20);
                while Instant::now() < end {
                    let asked = Instant::now();
                    got += l.take(PIECE).await;
                    longest = longest.max(asked.elapsed());
                }
                (got, longest)
            }));
        }
        for t in tasks {
            let (got, longest) = t.await.unwrap();
            // 20 s at 64 KiB/s shared by eight: 160 KiB each.
            assert!(got >= 140 * 1024, "a taker got {got} bytes");
            assert!(
                longest <= Duration::from_secs(3),
                "a taker waited {longest:?}"
            );
        }
    }
}
