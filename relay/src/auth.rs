//! Credentials: JSON Web Tokens (RFC 7519) for clients, relay peers and admins.
//!
//! Every credential is a compact JWS `header.claims.signature`. Three kinds exist, each
//! verified with its own key, so that none can stand in for another:
//!
//! | kind     | signed with                                              | grants |
//! |----------|----------------------------------------------------------|--------|
//! | `client` | HS256 with `auth_secret`, or a configured key (`kid`)    | `access` on `doc` |
//! | `peer`   | HS256 with HMAC-SHA256(`auth_secret`, `"concord/peer/v1"`)  | a cluster peer link |
//! | `admin`  | HS256 with HMAC-SHA256(`auth_secret`, `"concord/admin/v1"`) | the admin HTTP routes |
//!
//! Claims (unknown claims such as `sub` or `iss` are ignored):
//!
//! - `kind`: `"client"` (the default when absent), `"peer"` or `"admin"`.
//! - `doc` (client): a document id, or a prefix ending in `*` (`"board-*"`, `"*"`).
//! - `access` (client): `"r"` (subscribe and read) or `"rw"` (read and write).
//! - `node` (peer): the id of the relay presenting it; it must be another member of the
//!   configured cluster.
//! - `exp` (required, unix seconds): valid while `now < exp`. Peer credentials live at
//!   most [`MAX_PEER_TTL`] seconds; relays mint a fresh one at every link connect.
//! - `nbf`, `iat` (optional, unix seconds): not valid before `nbf`, nor when `iat` is in
//!   the future (both with [`CLOCK_SKEW`] seconds of tolerance).
//! - `aud`: checked only for a configured key with an `audience`.
//!
//! Key selection: a client token without `kid` in its header is checked against the
//! `auth_secret` (HS256); a token with a `kid` only against the configured key of that id
//! ([`VerifyKey`]), so several keys can be valid at once and rotate without downtime. Each
//! key has exactly one algorithm: a token whose `alg` differs (`none`, or HS256 "signed"
//! with a public key) is refused with [`AuthError::AlgorithmNotAllowed`].
//!
//! Time is passed in: this module reads no clock.
//!
//! ```
//! use concord_relay::auth::{authorize, sign, Access, Claims};
//! let claims = Claims::new("board-*", Access::ReadWrite, 2_000_000_000).unwrap();
//! let token = sign(b"secret", &claims).unwrap();
//! assert!(authorize(b"secret", &token, "board-1", Access::ReadWrite, 1_700_000_000).is_ok());
//! assert!(authorize(b"secret", &token, "notes-1", Access::Read, 1_700_000_000).is_err());
//! ```

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Longest accepted token, so verifying untrusted input stays cheap.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Label of the key peer credentials are signed with, derived from `auth_secret`.
pub const PEER_KEY_LABEL: &str = "concord/peer/v1";
/// Label of the key admin credentials are signed with, derived from `auth_secret`.
pub const ADMIN_KEY_LABEL: &str = "concord/admin/v1";
/// Lifetime of the peer credential a relay mints for each link connect.
pub const PEER_TTL: u64 = 60;
/// Longest lifetime a peer credential may claim: a leaked one is soon worthless.
pub const MAX_PEER_TTL: u64 = 300;
/// Seconds of clock difference tolerated for `nbf` and `iat` (not for `exp`).
pub const CLOCK_SKEW: u64 = 30;

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

/// The kind of a credential: its `kind` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An application's user: access to documents.
    Client,
    /// Another relay of the cluster.
    Peer,
    /// An operator: the admin HTTP routes.
    Admin,
}

impl Kind {
    /// The claim value.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Client => "client",
            Kind::Peer => "peer",
            Kind::Admin => "admin",
        }
    }
}

/// The signature algorithm of a configured key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    /// HMAC-SHA256 with a shared secret.
    HS256,
    /// ECDSA P-256 with SHA-256; the relay holds the public key.
    ES256,
    /// Ed25519; the relay holds the public key.
    EdDSA,
}

impl KeyAlg {
    /// The JOSE name (`"HS256"`, `"ES256"`, `"EdDSA"`).
    pub fn name(self) -> &'static str {
        match self {
            KeyAlg::HS256 => "HS256",
            KeyAlg::ES256 => "ES256",
            KeyAlg::EdDSA => "EdDSA",
        }
    }

    /// Parses a JOSE name; `None` for any other algorithm.
    pub fn parse(name: &str) -> Option<KeyAlg> {
        match name {
            "HS256" => Some(KeyAlg::HS256),
            "ES256" => Some(KeyAlg::ES256),
            "EdDSA" => Some(KeyAlg::EdDSA),
            _ => None,
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            KeyAlg::HS256 => Algorithm::HS256,
            KeyAlg::ES256 => Algorithm::ES256,
            KeyAlg::EdDSA => Algorithm::EdDSA,
        }
    }
}

