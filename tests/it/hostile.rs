//! Hostile peers against a real node: a scripted peer built on
//! `shoal-transport` and `shoal-proto` misbehaves on purpose, while an
//! honest `shoal get` runs beside it. In each case the node stays up, keeps
//! serving the honest peer at a useful rate, keeps its memory under a fixed
//! bound, and refuses, drops or throttles the offender.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_node::wire::{read_frame, write_frame};
use shoal_proto::{GroupRanges, Limit, pb};
use shoal_store::Store;
use shoal_transport::{Connection, Endpoint, EndpointConfig, PeerId, SecretKey};
use tokio::io::AsyncWriteExt;

use crate::harness::{Dir, Serve, b3sum, data};

/// Most memory (peak RSS) a node serving one 8 MiB blob may use under
/// any of these attacks.
pub(crate) const MEMORY_BOUND_KIB: u64 = 128 * 1024;
/// Slowest acceptable honest download of the 8 MiB blob, while attacked.
const HONEST_LIMIT: Duration = Duration::from_secs(40);
const BLOB: usize = 8 * 1024 * 1024;

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `VmHWM` (peak resident memory) and `VmRSS` of a process, in KiB.
pub(crate) fn memory_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

pub(crate) async fn endpoint() -> Endpoint {
    let config = EndpointConfig {
        listen: vec!["127.0.0.1:0".parse().expect("addr")],
        ..EndpointConfig::default()
    };
    Endpoint::bind(SecretKey::generate(), config)
        .await
        .expect("binding a hostile endpoint")
}

async fn dial(ep: &Endpoint, node: &Target) -> Connection {
    ep.connect(node.addr, Some(node.id))
        .await
        .expect("dialing the node")
}

/// One request on its own stream; the answer, or None if the node reset
/// the stream or closed the connection.
pub(crate) async fn ask(conn: &Connection, req: &pb::Request) -> Option<pb::Response> {
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    write_frame(&mut send, req).await.ok()?;
    let _ = send.finish();
    read_frame(&mut recv, Limit::Response).await.ok()
}

/// Raw bytes on a fresh stream, then the answer.
async fn ask_raw(conn: &Connection, bytes: &[u8]) -> Option<pb::Response> {
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    send.write_all(bytes).await.ok()?;
    let _ = send.finish();
    read_frame(&mut recv, Limit::Response).await.ok()
}

fn code(r: &Option<pb::Response>) -> Option<pb::ErrorCode> {
    match r {
        Some(pb::Response {
            kind: Some(pb::response::Kind::Error(e)),
        }) => pb::ErrorCode::try_from(e.code).ok(),
        _ => None,
    }
}

fn request(kind: pb::request::Kind) -> pb::Request {
    pb::Request { kind: Some(kind) }
}

fn random_hash(i: u64) -> Bytes {
    blake3::hash(&i.to_le_bytes()).as_bytes().to_vec().into()
}

/// The node under attack: a `shoal serve` holding one 8 MiB blob.
pub(crate) struct Target {
    pub(crate) dir: Dir,
    pub(crate) serve: Serve,
    pub(crate) hash: String,
    pub(crate) id: PeerId,
    pub(crate) addr: SocketAddr,
}

pub(crate) fn target(size: usize) -> Target {
    let dir = Dir::new();
    let input = dir.path().join("blob.bin");
    std::fs::write(&input, data(size, 77)).expect("writing input");
    let serve = dir.serve(&[]);
    let line = dir.ok(&["add", input.to_str().expect("utf-8")]);
    let hash = line.split_whitespace().next().expect("hash").to_string();
    let id: PeerId = serve.peer_id.parse().expect("peer id");
    let addr: SocketAddr = serve.addrs[0].parse().expect("addr");
    Target {
        dir,
        serve,
        hash,
        id,
        addr,
    }
}

/// An honest download of the target's blob by a fresh `shoal get`; returns
/// how long it took.
fn honest_get(t: &Target) -> Duration {
    let d = Dir::new();
    let out = d.path().join("honest.bin");
    let start = Instant::now();
    let o = d.run(
        &[
            "get",
            &t.hash,
            "--peer",
            &t.serve.peer_arg(),
            "--no-mdns",
            "--no-dht",
            "-o",
            out.to_str().expect("utf-8"),
        ],
        HONEST_LIMIT,
    );
    assert!(
        o.status.success(),
        "honest get failed under attack: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(b3sum(&out), t.hash, "honest download is wrong");
    start.elapsed()
}

/// Whether the process is still running (not gone, not a zombie).
pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        !s.lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
    })
}

/// Runs `attack` against a fresh node while an honest peer downloads, then
/// checks the node is up, served the honest peer at a useful rate and
/// stayed under the memory bound. Returns the attack's result.
fn under_attack<R, F>(name: &str, attack: impl FnOnce(Arc<Target>) -> F) -> R
where
    F: Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    let t = Arc::new(target(BLOB));
    let rt = runtime();
    let fut = attack(t.clone());
    let task = rt.spawn(async move { tokio::time::timeout(Duration::from_secs(60), fut).await });
    // Let the attack get going before the honest peer arrives.
    std::thread::sleep(Duration::from_millis(300));
    let took = honest_get(&t);
    let r = rt
        .block_on(task)
        .expect("attack task")
        .unwrap_or_else(|_| panic!("{name}: the attack did not finish within 60 s"));
    let pid = t.serve.child.id();
    assert!(alive(pid), "{name}: the node died; log: {}", t.serve.log());
    // It still answers its own user, too.
    t.dir.ok(&["status"]);
    let (hwm, rss) = memory_kib(pid);
    eprintln!(
        "{name}: honest 8 MiB download took {took:.1?} under attack; node peak RSS {} MiB, now {} MiB",
        hwm / 1024,
        rss / 1024
    );
    assert!(
        took < Duration::from_secs(20),
        "{name}: honest download took {took:?}"
    );
    assert!(
        hwm < MEMORY_BOUND_KIB,
        "{name}: node peak memory {hwm} KiB over the bound"
    );
    drop(rt);
    r
}

