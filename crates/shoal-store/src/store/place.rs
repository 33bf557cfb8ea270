//! Moving a complete blob's data between the store and a file of the
//! user's, without copying when both are on one filesystem.
//!
//! A download of a bare hash has to guess whether it is a file or a
//! directory before the content is there (providers say, and may lie): a
//! file is written straight to the output path, a collection's manifest
//! into the store. Once the verified content shows the guess was wrong, the
//! data is moved to where it belongs instead of being fetched or copied
//! again.

use super::*;

impl Store {
    /// Rename the directory `from`, which holds files downloaded into it
    /// (a collection's tree, finished), to `to`, never over anything
    /// there ([`StoreError::Exists`]), and record the new paths of the
    /// `members` (blob, path in the tree) that were referenced in the tree
    /// in place. A kill between the rename and the records is mended at
    /// the next open: the move is noted durably first (with the tree's
    /// identity), and an open that finds the note with that same tree at
    /// `to` records the new paths then (without, the records named paths
    /// that were gone, and the node stopped serving the tree).
    pub fn move_tree<P: AsRef<Path>>(
        &self,
        from: &Path,
        to: &Path,
        members: &[(blake3::Hash, P)],
    ) -> Result<(), StoreError> {
        let tree = fs::metadata(from).map_err(io_err("reading", from))?;
        // Files are recorded at real paths (downloads) or at absolute ones
        // (the batch path): both are looked for, and noted.
        let mut froms = vec![fs::canonicalize(from).map_err(io_err("reading", from))?];
        if let Ok(a) = std::path::absolute(from)
            && a != froms[0]
        {
            froms.push(a);
        }
        let to_abs = real_parent(to).map_err(io_err("reading", to))?;
        let db = self.inner.db.as_ref();
        if let Some(db) = db {
            let note = meta::encode_move(meta::tree_id(&tree), to_abs.as_os_str().as_bytes());
            meta::write(db, true, |tx| {
                froms
                    .iter()
                    .try_for_each(|f| tx.put_move(f.as_os_str().as_bytes(), &note))
            })?;
        }
        let unnote = |durable: bool| {
            if let Some(db) = db {
                let res = meta::write(db, durable, |tx| {
                    froms
                        .iter()
                        .try_for_each(|f| tx.remove_move(f.as_os_str().as_bytes()))
                });
                if let Err(e) = res {
                    tracing::warn!("cannot drop the note of a move of {}: {e}", from.display());
                }
            }
        };
        if let Err(e) = rename_no_replace(from, to) {
            // Durably: the tree stays at `from`, and the note must not
            // outlive it there.
            unnote(true);
            return Err(if e.kind() == io::ErrorKind::AlreadyExists {
                StoreError::Exists(to.to_path_buf())
            } else {
                StoreError::io("renaming into", to, e)
            });
        }
        // The rename on disk before the records that follow it.
        for d in [from, to].iter().filter_map(|p| p.parent()) {
            let d = if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            };
            if let Err(e) = File::open(d).and_then(|f| f.sync_all()) {
                tracing::warn!("syncing {}: {e}", d.display());
            }
        }
        // Members recorded in the tree move; so do those recorded under
        // another spelling of it (a fetch begun from a symlinked directory)
        // and found at their new path as the same file (size, time, inode).
        // Members that were in the store before live elsewhere, and stay.
        let found: Vec<(blake3::Hash, &Path, bool, Stamp)> = {
            let st = lock(&self.inner.state);
            members
                .iter()
                .filter_map(|(h, rel)| match &st.get(h)?.data {
                    DataRef::File {
                        path,
                        stamp: Some(stamp),
                    } => Some((
                        *h,
                        rel.as_ref(),
                        froms.iter().any(|f| path.starts_with(f)),
                        *stamp,
                    )),
                    _ => None,
                })
                .collect()
        };
        let moves: Vec<(blake3::Hash, &Path)> = found
            .into_iter()
            .filter(|(_, rel, inside, stamp)| {
                *inside || fs::metadata(to_abs.join(rel)).is_ok_and(|m| Stamp::of(&m) == *stamp)
            })
            .map(|(h, rel, _, _)| (h, rel))
            .collect();
        self.relocate_many(&to_abs, &moves)?;
        unnote(false);
        Ok(())
    }

    /// Move the data of the complete blob `hash`: with `to`, out to the new
    /// file `to`, which the store then references in place; without, into
    /// the store's own storage. A rename when source and destination share
    /// a filesystem, a copy (then removal of the source) otherwise. Data
    /// already where it is asked to be, or not in a file (small blobs in
    /// the database, an in-memory store), is left in place and, with `to`,
    /// written out.
    pub fn move_data(&self, hash: &blake3::Hash, to: Option<&Path>) -> Result<(), StoreError> {
        let data = {
            let st = lock(&self.inner.state);
            let b = st.get(hash).ok_or(StoreError::NotFound(*hash))?;
            if b.partial.is_some() {
                return Err(StoreError::Incomplete(*hash));
            }
            b.data.clone()
        };
        if let Some(to) = to
            && fs::symlink_metadata(to).is_ok()
        {
            let here = match &data {
                DataRef::File { path, .. } => fs::canonicalize(to).is_ok_and(|t| t == *path),
                _ => false,
            };
            if here {
                return Ok(());
            }
            return Err(StoreError::io(
                "writing",
                to,
                io::Error::from(io::ErrorKind::AlreadyExists),
            ));
        }
        let owned = self.inner.owned_path(hash);
        let new = match (&data, to, &owned) {
            // In place at a user's path -> into the store.
            (
                DataRef::File {
                    path,
                    stamp: Some(_),
                },
                None,
                Some(dest),
            ) => {
                move_file(path, dest)?;
                DataRef::File {
                    path: dest.clone(),
                    stamp: None,
                }
            }
            // Owned by the store -> out to the user's path.
            (DataRef::File { path, stamp: None }, Some(to), _) => {
                move_file(path, to)?;
                let m = fs::metadata(to).map_err(io_err("reading", to))?;
                DataRef::File {
                    path: fs::canonicalize(to).unwrap_or_else(|_| to.to_path_buf()),
                    stamp: Some(Stamp::of(&m)),
                }
            }
            (_, Some(to), _) => {
                // Not a file of its own: write a copy (checked on the way).
                let tmp = beside(to, ".", ".shoal-tmp");
                let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
                let res = self
                    .export_blob(hash, &mut f)
                    .and_then(|_| f.sync_all().map_err(io_err("writing", &tmp)))
                    .and_then(|()| fs::rename(&tmp, to).map_err(io_err("renaming into", to)));
                if res.is_err() {
                    let _ = fs::remove_file(&tmp);
                }
                return res;
            }
            _ => return Ok(()),
        };
        self.inner.update(hash, |b| b.data = new)
    }
}

