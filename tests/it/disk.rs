//! A full disk during a download: the downloader's data dir and output sit
//! on a small tmpfs. The download fails with a clear error, the store stays
//! consistent, and once space is freed the download resumes and completes.
//! And a full disk during an add: the outboard does not fit, the add fails
//! clearly, leaves no temporary file, and succeeds once there is room.
//!
//! Needs root to mount the tmpfs: skipped with a reason otherwise, but under
//! `CI=true` it fails rather than skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{Dir, b3sum, bin, data, run_bounded};

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(at: &Path, size: &str) -> Result<Mount, String> {
    let o = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "mount tmpfs failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(Mount(at.to_path_buf()))
}

/// A small tmpfs in a temporary directory; unmounted, then removed, when
/// dropped (fields drop in order).
struct Small {
    _mount: Mount,
    _holder: tempfile::TempDir,
    path: PathBuf,
}

/// A tmpfs of `size`, or None (the reason printed) where it cannot be
/// mounted; under `CI=true` that fails instead.
fn small_tmpfs(size: &str) -> Option<Small> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let holder = tempfile::tempdir().expect("tempdir");
    let path = holder.path().join("small");
    std::fs::create_dir(&path).expect("mkdir");
    match mount_tmpfs(&path, size) {
        Ok(m) => Some(Small {
            _mount: m,
            _holder: holder,
            path,
        }),
        Err(e) if ci => panic!("CI=true and the tmpfs cannot be mounted: {e}"),
        Err(e) => {
            eprintln!("skipping a full-disk test: {e} (needs root)");
            None
        }
    }
}

/// `o` failed as a full disk should: exit code 1, a last line that says
/// so, no panic.
fn assert_failed_disk_full(o: &std::process::Output) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "a full disk must fail: {err}");
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: ")
            && (last.contains("disk full") || last.contains("No space left")),
        "unclear error for a full disk: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `shoal verify` of the store in `node` passes.
fn assert_verifies(node: &Path) {
    let mut c = Command::new(bin());
    c.arg("--data-dir").arg(node).arg("verify");
    let o = run_bounded(c, Duration::from_secs(60));
    assert!(
        o.status.success(),
        "store inconsistent after the full disk: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_full_disk_fails_clearly_and_the_download_resumes_after_space_is_freed() {
    let Some(small) = small_tmpfs("12m") else {
        return;
    };
    let mnt = small.path.clone();
    let s = Dir::new();
    let input = s.path().join("blob.bin");
    std::fs::write(&input, data(10 << 20, 5)).expect("write");
    let seeder = s.serve(&[]);
    let line = s.ok(&["add", input.to_str().expect("utf-8")]);
    let hash = line.split_whitespace().next().expect("hash").to_string();
    // Leave about 5 MiB free for a 10 MiB download.
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![1u8; 7 << 20]).expect("filler");
    let out = mnt.join("out.bin");
    let get = || {
        let mut c = Command::new(bin());
        c.arg("--data-dir").arg(mnt.join("node"));
        c.env("RUST_LOG", "warn,shoal_node=info");
        c.args([
            "get",
            &hash,
            "--peer",
            &seeder.peer_arg(),
            "--no-mdns",
            "--no-dht",
            "-o",
            out.to_str().expect("utf-8"),
        ]);
        run_bounded(c, Duration::from_secs(60))
    };
    let verify = || assert_verifies(&mnt.join("node"));
    assert_failed_disk_full(&get());
    verify();
    // Free the space; the download resumes and completes.
    std::fs::remove_file(&filler).expect("rm filler");
    // The store may hold a copy beside the output: give it room for both.
    let grown = Command::new("mount")
        .args(["-o", "remount,size=40m"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(grown.success(), "could not grow the tmpfs");
    let again = get();
    assert!(
        again.status.success(),
        "resume after freeing space failed: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(b3sum(&out), hash);
    verify();
}

/// Bytes free on the filesystem of `at` (`stat -f`: free blocks for
/// unprivileged users times the block size).
fn free_bytes(at: &Path) -> u64 {
    let o = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(at)
        .output()
        .expect("stat -f");
    let text = String::from_utf8_lossy(&o.stdout);
    let mut w = text
        .split_whitespace()
        .map(|x| x.parse::<u64>().expect("a number"));
    let (blocks, size) = (w.next().expect("blocks"), w.next().expect("block size"));
    blocks * size
}

/// Files under `dir` whose name starts with `tmp-`, at any depth.
fn tmp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if e.file_name().to_string_lossy().starts_with("tmp-") {
                out.push(p);
            }
        }
    }
    out
}

