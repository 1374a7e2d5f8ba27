//! The replica: open documents, their persistence, and the two transports.
//!
//! One [`Client`] per `Client.connect()`. It owns every open [`Document`], a sync
//! [`Session`] with the current relay connection, a `BroadcastChannel` to the other tabs
//! and an IndexedDB [`Store`]. All protocol decisions are the core's ([`Session`],
//! [`Document`]); this module only moves bytes and keeps the bookkeeping of what is
//! durable where.
//!
//! **Replica ids.** Each client draws a fresh random id when it starts and never reuses
//! it (as Automerge and Yjs do per document load). Stored documents are re-identified to
//! the new id on load. Reusing an id after a reload would need exclusive ownership of the
//! stored state (two tabs share one IndexedDB) and a durable "highest seq ever minted";
//! a fresh id makes dot reuse impossible by construction, at the cost of one version
//! vector entry per client session that writes.
//!
//! **Writes.** A local write is applied, shown to listeners, sent to the other tabs and
//! the relay, and queued for IndexedDB, all in the same call; the queue is flushed in the
//! next task (an outbox put per write), snapshots at most every [`SNAPSHOT_MS`].
//!
//! **Relay.** WebSocket to `urls[i]`; on failure or close, the next URL after an
//! exponential backoff with jitter ([`backoff`]). A connection is "online" once the relay
//! answered `Hello`. [`Session::tick`] runs every [`TICK_MS`]: it re-sends stalled
//! subscriptions and refreshes settled ones, whose answers double as liveness probes.
//!
//! Listeners are called after every internal borrow is released, so they may call back
//! into the client.

use crate::channel::{self, Channel};
use crate::error::{closed, doc_error, error, range_error, type_error};
use crate::js::{self, Timer};
use crate::store::{self, Batch, Loaded, Store};
use crate::vecmap::{Names, VecMap};
use concord_core::sync::msg::{Deltas, Subscribe, MAX_DOC_ID};
use concord_core::sync::{DocStore, ErrorCode, Event, Msg, Session, SessionConfig, SyncError};
use concord_core::{CausalContext, Delta, DocConfig, DocError, Document, ReplicaId, VersionVector};
use js_sys::{Array, Function, Promise, Reflect, Uint8Array};
use std::cell::RefCell;
use std::rc::{Rc, Weak};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::{BinaryType, MessageEvent, WebSocket};

/// Minimum time between two snapshots of a document.
pub const SNAPSHOT_MS: f64 = 1000.0;
/// Period of [`Session::tick`].
pub const TICK_MS: f64 = 1000.0;
/// A connection that has not said hello after this long is given up.
pub const CONNECT_TIMEOUT_MS: f64 = 10_000.0;
/// An online connection silent for this long (while subscribed) is presumed dead.
pub const SILENCE_MS: f64 = 75_000.0;

/// Delay before reconnect attempt `attempt` (0-based): 250 ms doubling up to 30 s, with
/// "equal jitter" (half fixed, half random) so a fleet of tabs does not reconnect in step.
pub fn backoff(attempt: u32, random: f64) -> f64 {
    let cap = (250.0 * 2f64.powi(attempt.min(16) as i32)).min(30_000.0);
    cap / 2.0 + cap / 2.0 * random
}

/// Connection state, as `client.status` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Status {
    /// A connection attempt is under way.
    Connecting,
    /// The relay answered `Hello`.
    Online,
    /// No connection (waiting to retry, no relay configured, or closed).
    #[default]
    Offline,
}

impl Status {
    /// The string JS sees.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Connecting => "connecting",
            Status::Online => "online",
            Status::Offline => "offline",
        }
    }
}

/// What `Client.connect()` accepts.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Relay URLs, in failover order.
    pub urls: Vec<String>,
    /// Auth token sent in `Hello`.
    pub token: Option<String>,
    /// Use IndexedDB where the runtime has it.
    pub persist: bool,
    /// WebSocket constructor (default `globalThis.WebSocket`).
    pub web_socket: Option<Function>,
    /// BroadcastChannel name, or `None` for no tab-to-tab sync.
    pub channel: Option<String>,
    /// IndexedDB database name.
    pub database: String,
}

