//! Shoal's peer transport: encrypted, authenticated QUIC connections between
//! peers, and nothing else.
//!
//! This crate owns:
//! - node identities: an Ed25519 key pair kept in a file ([`SecretKey`]),
//!   and the [`PeerId`] (public key) that names a node;
//! - the [`Endpoint`]: UDP sockets (dual-stack where possible) with QUIC
//!   (quinn) and TLS 1.3 (rustls with *ring*) on them, where both sides
//!   prove their key with RFC 7250 raw public keys, ALPN `shoal/1`;
//! - [`Connection`]s: at most one per pair of peers, many streams each,
//!   with caps on connections and streams;
//! - the global bandwidth limits and byte counters, enforced in the
//!   [`SendStream`] and [`RecvStream`] wrappers that all bulk data passes
//!   through, and [`parse_rate`] for limits typed by people;
//! - [`Ticket`]s, the text that tells a user where to fetch content;
//! - a fault-injecting UDP socket for tests ([`fault`]).
//!
//! It deliberately knows nothing about blobs, hashes being verified, the
//! store, or what the bytes on a stream mean: that is `shoal-node`'s and
//! `shoal-proto`'s business. It does no peer discovery either.

mod endpoint;
pub mod fault;
mod identity;
mod rate;
mod stream;
mod ticket;
mod tls;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;

pub use endpoint::{
    CLOSE_DUPLICATE, CLOSE_REPLACED, CLOSE_SHUTDOWN, CONNECTION_RECEIVE_WINDOW, Congestion,
    Connection, Endpoint, EndpointConfig, SEND_WINDOW, STREAM_RECEIVE_WINDOW,
};
pub use fault::FaultConfig;
pub use identity::{IdentityError, PEER_ID_TEXT_LEN, PeerId, PeerIdError, SecretKey};
pub use rate::{RateError, parse_rate};
pub use stream::{RESET_BUSY, RESET_STALLED, RecvStream, SendStream, Stats, reset_code};
pub use ticket::{
    MAX_PROVIDER_ADDRS, MAX_PROVIDERS, MAX_TICKET_LEN, Provider, TICKET_PREFIX, TICKET_VERSION,
    Ticket, TicketError, TicketKind, decode_addr, encode_addr,
};
pub use tls::PeerFilter;

/// What can go wrong setting up the endpoint, connecting, or moving data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The configuration lists no address to listen on.
    #[error("no address to listen on")]
    NoListenAddress,
    /// The TLS configuration could not be built.
    #[error("tls setup failed: {0}")]
    Tls(#[from] rustls::Error),
    /// No local socket has the address family of the address dialed.
    #[error("cannot reach {addr}: this node listens only on {local:?}")]
    NoRoute {
        /// The address dialed.
        addr: SocketAddr,
        /// The local addresses.
        local: Vec<SocketAddr>,
    },
    /// The endpoint has as many connections as it allows.
    #[error("too many open connections (the limit is {max})")]
    TooManyConnections {
        /// The limit.
        max: usize,
    },
    /// QUIC refused to start the dial (e.g. an invalid address).
    #[error("cannot dial {addr}: {source}")]
    Dial {
        /// The address dialed.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectError,
    },
    /// The peer proved a different key than the one expected.
    #[error("peer at {addr} has id {actual}, expected {expected}")]
    WrongPeer {
        /// The address dialed.
        addr: SocketAddr,
        /// The id the caller asked for.
        expected: PeerId,
        /// The id the peer proved.
        actual: PeerId,
    },
    /// The address is this node's own.
    #[error("the peer at {addr} is this node itself")]
    SelfConnect {
        /// The address dialed.
        addr: SocketAddr,
    },
    /// The peer refused the connection: it has too many, or it is
    /// stopping (a closing endpoint refuses new connections).
    #[error(
        "peer at {addr} refused the connection (it may be at its connection limit, or stopping)"
    )]
    Refused {
        /// The address dialed.
        addr: SocketAddr,
    },
    /// The peer rejected our identity or TLS parameters.
    #[error("peer at {addr} rejected the handshake: {source}")]
    Rejected {
        /// The address dialed.
        addr: SocketAddr,
        /// QUIC's account of it.
        source: quinn::ConnectionError,
    },
    /// The handshake did not finish in time, or nothing answered.
    #[error("timed out connecting to {addr}; is a shoal node listening there?")]
    Timeout {
        /// The address dialed.
        addr: SocketAddr,
    },
    /// The handshake failed.
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The address dialed.
        addr: SocketAddr,
        /// QUIC's account of it.
        source: quinn::ConnectionError,
    },
    /// The handshake finished without a peer key (cannot happen with a
    /// shoal peer).
    #[error("peer at {addr} presented no usable key")]
    NoPeerKey {
        /// The address dialed.
        addr: SocketAddr,
    },
    /// The connection is closed or broke.
    #[error("connection to {peer} lost: {source}")]
    ConnectionLost {
        /// The peer.
        peer: PeerId,
        /// Why.
        source: quinn::ConnectionError,
    },
    /// The connection was closed because another connection between the
    /// same two peers is kept (both dialed at once); [`Endpoint::connection`]
    /// has that one.
    #[error("connection to {peer} closed as a duplicate; use the other connection to that peer")]
    Duplicate {
        /// The peer.
        peer: PeerId,
    },
    /// Writing to a stream failed.
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// The peer took none of a write's bytes for the stream's stall
    /// timeout ([`SendStream::set_stall_timeout`]); the stream is reset.
    #[error("the peer took no data for {0:?}")]
    Stalled(std::time::Duration),
    /// Reading from a stream failed.
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream was already finished or reset.
    #[error("stream already closed")]
    StreamClosed(#[from] quinn::ClosedStream),
    /// Waiting for the peer to receive a stream failed.
    #[error("stream failed before the peer got everything: {0}")]
    Stopped(#[from] quinn::StoppedError),
    /// A stream was longer than the caller allows.
    #[error("stream is longer than {limit} bytes")]
    TooLong {
        /// The limit.
        limit: usize,
    },
    /// The endpoint is closed.
    #[error("the endpoint is closed")]
    Closed,
}

impl TransportError {
    /// Whether the connection was closed because another connection to the
    /// same peer is kept; [`Endpoint::connection`] has that one.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, TransportError::Duplicate { .. })
    }
}
