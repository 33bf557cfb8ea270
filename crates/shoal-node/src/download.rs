//! Downloading one blob from a changing set of peers: the async layer that
//! carries out the [`Scheduler`]'s decisions over QUIC.
//!
//! Flow: candidates arrive (static, discovery, peer exchange) → each is
//! dialed and asked "who has it?" → the blob's size is proven by fetching
//! its last group from one peer → the scheduler takes over, with have
//! subscriptions keeping every peer's availability current → each request
//! runs as its own task whose verified groups land in the store straight
//! away (and are served to others from there).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_discovery::{AddressBook, Candidate, SelfFilter, Source};
use shoal_proto::{GROUP_SIZE, GroupRanges, Limit, group_count, hash_from_bytes, limits, pb};
use shoal_store::{BlobKind, Hash, ReceiveError, Store};
use shoal_transport::{Connection, PeerId, RecvStream};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Progress;
use crate::error::NodeError;
use crate::node::{Inner, PeerAddr, lock};
use crate::scheduler::{Action, DropReason, Failure, RequestId, Scheduler, SchedulerConfig};
use crate::wire::{WireError, read_frame, write_frame};

/// Time a peer gets to answer a small request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often connected peers are asked for more peers.
const PEX_INTERVAL: Duration = Duration::from_secs(3);
/// Dials in flight at once.
const MAX_DIALS: usize = 16;
/// Peers used at once for one blob.
const MAX_PEERS: usize = 64;
/// Probes (the size proof) a peer may fail for want of a connection or an
/// answer before it is dropped from the download.
const MAX_PROBE_FAILURES: u32 = 3;
/// See [`probe_deadline`].
const PROBE_DEADLINE: Duration = Duration::from_secs(20);
/// Bytes per second a size proof must average once past its deadline.
const PROBE_MIN_RATE: f64 = 256.0;
/// How long a download with discovery off waits once every peer it can
/// reach holds nothing (see where it is used): two rounds of peer
/// exchange and then some.
const NOT_HELD_GRACE: Duration = Duration::from_secs(8);
/// Addresses a download remembers to dial again (see [`Known`]).
const MAX_KNOWN: usize = 256;
/// Most runs kept of what one peer has (a blob of 1 TiB half held in
/// every other group would need 2^25; real ones need a few thousand).
const MAX_PEER_RUNS: usize = 1 << 16;
/// The shortest time between two dials of one remembered address, on top
/// of the address book's backoff after failures (which starts at 1 s).
const REDIAL_MIN: Duration = Duration::from_secs(2);
/// The largest blob a download accepts (1 TiB): the scheduler's tables grow
/// with the size, ~18 bytes per 128 KiB block (~150 MiB at 1 TiB: missing
/// groups, requests, the picker's order, positions and holder counts) plus
/// one bit per block for each peer.
pub(crate) const MAX_BLOB_SIZE: u64 = 1 << 40;

/// What one blob download needs.
pub(crate) struct BlobJob {
    pub(crate) hash: Hash,
    pub(crate) kind: Option<BlobKind>,
    pub(crate) target: Option<std::path::PathBuf>,
    pub(crate) sequential: bool,
    pub(crate) peers: Vec<PeerAddr>,
    /// Pin the blob (not a collection's members: the collection keeps
    /// them).
    pub(crate) pin: bool,
    /// Calls the download off (its fetch's: an unpin, or the node
    /// stopping). A child of the node's token.
    pub(crate) cancel: CancellationToken,
    /// A directory stands at the output: a file (the kind learnt from
    /// the first provider's claim) is refused before anything is fetched
    /// (it was fetched whole, then refused; a review).
    pub(crate) no_file_at: Option<std::path::PathBuf>,
}

#[derive(Debug)]
enum ReqError {
    Corrupt(String),
    Failed(String),
    /// The peer gave this answer's slot to another request that waited
    /// (it choked us, `choke.rs`): not its fault, nor the connection's.
    Busy,
    /// Our own store failed (a full disk, permissions): no peer can help,
    /// so the download stops with this error instead of retrying forever
    /// (found by the full-disk test, tests/it/disk.rs).
    Local(shoal_store::StoreError),
}

enum Ev {
    PeerUp {
        peer: PeerId,
        conn: Connection,
        avail: pb::Availability,
        /// The candidate address that was dialed.
        addr: SocketAddr,
    },
    DialFailed {
        addr: SocketAddr,
        /// The id the candidate named, if any.
        id: Option<PeerId>,
        err: String,
        /// Dialling that address again cannot help: the peer there is not
        /// the one named, or it is this node.
        hopeless: bool,
    },
    Have {
        peer: PeerId,
        size: u64,
        added: GroupRanges,
        complete: bool,
        /// Groups the peer is fetching (a hint for the picking).
        fetching: GroupRanges,
    },
    SubEnded {
        peer: PeerId,
    },
    Done {
        id: RequestId,
        peer: PeerId,
        result: Result<GroupRanges, ReqError>,
    },
    Probe {
        peer: PeerId,
        result: Result<GroupRanges, ReqError>,
    },
    More(Vec<Candidate>),
}

struct PeerSlot {
    conn: Connection,
    /// The address it was dialed at.
    addr: SocketAddr,
    size: u64,
    have: GroupRanges,
    complete: bool,
    sub: Option<Task>,
    /// When it took its slot.
    joined: Instant,
}

/// A peer that has held nothing of the blob for this share of the stall
/// timeout gives its slot up when all [`MAX_PEERS`] are taken and another
/// address waits to be dialled, and is not dialled again for twice as long.
/// Otherwise peers that answer "nothing" (throwaway identities, handed out
/// by a hostile peer exchange or DHT announces) could hold every slot, and
/// a seeder found later would never be dialled.
fn idle_limit(stall: Duration) -> Duration {
    (stall / 4).max(Duration::from_secs(1))
}

/// Drops for stalling after which a peer is not dialled again in this
/// download.
const MAX_STALL_DROPS: u32 = 3;

/// Closes the connection of a peer dropped for stalling if it is dead: a
/// killed peer's looks alive until the idle timeout, and the dial after
/// its rest would reuse it. A live one stays: it also carries the peer's
/// other downloads, its subscription, and what it fetches from us. Dead
/// is no answer to a peer-exchange question (answered without a slot)
/// within 5 s.
fn close_if_dead(conn: Connection, hash: Hash) {
    tokio::spawn(async move {
        let answer = tokio::time::timeout(ANSWER_TIMEOUT / 2, ask_pex(&conn, &hash)).await;
        if !matches!(answer, Ok(Ok(_))) {
            debug!(peer = %conn.peer_id(), "no answer after a stall: closing its connection");
            conn.close(4, b"unresponsive");
        }
    });
}

/// How long a peer dropped for stalling rests before it is dialled again,
/// the `times`th time: 2 s, doubling, at most a quarter of the stall
/// timeout (so it is tried a few times before the download gives up).
fn stall_rest(times: u32, stall: Duration) -> Duration {
    let cap = (stall / 4).max(Duration::from_secs(1));
    Duration::from_secs(2)
        .saturating_mul(1 << times.saturating_sub(1).min(16))
        .min(cap)
}

/// An address this download was given or found. One that could not be
/// reached, or whose peer left, is dialled again (with the address book's
/// backoff) for as long as the download waits: a seeder that restarts, or
/// that was not up yet, is picked up again instead of the download
/// failing once the stall timeout passes.
struct Known {
    cand: Candidate,
    /// The peer it led to, once one answered there.
    peer: Option<PeerId>,
    /// Not dialled again before this.
    next: Instant,
}

/// What decides whether a queued candidate is dialled.
struct DialState<'a> {
    dialing: &'a HashSet<SocketAddr>,
    peers: &'a HashMap<PeerId, PeerSlot>,
    banned: &'a HashSet<PeerId>,
    resting: &'a HashMap<PeerId, Instant>,
    known: &'a HashMap<SocketAddr, Known>,
    book: &'a AddressBook,
}

impl DialState<'_> {
    /// Whether `c` is to be dialled now.
    fn worth_dialling(&self, c: &Candidate, now: Instant) -> bool {
        let shunned = |id: PeerId| self.banned.contains(&id) || self.resting.contains_key(&id);
        !self.dialing.contains(&c.addr)
            // An address that led to a peer in use is not dialed again.
            && !self.peers.values().any(|p| p.addr == c.addr)
            && !c.id.is_some_and(|id| self.peers.contains_key(&id) || shunned(id))
            // Nor one known to lead to a peer resting or banned.
            && !self.known.get(&c.addr).and_then(|k| k.peer).is_some_and(shunned)
            && self.book.should_dial(c.addr, now)
    }
}

/// Queue `c` to be dialled, once, up to [`MAX_KNOWN`] queued: peer
/// exchange hands over up to 1024 addresses per answer, and a queue that
/// took them all grew without bound (and each insert scanned it whole).
/// One left out is still remembered (`remember`) and queued again later.
fn enqueue(queued: &mut Vec<Candidate>, c: Candidate) {
    if queued.len() < MAX_KNOWN && !queued.contains(&c) {
        queued.push(c);
    }
}

