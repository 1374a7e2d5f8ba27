//! Documents: named CRDT fields under one version vector.
//!
//! A [`Document`] maps keys to CRDT [`Field`]s. Every local mutation mints exactly one
//! [`Dot`] and yields a [`Delta`] `{ dot, key, payload }`; remote deltas are applied when
//! they are next in their replica's sequence and buffered until then, so the version
//! vector always means "every delta up to here is applied". A bounded delta log answers
//! "what happened since version vector X?" (or says it cannot reach back that far, and the
//! caller falls back to Merkle catch-up).
//!
//! All OR-Sets of a document share the document's causal context, as fields of Riak's
//! map share one clock: deltas stay small and no per-key context has to be kept.
//!
//! A key's type is fixed by its first write; writing another type locally is a
//! [`DocError::TypeMismatch`]. Two replicas that concurrently create one key with two
//! types both keep their data: the field of the smaller [`Kind`] is the key's value and
//! the other is kept beside it (as Riak maps key fields by name *and* type), so nothing
//! acknowledged is dropped and every replica reads the same thing.

use crate::codec::{self, put_bytes, put_seq, put_varint, tag, DecodeError, Reader, Wire, R};
use crate::gcounter::GCounter;
use crate::hash::{stable_hash, stable_hash_seeded};
use crate::hlc::{Hlc, Timestamp};
use crate::id::{Dot, ReplicaId, Span};
use crate::lww::LwwRegister;
use crate::merkle::{KeyTree, NodeId};
use crate::onevec::OneOrVec;
use crate::orset::{join_entries, validate_entries, Dots, OrSet};
use crate::pncounter::PnCounter;
use crate::sorted::{SortedMap, SortedSet};
use crate::traits::{Crdt, InvalidState};
use crate::value::Value;
use crate::vv::{CausalContext, VersionVector};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;

/// The CRDT type of a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// [`GCounter`].
    Counter,
    /// [`PnCounter`].
    PnCounter,
    /// [`LwwRegister`] of [`Value`].
    Register,
    /// [`OrSet`] of [`Value`].
    Set,
}

impl Kind {
    /// The name users see in errors.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::PnCounter => "pn-counter",
            Kind::Register => "register",
            Kind::Set => "set",
        }
    }
}

/// One CRDT value of a document (or a delta of one).
///
/// Sets stored in a document keep an empty context (the document's is used); a set inside
/// a [`Delta`] carries the delta's context.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Field {
    /// A grow-only counter.
    Counter(GCounter),
    /// An up/down counter.
    PnCounter(PnCounter),
    /// A last-writer-wins register.
    Register(LwwRegister<Value>),
    /// An add-wins set.
    Set(OrSet<Value>),
}

impl Field {
    /// Its type.
    pub fn kind(&self) -> Kind {
        match self {
            Field::Counter(_) => Kind::Counter,
            Field::PnCounter(_) => Kind::PnCounter,
            Field::Register(_) => Kind::Register,
            Field::Set(_) => Kind::Set,
        }
    }

    /// The bottom element of `kind`.
    pub fn empty(kind: Kind) -> Field {
        match kind {
            Kind::Counter => Field::Counter(GCounter::default()),
            Kind::PnCounter => Field::PnCounter(PnCounter::default()),
            Kind::Register => Field::Register(LwwRegister::default()),
            Kind::Set => Field::Set(OrSet::default()),
        }
    }

    /// Joins `theirs` into `self`; sets are judged against the given contexts. Fields of
    /// different kinds are never joined (the caller keeps them apart).
    fn join(&mut self, my_ctx: &CausalContext, theirs: &Field, their_ctx: &CausalContext) {
        match (self, theirs) {
            (Field::Counter(a), Field::Counter(b)) => a.merge(b),
            (Field::PnCounter(a), Field::PnCounter(b)) => a.merge(b),
            (Field::Register(a), Field::Register(b)) => a.merge(b),
            (Field::Set(a), Field::Set(b)) => join_entries(a.entries_mut(), my_ctx, b.entries(), their_ctx),
            _ => {}
        }
    }

    /// Joins another piece of the same key's state, as a state transfer splits a large
    /// set: pieces carry no context of their own, so elements of either survive (their
    /// union). Pieces of another kind are ignored, as in any join.
    pub fn absorb_piece(&mut self, piece: Field) {
        let none = CausalContext::default();
        self.join(&none, &piece, &none);
    }

    fn validate(&self) -> Result<(), InvalidState> {
        match self {
            Field::Counter(c) => c.validate(),
            Field::PnCounter(c) => c.validate(),
            Field::Register(r) => r.validate(),
            Field::Set(s) => s.validate(),
        }
    }

    /// The value as JSON-like data: counters as numbers, sets as sorted arrays.
    pub fn to_value(&self) -> Value {
        match self {
            Field::Counter(c) => Value::Int(i64::try_from(c.value()).unwrap_or(i64::MAX)),
            Field::PnCounter(c) => Value::Int(c.value()),
            Field::Register(r) => r.get().cloned().unwrap_or(Value::Null),
            Field::Set(s) => Value::Array(s.value()),
        }
    }
}

impl Wire for Field {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(self.kind() as u8);
        match self {
            Field::Counter(c) => c.put(out),
            Field::PnCounter(c) => c.put(out),
            Field::Register(r) => r.put(out),
            Field::Set(s) => s.put(out),
        }
    }

    fn read(r: &mut Reader<'_>) -> R<Self> {
        Ok(match r.varint()? {
            0 => Field::Counter(GCounter::read(r)?),
            1 => Field::PnCounter(PnCounter::read(r)?),
            2 => Field::Register(LwwRegister::read(r)?),
            3 => Field::Set(OrSet::read(r)?),
            _ => return Err("unknown field kind"),
        })
    }
}

/// One mutation: the dot that names it, the key it changed, and the CRDT delta
/// ([`DeltaBody`], read through `Deref`: `d.dot`, `d.key`, `d.payload`).
///
/// Shared, not copied: a delta is immutable once made, and the same one sits in the
/// document's log, in the [`crate::sync::Event::Applied`] a session hands back for
/// persisting and forwarding, and in the `Deltas` messages to every subscriber. Cloning is
/// a reference-count increment.
#[derive(Clone, PartialEq)]
pub struct Delta {
    body: Arc<DeltaBody>,
    /// The first sequence number this delta stands for: `dot.seq` for one write, lower
    /// for a run (see [`Delta::run`]). Outside the shared body, so a log can extend a run
    /// by the next write without copying it.
    first: u64,
}

/// The contents of a [`Delta`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeltaBody {
    /// Unique name of this mutation (the last, for a run).
    pub dot: Dot,
    /// The key it changed.
    pub key: String,
    /// The delta-state of the key's CRDT.
    pub payload: Field,
}

impl std::ops::Deref for Delta {
    type Target = DeltaBody;
    #[inline]
    fn deref(&self) -> &DeltaBody {
        &self.body
    }
}

