//! The store itself: in-memory state mirrored to redb, imports, exports,
//! serving and receiving verified streams, pins and gc.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use bao_tree::BaoTree;
use bao_tree::io::EncodeError;
use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::io::sync::ReadAt;
use bao_tree::iter::BaoChunk;
use bytes::Bytes;
use rayon::prelude::*;
use shoal_proto::{GROUP_SIZE, GroupRanges, group_count};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};

use crate::chunks::{ChunkSink, ChunkSource, ReadSource, WriteSink};
use crate::collection::{self, Entry};
use crate::decode::{Batch, Decoder};
use crate::encode;
use crate::error::io_err;
use crate::meta::{self, Op, Record, loc};
use crate::slot::{self, AlignedBuf, MemBuf, Slot, Window, WriteBack};
use crate::tree::{self, GROUP, bao_tree, chunk_ranges, groups_of_bytes};
use crate::{BlobInfo, BlobKind, ImportMode, ReceiveError, StoreError, StoreEvent};

mod batch;
mod place;
mod served;
use batch::Pending;
pub use batch::{WholeBlob, WholeOutcome};

/// Whether a blob is in the store ([`Store::presence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Not known here.
    Absent,
    /// Being downloaded: some of it (maybe nothing yet) is here.
    Partial,
    /// Here whole, of this size.
    Complete(u64),
}

/// Save a partial blob's verified groups after this many new ones...
const SAVE_EVERY_GROUPS: u64 = 1024;
/// ...or after this long.
const SAVE_EVERY: Duration = Duration::from_secs(2);
/// Files per metadata transaction when importing a directory.
const IMPORT_BATCH: usize = 10_000;
/// How many times gc reads the collections again when one was recorded
/// while it read them, before it gives up.
const GC_TRIES: u32 = 8;
/// How long gc waits for adds and downloads to finish putting files into
/// `data/` before it gives up with [`StoreError::Busy`].
const GC_WAIT: Duration = Duration::from_secs(30);
/// The most one read of a verified stream asks for.
const RECV_PIECE: usize = 256 << 10;
/// Largest contiguous run of received data written with one call.
const WRITE_BATCH: usize = 1 << 20;
/// How far ahead a download reserves disk blocks.
const PREALLOCATE: u64 = 64 << 20;

/// Batches at least this large are written with `O_DIRECT` (see
/// [`Writer::write_direct`]).
const DIRECT_MIN: usize = 256 << 10;

/// What [`Store::gc`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs removed.
    pub blobs: u64,
    /// Bytes of store-owned data and outboards freed (files referenced in
    /// place are never deleted and are not counted).
    pub bytes: u64,
}

/// The store: a directory (or memory) of blobs. Cheap to clone; all clones
/// share one state.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

struct Inner {
    /// None for an in-memory store.
    dir: Option<PathBuf>,
    /// Directories never added as part of a directory (canonical): the
    /// store's own, and whatever [`Store::keep_private`] names (a node's
    /// data dir, which holds its secret key).
    private: Mutex<Vec<PathBuf>>,
    db: Option<redb::Database>,
    state: Mutex<HashMap<blake3::Hash, Blob>>,
    events: broadcast::Sender<StoreEvent>,
    /// Cleared by tests to simulate a crash (no flush on drop).
    flush_on_drop: AtomicBool,
    tmp_counter: AtomicU64,
    /// Records not committed yet (see `batch`), written by the next
    /// commit ([`Inner::apply`]).
    pending: Mutex<Pending>,
    /// This boot (`boot_id`), marked on files written unsynced.
    boot: Bytes,
    /// The content of the inline blobs of `pending` that a commit took and
    /// has not finished writing (readers find them here meanwhile).
    committing: Mutex<HashMap<blake3::Hash, Bytes>>,
    /// One [`Inner::apply`] at a time, its undo after a failed commit
    /// included (redb alone would let another commit in between).
    apply_one: Mutex<()>,
    /// A non-durable commit was made since the last durable one
    /// ([`Store::flush`] then commits durably even with nothing pending).
    undurable: AtomicBool,
    /// Blobs whose records failed to load at open (a partial download on
    /// an unmounted disk, say): left in the database, so a new record for
    /// one is written on its own, over the old (not in a group, which the
    /// old record would override).
    unloaded: Mutex<HashSet<blake3::Hash>>,
    /// Blobs whose records are in a group (`meta::GROUPS`), and which.
    grouped: Mutex<HashMap<blake3::Hash, u64>>,
    /// The id of the next group.
    next_group: AtomicU64,
    /// Small blobs served lately (`store/served.rs`). Locked after
    /// `state` when both are.
    served: Mutex<served::Served>,
    /// Blobs gc keeps for now though nothing pins them: the members of a
    /// directory being imported, until the manifest that keeps them is
    /// recorded. A count per blob (two imports may share files). Locked
    /// after `state` when both are.
    held: Mutex<HashMap<blake3::Hash, usize>>,
    /// Held shared by whatever puts files into `data/` (imports, small
    /// blobs fetched whole, a download's partial files) until their
    /// records are in the state, and exclusively by gc from its choice of
    /// what is dead to its last unlink. Otherwise a blob gc had just found
    /// dead, added or fetched again meanwhile, had its new files unlinked
    /// under its new record (the paths are the hash's). Always taken
    /// before the state's lock, never twice on one thread.
    files: RwLock<()>,
    /// Blobs hashed again at open, after a reboot (tests).
    #[cfg(test)]
    rechecks: AtomicUsize,
    /// Set: every commit fails, after writing into its transaction (tests).
    #[cfg(test)]
    fail_commits: AtomicBool,
    /// Counts this store in [`Store::open_count`] until everything above
    /// has been dropped (the database closed): declared last, dropped last.
    _open: Option<OpenGuard>,
}

/// Stores on disk opened and not yet wholly closed, in this process.
static OPEN_STORES: AtomicUsize = AtomicUsize::new(0);

/// One store on disk in [`OPEN_STORES`].
struct OpenGuard;

impl OpenGuard {
    fn new() -> Self {
        OPEN_STORES.fetch_add(1, Ordering::SeqCst);
        OpenGuard
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        OPEN_STORES.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Inner {
    /// A store's state, empty; on disk when `dir` and `db` are given (and
    /// then counted in [`Store::open_count`]).
    fn new(dir: Option<PathBuf>, db: Option<redb::Database>, boot: Bytes) -> Inner {
        let on_disk = db.is_some();
        let private = dir
            .iter()
            .filter_map(|d| fs::canonicalize(d).ok())
            .collect();
        Inner {
            dir,
            private: Mutex::new(private),
            db,
            state: Mutex::new(HashMap::new()),
            events: broadcast::channel(1024).0,
            flush_on_drop: AtomicBool::new(true),
            tmp_counter: AtomicU64::new(0),
            pending: Mutex::new(Pending::default()),
            boot,
            committing: Mutex::new(HashMap::new()),
            apply_one: Mutex::new(()),
            undurable: AtomicBool::new(false),
            unloaded: Mutex::new(HashSet::new()),
            grouped: Mutex::new(HashMap::new()),
            next_group: AtomicU64::new(0),
            served: Mutex::new(served::Served::new(served::DEFAULT_BUDGET)),
            held: Mutex::new(HashMap::new()),
            files: RwLock::new(()),
            #[cfg(test)]
            rechecks: AtomicUsize::new(0),
            #[cfg(test)]
            fail_commits: AtomicBool::new(false),
            _open: on_disk.then(OpenGuard::new),
        }
    }
}

/// A file's identity when it was hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: i64,
    ino: u64,
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Self {
        Stamp {
            size: m.len(),
            mtime_ns: m
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.mtime_nsec()),
            ino: m.ino(),
        }
    }
}

#[derive(Debug, Clone)]
enum DataRef {
    Mem(Arc<MemBuf>),
    /// In the `INLINE` table.
    Db,
    /// A file; `stamp` is set for files referenced in place.
    File {
        path: PathBuf,
        stamp: Option<Stamp>,
    },
}

#[derive(Debug, Clone)]
enum ObRef {
    None,
    Mem(Arc<MemBuf>),
    File(PathBuf),
}

struct Blob {
    size: Option<u64>,
    kind: BlobKind,
    name: String,
    pinned: bool,
    corrupt: bool,
    data: DataRef,
    outboard: ObRef,
    /// Set while the blob is incomplete.
    partial: Option<Arc<Partial>>,
    /// A download is writing it (gc keeps it).
    in_flight: bool,
    /// Its file was written without a sync, in this boot (see `batch`).
    unsynced: Option<Bytes>,
}

/// A blob being downloaded.
struct Partial {
    data: Slot,
    outboard: Slot,
    /// The file the data is written to (`<target>.shoal-partial` or
    /// `data/<hex>.data`), if on disk.
    data_path: Option<PathBuf>,
    /// The data file opened with `O_DIRECT`, at the first large batch
    /// (`None` inside: the filesystem refused it, or a write through it
    /// failed with `EINVAL`; batches are then written the usual way).
    direct: OnceLock<Option<File>>,
    direct_off: AtomicBool,
    target: Option<PathBuf>,
    st: Mutex<PState>,
    /// Held (shared) by a stream's writer while it writes and marks, and
    /// (alone) while the partial is finished or reset to another size: a
    /// second stream of the same blob (two downloads of it at once) wrote
    /// into the file after it was renamed into place and stamped, and the
    /// finished file was then taken for one the user changed.
    gate: RwLock<()>,
}

impl Partial {
    /// The `O_DIRECT` descriptor of the data file, opened on first use.
    fn direct(&self) -> Option<&File> {
        if self.direct_off.load(Ordering::Relaxed) {
            return None;
        }
        let path = self.data_path.as_deref()?;
        let Slot::File(f) = &self.data else {
            return None;
        };
        self.direct
            .get_or_init(|| slot::open_direct(path, f))
            .as_ref()
    }
}

struct PState {
    size: Option<u64>,
    verified: GroupRanges,
    /// The size is known for sure (a salvaged complete copy), whatever
    /// `verified` holds.
    size_proven: bool,
    /// Bumped when the partial is reset to another size: writers of the old
    /// generation must not mark groups.
    generation: u64,
    unsaved: u64,
    last_save: Instant,
    done: bool,
}

impl PState {
    fn proven(&self) -> bool {
        self.size
            .is_some_and(|s| self.size_proven || self.verified.contains(group_count(s) - 1))
    }
}

/// A blob opened for reading.
struct Source {
    size: u64,
    name: String,
    data: Slot,
    outboard: Slot,
    /// None when complete.
    verified: Option<GroupRanges>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shared hold of `Inner::files`: files may be put into `data/`.
fn adding_files(inner: &Inner) -> RwLockReadGuard<'_, ()> {
    inner.files.read().unwrap_or_else(|e| e.into_inner())
}

/// The pinned, complete collections of `st`: what gc must read to know
/// what they keep.
fn pinned_collections(st: &HashMap<blake3::Hash, Blob>) -> HashSet<blake3::Hash> {
    st.iter()
        .filter(|(_, b)| is_pinned_collection(b))
        .map(|(h, _)| *h)
        .collect()
}

/// A pinned, complete collection: gc keeps what it names.
fn is_pinned_collection(b: &Blob) -> bool {
    b.pinned && b.kind == BlobKind::Collection && b.partial.is_none()
}

/// Blobs held from gc (see `Inner::held`) until this is dropped.
struct Hold<'a> {
    inner: &'a Inner,
    hashes: Vec<blake3::Hash>,
}

impl<'a> Hold<'a> {
    fn new(inner: &'a Inner) -> Self {
        Hold {
            inner,
            hashes: Vec::new(),
        }
    }

    fn add(&mut self, hashes: impl IntoIterator<Item = blake3::Hash>) {
        let mut held = lock(&self.inner.held);
        for h in hashes {
            *held.entry(h).or_insert(0) += 1;
            self.hashes.push(h);
        }
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut held = lock(&self.inner.held);
        for h in &self.hashes {
            if let Some(n) = held.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    held.remove(h);
                }
            }
        }
    }
}

fn kind_to_u32(k: BlobKind) -> u32 {
    match k {
        BlobKind::Raw => 0,
        BlobKind::Collection => 1,
    }
}

fn kind_from_u32(k: u32) -> BlobKind {
    if k == 1 {
        BlobKind::Collection
    } else {
        BlobKind::Raw
    }
}

fn runs_to_vec(g: &GroupRanges) -> Vec<u64> {
    g.runs().iter().flat_map(|r| [r.start, r.end]).collect()
}

fn runs_from_vec(v: &[u64]) -> GroupRanges {
    v.chunks_exact(2).map(|p| p[0]..p[1].max(p[0])).collect()
}

/// All groups of a blob of `size` bytes.
fn all_groups(size: u64) -> GroupRanges {
    GroupRanges::from_range(0..group_count(size))
}

/// The bytes a bao-tree encoding of `chunks` takes, after the size header.
fn encoded_len(tree: BaoTree, chunks: &bao_tree::ChunkRanges) -> u64 {
    let ranges = bao_tree::io::sync::truncate_ranges(chunks, tree.size());
    tree.ranges_pre_order_chunks_iter_ref(ranges, 0)
        .map(|c| match c {
            BaoChunk::Parent { .. } => 64,
            BaoChunk::Leaf { size, .. } => size as u64,
        })
        .sum()
}

/// Something prepared for the metadata database by an import.
struct Prepared {
    hash: blake3::Hash,
    size: u64,
    name: String,
    kind: BlobKind,
    data: DataRef,
    outboard: ObRef,
    inline: Option<Vec<u8>>,
    /// The file was written without a sync, in this boot (see `batch`).
    unsynced: Option<Bytes>,
    /// Pin it (else something else keeps it: a collection naming it).
    pin: bool,
}

impl Prepared {
    /// The new complete blob this describes (pinned if `pin`); the
    /// database changes that record it are added to `ops`.
    fn record_new(self, ops: &mut Vec<Op>) -> (blake3::Hash, Blob) {
        let b = Blob {
            size: Some(self.size),
            kind: self.kind,
            name: self.name,
            pinned: self.pin,
            corrupt: false,
            data: self.data,
            outboard: self.outboard,
            partial: None,
            in_flight: false,
            unsynced: self.unsynced,
        };
        if let Some(d) = self.inline {
            ops.push(Op::PutInline(self.hash, d));
        }
        ops.push(Op::Put(self.hash, record_of(&b)));
        (self.hash, b)
    }
}

/// A file hashed to be added in place, not yet recorded in any store: the
/// first half of an [`ImportMode::InPlace`] [`Store::import_file`], which
/// needs no store. A caller can hash while [`Store::open`] runs on another
/// thread (opening and closing redb costs several `fdatasync`s, a fixed
/// cost that would otherwise come on top of the hashing), then record it
/// with [`Store::import_hashed`].
#[derive(Debug)]
pub struct HashedFile {
    hash: blake3::Hash,
    size: u64,
    name: String,
    /// Canonical path.
    path: PathBuf,
    stamp: Stamp,
    outboard: tree::Outboard,
}

impl HashedFile {
    /// Hash the regular file at `path` (with every core).
    pub fn new(path: &Path) -> Result<HashedFile, StoreError> {
        let (f, s0) = open_regular(path)?;
        HashedFile::hash_open(f, path, s0, file_name(path))
    }

    /// Hash `f`, open at `path` with stamp `s0`; fails if the file changes
    /// while it is hashed.
    fn hash_open(f: File, path: &Path, s0: Stamp, name: String) -> Result<Self, StoreError> {
        let changed = || StoreError::ChangedDuringImport(path.to_path_buf());
        let (hash, len, outboard) =
            match tree::hash_file(&f, s0.size).map_err(io_err("reading", path))? {
                tree::FileHash::Hashed(h, len, ob) => (h, len, ob),
                tree::FileHash::Shrank => return Err(changed()),
            };
        unchanged(&f, path, s0)?;
        if len != s0.size {
            return Err(StoreError::SizeUntrue(path.to_path_buf(), s0.size));
        }
        let path = fs::canonicalize(path).map_err(io_err("resolving", path))?;
        Ok(HashedFile {
            hash,
            size: len,
            name,
            path,
            stamp: s0,
            outboard,
        })
    }

    /// The file's BLAKE3 hash.
    pub fn hash(&self) -> blake3::Hash {
        self.hash
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
thread_local! {
    /// Set: this thread creates and keeps databases in redb's v2 format, as
    /// stores made before 2026-11-30 have them.
    pub(crate) static CREATE_V2: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Outboards at least this long (those of files of 64 MiB and more) are
/// sent to disk as they are written (see [`WriteBack`]).
const OB_WRITEBACK_MIN: u64 = 256 << 10;

/// Open (or create) the store's database at `db_path`, in redb's file
/// format v3; a database in the older v2 format is upgraded (true).
///
/// v3 because closing a v2 database also rewrites its region tracker's
/// pages before the final syncs: ~1.5 ms of every `shoal add` here (12
/// alternating rounds: 89.7 -> 88.2 ms for 1 GiB). redb 3 and later read
/// only v3, so this is also the way to them. The upgrade is one way: a
/// shoal built on redb older than 2.6 cannot open the store afterwards.
pub(crate) fn open_db(dir: &Path, db_path: &Path) -> Result<(redb::Database, bool), StoreError> {
    #[cfg(test)]
    let v3 = !CREATE_V2.get();
    #[cfg(not(test))]
    let v3 = true;
    if !db_path.exists() {
        create_db(dir, db_path, v3)?;
    }
    let damaged = |detail: String| StoreError::Damaged {
        path: db_path.to_path_buf(),
        detail,
    };
    // redb asserts, rather than checks, some of what it reads from the
    // file (a file cut short fails an assertion): a damaged database must
    // be an error that says what to do, not a panic.
    let opened = quietly(|| {
        redb::Builder::new()
            .create_with_file_format_v3(v3)
            .create(db_path)
    })
    .map_err(|panic| damaged(panic_message(&panic)))?;
    let mut db = match opened {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
            return Err(StoreError::Locked(dir.to_path_buf()));
        }
        Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
            if e.kind() == io::ErrorKind::InvalidData =>
        {
            return Err(damaged(e.to_string()));
        }
        Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))) => {
            return Err(StoreError::io("opening", db_path, e));
        }
        Err(e @ redb::DatabaseError::Storage(redb::StorageError::Corrupted(_))) => {
            return Err(damaged(e.to_string()));
        }
        Err(e) => return Err(StoreError::db(e)),
    };
    #[cfg(test)]
    if CREATE_V2.get() {
        return Ok((db, false));
    }
    // The store makes no savepoints, and nothing else has the database
    // open yet: the upgrade's preconditions hold.
    let upgraded = match db.upgrade() {
        Ok(u) => u,
        Err(redb::UpgradeError::Storage(redb::StorageError::Io(e))) => {
            return Err(StoreError::io("upgrading", db_path, e));
        }
        Err(e) => return Err(StoreError::db(e)),
    };
    if upgraded {
        tracing::info!("upgraded {} to redb's file format v3", db_path.display());
    }
    Ok((db, upgraded))
}

