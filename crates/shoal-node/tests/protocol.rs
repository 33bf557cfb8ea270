//! The peer protocol against a real node, in process: unknown requests,
//! wrong versions and malformed frames get errors, and the connection
//! stays usable.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::time::Duration;

use shoal_node::wire::{read_frame, write_frame};
use shoal_node::{FetchOutput, FetchRequest, Node, NodeConfig};
use shoal_proto::{GroupRanges, Limit, pb};
use shoal_transport::{Connection, Endpoint, EndpointConfig, SecretKey};
use tokio::io::AsyncWriteExt;

async fn node_and_client() -> (Node, Endpoint, Connection) {
    node_and_client_with(NodeConfig::default()).await
}

async fn node_and_client_with(config: NodeConfig) -> (Node, Endpoint, Connection) {
    let config = NodeConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        ..config
    };
    let node = Node::spawn(config).await.unwrap();
    let (ep, conn) = client(&node, SecretKey::generate()).await;
    (node, ep, conn)
}

/// An endpoint of `key` on loopback, connected to `node`.
async fn client(node: &Node, key: SecretKey) -> (Endpoint, Connection) {
    let ep = Endpoint::bind(
        key,
        EndpointConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let conn = ep
        .connect(node.addrs()[0], Some(node.peer_id()))
        .await
        .unwrap();
    (ep, conn)
}

/// Sends raw frame bytes on a new stream and reads one response.
async fn ask_raw(conn: &Connection, bytes: &[u8]) -> pb::Response {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        read_frame(&mut recv, Limit::Response),
    )
    .await
    .unwrap()
    .unwrap()
}

async fn ask(conn: &Connection, req: pb::Request) -> pb::Response {
    ask_raw(conn, &shoal_proto::frame::encode(&req)).await
}

fn error_code(r: &pb::Response) -> Option<pb::ErrorCode> {
    match &r.kind {
        Some(pb::response::Kind::Error(e)) => pb::ErrorCode::try_from(e.code).ok(),
        _ => None,
    }
}

/// Subscribes to the have updates of `hash`; the accepted answer is read.
/// The send side is returned to be held: closing or dropping it ends the
/// subscription.
async fn subscribe(
    conn: &Connection,
    hash: &blake3::Hash,
) -> (shoal_transport::SendStream, shoal_transport::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let sub = pb::Request {
        kind: Some(pb::request::Kind::Subscribe(pb::Subscribe {
            hashes: vec![hash.as_bytes().to_vec().into()],
        })),
    };
    write_frame(&mut send, &sub).await.unwrap();
    let r: pb::Response = read_frame(&mut recv, Limit::Response).await.unwrap();
    assert!(
        matches!(r.kind, Some(pb::response::Kind::Subscribe(_))),
        "{r:?}"
    );
    (send, recv)
}

#[tokio::test]
async fn unknown_and_malformed_requests_get_errors_and_the_connection_stays() {
    let (node, _ep, conn) = node_and_client().await;
    // A request kind from a future version (field 99).
    let r = ask_raw(&conn, &[0, 0, 0, 3, 0x9a, 0x06, 0x00]).await;
    assert_eq!(error_code(&r), Some(pb::ErrorCode::BadRequest));
    // Garbage that is not protobuf.
    let r = ask_raw(&conn, &[0, 0, 0, 2, 0xff, 0xff]).await;
    assert_eq!(error_code(&r), Some(pb::ErrorCode::BadRequest));
    // A length prefix over the request limit is refused from the header.
    let r = ask_raw(&conn, &[0x7f, 0xff, 0xff, 0xff]).await;
    assert_eq!(error_code(&r), Some(pb::ErrorCode::BadRequest));
    // Bad hashes and bad ranges.
    let r = ask(
        &conn,
        pb::Request {
            kind: Some(pb::request::Kind::Get(pb::Get {
                hash: vec![1, 2, 3].into(),
                ranges: None,
            })),
        },
    )
    .await;
    assert_eq!(error_code(&r), Some(pb::ErrorCode::BadRequest));
    let bad_ranges = pb::GroupRanges { deltas: vec![0, 0] };
    let r = ask(
        &conn,
        pb::Request {
            kind: Some(pb::request::Kind::Get(pb::Get {
                hash: vec![0; 32].into(),
                ranges: Some(bad_ranges),
            })),
        },
    )
    .await;
    assert_eq!(error_code(&r), Some(pb::ErrorCode::BadRequest));
    // Something it does not have.
    let ranges = Some(GroupRanges::from_range(0..1).to_pb());
    let r = ask(
        &conn,
        pb::Request {
            kind: Some(pb::request::Kind::Get(pb::Get {
                hash: vec![0; 32].into(),
                ranges,
            })),
        },
    )
    .await;
    assert_eq!(error_code(&r), Some(pb::ErrorCode::NotFound));
    // After all that, the connection still answers a proper question.
    let hash = node.add_bytes(vec![7u8; 40_000], "x").await.unwrap();
    let who = pb::Who {
        hashes: vec![hash.as_bytes().to_vec().into()],
    };
    let r = ask(
        &conn,
        pb::Request {
            kind: Some(pb::request::Kind::Who(who)),
        },
    )
    .await;
    let Some(pb::response::Kind::Who(w)) = r.kind else {
        panic!("no who answer: {r:?}")
    };
    assert_eq!(w.entries[0].size, 40_000);
    assert_eq!(
        w.entries[0].have,
        Some(pb::availability::Have::Complete(true))
    );
    assert!(!conn.is_closed());
    node.shutdown().await;
}

