//! The endpoint: sockets, authenticated QUIC connections, one connection per
//! pair of peers, and the caps that keep a busy node's memory bounded.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, IdleTimeout, TransportErrorCode, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::TransportError;
use crate::fault::{FaultConfig, FaultySocket};
use crate::identity::{PeerId, SecretKey};
use crate::rate::Limiter;
use crate::stream::{Accounting, Counters, RecvStream, SendStream, Shared, Stats};
use crate::tls::{self, PeerFilter, ServerVerifier};

/// Application close code: the connection lost to another connection
/// between the same two peers and was closed; use the other one
/// ([`Endpoint::connection`]).
pub const CLOSE_DUPLICATE: u32 = 0x5d_0001;
/// Application close code: the endpoint is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 0x5d_0002;
/// Connections a peer dialed that one peer may hold open at once beside
/// the one kept (see `register`).
const MAX_PEER_DIALED: usize = 2;
/// Application close code: the peer started again, and this connection is
/// its earlier run's (closed by the layer above, which can tell).
pub const CLOSE_REPLACED: u32 = 0x5d_0003;

/// Receive window of one stream: how much a peer may send ahead on one
/// stream before the reader reads it.
pub const STREAM_RECEIVE_WINDOW: u32 = 8 << 20;
/// Receive window of a whole connection: with [`EndpointConfig::max_connections`]
/// it bounds the memory that peers can make this node buffer.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 12 << 20;
/// How much a connection buffers for sending ahead of acknowledgements.
pub const SEND_WINDOW: u64 = 12 << 20;
/// Bounds of how long [`Endpoint::close`] waits for its close frames.
const CLOSE_WAIT_MIN: Duration = Duration::from_millis(10);
const CLOSE_WAIT_MAX: Duration = Duration::from_secs(1);
/// How long [`Endpoint::close`] looks after each turn of the scheduler
/// before it sleeps between looks.
const CLOSE_WAIT_SPIN: Duration = Duration::from_millis(2);

/// The congestion controller of every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Congestion {
    /// CUBIC (RFC 8312), loss based.
    #[default]
    Cubic,
    /// BBR (quinn's experimental implementation), model based.
    Bbr,
    /// NewReno, the RFC 9002 baseline.
    NewReno,
}

/// How an [`Endpoint`] listens and what it allows.
#[derive(Clone)]
pub struct EndpointConfig {
    /// Addresses to listen on; port 0 picks a free port. `[::]` listens on
    /// IPv6 and IPv4 (dual-stack) where the OS allows, else on two sockets.
    pub listen: Vec<SocketAddr>,
    /// Most connections open at once, incoming and outgoing together
    /// (handshakes in progress count); further incoming ones are refused.
    pub max_connections: usize,
    /// Most streams a peer may have open at once on one connection, per
    /// direction type (bidirectional and unidirectional each); a peer that
    /// opens more waits.
    pub max_streams_per_connection: u32,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// How often an otherwise quiet connection sends a keep-alive (zero:
    /// never).
    pub keep_alive: Duration,
    /// Longest a handshake may take.
    pub handshake_timeout: Duration,
    /// Global upload limit, bytes per second, over all streams.
    pub upload_limit: Option<u64>,
    /// Global download limit, bytes per second, over all streams.
    pub download_limit: Option<u64>,
    /// Faults to inject in the packets sent (tests only).
    pub fault: Option<FaultConfig>,
    /// Which peers may connect to this node (after proving their key); none
    /// means all.
    pub peer_filter: Option<PeerFilter>,
    /// Congestion controller.
    pub congestion: Congestion,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            listen: vec![SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))],
            max_connections: 128,
            max_streams_per_connection: 64,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            upload_limit: None,
            download_limit: None,
            fault: None,
            peer_filter: None,
            congestion: Congestion::default(),
        }
    }
}

impl fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("listen", &self.listen)
            .field("max_connections", &self.max_connections)
            .field(
                "max_streams_per_connection",
                &self.max_streams_per_connection,
            )
            .field("idle_timeout", &self.idle_timeout)
            .field("keep_alive", &self.keep_alive)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("upload_limit", &self.upload_limit)
            .field("download_limit", &self.download_limit)
            .field("fault", &self.fault)
            .field("peer_filter", &self.peer_filter.is_some())
            .field("congestion", &self.congestion)
            .finish()
    }
}