#[test]
fn lying_length_prefixes_and_garbage_are_refused() {
    let (bad, total) = under_attack("lying prefixes", |t| async move {
        let ep = endpoint().await;
        let conn = dial(&ep, &t).await;
        let mut cases: Vec<Vec<u8>> = vec![
            // 4 GiB, 64 KiB + 1 (one over the request limit), 16 MiB.
            vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
            vec![0, 1, 0, 1],
            vec![1, 0, 0, 0],
            // Says 1000 bytes, sends 10 and ends the stream.
            [&[0, 0, 3, 0xe8][..], &[7; 10]].concat(),
            // Half a header.
            vec![0, 0],
        ];
        // A valid header followed by garbage, many ways.
        for i in 0..200u64 {
            let junk: Vec<u8> = (0..(i % 60 + 4))
                .map(|j| blake3::hash(&[i as u8, j as u8]).as_bytes()[0] | 0x80)
                .collect();
            let mut f = (junk.len() as u32).to_be_bytes().to_vec();
            f.extend(junk);
            cases.push(f);
        }
        // Streams that promise a frame and never send it hold their slot
        // only until the request timeout.
        let mut stalled = Vec::new();
        for _ in 0..32 {
            if let Ok((mut s, r)) = conn.open_bi().await {
                let _ = s.write_all(&[0, 0, 0xea, 0x60, 1]).await;
                stalled.push((s, r));
            }
        }
        let total = cases.len();
        let mut bad = 0;
        for c in &cases {
            let r = ask_raw(&conn, c).await;
            // Half a header is a stream that ended: no answer needed.
            if code(&r) == Some(pb::ErrorCode::BadRequest) || (c.len() < 4 && r.is_none()) {
                bad += 1;
            }
        }
        // The connection still works for a proper request.
        let who = ask(
            &conn,
            &request(pb::request::Kind::Who(pb::Who {
                hashes: vec![random_hash(1)],
            })),
        )
        .await;
        assert!(
            matches!(
                who,
                Some(pb::Response {
                    kind: Some(pb::response::Kind::Who(_))
                })
            ),
            "{who:?}"
        );
        drop(stalled);
        (bad, total)
    });
    assert_eq!(
        bad, total,
        "every lie and every garbage frame is answered BAD_REQUEST"
    );
}

