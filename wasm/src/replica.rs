//! The replica as a sans-IO state machine: open documents and the sync session with the
//! relay. Calls go in (a local write, a relay frame, a tab frame, a tick); what to do comes
//! out as [`Out`] values. Sockets, the `BroadcastChannel`, IndexedDB and timers are the
//! caller's (`js/client.js`).
//!
//! All protocol decisions are the core's ([`Session`], [`Document`]); this module keeps
//! the bookkeeping of what the relay is known to hold (for `synced()`) and decides what
//! goes to which peer.
//!
//! **Replica ids.** Each replica draws a fresh random id when it starts and never reuses
//! it (as Automerge and Yjs do per document load). Stored documents are re-identified to
//! the new id on load. Reusing an id after a reload would need exclusive ownership of the
//! stored state (two tabs share one IndexedDB) and a durable "highest seq ever minted";
//! a fresh id makes dot reuse impossible by construction, at the cost of one version
//! vector entry per client session that writes.
//!
//! **Tabs.** Every tab-to-tab message is one frame ([`crate::channel`]): live deltas, a
//! `Subscribe` on open that every tab with the document answers with what the asker
//! lacks (and subscribes back when the asker has something it lacks), or a whole
//! document when the delta log does not reach back.

use crate::channel;
use crate::vecmap::VecMap;
use concord_core::sync::msg::{Deltas, Subscribe};
use concord_core::sync::{DocStore, ErrorCode, Event, Msg, Session, SessionConfig, SyncError};
use concord_core::{CausalContext, Delta, DocConfig, DocError, Document, ReplicaId, VersionVector};

/// What the caller must do, in order.
#[derive(Debug, PartialEq)]
pub enum Out {
    /// Send a frame to the relay.
    Relay(Vec<u8>),
    /// Post a frame to the other tabs.
    Tab(Vec<u8>),
    /// `doc` changed at `keys` by a remote write (a relay's, another tab's, an update's):
    /// tell its listeners. Local writes are reported by the caller of
    /// [`Replica::write`], which knows the key, so no strings cross back for them. Built only
    /// for a document someone listens to ([`Replica::listen`]).
    Change { doc: String, keys: Vec<String> },
    /// A local write: store it in the outbox (key `[doc, replica hex, seq]`).
    Persist { doc: String, seq: u64, bytes: Vec<u8> },
    /// `doc` changed: snapshot it soon.
    Dirty(String),
    /// The relay answered `Hello`.
    Online,
    /// `synced()` waiter `id` is satisfied.
    Settled(u32),
    /// Something went wrong in the background.
    Error(String),
    /// The relay refused writes to `doc` (too large, malformed or forbidden): they will
    /// never be acknowledged, so `synced()` on it fails from now on.
    Refused { doc: String, message: String },
    /// A peer has seen events of our id that we lack (we lost state): the replica took a
    /// new id; snapshots stored under `old` are stale, and the relay connection must be
    /// restarted.
    Reidentified { old: ReplicaId },
}

/// One open document.
struct Entry {
    doc: Document,
    /// What the relay is known to hold: its `Synced`/`Ack` versions and the dots it sent.
    relay_has: CausalContext,
    /// The relay answered our subscription at least once.
    caught_up: bool,
    /// `synced()` waiters: (version to reach, id).
    waiters: Vec<(VersionVector, u32)>,
    /// Someone listens for remote changes: without, no [`Out::Change`] is built (its keys
    /// are sorted and crossed to JS as a string).
    listened: bool,
    /// Local writes not yet sent to the relay and the other tabs ([`Replica::flush`]).
    unsent: Vec<Delta>,
}

impl Entry {
    fn new(doc: Document) -> Entry {
        Entry {
            doc,
            relay_has: CausalContext::default(),
            caught_up: false,
            waiters: Vec::new(),
            listened: false,
            unsent: Vec::new(),
        }
    }

    /// The [`Out::Change`] of `doc` at the keys `keys` names, if someone listens; else
    /// nothing, and the keys are not gathered.
    fn change(&self, doc: &str, keys: impl FnOnce(&Document) -> Vec<String>) -> Option<Out> {
        self.listened.then(|| Out::Change { doc: doc.to_owned(), keys: keys(&self.doc) })
    }

    fn settle(&mut self, out: &mut Vec<Out>) {
        let (caught_up, has) = (self.caught_up, &self.relay_has.vv);
        self.waiters.retain(|(t, id)| {
            let done = caught_up && t.le(has);
            if done {
                out.push(Out::Settled(*id));
            }
            !done
        });
    }
}

/// The open documents, as a [`DocStore`] for the session.
struct Docs<'a>(&'a mut VecMap<Entry>);

impl DocStore for Docs<'_> {
    fn doc(&mut self, id: &str) -> Option<&mut Document> {
        self.0.get_mut(id).map(|e| &mut e.doc)
    }
}