/// One bound UDP socket and the QUIC endpoint on it.
#[derive(Debug)]
struct Socket {
    quic: quinn::Endpoint,
    addr: SocketAddr,
    dual_stack: bool,
}

struct Inner {
    secret: SecretKey,
    id: PeerId,
    provider: Arc<CryptoProvider>,
    key: Arc<CertifiedKey>,
    transport: Arc<quinn::TransportConfig>,
    sockets: Vec<Socket>,
    conns: Mutex<HashMap<PeerId, Vec<Connection>>>,
    dials: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
    permits: Arc<Semaphore>,
    max_connections: usize,
    handshake_timeout: Duration,
    accept_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Connection>>,
    accept_tx: mpsc::UnboundedSender<Connection>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    /// Woken whenever a connection is registered.
    registered: tokio::sync::Notify,
    /// Connections closed as duplicates, for tests and diagnostics.
    duplicates: std::sync::atomic::AtomicUsize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
        for socket in &self.sockets {
            socket
                .quic
                .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"endpoint closed");
        }
    }
}

/// A node's network presence: its identity, its sockets, and its
/// connections to other peers. Cheap to clone.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.inner.id)
            .field("addrs", &self.local_addrs())
            .finish_non_exhaustive()
    }
}

/// The receive windows (connection, stream) under `download_limit`: about
/// a second of traffic at the limit (at least 64 KiB), so that peers send
/// about as fast as this node reads; with the full windows a peer sent
/// 12 MiB at line rate before the limit was felt, then bursts.
fn receive_windows(download_limit: Option<u64>) -> (u32, u32) {
    match download_limit {
        None => (CONNECTION_RECEIVE_WINDOW, STREAM_RECEIVE_WINDOW),
        Some(limit) => {
            let conn = u32::try_from(limit.clamp(64 << 10, u64::from(CONNECTION_RECEIVE_WINDOW)))
                .unwrap_or(CONNECTION_RECEIVE_WINDOW);
            (conn, conn.min(STREAM_RECEIVE_WINDOW))
        }
    }
}

fn transport_config(config: &EndpointConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let (connection_window, stream_window) = receive_windows(config.download_limit);
    let streams = VarInt::from_u32(config.max_streams_per_connection);
    t.max_concurrent_bidi_streams(streams)
        .max_concurrent_uni_streams(streams)
        .max_idle_timeout(IdleTimeout::try_from(config.idle_timeout).ok())
        .keep_alive_interval((!config.keep_alive.is_zero()).then_some(config.keep_alive))
        .stream_receive_window(VarInt::from_u32(stream_window))
        .receive_window(VarInt::from_u32(connection_window))
        .send_window(SEND_WINDOW)
        // shoal does not use unreliable datagrams
        .datagram_receive_buffer_size(None);
    match config.congestion {
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        Congestion::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
    };
    t
}

/// Bind one UDP socket; `[::]` is made dual-stack when the OS allows.
/// Returns the socket and whether it also takes IPv4.
fn bind_udp(addr: SocketAddr, dual_stack: bool) -> io::Result<(std::net::UdpSocket, bool)> {
    use socket2::{Domain, Protocol, Type};
    let socket = socket2::Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let mut dual = false;
    if addr.is_ipv6() {
        dual = dual_stack && socket.set_only_v6(false).is_ok();
        if !dual {
            socket.set_only_v6(true)?;
        }
    }
    // Bigger kernel buffers absorb bursts at high rates; the kernel caps
    // them at its maximum, and a failure here is harmless.
    let _ = socket.set_recv_buffer_size(8 << 20);
    let _ = socket.set_send_buffer_size(8 << 20);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok((socket.into(), dual))
}

