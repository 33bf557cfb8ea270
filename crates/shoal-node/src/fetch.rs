//! Fetching what a user asked for: a blob to the store, to a file or as an
//! in-order stream, or a collection to a directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use shoal_proto::{GROUP_SIZE, group_count};
use shoal_store::{BlobKind, Hash, Presence, StoreEvent, collection};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::Progress;
use crate::batch::{self, SmallJob};
use crate::download::{BlobJob, Fetched, fetch_blob};
use crate::error::NodeError;
use crate::node::{Node, PeerAddr, lock};

/// Member blobs of a collection fetched at once.
const COLLECTION_PARALLELISM: usize = 4;
/// Bytes handed to a stream consumer at once.
const STREAM_PIECE: usize = 1 << 20;

/// Where fetched data goes.
#[derive(Debug, Clone)]
pub enum FetchOutput {
    /// Keep it in the store only.
    Store,
    /// Write it to this path (a file, or a directory for a collection).
    Path(PathBuf),
    /// Send the verified bytes, in order, as they arrive (blobs only).
    Stream(mpsc::Sender<Bytes>),
}

/// What to fetch and from whom.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    /// The hash.
    pub hash: Hash,
    /// What it is, if known (from a ticket); otherwise providers say.
    pub kind: Option<BlobKind>,
    /// Providers known up front (ticket, `--peer`).
    pub peers: Vec<PeerAddr>,
    /// Where it goes.
    pub out: FetchOutput,
}

