//! Shoal's chunk store: content-addressed blobs named by their BLAKE3 hash
//! (exactly what `b3sum` prints), verified streaming over the BLAKE3 tree in
//! 16 KiB groups (bao-tree, block size `chunk_log` 4), partial downloads,
//! collections (directories as manifest blobs), pins and garbage collection.
//!
//! It owns: the on-disk layout of a store directory, the redb metadata
//! database, outboards, importing and exporting files and directories,
//! producing the verified stream of any set of groups ([`Store::send_ranges`])
//! and checking such a stream from an untrusted peer group by group before
//! writing it ([`Store::receive_ranges`]).
//!
//! It deliberately knows nothing about the network: no peers, no requests,
//! no scheduling of which group to fetch from whom. Callers hand it
//! `AsyncRead`/`AsyncWrite` streams.
//!
//! # Layout of a store directory
//!
//! - `meta.redb`: one record per blob (size, kind, name, pin, where the data
//!   is, verified groups of a partial blob) and the content of small blobs
//!   (one group or less) imported with [`ImportMode::Copy`]. redb's file
//!   format v3 (a v2 database from before 2026-11-30 is upgraded on open).
//! - `data/<hex>.data`: a private copy, or a download without a target.
//! - `data/<hex>.obao`: the pre-order outboard (hash pairs, about 0.4% of
//!   the data), computed once at import; absent for blobs of one group.
//! - Files added with [`ImportMode::InPlace`] stay where they are; the record
//!   keeps their path, size, mtime and inode, checked before every read.
//! - A download with a target is written to `<target>.shoal-partial` and
//!   renamed to `<target>` when the last group verifies.
//!
//! # Invariants
//!
//! - Nothing unverified is ever served or read back: received groups are
//!   checked against the root hash before they are written, and serving uses
//!   bao-tree's validating encoder, so data that rotted on disk makes
//!   [`Store::send_ranges`] fail (and marks the blob corrupt) instead of
//!   sending it.
//! - A blob is complete only when every group is verified; completion
//!   (including the rename to the target) happens once, under the blob's lock.
//! - Partial state is persisted lazily (every 1024 groups or 2 seconds, at
//!   completion and when the store is dropped), with no fsync per group. On
//!   open, the groups a partial record claims are re-checked against the data
//!   and outboard on disk, and only those that still verify are kept: this
//!   covers both a kill -9 (claims lag behind data) and a power cut (data may
//!   lag behind claims).
//! - Small blobs stored in batches ([`Store::insert_whole`]) are written
//!   without a sync, as tar would; their records carry the boot they were
//!   written in, and after a reboot each such file is hashed again at open
//!   before its record is trusted (those that do not match are dropped).
//! - Small blobs served whole ([`Store::read_whole_many`]) are hashed after
//!   they are read; those served lately are kept in memory, checked, up to
//!   a budget ([`Store::set_served_cache`], 64 MiB by default), and served
//!   from there only while the store holds them complete and not corrupt.
//!
//! # Changes to the requested API
//!
//! - [`Store::send_ranges`] returns the number of bytes written; the groups
//!   sent are exactly those [`Store::available`] returns, which the caller
//!   must compute first (and the receiver must ask [`Store::receive_ranges`]
//!   for exactly those).
//! - [`Store::end_download`] was added: it clears the in-flight mark that
//!   [`Store::begin_download`] sets (downloads stay pinned, unless begun
//!   with `pin` false: a collection's members, which it keeps).
//! - [`Store::verify_all`], [`Store::close`] and [`Store::dir`] were added.
//! - [`Store::insert_whole`], [`Store::flush`], [`Store::relocate_many`],
//!   [`Store::read_whole_many`], [`Store::forget_vanished`],
//!   [`Store::presence`], [`Store::reserve`], [`Store::set_served_cache`]
//!   and [`Store::served_cache_usage`] were added for collections of many
//!   small files; [`Store::served_cache_budget`] for `shoal status`;
//!   [`Store::can_serve`], [`Store::source_changed`] and
//!   [`BlobInfo::corrupt`] so that what a node claims and lists agrees
//!   with what it serves.
//! - [`Store::move_tree`] was added: a finished collection's tree renamed
//!   into place with its records, mended at open after a kill between the
//!   two.
//! - Unix only (positional I/O, inode and executable bits).

mod chunks;
pub mod collection;
mod decode;
mod encode;
mod error;
mod meta;
mod slot;
mod store;
#[cfg(test)]
mod tests;
mod tree;

pub use blake3::Hash;
pub use chunks::{ChunkSink, ChunkSource, ReadSource, WriteSink};
pub use error::{ReceiveError, StoreError};
pub use shoal_proto::GroupRanges;
pub use store::{
    GcReport, HashedFile, Presence, Store, WholeBlob, WholeOutcome, beside, rename_no_replace,
};

/// How a file is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImportMode {
    /// Reference the file where it is (no second copy on disk); it is
    /// checked for changes (size, mtime, inode) before every use.
    #[default]
    InPlace,
    /// Store a private copy.
    Copy,
}

/// What a blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlobKind {
    /// Opaque bytes (a file).
    #[default]
    Raw,
    /// A manifest ([`shoal_proto::pb::Manifest`]) naming a directory.
    Collection,
}

/// What the store knows about one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// The BLAKE3 hash.
    pub hash: Hash,
    /// Size in bytes (0 while a download has not received its first stream).
    pub size: u64,
    /// True when every group is verified.
    pub complete: bool,
    /// The verified groups.
    pub verified: GroupRanges,
    /// Raw bytes or a collection.
    pub kind: BlobKind,
    /// A human name (file name on import).
    pub name: String,
    /// Whether gc must keep it.
    pub pinned: bool,
    /// Marked corrupt: its data failed a check (when served, exported or
    /// verified), or its file in place vanished. It is not served or
    /// exported until [`Store::verify`] finds it whole again.
    pub corrupt: bool,
}

/// Announcements for subscribers (have updates, progress).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreEvent {
    /// `groups` of `hash` were just verified by [`Store::receive_ranges`].
    Verified {
        /// The blob.
        hash: Hash,
        /// The groups newly verified.
        groups: GroupRanges,
        /// The blob's size as the stream claims it.
        size: u64,
    },
    /// Every group of `hash` is verified; the blob is complete.
    Complete {
        /// The blob.
        hash: Hash,
    },
    /// `hash` was imported (added here, not downloaded): complete, and new
    /// to the store; or [`Store::verify`] found a blob whole that was not
    /// served (marked corrupt, or a file in place that was touched).
    /// Subscribers tell peers waiting for it; it is not a
    /// download finishing (a node announces what it adds by itself, and
    /// every member of a directory would be many announcements).
    Added {
        /// The blob.
        hash: Hash,
    },
}
