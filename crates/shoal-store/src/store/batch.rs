//! Many small blobs at once: received whole from a peer (a collection of
//! many small files), checked against their hashes, written and recorded
//! without an fsync or a database commit per file.
//!
//! The per-blob download path (`begin_download`, `receive_ranges`,
//! completion) makes every blob durable on its own: about five fsyncs and
//! three database commits per blob, which is the whole cost of a small
//! file. Here a batch's files are written to the page cache, as `tar` or
//! `cp` would, and their records are held in memory ([`Pending`]) until
//! the next commit of any kind, so that a fetch of 10,000 files writes
//! its records once rather than once per batch of 256 (redb rewrites the
//! pages a commit touches: 26 MiB written for ~2 MiB of records), and as
//! a few entries of `meta::GROUPS` rather than one entry each.
//!
//! Nothing waits for those files to reach the disk. Instead each record
//! carries the boot it was written in (`Record::unsynced_boot`): a killed
//! process loses nothing (the page cache outlives it), and after a reboot,
//! which may have been a power loss, [`Inner::recheck_after_reboot`]
//! hashes each such file again at open and drops the records whose files
//! did not survive whole. So a record is never trusted for content the
//! disk may not hold, and the fetch pays neither a `syncfs` nor a
//! background writeback (a 10,000-file get: 450 -> 346 ms, with the
//! records held in memory, against a sync at the end and a writeback of
//! each batch). Without a boot id the files are checked at every open.
//! Records lost before any commit (a crash) only mean those files are
//! fetched again.

use std::os::fd::OwnedFd;

use rustix::fs::{Mode, OFlags};

use super::*;

/// Records held in memory at most before a (non-durable) commit: they
/// cost ~200 bytes each, inline blobs their content too.
const PENDING_RECORDS_MAX: usize = 65_536;
/// The largest file checked again after a reboot (read whole).
const RECHECK_MAX: u64 = 64 << 20;
/// Content of inline blobs held in memory at most before a commit.
const PENDING_INLINE_MAX: usize = 16 << 20;
/// Records held in memory at most this long before a durable commit: a
/// download of many small files killed half way (SIGKILL, no flush)
/// fetches again what came in the last few seconds, not everything (a
/// review saw 887 files on disk fetched again after a kill at 12 s). A
/// fast download ends before this and commits once.
const PENDING_AGE_MAX: Duration = Duration::from_secs(3);

/// A small blob received whole from an untrusted peer, not yet checked.
#[derive(Debug, Clone)]
pub struct WholeBlob {
    /// The hash it must have.
    pub hash: blake3::Hash,
    /// Its content.
    pub data: Bytes,
    /// Where its file goes (the parent directory must exist; an existing
    /// file there is replaced). None keeps the content in the store.
    pub target: Option<PathBuf>,
    /// Pin it. False for a collection's members, which the pinned
    /// collection keeps (so that `rm` of it frees them); a pin already
    /// there stays.
    pub pin: bool,
}

/// What [`Store::insert_whole`] did with one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WholeOutcome {
    /// Checked, written and recorded complete (and pinned if asked).
    Stored,
    /// The content does not hash to the blob's hash: nothing was written.
    Corrupt,
    /// The store already has an entry for the hash (complete, or a partial
    /// download): nothing was written.
    Present,
}

impl Store {
    /// Check each blob of `items` against its hash (all of it, before any
    /// byte is written), write the good ones and record them complete (and
    /// pinned, those that ask for it). The records are held in memory until the next commit (see
    /// [`Store::flush`]); their files are not synced (see the module
    /// documentation). One outcome per item, in order; an error is local
    /// (disk full, permissions) and leaves the store consistent.
    pub fn insert_whole(&self, items: Vec<WholeBlob>) -> Result<Vec<WholeOutcome>, StoreError> {
        let hashed = hash_all(&items);
        let _files = adding_files(&self.inner);
        let mut outcomes = Vec::with_capacity(items.len());
        {
            let st = lock(&self.inner.state);
            for (it, (h, _)) in items.iter().zip(&hashed) {
                outcomes.push(if *h != it.hash {
                    WholeOutcome::Corrupt
                } else if st.contains_key(h) {
                    WholeOutcome::Present
                } else {
                    WholeOutcome::Stored
                });
            }
        }
        let mut written: Vec<Prepared> = Vec::new();
        let mut files: Vec<PathBuf> = Vec::new();
        let res = (|| {
            for ((it, (_, ob)), o) in items.into_iter().zip(hashed).zip(&outcomes) {
                if *o != WholeOutcome::Stored {
                    continue;
                }
                let p = self.inner.write_whole(it, ob, &mut files)?;
                written.push(p);
            }
            Ok::<(), StoreError>(())
        })();
        if let Err(e) = res {
            for f in files {
                let _ = fs::remove_file(f);
            }
            return Err(e);
        }
        let mut st = lock(&self.inner.state);
        let mut ops = Vec::with_capacity(written.len() * 2);
        let mut new = Vec::with_capacity(written.len());
        for p in written {
            if st.contains_key(&p.hash) {
                // Arrived meanwhile by another path: that entry stands.
                continue;
            }
            new.push(p.record_new(&mut ops));
        }
        // Added under the state lock, so that they are ordered with every
        // other change made under it.
        let (full, stale) = match self.inner.db.is_some() {
            false => (false, false),
            true => {
                let mut pending = lock(&self.inner.pending);
                let mut unloaded = lock(&self.inner.unloaded);
                for op in ops {
                    match op {
                        // An old record of the blob, not loaded at open, is
                        // still there: this one goes on its own, over it.
                        Op::Put(h, r) if unloaded.remove(&h) => {
                            pending.changed.insert(h, r);
                        }
                        Op::Put(h, r) => {
                            pending.new.insert(h, r);
                        }
                        Op::PutInline(h, d) => pending.put_inline(h, d.into()),
                        // `record_new` only adds.
                        Op::Delete(_) => {}
                    }
                }
                if pending.since.is_none() && !pending.is_empty() {
                    pending.since = Some(Instant::now());
                }
                (pending.full(), pending.stale())
            }
        };
        let hashes: Vec<blake3::Hash> = new.iter().map(|(h, _)| *h).collect();
        st.extend(new);
        drop(st);
        if (full || stale)
            && let Some(db) = &self.inner.db
        {
            self.inner.apply(db, &[], stale)?;
        }
        for hash in hashes {
            let _ = self.inner.events.send(StoreEvent::Complete { hash });
        }
        Ok(outcomes)
    }

    /// Commit durably the records [`Store::insert_whole`] holds in memory
    /// (any commit writes them; this one forces it), and those a
    /// non-durable commit wrote. Their files are not synced: see the
    /// module documentation.
    pub fn flush(&self) -> Result<(), StoreError> {
        match &self.inner.db {
            Some(db)
                if !lock(&self.inner.pending).is_empty()
                    || self.inner.undurable.load(Ordering::SeqCst) =>
            {
                self.inner.apply(db, &[], true)
            }
            _ => Ok(()),
        }
    }

