//! Error types of the store.

use std::io;
use std::path::{Path, PathBuf};

use crate::collection::ManifestError;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process (or another `Store` in this one) has the store open.
    #[error("store {0} is in use by another process")]
    Locked(PathBuf),
    /// The store's database cannot be read: cut short, overwritten, or
    /// not a database at all.
    #[error(
        "the store's database {path} is damaged ({detail}); move it away (keep it: it may be \
         mended) and the next command records the store's own copies again from its data files, \
         as recovered-<hash> (files shared in place need `shoal add` again)"
    )]
    Damaged {
        /// The database file.
        path: PathBuf,
        /// What the database library said.
        detail: String,
    },
    /// No blob with this hash is known.
    #[error("blob {0} not found")]
    NotFound(blake3::Hash),
    /// The blob is known but not every group is verified yet.
    #[error("blob {0} is incomplete")]
    Incomplete(blake3::Hash),
    /// A byte range touches a group that is not verified.
    #[error("group {group} of blob {hash} is not verified")]
    NotVerified {
        /// The blob.
        hash: blake3::Hash,
        /// The first missing group.
        group: u64,
    },
    /// Stored data does not match the blob's hash.
    #[error("blob {hash} ({name}) is corrupt: stored data does not match its hash")]
    Corrupt {
        /// The blob.
        hash: blake3::Hash,
        /// Its name.
        name: String,
    },
    /// A file added in place was changed, moved or deleted since.
    #[error("file {0} changed or vanished since it was added")]
    SourceChanged(PathBuf),
    /// A file changed while it was being imported.
    #[error("file {0} changed while it was being imported")]
    ChangedDuringImport(PathBuf),
    /// A partial download's file was cut short by someone else while it
    /// downloaded: the groups it lost are dropped, to be fetched again.
    #[error(
        "{path} was cut short while it downloaded ({lost} verified groups lost): run the get \
         again to fetch them"
    )]
    PartialCutShort {
        /// The partial download's file.
        path: PathBuf,
        /// Verified groups that no longer verify.
        lost: u64,
    },
    /// The database refuses every write after one failed for an I/O
    /// error (a full disk, say) until it is opened again (redb's rule).
    #[error(
        "the store's database (meta.redb) stopped after an earlier write failed (a full disk?): \
         free some space, then restart the node (or the command) to open it again"
    )]
    DbStopped,
    /// The disk is full.
    #[error(
        "disk full while {context} {path}: free some space on that disk (`shoal gc` frees \
         what `shoal rm` let go)"
    )]
    DiskFull {
        /// What was being done.
        context: &'static str,
        /// The file concerned.
        path: PathBuf,
    },
    /// The operating system refused access.
    #[error("permission denied while {context} {path}")]
    PermissionDenied {
        /// What was being done.
        context: &'static str,
        /// The file concerned.
        path: PathBuf,
    },
    /// Any other I/O error.
    #[error("i/o error while {context} {path}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The metadata database failed.
    #[error("metadata database error: {0}")]
    Db(String),
    /// A collection's manifest was refused.
    #[error("bad manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// The blob is not a collection, or a collection member is missing.
    #[error("blob {0} is not a usable collection")]
    NotACollection(blake3::Hash),
    /// An export's or a move's target already exists.
    #[error("{0} already exists")]
    Exists(PathBuf),
    /// A directory to add that is (or is in) one kept private
    /// ([`Store::keep_private`](crate::Store::keep_private)).
    #[error(
        "{0}: it is shoal's own data (its store, its identity key), which is never shared; add \
         the files you mean from elsewhere"
    )]
    Private(PathBuf),
    /// A file or directory under a directory being added whose name a
    /// collection cannot carry (receivers refuse it: a control character,
    /// a backslash, a name that is not UTF-8, a path too long). Found
    /// before anything is hashed or recorded.
    #[error(
        "{path:?}: a collection cannot carry this name ({reason}); rename it, or move it out of \
         the directory"
    )]
    UnsharableName {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong with its name.
        reason: &'static str,
    },
    /// A download into a target would write to `<target>.shoal-partial`,
    /// and a file this store did not start is there (another data dir's
    /// download, or the user's file): it is not written over.
    #[error(
        "{0} exists already and is not this download's (another download's, or a file of \
         yours): move it away (or delete it), or choose another output"
    )]
    PartialInTheWay(PathBuf),
    /// Something that is not a regular file or directory.
    #[error("{0} is not a regular file or directory")]
    Unsupported(PathBuf),
    /// A file that reads as more or fewer bytes than its size says, though
    /// it did not change: a pseudo-file (`/proc`, `/sys`), whose content
    /// is made as it is read. Its hash would name nothing stable.
    #[error(
        "{0}: its size says {1} bytes but reading it gives another count, though the file did \
         not change (a /proc or /sys file?); copy it to an ordinary file and add the copy"
    )]
    SizeUntrue(PathBuf, u64),
    /// gc could not read a pinned collection's manifest, so it cannot know
    /// what the collection keeps: nothing was removed.
    #[error(
        "cannot read collection {0} to see what it keeps ({1}); nothing was removed: fetch it \
         again, or `shoal rm {0}` to let gc free what only it kept"
    )]
    CollectionUnreadable(blake3::Hash, Box<StoreError>),
    /// Adds, downloads or collections kept the store busy while gc ran.
    #[error(
        "files kept being added while gc ran (an add or a download under way); nothing was \
         removed, run it again"
    )]
    Busy,
    /// A background task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),
}