/// What a finished fetch did.
#[derive(Debug, Clone)]
pub struct FetchReport {
    /// The hash fetched.
    pub hash: Hash,
    /// Blob or collection.
    pub kind: BlobKind,
    /// Bytes of content (all members for a collection).
    pub bytes: u64,
    /// Files written (1 for a blob).
    pub files: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Bytes this node received from peers while the fetch ran (all
    /// streams: with other transfers at the same time, an upper bound).
    pub received: u64,
}

impl Node {
    /// Fetches `req.hash` from every peer that has it, verifying every
    /// group; `progress` (if given) is updated as it goes.
    pub async fn fetch(
        &self,
        req: FetchRequest,
        progress: Option<watch::Sender<Progress>>,
    ) -> Result<FetchReport, NodeError> {
        let started = Instant::now();
        let received_before = self.inner.endpoint.stats().bytes_received;
        let progress = progress.unwrap_or_else(|| watch::channel(Progress::default()).0);
        let pinned_before = self.store().is_pinned(&req.hash);
        let registered = Registered::new(&self.inner, req.hash, progress.subscribe());
        let res = self.fetch_inner(&req, &progress, &registered.cancel).await;
        let got_nothing = || {
            self.store()
                .info(&req.hash)
                .is_some_and(|i| !i.complete && i.verified.is_empty())
        };
        let pinned_for_nothing = match &res {
            Err(NodeError::StreamCollection) => true,
            Err(NodeError::Cancelled(_)) => false,
            Err(_) => got_nothing(),
            Ok(_) => false,
        };
        if pinned_for_nothing && !pinned_before {
            // `cat` of a directory's hash fetched its manifest to learn it
            // is one: that fetch pinned it, and `ticket` then gave a ticket
            // for a directory this node does not hold (a review). A failed
            // fetch that got nothing leaves nothing pinned either: one begun
            // as a resume just as gc took what was there left a pinned 0%
            // entry that each get again pinned anew (a review). Unless
            // another fetch of it runs: decided under the registry's lock,
            // unpinned after it (a durable commit), and pinned again if one
            // came meanwhile. A failure to unpin is said, not put in place
            // of the fetch's own error.
            let alone = lock(&self.inner.fetches)
                .get(&req.hash)
                .is_none_or(|l| l.len() <= 1);
            if alone {
                let (store, hash) = (self.store().clone(), req.hash);
                let unpinned = tokio::task::spawn_blocking(move || called_off(&store, &hash))
                    .await
                    .map_err(|e| NodeError::Internal(e.to_string()))
                    .and_then(|r| r);
                if let Err(e) = unpinned {
                    tracing::warn!(hash = %req.hash, "cannot unpin what the failed fetch pinned: {e}");
                }
                // One registered meanwhile keeps its pin.
                let others = lock(&self.inner.fetches)
                    .get(&req.hash)
                    .is_some_and(|l| l.len() > 1);
                if let (true, Some(info)) = (others, self.store().info(&req.hash))
                    && let Err(e) = self.store().pin(&req.hash, info.kind)
                {
                    tracing::warn!(hash = %req.hash, "cannot pin it again for another fetch: {e}");
                }
            }
        }
        drop(registered);
        // A member's download called off is the fetch's.
        let res = match res {
            Err(NodeError::Cancelled(_)) => Err(NodeError::Cancelled(req.hash)),
            r => r,
        };
        if matches!(res, Err(NodeError::Cancelled(_))) {
            let (store, hash) = (self.store().clone(), req.hash);
            tokio::task::spawn_blocking(move || called_off(&store, &hash))
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))??;
        }
        let (kind, bytes, files) = res?;
        // Held already (no download completed): announced now it is
        // pinned again; a second announce of one is nothing.
        self.announce(&req.hash);
        Ok(FetchReport {
            hash: req.hash,
            kind,
            bytes,
            files,
            elapsed: started.elapsed(),
            received: self.inner.endpoint.stats().bytes_received - received_before,
        })
    }

    async fn fetch_inner(
        &self,
        req: &FetchRequest,
        progress: &watch::Sender<Progress>,
        cancel: &CancellationToken,
    ) -> Result<(BlobKind, u64, u64), NodeError> {
        let inner = self.inner.clone();
        // A directory at the output: a collection's fetch run again, maybe
        // (see `holds_and_recorded`); never a file's output.
        let dir_there = match &req.out {
            FetchOutput::Path(p) if std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) => {
                Some(p.clone())
            }
            _ => None,
        };
        if let (Some(p), Some(BlobKind::Raw)) = (&dir_there, req.kind) {
            return Err(NodeError::OutputExists(p.clone()));
        }
        // Where the blob goes if it is (or turns out to be) a raw blob.
        let target = match (&req.out, req.kind) {
            (FetchOutput::Path(p), Some(BlobKind::Raw) | None) if dir_there.is_none() => {
                Some(p.clone())
            }
            _ => None,
        };
        let streaming = matches!(req.out, FetchOutput::Stream(_));
        if req.kind == Some(BlobKind::Collection) && streaming {
            return Err(NodeError::StreamCollection);
        }
        // Fetched before into a file that is gone now: fetched again.
        {
            let (store, hash) = (self.store().clone(), req.hash);
            tokio::task::spawn_blocking(move || store.forget_vanished(&[hash]))
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))??;
        }
        let job = BlobJob {
            hash: req.hash,
            kind: req.kind,
            target: target.clone(),
            sequential: streaming,
            peers: req.peers.clone(),
            pin: true,
            cancel: cancel.clone(),
            no_file_at: dir_there.clone(),
        };
        let blob = fetch_blob(inner.clone(), job, progress.clone());
        // Given a bare hash, a blob a provider calls a collection is not
        // streamed until its content says whether it is one: `cat` of a
        // directory must fail before it writes a byte, not after its
        // manifest.
        let hold_collection = req.kind.is_none();
        let (fetched, mut streamed) = if let FetchOutput::Stream(tx) = &req.out {
            let out = stream_out(self, req.hash, tx.clone(), hold_collection, cancel);
            let (got, streamed) = tokio::try_join!(blob, out)?;
            (got, streamed)
        } else {
            (blob.await?, Streamed::Held)
        };
        let providers = fetched.providers;
        let mut kind = fetched.kind;
        if req.kind.is_none() {
            // Providers' word on the kind is a claim, and the first one was
            // followed: now that the content is verified, it decides. A
            // collection is what some provider called one and what parses
            // as a manifest; anything else is a file.
            let store = self.store().clone();
            let (hash, claimed) = (req.hash, fetched.claimed_collection);
            let is_collection = tokio::task::spawn_blocking(move || {
                claimed
                    && store
                        .info(&hash)
                        .is_some_and(|i| i.size <= collection::MAX_MANIFEST_BYTES as u64)
                    && store
                        .read_all(&hash)
                        .is_ok_and(|m| collection::parse_manifest(&m).is_ok())
            })
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))?;
            let actual = if is_collection {
                BlobKind::Collection
            } else {
                BlobKind::Raw
            };
            if actual != kind {
                tracing::warn!(
                    hash = %req.hash,
                    "a provider claimed the wrong kind: it is a {}",
                    if is_collection { "collection" } else { "file" }
                );
                self.store().pin(&req.hash, actual)?;
                if let (FetchOutput::Path(p), None) = (&req.out, &dir_there) {
                    // Written as a file but a collection: the manifest goes
                    // into the store and the directory is made at p; or
                    // the other way round.
                    let (store, hash, p) = (self.store().clone(), req.hash, p.clone());
                    tokio::task::spawn_blocking(move || {
                        store.move_data(&hash, (!is_collection).then_some(p.as_path()))
                    })
                    .await
                    .map_err(|e| NodeError::Internal(e.to_string()))??;
                }
                kind = actual;
            }
        }
        if let (Some(p), BlobKind::Raw) = (&dir_there, kind) {
            // A provider called it a directory, and the content is a
            // file (`no_file_at` refuses what is called a file before it
            // is fetched): it stays in the store, pinned, as a get without
            // `-o` leaves it.
            return Err(NodeError::OutputExists(p.clone()));
        }
        let size = self.store().info(&req.hash).map_or(0, |i| i.size);
        if let (BlobKind::Raw, FetchOutput::Stream(tx), Streamed::Held) = (kind, &req.out, streamed)
        {
            // Held back, and a file after all: out it goes, whole now.
            streamed = stream_out(self, req.hash, tx.clone(), false, cancel).await?;
        }
        match (kind, &req.out) {
            // Every byte is out already (the first provider called it a
            // file): the user has what was asked for.
            (BlobKind::Collection, FetchOutput::Stream(_)) if streamed == Streamed::All => {
                Ok((kind, size, 1))
            }
            (BlobKind::Collection, FetchOutput::Stream(_)) => Err(NodeError::StreamCollection),
            (BlobKind::Collection, out) => {
                let dir = match out {
                    FetchOutput::Path(p) => Some(p.as_path()),
                    _ => None,
                };
                // After any other fetch of its members on this node: two at
                // once filled the same temporary tree (to one output) and
                // fetched the small files twice (a review). The one that
                // waited finds the members here, and an output the other
                // made holding the collection already (`holds_and_recorded`).
                let _turn = tokio::select! {
                    biased;
                    () = cancel.cancelled() => return Err(cancelled(self, req.hash)),
                    t = self.inner.collections.turn(req.hash) => t,
                };
                self.fetch_members(req, dir, providers, progress, cancel)
                    .await
                    .map(|(b, f)| (kind, b, f))
            }
            (BlobKind::Raw, FetchOutput::Path(p)) if std::fs::symlink_metadata(p).is_err() => {
                // The blob was in the store already (or lives elsewhere):
                // write the file from there.
                let store = self.store().clone();
                let (hash, p) = (req.hash, p.clone());
                tokio::task::spawn_blocking(move || write_file_atomically(&store, &hash, &p))
                    .await
                    .map_err(|e| NodeError::Internal(e.to_string()))??;
                Ok((kind, size, 1))
            }
            _ => Ok((kind, size, 1)),
        }
    }

    async fn fetch_members(
        &self,
        req: &FetchRequest,
        dir: Option<&Path>,
        providers: Vec<shoal_transport::Connection>,
        progress: &watch::Sender<Progress>,
        cancel: &CancellationToken,
    ) -> Result<(u64, u64), NodeError> {
        let store = self.store().clone();
        tracing::debug!("reading the manifest");
        let entries = store.read_manifest(&req.hash)?;
        if cancel.is_cancelled() {
            return Err(cancelled(self, req.hash));
        }
        self.store().pin(&req.hash, BlobKind::Collection)?;
        // Named after the directory it goes to (a ticket carries no name),
        // as a file is after its output.
        if let Some(name) = dir.and_then(Path::file_name) {
            store.name_if_unnamed(&req.hash, &name.to_string_lossy())?;
        }
        let files: Vec<&collection::Entry> = entries.iter().filter(|e| !e.empty_dir).collect();
        let total_bytes: u64 = files.iter().map(|e| e.size).sum();
        let total_files = files.len() as u32;
        progress.send_modify(|p| {
            p.total = total_bytes;
            p.verified = 0;
            p.files_total = total_files;
        });
        // Each distinct blob is downloaded once, straight to the first path
        // that holds it inside a temporary directory beside the output
        // (kept across restarts, so an interrupted fetch resumes).
        let tmp = match dir {
            Some(d) => {
                if std::fs::symlink_metadata(d).is_ok() {
                    // A get run again (or one that waited for another to
                    // the same output) over the directory it wrote has
                    // nothing to do, as for a file; anything else there is
                    // never written into.
                    let (d2, want, stop) = (d.to_path_buf(), entries.clone(), cancel.clone());
                    let (store2, hash) = (store.clone(), req.hash);
                    let same = tokio::task::spawn_blocking(move || {
                        holds_and_recorded(&store2, hash, &d2, &want, &stop)
                    })
                    .await
                    .map_err(|e| NodeError::Internal(e.to_string()))??;
                    if cancel.is_cancelled() {
                        return Err(cancelled(self, req.hash));
                    }
                    if !same {
                        return Err(NodeError::OutputExists(d.to_path_buf()));
                    }
                    progress.send_modify(|p| {
                        p.verified = total_bytes;
                        p.files_done = total_files;
                    });
                    return Ok((total_bytes, files.len() as u64));
                }
                let tmp = temp_sibling(d);
                match std::fs::symlink_metadata(&tmp) {
                    Ok(m) if m.file_type().is_dir() => {}
                    Ok(_) => return Err(NodeError::OutputExists(tmp)),
                    Err(_) => {
                        std::fs::create_dir(&tmp).map_err(|e| NodeError::Write(tmp.clone(), e))?
                    }
                }
                Some(tmp)
            }
            None => None,
        };
        // In the manifest's order (directory by directory): a batch's files
        // then share a few directories, instead of touching ~100 each.
        let mut seen: std::collections::HashSet<Hash> =
            std::collections::HashSet::with_capacity(files.len());
        let first: Vec<(Hash, &str, u64)> = files
            .iter()
            .filter(|e| seen.insert(e.hash))
            .map(|e| (e.hash, e.path.as_str(), e.size))
            .collect();
        drop(seen);
        let tally = Tally::new(progress);
        let count_done = |size: u64| tally.done(None, size);
        // Members fetched before into files that are gone now (an output
        // directory deleted) are fetched again.
        let hashes: Vec<Hash> = first.iter().map(|(h, _, _)| *h).collect();
        {
            let store = store.clone();
            let hashes = hashes.clone();
            tokio::task::spawn_blocking(move || store.forget_vanished(&hashes))
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))??;
        }
        // Complete blobs need nothing; small ones the store has never seen
        // go in batches; the rest one by one.
        let mut dirs = DirCache::default();
        let mut small = Vec::new();
        let mut single = Vec::new();
        for ((hash, path, size), presence) in first.iter().zip(store.presence(&hashes)) {
            if let Presence::Complete(_) = presence {
                count_done(*size);
                continue;
            }
            let target = match &tmp {
                Some(t) => Some(dirs.make_parents(t, path)?),
                None => None,
            };
            let job = SmallJob {
                hash: *hash,
                size: *size,
                target,
            };
            if presence == Presence::Absent && batch::is_small(*size) {
                small.push(job);
            } else {
                single.push(job);
            }
        }
        // What is here already is no part of the rate.
        tally.start_rate();
        let mut providers = providers;
        tally.providers(providers.len());
        store.reserve(small.len() + single.len());
        tracing::debug!(
            small = small.len(),
            single = single.len(),
            "members planned"
        );
        if providers.is_empty() && !small.is_empty() {
            // The manifest was here already: the first small member, fetched
            // the usual way, finds the providers.
            let j = small.remove(0);
            let found = self
                .fetch_one(req, j.clone(), None, cancel)
                .await
                .map_err(|e| member_error(&first, j.hash, e))?
                .providers;
            count_done(j.size);
            providers = found;
            tally.providers(providers.len());
        }
        let small_path = async {
            if small.is_empty() {
                return Ok((Vec::new(), Vec::new()));
            }
            // Its workers are futures of this one, and each batch it
            // stores is recorded whole: dropped at any await, it leaves
            // nothing half done.
            tokio::select! {
                r = batch::fetch_small(&self.inner, &providers, small, &count_done) => r,
                () = cancel.cancelled() => Err(cancelled(self, req.hash)),
            }
        };
        let single_path = self.fetch_each(req, single, &tally, &first, cancel);
        let ((rest, batched), ()) = tokio::try_join!(small_path, single_path)?;
        self.fetch_each(req, rest, &tally, &first, cancel).await?;
        let files = files.len() as u64;
        tracing::debug!(files, "members fetched");
        if let (Some(tmp), Some(dir)) = (tmp, dir) {
            let dir = dir.to_path_buf();
            let batched: std::collections::HashSet<Hash> = batched.iter().map(|j| j.hash).collect();
            let first: Vec<(Hash, String)> = first
                .into_iter()
                .map(|(h, p, _)| (h, p.to_string()))
                .collect();
            tokio::task::spawn_blocking(move || {
                finish_tree(&store, &entries, &first, &batched, dirs, &tmp, &dir)
            })
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))??;
        } else {
            // The records of the batches, held in memory by the store, are
            // committed now (`finish_tree` does it with the files' places).
            tokio::task::spawn_blocking(move || store.flush())
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))??;
        }
        tracing::debug!("members recorded");
        Ok((total_bytes, files))
    }

    /// One member the usual way (finding peers, swarming).
    async fn fetch_one(
        &self,
        req: &FetchRequest,
        job: SmallJob,
        progress: Option<watch::Sender<Progress>>,
        cancel: &CancellationToken,
    ) -> Result<Fetched, NodeError> {
        let progress = progress.unwrap_or_else(|| watch::channel(Progress::default()).0);
        if let Some(t) = &job.target
            && self.store().info(&job.hash).is_none()
        {
            clear_leftovers(t).await?;
        }
        let job = BlobJob {
            hash: job.hash,
            kind: Some(BlobKind::Raw),
            target: job.target,
            sequential: false,
            peers: req.peers.clone(),
            // Kept by its collection, pinned before its members are
            // fetched: `rm` of the collection lets gc free it, and a pin
            // the user gives it meanwhile stays.
            pin: false,
            cancel: cancel.clone(),
            no_file_at: None,
        };
        fetch_blob(self.inner.clone(), job, progress).await
    }

    /// Members one by one, a few at once; the first that cannot be
    /// fetched ends the whole fetch.
    async fn fetch_each(
        &self,
        req: &FetchRequest,
        jobs: Vec<SmallJob>,
        tally: &Tally<'_>,
        names: &[(Hash, &str, u64)],
        cancel: &CancellationToken,
    ) -> Result<(), NodeError> {
        futures::stream::iter(jobs)
            .map(|j| async move {
                let (hash, size) = (j.hash, j.size);
                // Its progress counts in the collection's as it goes.
                let (tx, mut rx) = watch::channel(Progress::default());
                let fetch = self.fetch_one(req, j, Some(tx), cancel);
                tokio::pin!(fetch);
                loop {
                    tokio::select! {
                        r = &mut fetch => {
                            r.map_err(|e| member_error(names, hash, e))?;
                            break;
                        }
                        Ok(()) = rx.changed() => {
                            let p = rx.borrow_and_update().clone();
                            tally.member(hash, p.verified.min(size), p.peers);
                        }
                    }
                }
                tally.done(Some(hash), size);
                Ok::<(), NodeError>(())
            })
            .buffer_unordered(COLLECTION_PARALLELISM)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }
}