    /// Makes room for `n` more blobs, to be added soon (the members of a
    /// collection): the maps grow once instead of doubling their way up
    /// (in a 10,000-file get, their rehashing had ~30% of the page faults).
    pub fn reserve(&self, n: usize) {
        lock(&self.inner.state).reserve(n);
        if self.inner.db.is_some() {
            lock(&self.inner.pending).new.reserve(n);
            lock(&self.inner.grouped).reserve(n);
        }
    }

    /// [`Store::relocate`] for many blobs at once, for files the caller
    /// moved itself (a directory renamed into place): each blob's file is
    /// now `base` joined with its path in `moves`. One durable commit, with
    /// the records held in memory. The recorded identity (inode,
    /// modification time) is kept, not re-read: a file that is not the one
    /// recorded is refused when it is next opened. Blobs that are not
    /// complete files referenced in place are skipped.
    pub fn relocate_many<P: AsRef<Path>>(
        &self,
        base: &Path,
        moves: &[(blake3::Hash, P)],
    ) -> Result<(), StoreError> {
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        {
            let mut st = lock(&self.inner.state);
            let mut pending = lock(&self.inner.pending);
            for (hash, rel) in moves {
                let Some(b) = st.get_mut(hash) else { continue };
                if let DataRef::File {
                    path,
                    stamp: Some(_),
                } = &mut b.data
                {
                    // Into the buffers already there: no allocation for a
                    // path no longer than the old one.
                    let os = path.as_mut_os_string();
                    os.clear();
                    os.push(base.as_os_str());
                    path.push(rel.as_ref());
                    if self.inner.db.is_none() {
                        continue;
                    }
                    // A record not written yet only takes the new path.
                    match pending.new.get_mut(hash) {
                        Some(r) => {
                            r.path.clear();
                            r.path.extend_from_slice(path.as_os_str().as_bytes());
                        }
                        None => {
                            pending.changed.insert(*hash, record_of(b));
                        }
                    }
                }
            }
        }
        self.flush()
    }
}

/// Records not yet committed (see the module documentation): the latest
/// of each blob, and the content of inline blobs, which reads find here
/// meanwhile.
#[derive(Default)]
pub(super) struct Pending {
    /// Of blobs new to the store: written together, as one group (see
    /// `meta::GROUPS`) when there are enough.
    new: HashMap<blake3::Hash, Record>,
    /// Of blobs recorded before: written one by one, over their old
    /// records (which may be in a group).
    changed: HashMap<blake3::Hash, Record>,
    inline: HashMap<blake3::Hash, Bytes>,
    inline_bytes: usize,
    /// When the oldest of them came (see [`PENDING_AGE_MAX`]).
    since: Option<Instant>,
}

/// New records fewer than this are written one by one, not as a group.
const GROUP_MIN: usize = 32;
/// Records in one group at most.
const GROUP_MAX: usize = 8192;

impl Pending {
    pub(super) fn is_empty(&self) -> bool {
        self.new.is_empty() && self.changed.is_empty() && self.inline.is_empty()
    }

    fn put_inline(&mut self, h: blake3::Hash, d: Bytes) {
        self.inline_bytes += d.len();
        if let Some(old) = self.inline.insert(h, d) {
            self.inline_bytes -= old.len();
        }
    }

    fn full(&self) -> bool {
        self.new.len() + self.changed.len() >= PENDING_RECORDS_MAX
            || self.inline_bytes >= PENDING_INLINE_MAX
    }

    /// Held long enough to be committed durably.
    fn stale(&self) -> bool {
        self.since.is_some_and(|t| t.elapsed() >= PENDING_AGE_MAX)
    }

    /// The content of a pending inline blob.
    pub(super) fn inline(&self, h: &blake3::Hash) -> Option<Bytes> {
        self.inline.get(h).cloned()
    }

    /// Write everything into `t` but the new records of `deleted` blobs
    /// (deleted in the same transaction: a group would keep them): the
    /// new records as groups (ids from `next_id`) if there are enough,
    /// else one by one, then the changed ones over them. Returns the
    /// groups written, with their blobs.
    fn write_to(
        &self,
        t: &mut meta::Tables<'_>,
        deleted: &HashSet<blake3::Hash>,
        mut next_id: impl FnMut() -> u64,
    ) -> Result<Vec<(u64, Vec<blake3::Hash>)>, StoreError> {
        let mut inline: Vec<(&blake3::Hash, &Bytes)> = self.inline.iter().collect();
        inline.sort_unstable_by_key(|(h, _)| *h.as_bytes());
        for (h, d) in inline {
            t.put_inline(h, d)?;
        }
        let mut new: Vec<(&blake3::Hash, &Record)> = self
            .new
            .iter()
            .filter(|(h, _)| !deleted.contains(*h))
            .collect();
        let mut groups = Vec::new();
        if new.len() >= GROUP_MIN {
            // Groups of a bounded size: deleting one blob rewrites its
            // group (~1.6 MB at most).
            for part in new.chunks(GROUP_MAX) {
                let id = next_id();
                t.put_group(id, &meta::encode_group(part))?;
                groups.push((id, part.iter().map(|(h, _)| **h).collect()));
            }
        } else {
            new.sort_unstable_by_key(|(h, _)| *h.as_bytes());
            for (h, r) in new {
                t.put(h, r)?;
            }
        }
        let mut changed: Vec<(&blake3::Hash, &Record)> = self.changed.iter().collect();
        changed.sort_unstable_by_key(|(h, _)| *h.as_bytes());
        for (h, r) in changed {
            t.put(h, r)?;
        }
        Ok(groups)
    }