impl Options {
    /// Reads and checks a JS options object.
    pub fn from_js(o: &JsValue) -> Result<Options, JsValue> {
        let get = |k: &str| -> Result<JsValue, JsValue> {
            if o.is_undefined() || o.is_null() {
                Ok(JsValue::UNDEFINED)
            } else {
                Reflect::get(o, &k.into())
            }
        };
        let mut opts = Options {
            persist: true,
            channel: Some("concord".into()),
            database: "concord".into(),
            ..Options::default()
        };
        let urls = get("urls")?;
        if !urls.is_undefined() {
            if !Array::is_array(&urls) {
                return Err(type_error("options.urls must be an array of ws:// or wss:// URLs"));
            }
            for u in urls.unchecked_into::<Array>().iter() {
                match u.as_string() {
                    Some(s) if s.starts_with("ws://") || s.starts_with("wss://") => opts.urls.push(s),
                    _ => return Err(type_error("options.urls must hold ws:// or wss:// URL strings")),
                }
            }
        }
        let token = get("token")?;
        if !token.is_undefined() && !token.is_null() {
            opts.token = Some(token.as_string().ok_or_else(|| type_error("options.token must be a string"))?);
        }
        let persist = get("persist")?;
        if !persist.is_undefined() {
            opts.persist =
                persist.as_bool().ok_or_else(|| type_error("options.persist must be a boolean"))?;
        }
        let mut ws = get("webSocket")?;
        if ws.is_undefined() || ws.is_null() {
            ws = Reflect::get(&js_sys::global(), &"WebSocket".into())?;
        }
        if ws.is_function() {
            opts.web_socket = Some(ws.unchecked_into());
        } else if !opts.urls.is_empty() {
            return Err(type_error(
                "this runtime has no WebSocket: pass options.webSocket (in Node: `import WebSocket from \"ws\"`)",
            ));
        }
        let channel = get("broadcast")?;
        if channel.as_bool() == Some(false) {
            opts.channel = None;
        } else if let Some(name) = channel.as_string() {
            opts.channel = Some(name);
        } else if !(channel.is_undefined() || channel.as_bool() == Some(true)) {
            return Err(type_error("options.broadcast must be a boolean or a channel name"));
        }
        let db = get("database")?;
        if let Some(name) = db.as_string() {
            opts.database = name;
        } else if !db.is_undefined() {
            return Err(type_error("options.database must be a string"));
        }
        Ok(opts)
    }
}

/// A call to make once no borrow is held: `f(a, b)`.
type Call = (Function, JsValue, JsValue);

/// One open document.
struct Entry {
    doc: Document,
    /// Outbox keys written (or queued) and not yet covered by a snapshot of ours.
    unsnapped: Vec<JsValue>,
    /// Snapshot keys merged into this document, to delete with our next snapshot.
    stale: Vec<JsValue>,
    /// What the relay is known to hold: its `Synced`/`Ack` versions and the dots it sent.
    relay_has: CausalContext,
    /// The relay answered our subscription at least once.
    caught_up: bool,
    listener: Option<Function>,
    /// `synced()` promises: (version to reach, resolve, reject).
    waiters: Vec<(VersionVector, Function, Function)>,
}

impl Entry {
    fn new(doc: Document) -> Entry {
        Entry {
            doc,
            unsnapped: Vec::new(),
            stale: Vec::new(),
            relay_has: CausalContext::default(),
            caught_up: false,
            listener: None,
            waiters: Vec::new(),
        }
    }

    fn change(&self, calls: &mut Vec<Call>, local: bool, keys: Array) {
        if let Some(f) = &self.listener {
            calls.push((f.clone(), local.into(), keys.into()));
        }
    }

    fn all_keys(&self) -> Array {
        self.doc.keys().map(JsValue::from_str).collect()
    }

    fn is_synced(&self, target: &VersionVector) -> bool {
        self.caught_up && target.le(&self.relay_has.vv)
    }

    fn settle_waiters(&mut self, calls: &mut Vec<Call>) {
        let (done, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|(t, _, _)| self.caught_up && t.le(&self.relay_has.vv));
        self.waiters = wait;
        calls.extend(done.into_iter().map(|(_, ok, _)| (ok, JsValue::UNDEFINED, JsValue::UNDEFINED)));
    }
}

/// The open documents, as a [`DocStore`] for the session.
struct Docs<'a>(&'a mut VecMap<Entry>);

impl DocStore for Docs<'_> {
    fn doc(&mut self, id: &str) -> Option<&mut Document> {
        self.0.get_mut(id).map(|e| &mut e.doc)
    }
}

/// One WebSocket and its event handler.
struct Conn {
    ws: WebSocket,
    _handler: Closure<dyn FnMut(web_sys::Event)>,
}

impl Conn {
    fn send(&self, frame: &[u8]) {
        // A copy, not a view of wasm memory: `ws` in Node may read it asynchronously.
        let _ = self.ws.send_with_js_u8_array(&Uint8Array::from(frame));
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.ws.set_onopen(None);
        self.ws.set_onmessage(None);
        self.ws.set_onclose(None);
        self.ws.set_onerror(None);
        let _ = self.ws.close();
    }
}

