//! The node: owns the store, the endpoint and discovery, accepts
//! connections, and runs downloads.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shoal_discovery::{Candidate, Discovery, DiscoveryConfig, Source};
use shoal_proto::{GroupRanges, PROTOCOL_VERSION, limits, pb};
use shoal_store::{BlobKind, Hash, ImportMode, Store, StoreEvent};
use shoal_transport::{
    Connection, Endpoint, EndpointConfig, PeerId, SecretKey, Ticket, TicketKind,
};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::choke::Answers;
use crate::error::NodeError;
use crate::peerbook::{PeerBook, PeerCounters};
use crate::wire::{read_frame, write_frame};
use crate::{Progress, server};

/// How a node is set up.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where the identity, the store and the control socket live; `None`
    /// runs with an in-memory store and a fresh identity.
    pub data_dir: Option<PathBuf>,
    /// Addresses to listen on (port 0 picks a free port).
    pub listen: Vec<SocketAddr>,
    /// Peers to connect to at start and to ask for everything.
    pub peers: Vec<PeerAddr>,
    /// Discovery sources and announcing.
    pub discovery: DiscoveryConfig,
    /// Global upload limit in bytes per second.
    pub upload_limit: Option<u64>,
    /// Global download limit in bytes per second.
    pub download_limit: Option<u64>,
    /// Open the control socket in the data dir (ignored without one).
    pub control_socket: bool,
    /// Give a download up after this long without any verified progress.
    pub stall_timeout: Duration,
    /// Drop an answer (a `Get` or `GetBlobs`) once the peer has taken none
    /// of its bytes for this long: a peer that asks and never reads would
    /// otherwise hold the answer's buffers and its reading thread for good.
    pub send_stall_timeout: Duration,
    /// Answers (`Get`, `GetBlobs`) sent at once, over all peers; further
    /// requests wait their turn.
    pub max_answers: usize,
    /// When a request waits for an answer slot, the slowest answer that has
    /// run this long gives its slot up (see `choke.rs`).
    pub choke_after: Duration,
    /// A node that stops once its one job is done (`shoal get`'s own):
    /// its status says so, so that a command on the same data dir does not
    /// hand it what must outlive it (`shoal send`, a ticket).
    pub short_lived: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            data_dir: None,
            listen: EndpointConfig::default().listen,
            peers: Vec::new(),
            discovery: DiscoveryConfig {
                mdns: false,
                dht: false,
                ..DiscoveryConfig::default()
            },
            upload_limit: None,
            download_limit: None,
            control_socket: true,
            stall_timeout: Duration::from_secs(60),
            send_stall_timeout: Duration::from_secs(60),
            max_answers: server::MAX_ANSWERS,
            choke_after: Duration::from_secs(10),
            short_lived: false,
        }
    }
}

/// A peer address as given by a user: `IP:PORT` or `PEERID@IP:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// The key the peer must hold, if known.
    pub id: Option<PeerId>,
    /// Where to dial.
    pub addr: SocketAddr,
}

