//! A small mutation fuzzer that runs on the stable toolchain.
//!
//! No coverage instrumentation: inputs start from each target's seeds (and
//! its saved regressions), are mutated with bit flips, interesting values,
//! lying length prefixes, insertions, deletions, truncations and splices,
//! and an input joins the corpus when the target labels it with an outcome
//! not seen before. A panic is a crash: the input is saved under
//! `artifacts/<target>/` and the run fails.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::Target;

/// A fast deterministic random number generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded; a zero seed is replaced.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

const INTERESTING_U8: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'/', b'.', 0x0a, 0x12, 0x1a];
const INTERESTING_U32: &[u32] = &[
    0,
    1,
    32,
    0x7f,
    0x80,
    16 * 1024,
    64 * 1024,
    64 * 1024 + 1,
    1024 * 1024,
    1024 * 1024 + 1,
    0x7fff_ffff,
    0xffff_ffff,
];

/// One mutation of `input`, capped at `max_len` bytes.
pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8], max_len: usize) {
    let ops = 1 + rng.below(4);
    for _ in 0..ops {
        let len = input.len();
        match rng.below(11) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = INTERESTING_U8[rng.below(INTERESTING_U8.len())];
            }
            2 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                input.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                input.drain(at..at + n);
            }
            4 if len > 0 => input.truncate(rng.below(len)),
            5 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(256));
                let copy = input[at..at + n].to_vec();
                let to = rng.below(len + 1);
                input.splice(to..to, copy);
            }
            6 if !other.is_empty() => {
                // Splice: our head, their tail.
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            7 if len >= 4 => {
                // A lying length prefix (frames are big-endian u32).
                let at = if rng.below(2) == 0 {
                    0
                } else {
                    rng.below(len - 3)
                };
                let v = INTERESTING_U32[rng.below(INTERESTING_U32.len())];
                input[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
            8 if len > 0 => {
                // A huge protobuf varint where a small one was.
                let at = rng.below(len);
                input.splice(
                    at..at + 1,
                    [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                );
            }
            9 if len >= 8 => {
                // A lying little-endian size (the verified stream header).
                let at = 1.min(len - 8);
                let v: u64 = match rng.below(4) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => rng.next_u64() % (1 << 20),
                    _ => 1 << (rng.below(63)),
                };
                input[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                if len > 0 {
                    let i = rng.below(len);
                    input[i] = rng.next_u64() as u8;
                }
            }
        }
    }
    input.truncate(max_len);
}

static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);

/// Runs `target` on `input`, returning its outcome or the panic message.
pub fn run_one(target: Target, input: &[u8]) -> Result<String, String> {
    match catch_unwind(AssertUnwindSafe(|| (target.run)(input))) {
        Ok(o) => Ok(o),
        Err(p) => Err(PANIC_MESSAGE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .or_else(|| p.downcast_ref::<String>().cloned())
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_else(|| "panic".into())),
    }
}

/// Replaces the panic hook with one that records the message quietly (the
/// driver prints it once, with the input's file name).
pub fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("{info}");
        *PANIC_MESSAGE.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
    }));
}

/// The inputs saved in `dir` (none if it does not exist), sorted by name.
pub fn load_dir(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(PathBuf, Vec<u8>)> = rd
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| std::fs::read(e.path()).ok().map(|b| (e.path(), b)))
        .collect();
    v.sort();
    v
}

/// What one run found.
#[derive(Debug, Default)]
pub struct Report {
    /// Inputs run.
    pub execs: u64,
    /// Corpus size at the end.
    pub corpus: usize,
    /// Distinct outcome labels seen.
    pub outcomes: usize,
    /// Crashing inputs saved, with their panic messages.
    pub crashes: Vec<(PathBuf, String)>,
    /// Slowest single input.
    pub slowest: Duration,
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long to mutate.
    pub duration: Duration,
    /// RNG seed (runs are reproducible for a given seed and duration... of
    /// executions, not of wall time).
    pub seed: u64,
    /// Longest input produced.
    pub max_len: usize,
    /// Where crashing inputs go (`<artifacts>/<target>/crash-<hash>`).
    pub artifacts: PathBuf,
    /// Extra inputs to start from (the regressions).
    pub extra: Vec<Vec<u8>>,
    /// Stop at the first crash.
    pub stop_on_crash: bool,
}

/// Fuzzes `target` for `opts.duration`.
pub fn fuzz(target: Target, opts: &Options) -> Report {
    let mut rng = Rng::new(opts.seed);
    let mut corpus: Vec<Vec<u8>> = (target.seeds)();
    corpus.extend(opts.extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    let mut report = Report::default();
    let save = |input: &[u8], msg: String, report: &mut Report| {
        let dir = opts.artifacts.join(target.name);
        let _ = std::fs::create_dir_all(&dir);
        let name = blake3::hash(input).to_hex();
        let path = dir.join(format!("crash-{}", &name[..16]));
        let _ = std::fs::write(&path, input);
        report.crashes.push((path, msg));
    };
    // Seeds first, unmutated.
    for input in corpus.clone() {
        report.execs += 1;
        match run_one(target, &input) {
            Ok(label) => {
                seen.insert(label);
            }
            Err(msg) => save(&input, msg, &mut report),
        }
    }
    let start = Instant::now();
    while start.elapsed() < opts.duration {
        if opts.stop_on_crash && !report.crashes.is_empty() {
            break;
        }
        let mut input = corpus[rng.below(corpus.len())].clone();
        let other = corpus[rng.below(corpus.len())].clone();
        mutate(&mut rng, &mut input, &other, opts.max_len);
        let t = Instant::now();
        let r = run_one(target, &input);
        report.slowest = report.slowest.max(t.elapsed());
        report.execs += 1;
        match r {
            Ok(label) => {
                if seen.insert(label) && corpus.len() < 4096 {
                    corpus.push(input);
                }
            }
            Err(msg) => save(&input, msg, &mut report),
        }
    }
    report.corpus = corpus.len();
    report.outcomes = seen.len();
    report
}
