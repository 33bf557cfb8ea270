//! Crash safety: `shoal` killed with SIGKILL at arbitrary moments during
//! `add` of a directory and during a download, many times in a row. After
//! each kill `shoal verify` finds no corruption, and the work resumes: the
//! add finishes with the right hash, the download completes and is correct,
//! never losing verified progress it had persisted.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Dir, Serve, b3sum, data};

/// Deterministic "random" delays, different each iteration.
fn delay(i: u64, min_ms: u64, max_ms: u64) -> Duration {
    let x = blake3::hash(&i.to_le_bytes()).as_bytes()[0] as u64;
    Duration::from_millis(min_ms + x * (max_ms - min_ms) / 255)
}

/// Starts `c`, SIGKILLs it after `after` (if still running); true if it
/// finished by itself, successfully.
fn kill_after(mut c: Command, after: Duration) -> bool {
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().expect("spawning shoal");
    let deadline = Instant::now() + after;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().expect("wait") {
            return s.success();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

fn assert_consistent(d: &Dir, when: &str) {
    let v = d.run(&["verify"], Duration::from_secs(60));
    assert!(
        v.status.success(),
        "{when}: shoal verify found corruption: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
}

fn tree(root: &Path) {
    for i in 0..24u64 {
        let sub = root.join(format!("d{}", i % 4));
        std::fs::create_dir_all(&sub).expect("mkdir");
        let size = if i % 6 == 0 {
            3 << 20
        } else {
            1000 + i as usize * 7000
        };
        std::fs::write(sub.join(format!("f{i}.bin")), data(size, i)).expect("write");
    }
}

/// A node serving `input` from `s`, its upload capped at `upload`, and
/// the hash it was added under.
fn seeding(s: &Dir, input: &Path, upload: &str) -> (Serve, String) {
    let seeder = s.serve(&["--max-upload", upload]);
    let line = s.ok(&["add", input.to_str().expect("utf-8")]);
    let hash = line.split_whitespace().next().expect("hash").to_string();
    (seeder, hash)
}

/// `shoal get HASH -o OUT` from `seeder` only, on `d`.
fn get(d: &Dir, hash: &str, seeder: &Serve, out: &Path) -> Command {
    let mut c = d.cmd();
    c.args([
        "get",
        hash,
        "--peer",
        &seeder.peer_arg(),
        "--no-mdns",
        "--no-dht",
        "-o",
        out.to_str().expect("utf-8"),
    ]);
    c
}

#[test]
fn sigkill_during_add_of_a_directory_never_corrupts_the_store() {
    let src = Dir::new();
    let input = src.path().join("tree");
    tree(&input);
    let p = input.to_str().expect("utf-8");
    // The hash a clean add gives.
    let clean = Dir::new();
    let want = clean.ok(&["add", p]);
    let d = Dir::new();
    let mut finished = 0;
    for i in 0..10 {
        let mut c = d.cmd();
        c.args(["add", p]);
        // Most kills land while the store is being opened or written.
        if kill_after(c, delay(i, 2, 60)) {
            finished += 1;
        }
        assert_consistent(&d, &format!("after kill {i} during add"));
    }
    let got = d.ok(&["add", p]);
    assert_eq!(got, want, "add after the kills gives a different hash");
    assert_consistent(&d, "after the last add");
    eprintln!("add: {finished} of 10 runs finished before the kill");
}

#[test]
fn sigkill_during_a_download_resumes_without_corruption() {
    let s = Dir::new();
    let input = s.path().join("big.bin");
    std::fs::write(&input, data(16 << 20, 9)).expect("write");
    // Slow enough that the kills land mid-download.
    let (seeder, hash) = seeding(&s, &input, "6MB/s");
    let d = Dir::new();
    let out = d.path().join("out.bin");
    let verified = |d: &Dir| -> u64 {
        let ls = d.ok(&["--json", "ls"]);
        ls.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["hash"] == hash.as_str())
            .and_then(|v| v["verified"].as_u64())
            .unwrap_or(0)
    };
    let mut done = false;
    let mut progress = Vec::new();
    for i in 0..10 {
        let finished = kill_after(get(&d, &hash, &seeder, &out), delay(100 + i, 300, 1500));
        assert_consistent(&d, &format!("after kill {i} during get"));
        // A kill that lands after the output was renamed into place but
        // before the process exited still leaves a finished download (and
        // `get` refuses to overwrite an existing output).
        if finished || out.exists() {
            done = true;
            break;
        }
        progress.push(verified(&d));
    }
    eprintln!("download: verified bytes after each kill: {progress:?}");
    assert!(
        progress.windows(2).all(|w| w[1] + (4 << 20) >= w[0]),
        "progress went backwards by more than the unpersisted window: {progress:?}"
    );
    if !done {
        let o = crate::harness::run_bounded(get(&d, &hash, &seeder, &out), Duration::from_secs(90));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(b3sum(&out), hash, "resumed download is wrong");
    assert_consistent(&d, "after the download");
}

/// Every file under `root`, by path relative to it, with its content.
fn files_under(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).expect("listing") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(root).expect("under root");
                out.insert(
                    rel.to_string_lossy().into_owned(),
                    std::fs::read(&p).expect("reading"),
                );
            }
        }
    }
    out
}

/// A get of a collection of small files killed once its batches have
/// written some files (before they were recorded), then run again: the
/// output is the shared tree exactly, with no `.shoal-partial` left in it,
/// and every member is served. The member fetched alone first, to find
/// the providers, once refused to write over the killed run's leftover
/// and left its own file beside it, `changed` in the store.
#[test]
fn a_collection_get_killed_after_its_first_batches_resumes_clean() {
    let s = Dir::new();
    let input = s.path().join("small");
    for i in 0..1200u64 {
        let sub = input.join(format!("d{:02}", i / 100));
        std::fs::create_dir_all(&sub).expect("mkdir");
        std::fs::write(sub.join(format!("s{i:04}")), data(6000, 1000 + i)).expect("write");
    }
    let want = files_under(&input);
    // Slow enough that the kills land between the manifest and the end.
    let (seeder, hash) = seeding(&s, &input, "3MB/s");
    for i in 0..3u64 {
        let d = Dir::new();
        let out = d.path().join("out");
        let finished = kill_after(get(&d, &hash, &seeder, &out), delay(200 + i, 600, 1800));
        if !finished {
            let o =
                crate::harness::run_bounded(get(&d, &hash, &seeder, &out), Duration::from_secs(90));
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let got = files_under(&out);
        let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(
            extra.is_empty(),
            "run {i}: files that were not shared: {extra:?}"
        );
        assert!(
            got == want,
            "run {i}: the output differs from the shared tree"
        );
        let ls = d.ok(&["--json", "ls"]);
        assert!(
            !ls.contains("\"changed\":true") && !ls.contains("\"corrupt\":true"),
            "run {i}: a member is not served: {ls}"
        );
        assert_consistent(&d, &format!("run {i}"));
    }
}