/// `shoal --data-dir NODE add FLAGS PATH`, bounded in time.
fn add(node: &Path, flags: &[&str], path: &Path) -> std::process::Output {
    let mut c = Command::new(bin());
    c.arg("--data-dir")
        .arg(node)
        .arg("add")
        .args(flags)
        .arg(path);
    run_bounded(c, Duration::from_secs(60))
}

/// [`add`], which must succeed.
fn add_ok(node: &Path, flags: &[&str], path: &Path) -> std::process::Output {
    let o = add(node, flags, path);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

/// What `dir` holds, sorted.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .collect();
    v.sort();
    v
}

#[test]
fn an_add_whose_outboard_does_not_fit_fails_clearly_and_leaves_nothing_behind() {
    let Some(small) = small_tmpfs("8m") else {
        return;
    };
    let mnt = small.path.clone();
    // The file stays outside (added in place); its outboard, ~380 KiB,
    // goes to the store on the tmpfs, streamed to disk as it is written.
    let s = Dir::new();
    let input = s.path().join("big.bin");
    std::fs::write(&input, data(96 << 20, 9)).expect("write");
    let tiny = s.path().join("tiny.bin");
    std::fs::write(&tiny, data(40_000, 10)).expect("write");
    let node = mnt.join("node");
    // The store exists; then all but 64 KiB of the tmpfs is taken.
    add_ok(&node, &[], &tiny);
    let filler = mnt.join("filler");
    let room = free_bytes(&mnt).saturating_sub(64 << 10);
    std::fs::write(&filler, vec![1u8; room as usize]).expect("filler");
    assert_failed_disk_full(&add(&node, &[], &input));
    assert_eq!(
        tmp_files(&node),
        Vec::<PathBuf>::new(),
        "a failed add left files"
    );
    // Room again: the same add succeeds.
    std::fs::remove_file(&filler).expect("rm filler");
    let again = add_ok(&node, &[], &input);
    let out = String::from_utf8_lossy(&again.stdout);
    assert!(out.starts_with(&b3sum(&input)), "{out}");
    // The first blob is still there, and every blob checks out.
    let mut c = Command::new(bin());
    c.arg("--data-dir").arg(&node).arg("ls");
    let ls = run_bounded(c, Duration::from_secs(60));
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.contains(&b3sum(&tiny)), "the first blob is gone: {ls}");
    assert_verifies(&node);
}

#[test]
fn a_copy_out_of_the_store_that_does_not_fit_leaves_no_half_written_file() {
    // The blob is in the store already: `get` writes it out from there,
    // into a temporary file beside the output. A full disk fails the get
    // clearly and takes the temporary file away with it.
    let Some(small) = small_tmpfs("4m") else {
        return;
    };
    let s = Dir::new();
    let input = s.path().join("blob.bin");
    std::fs::write(&input, data(10 << 20, 11)).expect("write");
    let line = s.ok(&["add", input.to_str().expect("utf-8")]);
    let hash = line.split_whitespace().next().expect("hash").to_string();
    let out = small.path.join("out.bin");
    let mut c = Command::new(bin());
    c.arg("--data-dir").arg(s.path().join("node"));
    c.args(["get", &hash, "--no-mdns", "--no-dht", "-o"])
        .arg(&out);
    assert_failed_disk_full(&run_bounded(c, Duration::from_secs(60)));
    assert_eq!(
        entries(&small.path),
        Vec::<PathBuf>::new(),
        "the failed get left files"
    );
}

#[test]
fn an_add_copy_whose_outboard_does_not_fit_leaves_no_copy_behind() {
    // `add --copy`: the copy fits, its outboard does not. The add fails
    // clearly and the full-size copy goes (it stayed in the store's data
    // directory, named by no record, taking the space it lacked).
    let Some(small) = small_tmpfs("24m") else {
        return;
    };
    let mnt = small.path.clone();
    let s = Dir::new();
    let input = s.path().join("big.bin");
    std::fs::write(&input, data(8 << 20, 12)).expect("write");
    let tiny = s.path().join("tiny.bin");
    std::fs::write(&tiny, data(40_000, 13)).expect("write");
    let node = mnt.join("node");
    add_ok(&node, &["--copy"], &tiny);
    let stored = node.join("store").join("data");
    let before = entries(&stored);
    // Room for the copy and 8 KiB more (its outboard is ~32 KiB).
    let filler = mnt.join("filler");
    let room = free_bytes(&mnt).saturating_sub((8 << 20) + (8 << 10));
    std::fs::write(&filler, vec![1u8; room as usize]).expect("filler");
    assert_failed_disk_full(&add(&node, &["--copy"], &input));
    assert_eq!(entries(&stored), before, "a failed add left files");
    assert_eq!(tmp_files(&node), Vec::<PathBuf>::new());
    std::fs::remove_file(&filler).expect("rm filler");
    add_ok(&node, &["--copy"], &input);
    assert_verifies(&node);
}