#[tokio::test]
async fn an_incompatible_version_gets_a_clear_error() {
    let (node, _ep, conn) = node_and_client().await;
    let hello = pb::Hello {
        version: 2,
        agent: "future".into(),
        listen_addrs: vec![],
        capabilities: vec![],
        instance: Default::default(),
    };
    let r = ask(
        &conn,
        pb::Request {
            kind: Some(pb::request::Kind::Hello(hello)),
        },
    )
    .await;
    assert_eq!(error_code(&r), Some(pb::ErrorCode::UnsupportedVersion));
    let Some(pb::response::Kind::Error(e)) = r.kind else {
        unreachable!()
    };
    assert!(e.message.contains("protocol 1"), "{}", e.message);
    // And version 1 is answered with the node's own hello.
    let (node2, _ep2, conn2) = node_and_client().await;
    let hello = pb::Hello {
        version: 1,
        agent: "test".into(),
        listen_addrs: vec![],
        capabilities: vec![],
        instance: Default::default(),
    };
    let r = ask(
        &conn2,
        pb::Request {
            kind: Some(pb::request::Kind::Hello(hello)),
        },
    )
    .await;
    let Some(pb::response::Kind::Hello(h)) = r.kind else {
        panic!("{r:?}")
    };
    assert_eq!(h.version, 1);
    assert!(!h.listen_addrs.is_empty());
    node.shutdown().await;
    node2.shutdown().await;
}