/// [`enqueue`] for a candidate from discovery (mDNS, the DHT), which
/// sends each address once: when the queue is full, the oldest queued
/// (the last to be dialled: the queue is taken from its end) makes room.
/// A DHT full of made-up addresses for the hash would otherwise keep a
/// real seeder found later out for good. (Peer exchange does not push
/// others out: one peer's answer is only what fits.)
fn enqueue_found(queued: &mut Vec<Candidate>, c: Candidate) {
    if queued.contains(&c) {
        return;
    }
    if queued.len() >= MAX_KNOWN {
        queued.remove(0);
    }
    queued.push(c);
}

/// Remember `c` to dial again later (up to [`MAX_KNOWN`] addresses).
fn remember(known: &mut HashMap<SocketAddr, Known>, c: &Candidate, now: Instant) {
    if known.len() < MAX_KNOWN || known.contains_key(&c.addr) {
        known.entry(c.addr).or_insert_with(|| Known {
            cand: c.clone(),
            peer: c.id,
            next: now + REDIAL_MIN,
        });
    }
}

/// [`remember`] for a candidate from discovery: when the addresses
/// remembered are at [`MAX_KNOWN`], one that never led to a peer (the one
/// backed off furthest) is forgotten to make room; one that did is never
/// pushed out.
fn remember_found(known: &mut HashMap<SocketAddr, Known>, c: &Candidate, now: Instant) {
    if known.len() >= MAX_KNOWN && !known.contains_key(&c.addr) {
        let worst = known
            .iter()
            .filter(|(_, k)| k.peer.is_none())
            .max_by_key(|(_, k)| k.next)
            .map(|(a, _)| *a);
        if let Some(a) = worst {
            known.remove(&a);
        }
    }
    remember(known, c, now);
}

struct Running {
    task: Task,
    /// The groups asked for.
    ranges: GroupRanges,
    bytes: Arc<AtomicU64>,
    seen: u64,
    /// Cancelled when the scheduler gives the request up: its stream stops
    /// being read, what verified so far is written, and the request ends
    /// (an abort lost the groups verified but not yet written, and they
    /// were asked for again).
    stop: CancellationToken,
    given_up: bool,
}

/// The most addresses a "no peer could be reached" error names.
const MAX_UNREACHED_SAID: usize = 4;

/// A task of a download, aborted when dropped: a download whose future is
/// dropped mid-way (a collection's fetch ends at its first failing member,
/// and the members under way with it are dropped) leaves none of its
/// requests, probes or have subscriptions behind (a subscription held its
/// stream open for as long as the connection lived).
struct Task(JoinHandle<()>);

impl Task {
    fn abort(&self) {
        self.0.abort();
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Ends a download's turn in the store ([`Store::end_download`], so that
/// gc may take what it leaves) however its future ends: dropped, too.
///
/// [`Store::begin_download`] runs off the async workers, and a download
/// dropped meanwhile cannot stop it: ending the turn at once would come
/// before the begin, which would then leave the blob in flight (kept from
/// gc) until the node restarts (a review). A begin under way ends the turn
/// itself once it is done if the download was dropped meanwhile.
///
/// It holds the download's turn at its blob too ([`Downloading`]), given up
/// only once the turn in the store is ended: a download dropped mid-begin
/// gave its turn up at once, and a waiter's begin could come before the
/// late end, which then ended the waiter's turn in the store (a review).
struct InFlight {
    store: Store,
    hash: Hash,
    phase: Arc<std::sync::Mutex<(Phase, Option<TurnGuard>)>>,
}

/// The lock of a download's turn at its blob (see [`Downloading`]).
type TurnGuard = tokio::sync::OwnedMutexGuard<()>;

/// Where an [`InFlight`]'s begin is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// No begin under way.
    Idle,
    /// A begin runs.
    Beginning,
    /// A begin runs and the download was dropped: the begin ends the turn.
    Dropped,
}

impl InFlight {
    fn new(store: Store, hash: Hash, turn: Option<TurnGuard>) -> Self {
        Self {
            store,
            hash,
            phase: Arc::new(std::sync::Mutex::new((Phase::Idle, turn))),
        }
    }

    /// Runs `begin` (a [`Store::begin_download`] of this hash) off the
    /// async workers; see the type's comment for a drop meanwhile.
    async fn begin<F>(&self, begin: F) -> Result<(), shoal_store::StoreError>
    where
        F: FnOnce(&Store) -> Result<(), shoal_store::StoreError> + Send + 'static,
    {
        lock(&self.phase).0 = Phase::Beginning;
        let (store, hash, phase) = (self.store.clone(), self.hash, self.phase.clone());
        tokio::task::spawn_blocking(move || {
            let r = begin(&store);
            let mut phase = lock(&phase);
            if phase.0 == Phase::Dropped {
                // Under the lock: the guard, gone, cannot race this. The
                // turn goes after the end.
                store.end_download(&hash);
                phase.1 = None;
            }
            phase.0 = Phase::Idle;
            r
        })
        .await
        .map_err(|e| shoal_store::StoreError::Task(e.to_string()))?
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut phase = lock(&self.phase);
        if phase.0 == Phase::Beginning {
            // The begin ends it, then gives the turn up.
            phase.0 = Phase::Dropped;
        } else {
            self.store.end_download(&self.hash);
            phase.1 = None;
        }
    }
}

/// How long a request given up may take to write what it verified before
/// it is aborted (it is stuck elsewhere: opening its stream, say).
const GIVE_UP_GRACE: Duration = Duration::from_secs(2);

/// Counts bytes read through it, for stall detection and progress.
struct Counting<R> {
    inner: R,
    bytes: Arc<AtomicU64>,
    /// Pieces read ahead by [`RecvStream::read_chunks`], not handed out yet.
    queue: VecDeque<Bytes>,
    /// Once cancelled, reads of data fail (the request was given up).
    stop: CancellationToken,
}

impl<R> Counting<R> {
    fn new(inner: R, bytes: Arc<AtomicU64>, stop: CancellationToken) -> Self {
        Counting {
            inner,
            bytes,
            queue: VecDeque::new(),
            stop,
        }
    }
}

/// Most pieces one read takes from the stream: a piece is one packet's
/// data in a bulk transfer, so this is ~40 KB per lock of the connection.
const READ_AHEAD: usize = 32;

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        // Pieces read ahead come first (none are, in the order the frames
        // are read now: the answer's header before its data).
        if let Some(front) = self.queue.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front.split_to(n));
            if front.is_empty() {
                self.queue.pop_front();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl shoal_store::ChunkSource for Counting<RecvStream> {
    async fn take(&mut self, max: usize) -> std::io::Result<Option<Bytes>> {
        if self.queue.is_empty() {
            let mut bufs: [Bytes; READ_AHEAD] = std::array::from_fn(|_| Bytes::new());
            let Counting { inner, stop, .. } = self;
            let read = tokio::select! {
                biased;
                () = stop.cancelled() => {
                    return Err(std::io::Error::other("the request was given up"));
                }
                r = inner.read_chunks(&mut bufs) => r,
            };
            let Some(n) = read.map_err(std::io::Error::other)? else {
                return Ok(None);
            };
            let got = bufs[..n].iter().map(Bytes::len).sum::<usize>();
            self.bytes.fetch_add(got as u64, Ordering::Relaxed);
            self.queue.extend(bufs.into_iter().take(n));
        }
        let Some(front) = self.queue.front_mut() else {
            // A read of no pieces (not the end): the caller asks again.
            return Ok(Some(Bytes::new()));
        };
        if front.len() > max {
            return Ok(Some(front.split_to(max)));
        }
        Ok(self.queue.pop_front())
    }
}

/// What [`fetch_blob`] found out.
pub(crate) struct Fetched {
    /// The kind: the caller's, the store's, or the first provider's claim.
    pub(crate) kind: BlobKind,
    /// Whether any provider claimed it is a collection (a claim only: a
    /// caller that did not know the kind checks the content).
    pub(crate) claimed_collection: bool,
    /// Connections of the peers that held all of it (none if the store had
    /// it already).
    pub(crate) providers: Vec<Connection>,
}

/// The blobs being downloaded by [`fetch_blob`], one download each: a
/// second download of a blob waits for the first (showing its progress)
/// and then finds it in the store, where two would have run two
/// schedulers against the same peers, both fetching the groups in flight
/// (two gets of one 28.6 MiB file took 44.4 MiB from the seeder). The
/// batches of small members (`batch.rs`) take no turn: a small blob got on
/// its own while a batch holds it may come twice, once each way.
///
/// A waiter's own peers (its ticket's, its `--peer`s) are given to the
/// download it waits for, which dials them as it would a discovered
/// address: a download that could not reach its own peers held the waiter
/// until it gave up.
#[derive(Default)]
pub(crate) struct Downloading(std::sync::Mutex<HashMap<Hash, Turns>>);

/// One blob's turns: the running download's progress, and the lock that
/// the next waits for.
#[derive(Clone)]
struct Turns {
    lock: Arc<tokio::sync::Mutex<()>>,
    progress: Arc<std::sync::Mutex<Option<watch::Receiver<Progress>>>>,
    /// Peers the waiters were given, for the running download to dial.
    extra: Extra,
}

/// Peers given to a blob's running download by the fetches waiting for
/// it (see [`Downloading`]).
type Extra = Arc<std::sync::Mutex<Vec<PeerAddr>>>;

/// A download's turn at its blob, given up (and the blob's entry removed
/// when nobody else waits) when dropped.
struct Turn<'a> {
    downloading: &'a Downloading,
    hash: Hash,
    turns: Turns,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    /// Whether it had the turn (its progress the one shown to waiters).
    held: bool,
}