#[test]
fn ten_thousand_requests_in_a_burst_are_throttled_not_fatal() {
    let answered = under_attack("10,000 requests", |t| async move {
        let ep = endpoint().await;
        let conn = dial(&ep, &t).await;
        let answered = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..10_000u64 {
            let conn = conn.clone();
            let answered = answered.clone();
            tasks.spawn(async move {
                let req = match i % 3 {
                    0 => pb::request::Kind::Who(pb::Who {
                        hashes: vec![random_hash(i)],
                    }),
                    1 => pb::request::Kind::Pex(pb::Pex {
                        hash: random_hash(i),
                    }),
                    _ => pb::request::Kind::Get(pb::Get {
                        hash: random_hash(i),
                        ranges: Some(GroupRanges::from_range(0..4).to_pb()),
                    }),
                };
                if ask(&conn, &request(req)).await.is_some() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        answered.load(Ordering::Relaxed)
    });
    // Throttled by the stream cap, but every request gets its answer.
    assert_eq!(answered, 10_000);
}

#[test]
fn thousands_of_unread_streams_hold_only_their_own_slots() {
    let opened = under_attack("unread streams", |t| async move {
        // Four identities, 1,000 streams each, every one asking for the
        // whole blob and never reading a byte of the answer.
        let hash = shoal_proto::hash_from_bytes(
            &data_encoding::HEXLOWER
                .decode(t.hash.as_bytes())
                .expect("hex"),
        )
        .expect("hash");
        let opened = Arc::new(AtomicUsize::new(0));
        let mut keep = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let ep = endpoint().await;
            let conn = dial(&ep, &t).await;
            keep.push((ep, conn.clone()));
            for _ in 0..1000 {
                let conn = conn.clone();
                let opened = opened.clone();
                tasks.spawn(async move {
                    let Ok((mut send, recv)) = conn.open_bi().await else {
                        return;
                    };
                    let get = request(pb::request::Kind::Get(pb::Get {
                        hash: hash.to_vec().into(),
                        ranges: None,
                    }));
                    if write_frame(&mut send, &get).await.is_ok() {
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    // Hold both halves, read nothing.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    drop((send, recv));
                });
            }
        }
        // Give them time to pile up while the honest peer downloads.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let n = opened.load(Ordering::Relaxed);
        tasks.abort_all();
        drop(keep);
        n
    });
    // The stream cap admits a bounded number per connection; the rest wait
    // in QUIC flow control, costing the node nothing.
    eprintln!("unread streams: {opened} of 4000 got past the stream cap");
    assert!(opened >= 4 * 32, "only {opened} streams opened");
}

#[test]
fn a_flood_of_have_subscriptions_is_capped() {
    let (accepted, busy) = under_attack("subscription flood", |t| async move {
        let ep = endpoint().await;
        let conn = dial(&ep, &t).await;
        // Over the per-request hash limit: refused outright.
        let hashes = (0..257).map(random_hash).collect();
        let too_many = ask(
            &conn,
            &request(pb::request::Kind::Subscribe(pb::Subscribe { hashes })),
        )
        .await;
        assert_eq!(code(&too_many), Some(pb::ErrorCode::BadRequest));
        let mut accepted = 0;
        let mut busy = 0;
        let mut keep = Vec::new();
        for i in 0..1000u64 {
            let Ok((mut send, mut recv)) = conn.open_bi().await else {
                break;
            };
            let hashes = (0..256).map(|j| random_hash(i * 1000 + j)).collect();
            let sub = request(pb::request::Kind::Subscribe(pb::Subscribe { hashes }));
            if write_frame(&mut send, &sub).await.is_err() {
                break;
            }
            match read_frame::<pb::Response, _>(&mut recv, Limit::Response).await {
                Ok(pb::Response {
                    kind: Some(pb::response::Kind::Subscribe(_)),
                }) => {
                    accepted += 1;
                    // Stay subscribed.
                    keep.push((send, recv));
                }
                r => {
                    if code(&r.ok()) == Some(pb::ErrorCode::Busy) {
                        busy += 1;
                    }
                }
            }
        }
        drop(keep);
        (accepted, busy)
    });
    assert!(accepted <= 32, "{accepted} subscriptions accepted");
    assert_eq!(accepted + busy, 1000, "every subscription answered");
}

#[test]
fn a_missing_hash_asked_for_in_a_loop_is_answered_cheaply() {
    let (asked, not_found) = under_attack("missing hash loop", |t| async move {
        let ep = endpoint().await;
        let conn = dial(&ep, &t).await;
        let missing = random_hash(424_242);
        let start = Instant::now();
        let (mut asked, mut not_found) = (0, 0);
        while start.elapsed() < Duration::from_secs(6) {
            let get = request(pb::request::Kind::Get(pb::Get {
                hash: missing.clone(),
                ranges: None,
            }));
            asked += 1;
            if code(&ask(&conn, &get).await) == Some(pb::ErrorCode::NotFound) {
                not_found += 1;
            }
        }
        (asked, not_found)
    });
    eprintln!("missing hash: asked {asked} times");
    assert_eq!(asked, not_found);
    assert!(asked > 100);
}

// ----------------------------------------------------------- hostile seeders

/// How a scripted seeder lies.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lie {
    /// Flips a byte in some groups of every stream it sends.
    WrongBytes,
    /// Says it has everything, then answers every get with not found.
    ClaimsWhatItHasNot,
    /// Answers gets honestly, but sends small blobs asked for in batches
    /// (`GetBlobs`) with a byte flipped.
    WrongSmallBlobs,
    /// Says it has everything, then never answers a get (holds the stream
    /// open, silent).
    NeverAnswers,
    /// Says it has everything, answers a get with a true header, then
    /// sends nothing (holds the stream open, silent).
    FallsSilentAfterTheHeader,
    /// Answers gets honestly, but sends the small blobs asked for in
    /// batches a byte every half second (each read is quick to come, the
    /// whole never).
    TricklesSmallBlobs,
    /// Serves [`absurd_blob`] besides its store: only the last group of a
    /// blob of [`ABSURD_SIZE`] bytes, with a size proof that verifies.
    AbsurdSize,
    /// Answers gets honestly, a byte every 2 s: never silent for the 10 s
    /// a read waits, never done.
    TricklesGets,
    /// Answers a get of more than two groups honestly up to half its
    /// stream, then falls silent (holds the stream open); smaller ones (the
    /// size proof) whole.
    FallsSilentHalfway,
    /// Claims its blobs are [`CLAIMED_SIZE`] bytes, and answers the get
    /// of their last group with a header naming that group and a stream
    /// whose size ([`ABSURD_SIZE`]) has no such group.
    UnprovenSize,
}

/// The size [`Lie::UnprovenSize`] claims for every blob it holds.
const CLAIMED_SIZE: u64 = 1 << 50;

/// The size [`Lie::AbsurdSize`] proves: just over the 1 TiB a download
/// accepts.
const ABSURD_SIZE: u64 = (1 << 41) + 777;

/// A blob of `size` bytes no one holds: its hash and the verified stream
/// of its last group (the 8-byte size, the parent pairs from the root
/// down, the group's bytes). Built from the bottom up with made-up
/// siblings, so it costs the same at any size: a size proof shows only
/// that someone chose the size, which is why a proven size must still be
/// bounded.
fn absurd_blob(size: u64) -> (blake3::Hash, Vec<u8>) {
    use bao_tree::iter::BaoChunk;
    use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};
    use blake3::hazmat::{
        ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
    };
    let tree = BaoTree::new(size, BlockSize::from_chunk_log(4));
    let groups = shoal_proto::group_count(size);
    let ranges = ChunkRanges::from(ChunkNum((groups - 1) * 16)..ChunkNum(groups * 16));
    // (is_root, right child on the path) per parent, top down; the leaf.
    let mut parents = Vec::new();
    let mut leaf = None;
    for c in tree.ranges_pre_order_chunks_iter_ref(&ranges, 0) {
        match c {
            BaoChunk::Parent {
                is_root,
                right,
                left,
                ..
            } => {
                assert!(right && !left, "the last group is on the right");
                parents.push(is_root);
            }
            BaoChunk::Leaf {
                start_chunk, size, ..
            } => leaf = Some((start_chunk, size)),
        }
    }
    let (start, len) = leaf.expect("a leaf");
    let data = vec![0x5a; len];
    let mut h = blake3::Hasher::new();
    h.set_input_offset(start.to_bytes());
    h.update(&data);
    let mut cv: ChainingValue = h.finalize_non_root();
    let mut pairs = Vec::new();
    let mut root = None;
    for (i, is_root) in parents.iter().enumerate().rev() {
        let left: ChainingValue = *blake3::hash(&i.to_le_bytes()).as_bytes();
        pairs.push([left, cv].concat());
        if *is_root {
            root = Some(merge_subtrees_root(&left, &cv, Mode::Hash));
        } else {
            cv = merge_subtrees_non_root(&left, &cv, Mode::Hash);
        }
    }
    let mut stream = size.to_le_bytes().to_vec();
    for p in pairs.iter().rev() {
        stream.extend_from_slice(p);
    }
    stream.extend_from_slice(&data);
    (root.expect("a root"), stream)
}

/// A scripted seeder: answers hello, who, subscribe and get for the blobs of
/// an in-memory store, lying as told. Runs until the runtime is dropped.
pub(crate) async fn scripted_seeder(store: Store, lie: Lie) -> (Endpoint, PeerId, SocketAddr) {
    let ep = endpoint().await;
    let id = ep.peer_id();
    let addr = ep.local_addrs()[0];
    let ep2 = ep.clone();
    tokio::spawn(async move {
        while let Some(conn) = ep2.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(seeder_stream(store.clone(), lie, send, recv));
                }
            });
        }
    });
    (ep, id, addr)
}

/// The true header of the answer to `g` from `store`, sent; then (if
/// `encode`) the ranges it names and their encoding, not sent yet. None if
/// the blob is not there or the peer went.
async fn honest_answer(
    store: &Store,
    g: &pb::Get,
    send: &mut shoal_transport::SendStream,
    encode: bool,
) -> Option<(GroupRanges, Vec<u8>)> {
    let hash = blake3::Hash::from_bytes(shoal_proto::hash_from_bytes(&g.hash).ok()?);
    let wanted = GroupRanges::from_opt_pb(g.ranges.as_ref()).unwrap_or_default();
    let (size, ranges) = store.available(&hash, &wanted)?;
    let header = pb::GetHeader {
        size,
        ranges: Some(ranges.to_pb()),
    };
    let resp = pb::Response {
        kind: Some(pb::response::Kind::Get(header)),
    };
    write_frame(send, &resp).await.ok()?;
    let mut stream = Vec::new();
    if encode {
        store.send_ranges(&hash, &ranges, &mut stream).await.ok()?;
    }
    Some((ranges, stream))
}

/// Holds the stream open, silent, until the asker gives up.
async fn hold_open(send: &mut shoal_transport::SendStream, recv: &mut shoal_transport::RecvStream) {
    let mut b = [0u8; 1];
    let _ = tokio::io::AsyncReadExt::read(recv, &mut b).await;
    let _ = send.stopped().await;
}