/// Bind the sockets for all listen addresses.
fn bind_all(listen: &[SocketAddr]) -> Result<Vec<(std::net::UdpSocket, bool)>, TransportError> {
    let bind_err = |addr: SocketAddr| move |source| TransportError::Bind { addr, source };
    let mut sockets = Vec::new();
    for &addr in listen {
        if addr.ip() == Ipv6Addr::UNSPECIFIED {
            match bind_udp(addr, true) {
                Ok((socket, true)) => sockets.push((socket, true)),
                Ok((socket, false)) => {
                    // IPv6 only: add an IPv4 socket, on the same port if we can
                    let port = socket.local_addr().map_err(bind_err(addr))?.port();
                    sockets.push((socket, false));
                    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
                    let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
                    let socket = bind_udp(v4, false)
                        .or_else(|_| bind_udp(any, false))
                        .map_err(bind_err(any))?;
                    sockets.push(socket);
                }
                Err(err) => {
                    // no IPv6 on this host: IPv4 alone
                    tracing::debug!(%addr, %err, "no IPv6, listening on IPv4 only");
                    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
                    sockets.push(bind_udp(v4, false).map_err(bind_err(v4))?);
                }
            }
        } else {
            sockets.push(bind_udp(addr, false).map_err(bind_err(addr))?);
        }
    }
    if sockets.is_empty() {
        return Err(TransportError::NoListenAddress);
    }
    Ok(sockets)
}

impl Endpoint {
    /// Bind the sockets in `config.listen` and start accepting connections.
    pub async fn bind(
        secret: SecretKey,
        config: EndpointConfig,
    ) -> Result<Endpoint, TransportError> {
        let provider = tls::provider();
        let key = tls::certified_key(&provider, &secret)?;
        let transport = Arc::new(transport_config(&config));
        let server_tls =
            tls::server_config(provider.clone(), key.clone(), config.peer_filter.clone())?;
        let server_crypto = QuicServerConfig::try_from(Arc::new(server_tls))
            .map_err(|e| TransportError::Tls(rustls::Error::General(e.to_string())))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        let max_incoming = config.max_connections.clamp(1, 1 << 16);
        server.max_incoming(max_incoming);

        let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
        let mut sockets = Vec::new();
        for (udp, dual_stack) in bind_all(&config.listen)? {
            let addr = udp.local_addr().map_err(|source| TransportError::Bind {
                addr: config.listen[0],
                source,
            })?;
            let abstract_socket: Arc<dyn quinn::AsyncUdpSocket> = match &config.fault {
                Some(fault) => FaultySocket::new(udp, fault.clone())
                    .map_err(|source| TransportError::Bind { addr, source })?,
                None => runtime
                    .wrap_udp_socket(udp)
                    .map_err(|source| TransportError::Bind { addr, source })?,
            };
            let quic = quinn::Endpoint::new_with_abstract_socket(
                quinn::EndpointConfig::default(),
                Some(server.clone()),
                abstract_socket,
                runtime.clone(),
            )
            .map_err(|source| TransportError::Bind { addr, source })?;
            sockets.push(Socket {
                quic,
                addr,
                dual_stack,
            });
        }

        let shared = Arc::new(Shared {
            upload: config.upload_limit.map(Limiter::new),
            download: config.download_limit.map(Limiter::new),
            counters: Counters::default(),
        });
        let (accept_tx, accept_rx) = mpsc::unbounded_channel();
        let max_connections = config.max_connections.max(1);
        let inner = Arc::new(Inner {
            id: secret.public(),
            secret,
            provider,
            key,
            transport,
            sockets,
            conns: Mutex::new(HashMap::new()),
            dials: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            handshake_timeout: config.handshake_timeout,
            accept_rx: tokio::sync::Mutex::new(accept_rx),
            accept_tx,
            shared,
            cancel: CancellationToken::new(),
            registered: tokio::sync::Notify::new(),
            duplicates: Default::default(),
        });
        for socket in &inner.sockets {
            tokio::spawn(accept_loop(socket.quic.clone(), Arc::downgrade(&inner)));
        }
        tracing::debug!(id = %inner.id, addrs = ?inner.sockets.iter().map(|s| s.addr).collect::<Vec<_>>(), "endpoint bound");
        Ok(Endpoint { inner })
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.id
    }

    /// This node's secret key.
    pub fn secret_key(&self) -> &SecretKey {
        &self.inner.secret
    }

