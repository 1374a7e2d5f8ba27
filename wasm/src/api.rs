//! The `#[wasm_bindgen]` surface: `Replica` and `DocHandle`, each method a call into
//! [`crate::replica`] or [`concord_core::Document`] plus argument conversion, and `Host`,
//! the JS object the replica's outputs go to. The hand-written `js/client.js` owns the
//! transports and builds the public `Client`/`Doc` API on top; its TypeScript types are
//! authored in `js/index.d.ts`.

use crate::error::{closed, doc_error, error, range_error, type_error};
use crate::replica::{Out, Refused};
use concord_core::codec::{whole, Wire};
use concord_core::sync::msg::MAX_DOC_ID;
use concord_core::{Delta, DocError, Document, ReplicaId, Value, VersionVector};
use std::cell::{Cell, Ref, RefCell};
use std::rc::Rc;
use wasm_bindgen::prelude::*;

#[wasm_bindgen]
extern "C" {
    /// Where a replica's outputs go (`js/client.js`). Byte arguments are views of wasm
    /// memory, valid only during the call: copy them before keeping them.
    pub type Host;
    /// Send `frame` to the relay.
    #[wasm_bindgen(method)]
    fn relay(this: &Host, frame: &[u8]);
    /// Post `frame` to the other tabs.
    #[wasm_bindgen(method)]
    fn tab(this: &Host, frame: &[u8]);
    /// `doc` changed at `keys` (a JSON array of strings: one string crosses, not one per
    /// key, and JS parses it only when someone listens) by a remote write (local writes:
    /// see [`DocHandle::write`]).
    #[wasm_bindgen(method)]
    fn change(this: &Host, doc: &str, keys: &str);
    /// Store a local write in the outbox under `[doc, replicaId, seq]`.
    #[wasm_bindgen(method)]
    fn persist(this: &Host, doc: &str, seq: f64, delta: &[u8]);
    /// `doc` changed: snapshot it soon.
    #[wasm_bindgen(method)]
    fn dirty(this: &Host, doc: &str);
    /// The relay answered `Hello`.
    #[wasm_bindgen(method)]
    fn online(this: &Host);
    /// `synced()` waiter `id` is satisfied.
    #[wasm_bindgen(method)]
    fn settled(this: &Host, id: u32);
    /// A background error.
    #[wasm_bindgen(method)]
    fn error(this: &Host, message: &str);
    /// The relay refused writes to `doc`; `synced()` on it fails from now on.
    #[wasm_bindgen(method)]
    fn refused(this: &Host, doc: &str, message: &str);
    /// The replica took a new id after amnesia: snapshots under `old` are stale; restart
    /// the relay connection.
    #[wasm_bindgen(method)]
    fn reidentified(this: &Host, old: &str);
    #[wasm_bindgen(js_namespace = crypto, js_name = getRandomValues)]
    fn get_random_values(buf: &mut [u8]);
}

/// A random non-zero replica id from `crypto.getRandomValues`.
fn fresh_id() -> ReplicaId {
    loop {
        let mut b = [0u8; 8];
        get_random_values(&mut b);
        let id = u64::from_le_bytes(b);
        if id != 0 {
            return ReplicaId(id);
        }
    }
}

/// 16 lowercase hex digits, as `ReplicaId`'s `Display` (without the formatting machinery).
pub fn hex_id(r: ReplicaId) -> String {
    (0..16).rev().map(|i| char::from_digit(((r.0 >> (i * 4)) & 0xf) as u32, 16).unwrap_or('0')).collect()
}

/// `keys` as a JSON array of strings (RFC 8259 §7 escapes). Rust strings are valid UTF-8,
/// so every character but `"`, `\\` and the controls is written as it is.
pub fn json_strings(keys: &[String]) -> String {
    let mut out = String::with_capacity(2 + keys.iter().map(|k| k.len() + 3).sum::<usize>());
    out.push('[');
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in k.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    out.push_str("\\u00");
                    out.push(char::from_digit(c as u32 >> 4, 16).unwrap_or('0'));
                    out.push(char::from_digit(c as u32 & 0xf, 16).unwrap_or('0'));
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push(']');
    out
}