impl From<DeltaBody> for Delta {
    fn from(b: DeltaBody) -> Delta {
        Delta { first: b.dot.seq, body: Arc::new(b) }
    }
}

impl fmt::Debug for Delta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delta")
            .field("dot", &self.dot)
            .field("first", &self.first)
            .field("key", &self.key)
            .field("payload", &self.payload)
            .finish()
    }
}

/// The serde form of a [`Delta`] is `(body, first)`.
impl Serialize for Delta {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (&*self.body, self.first).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Delta {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Delta, D::Error> {
        let (body, first) = <(DeltaBody, u64)>::deserialize(d)?;
        Ok(Delta { body: Arc::new(body), first })
    }
}

impl Delta {
    /// The delta of `dot` changing `key` by `payload`.
    pub fn new(dot: Dot, key: impl Into<String>, payload: Field) -> Delta {
        Delta::from(DeltaBody { dot, key: key.into(), payload })
    }

    /// The run of `dot.replica`'s writes `first..=dot.seq` to `key`, joined into
    /// `payload`: a delta-interval (Almeida et al., "Delta State Replicated Data Types",
    /// 2018, §5). A counter's or register's later write by the same replica subsumes its
    /// earlier ones, so the join of the run's payloads stands for every dot in it: a
    /// receiver at any sequence inside the run ends where applying the rest one by one
    /// would leave it. Sets never form runs (a set delta's causal context is its own
    /// dot); [`Delta::validate`] refuses one.
    pub fn run(first: u64, dot: Dot, key: impl Into<String>, payload: Field) -> Delta {
        Delta { first, body: Arc::new(DeltaBody { dot, key: key.into(), payload }) }
    }

    /// The first sequence number this delta stands for (`dot.seq` unless it is a run).
    #[inline]
    pub fn first(&self) -> u64 {
        self.first
    }

    /// The dots this delta stands for.
    #[inline]
    pub fn span(&self) -> Span {
        Span { replica: self.dot.replica, first: self.first, last: self.dot.seq }
    }

    /// Whether this delta stands for more than one write.
    #[inline]
    pub fn is_run(&self) -> bool {
        self.first != self.dot.seq
    }

    /// The same delta standing only for its dots from `first` on (`first` within them).
    fn starting_at(mut self, first: u64) -> Delta {
        self.first = self.first.max(first).min(self.dot.seq);
        self
    }

    /// The contents, to change: copied first if the delta is shared. [`Delta::first`]
    /// stays as it was (a run whose first dot ends up past its dot is refused by
    /// [`Delta::validate`]).
    pub fn body_mut(&mut self) -> &mut DeltaBody {
        Arc::make_mut(&mut self.body)
    }

    /// Checks a delta that came from outside: its payload's invariants, and for sets that
    /// it adds with its own dot only and its context covers that dot.
    pub fn validate(&self) -> Result<(), InvalidState> {
        if self.dot.seq == 0 {
            return Err(InvalidState("delta dot has sequence 0"));
        }
        if self.first == 0 || self.first > self.dot.seq {
            return Err(InvalidState("delta run does not end at its dot"));
        }
        if self.is_run() && matches!(self.payload, Field::Set(_)) {
            return Err(InvalidState("a set delta cannot stand for a run of dots"));
        }
        // The payload's own check covers a set's context and entries (in that order).
        self.payload.validate()?;
        if let Field::Set(s) = &self.payload {
            if s.entries().values().flat_map(Dots::as_slice).any(|d| *d != self.dot) {
                return Err(InvalidState("set delta adds with a dot other than its own"));
            }
        }
        Ok(())
    }

    /// Encodes with tag and version.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(tag::DELTA, self)
    }

    /// Decodes and validates.
    pub fn decode(bytes: &[u8]) -> Result<Delta, DecodeError> {
        let d: Delta = codec::decode(tag::DELTA, bytes)?;
        d.validate()?;
        Ok(d)
    }
}

impl Wire for Delta {
    fn put(&self, out: &mut Vec<u8>) {
        self.dot.put(out);
        put_bytes(out, self.key.as_bytes());
        self.payload.put(out);
        put_varint(out, self.dot.seq - self.first); // format 3: the run's earlier dots
    }

    fn read(r: &mut Reader<'_>) -> R<Self> {
        let (dot, key, payload) = (Dot::read(r)?, r.string()?, Field::read(r)?);
        let before = if r.format() >= 3 { r.varint()? } else { 0 };
        let first =
            dot.seq.checked_sub(before).filter(|f| *f > 0).ok_or("delta run starts before sequence 1")?;
        Ok(Delta::run(first, dot, key, payload))
    }
}

/// Why a document refused an operation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DocError {
    /// The key already holds another type.
    // `"{key}"`, not `{key:?}`: Debug-escaping strings pulls ~3 KB of Unicode tables into wasm.
    #[error("key \"{key}\" holds a {}, not a {}; use another key", .holds.name(), .wanted.name())]
    TypeMismatch {
        /// The key.
        key: String,
        /// Its type.
        holds: Kind,
        /// The type the write wanted.
        wanted: Kind,
    },
    /// Another replica has seen more of this replica's own events than this replica has:
    /// this replica lost state (restored from an old backup, a wiped store) and would
    /// reuse dots. Draw a new replica id and call [`Document::reidentify`] (Riak kv679).
    #[error("replica {replica} has lost data: a peer has seen its event {remote}, but it only knows up to {local}; draw a new replica id and call reidentify")]
    Amnesia {
        /// The replica that lost data (this one).
        replica: ReplicaId,
        /// What this replica knows of itself.
        local: u64,
        /// What a peer has seen of it.
        remote: u64,
    },
    /// A delta or state from outside breaks an invariant; nothing was applied.
    #[error("rejected input: {0}")]
    Invalid(#[from] InvalidState),
    /// A counter value out of range.
    #[error("{0}")]
    Range(&'static str),
}

/// What [`Document::apply`] did with a delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Applied, together with this many buffered deltas it unblocked.
    Applied(usize),
    /// Already applied before: ignored (applying twice is a no-op).
    Duplicate,
    /// Ahead of its replica's sequence: held until the gap is filled.
    Buffered,
    /// Ahead of its sequence and the buffer is full: dropped (a later sync resends it).
    Dropped,
}

/// Bounds of a document's in-memory bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocConfig {
    /// Deltas kept in the log for delta sync. Older ones are answered by Merkle catch-up.
    pub log_capacity: usize,
    /// Out-of-order deltas held while waiting for a gap to fill.
    pub pending_capacity: usize,
}

impl Default for DocConfig {
    fn default() -> Self {
        Self { log_capacity: 4096, pending_capacity: 16_384 }
    }
}

/// The keys of one [`stable_hash`], sorted by name: almost always exactly one, kept inline;
/// more only when hashes collide.
type Group = OneOrVec<(Box<str>, Slot)>;

