//! The wasm replica in a real browser (headless Chromium through wasm-bindgen-test): every
//! CRDT through the exported API, values as encoded bytes, and the JS error classes. The
//! conversion of JS values to and from those bytes is `js/client.js`'s and is tested
//! through the package (`test/node/api.test.mjs`). The transports
//! (IndexedDB persistence across a close and reopen, tab-to-tab sync over
//! BroadcastChannel) are JavaScript (`js/client.js`) and are tested through the package in
//! headless Chromium: `test/e2e/package.test.mjs`.
//!
//! Run: `CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
//! CHROMEDRIVER=/usr/bin/chromedriver cargo test -p concord-wasm --target wasm32-unknown-unknown`
//! (scripts/test.sh does this).
#![cfg(target_arch = "wasm32")]

use concord_core::codec::whole;
use concord_core::Value;
use concord_wasm::api::{bytes_of, op, Host};
use concord_wasm::{DocHandle, Replica};
use js_sys::{Array, Function, Object, Reflect};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

fn enc(v: impl Into<Value>) -> Vec<u8> {
    bytes_of(&v.into())
}

fn dec(bytes: &[u8]) -> Value {
    whole(bytes).unwrap()
}

fn object(fields: Vec<(&str, Value)>) -> Value {
    Value::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

/// A replica whose outputs go nowhere except `log` (`"kind"` per call).
fn replica(log: &Array) -> Replica {
    let host = Object::new();
    for kind in ["relay", "tab", "change", "persist", "dirty", "online", "settled", "error", "reidentified"] {
        let f = Function::new_with_args("", &format!("this.log.push('{kind}')"));
        Reflect::set(&host, &kind.into(), &f).unwrap();
    }
    Reflect::set(&host, &"log".into(), log).unwrap();
    Replica::new(host.unchecked_into::<Host>())
}

fn open(r: &Replica, id: &str) -> DocHandle {
    let d = r.open(id).unwrap();
    r.announce(id).unwrap();
    d
}

fn json(h: &DocHandle) -> Value {
    dec(&h.bytes(op::DOCUMENT, "").unwrap())
}

fn class_of(e: &JsValue) -> String {
    Reflect::get(e, &"name".into()).unwrap().as_string().unwrap()
}

#[wasm_bindgen_test]
fn every_crdt_works_through_the_api() {
    let log = Array::new();
    let r = replica(&log);
    assert_eq!(r.replica_id().len(), 16);
    let d = open(&r, "board-1");

    let mut changed = 0;
    changed += u32::from(d.write(op::INCREMENT, "likes", 1.0, None).unwrap());
    changed += u32::from(d.write(op::INCREMENT, "likes", 2.0, None).unwrap());
    changed += u32::from(d.write(op::PN_ADD, "votes", 2.0, None).unwrap());
    changed += u32::from(d.write(op::PN_ADD, "votes", -3.0, None).unwrap());
    changed += u32::from(d.write(op::SET_REGISTER, "title", 0.0, Some(enc("Hello").into())).unwrap());
    changed += u32::from(d.write(op::SET_REGISTER, "title", 0.0, Some(enc("Hello, world").into())).unwrap());
    changed += u32::from(d.write(op::SET_ADD, "tags", 0.0, Some(enc("rust").into())).unwrap());
    changed += u32::from(d.write(op::SET_ADD, "tags", 0.0, Some(enc("wasm").into())).unwrap());
    changed += u32::from(d.write(op::SET_REMOVE, "tags", 0.0, Some(enc("wasm").into())).unwrap());
    changed += u32::from(d.write(op::SET_REMOVE, "tags", 0.0, Some(enc("never-added").into())).unwrap());

    assert_eq!(d.number(op::COUNTER, "likes", None).unwrap(), 3.0);
    assert_eq!(d.number(op::PN_COUNTER, "votes", None).unwrap(), -1.0);
    assert_eq!(dec(&d.bytes(op::REGISTER, "title").unwrap()), Value::from("Hello, world"));
    assert!(d.bytes(op::REGISTER, "nothing").unwrap().is_empty(), "no bytes: undefined");
    assert_eq!(d.number(op::SET_HAS, "tags", Some(enc("rust").into())).unwrap(), 1.0);
    assert_eq!(d.number(op::SET_HAS, "tags", Some(enc("wasm").into())).unwrap(), 0.0);
    assert_eq!(dec(&d.bytes(op::SET_VALUES, "tags").unwrap()), Value::Array(vec!["rust".into()]));
    assert_eq!(d.number(op::KIND, "votes", None).unwrap(), 2.0, "a pn-counter");
    assert_eq!(d.number(op::KIND, "nothing", None).unwrap(), 0.0);
    let keys = ["likes", "tags", "title", "votes"].map(Value::from);
    assert_eq!(dec(&d.bytes(op::KEYS, "").unwrap()), Value::Array(keys.to_vec()));
    let expected = object(vec![
        ("likes", 3.into()),
        ("tags", Value::Array(vec!["rust".into()])),
        ("title", "Hello, world".into()),
        ("votes", (-1).into()),
    ]);
    assert_eq!(json(&d), expected);
    // Every effective write says so (the caller tells the listeners) and makes a dirty
    // mark and an outbox entry; the no-op remove makes nothing. (The frame for the other
    // tabs goes at the next `flush`, with the writes made alongside.)
    assert_eq!(changed, 9);
    let kinds: Vec<String> = log.iter().filter_map(|k| k.as_string()).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "persist").count(), 9);
    assert_eq!(kinds.iter().filter(|k| *k == "change").count(), 0, "local writes cross back no strings");
    assert_eq!(kinds.iter().filter(|k| *k == "tab").count(), 1, "the subscribe to the other tabs");
    r.flush().unwrap();
    let kinds: Vec<String> = log.iter().filter_map(|k| k.as_string()).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "tab").count(), 2, "and one frame with all nine writes");
    r.close();
}

