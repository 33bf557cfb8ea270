//! Import throughput, beside plain BLAKE3 (all cores) and `cp`.
//!
//! ```text
//! cargo run --release -p shoal-store --example import_bench -- [SIZE_MIB] [--copy] [--dir DIR]
//! cargo run --release -p shoal-store --example import_bench -- --files 10000 [--copy]
//! cargo run --release -p shoal-store --example import_bench -- SIZE_MIB --stream
//! ```
//!
//! Creates its input under `--dir` (default: the system temp dir) and
//! removes it afterwards.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use shoal_store::{ImportMode, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut size_mib: u64 = 1024;
    let mut copy = false;
    let mut files: Option<usize> = None;
    let mut base = std::env::temp_dir();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--copy" => copy = true,
            "--files" => files = Some(args.next().ok_or("--files needs a count")?.parse()?),
            "--stream" => return bench_stream(size_mib),
            "--dir" => base = PathBuf::from(args.next().ok_or("--dir needs a path")?),
            n => size_mib = n.parse()?,
        }
    }
    let work = base.join(format!("shoal-import-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let res = match files {
        Some(n) => bench_files(&work, n, copy),
        None => bench_big(&work, size_mib, copy),
    };
    std::fs::remove_dir_all(&work)?;
    res
}

fn mibps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

fn write_random(path: &Path, len: u64) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
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
    f.flush()
}

fn bench_big(work: &Path, size_mib: u64, copy: bool) -> Result<(), Box<dyn std::error::Error>> {
    let len = size_mib << 20;
    let input = work.join("input.bin");
    write_random(&input, len)?;
    // Warm the page cache so every figure below reads from memory.
    let t = Instant::now();
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(&input)?;
    let expected = h.finalize();
    let t_b3 = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(&input)?;
    let t_b3 = t_b3.min(t.elapsed().as_secs_f64());
    println!(
        "file: {size_mib} MiB, {} cores",
        std::thread::available_parallelism()?.get()
    );
    println!(
        "blake3 (mmap, rayon, all cores): {:8.0} MiB/s",
        mibps(len, t_b3)
    );

    let store = Store::open(&work.join("store"))?;
    let t = Instant::now();
    let hash = store.import_file(&input, ImportMode::InPlace)?;
    let s = t.elapsed().as_secs_f64();
    assert_eq!(hash, expected);
    println!(
        "import in place (hash + outboard):  {:8.0} MiB/s",
        mibps(len, s)
    );
    if copy {
        store.unpin(&hash)?;
        store.gc()?;
        let t = Instant::now();
        let hash = store.import_file(&input, ImportMode::Copy)?;
        let s = t.elapsed().as_secs_f64();
        assert_eq!(hash, expected);
        println!(
            "import --copy (hash + copy + fsync): {:7.0} MiB/s",
            mibps(len, s)
        );
        let dest = work.join("cp.bin");
        let t = Instant::now();
        let st = std::process::Command::new("cp")
            .arg(&input)
            .arg(&dest)
            .status()?;
        let f = std::fs::File::open(&dest)?;
        f.sync_all()?;
        let s = t.elapsed().as_secs_f64();
        if st.success() {
            println!(
                "cp + fsync:                          {:7.0} MiB/s",
                mibps(len, s)
            );
        }
    }
    Ok(())
}

fn bench_files(work: &Path, n: usize, copy: bool) -> Result<(), Box<dyn std::error::Error>> {
    let src = work.join("tree");
    for i in 0..n {
        let d = src.join(format!("d{:03}", i % 100));
        if i < 100 {
            std::fs::create_dir_all(&d)?;
        }
        let mut data = vec![0u8; 4096];
        data[..8].copy_from_slice(&(i as u64).to_le_bytes());
        std::fs::write(d.join(format!("f{i:06}")), &data)?;
    }
    let store = Store::open(&work.join("store"))?;
    let mode = if copy {
        ImportMode::Copy
    } else {
        ImportMode::InPlace
    };
    let t = Instant::now();
    let col = store.import_dir(&src, mode)?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "import_dir {n} files of 4 KiB ({mode:?}): {:.2} s, {:.0} files/s, collection {col}",
        s,
        n as f64 / s
    );
    Ok(())
}

/// Serve a blob from one in-memory store and receive it into another.
fn bench_stream(size_mib: u64) -> Result<(), Box<dyn std::error::Error>> {
    let len = (size_mib << 20) as usize;
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u64).wrapping_mul(0x9E37_79B9) as u8 ^ (i >> 13) as u8)
        .collect();
    let from = Store::in_memory();
    let hash = from.import_bytes(&data, "x")?;
    let all = shoal_store::GroupRanges::from_range(0..shoal_proto::group_count(len as u64));
    let rt = tokio::runtime::Runtime::new()?;
    let mut encoded = Vec::with_capacity(len + len / 200);
    rt.block_on(from.send_ranges(&hash, &all, &mut encoded))?;
    encoded.clear();
    let t = Instant::now();
    rt.block_on(from.send_ranges(&hash, &all, &mut encoded))?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "send_ranges (in memory, validating): {:7.0} MiB/s",
        mibps(len as u64, s)
    );
    let to = Store::in_memory();
    let t = Instant::now();
    rt.block_on(to.receive_ranges(&hash, &all, &encoded[..]))?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "receive_ranges (in memory, verifying): {:5.0} MiB/s",
        mibps(len as u64, s)
    );
    Ok(())
}
