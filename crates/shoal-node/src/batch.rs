//! The small members of a collection, fetched many at a time.
//!
//! A directory of thousands of small files would cost, through the per-blob
//! download, a dial-and-ask, a get and several durable commits per file.
//! Here the providers of the collection (the peers that held all of its
//! manifest) are asked for up to 256 small blobs per `GetBlobs` exchange,
//! up to four exchanges in flight per provider and eight in all; each
//! answer is checked blob by
//! blob against its hash and stored as one batch. Whatever a provider does
//! not have, or sends wrong, goes back to the queue for the other
//! providers, and what none delivers is handed back to the caller to be
//! fetched one by one the usual way (which finds other peers). A provider
//! that sends a blob that does not match its hash is dropped.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use shoal_proto::{Limit, limits, pb};
use shoal_store::{Hash, WholeBlob, WholeOutcome};
use shoal_transport::Connection;
use tracing::{debug, warn};

use crate::download::choked;
use crate::error::NodeError;
use crate::node::{Inner, lock};
use crate::wire::{WireError, read_frame, write_frame};

/// `GetBlobs` exchanges in flight per provider, at most: some are on the
/// wire while earlier answers are written to disk. A get of 10,000 files
/// of 4 KiB from one provider, 5 rounds: 462 ms with 2, 435 with 3, 420
/// with 4, 415 with 6.
const EXCHANGES_PER_PEER: usize = 4;
/// `GetBlobs` exchanges in flight in all, which bounds the answers held
/// at once (each at most `MAX_GET_BLOBS_BYTES`).
const EXCHANGES_IN_FLIGHT: usize = 8;
/// Providers used at once.
const MAX_PROVIDERS: usize = 4;
/// Jobs in each worker's first exchange.
const FIRST_BATCH: usize = 32;
/// Time a provider gets to answer, and between two pieces of an answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The slowest a batch's bytes may come, on top of [`ANSWER_TIMEOUT`]: a
/// provider sending a byte every few seconds resets any per-read timeout,
/// and held its worker, and with it the collection's fetch, for good.
const MIN_BATCH_RATE: f64 = 8.0 * 1024.0;

/// One small member to fetch.
#[derive(Debug, Clone)]
pub(crate) struct SmallJob {
    pub(crate) hash: Hash,
    /// Its size, from the (verified) manifest.
    pub(crate) size: u64,
    /// Where its file goes, if anywhere.
    pub(crate) target: Option<PathBuf>,
}

/// Whether a blob of `size` bytes can go through [`fetch_small`].
pub(crate) fn is_small(size: u64) -> bool {
    size <= limits::MAX_SMALL_BLOB
}

/// Fetches `jobs` from `providers` in batches; `done(bytes)` is called as
/// each blob is stored. A job a provider does not deliver right is tried
/// with the others. Returns the jobs no provider delivered (to fetch one
/// by one), and those stored into their targets.
pub(crate) async fn fetch_small(
    node: &Arc<Inner>,
    providers: &[Connection],
    jobs: Vec<SmallJob>,
    done: &(dyn Fn(u64) + Sync),
) -> Result<(Vec<SmallJob>, Vec<SmallJob>), NodeError> {
    let shared = Shared {
        queue: std::sync::Mutex::new(jobs.into_iter().map(|j| (j, 0u8)).collect()),
        in_flight: AtomicUsize::new(0),
        ends: AtomicUsize::new(0),
        ended: tokio::sync::Notify::new(),
        stored: std::sync::Mutex::new(Vec::new()),
    };
    let providers: Vec<(&Connection, AtomicBool)> = providers
        .iter()
        .take(MAX_PROVIDERS)
        .map(|c| (c, AtomicBool::new(false)))
        .collect();
    let mut workers = Vec::new();
    for (i, (conn, bad)) in providers.iter().enumerate() {
        let per_peer = (EXCHANGES_IN_FLIGHT / providers.len().max(1)).clamp(1, EXCHANGES_PER_PEER);
        for _ in 0..per_peer {
            let w = Worker {
                node,
                conn,
                me: 1u8 << i,
                bad,
                shared: &shared,
                done,
            };
            workers.push(async move { w.run().await });
        }
    }
    futures::future::try_join_all(workers).await?;
    let rest = lock(&shared.queue).drain(..).map(|(j, _)| j).collect();
    let stored = lock(&shared.stored).split_off(0);
    Ok((rest, stored))
}

