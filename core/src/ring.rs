//! Consistent hashing: which relays hold a document.
//!
//! The ring of Karger et al. ("Consistent Hashing and Random Trees", STOC 1997) as Dynamo
//! uses it (DeCandia et al., "Dynamo: Amazon's Highly Available Key-value Store", SOSP
//! 2007, §4.2-4.3): a 64-bit hash space; every node places `weight x vnodes` tokens on it
//! (token `i` of node `id` is [`Ring::token`]`(id, i)`); a document sits at
//! [`Ring::position`] (the [`stable_hash`] of its id, the same place the document-set
//! Merkle tree puts it, so a ring range is a run of contiguous subtrees). Walking
//! clockwise from there and skipping nodes already met gives the document's
//! [`Ring::walk`]; its first N entries are the **preference list**, the N distinct
//! physical nodes that own the document.
//!
//! Adding a node only inserts it into some walks, and removing one only takes it out:
//! the order of the other nodes never changes, so about `1/nodes` of the documents move.
//! Virtual nodes spread each node's share over many small ranges, which keeps the load
//! even (the relative spread is about `1/sqrt(weight x vnodes)`) and spreads a leaving
//! node's load over all the others. Tokens are derived from the node id alone, so every
//! relay computes the same ring from the same configuration, with no claim protocol to
//! get wrong.
//!
//! ```
//! use concord_core::ring::{Ring, RingNode};
//! let ring = Ring::new(&[RingNode::new("a", 1), RingNode::new("b", 1), RingNode::new("c", 2)], 64);
//! let owners = ring.preference_list("board-1", 2);
//! assert_eq!(owners.len(), 2);
//! assert_ne!(owners[0], owners[1]);
//! assert_eq!(ring.walk("board-1")[..2], owners[..]);
//! assert!(ring.owns(owners[1], "board-1", 2));
//! ```

use crate::hash::{stable_hash, stable_hash_seeded};

/// The most tokens one node may place (`weight x vnodes`); [`Ring::new`] clamps to it and
/// [`Ring::try_new`] refuses more.
pub const MAX_TOKENS_PER_NODE: u64 = 1 << 16;

/// A member of the ring as configured: its id and its relative capacity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RingNode {
    /// The node's unique id (`node_id` in the relay configuration).
    pub id: String,
    /// Relative capacity: a node of weight 2 owns about twice as much as one of weight 1;
    /// a node of weight 0 is a member that owns nothing.
    pub weight: u32,
}

impl RingNode {
    /// A node with the given id and weight.
    ///
    /// ```
    /// use concord_core::ring::RingNode;
    /// assert_eq!(RingNode::new("a", 2).weight, 2);
    /// ```
    pub fn new(id: impl Into<String>, weight: u32) -> RingNode {
        RingNode { id: id.into(), weight }
    }
}

/// Why [`Ring::try_new`] refused a configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// No node at all.
    #[error("the ring has no nodes; configure at least one [[cluster.nodes]]")]
    NoNodes,
    /// `vnodes` is zero.
    #[error("vnodes is 0; use a positive number such as 64")]
    ZeroVnodes,
    /// A node id is empty.
    #[error("a node has an empty id; give every node a unique id")]
    EmptyId,
    /// Two nodes share an id.
    #[error("node id {0:?} appears twice; node ids must be unique")]
    DuplicateId(String),
    /// Every node has weight 0, so nobody would own anything.
    #[error("every node has weight 0; give at least one node a positive weight")]
    NoWeight,
    /// `weight x vnodes` is too large.
    #[error("node {node:?} would place {tokens} tokens (weight x vnodes); the limit is {limit}: lower its weight or vnodes")]
    TooManyTokens {
        /// The node.
        node: String,
        /// `weight x vnodes`.
        tokens: u64,
        /// [`MAX_TOKENS_PER_NODE`].
        limit: u64,
    },
}