impl Downloading {
    /// Waits for the turn at `hash`, forwarding the running download's
    /// progress to `progress` meanwhile, and then shows this one's.
    async fn turn(
        &self,
        hash: Hash,
        progress: &watch::Sender<Progress>,
        peers: &[PeerAddr],
    ) -> Turn<'_> {
        // Built first, so that a cancelled wait still removes the entry.
        let mut turn = Turn {
            downloading: self,
            hash,
            turns: lock(&self.0)
                .entry(hash)
                .or_insert_with(|| Turns {
                    lock: Arc::new(tokio::sync::Mutex::new(())),
                    progress: Arc::new(std::sync::Mutex::new(None)),
                    extra: Extra::default(),
                })
                .clone(),
            guard: None,
            held: false,
        };
        let guard = match turn.turns.lock.clone().try_lock_owned() {
            Ok(g) => g,
            Err(_) => {
                debug!(%hash, "waiting for the download of this blob already running");
                {
                    let mut extra = lock(&turn.turns.extra);
                    for p in peers {
                        if extra.len() < MAX_KNOWN && !extra.contains(p) {
                            extra.push(*p);
                        }
                    }
                }
                let wait = turn.turns.lock.clone().lock_owned();
                tokio::pin!(wait);
                let mut theirs = lock(&turn.turns.progress).clone();
                loop {
                    let changed = async {
                        match theirs.as_mut() {
                            Some(rx) => rx.changed().await.is_ok(),
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        g = &mut wait => break g,
                        ok = changed => match (ok, &theirs) {
                            (true, Some(rx)) => {
                                let p = rx.borrow().clone();
                                progress.send_replace(p);
                            }
                            _ => theirs = None,
                        },
                    }
                }
            }
        };
        *lock(&turn.turns.progress) = Some(progress.subscribe());
        turn.guard = Some(guard);
        turn.held = true;
        turn
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut map = lock(&self.downloading.0);
        if self.held {
            // This download's progress is no one's to follow now (its
            // lock, which `fetch_blob` took, goes with its `InFlight`).
            *lock(&self.turns.progress) = None;
        }
        drop(self.guard.take());
        // The map's and this one's: nobody else waits (a waiter holds two:
        // its own, and its wait's).
        if Arc::strong_count(&self.turns.lock) <= 2 {
            map.remove(&self.hash);
        }
    }
}

/// Why a download's token was cancelled: the node stopping, or its
/// fetch called off.
fn cancel_error(node: &Inner, hash: Hash) -> NodeError {
    if node.cancel.is_cancelled() {
        NodeError::ShuttingDown
    } else {
        NodeError::Cancelled(hash)
    }
}

/// Downloads one blob, after any download of it already running (see
/// [`Downloading`]).
pub(crate) async fn fetch_blob(
    node: Arc<Inner>,
    job: BlobJob,
    progress: watch::Sender<Progress>,
) -> Result<Fetched, NodeError> {
    let node2 = node.clone();
    let cancel = job.cancel.clone();
    // A wait called off leaves the queue (`Turn` is built first).
    let mut turn = tokio::select! {
        // A fetch called off while it waited does not take the turn.
        biased;
        () = cancel.cancelled() => return Err(cancel_error(&node, job.hash)),
        t = node2.downloading.turn(job.hash, &progress, &job.peers) => t,
    };
    // What waiters gave before stays: those still waiting want this
    // download to dial their peers too (doubles are dialled once).
    let guard = turn.guard.take();
    fetch_blob_alone(node, job, progress, turn.turns.extra.clone(), guard).await
}