struct Shared {
    r: RefCell<crate::replica::Replica>,
    host: Host,
    closed: Cell<bool>,
}

impl Shared {
    /// Runs `f` on the replica, then hands its outputs to the host (with no borrow held,
    /// so the host may call back in).
    fn run<T>(&self, f: impl FnOnce(&mut crate::replica::Replica) -> T) -> Result<T, JsValue> {
        let mut f = Some(f);
        let mut v = None;
        self.run_dyn(&mut |r| v = f.take().map(|f| f(r)))?;
        v.ok_or_else(closed)
    }

    /// [`Shared::run`]'s body, compiled once rather than once per call site (wasm size).
    #[inline(never)]
    fn run_dyn(&self, f: &mut dyn FnMut(&mut crate::replica::Replica)) -> Result<(), JsValue> {
        if self.closed.get() {
            return Err(closed());
        }
        let outs = {
            let mut r = self.r.borrow_mut();
            f(&mut r);
            r.take()
        };
        self.deliver(outs);
        Ok(())
    }

    #[inline(never)]
    fn deliver(&self, outs: Vec<Out>) {
        let h = &self.host;
        for o in outs {
            match o {
                Out::Relay(f) => h.relay(&f),
                Out::Tab(f) => h.tab(&f),
                Out::Change { doc, keys } => h.change(&doc, &json_strings(&keys)),
                Out::Persist { doc, seq, bytes } => h.persist(&doc, seq as f64, &bytes),
                Out::Dirty(doc) => h.dirty(&doc),
                Out::Online => h.online(),
                Out::Settled(id) => h.settled(id),
                Out::Error(m) => h.error(&m),
                Out::Refused { doc, message } => h.refused(&doc, &message),
                Out::Reidentified { old } => h.reidentified(&hex_id(old)),
            }
        }
    }
}

fn refused(e: Refused) -> JsValue {
    match e {
        Refused::NotOpen => error("document is not open; call client.open(id) first"),
        Refused::Doc(e) => doc_error(&e),
        Refused::NotAnUpdate => type_error("not a Concord update; pass the bytes of doc.encodeUpdate()"),
    }
}

/// A replica: its open documents and its sync session with the relay. Sans-IO: the
/// caller moves frames between it and the sockets, and stores what it is told to.
#[wasm_bindgen]
pub struct Replica(Rc<Shared>);

#[wasm_bindgen]
impl Replica {
    /// A replica with a fresh random id whose outputs go to `host`.
    #[wasm_bindgen(constructor)]
    pub fn new(host: Host) -> Replica {
        let r = crate::replica::Replica::new(fresh_id);
        Replica(Rc::new(Shared { r: RefCell::new(r), host, closed: Cell::new(false) }))
    }

    /// Which outputs the host wants: frames for other tabs (`tabs`), and outbox entries
    /// and snapshot marks (`persist`). Both are on until turned off; a client without a
    /// BroadcastChannel or without storage turns them off so no work is done for them.
    pub fn configure(&self, tabs: bool, persist: bool) {
        let mut r = self.0.r.borrow_mut();
        r.tabs = tabs;
        r.persist = persist;
    }

    /// This session's replica id, 16 hex digits (changes after amnesia).
    #[wasm_bindgen(getter, js_name = replicaId)]
    pub fn replica_id(&self) -> String {
        hex_id(self.0.r.borrow().id())
    }

    /// Opens `doc` empty; feed its stored state with `restore`, then call `announce`.
    pub fn open(&self, doc: &str) -> Result<DocHandle, JsValue> {
        if doc.is_empty() || doc.len() > MAX_DOC_ID {
            return Err(range_error("document ids must be 1 to 512 bytes long"));
        }
        self.0.run(|r| r.open(doc))?;
        Ok(DocHandle { s: self.0.clone(), id: doc.to_owned() })
    }