/// Rename `from` to `to`, or copy and remove when they are on different
/// filesystems. The copy is synced before the source goes.
fn move_file(from: &Path, to: &Path) -> Result<(), StoreError> {
    match fs::rename(from, to) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
        Err(e) => return Err(StoreError::io("moving", from, e)),
    }
    let res = (|| {
        let mut src = open_read(from).map_err(io_err("reading", from))?;
        let mut dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(to)
            .map_err(io_err("creating", to))?;
        io::copy(&mut src, &mut dst).map_err(io_err("copying to", to))?;
        dst.sync_all().map_err(io_err("writing", to))
    })();
    if res.is_err() {
        let _ = fs::remove_file(to);
        return res;
    }
    fs::remove_file(from).map_err(io_err("removing", from))
}

/// `path` with its parent directory's real path (`path` itself need not
/// exist).
fn real_parent(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok(fs::canonicalize(parent)?.join(name))
}

/// Finish at open the moves of trees noted and not finished
/// ([`Store::move_tree`] killed between its rename and its records):
/// where the tree is at its new path and gone from its old one, the
/// `records` of files under the old path are given the new one; every
/// note is then dropped (a tree still at its old path was never renamed,
/// and its records are right). The changed records and the dropped notes
/// are committed together; if that fails, the records are right in memory
/// and the notes are found again at the next open.
pub(super) fn finish_moves(db: &redb::Database, records: &mut [meta::Loaded]) {
    let moves = match meta::load_moves(db) {
        Ok(m) if m.is_empty() => return,
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("cannot read the notes of moved directories: {e}");
            return;
        }
    };
    let mut changed: Vec<(blake3::Hash, Record)> = Vec::new();
    for (from, note) in &moves {
        let Some((id, to)) = meta::decode_move(note) else {
            continue;
        };
        let (from_p, to_p) = (
            Path::new(OsStr::from_bytes(from)),
            Path::new(OsStr::from_bytes(to)),
        );
        // Renamed: gone from `from`, and the same tree at `to` (not one
        // the user made there, nor the tree deleted and another made).
        let same = fs::metadata(to_p).is_ok_and(|m| meta::tree_id(&m) == id);
        if fs::symlink_metadata(from_p).is_ok() || !same {
            continue;
        }
        let mut n = 0usize;
        for (h, r, _) in records.iter_mut() {
            // As `move_tree`: complete files referenced in place.
            if !(r.complete && r.location == loc::EXTERNAL) {
                continue;
            }
            let Some(rest) = r
                .path
                .strip_prefix(from.as_slice())
                .filter(|rest| rest.first() == Some(&b'/'))
            else {
                continue;
            };
            let mut p = to.to_vec();
            p.extend_from_slice(rest);
            r.path = p;
            changed.push((*h, r.clone()));
            n += 1;
        }
        tracing::info!(
            "{} was renamed to {} and not recorded (a kill?): {n} files recorded there now",
            from_p.display(),
            to_p.display()
        );
    }
    let res = meta::write(db, true, |t| {
        for (h, r) in &changed {
            t.put(h, r)?;
        }
        for (from, _) in &moves {
            t.remove_move(from)?;
        }
        Ok(())
    });
    if let Err(e) = res {
        tracing::warn!(
            "cannot record the files of moved directories (done again at the next open): {e}"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn data_moves_out_of_the_store_and_back_without_changing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let hash = store.import_bytes(&data, "x").unwrap();
        let out = dir.path().join("out.bin");
        store.move_data(&hash, Some(&out)).unwrap();
        assert_eq!(fs::read(&out).unwrap(), data);
        assert!(!store.inner.owned_path(&hash).unwrap().exists());
        assert_eq!(store.read_all(&hash).unwrap(), data);
        // Already there: nothing to do. Another existing file: refused.
        store.move_data(&hash, Some(&out)).unwrap();
        let other = dir.path().join("other");
        fs::write(&other, b"mine").unwrap();
        assert!(store.move_data(&hash, Some(&other)).is_err());
        assert_eq!(fs::read(&other).unwrap(), b"mine");
        store.move_data(&hash, None).unwrap();
        assert!(!out.exists());
        assert!(store.verify(&hash).unwrap());
        assert_eq!(store.read_all(&hash).unwrap(), data);
        // Survives reopening.
        drop(store);
        let store = Store::open(&dir.path().join("store")).unwrap();
        assert_eq!(store.read_all(&hash).unwrap(), data);
        // A small blob (in the database) is written out as a copy.
        let small = store.import_bytes(b"tiny", "t").unwrap();
        let t = dir.path().join("t.txt");
        store.move_data(&small, Some(&t)).unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"tiny");
        assert_eq!(store.read_all(&small).unwrap(), b"tiny");
    }

    /// Files under `tree` (made, and added in place): hash, content, path
    /// in the tree. Their content is the tree name's (each tree's blobs
    /// its own).
    fn tree_in_place(store: &Store, tree: &Path) -> Vec<(blake3::Hash, Vec<u8>, String)> {
        let seed = tree.file_name().unwrap().as_bytes().to_vec();
        ["a.bin", "sub/b.bin", "sub/deeper/c.bin"]
            .iter()
            .enumerate()
            .map(|(i, rel)| {
                let mut data: Vec<u8> = (0..40_000u32)
                    .map(|k| (k as usize * (i + 3) % 251) as u8)
                    .collect();
                data[..seed.len()].copy_from_slice(&seed);
                let p = tree.join(rel);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(&p, &data).unwrap();
                let h = store.import_file(&p, ImportMode::InPlace).unwrap();
                (h, data, rel.to_string())
            })
            .collect()
    }

    fn members(files: &[(blake3::Hash, Vec<u8>, String)]) -> Vec<(blake3::Hash, String)> {
        files.iter().map(|(h, _, r)| (*h, r.clone())).collect()
    }

    fn readable(store: &Store, files: &[(blake3::Hash, Vec<u8>, String)]) -> bool {
        files
            .iter()
            .all(|(h, d, _)| store.read_all(h).ok().as_ref() == Some(d))
    }

    #[test]
    fn a_tree_moved_keeps_its_files_recorded_and_never_replaces_a_target() {
        let dir = tempfile::tempdir().unwrap();
        let sdir = dir.path().join("store");
        let store = Store::open(&sdir).unwrap();
        let tmp = dir.path().join(".out.tmp");
        let files = tree_in_place(&store, &tmp);
        // A member added elsewhere before, copied into the tree: stays.
        let before = dir.path().join("before.bin");
        fs::write(&before, b"before, elsewhere").unwrap();
        let kept = store.import_file(&before, ImportMode::InPlace).unwrap();
        fs::write(tmp.join("copy.bin"), b"before, elsewhere").unwrap();
        let mut all = members(&files);
        all.push((kept, "copy.bin".into()));
        let out = dir.path().join("out");
        store.move_tree(&tmp, &out, &all).unwrap();
        assert!(!tmp.exists());
        assert!(readable(&store, &files));
        fs::remove_file(out.join("copy.bin")).unwrap();
        assert_eq!(store.read_all(&kept).unwrap(), b"before, elsewhere");
        // Something at the target: refused, nothing moved, no note left.
        let tmp2 = dir.path().join(".taken.tmp");
        let more = tree_in_place(&store, &tmp2);
        let taken = dir.path().join("taken");
        fs::create_dir(&taken).unwrap();
        assert!(matches!(
            store.move_tree(&tmp2, &taken, &members(&more)),
            Err(StoreError::Exists(_))
        ));
        assert!(tmp2.join("a.bin").exists() && readable(&store, &more));
        assert!(
            meta::load_moves(store.inner.db.as_ref().unwrap())
                .unwrap()
                .is_empty()
        );
        drop(store);
        let store = Store::open(&sdir).unwrap();
        assert!(readable(&store, &files) && readable(&store, &more));
    }

    #[test]
    fn a_tree_recorded_under_another_spelling_of_its_path_moves_too() {
        // A fetch begun through a symlinked directory, resumed from the
        // real one: its first files are recorded under the link.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let real = dir.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let files = tree_in_place(&store, &link.join(".out.tmp"));
        // The store recorded the real path of a file added in place; make
        // it the link's, as the batch path records (absolute, not real).
        for (h, _, rel) in &files {
            let mut st = lock(&store.inner.state);
            if let DataRef::File { path, .. } = &mut st.get_mut(h).unwrap().data {
                *path = link.join(".out.tmp").join(rel);
            }
        }
        store
            .move_tree(&real.join(".out.tmp"), &real.join("out"), &members(&files))
            .unwrap();
        assert!(readable(&store, &files));
    }

    #[test]
    fn a_kill_between_a_trees_rename_and_its_records_is_mended_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let sdir = dir.path().join("store");
        let store = Store::open(&sdir).unwrap();
        let db = store.inner.db.as_ref().unwrap();
        let bytes = |p: &Path| fs::canonicalize(p).unwrap().as_os_str().as_bytes().to_vec();
        let base = bytes(dir.path());
        // What move_tree leaves when killed right after its rename: the
        // note, the tree at its new path, the records at the old one.
        let note = |t: &Path, name: &str| {
            let id = meta::tree_id(&fs::metadata(t).unwrap());
            let to = [base.clone(), b"/".to_vec(), name.as_bytes().to_vec()].concat();
            (bytes(t), meta::encode_move(id, &to))
        };
        let tmp = dir.path().join(".out.tmp");
        let files = tree_in_place(&store, &tmp);
        let moved = note(&tmp, "out");
        // A tree noted and never renamed (killed before the rename).
        let kept = dir.path().join(".kept.tmp");
        let unmoved = tree_in_place(&store, &kept);
        let never = note(&kept, "kept");
        // A tree noted, then deleted, and another directory made at its
        // destination (the user's): nothing is recorded there.
        let gone = dir.path().join(".gone.tmp");
        let lost = tree_in_place(&store, &gone);
        let replaced = note(&gone, "gone");
        meta::write(db, true, |t| {
            for (f, n) in [&moved, &never, &replaced] {
                t.put_move(f, n)?;
            }
            Ok(())
        })
        .unwrap();
        fs::rename(&tmp, dir.path().join("out")).unwrap();
        fs::remove_dir_all(&gone).unwrap();
        // (Made at once, it may get the deleted tree's inode back; its
        // time is its own.)
        tree_in_place(&Store::in_memory(), &dir.path().join("gone"));
        let made = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        File::open(dir.path().join("gone"))
            .unwrap()
            .set_modified(made)
            .unwrap();
        assert!(!readable(&store, &files));
        store.crash();
        let store = Store::open(&sdir).unwrap();
        assert!(
            readable(&store, &files),
            "the files are recorded at the tree's new path"
        );
        assert!(readable(&store, &unmoved));
        // (Read through the records: the files there are not the ones
        // recorded, and would be refused anyway.)
        for (h, _, rel) in &lost {
            let st = lock(&store.inner.state);
            let DataRef::File { path, .. } = &st.get(h).unwrap().data else {
                panic!("not a file in place");
            };
            assert!(
                path.ends_with(Path::new(".gone.tmp").join(rel)),
                "{}",
                path.display()
            );
        }
        assert!(store.verify(&files[2].0).unwrap());
        let db = store.inner.db.as_ref().unwrap();
        assert!(
            meta::load_moves(db).unwrap().is_empty(),
            "the notes are dropped"
        );
        // And recorded, not only mended in memory.
        drop(store);
        let store = Store::open(&sdir).unwrap();
        assert!(readable(&store, &files) && readable(&store, &unmoved));
    }
}