/// The error of the member `hash` of a collection, named by its path in
/// the manifest (`names`: hash, path, size): a missing member was named by
/// its hash alone, which says nothing to whoever shared a directory.
fn member_error(names: &[(Hash, &str, u64)], hash: Hash, e: NodeError) -> NodeError {
    match names.iter().find(|(h, _, _)| *h == hash) {
        Some((_, path, _)) if !e.is_node_gone() && !matches!(e, NodeError::Cancelled(_)) => {
            NodeError::Member(path.to_string(), Box::new(e))
        }
        _ => e,
    }
}

/// A collection's progress: the members done, and how far those being
/// downloaded one by one have come. It moved only as whole members
/// completed, so a healthy download of large files looked stalled (2% for
/// 11 s at 5 MB/s in a review), and showed the manifest's providers as
/// its peers.
struct Tally<'a> {
    progress: &'a watch::Sender<Progress>,
    st: std::sync::Mutex<TallyState>,
}

struct TallyState {
    done_bytes: u64,
    done_files: u32,
    /// Members under way: verified bytes and peers in use.
    members: HashMap<Hash, (u64, u32)>,
    providers: u32,
    meter: crate::RateMeter,
    /// Bytes that were here before this fetch: those of members held
    /// whole, and what members under way had verified when they first
    /// reported (a resumed download's). No part of the rate.
    here_before: u64,
}