/// Authorization errors. Each says what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not a token of this format.
    #[error("malformed token: {0}; get a token from `concord-relay token` or your identity provider")]
    Malformed(&'static str),
    /// The signature does not match: forged, altered, or signed with another key.
    #[error("token signature is invalid; was it issued for this relay?")]
    BadSignature,
    /// The header's `alg` is not the one of the key that checks it (`none` included).
    #[error(
        "token algorithm {alg:?} is not accepted here (expected {expected}); sign with the configured key"
    )]
    AlgorithmNotAllowed {
        /// The header's `alg`.
        alg: String,
        /// The algorithm of the selected key.
        expected: &'static str,
    },
    /// The header names a key id this relay does not have.
    #[error("token key id {kid:?} is unknown to this relay; was the key removed, or not configured yet?")]
    UnknownKey {
        /// The header's `kid`.
        kid: String,
    },
    /// The credential is of another kind than the one asked for.
    #[error("a {found} credential is not accepted as a {expected} credential")]
    WrongKind {
        /// The kind wanted here.
        expected: &'static str,
        /// The token's `kind` claim.
        found: String,
    },
    /// A peer credential names a node that is not another member of the cluster.
    #[error("node {node:?} is not another member of this relay's cluster; check cluster.nodes")]
    UnknownPeer {
        /// The claimed node id.
        node: String,
    },
    /// The token's `aud` does not name this relay's audience.
    #[error("token audience does not include {expected:?}; ask for a token issued for this relay")]
    WrongAudience {
        /// The configured audience.
        expected: String,
    },
    /// A configured key cannot be used.
    #[error("key {kid:?} cannot be used: {reason}")]
    BadKey {
        /// The key's id (`""` for the `auth_secret`).
        kid: String,
        /// Why.
        reason: String,
    },
    /// The token expired.
    #[error("token expired at {at} (unix seconds); ask the server for a new one")]
    Expired {
        /// The expiry it carried.
        at: u64,
    },
    /// The token is not valid yet (`nbf`, or an `iat` in the future).
    #[error("token is not valid before {at} (unix seconds); check the clocks of issuer and relay")]
    NotYetValid {
        /// When it becomes valid.
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

/// What a client token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// A document id, or a prefix followed by `*`.
    pub pattern: String,
    /// What is granted.
    pub access: Access,
    /// Unix seconds; the token is valid while `now < expires_at`.
    pub expires_at: u64,
    /// Unix seconds; the token is not valid before (`nbf`).
    pub not_before: Option<u64>,
    /// Unix seconds; when it was issued (`iat`).
    pub issued_at: Option<u64>,
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
        Ok(Claims { pattern, access, expires_at, not_before: None, issued_at: None })
    }

    /// Whether the pattern covers `doc`.
    pub fn covers(&self, doc: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => doc.starts_with(prefix),
            None => doc == self.pattern,
        }
    }

    /// `Ok` when these claims allow `wanted` on `doc` (time is checked by [`verify`]).
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

    fn wire(&self) -> Wire {
        Wire {
            kind: None,
            doc: Some(self.pattern.clone()),
            access: Some(self.access.code().to_owned()),
            node: None,
            exp: self.expires_at,
            nbf: self.not_before,
            iat: self.issued_at,
        }
    }
}

/// What a verified peer credential says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerClaims {
    /// The relay presenting it.
    pub node: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// The claims as they are encoded.
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    doc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

impl Wire {
    fn kind(&self) -> Result<Kind, AuthError> {
        match self.kind.as_deref() {
            None | Some("client") => Ok(Kind::Client),
            Some("peer") => Ok(Kind::Peer),
            Some("admin") => Ok(Kind::Admin),
            Some(_) => Err(AuthError::Malformed("unknown `kind` claim")),
        }
    }

    fn expect(&self, wanted: Kind) -> Result<(), AuthError> {
        let kind = self.kind()?;
        if kind == wanted {
            Ok(())
        } else {
            Err(AuthError::WrongKind { expected: wanted.name(), found: kind.name().to_owned() })
        }
    }
}

/// The part of the header looked at before the signature is checked, to pick the key.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

fn raw_header(token: &str) -> Result<RawHeader, AuthError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed("too long"));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed("a token has three parts separated by `.`"));
    };
    let bytes = base64url_decode(header).ok_or(AuthError::Malformed("header is not base64url"))?;
    let h: RawHeader = serde_json::from_slice(&bytes)
        .map_err(|_| AuthError::Malformed("header is not a JSON object with a string `alg`"))?;
    // No extension is understood, so none may be critical (RFC 7515 §4.1.11).
    if h.crit.is_some() {
        return Err(AuthError::Malformed("critical header extensions are not supported"));
    }
    Ok(h)
}

/// A configured key that checks client tokens naming its `kid`.
#[derive(Clone)]
pub struct VerifyKey {
    kid: String,
    alg: KeyAlg,
    key: DecodingKey,
    audience: Option<String>,
}

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key material.
        f.debug_struct("VerifyKey").field("kid", &self.kid).field("alg", &self.alg).finish_non_exhaustive()
    }
}

impl VerifyKey {
    /// An HS256 key with a shared secret.
    pub fn hs256(kid: impl Into<String>, secret: &[u8]) -> Result<VerifyKey, AuthError> {
        let kid = kid.into();
        let key = DecodingKey::from_secret(secret)
            .map_err(|e| AuthError::BadKey { kid: kid.clone(), reason: e.to_string() })?;
        Ok(VerifyKey { kid, alg: KeyAlg::HS256, key, audience: None })
    }

    /// An ES256 or EdDSA key from its public key in PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn public_pem(kid: impl Into<String>, alg: KeyAlg, pem: &[u8]) -> Result<VerifyKey, AuthError> {
        let kid = kid.into();
        let bad = |reason: String| AuthError::BadKey { kid: kid.clone(), reason };
        let key = match alg {
            KeyAlg::ES256 => DecodingKey::from_ec_pem(pem),
            KeyAlg::EdDSA => DecodingKey::from_ed_pem(pem),
            KeyAlg::HS256 => return Err(bad("HS256 takes a secret, not a public key".into())),
        }
        .map_err(|e| bad(format!("not a {} public key in PEM: {e}", alg.name())))?;
        if std::str::from_utf8(pem).is_ok_and(|t| t.contains("PRIVATE KEY")) {
            return Err(bad("this is a private key; give the relay only the public key".into()));
        }
        Ok(VerifyKey { kid, alg, key, audience: None })
    }

    /// Requires tokens checked by this key to carry `audience` in their `aud`.
    pub fn with_audience(mut self, audience: impl Into<String>) -> VerifyKey {
        self.audience = Some(audience.into());
        self
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The key's algorithm.
    pub fn alg(&self) -> KeyAlg {
        self.alg
    }
}

