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
    /// Move the data of the complete blob `hash`: with `to`, out to the new
    /// file `to`, which the store then references in place; without, into
    /// the store's own storage. A rename when source and destination share
    /// a filesystem, a copy (then removal of the source) otherwise. Data
    /// already where it is asked to be, or not in a file (small blobs in
    /// the database, an in-memory store), is left in place and, with `to`,
    /// written out.
    pub fn move_data(&self, hash: &blake3::Hash, to: Option<&Path>) -> Result<(), StoreError> {
        let (data, name) = {
            let st = lock(&self.inner.state);
            let b = st.get(hash).ok_or(StoreError::NotFound(*hash))?;
            if b.partial.is_some() {
                return Err(StoreError::Incomplete(*hash));
            }
            (b.data.clone(), b.name.clone())
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
                let tmp = to.with_file_name(format!(
                    ".{}.shoal-tmp",
                    to.file_name()
                        .map_or_else(|| name.clone(), |n| n.to_string_lossy().into_owned())
                ));
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
        let mut src = File::open(from).map_err(io_err("reading", from))?;
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
}
