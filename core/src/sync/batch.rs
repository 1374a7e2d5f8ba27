//! The compact body of a [`Deltas`] message (protocol 3).
//!
//! A batch of deltas is mostly keys, dots and small payloads, so the body is written by
//! hand instead of through serde, and nothing is said twice:
//!
//! ```text
//! body    = doc:str  replicas:n*varint  keys:n*key  items:n*item
//! key     = varint(shared << 4 | min(suffix_len, 15)) [varint(suffix_len - 15)] suffix
//! item    = head:u8 [replica_idx:varint seq_gap:varint] key_idx:varint [extra:varint] payload
//! head    = kind (bits 0-2) | NEXT_DOT (bit 3) | SHORT (bit 4) | RUN (bit 5) | NEXT_TIME (bit 6)
//! ```
//!
//! - **Replica table**: each replica id once; items name it by index.
//! - **Key table**: the distinct keys sorted and front-coded (each key stores only what
//!   differs from the previous one, as SSTable blocks do — O'Neil et al., "The
//!   Log-Structured Merge-Tree", and LevelDB's block format); items name a key by index,
//!   so a key written a hundred times in one batch costs its bytes once.
//! - **Dots**: `NEXT_DOT` means "the previous item's replica, next sequence number", the
//!   usual case for one replica's consecutive writes; otherwise the replica index and the
//!   gap from that replica's previous sequence number follow.
//! - **Payloads** relative to the dot: a counter increment is its new total; a register
//!   write is the gap (zig-zag) from the batch's previous write time plus the HLC counter
//!   (`SHORT`: counter 0, omitted; `NEXT_TIME`: neither, the time is the batch's previous
//!   write's with the counter one up — a replica's writes within one millisecond, since
//!   protocol 3) and the value; a set add/remove is the element and the
//!   dots it retires (`SHORT`: none). Anything else is the whole field.
//! - **Runs**: a [`Delta::run`] (a document's log joins a replica's consecutive writes to
//!   one counter or register: a user clicking "+1" a thousand times), and consecutive
//!   deltas of one replica to one counter or register, are one item with `RUN` and
//!   `extra` more dots before the last. Each write of a counter or register by its own
//!   replica supersedes the previous one (a counter delta is the replica's new total; a
//!   later write has a later clock), so the run travels with the last payload and is
//!   decoded as one [`Delta::run`]: the delta-interval of Almeida et al., "Delta State
//!   Replicated Data Types" (2018), §5, applied to one key. Sets are never joined this
//!   way (their deltas carry causal context).
//!
//! Values and whole fields inside use the codec's encoding, which bounds nesting depth.
//! Decoding never panics and never allocates more than a small multiple of the input: a
//! front-coded key may share at most [`MAX_SHARED`] bytes with its predecessor.

use super::msg::Deltas;
use crate::codec::{put_bytes, put_seq, put_varint, unzigzag, zigzag, Reader, Wire, R};
use crate::document::{Delta, Field};
use crate::hlc::Timestamp;
use crate::id::{Dot, ReplicaId};
use crate::lww::LwwRegister;
use crate::orset::{Dots, Entries, OrSet};
use crate::value::Value;
use crate::vv::CausalContext;
use crate::{Crdt, GCounter, PnCounter};

/// Longest prefix a key may share with the previous key of the table.
const MAX_SHARED: usize = 63;

const KIND_FULL: u8 = 0;
const KIND_COUNT: u8 = 1;
const KIND_PN_UP: u8 = 2;
const KIND_PN_DOWN: u8 = 3;
const KIND_WRITE: u8 = 4;
const KIND_ADD: u8 = 5;
const KIND_REMOVE: u8 = 6;
const KIND_MASK: u8 = 0b111;
/// The item's dot is the previous item's replica with the next sequence number.
const NEXT_DOT: u8 = 1 << 3;
/// Register write with HLC counter 0, or a set add/remove that retires no other dot.
const SHORT: u8 = 1 << 4;
/// The item stands for a run of dots (a count of extra dots follows the key index).
const RUN: u8 = 1 << 5;
/// Register write stamped with the batch's previous write's time, counter + 1 (no time
/// bytes follow).
const NEXT_TIME: u8 = 1 << 6;