/// Sets the store's own files of `b` (never a file shared in place)
/// aside: each is renamed to a `tmp-` name that `unaside` deletes (or the
/// next open, after a kill), pushed onto `aside`; a rename is quick where
/// deleting a file of gigabytes is not, and it is done while the store's
/// state is locked. Returns the bytes they take (for data kept in the
/// database, its size).
fn set_aside_files_of(inner: &Inner, b: &Blob, aside: &mut Vec<PathBuf>) -> u64 {
    let mut bytes = 0;
    let mut files = Vec::new();
    if let DataRef::File { path, stamp: None } = &b.data {
        files.push(path.clone());
    }
    if let Some(p) = b.partial.as_ref().and_then(|p| p.data_path.clone()) {
        files.push(p);
    }
    if let ObRef::File(p) = &b.outboard {
        files.push(p.clone());
    }
    // A partial download's data is in its file (counted below), whatever
    // `data` says (a review found gc counting both).
    if b.partial.is_none() && matches!(b.data, DataRef::Db | DataRef::Mem(_)) {
        bytes += b.size.unwrap_or(0);
    }
    files.sort();
    files.dedup();
    for f in files {
        // What it took on disk (a partial download's file is sparse).
        let len = fs::metadata(&f).map_or(0, |m| m.blocks() * 512);
        let moved = match inner.tmp_path() {
            Some(tmp) => fs::rename(&f, &tmp).map(|()| tmp),
            None => Err(io::ErrorKind::Unsupported.into()),
        };
        match moved {
            Ok(tmp) => {
                bytes += len;
                aside.push(tmp);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // (A partial download's file beside the user's output is on
            // another filesystem maybe: deleted where it is.)
            Err(_) => match fs::remove_file(&f) {
                Ok(()) => bytes += len,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("gc: cannot remove {}: {e}", f.display()),
            },
        }
    }
    bytes
}

/// The groups of a `size`-byte blob that overlap a hole of `f`
/// (`SEEK_HOLE`); none where the filesystem cannot say. A written file
/// has none where it was written (a filesystem that stores runs of zeros
/// as holes reports them too: checked again, they verify).
fn groups_in_holes(f: &File, size: u64) -> GroupRanges {
    use rustix::fs::{SeekFrom, seek};
    let mut holes = GroupRanges::new();
    let mut off = 0;
    while off < size {
        let Ok(hole) = seek(f, SeekFrom::Hole(off)) else {
            break;
        };
        if hole >= size {
            break;
        }
        // No data after it (ENXIO): a hole to the end.
        let data = seek(f, SeekFrom::Data(hole)).map_or(size, |d| d.min(size));
        holes.insert(hole / GROUP_SIZE..data.div_ceil(GROUP_SIZE));
        if data <= hole {
            break;
        }
        off = data;
    }
    holes
}

/// Deletes the files [`set_aside_files_of`] set aside.
fn unaside(aside: &mut Vec<PathBuf>) {
    for f in aside.drain(..) {
        if let Err(e) = fs::remove_file(&f) {
            tracing::warn!("gc: cannot remove {}: {e}", f.display());
        }
    }
}

/// Creates the database at `db_path`, which is not there: under another
/// name first, then linked into place, so that a process killed while
/// redb writes a new file (its header last) leaves no half-made database
/// behind that every later open would refuse. One created meanwhile by
/// another process is kept.
fn create_db(dir: &Path, db_path: &Path, v3: bool) -> Result<(), StoreError> {
    let tmp = db_path.with_extension(format!("redb.new-{}", std::process::id()));
    // A leftover of a process with this id (ids are reused).
    let _ = fs::remove_file(&tmp);
    let made = redb::Builder::new()
        .create_with_file_format_v3(v3)
        .create(&tmp);
    match made {
        Ok(db) => drop(db),
        Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))) => {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io("creating", &tmp, e));
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::db(e));
        }
    }
    let linked = match fs::hard_link(&tmp, db_path) {
        // A filesystem without hard links: a rename, which would replace
        // one made meanwhile (two first commands at once on such a disk).
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => fs::rename(&tmp, db_path),
        r => r,
    };
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(StoreError::io("creating", db_path, e)),
    }
    // The new name is durable before anything is recorded under it.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    // Leftovers of processes killed while creating one.
    let prefix = format!(
        "{}.new-",
        db_path.file_name().unwrap_or_default().to_string_lossy()
    );
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix(prefix.as_str()))
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

thread_local! {
    /// Set while [`quietly`] runs `f` on this thread.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching a panic in it without the panic hook's report (the
/// caller turns it into an error). Other threads' panics are reported as
/// before: the hook is wrapped once, and stays quiet only on this thread
/// while `f` runs.
fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static WRAPPED: std::sync::Once = std::sync::Once::new();
    WRAPPED.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                before(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    r
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "the database library failed on it".into())
}

