//! Golden byte vectors pin the wire and storage format (STYLE.md §6): an accidental change
//! of any encoding fails here, loudly. A deliberate change bumps `codec::FORMAT_VERSION`
//! and replaces these vectors (print them with `dbg!(hex(&bytes))`), in the same commit.

use concord_core::codec::{self, tag};
use concord_core::{
    Crdt, Delta, DocConfig, Document, Dot, Field, GCounter, LwwRegister, OrSet, PnCounter, ReplicaId,
    Timestamp, Value, VersionVector,
};

/// A replica id whose varint uses all nine bytes, so byte order and width show.
const A: ReplicaId = ReplicaId(0x0A0A_0A0A_0A0A_0A0A);
const B: ReplicaId = ReplicaId(0xB);
const WALL: u64 = 1_700_000_000_000;

/// The id `A` as a postcard varint.
macro_rules! a {
    () => {
        "8a94a8d0a0c182850a"
    };
}

/// What every document vector below has before its set field: the clock, then the
/// register, PN-counter and counter fields, in key-hash order (the field count first).
macro_rules! doc_clock_and_first_fields {
    () => {
        concat!(
            // hlc
            "80d095ffbc31",
            "00",
            a!(),
            // fields, in key-hash order
            "04",
            "057469746c65020180d095ffbc3100",
            a!(),
            "040548656c6c6f",
            "05766f7465730100",
            "01",
            a!(),
            "03",
            "056c696b657300",
            "01",
            a!(),
            "05"
        )
    };
}

/// The version vector and context, then the first three deltas of the log (counter,
/// PN-counter, register) and the dot of the fourth; `$run` ends each delta (format 3: its
/// run length, 0; nothing before).
macro_rules! doc_clocks_and_first_deltas {
    ($run:literal) => {
        concat!(
            // version vector and context
            "01",
            a!(),
            "06",
            "01",
            a!(),
            "06",
            "00",
            // delta log
            "06",
            a!(),
            "01056c696b657300",
            "01",
            a!(),
            "05",
            $run,
            a!(),
            "0205766f7465730100",
            "01",
            a!(),
            "03",
            $run,
            a!(),
            "03057469746c65020180d095ffbc3100",
            a!(),
            "040548656c6c6f",
            $run,
            a!()
        )
    };
}

const VERSION_VECTOR: &str = concat!("0303", "02", "0b", "01", a!(), "03");