/// The relay side.
#[derive(Default)]
struct Net {
    idx: usize,
    attempt: u32,
    /// Bumped per connection; events of older sockets are ignored.
    gen: u32,
    conn: Option<Conn>,
    /// The previous connection, kept until the next one: its handler may be running.
    dead: Option<Conn>,
    session: Option<Session>,
    online: bool,
    /// The status last reported to the listener.
    reported: Status,
    last_rx: f64,
    retry: Timer,
    tick: Timer,
}

struct State {
    opts: Options,
    replica: ReplicaId,
    closed: bool,
    docs: VecMap<Entry>,
    store: Option<Rc<Store>>,
    channel: Option<Channel>,
    net: Net,
    /// Local deltas not yet written to IndexedDB.
    to_persist: Vec<(String, Delta)>,
    /// Documents changed since their last snapshot.
    dirty: Names,
    writing: bool,
    last_snapshot: f64,
    flush: Timer,
    flush_at: f64,
    listener: Option<Function>,
}

struct Inner {
    st: RefCell<State>,
    on_flush: Closure<dyn FnMut()>,
    on_tick: Closure<dyn FnMut()>,
    on_retry: Closure<dyn FnMut()>,
}

/// A replica: cheap to clone (shared).
#[derive(Clone)]
pub struct Client(Rc<Inner>);

fn deliver(calls: Vec<Call>) {
    for (f, a, b) in calls {
        let _ = f.call2(&JsValue::UNDEFINED, &a, &b);
    }
}

fn timer_cb(weak: &Weak<Inner>, f: fn(&Client)) -> Closure<dyn FnMut()> {
    let weak = weak.clone();
    Closure::new(move || {
        if let Some(inner) = weak.upgrade() {
            f(&Client(inner));
        }
    })
}

fn new_replica_id() -> ReplicaId {
    loop {
        let id = js::random_u64();
        if id != 0 {
            return ReplicaId(id);
        }
    }
}

/// Folds stored snapshots and outbox entries into one document owned by `replica`.
/// Returns the document, the keys it covers, and messages about unreadable entries.
fn restore(replica: ReplicaId, loaded: Loaded) -> (Document, Vec<JsValue>, Vec<JsValue>, Vec<String>) {
    let mut doc: Option<Document> = None;
    let (mut stale, mut outbox, mut problems) = (Vec::new(), Vec::new(), Vec::new());
    for (key, bytes) in loaded.snapshots {
        let mut d = match Document::decode(&bytes, DocConfig::default()) {
            Ok(d) => d,
            // Left in place: a newer version of concord may read it.
            Err(e) => {
                problems.push(format!("a stored snapshot could not be read ({e}); it was left in place"));
                continue;
            }
        };
        d.reidentify(replica);
        stale.push(key);
        match &mut doc {
            None => doc = Some(d),
            Some(base) => merge_into(base, &d),
        }
    }
    let mut doc = doc.unwrap_or_else(|| Document::new(replica));
    for (key, bytes) in loaded.outbox {
        match Delta::decode(&bytes) {
            Ok(d) => {
                let _ = doc.apply(d);
                outbox.push(key);
            }
            Err(e) => problems.push(format!("a stored write could not be read ({e}); it was left in place")),
        }
    }
    (doc, stale, outbox, problems)
}

/// Joins `other` into `base`: by deltas when `other`'s log reaches back, else by state.
fn merge_into(base: &mut Document, other: &Document) {
    if other.version().le(base.version()) {
        return;
    }
    match other.deltas_since(base.version()) {
        Some(ds) => {
            for d in ds {
                let _ = base.apply(d.clone());
            }
        }
        None => {
            let _ = base.merge_state(&other.all_fields(), other.context(), other.version());
        }
    }
}

impl State {
    fn entry(&mut self, doc: &str) -> Result<&mut Entry, JsValue> {
        if self.closed {
            return Err(closed());
        }
        self.docs.get_mut(doc).ok_or_else(|| error("document is not open; call client.open(id) first"))
    }

    fn send(&self, msgs: Vec<Msg>) {
        if let Some(c) = &self.net.conn {
            for m in msgs {
                c.send(&m.encode());
            }
        }
    }

    /// Records whether the connection is online and reports a changed status.
    fn set_status(&mut self, s: Status, calls: &mut Vec<Call>) {
        self.net.online = s == Status::Online;
        let now = self.status();
        if now != self.net.reported {
            self.net.reported = now;
            self.emit("status", now.as_str().into(), calls);
        }
    }

    fn status(&self) -> Status {
        match (&self.net.conn, self.net.online) {
            (Some(_), true) => Status::Online,
            (Some(_), false) => Status::Connecting,
            (None, _) => Status::Offline,
        }
    }