impl Store {
    /// Open (or create) the store in `dir`. Only one process may have a
    /// store open at a time: a second open gets [`StoreError::Locked`].
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_in_boot(dir, boot_id())
    }

    /// [`Store::open`], as if in the boot `boot` (tests fake a reboot).
    fn open_in_boot(dir: &Path, boot: Bytes) -> Result<Store, StoreError> {
        fs::create_dir_all(dir.join("data")).map_err(io_err("creating", dir))?;
        let db_path = dir.join("meta.redb");
        let (db, _) = open_db(dir, &db_path)?;
        let (mut records, next_group) = meta::load_all(&db)?;
        let lost_records = records.is_empty();
        place::finish_moves(&db, &mut records);
        let inner = Inner::new(Some(dir.to_path_buf()), Some(db), boot);
        inner.remove_tmp_files();
        inner.next_group.store(next_group, Ordering::SeqCst);
        let mut blobs = HashMap::with_capacity(records.len());
        let mut grouped = HashMap::new();
        let mut unloaded = HashSet::new();
        // Recorded partial, found finished at their target.
        let mut finished = Vec::new();
        for (hash, r, group) in records {
            match inner.blob_from_record(&hash, &r) {
                Ok(b) => {
                    if !r.complete && b.partial.is_none() {
                        finished.push((hash, record_of(&b)));
                    }
                    blobs.insert(hash, b);
                }
                Err(e) => {
                    // Left in the database: the cause may pass (a disk
                    // not mounted yet).
                    tracing::warn!("leaving blob {hash} out of the store: {e}");
                    unloaded.insert(hash);
                }
            }
            if let Some(id) = group {
                grouped.insert(hash, id);
            }
        }
        *lock(&inner.grouped) = grouped;
        *lock(&inner.unloaded) = unloaded;
        inner.recheck_after_reboot(&mut blobs);
        *lock(&inner.state) = blobs;
        for (hash, rec) in finished {
            if let Err(e) = inner.persist(&hash, rec, true) {
                // Found again at the next open.
                tracing::warn!("cannot record that {hash} is complete: {e}");
            }
        }
        let store = Store {
            inner: Arc::new(inner),
        };
        if lost_records {
            store.recover_owned_files();
        }
        Ok(store)
    }

    /// The database has no record, yet `data/` holds blobs' copies: the
    /// records were lost (a `meta.redb` truncated or replaced by hand, a
    /// disk that gave back zeros), and the store looked empty while its
    /// copies stayed. Each `data/<hash>.data` that hashes to its name is
    /// recorded again, complete and pinned (which pins were the user's is
    /// not known), named `recovered-<hash>`; one that does not (a partial
    /// download, useless without its record) is moved to `data/unrecovered/`,
    /// so that it is not hashed again at every open. Files shared in
    /// place, and small blobs kept in the database, cannot be found this
    /// way: `shoal add` them again.
    fn recover_owned_files(&self) {
        let Some(d) = self.inner.data_dir() else {
            return;
        };
        let Ok(rd) = fs::read_dir(&d) else { return };
        let mut found = 0usize;
        let mut recovered = 0usize;
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".data")) else {
                continue;
            };
            let Ok(named) = blake3::Hash::from_hex(hex) else {
                continue;
            };
            found += 1;
            let h = match HashedFile::new(&e.path()) {
                Ok(h) if h.hash == named => h,
                Ok(_) => {
                    let aside = d.join("unrecovered");
                    if let Err(err) = fs::create_dir_all(&aside)
                        .and_then(|()| fs::rename(e.path(), aside.join(&name)))
                    {
                        tracing::warn!("moving {} aside: {err}", e.path().display());
                    }
                    continue;
                }
                Err(err) => {
                    tracing::warn!("recovering {}: {err}", e.path().display());
                    continue;
                }
            };
            let res = (|| {
                let _files = adding_files(&self.inner);
                let mut p = self.inner.prepare_hashed(h)?;
                // The store's own copy, not a file shared in place.
                p.data = DataRef::File {
                    path: e.path(),
                    stamp: None,
                };
                p.name = format!("recovered-{}", &hex[..16]);
                self.inner.commit(vec![p])
            })();
            match res {
                Ok(()) => recovered += 1,
                Err(err) => tracing::warn!("recovering {}: {err}", e.path().display()),
            }
        }
        if found > 0 {
            tracing::warn!(
                "the store's records were lost (its database holds none); {recovered} of the {found} \
                 blobs found in {} were recovered, pinned, as recovered-<hash> (the others, partial \
                 downloads, are in unrecovered/); files shared in place must be added again",
                d.display()
            );
        }
    }

    /// A store that lives in memory only (files added in place are still
    /// referenced in place, and download targets are still written).
    pub fn in_memory() -> Store {
        Store {
            inner: Arc::new(Inner::new(None, None, boot_id())),
        }
    }

    /// Stores on disk that this process has open, or is still closing: a
    /// store's last clone may live on in a task that outlived its caller,
    /// and its drop saves partial downloads and closes the database. A
    /// process that exits without waiting for its threads checks that this
    /// is 0 first.
    pub fn open_count() -> usize {
        OPEN_STORES.load(Ordering::SeqCst)
    }

    /// The store's directory (None in memory).
    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    /// Persist partial state now and drop this handle (the store closes
    /// when the last clone is dropped; dropping does the same).
    pub fn close(self) -> Result<(), StoreError> {
        self.inner.save_all_partials()?;
        self.flush()
    }

    /// Simulate a crash: this handle is dropped without persisting anything.
    #[cfg(test)]
    pub(crate) fn crash(self) {
        self.inner.flush_on_drop.store(false, Ordering::SeqCst);
    }

    /// Record a move of `hash`'s partial download to `to`, as
    /// `Inner::retarget` does first, without making it: the state a stop
    /// between the two leaves.
    #[cfg(test)]
    pub(crate) fn record_move_only(&self, hash: &blake3::Hash, to: &Path) {
        let st = lock(&self.inner.state);
        let b = &st[hash];
        let mut rec = record_of(b);
        rec.path = to.as_os_str().as_bytes().to_vec();
        let from = b.partial.as_ref().and_then(|p| p.target.as_deref());
        rec.moved_from = Some(from.map_or_else(Vec::new, |o| o.as_os_str().as_bytes().to_vec()));
        self.inner.persist(hash, rec, true).unwrap();
    }

    /// Make every commit fail from now on (`on`), as a full or failing
    /// disk would, or commit again.
    #[cfg(test)]
    pub(crate) fn fail_commits(&self, on: bool) {
        self.inner.fail_commits.store(on, Ordering::SeqCst);
    }

    /// Subscribe to verification and completion events.
    pub fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.events.subscribe()
    }

    // ---------------------------------------------------------------- import

    /// Add a file (blocking, hashes with every core). Pinned; named after
    /// the file name.
    pub fn import_file(&self, path: &Path, mode: ImportMode) -> Result<blake3::Hash, StoreError> {
        self.inner.not_private(path)?;
        let _files = adding_files(&self.inner);
        let p = self.inner.prepare_file(path, mode, file_name(path))?;
        let hash = p.hash;
        self.inner.commit(vec![p])?;
        Ok(hash)
    }

    /// Record a file hashed by [`HashedFile::new`] (in place, pinned, named
    /// after the file name). Fails if the file changed since it was hashed.
    pub fn import_hashed(&self, h: HashedFile) -> Result<blake3::Hash, StoreError> {
        if !stamp_matches(&h.path, h.stamp) {
            return Err(StoreError::ChangedDuringImport(h.path));
        }
        self.inner.not_private(&h.path)?;
        let _files = adding_files(&self.inner);
        let p = self.inner.prepare_hashed(h)?;
        let hash = p.hash;
        self.inner.commit(vec![p])?;
        Ok(hash)
    }

    /// Add bytes (blocking). Pinned.
    pub fn import_bytes(&self, data: &[u8], name: &str) -> Result<blake3::Hash, StoreError> {
        let _files = adding_files(&self.inner);
        let p = self
            .inner
            .prepare_bytes(data, name.to_owned(), BlobKind::Raw)?;
        let hash = p.hash;
        self.inner.commit(vec![p])?;
        Ok(hash)
    }

    /// Add a directory as a collection (blocking): every file is added
    /// (hashed in parallel, committed in batches), then a manifest of all
    /// files and empty directories, sorted by path, whose hash is returned
    /// and pinned. Symbolic links are skipped.
    pub fn import_dir(&self, path: &Path, mode: ImportMode) -> Result<blake3::Hash, StoreError> {
        let mut files = Vec::new();
        let mut empty_dirs = Vec::new();
        let private = lock(&self.inner.private).clone();
        let root = fs::canonicalize(path).map_err(io_err("reading", path))?;
        if private.iter().any(|p| root.starts_with(p)) {
            return Err(StoreError::Private(path.to_path_buf()));
        }
        let walking = Walk {
            root: path,
            canonical: &root,
            private: &private,
        };
        walk(&walking, "", &mut files, &mut empty_dirs)?;
        files.sort();
        let mut entries = Vec::with_capacity(files.len() + empty_dirs.len());
        // The members are recorded unpinned (the manifest keeps them, so
        // that `rm` of the collection frees them), and held from gc until
        // the manifest is recorded. A member pinned already (added on its
        // own) keeps its pin.
        let mut hold = Hold::new(&self.inner);
        for batch in files.chunks(IMPORT_BATCH) {
            let _files = adding_files(&self.inner);
            let prepared: Vec<Result<(Prepared, bool), StoreError>> = batch
                .par_iter()
                .map(|rel| {
                    let full = path.join(rel);
                    let meta = fs::metadata(&full).map_err(io_err("reading", &full))?;
                    let exec = meta.permissions().mode() & 0o111 != 0;
                    let name = rel.rsplit('/').next().unwrap_or(rel).to_owned();
                    Ok((self.inner.prepare_file(&full, mode, name)?, exec))
                })
                .collect();
            let mut ok = Vec::with_capacity(prepared.len());
            for (rel, p) in batch.iter().zip(prepared) {
                let (mut p, executable) = p?;
                p.pin = false;
                entries.push(Entry {
                    path: rel.clone(),
                    size: p.size,
                    hash: p.hash,
                    executable,
                    empty_dir: false,
                });
                ok.push(p);
            }
            hold.add(ok.iter().map(|p| p.hash));
            self.inner.commit(ok)?;
        }
        for d in empty_dirs {
            entries.push(Entry {
                path: d,
                size: 0,
                hash: blake3::hash(b""),
                executable: false,
                empty_dir: true,
            });
        }
        let manifest = collection::encode_manifest(&entries);
        // Refuse to create what we would refuse to read (odd names).
        collection::parse_manifest(&manifest)?;
        let _files = adding_files(&self.inner);
        let p = self
            .inner
            .prepare_bytes(&manifest, file_name(path), BlobKind::Collection)?;
        let hash = p.hash;
        self.inner.commit(vec![p])?;
        drop(hold);
        Ok(hash)
    }

    // ------------------------------------------------------------ queries

    /// Whether each of `hashes` is here, in part or complete (and then its
    /// size): [`Store::info`]'s answer to that one question, for many
    /// blobs under one lock and without copying anything else (info()
    /// copies each blob's name and builds its range set: ~3% of a seeder's
    /// CPU serving 10,000 small files).
    pub fn presence(&self, hashes: &[blake3::Hash]) -> Vec<Presence> {
        let st = lock(&self.inner.state);
        hashes
            .iter()
            .map(|h| match st.get(h) {
                None => Presence::Absent,
                // Never served (a request for it would find it absent).
                Some(b) if b.corrupt => Presence::Absent,
                Some(b) if b.partial.is_some() => Presence::Partial,
                Some(b) => Presence::Complete(b.size.unwrap_or(0)),
            })
            .collect()
    }

    /// What the store knows about `hash`.
    pub fn info(&self, hash: &blake3::Hash) -> Option<BlobInfo> {
        let st = lock(&self.inner.state);
        st.get(hash).map(|b| info_of(hash, b))
    }

    /// Every blob, sorted by hash.
    pub fn list(&self) -> Vec<BlobInfo> {
        let st = lock(&self.inner.state);
        let mut v: Vec<BlobInfo> = st.iter().map(|(h, b)| info_of(h, b)).collect();
        v.sort_by(|a, b| a.hash.as_bytes().cmp(b.hash.as_bytes()));
        v
    }

    /// Pin a blob (and set its kind) so gc keeps it.
    pub fn pin(&self, hash: &blake3::Hash, kind: BlobKind) -> Result<(), StoreError> {
        self.inner.update_or_undo(hash, |b| {
            b.pinned = true;
            b.kind = kind;
        })
    }

    /// Name a blob that has no name of its own yet (only its hash's first
    /// 16 digits, as a download by hash is named): a collection fetched
    /// into a directory takes the directory's name.
    pub fn name_if_unnamed(&self, hash: &blake3::Hash, name: &str) -> Result<(), StoreError> {
        let default = &hash.to_hex()[..16];
        {
            let st = lock(&self.inner.state);
            match st.get(hash) {
                Some(b) if b.name.is_empty() || b.name == default => {}
                _ => return Ok(()),
            }
        }
        self.inner.update_or_undo(hash, |b| {
            if b.name.is_empty() || b.name == default {
                b.name = name.to_string();
            }
        })
    }

    /// Never add `dir` (nor what is under it) as part of a directory:
    /// it is skipped, with a warning, and adding it or a directory in it
    /// fails. A node's data dir, which holds its secret key beside the
    /// store (the store's own directory is private already).
    pub fn keep_private(&self, dir: &Path) -> Result<(), StoreError> {
        let dir = fs::canonicalize(dir).map_err(io_err("reading", dir))?;
        let mut private = lock(&self.inner.private);
        if !private.contains(&dir) {
            private.push(dir);
        }
        Ok(())
    }

    /// Unpin a blob: gc may remove it unless a pinned collection needs it.
    pub fn unpin(&self, hash: &blake3::Hash) -> Result<(), StoreError> {
        self.inner.update_or_undo(hash, |b| b.pinned = false)
    }

    /// Whether `hash` is here and pinned.
    pub fn is_pinned(&self, hash: &blake3::Hash) -> bool {
        lock(&self.inner.state).get(hash).is_some_and(|b| b.pinned)
    }

    /// Every blob a pinned, complete collection names: gc keeps them
    /// whether or not they are pinned themselves. A collection whose
    /// manifest cannot be read is skipped with a warning (gc, which must
    /// not guess, stops instead).
    pub fn kept_by_collections(&self) -> HashSet<blake3::Hash> {
        let (_, live) = self.kept(false).unwrap_or_default();
        live
    }

    /// The pinned, complete collections and every blob they name. With
    /// `strict`, a manifest that cannot be read is an error rather than a
    /// warning.
    fn kept(
        &self,
        strict: bool,
    ) -> Result<(HashSet<blake3::Hash>, HashSet<blake3::Hash>), StoreError> {
        let (collections, candidates) = {
            let st = lock(&self.inner.state);
            (pinned_collections(&st), st.len())
        };
        let mut live: HashSet<blake3::Hash> = HashSet::with_capacity(candidates);
        for c in &collections {
            let entries = match self.read_manifest(c) {
                Ok(e) => e,
                // Unpinned or removed since it was listed: keeps nothing.
                Err(_)
                    if !lock(&self.inner.state)
                        .get(c)
                        .is_some_and(is_pinned_collection) =>
                {
                    continue;
                }
                // A bad manifest names nothing (the same whatever reads it).
                Err(e @ StoreError::Manifest(_)) => {
                    tracing::warn!(
                        "collection {c} has a bad manifest; what it names is not kept: {e}"
                    );
                    continue;
                }
                Err(e) if strict => return Err(StoreError::CollectionUnreadable(*c, Box::new(e))),
                Err(e) => {
                    tracing::warn!("cannot read collection {c} to see what it keeps: {e}");
                    continue;
                }
            };
            live.extend(entries.iter().filter(|e| !e.empty_dir).map(|e| e.hash));
        }
        Ok((collections, live))
    }

    /// Remove every blob that no pin needs: pinned blobs, members of pinned
    /// complete collections and downloads in flight are kept. Files
    /// referenced in place are never deleted. Removes nothing, and says
    /// which, if a pinned collection's manifest cannot be read
    /// ([`StoreError::CollectionUnreadable`]): what it keeps is unknown.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        // The manifests are read without the state's lock; a collection
        // pinned meanwhile (an import or a fetch recording its manifest,
        // then letting its members go) would leave its members unkept, so
        // the reading is done again until no collection came in between.
        // Never queued as a waiting writer: on Linux that stops new readers,
        // and an add hashing a large file holds a read for minutes, so every
        // download beginning meanwhile (on an async worker) would wait for
        // it too. Tried for a while, then `Busy`.
        let started = Instant::now();
        let files_guard = loop {
            match self.inner.files.try_write() {
                Ok(g) => break g,
                Err(std::sync::TryLockError::Poisoned(e)) => break e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if started.elapsed() < GC_WAIT => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(std::sync::TryLockError::WouldBlock) => return Err(StoreError::Busy),
            }
        };
        let mut tries = 0;
        let removed = loop {
            let (seen, live) = self.kept(true)?;
            let mut st = lock(&self.inner.state);
            if !pinned_collections(&st).is_subset(&seen) {
                drop(st);
                tries += 1;
                if tries == GC_TRIES {
                    return Err(StoreError::Busy);
                }
                continue;
            }
            let held = lock(&self.inner.held);
            let dead: Vec<blake3::Hash> = st
                .iter()
                .filter(|(h, b)| {
                    !b.pinned && !b.in_flight && !live.contains(*h) && !held.contains_key(*h)
                })
                .map(|(h, _)| *h)
                .collect();
            drop(held);
            // Their files go (aside, under names the next open deletes)
            // before their records: a process killed in between leaves
            // records whose files are gone (found lost, and freed by the
            // next gc), never files without a record (which stayed on disk
            // for good, or, with no other blob left, came back at the next
            // open as recovered records). They are deleted once the state
            // is let go: deleting a large file takes a while.
            let mut bytes = 0;
            let mut aside = Vec::new();
            for h in &dead {
                if let Some(b) = st.get(h) {
                    bytes += set_aside_files_of(&self.inner, b, &mut aside);
                }
            }
            let mut res = self.inner.remove_blobs(&mut st, dead.clone());
            if let Err(StoreError::DiskFull { .. }) = res {
                // A full disk gets the room the commit needs, and it is
                // tried again.
                unaside(&mut aside);
                res = self.inner.remove_blobs(&mut st, dead.clone());
            }
            match res {
                Ok(removed) => break (removed, bytes, aside),
                Err(e) => {
                    // Kept, with their files gone: not offered, read or
                    // taken as whole until a gc removes them.
                    for h in &dead {
                        if let Some(b) = st.get_mut(h) {
                            b.corrupt = true;
                        }
                    }
                    drop(st);
                    unaside(&mut aside);
                    return Err(e);
                }
            }
        };
        let (removed, bytes, mut aside) = removed;
        let mut report = GcReport {
            blobs: removed.len() as u64,
            bytes,
        };
        // Still holding `files`: nothing is being put into data/ now, and
        // all that was put there before is recorded. (This also takes the
        // outboard of a download removed before its size was known, which
        // its record does not name.)
        let removed: HashSet<blake3::Hash> = removed.into_iter().map(|(h, _)| h).collect();
        let (unrecorded, bytes) = self.inner.free_unrecorded_files();
        report.blobs += unrecorded.difference(&removed).count() as u64;
        report.bytes += bytes;
        // Deleted with no lock held: imports and downloads wait for
        // `files`, the rest of the store for the state.
        drop(files_guard);
        unaside(&mut aside);
        Ok(report)
    }

    /// Re-hash the stored data of `hash` against its hash (and outboard).
    /// Returns false, marks the blob corrupt and logs its name if it does
    /// not match; a partial blob drops the groups that no longer verify.
    /// A file referenced in place that was touched but still matches is
    /// accepted again.
    pub fn verify(&self, hash: &blake3::Hash) -> Result<bool, StoreError> {
        let (size, name, data, outboard, partial, was_corrupt) = {
            let st = lock(&self.inner.state);
            let b = st.get(hash).ok_or(StoreError::NotFound(*hash))?;
            (
                b.size,
                b.name.clone(),
                b.data.clone(),
                b.outboard.clone(),
                b.partial.clone(),
                b.corrupt,
            )
        };
        if let Some(p) = partial {
            let (size, claimed) = {
                let s = lock(&p.st);
                (s.size, s.verified.clone())
            };
            let Some(size) = size else { return Ok(true) };
            let valid = recheck(hash, size, &p.data, &p.outboard, &claimed)?;
            if valid != claimed {
                let mut s = lock(&p.st);
                s.verified = s.verified.intersection(&valid);
                drop(s);
                tracing::warn!("blob {hash} ({name}): some verified groups no longer verify");
                self.inner.save_partial(hash)?;
                return Ok(false);
            }
            return Ok(true);
        }
        let size = size.unwrap_or(0);
        let gone = |what: &str| {
            tracing::warn!("blob {hash} ({name}): its {what} is gone");
            self.inner.mark_corrupt(hash);
            Ok(false)
        };
        let unreadable = |why: &str| {
            tracing::warn!("blob {hash} ({name}): its data cannot be read: {why}");
            self.inner.mark_corrupt(hash);
            Ok(false)
        };
        let data_slot = match &data {
            DataRef::Mem(m) => Slot::Mem(m.clone()),
            DataRef::Db => match self.inner.inline_bytes(hash) {
                Ok(b) => Slot::Bytes(b),
                Err(StoreError::NotFound(_)) => return gone("stored content"),
                Err(e) => return Err(e),
            },
            DataRef::File { path, .. } => match open_read(path) {
                Ok(f) => Slot::File(Arc::new(f)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::warn!("blob {hash} ({name}): {} is gone", path.display());
                    self.inner.mark_corrupt(hash);
                    return Ok(false);
                }
                // Its data cannot be read, for good (a directory where the
                // file was, no permission): not served. A later verify that
                // reads it clears the mark. A passing error (too many open
                // files) is an error, and marks nothing.
                Err(e) if lasting(&e) => return unreadable(&format!("{}: {e}", path.display())),
                Err(e) => return Err(StoreError::io("opening", path, e)),
            },
        };
        let new_stamp = match &data_slot {
            Slot::File(f) => {
                Some(Stamp::of(&f.metadata().map_err(|e| {
                    StoreError::io("reading", Path::new(&name), e)
                })?))
            }
            _ => None,
        };
        let mut h = tree::TreeHasher::new();
        // No larger than the blob (+1, to see its end in one read): zeroing
        // a whole batch per small blob was 80% of verifying a collection
        // of 4 KiB files.
        let mut buf = vec![
            0u8;
            tree::BATCH.min(
                usize::try_from(size)
                    .unwrap_or(usize::MAX)
                    .saturating_add(1)
            )
        ];
        let mut pos = 0u64;
        loop {
            let n = match read_full_at(&data_slot, pos, &mut buf) {
                Ok(n) => n,
                Err(e) if lasting(&e) => return unreadable(&e.to_string()),
                Err(e) => return Err(StoreError::io("reading", Path::new(&name), e)),
            };
            h.update(&buf[..n]);
            pos += n as u64;
            // Past its size (a file in place that grew): it cannot match,
            // and a next piece would start off a group's edge (the hasher
            // asserts it). The rest of a grown file is not read.
            if n < buf.len() || pos > size {
                break;
            }
        }
        let (root, tree) = h.finish();
        if root != *hash || pos != size {
            tracing::warn!("blob {hash} ({name}) is corrupt: stored data does not match its hash");
            self.inner.mark_corrupt(hash);
            return Ok(false);
        }
        let ob = tree.to_vec();
        let stored_ob = match read_ob(&outboard, ob.len()) {
            Ok(o) => Some(o),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(StoreError::io("reading outboard of", Path::new(&name), e)),
        };
        if stored_ob.as_ref() != Some(&ob) {
            // The data is whole; only the outboard, the store's own and
            // made from the data, is gone or damaged: it is made again.
            match (&outboard, self.inner.ob_path(hash)) {
                (ObRef::File(p), Some(q)) if *p == q => {
                    self.inner.write_outboard(hash, tree)?;
                    if let Ok(f) = File::open(p) {
                        let _ = f.sync_all();
                    }
                    tracing::warn!("blob {hash} ({name}): its outboard was damaged; rebuilt");
                }
                _ => return gone("outboard"),
            }
        }
        // A file in place that was only touched is fine again.
        if let (
            DataRef::File {
                path,
                stamp: Some(old),
            },
            Some(new),
        ) = (&data, new_stamp)
            && *old != new
        {
            let path = path.clone();
            self.inner.update(hash, |b| {
                b.data = DataRef::File {
                    path,
                    stamp: Some(new),
                };
                b.corrupt = false;
            })?;
        } else if was_corrupt {
            self.inner.update(hash, |b| b.corrupt = false)?;
        } else {
            // Nothing to record (no durable commit per blob of a large
            // collection).
            return Ok(true);
        }
        // Servable again: peers waiting for it are told, as of an import.
        let _ = self.inner.events.send(StoreEvent::Added { hash: *hash });
        Ok(true)
    }

    /// Verify every blob; returns the hashes and names of those that failed.
    pub fn verify_all(&self) -> Result<Vec<(blake3::Hash, String)>, StoreError> {
        let mut bad = Vec::new();
        for info in self.list() {
            if !self.verify(&info.hash)? {
                bad.push((info.hash, info.name));
            }
        }
        Ok(bad)
    }

    // ------------------------------------------------------------- serving

    /// The size of `hash` and which of the `wanted` groups this store can
    /// serve (verified, not corrupt, source file unchanged). None if the
    /// blob is unknown, corrupt, changed, or its size is not known yet.
    pub fn available(
        &self,
        hash: &blake3::Hash,
        wanted: &GroupRanges,
    ) -> Option<(u64, GroupRanges)> {
        let (size, verified, stamp_check) = {
            let st = lock(&self.inner.state);
            let b = st.get(hash)?;
            if b.corrupt {
                return None;
            }
            let size = match &b.partial {
                Some(p) => lock(&p.st).size?,
                None => b.size?,
            };
            let verified = match &b.partial {
                Some(p) => lock(&p.st).verified.clone(),
                None => all_groups(size),
            };
            let check = match &b.data {
                DataRef::File {
                    path,
                    stamp: Some(s),
                } => Some((path.clone(), *s)),
                _ => None,
            };
            (size, verified, check)
        };
        if let Some((path, stamp)) = stamp_check
            && !stamp_matches(&path, stamp)
        {
            return None;
        }
        let have = wanted
            .intersection(&verified)
            .intersection(&all_groups(size));
        Some((size, have))
    }

    /// Whether this store would serve any of `hash` now: it holds it, not
    /// marked corrupt, its size known, and its file in place (if it is
    /// one) unchanged since it was added. What a peer is told it holds
    /// must agree with what a request for it is answered with.
    pub fn can_serve(&self, hash: &blake3::Hash) -> bool {
        self.available(hash, &GroupRanges::new()).is_some()
    }

    /// Whether `hash` is referenced in place and its file changed (size,
    /// modification time or inode) or vanished since it was added: then
    /// it is not served. [`Store::verify`] accepts a file that was only
    /// touched again; one whose content changed is marked corrupt. One
    /// `stat` for a file in place; false for anything else.
    pub fn source_changed(&self, hash: &blake3::Hash) -> bool {
        let check = {
            let st = lock(&self.inner.state);
            match st.get(hash).map(|b| &b.data) {
                Some(DataRef::File {
                    path,
                    stamp: Some(s),
                }) => Some((path.clone(), *s)),
                _ => None,
            }
        };
        check.is_some_and(|(path, stamp)| !stamp_matches(&path, stamp))
    }

    /// Write the verified stream (8-byte little-endian size, then bao-tree
    /// encoding with 16 KiB groups) of the groups of `ranges` that are
    /// available here (see [`Store::available`]). Returns the bytes written.
    /// Data that does not match its hash is never sent: the blob is marked
    /// corrupt and [`StoreError::Corrupt`] returned.
    pub async fn send_ranges<W: AsyncWrite + Unpin + Send>(
        &self,
        hash: &blake3::Hash,
        ranges: &GroupRanges,
        w: W,
    ) -> Result<u64, StoreError> {
        let mut sink = WriteSink(w);
        let written = self.send_ranges_to(hash, ranges, &mut sink).await?;
        sink.0
            .flush()
            .await
            .map_err(io_err("writing to", Path::new("peer stream")))?;
        Ok(written)
    }

    /// [`Store::send_ranges`] into a [`ChunkSink`], which gets the
    /// encoder's buffers without another copy.
    pub async fn send_ranges_to<S: ChunkSink>(
        &self,
        hash: &blake3::Hash,
        ranges: &GroupRanges,
        w: &mut S,
    ) -> Result<u64, StoreError> {
        let (size, have) = self
            .available(hash, ranges)
            .ok_or(StoreError::NotFound(*hash))?;
        let src = self.inner.source(hash)?;
        let sending = Path::new("peer stream");
        w.put(Bytes::copy_from_slice(&size.to_le_bytes()))
            .await
            .map_err(io_err("writing to", sending))?;
        let mut written = 8u64;
        if have.is_empty() {
            return Ok(written);
        }
        // Pieces of about 1 MiB: two in the channel and one being built
        // keep the stream fed while bounding memory per stream.
        let (tx, mut rx) = mpsc::channel::<Bytes>(2);
        let hash2 = *hash;
        let coder = tokio::task::spawn_blocking(move || {
            let chunks = chunk_ranges(&have);
            encode::encode_pieces(
                &src.data,
                &src.outboard,
                hash2,
                bao_tree(size),
                &chunks,
                |piece| tx.blocking_send(piece).is_ok(),
            )
        });
        let mut write_err = None;
        while let Some(b) = rx.recv().await {
            let len = b.len() as u64;
            if let Err(e) = w.put(b).await {
                write_err = Some(e);
                break;
            }
            written += len;
        }
        drop(rx);
        let res = coder.await.map_err(|e| StoreError::Task(e.to_string()))?;
        if let Some(e) = write_err {
            return Err(StoreError::io("writing to", sending, e));
        }
        match res {
            Ok(()) => {}
            Err(EncodeError::ParentHashMismatch(_) | EncodeError::LeafHashMismatch(_)) => {
                return Err(self.inner.refuse_corrupt(hash, src.name, "serving"));
            }
            // Shorter than its record: cut short on disk.
            Err(EncodeError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(self.inner.refuse_corrupt(hash, src.name, "serving"));
            }
            Err(EncodeError::Io(e)) => {
                return Err(StoreError::io("reading", Path::new(&src.name), e));
            }
            Err(e) => {
                return Err(StoreError::io(
                    "serving",
                    Path::new(&src.name),
                    io::Error::other(e.to_string()),
                ));
            }
        }
        Ok(written)
    }

    // ----------------------------------------------------------- receiving

    /// Declare that a download of `hash` starts (idempotent: a second call
    /// resumes). With a `target`, data goes to `<target>.shoal-partial` and
    /// is renamed to `<target>` on completion. The blob is marked in
    /// flight (gc keeps it) until [`Store::end_download`], and pinned if
    /// `pin` (a collection's members are not: the pinned collection keeps
    /// them, and `rm` of it frees them; a pin already there stays).
    pub fn begin_download(
        &self,
        hash: &blake3::Hash,
        kind: BlobKind,
        target: Option<&Path>,
        pin: bool,
    ) -> Result<(), StoreError> {
        let _files = adding_files(&self.inner);
        let existing = |st: &mut HashMap<blake3::Hash, Blob>| {
            st.get_mut(hash).map(|b| {
                b.in_flight = true;
                b.pinned |= pin;
                // A complete blob's kind is not the caller's to change (a
                // ticket saying "file" for a pinned collection would let
                // gc free its members); its content decides (`pin`).
                if b.partial.is_some() {
                    b.kind = kind;
                }
                record_of(b)
            })
        };
        let rec = {
            let mut st = lock(&self.inner.state);
            if let Some(b) = st.get_mut(hash) {
                self.inner.retarget(hash, b, target);
            }
            existing(&mut st)
        };
        if let Some(rec) = rec {
            self.inner.persist(hash, rec, true)?;
            return self.inner.finish_if_verified(hash);
        }
        let mut b = match self
            .inner
            .new_partial(hash, kind, target.map(Path::to_path_buf))
        {
            Ok(b) => b,
            Err(e @ StoreError::PartialInTheWay(_)) => {
                // Begun meanwhile by another caller into the same target:
                // the file is that download's.
                let rec = existing(&mut lock(&self.inner.state)).ok_or(e)?;
                return self.inner.persist(hash, rec, true);
            }
            Err(e) => return Err(e),
        };
        b.pinned = pin;
        let mut st = lock(&self.inner.state);
        // Begun meanwhile by another caller: that entry stands.
        let rec = match existing(&mut st) {
            Some(rec) => rec,
            None => {
                let rec = record_of(&b);
                st.insert(*hash, b);
                rec
            }
        };
        drop(st);
        self.inner.persist(hash, rec, true)
    }

    /// The download of `hash` ended (done or given up): gc may remove it
    /// again once it is unpinned.
    pub fn end_download(&self, hash: &blake3::Hash) {
        let mut st = lock(&self.inner.state);
        if let Some(b) = st.get_mut(hash) {
            b.in_flight = false;
        }
    }

    /// Read a verified stream of `ranges` from an untrusted peer (8-byte
    /// size, then the bao-tree encoding), checking every group against the
    /// hash before writing it. Stops at the first bad group with
    /// [`ReceiveError::Corrupt`] (groups before it are kept). Reads exactly
    /// the encoded length, never past it. Returns the groups newly verified;
    /// when all are verified the blob becomes complete (renamed into its
    /// target; pinned, unless unpinned since the download began) and
    /// [`StoreEvent::Complete`] is sent.
    ///
    /// Size: the first stream sets the (unproven) size; it is proven once
    /// the last group verifies. A stream whose size differs from a proven
    /// size is [`ReceiveError::SizeMismatch`]; from an unproven one, the
    /// partial blob is reset to the new size. A stream whose size has no
    /// room for every group of `ranges` is [`ReceiveError::OutOfRange`],
    /// and changes nothing.
    pub async fn receive_ranges<R: AsyncRead + Unpin + Send>(
        &self,
        hash: &blake3::Hash,
        ranges: &GroupRanges,
        r: R,
    ) -> Result<GroupRanges, ReceiveError> {
        self.receive_ranges_from(hash, ranges, &mut ReadSource(r))
            .await
    }

    /// [`Store::receive_ranges`] from a [`ChunkSource`], whose buffers go
    /// to the decoder without another copy. Asks the source for no more
    /// than the stream should hold.
    pub async fn receive_ranges_from<S: ChunkSource>(
        &self,
        hash: &blake3::Hash,
        ranges: &GroupRanges,
        r: &mut S,
    ) -> Result<GroupRanges, ReceiveError> {
        let mut hdr = Vec::with_capacity(8);
        while hdr.len() < 8 {
            match r.take(8 - hdr.len()).await {
                Ok(Some(b)) => hdr.extend_from_slice(&b),
                Ok(None) => {
                    return Err(ReceiveError::Truncated {
                        group: ranges.iter().next().unwrap_or(0),
                    });
                }
                Err(e) => return Err(ReceiveError::Read(e)),
            }
        }
        let mut size_bytes = [0u8; 8];
        size_bytes.copy_from_slice(&hdr[..8]);
        let size = u64::from_le_bytes(size_bytes);
        // Groups the stream was to hold that its own size has not: it
        // cannot verify them, so it is refused before it touches the
        // partial blob (taken as an unproven size, it could replace the
        // one a download has, or name a size no download accepts).
        if let Some(beyond) = ranges.difference(&all_groups(size)).runs().first() {
            return Err(ReceiveError::OutOfRange {
                size,
                group: beyond.start,
            });
        }
        let Some((partial, generation)) = self.inner.prepare_receive(hash, size)? else {
            return Ok(GroupRanges::new());
        };
        let wanted = ranges.intersection(&all_groups(size));
        if wanted.is_empty() {
            return Ok(GroupRanges::new());
        }
        let tree = bao_tree(size);
        let chunks = chunk_ranges(&wanted);
        let len = encoded_len(tree, &chunks);
        // The stream is checked here, as it arrives; only verified batches
        // of about WRITE_BATCH bytes cross to the writer thread.
        let (tx, rx) = mpsc::channel::<Batch>(4);
        let inner = self.inner.clone();
        let hash2 = *hash;
        let writer = tokio::task::spawn_blocking(move || {
            inner.write_batches(hash2, &partial, generation, rx)
        });
        let mut decoder = Decoder::new(*hash, tree, &chunks, WRITE_BATCH);
        let mut received = GroupRanges::new();
        let mut ready = Vec::new();
        let mut left = len;
        let mut failure = None;
        loop {
            // Fed once with nothing when nothing is left: an empty blob's
            // one item has no bytes.
            let b = if left == 0 {
                Bytes::new()
            } else {
                let max = usize::try_from(left).map_or(RECV_PIECE, |l| l.min(RECV_PIECE));
                match r.take(max).await {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(e) => {
                        failure = Some(ReceiveError::Read(e));
                        break;
                    }
                }
            };
            let last = left == 0;
            left = left.saturating_sub(b.len() as u64);
            let fed = decoder.feed(&b, |batch| ready.push(batch));
            let mut writer_gone = false;
            for batch in ready.drain(..) {
                received = received.union(&batch.groups);
                writer_gone |= tx.send(batch).await.is_err();
            }
            if let Err(m) = fed {
                failure = Some(ReceiveError::Corrupt { group: m.group });
                break;
            }
            if writer_gone || last {
                break;
            }
        }
        // What verified before a failure is kept.
        let rest = decoder.take();
        received = received.union(&rest.groups);
        if !rest.is_empty() {
            let _ = tx.send(rest).await;
        }
        drop(tx);
        let newly = writer
            .await
            .map_err(|e| ReceiveError::Store(StoreError::Task(e.to_string())))??;
        if let Some(e) = failure {
            return Err(e);
        }
        if !decoder.is_finished() {
            let group = wanted.difference(&received).iter().next().unwrap_or(0);
            return Err(ReceiveError::Truncated { group });
        }
        Ok(newly)
    }

    // ----------------------------------------------------------- reading

    /// Read `len` verified bytes at `offset` (fewer at the end of the blob).
    /// Fails if a group touched is not verified. The groups read are
    /// checked against the outboard before any byte is returned: data
    /// damaged on disk, or a file in place edited since it was added, is
    /// refused as corrupt (and marked so), never handed out.
    pub fn read_at(
        &self,
        hash: &blake3::Hash,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, StoreError> {
        let src = self.inner.source(hash)?;
        let end = offset.saturating_add(len as u64).min(src.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let need = groups_of_bytes(offset, end);
        if let Some(v) = &src.verified
            && !v.contains_range(need.clone())
        {
            let group = need.into_iter().find(|g| !v.contains(*g)).unwrap_or(0);
            return Err(StoreError::NotVerified { hash: *hash, group });
        }
        // Whole groups (up to the blob's end): what the outboard checks.
        let start = need.start * GROUP_SIZE;
        let stop = (need.end * GROUP_SIZE).min(src.size);
        let n = usize::try_from(stop - start).map_err(|_| StoreError::Incomplete(*hash))?;
        let mut buf = vec![0u8; n];
        let name = Path::new(&src.name);
        src.data
            .read_exact_at(start, &mut buf)
            .map_err(|e| StoreError::io("reading", name, e))?;
        if !window_verifies(hash, src.size, &src.outboard, start, &buf, name)? {
            if src.verified.is_some() {
                // A partial blob's data may have been reset under the read
                // (its size proven otherwise): refused, not marked
                // (`verify` drops the groups of one damaged on disk).
                return Err(StoreError::Corrupt {
                    hash: *hash,
                    name: src.name,
                });
            }
            return Err(self.inner.refuse_corrupt(hash, src.name, "reading"));
        }
        let from = usize::try_from(offset - start).map_err(|_| StoreError::Incomplete(*hash))?;
        let to = usize::try_from(end - start).map_err(|_| StoreError::Incomplete(*hash))?;
        Ok(Bytes::from(buf).slice(from..to))
    }

    /// The whole content of a complete blob, checked against its hash.
    pub fn read_all(&self, hash: &blake3::Hash) -> Result<Vec<u8>, StoreError> {
        let mut v = Vec::new();
        self.export_blob(hash, &mut v)?;
        Ok(v)
    }

    /// Write a complete blob to `w`, checking it against its outboard in
    /// 8 MiB windows before each window is written (corrupt data is never
    /// written). Returns the bytes written.
    pub fn export_blob(&self, hash: &blake3::Hash, w: &mut dyn Write) -> Result<u64, StoreError> {
        let src = self.inner.source(hash)?;
        if src.verified.is_some() {
            return Err(StoreError::Incomplete(*hash));
        }
        if src.size == 0 {
            // Nothing to check against an outboard: the hash is the proof.
            if *hash != blake3::hash(b"") {
                self.inner.mark_corrupt(hash);
                return Err(StoreError::Corrupt {
                    hash: *hash,
                    name: src.name,
                });
            }
            return Ok(0);
        }
        let mut buf =
            vec![0u8; tree::BATCH.min(usize::try_from(src.size.max(1)).unwrap_or(tree::BATCH))];
        let mut pos = 0u64;
        let name = Path::new(&src.name);
        loop {
            let n = usize::try_from(src.size - pos).map_or(buf.len(), |r| r.min(buf.len()));
            src.data
                .read_exact_at(pos, &mut buf[..n])
                .map_err(|e| StoreError::io("reading", name, e))?;
            if !window_verifies(hash, src.size, &src.outboard, pos, &buf[..n], name)? {
                return Err(self.inner.refuse_corrupt(hash, src.name, "exporting"));
            }
            w.write_all(&buf[..n])
                .map_err(|e| StoreError::io("writing", Path::new("output"), e))?;
            pos += n as u64;
            if pos >= src.size {
                break;
            }
        }
        w.flush()
            .map_err(|e| StoreError::io("writing", Path::new("output"), e))?;
        Ok(pos)
    }

    /// Forget those of `hashes` that are complete but whose file is gone
    /// or not the one recorded (a fetched directory the user deleted or
    /// edited), or that were found corrupt (a file in place, or a small
    /// blob kept in the database), so that they are fetched again rather
    /// than refused as changed or corrupt. A store-owned copy of a file
    /// found corrupt is not forgotten but salvaged (`Inner::salvage`): what of
    /// it still verifies stays, as a partial download, with its pin and
    /// name, and only the rest is fetched again (a get that finds no peer
    /// loses nothing). One stat per file; one commit. Returns the blobs
    /// forgotten.
    pub fn forget_vanished(
        &self,
        hashes: &[blake3::Hash],
    ) -> Result<Vec<blake3::Hash>, StoreError> {
        let mut files: Vec<(blake3::Hash, PathBuf, Option<Stamp>)> = Vec::new();
        let mut corrupt: Vec<blake3::Hash> = Vec::new();
        let mut owned_corrupt: Vec<blake3::Hash> = Vec::new();
        {
            let st = lock(&self.inner.state);
            for h in hashes {
                let Some(b) = st.get(h).filter(|b| b.partial.is_none()) else {
                    continue;
                };
                // (Not a collection's manifest: a partial one keeps none of
                // its members from gc.)
                if b.corrupt
                    && b.kind == BlobKind::Raw
                    && matches!(b.data, DataRef::File { stamp: None, .. })
                {
                    owned_corrupt.push(*h);
                } else if b.corrupt {
                    corrupt.push(*h);
                } else if let DataRef::File { path, stamp } = &b.data {
                    files.push((*h, path.clone(), *stamp));
                }
            }
        }
        let (lost, gone): (Vec<_>, Vec<_>) = files
            .into_iter()
            .filter(|(_, path, stamp)| match stamp {
                Some(s) => !stamp_matches(path, *s),
                None => fs::metadata(path).is_err(),
            })
            .partition(|(h, _, stamp)| {
                stamp.is_none()
                    && lock(&self.inner.state)
                        .get(h)
                        .is_some_and(|b| b.kind == BlobKind::Raw)
            });
        // A store-owned file lost: salvaged too (a partial with nothing
        // verified, keeping its pin and name).
        owned_corrupt.extend(lost.into_iter().map(|(h, _, _)| h));
        for h in owned_corrupt {
            match self.inner.salvage(&h) {
                Ok(true) => {}
                Ok(false) => corrupt.push(h),
                // Unreadable (EIO, say): forgotten and fetched again, as
                // before, rather than failing every get of it.
                Err(e) => {
                    tracing::warn!("blob {h}: cannot salvage it ({e}); fetched again whole");
                    corrupt.push(h);
                }
            }
        }
        if gone.is_empty() && corrupt.is_empty() {
            return Ok(Vec::new());
        }
        let mut st = lock(&self.inner.state);
        // Those still the entry that was checked (not replaced or moved
        // meanwhile).
        let mut same: Vec<blake3::Hash> = gone
            .into_iter()
            .filter(|(h, path, stamp)| {
                st.get(h).is_some_and(|b| {
                    b.partial.is_none()
                        && !b.corrupt
                        && matches!(&b.data, DataRef::File { stamp: s, path: p } if s == stamp && p == path)
                })
            })
            .map(|(h, _, _)| h)
            .collect();
        same.extend(
            corrupt
                .into_iter()
                .filter(|h| st.get(h).is_some_and(|b| b.partial.is_none() && b.corrupt)),
        );
        let removed = self.inner.remove_blobs(&mut st, same)?;
        // Under the state lock: a download of the same blob starting now
        // would write a new outboard (or data file) there.
        tracing::info!(
            "{} blob(s) whose files are gone, changed or corrupt forgotten, to be fetched again",
            removed.len()
        );
        for (_, b) in &removed {
            if let ObRef::File(p) = &b.outboard {
                let _ = fs::remove_file(p);
            }
            // A store-owned copy (never a file in place) found corrupt and
            // not salvaged.
            if let (true, DataRef::File { path, stamp: None }) = (b.corrupt, &b.data) {
                let _ = fs::remove_file(path);
            }
        }
        drop(st);
        Ok(removed.into_iter().map(|(h, _)| h).collect())
    }

    /// The file a complete blob is referenced at in place moved from where
    /// the store knows it (a collection's temporary directory renamed into
    /// place): record the new path. The file must be the same one (same
    /// size, modification time and inode), so nothing is re-hashed.
    pub fn relocate(&self, hash: &blake3::Hash, new_path: &Path) -> Result<(), StoreError> {
        let m = fs::metadata(new_path).map_err(io_err("reading", new_path))?;
        let rec = {
            let mut st = lock(&self.inner.state);
            let b = st.get_mut(hash).ok_or(StoreError::NotFound(*hash))?;
            match &mut b.data {
                DataRef::File {
                    path,
                    stamp: Some(stamp),
                } if *stamp == Stamp::of(&m) => {
                    *path = fs::canonicalize(new_path).unwrap_or_else(|_| new_path.to_path_buf());
                }
                _ => return Err(StoreError::Unsupported(new_path.to_path_buf())),
            }
            record_of(b)
        };
        self.inner.persist(hash, rec, false)
    }

    /// Read and parse the manifest of the collection `hash`. Its size is
    /// checked before anything is read: a blob called a collection (by a
    /// ticket, a peer) can be of any size, and was read whole into memory
    /// by every `ls` and `gc`.
    pub fn read_manifest(&self, hash: &blake3::Hash) -> Result<Vec<Entry>, StoreError> {
        let size = self.info(hash).ok_or(StoreError::NotFound(*hash))?.size;
        if size > collection::MAX_MANIFEST_BYTES as u64 {
            return Err(collection::ManifestError::TooLarge(
                usize::try_from(size).unwrap_or(usize::MAX),
            )
            .into());
        }
        Ok(collection::parse_manifest(&self.read_all(hash)?)?)
    }

    /// `hashes`, each followed by the members the store holds of it if it
    /// is a collection whose manifest it has, each hash once: what
    /// `verify HASH` checks, since the hash a directory is shared by is
    /// its manifest's (its members were left unchecked).
    pub fn with_members(&self, hashes: &[blake3::Hash]) -> Vec<blake3::Hash> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for h in hashes {
            if seen.insert(*h) {
                out.push(*h);
            }
            let is_collection = self
                .info(h)
                .is_some_and(|i| i.complete && i.kind == BlobKind::Collection);
            let Ok(entries) = is_collection.then(|| self.read_manifest(h)).transpose() else {
                continue;
            };
            for e in entries.into_iter().flatten().filter(|e| !e.empty_dir) {
                if self.info(&e.hash).is_some() && seen.insert(e.hash) {
                    out.push(e.hash);
                }
            }
        }
        out
    }

    /// Write a complete collection to the new directory `out_dir`: files go
    /// into a temporary directory beside it, which is renamed into place
    /// when everything is written. Executable bits and empty directories
    /// are restored. The manifest is checked with
    /// [`collection::parse_manifest`] first.
    pub fn export_collection(&self, hash: &blake3::Hash, out_dir: &Path) -> Result<(), StoreError> {
        let entries = self.read_manifest(hash)?;
        for e in entries.iter().filter(|e| !e.empty_dir) {
            match self.info(&e.hash) {
                Some(i) if i.complete => {}
                _ => return Err(StoreError::NotACollection(*hash)),
            }
        }
        if fs::symlink_metadata(out_dir).is_ok() {
            return Err(StoreError::Exists(out_dir.to_path_buf()));
        }
        let parent = batch::parent_dir(out_dir);
        let base = out_dir
            .file_name()
            .ok_or_else(|| StoreError::Unsupported(out_dir.to_path_buf()))?;
        let n = self.inner.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = parent.join(beside(
            Path::new(base),
            ".",
            &format!(".shoal-tmp-{}-{n}", std::process::id()),
        ));
        fs::create_dir(&tmp).map_err(io_err("creating", &tmp))?;
        let res = self.write_collection(&entries, &tmp).and_then(|()| {
            if fs::symlink_metadata(out_dir).is_ok() {
                return Err(StoreError::Exists(out_dir.to_path_buf()));
            }
            fs::rename(&tmp, out_dir).map_err(io_err("renaming into", out_dir))
        });
        if res.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        res
    }

    fn write_collection(&self, entries: &[Entry], root: &Path) -> Result<(), StoreError> {
        for e in entries {
            let rel: PathBuf = e.path.split('/').collect();
            let full = root.join(&rel);
            // Create every parent one by one, refusing anything that is not
            // a directory we made (no symlink can be followed out of root).
            let mut dir = root.to_path_buf();
            let comps: Vec<&str> = e.path.split('/').collect();
            let parents = if e.empty_dir {
                &comps[..]
            } else {
                &comps[..comps.len() - 1]
            };
            for c in parents {
                dir.push(c);
                match fs::symlink_metadata(&dir) {
                    Ok(m) if m.file_type().is_dir() => {}
                    Ok(_) => return Err(StoreError::Unsupported(dir)),
                    Err(_) => fs::create_dir(&dir).map_err(io_err("creating", &dir))?,
                }
            }
            if e.empty_dir {
                continue;
            }
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode_for(e.executable)
                .open(&full)
                .map_err(io_err("creating", &full))?;
            let mut bw = io::BufWriter::with_capacity(1 << 20, &mut f);
            self.export_blob(&e.hash, &mut bw)?;
            drop(bw);
            if e.executable {
                let mut p = f
                    .metadata()
                    .map_err(io_err("reading", &full))?
                    .permissions();
                p.set_mode(p.mode() | ((p.mode() & 0o444) >> 2));
                fs::set_permissions(&full, p).map_err(io_err("setting permissions of", &full))?;
            }
        }
        Ok(())
    }
}