    /// Folds a stored snapshot (or outbox entry) into `doc`; false when unreadable.
    pub fn restore(&self, doc: &str, bytes: &[u8], snapshot: bool) -> Result<bool, JsValue> {
        self.0.run(|r| r.restore(doc, bytes, snapshot))
    }

    /// Tells the other tabs and the relay that `doc` is open.
    pub fn announce(&self, doc: &str) -> Result<(), JsValue> {
        self.0.run(|r| r.announce(doc))
    }

    /// `Document::encode()` of `doc` (empty when not open).
    pub fn snapshot(&self, doc: &str) -> Vec<u8> {
        self.0.r.borrow().snapshot(doc).unwrap_or_default()
    }

    /// A relay connection opened (`token`: sent in `Hello`).
    pub fn connected(&self, token: Option<String>) -> Result<(), JsValue> {
        self.0.run(|r| r.connected(token))
    }

    /// The relay connection closed.
    pub fn disconnected(&self) {
        self.0.r.borrow_mut().disconnected();
    }

    /// A frame from the relay.
    pub fn relay(&self, frame: &[u8]) -> Result<(), JsValue> {
        self.0.run(|r| r.relay(frame))
    }

    /// A frame from another tab.
    pub fn tab(&self, frame: &[u8]) -> Result<(), JsValue> {
        self.0.run(|r| r.tab(frame))
    }

    /// Sends the local writes made since the last call, one batch per document: call it
    /// once the task that wrote is done (a microtask), not after every write.
    pub fn flush(&self) -> Result<(), JsValue> {
        self.0.run(|r| r.flush())
    }

    /// Call every second while connected.
    pub fn tick(&self) -> Result<(), JsValue> {
        self.0.run(|r| r.tick())
    }

    /// Every later call throws. The documents are dropped now, not when the garbage
    /// collector finalizes the last JS handle: a page that opens and closes many clients
    /// gets their wasm memory back at once.
    pub fn close(&self) {
        self.0.closed.set(true);
        self.0.r.borrow_mut().clear();
    }
}

/// One open document.
#[wasm_bindgen]
pub struct DocHandle {
    s: Rc<Shared>,
    id: String,
}

/// A register or set value from JS: a [`Value`] in its wire encoding. `js/client.js`
/// walks JS values to and from these bytes (JSON rules: safe integers are `Int`, other
/// finite numbers `Float`, depth bounded): in JS that walk is a few lines, through
/// `js_sys` it was wasm code plus one imported glue function per JS operation.
fn value_of(bytes: &[u8]) -> Result<Value, JsValue> {
    whole(bytes).map_err(|_| type_error("malformed value bytes; pass values through the Doc API"))
}

/// A [`Value`] in its wire encoding, for `js/client.js` to turn into plain JS data.
pub fn bytes_of(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    v.put(&mut out);
    out
}

/// A counter increment from JS: a whole number of magnitude at most 2^53 - 1.
fn count(n: f64) -> Result<i64, JsValue> {
    if n.fract() == 0.0 && n.abs() <= 9_007_199_254_740_991.0 {
        Ok(n as i64)
    } else {
        Err(range_error("counter amounts must be whole numbers (safe integers)"))
    }
}

impl DocHandle {
    #[inline(never)]
    fn write_op(
        &self,
        op: &mut dyn FnMut(&mut Document) -> Result<Option<Delta>, DocError>,
    ) -> Result<bool, JsValue> {
        self.s.run(|r| r.write(&self.id, op))?.map_err(refused)
    }

    /// The open document, borrowed (not generic: compiled once for every reader).
    #[inline(never)]
    fn doc(&self) -> Result<Ref<'_, Document>, JsValue> {
        if self.s.closed.get() {
            return Err(closed());
        }
        Ref::filter_map(self.s.r.borrow(), |r| r.doc(&self.id)).map_err(|_| refused(Refused::NotOpen))
    }
}

