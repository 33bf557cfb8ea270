//! Imports of large files (through a mapping, `--copy` pipelined) and the
//! ways an import fails: a file truncated or changed while it is imported,
//! a file the process may not read.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use super::hooks::{self, At};
use super::mapped::WINDOW;
use super::{FileHash, GROUP, MAP_MIN, copy_and_hash_with, hash_bytes, hash_file};
use crate::{ImportMode, Store, StoreError};

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn ino(p: &Path) -> u64 {
    fs::metadata(p).unwrap().ino()
}

/// A sparse file of `len` zero bytes (cheap to create at any size).
fn sparse(p: &Path, len: u64) {
    File::create(p).unwrap().set_len(len).unwrap();
}

/// Resize `p` from another handle, as another process would.
fn resize(p: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Names of the files in the store's data directory.
fn data_files(store_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(store_dir.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A hook that records that it ran.
/// Set when the hook ran. Dropping it removes a hook that did not run: its
/// file's inode may be reused by a file of a test running at the same time.
struct Flag {
    ran: Arc<AtomicBool>,
    ino: u64,
}

impl Flag {
    fn load(&self, o: Ordering) -> bool {
        self.ran.load(o)
    }
}

impl Drop for Flag {
    fn drop(&mut self) {
        hooks::forget(self.ino);
    }
}

fn flag_on(at: At, p: &Path) -> Flag {
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    let ino = ino(p);
    hooks::on(at, ino, move || r.store(true, Ordering::SeqCst));
    Flag { ran, ino }
}

fn assert_changed(err: StoreError, path: &Path) {
    let msg = err.to_string();
    assert!(
        matches!(&err, StoreError::ChangedDuringImport(p) if p == path),
        "{err:?}"
    );
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("changed while it was being imported"), "{msg}");
}

#[test]
fn mapped_hash_equals_blake3_and_the_outboard() {
    let dir = tempfile::tempdir().unwrap();
    for (i, size) in [
        MAP_MIN as usize,
        MAP_MIN as usize + 1,
        MAP_MIN as usize + 5 * GROUP + 7,
        2 * WINDOW + 37 * GROUP + 3,
    ]
    .into_iter()
    .enumerate()
    {
        let d = data(size, i as u64);
        let p = dir.path().join(format!("f{i}"));
        fs::write(&p, &d).unwrap();
        let mapped = flag_on(At::Mapped, &p);
        let FileHash::Hashed(h, len, ob) =
            hash_file(&File::open(&p).unwrap(), size as u64).unwrap()
        else {
            panic!("size {size}: reported as shrunk");
        };
        assert!(mapped.load(Ordering::SeqCst), "size {size}: not mapped");
        assert_eq!(len, size as u64);
        assert_eq!(h, blake3::hash(&d), "size {size}");
        assert_eq!(super::tests::written(&ob), hash_bytes(&d).1, "size {size}");
    }
}

#[test]
fn file_truncated_while_mapped_is_a_clear_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let p = dir.path().join("big");
    let len = 3 * WINDOW as u64 + 5;
    sparse(&p, len);
    // Right after the mapping is made, before a byte is hashed: every
    // page past 1 MiB is gone and raises SIGBUS when touched.
    let p2 = p.clone();
    hooks::on(At::Mapped, ino(&p), move || resize(&p2, 1 << 20));
    let err = store.import_file(&p, ImportMode::InPlace).unwrap_err();
    assert_changed(err, &p);
    assert!(store.list().is_empty());
    assert!(data_files(&dir.path().join("s")).is_empty());
    // The guard still works for the next file.
    resize(&p, len);
    let mapped = flag_on(At::Mapped, &p);
    let h = store.import_file(&p, ImportMode::InPlace).unwrap();
    assert!(mapped.load(Ordering::SeqCst));
    assert_eq!(h, blake3::hash(&vec![0u8; len as usize]));
    assert_eq!(store.list().len(), 1);
}

#[test]
fn file_truncated_at_any_moment_never_kills_the_import() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let len: u64 = 256 << 20;
    let full = blake3::hash(&vec![0u8; len as usize]);
    let short = blake3::hash(&[0u8; 12345]);
    let mut recorded = std::collections::HashSet::new();
    for (i, delay_us) in [0u64, 200, 2_000, 10_000, 30_000].into_iter().enumerate() {
        let p = dir.path().join(format!("f{i}"));
        sparse(&p, len);
        let p2 = p.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(delay_us));
            resize(&p2, 12345);
        });
        let res = store.import_file(&p, ImportMode::InPlace);
        t.join().unwrap();
        match res {
            Err(e) => assert_changed(e, &p),
            // Truncated before the import opened the file, or after it
            // was done: either file, whole.
            Ok(h) => {
                assert!(h == short || h == full, "delay {delay_us}: {h}");
                recorded.insert(h);
            }
        }
    }
    // Not a crash, and consistent: only what was returned was recorded.
    let listed: std::collections::HashSet<_> = store.list().iter().map(|b| b.hash).collect();
    assert_eq!(listed, recorded);
}

