//! Load: one seeder and 64 concurrent downloaders (each a `shoal get` with
//! its own short-lived node) on loopback. All complete and are correct, the
//! seeder's memory stays bounded, and its connection count stays within the
//! transport's cap.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::{Dir, b3sum, data};
use crate::hostile::{MEMORY_BOUND_KIB, alive, memory_kib};

const DOWNLOADERS: usize = 64;
/// `EndpointConfig::default().max_connections`, which `shoal serve` uses.
const MAX_CONNECTIONS: usize = 128;

#[test]
fn one_seeder_and_64_downloaders_all_complete() {
    let s = Dir::new();
    let input = s.path().join("blob.bin");
    std::fs::write(&input, data(4 << 20, 64)).expect("write");
    let seeder = s.serve(&[]);
    let line = s.ok(&["add", input.to_str().expect("utf-8")]);
    let hash = line.split_whitespace().next().expect("hash").to_string();
    let dirs: Vec<Dir> = (0..DOWNLOADERS).map(|_| Dir::new()).collect();
    let start = Instant::now();
    let mut children: Vec<_> = dirs
        .iter()
        .map(|d| {
            let mut c = d.cmd();
            c.args([
                "get",
                &hash,
                "--peer",
                &seeder.peer_arg(),
                "--no-mdns",
                "--no-dht",
                "-o",
                d.path().join("out.bin").to_str().expect("utf-8"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            Some(c.spawn().expect("spawning shoal get"))
        })
        .collect();
    let deadline = start + Duration::from_secs(150);
    let mut most_peers = 0;
    let mut failed = Vec::new();
    while children.iter().any(Option::is_some) {
        for (i, slot) in children.iter_mut().enumerate() {
            if let Some(c) = slot
                && let Some(st) = c.try_wait().expect("wait")
            {
                if !st.success() {
                    failed.push(i);
                }
                *slot = None;
            }
        }
        let peers = s.run(&["--json", "peers"], Duration::from_secs(30));
        let n = String::from_utf8_lossy(&peers.stdout).lines().count();
        most_peers = most_peers.max(n);
        if Instant::now() > deadline {
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
                let _ = c.wait();
            }
            panic!("downloads did not finish within 150 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = start.elapsed();
    assert!(failed.is_empty(), "downloaders {failed:?} failed");
    for d in &dirs {
        assert_eq!(b3sum(&d.path().join("out.bin")), hash);
    }
    let pid = seeder.child.id();
    assert!(alive(pid), "seeder died: {}", seeder.log());
    let (hwm, _) = memory_kib(pid);
    eprintln!(
        "load: {DOWNLOADERS} downloads of 4 MiB in {took:.1?}; seeder peak RSS {} MiB; at most {most_peers} peers listed",
        hwm / 1024
    );
    assert!(hwm < MEMORY_BOUND_KIB, "seeder peak memory {hwm} KiB");
    assert!(most_peers <= MAX_CONNECTIONS, "{most_peers} peers");
}