/// The operations of [`DocHandle::write`], [`DocHandle::number`] and [`DocHandle::bytes`]:
/// one exported method per kind of result rather than one per operation, since each
/// export costs a wasm shim and a JS wrapper (`js/client.js` names them).
pub mod op {
    /// `write`: add `n >= 0` to the G-Counter.
    pub const INCREMENT: u8 = 0;
    /// `write`: add `n` (may be negative) to the PN-Counter.
    pub const PN_ADD: u8 = 1;
    /// `write`: set the register to `value`.
    pub const SET_REGISTER: u8 = 2;
    /// `write`: add `value` to the set.
    pub const SET_ADD: u8 = 3;
    /// `write`: remove `value` from the set (a no-op when absent).
    pub const SET_REMOVE: u8 = 4;
    /// `write`: `n` is 1 when the document has listeners for remote changes, 0 when it
    /// has none (no change is built then); `key` is unused. Changes nothing, and is a
    /// no-op on a closed client (which builds no changes).
    pub const LISTEN: u8 = 5;

    /// `number`: the G-Counter's value (0 when unset).
    pub const COUNTER: u8 = 0;
    /// `number`: the PN-Counter's value (0 when unset).
    pub const PN_COUNTER: u8 = 1;
    /// `number`: the type `key` holds: 0 none, else 1 + its [`concord_core::Kind`]'s
    /// index (1 counter, 2 pn-counter, 3 register, 4 set).
    pub const KIND: u8 = 2;
    /// `number`: 1 when the set holds `value`, else 0.
    pub const SET_HAS: u8 = 3;

    /// `bytes`: the register's value, encoded; empty when never written.
    pub const REGISTER: u8 = 0;
    /// `bytes`: the set's elements, sorted, as an encoded array.
    pub const SET_VALUES: u8 = 1;
    /// `bytes`: the whole document as an encoded object (`{ likes: 1, tags: [..] }`).
    pub const DOCUMENT: u8 = 2;
    /// `bytes`: the keys, sorted, as an encoded array of strings.
    pub const KEYS: u8 = 3;
    /// `bytes`: the document's version vector, encoded (for [`super::DocHandle::update`]).
    pub const VERSION: u8 = 4;
}

#[wasm_bindgen]
impl DocHandle {
    /// A local write: `op` (an [`op`] write) on `key`, with the amount `n` (counters) or
    /// the encoded [`Value`] `value` (registers and sets; `undefined` for counters, which
    /// saves an allocation per call). Returns whether the document
    /// changed: the caller tells the listeners (the key is its own; nothing crosses back).
    pub fn write(&self, op: u8, key: &str, n: f64, value: Option<Box<[u8]>>) -> Result<bool, JsValue> {
        let value = value.as_deref().unwrap_or_default();
        match op {
            op::INCREMENT | op::PN_ADD => {
                let n = count(n)?;
                if op == op::PN_ADD {
                    return self.write_op(&mut |d| d.pn_add(key, n).map(Some));
                }
                if n < 0 {
                    return Err(range_error("a counter only grows: increment by n >= 0, or use a pnCounter"));
                }
                self.write_op(&mut |d| d.increment(key, n as u64).map(Some))
            }
            op::SET_REGISTER => {
                let mut v = value_of(value)?;
                let now = js_sys::Date::now() as u64;
                self.write_op(&mut |d| d.set_register(key, std::mem::take(&mut v), now).map(Some))
            }
            op::SET_ADD => {
                let mut v = value_of(value)?;
                self.write_op(&mut |d| d.set_add(key, std::mem::take(&mut v)).map(Some))
            }
            op::SET_REMOVE => {
                let v = value_of(value)?;
                self.write_op(&mut |d| d.set_remove(key, &v))
            }
            op::LISTEN => {
                if !self.s.closed.get() {
                    self.s.run(|r| r.listen(&self.id, n != 0.0))?;
                }
                Ok(false)
            }
            _ => Err(range_error("unknown write")),
        }
    }

