//! The metadata database (redb): one record per blob, small blobs inline.
//!
//! Records are protobuf (`prost`) messages so fields can be added later.

use std::collections::{HashMap, HashSet};

use redb::{Database, Durability, ReadableTable, TableDefinition, TableHandle};

use crate::StoreError;

/// hash (32 bytes) -> encoded [`Record`].
pub(crate) const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs-v1");
/// hash (32 bytes) -> content of a small complete blob.
pub(crate) const INLINE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("inline-v1");
/// group id -> encoded [`RecordGroup`]: the records of many blobs new to
/// the store, written as one entry (redb costs ~1.4 us per entry: 10,000
/// records one by one took 14 ms to insert, as one entry 1.4 ms). A
/// record in `BLOBS` overrides one in a group.
pub(crate) const GROUPS: TableDefinition<u64, &[u8]> = TableDefinition::new("groups-v1");

/// Directory trees being renamed (`Store::move_tree`): the tree's absolute
/// path before -> its identity and its path after ([`encode_move`]).
/// Written durably before the rename, removed once the records of the
/// files in the tree name their new paths; one found at open (a kill
/// between the two) is finished there.
pub(crate) const MOVES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("moves-v1");

/// The records of a group.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RecordGroup {
    /// The blobs' hashes, 32 bytes each, in the order of `records`.
    #[prost(bytes = "vec", tag = "1")]
    pub(crate) hashes: Vec<u8>,
    #[prost(message, repeated, tag = "2")]
    pub(crate) records: Vec<Record>,
}

impl RecordGroup {
    /// Its entries; none if the hashes and records do not pair up.
    fn entries(self) -> Vec<(blake3::Hash, Record)> {
        if self.hashes.len() != 32 * self.records.len() {
            tracing::warn!("skipping a malformed group of metadata records");
            return Vec::new();
        }
        self.hashes
            .as_chunks::<32>()
            .0
            .iter()
            .map(|h| blake3::Hash::from_bytes(*h))
            .zip(self.records)
            .collect()
    }
}

/// The encoded [`RecordGroup`] of `entries` (without copying the records).
pub(crate) fn encode_group(entries: &[(&blake3::Hash, &Record)]) -> Vec<u8> {
    let hashes: Vec<u8> = entries.iter().flat_map(|(h, _)| *h.as_bytes()).collect();
    let mut buf = Vec::with_capacity(hashes.len() + entries.len() * 160);
    prost::encoding::bytes::encode(1, &hashes, &mut buf);
    for (_, r) in entries {
        prost::encoding::message::encode(2, *r, &mut buf);
    }
    buf
}

/// Where a blob's data is, as persisted.
pub(crate) mod loc {
    /// In the `INLINE` table.
    pub(crate) const INLINE: u32 = 1;
    /// `data/<hex>.data` inside the store.
    pub(crate) const OWNED: u32 = 2;
    /// A file outside the store, referenced in place (`path`, `mtime_ns`, `ino`).
    pub(crate) const EXTERNAL: u32 = 3;
}

/// The persisted state of one blob.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Record {
    /// Size in bytes, if known.
    #[prost(uint64, optional, tag = "1")]
    pub(crate) size: Option<u64>,
    /// 0 raw, 1 collection.
    #[prost(uint32, tag = "2")]
    pub(crate) kind: u32,
    #[prost(string, tag = "3")]
    pub(crate) name: String,
    #[prost(bool, tag = "4")]
    pub(crate) pinned: bool,
    /// True once every group is verified.
    #[prost(bool, tag = "5")]
    pub(crate) complete: bool,
    /// One of [`loc`] for complete blobs.
    #[prost(uint32, tag = "6")]
    pub(crate) location: u32,
    /// External file (complete) or download target (partial), as OS bytes.
    #[prost(bytes = "vec", tag = "7")]
    pub(crate) path: Vec<u8>,
    #[prost(int64, tag = "8")]
    pub(crate) mtime_ns: i64,
    #[prost(uint64, tag = "9")]
    pub(crate) ino: u64,
    /// Verified groups of a partial blob, as run boundaries.
    #[prost(uint64, repeated, tag = "10")]
    pub(crate) verified: Vec<u64>,
    #[prost(bool, tag = "11")]
    pub(crate) corrupt: bool,
    /// Set for a file written without being synced (a small blob fetched in
    /// a batch): the boot it was written in (`boot_id`, empty if unknown).
    /// After a reboot, which may have been a power loss, its content is
    /// checked again at open before it is trusted.
    #[prost(bytes = "bytes", optional, tag = "12")]
    pub(crate) unsynced_boot: Option<bytes::Bytes>,
    /// A partial blob whose size is known for sure though its last group
    /// is not verified: a complete copy found damaged and salvaged (a peer
    /// claiming another size must not reset it).
    #[prost(bool, tag = "13")]
    pub(crate) size_proven: bool,
    /// A partial blob whose file is being moved to `path`'s partial file
    /// from this output's (empty: from the store's own file). Recorded
    /// before the move: a stop between the two leaves the file at the old
    /// place, and the next open moves it (recorded after, a stop between
    /// left the record naming the old place and the file at the new one:
    /// the open made an empty file there, and the moved one blocked the
    /// next get; a review).
    #[prost(bytes = "vec", optional, tag = "14")]
    pub(crate) moved_from: Option<Vec<u8>>,
}