    /// The bound addresses, with the real ports. A dual-stack socket is
    /// listed twice: as `[::]:port` and `0.0.0.0:port`.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs = Vec::new();
        for socket in &self.inner.sockets {
            let addr = socket.quic.local_addr().unwrap_or(socket.addr);
            addrs.push(addr);
            if socket.dual_stack {
                addrs.push(SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())));
            }
        }
        addrs
    }

    /// A connection to the peer at `addr`: an existing live one to that
    /// peer (or, with no `expected` id, to that address) if there is one,
    /// else a new one.
    ///
    /// With `expected`, the handshake fails unless the peer proves it holds
    /// that key; without, any peer is accepted and
    /// [`Connection::peer_id`] tells who it is. Dials to one address are
    /// made one at a time, and if the peer dialed us meanwhile, the one
    /// connection kept between the two (see [`Endpoint::connection`]) is
    /// returned.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: Option<PeerId>,
    ) -> Result<Connection, TransportError> {
        let inner = &self.inner;
        if inner.cancel.is_cancelled() {
            return Err(TransportError::Closed);
        }
        let addr = canonical(addr);
        if expected == Some(inner.id) {
            return Err(TransportError::SelfConnect { addr });
        }
        if let Some(conn) = self.existing(addr, expected) {
            return Ok(conn);
        }
        let dial_lock = lock(&inner.dials).entry(addr).or_default().clone();
        let result = {
            let _guard = dial_lock.lock().await;
            match self.existing(addr, expected) {
                Some(conn) => Ok(conn),
                None => self.dial(addr, expected).await,
            }
        };
        let mut dials = lock(&inner.dials);
        if Arc::strong_count(&dial_lock) <= 2 {
            dials.remove(&addr);
        }
        result
    }

    fn existing(&self, addr: SocketAddr, expected: Option<PeerId>) -> Option<Connection> {
        match expected {
            Some(peer) => self.connection(&peer),
            None => {
                let conns = lock(&self.inner.conns);
                let peer = conns
                    .values()
                    .flatten()
                    .find(|c| !c.is_closed() && c.remote_addr() == addr)?
                    .peer;
                drop(conns);
                self.connection(&peer)
            }
        }
    }

    async fn dial(
        &self,
        addr: SocketAddr,
        expected: Option<PeerId>,
    ) -> Result<Connection, TransportError> {
        let inner = &self.inner;
        let socket = inner
            .sockets
            .iter()
            .find(|s| s.addr.is_ipv4() == addr.is_ipv4())
            .or_else(|| inner.sockets.iter().find(|s| s.dual_stack))
            .ok_or(TransportError::NoRoute {
                addr,
                local: self.local_addrs(),
            })?;
        let permit = inner.permits.clone().try_acquire_owned().map_err(|_| {
            TransportError::TooManyConnections {
                max: inner.max_connections,
            }
        })?;
        let (verifier, seen) = ServerVerifier::new(&inner.provider, expected);
        let client_tls = tls::client_config(inner.provider.clone(), inner.key.clone(), verifier)?;
        let client_crypto = QuicClientConfig::try_from(Arc::new(client_tls))
            .map_err(|e| TransportError::Tls(rustls::Error::General(e.to_string())))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(inner.transport.clone());
        let connecting = socket
            .quic
            .connect_with(client, addr, "shoal")
            .map_err(|source| TransportError::Dial { addr, source })?;
        let conn = match tokio::time::timeout(inner.handshake_timeout, connecting).await {
            Err(_) => return Err(TransportError::Timeout { addr }),
            Ok(Err(err)) => {
                let seen = *lock(&seen);
                return Err(dial_error(addr, expected, seen, err));
            }
            Ok(Ok(conn)) => conn,
        };
        let peer = match peer_of(&conn) {
            Some(peer) => peer,
            None => {
                conn.close(VarInt::from_u32(0), b"no peer key");
                return Err(TransportError::NoPeerKey { addr });
            }
        };
        if peer == inner.id {
            conn.close(VarInt::from_u32(0), b"connected to self");
            return Err(TransportError::SelfConnect { addr });
        }
        if let Some(expected) = expected.filter(|e| *e != peer) {
            conn.close(VarInt::from_u32(0), b"wrong peer");
            return Err(TransportError::WrongPeer {
                addr,
                expected,
                actual: peer,
            });
        }
        // The client's handshake ends before the server has checked the
        // client's key; wait for the server's HANDSHAKE_DONE so a peer that
        // rejects us is an error here, not a dead connection later.
        if let Err(err) = confirmed(&conn, inner.handshake_timeout).await {
            if is_duplicate_close(&err) {
                // the peer dialed us too and keeps its own connection,
                // which is arriving
                drop(permit);
                return self.wait_for_connection(peer, addr).await;
            }
            return Err(dial_error(addr, expected, None, err));
        }
        let conn = Connection::new(conn, peer, inner.id, inner.shared.clone());
        tracing::debug!(%peer, %addr, "connected");
        Ok(register(inner, conn, permit).0)
    }

    /// Wait for the connection the peer dialed to us to be registered.
    async fn wait_for_connection(
        &self,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<Connection, TransportError> {
        let deadline = tokio::time::Instant::now() + self.inner.handshake_timeout;
        loop {
            let notified = self.inner.registered.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(conn) = self.connection(&peer) {
                return Ok(conn);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(TransportError::Timeout { addr });
            }
        }
    }

    /// The next incoming authenticated connection that survived
    /// de-duplication; `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<Connection> {
        let mut rx = self.inner.accept_rx.lock().await;
        loop {
            let conn = tokio::select! {
                _ = self.inner.cancel.cancelled() => return None,
                conn = rx.recv() => conn?,
            };
            if !conn.is_closed() {
                return Some(conn);
            }
        }
    }

    /// The live connection to `peer`, if any.
    ///
    /// When both peers dialed each other, both keep the connection dialed
    /// by the peer with the lower id: its dialer closes the other with
    /// [`CLOSE_DUPLICATE`], and this side uses the kept one meanwhile.
    pub fn connection(&self, peer: &PeerId) -> Option<Connection> {
        let conns = lock(&self.inner.conns);
        let list = conns.get(peer)?;
        best(self.inner.id, *peer, list.iter().filter(|c| !c.is_closed())).cloned()
    }

    /// All live connections, one per peer.
    pub fn connections(&self) -> Vec<Connection> {
        let peers: Vec<PeerId> = lock(&self.inner.conns).keys().copied().collect();
        peers.iter().filter_map(|p| self.connection(p)).collect()
    }

    /// How many connections this endpoint closed because another connection
    /// to the same peer was kept.
    pub fn duplicates_closed(&self) -> usize {
        self.inner
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes moved through the stream wrappers of all connections.
    pub fn stats(&self) -> Stats {
        self.inner.shared.counters.stats()
    }

    /// Bytes the download limit granted in all (tests).
    #[cfg(test)]
    pub(crate) fn download_drawn(&self) -> u64 {
        self.inner
            .shared
            .download
            .as_ref()
            .map_or(0, |l| l.drawn.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Close all connections and sockets; waits (up to a second) for the
    /// peers to be told.
    pub async fn close(&self) {
        let inner = &self.inner;
        inner.cancel.cancel();
        let conns: Vec<Connection> = lock(&inner.conns).drain().flat_map(|(_, v)| v).collect();
        let rtt = conns
            .iter()
            .map(|c| c.inner.rtt())
            .max()
            .unwrap_or_default();
        // Those still open, with the datagrams each had sent just before
        // it was closed: its close frame goes out in the next one.
        let mut open: Vec<(quinn::Connection, u64)> = Vec::new();
        for conn in conns {
            let s = conn.inner.stats();
            tracing::debug!(
                peer = %conn.peer_id(),
                rx_datagrams = s.udp_rx.datagrams,
                tx_datagrams = s.udp_tx.datagrams,
                lost = s.path.lost_packets,
                mtu = s.path.current_mtu,
                cwnd = s.path.cwnd,
                "closing connection"
            );
            if conn.inner.close_reason().is_none() {
                open.push((conn.inner.clone(), s.udp_tx.datagrams));
            }
            conn.close(CLOSE_SHUTDOWN, b"endpoint closed");
        }
        for socket in &inner.sockets {
            socket
                .quic
                .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"endpoint closed");
        }
        // Waiting for the whole draining period (three probe timeouts:
        // ~80 ms even on loopback, where a `get` of 16 KiB takes 10 ms)
        // only helps when the close frames are lost, and then the peer's
        // idle timeout cleans up anyway. So wait only until each of those
        // connections has built its next datagram, the one with the close
        // frame, which its driver sends in the same step; with a bound, in
        // case a driver is stuck. A 10,000-file `get` spent 10 ms here when
        // this waited a fixed minimum.
        let wait = (rtt * 4).clamp(CLOSE_WAIT_MIN, CLOSE_WAIT_MAX);
        let deadline = tokio::time::Instant::now() + wait;
        let sent = || {
            open.iter()
                .all(|(c, before)| c.stats().udp_tx.datagrams > *before)
        };
        // The drivers usually send within a fraction of a millisecond:
        // look after each turn of the scheduler for a while (the timer's
        // 1 ms steps cost a 10,000-file `get` ~2.4 ms here), then sleep
        // between looks.
        let spin_until = tokio::time::Instant::now() + CLOSE_WAIT_SPIN;
        while !sent() && tokio::time::Instant::now() < deadline {
            if tokio::time::Instant::now() < spin_until {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        // One more turn for the driver to hand the packets to the socket.
        tokio::task::yield_now().await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The address as a plain IPv4 one if it is IPv4-mapped.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The peer id proven in the handshake.
fn peer_of(conn: &quinn::Connection) -> Option<PeerId> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    match certs.as_slice() {
        [spki] => tls::peer_id_from_spki(spki).ok(),
        _ => None,
    }
}

/// Wait until the server confirms the handshake (RFC 9001 4.1.2), or the
/// connection closes.
async fn confirmed(conn: &quinn::Connection, limit: Duration) -> Result<(), ConnectionError> {
    let start = tokio::time::Instant::now();
    let mut pause = Duration::from_micros(200);
    loop {
        if let Some(err) = conn.close_reason() {
            return Err(err);
        }
        if conn.stats().frame_rx.handshake_done > 0 {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(ConnectionError::TimedOut);
        }
        tokio::select! {
            _ = conn.closed() => {}
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

pub(crate) fn is_duplicate_close(err: &ConnectionError) -> bool {
    matches!(err, ConnectionError::ApplicationClosed(c)
        if c.error_code == VarInt::from_u32(CLOSE_DUPLICATE))
}

fn dial_error(
    addr: SocketAddr,
    expected: Option<PeerId>,
    seen: Option<PeerId>,
    err: ConnectionError,
) -> TransportError {
    if let (Some(expected), Some(actual)) = (expected, seen)
        && expected != actual
    {
        return TransportError::WrongPeer {
            addr,
            expected,
            actual,
        };
    }
    match &err {
        ConnectionError::ConnectionClosed(close)
            if close.error_code == TransportErrorCode::CONNECTION_REFUSED =>
        {
            TransportError::Refused { addr }
        }
        ConnectionError::ConnectionClosed(close)
            if (0x100..0x200).contains(&u64::from(close.error_code)) =>
        {
            TransportError::Rejected { addr, source: err }
        }
        ConnectionError::TimedOut => TransportError::Timeout { addr },
        _ => TransportError::Handshake { addr, source: err },
    }
}

/// The connection to keep among `conns` to one peer: one dialed by the
/// lower of the two ids, else the oldest.
fn best<'a>(
    us: PeerId,
    peer: PeerId,
    conns: impl Iterator<Item = &'a Connection>,
) -> Option<&'a Connection> {
    let preferred = us.min(peer);
    conns.min_by_key(|c| c.dialer != preferred)
}

/// Record a new authenticated connection and settle duplicates. Returns the
/// connection to use for this peer, and whether `conn` itself is kept.
fn register(
    inner: &Arc<Inner>,
    conn: Connection,
    permit: OwnedSemaphorePermit,
) -> (Connection, bool) {
    let us = inner.id;
    let peer = conn.peer;
    let preferred = us.min(peer);
    let mut to_close = Vec::new();
    let (survivor, kept) = {
        let mut conns = lock(&inner.conns);
        let list = conns.entry(peer).or_default();
        list.retain(|c| !c.is_closed());
        let current = best(us, peer, list.iter()).cloned();
        match current {
            None => {
                list.push(conn.clone());
                (conn.clone(), true)
            }
            Some(current) => {
                let new_preferred = conn.dialer == preferred;
                let old_preferred = current.dialer == preferred;
                if new_preferred && !old_preferred {
                    // the new one was dialed by the lower id: it wins
                    to_close.append(list);
                    list.push(conn.clone());
                    (conn.clone(), true)
                } else if conn.dialer == us {
                    // it loses, or we dialed twice: keep the older one
                    to_close.push(conn.clone());
                    (current, false)
                } else {
                    // The peer dialed, twice or as we had dialed it: it
                    // closes the loser itself, and we keep both until
                    // then. Not closed here: a peer started again (a
                    // killed process) dials from a new run that has no
                    // other connection and closes none, while ours to its
                    // earlier run is dead; closed as the loser, the new
                    // run could not reach this node until the dead one
                    // timed out (a review). The layer above closes the
                    // earlier run's once it can tell (shoal-node: the
                    // hello's instance).
                    //
                    // At most `MAX_PEER_DIALED` of these are kept: a peer
                    // that dials again and again without closing any (a
                    // bug, or hostile) has its oldest closed (the newest
                    // is the one a restarted peer's new run uses).
                    let peer_dialed: Vec<usize> = (0..list.len())
                        .filter(|&i| list[i].dialer == peer)
                        .collect();
                    if peer_dialed.len() >= MAX_PEER_DIALED {
                        let oldest = peer_dialed[0];
                        to_close.push(list.remove(oldest));
                    }
                    list.push(conn.clone());
                    let current = best(us, peer, list.iter()).cloned().unwrap_or(current);
                    (current, true)
                }
            }
        }
    };
    inner.registered.notify_waiters();
    inner
        .duplicates
        .fetch_add(to_close.len(), std::sync::atomic::Ordering::Relaxed);
    for loser in to_close {
        tracing::debug!(%peer, "closing duplicate connection");
        loser
            .duplicate
            .store(true, std::sync::atomic::Ordering::Relaxed);
        loser.close(CLOSE_DUPLICATE, b"duplicate connection");
    }
    // release the permit and forget the connection once it closes
    let weak = Arc::downgrade(inner);
    let watched = conn.clone();
    tokio::spawn(async move {
        let _permit = permit;
        watched.inner.closed().await;
        if let Some(inner) = weak.upgrade() {
            let mut conns = lock(&inner.conns);
            if let Some(list) = conns.get_mut(&watched.peer) {
                list.retain(|c| c.inner.stable_id() != watched.inner.stable_id());
                if list.is_empty() {
                    conns.remove(&watched.peer);
                }
            }
        }
    });
    (survivor, kept)
}

async fn accept_loop(quic: quinn::Endpoint, inner: Weak<Inner>) {
    let Some((cancel, permits)) = inner
        .upgrade()
        .map(|i| (i.cancel.clone(), i.permits.clone()))
    else {
        return;
    };
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            incoming = quic.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(handle_incoming(inner.clone(), incoming, permit));
            }
            Err(_) => {
                tracing::debug!(addr = %incoming.remote_address(), "refusing connection: too many connections");
                incoming.refuse();
            }
        }
    }
}

async fn handle_incoming(
    inner: Weak<Inner>,
    incoming: quinn::Incoming,
    permit: OwnedSemaphorePermit,
) {
    let addr = incoming.remote_address();
    let Some(timeout) = inner.upgrade().map(|i| i.handshake_timeout) else {
        return;
    };
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(err) => {
            tracing::debug!(%addr, %err, "incoming connection failed");
            return;
        }
    };
    let conn = match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(err)) => {
            tracing::debug!(%addr, %err, "incoming handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%addr, "incoming handshake timed out");
            return;
        }
    };
    let Some(inner) = inner.upgrade() else {
        return;
    };
    let Some(peer) = peer_of(&conn) else {
        conn.close(VarInt::from_u32(0), b"no peer key");
        return;
    };
    if peer == inner.id {
        conn.close(VarInt::from_u32(0), b"connected to self");
        return;
    }
    tracing::debug!(%peer, %addr, "accepted connection");
    let conn = Connection::new(conn, peer, peer, inner.shared.clone());
    let (_, kept) = register(&inner, conn.clone(), permit);
    if kept {
        let _ = inner.accept_tx.send(conn);
    }
}

