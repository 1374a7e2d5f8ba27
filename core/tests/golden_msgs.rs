//! Golden byte vectors for every sync protocol message: an accidental change of the wire
//! format fails here loudly. Regenerate deliberately with
//! `GOLDEN_PRINT=1 cargo test -p concord-core --test golden_msgs -- --nocapture`.

use concord_core::docset::{DocSetAnswer, DocSetQuery};
use concord_core::merkle::NodeId;
use concord_core::sync::msg::*;
use concord_core::sync::Msg;
use concord_core::{CausalContext, Document, Field, GCounter, ReplicaId, Value, VersionVector};

const A: ReplicaId = ReplicaId(0xA1);
const B: ReplicaId = ReplicaId(0xB2);

fn vv() -> VersionVector {
    VersionVector::from_iter([(A, 3), (B, 1)])
}

fn deltas() -> Vec<concord_core::Delta> {
    let mut d = Document::new(A);
    vec![
        d.increment("likes", 2).unwrap(),
        d.pn_add("votes", -1).unwrap(),
        d.set_register("title", Value::from("Hi"), 1_700_000_000_000).unwrap(),
        d.set_add("tags", Value::from("rust")).unwrap(),
        d.set_remove("tags", &Value::from("rust")).unwrap().unwrap(),
    ]
}

fn messages() -> Vec<(&'static str, Msg)> {
    let doc = || "d".to_string();
    vec![
        ("hello", Msg::Hello(Hello { protocol: 1, min_protocol: 1, replica: A, token: Some("t".into()) })),
        ("subscribe", Msg::Subscribe(Subscribe { doc: doc(), vv: vv() })),
        ("deltas", Msg::Deltas(Deltas { doc: doc(), deltas: deltas() })),
        ("synced", Msg::Synced(Synced { doc: doc(), vv: vv() })),
        ("ack", Msg::Ack(Ack { doc: doc(), vv: vv() })),
        ("unsubscribe", Msg::Unsubscribe(Unsubscribe { doc: doc() })),
        (
            "merkle_start",
            Msg::MerkleStart(MerkleStart {
                doc: doc(),
                exchange: 7,
                vv: vv(),
                ctx: CausalContext { vv: vv(), cloud: Default::default() },
                children: (0..16).collect(),
                full_chunks: 0,
                keys: 300,
            }),
        ),
        (
            "merkle_query",
            Msg::MerkleQuery(MerkleQuery {
                doc: doc(),
                exchange: 7,
                nodes: vec![NodeId { level: 1, index: 3 }],
            }),
        ),
        (
            "merkle_nodes",
            Msg::MerkleNodes(MerkleNodes {
                doc: doc(),
                exchange: 7,
                nodes: vec![(NodeId { level: 1, index: 3 }, (100..116).collect())],
            }),
        ),
        (
            "merkle_leaves",
            Msg::MerkleLeaves(MerkleLeaves {
                doc: doc(),
                exchange: 7,
                buckets: vec![(NodeId { level: 4, index: 0x3abc }, vec![(0x3abc_0000_0000_0001, 42)])],
            }),
        ),
        (
            "keys_query",
            Msg::KeysQuery(KeysQuery { doc: doc(), exchange: 7, keys: vec![0x3abc_0000_0000_0001] }),
        ),
        (
            "state",
            Msg::State(StateChunk {
                doc: doc(),
                exchange: 7,
                chunk: 0,
                answered: vec![1],
                fields: vec![("likes".into(), Field::Counter(GCounter::default().increment(A, 2)))],
                done: 1,
                total: 1,
            }),
        ),
        (
            "docset_query",
            Msg::DocSetQuery(DocSetQueryMsg {
                exchange: 9,
                query: DocSetQuery {
                    children: vec![NodeId::ROOT],
                    buckets: vec![NodeId { level: 4, index: 0x3abc }],
                    lists: vec![NodeId { level: 1, index: 3 }],
                    names: vec![0x3abc_0000_0000_0001],
                },
            }),
        ),
        (
            "docset_answer",
            Msg::DocSetAnswer(DocSetAnswerMsg {
                exchange: 9,
                part: 1,
                parts: 2,
                answer: DocSetAnswer {
                    children: vec![(
                        NodeId::ROOT,
                        (0..16).map(|i| if i % 5 == 0 { i + 1 } else { 0 }).collect(),
                    )],
                    buckets: vec![(NodeId { level: 4, index: 0x3abc }, vec![(0x3abc_0000_0000_0001, 42)])],
                    lists: vec![(NodeId { level: 1, index: 3 }, vec![("d".into(), 7)])],
                    names: vec![(0x3abc_0000_0000_0001, vec![("e".into(), 8)])],
                },
            }),
        ),
        (
            "error",
            Msg::Error(ErrorMsg {
                code: ErrorCode::FORBIDDEN,
                doc: Some(doc()),
                message: "read-only".into(),
            }),
        ),
    ]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const GOLDEN: &[(&str, &str)] = &[
    ("hello", "010101a101010174"),
    ("subscribe", "02016402a10103b20101"),
    ("deltas", "03016401a10104056c696b657304746167731469746c6505766f746573050900020b03011c0280a0abfef962040248691d010404727573740e0104047275737401a10104"),
    ("synced", "04016402a10103b20101"),
    ("ack", "05016402a10103b20101"),
    ("unsubscribe", "060164"),
    ("merkle_start", "1001640702a10103b2010102a10103b201010010000102030405060708090a0b0c0d0e0f00ac02"),
    ("merkle_query", "11016407010103"),
    ("merkle_nodes", "12016407010103106465666768696a6b6c6d6e6f70717273"),
    ("merkle_leaves", "130164070104bc750181808080808080de3a2a"),
    ("keys_query", "140164070181808080808080de3a"),
    ("state", "1501640700010101056c696b65730001a101020101"),
    ("docset_query", "20090100000104bc7501010308010000000000bc3a"),
    ("docset_answer", "21090102010000222184010000000000000006000000000000000b0000000000000010000000000000000104bc7510010000000000bc3a2a00000000000000010103010164070181808080808080de3a01016508"),
    ("error", "7f0501016409726561642d6f6e6c79"),
];

#[test]
fn every_message_encodes_to_its_golden_bytes_and_decodes_back() {
    let print = std::env::var_os("GOLDEN_PRINT").is_some();
    let msgs = messages();
    assert_eq!(msgs.len(), 15, "one golden vector per message type");
    for (name, msg) in msgs {
        let bytes = msg.encode();
        if print {
            println!("    (\"{name}\", \"{}\"),", hex(&bytes));
            continue;
        }
        let want = GOLDEN
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, h)| *h)
            .unwrap_or_else(|| panic!("no golden for {name}"));
        assert_eq!(hex(&bytes), want, "wire format of {name} changed");
        assert_eq!(Msg::decode(&bytes).unwrap(), msg, "{name} does not decode back");
    }
}