impl<'a> Tally<'a> {
    fn new(progress: &'a watch::Sender<Progress>) -> Self {
        // Sampled more often than a blob's download: small members move
        // it in steps.
        let meter = crate::RateMeter::new(Duration::from_millis(250));
        Tally {
            progress,
            st: std::sync::Mutex::new(TallyState {
                done_bytes: 0,
                done_files: 0,
                members: HashMap::new(),
                providers: 0,
                meter,
                here_before: 0,
            }),
        }
    }

    /// A member of `size` bytes is done (`hash`: one that was under way).
    fn done(&self, hash: Option<Hash>, size: u64) {
        let mut st = lock(&self.st);
        if let Some(h) = hash {
            st.members.remove(&h);
        }
        st.done_bytes += size;
        st.done_files += 1;
        self.send(&mut st);
    }

    /// A member under way has `verified` bytes, from `peers` peers.
    fn member(&self, hash: Hash, verified: u64, peers: u32) {
        let mut st = lock(&self.st);
        if st.members.insert(hash, (verified, peers)).is_none() {
            st.here_before += verified;
        }
        self.send(&mut st);
    }

    /// What is counted so far was here before: the rate starts now.
    fn start_rate(&self) {
        let mut st = lock(&self.st);
        st.here_before = st.done_bytes;
        st.meter = crate::RateMeter::new(Duration::from_millis(250));
        st.meter.update(Instant::now(), 0);
    }

