//! Many small blobs at once: received whole from a peer (a collection of
//! many small files), checked against their hashes, written and recorded
//! with one metadata transaction per batch and no fsync per file.
//!
//! The per-blob download path (`begin_download`, `receive_ranges`,
//! completion) makes every blob durable on its own: about five fsyncs and
//! three database commits per blob, which is the whole cost of a small
//! file. Here a batch is written to the page cache and recorded with a
//! non-durable commit; [`Store::sync_whole`] later makes everything written
//! so far durable at once (`syncfs`, then one durable commit). A crash
//! before that loses only records of blobs, never their correctness:
//! records not made durable are rolled back on open, and the files they
//! described are simply fetched again. Any other durable commit in the
//! meantime would make those records durable too, so it syncs their
//! filesystems first (`Inner::apply`): a record never survives a power
//! loss that its file did not.

use super::*;

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
}

/// What [`Store::insert_whole`] did with one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WholeOutcome {
    /// Checked, written and recorded complete (and pinned).
    Stored,
    /// The content does not hash to the blob's hash: nothing was written.
    Corrupt,
    /// The store already has an entry for the hash (complete, or a partial
    /// download): nothing was written.
    Present,
}

impl Store {
    /// Check each blob of `items` against its hash (all of it, before any
    /// byte is written), write the good ones and record them complete and
    /// pinned, with one metadata transaction for the whole batch. Durable
    /// only after [`Store::sync_whole`]. One outcome per item, in order; an
    /// error is local (disk full, permissions) and leaves the store
    /// consistent: nothing of the batch is recorded.
    pub fn insert_whole(&self, items: Vec<WholeBlob>) -> Result<Vec<WholeOutcome>, StoreError> {
        let hashed: Vec<(blake3::Hash, tree::Outboard)> = items
            .par_iter()
            .map(|it| tree::hash_tree(&it.data))
            .collect();
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
        // The directories the files go to are noted before they are
        // written: a directory opened later would not see an error in
        // writing back what was written before it was opened.
        let dirs: HashSet<PathBuf> = items
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| **o == WholeOutcome::Stored)
            .filter_map(|(it, _)| it.target.as_deref().map(parent_dir))
            .chain(self.inner.data_dir())
            .collect();
        self.inner.note_unsynced(dirs, true)?;
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
        // The directories were noted before the commit: a durable commit
        // of another thread that follows this one finds them to sync.
        if let Err(e) = match &self.inner.db {
            Some(db) => meta::apply(db, &ops, false),
            None => Ok(()),
        } {
            drop(st);
            for f in files {
                let _ = fs::remove_file(f);
            }
            return Err(e);
        }
        let hashes: Vec<blake3::Hash> = new.iter().map(|(h, _)| *h).collect();
        st.extend(new);
        drop(st);
        self.inner.start_writeback();
        for hash in hashes {
            let _ = self.inner.events.send(StoreEvent::Complete { hash });
        }
        Ok(outcomes)
    }

    /// Make everything [`Store::insert_whole`] wrote durable: flush the
    /// filesystems of `dirs` and of the files it wrote (`syncfs`, one call
    /// each), then commit the metadata durably.
    pub fn sync_whole(&self, dirs: &[&Path]) -> Result<(), StoreError> {
        self.inner
            .note_unsynced(dirs.iter().map(|d| d.to_path_buf()), false)?;
        match &self.inner.db {
            Some(db) => self.inner.apply(db, &[], true),
            None => self.inner.sync_unsynced(),
        }
    }

    /// [`Store::relocate`] for many blobs in one transaction, for files the
    /// caller moved itself (a directory renamed into place). The recorded
    /// identity (inode, modification time) is kept, not re-read: a file
    /// that is not the one recorded is refused when it is next opened.
    /// Blobs that are not complete files referenced in place are skipped.
    pub fn relocate_many(&self, moves: &[(blake3::Hash, PathBuf)]) -> Result<(), StoreError> {
        let mut ops = Vec::with_capacity(moves.len());
        {
            let mut st = lock(&self.inner.state);
            for (hash, new_path) in moves {
                let Some(b) = st.get_mut(hash) else { continue };
                if let DataRef::File {
                    path,
                    stamp: Some(_),
                } = &mut b.data
                {
                    *path = std::path::absolute(new_path).unwrap_or_else(|_| new_path.clone());
                    ops.push(Op::Put(*hash, record_of(b)));
                }
            }
        }
        match &self.inner.db {
            Some(db) if !ops.is_empty() => self.inner.apply(db, &ops, true),
            _ => Ok(()),
        }
    }
}