trait ModeFor {
    fn mode_for(&mut self, executable: bool) -> &mut Self;
}

impl ModeFor for OpenOptions {
    fn mode_for(&mut self, executable: bool) -> &mut Self {
        self.mode(if executable { 0o777 } else { 0o666 })
    }
}

fn info_of(hash: &blake3::Hash, b: &Blob) -> BlobInfo {
    let (size, verified, complete) = match &b.partial {
        Some(p) => {
            let s = lock(&p.st);
            (s.size.unwrap_or(0), s.verified.clone(), false)
        }
        None => {
            let size = b.size.unwrap_or(0);
            (size, all_groups(size), true)
        }
    };
    BlobInfo {
        hash: *hash,
        size,
        complete,
        verified,
        kind: b.kind,
        name: b.name.clone(),
        pinned: b.pinned,
        corrupt: b.corrupt,
    }
}

fn record_of(b: &Blob) -> Record {
    let mut r = Record {
        size: b.size,
        kind: kind_to_u32(b.kind),
        name: b.name.clone(),
        pinned: b.pinned,
        corrupt: b.corrupt,
        unsynced_boot: b.unsynced.clone(),
        ..Default::default()
    };
    if let Some(p) = &b.partial {
        let s = lock(&p.st);
        r.size = s.size;
        r.verified = runs_to_vec(&s.verified);
        r.size_proven = s.size_proven;
        if let Some(t) = &p.target {
            r.path = t.as_os_str().as_bytes().to_vec();
        }
        return r;
    }
    r.complete = true;
    match &b.data {
        DataRef::Db | DataRef::Mem(_) => r.location = loc::INLINE,
        DataRef::File { stamp: None, .. } => r.location = loc::OWNED,
        DataRef::File {
            path,
            stamp: Some(s),
        } => {
            r.location = loc::EXTERNAL;
            r.path = path.as_os_str().as_bytes().to_vec();
            r.mtime_ns = s.mtime_ns;
            r.ino = s.ino;
        }
    }
    r
}

