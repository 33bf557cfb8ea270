//! Answering peers: hello, "who has it?", get, have subscriptions and peer
//! exchange, from the store.
//!
//! Every request arrives on its own stream. Per connection, the number of
//! gets served at once and the number of open subscriptions are capped, so
//! one greedy peer waits its turn while the others are served; node-wide,
//! when every answer slot is taken, the slowest answer gives its slot up to
//! a request that waits (`choke.rs`); the global
//! upload limit (in the transport's stream wrappers) is shared between all
//! of them in small pieces.

use std::sync::Arc;
use std::time::Duration;

use shoal_proto::{
    GroupRanges, Limit, PROTOCOL_VERSION, error_response, hash_from_bytes, limits, pb,
};
use shoal_store::{Hash, Presence, StoreEvent};
use shoal_transport::{Connection, PeerId, RecvStream, SendStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::choke::Answer;
use crate::node::{Inner, dialable, lock};
use crate::wire::{WireError, read_frame, write_frame};

/// Gets served at once per connection; further ones wait.
const MAX_GETS_PER_CONN: usize = 4;
/// Gets and `GetBlobs` served at once by the node, over all connections,
/// by default (`NodeConfig::max_answers`); further ones wait. A `Get`
/// answer holds a blocking thread (the encoder) and up to ~4 MiB while it
/// is sent, a `GetBlobs` answer up to 4 MiB: 128 connections at 4 each
/// would reach tokio's 512 blocking threads and 2 GiB. With
/// `NodeConfig::send_stall_timeout`, a peer that reads nothing holds its
/// slots only that long; one that reads a trickle gives its slot up to a
/// request that waits (`choke.rs`).
pub(crate) const MAX_ANSWERS: usize = 128;
/// Open have subscriptions per connection; further ones are refused.
const MAX_SUBS_PER_CONN: usize = 32;
/// Requests handled at once per connection (all kinds); further streams
/// wait in the transport's stream cap.
const MAX_REQUESTS_PER_CONN: usize = 64;
/// Time a peer gets to send its request frame.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

struct ConnLimits {
    gets: Semaphore,
    subs: Semaphore,
    requests: Arc<Semaphore>,
}

/// Serves the streams a peer opens on `conn` until it closes.
pub(crate) async fn handle_connection(node: Arc<Inner>, conn: Connection) {
    let limits = Arc::new(ConnLimits {
        gets: Semaphore::new(MAX_GETS_PER_CONN),
        subs: Semaphore::new(MAX_SUBS_PER_CONN),
        requests: Arc::new(Semaphore::new(MAX_REQUESTS_PER_CONN)),
    });
    let peer = conn.peer_id();
    loop {
        // Take a request slot before accepting: a peer that opens thousands
        // of streams finds them queued in QUIC flow control, not in memory.
        let Ok(permit) = limits.requests.clone().acquire_owned().await else {
            break;
        };
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(%peer, "connection ended: {e}");
                break;
            }
        };
        let node = node.clone();
        let limits = limits.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            handle_stream(node, conn, limits, send, recv).await;
            drop(permit);
        });
    }
}

