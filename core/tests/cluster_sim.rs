//! The relay cluster on a seeded, simulated network (STYLE.md #11), with every quorum
//! decision made by the type the relay runs: [`Coordinator`].
//!
//! Every run is one seed: 3 or 5 relay nodes keeping each document N = 3 times with
//! R = W = 2. Clients write (one delta, one dot each) and read (a subscription, answered
//! with the coordinator's state) through a random node, on a fresh connection per
//! attempt, and retry until their write is acknowledged or their read answered. The
//! network delays, loses, duplicates and reorders messages; partitions cut nodes and
//! clients both ways and heal; nodes crash, losing their memory and every write not yet
//! committed, and restart from what they persisted.
//!
//! Each node feeds its [`Coordinator`] the way `relay/src/node.rs` does and carries out
//! the [`Action`]s it returns: a client write applied here is `write` (or `retry` when
//! nothing in it was new, and then the missing spans go to the replicas again); the local
//! commit of a client write is `durable`; a replica's durable version is `peer_ack`; a
//! client subscription is `read`, each `Probe` a fresh request to that peer whose answer,
//! merged here, is `peer_answered` (only the answer to the latest probe of that peer and
//! document: the coordinator's contract); every step is `tick` with targets from the
//! node's own [`FailureDetector`] ([`write_targets`], "up" as the relay counts it); a
//! client whose connection gives up is `closed`. `Ack`/`Acked` go to the client(s),
//! `Answer` sends the coordinator's state, `NotEnoughReplicas` makes the client retry.
//!
//! Around it, the world of the relay: replicas apply and commit (after a random delay)
//! and ack their durable version; a fallback records a durable hint for the owner it
//! stands in for (per document, as the relay does) in a [`HintQueue`] and hands its copy
//! over once the owner is up, deleting the hint only when the owner's durable version
//! covers it; owners run anti-entropy with the peers [`anti_entropy_peers`] names, on an
//! [`AntiEntropySchedule`], for the documents [`shares_range`] says they share (whole
//! states here: the planning is what is tested).
//!
//! Checked:
//! - (a) whenever a coordinator acknowledges a version to a client (`Ack`, `Acked`, the
//!   acknowledgement of a subscription), every client write it covers is in the durable
//!   state of at least W replicas (owners, or fallbacks holding a hint for the document);
//!   and after healing every acked write is on all N owners.
//! - (b) a read answered on a strict quorum — every target the coordinator chose for it
//!   was an owner — reflects every write that was acknowledged to a client before the read
//!   started and was durable on W owners by then (R + W > N makes the quorums meet). Reads
//!   with fallbacks among their targets are sloppy: Dynamo promises them nothing, and the
//!   writes they miss are only counted. After healing, a read by every client of every
//!   document reflects every write.
//! - (c) after healing no hint is left, on disk or in memory.
//! - (d) after healing the owners of a document hold the same document, exactly the acked
//!   writes (each counter equals the acked increments: retries never double count; each
//!   set holds every acked add); nothing else holds more than they do; every coordinator
//!   is idle.
//!
//! `CLUSTER_SIM_SEEDS=<n>` runs more seeds (default 1000), `CLUSTER_SIM_SEED=<n>` replays
//! one, `CLUSTER_SIM_TRACE=1` prints its events.

use concord_core::cluster::{
    anti_entropy_peers, shares_range, write_targets, AntiEntropySchedule, DetectorConfig, FailureDetector,
    Hint, HintQueue, Target,
};
use concord_core::coordinator::{Action, ConnId, Coordinator};
use concord_core::ring::{Ring, RingNode};
use concord_core::vv::CausalContext;
use concord_core::{Delta, DocConfig, Document, Dot, Field, ReplicaId, Span, Value, VersionVector};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

const N: usize = 3;
const R: usize = 2;
const W: usize = 2;
const STEP_MS: u64 = 5;
const HEARTBEAT_MS: u64 = 40;
const DETECTOR: DetectorConfig = DetectorConfig { suspect_after_ms: 130, down_after_ms: 260 };
/// A client gives up on a write attempt after this long and sends it again elsewhere.
const CLIENT_TIMEOUT_MS: u64 = 450;
/// Longer than the coordinator's timeout, so that its NOT_ENOUGH_REPLICAS usually comes
/// first (and exercises that path) when the read quorum is out of reach.
const CLIENT_READ_TIMEOUT_MS: u64 = 800;
/// After NOT_ENOUGH_REPLICAS, a client tries again this soon, through another node.
const RETRY_AFTER_ERROR_MS: u64 = 20;
const COORDINATOR_TIMEOUT_MS: u64 = 350;
const AE_INTERVAL_MS: u64 = 300;
const AE_JITTER_MS: u64 = 120;
const HINT_RESEND_MS: u64 = 250;
const HINT_BATCH: usize = 4;
const QUIET_LIMIT_MS: u64 = 60_000;
const COUNTER: &str = "hits";
const SET: &str = "tags";

/// splitmix64.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0xA076_1D64_78BD_642F) ^ 0x5851_F42D_4C95_7F2D)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// The shape of one run, drawn from its seed.
#[derive(Clone, Debug)]
struct Params {
    nodes: usize,
    vnodes: u32,
    docs: usize,
    clients: usize,
    writes: usize,
    reads: usize,
    chaos_ms: u64,
    max_delay_ms: u64,
    /// Longest time from applying a write to its commit.
    max_commit_ms: u64,
    loss_per_mille: u64,
    dup_per_mille: u64,
    /// Chance per node per step.
    crash_per_mille: u64,
    /// Chance per step.
    partition_per_mille: u64,
    /// Chance per step that two nodes crash together for long (two owners of some
    /// documents are then down: only fallbacks can take their writes).
    outage_per_mille: u64,
}

