//! End-to-end tests of the endpoint over loopback.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::*;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

fn loopback() -> EndpointConfig {
    EndpointConfig {
        listen: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0))],
        ..Default::default()
    }
}

async fn bind(config: EndpointConfig) -> Endpoint {
    Endpoint::bind(SecretKey::generate(), config).await.unwrap()
}

fn addr(ep: &Endpoint) -> SocketAddr {
    let port = ep.local_addrs()[0].port();
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Serve: accept connections and, on each stream, echo everything back.
fn echo_server(ep: &Endpoint) -> tokio::task::JoinHandle<()> {
    let ep = ep.clone();
    tokio::spawn(async move {
        while let Some(conn) = ep.accept().await {
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut recv, &mut send).await;
                        let _ = send.finish();
                    });
                }
            });
        }
    })
}

/// Pseudo-random test data.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn echo(conn: &Connection, payload: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let payload = payload.to_vec();
    let writer = tokio::spawn(async move {
        send.write_all(&payload).await.unwrap();
        send.finish().unwrap();
        send
    });
    let mut back = Vec::new();
    recv.read_to_end(&mut back).await.unwrap();
    drop(writer.await.unwrap());
    back
}

async fn timed<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_a_bare_address_learns_the_id() {
    timed(async {
        let a = bind(loopback()).await;
        let b = bind(loopback()).await;
        let server = echo_server(&b);
        let conn = a.connect(addr(&b), None).await.unwrap();
        assert_eq!(conn.peer_id(), b.peer_id());
        assert!(conn.dialed_by_us());
        assert_eq!(conn.remote_addr(), addr(&b));
        assert_eq!(echo(&conn, b"hello").await, b"hello");
        // the server learned who dialed
        let theirs = b.connection(&a.peer_id()).expect("server knows the client");
        assert_eq!(theirs.peer_id(), a.peer_id());
        assert!(!theirs.dialed_by_us());
        // dialing again reuses the connection, by address or by id
        let again = a.connect(addr(&b), None).await.unwrap();
        assert_eq!(again.stable_id(), conn.stable_id());
        let again = a.connect(addr(&b), Some(b.peer_id())).await.unwrap();
        assert_eq!(again.stable_id(), conn.stable_id());
        // counters
        assert_eq!(conn.stats().bytes_sent, 5);
        assert_eq!(conn.stats().bytes_received, 5);
        assert_eq!(a.stats().bytes_sent, 5);
        a.close().await;
        b.close().await;
        server.await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_expected_id_is_refused() {
    timed(async {
        let a = bind(loopback()).await;
        let b = bind(loopback()).await;
        let _server = echo_server(&b);
        let other = SecretKey::generate().public();
        let err = a.connect(addr(&b), Some(other)).await.unwrap_err();
        match &err {
            TransportError::WrongPeer {
                addr: at,
                expected,
                actual,
            } => {
                assert_eq!(*at, addr(&b));
                assert_eq!(*expected, other);
                assert_eq!(*actual, b.peer_id());
            }
            err => panic!("unexpected error {err}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&b.peer_id().to_string()) && msg.contains(&other.to_string()));
        assert!(a.connection(&b.peer_id()).is_none());
        // and the right id still works
        let conn = a.connect(addr(&b), Some(b.peer_id())).await.unwrap();
        assert_eq!(echo(&conn, b"x").await, b"x");
        // connecting to oneself is refused
        let err = a.connect(addr(&a), None).await.unwrap_err();
        assert!(matches!(err, TransportError::SelfConnect { .. }), "{err}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_a_client_whose_signature_is_not_its_key() {
    timed(async {
        let b = bind(loopback()).await;
        let provider = tls::provider();
        let alice = SecretKey::generate();
        let mallory = SecretKey::generate();
        // present Alice's key, sign with Mallory's
        let real = tls::certified_key(&provider, &mallory).unwrap();
        let forged = Arc::new(rustls::sign::CertifiedKey::new(
            vec![tls::spki(&alice.public()).into()],
            real.key.clone(),
        ));
        let (verifier, _) = tls::ServerVerifier::new(&provider, Some(b.peer_id()));
        let client_tls = tls::client_config(provider.clone(), forged, verifier).unwrap();
        let client_crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(client_tls)).unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let result = client
            .connect_with(
                quinn::ClientConfig::new(Arc::new(client_crypto)),
                addr(&b),
                "shoal",
            )
            .unwrap()
            .await;
        // the client's half of the handshake may end before the server
        // checks its key: then the server closes the connection at once
        if let Ok(conn) = result {
            let err = tokio::time::timeout(Duration::from_secs(5), conn.closed())
                .await
                .expect("a forged client key was accepted");
            assert!(
                matches!(err, quinn::ConnectionError::ConnectionClosed(_)),
                "{err}"
            );
        }
        // nothing reaches the application
        let accepted = tokio::time::timeout(Duration::from_millis(300), b.accept()).await;
        assert!(accepted.is_err());
        assert!(b.connection(&alice.public()).is_none());
        assert!(b.connection(&mallory.public()).is_none());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_filter_rejects_unwanted_clients() {
    timed(async {
        let a = bind(loopback()).await;
        let c = bind(loopback()).await;
        let allowed = a.peer_id();
        let b = bind(EndpointConfig {
            peer_filter: Some(Arc::new(move |id: &PeerId| *id == allowed)),
            ..loopback()
        })
        .await;
        let _server = echo_server(&b);
        let conn = a.connect(addr(&b), Some(b.peer_id())).await.unwrap();
        assert_eq!(echo(&conn, b"ok").await, b"ok");
        let err = c.connect(addr(&b), Some(b.peer_id())).await.unwrap_err();
        assert!(matches!(err, TransportError::Rejected { .. }), "{err}");
        assert!(b.connection(&c.peer_id()).is_none());
    })
    .await
}

/// A peer started again dials from a new endpoint with the same key while
/// this side still holds the connection it dialed to the earlier run (dead
/// after a kill; here merely idle), and this side has the lower id. The
/// new run's connection is kept, not closed as the loser of a double dial:
/// closed, the new run could not reach this side until the old one timed
/// out (a review). Which one stands for the peer is the layer above's call
/// (shoal-node closes the earlier run's on the new run's hello).
#[tokio::test]
async fn a_peer_started_again_can_dial_though_it_was_dialed_before() {
    timed(async {
        let a = bind(loopback()).await;
        let _server = echo_server(&a);
        let key = loop {
            let k = SecretKey::generate();
            if a.peer_id() < k.public() {
                break k;
            }
        };
        let old_run = Endpoint::bind(SecretKey::from_bytes(&key.to_bytes()), loopback())
            .await
            .unwrap();
        let to_old = a
            .connect(addr(&old_run), Some(old_run.peer_id()))
            .await
            .unwrap();
        let key_bytes = key.to_bytes();
        let new_run = Endpoint::bind(key, loopback()).await.unwrap();
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            new_run.connect(addr(&a), Some(a.peer_id())),
        )
        .await
        .expect("the new run's dial hung")
        .unwrap();
        assert_eq!(echo(&conn, b"hello").await, b"hello");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !conn.is_closed(),
            "{:?}",
            conn.close_reason().map(|e| e.to_string())
        );
        assert!(!to_old.is_closed());
        // Kept, but not without end: of the connections the peer dialed
        // and did not close, two stay, the oldest going first.
        let dial_again = || async {
            let run = Endpoint::bind(SecretKey::from_bytes(&key_bytes), loopback())
                .await
                .unwrap();
            let c = run.connect(addr(&a), Some(a.peer_id())).await.unwrap();
            (run, c)
        };
        let (_second_run, second) = dial_again().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!conn.is_closed() && !second.is_closed());
        let (_third_run, third) = dial_again().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !conn.is_closed() {
            assert!(Instant::now() < deadline, "the oldest was kept");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(echo(&third, b"again").await, b"again");
        assert!(!second.is_closed() && !to_old.is_closed());
    })
    .await;
}

/// Whether the two connects each made a connection of their own.
fn both_dialed(ra: &Connection, rb: &Connection) -> bool {
    ra.dialed_by_us() && rb.dialed_by_us()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dials_end_as_one_connection() {
    timed(async {
        let mut both = 0;
        let mut dups = 0;
        for round in 0..20 {
            // odd rounds: 20 ms each way, so both handshakes are in flight
            // together
            let config = || EndpointConfig {
                fault: (round % 2 == 1).then(|| FaultConfig {
                    delay: Duration::from_millis(20),
                    ..Default::default()
                }),
                ..loopback()
            };
            let a = bind(config()).await;
            let b = bind(config()).await;
            let (ra, rb) = tokio::join!(
                a.connect(addr(&b), Some(b.peer_id())),
                b.connect(addr(&a), Some(a.peer_id())),
            );
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            // give the losing connection time to be closed on both sides
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let live_a = a.connections();
                let live_b = b.connections();
                let all_a = [&ra].into_iter().filter(|c| !c.is_closed()).count();
                let all_b = [&rb].into_iter().filter(|c| !c.is_closed()).count();
                if live_a.len() == 1 && live_b.len() == 1 && all_a + all_b >= 1 {
                    let ca = &live_a[0];
                    let cb = &live_b[0];
                    // both sides kept the same connection: dialed by one of
                    // them (by the lower id if both dials got through; by
                    // the first if the second found it already there)
                    if ca.dialed_by_us() != cb.dialed_by_us() {
                        if both_dialed(&ra, &rb) {
                            let a_lower = a.peer_id() < b.peer_id();
                            assert_eq!(ca.dialed_by_us(), a_lower);
                        }
                        break;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "no single connection settled: a={:?} b={:?} ra={:?} {:?} rb={:?} {:?} a<b {}",
                    a.connections(),
                    b.connections(),
                    ra,
                    ra.close_reason().map(|e| e.to_string()),
                    rb,
                    rb.close_reason().map(|e| e.to_string()),
                    a.peer_id() < b.peer_id()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            both += usize::from(both_dialed(&ra, &rb));
            dups += a.duplicates_closed() + b.duplicates_closed();
            let ca = a.connection(&b.peer_id()).unwrap();
            let cb = b.connection(&a.peer_id()).unwrap();
            // each connect returned the survivor, or one that was closed as
            // a duplicate
            for (ret, kept) in [(&ra, &ca), (&rb, &cb)] {
                if ret.stable_id() != kept.stable_id() {
                    let reason = ret.close_reason().expect("loser is closed");
                    assert!(reason.is_duplicate(), "{reason}");
                }
            }
            // the survivor carries streams both ways
            let cb2 = cb.clone();
            let server = tokio::spawn(async move {
                let (mut send, mut recv) = cb2.accept_bi().await.unwrap();
                let mut buf = Vec::new();
                recv.read_to_end(&mut buf).await.unwrap();
                send.write_all(&buf).await.unwrap();
                send.finish().unwrap();
                send.stopped().await.unwrap();
            });
            assert_eq!(echo(&ca, b"one").await, b"one");
            server.await.unwrap();
            a.close().await;
            b.close().await;
        }
        eprintln!("both dials got through in {both} of 20 rounds; {dups} duplicates closed");
        assert!(dups > 0, "no round had two connections to settle");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused() {
    timed(async {
        let server = bind(EndpointConfig {
            max_connections: 3,
            ..loopback()
        })
        .await;
        let _echo = echo_server(&server);
        let mut clients = Vec::new();
        for _ in 0..3 {
            let c = bind(loopback()).await;
            let conn = c.connect(addr(&server), None).await.unwrap();
            assert_eq!(echo(&conn, b"hi").await, b"hi");
            clients.push((c, conn));
        }
        for _ in 0..3 {
            let c = bind(loopback()).await;
            let err = c.connect(addr(&server), None).await.unwrap_err();
            assert!(matches!(err, TransportError::Refused { .. }), "{err}");
        }
        // a closed connection frees its place
        clients[0].1.close(0, b"bye");
        let c = bind(loopback()).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match c.connect(addr(&server), None).await {
                Ok(conn) => {
                    assert_eq!(echo(&conn, b"again").await, b"again");
                    break;
                }
                Err(TransportError::Refused { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(err) => panic!("{err}"),
            }
        }
        // outgoing connections count too
        let small = bind(EndpointConfig {
            max_connections: 1,
            ..loopback()
        })
        .await;
        let other = bind(loopback()).await;
        small.connect(addr(&clients[1].0), None).await.unwrap();
        let err = small.connect(addr(&other), None).await.unwrap_err();
        assert!(
            matches!(err, TransportError::TooManyConnections { max: 1 }),
            "{err}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_cap_makes_a_greedy_peer_wait() {
    const CAP: u32 = 8;
    const STREAMS: usize = 2000;
    timed(async {
        let server = bind(EndpointConfig {
            max_streams_per_connection: CAP,
            ..loopback()
        })
        .await;
        let client = bind(loopback()).await;
        let open_at_server = Arc::new(AtomicUsize::new(0));
        let max_at_server = Arc::new(AtomicUsize::new(0));
        {
            let server = server.clone();
            let open = open_at_server.clone();
            let max = max_at_server.clone();
            tokio::spawn(async move {
                let conn = server.accept().await.unwrap();
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let open = open.clone();
                    let max = max.clone();
                    tokio::spawn(async move {
                        let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                        max.fetch_max(now, Ordering::SeqCst);
                        let mut buf = Vec::new();
                        recv.read_to_end(&mut buf).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        open.fetch_sub(1, Ordering::SeqCst);
                        send.write_all(&buf).await.unwrap();
                        send.finish().unwrap();
                    });
                }
            });
        }
        let conn = client.connect(addr(&server), None).await.unwrap();
        let open_at_client = Arc::new(AtomicUsize::new(0));
        let max_at_client = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..STREAMS)
            .map(|i| {
                let conn = conn.clone();
                let open = open_at_client.clone();
                let max = max_at_client.clone();
                tokio::spawn(async move {
                    let (mut send, mut recv) = conn.open_bi().await.unwrap();
                    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(now, Ordering::SeqCst);
                    let msg = format!("stream {i}");
                    send.write_all(msg.as_bytes()).await.unwrap();
                    send.finish().unwrap();
                    let mut back = Vec::new();
                    recv.read_to_end(&mut back).await.unwrap();
                    open.fetch_sub(1, Ordering::SeqCst);
                    assert_eq!(back, msg.as_bytes());
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let at_server = max_at_server.load(Ordering::SeqCst);
        let at_client = max_at_client.load(Ordering::SeqCst);
        assert!(
            at_server <= CAP as usize,
            "server saw {at_server} open streams"
        );
        // the client counts a stream open until it has read the answer,
        // which the server may have acknowledged (and so released the
        // stream) a little earlier
        assert!(
            at_client <= 2 * CAP as usize,
            "client had {at_client} open streams"
        );
        assert!(at_server >= 2, "streams did not run concurrently");
    })
    .await
}

async fn send_bulk(conn: &Connection, bytes: usize, streams: usize) {
    let per = bytes / streams;
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move {
                let (mut send, _recv) = conn.open_bi().await.unwrap();
                let chunk = bytes::Bytes::from(data(per, i as u64));
                send.write_chunk(chunk).await.unwrap();
                send.finish().unwrap();
                send.stopped().await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// Accept `streams` streams on the next connection, read each to its end and
/// check its contents; returns when all are read.
async fn sink(ep: &Endpoint, bytes: usize, streams: usize) {
    let conn = ep.accept().await.unwrap();
    let per = bytes / streams;
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let (_send, mut recv) = conn.accept_bi().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(per);
            recv.read_to_end(&mut got).await.unwrap();
            got
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.push(task.await.unwrap());
    }
    all.sort();
    let mut want: Vec<Vec<u8>> = (0..streams).map(|i| data(per, i as u64)).collect();
    want.sort();
    assert!(all == want, "data corrupted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upload_limit_holds_across_streams() {
    const BYTES: usize = 20_000_000;
    timed(async {
        let sender = bind(EndpointConfig {
            upload_limit: Some(parse_rate("5MB/s").unwrap()),
            ..loopback()
        })
        .await;
        let receiver = bind(loopback()).await;
        let conn = sender.connect(addr(&receiver), None).await.unwrap();
        let start = Instant::now();
        let rx = receiver.clone();
        let reading = tokio::spawn(async move { sink(&rx, BYTES, 4).await });
        send_bulk(&conn, BYTES, 4).await;
        reading.await.unwrap();
        let took = start.elapsed();
        eprintln!("20 MB at 5 MB/s took {took:?}");
        assert!(
            took >= Duration::from_millis(3600),
            "20 MB at 5 MB/s took {took:?}"
        );
        assert!(
            took <= Duration::from_secs(6),
            "20 MB at 5 MB/s took {took:?}"
        );
        assert!(sender.stats().bytes_sent >= BYTES as u64);
        assert_eq!(receiver.stats().bytes_received, BYTES as u64);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_download_limit_holds() {
    const BYTES: usize = 20_000_000;
    timed(async {
        let sender = bind(loopback()).await;
        let receiver = bind(EndpointConfig {
            download_limit: Some(5_000_000),
            ..loopback()
        })
        .await;
        let conn = sender.connect(addr(&receiver), None).await.unwrap();
        let start = Instant::now();
        let rx = receiver.clone();
        let reading = tokio::spawn(async move { sink(&rx, BYTES, 1).await });
        send_bulk(&conn, BYTES, 1).await;
        reading.await.unwrap();
        let took = start.elapsed();
        eprintln!("20 MB at 5 MB/s took {took:?}");
        assert!(
            took >= Duration::from_millis(3600),
            "20 MB at 5 MB/s took {took:?}"
        );
        assert!(
            took <= Duration::from_secs(6),
            "20 MB at 5 MB/s took {took:?}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_limit_shrinks_what_peers_may_send_ahead() {
    // The receiver reads nothing: a sender may write only what its
    // receive windows allow. Under a 256 KiB/s limit that is about a
    // second's worth, not the 8 MiB of a stream window (sent at line rate
    // before the limit was felt).
    timed(async {
        let sender = bind(loopback()).await;
        let receiver = bind(EndpointConfig {
            download_limit: Some(256 * 1024),
            ..loopback()
        })
        .await;
        let conn = sender.connect(addr(&receiver), None).await.unwrap();
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let w = written.clone();
        let writer = tokio::spawn(async move {
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            let piece = [7u8; 16 * 1024];
            for _ in 0..1024 {
                if send.write_all(&piece).await.is_err() {
                    return;
                }
                w.fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
        });
        let at = receiver.accept().await.unwrap();
        let (_send, _recv) = at.accept_bi().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let ahead = written.load(Ordering::Relaxed);
        assert!(ahead >= 64 * 1024, "only {ahead} bytes written");
        assert!(
            ahead <= 512 * 1024,
            "{ahead} bytes sent ahead of the reader"
        );
        writer.abort();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_short_streams_spend_the_download_limit_on_their_bytes() {
    // Each stream takes a piece's worth of the limit before it reads, and
    // its last read rarely uses all of it: what is left goes to the next
    // stream. It used to be lost, and a download made of many short
    // requests ran ~12% under its limit. Counted, not timed: the bytes
    // the limit granted against the bytes read.
    const STREAMS: usize = 300;
    const PER: usize = 20_000;
    const RATE: u64 = 4_000_000;
    timed(async {
        let sender = bind(loopback()).await;
        let receiver = bind(EndpointConfig {
            download_limit: Some(RATE),
            ..loopback()
        })
        .await;
        let conn = sender.connect(addr(&receiver), None).await.unwrap();
        let rx = receiver.clone();
        // Read as a download reads: pieces without copying.
        let reading = tokio::spawn(async move {
            let conn = rx.accept().await.unwrap();
            let mut tasks = Vec::new();
            for _ in 0..STREAMS {
                let (_send, mut recv) = conn.accept_bi().await.unwrap();
                tasks.push(tokio::spawn(async move {
                    let mut bufs = vec![bytes::Bytes::new(); 16];
                    let mut got = 0;
                    while let Some(n) = recv.read_chunks(&mut bufs).await.unwrap() {
                        got += bufs[..n].iter().map(bytes::Bytes::len).sum::<usize>();
                    }
                    assert_eq!(got, PER);
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        send_bulk(&conn, STREAMS * PER, STREAMS).await;
        reading.await.unwrap();
        let read = receiver.stats().bytes_received;
        assert_eq!(read, (STREAMS * PER) as u64);
        let drawn = receiver.download_drawn();
        // Left over at the end: at most what the limiter keeps for the
        // next taker (one burst, RATE / 16) and a stream's piece.
        let slack = RATE / 16 + rate::PIECE as u64;
        assert!(
            drawn <= read + slack,
            "granted {drawn} bytes for {read} read: {} lost",
            drawn - read
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_survive_five_percent_loss() {
    const BYTES: usize = 8 << 20;
    timed(async {
        let lossy = |seed| EndpointConfig {
            fault: Some(FaultConfig {
                loss: 0.05,
                delay: Duration::from_millis(2),
                rate: None,
                seed,
            }),
            ..loopback()
        };
        let sender = bind(lossy(1)).await;
        let receiver = bind(lossy(2)).await;
        let conn = sender.connect(addr(&receiver), None).await.unwrap();
        let rx = receiver.clone();
        let reading = tokio::spawn(async move { sink(&rx, BYTES, 4).await });
        send_bulk(&conn, BYTES, 4).await;
        reading.await.unwrap();
        let lost = conn.quic_stats().path.lost_packets;
        assert!(lost > 0, "the lossy socket lost nothing");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_socket_throttles() {
    const BYTES: usize = 2_000_000;
    timed(async {
        let slow = EndpointConfig {
            fault: Some(FaultConfig {
                rate: Some(2_000_000),
                ..Default::default()
            }),
            ..loopback()
        };
        let sender = bind(slow).await;
        let receiver = bind(loopback()).await;
        let conn = sender.connect(addr(&receiver), None).await.unwrap();
        let start = Instant::now();
        let rx = receiver.clone();
        let reading = tokio::spawn(async move { sink(&rx, BYTES, 1).await });
        send_bulk(&conn, BYTES, 1).await;
        reading.await.unwrap();
        let took = start.elapsed();
        // 2 MB over a 2 MB/s link: about a second
        assert!(took >= Duration::from_millis(900), "took {took:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_listens_on_both_families() {
    timed(async {
        let server = bind(EndpointConfig::default()).await;
        let _echo = echo_server(&server);
        let addrs = server.local_addrs();
        assert!(addrs.iter().all(|a| a.port() != 0), "{addrs:?}");
        let port = addrs[0].port();
        let v4 = bind(loopback()).await;
        let conn = v4
            .connect(
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                Some(server.peer_id()),
            )
            .await
            .unwrap();
        assert_eq!(echo(&conn, b"v4").await, b"v4");
        assert_eq!(conn.remote_addr().ip(), Ipv4Addr::LOCALHOST);
        // IPv6 loopback, where this host has it
        let v6_port = addrs.iter().find(|a| a.is_ipv6()).map(|a| a.port());
        let v6 = Endpoint::bind(
            SecretKey::generate(),
            EndpointConfig {
                listen: vec!["[::1]:0".parse().unwrap()],
                ..Default::default()
            },
        )
        .await;
        if let (Some(v6_port), Ok(v6)) = (v6_port, v6) {
            let conn = v6
                .connect(
                    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, v6_port)),
                    Some(server.peer_id()),
                )
                .await
                .unwrap();
            assert_eq!(echo(&conn, b"v6").await, b"v6");
            // and an IPv4-only endpoint cannot dial IPv6
            let err = v4
                .connect(
                    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, v6_port)),
                    None,
                )
                .await
                .unwrap_err();
            assert!(matches!(err, TransportError::NoRoute { .. }), "{err}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_accept_and_connections() {
    timed(async {
        let a = bind(loopback()).await;
        let b = bind(loopback()).await;
        let conn = a.connect(addr(&b), None).await.unwrap();
        let theirs = b.accept().await.unwrap();
        b.close().await;
        assert!(b.accept().await.is_none());
        let err = b.connect(addr(&a), None).await.unwrap_err();
        assert!(matches!(err, TransportError::Closed), "{err}");
        tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .expect("the peer saw the close");
        assert!(conn.is_closed() && theirs.is_closed());
        assert!(
            a.connection(&b.peer_id()).is_none() || a.connection(&b.peer_id()).unwrap().is_closed()
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_time_out_and_keep_alive_holds_them() {
    timed(async {
        let short = |keep_alive| EndpointConfig {
            idle_timeout: Duration::from_millis(400),
            keep_alive,
            ..loopback()
        };
        let a = bind(short(Duration::ZERO)).await;
        let b = bind(short(Duration::ZERO)).await;
        let conn = a.connect(addr(&b), None).await.unwrap();
        tokio::time::timeout(Duration::from_secs(3), conn.closed())
            .await
            .expect("idle connection closed");
        let a = bind(short(Duration::from_millis(100))).await;
        let b = bind(short(Duration::from_millis(100))).await;
        let conn = a.connect(addr(&b), None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(!conn.is_closed(), "keep-alive did not hold the connection");
    })
    .await
}

/// A write that the peer takes nothing of fails once the stall timeout
/// passes, and the peer sees the stream reset; waiting for this node's own
/// upload limit is not a stall, however long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_peer_takes_nothing_of_fails_after_the_stall_timeout() {
    timed(async {
        let sender = bind(loopback()).await;
        let receiver = bind(loopback()).await;
        let conn = sender.connect(addr(&receiver), None).await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.set_stall_timeout(Some(Duration::from_millis(300)));
        // Past the receiver's stream window (8 MiB): the rest waits for it
        // to read, which it never does.
        let r = send
            .write_chunk(bytes::Bytes::from(data(32 << 20, 1)))
            .await;
        assert!(matches!(r, Err(TransportError::Stalled(_))), "{r:?}");
        let peer = receiver.accept().await.unwrap();
        let (_send, mut recv) = peer.accept_bi().await.unwrap();
        let err = recv.read_all(64 << 20).await.unwrap_err();
        assert!(
            err.to_string().contains(&RESET_STALLED.to_string()),
            "{err}"
        );

        // 16 KiB/s: each 16 KiB piece waits about a second for the limit,
        // past the 300 ms stall timeout; a reading peer gets it all.
        let sender = bind(EndpointConfig {
            upload_limit: Some(16 * 1024),
            ..loopback()
        })
        .await;
        let conn = sender.connect(addr(&receiver), None).await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.set_stall_timeout(Some(Duration::from_millis(300)));
        let payload = data(48 * 1024, 2);
        let start = Instant::now();
        send.write_chunk(bytes::Bytes::from(payload.clone()))
            .await
            .unwrap();
        send.finish().unwrap();
        let peer = receiver.accept().await.unwrap();
        let (_send, mut recv) = peer.accept_bi().await.unwrap();
        assert!(recv.read_all(1 << 20).await.unwrap() == payload);
        assert!(
            start.elapsed() >= Duration::from_secs(1),
            "the limit did not hold"
        );
    })
    .await
}

/// A stream counts its bytes where its owner asked, and the code a peer
/// reset it with can be read back from the read error, whichever way the
/// stream was read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_code_is_read_back_and_a_streams_bytes_are_counted() {
    timed(async {
        let sender = bind(loopback()).await;
        let receiver = bind(loopback()).await;
        let conn = sender.connect(addr(&receiver), None).await.unwrap();
        let peer = receiver.accept().await.unwrap();
        for (code, by_chunks) in [(RESET_BUSY, false), (RESET_STALLED, true)] {
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
            send.count_into(counter.clone());
            send.write_chunk(bytes::Bytes::from(data(100_000, 3)))
                .await
                .unwrap();
            send.write_all(&[7; 1000]).await.unwrap();
            assert_eq!(counter.load(Ordering::Relaxed), 101_000);
            let (_psend, mut recv) = peer.accept_bi().await.unwrap();
            // All of it arrives before the reset is sent.
            let mut got = vec![0; 101_000];
            recv.read_exact(&mut got).await.unwrap();
            send.reset(code).unwrap();
            let err = if by_chunks {
                let e = loop {
                    match recv.read_chunk(1 << 16).await {
                        Ok(Some(_)) => continue,
                        Ok(None) => panic!("a reset stream ended cleanly"),
                        Err(e) => break e,
                    }
                };
                std::io::Error::other(e)
            } else {
                let mut rest = Vec::new();
                recv.read_to_end(&mut rest).await.unwrap_err()
            };
            assert_eq!(reset_code(&err), Some(code), "{err}");
        }
        // A stream that ends cleanly, or an error of another kind, has none.
        assert_eq!(reset_code(&std::io::Error::other("no stream")), None);
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(b"x").await.unwrap();
        send.finish().unwrap();
        let (_psend, mut recv) = peer.accept_bi().await.unwrap();
        let mut all = Vec::new();
        recv.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"x");
    })
    .await
}