/// Run the ignored test `name` of this binary in a child process, with
/// `env`, optionally as user and group 65534; its output and status.
fn child(name: &str, env: &[(&str, &Path)], as_nobody: bool) -> std::process::Output {
    let exe = std::env::current_exe().unwrap();
    let mut c = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(exe);
        c
    } else {
        Command::new(exe)
    };
    c.args([
        "--ignored",
        "--exact",
        "--nocapture",
        "--test-threads=1",
        name,
    ]);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn a_sigbus_outside_our_mappings_still_kills() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let out = child(
        "tree::import_tests::sigbus_child",
        &[("SHOAL_TEST_DIR", dir.path())],
        false,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The child got as far as the fault (so the guard was installed)...
    assert!(stdout.contains("guard installed, touching"), "{stdout}");
    // ...and died of it.
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{out:?}");
}

#[test]
#[ignore = "run by a_sigbus_outside_our_mappings_still_kills in a child process"]
fn sigbus_child() {
    let Some(dir) = std::env::var_os("SHOAL_TEST_DIR") else {
        return;
    };
    // No core file for the expected crash.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit with a valid structure.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    let dir = PathBuf::from(dir);
    // Install the guard with an import through a mapping.
    let p = dir.join("ours");
    sparse(&p, MAP_MIN);
    let FileHash::Hashed(..) = hash_file(&File::open(&p).unwrap(), MAP_MIN).unwrap() else {
        panic!("shrank");
    };
    // A mapping the guard does not know, of a file then truncated.
    let q = dir.join("theirs");
    sparse(&q, 1 << 20);
    let f = File::open(&q).unwrap();
    // SAFETY: a fresh read-only mapping; touching it after the truncation
    // is the point of this test (it must kill the process).
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            1 << 20,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    resize(&q, 0);
    println!("guard installed, touching");
    // SAFETY: see above.
    let b = unsafe { std::ptr::read_volatile(ptr.cast::<u8>().add(1 << 19)) };
    println!("survived a foreign SIGBUS, read {b}");
}

#[test]
fn file_changed_after_hashing_is_refused_and_nothing_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("s");
    let store = Store::open(&sdir).unwrap();
    // Read path (small) and mapped path (large); in place and copied.
    for (i, len) in [(1usize << 20) + 7, MAP_MIN as usize + 7]
        .into_iter()
        .enumerate()
    {
        for mode in [ImportMode::InPlace, ImportMode::Copy] {
            // The size changes (bytes appended).
            let p = dir.path().join(format!("grow{i}{mode:?}"));
            fs::write(&p, data(len, i as u64)).unwrap();
            let p2 = p.clone();
            hooks::on(At::Hashed, ino(&p), move || {
                use std::io::Write;
                let mut f = OpenOptions::new().append(true).open(&p2).unwrap();
                f.write_all(b"more").unwrap();
            });
            let err = store.import_file(&p, mode).unwrap_err();
            assert_changed(err, &p);
            // Only the mtime changes (same size, same bytes).
            let p = dir.path().join(format!("touch{i}{mode:?}"));
            fs::write(&p, data(len, i as u64)).unwrap();
            let p2 = p.clone();
            hooks::on(At::Hashed, ino(&p), move || {
                let f = OpenOptions::new().write(true).open(&p2).unwrap();
                let t = SystemTime::now() + Duration::from_secs(60);
                f.set_modified(t).unwrap();
            });
            let err = store.import_file(&p, mode).unwrap_err();
            assert_changed(err, &p);
        }
    }
    assert!(store.list().is_empty());
    // No outboard, no private copy, no temporary file left behind.
    assert_eq!(data_files(&sdir), Vec::<String>::new());
    drop(store);
    assert!(Store::open(&sdir).unwrap().list().is_empty());
}

#[test]
fn copy_pipeline_stores_exactly_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("s");
    let store = Store::open(&sdir).unwrap();
    for (i, size) in [GROUP + 1, (1 << 20) + 3, (64 << 20) + 2 * GROUP + 5]
        .into_iter()
        .enumerate()
    {
        let d = data(size, 10 + i as u64);
        let p = dir.path().join(format!("f{i}"));
        fs::write(&p, &d).unwrap();
        let h = store.import_file(&p, ImportMode::Copy).unwrap();
        assert_eq!(h, blake3::hash(&d), "size {size}");
        // The private copy is independent of the source.
        fs::remove_file(&p).unwrap();
        assert_eq!(store.read_all(&h).unwrap(), d, "size {size}");
        assert!(store.verify(&h).unwrap(), "size {size}");
        let copy = sdir.join("data").join(format!("{}.data", h.to_hex()));
        assert_eq!(fs::metadata(&copy).unwrap().len(), size as u64);
    }
}

