//! The metadata database (redb): one record per blob, small blobs inline.
//!
//! Records are protobuf (`prost`) messages so fields can be added later.

use redb::{Database, Durability, ReadableTable, TableDefinition};

use crate::StoreError;

/// hash (32 bytes) -> encoded [`Record`].
pub(crate) const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs-v1");
/// hash (32 bytes) -> content of a small complete blob.
pub(crate) const INLINE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("inline-v1");

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
    #[prost(bytes = "vec", optional, tag = "12")]
    pub(crate) unsynced_boot: Option<Vec<u8>>,
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
}

impl Tables<'_> {
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
        };
        f(&mut t)?;
    }
    tx.commit().map_err(StoreError::db)
}

/// Every record in the database.
pub(crate) fn load_all(db: &Database) -> Result<Vec<(blake3::Hash, Record)>, StoreError> {
    use prost::Message;
    let tx = db.begin_read().map_err(StoreError::db)?;
    let exists = |def| match tx.open_table(def) {
        Ok(_) => Ok(true),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
        Err(e) => Err(StoreError::db(e)),
    };
    if !(exists(BLOBS)? && exists(INLINE)?) {
        // A new database: create both tables (a durable commit, so only
        // when they are missing: every `shoal add` opens the store).
        drop(tx);
        apply(db, &[], true)?;
        return load_all(db);
    }
    let t = tx.open_table(BLOBS).map_err(StoreError::db)?;
    let mut out = Vec::new();
    for item in t.iter().map_err(StoreError::db)? {
        let (k, v) = item.map_err(StoreError::db)?;
        let Ok(hash) = <[u8; 32]>::try_from(k.value()) else {
            tracing::warn!("skipping a metadata record with a malformed key");
            continue;
        };
        match Record::decode(v.value()) {
            Ok(r) => out.push((blake3::Hash::from_bytes(hash), r)),
            Err(e) => tracing::warn!("skipping an unreadable metadata record: {e}"),
        }
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