    /// The providers of the batches of small members.
    fn providers(&self, n: usize) {
        let mut st = lock(&self.st);
        st.providers = u32::try_from(n).unwrap_or(u32::MAX);
        self.send(&mut st);
    }

    fn send(&self, st: &mut TallyState) {
        let verified = st.done_bytes + st.members.values().map(|m| m.0).sum::<u64>();
        let peers = st
            .members
            .values()
            .map(|m| m.1)
            .max()
            .unwrap_or(0)
            .max(st.providers);
        let rate = st
            .meter
            .update(Instant::now(), verified.saturating_sub(st.here_before));
        let files_done = st.done_files;
        self.progress.send_modify(|p| {
            p.verified = verified;
            p.files_done = files_done;
            p.peers = peers;
            p.rate = rate;
        });
    }
}

/// Clears a member's place in the collection's temporary directory (this
/// download's own) when the store has no record of the member: a file
/// there is a leftover of an earlier run killed before it recorded it (the
/// batches write small members before they record them), which the
/// download would otherwise refuse to write over, leaving its own file
/// beside it, as `NAME.shoal-partial`, in the output. (A `.shoal-partial`
/// there is left alone: it may be another data dir's download under way,
/// which holds it locked, and a new download takes an empty one.)
async fn clear_leftovers(target: &Path) -> Result<(), NodeError> {
    match tokio::fs::remove_file(target).await {
        Ok(()) => {
            tracing::debug!("removed {}, left by an earlier run", target.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NodeError::Write(target.to_path_buf(), e)),
    }
}

/// Directories known to exist (created or checked) under a root, so that
/// each is checked once however many files it holds.
#[derive(Default)]
struct DirCache {
    known: std::collections::HashSet<PathBuf>,
    /// The root of `done`, and the parent directories (as the manifest
    /// names them) made under it: most files share one with the file
    /// before, which then costs one lookup of a short string.
    root: Option<PathBuf>,
    done: std::collections::HashSet<String>,
}

impl DirCache {
    /// Creates the parent directories of `rel` under `root` one by one,
    /// refusing anything that is not a directory (no symlink is followed
    /// out of the tree); returns the full path. `rel` was checked by
    /// `parse_manifest`.
    fn make_parents(&mut self, root: &Path, rel: &str) -> Result<PathBuf, NodeError> {
        if self.root.as_deref() != Some(root) {
            self.root = Some(root.to_path_buf());
            self.done.clear();
        }
        let parent = rel.rsplit_once('/').map(|(p, _)| p);
        if parent.is_some_and(|p| self.done.contains(p)) {
            return Ok(root.join(rel));
        }
        let comps: Vec<&str> = rel.split('/').collect();
        let mut dir = root.to_path_buf();
        for c in &comps[..comps.len().saturating_sub(1)] {
            dir.push(c);
            if self.known.contains(&dir) {
                continue;
            }
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => return Err(NodeError::OutputExists(dir)),
                Err(_) => {
                    std::fs::create_dir(&dir).map_err(|e| NodeError::Write(dir.clone(), e))?
                }
            }
            self.known.insert(dir.clone());
        }
        if let Some(p) = parent {
            self.done.insert(p.to_string());
        }
        Ok(root.join(rel))
    }
}

