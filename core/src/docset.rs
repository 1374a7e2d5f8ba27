//! The document-set Merkle tree relays compare for anti-entropy.
//!
//! Each replica of a key range keeps a [`DocSet`]: `document id -> digest of its version
//! vector`. Two relays that share a range compare their sets and learn which documents
//! differ (or exist on one side only); they then sync only those documents, and within
//! each only the keys that differ (the per-document Merkle catch-up of
//! [`crate::sync::session`]).
//!
//! The idea is Dynamo's Merkle anti-entropy (DeCandia et al., "Dynamo: Amazon's Highly
//! Available Key-value Store", SOSP 2007, §4.7) in the form Riak KV uses for its tictac
//! active anti-entropy: the tree is a [`KeyTree`], where each node is the XOR of the leaf
//! hashes below it, so one document's change updates one root-to-bucket path in
//! O([`DEPTH`]) with no rehashing of siblings, and trees built in any order are equal node
//! for node. Documents are placed by [`stable_hash`] of their id — the ring's hash — so a
//! ring range is a set of contiguous subtrees.
//!
//! The comparison is sans-IO, like the rest of the core, and runs like the per-document
//! exchange: a [`DocSetDiff`] on one relay produces [`DocSetQuery`]s, the other relay
//! answers each with [`DocSet::answer`] (a pure function of its set), and the diff
//! descends only into differing children. A differing bucket comes back as
//! `(id hash, digest)` pairs, fixed-width on the wire; ids travel only for the hashes that
//! do not match (as the document exchange asks for keys by hash), so neither side touches
//! the ids of the documents that agree. The diff ends with the [`Difference`]s, in at most
//! [`DEPTH`] + 2 round trips. Shortcuts: a child that is empty on the remote side makes
//! every local document under it a difference without asking, and a child that is empty
//! locally is listed whole, ids included, instead of descended. Lost answers are re-asked
//! with [`DocSetDiff::outstanding`]; duplicate or stale answers are ignored.
//!
//! ```
//! use concord_core::docset::{DocSet, DocSetDiff};
//! use concord_core::{ReplicaId, VersionVector};
//!
//! let vv = |n| VersionVector::from_iter([(ReplicaId(1), n)]);
//! let (mut here, mut there) = (DocSet::new(), DocSet::new());
//! for i in 0..1000 {
//!     here.upsert(&format!("doc-{i}"), &vv(i + 1));
//!     there.upsert(&format!("doc-{i}"), &vv(i + 1));
//! }
//! there.upsert("doc-7", &vv(100)); // newer there
//! there.remove("doc-42"); // only here
//! there.upsert("fresh", &vv(1)); // only there
//!
//! let (mut diff, mut query) = DocSetDiff::start();
//! while !diff.is_done() {
//!     let answer = there.answer(&query); // in real life: over the wire to the other relay
//!     query = diff.step(&here, answer).unwrap();
//! }
//! let mut ids: Vec<&str> = diff.differences().iter().map(|d| d.id.as_str()).collect();
//! ids.sort();
//! assert_eq!(ids, ["doc-42", "doc-7", "fresh"]);
//! ```

use crate::codec::{self, put_bytes, put_varint, tag, Reader, Wire, R};
use crate::hash::{stable_hash, stable_hash_seeded};
use crate::merkle::{KeyTree, NodeId, DEPTH, FANOUT};
use crate::vv::VersionVector;
use std::cmp::Ordering;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};

/// The digest of a version vector: [`stable_hash`] of its canonical encoding.
///
/// ```
/// use concord_core::docset::version_digest;
/// use concord_core::{ReplicaId, VersionVector};
/// let a = VersionVector::from_iter([(ReplicaId(1), 3), (ReplicaId(2), 1)]);
/// let b = VersionVector::from_iter([(ReplicaId(2), 1), (ReplicaId(1), 3)]);
/// assert_eq!(version_digest(&a), version_digest(&b));
/// ```
pub fn version_digest(vv: &VersionVector) -> u64 {
    stable_hash(&codec::encode(tag::VERSION_VECTOR, vv))
}