/// One change to apply in a batch.
pub(crate) enum Op {
    Put(blake3::Hash, Record),
    PutInline(blake3::Hash, Vec<u8>),
    Delete(blake3::Hash),
}

/// The tables of one write transaction.
pub(crate) struct Tables<'t> {
    blobs: redb::Table<'t, &'static [u8], &'static [u8]>,
    inline: redb::Table<'t, &'static [u8], &'static [u8]>,
    groups: redb::Table<'t, u64, &'static [u8]>,
    moves: redb::Table<'t, &'static [u8], &'static [u8]>,
}

impl Tables<'_> {
    /// Write the group `id` (see [`encode_group`]).
    pub(crate) fn put_group(&mut self, id: u64, encoded: &[u8]) -> Result<(), StoreError> {
        self.groups.insert(id, encoded).map_err(StoreError::db)?;
        Ok(())
    }

    /// Take the given blobs out of their groups (a group left empty goes).
    pub(crate) fn remove_from_groups(
        &mut self,
        which: &HashMap<u64, HashSet<blake3::Hash>>,
    ) -> Result<(), StoreError> {
        use prost::Message;
        for (id, gone) in which {
            let Some(v) = self
                .groups
                .get(*id)
                .map_err(StoreError::db)?
                .map(|v| v.value().to_vec())
            else {
                continue;
            };
            let kept: Vec<(blake3::Hash, Record)> = RecordGroup::decode(v.as_slice())
                .map(RecordGroup::entries)
                .unwrap_or_default()
                .into_iter()
                .filter(|(h, _)| !gone.contains(h))
                .collect();
            if kept.is_empty() {
                self.groups.remove(*id).map_err(StoreError::db)?;
            } else {
                let refs: Vec<(&blake3::Hash, &Record)> =
                    kept.iter().map(|(h, r)| (h, r)).collect();
                self.put_group(*id, &encode_group(&refs))?;
            }
        }
        Ok(())
    }

    pub(crate) fn put(&mut self, h: &blake3::Hash, r: &Record) -> Result<(), StoreError> {
        use prost::Message;
        self.blobs
            .insert(h.as_bytes().as_slice(), r.encode_to_vec().as_slice())
            .map_err(StoreError::db)?;
        Ok(())
    }

    pub(crate) fn put_inline(&mut self, h: &blake3::Hash, d: &[u8]) -> Result<(), StoreError> {
        self.inline
            .insert(h.as_bytes().as_slice(), d)
            .map_err(StoreError::db)?;
        Ok(())
    }

    /// Note that the tree at `from` is being renamed to `to`.
    pub(crate) fn put_move(&mut self, from: &[u8], to: &[u8]) -> Result<(), StoreError> {
        self.moves.insert(from, to).map_err(StoreError::db)?;
        Ok(())
    }

    /// The rename of the tree at `from` is over (done and recorded, or
    /// not done).
    pub(crate) fn remove_move(&mut self, from: &[u8]) -> Result<(), StoreError> {
        self.moves.remove(from).map_err(StoreError::db)?;
        Ok(())
    }

    pub(crate) fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        for op in ops {
            match op {
                Op::Put(h, r) => self.put(h, r)?,
                Op::PutInline(h, d) => self.put_inline(h, d)?,
                Op::Delete(h) => {
                    self.blobs
                        .remove(h.as_bytes().as_slice())
                        .map_err(StoreError::db)?;
                    self.inline
                        .remove(h.as_bytes().as_slice())
                        .map_err(StoreError::db)?;
                }
            }
        }
        Ok(())
    }
}

/// Apply `ops` in one transaction.
pub(crate) fn apply(db: &Database, ops: &[Op], durable: bool) -> Result<(), StoreError> {
    write(db, durable, |t| t.apply(ops))
}