/// Filesystems to sync before the next durable commit (see
/// `Inner::unsynced`).
#[derive(Default)]
pub(super) struct Unsynced {
    /// By device: a directory on it, held open, and its path.
    by_dev: HashMap<u64, (PathBuf, File)>,
    /// Every directory noted since the last sync (each is opened once).
    noted: HashSet<PathBuf>,
    /// Noted by `insert_whole`: records committed non-durably may depend
    /// on these filesystems (else, only a caller's `sync_whole` asked).
    batches: bool,
    /// A sync that failed while records depended on it: their files may
    /// be lost, so no durable commit may follow (it would make those
    /// records durable), and the database is not closed cleanly. Sticky:
    /// a second `syncfs` on the same open file would not report the error
    /// again.
    failed: Option<(PathBuf, io::ErrorKind, String)>,
}

impl Unsynced {
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.by_dev.is_empty()
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
    /// Apply `ops` to `db` in one transaction. A durable commit also makes
    /// durable the records of earlier non-durable ones, so it first syncs
    /// the filesystems that hold their files ([`Inner::unsynced`]): before
    /// the transaction, and inside it again for any batch recorded in
    /// between (usually none), so that redb's write lock is not held for
    /// the long sync. Callers that hold the state lock still hold it
    /// through the sync, which only happens while a batch is unsynced.
    pub(super) fn apply(
        &self,
        db: &redb::Database,
        ops: &[Op],
        durable: bool,
    ) -> Result<(), StoreError> {
        if durable {
            self.sync_unsynced()?;
            meta::apply_after(db, ops, true, || self.sync_unsynced())
        } else {
            meta::apply(db, ops, false)
        }
    }

    /// Add the filesystems of `dirs` to [`Inner::unsynced`], opening one
    /// directory on each that is not there yet; `batch`: for the files of
    /// an `insert_whole` batch.
    pub(super) fn note_unsynced(
        &self,
        dirs: impl IntoIterator<Item = PathBuf>,
        batch: bool,
    ) -> Result<(), StoreError> {
        if batch {
            lock(&self.unsynced).batches = true;
        }
        for d in dirs {
            if lock(&self.unsynced).noted.contains(&d) {
                continue;
            }
            let f = File::open(&d).map_err(io_err("opening", &d))?;
            let dev = f.metadata().map_err(io_err("reading", &d))?.dev();
            let mut u = lock(&self.unsynced);
            u.noted.insert(d.clone());
            u.by_dev.entry(dev).or_insert((d, f));
        }
        Ok(())
    }