/// What the workers share: jobs with the providers that already failed
/// them (one bit each), batches in flight (and the end of each, announced),
/// and what was stored.
struct Shared {
    queue: std::sync::Mutex<VecDeque<(SmallJob, u8)>>,
    in_flight: AtomicUsize,
    /// Batches ended so far, and each end announced.
    ends: AtomicUsize,
    ended: tokio::sync::Notify,
    stored: std::sync::Mutex<Vec<SmallJob>>,
}

impl Shared {
    /// Gives jobs back, marked as failed by provider `me`.
    fn give_back(&self, jobs: impl IntoIterator<Item = (SmallJob, u8)>, me: u8) {
        lock(&self.queue).extend(jobs.into_iter().map(|(j, t)| (j, t | me)));
    }
}

/// Why a worker stops.
enum Stop {
    /// Our own store failed: the whole fetch stops.
    Local(NodeError),
    /// This provider is no use any more.
    Peer(String),
}

/// Why an exchange failed.
enum BatchError {
    /// The provider choked the answer (`choke.rs`).
    Busy,
    /// Anything else: the provider is no use any more.
    Failed(String),
}

impl From<String> for BatchError {
    fn from(e: String) -> Self {
        BatchError::Failed(e)
    }
}

impl From<&str> for BatchError {
    fn from(e: &str) -> Self {
        BatchError::Failed(e.to_string())
    }
}

/// One exchange at a time with one provider.
struct Worker<'a> {
    node: &'a Arc<Inner>,
    conn: &'a Connection,
    /// This provider's bit in the jobs' "failed by" masks.
    me: u8,
    /// Set once the provider sent a wrong blob (shared by its workers).
    bad: &'a AtomicBool,
    shared: &'a Shared,
    done: &'a (dyn Fn(u64) + Sync),
}

