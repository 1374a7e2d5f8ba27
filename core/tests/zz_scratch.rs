use concord_core::{DocConfig, Document, ReplicaId, Value};
#[test]
fn scratch() {
    let cfg = DocConfig { log_capacity: 1, pending_capacity: 16 };
    let mut a = Document::with_config(ReplicaId(1), cfg);
    a.set_add("s", Value::Int(1)).unwrap();
    a.set_add("s", Value::Int(2)).unwrap();
    a.increment("c", 1).unwrap();
    let mut b = Document::with_config(ReplicaId(2), cfg);
    b.merge_state(&a.all_fields(), a.context(), a.version()).unwrap();
    println!("{:?}\n{:?}", a.to_value(), b.to_value());
    assert_eq!(a.to_value(), b.to_value());
}