/// Where a document sits in the tree: [`stable_hash`] of its id.
pub fn doc_hash(doc_id: &str) -> u64 {
    stable_hash(doc_id.as_bytes())
}

/// The leaf folded into the tree: depends on the whole id (so ids whose hashes collide
/// do not cancel out) and on the digest. Never 0, which the tree reserves for "empty".
fn leaf(doc_id: &str, digest: u64) -> u64 {
    stable_hash_seeded(digest, doc_id.as_bytes()) | 1
}

/// `document id -> version vector digest`, with its Merkle tree kept up to date.
///
/// Updates cost O(log n) for the index plus O([`DEPTH`]) for the tree.
///
/// ```
/// use concord_core::docset::DocSet;
/// use concord_core::{ReplicaId, VersionVector};
/// let mut a = DocSet::new();
/// let mut b = DocSet::new();
/// let vv = VersionVector::from_iter([(ReplicaId(1), 2)]);
/// a.upsert("x", &vv);
/// a.upsert("y", &vv);
/// b.upsert("y", &vv);
/// b.upsert("x", &vv);
/// assert_eq!(a.root(), b.root()); // order does not matter
/// a.remove("y");
/// assert_ne!(a.root(), b.root());
/// assert_eq!(a.len(), 1);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DocSet {
    tree: KeyTree,
    index: BTreeMap<(u64, String), u64>,
}

impl DocSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `doc_id` at version `vv`; returns the previous digest, if any.
    pub fn upsert(&mut self, doc_id: &str, vv: &VersionVector) -> Option<u64> {
        self.upsert_digest(doc_id, version_digest(vv))
    }

    /// Records `doc_id` with a digest computed by [`version_digest`] (for callers that
    /// store digests).
    pub fn upsert_digest(&mut self, doc_id: &str, digest: u64) -> Option<u64> {
        let h = doc_hash(doc_id);
        match self.index.entry((h, doc_id.to_owned())) {
            Entry::Occupied(mut e) => {
                let old = *e.get();
                if old != digest {
                    self.tree.update(h, leaf(doc_id, old), leaf(doc_id, digest));
                    e.insert(digest);
                }
                Some(old)
            }
            Entry::Vacant(e) => {
                e.insert(digest);
                self.tree.toggle(h, leaf(doc_id, digest));
                None
            }
        }
    }

    /// Forgets `doc_id`; returns its digest, if it was there.
    pub fn remove(&mut self, doc_id: &str) -> Option<u64> {
        let h = doc_hash(doc_id);
        let old = self.index.remove(&(h, doc_id.to_owned()))?;
        self.tree.toggle(h, leaf(doc_id, old));
        Some(old)
    }

    /// The digest recorded for `doc_id`.
    pub fn get(&self, doc_id: &str) -> Option<u64> {
        self.index.get(&(doc_hash(doc_id), doc_id.to_owned())).copied()
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// `(id, digest)` of every document, in tree (hash) order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.index.iter().map(|((_, id), d)| (id.as_str(), *d))
    }

    /// The Merkle tree.
    pub fn tree(&self) -> &KeyTree {
        &self.tree
    }

    /// The root hash: equal roots mean (with overwhelming probability) equal sets.
    pub fn root(&self) -> u64 {
        self.tree.root()
    }

    /// The hashes of the root's [`FANOUT`] children.
    pub fn root_children(&self) -> Vec<u64> {
        self.tree.children(NodeId::ROOT)
    }

    /// The hashes of `node`'s children (empty for a bucket).
    pub fn children(&self, node: NodeId) -> Vec<u64> {
        self.tree.children(node)
    }

    /// `(id, digest)` of the documents under `node` — a bucket, or a whole subtree — in
    /// hash order.
    pub fn bucket(&self, node: NodeId) -> Vec<(String, u64)> {
        self.under(node).map(|(_, id, d)| (id.to_owned(), d)).collect()
    }

    /// `(id hash, digest)` of the documents under `node`, in order: what a differing
    /// bucket is compared by.
    pub fn bucket_digests(&self, node: NodeId) -> Vec<(u64, u64)> {
        self.under(node).map(|(h, _, d)| (h, d)).collect()
    }

    /// `(id, digest)` of the documents whose ids hash to `hash` (almost always one).
    pub fn named(&self, hash: u64) -> Vec<(String, u64)> {
        self.with_hash(hash).map(|(id, d)| (id.to_owned(), d)).collect()
    }

    fn under(&self, node: NodeId) -> impl Iterator<Item = (u64, &str, u64)> {
        let (lo, hi) = node.key_range();
        self.index
            .range((lo, String::new())..)
            .take_while(move |((h, _), _)| *h <= hi)
            .map(|((h, id), d)| (*h, id.as_str(), *d))
    }

    fn with_hash(&self, hash: u64) -> impl Iterator<Item = (&str, u64)> {
        self.index
            .range((hash, String::new())..)
            .take_while(move |((h, _), _)| *h == hash)
            .map(|((_, id), d)| (id.as_str(), *d))
    }

    /// Answers a peer's query from this set. Invalid node ids are skipped, so the
    /// answer to a confused or hostile query is merely short.
    pub fn answer(&self, query: &DocSetQuery) -> DocSetAnswer {
        let valid = |n: &&NodeId| n.is_valid();
        DocSetAnswer {
            children: query
                .children
                .iter()
                .filter(|n| n.is_valid() && !n.is_bucket())
                .map(|&n| (n, self.children(n)))
                .collect(),
            buckets: query.buckets.iter().filter(valid).map(|&n| (n, self.bucket_digests(n))).collect(),
            lists: query.lists.iter().filter(valid).map(|&n| (n, self.bucket(n))).collect(),
            names: query.names.iter().map(|&h| (h, self.named(h))).collect(),
        }
    }
}

