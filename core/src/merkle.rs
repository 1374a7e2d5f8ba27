//! XOR Merkle trees with a fixed shape, updated in O(depth) per change.
//!
//! Riak's "tictac" active anti-entropy keeps, per node, the XOR of its leaves' hashes:
//! changing one leaf XORs its old hash out and its new hash in along one path, with no
//! rehashing of siblings. Two trees built from the same set of `(key hash, leaf hash)`
//! pairs are equal node for node, whatever the order of updates, so peers compare roots
//! and descend only into differing children.
//!
//! Shape: fan-out [`FANOUT`] = 16, [`DEPTH`] = 4 levels below the root, so the leaf level
//! has 65,536 buckets addressed by the top 16 bits of a key's 64-bit hash. Nodes are
//! stored sparsely: memory grows with the number of non-empty buckets, not the shape.

use crate::hash::FxHashMap;
use serde::{Deserialize, Serialize};

/// Children per inner node.
pub const FANOUT: usize = 16;
/// Levels below the root; level `DEPTH` holds the buckets.
pub const DEPTH: u8 = 4;
const BITS_PER_LEVEL: u32 = 4;

/// A node address: `level` (0 = root) and the `index` of the node within its level
/// (the top `4 * level` bits of the key hashes below it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId {
    /// Depth, 0 for the root.
    pub level: u8,
    /// Position within the level.
    pub index: u32,
}

impl NodeId {
    /// The root.
    pub const ROOT: NodeId = NodeId { level: 0, index: 0 };

    /// The node at `level` on the path of `key_hash`.
    pub fn of(key_hash: u64, level: u8) -> NodeId {
        let index =
            if level == 0 { 0 } else { (key_hash >> (64 - BITS_PER_LEVEL * u32::from(level))) as u32 };
        NodeId { level, index }
    }

    /// The children of this node (empty for a bucket).
    pub fn children(self) -> impl Iterator<Item = NodeId> {
        let n = if self.level < DEPTH { FANOUT as u32 } else { 0 };
        (0..n).map(move |i| NodeId { level: self.level + 1, index: (self.index << BITS_PER_LEVEL) | i })
    }

    /// The range of key hashes under this node, inclusive.
    pub fn key_range(self) -> (u64, u64) {
        if self.level == 0 {
            return (0, u64::MAX);
        }
        let shift = 64 - BITS_PER_LEVEL * u32::from(self.level);
        let lo = u64::from(self.index) << shift;
        (lo, lo | ((1u64 << shift) - 1))
    }

    /// Whether this is a leaf-level bucket.
    pub fn is_bucket(self) -> bool {
        self.level == DEPTH
    }

    /// Checks an id that came over the wire.
    pub fn is_valid(self) -> bool {
        self.level <= DEPTH
            && (self.level == 0 && self.index == 0
                || u64::from(self.index) < 1u64 << (4 * u32::from(self.level)))
    }
}

/// The tree: per level, `index -> XOR of the leaf hashes below`. Empty nodes are absent.
///
/// ```
/// use concord_core::merkle::KeyTree;
/// let (mut a, mut b) = (KeyTree::default(), KeyTree::default());
/// a.toggle(1 << 60, 0xAB);
/// a.toggle(7 << 60, 0xCD);
/// b.toggle(7 << 60, 0xCD);
/// b.toggle(1 << 60, 0xAB);
/// assert_eq!(a.root(), b.root());
/// a.toggle(1 << 60, 0xAB); // XOR out again
/// assert_ne!(a.root(), b.root());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyTree {
    levels: [FxHashMap<u64, u64>; DEPTH as usize + 1],
}

impl KeyTree {
    /// XORs `leaf` into every node on the path of `key_hash` (adding a leaf, or removing
    /// it when it is already there).
    pub fn toggle(&mut self, key_hash: u64, leaf: u64) {
        if leaf == 0 {
            return;
        }
        for level in 0..=DEPTH {
            let id = NodeId::of(key_hash, level);
            let map = &mut self.levels[usize::from(level)];
            let v = map.entry(id.index.into()).or_insert(0);
            *v ^= leaf;
            if *v == 0 {
                map.remove(&id.index.into());
            }
        }
    }

    /// Replaces a leaf's old hash by its new one.
    pub fn update(&mut self, key_hash: u64, old: u64, new: u64) {
        if old != new {
            self.toggle(key_hash, old);
            self.toggle(key_hash, new);
        }
    }

    /// The root hash (0 for an empty tree).
    pub fn root(&self) -> u64 {
        self.node(NodeId::ROOT)
    }

    /// A node's hash (0 when empty or out of range).
    pub fn node(&self, id: NodeId) -> u64 {
        self.levels.get(usize::from(id.level)).and_then(|m| m.get(&id.index.into())).copied().unwrap_or(0)
    }

    /// The hashes of a node's children, in order.
    pub fn children(&self, id: NodeId) -> Vec<u64> {
        id.children().map(|c| self.node(c)).collect()
    }

    /// Number of non-empty buckets.
    pub fn buckets(&self) -> usize {
        self.levels[usize::from(DEPTH)].len()
    }
}

impl crate::codec::Wire for NodeId {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(self.level);
        crate::codec::put_varint(out, self.index.into());
    }
    fn read(r: &mut crate::codec::Reader<'_>) -> crate::codec::R<Self> {
        Ok(NodeId { level: r.byte()?, index: r.u32()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_partition_the_hash_space() {
        let id = NodeId::of(0xABCD_0000_0000_0001, 2);
        assert_eq!(id, NodeId { level: 2, index: 0xAB });
        let (lo, hi) = id.key_range();
        assert_eq!((lo, hi), (0xAB00_0000_0000_0000, 0xABFF_FFFF_FFFF_FFFF));
        let kids: Vec<NodeId> = id.children().collect();
        assert_eq!(kids.len(), FANOUT);
        assert_eq!(kids[0xC].key_range().0, 0xABC0_0000_0000_0000);
        assert!(NodeId::of(u64::MAX, DEPTH).is_valid());
        assert!(!NodeId { level: 1, index: 16 }.is_valid());
        assert!(!NodeId { level: 5, index: 0 }.is_valid());
    }

    #[test]
    fn tree_is_independent_of_update_order() {
        let pairs: Vec<(u64, u64)> =
            (1..500u64).map(|i| (crate::hash::fmix64(i), crate::hash::fmix64(i * 7))).collect();
        let mut a = KeyTree::default();
        let mut b = KeyTree::default();
        for &(k, l) in &pairs {
            a.toggle(k, l);
        }
        for &(k, l) in pairs.iter().rev() {
            b.toggle(k, l);
        }
        assert_eq!(a, b);
        for &(k, l) in &pairs {
            a.toggle(k, l);
        }
        assert_eq!(a, KeyTree::default());
    }
}
