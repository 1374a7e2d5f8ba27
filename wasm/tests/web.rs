//! The replica in a real browser (headless Chromium through wasm-bindgen-test): every
//! CRDT through the exported API, IndexedDB persistence across a close and reopen, and
//! tab-to-tab sync over BroadcastChannel with no relay.
//!
//! Run: `CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
//! CHROMEDRIVER=/usr/bin/chromedriver cargo test -p concord-wasm --target wasm32-unknown-unknown`
//! (scripts/test.sh does this).
#![cfg(target_arch = "wasm32")]

use concord_wasm::{DocHandle, Options, Replica};
use js_sys::{Array, Promise, Reflect};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_name = setTimeout)]
    fn set_timeout(cb: &js_sys::Function, ms: i32);
    #[wasm_bindgen(js_namespace = JSON, js_name = stringify)]
    fn stringify(v: &JsValue) -> String;
}

async fn sleep(ms: i32) {
    JsFuture::from(Promise::new(&mut |ok, _| set_timeout(&ok, ms))).await.unwrap();
}

/// A name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", js_sys::Math::random().to_bits())
}

fn offline(database: Option<&str>, channel: Option<&str>) -> Options {
    Options {
        persist: database.is_some(),
        database: database.unwrap_or("unused").to_owned(),
        channel: channel.map(str::to_owned),
        ..Options::default()
    }
}

fn json(h: &DocHandle) -> String {
    stringify(&h.to_json().unwrap())
}

fn class_of(e: &JsValue) -> String {
    Reflect::get(e, &"name".into()).unwrap().as_string().unwrap()
}

/// Waits up to ~2 s for `f` to hold.
async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if f() {
            return true;
        }
        sleep(20).await;
    }
    f()
}

#[wasm_bindgen_test]
async fn every_crdt_works_through_the_api() {
    let r = Replica::connect(offline(None, None)).await.unwrap();
    assert_eq!(r.status(), "offline");
    let d = r.open_doc("board-1").await.unwrap();

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
    r.close();
}

