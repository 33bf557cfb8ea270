//! Finding the peers that have a hash, with no central server.
//!
//! This crate owns the discovery sources and merges them into one stream of
//! [`Candidate`]s per wanted hash:
//!
//! - **LAN**: multicast DNS service discovery (`mdns-sd`). Each node
//!   registers the service [`MDNS_SERVICE_TYPE`] with instance name = its peer
//!   id text, a TXT record `id=<peer id>` and `v=1` ([`PROTOCOL_VERSION`]),
//!   port = its QUIC port and its interface addresses (IPv4 and IPv6), so any
//!   standard mDNS browser sees shoal nodes. Every neighbour found this way is
//!   a candidate for every wanted hash: mDNS says who is near, not who has
//!   what; the node asks the neighbours directly.
//! - **Global**: the BitTorrent Mainline DHT (`mainline` 8). A node announces
//!   the hashes it is told to under [`dht_key`] with its QUIC port, again
//!   every [`DiscoveryConfig::reannounce_interval`], and looks up providers
//!   with `get_peers` every [`DiscoveryConfig::lookup_interval`] while a
//!   [`Discovery::find`] receiver lives. The DHT returns bare addresses, so its
//!   candidates have `id: None`.
//! - **Static** (tickets, `--peer`) and **peer exchange** are fed in by the
//!   node itself; this crate only names them in [`Source`] and offers the
//!   [`AddressBook`] to merge, de-duplicate, drop this node itself and back off
//!   from failing addresses.
//!
//! What it does not do: it never dials a peer and does not speak the shoal
//! protocol (the node does both, and learns a DHT candidate's id from TLS).
//! [`AddressBook`] and [`SelfFilter`] do no I/O and read no clock.
//!
//! # Privacy
//!
//! With [`DiscoveryConfig::announce`] off the node announces nothing to the
//! DHT (lookups still work). It still registers itself on mDNS: that reveals
//! that a shoal node runs on this host and its peer id, to the local link
//! only, but nothing about what it stores. Turn [`DiscoveryConfig::mdns`]
//! off to hide from the LAN as well.
//!
//! # DHT reachability and logs
//!
//! When no bootstrap node answers, this crate logs one warning, drops the
//! DHT node and tries again later with a growing pause (30 s up to 10 min,
//! each retry logged at debug level); the other sources keep working and
//! lookups simply yield no DHT candidates meanwhile. `mainline` itself logs
//! an error ("Could not bootstrap the routing table") once per attempt under
//! the `mainline` log target.

#![warn(missing_docs)]

mod address_book;
mod dht;
mod local;
mod mdns;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use address_book::{
    AddressBook, BACKOFF_MAX, BACKOFF_MIN, Scope, SelfFilter, backoff, canonical, plausible_from,
    plausible_within, scope,
};
pub use dht::{DHT_KEY_CONTEXT, DhtStats, dht_key};
pub use shoal_transport::PeerId;

/// The DNS-SD service type shoal nodes register and browse.
pub const MDNS_SERVICE_TYPE: &str = "_shoal._udp.local.";
/// The protocol version a node advertises in its mDNS TXT record (`v=`).
pub const PROTOCOL_VERSION: &str = "1";
/// How many candidates a [`Discovery::find`] receiver buffers.
pub const FIND_CHANNEL_CAPACITY: usize = 64;

/// Where a candidate came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// Given by the user: a ticket or `--peer`.
    Static,
    /// A neighbour on the local link, found by multicast DNS.
    Mdns,
    /// A provider found in the Mainline DHT.
    Dht,
    /// Told by another peer (peer exchange, in the node).
    Pex,
}

/// A peer that may have what we want: an address to dial, and its id when
/// the source knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// Where to dial.
    pub addr: SocketAddr,
    /// The peer's id, when known; the dialler must then check it.
    pub id: Option<PeerId>,
    /// Which source found it.
    pub source: Source,
}

