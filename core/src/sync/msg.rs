//! Protocol messages and their envelope: one tag byte, then a postcard body (written by
//! hand, see [`crate::codec`]).
//!
//! Tags live in [`tag`]. A receiver that meets a tag it does not know answers with an
//! [`ErrorCode::UNKNOWN_TAG`] error and carries on (a newer peer may speak more). The
//! protocol version is agreed in [`Hello`]. Golden byte vectors in the tests pin every
//! message.
//!
//! Most messages concern one document. [`DocSetQueryMsg`] and [`DocSetAnswerMsg`] are
//! between relays of a cluster: they compare the sets of documents two relays hold (see
//! [`crate::docset`]), and a relay answers them only on an authenticated peer link.

use crate::codec::{put_varint, Reader, Wire, R};
use crate::docset::{DocSetAnswer, DocSetQuery};
use crate::document::{Delta, Field};
use crate::id::ReplicaId;
use crate::merkle::NodeId;
use crate::vv::{CausalContext, VersionVector};
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks (3: `Deltas` items may carry `NEXT_TIME`; 4:
/// sets in format 2, see [`crate::codec::FORMAT_VERSION`]; 5: a `Deltas` item with `RUN`
/// is one [`Delta::run`], and may be a whole field; 6: relays compare document sets with
/// [`DocSetQueryMsg`] and [`DocSetAnswerMsg`], which a version 5 peer answers with
/// [`ErrorCode::UNKNOWN_TAG`]).
pub const PROTOCOL_VERSION: u16 = 6;
/// The oldest protocol version this build still speaks: frames are encoded one way, so a
/// peer must read every flag this build writes.
pub const MIN_PROTOCOL_VERSION: u16 = 5;
/// Longest document id accepted.
pub const MAX_DOC_ID: usize = 512;
/// Whether this build reads and writes the relay-to-relay messages ([`DocSetQueryMsg`],
/// [`DocSetAnswerMsg`]). A browser replica never takes part in anti-entropy between
/// relays, so the WebAssembly build leaves their codecs out (a smaller bundle) and
/// rejects their tags as unknown.
pub const RELAY_MESSAGES: bool = !cfg!(target_arch = "wasm32");

/// Most things one [`DocSetQueryMsg`] may ask about.
pub const MAX_DOCSET_QUERY: usize = 1024;
/// Most [`DocSetAnswer::items`] (entries and listed documents) in one [`DocSetAnswerMsg`].
pub const MAX_DOCSET_ITEMS: usize = 1 << 16;
/// Most parts one document-set answer may be split into.
pub const MAX_DOCSET_PARTS: u32 = 1024;

/// Message tags (the first byte of every frame).
pub mod tag {
    /// [`super::Hello`]
    pub const HELLO: u8 = 0x01;
    /// [`super::Subscribe`]
    pub const SUBSCRIBE: u8 = 0x02;
    /// [`super::Deltas`]
    pub const DELTAS: u8 = 0x03;
    /// [`super::Synced`]
    pub const SYNCED: u8 = 0x04;
    /// [`super::Ack`]
    pub const ACK: u8 = 0x05;
    /// [`super::Unsubscribe`]
    pub const UNSUBSCRIBE: u8 = 0x06;
    /// [`super::MerkleStart`]
    pub const MERKLE_START: u8 = 0x10;
    /// [`super::MerkleQuery`]
    pub const MERKLE_QUERY: u8 = 0x11;
    /// [`super::MerkleNodes`]
    pub const MERKLE_NODES: u8 = 0x12;
    /// [`super::MerkleLeaves`]
    pub const MERKLE_LEAVES: u8 = 0x13;
    /// [`super::KeysQuery`]
    pub const KEYS_QUERY: u8 = 0x14;
    /// [`super::StateChunk`]
    pub const STATE: u8 = 0x15;
    /// [`super::DocSetQueryMsg`]
    pub const DOCSET_QUERY: u8 = 0x20;
    /// [`super::DocSetAnswerMsg`]
    pub const DOCSET_ANSWER: u8 = 0x21;
    /// [`super::ErrorMsg`]
    pub const ERROR: u8 = 0x7f;
}

/// Error codes carried by [`ErrorMsg`]; numbers so that unknown future codes still decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// The frame could not be decoded.
    pub const BAD_FRAME: ErrorCode = ErrorCode(1);
    /// The tag is unknown to this peer.
    pub const UNKNOWN_TAG: ErrorCode = ErrorCode(2);
    /// No common protocol version.
    pub const VERSION: ErrorCode = ErrorCode(3);
    /// Missing, malformed, forged or expired token.
    pub const UNAUTHORIZED: ErrorCode = ErrorCode(4);
    /// The token does not allow this (e.g. a write with a read-only token).
    pub const FORBIDDEN: ErrorCode = ErrorCode(5);
    /// A delta or state broke an invariant; nothing of it was applied.
    pub const INVALID: ErrorCode = ErrorCode(6);
    /// The receiver lost data and must take a new replica id.
    pub const AMNESIA: ErrorCode = ErrorCode(7);
    /// Too many messages; slow down.
    pub const RATE_LIMITED: ErrorCode = ErrorCode(8);
    /// A frame above the size limit.
    pub const TOO_LARGE: ErrorCode = ErrorCode(9);
    /// Fewer than W replicas persisted the write in time; keep it and retry.
    pub const NOT_ENOUGH_REPLICAS: ErrorCode = ErrorCode(10);
    /// Messages arrived before `Hello`.
    pub const NO_HELLO: ErrorCode = ErrorCode(11);
    /// The server failed; retry later.
    pub const INTERNAL: ErrorCode = ErrorCode(12);

    /// A short name for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "bad_frame",
            2 => "unknown_tag",
            3 => "version",
            4 => "unauthorized",
            5 => "forbidden",
            6 => "invalid",
            7 => "amnesia",
            8 => "rate_limited",
            9 => "too_large",
            10 => "not_enough_replicas",
            11 => "no_hello",
            12 => "internal",
            _ => "unknown",
        }
    }
}