    /// A number about `key`: `op` is an [`op`] read (`value`: for `SET_HAS`).
    pub fn number(&self, op: u8, key: &str, value: Option<Box<[u8]>>) -> Result<f64, JsValue> {
        let value = value.as_deref().unwrap_or_default();
        let v = if op == op::SET_HAS { Some(value_of(value)?) } else { None };
        let d = self.doc()?;
        Ok(match (op, v) {
            (op::COUNTER, _) => d.counter(key) as f64,
            (op::PN_COUNTER, _) => d.pn_counter(key) as f64,
            (op::KIND, _) => d.kind_of(key).map_or(0.0, |k| f64::from(k as u8 + 1)),
            (_, Some(v)) => f64::from(u8::from(d.set_contains(key, &v))),
            _ => return Err(range_error("unknown read")),
        })
    }

    /// Encoded [`Value`]s: `op` is an [`op`] read of bytes.
    pub fn bytes(&self, op: u8, key: &str) -> Result<Vec<u8>, JsValue> {
        let d = self.doc()?;
        Ok(match op {
            op::REGISTER => d.register(key).map_or_else(Vec::new, |(v, _)| bytes_of(v)),
            op::SET_VALUES => bytes_of(&Value::Array(d.set_values(key))),
            op::DOCUMENT => bytes_of(&d.to_value()),
            op::KEYS => {
                let mut keys: Vec<&str> = d.keys().collect();
                concord_core::sort::sort(&mut keys);
                bytes_of(&Value::Array(keys.into_iter().map(Value::from).collect()))
            }
            op::VERSION => {
                let mut out = Vec::new();
                d.version().put(&mut out);
                out
            }
            _ => return Err(range_error("unknown read")),
        })
    }

    /// What a replica at version `since` (the bytes of a `VERSION` read; empty: a replica
    /// with nothing) lacks of this document, as one update for [`DocHandle::apply_update`].
    pub fn update(&self, since: &[u8]) -> Result<Vec<u8>, JsValue> {
        let since = if since.is_empty() {
            None
        } else {
            let vv = whole::<VersionVector>(since).and_then(|vv| vv.validate().map(|()| vv));
            Some(vv.map_err(|_| type_error("not a version; pass the bytes of doc.version()"))?)
        };
        if self.s.closed.get() {
            return Err(closed());
        }
        self.s.r.borrow().encode_update(&self.id, since.as_ref()).ok_or_else(|| refused(Refused::NotOpen))
    }

    /// Joins an update from [`DocHandle::update`] (of this or any other document) into
    /// this document; listeners, other tabs, the relay and storage hear of what is new.
    #[wasm_bindgen(js_name = applyUpdate)]
    pub fn apply_update(&self, bytes: &[u8]) -> Result<(), JsValue> {
        self.s.run(|r| r.apply_update(&self.id, bytes))?.map_err(refused)
    }

    /// `undefined` when the relay holds everything this replica has of the document now
    /// and this replica has caught up with the relay; else the id the host's `settled`
    /// will be called with once it does.
    #[wasm_bindgen(js_name = waitSynced)]
    pub fn wait_synced(&self) -> Result<Option<u32>, JsValue> {
        self.s.run(|r| r.wait_synced(&self.id))?.map_err(refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lists_are_json_string_arrays() {
        let keys = |ks: &[&str]| json_strings(&ks.iter().map(|k| k.to_string()).collect::<Vec<_>>());
        assert_eq!(keys(&[]), "[]");
        assert_eq!(keys(&["a", ""]), r#"["a",""]"#);
        assert_eq!(keys(&["say \"hi\"", "a\\b"]), r#"["say \"hi\"","a\\b"]"#);
        assert_eq!(
            keys(&["\n\t\u{1}\u{1f}", "ü😀\u{7f}"]),
            "[\"\\u000a\\u0009\\u0001\\u001f\",\"ü😀\u{7f}\"]"
        );
    }

    #[test]
    fn hex_ids_match_the_display_form() {
        for id in [0, 7, 0xdead_beef, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(hex_id(ReplicaId(id)), ReplicaId(id).to_string());
        }
    }
}