async fn handle_stream(
    node: Arc<Inner>,
    conn: Connection,
    limits: Arc<ConnLimits>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let peer = conn.peer_id();
    let req: pb::Request =
        match tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut recv, Limit::Request)).await {
            Ok(Ok(r)) => r,
            Ok(Err(WireError::Closed)) => return,
            Ok(Err(e)) => {
                debug!(%peer, "bad request: {e}");
                let _ = reply(
                    &mut send,
                    &error_response(pb::ErrorCode::BadRequest, e.to_string()),
                )
                .await;
                return;
            }
            Err(_) => {
                let _ = send.reset(1);
                return;
            }
        };
    let res = match req.kind {
        None => {
            reply(
                &mut send,
                &error_response(pb::ErrorCode::BadRequest, "unknown request type"),
            )
            .await
        }
        Some(pb::request::Kind::Hello(h)) => on_hello(&node, &conn, &mut send, h).await,
        Some(pb::request::Kind::Who(w)) => on_who(&node, peer, &mut send, w).await,
        Some(pb::request::Kind::Get(g)) => {
            let Ok(_permit) = limits.gets.acquire().await else {
                return;
            };
            let Some(answer) = answer_slot(&node, &mut send).await else {
                return;
            };
            start_answer(&node, &mut send, &answer);
            let sent = tokio::select! {
                r = on_get(&node, peer, &mut send, g) => Some(r),
                () = answer.choked() => None,
            };
            sent.unwrap_or_else(|| choked(peer, &mut send))
        }
        Some(pb::request::Kind::Subscribe(s)) => match limits.subs.try_acquire() {
            Ok(_permit) => on_subscribe(&node, peer, &mut send, &mut recv, s).await,
            Err(_) => {
                reply(
                    &mut send,
                    &error_response(pb::ErrorCode::Busy, "too many subscriptions"),
                )
                .await
            }
        },
        Some(pb::request::Kind::GetBlobs(g)) => {
            let Ok(_permit) = limits.gets.acquire().await else {
                return;
            };
            let Some(answer) = answer_slot(&node, &mut send).await else {
                return;
            };
            start_answer(&node, &mut send, &answer);
            let sent = tokio::select! {
                r = on_get_blobs(&node, peer, &mut send, g) => Some(r),
                () = answer.choked() => None,
            };
            sent.unwrap_or_else(|| choked(peer, &mut send))
        }
        Some(pb::request::Kind::Pex(p)) => on_pex(&node, peer, &mut send, p).await,
    };
    match res {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(e) => debug!(%peer, "request failed: {e}"),
    }
}

/// One of the node's answer slots (see `choke.rs`), unless the peer gives
/// the request up while it waits (its stream stopped: it timed out, or got
/// the groups elsewhere): a request nobody waits for any more must not
/// choke an answer someone still reads.
async fn answer_slot<'a>(node: &'a Inner, send: &mut SendStream) -> Option<Answer<'a>> {
    tokio::select! {
        a = node.answers.acquire() => a,
        _ = send.stopped() => None,
    }
}

/// An answer in its slot is reset once the peer takes none of its bytes
/// for the send stall timeout, and its bytes are counted for choking.
fn start_answer(node: &Inner, send: &mut SendStream, answer: &Answer<'_>) {
    send.set_stall_timeout(Some(node.config.send_stall_timeout));
    send.count_into(answer.counter());
}

/// An answer choked for a request that waited (see `choke.rs`): its peer
/// sees the stream reset as busy, keeps what it verified, and may ask again.
fn choked(peer: PeerId, send: &mut SendStream) -> Result<(), WireError> {
    let _ = send.reset(shoal_transport::RESET_BUSY);
    debug!(%peer, "answer choked: another request waited for its slot");
    Err(WireError::Io(std::io::Error::other("choked")))
}

async fn reply(send: &mut SendStream, resp: &pb::Response) -> Result<(), WireError> {
    write_frame(send, resp).await
}

/// [`reply`] for an answer's header, within the send stall timeout: a
/// peer that grants the stream no room would hold it (and its answer
/// slot) for good; the bulk that follows is watched by the stream itself.
async fn reply_within(
    node: &Inner,
    send: &mut SendStream,
    resp: &pb::Response,
) -> Result<(), WireError> {
    let limit = node.config.send_stall_timeout;
    match tokio::time::timeout(limit, reply(send, resp)).await {
        Ok(r) => r,
        Err(_) => {
            let _ = send.reset(shoal_transport::RESET_STALLED);
            Err(WireError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the peer took no data for {limit:?}"),
            )))
        }
    }
}