impl Worker<'_> {
    async fn run(&self) -> Result<(), NodeError> {
        let (conn, me, bad, shared) = (self.conn, self.me, self.bad, self.shared);
        let peer = conn.peer_id();
        // The first exchange is short, so that the first answers arrive
        // (and the disk gets work) while the provider still reads the
        // larger ones: with eight exchanges of 256 at once, a 10,000-file
        // get waited ~6 ms for its first answer.
        let mut most = FIRST_BATCH;
        loop {
            if bad.load(Ordering::Relaxed) || conn.is_closed() {
                return Ok(());
            }
            let ends = shared.ends.load(Ordering::SeqCst);
            let batch = take_batch(shared, me, most);
            most = limits::MAX_HASHES_PER_REQUEST;
            if batch.is_empty() {
                // Batches in flight elsewhere may still give jobs back that
                // this provider has not tried: wait for one to end. (A
                // fixed 20 ms sleep here ended a 10,000-file get up to
                // 20 ms after its last batch.)
                if shared.in_flight.load(Ordering::SeqCst) == 0 {
                    return Ok(());
                }
                let ended = shared.ended.notified();
                tokio::pin!(ended);
                ended.as_mut().enable();
                // A batch that ended since `take_batch` may have given
                // jobs back: look again rather than wait.
                if shared.in_flight.load(Ordering::SeqCst) == 0
                    || shared.ends.load(Ordering::SeqCst) != ends
                {
                    continue;
                }
                // Bounded, though every batch's end is announced.
                let _ = tokio::time::timeout(Duration::from_millis(200), ended).await;
                continue;
            }
            let res = self.exchange(batch).await;
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            shared.ends.fetch_add(1, Ordering::SeqCst);
            shared.ended.notify_waiters();
            match res {
                Ok(()) => {}
                Err(Stop::Local(e)) => return Err(e),
                Err(Stop::Peer(e)) => {
                    debug!(%peer, "batch get failed: {e}");
                    return Ok(());
                }
            }
        }
    }

    /// One batch from one provider, stored; what it did not deliver right goes
    /// back to the queue for the others.
    async fn exchange(&self, batch: Vec<(SmallJob, u8)>) -> Result<(), Stop> {
        let (node, conn, me, bad, shared, done) = (
            self.node,
            self.conn,
            self.me,
            self.bad,
            self.shared,
            self.done,
        );
        let peer = conn.peer_id();
        let min_rate = min_batch_rate(node.config.download_limit);
        let datas = match request(conn, &batch, min_rate).await {
            Ok(d) => d,
            Err(BatchError::Busy) => {
                // Choked (the provider gave the slot to another request):
                // not its failure; the jobs go back untried by it, and it
                // is asked again in its turn.
                debug!(%peer, "batch get choked");
                shared.give_back(batch, 0);
                return Ok(());
            }
            Err(BatchError::Failed(e)) => {
                shared.give_back(batch, me);
                return Err(Stop::Peer(e));
            }
        };
        let received: u64 = datas.iter().flatten().map(|d| d.len() as u64).sum();
        lock(&node.book).count_download(peer, received);
        let mut items = Vec::new();
        let mut asked = Vec::new();
        let mut back = Vec::new();
        for ((job, tried), data) in batch.into_iter().zip(datas) {
            match data {
                Some(data) => {
                    items.push(WholeBlob {
                        hash: job.hash,
                        data,
                        target: job.target.clone(),
                        // Members: their collection keeps them.
                        pin: false,
                    });
                    asked.push((job, tried));
                }
                None => back.push((job, tried)),
            }
        }
        let store = node.store.clone();
        let outcomes = tokio::task::spawn_blocking(move || store.insert_whole(items))
            .await
            .map_err(|e| Stop::Local(NodeError::Internal(e.to_string())))?
            .map_err(|e| Stop::Local(e.into()))?;
        let mut lied = false;
        let mut present = Vec::new();
        for ((job, tried), o) in asked.into_iter().zip(outcomes) {
            match o {
                WholeOutcome::Stored => {
                    done(job.size);
                    lock(&shared.stored).push(job);
                }
                // Arrived by another path meanwhile: the one-by-one fetch
                // sorts it out (it returns at once for a complete blob).
                WholeOutcome::Present => present.push((job, u8::MAX)),
                WholeOutcome::Corrupt => {
                    lied = true;
                    back.push((job, tried));
                }
            }
        }
        shared.give_back(back, me);
        lock(&shared.queue).extend(present);
        if lied {
            if !bad.swap(true, Ordering::Relaxed) {
                warn!(%peer, "peer sent data that failed verification: dropped and disconnected");
                conn.close(3, b"sent corrupt data");
            }
            return Err(Stop::Peer("sent corrupt data".into()));
        }
        Ok(())
    }
}

/// Up to `most` jobs (at most 256) that provider `me` has not failed, at
/// most `MAX_GET_BLOBS_BYTES` of content; counted in flight when not empty.
fn take_batch(shared: &Shared, me: u8, most: usize) -> Vec<(SmallJob, u8)> {
    let most = most.clamp(1, limits::MAX_HASHES_PER_REQUEST);
    let mut q = lock(&shared.queue);
    let mut batch = Vec::new();
    let mut bytes = 0u64;
    // Jobs this provider failed, passed over: they go back to the front in
    // their order. (Only the jobs taken are moved: rebuilding the whole
    // queue at every batch copied ~13 MB in a 10,000-file get.)
    let mut skipped = Vec::new();
    while batch.len() < most {
        let Some((j, tried)) = q.pop_front() else {
            break;
        };
        if tried & me != 0 {
            skipped.push((j, tried));
            continue;
        }
        if !batch.is_empty() && bytes + j.size > limits::MAX_GET_BLOBS_BYTES {
            q.push_front((j, tried));
            break;
        }
        bytes += j.size;
        batch.push((j, tried));
    }
    for s in skipped.into_iter().rev() {
        q.push_front(s);
    }
    if !batch.is_empty() {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
    }
    batch
}

