//! The local control socket: how `shoal` commands act on a running node.
//!
//! A Unix socket `control.sock` in the data dir (mode 0600), speaking the
//! `ControlRequest`/`ControlResponse` messages of `proto/shoal/v1/control.proto`
//! in the same frames as the peer protocol. One request per connection; the
//! node answers with any number of responses ending in `done` or `error`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use shoal_proto::{Limit, hash_from_bytes, pb};
use shoal_store::{BlobKind, Hash, ImportMode};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tracing::debug;

use crate::Progress;
use crate::error::NodeError;
use crate::fetch::{FetchOutput, FetchRequest};
use crate::node::{Node, PeerAddr};
use crate::wire::{WireError, read_frame, write_frame};

/// The socket's file name in the data dir.
pub const SOCKET_NAME: &str = "control.sock";

/// A `VerifyItem`'s `detail` for a hash the store does not hold.
pub const VERIFY_NOT_IN_STORE: &str = "not in the store";

/// A `VerifyItem`'s `detail` for a blob that could not be checked:
/// [`VERIFY_NOT_IN_STORE`], or the error.
pub fn verify_failure(e: &shoal_store::StoreError) -> String {
    match e {
        shoal_store::StoreError::NotFound(_) => VERIFY_NOT_IN_STORE.into(),
        e => e.to_string(),
    }
}

/// Binds the control socket, refusing if a live node already answers on it
/// and removing a stale one.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, NodeError> {
    // A Unix socket's path holds at most 107 bytes (`sun_path`, less its
    // NUL); the OS's own error ("path must be shorter than SUN_LEN") says
    // nothing of what to do.
    if path.as_os_str().len() > 107 {
        return Err(NodeError::Control(
            path.to_path_buf(),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the path is {} bytes, more than the 107 a Unix socket takes: use a shorter --data-dir",
                    path.as_os_str().len()
                ),
            ),
        ));
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(NodeError::AlreadyRunning(
                path.parent().unwrap_or(path).to_path_buf(),
            ));
        }
        std::fs::remove_file(path).map_err(|e| NodeError::Control(path.to_path_buf(), e))?;
    }
    let l = UnixListener::bind(path).map_err(|e| NodeError::Control(path.to_path_buf(), e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(l)
}

/// Serves control connections until the node stops.
pub(crate) async fn serve(node: Node, listener: UnixListener) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            () = node.cancelled() => return,
        };
        match conn {
            Ok((stream, _)) => {
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(node, stream).await {
                        debug!("control connection: {e}");
                    }
                });
            }
            Err(e) => {
                debug!("control accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Counts a control request down when dropped.
struct Taken<'a>(&'a Node);

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.0
            .inner
            .control_requests
            .send_modify(|r| r.running = r.running.saturating_sub(1));
    }
}

fn resp(kind: pb::control_response::Kind) -> pb::ControlResponse {
    pb::ControlResponse { kind: Some(kind) }
}

fn error(msg: impl std::fmt::Display) -> pb::ControlResponse {
    resp(pb::control_response::Kind::Error(pb::Error {
        code: pb::ErrorCode::Internal as i32,
        message: msg.to_string(),
    }))
}

/// The node is stopping: it did not take the request on, or could not
/// finish it (code BUSY, see `control.proto`).
fn busy() -> pb::ControlResponse {
    resp(pb::control_response::Kind::Error(pb::Error {
        code: pb::ErrorCode::Busy as i32,
        message: NodeError::ShuttingDown.to_string(),
    }))
}

fn done() -> pb::ControlResponse {
    resp(pb::control_response::Kind::Done(pb::Done {}))
}

fn parse_hash(b: &[u8]) -> Result<Hash, NodeError> {
    hash_from_bytes(b)
        .map(Hash::from_bytes)
        .map_err(|e| NodeError::Protocol(e.to_string()))
}

pub(crate) fn kind_to_pb(k: BlobKind) -> i32 {
    match k {
        BlobKind::Collection => pb::BlobKind::Collection as i32,
        _ => pb::BlobKind::Raw as i32,
    }
}