fn bad(msg: impl Into<String>) -> pb::Response {
    error_response(pb::ErrorCode::BadRequest, msg)
}

fn parse_hash(b: &[u8]) -> Option<Hash> {
    hash_from_bytes(b).ok().map(Hash::from_bytes)
}

async fn on_hello(
    node: &Arc<Inner>,
    conn: &Connection,
    send: &mut SendStream,
    h: pb::Hello,
) -> Result<(), WireError> {
    if h.version != PROTOCOL_VERSION {
        let msg = format!(
            "this node speaks shoal protocol {PROTOCOL_VERSION}, not {}",
            h.version
        );
        reply(
            send,
            &error_response(pb::ErrorCode::UnsupportedVersion, msg),
        )
        .await?;
        let _ = send.finish();
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.close(2, b"unsupported version");
        return Ok(());
    }
    node.record_hello(conn, &h);
    let mine = pb::Hello {
        version: PROTOCOL_VERSION,
        agent: concat!("shoal/", env!("CARGO_PKG_VERSION")).to_string(),
        listen_addrs: dialable(&node.endpoint.local_addrs())
            .iter()
            .take(limits::MAX_ADDRS)
            .map(|a| a.to_string())
            .collect(),
        capabilities: vec!["have".into(), "pex".into()],
        instance: node.instance.to_vec().into(),
    };
    reply(
        send,
        &pb::Response {
            kind: Some(pb::response::Kind::Hello(mine)),
        },
    )
    .await
}

/// `peer` asked about `hash`: peer exchange may tell others of it. Hashes
/// the store has none of are kept apart (`PeerBook::saw`): a peer asking
/// about many made-up hashes pushed the real swarms out of the book.
fn saw(node: &Inner, hash: Hash, peer: PeerId) {
    let held = node.store.info(&hash).is_some();
    lock(&node.book).saw(hash, peer, held);
}

/// What we hold of `hash`, as the wire says it.
pub(crate) fn availability(node: &Inner, hash: &Hash) -> pb::Availability {
    use pb::availability::Have;
    let mut a = pb::Availability {
        hash: hash.as_bytes().to_vec().into(),
        size: 0,
        have: Some(Have::Nothing(true)),
        kind: 0,
    };
    if let Some(info) = node.store.info(hash) {
        a.size = info.size;
        a.kind = crate::control::kind_to_pb(info.kind);
        // Claim only what a get would be answered with now: not a blob
        // marked corrupt, nor one whose file in place changed (a peer told
        // "complete" and then answered "not here" would drop us as a liar).
        if !node.store.can_serve(hash) {
            recheck(node, hash, &info);
            return a;
        }
        if info.complete {
            a.have = Some(Have::Complete(true));
        } else if !info.verified.is_empty() {
            a.have = Some(Have::Ranges(info.verified.to_pb_claim()));
        }
    }
    a
}

