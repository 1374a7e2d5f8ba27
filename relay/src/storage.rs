//! Embedded, crash-safe storage on [redb] with group commit.
//!
//! Five tables, all payloads opaque bytes (the caller encodes):
//!
//! | table        | key                        | value                                    |
//! |--------------|----------------------------|------------------------------------------|
//! | `documents`  | doc id                     | latest snapshot                          |
//! | `delta_runs` | (doc id, last seq)         | a run of consecutive deltas of the log   |
//! | `deltas`     | (doc id, seq)              | one delta (written by earlier versions)  |
//! | `meta`       | key                        | e.g. this node's replica id              |
//! | `hints`      | (target node, doc id, id)  | hinted-handoff payload                   |
//!
//! **One row per document per commit.** Consecutive deltas of a document written in one
//! transaction are stored as one `delta_runs` row (each delta prefixed by its length as a
//! LEB128 varint; the key names the run's last seq, so a run holding `n` deltas covers
//! `last - n + 1 ..= last`). A busy document thus costs one B-tree insert per commit,
//! not one per delta. Keying by the *last* seq keeps truncation safe: a snapshot that
//! supersedes `..= upto` deletes only runs that end at or before `upto`. Rows of the
//! older one-delta-per-row `deltas` table are still read, truncated and deleted.
//!
//! **Group commit.** Every write goes through one bounded channel to a single writer
//! thread (a std thread: redb's commit blocks on `fsync`, which must not stall the tokio
//! workers). The thread takes one request, drains every request already queued behind
//! it, applies them all in ONE write transaction committed with
//! [`Durability::Immediate`], and only then completes each request. N concurrent writers
//! thus share one `fsync`, and a request is reported successful only after the commit
//! that contains it returned — the classic group commit of database logs (Gray & Reuter;
//! PostgreSQL's `commit_delay`).
//!
//! If a combined transaction fails, the batch is retried one request per transaction, so
//! one bad request cannot fail its neighbours.
//!
//! **A disk that refuses writes** (full, failing, remounted read-only). redb refuses
//! every later operation on a database whose commit failed on I/O — reads of pages it has
//! not cached included — until it is opened again. So when a commit fails that way, the
//! writer fails the batch, and readers move to a *read view*: the same file opened with
//! every write redb makes (its header, the repair of the failed commit) kept in memory,
//! so they keep reading the last committed state while nothing is written. Later writes
//! fail at once while a small probe file cannot be written; once it can, the writer
//! opens the database again and writes are accepted — no restart.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use concord_relay::storage::Storage;
//! let dir = std::env::temp_dir().join(format!("concord-doc-{}", std::process::id()));
//! let storage = Storage::open(&dir).unwrap();
//! storage.put_delta("board-1", 1, b"delta".to_vec()).await.unwrap();
//! let doc = storage.load_doc("board-1").await.unwrap();
//! assert_eq!(doc.deltas, vec![(1, b"delta".to_vec())]);
//! storage.close().await;
//! # drop(storage);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # });
//! ```

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use redb::backends::FileBackend;
use redb::{Database, DatabaseError, Durability, ReadableTable, StorageBackend, TableDefinition};
use tokio::sync::{mpsc, oneshot, watch};

const DOCUMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("documents");
const DELTAS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("deltas");
const DELTA_RUNS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("delta_runs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const HINTS: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("hints");
/// Each document's version vector, written with every change to it: start-up reads this
/// small table instead of the documents.
const VERSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("versions");

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "concord.redb";
/// Scratch file written (and removed) to learn whether the disk takes writes again.
const PROBE_FILE: &str = "concord.redb.probe";
/// Bytes of that probe.
const PROBE_BYTES: usize = 64 * 1024;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The database file could not be opened or created.
    #[error("cannot open database {path}: {source} (is another relay using this data_dir?)")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<redb::DatabaseError>,
    },
    /// The storage engine failed (I/O error, corruption, ...).
    #[error("storage engine error: {0}")]
    Engine(#[from] Box<redb::Error>),
    /// The storage was closed; no more writes are accepted.
    #[error("storage is closed")]
    Closed,
    /// The writer thread could not be started.
    #[error("cannot start the storage writer thread: {0}")]
    Thread(std::io::Error),
    /// The disk refused a commit (full, failing, read-only): writes fail until it takes
    /// writes again, then are accepted without a restart. Reads continue meanwhile.
    #[error("storage is refusing writes: {0}")]
    Unavailable(String),
    /// A stored record could not be decoded. What it belongs to is not served; the
    /// record is left in place for an operator.
    #[error("stored {record} is unreadable: {reason}")]
    Corrupt {
        /// Which record, e.g. `snapshot of "doc-1"`.
        record: String,
        /// Why it was refused.
        reason: String,
    },
}

/// Why a `delta_runs` value could not be split into its deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum RunError {
    /// A length prefix ends with the value.
    #[error("the length prefix at byte {0} is cut off")]
    CutLength(usize),
    /// A length prefix does not fit in 64 bits.
    #[error("the length prefix at byte {0} overflows")]
    LongLength(usize),
    /// A delta is longer than what follows its length prefix.
    #[error("the delta at byte {at} claims {len} bytes, {left} follow")]
    CutDelta {
        /// Offset of its first byte.
        at: usize,
        /// Claimed length.
        len: u64,
        /// Bytes left in the value.
        left: usize,
    },
    /// The run holds more deltas than there are sequence numbers up to its key.
    #[error("{count} deltas cannot end at sequence number {last}")]
    TooMany {
        /// Deltas in the run.
        count: usize,
        /// Sequence number of its last delta (the key).
        last: u64,
    },
}

fn engine(e: impl Into<redb::Error>) -> StorageError {
    StorageError::Engine(Box::new(e.into()))
}

/// One write. A [`Storage::write`] of several ops is atomic: all or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Append delta `seq` of `doc`. Seqs of a document are written once each, in
    /// ascending order (a snapshot that truncates the log lets them start over); a run of
    /// consecutive seqs in one transaction is stored as one row.
    PutDelta {
        /// Document id.
        doc: String,
        /// Caller-assigned position in the document's delta log.
        seq: u64,
        /// Encoded delta.
        bytes: Vec<u8>,
    },
    /// Replace the snapshot of `doc`; deltas with `seq <= truncate_through` are deleted
    /// in the same transaction (the snapshot supersedes them).
    PutSnapshot {
        /// Document id.
        doc: String,
        /// Encoded snapshot.
        bytes: Vec<u8>,
        /// Delete the log up to and including this seq.
        truncate_through: Option<u64>,
    },
    /// Delete the snapshot and every delta of `doc`.
    DeleteDoc {
        /// Document id.
        doc: String,
    },
    /// Record the version of `doc` (written beside every change to it, so start-up never
    /// reads document bodies).
    PutVersion {
        /// Document id.
        doc: String,
        /// Encoded version vector.
        bytes: Vec<u8>,
    },
    /// Set a metadata key.
    PutMeta {
        /// Key.
        key: String,
        /// Value.
        bytes: Vec<u8>,
    },
    /// Store a hint for `target` (see [`Storage::next_hint_id`]).
    PutHint {
        /// Node the payload is meant for.
        target: String,
        /// Document id.
        doc: String,
        /// Unique hint id.
        id: u64,
        /// Encoded payload.
        bytes: Vec<u8>,
    },
    /// Delete a delivered hint.
    DeleteHint {
        /// Node the payload was meant for.
        target: String,
        /// Document id.
        doc: String,
        /// Hint id.
        id: u64,
    },
}

/// What is stored for one document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredDoc {
    /// The latest snapshot, if any.
    pub snapshot: Option<Vec<u8>>,
    /// The deltas after it, `(seq, bytes)` in ascending seq order.
    pub deltas: Vec<(u64, Vec<u8>)>,
}

/// One stored hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    /// Document id.
    pub doc: String,
    /// Hint id (pass to [`Storage::delete_hint`] once delivered).
    pub id: u64,
    /// Payload.
    pub bytes: Vec<u8>,
}