impl std::str::FromStr for PeerAddr {
    type Err = NodeError;
    fn from_str(s: &str) -> Result<Self, NodeError> {
        let bad = || NodeError::BadPeerAddr(s.to_string());
        match s.split_once('@') {
            Some((id, addr)) => Ok(PeerAddr {
                id: Some(id.parse().map_err(|_| bad())?),
                addr: addr.parse().map_err(|_| bad())?,
            }),
            None => Ok(PeerAddr {
                id: None,
                addr: s.parse().map_err(|_| bad())?,
            }),
        }
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.id {
            Some(id) => write!(f, "{id}@{}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// One transfer in flight, for `status`.
#[derive(Debug, Clone)]
pub struct TransferInfo {
    /// What is being fetched.
    pub hash: Hash,
    /// Its progress.
    pub progress: Progress,
}

/// A running shoal node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

/// Requests told to subscribers that a slow one may fall behind by; it
/// then misses some (they are hints).
const FETCHING_BACKLOG: usize = 256;

/// Peers just connected that a busy download may fall behind by; those it
/// misses it can still hear of through peer exchange.
const ARRIVALS_BACKLOG: usize = 64;

/// The requests made through the control socket.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ControlRequests {
    /// Being answered now.
    pub(crate) running: usize,
    /// No more are taken ([`Node::close_control`]).
    pub(crate) closed: bool,
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) endpoint: Endpoint,
    pub(crate) discovery: Option<Discovery>,
    pub(crate) config: NodeConfig,
    pub(crate) book: Mutex<PeerBook>,
    /// The fetches running (`Node::fetch`), by the hash asked for: what
    /// `status` shows, and what an unpin of that hash calls off.
    pub(crate) fetches: Mutex<HashMap<Hash, Vec<Fetching>>>,
    /// The next [`Fetching::id`].
    pub(crate) next_fetch: std::sync::atomic::AtomicU64,
    /// The groups this node's downloads have just asked peers for, told to
    /// the peers subscribed to its have updates (`server::on_subscribe`).
    pub(crate) fetching: tokio::sync::broadcast::Sender<(Hash, GroupRanges)>,
    /// Peers that have just connected to this node (their id and the
    /// address they came from): downloads under way ask them at once,
    /// where they would otherwise hear of them only if another peer told
    /// them (peer exchange).
    pub(crate) arrivals: tokio::sync::broadcast::Sender<(PeerId, SocketAddr)>,
    /// Requests made through the control socket and not answered yet
    /// (see [`Node::control_requests_done`]).
    pub(crate) control_requests: watch::Sender<ControlRequests>,
    /// Blobs whose file in place changed since it was added and that are
    /// being hashed again (see `server::recheck`), so each is re-hashed
    /// once per change, however many peers ask.
    pub(crate) rechecking: Arc<Mutex<std::collections::HashSet<Hash>>>,
    /// One re-hash at a time: a directory of touched files is re-read one
    /// file after another, not all at once.
    pub(crate) recheck_slot: Arc<tokio::sync::Semaphore>,
    /// Answers being read from the store and sent, node-wide (see
    /// `server::MAX_ANSWERS` and `choke.rs`).
    pub(crate) answers: Answers,
    /// Connections whose incoming streams are being served, by peer
    /// (their `stable_id`s): a peer may have two for a moment (a double
    /// dial the peer settles). Keyed by peer alone, the second overwrote
    /// the first's entry and took it away when it closed: the peer was no
    /// longer asked directly, and a later connect served the first twice
    /// (a review).
    handled: Mutex<HashMap<PeerId, std::collections::HashSet<usize>>>,
    /// This run's `Hello.instance` (see [`new_instance`]).
    pub(crate) instance: [u8; 16],
    /// Each peer's connections that said hello, and the instance each
    /// said (see [`Inner::record_hello`]); a connection leaves when its
    /// handler ends.
    instances: Mutex<HashMap<PeerId, Runs>>,
    /// Each connected peer's recent upload and download rates, sampled
    /// every second from its connection's byte counters.
    rates: Mutex<HashMap<PeerId, PeerRates>>,
    /// The node's own, from the endpoint's counters (up, down).
    node_rates: Mutex<(crate::RateMeter, crate::RateMeter)>,
    /// Held across "is it pinned? announce it", and by an unpin (after
    /// the store's) to withdraw: an announce whose check saw the pin comes
    /// before the withdrawal, and one that checks after the unpin sees it
    /// (an unpin between a check and its announce left the node
    /// announcing what it no longer keeps).
    announcing: Mutex<()>,
    /// One download per blob at a time (see `download::Downloading`).
    pub(crate) downloading: crate::download::Downloading,
    /// One fetch of a collection's members at a time per collection (see
    /// `fetch::Collections`).
    pub(crate) collections: crate::fetch::Collections,
    /// Hashes added or fetched through the control socket (by other
    /// commands on the data dir), see [`Node::asked_through_control`].
    pub(crate) asked_through_control: Mutex<std::collections::HashSet<Hash>>,
    pub(crate) cancel: CancellationToken,
    tasks: Mutex<JoinSet<()>>,
}

/// A peer's connections that said hello, with the instance each said
/// (see [`Inner::record_hello`]).
#[derive(Default)]
struct Runs {
    said: Vec<(Connection, Vec<u8>)>,
    /// Instances whose connections were closed as an earlier run's (the
    /// last few).
    retired: VecDeque<Vec<u8>>,
    /// A retired instance said hello again: two live processes share this
    /// peer id (a data dir copied, with its key). Closing each one's
    /// connections on the other's hello would knock them off in turn, so
    /// nothing is closed for this peer any more.
    twins: bool,
}

/// Retired instances remembered per peer.
const RETIRED_RUNS: usize = 4;

/// A fetch under way (see [`Inner::fetches`]).
pub(crate) struct Fetching {
    pub(crate) id: u64,
    pub(crate) progress: watch::Receiver<Progress>,
    /// A child of the node's: cancelled by an unpin of the hash, or when
    /// the node stops.
    pub(crate) cancel: CancellationToken,
}

impl Inner {
    /// Calls off every fetch of `hash` under way; returns how many.
    pub(crate) fn cancel_fetches(&self, hash: &Hash) -> usize {
        let fetches = lock(&self.fetches);
        let list = fetches.get(hash).map_or(&[][..], Vec::as_slice);
        for f in list {
            f.cancel.cancel();
        }
        list.len()
    }

    /// Announces `hash` on the DHT if it is pinned: what is pinned, as at
    /// start. A fetched collection's members (unpinned, kept by it) are
    /// found through it; announcing each of ten thousand files (a DHT
    /// lookup each, every 20 minutes) swamped the DHT.
    pub(crate) fn announce_if_pinned(&self, hash: &Hash) {
        let Some(d) = &self.discovery else { return };
        let _one_step = lock(&self.announcing);
        if self.store.info(hash).is_some_and(|b| b.pinned) {
            d.announce(*hash.as_bytes());
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind
    // that is still consistent enough to read; do not cascade the panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Node {
    /// Starts a node: opens the store, binds the endpoint, starts discovery
    /// and the control socket, and begins serving.
    pub async fn spawn(config: NodeConfig) -> Result<Node, NodeError> {
        let (store, secret) = match &config.data_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| NodeError::DataDir(dir.clone(), e))?;
                let secret = SecretKey::load_or_create(&dir.join("identity.key"))?;
                let store = Store::open(&dir.join("store"))?;
                // Its secret key is beside the store: never shared.
                store.keep_private(dir)?;
                (store, secret)
            }
            None => (Store::in_memory(), SecretKey::generate()),
        };
        Self::spawn_with(config, store, secret).await
    }

    /// Starts a node on a store and identity the caller already has.
    pub async fn spawn_with(
        config: NodeConfig,
        store: Store,
        secret: SecretKey,
    ) -> Result<Node, NodeError> {
        let ep_config = EndpointConfig {
            listen: config.listen.clone(),
            upload_limit: config.upload_limit,
            download_limit: config.download_limit,
            ..EndpointConfig::default()
        };
        let endpoint = Endpoint::bind(secret, ep_config).await?;
        let discovery = if config.discovery.mdns || config.discovery.dht {
            match Discovery::start(
                endpoint.peer_id(),
                endpoint.local_addrs(),
                config.discovery.clone(),
            )
            .await
            {
                Ok(d) => Some(d),
                Err(e) => {
                    warn!("discovery is off: {e}");
                    None
                }
            }
        } else {
            None
        };
        let answers = Answers::new(config.max_answers.max(1), config.choke_after);
        let inner = Arc::new(Inner {
            store,
            endpoint,
            discovery,
            config,
            book: Mutex::new(PeerBook::default()),
            fetches: Mutex::new(HashMap::new()),
            next_fetch: std::sync::atomic::AtomicU64::new(0),
            rates: Mutex::new(HashMap::new()),
            node_rates: Mutex::new((
                crate::RateMeter::new(RATE_SAMPLE),
                crate::RateMeter::new(RATE_SAMPLE),
            )),
            announcing: Mutex::new(()),
            downloading: Default::default(),
            collections: Default::default(),
            asked_through_control: Default::default(),
            fetching: tokio::sync::broadcast::channel(FETCHING_BACKLOG).0,
            arrivals: tokio::sync::broadcast::channel(ARRIVALS_BACKLOG).0,
            rechecking: Arc::default(),
            recheck_slot: Arc::new(tokio::sync::Semaphore::new(1)),
            answers,
            control_requests: watch::channel(ControlRequests::default()).0,
            handled: Mutex::new(HashMap::new()),
            instance: new_instance(),
            instances: Mutex::new(HashMap::new()),
            cancel: CancellationToken::new(),
            tasks: Mutex::new(JoinSet::new()),
        });
        let node = Node { inner };
        node.start_tasks()?;
        Ok(node)
    }

    fn start_tasks(&self) -> Result<(), NodeError> {
        let inner = &self.inner;
        // Announce what we hold.
        for b in inner.store.list() {
            if b.complete && b.pinned {
                inner.announce_if_pinned(&b.hash);
            }
        }
        let mut tasks = lock(&inner.tasks);
        // Accept connections.
        let i = inner.clone();
        tasks.spawn(async move {
            loop {
                let conn = tokio::select! {
                    c = i.endpoint.accept() => c,
                    () = i.cancel.cancelled() => None,
                };
                let Some(conn) = conn else { break };
                debug!(peer = %conn.peer_id(), addr = %conn.remote_addr(), "incoming connection");
                lock(&i.book).add_addrs(conn.peer_id(), [conn.remote_addr()]);
                i.ensure_handled(&conn);
                // None may be listening (no download under way).
                let _ = i.arrivals.send((conn.peer_id(), conn.remote_addr()));
            }
        });
        // Sample each connected peer's rates.
        let i = inner.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = i.cancel.cancelled() => break,
                }
                let now = std::time::Instant::now();
                {
                    let s = i.endpoint.stats();
                    let mut r = lock(&i.node_rates);
                    r.0.update(now, s.bytes_sent);
                    r.1.update(now, s.bytes_received);
                }
                let conns = i.endpoint.connections();
                let mut rates = lock(&i.rates);
                rates.retain(|id, _| conns.iter().any(|c| c.peer_id() == *id));
                for c in conns {
                    let s = c.stats();
                    let r = rates
                        .entry(c.peer_id())
                        .or_insert_with(|| PeerRates::new(c.stable_id()));
                    // Another connection now stands for the peer: its
                    // counters start from its own zero (taking one's from
                    // the other's read 40 MB/s for a peer gone: a review).
                    if r.conn != c.stable_id() {
                        *r = PeerRates::new(c.stable_id());
                    }
                    r.up.update(now, s.bytes_sent);
                    r.down.update(now, s.bytes_received);
                }
            }
        });
        // Announce blobs as they complete.
        let i = inner.clone();
        let mut events = inner.store.subscribe();
        tasks.spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = events.recv() => ev,
                    () = i.cancel.cancelled() => break,
                };
                match ev {
                    // What is pinned, as at start: a fetched collection's
                    // members (unpinned, kept by it) are found through it,
                    // and announcing each of ten thousand files (a DHT
                    // lookup each, every 20 minutes) swamped the DHT.
                    Ok(StoreEvent::Complete { hash }) => i.announce_if_pinned(&hash),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        // Static peers: connect now so that they serve and know us.
        for p in inner.config.peers.clone() {
            let i = inner.clone();
            tasks.spawn(async move {
                if let Err(e) = i.connect(p.addr, p.id).await {
                    warn!("could not reach peer {p}: {e}");
                }
            });
        }
        // The control socket.
        if let (Some(dir), true) = (&inner.config.data_dir, inner.config.control_socket) {
            let listener = crate::control::bind(&dir.join(crate::control::SOCKET_NAME))?;
            let node = self.clone();
            tasks.spawn(async move { crate::control::serve(node, listener).await });
        }
        Ok(())
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.endpoint.peer_id()
    }

    /// Addresses other peers can dial, with real ports (unspecified
    /// addresses expanded to this machine's interface addresses).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        dialable(&self.inner.endpoint.local_addrs())
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Discovery, when a source runs (for status displays and tests).
    pub fn discovery(&self) -> Option<&Discovery> {
        self.inner.discovery.as_ref()
    }

    /// The endpoint (for byte counters and tests).
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// Whether another command on the data dir added or fetched `hash`
    /// through this node's control socket (`send` keeps pinned at exit
    /// what a user's `add` pinned meanwhile: it unpinned it; a review).
    pub fn asked_through_control(&self, hash: &Hash) -> bool {
        lock(&self.inner.asked_through_control).contains(hash)
    }

    /// Imports a file or directory and serves it at once.
    pub async fn add_path(
        &self,
        path: &Path,
        mode: ImportMode,
    ) -> Result<(Hash, BlobKind), NodeError> {
        let store = self.inner.store.clone();
        let path = path.to_path_buf();
        let res = tokio::task::spawn_blocking(move || -> Result<(Hash, BlobKind), NodeError> {
            let meta = std::fs::metadata(&path).map_err(|e| NodeError::Read(path.clone(), e))?;
            if meta.is_dir() {
                Ok((store.import_dir(&path, mode)?, BlobKind::Collection))
            } else {
                Ok((store.import_file(&path, mode)?, BlobKind::Raw))
            }
        })
        .await
        .map_err(|e| NodeError::Internal(e.to_string()))??;
        self.announce(&res.0);
        Ok(res)
    }

    /// Imports bytes and serves them at once.
    pub async fn add_bytes(
        &self,
        data: impl Into<bytes::Bytes>,
        name: &str,
    ) -> Result<Hash, NodeError> {
        let store = self.inner.store.clone();
        let data: bytes::Bytes = data.into();
        let name = name.to_string();
        let hash = tokio::task::spawn_blocking(move || store.import_bytes(&data, &name))
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))??;
        self.announce(&hash);
        Ok(hash)
    }

    /// Announces `hash` if it is pinned (see [`Inner::announce_if_pinned`]).
    pub(crate) fn announce(&self, hash: &Hash) {
        self.inner.announce_if_pinned(hash);
    }

    /// Unpins `hash` (gc may then free it), calls off its fetches under
    /// way (they fail with [`NodeError::Cancelled`]), and stops
    /// announcing it.
    pub fn unpin(&self, hash: &Hash) -> Result<(), NodeError> {
        // Called off first: a fetch that pins as it goes (a collection's
        // manifest) cannot pin it again after the unpin. A download that
        // ran on would have kept fetching what the user dropped, with no
        // way to stop it short of stopping the node.
        let cancelled = self.inner.cancel_fetches(hash);
        if cancelled > 0 {
            debug!(%hash, cancelled, "unpinned: its fetches are called off");
        }
        // Not held across the store's write (a durable commit). A fetch
        // called off before any peer offered the blob left nothing in the
        // store: unpinning it is done.
        match self.inner.store.unpin(hash) {
            Ok(()) => {}
            Err(shoal_store::StoreError::NotFound(_)) if cancelled > 0 => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(d) = &self.inner.discovery {
            let _after_any_check = lock(&self.inner.announcing);
            d.withdraw(*hash.as_bytes());
        }
        Ok(())
    }

    /// A ticket for `hash` naming this node as provider.
    pub fn ticket(&self, hash: &Hash) -> Result<Ticket, NodeError> {
        let info = self
            .inner
            .store
            .info(hash)
            .ok_or(NodeError::NotInStore(*hash))?;
        let kind = match info.kind {
            BlobKind::Collection => TicketKind::Collection,
            _ => TicketKind::Blob,
        };
        Ok(Ticket {
            hash: *hash.as_bytes(),
            kind,
            providers: vec![shoal_transport::Provider {
                id: self.peer_id(),
                addrs: ticket_addrs(&self.addrs()),
            }],
        })
    }

    /// Transfers in flight.
    pub fn transfers(&self) -> Vec<TransferInfo> {
        let t = lock(&self.inner.fetches);
        // Two fetches of one hash are one download (`download::Downloading`):
        // shown once.
        t.iter()
            .filter_map(|(h, f)| {
                f.first().map(|f| TransferInfo {
                    hash: *h,
                    progress: f.progress.borrow().clone(),
                })
            })
            .collect()
    }

    /// Answers this node gave up, since it started, to serve a request
    /// that waited for a slot (choked, see `NodeConfig::choke_after`).
    pub fn answers_choked(&self) -> u64 {
        self.inner.answers.choked()
    }

    /// The node's upload and download rates (bytes per second, all
    /// connections), sampled every second.
    pub fn rates(&self) -> (u64, u64) {
        let r = lock(&self.inner.node_rates);
        (r.0.rate(), r.1.rate())
    }

    /// Peers known, with connection state and byte counters: those
    /// connected first, then by the bytes moved, then by id (the order
    /// changed from one call to the next: a review).
    pub fn peers(&self) -> Vec<PeerInfo> {
        let book = lock(&self.inner.book);
        let counters: HashMap<PeerId, PeerCounters> = book.counters().into_iter().collect();
        let mut ids = book.known();
        let known: std::collections::HashSet<PeerId> = ids.iter().copied().collect();
        ids.extend(counters.keys().filter(|id| !known.contains(id)));
        let rates = lock(&self.inner.rates);
        let mut all: Vec<PeerInfo> = ids
            .into_iter()
            .map(|id| {
                let conn = self
                    .inner
                    .endpoint
                    .connection(&id)
                    .filter(|c| !c.is_closed());
                // The rates of the connection that stands for the peer,
                // and 0 when there is none (as documented: one closed a
                // moment ago still showed its last rate).
                let r = conn
                    .as_ref()
                    .and_then(|c| rates.get(&id).filter(|r| r.conn == c.stable_id()));
                PeerInfo {
                    upload_rate: r.map_or(0, |r| r.up.rate()),
                    download_rate: r.map_or(0, |r| r.down.rate()),
                    id,
                    addrs: book.addrs(&id),
                    connected: conn.is_some(),
                    counters: counters.get(&id).copied().unwrap_or_default(),
                }
            })
            .collect();
        let moved = |p: &PeerInfo| p.counters.uploaded.saturating_add(p.counters.downloaded);
        all.sort_by(|a, b| {
            b.connected
                .cmp(&a.connected)
                .then(moved(b).cmp(&moved(a)))
                .then(a.id.cmp(&b.id))
        });
        all
    }

    /// Stops serving and downloading; partial state stays in the store.
    pub async fn shutdown(&self) {
        self.close_control();
        self.inner.cancel.cancel();
        if let Some(d) = &self.inner.discovery {
            d.shutdown().await;
        }
        self.inner.endpoint.close().await;
        let mut tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        if let Some(dir) = &self.inner.config.data_dir {
            let _ = std::fs::remove_file(dir.join(crate::control::SOCKET_NAME));
        }
    }

    /// The requests on the store or for a download (an add, a listing, a
    /// get...) that other commands made of this node through its control
    /// socket and that are not answered yet.
    pub fn control_requests(&self) -> usize {
        self.inner.control_requests.borrow().running
    }

    /// Takes no more requests on the store or for a download through the
    /// control socket (one made from now on is answered
    /// [`NodeError::ShuttingDown`], and the CLI that made it makes it
    /// again of whichever node runs next, or of the store itself; a
    /// status, a peer list or a ticket is still answered); returns how
    /// many are still being answered. A short-lived node (`shoal get`)
    /// calls this, then waits for [`Node::control_requests_done`], then
    /// stops: checking the count and stopping left a moment in which a
    /// request that came was cut short.
    pub fn close_control(&self) -> usize {
        let mut running = 0;
        self.inner.control_requests.send_modify(|r| {
            r.closed = true;
            running = r.running;
        });
        running
    }

    /// Resolves once every request taken through the control socket is
    /// answered: a short-lived node (`shoal get`) waits for this before it
    /// stops, so that another command on the same data dir, which went
    /// through its socket (a second get, an add), is not cut short.
    pub async fn control_requests_done(&self) {
        let mut rx = self.inner.control_requests.subscribe();
        let _ = rx.wait_for(|r| r.running == 0).await;
    }

    /// Resolves when the node is shutting down.
    pub async fn cancelled(&self) {
        self.inner.cancel.cancelled().await;
    }
}