/// HMAC-SHA256(`secret`, `label`): a key for one purpose, derived from the shared secret.
pub fn derive_key(secret: &[u8], label: &str) -> [u8; 32] {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(label.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Every key of a relay: the client secret, the derived peer and admin keys, and the
/// configured keys by `kid`.
#[derive(Clone)]
pub struct Keyring {
    client: Vec<u8>,
    peer: [u8; 32],
    admin: [u8; 32],
    keys: Vec<VerifyKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|k| k.kid.as_str()).collect();
        f.debug_struct("Keyring").field("kids", &kids).finish_non_exhaustive()
    }
}

impl Keyring {
    /// The keys of a relay with `secret` (its `auth_secret`) and configured `keys`. When
    /// two keys share a `kid`, the first is used (the configuration refuses that anyway).
    pub fn new(secret: &[u8], keys: Vec<VerifyKey>) -> Keyring {
        Keyring {
            client: secret.to_vec(),
            peer: derive_key(secret, PEER_KEY_LABEL),
            admin: derive_key(secret, ADMIN_KEY_LABEL),
            keys,
        }
    }

    /// The configured key `kid`.
    pub fn key(&self, kid: &str) -> Option<&VerifyKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// Checks a client token: its key (by `kid`), algorithm, signature, kind and time.
    pub fn verify_client(&self, token: &str, now: u64) -> Result<Claims, AuthError> {
        let header = raw_header(token)?;
        let wire = match &header.kid {
            None => {
                let key = hmac_key("", &self.client)?;
                decode(token, &header, KeyAlg::HS256, &key, None, now)?
            }
            Some(kid) => {
                let k = self.key(kid).ok_or_else(|| AuthError::UnknownKey { kid: kid.clone() })?;
                decode(token, &header, k.alg, &k.key, k.audience.as_deref(), now)?
            }
        };
        wire.expect(Kind::Client)?;
        let access = match wire.access.as_deref() {
            Some("r") => Access::Read,
            Some("rw") => Access::ReadWrite,
            Some(_) => return Err(AuthError::Malformed("`access` must be \"r\" or \"rw\"")),
            None => return Err(AuthError::Malformed("missing `access` claim")),
        };
        let doc = wire.doc.ok_or(AuthError::Malformed("missing `doc` claim"))?;
        let mut claims = Claims::new(doc, access, wire.exp)?;
        claims.not_before = wire.nbf;
        claims.issued_at = wire.iat;
        Ok(claims)
    }

    /// [`Keyring::verify_client`] then [`Claims::check`].
    pub fn authorize(&self, token: &str, doc: &str, wanted: Access, now: u64) -> Result<Claims, AuthError> {
        let claims = self.verify_client(token, now)?;
        claims.check(doc, wanted)?;
        Ok(claims)
    }

    /// Checks a peer credential (derived peer key, `kind: "peer"`, short-lived). Whether
    /// its `node` belongs to the cluster is for the caller to check.
    pub fn verify_peer(&self, token: &str, now: u64) -> Result<PeerClaims, AuthError> {
        let header = raw_header(token)?;
        if let Some(kid) = header.kid.clone() {
            return Err(AuthError::UnknownKey { kid });
        }
        let key = hmac_key("peer", &self.peer)?;
        let wire = decode(token, &header, KeyAlg::HS256, &key, None, now)?;
        wire.expect(Kind::Peer)?;
        if wire.exp > now.saturating_add(MAX_PEER_TTL) {
            return Err(AuthError::Malformed("a peer credential must expire within 300 seconds"));
        }
        match wire.node {
            Some(node) if !node.is_empty() => Ok(PeerClaims { node, expires_at: wire.exp }),
            _ => Err(AuthError::Malformed("missing `node` claim")),
        }
    }

    /// Checks an admin credential (derived admin key, `kind: "admin"`); returns its expiry.
    pub fn verify_admin(&self, token: &str, now: u64) -> Result<u64, AuthError> {
        let header = raw_header(token)?;
        if let Some(kid) = header.kid.clone() {
            return Err(AuthError::UnknownKey { kid });
        }
        let key = hmac_key("admin", &self.admin)?;
        let wire = decode(token, &header, KeyAlg::HS256, &key, None, now)?;
        wire.expect(Kind::Admin)?;
        Ok(wire.exp)
    }

    /// A fresh peer credential for `node`, valid [`PEER_TTL`] seconds from `now`.
    pub fn peer_credential(&self, node: &str, now: u64) -> Result<String, AuthError> {
        let wire = Wire {
            kind: Some(Kind::Peer.name().to_owned()),
            doc: None,
            access: None,
            node: Some(node.to_owned()),
            exp: now.saturating_add(PEER_TTL),
            nbf: None,
            iat: Some(now),
        };
        encode(&Header::new(Algorithm::HS256), &wire, "peer", &self.peer)
    }

    /// An admin credential valid `ttl` seconds from `now`.
    pub fn admin_credential(&self, now: u64, ttl: u64) -> Result<String, AuthError> {
        let wire = Wire {
            kind: Some(Kind::Admin.name().to_owned()),
            doc: None,
            access: None,
            node: None,
            exp: now.saturating_add(ttl),
            nbf: None,
            iat: Some(now),
        };
        encode(&Header::new(Algorithm::HS256), &wire, "admin", &self.admin)
    }
}