/// Tuning knobs of [`Storage::open_with`].
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Most write requests combined into one transaction. `1` disables group commit
    /// (one fsync per write: the baseline of the group-commit benchmark).
    pub max_batch: usize,
    /// Capacity of the write queue; writers wait (asynchronously) when it is full.
    pub queue: usize,
    /// redb page cache size in bytes.
    pub cache_bytes: usize,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions { max_batch: 4096, queue: 8192, cache_bytes: 64 * 1024 * 1024 }
    }
}

struct WriteRequest {
    ops: Vec<WriteOp>,
    done: Done,
}

/// What [`WriteSlot::submit`] runs once its request is committed or failed.
type Callback = dyn FnOnce(Vec<WriteOp>, Result<(), StorageError>) + Send;

/// How a write request learns its outcome.
enum Done {
    /// [`Storage::write`] awaits it.
    Channel(oneshot::Sender<Result<(), StorageError>>),
    /// [`WriteSlot::submit`]: runs on the writer thread.
    Call(Box<Callback>),
}

impl WriteRequest {
    fn complete(self, result: Result<(), StorageError>) {
        match self.done {
            Done::Channel(tx) => {
                // A writer that stopped waiting (its task was cancelled) needs no result.
                if tx.send(result).is_err() {
                    tracing::debug!("a storage write finished after its caller left");
                }
            }
            Done::Call(f) => f(self.ops, result),
        }
    }
}

/// A place in the write queue, reserved with [`Storage::reserve`] so that the write can
/// later be queued without waiting — e.g. while holding a lock, so that writes reach the
/// queue in the order their data changed.
pub struct WriteSlot {
    permit: mpsc::OwnedPermit<Command>,
}

impl std::fmt::Debug for WriteSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteSlot")
    }
}

impl WriteSlot {
    /// Queues `ops` (applied atomically, like [`Storage::write`]) without waiting.
    /// `done` runs on the storage writer thread once the transaction containing them is
    /// durably committed, or failed, and gets the ops back so that they can be freed on
    /// the caller's side (freeing memory another thread allocated is slow, and the
    /// writer thread is the bottleneck of durable writes). Keep it short (e.g. a push
    /// onto a queue): it delays the next commit. Wake the consumer from
    /// [`Storage::completed`], once per batch, rather than in `done`. Dropping the slot
    /// instead of submitting gives the place back.
    pub fn submit(
        self,
        ops: Vec<WriteOp>,
        done: impl FnOnce(Vec<WriteOp>, Result<(), StorageError>) + Send + 'static,
    ) {
        self.permit.send(Command::Write(WriteRequest { ops, done: Done::Call(Box::new(done)) }));
    }
}

enum Command {
    Write(WriteRequest),
    Close(oneshot::Sender<()>),
}

struct Stats {
    commits: AtomicU64,
    writes: AtomicU64,
    /// Documents read ([`Storage::load_doc`]).
    loads: AtomicU64,
    /// Batches completed: bumped after the callbacks of each batch ran.
    batches: watch::Sender<u64>,
}

/// The database readers use: the writable one, or a read view while the disk refuses
/// writes; `None` once closed.
type Shared = Arc<RwLock<Option<Arc<Database>>>>;

struct Inner {
    path: PathBuf,
    db: Shared,
    tx: mpsc::Sender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Stats>,
    next_hint: AtomicU64,
    /// Makes the disk refuse writes ([`Storage::fail_writes`]).
    full: Arc<AtomicBool>,
}

/// Handle to the node's storage. Cheap to clone; all clones share one writer thread.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("path", &self.inner.path).field("commits", &self.commits()).finish()
    }
}