/// What one side of a comparison asks the other.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DocSetQuery {
    /// Inner nodes whose children's hashes are wanted.
    pub children: Vec<NodeId>,
    /// Differing buckets, wanted as `(id hash, digest)` pairs.
    pub buckets: Vec<NodeId>,
    /// Subtrees this side has nothing under, wanted as `(id, digest)` lists.
    pub lists: Vec<NodeId>,
    /// Id hashes whose `(id, digest)`s are wanted.
    pub names: Vec<u64>,
}

impl DocSetQuery {
    /// Whether there is nothing to ask.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of things asked about.
    pub fn len(&self) -> usize {
        self.children.len() + self.buckets.len() + self.lists.len() + self.names.len()
    }

    /// Every node id asked about.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeId> {
        self.children.iter().chain(&self.buckets).chain(&self.lists)
    }

    /// Splits into queries of at most `max` things each, to bound answer sizes.
    pub fn chunks(&self, max: usize) -> Vec<DocSetQuery> {
        let max = max.max(1);
        let mut out = Vec::new();
        let q = DocSetQuery::default;
        out.extend(self.children.chunks(max).map(|c| DocSetQuery { children: c.to_vec(), ..q() }));
        out.extend(self.buckets.chunks(max).map(|c| DocSetQuery { buckets: c.to_vec(), ..q() }));
        out.extend(self.lists.chunks(max).map(|c| DocSetQuery { lists: c.to_vec(), ..q() }));
        out.extend(self.names.chunks(max).map(|c| DocSetQuery { names: c.to_vec(), ..q() }));
        out
    }
}

/// Id hashes are random 64-bit values: fixed 8-byte words (a varint would take 10).
impl Wire for DocSetQuery {
    fn put(&self, out: &mut Vec<u8>) {
        self.children.put(out);
        self.buckets.put(out);
        self.lists.put(out);
        put_bytes(out, &words(&self.names));
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        Ok(DocSetQuery {
            children: Wire::read(r)?,
            buckets: Wire::read(r)?,
            lists: Wire::read(r)?,
            names: read_words(r)?,
        })
    }
}

