//! Discovery across hosts: network namespaces joined by a bridge, a real
//! `shoal serve` on each, and `shoal get HASH` with no ticket and no
//! `--peer` on another host: once through mDNS, once through a private
//! Mainline DHT (`shoal dht-node`) with mDNS off.
//!
//! Needs root and `ip` (iproute2). Without them the tests print why and
//! pass, except under `CI=true`, where they fail. Every namespace and link
//! they create lives in namespaces named after this process, removed on
//! drop (also after a panic); the root namespace is not touched.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{Dir, Serve, b3sum, bin, data, run_bounded};

/// Hosts per lab.
const HOSTS: usize = 3;
/// The UDP port of the `shoal dht-node`s.
const DHT_PORT: u16 = 6999;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A lab, or `None` (with the reason printed) where namespaces cannot be
/// made and this is not CI.
fn lab_or_skip(tag: &str) -> Option<Lab> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let why = if root {
        match Lab::new(tag) {
            Ok(lab) => return Some(lab),
            Err(e) => format!("cannot build network namespaces: {e}"),
        }
    } else {
        "not root: network namespaces need root".to_string()
    };
    assert!(!ci(), "CI=true, and {why}");
    eprintln!("skipping the multi-host test: {why}");
    None
}

/// Runs `ip ARGS` (it does not block: no timeout needed, and none that
/// could panic inside a drop).
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespaces `HOSTS` hosts and one bridge, each host's `eth0` on the
/// bridge with `10.200.N.(i+1)/24` and `fd00:5a:N::(i+1)/64`.
struct Lab {
    /// The bridge's namespace.
    bridge: String,
    hosts: Vec<String>,
    subnet: u32,
    /// Processes to kill before the namespaces go.
    procs: Vec<Child>,
}

impl Lab {
    fn new(tag: &str) -> Result<Lab, String> {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("shoal-{pid}-{tag}{n}");
        let lab = Lab {
            bridge: format!("{prefix}-br"),
            hosts: (0..HOSTS).map(|i| format!("{prefix}-h{i}")).collect(),
            subnet: (pid + n) % 250,
            procs: Vec::new(),
        };
        remove_stale_namespaces();
        // On failure, drop removes whatever was made.
        ip(&["netns", "add", &lab.bridge])?;
        let br = lab.bridge.clone();
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        // mDNS crosses the bridge only without IGMP snooping.
        ip(&[
            "-n",
            &br,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for i in 0..HOSTS {
            let host = lab.hosts[i].clone();
            ip(&["netns", "add", &host])?;
            let port = format!("v{i}");
            ip(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &host,
            ])?;
            ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &host, "link", "set", "lo", "up"])?;
            ip(&["-n", &host, "link", "set", "eth0", "up"])?;
            lab.address(i)?;
        }
        Ok(lab)
    }

    /// Gives host `i`'s `eth0` its addresses and the multicast route.
    fn address(&self, i: usize) -> Result<(), String> {
        let host = &self.hosts[i];
        let v4 = format!("{}/24", self.v4(i));
        ip(&["-n", host, "addr", "add", &v4, "dev", "eth0"])?;
        let v6 = format!("{}/64", self.v6(i));
        // No duplicate address detection: usable at once.
        ip(&["-n", host, "addr", "add", &v6, "dev", "eth0", "nodad"])?;
        ip(&["-n", host, "route", "replace", "224.0.0.0/4", "dev", "eth0"])
    }

    /// Host `i`'s IPv6 address.
    fn v6(&self, i: usize) -> String {
        format!("fd00:5a:{}::{}", self.subnet, i + 1)
    }

    /// Host `i`'s IPv4 address.
    fn v4(&self, i: usize) -> String {
        format!("10.200.{}.{}", self.subnet, i + 1)
    }

    /// `shoal --data-dir DIR/node ...` run inside host `i`.
    fn shoal(&self, i: usize, dir: &Dir) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i]])
            .arg(bin())
            .arg("--data-dir")
            .arg(dir.path().join("node"));
        c.env("RUST_LOG", "warn,shoal_node=debug,shoal_discovery=debug");
        c
    }

    /// `shoal serve` on host `i` (`ip netns exec` execs `shoal`, so the
    /// child is the node itself).
    fn serve(&self, i: usize, dir: &Dir, args: &[&str]) -> Serve {
        let mut c = self.shoal(i, dir);
        c.arg("serve").args(args);
        Serve::start(c)
    }

    /// `shoal dht-node` on host `i`; returns its address. Killed with the
    /// lab.
    fn dht_node(&mut self, i: usize, bootstrap: &[String]) -> String {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i]]).arg(bin());
        c.args([
            "dht-node",
            "--listen",
            &format!("{}:{DHT_PORT}", self.v4(i)),
        ]);
        for b in bootstrap {
            c.args(["--dht-bootstrap", b]);
        }
        c.stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null());
        let mut child = c.spawn().expect("spawning shoal dht-node");
        let stdout = child.stdout.take().expect("stdout");
        self.procs.push(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(15))
            .expect("shoal dht-node printed no ready line within 15 s");
        let addr = line
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("unexpected dht-node line {line:?}"));
        assert_eq!(addr, format!("{}:{DHT_PORT}", self.v4(i)));
        addr.to_string()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        // Deleting a namespace deletes its links (and their veth peers).
        for ns in self.hosts.iter().chain([&self.bridge]) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Deletes the namespaces of earlier runs whose process is gone (killed
/// before its drops ran).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("shoal-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Writes `size` bytes of test data to `dir/name`.
fn input(dir: &Dir, name: &str, size: usize, seed: u64) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, data(size, seed)).expect("writing test input");
    p
}