    /// Start writing back, on a thread of its own, the filesystems of
    /// [`Inner::unsynced`] (one such thread at a time per store), so
    /// that the sync that makes a batch durable finds little left to write.
    /// A hint only: errors are left to that sync. A 10,000-file get, 6
    /// rounds: 479 -> 435 ms; writing back each file as it was written
    /// (`sync_file_range`) had made it slower (544 -> 591 ms): the writer
    /// waited for each submission.
    ///
    /// The thread opens each directory afresh. Linux reports a writeback
    /// error once to each open file that existed when it happened; a
    /// `dup` of the descriptor held in [`Inner::unsynced`] would share
    /// its open file and use up the error that the sync guarding the
    /// commit must see.
    pub(super) fn start_writeback(&self) {
        let busy = Arc::clone(&self.writeback_busy);
        if busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let dirs: Vec<PathBuf> = lock(&self.unsynced)
            .by_dev
            .values()
            .map(|(p, _)| p.clone())
            .collect();
        if dirs.is_empty() {
            busy.store(false, Ordering::Release);
            return;
        }
        let flag = Arc::clone(&busy);
        let spawned = std::thread::Builder::new()
            .name("shoal-writeback".into())
            .spawn(move || {
                for d in dirs {
                    if let Ok(f) = File::open(&d) {
                        let _ = syncfs(&f);
                    }
                }
                flag.store(false, Ordering::Release);
            });
        match spawned {
            Ok(_) => {
                #[cfg(test)]
                self.writebacks.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => busy.store(false, Ordering::Release),
        }
    }

    /// Sync (`syncfs`) every filesystem of [`Inner::unsynced`]. A failure
    /// that records depended on is returned by this call and by every
    /// later one (see `Unsynced::failed`). One sync at a time: a durable
    /// commit must not find the set empty while another thread is still
    /// syncing what it took.
    pub(super) fn sync_unsynced(&self) -> Result<(), StoreError> {
        let _one = lock(&self.sync_one);
        let (pending, batches) = {
            let mut u = lock(&self.unsynced);
            if let Some((path, kind, msg)) = &u.failed {
                return Err(StoreError::io(
                    "syncing",
                    path,
                    io::Error::new(
                        *kind,
                        format!(
                            "an earlier sync failed ({msg}); files fetched before it may be \
                             lost, so nothing more is recorded durably until the store is reopened"
                        ),
                    ),
                ));
            }
            u.noted.clear();
            let batches = std::mem::take(&mut u.batches);
            (std::mem::take(&mut u.by_dev), batches)
        };
        if pending.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        self.fs_syncs.fetch_add(1, Ordering::SeqCst);
        for (path, f) in pending.into_values() {
            #[cfg(test)]
            let res = if self.fail_syncs.load(Ordering::SeqCst) {
                Err(io::Error::other("injected"))
            } else {
                syncfs(&f)
            };
            #[cfg(not(test))]
            let res = syncfs(&f);
            if let Err(e) = res {
                if batches {
                    lock(&self.unsynced).failed = Some((path.clone(), e.kind(), e.to_string()));
                }
                return Err(StoreError::io("syncing", &path, e));
            }
        }
        Ok(())
    }

    /// Before the database closes, which commits durably: sync what is
    /// unsynced, or, if that fails (now or before), leave the database
    /// unclosed, so that its next open rolls back to the last durable
    /// commit (dropping the records whose files were not synced; they are
    /// fetched again).
    pub(super) fn sync_before_close(&mut self) {
        if let Err(e) = self.sync_unsynced() {
            tracing::warn!("{e}; closing the database without its final commit");
            if let Some(db) = self.db.take() {
                std::mem::forget(db);
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
        let src = match self.inner.source(hash) {
            Ok(s) => s,
            Err(StoreError::NotFound(_) | StoreError::Incomplete(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        if src.verified.is_some() || src.size > max {
            return Ok(None);
        }
        let n = usize::try_from(src.size).map_err(|_| StoreError::Incomplete(*hash))?;
        let mut buf = vec![0u8; n];
        src.data
            .read_exact_at(0, &mut buf)
            .map_err(|e| StoreError::io("reading", Path::new(&src.name), e))?;
        if blake3::hash(&buf) != *hash {
            return Err(self.inner.refuse_corrupt(hash, src.name, "serving"));
        }
        Ok(Some(buf.into()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn blob(len: usize, seed: u8, target: Option<PathBuf>) -> WholeBlob {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        WholeBlob {
            hash: blake3::hash(&data),
            data: data.into(),
            target,
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
            store.sync_whole(&[&out]).unwrap();
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
            .relocate_many(&[(good_file.hash, moved.clone())])
            .unwrap();
        assert_eq!(store.read_all(&good_file.hash).unwrap(), good_file.data);
        // Changed behind the store's back: never served as valid.
        fs::write(&moved, b"something else").unwrap();
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

    #[test]
    fn a_durable_commit_first_syncs_the_files_of_unsynced_whole_blobs() {
        let (_dir, out, store) = store_and_out();
        let syncs = || store.inner.fs_syncs.load(Ordering::SeqCst);
        // Nothing unsynced: a durable commit syncs no filesystem.
        store.import_bytes(b"first", "first").unwrap();
        assert_eq!(syncs(), 0);
        // A batch is recorded without a sync...
        let b = blob(50_000, 3, Some(out.join("b.bin")));
        let outcomes = store.insert_whole(vec![b.clone()]).unwrap();
        assert_eq!(outcomes, vec![WholeOutcome::Stored]);
        assert_eq!(syncs(), 0);
        {
            let u = lock(&store.inner.unsynced);
            assert!(u.noted.contains(&out));
            let dev = fs::metadata(&out).unwrap().dev();
            assert!(u.by_dev.contains_key(&dev));
        }
        // Its writeback was started at once, in the background.
        assert_eq!(store.inner.writebacks.load(Ordering::SeqCst), 1);
        // ...and the next durable commit, which makes its record durable
        // too, syncs its file's filesystem first, once.
        store.import_bytes(b"second", "second").unwrap();
        assert_eq!(syncs(), 1);
        assert!(lock(&store.inner.unsynced).is_empty());
        store.unpin(&b.hash).unwrap();
        assert_eq!(syncs(), 1);
        // sync_whole syncs what it is asked to.
        store.sync_whole(&[&out]).unwrap();
        assert_eq!(syncs(), 2);
    }

    #[test]
    fn a_failed_sync_fails_every_later_durable_commit() {
        let (_dir, out, store) = store_and_out();
        let b = blob(3000, 9, Some(out.join("a.txt")));
        store.insert_whole(vec![b]).unwrap();
        store.inner.fail_syncs.store(true, Ordering::SeqCst);
        let err = store.import_bytes(b"one", "one").unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        // The disk may be fine again: the batch's files may not be, and
        // its records must not become durable.
        store.inner.fail_syncs.store(false, Ordering::SeqCst);
        let err = store.import_bytes(b"two", "two").unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        assert!(store.sync_whole(&[&out]).is_err());
        assert!(store.info(&blake3::hash(b"two")).is_none());
    }

    #[test]
    fn a_failed_sync_that_no_batch_depended_on_blocks_nothing() {
        let (_dir, out, store) = store_and_out();
        store.inner.fail_syncs.store(true, Ordering::SeqCst);
        assert!(store.sync_whole(&[&out]).is_err());
        store.inner.fail_syncs.store(false, Ordering::SeqCst);
        store.import_bytes(b"one", "one").unwrap();
        store.sync_whole(&[&out]).unwrap();
    }

    #[test]
    fn a_directory_removed_after_its_batch_does_not_block_later_commits() {
        let (_dir, out, store) = store_and_out();
        let b = blob(3000, 5, Some(out.join("a.txt")));
        store.insert_whole(vec![b]).unwrap();
        // The fetch gave up and its temporary directory went away.
        fs::remove_dir_all(&out).unwrap();
        store.import_bytes(b"data", "data").unwrap();
        assert_eq!(store.inner.fs_syncs.load(Ordering::SeqCst), 1);
        assert!(lock(&store.inner.unsynced).is_empty());
    }

    #[test]
    fn closing_the_store_syncs_what_is_unsynced() {
        let (_dir, out, store) = store_and_out();
        let other = store.clone();
        let b = blob(3000, 7, Some(out.join("a.txt")));
        store.insert_whole(vec![b]).unwrap();
        assert_eq!(other.inner.fs_syncs.load(Ordering::SeqCst), 0);
        store.close().unwrap();
        assert_eq!(other.inner.fs_syncs.load(Ordering::SeqCst), 1);
        assert!(lock(&other.inner.unsynced).is_empty());
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
}