/// One write transaction: `f` writes into its tables, then it commits (an
/// error from `f` aborts it). redb runs one write transaction at a time,
/// so what `f` reads from elsewhere when it runs (the store's records
/// held in memory) is ordered with every other commit.
pub(crate) fn write(
    db: &Database,
    durable: bool,
    f: impl FnOnce(&mut Tables<'_>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut tx = db.begin_write().map_err(StoreError::db)?;
    if !durable {
        tx.set_durability(Durability::None);
    }
    {
        let mut t = Tables {
            blobs: tx.open_table(BLOBS).map_err(StoreError::db)?,
            inline: tx.open_table(INLINE).map_err(StoreError::db)?,
            groups: tx.open_table(GROUPS).map_err(StoreError::db)?,
            moves: tx.open_table(MOVES).map_err(StoreError::db)?,
        };
        f(&mut t)?;
    }
    tx.commit().map_err(StoreError::db)
}

/// A record loaded, and the group holding an entry for its blob.
pub(crate) type Loaded = (blake3::Hash, Record, Option<u64>);

/// Every record in the database (one in `BLOBS` overrides one in a
/// group), with the group that holds an entry for the blob, if any
/// (overridden or not: a deletion must take it out); and the next group
/// id.
pub(crate) fn load_all(db: &Database) -> Result<(Vec<Loaded>, u64), StoreError> {
    use prost::Message;
    let tx = db.begin_read().map_err(StoreError::db)?;
    let exists = |name| match tx.list_tables() {
        Ok(mut names) => Ok(names.any(|t| t.name() == name)),
        Err(e) => Err(StoreError::db(e)),
    };
    if !(exists(BLOBS.name())? && exists(INLINE.name())? && exists(GROUPS.name())?) {
        // A new database (or one from before groups): create the tables (a
        // durable commit, so only when one is missing: every `shoal add`
        // opens the store).
        drop(tx);
        apply(db, &[], true)?;
        return load_all(db);
    }
    let t = tx.open_table(BLOBS).map_err(StoreError::db)?;
    let mut single: HashMap<blake3::Hash, Record> = HashMap::new();
    for item in t.iter().map_err(StoreError::db)? {
        let (k, v) = item.map_err(StoreError::db)?;
        let Ok(hash) = <[u8; 32]>::try_from(k.value()) else {
            tracing::warn!("skipping a metadata record with a malformed key");
            continue;
        };
        match Record::decode(v.value()) {
            Ok(r) => {
                single.insert(blake3::Hash::from_bytes(hash), r);
            }
            Err(e) => tracing::warn!("skipping an unreadable metadata record: {e}"),
        }
    }
    let g = tx.open_table(GROUPS).map_err(StoreError::db)?;
    let mut grouped: HashMap<blake3::Hash, (u64, Record)> = HashMap::new();
    let mut next = 0;
    for item in g.iter().map_err(StoreError::db)? {
        let (k, v) = item.map_err(StoreError::db)?;
        let id = k.value();
        next = id.saturating_add(1);
        match RecordGroup::decode(v.value()) {
            Ok(group) => {
                for (h, r) in group.entries() {
                    grouped.insert(h, (id, r));
                }
            }
            Err(e) => tracing::warn!("skipping an unreadable group of metadata records: {e}"),
        }
    }
    let mut out: Vec<Loaded> = Vec::with_capacity(grouped.len());
    for (h, (id, r)) in grouped {
        let r = single.remove(&h).unwrap_or(r);
        out.push((h, r, Some(id)));
    }
    out.extend(single.into_iter().map(|(h, r)| (h, r, None)));
    Ok((out, next))
}

/// A rename of a tree noted ([`MOVES`]): from, as OS bytes, and the note
/// ([`encode_move`]).
pub(crate) type Move = (Vec<u8>, Vec<u8>);

/// A tree's identity, kept by a rename: device, inode (which a tree
/// deleted and made again may get back), modification time in ns.
pub(crate) type TreeId = [u64; 3];

/// A note of [`MOVES`]: the tree's identity, then where it goes.
pub(crate) fn encode_move(id: TreeId, to: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = id.iter().flat_map(|x| x.to_le_bytes()).collect();
    v.extend_from_slice(to);
    v
}

/// The identity and destination of a note of [`MOVES`] (`None` if
/// malformed).
pub(crate) fn decode_move(note: &[u8]) -> Option<(TreeId, &[u8])> {
    let (a, rest) = note.split_first_chunk::<8>()?;
    let (b, rest) = rest.split_first_chunk::<8>()?;
    let (c, to) = rest.split_first_chunk::<8>()?;
    let id = [*a, *b, *c].map(u64::from_le_bytes);
    (!to.is_empty()).then_some((id, to))
}

/// The identity of the tree that `m` describes.
pub(crate) fn tree_id(m: &std::fs::Metadata) -> TreeId {
    use std::os::unix::fs::MetadataExt;
    let ns = m
        .mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec());
    [m.dev(), m.ino(), ns as u64]
}

/// The renames of trees noted and not finished ([`MOVES`]).
pub(crate) fn load_moves(db: &Database) -> Result<Vec<Move>, StoreError> {
    let tx = db.begin_read().map_err(StoreError::db)?;
    let t = match tx.open_table(MOVES) {
        Ok(t) => t,
        // A database from before moves were noted.
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::db(e)),
    };
    let mut out = Vec::new();
    for item in t.iter().map_err(StoreError::db)? {
        let (k, v) = item.map_err(StoreError::db)?;
        out.push((k.value().to_vec(), v.value().to_vec()));
    }
    Ok(out)
}

/// The content of an inline blob.
pub(crate) fn load_inline(
    db: &Database,
    hash: &blake3::Hash,
) -> Result<Option<Vec<u8>>, StoreError> {
    let tx = db.begin_read().map_err(StoreError::db)?;
    let t = tx.open_table(INLINE).map_err(StoreError::db)?;
    let v = t.get(hash.as_bytes().as_slice()).map_err(StoreError::db)?;
    Ok(v.map(|v| v.value().to_vec()))
}
