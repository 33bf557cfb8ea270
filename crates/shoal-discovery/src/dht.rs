//! The global source: the BitTorrent Mainline DHT through `mainline` 8.
//!
//! Three tasks share the current DHT node through a `watch` channel:
//! the supervisor creates the node, checks that it bootstrapped, and if not
//! drops it and tries again later; the announcer keeps the announced hashes
//! fresh; each lookup runs `get_peers` again and again while it is wanted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use mainline::async_dht::AsyncDht;
use mainline::{Dht, Id};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::DiscoveryConfig;
use crate::address_book::{Scope, plausible_within, scope};

/// The context string of the key derivation in [`dht_key`].
pub const DHT_KEY_CONTEXT: &str = "shoal dht v1";

/// The pause before the second attempt to reach the DHT; it doubles up to
/// [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(30);
/// The longest pause between two attempts to reach the DHT.
const RETRY_MAX: Duration = Duration::from_secs(10 * 60);
/// The longest pause before a failed announce is tried again.
const ANNOUNCE_RETRY: Duration = Duration::from_secs(30);
/// The pause after a lookup that found nobody; it doubles up to the lookup
/// interval. A provider's announce may land just after a lookup started
/// (both sides bootstrapping at once): do not make the downloader wait a
/// whole interval for it.
const EMPTY_LOOKUP_RETRY: Duration = Duration::from_secs(2);
/// How many announces run at once.
const ANNOUNCE_CONCURRENCY: usize = 8;

/// The 20-byte DHT key (BitTorrent "info hash") under which providers of the
/// 32-byte BLAKE3 `hash` announce themselves: the first 20 bytes of
/// `blake3::derive_key("shoal dht v1", hash)`.
///
/// Deriving (rather than truncating) keeps shoal's keys apart from anyone
/// else's use of the same bytes, and the version in the context lets a
/// future scheme live beside this one.
pub fn dht_key(hash: &[u8; 32]) -> [u8; 20] {
    let derived = blake3::derive_key(DHT_KEY_CONTEXT, hash);
    let mut key = [0; 20];
    key.copy_from_slice(&derived[..20]);
    key
}

type State = watch::Sender<Option<AsyncDht>>;

/// Counters of the DHT source, for status displays and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DhtStats {
    /// Announces that reached at least one DHT node.
    pub announces: u64,
    /// Announces that failed (no node answered, or all refused).
    pub failed_announces: u64,
    /// `get_peers` lookups run to their end.
    pub lookups: u64,
    /// Hashes announced now (again every interval until withdrawn).
    pub announcing: u64,
}

#[derive(Default)]
struct Counters {
    announces: AtomicU64,
    failed_announces: AtomicU64,
    lookups: AtomicU64,
    announcing: AtomicU64,
}

enum Command {
    Announce([u8; 32]),
    Withdraw([u8; 32]),
}

/// The DHT side of a running `Discovery`.
pub(crate) struct DhtService {
    state: Arc<State>,
    local_addr: Arc<Mutex<Option<SocketAddr>>>,
    bootstrapped: Arc<AtomicBool>,
    commands: mpsc::UnboundedSender<Command>,
    counters: Arc<Counters>,
    reach: Scope,
}

/// What a lookup needs: the current DHT node, when there is one.
pub(crate) struct LookupHandle {
    state: watch::Receiver<Option<AsyncDht>>,
    counters: Arc<Counters>,
    /// How narrowly the DHT's answers may reach ([`dht_reach`]).
    reach: Scope,
}

/// How narrowly the addresses a DHT answers with may reach: a DHT
/// bootstrapped only on public nodes (or on the default ones) is the
/// public DHT, which records a peer at the address its announce came
/// from, so only public addresses are plausible in it; one bootstrapped on
/// a private or loopback address is a lab's or a LAN's, whose peers have
/// such addresses.
pub(crate) fn dht_reach(bootstrap: &[SocketAddr]) -> Scope {
    bootstrap
        .iter()
        .map(|a| scope(a.ip()))
        .min()
        .unwrap_or(Scope::Global)
}