/// An authenticated QUIC connection to one peer, carrying many streams.
/// Cheap to clone.
#[derive(Clone)]
pub struct Connection {
    inner: quinn::Connection,
    peer: PeerId,
    /// Who dialed this connection.
    dialer: PeerId,
    acct: Accounting,
    /// Set when this side closed the connection as a duplicate.
    duplicate: Arc<std::sync::atomic::AtomicBool>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("remote", &self.remote_addr())
            .field("dialed_by_us", &self.dialed_by_us())
            .finish_non_exhaustive()
    }
}

impl Connection {
    fn new(inner: quinn::Connection, peer: PeerId, dialer: PeerId, shared: Arc<Shared>) -> Self {
        Connection {
            inner,
            peer,
            dialer,
            acct: Accounting {
                shared,
                conn: Arc::new(Counters::default()),
            },
            duplicate: Arc::default(),
        }
    }

    /// The peer's id, proven in the handshake.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// The peer's current address.
    pub fn remote_addr(&self) -> SocketAddr {
        canonical(self.inner.remote_address())
    }

    /// A number unique among the live connections of this process, to tell
    /// connections apart.
    pub fn stable_id(&self) -> usize {
        self.inner.stable_id()
    }

    /// Whether this node dialed the connection (else the peer did).
    pub fn dialed_by_us(&self) -> bool {
        self.dialer != self.peer
    }

