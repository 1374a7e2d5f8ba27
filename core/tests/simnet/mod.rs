//! A seeded, simulated network of Concord replicas (STYLE.md #11, after yrs'
//! `test_utils.rs` `TestConnector` / `run_scenario(seed, ..)`).
//!
//! Everything is decided by one seed: the shape (3-7 replicas, full mesh or a star
//! through a relay, 1-2 documents, delta-log and session bounds), the local writes, and
//! the network (per-link queues with random delay, loss, duplication and therefore
//! reordering; partitions that heal; connections that reset; replicas that crash and
//! restart from their last persisted snapshot). After the chaos comes a quiet period
//! (everything healed, nothing lost) and the checks:
//!
//! - every replica holds the same document (`==`, same `to_value()`, same version);
//! - every acknowledged write is present (a write is acknowledged once a replica other
//!   than its author persisted a snapshot containing it — the moment that replica sends
//!   an `Ack`);
//! - the document is exactly the join of the writes it claims to contain, and, checked
//!   independently of the CRDT code: counters lie between the acknowledged and the
//!   attempted increments, every add not causally removed is in its set, every register
//!   holds the write with the greatest timestamp;
//! - `Synced` is never announced before the document holds what it promises.
//!
//! Amnesia, honestly: a replica persists snapshots only now and then, so a crash loses
//! its latest writes. A replica durably records the highest sequence it ever *sent* (a
//! one-number write-ahead mark), so after a restart it knows whether lost writes may live
//! elsewhere. If they may, the document is quarantined (no local writes) until a peer
//! reveals the loss (`DocError::Amnesia` through `SyncError::Doc`, then `reidentify` with
//! a fresh id drawn here) or every direct peer has synced with it (then it takes a fresh
//! id anyway: someone further away may still hold the lost writes).

#![allow(dead_code)]

pub mod pair;

use concord_core::sync::{Event, Msg, Session, SessionConfig, SyncError};
use concord_core::{
    Delta, DocConfig, DocError, Document, Dot, Field, Kind, ReplicaId, Timestamp, Value, VersionVector,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

/// splitmix64: tiny, fast, and good enough to drive a simulation.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0xA076_1D64_78BD_642F) ^ 0xE703_7ED1_A0B4_28DB)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        self.below(1000) < u64::from(per_mille)
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Everything a run is made of, drawn from the seed (and adjustable by regression tests).
#[derive(Clone, Debug)]
pub struct Params {
    pub replicas: usize,
    pub docs: usize,
    /// Star through replica 0 (a relay that never writes itself) instead of a full mesh.
    pub star: bool,
    pub doc: DocConfig,
    pub session: SessionConfig,
    /// Per-mille chance that a frame is lost / duplicated.
    pub loss: u32,
    pub dup: u32,
    /// Frames take 1..=max_delay steps (so they overtake each other).
    pub max_delay: u64,
    /// Steps of chaos before the quiet period.
    pub steps: u64,
    /// Per-mille chances, per replica (or link) and step.
    pub op_rate: u32,
    pub persist_rate: u32,
    pub crash_rate: u32,
    pub max_down: u64,
    pub partition_rate: u32,
    pub reconnect_rate: u32,
    pub unsubscribe_rate: u32,
}

impl Params {
    /// The parameters of `seed`'s run (drawn from the start of its random stream).
    pub fn draw(rng: &mut Rng) -> Params {
        let replicas = rng.range(3, 7) as usize;
        let docs = rng.range(1, 2) as usize;
        let star = rng.chance(500);
        let log_capacity = if rng.chance(500) { rng.range(8, 64) as usize } else { 4096 };
        let pending_capacity = if rng.chance(200) { rng.range(2, 16) as usize } else { 16_384 };
        let full_state_keys = if rng.chance(500) { rng.range(0, 4) as usize } else { 256 };
        let max_frame = if rng.chance(250) { rng.range(96, 600) as usize } else { 256 * 1024 };
        let stall_ticks = rng.range(3, 8);
        let resync_ticks = rng.range(15, 40);
        Params {
            replicas,
            docs,
            star,
            doc: DocConfig { log_capacity, pending_capacity },
            session: SessionConfig { max_frame, full_state_keys, stall_ticks, resync_ticks },
            loss: *rng.pick(&[0, 20, 100, 250]),
            dup: *rng.pick(&[0, 20, 100]),
            max_delay: rng.range(1, 6),
            steps: rng.range(120, 300),
            op_rate: *rng.pick(&[50, 150, 300]),
            persist_rate: *rng.pick(&[20, 80, 250]),
            crash_rate: *rng.pick(&[0, 3, 10, 25]),
            max_down: rng.range(1, 30),
            partition_rate: *rng.pick(&[0, 10, 40]),
            reconnect_rate: *rng.pick(&[0, 5, 20]),
            unsubscribe_rate: *rng.pick(&[0, 5]),
        }
    }
}

/// The keys every document uses; a key's type never changes.
pub const KEYS: &[(&str, Kind)] = &[
    ("likes", Kind::Counter),
    ("views", Kind::Counter),
    ("votes", Kind::PnCounter),
    ("balance", Kind::PnCounter),
    ("title", Kind::Register),
    ("color", Kind::Register),
    ("owner", Kind::Register),
    ("tags", Kind::Set),
    ("members", Kind::Set),
    ("flags", Kind::Set),
];

const DOC_IDS: &[&str] = &["doc-a", "doc-b"];

/// What happened in runs, summed over seeds: which sync paths ran, how much chaos.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub runs: u64,
    pub ops: u64,
    pub acked_writes: u64,
    pub acks: u64,
    pub frames: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub delta_frames: u64,
    pub synced_frames: u64,
    pub whole_state_starts: u64,
    pub merkle_starts: u64,
    pub merkle_queries: u64,
    pub keys_queries: u64,
    pub state_frames: u64,
    pub state_merged: u64,
    pub crashes: u64,
    pub restarts_at_risk: u64,
    pub amnesia_detected: u64,
    pub amnesia_fallback: u64,
    pub partitions: u64,
    pub reconnects: u64,
    pub unsubscribes: u64,
    pub quiet_steps: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        let Stats {
            runs,
            ops,
            acked_writes,
            acks,
            frames,
            lost,
            duplicated,
            delta_frames,
            synced_frames,
            whole_state_starts,
            merkle_starts,
            merkle_queries,
            keys_queries,
            state_frames,
            state_merged,
            crashes,
            restarts_at_risk,
            amnesia_detected,
            amnesia_fallback,
            partitions,
            reconnects,
            unsubscribes,
            quiet_steps,
        } = o;
        self.runs += runs;
        self.ops += ops;
        self.acked_writes += acked_writes;
        self.acks += acks;
        self.frames += frames;
        self.lost += lost;
        self.duplicated += duplicated;
        self.delta_frames += delta_frames;
        self.synced_frames += synced_frames;
        self.whole_state_starts += whole_state_starts;
        self.merkle_starts += merkle_starts;
        self.merkle_queries += merkle_queries;
        self.keys_queries += keys_queries;
        self.state_frames += state_frames;
        self.state_merged += state_merged;
        self.crashes += crashes;
        self.restarts_at_risk += restarts_at_risk;
        self.amnesia_detected += amnesia_detected;
        self.amnesia_fallback += amnesia_fallback;
        self.partitions += partitions;
        self.reconnects += reconnects;
        self.unsubscribes += unsubscribes;
        self.quiet_steps += quiet_steps;
    }
}