/// A peer asked for a blob we hold but do not serve. If that is because
/// its file in place changed since it was added (a new modification time,
/// size or inode), hash the file again in the background, as a BitTorrent
/// client rechecks a torrent whose files were touched: if only touched, it
/// is served again (and subscribers told, by the store's `Added` event);
/// if its bytes changed, the store marks it corrupt and the user is told
/// to add the new content. Once per change: a blob being re-hashed, or
/// marked corrupt, is not re-hashed again however many peers ask.
fn recheck(node: &Inner, hash: &Hash, info: &shoal_store::BlobInfo) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if info.corrupt || !node.store.source_changed(hash) || !lock(&node.rechecking).insert(*hash) {
        return;
    }
    info!(
        "{hash} ({}): its file changed since it was added; hashing it again before serving it",
        info.name
    );
    let (store, rechecking, slot) = (
        node.store.clone(),
        node.rechecking.clone(),
        node.recheck_slot.clone(),
    );
    let (hash, name) = (*hash, info.name.clone());
    rt.spawn(async move {
        // The semaphore is never closed: acquiring fails only if it were.
        let Ok(_permit) = slot.acquire_owned().await else {
            return;
        };
        let outcome = tokio::task::spawn_blocking(move || store.verify(&hash)).await;
        let failed = match outcome {
            Ok(Ok(true)) => {
                info!("{hash} ({name}): its bytes are unchanged; serving it again");
                false
            }
            Ok(Ok(false)) => {
                // Marked corrupt by the store: not re-hashed again.
                warn!(
                    "not serving {hash} ({name}): its file no longer holds the bytes that were \
                     added (changed or removed); `shoal add` shares the new content"
                );
                false
            }
            Ok(Err(e)) => {
                warn!("not serving {hash} ({name}): could not hash its file again: {e}; `shoal verify {hash}` tries again");
                true
            }
            Err(e) => {
                warn!("not serving {hash} ({name}): hashing its file again failed: {e}; `shoal verify {hash}` tries again");
                true
            }
        };
        // After an error (unreadable file, say) the blob stays in the set:
        // re-hashed again only when the user asks (`shoal verify`), not at
        // every peer's question, each with the same warning.
        if !failed {
            lock(&rechecking).remove(&hash);
        }
    });
}

async fn on_who(
    node: &Arc<Inner>,
    peer: PeerId,
    send: &mut SendStream,
    w: pb::Who,
) -> Result<(), WireError> {
    if w.hashes.len() > limits::MAX_HASHES_PER_REQUEST {
        return reply(send, &bad("too many hashes")).await;
    }
    let mut entries = Vec::with_capacity(w.hashes.len());
    for h in &w.hashes {
        let Some(hash) = parse_hash(h) else {
            return reply(send, &bad("hash must be 32 bytes")).await;
        };
        // The asker wants it: it will hold parts soon, a peer for others.
        saw(node, hash, peer);
        entries.push(availability(node, &hash));
    }
    reply(
        send,
        &pb::Response {
            kind: Some(pb::response::Kind::Who(pb::WhoAnswer { entries })),
        },
    )
    .await
}

async fn on_get(
    node: &Arc<Inner>,
    peer: PeerId,
    send: &mut SendStream,
    g: pb::Get,
) -> Result<(), WireError> {
    let Some(hash) = parse_hash(&g.hash) else {
        return reply(send, &bad("hash must be 32 bytes")).await;
    };
    let wanted = match GroupRanges::from_opt_pb(g.ranges.as_ref()) {
        Ok(r) => r,
        Err(e) => return reply(send, &bad(e.to_string())).await,
    };
    saw(node, hash, peer);
    let Some((size, ranges)) = node.store.available(&hash, &wanted) else {
        return reply(send, &error_response(pb::ErrorCode::NotFound, "not here")).await;
    };
    let header = pb::GetHeader {
        size,
        ranges: Some(ranges.to_pb()),
    };
    reply_within(
        node,
        send,
        &pb::Response {
            kind: Some(pb::response::Kind::Get(header)),
        },
    )
    .await?;
    if ranges.is_empty() {
        return Ok(());
    }
    let mut sink = QuicSink {
        send,
        write_failed: false,
    };
    match node.store.send_ranges_to(&hash, &ranges, &mut sink).await {
        Ok(bytes) => {
            lock(&node.book).count_upload(peer, bytes);
            Ok(())
        }
        Err(e) if sink.write_failed => {
            // The peer stopped the answer (it got those groups elsewhere,
            // as in end-game) or the connection went: nothing is wrong here.
            debug!(%peer, hash = %hash, "answer not finished: {e}");
            Ok(())
        }
        Err(e) => {
            // Corrupt or vanished data: stop the stream so that the peer
            // sees an error, never unverified bytes.
            warn!(%peer, hash = %hash, "could not serve: {e}");
            let _ = send.reset(2);
            Ok(())
        }
    }
}