/// A peer as `shoal peers` shows it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Its id.
    pub id: PeerId,
    /// Addresses it can be reached at.
    pub addrs: Vec<SocketAddr>,
    /// Whether a connection is open.
    pub connected: bool,
    /// Bytes moved.
    pub counters: PeerCounters,
    /// Recent rate to it, bytes per second (0 when not connected).
    pub upload_rate: u64,
    /// Recent rate from it, bytes per second (0 when not connected).
    pub download_rate: u64,
}

/// This run's `Hello.instance`: 16 bytes that differ from run to run (the
/// pid, the time, and std's per-process random hash keys, hashed). Not a
/// secret, nor proof of anything: a peer uses it only to tell that this
/// node started again.
fn new_instance() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.update(&t.to_le_bytes());
    let keys = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    h.update(&keys.to_le_bytes());
    let mut out = [0; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// The shortest time between two samples of a rate: under the sampling
/// period (1 s), so that a tick that comes a little early still takes one.
const RATE_SAMPLE: Duration = Duration::from_millis(900);

/// A connected peer's recent rates (see `Inner::rates`).
struct PeerRates {
    /// The connection sampled (its `stable_id`).
    conn: usize,
    up: crate::RateMeter,
    down: crate::RateMeter,
}

impl PeerRates {
    fn new(conn: usize) -> Self {
        let meter = || crate::RateMeter::new(RATE_SAMPLE);
        PeerRates {
            conn,
            up: meter(),
            down: meter(),
        }
    }
}

impl Inner {
    /// Serve the incoming streams of `conn` (once per connection).
    pub(crate) fn ensure_handled(self: &Arc<Self>, conn: &Connection) {
        let key = conn.stable_id();
        {
            let mut h = lock(&self.handled);
            if !h.entry(conn.peer_id()).or_default().insert(key) {
                return;
            }
        }
        let i = self.clone();
        let conn = conn.clone();
        lock(&self.tasks).spawn(async move {
            tokio::select! {
                () = server::handle_connection(i.clone(), conn.clone()) => {
                    // Gone, unless it is back already (a restart whose
                    // new connection said hello meanwhile).
                    let back = i
                        .endpoint
                        .connection(&conn.peer_id())
                        .is_some_and(|c| !c.is_closed() && c.stable_id() != conn.stable_id());
                    if conn.peer_shut_down() && !back {
                        lock(&i.book).gone(&conn.peer_id());
                    }
                },
                () = i.cancel.cancelled() => {},
            }
            let mut h = lock(&i.handled);
            if let Some(keys) = h.get_mut(&conn.peer_id()) {
                keys.remove(&key);
                if keys.is_empty() {
                    h.remove(&conn.peer_id());
                }
            }
            drop(h);
            let mut all = lock(&i.instances);
            if let Some(runs) = all.get_mut(&conn.peer_id()) {
                runs.said
                    .retain(|(c, _)| c.stable_id() != key && !c.is_closed());
                if runs.said.is_empty() {
                    all.remove(&conn.peer_id());
                }
            }
        });
    }

    /// Dial (or reuse a connection to) a peer, exchange hellos, and serve
    /// its requests on the same connection.
    pub(crate) async fn connect(
        self: &Arc<Self>,
        addr: SocketAddr,
        id: Option<PeerId>,
    ) -> Result<Connection, NodeError> {
        if let Some(id) = id {
            if id == self.endpoint.peer_id() {
                return Err(NodeError::OwnId(id));
            }
            if let Some(c) = self.endpoint.connection(&id).filter(|c| !c.is_closed()) {
                return Ok(c);
            }
        }
        if self.is_own_addr(addr) {
            return Err(NodeError::SelfDial);
        }
        let conn = tokio::time::timeout(Duration::from_secs(10), self.endpoint.connect(addr, id))
            .await
            .map_err(|_| NodeError::Timeout(format!("connecting to {addr}")))??;
        if conn.peer_id() == self.endpoint.peer_id() {
            conn.close(0, b"self");
            return Err(NodeError::SelfDial);
        }
        self.ensure_handled(&conn);
        self.hello(&conn).await?;
        Ok(conn)
    }

    fn is_own_addr(&self, addr: SocketAddr) -> bool {
        let own = self.endpoint.local_addrs();
        own.iter().any(|a| {
            a.port() == addr.port()
                && (a.ip() == addr.ip()
                    || (a.ip().is_unspecified()
                        && (addr.ip().is_loopback() || local_ips().contains(&addr.ip()))))
        })
    }

    async fn hello(&self, conn: &Connection) -> Result<(), NodeError> {
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = pb::Hello {
            version: PROTOCOL_VERSION,
            agent: concat!("shoal/", env!("CARGO_PKG_VERSION")).to_string(),
            listen_addrs: dialable(&self.endpoint.local_addrs())
                .iter()
                .take(limits::MAX_ADDRS)
                .map(|a| a.to_string())
                .collect(),
            capabilities: vec!["have".into(), "pex".into()],
            instance: self.instance.to_vec().into(),
        };
        write_frame(
            &mut send,
            &pb::Request {
                kind: Some(pb::request::Kind::Hello(hello)),
            },
        )
        .await?;
        let _ = send.finish();
        let resp: pb::Response = tokio::time::timeout(
            Duration::from_secs(10),
            read_frame(&mut recv, shoal_proto::Limit::Response),
        )
        .await
        .map_err(|_| NodeError::Timeout("waiting for hello".into()))??;
        match resp.kind {
            Some(pb::response::Kind::Hello(h)) => {
                self.record_hello(conn, &h);
                Ok(())
            }
            Some(pb::response::Kind::Error(e)) => Err(NodeError::Remote(
                shoal_proto::error_code_name(e.code),
                e.message,
            )),
            _ => Err(NodeError::Protocol("unexpected answer to hello".into())),
        }
    }

    /// A hello `conn`'s peer said. One whose instance differs from what
    /// the peer's other connections said is from a new run of it: those
    /// are its earlier run's, which a killed process never closed. They
    /// are closed, and the addresses they came from forgotten. Kept, they
    /// stood for the peer until their idle timeout (30 s): `peers` showed
    /// it connected and its rates from the dead one, its old addresses
    /// went out through peer exchange for good, and a peer restarted over
    /// and over filled the connection limit (a review).
    pub(crate) fn record_hello(&self, conn: &Connection, h: &pb::Hello) {
        let peer = conn.peer_id();
        let addrs = peer_addrs(conn.remote_addr(), &h.listen_addrs);
        let Some(earlier) = self.earlier_runs(conn, &h.instance) else {
            // Closed before its hello was handled: its word is stale (an
            // old run's hello handled after its new run's would close the
            // new run's connection).
            return;
        };
        {
            let mut book = lock(&self.book);
            if !earlier.is_empty() {
                book.gone(&peer);
            }
            book.add_addrs(peer, addrs);
        }
        for c in earlier {
            debug!(%peer, addr = %c.remote_addr(), "the peer started again: closing its earlier run's connection");
            c.close(
                shoal_transport::CLOSE_REPLACED,
                b"replaced by the peer's new run",
            );
        }
    }

    /// Records the instance `conn`'s peer said on it, and returns the
    /// peer's other live connections on which it said another (none when
    /// it says none, or one too long to be ours); `None` for a connection
    /// closed already, which is not recorded (the prune when its handler
    /// ended may have run: it would stay, holding the connection, until
    /// the peer said hello again).
    fn earlier_runs(&self, conn: &Connection, instance: &[u8]) -> Option<Vec<Connection>> {
        let mut all = lock(&self.instances);
        // Under the lock the prune takes: closed stays closed.
        if conn.is_closed() {
            return None;
        }
        if instance.is_empty() || instance.len() > limits::MAX_INSTANCE_LEN {
            return Some(Vec::new());
        }
        let runs = all.entry(conn.peer_id()).or_default();
        runs.said
            .retain(|(c, _)| !c.is_closed() && c.stable_id() != conn.stable_id());
        if !runs.twins && runs.retired.iter().any(|r| r.as_slice() == instance) {
            runs.twins = true;
            warn!(
                peer = %conn.peer_id(),
                "two running nodes say hello with this peer id (a data dir copied with its \
                 key?); each should have its own identity"
            );
        }
        if runs.twins {
            runs.said.push((conn.clone(), instance.to_vec()));
            return Some(Vec::new());
        }
        let (earlier, same): (Vec<_>, Vec<_>) = runs
            .said
            .drain(..)
            .partition(|(_, i)| i.as_slice() != instance);
        runs.said = same;
        runs.said.push((conn.clone(), instance.to_vec()));
        for (_, i) in &earlier {
            if !runs.retired.contains(i) {
                if runs.retired.len() == RETIRED_RUNS {
                    runs.retired.pop_front();
                }
                runs.retired.push_back(i.clone());
            }
        }
        Some(earlier.into_iter().map(|(c, _)| c).collect())
    }

    /// Candidates for `hash`: the static peers and the peers we are
    /// connected to (neighbours are asked directly), returned at once, and
    /// a channel for those discovery finds (`None` with discovery off:
    /// then nothing but peer exchange can add to the first list).
    pub(crate) fn candidates(
        self: &Arc<Self>,
        hash: &Hash,
        extra: &[PeerAddr],
    ) -> (
        Vec<Candidate>,
        Option<tokio::sync::mpsc::Receiver<Candidate>>,
    ) {
        let mut initial: Vec<Candidate> = extra
            .iter()
            .chain(self.config.peers.iter())
            .map(|p| Candidate {
                addr: p.addr,
                id: p.id,
                source: Source::Static,
            })
            .collect();
        for id in lock(&self.handled).keys() {
            if let Some(c) = self.endpoint.connection(id) {
                initial.push(Candidate {
                    addr: c.remote_addr(),
                    id: Some(*id),
                    source: Source::Static,
                });
            }
        }
        let Some(mut disc) = self.discovery.as_ref().map(|d| d.find(*hash.as_bytes())) else {
            return (initial, None);
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    c = disc.recv() => match c {
                        Some(c) => if tx.send(c).await.is_err() { return },
                        None => return,
                    },
                    // The download is over: drop `disc`, which ends the
                    // discovery lookup (no more DHT queries for it).
                    () = tx.closed() => return,
                    () = cancel.cancelled() => return,
                }
            }
        });
        (initial, Some(rx))
    }
}

