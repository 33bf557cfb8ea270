//! `cargo xtask bench [S1..S6] [options]`: the scenarios of
//! `../shared/bench.md`, each beside its baselines in the same run.
//!
//! Every scenario drives the real release `shoal` binary as separate
//! processes. Runs alternate (shoal, baseline, shoal, baseline, ...) and the
//! table reports medians. A baseline that cannot run is a row of its own
//! saying why, never silently missing. The table goes to stdout and, as
//! JSON, to `target/bench/<timestamp>.json` and `target/bench/latest.json`.
//!
//! S3 builds a lab of network namespaces on a bridge (root only): every
//! host's upload is capped with `tbf`. The lab is torn down when the run
//! ends, on error, and on SIGINT/SIGTERM (a signal thread kills what we
//! started and deletes the namespaces).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::{apt_install, cargo, have, is_root, sh};

const USAGE: &str = "\
usage: cargo xtask bench [S1 S2 S3 S4 S5 S6]... [options]

  --install            install missing baseline tools (apt as root; cargo install sendme)
  --runs N             runs per scenario, alternating with baselines (default 3)
  --size SIZE          file size for S1, S2, S6 (default 1GiB; e.g. 256MiB)
  --s5-size SIZE       file size for S5 (default 4GiB)
  --files N            files of 4 KiB for S4 (default 10000)
  --downloaders N      S3 lab: downloaders besides the seeder (default 8)
  --rate RATE          S3 lab: upload cap of every host, tc syntax (default 50mbit)
  --size-mib N         S3 lab: file size in MiB (default 256)
  --lab-runs N         S3 lab: runs (default: --runs)
  --work DIR           scratch directory (default target/bench/work)

With no scenario, runs all of them (S3 needs root, ip and tc).";

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;
const NOT_INSTALLED: &str = "not installed (run with --install)";

struct Opts {
    scenarios: Vec<String>,
    install: bool,
    runs: usize,
    size: u64,
    s5_size: u64,
    files: usize,
    downloaders: usize,
    rate: String,
    lab_size_mib: u64,
    lab_runs: Option<usize>,
    work: PathBuf,
}

fn parse_opts(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        scenarios: Vec::new(),
        install: false,
        runs: 3,
        size: 1 << 30,
        s5_size: 4 << 30,
        files: 10_000,
        downloaders: 8,
        rate: "50mbit".into(),
        lab_size_mib: 256,
        lab_runs: None,
        work: crate::target_dir().join("bench/work"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| anyhow!("{a} needs a value\n\n{USAGE}"))
        };
        match a.as_str() {
            "-h" | "--help" | "help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--install" => o.install = true,
            "--runs" => o.runs = val()?.parse().context("--runs")?,
            "--size" => o.size = parse_size(&val()?)?,
            "--s5-size" => o.s5_size = parse_size(&val()?)?,
            "--files" => o.files = val()?.parse().context("--files")?,
            "--downloaders" => o.downloaders = val()?.parse().context("--downloaders")?,
            "--rate" => o.rate = val()?,
            "--size-mib" => o.lab_size_mib = val()?.parse().context("--size-mib")?,
            "--lab-runs" => o.lab_runs = Some(val()?.parse().context("--lab-runs")?),
            "--work" => o.work = PathBuf::from(val()?),
            s if s.len() == 2 && s.to_ascii_uppercase().starts_with('S') => {
                let s = s.to_ascii_uppercase();
                if !("S1"..="S6").contains(&s.as_str()) {
                    bail!("unknown scenario {s}\n\n{USAGE}");
                }
                o.scenarios.push(s);
            }
            other => bail!("unknown argument {other}\n\n{USAGE}"),
        }
    }
    if o.scenarios.is_empty() {
        o.scenarios = (1..=6).map(|i| format!("S{i}")).collect();
    }
    o.runs = o.runs.max(1);
    if o.downloaders == 0 {
        bail!("--downloaders must be at least 1\n\n{USAGE}");
    }
    Ok(o)
}

/// `1GiB`, `256MiB`, `4096` (bytes), `10KiB`.
pub(crate) fn parse_size(s: &str) -> Result<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().with_context(|| format!("size {s:?}"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        _ => bail!("size {s:?}: use B, KiB, MiB or GiB"),
    };
    n.checked_mul(mult)
        .ok_or_else(|| anyhow!("size {s:?} is too large"))
}

/// One line of the table.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    scenario: String,
    measure: String,
    unit: String,
    shoal: Option<f64>,
    baseline: String,
    base: Option<f64>,
    /// The median of each run's own ratio, where shoal and the baseline
    /// ran in pairs (see [`Row::paired`]).
    paired: Option<f64>,
    /// What the "shoal" column measured, when not shoal (a reference row
    /// of another tool against the same bound).
    subject: Option<String>,
    target: String,
    note: String,
}

impl Row {
    fn new(scenario: &str, measure: &str, unit: &str) -> Row {
        Row {
            scenario: scenario.into(),
            measure: measure.into(),
            unit: unit.into(),
            shoal: None,
            baseline: String::new(),
            base: None,
            paired: None,
            subject: None,
            target: String::new(),
            note: String::new(),
        }
    }
    /// The ratio as bench.md asks for it: each run's shoal figure over
    /// the baseline's of the same run, then the median of those. The
    /// ratio of the two medians may pair figures of different runs, on a
    /// disk whose speed here swings 40% from run to run (a review). Kept
    /// as the ratio of medians unless both sides have a figure for each
    /// of the `runs` (a side that lacks one may lack another run than the
    /// other side: index by index, run i was then paired with run j).
    fn paired(mut self, runs: usize, ours: &[f64], theirs: &[f64]) -> Row {
        if runs > 0 && ours.len() == runs && theirs.len() == runs && theirs.iter().all(|b| *b > 0.0)
        {
            let r: Vec<f64> = ours.iter().zip(theirs).map(|(a, b)| a / b).collect();
            self.paired = median(&r);
        }
        self
    }
    fn shoal(mut self, v: Option<f64>) -> Row {
        self.shoal = v;
        self
    }
    fn base(mut self, name: &str, v: Option<f64>) -> Row {
        self.baseline = name.into();
        self.base = v;
        self
    }
    fn subject(mut self, s: &str) -> Row {
        self.subject = Some(s.into());
        self
    }
    fn target(mut self, t: &str) -> Row {
        self.target = t.into();
        self
    }
    fn note(mut self, n: impl Into<String>) -> Row {
        self.note = n.into();
        self
    }
    fn ratio_of_medians(&self) -> Option<f64> {
        match (self.shoal, self.base) {
            (Some(s), Some(b)) if b > 0.0 => Some(s / b),
            _ => None,
        }
    }
    fn ratio(&self) -> Option<f64> {
        self.paired.or_else(|| self.ratio_of_medians())
    }
    fn json(&self) -> Value {
        json!({
            "scenario": self.scenario, "measure": self.measure, "unit": self.unit,
            "shoal": self.shoal, "baseline": self.baseline, "baseline_value": self.base,
            "ratio": self.ratio(), "ratio_is_paired": self.paired.is_some(),
            "ratio_of_medians": self.ratio_of_medians(),
            "subject": self.subject.as_deref().unwrap_or("shoal"),
            "target": self.target, "note": self.note,
        })
    }
}

fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// The table, as printed and as kept in BENCHMARKS.md (markdown). A
/// ratio marked `*` is the median of per-run ratios ([`Row::paired`]);
/// the others are the ratio of the two medians.
pub(crate) fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| id | measure | shoal | baseline | baseline's figure | ratio | target | note |\n| --- | --- | ---: | --- | ---: | ---: | --- | --- |\n",
    );
    for r in rows {
        let unit = if r.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", r.unit)
        };
        let _ = writeln!(
            s,
            "| {} | {} | {}{} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.measure,
            fmt_num(r.shoal),
            if r.shoal.is_some() { &unit } else { "" },
            r.baseline,
            fmt_num(r.base),
            r.ratio().map_or("-".into(), |x| format!(
                "{x:.2}x{}",
                if r.paired.is_some() { "*" } else { "" }
            )),
            r.target,
            r.note
        );
    }
    s
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

// ---------------------------------------------------------------------
// Cleanup on exit and on signals.

static PIDS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
static NETNS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
/// Set first by the signal thread: from then on nothing new is started (a
/// process or a namespace made after its sweep was left behind: a review),
/// and no table is written.
static STOPPING: AtomicBool = AtomicBool::new(false);