    fn emit(&self, kind: &str, v: JsValue, calls: &mut Vec<Call>) {
        if let Some(f) = &self.listener {
            calls.push((f.clone(), kind.into(), v));
        }
    }

    /// A delta applied here (local, or from another tab): to the relay, to IndexedDB.
    fn forward(&mut self, doc: &str, deltas: &[Delta], local: bool) {
        if let Some(s) = &mut self.net.session {
            let msgs = s.on_local_deltas(doc, deltas);
            self.send(msgs);
        }
        if local && self.store.is_some() {
            self.to_persist.extend(deltas.iter().map(|d| (doc.to_owned(), d.clone())));
        }
        self.dirty.add(doc);
    }

    fn schedule_flush(&mut self, cb: &Closure<dyn FnMut()>, delay: f64) {
        if self.store.is_none() || self.closed || (self.dirty.is_empty() && self.to_persist.is_empty()) {
            return;
        }
        let at = js::now() + delay;
        if !self.flush.is_armed() || at < self.flush_at {
            self.flush_at = at;
            self.flush.arm(cb.as_ref().unchecked_ref(), delay);
        }
    }

    /// Takes what is due for IndexedDB: queued outbox entries, and snapshots of dirty
    /// documents (at most every [`SNAPSHOT_MS`], or all of them when `force`).
    fn take_batch(&mut self, force: bool) -> Batch {
        let now = js::now();
        let mut batch = Batch::default();
        let snap: Vec<String> =
            if force || now - self.last_snapshot >= SNAPSHOT_MS { self.dirty.take() } else { Vec::new() };
        if !snap.is_empty() {
            self.last_snapshot = now;
        }
        for (doc, delta) in std::mem::take(&mut self.to_persist) {
            // A snapshot written in this same transaction covers it.
            if snap.contains(&doc) {
                continue;
            }
            if let Some(e) = self.docs.get_mut(&doc) {
                let key = store::outbox_key(&doc, delta.dot);
                e.unsnapped.push(key.clone());
                batch.outbox.push((key, delta.encode()));
            }
        }
        for doc in snap {
            if let Some(e) = self.docs.get_mut(&doc) {
                batch.snapshots.push((store::snapshot_key(&doc, self.replica), e.doc.encode()));
                batch.drop_outbox.append(&mut e.unsnapped);
                batch.drop_snapshots.append(&mut e.stale);
            }
        }
        batch
    }

    /// Handles the frames' events. Returns true when the replica must take a new id.
    fn on_events(&mut self, events: Vec<Event>, calls: &mut Vec<Call>) -> bool {
        let mut amnesia = false;
        for ev in events {
            match ev {
                Event::PeerHello { .. } => {
                    self.net.attempt = 0;
                    self.net.retry.cancel();
                    self.set_status(Status::Online, calls);
                }
                Event::Applied { doc, deltas } => {
                    if let Some(e) = self.docs.get_mut(&doc) {
                        for d in &deltas {
                            e.relay_has.insert(d.dot);
                        }
                        e.change(calls, false, deltas.iter().map(|d| JsValue::from_str(&d.key)).collect());
                        e.settle_waiters(calls);
                        self.dirty.add(&doc);
                    }
                }
                Event::StateMerged { doc } => {
                    if let Some(e) = self.docs.get(&doc) {
                        e.change(calls, false, e.all_keys());
                        self.dirty.add(&doc);
                    }
                }
                Event::Synced { doc, vv } | Event::Acked { doc, vv } => {
                    if let Some(e) = self.docs.get_mut(&doc) {
                        e.caught_up |= self.net.session.as_ref().is_some_and(|s| s.is_synced(&doc));
                        e.relay_has.absorb(&vv);
                        e.settle_waiters(calls);
                    }
                }
                Event::PeerError(m) if m.code == ErrorCode::AMNESIA => amnesia = true,
                Event::PeerError(m) => {
                    let msg = format!("relay error ({}): {}", m.code.name(), m.message);
                    self.emit("error", error(&msg), calls);
                }
                _ => {}
            }
        }
        amnesia
    }
}