// Deltas: `$v` is the format version, `$run` the run length that ends a delta in format
// 3 (0: one write) and is absent in format 2.
macro_rules! counter_delta {
    ($v:literal, $run:literal) => {
        concat!("02", $v, a!(), "01", "056c696b6573", "00", "01", a!(), "05", $run)
    };
}
macro_rules! pn_delta {
    ($v:literal, $run:literal) => {
        concat!("02", $v, a!(), "02", "05766f746573", "01", "00", "01", a!(), "03", $run)
    };
}
macro_rules! register_delta {
    ($v:literal, $run:literal) => {
        concat!(
            "02",
            $v,
            a!(),
            "03",
            "057469746c65",
            "02",
            "01",
            "80d095ffbc31",
            "00",
            a!(),
            "04",
            "0548656c6c6f",
            $run
        )
    };
}
// Sets (since format 2): entry count, replica table, then per entry the shared prefix
// length, the head (suffix length << 2 | dot count), the suffix, and each dot's
// zig-zagged seq step (no replica index with a one-replica table); then the context.
macro_rules! set_add_delta {
    ($v:literal, $run:literal) => {
        concat!(
            "02",
            $v,
            a!(),
            "04",
            "0474616773",
            "03",
            // one entry; replica table [A]
            "01",
            "01",
            a!(),
            // shared 0, head 6 << 2 | 1, "rust", seq 4 (the replica's first: as it is)
            "00",
            "19",
            "040472757374",
            "04",
            // context: no version vector, the dot (A, 4)
            "00",
            "01",
            a!(),
            "04",
            $run
        )
    };
}
// A removal hint: one entry, an empty replica table, the element with no dots.
macro_rules! set_remove_delta {
    ($v:literal, $run:literal) => {
        concat!(
            "02",
            $v,
            a!(),
            "06",
            "0474616773",
            "03",
            "01",
            "00",
            "00",
            "08",
            "020e",
            "00",
            "01",
            a!(),
            "05",
            $run
        )
    };
}
const COUNTER_DELTA: &str = counter_delta!("03", "00");
const PN_DELTA: &str = pn_delta!("03", "00");
const REGISTER_DELTA: &str = register_delta!("03", "00");
const SET_ADD_DELTA: &str = set_add_delta!("03", "00");
const SET_REMOVE_DELTA: &str = set_remove_delta!("03", "00");
// In dot order: "rust" (A, 1, as it is), then 7 (A, 2: a step of 1, zig-zagged).
macro_rules! set_field {
    ($v:literal) => {
        concat!(
            "04",
            $v,
            "03",
            "02",
            "01",
            a!(),
            "00",
            "19",
            "040472757374",
            "01",
            "00",
            "09",
            "020e",
            "02",
            "00",
            "00"
        )
    };
}
const SET_FIELD: &str = set_field!("03");
macro_rules! document {
    ($v:literal, $run:literal) => {
        concat!(
            "01",
            $v,
            a!(),
            doc_clock_and_first_fields!(),
            "047461677303",
            "01",
            "01",
            a!(),
            "0019040472757374",
            "04",
            "0000",
            doc_clocks_and_first_deltas!($run),
            "04047461677303",
            "01",
            "01",
            a!(),
            "0019040472757374",
            "04",
            "00",
            "01",
            a!(),
            "04",
            $run,
            a!(),
            "05047461677303",
            "01",
            "01",
            a!(),
            "0009020e",
            "05",
            "00",
            "01",
            a!(),
            "05",
            $run,
            a!(),
            "06047461677303",
            "01",
            "00",
            "0008020e",
            "00",
            "01",
            a!(),
            "05",
            $run,
            // log floor, pending
            "00",
            "00",
        )
    };
}
const DOCUMENT: &str = document!("03", "00");

// Format 2, as written before deltas could be runs: still read.
const V2_DELTAS: [&str; 5] = [
    counter_delta!("02", ""),
    pn_delta!("02", ""),
    register_delta!("02", ""),
    set_add_delta!("02", ""),
    set_remove_delta!("02", ""),
];
const V2_SET_FIELD: &str = set_field!("02");
const V2_DOCUMENT: &str = document!("02", "");

// Format 1, as written before sets changed: still read (stored snapshots, outboxes).
const V1_SET_ADD_DELTA: &str = concat!(
    "0201",
    a!(),
    "04",
    "0474616773",
    "03",
    "01",
    "04",
    "0472757374",
    "01",
    a!(),
    "04",
    "00",
    "01",
    a!(),
    "04"
);
const V1_SET_REMOVE_DELTA: &str =
    concat!("0201", a!(), "06", "0474616773", "03", "01", "020e", "00", "00", "01", a!(), "05");
const V1_SET_FIELD: &str =
    concat!("0401", "03", "02", "020e", "01", a!(), "02", "040472757374", "01", a!(), "01", "00", "00");
const V1_DOCUMENT: &str = concat!(
    "0101",
    a!(),
    doc_clock_and_first_fields!(),
    "04746167730301040472757374",
    "01",
    a!(),
    "04",
    "0000",
    doc_clocks_and_first_deltas!(""),
    "0404746167730301040472757374",
    "01",
    a!(),
    "04",
    "00",
    "01",
    a!(),
    "04",
    a!(),
    "0504746167730301020e",
    "01",
    a!(),
    "05",
    "00",
    "01",
    a!(),
    "05",
    a!(),
    "0604746167730301020e0000",
    "01",
    a!(),
    "05",
    // log floor, pending
    "00",
    "00",
);