fn stopping() -> Result<()> {
    if STOPPING.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn kill_registered() {
    let pids: Vec<i32> = PIDS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .copied()
        .collect();
    for pid in pids {
        // SAFETY: kill(2) on a pid we spawned and have not reaped, and on
        // its process group if it leads one (`run_limited`'s; for the
        // others there is no group of that id, and the call does nothing).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

fn delete_netns(names: &[String]) {
    for ns in names {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
        NETNS.lock().unwrap_or_else(|e| e.into_inner()).remove(ns);
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this (and every later) thread and handles
/// them in a thread of their own: kill what we started, delete the lab,
/// exit 130. Children get the default mask back (std resets it on spawn).
fn install_signal_thread() -> Result<()> {
    // SAFETY: plain sigset manipulation on a local set; pthread_sigmask on
    // the calling thread before any other thread exists.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        // A terminal hung up: `run_limited`'s children, in process groups
        // of their own, hear nothing of it.
        libc::sigaddset(&mut set, libc::SIGHUP);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("cannot block SIGINT");
        }
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait on a valid set, writing into a local.
        unsafe { libc::sigwait(&set, &mut sig) };
        STOPPING.store(true, Ordering::SeqCst);
        eprintln!("\nbench: interrupted, cleaning up");
        // Twice: what was being started as the flag was set is registered
        // by the second sweep.
        for _ in 0..2 {
            kill_registered();
            std::thread::sleep(Duration::from_millis(200));
            let ns: Vec<String> = NETNS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect();
            delete_netns(&ns);
        }
        std::process::exit(130);
    });
    Ok(())
}

// ---------------------------------------------------------------------
// Processes.

/// A child we started: registered for the signal thread, killed on drop.
struct Proc {
    child: Child,
    pid: i32,
    reaped: bool,
}

/// What a finished process used, from wait4(2).
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    cpu: f64,
    rss_mib: f64,
    ok: bool,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Result<Proc> {
        stopping()?;
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let pid = child.id() as i32;
        PIDS.lock().unwrap_or_else(|e| e.into_inner()).insert(pid);
        let p = Proc {
            child,
            pid,
            reaped: false,
        };
        // Started as the signal thread swept: killed (by drop) here.
        stopping()?;
        Ok(p)
    }

    /// Waits (reaping with wait4 to get the child's own rusage).
    fn wait(&mut self) -> Usage {
        // SAFETY: wait4 on our own child, into locals.
        let (rc, status, ru) = unsafe {
            let mut status = 0;
            let mut ru: libc::rusage = std::mem::zeroed();
            let rc = libc::wait4(self.pid, &mut status, 0, &mut ru);
            (rc, status, ru)
        };
        self.reaped = true;
        PIDS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.pid);
        if rc != self.pid {
            return Usage::default();
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Usage {
            cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
            rss_mib: ru.ru_maxrss as f64 / 1024.0,
            ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        }
    }

    /// Blocks until it has exited, without reaping it.
    fn wait_exited(&self) {
        if self.reaped {
            return;
        }
        loop {
            // SAFETY: waitid with WNOWAIT only waits on our own child.
            let rc = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(
                    libc::P_PID,
                    self.pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return;
            }
        }
    }

    /// Non-blocking: has it exited? (Reaps it when it has.)
    fn try_wait(&mut self) -> Option<Usage> {
        // SAFETY: waitid with WNOWAIT only peeks at our own child.
        let exited = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            ) == 0
                && info.si_pid() == self.pid
        };
        exited.then(|| self.wait())
    }

    fn signal(&self, sig: i32) {
        if !self.reaped {
            // SAFETY: kill(2) on our unreaped child.
            unsafe {
                libc::kill(self.pid, sig);
            }
        }
    }

    /// CPU seconds so far, from /proc.
    /// `None` when /proc cannot say (a figure of 0 read as a pass, and
    /// a difference of two could be negative: a review).
    fn cpu_now(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // Fields after the `(comm)`: state is field 3; utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i - 3).and_then(|s| s.parse::<f64>().ok());
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Some((ticks(14)? + ticks(15)?) / hz)
    }

    /// Peak RSS so far (VmHWM), from /proc; `None` when it cannot say.
    fn peak_rss_mib(&self) -> Option<f64> {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|k| k.parse::<f64>().ok())
            })
            .map(|kib| kib / 1024.0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.reaped {
            self.signal(libc::SIGKILL);
            self.wait();
        }
    }
}

/// Runs a command to completion, timing it; stdout captured, stderr kept
/// for the error message.
struct Ran {
    secs: f64,
    usage: Usage,
    stdout: String,
    stderr: String,
}

/// The longest any one command of the bench may take: one that hangs (a
/// baseline waiting for a peer that never comes) is killed, and fails.
const RUN_LIMIT: Duration = Duration::from_secs(900);

fn run(cmd: &mut Command) -> Result<Ran> {
    run_limited(cmd, RUN_LIMIT)
}

fn run_limited(cmd: &mut Command, limit: Duration) -> Result<Ran> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group, so that the watchdog kills what it started
    // too (`sh -c 'cp ...'` killed alone left `cp` holding the pipes, and
    // the readers waited for it: a review).
    std::os::unix::process::CommandExt::process_group(cmd, 0);
    let t = Instant::now();
    let mut p = Proc::spawn(cmd)?;
    let out = p.child.stdout.take().map(reader_thread);
    let err = p.child.stderr.take().map(reader_thread);
    // A watchdog kills it at the limit. It is told when the process has
    // exited, and joined, before the process is reaped: its pid cannot
    // be another's when it kills.
    let (done, rx) = std::sync::mpsc::channel::<()>();
    let pid = p.pid;
    let watchdog = std::thread::spawn(move || {
        let killed = rx.recv_timeout(limit).is_err();
        if killed {
            // SAFETY: kill(2) on our child's process group; the child,
            // exited or not, is not reaped, so the group's id is still its.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        killed
    });
    p.wait_exited();
    let _ = done.send(());
    let killed = watchdog.join().unwrap_or(false);
    let usage = p.wait();
    let secs = t.elapsed().as_secs_f64();
    let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
    let mut stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
    if killed {
        stderr.push_str(&format!("\nkilled: still running after {limit:?}"));
    }
    Ok(Ran {
        secs,
        usage,
        stdout,
        stderr,
    })
}

fn run_ok(cmd: &mut Command) -> Result<Ran> {
    let desc = format!("{cmd:?}");
    let r = run(cmd)?;
    if !r.usage.ok {
        bail!("{desc} failed: {}", r.stderr.trim());
    }
    Ok(r)
}

fn reader_thread<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

fn rm(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
    let _ = std::fs::remove_file(p);
}

// ---------------------------------------------------------------------
// shoal processes.

struct Shoal {
    bin: PathBuf,
}

impl Shoal {
    fn cmd(&self, dir: &Path, ns: Option<&str>) -> Command {
        let mut c = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        c.arg("--data-dir").arg(dir).env("RUST_LOG", "error");
        c
    }

    /// `shoal add` (the store directly, or through the control socket of a
    /// node running on `dir`); the hash.
    fn add(&self, dir: &Path, path: &Path, copy: bool) -> Result<(String, Ran)> {
        let mut c = self.cmd(dir, None);
        c.arg("add").arg(path);
        if copy {
            c.arg("--copy");
        }
        let r = run_ok(&mut c)?;
        let hash = r
            .stdout
            .split_whitespace()
            .next()
            .ok_or_else(|| anyhow!("shoal add printed nothing"))?
            .to_string();
        Ok((hash, r))
    }

    /// `shoal serve`, waiting for its ready line.
    fn serve(&self, dir: &Path, ns: Option<&str>, listen: &str, extra: &[&str]) -> Result<Node> {
        self.start_serve(dir, ns, listen, extra)?.ready()
    }

    /// [`Shoal::serve`] started, its ready line not waited for: several
    /// start at once.
    fn start_serve(
        &self,
        dir: &Path,
        ns: Option<&str>,
        listen: &str,
        extra: &[&str],
    ) -> Result<Starting> {
        let mut c = self.cmd(dir, ns);
        c.args(["serve", "--listen", listen, "--no-mdns", "--no-dht"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut proc = Proc::spawn(&mut c)?;
        let stdout = proc
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        Ok(Starting {
            proc,
            dir: dir.to_path_buf(),
            line: rx,
        })
    }

    fn ticket(&self, node: &Node, hash: &str) -> Result<String> {
        let r = run_ok(self.cmd(&node.dir, None).args(["ticket", hash]))?;
        Ok(r.stdout.trim().to_string())
    }

    fn status(&self, node: &Node) -> Result<Value> {
        let r = run_ok(self.cmd(&node.dir, None).args(["--json", "status"]))?;
        serde_json::from_str(r.stdout.trim()).context("parsing shoal status --json")
    }

    /// Verified bytes of `hash` in the store of `dir` (`shoal ls --json`).
    fn verified(&self, dir: &Path, hash: &str) -> Result<u64> {
        let r = run_ok(self.cmd(dir, None).args(["--json", "ls"]))?;
        for l in r.stdout.lines() {
            let v: Value = serde_json::from_str(l).context("parsing shoal ls --json")?;
            if v["hash"] == hash {
                return Ok(v["verified"].as_u64().unwrap_or(0));
            }
        }
        Ok(0)
    }
}

/// A `shoal serve` started, its ready line still to come.
struct Starting {
    proc: Proc,
    dir: PathBuf,
    line: std::sync::mpsc::Receiver<String>,
}

impl Starting {
    fn ready(self) -> Result<Node> {
        let line = self
            .line
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| {
                anyhow!(
                    "shoal serve in {} printed no ready line",
                    self.dir.display()
                )
            })?;
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() < 3 || w[0] != "ready" {
            bail!("unexpected ready line {line:?}");
        }
        Ok(Node {
            proc: self.proc,
            dir: self.dir,
            peer: format!("{}@{}", w[1], w[2]),
        })
    }
}

struct Node {
    proc: Proc,
    dir: PathBuf,
    peer: String,
}

impl Node {
    /// SIGTERM and wait: the node's own rusage.
    fn stop(mut self) -> Usage {
        self.proc.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(u) = self.proc.try_wait() {
                return u;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc.signal(libc::SIGKILL);
        self.proc.wait()
    }
}

// ---------------------------------------------------------------------
// Inputs.

fn write_random(path: &Path, len: u64, seed: u64) -> Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == len) {
        return Ok(());
    }
    eprintln!("bench: writing {} ({} MiB)", path.display(), len >> 20);
    let mut f = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut x: u64 = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for b in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    // On disk before anything is measured: the kernel's writeback of a
    // fresh GiB otherwise runs during the first runs (seen taking 8% of
    // both cores in a profile of S2).
    f.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

/// Flush what earlier steps left to the disk before a step that writes and
/// syncs a GiB is timed, so that neither side pays for the other's
/// writeback. Where the filesystem is mounted with `discard` (this
/// machine's root is), that includes the discards of the GiB just deleted,
/// which go out with the next journal commit. (It did not explain the
/// 0.24-0.50x `--copy` runs of 2026-11-29: those came with a slow disk and
/// went with it; see BENCHMARKS.md.)
fn settle() -> Result<()> {
    run_ok(&mut Command::new("sync"))?;
    Ok(())
}

fn write_tree(dir: &Path, files: usize) -> Result<()> {
    rm(dir);
    for i in 0..files {
        let d = dir.join(format!("d{:03}", i % 100));
        if i < 100 {
            std::fs::create_dir_all(&d)?;
        }
        let mut data = vec![0u8; 4096];
        let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for c in data.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        std::fs::write(d.join(format!("f{i:06}")), &data)?;
    }
    // On disk before anything is measured (as in write_random).
    run_ok(&mut Command::new("sync"))?;
    // The marker lives beside the tree, not in what is shared.
    std::fs::write(dir.with_extension("complete"), b"")?;
    Ok(())
}

fn tree_ready(dir: &Path) -> bool {
    dir.with_extension("complete").exists()
}

// ---------------------------------------------------------------------

struct Ctx {
    o: Opts,
    shoal: Shoal,
    bulk: PathBuf,
    work: PathBuf,
    rows: Vec<Row>,
}

pub(crate) fn bench(args: &[String]) -> Result<()> {
    let o = parse_opts(args)?;
    install_signal_thread()?;
    if o.install {
        install_tools()?;
    }
    sh(
        "build shoal (release)",
        cargo().args(["build", "--release", "-q", "-p", "shoal-cli"]),
    )?;
    sh(
        "build the bulk example (release)",
        cargo().args([
            "build",
            "--release",
            "-q",
            "-p",
            "shoal-transport",
            "--example",
            "bulk",
        ]),
    )?;
    // The workspace's, wherever this is run from.
    let target = crate::target_dir();
    let target = std::fs::canonicalize(&target).unwrap_or(target);
    std::fs::create_dir_all(&o.work)?;
    let work = std::fs::canonicalize(&o.work)?;
    let mut cx = Ctx {
        shoal: Shoal {
            bin: target.join("release/shoal"),
        },
        bulk: target.join("release/examples/bulk"),
        work,
        rows: Vec::new(),
        o,
    };
    let started = Instant::now();
    for s in cx.o.scenarios.clone() {
        eprintln!("==> bench {s}");
        let res = match s.as_str() {
            "S1" => s1(&mut cx),
            "S2" => s2(&mut cx),
            "S3" => s3(&mut cx),
            "S4" => s4(&mut cx),
            "S5" => s5(&mut cx),
            _ => s6(&mut cx),
        };
        if let Err(e) = res {
            eprintln!("bench {s} failed: {e:#}");
            cx.rows
                .push(Row::new(&s, "(scenario)", "").note(format!("failed: {e:#}")));
        }
    }
    let machine = machine();
    let command = format!("cargo xtask bench {}", args.join(" "));
    let t = table(&cx.rows);
    println!("\n{machine}\n{command}\n\n{t}");
    let stamp = Command::new("date")
        .args(["-u", "+%Y%m%dT%H%M%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let doc = json!({
        "date": stamp, "machine": machine, "command": command,
        "seconds": started.elapsed().as_secs_f64(), "runs": cx.o.runs,
        "lab_runs": cx.o.lab_runs.unwrap_or(cx.o.runs), "s5_runs": 1,
        "rows": cx.rows.iter().map(Row::json).collect::<Vec<_>>(),
        "markdown": t,
    });
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir)?;
    let text = serde_json::to_string_pretty(&doc)?;
    // An interrupted run's rows ("failed: interrupted") are not the latest
    // table.
    stopping()?;
    // Two runs within one second keep a file each.
    let file = (1..)
        .map(|i| match i {
            1 => dir.join(format!("{stamp}.json")),
            i => dir.join(format!("{stamp}-{i}.json")),
        })
        .find(|f| !f.exists())
        .unwrap_or_else(|| dir.join(format!("{stamp}.json")));
    std::fs::write(&file, &text)?;
    std::fs::write(dir.join("latest.json"), &text)?;
    eprintln!("bench: wrote {}", file.display());
    Ok(())
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(0, |k| k >> 20);
    format!("{cores} cores, {model}, {mem} GiB RAM")
}