impl Client {
    /// Starts a replica: opens IndexedDB and the BroadcastChannel, and starts connecting
    /// to the first relay in the background.
    pub async fn start(opts: Options) -> Result<Client, JsValue> {
        let store = match opts.persist {
            true => Store::open(&opts.database).await.map_err(|e| {
                let why =
                    Reflect::get(&e, &"message".into()).ok().and_then(|m| m.as_string()).unwrap_or_default();
                error(&format!(
                    "could not open IndexedDB ({why}); pass persist: false to keep documents in memory"
                ))
            })?,
            false => None,
        }
        .map(Rc::new);
        let inner = Rc::new_cyclic(|weak: &Weak<Inner>| Inner {
            st: RefCell::new(State {
                opts,
                replica: new_replica_id(),
                closed: false,
                docs: VecMap::default(),
                store,
                channel: None,
                net: Net::default(),
                to_persist: Vec::new(),
                dirty: Names::default(),
                writing: false,
                last_snapshot: 0.0,
                flush: Timer::default(),
                flush_at: 0.0,
                listener: None,
            }),
            on_flush: timer_cb(weak, Client::flush),
            on_tick: timer_cb(weak, Client::tick),
            on_retry: timer_cb(weak, Client::retry),
        });
        let client = Client(inner);
        let name = client.0.st.borrow().opts.channel.clone();
        if let Some(name) = name {
            let weak = Rc::downgrade(&client.0);
            let on_message = Closure::new(move |ev: MessageEvent| {
                if let Some(inner) = weak.upgrade() {
                    Client(inner).on_channel(ev.data());
                }
            });
            let ch = Channel::open(&name, on_message)?;
            client.0.st.borrow_mut().channel = Some(ch);
        }
        client.connect();
        Ok(client)
    }

    /// This session's replica id (16 hex digits).
    pub fn replica_id(&self) -> String {
        store::hex_id(self.0.st.borrow().replica)
    }

    /// "connecting" | "online" | "offline".
    pub fn status(&self) -> Status {
        self.0.st.borrow().status()
    }

    /// Sets the client listener: `f("status", status)` and `f("error", Error)`.
    pub fn set_listener(&self, f: Option<Function>) {
        self.0.st.borrow_mut().listener = f;
    }

    /// Loads `doc_id` (from IndexedDB where enabled), then subscribes to it on the relay
    /// and asks the other tabs for what they have.
    pub async fn open(&self, doc_id: &str) -> Result<(), JsValue> {
        if doc_id.is_empty() || doc_id.len() > MAX_DOC_ID {
            return Err(range_error("document ids must be 1 to 512 bytes long"));
        }
        let store = {
            let st = self.0.st.borrow();
            if st.closed {
                return Err(closed());
            }
            if st.docs.contains_key(doc_id) {
                return Ok(());
            }
            st.store.clone()
        };
        let loaded = match store {
            Some(s) => Some(s.load(doc_id).await?),
            None => None,
        };
        let mut calls = Vec::new();
        {
            let mut st = self.0.st.borrow_mut();
            let st = &mut *st;
            if st.closed {
                return Err(closed());
            }
            if st.docs.contains_key(doc_id) {
                return Ok(()); // opened meanwhile by a concurrent open()
            }
            let entry = match loaded {
                Some(l) => {
                    let (doc, stale, outbox, problems) = restore(st.replica, l);
                    for p in problems {
                        st.emit("error", error(&p), &mut calls);
                    }
                    let mut e = Entry::new(doc);
                    if !stale.is_empty() || !outbox.is_empty() {
                        st.dirty.add(doc_id);
                    }
                    e.stale = stale;
                    e.unsnapped = outbox;
                    e
                }
                None => Entry::new(Document::new(st.replica)),
            };
            let vv = entry.doc.version().clone();
            st.docs.insert(doc_id.to_owned(), entry);
            if let Some(ch) = &st.channel {
                ch.post(&Msg::Subscribe(Subscribe { doc: doc_id.to_owned(), vv }).encode());
            }
            if let Some(s) = &mut st.net.session {
                let msgs = s.subscribe(doc_id, &mut Docs(&mut st.docs));
                st.send(msgs);
            }
            st.schedule_flush(&self.0.on_flush, SNAPSHOT_MS);
        }
        deliver(calls);
        Ok(())
    }

    /// Reads an open document.
    pub fn read<T>(&self, doc: &str, f: impl FnOnce(&Document) -> T) -> Result<T, JsValue> {
        let mut st = self.0.st.borrow_mut();
        Ok(f(&st.entry(doc)?.doc))
    }

    /// Makes a local write: `op` returns the delta (or `None` for a no-op).
    pub fn write(
        &self,
        doc: &str,
        op: &mut dyn FnMut(&mut Document) -> Result<Option<Delta>, DocError>,
    ) -> Result<(), JsValue> {
        let mut calls = Vec::new();
        {
            let mut st = self.0.st.borrow_mut();
            let st = &mut *st;
            let e = st.entry(doc)?;
            let Some(delta) = op(&mut e.doc).map_err(|e| doc_error(&e))? else { return Ok(()) };
            e.change(&mut calls, true, Array::of1(&JsValue::from_str(&delta.key)));
            if let Some(ch) = &st.channel {
                let frame = Msg::Deltas(Deltas { doc: doc.to_owned(), deltas: vec![delta.clone()] }).encode();
                ch.post(&frame);
            }
            st.forward(doc, std::slice::from_ref(&delta), true);
            st.schedule_flush(&self.0.on_flush, 0.0);
        }
        deliver(calls);
        Ok(())
    }