/// One `GetBlobs` exchange: the content of each job the provider has
/// (unchecked: the store checks it), None for the others.
/// The slowest a batch's bytes may come: [`MIN_BATCH_RATE`], or this
/// exchange's share of the download limit if that is lower (at 16 KiB/s,
/// eight exchanges get 2 KiB/s each, and every batch failed its deadline).
fn min_batch_rate(download_limit: Option<u64>) -> f64 {
    download_limit.map_or(MIN_BATCH_RATE, |l| {
        MIN_BATCH_RATE.min(l as f64 / EXCHANGES_IN_FLIGHT as f64 / 2.0)
    })
}

async fn request(
    conn: &Connection,
    batch: &[(SmallJob, u8)],
    min_rate: f64,
) -> Result<Vec<Option<Bytes>>, BatchError> {
    let batch: Vec<(Hash, u64)> = batch.iter().map(|(j, _)| (j.hash, j.size)).collect();
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let req = pb::Request {
        kind: Some(pb::request::Kind::GetBlobs(pb::GetBlobs {
            hashes: batch
                .iter()
                .map(|(h, _)| h.as_bytes().to_vec().into())
                .collect(),
        })),
    };
    write_frame(&mut send, &req)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    let resp: pb::Response =
        tokio::time::timeout(ANSWER_TIMEOUT, read_frame(&mut recv, Limit::Response))
            .await
            .map_err(|_| "no answer to get-blobs".to_string())?
            .map_err(|e| match e {
                WireError::Io(io) if choked(&io) => BatchError::Busy,
                e => BatchError::Failed(e.to_string()),
            })?;
    let header = match resp.kind {
        Some(pb::response::Kind::GetBlobs(h)) => h,
        Some(pb::response::Kind::Error(e)) => {
            return Err(BatchError::Failed(format!(
                "{}: {}",
                shoal_proto::error_code_name(e.code),
                e.message
            )));
        }
        _ => return Err("unexpected answer to get-blobs".into()),
    };
    if header.blobs.len() != batch.len() {
        return Err("get-blobs answer of the wrong length".into());
    }
    // Sizes come from the verified manifest: a provider that announces
    // another size is wrong, and nothing more is read from it.
    for ((_, size), b) in batch.iter().zip(&header.blobs) {
        if b.found && b.size != *size {
            return Err(BatchError::Failed(format!(
                "provider announced {} bytes for a blob of {}",
                b.size, size
            )));
        }
    }
    let total: u64 = batch
        .iter()
        .zip(&header.blobs)
        .filter(|(_, b)| b.found)
        .map(|((_, size), _)| *size)
        .sum();
    let deadline = tokio::time::Instant::now()
        + ANSWER_TIMEOUT
        + Duration::from_secs_f64(total as f64 / min_rate.max(1.0));
    let mut out = Vec::with_capacity(batch.len());
    let mut pending = Bytes::new();
    for ((_, size), b) in batch.iter().zip(&header.blobs) {
        if !b.found {
            out.push(None);
            continue;
        }
        // Bounded: at most MAX_SMALL_BLOB, checked by `is_small` upstream.
        let want = usize::try_from((*size).min(limits::MAX_SMALL_BLOB)).unwrap_or(0);
        let mut buf = BytesMut::with_capacity(want);
        while buf.len() < want {
            if pending.is_empty() {
                let read = tokio::time::timeout(ANSWER_TIMEOUT, recv.read_chunk(1 << 20));
                pending = match tokio::time::timeout_at(deadline, read).await {
                    Err(_) => {
                        return Err(BatchError::Failed(format!(
                            "provider sent {total} bytes of get-blobs too slowly"
                        )));
                    }
                    Ok(Err(_)) => return Err("provider stalled in get-blobs".into()),
                    Ok(Ok(Err(e))) => {
                        let e = std::io::Error::other(e);
                        return Err(if choked(&e) {
                            BatchError::Busy
                        } else {
                            BatchError::Failed(e.to_string())
                        });
                    }
                    Ok(Ok(Ok(None))) => return Err("get-blobs answer truncated".into()),
                    Ok(Ok(Ok(Some(c)))) => c,
                };
            }
            let n = (want - buf.len()).min(pending.len());
            buf.extend_from_slice(&pending.split_to(n));
        }
        out.push(Some(buf.freeze()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_batch_gets_time_for_its_share_of_a_download_limit() {
        assert_eq!(min_batch_rate(None), MIN_BATCH_RATE);
        assert_eq!(min_batch_rate(Some(100 << 20)), MIN_BATCH_RATE);
        // Every exchange in flight at once, each at half its share of
        // the limit, is still within its deadline.
        for limit in [1024u64, 16 * 1024, 64 * 1024] {
            let share = limit as f64 / EXCHANGES_IN_FLIGHT as f64;
            assert!(min_batch_rate(Some(limit)) <= share / 2.0, "{limit}");
        }
    }

    fn shared(jobs: Vec<(SmallJob, u8)>) -> Shared {
        Shared {
            queue: std::sync::Mutex::new(jobs.into_iter().collect()),
            in_flight: AtomicUsize::new(0),
            ends: AtomicUsize::new(0),
            ended: tokio::sync::Notify::new(),
            stored: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn job(i: u8, size: u64) -> SmallJob {
        SmallJob {
            hash: Hash::from_bytes([i; 32]),
            size,
            target: None,
        }
    }

    fn ids(jobs: &[(SmallJob, u8)]) -> Vec<u8> {
        jobs.iter().map(|(j, _)| j.hash.as_bytes()[0]).collect()
    }

    fn queued(s: &Shared) -> Vec<u8> {
        let q = lock(&s.queue);
        q.iter().map(|(j, _)| j.hash.as_bytes()[0]).collect()
    }

    #[test]
    fn a_batch_takes_jobs_in_order_and_passes_over_those_the_provider_failed() {
        // Provider 1 (bit 0b01) failed jobs 1 and 3; provider 2 none.
        let jobs = (0..8u8)
            .map(|i| (job(i, 100), if i == 1 || i == 3 { 0b01 } else { 0 }))
            .collect();
        let s = shared(jobs);
        let b = take_batch(&s, 0b01, 3);
        assert_eq!(ids(&b), [0, 2, 4]);
        // What was passed over stays at the front, in order.
        assert_eq!(queued(&s), [1, 3, 5, 6, 7]);
        assert_eq!(s.in_flight.load(Ordering::SeqCst), 1);
        let b = take_batch(&s, 0b10, 2);
        assert_eq!(ids(&b), [1, 3]);
        assert_eq!(queued(&s), [5, 6, 7]);
        assert_eq!(s.in_flight.load(Ordering::SeqCst), 2);
        // Nothing this provider may take: an empty batch, not counted.
        let s = shared(vec![(job(9, 100), 0b01)]);
        assert!(take_batch(&s, 0b01, 8).is_empty());
        assert_eq!(queued(&s), [9]);
        assert_eq!(s.in_flight.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_batch_stops_at_its_byte_budget_but_always_takes_one_job() {
        let big = limits::MAX_GET_BLOBS_BYTES / 2 + 1;
        let s = shared((0..4u8).map(|i| (job(i, big), 0)).collect());
        let b = take_batch(&s, 0b01, 256);
        assert_eq!(ids(&b), [0]);
        assert_eq!(queued(&s), [1, 2, 3]);
        // At most 256 hashes, whatever is asked.
        let s = shared((0..=255u8).chain(0..10).map(|i| (job(i, 1), 0)).collect());
        assert_eq!(
            take_batch(&s, 0b01, 10_000).len(),
            limits::MAX_HASHES_PER_REQUEST
        );
        assert_eq!(lock(&s.queue).len(), 266 - limits::MAX_HASHES_PER_REQUEST);
    }
}
