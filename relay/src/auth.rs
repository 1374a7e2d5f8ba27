//! HMAC-SHA256 signed access tokens.
//!
//! A token grants read or read-write access to one document id, or to every id with a
//! given prefix (a pattern ending in `*`), until an expiry (unix seconds). Format:
//!
//! ```text
//! base64url(claims) "." base64url(HMAC-SHA256(secret, claims))
//! claims = "c1:" ("r" | "rw") ":" expires_at ":" pattern
//! ```
//!
//! The pattern comes last so it may contain `:`. The MAC is checked in constant time
//! (`hmac`'s `verify_slice`) before the claims are parsed. Time is passed in: this module
//! reads no clock.
//!
//! ```
//! use concord_relay::auth::{authorize, sign, Access, Claims};
//! let claims = Claims::new("board-*", Access::ReadWrite, 2_000_000_000).unwrap();
//! let token = sign(b"secret", &claims);
//! assert!(authorize(b"secret", &token, "board-1", Access::ReadWrite, 1_700_000_000).is_ok());
//! assert!(authorize(b"secret", &token, "notes-1", Access::Read, 1_700_000_000).is_err());
//! ```

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Longest accepted token, so verifying untrusted input stays cheap.
pub const MAX_TOKEN_LEN: usize = 4096;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Subscribe and read.
    Read,
    /// Read and write.
    ReadWrite,
}

impl Access {
    fn code(self) -> &'static str {
        match self {
            Access::Read => "r",
            Access::ReadWrite => "rw",
        }
    }
}

/// Authorization errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not a token of this format.
    #[error("malformed token: {0}; get a token from `concord-relay token`")]
    Malformed(&'static str),
    /// The signature does not match: forged, altered, or signed with another secret.
    #[error("token signature is invalid; was it issued for this relay?")]
    BadSignature,
    /// The token expired.
    #[error("token expired at {at} (unix seconds); ask the server for a new one")]
    Expired {
        /// The expiry it carried.
        at: u64,
    },
    /// The token is valid but does not grant this access.
    #[error("token grants {granted:?} on {pattern:?}; it does not allow {wanted:?} on {doc:?}")]
    Forbidden {
        /// The token's pattern.
        pattern: String,
        /// What it grants.
        granted: Access,
        /// The document asked for.
        doc: String,
        /// The access asked for.
        wanted: Access,
    },
}

/// The signed content of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// A document id, or a prefix followed by `*`.
    pub pattern: String,
    /// What is granted.
    pub access: Access,
    /// Unix seconds; the token is valid while `now < expires_at`.
    pub expires_at: u64,
}

impl Claims {
    /// Claims for `pattern` (a doc id, or `prefix*`). `*` may only appear at the end.
    pub fn new(pattern: impl Into<String>, access: Access, expires_at: u64) -> Result<Claims, AuthError> {
        let pattern = pattern.into();
        if pattern.is_empty() {
            return Err(AuthError::Malformed("empty document pattern"));
        }
        if pattern.trim_end_matches('*').contains('*') || pattern.ends_with("**") {
            return Err(AuthError::Malformed("`*` is only allowed once, at the end"));
        }
        Ok(Claims { pattern, access, expires_at })
    }

    /// Whether the pattern covers `doc`.
    pub fn covers(&self, doc: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => doc.starts_with(prefix),
            None => doc == self.pattern,
        }
    }

    /// `Ok` when these claims allow `wanted` on `doc` (expiry is checked by [`verify`]).
    pub fn check(&self, doc: &str, wanted: Access) -> Result<(), AuthError> {
        if self.covers(doc) && self.access >= wanted {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                pattern: self.pattern.clone(),
                granted: self.access,
                doc: doc.to_string(),
                wanted,
            })
        }
    }

    fn encode(&self) -> Vec<u8> {
        format!("c1:{}:{}:{}", self.access.code(), self.expires_at, self.pattern).into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<Claims, AuthError> {
        let text = std::str::from_utf8(bytes).map_err(|_| AuthError::Malformed("claims are not UTF-8"))?;
        let mut parts = text.splitn(4, ':');
        if parts.next() != Some("c1") {
            return Err(AuthError::Malformed("unknown claims version"));
        }
        let access = match parts.next() {
            Some("r") => Access::Read,
            Some("rw") => Access::ReadWrite,
            _ => return Err(AuthError::Malformed("unknown access")),
        };
        let expires_at =
            parts.next().and_then(|s| s.parse().ok()).ok_or(AuthError::Malformed("bad expiry"))?;
        let pattern = parts.next().ok_or(AuthError::Malformed("missing pattern"))?;
        Claims::new(pattern, access, expires_at)
    }
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
}

/// Signs `claims` with `secret`.
pub fn sign(secret: &[u8], claims: &Claims) -> String {
    let body = claims.encode();
    let mut m = mac(secret);
    m.update(&body);
    let tag = m.finalize().into_bytes();
    format!("{}.{}", base64url_encode(&body), base64url_encode(&tag))
}

/// Checks the signature (constant time) and the expiry; returns the claims.
pub fn verify(secret: &[u8], token: &str, now: u64) -> Result<Claims, AuthError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed("too long"));
    }
    let (body, tag) = token.split_once('.').ok_or(AuthError::Malformed("missing `.`"))?;
    let body = base64url_decode(body).ok_or(AuthError::Malformed("claims are not base64url"))?;
    let tag = base64url_decode(tag).ok_or(AuthError::Malformed("signature is not base64url"))?;
    let mut m = mac(secret);
    m.update(&body);
    m.verify_slice(&tag).map_err(|_| AuthError::BadSignature)?;
    let claims = Claims::decode(&body)?;
    if now >= claims.expires_at {
        return Err(AuthError::Expired { at: claims.expires_at });
    }
    Ok(claims)
}