/// The answer to a [`DocSetQuery`], from [`DocSet::answer`].
///
/// Encoded compactly: hashes as fixed 8-byte words (random 64-bit values take 10 bytes
/// as varints), each children list as a mask of its non-empty entries and then those. A
/// children list is always encoded as [`FANOUT`] hashes (missing ones count as empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DocSetAnswer {
    /// Each asked inner node with its children's hashes.
    pub children: Vec<(NodeId, Vec<u64>)>,
    /// Each asked bucket with the `(id hash, digest)` of its documents.
    pub buckets: Vec<(NodeId, Vec<(u64, u64)>)>,
    /// Each asked subtree with the `(id, digest)` of its documents.
    pub lists: Vec<(NodeId, Vec<(String, u64)>)>,
    /// Each asked id hash with the `(id, digest)` of the documents that have it.
    pub names: Vec<(u64, Vec<(String, u64)>)>,
}

/// Upper bounds of encoded sizes, for [`DocSetAnswer::split`]: an entry's key and length
/// prefix, a children entry, and a listed document beyond its id.
const ENTRY_BYTES: usize = 16;
const CHILDREN_BYTES: usize = ENTRY_BYTES + 2 + 8 * FANOUT;
const LISTED_BYTES: usize = 16;

impl DocSetAnswer {
    /// Number of entries and listed documents (what decoders bound).
    pub fn items(&self) -> usize {
        fn count<K, T>(v: &[(K, Vec<T>)]) -> usize {
            v.iter().map(|(_, xs)| 1 + xs.len()).sum()
        }
        self.children.len() + count(&self.buckets) + count(&self.lists) + count(&self.names)
    }

    /// Splits into parts whose encodings take at most about `max_bytes` each and hold at
    /// most `max_items` [`DocSetAnswer::items`], cutting long bucket and document lists
    /// between parts; [`DocSetAnswer::absorb`] of the parts in order gives the answer
    /// back. A part is never empty of entries, but one document longer than `max_bytes`
    /// still makes a part above it.
    pub fn split(self, max_bytes: usize, max_items: usize) -> Vec<DocSetAnswer> {
        let mut p = Parts { done: Vec::new(), cur: DocSetAnswer::default(), bytes: 0, items: 0 };
        let (max_bytes, max_items) = (max_bytes.max(1), max_items.max(2));
        for kids in self.children {
            p.room(CHILDREN_BYTES, 1, max_bytes, max_items);
            p.cur.children.push(kids);
        }
        pack(&mut p, self.buckets, |_| 16, |a| &mut a.buckets, max_bytes, max_items);
        pack(&mut p, self.lists, |(id, _)| id.len() + LISTED_BYTES, |a| &mut a.lists, max_bytes, max_items);
        pack(&mut p, self.names, |(id, _)| id.len() + LISTED_BYTES, |a| &mut a.names, max_bytes, max_items);
        p.done.push(p.cur);
        p.done
    }

    /// Appends a later part of the same answer (see [`DocSetAnswer::split`]): an entry
    /// that continues the last one of its kind is joined to it.
    pub fn absorb(&mut self, part: DocSetAnswer) {
        fn join<K: PartialEq, T>(into: &mut Vec<(K, Vec<T>)>, from: Vec<(K, Vec<T>)>) {
            for (k, mut xs) in from {
                match into.last_mut() {
                    Some((last, ys)) if *last == k => ys.append(&mut xs),
                    _ => into.push((k, xs)),
                }
            }
        }
        self.children.extend(part.children);
        join(&mut self.buckets, part.buckets);
        join(&mut self.lists, part.lists);
        join(&mut self.names, part.names);
    }
}

/// The parts [`DocSetAnswer::split`] has made, and the one it is filling.
struct Parts {
    done: Vec<DocSetAnswer>,
    cur: DocSetAnswer,
    bytes: usize,
    items: usize,
}

impl Parts {
    /// Makes room for `bytes` and `items` more, starting a new part when the current one
    /// is not empty and would overflow; returns whether it did.
    fn room(&mut self, bytes: usize, items: usize, max_bytes: usize, max_items: usize) -> bool {
        let fresh = self.items > 0 && (self.bytes + bytes > max_bytes || self.items + items > max_items);
        if fresh {
            self.done.push(std::mem::take(&mut self.cur));
            (self.bytes, self.items) = (0, 0);
        }
        self.bytes += bytes;
        self.items += items;
        fresh
    }
}