/// A consistent-hashing ring of physical nodes with virtual-node tokens.
///
/// Immutable: a membership change builds a new ring (cheap: sorting the tokens).
///
/// ```
/// use concord_core::ring::{Ring, RingNode};
/// let nodes: Vec<RingNode> = ["a", "b", "c", "d"].iter().map(|id| RingNode::new(*id, 1)).collect();
/// let ring = Ring::new(&nodes, 64);
/// assert_eq!(ring.nodes().collect::<Vec<_>>(), ["a", "b", "c", "d"]);
/// assert_eq!(ring.walk("doc").len(), 4); // every node, clockwise from the document
/// let three = ring.preference_list("doc", 3);
/// assert!(ring.owns(three[2], "doc", 3));
/// assert_eq!(ring.preference_list("doc", 9).len(), 4); // never more than there are nodes
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    ids: Vec<String>,
    weights: Vec<u32>,
    /// `(token, index into ids)`, sorted; ties broken by configuration order.
    tokens: Vec<(u64, u32)>,
    /// Nodes that placed at least one token.
    owning: usize,
    vnodes: u32,
}

impl Ring {
    /// Builds the ring. Never fails: a repeated id keeps its first entry, and a node's
    /// tokens are clamped to [`MAX_TOKENS_PER_NODE`]. Validate configuration from disk
    /// with [`Ring::try_new`] to tell the operator instead.
    pub fn new(nodes: &[RingNode], vnodes: u32) -> Ring {
        let mut ids: Vec<String> = Vec::with_capacity(nodes.len());
        let mut weights = Vec::with_capacity(nodes.len());
        for n in nodes {
            if !ids.contains(&n.id) {
                ids.push(n.id.clone());
                weights.push(n.weight);
            }
        }
        let mut tokens = Vec::new();
        let mut owning = 0;
        for (idx, (id, w)) in ids.iter().zip(&weights).enumerate() {
            let count = (u64::from(*w) * u64::from(vnodes)).min(MAX_TOKENS_PER_NODE);
            if count > 0 {
                owning += 1;
            }
            // `count` fits in u32 because of the clamp.
            tokens.extend((0..count as u32).map(|i| (Ring::token(id, i), idx as u32)));
        }
        tokens.sort_unstable();
        Ring { ids, weights, tokens, owning, vnodes }
    }

    /// [`Ring::new`] for configuration that came from outside: refuses no nodes, zero
    /// vnodes, empty or repeated ids, all weights zero, and too many tokens per node.
    ///
    /// ```
    /// use concord_core::ring::{Ring, RingError, RingNode};
    /// let twice = [RingNode::new("a", 1), RingNode::new("a", 1)];
    /// assert_eq!(Ring::try_new(&twice, 64), Err(RingError::DuplicateId("a".into())));
    /// assert!(Ring::try_new(&[RingNode::new("a", 1)], 64).is_ok());
    /// ```
    pub fn try_new(nodes: &[RingNode], vnodes: u32) -> Result<Ring, RingError> {
        if nodes.is_empty() {
            return Err(RingError::NoNodes);
        }
        if vnodes == 0 {
            return Err(RingError::ZeroVnodes);
        }
        for (i, n) in nodes.iter().enumerate() {
            if n.id.is_empty() {
                return Err(RingError::EmptyId);
            }
            if nodes[..i].iter().any(|m| m.id == n.id) {
                return Err(RingError::DuplicateId(n.id.clone()));
            }
            let tokens = u64::from(n.weight) * u64::from(vnodes);
            if tokens > MAX_TOKENS_PER_NODE {
                return Err(RingError::TooManyTokens {
                    node: n.id.clone(),
                    tokens,
                    limit: MAX_TOKENS_PER_NODE,
                });
            }
        }
        if nodes.iter().all(|n| n.weight == 0) {
            return Err(RingError::NoWeight);
        }
        Ok(Ring::new(nodes, vnodes))
    }

    /// Token `i` of node `node_id`: the stable hash of `(node_id, i)`.
    ///
    /// ```
    /// use concord_core::ring::Ring;
    /// assert_eq!(Ring::token("a", 0), Ring::token("a", 0));
    /// assert_ne!(Ring::token("a", 0), Ring::token("a", 1));
    /// ```
    pub fn token(node_id: &str, i: u32) -> u64 {
        stable_hash_seeded(u64::from(i), node_id.as_bytes())
    }