/// The document's fields by key, ordered by (hash of the name, name): Merkle buckets are
/// ranges of it, and every replica iterates (and encodes) it in the same order.
///
/// A B-tree on the bare 64-bit hash, not on `(hash, name)`: a lookup compares integers
/// only (one string compare at the end), with no key to allocate or borrow.
#[derive(Clone, Debug, Default)]
struct FieldMap {
    groups: BTreeMap<u64, Group>,
    len: usize,
}

impl FieldMap {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, hash: u64, name: &str) -> Option<&Slot> {
        self.groups.get(&hash)?.iter().find(|(n, _)| **n == *name).map(|(_, s)| s)
    }

    /// The slot of `name`, made by `make` if the key is new.
    fn get_or_insert(&mut self, hash: u64, name: &str, make: impl FnOnce() -> Slot) -> &mut Slot {
        let g = self.groups.entry(hash).or_default();
        let i = match g.binary_search_by(|(n, _)| (**n).cmp(name)) {
            Ok(i) => i,
            Err(i) => {
                self.len += 1;
                g.insert(i, (name.into(), make()));
                i
            }
        };
        &mut g[i].1
    }

    /// The slot of `name` for a local write of `kind` (a new one if `name` is new), or
    /// `Err(holds)` when it holds another kind.
    fn for_write(&mut self, hash: u64, name: &str, kind: Kind) -> Result<&mut Slot, Kind> {
        let slot = self.get_or_insert(hash, name, || Slot {
            field: Field::empty(kind),
            others: Vec::new(),
            leaf: 0,
            queued: false,
        });
        match slot.field.kind() {
            k if k == kind => Ok(slot),
            holds => Err(holds),
        }
    }

    /// `(hash, name, slot)` in order.
    fn iter(&self) -> impl Iterator<Item = (u64, &str, &Slot)> {
        self.groups.iter().flat_map(|(&h, g)| g.iter().map(move |(n, s)| (h, &**n, s)))
    }

    /// `(hash, name, slot)` in order, mutably.
    fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &str, &mut Slot)> {
        self.groups.iter_mut().flat_map(|(&h, g)| g.iter_mut().map(move |(n, s)| (h, &**n, s)))
    }

    /// `(hash, name, slot)` of the keys whose hashes are in `lo..=hi`, in order.
    fn range(&self, lo: u64, hi: u64) -> impl Iterator<Item = (u64, &str, &Slot)> {
        self.groups.range(lo..=hi).flat_map(|(&h, g)| g.iter().map(move |(n, s)| (h, &**n, s)))
    }

    /// The keys of one hash, mutably.
    fn with_hash_mut(&mut self, hash: u64) -> impl Iterator<Item = (&str, &mut Slot)> {
        self.groups.get_mut(&hash).into_iter().flat_map(|g| g.iter_mut().map(|(n, s)| (&**n, s)))
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Slot {
    /// The key's value: the field of the smallest kind written to this key.
    field: Field,
    /// Fields of other kinds written concurrently by other replicas, by kind.
    others: Vec<Field>,
    /// Hash of all of the above, as last folded into the Merkle tree (0 = not yet).
    leaf: u64,
    /// Listed in [`Document`]'s `dirty` (so it is listed once).
    queued: bool,
}

impl Slot {
    /// Lists this slot's key (by `hash`) in `dirty` for the next Merkle update, once.
    fn queue(&mut self, hash: u64, dirty: &mut Vec<u64>) {
        if !self.queued {
            self.queued = true;
            dirty.push(hash);
        }
    }

    fn get_mut(&mut self, kind: Kind) -> Option<&mut Field> {
        if self.field.kind() == kind {
            return Some(&mut self.field);
        }
        self.others.iter_mut().find(|f| f.kind() == kind)
    }

    /// Adds a field of a kind this slot lacks, keeping the smallest kind primary.
    fn insert(&mut self, f: Field) {
        if f.kind() < self.field.kind() {
            let old = std::mem::replace(&mut self.field, f);
            self.others.push(old);
        } else {
            self.others.push(f);
        }
        crate::sort::sort_by(&mut self.others, |a, b| a.kind().cmp(&b.kind()));
    }

    fn fields(&self) -> impl Iterator<Item = &Field> {
        std::iter::once(&self.field).chain(self.others.iter())
    }
}

/// The delta log: recent deltas, evicted oldest first.
///
/// Each replica's deltas are applied in sequence order, so they sit in one queue per
/// replica, ascending: appending is a push, answering "since sequence n" a binary search,
/// evicting the oldest a pop. `order` says whose delta each entry was, oldest first.
#[derive(Clone, Debug, Default, PartialEq)]
struct DeltaLog {
    by_replica: SortedMap<ReplicaId, VecDeque<Delta>>,
    order: VecDeque<ReplicaId>,
    /// Per replica, the highest sequence the log can no longer serve.
    floor: VersionVector,
}

impl DeltaLog {
    /// Appends `d`, or extends the run it continues (see [`extend_run`]).
    fn push(&mut self, d: Delta, capacity: usize) {
        self.push_with(d, capacity, true);
    }

    /// Appends `d` as an entry of its own (a stored log is read back as it was written).
    fn push_stored(&mut self, d: Delta, capacity: usize) {
        self.push_with(d, capacity, false);
    }

    fn push_with(&mut self, d: Delta, capacity: usize, join: bool) {
        let r = d.dot.replica;
        if let Some(last) = self.by_replica.get_mut(&r).and_then(VecDeque::back_mut) {
            if last.dot.seq >= d.dot.seq {
                return; // only a corrupt stored log could get here: keep each queue ascending
            }
            if let Some(run) = extend_run(last, &d).filter(|_| join) {
                *last = run;
                return;
            }
        }
        if capacity == 0 {
            self.floor.raise(r, d.dot.seq);
            return;
        }
        // Evict before appending, so a full log's queues never grow: a log that was cloned
        // or decoded (its queues allocated to their length) would otherwise reallocate
        // and copy thousands of deltas on its first new one.
        while self.order.len() >= capacity {
            let Some(old) = self.order.pop_front() else { break };
            let Some(q) = self.by_replica.get_mut(&old) else { continue };
            if let Some(x) = q.pop_front() {
                self.floor.raise(old, x.dot.seq);
            }
            if q.is_empty() && old != r {
                self.by_replica.remove(&old);
            }
        }
        self.by_replica.entry_or_default(r).push_back(d);
        self.order.push_back(r);
    }

    /// The logged run this replica's next write (`first`, `key`, `payload`) continues:
    /// the end of `replica`'s queue, when [`continues_run`] says so.
    fn run_continued_by(
        &mut self,
        replica: ReplicaId,
        first: u64,
        key: &str,
        payload: &Field,
    ) -> Option<&mut Delta> {
        let last = self.by_replica.get_mut(&replica).and_then(VecDeque::back_mut)?;
        continues_run(last, first, key, payload).then_some(last)
    }

    /// The logged deltas of `r` with a sequence in `from + 1..=to`, ascending.
    fn range(&self, r: ReplicaId, from: u64, to: u64) -> impl Iterator<Item = &Delta> {
        self.by_replica.get(&r).into_iter().flat_map(move |q| {
            let start = q.partition_point(|d| d.dot.seq <= from);
            q.range(start..).take_while(move |d| d.dot.seq <= to)
        })
    }

    /// Every logged delta, oldest first.
    fn in_order(&self) -> Vec<&Delta> {
        let mut next: SortedMap<ReplicaId, usize> = SortedMap::new();
        let mut out = Vec::with_capacity(self.order.len());
        for r in &self.order {
            let i = next.entry_or_default(*r);
            if let Some(d) = self.by_replica.get(r).and_then(|q| q.get(*i)) {
                out.push(d);
            }
            *i += 1;
        }
        out
    }
}

/// Whether `later` holds everything `earlier` does, both being writes of one replica to
/// one counter or register (each such write does; a PN-counter's decrement after an
/// increment does not, and stays an entry of its own).
fn subsumes(earlier: &Field, later: &Field) -> bool {
    match (earlier, later) {
        (Field::Counter(a), Field::Counter(b)) => a.le(b),
        (Field::PnCounter(a), Field::PnCounter(b)) => a.le(b),
        (Field::Register(a), Field::Register(b)) => a.timestamp() <= b.timestamp(),
        _ => false,
    }
}

/// The causal context a delta with `payload` carries: a set delta's own (the dots it
/// adds and retires); counters and registers carry none.
fn context_of(payload: &Field) -> &CausalContext {
    static NONE: CausalContext = CausalContext { vv: VersionVector::new(), cloud: SortedSet::new() };
    match payload {
        Field::Set(s) => s.context(),
        _ => &NONE,
    }
}

/// Whether some element of `set` holds a dot for which `pred` is true.
fn holds_dot(set: &OrSet<Value>, pred: &dyn Fn(&Dot) -> bool) -> bool {
    set.entries().values().any(|ds| ds.as_slice().iter().any(pred))
}

/// Whether a write of `last.dot.replica` starting at `first` to `key` with `payload`
/// continues the run `last`: the following dot, the same key, and a payload that
/// subsumes `last`'s.
fn continues_run(last: &Delta, first: u64, key: &str, payload: &Field) -> bool {
    last.dot.seq.checked_add(1) == Some(first) && *last.key == *key && subsumes(&last.payload, payload)
}

/// `last` and `next` as one run, when `next` continues `last`.
fn extend_run(last: &Delta, next: &Delta) -> Option<Delta> {
    continues_run(last, next.first, &next.key, &next.payload)
        .then(|| Delta { body: next.body.clone(), first: last.first })
}

/// A named collection of CRDT fields with its version vector and delta log.
///
/// ```
/// use concord_core::{Document, ReplicaId, Value};
/// let mut a = Document::new(ReplicaId(1));
/// let mut b = Document::new(ReplicaId(2));
/// let d1 = a.increment("likes", 2).unwrap();
/// let d2 = b.set_add("tags", Value::from("rust")).unwrap();
/// b.apply(d1).unwrap();
/// a.apply(d2).unwrap();
/// assert_eq!(a.counter("likes"), 2);
/// assert_eq!(a.to_value(), b.to_value());
/// assert_eq!(a.version(), b.version());
/// ```
#[derive(Clone, Debug)]
pub struct Document {
    replica: ReplicaId,
    hlc: Hlc,
    fields: FieldMap,
    vv: VersionVector,
    ctx: CausalContext,
    log: DeltaLog,
    /// Out-of-order deltas: few, and a sorted `Vec` is less wasm than a B-tree. (An
    /// adversary sending 16k deltas in reverse order costs O(n) moves per insert.)
    pending: SortedMap<Dot, Delta>,
    tree: KeyTree,
    /// Hashes of the keys changed since the Merkle tree was last updated (hashes, not
    /// keys: listing one allocates nothing). A `Vec` rather than a set: `Slot::queued`
    /// keeps it free of duplicates (but for keys whose hashes collide), and a set type
    /// costs wasm code.
    dirty: Vec<u64>,
    config: DocConfig,
}

impl PartialEq for Document {
    /// Same replicated state: fields, version vector and context (not the replica's own
    /// bookkeeping such as its id, clock, log or buffers).
    fn eq(&self, other: &Self) -> bool {
        self.vv == other.vv
            && self.ctx == other.ctx
            && self.fields.len() == other.fields.len()
            && self.fields.iter().zip(other.fields.iter()).all(|((h1, k1, s1), (h2, k2, s2))| {
                h1 == h2 && k1 == k2 && s1.field == s2.field && s1.others == s2.others
            })
    }
}

impl Document {
    /// An empty document owned by `replica`.
    pub fn new(replica: ReplicaId) -> Self {
        Self::with_config(replica, DocConfig::default())
    }

    /// An empty document with explicit bounds.
    pub fn with_config(replica: ReplicaId, config: DocConfig) -> Self {
        Self {
            replica,
            hlc: Hlc::new(replica),
            fields: FieldMap::default(),
            vv: VersionVector::new(),
            ctx: CausalContext::default(),
            log: DeltaLog::default(),
            pending: SortedMap::new(),
            tree: KeyTree::default(),
            dirty: Vec::new(),
            config,
        }
    }

    /// The replica that mints this document's local dots.
    pub fn replica(&self) -> ReplicaId {
        self.replica
    }

    /// Every delta up to this vector has been applied.
    pub fn version(&self) -> &VersionVector {
        &self.vv
    }

    /// Every dot seen, including dots only known from set removals.
    pub fn context(&self) -> &CausalContext {
        &self.ctx
    }

    /// Number of deltas waiting for a gap to fill.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether no key has been written.
    pub fn is_empty(&self) -> bool {
        self.fields.len() == 0
    }

    /// The bounds this document was made with.
    pub fn config(&self) -> DocConfig {
        self.config
    }

    // ---- reading ----

    /// The field stored at `key`.
    pub fn get(&self, key: &str) -> Option<&Field> {
        self.fields.get(stable_hash(key.as_bytes()), key).map(|s| &s.field)
    }

    /// The type `key` holds, if written.
    pub fn kind_of(&self, key: &str) -> Option<Kind> {
        self.get(key).map(Field::kind)
    }

    /// Keys in the document's internal (hash) order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|(_, k, _)| k)
    }

    /// A G-Counter's value (0 when absent or another type).
    pub fn counter(&self, key: &str) -> u64 {
        match self.get(key) {
            Some(Field::Counter(c)) => c.value(),
            _ => 0,
        }
    }

    /// A PN-Counter's value (0 when absent or another type).
    pub fn pn_counter(&self, key: &str) -> i64 {
        match self.get(key) {
            Some(Field::PnCounter(c)) => c.value(),
            _ => 0,
        }
    }

    /// A register's value and the timestamp of the write that won.
    pub fn register(&self, key: &str) -> Option<(&Value, Timestamp)> {
        match self.get(key) {
            Some(Field::Register(r)) => r.get().zip(r.timestamp()),
            _ => None,
        }
    }

    /// A set's elements, sorted.
    pub fn set_values(&self, key: &str) -> Vec<Value> {
        match self.get(key) {
            Some(Field::Set(s)) => s.value(),
            _ => Vec::new(),
        }
    }

    /// Whether a set holds `v`.
    pub fn set_contains(&self, key: &str, v: &Value) -> bool {
        matches!(self.get(key), Some(Field::Set(s)) if s.contains(v))
    }

    /// The whole document as an object of plain values, keys sorted.
    pub fn to_value(&self) -> Value {
        // The names are unique; collecting sorts them once (they are in hash order here).
        Value::Object(self.fields.iter().map(|(_, k, s)| (k.to_string(), s.field.to_value())).collect())
    }

    // ---- writing locally ----

    fn next_dot(&self) -> Dot {
        self.vv.next_dot(self.replica)
    }

    /// A local write to `key`, which must hold `kind` or nothing: `make` builds the
    /// write's payload from the key's field (an empty one for a new key), the write's dot
    /// and the clock. The key is looked up once: the payload is joined into the field
    /// found, then logged. A type mismatch changes nothing, not even the clock.
    fn write_local(
        &mut self,
        key: &str,
        kind: Kind,
        make: &mut dyn FnMut(&Field, Dot, &mut Hlc) -> Field,
    ) -> Result<Delta, DocError> {
        let hash = stable_hash(key.as_bytes());
        let dot = self.next_dot();
        let slot = self.fields.for_write(hash, key, kind).map_err(|holds| DocError::TypeMismatch {
            key: key.to_owned(),
            holds,
            wanted: kind,
        })?;
        let payload = make(&slot.field, dot, &mut self.hlc);
        slot.field.join(&self.ctx, &payload, context_of(&payload));
        slot.queue(hash, &mut self.dirty);
        self.advance(Span { replica: dot.replica, first: dot.seq, last: dot.seq }, context_of(&payload));
        // The write continues the logged run and no one else holds its body (a replica
        // clicking one counter): the run takes it in place, no allocation per write.
        if let Some(run) = self.log.run_continued_by(dot.replica, dot.seq, key, &payload) {
            if let Some(body) = Arc::get_mut(&mut run.body) {
                body.dot = dot;
                body.payload = payload;
                return Ok(Delta { body: run.body.clone(), first: dot.seq });
            }
        }
        let delta = Delta::new(dot, key, payload);
        self.log.push(delta.clone(), self.config.log_capacity);
        Ok(delta)
    }

    /// Adds `n` to the G-Counter at `key`.
    pub fn increment(&mut self, key: &str, n: u64) -> Result<Delta, DocError> {
        let me = self.replica;
        self.write_local(key, Kind::Counter, &mut |f, _, _| {
            Field::Counter(match f {
                Field::Counter(c) => c.increment(me, n),
                _ => GCounter::default().increment(me, n),
            })
        })
    }

    /// Adds `n` (which may be negative) to the PN-Counter at `key`.
    pub fn pn_add(&mut self, key: &str, n: i64) -> Result<Delta, DocError> {
        let me = self.replica;
        self.write_local(key, Kind::PnCounter, &mut |f, _, _| {
            let empty = PnCounter::default();
            let c = if let Field::PnCounter(c) = f { c } else { &empty };
            Field::PnCounter(if n >= 0 {
                c.increment(me, n as u64)
            } else {
                c.decrement(me, n.unsigned_abs())
            })
        })
    }

    /// Writes the register at `key`, stamped by this replica's hybrid logical clock given
    /// the current wall-clock reading.
    pub fn set_register(&mut self, key: &str, value: Value, wall_millis: u64) -> Result<Delta, DocError> {
        let mut value = value;
        self.write_local(key, Kind::Register, &mut |_, _, hlc| {
            let ts = hlc.tick(wall_millis);
            Field::Register(LwwRegister::default().set(ts, std::mem::take(&mut value)))
        })
    }

    /// Adds `v` to the set at `key`.
    pub fn set_add(&mut self, key: &str, v: Value) -> Result<Delta, DocError> {
        let mut v = v;
        self.write_local(key, Kind::Set, &mut |f, dot, _| {
            Field::Set(match f {
                Field::Set(s) => s.add(dot, std::mem::take(&mut v)),
                _ => OrSet::default().add(dot, std::mem::take(&mut v)),
            })
        })
    }

    /// Removes `v` from the set at `key`, as observed here. Removing an absent element is
    /// a no-op that mints no dot (`Ok(None)`).
    pub fn set_remove(&mut self, key: &str, v: &Value) -> Result<Option<Delta>, DocError> {
        // Absent (no key, or not in the set): nothing to retire, no dot. A key of another
        // type goes on to `write_local`, which refuses it.
        match self.get(key) {
            None => return Ok(None),
            Some(Field::Set(s)) if !s.contains(v) => return Ok(None),
            _ => {}
        }
        // The remove's own dot enters the document's context when it is applied; the
        // delta's context holds only the dots it retires, which keeps joins cheap.
        self.write_local(key, Kind::Set, &mut |f, _, _| {
            Field::Set(match f {
                Field::Set(s) => s.remove(v),
                _ => OrSet::default(),
            })
        })
        .map(Some)
    }

    // ---- applying remote deltas ----

    /// Checks what a peer has seen of this replica: if it is ahead of what this replica
    /// knows of itself, this replica lost data.
    pub fn check_amnesia(&self, peer_version: &VersionVector) -> Result<(), DocError> {
        let remote = peer_version.get(self.replica);
        let local = self.vv.get(self.replica);
        if remote > local {
            return Err(DocError::Amnesia { replica: self.replica, local, remote });
        }
        Ok(())
    }

    /// Switches to a fresh replica id after [`DocError::Amnesia`]. Events made under the
    /// old id stay what they are; new ones use the new id.
    pub fn reidentify(&mut self, new_id: ReplicaId) {
        self.replica = new_id;
        let last = self.hlc.last();
        self.hlc = Hlc::new(new_id);
        self.hlc.observe(last);
    }

    /// Applies a delta from elsewhere: in sequence it is applied (with any buffered ones
    /// it unblocks), a duplicate is ignored, an early one is buffered. Invalid deltas and
    /// deltas that reveal amnesia are rejected without changing anything.
    pub fn apply(&mut self, delta: Delta) -> Result<Applied, DocError> {
        self.apply_into(delta, &mut Vec::new())
    }

    /// Checks a delta from elsewhere without applying it.
    pub fn check(&self, delta: &Delta) -> Result<(), DocError> {
        delta.validate()?;
        let dot = delta.dot;
        if dot.replica == self.replica && dot.seq > self.vv.get(self.replica) {
            return Err(DocError::Amnesia {
                replica: self.replica,
                local: self.vv.get(self.replica),
                remote: dot.seq,
            });
        }
        Ok(())
    }

    /// [`Document::apply`], also pushing a copy of every delta actually applied (the
    /// given one and the buffered ones it unblocked) onto `applied`, in order: what a
    /// relay must persist and forward.
    pub fn apply_into(&mut self, delta: Delta, applied: &mut Vec<Delta>) -> Result<Applied, DocError> {
        self.check(&delta)?;
        Ok(self.apply_checked(delta, applied))
    }

    /// [`Document::apply_into`] for a delta that already passed [`Document::check`] (a
    /// session checks a whole frame before applying any of it, and need not check twice).
    pub(crate) fn apply_checked(&mut self, delta: Delta, applied: &mut Vec<Delta>) -> Applied {
        let dot = delta.dot;
        let have = self.vv.get(dot.replica);
        if dot.seq <= have {
            return Applied::Duplicate;
        }
        // Next in sequence, or a run that reaches back to it (the part already seen is
        // cut off: joining it again would change nothing).
        if delta.first > have + 1 {
            if let Some(held) = self.pending.get_mut(&dot) {
                // The same last dot: keep the run that reaches further back.
                if delta.first < held.first {
                    *held = delta;
                }
                return Applied::Buffered;
            }
            if self.pending.len() >= self.config.pending_capacity {
                return Applied::Dropped;
            }
            self.pending.insert(dot, delta);
            return Applied::Buffered;
        }
        let delta = delta.starting_at(have + 1);
        applied.push(delta.clone());
        self.apply_now(delta);
        Applied::Applied(self.drain_pending(dot.replica, applied))
    }

    /// Applies the buffered deltas of `replica` that are now next in sequence. Keyed by
    /// their last dot, `replica`'s entries sit together in order: each round drops the
    /// ones the version covers, then applies the first if it reaches back to the next dot.
    fn drain_pending(&mut self, replica: ReplicaId, applied: &mut Vec<Delta>) -> usize {
        let mut n = 0;
        loop {
            let have = self.vv.get(replica);
            let start = self.pending.lower_bound(&Dot::new(replica, 0));
            let covered = self.pending.as_slice()[start..]
                .iter()
                .take_while(|(k, _)| k.replica == replica && k.seq <= have)
                .count();
            self.pending.drain_range(start..start + covered);
            let Some(&(k, ref d)) = self.pending.as_slice().get(start) else { break };
            if k.replica != replica || d.first > have.saturating_add(1) {
                break;
            }
            let Some(d) = self.pending.remove(&k) else { break };
            let d = d.starting_at(have + 1);
            applied.push(d.clone());
            self.apply_now(d);
            n += 1;
        }
        n
    }

    /// Joins a delta that is next in sequence, and logs it.
    fn apply_now(&mut self, delta: Delta) {
        self.join_delta(&delta);
        self.log.push(delta, self.config.log_capacity);
    }

    /// Joins a delta that is next in sequence into the fields and clocks.
    fn join_delta(&mut self, delta: &Delta) {
        let their_ctx = context_of(&delta.payload);
        self.join_field(&delta.key, Cow::Borrowed(&delta.payload), their_ctx);
        self.advance(delta.span(), their_ctx);
    }

    /// Records the dots of a delta just joined, and the context it carried, as seen.
    fn advance(&mut self, span: Span, their_ctx: &CausalContext) {
        self.vv.raise(span.replica, span.last);
        self.ctx.merge(their_ctx);
        self.ctx.insert_span(span);
    }

    /// Joins `theirs` into the field at `key`. An owned field (a peer's whole field, from
    /// a state transfer) that lands on a key this document lacks is moved in rather than
    /// joined into an empty field (a copy), unless it is a set holding a dot this document
    /// has seen (and so removed): the join drops that element.
    fn join_field(&mut self, key: &str, theirs: Cow<'_, Field>, their_ctx: &CausalContext) {
        if let Field::Register(r) = &*theirs {
            if let Some(ts) = r.timestamp() {
                self.hlc.observe(ts);
            }
        }
        let hash = stable_hash(key.as_bytes());
        let kind = theirs.kind();
        let mut new = false;
        let slot = self.fields.get_or_insert(hash, key, || {
            new = true;
            Slot { field: Field::empty(kind), others: Vec::new(), leaf: 0, queued: false }
        });
        let ctx = &self.ctx;
        let movable = new
            && match &theirs {
                Cow::Owned(Field::Set(s)) => !holds_dot(s, &|d| ctx.contains(*d)),
                Cow::Owned(_) => true,
                Cow::Borrowed(_) => false,
            };
        if movable {
            slot.field = theirs.into_owned();
        } else {
            match slot.get_mut(kind) {
                Some(f) => f.join(&self.ctx, &theirs, their_ctx),
                None => {
                    let mut f = Field::empty(kind);
                    f.join(&self.ctx, &theirs, their_ctx);
                    slot.insert(f);
                }
            }
        }
        // A set that ended empty still holds its key (its kind stays fixed).
        slot.queue(hash, &mut self.dirty);
    }

    // ---- delta sync ----

    /// Every delta this document has that `peer` lacks, in per-replica order, or `None`
    /// when the log no longer reaches back far enough (use Merkle catch-up).
    pub fn deltas_since(&self, peer: &VersionVector) -> Option<Vec<&Delta>> {
        let mut out = Vec::new();
        for (r, top) in self.vv.iter() {
            let have = peer.get(r);
            if have >= top {
                continue;
            }
            if have < self.log.floor.get(r) {
                return None;
            }
            out.extend(self.log.range(r, have, top));
        }
        Some(out)
    }

    /// Whether [`Document::deltas_since`] can answer `peer`.
    pub fn log_reaches(&self, peer: &VersionVector) -> bool {
        self.vv.iter().all(|(r, top)| peer.get(r) >= top || peer.get(r) >= self.log.floor.get(r))
    }

    /// The hashes of the keys changed by deltas applied since this document was at
    /// version `since`, or `None` when the log can no longer tell (it was trimmed, or
    /// state arrived by transfer). A Merkle catch-up uses it to check that the state of
    /// the keys it sends is still the state at the version it announced.
    pub fn keys_changed_since(&self, since: &VersionVector) -> Option<SortedSet<u64>> {
        let mut out = Vec::new();
        for (r, top) in self.vv.iter() {
            let from = since.get(r);
            if from >= top {
                continue;
            }
            if from < self.log.floor.get(r) {
                return None;
            }
            let mut n = 0;
            for d in self.log.range(r, from, top) {
                out.push(stable_hash(d.key.as_bytes()));
                n += 1;
            }
            if n != top - from {
                return None;
            }
        }
        Some(out.into_iter().collect())
    }

    // ---- state transfer (Merkle catch-up, full sync) ----

    /// The fields of `key_hashes` (every field whose key hashes to one of them), for a
    /// peer whose Merkle tree differs there.
    pub fn fields_by_hash(&self, key_hashes: &[u64]) -> Vec<(String, Field)> {
        let mut out = Vec::new();
        for &h in key_hashes {
            for (_, k, s) in self.fields.range(h, h) {
                out.extend(s.fields().map(|f| (k.to_string(), f.clone())));
            }
        }
        out
    }

    /// Every field, for a full-state transfer.
    pub fn all_fields(&self) -> Vec<(String, Field)> {
        self.fields.iter().flat_map(|(_, k, s)| s.fields().map(|f| (k.to_string(), f.clone()))).collect()
    }

    /// Joins `other`, a whole copy of this document from elsewhere (a snapshot, a state
    /// frame), into this one. A fresh document (no field, no dot seen, nothing buffered)
    /// with the same bounds ([`DocConfig`]) becomes `other` under its own replica id,
    /// copying nothing; otherwise by `other`'s deltas when its log reaches back, else by
    /// its state. Every part that can be joined is; the first refusal is returned.
    pub fn merge_document(&mut self, mut other: Document) -> Result<(), DocError> {
        let fresh = self.fields.len() == 0 && self.ctx.is_empty() && self.pending.is_empty();
        if fresh && self.config == other.config {
            other.reidentify(self.replica);
            *self = other;
            return Ok(());
        }
        if other.vv.le(&self.vv) {
            return Ok(());
        }
        match other.deltas_since(&self.vv) {
            Some(ds) => {
                let mut first = Ok(());
                for d in ds {
                    let res = self.apply(d.clone()).map(drop);
                    first = first.and(res);
                }
                first
            }
            None => self.merge_state(other.all_fields(), &other.ctx, &other.vv),
        }
    }

    /// Joins the whole state of a peer — every field it had at version `vv` (context
    /// `ctx`) — then adopts `vv`. Keys the peer did not send are keys it lacks, so it
    /// never saw a dot of them: they stay as they are. A field for a key this document
    /// lacks is moved in, not copied (see `join_field`).
    pub fn merge_state(
        &mut self,
        fields: Vec<(String, Field)>,
        ctx: &CausalContext,
        vv: &VersionVector,
    ) -> Result<(), DocError> {
        self.merge_fields(fields, ctx, vv, None)
    }

    /// Joins the fields a Merkle catch-up found different, sent by a peer whose state at
    /// version `vv` (context `ctx`) they are, then adopts `vv`.
    ///
    /// Every other key was found equal on both sides, but the descent takes round trips
    /// and this document keeps changing meanwhile: a key may have gained, after it was
    /// compared, a dot the peer had already removed (say an add that reached this side
    /// from a third replica after the comparison, whose remove the peer had applied).
    /// Adopting `vv` marks that remove as seen here, so it would never come again and the
    /// element would live on only on this side. `seen_when_equal(key_hash)` returns this
    /// document's context at the moment that key's subtree or bucket compared equal
    /// (`None` for keys that were asked for): a dot the peer had seen by `ctx`, which this
    /// side had not seen when the key was equal, cannot be in the peer's state — it was
    /// removed there, and is dropped here.
    pub fn merge_keys<'a>(
        &mut self,
        fields: Vec<(String, Field)>,
        ctx: &CausalContext,
        vv: &VersionVector,
        seen_when_equal: &dyn Fn(u64) -> Option<&'a CausalContext>,
    ) -> Result<(), DocError> {
        self.merge_fields(fields, ctx, vv, Some(seen_when_equal))
    }

    fn merge_fields<'a>(
        &mut self,
        fields: Vec<(String, Field)>,
        ctx: &CausalContext,
        vv: &VersionVector,
        seen_when_equal: Option<&dyn Fn(u64) -> Option<&'a CausalContext>>,
    ) -> Result<(), DocError> {
        ctx.validate().map_err(InvalidState)?;
        vv.validate().map_err(InvalidState)?;
        for (_, f) in &fields {
            match f {
                Field::Set(s) => {
                    if !s.context().is_empty() {
                        return Err(InvalidState("a set in a state transfer carries its own context").into());
                    }
                    validate_entries(s.entries(), ctx)?;
                }
                other => other.validate()?,
            }
        }
        if vv.get(self.replica) > self.vv.get(self.replica) {
            return Err(DocError::Amnesia {
                replica: self.replica,
                local: self.vv.get(self.replica),
                remote: vv.get(self.replica),
            });
        }
        // Keys the peer did not send need no join, except for dots gained since they
        // compared equal (see `merge_keys`). (Joining them with an empty set under `ctx`
        // would drop every dot the peer has seen.) This touches no key that was sent, so
        // it may come first, while `fields` can still be borrowed.
        if let Some(seen_when_equal) = seen_when_equal {
            let mut sent: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
            crate::sort::sort(&mut sent);
            for (hash, k, slot) in self.fields.iter_mut() {
                let Some(Field::Set(set)) = slot.get_mut(Kind::Set) else { continue };
                if sent.binary_search(&k).is_ok() {
                    continue;
                }
                let Some(then) = seen_when_equal(hash) else { continue };
                let gone = |d: &Dot| ctx.contains(*d) && !then.contains(*d);
                if !holds_dot(set, &gone) {
                    continue;
                }
                set.entries_mut().retain(|_, ds| {
                    let keep: Vec<Dot> = ds.as_slice().iter().copied().filter(|d| !gone(d)).collect();
                    *ds = match keep.len() {
                        1 => Dots::One(keep[0]),
                        _ => Dots::Many(keep),
                    };
                    !ds.is_empty()
                });
                slot.queue(hash, &mut self.dirty);
            }
        }
        for (key, f) in fields {
            self.join_field(&key, Cow::Owned(f), ctx);
        }
        for (r, s) in vv.iter() {
            if s > self.vv.get(r) {
                self.vv.raise(r, s);
                // The log cannot serve the sequences that arrived as state.
                self.log.floor.raise(r, s);
            }
        }
        self.ctx.merge(ctx);
        self.ctx.absorb(vv);
        let vv = &self.vv;
        self.pending.retain(|d, _| !vv.contains(*d));
        let replicas: Vec<ReplicaId> = self.vv.iter().map(|e| e.0).collect();
        for r in replicas {
            self.drain_pending(r, &mut Vec::new());
        }
        Ok(())
    }

    // ---- Merkle tree over keys ----

    fn leaf_hash(hash: u64, name: &str, slot: &Slot) -> u64 {
        // The encoding of `(name, [fields])`.
        let mut bytes = Vec::new();
        put_bytes(&mut bytes, name.as_bytes());
        put_varint(&mut bytes, 1 + slot.others.len() as u64);
        for f in slot.fields() {
            f.put(&mut bytes);
        }
        stable_hash_seeded(hash, &bytes) | 1
    }

    /// Folds pending changes into the Merkle tree and returns it.
    pub fn merkle(&mut self) -> &KeyTree {
        let dirty = std::mem::take(&mut self.dirty);
        for h in dirty {
            // Every queued key with this hash (names may collide).
            for (k, slot) in self.fields.with_hash_mut(h) {
                if slot.queued {
                    slot.queued = false;
                    let new = Self::leaf_hash(h, k, slot);
                    self.tree.update(h, slot.leaf, new);
                    slot.leaf = new;
                }
            }
        }
        &self.tree
    }

    /// `(key hash, leaf hash)` of every key in a bucket (call [`Document::merkle`] first).
    pub fn bucket_leaves(&self, bucket: NodeId) -> Vec<(u64, u64)> {
        let (lo, hi) = bucket.key_range();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (h, _, s) in self.fields.range(lo, hi) {
            match out.last_mut() {
                Some(last) if last.0 == h => last.1 ^= s.leaf,
                _ => out.push((h, s.leaf)),
            }
        }
        out
    }

    // ---- encoding ----

    /// Encodes the whole document (fields, clocks, delta log, buffered deltas).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(true)
    }

    /// Encodes the state only: fields and clocks, without the delta log and the buffered
    /// deltas, for a peer that merges it (a full-state transfer). It decodes with
    /// [`Document::decode`] as a document whose log answers nothing (its floor is the
    /// version), like one kept with `log_capacity: 0`. The log is most of a document
    /// that was written much (up to `log_capacity` deltas, each with its key and payload).
    pub fn encode_without_log(&self) -> Vec<u8> {
        self.encode_with(false)
    }

    fn encode_with(&self, log: bool) -> Vec<u8> {
        // Fields as `[(name, field)]`, then clocks, the log and the buffer.
        let mut out = vec![tag::DOCUMENT, codec::FORMAT_VERSION];
        self.replica.put(&mut out);
        self.hlc.last().put(&mut out);
        put_varint(&mut out, self.fields.iter().map(|(_, _, s)| 1 + s.others.len() as u64).sum());
        for (_, k, s) in self.fields.iter() {
            for f in s.fields() {
                put_bytes(&mut out, k.as_bytes());
                f.put(&mut out);
            }
        }
        self.vv.put(&mut out);
        self.ctx.put(&mut out);
        if !log {
            put_varint(&mut out, 0); // no logged deltas,
            self.vv.put(&mut out); // so the floor is the version,
            put_varint(&mut out, 0); // and nothing buffered
            return out;
        }
        let log = self.log.in_order();
        put_seq(&mut out, &log, |d, out| d.put(out));
        self.log.floor.put(&mut out);
        put_varint(&mut out, self.pending.len() as u64);
        for d in self.pending.values() {
            d.put(&mut out);
        }
        out
    }

    /// Decodes and validates a document written by [`Document::encode`].
    pub fn decode(bytes: &[u8], config: DocConfig) -> Result<Document, DecodeError> {
        let body = codec::check_header(tag::DOCUMENT, bytes)?;
        let r = DocRepr::parse(body).map_err(|e| DecodeError::Malformed(e.into()))?;
        r.vv.validate().map_err(InvalidState)?;
        r.ctx.validate().map_err(InvalidState)?;
        r.log_floor.validate().map_err(InvalidState)?;
        let mut doc = Document::with_config(r.replica, config);
        doc.hlc.observe(r.hlc);
        for (key, f) in r.fields {
            match &f {
                Field::Set(s) => validate_entries(s.entries(), &r.ctx)?,
                other => other.validate()?,
            }
            doc.join_field(&key, Cow::Owned(f), &r.ctx);
        }
        doc.vv = r.vv;
        doc.ctx = r.ctx;
        doc.log.floor = r.log_floor;
        for d in r.log {
            d.validate()?;
            doc.log.push_stored(d, config.log_capacity);
        }
        for d in r.pending {
            d.validate()?;
            if !doc.vv.contains(d.dot) && doc.pending.len() < config.pending_capacity {
                doc.pending.insert(d.dot, d);
            }
        }
        Ok(doc)
    }
}

