//! A shoal node: joins the store (`shoal-store`), the transport
//! (`shoal-transport`) and discovery (`shoal-discovery`) into one peer that
//! serves what it holds and downloads from many peers at once.
//!
//! It owns the peer protocol's behaviour (answering and asking), the swarm
//! scheduling (the I/O-free [`scheduler`]), the download tasks, peer
//! exchange, and the local control socket through which `shoal` commands
//! act on a running node. It does not own the wire format (`shoal-proto`),
//! how bytes are verified and kept (`shoal-store`), how peers are
//! authenticated (`shoal-transport`), or how they are found
//! (`shoal-discovery`).
//!
//! Embedding:
//!
//! ```no_run
//! # async fn demo() -> Result<(), shoal_node::NodeError> {
//! use shoal_node::{FetchOutput, FetchRequest, Node, NodeConfig};
//! let seeder = Node::spawn(NodeConfig::default()).await?;
//! let hash = seeder.add_bytes(b"hello".to_vec(), "hello.txt").await?;
//! let ticket = seeder.ticket(&hash)?;
//! let leecher = Node::spawn(NodeConfig::default()).await?;
//! let req = FetchRequest::from_ticket(&ticket, FetchOutput::Store);
//! leecher.fetch(req, None).await?;
//! # Ok(()) }
//! ```

mod batch;
mod choke;
pub mod control;
mod download;
mod error;
mod fetch;
mod node;
mod peerbook;
mod picker;
pub mod scheduler;
mod server;
pub mod wire;

pub use error::NodeError;
pub use fetch::{FetchOutput, FetchReport, FetchRequest};
pub use node::{Node, NodeConfig, PeerAddr, PeerInfo, TransferInfo};
pub use peerbook::PeerCounters;
pub use shoal_discovery::{Discovery, DiscoveryConfig};
pub use shoal_store::{BlobKind, Hash, ImportMode};
pub use shoal_transport::{PeerId, Ticket, TicketKind};

/// How far a transfer has come.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Verified bytes.
    pub verified: u64,
    /// Total bytes, once known.
    pub total: u64,
    /// Peers in use.
    pub peers: u32,
    /// Recent rate in bytes per second.
    pub rate: u64,
    /// Files done (collections).
    pub files_done: u32,
    /// Files in all (collections).
    pub files_total: u32,
}

/// A transfer's recent rate ([`Progress::rate`]): a moving average of
/// samples taken at least `every` apart, each weighing half. The first
/// count it is given is where it starts: bytes done before (a resumed
/// download's, a connection's before it was first sampled) are no part
/// of the rate, which they inflated (a review saw 27.9 MiB/s shown for a
/// transfer at 4.8).
#[derive(Debug)]
pub(crate) struct RateMeter {
    every: std::time::Duration,
    at: std::time::Instant,
    bytes: Option<u64>,
    rate: f64,
}

impl RateMeter {
    pub(crate) fn new(every: std::time::Duration) -> Self {
        RateMeter {
            every,
            at: std::time::Instant::now(),
            bytes: None,
            rate: 0.0,
        }
    }

    /// The rate at the last sample, in bytes per second.
    pub(crate) fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// `bytes` done in all by `now`: the rate, in bytes per second.
    pub(crate) fn update(&mut self, now: std::time::Instant, bytes: u64) -> u64 {
        let Some(before) = self.bytes else {
            (self.at, self.bytes) = (now, Some(bytes));
            return 0;
        };
        let dt = now.duration_since(self.at);
        if dt >= self.every {
            let sample = bytes.saturating_sub(before) as f64 / dt.as_secs_f64();
            self.rate = if self.rate == 0.0 {
                sample
            } else {
                0.5 * self.rate + 0.5 * sample
            };
            (self.at, self.bytes) = (now, Some(bytes));
        }
        self.rate as u64
    }
}

impl FetchRequest {
    /// A request for what `ticket` names, from the providers it names.
    pub fn from_ticket(ticket: &Ticket, out: FetchOutput) -> Self {
        let mut peers = Vec::new();
        for p in &ticket.providers {
            for a in &p.addrs {
                peers.push(PeerAddr {
                    id: Some(p.id),
                    addr: *a,
                });
            }
        }
        FetchRequest {
            hash: Hash::from_bytes(ticket.hash),
            kind: Some(match ticket.kind {
                TicketKind::Collection => BlobKind::Collection,
                _ => BlobKind::Raw,
            }),
            peers,
            out,
        }
    }
}

#[cfg(test)]
mod rate_tests {
    use std::time::Duration;

    use super::RateMeter;

    #[test]
    fn the_rate_is_a_moving_average_of_samples_at_least_a_period_apart() {
        let mut m = RateMeter::new(Duration::from_secs(1));
        let t0 = m.at;
        // Where it starts.
        assert_eq!(m.update(t0, 0), 0);
        // Too soon for a sample.
        assert_eq!(m.update(t0 + Duration::from_millis(500), 100), 0);
        // The first sample is the rate.
        assert_eq!(m.update(t0 + Duration::from_secs(2), 2_000), 1_000);
        // Nothing for two seconds: half the old rate.
        assert_eq!(m.update(t0 + Duration::from_secs(4), 2_000), 500);
        // 3,000 in one second: (500 + 3,000) / 2.
        assert_eq!(m.update(t0 + Duration::from_secs(5), 5_000), 1_750);
    }

    #[test]
    fn bytes_done_before_the_first_count_are_no_part_of_the_rate() {
        // A download resumed with 90 MB verified, or a connection that had
        // moved 90 MB when first sampled: 1 MB in the next second is 1 MB/s.
        let mut m = RateMeter::new(Duration::from_secs(1));
        let t0 = m.at;
        assert_eq!(m.update(t0, 90_000_000), 0);
        assert_eq!(m.update(t0 + Duration::from_secs(1), 91_000_000), 1_000_000);
    }
}