impl Storage {
    /// Opens (creating if needed) the database in `dir`, with default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<Storage, StorageError> {
        Storage::open_with(dir, StorageOptions::default())
    }

    /// Opens (creating if needed) the database in `dir`.
    pub fn open_with(dir: impl AsRef<Path>, options: StorageOptions) -> Result<Storage, StorageError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)
            .map_err(|source| StorageError::CreateDir { path: dir.to_path_buf(), source })?;
        let path = dir.join(DB_FILE);
        let open_error =
            |source: DatabaseError| StorageError::Open { path: path.clone(), source: Box::new(source) };
        // The file is opened (and locked) once; every database over it — reopened after a
        // failed commit, or a read view — uses a clone of this handle, so holds the lock.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| open_error(e.into()))?;
        let full = Arc::new(AtomicBool::new(false));
        let db = open_writable(&file, &full, options.cache_bytes).map_err(open_error)?;

        // Create the tables so readers never meet a missing one, and find the next hint id.
        let mut txn = db.begin_write().map_err(engine)?;
        txn.set_durability(Durability::Immediate);
        let next_hint = {
            txn.open_table(DOCUMENTS).map_err(engine)?;
            txn.open_table(DELTAS).map_err(engine)?;
            txn.open_table(DELTA_RUNS).map_err(engine)?;
            txn.open_table(META).map_err(engine)?;
            let hints = txn.open_table(HINTS).map_err(engine)?;
            let mut max = 0;
            for entry in hints.iter().map_err(engine)? {
                let (k, _) = entry.map_err(engine)?;
                max = max.max(k.value().2);
            }
            // Saturating: a damaged id of u64::MAX must not overflow (ids wrap after it).
            max.saturating_add(1)
        };
        txn.commit().map_err(engine)?;

        let db = Arc::new(db);
        let shared: Shared = Arc::new(RwLock::new(Some(db.clone())));
        let stats = Arc::new(Stats {
            commits: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            batches: watch::channel(0).0,
        });
        let (tx, rx) = mpsc::channel(options.queue.max(1));
        let thread = {
            let writer = Writer {
                dir: dir.to_path_buf(),
                file,
                cache_bytes: options.cache_bytes,
                full: full.clone(),
                shared: shared.clone(),
                db: Some(db),
                down: None,
            };
            let stats = stats.clone();
            let max_batch = options.max_batch.max(1);
            std::thread::Builder::new()
                .name("concord-storage-writer".into())
                .spawn(move || writer_loop(writer, rx, max_batch, stats))
                .map_err(StorageError::Thread)?
        };
        Ok(Storage {
            inner: Arc::new(Inner {
                path,
                db: shared,
                tx,
                thread: Mutex::new(Some(thread)),
                stats,
                next_hint: AtomicU64::new(next_hint),
                full,
            }),
        })
    }

    /// While `on`, the disk refuses every write, sync and resize with an "out of space"
    /// error, as a full disk does; reads are unaffected. For tests of how the relay
    /// copes with a failing disk.
    #[doc(hidden)]
    pub fn fail_writes(&self, on: bool) {
        self.inner.full.store(on, Ordering::SeqCst);
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Applies `ops` atomically; resolves only once the transaction containing them is
    /// durably committed.
    pub async fn write(&self, ops: Vec<WriteOp>) -> Result<(), StorageError> {
        let (done, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Command::Write(WriteRequest { ops, done: Done::Channel(done) }))
            .await
            .map_err(|_| StorageError::Closed)?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Reserves a place in the write queue (waiting while it is full); see [`WriteSlot`].
    pub async fn reserve(&self) -> Result<WriteSlot, StorageError> {
        let permit = self.inner.tx.clone().reserve_owned().await.map_err(|_| StorageError::Closed)?;
        Ok(WriteSlot { permit })
    }

    /// Durably stores delta `seq` of `doc`.
    pub async fn put_delta(
        &self,
        doc: impl Into<String>,
        seq: u64,
        bytes: Vec<u8>,
    ) -> Result<(), StorageError> {
        self.write(vec![WriteOp::PutDelta { doc: doc.into(), seq, bytes }]).await
    }

    /// Durably replaces the snapshot of `doc`, deleting the deltas it supersedes
    /// (`seq <= truncate_through`) in the same transaction.
    pub async fn put_snapshot(
        &self,
        doc: impl Into<String>,
        bytes: Vec<u8>,
        truncate_through: Option<u64>,
    ) -> Result<(), StorageError> {
        self.write(vec![WriteOp::PutSnapshot { doc: doc.into(), bytes, truncate_through }]).await
    }

    /// Durably sets a metadata key.
    pub async fn put_meta(&self, key: impl Into<String>, bytes: Vec<u8>) -> Result<(), StorageError> {
        self.write(vec![WriteOp::PutMeta { key: key.into(), bytes }]).await
    }

    /// A fresh hint id, unique in this database (ids survive restarts).
    pub fn next_hint_id(&self) -> u64 {
        self.inner.next_hint.fetch_add(1, Ordering::Relaxed)
    }

    /// Durably stores a hint for `target`; returns its id.
    pub async fn put_hint(
        &self,
        target: impl Into<String>,
        doc: impl Into<String>,
        bytes: Vec<u8>,
    ) -> Result<u64, StorageError> {
        let id = self.next_hint_id();
        self.write(vec![WriteOp::PutHint { target: target.into(), doc: doc.into(), id, bytes }]).await?;
        Ok(id)
    }

    /// Durably deletes a hint (after the target acknowledged it).
    pub async fn delete_hint(
        &self,
        target: impl Into<String>,
        doc: impl Into<String>,
        id: u64,
    ) -> Result<(), StorageError> {
        self.write(vec![WriteOp::DeleteHint { target: target.into(), doc: doc.into(), id }]).await
    }

    /// Resolves once every write queued before this call is committed.
    pub async fn flush(&self) -> Result<(), StorageError> {
        self.write(Vec::new()).await
    }

    /// Commits everything queued, stops the writer thread and releases the database
    /// file (once in-flight reads finish). Later writes and reads fail with
    /// [`StorageError::Closed`]. Idempotent.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.tx.send(Command::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let thread = self.inner.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        if let Ok(mut db) = self.inner.db.write() {
            db.take();
        }
    }

    /// Transactions committed so far (for tests, metrics and the benchmark).
    pub fn commits(&self) -> u64 {
        self.inner.stats.commits.load(Ordering::Relaxed)
    }

    /// Changes each time the writer thread finished a batch of requests — after the
    /// `done` callbacks of every [`WriteSlot::submit`] in it ran. One wake-up per group
    /// commit for a consumer of those callbacks' results.
    pub fn completed(&self) -> watch::Receiver<u64> {
        self.inner.stats.batches.subscribe()
    }

    /// Write requests committed so far.
    pub fn writes(&self) -> u64 {
        self.inner.stats.writes.load(Ordering::Relaxed)
    }

    /// Documents read so far ([`Storage::load_doc`] calls).
    pub fn loads(&self) -> u64 {
        self.inner.stats.loads.load(Ordering::Relaxed)
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let db = self.inner.db.read().ok().and_then(|db| db.clone()).ok_or(StorageError::Closed)?;
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(|_| StorageError::Closed)?
    }

    /// The snapshot and the deltas of `doc` (both empty for an unknown doc).
    pub async fn load_doc(&self, doc: impl Into<String>) -> Result<StoredDoc, StorageError> {
        let doc = doc.into();
        self.inner.stats.loads.fetch_add(1, Ordering::Relaxed);
        self.read(move |db| {
            let txn = db.begin_read().map_err(engine)?;
            let docs = txn.open_table(DOCUMENTS).map_err(engine)?;
            let snapshot = docs.get(doc.as_str()).map_err(engine)?.map(|v| v.value().to_vec());
            let range = (doc.as_str(), 0u64)..=(doc.as_str(), u64::MAX);
            let mut deltas = Vec::new();
            for entry in txn.open_table(DELTAS).map_err(engine)?.range(range.clone()).map_err(engine)? {
                let (k, v) = entry.map_err(engine)?;
                deltas.push((k.value().1, v.value().to_vec()));
            }
            for entry in txn.open_table(DELTA_RUNS).map_err(engine)?.range(range).map_err(engine)? {
                let (k, v) = entry.map_err(engine)?;
                let last = k.value().1;
                // A damaged run is an error, not skipped: the document would be served
                // without acknowledged writes, and its next snapshot would drop them.
                let run = run_deltas(last, v.value()).map_err(|e| StorageError::Corrupt {
                    record: format!("run of deltas ending at {last} of {doc:?}"),
                    reason: e.to_string(),
                })?;
                deltas.extend(run.into_iter().map(|(seq, d)| (seq, d.to_vec())));
            }
            // Rows of both tables, in log order; a seq stored twice counts once.
            deltas.sort_by_key(|(seq, _)| *seq);
            deltas.dedup_by_key(|(seq, _)| *seq);
            Ok(StoredDoc { snapshot, deltas })
        })
        .await
    }

    /// Every document that has a snapshot or deltas, sorted.
    pub async fn list_docs(&self) -> Result<Vec<String>, StorageError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(engine)?;
            let mut out = BTreeSet::new();
            for entry in txn.open_table(DOCUMENTS).map_err(engine)?.iter().map_err(engine)? {
                out.insert(entry.map_err(engine)?.0.value().to_string());
            }
            for table in [DELTAS, DELTA_RUNS] {
                // Skip from one document's deltas to the next instead of reading them all.
                let deltas = txn.open_table(table).map_err(engine)?;
                let mut after: Option<String> = None;
                loop {
                    let next = match &after {
                        None => deltas.first().map_err(engine)?,
                        Some(doc) => deltas
                            .range::<(&str, u64)>((
                                Bound::Excluded((doc.as_str(), u64::MAX)),
                                Bound::Unbounded,
                            ))
                            .map_err(engine)?
                            .next()
                            .transpose()
                            .map_err(engine)?,
                    };
                    match next {
                        Some((k, _)) => {
                            let doc = k.value().0.to_string();
                            out.insert(doc.clone());
                            after = Some(doc);
                        }
                        None => break,
                    }
                }
            }
            Ok(out.into_iter().collect())
        })
        .await
    }

    /// Every recorded document version ([`WriteOp::PutVersion`]), by document id.
    pub async fn versions(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(engine)?;
            let table = match txn.open_table(VERSIONS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(engine(e)),
            };
            let mut out = Vec::new();
            for entry in table.iter().map_err(engine)? {
                let (k, v) = entry.map_err(engine)?;
                out.push((k.value().to_string(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    /// Every hint stored for `target`, by doc then id.
    pub async fn hints_for(&self, target: impl Into<String>) -> Result<Vec<Hint>, StorageError> {
        let target = target.into();
        self.read(move |db| {
            let txn = db.begin_read().map_err(engine)?;
            let hints = txn.open_table(HINTS).map_err(engine)?;
            let mut out = Vec::new();
            for entry in hints.range::<(&str, &str, u64)>((target.as_str(), "", 0u64)..).map_err(engine)? {
                let (k, v) = entry.map_err(engine)?;
                let (t, doc, id) = k.value();
                if t != target {
                    break;
                }
                out.push(Hint { doc: doc.to_string(), id, bytes: v.value().to_vec() });
            }
            Ok(out)
        })
        .await
    }

    /// Every target node that has hints waiting.
    pub async fn hint_targets(&self) -> Result<Vec<String>, StorageError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(engine)?;
            let mut out = BTreeSet::new();
            for entry in txn.open_table(HINTS).map_err(engine)?.iter().map_err(engine)? {
                out.insert(entry.map_err(engine)?.0.value().0.to_string());
            }
            Ok(out.into_iter().collect())
        })
        .await
    }

    /// A metadata value.
    pub async fn get_meta(&self, key: impl Into<String>) -> Result<Option<Vec<u8>>, StorageError> {
        let key = key.into();
        self.read(move |db| {
            let txn = db.begin_read().map_err(engine)?;
            let meta = txn.open_table(META).map_err(engine)?;
            let value = meta.get(key.as_str()).map_err(engine)?;
            Ok(value.map(|v| v.value().to_vec()))
        })
        .await
    }
}

/// Fails `io` like a full disk.
fn no_space() -> io::Error {
    io::Error::new(io::ErrorKind::StorageFull, "no space left on device (simulated)")
}

/// The database file as the writable database sees it; while `full` is set, it refuses
/// writes like a full disk ([`Storage::fail_writes`]).
#[derive(Debug)]
struct Disk {
    file: FileBackend,
    full: Arc<AtomicBool>,
}

impl Disk {
    fn check(&self) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(no_space());
        }
        Ok(())
    }
}