#[derive(Clone)]
struct Settings {
    bootstrap: Vec<SocketAddr>,
    server_mode: bool,
}

impl DhtService {
    /// Spawns the supervisor (which creates the DHT node in the background)
    /// and the announcer, which announces `quic_port`.
    pub(crate) fn start(
        config: &DiscoveryConfig,
        quic_port: u16,
        cancel: CancellationToken,
    ) -> (DhtService, Vec<JoinHandle<()>>) {
        let (state, _) = watch::channel(None);
        let state = Arc::new(state);
        let local_addr = Arc::new(Mutex::new(None));
        let bootstrapped = Arc::new(AtomicBool::new(false));
        let (commands, command_rx) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let settings = Settings {
            bootstrap: config.dht_bootstrap.clone(),
            server_mode: config.dht_server_mode,
        };
        let supervisor = tokio::spawn(supervise(
            settings,
            state.clone(),
            local_addr.clone(),
            bootstrapped.clone(),
            cancel.clone(),
        ));
        let announcer = tokio::spawn(announce_loop(
            command_rx,
            state.subscribe(),
            quic_port,
            config.reannounce_interval,
            counters.clone(),
            cancel,
        ));
        let service = DhtService {
            state,
            local_addr,
            bootstrapped,
            commands,
            counters,
            reach: dht_reach(&config.dht_bootstrap),
        };
        (service, vec![supervisor, announcer])
    }

    pub(crate) fn announce(&self, hash: [u8; 32]) {
        let _ = self.commands.send(Command::Announce(hash));
    }

    pub(crate) fn withdraw(&self, hash: [u8; 32]) {
        let _ = self.commands.send(Command::Withdraw(hash));
    }

    pub(crate) fn lookup_handle(&self) -> LookupHandle {
        LookupHandle {
            state: self.state.subscribe(),
            counters: self.counters.clone(),
            reach: self.reach,
        }
    }