/// Open a file the user named (one to add, or added in place) for
/// reading, without blocking: a FIFO put there opened at once (and was
/// then refused as not a regular file) instead of waiting, forever, for a
/// writer. Regular files read as they would without the flag; but a
/// file under a lease (Samba, an NFS server) refuses such an open instead
/// of waiting for the lease to break, so a regular file is then opened
/// again without it.
pub(crate) fn open_read(path: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock
                && fs::metadata(path).is_ok_and(|m| m.is_file()) =>
        {
            File::open(path)
        }
        r => r,
    }
}

/// Open `path`, a regular file, and take its stamp.
fn open_regular(path: &Path) -> Result<(File, Stamp), StoreError> {
    let f = open_read(path).map_err(io_err("opening", path))?;
    let m = f.metadata().map_err(io_err("reading", path))?;
    if !m.is_file() {
        return Err(StoreError::Unsupported(path.to_path_buf()));
    }
    Ok((f, Stamp::of(&m)))
}

/// Fails unless `f`, opened at `path` with stamp `s0`, and whatever `path`
/// names now both still have that stamp.
fn unchanged(f: &File, path: &Path, s0: Stamp) -> Result<(), StoreError> {
    let s1 = Stamp::of(&f.metadata().map_err(io_err("reading", path))?);
    let s2 = Stamp::of(&fs::metadata(path).map_err(io_err("reading", path))?);
    if s1 != s0 || s2 != s0 {
        return Err(StoreError::ChangedDuringImport(path.to_path_buf()));
    }
    Ok(())
}

/// The name a blob (or collection) added from `path` gets: its file name.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn stamp_matches(path: &Path, stamp: Stamp) -> bool {
    match fs::metadata(path) {
        Ok(m) => Stamp::of(&m) == stamp,
        Err(_) => false,
    }
}

