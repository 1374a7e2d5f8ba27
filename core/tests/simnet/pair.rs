//! Two replicas and one link, every frame under the test's control: the harness of the
//! hand-minimised regressions and of the garbage tests.

use concord_core::sync::{Event, Msg, Session, SessionConfig, SyncError};
use concord_core::{DocConfig, Document, ReplicaId};
use std::collections::BTreeMap;

/// Replica `0` and replica `1`, each with its documents and its session with the other.
pub struct Pair {
    pub sess: [Session; 2],
    pub docs: [BTreeMap<String, Document>; 2],
    /// `queue[i]`: frames on their way to replica `i`, oldest first.
    pub queue: [Vec<Vec<u8>>; 2],
    /// Every event each side reported, in order.
    pub events: [Vec<Event>; 2],
}

impl Pair {
    /// Two replicas (ids 1 and 2) holding empty documents `docs`, handshake done.
    pub fn new(cfg: SessionConfig, doc_cfg: DocConfig, docs: &[&str]) -> Pair {
        let ids = [ReplicaId(1), ReplicaId(2)];
        let store = |id| docs.iter().map(|d| (d.to_string(), Document::with_config(id, doc_cfg))).collect();
        let mut p = Pair {
            sess: [Session::new(ids[0], cfg), Session::new(ids[1], cfg)],
            docs: [store(ids[0]), store(ids[1])],
            queue: [Vec::new(), Vec::new()],
            events: [Vec::new(), Vec::new()],
        };
        for i in 0..2 {
            let hello = p.sess[i].hello(None);
            p.send(i, vec![hello]);
        }
        p.deliver_all(0).unwrap();
        p.deliver_all(1).unwrap();
        p
    }

    pub fn doc(&mut self, i: usize, d: &str) -> &mut Document {
        self.docs[i].get_mut(d).expect("no such document")
    }

    /// Puts `msgs` from replica `from` on the wire.
    pub fn send(&mut self, from: usize, msgs: Vec<Msg>) {
        self.queue[1 - from].extend(msgs.iter().map(Msg::encode));
    }

    /// Replica `i` subscribes to `d`.
    pub fn subscribe(&mut self, i: usize, d: &str) {
        let msgs = self.sess[i].subscribe(d, &mut self.docs[i]);
        self.send(i, msgs);
    }

    /// Replica `i` handles `frame`; replies go on the wire, events are recorded.
    pub fn handle(&mut self, i: usize, frame: &[u8]) -> Result<Vec<Event>, SyncError> {
        let out = self.sess[i].handle(frame, &mut self.docs[i])?;
        self.send(i, out.replies);
        self.events[i].extend(out.events.iter().cloned());
        Ok(out.events)
    }

    /// Takes the frames waiting for replica `i` (to deliver them in another order, or not).
    pub fn take(&mut self, i: usize) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.queue[i])
    }

    /// Replica `i` handles every frame waiting for it (not those its replies cause).
    pub fn deliver_all(&mut self, i: usize) -> Result<(), SyncError> {
        for f in self.take(i) {
            self.handle(i, &f)?;
        }
        Ok(())
    }

    /// Delivers both ways until no frame is left.
    pub fn settle(&mut self) -> Result<(), SyncError> {
        for _ in 0..1000 {
            if self.queue[0].is_empty() && self.queue[1].is_empty() {
                return Ok(());
            }
            self.deliver_all(0)?;
            self.deliver_all(1)?;
        }
        panic!("the pair did not settle in 1000 rounds");
    }

    /// One tick on replica `i`'s session.
    pub fn tick(&mut self, i: usize) {
        let msgs = self.sess[i].tick(&mut self.docs[i]);
        self.send(i, msgs);
    }

    /// Decoded frames waiting for replica `i`.
    pub fn peek(&self, i: usize) -> Vec<Msg> {
        self.queue[i].iter().filter_map(|f| Msg::decode(f).ok()).collect()
    }
}