/// Downloads one blob.
async fn fetch_blob_alone(
    node: Arc<Inner>,
    job: BlobJob,
    progress: watch::Sender<Progress>,
    extra: Extra,
    turn: Option<TurnGuard>,
) -> Result<Fetched, NodeError> {
    let hash = job.hash;
    let cancel = job.cancel.clone();
    let store = node.store.clone();
    let in_flight = InFlight::new(store.clone(), hash, turn);
    // The download is declared to the store as soon as its kind is known
    // (from the caller, the store, or else the first provider's claim), so
    // that a raw blob is written straight to its target. Off the async
    // workers: it commits durably, may finish a download verified before,
    // and waits while a gc removes files.
    let begin = |kind: BlobKind| {
        let target = job.target.clone().filter(|_| kind == BlobKind::Raw);
        let pin = job.pin;
        in_flight
            .begin(move |store: &Store| store.begin_download(&hash, kind, target.as_deref(), pin))
    };
    let mut kind = job.kind.or_else(|| store.info(&hash).map(|i| i.kind));
    let mut claimed_collection = kind == Some(BlobKind::Collection);
    let mut begun = false;
    // Begun now only if the store knows the blob (a resumed download, one
    // held whole): a new one is begun once a peer offers it (before the
    // size proof, below), so that a get that finds nobody leaves no empty
    // `OUT.shoal-partial` and no pinned 0% entry behind (a review).
    if let (Some(p), Some(BlobKind::Raw)) = (&job.no_file_at, kind) {
        return Err(NodeError::OutputExists(p.clone()));
    }
    if let Some(k) = kind.filter(|_| store.info(&hash).is_some()) {
        begin(k).await?;
        begun = true;
    }
    if let Some(info) = store.info(&hash).filter(|i| i.complete) {
        store.end_download(&hash);
        progress.send_modify(|p| {
            p.verified = info.size;
            p.total = info.size;
        });
        let kind = job.kind.unwrap_or(info.kind);
        return Ok(Fetched {
            kind,
            claimed_collection: kind == BlobKind::Collection,
            providers: Vec::new(),
        });
    }
    let mut events = store.subscribe();
    let (tx, mut rx) = mpsc::channel::<Ev>(1024);
    // Before the connected peers are listed: one connecting meanwhile is
    // in the list or heard of here (or both).
    let mut arrivals = node.arrivals.subscribe();
    let mut arrivals_open = true;
    let (initial, mut candidates) = node.candidates(&hash, &job.peers);
    // With discovery off, the addresses given are all there is (peer
    // exchange needs a peer first): once every one of them is hopeless the
    // download fails at once instead of waiting out the stall timeout.
    let discovery_off = candidates.is_none();
    // Addresses found hopeless, and why.
    let mut hopeless: Vec<(SocketAddr, String)> = Vec::new();
    // Addresses given (a ticket's, `--peer`) that could not be dialled,
    // and the last error of each: said if the download fails for want of
    // a peer.
    let mut unreached: Vec<(SocketAddr, String)> = Vec::new();
    let mut book = AddressBook::new(SelfFilter::new(
        node.endpoint.peer_id(),
        &node.endpoint.local_addrs(),
        &crate::node::local_ips(),
    ));
    let mut dialing: HashSet<SocketAddr> = HashSet::new();
    let mut queued: Vec<Candidate> = Vec::new();
    let mut known: HashMap<SocketAddr, Known> = HashMap::new();
    let mut peers: HashMap<PeerId, PeerSlot> = HashMap::new();
    let mut banned: HashSet<PeerId> = HashSet::new();
    // Peers that gave up their slot for holding nothing (`idle_limit`),
    // and until when they are not dialled again (dropped from here then,
    // at the next tick).
    let mut resting: HashMap<PeerId, Instant> = HashMap::new();
    // Peers dropped for stalling, and how many times. They may be gone
    // for a while (killed, their network down) and come back: each rests
    // (in `resting`) for longer each time and is then dialled again, so a
    // seeder that restarts is taken back, and the download waits for them
    // as for an address it was given (a restarted seeder used to be
    // banned, and the download failed with it back up).
    let mut stalled: HashMap<PeerId, u32> = HashMap::new();
    // Probes that failed for want of a connection or an answer, per peer:
    // the peer with fewest is asked first, and one that fails
    // `MAX_PROBE_FAILURES` times is dropped for good (a peer that stalls
    // every probe must not hold the download up one timeout at a time).
    let mut probe_failures: HashMap<PeerId, u32> = HashMap::new();
    // Only a proven size is refused here: an unproven one is a peer's
    // claim, which the size proof replaces.
    if let Some(size) = store
        .info(&hash)
        .as_ref()
        .and_then(proven_size)
        .filter(|s| *s > MAX_BLOB_SIZE)
    {
        if begun {
            store.end_download(&hash);
        }
        return Err(NodeError::TooLarge(hash, size));
    }
    // The state `DialState` reads, borrowed where a candidate is weighed.
    macro_rules! dial_state {
        () => {
            DialState {
                dialing: &dialing,
                peers: &peers,
                banned: &banned,
                resting: &resting,
                known: &known,
                book: &book,
            }
        };
    }
    let mut sched: Option<Scheduler<PeerId>> = proven_scheduler(&node, &hash, job.sequential);
    let mut probe: Option<(PeerId, Task)> = None;
    let mut running: HashMap<RequestId, Running> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut pex_tick = tokio::time::interval(PEX_INTERVAL);
    let mut last_progress = Instant::now();
    let mut last_verified = 0u64;
    let mut rate = crate::RateMeter::new(Duration::from_secs(1));
    // Bytes the requests ended so far read, for the rate: the verified
    // count moves in steps of whole batches, and a rate taken from it
    // swung from 13% to 320% of the real one on a slow download (a
    // review).
    let mut read_by_ended = 0u64;
    let stall = node.config.stall_timeout;
    let mut candidates_open = !discovery_off;
    // Peers that answered (for "none of the N asked holds it").
    let mut reached: HashSet<PeerId> = HashSet::new();
    let mut nothing_since: Option<Instant> = None;
    if discovery_off && initial.is_empty() {
        // Nothing to dial, no neighbour to ask, and nothing to find:
        // failing now says so (waiting for a peer to connect of its own
        // accord would look like a hang).
        if begun {
            store.end_download(&hash);
        }
        return Err(NodeError::NowhereLeft(
            hash,
            "none was given, and no peer is connected".into(),
        ));
    }
    for c in initial {
        // This node itself (a ticket of its own, say) is never dialled: it
        // was dropped without a word, and with discovery off the download
        // waited out its whole timeout for nothing.
        let me = node.endpoint.peer_id();
        if c.id == Some(me) {
            hopeless.push((c.addr, NodeError::OwnId(me).to_string()));
            continue;
        }
        if book.is_self_addr(c.addr) {
            hopeless.push((c.addr, NodeError::SelfDial.to_string()));
            continue;
        }
        remember(&mut known, &c, Instant::now());
        enqueue(&mut queued, c);
    }
    if discovery_off && known.is_empty() {
        let why: Vec<String> = hopeless.iter().map(|(_, e)| e.clone()).collect();
        return Err(NodeError::NowhereLeft(hash, why.join("; ")));
    }

    let result = loop {
        let now = Instant::now();
        if let Some(s) = sched.as_mut() {
            if s.is_complete() {
                break Ok(());
            }
            while let Some(action) = s.poll_action(now) {
                match action {
                    Action::Request { peer, id, ranges } => {
                        let Some(slot) = peers.get(&peer) else {
                            s.handle_request_failed(id, Failure::Error);
                            continue;
                        };
                        // Tell the peers subscribed to our have updates
                        // (none may be: then nothing is sent).
                        let _ = node.fetching.send((hash, ranges.clone()));
                        let bytes = Arc::new(AtomicU64::new(0));
                        let stop = CancellationToken::new();
                        let (conn, tx, store, b, asked, halt) = (
                            slot.conn.clone(),
                            tx.clone(),
                            store.clone(),
                            bytes.clone(),
                            ranges.clone(),
                            stop.clone(),
                        );
                        let task = Task(tokio::spawn(async move {
                            let get = run_get(&conn, &store, &hash, &asked, b, halt.clone());
                            let result = tokio::select! {
                                r = get => r,
                                () = async {
                                    halt.cancelled().await;
                                    tokio::time::sleep(GIVE_UP_GRACE).await;
                                } => Err(ReqError::Failed("given up".into())),
                            };
                            let _ = tx.send(Ev::Done { id, peer, result }).await;
                        }));
                        running.insert(
                            id,
                            Running {
                                task,
                                ranges,
                                bytes,
                                seen: 0,
                                stop,
                                given_up: false,
                            },
                        );
                    }
                    Action::Cancel { id, .. } => {
                        // It ends of itself, soon (`Ev::Done`), having
                        // written what it verified.
                        if let Some(r) = running.get_mut(&id) {
                            r.given_up = true;
                            r.stop.cancel();
                        }
                    }
                    Action::DropPeer { peer, reason } => {
                        match reason {
                            DropReason::Corrupt => {
                                warn!(%peer, %hash, "peer sent data that failed verification: dropped and disconnected");
                                banned.insert(peer);
                            }
                            DropReason::Unreliable => {
                                warn!(%peer, %hash, "peer lied about what it has: dropped");
                                banned.insert(peer);
                            }
                            DropReason::Stalled => {
                                let times = stalled.entry(peer).or_insert(0);
                                *times += 1;
                                if *times >= MAX_STALL_DROPS {
                                    // Back each time only to stall again: a
                                    // live peer that accepts requests and
                                    // sends nothing.
                                    warn!(%peer, %hash, "peer stalled {} times: dropped", *times);
                                    banned.insert(peer);
                                } else {
                                    let rest = stall_rest(*times, stall);
                                    warn!(%peer, %hash, "peer stalled: dropped, asked again in {rest:?}");
                                    resting.insert(peer, Instant::now() + rest);
                                }
                            }
                        }
                        if let Some(slot) = peers.remove(&peer) {
                            if let Some(t) = slot.sub {
                                t.abort();
                            }
                            match reason {
                                DropReason::Corrupt => slot.conn.close(3, b"sent corrupt data"),
                                DropReason::Stalled => close_if_dead(slot.conn, hash),
                                DropReason::Unreliable => {}
                            }
                        }
                    }
                }
            }
        } else if probe.is_none() {
            // Prove the size: fetch the last group from a peer that has it.
            let pick = peers
                .iter()
                .filter(|(_, s)| s.complete || s.have.contains(group_count(s.size) - 1))
                .min_by_key(|(p, _)| probe_failures.get(*p).copied().unwrap_or(0))
                .map(|(p, s)| (*p, s.conn.clone(), s.size));
            if let Some((peer, conn, size)) = pick {
                if !begun {
                    let k = kind.unwrap_or(BlobKind::Raw);
                    if let (Some(p), BlobKind::Raw) = (&job.no_file_at, k) {
                        break Err(NodeError::OutputExists(p.clone()));
                    }
                    if let Err(e) = begin(k).await {
                        break Err(e.into());
                    }
                    begun = true;
                }
                let (tx, store) = (tx.clone(), store.clone());
                let last = GroupRanges::from_range(group_count(size) - 1..group_count(size));
                let deadline = probe_deadline(node.config.download_limit);
                let task = Task(tokio::spawn(async move {
                    let bytes = Arc::new(AtomicU64::new(0));
                    let get = run_get(
                        &conn,
                        &store,
                        &hash,
                        &last,
                        bytes.clone(),
                        CancellationToken::new(),
                    );
                    let result = unless_silent(get, &bytes, ANSWER_TIMEOUT, deadline).await;
                    let _ = tx.send(Ev::Probe { peer, result }).await;
                }));
                probe = Some((peer, task));
            }
        }
        // Dial queued candidates.
        while dialing.len() < MAX_DIALS && peers.len() < MAX_PEERS {
            let Some(c) = queued.pop() else { break };
            if !dial_state!().worth_dialling(&c, now) {
                continue;
            }
            dialing.insert(c.addr);
            let (node, tx) = (node.clone(), tx.clone());
            tokio::spawn(async move {
                let ev = match connect_and_ask(&node, c.addr, c.id, &hash).await {
                    Ok((conn, avail)) => Ev::PeerUp {
                        peer: conn.peer_id(),
                        conn,
                        avail,
                        addr: c.addr,
                    },
                    Err(e) => Ev::DialFailed {
                        addr: c.addr,
                        id: c.id,
                        hopeless: e.is_hopeless_dial(),
                        err: e.to_string(),
                    },
                };
                let _ = tx.send(ev).await;
            });
        }
        // With discovery off, the peers given (and those they tell of) are
        // all there is: once every one given was reached, none of those up
        // holds any of it (a peer whose copy went corrupt or was deleted,
        // a wrong hash), and no other address is waited for, the download
        // says so after `NOT_HELD_GRACE` (time for peer exchange and a
        // have update) instead of its stall timeout. An address heard of
        // (peer exchange) that failed to answer is not waited for, though
        // it is dialled again meanwhile (a peer killed half-way stays in
        // its swarm's peer exchange, its addresses leading nowhere).
        let waited_for = |addr: &SocketAddr| {
            known
                .get(addr)
                .is_none_or(|k| k.cand.source == Source::Static)
                || book.failures(*addr) == 0
        };
        let holds_nothing = discovery_off
            && probe.is_none()
            && queued.iter().all(|c| !waited_for(&c.addr))
            && dialing.iter().all(|a| !waited_for(a))
            && peers.values().all(|p| !p.complete && p.have.is_empty())
            && known.iter().all(|(addr, k)| match k.peer {
                // One that stalled is waited for until its rest is over
                // and it could not be dialled again.
                Some(id) if reached.contains(&id) => {
                    peers.contains_key(&id)
                        || banned.contains(&id)
                        || match (resting.contains_key(&id), stalled.contains_key(&id)) {
                            (true, stalled) => !stalled,
                            (false, true) => book.failures(*addr) > 0,
                            (false, false) => false,
                        }
                }
                _ => !waited_for(addr),
            });
        // Peers dropped, and not back: those that stalled may return.
        let dropped = banned.len()
            + stalled
                .keys()
                .filter(|p| !peers.contains_key(*p) && !banned.contains(*p))
                .count();
        match (holds_nothing, nothing_since) {
            (false, _) => nothing_since = None,
            (true, None) => nothing_since = Some(now),
            (true, Some(since)) if now.duration_since(since) >= NOT_HELD_GRACE => {
                // Not "none holds it" when some did and were dropped.
                break Err(if dropped == 0 {
                    NodeError::NotHeld(hash, reached.len())
                } else {
                    NodeError::AllDropped(hash, dropped)
                });
            }
            (true, Some(_)) => {}
        }
        if now.duration_since(last_progress) > stall {
            break Err(if peers.is_empty() && dropped > 0 {
                NodeError::AllDropped(hash, dropped)
            } else if peers.is_empty() {
                // The addresses given, and why each could not be used (a
                // closed port waited out the stall timeout and then said
                // only "could not be found or reached").
                let why: Vec<String> = unreached.iter().map(|(a, e)| format!("{a}: {e}")).collect();
                NodeError::NoProviders(
                    hash,
                    if why.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", why.join("; "))
                    },
                )
            } else if peers.values().all(|p| !p.complete && p.have.is_empty()) && dropped > 0 {
                NodeError::AllDropped(hash, dropped)
            } else if peers.values().all(|p| !p.complete && p.have.is_empty()) {
                // Reached, asked, and none has a byte of it: say that,
                // not that the download stalled.
                NodeError::NotHeld(hash, reached.len())
            } else {
                NodeError::Stalled(hash, stall)
            });
        }

        tokio::select! {
            c = next_candidate(&mut candidates), if candidates_open => match c {
                Some(c) => {
                    debug!(addr = %c.addr, source = ?c.source, "candidate");
                    remember_found(&mut known, &c, Instant::now());
                    enqueue_found(&mut queued, c);
                }
                None => candidates_open = false,
            },
            a = arrivals.recv(), if arrivals_open => match a {
                Ok((id, addr)) => {
                    // Asked at once, over the connection it made (dialling
                    // it reuses that). First in line, room made if need be:
                    // a peer that came to us is worth more than an address
                    // heard of.
                    let c = Candidate { addr, id: Some(id), source: Source::Static };
                    debug!(%addr, peer = %id, "a peer connected: asking it");
                    remember_found(&mut known, &c, Instant::now());
                    queued.retain(|q| q != &c);
                    enqueue_found(&mut queued, c);
                }
                // Missed some (heard of through peer exchange, if at all).
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => arrivals_open = false,
            },
            Some(ev) = rx.recv() => match ev {
                Ev::PeerUp { peer, conn, avail, addr } => {
                    dialing.remove(&addr);
                    book.record_success(addr);
                    unreached.retain(|(a, _)| *a != addr);
                    reached.insert(peer);
                    if let Some(k) = known.get_mut(&addr) {
                        k.peer = Some(peer);
                    }
                    if banned.contains(&peer) || peers.contains_key(&peer) || resting.contains_key(&peer) {
                        continue;
                    }
                    let (have, complete) = match &avail.have {
                        Some(pb::availability::Have::Complete(true)) => (GroupRanges::from_range(0..group_count(avail.size)), true),
                        // Only groups of the blob it says it is (a claim
                        // beyond it would grow the map for nothing).
                        Some(pb::availability::Have::Ranges(r)) => (GroupRanges::from_pb(r).unwrap_or_default().clipped(group_count(avail.size)), false),
                        _ => (GroupRanges::new(), false),
                    };
                    let claims_collection = avail.kind == pb::BlobKind::Collection as i32;
                    if complete || !have.is_empty() {
                        claimed_collection |= claims_collection;
                        if kind.is_none() {
                            kind = Some(if claims_collection { BlobKind::Collection } else { BlobKind::Raw });
                        }
                    }
                    if complete || !have.is_empty() {
                        lock(&node.book).saw(hash, peer, true);
                    }
                    debug!(%peer, size = avail.size, complete, groups = have.count(), "peer up");
                    let sub = (!complete).then(|| spawn_subscription(conn.clone(), hash, peer, tx.clone()));
                    peers.insert(peer, PeerSlot { conn, addr, size: avail.size, have: have.clone(), complete, sub, joined: Instant::now() });
                    if let Some(s) = sched.as_mut() {
                        add_to_scheduler(s, &peer, &peers[&peer]);
                    }
                }
                Ev::DialFailed { addr, id, err, hopeless: true } => {
                    dialing.remove(&addr);
                    if discovery_off {
                        // The error says it if nothing else is left.
                        debug!(%addr, "{err}: not dialled again");
                    } else {
                        info!(%addr, "{err}: not dialled again");
                    }
                    // Only what named the same peer there is hopeless (an
                    // address that is this node's own fails for any id).
                    let same = |c: &Candidate| c.addr == addr && (c.id == id || id.is_none());
                    if known.get(&addr).is_some_and(|k| same(&k.cand)) {
                        known.remove(&addr);
                    }
                    queued.retain(|c| !same(c));
                    hopeless.push((addr, err));
                    if discovery_off
                        && known.is_empty()
                        && queued.is_empty()
                        && dialing.is_empty()
                        && peers.is_empty()
                    {
                        let why: Vec<String> = hopeless.iter().map(|(_, e)| e.clone()).collect();
                        break Err(NodeError::NowhereLeft(hash, why.join("; ")));
                    }
                }
                Ev::DialFailed { addr, err, hopeless: false, .. } => {
                    dialing.remove(&addr);
                    book.record_failure(addr, Instant::now());
                    // Say it once per address given up front (a ticket's,
                    // --peer): the user named it. Discovered ones are many.
                    let named = known.get(&addr).is_some_and(|k| k.cand.source == Source::Static);
                    if named {
                        if let Some(u) = unreached.iter_mut().find(|(a, _)| *a == addr) {
                            u.1 = err.to_string();
                        } else if unreached.len() < MAX_UNREACHED_SAID {
                            unreached.push((addr, err.to_string()));
                        }
                    }
                    if named && book.failures(addr) == 1 {
                        info!(%addr, "{err}; dialling it again while the download waits (up to {stall:?} without progress)");
                    } else {
                        debug!(%addr, "could not use candidate: {err}");
                    }
                }
                Ev::Have { peer, size, added, complete, fetching } => {
                    if let Some(s) = sched.as_mut() && !fetching.is_empty() {
                        s.handle_fetching(&fetching);
                    }
                    let Some(slot) = peers.get_mut(&peer) else { continue };
                    if slot.size == 0 { slot.size = size; }
                    // Clipped to the blob (its proven size once there is
                    // one, else the peer's claim), and at most
                    // `MAX_PEER_RUNS` runs kept: runs beyond it, update
                    // after update, would grow the map without bound.
                    // Knowing less of a peer than it has is safe.
                    let groups = sched.as_ref().map_or(group_count(slot.size), |s| s.groups());
                    if slot.have.runs().len() < MAX_PEER_RUNS {
                        slot.have.union_with(&added.clipped(groups));
                    }
                    slot.complete |= complete;
                    if complete || !slot.have.is_empty() {
                        lock(&node.book).saw(hash, peer, true);
                    }
                    if let Some(s) = sched.as_mut() {
                        if complete { s.handle_peer_complete(&peer) } else { s.handle_have(&peer, &added) }
                    }
                }
                Ev::SubEnded { peer } => {
                    if let Some(slot) = peers.get_mut(&peer) {
                        slot.sub = None;
                        if slot.conn.is_closed() {
                            peers.remove(&peer);
                            if let Some(s) = sched.as_mut() { s.handle_peer_removed(&peer) }
                        }
                    }
                }
                Ev::Done { id, peer, result } => {
                    let ran = running.remove(&id);
                    read_by_ended += ran.as_ref().map_or(0, |r| r.bytes.load(Ordering::Relaxed));
                    let Some(s) = sched.as_mut() else { continue };
                    if let Some(r) = ran.as_ref().filter(|r| r.given_up) {
                        // Given up (a stall, or an end-game duplicate made
                        // needless): not the peer's failure. The groups it
                        // verified count, and are not asked for again.
                        match &result {
                            Ok(received) => s.handle_request_done(id, received, Instant::now()),
                            Err(_) => keep_verified(s, &store, &hash, &r.ranges),
                        }
                        continue;
                    }
                    let asked = ran.map(|r| r.ranges);
                    match result {
                        Ok(received) => {
                            lock(&node.book).count_download(peer, received.count() * GROUP_SIZE);
                            s.handle_request_done(id, &received, Instant::now());
                        }
                        Err(e) => {
                            if let Some(asked) = asked {
                                keep_verified(s, &store, &hash, &asked);
                            }
                            match e {
                                ReqError::Corrupt(msg) => {
                                    warn!(%peer, "{msg}");
                                    s.handle_request_failed(id, Failure::Corrupt);
                                }
                                ReqError::Local(e) => break Err(NodeError::Store(e)),
                                ReqError::Busy => {
                                    // Choked: the peer stays, and is asked
                                    // again in its turn.
                                    debug!(%peer, "request choked");
                                    s.handle_request_failed(id, Failure::Busy);
                                }
                                ReqError::Failed(msg) => {
                                    debug!(%peer, "request failed: {msg}");
                                    // The scheduler forgets the peer (it would
                                    // otherwise count its requests as strikes and
                                    // drop it for good); so does the download, and
                                    // its address is dialled again (over its
                                    // connection, if that still stands), which asks
                                    // it afresh what it holds. Kept while its
                                    // connection stood, it was never asked again: a
                                    // seeder whose copy turned out corrupt as it
                                    // read, or that refused one request, was dead
                                    // weight until the download stalled.
                                    s.handle_request_failed(id, Failure::Error);
                                    if let Some(slot) = peers.remove(&peer) {
                                        s.handle_peer_removed(&peer);
                                        if let Some(t) = slot.sub { t.abort() }
                                    }
                                }
                            }
                        }
                    }
                }
                Ev::Probe { peer, result } => {
                    probe = None;
                    match result {
                        Ok(sent) => {
                            // A proven size can still be absurd (a blob of
                            // zeros has a cheap hash at any size): refuse
                            // before the scheduler sizes its tables by it.
                            // An unproven one is not refused: it was a
                            // liar's, and the peer is dropped below.
                            if let Some(size) = store.info(&hash).as_ref().and_then(proven_size).filter(|s| *s > MAX_BLOB_SIZE) {
                                break Err(NodeError::TooLarge(hash, size));
                            }
                            sched = proven_scheduler(&node, &hash, job.sequential);
                            match sched.as_mut() {
                                Some(s) => {
                                    let size = store.info(&hash).map_or(0, |i| i.size);
                                    let liars: Vec<PeerId> = peers.iter().filter(|(_, p)| p.size != size && (p.complete || !p.have.is_empty())).map(|(id, _)| *id).collect();
                                    for l in liars {
                                        warn!(peer = %l, "peer claimed a wrong size: dropped");
                                        banned.insert(l);
                                        if let Some(slot) = peers.remove(&l) && let Some(t) = slot.sub { t.abort() }
                                    }
                                    for (id, slot) in &peers {
                                        add_to_scheduler(s, id, slot);
                                    }
                                    last_progress = Instant::now();
                                }
                                None => {
                                    if sent.is_empty() {
                                        // It said it held the blob, then answered "not here"
                                        // (an older peer whose copy went corrupt or changed).
                                        warn!(%peer, "peer claimed the blob but would not serve its last group: dropped");
                                    } else {
                                        warn!(%peer, "peer did not prove the size it claimed: dropped");
                                    }
                                    banned.insert(peer);
                                    peers.remove(&peer);
                                }
                            }
                        }
                        Err(ReqError::Local(e)) => break Err(NodeError::Store(e)),
                        Err(ReqError::Corrupt(msg)) => {
                            warn!(%peer, "could not prove the size: {msg}; dropped");
                            banned.insert(peer);
                            if let Some(slot) = peers.remove(&peer) && let Some(t) = slot.sub { t.abort() }
                        }
                        Err(ReqError::Busy) => {
                            // Choked: not a failure; another peer (or this
                            // one again) proves the size.
                            debug!(%peer, "size proof choked");
                        }
                        Err(ReqError::Failed(msg)) => {
                            // A connection that went, a timeout: not a lie. The
                            // peer may be asked again (its address is redialled),
                            // a few times.
                            let n = probe_failures.entry(peer).or_insert(0);
                            *n += 1;
                            if *n >= MAX_PROBE_FAILURES {
                                warn!(%peer, "could not prove the size {n} times: {msg}; dropped");
                                banned.insert(peer);
                            } else {
                                debug!(%peer, "could not prove the size: {msg}");
                            }
                            if let Some(slot) = peers.remove(&peer) && let Some(t) = slot.sub { t.abort() }
                        }
                    }
                }
                Ev::More(list) => {
                    // The answer's first (peers connected to the teller)
                    // are kept, and dialled first: the queue is taken from
                    // its end, so what fits goes in backwards.
                    for c in &list {
                        remember(&mut known, c, Instant::now());
                    }
                    let room = MAX_KNOWN.saturating_sub(queued.len());
                    for c in list.into_iter().take(room).rev() {
                        enqueue(&mut queued, c);
                    }
                }
            },
            _ = tick.tick() => {
                let now = Instant::now();
                // Peers the fetches waiting for this download were given.
                for p in std::mem::take(&mut *lock(&extra)) {
                    // Not this node itself (never dialled, never failed:
                    // the download would wait for it).
                    if p.id == Some(node.endpoint.peer_id()) || book.is_self_addr(p.addr) {
                        continue;
                    }
                    let c = Candidate { addr: p.addr, id: p.id, source: Source::Static };
                    remember_found(&mut known, &c, now);
                    enqueue_found(&mut queued, c);
                }
                // Dial again the remembered addresses that have no peer in
                // use, are not being dialled, and are past their backoff.
                for (addr, k) in &mut known {
                    if now < k.next
                        || dialing.contains(addr)
                        || k.peer.is_some_and(|p| peers.contains_key(&p) || banned.contains(&p) || resting.contains_key(&p))
                        || peers.values().any(|p| p.addr == *addr)
                        || queued.iter().any(|c| c.addr == *addr)
                        || !book.should_dial(*addr, now)
                    {
                        continue;
                    }
                    k.next = now + REDIAL_MIN;
                    queued.push(k.cand.clone());
                }
                // All slots taken and someone waits: the peer that has
                // held nothing longest gives its slot up (one per tick).
                let idle = idle_limit(stall);
                if peers.len() >= MAX_PEERS
                    && queued.iter().any(|c| dial_state!().worth_dialling(c, now))
                    && let Some(peer) = peers
                        .iter()
                        .filter(|(_, p)| !p.complete && p.have.is_empty() && now.duration_since(p.joined) >= idle)
                        .min_by_key(|(_, p)| p.joined)
                        .map(|(id, _)| *id)
                    && let Some(slot) = peers.remove(&peer)
                {
                    debug!(%peer, "holds nothing after {idle:?}: its slot goes to another peer");
                    if let Some(t) = slot.sub {
                        t.abort();
                    }
                    if let Some(s) = sched.as_mut() {
                        s.handle_peer_removed(&peer);
                    }
                    resting.insert(peer, now + 2 * idle);
                }
                resting.retain(|_, until| now < *until);
                if let Some(s) = sched.as_mut() {
                    for (id, r) in running.iter_mut() {
                        let b = r.bytes.load(Ordering::Relaxed);
                        if b != r.seen {
                            r.seen = b;
                            s.handle_progress(*id, now);
                        }
                    }
                    s.handle_timeout(now);
                    let verified = (s.verified_groups() * GROUP_SIZE).min(store.info(&hash).map_or(0, |i| i.size));
                    if verified > last_verified {
                        last_verified = verified;
                        last_progress = now;
                    }
                    let read = read_by_ended + running.values().map(|r| r.bytes.load(Ordering::Relaxed)).sum::<u64>();
                    let rate = rate.update(now, read);
                    let total = store.info(&hash).map_or(0, |i| i.size);
                    let npeers = peers.len() as u32;
                    progress.send_modify(|p| { p.verified = verified; p.total = total; p.peers = npeers; p.rate = rate; });
                } else if !peers.is_empty() || probe.is_some() {
                    // Connected and proving: not stalled yet.
                    let npeers = peers.len() as u32;
                    progress.send_modify(|p| p.peers = npeers);
                }
            },
            _ = pex_tick.tick() => {
                for (peer, slot) in &peers {
                    let (conn, tx, peer) = (slot.conn.clone(), tx.clone(), *peer);
                    tokio::spawn(async move {
                        match ask_pex(&conn, &hash).await {
                            Ok(list) if !list.is_empty() => { let _ = tx.send(Ev::More(list)).await; }
                            Ok(_) => {}
                            Err(e) => debug!(%peer, "pex failed: {e}"),
                        }
                    });
                }
            },
            () = cancel.cancelled() => break Err(cancel_error(&node, hash)),
        }
    };
    for (_, r) in running.drain() {
        r.task.abort();
    }
    if let Some((_, t)) = probe {
        t.abort();
    }
    let providers: Vec<Connection> = peers
        .values()
        .filter(|s| s.complete && !s.conn.is_closed())
        .map(|s| s.conn.clone())
        .collect();
    for (_, slot) in peers.drain() {
        if let Some(t) = slot.sub {
            t.abort();
        }
    }
    store.end_download(&hash);
    result?;
    // Every group is verified; the request that verified the last one may
    // still be finishing the blob (syncing, renaming into place).
    let deadline = Instant::now() + Duration::from_secs(120);
    let info = loop {
        match store.info(&hash) {
            Some(info) if info.complete => break info,
            Some(_) if Instant::now() < deadline => {
                let _ = tokio::time::timeout(Duration::from_millis(50), events.recv()).await;
            }
            _ => {
                return Err(NodeError::Internal(
                    "every group verified but the blob did not complete in the store".into(),
                ));
            }
        }
    };
    progress.send_modify(|p| {
        p.verified = info.size;
        p.total = info.size;
    });
    debug!(%hash, size = info.size, "download complete");
    Ok(Fetched {
        kind: kind.unwrap_or(BlobKind::Raw),
        claimed_collection,
        providers,
    })
}