/// Which sources run and how.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// Register on and browse the local link with multicast DNS.
    pub mdns: bool,
    /// Interface names mDNS runs on (`"lo"`, `"eth0"`); empty means every
    /// interface.
    pub mdns_interfaces: Vec<String>,
    /// The UDP port of mDNS: 5353, the standard one, unless a test wants a
    /// private multicast group.
    pub mdns_port: u16,
    /// Use the Mainline DHT.
    pub dht: bool,
    /// DHT bootstrap nodes; empty means `mainline`'s default public ones.
    pub dht_bootstrap: Vec<SocketAddr>,
    /// Answer other DHT nodes' queries from the start (server mode). Off by
    /// default: `mainline` 8 in server mode drops queries from libtorrent
    /// nodes (2-byte transaction ids), most of the real DHT; as a client it
    /// works with them. `mainline` may still switch to server mode by itself
    /// after a while when it finds it is not firewalled.
    pub dht_server_mode: bool,
    /// Announce hashes to the DHT. Off: nothing is announced, lookups work.
    pub announce: bool,
    /// How often each announced hash is announced again (DHT records expire;
    /// 15-30 min in practice).
    pub reannounce_interval: Duration,
    /// The pause between two DHT lookups of a hash that is still wanted.
    /// After a lookup that found nobody the pause is shorter (2 s, doubling
    /// up to this), so that an announce landing just after a lookup is seen
    /// soon.
    pub lookup_interval: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> DiscoveryConfig {
        DiscoveryConfig {
            mdns: true,
            mdns_interfaces: Vec::new(),
            mdns_port: 5353,
            dht: true,
            dht_bootstrap: Vec::new(),
            dht_server_mode: false,
            announce: true,
            reannounce_interval: Duration::from_secs(20 * 60),
            lookup_interval: Duration::from_secs(60),
        }
    }
}

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// `Discovery::start` was given no QUIC address to advertise.
    #[error("no quic listen address given")]
    NoListenAddr,
    /// The mDNS daemon could not start, or refused the service or a command.
    #[error("mdns: {0}")]
    Mdns(#[from] mdns_sd::Error),
    /// The DHT node could not be created (its UDP socket, usually).
    #[error("starting the dht node: {0}")]
    Dht(#[source] std::io::Error),
    /// Reading this host's interface addresses failed.
    #[error("listing network interfaces: {0}")]
    Interfaces(#[source] std::io::Error),
}

/// The discovery service of one node. Cheap to clone; every clone drives the
/// same service. It stops on [`Discovery::shutdown`] or when the last clone
/// is dropped.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

struct Inner {
    config: DiscoveryConfig,
    self_filter: SelfFilter,
    neighbours: mdns::Neighbours,
    neighbour_events: broadcast::Sender<Candidate>,
    dht: Option<dht::DhtService>,
    mdns: Mutex<Option<mdns::MdnsService>>,
    cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(mdns) = self
            .mdns
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            mdns.shutdown_now();
        }
    }
}

impl Discovery {
    /// Starts the configured sources for node `me`, whose QUIC endpoint is
    /// bound to `quic_addrs` (unspecified IPs are expanded to this host's
    /// interface addresses for mDNS and for recognising ourselves).
    ///
    /// The DHT node is created and bootstrapped in the background, so this
    /// returns quickly even when the DHT is unreachable.
    pub async fn start(
        me: PeerId,
        quic_addrs: Vec<SocketAddr>,
        config: DiscoveryConfig,
    ) -> Result<Discovery, DiscoveryError> {
        if quic_addrs.is_empty() {
            return Err(DiscoveryError::NoListenAddr);
        }
        let interfaces = local::interfaces().map_err(DiscoveryError::Interfaces)?;
        let local_ips: Vec<IpAddr> = interfaces.iter().map(|i| i.ip).collect();
        let self_filter = SelfFilter::new(me, &quic_addrs, &local_ips);
        let cancel = CancellationToken::new();
        let neighbours = Arc::new(Mutex::new(HashMap::new()));
        let (neighbour_events, _) = broadcast::channel(256);
        let mut tasks = Vec::new();

        let mdns = if config.mdns {
            let (service, task) = mdns::MdnsService::start(
                me,
                &quic_addrs,
                &interfaces,
                &config,
                neighbours.clone(),
                neighbour_events.clone(),
                cancel.clone(),
            )?;
            tasks.push(task);
            Some(service)
        } else {
            None
        };

        let dht = if config.dht {
            let port = quic_addrs
                .iter()
                .find(|a| a.is_ipv4() || a.ip().is_unspecified())
                .unwrap_or(&quic_addrs[0])
                .port();
            let (service, mut dht_tasks) = dht::DhtService::start(&config, port, cancel.clone());
            tasks.append(&mut dht_tasks);
            Some(service)
        } else {
            None
        };

        Ok(Discovery {
            inner: Arc::new(Inner {
                config,
                self_filter,
                neighbours,
                neighbour_events,
                dht,
                mdns: Mutex::new(mdns),
                cancel,
                tasks: Mutex::new(tasks),
            }),
        })
    }