/// Read up to `buf.len()` bytes at `pos`, fewer only at the end.
fn read_full_at(s: &Slot, mut pos: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match s.read_at(pos, &mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                pos += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A stored outboard, read up to one byte past the `expected` length (a
/// longer one is wrong anyway, and is not read whole).
fn read_ob(ob: &ObRef, expected: usize) -> io::Result<Vec<u8>> {
    match ob {
        ObRef::None => Ok(Vec::new()),
        ObRef::Mem(m) => Ok(m.read().unwrap_or_else(|e| e.into_inner()).clone()),
        ObRef::File(p) => {
            let mut v = Vec::with_capacity(expected.saturating_add(1));
            File::open(p)?
                .take(expected as u64 + 1)
                .read_to_end(&mut v)?;
            Ok(v)
        }
    }
}

/// Whether `buf`, the bytes of a blob of `size` bytes from `pos` on (a
/// group boundary; whole groups, or up to the blob's end), verifies
/// against the outboard (every one of its groups, parents included).
fn window_verifies(
    hash: &blake3::Hash,
    size: u64,
    outboard: &Slot,
    pos: u64,
    buf: &[u8],
    name: &Path,
) -> Result<bool, StoreError> {
    let ob = PreOrderOutboard {
        root: *hash,
        tree: bao_tree(size),
        data: outboard.clone(),
    };
    let groups = groups_of_bytes(pos, pos + buf.len() as u64);
    let want = chunk_ranges(&GroupRanges::from_range(groups.clone()));
    let window = Window { offset: pos, buf };
    let mut valid = bao_tree::ChunkRanges::empty();
    for r in bao_tree::io::sync::valid_ranges(&ob, window, &want) {
        let r = r.map_err(|e| StoreError::io("checking", name, e))?;
        valid |= bao_tree::ChunkRanges::from(r);
    }
    Ok(needed_chunks(groups, size).is_subset(&valid))
}

/// The chunks of `groups` that exist in a blob of `size` bytes (at least
/// chunk 0, which proves an empty blob).
fn needed_chunks(groups: std::ops::Range<u64>, size: u64) -> bao_tree::ChunkRanges {
    let last = size.div_ceil(1024).max(1);
    let start = (groups.start * 16).min(last);
    let end = (groups.end * 16).min(last);
    bao_tree::ChunkRanges::from(bao_tree::ChunkNum(start)..bao_tree::ChunkNum(end))
}

/// The groups of `claimed` that still verify against data and outboard.
fn recheck(
    hash: &blake3::Hash,
    size: u64,
    data: &Slot,
    outboard: &Slot,
    claimed: &GroupRanges,
) -> Result<GroupRanges, StoreError> {
    let ob = PreOrderOutboard {
        root: *hash,
        tree: bao_tree(size),
        data: outboard.clone(),
    };
    let want = chunk_ranges(claimed);
    let mut valid = bao_tree::ChunkRanges::empty();
    for r in bao_tree::io::sync::valid_ranges(&ob, data, &want) {
        let r = r.map_err(|e| StoreError::io("checking", Path::new("partial blob"), e))?;
        valid |= bao_tree::ChunkRanges::from(r);
    }
    // A group counts if all of its chunks (up to the end of the blob) verify.
    let mut out = Vec::new();
    for g in claimed.iter() {
        if needed_chunks(g..g + 1, size).is_subset(&valid) {
            out.push(g);
        }
    }
    Ok(GroupRanges::from_groups(out))
}

/// Whether reading a blob's data failed for good: what is there is no
/// file (a directory, a loop of links) or may not be read. Not a passing
/// error (too many open files, an interrupted call).
fn lasting(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied
        || matches!(
            e.raw_os_error(),
            Some(libc::EISDIR | libc::ELOOP | libc::ENOTDIR | libc::EIO)
        )
}

/// A directory being walked: its path as given and canonical, and the
/// directories under it to leave out (see [`Inner::private`]).
struct Walk<'a> {
    root: &'a Path,
    canonical: &'a Path,
    private: &'a [PathBuf],
}

/// Collect the files (relative paths) and empty directories under `dir`.
fn walk(
    w: &Walk<'_>,
    rel: &str,
    files: &mut Vec<String>,
    empty: &mut Vec<String>,
) -> Result<(), StoreError> {
    let root = w.root;
    let dir = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let rd = fs::read_dir(&dir).map_err(io_err("listing", &dir))?;
    let mut any = false;
    for ent in rd {
        let ent = ent.map_err(io_err("listing", &dir))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else {
            return Err(StoreError::UnsharableName {
                path: ent.path(),
                reason: "not UTF-8",
            });
        };
        let child = if rel.is_empty() {
            name.to_owned()
        } else {
            format!("{rel}/{name}")
        };
        let ft = ent.file_type().map_err(io_err("reading", &ent.path()))?;
        // What the manifest's readers would refuse is refused here, before
        // a file is hashed: it failed at the end, as a bad manifest, and
        // left the files hashed till then recorded. (What is skipped
        // anyway, a link or a special file, may have any name.)
        if (ft.is_dir() || ft.is_file())
            && let Err(collection::ManifestError::BadPath { reason, .. }) =
                collection::check_path(&child)
        {
            return Err(StoreError::UnsharableName {
                path: ent.path(),
                reason,
            });
        }
        if ft.is_dir() && w.private.iter().any(|p| *p == w.canonical.join(&child)) {
            // `shoal send ~` with the data dir under it gave out the
            // node's secret key (and its live database, which then
            // failed the receiver's get).
            tracing::warn!(
                "skipping {}: shoal's own data (its store, its key) is never shared",
                ent.path().display()
            );
        } else if ft.is_dir() {
            any = true;
            walk(w, &child, files, empty)?;
        } else if ft.is_file() {
            any = true;
            files.push(child);
        } else if ft.is_symlink() {
            tracing::warn!("skipping symbolic link {}", ent.path().display());
        } else {
            tracing::warn!("skipping special file {}", ent.path().display());
        }
    }
    if !any && !rel.is_empty() {
        empty.push(rel.to_owned());
    }
    Ok(())
}

impl Inner {
    /// Fails for a path in a private directory ([`Inner::private`]).
    fn not_private(&self, path: &Path) -> Result<(), StoreError> {
        let private = lock(&self.private);
        if private.is_empty() {
            return Ok(());
        }
        let path = fs::canonicalize(path).map_err(io_err("reading", path))?;
        if private.iter().any(|p| path.starts_with(p)) {
            return Err(StoreError::Private(path));
        }
        Ok(())
    }

    fn data_dir(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join("data"))
    }

    fn owned_path(&self, hash: &blake3::Hash) -> Option<PathBuf> {
        self.data_dir()
            .map(|d| d.join(format!("{}.data", hash.to_hex())))
    }

    fn ob_path(&self, hash: &blake3::Hash) -> Option<PathBuf> {
        self.data_dir()
            .map(|d| d.join(format!("{}.obao", hash.to_hex())))
    }

    fn tmp_path(&self) -> Option<PathBuf> {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.data_dir()
            .map(|d| d.join(format!("tmp-{}-{n}", std::process::id())))
    }

    fn remove_tmp_files(&self) {
        let Some(d) = self.data_dir() else { return };
        let Ok(rd) = fs::read_dir(&d) else { return };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("tmp-") {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    fn inline_bytes(&self, hash: &blake3::Hash) -> Result<Bytes, StoreError> {
        let db = self.db.as_ref().ok_or(StoreError::NotFound(*hash))?;
        if let Some(d) = lock(&self.pending).inline(hash) {
            return Ok(d);
        }
        // Taken out of `pending` by a commit not finished yet.
        if let Some(d) = lock(&self.committing).get(hash) {
            return Ok(d.clone());
        }
        meta::load_inline(db, hash)?
            .map(Bytes::from)
            .ok_or(StoreError::NotFound(*hash))
    }

    /// Rebuild a blob from its record at open.
    fn blob_from_record(&self, hash: &blake3::Hash, r: &Record) -> Result<Blob, StoreError> {
        let path = PathBuf::from(OsStr::from_bytes(&r.path));
        let ob_path = self.ob_path(hash).ok_or(StoreError::NotFound(*hash))?;
        let mut b = Blob {
            size: r.size,
            kind: kind_from_u32(r.kind),
            name: r.name.clone(),
            pinned: r.pinned,
            corrupt: r.corrupt,
            data: DataRef::Db,
            outboard: ObRef::None,
            partial: None,
            in_flight: false,
            unsynced: r.unsynced_boot.clone(),
        };
        if r.complete {
            let size = r.size.unwrap_or(0);
            if bao_tree(size).outboard_size() > 0 {
                b.outboard = ObRef::File(ob_path);
            }
            b.data = match r.location {
                loc::INLINE => DataRef::Db,
                loc::OWNED => DataRef::File {
                    path: self.owned_path(hash).ok_or(StoreError::NotFound(*hash))?,
                    stamp: None,
                },
                _ => DataRef::File {
                    path,
                    stamp: Some(Stamp {
                        size,
                        mtime_ns: r.mtime_ns,
                        ino: r.ino,
                    }),
                },
            };
            return Ok(b);
        }
        let mut target = (!r.path.is_empty()).then_some(path);
        if let (Some(from), Some(t)) = (&r.moved_from, &target) {
            target = self.finish_move(hash, from, t);
            // Recorded at once where it is, and no longer as moving: left,
            // a later open moved whatever was at the old place by then
            // (another data dir's download into that output, say; a
            // review), also when what follows here fails.
            let settled = Record {
                path: target
                    .as_ref()
                    .map_or_else(Vec::new, |t| t.as_os_str().as_bytes().to_vec()),
                moved_from: None,
                ..r.clone()
            };
            if let Err(e) = self.persist(hash, settled, true) {
                tracing::warn!("cannot record where {hash} is: {e}");
            }
        }
        if let (Some(t), Some(size)) = (&target, r.size)
            && let Some((data, outboard)) = self.finished_at(hash, t, size)
        {
            tracing::info!(
                "blob {hash}: found finished at {} (the last run stopped before recording it)",
                t.display()
            );
            (b.data, b.outboard, b.size) = (data, outboard, Some(size));
            return Ok(b);
        }
        let p = self.open_partial(hash, target, false)?;
        // Claims are a hint: every group for which data is on disk is
        // re-checked against the hash, so groups verified after the last
        // save (kill -9) are kept and claims whose data never reached the
        // disk (power cut) are dropped.
        let claimed = runs_from_vec(&r.verified);
        let verified = match r.size {
            Some(size) => {
                let on_disk = match &p.data {
                    Slot::File(f) => f.metadata().map(|m| m.len()).unwrap_or(0),
                    _ => 0,
                };
                let candidates =
                    GroupRanges::from_range(0..on_disk.div_ceil(GROUP_SIZE).min(group_count(size)));
                recheck(hash, size, &p.data, &p.outboard, &candidates)?
            }
            None => GroupRanges::new(),
        };
        // Claims lost (data that never reached the disk, or was changed)
        // are news; groups verified after the last save (a kill) found on
        // disk are not, and a read-only open (`ls`) never saves what it
        // found, so each would say it again (a review: "2337 of 1945
        // claimed groups verify", at every command).
        let lost = claimed.difference(&verified).count();
        if lost > 0 {
            tracing::info!(
                "blob {hash}: {lost} of {} groups claimed verified do not verify on disk; they \
                 are fetched again",
                claimed.count()
            );
        } else if verified != claimed {
            tracing::debug!(
                "blob {hash}: {} groups verified, {} of them since the last save",
                verified.count(),
                verified.count() - claimed.count()
            );
        }
        {
            let mut s = lock(&p.st);
            s.size = r.size;
            s.verified = verified;
            s.size_proven = r.size_proven && r.size.is_some();
        }
        b.partial = Some(Arc::new(p));
        Ok(b)
    }

    /// A partial download no download has in hand, begun again for
    /// another output (`target`, or the store): its file moves there, so
    /// that it finishes where the get run now asked. A get called off (or
    /// interrupted) and run again to another output resumed into the
    /// first one's file, and that output appeared too once it finished (a
    /// review). Left where it is if the move cannot be made (another
    /// filesystem, a file in the way): it finishes there, and is copied.
    /// The caller holds the state and `files`.
    fn retarget(&self, hash: &blake3::Hash, b: &mut Blob, target: Option<&Path>) {
        let Some(p) = b.partial.as_ref() else { return };
        // Only to an output asked for: a `cat` or a get into the store
        // leaves a user's partial file where it is.
        let Some(t) = target else { return };
        if b.in_flight || p.target.as_deref() == target || lock(&p.st).done {
            return;
        }
        let (Slot::File(f), Some(from)) = (&p.data, &p.data_path) else {
            return;
        };
        let to = beside(t, "", PARTIAL);
        // Moved only if its path still names the file open (a symlink or
        // another file put in its place is not the download's: a review).
        let moved = if slot::names(from, f) {
            // The move is recorded first (see `Record::moved_from`); the
            // caller records the blob again after it, moved or not.
            let mut rec = record_of(b);
            rec.path = t.as_os_str().as_bytes().to_vec();
            rec.moved_from = Some(
                p.target
                    .as_deref()
                    .map_or_else(Vec::new, |o| o.as_os_str().as_bytes().to_vec()),
            );
            self.persist(hash, rec, true)
                .map_err(io::Error::other)
                .and_then(|()| rename_no_replace(from, &to))
        } else {
            Err(io::Error::other(
                "that path no longer names the download's file",
            ))
        };
        if let Err(e) = moved {
            tracing::warn!(
                "{hash}: the partial download stays at {} (it could not move to {}: {e}); it \
                 finishes there, and is copied",
                from.display(),
                to.display()
            );
            return;
        }
        // Writers still holding the old one (a stream of a download called
        // off) write nothing more: it is done.
        {
            let _gate = p.gate.write().unwrap_or_else(|e| e.into_inner());
            let mut st = lock(&p.st);
            st.done = true;
            st.generation += 1;
        }
        tracing::info!(
            "{hash}: the partial download moves from {} to {}",
            from.display(),
            to.display()
        );
        let st = lock(&p.st);
        let moved = Partial {
            data: p.data.clone(),
            outboard: p.outboard.clone(),
            data_path: Some(to),
            direct: OnceLock::new(),
            direct_off: AtomicBool::new(p.direct_off.load(Ordering::Relaxed)),
            target: target.map(Path::to_path_buf),
            gate: RwLock::new(()),
            st: Mutex::new(PState {
                size: st.size,
                verified: st.verified.clone(),
                size_proven: st.size_proven,
                generation: st.generation,
                unsaved: st.unsaved,
                last_save: st.last_save,
                done: false,
            }),
        };
        drop(st);
        b.partial = Some(Arc::new(moved));
    }

    /// A partial download recorded as moving (`Record::moved_from`) to
    /// `to`'s partial file: the last run stopped before its file moved if
    /// the file is still at the old place, and it moves now. Returns the
    /// target it is at: the old one (`None`: the store's own file) if it
    /// cannot move.
    fn finish_move(&self, hash: &blake3::Hash, from: &[u8], to: &Path) -> Option<PathBuf> {
        let old_target = (!from.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(from)));
        let old = match &old_target {
            Some(o) => beside(o, "", PARTIAL),
            None => self.owned_path(hash)?,
        };
        // A symlink at the old place is not the download's file (nor is
        // anything but a regular file): the download goes on at the new one.
        if !fs::symlink_metadata(&old).is_ok_and(|m| m.is_file()) {
            return Some(to.to_path_buf());
        }
        let new = beside(to, "", PARTIAL);
        match rename_no_replace(&old, &new) {
            Ok(()) => {
                tracing::info!(
                    "{hash}: the partial download moves from {} to {} (the last run stopped \
                     part way through the move)",
                    old.display(),
                    new.display()
                );
                Some(to.to_path_buf())
            }
            Err(e) => {
                tracing::warn!(
                    "{hash}: the partial download stays at {} (it could not move to {}: {e}); \
                     it finishes there, and is copied",
                    old.display(),
                    new.display()
                );
                old_target
            }
        }
    }

    /// A download into `target` whose partial file is gone and whose
    /// target holds the blob, every group of it verifying: it was renamed
    /// into place and the process stopped before recording that. Its data
    /// and outboard, as a complete blob's (hashed here once; a target that
    /// does not verify, or any error, is `None`: the download goes on as a
    /// partial one, and never over the file at the target).
    fn finished_at(
        &self,
        hash: &blake3::Hash,
        target: &Path,
        size: u64,
    ) -> Option<(DataRef, ObRef)> {
        if fs::symlink_metadata(beside(target, "", PARTIAL)).is_ok() {
            return None;
        }
        let f = open_read(target).ok()?;
        let m = f.metadata().ok()?;
        if !m.is_file() || m.len() != size {
            return None;
        }
        let ob_path = self.ob_path(hash)?;
        let has_outboard = bao_tree(size).outboard_size() > 0;
        let ob = if has_outboard {
            Slot::File(Arc::new(File::open(&ob_path).ok()?))
        } else {
            Slot::Mem(Arc::new(RwLock::new(Vec::new())))
        };
        let all = GroupRanges::from_range(0..group_count(size));
        let verified = recheck(hash, size, &Slot::File(Arc::new(f)), &ob, &all).ok()?;
        if verified != all {
            return None;
        }
        let data = DataRef::File {
            path: fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf()),
            stamp: Some(Stamp::of(&m)),
        };
        Some((
            data,
            if has_outboard {
                ObRef::File(ob_path)
            } else {
                ObRef::None
            },
        ))
    }

    /// Open (creating if needed) the files of a partial download: a new
    /// one (`fresh`), or one the store recorded (resumed).
    fn open_partial(
        &self,
        hash: &blake3::Hash,
        target: Option<PathBuf>,
        fresh: bool,
    ) -> Result<Partial, StoreError> {
        let open = |p: &Path| -> Result<Slot, StoreError> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map_err(io_err("creating", p))?;
            Ok(Slot::File(Arc::new(f)))
        };
        let data_path = match &target {
            Some(t) => Some(beside(t, "", PARTIAL)),
            None => self.owned_path(hash),
        };
        let data = match (&data_path, &target) {
            // Beside the user's output, a file the store has no record of
            // is not its own: another data dir's download of this or
            // another blob, or the user's. Written into, it was mixed with
            // the download, and what outlasted the blob's size stayed in
            // the output. Only an empty one (left by a stop before its
            // record was written) is taken.
            //
            // The file is locked (`flock`) while the download has it open:
            // another data dir's download that found it empty, before its
            // first batch, took it too, and both wrote into it.
            (Some(p), Some(_)) if fresh => {
                let f = match OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(p)
                {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        let f = OpenOptions::new()
                            .read(true)
                            .write(true)
                            .custom_flags(libc::O_NOFOLLOW)
                            .open(p)
                            .map_err(|_| StoreError::PartialInTheWay(p.clone()))?;
                        let m = f.metadata().map_err(io_err("reading", p))?;
                        if !m.is_file() || m.len() != 0 {
                            return Err(StoreError::PartialInTheWay(p.clone()));
                        }
                        f
                    }
                    Err(e) => return Err(StoreError::io("creating", p, e)),
                };
                if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                    .is_err()
                {
                    return Err(StoreError::PartialInTheWay(p.clone()));
                }
                Slot::File(Arc::new(f))
            }
            // A download resumed (at open, or begun again): its file, which
            // sits in the user's directory where others may put things.
            // Never through a symlink (one put there in place of the file
            // made the download write over whatever it named: a review),
            // nor into anything but a regular file. A file gone is made
            // again, new (its groups then fail the recheck and come again).
            (Some(p), Some(_)) => {
                let f = match OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(p)
                {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(p)
                        .map_err(|e| match e.kind() {
                            io::ErrorKind::AlreadyExists => StoreError::PartialInTheWay(p.clone()),
                            _ => StoreError::io("creating", p, e),
                        })?,
                    Err(e)
                        if e.raw_os_error() == Some(libc::ELOOP)
                            || e.kind() == io::ErrorKind::IsADirectory =>
                    {
                        return Err(StoreError::PartialInTheWay(p.clone()));
                    }
                    Err(e) => return Err(StoreError::io("opening", p, e)),
                };
                if !f.metadata().map_err(io_err("reading", p))?.is_file() {
                    return Err(StoreError::PartialInTheWay(p.clone()));
                }
                if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                    .is_err()
                {
                    tracing::warn!(
                        "{} is open in another shoal process too; both may write to it",
                        p.display()
                    );
                }
                Slot::File(Arc::new(f))
            }
            (Some(p), None) => open(p)?,
            (None, _) => Slot::Mem(Arc::new(RwLock::new(Vec::new()))),
        };
        let outboard = match self.ob_path(hash) {
            Some(p) => open(&p)?,
            None => Slot::Mem(Arc::new(RwLock::new(Vec::new()))),
        };
        Ok(Partial {
            data,
            outboard,
            data_path,
            direct: OnceLock::new(),
            direct_off: AtomicBool::new(false),
            target,
            gate: RwLock::new(()),
            st: Mutex::new(PState {
                size: None,
                verified: GroupRanges::new(),
                size_proven: false,
                generation: 0,
                unsaved: 0,
                last_save: Instant::now(),
                done: false,
            }),
        })
    }

    fn new_partial(
        &self,
        hash: &blake3::Hash,
        kind: BlobKind,
        target: Option<PathBuf>,
    ) -> Result<Blob, StoreError> {
        // Named as it will be once complete (`ls` showed an empty name for
        // a download by bare hash until then).
        let name = target.as_ref().and_then(|t| t.file_name()).map_or_else(
            || hash.to_hex()[..16].to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let p = self.open_partial(hash, target, true)?;
        Ok(Blob {
            size: None,
            kind,
            name,
            pinned: true,
            corrupt: false,
            data: DataRef::Db,
            outboard: ObRef::None,
            partial: Some(Arc::new(p)),
            in_flight: true,
            unsynced: None,
        })
    }

    /// Deletes the files in `data/` of blobs the store has no record of
    /// (nor left out at open): what a process killed before recording it
    /// put there, or an import that failed part way through its batch.
    /// Only `<hash>.data` and `<hash>.obao` names are looked at, by hash (a
    /// record's path may be spelled otherwise). A `.data` file that hashes
    /// to its name is a whole copy, maybe the only one (a recovery that
    /// failed for want of space leaves those): it is kept, with its
    /// outboard, and said so. The caller holds `files` exclusively.
    /// Returns the blobs whose files were freed, and the bytes.
    fn free_unrecorded_files(&self) -> (HashSet<blake3::Hash>, u64) {
        let Some(d) = self.data_dir() else {
            return (HashSet::new(), 0);
        };
        let Ok(rd) = fs::read_dir(&d) else {
            return (HashSet::new(), 0);
        };
        let mut unrecorded: HashMap<blake3::Hash, Vec<(PathBuf, fs::Metadata)>> = HashMap::new();
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(hex) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".data").or_else(|| n.strip_suffix(".obao")))
            else {
                continue;
            };
            let Ok(hash) = blake3::Hash::from_hex(hex) else {
                continue;
            };
            if lock(&self.state).contains_key(&hash) || lock(&self.unloaded).contains(&hash) {
                continue;
            }
            let Ok(m) = e.metadata() else { continue };
            if m.is_file() {
                unrecorded.entry(hash).or_default().push((e.path(), m));
            }
        }
        let mut freed = HashSet::new();
        let mut bytes = 0;
        for (hash, files) in unrecorded {
            let whole = files.iter().any(|(p, _)| {
                p.extension().is_some_and(|x| x == "data")
                    && blake3::Hasher::new()
                        .update_mmap_rayon(p)
                        .is_ok_and(|h| h.finalize() == hash)
            });
            if whole {
                tracing::warn!(
                    "gc: {} is a whole copy of {hash} that the store has no record of; left as \
                     it is (`shoal add` it to share it again, or delete it)",
                    d.join(format!("{}.data", hash.to_hex())).display()
                );
                continue;
            }
            for (p, m) in files {
                match fs::remove_file(&p) {
                    Ok(()) => {
                        bytes += m.blocks() * 512;
                        freed.insert(hash);
                    }
                    Err(err) => tracing::warn!("gc: cannot remove {}: {err}", p.display()),
                }
            }
        }
        if !freed.is_empty() {
            tracing::debug!(
                "gc: freed the files of {} blob(s) the store has no record of",
                freed.len()
            );
        }
        (freed, bytes)
    }

    /// Take `hashes` out of `st` (the state, locked by the caller) and
    /// delete their records in one durable commit; if that fails, they
    /// are put back. The blobs taken out.
    fn remove_blobs(
        &self,
        st: &mut HashMap<blake3::Hash, Blob>,
        hashes: Vec<blake3::Hash>,
    ) -> Result<Vec<(blake3::Hash, Blob)>, StoreError> {
        let removed: Vec<(blake3::Hash, Blob)> = hashes
            .into_iter()
            .filter_map(|h| st.remove(&h).map(|b| (h, b)))
            .collect();
        if let Some(db) = &self.db {
            let ops: Vec<Op> = removed.iter().map(|(h, _)| Op::Delete(*h)).collect();
            if let Err(e) = self.apply(db, &ops, true) {
                for (h, b) in removed {
                    st.insert(h, b);
                }
                return Err(e);
            }
        }
        let mut served = lock(&self.served);
        for (h, _) in &removed {
            served.remove(h);
        }
        Ok(removed)
    }

    fn persist(&self, hash: &blake3::Hash, rec: Record, durable: bool) -> Result<(), StoreError> {
        match &self.db {
            Some(db) => self.apply(db, &[Op::Put(*hash, rec)], durable),
            None => Ok(()),
        }
    }

    /// [`Inner::update`] of the pin, kind or name, undone in memory if it
    /// cannot be recorded: an `rm` that failed (a full disk) left the blob
    /// unpinned in memory, and a gc then freed what it had downloaded
    /// (a review).
    fn update_or_undo(
        &self,
        hash: &blake3::Hash,
        f: impl FnOnce(&mut Blob),
    ) -> Result<(), StoreError> {
        let mut st = lock(&self.state);
        let b = st.get_mut(hash).ok_or(StoreError::NotFound(*hash))?;
        let before = (b.pinned, b.kind, b.name.clone());
        f(b);
        let rec = record_of(b);
        let res = self.persist(hash, rec, true);
        if res.is_err() {
            (b.pinned, b.kind, b.name) = before;
        }
        res
    }

    fn update(&self, hash: &blake3::Hash, f: impl FnOnce(&mut Blob)) -> Result<(), StoreError> {
        // The state lock is held through the commit: a record of the blob
        // made meanwhile (a move, held in `pending`) would otherwise be
        // written first and then overwritten by this older one.
        let mut st = lock(&self.state);
        let b = st.get_mut(hash).ok_or(StoreError::NotFound(*hash))?;
        f(b);
        let rec = record_of(b);
        self.persist(hash, rec, true)
    }

    /// Data of `hash` did not match its hash while `doing` something with
    /// it: say so, mark the blob corrupt (never served or exported again
    /// until re-added) and return the error.
    fn refuse_corrupt(&self, hash: &blake3::Hash, name: String, doing: &str) -> StoreError {
        tracing::warn!("blob {hash} ({name}) is corrupt on disk; not {doing} it");
        self.mark_corrupt(hash);
        StoreError::Corrupt { hash: *hash, name }
    }

    /// A complete, store-owned copy of `hash` found corrupt (or its file
    /// lost), about to be fetched again: the groups that still verify
    /// against its outboard are kept, as a partial download of the blob
    /// with the same pin and name, so that only the rest is fetched (as
    /// BitTorrent rechecks a damaged download) and a fetch that finds no
    /// peer destroys nothing. An outboard that is gone or of the wrong
    /// length is rebuilt from the data when the data is whole: the blob is
    /// then complete again. A blob that turns out whole is no longer
    /// corrupt. Returns false, changing nothing, for a blob that is not a
    /// complete copy in the store's own data file (gone or changed
    /// meanwhile, too).
    fn salvage(&self, hash: &blake3::Hash) -> Result<bool, StoreError> {
        let (size, path, name) = {
            let st = lock(&self.state);
            match st.get(hash) {
                Some(Blob {
                    size,
                    partial: None,
                    name,
                    data: DataRef::File { path, stamp: None },
                    ..
                }) if Some(path) == self.owned_path(hash).as_ref() => {
                    (size.unwrap_or(0), path.clone(), name.clone())
                }
                _ => return Ok(false),
            }
        };
        let Some(ob_path) = self.ob_path(hash) else {
            return Ok(false);
        };
        let all = all_groups(size);
        let ob_len = bao_tree(size).outboard_size();
        let data = match open_read(&path) {
            Ok(f) => Some(Slot::File(Arc::new(f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(StoreError::io("opening", &path, e)),
        };
        let ob_fits = ob_len == 0 || fs::metadata(&ob_path).is_ok_and(|m| m.len() == ob_len);
        let valid = match &data {
            None => GroupRanges::new(),
            Some(d) if ob_fits => {
                let ob = if ob_len == 0 {
                    Slot::Mem(Arc::new(RwLock::new(Vec::new())))
                } else {
                    Slot::File(Arc::new(
                        File::open(&ob_path).map_err(io_err("opening", &ob_path))?,
                    ))
                };
                recheck(hash, size, d, &ob, &all)?
            }
            Some(Slot::File(f)) => {
                // No outboard to check groups against: the whole data is
                // hashed; if it is the blob, its outboard is written again.
                match tree::hash_file(f, size).map_err(io_err("reading", &path))? {
                    tree::FileHash::Hashed(root, len, ob) if root == *hash && len == size => {
                        self.write_outboard(hash, ob)?;
                        if let Ok(f) = File::open(&ob_path) {
                            let _ = f.sync_all();
                        }
                        tracing::info!("blob {hash} ({name}): its outboard was rebuilt");
                        all.clone()
                    }
                    _ => GroupRanges::new(),
                }
            }
            Some(_) => GroupRanges::new(),
        };
        let _files = adding_files(self);
        let mut st = lock(&self.state);
        let Some(b) = st.get_mut(hash) else {
            return Ok(false);
        };
        if b.partial.is_some()
            || !matches!(&b.data, DataRef::File { path: p, stamp: None } if *p == path)
        {
            return Ok(false);
        }
        if valid == all {
            let was_corrupt = b.corrupt;
            b.corrupt = false;
            if ob_len > 0 {
                b.outboard = ObRef::File(ob_path);
            }
            let rec = record_of(b);
            if let Err(e) = self.persist(hash, rec, true) {
                b.corrupt = was_corrupt;
                return Err(e);
            }
            drop(st);
            tracing::info!("blob {hash} ({name}) is whole");
            let _ = self.events.send(StoreEvent::Added { hash: *hash });
            return Ok(true);
        }
        let p = self.open_partial(hash, None, false)?;
        {
            let mut s = lock(&p.st);
            s.size = Some(size);
            s.verified = valid.clone();
            // Its size was proven when it was whole: a peer saying
            // otherwise is refused, not taken as a reason to start over.
            s.size_proven = true;
        }
        let old = (
            std::mem::replace(&mut b.data, DataRef::Db),
            std::mem::replace(&mut b.outboard, ObRef::None),
            b.corrupt,
        );
        b.partial = Some(Arc::new(p));
        b.corrupt = false;
        let rec = record_of(b);
        if let Err(e) = self.persist(hash, rec, true) {
            (b.data, b.outboard, b.corrupt) = old;
            b.partial = None;
            return Err(e);
        }
        drop(st);
        tracing::warn!(
            "blob {hash} ({name}): {} of its {} groups still verify; kept, the rest is to be \
             fetched again",
            valid.count(),
            group_count(size)
        );
        Ok(true)
    }

    fn mark_corrupt(&self, hash: &blake3::Hash) {
        if let Err(e) = self.update(hash, |b| b.corrupt = true) {
            tracing::warn!("cannot record that {hash} is corrupt: {e}");
        }
    }

    fn save_partial(&self, hash: &blake3::Hash) -> Result<(), StoreError> {
        let rec = {
            let st = lock(&self.state);
            let Some(b) = st.get(hash) else { return Ok(()) };
            if let Some(p) = &b.partial {
                let mut s = lock(&p.st);
                s.unsaved = 0;
                s.last_save = Instant::now();
            }
            record_of(b)
        };
        self.persist(hash, rec, true)
    }

    fn save_all_partials(&self) -> Result<(), StoreError> {
        let Some(db) = &self.db else { return Ok(()) };
        let ops: Vec<Op> = {
            let st = lock(&self.state);
            st.iter()
                .filter_map(|(h, b)| {
                    let p = b.partial.as_ref()?;
                    {
                        let mut s = lock(&p.st);
                        if s.unsaved == 0 {
                            return None;
                        }
                        s.unsaved = 0;
                    }
                    // Data first, then the claims about it.
                    let _ = p.data.sync();
                    let _ = p.outboard.sync();
                    Some(Op::Put(*h, record_of(b)))
                })
                .collect()
        };
        if ops.is_empty() {
            return Ok(());
        }
        self.apply(db, &ops, true)
    }

    /// Open a blob for reading; checks in-place files.
    fn source(&self, hash: &blake3::Hash) -> Result<Source, StoreError> {
        self.source_with(hash, &mut |p| open_read(p))
    }

    /// [`Inner::source`], opening a blob's data file with `open`.
    fn source_with(
        &self,
        hash: &blake3::Hash,
        open: &mut dyn FnMut(&Path) -> io::Result<File>,
    ) -> Result<Source, StoreError> {
        let (size, name, data, outboard, partial, corrupt) = {
            let st = lock(&self.state);
            let b = st.get(hash).ok_or(StoreError::NotFound(*hash))?;
            (
                b.size,
                b.name.clone(),
                b.data.clone(),
                b.outboard.clone(),
                b.partial.clone(),
                b.corrupt,
            )
        };
        if corrupt {
            return Err(StoreError::Corrupt { hash: *hash, name });
        }
        if let Some(p) = partial {
            let s = lock(&p.st);
            let size = s.size.ok_or(StoreError::Incomplete(*hash))?;
            return Ok(Source {
                size,
                name,
                data: p.data.clone(),
                outboard: p.outboard.clone(),
                verified: Some(s.verified.clone()),
            });
        }
        let size = size.unwrap_or(0);
        // What the store itself keeps (its data file, outboard, inline
        // row) gone: the blob is corrupt, not a passing error; so marked,
        // it is no longer offered to peers, and a get fetches it again.
        // Looked at again first: the blob may have gone (gc) and come back
        // (an add) since it was looked up, with files that are there.
        let lost = |what: &str, still: &dyn Fn(&Blob) -> bool| {
            if !lock(&self.state).get(hash).is_some_and(still) {
                return StoreError::NotFound(*hash);
            }
            tracing::warn!("blob {hash} ({name}): its {what} is gone");
            self.refuse_corrupt(hash, name.clone(), "serving")
        };
        let data = match data {
            DataRef::Mem(m) => Slot::Mem(m),
            DataRef::Db => match self.inline_bytes(hash) {
                Ok(b) => Slot::Bytes(b),
                // (Asked twice: a commit that failed puts its rows back.)
                Err(StoreError::NotFound(_))
                    if self.db.is_some()
                        && matches!(self.inline_bytes(hash), Err(StoreError::NotFound(_))) =>
                {
                    return Err(lost("stored content", &|b| matches!(b.data, DataRef::Db)));
                }
                Err(e) => return Err(e),
            },
            DataRef::File { path, stamp } => {
                let f = match open(&path) {
                    Ok(f) => f,
                    Err(e) if stamp.is_some() && e.kind() == io::ErrorKind::NotFound => {
                        return Err(StoreError::SourceChanged(path));
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        let gone = |b: &Blob| matches!(&b.data, DataRef::File { path: p, stamp: None } if *p == path && !p.exists());
                        return Err(lost("data file", &gone));
                    }
                    Err(e) => return Err(StoreError::io("opening", &path, e)),
                };
                if let Some(s) = stamp {
                    let m = f.metadata().map_err(io_err("reading", &path))?;
                    if Stamp::of(&m) != s {
                        tracing::warn!(
                            "blob {hash}: {} changed since it was added",
                            path.display()
                        );
                        return Err(StoreError::SourceChanged(path));
                    }
                }
                Slot::File(Arc::new(f))
            }
        };
        let outboard = match outboard {
            ObRef::None => Slot::Empty,
            ObRef::Mem(m) => Slot::Mem(m),
            ObRef::File(p) => match File::open(&p) {
                Ok(f) => Slot::File(Arc::new(f)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let gone =
                        |b: &Blob| matches!(&b.outboard, ObRef::File(o) if *o == p && !o.exists());
                    return Err(lost("outboard", &gone));
                }
                Err(e) => return Err(StoreError::io("opening", &p, e)),
            },
        };
        Ok(Source {
            size,
            name,
            data,
            outboard,
            verified: None,
        })
    }

    // ------------------------------------------------------------ import

    fn write_outboard(&self, hash: &blake3::Hash, ob: tree::Outboard) -> Result<ObRef, StoreError> {
        if ob.is_empty() {
            return Ok(ObRef::None);
        }
        let (Some(path), Some(tmp)) = (self.ob_path(hash), self.tmp_path()) else {
            return Ok(ObRef::Mem(Arc::new(RwLock::new(ob.to_vec()))));
        };
        let res = File::create(&tmp).and_then(|mut f| {
            if ob.len() >= OB_WRITEBACK_MIN {
                ob.write_to(&mut WriteBack::new(&f, ob.len()))
            } else {
                // Small: written plainly. An import syncs it with the rest
                // of its batch (one syncfs); one written for a blob fetched
                // whole is checked again after a reboot (`store/batch.rs`).
                ob.write_to(&mut f)
            }
        });
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io("writing", &tmp, e));
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io("renaming", &path, e));
        }
        Ok(ObRef::File(path))
    }

    /// A file hashed in place, its outboard written.
    fn prepare_hashed(&self, h: HashedFile) -> Result<Prepared, StoreError> {
        let outboard = self.write_outboard(&h.hash, h.outboard)?;
        Ok(Prepared {
            hash: h.hash,
            size: h.size,
            name: h.name,
            kind: BlobKind::Raw,
            data: DataRef::File {
                path: h.path,
                stamp: Some(h.stamp),
            },
            outboard,
            inline: None,
            unsynced: None,
            pin: true,
        })
    }

    fn prepare_bytes(
        &self,
        data: &[u8],
        name: String,
        kind: BlobKind,
    ) -> Result<Prepared, StoreError> {
        let (hash, ob) = tree::hash_tree(data);
        let size = data.len() as u64;
        let mut p = Prepared {
            hash,
            size,
            name,
            kind,
            data: DataRef::Db,
            outboard: ObRef::None,
            inline: None,
            unsynced: None,
            pin: true,
        };
        if self.dir.is_none() {
            p.data = DataRef::Mem(Arc::new(RwLock::new(data.to_vec())));
            p.outboard = ObRef::Mem(Arc::new(RwLock::new(ob.to_vec())));
            return Ok(p);
        }
        if data.len() <= GROUP {
            p.inline = Some(data.to_vec());
            return Ok(p);
        }
        let (Some(path), Some(tmp)) = (self.owned_path(&hash), self.tmp_path()) else {
            return Err(StoreError::NotFound(hash));
        };
        let res = File::create(&tmp)
            .map_err(io_err("creating", &tmp))
            .and_then(|mut f| {
                f.write_all(data).map_err(io_err("writing", &tmp))?;
                f.sync_data().map_err(io_err("writing", &tmp))
            })
            .and_then(|()| fs::rename(&tmp, &path).map_err(io_err("renaming", &path)));
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        p.data = DataRef::File { path, stamp: None };
        p.outboard = self.write_outboard(&hash, ob)?;
        Ok(p)
    }

    fn prepare_file(
        &self,
        path: &Path,
        mode: ImportMode,
        name: String,
    ) -> Result<Prepared, StoreError> {
        let (f, s0) = open_regular(path)?;
        let changed = || StoreError::ChangedDuringImport(path.to_path_buf());
        let copy_small = mode == ImportMode::Copy && (self.dir.is_none() || s0.size <= GROUP_SIZE);
        if copy_small {
            let mut data = Vec::with_capacity(usize::try_from(s0.size).unwrap_or(0));
            (&f).read_to_end(&mut data)
                .map_err(io_err("reading", path))?;
            unchanged(&f, path, s0)?;
            if data.len() as u64 != s0.size {
                // Same size and time before and after: not a change but a
                // pseudo-file.
                return Err(StoreError::SizeUntrue(path.to_path_buf(), s0.size));
            }
            return self.prepare_bytes(&data, name, BlobKind::Raw);
        }
        match mode {
            ImportMode::InPlace => self.prepare_hashed(HashedFile::hash_open(f, path, s0, name)?),
            ImportMode::Copy => {
                let Some(tmp) = self.tmp_path() else {
                    return Err(StoreError::Unsupported(path.to_path_buf()));
                };
                let res = (|| {
                    // Copy in the kernel and hash our private copy (which
                    // nobody else changes: the hash is of exactly the bytes
                    // stored), piece by piece, the two overlapping with the
                    // writeback to disk (see tree/copy.rs).
                    let out = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(&tmp)
                        .map_err(io_err("creating", &tmp))?;
                    let (hash, len, ob) = match tree::copy_and_hash(&f, &out, s0.size) {
                        Ok(tree::FileHash::Hashed(h, len, ob)) => (h, len, ob),
                        Ok(tree::FileHash::Shrank) => return Err(changed()),
                        Err(tree::CopyError::Source(e)) => {
                            return Err(StoreError::io("copying", path, e));
                        }
                        Err(tree::CopyError::Dest(e)) => {
                            return Err(StoreError::io("writing", &tmp, e));
                        }
                    };
                    unchanged(&f, path, s0)?;
                    out.sync_data().map_err(io_err("writing", &tmp))?;
                    let dest = self.owned_path(&hash).ok_or_else(changed)?;
                    // The outboard first: if it does not fit (a full disk),
                    // the copy is still the temporary file, removed below;
                    // renamed first, it stayed, full size, named by no
                    // record.
                    let outboard = self.write_outboard(&hash, ob)?;
                    fs::rename(&tmp, &dest).map_err(io_err("renaming", &dest))?;
                    Ok(Prepared {
                        hash,
                        size: len,
                        name,
                        kind: BlobKind::Raw,
                        data: DataRef::File {
                            path: dest,
                            stamp: None,
                        },
                        outboard,
                        inline: None,
                        unsynced: None,
                        pin: true,
                    })
                })();
                if res.is_err() {
                    let _ = fs::remove_file(&tmp);
                }
                res
            }
        }
    }

    /// Record prepared imports in one transaction (pinned if they say so;
    /// a pin already there stays). A blob already complete and usable
    /// keeps its data.
    fn commit(&self, items: Vec<Prepared>) -> Result<(), StoreError> {
        // Outboards are written without an fsync: they are made durable
        // here, before the records that point at them are. A few are
        // synced one by one; many (a directory import) with one syncfs of
        // the store's filesystem rather than one journal commit per file.
        let outboards: Vec<&Path> = items
            .iter()
            .filter_map(|p| match &p.outboard {
                ObRef::File(f) => Some(f.as_path()),
                _ => None,
            })
            .collect();
        if outboards.len() > 8
            && let Some(d) = self.data_dir()
        {
            let f = File::open(&d).map_err(io_err("syncing", &d))?;
            batch::syncfs(&f).map_err(io_err("syncing", &d))?;
        } else {
            for ob in outboards {
                File::open(ob)
                    .and_then(|f| f.sync_data())
                    .map_err(io_err("syncing", ob))?;
            }
        }
        let mut st = lock(&self.state);
        let mut ops = Vec::with_capacity(items.len() * 2);
        let mut new = Vec::with_capacity(items.len());
        // Files this commit's imports wrote that the records kept do not
        // use: deleted once the records are committed (left, they were
        // files no record names, which gc never freed and an empty
        // database brought back as "recovered" blobs).
        let mut strays: Vec<PathBuf> = Vec::new();
        for mut p in items {
            // A private copy (`add --copy`) of a blob held in place
            // replaces the file in place: the user asked for a copy that
            // outlives the file (kept, it was written and never used).
            let copy_over_in_place =
                matches!(p.data, DataRef::File { stamp: None, .. } | DataRef::Db)
                    && st
                        .get(&p.hash)
                        .is_some_and(|b| matches!(b.data, DataRef::File { stamp: Some(_), .. }));
            let keep = !copy_over_in_place
                && st.get(&p.hash).is_some_and(|b| {
                    b.partial.is_none()
                        && !b.corrupt
                        && match &b.data {
                            DataRef::File {
                                path,
                                stamp: Some(s),
                            } => stamp_matches(path, *s),
                            _ => true,
                        }
                });
            if keep {
                if let Some(b) = st.get_mut(&p.hash) {
                    b.pinned |= p.pin;
                    if p.kind == BlobKind::Collection {
                        b.kind = p.kind;
                    }
                    if b.name.is_empty() {
                        b.name = p.name;
                    }
                    ops.push(Op::Put(p.hash, record_of(b)));
                    if let DataRef::File { path, stamp: None } = &p.data
                        && !matches!(&b.data, DataRef::File { path: q, .. } if q == path)
                    {
                        strays.push(path.clone());
                    }
                    if let ObRef::File(o) = &p.outboard
                        && !matches!(&b.outboard, ObRef::File(q) if q == o)
                    {
                        strays.push(o.clone());
                    }
                }
                continue;
            }
            p.pin |= st.get(&p.hash).is_some_and(|b| b.pinned);
            new.push(p.record_new(&mut ops));
        }
        if let Some(db) = &self.db {
            self.apply(db, &ops, true)?;
        }
        let added: Vec<blake3::Hash> = new.iter().map(|(h, _)| *h).collect();
        for (h, b) in new {
            st.insert(h, b);
        }
        drop(st);
        for f in strays {
            if let Err(e) = fs::remove_file(&f)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!("cannot remove {}: {e}", f.display());
            }
        }
        for hash in added {
            let _ = self.events.send(StoreEvent::Added { hash });
        }
        Ok(())
    }

    // ----------------------------------------------------------- receive

    /// Find or create the partial entry for a stream of `size` bytes.
    /// None if the blob is already complete with that size.
    fn prepare_receive(
        &self,
        hash: &blake3::Hash,
        size: u64,
    ) -> Result<Option<(Arc<Partial>, u64)>, ReceiveError> {
        let existing = {
            let st = lock(&self.state);
            st.get(hash).map(|b| (b.partial.clone(), b.size))
        };
        let partial = match existing {
            Some((None, s)) => {
                let s = s.unwrap_or(0);
                if s != size {
                    return Err(ReceiveError::SizeMismatch {
                        expected: s,
                        got: size,
                    });
                }
                return Ok(None);
            }
            Some((Some(p), _)) => p,
            None => {
                // Files go into data/ here: not while gc looks there.
                let _files = adding_files(self);
                let b = self.new_partial(hash, BlobKind::Raw, None)?;
                let mut st = lock(&self.state);
                let entry = st.entry(*hash).or_insert(b);
                match &entry.partial {
                    Some(p) => p.clone(),
                    None => return Ok(None),
                }
            }
        };
        // A reset waits for the writes under way: it holds the gate, taken
        // before the state, as writers do (the state is let go to take it,
        // and looked at again).
        let mut gate = None;
        let (generation, changed) = loop {
            {
                let mut s = lock(&partial.st);
                break match s.size {
                    Some(old) if old == size => (s.generation, false),
                    Some(old) if s.proven() => {
                        return Err(ReceiveError::SizeMismatch {
                            expected: old,
                            got: size,
                        });
                    }
                    Some(_) if gate.is_none() => {
                        drop(s);
                        gate = Some(partial.gate.write().unwrap_or_else(|e| e.into_inner()));
                        continue;
                    }
                    Some(_) => {
                        partial.data.clear().map_err(|e| {
                            StoreError::io("resetting", Path::new("partial blob"), e)
                        })?;
                        partial.outboard.clear().map_err(|e| {
                            StoreError::io("resetting", Path::new("partial blob"), e)
                        })?;
                        s.verified = GroupRanges::new();
                        s.generation += 1;
                        s.size = Some(size);
                        (s.generation, true)
                    }
                    None => {
                        s.size = Some(size);
                        // The size is only a claim until the last group
                        // verifies: reserve a bounded amount, so that a peer
                        // lying about the size cannot make an in-memory store
                        // ask for gigabytes (the buffer grows as data verifies).
                        partial.data.reserve(size.min(64 << 20));
                        (s.generation, true)
                    }
                };
            }
        };
        drop(gate);
        if changed {
            {
                let mut st = lock(&self.state);
                if let Some(b) = st.get_mut(hash) {
                    b.size = Some(size);
                }
            }
            self.save_partial(hash)?;
        }
        Ok(Some((partial, generation)))
    }

    /// The blocking half of `receive_ranges`.
    /// Write verified batches of one stream as they come, and mark their
    /// groups; the groups that were not verified before.
    fn write_batches(
        &self,
        hash: blake3::Hash,
        partial: &Arc<Partial>,
        generation: u64,
        mut rx: mpsc::Receiver<Batch>,
    ) -> Result<GroupRanges, StoreError> {
        let mut w = Writer {
            inner: self,
            hash,
            partial,
            generation,
            data: AlignedBuf::default(),
            data_start: 0,
            ob: Vec::new(),
            ob_start: 0,
            groups: GroupRanges::new(),
            newly: GroupRanges::new(),
            reserved: 0..0,
        };
        while let Some(b) = rx.blocking_recv() {
            w.data = b.data;
            w.data_start = b.data_start;
            w.ob = b.ob;
            w.ob_start = b.ob_start;
            w.groups = b.groups;
            w.flush()?;
        }
        Ok(w.newly)
    }

    /// A partial blob whose every group is verified, not being completed
    /// already: complete it. A download that verified its last group and
    /// then could not record it (killed, or the commit failed) is finished
    /// here when it is begun again; otherwise no group would ever come to
    /// finish it, and the download would wait for good.
    fn finish_if_verified(&self, hash: &blake3::Hash) -> Result<(), StoreError> {
        let partial = lock(&self.state).get(hash).and_then(|b| b.partial.clone());
        let Some(partial) = partial else {
            return Ok(());
        };
        {
            let mut s = lock(&partial.st);
            let Some(size) = s.size else { return Ok(()) };
            if s.done || !s.verified.is_exactly(0..group_count(size)) {
                return Ok(());
            }
            s.done = true;
        }
        self.finalize(hash, &partial)
    }

    /// Make a partial blob complete: sync, rename into its target, record.
    /// If that fails, the partial blob stays as it was (data back under
    /// its partial name), to be finished by [`Inner::finish_if_verified`].
    fn finalize(&self, hash: &blake3::Hash, partial: &Arc<Partial>) -> Result<(), StoreError> {
        let res = self.try_finalize(hash, partial);
        if res.is_err() {
            lock(&partial.st).done = false;
        }
        res
    }

    fn try_finalize(&self, hash: &blake3::Hash, partial: &Arc<Partial>) -> Result<(), StoreError> {
        // No stream writes from here on (`done` is set): those writing
        // now finish first.
        let _gate = partial.gate.write().unwrap_or_else(|e| e.into_inner());
        // Only the blob's partial download now: one moved since
        // (`retarget`) is not renamed anywhere.
        if !lock(&self.state)
            .get(hash)
            .and_then(|b| b.partial.as_ref())
            .is_some_and(|p| Arc::ptr_eq(p, partial))
        {
            return Ok(());
        }
        // Its file is still at its path (not a symlink or another file put
        // in its place: the rename below would move that into the output).
        if let (Slot::File(f), Some(path)) = (&partial.data, &partial.data_path)
            && partial.target.is_some()
            && !slot::names(path, f)
        {
            return Err(StoreError::PartialInTheWay(path.clone()));
        }
        let size = lock(&partial.st).size.unwrap_or(0);
        let ctx = Path::new("completed blob");
        // Every group was written, so the file reaches the blob's end
        // unless something else cut it short meanwhile (a user's file
        // beside the output). Padding it back to size with zeros made a
        // "complete" download of the wrong bytes (a review): the groups
        // that no longer verify are dropped and fetched again instead.
        if let (Slot::File(f), Some(path)) = (&partial.data, &partial.data_path) {
            let len = f.metadata().map_err(io_err("reading", path))?.len();
            if len < size {
                let all = GroupRanges::from_range(0..group_count(size));
                let still = recheck(hash, size, &partial.data, &partial.outboard, &all)?;
                let lost = all.count() - still.count();
                tracing::warn!(
                    "blob {hash}: {} was cut short to {len} of {size} bytes while it \
                     downloaded; {lost} groups are fetched again",
                    path.display()
                );
                lock(&partial.st).verified = still;
                self.save_partial(hash)?;
                return Err(StoreError::PartialCutShort {
                    path: path.clone(),
                    lost,
                });
            }
        }
        // A hole where groups were verified: the file was cut short and
        // lengthened again by a write past the cut (two streams at once),
        // which the check of each batch cannot see. The groups are
        // checked again; the ones that fail are lost, as above.
        if let (Slot::File(f), Some(path)) = (&partial.data, &partial.data_path) {
            // A filesystem may report a hole's edges coarsely (data that
            // is zeros): any hole means every group is checked again.
            if !groups_in_holes(f, size).is_empty() {
                let all = GroupRanges::from_range(0..group_count(size));
                let still = recheck(hash, size, &partial.data, &partial.outboard, &all)?;
                let lost = all.difference(&still);
                if !lost.is_empty() {
                    tracing::warn!(
                        "blob {hash}: {} has holes where {} verified groups were; they are \
                         fetched again",
                        path.display(),
                        lost.count()
                    );
                    let mut st = lock(&partial.st);
                    st.verified = st.verified.difference(&lost);
                    drop(st);
                    self.save_partial(hash)?;
                    return Err(StoreError::PartialCutShort {
                        path: path.clone(),
                        lost: lost.count(),
                    });
                }
            }
        }
        // Exactly the blob: nothing past its end (a longer file found
        // where the download began, or written by an earlier size).
        partial
            .data
            .truncate_to(size)
            .map_err(io_err("truncating", ctx))?;
        partial.data.sync().map_err(io_err("syncing", ctx))?;
        partial.outboard.sync().map_err(io_err("syncing", ctx))?;
        // Where the data went, to be put back if the record fails.
        let mut moved: Option<(&Path, &Path)> = None;
        let data = match (&partial.target, &partial.data_path, &partial.data) {
            (Some(target), Some(tmp), _) => {
                // Never over a file that is there now: the user's, made
                // since the download began (or a directory).
                let at = match rename_no_replace(tmp, target) {
                    Ok(()) => {
                        moved = Some((tmp, target));
                        target
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        tracing::warn!(
                            "{} was made while {hash} downloaded into it: it is left as it is, \
                             and the download stays at {}",
                            target.display(),
                            tmp.display()
                        );
                        tmp
                    }
                    Err(e) => return Err(StoreError::io("renaming into", target, e)),
                };
                let m = match fs::metadata(at) {
                    Ok(m) => m,
                    Err(e) => {
                        undo_move(hash, moved);
                        return Err(StoreError::io("reading", at, e));
                    }
                };
                DataRef::File {
                    path: fs::canonicalize(at).unwrap_or_else(|_| at.to_path_buf()),
                    stamp: Some(Stamp::of(&m)),
                }
            }
            (None, Some(p), _) => DataRef::File {
                path: p.clone(),
                stamp: None,
            },
            (_, _, Slot::Mem(m)) => DataRef::Mem(m.clone()),
            _ => DataRef::Db,
        };
        let outboard = if bao_tree(size).outboard_size() == 0 {
            if let Some(p) = self.ob_path(hash) {
                let _ = fs::remove_file(p);
            }
            ObRef::None
        } else {
            match (&partial.outboard, self.ob_path(hash)) {
                (Slot::Mem(m), _) => ObRef::Mem(m.clone()),
                (_, Some(p)) => ObRef::File(p),
                _ => ObRef::None,
            }
        };
        let mut st = lock(&self.state);
        let Some(b) = st.get_mut(hash) else {
            return Ok(());
        };
        if !b.partial.as_ref().is_some_and(|p| Arc::ptr_eq(p, partial)) {
            return Ok(());
        }
        let before = (b.data.clone(), b.outboard.clone(), b.in_flight, b.size);
        b.data = data;
        b.outboard = outboard;
        b.partial = None;
        // Pinned by `begin_download`; a user who unpinned it since
        // (`shoal rm` while it downloads) is not overruled: gc frees it.
        b.in_flight = false;
        b.size = Some(size);
        if b.name.is_empty() {
            b.name = hash.to_hex()[..16].to_string();
        }
        // The state lock is held through the commit (as in `update`), so
        // that a failed one is undone before anyone sees it.
        if let Err(e) = self.persist(hash, record_of(b), true) {
            (b.data, b.outboard, b.in_flight, b.size) = before;
            b.partial = Some(partial.clone());
            undo_move(hash, moved);
            return Err(e);
        }
        drop(st);
        let _ = self.events.send(StoreEvent::Complete { hash: *hash });
        Ok(())
    }
}