#[tokio::test]
async fn a_subscription_reports_groups_as_they_verify() {
    // Seeder S has a blob; node D downloads it while our test client is
    // subscribed to D: the client must see D's groups arrive.
    let cfg = || NodeConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        ..NodeConfig::default()
    };
    let s = Node::spawn(cfg()).await.unwrap();
    let d = Node::spawn(cfg()).await.unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let hash = s.add_bytes(data, "x").await.unwrap();
    let ep = Endpoint::bind(
        SecretKey::generate(),
        EndpointConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let conn = ep.connect(d.addrs()[0], Some(d.peer_id())).await.unwrap();
    let (_send, mut recv) = subscribe(&conn, &hash).await;
    let ticket = s.ticket(&hash).unwrap();
    let fetch = d.fetch(FetchRequest::from_ticket(&ticket, FetchOutput::Store), None);
    let watch = async {
        let mut seen = GroupRanges::new();
        loop {
            let up: pb::HaveUpdate = read_frame(&mut recv, Limit::HaveUpdate).await.unwrap();
            seen = seen.union(&GroupRanges::from_opt_pb(up.added.as_ref()).unwrap());
            if up.complete {
                return seen;
            }
        }
    };
    let (fetched, seen) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(fetch, watch)
    })
    .await
    .unwrap();
    fetched.unwrap();
    // Groups were announced before completion, not only at the end.
    assert!(!seen.is_empty(), "no have update before completion");
    s.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn get_blobs_sends_small_complete_blobs_whole_and_marks_the_rest() {
    let (node, _ep, conn) = node_and_client().await;
    let small: Vec<Vec<u8>> = (0..3u8)
        .map(|i| vec![i; 1000 * (usize::from(i) + 1)])
        .collect();
    let mut hashes = Vec::new();
    for (i, d) in small.iter().enumerate() {
        hashes.push(node.add_bytes(d.clone(), &format!("s{i}")).await.unwrap());
    }
    // Too large to be sent whole.
    let big = node
        .add_bytes(vec![7u8; 64 * 1024 + 1], "big")
        .await
        .unwrap();
    let unknown = blake3::hash(b"nobody has this");
    let asked = [hashes[0], big, unknown, hashes[1], hashes[2]];
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let req = pb::Request {
        kind: Some(pb::request::Kind::GetBlobs(pb::GetBlobs {
            hashes: asked.iter().map(|h| h.as_bytes().to_vec().into()).collect(),
        })),
    };
    write_frame(&mut send, &req).await.unwrap();
    send.finish().unwrap();
    let resp: pb::Response = read_frame(&mut recv, Limit::Response).await.unwrap();
    let Some(pb::response::Kind::GetBlobs(h)) = resp.kind else {
        panic!("unexpected answer {resp:?}");
    };
    let found: Vec<(bool, u64)> = h.blobs.iter().map(|b| (b.found, b.size)).collect();
    assert_eq!(
        found,
        vec![
            (true, 1000),
            (false, 0),
            (false, 0),
            (true, 2000),
            (true, 3000)
        ]
    );
    let rest = recv.read_all(1 << 20).await.unwrap();
    let expected: Vec<u8> = [&small[0], &small[1], &small[2]]
        .iter()
        .flat_map(|d| d.iter().copied())
        .collect();
    assert!(rest == expected, "content differs");
    // More than 256 hashes is refused.
    let r = ask(
        &conn,
        pb::Request {
            kind: Some(pb::request::Kind::GetBlobs(pb::GetBlobs {
                hashes: (0..257u32)
                    .map(|i| blake3::hash(&i.to_le_bytes()).as_bytes().to_vec().into())
                    .collect(),
            })),
        },
    )
    .await;
    assert_eq!(error_code(&r), Some(pb::ErrorCode::BadRequest));
    // A malformed hash too.
    let r = ask(
        &conn,
        pb::Request {
            kind: Some(pb::request::Kind::GetBlobs(pb::GetBlobs {
                hashes: vec![vec![1u8; 5].into()],
            })),
        },
    )
    .await;
    assert_eq!(error_code(&r), Some(pb::ErrorCode::BadRequest));
    node.shutdown().await;
}

/// What a Who answer says `hash` is held as.
async fn who_says(conn: &Connection, hash: &blake3::Hash) -> pb::availability::Have {
    let r = ask(
        conn,
        pb::Request {
            kind: Some(pb::request::Kind::Who(pb::Who {
                hashes: vec![hash.as_bytes().to_vec().into()],
            })),
        },
    )
    .await;
    let Some(pb::response::Kind::Who(w)) = r.kind else {
        panic!("unexpected answer {r:?}");
    };
    w.entries[0].have.clone().unwrap()
}

/// Asks `Who` until the answer is `want`, for at most 10 s.
async fn who_until(conn: &Connection, hash: &blake3::Hash, want: &pb::availability::Have) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let have = who_says(conn, hash).await;
        if have == *want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {have:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn touch(path: &std::path::Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(secs))
        .unwrap();
}

