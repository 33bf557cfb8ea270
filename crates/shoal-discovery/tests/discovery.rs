//! In-process tests of the discovery sources. Loopback only: mDNS runs on
//! `lo` with a private port, the DHT is a local `mainline::Testnet`.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shoal_discovery::{Candidate, Discovery, DiscoveryConfig, PeerId, Source};
use shoal_transport::SecretKey;
use tokio::time::timeout;
use tracing::Level;
use tracing_subscriber::layer::SubscriberExt;

/// Logs to the test output when `RUST_LOG` is set.
fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

fn new_id() -> PeerId {
    SecretKey::generate().public()
}

/// A UDP port nothing listens on (bound, then released).
fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a udp socket");
    socket.local_addr().expect("local addr").port()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn mdns_only(port: u16) -> DiscoveryConfig {
    DiscoveryConfig {
        mdns: true,
        mdns_interfaces: vec!["lo".to_owned()],
        mdns_port: port,
        dht: false,
        ..DiscoveryConfig::default()
    }
}

fn dht_only(bootstrap: Vec<SocketAddr>) -> DiscoveryConfig {
    DiscoveryConfig {
        mdns: false,
        dht: true,
        dht_bootstrap: bootstrap,
        reannounce_interval: Duration::from_secs(2),
        lookup_interval: Duration::from_millis(500),
        ..DiscoveryConfig::default()
    }
}