impl StoreError {
    /// Classify an I/O error on `path` while doing `context`.
    pub(crate) fn io(context: &'static str, path: &Path, e: io::Error) -> Self {
        let path = path.to_path_buf();
        match e.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                StoreError::DiskFull { context, path }
            }
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                StoreError::PermissionDenied { context, path }
            }
            _ => StoreError::Io {
                context,
                path,
                source: e,
            },
        }
    }

    /// A database error; a full disk under it is [`StoreError::DiskFull`]
    /// (which says what to do), not a database error.
    pub(crate) fn db(e: impl Into<redb::Error>) -> Self {
        let e: redb::Error = e.into();
        if let redb::Error::Io(io) = &e
            && matches!(
                io.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            )
        {
            return StoreError::DiskFull {
                context: "recording in",
                path: PathBuf::from("the store's database (meta.redb)"),
            };
        }
        if let redb::Error::PreviousIo = e {
            return StoreError::DbStopped;
        }
        StoreError::Db(e.to_string())
    }
}

/// Closure helper: `.map_err(io_err("reading", path))`.
pub(crate) fn io_err<'a>(
    context: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |e| StoreError::io(context, path, e)
}

/// What can go wrong while receiving a stream from a peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// The peer sent data that does not match the hash; groups before it
    /// were verified and kept.
    #[error("peer sent corrupt data at group {group}")]
    Corrupt {
        /// The first group that failed to verify.
        group: u64,
    },
    /// The stream's size differs from the size already proven.
    #[error("peer claims size {got}, but the proven size is {expected}")]
    SizeMismatch {
        /// The proven size.
        expected: u64,
        /// The size in the stream.
        got: u64,
    },
    /// The stream's size has no group the stream was to hold (a blob of
    /// `size` bytes ends before `group`): it cannot be verified.
    #[error("peer's stream of a {size}-byte blob cannot hold group {group}")]
    OutOfRange {
        /// The size in the stream.
        size: u64,
        /// The first group past its end.
        group: u64,
    },
    /// The stream ended before all requested groups arrived.
    #[error("stream ended before group {group}")]
    Truncated {
        /// The first group that did not arrive.
        group: u64,
    },
    /// Reading the stream failed.
    #[error("reading from peer failed: {0}")]
    Read(#[source] io::Error),
    /// The store failed (disk full, permissions...).
    #[error(transparent)]
    Store(#[from] StoreError),
}