/// Completes a downloaded tree: copies of blobs that appear more than once
/// (or were in the store already), executable bits, empty directories; then
/// renames it into place and tells the store where its files now are.
/// `batched` blobs were written by the batch path to their first path.
fn finish_tree(
    store: &shoal_store::Store,
    entries: &[collection::Entry],
    first: &[(Hash, String)],
    batched: &std::collections::HashSet<Hash>,
    mut dirs: DirCache,
    tmp: &Path,
    dir: &Path,
) -> Result<(), NodeError> {
    use std::os::unix::fs::PermissionsExt;
    let written: std::collections::HashSet<&str> = first
        .iter()
        .filter(|(h, _)| batched.contains(h))
        .map(|(_, p)| p.as_str())
        .collect();
    let created_mode = process_umask().map(|u| 0o666 & !u);
    for e in entries {
        if e.empty_dir {
            let mut p = dirs.make_parents(tmp, &format!("{}/x", e.path))?;
            p.pop();
            if std::fs::symlink_metadata(&p).is_err() {
                std::fs::create_dir(&p).map_err(|err| NodeError::Write(p.clone(), err))?;
            }
            continue;
        }
        let mode = if e.executable { 0o755 } else { 0o644 };
        let was_written = written.contains(e.path.as_str());
        // A file the batch path created (its directories too) already has
        // the mode new files get (0o666 less the umask): nothing to do
        // when that is the mode wanted (10,000 files: ~5 ms less).
        if was_written && created_mode == Some(mode) {
            continue;
        }
        let path = dirs.make_parents(tmp, &e.path)?;
        if !was_written && std::fs::symlink_metadata(&path).is_err() {
            // Written aside and renamed when whole: a file at `path` is
            // trusted by a resumed fetch, and an export that failed half
            // way (a blob found corrupt on disk, a full disk) left one.
            // Outside the tree, where no name in the manifest can be.
            let part = shoal_store::beside(tmp, "", ".export");
            let exported = (|| {
                let mut f = std::fs::File::create(&part)
                    .map_err(|err| NodeError::Write(part.clone(), err))?;
                store.export_blob(&e.hash, &mut f)?;
                std::fs::rename(&part, &path).map_err(|err| NodeError::Write(path.clone(), err))
            })();
            if exported.is_err() {
                let _ = std::fs::remove_file(&part);
            }
            exported?;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|err| NodeError::Write(path.clone(), err))?;
    }
    // Never over something made at `dir` meanwhile (a rename replaces an
    // empty directory). The store records where the files downloaded into
    // the tree are now (those that were in the store before live
    // elsewhere), and mends a kill between the two at its next open.
    match store.move_tree(tmp, dir, first) {
        Ok(()) => Ok(()),
        Err(shoal_store::StoreError::Exists(_)) => Err(NodeError::OutputExists(dir.to_path_buf())),
        Err(e) => Err(e.into()),
    }
}

/// This process's umask, from `/proc/self/status` (reading it with
/// `umask(2)` would change it, racing with other threads creating files).
fn process_umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Umask:"))?;
    u32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok()
}

/// What [`stream_out`] did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Streamed {
    /// Every byte went out.
    All,
    /// None did: the blob is declared a collection and the caller asked
    /// to hold such a blob back.
    Held,
}