/// Small blobs whole: read (and check) every one asked for that is here,
/// complete and small, up to `MAX_GET_BLOBS_BYTES` in all, then send the
/// header and the contents back to back.
async fn on_get_blobs(
    node: &Arc<Inner>,
    peer: PeerId,
    send: &mut SendStream,
    g: pb::GetBlobs,
) -> Result<(), WireError> {
    if g.hashes.len() > limits::MAX_HASHES_PER_REQUEST {
        return reply(send, &bad("too many hashes")).await;
    }
    let mut hashes = Vec::with_capacity(g.hashes.len());
    for h in &g.hashes {
        let Some(hash) = parse_hash(h) else {
            return reply(send, &bad("hash must be 32 bytes")).await;
        };
        hashes.push(hash);
    }
    let store = node.store.clone();
    let blobs = tokio::task::spawn_blocking(move || {
        let mut budget = limits::MAX_GET_BLOBS_BYTES;
        let wanted: Vec<bool> = store
            .presence(&hashes)
            .into_iter()
            .map(|p| {
                let size = match p {
                    Presence::Complete(s) if s <= limits::MAX_SMALL_BLOB.min(budget) => Some(s),
                    _ => None,
                };
                if let Some(s) = size {
                    budget -= s;
                }
                size.is_some()
            })
            .collect();
        let to_read: Vec<Hash> = hashes
            .iter()
            .zip(&wanted)
            .filter(|(_, w)| **w)
            .map(|(h, _)| *h)
            .collect();
        // Read, then checked all together (wide hashing).
        let mut read = store
            .read_whole_many(&to_read, limits::MAX_SMALL_BLOB)
            .into_iter();
        hashes
            .iter()
            .zip(wanted)
            .map(|(h, w)| match w.then(|| read.next()).flatten()? {
                Ok(b) => b,
                Err(e) => {
                    warn!(hash = %h, "could not serve: {e}");
                    None
                }
            })
            .collect::<Vec<Option<bytes::Bytes>>>()
    })
    .await
    .map_err(|e| WireError::Io(std::io::Error::other(e.to_string())))?;
    let header = pb::GetBlobsHeader {
        blobs: blobs
            .iter()
            .map(|b| pb::BlobPresence {
                found: b.is_some(),
                size: b.as_ref().map_or(0, |b| b.len() as u64),
            })
            .collect(),
    };
    reply_within(
        node,
        send,
        &pb::Response {
            kind: Some(pb::response::Kind::GetBlobs(header)),
        },
    )
    .await?;
    let mut chunks: Vec<bytes::Bytes> = blobs.into_iter().flatten().collect();
    let bytes: u64 = chunks.iter().map(|b| b.len() as u64).sum();
    send.write_all_chunks(&mut chunks)
        .await
        .map_err(|e| WireError::Io(std::io::Error::other(e.to_string())))?;
    if bytes > 0 {
        lock(&node.book).count_upload(peer, bytes);
    }
    Ok(())
}

/// The answer stream of a `Get`, as the store's sink: the encoder's buffers
/// go to QUIC as they are, without a copy. Remembers whether a write failed
/// (the peer's doing), as opposed to the store's reads.
struct QuicSink<'a> {
    send: &'a mut SendStream,
    write_failed: bool,
}

impl shoal_store::ChunkSink for QuicSink<'_> {
    async fn put(&mut self, chunk: bytes::Bytes) -> std::io::Result<()> {
        let r = self.send.write_chunk(chunk).await;
        self.write_failed |= r.is_err();
        r.map_err(std::io::Error::other)
    }
}

