//! The swarm scheduler: which chunk groups to ask which peer for, when to
//! give up on a peer, and the end-game.
//!
//! Like `quinn-proto`, this is a state machine with no I/O and no clock:
//! events come in through `handle_*` methods (time is an argument), and the
//! decisions come out of [`Scheduler::poll_action`]. The async download task
//! in the crate's `download` module executes the decisions over QUIC; the tests below
//! drive it with simulated peers.
//!
//! Policy:
//! - Data is scheduled in blocks of [`BLOCK_GROUPS`] chunk groups (128 KiB).
//!   A request is a run of contiguous blocks; only the groups still missing
//!   inside them are asked for.
//! - Rarest first: a peer is given the wanted, unrequested block it holds
//!   that the fewest known peers hold, ties broken pseudo-randomly (so that
//!   downloaders hold different blocks and can trade), and among equally
//!   rare blocks those no other downloader has said it is fetching
//!   ([`Scheduler::handle_fetching`]) first; in sequential mode
//!   (streaming to stdout) the lowest block first. The open blocks are
//!   kept bucketed by availability (the crate's `picker` module), so a
//!   pick and a pass cost what they look at, not the blob's size (a 1 TiB
//!   blob has 8 million blocks).
//! - Pipelining: each peer keeps up to `max_requests_per_peer` requests in
//!   flight, each sized to about `target_request_time` of its measured rate.
//! - A request that makes no progress within its deadline is a stall: the
//!   peer gets a strike, its blocks go back to the pool; too many strikes and
//!   the peer is dropped. An answer without groups the peer claimed is a
//!   strike too (one for all the requests that were in flight together: a
//!   seeder that finds its copy damaged answers them all without it). A
//!   corrupt group drops the peer at once. A request the peer choked (it gave the slot to another downloader) gives its
//!   blocks back, and the peer stays, with no strike.
//! - End-game: once every wanted block is requested, an idle peer is asked
//!   for the oldest outstanding block it holds (at most
//!   `endgame_duplicates` requests per block); when a block completes, the
//!   other requests that covered only completed blocks are cancelled.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Debug;
use std::time::{Duration, Instant};

use fixedbitset::FixedBitSet;
use shoal_proto::{GROUP_SIZE, GroupRanges};

use crate::picker::Picker;

/// Chunk groups per scheduling block (8 x 16 KiB = 128 KiB).
pub const BLOCK_GROUPS: u64 = 8;
// A peer's groups of a block it holds in part are one byte's bits.
const _: () = assert!(BLOCK_GROUPS <= 8);
const BLOCK_BYTES: f64 = (BLOCK_GROUPS * GROUP_SIZE) as f64;

/// Tuning knobs of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Fetch in order (for streaming) instead of rarest first.
    pub sequential: bool,
    /// Requests in flight per peer.
    pub max_requests_per_peer: usize,
    /// How long one request should take at the peer's measured rate.
    pub target_request_time: Duration,
    /// Upper bound on blocks in one request. Large (32 MiB by default), so
    /// that on a fast link `target_request_time` decides: each request
    /// costs both ends CPU (a stream, a new decoder and writer, a schedule
    /// pass, an extent split where the write lands), and capped at 8 MiB a
    /// 1 GiB get over loopback took ~4.5% more CPU per GiB than at 32 MiB.
    pub max_request_blocks: u64,
    /// Blocks in a peer's first request, before its rate is known.
    pub initial_request_blocks: u64,
    /// Shortest time without progress before a request counts as stalled.
    pub stall_timeout: Duration,
    /// Stalls (or false have claims) before a peer is dropped.
    pub max_strikes: u32,
    /// Requests at most per block during end-game.
    pub endgame_duplicates: usize,
    /// Seed of the tie-breaking among equally rare blocks.
    pub seed: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            sequential: false,
            max_requests_per_peer: 4,
            target_request_time: Duration::from_millis(250),
            max_request_blocks: 256,
            initial_request_blocks: 2,
            stall_timeout: Duration::from_secs(10),
            max_strikes: 3,
            endgame_duplicates: 2,
            seed: 0x5eed,
        }
    }
}

/// Identifies one request made by this scheduler.
pub type RequestId = u64;

/// A decision for the async layer to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<P> {
    /// Ask `peer` for these chunk groups.
    Request {
        /// Whom to ask.
        peer: P,
        /// Report the outcome with this id.
        id: RequestId,
        /// The groups to ask for (all held by the peer, none verified here).
        ranges: GroupRanges,
    },
    /// Stop a request (its groups arrived from elsewhere, or it stalled).
    Cancel {
        /// Who was asked.
        peer: P,
        /// Which request.
        id: RequestId,
    },
    /// Stop using this peer for this download.
    DropPeer {
        /// The peer.
        peer: P,
        /// Why.
        reason: DropReason,
    },
}

/// Why a peer was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// It sent a group that failed verification.
    Corrupt,
    /// It lied about what it has too often (claimed groups and did not
    /// send them).
    Unreliable,
    /// Its requests stalled too often: it may be gone (killed, its
    /// network down) and come back, so it may be added again.
    Stalled,
}

/// How a request ended badly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A group failed verification.
    Corrupt,
    /// The connection or stream failed; the peer may be gone.
    Error,
    /// The peer gave the request's answer slot to another of its
    /// downloaders (it choked us): the peer stays, with no strike.
    Busy,
}

#[derive(Debug)]
struct PeerState {
    /// Blocks the peer holds entirely.
    blocks: FixedBitSet,
    /// The groups it holds of blocks it holds in part (bit `i`: the
    /// block's group `i`), never empty nor whole. With `blocks`, all it
    /// says it holds, kept so that an announcement costs the blocks it
    /// touches: a list of runs would be merged whole at each one, and a
    /// peer fetching rarest first holds a run per request it made.
    partial: HashMap<u64, u8>,
    /// How many (the ones in `blocks`).
    held: u64,
    inflight: usize,
    /// Measured goodput in bytes per second (EWMA), once known.
    rate: Option<f64>,
    strikes: u32,
    /// When it last answered without groups it had claimed (a strike): the
    /// answers to requests sent before then have the same gap, and do not
    /// strike again.
    short_at: Option<Instant>,
    /// Bytes received from this peer (verified).
    received: u64,
}

#[derive(Debug)]
struct Request<P> {
    peer: P,
    blocks: Vec<u64>,
    ranges: GroupRanges,
    sent_at: Instant,
    last_progress: Instant,
    deadline: Duration,
}

/// Counters for reports and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Requests issued.
    pub requests: u64,
    /// Requests issued as end-game duplicates.
    pub endgame_requests: u64,
    /// Requests cancelled.
    pub cancels: u64,
    /// Requests that stalled.
    pub stalls: u64,
    /// Blocks looked at while picking fresh blocks (what picking costs).
    pub examined: u64,
}

/// The scheduler for one blob download.
#[derive(Debug)]
pub struct Scheduler<P> {
    cfg: SchedulerConfig,
    groups: u64,
    blocks: u64,
    have: FixedBitSet,
    /// Blocks another downloader has said it is fetching: picked after
    /// equally rare ones nobody is (a hint only; never cleared, as a block
    /// someone fetched is soon held by more peers anyway).
    fetching: FixedBitSet,
    have_count: u64,
    /// Missing groups per block.
    block_missing: Vec<u32>,
    /// Requests in flight per block.
    block_requests: Vec<u16>,
    /// The open blocks (wanted, no request in flight) by how many peers
    /// hold them, rarest first: kept as they change, as a pass over every
    /// block of a 1 TiB blob is 8 million steps.
    picker: Picker,
    /// No block below this one is wanted (sequential mode's start).
    first_wanted: u64,
    /// Where walks start in a bucket, advanced by every pick (seeded by
    /// the config).
    ties: u64,
    /// Peers holding at most this many blocks are scanned rather than
    /// walked ([`PICK_WALK`]; tests lower it to walk small blobs).
    scan_below: u64,
    /// Candidates a walk compares ([`SAMPLE`]; tests lower it).
    sample: usize,
    /// Steps a walk takes before it scans instead ([`PICK_WALK`]; tests
    /// lower it).
    walk_limit: usize,
    peers: BTreeMap<P, PeerState>,
    dropped: BTreeSet<P>,
    requests: BTreeMap<RequestId, Request<P>>,
    actions: VecDeque<Action<P>>,
    next_id: RequestId,
    stats: SchedulerStats,
}