/// Why a call on a document failed.
#[derive(Debug)]
pub enum Refused {
    /// The document is not open.
    NotOpen,
    /// The document refused the write.
    Doc(DocError),
    /// The bytes given to [`Replica::apply_update`] are not an update.
    NotAnUpdate,
}

/// The replica.
pub struct Replica {
    replica: ReplicaId,
    /// Draws a fresh random replica id.
    fresh: fn() -> ReplicaId,
    docs: VecMap<Entry>,
    session: Option<Session>,
    next_waiter: u32,
    /// What the caller must do; drained with [`Replica::take`].
    pub out: Vec<Out>,
    /// Whether the host has other tabs to talk to: without, no [`Out::Tab`] frames are
    /// built for local writes.
    pub tabs: bool,
    /// Whether the host persists: without, no [`Out::Persist`] entries or
    /// [`Out::Dirty`] marks are built.
    pub persist: bool,
}

/// The keys `deltas` changed, each once, sorted (a batch of a thousand increments of one
/// counter is one key for the listeners, not a thousand strings for JS).
fn keys_of(deltas: &[Delta]) -> Vec<String> {
    let mut keys: Vec<&str> = deltas.iter().map(|d| d.key.as_str()).collect();
    keys.dedup(); // runs first: deltas of one key mostly come together
    concord_core::sort::sort(&mut keys);
    keys.dedup();
    keys.into_iter().map(str::to_owned).collect()
}

/// Every key of `doc` (a state merge may have changed any of them).
fn all_keys(doc: &Document) -> Vec<String> {
    doc.keys().map(str::to_owned).collect()
}

impl Replica {
    /// A replica whose ids (this session's, and a new one after amnesia) come from
    /// `fresh`: random, never reused.
    pub fn new(fresh: fn() -> ReplicaId) -> Replica {
        Replica {
            replica: fresh(),
            fresh,
            docs: VecMap::default(),
            session: None,
            next_waiter: 0,
            out: Vec::new(),
            tabs: true,
            persist: true,
        }
    }

    /// Drops every document, the session and pending outputs (the client closed).
    pub fn clear(&mut self) {
        self.docs = VecMap::default();
        self.session = None;
        self.out = Vec::new();
    }

    /// This session's replica id.
    pub fn id(&self) -> ReplicaId {
        self.replica
    }

    /// Takes what the caller must do.
    pub fn take(&mut self) -> Vec<Out> {
        std::mem::take(&mut self.out)
    }

    fn send(&mut self, msgs: Vec<Msg>) {
        self.out.extend(msgs.iter().map(|m| Out::Relay(m.encode())));
    }

    /// Opens `doc` empty (no-op when open). Feed its stored state with
    /// [`Replica::restore`], then call [`Replica::announce`].
    pub fn open(&mut self, doc: &str) {
        if !self.docs.contains_key(doc) {
            self.docs.insert(doc.to_owned(), Entry::new(Document::new(self.replica)));
        }
    }

    /// Whether someone listens for remote changes of `doc`: only then are
    /// [`Out::Change`]s built for it.
    pub fn listen(&mut self, doc: &str, on: bool) {
        if let Some(e) = self.docs.get_mut(doc) {
            e.listened = on;
        }
    }

    /// Folds a stored snapshot (`snapshot`) or outbox entry into `doc`. Returns false when
    /// the bytes cannot be read (leave them in place: a newer version may read them).
    pub fn restore(&mut self, doc: &str, bytes: &[u8], snapshot: bool) -> bool {
        let Some(e) = self.docs.get_mut(doc) else { return false };
        let ok = if snapshot {
            match Document::decode(bytes, DocConfig::default()) {
                Ok(d) => {
                    let _ = e.doc.merge_document(d);
                    true
                }
                Err(_) => false,
            }
        } else {
            match Delta::decode(bytes) {
                Ok(d) => {
                    let _ = e.doc.apply(d);
                    true
                }
                Err(_) => false,
            }
        };
        if ok && self.persist {
            self.out.push(Out::Dirty(doc.to_owned()));
        }
        ok
    }

    /// Tells the other tabs and the relay that `doc` is open here.
    pub fn announce(&mut self, doc: &str) {
        let Some(e) = self.docs.get(doc) else { return };
        let vv = e.doc.version().clone();
        if self.tabs {
            self.out.push(Out::Tab(Msg::Subscribe(Subscribe { doc: doc.to_owned(), vv }).encode()));
        }
        if let Some(s) = &mut self.session {
            let msgs = s.subscribe(doc, &mut Docs(&mut self.docs));
            self.send(msgs);
        }
    }

    /// Reads an open document.
    pub fn read<T>(&self, doc: &str, f: impl FnOnce(&Document) -> T) -> Option<T> {
        self.doc(doc).map(f)
    }