struct Flight {
    at: u64,
    seq: u64,
    bytes: Vec<u8>,
}

struct Link {
    ends: [usize; 2],
    /// `None` while either end is down.
    sess: Option<[Session; 2]>,
    /// `queues[i]`: frames on their way to `ends[i]`.
    queues: [Vec<Flight>; 2],
    cut_until: u64,
    /// Bumped on every (re)connection, so stale scheduled work is recognised.
    incarnation: u64,
}

struct Replica {
    docs: BTreeMap<String, Document>,
    /// The last snapshot of each document (`Document::encode`), and its version.
    persisted: BTreeMap<String, Vec<u8>>,
    persisted_vv: BTreeMap<String, VersionVector>,
    up: bool,
    down_until: u64,
    wall: u64,
    /// Documents that may have forgotten writes others saw: doc -> peers synced since.
    quarantine: BTreeMap<String, BTreeSet<usize>>,
    peers: Vec<usize>,
}

/// One write as made: who made it and the delta.
struct Write {
    author: usize,
    delta: Delta,
    /// For counters: the amount (negative for pn decrements).
    amount: i64,
}

/// The test's own record of what was written and what is acknowledged.
#[derive(Default)]
struct Model {
    writes: HashMap<(String, Dot), Write>,
    /// (doc, replica id) -> highest sequence persisted by a replica other than its author.
    acked: HashMap<(String, ReplicaId), u64>,
    /// Which simulated replica owns a replica id (ids change after amnesia).
    author: HashMap<ReplicaId, usize>,
    /// Durable write-ahead mark: highest own sequence each id ever sent, per document.
    sent: HashMap<(String, ReplicaId), u64>,
    /// Attempted counter amounts per (doc, key): (sum of increments, sum of decrements).
    attempted: HashMap<(String, String), (u64, u64)>,
}

/// One simulated run.
pub struct World {
    p: Params,
    rng: Rng,
    now: u64,
    quiet: bool,
    replicas: Vec<Replica>,
    links: Vec<Link>,
    model: Model,
    pub stats: Stats,
    seq: u64,
    resubscribe: Vec<(u64, usize, usize, u64, String)>,
    trace: bool,
    log: String,
}

impl World {
    /// Builds the world of `seed`, letting `adjust` change the drawn parameters.
    pub fn new(seed: u64, adjust: &dyn Fn(&mut Params)) -> World {
        let mut rng = Rng::new(seed);
        let mut p = Params::draw(&mut rng);
        adjust(&mut p);
        let mut model = Model::default();
        let mut replicas = Vec::new();
        for i in 0..p.replicas {
            let mut docs = BTreeMap::new();
            let mut persisted = BTreeMap::new();
            for d in &DOC_IDS[..p.docs] {
                let id = fresh_id(&mut rng, &model);
                model.author.insert(id, i);
                let doc = Document::with_config(id, p.doc);
                persisted.insert(d.to_string(), doc.encode());
                docs.insert(d.to_string(), doc);
            }
            replicas.push(Replica {
                docs,
                persisted,
                persisted_vv: BTreeMap::new(),
                up: true,
                down_until: 0,
                wall: 1_000_000 + rng.below(10_000),
                quarantine: BTreeMap::new(),
                peers: Vec::new(),
            });
        }
        let mut links = Vec::new();
        for a in 0..p.replicas {
            for b in a + 1..p.replicas {
                if !p.star || a == 0 {
                    links.push(Link {
                        ends: [a, b],
                        sess: None,
                        queues: [Vec::new(), Vec::new()],
                        cut_until: 0,
                        incarnation: 0,
                    });
                    replicas[a].peers.push(b);
                    replicas[b].peers.push(a);
                }
            }
        }
        let trace = std::env::var("SIM_TRACE").is_ok_and(|v| v == "1");
        let mut w = World {
            p,
            rng,
            now: 0,
            quiet: false,
            replicas,
            links,
            model,
            stats: Stats { runs: 1, ..Stats::default() },
            seq: 0,
            resubscribe: Vec::new(),
            trace,
            log: String::new(),
        };
        for l in 0..w.links.len() {
            w.connect(l);
        }
        w
    }