fn hmac_key(kid: &str, secret: &[u8]) -> Result<DecodingKey, AuthError> {
    DecodingKey::from_secret(secret)
        .map_err(|e| AuthError::BadKey { kid: kid.to_owned(), reason: e.to_string() })
}

fn encode(header: &Header, wire: &Wire, kid: &str, secret: &[u8]) -> Result<String, AuthError> {
    let key = EncodingKey::from_secret(secret)
        .map_err(|e| AuthError::BadKey { kid: kid.to_owned(), reason: e.to_string() })?;
    jsonwebtoken::encode(header, wire, &key)
        .map_err(|e| AuthError::BadKey { kid: kid.to_owned(), reason: e.to_string() })
}

/// Verifies the signature with `key` (whose only algorithm is `alg`), then the time.
fn decode(
    token: &str,
    header: &RawHeader,
    alg: KeyAlg,
    key: &DecodingKey,
    audience: Option<&str>,
    now: u64,
) -> Result<Wire, AuthError> {
    if header.alg != alg.name() {
        return Err(AuthError::AlgorithmNotAllowed { alg: header.alg.clone(), expected: alg.name() });
    }
    let mut validation = Validation::new(alg.jwt());
    // Time is checked below against the `now` passed in, not the crate's clock.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.leeway = 0;
    match audience {
        Some(aud) => {
            validation.set_audience(&[aud]);
            validation.set_required_spec_claims(&["aud"]);
        }
        None => validation.validate_aud = false,
    }
    let wire: Wire = jsonwebtoken::decode(token, key, &validation)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::MissingAlgorithm => {
                AuthError::AlgorithmNotAllowed { alg: header.alg.clone(), expected: alg.name() }
            }
            ErrorKind::InvalidAudience | ErrorKind::MissingRequiredClaim(_) if audience.is_some() => {
                AuthError::WrongAudience { expected: audience.unwrap_or_default().to_owned() }
            }
            ErrorKind::Base64(_) => AuthError::Malformed("not base64url"),
            ErrorKind::Json(_) | ErrorKind::Utf8(_) | ErrorKind::InvalidClaimFormat(_) => {
                AuthError::Malformed("claims are not a JSON object with a numeric `exp`")
            }
            ErrorKind::InvalidToken => AuthError::Malformed("not a JWT"),
            _ => AuthError::BadSignature,
        })?
        .claims;
    if now >= wire.exp {
        return Err(AuthError::Expired { at: wire.exp });
    }
    if let Some(nbf) = wire.nbf {
        if now.saturating_add(CLOCK_SKEW) < nbf {
            return Err(AuthError::NotYetValid { at: nbf });
        }
    }
    if let Some(iat) = wire.iat {
        if now.saturating_add(CLOCK_SKEW) < iat {
            return Err(AuthError::NotYetValid { at: iat });
        }
    }
    Ok(wire)
}

/// Signs client `claims` with `secret` (HS256, no `kid`): the token `auth_secret` checks.
pub fn sign(secret: &[u8], claims: &Claims) -> Result<String, AuthError> {
    encode(&Header::new(Algorithm::HS256), &claims.wire(), "", secret)
}

/// Signs client `claims` with the HS256 `secret` of the configured key `kid`.
pub fn sign_with_kid(secret: &[u8], kid: &str, claims: &Claims) -> Result<String, AuthError> {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_owned());
    encode(&header, &claims.wire(), kid, secret)
}