/// Writes the verified batches of one stream and marks their groups.
struct Writer<'a> {
    inner: &'a Inner,
    hash: blake3::Hash,
    partial: &'a Arc<Partial>,
    generation: u64,
    data: AlignedBuf,
    data_start: u64,
    ob: Vec<u8>,
    ob_start: u64,
    /// Groups in `data`, not yet marked.
    groups: GroupRanges,
    /// Groups this stream verified that were not verified before.
    newly: GroupRanges,
    /// Bytes of the data file this stream has reserved disk blocks for.
    reserved: std::ops::Range<u64>,
}

impl Writer<'_> {
    /// Write the aligned part of a large batch with `O_DIRECT`; how many
    /// bytes that was (the rest is the caller's).
    ///
    /// Why: through the page cache a GiB costs a copy, per-page
    /// bookkeeping and writeback submission, ~15% of a downloader's CPU in
    /// a profile of `shoal get` over loopback; with `O_DIRECT` the disk
    /// reads the batch where the decoder verified it. Small batches (a
    /// collection's small files, the last group of a file) keep the page
    /// cache, where they cost less than a direct write's wait.
    fn write_direct(&self) -> io::Result<usize> {
        if self.data.len() < DIRECT_MIN {
            return Ok(0);
        }
        let Some(f) = self.partial.direct() else {
            return Ok(0);
        };
        match slot::write_direct(f, self.data_start, &self.data) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Refused for this file after all (some filesystems only
                // say so at the write): the page cache from now on.
                self.partial.direct_off.store(true, Ordering::Relaxed);
                Ok(0)
            }
            r => r,
        }
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        let ctx = Path::new("download");
        let gate = self.partial.gate.read().unwrap_or_else(|e| e.into_inner());
        {
            let s = lock(&self.partial.st);
            if s.done || s.generation != self.generation {
                // Finished (by another stream of the same blob: every group
                // is verified) or reset to another size: nothing to write.
                self.ob.clear();
                self.data.clear();
                self.groups = GroupRanges::new();
                return Ok(());
            }
        }
        if !self.ob.is_empty() {
            self.partial
                .outboard
                .write_all_at(self.ob_start, &self.ob)
                .map_err(io_err("writing outboard of", ctx))?;
            self.ob.clear();
        }
        if self.groups.is_empty() {
            return Ok(());
        }
        // The file shorter than what was verified in it: something else cut
        // it short (a user's file beside the output). A write past the cut
        // would lengthen it again over a hole of zeros, and the download
        // finished as the wrong bytes (a review). The groups lost are
        // dropped, and the download stops saying so: run again, it fetches
        // them. One `fstat` per batch.
        if let (Slot::File(f), Some(path)) = (&self.partial.data, &self.partial.data_path) {
            // What was verified first, then the length: a group is written
            // before it is marked, so a stream of the same blob marking
            // one meanwhile cannot make the file look short.
            let high = {
                let s = lock(&self.partial.st);
                let size = s.size.unwrap_or(0);
                s.verified
                    .runs()
                    .last()
                    .map_or(0, |r| (r.end * GROUP_SIZE).min(size))
            };
            let len = f.metadata().map_err(io_err("reading", path))?.len();
            let lost = {
                let mut s = lock(&self.partial.st);
                (len < high).then(|| {
                    let kept = s.verified.clipped(len / GROUP_SIZE);
                    let lost = s.verified.count() - kept.count();
                    s.verified = kept;
                    lost
                })
            };
            if let Some(lost) = lost {
                drop(gate);
                self.ob.clear();
                self.data.clear();
                self.groups = GroupRanges::new();
                tracing::warn!(
                    "blob {}: {} was cut short to {len} bytes while it downloaded; {lost} \
                     verified groups are lost",
                    self.hash,
                    path.display()
                );
                self.inner.save_partial(&self.hash)?;
                return Err(StoreError::PartialCutShort {
                    path: path.clone(),
                    lost,
                });
            }
        }
        let end = self.data_start + self.data.len() as u64;
        if self.data_start < self.reserved.start || end > self.reserved.end {
            // Reserve blocks a window ahead, never past the claimed size, and
            // only where verified data is about to go: a peer lying about the
            // size makes us reserve at most one window more than it sent.
            let size = lock(&self.partial.st).size.unwrap_or(0);
            let start = self.data_start - self.data_start % PREALLOCATE;
            let stop = (start + PREALLOCATE).min(size).max(end);
            self.partial.data.preallocate(start, stop - start);
            self.reserved = start..stop;
        }
        let direct = self.write_direct().map_err(io_err("writing", ctx))?;
        let (pos, rest) = (self.data_start + direct as u64, &self.data[direct..]);
        self.partial
            .data
            .write_all_at(pos, rest)
            .map_err(io_err("writing", ctx))?;
        if rest.len() >= WRITE_BATCH {
            self.partial.data.start_writeback(pos, rest.len() as u64);
        }
        self.data.clear();
        let groups = std::mem::take(&mut self.groups);
        let (fresh, size, complete, save) = {
            let mut s = lock(&self.partial.st);
            if s.generation != self.generation {
                return Ok(());
            }
            let fresh = groups.difference(&s.verified);
            // In place, and no count over every run: what a download has
            // may be many runs (fetched rarest first), a batch a few.
            s.verified.union_with(&fresh);
            s.unsaved += fresh.count();
            let size = s.size.unwrap_or(0);
            let complete = !s.done && s.verified.is_exactly(0..group_count(size));
            if complete {
                s.done = true;
            }
            let save = s.unsaved >= SAVE_EVERY_GROUPS || s.last_save.elapsed() >= SAVE_EVERY;
            (fresh, size, complete, save)
        };
        drop(gate);
        if fresh.is_empty() {
            return Ok(());
        }
        self.newly.union_with(&fresh);
        let _ = self.inner.events.send(StoreEvent::Verified {
            hash: self.hash,
            groups: fresh,
            size,
        });
        if complete {
            self.inner.finalize(&self.hash, self.partial)?;
        } else if save {
            // Data before the claims about it (page cache, not fsync: the
            // claims are re-checked on open).
            self.inner.save_partial(&self.hash)?;
        }
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.flush_on_drop.load(Ordering::SeqCst)
            && let Err(e) = self.save_all_partials()
        {
            tracing::warn!("saving partial downloads on close failed: {e}");
        }
        if self.flush_on_drop.load(Ordering::SeqCst)
            && let Some(db) = &self.db
            && !lock(&self.pending).is_empty()
            && let Err(e) = self.apply(db, &[], true)
        {
            tracing::warn!("recording fetched files on close failed: {e}");
        }
    }
}