    /// The current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.inner.rtt()
    }

    /// Open a bidirectional stream; waits while the peer's stream limit is
    /// reached.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), TransportError> {
        let (send, recv) = self.inner.open_bi().await.map_err(|e| self.lost(e))?;
        Ok(self.wrap(send, recv))
    }

    /// Accept the next bidirectional stream the peer opens.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), TransportError> {
        let (send, recv) = self.inner.accept_bi().await.map_err(|e| self.lost(e))?;
        Ok(self.wrap(send, recv))
    }

    /// Open a unidirectional stream; waits while the peer's stream limit is
    /// reached.
    pub async fn open_uni(&self) -> Result<SendStream, TransportError> {
        let send = self.inner.open_uni().await.map_err(|e| self.lost(e))?;
        Ok(SendStream::new(send, self.acct.clone()))
    }

    /// Accept the next unidirectional stream the peer opens.
    pub async fn accept_uni(&self) -> Result<RecvStream, TransportError> {
        let recv = self.inner.accept_uni().await.map_err(|e| self.lost(e))?;
        Ok(RecvStream::new(recv, self.acct.clone()))
    }

    fn wrap(&self, send: quinn::SendStream, recv: quinn::RecvStream) -> (SendStream, RecvStream) {
        (
            SendStream::new(send, self.acct.clone()),
            RecvStream::new(recv, self.acct.clone()),
        )
    }

    fn lost(&self, source: ConnectionError) -> TransportError {
        if is_duplicate_close(&source) || self.duplicate.load(std::sync::atomic::Ordering::Relaxed)
        {
            return TransportError::Duplicate { peer: self.peer };
        }
        TransportError::ConnectionLost {
            peer: self.peer,
            source,
        }
    }

    /// Close the connection with an application `code` and `reason`.
    pub fn close(&self, code: u32, reason: &[u8]) {
        self.inner.close(VarInt::from_u32(code), reason);
    }

    /// Wait until the connection is closed, by either side or a timeout.
    pub async fn closed(&self) {
        self.inner.closed().await;
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.inner.close_reason().is_some()
    }

    /// Whether the peer closed the connection because its endpoint shut
    /// down ([`CLOSE_SHUTDOWN`]): it is gone, not merely done with us.
    pub fn peer_shut_down(&self) -> bool {
        matches!(
            self.inner.close_reason(),
            Some(ConnectionError::ApplicationClosed(c))
                if c.error_code == VarInt::from_u32(CLOSE_SHUTDOWN)
        )
    }

    /// Why the connection closed, if it did.
    pub fn close_reason(&self) -> Option<TransportError> {
        self.inner.close_reason().map(|e| self.lost(e))
    }

    /// Bytes moved through this connection's stream wrappers.
    pub fn stats(&self) -> Stats {
        self.acct.conn.stats()
    }

    /// QUIC's own statistics (packets, losses, congestion window).
    pub fn quic_stats(&self) -> quinn::ConnectionStats {
        self.inner.stats()
    }
}