    /// Put back what a failed commit took, under anything newer.
    fn restore(&mut self, older: Pending) {
        self.since = match (self.since, older.since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        for (h, r) in older.new {
            self.new.entry(h).or_insert(r);
        }
        for (h, r) in older.changed {
            self.changed.entry(h).or_insert(r);
        }
        for (h, d) in older.inline {
            if !self.inline.contains_key(&h) {
                self.put_inline(h, d);
            }
        }
    }
}

/// The directory `file` is in ("." for a bare file name).
pub(super) fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl Inner {
    /// Apply `ops` to `db` in one transaction, after the records held in
    /// memory ([`Inner::pending`]), which are taken inside the transaction:
    /// redb runs one at a time, so they are written in the order they
    /// were made. Blobs deleted are taken out of their groups too. If the
    /// commit fails, the records are held again.
    pub(super) fn apply(
        &self,
        db: &redb::Database,
        ops: &[Op],
        durable: bool,
    ) -> Result<(), StoreError> {
        let _one = lock(&self.apply_one);
        let mut taken: Option<Pending> = None;
        // Changes to `grouped`, undone if the commit fails: (blob, group
        // it was in before).
        let mut undo: Vec<(blake3::Hash, Option<u64>)> = Vec::new();
        let res = meta::write(db, durable, |t| {
            let p = {
                let mut pending = lock(&self.pending);
                let p = std::mem::take(&mut *pending);
                // Readable until the commit ends (set before `pending`
                // is let go, so that a reader finds them in one or the
                // other).
                if !p.inline.is_empty() {
                    *lock(&self.committing) = p.inline.clone();
                }
                taken.insert(p)
            };
            let deleted: HashSet<blake3::Hash> = ops
                .iter()
                .filter_map(|op| match op {
                    Op::Delete(h) => Some(*h),
                    _ => None,
                })
                .collect();
            let mut grouped = lock(&self.grouped);
            let mut from_groups: HashMap<u64, HashSet<blake3::Hash>> = HashMap::new();
            for h in &deleted {
                if let Some(id) = grouped.get(h) {
                    from_groups.entry(*id).or_default().insert(*h);
                }
            }
            t.remove_from_groups(&from_groups)?;
            let groups = p.write_to(t, &deleted, || {
                self.next_group.fetch_add(1, Ordering::SeqCst)
            })?;
            t.apply(ops)?;
            for h in &deleted {
                if let Some(id) = grouped.remove(h) {
                    undo.push((*h, Some(id)));
                }
            }
            for (id, hashes) in groups {
                for h in hashes {
                    undo.push((h, grouped.insert(h, id)));
                }
            }
            #[cfg(test)]
            if self.fail_commits.load(Ordering::SeqCst) {
                return Err(StoreError::io(
                    "committing",
                    Path::new("meta.redb"),
                    io::Error::other("injected"),
                ));
            }
            Ok(())
        });
        if res.is_err() {
            let mut grouped = lock(&self.grouped);
            for (h, before) in undo.into_iter().rev() {
                match before {
                    Some(id) => grouped.insert(h, id),
                    None => grouped.remove(&h),
                };
            }
            drop(grouped);
            if let Some(p) = taken {
                lock(&self.pending).restore(p);
            }
        } else {
            self.undurable.store(!durable, Ordering::SeqCst);
        }
        lock(&self.committing).clear();
        res
    }

    /// At open: blobs whose files were written unsynced in another boot
    /// (or an unknown one) are hashed again, since a power loss may have
    /// left them short, empty or missing. Those that still match are
    /// recorded as synced (a reboot wrote them back); the others are
    /// dropped from the store, with their store-owned files (a file of the
    /// user's is left where it is). A fetch of them starts over.
    pub(super) fn recheck_after_reboot(&self, blobs: &mut HashMap<blake3::Hash, Blob>) {
        let stale: Vec<blake3::Hash> = blobs
            .iter()
            .filter(|(_, b)| {
                b.unsynced
                    .as_deref()
                    .is_some_and(|m| m.is_empty() || *m != *self.boot)
            })
            .map(|(h, _)| *h)
            .collect();
        if stale.is_empty() {
            return;
        }
        #[cfg(test)]
        self.rechecks.fetch_add(stale.len(), Ordering::SeqCst);
        let verdicts: Vec<(blake3::Hash, bool)> = stale
            .par_iter()
            .map(|h| (*h, blobs.get(h).is_some_and(|b| content_matches(h, b))))
            .collect();
        let mut ops = Vec::with_capacity(verdicts.len());
        let mut dropped = Vec::new();
        for (h, ok) in verdicts {
            if ok {
                // Without a boot id there is no telling whether what was
                // read came from the disk or from the page cache of the
                // same boot: the mark stays, and the check is made again
                // at every open.
                if !self.boot.is_empty()
                    && let Some(b) = blobs.get_mut(&h)
                {
                    b.unsynced = None;
                    ops.push(Op::Put(h, record_of(b)));
                }
            } else if let Some(b) = blobs.remove(&h) {
                ops.push(Op::Delete(h));
                dropped.push(b);
            }
        }
        if let Some(db) = &self.db
            && !ops.is_empty()
            && let Err(e) = self.apply(db, &ops, true)
        {
            // Left as they were on disk: checked again at the next open.
            tracing::warn!("recording the check of files written before a reboot failed: {e}");
            return;
        }
        if !dropped.is_empty() {
            tracing::warn!(
                "{} of {} files fetched unsynced before a reboot did not survive it whole; \
                 dropped from the store",
                dropped.len(),
                stale.len()
            );
        }
        for b in dropped {
            if let DataRef::File { path, stamp: None } = &b.data {
                let _ = fs::remove_file(path);
            }
            if let ObRef::File(p) = &b.outboard {
                let _ = fs::remove_file(p);
            }
        }
    }

    /// Write one checked small blob where it belongs; returns what to
    /// record. Files created are added to `files` (removed on failure).
    fn write_whole(
        &self,
        it: WholeBlob,
        ob: tree::Outboard,
        files: &mut Vec<PathBuf>,
    ) -> Result<Prepared, StoreError> {
        let size = it.data.len() as u64;
        let name = it.target.as_ref().and_then(|t| t.file_name()).map_or_else(
            || it.hash.to_hex()[..16].to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let mut p = Prepared {
            hash: it.hash,
            size,
            name,
            kind: BlobKind::Raw,
            data: DataRef::Db,
            outboard: ObRef::None,
            inline: None,
            unsynced: None,
            pin: it.pin,
        };
        if let Some(target) = it.target {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&target)
                .map_err(io_err("creating", &target))?;
            files.push(target.clone());
            f.write_all(&it.data).map_err(io_err("writing", &target))?;
            let m = f.metadata().map_err(io_err("reading", &target))?;
            p.data = DataRef::File {
                path: std::path::absolute(&target).unwrap_or(target),
                stamp: Some(Stamp::of(&m)),
            };
            p.unsynced = Some(self.boot.clone());
        } else if self.dir.is_none() {
            p.data = DataRef::Mem(Arc::new(RwLock::new(it.data.to_vec())));
        } else if it.data.len() <= GROUP {
            p.inline = Some(it.data.to_vec());
        } else {
            let (Some(path), Some(tmp)) = (self.owned_path(&it.hash), self.tmp_path()) else {
                return Err(StoreError::NotFound(it.hash));
            };
            if let Err(e) = fs::write(&tmp, &it.data) {
                let _ = fs::remove_file(&tmp);
                return Err(StoreError::io("writing", &tmp, e));
            }
            if let Err(e) = fs::rename(&tmp, &path) {
                let _ = fs::remove_file(&tmp);
                return Err(StoreError::io("renaming", &path, e));
            }
            files.push(path.clone());
            p.data = DataRef::File { path, stamp: None };
            p.unsynced = Some(self.boot.clone());
        }
        if self.dir.is_none() {
            if !ob.is_empty() {
                p.outboard = ObRef::Mem(Arc::new(RwLock::new(ob.to_vec())));
            }
        } else {
            p.outboard = self.write_outboard(&it.hash, ob)?;
            if let ObRef::File(f) = &p.outboard {
                files.push(f.clone());
            }
        }
        Ok(p)
    }
}

/// Whether the file of a complete blob holds exactly its content (and its
/// outboard file the right outboard), read from disk. Files in place must
/// also still be the ones recorded. Only small blobs are recorded unsynced
/// (a `GetBlobs` answer holds 4 MiB at most); a larger one is refused.
fn content_matches(hash: &blake3::Hash, b: &Blob) -> bool {
    let DataRef::File { path, stamp } = &b.data else {
        // In the database: as durable as its record.
        return true;
    };
    let Some(size) = b.size.filter(|s| *s <= RECHECK_MAX) else {
        return false;
    };
    let Ok(f) = open_read(path) else {
        return false;
    };
    if let Some(s) = stamp
        && f.metadata().map(|m| Stamp::of(&m)).ok() != Some(*s)
    {
        return false;
    }
    let mut data = Vec::with_capacity(size as usize);
    if f.take(size + 1).read_to_end(&mut data).is_err() || data.len() as u64 != size {
        return false;
    }
    let (h, ob) = tree::hash_tree(&data);
    if h != *hash {
        return false;
    }
    match &b.outboard {
        ObRef::File(p) => fs::read(p).is_ok_and(|d| d == ob.to_vec()),
        ObRef::None => ob.is_empty(),
        ObRef::Mem(_) => true,
    }
}

/// `syncfs(2)`: flush every dirty page and inode of the filesystem that
/// holds `f`, in one call. std has no wrapper; fsyncing each of thousands
/// of small files would cost a journal commit each.
pub(super) fn syncfs(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open for
    // the duration of the call.
    let r = unsafe { libc::syncfs(f.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Store {
    /// The whole content of a complete blob of at most `max` bytes, checked
    /// against its hash, for serving it whole. None if the blob is not
    /// here complete, or is larger. Data that does not match its hash is
    /// never returned: the blob is marked corrupt and
    /// [`StoreError::Corrupt`] returned.
    pub fn read_whole(&self, hash: &blake3::Hash, max: u64) -> Result<Option<Bytes>, StoreError> {
        self.read_whole_many(std::slice::from_ref(hash), max)
            .pop()
            .unwrap_or(Ok(None))
    }

    /// [`Store::read_whole`] for many blobs, checked together (see
    /// `tree::hash_small_many`): one outcome per hash, in order. Blobs
    /// served lately come from memory (`store/served.rs`), the others are
    /// read, checked and kept there.
    pub fn read_whole_many(
        &self,
        hashes: &[blake3::Hash],
        max: u64,
    ) -> Vec<Result<Option<Bytes>, StoreError>> {
        let mut out: Vec<Option<Result<Option<Bytes>, StoreError>>> = {
            let st = lock(&self.inner.state);
            let mut served = lock(&self.inner.served);
            hashes
                .iter()
                .map(|h| {
                    let b = st.get(h)?;
                    if b.partial.is_some() || b.corrupt || b.size.unwrap_or(0) > max {
                        return None;
                    }
                    served.get(h).map(|d| Ok(Some(d)))
                })
                .collect()
        };
        let mut dirs = DirOpener::default();
        let read: Vec<(usize, Unchecked)> = out
            .iter()
            .enumerate()
            .filter(|(_, o)| o.is_none())
            .map(|(i, _)| (i, self.read_unchecked(&hashes[i], max, &mut dirs)))
            .collect();
        let datas: Vec<&[u8]> = read
            .iter()
            .filter_map(|(_, r)| match r {
                Ok(Some((b, _))) => Some(&b[..]),
                _ => None,
            })
            .collect();
        let mut got = tree::hash_small_many(&datas).into_iter();
        let mut checked = Vec::new();
        for (i, r) in read {
            let hash = &hashes[i];
            out[i] = Some(match r {
                Ok(Some((b, name))) => {
                    if got.next() == Some(*hash) {
                        checked.push((*hash, b.clone()));
                        Ok(Some(b))
                    } else {
                        Err(self.inner.refuse_corrupt(hash, name, "serving"))
                    }
                }
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            });
        }
        if !checked.is_empty() {
            // Under the state lock, as `remove_blobs` takes blobs out of
            // both: one removed meanwhile is not kept.
            let st = lock(&self.inner.state);
            let mut served = lock(&self.inner.served);
            for (h, b) in checked {
                if st.contains_key(&h) {
                    served.put(h, b);
                }
            }
        }
        out.into_iter().map(|o| o.unwrap_or(Ok(None))).collect()
    }

    /// The memory that small blobs served lately may keep (see
    /// [`Store::read_whole_many`]; 64 MiB unless set); 0 keeps none.
    pub fn set_served_cache(&self, bytes: usize) {
        lock(&self.inner.served).set_budget(bytes);
    }

    /// Small blobs kept in memory after serving them, and the memory they
    /// take.
    pub fn served_cache_usage(&self) -> (usize, usize) {
        lock(&self.inner.served).usage()
    }

    /// The memory small blobs served lately may keep (see
    /// [`Store::set_served_cache`]).
    pub fn served_cache_budget(&self) -> usize {
        lock(&self.inner.served).budget()
    }

    /// The whole content of a complete blob of at most `max` bytes, not
    /// checked yet, and its name.
    fn read_unchecked(
        &self,
        hash: &blake3::Hash,
        max: u64,
        dirs: &mut DirOpener,
    ) -> Result<Option<(Bytes, String)>, StoreError> {
        let src = match self.inner.source_with(hash, &mut |p| dirs.open(p)) {
            Ok(s) => s,
            Err(StoreError::NotFound(_) | StoreError::Incomplete(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        if src.verified.is_some() || src.size > max {
            return Ok(None);
        }
        let n = usize::try_from(src.size).map_err(|_| StoreError::Incomplete(*hash))?;
        let mut buf = vec![0u8; n];
        match src.data.read_exact_at(0, &mut buf) {
            Ok(()) => Ok(Some((buf.into(), src.name))),
            // Shorter than its record: cut short on disk (a file in place
            // that changed size fails its stamp before this).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.inner.refuse_corrupt(hash, src.name, "serving"))
            }
            Err(e) => Err(StoreError::io("reading", Path::new(&src.name), e)),
        }
    }
}

/// What `read_unchecked` gives: content and name, if served whole.
type Unchecked = Result<Option<(Bytes, String)>, StoreError>;

/// Opens files relative to their directory, the last one kept open.
///
/// The members of a collection come in the manifest's order, a directory's
/// files together, and each absolute path costs the kernel a lookup per
/// component. A fresh seeder's first get of 10,000 small files spent ~13%
/// of its samples in `openat`, much of it walking the same directories
/// again; relative opens took its CPU 138 -> 134 ms (8 alternating
/// rounds, a fresh seeder each). What is opened is still checked as
/// before (the stamp of a file added in place, then the content against
/// its hash), so a directory renamed meanwhile cannot make it serve the
/// wrong bytes.
#[derive(Default)]
struct DirOpener {
    dir: Option<(PathBuf, OwnedFd)>,
}

impl DirOpener {
    fn open(&mut self, path: &Path) -> io::Result<File> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return open_read(path);
        };
        if parent.as_os_str().is_empty() {
            return open_read(path);
        }
        let dir = match &self.dir {
            Some((p, fd)) if p == parent => fd,
            _ => {
                let fd = rustix::fs::open(
                    parent,
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                &self.dir.insert((parent.to_path_buf(), fd)).1
            }
        };
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let fd = rustix::fs::openat(dir, name, flags, Mode::empty())?;
        Ok(File::from(fd))
    }
}

/// The hash and outboard of each blob of `items`: those of one group at
/// most (no outboard) all together, wide; the others on every core.
fn hash_all(items: &[WholeBlob]) -> Vec<(blake3::Hash, tree::Outboard)> {
    let small: Vec<&[u8]> = items
        .iter()
        .filter(|it| it.data.len() <= GROUP)
        .map(|it| &it.data[..])
        .collect();
    let mut small = tree::hash_small_many(&small).into_iter();
    let large: Vec<&WholeBlob> = items.iter().filter(|it| it.data.len() > GROUP).collect();
    // rayon only for two or more: a parallel iterator wakes the pool even
    // when it has nothing to do, and the woken threads spin (sched_yield)
    // before they sleep again, CPU taken from the batch's own work.
    let large: Vec<(blake3::Hash, tree::Outboard)> = if large.len() > 1 {
        large
            .par_iter()
            .map(|it| tree::hash_tree(&it.data))
            .collect()
    } else {
        large.iter().map(|it| tree::hash_tree(&it.data)).collect()
    };
    let mut large = large.into_iter();
    items
        .iter()
        .filter_map(|it| {
            if it.data.len() <= GROUP {
                small.next().map(|h| (h, tree::Outboard::none()))
            } else {
                large.next()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn gc_waiting_for_an_add_does_not_hold_up_other_adds() {
        // gc waits while files go into data/, but not as a queued writer:
        // one would stop every new reader (a download beginning, on an
        // async worker) behind an add that hashes for minutes.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let adding = adding_files(&store.inner);
        std::thread::scope(|s| {
            let gc = s.spawn(|| store.gc());
            std::thread::sleep(Duration::from_millis(200));
            assert!(!gc.is_finished(), "gc did not wait for the add");
            // Another add meanwhile goes ahead (with a queued writer, this
            // would block until the first add ended: here, for good).
            let (tx, rx) = std::sync::mpsc::channel();
            let store = &store;
            s.spawn(move || {
                let h = store.import_bytes(&[7u8; 50_000], "other").unwrap();
                tx.send(h).unwrap();
            });
            let h = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("an add waited behind gc");
            assert!(store.info(&h).is_some());
            drop(adding);
            let report = gc.join().unwrap().unwrap();
            assert_eq!(report.blobs, 0);
        });
    }

    fn blob(len: usize, seed: u8, target: Option<PathBuf>) -> WholeBlob {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        WholeBlob {
            hash: blake3::hash(&data),
            data: data.into(),
            target,
            pin: true,
        }
    }

    #[test]
    fn whole_blobs_are_checked_written_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let store_dir = dir.path().join("store");
        let good_file = blob(3000, 3, Some(out.join("a.txt")));
        let good_inline = blob(100, 5, None);
        let good_owned = blob(40_000, 7, None);
        let good_outboard = blob(50_000, 11, Some(out.join("b.bin")));
        let mut bad = blob(500, 13, Some(out.join("bad.txt")));
        let mut flipped = bad.data.to_vec();
        flipped[7] ^= 1;
        bad.data = flipped.into();
        let items = vec![
            good_file.clone(),
            good_inline.clone(),
            bad.clone(),
            good_owned.clone(),
            good_outboard.clone(),
        ];
        {
            let store = Store::open(&store_dir).unwrap();
            let outcomes = store.insert_whole(items.clone()).unwrap();
            use WholeOutcome::*;
            assert_eq!(outcomes, vec![Stored, Stored, Corrupt, Stored, Stored]);
            // Nothing of the corrupt one was written.
            assert!(!out.join("bad.txt").exists());
            assert!(store.info(&bad.hash).is_none());
            assert_eq!(fs::read(out.join("a.txt")).unwrap(), good_file.data);
            // The same again: present now.
            let again = store.insert_whole(vec![good_inline.clone()]).unwrap();
            assert_eq!(again, vec![Present]);
            store.flush().unwrap();
        }
        let store = Store::open(&store_dir).unwrap();
        for b in [&good_file, &good_inline, &good_owned, &good_outboard] {
            let info = store.info(&b.hash).unwrap();
            assert!(info.complete && info.pinned);
            assert_eq!(store.read_all(&b.hash).unwrap(), b.data);
            assert!(store.verify(&b.hash).unwrap());
        }
        // Served whole, checked; too large is none.
        assert_eq!(
            store
                .read_whole(&good_file.hash, 64 << 10)
                .unwrap()
                .unwrap(),
            good_file.data
        );
        assert!(store.read_whole(&good_owned.hash, 1000).unwrap().is_none());
        // A file moved by its owner is followed with relocate_many.
        let moved = dir.path().join("moved.txt");
        fs::rename(out.join("a.txt"), &moved).unwrap();
        store
            .relocate_many(Path::new(""), &[(good_file.hash, moved.clone())])
            .unwrap();
        assert_eq!(store.read_all(&good_file.hash).unwrap(), good_file.data);
        // Changed behind the store's back: never served as valid. The
        // content checked when it was served above is still served, from
        // memory; the new bytes never are.
        fs::write(&moved, b"something else").unwrap();
        assert_eq!(
            store.read_whole(&good_file.hash, 64 << 10).unwrap(),
            Some(good_file.data.clone())
        );
        store.set_served_cache(0);
        assert!(store.read_whole(&good_file.hash, 64 << 10).is_err());
    }

    /// A temporary directory with a store and an empty "out" directory.
    fn store_and_out() -> (tempfile::TempDir, PathBuf, Store) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        (dir, out, store)
    }

    /// The hashes the database holds records of.
    fn recorded(store: &Store) -> HashSet<blake3::Hash> {
        let db = store.inner.db.as_ref().unwrap();
        meta::load_all(db)
            .unwrap()
            .0
            .into_iter()
            .map(|(h, _, _)| h)
            .collect()
    }

    /// Each record in the database, with the group it is in.
    fn groups_of(store: &Store) -> HashMap<blake3::Hash, Option<u64>> {
        let db = store.inner.db.as_ref().unwrap();
        meta::load_all(db)
            .unwrap()
            .0
            .into_iter()
            .map(|(h, _, g)| (h, g))
            .collect()
    }

    /// `n` blobs of 3000 bytes bound for `out/f<i>`.
    fn many(out: &Path, n: usize) -> Vec<WholeBlob> {
        (0..n)
            .map(|i| {
                let mut b = blob(3000, 3, Some(out.join(format!("f{i}"))));
                let mut d = b.data.to_vec();
                d[..8].copy_from_slice(&(i as u64).to_le_bytes());
                b.hash = blake3::hash(&d);
                b.data = d.into();
                b
            })
            .collect()
    }

    #[test]
    fn a_batch_is_one_group_and_later_changes_override_or_leave_it() {
        let (dir, out, store) = store_and_out();
        let items = many(&out, 40);
        let hashes: Vec<blake3::Hash> = items.iter().map(|b| b.hash).collect();
        store.insert_whole(items.clone()).unwrap();
        store.flush().unwrap();
        // One entry for all 40.
        let groups = groups_of(&store);
        assert_eq!(groups.len(), 40);
        let id = groups[&hashes[0]].expect("in a group");
        assert!(hashes.iter().all(|h| groups[h] == Some(id)));
        // Two files deleted by the user: forgotten, and out of the group.
        fs::remove_file(out.join("f1")).unwrap();
        fs::remove_file(out.join("f2")).unwrap();
        assert_eq!(store.forget_vanished(&hashes).unwrap().len(), 2);
        // One moved: recorded on its own, over its record in the group.
        let moved = dir.path().join("moved");
        fs::rename(out.join("f5"), &moved).unwrap();
        store
            .relocate_many(Path::new(""), &[(hashes[5], moved.clone())])
            .unwrap();
        drop(store);
        let store = Store::open(&dir.path().join("store")).unwrap();
        assert_eq!(store.list().len(), 38);
        assert!(store.info(&hashes[1]).is_none() && store.info(&hashes[2]).is_none());
        assert_eq!(store.read_all(&hashes[5]).unwrap(), items[5].data);
        assert_eq!(store.read_all(&hashes[7]).unwrap(), items[7].data);
        let groups = groups_of(&store);
        assert_eq!(groups[&hashes[7]], Some(id));
        assert!(!groups.contains_key(&hashes[1]));
        {
            // The moved one has its own record (its entry in the group,
            // overridden, stays until it is deleted).
            let db = store.inner.db.as_ref().unwrap();
            let tx = db.begin_read().unwrap();
            let t = tx.open_table(meta::BLOBS).unwrap();
            assert!(t.get(hashes[5].as_bytes().as_slice()).unwrap().is_some());
            assert!(t.get(hashes[7].as_bytes().as_slice()).unwrap().is_none());
        }
        // The last of a group deleted: the group goes.
        drop(store);
        fs::remove_dir_all(&out).unwrap();
        fs::remove_file(&moved).unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        assert_eq!(store.forget_vanished(&hashes).unwrap().len(), 38);
        let left = groups_of(&store);
        assert!(left.is_empty(), "{left:?}");
        let db = store.inner.db.as_ref().unwrap();
        let tx = db.begin_read().unwrap();
        let t = tx.open_table(meta::GROUPS).unwrap();
        assert_eq!(redb::ReadableTableMetadata::len(&t).unwrap(), 0);
    }

    #[test]
    fn a_large_batch_is_split_into_bounded_groups() {
        let (dir, _out, store) = store_and_out();
        let n = GROUP_MAX + 10;
        let items: Vec<WholeBlob> = (0..n)
            .map(|i| {
                let d = (i as u64).to_le_bytes().to_vec();
                WholeBlob {
                    hash: blake3::hash(&d),
                    data: d.into(),
                    target: None,
                    pin: true,
                }
            })
            .collect();
        let last = items[n - 1].clone();
        store.insert_whole(items).unwrap();
        store.flush().unwrap();
        {
            let db = store.inner.db.as_ref().unwrap();
            let tx = db.begin_read().unwrap();
            let t = tx.open_table(meta::GROUPS).unwrap();
            assert_eq!(redb::ReadableTableMetadata::len(&t).unwrap(), 2);
        }
        drop(store);
        let store = Store::open(&dir.path().join("store")).unwrap();
        assert_eq!(store.list().len(), n);
        assert_eq!(store.read_all(&last.hash).unwrap(), last.data);
    }

    #[test]
    fn a_failed_commit_loses_nothing_and_changes_nothing() {
        let (dir, out, store) = store_and_out();
        let items = many(&out, 40);
        let hashes: Vec<blake3::Hash> = items.iter().map(|b| b.hash).collect();
        store.insert_whole(items).unwrap();
        store.inner.fail_commits.store(true, Ordering::SeqCst);
        // The batch's records go back to memory, no group is counted.
        assert!(store.flush().is_err());
        assert!(!lock(&store.inner.pending).is_empty());
        assert!(lock(&store.inner.grouped).is_empty());
        assert!(lock(&store.inner.committing).is_empty());
        // A deletion that fails leaves the blob where it was.
        fs::remove_file(out.join("f0")).unwrap();
        assert!(store.forget_vanished(&hashes[..1]).is_err());
        assert!(store.info(&hashes[0]).is_some());
        // The disk is back: everything is written, once.
        store.inner.fail_commits.store(false, Ordering::SeqCst);
        assert_eq!(
            store.forget_vanished(&hashes[..1]).unwrap(),
            vec![hashes[0]]
        );
        store.flush().unwrap();
        drop(store);
        let store = Store::open(&dir.path().join("store")).unwrap();
        assert_eq!(store.list().len(), 39);
        assert!(store.info(&hashes[0]).is_none());
        let groups = groups_of(&store);
        assert!(hashes[1..].iter().all(|h| groups[h].is_some()));
    }

    #[test]
    fn a_blob_deleted_before_its_group_is_written_stays_out_of_it() {
        let (dir, out, store) = store_and_out();
        let items = many(&out, 40);
        let gone = items[3].hash;
        store.insert_whole(items).unwrap();
        // Still held in memory when it is forgotten: the same commit
        // writes the group and the deletion.
        assert!(!lock(&store.inner.pending).is_empty());
        fs::remove_file(out.join("f3")).unwrap();
        assert_eq!(store.forget_vanished(&[gone]).unwrap(), vec![gone]);
        drop(store);
        let store = Store::open(&dir.path().join("store")).unwrap();
        assert_eq!(store.list().len(), 39);
        assert!(store.info(&gone).is_none());
    }

    #[test]
    fn batch_records_held_a_few_seconds_are_committed_durably() {
        let (_dir, out, store) = store_and_out();
        let first = blob(3000, 3, Some(out.join("a.txt")));
        store.insert_whole(vec![first.clone()]).unwrap();
        assert!(recorded(&store).is_empty(), "committed at once");
        // Held since long ago: the next batch commits them all, durably.
        lock(&store.inner.pending).since =
            Some(Instant::now() - PENDING_AGE_MAX - Duration::from_secs(1));
        let second = blob(2000, 7, Some(out.join("b.txt")));
        store.insert_whole(vec![second.clone()]).unwrap();
        let rec = recorded(&store);
        assert!(rec.contains(&first.hash) && rec.contains(&second.hash));
        assert!(lock(&store.inner.pending).is_empty());
        assert!(lock(&store.inner.pending).since.is_none());
        assert!(!store.inner.undurable.load(Ordering::SeqCst), "not durable");
    }

    #[test]
    fn batch_records_wait_in_memory_for_the_next_commit() {
        let (_dir, out, store) = store_and_out();
        let file = blob(3000, 3, Some(out.join("a.txt")));
        let inline = blob(100, 5, None);
        let outcomes = store
            .insert_whole(vec![file.clone(), inline.clone()])
            .unwrap();
        assert_eq!(outcomes, vec![WholeOutcome::Stored; 2]);
        // Nothing in the database yet; both readable meanwhile (the
        // inline one from memory).
        assert!(recorded(&store).is_empty());
        assert!(!lock(&store.inner.pending).is_empty());
        assert_eq!(store.read_all(&inline.hash).unwrap(), inline.data);
        assert_eq!(store.read_all(&file.hash).unwrap(), file.data);
        // Any other commit writes them first.
        let other = store.import_bytes(b"other", "other").unwrap();
        let rec = recorded(&store);
        for h in [file.hash, inline.hash, other] {
            assert!(rec.contains(&h));
        }
        assert!(lock(&store.inner.pending).is_empty());
        assert_eq!(store.read_all(&inline.hash).unwrap(), inline.data);
        // Marked as written unsynced in this boot, the inline one not.
        let db = store.inner.db.as_ref().unwrap();
        let all: HashMap<blake3::Hash, Record> = meta::load_all(db)
            .unwrap()
            .0
            .into_iter()
            .map(|(h, r, _)| (h, r))
            .collect();
        assert_eq!(
            all[&file.hash].unsynced_boot.as_deref(),
            Some(&*store.inner.boot)
        );
        assert_eq!(all[&inline.hash].unsynced_boot, None);
    }

    #[test]
    fn inline_blobs_stay_readable_while_a_commit_writes_them() {
        let (_dir, _out, store) = store_and_out();
        let inline = blob(100, 5, None);
        store.insert_whole(vec![inline.clone()]).unwrap();
        // What `Inner::apply` does before it commits: the content moves
        // from `pending` to `committing`, not yet in the database.
        {
            let mut pending = lock(&store.inner.pending);
            let p = std::mem::take(&mut *pending);
            *lock(&store.inner.committing) = p.inline.clone();
        }
        assert_eq!(store.read_all(&inline.hash).unwrap(), inline.data);
        lock(&store.inner.committing).clear();
        assert!(store.read_all(&inline.hash).is_err());
    }

    #[test]
    fn a_crash_before_any_commit_loses_only_the_records() {
        let (dir, out, store) = store_and_out();
        let file = blob(3000, 7, Some(out.join("a.txt")));
        store.insert_whole(vec![file.clone()]).unwrap();
        store.crash();
        let store = Store::open(&dir.path().join("store")).unwrap();
        assert!(store.info(&file.hash).is_none());
        // The file is the caller's: still there, fetched again if wanted.
        assert_eq!(fs::read(out.join("a.txt")).unwrap(), file.data);
    }

    #[test]
    fn closing_the_store_commits_what_is_held() {
        let (dir, out, store) = store_and_out();
        let file = blob(3000, 9, Some(out.join("a.txt")));
        store.insert_whole(vec![file.clone()]).unwrap();
        drop(store);
        let store = Store::open(&dir.path().join("store")).unwrap();
        assert!(store.info(&file.hash).unwrap().complete);
        // The same boot: nothing to check again.
        assert_eq!(store.inner.rechecks.load(Ordering::SeqCst), 0);
        store.close().unwrap();
    }

    #[test]
    fn many_inline_blobs_are_committed_before_they_fill_memory() {
        let (_dir, _out, store) = store_and_out();
        let n = PENDING_INLINE_MAX / GROUP + 1;
        let items: Vec<WholeBlob> = (0..n)
            .map(|i| {
                let mut d = vec![0u8; GROUP];
                d[..8].copy_from_slice(&(i as u64).to_le_bytes());
                WholeBlob {
                    hash: blake3::hash(&d),
                    data: d.into(),
                    target: None,
                    pin: true,
                }
            })
            .collect();
        let (first, last) = (items[0].hash, items[n - 1].hash);
        store.insert_whole(items).unwrap();
        assert!(lock(&store.inner.pending).is_empty());
        let rec = recorded(&store);
        assert_eq!(rec.len(), n);
        assert!(rec.contains(&first) && rec.contains(&last));
    }

    #[test]
    fn moved_files_are_recorded_with_the_batch_in_one_commit() {
        let (dir, out, store) = store_and_out();
        let file = blob(3000, 11, Some(out.join("a.txt")));
        store.insert_whole(vec![file.clone()]).unwrap();
        let moved = dir.path().join("final");
        fs::rename(&out, &moved).unwrap();
        store
            .relocate_many(&moved, &[(file.hash, "a.txt")])
            .unwrap();
        assert!(lock(&store.inner.pending).is_empty());
        drop(store);
        let store = Store::open(&dir.path().join("store")).unwrap();
        assert_eq!(store.read_all(&file.hash).unwrap(), file.data);
    }

    #[test]
    fn after_a_reboot_files_written_unsynced_are_checked_again() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let sdir = dir.path().join("store");
        let boot = |b: &str| Bytes::from(b.as_bytes().to_vec());
        let good = blob(3000, 3, Some(out.join("good.txt")));
        let cut = blob(3000, 5, Some(out.join("cut.txt")));
        let gone = blob(3000, 7, Some(out.join("gone.txt")));
        let owned = blob(40_000, 9, None);
        let spoiled = blob(40_000, 13, None);
        let all = [&good, &cut, &gone, &owned, &spoiled];
        {
            let store = Store::open_in_boot(&sdir, boot("a")).unwrap();
            let items = all.iter().map(|b| (*b).clone()).collect();
            store.insert_whole(items).unwrap();
            store.flush().unwrap();
        }
        // What a power loss might leave (the file in place keeps its
        // inode and time: only its content was lost).
        // Same size, time and inode: only hashing it again tells.
        let cut_path = out.join("cut.txt");
        let m = fs::metadata(&cut_path).unwrap();
        let mut f = OpenOptions::new().write(true).open(&cut_path).unwrap();
        f.write_all(&[0u8; 1000]).unwrap();
        f.set_modified(m.modified().unwrap()).unwrap();
        drop(f);
        let m2 = fs::metadata(&cut_path).unwrap();
        assert_eq!((m2.len(), m2.ino()), (m.len(), m.ino()));
        assert_eq!(m2.modified().unwrap(), m.modified().unwrap());
        fs::remove_file(out.join("gone.txt")).unwrap();
        let spoiled_path = sdir
            .join("data")
            .join(format!("{}.data", spoiled.hash.to_hex()));
        let mut d = fs::read(&spoiled_path).unwrap();
        d[20_000] ^= 1;
        fs::write(&spoiled_path, d).unwrap();
        // The same boot: trusted as they are (the page cache held them).
        {
            let store = Store::open_in_boot(&sdir, boot("a")).unwrap();
            assert_eq!(store.inner.rechecks.load(Ordering::SeqCst), 0);
            assert_eq!(store.list().len(), 5);
        }
        // Another boot: each is hashed again.
        {
            let store = Store::open_in_boot(&sdir, boot("b")).unwrap();
            assert_eq!(store.inner.rechecks.load(Ordering::SeqCst), 5);
            for b in [&good, &owned] {
                assert_eq!(store.read_all(&b.hash).unwrap(), b.data);
            }
            for b in [&cut, &gone, &spoiled] {
                assert!(store.info(&b.hash).is_none());
            }
            // The store's own file went with its record; the user's stayed.
            assert!(!spoiled_path.exists());
            assert!(cut_path.exists());
        }
        // Checked once: the next reboot finds nothing to check.
        let store = Store::open_in_boot(&sdir, boot("c")).unwrap();
        assert_eq!(store.inner.rechecks.load(Ordering::SeqCst), 0);
        assert_eq!(store.list().len(), 2);
    }

    #[test]
    fn without_a_boot_id_files_written_unsynced_are_checked_at_every_open() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let sdir = dir.path().join("store");
        let none = Bytes::new;
        let file = blob(3000, 3, Some(out.join("a.txt")));
        Store::open_in_boot(&sdir, none())
            .unwrap()
            .insert_whole(vec![file.clone()])
            .unwrap();
        for _ in 0..2 {
            let store = Store::open_in_boot(&sdir, none()).unwrap();
            assert_eq!(store.inner.rechecks.load(Ordering::SeqCst), 1);
            assert!(store.info(&file.hash).unwrap().complete);
        }
    }

    #[test]
    fn whole_blobs_are_read_from_files_in_many_directories() {
        let (_dir, out, store) = store_and_out();
        let dirs: Vec<PathBuf> = (0..3)
            .map(|i| {
                let d = out.join(format!("d{i}"));
                fs::create_dir(&d).unwrap();
                d
            })
            .collect();
        let mut blobs = many(&out, 9);
        for (i, b) in blobs.iter_mut().enumerate() {
            b.target = Some(dirs[i % 3].join(format!("f{i}")));
        }
        store.insert_whole(blobs.clone()).unwrap();
        // From the files every time, not from memory.
        store.set_served_cache(0);
        fs::remove_file(blobs[4].target.as_ref().unwrap()).unwrap();
        // Out of order, so that the directory kept open changes often.
        let order = [0, 3, 1, 4, 7, 2, 5, 8, 6, 0];
        let hashes: Vec<blake3::Hash> = order.iter().map(|&i| blobs[i].hash).collect();
        let got = store.read_whole_many(&hashes, 64 << 10);
        for (r, &i) in got.iter().zip(&order) {
            if i == 4 {
                assert!(r.is_err(), "blob {i}: its file is gone");
            } else {
                assert_eq!(
                    r.as_ref().unwrap().as_deref(),
                    Some(&blobs[i].data[..]),
                    "blob {i}"
                );
            }
        }
    }

    #[test]
    fn the_directory_opener_switches_directories_and_keeps_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        fs::write(a.join("x"), b"ax").unwrap();
        fs::write(a.join("y"), b"ay").unwrap();
        fs::write(b.join("x"), b"bx").unwrap();
        let mut dirs = DirOpener::default();
        let read = |dirs: &mut DirOpener, p: &Path| {
            let mut s = String::new();
            dirs.open(p).unwrap().read_to_string(&mut s).unwrap();
            s
        };
        assert_eq!(read(&mut dirs, &a.join("x")), "ax");
        assert_eq!(read(&mut dirs, &a.join("y")), "ay");
        assert_eq!(read(&mut dirs, &b.join("x")), "bx");
        assert_eq!(read(&mut dirs, &a.join("x")), "ax");
        // A missing file is NotFound, as `File::open` says (the store
        // tells a vanished in-place file by it).
        let e = dirs.open(&a.join("nope")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = dirs.open(&dir.path().join("gone").join("x")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        // A directory is opened, not read, as `File::open` would.
        assert!(dirs.open(&b).is_ok());
    }

    #[test]
    fn a_corrupt_small_blob_on_disk_is_not_served_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let b = blob(20_000, 17, None);
        store.insert_whole(vec![b.clone()]).unwrap();
        let path = store.inner.owned_path(&b.hash).unwrap();
        let mut d = fs::read(&path).unwrap();
        d[100] ^= 0x80;
        fs::write(&path, d).unwrap();
        assert!(matches!(
            store.read_whole(&b.hash, 64 << 10),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            store.read_whole(&b.hash, 64 << 10),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn blobs_served_lately_come_from_memory_while_the_store_holds_them() {
        let (_dir, out, store) = store_and_out();
        let blobs = many(&out, 3);
        let hashes: Vec<blake3::Hash> = blobs.iter().map(|b| b.hash).collect();
        store.insert_whole(blobs.clone()).unwrap();
        for (r, b) in store
            .read_whole_many(&hashes, 64 << 10)
            .into_iter()
            .zip(&blobs)
        {
            assert_eq!(r.unwrap().unwrap(), b.data);
        }
        assert_eq!(store.served_cache_usage().0, 3);
        assert_eq!(store.served_cache_budget(), 64 << 20);
        // The first one's file changes: the content checked before is
        // still what the hash names, and is served from memory.
        fs::write(out.join("f0"), b"changed").unwrap();
        let again = store.read_whole(&hashes[0], 64 << 10).unwrap().unwrap();
        assert_eq!(again, blobs[0].data);
        // Without the cache the change is found, and nothing is served.
        store.set_served_cache(0);
        assert_eq!(store.served_cache_usage(), (0, 0));
        assert_eq!(store.served_cache_budget(), 0);
        assert!(store.read_whole(&hashes[0], 64 << 10).is_err());
        store.set_served_cache(1 << 20);
        assert_eq!(store.served_cache_budget(), 1 << 20);
        for h in &hashes[1..] {
            assert!(store.read_whole(h, 64 << 10).unwrap().is_some());
        }
        assert_eq!(store.served_cache_usage().0, 2);
        // A blob taken out of the store is no longer served, nor kept.
        store.unpin(&hashes[1]).unwrap();
        assert_eq!(store.gc().unwrap().blobs, 1);
        assert_eq!(store.served_cache_usage().0, 1);
        assert!(store.read_whole(&hashes[1], 64 << 10).unwrap().is_none());
        // Nor is one larger than asked for.
        assert!(store.read_whole(&hashes[2], 100).unwrap().is_none());
        assert_eq!(
            store.read_whole(&hashes[2], 64 << 10).unwrap().unwrap(),
            blobs[2].data
        );
    }
}