#[wasm_bindgen_test]
async fn json_values_round_trip_with_integers_and_floats_apart() {
    let r = Replica::connect(offline(None, None)).await.unwrap();
    let d = r.open_doc("values").await.unwrap();
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
async fn bad_input_throws_js_errors_that_say_what_to_do() {
    let r = Replica::connect(offline(None, None)).await.unwrap();
    let d = r.open_doc("errors").await.unwrap();
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

    assert!(d.synced().is_err(), "synced() without a relay must say a relay is needed");
    r.close();
    assert!(d.increment("likes", 1.0).is_err(), "a closed client refuses writes");
}

#[wasm_bindgen_test]
async fn indexeddb_persistence_survives_closing_and_reopening_a_client() {
    let db = unique("concord-test");
    let r = Replica::connect(offline(Some(&db), None)).await.unwrap();
    let first_id = r.replica_id();
    let d = r.open_doc("board").await.unwrap();
    d.increment("likes", 2.0).unwrap();
    d.set_add("tags", &"rust".into()).unwrap();
    sleep(50).await; // the outbox write (no snapshot yet: under a second old)
    d.set_register("title", &"saved by close".into()).unwrap();
    r.close();

    let r = Replica::connect(offline(Some(&db), None)).await.unwrap();
    assert_ne!(r.replica_id(), first_id, "a new session never reuses a replica id");
    let d = r.open_doc("board").await.unwrap();
    assert_eq!(json(&d), r#"{"likes":2,"tags":["rust"],"title":"saved by close"}"#);
    // Writes after the reload count on top, under the new id.
    d.increment("likes", 1.0).unwrap();
    assert_eq!(d.counter("likes").unwrap(), 3.0);
    sleep(1200).await; // long enough for a snapshot that folds the outbox in
    r.close();

    let r = Replica::connect(offline(Some(&db), None)).await.unwrap();
    let d = r.open_doc("board").await.unwrap();
    assert_eq!(d.counter("likes").unwrap(), 3.0);
    let other = r.open_doc("other").await.unwrap();
    assert_eq!(json(&other), "{}");
    r.close();
}

#[wasm_bindgen_test]
async fn two_tabs_sharing_one_database_lose_nothing_of_each_other() {
    let db = unique("concord-tabs");
    let ch = unique("concord-tabs-channel");
    let a = Replica::connect(offline(Some(&db), Some(&ch))).await.unwrap();
    let b = Replica::connect(offline(Some(&db), Some(&ch))).await.unwrap();
    let da = a.open_doc("board").await.unwrap();
    let db_ = b.open_doc("board").await.unwrap();
    da.increment("likes", 1.0).unwrap();
    db_.increment("likes", 10.0).unwrap();
    da.set_add("tags", &"a".into()).unwrap();
    assert!(eventually(|| json(&da) == json(&db_)).await);
    sleep(1200).await; // both write snapshots of their own
    db_.set_add("tags", &"b".into()).unwrap(); // only in b's outbox
    sleep(50).await;
    a.close();
    b.close();

    let c = Replica::connect(offline(Some(&db), None)).await.unwrap();
    let dc = c.open_doc("board").await.unwrap();
    assert_eq!(json(&dc), r#"{"likes":11,"tags":["a","b"]}"#);
    sleep(1200).await; // c folds both snapshots and the outbox into one
    c.close();
    let d = Replica::connect(offline(Some(&db), None)).await.unwrap();
    let dd = d.open_doc("board").await.unwrap();
    assert_eq!(json(&dd), r#"{"likes":11,"tags":["a","b"]}"#);
    d.close();
}

#[wasm_bindgen_test]
async fn a_second_client_receives_deltas_over_broadcast_channel_with_no_relay() {
    let ch = unique("concord-channel");
    let a = Replica::connect(offline(None, Some(&ch))).await.unwrap();
    let b = Replica::connect(offline(None, Some(&ch))).await.unwrap();
    let da = a.open_doc("shared").await.unwrap();
    da.increment("likes", 5.0).unwrap(); // before b opens: b catches up on open
    let db = b.open_doc("shared").await.unwrap();
    assert!(eventually(|| db.counter("likes").unwrap() == 5.0).await, "catch-up on open");

    da.set_add("tags", &"live".into()).unwrap();
    db.pn_add("votes", -2.0).unwrap();
    db.set_register("title", &"from b".into()).unwrap();
    assert!(eventually(|| json(&da) == json(&db)).await, "a={} b={}", json(&da), json(&db));
    assert_eq!(json(&da), r#"{"likes":5,"tags":["live"],"title":"from b","votes":-2}"#);

    // A third tab with its own stale view converges too (subscribe back).
    let c = Replica::connect(offline(None, Some(&ch))).await.unwrap();
    let dc = c.open_doc("shared").await.unwrap();
    dc.increment("likes", 1.0).unwrap();
    assert!(eventually(|| json(&da) == json(&dc) && json(&db) == json(&dc)).await);
    assert_eq!(da.counter("likes").unwrap(), 6.0);
    for r in [a, b, c] {
        r.close();
    }
}

#[wasm_bindgen_test]
async fn change_listeners_see_local_and_remote_changes() {
    let ch = unique("concord-listen");
    let a = Replica::connect(offline(None, Some(&ch))).await.unwrap();
    let b = Replica::connect(offline(None, Some(&ch))).await.unwrap();
    let da = a.open_doc("d").await.unwrap();
    let db = b.open_doc("d").await.unwrap();
    let seen = Array::new();
    let log = seen.clone();
    let f = Closure::<dyn FnMut(JsValue, JsValue)>::new(move |local: JsValue, keys: JsValue| {
        log.push(&format!("{}:{}", local.as_bool().unwrap(), stringify(&keys)).into());
    });
    db.set_listener(Some(f.as_ref().unchecked_ref::<js_sys::Function>().clone())).unwrap();
    db.increment("mine", 1.0).unwrap();
    da.set_add("theirs", &"x".into()).unwrap();
    assert!(eventually(|| seen.length() == 2).await);
    assert_eq!(stringify(&seen), r#"["true:[\"mine\"]","false:[\"theirs\"]"]"#);
    a.close();
    b.close();
}