async fn seeder_stream(
    store: Store,
    lie: Lie,
    mut send: shoal_transport::SendStream,
    mut recv: shoal_transport::RecvStream,
) {
    use pb::request::Kind as Req;
    use pb::response::Kind as Resp;
    let Ok(req) = read_frame::<pb::Request, _>(&mut recv, Limit::Request).await else {
        return;
    };
    let resp = |k| pb::Response { kind: Some(k) };
    let hash_of = |b: &Bytes| {
        shoal_proto::hash_from_bytes(b)
            .ok()
            .map(blake3::Hash::from_bytes)
    };
    match req.kind {
        Some(Req::Hello(_)) => {
            let hello = pb::Hello {
                version: shoal_proto::PROTOCOL_VERSION,
                agent: "liar/1".into(),
                ..Default::default()
            };
            let _ = write_frame(&mut send, &resp(Resp::Hello(hello))).await;
        }
        Some(Req::Who(w)) => {
            let entries = w
                .hashes
                .iter()
                .map(|h| {
                    if matches!(lie, Lie::AbsurdSize)
                        && hash_of(h) == Some(absurd_blob(ABSURD_SIZE).0)
                    {
                        return pb::Availability {
                            hash: h.clone(),
                            size: ABSURD_SIZE,
                            have: Some(pb::availability::Have::Complete(true)),
                            kind: 0,
                        };
                    }
                    let info = hash_of(h).and_then(|h| store.info(&h));
                    let size = info.as_ref().map_or(0, |i| i.size);
                    pb::Availability {
                        hash: h.clone(),
                        size: if matches!(lie, Lie::UnprovenSize) {
                            CLAIMED_SIZE
                        } else {
                            size
                        },
                        have: Some(match info {
                            Some(_) => pb::availability::Have::Complete(true),
                            None => pb::availability::Have::Nothing(true),
                        }),
                        kind: 0,
                    }
                })
                .collect();
            let _ = write_frame(&mut send, &resp(Resp::Who(pb::WhoAnswer { entries }))).await;
        }
        Some(Req::Subscribe(s)) => {
            let _ = write_frame(&mut send, &resp(Resp::Subscribe(pb::SubscribeAccepted {}))).await;
            for h in &s.hashes {
                if let Some(info) = hash_of(h).and_then(|x| store.info(&x)) {
                    let up = pb::HaveUpdate {
                        hash: h.clone(),
                        size: if matches!(lie, Lie::UnprovenSize) {
                            CLAIMED_SIZE
                        } else {
                            info.size
                        },
                        added: None,
                        complete: true,
                        fetching: None,
                    };
                    let _ = write_frame(&mut send, &up).await;
                }
            }
            // Stay subscribed until the peer goes.
            let mut b = [0u8; 1];
            let _ = tokio::io::AsyncReadExt::read(&mut recv, &mut b).await;
        }
        Some(Req::Get(g)) if matches!(lie, Lie::AbsurdSize) => {
            let (hash, stream) = absurd_blob(ABSURD_SIZE);
            let groups = shoal_proto::group_count(ABSURD_SIZE);
            let last = GroupRanges::from_range(groups - 1..groups);
            let wanted = GroupRanges::from_opt_pb(g.ranges.as_ref()).unwrap_or_default();
            if hash_of(&g.hash) != Some(hash) || wanted.intersection(&last).is_empty() {
                let nf = shoal_proto::error_response(pb::ErrorCode::NotFound, "gone");
                let _ = write_frame(&mut send, &nf).await;
            } else {
                let header = pb::GetHeader {
                    size: ABSURD_SIZE,
                    ranges: Some(last.to_pb()),
                };
                if write_frame(&mut send, &resp(Resp::Get(header)))
                    .await
                    .is_ok()
                {
                    let _ = send.write_all(&stream).await;
                }
            }
        }
        Some(Req::Get(g)) if matches!(lie, Lie::UnprovenSize) => {
            // The groups asked for (the last of the claimed size), and a
            // stream that cannot hold them.
            let asked = GroupRanges::from_opt_pb(g.ranges.as_ref()).unwrap_or_default();
            let header = pb::GetHeader {
                size: CLAIMED_SIZE,
                ranges: Some(asked.to_pb()),
            };
            if write_frame(&mut send, &resp(Resp::Get(header)))
                .await
                .is_ok()
            {
                let _ = send.write_all(&ABSURD_SIZE.to_le_bytes()).await;
            }
        }
        Some(Req::Get(g)) if matches!(lie, Lie::TricklesGets) => {
            let Some((_, stream)) = honest_answer(&store, &g, &mut send, true).await else {
                return;
            };
            for b in stream {
                if send.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        Some(Req::Get(g)) if matches!(lie, Lie::FallsSilentAfterTheHeader) => {
            let _ = honest_answer(&store, &g, &mut send, false).await;
            hold_open(&mut send, &mut recv).await;
            return;
        }
        Some(Req::Get(g)) if matches!(lie, Lie::FallsSilentHalfway) => {
            let Some((ranges, stream)) = honest_answer(&store, &g, &mut send, true).await else {
                return;
            };
            if ranges.count() <= 2 {
                let _ = send.write_all(&stream).await;
                let _ = send.finish();
                return;
            }
            let _ = send.write_all(&stream[..stream.len() / 2]).await;
            hold_open(&mut send, &mut recv).await;
            return;
        }
        Some(Req::Get(_)) if matches!(lie, Lie::NeverAnswers) => {
            // Silent until the asker gives up and stops the stream.
            hold_open(&mut send, &mut recv).await;
            return;
        }
        Some(Req::Get(g)) => {
            let Some(hash) = hash_of(&g.hash) else { return };
            let wanted = GroupRanges::from_opt_pb(g.ranges.as_ref()).unwrap_or_default();
            let available = store.available(&hash, &wanted);
            let (Some((size, ranges)), Lie::WrongBytes | Lie::WrongSmallBlobs) = (available, lie)
            else {
                let nf = shoal_proto::error_response(pb::ErrorCode::NotFound, "gone");
                let _ = write_frame(&mut send, &nf).await;
                let _ = send.finish();
                return;
            };
            let header = pb::GetHeader {
                size,
                ranges: Some(ranges.to_pb()),
            };
            if write_frame(&mut send, &resp(Resp::Get(header)))
                .await
                .is_err()
            {
                return;
            }
            let mut stream = Vec::new();
            if store
                .send_ranges(&hash, &ranges, &mut stream)
                .await
                .is_err()
            {
                return;
            }
            if matches!(lie, Lie::WrongSmallBlobs) {
                let _ = send.write_all(&stream).await;
                let _ = send.finish();
                return;
            }
            // Wrong bytes in some groups: one flip every 40 KiB, and
            // always one in the middle.
            let mut at = 8 + 20 * 1024;
            while at < stream.len() {
                stream[at] ^= 0x55;
                at += 40 * 1024;
            }
            if stream.len() > 8 {
                let mid = 8 + (stream.len() - 8) / 2;
                stream[mid] ^= 0x0f;
            }
            let _ = send.write_all(&stream).await;
        }
        Some(Req::GetBlobs(g)) => {
            let trickles = matches!(lie, Lie::TricklesSmallBlobs);
            let mut blobs = Vec::new();
            let mut content = Vec::new();
            for h in &g.hashes {
                let data = hash_of(h)
                    .and_then(|h| {
                        store
                            .read_whole(&h, shoal_proto::limits::MAX_SMALL_BLOB)
                            .ok()
                    })
                    .flatten()
                    .filter(|_| !matches!(lie, Lie::ClaimsWhatItHasNot));
                blobs.push(pb::BlobPresence {
                    found: data.is_some(),
                    size: data.as_ref().map_or(0, |d| d.len() as u64),
                });
                if let Some(d) = data {
                    let mut d = d.to_vec();
                    // The other lies here: wrong bytes in every blob.
                    if let (Some(b), false) = (d.last_mut(), trickles) {
                        *b ^= 0x20;
                    }
                    content.extend_from_slice(&d);
                }
            }
            let header = resp(Resp::GetBlobs(pb::GetBlobsHeader { blobs }));
            if write_frame(&mut send, &header).await.is_err() {
                return;
            }
            if !trickles {
                let _ = send.write_all(&content).await;
            }
            for b in content.into_iter().filter(|_| trickles) {
                if send.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        _ => {}
    }
    let _ = send.finish();
}

/// `shoal get HASH --peer LIAR --peer HONEST`: completes, correct, and the
/// liar is named in the log and dropped.
fn get_past_a_liar(lie: Lie) {
    let (stderr, liar_id) = get_past(lie);
    let named: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(&liar_id.to_string()) && l.contains("dropped"))
        .collect();
    eprintln!("{lie:?}: {named:?}");
    assert!(
        !named.is_empty(),
        "the liar {liar_id} is not named as dropped: {stderr}"
    );
}

/// `shoal get HASH --peer LIAR --peer HONEST` completes, correct, within a
/// minute; returns its stderr and the liar's id.
fn get_past(lie: Lie) -> (String, PeerId) {
    let t = target(6 * 1024 * 1024 + 777);
    let rt = runtime();
    let store = Store::in_memory();
    let bytes = std::fs::read(t.dir.path().join("blob.bin")).expect("input");
    let h = store.import_bytes(&bytes, "blob.bin").expect("import");
    assert_eq!(h.to_hex().as_str(), t.hash);
    let (_ep, liar_id, liar_addr) = rt.block_on(scripted_seeder(store, lie));
    let d = Dir::new();
    let out = d.path().join("out.bin");
    let o = d.run(
        &[
            "get",
            &t.hash,
            "--peer",
            &format!("{liar_id}@{liar_addr}"),
            "--peer",
            &t.serve.peer_arg(),
            "--no-mdns",
            "--no-dht",
            "-o",
            out.to_str().expect("utf-8"),
        ],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "get failed: {stderr}");
    assert_eq!(b3sum(&out), t.hash, "wrong output");
    drop(rt);
    (stderr, liar_id)
}

#[test]
fn a_lying_seeder_is_named_and_dropped_and_the_download_is_correct() {
    get_past_a_liar(Lie::WrongBytes);
}

#[test]
fn a_seeder_claiming_what_it_has_not_is_dropped() {
    get_past_a_liar(Lie::ClaimsWhatItHasNot);
}

/// A peer that claims everything and never answers holds the download up
/// by at most its timeouts: it is redialled (it may only have been
/// slow), but the honest peer serves meanwhile. The get finishes, correct,
/// within the minute `get_past` allows (a probe that waited on the liar
/// each time it was redialled would not).
#[test]
fn a_seeder_that_never_answers_does_not_hold_the_download() {
    get_past(Lie::NeverAnswers);
}

/// The addresses of an in-process honest seeder and of a scripted liar,
/// each named by its key.
fn honest_and_liar(
    honest: &shoal_node::Node,
    liar_id: PeerId,
    liar_addr: SocketAddr,
) -> Vec<shoal_node::PeerAddr> {
    vec![
        shoal_node::PeerAddr {
            id: Some(honest.peer_id()),
            addr: honest.addrs()[0],
        },
        shoal_node::PeerAddr {
            id: Some(liar_id),
            addr: liar_addr,
        },
    ]
}

/// A scripted seeder lying as told, holding `data`: its hash, and the
/// seeder's endpoint, id and address.
async fn liar_with(data: &[u8], lie: Lie) -> (blake3::Hash, Endpoint, PeerId, SocketAddr) {
    let store = Store::in_memory();
    let hash = store.import_bytes(data, "blob").expect("import");
    let (ep, id, addr) = scripted_seeder(store, lie).await;
    (hash, ep, id, addr)
}

/// `node` fetches `hash` from `peers` into its store, in a task.
fn fetch_into_store(
    node: &shoal_node::Node,
    hash: blake3::Hash,
    peers: Vec<shoal_node::PeerAddr>,
) -> tokio::task::JoinHandle<Result<(), shoal_node::NodeError>> {
    let req = shoal_node::FetchRequest {
        hash,
        kind: None,
        peers,
        out: shoal_node::FetchOutput::Store,
    };
    let node = node.clone();
    tokio::spawn(async move { node.fetch(req, None).await.map(|_| ()) })
}

/// `fetch` ends within `limit` (else: `what`), and `node`'s store then
/// holds `data`.
async fn fetched_within(
    fetch: tokio::task::JoinHandle<Result<(), shoal_node::NodeError>>,
    node: &shoal_node::Node,
    data: &[u8],
    limit: Duration,
    what: &str,
) {
    tokio::time::timeout(limit, fetch)
        .await
        .expect(what)
        .expect("task")
        .expect("the download failed");
    let hash = blake3::hash(data);
    assert!(
        node.store().read_all(&hash).expect("read") == data,
        "wrong bytes"
    );
}

/// A peer that answers the size proof's get with its header and then
/// falls silent held the whole download up until its stall timeout: the
/// proof waited on it with no timeout, and nothing else runs before the
/// size is proven. Four downloaders at once, each given the liar and an
/// honest seeder: each picks one of the two to prove the size with (its
/// choice; with the old code each that picked the liar hung), and every
/// one finishes, correct, well within its 60 s stall timeout.
#[test]
fn a_seeder_falling_silent_after_its_header_does_not_hold_the_download() {
    let rt = runtime();
    rt.block_on(async {
        let data = data(2 * 1024 * 1024 + 99, 31);
        let (hash, _ep, liar_id, liar_addr) =
            liar_with(&data, Lie::FallsSilentAfterTheHeader).await;
        let node = |stall| shoal_node::NodeConfig {
            listen: vec!["127.0.0.1:0".parse().expect("addr")],
            stall_timeout: stall,
            ..shoal_node::NodeConfig::default()
        };
        let honest = shoal_node::Node::spawn(node(Duration::from_secs(60)))
            .await
            .expect("honest seeder");
        honest.add_bytes(data.clone(), "blob").await.expect("add");
        let peers = honest_and_liar(&honest, liar_id, liar_addr);
        let mut fetches = Vec::new();
        for _ in 0..4 {
            let d = shoal_node::Node::spawn(node(Duration::from_secs(60)))
                .await
                .expect("downloader");
            let fetch = fetch_into_store(&d, hash, peers.clone());
            fetches.push((d, fetch));
        }
        for (d, f) in fetches {
            let limit = Duration::from_secs(45);
            fetched_within(f, &d, &data, limit, "a download waited on the silent peer").await;
            d.shutdown().await;
        }
        honest.shutdown().await;
    });
}

/// A liar holding a blob, up now, and the address and key of an honest
/// seeder that is to come up later: the peers a download is given.
struct LiarFirst {
    hash: blake3::Hash,
    /// The liar's endpoint, kept open.
    liar: Endpoint,
    peers: Vec<shoal_node::PeerAddr>,
    honest_addr: SocketAddr,
    honest_key: SecretKey,
}

async fn liar_first(data: &[u8], lie: Lie) -> LiarFirst {
    let (hash, liar, liar_id, liar_addr) = liar_with(data, lie).await;
    let free = std::net::UdpSocket::bind("127.0.0.1:0").expect("a free port");
    let honest_addr = free.local_addr().expect("addr");
    drop(free);
    let honest_key = SecretKey::generate();
    let peers = vec![
        shoal_node::PeerAddr {
            id: Some(liar_id),
            addr: liar_addr,
        },
        shoal_node::PeerAddr {
            id: Some(honest_key.public()),
            addr: honest_addr,
        },
    ];
    LiarFirst {
        hash,
        liar,
        peers,
        honest_addr,
        honest_key,
    }
}

/// A node on `listen` whose downloads wait 60 s without progress.
fn slow_stall(listen: SocketAddr) -> shoal_node::NodeConfig {
    shoal_node::NodeConfig {
        listen: vec![listen],
        stall_timeout: Duration::from_secs(60),
        ..shoal_node::NodeConfig::default()
    }
}

/// A peer that answers the size proof a byte every 2 s was never silent
/// for the 10 s a read waits: it held the proof, and with it the download,
/// until the stall timeout, with an honest seeder connected. The proof has
/// a deadline now (20 s). The liar is the only peer up when the download
/// starts, so it is the one asked for the proof; the honest seeder comes
/// up a second later at an address the download was given.
#[test]
fn a_seeder_trickling_the_size_proof_does_not_hold_the_download() {
    let rt = runtime();
    rt.block_on(async {
        let data = data(2 * 1024 * 1024 + 99, 33);
        let LiarFirst {
            hash,
            liar: _liar,
            peers,
            honest_addr,
            honest_key,
        } = liar_first(&data, Lie::TricklesGets).await;
        let config = slow_stall;
        let d = shoal_node::Node::spawn(config("127.0.0.1:0".parse().expect("addr")))
            .await
            .expect("downloader");
        let fetch = fetch_into_store(&d, hash, peers);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let honest =
            shoal_node::Node::spawn_with(config(honest_addr), Store::in_memory(), honest_key)
                .await
                .expect("honest seeder");
        honest.add_bytes(data.clone(), "blob").await.expect("add");
        let limit = Duration::from_secs(50);
        fetched_within(
            fetch,
            &d,
            &data,
            limit,
            "the download waited on the trickling peer",
        )
        .await;
        d.shutdown().await;
        honest.shutdown().await;
    });
}

/// A request that stalled part way and was given up (its deadline, 10 s
/// without progress) left the groups it had verified unknown to the
/// download's scheduler: they were asked for again, and downloaded twice.
/// The liar, the only peer up at first, sends half of each stream and falls
/// silent; once its requests are given up, an honest seeder comes up, and
/// the download must not fetch again what the liar delivered.
#[test]
fn groups_a_stalled_request_verified_are_not_fetched_again() {
    let rt = runtime();
    rt.block_on(async {
        let data = data(4 * 1024 * 1024, 35);
        let LiarFirst {
            hash,
            liar: _liar,
            peers,
            honest_addr,
            honest_key,
        } = liar_first(&data, Lie::FallsSilentHalfway).await;
        let config = slow_stall;
        let d = shoal_node::Node::spawn(config("127.0.0.1:0".parse().expect("addr")))
            .await
            .expect("downloader");
        let req = shoal_node::FetchRequest {
            hash,
            kind: None,
            peers,
            out: shoal_node::FetchOutput::Store,
        };
        let fetch = {
            let d = d.clone();
            tokio::spawn(async move { d.fetch(req, None).await })
        };
        // The liar's requests are given up 10 s after their last byte;
        // then what they verified is written.
        let verified = || {
            d.store()
                .info(&hash)
                .map_or(0, |i| i.verified.count() * shoal_proto::GROUP_SIZE)
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while verified() < 256 * 1024 {
            assert!(
                Instant::now() < deadline,
                "the liar delivered {} bytes",
                verified()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // (Its requests all end together: one more tick for the last.)
        tokio::time::sleep(Duration::from_secs(1)).await;
        let from_liar = verified();
        let honest =
            shoal_node::Node::spawn_with(config(honest_addr), Store::in_memory(), honest_key)
                .await
                .expect("honest seeder");
        honest.add_bytes(data.clone(), "blob").await.expect("add");
        let report = tokio::time::timeout(Duration::from_secs(60), fetch)
            .await
            .expect("the download never finished")
            .expect("task")
            .expect("the download failed");
        assert_eq!(d.store().read_all(&hash).expect("read"), data);
        let size = data.len() as u64;
        // (Parents and QUIC's own bytes add about 1%.)
        assert!(
            report.received < size + from_liar / 2,
            "received {} for {size} bytes, {from_liar} of them from the liar",
            report.received
        );
        d.shutdown().await;
        honest.shutdown().await;
    });
}

/// The only peer offering the blob sends corrupt data and is dropped: the
/// download said "no peer reached holds it: check the hash or ticket", the
/// wrong lead (one did; it was dropped). It says so now.
#[test]
fn a_download_whose_every_holder_was_dropped_says_so() {
    let rt = runtime();
    rt.block_on(async {
        let data = data(1024 * 1024, 36);
        let (hash, _ep, liar_id, liar_addr) = liar_with(&data, Lie::WrongBytes).await;
        let d = shoal_node::Node::spawn(shoal_node::NodeConfig {
            listen: vec!["127.0.0.1:0".parse().expect("addr")],
            ..shoal_node::NodeConfig::default()
        })
        .await
        .expect("downloader");
        let peers = vec![shoal_node::PeerAddr {
            id: Some(liar_id),
            addr: liar_addr,
        }];
        let err = tokio::time::timeout(Duration::from_secs(60), fetch_into_store(&d, hash, peers))
            .await
            .expect("the download never ended")
            .expect("task")
            .expect_err("a corrupt download succeeded");
        assert!(
            matches!(err, shoal_node::NodeError::AllDropped(h, 1) if h == hash),
            "{err}"
        );
        assert!(err.to_string().contains("was dropped"), "{err}");
        d.shutdown().await;
    });
}

/// Peer exchange told downloaders of short-lived `get` nodes long gone:
/// each of their addresses took a dial slot until it timed out, and a
/// reachable holder waited behind them (13 s in a review). A node now
/// forgets the addresses of a peer that shut down (until it says hello
/// again); a peer still running is passed on.
#[test]
fn peer_exchange_passes_on_peers_still_there_not_gets_that_left() {
    let t = target(300_000);
    let out = |d: &Dir| {
        d.path()
            .join("out.bin")
            .to_str()
            .expect("utf-8")
            .to_string()
    };
    // A node that fetched it and runs on.
    let stays = Dir::new();
    let _serve = stays.serve(&[]);
    stays.ok(&[
        "get",
        &t.hash,
        "--peer",
        &t.serve.peer_arg(),
        "-o",
        &out(&stays),
    ]);
    // A get with a node of its own, gone when done.
    let left = Dir::new();
    left.ok(&[
        "get",
        &t.hash,
        "--peer",
        &t.serve.peer_arg(),
        "--no-mdns",
        "--no-dht",
        "-o",
        &out(&left),
    ]);
    let ids = |d: &Dir| -> PeerId { d.ok(&["id"]).trim().parse().expect("peer id") };
    let (stays_id, left_id) = (ids(&stays), ids(&left));
    let rt = runtime();
    rt.block_on(async {
        let ep = endpoint().await;
        let conn = dial(&ep, &t).await;
        let hash = blake3::Hash::from_hex(&t.hash).expect("hash");
        let req = request(pb::request::Kind::Pex(pb::Pex {
            hash: hash.as_bytes().to_vec().into(),
        }));
        // The get's goodbye may still be on its way: asked until it is
        // heard, for at most 5 s.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let told: Vec<PeerId> = match ask(&conn, &req).await {
                Some(pb::Response {
                    kind: Some(pb::response::Kind::Pex(a)),
                }) => a
                    .peers
                    .iter()
                    .map(|p| PeerId::from_bytes(&p.id).expect("an id"))
                    .collect(),
                other => panic!("no peer exchange answer: {other:?}"),
            };
            assert!(told.contains(&stays_id), "{told:?}");
            if !told.contains(&left_id) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the get that left is passed on: {told:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// A peer can prove any size for a hash it made up (see [`absurd_blob`]):
/// a download refuses a proven size over 1 TiB, with a clear error, and
/// so does the next try, which found the size already proven in the store
/// and sized its tables by it (the memory of an 8 TiB blob's, unchecked).
#[test]
fn a_proven_absurd_size_is_refused_also_on_the_next_try() {
    let rt = runtime();
    let (_ep, liar_id, liar_addr) =
        rt.block_on(scripted_seeder(Store::in_memory(), Lie::AbsurdSize));
    let hash = absurd_blob(ABSURD_SIZE).0.to_hex().to_string();
    let d = Dir::new();
    let out = d.path().join("out.bin");
    for attempt in ["first", "second"] {
        let o = d.run(
            &[
                "get",
                &hash,
                "--peer",
                &format!("{liar_id}@{liar_addr}"),
                "--no-mdns",
                "--no-dht",
                "-o",
                out.to_str().expect("utf-8"),
            ],
            Duration::from_secs(30),
        );
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{attempt} try: {stderr}");
        assert!(
            stderr.contains(&format!(
                "{ABSURD_SIZE} bytes, more than the 1 TiB a download accepts"
            )),
            "{attempt} try: {stderr}"
        );
        assert!(!out.exists(), "{attempt} try wrote an output");
    }
}

/// A peer proving a size it only claimed: its stream's size has no room
/// for the group it says it sends. The download took that as proof, kept
/// the stream's size (over 1 TiB) and failed as "too large"; so did every
/// later try of the hash, before it asked anyone. Now the peer is dropped
/// and the store keeps no size from it: a download from an honest seeder
/// afterwards, by the same node, finishes, correct.
#[test]
fn a_size_a_peer_only_claimed_does_not_stay_in_the_store() {
    let rt = runtime();
    rt.block_on(async {
        let data = data(3 * shoal_proto::GROUP_SIZE as usize + 5, 32);
        let (hash, _ep, liar_id, liar_addr) = liar_with(&data, Lie::UnprovenSize).await;
        let node = || shoal_node::NodeConfig {
            listen: vec!["127.0.0.1:0".parse().expect("addr")],
            stall_timeout: Duration::from_secs(5),
            ..shoal_node::NodeConfig::default()
        };
        let honest = shoal_node::Node::spawn(node())
            .await
            .expect("honest seeder");
        honest.add_bytes(data.clone(), "blob").await.expect("add");
        let d = shoal_node::Node::spawn(node()).await.expect("downloader");
        let liar = honest_and_liar(&honest, liar_id, liar_addr)[1];
        let first = tokio::time::timeout(
            Duration::from_secs(30),
            fetch_into_store(&d, hash, vec![liar]),
        )
        .await
        .expect("the fetch from the liar alone ended")
        .expect("task");
        let err = first.expect_err("only the liar was asked").to_string();
        assert!(!err.contains("1 TiB"), "a claimed size was refused: {err}");
        let second = honest_and_liar(&honest, liar_id, liar_addr)[0];
        let fetch = fetch_into_store(&d, hash, vec![second]);
        let limit = Duration::from_secs(30);
        fetched_within(
            fetch,
            &d,
            &data,
            limit,
            "the fetch from the honest seeder ended",
        )
        .await;
        d.shutdown().await;
        honest.shutdown().await;
    });
}

/// A provider that sends a batch of small blobs a byte at a time, each
/// byte well within the read timeout, held its share of the collection,
/// and with it the whole fetch, for as long as it liked: a batch now has a
/// deadline by its size, past which the provider is dropped and the batch
/// goes to the others. Downloaders given the trickler and an honest
/// seeder finish, correct, in well under the minute one of its batches
/// would take.
#[test]
fn a_provider_trickling_small_blobs_does_not_hold_the_collection() {
    let rt = runtime();
    rt.block_on(async {
        let src = tempfile::tempdir().expect("tempdir");
        for i in 0..300u64 {
            let len = 50 + (i as usize * 37) % 400;
            std::fs::write(src.path().join(format!("f{i:03}")), data(len, i)).expect("write");
        }
        let store = Store::in_memory();
        let hash = store
            .import_dir(src.path(), shoal_store::ImportMode::Copy)
            .expect("import");
        let (_ep, liar_id, liar_addr) = scripted_seeder(store, Lie::TricklesSmallBlobs).await;
        let node = || shoal_node::NodeConfig {
            listen: vec!["127.0.0.1:0".parse().expect("addr")],
            ..shoal_node::NodeConfig::default()
        };
        // The honest seeder is slow, so that the trickler is sure to be
        // a provider of the manifest and of batches.
        let honest = shoal_node::Node::spawn(shoal_node::NodeConfig {
            upload_limit: Some(20 << 10),
            ..node()
        })
        .await
        .expect("honest seeder");
        let (h, _) = honest
            .add_path(src.path(), shoal_store::ImportMode::Copy)
            .await
            .expect("add");
        assert_eq!(h, hash);
        let peers = honest_and_liar(&honest, liar_id, liar_addr);
        let outs = tempfile::tempdir().expect("tempdir");
        let mut fetches = Vec::new();
        for i in 0..2 {
            let d = shoal_node::Node::spawn(node()).await.expect("downloader");
            let out = outs.path().join(format!("out{i}"));
            let req = shoal_node::FetchRequest {
                hash,
                kind: Some(shoal_store::BlobKind::Collection),
                peers: peers.clone(),
                out: shoal_node::FetchOutput::Path(out.clone()),
            };
            let d2 = d.clone();
            fetches.push((
                d,
                out,
                tokio::spawn(async move { d2.fetch(req, None).await }),
            ));
        }
        for (d, out, f) in fetches {
            tokio::time::timeout(Duration::from_secs(45), f)
                .await
                .expect("the fetch waited on the trickling provider")
                .expect("task")
                .expect("the fetch failed");
            for i in [0u64, 123, 299] {
                let name = format!("f{i:03}");
                assert!(
                    std::fs::read(out.join(&name)).expect("member")
                        == std::fs::read(src.path().join(&name)).expect("input"),
                    "{name} differs"
                );
            }
            d.shutdown().await;
        }
        honest.shutdown().await;
    });
}

/// A collection of many small files, fetched in batches from two
/// providers, one of which flips a byte in every small blob it sends in a
/// batch (and answers ordinary gets honestly): the output is complete and
/// correct, and the liar is named and dropped.
#[test]
fn a_batch_provider_that_lies_is_dropped_and_the_collection_is_correct() {
    let seeder = Dir::new();
    let src = seeder.path().join("tree");
    std::fs::create_dir_all(src.join("sub/deeper")).expect("mkdir");
    for i in 0..1100u64 {
        let dir = match i % 3 {
            0 => src.clone(),
            1 => src.join("sub"),
            _ => src.join("sub/deeper"),
        };
        let len = 1 + (i as usize * 37) % 600;
        std::fs::write(dir.join(format!("f{i:04}.txt")), data(len, i)).expect("write");
    }
    // One member too large for batches, fetched the usual way.
    std::fs::write(src.join("big.bin"), data(200 * 1024, 9)).expect("write");
    // The honest seeder is slow, so the liar (fast) is sure to be a
    // provider of the manifest and of batches.
    let _serve = seeder.serve(&["--max-upload", "200KiB/s"]);
    let line = seeder.ok(&["add", src.to_str().expect("utf-8")]);
    let hash = line.split_whitespace().next().expect("hash").to_string();
    let rt = runtime();
    let store = Store::in_memory();
    let h = store
        .import_dir(&src, shoal_store::ImportMode::Copy)
        .expect("import");
    assert_eq!(h.to_hex().as_str(), hash);
    let (_ep, liar_id, liar_addr) = rt.block_on(scripted_seeder(store, Lie::WrongSmallBlobs));
    // By ticket: it says the hash is a collection (the scripted liar
    // claims every blob is raw; a bare hash would take the first claim).
    // By ticket (it says the hash is a collection), and by bare hash (the
    // scripted liar claims every blob is a file, the honest seeder that
    // this one is a collection: the verified content decides).
    let ticket = seeder.ok(&["ticket", &hash]).trim().to_string();
    for (what, src_arg) in [("ticket", ticket.as_str()), ("bare hash", hash.as_str())] {
        let d = Dir::new();
        let out = d.path().join("out");
        let honest = _serve.peer_arg();
        let mut args = vec!["get", src_arg, "--peer"];
        let liar = format!("{liar_id}@{liar_addr}");
        args.push(&liar);
        if what == "bare hash" {
            args.extend(["--peer", honest.as_str()]);
        }
        args.extend(["--no-mdns", "--no-dht", "-o", out.to_str().expect("utf-8")]);
        let o = d.run(&args, Duration::from_secs(90));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "get by {what} failed: {stderr}");
        let mut compared = 0;
        for rel in ["", "sub", "sub/deeper"] {
            for e in std::fs::read_dir(src.join(rel)).expect("read_dir") {
                let e = e.expect("entry");
                if e.file_type().expect("type").is_dir() {
                    continue;
                }
                let path = out.join(rel).join(e.file_name());
                let got = std::fs::read(&path).unwrap_or_else(|err| {
                    panic!("by {what}: {}: {err}; log: {stderr}", path.display())
                });
                assert!(
                    got == std::fs::read(e.path()).expect("input"),
                    "by {what}: {:?} differs",
                    e.path()
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 1101, "by {what}");
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&liar_id.to_string()) && l.contains("dropped")),
            "by {what}: the liar {liar_id} is not named as dropped: {stderr}"
        );
        eprintln!(
            "by {what}: kind corrected after the fact: {}",
            stderr.contains("claimed the wrong kind")
        );
    }
    drop(rt);
}
