//! A server seeds every in-memory map ([`concord_core::hash::set_map_seed`]); documents
//! built afterwards behave the same, and nothing that crosses the wire changes. Its own
//! test binary: the seed is process-wide and set once.

use concord_core::hash::{set_map_seed, stable_hash};
use concord_core::value::Value;
use concord_core::{Document, ReplicaId};

#[test]
fn seeded_maps_find_their_keys_and_wire_hashes_do_not_move() {
    // Before any map is built, as a server does at start-up.
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    assert!(set_map_seed(seed));
    assert!(!set_map_seed(seed ^ 2), "a second seed would strand the maps built under the first");

    // Wire hashes are the same as in every other process (the value an unseeded run
    // computes, as the golden tests pin it).
    assert_eq!(stable_hash(b"concord"), STABLE_CONCORD);

    // Sets and documents work, and two replicas built in different orders converge to
    // the same encoding (Merkle roots included).
    let mut a = Document::new(ReplicaId(1));
    let mut b = Document::new(ReplicaId(2));
    let mut deltas_a = Vec::new();
    for i in 0..2_000i64 {
        deltas_a.push(a.set_add("s", Value::Int(i)).unwrap());
        deltas_a.push(a.increment(&format!("k{}", i % 97), 1).unwrap());
    }
    for i in (0..500i64).rev() {
        if let Some(d) = a.set_remove("s", &Value::Int(i * 4)).unwrap() {
            deltas_a.push(d);
        }
    }
    for d in deltas_a.iter().rev() {
        let _ = b.apply(d.clone());
    }
    assert_eq!(b.version(), a.version());
    assert_eq!(a.set_values("s").len(), 1_500);
    assert!(a.set_contains("s", &Value::Int(1)) && !a.set_contains("s", &Value::Int(4)));
    assert_eq!(b.set_values("s").len(), 1_500);
    assert_eq!(a.merkle().root(), b.merkle().root());
}

/// `stable_hash(b"concord")` in any process, seeded or not.
const STABLE_CONCORD: u64 = 0x1d82_a8c9_7f9c_a2c7;
