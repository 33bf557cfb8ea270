//! Running `shoal` processes for tests.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The `shoal` binary: `$SHOAL_BIN`, or `target/debug/shoal`, built once
/// if missing.
pub(crate) fn bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("SHOAL_BIN") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        // Not the variables cargo set for this test binary: ring's build
        // script tracks CARGO_MANIFEST_DIR, so a build that saw this
        // package's rebuilt ring, quinn, rustls and all above them, and the
        // next `cargo build` from a shell rebuilt them again.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_BIN_")
                || matches!(
                    &*k,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                )
            {
                cargo.env_remove(&*k);
            }
        }
        let status = cargo
            .args(["build", "-q", "-p", "shoal-cli"])
            .current_dir(&root)
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build -p shoal-cli failed");
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
        target.join("debug/shoal")
    })
    .clone()
}

/// Deterministic test data.
pub(crate) fn data(size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in v.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let w = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        c.copy_from_slice(&w[..c.len()]);
    }
    v
}

/// One node's data dir.
pub(crate) struct Dir {
    pub(crate) tmp: tempfile::TempDir,
}

impl Dir {
    pub(crate) fn new() -> Dir {
        Dir {
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub(crate) fn cmd(&self) -> Command {
        let mut c = Command::new(bin());
        c.arg("--data-dir").arg(self.tmp.path().join("node"));
        c.env("RUST_LOG", "warn,shoal_node=info");
        c
    }

    /// Runs a command to completion within `limit`.
    pub(crate) fn run(&self, args: &[&str], limit: Duration) -> Output {
        let mut c = self.cmd();
        c.args(args);
        run_bounded(c, limit)
    }

    /// Runs a command that must succeed; returns its stdout.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "shoal {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Starts `shoal serve` on loopback with mDNS and the DHT off.
    pub(crate) fn serve(&self, extra: &[&str]) -> Serve {
        let mut c = self.cmd();
        c.args(["serve", "--listen", "127.0.0.1:0", "--no-mdns", "--no-dht"])
            .args(extra);
        Serve::start(c)
    }
}

/// Runs `c`, killing it after `limit`.
pub(crate) fn run_bounded(mut c: Command, limit: Duration) -> Output {
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = c.spawn().expect("spawning shoal");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{c:?} did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&err_t.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// A running `shoal serve`, killed on drop.
pub(crate) struct Serve {
    pub(crate) child: Child,
    pub(crate) peer_id: String,
    pub(crate) addrs: Vec<String>,
    pub(crate) log: std::sync::Arc<Mutex<String>>,
}

impl Serve {
    pub(crate) fn start(mut c: Command) -> Serve {
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = c.spawn().expect("spawning shoal serve");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(Mutex::new(String::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut g = l.lock().unwrap_or_else(|e| e.into_inner());
                g.push_str(&line);
                g.push('\n');
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "shoal serve printed no ready line; log: {}",
                    log.lock().unwrap_or_else(|e| e.into_inner())
                );
            }
        };
        let mut words = line.split_whitespace();
        assert_eq!(
            words.next(),
            Some("ready"),
            "unexpected first line {line:?}"
        );
        let peer_id = words.next().expect("peer id").to_string();
        let addrs: Vec<String> = words.map(str::to_string).collect();
        assert!(!addrs.is_empty(), "ready line without addresses: {line:?}");
        Serve {
            child,
            peer_id,
            addrs,
            log,
        }
    }

    /// `PEERID@ADDR` of this node.
    pub(crate) fn peer_arg(&self) -> String {
        format!("{}@{}", self.peer_id, self.addrs[0])
    }

    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait for a clean exit.
    pub(crate) fn terminate(&mut self) -> ExitStatus {
        signal_and_wait(&mut self.child, libc::SIGTERM, "shoal serve")
    }
}

/// Whether process `pid` has a handler for `signal` (its `SigCgt` mask in
/// /proc): a signal sent before that would kill it instead.
pub(crate) fn catches(pid: u32, signal: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// Sends `signal` to `child` and waits (up to 15 s) for it to exit.
pub(crate) fn signal_and_wait(child: &mut Child, signal: i32, what: &str) -> ExitStatus {
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not stop on signal {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A child process, killed when dropped (a failed assertion leaves no
/// process behind).
pub(crate) struct KillOnDrop(pub(crate) Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Uploaded bytes of the node running on `dir`, from `shoal status --json`.
pub(crate) fn uploaded(dir: &Dir) -> u64 {
    let s = dir.ok(&["--json", "status"]);
    let v: serde_json::Value = serde_json::from_str(s.trim()).expect("status json");
    v["uploaded"].as_u64().expect("uploaded")
}

/// `b3sum` of a file, from the real `b3sum` tool (CI installs it).
pub(crate) fn b3sum(path: &Path) -> String {
    let out = Command::new("b3sum")
        .arg("--no-names")
        .arg(path)
        .output()
        .expect("b3sum is installed (apt-get install b3sum)");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits until `f` holds, or panics after `limit`.
pub(crate) fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