impl StorageBackend for Disk {
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.file.read(offset, len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check()?;
        self.file.set_len(len)
    }

    fn sync_data(&self, eventual: bool) -> io::Result<()> {
        self.check()?;
        self.file.sync_data(eventual)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check()?;
        self.file.write(offset, data)
    }
}

/// Granularity of a [`ReadView`]'s copy-on-write.
const VIEW_BLOCK: u64 = 4096;

/// The database file, read-only: what redb writes (its header when opening, the repair
/// of a failed commit, an allocator table when closing) stays in memory here and never
/// reaches the file. Readers use it while the disk refuses writes; they see the last
/// committed state, and the file stays exactly as the last commit left it.
#[derive(Debug)]
struct ReadView {
    file: FileBackend,
    overlay: Mutex<Overlay>,
}

#[derive(Debug)]
struct Overlay {
    /// The length redb set.
    len: u64,
    /// Bytes of the file below this offset are visible (it shrinks with `set_len`).
    visible: u64,
    /// Blocks written, by index: [`VIEW_BLOCK`] bytes each.
    blocks: HashMap<u64, Box<[u8]>>,
}

impl ReadView {
    fn new(file: FileBackend) -> io::Result<ReadView> {
        let len = file.len()?;
        Ok(ReadView { file, overlay: Mutex::new(Overlay { len, visible: len, blocks: HashMap::new() }) })
    }

    fn overlay(&self) -> std::sync::MutexGuard<'_, Overlay> {
        self.overlay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fills `dst` from the file at `pos`; zeros where the file is not visible.
    fn read_file(&self, visible: u64, pos: u64, dst: &mut [u8]) -> io::Result<()> {
        let n = visible.saturating_sub(pos).min(dst.len() as u64) as usize;
        if n > 0 {
            dst[..n].copy_from_slice(&self.file.read(pos, n)?);
        }
        dst[n..].fill(0);
        Ok(())
    }
}

/// `offset + len`, or an error instead of an overflow.
fn range_end(offset: u64, len: usize) -> io::Result<u64> {
    offset
        .checked_add(len as u64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))
}

impl StorageBackend for ReadView {
    fn len(&self) -> io::Result<u64> {
        Ok(self.overlay().len)
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let end = range_end(offset, len)?;
        let o = self.overlay();
        let mut out = vec![0; len];
        let at = |pos: u64| (pos - offset) as usize;
        let mut pos = offset;
        while pos < end {
            let block = pos / VIEW_BLOCK;
            let start = block * VIEW_BLOCK;
            let upto = (start + VIEW_BLOCK).min(end);
            if let Some(b) = o.blocks.get(&block) {
                out[at(pos)..at(upto)].copy_from_slice(&b[(pos - start) as usize..(upto - start) as usize]);
                pos = upto;
                continue;
            }
            // One file read for a stretch of blocks the overlay does not hold.
            let mut stop = upto;
            while stop < end && !o.blocks.contains_key(&(stop / VIEW_BLOCK)) {
                stop = (stop + VIEW_BLOCK).min(end);
            }
            self.read_file(o.visible, pos, &mut out[at(pos)..at(stop)])?;
            pos = stop;
        }
        Ok(out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut o = self.overlay();
        o.len = len;
        o.visible = o.visible.min(len);
        o.blocks.retain(|b, _| b * VIEW_BLOCK < len);
        if let Some(b) = o.blocks.get_mut(&(len / VIEW_BLOCK)) {
            b[(len % VIEW_BLOCK) as usize..].fill(0);
        }
        Ok(())
    }

    fn sync_data(&self, _eventual: bool) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = range_end(offset, data.len())?;
        let mut o = self.overlay();
        let mut pos = offset;
        while pos < end {
            let block = pos / VIEW_BLOCK;
            let start = block * VIEW_BLOCK;
            let upto = (start + VIEW_BLOCK).min(end);
            let visible = o.visible;
            let b = match o.blocks.entry(block) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    let mut fresh = vec![0; VIEW_BLOCK as usize];
                    self.read_file(visible, start, &mut fresh)?;
                    e.insert(fresh.into_boxed_slice())
                }
            };
            b[(pos - start) as usize..(upto - start) as usize]
                .copy_from_slice(&data[(pos - offset) as usize..(upto - offset) as usize]);
            pos = upto;
        }
        o.len = o.len.max(end);
        Ok(())
    }
}

/// The writable database over `file`.
fn open_writable(file: &File, full: &Arc<AtomicBool>, cache_bytes: usize) -> Result<Database, DatabaseError> {
    let disk = Disk { file: FileBackend::new(file.try_clone()?)?, full: full.clone() };
    Database::builder().set_cache_size(cache_bytes).create_with_backend(disk)
}

/// A read view of `file` (see [`ReadView`]).
fn open_read_view(file: &File, cache_bytes: usize) -> Result<Database, DatabaseError> {
    let view = ReadView::new(FileBackend::new(file.try_clone()?)?)?;
    Database::builder().set_cache_size(cache_bytes).create_with_backend(view)
}

/// The writer thread's side of the database.
struct Writer {
    dir: PathBuf,
    /// The locked database file; databases are opened over clones of it.
    file: File,
    cache_bytes: usize,
    full: Arc<AtomicBool>,
    /// What readers use.
    shared: Shared,
    /// The writable database; `None` while the disk refuses writes.
    db: Option<Arc<Database>>,
    /// Why writes are refused, while they are.
    down: Option<String>,
}

impl Writer {
    /// The writable database, opened again first if a commit failed (and the disk takes
    /// writes again); or why writes are refused.
    fn writable(&mut self) -> Result<Arc<Database>, String> {
        if let Some(db) = &self.db {
            return Ok(db.clone());
        }
        let why = self.down.clone().unwrap_or_default();
        // Opening after a failed commit repairs the file, which reads all of it: first
        // learn cheaply whether the disk takes writes again.
        self.probe().map_err(|e| format!("{why}; the disk still refuses writes: {e}"))?;
        let db = open_writable(&self.file, &self.full, self.cache_bytes)
            .map_err(|e| format!("{why}; reopening the database failed: {e}"))?;
        let db = Arc::new(db);
        let view = self.shared.write().unwrap_or_else(|p| p.into_inner()).replace(db.clone());
        // The read view reads the file this database is about to write: wait until the
        // reads still using it are done (new ones use the new database).
        if let Some(mut view) = view {
            loop {
                match Arc::try_unwrap(view) {
                    Ok(view) => break drop(view),
                    Err(still) => view = still,
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        tracing::info!("the disk takes writes again; storage accepts writes");
        self.down = None;
        self.db = Some(db.clone());
        Ok(db)
    }

    /// Whether the disk takes a small write and sync.
    fn probe(&self) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(no_space());
        }
        let path = self.dir.join(PROBE_FILE);
        let written = File::create(&path).and_then(|mut f| {
            f.write_all(&[0; PROBE_BYTES])?;
            f.sync_data()
        });
        let removed = std::fs::remove_file(&path);
        written.and(removed)
    }

    /// A commit failed and left the database unusable: refuse writes, and move readers
    /// to a read view of the last committed state.
    fn break_down(&mut self, why: String) {
        tracing::error!(error = %why, "a commit failed; writes are refused until the disk takes them again, reads continue");
        self.db = None;
        self.down = Some(why);
        match open_read_view(&self.file, self.cache_bytes) {
            // The failed database is dropped once its last reader is done (it does no
            // more I/O: redb refuses all of it after a failed commit).
            Ok(view) => drop(self.shared.write().unwrap_or_else(|p| p.into_inner()).replace(Arc::new(view))),
            Err(e) => tracing::error!(error = %e, "cannot open the database for reading either"),
        }
    }
}

/// Whether `db` still takes transactions (redb refuses all of them after an I/O error).
fn usable(db: &Database) -> bool {
    db.begin_write().is_ok()
}

fn writer_loop(mut writer: Writer, mut rx: mpsc::Receiver<Command>, max_batch: usize, stats: Arc<Stats>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = Vec::new();
        let mut close = None;
        let mut next = Some(first);
        // Drain what is already queued: these writers share this commit's fsync.
        while let Some(cmd) = next.take() {
            match cmd {
                Command::Write(req) => batch.push(req),
                Command::Close(done) => {
                    close = Some(done);
                    break;
                }
            }
            if batch.len() < max_batch {
                next = rx.try_recv().ok();
            }
        }
        commit_batch(&mut writer, batch, &stats);
        stats.batches.send_modify(|n| *n += 1);
        if let Some(done) = close {
            if done.send(()).is_err() {
                tracing::debug!("storage closed after its closer left");
            }
            return;
        }
    }
}