async fn on_subscribe(
    node: &Arc<Inner>,
    peer: PeerId,
    send: &mut SendStream,
    recv: &mut RecvStream,
    s: pb::Subscribe,
) -> Result<(), WireError> {
    if s.hashes.len() > limits::MAX_HASHES_PER_REQUEST {
        return reply(send, &bad("too many hashes")).await;
    }
    let mut hashes = Vec::with_capacity(s.hashes.len());
    for h in &s.hashes {
        let Some(hash) = parse_hash(h) else {
            return reply(send, &bad("hash must be 32 bytes")).await;
        };
        saw(node, hash, peer);
        hashes.push(hash);
    }
    // Subscribe to the store before reading the current state, so that no
    // group verified in between is missed.
    let mut events = node.store.subscribe();
    let mut fetching = node.fetching.subscribe();
    reply(
        send,
        &pb::Response {
            kind: Some(pb::response::Kind::Subscribe(pb::SubscribeAccepted {})),
        },
    )
    .await?;
    for hash in &hashes {
        send_full_state(node, send, hash).await?;
    }
    let mut closed = [0u8; 1];
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(StoreEvent::Verified { hash, groups, size }) if hashes.contains(&hash) => {
                    let up = pb::HaveUpdate { hash: hash.as_bytes().to_vec().into(), size, added: Some(groups.to_pb_claim()), complete: false, fetching: None };
                    write_frame(send, &up).await?;
                }
                Ok(StoreEvent::Complete { hash } | StoreEvent::Added { hash }) if hashes.contains(&hash) => send_full_state(node, send, &hash).await?,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    for hash in &hashes {
                        send_full_state(node, send, hash).await?;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
            f = fetching.recv() => match f {
                Ok((hash, groups)) if hashes.contains(&hash) => {
                    let up = pb::HaveUpdate { hash: hash.as_bytes().to_vec().into(), size: 0, added: None, complete: false, fetching: Some(groups.to_pb_claim()) };
                    write_frame(send, &up).await?;
                }
                // Hints: one missed, or none to come, changes nothing.
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
            // The subscriber closes its side (or the stream dies) to stop.
            r = tokio::io::AsyncReadExt::read(recv, &mut closed) => {
                if !matches!(r, Ok(n) if n > 0) { return Ok(()) }
            }
            () = node.cancel.cancelled() => return Ok(()),
        }
    }
}

async fn send_full_state(
    node: &Inner,
    send: &mut SendStream,
    hash: &Hash,
) -> Result<(), WireError> {
    let Some(info) = node.store.info(hash) else {
        return Ok(());
    };
    if !node.store.can_serve(hash) {
        recheck(node, hash, &info);
        return Ok(());
    }
    let up = pb::HaveUpdate {
        hash: hash.as_bytes().to_vec().into(),
        size: info.size,
        added: (!info.complete).then(|| info.verified.to_pb_claim()),
        complete: info.complete,
        fetching: None,
    };
    write_frame(send, &up).await
}

async fn on_pex(
    node: &Arc<Inner>,
    peer: PeerId,
    send: &mut SendStream,
    p: pb::Pex,
) -> Result<(), WireError> {
    let Some(hash) = parse_hash(&p.hash) else {
        return reply(send, &bad("hash must be 32 bytes")).await;
    };
    // Peers connected now first (most likely still there), then the
    // others, most recently seen first; the asker dials in this order.
    let mut peers = lock(&node.book).peers_for(&hash, &peer, usize::MAX);
    let me = node.endpoint.peer_id();
    peers.retain(|(id, _)| *id != me);
    peers.sort_by_key(|(id, _)| node.endpoint.connection(id).is_none_or(|c| c.is_closed()));
    let peers = peers
        .into_iter()
        .take(limits::MAX_PEX_PEERS)
        .map(|(id, addrs)| pb::PeerInfo {
            id: id.as_bytes().to_vec().into(),
            addrs: addrs
                .iter()
                .take(limits::MAX_ADDRS)
                .map(|a| a.to_string())
                .collect(),
        })
        .collect();
    reply(
        send,
        &pb::Response {
            kind: Some(pb::response::Kind::Pex(pb::PexAnswer { peers })),
        },
    )
    .await
}
