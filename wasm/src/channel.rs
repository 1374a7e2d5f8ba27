//! Tab-to-tab messages (the caller posts them on a `BroadcastChannel`).
//!
//! Every message is one frame; two of the three kinds are the sync protocol's own
//! messages, so they share its encoding and golden tests:
//!
//! - `Msg::Deltas` — live deltas a tab made (or the answer to a `Subscribe`): apply them.
//! - `Msg::Subscribe { doc, vv }` — "I just opened `doc` and have `vv`": every tab with
//!   `doc` open answers with the deltas `vv` lacks (from its delta log), or with its whole
//!   document when the log does not reach back; if the asker has something the answerer
//!   lacks, the answerer subscribes back. Deltas are idempotent, so several answers are
//!   harmless.
//! - [`STATE`] — a private frame (tag outside the protocol's range): a document's state,
//!   `[STATE, doc id length (u16 LE), doc id, Document::encode_without_log()]` (the
//!   answering tab's log stays with it: the asker only merges the state).
//!
//! There is no per-tab session: a channel is shared by every tab of the origin, delivery
//! between live tabs is reliable and ordered, and tabs come and go without a goodbye.

/// Tag of a whole-document frame.
pub const STATE: u8 = 0xc1;

/// `[STATE, len, doc, snapshot]`.
pub fn encode_state(doc: &str, snapshot: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + doc.len() + snapshot.len());
    out.push(STATE);
    out.extend_from_slice(&(doc.len() as u16).to_le_bytes());
    out.extend_from_slice(doc.as_bytes());
    out.extend_from_slice(snapshot);
    out
}

/// The doc id and snapshot of a [`STATE`] frame.
pub fn decode_state(frame: &[u8]) -> Option<(&str, &[u8])> {
    let [STATE, a, b, rest @ ..] = frame else { return None };
    let n = u16::from_le_bytes([*a, *b]) as usize;
    let doc = std::str::from_utf8(rest.get(..n)?).ok()?;
    Some((doc, &rest[n..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_frames_round_trip_and_reject_truncation() {
        let f = encode_state("board-1", &[1, 2, 3]);
        assert_eq!(decode_state(&f), Some(("board-1", &[1u8, 2, 3][..])));
        assert_eq!(decode_state(&f[..5]), None);
        assert_eq!(decode_state(&[0x03, 0, 0]), None);
    }
}