fn commit_batch(writer: &mut Writer, batch: Vec<WriteRequest>, stats: &Stats) {
    if batch.iter().all(|r| r.ops.is_empty()) {
        // Only flush barriers: everything before them is already committed.
        for req in batch {
            req.complete(Ok(()));
        }
        return;
    }
    let db = match writer.writable() {
        Ok(db) => db,
        Err(why) => {
            for req in batch {
                req.complete(Err(StorageError::Unavailable(why.clone())));
            }
            return;
        }
    };
    let n = batch.len() as u64;
    match apply(&db, batch.iter().flat_map(|r| r.ops.iter())) {
        Ok(()) => {
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats.writes.fetch_add(n, Ordering::Relaxed);
            for req in batch {
                req.complete(Ok(()));
            }
        }
        Err(failed) if failed.commit || !usable(&db) => {
            let why = failed.error.to_string();
            writer.break_down(why.clone());
            for req in batch {
                req.complete(Err(StorageError::Unavailable(why.clone())));
            }
        }
        Err(failed) if batch.len() == 1 => {
            if let Some(req) = batch.into_iter().next() {
                req.complete(Err(failed.error));
            }
        }
        Err(failed) => {
            tracing::warn!(error = %failed.error, requests = n, "group commit failed; retrying one by one");
            for req in batch {
                if let Some(why) = &writer.down {
                    req.complete(Err(StorageError::Unavailable(why.clone())));
                    continue;
                }
                let result = match apply(&db, req.ops.iter()) {
                    Ok(()) => {
                        stats.commits.fetch_add(1, Ordering::Relaxed);
                        stats.writes.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(failed) if failed.commit || !usable(&db) => {
                        let why = failed.error.to_string();
                        writer.break_down(why.clone());
                        Err(StorageError::Unavailable(why))
                    }
                    Err(failed) => Err(failed.error),
                };
                req.complete(result);
            }
        }
    }
}

/// Consecutive deltas of one document, collected for one `delta_runs` row.
struct Run {
    last: u64,
    buf: Vec<u8>,
}

/// Appends `n` as a LEB128 varint.
fn push_varint(buf: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        buf.push((n as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

/// The deltas of a `delta_runs` value.
fn split_run(value: &[u8]) -> Result<Vec<&[u8]>, RunError> {
    let mut out = Vec::new();
    let mut bytes = value;
    while !bytes.is_empty() {
        let start = value.len() - bytes.len();
        let mut len: u64 = 0;
        let mut shift = 0;
        loop {
            let (&b, rest) = bytes.split_first().ok_or(RunError::CutLength(start))?;
            bytes = rest;
            // Ten bytes carry 64 bits; of the tenth, only the lowest bit fits.
            if shift > 63 || (shift == 63 && b & 0x7e != 0) {
                return Err(RunError::LongLength(start));
            }
            len |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let at = value.len() - bytes.len();
        let n = usize::try_from(len).ok().filter(|l| *l <= bytes.len()).ok_or(RunError::CutDelta {
            at,
            len,
            left: bytes.len(),
        })?;
        let (delta, rest) = bytes.split_at(n);
        out.push(delta);
        bytes = rest;
    }
    Ok(out)
}

/// The deltas of the `delta_runs` row keyed `last`, with their sequence numbers: a run of
/// `n` deltas covers `last - n + 1 ..= last`.
fn run_deltas(last: u64, value: &[u8]) -> Result<Vec<(u64, &[u8])>, RunError> {
    let run = split_run(value)?;
    let Some(before) = run.len().checked_sub(1) else { return Ok(Vec::new()) };
    let first = u64::try_from(before)
        .ok()
        .and_then(|b| last.checked_sub(b))
        .ok_or(RunError::TooMany { count: run.len(), last })?;
    Ok((first..=last).zip(run).collect())
}

/// Why [`apply`] failed.
struct ApplyError {
    error: StorageError,
    /// The commit itself failed: redb refuses the database until it is opened again.
    commit: bool,
}

impl From<StorageError> for ApplyError {
    fn from(error: StorageError) -> Self {
        ApplyError { error, commit: false }
    }
}

/// One durable transaction with all of `ops`; dropped (aborted) on any error.
fn apply<'a>(db: &Database, ops: impl Iterator<Item = &'a WriteOp>) -> Result<(), ApplyError> {
    let mut txn = db.begin_write().map_err(engine)?;
    txn.set_durability(Durability::Immediate);
    {
        let mut docs = txn.open_table(DOCUMENTS).map_err(engine)?;
        let mut deltas = txn.open_table(DELTAS).map_err(engine)?;
        let mut runs_t = txn.open_table(DELTA_RUNS).map_err(engine)?;
        let mut meta = txn.open_table(META).map_err(engine)?;
        let mut hints = txn.open_table(HINTS).map_err(engine)?;
        let mut versions = txn.open_table(VERSIONS).map_err(engine)?;
        // Open runs by document, written when broken (a gap, a snapshot) or at the end.
        let mut runs: HashMap<&'a str, Run> = HashMap::new();
        let put = |t: &mut redb::Table<(&str, u64), &[u8]>, doc: &str, run: Run| {
            t.insert((doc, run.last), run.buf.as_slice()).map(drop).map_err(engine)
        };
        for op in ops {
            match op {
                WriteOp::PutDelta { doc, seq, bytes } => {
                    let run = match runs.entry(doc.as_str()) {
                        Entry::Occupied(mut e) if e.get().last.checked_add(1) == Some(*seq) => {
                            e.get_mut().last = *seq;
                            e.into_mut()
                        }
                        Entry::Occupied(mut e) => {
                            let done = std::mem::replace(e.get_mut(), Run { last: *seq, buf: Vec::new() });
                            put(&mut runs_t, doc, done)?;
                            e.into_mut()
                        }
                        Entry::Vacant(e) => e.insert(Run { last: *seq, buf: Vec::new() }),
                    };
                    push_varint(&mut run.buf, bytes.len() as u64);
                    run.buf.extend_from_slice(bytes);
                }
                WriteOp::PutSnapshot { doc, bytes, truncate_through } => {
                    if let Some(run) = runs.remove(doc.as_str()) {
                        // A run the snapshot supersedes need not be written at all.
                        if truncate_through.is_none_or(|upto| run.last > upto) {
                            put(&mut runs_t, doc, run)?;
                        }
                    }
                    docs.insert(doc.as_str(), bytes.as_slice()).map_err(engine)?;
                    if let Some(upto) = truncate_through {
                        let range = (doc.as_str(), 0u64)..=(doc.as_str(), *upto);
                        deltas.retain_in(range.clone(), |_, _| false).map_err(engine)?;
                        runs_t.retain_in(range, |_, _| false).map_err(engine)?;
                    }
                }
                WriteOp::DeleteDoc { doc } => {
                    runs.remove(doc.as_str());
                    docs.remove(doc.as_str()).map_err(engine)?;
                    versions.remove(doc.as_str()).map_err(engine)?;
                    let range = (doc.as_str(), 0u64)..=(doc.as_str(), u64::MAX);
                    deltas.retain_in(range.clone(), |_, _| false).map_err(engine)?;
                    runs_t.retain_in(range, |_, _| false).map_err(engine)?;
                }
                WriteOp::PutVersion { doc, bytes } => {
                    versions.insert(doc.as_str(), bytes.as_slice()).map_err(engine)?;
                }
                WriteOp::PutMeta { key, bytes } => {
                    meta.insert(key.as_str(), bytes.as_slice()).map_err(engine)?;
                }
                WriteOp::PutHint { target, doc, id, bytes } => {
                    hints.insert((target.as_str(), doc.as_str(), *id), bytes.as_slice()).map_err(engine)?;
                }
                WriteOp::DeleteHint { target, doc, id } => {
                    hints.remove((target.as_str(), doc.as_str(), *id)).map_err(engine)?;
                }
            }
        }
        for (doc, run) in runs {
            put(&mut runs_t, doc, run)?;
        }
    }
    txn.commit().map_err(|e| ApplyError { error: engine(e), commit: true })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{config, disk_config, mutate, mutation, TempDir};
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_commits_and_survive_reopen() {
        let dir = TempDir::new("gc");
        let storage = Storage::open(&dir.0).unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..2000u64 {
            let s = storage.clone();
            tasks.spawn(
                async move { s.put_delta(format!("doc-{}", i % 10), i, i.to_le_bytes().to_vec()).await },
            );
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
        assert_eq!(storage.writes(), 2000);
        let commits = storage.commits();
        assert!(commits < 500, "group commit should share fsyncs: {commits} commits for 2000 writes");
        storage.close().await;
        drop(storage);

        let storage = Storage::open(&dir.0).unwrap();
        let docs = storage.list_docs().await.unwrap();
        assert_eq!(docs.len(), 10);
        let mut total = 0;
        for doc in &docs {
            let stored = storage.load_doc(doc.as_str()).await.unwrap();
            assert!(stored.snapshot.is_none());
            for (seq, bytes) in &stored.deltas {
                assert_eq!(bytes, &seq.to_le_bytes().to_vec());
                assert_eq!(format!("doc-{}", seq % 10), *doc);
            }
            total += stored.deltas.len();
        }
        assert_eq!(total, 2000);
        storage.close().await;
    }

    #[tokio::test]
    async fn snapshot_truncates_the_deltas_it_supersedes() {
        let dir = TempDir::new("snap");
        let s = Storage::open(&dir.0).unwrap();
        for seq in 1..=5 {
            s.put_delta("d", seq, vec![seq as u8]).await.unwrap();
        }
        s.put_delta("e", 1, vec![9]).await.unwrap();
        s.put_snapshot("d", b"snap".to_vec(), Some(3)).await.unwrap();
        let d = s.load_doc("d").await.unwrap();
        assert_eq!(d.snapshot.as_deref(), Some(&b"snap"[..]));
        assert_eq!(d.deltas, vec![(4, vec![4]), (5, vec![5])]);
        assert_eq!(s.load_doc("e").await.unwrap().deltas, vec![(1, vec![9])]);
        assert_eq!(s.list_docs().await.unwrap(), vec!["d", "e"]);

        s.write(vec![WriteOp::DeleteDoc { doc: "d".into() }]).await.unwrap();
        assert_eq!(s.load_doc("d").await.unwrap(), StoredDoc::default());
        assert_eq!(s.list_docs().await.unwrap(), vec!["e"]);
        s.close().await;
    }

    fn rows(s: &Storage, table: TableDefinition<(&str, u64), &[u8]>) -> Vec<(String, u64)> {
        let db = s.inner.db.read().unwrap().clone().unwrap();
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(table).unwrap();
        t.iter()
            .unwrap()
            .map(|e| {
                let (k, _) = e.unwrap();
                (k.value().0.to_string(), k.value().1)
            })
            .collect()
    }

    fn delta(doc: &str, seq: u64) -> WriteOp {
        WriteOp::PutDelta { doc: doc.into(), seq, bytes: format!("{doc}{seq}").into_bytes() }
    }

    fn expected(doc: &str, seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, Vec<u8>)> {
        seqs.into_iter().map(|q| (q, format!("{doc}{q}").into_bytes())).collect()
    }

    #[tokio::test]
    async fn consecutive_deltas_of_one_commit_share_one_row() {
        let dir = TempDir::new("runs");
        let s = Storage::open(&dir.0).unwrap();
        // Interleaved documents, and a gap in "a" (7 is missing): three runs.
        let ops =
            vec![delta("a", 1), delta("b", 1), delta("a", 2), delta("a", 3), delta("b", 2), delta("a", 8)];
        s.write(ops).await.unwrap();
        assert_eq!(rows(&s, DELTA_RUNS), vec![("a".into(), 3), ("a".into(), 8), ("b".into(), 2)]);
        assert!(rows(&s, DELTAS).is_empty());
        s.write(vec![delta("a", 9), delta("a", 10)]).await.unwrap();
        s.close().await;
        drop(s);

        let s = Storage::open(&dir.0).unwrap();
        assert_eq!(s.load_doc("a").await.unwrap().deltas, expected("a", [1, 2, 3, 8, 9, 10]));
        assert_eq!(s.load_doc("b").await.unwrap().deltas, expected("b", [1, 2]));
        assert_eq!(s.list_docs().await.unwrap(), vec!["a", "b"]);
        s.close().await;
    }

    #[tokio::test]
    async fn a_snapshot_deletes_only_runs_it_fully_supersedes() {
        let dir = TempDir::new("runs-snap");
        let s = Storage::open(&dir.0).unwrap();
        s.write(vec![delta("d", 1), delta("d", 2)]).await.unwrap();
        s.write(vec![delta("d", 3), delta("d", 4), delta("d", 5)]).await.unwrap();
        s.put_snapshot("d", b"snap".to_vec(), Some(4)).await.unwrap();
        // The run 3..=5 holds seq 5, which the snapshot lacks: it stays whole (re-applying
        // 3 and 4 over the snapshot is a no-op for a CRDT).
        assert_eq!(rows(&s, DELTA_RUNS), vec![("d".into(), 5)]);
        assert_eq!(s.load_doc("d").await.unwrap().deltas, expected("d", [3, 4, 5]));

        // In one transaction, deltas a snapshot supersedes are never written.
        s.write(vec![
            delta("d", 6),
            WriteOp::PutSnapshot { doc: "d".into(), bytes: b"snap2".to_vec(), truncate_through: Some(6) },
            delta("d", 7),
        ])
        .await
        .unwrap();
        assert_eq!(rows(&s, DELTA_RUNS), vec![("d".into(), 7)]);
        let d = s.load_doc("d").await.unwrap();
        assert_eq!((d.snapshot.as_deref(), d.deltas), (Some(&b"snap2"[..]), expected("d", [7])));
        s.close().await;
    }

    #[tokio::test]
    async fn rows_of_the_one_delta_per_row_table_are_still_read_and_truncated() {
        let dir = TempDir::new("runs-old");
        let s = Storage::open(&dir.0).unwrap();
        {
            let db = s.inner.db.read().unwrap().clone().unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(DELTAS).unwrap();
                for seq in 1..=3u64 {
                    t.insert(("old", seq), format!("old{seq}").as_bytes()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        s.write(vec![delta("old", 4), delta("old", 5)]).await.unwrap();
        assert_eq!(s.list_docs().await.unwrap(), vec!["old"]);
        assert_eq!(s.load_doc("old").await.unwrap().deltas, expected("old", 1..=5));
        s.put_snapshot("old", b"snap".to_vec(), Some(5)).await.unwrap();
        assert!(rows(&s, DELTAS).is_empty() && rows(&s, DELTA_RUNS).is_empty());
        s.write(vec![WriteOp::DeleteDoc { doc: "old".into() }]).await.unwrap();
        assert_eq!(s.load_doc("old").await.unwrap(), StoredDoc::default());
        s.close().await;
    }

    #[test]
    fn runs_split_back_into_their_deltas_and_malformed_ones_are_refused() {
        let mut buf = Vec::new();
        for d in [&b""[..], b"x", &[7u8; 300]] {
            push_varint(&mut buf, d.len() as u64);
            buf.extend_from_slice(d);
        }
        assert_eq!(buf[3..5], [0xac, 0x02], "300 as a varint");
        assert_eq!(split_run(&buf), Ok(vec![&b""[..], b"x", &[7u8; 300]]));
        assert_eq!(split_run(&[]), Ok(vec![]));
        let cut = buf.len() - 1;
        assert_eq!(split_run(&buf[..cut]), Err(RunError::CutDelta { at: 5, len: 300, left: 299 }));
        assert_eq!(split_run(&[0x80]), Err(RunError::CutLength(0)));
        assert_eq!(split_run(&[0xff; 11]), Err(RunError::LongLength(0)));
        assert_eq!(
            split_run(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02]),
            Err(RunError::LongLength(0))
        );
        assert_eq!(run_deltas(9, &buf), Ok(vec![(7, &b""[..]), (8, &b"x"[..]), (9, &[7u8; 300][..])]));
        assert_eq!(run_deltas(1, &buf), Err(RunError::TooMany { count: 3, last: 1 }));
        assert_eq!(run_deltas(u64::MAX, &[]), Ok(vec![]));
    }

    #[tokio::test]
    async fn hints_are_kept_per_target_and_survive_reopen() {
        let dir = TempDir::new("hints");
        let s = Storage::open(&dir.0).unwrap();
        let h1 = s.put_hint("b", "doc-1", b"one".to_vec()).await.unwrap();
        let h2 = s.put_hint("b", "doc-1", b"two".to_vec()).await.unwrap();
        let h3 = s.put_hint("c", "doc-2", b"three".to_vec()).await.unwrap();
        let h4 = s.put_hint("bb", "doc-3", b"four".to_vec()).await.unwrap();
        assert!(h1 < h2 && h2 < h3 && h3 < h4);
        let b = s.hints_for("b").await.unwrap();
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!(b[0].bytes, b"one");
        assert_eq!(s.hint_targets().await.unwrap(), vec!["b", "bb", "c"]);
        s.delete_hint("b", "doc-1", h1).await.unwrap();
        s.close().await;
        drop(s);

        let s = Storage::open(&dir.0).unwrap();
        let b = s.hints_for("b").await.unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].doc.as_str(), b[0].id), ("doc-1", h2));
        assert!(s.next_hint_id() > h4, "hint ids never repeat after a restart");
        s.close().await;
    }

    #[tokio::test]
    async fn meta_round_trips_and_batches_are_atomic() {
        let dir = TempDir::new("meta");
        let s = Storage::open(&dir.0).unwrap();
        assert_eq!(s.get_meta("replica_id").await.unwrap(), None);
        s.write(vec![
            WriteOp::PutMeta { key: "replica_id".into(), bytes: 42u64.to_le_bytes().to_vec() },
            WriteOp::PutDelta { doc: "x".into(), seq: 1, bytes: vec![1] },
        ])
        .await
        .unwrap();
        assert_eq!(s.commits(), 1);
        assert_eq!(s.get_meta("replica_id").await.unwrap(), Some(42u64.to_le_bytes().to_vec()));
        s.flush().await.unwrap();
        assert_eq!(s.commits(), 1, "a flush with nothing queued commits nothing");
        s.close().await;
        assert!(matches!(s.put_meta("k", vec![]).await, Err(StorageError::Closed)));
        assert!(matches!(s.get_meta("k").await, Err(StorageError::Closed)));
        s.close().await; // idempotent
    }

    #[tokio::test]
    async fn a_disk_that_refuses_writes_fails_them_keeps_reads_and_recovers_without_reopen() {
        let dir = TempDir::new("full");
        let s = Storage::open(&dir.0).unwrap();
        // A snapshot on pages of its own, which the writes below never touch.
        let snapshot: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        s.put_snapshot("cold", snapshot.clone(), None).await.unwrap();
        s.write(vec![delta("cold", 1), delta("cold", 2)]).await.unwrap();
        s.close().await;
        drop(s);

        // A fresh handle: nothing of "cold" is cached, reads go to the file. (redb
        // refuses reads of uncached pages after a failed commit: the read view serves
        // them.)
        let s = Storage::open(&dir.0).unwrap();
        s.write(vec![delta("hot", 1)]).await.unwrap();
        s.fail_writes(true);
        let err = s.write(vec![delta("hot", 2)]).await.unwrap_err();
        assert!(matches!(err, StorageError::Unavailable(_)), "{err}");
        let cold = s.load_doc("cold").await.unwrap();
        assert_eq!((cold.snapshot.as_ref(), cold.deltas), (Some(&snapshot), expected("cold", [1, 2])));
        assert_eq!(s.load_doc("hot").await.unwrap().deltas, expected("hot", [1]));
        assert_eq!(s.list_docs().await.unwrap(), vec!["cold", "hot"]);
        // Several writers in one batch: all refused, none half-written.
        let (a, b) = tokio::join!(s.write(vec![delta("hot", 3)]), s.write(vec![delta("other", 1)]));
        assert!(
            matches!(a, Err(StorageError::Unavailable(_))) && matches!(b, Err(StorageError::Unavailable(_)))
        );
        let commits = s.commits();

        s.fail_writes(false);
        s.write(vec![delta("hot", 4)]).await.unwrap();
        assert_eq!(s.commits(), commits + 1);
        assert_eq!(s.load_doc("hot").await.unwrap().deltas, expected("hot", [1, 4]));
        assert_eq!(s.load_doc("cold").await.unwrap().deltas, expected("cold", [1, 2]));
        assert!(!dir.0.join(PROBE_FILE).exists(), "the probe file is removed");
        s.close().await;
        drop(s);

        let s = Storage::open(&dir.0).unwrap();
        assert_eq!(s.load_doc("hot").await.unwrap().deltas, expected("hot", [1, 4]));
        assert_eq!(s.load_doc("cold").await.unwrap().snapshot, Some(snapshot));
        assert_eq!(s.list_docs().await.unwrap(), vec!["cold", "hot"]);
        s.close().await;
    }

    // ---- randomized: every stored record decodes or is refused with a typed error ----

    /// Encodes `deltas` as one `delta_runs` value.
    fn encode_run(deltas: &[Vec<u8>]) -> Vec<u8> {
        let mut buf = Vec::new();
        for d in deltas {
            push_varint(&mut buf, d.len() as u64);
            buf.extend_from_slice(d);
        }
        buf
    }

    /// What [`run_deltas`] must make of any `value`: deltas that tile it (each after a
    /// length prefix of one to ten bytes, the last ending with it) numbered up to `last`,
    /// or an error that says truly where and why.
    fn check_run(last: u64, value: &[u8]) -> Result<(), TestCaseError> {
        match run_deltas(last, value) {
            Ok(run) => {
                prop_assert_eq!(split_run(value).map(|r| r.len()), Ok(run.len()));
                let mut end = 0;
                for (i, (seq, d)) in run.iter().enumerate() {
                    prop_assert_eq!(*seq, last - (run.len() - 1 - i) as u64);
                    let start = d.as_ptr() as usize - value.as_ptr() as usize;
                    prop_assert!((end + 1..=end + 10).contains(&start), "prefix of {} bytes", start - end);
                    end = start + d.len();
                }
                prop_assert_eq!(end, value.len());
            }
            Err(RunError::CutLength(at)) => {
                prop_assert!(value.len() - at <= 9 && value[at..].iter().all(|b| b & 0x80 != 0));
            }
            Err(RunError::LongLength(at)) => prop_assert!(value.len() - at >= 10),
            Err(RunError::CutDelta { at, len, left }) => {
                prop_assert!(at + left == value.len() && len > left as u64);
            }
            Err(RunError::TooMany { count, last: l }) => prop_assert!(l == last && (count - 1) as u64 > last),
        }
        Ok(())
    }

    fn any_seq() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..8, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()]
    }

    /// Bytes rich in varint continuation bits and small lengths.
    fn run_bytes() -> impl Strategy<Value = Vec<u8>> {
        vec(prop_oneof![any::<u8>(), 0x80u8..=0xff, 0u8..4], 0..64)
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_bytes_split_into_deltas_or_a_typed_error(last in any_seq(), value in run_bytes()) {
            check_run(last, &value)?;
        }

        #[test]
        fn damaged_runs_split_into_deltas_or_a_typed_error(
            deltas in vec(vec(any::<u8>(), 0..300), 0..5),
            extra in 0u64..4,
            mutations in vec(mutation(), 1..4),
        ) {
            let mut value = encode_run(&deltas);
            let last = deltas.len() as u64 + extra;
            let whole = run_deltas(last, &value).map(|r| r.into_iter().map(|(_, d)| d.to_vec()).collect::<Vec<_>>());
            prop_assert_eq!(whole, Ok(deltas));
            for m in &mutations {
                mutate(&mut value, m);
            }
            check_run(last, &value)?;
            check_run(0, &value)?;
        }
    }

    /// Rows of one document as a damaged disk may hold them.
    #[derive(Debug, Clone)]
    struct Rows {
        snapshot: Option<Vec<u8>>,
        /// Rows of the one-delta-per-row table.
        single: Vec<(u64, Vec<u8>)>,
        /// `delta_runs` rows: key, value.
        runs: Vec<(u64, Vec<u8>)>,
    }

    fn rows_strategy() -> impl Strategy<Value = Rows> {
        let run = (0u64..40, vec(vec(any::<u8>(), 0..20), 0..4), vec(mutation(), 0..2)).prop_map(
            |(last, deltas, mutations)| {
                let mut value = encode_run(&deltas);
                for m in &mutations {
                    mutate(&mut value, m);
                }
                (last, value)
            },
        );
        let seq = prop_oneof![0u64..40, any_seq()];
        (
            prop::option::of(vec(any::<u8>(), 0..64)),
            vec((seq.clone(), vec(any::<u8>(), 0..8)), 0..4),
            vec(prop_oneof![run, (seq, run_bytes())], 0..4),
        )
            .prop_map(|(snapshot, single, runs)| Rows { snapshot, single, runs })
    }

    /// What `load_doc` must return for `rows`, by the format's definition.
    fn model(doc: &str, rows: &Rows) -> Result<StoredDoc, String> {
        let single: BTreeMap<u64, Vec<u8>> = rows.single.iter().cloned().collect();
        let runs: BTreeMap<u64, Vec<u8>> = rows.runs.iter().cloned().collect();
        let mut deltas: Vec<(u64, Vec<u8>)> = single.into_iter().collect();
        for (last, value) in &runs {
            match run_deltas(*last, value) {
                Ok(run) => deltas.extend(run.into_iter().map(|(q, d)| (q, d.to_vec()))),
                Err(e) => {
                    return Err(format!(
                        "stored run of deltas ending at {last} of {doc:?} is unreadable: {e}"
                    ))
                }
            }
        }
        // A seq in both tables: the one-delta row wins (it sorts first, stably).
        deltas.sort_by_key(|(q, _)| *q);
        deltas.dedup_by_key(|(q, _)| *q);
        Ok(StoredDoc { snapshot: rows.snapshot.clone(), deltas })
    }

    /// Damaged rows written straight into a real database: `load_doc` returns exactly
    /// what they hold, or `Corrupt` naming the damaged run — never panics, never skips.
    #[test]
    fn stored_rows_load_as_written_or_fail_as_corrupt() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = TempDir::new("rows");
        let s = Storage::open(&dir.0).unwrap();
        let db = s.inner.db.read().unwrap().clone().unwrap();
        let n = AtomicU64::new(0);
        let mut runner = proptest::test_runner::TestRunner::new(config());
        runner
            .run(&rows_strategy(), |rows| {
                let doc = format!("doc-{}", n.fetch_add(1, Ordering::Relaxed));
                let mut txn = db.begin_write().unwrap();
                // Visible to readers at once; syncing thousands of cases is not the point.
                txn.set_durability(Durability::None);
                {
                    if let Some(b) = &rows.snapshot {
                        txn.open_table(DOCUMENTS).unwrap().insert(doc.as_str(), b.as_slice()).unwrap();
                    }
                    let mut t = txn.open_table(DELTAS).unwrap();
                    for (seq, b) in &rows.single {
                        t.insert((doc.as_str(), *seq), b.as_slice()).unwrap();
                    }
                    let mut t = txn.open_table(DELTA_RUNS).unwrap();
                    for (last, b) in &rows.runs {
                        t.insert((doc.as_str(), *last), b.as_slice()).unwrap();
                    }
                }
                txn.commit().unwrap();
                match (rt.block_on(s.load_doc(doc.as_str())), model(&doc, &rows)) {
                    (Ok(got), Ok(want)) => prop_assert_eq!(got, want),
                    (Err(e @ StorageError::Corrupt { .. }), Err(want)) => {
                        prop_assert_eq!(e.to_string(), want)
                    }
                    (got, want) => prop_assert!(false, "got {:?}, want {:?}", got, want),
                }
                Ok(())
            })
            .unwrap();
        drop(db);
        rt.block_on(s.close());
    }

    proptest! {
        #![proptest_config(disk_config())]

        /// Hint records of any keys survive a reopen: each target gets exactly its own
        /// hints, and hint ids never repeat — not even after a damaged id of `u64::MAX`
        /// (it once overflowed on open).
        #[test]
        fn hint_records_of_any_keys_round_trip_and_ids_do_not_overflow(
            hints in vec((prop_oneof!["", "[ab]{1,3}", any::<String>()], any::<String>(), any_seq(), vec(any::<u8>(), 0..8)), 0..8),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let dir = TempDir::new("hint-keys");
            let want: BTreeMap<(String, String, u64), Vec<u8>> =
                hints.iter().map(|(t, d, id, b)| ((t.clone(), d.clone(), *id), b.clone())).collect();
            let (targets, got, next) = rt.block_on(async {
                let s = Storage::open(&dir.0).unwrap();
                let ops = hints
                    .iter()
                    .map(|(t, d, id, b)| WriteOp::PutHint { target: t.clone(), doc: d.clone(), id: *id, bytes: b.clone() })
                    .collect();
                s.write(ops).await.unwrap();
                s.close().await;
                drop(s);
                let s = Storage::open(&dir.0).unwrap();
                let targets = s.hint_targets().await.unwrap();
                let mut got = BTreeMap::new();
                for t in &targets {
                    for h in s.hints_for(t.as_str()).await.unwrap() {
                        got.insert((t.clone(), h.doc, h.id), h.bytes);
                    }
                }
                let next = s.next_hint_id();
                s.close().await;
                (targets, got, next)
            });
            let want_targets: BTreeSet<String> = want.keys().map(|(t, _, _)| t.clone()).collect();
            prop_assert_eq!(targets, want_targets.into_iter().collect::<Vec<_>>());
            let max = want.keys().map(|(_, _, id)| *id).max().unwrap_or(0);
            prop_assert_eq!(got, want);
            prop_assert_eq!(next, max.saturating_add(1));
        }
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_dir_is_refused() {
        let dir = TempDir::new("lock");
        let s = Storage::open(&dir.0).unwrap();
        let err = Storage::open(&dir.0).unwrap_err();
        assert!(matches!(err, StorageError::Open { .. }), "{err}");
        s.close().await;
    }
}