    /// An open document.
    pub fn doc(&self, doc: &str) -> Option<&Document> {
        self.docs.get(doc).map(|e| &e.doc)
    }

    /// Makes a local write: `op` returns the delta (or `None` for a no-op). Returns
    /// whether the document changed (the caller tells the listeners).
    pub fn write(
        &mut self,
        doc: &str,
        op: &mut dyn FnMut(&mut Document) -> Result<Option<Delta>, DocError>,
    ) -> Result<bool, Refused> {
        let e = self.docs.get_mut(doc).ok_or(Refused::NotOpen)?;
        let Some(delta) = op(&mut e.doc).map_err(Refused::Doc)? else { return Ok(false) };
        if self.persist {
            self.out.push(Out::Dirty(doc.to_owned()));
            self.out.push(Out::Persist { doc: doc.to_owned(), seq: delta.dot.seq, bytes: delta.encode() });
        }
        if self.tabs || self.session.is_some() {
            e.unsent.push(delta);
        }
        Ok(true)
    }

    /// Sends the local writes made since the last call to the relay and the other tabs,
    /// as one batch per document. The caller calls it once its current task has made its
    /// writes (a microtask): a loop of 100,000 `add`s is then a few frames below the
    /// frame limit instead of 100,000 frames, which the relay's rate limit (1000 messages
    /// a second, bursts of 2000) would answer by closing the connection, and every other
    /// tab would forward to its own relay connection again.
    pub fn flush(&mut self) {
        let Replica { docs, session, out, tabs, .. } = self;
        for (doc, e) in docs.iter_mut() {
            if e.unsent.is_empty() {
                continue;
            }
            let deltas = std::mem::take(&mut e.unsent);
            if let Some(s) = session {
                out.extend(s.on_local_deltas(doc, &deltas).iter().map(|m| Out::Relay(m.encode())));
            }
            if *tabs {
                out.push(Out::Tab(Msg::Deltas(Deltas { doc: doc.clone(), deltas }).encode()));
            }
        }
    }

    /// Deltas applied here (local, or from another tab): to the relay; snapshot later.
    fn forward(&mut self, doc: &str, deltas: &[Delta]) {
        if let Some(s) = &mut self.session {
            let msgs = s.on_local_deltas(doc, deltas);
            self.send(msgs);
        }
        if self.persist {
            self.out.push(Out::Dirty(doc.to_owned()));
        }
    }

    /// A waiter id for `synced()`, or `None` when `doc` is synced already.
    pub fn wait_synced(&mut self, doc: &str) -> Result<Option<u32>, Refused> {
        let e = self.docs.get_mut(doc).ok_or(Refused::NotOpen)?;
        let target = e.doc.version().clone();
        if e.caught_up && target.le(&e.relay_has.vv) {
            return Ok(None);
        }
        self.next_waiter = self.next_waiter.wrapping_add(1);
        e.waiters.push((target, self.next_waiter));
        Ok(Some(self.next_waiter))
    }

    // ---- the relay ----

    /// A relay connection opened: say hello and subscribe to every open document.
    pub fn connected(&mut self, token: Option<String>) {
        let mut s = Session::new(self.replica, SessionConfig::default());
        let mut msgs = vec![s.hello(token)];
        let ids: Vec<String> = self.docs.keys().cloned().collect();
        for id in ids {
            msgs.extend(s.subscribe(&id, &mut Docs(&mut self.docs)));
        }
        self.session = Some(s);
        self.send(msgs);
    }

    /// The relay connection is gone.
    pub fn disconnected(&mut self) {
        self.session = None;
    }

    /// Call every second while connected: re-sends stalled subscriptions and refreshes
    /// settled ones (their answers double as liveness probes).
    pub fn tick(&mut self) {
        if let Some(s) = &mut self.session {
            let msgs = s.tick(&mut Docs(&mut self.docs));
            self.send(msgs);
        }
    }

    /// A frame from the relay.
    pub fn relay(&mut self, bytes: &[u8]) {
        let Some(session) = &mut self.session else { return };
        match session.handle(bytes, &mut Docs(&mut self.docs)) {
            Ok(out) => {
                self.send(out.replies);
                if self.on_events(out.events) {
                    self.reidentify();
                }
            }
            Err(SyncError::Doc { error: DocError::Amnesia { .. }, .. }) => self.reidentify(),
            Err(e) => {
                self.send(vec![e.to_msg()]);
                self.out.push(Out::Error(e.to_string()));
            }
        }
    }

