//! The node's error type.

use std::path::PathBuf;
use std::time::Duration;

use shoal_store::Hash;
use shoal_transport::PeerId;

/// What can go wrong in a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] shoal_store::StoreError),
    /// A collection manifest was refused.
    #[error(transparent)]
    Manifest(#[from] shoal_store::collection::ManifestError),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] shoal_transport::TransportError),
    /// The identity could not be loaded.
    #[error(transparent)]
    Identity(#[from] shoal_transport::IdentityError),
    /// A frame could not be read or written.
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
    /// The data dir could not be created.
    #[error("cannot create data dir {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    /// A path could not be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// A path could not be written.
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
    /// The output path exists already.
    #[error("{0} exists already; choose another output path or remove it")]
    OutputExists(PathBuf),
    /// A `--peer` value is malformed.
    #[error("bad peer address {0:?}: expected IP:PORT or PEERID@IP:PORT")]
    BadPeerAddr(String),
    /// A hash the store does not hold.
    #[error("{0} is not in the store")]
    NotInStore(Hash),
    /// No peer could be found or reached for a hash; why the addresses
    /// given could not be reached, if any were (" (ADDR: why; ...)").
    #[error("no peer with {0} could be found or reached{1}")]
    NoProviders(Hash, String),
    /// Peers were reached, and none of them holds any of the hash.
    #[error(
        "no peer reached holds {0} ({1} asked): check the hash or ticket, or ask whoever shared \
         it whether they still do"
    )]
    NotHeld(Hash, usize),
    /// Every peer reached that offered the hash was dropped (it stalled,
    /// lied about what it holds, or sent data that failed verification).
    #[error(
        "every peer that offered {0} was dropped ({1}): it stalled, or sent what did not verify \
         (the warnings above say which); try again, or ask for other peers"
    )]
    AllDropped(Hash, usize),
    /// A file of a collection could not be fetched: its path in the
    /// directory, and why.
    #[error("{0} (a file of the directory): {1}")]
    Member(String, Box<NodeError>),
    /// Peers were found but nothing was verified for too long.
    #[error("download of {0} made no progress for {1:?}")]
    Stalled(Hash, Duration),
    /// A blob larger than a download accepts.
    #[error("{0} is {1} bytes, more than the 1 TiB a download accepts")]
    TooLarge(Hash, u64),
    /// An attempt to dial ourselves.
    #[error("that address is this node itself")]
    SelfDial,
    /// A peer named by this node's own id.
    #[error("{0} is this node's own id")]
    OwnId(PeerId),
    /// Every address given turned out hopeless and discovery is off.
    #[error(
        "no address given leads to a peer to ask ({1}); with discovery off there is nowhere else to look"
    )]
    NowhereLeft(Hash, String),
    /// A peer did not answer in time.
    #[error("timed out {0}")]
    Timeout(String),
    /// A peer answered with an error.
    #[error("peer answered: {0}: {1}")]
    Remote(&'static str, String),
    /// The node running on the data dir refused a control request (its
    /// own words: they name what failed).
    #[error("{0}")]
    Refused(String),
    /// A peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Collections cannot be streamed.
    #[error("a collection cannot be streamed to stdout; use -o DIR")]
    StreamCollection,
    /// Whoever consumed the stream went away.
    #[error("output closed")]
    OutputClosed,
    /// Another node runs on this data dir.
    #[error("a node is already running on {0} (its control socket answers)")]
    AlreadyRunning(PathBuf),
    /// The control socket failed.
    #[error("control socket {0}: {1}")]
    Control(PathBuf, std::io::Error),
    /// The node is stopping.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// The download was called off: the hash was unpinned (`shoal rm`)
    /// while it ran.
    #[error(
        "the download of {0} was cancelled: it was unpinned (`shoal rm`) meanwhile; what was \
         verified stays until `shoal gc`"
    )]
    Cancelled(Hash),
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
}

impl NodeError {
    /// Whether a request through a running node's control socket failed
    /// because that node stopped (it said it is stopping, or the socket
    /// closed): the request may be made again, of a node of its own once
    /// that one is gone.
    pub fn is_node_gone(&self) -> bool {
        matches!(
            self,
            NodeError::ShuttingDown
                | NodeError::Wire(crate::wire::WireError::Closed | crate::wire::WireError::Io(_))
        )
    }

    /// Whether a node could not start because another process has the
    /// data dir (its node answers on the control socket, or it holds the
    /// store): one that is stopping lets go of it soon.
    pub fn is_data_dir_busy(&self) -> bool {
        matches!(
            self,
            NodeError::AlreadyRunning(_) | NodeError::Store(shoal_store::StoreError::Locked(_))
        )
    }

    /// Whether a failed dial says that dialling the same address again
    /// cannot help: the peer there proved another key than the one named,
    /// or it is this node (a restart keeps a node's key, so a peer that
    /// comes back at that address is still the wrong one).
    pub(crate) fn is_hopeless_dial(&self) -> bool {
        matches!(
            self,
            NodeError::SelfDial
                | NodeError::OwnId(_)
                | NodeError::Transport(
                    shoal_transport::TransportError::WrongPeer { .. }
                        | shoal_transport::TransportError::SelfConnect { .. }
                )
        )
    }
}