    /// Where a document sits on the ring: the stable hash of its id (equal to
    /// [`crate::docset::doc_hash`]).
    pub fn position(doc_id: &str) -> u64 {
        stable_hash(doc_id.as_bytes())
    }

    /// Every configured node, in configuration order (weight-0 nodes included).
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.ids.iter().map(String::as_str)
    }

    /// Number of configured nodes.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no node is configured.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether `node` is a member.
    pub fn contains(&self, node: &str) -> bool {
        self.ids.iter().any(|id| id == node)
    }

    /// The weight of `node`, if it is a member.
    pub fn weight(&self, node: &str) -> Option<u32> {
        self.ids.iter().position(|id| id == node).map(|i| self.weights[i])
    }

    /// Tokens per unit of weight.
    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    /// Number of tokens on the ring.
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// Every token in ring order with its node (for showing the ring).
    ///
    /// ```
    /// use concord_core::ring::{Ring, RingNode};
    /// let ring = Ring::new(&[RingNode::new("a", 1), RingNode::new("b", 2)], 8);
    /// assert_eq!(ring.tokens().filter(|(_, node)| *node == "b").count(), 16);
    /// assert!(ring.tokens().zip(ring.tokens().skip(1)).all(|(x, y)| x.0 <= y.0));
    /// ```
    pub fn tokens(&self) -> impl Iterator<Item = (u64, &str)> {
        self.tokens.iter().map(|&(t, idx)| (t, self.ids[idx as usize].as_str()))
    }

    /// Number of nodes that own some range (weight above 0): the longest possible walk.
    pub fn owning_nodes(&self) -> usize {
        self.owning
    }

    /// Every distinct owning node, clockwise from `doc_id`'s position (wrapping around):
    /// the owners first, then the fallbacks in the order a sloppy quorum takes them.
    pub fn walk(&self, doc_id: &str) -> Vec<&str> {
        self.walk_from(Ring::position(doc_id))
    }

    /// The first `n` entries of [`Ring::walk`]: the nodes that own `doc_id` when it is
    /// kept `n` times (fewer when the ring has fewer owning nodes).
    pub fn preference_list(&self, doc_id: &str, n: usize) -> Vec<&str> {
        self.preference_list_at(Ring::position(doc_id), n)
    }

    /// Whether `node` is among the `n` owners of `doc_id`.
    pub fn owns(&self, node: &str, doc_id: &str, n: usize) -> bool {
        self.preference_list(doc_id, n).contains(&node)
    }

    /// [`Ring::walk`] from a position on the ring: the first token at or after
    /// `position`, then clockwise, wrapping past `u64::MAX` to 0.
    pub fn walk_from(&self, position: u64) -> Vec<&str> {
        self.preference_list_at(position, usize::MAX)
    }

    /// [`Ring::preference_list`] from a position on the ring.
    pub fn preference_list_at(&self, position: u64, n: usize) -> Vec<&str> {
        self.walk_indices(position, n).into_iter().map(|i| self.ids[i].as_str()).collect()
    }

    /// Indices (into `ids`) of the first `n` distinct nodes from `position`.
    fn walk_indices(&self, position: u64, n: usize) -> Vec<usize> {
        let want = n.min(self.owning);
        let mut out = Vec::with_capacity(want);
        if want == 0 {
            return out;
        }
        let mut seen = vec![false; self.ids.len()];
        let start = self.tokens.partition_point(|&(t, _)| t < position);
        let len = self.tokens.len();
        for k in 0..len {
            let idx = self.tokens[(start + k) % len].1 as usize;
            if !seen[idx] {
                seen[idx] = true;
                out.push(idx);
                if out.len() == want {
                    break;
                }
            }
        }
        out
    }

    /// The ring cut into ranges with one preference list each: `(end, owners)` per range,
    /// where the range runs from the previous entry's `end` (exclusive) to `end`
    /// (inclusive), the first one wrapping around from the last. Ranges whose owners are
    /// equal are not merged.
    pub fn ranges(&self, n: usize) -> Vec<(u64, Vec<&str>)> {
        let mut out: Vec<(u64, Vec<&str>)> = Vec::new();
        for (i, &(t, _)) in self.tokens.iter().enumerate() {
            if i > 0 && self.tokens[i - 1].0 == t {
                continue;
            }
            out.push((t, self.preference_list_at(t, n)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[&str], vnodes: u32) -> Ring {
        let nodes: Vec<RingNode> = ids.iter().map(|id| RingNode::new(*id, 1)).collect();
        Ring::new(&nodes, vnodes)
    }

    #[test]
    fn walk_wraps_past_the_largest_token() {
        let r = ring(&["a", "b", "c"], 4);
        let last = r.tokens.last().map(|t| t.0).unwrap_or_default();
        let first_owner = r.ids[r.tokens[0].1 as usize].as_str();
        if last < u64::MAX {
            assert_eq!(r.walk_from(last + 1)[0], first_owner);
        }
        assert_eq!(r.walk_from(u64::MAX).len(), 3);
        assert_eq!(r.walk_from(0)[0], first_owner);
    }

    #[test]
    fn a_position_on_a_token_belongs_to_that_token() {
        let r = ring(&["a", "b", "c"], 8);
        for &(t, idx) in &r.tokens {
            assert_eq!(r.preference_list_at(t, 1), [r.ids[idx as usize].as_str()]);
        }
    }

    #[test]
    fn weight_zero_nodes_are_members_that_own_nothing() {
        let r = Ring::new(&[RingNode::new("a", 1), RingNode::new("idle", 0)], 16);
        assert_eq!(r.nodes().collect::<Vec<_>>(), ["a", "idle"]);
        assert_eq!(r.walk("x"), ["a"]);
        assert_eq!(r.owning_nodes(), 1);
        assert!(r.contains("idle"));
        assert_eq!(r.weight("idle"), Some(0));
    }

    #[test]
    fn an_empty_ring_has_empty_walks() {
        let r = Ring::new(&[], 64);
        assert!(r.is_empty());
        assert!(r.walk("x").is_empty());
        assert!(r.ranges(3).is_empty());
        assert!(!r.owns("a", "x", 3));
    }

    #[test]
    fn new_keeps_the_first_of_repeated_ids_and_try_new_refuses_them() {
        let nodes = [RingNode::new("a", 1), RingNode::new("a", 3), RingNode::new("b", 1)];
        let r = Ring::new(&nodes, 2);
        assert_eq!(r.nodes().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(r.token_count(), 4);
        assert_eq!(Ring::try_new(&nodes, 2), Err(RingError::DuplicateId("a".into())));
        assert_eq!(Ring::try_new(&[], 2), Err(RingError::NoNodes));
        assert_eq!(Ring::try_new(&nodes[2..], 0), Err(RingError::ZeroVnodes));
        assert_eq!(Ring::try_new(&[RingNode::new("", 1)], 1), Err(RingError::EmptyId));
        assert_eq!(Ring::try_new(&[RingNode::new("a", 0)], 1), Err(RingError::NoWeight));
        assert!(matches!(
            Ring::try_new(&[RingNode::new("a", u32::MAX)], 64),
            Err(RingError::TooManyTokens { .. })
        ));
        assert_eq!(Ring::new(&[RingNode::new("a", u32::MAX)], 64).token_count() as u64, MAX_TOKENS_PER_NODE);
    }

    #[test]
    fn ranges_cover_the_ring_with_the_walk_of_their_end() {
        let r = ring(&["a", "b", "c", "d"], 8);
        let ranges = r.ranges(2);
        assert_eq!(ranges.len(), r.token_count());
        for (i, (end, owners)) in ranges.iter().enumerate() {
            assert_eq!(*owners, r.preference_list_at(*end, 2));
            // The position just after the previous range's end has the same owners.
            let start = ranges[(i + ranges.len() - 1) % ranges.len()].0.wrapping_add(1);
            assert_eq!(*owners, r.preference_list_at(start, 2));
        }
    }

    #[test]
    fn position_is_the_docset_hash() {
        assert_eq!(Ring::position("board-1"), crate::docset::doc_hash("board-1"));
    }
}