    /// Handles the session's events. Returns true when the replica must take a new id.
    fn on_events(&mut self, events: Vec<Event>) -> bool {
        let mut amnesia = false;
        for ev in events {
            match ev {
                Event::PeerHello { .. } => self.out.push(Out::Online),
                Event::Applied { doc, deltas } => {
                    if let Some(e) = self.docs.get_mut(&doc) {
                        for d in &deltas {
                            e.relay_has.insert_span(d.span());
                        }
                        self.out.extend(e.change(&doc, |_| keys_of(&deltas)));
                        e.settle(&mut self.out);
                        if self.persist {
                            self.out.push(Out::Dirty(doc));
                        }
                    }
                }
                Event::StateMerged { doc } => {
                    if let Some(e) = self.docs.get(&doc) {
                        self.out.extend(e.change(&doc, all_keys));
                        if self.persist {
                            self.out.push(Out::Dirty(doc));
                        }
                    }
                }
                Event::Synced { doc, vv } | Event::Acked { doc, vv } => {
                    if let Some(e) = self.docs.get_mut(&doc) {
                        e.caught_up |= self.session.as_ref().is_some_and(|s| s.is_synced(&doc));
                        e.relay_has.absorb(&vv);
                        e.settle(&mut self.out);
                    }
                }
                Event::PeerError(m) if m.code == ErrorCode::AMNESIA => amnesia = true,
                Event::PeerError(m) => {
                    let mut msg = String::from("relay error (");
                    msg.push_str(m.code.name());
                    msg.push_str("): ");
                    msg.push_str(&m.message);
                    let write =
                        [ErrorCode::TOO_LARGE, ErrorCode::INVALID, ErrorCode::FORBIDDEN].contains(&m.code);
                    self.out.push(match m.doc {
                        Some(doc) if write => Out::Refused { doc, message: msg },
                        _ => Out::Error(msg),
                    });
                }
                _ => {}
            }
        }
        amnesia
    }

    /// We lost state a peer has seen: take a new id for every document.
    fn reidentify(&mut self) {
        let old = self.replica;
        let new_id = (self.fresh)();
        self.replica = new_id;
        for (_, e) in self.docs.iter_mut() {
            e.doc.reidentify(new_id);
        }
        self.session = None;
        self.out.push(Out::Reidentified { old });
    }

    // ---- other tabs ----

    /// A frame from another tab.
    pub fn tab(&mut self, bytes: &[u8]) {
        let mut amnesia = false;
        if let Some((doc_id, snapshot)) = channel::decode_state(bytes) {
            let Ok(other) = Document::decode(snapshot, DocConfig::default()) else { return };
            amnesia = self.merge_state_frame(doc_id, other).is_err();
        } else {
            match Msg::decode(bytes) {
                Ok(Msg::Deltas(m)) => amnesia = self.apply_deltas(&m.doc, m.deltas, false).0,
                Ok(Msg::Subscribe(m)) => {
                    let Some(e) = self.docs.get_mut(&m.doc) else { return };
                    if e.doc.check_amnesia(&m.vv).is_err() {
                        amnesia = true;
                    } else {
                        answer_tab(&mut self.out, &m.doc, &e.doc, &m.vv);
                    }
                }
                _ => {}
            }
        }
        if amnesia {
            self.reidentify();
        }
    }

    /// Merges `other`, a document's state from a state frame, into open document `doc`;
    /// listeners and storage hear of a change. `Ok(changed)`, or `Err` when `other` shows
    /// this replica's own writes ahead of it (amnesia: the caller takes a new id).
    fn merge_state_frame(&mut self, doc: &str, other: Document) -> Result<bool, ()> {
        let Some(e) = self.docs.get_mut(doc) else { return Ok(false) };
        e.doc.check_amnesia(other.version()).map_err(|_| ())?;
        let before = e.doc.version().clone();
        let _ = e.doc.merge_document(other);
        if e.doc.version() == &before {
            return Ok(false);
        }
        self.out.extend(e.change(doc, all_keys));
        if self.persist {
            self.out.push(Out::Dirty(doc.to_owned()));
        }
        Ok(true)
    }

    // ---- updates: state and deltas handed over by the application ----

    /// What a replica of `doc` at version `since` lacks (everything when `since` is
    /// `None`), as one frame for [`Replica::apply_update`]: the deltas since `since`, or the state
    /// without its delta log when the log does not reach back that far. `None` when
    /// `doc` is not open. The frame names no document (an empty id): it is applied to
    /// whichever document [`Replica::apply_update`] is given, so the id would be dead weight
    /// on every update (3 of 30 bytes for one register write to a document called `doc`).
    pub fn encode_update(&self, doc: &str, since: Option<&VersionVector>) -> Option<Vec<u8>> {
        let d = &self.docs.get(doc)?.doc;
        Some(lacking("", d, since.unwrap_or(&VersionVector::new())))
    }

