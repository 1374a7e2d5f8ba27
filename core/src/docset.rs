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
//! The comparison is sans-IO, like the rest of the core: a [`DocSetDiff`] on one relay
//! produces [`DocSetQuery`]s; the other relay answers each with [`DocSet::answer`] (a pure
//! function of its set); the diff descends only into differing children and ends with the
//! [`Difference`]s. Shortcuts: a child that is empty on the remote side makes every local
//! document under it a difference without asking, and a child that is empty locally is
//! listed whole instead of descended. Lost answers are re-asked with
//! [`DocSetDiff::outstanding`]; duplicate or stale answers are ignored.
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

use crate::codec::{self, tag};
use crate::hash::{stable_hash, stable_hash_seeded};
use crate::merkle::{KeyTree, NodeId, DEPTH, FANOUT};
use crate::vv::VersionVector;
use serde::{Deserialize, Serialize};
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

    fn under(&self, node: NodeId) -> impl Iterator<Item = (u64, &str, u64)> {
        let (lo, hi) = node.key_range();
        self.index
            .range((lo, String::new())..)
            .take_while(move |((h, _), _)| *h <= hi)
            .map(|((h, id), d)| (*h, id.as_str(), *d))
    }

    /// Answers a peer's query from this set. Invalid node ids are skipped, so the
    /// answer to a confused or hostile query is merely short.
    pub fn answer(&self, query: &DocSetQuery) -> DocSetAnswer {
        DocSetAnswer {
            children: query
                .children
                .iter()
                .filter(|n| n.is_valid() && !n.is_bucket())
                .map(|&n| (n, self.children(n)))
                .collect(),
            docs: query.docs.iter().filter(|n| n.is_valid()).map(|&n| (n, self.bucket(n))).collect(),
        }
    }
}

/// What one side of a comparison asks the other.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocSetQuery {
    /// Inner nodes whose children's hashes are wanted.
    pub children: Vec<NodeId>,
    /// Nodes whose documents are wanted: differing buckets, or subtrees this side lacks.
    pub docs: Vec<NodeId>,
}

impl DocSetQuery {
    /// Whether there is nothing to ask.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty() && self.docs.is_empty()
    }

    /// Number of nodes asked about.
    pub fn len(&self) -> usize {
        self.children.len() + self.docs.len()
    }

    /// Splits into queries of at most `max_nodes` nodes each, to bound answer sizes.
    pub fn chunks(&self, max_nodes: usize) -> Vec<DocSetQuery> {
        let max = max_nodes.max(1);
        let mut out: Vec<DocSetQuery> = self
            .children
            .chunks(max)
            .map(|c| DocSetQuery { children: c.to_vec(), docs: Vec::new() })
            .collect();
        out.extend(self.docs.chunks(max).map(|d| DocSetQuery { children: Vec::new(), docs: d.to_vec() }));
        out
    }
}

/// The answer to a [`DocSetQuery`], from [`DocSet::answer`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocSetAnswer {
    /// Each asked inner node with its children's hashes.
    pub children: Vec<(NodeId, Vec<u64>)>,
    /// Each asked node with the `(id, digest)` of the documents under it.
    pub docs: Vec<(NodeId, Vec<(String, u64)>)>,
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
}

/// One comparison of the local [`DocSet`] with a remote one, as a state machine.
///
/// Start with [`DocSetDiff::start`], send each query, feed each answer to
/// [`DocSetDiff::step`], stop when [`DocSetDiff::is_done`]. With the fixed tree shape a
/// comparison takes at most [`DEPTH`] + 1 round trips. The local set should not change
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
    want_docs: BTreeSet<NodeId>,
    found: Vec<Difference>,
}

impl DocSetDiff {
    /// A new comparison and its first query (the root's children).
    pub fn start() -> (DocSetDiff, DocSetQuery) {
        let diff = DocSetDiff {
            want_children: BTreeSet::from([NodeId::ROOT]),
            want_docs: BTreeSet::new(),
            found: Vec::new(),
        };
        let query = diff.outstanding();
        (diff, query)
    }

    /// Whether every question has been answered: [`DocSetDiff::differences`] is final.
    pub fn is_done(&self) -> bool {
        self.want_children.is_empty() && self.want_docs.is_empty()
    }

    /// Every question still unanswered: send it again when answers were lost.
    pub fn outstanding(&self) -> DocSetQuery {
        DocSetQuery {
            children: self.want_children.iter().copied().collect(),
            docs: self.want_docs.iter().copied().collect(),
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
        let mut lists = Vec::new();
        for (node, docs) in answer.docs {
            if !self.want_docs.contains(&node) {
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
                } else if mine == 0 || child.is_bucket() {
                    if self.want_docs.insert(child) {
                        next.docs.push(child);
                    }
                } else if self.want_children.insert(child) {
                    next.children.push(child);
                }
            }
        }
        for (node, remote) in lists {
            if self.want_docs.remove(&node) {
                self.compare(local, node, remote);
            }
        }
        debug_assert!(next.children.iter().all(|n| n.level < DEPTH));
        Ok(next)
    }

    /// Merge-walks the local and remote listings of `node`, both in `(hash, id)` order.
    fn compare(&mut self, local: &DocSet, node: NodeId, remote: Vec<(u64, String, u64)>) {
        let mut mine = local.under(node).peekable();
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