    /// Sets the change listener of `doc`: `f(local: boolean, keys: string[])`.
    pub fn set_doc_listener(&self, doc: &str, f: Option<Function>) -> Result<(), JsValue> {
        self.0.st.borrow_mut().entry(doc)?.listener = f;
        Ok(())
    }

    /// A promise that resolves once the relay holds (durably) everything this replica
    /// has of `doc` now, and this replica has caught up with the relay.
    pub fn synced(&self, doc: &str) -> Result<Promise, JsValue> {
        let mut st = self.0.st.borrow_mut();
        if st.opts.urls.is_empty() {
            return Err(error("synced() needs a relay: pass options.urls to Client.connect()"));
        }
        let e = st.entry(doc)?;
        let target = e.doc.version().clone();
        if e.is_synced(&target) {
            return Ok(Promise::resolve(&JsValue::UNDEFINED));
        }
        let mut slot = None;
        let p = Promise::new(&mut |ok, err| slot = Some((ok, err)));
        if let Some((ok, err)) = slot {
            e.waiters.push((target, ok, err));
        }
        Ok(p)
    }

    /// Stops everything: sockets, timers, the channel. Pending writes are still flushed
    /// to IndexedDB. Pending `synced()` promises reject.
    pub fn close(&self) {
        let mut calls = Vec::new();
        let store = {
            let mut st = self.0.st.borrow_mut();
            let st = &mut *st;
            if st.closed {
                return;
            }
            st.net.retry.cancel();
            st.net.tick.cancel();
            st.flush.cancel();
            st.net.session = None;
            st.net.conn = None;
            st.net.dead = None;
            st.set_status(Status::Offline, &mut calls);
            st.closed = true;
            st.channel = None;
            for e in st.docs.values_mut() {
                for (_, _, err) in e.waiters.drain(..) {
                    calls.push((err, closed(), JsValue::UNDEFINED));
                }
                e.listener = None;
            }
            st.listener = None;
            let batch = if st.store.is_some() { st.take_batch(true) } else { Batch::default() };
            st.store.take().map(|s| (s, batch))
        };
        if let Some((s, batch)) = store {
            if !batch.is_empty() {
                let _ = s.write(batch);
            }
            s.close();
        }
        deliver(calls);
    }

    // ---- persistence ----

    fn flush(&self) {
        let (p, mut calls) = {
            let mut st = self.0.st.borrow_mut();
            let st = &mut *st;
            st.flush.fired();
            if st.writing || st.closed {
                return;
            }
            let Some(store) = st.store.clone() else { return };
            let batch = st.take_batch(false);
            if !st.dirty.is_empty() {
                let wait = (st.last_snapshot + SNAPSHOT_MS - js::now()).max(0.0);
                st.schedule_flush(&self.0.on_flush, wait);
            }
            if batch.is_empty() {
                return;
            }
            let mut calls = Vec::new();
            match store.write(batch) {
                Ok(p) => {
                    st.writing = true;
                    (p, calls)
                }
                Err(e) => {
                    st.emit("error", e, &mut calls);
                    (Promise::resolve(&JsValue::UNDEFINED), calls)
                }
            }
        };
        deliver(std::mem::take(&mut calls));
        let me = self.clone();
        wasm_bindgen_futures::spawn_local(async move {
            let r = wasm_bindgen_futures::JsFuture::from(p).await;
            me.written(r.err());
        });
    }

    fn written(&self, failure: Option<JsValue>) {
        let mut calls = Vec::new();
        {
            let mut st = self.0.st.borrow_mut();
            let st = &mut *st;
            st.writing = false;
            if let Some(e) = failure {
                // Nothing of the batch is known to be durable: snapshot everything again.
                let docs: Vec<String> = st.docs.keys().cloned().collect();
                for d in docs {
                    st.dirty.add(&d);
                }
                let msg = "could not save to IndexedDB (is the disk full?); will retry";
                st.emit("error", error(msg), &mut calls);
                let _ = e;
            }
            if !st.to_persist.is_empty() {
                st.schedule_flush(&self.0.on_flush, 0.0);
            } else if !st.dirty.is_empty() {
                st.schedule_flush(&self.0.on_flush, SNAPSHOT_MS);
            }
        }
        deliver(calls);
    }