    /// Joins an update made by [`Replica::encode_update`] (from any replica's copy of a
    /// document, whatever its id there) into `doc`. What is new goes to the listeners as a
    /// remote change, to the other tabs and the relay (as deltas, or for a state by
    /// subscribing again), and to storage. Bytes that are not an update change nothing; a
    /// batch with an invalid delta applies the valid ones and reports the first error.
    pub fn apply_update(&mut self, doc: &str, bytes: &[u8]) -> Result<(), Refused> {
        if !self.docs.contains_key(doc) {
            return Err(Refused::NotOpen);
        }
        if let Some((_, snapshot)) = channel::decode_state(bytes) {
            let other = Document::decode(snapshot, DocConfig::default()).map_err(|_| Refused::NotAnUpdate)?;
            match self.merge_state_frame(doc, other) {
                Err(()) => self.reidentify(),
                Ok(true) => self.announce(doc),
                Ok(false) => {}
            }
            return Ok(());
        }
        let Ok(Msg::Deltas(m)) = Msg::decode(bytes) else { return Err(Refused::NotAnUpdate) };
        let (amnesia, refused) = self.apply_deltas(doc, m.deltas, true);
        if amnesia {
            self.reidentify();
        }
        refused.map_or(Ok(()), |err| Err(Refused::Doc(err)))
    }

    /// Applies `deltas` (from another tab, or an update) to open document `doc`; what is
    /// new goes to the listeners, the relay and storage, and to the other tabs when
    /// `to_tabs` (a tab's own frame reached them already). Returns whether a delta showed
    /// amnesia (the caller takes a new id) and the first other refusal.
    fn apply_deltas(&mut self, doc: &str, deltas: Vec<Delta>, to_tabs: bool) -> (bool, Option<DocError>) {
        let Some(e) = self.docs.get_mut(doc) else { return (false, None) };
        let (mut applied, mut amnesia, mut refused) = (Vec::with_capacity(deltas.len()), false, None);
        for d in deltas {
            match e.doc.apply_into(d, &mut applied) {
                Err(DocError::Amnesia { .. }) => amnesia = true,
                Err(err) => refused = refused.or(Some(err)),
                Ok(_) => {}
            }
        }
        if !applied.is_empty() {
            self.out.extend(e.change(doc, |_| keys_of(&applied)));
            if to_tabs && self.tabs {
                let frame = Msg::Deltas(Deltas { doc: doc.to_owned(), deltas: applied.clone() }).encode();
                self.out.push(Out::Tab(frame));
            }
            self.forward(doc, &applied);
        }
        (amnesia, refused)
    }

    // ---- persistence ----

    /// `Document::encode()` of `doc`, for a snapshot.
    pub fn snapshot(&self, doc: &str) -> Option<Vec<u8>> {
        self.docs.get(doc).map(|e| e.doc.encode())
    }
}

/// What a replica of `doc` at version `theirs` lacks, as one frame: the protocol's `Deltas`
/// frame when the delta log reaches back (the compact form: a replica's run of writes to
/// one counter is one item), else a state frame ([`channel::STATE`], without the log).
fn lacking(doc_id: &str, doc: &Document, theirs: &VersionVector) -> Vec<u8> {
    match doc.deltas_since(theirs) {
        Some(ds) => {
            let deltas = ds.into_iter().cloned().collect();
            Msg::Deltas(Deltas { doc: doc_id.to_owned(), deltas }).encode()
        }
        None => channel::encode_state(doc_id, &doc.encode_without_log()),
    }
}