/// Blocks of the rarest-first order [`Scheduler::pick_fresh`] walks before
/// it scans the peer's own blocks instead; also the most blocks a peer may
/// hold for a scan to be tried first.
const PICK_WALK: usize = 4096;

/// Candidates a walk of [`Scheduler::pick_fresh`] compares.
const SAMPLE: usize = 256;

/// Blocks skipped at once where a bitset says none of them matters.
const SKIP: u64 = 64;

/// The most blocks a peer is known to hold in part. Only whole blocks are
/// asked for, so claims on part of one cost nothing to make and are never
/// tested: without a bound, a peer announcing one group of every block
/// (2048 runs an update, as often as it likes) grew the map by a block
/// per run, ~30 bytes each, to hundreds of MB for a large blob. Past the
/// bound its claims on other parts are ignored (knowing less of a peer
/// than it has is safe); 16 Ki blocks are 2 GiB of partly held data.
const MAX_PARTIAL_BLOCKS: usize = 16 * 1024;

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser: a cheap, deterministic tie-breaker.
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl<P: Clone + Ord + Debug> Scheduler<P> {
    /// The blob's groups (its proven size).
    pub fn groups(&self) -> u64 {
        self.groups
    }

    /// A scheduler for a blob of `groups` chunk groups, of which `have` are
    /// already verified locally.
    ///
    /// A blob has at most `u32::MAX - 1` blocks (512 TiB; downloads stop at
    /// 1 TiB); `groups` is clamped to that.
    pub fn new(groups: u64, have: &GroupRanges, cfg: SchedulerConfig) -> Self {
        let groups = groups.clamp(1, (u64::from(u32::MAX) - 1) * BLOCK_GROUPS);
        let blocks = groups.div_ceil(BLOCK_GROUPS);
        let ties = cfg.seed;
        let mut s = Self {
            cfg,
            groups,
            blocks,
            have: FixedBitSet::with_capacity(groups as usize),
            fetching: FixedBitSet::with_capacity(blocks as usize),
            have_count: 0,
            block_missing: (0..blocks)
                .map(|b| Self::block_len(groups, b) as u32)
                .collect(),
            block_requests: vec![0; blocks as usize],
            picker: Picker::new(blocks as u32),
            first_wanted: 0,
            ties,
            scan_below: PICK_WALK as u64,
            sample: SAMPLE,
            walk_limit: PICK_WALK,
            peers: BTreeMap::new(),
            dropped: BTreeSet::new(),
            requests: BTreeMap::new(),
            actions: VecDeque::new(),
            next_id: 0,
            stats: SchedulerStats::default(),
        };
        s.mark_have(have);
        s
    }

    fn block_len(groups: u64, b: u64) -> u64 {
        (groups - b * BLOCK_GROUPS).min(BLOCK_GROUPS)
    }

    fn block_range(&self, b: u64) -> std::ops::Range<u64> {
        b * BLOCK_GROUPS..(b * BLOCK_GROUPS + Self::block_len(self.groups, b))
    }

    /// True once every group is verified.
    pub fn is_complete(&self) -> bool {
        self.have_count == self.groups
    }

    /// Groups verified so far.
    pub fn verified_groups(&self) -> u64 {
        self.have_count
    }

    /// Counters.
    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// Peers currently usable.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// True if `peer` was dropped from this download.
    pub fn is_dropped(&self, peer: &P) -> bool {
        self.dropped.contains(peer)
    }

    /// Bytes of verified data received from `peer`.
    pub fn received_from(&self, peer: &P) -> u64 {
        self.peers.get(peer).map_or(0, |p| p.received)
    }

    /// Requests in flight.
    pub fn requests_in_flight(&self) -> usize {
        self.requests.len()
    }

    /// The next decision, if any.
    pub fn poll_action(&mut self, now: Instant) -> Option<Action<P>> {
        if self.actions.is_empty() {
            self.schedule(now);
        }
        self.actions.pop_front()
    }

    /// When [`Self::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.requests
            .values()
            .map(|r| r.last_progress + r.deadline)
            .min()
    }

    /// A new candidate peer (its holdings follow through have events).
    /// A dropped peer stays dropped.
    pub fn handle_peer_added(&mut self, peer: P) {
        if self.dropped.contains(&peer) || self.peers.contains_key(&peer) {
            return;
        }
        self.peers.insert(
            peer,
            PeerState {
                blocks: FixedBitSet::with_capacity(self.blocks as usize),
                partial: HashMap::new(),
                held: 0,
                inflight: 0,
                rate: None,
                strikes: 0,
                short_at: None,
                received: 0,
            },
        );
    }

    /// `peer` holds the whole blob.
    pub fn handle_peer_complete(&mut self, peer: &P) {
        self.handle_have(peer, &GroupRanges::from_range(0..self.groups));
    }

    /// Another downloader is fetching `ranges` (from any peer). Until they
    /// arrive there, the others cannot know of them; among equally rare
    /// blocks, those are then picked last, so that two downloaders do not
    /// ask a seeder for the same block at once. In the simulated swarm of
    /// one seeder and eight downloaders with equal uploads, the seeder's
    /// duplicate uploads fell from 9.4% to 3.1% of the file.
    pub fn handle_fetching(&mut self, ranges: &GroupRanges) {
        for r in ranges.runs() {
            let end = r.end.min(self.groups).div_ceil(BLOCK_GROUPS);
            let start = (r.start / BLOCK_GROUPS).min(end);
            // Word by word: a peer may name the whole blob.
            self.fetching.insert_range(start as usize..end as usize);
        }
    }

    /// `peer` announced that it holds `ranges` (in addition to what it had).
    pub fn handle_have(&mut self, peer: &P, ranges: &GroupRanges) {
        let (groups, blocks) = (self.groups, self.blocks);
        let Some(state) = self.peers.get_mut(peer) else {
            return;
        };
        if state.held == blocks {
            return;
        }
        // Block by block along the runs, without collecting them (a
        // complete peer of a 1 TiB blob has 8 million blocks); stretches
        // it holds already are skipped [`SKIP`] blocks at a time, as a peer
        // may repeat an announcement as often as it likes.
        for r in ranges.runs() {
            let r = r.start..r.end.min(groups);
            if r.is_empty() {
                continue;
            }
            let end = r.end.div_ceil(BLOCK_GROUPS);
            let mut from = r.start / BLOCK_GROUPS;
            while from < end {
                let to = ((from / SKIP + 1) * SKIP).min(end);
                if !state
                    .blocks
                    .contains_all_in_range(from as usize..to as usize)
                {
                    for b in from..to {
                        if state.blocks.contains(b as usize) {
                            continue;
                        }
                        let full = Self::block_mask(groups, b, 0..groups);
                        let had = if state.partial.is_empty() {
                            0
                        } else {
                            state.partial.remove(&b).unwrap_or(0)
                        };
                        let have = had | Self::block_mask(groups, b, r.clone());
                        if have == full {
                            state.blocks.insert(b as usize);
                            state.held += 1;
                            self.picker.inc(b as u32);
                        } else if have != 0
                            && (had != 0 || state.partial.len() < MAX_PARTIAL_BLOCKS)
                        {
                            state.partial.insert(b, have);
                        }
                    }
                }
                from = to;
            }
        }
    }

    /// `peer` is gone (disconnected, or discovery withdrew it).
    pub fn handle_peer_removed(&mut self, peer: &P) {
        let Some(state) = self.peers.remove(peer) else {
            return;
        };
        for b in state.blocks.ones() {
            self.picker.dec(b as u32);
        }
        let ids: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| &r.peer == peer)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(r) = self.requests.remove(&id) {
                self.release_blocks(&r);
                self.actions.push_back(Action::Cancel { peer: r.peer, id });
                self.stats.cancels += 1;
            }
        }
    }

    /// Some bytes of request `id` arrived (resets its stall timer).
    pub fn handle_progress(&mut self, id: RequestId, now: Instant) {
        if let Some(r) = self.requests.get_mut(&id) {
            r.last_progress = now;
        }
    }

    /// Groups were verified locally; `source` is the request that brought
    /// them, if any. Requests that now cover only verified groups are
    /// cancelled (end-game duplicates).
    pub fn handle_verified(&mut self, groups: &GroupRanges, source: Option<RequestId>) {
        let completed = self.mark_have(groups);
        // Only a request that covers a block completed just now can have
        // become obsolete; most of the time none does (the source's own
        // blocks are released before this is called), and then the
        // requests are not searched.
        if completed
            .iter()
            .all(|b| self.block_requests[*b as usize] == 0)
        {
            return;
        }
        let obsolete: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(id, r)| {
                Some(**id) != source
                    && r.blocks
                        .iter()
                        .all(|b| self.block_missing[*b as usize] == 0)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in obsolete {
            if let Some(r) = self.requests.remove(&id) {
                self.release_blocks(&r);
                if let Some(p) = self.peers.get_mut(&r.peer) {
                    p.inflight -= 1;
                }
                self.actions.push_back(Action::Cancel { peer: r.peer, id });
                self.stats.cancels += 1;
            }
        }
    }

    /// Request `id` ended; `received` are the groups it verified.
    pub fn handle_request_done(&mut self, id: RequestId, received: &GroupRanges, now: Instant) {
        let Some(r) = self.requests.remove(&id) else {
            // Cancelled earlier; what it brought still counts.
            self.handle_verified(received, Some(id));
            return;
        };
        self.release_blocks(&r);
        let bytes = received.count() * GROUP_SIZE;
        let elapsed = now
            .saturating_duration_since(r.sent_at)
            .as_secs_f64()
            .max(1e-3);
        let missing = r
            .ranges
            .difference(received)
            .difference(&self.have_ranges_of(&r.ranges));
        let max_strikes = self.cfg.max_strikes;
        let mut drop = false;
        if let Some(p) = self.peers.get_mut(&r.peer) {
            p.inflight -= 1;
            p.received += bytes;
            if bytes > 0 {
                let sample = bytes as f64 / elapsed;
                p.rate = Some(p.rate.map_or(sample, |old| 0.7 * old + 0.3 * sample));
            }
            // It claimed groups it did not send: believe the stream. One
            // strike for the requests that were in flight when it last
            // fell short: a seeder that finds its copy damaged answers
            // every one of them without it, and was dropped as a liar
            // (three at once) where it had only stopped holding it.
            if !missing.is_empty() && p.short_at.is_none_or(|t| r.sent_at > t) {
                p.strikes += 1;
                p.short_at = Some(now);
                drop = p.strikes >= max_strikes;
            }
        }
        if !missing.is_empty() {
            self.forget_groups(&r.peer, &missing);
        }
        self.handle_verified(received, Some(id));
        if drop {
            self.drop_peer(&r.peer, DropReason::Unreliable);
        }
    }

    /// Request `id` failed. A corrupt group drops the peer; an error removes
    /// it (it can be added again when rediscovered).
    pub fn handle_request_failed(&mut self, id: RequestId, failure: Failure) {
        let Some(r) = self.requests.remove(&id) else {
            return;
        };
        self.release_blocks(&r);
        if let Some(p) = self.peers.get_mut(&r.peer) {
            p.inflight -= 1;
        }
        match failure {
            Failure::Corrupt => self.drop_peer(&r.peer, DropReason::Corrupt),
            Failure::Error => self.handle_peer_removed(&r.peer),
            Failure::Busy => {}
        }
    }

    /// Check for stalled requests.
    pub fn handle_timeout(&mut self, now: Instant) {
        let stalled: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| now >= r.last_progress + r.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in stalled {
            let Some(r) = self.requests.remove(&id) else {
                continue;
            };
            self.release_blocks(&r);
            self.stats.stalls += 1;
            self.stats.cancels += 1;
            self.actions.push_back(Action::Cancel {
                peer: r.peer.clone(),
                id,
            });
            let mut drop = false;
            if let Some(p) = self.peers.get_mut(&r.peer) {
                p.inflight -= 1;
                p.strikes += 1;
                // Assume it is slow: halve what we think it can do.
                p.rate = p.rate.map(|x| x / 2.0);
                drop = p.strikes >= self.cfg.max_strikes;
            }
            if drop {
                self.drop_peer(&r.peer, DropReason::Stalled);
            }
        }
    }

    fn have_ranges_of(&self, ranges: &GroupRanges) -> GroupRanges {
        GroupRanges::from_groups(ranges.iter().filter(|g| self.have.contains(*g as usize)))
    }

    /// Marks groups verified; returns blocks that became complete.
    fn mark_have(&mut self, groups: &GroupRanges) -> Vec<u64> {
        let mut completed = Vec::new();
        for g in groups.iter().take_while(|g| *g < self.groups) {
            if !self.have.put(g as usize) {
                self.have_count += 1;
                let b = g / BLOCK_GROUPS;
                self.block_missing[b as usize] -= 1;
                if self.block_missing[b as usize] == 0 {
                    completed.push(b);
                    self.picker.remove(b as u32);
                }
            }
        }
        completed
    }

    fn forget_groups(&mut self, peer: &P, groups: &GroupRanges) {
        let n = self.groups;
        let Some(state) = self.peers.get_mut(peer) else {
            return;
        };
        for r in groups.runs() {
            let r = r.start..r.end.min(n);
            if r.is_empty() {
                continue;
            }
            for b in (r.start / BLOCK_GROUPS)..r.end.div_ceil(BLOCK_GROUPS) {
                let gone = Self::block_mask(n, b, r.clone());
                let had = if state.blocks.contains(b as usize) {
                    state.blocks.set(b as usize, false);
                    state.held -= 1;
                    self.picker.dec(b as u32);
                    Self::block_mask(n, b, 0..n)
                } else {
                    state.partial.remove(&b).unwrap_or(0)
                };
                if had & !gone != 0 {
                    state.partial.insert(b, had & !gone);
                }
            }
        }
    }

    /// The groups of block `b` that lie in `range`, as a mask (bit `i`:
    /// the block's group `i`).
    fn block_mask(groups: u64, b: u64, range: std::ops::Range<u64>) -> u8 {
        let start = b * BLOCK_GROUPS;
        let lo = range.start.max(start);
        let hi = range.end.min(start + Self::block_len(groups, b));
        if lo >= hi {
            return 0;
        }
        let bits = ((1u16 << (hi - lo)) - 1) << (lo - start);
        bits as u8
    }

    fn drop_peer(&mut self, peer: &P, reason: DropReason) {
        if self.peers.contains_key(peer) {
            self.handle_peer_removed(peer);
            if reason != DropReason::Stalled {
                self.dropped.insert(peer.clone());
            }
            self.actions.push_back(Action::DropPeer {
                peer: peer.clone(),
                reason,
            });
        }
    }

    fn release_blocks(&mut self, r: &Request<P>) {
        for b in &r.blocks {
            self.block_requests[*b as usize] -= 1;
            if self.block_requests[*b as usize] == 0 && self.wanted(*b) {
                self.picker.insert(*b as u32);
            }
        }
    }

    /// A request for `b` goes out.
    fn claim_block(&mut self, b: u64) {
        self.picker.remove(b as u32);
        self.block_requests[b as usize] += 1;
    }

    fn is_open(&self, b: u64) -> bool {
        self.picker.contains(b as u32)
    }

    fn wanted(&self, b: u64) -> bool {
        self.block_missing[b as usize] > 0
    }

    fn request_blocks(&self, p: &PeerState) -> u64 {
        match p.rate {
            None => self.cfg.initial_request_blocks,
            Some(rate) => {
                let n = (rate * self.cfg.target_request_time.as_secs_f64() / BLOCK_BYTES) as u64;
                n.clamp(1, self.cfg.max_request_blocks)
            }
        }
    }

    fn deadline(&self, p: &PeerState, blocks: u64) -> Duration {
        let expected = p
            .rate
            .map_or(0.0, |r| blocks as f64 * BLOCK_BYTES / r.max(1.0));
        self.cfg
            .stall_timeout
            .max(Duration::from_secs_f64((3.0 * expected).min(600.0)))
    }

    /// The best new block for `p`: rarest first (or lowest in sequential
    /// mode), wanted, unrequested, held by `p`. Adds what it looked at to
    /// `examined`.
    ///
    /// Among equally rare blocks, each downloader prefers its own
    /// pseudo-random order (`mix(block ^ seed)`). In the simulated swarm of
    /// fifty downloaders this matters: with one seed set, the seeder sent
    /// 6.7 copies of the file, and 7.7 to 9.9 when every pick chose afresh.
    ///
    /// A peer that holds at most `scan_below` blocks has them all scanned.
    /// For one that holds more, the picker's buckets are walked from the
    /// rarest, starting where `tie` says, and the preferred one of the
    /// first `sample` blocks it holds, in the first bucket where it holds
    /// any, is taken: a complete peer costs `sample` steps, not one per
    /// block of the blob. (Forced to walk with 16 candidates, the same
    /// swarm had the seeder send 8.2 copies on average over eight seed
    /// sets, against 7.9 for the scan.) After [`PICK_WALK`] steps the walk
    /// gives up and scans.
    fn pick_fresh(&self, p: &PeerState, tie: u64, examined: &mut u64) -> Option<u64> {
        if p.held == 0 || self.picker.len() == 0 {
            return None;
        }
        if self.cfg.sequential {
            // Stretches where `p` holds nothing are skipped [`SKIP`] blocks
            // at a time.
            let mut from = self.first_wanted;
            while from < self.blocks {
                let to = ((from / SKIP + 1) * SKIP).min(self.blocks);
                *examined += 1;
                if p.blocks.contains_any_in_range(from as usize..to as usize) {
                    for b in from..to {
                        *examined += 1;
                        if p.blocks.contains(b as usize) && self.is_open(b) {
                            return Some(b);
                        }
                    }
                }
                from = to;
            }
            return None;
        }
        if p.held <= self.scan_below {
            return self.scan_fresh(p, examined);
        }
        let key = |b: u64| self.tie_key(b);
        let mut walked = 0;
        // Blocks no peer holds (bucket 0) cannot be `p`'s.
        for bucket in self.picker.buckets_from(1) {
            let (head, tail) = bucket.split_at((tie % bucket.len() as u64) as usize);
            let mut best: Option<(u64, (bool, u64))> = None;
            let mut found = 0;
            for &b in tail.iter().chain(head) {
                if walked == self.walk_limit {
                    break;
                }
                walked += 1;
                *examined += 1;
                let b = u64::from(b);
                if p.blocks.contains(b as usize) {
                    let k = key(b);
                    if best.is_none_or(|(_, best_k)| k < best_k) {
                        best = Some((b, k));
                    }
                    found += 1;
                    if found == self.sample {
                        break;
                    }
                }
            }
            if let Some((b, _)) = best {
                return Some(b);
            }
            if walked == self.walk_limit {
                return self.scan_fresh(p, examined);
            }
        }
        None
    }

    /// How equally rare blocks are ordered: those no other downloader is
    /// fetching first, then this downloader's own pseudo-random order.
    fn tie_key(&self, b: u64) -> (bool, u64) {
        (self.fetching.contains(b as usize), mix(b ^ self.cfg.seed))
    }

    /// [`Self::pick_fresh`] by a pass over the blocks `p` holds.
    fn scan_fresh(&self, p: &PeerState, examined: &mut u64) -> Option<u64> {
        let mut best: Option<(u64, u32, (bool, u64))> = None;
        for b in p.blocks.ones() {
            *examined += 1;
            let b = b as u64;
            if !self.is_open(b) {
                continue;
            }
            let key = (self.picker.avail(b as u32), self.tie_key(b));
            if best.is_none_or(|(_, a, t)| key < (a, t)) {
                best = Some((b, key.0, key.1));
            }
        }
        best.map(|(b, _, _)| b)
    }

    /// End-game: an outstanding block `p` holds and is not already fetching,
    /// with the fewest requests, oldest first.
    fn pick_endgame(&self, peer: &P, p: &PeerState) -> Option<u64> {
        // Only an idle peer is asked (the caller checks), so no candidate
        // can be one it is fetching already.
        debug_assert_eq!(p.inflight, 0);
        let mut best: Option<(u64, u16, Instant)> = None;
        for r in self.requests.values() {
            if &r.peer == peer {
                continue;
            }
            for &b in &r.blocks {
                let n = self.block_requests[b as usize];
                if !self.wanted(b)
                    || n as usize >= self.cfg.endgame_duplicates
                    || !p.blocks.contains(b as usize)
                {
                    continue;
                }
                if best.is_none_or(|(_, bn, at)| (n, r.sent_at) < (bn, at)) {
                    best = Some((b, n, r.sent_at));
                }
            }
        }
        best.map(|(b, _, _)| b)
    }

    /// Check that the incrementally kept state agrees with what it caches
    /// (tests): the picker holds exactly the open blocks, each with the
    /// number of peers that hold it; request counts match the requests.
    #[cfg(test)]
    fn check(&self) {
        let mut requested = vec![0u16; self.blocks as usize];
        for r in self.requests.values() {
            for &b in &r.blocks {
                requested[b as usize] += 1;
            }
        }
        for b in 0..self.blocks {
            let holders = self
                .peers
                .values()
                .filter(|p| p.blocks.contains(b as usize))
                .count() as u32;
            assert_eq!(self.picker.avail(b as u32), holders, "holders of {b}");
            assert_eq!(self.block_requests[b as usize], requested[b as usize]);
            assert_eq!(
                self.picker.contains(b as u32),
                self.wanted(b) && requested[b as usize] == 0,
                "block {b} open"
            );
            if b < self.first_wanted {
                assert!(!self.wanted(b));
            }
        }
        for p in self.peers.values() {
            assert_eq!(p.held, p.blocks.count_ones(..) as u64);
            for (b, m) in &p.partial {
                assert!(*m != 0 && *m != Self::block_mask(self.groups, *b, 0..self.groups));
                assert!(
                    !p.blocks.contains(*b as usize),
                    "block {b} whole and in part"
                );
            }
        }
        self.picker.check();
    }

    /// Walk the picker for every peer, comparing `sample` candidates
    /// (tests: small blobs would otherwise always be scanned).
    #[cfg(test)]
    fn walk_always(&mut self, sample: usize, limit: usize) {
        self.scan_below = 0;
        self.sample = sample;
        self.walk_limit = limit;
    }

    fn all_wanted_requested(&self) -> bool {
        self.picker.len() == 0
    }

    fn schedule(&mut self, now: Instant) {
        if self.is_complete() {
            return;
        }
        while self.first_wanted < self.blocks && !self.wanted(self.first_wanted) {
            self.first_wanted += 1;
        }
        // No request may take more than a fair share of what is left, so
        // that every peer keeps getting work until the end.
        let fair = (self.picker.len() as u64 / (2 * self.peers.len().max(1) as u64)).max(1);
        // Fastest peers first, so that they get the rarest blocks.
        let mut order: Vec<(P, f64)> = self
            .peers
            .iter()
            .map(|(k, p)| (k.clone(), p.rate.unwrap_or(0.0)))
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (peer, _) in order {
            while let Some(p) = self.peers.get(&peer) {
                if p.inflight >= self.cfg.max_requests_per_peer {
                    break;
                }
                let mut examined = 0;
                self.ties = mix(self.ties);
                let fresh = self.pick_fresh(p, self.ties, &mut examined);
                self.stats.examined += examined;
                let (blocks, endgame) = if let Some(first) = fresh {
                    let want = self.request_blocks(p).min(fair);
                    let mut blocks = vec![first];
                    let mut next = first + 1;
                    while (blocks.len() as u64) < want
                        && next < self.blocks
                        && p.blocks.contains(next as usize)
                        && self.wanted(next)
                        && self.block_requests[next as usize] == 0
                    {
                        blocks.push(next);
                        next += 1;
                    }
                    (blocks, false)
                } else if p.inflight == 0 && self.all_wanted_requested() {
                    match self.pick_endgame(&peer, p) {
                        Some(b) => (vec![b], true),
                        None => break,
                    }
                } else {
                    break;
                };
                let mut ranges = GroupRanges::new();
                for &b in &blocks {
                    for g in self.block_range(b) {
                        if !self.have.contains(g as usize) {
                            ranges.insert(g..g + 1);
                        }
                    }
                }
                let deadline = self.deadline(p, blocks.len() as u64);
                for &b in &blocks {
                    self.claim_block(b);
                }
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.inflight += 1;
                }
                let id = self.next_id;
                self.next_id += 1;
                self.stats.requests += 1;
                if endgame {
                    self.stats.endgame_requests += 1;
                }
                self.requests.insert(
                    id,
                    Request {
                        peer: peer.clone(),
                        blocks,
                        ranges: ranges.clone(),
                        sent_at: now,
                        last_progress: now,
                        deadline,
                    },
                );
                self.actions.push_back(Action::Request {
                    peer: peer.clone(),
                    id,
                    ranges,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn t0() -> Instant {
        Instant::now()
    }

    fn drain<P: Clone + Ord + Debug>(s: &mut Scheduler<P>, now: Instant) -> Vec<Action<P>> {
        std::iter::from_fn(|| s.poll_action(now)).collect()
    }

    /// The groups of each request `s` makes now (other actions dropped).
    fn requested<P: Clone + Ord + Debug>(s: &mut Scheduler<P>, now: Instant) -> Vec<GroupRanges> {
        drain(s, now)
            .into_iter()
            .filter_map(|a| match a {
                Action::Request { ranges, .. } => Some(ranges),
                _ => None,
            })
            .collect()
    }

    /// A peer claiming one group of every block, update after update, is
    /// known to hold at most [`MAX_PARTIAL_BLOCKS`] blocks in part; what
    /// it then completes of those is still counted, whole.
    #[test]
    fn claims_on_parts_of_blocks_are_bounded() {
        let blocks = 4 * MAX_PARTIAL_BLOCKS as u64;
        let mut s = Scheduler::new(
            blocks * BLOCK_GROUPS,
            &GroupRanges::new(),
            SchedulerConfig::default(),
        );
        s.handle_peer_added(1u32);
        for update in 0..(blocks / 2048) {
            let first = update * 2048;
            let claim = GroupRanges::from_groups((first..first + 2048).map(|b| b * BLOCK_GROUPS));
            s.handle_have(&1, &claim);
        }
        assert_eq!(s.peers[&1].partial.len(), MAX_PARTIAL_BLOCKS);
        // The rest of block 0 (held in part): now whole.
        s.handle_have(&1, &GroupRanges::from_range(1..BLOCK_GROUPS));
        assert!(s.peers[&1].blocks.contains(0));
        assert_eq!(s.peers[&1].partial.len(), MAX_PARTIAL_BLOCKS - 1);
        // A whole block past the bound is still counted.
        let b = blocks - 1;
        s.handle_have(
            &1,
            &GroupRanges::from_range(b * BLOCK_GROUPS..(b + 1) * BLOCK_GROUPS),
        );
        assert!(s.peers[&1].blocks.contains(b as usize));
        s.check();
    }

    #[test]
    fn asks_only_what_a_peer_has_and_rarest_first() {
        let now = t0();
        // 64 blocks. Peer 1 holds all, peer 2 the first half.
        let mut s = Scheduler::new(
            64 * BLOCK_GROUPS,
            &GroupRanges::new(),
            SchedulerConfig::default(),
        );
        s.handle_peer_added(1u32);
        s.handle_peer_added(2u32);
        s.handle_peer_complete(&1);
        s.handle_have(&2, &GroupRanges::from_range(0..32 * BLOCK_GROUPS));
        let actions = drain(&mut s, now);
        assert!(!actions.is_empty());
        for a in actions {
            let Action::Request { peer, ranges, .. } = a else {
                panic!("unexpected {a:?}")
            };
            if peer == 2 {
                assert!(
                    ranges.iter().all(|g| g < 32 * BLOCK_GROUPS),
                    "peer 2 asked for a group it lacks"
                );
            } else {
                // The rare second half goes to the only peer that has it.
                assert!(
                    ranges.iter().all(|g| g >= 32 * BLOCK_GROUPS),
                    "peer 1 was given a common block first"
                );
            }
        }
    }

    #[test]
    fn blocks_others_fetch_are_asked_for_after_equally_rare_ones() {
        let now = t0();
        // 16 blocks, one peer holding all: every block equally rare. Other
        // downloaders are fetching all but blocks 5 and 11.
        let mut s = Scheduler::new(
            16 * BLOCK_GROUPS,
            &GroupRanges::new(),
            SchedulerConfig {
                max_requests_per_peer: 2,
                initial_request_blocks: 1,
                ..Default::default()
            },
        );
        s.handle_peer_added(1u32);
        s.handle_peer_complete(&1);
        let mut others = GroupRanges::from_range(0..16 * BLOCK_GROUPS);
        for b in [5, 11] {
            others = others.difference(&GroupRanges::from_range(
                b * BLOCK_GROUPS..(b + 1) * BLOCK_GROUPS,
            ));
        }
        s.handle_fetching(&others);
        let asked = requested(&mut s, now)
            .iter()
            .fold(GroupRanges::new(), |a, r| a.union(r));
        let expect = GroupRanges::from_range(5 * BLOCK_GROUPS..6 * BLOCK_GROUPS).union(
            &GroupRanges::from_range(11 * BLOCK_GROUPS..12 * BLOCK_GROUPS),
        );
        assert_eq!(asked, expect);
    }

    #[test]
    fn resumes_without_asking_for_verified_groups() {
        let now = t0();
        let have = GroupRanges::from_range(0..100);
        let mut s = Scheduler::new(
            200,
            &have,
            SchedulerConfig {
                max_request_blocks: 1000,
                ..Default::default()
            },
        );
        s.handle_peer_added(1u8);
        s.handle_peer_complete(&1);
        let mut asked = GroupRanges::new();
        while let Some(a) = s.poll_action(now) {
            let Action::Request { id, ranges, .. } = a else {
                panic!("unexpected {a:?}")
            };
            assert!(asked.intersection(&ranges).is_empty(), "asked twice");
            asked = asked.union(&ranges);
            s.handle_request_done(id, &ranges, now + Duration::from_millis(5));
        }
        assert!(s.is_complete());
        assert!(asked.intersection(&have).is_empty());
        assert_eq!(asked.count(), 100);
    }

    #[test]
    fn a_corrupt_peer_is_dropped_and_its_blocks_go_to_others() {
        let now = t0();
        let mut s = Scheduler::new(
            4 * BLOCK_GROUPS,
            &GroupRanges::new(),
            SchedulerConfig::default(),
        );
        s.handle_peer_added("liar");
        s.handle_peer_complete(&"liar");
        let acts = drain(&mut s, now);
        let ids: Vec<RequestId> = acts
            .iter()
            .filter_map(|a| {
                if let Action::Request { id, .. } = a {
                    Some(*id)
                } else {
                    None
                }
            })
            .collect();
        assert!(!ids.is_empty());
        s.handle_request_failed(ids[0], Failure::Corrupt);
        let acts = drain(&mut s, now);
        assert!(acts.contains(&Action::DropPeer {
            peer: "liar",
            reason: DropReason::Corrupt
        }));
        assert!(s.is_dropped(&"liar"));
        // Adding it again does nothing; an honest peer gets everything.
        s.handle_peer_added("liar");
        s.handle_peer_added("honest");
        s.handle_peer_complete(&"honest");
        let mut asked = GroupRanges::new();
        for a in drain(&mut s, now) {
            match a {
                Action::Request { peer, ranges, .. } => {
                    assert_eq!(peer, "honest");
                    asked = asked.union(&ranges);
                }
                Action::Cancel { peer, .. } => assert_eq!(peer, "liar"),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(asked.count(), 4 * BLOCK_GROUPS);
    }

    #[test]
    fn a_stalled_request_is_reassigned() {
        let now = t0();
        // No end-game duplicates here, to see the stall handling alone.
        let cfg = SchedulerConfig {
            max_strikes: 1,
            endgame_duplicates: 1,
            ..Default::default()
        };
        let mut s = Scheduler::new(2 * BLOCK_GROUPS, &GroupRanges::new(), cfg);
        s.handle_peer_added(1u8);
        s.handle_peer_complete(&1);
        let first = drain(&mut s, now);
        assert!(
            !first.is_empty()
                && first
                    .iter()
                    .all(|a| matches!(a, Action::Request { peer: 1, .. }))
        );
        s.handle_peer_added(2u8);
        s.handle_peer_complete(&2);
        assert!(
            drain(&mut s, now).is_empty(),
            "peer 2 got work although all blocks are requested and 1 is busy"
        );
        let deadline = s.poll_timeout().unwrap();
        s.handle_timeout(deadline);
        let acts = drain(&mut s, deadline);
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::DropPeer { peer: 1, .. }))
        );
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::Request { peer: 2, .. }))
        );
        assert_eq!(s.stats().stalls, 1);
    }

    /// Requests in flight together that come back without what was
    /// claimed cost one strike; a peer that claims again and falls short
    /// again, round after round, is dropped.
    #[test]
    fn answers_short_at_once_strike_once() {
        let now = t0();
        let all = GroupRanges::from_range(0..64 * BLOCK_GROUPS);
        let mut s = Scheduler::new(all.count(), &GroupRanges::new(), SchedulerConfig::default());
        s.handle_peer_added(1u8);
        let max = SchedulerConfig::default().max_strikes;
        let mut dropped_at = None;
        for round in 1..=max + 1 {
            let at = now + Duration::from_secs(u64::from(round));
            // It claims everything again, and falls short on every
            // request in flight.
            s.handle_have(&1, &all);
            let acts = drain(&mut s, at);
            if acts
                .iter()
                .any(|a| matches!(a, Action::DropPeer { peer: 1, .. }))
            {
                dropped_at = Some(round - 1);
                break;
            }
            let ids: Vec<RequestId> = acts
                .iter()
                .filter_map(|a| match a {
                    Action::Request { id, .. } => Some(*id),
                    _ => None,
                })
                .collect();
            assert!(ids.len() >= 2, "round {round}: {acts:?}");
            for id in ids {
                s.handle_request_done(id, &GroupRanges::new(), at + Duration::from_millis(10));
            }
        }
        assert_eq!(dropped_at, Some(max), "dropped after that many rounds");
    }

    #[test]
    fn a_peer_that_claims_groups_it_does_not_send_loses_them() {
        let now = t0();
        let mut s = Scheduler::new(
            BLOCK_GROUPS,
            &GroupRanges::new(),
            SchedulerConfig::default(),
        );
        s.handle_peer_added(1u8);
        s.handle_peer_complete(&1);
        let Some(Action::Request { id, .. }) = s.poll_action(now) else {
            panic!()
        };
        s.handle_request_done(id, &GroupRanges::from_range(0..2), now);
        // It is not asked again for what it failed to send.
        assert!(drain(&mut s, now).is_empty());
        assert_eq!(s.verified_groups(), 2);
    }

    #[test]
    fn a_block_announced_in_pieces_is_asked_for_once_all_of_it_is_there() {
        let now = t0();
        // Blocks 0 and 1 of 8 groups, block 2 of 4 (the blob's short end).
        let groups = 2 * BLOCK_GROUPS + 4;
        let mut s = Scheduler::new(groups, &GroupRanges::new(), SchedulerConfig::default());
        s.handle_peer_added(1u8);
        let asked = |s: &mut Scheduler<u8>| {
            requested(s, now)
                .iter()
                .fold(GroupRanges::new(), |all, r| all.union(r))
        };
        s.handle_have(&1, &GroupRanges::from_range(0..3));
        s.handle_have(&1, &GroupRanges::from_range(17..19));
        assert!(asked(&mut s).is_empty(), "no block is whole yet");
        s.handle_have(&1, &GroupRanges::from_range(3..8));
        s.handle_have(&1, &GroupRanges::from_range(16..17));
        s.handle_have(&1, &GroupRanges::from_range(19..100));
        s.check();
        assert_eq!(
            asked(&mut s),
            GroupRanges::from_range(0..8).union(&GroupRanges::from_range(16..20))
        );
    }

    #[test]
    fn groups_a_peer_did_not_send_are_forgotten_until_announced_again() {
        let now = t0();
        let mut s = Scheduler::new(
            2 * BLOCK_GROUPS,
            &GroupRanges::new(),
            SchedulerConfig::default(),
        );
        s.handle_peer_added(1u8);
        s.handle_peer_complete(&1);
        let mut ids = Vec::new();
        for a in drain(&mut s, now) {
            if let Action::Request { id, .. } = a {
                ids.push(id);
            }
        }
        // It sends groups 0..5 and 8..16 only: 5, 6 and 7 are forgotten.
        for id in ids {
            let got = GroupRanges::from_range(0..5).union(&GroupRanges::from_range(8..16));
            s.handle_request_done(id, &got, now);
        }
        s.check();
        assert_eq!(
            requested(&mut s, now),
            vec![],
            "asked again for what it lacks"
        );
        s.handle_have(&1, &GroupRanges::from_range(5..7));
        assert_eq!(requested(&mut s, now), vec![], "group 7 is still missing");
        s.handle_have(&1, &GroupRanges::from_range(7..8));
        assert_eq!(requested(&mut s, now), vec![GroupRanges::from_range(5..8)]);
    }

    /// A simulated swarm: every node uploads at its own rate, shared equally
    /// between the requests it is serving; each downloader runs its own
    /// scheduler; a verified request is announced to everyone at once.
    struct Sim {
        rates: Vec<f64>,
        holdings: Vec<GroupRanges>,
        scheds: Vec<Option<Scheduler<usize>>>,
        /// (downloader, request id, server, ranges, bytes left)
        inflight: Vec<(usize, RequestId, usize, GroupRanges, f64)>,
        uploaded: Vec<f64>,
        violations: usize,
        cancels: usize,
        /// Whether downloaders tell each other what they fetch.
        tell_fetching: bool,
    }

    impl Sim {
        fn new(
            groups: u64,
            rates: Vec<f64>,
            seeders: usize,
            cfg: impl Fn(usize) -> SchedulerConfig,
        ) -> Sim {
            let n = rates.len();
            let mut holdings = vec![GroupRanges::new(); n];
            let mut scheds = Vec::new();
            for (i, h) in holdings.iter_mut().enumerate() {
                if i < seeders {
                    *h = GroupRanges::from_range(0..groups);
                    scheds.push(None);
                } else {
                    let mut s = Scheduler::new(groups, &GroupRanges::new(), cfg(i));
                    for j in 0..n {
                        if j != i {
                            s.handle_peer_added(j);
                            if j < seeders {
                                s.handle_peer_complete(&j);
                            }
                        }
                    }
                    scheds.push(Some(s));
                }
            }
            Sim {
                rates,
                holdings,
                scheds,
                inflight: Vec::new(),
                uploaded: vec![0.0; n],
                violations: 0,
                cancels: 0,
                tell_fetching: true,
            }
        }

        fn pump(&mut self, i: usize, now: Instant) {
            let Some(s) = self.scheds[i].as_mut() else {
                return;
            };
            // Each request is told to the other downloaders, as the have
            // updates of the real ones do.
            let mut fetching = Vec::new();
            while let Some(a) = s.poll_action(now) {
                match a {
                    Action::Request { peer, id, ranges } => {
                        if !ranges.difference(&self.holdings[peer]).is_empty() {
                            self.violations += 1;
                        }
                        if self.tell_fetching {
                            fetching.push(ranges.clone());
                        }
                        let bytes = (ranges.count() * GROUP_SIZE) as f64;
                        self.inflight.push((i, id, peer, ranges, bytes));
                    }
                    Action::Cancel { id, .. } => {
                        self.cancels += 1;
                        self.inflight.retain(|r| !(r.0 == i && r.1 == id));
                    }
                    Action::DropPeer { .. } => {}
                }
            }
            for r in fetching {
                for (j, t) in self.scheds.iter_mut().enumerate() {
                    if let Some(t) = t.as_mut()
                        && j != i
                    {
                        t.handle_fetching(&r);
                    }
                }
            }
        }

        /// Runs until every downloader completes; returns the time taken.
        fn run(&mut self, step: Duration, limit: Duration) -> Duration {
            let start = t0();
            let mut now = start;
            let n = self.rates.len();
            for i in 0..n {
                self.pump(i, now);
            }
            while self.scheds.iter().flatten().any(|s| !s.is_complete()) {
                assert!(now - start < limit, "swarm did not finish within {limit:?}");
                now += step;
                // Upload capacity of each server, shared by its requests.
                let mut per_server: HashMap<usize, usize> = HashMap::new();
                for r in &self.inflight {
                    *per_server.entry(r.2).or_default() += 1;
                }
                let mut done = Vec::new();
                for (k, r) in self.inflight.iter_mut().enumerate() {
                    let share = self.rates[r.2] * step.as_secs_f64() / per_server[&r.2] as f64;
                    let sent = share.min(r.4);
                    r.4 -= sent;
                    self.uploaded[r.2] += sent;
                    if r.4 <= 0.0 {
                        done.push(k);
                    }
                }
                for k in done.into_iter().rev() {
                    let (i, id, _server, ranges, _) = self.inflight.remove(k);
                    self.holdings[i] = self.holdings[i].union(&ranges);
                    if let Some(s) = self.scheds[i].as_mut() {
                        s.handle_request_done(id, &ranges, now);
                    }
                    for j in 0..n {
                        if j != i
                            && let Some(s) = self.scheds[j].as_mut()
                        {
                            s.handle_have(&i, &ranges);
                        }
                    }
                }
                for i in 0..n {
                    if let Some(s) = self.scheds[i].as_mut() {
                        s.handle_timeout(now);
                    }
                    self.pump(i, now);
                }
            }
            now - start
        }
    }

    /// The shape of bench S3 (one seeder and eight downloaders, every
    /// upload the same): the seeder's upload is the bound, so what it
    /// sends twice is what the swarm loses. Returns the seeder's copies
    /// and the time over the bound (one copy at the seeder's rate; eight
    /// copies over the upload of all nine peers is less).
    fn seeder_bound_swarm(tell_fetching: bool) -> (f64, f64) {
        let groups = 8192; // 128 MiB
        let mut rates = vec![6e6];
        rates.extend((0..8).map(|_| 6e6));
        let mut sim = Sim::new(groups, rates, 1, |i| SchedulerConfig {
            seed: i as u64,
            ..Default::default()
        });
        sim.tell_fetching = tell_fetching;
        let took = sim.run(Duration::from_millis(10), Duration::from_secs(3600));
        assert_eq!(sim.violations, 0);
        for h in &sim.holdings {
            assert_eq!(h.count(), groups);
        }
        let file = (groups * GROUP_SIZE) as f64;
        (sim.uploaded[0] / file, took.as_secs_f64() / (file / 6e6))
    }

    /// Told what the others fetch, the downloaders ask the seeder for
    /// different blocks: when this was written, 1.031 copies and 1.037 of
    /// the bound, against 1.094 and 1.095 untold.
    #[test]
    fn a_seeder_bound_swarm_gets_most_blocks_from_the_seeder_once() {
        let (copies, ratio) = seeder_bound_swarm(true);
        let (untold_copies, untold_ratio) = seeder_bound_swarm(false);
        assert!(copies < 1.06, "the seeder sent {copies:.3} copies");
        assert!(ratio < 1.08, "took {ratio:.3} of the bound");
        assert!(
            copies < untold_copies && ratio < untold_ratio,
            "told {copies:.3} copies, {ratio:.3} of the bound; untold {untold_copies:.3}, {untold_ratio:.3}"
        );
    }

    #[test]
    fn fifty_downloaders_with_different_rates_all_finish() {
        fifty_downloaders(None);
    }

    /// The same swarm with every pick made by walking the picker (the way
    /// of peers that hold more than [`PICK_WALK`] blocks of larger blobs).
    #[test]
    fn fifty_downloaders_walking_the_picker_all_finish() {
        fifty_downloaders(Some(16));
    }

    fn fifty_downloaders(walk_sample: Option<usize>) {
        // 16 MiB file, one seeder at 10 MB/s, 50 downloaders at 1..5 MB/s.
        let groups = 1024;
        let mut rates = vec![10e6];
        rates.extend((0..50).map(|i| 1e6 + (i % 5) as f64 * 1e6));
        let mut sim = Sim::new(groups, rates, 1, |i| SchedulerConfig {
            seed: i as u64,
            ..Default::default()
        });
        if let Some(sample) = walk_sample {
            for s in sim.scheds.iter_mut().flatten() {
                s.walk_always(sample, PICK_WALK);
            }
        }
        let took = sim.run(Duration::from_millis(20), Duration::from_secs(3600));
        assert_eq!(
            sim.violations, 0,
            "a group was asked of a peer that lacked it"
        );
        for h in &sim.holdings {
            assert_eq!(h.count(), groups);
        }
        // Downloaders carried most of the load: the seeder sent far less
        // than 50 copies.
        let file = (groups * GROUP_SIZE) as f64;
        assert!(
            sim.uploaded[0] < 10.0 * file,
            "seeder uploaded {:.1} copies",
            sim.uploaded[0] / file
        );
        // The fluid lower bound: 50 copies over total upload capacity.
        let total_up: f64 = sim.rates.iter().sum();
        let bound = (50.0 * file / total_up).max(file / 10e6);
        assert!(
            took.as_secs_f64() < 4.0 * bound,
            "took {took:?}, bound {bound:.1}s"
        );
    }

    /// Picking costs the blocks it looks at, not a pass over the blob:
    /// 64 GiB (524,288 blocks) from two complete peers, requests completed
    /// out of order, some failed and handed back. Before the picker, every
    /// pick scanned all the blocks a peer held (and every pass counted all
    /// the blob's blocks): over 500,000 steps a pick here.
    #[test]
    fn picking_on_a_large_blob_looks_at_few_blocks() {
        let now = t0();
        let groups = (64u64 << 30) / GROUP_SIZE;
        let mut s = Scheduler::new(groups, &GroupRanges::new(), SchedulerConfig::default());
        for peer in [1u8, 2] {
            s.handle_peer_added(peer);
            s.handle_peer_complete(&peer);
        }
        let mut inflight: Vec<(RequestId, GroupRanges)> = Vec::new();
        let mut asked = GroupRanges::new();
        for round in 0..300u64 {
            for a in drain(&mut s, now) {
                match a {
                    Action::Request { id, ranges, .. } => {
                        assert!(
                            ranges.intersection(&asked).is_empty(),
                            "a block was asked twice while its first request ran"
                        );
                        asked = asked.union(&ranges);
                        inflight.push((id, ranges));
                    }
                    Action::Cancel { id, .. } => {
                        if let Some(i) = inflight.iter().position(|r| r.0 == id) {
                            asked = asked.difference(&inflight.remove(i).1);
                        }
                    }
                    Action::DropPeer { .. } => {}
                }
            }
            // Complete one from the middle; every seventh fails instead (the
            // peer is removed, its requests cancelled, and it comes back).
            let (id, ranges) = inflight.remove(inflight.len() / 2);
            if round % 7 == 0 {
                s.handle_request_failed(id, Failure::Error);
                asked = asked.difference(&ranges);
                for peer in [1u8, 2] {
                    s.handle_peer_added(peer);
                    s.handle_peer_complete(&peer);
                }
            } else {
                s.handle_request_done(id, &ranges, now);
            }
        }
        let st = s.stats();
        assert!(st.requests >= 300, "{st:?}");
        assert!(
            st.examined <= (SAMPLE as u64 + 64) * st.requests,
            "{} blocks looked at for {} requests",
            st.examined,
            st.requests
        );
        assert!(s.verified_groups() > 0);
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Add(u8),
        Have(u8, u64, u64),
        Complete(u8),
        Remove(u8),
        Poll,
        /// Finish the nth request in flight, with this share of its
        /// groups received (in eighths).
        Done(usize, u8),
        Fail(usize, bool),
        Verified(u64, u64),
        Timeout(u64),
    }

    fn ev(groups: u64) -> impl Strategy<Value = Ev> {
        prop_oneof![
            (0u8..4).prop_map(Ev::Add),
            // Ranges may run past the blob's end, as a peer's may.
            (0u8..4, 0..groups + 20, 1..groups + 20).prop_map(|(p, a, n)| Ev::Have(p, a, n)),
            (0u8..4).prop_map(Ev::Complete),
            (0u8..4).prop_map(Ev::Remove),
            Just(Ev::Poll),
            Just(Ev::Poll),
            (0usize..8, 0u8..=8).prop_map(|(i, k)| Ev::Done(i, k)),
            (0usize..8, any::<bool>()).prop_map(|(i, c)| Ev::Fail(i, c)),
            (0..groups, 1..groups).prop_map(|(a, n)| Ev::Verified(a, n)),
            (0u64..120).prop_map(Ev::Timeout),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
        /// Whatever happens, in any order, the state the scheduler keeps
        /// as it goes (the picker, request counts, held counts) agrees with
        /// what it stands for, and no peer is asked for what it lacks.
        #[test]
        fn bookkeeping_survives_any_events(
            (groups, evs) in (2u64..200).prop_flat_map(|g| (Just(g), prop::collection::vec(ev(g), 0..120))),
            sequential in any::<bool>(),
            walk in any::<bool>(),
        ) {
            let start = t0();
            let mut s = Scheduler::new(groups, &GroupRanges::from_range(0..groups / 3), SchedulerConfig {
                sequential,
                max_request_blocks: 4,
                ..Default::default()
            });
            if walk {
                s.walk_always(3, 4);
            }
            // What each peer has announced and not been found to lack.
            let mut holds: HashMap<u8, GroupRanges> = HashMap::new();
            let mut inflight: Vec<(RequestId, u8, GroupRanges)> = Vec::new();
            for e in evs {
                let now = start + Duration::from_secs(match e { Ev::Timeout(t) => t, _ => 0 });
                match e {
                    Ev::Add(p) => s.handle_peer_added(p),
                    Ev::Have(p, a, n) => {
                        if s.peers.contains_key(&p) {
                            holds.entry(p).or_default().insert(a.min(groups)..(a + n).min(groups));
                        }
                        s.handle_have(&p, &GroupRanges::from_range(a..a + n));
                    }
                    Ev::Complete(p) => {
                        if s.peers.contains_key(&p) {
                            holds.insert(p, GroupRanges::from_range(0..groups));
                        }
                        s.handle_peer_complete(&p);
                    }
                    Ev::Remove(p) => {
                        holds.remove(&p);
                        s.handle_peer_removed(&p);
                    }
                    Ev::Poll | Ev::Timeout(_) => {
                        if matches!(e, Ev::Timeout(_)) {
                            s.handle_timeout(now);
                        }
                        for a in drain(&mut s, now) {
                            match a {
                                Action::Request { peer, id, ranges } => {
                                    let h = holds.get(&peer).cloned().unwrap_or_default();
                                    prop_assert!(ranges.difference(&h).is_empty(), "{peer} lacks {ranges:?}");
                                    inflight.push((id, peer, ranges));
                                }
                                Action::Cancel { id, .. } => inflight.retain(|r| r.0 != id),
                                Action::DropPeer { peer, .. } => { holds.remove(&peer); }
                            }
                        }
                    }
                    Ev::Done(i, k) if !inflight.is_empty() => {
                        let (id, peer, ranges) = inflight.remove(i % inflight.len());
                        let keep = (ranges.count() * u64::from(k)).div_ceil(8) as usize;
                        let got = GroupRanges::from_groups(ranges.iter().take(keep));
                        if s.requests.contains_key(&id) {
                            // What it claimed and did not send (and was not
                            // verified meanwhile) is no longer believed.
                            let had = GroupRanges::from_groups(ranges.iter().filter(|g| s.have.contains(*g as usize)));
                            let lacks = ranges.difference(&got).difference(&had);
                            if let Some(h) = holds.get_mut(&peer) {
                                *h = h.difference(&lacks);
                            }
                        }
                        s.handle_request_done(id, &got, now);
                    }
                    Ev::Fail(i, corrupt) if !inflight.is_empty() => {
                        let (id, peer, _) = inflight.remove(i % inflight.len());
                        if s.requests.contains_key(&id) {
                            // Either way the peer is gone.
                            holds.remove(&peer);
                        }
                        s.handle_request_failed(id, if corrupt { Failure::Corrupt } else { Failure::Error });
                    }
                    Ev::Done(..) | Ev::Fail(..) => {}
                    Ev::Verified(a, n) => {
                        s.handle_verified(&GroupRanges::from_range(a..(a + n).min(groups)), None);
                    }
                }
                s.check();
                // Every peer's whole and partial blocks are what it
                // announced, less what it was found to lack.
                for (peer, h) in &holds {
                    let Some(st) = s.peers.get(peer) else { continue };
                    for b in 0..s.blocks {
                        let range = s.block_range(b);
                        let mask = range.clone().filter(|g| h.contains(*g))
                            .fold(0u8, |m, g| m | 1 << (g - range.start));
                        let whole = h.contains_range(range);
                        prop_assert_eq!(st.blocks.contains(b as usize), whole, "peer {} block {}", peer, b);
                        let part = st.partial.get(&b).copied().unwrap_or(0);
                        prop_assert_eq!(part, if whole { 0 } else { mask }, "peer {} block {}", peer, b);
                    }
                }
            }
        }
    }

    #[test]
    fn three_seeders_share_the_load() {
        let groups = 2048;
        let mut sim = Sim::new(groups, vec![5e6, 5e6, 5e6, 100e6], 3, |_| {
            SchedulerConfig::default()
        });
        sim.run(Duration::from_millis(5), Duration::from_secs(600));
        let file = (groups * GROUP_SIZE) as f64;
        for s in 0..3 {
            assert!(
                sim.uploaded[s] > 0.15 * file,
                "seeder {s} sent only {:.2}",
                sim.uploaded[s] / file
            );
        }
    }

    #[test]
    fn endgame_duplicates_are_cancelled() {
        // One fast and one very slow seeder: at the end the fast one
        // duplicates the slow one's last blocks and the slow request is
        // cancelled.
        let groups = 16 * BLOCK_GROUPS;
        let mut sim = Sim::new(groups, vec![50e6, 0.2e6, 1e9], 2, |_| {
            SchedulerConfig::default()
        });
        let took = sim.run(Duration::from_millis(2), Duration::from_secs(600));
        let s = sim.scheds[2].as_ref().unwrap();
        assert!(
            s.stats().endgame_requests > 0,
            "no end-game: {:?}",
            s.stats()
        );
        assert!(sim.cancels > 0, "no duplicate was cancelled");
        // The slow seeder alone would need >10 s for its share; with
        // end-game the download is bound by the fast one.
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert!(
            sim.inflight.is_empty(),
            "requests left behind after completion"
        );
    }

    #[test]
    fn sequential_mode_fetches_in_order() {
        let now = t0();
        let cfg = SchedulerConfig {
            sequential: true,
            max_requests_per_peer: 1,
            ..Default::default()
        };
        let mut s = Scheduler::new(100 * BLOCK_GROUPS, &GroupRanges::new(), cfg);
        s.handle_peer_added(1u8);
        s.handle_peer_complete(&1);
        let mut next = 0;
        while !s.is_complete() {
            let Some(Action::Request { id, ranges, .. }) = s.poll_action(now) else {
                panic!("no request")
            };
            assert_eq!(ranges.runs()[0].start, next);
            next = ranges.runs().last().unwrap().end;
            s.handle_request_done(id, &ranges, now + Duration::from_millis(10));
        }
    }
}
