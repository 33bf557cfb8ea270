//! Bulk throughput over loopback: one QUIC stream between two endpoints
//! (through the crate's stream wrappers, with the zero-copy chunk API and
//! with AsyncRead/AsyncWrite), and a plain TCP stream for reference.
//!
//! The two-process stream runs twice: sending one 1 MiB buffer over and
//! over (which stays in the sender's CPU cache), and sending from a pool of
//! [`POOL`] of distinct buffers, larger than the caches, as the bytes of a
//! real file are when QUIC copies them into packets.
//!
//! `cargo run --release -p shoal-transport --example bulk -- [SIZE] [cubic|bbr|newreno]`
//! where SIZE is in bytes or with a unit (`1GiB`, `256MiB`); default 1 GiB.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_transport::{Congestion, Endpoint, EndpointConfig, SecretKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BUF: usize = 1 << 20;
/// Buffers of [`BUF`] bytes in the pool of the uncached stream (64 MiB).
const POOL: usize = 64;

fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn parse_size(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        _ => return None,
    };
    Some(n * mult)
}

fn report(name: &str, bytes: u64, wall: Duration, cpu: Duration) {
    let mib = bytes as f64 / (1u64 << 20) as f64;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!(
        "{name:<28} {:>8.0} MiB/s   {:>5.2} CPU s/GiB   ({:.2} s wall, {:.2} s CPU)",
        mib / wall.as_secs_f64(),
        cpu.as_secs_f64() / gib,
        wall.as_secs_f64(),
        cpu.as_secs_f64()
    );
}

async fn endpoints(congestion: Congestion) -> (Endpoint, Endpoint, SocketAddr) {
    let config = || EndpointConfig {
        listen: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
        congestion,
        ..Default::default()
    };
    let a = Endpoint::bind(SecretKey::generate(), config())
        .await
        .expect("bind");
    let b = Endpoint::bind(SecretKey::generate(), config())
        .await
        .expect("bind");
    let port = b.local_addrs()[0].port();
    (a, b, SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

async fn quic(size: u64, congestion: Congestion, chunks: bool) -> (Duration, Duration) {
    let (a, b, addr) = endpoints(congestion).await;
    let receiver = tokio::spawn(async move {
        let conn = b.accept().await.expect("accept");
        let (_send, mut recv) = conn.accept_bi().await.expect("accept stream");
        let mut got = 0u64;
        if chunks {
            while let Some(chunk) = recv.read_chunk(BUF).await.expect("read") {
                got += chunk.len() as u64;
            }
        } else {
            let mut buf = vec![0u8; BUF];
            loop {
                let n = recv.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
        }
        assert_eq!(got, size);
        b
    });
    let conn = a.connect(addr, None).await.expect("connect");
    let (cpu0, t0) = (cpu_time(), Instant::now());
    let (mut send, _recv) = conn.open_bi().await.expect("open");
    let block = Bytes::from(vec![0x5a; BUF]);
    let mut left = size;
    while left > 0 {
        let n = left.min(BUF as u64) as usize;
        if chunks {
            send.write_chunk(block.slice(..n)).await.expect("write");
        } else {
            send.write_all(&block[..n]).await.expect("write");
        }
        left -= n as u64;
    }
    send.finish().expect("finish");
    let b = receiver.await.expect("receiver");
    let result = (t0.elapsed(), cpu_time() - cpu0);
    let stats = conn.quic_stats();
    println!(
        "  (lost packets {}, congestion events {}, rtt {:?}, mtu {})",
        stats.path.lost_packets,
        stats.path.congestion_events,
        stats.path.rtt,
        stats.path.current_mtu
    );
    a.close().await;
    b.close().await;
    result
}

async fn tcp(size: u64) -> (Duration, Duration) {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("addr");
    let receiver = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; BUF];
        let mut got = 0u64;
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        assert_eq!(got, size);
    });
    let (cpu0, t0) = (cpu_time(), Instant::now());
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let block = vec![0x5au8; BUF];
    let mut left = size;
    while left > 0 {
        let n = left.min(BUF as u64) as usize;
        stream.write_all(&block[..n]).await.expect("write");
        left -= n as u64;
    }
    stream.shutdown().await.expect("shutdown");
    receiver.await.expect("receiver");
    (t0.elapsed(), cpu_time() - cpu0)
}