/// First message both ways.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Highest protocol version the sender speaks.
    pub protocol: u16,
    /// Lowest protocol version the sender speaks.
    pub min_protocol: u16,
    /// The sender's replica id.
    pub replica: ReplicaId,
    /// Auth token, when the receiver requires one.
    pub token: Option<String>,
}

/// "Send me what I lack of `doc`, then every new delta."
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribe {
    /// Document id.
    pub doc: String,
    /// What the subscriber has.
    pub vv: VersionVector,
}

/// Deltas of one document, catch-up or live.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deltas {
    /// Document id.
    pub doc: String,
    /// The deltas, in an order that keeps each replica's sequence ascending.
    pub deltas: Vec<Delta>,
}

/// Ends a catch-up answer: "you now have everything I had at `vv`".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Synced {
    /// Document id.
    pub doc: String,
    /// The answering side's version when it answered.
    pub vv: VersionVector,
}

/// "Everything up to `vv` of `doc` is durable here."
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Document id.
    pub doc: String,
    /// Durable version.
    pub vv: VersionVector,
}

/// Stop live updates of a document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsubscribe {
    /// Document id.
    pub doc: String,
}

/// Starts a state transfer when the delta log cannot reach back far enough. Carries the
/// sender's version and context at this moment: everything sent in this exchange is at
/// least this new.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerkleStart {
    /// Document id.
    pub doc: String,
    /// Exchange id; later messages of other exchanges are ignored.
    pub exchange: u64,
    /// Sender's version vector.
    pub vv: VersionVector,
    /// Sender's causal context.
    pub ctx: CausalContext,
    /// Hashes of the root's children; empty when `full_chunks` > 0.
    pub children: Vec<u64>,
    /// For small documents: the number of [`StateChunk`]s with the whole state that follow
    /// instead of a Merkle descent.
    pub full_chunks: u32,
    /// Number of keys in the sender's document.
    pub keys: u64,
}

/// "Send me the children of these nodes (or the leaves of these buckets)."
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerkleQuery {
    /// Document id.
    pub doc: String,
    /// Exchange id.
    pub exchange: u64,
    /// Nodes whose hashes differed.
    pub nodes: Vec<NodeId>,
}

/// Children hashes of inner nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerkleNodes {
    /// Document id.
    pub doc: String,
    /// Exchange id.
    pub exchange: u64,
    /// Each queried node with the hashes of its children.
    pub nodes: Vec<(NodeId, Vec<u64>)>,
}

/// `(key hash, leaf hash)` lists of buckets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerkleLeaves {
    /// Document id.
    pub doc: String,
    /// Exchange id.
    pub exchange: u64,
    /// Each queried bucket with its leaves.
    pub buckets: Vec<(NodeId, Vec<(u64, u64)>)>,
}

/// "Send me the full state of these keys."
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysQuery {
    /// Document id.
    pub doc: String,
    /// Exchange id.
    pub exchange: u64,
    /// Key hashes.
    pub keys: Vec<u64>,
}