/// One blob as `shoal ls` lists it, whether it comes from a running node
/// or from the store opened directly. Costs a `stat` for a file in place
/// (to tell whether it changed since it was added). `kept`: what the
/// store's pinned collections name ([`shoal_store::Store::kept_by_collections`]),
/// listed as pinned since gc keeps it.
pub fn store_item(
    store: &shoal_store::Store,
    kept: &std::collections::HashSet<Hash>,
    b: shoal_store::BlobInfo,
) -> pb::StoreItem {
    let (content_size, content_verified, files) = if b.kind == BlobKind::Collection && b.complete {
        content_of(store, &b.hash)
    } else {
        (0, 0, 0)
    };
    pb::StoreItem {
        content_size,
        content_verified,
        files,
        hash: b.hash.as_bytes().to_vec().into(),
        size: b.size,
        complete: b.complete,
        verified: if b.complete {
            b.size
        } else {
            b.verified.bytes_of(b.size)
        },
        kind: kind_to_pb(b.kind),
        changed: !b.corrupt && store.source_changed(&b.hash),
        corrupt: b.corrupt,
        // What gc keeps: pinned itself, or named by a pinned collection.
        pinned: b.pinned || kept.contains(&b.hash),
        name: b.name,
    }
}

/// The bytes and files the manifest of the collection `hash` names (each
/// distinct member once), and the bytes of them the store holds verified
/// (not a member found corrupt, nor a file in place changed or gone);
/// zeros if the manifest cannot be read.
fn content_of(store: &shoal_store::Store, hash: &Hash) -> (u64, u64, u32) {
    let Ok(entries) = store.read_manifest(hash) else {
        return (0, 0, 0);
    };
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    let (mut size, mut verified, mut files) = (0u64, 0u64, 0u32);
    for e in entries.iter().filter(|e| !e.empty_dir) {
        files = files.saturating_add(1);
        if !seen.insert(e.hash) {
            continue;
        }
        size = size.saturating_add(e.size);
        verified = verified.saturating_add(match store.info(&e.hash) {
            // Not there to serve or write out.
            Some(i) if i.corrupt || (i.complete && store.source_changed(&e.hash)) => 0,
            Some(i) if i.complete => e.size,
            Some(i) => i.verified.bytes_of(e.size),
            None => 0,
        });
    }
    (size, verified, files)
}

fn kind_from_pb(k: i32) -> BlobKind {
    if k == pb::BlobKind::Collection as i32 {
        BlobKind::Collection
    } else {
        BlobKind::Raw
    }
}