struct DocRepr {
    replica: ReplicaId,
    hlc: Timestamp,
    fields: Vec<(String, Field)>,
    vv: VersionVector,
    ctx: CausalContext,
    log: Vec<Delta>,
    log_floor: VersionVector,
    pending: Vec<Delta>,
}

impl DocRepr {
    fn parse(mut body: Reader<'_>) -> R<DocRepr> {
        let r = &mut body;
        let repr = DocRepr {
            replica: ReplicaId::read(r)?,
            hlc: Timestamp::read(r)?,
            fields: r.seq(|r| Ok((r.string()?, Field::read(r)?)))?,
            vv: VersionVector::read(r)?,
            ctx: CausalContext::read(r)?,
            log: r.seq(Delta::read)?,
            log_floor: VersionVector::read(r)?,
            pending: r.seq(Delta::read)?,
        };
        if !r.is_empty() {
            return Err("trailing bytes");
        }
        Ok(repr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(n: u64) -> Slot {
        Slot {
            field: Field::Counter(GCounter::default().increment(ReplicaId(1), n)),
            others: Vec::new(),
            leaf: 0,
            queued: false,
        }
    }

    #[test]
    fn keys_whose_hashes_collide_are_kept_apart_in_name_order() {
        let mut m = FieldMap::default();
        // Hashes are passed in, so collisions can be made up.
        for (i, (h, name)) in
            [(7, "m"), (7, "z"), (3, "q"), (7, "a"), (7, "n"), (9, "b")].into_iter().enumerate()
        {
            m.get_or_insert(h, name, || slot(i as u64 + 1));
        }
        // Found again, not inserted twice.
        m.get_or_insert(7, "n", || unreachable!("exists")).leaf = 99;
        let order: Vec<(u64, &str)> = m.iter().map(|(h, n, _)| (h, n)).collect();
        assert_eq!(order, [(3, "q"), (7, "a"), (7, "m"), (7, "n"), (7, "z"), (9, "b")]);
        assert_eq!(m.len(), 6);
        assert_eq!(m.get(7, "n").map(|s| s.leaf), Some(99));
        assert_eq!(m.get(7, "a").map(|s| s.field.clone()), Some(slot(4).field));
        assert!(m.get(7, "b").is_none());
        assert!(m.get(8, "m").is_none());
        let in_range: Vec<&str> = m.range(4, 8).map(|(_, n, _)| n).collect();
        assert_eq!(in_range, ["a", "m", "n", "z"]);
        assert_eq!(m.with_hash_mut(7).count(), 4);
        assert_eq!(m.iter_mut().count(), 6);
    }
}