/// Answers another tab's `Subscribe`: what it lacks, and a subscribe back if it has
/// something we lack.
fn answer_tab(out: &mut Vec<Out>, doc_id: &str, doc: &Document, theirs: &VersionVector) {
    if !doc.version().le(theirs) {
        out.push(Out::Tab(lacking(doc_id, doc, theirs)));
    }
    if !theirs.le(doc.version()) {
        let vv = doc.version().clone();
        out.push(Out::Tab(Msg::Subscribe(Subscribe { doc: doc_id.to_owned(), vv }).encode()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;
    use concord_core::Value;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn fresh() -> ReplicaId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ReplicaId(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// Delivers every tab frame `from` produced to `to` (its writes too: the host flushes
    /// them once its task is done); returns the other outputs.
    fn tabs(from: &mut Replica, to: &mut Replica) -> Vec<Out> {
        from.flush();
        let mut rest = Vec::new();
        for o in from.take() {
            match o {
                Out::Tab(f) => to.tab(&f),
                o => rest.push(o),
            }
        }
        rest
    }

    #[test]
    fn a_local_write_goes_to_tabs_and_the_outbox_and_says_whether_it_changed_anything() {
        let mut r = Replica::new(fresh);
        r.open("d");
        r.announce("d");
        assert!(matches!(&r.take()[..], [Out::Tab(_)]), "a subscribe to the other tabs");
        assert!(r.write("d", &mut |d| d.increment("likes", 2).map(Some)).unwrap());
        let out = r.take();
        assert!(matches!(&out[0], Out::Dirty(d) if d == "d"));
        assert!(matches!(&out[1], Out::Persist { seq: 1, .. }));
        assert_eq!(out.len(), 2, "the caller, not an output, tells the listeners");
        r.flush();
        assert!(matches!(&r.take()[..], [Out::Tab(_)]), "the write, to the other tabs");
        assert!(!r.write("d", &mut |d| d.set_remove("tags", &Value::from("absent"))).unwrap());
        r.flush();
        assert!(r.take().is_empty(), "a no-op write sends nothing");
        assert!(matches!(r.write("nope", &mut |d| d.increment("x", 1).map(Some)), Err(Refused::NotOpen)));
    }

    /// Moves frames between `r` and a relay's session over `docs` (starting with
    /// `to_replica`) until both are quiet; returns how many frames reached the relay.
    fn pump(
        r: &mut Replica,
        relay: &mut Session,
        docs: &mut std::collections::HashMap<String, Document>,
        mut to_replica: Vec<Vec<u8>>,
    ) -> usize {
        let mut frames = 0;
        loop {
            for f in std::mem::take(&mut to_replica) {
                r.relay(&f);
            }
            let to_relay: Vec<Vec<u8>> = r
                .take()
                .into_iter()
                .filter_map(|o| if let Out::Relay(f) = o { Some(f) } else { None })
                .collect();
            if to_relay.is_empty() {
                return frames;
            }
            for f in to_relay {
                assert!(f.len() <= SessionConfig::default().max_frame, "a frame of {} B", f.len());
                frames += 1;
                let out = relay.handle(&f, docs).unwrap();
                to_replica.extend(out.replies.iter().map(Msg::encode));
            }
        }
    }

    #[test]
    fn writes_made_together_go_out_as_a_few_frames_below_the_limit() {
        let mut r = Replica::new(fresh);
        r.persist = false;
        r.open("d");
        r.announce("d");
        r.connected(None);
        let rid = ReplicaId(u64::MAX);
        let mut relay = Session::new(rid, SessionConfig::default());
        let mut docs = std::collections::HashMap::from([("d".to_owned(), Document::new(rid))]);
        let hello = relay.hello(None).encode();
        pump(&mut r, &mut relay, &mut docs, vec![hello]);
        assert!(r.session.as_ref().is_some_and(|s| s.peer_subscribed("d")), "the relay subscribed");

        let n = 20_000;
        for i in 0..n {
            r.write("d", &mut |d| d.set_add("s", Value::from(format!("element-{i}"))).map(Some)).unwrap();
        }
        assert!(r.out.is_empty(), "nothing is sent before the flush");
        r.flush();
        assert_eq!(r.out.iter().filter(|o| matches!(o, Out::Tab(_))).count(), 1, "one frame for the tabs");
        let frames = pump(&mut r, &mut relay, &mut docs, Vec::new());
        assert!((2..=8).contains(&frames), "{n} writes went out as {frames} frames");
        assert_eq!(docs["d"].set_values("s").len(), n);
        r.flush();
        assert!(r.take().is_empty(), "each write is sent once");
    }

    #[test]
    fn without_tabs_or_storage_a_write_makes_no_output() {
        let mut r = Replica::new(fresh);
        (r.tabs, r.persist) = (false, false);
        r.open("d");
        r.announce("d");
        assert!(r.write("d", &mut |d| d.increment("likes", 2).map(Some)).unwrap());
        let out = r.take();
        assert!(out.is_empty(), "{} outputs", out.len());
        assert_eq!(r.read("d", |d| d.counter("likes")), Some(2));
    }

    #[test]
    fn a_tab_that_opens_later_catches_up_and_both_converge() {
        let (mut a, mut b) = (Replica::new(fresh), Replica::new(fresh));
        a.open("d");
        a.announce("d");
        a.write("d", &mut |d| d.increment("likes", 5).map(Some)).unwrap();
        a.take();
        b.open("d");
        b.announce("d");
        b.write("d", &mut |d| d.pn_add("votes", -1).map(Some)).unwrap();
        // b's subscribe reaches a, which answers with what b lacks and subscribes back.
        for _ in 0..3 {
            tabs(&mut b, &mut a);
            tabs(&mut a, &mut b);
        }
        let json = |r: &Replica| r.read("d", |d| format!("{:?}", d.to_value())).unwrap();
        assert_eq!(json(&a), json(&b));
        assert_eq!(a.read("d", |d| (d.counter("likes"), d.pn_counter("votes"))), Some((5, -1)));
    }

    /// Adds more elements to set "s" of `doc` than the delta log holds; returns how many.
    fn write_past_the_log(r: &mut Replica, doc: &str) -> usize {
        let writes = DocConfig::default().log_capacity + 5;
        for i in 0..writes {
            r.write(doc, &mut |d| d.set_add("s", Value::from(format!("e{i}"))).map(Some)).unwrap();
        }
        r.take();
        writes
    }

    #[test]
    fn a_tab_beyond_the_log_gets_the_state_without_the_log_and_converges() {
        let (mut a, mut b) = (Replica::new(fresh), Replica::new(fresh));
        a.open("d");
        a.announce("d");
        let writes = write_past_the_log(&mut a, "d");
        b.open("d");
        b.announce("d");
        // b's subscribe reaches a, whose log no longer reaches back: a STATE frame.
        let mut state = None;
        tabs(&mut b, &mut a);
        for o in a.take() {
            if let Out::Tab(f) = o {
                if f[0] == channel::STATE {
                    state = Some(f.len());
                }
                b.tab(&f);
            }
        }
        let state = state.expect("a answers with its state");
        let whole = a.snapshot("d").unwrap().len();
        assert!(state * 2 < whole, "the frame leaves the log out: {state} B vs {whole} B with it");
        let values = |r: &Replica| r.read("d", |d| d.set_values("s")).unwrap();
        assert_eq!(values(&b).len(), writes);
        assert_eq!(values(&a), values(&b));
        assert_eq!(a.read("d", |d| d.version().clone()), b.read("d", |d| d.version().clone()));
    }

    #[test]
    fn updates_carry_what_the_other_lacks_between_documents_of_any_id() {
        let (mut a, mut b) = (Replica::new(fresh), Replica::new(fresh));
        a.open("a-copy");
        b.open("b-copy");
        a.listen("a-copy", true);
        b.listen("b-copy", true);
        a.write("a-copy", &mut |d| d.increment("likes", 3).map(Some)).unwrap();
        a.write("a-copy", &mut |d| d.set_add("tags", Value::from("x")).map(Some)).unwrap();
        b.write("b-copy", &mut |d| d.pn_add("votes", -2).map(Some)).unwrap();
        a.take();
        b.take();

        // Everything (no version): the log reaches back to the start, so deltas; b
        // applies them and tells its listeners.
        let full = a.encode_update("a-copy", None).unwrap();
        assert!(
            matches!(Msg::decode(&full), Ok(Msg::Deltas(ref m)) if m.deltas.len() == 2 && m.doc.is_empty()),
            "an update names no document: it applies to the one it is given to"
        );
        b.apply_update("b-copy", &full).unwrap();
        let out = b.take();
        assert!(out.iter().any(|o| matches!(o, Out::Change { .. })));
        assert!(out.iter().any(|o| matches!(o, Out::Tab(_))), "and the other tabs get the deltas");

        // Since b's version: only b's own write, as deltas.
        let v = b.read("b-copy", |d| d.version().clone()).unwrap();
        let none = a.encode_update("a-copy", Some(&v)).unwrap();
        assert!(matches!(Msg::decode(&none), Ok(Msg::Deltas(m)) if m.deltas.is_empty()));
        let back = b.encode_update("b-copy", a.read("a-copy", |d| d.version().clone()).as_ref()).unwrap();
        assert!(matches!(Msg::decode(&back), Ok(Msg::Deltas(ref m)) if m.deltas.len() == 1));
        a.apply_update("a-copy", &back).unwrap();
        assert!(a.take().iter().any(|o| matches!(o, Out::Change { keys, .. } if keys == &["votes"])));
        let json = |r: &Replica, d: &str| r.read(d, |d| format!("{:?}", d.to_value())).unwrap();
        assert_eq!(json(&a, "a-copy"), json(&b, "b-copy"));

        // Applying again changes nothing and says nothing.
        a.apply_update("a-copy", &back).unwrap();
        assert!(a.take().is_empty());

        // Garbage is refused and changes nothing; a closed document is not open.
        let before = json(&a, "a-copy");
        for bad in [&b""[..], b"\x03garbage", &full[..full.len() - 3], &[channel::STATE, 1, 0, b'x', 9, 9]] {
            assert!(matches!(a.apply_update("a-copy", bad), Err(Refused::NotAnUpdate)), "{bad:?}");
        }
        assert_eq!(json(&a, "a-copy"), before);
        assert!(a.take().is_empty());
        assert!(matches!(a.apply_update("nope", &back), Err(Refused::NotOpen)));
        assert!(a.encode_update("nope", None).is_none());

        // Beyond the delta log: the state, without the log; the receiver re-announces.
        a.open("big");
        b.open("big");
        b.listen("big", true);
        let writes = write_past_the_log(&mut a, "big");
        b.take();
        let state = a.encode_update("big", None).unwrap();
        assert_eq!(state[0], channel::STATE);
        assert_eq!(channel::decode_state(&state).map(|(doc, _)| doc), Some(""));
        assert!(state.len() * 2 < a.snapshot("big").unwrap().len());
        b.apply_update("big", &state).unwrap();
        let out = b.take();
        assert!(out.iter().any(|o| matches!(o, Out::Change { .. })));
        assert!(out
            .iter()
            .any(|o| matches!(o, Out::Tab(f) if matches!(Msg::decode(f), Ok(Msg::Subscribe(_))))));
        assert_eq!(b.read("big", |d| d.set_values("s").len()), Some(writes));

        // b had nothing, so it took a's state whole; it still writes as itself, and a
        // gets that write back.
        assert!(b.write("big", &mut |d| d.set_add("s", Value::from("b's")).map(Some)).unwrap());
        assert_eq!(b.read("big", |d| d.replica()), Some(b.id()));
        let back = b.encode_update("big", a.read("big", |d| d.version().clone()).as_ref()).unwrap();
        a.apply_update("big", &back).unwrap();
        assert_eq!(a.read("big", |d| d.set_values("s").len()), Some(writes + 1));
    }

    #[test]
    fn remote_changes_are_reported_only_for_documents_someone_listens_to() {
        let (mut a, mut b) = (Replica::new(fresh), Replica::new(fresh));
        a.open("d");
        b.open("d");
        let changes = |out: &[Out]| out.iter().filter(|o| matches!(o, Out::Change { .. })).count();
        for (round, on) in [false, true, false].into_iter().enumerate() {
            b.listen("d", on);
            a.write("d", &mut |d| d.increment("likes", 1).map(Some)).unwrap();
            a.take();
            let update = a.encode_update("d", b.read("d", |d| d.version().clone()).as_ref()).unwrap();
            b.apply_update("d", &update).unwrap();
            let out = b.take();
            assert_eq!(changes(&out), usize::from(on), "round {round}");
            assert!(out.iter().any(|o| matches!(o, Out::Tab(_))), "the other tabs hear of it either way");
            assert_eq!(b.read("d", |d| d.counter("likes")), Some(round as u64 + 1), "applied either way");
        }
        b.listen("not open", true);
        assert!(b.doc("not open").is_none(), "listening opens nothing");
    }

    #[test]
    fn replicas_that_trade_updates_in_any_order_converge() {
        for seed in 1..=200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut rs: Vec<Replica> = (0..3).map(|_| Replica::new(fresh)).collect();
            for r in &mut rs {
                (r.tabs, r.persist) = (false, false);
                r.open("d");
            }
            // Versions seen earlier, to ask with a stale `since` (more than the peer lacks).
            let mut old: Vec<VersionVector> = Vec::new();
            for step in 0..60u64 {
                let i = rng.below(3) as usize;
                let key = format!("k{}", rng.below(4));
                let v = Value::from(format!("v{}", rng.below(5)));
                let r = &mut rs[i];
                match rng.below(7) {
                    0 => drop(r.write("d", &mut |d| d.increment(&format!("c{key}"), 1).map(Some))),
                    1 => drop(r.write("d", &mut |d| d.pn_add(&format!("p{key}"), -1).map(Some))),
                    2 => {
                        drop(r.write("d", &mut |d| {
                            d.set_register(&format!("r{key}"), v.clone(), step).map(Some)
                        }))
                    }
                    3 => drop(r.write("d", &mut |d| d.set_add(&format!("s{key}"), v.clone()).map(Some))),
                    4 => drop(r.write("d", &mut |d| d.set_remove(&format!("s{key}"), &v))),
                    _ => {
                        // An update from replica i to replica j, since j's version now, a
                        // stale version of anyone, or nothing.
                        let j = (i + 1 + rng.below(2) as usize) % 3;
                        let since = match rng.below(3) {
                            0 => rs[j].read("d", |d| d.version().clone()),
                            1 if !old.is_empty() => Some(old[rng.below(old.len() as u64) as usize].clone()),
                            _ => None,
                        };
                        let u = rs[i].encode_update("d", since.as_ref()).unwrap();
                        rs[j].apply_update("d", &u).unwrap();
                        old.push(rs[j].read("d", |d| d.version().clone()).unwrap());
                    }
                }
                for r in &mut rs {
                    r.take();
                }
            }
            // Quiesce: everyone sends everyone what they lack, twice round.
            for _ in 0..2 {
                for i in 0..3 {
                    for j in 0..3 {
                        if i != j {
                            let since = rs[j].read("d", |d| d.version().clone());
                            let u = rs[i].encode_update("d", since.as_ref()).unwrap();
                            rs[j].apply_update("d", &u).unwrap();
                        }
                    }
                }
            }
            let state =
                |r: &Replica| r.read("d", |d| (format!("{:?}", d.to_value()), d.version().clone())).unwrap();
            assert_eq!(state(&rs[0]), state(&rs[1]), "seed {seed}");
            assert_eq!(state(&rs[1]), state(&rs[2]), "seed {seed}");
        }
    }

    #[test]
    fn synced_waits_for_a_relay() {
        let mut r = Replica::new(fresh);
        r.open("d");
        assert_eq!(r.wait_synced("d").unwrap(), Some(1));
        assert!(matches!(r.wait_synced("x"), Err(Refused::NotOpen)));
    }
}