/// Adds `entries` to the parts, an entry continued in the next part when it overflows.
fn pack<K: Copy, T>(
    p: &mut Parts,
    entries: Vec<(K, Vec<T>)>,
    cost: impl Fn(&T) -> usize,
    field: impl Fn(&mut DocSetAnswer) -> &mut Vec<(K, Vec<T>)>,
    max_bytes: usize,
    max_items: usize,
) {
    for (k, xs) in entries {
        p.room(ENTRY_BYTES, 1, max_bytes, max_items);
        field(&mut p.cur).push((k, Vec::new()));
        for x in xs {
            if p.room(cost(&x), 1, max_bytes, max_items) {
                p.room(ENTRY_BYTES, 1, max_bytes, max_items);
                field(&mut p.cur).push((k, Vec::new()));
            }
            if let Some((_, ys)) = field(&mut p.cur).last_mut() {
                ys.push(x);
            }
        }
    }
}

fn words<'a>(ws: impl IntoIterator<Item = &'a u64>) -> Vec<u8> {
    ws.into_iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn unwords(bytes: &[u8]) -> Option<Vec<u64>> {
    let chunks = bytes.chunks_exact(8);
    if !chunks.remainder().is_empty() {
        return None;
    }
    Some(chunks.map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect())
}

/// A length-prefixed run of 8-byte words.
fn read_words(r: &mut Reader<'_>) -> R<Vec<u64>> {
    let n = r.varint()?;
    unwords(r.take(n)?).ok_or("a word list is a whole number of 8-byte words")
}

const _: () = assert!(FANOUT == 16, "children lists are encoded with a 16-bit mask");

/// A node's children as a 16-bit mask of the non-empty ones, then their hashes as words:
/// a full node costs 130 bytes, a sparse one 2 bytes plus 8 per child.
fn children_words(hashes: &[u64]) -> Vec<u8> {
    let kids = || hashes.iter().take(FANOUT);
    let mask = kids().enumerate().filter(|(_, h)| **h != 0).fold(0u16, |m, (i, _)| m | 1 << i);
    let mut out = mask.to_le_bytes().to_vec();
    out.extend(words(kids().filter(|h| **h != 0)));
    out
}

fn children_unwords(bytes: &[u8]) -> Option<Vec<u64>> {
    let (mask, rest) = bytes.split_first_chunk::<2>()?;
    let mask = u16::from_le_bytes(*mask);
    let present = unwords(rest)?;
    // One encoding per answer: as many words as set bits, and none of them empty.
    if present.len() != mask.count_ones() as usize {
        return None;
    }
    // Plain loops, not iterator chains: this is in the browser's decoder too.
    let (mut out, mut next) = (vec![0; FANOUT], present.into_iter());
    for (i, h) in out.iter_mut().enumerate() {
        if mask & (1 << i) != 0 {
            *h = next.next().filter(|w| *w != 0)?;
        }
    }
    Some(out)
}

/// Reads a sequence by calling `each` once per item: one copy of the loop for every
/// item type (generic sequences cost the browser's decoder code per type).
fn read_each<'a>(r: &mut Reader<'a>, each: &mut dyn FnMut(&mut Reader<'a>) -> R<()>) -> R<()> {
    for _ in 0..r.count()? {
        each(r)?;
    }
    Ok(())
}

/// `(id, digest)` listings.
fn read_listing(r: &mut Reader<'_>) -> R<Vec<(String, u64)>> {
    let mut out = Vec::new();
    read_each(r, &mut |r| {
        out.push((r.string()?, r.varint()?));
        Ok(())
    })?;
    Ok(out)
}

fn put_listing(out: &mut Vec<u8>, docs: &[(String, u64)]) {
    put_varint(out, docs.len() as u64);
    for (id, d) in docs {
        put_bytes(out, id.as_bytes());
        put_varint(out, *d);
    }
}

impl Wire for DocSetAnswer {
    fn put(&self, out: &mut Vec<u8>) {
        put_varint(out, self.children.len() as u64);
        for (n, hs) in &self.children {
            n.put(out);
            put_bytes(out, &children_words(hs));
        }
        put_varint(out, self.buckets.len() as u64);
        for (n, ps) in &self.buckets {
            n.put(out);
            put_bytes(out, &words(ps.iter().flat_map(|(h, d)| [h, d])));
        }
        put_varint(out, self.lists.len() as u64);
        for (n, docs) in &self.lists {
            n.put(out);
            put_listing(out, docs);
        }
        put_varint(out, self.names.len() as u64);
        for (h, docs) in &self.names {
            put_varint(out, *h);
            put_listing(out, docs);
        }
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        let mut a = DocSetAnswer::default();
        read_each(r, &mut |r| {
            let n = NodeId::read(r)?;
            let len = r.varint()?;
            let kids = children_unwords(r.take(len)?)
                .ok_or("a children list is a 16-bit mask of the non-empty hashes, then those")?;
            a.children.push((n, kids));
            Ok(())
        })?;
        read_each(r, &mut |r| {
            let n = NodeId::read(r)?;
            let ws = read_words(r)?;
            if ws.len() % 2 != 0 {
                return Err("a bucket is a whole number of (hash, digest) word pairs");
            }
            let mut pairs = Vec::with_capacity(ws.len() / 2);
            for p in ws.chunks_exact(2) {
                pairs.push((p[0], p[1]));
            }
            a.buckets.push((n, pairs));
            Ok(())
        })?;
        read_each(r, &mut |r| {
            let n = NodeId::read(r)?;
            a.lists.push((n, read_listing(r)?));
            Ok(())
        })?;
        read_each(r, &mut |r| {
            let h = r.varint()?;
            a.names.push((h, read_listing(r)?));
            Ok(())
        })?;
        Ok(a)
    }
}

/// A document whose digests differ between the two sides.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Difference {
    /// Document id.
    pub id: String,
    /// Digest on this side (`None`: only the remote side has it).
    pub local: Option<u64>,
    /// Digest on the remote side (`None`: only this side has it).
    pub remote: Option<u64>,
}