/// Streams the verified bytes of `hash` to `tx` in order, as the download
/// verifies them; with `hold_collection`, nothing if the blob is declared
/// a collection.
async fn stream_out(
    node: &Node,
    hash: Hash,
    tx: mpsc::Sender<Bytes>,
    hold_collection: bool,
    cancel: &CancellationToken,
) -> Result<Streamed, NodeError> {
    let store = node.store().clone();
    let mut events = store.subscribe();
    let mut offset = 0u64;
    loop {
        if let Some(info) = store.info(&hash) {
            let groups = group_count(info.size);
            // The size is trustworthy once the last group is verified.
            if info.complete || info.verified.contains(groups - 1) {
                let verified = if info.complete {
                    shoal_proto::GroupRanges::from_range(0..groups)
                } else {
                    info.verified.clone()
                };
                let mut end_group = offset / GROUP_SIZE;
                while end_group < groups && verified.contains(end_group) {
                    end_group += 1;
                }
                let end = (end_group * GROUP_SIZE).min(info.size);
                // (Larger than any manifest, it is a file whatever it was
                // called.)
                if hold_collection
                    && offset == 0
                    && info.kind == BlobKind::Collection
                    && info.size <= collection::MAX_MANIFEST_BYTES as u64
                {
                    return Ok(Streamed::Held);
                }
                while offset < end {
                    let len = ((end - offset) as usize).min(STREAM_PIECE);
                    let data = store.read_at(&hash, offset, len)?;
                    offset += data.len() as u64;
                    if data.is_empty() {
                        break;
                    }
                    if tx.send(data).await.is_err() {
                        return Err(NodeError::OutputClosed);
                    }
                }
                if offset >= info.size {
                    return Ok(Streamed::All);
                }
            }
        }
        // Wait for more to be verified (or poll now and then).
        let _ =
            tokio::time::timeout(Duration::from_millis(200), async {
                loop {
                    match events.recv().await {
                        Ok(
                            StoreEvent::Verified { hash: h, .. } | StoreEvent::Complete { hash: h },
                        ) if h == hash => break,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
            })
            .await;
        if cancel.is_cancelled() {
            return Err(cancelled(node, hash));
        }
        debug!(offset, "streaming");
    }
}

/// What a fetch called off leaves: unpinned (its own pin, as a download
/// begins, may have come after the unpin that called it off; or it never
/// began, and the store has nothing to unpin). What it verified stays
/// until gc, as after any unpin; a directory's temporary tree stays as an
/// interrupted get leaves it. (Deleting the tree here left the members'
/// partial downloads pointing into it, and a get of it again failed to
/// rename them into place: found by a review.)
fn called_off(store: &shoal_store::Store, hash: &Hash) -> Result<(), NodeError> {
    match store.unpin(hash) {
        Ok(()) | Err(shoal_store::StoreError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Why a fetch's token was cancelled: the node stopping, or an unpin of
/// `hash`.
fn cancelled(node: &Node, hash: Hash) -> NodeError {
    if node.inner.cancel.is_cancelled() {
        NodeError::ShuttingDown
    } else {
        NodeError::Cancelled(hash)
    }
}

/// Whether `dir` holds exactly the collection `hash` (see [`tree_shape_holds`]);
/// if it does, members the store does not hold (an `rm` and a gc since the
/// get that wrote it) are recorded there, in place, as `add` would: the
/// collection was left pinned with no member in the store (a review).
fn holds_and_recorded(
    store: &shoal_store::Store,
    hash: Hash,
    dir: &Path,
    entries: &[collection::Entry],
    stop: &CancellationToken,
) -> Result<bool, NodeError> {
    if !tree_shape_holds(dir, entries) {
        return Ok(false);
    }
    let hashes: Vec<Hash> = entries
        .iter()
        .filter(|e| !e.empty_dir)
        .map(|e| e.hash)
        .collect();
    if store
        .presence(&hashes)
        .iter()
        .all(|p| matches!(p, Presence::Complete(_)))
    {
        return Ok(files_hash_to(dir, entries, stop));
    }
    // Recorded as `add` would, which hashes each file once and says
    // whether the tree is the collection (its manifest's hash): hashing
    // it here first read every file twice.
    let pinned_before: std::collections::HashSet<Hash> = store
        .list()
        .into_iter()
        .filter(|i| i.pinned)
        .map(|i| i.hash)
        .collect();
    let got = store.import_dir(dir, shoal_store::ImportMode::InPlace)?;
    if got != hash {
        // The same files, other modes (an executable bit): not the
        // collection asked for, and not pinned for it.
        if !pinned_before.contains(&got) {
            called_off(store, &got)?;
        }
        return Ok(false);
    }
    Ok(true)
}

/// Whether `dir` has exactly the shape of the tree `entries` describe:
/// every file at its path, a regular file of its size; every empty
/// directory; and nothing else (no other file, directory or link). Any
/// error reading it is a no.
fn tree_shape_holds(dir: &Path, entries: &[collection::Entry]) -> bool {
    fn walk(root: &Path, dir: &Path, found: &mut Vec<(String, bool)>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let t = e.file_type()?;
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .map_err(std::io::Error::other)?
                .to_str()
                .ok_or_else(|| std::io::Error::other("not UTF-8"))?
                .to_string();
            if t.is_dir() {
                let before = found.len();
                walk(root, &path, found)?;
                if found.len() == before {
                    found.push((rel, true));
                }
            } else if t.is_file() {
                found.push((rel, false));
            } else {
                return Err(std::io::Error::other("neither a file nor a directory"));
            }
        }
        Ok(())
    }
    let mut found = Vec::new();
    if !std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir())
        || walk(dir, dir, &mut found).is_err()
    {
        return false;
    }
    let mut want: Vec<(String, bool)> = entries
        .iter()
        .map(|e| (e.path.clone(), e.empty_dir))
        .collect();
    want.sort();
    found.sort();
    want == found
        && entries.iter().filter(|e| !e.empty_dir).all(|e| {
            std::fs::symlink_metadata(dir.join(&e.path))
                .is_ok_and(|m| m.is_file() && m.len() == e.size)
        })
}

/// Whether every file `entries` name under `dir` has its BLAKE3 hash. Any
/// error reading one is a no, and so is `stop` cancelled (checked between
/// files). Files are read, not mapped: one cut short meanwhile by another
/// process would kill the node with SIGBUS.
fn files_hash_to(dir: &Path, entries: &[collection::Entry], stop: &CancellationToken) -> bool {
    entries.iter().filter(|e| !e.empty_dir).all(|e| {
        !stop.is_cancelled()
            && std::fs::File::open(dir.join(&e.path)).is_ok_and(|f| {
                blake3::Hasher::new()
                    .update_reader(f)
                    .is_ok_and(|h| h.finalize() == e.hash)
            })
    })
}

/// One fetch of a collection's members at a time, per collection.
#[derive(Default)]
pub(crate) struct Collections(std::sync::Mutex<HashMap<Hash, Arc<tokio::sync::Mutex<()>>>>);

/// A collection's turn (see [`Collections`]), given up when dropped.
pub(crate) struct CollectionTurn<'a> {
    collections: &'a Collections,
    hash: Hash,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Collections {
    pub(crate) async fn turn(&self, hash: Hash) -> CollectionTurn<'_> {
        let m = lock(&self.0).entry(hash).or_default().clone();
        // Built before the wait: a wait dropped (called off) still takes
        // its entry out when it is the last.
        let mut turn = CollectionTurn {
            collections: self,
            hash,
            guard: None,
        };
        turn.guard = Some(m.lock_owned().await);
        turn
    }
}

impl Drop for CollectionTurn<'_> {
    fn drop(&mut self) {
        let mut map = lock(&self.collections.0);
        drop(self.guard.take());
        // Only the map holds it now: nobody waits.
        if map
            .get(&self.hash)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.hash);
        }
    }
}