/// The blob's size if the store has proven it (the blob is complete, or
/// its last group verified); until then the size is a peer's claim.
fn proven_size(info: &shoal_store::BlobInfo) -> Option<u64> {
    let last = group_count(info.size) - 1;
    (info.complete || info.verified.contains(last)).then_some(info.size)
}

/// A scheduler, if the store has proven the blob's size (its last group
/// is verified).
fn proven_scheduler(node: &Inner, hash: &Hash, sequential: bool) -> Option<Scheduler<PeerId>> {
    let info = node.store.info(hash)?;
    let groups = group_count(info.size);
    // Never sized past the limit (its tables would not fit in memory): a
    // size proven by an earlier try that stopped with `TooLarge` stays in
    // the store.
    if proven_size(&info).is_none_or(|s| s > MAX_BLOB_SIZE) {
        return None;
    }
    let have = if info.complete {
        GroupRanges::from_range(0..groups)
    } else {
        info.verified.clone()
    };
    let cfg = SchedulerConfig {
        sequential,
        seed: u64::from_le_bytes(rand_seed()),
        ..SchedulerConfig::default()
    };
    Some(Scheduler::new(groups, &have, cfg))
}

/// Tells the scheduler which of the groups `asked` of a request that
/// failed or was given up were verified before it ended (only those it
/// asked for are new): they are not asked for again.
fn keep_verified(s: &mut Scheduler<PeerId>, store: &Store, hash: &Hash, asked: &GroupRanges) {
    if let Some(info) = store.info(hash) {
        s.handle_verified(&info.verified.intersection(asked), None);
    }
}