/// Put a completed download's data back under its partial name (`moved`:
/// partial name, target), when its completion failed after the rename.
fn undo_move(hash: &blake3::Hash, moved: Option<(&Path, &Path)>) {
    if let Some((tmp, target)) = moved
        && let Err(e) = rename_no_replace(target, tmp)
    {
        tracing::warn!(
            "{hash}: could not move {} back to {}: {e}",
            target.display(),
            tmp.display()
        );
    }
}

/// The suffix of a download's file beside its output.
const PARTIAL: &str = ".shoal-partial";

/// The longest file name this store makes (Linux's `NAME_MAX`, which
/// ext4, xfs, btrfs and tmpfs share).
const NAME_MAX: usize = 255;

/// A sibling of `target` for work in progress: `prefix`, its file name and
/// `suffix`, as in `.out.bin.shoal-tmp`. A name that would not fit in
/// 255 bytes (`NAME_MAX`) keeps as much of its start as fits with `~` and 16 hex
/// digits of its BLAKE3 hash: the same every time (a resumed download finds
/// its file again) and its own (two long names that start alike differ).
/// A valid name of 242 bytes or more could not be downloaded, its partial
/// file's name being too long.
pub fn beside(target: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let name = target.file_name().unwrap_or(OsStr::new("out"));
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(NAME_MAX);
    out.extend_from_slice(prefix.as_bytes());
    if prefix.len() + bytes.len() + suffix.len() <= NAME_MAX {
        out.extend_from_slice(bytes);
    } else {
        let tag = format!("~{}", &blake3::hash(bytes).to_hex()[..16]);
        let room = NAME_MAX.saturating_sub(prefix.len() + tag.len() + suffix.len());
        let mut keep = room.min(bytes.len());
        // Not through a UTF-8 character (names are bytes on Unix, but a
        // cut one would show as garbage).
        if let Ok(text) = std::str::from_utf8(bytes) {
            while !text.is_char_boundary(keep) {
                keep -= 1;
            }
        }
        out.extend_from_slice(&bytes[..keep]);
        out.extend_from_slice(tag.as_bytes());
    }
    out.extend_from_slice(suffix.as_bytes());
    target.with_file_name(OsStr::from_bytes(&out))
}

/// Rename `from` to `to` unless something is at `to` already (then
/// [`io::ErrorKind::AlreadyExists`]): a plain rename would replace a file
/// the user made there. Where the filesystem has no such rename, a hard
/// link and an unlink do the same for a file; a directory is renamed after
/// a check (which a race can still beat, as before).
pub fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            if fs::symlink_metadata(from)?.is_dir() {
                if fs::symlink_metadata(to).is_ok() {
                    return Err(io::ErrorKind::AlreadyExists.into());
                }
                return fs::rename(from, to);
            }
            match fs::hard_link(from, to) {
                Ok(()) => fs::remove_file(from),
                // No hard links either (some FUSE and shared-folder
                // filesystems): a check, then a rename.
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    if fs::symlink_metadata(to).is_ok() {
                        return Err(io::ErrorKind::AlreadyExists.into());
                    }
                    fs::rename(from, to)
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), read once; empty
/// where there is none, and then files written unsynced are checked again
/// at every open.
fn boot_id() -> Bytes {
    static BOOT: OnceLock<Bytes> = OnceLock::new();
    BOOT.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| Bytes::from(s.trim().as_bytes().to_vec()))
            .unwrap_or_default()
    })
    .clone()
}