    pub fn params(&self) -> &Params {
        &self.p
    }

    fn note(&mut self, s: impl FnOnce() -> String) {
        if self.trace {
            let line = s();
            println!("[{:>4}] {line}", self.now);
        }
    }

    /// Runs the chaos, then the quiet period, then the checks.
    pub fn run(&mut self) -> Result<(), String> {
        for _ in 0..self.p.steps {
            self.chaos_step()?;
        }
        self.quiet_period()?;
        self.check_final()
    }

    // ---- connections ----

    fn connect(&mut self, l: usize) {
        let [a, b] = self.links[l].ends;
        if !self.replicas[a].up || !self.replicas[b].up {
            return;
        }
        let cfg = self.p.session;
        let mut s = [Session::new(self.hello_id(a), cfg), Session::new(self.hello_id(b), cfg)];
        // The handshake travels with the connection set-up: it is never lost or reordered.
        for i in 0..2 {
            let hello = s[i].hello(None).encode();
            let (to, end) = (1 - i, self.links[l].ends[1 - i]);
            let out = s[to].handle(&hello, &mut self.replicas[end].docs);
            assert!(matches!(out, Ok(ref o) if o.replies.is_empty()), "hello refused: {out:?}");
        }
        let link = &mut self.links[l];
        link.sess = Some(s);
        link.queues = [Vec::new(), Vec::new()];
        link.incarnation += 1;
        self.note(|| format!("connect {a}<->{b}"));
        for i in 0..2 {
            let r = self.links[l].ends[i];
            let docs: Vec<String> = self.replicas[r].docs.keys().cloned().collect();
            for d in docs {
                let (sess, docs) = self.session_and_docs(l, i, r);
                let msgs = sess.subscribe(&d, docs);
                self.send_all(l, i, msgs);
            }
        }
    }

    fn disconnect(&mut self, l: usize) {
        let link = &mut self.links[l];
        link.sess = None;
        link.queues = [Vec::new(), Vec::new()];
    }

    fn hello_id(&self, r: usize) -> ReplicaId {
        self.replicas[r].docs.values().next().map(Document::replica).unwrap_or_default()
    }

    fn session(&mut self, l: usize, i: usize) -> &mut Session {
        match self.links[l].sess.as_mut() {
            Some(s) => &mut s[i],
            None => unreachable!("link {l} has no session"),
        }
    }

    fn session_and_docs(
        &mut self,
        l: usize,
        i: usize,
        r: usize,
    ) -> (&mut Session, &mut BTreeMap<String, Document>) {
        match self.links[l].sess.as_mut() {
            Some(s) => (&mut s[i], &mut self.replicas[r].docs),
            None => unreachable!("link {l} has no session"),
        }
    }

    /// Links of replica `r` that are connected, with `r`'s side.
    fn live_links(&self, r: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (l, link) in self.links.iter().enumerate() {
            if link.sess.is_none() {
                continue;
            }
            for i in 0..2 {
                if link.ends[i] == r {
                    out.push((l, i));
                }
            }
        }
        out
    }

    fn send_all(&mut self, l: usize, from: usize, msgs: Vec<Msg>) {
        for m in msgs {
            self.send(l, from, m);
        }
    }