/// A fetch in [`Inner::fetches`](crate::node::Inner), taken out when
/// dropped (the control socket's task may be aborted mid-fetch).
struct Registered<'a> {
    inner: &'a crate::node::Inner,
    hash: Hash,
    id: u64,
    cancel: CancellationToken,
}

impl<'a> Registered<'a> {
    fn new(inner: &'a crate::node::Inner, hash: Hash, progress: watch::Receiver<Progress>) -> Self {
        let id = inner
            .next_fetch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cancel = inner.cancel.child_token();
        lock(&inner.fetches)
            .entry(hash)
            .or_default()
            .push(crate::node::Fetching {
                id,
                progress,
                cancel: cancel.clone(),
            });
        Registered {
            inner,
            hash,
            id,
            cancel,
        }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut fetches = lock(&self.inner.fetches);
        if let Some(list) = fetches.get_mut(&self.hash) {
            list.retain(|f| f.id != self.id);
            if list.is_empty() {
                fetches.remove(&self.hash);
            }
        }
    }
}

/// `dir/.name.shoal-tmp`, beside the final path (a long name shortened,
/// see [`shoal_store::beside`]).
fn temp_sibling(p: &Path) -> PathBuf {
    shoal_store::beside(p, ".", ".shoal-tmp")
}

fn write_file_atomically(
    store: &shoal_store::Store,
    hash: &Hash,
    path: &Path,
) -> Result<(), NodeError> {
    let tmp = temp_sibling(path);
    let mut f = std::fs::File::create(&tmp).map_err(|e| NodeError::Write(tmp.clone(), e))?;
    let res = store
        .export_blob(hash, &mut f)
        .map_err(NodeError::from)
        .and_then(|_| f.sync_all().map_err(|e| NodeError::Write(tmp.clone(), e)))
        // Never over a file made at `path` since it was checked.
        .and_then(|()| {
            shoal_store::rename_no_replace(&tmp, path)
                .map_err(|e| NodeError::Write(path.to_path_buf(), e))
        });
    if res.is_err() {
        // A full disk, a corrupt blob: no half-written file is left.
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