/// `shoal add` through the node running on `dir` (its control socket is a
/// Unix socket in the data dir: reachable from the root namespace).
fn add(dir: &Dir, path: &Path) -> String {
    let line = dir.ok(&["add", path.to_str().expect("utf-8 path")]);
    let hash = line.split_whitespace().next().expect("hash").to_string();
    assert_eq!(hash, b3sum(path), "shoal add and b3sum disagree");
    hash
}

/// Runs `c` to success within `limit`; returns how long it took and its
/// log.
fn ok_within(c: Command, limit: Duration, what: &str) -> (Duration, String) {
    let started = Instant::now();
    let out = run_bounded(c, limit);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what} failed: {}\n{log}", out.status);
    (started.elapsed(), log)
}

/// Whether `log` (at debug level) shows a candidate from `source` at `ip`.
fn found(log: &str, source: &str, ip: &str) -> bool {
    log.lines().any(|l| {
        l.contains("candidate") && l.contains(&format!("source={source}")) && l.contains(ip)
    })
}

/// Kills the serve processes (before the lab removes the namespaces) and
/// prints their logs when the test failed.
struct Nodes(Vec<Serve>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for (i, s) in self.0.iter_mut().enumerate() {
            s.kill();
            if std::thread::panicking() {
                eprintln!("--- host {i} log ---\n{}", s.log());
            }
        }
    }
}