/// Every local IP address of this machine.
pub(crate) fn local_ips() -> Vec<std::net::IpAddr> {
    if_addrs::get_if_addrs()
        .map(|v| v.into_iter().map(|i| i.ip()).collect())
        .unwrap_or_default()
}

/// The addresses of a peer that peer exchange may pass on: the one it was
/// seen at, and those it announced in its hello that are plausible from
/// there ([`shoal_discovery::plausible_from`]: a peer's word only, so none
/// narrower in reach than where it was seen, and no unspecified,
/// multicast or broadcast address or port 0).
fn peer_addrs(seen: SocketAddr, announced: &[String]) -> Vec<SocketAddr> {
    let seen = shoal_discovery::canonical(seen);
    let mut out = vec![seen];
    for a in announced.iter().take(limits::MAX_ADDRS) {
        if let Ok(a) = a.parse::<SocketAddr>()
            && shoal_discovery::plausible_from(a, seen)
        {
            let a = shoal_discovery::canonical(a);
            if !out.contains(&a) && out.len() < limits::MAX_ADDRS {
                out.push(a);
            }
        }
    }
    out
}

/// Expands unspecified listen addresses into interface addresses.
pub(crate) fn dialable(bound: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for a in bound {
        if a.ip().is_unspecified() {
            for ip in local_ips() {
                // A `[::]` socket is dual-stack where the OS allows.
                if ip.is_ipv4() == a.is_ipv4() || a.is_ipv6() {
                    if let std::net::IpAddr::V6(v6) = ip
                        && (v6.segments()[0] & 0xffc0) == 0xfe80
                    {
                        continue; // link-local needs a scope id
                    }
                    out.push(SocketAddr::new(ip, a.port()));
                }
            }
        } else {
            out.push(*a);
        }
    }
    out.sort_by_key(|a| (a.ip().is_loopback(), a.is_ipv6()));
    out.dedup();
    out
}

