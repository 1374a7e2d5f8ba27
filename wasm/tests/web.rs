//! The wasm replica in a real browser (headless Chromium through wasm-bindgen-test): every
//! CRDT through the exported API, JSON values, and the JS error classes. The transports
//! (IndexedDB persistence across a close and reopen, tab-to-tab sync over
//! BroadcastChannel) are JavaScript (`js/client.js`) and are tested through the package in
//! headless Chromium: `test/e2e/package.test.mjs`.
//!
//! Run: `CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
//! CHROMEDRIVER=/usr/bin/chromedriver cargo test -p concord-wasm --target wasm32-unknown-unknown`
//! (scripts/test.sh does this).
#![cfg(target_arch = "wasm32")]

use concord_wasm::api::Host;
use concord_wasm::{DocHandle, Replica};
use js_sys::{Array, Function, Object, Reflect};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = JSON, js_name = stringify)]
    fn stringify(v: &JsValue) -> String;
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

fn json(h: &DocHandle) -> String {
    stringify(&h.to_json().unwrap())
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

    d.increment("likes", 1.0).unwrap();
    d.increment("likes", 2.0).unwrap();
    d.pn_add("votes", 2.0).unwrap();
    d.pn_add("votes", -3.0).unwrap();
    d.set_register("title", &"Hello".into()).unwrap();
    d.set_register("title", &"Hello, world".into()).unwrap();
    d.set_add("tags", &"rust".into()).unwrap();
    d.set_add("tags", &"wasm".into()).unwrap();
    d.set_remove("tags", &"wasm".into()).unwrap();
    d.set_remove("tags", &"never-added".into()).unwrap();

    assert_eq!(d.counter("likes").unwrap(), 3.0);
    assert_eq!(d.pn_counter("votes").unwrap(), -1.0);
    assert_eq!(d.register("title").unwrap().as_string().as_deref(), Some("Hello, world"));
    assert!(d.register("nothing").unwrap().is_undefined());
    assert!(d.set_has("tags", &"rust".into()).unwrap());
    assert!(!d.set_has("tags", &"wasm".into()).unwrap());
    assert_eq!(d.set_values("tags").unwrap().length(), 1);
    assert_eq!(d.kind_of("votes").unwrap().as_deref(), Some("pn-counter"));
    assert_eq!(json(&d), r#"{"likes":3,"tags":["rust"],"title":"Hello, world","votes":-1}"#);
    // Every effective write: a change event, a frame for the other tabs, a dirty mark
    // and an outbox entry (the two no-op removes produced nothing).
    let kinds: Vec<String> = log.iter().filter_map(|k| k.as_string()).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "persist").count(), 9);
    assert_eq!(kinds.iter().filter(|k| *k == "change").count(), 9);
    r.close();
}

#[wasm_bindgen_test]
fn json_values_round_trip_with_integers_and_floats_apart() {
    let r = replica(&Array::new());
    let d = open(&r, "values");
    let v = js_sys::JSON::parse(r#"{"n":1,"f":2.5,"big":1e300,"a":[null,true,"s",{"x":[]}]}"#).unwrap();
    d.set_register("v", &v).unwrap();
    assert_eq!(
        stringify(&d.register("v").unwrap()),
        r#"{"a":[null,true,"s",{"x":[]}],"big":1e+300,"f":2.5,"n":1}"#
    );
    d.set_add("s", &1.into()).unwrap();
    d.set_add("s", &1.5.into()).unwrap();
    assert!(d.set_has("s", &1.into()).unwrap());
    assert!(!d.set_has("s", &2.into()).unwrap());
    r.close();
}

#[wasm_bindgen_test]
fn bad_input_throws_js_errors_that_say_what_to_do() {
    let r = replica(&Array::new());
    let d = open(&r, "errors");
    assert_eq!(class_of(&r.open("").err().unwrap()), "RangeError");
    d.increment("likes", 1.0).unwrap();

    let e = d.set_add("likes", &"x".into()).unwrap_err();
    assert_eq!(class_of(&e), "TypeError");
    assert!(e.unchecked_ref::<js_sys::Error>().message().as_string().unwrap().contains("use another key"));

    assert_eq!(class_of(&d.increment("likes", -1.0).unwrap_err()), "RangeError");
    assert_eq!(class_of(&d.increment("likes", 0.5).unwrap_err()), "RangeError");
    assert_eq!(class_of(&d.set_register("r", &f64::NAN.into()).unwrap_err()), "RangeError");
    assert_eq!(class_of(&d.set_register("r", &JsValue::UNDEFINED).unwrap_err()), "TypeError");
    assert_eq!(class_of(&d.set_register("r", &js_sys::Map::new().into()).unwrap_err()), "TypeError");
    // A cycle is refused, not a stack overflow.
    let cyclic = Array::new();
    cyclic.push(&cyclic);
    assert_eq!(class_of(&d.set_register("r", &cyclic.into()).unwrap_err()), "RangeError");
    // Nothing above was written.
    assert_eq!(json(&d), r#"{"likes":1}"#);

    // No relay has acknowledged anything: a waiter.
    assert!(d.wait_synced().unwrap().is_some());
    r.close();
    assert!(d.increment("likes", 1.0).is_err(), "a closed client refuses writes");
}