/// [`verify`] then [`Claims::check`]: may the bearer of `token` have `wanted` on `doc`?
pub fn authorize(
    secret: &[u8],
    token: &str,
    doc: &str,
    wanted: Access,
    now: u64,
) -> Result<Claims, AuthError> {
    let claims = verify(secret, token, now)?;
    claims.check(doc, wanted)?;
    Ok(claims)
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64url without padding (RFC 4648 §5).
pub fn base64url_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Decodes unpadded base64url; `None` on any invalid or non-canonical input.
pub fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = text.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let produced = chunk.len() - 1;
        let all = n.to_be_bytes();
        // Bits past the last whole byte must be zero, so each byte string has one encoding.
        let used_bits = 8 * produced;
        if used_bits < 24 && n & ((1 << (24 - used_bits)) - 1) != 0 {
            return None;
        }
        out.extend_from_slice(&all[1..1 + produced]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000;

    fn token(pattern: &str, access: Access, ttl: u64) -> String {
        sign(SECRET, &Claims::new(pattern, access, NOW + ttl).unwrap())
    }

    #[test]
    fn base64url_round_trips_every_length() {
        for len in 0..70 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let enc = base64url_encode(&data);
            assert!(!enc.contains('=') && !enc.contains('+') && !enc.contains('/'));
            assert_eq!(base64url_decode(&enc), Some(data));
        }
        assert_eq!(base64url_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64url_encode(b"fo"), "Zm8");
        assert_eq!(base64url_encode(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn base64url_rejects_bad_input() {
        assert_eq!(base64url_decode("Zm9v!"), None);
        assert_eq!(base64url_decode("Z"), None);
        assert_eq!(base64url_decode("Zm8="), None);
        assert_eq!(base64url_decode("Zm9"), None, "non-zero trailing bits");
    }

    #[test]
    fn a_valid_token_grants_its_document() {
        let t = token("board-1", Access::ReadWrite, 60);
        let claims = authorize(SECRET, &t, "board-1", Access::ReadWrite, NOW).unwrap();
        assert_eq!(claims.pattern, "board-1");
        assert!(authorize(SECRET, &t, "board-1", Access::Read, NOW).is_ok());
        assert!(matches!(
            authorize(SECRET, &t, "board-10", Access::Read, NOW),
            Err(AuthError::Forbidden { .. })
        ));
    }

    #[test]
    fn a_prefix_token_covers_the_prefix_only() {
        let t = token("board-*", Access::Read, 60);
        assert!(authorize(SECRET, &t, "board-1", Access::Read, NOW).is_ok());
        assert!(authorize(SECRET, &t, "board-", Access::Read, NOW).is_ok());
        assert!(matches!(
            authorize(SECRET, &t, "boards", Access::Read, NOW),
            Err(AuthError::Forbidden { .. })
        ));
        let all = token("*", Access::Read, 60);
        assert!(authorize(SECRET, &all, "anything", Access::Read, NOW).is_ok());
    }

    #[test]
    fn a_read_only_token_cannot_write() {
        let t = token("board-*", Access::Read, 60);
        let err = authorize(SECRET, &t, "board-1", Access::ReadWrite, NOW).unwrap_err();
        assert!(matches!(err, AuthError::Forbidden { granted: Access::Read, wanted: Access::ReadWrite, .. }));
    }

    #[test]
    fn an_expired_token_is_refused_with_its_expiry() {
        let t = token("board-1", Access::ReadWrite, 60);
        assert!(verify(SECRET, &t, NOW + 59).is_ok());
        assert_eq!(verify(SECRET, &t, NOW + 60), Err(AuthError::Expired { at: NOW + 60 }));
        assert!(AuthError::Expired { at: 5 }.to_string().contains("ask the server for a new one"));
    }

    #[test]
    fn forged_tokens_are_refused() {
        let t = token("board-1", Access::Read, 60);
        assert_eq!(verify(b"another secret", &t, NOW), Err(AuthError::BadSignature));

        // Upgrade the claims to rw on everything, keep the old signature.
        let (_, tag) = t.split_once('.').unwrap();
        let forged_body = base64url_encode(format!("c1:rw:{}:*", NOW + 60).as_bytes());
        assert_eq!(verify(SECRET, &format!("{forged_body}.{tag}"), NOW), Err(AuthError::BadSignature));

        // Flip one signature character.
        let mut bytes = t.into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert!(verify(SECRET, &tampered, NOW).is_err());
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for t in ["", "abc", "a.b.c", "!!.!!", &"A".repeat(MAX_TOKEN_LEN + 1)] {
            assert!(matches!(verify(SECRET, t, NOW), Err(AuthError::Malformed(_))), "{t:?}");
        }
        // Correctly signed but not our claims format.
        let body = b"hello";
        let mut m = mac(SECRET);
        m.update(body);
        let t = format!("{}.{}", base64url_encode(body), base64url_encode(&m.finalize().into_bytes()));
        assert!(matches!(verify(SECRET, &t, NOW), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn patterns_with_inner_stars_are_rejected() {
        assert!(Claims::new("a*b", Access::Read, 1).is_err());
        assert!(Claims::new("a**", Access::Read, 1).is_err());
        assert!(Claims::new("", Access::Read, 1).is_err());
        assert!(Claims::new("a:b*", Access::Read, 1).is_ok());
    }

    #[test]
    fn patterns_may_contain_colons() {
        let t = token("team:42:board-*", Access::ReadWrite, 60);
        assert!(authorize(SECRET, &t, "team:42:board-7", Access::ReadWrite, NOW).is_ok());
    }
}