impl Params {
    fn draw(rng: &mut Rng) -> Params {
        Params {
            nodes: if rng.chance(500) { 3 } else { 5 },
            vnodes: rng.range(4, 64) as u32,
            docs: rng.range(1, 4) as usize,
            clients: rng.range(1, 4) as usize,
            writes: rng.range(10, 60) as usize,
            reads: rng.range(5, 40) as usize,
            chaos_ms: rng.range(2_000, 5_000),
            max_delay_ms: rng.range(1, 40),
            max_commit_ms: rng.range(0, 15),
            loss_per_mille: rng.range(0, 250),
            dup_per_mille: rng.range(0, 60),
            crash_per_mille: rng.range(0, 3),
            partition_per_mille: rng.range(0, 4),
            outage_per_mille: rng.range(0, 2),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Stats {
    writes: u64,
    write_attempts: u64,
    /// `Ack` actions that completed a write quorum.
    quorum_acks: u64,
    acked_with_fallbacks: u64,
    acked_by_fallbacks_only: u64,
    /// `Ack` actions for a retry whose spans were all acked already.
    retries_acked_at_once: u64,
    /// `Acked` actions (more became durable on W replicas through any path).
    acked_broadcasts: u64,
    write_not_enough_replicas: u64,
    reads: u64,
    read_attempts: u64,
    probes: u64,
    /// Answers to a probe that was not the latest one to that peer: not counted.
    stale_answers: u64,
    reads_answered: u64,
    read_not_enough_replicas: u64,
    /// Answered reads whose targets were all owners, and the (read, write) pairs they
    /// were checked against.
    strict_reads: u64,
    strict_checks: u64,
    sloppy_reads: u64,
    /// Writes acked before a sloppy read started that the read did not reflect.
    sloppy_misses: u64,
    hints_stored: u64,
    hints_delivered: u64,
    ae_exchanges: u64,
    ae_repairs: u64,
    crashes: u64,
    partitions: u64,
    messages: u64,
    lost: u64,
    quiet_ms: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.writes += o.writes;
        self.write_attempts += o.write_attempts;
        self.quorum_acks += o.quorum_acks;
        self.acked_with_fallbacks += o.acked_with_fallbacks;
        self.acked_by_fallbacks_only += o.acked_by_fallbacks_only;
        self.retries_acked_at_once += o.retries_acked_at_once;
        self.acked_broadcasts += o.acked_broadcasts;
        self.write_not_enough_replicas += o.write_not_enough_replicas;
        self.reads += o.reads;
        self.read_attempts += o.read_attempts;
        self.probes += o.probes;
        self.stale_answers += o.stale_answers;
        self.reads_answered += o.reads_answered;
        self.read_not_enough_replicas += o.read_not_enough_replicas;
        self.strict_reads += o.strict_reads;
        self.strict_checks += o.strict_checks;
        self.sloppy_reads += o.sloppy_reads;
        self.sloppy_misses += o.sloppy_misses;
        self.hints_stored += o.hints_stored;
        self.hints_delivered += o.hints_delivered;
        self.ae_exchanges += o.ae_exchanges;
        self.ae_repairs += o.ae_repairs;
        self.crashes += o.crashes;
        self.partitions += o.partitions;
        self.messages += o.messages;
        self.lost += o.lost;
        self.quiet_ms = self.quiet_ms.max(o.quiet_ms);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Addr {
    Node(usize),
    Client(usize),
}

/// A document's whole state, as a peer sends it.
#[derive(Clone, Debug)]
struct State {
    fields: Vec<(String, Field)>,
    ctx: CausalContext,
    vv: VersionVector,
}

impl State {
    fn of(d: Option<&Document>) -> State {
        match d {
            Some(d) => State { fields: d.all_fields(), ctx: d.context().clone(), vv: d.version().clone() },
            None => State { fields: Vec::new(), ctx: CausalContext::default(), vv: VersionVector::new() },
        }
    }
}

#[derive(Clone, Debug)]
enum Msg {
    /// Client -> coordinator, on a new connection: subscribe and write.
    Write {
        conn: ConnId,
        doc: String,
        delta: Delta,
    },
    /// Client -> coordinator, on a new connection: subscribe (a read).
    Read {
        conn: ConnId,
        doc: String,
    },
    /// The client closed the connection.
    Close {
        conn: ConnId,
    },
    /// Coordinator -> client: `vv` of `doc` is durable on W replicas.
    Ack {
        conn: ConnId,
        doc: String,
        vv: VersionVector,
    },
    /// Coordinator -> client: the answer to its subscription, at the coordinator's
    /// version. `strict`: test oracle, not protocol — every target the coordinator chose
    /// for this read was an owner.
    Answer {
        conn: ConnId,
        doc: String,
        vv: VersionVector,
        strict: bool,
    },
    /// Coordinator -> client.
    NotEnoughReplicas {
        conn: ConnId,
    },
    /// Coordinator -> target.
    Replicate {
        doc: String,
        delta: Delta,
        hint_for: Option<String>,
    },
    /// Target -> coordinator: its durable version, after a commit.
    Replicated {
        doc: String,
        vv: VersionVector,
    },
    /// Coordinator -> peer: a probe of a read (a fresh subscription).
    ReadReq {
        doc: String,
        probe: u64,
    },
    /// Peer -> coordinator: its state, answering probe `probe`.
    ReadResp {
        doc: String,
        probe: u64,
        state: State,
    },
    Heartbeat,
    /// Fallback -> owner: its copy of a document it holds a hint for.
    Handoff {
        hint: u64,
        doc: String,
        state: State,
    },
    /// Owner -> fallback: its durable version after merging the handoff.
    HandedOff {
        hint: u64,
        vv: VersionVector,
    },
    /// Anti-entropy: a document's whole state; `answer` asks for the peer's in return.
    AntiEntropy {
        doc: String,
        state: State,
        answer: bool,
    },
}

struct Envelope {
    from: Addr,
    to: Addr,
    msg: Msg,
    /// Connection teardown reaches the server even across a partition (its keepalive
    /// notices); only a crashed server misses it.
    reliable: bool,
}

/// What follows a commit.
#[derive(Clone, Debug)]
enum Then {
    /// A client write applied here as coordinator: report local durability.
    Coordinated,
    /// A write replicated from a coordinator: ack the durable version to it.
    AckTo(usize),
    /// A handoff merged: tell the fallback the durable version.
    HandedOff {
        to: usize,
        hint: u64,
    },
    Nothing,
}

/// A storage write queued behind the others of its node.
struct Commit {
    due: u64,
    doc: String,
    /// Spans applied (become durable), and a merged version (absorbed).
    spans: Vec<Span>,
    absorb: Option<VersionVector>,
    /// Record a hint for this owner with the document (a fallback's replica write).
    hint_for: Option<String>,
    then: Then,
}

struct Node {
    id: String,
    replica: ReplicaId,
    up: bool,
    restart_at: u64,
    // Lost in a crash.
    docs: BTreeMap<String, Document>,
    /// What is durable here, per document (the relay's `DocEntry::durable`).
    durable: BTreeMap<String, CausalContext>,
    commits: VecDeque<Commit>,
    hints: HintQueue<()>,
    fd: FailureDetector,
    co: Coordinator,
    /// Client connections subscribed to each document here.
    members: BTreeMap<String, BTreeSet<ConnId>>,
    /// The latest probe sent to each (document, peer).
    probes: BTreeMap<(String, String), u64>,
    next_heartbeat: u64,
    ae: AntiEntropySchedule,
    /// Test oracle, not node state: per pending read connection, its document and
    /// whether every target chosen for it so far was an owner.
    read_strict: BTreeMap<ConnId, (String, bool)>,
    // Persisted.
    disk_docs: BTreeMap<String, Vec<u8>>,
    disk_hints: BTreeMap<u64, Hint<()>>,
    next_hint_id: u64,
    /// Test oracle, persisted with the document: the context of what is on disk.
    disk_ctx: BTreeMap<String, CausalContext>,
}

impl Node {
    fn new(id: String, replica: ReplicaId) -> Node {
        let co = Coordinator::new(&id, W, R, COORDINATOR_TIMEOUT_MS);
        Node {
            id,
            replica,
            up: true,
            restart_at: 0,
            docs: BTreeMap::new(),
            durable: BTreeMap::new(),
            commits: VecDeque::new(),
            hints: HintQueue::new(HINT_RESEND_MS),
            fd: FailureDetector::new(DETECTOR, 0),
            co,
            members: BTreeMap::new(),
            probes: BTreeMap::new(),
            next_heartbeat: 0,
            ae: AntiEntropySchedule::new(AE_INTERVAL_MS, AE_JITTER_MS),
            read_strict: BTreeMap::new(),
            disk_docs: BTreeMap::new(),
            disk_hints: BTreeMap::new(),
            next_hint_id: 1,
            disk_ctx: BTreeMap::new(),
        }
    }

    fn doc_mut(&mut self, doc: &str) -> &mut Document {
        let replica = self.replica;
        self.docs.entry(doc.to_string()).or_insert_with(|| Document::new(replica))
    }

    fn durable_vv(&self, doc: &str) -> VersionVector {
        self.durable.get(doc).map(|c| c.vv.clone()).unwrap_or_default()
    }
}

/// The first N nodes of `doc`'s walk that `me` counts as up (itself always): the relay's
/// `Node::targets`.
fn targets_of(ring: &Ring, fd: &FailureDetector, me: &str, doc: &str, now: u64) -> Vec<Target> {
    let walk = ring.walk(doc);
    write_targets(&walk, N, |n| n == me || fd.is_up(n, now))
}

#[derive(Clone, Debug)]
enum Change {
    Increment,
    Add(Value),
}

struct Write {
    doc: String,
    delta: Delta,
    change: Change,
    /// The writer was told it is durable.
    acked: bool,
    /// Test oracle: when some client was first told so (an event number).
    first_acked: Option<u64>,
    /// Test oracle: (a) was checked at its first acknowledgement.
    verified: bool,
    /// When the current attempt times out (None: send now).
    retry_at: Option<u64>,
    conn: Option<ConnId>,
}

struct Read {
    doc: String,
    retry_at: Option<u64>,
    conn: Option<ConnId>,
    /// Of the current attempt: writes acked before it started, and those of them durable
    /// on W owners by then (which a strict read must reflect).
    acked_before: Vec<Dot>,
    on_w_owners: Vec<Dot>,
    /// Reads after healing: every acked write must show, whatever the targets.
    all_must_show: bool,
}

struct Client {
    replica: ReplicaId,
    docs: BTreeMap<String, Document>,
    writes: Vec<Write>,
    read: Option<Read>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Write(usize),
    Read,
}

struct Conn {
    client: usize,
    node: usize,
    purpose: Purpose,
    open: bool,
}

struct World {
    seed: u64,
    p: Params,
    rng: Rng,
    now: u64,
    /// Orders events within a step (acks received, reads started).
    event: u64,
    ring: Ring,
    doc_ids: Vec<String>,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    next_probe: u64,
    /// `(due, sequence) -> message`.
    net: BTreeMap<(u64, u64), Envelope>,
    sent: u64,
    /// Side of each address while a partition lasts.
    partition: Option<(BTreeSet<Addr>, u64)>,
    calm: bool,
    /// Scripted scenarios: every client connects to this node.
    pin: Option<usize>,
    trace: bool,
    stats: Stats,
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng::new(seed);
        let p = Params::draw(&mut rng);
        let doc_ids = (0..p.docs).map(|i| format!("doc-{seed}-{i}")).collect();
        let mut w = World {
            seed,
            p,
            rng,
            now: 0,
            event: 0,
            ring: Ring::new(&[], 1),
            doc_ids,
            nodes: Vec::new(),
            clients: Vec::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            next_probe: 1,
            net: BTreeMap::new(),
            sent: 0,
            partition: None,
            calm: false,
            pin: None,
            trace: std::env::var("CLUSTER_SIM_TRACE").is_ok_and(|v| v == "1"),
            stats: Stats::default(),
        };
        w.build(w.p.nodes, w.p.clients);
        w
    }

    fn build(&mut self, nodes: usize, clients: usize) {
        let ids: Vec<RingNode> = (0..nodes).map(|i| RingNode::new(format!("relay-{i}"), 1)).collect();
        self.ring = Ring::new(&ids, self.p.vnodes);
        self.nodes =
            ids.into_iter().enumerate().map(|(i, n)| Node::new(n.id, ReplicaId(0xA000 + i as u64))).collect();
        self.clients = (0..clients)
            .map(|c| Client {
                replica: ReplicaId(0xC000 + c as u64),
                docs: BTreeMap::new(),
                writes: Vec::new(),
                read: None,
            })
            .collect();
    }

    /// A world for a scripted scenario: no random faults, writes or reads.
    fn scripted(seed: u64, nodes: usize) -> World {
        let mut w = World::new(seed);
        w.p = Params {
            nodes,
            vnodes: 64,
            docs: 1,
            clients: 1,
            writes: 0,
            reads: 0,
            chaos_ms: 0,
            max_delay_ms: 10,
            max_commit_ms: 5,
            loss_per_mille: 0,
            dup_per_mille: 0,
            crash_per_mille: 0,
            partition_per_mille: 0,
            outage_per_mille: 0,
        };
        w.build(nodes, 1);
        w.doc_ids.truncate(1);
        w
    }

    fn note(&self, s: impl FnOnce() -> String) {
        if self.trace {
            println!("[{:>6} ms] {}", self.now, s());
        }
    }

    fn node_index(&self, id: &str) -> usize {
        self.nodes.iter().position(|n| n.id == id).unwrap_or_else(|| panic!("unknown node {id}"))
    }

    fn owns(&self, i: usize, doc: &str) -> bool {
        self.ring.owns(&self.nodes[i].id, doc, N)
    }

    fn cut(&self, a: Addr, b: Addr) -> bool {
        match &self.partition {
            Some((side, _)) => side.contains(&a) != side.contains(&b),
            None => false,
        }
    }

    fn is_up(&self, a: Addr) -> bool {
        match a {
            Addr::Node(i) => self.nodes[i].up,
            Addr::Client(_) => true,
        }
    }

    fn send(&mut self, from: Addr, to: Addr, msg: Msg) {
        self.post(from, to, msg, false);
    }

    fn post(&mut self, from: Addr, to: Addr, msg: Msg, reliable: bool) {
        self.stats.messages += 1;
        let local = from == to;
        let faulty = !local && !self.calm && !reliable;
        if faulty && self.rng.chance(self.p.loss_per_mille) {
            self.stats.lost += 1;
            return;
        }
        let copies = if faulty && self.rng.chance(self.p.dup_per_mille) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if local { 0 } else { self.rng.range(1, self.p.max_delay_ms) };
            self.sent += 1;
            self.net.insert((self.now + delay, self.sent), Envelope { from, to, msg: msg.clone(), reliable });
        }
    }

    /// Steps for `ms` without random faults.
    fn run_for(&mut self, ms: u64) -> Result<(), String> {
        let end = self.now + ms;
        while self.now < end {
            self.step()?;
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), String> {
        let chaos_end = self.p.chaos_ms;
        while self.now < chaos_end {
            self.chaos();
            self.step()?;
        }
        self.settle()
    }

    /// Heals everything, waits for quiescence, checks the outcome, then has every client
    /// read every written document and checks that each read shows every write.
    fn settle(&mut self) -> Result<(), String> {
        self.heal();
        let quiet_start = self.now;
        self.run_until_quiet(quiet_start, "healing")?;
        self.stats.quiet_ms = self.now - quiet_start;
        self.check_final()?;
        for d in 0..self.doc_ids.len() {
            if self.written(&self.doc_ids[d]) {
                for c in 0..self.clients.len() {
                    self.start_read(c, d, true);
                }
                self.run_until_quiet(self.now, "the final reads")?;
            }
        }
        self.check_final()
    }

    fn run_until_quiet(&mut self, since: u64, what: &str) -> Result<(), String> {
        loop {
            self.step()?;
            if (self.now - since) % 100 == 0 && self.quiescent() {
                return Ok(());
            }
            if self.now - since > QUIET_LIMIT_MS {
                return Err(format!("no quiescence {QUIET_LIMIT_MS} ms after {what}:\n{}", self.describe()));
            }
        }
    }

    /// Crashes, restarts, partitions and new client writes and reads.
    fn chaos(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].up && self.rng.chance(self.p.crash_per_mille) {
                let down_for = self.rng.range(50, 1_500);
                self.crash(i, down_for);
            }
        }
        if self.rng.chance(self.p.outage_per_mille) {
            let down_for = self.rng.range(500, 2_500);
            let first = self.rng.below(self.nodes.len() as u64) as usize;
            let second =
                (first + 1 + self.rng.below(self.nodes.len() as u64 - 1) as usize) % self.nodes.len();
            for i in [first, second] {
                if self.nodes[i].up {
                    self.crash(i, down_for);
                }
            }
        }
        match &self.partition {
            Some((_, until)) if self.now >= *until => {
                self.note(|| "partition healed".into());
                self.partition = None;
            }
            None if self.rng.chance(self.p.partition_per_mille) => {
                let mut side = BTreeSet::new();
                for i in 0..self.nodes.len() {
                    if self.rng.chance(500) {
                        side.insert(Addr::Node(i));
                    }
                }
                for c in 0..self.clients.len() {
                    if self.rng.chance(500) {
                        side.insert(Addr::Client(c));
                    }
                }
                let until = self.now + self.rng.range(100, 1_500);
                self.note(|| format!("partition {side:?} until {until}"));
                self.stats.partitions += 1;
                self.partition = Some((side, until));
            }
            _ => {}
        }
        let per_step = (self.p.writes as u64 * STEP_MS * 1000) / self.p.chaos_ms.max(1);
        if (self.stats.writes as usize) < self.p.writes && self.rng.chance(per_step) {
            let c = self.rng.below(self.clients.len() as u64) as usize;
            if self.clients[c].writes.iter().filter(|w| !w.acked).count() < 4 {
                let d = self.rng.below(self.doc_ids.len() as u64) as usize;
                self.client_write(c, d);
            }
        }
        let per_step = (self.p.reads as u64 * STEP_MS * 1000) / self.p.chaos_ms.max(1);
        if (self.stats.reads as usize) < self.p.reads && self.rng.chance(per_step) {
            let c = self.rng.below(self.clients.len() as u64) as usize;
            if self.clients[c].read.is_none() {
                let d = self.rng.below(self.doc_ids.len() as u64) as usize;
                self.start_read(c, d, false);
            }
        }
    }

    fn client_write(&mut self, c: usize, d: usize) {
        let doc_id = self.doc_ids[d].clone();
        let replica = self.clients[c].replica;
        let increment = self.rng.chance(600);
        let n = self.stats.writes;
        let doc = self.clients[c].docs.entry(doc_id.clone()).or_insert_with(|| Document::new(replica));
        let (delta, change) = if increment {
            (doc.increment(COUNTER, 1), Change::Increment)
        } else {
            let v = Value::from(format!("c{c}-w{n}"));
            (doc.set_add(SET, v.clone()), Change::Add(v))
        };
        let delta = delta.unwrap_or_else(|e| panic!("local write failed: {e}"));
        self.note(|| format!("client {c} writes {:?} to {doc_id}: {change:?}", delta.dot));
        self.stats.writes += 1;
        self.clients[c].writes.push(Write {
            doc: doc_id,
            delta,
            change,
            acked: false,
            first_acked: None,
            verified: false,
            retry_at: None,
            conn: None,
        });
    }

    fn start_read(&mut self, c: usize, d: usize, all_must_show: bool) {
        let doc = self.doc_ids[d].clone();
        self.note(|| format!("client {c} reads {doc}"));
        self.stats.reads += 1;
        self.clients[c].read = Some(Read {
            doc,
            retry_at: None,
            conn: None,
            acked_before: Vec::new(),
            on_w_owners: Vec::new(),
            all_must_show,
        });
    }

    fn crash(&mut self, i: usize, down_for: u64) {
        self.note(|| format!("{} crashes for {down_for} ms", self.nodes[i].id));
        self.stats.crashes += 1;
        let now = self.now;
        let n = &mut self.nodes[i];
        n.up = false;
        n.restart_at = now.saturating_add(down_for);
        n.docs.clear();
        n.durable.clear();
        n.commits.clear();
        n.hints = HintQueue::new(HINT_RESEND_MS);
        n.members.clear();
        n.probes.clear();
        n.read_strict.clear();
        n.co = Coordinator::new(&n.id, W, R, COORDINATOR_TIMEOUT_MS);
    }

    fn restart(&mut self, i: usize) {
        let now = self.now;
        let first_ae = self.rng.next_u64();
        let n = &mut self.nodes[i];
        n.up = true;
        n.docs = n
            .disk_docs
            .iter()
            .map(|(id, bytes)| {
                let doc = Document::decode(bytes, DocConfig::default())
                    .unwrap_or_else(|e| panic!("{} cannot read its {id}: {e}", n.id));
                (id.clone(), doc)
            })
            .collect();
        // As the relay loads a document: what is stored is durable.
        n.durable = n
            .docs
            .iter()
            .map(|(id, d)| (id.clone(), CausalContext { vv: d.version().clone(), cloud: Default::default() }))
            .collect();
        n.hints = HintQueue::from_hints(HINT_RESEND_MS, n.disk_hints.values().cloned());
        n.fd = FailureDetector::new(DETECTOR, now);
        n.co = Coordinator::new(&n.id, W, R, COORDINATOR_TIMEOUT_MS);
        n.next_heartbeat = now;
        n.ae = AntiEntropySchedule::new(AE_INTERVAL_MS, AE_JITTER_MS);
        n.ae.next_due(now, first_ae);
        let n = &self.nodes[i];
        self.note(|| format!("{} restarts with {} docs, {} hints", n.id, n.docs.len(), n.hints.len()));
    }

    fn heal(&mut self) {
        self.note(|| "healing: no more faults".into());
        self.calm = true;
        self.partition = None;
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up {
                self.restart(i);
            }
        }
    }