/// The few addresses worth putting in a ticket: routable ones first, then
/// loopback, at most four.
fn ticket_addrs(all: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = all.to_vec();
    v.sort_by_key(|a| (a.ip().is_loopback(), a.is_ipv6()));
    v.truncate(4);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hellos_addresses_are_passed_on_only_if_plausible() {
        let s = |v: &[&str]| v.iter().map(|a| (*a).to_string()).collect::<Vec<_>>();
        let seen: SocketAddr = "203.0.113.7:4000".parse().unwrap();
        let announced = s(&[
            "203.0.113.7:4000",
            "10.0.0.5:4000",
            "198.51.100.9:4000",
            "127.0.0.1:53",
            "[::1]:4000",
            "0.0.0.0:4000",
            "224.0.0.251:5353",
            "255.255.255.255:4000",
            "10.0.0.6:0",
            "not an address",
        ]);
        // Seen on a public address: its private one is left out.
        let want: Vec<SocketAddr> = ["203.0.113.7:4000", "198.51.100.9:4000"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(peer_addrs(seen, &announced), want);
        // Seen on its private network: its private address is passed on.
        let seen: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let want: Vec<SocketAddr> = ["10.0.0.5:4000", "203.0.113.7:4000", "198.51.100.9:4000"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(peer_addrs(seen, &announced), want);
        // Seen on loopback (a test, one machine): loopback is its address.
        let seen: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let got = peer_addrs(seen, &s(&["127.0.0.1:4000", "[::1]:4000"]));
        assert_eq!(got, vec![seen, "[::1]:4000".parse().unwrap()]);
        // Seen through a dual-stack socket: as the IPv4 address it is.
        let mapped: SocketAddr = "[::ffff:198.51.100.1]:7".parse().unwrap();
        assert_eq!(
            peer_addrs(mapped, &[]),
            vec!["198.51.100.1:7".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn peer_addrs_parse_with_and_without_id() {
        let id = SecretKey::generate().public();
        let p: PeerAddr = format!("{id}@127.0.0.1:7000").parse().unwrap();
        assert_eq!(p.id, Some(id));
        assert_eq!(p.to_string(), format!("{id}@127.0.0.1:7000"));
        let p: PeerAddr = "[::1]:7000".parse().unwrap();
        assert_eq!(p.id, None);
        for bad in ["", "127.0.0.1", "nope@127.0.0.1:1", "host:80"] {
            assert!(bad.parse::<PeerAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unspecified_addresses_expand_to_interfaces() {
        let v = dialable(&["0.0.0.0:4000".parse().unwrap()]);
        assert!(v.contains(&"127.0.0.1:4000".parse().unwrap()), "{v:?}");
        assert!(v.iter().all(|a| !a.ip().is_unspecified()));
    }
}