fn rand_seed() -> [u8; 8] {
    let mut b = [0u8; 8];
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    b.copy_from_slice(&(t ^ u64::from(std::process::id())).to_le_bytes());
    b
}

fn add_to_scheduler(s: &mut Scheduler<PeerId>, id: &PeerId, slot: &PeerSlot) {
    s.handle_peer_added(*id);
    if slot.complete {
        s.handle_peer_complete(id);
    } else {
        s.handle_have(id, &slot.have);
    }
}

/// `get`, failed once no byte of it has come for `limit`. For the size
/// proof, which nothing else watches (the scheduler times out its own
/// requests): a peer that answered the header and then fell silent held
/// the whole download until its stall timeout.
///
/// And failed once past `deadline` if it averaged under
/// [`PROBE_MIN_RATE`]: a peer sending a byte now and then was never silent
/// for `limit`, and held the download (a proof at a time) until it
/// stalled, with honest seeders connected.
async fn unless_silent(
    get: impl Future<Output = Result<GroupRanges, ReqError>>,
    bytes: &AtomicU64,
    limit: Duration,
    deadline: Duration,
) -> Result<GroupRanges, ReqError> {
    tokio::pin!(get);
    let start = Instant::now();
    let (mut seen, mut since) = (0, start);
    let mut tick = tokio::time::interval(limit / 10);
    loop {
        tokio::select! {
            result = &mut get => return result,
            _ = tick.tick() => {
                let b = bytes.load(Ordering::Relaxed);
                if b != seen {
                    (seen, since) = (b, Instant::now());
                } else if since.elapsed() >= limit {
                    return Err(ReqError::Failed(format!("no data for {limit:?} while proving the size")));
                }
                // Past the deadline, only a peer slower than
                // `PROBE_MIN_RATE` on average is given up: a seeder whose
                // upload limit is shared by many downloaders is slow, not
                // lying.
                let spent = start.elapsed();
                if spent >= deadline && (b as f64) < spent.as_secs_f64() * PROBE_MIN_RATE {
                    return Err(ReqError::Failed(format!(
                        "the size proof took over {deadline:?} ({b} bytes came)"
                    )));
                }
            }
        }
    }
}