#[wasm_bindgen_test]
fn updates_move_state_between_replicas_and_garbage_is_a_type_error() {
    let (la, lb) = (Array::new(), Array::new());
    let (ra, rb) = (replica(&la), replica(&lb));
    let (a, b) = (open(&ra, "x"), open(&rb, "y"));
    a.write(op::INCREMENT, "likes", 4.0, None).unwrap();
    a.write(op::SET_ADD, "tags", 0.0, Some(enc("rust").into())).unwrap();
    b.write(op::PN_ADD, "votes", -1.0, None).unwrap();
    // Unheard: nobody listens to `b` yet, so no change is built for this update.
    b.apply_update(&a.update(&[]).unwrap()).unwrap();
    let remote = |l: &Array| l.iter().filter(|k| k.as_string().as_deref() == Some("change")).count();
    assert_eq!(remote(&lb), 0, "no listener, no change event");
    // From here on both listen (what `doc.subscribe` says); the write changes nothing.
    for d in [&a, &b] {
        assert!(!d.write(op::LISTEN, "", 1.0, None).unwrap());
    }
    a.write(op::INCREMENT, "likes", 1.0, None).unwrap();
    b.apply_update(&a.update(&b.bytes(op::VERSION, "").unwrap()).unwrap()).unwrap();
    let since_a = a.bytes(op::VERSION, "").unwrap();
    a.apply_update(&b.update(&since_a).unwrap()).unwrap();
    assert_eq!(json(&a), json(&b));
    assert_eq!(a.number(op::PN_COUNTER, "votes", None).unwrap(), -1.0);
    assert_eq!((remote(&la), remote(&lb)), (1, 1), "each heard one remote change");
    let before = json(&b);
    for bad in [&[3u8, 1, 2][..], &[0xc1, 9]] {
        let e = b.apply_update(bad).unwrap_err();
        assert_eq!(class_of(&e), "TypeError");
    }
    assert_eq!(class_of(&a.update(&[9, 9]).unwrap_err()), "TypeError");
    assert_eq!(json(&b), before);
    ra.close();
    rb.close();
}

#[wasm_bindgen_test]
fn encoded_values_round_trip_with_integers_and_floats_apart() {
    let r = replica(&Array::new());
    let d = open(&r, "values");
    let v = object(vec![
        ("n", 1.into()),
        ("f", 2.5.into()),
        ("big", 1e300.into()),
        (
            "a",
            Value::Array(vec![
                Value::Null,
                true.into(),
                "s".into(),
                object(vec![("x", Value::Array(vec![]))]),
            ]),
        ),
    ]);
    d.write(op::SET_REGISTER, "v", 0.0, Some(bytes_of(&v).into())).unwrap();
    assert_eq!(dec(&d.bytes(op::REGISTER, "v").unwrap()), v);
    d.write(op::SET_ADD, "s", 0.0, Some(enc(1).into())).unwrap();
    d.write(op::SET_ADD, "s", 0.0, Some(enc(1.5).into())).unwrap();
    assert_eq!(d.number(op::SET_HAS, "s", Some(enc(1).into())).unwrap(), 1.0);
    assert_eq!(d.number(op::SET_HAS, "s", Some(enc(2).into())).unwrap(), 0.0);
    assert_eq!(
        d.number(op::SET_HAS, "s", Some(enc(1.0).into())).unwrap(),
        0.0,
        "Int(1) and Float(1.0) differ"
    );
    r.close();
}

#[wasm_bindgen_test]
fn bad_input_throws_js_errors_that_say_what_to_do() {
    let r = replica(&Array::new());
    let d = open(&r, "errors");
    assert_eq!(class_of(&r.open("").err().unwrap()), "RangeError");
    d.write(op::INCREMENT, "likes", 1.0, None).unwrap();

    let e = d.write(op::SET_ADD, "likes", 0.0, Some(enc("x").into())).unwrap_err();
    assert_eq!(class_of(&e), "TypeError");
    assert!(e.unchecked_ref::<js_sys::Error>().message().as_string().unwrap().contains("use another key"));

    assert_eq!(class_of(&d.write(op::INCREMENT, "likes", -1.0, None).unwrap_err()), "RangeError");
    assert_eq!(class_of(&d.write(op::INCREMENT, "likes", 0.5, None).unwrap_err()), "RangeError");
    // Bytes that are not an encoded value (JS values are checked by js/client.js).
    assert_eq!(class_of(&d.write(op::SET_REGISTER, "r", 0.0, None).unwrap_err()), "TypeError");
    assert_eq!(class_of(&d.write(op::SET_ADD, "s", 0.0, Some(Box::new([9]))).unwrap_err()), "TypeError");
    assert_eq!(
        class_of(&d.write(op::SET_REGISTER, "r", 0.0, Some(Box::new([4, 5, b'a']))).unwrap_err()),
        "TypeError"
    );
    // Nothing above was written.
    assert_eq!(json(&d), object(vec![("likes", 1.into())]));

    // No relay has acknowledged anything: a waiter.
    assert!(d.wait_synced().unwrap().is_some());
    r.close();
    assert!(d.write(op::INCREMENT, "likes", 1.0, None).is_err(), "a closed client refuses writes");
}
