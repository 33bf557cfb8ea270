//! Nodes that find each other with no ticket: by mDNS on loopback, through a
//! local Mainline DHT test network, and by peer exchange. In-memory stores,
//! loopback only; every wait is bounded.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use shoal_node::{
    DiscoveryConfig, FetchOutput, FetchRequest, Hash, Node, NodeConfig, PeerAddr, PeerId,
};
use tokio::time::timeout;

/// Logs to the test output when `RUST_LOG` is set.
fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Deterministic test data.
fn data(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// A UDP port nothing listens on (bound, then released): a private mDNS
/// group per test, so that parallel tests and other hosts' nodes stay out.
fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a udp socket");
    socket.local_addr().expect("local addr").port()
}

fn config(discovery: DiscoveryConfig) -> NodeConfig {
    NodeConfig {
        listen: vec!["127.0.0.1:0".parse().expect("addr")],
        discovery,
        stall_timeout: Duration::from_secs(30),
        ..NodeConfig::default()
    }
}

fn no_discovery() -> DiscoveryConfig {
    DiscoveryConfig {
        mdns: false,
        dht: false,
        ..DiscoveryConfig::default()
    }
}

async fn spawn(discovery: DiscoveryConfig) -> Node {
    Node::spawn(config(discovery)).await.expect("spawn node")
}

/// Fetches `hash` into `node`'s store knowing only `peers`, within `limit`.
async fn fetch(node: &Node, hash: Hash, peers: Vec<PeerAddr>, limit: Duration) -> Duration {
    let started = Instant::now();
    let req = FetchRequest {
        hash,
        kind: None,
        peers,
        out: FetchOutput::Store,
    };
    timeout(limit, node.fetch(req, None))
        .await
        .unwrap_or_else(|_| panic!("fetch of {hash} did not finish within {limit:?}"))
        .expect("fetch");
    let took = started.elapsed();
    let info = node.store().info(&hash).expect("fetched blob in store");
    assert!(info.complete);
    took
}

fn downloaded_from(node: &Node, peer: PeerId) -> u64 {
    node.peers()
        .iter()
        .find(|p| p.id == peer)
        .map_or(0, |p| p.counters.downloaded)
}