/// Why an answer was refused. The diff is unchanged and can carry on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    /// A node came back with the wrong number of children.
    #[error(
        "node {node:?} answered with {got} children, expected {FANOUT}; the peer uses another tree shape"
    )]
    Fanout {
        /// The node.
        node: NodeId,
        /// Children received.
        got: usize,
    },
    /// A document was listed under a node its id does not hash into.
    #[error("document {id:?} was listed under node {node:?}, which does not hold its hash; the peer's answer is corrupt")]
    OutOfRange {
        /// The node.
        node: NodeId,
        /// The document id.
        id: String,
    },
    /// A bucket listed an id hash outside its range.
    #[error("bucket {node:?} listed hash {hash:#018x}, which is outside it; the peer's answer is corrupt")]
    HashOutOfRange {
        /// The bucket.
        node: NodeId,
        /// The hash.
        hash: u64,
    },
    /// A document was named for a hash its id does not have.
    #[error("document {id:?} was named for hash {hash:#018x}, which is not its hash; the peer's answer is corrupt")]
    WrongName {
        /// The hash asked about.
        hash: u64,
        /// The document id.
        id: String,
    },
}

/// One comparison of the local [`DocSet`] with a remote one, as a state machine.
///
/// Start with [`DocSetDiff::start`], send each query, feed each answer to
/// [`DocSetDiff::step`], stop when [`DocSetDiff::is_done`]. With the fixed tree shape a
/// comparison takes at most [`DEPTH`] + 2 round trips. The local set should not change
/// meanwhile; if it does, the result may be stale, and the next periodic run fixes it.
///
/// ```
/// use concord_core::docset::{DocSet, DocSetDiff};
/// use concord_core::{ReplicaId, VersionVector};
/// let mut here = DocSet::new();
/// here.upsert("a", &VersionVector::from_iter([(ReplicaId(1), 1)]));
/// let there = DocSet::new();
/// let (mut diff, query) = DocSetDiff::start();
/// let next = diff.step(&here, there.answer(&query)).unwrap();
/// assert!(next.is_empty() && diff.is_done());
/// assert_eq!(diff.differences()[0].id, "a");
/// assert_eq!(diff.differences()[0].remote, None);
/// ```
#[derive(Clone, Debug, Default)]
pub struct DocSetDiff {
    want_children: BTreeSet<NodeId>,
    want_buckets: BTreeSet<NodeId>,
    want_lists: BTreeSet<NodeId>,
    want_names: BTreeSet<u64>,
    found: Vec<Difference>,
}