    /// Streams candidate providers of `hash`: the current and future mDNS
    /// neighbours, then DHT providers as lookups (repeated every
    /// [`DiscoveryConfig::lookup_interval`]) find them. Never this node, each
    /// address once (an address first seen without id is sent again when a
    /// source tells its id). Runs until the receiver is dropped or discovery
    /// shuts down.
    pub fn find(&self, hash: [u8; 32]) -> mpsc::Receiver<Candidate> {
        let (tx, rx) = mpsc::channel(FIND_CHANNEL_CAPACITY);
        if self.inner.cancel.is_cancelled() {
            return rx;
        }
        let lookup = Lookup {
            tx,
            self_filter: self.inner.self_filter.clone(),
            sent: HashMap::new(),
        };
        let neighbours = self.inner.neighbours.clone();
        let events = self.inner.neighbour_events.subscribe();
        let dht = self.inner.dht.as_ref().map(|d| d.lookup_handle());
        let interval = self.inner.config.lookup_interval;
        let cancel = self.inner.cancel.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                () = lookup.run(hash, neighbours, events, dht, interval) => {}
                () = cancel.cancelled() => {}
            }
        });
        self.track(task);
        rx
    }

    /// Announces `hash` to the DHT now and every
    /// [`DiscoveryConfig::reannounce_interval`] until [`Discovery::withdraw`].
    /// Does nothing when announcing or the DHT is off. While the DHT is not
    /// reachable the hash waits and is announced once it is.
    pub fn announce(&self, hash: [u8; 32]) {
        if !self.inner.config.announce {
            return;
        }
        if let Some(dht) = &self.inner.dht {
            dht.announce(hash);
        }
    }

    /// Stops announcing `hash`. Records already stored in the DHT expire
    /// there by themselves (the DHT has no way to take them back).
    pub fn withdraw(&self, hash: [u8; 32]) {
        if let Some(dht) = &self.inner.dht {
            dht.withdraw(hash);
        }
    }

    /// The mDNS neighbours known now, one candidate per address.
    pub fn neighbours(&self) -> Vec<Candidate> {
        snapshot(&self.inner.neighbours)
    }

    /// The UDP address the DHT node is bound to, while it runs.
    pub fn dht_local_addr(&self) -> Option<SocketAddr> {
        self.inner.dht.as_ref()?.local_addr()
    }

    /// Whether the DHT node is running and has found at least one other node.
    pub fn dht_bootstrapped(&self) -> bool {
        self.inner.dht.as_ref().is_some_and(|d| d.is_bootstrapped())
    }

    /// Counters of the DHT source (all zero when the DHT is off).
    pub fn dht_stats(&self) -> DhtStats {
        self.inner
            .dht
            .as_ref()
            .map_or_else(DhtStats::default, |d| d.stats())
    }

    /// The filter this node uses to recognise itself; the node's
    /// [`AddressBook`] can be built on a clone of it.
    pub fn self_filter(&self) -> &SelfFilter {
        &self.inner.self_filter
    }

    /// Unregisters from mDNS and stops every task and the DHT node. Open
    /// [`Discovery::find`] streams end. Idempotent.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        let mdns = self
            .inner
            .mdns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mdns) = mdns {
            mdns.shutdown().await;
        }
        let tasks: Vec<JoinHandle<()>> = std::mem::take(
            &mut *self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for task in tasks {
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                tracing::debug!("discovery task did not stop within 2 s");
            }
        }
        if let Some(dht) = &self.inner.dht {
            dht.stop();
        }
    }

    fn track(&self, task: JoinHandle<()>) {
        let mut tasks = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }
}

/// One running [`Discovery::find`].
struct Lookup {
    tx: mpsc::Sender<Candidate>,
    self_filter: SelfFilter,
    /// Addresses sent, and whether they were sent with an id (at most
    /// [`MAX_SENT`]).
    sent: HashMap<SocketAddr, bool>,
}