/// Full states of some keys, one chunk of a transfer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateChunk {
    /// Document id.
    pub doc: String,
    /// Exchange id.
    pub exchange: u64,
    /// Chunk number (for whole-state transfers) or 0.
    pub chunk: u32,
    /// Key hashes this chunk answers (Merkle transfers).
    pub answered: Vec<u64>,
    /// The fields, sets without their own context (the exchange's context applies).
    pub fields: Vec<(String, Field)>,
    /// Keys sent so far in this exchange, for progress.
    pub done: u64,
    /// Keys to send in this exchange, for progress.
    pub total: u64,
}

/// Relay to relay: "answer this question about your document set" (anti-entropy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocSetQueryMsg {
    /// Exchange id, echoed by every part of the answer.
    pub exchange: u64,
    /// What is asked; at most [`MAX_DOCSET_QUERY`] things, all node ids valid.
    pub query: DocSetQuery,
}

/// Relay to relay: part `part` of `parts` of the answer to a [`DocSetQueryMsg`]. An
/// answer too large for one frame is cut into parts, in order (see
/// [`DocSetAnswer::split`]); the asker joins them with [`DocSetAnswer::absorb`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocSetAnswerMsg {
    /// The query's exchange id.
    pub exchange: u64,
    /// This part's number, from 0.
    pub part: u32,
    /// Number of parts, 1 to [`MAX_DOCSET_PARTS`].
    pub parts: u32,
    /// This part of the answer; at most [`MAX_DOCSET_ITEMS`] items.
    pub answer: DocSetAnswer,
}

/// Bytes of a [`DocSetAnswerMsg`] frame besides its answer: tag, exchange, part, parts.
const DOCSET_ANSWER_HEAD: usize = 1 + 10 + 5 + 5;

impl DocSetAnswerMsg {
    /// The frames answering query `exchange` with `answer`, each at most `max_frame`
    /// bytes (unless one listed document alone is larger), or `None` when that would
    /// take more than [`MAX_DOCSET_PARTS`] frames.
    pub fn frames(exchange: u64, answer: DocSetAnswer, max_frame: usize) -> Option<Vec<Msg>> {
        let parts = answer.split(max_frame.saturating_sub(DOCSET_ANSWER_HEAD), MAX_DOCSET_ITEMS);
        let n = u32::try_from(parts.len()).ok().filter(|n| *n <= MAX_DOCSET_PARTS)?;
        let msg = |(part, answer)| Msg::DocSetAnswer(DocSetAnswerMsg { exchange, part, parts: n, answer });
        Some((0..n).zip(parts).map(msg).collect())
    }
}

/// A typed error; `doc` names the document when only that one is affected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// What went wrong.
    pub code: ErrorCode,
    /// The document concerned, if any.
    pub doc: Option<String>,
    /// What happened and what to do.
    pub message: String,
}

/// Every protocol message.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum Msg {
    Hello(Hello),
    Subscribe(Subscribe),
    Deltas(Deltas),
    Synced(Synced),
    Ack(Ack),
    Unsubscribe(Unsubscribe),
    MerkleStart(MerkleStart),
    MerkleQuery(MerkleQuery),
    MerkleNodes(MerkleNodes),
    MerkleLeaves(MerkleLeaves),
    KeysQuery(KeysQuery),
    State(StateChunk),
    DocSetQuery(DocSetQueryMsg),
    DocSetAnswer(DocSetAnswerMsg),
    Error(ErrorMsg),
}

/// Why a frame could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Zero bytes.
    #[error("empty frame")]
    Empty,
    /// A tag this build does not know (a newer peer?).
    #[error("unknown message tag 0x{0:02x}")]
    UnknownTag(u8),
    /// Truncated or malformed body.
    #[error("malformed message (tag 0x{tag:02x}): {reason}")]
    Malformed {
        /// The message tag.
        tag: u8,
        /// What postcard or validation said.
        reason: String,
    },
}

/// Implements [`Wire`] for a message struct: its fields in order.
macro_rules! wire_struct {
    ($t:ident { $($f:ident),* }) => {
        impl Wire for $t {
            fn put(&self, out: &mut Vec<u8>) {
                $(self.$f.put(out);)*
            }
            fn read(r: &mut Reader<'_>) -> R<Self> {
                Ok($t { $($f: Wire::read(r)?),* })
            }
        }
    };
}

impl Wire for ErrorCode {
    fn put(&self, out: &mut Vec<u8>) {
        put_varint(out, self.0.into());
    }
    fn read(r: &mut Reader<'_>) -> R<Self> {
        r.u16().map(ErrorCode)
    }
}