async fn shutdown(nodes: &[&Node]) {
    for n in nodes {
        timeout(Duration::from_secs(10), n.shutdown())
            .await
            .expect("shutdown within 10 s");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mdns_neighbour_serves_a_hash_given_alone() {
    init_logs();
    let port = free_udp_port();
    let mdns = DiscoveryConfig {
        mdns: true,
        mdns_interfaces: vec!["lo".to_owned()],
        mdns_port: port,
        dht: false,
        ..DiscoveryConfig::default()
    };
    let seeder = spawn(mdns.clone()).await;
    let content = data(700_000, 1);
    let hash = seeder.add_bytes(content, "m.bin").await.expect("add");
    let downloader = spawn(mdns).await;

    let took = fetch(&downloader, hash, Vec::new(), Duration::from_secs(30)).await;
    eprintln!("mdns: fetched by hash alone in {took:?}");
    assert!(downloaded_from(&downloader, seeder.peer_id()) > 0);
    // Nobody dials itself: the seeder never shows up in its own peer list.
    assert!(seeder.peers().iter().all(|p| p.id != seeder.peer_id()));
    assert!(
        downloader
            .peers()
            .iter()
            .all(|p| p.id != downloader.peer_id())
    );
    shutdown(&[&seeder, &downloader]).await;
}

/// A local DHT of `n` server-mode nodes on 127.0.0.1, and its bootstrap list.
async fn testnet(n: usize) -> (mainline::Testnet, Vec<SocketAddr>) {
    let testnet = tokio::task::spawn_blocking(move || {
        mainline::Testnet::builder(n)
            .bind_address(Ipv4Addr::LOCALHOST)
            .build()
    })
    .await
    .expect("join")
    .expect("build testnet");
    let bootstrap = testnet
        .bootstrap
        .iter()
        .map(|s| s.parse().expect("testnet address"))
        .collect();
    (testnet, bootstrap)
}

/// The DHT alone (no mDNS), on `bootstrap`, looking up every second.
fn dht_only(bootstrap: Vec<SocketAddr>) -> DiscoveryConfig {
    DiscoveryConfig {
        mdns: false,
        dht: true,
        dht_bootstrap: bootstrap,
        lookup_interval: Duration::from_secs(1),
        ..DiscoveryConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_provider_serves_a_hash_given_alone() {
    init_logs();
    let (_testnet, bootstrap) = testnet(8).await;
    let dht = dht_only(bootstrap);
    let seeder = spawn(dht.clone()).await;
    let content = data(500_000, 2);
    let hash = seeder.add_bytes(content, "d.bin").await.expect("add");
    // The announce lands once the seeder has bootstrapped.
    let deadline = Instant::now() + Duration::from_secs(20);
    let d = seeder.discovery().expect("discovery runs");
    while d.dht_stats().announces == 0 {
        assert!(
            Instant::now() < deadline,
            "the seeder announced nothing within 20 s: {:?}",
            d.dht_stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let downloader = spawn(dht).await;
    let took = fetch(&downloader, hash, Vec::new(), Duration::from_secs(30)).await;
    eprintln!("dht: fetched by hash alone in {took:?}");
    // The DHT gives a bare address: the seeder's id was learnt from TLS.
    assert!(downloaded_from(&downloader, seeder.peer_id()) > 0);
    // Once the download is over its lookups stop (they run every second
    // while it is wanted).
    let dd = downloader.discovery().expect("discovery runs");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let lookups = dd.dht_stats().lookups;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        dd.dht_stats().lookups,
        lookups,
        "dht lookups go on after the download"
    );
    shutdown(&[&seeder, &downloader]).await;
}

/// A node announces what it pins, not the members of a collection it
/// fetched (each of ten thousand files was a DHT lookup every 20 minutes),
/// and stops announcing what is unpinned (`rm`): it went on announcing
/// blobs gc had freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_announces_what_is_pinned_and_stops_at_rm() {
    init_logs();
    let (_testnet, bootstrap) = testnet(8).await;
    let dht = dht_only(bootstrap);
    let tree = tempfile::tempdir().expect("tempdir");
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        std::fs::write(tree.path().join(name), data(100_000, i as u8)).expect("write");
    }
    let seeder = spawn(dht.clone()).await;
    let (hash, _) = seeder
        .add_path(tree.path(), shoal_node::ImportMode::Copy)
        .await
        .expect("add");
    let announcing = |n: &Node| {
        n.discovery()
            .expect("discovery runs")
            .dht_stats()
            .announcing
    };
    // (The announce loop takes commands in its own time.)
    let settles_at = async |n: &Node, want: u64, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while announcing(n) != want {
            assert!(Instant::now() < deadline, "{what}: {}", announcing(n));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    settles_at(&seeder, 1, "the seeder announces its collection").await;
    let downloader = spawn(dht).await;
    fetch(&downloader, hash, Vec::new(), Duration::from_secs(30)).await;
    // The members completed too, unpinned, kept by the collection.
    for name in ["a", "b", "c"] {
        let member = blake3::hash(&std::fs::read(tree.path().join(name)).expect("read"));
        assert!(downloader.store().info(&member).is_some_and(|i| i.complete));
    }
    settles_at(
        &downloader,
        1,
        "the downloader announces the collection alone",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(announcing(&downloader), 1, "members announced");
    downloader.unpin(&hash).expect("unpin");
    settles_at(&downloader, 0, "still announced after rm").await;
    shutdown(&[&seeder, &downloader]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_exchange_leads_to_a_peer_nobody_named() {
    init_logs();
    // S seeds; C holds nothing; A fetches from S and also asks C, so C
    // learns that A holds the hash. Then S goes away, and B, told only
    // about C, can only complete through A, whom it hears of from C.
    let s = spawn(no_discovery()).await;
    let c = spawn(no_discovery()).await;
    let a = spawn(no_discovery()).await;
    let b = spawn(no_discovery()).await;
    let content = data(600_000, 3);
    let hash = s.add_bytes(content, "p.bin").await.expect("add");
    let named = |n: &Node| PeerAddr {
        id: Some(n.peer_id()),
        addr: n.addrs()[0],
    };

    fetch(
        &a,
        hash,
        vec![named(&s), named(&c)],
        Duration::from_secs(30),
    )
    .await;
    assert!(downloaded_from(&a, s.peer_id()) > 0);
    shutdown(&[&s]).await;
    assert!(c.store().info(&hash).is_none(), "c should hold nothing");

    let took = fetch(&b, hash, vec![named(&c)], Duration::from_secs(30)).await;
    eprintln!("pex: fetched through a peer learnt by exchange in {took:?}");
    let from_a = downloaded_from(&b, a.peer_id());
    assert!(from_a > 0, "b downloaded nothing from a: {:?}", b.peers());
    assert_eq!(downloaded_from(&b, s.peer_id()), 0);
    assert!(
        c.store().info(&hash).is_none(),
        "c should still hold nothing"
    );
    shutdown(&[&a, &b, &c]).await;
}