/// Checks a client token against `secret` alone (no configured keys): signature, kind
/// and time; returns the claims.
pub fn verify(secret: &[u8], token: &str, now: u64) -> Result<Claims, AuthError> {
    Keyring::new(secret, Vec::new()).verify_client(token, now)
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
    use proptest::prelude::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000;
    // Test-only key pairs, generated for these tests and used nowhere else.
    const ES256_A_KEY: &str = include_str!("../tests/fixtures/es256-a.key.pem");
    const ES256_A_PUB: &str = include_str!("../tests/fixtures/es256-a.pub.pem");
    const ES256_B_KEY: &str = include_str!("../tests/fixtures/es256-b.key.pem");
    const ES256_B_PUB: &str = include_str!("../tests/fixtures/es256-b.pub.pem");
    const EDDSA_A_KEY: &str = include_str!("../tests/fixtures/eddsa-a.key.pem");
    const EDDSA_A_PUB: &str = include_str!("../tests/fixtures/eddsa-a.pub.pem");

    fn token(pattern: &str, access: Access, ttl: u64) -> String {
        sign(SECRET, &Claims::new(pattern, access, NOW + ttl).unwrap()).unwrap()
    }

    fn keyring() -> Keyring {
        Keyring::new(
            SECRET,
            vec![
                VerifyKey::public_pem("es-a", KeyAlg::ES256, ES256_A_PUB.as_bytes()).unwrap(),
                VerifyKey::public_pem("es-b", KeyAlg::ES256, ES256_B_PUB.as_bytes()).unwrap(),
                VerifyKey::public_pem("ed-a", KeyAlg::EdDSA, EDDSA_A_PUB.as_bytes()).unwrap(),
                VerifyKey::hs256("hs-2", b"rotated secret").unwrap(),
            ],
        )
    }

    /// Signs arbitrary claims JSON with any header, the way an identity provider would.
    fn jwt(header: &Header, claims: &serde_json::Value, key: &EncodingKey) -> String {
        jsonwebtoken::encode(header, claims, key).unwrap()
    }

    fn with_kid(alg: Algorithm, kid: &str) -> Header {
        let mut h = Header::new(alg);
        h.kid = Some(kid.to_owned());
        h
    }

    fn client_claims(exp: u64) -> serde_json::Value {
        serde_json::json!({ "doc": "board-*", "access": "rw", "exp": exp, "sub": "user-7" })
    }

    fn es_key(pem: &str) -> EncodingKey {
        EncodingKey::from_ec_pem(pem.as_bytes()).unwrap()
    }

    /// `header.claims.signature` with hand-made parts.
    fn raw(header: &str, claims: &str, sig: &str) -> String {
        format!("{}.{}.{}", base64url_encode(header.as_bytes()), base64url_encode(claims.as_bytes()), sig)
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
        assert_eq!(base64url_decode("Zm9"), None, "non-zero trailing bits");
    }

    #[test]
    fn an_hs256_token_signed_with_the_secret_grants_its_document() {
        let t = token("board-1", Access::ReadWrite, 60);
        assert_eq!(t.split('.').count(), 3, "a compact JWT");
        let claims = authorize(SECRET, &t, "board-1", Access::ReadWrite, NOW).unwrap();
        assert_eq!(claims.pattern, "board-1");
        assert!(authorize(SECRET, &t, "board-1", Access::Read, NOW).is_ok());
        assert!(matches!(
            authorize(SECRET, &t, "board-10", Access::Read, NOW),
            Err(AuthError::Forbidden { .. })
        ));
    }

    #[test]
    fn an_hs256_token_from_any_jwt_library_is_accepted() {
        let key = EncodingKey::from_secret(SECRET).unwrap();
        let t = jwt(&Header::new(Algorithm::HS256), &client_claims(NOW + 60), &key);
        let claims = keyring().authorize(&t, "board-3", Access::ReadWrite, NOW).unwrap();
        assert_eq!(claims.access, Access::ReadWrite);
        let explicit = serde_json::json!({ "kind": "client", "doc": "x", "access": "r", "exp": NOW + 60 });
        assert!(keyring().verify_client(&jwt(&Header::new(Algorithm::HS256), &explicit, &key), NOW).is_ok());
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
    fn an_es256_token_round_trips_through_its_kid() {
        let t = jwt(&with_kid(Algorithm::ES256, "es-a"), &client_claims(NOW + 60), &es_key(ES256_A_KEY));
        let claims = keyring().authorize(&t, "board-1", Access::ReadWrite, NOW).unwrap();
        assert_eq!(claims.pattern, "board-*");
    }

    #[test]
    fn an_eddsa_token_round_trips_through_its_kid() {
        let key = EncodingKey::from_ed_pem(EDDSA_A_KEY.as_bytes()).unwrap();
        let t = jwt(&with_kid(Algorithm::EdDSA, "ed-a"), &client_claims(NOW + 60), &key);
        assert!(keyring().authorize(&t, "board-1", Access::ReadWrite, NOW).is_ok());
    }

    #[test]
    fn an_hs256_token_with_a_kid_is_checked_with_that_keys_secret_only() {
        let claims = Claims::new("d", Access::Read, NOW + 60).unwrap();
        let t = sign_with_kid(b"rotated secret", "hs-2", &claims).unwrap();
        assert!(keyring().verify_client(&t, NOW).is_ok());
        // The auth_secret does not stand in for a named key.
        let t = sign_with_kid(SECRET, "hs-2", &claims).unwrap();
        assert_eq!(keyring().verify_client(&t, NOW), Err(AuthError::BadSignature));
        // Nor does a named key's secret without its kid.
        let t = sign(b"rotated secret", &claims).unwrap();
        assert_eq!(keyring().verify_client(&t, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn two_keys_are_valid_at_once_and_removing_one_refuses_its_tokens() {
        let a = jwt(&with_kid(Algorithm::ES256, "es-a"), &client_claims(NOW + 60), &es_key(ES256_A_KEY));
        let b = jwt(&with_kid(Algorithm::ES256, "es-b"), &client_claims(NOW + 60), &es_key(ES256_B_KEY));
        let both = keyring();
        assert!(both.verify_client(&a, NOW).is_ok());
        assert!(both.verify_client(&b, NOW).is_ok());
        let rotated = Keyring::new(
            SECRET,
            vec![VerifyKey::public_pem("es-b", KeyAlg::ES256, ES256_B_PUB.as_bytes()).unwrap()],
        );
        assert_eq!(rotated.verify_client(&a, NOW), Err(AuthError::UnknownKey { kid: "es-a".into() }));
        assert!(rotated.verify_client(&b, NOW).is_ok());
    }

    #[test]
    fn a_token_signed_by_another_key_than_its_kid_is_refused() {
        let t = jwt(&with_kid(Algorithm::ES256, "es-a"), &client_claims(NOW + 60), &es_key(ES256_B_KEY));
        assert_eq!(keyring().verify_client(&t, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn an_unknown_kid_is_a_typed_error_that_says_what_to_do() {
        let t = jwt(&with_kid(Algorithm::ES256, "gone"), &client_claims(NOW + 60), &es_key(ES256_A_KEY));
        let err = keyring().verify_client(&t, NOW).unwrap_err();
        assert_eq!(err, AuthError::UnknownKey { kid: "gone".into() });
        assert!(err.to_string().contains("was the key removed"));
    }

    #[test]
    fn an_expired_token_is_refused_with_its_expiry() {
        let t = token("board-1", Access::ReadWrite, 60);
        assert!(verify(SECRET, &t, NOW + 59).is_ok());
        assert_eq!(verify(SECRET, &t, NOW + 60), Err(AuthError::Expired { at: NOW + 60 }));
        assert!(AuthError::Expired { at: 5 }.to_string().contains("ask the server for a new one"));
        let es = jwt(&with_kid(Algorithm::ES256, "es-a"), &client_claims(NOW), &es_key(ES256_A_KEY));
        assert_eq!(keyring().verify_client(&es, NOW), Err(AuthError::Expired { at: NOW }));
    }

    #[test]
    fn a_token_without_exp_is_refused() {
        let key = EncodingKey::from_secret(SECRET).unwrap();
        let t = jwt(&Header::new(Algorithm::HS256), &serde_json::json!({ "doc": "d", "access": "r" }), &key);
        assert!(matches!(verify(SECRET, &t, NOW), Err(AuthError::Malformed(_))));
        let t = jwt(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({ "doc": "d", "access": "r", "exp": "2000000000" }),
            &key,
        );
        assert!(matches!(verify(SECRET, &t, NOW), Err(AuthError::Malformed(_))), "a string exp");
    }

    #[test]
    fn a_token_is_refused_before_its_nbf_and_accepted_after() {
        let key = EncodingKey::from_secret(SECRET).unwrap();
        let claims = serde_json::json!({ "doc": "d", "access": "r", "exp": NOW + 3600, "nbf": NOW + 600 });
        let t = jwt(&Header::new(Algorithm::HS256), &claims, &key);
        assert_eq!(verify(SECRET, &t, NOW), Err(AuthError::NotYetValid { at: NOW + 600 }));
        assert!(verify(SECRET, &t, NOW + 600 - CLOCK_SKEW).is_ok(), "within the clock skew");
        assert_eq!(verify(SECRET, &t, NOW + 601).map(|c| c.not_before), Ok(Some(NOW + 600)));
        let future = serde_json::json!({ "doc": "d", "access": "r", "exp": NOW + 3600, "iat": NOW + 900 });
        let t = jwt(&Header::new(Algorithm::HS256), &future, &key);
        assert_eq!(verify(SECRET, &t, NOW), Err(AuthError::NotYetValid { at: NOW + 900 }));
    }

    #[test]
    fn an_alg_none_token_is_refused() {
        let claims = format!(r#"{{"doc":"*","access":"rw","exp":{}}}"#, NOW + 60);
        for t in [
            raw(r#"{"alg":"none","typ":"JWT"}"#, &claims, ""),
            raw(r#"{"alg":"none"}"#, &claims, "AAAA"),
            raw(r#"{"alg":"None"}"#, &claims, ""),
            raw(r#"{"alg":"none","kid":"es-a"}"#, &claims, ""),
        ] {
            let err = keyring().verify_client(&t, NOW).unwrap_err();
            assert!(matches!(err, AuthError::AlgorithmNotAllowed { .. }), "{err:?}");
        }
    }

    #[test]
    fn an_hs256_token_using_a_public_key_as_its_secret_is_refused() {
        // The classic confusion: the attacker knows the public key and HMACs with it.
        for pem in [ES256_A_PUB, EDDSA_A_PUB] {
            let key = EncodingKey::from_secret(pem.as_bytes()).unwrap();
            let kid = if pem == ES256_A_PUB { "es-a" } else { "ed-a" };
            let t = jwt(&with_kid(Algorithm::HS256, kid), &client_claims(NOW + 60), &key);
            let err = keyring().verify_client(&t, NOW).unwrap_err();
            assert!(
                matches!(err, AuthError::AlgorithmNotAllowed { ref alg, .. } if alg == "HS256"),
                "{err:?}"
            );
        }
        // And an ES256 token under the HS256 secret's slot (no kid).
        let t = jwt(&Header::new(Algorithm::ES256), &client_claims(NOW + 60), &es_key(ES256_A_KEY));
        assert!(matches!(
            keyring().verify_client(&t, NOW),
            Err(AuthError::AlgorithmNotAllowed { expected: "HS256", .. })
        ));
        // RS256 and friends are not accepted at all.
        let t = raw(r#"{"alg":"RS256","kid":"es-a"}"#, r#"{"exp":1}"#, "AAAA");
        assert!(matches!(keyring().verify_client(&t, NOW), Err(AuthError::AlgorithmNotAllowed { .. })));
    }

    #[test]
    fn a_private_key_or_a_wrong_key_type_is_refused_as_a_verifying_key() {
        assert!(matches!(
            VerifyKey::public_pem("k", KeyAlg::ES256, ES256_A_KEY.as_bytes()),
            Err(AuthError::BadKey { .. })
        ));
        assert!(matches!(
            VerifyKey::public_pem("k", KeyAlg::EdDSA, ES256_A_PUB.as_bytes()),
            Err(AuthError::BadKey { .. })
        ));
        assert!(matches!(
            VerifyKey::public_pem("k", KeyAlg::ES256, b"garbage"),
            Err(AuthError::BadKey { .. })
        ));
        assert!(matches!(VerifyKey::hs256("k", b""), Err(AuthError::BadKey { .. })));
        assert!(!format!("{:?}", VerifyKey::hs256("k", b"s3cret").unwrap()).contains("s3cret"));
    }

    #[test]
    fn critical_header_extensions_are_refused() {
        let mut h = Header::new(Algorithm::HS256);
        h.crit = Some(vec!["b64".into()]);
        let key = EncodingKey::from_secret(SECRET).unwrap();
        let t = jwt(&h, &client_claims(NOW + 60), &key);
        assert!(matches!(verify(SECRET, &t, NOW), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn an_audience_bound_key_needs_its_audience() {
        let ring = Keyring::new(
            SECRET,
            vec![VerifyKey::public_pem("es-a", KeyAlg::ES256, ES256_A_PUB.as_bytes())
                .unwrap()
                .with_audience("concord")],
        );
        let header = with_kid(Algorithm::ES256, "es-a");
        let mut claims = client_claims(NOW + 60);
        let none = jwt(&header, &claims, &es_key(ES256_A_KEY));
        assert!(matches!(ring.verify_client(&none, NOW), Err(AuthError::WrongAudience { .. })));
        claims["aud"] = "another-app".into();
        let other = jwt(&header, &claims, &es_key(ES256_A_KEY));
        assert!(matches!(ring.verify_client(&other, NOW), Err(AuthError::WrongAudience { .. })));
        claims["aud"] = serde_json::json!(["another-app", "concord"]);
        assert!(ring.verify_client(&jwt(&header, &claims, &es_key(ES256_A_KEY)), NOW).is_ok());
    }

    #[test]
    fn forged_and_tampered_tokens_are_refused() {
        let t = token("board-1", Access::Read, 60);
        assert_eq!(verify(b"another secret", &t, NOW), Err(AuthError::BadSignature));
        // Upgrade the claims to rw on everything, keep the old signature.
        let parts: Vec<&str> = t.split('.').collect();
        let forged_body =
            base64url_encode(format!(r#"{{"doc":"*","access":"rw","exp":{}}}"#, NOW + 60).as_bytes());
        let forged = format!("{}.{forged_body}.{}", parts[0], parts[2]);
        assert_eq!(verify(SECRET, &forged, NOW), Err(AuthError::BadSignature));
        // Flip one signature character.
        let mut bytes = t.into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        assert!(verify(SECRET, &String::from_utf8(bytes).unwrap(), NOW).is_err());
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for t in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "!!.!!.!!",
            &"A".repeat(MAX_TOKEN_LEN + 1),
            "e30.e30.",
            "bnVsbA.e30.",
        ] {
            assert!(matches!(verify(SECRET, t, NOW), Err(AuthError::Malformed(_))), "{t:?}");
        }
        // Correctly signed but not our claims.
        let key = EncodingKey::from_secret(SECRET).unwrap();
        for claims in [
            serde_json::json!({ "exp": NOW + 60 }),
            serde_json::json!({ "doc": "a*b", "access": "r", "exp": NOW + 60 }),
            serde_json::json!({ "doc": "d", "access": "admin", "exp": NOW + 60 }),
            serde_json::json!({ "doc": "d", "access": "r", "exp": NOW + 60, "kind": "root" }),
            serde_json::json!([1, 2]),
        ] {
            let t = jwt(&Header::new(Algorithm::HS256), &claims, &key);
            assert!(matches!(verify(SECRET, &t, NOW), Err(AuthError::Malformed(_))), "{claims}");
        }
    }

    #[test]
    fn patterns_with_inner_stars_are_rejected_and_colons_allowed() {
        assert!(Claims::new("a*b", Access::Read, 1).is_err());
        assert!(Claims::new("a**", Access::Read, 1).is_err());
        assert!(Claims::new("", Access::Read, 1).is_err());
        let t = token("team:42:board-*", Access::ReadWrite, 60);
        assert!(authorize(SECRET, &t, "team:42:board-7", Access::ReadWrite, NOW).is_ok());
    }

    #[test]
    fn a_peer_credential_round_trips_and_is_short_lived() {
        let ring = keyring();
        let t = ring.peer_credential("b", NOW).unwrap();
        assert_eq!(
            ring.verify_peer(&t, NOW),
            Ok(PeerClaims { node: "b".into(), expires_at: NOW + PEER_TTL })
        );
        assert_eq!(ring.verify_peer(&t, NOW + PEER_TTL), Err(AuthError::Expired { at: NOW + PEER_TTL }));
        // A peer credential from a relay with another secret.
        let other = Keyring::new(b"another cluster", Vec::new()).peer_credential("b", NOW).unwrap();
        assert_eq!(ring.verify_peer(&other, NOW), Err(AuthError::BadSignature));
        // Long-lived peer credentials are not accepted even when correctly signed.
        let long = Wire {
            kind: Some("peer".into()),
            doc: None,
            access: None,
            node: Some("b".into()),
            exp: NOW + 86_400,
            nbf: None,
            iat: None,
        };
        let t = encode(&Header::new(Algorithm::HS256), &long, "peer", &derive_key(SECRET, PEER_KEY_LABEL))
            .unwrap();
        assert!(matches!(ring.verify_peer(&t, NOW), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn no_client_token_however_wrapped_is_a_peer_credential() {
        let ring = keyring();
        let client = token("*", Access::ReadWrite, 60);
        // Signed with the client secret but claiming to be a peer.
        let key = EncodingKey::from_secret(SECRET).unwrap();
        let claims = serde_json::json!({ "kind": "peer", "node": "b", "exp": NOW + 60 });
        let claims_peer = jwt(&Header::new(Algorithm::HS256), &claims, &key);
        // Signed by an identity provider key, claiming to be a peer.
        let idp_peer = jwt(&with_kid(Algorithm::ES256, "es-a"), &claims, &es_key(ES256_A_KEY));
        for t in [
            client.clone(),
            format!("b:{client}"),
            format!("peer:b:{client}"),
            format!("peer:{client}"),
            claims_peer,
            idp_peer,
            ring.admin_credential(NOW, 60).unwrap(),
        ] {
            assert!(ring.verify_peer(&t, NOW).is_err(), "{t}");
        }
    }

    #[test]
    fn peer_admin_and_client_credentials_are_never_interchangeable() {
        let ring = keyring();
        let client = token("*", Access::ReadWrite, 60);
        let peer = ring.peer_credential("b", NOW).unwrap();
        let admin = ring.admin_credential(NOW, 60).unwrap();
        assert!(ring.verify_client(&client, NOW).is_ok());
        assert!(ring.verify_peer(&peer, NOW).is_ok());
        assert_eq!(ring.verify_admin(&admin, NOW), Ok(NOW + 60));

        assert_eq!(ring.verify_client(&peer, NOW), Err(AuthError::BadSignature));
        assert_eq!(ring.verify_client(&admin, NOW), Err(AuthError::BadSignature));
        assert!(ring.verify_peer(&client, NOW).is_err());
        assert!(ring.verify_peer(&admin, NOW).is_err());
        assert!(ring.verify_admin(&client, NOW).is_err());
        assert!(ring.verify_admin(&peer, NOW).is_err());

        // Even signed with the right key, the `kind` claim is checked.
        let admin_key = derive_key(SECRET, ADMIN_KEY_LABEL);
        let peer_key = derive_key(SECRET, PEER_KEY_LABEL);
        assert_ne!(admin_key, peer_key);
        assert_ne!(&peer_key[..], SECRET);
        let as_client = |k: &[u8]| sign(k, &Claims::new("*", Access::ReadWrite, NOW + 60).unwrap()).unwrap();
        assert!(matches!(ring.verify_peer(&as_client(&peer_key), NOW), Err(AuthError::WrongKind { .. })));
        assert!(matches!(ring.verify_admin(&as_client(&admin_key), NOW), Err(AuthError::WrongKind { .. })));
        let key = EncodingKey::from_secret(SECRET).unwrap();
        for kind in ["peer", "admin"] {
            let claims =
                serde_json::json!({ "kind": kind, "doc": "*", "access": "rw", "node": "b", "exp": NOW + 60 });
            let t = jwt(&Header::new(Algorithm::HS256), &claims, &key);
            assert!(matches!(ring.verify_client(&t, NOW), Err(AuthError::WrongKind { .. })), "{kind}");
        }
        // A kid on a peer or admin credential selects nothing.
        let mut h = with_kid(Algorithm::HS256, "hs-2");
        h.typ = None;
        let t = jwt(
            &h,
            &serde_json::json!({ "kind": "admin", "exp": NOW + 60 }),
            &EncodingKey::from_secret(b"rotated secret").unwrap(),
        );
        assert!(matches!(ring.verify_admin(&t, NOW), Err(AuthError::UnknownKey { .. })));
    }

    #[test]
    fn an_expired_admin_credential_is_refused() {
        let ring = keyring();
        let admin = ring.admin_credential(NOW, 60).unwrap();
        assert_eq!(ring.verify_admin(&admin, NOW + 60), Err(AuthError::Expired { at: NOW + 60 }));
    }

    /// Valid credentials of every kind, to mutate.
    fn seeds() -> Vec<String> {
        let ring = keyring();
        vec![
            token("board-*", Access::Read, 600),
            ring.peer_credential("b", NOW).unwrap(),
            ring.admin_credential(NOW, 600).unwrap(),
            jwt(&with_kid(Algorithm::ES256, "es-a"), &client_claims(NOW + 600), &es_key(ES256_A_KEY)),
            jwt(
                &with_kid(Algorithm::EdDSA, "ed-a"),
                &client_claims(NOW + 600),
                &EncodingKey::from_ed_pem(EDDSA_A_KEY.as_bytes()).unwrap(),
            ),
        ]
    }

    /// Runs every verifier; none may panic, and a mutated token is never accepted with
    /// more than its seed granted.
    fn check_all(ring: &Keyring, t: &str) {
        let _ = ring.verify_client(t, NOW);
        let _ = ring.verify_peer(t, NOW);
        let _ = ring.verify_admin(t, NOW);
        let _ = verify(SECRET, t, NOW);
        let _ = raw_header(t);
        let _ = base64url_decode(t);
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic_a_verifier(s in ".{0,600}") {
            let ring = keyring();
            check_all(&ring, &s);
            prop_assert!(ring.verify_client(&s, NOW).is_err());
            prop_assert!(ring.verify_peer(&s, NOW).is_err());
            prop_assert!(ring.verify_admin(&s, NOW).is_err());
        }

        #[test]
        fn arbitrary_bytes_in_jwt_shape_never_panic_a_verifier(
            h in proptest::collection::vec(any::<u8>(), 0..80),
            c in proptest::collection::vec(any::<u8>(), 0..120),
            sig in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let ring = keyring();
            let t = format!("{}.{}.{}", base64url_encode(&h), base64url_encode(&c), base64url_encode(&sig));
            check_all(&ring, &t);
            prop_assert!(ring.verify_client(&t, NOW).is_err());
            prop_assert!(ring.verify_peer(&t, NOW).is_err());
            prop_assert!(ring.verify_admin(&t, NOW).is_err());
        }

        #[test]
        fn mutated_valid_tokens_are_refused_or_unchanged(
            which in 0usize..5,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
        ) {
            let ring = keyring();
            let seed = seeds()[which].clone();
            let mut bytes = seed.clone().into_bytes();
            for (at, b, op) in edits {
                match op {
                    0 if !bytes.is_empty() => { let i = at.index(bytes.len()); bytes[i] = b; }
                    1 => { let i = at.index(bytes.len() + 1); bytes.insert(i, b); }
                    _ if !bytes.is_empty() => { let i = at.index(bytes.len()); bytes.remove(i); }
                    _ => {}
                }
            }
            let t = String::from_utf8_lossy(&bytes).into_owned();
            check_all(&ring, &t);
            // A changed token may only verify if it decodes to the same signed content
            // (e.g. an edit that base64 ignores cannot happen: decoding is canonical).
            if t != seed {
                prop_assert!(ring.verify_client(&t, NOW).is_err(), "accepted {t}");
                prop_assert!(ring.verify_peer(&t, NOW).is_err(), "accepted {t}");
                prop_assert!(ring.verify_admin(&t, NOW).is_err(), "accepted {t}");
            }
        }
    }
}