wire_struct!(Hello { protocol, min_protocol, replica, token });
wire_struct!(Subscribe { doc, vv });
wire_struct!(Synced { doc, vv });
wire_struct!(Ack { doc, vv });
wire_struct!(Unsubscribe { doc });
wire_struct!(MerkleStart { doc, exchange, vv, ctx, children, full_chunks, keys });
wire_struct!(MerkleQuery { doc, exchange, nodes });
wire_struct!(MerkleNodes { doc, exchange, nodes });
wire_struct!(MerkleLeaves { doc, exchange, buckets });
wire_struct!(KeysQuery { doc, exchange, keys });
wire_struct!(StateChunk { doc, exchange, chunk, answered, fields, done, total });
wire_struct!(DocSetQueryMsg { exchange, query });
wire_struct!(DocSetAnswerMsg { exchange, part, parts, answer });
wire_struct!(ErrorMsg { code, doc, message });

impl Msg {
    /// The message's tag byte.
    pub fn tag(&self) -> u8 {
        match self {
            Msg::Hello(_) => tag::HELLO,
            Msg::Subscribe(_) => tag::SUBSCRIBE,
            Msg::Deltas(_) => tag::DELTAS,
            Msg::Synced(_) => tag::SYNCED,
            Msg::Ack(_) => tag::ACK,
            Msg::Unsubscribe(_) => tag::UNSUBSCRIBE,
            Msg::MerkleStart(_) => tag::MERKLE_START,
            Msg::MerkleQuery(_) => tag::MERKLE_QUERY,
            Msg::MerkleNodes(_) => tag::MERKLE_NODES,
            Msg::MerkleLeaves(_) => tag::MERKLE_LEAVES,
            Msg::KeysQuery(_) => tag::KEYS_QUERY,
            Msg::State(_) => tag::STATE,
            Msg::DocSetQuery(_) => tag::DOCSET_QUERY,
            Msg::DocSetAnswer(_) => tag::DOCSET_ANSWER,
            Msg::Error(_) => tag::ERROR,
        }
    }

    /// The document a message concerns, if any.
    pub fn doc(&self) -> Option<&str> {
        Some(match self {
            Msg::Hello(_) | Msg::DocSetQuery(_) | Msg::DocSetAnswer(_) => return None,
            Msg::Error(e) => return e.doc.as_deref(),
            Msg::Subscribe(m) => &m.doc,
            Msg::Deltas(m) => &m.doc,
            Msg::Synced(m) => &m.doc,
            Msg::Ack(m) => &m.doc,
            Msg::Unsubscribe(m) => &m.doc,
            Msg::MerkleStart(m) => &m.doc,
            Msg::MerkleQuery(m) => &m.doc,
            Msg::MerkleNodes(m) => &m.doc,
            Msg::MerkleLeaves(m) => &m.doc,
            Msg::KeysQuery(m) => &m.doc,
            Msg::State(m) => &m.doc,
        })
    }