#[test]
fn hosts_find_each_other_by_mdns() {
    let Some(lab) = lab_or_skip("m") else { return };
    let dirs: Vec<Dir> = (0..HOSTS).map(|_| Dir::new()).collect();
    let started = Instant::now();
    // Host 0 listens dual-stack, so it advertises IPv4 and IPv6 addresses.
    let nodes = Nodes(
        (0..HOSTS)
            .map(|i| {
                let listen = if i == 0 { "[::]:0" } else { "0.0.0.0:0" };
                lab.serve(i, &dirs[i], &["--listen", listen, "--no-dht"])
            })
            .collect(),
    );
    eprintln!("netns mdns: nodes up after {:?}", started.elapsed());
    let file = input(&dirs[0], "m.bin", 3 * 1024 * 1024 + 7, 11);
    let hash = add(&dirs[0], &file);
    eprintln!("netns mdns: added after {:?}", started.elapsed());

    // Host 1: a short-lived node, knowing nothing but the hash.
    let getter = Dir::new();
    let out1 = getter.path().join("out1.bin");
    let mut c = lab.shoal(1, &getter);
    c.args(["get", &hash, "-o"]).arg(&out1).arg("--no-dht");
    let (took, log) = ok_within(c, Duration::from_secs(45), "get by mDNS on host 1");
    assert_eq!(b3sum(&out1), hash);
    assert!(found(&log, "Mdns", &lab.v4(0)), "no mDNS candidate:\n{log}");
    // Host 0 listens on `[::]`: it advertises its IPv6 address as well.
    assert!(
        found(&log, "Mdns", &lab.v6(0)),
        "no IPv6 mDNS candidate:\n{log}"
    );
    eprintln!("netns mdns: short-lived get on host 1 took {took:?}");

    // Host 2: through its running node.
    let out2 = dirs[2].path().join("out2.bin");
    let mut c = dirs[2].cmd();
    c.args(["get", &hash, "-o"]).arg(&out2);
    let (took, _) = ok_within(c, Duration::from_secs(45), "get by mDNS on host 2");
    assert_eq!(b3sum(&out2), hash);
    eprintln!(
        "netns mdns: get through host 2's node took {took:?} (test {:?})",
        started.elapsed()
    );
    drop(nodes);
}

/// A node started before its host had an address (a laptop whose network
/// comes up after it, or a DHCP lease that changed) is advertised by mDNS
/// at the address it gets later.
#[test]
fn a_node_started_before_its_address_is_found_once_it_has_one() {
    let Some(lab) = lab_or_skip("a") else { return };
    ip(&["-n", &lab.hosts[0], "addr", "flush", "dev", "eth0"]).expect("flushing host 0");
    let dir = Dir::new();
    let nodes = Nodes(vec![lab.serve(
        0,
        &dir,
        &["--listen", "0.0.0.0:0", "--no-dht"],
    )]);
    let file = input(&dir, "late.bin", (1 << 20) + 3, 13);
    let hash = add(&dir, &file);
    // The network comes up.
    lab.address(0).expect("addressing host 0");

    let getter = Dir::new();
    let out = getter.path().join("late.bin");
    let mut c = lab.shoal(1, &getter);
    c.args(["get", &hash, "-o"]).arg(&out).arg("--no-dht");
    let (took, log) = ok_within(c, Duration::from_secs(45), "get by mDNS on host 1");
    assert_eq!(b3sum(&out), hash);
    assert!(found(&log, "Mdns", &lab.v4(0)), "no mDNS candidate:\n{log}");
    eprintln!("netns mdns: the late node was found, get took {took:?}");
    drop(nodes);
}

