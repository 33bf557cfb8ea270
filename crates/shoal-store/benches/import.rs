//! `cargo bench -p shoal-store --bench import`: importing a file in place,
//! with `--copy`, and a directory of small files, each beside its baseline
//! in the same run (divan; compare the medians): BLAKE3 of the same bytes
//! on all cores (mmap + rayon, as `b3sum` does) for in place, a kernel copy
//! plus fsync (as `cp` + `sync`) for `--copy`. The end-to-end figures, with
//! process start-up and a 1 GiB file, are S1 of `cargo xtask bench`.

#![allow(clippy::unwrap_used)] // a benchmark: a failure is a crash

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use divan::Bencher;
use shoal_store::{ImportMode, Store};

fn main() {
    divan::main();
}

/// Bytes of the single file.
const SIZE: usize = 1 << 30;
/// Files of 4 KiB in the directory.
const FILES: usize = 2000;

struct Input {
    _dir: tempfile::TempDir,
    file: PathBuf,
    tree: PathBuf,
    work: PathBuf,
}

static INPUT: LazyLock<Input> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("input.bin");
    fs::write(&file, data(SIZE, 1)).unwrap();
    let tree = dir.path().join("tree");
    for i in 0..FILES {
        let sub = tree.join(format!("d{}", i % 20));
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join(format!("f{i}")), data(4096, i as u64 + 2)).unwrap();
    }
    let work = dir.path().join("work");
    fs::create_dir(&work).unwrap();
    Input {
        _dir: dir,
        file,
        tree,
        work,
    }
});

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = vec![0u8; len];
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    out
}

/// A fresh store for one iteration.
fn fresh_store(work: &Path) -> (Store, PathBuf) {
    let d = work.join("store");
    let _ = fs::remove_dir_all(&d);
    (Store::open(&d).unwrap(), d)
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn file_in_place(b: Bencher) {
    let input = &*INPUT;
    b.with_inputs(|| fresh_store(&input.work))
        .bench_values(|(store, _d)| {
            let h = store.import_file(&input.file, ImportMode::InPlace).unwrap();
            // Returned, so that closing the store is not timed.
            (store, h)
        });
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn file_in_place_baseline_blake3_all_cores() -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(&INPUT.file).unwrap();
    h.finalize()
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn file_copy(b: Bencher) {
    let input = &*INPUT;
    b.with_inputs(|| fresh_store(&input.work))
        .bench_values(|(store, _d)| {
            let h = store.import_file(&input.file, ImportMode::Copy).unwrap();
            (store, h)
        });
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn file_copy_baseline_cp_and_fsync() {
    let dest = INPUT.work.join("cp.bin");
    let _ = fs::remove_file(&dest);
    fs::copy(&INPUT.file, &dest).unwrap();
    fs::File::open(&dest).unwrap().sync_all().unwrap();
}

#[divan::bench(sample_count = 10, sample_size = 1)]
fn directory_of_small_files(b: Bencher) {
    let input = &*INPUT;
    b.with_inputs(|| fresh_store(&input.work))
        .bench_values(|(store, _d)| {
            let h = store.import_dir(&input.tree, ImportMode::InPlace).unwrap();
            (store, h)
        });
}