    /// Puts a frame from side `from` of link `l` on the wire.
    fn send(&mut self, l: usize, from: usize, msg: Msg) {
        let r = self.links[l].ends[from];
        if let Some(d) = msg.doc() {
            if let Some(doc) = self.replicas[r].docs.get(d) {
                let id = doc.replica();
                let hw = self.model.sent.entry((d.to_owned(), id)).or_insert(0);
                *hw = (*hw).max(doc.version().get(id));
            }
        }
        let st = &mut self.stats;
        st.frames += 1;
        match &msg {
            Msg::Deltas(_) => st.delta_frames += 1,
            Msg::Synced(_) => st.synced_frames += 1,
            Msg::MerkleStart(m) if m.full_chunks > 0 => st.whole_state_starts += 1,
            Msg::MerkleStart(_) => st.merkle_starts += 1,
            Msg::MerkleQuery(_) => st.merkle_queries += 1,
            Msg::KeysQuery(_) => st.keys_queries += 1,
            Msg::State(_) => st.state_frames += 1,
            _ => {}
        }
        let bytes = msg.encode();
        if self.trace {
            let to = self.links[l].ends[1 - from];
            self.note(|| format!("send {r}->{to}: {}", describe(&msg)));
        }
        let link = &self.links[l];
        if link.sess.is_none() || (!self.quiet && link.cut_until > self.now) {
            self.stats.lost += 1;
            return;
        }
        let copies = if self.quiet {
            1
        } else if self.rng.chance(self.p.loss) {
            self.stats.lost += 1;
            0
        } else if self.rng.chance(self.p.dup) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.quiet { 1 } else { self.rng.range(1, self.p.max_delay) };
            self.seq += 1;
            let f = Flight { at: self.now + delay, seq: self.seq, bytes: bytes.clone() };
            self.links[l].queues[1 - from].push(f);
        }
    }

    // ---- the steps ----

    fn chaos_step(&mut self) -> Result<(), String> {
        self.now += 1;
        let n = self.p.replicas;
        for r in 0..n {
            if self.replicas[r].up && self.rng.chance(self.p.crash_rate) {
                self.crash(r);
            } else if !self.replicas[r].up && self.replicas[r].down_until <= self.now {
                self.restart(r)?;
            }
        }
        if self.rng.chance(self.p.partition_rate) {
            self.stats.partitions += 1;
            let until = self.now + self.rng.range(5, 40);
            if self.rng.chance(300) {
                // Split the replicas in two groups.
                let group: Vec<bool> = (0..n).map(|_| self.rng.chance(500)).collect();
                for link in &mut self.links {
                    if group[link.ends[0]] != group[link.ends[1]] {
                        link.cut_until = link.cut_until.max(until);
                    }
                }
            } else {
                let l = self.rng.below(self.links.len() as u64) as usize;
                self.links[l].cut_until = self.links[l].cut_until.max(until);
            }
        }
        if self.rng.chance(self.p.reconnect_rate) {
            let l = self.rng.below(self.links.len() as u64) as usize;
            if self.links[l].sess.is_some() {
                self.stats.reconnects += 1;
                self.disconnect(l);
                self.connect(l);
            }
        }
        if self.rng.chance(self.p.unsubscribe_rate) {
            let l = self.rng.below(self.links.len() as u64) as usize;
            if self.links[l].sess.is_some() {
                let i = self.rng.below(2) as usize;
                let d = DOC_IDS[self.rng.below(self.p.docs as u64) as usize].to_string();
                self.stats.unsubscribes += 1;
                let msgs = self.session(l, i).unsubscribe(&d);
                self.send_all(l, i, msgs);
                let at = self.now + self.rng.range(1, 20);
                let inc = self.links[l].incarnation;
                self.resubscribe.push((at, l, i, inc, d));
            }
        }
        self.resubscribe_due();
        for r in 0..n {
            if self.replicas[r].up && !(self.p.star && r == 0) && self.rng.chance(self.p.op_rate) {
                self.local_op(r)?;
            }
        }
        for r in 0..n {
            for d in &DOC_IDS[..self.p.docs] {
                if self.replicas[r].up && self.rng.chance(self.p.persist_rate) {
                    self.persist(r, d);
                }
            }
        }
        self.deliver()?;
        self.tick_all()
    }

    fn resubscribe_due(&mut self) {
        let now = self.now;
        let (due, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.resubscribe).into_iter().partition(|e| e.0 <= now);
        self.resubscribe = rest;
        for (_, l, i, inc, d) in due {
            // A reconnection subscribes to everything anyway.
            if self.links[l].sess.is_some() && self.links[l].incarnation == inc {
                let r = self.links[l].ends[i];
                let (sess, docs) = self.session_and_docs(l, i, r);
                let msgs = sess.subscribe(&d, docs);
                self.send_all(l, i, msgs);
            }
        }
    }

    fn quiet_period(&mut self) -> Result<(), String> {
        self.quiet = true;
        // Whoever unsubscribed subscribes again now.
        for e in &mut self.resubscribe {
            e.0 = 0;
        }
        self.resubscribe_due();
        for link in &mut self.links {
            link.cut_until = 0;
        }
        for r in 0..self.p.replicas {
            if !self.replicas[r].up {
                self.restart(r)?;
            }
        }
        // Unsubscribed links: subscribe again.
        for l in 0..self.links.len() {
            if self.links[l].sess.is_none() {
                self.connect(l);
            }
        }
        let limit = 60 * self.p.session.resync_ticks + 400;
        for _ in 0..limit {
            self.now += 1;
            self.stats.quiet_steps += 1;
            self.deliver()?;
            self.tick_all()?;
            if self.converged() {
                // Equal everywhere; keep the protocol running a while: nothing late (a
                // stale exchange, a duplicate) may break it.
                for _ in 0..2 * self.p.session.resync_ticks + 10 {
                    self.now += 1;
                    self.stats.quiet_steps += 1;
                    self.deliver()?;
                    self.tick_all()?;
                }
                if !self.converged() {
                    return Err(format!(
                        "replicas diverged again after converging\n{}",
                        self.describe_docs()
                    ));
                }
                return Ok(());
            }
        }
        Err(format!("no convergence after {limit} quiet steps\n{}", self.describe_docs()))
    }

    /// Every replica holds the same documents (then nothing in flight can change them).
    fn converged(&self) -> bool {
        for d in &DOC_IDS[..self.p.docs] {
            let first = &self.replicas[0].docs[*d];
            for r in &self.replicas[1..] {
                if r.docs[*d] != *first {
                    return false;
                }
            }
        }
        true
    }

    fn deliver(&mut self) -> Result<(), String> {
        for l in 0..self.links.len() {
            for i in 0..2 {
                let now = self.now;
                let q = &mut self.links[l].queues[i];
                if q.iter().all(|f| f.at > now) {
                    continue;
                }
                let (mut due, rest): (Vec<Flight>, Vec<Flight>) =
                    std::mem::take(q).into_iter().partition(|f| f.at <= now);
                *q = rest;
                due.sort_by_key(|f| (f.at, f.seq));
                for f in due {
                    if self.links[l].sess.is_none() {
                        break;
                    }
                    self.handle(l, i, &f.bytes)?;
                }
            }
        }
        Ok(())
    }

    fn tick_all(&mut self) -> Result<(), String> {
        for l in 0..self.links.len() {
            for i in 0..2 {
                if self.links[l].sess.is_none() {
                    continue;
                }
                let r = self.links[l].ends[i];
                let (sess, docs) = self.session_and_docs(l, i, r);
                let msgs = sess.tick(docs);
                self.send_all(l, i, msgs);
            }
        }
        self.end_quarantines();
        Ok(())
    }

    /// Side `i` of link `l` handles a frame.
    fn handle(&mut self, l: usize, i: usize, bytes: &[u8]) -> Result<(), String> {
        let r = self.links[l].ends[i];
        let peer = self.links[l].ends[1 - i];
        let res = match self.links[l].sess.as_mut() {
            Some(s) => s[i].handle(bytes, &mut self.replicas[r].docs),
            None => return Ok(()),
        };
        match res {
            Ok(out) => {
                self.send_all(l, i, out.replies);
                for e in out.events {
                    self.on_event(l, i, e)?;
                }
                Ok(())
            }
            Err(SyncError::Doc { doc, error: error @ DocError::Amnesia { .. } }) => {
                self.note(|| format!("replica {r} detects amnesia on {doc}: {error}"));
                if !self.replicas[r].quarantine.contains_key(&doc) {
                    return Err(format!(
                        "replica {r} reported amnesia on {doc} from peer {peer} although it never \
                         lost a write anyone saw: {error}"
                    ));
                }
                self.stats.amnesia_detected += 1;
                self.replicas[r].quarantine.remove(&doc);
                self.reidentify(r, &doc);
                let err = SyncError::Doc { doc, error };
                self.send(l, i, err.to_msg());
                Ok(())
            }
            Err(e) => Err(format!(
                "replica {r} refused a frame from {peer}: {e}\nframe: {}",
                Msg::decode(bytes).map(|m| describe(&m)).unwrap_or_else(|e| e.to_string())
            )),
        }
    }

    fn on_event(&mut self, l: usize, i: usize, e: Event) -> Result<(), String> {
        let r = self.links[l].ends[i];
        let peer = self.links[l].ends[1 - i];
        match e {
            Event::Applied { doc, deltas } => {
                self.note(|| format!("{r} applied {} from {peer} on {doc}", deltas.len()));
                for (l2, i2) in self.live_links(r) {
                    if l2 != l {
                        let msgs = self.session(l2, i2).on_local_deltas(&doc, &deltas);
                        self.send_all(l2, i2, msgs);
                    }
                }
            }
            Event::Synced { doc, vv } => {
                let have = self.replicas[r].docs[&doc].version();
                if !vv.le(have) {
                    return Err(format!(
                        "replica {r} announced Synced with {peer} on {doc} at {vv:?} but only has {have:?}"
                    ));
                }
                if let Some(q) = self.replicas[r].quarantine.get_mut(&doc) {
                    q.insert(peer);
                }
            }
            Event::Acked { doc, vv } => {
                self.stats.acks += 1;
                let durable = self.replicas[peer].persisted_vv.get(&doc);
                if !durable.is_some_and(|p| vv.le(p)) {
                    return Err(format!(
                        "replica {r} got Acked {vv:?} on {doc} from {peer}, which only persisted {durable:?}"
                    ));
                }
            }
            Event::StateMerged { doc } => {
                self.stats.state_merged += 1;
                self.note(|| format!("{r} merged state from {peer} on {doc}"));
                // As the relay does: tell the other subscribers, which no delta will reach.
                for (l2, i2) in self.live_links(r) {
                    if l2 != l {
                        let (s, docs) = self.session_and_docs(l2, i2, r);
                        let msgs = s.on_state_merged(&doc, docs);
                        self.send_all(l2, i2, msgs);
                    }
                }
            }
            Event::PeerError(e) => {
                self.note(|| format!("{r} got error from {peer}: {}", e.message));
            }
            _ => {}
        }
        Ok(())
    }

    // ---- replicas ----

    fn local_op(&mut self, r: usize) -> Result<(), String> {
        let d = DOC_IDS[self.rng.below(self.p.docs as u64) as usize];
        if self.replicas[r].quarantine.contains_key(d) {
            return Ok(());
        }
        let (key, kind) = *self.rng.pick(KEYS);
        let rep = &mut self.replicas[r];
        let doc = rep.docs.get_mut(d).ok_or("no doc")?;
        let mut amount = 0i64;
        let res = match kind {
            Kind::Counter => {
                let n = self.rng.range(1, 5);
                amount = n as i64;
                doc.increment(key, n).map(Some)
            }
            Kind::PnCounter => {
                let n = self.rng.range(1, 5) as i64;
                amount = if self.rng.chance(500) { n } else { -n };
                doc.pn_add(key, amount).map(Some)
            }
            Kind::Register => {
                // Wall clocks drift and jump back.
                rep.wall = if self.rng.chance(200) {
                    rep.wall.saturating_sub(self.rng.below(5_000))
                } else {
                    rep.wall + self.rng.below(100)
                };
                let v = Value::Int(self.rng.below(1000) as i64);
                doc.set_register(key, v, rep.wall).map(Some)
            }
            Kind::Set => {
                let v = Value::Int(self.rng.below(6) as i64);
                if self.rng.chance(350) {
                    doc.set_remove(key, &v)
                } else {
                    doc.set_add(key, v).map(Some)
                }
            }
        };
        let delta = match res {
            Ok(Some(delta)) => delta,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("local write on replica {r} failed: {e}")),
        };
        self.stats.ops += 1;
        self.note(|| format!("{r} writes {d} {key} dot {}", delta.dot));
        if matches!(kind, Kind::Counter | Kind::PnCounter) {
            let a = self.model.attempted.entry((d.to_owned(), key.to_owned())).or_default();
            if amount >= 0 {
                a.0 += amount as u64;
            } else {
                a.1 += amount.unsigned_abs();
            }
        }
        self.model
            .writes
            .insert((d.to_owned(), delta.dot), Write { author: r, delta: delta.clone(), amount });
        for (l, i) in self.live_links(r) {
            let msgs = self.session(l, i).on_local_delta(d, &delta);
            self.send_all(l, i, msgs);
        }
        Ok(())
    }

    fn persist(&mut self, r: usize, d: &str) {
        let doc = &self.replicas[r].docs[d];
        let bytes = doc.encode();
        let vv = doc.version().clone();
        self.replicas[r].persisted.insert(d.to_owned(), bytes);
        self.replicas[r].persisted_vv.insert(d.to_owned(), vv.clone());
        for (id, seq) in vv.iter() {
            if self.model.author.get(&id) != Some(&r) {
                let a = self.model.acked.entry((d.to_owned(), id)).or_insert(0);
                *a = (*a).max(seq);
            }
        }
        for (l, i) in self.live_links(r) {
            let m = self.session(l, i).ack(d, &vv);
            self.send(l, i, m);
        }
    }

    fn crash(&mut self, r: usize) {
        self.stats.crashes += 1;
        self.note(|| format!("crash {r}"));
        let rep = &mut self.replicas[r];
        rep.up = false;
        rep.down_until = self.now + self.rng.range(1, self.p.max_down);
        for l in 0..self.links.len() {
            if self.links[l].ends.contains(&r) {
                self.disconnect(l);
            }
        }
    }

    fn restart(&mut self, r: usize) -> Result<(), String> {
        self.note(|| format!("restart {r}"));
        let mut docs = BTreeMap::new();
        let mut at_risk = Vec::new();
        for (d, bytes) in &self.replicas[r].persisted {
            let doc = Document::decode(bytes, self.p.doc)
                .map_err(|e| format!("replica {r} cannot read its own snapshot of {d}: {e}"))?;
            let id = doc.replica();
            let sent = self.model.sent.get(&(d.clone(), id)).copied().unwrap_or(0);
            if sent > doc.version().get(id) {
                at_risk.push(d.clone());
            }
            docs.insert(d.clone(), doc);
        }
        let rep = &mut self.replicas[r];
        rep.docs = docs;
        rep.up = true;
        rep.quarantine.clear();
        for d in at_risk {
            self.stats.restarts_at_risk += 1;
            rep.quarantine.insert(d, BTreeSet::new());
        }
        for l in 0..self.links.len() {
            if self.links[l].ends.contains(&r) {
                self.connect(l);
            }
        }
        Ok(())
    }

    fn reidentify(&mut self, r: usize, d: &str) {
        let id = fresh_id(&mut self.rng, &self.model);
        self.model.author.insert(id, r);
        self.note(|| format!("replica {r} takes id {id} for {d}"));
        if let Some(doc) = self.replicas[r].docs.get_mut(d) {
            doc.reidentify(id);
        }
        for (l, i) in self.live_links(r) {
            self.session(l, i).set_local(id);
        }
        // The new id is persisted with the state at once (DESIGN.md: atomically).
        self.persist(r, d);
    }

    /// A quarantined document that synced with every direct peer without learning of
    /// amnesia takes a fresh id anyway (a peer further away may hold the lost writes).
    fn end_quarantines(&mut self) {
        for r in 0..self.p.replicas {
            let peers: BTreeSet<usize> = self.replicas[r].peers.iter().copied().collect();
            let done: Vec<String> = self.replicas[r]
                .quarantine
                .iter()
                .filter(|(_, synced)| peers.is_subset(synced))
                .map(|(d, _)| d.clone())
                .collect();
            for d in done {
                self.replicas[r].quarantine.remove(&d);
                self.stats.amnesia_fallback += 1;
                self.reidentify(r, &d);
            }
        }
    }

    // ---- the checks ----

    /// How each replica's documents differ from replica 0's.
    fn describe_docs(&self) -> String {
        let mut s = String::new();
        for d in &DOC_IDS[..self.p.docs] {
            let base = &self.replicas[0].docs[*d];
            let _ = writeln!(
                s,
                "  {d} @0: {} writes, cloud {:?}, pending {}, value {:?}",
                base.version().total(),
                base.context().cloud,
                base.pending_len(),
                base.to_value()
            );
            for (i, r) in self.replicas.iter().enumerate().skip(1) {
                let doc = &r.docs[*d];
                if doc == base && doc.pending_len() == 0 {
                    continue;
                }
                let vv_diff: Vec<String> = doc
                    .version()
                    .iter()
                    .chain(base.version().iter())
                    .filter(|(id, _)| doc.version().get(*id) != base.version().get(*id))
                    .map(|(id, _)| format!("{id}: {} vs {}", doc.version().get(id), base.version().get(id)))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let _ = writeln!(
                    s,
                    "  {d} @{i}: vv differs at {vv_diff:?}, cloud {:?}, pending {}, value {}",
                    doc.context().cloud,
                    doc.pending_len(),
                    if doc.to_value() == base.to_value() {
                        "same".to_string()
                    } else {
                        format!("{:?}", doc.to_value())
                    }
                );
                for (key, _) in KEYS {
                    if doc.get(key) != base.get(key) {
                        let _ = writeln!(s, "    {key}: {:?}\n      vs {:?}", doc.get(key), base.get(key));
                    }
                }
            }
        }
        s
    }

    fn check_final(&mut self) -> Result<(), String> {
        // A delta may stay buffered forever only when the write before it died with an
        // amnesiac replica (nobody can fill that gap).
        let amnesia = self.stats.amnesia_detected + self.stats.amnesia_fallback > 0;
        for (i, r) in self.replicas.iter().enumerate() {
            for (d, doc) in &r.docs {
                if doc.pending_len() > 0 && !amnesia {
                    return Err(format!("replica {i} still buffers {} deltas of {d}", doc.pending_len()));
                }
            }
        }
        for d in &DOC_IDS[..self.p.docs] {
            let first = &self.replicas[0].docs[*d];
            for (i, r) in self.replicas.iter().enumerate().skip(1) {
                let doc = &r.docs[*d];
                if doc != first || doc.to_value() != first.to_value() || doc.version() != first.version() {
                    return Err(format!("replicas 0 and {i} differ on {d}\n{}", self.describe_docs()));
                }
            }
            self.check_model(d)?;
        }
        Ok(())
    }

    fn check_model(&mut self, d: &str) -> Result<(), String> {
        let doc = &self.replicas[0].docs[d];
        let vv = doc.version().clone();
        // 1. No acknowledged write is lost.
        for ((doc_id, id), seq) in &self.model.acked {
            if doc_id == d && vv.get(*id) < *seq {
                return Err(format!(
                    "{d}: acknowledged write {id}:{seq} is lost (final version has {})",
                    vv.get(*id)
                ));
            }
            if doc_id == d {
                self.stats.acked_writes += seq;
            }
        }
        // 2. The document is exactly the join of the writes its version claims.
        let mut present: Vec<&Write> = self
            .model
            .writes
            .iter()
            .filter(|((doc_id, dot), _)| doc_id == d && vv.contains(*dot))
            .map(|(_, w)| w)
            .collect();
        present.sort_by_key(|w| w.delta.dot);
        let claimed: u64 = vv.total();
        if present.len() as u64 != claimed {
            return Err(format!(
                "{d}: the final version claims {claimed} writes but {} of them were made",
                present.len()
            ));
        }
        let mut expected = Document::with_config(ReplicaId(u64::MAX), DocConfig::default());
        for w in &present {
            expected.apply(w.delta.clone()).map_err(|e| format!("{d}: model replay failed: {e}"))?;
        }
        if expected != *doc {
            return Err(format!(
                "{d}: final state is not the join of its writes\n  expected {:?}\n  actual   {:?}",
                expected.to_value(),
                doc.to_value()
            ));
        }
        // 3. Independent semantic checks, key by key.
        let is_acked =
            |dot: Dot| self.model.acked.get(&(d.to_owned(), dot.replica)).is_some_and(|s| *s >= dot.seq);
        for (key, kind) in KEYS {
            let writes: Vec<&&Write> = present.iter().filter(|w| w.delta.key == *key).collect();
            match kind {
                Kind::Counter | Kind::PnCounter => {
                    let (mut acked_up, mut acked_down) = (0u64, 0u64);
                    for w in self.model.writes.iter().filter(|((x, _), w)| x == d && w.delta.key == *key) {
                        if is_acked(w.0 .1) {
                            if w.1.amount >= 0 {
                                acked_up += w.1.amount as u64;
                            } else {
                                acked_down += w.1.amount.unsigned_abs();
                            }
                        }
                    }
                    let (tried_up, tried_down) = self
                        .model
                        .attempted
                        .get(&(d.to_owned(), key.to_string()))
                        .copied()
                        .unwrap_or_default();
                    let value = if *kind == Kind::Counter {
                        doc.counter(key) as i128
                    } else {
                        i128::from(doc.pn_counter(key))
                    };
                    let lo = acked_up as i128 - tried_down as i128;
                    let hi = tried_up as i128 - acked_down as i128;
                    if value < lo || value > hi {
                        return Err(format!(
                            "{d}.{key} = {value}, outside [{lo}, {hi}] (acked +{acked_up}/-{acked_down}, \
                             attempted +{tried_up}/-{tried_down})"
                        ));
                    }
                    // Exactly: per replica id, the largest total among present writes.
                    let mut up: BTreeMap<ReplicaId, u64> = BTreeMap::new();
                    let mut down: BTreeMap<ReplicaId, u64> = BTreeMap::new();
                    for w in &writes {
                        let id = w.delta.dot.replica;
                        match &w.delta.payload {
                            Field::Counter(c) => {
                                let e = up.entry(id).or_default();
                                *e = (*e).max(c.get(id));
                            }
                            Field::PnCounter(c) => {
                                let (p, n) = c.parts();
                                let e = up.entry(id).or_default();
                                *e = (*e).max(p.get(id));
                                let e = down.entry(id).or_default();
                                *e = (*e).max(n.get(id));
                            }
                            _ => {}
                        }
                    }
                    let want = up.values().map(|v| *v as i128).sum::<i128>()
                        - down.values().map(|v| *v as i128).sum::<i128>();
                    if value != want {
                        return Err(format!("{d}.{key} = {value}, but its present writes add up to {want}"));
                    }
                }
                Kind::Register => {
                    let best: Option<(Timestamp, &Value)> = writes
                        .iter()
                        .filter_map(|w| match &w.delta.payload {
                            Field::Register(r) => r.timestamp().zip(r.get()),
                            _ => None,
                        })
                        .max_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
                    let got = doc.register(key);
                    if got.map(|(v, t)| (t, v.clone())) != best.map(|(t, v)| (t, v.clone())) {
                        return Err(format!(
                            "{d}.{key} holds {got:?} but the latest present write is {best:?}"
                        ));
                    }
                }
                Kind::Set => {
                    // An add is causally removed when a present write that observed it
                    // (a remove, or a re-add of the same element) retired its dot.
                    let mut retired: BTreeSet<Dot> = BTreeSet::new();
                    let mut adds: Vec<(Dot, Value)> = Vec::new();
                    for w in &writes {
                        if let Field::Set(s) = &w.delta.payload {
                            let ctx = s.context();
                            for (r, n) in ctx.vv.iter() {
                                for q in 1..=n {
                                    retired.insert(Dot::new(r, q));
                                }
                            }
                            retired.extend(ctx.cloud.iter().copied());
                            for (v, dots) in s.entries() {
                                if dots.as_slice().contains(&w.delta.dot) {
                                    adds.push((w.delta.dot, v.clone()));
                                }
                            }
                        }
                    }
                    let mut want: BTreeSet<Value> = BTreeSet::new();
                    for (dot, v) in &adds {
                        // An add's own context holds its dot: only *other* writes retire it.
                        let removed = writes.iter().any(|w| {
                            w.delta.dot != *dot
                                && matches!(&w.delta.payload, Field::Set(s) if s.context().contains(*dot))
                        });
                        if !removed {
                            want.insert(v.clone());
                        }
                        if !removed && is_acked(*dot) && !doc.set_contains(key, v) {
                            return Err(format!("{d}.{key}: acknowledged add {dot} of {v:?} is missing"));
                        }
                    }
                    let got: BTreeSet<Value> = doc.set_values(key).into_iter().collect();
                    if got != want {
                        return Err(format!("{d}.{key} = {got:?}, but the adds not removed are {want:?}"));
                    }
                }
            }
        }
        Ok(())
    }
}