    // ---- other tabs ----

    fn on_channel(&self, data: JsValue) {
        let Some(bytes) = data.dyn_ref::<Uint8Array>().map(Uint8Array::to_vec) else { return };
        let mut calls = Vec::new();
        let mut amnesia = false;
        {
            let mut st = self.0.st.borrow_mut();
            let st = &mut *st;
            if st.closed {
                return;
            }
            if let Some((doc_id, snapshot)) = channel::decode_state(&bytes) {
                let Some(e) = st.docs.get_mut(doc_id) else { return };
                let Ok(other) = Document::decode(snapshot, DocConfig::default()) else { return };
                if e.doc.check_amnesia(other.version()).is_err() {
                    amnesia = true;
                } else {
                    let before = e.doc.version().clone();
                    merge_into(&mut e.doc, &other);
                    if e.doc.version() != &before {
                        e.change(&mut calls, false, e.all_keys());
                        st.dirty.add(doc_id);
                        st.schedule_flush(&self.0.on_flush, SNAPSHOT_MS);
                    }
                }
            } else {
                match Msg::decode(&bytes) {
                    Ok(Msg::Deltas(m)) => {
                        let Some(e) = st.docs.get_mut(&m.doc) else { return };
                        let mut applied = Vec::new();
                        for d in m.deltas {
                            if let Err(DocError::Amnesia { .. }) = e.doc.apply_into(d, &mut applied) {
                                amnesia = true;
                            }
                        }
                        if !applied.is_empty() {
                            e.change(
                                &mut calls,
                                false,
                                applied.iter().map(|d| JsValue::from_str(&d.key)).collect(),
                            );
                            st.forward(&m.doc, &applied, false);
                            st.schedule_flush(&self.0.on_flush, SNAPSHOT_MS);
                        }
                    }
                    Ok(Msg::Subscribe(m)) => {
                        let Some(e) = st.docs.get_mut(&m.doc) else { return };
                        if e.doc.check_amnesia(&m.vv).is_err() {
                            amnesia = true;
                        } else if let Some(ch) = &st.channel {
                            answer_tab(ch, &m.doc, &mut e.doc, &m.vv);
                        }
                    }
                    _ => {}
                }
            }
        }
        deliver(calls);
        if amnesia {
            self.reidentify();
        }
    }

    // ---- the relay ----

    fn connect(&self) {
        let mut calls = Vec::new();
        let failed = {
            let mut st = self.0.st.borrow_mut();
            let st = &mut *st;
            if st.closed || st.opts.urls.is_empty() {
                return;
            }
            let Some(ctor) = st.opts.web_socket.clone() else { return };
            let url = st.opts.urls[st.net.idx % st.opts.urls.len()].clone();
            st.net.gen = st.net.gen.wrapping_add(1);
            let gen = st.net.gen;
            match Reflect::construct(&ctor, &Array::of1(&url.into())) {
                Ok(ws) => {
                    self.attach(st, ws.unchecked_into(), gen, &mut calls);
                    None
                }
                Err(e) => {
                    st.emit("error", e, &mut calls);
                    Some(gen)
                }
            }
        };
        deliver(calls);
        if let Some(gen) = failed {
            self.fail(gen);
        }
    }

    fn attach(&self, st: &mut State, ws: WebSocket, gen: u32, calls: &mut Vec<Call>) {
        {
            ws.set_binary_type(BinaryType::Arraybuffer);
            let weak = Rc::downgrade(&self.0);
            let handler = Closure::<dyn FnMut(web_sys::Event)>::new(move |ev: web_sys::Event| {
                let Some(inner) = weak.upgrade() else { return };
                let c = Client(inner);
                match ev.type_().as_str() {
                    "open" => c.on_open(gen),
                    "message" => c.on_message(gen, ev.unchecked_ref::<MessageEvent>().data()),
                    _ => c.fail(gen),
                }
            });
            let f: &Function = handler.as_ref().unchecked_ref();
            ws.set_onopen(Some(f));
            ws.set_onmessage(Some(f));
            ws.set_onclose(Some(f));
            ws.set_onerror(Some(f));
            st.net.dead = st.net.conn.replace(Conn { ws, _handler: handler });
            st.net.online = false;
            st.net.retry.arm(self.0.on_retry.as_ref().unchecked_ref(), CONNECT_TIMEOUT_MS);
            st.set_status(Status::Connecting, calls);
        }
    }