impl DocSetDiff {
    /// A new comparison and its first query (the root's children).
    pub fn start() -> (DocSetDiff, DocSetQuery) {
        let diff = DocSetDiff { want_children: BTreeSet::from([NodeId::ROOT]), ..DocSetDiff::default() };
        let query = diff.outstanding();
        (diff, query)
    }

    /// Whether every question has been answered: [`DocSetDiff::differences`] is final.
    pub fn is_done(&self) -> bool {
        self.want_children.is_empty()
            && self.want_buckets.is_empty()
            && self.want_lists.is_empty()
            && self.want_names.is_empty()
    }

    /// Every question still unanswered: send it again when answers were lost.
    pub fn outstanding(&self) -> DocSetQuery {
        DocSetQuery {
            children: self.want_children.iter().copied().collect(),
            buckets: self.want_buckets.iter().copied().collect(),
            lists: self.want_lists.iter().copied().collect(),
            names: self.want_names.iter().copied().collect(),
        }
    }

    /// The differing documents found so far, in discovery order.
    pub fn differences(&self) -> &[Difference] {
        &self.found
    }

    /// The differing documents, sorted by id.
    pub fn into_differences(self) -> Vec<Difference> {
        let mut v = self.found;
        v.sort();
        v
    }

    /// Takes an answer (possibly partial, duplicated or stale) and returns the next
    /// query; an empty query while not [`DocSetDiff::is_done`] means other answers are
    /// still due.
    pub fn step(&mut self, local: &DocSet, answer: DocSetAnswer) -> Result<DocSetQuery, DiffError> {
        // Check everything first, so a refused answer changes nothing.
        for (node, kids) in &answer.children {
            if self.want_children.contains(node) && kids.len() != FANOUT {
                return Err(DiffError::Fanout { node: *node, got: kids.len() });
            }
        }
        let mut buckets = Vec::new();
        for (node, mut pairs) in answer.buckets {
            if !self.want_buckets.contains(&node) {
                continue;
            }
            let (lo, hi) = node.key_range();
            if let Some(&(hash, _)) = pairs.iter().find(|&&(h, _)| h < lo || h > hi) {
                return Err(DiffError::HashOutOfRange { node, hash });
            }
            if !pairs.windows(2).all(|w| w[0] <= w[1]) {
                pairs.sort_unstable();
            }
            buckets.push((node, pairs));
        }
        let mut lists = Vec::new();
        for (node, docs) in answer.lists {
            if !self.want_lists.contains(&node) {
                continue;
            }
            let (lo, hi) = node.key_range();
            let mut remote = Vec::with_capacity(docs.len());
            for (id, digest) in docs {
                let h = doc_hash(&id);
                if h < lo || h > hi {
                    return Err(DiffError::OutOfRange { node, id });
                }
                remote.push((h, id, digest));
            }
            remote.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            remote.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
            lists.push((node, remote));
        }
        let mut names = Vec::new();
        for (hash, mut docs) in answer.names {
            if !self.want_names.contains(&hash) {
                continue;
            }
            if let Some((id, _)) = docs.iter().find(|(id, _)| doc_hash(id) != hash) {
                return Err(DiffError::WrongName { hash, id: id.clone() });
            }
            docs.sort_unstable();
            docs.dedup_by(|a, b| a.0 == b.0);
            names.push((hash, docs.into_iter().map(|(id, d)| (hash, id, d)).collect::<Vec<_>>()));
        }

        let mut next = DocSetQuery::default();
        for (node, theirs) in answer.children {
            if !self.want_children.remove(&node) {
                continue; // a duplicate or stale answer
            }
            for (child, theirs) in node.children().zip(theirs) {
                let mine = local.tree.node(child);
                if mine == theirs {
                    continue;
                }
                if theirs == 0 {
                    // Nothing there: everything here under `child` differs.
                    let only_here = local.under(child).map(|(_, id, d)| Difference {
                        id: id.to_owned(),
                        local: Some(d),
                        remote: None,
                    });
                    self.found.extend(only_here);
                } else if mine == 0 {
                    if self.want_lists.insert(child) {
                        next.lists.push(child);
                    }
                } else if child.is_bucket() {
                    if self.want_buckets.insert(child) {
                        next.buckets.push(child);
                    }
                } else if self.want_children.insert(child) {
                    next.children.push(child);
                }
            }
        }
        for (node, pairs) in buckets {
            if self.want_buckets.remove(&node) {
                self.compare_digests(local, node, &pairs, &mut next.names);
            }
        }
        for (node, remote) in lists {
            if self.want_lists.remove(&node) {
                self.compare_ids(local.under(node), remote);
            }
        }
        for (hash, remote) in names {
            if self.want_names.remove(&hash) {
                self.compare_ids(local.with_hash(hash).map(|(id, d)| (hash, id, d)), remote);
            }
        }
        debug_assert!(next.children.iter().all(|n| n.level < DEPTH));
        Ok(next)
    }