    /// One step of time: deliveries, then every node's and client's timers.
    fn step(&mut self) -> Result<(), String> {
        self.now += STEP_MS;
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up && self.now >= self.nodes[i].restart_at {
                self.restart(i);
            }
        }
        while let Some(entry) = self.net.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let env = entry.remove();
            if !self.is_up(env.to) || (!env.reliable && self.cut(env.from, env.to)) {
                self.stats.lost += 1;
                continue;
            }
            self.event += 1;
            self.deliver(env)?;
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].up {
                self.node_timers(i)?;
            }
        }
        for c in 0..self.clients.len() {
            self.client_timers(c);
        }
        Ok(())
    }

    /// A new connection of client `c` to a random node, for `purpose`.
    fn connect(&mut self, c: usize, purpose: Purpose) -> (ConnId, usize) {
        let node = self.pin.unwrap_or_else(|| self.rng.below(self.nodes.len() as u64) as usize);
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(conn, Conn { client: c, node, purpose, open: true });
        (conn, node)
    }

    fn close(&mut self, conn: Option<ConnId>) {
        let Some(conn) = conn else { return };
        let Some(cn) = self.conns.get_mut(&conn) else { return };
        if !cn.open {
            return;
        }
        cn.open = false;
        let (client, node) = (cn.client, cn.node);
        self.post(Addr::Client(client), Addr::Node(node), Msg::Close { conn }, true);
    }

    fn client_timers(&mut self, c: usize) {
        for w in 0..self.clients[c].writes.len() {
            let write = &self.clients[c].writes[w];
            if write.acked || write.retry_at.is_some_and(|t| t > self.now) {
                continue;
            }
            let old = write.conn;
            self.close(old);
            let (conn, node) = self.connect(c, Purpose::Write(w));
            let write = &mut self.clients[c].writes[w];
            write.conn = Some(conn);
            write.retry_at = Some(self.now + CLIENT_TIMEOUT_MS);
            let msg = Msg::Write { conn, doc: write.doc.clone(), delta: write.delta.clone() };
            self.stats.write_attempts += 1;
            self.send(Addr::Client(c), Addr::Node(node), msg);
        }
        let due = match &self.clients[c].read {
            Some(r) => r.retry_at.is_none_or(|t| t <= self.now),
            None => false,
        };
        if due {
            let old = self.clients[c].read.as_ref().and_then(|r| r.conn);
            self.close(old);
            let (conn, node) = self.connect(c, Purpose::Read);
            let doc = self.clients[c].read.as_ref().map(|r| r.doc.clone()).unwrap_or_default();
            // What this attempt must show: the writes acked before it starts.
            self.event += 1;
            let acked_before: Vec<Dot> = self
                .clients
                .iter()
                .flat_map(|cl| cl.writes.iter())
                .filter(|w| w.doc == doc && w.first_acked.is_some_and(|e| e < self.event))
                .map(|w| w.delta.dot)
                .collect();
            let on_w_owners: Vec<Dot> = acked_before
                .iter()
                .copied()
                .filter(|dot| self.owners_holding(&doc, *dot).len() >= W)
                .collect();
            let timeout = self.now + CLIENT_READ_TIMEOUT_MS;
            if let Some(r) = &mut self.clients[c].read {
                r.conn = Some(conn);
                r.retry_at = Some(timeout);
                r.acked_before = acked_before;
                r.on_w_owners = on_w_owners;
            }
            self.stats.read_attempts += 1;
            self.send(Addr::Client(c), Addr::Node(node), Msg::Read { conn, doc });
        }
    }

    fn node_timers(&mut self, i: usize) -> Result<(), String> {
        let now = self.now;
        let me = Addr::Node(i);
        if now >= self.nodes[i].next_heartbeat {
            self.nodes[i].next_heartbeat = now + HEARTBEAT_MS;
            for j in 0..self.nodes.len() {
                if j != i {
                    self.send(me, Addr::Node(j), Msg::Heartbeat);
                }
            }
        }
        self.run_commits(i)?;
        // The coordinator's deadlines, with targets as this node sees them now; a read
        // re-targeted to a fallback is no longer strict.
        let sloppy: RefCell<BTreeSet<String>> = RefCell::default();
        let acts = {
            let node = &mut self.nodes[i];
            let (ring, fd, id) = (&self.ring, &node.fd, node.id.clone());
            node.co.tick(now, |doc| {
                let t = targets_of(ring, fd, &id, doc, now);
                if t.iter().any(Target::is_fallback) {
                    sloppy.borrow_mut().insert(doc.to_string());
                }
                t
            })
        };
        let sloppy = sloppy.into_inner();
        for (doc, strict) in self.nodes[i].read_strict.values_mut() {
            if sloppy.contains(doc) {
                *strict = false;
            }
        }
        self.execute(i, acts)?;
        // Hinted handoff: owners seen up get this node's copy of the next documents.
        let node = &mut self.nodes[i];
        let mut out = Vec::new();
        let due: Vec<String> =
            node.hints.due_owners(|o| node.fd.health(o, now)).into_iter().map(str::to_string).collect();
        for owner in due {
            let batch: Vec<(u64, String)> = node
                .hints
                .next_batch(&owner, HINT_BATCH, now)
                .iter()
                .map(|h| (h.id, h.doc.clone()))
                .collect();
            for (hint, doc) in batch {
                let state = State::of(node.docs.get(&doc));
                out.push((owner.clone(), Msg::Handoff { hint, doc, state }));
            }
        }
        for (owner, msg) in out {
            let j = self.node_index(&owner);
            self.send(me, Addr::Node(j), msg);
        }
        // Anti-entropy with the next peer that shares a range, for the documents shared.
        if self.nodes[i].ae.is_due(now) {
            let r = self.rng.next_u64();
            self.nodes[i].ae.next_due(now, r);
            let node = &self.nodes[i];
            let peers: Vec<String> = anti_entropy_peers(&self.ring, &node.id, N)
                .into_iter()
                .filter(|p| node.fd.is_up(p, now))
                .collect();
            let r = self.rng.next_u64();
            let node = &mut self.nodes[i];
            if let Some(peer) = node.ae.pick_peer(&peers, r).map(str::to_string) {
                let msgs: Vec<Msg> = node
                    .docs
                    .iter()
                    .filter(|(id, _)| shares_range(&self.ring, &node.id, &peer, id, N))
                    .map(|(id, d)| Msg::AntiEntropy {
                        doc: id.clone(),
                        state: State::of(Some(d)),
                        answer: true,
                    })
                    .collect();
                self.stats.ae_exchanges += 1;
                let j = self.node_index(&peer);
                for m in msgs {
                    self.send(me, Addr::Node(j), m);
                }
            }
        }
        Ok(())
    }

    /// Queues a storage write of `doc` on node `i`, after the ones already queued.
    fn commit(&mut self, i: usize, mut c: Commit) {
        let delay = self.rng.range(0, self.p.max_commit_ms);
        let node = &mut self.nodes[i];
        c.due = node.commits.back().map_or(0, |b| b.due).max(self.now + delay);
        node.commits.push_back(c);
    }

    /// Commits that are due: the document (as it is now) goes to disk, the committed
    /// spans become durable, and what waited on them follows.
    fn run_commits(&mut self, i: usize) -> Result<(), String> {
        let now = self.now;
        while self.nodes[i].commits.front().is_some_and(|c| c.due <= now) {
            let Some(c) = self.nodes[i].commits.pop_front() else { break };
            let node = &mut self.nodes[i];
            if let Some(d) = node.docs.get(&c.doc) {
                node.disk_docs.insert(c.doc.clone(), d.encode());
                node.disk_ctx.insert(c.doc.clone(), d.context().clone());
            }
            if let Some(owner) = c.hint_for {
                self.store_hint(i, &c.doc, owner);
            }
            let node = &mut self.nodes[i];
            let ctx = node.durable.entry(c.doc.clone()).or_default();
            for s in &c.spans {
                ctx.insert_span(*s);
            }
            if let Some(vv) = &c.absorb {
                ctx.absorb(vv);
            }
            let vv = ctx.vv.clone();
            match c.then {
                Then::Coordinated => {
                    let ctx = ctx.clone();
                    for owner in node.co.standing_in_for(&c.doc) {
                        self.store_hint(i, &c.doc, owner);
                    }
                    let acts = self.nodes[i].co.durable(&c.doc, &ctx, now);
                    self.execute(i, acts)?;
                }
                Then::AckTo(j) => self.send(Addr::Node(i), Addr::Node(j), Msg::Replicated { doc: c.doc, vv }),
                Then::HandedOff { to, hint } => {
                    self.send(Addr::Node(i), Addr::Node(to), Msg::HandedOff { hint, vv })
                }
                Then::Nothing => {}
            }
        }
        Ok(())
    }

    /// Node `i` keeps `doc` for `owner` (one hint per document and owner, as the relay).
    fn store_hint(&mut self, i: usize, doc: &str, owner: String) {
        let node = &mut self.nodes[i];
        if node.disk_hints.values().any(|h| h.doc == doc && h.owner == owner) {
            return;
        }
        let hint = Hint { id: node.next_hint_id, owner, doc: doc.to_string(), payload: () };
        node.next_hint_id += 1;
        node.disk_hints.insert(hint.id, hint.clone());
        node.hints.insert(hint);
        self.stats.hints_stored += 1;
    }

    /// Owners of `doc` whose disk holds `dot`.
    fn owners_holding(&self, doc: &str, dot: Dot) -> Vec<&str> {
        self.nodes
            .iter()
            .filter(|n| self.ring.owns(&n.id, doc, N))
            .filter(|n| n.disk_ctx.get(doc).is_some_and(|c| c.contains(dot)))
            .map(|n| n.id.as_str())
            .collect()
    }

    /// Replicas whose disk holds `dot` of `doc`: owners, and fallbacks that hold a hint
    /// for it (a copy without a hint is nobody's replica: nothing would hand it over).
    fn replicas_holding(&self, doc: &str, dot: Dot) -> Vec<&str> {
        self.nodes
            .iter()
            .filter(|n| self.ring.owns(&n.id, doc, N) || n.disk_hints.values().any(|h| h.doc == doc))
            .filter(|n| n.disk_ctx.get(doc).is_some_and(|c| c.contains(dot)))
            .map(|n| n.id.as_str())
            .collect()
    }

    /// Check (a): `vv` of `doc` is being acknowledged to a client; every client write it
    /// covers must be durable on W replicas. Durable state only grows (a hint goes only
    /// once the owner holds its document), so each write is checked once.
    fn check_acked(&mut self, doc: &str, vv: &VersionVector, what: &str) -> Result<(), String> {
        let mut checked = Vec::new();
        for (c, cl) in self.clients.iter().enumerate() {
            for (k, w) in cl.writes.iter().enumerate() {
                if w.doc != doc || w.verified || !vv.contains(w.delta.dot) {
                    continue;
                }
                let holders = self.replicas_holding(doc, w.delta.dot);
                if holders.len() < W {
                    return Err(format!(
                        "{what}: {:?} of {doc} acknowledged (version {vv:?}) but durable only on {holders:?}",
                        w.delta.dot
                    ));
                }
                checked.push((c, k));
            }
        }
        for (c, k) in checked {
            self.clients[c].writes[k].verified = true;
        }
        Ok(())
    }

    /// Carries out the coordinator's actions at node `i`, as the relay's `execute` does.
    fn execute(&mut self, i: usize, mut acts: Vec<Action>) -> Result<(), String> {
        // The coordinator keeps documents in a hash map: order its actions by document
        // (stably, keeping each document's order) so that a seed replays the same way.
        acts.sort_by(|a, b| action_doc(a).cmp(action_doc(b)));
        let me = Addr::Node(i);
        for act in acts {
            let id = self.nodes[i].id.clone();
            match act {
                Action::Ack { conn, doc, vv, owner_acks, fallback_acks, .. } => {
                    self.check_acked(&doc, &vv, &format!("{id} acked conn {conn}"))?;
                    match owner_acks + fallback_acks {
                        0 => self.stats.retries_acked_at_once += 1,
                        n if n < W => {
                            return Err(format!("{id} acked {doc} to conn {conn} with only {n} acks"));
                        }
                        _ => {
                            self.stats.quorum_acks += 1;
                            if fallback_acks > 0 {
                                self.stats.acked_with_fallbacks += 1;
                            }
                            if owner_acks == 0 {
                                self.stats.acked_by_fallbacks_only += 1;
                            }
                        }
                    }
                    self.note(|| format!("{id} acks {vv:?} of {doc} to conn {conn} ({owner_acks} owners, {fallback_acks} fallbacks)"));
                    if let Some(c) = self.conns.get(&conn).map(|c| c.client) {
                        self.send(me, Addr::Client(c), Msg::Ack { conn, doc, vv });
                    }
                }
                Action::Acked { doc, vv } => {
                    self.check_acked(&doc, &vv, &format!("{id} told its clients"))?;
                    self.stats.acked_broadcasts += 1;
                    self.note(|| format!("{id} tells the clients of {doc} that {vv:?} is acked"));
                    let members: Vec<ConnId> =
                        self.nodes[i].members.get(&doc).into_iter().flatten().copied().collect();
                    for conn in members {
                        if let Some(c) = self.conns.get(&conn).map(|c| c.client) {
                            self.send(
                                me,
                                Addr::Client(c),
                                Msg::Ack { conn, doc: doc.clone(), vv: vv.clone() },
                            );
                        }
                    }
                }
                Action::Answer { conn, doc } => {
                    let node = &mut self.nodes[i];
                    let vv = node.docs.get(&doc).map(|d| d.version().clone()).unwrap_or_default();
                    let strict = node.read_strict.remove(&conn).is_some_and(|(_, s)| s);
                    self.note(|| {
                        format!("{id} answers conn {conn}'s read of {doc} at {vv:?} (strict: {strict})")
                    });
                    if let Some(c) = self.conns.get(&conn).map(|c| c.client) {
                        self.send(me, Addr::Client(c), Msg::Answer { conn, doc, vv, strict });
                    }
                }
                Action::Probe { peer, doc } => {
                    let probe = self.next_probe;
                    self.next_probe += 1;
                    self.stats.probes += 1;
                    self.nodes[i].probes.insert((doc.clone(), peer.clone()), probe);
                    let j = self.node_index(&peer);
                    self.send(me, Addr::Node(j), Msg::ReadReq { doc, probe });
                }
                Action::NotEnoughReplicas { conn, doc, message } => {
                    self.note(|| format!("{id} to conn {conn} about {doc}: {message}"));
                    if let Some(c) = self.conns.get(&conn) {
                        match c.purpose {
                            Purpose::Write(_) => self.stats.write_not_enough_replicas += 1,
                            Purpose::Read => self.stats.read_not_enough_replicas += 1,
                        }
                        let c = c.client;
                        self.send(me, Addr::Client(c), Msg::NotEnoughReplicas { conn });
                    }
                }
            }
        }
        Ok(())
    }

    /// A client connection subscribes to `doc` at node `i`: it is told what is already
    /// durable on W replicas (the relay's answer to `Subscribed`).
    fn subscribe(&mut self, i: usize, conn: ConnId, doc: &str) -> Result<(), String> {
        let node = &mut self.nodes[i];
        node.members.entry(doc.to_string()).or_default().insert(conn);
        node.doc_mut(doc);
        let vv = node.co.acked(doc, &node.durable_vv(doc));
        let what = format!("{} acked a subscription", node.id);
        self.check_acked(doc, &vv, &what)?;
        if let Some(c) = self.conns.get(&conn).map(|c| c.client) {
            self.send(Addr::Node(i), Addr::Client(c), Msg::Ack { conn, doc: doc.to_string(), vv });
        }
        Ok(())
    }

    /// The coordinator's side of a client write (the relay's `process` for `Deltas`).
    fn on_client_write(&mut self, i: usize, conn: ConnId, doc: String, delta: Delta) -> Result<(), String> {
        self.subscribe(i, conn, &doc)?;
        let (now, dot) = (self.now, delta.dot);
        let node = &mut self.nodes[i];
        let mut applied = Vec::new();
        node.doc_mut(&doc)
            .apply_into(delta.clone(), &mut applied)
            .map_err(|e| format!("{} rejected {:?} of {doc}: {e}", node.id, delta.dot))?;
        let targets = targets_of(&self.ring, &node.fd, &node.id, &doc, now);
        // Standing in for an owner itself, this node keeps a hint, durable before its
        // own durability counts for the write (a retry reports it at once).
        let mut owners = node.co.standing_in_for(&doc);
        owners.extend(targets.iter().find(|t| t.node == node.id).and_then(|t| t.hint_for.clone()));
        for owner in owners {
            self.store_hint(i, &doc, owner);
        }
        let node = &mut self.nodes[i];
        let (acts, sends) = if applied.is_empty() {
            // Nothing new (a retry, or a delta held back until an earlier one arrives).
            let durable = node.durable.get(&doc).cloned().unwrap_or_default();
            let (missing, acts) =
                node.co.retry(conn, &doc, vec![delta.span()], targets.clone(), &durable, now);
            (acts, if missing.is_empty() { Vec::new() } else { vec![delta] })
        } else {
            let spans: Vec<Span> = applied.iter().map(Delta::span).collect();
            let acts = node.co.write(conn, &doc, spans.clone(), targets.clone(), now);
            let commit = Commit {
                due: 0,
                doc: doc.clone(),
                spans,
                absorb: None,
                hint_for: None,
                then: Then::Coordinated,
            };
            self.commit(i, commit);
            (acts, applied)
        };
        let me = self.nodes[i].id.clone();
        self.note(|| format!("{me} coordinates {dot:?} of {doc} (conn {conn}): {targets:?}"));
        for t in targets.into_iter().filter(|t| t.node != me) {
            let j = self.node_index(&t.node);
            for d in &sends {
                let msg = Msg::Replicate { doc: doc.clone(), delta: d.clone(), hint_for: t.hint_for.clone() };
                self.send(Addr::Node(i), Addr::Node(j), msg);
            }
        }
        self.execute(i, acts)
    }

    fn on_client_read(&mut self, i: usize, conn: ConnId, doc: String) -> Result<(), String> {
        self.subscribe(i, conn, &doc)?;
        let now = self.now;
        let node = &mut self.nodes[i];
        let targets = targets_of(&self.ring, &node.fd, &node.id, &doc, now);
        let strict = !targets.iter().any(Target::is_fallback);
        node.read_strict.insert(conn, (doc.clone(), strict));
        let id = node.id.clone();
        self.note(|| format!("{id} reads {doc} for conn {conn}: {targets:?}"));
        let acts = self.nodes[i].co.read(conn, &doc, targets, now);
        self.execute(i, acts)
    }

    /// Merges a peer's state of `doc` into node `i`'s; a change is committed.
    fn merge(&mut self, i: usize, doc: &str, state: State, then: Then) -> Result<bool, String> {
        let node = &mut self.nodes[i];
        let id = node.id.clone();
        let d = node.doc_mut(doc);
        let (before, pending) = (d.version().clone(), d.pending_len());
        d.merge_state(state.fields, &state.ctx, &state.vv)
            .map_err(|e| format!("{id}: merge of {doc}: {e}"))?;
        let changed = *d.version() != before || d.pending_len() != pending;
        let vv = d.version().clone();
        if changed || !matches!(then, Then::Nothing) {
            let commit = Commit {
                due: 0,
                doc: doc.to_string(),
                spans: Vec::new(),
                absorb: Some(vv),
                hint_for: None,
                then,
            };
            self.commit(i, commit);
        }
        Ok(changed)
    }

    fn deliver(&mut self, env: Envelope) -> Result<(), String> {
        let now = self.now;
        if let (Addr::Node(i), Addr::Node(from)) = (env.to, env.from) {
            let from_id = self.nodes[from].id.clone();
            self.nodes[i].fd.heartbeat(&from_id, now);
        }
        match (env.to, env.msg) {
            (Addr::Client(c), Msg::Ack { conn, doc, vv }) => self.client_ack(c, conn, &doc, &vv),
            (Addr::Client(c), Msg::Answer { conn, doc, vv, strict }) => {
                self.client_answer(c, conn, &doc, &vv, strict)?
            }
            (Addr::Client(c), Msg::NotEnoughReplicas { conn }) => {
                if !self.conns.get(&conn).is_some_and(|cn| cn.open) {
                    return Ok(());
                }
                // Try again soon, through whichever node comes up next.
                let retry = Some(now + RETRY_AFTER_ERROR_MS);
                match self.conns[&conn].purpose {
                    Purpose::Write(w) => self.clients[c].writes[w].retry_at = retry,
                    Purpose::Read => {
                        if let Some(r) = &mut self.clients[c].read {
                            r.retry_at = retry;
                        }
                    }
                }
                self.close(Some(conn));
            }
            (Addr::Node(i), Msg::Write { conn, doc, delta }) => self.on_client_write(i, conn, doc, delta)?,
            (Addr::Node(i), Msg::Read { conn, doc }) => self.on_client_read(i, conn, doc)?,
            (Addr::Node(i), Msg::Close { conn }) => {
                let node = &mut self.nodes[i];
                node.co.closed(conn);
                node.read_strict.remove(&conn);
                for m in node.members.values_mut() {
                    m.remove(&conn);
                }
            }
            (Addr::Node(i), Msg::Replicate { doc, delta, hint_for }) => {
                let Addr::Node(from) = env.from else { return Err("a client sent a replica write".into()) };
                let id = self.nodes[i].id.clone();
                match (&hint_for, self.owns(i, &doc)) {
                    (Some(owner), true) => {
                        return Err(format!("{id} got a hint for {owner} of {doc}, which it owns"))
                    }
                    (None, false) => {
                        return Err(format!(
                            "{id} asked to store {doc}, which it does not own, without a hint"
                        ))
                    }
                    _ => {}
                }
                let mut applied = Vec::new();
                let node = &mut self.nodes[i];
                node.doc_mut(&doc)
                    .apply_into(delta.clone(), &mut applied)
                    .map_err(|e| format!("{id} rejected {:?} of {doc}: {e}", delta.dot))?;
                let spans = applied.iter().map(Delta::span).collect();
                self.commit(
                    i,
                    Commit { due: 0, doc, spans, absorb: None, hint_for, then: Then::AckTo(from) },
                );
            }
            (Addr::Node(i), Msg::Replicated { doc, vv }) => {
                let Addr::Node(from) = env.from else { return Err("a client acked a replica write".into()) };
                let peer = self.nodes[from].id.clone();
                let node = &mut self.nodes[i];
                let durable = node.durable_vv(&doc);
                let acts = node.co.peer_ack(&peer, &doc, &vv, &durable, now);
                self.execute(i, acts)?;
            }
            (Addr::Node(i), Msg::ReadReq { doc, probe }) => {
                let state = State::of(self.nodes[i].docs.get(&doc));
                self.send(env.to, env.from, Msg::ReadResp { doc, probe, state });
            }
            (Addr::Node(i), Msg::ReadResp { doc, probe, state }) => {
                let Addr::Node(from) = env.from else { return Err("a client answered a probe".into()) };
                self.merge(i, &doc, state, Then::Nothing)?;
                let peer = self.nodes[from].id.clone();
                // Only the answer to the latest probe says the peer's state since the
                // latest read started; an older one may predate it.
                if self.nodes[i].probes.get(&(doc.clone(), peer.clone())) != Some(&probe) {
                    self.stats.stale_answers += 1;
                    return Ok(());
                }
                let acts = self.nodes[i].co.peer_answered(&peer, &doc);
                self.execute(i, acts)?;
            }
            (Addr::Node(_), Msg::Heartbeat) => {}
            (Addr::Node(i), Msg::Handoff { hint, doc, state }) => {
                let Addr::Node(from) = env.from else { return Err("a client handed off".into()) };
                if !self.owns(i, &doc) {
                    return Err(format!("{} was handed {doc}, which it does not own", self.nodes[i].id));
                }
                self.merge(i, &doc, state, Then::HandedOff { to: from, hint })?;
            }
            (Addr::Node(i), Msg::HandedOff { hint, vv }) => {
                let node = &mut self.nodes[i];
                let Some(h) = node.hints.get(hint) else { return Ok(()) };
                // The owner holds everything this node does: the hint is done. Otherwise
                // it goes again after `HINT_RESEND_MS`, with what arrived meanwhile.
                if node.docs.get(&h.doc).is_none_or(|d| d.version().le(&vv)) {
                    node.hints.delivered(hint);
                    node.disk_hints.remove(&hint);
                    self.stats.hints_delivered += 1;
                }
            }
            (Addr::Node(i), Msg::AntiEntropy { doc, state, answer }) => {
                if !self.owns(i, &doc) {
                    return Err(format!(
                        "{} got anti-entropy for {doc}, which it does not own",
                        self.nodes[i].id
                    ));
                }
                if self.merge(i, &doc, state, Then::Nothing)? {
                    self.stats.ae_repairs += 1;
                }
                if answer {
                    let state = State::of(self.nodes[i].docs.get(&doc));
                    self.send(env.to, env.from, Msg::AntiEntropy { doc, state, answer: false });
                }
            }
            (to, msg) => return Err(format!("unexpected message for {to:?}: {msg:?}")),
        }
        Ok(())
    }

    /// Client `c` is told on `conn` that `vv` of `doc` is durable on W replicas.
    fn client_ack(&mut self, c: usize, conn: ConnId, doc: &str, vv: &VersionVector) {
        if !self.conns.get(&conn).is_some_and(|cn| cn.open) {
            return;
        }
        let event = self.event;
        for cl in &mut self.clients {
            for w in cl.writes.iter_mut().filter(|w| w.doc == doc && vv.contains(w.delta.dot)) {
                w.first_acked.get_or_insert(event);
            }
        }
        let mut done = Vec::new();
        for w in self.clients[c].writes.iter_mut().filter(|w| w.doc == doc && vv.contains(w.delta.dot)) {
            if !w.acked {
                w.acked = true;
                done.push(w.conn);
            }
        }
        for conn in done {
            self.close(conn);
        }
    }

    /// Client `c`'s read on `conn` is answered at version `vv`: check (b).
    fn client_answer(
        &mut self,
        c: usize,
        conn: ConnId,
        doc: &str,
        vv: &VersionVector,
        strict: bool,
    ) -> Result<(), String> {
        let Some(r) = &self.clients[c].read else { return Ok(()) };
        if r.conn != Some(conn) || !self.conns.get(&conn).is_some_and(|cn| cn.open) || r.doc != doc {
            return Ok(());
        }
        let missed: Vec<Dot> = r.acked_before.iter().copied().filter(|d| !vv.contains(*d)).collect();
        if r.all_must_show && !missed.is_empty() {
            return Err(format!(
                "after healing, client {c}'s read of {doc} at {vv:?} misses acked writes {missed:?}"
            ));
        }
        if strict {
            let lost: Vec<Dot> = r.on_w_owners.iter().copied().filter(|d| !vv.contains(*d)).collect();
            if !lost.is_empty() {
                return Err(format!(
                    "client {c}'s strict-quorum read of {doc} (conn {conn}) at {vv:?} misses writes acked before it \
                     started and durable on W owners: {lost:?}"
                ));
            }
            self.stats.strict_reads += 1;
            self.stats.strict_checks += r.on_w_owners.len() as u64;
        } else {
            self.stats.sloppy_reads += 1;
            self.stats.sloppy_misses += missed.len() as u64;
        }
        self.note(|| format!("client {c} read {doc} at {vv:?} (strict: {strict}, missed {missed:?})"));
        self.stats.reads_answered += 1;
        self.clients[c].read = None;
        self.close(Some(conn));
        Ok(())
    }

    fn quiescent(&self) -> bool {
        self.clients.iter().all(|c| c.read.is_none() && c.writes.iter().all(|w| w.acked))
            && self.nodes.iter().all(|n| {
                n.hints.is_empty()
                    && n.disk_hints.is_empty()
                    && n.commits.is_empty()
                    && self.doc_ids.iter().all(|d| n.co.is_idle(d))
            })
            && self.doc_ids.iter().all(|d| !self.written(d) || self.owners_agree(d).is_ok())
    }

    fn written(&self, doc: &str) -> bool {
        self.clients.iter().any(|c| c.writes.iter().any(|w| w.doc == doc))
    }

    fn owners_agree(&self, doc: &str) -> Result<(), String> {
        let owners = self.ring.preference_list(doc, N);
        let docs: Vec<(&str, Option<&Document>)> =
            owners.iter().map(|o| (*o, self.nodes[self.node_index(o)].docs.get(doc))).collect();
        let Some((first_id, Some(first))) = docs.first().copied() else {
            return Err(format!("{doc}: first owner holds nothing"));
        };
        for (id, d) in &docs {
            let d = d.ok_or_else(|| format!("{doc}: owner {id} holds nothing"))?;
            if d != first || d.to_value() != first.to_value() {
                return Err(format!("{doc}: owners {first_id} and {id} differ: {:?} vs {:?}", first, d));
            }
        }
        Ok(())
    }

    fn check_final(&self) -> Result<(), String> {
        for c in &self.clients {
            if let Some(w) = c.writes.iter().find(|w| !w.acked) {
                return Err(format!("write {:?} never acked", w.delta.dot));
            }
        }
        for n in &self.nodes {
            if !n.hints.is_empty() || !n.disk_hints.is_empty() {
                return Err(format!("{} still holds {} hints", n.id, n.hints.len().max(n.disk_hints.len())));
            }
            if let Some(d) = self.doc_ids.iter().find(|d| !n.co.is_idle(d)) {
                return Err(format!("{}'s coordinator still waits on {d}", n.id));
            }
        }
        for doc in &self.doc_ids {
            let writes: Vec<(&Client, &Write)> = self
                .clients
                .iter()
                .flat_map(|c| c.writes.iter().map(move |w| (c, w)))
                .filter(|(_, w)| w.doc == *doc)
                .collect();
            if writes.is_empty() {
                continue;
            }
            self.owners_agree(doc)?;
            let owner = self.ring.preference_list(doc, N)[0];
            let d = &self.nodes[self.node_index(owner)].docs[doc];
            // Coordinators and fallbacks keep copies (as the relay does); none may hold
            // anything the owners lack.
            for n in &self.nodes {
                if let Some(copy) = n.docs.get(doc) {
                    if !copy.version().le(d.version()) {
                        return Err(format!(
                            "{} holds {doc} at {:?}, beyond its owners' {:?}",
                            n.id,
                            copy.version(),
                            d.version()
                        ));
                    }
                }
            }
            let lost: Vec<Dot> =
                writes.iter().map(|(_, w)| w.delta.dot).filter(|dot| !d.version().contains(*dot)).collect();
            if !lost.is_empty() {
                return Err(format!("{doc}: acked writes lost (or stuck behind a lost one): {lost:?}"));
            }
            for id in self.ring.preference_list(doc, N) {
                let pending = self.nodes[self.node_index(id)].docs[doc].pending_len();
                if pending > 0 {
                    return Err(format!("{doc}: owner {id} still buffers {pending} deltas"));
                }
            }
            let mut vv = VersionVector::new();
            for (c, w) in &writes {
                vv.raise(c.replica, w.delta.dot.seq);
            }
            if *d.version() != vv {
                return Err(format!("{doc}: version {:?}, but the acked writes make {vv:?}", d.version()));
            }
            let increments =
                writes.iter().filter(|(_, w)| matches!(w.change, Change::Increment)).count() as u64;
            if d.counter(COUNTER) != increments {
                return Err(format!(
                    "{doc}: counter {} but {increments} acked increments",
                    d.counter(COUNTER)
                ));
            }
            for c in &self.clients {
                let mine = writes
                    .iter()
                    .filter(|(cc, w)| cc.replica == c.replica && matches!(w.change, Change::Increment))
                    .count();
                let held = match d.get(COUNTER) {
                    Some(Field::Counter(g)) => g.get(c.replica),
                    _ => 0,
                };
                if held != mine as u64 {
                    return Err(format!("{doc}: client {} counted {held}, made {mine}", c.replica));
                }
            }
            let want: BTreeSet<Value> = writes
                .iter()
                .filter_map(|(_, w)| match &w.change {
                    Change::Add(v) => Some(v.clone()),
                    Change::Increment => None,
                })
                .collect();
            let have: BTreeSet<Value> = d.set_values(SET).into_iter().collect();
            if have != want {
                return Err(format!("{doc}: set {have:?}, acked adds {want:?}"));
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let mut s = format!("  seed {} at {} ms\n", self.seed, self.now);
        for n in &self.nodes {
            s += &format!(
                "  {} up={} hints={} commits={} busy={:?} docs={:?}\n",
                n.id,
                n.up,
                n.hints.len(),
                n.commits.len(),
                self.doc_ids.iter().filter(|d| !n.co.is_idle(d)).collect::<Vec<_>>(),
                n.docs
                    .iter()
                    .map(|(k, d)| (k.clone(), d.version().clone(), d.pending_len()))
                    .collect::<Vec<_>>()
            );
        }
        for d in &self.doc_ids {
            s += &format!(
                "  {d}: owners {:?}: {:?}\n",
                self.ring.preference_list(d, N),
                self.owners_agree(d).err()
            );
        }
        let unacked: Vec<Dot> = self
            .clients
            .iter()
            .flat_map(|c| c.writes.iter().filter(|w| !w.acked).map(|w| w.delta.dot))
            .collect();
        let reading: Vec<usize> =
            (0..self.clients.len()).filter(|&c| self.clients[c].read.is_some()).collect();
        s += &format!("  unacked writes: {unacked:?}; clients still reading: {reading:?}");
        s
    }
}

fn action_doc(a: &Action) -> &str {
    match a {
        Action::Ack { doc, .. }
        | Action::Acked { doc, .. }
        | Action::Answer { doc, .. }
        | Action::Probe { doc, .. }
        | Action::NotEnoughReplicas { doc, .. } => doc,
    }
}

fn run_seed(seed: u64) -> Result<Stats, String> {
    let mut w = World::new(seed);
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

fn replay_command(seed: u64) -> String {
    format!("CLUSTER_SIM_SEED={seed} cargo test -p concord-core --test cluster_sim -- --nocapture")
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn coordinated_quorums_keep_every_acked_write_and_reads_see_them() {
    let seeds: Vec<u64> = match env_u64("CLUSTER_SIM_SEED") {
        Some(s) => vec![s],
        None => (1..=env_u64("CLUSTER_SIM_SEEDS").unwrap_or(1000)).collect(),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(seeds.len().max(1));
    let started = std::time::Instant::now();
    let results: Vec<(u64, Result<Stats, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<u64> = seeds.iter().copied().skip(t).step_by(threads).collect();
                s.spawn(move || mine.into_iter().map(|seed| (seed, run_seed(seed))).collect::<Vec<_>>())
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for (seed, r) in &results {
        match r {
            Ok(st) => total.add(st),
            Err(e) => failures.push((*seed, e.clone())),
        }
    }
    failures.sort_by_key(|f| f.0);
    println!(
        "simulated {} cluster seeds in {:.1?} on {threads} threads: {total:#?}",
        seeds.len(),
        started.elapsed()
    );
    for (seed, e) in &failures {
        println!("\nseed {seed} FAILED: {e}\n  replay: {}", replay_command(*seed));
    }
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed; first: seed {} — replay with `{}`",
        failures.len(),
        seeds.len(),
        failures[0].0,
        replay_command(failures[0].0)
    );
    if seeds.len() >= 200 {
        // The runs must exercise every path, or they prove less than they seem to.
        let t = &total;
        assert!(t.acked_with_fallbacks > 0, "no write was acked through a fallback: {t:?}");
        assert!(t.acked_by_fallbacks_only > 0, "no write was acked by fallbacks alone: {t:?}");
        assert!(t.retries_acked_at_once > 0, "no retry was acked at once: {t:?}");
        assert!(t.acked_broadcasts > 0, "no Acked action: {t:?}");
        assert!(t.hints_delivered > 0, "no hint was handed off: {t:?}");
        assert!(t.ae_repairs > 0, "anti-entropy never repaired anything: {t:?}");
        assert!(t.write_not_enough_replicas > 0, "the write quorum was never out of reach: {t:?}");
        assert!(t.read_not_enough_replicas > 0, "the read quorum was never out of reach: {t:?}");
        assert!(t.stale_answers > 0, "no probe answer was ever stale: {t:?}");
        assert!(t.strict_checks > 0 && t.sloppy_reads > 0, "reads did not meet both kinds of quorum: {t:?}");
        assert!(t.crashes > 0 && t.partitions > 0, "no faults: {t:?}");
    }
}

/// Dynamo's hard case, scripted: two owners of a document crash and the third is cut
/// off, so writes are acked by fallbacks alone; the owners come back while half of all
/// messages are lost and a fallback crashes, and still every hint reaches its owner
/// before it is deleted. The third owner catches up by anti-entropy alone.
#[test]
fn writes_acked_only_by_fallbacks_reach_their_owners_through_lossy_handoff() {
    let mut w = World::scripted(11, 5);
    let outcome = (|| -> Result<(), String> {
        let doc = w.doc_ids[0].clone();
        let owners: Vec<usize> = w.ring.preference_list(&doc, N).iter().map(|o| w.node_index(o)).collect();
        w.crash(owners[0], u64::MAX);
        w.crash(owners[1], u64::MAX);
        w.partition = Some(([Addr::Node(owners[2])].into(), u64::MAX));
        w.run_for(DETECTOR.down_after_ms + 100)?;
        for _ in 0..12 {
            w.client_write(0, 0);
        }
        w.run_for(10_000)?;
        let on_owners: Vec<Dot> = w.clients[0]
            .writes
            .iter()
            .map(|x| x.delta.dot)
            .filter(|dot| !w.owners_holding(&doc, *dot).is_empty())
            .collect();
        if w.clients[0].writes.iter().any(|x| !x.acked) || !on_owners.is_empty() {
            return Err(format!(
                "writes were not acked by fallbacks alone (on owners: {on_owners:?}): {:?}\n{}",
                w.stats,
                w.describe()
            ));
        }
        let hinted: Vec<usize> = (0..w.nodes.len()).filter(|&i| !w.nodes[i].hints.is_empty()).collect();
        if hinted.len() != 2 {
            return Err(format!("expected two fallbacks with hints, got {hinted:?}"));
        }
        w.p.loss_per_mille = 500;
        w.restart(owners[0]);
        w.restart(owners[1]);
        w.run_for(150)?;
        w.crash(hinted[0], 400);
        w.run_for(6_000)?;
        if let Some(n) = w.nodes.iter().find(|n| !n.hints.is_empty()) {
            return Err(format!("{} still holds {} hints after 6 s\n{}", n.id, n.hints.len(), w.describe()));
        }
        w.settle()
    })();
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

/// R + W > N, scripted: a write is acked while one owner is cut off, so that owner
/// misses it; right after the cut heals, a client reads at that very owner. Its own copy
/// is one answer of R = 2; the read must wait for a peer's, which holds the write.
#[test]
fn a_read_at_an_owner_that_missed_a_write_waits_for_a_peer_that_holds_it() {
    let mut w = World::scripted(12, 3);
    let outcome = (|| -> Result<(), String> {
        let doc = w.doc_ids[0].clone();
        let missed = w.node_index(w.ring.preference_list(&doc, N)[2]);
        w.run_for(100)?;
        w.partition = Some(([Addr::Node(missed)].into(), u64::MAX));
        w.pin = Some((missed + 1) % 3);
        w.client_write(0, 0);
        while !w.clients[0].writes[0].acked {
            if w.now > 2_000 {
                return Err(format!("the write was not acked\n{}", w.describe()));
            }
            w.step()?;
        }
        w.partition = None;
        w.pin = Some(missed);
        let dot = w.clients[0].writes[0].delta.dot;
        w.start_read(0, 0, true);
        w.step()?; // the read goes out
        if w.nodes[missed].docs.get(&doc).is_some_and(|d| d.version().contains(dot)) {
            return Err("the owner holds the write already: nothing is tested".into());
        }
        while w.clients[0].read.is_some() {
            if w.now > 4_000 {
                return Err(format!("the read was not answered\n{}", w.describe()));
            }
            w.step()?;
        }
        // The answer was checked against the acked write as it arrived (check b).
        if (w.stats.strict_reads, w.stats.strict_checks, w.stats.read_not_enough_replicas) != (1, 1, 0) {
            return Err(format!("not one strict read at once: {:?}", w.stats));
        }
        w.settle()
    })();
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