    fn on_open(&self, gen: u32) {
        let mut st = self.0.st.borrow_mut();
        let st = &mut *st;
        if gen != st.net.gen || st.closed {
            return;
        }
        let mut s = Session::new(st.replica, SessionConfig::default());
        let mut msgs = vec![s.hello(st.opts.token.clone())];
        let ids: Vec<String> = st.docs.keys().cloned().collect();
        for id in ids {
            msgs.extend(s.subscribe(&id, &mut Docs(&mut st.docs)));
        }
        st.net.session = Some(s);
        st.net.last_rx = js::now();
        st.send(msgs);
        st.net.tick.arm(self.0.on_tick.as_ref().unchecked_ref(), TICK_MS);
    }

    fn on_message(&self, gen: u32, data: JsValue) {
        let Some(buf) = data.dyn_ref::<js_sys::ArrayBuffer>() else { return };
        let bytes = Uint8Array::new(buf).to_vec();
        let mut calls = Vec::new();
        let amnesia = {
            let mut st = self.0.st.borrow_mut();
            let st = &mut *st;
            if gen != st.net.gen || st.closed {
                return;
            }
            st.net.last_rx = js::now();
            let Some(session) = &mut st.net.session else { return };
            match session.handle(&bytes, &mut Docs(&mut st.docs)) {
                Ok(out) => {
                    st.send(out.replies);
                    let amnesia = st.on_events(out.events, &mut calls);
                    st.schedule_flush(&self.0.on_flush, SNAPSHOT_MS);
                    amnesia
                }
                Err(SyncError::Doc { error: DocError::Amnesia { .. }, .. }) => true,
                Err(e) => {
                    st.send(vec![e.to_msg()]);
                    st.emit("error", error(&e.to_string()), &mut calls);
                    false
                }
            }
        };
        deliver(calls);
        if amnesia {
            self.reidentify();
        }
    }

    /// The connection `gen` failed or closed: try the next URL after a backoff.
    fn fail(&self, gen: u32) {
        let mut calls = Vec::new();
        {
            let mut st = self.0.st.borrow_mut();
            let st = &mut *st;
            if gen != st.net.gen || st.closed {
                return;
            }
            st.net.dead = st.net.conn.take();
            st.net.session = None;
            st.net.tick.cancel();
            st.set_status(Status::Offline, &mut calls);
            st.net.idx = st.net.idx.wrapping_add(1);
            let delay = backoff(st.net.attempt, js::random());
            st.net.attempt = st.net.attempt.saturating_add(1);
            st.net.retry.arm(self.0.on_retry.as_ref().unchecked_ref(), delay);
        }
        deliver(calls);
    }

    fn retry(&self) {
        let (pending, gen) = {
            let mut st = self.0.st.borrow_mut();
            st.net.retry.fired();
            (st.net.conn.is_some(), st.net.gen)
        };
        if pending {
            self.fail(gen); // connect timeout
        } else {
            self.connect();
        }
    }

    fn tick(&self) {
        let (dead, gen) = {
            let mut st = self.0.st.borrow_mut();
            let st = &mut *st;
            st.net.tick.fired();
            let Some(s) = &mut st.net.session else { return };
            let msgs = s.tick(&mut Docs(&mut st.docs));
            st.send(msgs);
            st.net.tick.arm(self.0.on_tick.as_ref().unchecked_ref(), TICK_MS);
            let silent = js::now() - st.net.last_rx > SILENCE_MS;
            (silent && !st.docs.is_empty(), st.net.gen)
        };
        if dead {
            self.fail(gen);
        }
    }

    /// A peer has seen events of our id that we do not have: we lost state. Take a new
    /// id for every document and start over with the relay.
    fn reidentify(&self) {
        let gen = {
            let mut st = self.0.st.borrow_mut();
            let st = &mut *st;
            let old = st.replica;
            st.replica = new_replica_id();
            for (id, e) in st.docs.iter_mut() {
                e.doc.reidentify(st.replica);
                e.stale.push(store::snapshot_key(id, old));
            }
            st.net.attempt = 0;
            st.net.gen
        };
        self.fail(gen);
    }
}

/// Answers another tab's `Subscribe`: what it lacks, and a subscribe back if it has
/// something we lack.
fn answer_tab(ch: &Channel, doc_id: &str, doc: &mut Document, theirs: &VersionVector) {
    match doc.deltas_since(theirs) {
        Some(ds) if ds.is_empty() => {}
        Some(ds) => {
            let deltas = ds.into_iter().cloned().collect();
            ch.post(&Msg::Deltas(Deltas { doc: doc_id.to_owned(), deltas }).encode());
        }
        None => ch.post(&channel::encode_state(doc_id, &doc.encode())),
    }
    if !theirs.le(doc.version()) {
        let vv = doc.version().clone();
        ch.post(&Msg::Subscribe(Subscribe { doc: doc_id.to_owned(), vv }).encode());
    }
}