const PY: &str = "/usr/bin/python3";

fn have_libtorrent() -> bool {
    Path::new(PY).exists()
        && Command::new(PY)
            .args(["-c", "import libtorrent"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

fn install_tools() -> Result<()> {
    apt_install(&[
        ("b3sum", "b3sum"),
        ("iperf3", "iperf3"),
        ("aria2c", "aria2"),
        ("mktorrent", "mktorrent"),
        ("opentracker", "opentracker"),
        ("ip", "iproute2"),
        ("tc", "iproute2"),
    ])?;
    if !have_libtorrent() && is_root() {
        sh(
            "apt-get install python3-libtorrent",
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(["python3-libtorrent"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    if !have("sendme") {
        sh(
            "cargo install sendme (slow)",
            cargo().args(["install", "--locked", "sendme"]),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------
// S1: import.

fn s1(cx: &mut Ctx) -> Result<()> {
    let size = cx.o.size;
    let input = cx.work.join(format!("input-{}.bin", size >> 20));
    write_random(&input, size, 1)?;
    let data = cx.work.join("s1-data");
    let cp_dest = cx.work.join("s1-cp.bin");
    let b3 = have("b3sum");
    // Warm the page cache.
    std::io::copy(&mut std::fs::File::open(&input)?, &mut std::io::sink())?;
    let (mut inplace, mut copy, mut b3s, mut cps) = (vec![], vec![], vec![], vec![]);
    let mut via_node = vec![];
    let mib = size as f64 / MIB;
    for i in 0..cx.o.runs {
        eprintln!("  S1 run {}/{}", i + 1, cx.o.runs);
        rm(&data);
        // The last run's copies were just deleted: on this disk (mounted
        // with `discard`) that keeps it busy for a while, and the add's
        // fdatasyncs would wait behind it (b3sum has none to wait for).
        settle()?;
        let (_, r) = cx.shoal.add(&data, &input, false)?;
        inplace.push(mib / r.secs);
        if b3 {
            let r = run_ok(Command::new("b3sum").arg("--no-names").arg(&input))?;
            b3s.push(mib / r.secs);
        }
        // The same add into a running node's store (started untimed): no
        // database to open and close.
        rm(&data);
        let node = cx.shoal.serve(&data, None, "127.0.0.1:0", &[])?;
        let (_, r) = cx.shoal.add(&data, &input, false)?;
        via_node.push(mib / r.secs);
        node.stop();
        rm(&data);
        settle()?;
        let (_, r) = cx.shoal.add(&data, &input, true)?;
        copy.push(mib / r.secs);
        rm(&data);
        rm(&cp_dest);
        settle()?;
        let r = run_ok(
            Command::new("sh")
                .arg("-c")
                .arg(r#"cp "$1" "$2" && sync "$2""#)
                .arg("sh")
                .arg(&input)
                .arg(&cp_dest),
        )?;
        cps.push(mib / r.secs);
        rm(&cp_dest);
    }
    rm(&data);
    let note = format!("{} MiB, page cache warm", size >> 20);
    let pairs = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(s, c)| format!("{s:.0}/{c:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    cx.rows.push(
        Row::new("S1", "add, in place", "MiB/s")
            .shoal(median(&inplace))
            .base("b3sum (all cores)", median(&b3s))
            .paired(cx.o.runs, &inplace, &b3s)
            .target(">= 0.9x")
            .note(if b3 {
                format!("{note}; per run, shoal/b3sum: {}", pairs(&inplace, &b3s))
            } else {
                NOT_INSTALLED.into()
            }),
    );
    cx.rows.push(
        Row::new("S1", "add, in place, to a running node", "MiB/s")
            .shoal(median(&via_node))
            .base("b3sum (all cores)", median(&b3s))
            .note("reference: `shoal add` through the control socket of `shoal serve`, whose store is open already"),
    );
    // Each run's pair, since the disk's speed swings from run to run.
    cx.rows.push(
        Row::new("S1", "add --copy", "MiB/s")
            .shoal(median(&copy))
            .base("cp + fsync", median(&cps))
            .paired(cx.o.runs, &copy, &cps)
            .note(format!("{note}; per run, shoal/cp: {}", pairs(&copy, &cps))),
    );
    // Many small files: a directory of 4 KiB files added in place (one
    // collection), against the rate issue 3 asks for.
    let n = cx.o.files;
    let tree = cx.work.join(format!("tree-{n}"));
    if !tree_ready(&tree) {
        eprintln!("bench: writing {n} files of 4 KiB");
        write_tree(&tree, n)?;
    }
    let mut files = vec![];
    for _ in 0..cx.o.runs {
        rm(&data);
        let (_, r) = cx.shoal.add(&data, &tree, false)?;
        files.push(n as f64 / r.secs);
    }
    rm(&data);
    cx.rows.push(
        Row::new(
            "S1",
            &format!("add a directory of {n} files of 4 KiB"),
            "files/s",
        )
        .shoal(median(&files))
        .base("the rate issue 3 asks for", Some(2000.0))
        .target(">= 1x")
        .note("in place, page cache warm"),
    );
    Ok(())
}

// ---------------------------------------------------------------------
// S2: one seeder, one downloader, loopback.

const LT_SCRIPT: &str = r#"
import os, resource, sys, time
import libtorrent as lt
mode = sys.argv[1]
if mode == "make":
    path, out = sys.argv[2], sys.argv[3]
    fs = lt.file_storage()
    lt.add_files(fs, path)
    t = lt.create_torrent(fs, 1 << 20)
    lt.set_piece_hashes(t, os.path.dirname(path))
    open(out, "wb").write(lt.bencode(t.generate()))
else:
    tor, seed_dir, dl_dir = sys.argv[2:5]
    def session():
        return lt.session({"listen_interfaces": "127.0.0.1:0", "enable_dht": False,
            "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
            "enable_outgoing_utp": False, "enable_incoming_utp": False})
    s1, s2 = session(), session()
    p = lt.add_torrent_params()
    p.ti = lt.torrent_info(tor)
    p.save_path = seed_dir
    p.flags |= lt.torrent_flags.seed_mode
    s1.add_torrent(p)
    q = lt.add_torrent_params()
    q.ti = lt.torrent_info(tor)
    q.save_path = dl_dir
    t0 = time.time()
    h = s2.add_torrent(q)
    h.connect_peer(("127.0.0.1", s1.listen_port()))
    deadline = t0 + 600
    while not h.status().is_seeding:
        if time.time() > deadline:
            sys.exit("libtorrent did not finish within 600 s")
        time.sleep(0.005)
    el = time.time() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(el, ru.ru_utime + ru.ru_stime)
"#;

/// Parses a line of the bulk example: (MiB/s, CPU s/GiB).
/// The `bulk` example's line for one QUIC stream between two processes
/// (the S2 target's baseline: shoal's seeder and downloader are two
/// processes too).
const BARE_TWO: &str = "quic stream, two processes";
/// Its line for both ends in one process, on one shared runtime.
const BARE_ONE: &str = "quic stream (write_chunk)";
/// Its line for two processes sending from a 64 MiB pool of distinct
/// buffers (not in the CPU cache when QUIC copies them, as a file's bytes).
const BARE_UNCACHED: &str = "quic stream, uncached data";

fn bulk_line(out: &str, name: &str) -> Option<(f64, f64)> {
    let l = out.lines().find(|l| l.starts_with(name))?;
    let w: Vec<&str> = l[name.len()..].split_whitespace().collect();
    Some((w.first()?.parse().ok()?, w.get(2)?.parse().ok()?))
}

/// Seconds this disk takes to make a copy of `input` durable at `out`:
/// 1 MiB writes, then `fdatasync`, the faster of `O_DIRECT` (shoal's
/// download path) and the page cache (where the filesystem refuses
/// `O_DIRECT`, the page cache alone). A bound under any tool that keeps
/// what it receives durably: shoal's get syncs its copy before it records
/// it complete, and on a slow disk S2 waits for the disk, not the network
/// (2026-12-01: 1 GiB took 3.2-4.0 s here, the bare stream 2.5-2.9 s).
fn durable_copy(input: &Path, out: &Path) -> Result<f64> {
    // The input in the page cache first, untimed (as the seeder's is): the
    // copy is to time the disk's writing, not a read of the input from it.
    std::io::copy(
        &mut std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?,
        &mut std::io::sink(),
    )?;
    let mut best: Option<f64> = None;
    for direct in [true, false] {
        let r = durable_copy_once(input, out, direct);
        rm(out);
        match r {
            Ok(s) => best = Some(best.map_or(s, |b: f64| b.min(s))),
            // Some filesystems refuse O_DIRECT (tmpfs with EINVAL, others
            // otherwise): the page cache's figure then.
            Err(_) if direct => {}
            Err(e) => return Err(e),
        }
    }
    best.ok_or_else(|| anyhow!("no durable copy of {} measured", input.display()))
}

/// One copy for [`durable_copy`], left at `out` (a new file).
fn durable_copy_once(input: &Path, out: &Path, direct: bool) -> Result<f64> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const BUF: usize = 1 << 20;
    const ALIGN: usize = 4096;
    rm(out);
    settle()?;
    let mut src =
        std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let dst = opts.open(out)?;
    // O_DIRECT wants the buffer's address aligned too.
    let mut raw = vec![0u8; BUF + ALIGN];
    let skip = raw.as_ptr().align_offset(ALIGN);
    let buf = &mut raw[skip..skip + BUF];
    let t = Instant::now();
    let res = (|| -> Result<()> {
        let mut pos = 0u64;
        loop {
            let mut n = 0;
            while n < BUF {
                match src.read(&mut buf[n..])? {
                    0 => break,
                    k => n += k,
                }
            }
            if n == 0 {
                break;
            }
            // A tail that is not whole blocks goes through the page cache.
            let whole = if direct { n - n % ALIGN } else { n };
            dst.write_all_at(&buf[..whole], pos)?;
            if whole < n {
                let tail = std::fs::OpenOptions::new().write(true).open(out)?;
                tail.write_all_at(&buf[whole..n], pos + whole as u64)?;
                tail.sync_data()?;
            }
            pos += n as u64;
        }
        dst.sync_data()?;
        Ok(())
    })();
    let secs = t.elapsed().as_secs_f64();
    res.with_context(|| format!("copying {} to {}", input.display(), out.display()))?;
    Ok(secs)
}

fn iperf3_loopback(bytes: u64) -> Result<f64> {
    let port = free_port()?;
    let mut server = Proc::spawn(
        Command::new("iperf3")
            .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let r = run_ok(Command::new("iperf3").args([
        "-c",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-n",
        &bytes.to_string(),
        "-J",
    ]))?;
    server.wait();
    let v: Value = serde_json::from_str(&r.stdout).context("iperf3 -J")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("iperf3 reported no rate"))?;
    Ok(bps / 8.0 / MIB)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// `sendme send` of `path`, serving until dropped; returns the ticket.
fn sendme_send(path: &Path, cwd: &Path) -> Result<(Proc, String)> {
    std::fs::create_dir_all(cwd)?;
    let mut p = Proc::spawn(
        Command::new("sendme")
            .args(["send", "--relay", "disabled", "--ticket-type", "addresses"])
            .arg(path)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let (tx, rx) = std::sync::mpsc::channel();
    for r in [
        p.child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        p.child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(r).lines().map_while(Result::ok) {
                if let Some(t) = l.split_whitespace().find(|w| w.starts_with("blob")) {
                    let _ = tx.send(t.to_string());
                }
            }
        });
    }
    let ticket = rx
        .recv_timeout(Duration::from_secs(600))
        .map_err(|_| anyhow!("sendme send printed no ticket"))?;
    Ok((p, ticket))
}

fn s2(cx: &mut Ctx) -> Result<()> {
    let size = cx.o.size;
    let mib = size as f64 / MIB;
    let input = cx.work.join(format!("input-{}.bin", size >> 20));
    write_random(&input, size, 1)?;
    let sd = cx.work.join("s2-seeder");
    let dd = cx.work.join("s2-downloader");
    let out = cx.work.join("s2-out.bin");
    rm(&sd);
    let (hash, _) = cx.shoal.add(&sd, &input, false)?;
    let seeder = cx.shoal.serve(&sd, None, "127.0.0.1:0", &[])?;
    let ticket = cx.shoal.ticket(&seeder, &hash)?;

    // Baseline set-up, untimed.
    let lt = have_libtorrent();
    let lt_dir = cx.work.join("s2-lt");
    let lt_script = cx.work.join("lt.py");
    let torrent = cx.work.join(format!("input-{}.torrent", size >> 20));
    if lt {
        std::fs::write(&lt_script, LT_SCRIPT)?;
        // Made anew each time: the input is kept between runs by its size
        // alone, and a torrent of other bytes never finished (a review).
        rm(&torrent);
        run_ok(
            Command::new(PY)
                .arg(&lt_script)
                .arg("make")
                .arg(&input)
                .arg(&torrent),
        )?;
    }
    let sendme = have("sendme");
    let mut sendme_err = None;
    let sendme_seed = if sendme {
        match sendme_send(&input, &cx.work.join("s2-sendme-send")) {
            Ok(x) => Some(x),
            Err(e) => {
                sendme_err = Some(format!("failed: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    let iperf = have("iperf3");

    let (mut sh_rate, mut sh_cpu, mut sh_rss) = (vec![], vec![], vec![]);
    let (mut q_rate, mut q_cpu, mut tcp_bulk) = (vec![], vec![], vec![]);
    let (mut q1_rate, mut q1_cpu) = (vec![], vec![]);
    let (mut qu_rate, mut qu_cpu) = (vec![], vec![]);
    // shoal over the two-process stream, run by run (adjacent in time)
    let mut pair_ratio = vec![];
    let (mut lt_rate, mut lt_cpu, mut sm_rate, mut tcp) = (vec![], vec![], vec![], vec![]);
    let mut lt_err = None;
    let mut tcp_err: Option<String> = None;
    // The disk's bound, and shoal over the lower of it and the bare
    // stream, run by run.
    let (mut disk_rate, mut bound_ratio, mut disk_err) = (vec![], vec![], None);
    // One untimed run of shoal's get and of the bare stream first, as
    // S4's warm-up (ordinary practice). Added when S2's first runs read
    // lowest in the full runs (0.72-0.76 of the bare stream); the first
    // full run with it read 0.75 for the warm-up and 0.63 for a later
    // run: noise, not a first-transfer cost. Its ratio is in the note.
    let get = || {
        let mut c = cx.shoal.cmd(&dd, None);
        c.args(["get", &ticket, "-o"])
            .arg(&out)
            .args(["--no-mdns", "--no-dht"]);
        c
    };
    eprintln!("  S2 warm-up");
    rm(&dd);
    rm(&out);
    settle()?;
    let first = run_ok(&mut get())?;
    rm(&dd);
    rm(&out);
    let first_bare = run_ok(Command::new(&cx.bulk).arg(size.to_string()))?;
    let first_ratio = bulk_line(&first_bare.stdout, BARE_TWO).map(|(m, _)| mib / first.secs / m);
    for i in 0..cx.o.runs {
        eprintln!("  S2 run {}/{}", i + 1, cx.o.runs);
        // shoal. Each tool that writes the file to disk starts with the
        // disk idle: the one before it (the seeder's add and sendme's
        // import at first) may have left a gigabyte of dirty pages, whose
        // writeback would otherwise slow this one's writes down.
        rm(&dd);
        rm(&out);
        settle()?;
        let c0 = seeder.proc.cpu_now();
        let r = run_ok(&mut get())?;
        let c1 = seeder.proc.cpu_now();
        sh_rate.push(mib / r.secs);
        if let (Some(c0), Some(c1)) = (c0, c1) {
            sh_cpu.push((c1 - c0 + r.usage.cpu) / (size as f64 / GIB));
        }
        sh_rss.push(r.usage.rss_mib);
        rm(&dd);
        rm(&out);
        // bare quinn stream, between two processes as shoal's two ends,
        // and in one process; TCP from the same example
        let r = run_ok(Command::new(&cx.bulk).arg(size.to_string()))?;
        let mut run_bare = None;
        if let Some((m, c)) = bulk_line(&r.stdout, BARE_TWO) {
            run_bare = Some(m);
            q_rate.push(m);
            q_cpu.push(c);
            if let Some(sh) = sh_rate.last() {
                pair_ratio.push(sh / m);
            }
        }
        if let Some((m, c)) = bulk_line(&r.stdout, BARE_UNCACHED) {
            qu_rate.push(m);
            qu_cpu.push(c);
        }
        if let Some((m, c)) = bulk_line(&r.stdout, BARE_ONE) {
            q1_rate.push(m);
            q1_cpu.push(c);
        }
        if let Some((m, _)) = bulk_line(&r.stdout, "tcp stream") {
            tcp_bulk.push(m);
        }
        // libtorrent
        if lt && lt_err.is_none() {
            rm(&lt_dir);
            std::fs::create_dir_all(&lt_dir)?;
            settle()?;
            let r = run(Command::new(PY)
                .arg(&lt_script)
                .arg("run")
                .arg(&torrent)
                .arg(input.parent().unwrap_or(Path::new(".")))
                .arg(&lt_dir));
            match r {
                Ok(r) if r.usage.ok => {
                    let w: Vec<f64> = r
                        .stdout
                        .split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    if let [el, cpu] = w[..] {
                        lt_rate.push(mib / el);
                        lt_cpu.push(cpu / (size as f64 / GIB));
                    } else {
                        // Said in its row, not a silent "-" (a review).
                        lt_err = Some(format!(
                            "failed: its output was not two numbers: {:?}",
                            last_line(&r.stdout)
                        ));
                    }
                }
                Ok(r) => lt_err = Some(format!("failed: {}", last_line(&r.stderr))),
                Err(e) => lt_err = Some(format!("failed: {e:#}")),
            }
            rm(&lt_dir);
        }
        // sendme
        if let Some((_, t)) = &sendme_seed {
            let cwd = cx.work.join("s2-sendme-recv");
            rm(&cwd);
            std::fs::create_dir_all(&cwd)?;
            settle()?;
            match run(Command::new("sendme")
                .args(["receive", t])
                .current_dir(&cwd))
            {
                Ok(r) if r.usage.ok => sm_rate.push(mib / r.secs),
                Ok(r) => sendme_err = Some(format!("failed: {}", last_line(&r.stderr))),
                Err(e) => sendme_err = Some(format!("failed: {e:#}")),
            }
            rm(&cwd);
        }
        // TCP over loopback
        // A reference: its failure is said in its row, and the scenario
        // goes on (it ended S2, every row with it).
        if iperf && tcp_err.is_none() {
            match iperf3_loopback(size) {
                Ok(v) => tcp.push(v),
                Err(e) => tcp_err = Some(format!("failed: {e:#}")),
            }
        }
        // The disk's bound: the same bytes made durable where get wrote.
        if disk_err.is_none() {
            match durable_copy(&input, &out) {
                Ok(secs) => {
                    let d = mib / secs;
                    disk_rate.push(d);
                    if let (Some(sh), Some(q)) = (sh_rate.last(), run_bare) {
                        bound_ratio.push(sh / d.min(q));
                    }
                }
                Err(e) => disk_err = Some(format!("failed: {e:#}")),
            }
        }
    }
    let seeder_rss = seeder.proc.peak_rss_mib();
    seeder.stop();
    drop(sendme_seed);
    rm(&sd);
    let note = format!("{} MiB over loopback", size >> 20);
    // A baseline's figure missing from a run (its line not found in the
    // example's output) is said, not silently left out of its median.
    let runs = cx.o.runs;
    let gaps = |v: &[f64]| {
        if v.len() < runs {
            format!("; {} of {runs} runs gave no figure", runs - v.len())
        } else {
            String::new()
        }
    };
    cx.rows.push(
        Row::new("S2", "get, 1 seeder -> 1 downloader", "MiB/s")
            .shoal(median(&sh_rate))
            .base("bare quinn stream, two processes", median(&q_rate))
            .paired(runs, &sh_rate, &q_rate)
            .target(">= 0.8x")
            .note(format!(
                "{note}; each end in its own process, as shoal's; one 1 MiB buffer sent over and over; per-run ratios {}; untimed first run {}{}",
                pair_ratio
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                first_ratio.map_or_else(|| "-".to_string(), |r| format!("{r:.2}")),
                gaps(&q_rate)
            )),
    );
    cx.rows.push(
        Row::new("S2", "get", "MiB/s")
            .shoal(median(&sh_rate))
            .base("bare quinn stream, uncached data", median(&qu_rate))
            .paired(runs, &sh_rate, &qu_rate)
            .note(format!("reference: two processes, the sender cycling through 64 MiB of distinct buffers (not in cache, as a file's bytes are){}", gaps(&qu_rate))),
    );
    cx.rows.push(
        Row::new("S2", "get", "MiB/s")
            .shoal(median(&sh_rate))
            .base("bare quinn stream, one process", median(&q1_rate))
            .paired(runs, &sh_rate, &q1_rate)
            .note(format!(
                "reference: both ends share one runtime of 2 workers{}",
                gaps(&q1_rate)
            )),
    );
    cx.rows.push(
        Row::new("S2", "get", "MiB/s")
            .shoal(median(&sh_rate))
            .base("libtorrent (python3-libtorrent)", median(&lt_rate))
            .paired(runs, &sh_rate, &lt_rate)
            .target("> 1x")
            .note(
                lt_err
                    .or((!lt).then(|| NOT_INSTALLED.to_string()))
                    .unwrap_or_default(),
            ),
    );
    cx.rows.push(
        Row::new("S2", "get", "MiB/s")
            .shoal(median(&sh_rate))
            .base("sendme", median(&sm_rate))
            .paired(runs, &sh_rate, &sm_rate)
            .target("> 1x")
            .note(
                sendme_err
                    .or((!sendme).then(|| NOT_INSTALLED.to_string()))
                    .unwrap_or_default(),
            ),
    );
    let (tcp_name, tcp_v, tcp_note) = if iperf {
        (
            "TCP over loopback (iperf3)",
            median(&tcp),
            tcp_err.map_or_else(|| "reference".to_string(), |e| format!("reference; {e}")),
        )
    } else {
        (
            "TCP over loopback (bulk example)",
            median(&tcp_bulk),
            "reference; iperf3 not installed (run with --install)".to_string(),
        )
    };
    cx.rows.push(
        Row::new("S2", "get", "MiB/s")
            .shoal(median(&sh_rate))
            .base(tcp_name, tcp_v)
            .note(tcp_note),
    );
    cx.rows.push(
        Row::new("S2", "get", "MiB/s")
            .shoal(median(&sh_rate))
            .base("durable copy on this disk", median(&disk_rate))
            .paired(runs, &sh_rate, &disk_rate)
            .note(disk_err.unwrap_or_else(|| {
                format!(
                    "reference, a bound: the input copied to where get writes, 1 MiB writes and fdatasync, the faster of O_DIRECT and the page cache (get makes its copy durable before it records it complete); per-run ratios over the lower of this and the bare stream {}",
                    bound_ratio
                        .iter()
                        .map(|r| format!("{r:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })),
    );
    cx.rows.push(
        Row::new("S2", "CPU s per GiB (both sides)", "s/GiB")
            .shoal(median(&sh_cpu))
            .base("bare quinn stream, two processes", median(&q_cpu))
            .paired(runs, &sh_cpu, &q_cpu)
            .note(format!(
                "lower is better{}",
                gaps(&sh_cpu).replace("runs gave", "runs of shoal gave")
            )),
    );
    cx.rows.push(
        Row::new("S2", "CPU s per GiB (both sides)", "s/GiB")
            .shoal(median(&sh_cpu))
            .base("bare quinn stream, uncached data", median(&qu_cpu))
            .paired(runs, &sh_cpu, &qu_cpu)
            .note("lower is better"),
    );
    cx.rows.push(
        Row::new("S2", "CPU s per GiB (both sides)", "s/GiB")
            .shoal(median(&sh_cpu))
            .base("bare quinn stream, one process", median(&q1_cpu))
            .paired(runs, &sh_cpu, &q1_cpu)
            .note("lower is better"),
    );
    cx.rows.push(
        Row::new("S2", "CPU s per GiB (both sides)", "s/GiB")
            .shoal(median(&sh_cpu))
            .base("libtorrent (python3-libtorrent)", median(&lt_cpu))
            .paired(runs, &sh_cpu, &lt_cpu)
            .note("lower is better; libtorrent's includes python start-up"),
    );
    cx.rows.push(
        Row::new("S2", "peak RSS, downloader", "MiB")
            .shoal(median(&sh_rss))
            .note(seeder_rss.map_or_else(
                || "the seeder's peak RSS could not be read from /proc".to_string(),
                |m| format!("seeder peak RSS {m:.0} MiB"),
            )),
    );
    Ok(())
}

fn last_line(s: &str) -> String {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .chars()
        .take(160)
        .collect()
}

// ---------------------------------------------------------------------
// S4: many small files.

/// Seconds to move `src` into `dst` with tar through a TCP connection over
/// loopback (neither tar nor `shoal get` syncs what it wrote).
fn tar_over_tcp(src: &Path, dst: &Path) -> Result<f64> {
    std::fs::create_dir_all(dst)?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let t = Instant::now();
    let mut untar = Proc::spawn(
        Command::new("tar")
            .arg("-C")
            .arg(dst)
            .arg("-xf")
            .arg("-")
            .stdin(Stdio::piped()),
    )?;
    let mut stdin = untar
        .child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("tar stdin"))?;
    let recv = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut sock, _) = listener.accept()?;
        std::io::copy(&mut sock, &mut stdin)
    });
    let mut tar = Proc::spawn(
        Command::new("tar")
            .arg("-C")
            .arg(src)
            .args(["-cf", "-", "."])
            .stdout(Stdio::piped()),
    )?;
    let mut out = tar
        .child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("tar stdout"))?;
    let mut sock = TcpStream::connect(addr)?;
    // Both ends are waited for and reported: a failed run once said only
    // "Broken pipe", the sending side's error, which hid the other's.
    let sent = std::io::copy(&mut out, &mut sock);
    drop(sock);
    drop(out);
    let ok1 = tar.wait().ok;
    let received = recv
        .join()
        .map_err(|_| anyhow!("receiver thread panicked"))?;
    let ok2 = untar.wait().ok;
    if sent.is_err() || received.is_err() || !(ok1 && ok2) {
        bail!(
            "tar pipeline failed: sending tar -c's output: {sent:?}, tar -c ok: {ok1}; \
             receiving into tar -x: {received:?}, tar -x ok: {ok2}"
        );
    }
    Ok(t.elapsed().as_secs_f64())
}

/// How long ext4 keeps a deleted inode from reuse once its inode table
/// block is written back (`recently_deleted` in fs/ext4/ialloc.c: 60 s),
/// with a margin.
const EXT4_REUSE_WAIT: Duration = Duration::from_secs(65);

fn s4(cx: &mut Ctx) -> Result<()> {
    let n = cx.o.files;
    let tree = cx.work.join(format!("tree-{n}"));
    if !tree_ready(&tree) {
        eprintln!("bench: writing {n} files of 4 KiB");
        write_tree(&tree, n)?;
    }
    let mib = n as f64 * 4096.0 / MIB;
    let sd = cx.work.join("s4-seeder");
    // Every step writes into directories of its own, and all are deleted
    // only once the scenario is over: ext4 does not reuse an inode within
    // 60 s of its deletion (360 s while the inode's table block is dirty
    // in memory, hence the sync first), and creating a file scans past every such
    // inode in its group (`recently_deleted`, 75% of the samples). tar
    // extracting the 10,000 files took 0.27 s into a fresh directory and
    // 5-8 s right after another 10,000 had been deleted, so deleting
    // between steps measured the previous step's deletions. (Kept until
    // the end: ~120 MB and 30,000 inodes a run at the defaults.)
    //
    // What this scenario leaves (also after an interrupted run): removed
    // now, and if there was any, the deletions are given time to age.
    let leftovers: Vec<PathBuf> = std::fs::read_dir(&cx.work)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("s4-"))
        .map(|e| e.path())
        .collect();
    if !leftovers.is_empty() {
        for p in &leftovers {
            rm(p);
        }
        eprintln!("bench: removed an earlier run's S4 files; waiting 65 s for ext4 to reuse them");
        settle()?;
        std::thread::sleep(EXT4_REUSE_WAIT);
    }
    let runs = cx.o.runs;
    let place = |what: &str, i: usize| cx.work.join(format!("s4-{what}-{i}"));
    let (mut sh, mut tar, mut fresh) = (vec![], vec![], vec![]);
    let sendme = have("sendme");
    let (mut sm, mut sm_err) = (vec![], None::<String>);
    let mut warm_up = None;
    let res = (|| -> Result<()> {
        let (hash, _) = cx.shoal.add(&sd, &tree, false)?;
        let mut seeder = cx.shoal.serve(&sd, None, "127.0.0.1:0", &[])?;
        let mut ticket = cx.shoal.ticket(&seeder, &hash)?;
        // One untimed run of each first, as hyperfine's --warmup: the
        // first get of an invocation was its slowest every time (300-358
        // ms against ~260, the downloader's kernel time 0.31 s against
        // ~0.2), and tar's first run is not free of such effects either.
        // The seeder keeps the small blobs it served lately in memory
        // (`store/served.rs`), so the warm-up is also served from files
        // (as each run's step 2 below): its time is reported beside the
        // others.
        // A get into directories of its own: `what` names the kind of
        // run ("" or "-fresh"), `i` the run.
        let get = |ticket: &str, what: &str, i: usize| {
            run_ok(
                cx.shoal
                    .cmd(&place(&format!("downloader{what}"), i), None)
                    .args(["get", ticket, "-o"])
                    .arg(place(&format!("out-shoal{what}"), i))
                    .args(["--no-mdns", "--no-dht"]),
            )
        };
        settle()?;
        let cold = get(&ticket, "", runs)?;
        settle()?;
        let tar_first = tar_over_tcp(&tree, &place("out-tar", runs))?;
        warm_up = Some((cold.secs, tar_first));
        for i in 0..runs {
            eprintln!("  S4 run {}/{}", i + 1, runs);
            // The steps in turn, the order reversed every other run; each
            // starts with the disk synced, so that none pays for the
            // writeback of the one before. Step 2 restarts the seeder and
            // times its first get, served from its files; it runs before
            // step 0 or after it, so step 0's seeder has always served
            // the collection before (from memory, `store/served.rs`).
            let mut steps = [2, 0, 1];
            if i % 2 == 1 {
                steps.reverse();
            }
            for step in steps {
                if step == 2 {
                    seeder.stop();
                    seeder = cx.shoal.serve(&sd, None, "127.0.0.1:0", &[])?;
                    ticket = cx.shoal.ticket(&seeder, &hash)?;
                }
                settle()?;
                match step {
                    0 => sh.push(get(&ticket, "", i)?.secs),
                    2 => fresh.push(get(&ticket, "-fresh", i)?.secs),
                    _ => tar.push(tar_over_tcp(&tree, &place("out-tar", i))?),
                }
            }
        }
        seeder.stop();
        // sendme, when installed (bench.md): the tree sent once, received
        // into a fresh directory each run. Its failure is said in its row.
        if sendme {
            match sendme_send(&tree, &place("sendme-send", 0)) {
                Ok((sender, t)) => {
                    for i in 0..runs {
                        let cwd = place("out-sendme", i);
                        std::fs::create_dir_all(&cwd)?;
                        settle()?;
                        match run(Command::new("sendme")
                            .args(["receive", &t])
                            .current_dir(&cwd))
                        {
                            Ok(r) if r.usage.ok => sm.push(r.secs),
                            Ok(r) => {
                                sm_err = Some(format!("failed: {}", last_line(&r.stderr)));
                                break;
                            }
                            Err(e) => {
                                sm_err = Some(format!("failed: {e:#}"));
                                break;
                            }
                        }
                    }
                    drop(sender);
                }
                Err(e) => sm_err = Some(format!("failed: {e:#}")),
            }
        }
        Ok(())
    })();
    // The runs' directories and the warm-up's (numbered `runs`).
    for i in 0..=runs {
        for what in [
            "downloader",
            "out-shoal",
            "downloader-fresh",
            "out-shoal-fresh",
            "out-tar",
            "sendme-send",
            "out-sendme",
        ] {
            rm(&place(what, i));
        }
    }
    rm(&sd);
    // What runs next (another S4 right away) must not pay for these
    // deletions either.
    eprintln!("bench: waiting 65 s for ext4 to reuse the deleted S4 files");
    settle()?;
    std::thread::sleep(EXT4_REUSE_WAIT);
    res?;
    let files_s = |v: &[f64]| median(v).map(|s| n as f64 / s);
    let mib_s = |v: &[f64]| median(v).map(|s| mib / s);
    // Each run's rate, for the ratios run by run.
    let rates = |v: &[f64]| v.iter().map(|s| 1.0 / s).collect::<Vec<f64>>();
    // Each run's pair, in ms: "shoal/tar, ...".
    let pairs = |ours: &[f64]| {
        ours.iter()
            .zip(&tar)
            .map(|(a, b)| format!("{:.0}/{:.0}", a * 1e3, b * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let per_run = pairs(&sh);
    cx.rows.push(
        Row::new("S4", &format!("{n} files of 4 KiB"), "files/s")
            .shoal(files_s(&sh))
            .base("tar over TCP (loopback)", files_s(&tar))
            .paired(runs, &rates(&sh), &rates(&tar))
            .target(">= 1x")
            .note(format!(
                "fresh directories; per run, ms for shoal/tar: {per_run}; untimed first run, \
                 the seeder's cache of small blobs cold: {}",
                warm_up.map_or_else(
                    || "-".to_string(),
                    |(a, b): (f64, f64)| format!("{:.0}/{:.0}", a * 1e3, b * 1e3)
                )
            )),
    );
    cx.rows.push(
        Row::new("S4", &format!("{n} files of 4 KiB"), "MiB/s")
            .shoal(mib_s(&sh))
            .base("tar over TCP (loopback)", mib_s(&tar))
            .paired(runs, &rates(&sh), &rates(&tar)),
    );
    let per_run = pairs(&fresh);
    cx.rows.push(
        Row::new("S4", "the same, from a seeder just started", "files/s")
            .shoal(files_s(&fresh))
            .base("tar over TCP (loopback)", files_s(&tar))
            .paired(runs, &rates(&fresh), &rates(&tar))
            .note(format!(
                "reference: the seeder restarted before each of these gets, which it \
                 serves from its files, not from its memory of the small blobs it served \
                 lately; per run, ms for shoal/tar: {per_run}"
            )),
    );
    cx.rows.push(
        Row::new("S4", &format!("{n} files of 4 KiB"), "files/s")
            .shoal(files_s(&sh))
            .base("sendme", files_s(&sm))
            .note(
                sm_err
                    .or((!sendme).then(|| NOT_INSTALLED.to_string()))
                    .unwrap_or_else(|| {
                        "sent once, received into a fresh directory each run (after shoal's \
                         and tar's runs)"
                            .into()
                    }),
            ),
    );
    Ok(())
}

// ---------------------------------------------------------------------
// S5: memory with a big file.

fn s5(cx: &mut Ctx) -> Result<()> {
    let size = cx.o.s5_size;
    let input = cx.work.join(format!("input-{}.bin", size >> 20));
    write_random(&input, size, 5)?;
    let sd = cx.work.join("s5-seeder");
    let dd = cx.work.join("s5-downloader");
    let out = cx.work.join("s5-out.bin");
    rm(&sd);
    rm(&dd);
    rm(&out);
    let (hash, add) = cx.shoal.add(&sd, &input, false)?;
    let seeder = cx.shoal.serve(&sd, None, "127.0.0.1:0", &[])?;
    let ticket = cx.shoal.ticket(&seeder, &hash)?;
    let r = run_ok(
        cx.shoal
            .cmd(&dd, None)
            .args(["get", &ticket, "-o"])
            .arg(&out)
            .args(["--no-mdns", "--no-dht"]),
    )?;
    let seeder_rss = seeder.proc.peak_rss_mib();
    seeder.stop();
    rm(&sd);
    rm(&dd);
    rm(&out);
    let note = format!("{} MiB file, one run", size >> 20);
    let limit = Some(100.0);
    cx.rows.push(
        Row::new("S5", "peak RSS, seeder (serve)", "MiB")
            .shoal(seeder_rss)
            .base("limit", limit)
            .target("< 1x")
            .note(if seeder_rss.is_some() {
                note.clone()
            } else {
                format!("{note}; failed: its peak RSS could not be read from /proc")
            }),
    );
    cx.rows.push(
        Row::new("S5", "peak RSS, downloader (get -o)", "MiB")
            .shoal(Some(r.usage.rss_mib))
            .base("limit", limit)
            .target("< 1x")
            .note(format!("{note}; {:.0} MiB/s", size as f64 / MIB / r.secs)),
    );
    cx.rows.push(
        Row::new("S5", "peak RSS, add (import)", "MiB")
            .shoal(Some(add.usage.rss_mib))
            .base("limit", limit)
            .target("< 1x")
            .note(note),
    );
    Ok(())
}

// ---------------------------------------------------------------------
// S6: resume after a kill at 50%.

fn s6(cx: &mut Ctx) -> Result<()> {
    let size = cx.o.size;
    let input = cx.work.join(format!("input-{}.bin", size >> 20));
    write_random(&input, size, 1)?;
    let sd = cx.work.join("s6-seeder");
    let dd = cx.work.join("s6-downloader");
    rm(&sd);
    let (hash, _) = cx.shoal.add(&sd, &input, false)?;
    // Capped so that "50%" is a moment we can catch.
    let seeder = cx
        .shoal
        .serve(&sd, None, "127.0.0.1:0", &["--max-upload", "100MiB/s"])?;
    let ticket = cx.shoal.ticket(&seeder, &hash)?;
    let peer = seeder.peer.clone();
    let mut ratios = vec![];
    let mut detail = String::new();
    for i in 0..cx.o.runs {
        eprintln!("  S6 run {}/{}", i + 1, cx.o.runs);
        rm(&dd);
        let node = cx
            .shoal
            .serve(&dd, None, "127.0.0.1:0", &["--peer", &peer])?;
        let mut get = Proc::spawn(
            cx.shoal
                .cmd(&dd, None)
                .args(["get", &ticket])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        let deadline = Instant::now() + Duration::from_secs(300);
        let seen = loop {
            let st = cx.shoal.status(&node)?;
            let v = st["transfers"]
                .as_array()
                .and_then(|t| t.first())
                .and_then(|t| t["verified"].as_u64())
                .unwrap_or(0);
            if v >= size / 2 {
                break v;
            }
            if get.try_wait().is_some() || Instant::now() > deadline {
                bail!("the download ended or stalled before 50%");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        node.proc.signal(libc::SIGKILL);
        get.signal(libc::SIGKILL);
        drop(node);
        drop(get);
        // What the store holds after the kill (its open checks the file
        // for groups verified since its last save), but never less than
        // the node said it had verified before it: verified groups the
        // kill lost, fetched again, are the resume's cost, and must not
        // leave the count of what was missing (a review).
        let have = cx.shoal.verified(&dd, &hash)?;
        let missing = size - have.max(seen).min(size);
        let node = cx
            .shoal
            .serve(&dd, None, "127.0.0.1:0", &["--peer", &peer])?;
        run_ok(cx.shoal.cmd(&dd, None).args(["get", &ticket]))?;
        let st = cx.shoal.status(&node)?;
        let got = st["downloaded"].as_u64().unwrap_or(0);
        node.stop();
        if missing > 0 {
            ratios.push(got as f64 / missing as f64);
        }
        detail = format!(
            "killed with {:.0}% verified ({:.0}% kept); fetched {} MiB for {} MiB missing",
            100.0 * seen as f64 / size as f64,
            100.0 * have as f64 / size as f64,
            got >> 20,
            missing >> 20
        );
        rm(&dd);
    }
    seeder.stop();
    rm(&sd);
    cx.rows.push(
        Row::new("S6", "bytes fetched after restart / bytes missing", "")
            .shoal(median(&ratios))
            .base("ideal", Some(1.0))
            .target("<= 1.1x")
            .note(detail),
    );
    Ok(())
}

// ---------------------------------------------------------------------
// S3: the swarm lab.

/// Network namespaces on a bridge; deleted on drop.
struct Lab {
    bridge_ns: String,
    hosts: Vec<String>,
    /// The namespaces made so far: the drop deletes these, and only these.
    made: Vec<String>,
}

impl Lab {
    fn ip(i: usize) -> String {
        format!("10.77.{}.{}", (i + 1) / 250, (i + 1) % 250 + 1)
    }

    fn new(n: usize, rate: &str) -> Result<Lab> {
        remove_stale_labs();
        // The whole pid, and each name registered (for the drop and the
        // signal thread) only once made: with `pid % 100000` and names
        // registered first, a name already there (another run's) failed
        // the add, and the drop deleted that run's lab (a review).
        let p = std::process::id();
        let mut lab = Lab {
            bridge_ns: format!("{LAB_PREFIX}{p}-br"),
            hosts: (0..n).map(|i| format!("{LAB_PREFIX}{p}-h{i}")).collect(),
            made: Vec::new(),
        };
        let add = |lab: &mut Lab, ns: &str| -> Result<()> {
            stopping()?;
            let out = Command::new("ip")
                .args(["netns", "add", ns])
                .output()
                .context("ip netns add")?;
            if !out.status.success() {
                bail!(
                    "ip netns add {ns} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            lab.made.push(ns.to_string());
            NETNS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ns.to_string());
            Ok(())
        };
        let b = lab.bridge_ns.clone();
        add(&mut lab, &b)?;
        let b = b.as_str();
        let q = |args: &[&str]| -> Result<()> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .with_context(|| format!("ip {args:?}"))?;
            if !out.status.success() {
                bail!(
                    "ip {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        q(&["-n", b, "link", "add", "br0", "type", "bridge"])?;
        q(&["-n", b, "link", "set", "br0", "up"])?;
        for (i, h) in lab.hosts.clone().iter().enumerate() {
            let port = format!("p{i}");
            add(&mut lab, h)?;
            q(&[
                "-n", h, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", b,
            ])?;
            q(&["-n", b, "link", "set", &port, "master", "br0", "up"])?;
            q(&[
                "-n",
                h,
                "addr",
                "add",
                &format!("{}/16", Lab::ip(i)),
                "dev",
                "eth0",
            ])?;
            q(&["-n", h, "link", "set", "eth0", "up"])?;
            q(&["-n", h, "link", "set", "lo", "up"])?;
            // The host's upload: egress of its own interface.
            let out = Command::new("ip")
                .args([
                    "netns", "exec", h, "tc", "qdisc", "add", "dev", "eth0", "root",
                ])
                .args(["tbf", "rate", rate, "burst", "64kb", "latency", "100ms"])
                .output()?;
            if !out.status.success() {
                bail!(
                    "tc tbf failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        delete_netns(&self.made);
    }
}

/// The lab's namespaces are named `<LAB_PREFIX><pid>-...`.
const LAB_PREFIX: &str = "shoalbench-";

/// Deletes the labs of earlier runs whose process is gone (killed before
/// they could delete them).
fn remove_stale_labs() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(LAB_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("bench: deleting {name}, left by an earlier run");
            delete_netns(&[name.to_string()]);
        }
    }
}

/// Bytes per second of TCP payload from host 0 to host 1, by iperf3.
fn lab_goodput(lab: &Lab) -> Result<f64> {
    let mut server = Proc::spawn(
        Command::new("ip")
            .args(["netns", "exec", &lab.hosts[1], "iperf3", "-s", "-1", "-B"])
            .arg(Lab::ip(1))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let r = run_ok(
        Command::new("ip")
            .args(["netns", "exec", &lab.hosts[0], "iperf3", "-c"])
            .arg(Lab::ip(1))
            .args(["-t", "8", "-O", "2", "-J"]),
    )?;
    server.wait();
    let v: Value = serde_json::from_str(&r.stdout).context("iperf3 -J")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 8.0)
        .ok_or_else(|| anyhow!("iperf3 reported no rate"))
}

fn tc_rate_bytes(rate: &str) -> Result<f64> {
    let r = rate.to_ascii_lowercase();
    let split = r
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(r.len());
    let (n, unit) = r.split_at(split);
    let n: f64 = n.parse().with_context(|| format!("rate {rate}"))?;
    let bits = match unit {
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "bit" | "" => 1.0,
        _ => bail!("rate {rate}: use kbit, mbit or gbit"),
    };
    Ok(n * bits / 8.0)
}

struct SwarmRun {
    secs: f64,
    seeder_copies: f64,
}

fn lab_shoal(cx: &Ctx, lab: &Lab, input: &Path, hash: &str, sd: &Path) -> Result<SwarmRun> {
    let n = lab.hosts.len() - 1;
    let seeder = cx.shoal.serve(
        sd,
        Some(&lab.hosts[0]),
        &format!("{}:7000", Lab::ip(0)),
        &[],
    )?;
    let ticket = cx.shoal.ticket(&seeder, hash)?;
    let dirs: Vec<PathBuf> = (1..=n).map(|i| cx.work.join(format!("s3-d{i}"))).collect();
    let size = std::fs::metadata(input)?.len();
    for d in &dirs {
        rm(d);
    }
    // Timed from the downloaders' start, as aria2c's are: their nodes'
    // start-up and first dial count (started before the clock, they were
    // free to shoal alone; a review). All started at once, as aria2c's
    // peers are, then waited for.
    let t = Instant::now();
    let mut starting = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        starting.push(cx.shoal.start_serve(
            d,
            Some(&lab.hosts[i + 1]),
            &format!("{}:7000", Lab::ip(i + 1)),
            &["--peer", &seeder.peer],
        )?);
    }
    let nodes = starting
        .into_iter()
        .map(Starting::ready)
        .collect::<Result<Vec<Node>>>()?;
    let mut gets = Vec::new();
    for d in &dirs {
        gets.push(Some(Proc::spawn(
            cx.shoal
                .cmd(d, None)
                .args(["get", &ticket, "--timeout", "120"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?));
    }
    let limit = Duration::from_secs(600);
    let mut last = 0.0;
    let mut left = n;
    while left > 0 {
        for g in gets.iter_mut() {
            if let Some(u) = g.as_mut().and_then(Proc::try_wait) {
                if !u.ok {
                    bail!("a shoal get failed in the lab");
                }
                last = t.elapsed().as_secs_f64();
                *g = None;
                left -= 1;
            }
        }
        if t.elapsed() > limit {
            bail!("shoal swarm did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let up = cx.shoal.status(&seeder)?["uploaded"].as_u64().unwrap_or(0);
    // Stop them all at once: each takes a moment to close its connections.
    for n in &nodes {
        n.proc.signal(libc::SIGTERM);
    }
    for node in nodes {
        node.stop();
    }
    seeder.stop();
    for d in &dirs {
        rm(d);
    }
    Ok(SwarmRun {
        secs: last,
        seeder_copies: up as f64 / size as f64,
    })
}

const ARIA_COMMON: &[&str] = &[
    "--enable-dht=false",
    "--enable-dht6=false",
    "--bt-enable-lpd=false",
    "--enable-peer-exchange=true",
    "--seed-ratio=0.0",
    "--seed-time=100000",
    "--summary-interval=0",
    "--console-log-level=error",
    "--check-certificate=false",
    "--listen-port=6881",
    "--bt-seed-unverified=true",
];

fn lab_aria2(
    cx: &Ctx,
    lab: &Lab,
    input: &Path,
    torrent: &Path,
    info_hash: &str,
) -> Result<SwarmRun> {
    let n = lab.hosts.len() - 1;
    let dir = cx.work.join("s3-bt");
    rm(&dir);
    std::fs::create_dir_all(&dir)?;
    let wl = dir.join("whitelist");
    std::fs::write(&wl, format!("{info_hash}\n"))?;
    let tracker = Proc::spawn(
        Command::new("ip")
            .args(["netns", "exec", &lab.hosts[0], "opentracker", "-i"])
            .arg(Lab::ip(0))
            .args(["-p", "6969", "-P", "6969", "-w"])
            .arg(&wl)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let seed_dir = input.parent().unwrap_or(Path::new("."));
    let seeder = Proc::spawn(
        Command::new("ip")
            .args(["netns", "exec", &lab.hosts[0], "aria2c", "-d"])
            .arg(seed_dir)
            .args(ARIA_COMMON)
            .arg(torrent)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    // Let the seeder announce first.
    std::thread::sleep(Duration::from_secs(3));
    let name = input
        .file_name()
        .ok_or_else(|| anyhow!("input has no file name"))?;
    let hook = dir.join("done.sh");
    std::fs::write(&hook, "#!/bin/sh\ntouch \"$3.done\"\n")?;
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let t = Instant::now();
    let mut peers = Vec::new();
    let mut markers = Vec::new();
    for i in 1..=n {
        let d = dir.join(format!("d{i}"));
        std::fs::create_dir_all(&d)?;
        markers.push(Some(d.join(format!("{}.done", name.to_string_lossy()))));
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &lab.hosts[i], "aria2c", "-d"])
            .arg(&d)
            .args(ARIA_COMMON)
            .arg("--file-allocation=falloc")
            .arg(format!("--on-bt-download-complete={}", hook.display()))
            .arg(torrent)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        peers.push(Proc::spawn(&mut c)?);
    }
    let limit = Duration::from_secs(900);
    let mut last = 0.0;
    let mut left = n;
    while left > 0 {
        // One that died never writes its marker: said now, not after the
        // limit.
        if let Some(i) = peers.iter_mut().position(|p| p.try_wait().is_some()) {
            bail!("aria2c on lab host {} exited before it finished", i + 1);
        }
        for m in markers.iter_mut() {
            if m.as_ref().is_some_and(|p| p.exists()) {
                *m = None;
                left -= 1;
                last = t.elapsed().as_secs_f64();
            }
        }
        if t.elapsed() > limit {
            bail!("aria2c swarm did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(peers);
    drop(seeder);
    drop(tracker);
    rm(&dir);
    Ok(SwarmRun {
        secs: last,
        seeder_copies: f64::NAN,
    })
}

fn s3(cx: &mut Ctx) -> Result<()> {
    let n = cx.o.downloaders;
    let note_rows = |cx: &mut Ctx, why: &str| {
        cx.rows.push(
            Row::new("S3", "swarm: D_measured / D_min", "s")
                .base("D_min", None)
                .note(why.to_string()),
        );
    };
    if !is_root() {
        note_rows(cx, "not run: the lab needs root (network namespaces)");
        return Ok(());
    }
    if !have("ip") || !have("tc") {
        note_rows(
            cx,
            "not run: ip and tc (iproute2) not installed (run with --install)",
        );
        return Ok(());
    }
    let size = cx.o.lab_size_mib << 20;
    let input = cx.work.join(format!("lab-{}.bin", size >> 20));
    write_random(&input, size, 3)?;
    let sd = cx.work.join("s3-seeder");
    rm(&sd);
    let (hash, _) = cx.shoal.add(&sd, &input, false)?;
    eprintln!(
        "  building the lab: 1 seeder + {n} downloaders at {}",
        cx.o.rate
    );
    let lab = Lab::new(n + 1, &cx.o.rate)?;
    let (u, u_note) = if have("iperf3") {
        let g = lab_goodput(&lab)?;
        (
            g,
            format!("TCP goodput {:.1} Mbit/s (iperf3)", g * 8.0 / 1e6),
        )
    } else {
        let r = tc_rate_bytes(&cx.o.rate)? * 0.956;
        (
            r,
            format!(
                "iperf3 not installed: goodput assumed 95.6% of {}",
                cx.o.rate
            ),
        )
    };
    let f = size as f64;
    // Every host's upload is u, downloads are not capped.
    let d_min = (f / u).max(n as f64 * f / ((n + 1) as f64 * u));

    let bt = have("aria2c") && have("mktorrent") && have("opentracker");
    let torrent = cx.work.join(format!("lab-{}.torrent", size >> 20));
    let mut info_hash = String::new();
    if bt {
        rm(&torrent);
        run_ok(
            Command::new("mktorrent")
                .args(["-l", "18", "-a"])
                .arg(format!("http://{}:6969/announce", Lab::ip(0)))
                .arg("-o")
                .arg(&torrent)
                .arg(&input),
        )?;
        let r = run_ok(Command::new("aria2c").arg("-S").arg(&torrent))?;
        info_hash = r
            .stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("Info Hash: "))
            .map(|s| s.trim().to_string())
            .ok_or_else(|| anyhow!("aria2c -S printed no info hash"))?;
    }
    let runs = cx.o.lab_runs.unwrap_or(cx.o.runs);
    let (mut sh, mut copies, mut ar) = (vec![], vec![], vec![]);
    let mut bt_err = None;
    for i in 0..runs {
        eprintln!("  S3 run {}/{runs}: shoal", i + 1);
        let r = lab_shoal(cx, &lab, &input, &hash, &sd)?;
        eprintln!(
            "    shoal: {:.1} s ({:.2}x D_min), seeder sent {:.2} copies",
            r.secs,
            r.secs / d_min,
            r.seeder_copies
        );
        sh.push(r.secs);
        copies.push(r.seeder_copies);
        if bt && bt_err.is_none() {
            eprintln!("  S3 run {}/{runs}: aria2c", i + 1);
            match lab_aria2(cx, &lab, &input, &torrent, &info_hash) {
                Ok(r) => {
                    eprintln!("    aria2c: {:.1} s ({:.2}x D_min)", r.secs, r.secs / d_min);
                    ar.push(r.secs);
                }
                Err(e) => bt_err = Some(format!("failed: {e:#}")),
            }
        }
    }
    drop(lab);
    rm(&sd);
    let desc = format!(
        "1 seeder + {n} downloaders, {} MiB, upload {} each",
        size >> 20,
        cx.o.rate
    );
    cx.rows.push(
        Row::new("S3", "shoal swarm: D_measured vs D_min", "s")
            .shoal(median(&sh))
            .base("D_min", Some(d_min))
            .target("<= 1.25x")
            .note(format!(
                "{desc}; {u_note}; seeder sent {:.2} copies",
                median(&copies).unwrap_or(f64::NAN)
            )),
    );
    cx.rows.push(
        Row::new("S3", "aria2c swarm: D_measured vs D_min", "s")
            .subject("aria2c")
            .shoal(median(&ar))
            .base("D_min", Some(d_min))
            .note(
                bt_err
                    .or((!bt).then(|| format!("aria2c, mktorrent or opentracker {NOT_INSTALLED}")))
                    .unwrap_or_else(|| "BitTorrent: aria2c + opentracker, same lab".into()),
            ),
    );
    cx.rows.push(
        Row::new("S3", "D: shoal vs aria2c", "s")
            .shoal(median(&sh))
            .base("aria2c", median(&ar))
            .paired(runs, &sh, &ar)
            .target("< 1x"),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_copy_copies_whole_blocks_and_the_tail() {
        let dir = std::env::temp_dir().join(format!("xtask-durable-{}", std::process::id()));
        rm(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.bin");
        // Over one buffer, and not whole blocks: the tail takes the page
        // cache under O_DIRECT.
        let data: Vec<u8> = (0..(1u32 << 20) + 3 * 4096 + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&input, &data).unwrap();
        let out = dir.join("out.bin");
        for direct in [true, false] {
            match durable_copy_once(&input, &out, direct) {
                Ok(secs) => {
                    assert!(secs > 0.0);
                    assert!(std::fs::read(&out).unwrap() == data, "direct {direct}");
                }
                // A temporary directory on tmpfs refuses O_DIRECT.
                Err(e) if direct => eprintln!("O_DIRECT: {e:#}"),
                Err(e) => panic!("{e:#}"),
            }
            rm(&out);
        }
        assert!(durable_copy(&input, &out).unwrap() > 0.0);
        assert!(!out.exists(), "the copy is removed");
        rm(&dir);
    }

    #[test]
    fn sizes() {
        for (s, v) in [
            ("1GiB", 1u64 << 30),
            ("256MiB", 256 << 20),
            ("4096", 4096),
            ("10k", 10240),
        ] {
            assert_eq!(parse_size(s).ok(), Some(v), "{s}");
        }
        assert!(parse_size("1TB").is_err());
        assert!(parse_size("99999999999GiB").is_err(), "overflow");
    }

    /// The ratio is the median of each run's own ratio; with a run
    /// missing on one side, the ratio of the medians.
    #[test]
    fn ratios_are_paired_run_by_run() {
        // Medians 20 and 20 (1.00x); per run 0.5, 2.0, 0.5 (0.50x).
        let (ours, theirs) = ([10.0, 20.0, 30.0], [20.0, 10.0, 60.0]);
        let row = |runs: usize, theirs: &[f64]| {
            Row::new("S1", "add", "MiB/s")
                .shoal(median(&ours))
                .base("b3sum", median(theirs))
                .paired(runs, &ours, theirs)
        };
        let r = row(3, &theirs);
        assert_eq!(r.ratio(), Some(0.5));
        assert!(table(&[r]).contains("| 0.50x* |"));
        // A run missing on one side: the ratio of the medians (20/15).
        let r = row(3, &theirs[..2]);
        assert!(table(&[r]).contains("| 1.33x |"));
        // Three figures each of four runs: which runs they are is not
        // known, so they are not paired.
        let r = row(4, &theirs);
        assert!(table(&[r]).contains("| 1.00x |"));
    }

    /// A command that runs past its limit is killed, and fails saying so.
    #[test]
    fn a_command_past_its_limit_is_killed() {
        let t = Instant::now();
        // What it started is killed too: a child left holding its
        // output kept the readers (and the bench) waiting for it.
        let r = run_limited(
            Command::new("sh").args(["-c", "sleep 30 & wait"]),
            Duration::from_millis(300),
        )
        .unwrap();
        assert!(!r.usage.ok);
        assert!(r.stderr.contains("killed"), "{}", r.stderr);
        assert!(t.elapsed() < Duration::from_secs(20));
        let r = run_limited(Command::new("true").arg(""), Duration::from_secs(30)).unwrap();
        assert!(r.usage.ok && !r.stderr.contains("killed"));
    }

    #[test]
    fn rates() {
        assert_eq!(tc_rate_bytes("50mbit").ok(), Some(6.25e6));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn a_missing_baseline_is_a_row() {
        let r = Row::new("S2", "get", "MiB/s")
            .shoal(Some(100.0))
            .base("sendme", None)
            .note(NOT_INSTALLED);
        let t = table(&[r]);
        assert!(
            t.contains("| S2 | get | 100 MiB/s | sendme | - | - |"),
            "{t}"
        );
        assert!(t.contains(NOT_INSTALLED));
    }

    #[test]
    fn bulk_lines() {
        let out = "  (sender 1.08 s CPU, receiver 0.99 s CPU)\n\
                   quic stream, two processes        923 MiB/s    2.07 CPU s/GiB   (1.11 s wall, 2.07 s CPU)\n\
                   quic stream (write_chunk)         423 MiB/s    2.10 CPU s/GiB   (2.4 s wall, 5.0 s CPU)\n";
        assert_eq!(bulk_line(out, BARE_ONE), Some((423.0, 2.10)));
        assert_eq!(bulk_line(out, BARE_TWO), Some((923.0, 2.07)));
        assert_eq!(bulk_line(out, BARE_UNCACHED), None);
        let out = format!(
            "{out}quic stream, uncached data        760 MiB/s    2.41 CPU s/GiB   (1.35 s wall, 2.41 s CPU)\n"
        );
        assert_eq!(bulk_line(&out, BARE_UNCACHED), Some((760.0, 2.41)));
        assert_eq!(bulk_line(&out, BARE_TWO), Some((923.0, 2.07)));
    }
}