/// Receives until a candidate satisfies `want`, or `limit` passes.
async fn wait_for(
    rx: &mut tokio::sync::mpsc::Receiver<Candidate>,
    limit: Duration,
    want: impl Fn(&Candidate) -> bool,
) -> Option<Candidate> {
    timeout(limit, async {
        while let Some(candidate) = rx.recv().await {
            if want(&candidate) {
                return Some(candidate);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

#[tokio::test]
async fn mdns_neighbours_find_each_other() {
    init_logs();
    let port = free_udp_port();
    let (id_a, id_b) = (new_id(), new_id());
    let quic_a = addr("127.0.0.1:41001");
    let quic_b = addr("127.0.0.1:41002");
    let a = Discovery::start(id_a, vec![quic_a], mdns_only(port))
        .await
        .expect("start a");
    let b = Discovery::start(id_b, vec![quic_b], mdns_only(port))
        .await
        .expect("start b");

    let hash = *blake3::hash(b"anything").as_bytes();
    let mut from_b = b.find(hash);
    let started = Instant::now();
    let found = wait_for(&mut from_b, Duration::from_secs(15), |c| c.id == Some(id_a)).await;
    let Some(found) = found else {
        panic!(
            "mDNS on lo (port {port}) found no neighbour within 15 s: does this host allow \
             multicast on the loopback interface? (`ip link set lo multicast on`, and a \
             route for 224.0.0.0/4 via lo, may be needed)"
        );
    };
    eprintln!("mdns: b found a after {:?}", started.elapsed());
    assert_eq!(
        found,
        Candidate {
            addr: quic_a,
            id: Some(id_a),
            source: Source::Mdns
        }
    );

    // A sees B too, and nobody ever sees itself.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !a.neighbours().iter().any(|c| c.id == Some(id_b)) {
        assert!(
            Instant::now() < deadline,
            "a never saw b: {:?}",
            a.neighbours()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        a.neighbours()
            .iter()
            .all(|c| c.id != Some(id_a) && c.addr != quic_a)
    );
    assert!(
        b.neighbours()
            .iter()
            .all(|c| c.id != Some(id_b) && c.addr != quic_b)
    );

    // A find started later gets the current neighbours at once.
    let mut later = a.find(hash);
    let got = wait_for(&mut later, Duration::from_secs(2), |c| c.id == Some(id_b)).await;
    assert_eq!(got.map(|c| c.addr), Some(quic_b));

    // A node bound to [::] advertises its IPv4 (and IPv6) addresses, and a
    // running find streams a neighbour that arrives later. IPv6 multicast on
    // `lo` does not carry mDNS here (with mdns-sd 0.21, even with lo flagged
    // MULTICAST in a namespace), so only the IPv4 address is required.
    let id_c = new_id();
    let c = Discovery::start(id_c, vec![addr("[::]:41003")], mdns_only(port))
        .await
        .expect("start c");
    let got = wait_for(&mut from_b, Duration::from_secs(15), |c| c.id == Some(id_c)).await;
    assert_eq!(
        got,
        Some(Candidate {
            addr: addr("127.0.0.1:41003"),
            id: Some(id_c),
            source: Source::Mdns
        }),
        "b did not stream c, which came later"
    );
    c.shutdown().await;

    // Shutdown ends the open streams.
    timeout(Duration::from_secs(10), async {
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
    .expect("shutdown within 10 s");
    let ended = timeout(Duration::from_secs(5), async {
        while from_b.recv().await.is_some() {}
        while later.recv().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "find streams still open after shutdown");
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

#[tokio::test]
async fn dht_finds_the_provider_of_a_hash() {
    init_logs();
    let (_testnet, bootstrap) = testnet(10).await;
    let quic_a = addr("127.0.0.1:42001");
    let quic_b = addr("127.0.0.1:42002");
    let a = Discovery::start(new_id(), vec![quic_a], dht_only(bootstrap.clone()))
        .await
        .expect("start a");
    let b = Discovery::start(new_id(), vec![quic_b], dht_only(bootstrap))
        .await
        .expect("start b");
    let hash = *blake3::hash(b"shoal dht test").as_bytes();
    let started = Instant::now();
    a.announce(hash);
    let mut from_b = b.find(hash);
    let found = wait_for(&mut from_b, Duration::from_secs(30), |c| c.addr == quic_a).await;
    let found = found.expect("b found no provider of the hash within 30 s");
    eprintln!("dht: b found a after {:?}", started.elapsed());
    assert_eq!(
        found,
        Candidate {
            addr: quic_a,
            id: None,
            source: Source::Dht
        }
    );
    assert!(a.dht_bootstrapped() && b.dht_bootstrapped());
    assert!(a.dht_local_addr().is_some());

    // A never finds itself, though it is the provider.
    let mut from_a = a.find(hash);
    let itself = wait_for(&mut from_a, Duration::from_secs(3), |c| c.addr == quic_a).await;
    assert_eq!(itself, None, "a was given its own address");

    // An unannounced hash has no provider.
    let mut nothing = b.find(*blake3::hash(b"nobody has this").as_bytes());
    let got = timeout(Duration::from_secs(3), nothing.recv()).await;
    assert!(got.is_err(), "a provider for an unannounced hash: {got:?}");

    timeout(Duration::from_secs(10), async {
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
    .expect("shutdown within 10 s");
    assert_eq!(a.dht_local_addr(), None);
}

#[tokio::test]
async fn announce_off_announces_nothing() {
    let (_testnet, bootstrap) = testnet(10).await;
    let quic_a = addr("127.0.0.1:43001");
    let config = DiscoveryConfig {
        announce: false,
        ..dht_only(bootstrap.clone())
    };
    let a = Discovery::start(new_id(), vec![quic_a], config)
        .await
        .expect("start a");
    let b = Discovery::start(new_id(), vec![addr("127.0.0.1:43002")], dht_only(bootstrap))
        .await
        .expect("start b");
    let hash = *blake3::hash(b"private").as_bytes();
    a.announce(hash);
    let mut from_b = b.find(hash);
    let got = wait_for(&mut from_b, Duration::from_secs(5), |c| c.addr == quic_a).await;
    assert_eq!(got, None, "a announced with announce off");
    // Lookups still work with announce off: a finds what b announces.
    b.announce(hash);
    let mut from_a = a.find(hash);
    let got = wait_for(&mut from_a, Duration::from_secs(30), |c| {
        c.addr == addr("127.0.0.1:43002")
    })
    .await;
    assert!(got.is_some(), "lookup failed with announce off");
    assert_eq!(a.dht_stats().announces + a.dht_stats().failed_announces, 0);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn reannounces_until_withdrawn() {
    let (_testnet, bootstrap) = testnet(10).await;
    let config = DiscoveryConfig {
        reannounce_interval: Duration::from_millis(500),
        ..dht_only(bootstrap)
    };
    let a = Discovery::start(new_id(), vec![addr("127.0.0.1:45001")], config)
        .await
        .expect("start a");
    let hash = *blake3::hash(b"again and again").as_bytes();
    a.announce(hash);
    a.announce(hash); // announcing twice schedules it once
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.dht_stats().announces < 4 {
        assert!(
            Instant::now() < deadline,
            "fewer than 4 announces within 20 s: {:?}",
            a.dht_stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.withdraw(hash);
    // At most one announce that was already under way may still finish.
    let after_withdraw = a.dht_stats().announces;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = a.dht_stats().announces;
    assert!(
        later <= after_withdraw + 1,
        "still announcing after withdraw: {after_withdraw} -> {later}"
    );
    assert_eq!(a.dht_stats().failed_announces, 0);
    a.shutdown().await;
}

/// Counts this crate's WARN-and-above events.
#[derive(Clone, Default)]
struct Counter {
    ours: Arc<AtomicUsize>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Counter {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let meta = event.metadata();
        if *meta.level() > Level::WARN {
            return;
        }
        if meta.target().starts_with("shoal_discovery") {
            self.ours.fetch_add(1, Ordering::SeqCst);
        }
    }
}

// Current-thread runtime: every task runs on this thread, under the
// thread-local subscriber that counts warnings.
#[tokio::test(flavor = "current_thread")]
async fn unreachable_dht_warns_once_and_finds_nothing() {
    let counter = Counter::default();
    let subscriber = tracing_subscriber::registry().with(counter.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let closed = SocketAddr::from((Ipv4Addr::LOCALHOST, free_udp_port()));
    let d = Discovery::start(
        new_id(),
        vec![addr("127.0.0.1:44001")],
        dht_only(vec![closed]),
    )
    .await
    .expect("start");
    let hash = *blake3::hash(b"unreachable").as_bytes();
    d.announce(hash);
    let mut rx = d.find(hash);

    // mainline's bootstrap gives up after its 2 s request timeout.
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter.ours.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no warning within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give it time to warn again (it must not), while the lookup is wanted.
    let got = timeout(Duration::from_secs(6), rx.recv()).await;
    assert!(got.is_err(), "a candidate from an unreachable dht: {got:?}");
    assert_eq!(
        counter.ours.load(Ordering::SeqCst),
        1,
        "warned more than once"
    );
    assert!(!d.dht_bootstrapped());
    timeout(Duration::from_secs(10), d.shutdown())
        .await
        .expect("shutdown within 10 s");
    let ended = timeout(Duration::from_secs(5), rx.recv()).await;
    assert_eq!(ended.ok(), Some(None), "find stream open after shutdown");
}