#[test]
fn hosts_find_each_other_through_the_dht() {
    let Some(mut lab) = lab_or_skip("d") else {
        return;
    };
    let started = Instant::now();
    // A private DHT of three server-mode nodes, one per host.
    let first = lab.dht_node(0, &[]);
    let mut bootstrap = vec![first.clone()];
    for i in 1..HOSTS {
        bootstrap.push(lab.dht_node(i, std::slice::from_ref(&first)));
    }
    let mut dht_args: Vec<&str> = vec!["--no-mdns", "--dht-server"];
    for b in &bootstrap {
        dht_args.extend(["--dht-bootstrap", b.as_str()]);
    }
    let dirs: Vec<Dir> = (0..HOSTS).map(|_| Dir::new()).collect();
    let mut nodes = Nodes(Vec::new());
    for (i, dir) in dirs.iter().enumerate() {
        let mut args = vec!["--listen", "0.0.0.0:0"];
        args.extend(&dht_args);
        if i == 2 {
            // Host 2 downloads but announces nothing.
            args.push("--no-announce");
        }
        nodes.0.push(lab.serve(i, dir, &args));
    }
    eprintln!("netns dht: nodes up after {:?}", started.elapsed());
    let file = input(&dirs[0], "d.bin", 2 * 1024 * 1024 + 3, 12);
    let hash = add(&dirs[0], &file);
    eprintln!("netns dht: added after {:?}", started.elapsed());

    // Host 1: a short-lived node, knowing nothing but the hash and the DHT.
    let getter = Dir::new();
    let out1 = getter.path().join("out1.bin");
    let mut c = lab.shoal(1, &getter);
    c.args(["get", &hash, "-o"]).arg(&out1).args(&dht_args);
    let (took, log) = ok_within(c, Duration::from_secs(60), "get through the DHT on host 1");
    assert_eq!(b3sum(&out1), hash);
    assert!(found(&log, "Dht", &lab.v4(0)), "no DHT candidate:\n{log}");
    eprintln!("netns dht: short-lived get on host 1 took {took:?}");

    // Host 2, which announces nothing, can still download.
    let out2 = dirs[2].path().join("out2.bin");
    let mut c = dirs[2].cmd();
    c.args(["get", &hash, "-o"]).arg(&out2);
    let (took, _) = ok_within(c, Duration::from_secs(60), "get through the DHT on host 2");
    assert_eq!(b3sum(&out2), hash);
    eprintln!("netns dht: get through host 2's node took {took:?}");

    // With host 0 gone, host 2 holds the only copy, unannounced: nobody
    // finds it through the DHT.
    nodes.0[0].kill();
    let seeker = Dir::new();
    let mut c = lab.shoal(1, &seeker);
    c.args(["get", &hash, "--timeout", "5"]).args(&dht_args);
    let t = Instant::now();
    let out = run_bounded(c, Duration::from_secs(40));
    eprintln!("netns dht: failing get took {:?}", t.elapsed());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && !found(&log, "Dht", &lab.v4(2)),
        "host 1 found host 2, which was told not to announce:\n{log}"
    );
    // The lookup itself worked: it found host 0's old record.
    assert!(found(&log, "Dht", &lab.v4(0)), "no DHT lookup:\n{log}");
    assert!(
        !nodes.0[2].log().contains("dht: announced"),
        "host 2 announced: {}",
        nodes.0[2].log()
    );
    assert!(nodes.0[0].log().contains("dht: announced"));
    eprintln!("netns dht: test took {:?}", started.elapsed());
    drop(nodes);
}

/// When no DHT bootstrap node answers, the node says so once and keeps
/// serving through its other sources. Loopback only: no root needed.
#[test]
fn unreachable_dht_bootstrap_is_reported_once() {
    let s = Dir::new();
    let file = input(&s, "u.bin", 200_000, 13);
    // Port 9 (discard) on loopback: nothing answers.
    // The default log filter: what a user sees.
    let mut c = s.cmd();
    c.env_remove("RUST_LOG");
    c.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--no-mdns",
        "--dht-bootstrap",
        "127.0.0.1:9",
    ]);
    let seeder = Serve::start(c);
    let seeder = Nodes(vec![seeder]);
    let hash = add(&s, &file);
    let d = Dir::new();
    let out = d.path().join("out.bin");
    let peer = seeder.0[0].peer_arg();
    let o = out.to_str().expect("utf-8 path");
    d.ok(&[
        "get",
        &hash,
        "-o",
        o,
        "--peer",
        &peer,
        "--no-mdns",
        "--no-dht",
    ]);
    assert_eq!(b3sum(&out), hash);
    // mainline gives up on a bootstrap after its own timeouts; leave it time
    // to complain more than once if it would.
    std::thread::sleep(Duration::from_secs(6));
    let log: Arc<Mutex<String>> = seeder.0[0].log.clone();
    let log = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let warnings = log
        .lines()
        .filter(|l| l.contains("no bootstrap node answered"))
        .count();
    assert_eq!(warnings, 1, "expected one warning:\n{log}");
    let noise = log.lines().filter(|l| l.contains("bootstrap")).count();
    assert_eq!(noise, 1, "the DHT complains more than once:\n{log}");
    drop(seeder);
}