    pub(crate) fn stats(&self) -> DhtStats {
        DhtStats {
            announces: self.counters.announces.load(Ordering::Relaxed),
            failed_announces: self.counters.failed_announces.load(Ordering::Relaxed),
            lookups: self.counters.lookups.load(Ordering::Relaxed),
            announcing: self.counters.announcing.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        *self
            .local_addr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn is_bootstrapped(&self) -> bool {
        self.bootstrapped.load(Ordering::Relaxed)
    }

    /// Forgets the DHT node; its thread ends once the tasks holding it have
    /// stopped.
    pub(crate) fn stop(&self) {
        self.state.send_replace(None);
        *self
            .local_addr
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Creates the node (bind, and DNS for the default bootstrap nodes, are
/// blocking: done on the blocking pool).
async fn build(settings: &Settings, port: Option<u16>) -> std::io::Result<AsyncDht> {
    let settings = settings.clone();
    let built = tokio::task::spawn_blocking(move || {
        let mut builder = Dht::builder();
        if !settings.bootstrap.is_empty() {
            builder.bootstrap(&settings.bootstrap);
        }
        if settings.server_mode {
            builder.server_mode();
        }
        if let Some(port) = port {
            builder.port(port);
        }
        builder.build()
    })
    .await
    .map_err(std::io::Error::other)?;
    Ok(built?.as_async())
}

async fn supervise(
    settings: Settings,
    state: Arc<State>,
    local_addr: Arc<Mutex<Option<SocketAddr>>>,
    bootstrapped: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    let mut port = None;
    let mut pause = RETRY_MIN;
    let mut warned = false;
    let bootstrap_text = if settings.bootstrap.is_empty() {
        "mainline's default bootstrap nodes".to_owned()
    } else {
        format!("{:?}", settings.bootstrap)
    };
    loop {
        let built = tokio::select! {
            () = cancel.cancelled() => return,
            built = build(&settings, port) => built,
        };
        let dht = match built {
            Ok(dht) => dht,
            Err(err) if port.is_some() => {
                // Our old port is taken meanwhile: take any.
                tracing::debug!(%err, "dht: old port unavailable, binding another");
                port = None;
                continue;
            }
            Err(err) => {
                if !warned {
                    tracing::warn!(%err, "dht: cannot start the dht node; going on with the other sources");
                    warned = true;
                } else {
                    tracing::debug!(%err, "dht: cannot start the dht node");
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(RETRY_MAX);
                continue;
            }
        };
        let addr = dht.info().await.local_addr();
        port = Some(addr.port());
        *local_addr.lock().unwrap_or_else(PoisonError::into_inner) = Some(addr.into());
        state.send_replace(Some(dht.clone()));
        tracing::debug!(%addr, "dht: node started, bootstrapping");

        let ok = tokio::select! {
            () = cancel.cancelled() => return,
            ok = dht.bootstrapped() => ok,
        };
        if ok {
            bootstrapped.store(true, Ordering::Relaxed);
            if warned {
                tracing::info!(%addr, "dht: reachable now");
            } else {
                tracing::debug!(%addr, "dht: bootstrapped");
            }
            // From here on mainline keeps its routing table up by itself.
            cancel.cancelled().await;
            return;
        }
        if !warned {
            tracing::warn!(
                bootstrap = %bootstrap_text,
                "dht: no bootstrap node answered; going on with the other sources, retrying in the background"
            );
            warned = true;
        } else {
            tracing::debug!(bootstrap = %bootstrap_text, retry_in = ?pause, "dht: still unreachable");
        }
        // Drop the node: mainline would otherwise retry its bootstrap (and
        // log an error) every request timeout, forever.
        state.send_replace(None);
        *local_addr.lock().unwrap_or_else(PoisonError::into_inner) = None;
        drop(dht);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(RETRY_MAX);
    }
}

async fn announce_loop(
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut state: watch::Receiver<Option<AsyncDht>>,
    port: u16,
    interval: Duration,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) {
    // Hash -> when to announce it next.
    let mut due: HashMap<[u8; 32], Instant> = HashMap::new();
    loop {
        let dht = state.borrow_and_update().clone();
        let next = due.values().min().copied();
        tokio::select! {
            () = cancel.cancelled() => return,
            command = commands.recv() => match command {
                None => return,
                Some(Command::Announce(hash)) => {
                    due.entry(hash).or_insert_with(Instant::now);
                    counters.announcing.store(due.len() as u64, Ordering::Relaxed);
                }
                Some(Command::Withdraw(hash)) => {
                    due.remove(&hash);
                    counters.announcing.store(due.len() as u64, Ordering::Relaxed);
                }
            },
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                // A new node has announced nothing yet.
                if state.borrow().is_some() {
                    let now = Instant::now();
                    due.values_mut().for_each(|at| *at = now);
                }
            }
            () = sleep_until(next), if dht.is_some() && next.is_some() => {
                let Some(dht) = dht else { continue };
                let now = Instant::now();
                let batch: Vec<[u8; 32]> = due
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(hash, _)| *hash)
                    .collect();
                let results = futures::stream::iter(batch)
                    .map(|hash| {
                        let dht = dht.clone();
                        async move {
                            let key = Id::from(dht_key(&hash));
                            let started = Instant::now();
                            match dht.announce_peer(key, Some(port)).await {
                                Ok(_) => {
                                    tracing::debug!(%key, port, took = ?started.elapsed(), "dht: announced");
                                    (hash, true)
                                }
                                Err(err) => {
                                    tracing::debug!(%key, %err, "dht: announce failed");
                                    (hash, false)
                                }
                            }
                        }
                    })
                    .buffer_unordered(ANNOUNCE_CONCURRENCY)
                    .collect();
                // A round of lookups can take minutes (a large store, a
                // slow DHT): shutting down does not wait for it.
                let results: Vec<([u8; 32], bool)> = tokio::select! {
                    r = results => r,
                    () = cancel.cancelled() => return,
                };
                let now = Instant::now();
                for (hash, ok) in results {
                    let counter = if ok { &counters.announces } else { &counters.failed_announces };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if let Some(at) = due.get_mut(&hash) {
                        *at = now + if ok { interval } else { interval.min(ANNOUNCE_RETRY) };
                    }
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl LookupHandle {
    /// Runs `get_peers` for `hash` whenever a DHT node is there, pausing
    /// `interval` between two runs, and sends every address found, until
    /// `tx` closes.
    pub(crate) async fn run(
        mut self,
        hash: [u8; 32],
        interval: Duration,
        tx: mpsc::Sender<SocketAddr>,
    ) {
        let key = Id::from(dht_key(&hash));
        let mut empty_pause = EMPTY_LOOKUP_RETRY;
        loop {
            let dht = self.state.borrow_and_update().clone();
            let Some(dht) = dht else {
                tokio::select! {
                    () = tx.closed() => return,
                    changed = self.state.changed() => if changed.is_err() { return },
                }
                continue;
            };
            let started = Instant::now();
            let mut found = 0usize;
            let mut stream = dht.get_peers(key);
            // The stream does not need the handle; not holding it lets the
            // node stop when the supervisor drops it.
            drop(dht);
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    batch = stream.next() => match batch {
                        Some(batch) => {
                            for addr in batch {
                                let addr = SocketAddr::V4(addr);
                                // Any DHT node may answer, with any value.
                                if !plausible_within(addr, self.reach) {
                                    tracing::debug!(%addr, "dht: implausible peer address left out");
                                    continue;
                                }
                                found += 1;
                                if tx.send(addr).await.is_err() {
                                    return;
                                }
                            }
                        }
                        None => break,
                    },
                }
            }
            self.counters.lookups.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%key, found, took = ?started.elapsed(), "dht: lookup done");
            let pause = if found == 0 {
                let pause = empty_pause.min(interval);
                empty_pause = (empty_pause * 2).min(interval);
                pause
            } else {
                empty_pause = EMPTY_LOOKUP_RETRY;
                interval
            };
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(pause) => {}
                changed = self.state.changed() => if changed.is_err() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_derivation_is_fixed() {
        let zero = dht_key(&[0; 32]);
        let derived = blake3::derive_key("shoal dht v1", &[0; 32]);
        assert_eq!(zero[..], derived[..20]);
        assert_ne!(dht_key(&[0; 32]), dht_key(&[1; 32]));
        // Not a plain truncation of the hash.
        let hash = *blake3::hash(b"shoal").as_bytes();
        assert_ne!(dht_key(&hash)[..], hash[..20]);
    }

    #[test]
    fn the_dht_reaches_as_far_as_its_narrowest_bootstrap_node() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        // The default bootstrap is the public DHT.
        assert_eq!(dht_reach(&[]), Scope::Global);
        assert_eq!(dht_reach(&[a("67.215.246.10:6881")]), Scope::Global);
        assert_eq!(
            dht_reach(&[a("67.215.246.10:6881"), a("10.9.0.1:6881")]),
            Scope::Site
        );
        assert_eq!(
            dht_reach(&[a("127.0.0.1:6881"), a("10.9.0.1:6881")]),
            Scope::Host
        );
        // What a lookup keeps of a value, then.
        let public = dht_reach(&[]);
        assert!(plausible_within(a("198.51.100.1:4000"), public));
        assert!(!plausible_within(a("127.0.0.1:53"), public));
        assert!(!plausible_within(a("192.168.1.1:80"), public));
        assert!(plausible_within(a("10.9.0.7:4000"), Scope::Site));
        assert!(!plausible_within(a("127.0.0.1:4000"), Scope::Site));
        assert!(plausible_within(a("127.0.0.1:4000"), Scope::Host));
        assert!(!plausible_within(a("127.0.0.1:0"), Scope::Host));
    }
}