/// How long a size proof runs before its average rate is judged: it is one
/// group and the hashes above it (~20 KiB), so [`PROBE_DEADLINE`], and
/// longer under a download limit that slows it (64 KiB at the limit's
/// rate, on top).
fn probe_deadline(download_limit: Option<u64>) -> Duration {
    let slowed = download_limit.map_or(Duration::ZERO, |rate| {
        Duration::from_secs_f64(64.0 * 1024.0 / rate.max(1) as f64)
    });
    PROBE_DEADLINE + slowed
}

/// The next candidate discovery found; never, with discovery off.
async fn next_candidate(rx: &mut Option<mpsc::Receiver<Candidate>>) -> Option<Candidate> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Dial a candidate and ask it what it has of `hash`.
async fn connect_and_ask(
    node: &Arc<Inner>,
    addr: SocketAddr,
    id: Option<PeerId>,
    hash: &Hash,
) -> Result<(Connection, pb::Availability), NodeError> {
    let conn = node.connect(addr, id).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let req = pb::Request {
        kind: Some(pb::request::Kind::Who(pb::Who {
            hashes: vec![hash.as_bytes().to_vec().into()],
        })),
    };
    write_frame(&mut send, &req).await?;
    let _ = send.finish();
    let resp: pb::Response =
        tokio::time::timeout(ANSWER_TIMEOUT, read_frame(&mut recv, Limit::Response))
            .await
            .map_err(|_| NodeError::Timeout("waiting for an answer to who".into()))??;
    match resp.kind {
        Some(pb::response::Kind::Who(w)) => {
            let a = w
                .entries
                .into_iter()
                .next()
                .ok_or_else(|| NodeError::Protocol("empty who answer".into()))?;
            if a.hash.as_ref() != hash.as_bytes() {
                return Err(NodeError::Protocol("who answer for another hash".into()));
            }
            Ok((conn, a))
        }
        Some(pb::response::Kind::Error(e)) => Err(NodeError::Remote(
            shoal_proto::error_code_name(e.code),
            e.message,
        )),
        _ => Err(NodeError::Protocol("unexpected answer to who".into())),
    }
}

/// One get: ask for `ranges`, verify and store what comes.
async fn run_get(
    conn: &Connection,
    store: &Store,
    hash: &Hash,
    ranges: &GroupRanges,
    bytes: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<GroupRanges, ReqError> {
    let failed = |e: &dyn std::fmt::Display| ReqError::Failed(e.to_string());
    let (mut send, recv) = conn.open_bi().await.map_err(|e| failed(&e))?;
    let req = pb::Request {
        kind: Some(pb::request::Kind::Get(pb::Get {
            hash: hash.as_bytes().to_vec().into(),
            ranges: Some(ranges.to_pb()),
        })),
    };
    write_frame(&mut send, &req).await.map_err(|e| failed(&e))?;
    let _ = send.finish();
    let mut recv = Counting::new(recv, bytes, stop);
    let resp: pb::Response =
        tokio::time::timeout(ANSWER_TIMEOUT, read_frame(&mut recv, Limit::Response))
            .await
            .map_err(|_| ReqError::Failed("no answer to get".into()))?
            .map_err(|e| match e {
                WireError::Io(io) if choked(&io) => ReqError::Busy,
                e => failed(&e),
            })?;
    let header = match resp.kind {
        Some(pb::response::Kind::Get(h)) => h,
        Some(pb::response::Kind::Error(e)) if e.code == pb::ErrorCode::NotFound as i32 => {
            return Ok(GroupRanges::new());
        }
        Some(pb::response::Kind::Error(e)) => {
            return Err(ReqError::Failed(format!(
                "{}: {}",
                shoal_proto::error_code_name(e.code),
                e.message
            )));
        }
        _ => {
            return Err(ReqError::Corrupt(
                "peer answered get with something else".into(),
            ));
        }
    };
    let sent = GroupRanges::from_opt_pb(header.ranges.as_ref())
        .map_err(|e| ReqError::Corrupt(format!("bad get header: {e}")))?;
    if !sent.difference(ranges).is_empty() {
        return Err(ReqError::Corrupt(
            "peer offered groups that were not asked for".into(),
        ));
    }
    if sent.is_empty() {
        return Ok(sent);
    }
    // Ok only once every group of `sent` verified (a stream whose size has
    // no room for one of them is refused as `OutOfRange`).
    match store.receive_ranges_from(hash, &sent, &mut recv).await {
        Ok(_new) => Ok(sent),
        Err(
            e @ (ReceiveError::Corrupt { .. }
            | ReceiveError::SizeMismatch { .. }
            | ReceiveError::OutOfRange { .. }),
        ) => Err(ReqError::Corrupt(format!("peer sent bad data: {e}"))),
        Err(ReceiveError::Store(e)) => Err(ReqError::Local(e)),
        Err(ReceiveError::Read(e)) if choked(&e) => Err(ReqError::Busy),
        Err(e) => Err(ReqError::Failed(e.to_string())),
    }
}

/// Whether a read failed because the peer choked the answer.
pub(crate) fn choked(e: &std::io::Error) -> bool {
    shoal_transport::reset_code(e) == Some(shoal_transport::RESET_BUSY)
}

impl std::fmt::Display for ReqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReqError::Corrupt(m) | ReqError::Failed(m) => f.write_str(m),
            ReqError::Busy => {
                f.write_str("the peer is busy (it gave our answer's slot to another)")
            }
            ReqError::Local(e) => write!(f, "{e}"),
        }
    }
}

fn spawn_subscription(conn: Connection, hash: Hash, peer: PeerId, tx: mpsc::Sender<Ev>) -> Task {
    Task(tokio::spawn(async move {
        if let Err(e) = run_subscription(&conn, &hash, peer, &tx).await {
            debug!(%peer, "have subscription ended: {e}");
        }
        let _ = tx.send(Ev::SubEnded { peer }).await;
    }))
}