fn bytes(hex: &str) -> Vec<u8> {
    assert!(hex.len() % 2 == 0, "odd hex length");
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn assert_golden(actual: &[u8], golden: &str) {
    assert_eq!(hex(actual), golden, "the encoding changed; if on purpose, bump FORMAT_VERSION");
}

/// The document every vector below comes from, and its deltas.
fn history() -> (Document, Vec<Delta>) {
    let mut doc = Document::new(A);
    let deltas = vec![
        doc.increment("likes", 5).unwrap(),
        doc.pn_add("votes", -3).unwrap(),
        doc.set_register("title", Value::from("Hello"), WALL).unwrap(),
        doc.set_add("tags", Value::from("rust")).unwrap(),
        doc.set_add("tags", Value::Int(7)).unwrap(),
        doc.set_remove("tags", &Value::Int(7)).unwrap().unwrap(),
    ];
    (doc, deltas)
}

fn dot(seq: u64) -> Dot {
    Dot::new(A, seq)
}

fn delta(seq: u64, key: &str, payload: Field) -> Delta {
    Delta::new(dot(seq), key, payload)
}

#[test]
fn a_version_vector_encodes_to_its_golden_bytes() {
    let vv = VersionVector::from_iter([(A, 3), (B, 1)]);
    assert_golden(&codec::encode(tag::VERSION_VECTOR, &vv), VERSION_VECTOR);
    assert_eq!(codec::decode::<VersionVector>(tag::VERSION_VECTOR, &bytes(VERSION_VECTOR)), Ok(vv));
}

#[test]
fn a_counter_delta_encodes_to_its_golden_bytes() {
    let d = delta(1, "likes", Field::Counter(GCounter::default().increment(A, 5)));
    assert_golden(&d.encode(), COUNTER_DELTA);
    assert_eq!(Delta::decode(&bytes(COUNTER_DELTA)), Ok(d));
}

#[test]
fn a_pn_counter_delta_encodes_to_its_golden_bytes() {
    let d = delta(2, "votes", Field::PnCounter(PnCounter::default().decrement(A, 3)));
    assert_golden(&d.encode(), PN_DELTA);
    assert_eq!(Delta::decode(&bytes(PN_DELTA)), Ok(d));
}

#[test]
fn a_register_delta_encodes_to_its_golden_bytes() {
    let ts = Timestamp { millis: WALL, counter: 0, replica: A };
    let d = delta(3, "title", Field::Register(LwwRegister::default().set(ts, Value::from("Hello"))));
    assert_golden(&d.encode(), REGISTER_DELTA);
    assert_eq!(Delta::decode(&bytes(REGISTER_DELTA)), Ok(d));
}

#[test]
fn a_set_add_delta_encodes_to_its_golden_bytes() {
    let d = delta(4, "tags", Field::Set(OrSet::default().add(dot(4), Value::from("rust"))));
    assert_golden(&d.encode(), SET_ADD_DELTA);
    assert_eq!(Delta::decode(&bytes(SET_ADD_DELTA)), Ok(d));
}

#[test]
fn a_set_remove_delta_encodes_to_its_golden_bytes() {
    let mut set = OrSet::default();
    set.merge(&set.add(dot(5), Value::Int(7)));
    let d = delta(6, "tags", Field::Set(set.remove(&Value::Int(7))));
    assert_golden(&d.encode(), SET_REMOVE_DELTA);
    let back = Delta::decode(&bytes(SET_REMOVE_DELTA)).unwrap();
    assert_eq!(back, d);
    assert_golden(&back.encode(), SET_REMOVE_DELTA);
}

#[test]
fn a_documents_deltas_are_the_golden_ones() {
    let (_, deltas) = history();
    let golden = [COUNTER_DELTA, PN_DELTA, REGISTER_DELTA, SET_ADD_DELTA];
    for (d, g) in deltas.iter().zip(golden) {
        assert_golden(&d.encode(), g);
    }
    assert_golden(&deltas[5].encode(), SET_REMOVE_DELTA);
}

#[test]
fn a_set_field_encodes_to_its_golden_bytes() {
    let mut doc = Document::new(A);
    doc.set_add("tags", Value::from("rust")).unwrap();
    doc.set_add("tags", Value::Int(7)).unwrap();
    let field = doc.get("tags").unwrap();
    assert_golden(&codec::encode(tag::FIELD, field), SET_FIELD);
    assert_eq!(codec::decode::<Field>(tag::FIELD, &bytes(SET_FIELD)).as_ref(), Ok(field));
}

#[test]
fn a_document_snapshot_encodes_to_its_golden_bytes() {
    let (doc, _) = history();
    assert_golden(&doc.encode(), DOCUMENT);
    let back = Document::decode(&bytes(DOCUMENT), DocConfig::default()).unwrap();
    assert_eq!(back, doc);
    assert_eq!(back.to_value(), doc.to_value());
    assert_eq!(back.version(), doc.version());
    assert_eq!(back.replica(), A);
    assert_eq!(
        back.to_value(),
        Value::Object(
            [
                ("likes".to_string(), Value::Int(5)),
                ("votes".to_string(), Value::Int(-3)),
                ("title".to_string(), Value::from("Hello")),
                ("tags".to_string(), Value::Array(vec![Value::from("rust")])),
            ]
            .into_iter()
            .collect()
        )
    );
}

#[test]
fn format_1_sets_deltas_and_documents_still_decode_to_what_they_were() {
    let (doc, deltas) = history();
    assert_eq!(Delta::decode(&bytes(V1_SET_ADD_DELTA)).as_ref(), Ok(&deltas[3]));
    assert_eq!(Delta::decode(&bytes(V1_SET_REMOVE_DELTA)).as_ref(), Ok(&deltas[5]));
    let mut two = Document::new(A);
    two.set_add("tags", Value::from("rust")).unwrap();
    two.set_add("tags", Value::Int(7)).unwrap();
    assert_eq!(
        codec::decode::<Field>(tag::FIELD, &bytes(V1_SET_FIELD)).as_ref(),
        Ok(two.get("tags").unwrap())
    );
    let back = Document::decode(&bytes(V1_DOCUMENT), DocConfig::default()).unwrap();
    assert_eq!(back, doc);
    // Written again, they are this build's format.
    assert_golden(&back.encode(), DOCUMENT);
}

#[test]
fn format_2_deltas_and_documents_still_decode_to_what_they_were() {
    let (doc, deltas) = history();
    let written = [&deltas[0], &deltas[1], &deltas[2], &deltas[3], &deltas[5]];
    for (v2, d) in V2_DELTAS.iter().zip(written) {
        let back = Delta::decode(&bytes(v2)).unwrap();
        assert_eq!(&back, d);
        assert_eq!(back.first(), d.dot.seq, "a format-2 delta is one write");
    }
    assert_eq!(
        codec::decode::<Field>(tag::FIELD, &bytes(V2_SET_FIELD)),
        codec::decode::<Field>(tag::FIELD, &bytes(SET_FIELD))
    );
    let back = Document::decode(&bytes(V2_DOCUMENT), DocConfig::default()).unwrap();
    assert_eq!(back, doc);
    assert_golden(&back.encode(), DOCUMENT);
}

#[test]
fn a_run_encodes_its_length_after_the_payload() {
    let mut doc = Document::new(A);
    doc.increment("likes", 2).unwrap();
    doc.increment("likes", 3).unwrap();
    let run = doc.deltas_since(&VersionVector::new()).unwrap()[0].clone();
    // Dot (A, 2), "likes", the counter at 5, then one earlier dot.
    let golden = concat!("0203", a!(), "02", "056c696b6573", "00", "01", a!(), "05", "01");
    assert_golden(&run.encode(), golden);
    assert_eq!(Delta::decode(&bytes(golden)), Ok(run));
}

#[test]
fn golden_bytes_with_another_tag_or_a_newer_version_are_refused() {
    let mut b = bytes(COUNTER_DELTA);
    b[0] = tag::DOCUMENT;
    assert!(Delta::decode(&b).is_err());
    let mut b = bytes(COUNTER_DELTA);
    b[1] = codec::FORMAT_VERSION + 1;
    assert!(matches!(Delta::decode(&b), Err(concord_core::DecodeError::UnsupportedVersion { .. })));
}