    /// Compares a bucket by `(id hash, digest)`, touching no id of a document that
    /// matches. A hash whose documents differ (or that only the remote side has) is
    /// settled by id once its names arrive: then even colliding ids come out right.
    fn compare_digests(&mut self, local: &DocSet, node: NodeId, remote: &[(u64, u64)], ask: &mut Vec<u64>) {
        let mut mine = local.under(node).peekable();
        let mut i = 0;
        loop {
            let h = match (mine.peek(), remote.get(i)) {
                (None, None) => break,
                (Some(&(mh, _, _)), None) => mh,
                (None, Some(&(th, _))) => th,
                (Some(&(mh, _, _)), Some(&(th, _))) => mh.min(th),
            };
            let (mut here, mut here_digest) = (0, 0);
            while let Some(&(_, _, d)) = mine.peek().filter(|e| e.0 == h) {
                (here, here_digest) = (here + 1, d);
                mine.next();
            }
            let start = i;
            while remote.get(i).is_some_and(|e| e.0 == h) {
                i += 1;
            }
            match (here, &remote[start..i]) {
                (_, []) => {
                    let only_here = local.with_hash(h).map(|(id, d)| Difference {
                        id: id.to_owned(),
                        local: Some(d),
                        remote: None,
                    });
                    self.found.extend(only_here);
                }
                (1, [(_, d)]) if *d == here_digest => {}
                _ => {
                    if self.want_names.insert(h) {
                        ask.push(h);
                    }
                }
            }
        }
    }

    /// Merge-walks local and remote `(hash, id, digest)` listings, both in order.
    fn compare_ids<'a>(
        &mut self,
        mine: impl Iterator<Item = (u64, &'a str, u64)>,
        remote: Vec<(u64, String, u64)>,
    ) {
        let mut mine = mine.peekable();
        let mut theirs = remote.into_iter().peekable();
        loop {
            let order = match (mine.peek(), theirs.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(&(mh, mid, _)), Some((th, tid, _))) => (mh, mid).cmp(&(*th, tid.as_str())),
            };
            match order {
                Ordering::Less => {
                    if let Some((_, id, d)) = mine.next() {
                        self.found.push(Difference { id: id.to_owned(), local: Some(d), remote: None });
                    }
                }
                Ordering::Greater => {
                    if let Some((_, id, d)) = theirs.next() {
                        self.found.push(Difference { id, local: None, remote: Some(d) });
                    }
                }
                Ordering::Equal => {
                    if let (Some((_, _, md)), Some((_, id, td))) = (mine.next(), theirs.next()) {
                        if md != td {
                            self.found.push(Difference { id, local: Some(md), remote: Some(td) });
                        }
                    }
                }
            }
        }
    }
}