#[tokio::test]
async fn a_touched_file_in_place_is_hashed_again_and_served_again_an_edited_one_is_not() {
    use pb::availability::Have;
    let (node, _ep, conn) = node_and_client().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let (hash, _) = node
        .add_path(&path, shoal_node::ImportMode::InPlace)
        .await
        .unwrap();
    assert_eq!(who_says(&conn, &hash).await, Have::Complete(true));

    // Touched (same bytes, a new modification time): not served as it is;
    // a get is answered "not here", and the first `Who` with nothing,
    // since the node cannot vouch for the file before hashing it again.
    touch(&path, 5);
    assert!(node.store().source_changed(&hash));
    assert!(!node.store().can_serve(&hash));
    let get = ask(
        &conn,
        pb::Request {
            kind: Some(pb::request::Kind::Get(pb::Get {
                hash: hash.as_bytes().to_vec().into(),
                ranges: Some(GroupRanges::from_range(0..1).to_pb()),
            })),
        },
    )
    .await;
    assert_eq!(error_code(&get), Some(pb::ErrorCode::NotFound));
    assert_eq!(who_says(&conn, &hash).await, Have::Nothing(true));
    // That question made the node hash the file again: its bytes are
    // unchanged, so it is claimed and served again, by itself.
    who_until(&conn, &hash, &Have::Complete(true)).await;
    assert!(!node.store().source_changed(&hash));
    assert!(node.store().can_serve(&hash));

    // Touched again: a subscriber is told nothing at first, then, once the
    // re-hash its subscription started finds the bytes unchanged, that the
    // blob is complete.
    touch(&path, 10);
    let (_send, mut recv) = subscribe(&conn, &hash).await;
    let update = tokio::time::timeout(
        Duration::from_secs(10),
        read_frame::<pb::HaveUpdate, _>(&mut recv, Limit::HaveUpdate),
    )
    .await
    .expect("the subscriber was never told")
    .unwrap();
    assert!(update.complete, "{update:?}");
    assert!(node.store().can_serve(&hash));

    // Its content changed: the re-hash a question starts marks it corrupt,
    // and it is not claimed again.
    let mut changed = data.clone();
    changed[100] ^= 1;
    std::fs::write(&path, &changed).unwrap();
    touch(&path, 15);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !node.store().info(&hash).unwrap().corrupt {
        // Asked again each time: the re-hash the subscription started may
        // still be finishing when the file changes.
        assert_eq!(who_says(&conn, &hash).await, Have::Nothing(true));
        assert!(
            tokio::time::Instant::now() < deadline,
            "never marked corrupt"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(who_says(&conn, &hash).await, Have::Nothing(true));
    assert!(!node.store().can_serve(&hash));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_seeder_holding_more_runs_than_the_wire_takes_still_says_what_it_has() {
    // Every other group of a 4097-group blob: 2049 runs, one more than a
    // range set on the wire may carry (a real download holds whole blocks
    // of 8 groups: a 512 MiB blob half held in every other block). Its Who
    // answer and its subscription's state must still decode, as a subset
    // of what it holds that keeps the last group (a downloader proves the
    // size with it); they did not, and a downloader took it for a peer
    // with nothing.
    let groups = 2 * 2048 + 1;
    let data: Vec<u8> = (0..groups * shoal_proto::GROUP_SIZE)
        .map(|i| (i % 251) as u8 ^ (i >> 14) as u8)
        .collect();
    let src = shoal_store::Store::in_memory();
    let hash = src.import_bytes(&data, "x").unwrap();
    let held = GroupRanges::from_groups((0..groups).step_by(2));
    assert_eq!(held.runs().len(), 2049);
    let (_, have) = src.available(&hash, &held).unwrap();
    let mut bytes = Vec::new();
    src.send_ranges(&hash, &have, &mut bytes).await.unwrap();
    let (p, ep, conn) = node_and_client().await;
    p.store()
        .begin_download(&hash, shoal_store::BlobKind::Raw, None, true)
        .unwrap();
    let got = p
        .store()
        .receive_ranges(&hash, &held, &bytes[..])
        .await
        .unwrap();
    assert!(got == held, "the partial seeder did not take its groups");
    p.store().end_download(&hash);

    let pb::availability::Have::Ranges(r) = who_says(&conn, &hash).await else {
        panic!("the partial seeder did not answer with ranges");
    };
    let claimed = GroupRanges::from_pb(&r).expect("its Who answer decodes");
    assert_eq!(claimed.runs().len(), 2048);
    assert!(
        claimed.intersection(&held) == claimed,
        "claims more than it holds"
    );
    assert!(
        claimed.contains(groups - 1),
        "the last group is not claimed"
    );
    let (_send, mut recv) = subscribe(&conn, &hash).await;
    let up: pb::HaveUpdate = read_frame(&mut recv, Limit::HaveUpdate).await.unwrap();
    let state = GroupRanges::from_opt_pb(up.added.as_ref()).expect("its state decodes");
    assert!(state == claimed, "the subscription says another set");

    p.shutdown().await;
    drop(ep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_hashes_asked_of_do_not_push_a_swarm_out_of_peer_exchange() {
    // The node records who asked about a hash, for peer exchange; a peer
    // asking about 4096 made-up hashes pushed out every real one (the
    // book kept 4096 in one order). Hashes the store has none of are now
    // kept apart, and push out only each other.
    let (node, _ep, b) = node_and_client().await;
    let hash = node.add_bytes(vec![7u8; 50_000], "x").await.unwrap();
    let client = || async {
        Endpoint::bind(
            SecretKey::generate(),
            EndpointConfig {
                listen: vec!["127.0.0.1:0".parse().unwrap()],
                ..Default::default()
            },
        )
        .await
        .unwrap()
    };
    let (ep_a, ep_x) = (client().await, client().await);
    let a = ep_a
        .connect(node.addrs()[0], Some(node.peer_id()))
        .await
        .unwrap();
    who_says(&a, &hash).await;
    let x = ep_x
        .connect(node.addrs()[0], Some(node.peer_id()))
        .await
        .unwrap();
    for round in 0..17u64 {
        let hashes = (0..256u64)
            .map(|i| {
                blake3::hash(&(round * 256 + i).to_le_bytes())
                    .as_bytes()
                    .to_vec()
                    .into()
            })
            .collect();
        let r = ask(
            &x,
            pb::Request {
                kind: Some(pb::request::Kind::Who(pb::Who { hashes })),
            },
        )
        .await;
        assert!(matches!(r.kind, Some(pb::response::Kind::Who(_))), "{r:?}");
    }
    let r = ask(
        &b,
        pb::Request {
            kind: Some(pb::request::Kind::Pex(pb::Pex {
                hash: hash.as_bytes().to_vec().into(),
            })),
        },
    )
    .await;
    let Some(pb::response::Kind::Pex(p)) = r.kind else {
        panic!("unexpected answer {r:?}");
    };
    let a_id = ep_a.peer_id();
    assert!(
        p.peers.iter().any(|i| i.id.as_ref() == a_id.as_bytes()),
        "the peer that asked about {hash} is gone from peer exchange: {p:?}"
    );
    node.shutdown().await;
}

/// Sends a `Get` for all of `hash`.
async fn send_get(
    conn: &Connection,
    hash: &blake3::Hash,
) -> (shoal_transport::SendStream, shoal_transport::RecvStream) {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut all = GroupRanges::new();
    all.insert(0..u64::MAX >> 1);
    let get = pb::Request {
        kind: Some(pb::request::Kind::Get(pb::Get {
            hash: hash.as_bytes().to_vec().into(),
            ranges: Some(all.to_pb()),
        })),
    };
    write_frame(&mut send, &get).await.unwrap();
    send.finish().unwrap();
    (send, recv)
}

/// Sends a `Get` for all of `hash` and reads the answer's header.
async fn open_get(
    conn: &Connection,
    hash: &blake3::Hash,
) -> (shoal_transport::SendStream, shoal_transport::RecvStream) {
    let (send, mut recv) = send_get(conn, hash).await;
    let r: pb::Response = read_frame(&mut recv, Limit::Response).await.unwrap();
    assert!(matches!(r.kind, Some(pb::response::Kind::Get(_))), "{r:?}");
    (send, recv)
}

/// A peer that asks for a blob and then reads nothing does not hold the
/// answer (its buffers, the encoder's thread, one of the node's answer
/// slots) for good: once it has taken no byte for `send_stall_timeout`, the
/// node resets the answer. A peer that reads gets the same answer whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_peer_does_not_read_is_dropped_after_the_stall_timeout() {
    let (node, _ep, conn) = node_and_client_with(NodeConfig {
        send_stall_timeout: Duration::from_secs(1),
        ..NodeConfig::default()
    })
    .await;
    // Past what QUIC's flow control lets the node send unread (8 MiB).
    let data: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
    let hash = node.add_bytes(data, "big").await.unwrap();

    let (_send, mut recv) = open_get(&conn, &hash).await;
    let whole = tokio::time::timeout(Duration::from_secs(30), recv.read_all(64 << 20))
        .await
        .unwrap()
        .unwrap();
    assert!(whole.len() > 32 << 20, "{} bytes", whole.len());

    let (_send, mut recv) = open_get(&conn, &hash).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let read = tokio::time::timeout(Duration::from_secs(30), recv.read_all(64 << 20))
        .await
        .unwrap();
    let err = match read {
        Ok(v) => panic!("the stalled answer came, {} bytes", v.len()),
        Err(e) => e,
    };
    assert!(
        err.to_string()
            .contains(&format!("{}", shoal_transport::RESET_STALLED)),
        "{err}"
    );
    // The connection is still usable: another reader is answered.
    let (_send, mut recv) = open_get(&conn, &hash).await;
    let again = recv.read_all(64 << 20).await.unwrap();
    assert!(again == whole, "the answer differs");
    node.shutdown().await;
}

/// Answer slots are few, and a peer may read its answers at a trickle (or
/// not at all, short of the stall timeout): when a request waits for a
/// slot, the slowest answer that has run `choke_after` is reset as busy
/// and its slot goes to the request that waited, where the waiter once
/// waited for the slow answers to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_a_slot_held_by_unread_answers_is_served_soon() {
    let (node, _ep, conn) = node_and_client_with(NodeConfig {
        max_answers: 2,
        choke_after: Duration::from_secs(2),
        send_stall_timeout: Duration::from_secs(600),
        ..NodeConfig::default()
    })
    .await;
    // Past what QUIC's flow control lets the node send unread.
    let data: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
    let hash = node.add_bytes(data, "big").await.unwrap();

    // Two answers nobody reads take both slots.
    let (_s1, mut unread1) = open_get(&conn, &hash).await;
    let (_s2, mut unread2) = open_get(&conn, &hash).await;
    let whole = tokio::time::timeout(Duration::from_secs(60), async {
        let (_send, mut recv) = open_get(&conn, &hash).await;
        recv.read_all(64 << 20).await
    })
    .await
    .expect("the waiting request was not served while the unread answers held the slots")
    .unwrap();
    assert!(whole.len() > 32 << 20, "{} bytes", whole.len());

    // One of them (or both) was reset as busy; one still running ends
    // whole once it is read.
    let mut busy = 0;
    for recv in [&mut unread1, &mut unread2] {
        match tokio::time::timeout(Duration::from_secs(60), recv.read_all(64 << 20))
            .await
            .expect("an unread answer neither ended nor was reset")
        {
            Ok(v) => assert!(v == whole, "an answer that was not choked came different"),
            Err(e) => {
                assert!(
                    e.to_string()
                        .contains(&format!("{}", shoal_transport::RESET_BUSY)),
                    "{e}"
                );
                busy += 1;
            }
        }
    }
    assert!(busy >= 1, "no answer was choked");
    node.shutdown().await;
}

/// Downloaders that take turns at a seeder's only answer slot, each choked
/// in turn while the other waits, keep the seeder and both finish: a
/// choked request is asked again, not held against the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloaders_taking_turns_at_a_seeders_only_slot_both_finish() {
    let seeder = Node::spawn(NodeConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        max_answers: 1,
        choke_after: Duration::from_millis(100),
        // Slow: each answer (a request is at least one 128 KiB block)
        // runs ~250 ms, long enough to be choked while the other waits.
        upload_limit: Some(512 << 10),
        ..NodeConfig::default()
    })
    .await
    .unwrap();
    let data: Vec<u8> = (0..2u32 << 20).map(|i| (i % 253) as u8).collect();
    let hash = seeder.add_bytes(data.clone(), "shared").await.unwrap();
    let ticket = seeder.ticket(&hash).unwrap();
    let mut downloaders = Vec::new();
    let mut fetches = Vec::new();
    for _ in 0..2 {
        let d = Node::spawn(NodeConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            stall_timeout: Duration::from_secs(60),
            ..NodeConfig::default()
        })
        .await
        .unwrap();
        let (d2, req) = (
            d.clone(),
            FetchRequest::from_ticket(&ticket, FetchOutput::Store),
        );
        fetches.push(tokio::spawn(async move { d2.fetch(req, None).await }));
        downloaders.push(d);
    }
    for (d, f) in downloaders.iter().zip(fetches) {
        tokio::time::timeout(Duration::from_secs(120), f)
            .await
            .expect("a download did not finish")
            .unwrap()
            .expect("a choked download failed");
        assert!(d.store().read_all(&hash).unwrap() == data, "wrong data");
    }
    assert!(
        seeder.answers_choked() > 0,
        "no answer was choked: nothing was tested"
    );
    for d in downloaders {
        d.shutdown().await;
    }
    seeder.shutdown().await;
}