async fn handle(node: Node, mut stream: UnixStream) -> Result<(), WireError> {
    let req: pb::ControlRequest = read_frame(&mut stream, Limit::ControlRequest).await?;
    use pb::control_request::Kind as Req;
    use pb::control_response::Kind as Resp;
    let Some(kind) = req.kind else {
        return write_frame(&mut stream, &error("unknown control request")).await;
    };
    // A request on the store or a download is taken on and counted in
    // one step, unless the node is stopping (`Node::close_control`): then
    // the client is told so, and makes it again of whichever node runs
    // next, or of the store itself. A status, a peer list or a ticket is
    // only about this node: answered while it runs, and not waited for.
    let retried_elsewhere = matches!(
        kind,
        Req::Add(_) | Req::List(_) | Req::Remove(_) | Req::Get(_) | Req::Gc(_) | Req::Verify(_)
    );
    let _taken = if retried_elsewhere {
        let taken = node.inner.control_requests.send_if_modified(|r| {
            if !r.closed {
                r.running += 1;
            }
            !r.closed
        });
        if !taken {
            return write_frame(&mut stream, &busy()).await;
        }
        // Counted down once the answer's last frame is written, however
        // it ends (before that, a node stopping could cut the error frame
        // off, and the client would take it for a node gone and ask
        // again).
        Some(Taken(&node))
    } else {
        None
    };
    let result: Result<(), NodeError> = async {
        match kind {
            Req::Add(a) => {
                let mode = if a.copy {
                    ImportMode::Copy
                } else {
                    ImportMode::InPlace
                };
                for p in a.paths {
                    let item = match node.add_path(Path::new(&p), mode).await {
                        Ok((hash, kind)) => {
                            crate::node::lock(&node.inner.asked_through_control).insert(hash);
                            pb::AddedItem {
                                hash: hash.as_bytes().to_vec().into(),
                                path: p,
                                kind: kind_to_pb(kind),
                                error: String::new(),
                            }
                        }
                        Err(e) => pb::AddedItem {
                            path: p,
                            error: e.to_string(),
                            ..Default::default()
                        },
                    };
                    write_frame(&mut stream, &resp(Resp::Added(item))).await?;
                }
            }
            Req::List(_) => {
                let store = node.store();
                let kept = store.kept_by_collections();
                for b in store.list() {
                    let item = store_item(store, &kept, b);
                    write_frame(&mut stream, &resp(Resp::Item(item))).await?;
                }
            }
            Req::Remove(r) => {
                // Each one there is unpinned; those that are not are named
                // (the first stopped the rest).
                let mut missing = Vec::new();
                for h in r.hashes {
                    let h = parse_hash(&h)?;
                    match node.unpin(&h) {
                        Ok(()) => {}
                        Err(NodeError::Store(shoal_store::StoreError::NotFound(_))) => {
                            missing.push(h.to_string());
                        }
                        Err(e) => return Err(e),
                    }
                }
                if !missing.is_empty() {
                    return Err(NodeError::Refused(format!(
                        "not in the store: {} (the others given were unpinned)",
                        missing.join(", ")
                    )));
                }
            }
            Req::Gc(_) => {
                // Blocking (files unlinked, adds waited for): off the
                // async workers.
                let store = node.store().clone();
                let r = tokio::task::spawn_blocking(move || store.gc())
                    .await
                    .map_err(|e| NodeError::Internal(e.to_string()))??;
                write_frame(
                    &mut stream,
                    &resp(Resp::Gc(pb::GcReport {
                        blobs: r.blobs,
                        bytes: r.bytes,
                    })),
                )
                .await?;
            }
            Req::Verify(v) => {
                let hashes: Vec<Hash> = if v.hashes.is_empty() {
                    node.store().list().into_iter().map(|b| b.hash).collect()
                } else {
                    let asked = v
                        .hashes
                        .iter()
                        .map(|h| parse_hash(h))
                        .collect::<Result<Vec<_>, _>>()?;
                    let store = node.store().clone();
                    tokio::task::spawn_blocking(move || store.with_members(&asked))
                        .await
                        .map_err(|e| NodeError::Internal(e.to_string()))?
                };
                for h in hashes {
                    let store = node.store().clone();
                    let ok = match tokio::task::spawn_blocking(move || store.verify(&h))
                        .await
                        .map_err(|e| NodeError::Internal(e.to_string()))?
                    {
                        Ok(ok) => ok,
                        // Named, and the others still checked.
                        Err(e) => {
                            let item = pb::VerifyItem {
                                hash: h.as_bytes().to_vec().into(),
                                ok: false,
                                detail: verify_failure(&e),
                            };
                            write_frame(&mut stream, &resp(Resp::Verified(item))).await?;
                            continue;
                        }
                    };
                    if ok {
                        // Whatever the node's own re-hash of it said before
                        // (see `server::recheck`), the next change of its
                        // file is re-hashed again.
                        crate::node::lock(&node.inner.rechecking).remove(&h);
                    }
                    let item = pb::VerifyItem {
                        hash: h.as_bytes().to_vec().into(),
                        ok,
                        detail: String::new(),
                    };
                    write_frame(&mut stream, &resp(Resp::Verified(item))).await?;
                }
            }
            Req::Ticket(t) => {
                let ticket = node.ticket(&parse_hash(&t.hash)?)?;
                write_frame(&mut stream, &resp(Resp::Ticket(ticket.to_string()))).await?;
            }
            Req::Status(_) => {
                let stats = node.endpoint().stats();
                let (cached_blobs, cached_bytes) = node.store().served_cache_usage();
                // One sample for both.
                let (upload_rate, download_rate) = node.rates();
                let status = pb::NodeStatus {
                    peer_id: node.peer_id().to_string(),
                    listen_addrs: node.addrs().iter().map(|a| a.to_string()).collect(),
                    transfers: node
                        .transfers()
                        .into_iter()
                        .map(|t| pb::Transfer {
                            hash: t.hash.as_bytes().to_vec().into(),
                            verified: t.progress.verified,
                            total: t.progress.total,
                            peers: t.progress.peers,
                            rate: t.progress.rate,
                        })
                        .collect(),
                    uploaded: stats.bytes_sent,
                    downloaded: stats.bytes_received,
                    served_cache_blobs: cached_blobs as u64,
                    served_cache_bytes: cached_bytes as u64,
                    served_cache_budget: node.store().served_cache_budget() as u64,
                    short_lived: node.inner.config.short_lived,
                    mdns: node.inner.config.discovery.mdns,
                    dht: node.inner.config.discovery.dht,
                    announce: node.inner.config.discovery.announce,
                    max_upload: node.inner.config.upload_limit.unwrap_or(0),
                    max_download: node.inner.config.download_limit.unwrap_or(0),
                    stall_timeout_secs: node.inner.config.stall_timeout.as_secs(),
                    upload_rate,
                    download_rate,
                    connected_peers: u32::try_from(node.inner.endpoint.connections().len())
                        .unwrap_or(u32::MAX),
                };
                write_frame(&mut stream, &resp(Resp::Status(status))).await?;
            }
            Req::Peers(_) => {
                for p in node.peers() {
                    let ps = pb::PeerStatus {
                        peer_id: p.id.to_string(),
                        addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
                        connected: p.connected,
                        uploaded: p.counters.uploaded,
                        downloaded: p.counters.downloaded,
                        upload_rate: p.upload_rate,
                        download_rate: p.download_rate,
                    };
                    write_frame(&mut stream, &resp(Resp::Peer(ps))).await?;
                }
            }
            Req::Get(g) => get(&node, &mut stream, g).await?,
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => write_frame(&mut stream, &done()).await,
        // Said apart from other errors: the client may make the request
        // again once this node is gone (a download resumes).
        Err(NodeError::ShuttingDown) => write_frame(&mut stream, &busy()).await,
        Err(e) => write_frame(&mut stream, &error(e)).await,
    }
}

async fn get(node: &Node, stream: &mut UnixStream, g: pb::GetRequest) -> Result<(), NodeError> {
    let hash = parse_hash(&g.hash)?;
    crate::node::lock(&node.inner.asked_through_control).insert(hash);
    let mut peers = Vec::new();
    for p in &g.peers {
        let id = hash_from_bytes(&p.id)
            .ok()
            .and_then(|b| shoal_transport::PeerId::from_bytes(&b).ok());
        for a in &p.addrs {
            if let Ok(addr) = a.parse() {
                peers.push(PeerAddr { id, addr });
            }
        }
    }
    for a in &g.addrs {
        peers.push(a.parse::<PeerAddr>()?);
    }
    let kind = match g.kind {
        k if k == pb::BlobKind::Collection as i32 => Some(BlobKind::Collection),
        // Raw is the default value: only trust it when the caller had a ticket.
        _ if !g.peers.is_empty() => Some(kind_from_pb(g.kind)),
        _ => None,
    };
    let (data_tx, mut data_rx) = mpsc::channel::<Bytes>(8);
    let out = if g.stream {
        FetchOutput::Stream(data_tx)
    } else if g.out.is_empty() {
        drop(data_tx);
        FetchOutput::Store
    } else {
        drop(data_tx);
        FetchOutput::Path(PathBuf::from(&g.out))
    };
    let (ptx, mut prx) = watch::channel(Progress::default());
    let n = node.clone();
    let req = FetchRequest {
        hash,
        kind,
        peers,
        out,
    };
    // The fetch runs on its own: if the client goes away the node still
    // completes the download.
    let mut task = tokio::spawn(async move { n.fetch(req, Some(ptx)).await });
    use pb::control_response::Kind as Resp;
    let mut client_gone = false;
    loop {
        tokio::select! {
            r = &mut task => {
                // Flush what the stream still holds.
                while let Ok(d) = data_rx.try_recv() {
                    if !client_gone && write_frame(stream, &resp(Resp::Data(d))).await.is_err() { client_gone = true }
                }
                return match r {
                    Ok(Ok(report)) => {
                        let fetched = pb::FetchedReport {
                            hash: report.hash.as_bytes().to_vec().into(),
                            kind: kind_to_pb(report.kind),
                            bytes: report.bytes,
                            files: report.files,
                            micros: u64::try_from(report.elapsed.as_micros()).unwrap_or(u64::MAX),
                            received: report.received,
                        };
                        if !client_gone {
                            // The client may have gone meanwhile: the
                            // download is done all the same.
                            let _ = write_frame(stream, &resp(Resp::Fetched(fetched))).await;
                        }
                        Ok(())
                    }
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(NodeError::Internal(e.to_string())),
                };
            }
            Some(d) = data_rx.recv() => {
                if !client_gone && write_frame(stream, &resp(Resp::Data(d))).await.is_err() {
                    client_gone = true;
                }
            }
            Ok(()) = prx.changed() => {
                let p = prx.borrow_and_update().clone();
                let msg = pb::Progress { verified: p.verified, total: p.total, peers: p.peers, rate: p.rate, files_done: p.files_done, files_total: p.files_total };
                if !client_gone && write_frame(stream, &resp(Resp::Progress(msg))).await.is_err() {
                    client_gone = true;
                }
            }
        }
    }
}

/// A connection to a running node's control socket.
#[derive(Debug)]
pub struct ControlClient {
    stream: UnixStream,
}

impl ControlClient {
    /// Connects to the node running on `data_dir`, or returns `None` when
    /// none runs there.
    pub async fn connect(data_dir: &Path) -> Option<ControlClient> {
        let path = data_dir.join(SOCKET_NAME);
        UnixStream::connect(&path)
            .await
            .ok()
            .map(|stream| ControlClient { stream })
    }

    /// Sends the one request of this connection.
    pub async fn send(&mut self, req: pb::control_request::Kind) -> Result<(), NodeError> {
        write_frame(&mut self.stream, &pb::ControlRequest { kind: Some(req) }).await?;
        Ok(())
    }

    /// The next response; `Ok(None)` after `done`, an error after `error`.
    pub async fn next(&mut self) -> Result<Option<pb::control_response::Kind>, NodeError> {
        let r: pb::ControlResponse = read_frame(&mut self.stream, Limit::ControlResponse).await?;
        match r.kind {
            Some(pb::control_response::Kind::Done(_)) => Ok(None),
            Some(pb::control_response::Kind::Error(e)) if e.code == pb::ErrorCode::Busy as i32 => {
                Err(NodeError::ShuttingDown)
            }
            Some(pb::control_response::Kind::Error(e)) => Err(NodeError::Refused(e.message)),
            Some(k) => Ok(Some(k)),
            None => Err(NodeError::Protocol("empty control response".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_path_too_long_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(120)).join(SOCKET_NAME);
        let err = bind(&deep).unwrap_err().to_string();
        assert!(err.contains("use a shorter --data-dir"), "{err}");
        let short = dir.path().join(SOCKET_NAME);
        assert!(bind(&short).is_ok());
    }

    /// Asks `dir`'s node for `hash` (held in its store, so done at once);
    /// the first error, or the report.
    async fn get_of(dir: &Path, hash: &Hash) -> Result<Option<pb::FetchedReport>, NodeError> {
        let mut c = ControlClient::connect(dir)
            .await
            .expect("the control socket");
        c.send(pb::control_request::Kind::Get(pb::GetRequest {
            hash: hash.as_bytes().to_vec().into(),
            ..Default::default()
        }))
        .await?;
        let mut report = None;
        while let Some(k) = c.next().await? {
            if let pb::control_response::Kind::Fetched(r) = k {
                report = Some(r);
            }
        }
        Ok(report)
    }

    #[tokio::test]
    async fn a_node_that_takes_no_more_requests_says_it_is_stopping() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::spawn(crate::NodeConfig {
            data_dir: Some(dir.path().to_path_buf()),
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            ..crate::NodeConfig::default()
        })
        .await
        .unwrap();
        let hash = node.add_bytes(vec![7u8; 5000], "x").await.unwrap();
        // Taken on while open, and counted down when done.
        let report = get_of(dir.path(), &hash).await.unwrap().expect("a report");
        assert_eq!(report.bytes, 5000);
        assert_eq!(node.control_requests(), 0);
        assert_eq!(node.close_control(), 0);
        // Closed: the socket still answers, but a get is refused as a
        // request the client may make again elsewhere, and nothing is
        // counted.
        let err = get_of(dir.path(), &hash).await.unwrap_err();
        assert!(matches!(err, NodeError::ShuttingDown), "{err}");
        assert!(err.is_node_gone());
        assert_eq!(node.control_requests(), 0);
        // So is any other request on the store.
        let mut c = ControlClient::connect(dir.path()).await.unwrap();
        c.send(pb::control_request::Kind::List(pb::ListRequest {}))
            .await
            .unwrap();
        assert!(matches!(c.next().await, Err(NodeError::ShuttingDown)));
        // What is only about the node is still answered.
        let mut c = ControlClient::connect(dir.path()).await.unwrap();
        c.send(pb::control_request::Kind::Status(pb::StatusRequest {}))
            .await
            .unwrap();
        assert!(matches!(
            c.next().await,
            Ok(Some(pb::control_response::Kind::Status(_)))
        ));
        node.shutdown().await;
    }
}