impl Lookup {
    async fn run(
        mut self,
        hash: [u8; 32],
        neighbours: mdns::Neighbours,
        mut events: broadcast::Receiver<Candidate>,
        dht: Option<dht::LookupHandle>,
        interval: Duration,
    ) {
        if !self.emit_all(&neighbours).await {
            return;
        }
        let (dht_tx, mut dht_rx) = mpsc::channel::<SocketAddr>(FIND_CHANNEL_CAPACITY);
        let _dht_task = dht.map(|dht| AbortOnDrop(tokio::spawn(dht.run(hash, interval, dht_tx))));
        let mut events_open = true;
        let mut dht_open = true;
        loop {
            tokio::select! {
                () = self.tx.closed() => return,
                event = events.recv(), if events_open => match event {
                    Ok(candidate) => {
                        if !self.emit(candidate).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Missed some neighbour events: send what is known now
                        // (the dedupe drops what was already sent).
                        events = events.resubscribe();
                        if !self.emit_all(&neighbours).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => events_open = false,
                },
                addr = dht_rx.recv(), if dht_open => match addr {
                    Some(addr) => {
                        let candidate = Candidate { addr, id: None, source: Source::Dht };
                        if !self.emit(candidate).await {
                            return;
                        }
                    }
                    None => dht_open = false,
                },
            }
        }
    }

    /// Sends every neighbour known now. Returns `false` when the receiver is
    /// gone.
    async fn emit_all(&mut self, neighbours: &mdns::Neighbours) -> bool {
        let snapshot = snapshot(neighbours);
        for candidate in snapshot {
            if !self.emit(candidate).await {
                return false;
            }
        }
        true
    }

    /// Sends `candidate` unless it is us or already sent. Returns `false`
    /// when the receiver is gone.
    async fn emit(&mut self, candidate: Candidate) -> bool {
        if self.self_filter.is_self(&candidate) {
            return true;
        }
        let key = canonical(candidate.addr);
        let has_id = candidate.id.is_some();
        match self.sent.get(&key) {
            Some(true) => return true,
            Some(false) if !has_id => return true,
            _ => {}
        }
        // Bounded: a long lookup fed made-up DHT values grew this by
        // thousands of addresses a minute. Forgotten, an address may be
        // sent again, which the download takes as one it knows.
        if self.sent.len() >= MAX_SENT {
            self.sent.clear();
        }
        self.sent.insert(key, has_id);
        self.tx.send(candidate).await.is_ok()
    }
}

/// Most addresses a lookup remembers having sent.
const MAX_SENT: usize = 4096;

/// The neighbours known now, sorted by address.
fn snapshot(neighbours: &mdns::Neighbours) -> Vec<Candidate> {
    let map = neighbours.lock().unwrap_or_else(PoisonError::into_inner);
    let mut out: Vec<Candidate> = map.values().flatten().cloned().collect();
    out.sort_by_key(|c| c.addr);
    out
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lookup_remembers_a_bounded_number_of_addresses() {
        let (tx, mut rx) = mpsc::channel(16);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let me = shoal_transport::SecretKey::generate().public();
        let mut lookup = Lookup {
            tx,
            self_filter: SelfFilter::new(me, &[], &[]),
            sent: HashMap::new(),
        };
        // Made-up DHT values: every one a new address.
        for i in 0..3 * MAX_SENT as u32 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 | i);
            let candidate = Candidate {
                addr: SocketAddr::from((ip, 7000)),
                id: None,
                source: Source::Dht,
            };
            assert!(lookup.emit(candidate).await);
            assert!(lookup.sent.len() <= MAX_SENT);
        }
        // What is remembered is still not sent twice.
        let last = SocketAddr::from((
            std::net::Ipv4Addr::from(0x0a00_0000 | (3 * MAX_SENT as u32 - 1)),
            7000,
        ));
        let before = lookup.sent.len();
        assert!(
            lookup
                .emit(Candidate {
                    addr: last,
                    id: None,
                    source: Source::Dht
                })
                .await
        );
        assert_eq!(lookup.sent.len(), before);
        drop(lookup);
        drain.await.unwrap();
    }
}
