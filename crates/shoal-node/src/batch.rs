//! The small members of a collection, fetched many at a time.
//!
//! A directory of thousands of small files would cost, through the per-blob
//! download, a dial-and-ask, a get and several durable commits per file.
//! Here the providers of the collection (the peers that held all of its
//! manifest) are asked for up to 256 small blobs per `GetBlobs` exchange,
//! two exchanges in flight per provider; each answer is checked blob by
//! blob against its hash and stored as one batch. Whatever a provider does
//! not have, or sends wrong, is handed back to the caller to be fetched one
//! by one the usual way (which finds other peers); a provider that sends a
//! blob that does not match its hash is dropped.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use shoal_proto::{Limit, limits, pb};
use shoal_store::{Hash, WholeBlob, WholeOutcome};
use shoal_transport::Connection;
use tracing::{debug, warn};

use crate::error::NodeError;
use crate::node::{Inner, lock};
use crate::wire::{read_frame, write_frame};

/// `GetBlobs` exchanges in flight per provider: one is on the wire while
/// the previous answer is written to disk.
const EXCHANGES_PER_PEER: usize = 2;
/// Providers used at once.
const MAX_PROVIDERS: usize = 4;
/// Time a provider gets to answer, and between two pieces of an answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

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
/// each blob is stored. Returns the jobs that were not fetched this way,
/// with the hashes that were stored into their targets.
pub(crate) async fn fetch_small(
    node: &Arc<Inner>,
    providers: &[Connection],
    jobs: Vec<SmallJob>,
    done: &(dyn Fn(u64) + Sync),
) -> Result<(Vec<SmallJob>, Vec<SmallJob>), NodeError> {
    let queue = std::sync::Mutex::new(VecDeque::from(jobs));
    let leftovers = std::sync::Mutex::new(Vec::new());
    let stored = std::sync::Mutex::new(Vec::new());
    let providers: Vec<(&Connection, AtomicBool)> = providers
        .iter()
        .take(MAX_PROVIDERS)
        .map(|c| (c, AtomicBool::new(false)))
        .collect();
    let mut workers = Vec::new();
    for (conn, bad) in &providers {
        for _ in 0..EXCHANGES_PER_PEER {
            workers.push(worker(node, conn, bad, &queue, &leftovers, &stored, done));
        }
    }
    futures::future::try_join_all(workers).await?;
    let mut rest = lock(&leftovers).split_off(0);
    rest.extend(lock(&queue).drain(..));
    let stored = lock(&stored).split_off(0);
    Ok((rest, stored))
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    node: &Arc<Inner>,
    conn: &Connection,
    bad: &AtomicBool,
    queue: &std::sync::Mutex<VecDeque<SmallJob>>,
    leftovers: &std::sync::Mutex<Vec<SmallJob>>,
    stored: &std::sync::Mutex<Vec<SmallJob>>,
    done: &(dyn Fn(u64) + Sync),
) -> Result<(), NodeError> {
    let peer = conn.peer_id();
    loop {
        if bad.load(Ordering::Relaxed) || conn.is_closed() {
            return Ok(());
        }
        let batch = take_batch(queue);
        if batch.is_empty() {
            return Ok(());
        }
        let datas = match request(conn, &batch).await {
            Ok(d) => d,
            Err(e) => {
                debug!(%peer, "batch get failed: {e}");
                lock(leftovers).extend(batch);
                return Ok(());
            }
        };
        let received: u64 = datas.iter().flatten().map(|d| d.len() as u64).sum();
        lock(&node.book).count_download(peer, received);
        let mut items = Vec::new();
        let mut asked = Vec::new();
        for (job, data) in batch.into_iter().zip(datas) {
            match data {
                Some(data) => {
                    items.push(WholeBlob {
                        hash: job.hash,
                        data,
                        target: job.target.clone(),
                    });
                    asked.push(job);
                }
                None => lock(leftovers).push(job),
            }
        }
        let store = node.store.clone();
        let outcomes = tokio::task::spawn_blocking(move || store.insert_whole(items))
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))??;
        for (job, o) in asked.into_iter().zip(outcomes) {
            match o {
                WholeOutcome::Stored => {
                    done(job.size);
                    lock(stored).push(job);
                }
                WholeOutcome::Present => lock(leftovers).push(job),
                WholeOutcome::Corrupt => {
                    if !bad.swap(true, Ordering::Relaxed) {
                        warn!(%peer, hash = %job.hash, "peer sent data that failed verification: dropped and disconnected");
                        conn.close(3, b"sent corrupt data");
                    }
                    lock(leftovers).push(job);
                }
            }
        }
    }
}

/// Up to 256 jobs, at most `MAX_GET_BLOBS_BYTES` of content.
fn take_batch(queue: &std::sync::Mutex<VecDeque<SmallJob>>) -> Vec<SmallJob> {
    let mut q = lock(queue);
    let mut batch = Vec::new();
    let mut bytes = 0u64;
    while let Some(j) = q.front() {
        if batch.len() == limits::MAX_HASHES_PER_REQUEST
            || (!batch.is_empty() && bytes + j.size > limits::MAX_GET_BLOBS_BYTES)
        {
            break;
        }
        bytes += j.size;
        if let Some(j) = q.pop_front() {
            batch.push(j);
        }
    }
    batch
}

/// One `GetBlobs` exchange: the content of each job the provider has
/// (unchecked: the store checks it), None for the others.
async fn request(conn: &Connection, batch: &[SmallJob]) -> Result<Vec<Option<Bytes>>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let req = pb::Request {
        kind: Some(pb::request::Kind::GetBlobs(pb::GetBlobs {
            hashes: batch
                .iter()
                .map(|j| j.hash.as_bytes().to_vec().into())
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
            .map_err(|e| e.to_string())?;
    let header = match resp.kind {
        Some(pb::response::Kind::GetBlobs(h)) => h,
        Some(pb::response::Kind::Error(e)) => {
            return Err(format!(
                "{}: {}",
                shoal_proto::error_code_name(e.code),
                e.message
            ));
        }
        _ => return Err("unexpected answer to get-blobs".into()),
    };
    if header.blobs.len() != batch.len() {
        return Err("get-blobs answer of the wrong length".into());
    }
    // Sizes come from the verified manifest: a provider that announces
    // another size is wrong, and nothing more is read from it.
    for (job, b) in batch.iter().zip(&header.blobs) {
        if b.found && b.size != job.size {
            return Err(format!(
                "provider announced {} bytes for a blob of {}",
                b.size, job.size
            ));
        }
    }
    let mut out = Vec::with_capacity(batch.len());
    let mut pending = Bytes::new();
    for (job, b) in batch.iter().zip(&header.blobs) {
        if !b.found {
            out.push(None);
            continue;
        }
        // Bounded: at most MAX_SMALL_BLOB, checked by `is_small` upstream.
        let want = usize::try_from(job.size.min(limits::MAX_SMALL_BLOB)).unwrap_or(0);
        let mut buf = BytesMut::with_capacity(want);
        while buf.len() < want {
            if pending.is_empty() {
                pending = match tokio::time::timeout(ANSWER_TIMEOUT, recv.read_chunk(1 << 20)).await
                {
                    Err(_) => return Err("provider stalled in get-blobs".into()),
                    Ok(Err(e)) => return Err(e.to_string()),
                    Ok(Ok(None)) => return Err("get-blobs answer truncated".into()),
                    Ok(Ok(Some(c))) => c,
                };
            }
            let n = (want - buf.len()).min(pending.len());
            buf.extend_from_slice(&pending.split_to(n));
        }
        out.push(Some(buf.freeze()));
    }
    Ok(out)
}
