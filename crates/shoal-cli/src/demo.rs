//! `shoal demo`: one seeder and several downloaders on loopback, in this
//! process, swarming a generated file; prints what happened and how fast.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use shoal_node::{FetchOutput, FetchRequest, Node, NodeConfig, Progress};

use crate::output::{Out, human};

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Size of the generated file, in MiB (every node holds it in memory).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=4096))]
    size_mib: u64,
    /// Number of downloaders.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=32))]
    downloaders: u16,
    /// Upload cap of the seeder (`0`: none). Uncapped on loopback, the
    /// seeder alone feeds every downloader within a couple of seconds,
    /// before they learn of each other, and there is no swarm to see;
    /// capped, as a home uplink is, the downloaders get most of the data
    /// from each other.
    #[arg(long, value_name = "RATE", default_value = "50MiB/s", value_parser = rate_or_none)]
    seeder_rate: u64,
}

/// A rate, or `0` for none (the general parser refuses a zero rate).
fn rate_or_none(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    crate::parse_rate(s)
}

/// Fast, deterministic filler (xorshift64*), so the demo needs no input.
fn generate(size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in v.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let w = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
    v
}

/// A line of the report on stdout; a reader gone (`| head`) is an error
/// the caller ends quietly on, where `println!` panicked.
macro_rules! say {
    ($($t:tt)*) => {
        crate::output::line(&format!($($t)*))?
    };
}

fn loopback() -> NodeConfig {
    NodeConfig {
        listen: vec!["127.0.0.1:0".parse().expect("literal address")],
        ..NodeConfig::default()
    }
}

pub(crate) async fn run(args: &DemoArgs, out: &Out) -> Result<()> {
    // Bounded by clap: 1..=4096 MiB, 1..=32 downloaders.
    let size = usize::try_from(args.size_mib << 20).context("size too large")?;
    note!("generating {} of data ...", human(size as u64));
    let data = generate(size);
    let expected = blake3::hash(&data);

    let seeder = Node::spawn(NodeConfig {
        upload_limit: (args.seeder_rate > 0).then_some(args.seeder_rate),
        ..loopback()
    })
    .await?;
    let t = Instant::now();
    let hash = seeder.add_bytes(data, "demo.bin").await?;
    let import = t.elapsed();
    if hash != expected {
        bail!("the store named the data {hash}, but its BLAKE3 hash is {expected}");
    }
    let ticket = seeder.ticket(&hash)?;
    note!(
        "seeder {} holds {hash} (imported in {:.2}s)",
        seeder.peer_id(),
        import.as_secs_f64()
    );
    let cap = if args.seeder_rate > 0 {
        format!(
            "the seeder's upload capped at {}/s",
            human(args.seeder_rate)
        )
    } else {
        "the seeder's upload not capped".to_string()
    };
    note!(
        "starting {} downloaders, each given only the seeder's ticket; they find each other by peer exchange ({cap})",
        args.downloaders
    );

    let mut nodes = Vec::new();
    for _ in 0..args.downloaders {
        nodes.push(Node::spawn(loopback()).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut watches = Vec::new();
    for n in &nodes {
        let (tx, rx) = tokio::sync::watch::channel(Progress::default());
        watches.push(rx);
        let n = n.clone();
        let req = FetchRequest::from_ticket(&ticket, FetchOutput::Store);
        tasks.push(tokio::spawn(async move {
            let r = n.fetch(req, Some(tx)).await;
            (r, Instant::now())
        }));
    }
    // Live progress.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    // Only to a terminal, as progress bars are (the report says it all).
    let live = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && !crate::QUIET.load(std::sync::atomic::Ordering::Relaxed);
    let printer = tokio::spawn(async move {
        while live && !d.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let line: Vec<String> = watches
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let p = w.borrow().clone();
                    let pct = if p.total == 0 {
                        0.0
                    } else {
                        100.0 * p.verified as f64 / p.total as f64
                    };
                    format!("d{}: {pct:>3.0}%", i + 1)
                })
                .collect();
            eprintln!(
                "  {:>5.1}s  {}",
                started.elapsed().as_secs_f64(),
                line.join("  ")
            );
        }
    });
    let mut finish_times = Vec::new();
    for t in tasks {
        let (r, at) = t.await.context("a downloader task panicked")?;
        r.context("a downloader failed")?;
        finish_times.push(at.duration_since(started));
    }
    // When the last downloader finished (the progress printer may still
    // sleep up to half a second before it sees `done`).
    let total = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = printer.await;

    // Verify every copy independently of the store's own checks.
    let mut all_ok = true;
    for n in &nodes {
        let mut h = blake3::Hasher::new();
        n.store().export_blob(&hash, &mut h)?;
        all_ok &= h.finalize() == expected;
    }

    let mb = size as f64 / (1024.0 * 1024.0);
    let report = |name: String, n: &Node, done: Option<Duration>| {
        let s = n.endpoint().stats();
        (name, done, s.bytes_sent, s.bytes_received)
    };
    // A downloader's rate: bytes per second, over the time it took.
    let rate = |d: Duration| size as f64 / d.as_secs_f64().max(1e-3);
    let mut rows = vec![report("seeder".into(), &seeder, None)];
    for (i, n) in nodes.iter().enumerate() {
        rows.push(report(
            format!("downloader {}", i + 1),
            n,
            Some(finish_times[i]),
        ));
    }
    if out.json {
        for r in &rows {
            say!(
                "{}",
                // Numbers (seconds, bytes per second), null for the seeder.
                serde_json::json!({ "node": r.0, "seconds": r.1.map(|d| d.as_secs_f64()), "rate": r.1.map(|d| rate(d) as u64), "uploaded": r.2, "downloaded": r.3 })
            );
        }
        say!(
            "{}",
            serde_json::json!({ "hash": hash.to_hex().as_str(), "bytes": size, "seconds": total.as_secs_f64(), "verified": all_ok })
        );
    } else {
        say!(
            "shoal demo: {} to {} downloaders over loopback",
            human(size as u64),
            args.downloaders
        );
        say!("hash {hash}");
        say!(
            "{:<14} {:>9} {:>11} {:>12} {:>12}",
            "node",
            "finished",
            "rate",
            "uploaded",
            "downloaded"
        );
        for r in &rows {
            let time =
                r.1.map_or_else(|| "-".to_string(), |d| format!("{:.2}s", d.as_secs_f64()));
            let speed = r.1.map_or_else(
                || "-".to_string(),
                |d| format!("{:.0} MiB/s", rate(d) / (1024.0 * 1024.0)),
            );
            say!(
                "{:<14} {:>9} {:>11} {:>12} {:>12}",
                r.0,
                time,
                speed,
                human(r.2),
                human(r.3)
            );
        }
        let seeder_copies = rows[0].2 as f64 / size as f64;
        let peer_copies = rows[1..].iter().map(|r| r.2).sum::<u64>() as f64 / size as f64;
        say!(
            "all done in {:.2}s ({:.0} MiB/s aggregate); the seeder sent {seeder_copies:.2} copies, the downloaders sent each other {peer_copies:.2}",
            total.as_secs_f64(),
            mb * args.downloaders as f64 / total.as_secs_f64().max(1e-3)
        );
        say!(
            "verification: {}",
            if all_ok {
                "every copy has the right BLAKE3 hash"
            } else {
                "MISMATCH"
            }
        );
    }
    for n in nodes.iter().chain(std::iter::once(&seeder)) {
        n.shutdown().await;
    }
    if !all_ok {
        bail!("a downloaded copy does not match");
    }
    Ok(())
}
