//! A download waits for what it cannot have yet, up to its stall timeout:
//! the address it was given is dialled again (with backoff), so a seeder
//! that restarts, or that is not up at the first dial, is used; a
//! connected peer that adds the blob later says so to the downloader; a
//! peer that connects during a download is asked at once; and a download
//! that gives up says whether anyone held the blob.

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use shoal_node::{FetchOutput, FetchRequest, Node, NodeConfig, PeerAddr};
use shoal_transport::PeerId;

fn seeder_config(dir: &Path, listen: SocketAddr, upload_limit: Option<u64>) -> NodeConfig {
    NodeConfig {
        data_dir: Some(dir.to_path_buf()),
        listen: vec![listen],
        upload_limit,
        control_socket: false,
        ..NodeConfig::default()
    }
}

fn downloader() -> NodeConfig {
    NodeConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        stall_timeout: Duration::from_secs(40),
        ..NodeConfig::default()
    }
}

fn content(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(blake3::hash(&i.to_le_bytes()).as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

/// The address of the node `n`, with its id.
fn addr_of(n: &Node) -> PeerAddr {
    PeerAddr {
        id: Some(n.peer_id()),
        addr: n.addrs()[0],
    }
}

/// Wait until `d` is connected to some peer.
async fn until_connected(d: &Node) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while d.peers().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the downloader never connected");
}

/// `d` fetches `hash` from `peer` (into its store), in a task of its own.
fn spawn_fetch(
    d: &Node,
    hash: blake3::Hash,
    peer: PeerAddr,
) -> tokio::task::JoinHandle<Result<shoal_node::FetchReport, shoal_node::NodeError>> {
    spawn_fetch_from(d, hash, vec![peer])
}

/// `d` fetches `hash` from `peers` (into its store), in a task of its own.
fn spawn_fetch_from(
    d: &Node,
    hash: blake3::Hash,
    peers: Vec<PeerAddr>,
) -> tokio::task::JoinHandle<Result<shoal_node::FetchReport, shoal_node::NodeError>> {
    let d = d.clone();
    let req = FetchRequest {
        hash,
        kind: None,
        peers,
        out: FetchOutput::Store,
    };
    tokio::spawn(async move { d.fetch(req, None).await })
}

/// The fetch finishes within `limit` (else: `what` went wrong) and `d`
/// holds `data`, whole.
async fn fetched(
    fetch: tokio::task::JoinHandle<Result<shoal_node::FetchReport, shoal_node::NodeError>>,
    limit: Duration,
    what: &str,
    d: &Node,
    data: &[u8],
) {
    let report = tokio::time::timeout(limit, fetch)
        .await
        .expect(what)
        .unwrap()
        .expect("the download failed");
    assert_eq!(report.bytes, data.len() as u64);
    assert_eq!(d.store().read_all(&blake3::hash(data)).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_goes_on_after_its_only_seeder_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(12 << 20);
    // Slow enough that the restart falls in the middle of the download.
    let s = Node::spawn(seeder_config(
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        Some(3 << 20),
    ))
    .await
    .unwrap();
    let addr = s.addrs()[0];
    let hash = s.add_bytes(data.clone(), "x").await.unwrap();
    let ticket = s.ticket(&hash).unwrap();
    let d = Node::spawn(downloader()).await.unwrap();
    let fetch = {
        let d = d.clone();
        tokio::spawn(async move {
            d.fetch(FetchRequest::from_ticket(&ticket, FetchOutput::Store), None)
                .await
        })
    };
    // Some of it arrives; then the seeder goes away.
    tokio::time::timeout(Duration::from_secs(30), async {
        while d
            .store()
            .info(&hash)
            .is_none_or(|i| i.verified.count() < 16)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("no progress from the seeder");
    s.shutdown().await;
    drop(s);
    let before = d.store().info(&hash).unwrap();
    assert!(!before.complete, "finished before the seeder went away");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The same node (data dir, identity, port) comes back.
    let s = Node::spawn(seeder_config(dir.path(), addr, None))
        .await
        .unwrap();
    fetched(
        fetch,
        Duration::from_secs(60),
        "the download did not finish after the seeder came back",
        &d,
        &data,
    )
    .await;
    s.shutdown().await;
    d.shutdown().await;
}

/// A seeder of `data` not up yet: its data dir `dir` holds `data`, and a
/// socket that never answers holds its port (the first dial runs out,
/// after the node's 10 s connect timeout). Drop the socket, then spawn
/// `seeder_config(dir, addr, ..)` to bring it up.
async fn late_seeder(dir: &Path, data: &[u8]) -> (std::net::UdpSocket, SocketAddr, PeerId) {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let s = Node::spawn(seeder_config(dir, "127.0.0.1:0".parse().unwrap(), None))
        .await
        .unwrap();
    s.add_bytes(data.to_vec(), "late").await.unwrap();
    s.shutdown().await;
    (silent, addr, s.peer_id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_that_was_not_there_at_the_first_dial_is_dialled_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(300_000);
    let (silent, addr, seeder_id) = late_seeder(dir.path(), &data).await;
    let hash = blake3::hash(&data);
    let d = Node::spawn(downloader()).await.unwrap();
    let fetch = spawn_fetch(
        &d,
        hash,
        PeerAddr {
            id: Some(seeder_id),
            addr,
        },
    );
    tokio::time::sleep(Duration::from_millis(11_000)).await;
    drop(silent);
    let s = Node::spawn(seeder_config(dir.path(), addr, None))
        .await
        .unwrap();
    assert_eq!(s.peer_id(), seeder_id);
    fetched(
        fetch,
        Duration::from_secs(30),
        "the seeder was not dialled again",
        &d,
        &data,
    )
    .await;
    s.shutdown().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_waiting_on_a_peer_gets_what_the_peer_adds_later() {
    // The peer is connected and holds nothing yet; when its user adds the
    // file, the have subscription says so and the download goes on.
    let s = Node::spawn(downloader()).await.unwrap();
    let data = content(500_000);
    let hash = blake3::hash(&data);
    let d = Node::spawn(downloader()).await.unwrap();
    let fetch = spawn_fetch(&d, hash, addr_of(&s));
    // Connected, asked, told "nothing" (the peer is listed, no bytes yet).
    until_connected(&d).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!fetch.is_finished());
    s.add_bytes(data.clone(), "later").await.unwrap();
    fetched(
        fetch,
        Duration::from_secs(30),
        "the download never learnt that the peer added it",
        &d,
        &data,
    )
    .await;
    s.shutdown().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_that_connects_during_a_download_is_asked_at_once() {
    // The download's only address leads to a peer holding nothing. A
    // seeder that connects to the downloader meanwhile (to fetch something
    // else of it) is asked straight away: no peer would ever have told
    // the download of it (the empty peer never met it).
    let empty = Node::spawn(downloader()).await.unwrap();
    let data = content(500_000);
    let hash = blake3::hash(&data);
    let d = Node::spawn(downloader()).await.unwrap();
    let fetch = spawn_fetch(&d, hash, addr_of(&empty));
    until_connected(&d).await;
    let s = Node::spawn(downloader()).await.unwrap();
    s.add_bytes(data.clone(), "seed").await.unwrap();
    let other = content(70_000)[1..].to_vec();
    d.add_bytes(other.clone(), "other").await.unwrap();
    let theirs = spawn_fetch(&s, blake3::hash(&other), addr_of(&d));
    // Well within the stall timeout (40 s), after which it would fail.
    fetched(
        fetch,
        Duration::from_secs(30),
        "the download never asked the seeder that connected to it",
        &d,
        &data,
    )
    .await;
    fetched(
        theirs,
        Duration::from_secs(30),
        "the seeder's own fetch",
        &s,
        &other,
    )
    .await;
    for n in [empty, s, d] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_no_peer_holds_says_so_when_it_gives_up() {
    // Reached and asked, the only peer holds nothing: the error says that,
    // not that the download stalled (nor that no peer could be reached).
    let s = Node::spawn(downloader()).await.unwrap();
    let hash = blake3::hash(b"nobody has this");
    let d = Node::spawn(NodeConfig {
        stall_timeout: Duration::from_secs(2),
        ..downloader()
    })
    .await
    .unwrap();
    let peer = addr_of(&s);
    let err = tokio::time::timeout(Duration::from_secs(30), spawn_fetch(&d, hash, peer))
        .await
        .expect("the download never gave up")
        .unwrap()
        .expect_err("fetched what nobody has");
    assert!(
        matches!(err, shoal_node::NodeError::NotHeld(h, 1) if h == hash),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with(&format!("no peer reached holds {hash} (1 asked): ")),
        "{err}"
    );
    s.shutdown().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_that_cannot_lead_to_the_named_peer_fail_at_once_with_discovery_off() {
    // Dialling again cannot help an address whose peer proves another key
    // than the one named, nor a peer named by this node's own key: with
    // discovery off and no other address, the download says so at once
    // instead of redialling until its stall timeout (40 s here).
    let dir = tempfile::tempdir().unwrap();
    let s = Node::spawn(seeder_config(
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        None,
    ))
    .await
    .unwrap();
    let data = content(300_000);
    let hash = s.add_bytes(data.clone(), "f").await.unwrap();
    let stranger = Node::spawn(downloader()).await.unwrap();
    let d = Node::spawn(downloader()).await.unwrap();
    let wrong_key = PeerAddr {
        id: Some(stranger.peer_id()),
        addr: s.addrs()[0],
    };
    let own_key = PeerAddr {
        id: Some(d.peer_id()),
        addr: stranger.addrs()[0],
    };
    let err = tokio::time::timeout(
        Duration::from_secs(15),
        spawn_fetch_from(&d, hash, vec![wrong_key, own_key]),
    )
    .await
    .expect("the download waited for addresses that cannot serve it")
    .unwrap()
    .expect_err("fetched from a peer that is not the one named");
    assert!(
        matches!(err, shoal_node::NodeError::NowhereLeft(h, _) if h == hash),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "has id {}, expected {}",
            s.peer_id(),
            stranger.peer_id()
        )),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("{} is this node's own id", d.peer_id())),
        "{msg}"
    );
    assert!(!d.store().info(&hash).is_some_and(|i| i.complete));

    // Beside an address that leads to the right peer, such an address is
    // only skipped, also when it is the same address named with the wrong
    // key (dialled first: the last given is dialled first).
    let right = addr_of(&s);
    fetched(
        spawn_fetch_from(&d, hash, vec![right, wrong_key, own_key]),
        Duration::from_secs(30),
        "the download did not use the right address",
        &d,
        &data,
    )
    .await;
    s.shutdown().await;
    stranger.shutdown().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_address_no_neighbour_and_discovery_off_a_download_fails_at_once() {
    // It waited its whole stall timeout (40 s here) for a peer that could
    // not come: a running `shoal serve --no-mdns --no-dht` asked for a bare
    // hash.
    let d = Node::spawn(downloader()).await.unwrap();
    let hash = blake3::hash(b"asked of no one");
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        spawn_fetch_from(&d, hash, Vec::new()),
    )
    .await
    .expect("the download waited with nowhere to look")
    .unwrap()
    .expect_err("fetched from no one");
    assert!(
        matches!(err, shoal_node::NodeError::NowhereLeft(h, _) if h == hash),
        "{err}"
    );
    assert!(err.to_string().contains("no peer is connected"), "{err}");
    d.shutdown().await;
}

/// Peers that hold nothing (here 64 empty nodes, as throwaway identities
/// handed out by a hostile peer exchange would be) take every one of a
/// download's 64 peer slots; the seeder, not up at the first dial, is
/// dialled again once up: a peer that has held nothing for a quarter of
/// the stall timeout gives its slot up, and the download finishes. (Before,
/// the full slots kept the seeder from being dialled, and the download
/// failed at its stall timeout saying no peer held the blob.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_holding_nothing_give_their_slots_up_to_a_seeder_found_later() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(300_000);
    let (silent, addr, seeder_id) = late_seeder(dir.path(), &data).await;
    let mut empties = Vec::new();
    for _ in 0..64 {
        empties.push(Node::spawn(downloader()).await.unwrap());
    }
    let mut peers = vec![PeerAddr {
        id: Some(seeder_id),
        addr,
    }];
    peers.extend(empties.iter().map(|e| PeerAddr {
        id: Some(e.peer_id()),
        addr: e.addrs()[0],
    }));
    let hash = blake3::hash(&data);
    // Stall timeout 40 s: a peer holding nothing for 10 s gives way.
    let d = Node::spawn(downloader()).await.unwrap();
    let fetch = spawn_fetch_from(&d, hash, peers);
    tokio::time::sleep(Duration::from_millis(11_000)).await;
    drop(silent);
    let s = Node::spawn(seeder_config(dir.path(), addr, None))
        .await
        .unwrap();
    fetched(
        fetch,
        Duration::from_secs(25),
        "the seeder found a slot too late",
        &d,
        &data,
    )
    .await;
    s.shutdown().await;
    d.shutdown().await;
    for e in empties {
        e.shutdown().await;
    }
}