async fn run_subscription(
    conn: &Connection,
    hash: &Hash,
    peer: PeerId,
    tx: &mpsc::Sender<Ev>,
) -> Result<(), NodeError> {
    let (mut send, mut recv): (_, RecvStream) = conn.open_bi().await?;
    let req = pb::Request {
        kind: Some(pb::request::Kind::Subscribe(pb::Subscribe {
            hashes: vec![hash.as_bytes().to_vec().into()],
        })),
    };
    // The send side stays open: closing it ends the subscription.
    write_frame(&mut send, &req).await?;
    let resp: pb::Response =
        tokio::time::timeout(ANSWER_TIMEOUT, read_frame(&mut recv, Limit::Response))
            .await
            .map_err(|_| NodeError::Timeout("waiting for subscribe".into()))??;
    match resp.kind {
        Some(pb::response::Kind::Subscribe(_)) => {}
        Some(pb::response::Kind::Error(e)) => {
            return Err(NodeError::Remote(
                shoal_proto::error_code_name(e.code),
                e.message,
            ));
        }
        _ => return Err(NodeError::Protocol("unexpected answer to subscribe".into())),
    }
    loop {
        let up: pb::HaveUpdate = read_frame(&mut recv, Limit::HaveUpdate).await?;
        if up.hash.as_ref() != hash.as_bytes() {
            continue;
        }
        let added = GroupRanges::from_opt_pb(up.added.as_ref())
            .map_err(|e| NodeError::Protocol(e.to_string()))?;
        let fetching = GroupRanges::from_opt_pb(up.fetching.as_ref())
            .map_err(|e| NodeError::Protocol(e.to_string()))?;
        if tx
            .send(Ev::Have {
                peer,
                size: up.size,
                added,
                complete: up.complete,
                fetching,
            })
            .await
            .is_err()
        {
            return Ok(());
        }
    }
}

async fn ask_pex(conn: &Connection, hash: &Hash) -> Result<Vec<Candidate>, NodeError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let req = pb::Request {
        kind: Some(pb::request::Kind::Pex(pb::Pex {
            hash: hash.as_bytes().to_vec().into(),
        })),
    };
    write_frame(&mut send, &req).await?;
    let _ = send.finish();
    let resp: pb::Response =
        tokio::time::timeout(ANSWER_TIMEOUT, read_frame(&mut recv, Limit::Response))
            .await
            .map_err(|_| NodeError::Timeout("waiting for pex".into()))??;
    let Some(pb::response::Kind::Pex(p)) = resp.kind else {
        return Ok(Vec::new());
    };
    Ok(pex_candidates(conn.remote_addr(), &p.peers))
}

/// The candidates in a peer-exchange answer from the peer met at `via`:
/// at most [`limits::MAX_PEX_PEERS`] peers of [`limits::MAX_ADDRS`]
/// addresses each, with a valid id, and only addresses plausible from
/// `via` ([`shoal_discovery::plausible_from`]). The answer is the
/// answerer's word alone, and an honest node passes on only such
/// addresses: a hostile one would otherwise send every downloader that
/// asks it to dial `127.0.0.1:53` or a router on their own network.
fn pex_candidates(via: SocketAddr, peers: &[pb::PeerInfo]) -> Vec<Candidate> {
    let mut out = Vec::new();
    for info in peers.iter().take(limits::MAX_PEX_PEERS) {
        let Ok(id) = hash_from_bytes(&info.id) else {
            continue;
        };
        let Ok(id) = PeerId::from_bytes(&id) else {
            continue;
        };
        for a in info.addrs.iter().take(limits::MAX_ADDRS) {
            if let Ok(addr) = a.parse::<SocketAddr>()
                && shoal_discovery::plausible_from(addr, via)
            {
                out.push(Candidate {
                    addr: shoal_discovery::canonical(addr),
                    id: Some(id),
                    source: Source::Pex,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_transport::SecretKey;

    fn info(id: &PeerId, addrs: &[&str]) -> pb::PeerInfo {
        pb::PeerInfo {
            id: id.as_bytes().to_vec().into(),
            addrs: addrs.iter().map(|a| (*a).to_string()).collect(),
        }
    }

    /// A download dropped while its begin runs off the async workers
    /// leaves nothing in flight: gc frees the unpinned blob once the begin
    /// is done (the turn was ended before the begin, which then marked the
    /// blob in flight until the node restarted).
    #[tokio::test]
    async fn a_download_dropped_while_it_begins_leaves_nothing_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let hash = blake3::hash(b"dropped while it begins");
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        let in_flight = InFlight::new(store.clone(), hash, turn.clone().try_lock_owned().ok());
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (begun_tx, begun_rx) = std::sync::mpsc::channel();
        let mut begin = Box::pin(in_flight.begin(move |store: &Store| {
            entered_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            let r = store.begin_download(&hash, BlobKind::Raw, None, false);
            begun_tx.send(()).unwrap();
            r
        }));
        assert!(futures::poll!(begin.as_mut()).is_pending());
        entered_rx.recv().unwrap();
        drop(begin);
        drop(in_flight);
        // The turn is kept until the begin has ended it in the store: a
        // waiter's begin before the late end had its own turn ended.
        assert!(turn.try_lock().is_err(), "the turn went before the end");
        go_tx.send(()).unwrap();
        begun_rx.recv().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            store.gc().unwrap();
            if store.info(&hash).is_none() {
                break;
            }
            assert!(Instant::now() < deadline, "the blob stays in flight");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while turn.try_lock().is_err() {
            assert!(Instant::now() < deadline, "the turn is never given up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn addrs(c: &[Candidate]) -> Vec<String> {
        c.iter().map(|c| c.addr.to_string()).collect()
    }

    fn cand(i: u32, source: Source) -> Candidate {
        Candidate {
            addr: SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 4000)),
            id: None,
            source,
        }
    }

    /// Discovery sends each address once: a queue and a memory full of
    /// addresses that never answered (made up, say, and announced in the
    /// DHT) make room for one found later, which is dialled next; an
    /// address that led to a peer is never pushed out. Peer exchange
    /// pushes nothing out.
    #[test]
    fn addresses_found_later_are_not_kept_out_by_a_full_queue() {
        let now = Instant::now();
        let mut queued = Vec::new();
        let mut known = HashMap::new();
        for i in 0..MAX_KNOWN as u32 {
            let c = cand(i, Source::Dht);
            remember_found(&mut known, &c, now + Duration::from_millis(u64::from(i)));
            enqueue_found(&mut queued, c);
        }
        // One of them answered once.
        known.get_mut(&cand(7, Source::Dht).addr).unwrap().peer =
            Some(SecretKey::generate().public());
        let from_pex = cand(5000, Source::Pex);
        remember(&mut known, &from_pex, now);
        enqueue(&mut queued, from_pex.clone());
        assert!(!known.contains_key(&from_pex.addr) && !queued.contains(&from_pex));
        let real = cand(6000, Source::Dht);
        for _ in 0..MAX_KNOWN {
            remember_found(&mut known, &real, now);
        }
        enqueue_found(&mut queued, real.clone());
        assert!(
            known.contains_key(&real.addr),
            "the address found later was dropped"
        );
        assert_eq!(queued.last(), Some(&real), "it is not dialled next");
        assert_eq!((known.len(), queued.len()), (MAX_KNOWN, MAX_KNOWN));
        // The one backed off furthest went; the one that answered stayed.
        assert!(!known.contains_key(&cand(MAX_KNOWN as u32 - 1, Source::Dht).addr));
        assert!(known.contains_key(&cand(7, Source::Dht).addr));
        for i in 0..(2 * MAX_KNOWN as u32) {
            remember_found(&mut known, &cand(10_000 + i, Source::Dht), now);
        }
        assert!(known.contains_key(&cand(7, Source::Dht).addr));
    }

    #[test]
    fn a_pex_answer_gives_only_addresses_plausible_from_the_answerer() {
        let (a, b) = (
            SecretKey::generate().public(),
            SecretKey::generate().public(),
        );
        let peers = [
            info(
                &a,
                &[
                    "198.51.100.1:4000",
                    "10.0.0.5:4000",
                    "127.0.0.1:53",
                    "[::ffff:198.51.100.2]:4000",
                ],
            ),
            info(
                &b,
                &[
                    "192.168.1.1:80",
                    "0.0.0.0:4000",
                    "224.0.0.251:5353",
                    "198.51.100.3:0",
                    "nope",
                ],
            ),
            pb::PeerInfo {
                id: vec![7u8; 31].into(),
                addrs: vec!["198.51.100.4:4000".into()],
            },
        ];
        // From a public answerer: public addresses only, with their ids.
        let got = pex_candidates("203.0.113.7:4000".parse().unwrap(), &peers);
        assert_eq!(addrs(&got), ["198.51.100.1:4000", "198.51.100.2:4000"]);
        assert!(
            got.iter()
                .all(|c| c.id == Some(a) && c.source == Source::Pex)
        );
        // From one on a private network: that network's addresses too.
        let got = pex_candidates("10.0.0.1:4000".parse().unwrap(), &peers);
        assert_eq!(
            addrs(&got),
            [
                "198.51.100.1:4000",
                "10.0.0.5:4000",
                "198.51.100.2:4000",
                "192.168.1.1:80"
            ]
        );
        // From this machine (tests, one host): loopback too.
        let got = pex_candidates("127.0.0.1:4000".parse().unwrap(), &peers);
        assert_eq!(got.len(), 5, "{:?}", addrs(&got));
    }

    #[test]
    fn a_pex_answer_is_bounded() {
        let many: Vec<String> = (0..100).map(|i| format!("198.51.100.{i}:4000")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let peers: Vec<pb::PeerInfo> = (0..100)
            .map(|_| info(&SecretKey::generate().public(), &many))
            .collect();
        let got = pex_candidates("203.0.113.7:4000".parse().unwrap(), &peers);
        assert_eq!(got.len(), limits::MAX_PEX_PEERS * limits::MAX_ADDRS);
    }
}