    /// One frame: tag byte + postcard body.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(64);
        buf.push(self.tag());
        let o = &mut buf;
        match self {
            Msg::Hello(m) => m.put(o),
            Msg::Subscribe(m) => m.put(o),
            Msg::Deltas(m) => super::batch::encode(m, o),
            Msg::Synced(m) => m.put(o),
            Msg::Ack(m) => m.put(o),
            Msg::Unsubscribe(m) => m.put(o),
            Msg::MerkleStart(m) => m.put(o),
            Msg::MerkleQuery(m) => m.put(o),
            Msg::MerkleNodes(m) => m.put(o),
            Msg::MerkleLeaves(m) => m.put(o),
            Msg::KeysQuery(m) => m.put(o),
            Msg::State(m) => m.put(o),
            Msg::DocSetQuery(m) if RELAY_MESSAGES => m.put(o),
            Msg::DocSetAnswer(m) if RELAY_MESSAGES => m.put(o),
            // A browser build never makes these (see RELAY_MESSAGES): nothing to encode.
            Msg::DocSetQuery(_) | Msg::DocSetAnswer(_) => {}
            Msg::Error(m) => m.put(o),
        }
        buf
    }

    /// Decodes one frame. Never panics; unknown tags are [`FrameError::UnknownTag`].
    /// Structural checks (version vectors sorted, node ids in range, doc id length) are
    /// done here; CRDT invariants are checked when the payload is applied.
    pub fn decode(bytes: &[u8]) -> Result<Msg, FrameError> {
        let (&t, rest) = bytes.split_first().ok_or(FrameError::Empty)?;
        let malformed = |reason: &str| FrameError::Malformed { tag: t, reason: reason.into() };
        let msg = if t == tag::DELTAS {
            Msg::Deltas(super::batch::decode(rest).map_err(malformed)?)
        } else {
            let mut r = Reader::new(rest);
            let msg = Msg::read_body(t, &mut r).map_err(malformed)?.ok_or(FrameError::UnknownTag(t))?;
            if !r.is_empty() {
                return Err(malformed("trailing bytes"));
            }
            msg
        };
        msg.check().map_err(malformed)?;
        Ok(msg)
    }

    /// The body of a message with tag `t` (not `Deltas`); `None` for an unknown tag.
    fn read_body(t: u8, r: &mut Reader<'_>) -> R<Option<Msg>> {
        Ok(Some(match t {
            tag::HELLO => Msg::Hello(Wire::read(r)?),
            tag::SUBSCRIBE => Msg::Subscribe(Wire::read(r)?),
            tag::SYNCED => Msg::Synced(Wire::read(r)?),
            tag::ACK => Msg::Ack(Wire::read(r)?),
            tag::UNSUBSCRIBE => Msg::Unsubscribe(Wire::read(r)?),
            tag::MERKLE_START => Msg::MerkleStart(Wire::read(r)?),
            tag::MERKLE_QUERY => Msg::MerkleQuery(Wire::read(r)?),
            tag::MERKLE_NODES => Msg::MerkleNodes(Wire::read(r)?),
            tag::MERKLE_LEAVES => Msg::MerkleLeaves(Wire::read(r)?),
            tag::KEYS_QUERY => Msg::KeysQuery(Wire::read(r)?),
            tag::STATE => Msg::State(Wire::read(r)?),
            tag::DOCSET_QUERY if RELAY_MESSAGES => Msg::DocSetQuery(Wire::read(r)?),
            tag::DOCSET_ANSWER if RELAY_MESSAGES => Msg::DocSetAnswer(Wire::read(r)?),
            tag::ERROR => Msg::Error(Wire::read(r)?),
            _ => return Ok(None),
        }))
    }

    fn check(&self) -> Result<(), &'static str> {
        if self.doc().is_some_and(|d| d.len() > MAX_DOC_ID) {
            return Err("document id too long");
        }
        match self {
            Msg::Subscribe(m) => m.vv.validate(),
            Msg::Synced(m) => m.vv.validate(),
            Msg::Ack(m) => m.vv.validate(),
            Msg::MerkleStart(m) => {
                m.vv.validate()?;
                m.ctx.validate()?;
                if !(m.children.is_empty() || m.children.len() == crate::merkle::FANOUT) {
                    return Err("root must have 16 children");
                }
                Ok(())
            }
            Msg::MerkleQuery(m) if m.nodes.iter().any(|n| !n.is_valid()) => Err("node id out of range"),
            Msg::MerkleNodes(m)
                if m.nodes
                    .iter()
                    .any(|(n, c)| !n.is_valid() || n.is_bucket() || c.len() != crate::merkle::FANOUT) =>
            {
                Err("bad Merkle node answer")
            }
            Msg::MerkleLeaves(m) if m.buckets.iter().any(|(n, _)| !n.is_bucket() || !n.is_valid()) => {
                Err("bad Merkle bucket answer")
            }
            Msg::DocSetQuery(m) if m.query.len() > MAX_DOCSET_QUERY => Err("document-set query too large"),
            Msg::DocSetQuery(m) if m.query.nodes().any(|n| !n.is_valid()) => Err("node id out of range"),
            Msg::DocSetAnswer(m) if RELAY_MESSAGES => check_docset_answer(m),
            _ => Ok(()),
        }
    }
}

fn check_docset_answer(m: &DocSetAnswerMsg) -> Result<(), &'static str> {
    let a = &m.answer;
    if m.parts == 0 || m.parts > MAX_DOCSET_PARTS || m.part >= m.parts {
        return Err("bad document-set answer part number");
    }
    if a.items() > MAX_DOCSET_ITEMS {
        return Err("document-set answer too large");
    }
    // Plain loops, not iterator chains: this is in the browser's decoder too.
    let mut ok = true;
    for (n, _) in &a.children {
        ok &= n.is_valid() && !n.is_bucket();
    }
    for (n, _) in &a.buckets {
        ok &= n.is_valid();
    }
    for (n, docs) in &a.lists {
        ok &= n.is_valid();
        for (id, _) in docs {
            ok &= id.len() <= MAX_DOC_ID;
        }
    }
    for (_, docs) in &a.names {
        for (id, _) in docs {
            ok &= id.len() <= MAX_DOC_ID;
        }
    }
    if !ok {
        return Err("bad document-set answer node or document id");
    }
    Ok(())
}