fn fresh_id(rng: &mut Rng, model: &Model) -> ReplicaId {
    loop {
        let id = ReplicaId(rng.next_u64() >> 8);
        if id.0 != 0 && !model.author.contains_key(&id) {
            return id;
        }
    }
}

/// A one-line description of a message, for traces.
pub fn describe(m: &Msg) -> String {
    match m {
        Msg::Hello(h) => format!("Hello {}", h.replica),
        Msg::Subscribe(s) => format!("Subscribe {} {:?}", s.doc, s.vv),
        Msg::Deltas(d) => {
            let dots: Vec<String> = d.deltas.iter().map(|x| x.dot.to_string()).collect();
            format!("Deltas {} [{}]", d.doc, dots.join(" "))
        }
        Msg::Synced(s) => format!("Synced {} {:?}", s.doc, s.vv),
        Msg::Ack(a) => format!("Ack {} {:?}", a.doc, a.vv),
        Msg::Unsubscribe(u) => format!("Unsubscribe {}", u.doc),
        Msg::MerkleStart(s) => {
            format!("MerkleStart {} #{} full_chunks {} vv {:?}", s.doc, s.exchange, s.full_chunks, s.vv)
        }
        Msg::MerkleQuery(q) => format!("MerkleQuery {} #{} {} nodes", q.doc, q.exchange, q.nodes.len()),
        Msg::MerkleNodes(n) => format!("MerkleNodes {} #{} {} nodes", n.doc, n.exchange, n.nodes.len()),
        Msg::MerkleLeaves(n) => format!("MerkleLeaves {} #{} {} buckets", n.doc, n.exchange, n.buckets.len()),
        Msg::KeysQuery(k) => format!("KeysQuery {} #{} {} keys", k.doc, k.exchange, k.keys.len()),
        Msg::State(s) => format!(
            "State {} #{} chunk {} answered {} fields {:?}",
            s.doc,
            s.exchange,
            s.chunk,
            s.answered.len(),
            s.fields.iter().map(|f| f.0.as_str()).collect::<Vec<_>>()
        ),
        Msg::DocSetQuery(q) => format!("DocSetQuery #{} {} things", q.exchange, q.query.len()),
        Msg::DocSetAnswer(a) => format!("DocSetAnswer #{} part {}/{}", a.exchange, a.part, a.parts),
        Msg::Error(e) => format!("Error {}", e.message),
    }
}

/// Runs one seed; `Err` describes the first violated property.
pub fn run_seed(seed: u64) -> Result<Stats, String> {
    run_seed_with(seed, &|_| {})
}

/// Runs one seed with adjusted parameters (regression tests pin minimised runs this way).
pub fn run_seed_with(seed: u64, adjust: &dyn Fn(&mut Params)) -> Result<Stats, String> {
    let mut w = World::new(seed, adjust);
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run()));
    match res {
        Ok(Ok(())) => Ok(w.stats),
        Ok(Err(e)) => Err(format!("{e}\nparams: {:?}", w.p)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panicked: {msg}\nparams: {:?}", w.p))
        }
    }
}

/// The one-line command that replays `seed`.
pub fn replay_command(seed: u64) -> String {
    format!("SIM_SEED={seed} cargo test -p concord-core --test sim -- --nocapture")
}