/// A delta's payload, written relative to its dot (borrowed from the delta).
enum Payload<'a> {
    /// Any field, written out in full.
    Full(&'a Field),
    /// G-Counter delta of the dot's own replica: its new total.
    Count(u64),
    /// PN-Counter delta of the dot's own replica: new P total (N absent).
    PnUp(u64),
    /// PN-Counter delta of the dot's own replica: new N total (P absent).
    PnDown(u64),
    /// Register write stamped by the dot's own replica.
    Write { millis: u64, counter: u32, value: &'a Value },
    /// Set add with the dot's own dot, retiring `retired` (the element's old dots).
    Add { value: &'a Value, retired: Vec<Dot> },
    /// Set remove retiring `retired`.
    Remove { value: &'a Value, retired: Vec<Dot> },
}

/// A single-replica G-Counter holding `n` for `own`.
fn only(c: &GCounter, own: ReplicaId) -> Option<u64> {
    let n = c.get(own);
    (n > 0 && c.value() == n).then_some(n)
}

impl Payload<'_> {
    /// The kind written in the item's head byte.
    fn kind(&self) -> u8 {
        match self {
            Payload::Full(_) => KIND_FULL,
            Payload::Count(_) => KIND_COUNT,
            Payload::PnUp(_) => KIND_PN_UP,
            Payload::PnDown(_) => KIND_PN_DOWN,
            Payload::Write { .. } => KIND_WRITE,
            Payload::Add { .. } => KIND_ADD,
            Payload::Remove { .. } => KIND_REMOVE,
        }
    }

    /// Whether the item omits its HLC counter (0) or its retired dots (none).
    fn short(&self) -> bool {
        match self {
            Payload::Write { counter, .. } => *counter == 0,
            Payload::Add { retired, .. } | Payload::Remove { retired, .. } => retired.is_empty(),
            _ => false,
        }
    }

    /// At least the bytes [`encode`] writes for this payload (the register write's time
    /// gap counted at its largest).
    fn size_bound(&self) -> usize {
        match self {
            Payload::Full(f) => {
                let mut scratch = Vec::new();
                f.put(&mut scratch);
                scratch.len()
            }
            Payload::Count(n) | Payload::PnUp(n) | Payload::PnDown(n) => varint_len(*n),
            Payload::Write { counter, value, .. } => 10 + varint_len((*counter).into()) + value_len(value),
            Payload::Add { value, retired } | Payload::Remove { value, retired } => {
                let dots: usize = retired.iter().map(|d| varint_len(d.replica.0) + varint_len(d.seq)).sum();
                value_len(value) + varint_len(retired.len() as u64) + dots
            }
        }
    }
}

/// The length of `v` as a LEB128 varint.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// The length of `v`'s encoding (`Value::put`).
fn value_len(v: &Value) -> usize {
    1 + match v {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Int(i) => varint_len(zigzag(*i)),
        Value::Float(_) => 8,
        Value::Str(s) => varint_len(s.len() as u64) + s.len(),
        Value::Array(a) => varint_len(a.len() as u64) + a.iter().map(value_len).sum::<usize>(),
        Value::Object(o) => {
            varint_len(o.len() as u64)
                + o.iter().map(|(k, v)| varint_len(k.len() as u64) + k.len() + value_len(v)).sum::<usize>()
        }
    }
}

/// Whether a later write of this kind by the same replica to the same key supersedes an
/// earlier one (so a run of them can travel as one item).
fn supersedes(kind: u8) -> bool {
    matches!(kind, KIND_COUNT | KIND_PN_UP | KIND_PN_DOWN | KIND_WRITE)
}

/// Whether delta `b` (payload `pb`, key index `kb`) continues a run that `a` is in: same
/// replica, next dot, same key, and the same superseding kind.
fn continues((a, pa, ka): (&Delta, &Payload, usize), (b, pb, kb): (&Delta, &Payload, usize)) -> bool {
    b.dot.replica == a.dot.replica
        && Some(b.first()) == a.dot.seq.checked_add(1)
        && ka == kb
        && supersedes(pb.kind())
        && pa.kind() == pb.kind()
}

fn compact(d: &Delta) -> Payload<'_> {
    let own = d.dot.replica;
    let full = || Payload::Full(&d.payload);
    match &d.payload {
        Field::Counter(c) => only(c, own).map_or_else(full, Payload::Count),
        Field::PnCounter(c) => {
            let (p, n) = c.parts();
            match (only(p, own), only(n, own)) {
                (Some(up), None) if n.value() == 0 => Payload::PnUp(up),
                (None, Some(down)) if p.value() == 0 => Payload::PnDown(down),
                _ => full(),
            }
        }
        Field::Register(r) => match (r.timestamp(), r.get()) {
            (Some(ts), Some(value)) if ts.replica == own => {
                Payload::Write { millis: ts.millis, counter: ts.counter, value }
            }
            _ => full(),
        },
        Field::Set(s) if s.entries().len() == 1 && s.context().vv.total() <= 64 => {
            let Some((value, dots)) = s.entries().iter().next() else { return full() };
            let ctx = s.context();
            let retired: Vec<Dot> = ctx
                .vv
                .iter()
                .flat_map(|(r, n)| (1..=n).map(move |q| Dot::new(r, q)))
                .chain(ctx.cloud.iter().copied())
                .filter(|x| *x != d.dot)
                .collect();
            match dots {
                Dots::One(x) if *x == d.dot && ctx.contains(d.dot) => Payload::Add { value, retired },
                Dots::Many(v) if v.is_empty() && !ctx.contains(d.dot) => Payload::Remove { value, retired },
                _ => full(),
            }
        }
        _ => full(),
    }
}

/// A set delta with one element.
fn set_delta(dot: Dot, value: Value, dots: Dots, retired: Vec<Dot>, with_own: bool) -> Field {
    let mut ctx = CausalContext::default();
    for d in retired {
        ctx.insert(d);
    }
    if with_own {
        ctx.insert(dot);
    }
    let mut e = Entries::default();
    e.insert(value, dots);
    Field::Set(OrSet::from_parts(e, ctx))
}

// ---- writing ----

/// At least the number of bytes [`encode`] writes for `Deltas { doc, deltas }`, found
/// without writing them: a session checks batches against its frame limit with this,
/// and encodes to measure only when the bound is over the limit. Every delta is counted
/// as an item of its own (runs only save bytes) and every table index at its widest.
pub(super) fn size_bound(doc: &str, deltas: &[Delta]) -> usize {
    let idx = varint_len(deltas.len() as u64);
    let per_delta: usize = deltas
        .iter()
        .map(|d| {
            let k = d.key.len();
            // Key table entry (header, long-suffix length, suffix) + replica table entry
            // + head byte, replica index, sequence gap, key index, run length.
            let tables = 2 + varint_len(k as u64) + k + 10;
            tables + 1 + idx + 10 + idx + idx + compact(d).size_bound()
        })
        .sum();
    varint_len(doc.len() as u64) + doc.len() + 3 * 10 + per_delta
}

/// `(prefix, index)` of every delta, ordered by key (stably): a least-significant-digit
/// radix sort on the keys' first eight bytes read as a big-endian number (which orders
/// like the bytes), one pass per byte position where the keys differ, then runs of equal
/// prefixes by the whole key. Most batches' keys differ in their first bytes, so no
/// string is compared.
fn by_key(ds: &[Delta]) -> Vec<(u64, u32)> {
    let prefix = |k: &str| {
        let mut b = [0u8; 8];
        let n = k.len().min(8);
        b[..n].copy_from_slice(&k.as_bytes()[..n]);
        u64::from_be_bytes(b)
    };
    let mut items: Vec<(u64, u32)> = ds.iter().enumerate().map(|(i, d)| (prefix(&d.key), i as u32)).collect();
    let n = items.len();
    let mut spare = items.clone();
    for shift in (0..64).step_by(8) {
        let digit = |p: u64| (p >> shift) as usize & 0xff;
        let mut at = [0usize; 256];
        for &(p, _) in &items {
            at[digit(p)] += 1;
        }
        if at.contains(&n) {
            continue; // every key has the same byte here
        }
        let mut sum = 0;
        for slot in at.iter_mut() {
            let c = *slot;
            *slot = sum;
            sum += c;
        }
        for &it in &items {
            let d = digit(it.0);
            spare[at[d]] = it;
            at[d] += 1;
        }
        std::mem::swap(&mut items, &mut spare);
    }
    let mut i = 0;
    while i < n {
        let j = i + items[i..].iter().take_while(|it| it.0 == items[i].0).count();
        // Equal prefixes: compare whole keys, unless they are all one key (a run of writes
        // to one counter), which the stable radix passes already left in order.
        let first = &ds[items[i].1 as usize].key;
        if j - i > 1 && items[i + 1..j].iter().any(|it| ds[it.1 as usize].key != *first) {
            crate::sort::sort_by(&mut items[i..j], |a, b| ds[a.1 as usize].key.cmp(&ds[b.1 as usize].key));
        }
        i = j;
    }
    items
}

/// Appends the body of `m` (everything after the tag byte) to `out`.
pub(super) fn encode(m: &Deltas, out: &mut Vec<u8>) {
    let ds = &m.deltas;
    put_bytes(out, m.doc.as_bytes());

    let mut replicas: Vec<ReplicaId> = Vec::new();
    for d in ds {
        if !replicas.contains(&d.dot.replica) {
            replicas.push(d.dot.replica);
        }
    }
    put_varint(out, replicas.len() as u64);
    for r in &replicas {
        put_varint(out, r.0);
    }

    // The key table: the deltas' keys sorted and deduplicated, and each delta's index
    // into it.
    let mut key_of = vec![0usize; ds.len()];
    let mut table: Vec<&str> = Vec::with_capacity(ds.len());
    for (_, i) in by_key(ds) {
        let k = ds[i as usize].key.as_str();
        if table.last() != Some(&k) {
            table.push(k);
        }
        key_of[i as usize] = table.len() - 1;
    }
    put_varint(out, table.len() as u64);
    let mut prev: &[u8] = &[];
    for k in &table {
        let k = k.as_bytes();
        let shared = prev.iter().zip(k).take_while(|(a, b)| a == b).count().min(MAX_SHARED);
        let suffix = &k[shared..];
        put_varint(out, (shared as u64) << 4 | suffix.len().min(15) as u64);
        if suffix.len() >= 15 {
            put_varint(out, (suffix.len() - 15) as u64);
        }
        out.extend_from_slice(suffix);
        prev = k;
    }

    // Items: runs of superseding deltas become one item.
    let mut payloads: Vec<Payload> = ds.iter().map(compact).collect();
    let mut items: Vec<(usize, usize)> = Vec::with_capacity(ds.len());
    let mut i = 0;
    while i < ds.len() {
        let mut j = i + 1;
        while j < ds.len()
            && continues((&ds[j - 1], &payloads[j - 1], key_of[j - 1]), (&ds[j], &payloads[j], key_of[j]))
        {
            j += 1;
        }
        items.push((i, j - i));
        i = j;
    }

    put_varint(out, items.len() as u64);
    let mut last_seq = vec![0u64; replicas.len()];
    let mut cur = 0usize;
    // The time of the batch's previous register write is (`millis`, `counter`).
    let mut millis = 0u64;
    let mut counter: Option<u32> = None;
    for (first, len) in items {
        let d = &ds[first + len - 1];
        let r = replicas.iter().position(|x| *x == d.dot.replica).unwrap_or(0);
        let start = ds[first].first();
        let gap = start.wrapping_sub(last_seq[r]);
        last_seq[r] = d.dot.seq;
        let next = r == cur && gap == 1;
        cur = r;
        // The run's last payload stands for all of it.
        let payload = std::mem::replace(&mut payloads[first + len - 1], Payload::Count(0));
        let (kind, short) = (payload.kind(), payload.short());
        let next_time = matches!(payload, Payload::Write { millis: ms, counter: c, .. }
            if ms == millis && c > 0 && counter == Some(c - 1));
        let flags = if next { NEXT_DOT } else { 0 }
            | if short { SHORT } else { 0 }
            | if d.dot.seq > start { RUN } else { 0 }
            | if next_time { NEXT_TIME } else { 0 };
        out.push(kind | flags);
        if !next {
            put_varint(out, r as u64);
            put_varint(out, gap);
        }
        put_varint(out, key_of[first + len - 1] as u64);
        if d.dot.seq > start {
            put_varint(out, d.dot.seq - start);
        }
        match payload {
            Payload::Full(f) => f.put(out),
            Payload::Count(n) | Payload::PnUp(n) | Payload::PnDown(n) => put_varint(out, n),
            Payload::Write { millis: ms, counter: c, value } => {
                if !next_time {
                    put_varint(out, zigzag(ms.wrapping_sub(millis) as i64));
                    millis = ms;
                    if c != 0 {
                        put_varint(out, c.into());
                    }
                }
                counter = Some(c);
                value.put(out);
            }
            Payload::Add { value, retired } | Payload::Remove { value, retired } => {
                value.put(out);
                if !retired.is_empty() {
                    put_seq(out, &retired, Dot::put);
                }
            }
        }
    }
}

// ---- reading ----

/// Decodes a body written by [`encode`].
pub(super) fn decode(body: &[u8]) -> R<Deltas> {
    let mut r = Reader::new(body);
    let len = r.varint()?;
    let doc = std::str::from_utf8(r.take(len)?).map_err(|_| "document id is not UTF-8")?.to_owned();

    let n = r.count()?;
    let mut replicas = Vec::with_capacity(n);
    for _ in 0..n {
        replicas.push(ReplicaId(r.varint()?));
    }

    let n = r.count()?;
    let mut keys: Vec<String> = Vec::with_capacity(n);
    let mut prev: Vec<u8> = Vec::new();
    for _ in 0..n {
        let h = r.varint()?;
        let shared = usize::try_from(h >> 4).map_err(|_| "key prefix too long")?;
        if shared > MAX_SHARED || shared > prev.len() {
            return Err("key prefix out of range");
        }
        let mut len = h & 15;
        if len == 15 {
            len = len.checked_add(r.varint()?).ok_or("key too long")?;
        }
        prev.truncate(shared);
        prev.extend_from_slice(r.take(len)?);
        keys.push(std::str::from_utf8(&prev).map_err(|_| "key is not UTF-8")?.to_owned());
    }

    let n = r.count()?;
    // Keys are filled in at the end (`key_of` holds each delta's key index), moved into
    // the last delta that uses them (most keys occur once in a batch), cloned for others.
    let mut parts: Vec<(u64, Dot, Field)> = Vec::with_capacity(n);
    let mut key_of: Vec<usize> = Vec::with_capacity(n);
    let mut last_seq = vec![0u64; replicas.len()];
    let mut cur = 0usize;
    // The time of the batch's previous register write is (`millis`, `counter`).
    let mut millis = 0u64;
    let mut counter: Option<u32> = None;
    for _ in 0..n {
        let head = r.byte()?;
        if head & !(KIND_MASK | NEXT_DOT | SHORT | RUN | NEXT_TIME) != 0 {
            return Err("unknown delta flags");
        }
        let short = head & SHORT != 0;
        let next_time = head & NEXT_TIME != 0;
        if next_time && (short || head & KIND_MASK != KIND_WRITE) {
            return Err("NEXT_TIME on an item that is not a register write with a counter");
        }
        let (idx, gap) = if head & NEXT_DOT != 0 { (cur, 1) } else { (r.varint()? as usize, r.varint()?) };
        let seq = last_seq.get(idx).ok_or("replica index out of range")?.wrapping_add(gap);
        let key =
            usize::try_from(r.varint()?).ok().filter(|&k| k < keys.len()).ok_or("key index out of range")?;
        let extra = if head & RUN != 0 { r.varint()? } else { 0 };
        let last = seq.checked_add(extra).ok_or("run passes the last sequence number")?;
        last_seq[idx] = last;
        cur = idx;
        let kind = head & KIND_MASK;
        if extra > 0 && !(supersedes(kind) || kind == KIND_FULL) {
            return Err("only counter and register writes form runs");
        }
        // A run carries its last (joined) payload (see the module docs).
        let own = replicas[idx];
        let dot = Dot::new(own, last);
        let field = match kind {
            KIND_FULL if !short => Wire::read(&mut r)?,
            KIND_COUNT if !short => Field::Counter(GCounter::default().increment(own, r.varint()?)),
            KIND_PN_UP if !short => Field::PnCounter(PnCounter::default().increment(own, r.varint()?)),
            KIND_PN_DOWN if !short => Field::PnCounter(PnCounter::default().decrement(own, r.varint()?)),
            KIND_WRITE => {
                let c = if next_time {
                    let c = counter.ok_or("NEXT_TIME without an earlier write")?;
                    c.checked_add(1).ok_or("HLC counter too large")?
                } else {
                    millis = millis.wrapping_add(unzigzag(r.varint()?) as u64);
                    if short {
                        0
                    } else {
                        u32::try_from(r.varint()?).map_err(|_| "HLC counter too large")?
                    }
                };
                counter = Some(c);
                let ts = Timestamp { millis, counter: c, replica: own };
                Field::Register(LwwRegister::default().set(ts, Wire::read(&mut r)?))
            }
            k @ (KIND_ADD | KIND_REMOVE) => {
                let value = Wire::read(&mut r)?;
                let retired = if short { Vec::new() } else { r.seq(Dot::read)? };
                if k == KIND_ADD {
                    set_delta(dot, value, Dots::One(dot), retired, true)
                } else {
                    set_delta(dot, value, Dots::Many(Vec::new()), retired, false)
                }
            }
            _ => return Err("unknown delta kind"),
        };
        if extra > 0 && matches!(field, Field::Set(_)) {
            return Err("only counter and register writes form runs");
        }
        parts.push((seq, dot, field));
        key_of.push(key);
    }
    if !r.is_empty() {
        return Err("trailing bytes");
    }
    let mut last_use = vec![usize::MAX; keys.len()];
    for (i, &k) in key_of.iter().enumerate() {
        last_use[k] = i;
    }
    let mut deltas = Vec::with_capacity(parts.len());
    for (i, ((first, dot, payload), &k)) in parts.into_iter().zip(&key_of).enumerate() {
        let key = if last_use[k] == i { std::mem::take(&mut keys[k]) } else { keys[k].clone() };
        deltas.push(Delta::run(first, dot, key, payload));
    }
    Ok(Deltas { doc, deltas })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_front_coded_and_stored_once() {
        let mut doc = crate::Document::new(ReplicaId(9));
        let mut deltas = Vec::new();
        for i in 0..20 {
            deltas.push(doc.increment(&format!("counter/{:03}", i % 4), 1).unwrap());
        }
        let m = Deltas { doc: "d".into(), deltas };
        let mut out = Vec::new();
        encode(&m, &mut out);
        // doc "d" (2) + replica table (2) + key table: count (1), "counter/000" in full
        // (1 + 11), three keys sharing 10 bytes (2-byte header + 1 byte each)
        // + item count (1) + 20 items, each the next dot of replica 0 (the first is seq 1):
        // head, key index, total = 3 bytes.
        let expected = 2 + 2 + (1 + 12 + 3 * 3) + 1 + 20 * 3;
        assert_eq!(out.len(), expected);
        assert_eq!(decode(&out), Ok(m));
    }

    #[test]
    fn writes_within_one_millisecond_carry_no_time_bytes() {
        let mut doc = crate::Document::new(ReplicaId(9));
        let mut deltas = Vec::new();
        for i in 0..20 {
            // One wall-clock reading for all: the HLC counter goes 0, 1, ..., 19.
            deltas.push(doc.set_register(&format!("k{i:02}"), Value::Int(i), 1_700_000_000_000).unwrap());
        }
        // Then the clock moves on: a new time, counter 0.
        deltas.push(doc.set_register("k20", Value::Int(20), 1_700_000_000_007).unwrap());
        let m = Deltas { doc: "d".into(), deltas };
        let mut out = Vec::new();
        encode(&m, &mut out);
        assert_eq!(decode(&out), Ok(m.clone()));
        // Key table: count, "k00" in full (header + 3), "k01".."k09" and "k11".."k19"
        // sharing two bytes (header + 1), "k10" and "k20" sharing one (header + 2).
        let keys = 1 + 4 + 2 * 9 + 3 + 2 * 9 + 3;
        // Items (each the next dot of replica 0): head, key index, then the time, then the
        // value (Int: tag + 1 byte). The first writes its time (6 bytes; counter 0: SHORT);
        // the next 19 say NEXT_TIME and write no time (without it: a zero gap and the
        // counter, 2 bytes more each); the last writes a gap of 7 (1 byte), counter 0.
        let items = (2 + 6 + 2) + 19 * (2 + 2) + (2 + 1 + 2);
        assert_eq!(out.len(), 2 + 2 + keys + 1 + items);

        // NEXT_TIME needs an earlier write, and a counter (not SHORT).
        let first_item = 2 + 2 + keys + 1;
        let mut bad = out.clone();
        bad[first_item] |= NEXT_TIME;
        assert!(decode(&bad).is_err());
        let mut short = out.clone();
        let second = first_item + 10;
        assert_eq!(short[second] & NEXT_TIME, NEXT_TIME, "the second item says NEXT_TIME");
        short[second] |= SHORT;
        assert!(decode(&short).is_err());
    }

    /// Values of every shape, nested.
    fn values() -> Vec<Value> {
        let long = "x".repeat(300);
        let mut obj = crate::value::Map::new();
        obj.insert("k".to_string(), Value::Array(vec![Value::Int(-70), Value::Null]));
        obj.insert(long.clone(), Value::Float(0.5));
        vec![
            Value::Null,
            Value::Bool(true),
            Value::Int(0),
            Value::Int(i64::MIN),
            Value::Int(1 << 40),
            Value::Float(-1.25),
            Value::from(""),
            Value::from(long),
            Value::Array(vec![Value::from("a"), Value::Array(vec![Value::Int(5)])]),
            Value::Object(obj),
        ]
    }

    #[test]
    fn value_len_is_the_length_of_the_encoding() {
        for v in values() {
            let mut out = Vec::new();
            v.put(&mut out);
            assert_eq!(value_len(&v), out.len(), "{v:?}");
        }
        for x in [0, 1, 127, 128, 16_383, 16_384, u64::MAX >> 1, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, x);
            assert_eq!(varint_len(x), out.len(), "{x}");
        }
    }

    #[test]
    fn size_bound_is_never_below_the_encoding() {
        let (a, b) = (ReplicaId(3), ReplicaId(u64::MAX));
        let mut da = crate::Document::new(a);
        let mut db = crate::Document::new(b);
        let mut all = Vec::new();
        let mut wall = 1u64 << 50;
        for (i, v) in values().into_iter().enumerate() {
            let key = format!("{}/{i}", "k".repeat(i * 7));
            wall += 1 << (i * 3);
            all.push(da.increment(&key, 1 << (i * 5)).unwrap());
            all.push(db.pn_add(&format!("pn{i}"), -(1 << (i * 4))).unwrap());
            all.push(db.pn_add(&format!("pn{i}"), 3).unwrap());
            all.push(da.set_register(&format!("r{i}"), v.clone(), wall).unwrap());
            all.push(da.set_register(&format!("r{i}"), v.clone(), wall).unwrap()); // HLC counter > 0
            all.push(db.set_add("s", v.clone()).unwrap());
            all.push(db.set_add("s", v.clone()).unwrap()); // retires the first add
            all.push(db.set_remove("s", &v).unwrap().unwrap());
        }
        // Deltas of one counter from two replicas: a full payload.
        let mut merged = crate::Document::new(ReplicaId(7));
        for d in all.iter().filter(|d| d.key.starts_with("pn0")) {
            merged.apply(d.clone()).unwrap();
        }
        all.push(merged.pn_add("pn0", 1).unwrap());
        for n in [0, 1, 2, 5, all.len()] {
            for start in [0, all.len() / 3] {
                let ds: Vec<Delta> = all.iter().skip(start).take(n).cloned().collect();
                let m = Deltas { doc: "some/doc".into(), deltas: ds };
                let mut out = Vec::new();
                encode(&m, &mut out);
                assert!(size_bound(&m.doc, &m.deltas) >= out.len(), "{n} deltas from {start}");
                // Runs arrive as one delta with the last payload: compare the dots they
                // stand for, with their keys, and what applying them makes.
                let back = decode(&out).unwrap();
                let names = |ds: &[Delta]| {
                    ds.iter()
                        .flat_map(|d| {
                            (d.first()..=d.dot.seq).map(move |q| (Dot::new(d.dot.replica, q), d.key.clone()))
                        })
                        .collect::<Vec<_>>()
                };
                assert_eq!(names(&back.deltas), names(&m.deltas));
                let applied = |ds: Vec<Delta>| {
                    let mut doc = crate::Document::new(ReplicaId(99));
                    for d in ds {
                        doc.apply(d).unwrap();
                    }
                    doc.to_value()
                };
                assert_eq!(applied(back.deltas), applied(m.deltas.clone()));
            }
        }
    }

    #[test]
    fn keys_are_ordered_like_strings() {
        let names =
            ["b", "", "a", "counter/010", "counter/002", "ab\0", "ab", "é", "counter/010", "zz", "a\u{1}"];
        let ds: Vec<Delta> = names
            .iter()
            .enumerate()
            .map(|(i, k)| {
                Delta::new(
                    Dot::new(ReplicaId(1), i as u64 + 1),
                    k.to_string(),
                    Field::Counter(GCounter::default()),
                )
            })
            .collect();
        let got: Vec<&str> = by_key(&ds).iter().map(|&(_, i)| ds[i as usize].key.as_str()).collect();
        let mut want = names.to_vec();
        want.sort();
        assert_eq!(got, want);
        // Stable: equal keys keep their order.
        let tens: Vec<u32> =
            by_key(&ds).iter().map(|x| x.1).filter(|&i| names[i as usize] == "counter/010").collect();
        assert_eq!(tens, [3, 8]);
        // Random keys over a small alphabet, short and long, sharing prefixes.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let ds: Vec<Delta> = (0..500u64)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let key: String = (0..x % 13)
                    .map(|j| [b'a', b'b', b'\0', 0xc3][((x >> (4 * j)) % 4) as usize] as char)
                    .collect();
                Delta::new(Dot::new(ReplicaId(1), i + 1), key, Field::Counter(GCounter::default()))
            })
            .collect();
        let got: Vec<u32> = by_key(&ds).iter().map(|x| x.1).collect();
        let mut want: Vec<u32> = (0..500).collect();
        want.sort_by(|a, b| ds[*a as usize].key.cmp(&ds[*b as usize].key));
        assert_eq!(got, want);
    }

    #[test]
    fn a_key_sharing_too_long_a_prefix_is_rejected() {
        // doc "", no replicas, 2 keys: 64 x 'a', then one sharing 64 bytes.
        let mut body = vec![0, 0, 2];
        put_varint(&mut body, 15);
        put_varint(&mut body, 64 - 15);
        body.extend([b'a'; 64]);
        put_varint(&mut body, 64 << 4 | 1);
        body.push(b'b');
        body.push(0);
        assert_eq!(decode(&body), Err("key prefix out of range"));
    }
}