/// The receiving side of the two-process stream: bind, print the address,
/// take one stream, then print the CPU this process spent from the stream's
/// first byte to its end.
async fn recv_child(size: u64) {
    let b = Endpoint::bind(
        SecretKey::generate(),
        EndpointConfig {
            listen: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
            ..Default::default()
        },
    )
    .await
    .expect("bind");
    println!("{}", b.local_addrs()[0]);
    let conn = b.accept().await.expect("accept");
    let (_send, mut recv) = conn.accept_bi().await.expect("accept stream");
    let cpu0 = cpu_time();
    let mut got = 0u64;
    while let Some(chunk) = recv.read_chunk(BUF).await.expect("read") {
        got += chunk.len() as u64;
    }
    assert_eq!(got, size);
    println!("{}", (cpu_time() - cpu0).as_secs_f64());
    b.close().await;
}

/// One QUIC stream between two processes, each with the runtime of the
/// `shoal` command it stands for (`serve`: a worker per core; `get`: a
/// worker per core but one). The sender cycles through
/// `pool` distinct buffers of [`BUF`] bytes.
async fn quic_two_processes(size: u64, pool: usize) -> (Duration, Duration) {
    use std::io::BufRead;
    let exe = std::env::current_exe().expect("own path");
    let mut child = std::process::Command::new(exe)
        .args(["--recv", &size.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the receiver");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr: SocketAddr = lines
        .next()
        .expect("receiver address")
        .expect("read")
        .parse()
        .expect("address");
    let a = Endpoint::bind(
        SecretKey::generate(),
        EndpointConfig {
            listen: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
            ..Default::default()
        },
    )
    .await
    .expect("bind");
    let conn = a.connect(addr, None).await.expect("connect");
    let (cpu0, t0) = (cpu_time(), Instant::now());
    let (mut send, _recv) = conn.open_bi().await.expect("open");
    // Each buffer its own memory; non-zero, so every page is written
    // (a zeroed allocation could map one shared zero page).
    let blocks: Vec<Bytes> = (0..pool).map(|_| Bytes::from(vec![0x5a; BUF])).collect();
    let mut left = size;
    for block in blocks.iter().cycle() {
        if left == 0 {
            break;
        }
        let n = left.min(BUF as u64) as usize;
        send.write_chunk(block.slice(..n)).await.expect("write");
        left -= n as u64;
    }
    send.finish().expect("finish");
    let child_cpu = tokio::task::spawn_blocking(move || {
        let line = lines.next().expect("receiver's CPU").expect("read");
        let _ = child.wait();
        line
    })
    .await
    .expect("join");
    let wall = t0.elapsed();
    let child_cpu: f64 = child_cpu.trim().parse().expect("seconds");
    let sender_cpu = cpu_time() - cpu0;
    println!(
        "  (sender {:.2} s CPU, receiver {child_cpu:.2} s CPU)",
        sender_cpu.as_secs_f64()
    );
    a.close().await;
    (wall, sender_cpu + Duration::from_secs_f64(child_cpu))
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--recv") {
        let size = args
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("--recv SIZE");
        // The runtime `shoal get` builds: a worker per core but one (see
        // `worker_threads` in shoal-cli's main.rs).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cores.saturating_sub(1).max(1))
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(recv_child(size));
        return;
    }
    let size = args
        .next()
        .map(|s| parse_size(&s).expect("size: bytes, or with KiB/MiB/GiB"))
        .unwrap_or(1 << 30);
    let congestion = match args.next().as_deref() {
        None | Some("cubic") => Congestion::Cubic,
        Some("bbr") => Congestion::Bbr,
        Some("newreno") => Congestion::NewReno,
        Some(other) => panic!("unknown congestion controller {other}"),
    };
    // The two-process streams run first, each process with the runtime
    // `shoal` itself builds (see `quic_two_processes`).
    let (wall, cpu) = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(quic_two_processes(size, 1));
    let (wall_pool, cpu_pool) = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(quic_two_processes(size, POOL));
    println!("{} MiB over loopback, {congestion:?}", size >> 20);
    report("quic stream, two processes", size, wall, cpu);
    report("quic stream, uncached data", size, wall_pool, cpu_pool);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (wall, cpu) = quic(size, congestion, true).await;
        report("quic stream (write_chunk)", size, wall, cpu);
        let (wall, cpu) = quic(size, congestion, false).await;
        report("quic stream (AsyncWrite)", size, wall, cpu);
        let (wall, cpu) = tcp(size).await;
        report("tcp stream", size, wall, cpu);
    });
}