#[test]
fn copy_hashes_the_same_on_one_core_or_all_and_mapped_or_read() {
    let dir = tempfile::tempdir().unwrap();
    for (i, size) in [GROUP + 1, 2 * GROUP, (70 << 20) + 5 * GROUP + 9]
        .into_iter()
        .enumerate()
    {
        let d = data(size, 20 + i as u64);
        let p = dir.path().join(format!("f{i}"));
        fs::write(&p, &d).unwrap();
        let expected = hash_bytes(&d);
        for (parallel, no_map) in [(false, false), (true, false), (false, true)] {
            let q = dir.path().join(format!("copy{i}{parallel}{no_map}"));
            let dst = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&q)
                .unwrap();
            hooks::NO_MAP.set(no_map);
            let res = copy_and_hash_with(&File::open(&p).unwrap(), &dst, size as u64, parallel);
            hooks::NO_MAP.set(false);
            let Ok(FileHash::Hashed(h, len, ob)) = res else {
                panic!("size {size} parallel {parallel} no_map {no_map}: failed");
            };
            assert_eq!(
                (h, len),
                (expected.0, size as u64),
                "size {size} {parallel} {no_map}"
            );
            assert_eq!(
                super::tests::written(&ob),
                expected.1,
                "size {size} {parallel} {no_map}"
            );
            assert_eq!(fs::read(&q).unwrap(), d);
        }
    }
}

#[test]
fn large_files_are_read_when_they_cannot_be_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let d = data(MAP_MIN as usize + 3 * GROUP + 1, 5);
    let p = dir.path().join("f");
    fs::write(&p, &d).unwrap();
    let mapped = flag_on(At::Mapped, &p);
    hooks::NO_MAP.set(true);
    let h = store.import_file(&p, ImportMode::InPlace);
    hooks::NO_MAP.set(false);
    assert_eq!(h.unwrap(), blake3::hash(&d));
    assert!(!mapped.load(Ordering::SeqCst), "mapped anyway");
    assert!(store.verify(&blake3::hash(&d)).unwrap());
}

#[test]
fn copy_of_a_file_truncated_midway_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("s");
    let store = Store::open(&sdir).unwrap();
    let p = dir.path().join("f");
    fs::write(&p, data(100 << 20, 3)).unwrap();
    // After the first piece is copied, the file loses its second half.
    let p2 = p.clone();
    hooks::on(At::Piece, ino(&p), move || resize(&p2, 50 << 20));
    let err = store.import_file(&p, ImportMode::Copy).unwrap_err();
    assert_changed(err, &p);
    assert!(store.list().is_empty());
    assert_eq!(data_files(&sdir), Vec::<String>::new());
}

#[test]
fn unreadable_files_are_a_clear_error_and_the_store_stays_usable() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dir = tempfile::tempdir().unwrap();
    let (sdir, locked, file, inner) = perm_layout(dir.path());
    fs::create_dir(&sdir).unwrap();
    fs::create_dir(dir.path().join("open")).unwrap();
    fs::write(&file, b"secret").unwrap();
    fs::write(&inner, b"inner").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    if !root {
        return perm_child_body(dir.path());
    }
    // Root reads everything: drop to nobody in a child process.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&sdir, Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::chown(dir.path().join("open"), Some(65534), Some(65534)).unwrap();
    let out = child(
        "tree::import_tests::perm_child",
        &[("SHOAL_TEST_DIR", dir.path())],
        true,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("perm child: all checked"),
        "child failed: {}\n{stdout}\n{stderr}",
        out.status
    );
}

fn perm_layout(base: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let locked = base.join("locked");
    fs::create_dir_all(&locked).unwrap();
    (
        base.join("s"),
        locked.clone(),
        base.join("unreadable"),
        locked.join("inner"),
    )
}

#[test]
#[ignore = "run by unreadable_files_are_a_clear_error_and_the_store_stays_usable as nobody"]
fn perm_child() {
    let Some(dir) = std::env::var_os("SHOAL_TEST_DIR") else {
        return;
    };
    perm_child_body(Path::new(&dir));
}

fn perm_child_body(base: &Path) {
    let (sdir, _, file, inner) = perm_layout(base);
    let store = Store::open(&sdir).unwrap();
    for mode in [ImportMode::InPlace, ImportMode::Copy] {
        for p in [&file, &inner] {
            let err = store.import_file(p, mode).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(&err, StoreError::PermissionDenied { path, .. } if path == p),
                "{mode:?} {}: {err:?}",
                p.display()
            );
            assert!(msg.contains(&p.display().to_string()), "{msg}");
            assert!(msg.contains("permission denied"), "{msg}");
        }
    }
    assert!(store.list().is_empty());
    assert_eq!(data_files(&sdir), Vec::<String>::new());
    // The store still works, and still does after reopening.
    // (Beside the store: what is in its directory is never added.)
    let ok = base.join("open").join("readable");
    fs::write(&ok, b"fine").unwrap();
    let h = store.import_file(&ok, ImportMode::Copy).unwrap();
    drop(store);
    let store = Store::open(&sdir).unwrap();
    assert_eq!(store.read_all(&h).unwrap(), b"fine");
    assert_eq!(store.list().len(), 1);
    println!("perm child: all checked");
}