/// A request that waits for an answer slot and is then given up by its
/// peer (its stream stopped: the peer timed out, or got the groups
/// elsewhere) stops waiting: it chokes no answer that is still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_given_up_while_it_waited_chokes_nothing() {
    let (node, _ep, conn) = node_and_client_with(NodeConfig {
        max_answers: 1,
        choke_after: Duration::from_secs(1),
        send_stall_timeout: Duration::from_secs(600),
        ..NodeConfig::default()
    })
    .await;
    let data: Vec<u8> = (0..32u32 << 20).map(|i| (i % 241) as u8).collect();
    let hash = node.add_bytes(data, "big").await.unwrap();
    // The only slot: an answer not read yet.
    let (_s1, mut held) = open_get(&conn, &hash).await;
    // A second request, given up at once.
    drop(send_get(&conn, &hash).await);
    // Past `choke_after`, with time for a few chokes.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let whole = tokio::time::timeout(Duration::from_secs(60), held.read_all(64 << 20))
        .await
        .unwrap()
        .expect("the answer was choked for a request nobody waited for");
    assert!(whole.len() > 32 << 20, "{} bytes", whole.len());
    node.shutdown().await;
}

/// A peer that starts again (the same id, a new run: a killed process
/// restarted) replaces its earlier run's connections: the node closes
/// them and forgets the address they came from. Kept, they stood for the
/// peer until their idle timeout (`peers` said it was connected, with
/// rates from the dead one), and its old addresses went out through peer
/// exchange (a review). A second connection of the same run stays.
#[tokio::test]
async fn a_peer_started_again_replaces_its_earlier_runs_connections() {
    let node = Node::spawn(NodeConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        ..NodeConfig::default()
    })
    .await
    .unwrap();
    let key = SecretKey::generate().to_bytes();
    let run = |instance: &'static [u8]| {
        let node = &node;
        async move {
            let (ep, conn) = client(node, SecretKey::from_bytes(&key)).await;
            let hello = pb::Hello {
                version: shoal_proto::PROTOCOL_VERSION,
                agent: "test".into(),
                instance: instance.to_vec().into(),
                ..Default::default()
            };
            let r = ask(
                &conn,
                pb::Request {
                    kind: Some(pb::request::Kind::Hello(hello)),
                },
            )
            .await;
            assert!(matches!(r.kind, Some(pb::response::Kind::Hello(_))));
            (ep, conn)
        }
    };
    let closed_soon = |c: Connection| async move {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !c.is_closed() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .is_ok()
    };
    let (ep1, first) = run(b"first run").await;
    let (_ep1b, also_first) = run(b"first run").await;
    let (ep2, second) = run(b"second run").await;
    assert!(
        closed_soon(first.clone()).await,
        "the earlier run's connection stayed"
    );
    assert!(closed_soon(also_first.clone()).await);
    assert!(!second.is_closed());
    let me = ep2.peer_id();
    let info = node.peers().into_iter().find(|p| p.id == me).unwrap();
    assert!(info.connected);
    let port = |ep: &Endpoint| ep.local_addrs()[0].port();
    assert!(
        info.addrs.iter().any(|a| a.port() == port(&ep2)),
        "{:?}",
        info.addrs
    );
    assert!(
        !info.addrs.iter().any(|a| a.port() == port(&ep1)),
        "{:?}",
        info.addrs
    );
    // The same run again: nothing is closed.
    let (_ep2b, second_too) = run(b"second run").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_closed() && !second_too.is_closed());
    // The first run says hello again: it was not an earlier run but a
    // second process with the same id (a data dir copied with its key).
    // Nothing is closed any more: each would knock the other off in turn.
    // (The transport keeps two connections a peer dialed at a time.)
    second_too.close(0, b"done");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_ep1c, first_again) = run(b"first run").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_closed() && !first_again.is_closed());
}
