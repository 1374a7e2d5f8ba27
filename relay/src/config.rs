//! The relay's configuration: the TOML contract of `DESIGN.md`, flag overrides and
//! validation.
//!
//! ```toml
//! node_id = "a"                 # unique in the cluster
//! listen = "127.0.0.1:7701"     # WebSocket + HTTP
//! # admin_listen = "127.0.0.1:7801" # /metrics, /cluster*, /healthz; default 127.0.0.1:0
//! data_dir = "data/a"
//! # auth_secret = "..."         # optional; enables token auth (HS256 client tokens)
//! # web_root = "web-demo"       # optional; serves the demo page
//!
//! # [[auth.keys]]               # optional, needs auth_secret: more client token keys,
//! # kid = "idp-2026-12"         # picked by the `kid` of a token's header
//! # alg = "ES256"               # ES256 | EdDSA | HS256
//! # public_key_file = "keys/idp.pem"   # or public_key = "-----BEGIN PUBLIC KEY-----..."
//! # audience = "concord"        # optional: tokens of this key must name it in `aud`
//! # (an HS256 key has `secret = "..."` instead of a public key)
//!
//! [cluster]                     # optional: without it the node runs alone (N = R = W = 1)
//! replicas = 3                  # N
//! write_quorum = 2              # W
//! read_quorum = 2               # R
//! vnodes = 64                   # per unit of weight
//!
//! [[cluster.nodes]]
//! id = "a"
//! addr = "127.0.0.1:7701"
//! weight = 1
//!
//! [limits]                      # optional; every field has a default (see `Limits`)
//! max_connections = 1024
//! ```
//!
//! Parsing is strict: unknown fields are errors, and every error is one line naming the
//! field and the problem, e.g. `cluster.write_quorum = 4 exceeds cluster.replicas = 3`.
//!
//! ```
//! use concord_relay::config::{Config, Overrides};
//! let cfg = Config::from_toml_str(
//!     "node_id = \"a\"\nlisten = \"127.0.0.1:7701\"\ndata_dir = \"data/a\"\n",
//!     &Overrides::default(),
//! )
//! .unwrap();
//! assert!(cfg.standalone);
//! assert_eq!(cfg.cluster.replicas, 1);
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Configuration errors. Each displays as one line naming the field and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown field, or a value of the wrong type.
    #[error("{location}{message}")]
    Parse {
        /// `line L, column C: key.path: ` (whatever could be determined), possibly empty.
        location: String,
        /// The parser's message, on one line.
        message: String,
    },
    /// A value is well-formed but not acceptable.
    #[error("{message}")]
    Invalid {
        /// The dotted path of the offending field, e.g. `cluster.write_quorum`.
        field: String,
        /// The whole one-line message, starting with the field.
        message: String,
    },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid { field: field.into(), message: message.into() }
    }

    /// The dotted path of the offending field, when it is known.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Command-line overrides applied on top of the file (`--listen`, `--admin-listen`,
/// `--data-dir`, `--node-id`).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen ADDR`
    pub listen: Option<String>,
    /// `--admin-listen ADDR`
    pub admin_listen: Option<String>,
    /// `--data-dir DIR`
    pub data_dir: Option<PathBuf>,
    /// `--node-id ID`
    pub node_id: Option<String>,
}

/// The validated configuration of one relay node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Unique id of this node in the cluster.
    pub node_id: String,
    /// `host:port` the WebSocket + HTTP server binds to.
    pub listen: String,
    /// `host:port` of the admin listener, which serves `/metrics`, `/cluster*` and
    /// `/healthz` without credentials and nothing else. Default `127.0.0.1:0`: an
    /// ephemeral loopback port, logged at start-up.
    pub admin_listen: String,
    /// Directory of the embedded storage (created if missing).
    pub data_dir: PathBuf,
    /// HMAC secret for tokens; `None` runs the relay open (and it says so at start-up).
    pub auth_secret: Option<String>,
    /// Directory of static files served over HTTP (the demo page), if any.
    pub web_root: Option<PathBuf>,
    /// The effective cluster. Without a `[cluster]` section: this node alone, N=R=W=1.
    pub cluster: ClusterConfig,
    /// True when the file had no `[cluster]` section.
    pub standalone: bool,
    /// Resource bounds of the server.
    pub limits: Limits,
    /// The optional `[auth]` section: further keys for client tokens.
    pub auth: AuthConfig,
}

/// The optional `[auth]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Keys that check client tokens whose header names their `kid`. Several may be
    /// valid at once: add the new key, move issuers to it, then remove the old one.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
}

/// One `[[auth.keys]]` entry. Exactly one of `public_key` / `public_key_file` for ES256
/// and EdDSA, `secret` for HS256.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The key id tokens name in their header.
    pub kid: String,
    /// `"ES256"`, `"EdDSA"` or `"HS256"`: the only algorithm this key accepts.
    pub alg: String,
    /// The public key in PEM (`-----BEGIN PUBLIC KEY-----`).
    #[serde(default)]
    pub public_key: Option<String>,
    /// A file holding the public key in PEM (relative paths: to the working directory).
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// The shared secret of an HS256 key.
    #[serde(default)]
    pub secret: Option<String>,
    /// When set, tokens checked by this key must carry it in their `aud` claim.
    #[serde(default)]
    pub audience: Option<String>,
}

impl std::fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("KeyConfig")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("public_key_file", &self.public_key_file)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// The `[cluster]` section: Dynamo-style replication parameters and the member list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// N: how many distinct nodes hold each document. Default 3.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// W: replicas that must durably persist a write before the client is acked.
    /// Default: a majority of `replicas`.
    #[serde(default)]
    pub write_quorum: Option<usize>,
    /// R: replicas asked on read/subscribe. Default: a majority of `replicas`.
    #[serde(default)]
    pub read_quorum: Option<usize>,
    /// Virtual nodes per unit of weight on the hash ring. Default 64.
    #[serde(default = "default_vnodes")]
    pub vnodes: u32,
    /// Every node of the cluster, this one included.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
}

impl ClusterConfig {
    /// W, with the default (majority of N) applied.
    pub fn w(&self) -> usize {
        self.write_quorum.unwrap_or(self.replicas / 2 + 1)
    }

    /// R, with the default (majority of N) applied.
    pub fn r(&self) -> usize {
        self.read_quorum.unwrap_or(self.replicas / 2 + 1)
    }
}

fn default_replicas() -> usize {
    3
}
fn default_vnodes() -> u32 {
    64
}
fn default_weight() -> u32 {
    1
}

/// One `[[cluster.nodes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's id (its `node_id`).
    pub id: String,
    /// `host:port` other nodes reach it at.
    pub addr: String,
    /// Relative capacity: the node owns `weight * vnodes` virtual nodes. Default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// The optional `[limits]` section: every bound of the server, with defaults.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Maximum simultaneous TCP connections (WebSocket and HTTP). A permit is taken
    /// before `accept`, so the node stops accepting rather than running out of file
    /// descriptors. Default 1024.
    pub max_connections: usize,
    /// Maximum size of one incoming WebSocket message or frame, and of every outgoing
    /// frame. Larger incoming messages close the connection with 1009. Default 256 KiB.
    pub max_frame_bytes: usize,
    /// Capacity (in messages) of each connection's send queue. A client whose queue is
    /// full is disconnected with 1013 "slow consumer, resync". Default 256.
    pub send_queue: usize,
    /// Sustained incoming messages per second per connection (token bucket rate).
    /// Default 1000.
    pub rate_limit_msgs_per_sec: u32,
    /// Token bucket size: messages a connection may send in a burst. Default 2000.
    pub rate_limit_burst: u32,
    /// Seconds between WebSocket pings. Default 20.
    pub ping_interval_secs: u64,
    /// Seconds without any incoming traffic (pongs included) before a connection is
    /// closed. Must exceed `ping_interval_secs`. Default 40.
    pub idle_timeout_secs: u64,
    /// Documents kept loaded in memory. Default 1024.
    pub doc_cache_capacity: usize,
    /// Milliseconds a new TCP connection has to send its whole request head; then it is
    /// closed without an answer. Short, because an idle socket costs a descriptor.
    /// Default 2000.
    pub head_timeout_ms: u64,
    /// Milliseconds a new WebSocket has to send its first frame (the protocol's
    /// `Hello`); then it is closed with 1008. Default 5000.
    pub hello_timeout_ms: u64,
    /// Open TCP connections allowed per remote IP address, WebSockets and sockets still
    /// sending their request head alike; further connections are closed at once. Behind
    /// a reverse proxy every client shares the proxy's address: raise it there. Default 64.
    pub max_connections_per_ip: usize,
    /// Connections still sending their request head (or waiting for a connection
    /// permit), bounded apart from `max_connections` so idle sockets cannot take the
    /// permits of WebSockets. When full, the oldest pending socket is closed to admit the
    /// new one. Default 256.
    pub max_pending_handshakes: usize,
    /// Most bytes one document's encoded state may take; a write that would grow it
    /// past this is refused with `TOO_LARGE`. Default 16 MiB.
    pub max_doc_bytes: usize,
    /// Most elements one set may hold; an add beyond it is refused with `TOO_LARGE`.
    /// Default 1,000,000.
    pub max_set_elements: usize,
    /// Most encoded bytes of one value (a register's value or one set element); a
    /// larger one is refused with `TOO_LARGE`. Default 64 KiB.
    pub max_value_bytes: usize,
    /// Most bytes of a document id (at most 512, the protocol's bound). Ids must also be
    /// non-empty, free of control characters and of `.`/`..` path segments. Default 512.
    pub max_doc_id_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // The document bounds are the core's, defaults included.
        let documents = concord_core::admit::Limits::default();
        Limits {
            max_connections: 1024,
            max_frame_bytes: 256 * 1024,
            send_queue: 256,
            rate_limit_msgs_per_sec: 1000,
            rate_limit_burst: 2000,
            ping_interval_secs: 20,
            idle_timeout_secs: 40,
            doc_cache_capacity: 1024,
            head_timeout_ms: 2000,
            hello_timeout_ms: 5000,
            max_connections_per_ip: 64,
            max_pending_handshakes: 256,
            max_doc_bytes: documents.max_doc_bytes,
            max_set_elements: documents.max_set_elements,
            max_value_bytes: documents.max_value_bytes,
            max_doc_id_bytes: documents.max_doc_id_bytes,
        }
    }
}

impl Limits {
    /// `ping_interval_secs` as a duration.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval_secs)
    }

    /// `idle_timeout_secs` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// `head_timeout_ms` as a duration.
    pub fn head_timeout(&self) -> Duration {
        Duration::from_millis(self.head_timeout_ms)
    }

    /// `hello_timeout_ms` as a duration.
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.hello_timeout_ms)
    }

    /// The bounds on what clients store, as the core checks them.
    pub fn documents(&self) -> concord_core::admit::Limits {
        concord_core::admit::Limits {
            max_doc_bytes: self.max_doc_bytes,
            max_set_elements: self.max_set_elements,
            max_value_bytes: self.max_value_bytes,
            max_doc_id_bytes: self.max_doc_id_bytes,
        }
    }
}

/// The file as written, before defaults and validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node_id: Option<String>,
    listen: Option<String>,
    admin_listen: Option<String>,
    data_dir: Option<PathBuf>,
    auth_secret: Option<String>,
    web_root: Option<PathBuf>,
    cluster: Option<ClusterConfig>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    auth: AuthConfig,
}

/// Largest accepted `max_frame_bytes` (64 MiB): bigger frames defeat the chunking of
/// the sync protocol and the memory bound per connection.
pub const MAX_FRAME_BYTES_CEILING: usize = 64 * 1024 * 1024;
/// Smallest accepted `max_frame_bytes` (1 KiB).
pub const MAX_FRAME_BYTES_FLOOR: usize = 1024;
/// Default node id when neither the file nor `--node-id` names one.
pub const DEFAULT_NODE_ID: &str = "local";
/// Default listen address when neither the file nor `--listen` gives one.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7701";
/// Default admin listen address: an ephemeral port on loopback.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:0";

impl Config {
    /// Reads, parses and validates `path`, then applies `overrides`.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::from_toml_str(&text, overrides)
    }

    /// The configuration used without `--config`: a standalone node with defaults
    /// (`node_id = "local"`, `listen = "127.0.0.1:7701"`, `data_dir = "data/<node_id>"`),
    /// with `overrides` applied.
    pub fn from_overrides(overrides: &Overrides) -> Result<Config, ConfigError> {
        Config::from_toml_str("", overrides)
    }

    /// Parses and validates TOML text, then applies `overrides`.
    pub fn from_toml_str(text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        let node_id =
            overrides.node_id.clone().or(raw.node_id).unwrap_or_else(|| DEFAULT_NODE_ID.to_string());
        let listen = overrides.listen.clone().or(raw.listen).unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let admin_listen = overrides
            .admin_listen
            .clone()
            .or(raw.admin_listen)
            .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_string());
        let data_dir = overrides
            .data_dir
            .clone()
            .or(raw.data_dir)
            .unwrap_or_else(|| PathBuf::from("data").join(&node_id));
        let standalone = raw.cluster.is_none();
        let cluster = raw.cluster.unwrap_or_else(|| ClusterConfig {
            replicas: 1,
            write_quorum: Some(1),
            read_quorum: Some(1),
            vnodes: default_vnodes(),
            nodes: vec![NodeConfig { id: node_id.clone(), addr: listen.clone(), weight: 1 }],
        });
        let config = Config {
            node_id,
            listen,
            admin_listen,
            data_dir,
            auth_secret: raw.auth_secret,
            web_root: raw.web_root,
            cluster,
            standalone,
            limits: raw.limits,
            auth: raw.auth,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every rule; the first violation is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id.trim().is_empty() {
            return Err(ConfigError::invalid("node_id", "node_id must not be empty"));
        }
        if self.node_id.chars().any(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "node_id",
                format!("node_id = {:?} must not contain whitespace", self.node_id),
            ));
        }
        check_host_port("listen", &self.listen)?;
        check_host_port("admin_listen", &self.admin_listen)?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("data_dir", "data_dir must not be empty"));
        }
        if let Some(secret) = &self.auth_secret {
            if secret.is_empty() {
                return Err(ConfigError::invalid(
                    "auth_secret",
                    "auth_secret must not be empty (remove the line to run without auth)",
                ));
            }
        }
        self.verify_keys()?;
        if let Some(root) = &self.web_root {
            if !root.is_dir() {
                return Err(ConfigError::invalid(
                    "web_root",
                    format!("web_root = {:?} is not a directory", root.display().to_string()),
                ));
            }
        }
        self.validate_cluster()?;
        self.validate_limits()
    }

    /// The `[[auth.keys]]`, read (key files included) and checked, ready for the relay.
    pub fn verify_keys(&self) -> Result<Vec<crate::auth::VerifyKey>, ConfigError> {
        use crate::auth::{KeyAlg, VerifyKey};
        let keys = &self.auth.keys;
        if !keys.is_empty() && self.auth_secret.is_none() {
            return Err(ConfigError::invalid(
                "auth.keys",
                "auth.keys needs auth_secret too: it also keys the cluster's peer and admin credentials",
            ));
        }
        let mut kids = HashSet::new();
        let mut out = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            let at = |field: &str| format!("auth.keys[{i}].{field}");
            if k.kid.trim().is_empty() || k.kid.chars().any(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    at("kid"),
                    format!("{} = {:?} must be non-empty, without whitespace", at("kid"), k.kid),
                ));
            }
            if !kids.insert(k.kid.as_str()) {
                return Err(ConfigError::invalid(
                    at("kid"),
                    format!("{} = {:?} appears twice; each key needs its own kid", at("kid"), k.kid),
                ));
            }
            let alg = KeyAlg::parse(&k.alg).ok_or_else(|| {
                ConfigError::invalid(
                    at("alg"),
                    format!("{} = {:?} is not one of \"ES256\", \"EdDSA\", \"HS256\"", at("alg"), k.alg),
                )
            })?;
            let bad_key = |field: &str, e: crate::auth::AuthError| {
                ConfigError::invalid(at(field), format!("{}: {e}", at(field)))
            };
            let key = match (alg, &k.secret, &k.public_key, &k.public_key_file) {
                (KeyAlg::HS256, Some(secret), None, None) => {
                    if secret.len() < 16 {
                        return Err(ConfigError::invalid(
                            at("secret"),
                            format!(
                                "{} is {} bytes; use at least 32 random bytes",
                                at("secret"),
                                secret.len()
                            ),
                        ));
                    }
                    VerifyKey::hs256(k.kid.clone(), secret.as_bytes()).map_err(|e| bad_key("secret", e))?
                }
                (KeyAlg::HS256, _, _, _) => {
                    return Err(ConfigError::invalid(
                        at("secret"),
                        format!("{} is HS256: give it `secret` and no public key", at("alg")),
                    ))
                }
                (_, None, Some(pem), None) => VerifyKey::public_pem(k.kid.clone(), alg, pem.as_bytes())
                    .map_err(|e| bad_key("public_key", e))?,
                (_, None, None, Some(path)) => {
                    let pem = std::fs::read(path).map_err(|e| {
                        ConfigError::invalid(
                            at("public_key_file"),
                            format!(
                                "{} = {:?} cannot be read: {e}",
                                at("public_key_file"),
                                path.display().to_string()
                            ),
                        )
                    })?;
                    VerifyKey::public_pem(k.kid.clone(), alg, &pem)
                        .map_err(|e| bad_key("public_key_file", e))?
                }
                (_, Some(_), _, _) => {
                    return Err(ConfigError::invalid(
                        at("secret"),
                        format!("{} is {}: it takes a public key, not a secret", at("alg"), alg.name()),
                    ))
                }
                _ => {
                    return Err(ConfigError::invalid(
                        at("public_key"),
                        format!("{} needs exactly one of public_key or public_key_file", at("kid")),
                    ))
                }
            };
            out.push(match &k.audience {
                Some(aud) => key.with_audience(aud.clone()),
                None => key,
            });
        }
        Ok(out)
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        let (n, w, r) = (c.replicas, c.w(), c.r());
        if n == 0 {
            return Err(ConfigError::invalid("cluster.replicas", "cluster.replicas = 0 must be at least 1"));
        }
        if w == 0 || w > n {
            let problem = if w == 0 {
                "must be at least 1".to_string()
            } else {
                format!("exceeds cluster.replicas = {n}")
            };
            return Err(ConfigError::invalid(
                "cluster.write_quorum",
                format!("cluster.write_quorum = {w} {problem}"),
            ));
        }
        if r == 0 || r > n {
            let problem = if r == 0 {
                "must be at least 1".to_string()
            } else {
                format!("exceeds cluster.replicas = {n}")
            };
            return Err(ConfigError::invalid(
                "cluster.read_quorum",
                format!("cluster.read_quorum = {r} {problem}"),
            ));
        }
        if c.vnodes == 0 || c.vnodes > 4096 {
            return Err(ConfigError::invalid(
                "cluster.vnodes",
                format!("cluster.vnodes = {} must be between 1 and 4096", c.vnodes),
            ));
        }
        if c.nodes.is_empty() {
            return Err(ConfigError::invalid(
                "cluster.nodes",
                "cluster.nodes is empty: add one [[cluster.nodes]] per node, this node included",
            ));
        }
        let mut ids = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, node) in c.nodes.iter().enumerate() {
            if node.id.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("cluster.nodes[{i}].id"),
                    format!("cluster.nodes[{i}].id must not be empty"),
                ));
            }
            if !ids.insert(node.id.as_str()) {
                return Err(ConfigError::invalid(
                    format!("cluster.nodes[{i}].id"),
                    format!("cluster.nodes[{i}].id = {:?} appears twice", node.id),
                ));
            }
            check_host_port(&format!("cluster.nodes[{i}].addr"), &node.addr)?;
            if !addrs.insert(node.addr.as_str()) {
                return Err(ConfigError::invalid(
                    format!("cluster.nodes[{i}].addr"),
                    format!("cluster.nodes[{i}].addr = {:?} is used by another node", node.addr),
                ));
            }
            if node.weight == 0 || node.weight > 1000 {
                return Err(ConfigError::invalid(
                    format!("cluster.nodes[{i}].weight"),
                    format!("cluster.nodes[{i}].weight = {} must be between 1 and 1000", node.weight),
                ));
            }
        }
        if n > c.nodes.len() {
            return Err(ConfigError::invalid(
                "cluster.replicas",
                format!("cluster.replicas = {n} exceeds the number of cluster.nodes = {}", c.nodes.len()),
            ));
        }
        if !ids.contains(self.node_id.as_str()) {
            return Err(ConfigError::invalid(
                "node_id",
                format!(
                    "node_id = {:?} is not listed in cluster.nodes (ids: {})",
                    self.node_id,
                    c.nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let at_least_one = |field: &str, v: u64| {
            if v == 0 {
                Err(ConfigError::invalid(
                    format!("limits.{field}"),
                    format!("limits.{field} = 0 must be at least 1"),
                ))
            } else {
                Ok(())
            }
        };
        at_least_one("max_connections", l.max_connections as u64)?;
        at_least_one("send_queue", l.send_queue as u64)?;
        at_least_one("rate_limit_msgs_per_sec", u64::from(l.rate_limit_msgs_per_sec))?;
        at_least_one("rate_limit_burst", u64::from(l.rate_limit_burst))?;
        at_least_one("ping_interval_secs", l.ping_interval_secs)?;
        at_least_one("doc_cache_capacity", l.doc_cache_capacity as u64)?;
        at_least_one("head_timeout_ms", l.head_timeout_ms)?;
        at_least_one("hello_timeout_ms", l.hello_timeout_ms)?;
        at_least_one("max_connections_per_ip", l.max_connections_per_ip as u64)?;
        at_least_one("max_pending_handshakes", l.max_pending_handshakes as u64)?;
        at_least_one("max_doc_bytes", l.max_doc_bytes as u64)?;
        at_least_one("max_set_elements", l.max_set_elements as u64)?;
        at_least_one("max_value_bytes", l.max_value_bytes as u64)?;
        at_least_one("max_doc_id_bytes", l.max_doc_id_bytes as u64)?;
        let max_id = concord_core::sync::msg::MAX_DOC_ID;
        if l.max_doc_id_bytes > max_id {
            return Err(ConfigError::invalid(
                "limits.max_doc_id_bytes",
                format!("limits.max_doc_id_bytes = {} exceeds the protocol's {max_id}", l.max_doc_id_bytes),
            ));
        }
        if !(MAX_FRAME_BYTES_FLOOR..=MAX_FRAME_BYTES_CEILING).contains(&l.max_frame_bytes) {
            return Err(ConfigError::invalid(
                "limits.max_frame_bytes",
                format!(
                    "limits.max_frame_bytes = {} must be between {MAX_FRAME_BYTES_FLOOR} and \
                     {MAX_FRAME_BYTES_CEILING}",
                    l.max_frame_bytes
                ),
            ));
        }
        if l.idle_timeout_secs <= l.ping_interval_secs {
            return Err(ConfigError::invalid(
                "limits.idle_timeout_secs",
                format!(
                    "limits.idle_timeout_secs = {} must exceed limits.ping_interval_secs = {}",
                    l.idle_timeout_secs, l.ping_interval_secs
                ),
            ));
        }
        Ok(())
    }

    /// Non-fatal remarks worth logging at start-up (e.g. a short auth secret).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.auth_secret {
            None => out.push(
                "no auth_secret configured: the relay is OPEN, anyone who can reach it can read \
                 and write every document"
                    .to_string(),
            ),
            Some(s) if s.len() < 16 => {
                out.push(format!("auth_secret is only {} bytes; use at least 32 random bytes", s.len()))
            }
            Some(_) => {}
        }
        let admin_host = self.admin_listen.rsplit_once(':').map_or("", |(h, _)| h);
        let loopback = admin_host == "localhost"
            || admin_host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            out.push(format!(
                "admin_listen = {:?} is not a loopback address: /metrics and /cluster are served there \
                 without credentials to anyone who can reach it",
                self.admin_listen
            ));
        }
        out
    }
}

/// Accepts `host:port` and `[v6]:port` with a numeric port and a non-empty host. No DNS
/// lookup: other nodes' names need not resolve when this one starts.
fn check_host_port(field: &str, value: &str) -> Result<(), ConfigError> {
    let bad = || {
        ConfigError::invalid(field, format!("{field} = {value:?} is not host:port (e.g. \"127.0.0.1:7701\")"))
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    port.parse::<u16>().map_err(|_| bad())?;
    Ok(())
}

/// Turns a toml error (multi-line, with a snippet) into one line with the position and,
/// when it can be found, the dotted key path at that position.
fn parse_error(text: &str, err: &toml::de::Error) -> ConfigError {
    let message = err.message().replace('\n', " ").trim().to_string();
    let location = match err.span() {
        Some(span) if !text.is_empty() => {
            let start = span.start.min(text.len());
            let line = text[..start].matches('\n').count() + 1;
            let col = start - text[..start].rfind('\n').map_or(0, |i| i + 1) + 1;
            match key_path_at(text, line) {
                Some(key) => format!("line {line}, column {col}: {key}: "),
                None => format!("line {line}, column {col}: "),
            }
        }
        _ => String::new(),
    };
    ConfigError::Parse { location, message }
}

/// Best effort: the dotted path of `key = value` on `line` (1-based), prefixed by the
/// closest table header above it.
fn key_path_at(text: &str, line: usize) -> Option<String> {
    let mut table = String::new();
    let mut key = None;
    for (i, l) in text.lines().enumerate().take(line) {
        let l = l.trim();
        if let Some(header) = l.strip_prefix('[') {
            let header = header.trim_start_matches('[');
            let header = header.split(']').next().unwrap_or("").trim();
            table = header.to_string();
            if i + 1 == line {
                return Some(table);
            }
        } else if i + 1 == line {
            key = l.split('=').next().map(|k| k.trim().to_string());
        }
    }
    let key = key.filter(|k| !k.is_empty() && !k.starts_with('#'))?;
    Some(if table.is_empty() { key } else { format!("{table}.{key}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
node_id = "a"
listen = "127.0.0.1:7701"
data_dir = "data/a"
"#;

    const CLUSTER: &str = r#"
node_id = "a"
listen = "127.0.0.1:7701"
data_dir = "data/a"

[cluster]
replicas = 3
write_quorum = 2
read_quorum = 2
vnodes = 64

[[cluster.nodes]]
id = "a"
addr = "127.0.0.1:7701"
weight = 1

[[cluster.nodes]]
id = "b"
addr = "127.0.0.1:7702"

[[cluster.nodes]]
id = "c"
addr = "127.0.0.1:7703"
weight = 2
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, &Overrides::default())
    }

    fn invalid(text: &str) -> (String, String) {
        match parse(text) {
            Err(ConfigError::Invalid { field, message }) => (field, message),
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn single_node_without_cluster_runs_alone() {
        let cfg = parse(BASE).unwrap();
        assert!(cfg.standalone);
        assert_eq!((cfg.cluster.replicas, cfg.cluster.w(), cfg.cluster.r()), (1, 1, 1));
        assert_eq!(cfg.cluster.nodes.len(), 1);
        assert_eq!(cfg.cluster.nodes[0].id, "a");
        assert_eq!(cfg.limits, Limits::default());
        assert_eq!(cfg.limits.max_frame_bytes, 256 * 1024);
    }

    #[test]
    fn the_design_example_cluster_parses() {
        let cfg = parse(CLUSTER).unwrap();
        assert!(!cfg.standalone);
        assert_eq!(cfg.cluster.replicas, 3);
        assert_eq!(cfg.cluster.w(), 2);
        assert_eq!(cfg.cluster.r(), 2);
        assert_eq!(cfg.cluster.nodes[1].weight, 1, "weight defaults to 1");
        assert_eq!(cfg.cluster.nodes[2].weight, 2);
    }

    #[test]
    fn quorums_default_to_a_majority() {
        let text = CLUSTER.replace("write_quorum = 2\n", "").replace("read_quorum = 2\n", "");
        let cfg = parse(&text).unwrap();
        assert_eq!((cfg.cluster.w(), cfg.cluster.r()), (2, 2));
    }

    #[test]
    fn flags_override_the_file() {
        let o = Overrides {
            listen: Some("127.0.0.1:0".into()),
            admin_listen: Some("127.0.0.1:9".into()),
            data_dir: Some("/tmp/x".into()),
            node_id: Some("b".into()),
        };
        let cfg = Config::from_toml_str(CLUSTER, &o).unwrap();
        assert_eq!(cfg.node_id, "b");
        assert_eq!(cfg.listen, "127.0.0.1:0");
        assert_eq!(cfg.admin_listen, "127.0.0.1:9");
        assert_eq!(cfg.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn no_file_means_defaults() {
        let cfg = Config::from_overrides(&Overrides::default()).unwrap();
        assert_eq!(cfg.node_id, DEFAULT_NODE_ID);
        assert_eq!(cfg.listen, DEFAULT_LISTEN);
        assert_eq!(cfg.admin_listen, DEFAULT_ADMIN_LISTEN);
        assert!(cfg.warnings().iter().all(|w| !w.contains("admin_listen")));
        assert_eq!(cfg.data_dir, PathBuf::from("data/local"));
    }

    #[test]
    fn write_quorum_above_replicas_is_named() {
        let (field, msg) = invalid(&CLUSTER.replace("write_quorum = 2", "write_quorum = 4"));
        assert_eq!(field, "cluster.write_quorum");
        assert_eq!(msg, "cluster.write_quorum = 4 exceeds cluster.replicas = 3");
    }

    #[test]
    fn read_quorum_above_replicas_is_named() {
        let (field, msg) = invalid(&CLUSTER.replace("read_quorum = 2", "read_quorum = 5"));
        assert_eq!(field, "cluster.read_quorum");
        assert_eq!(msg, "cluster.read_quorum = 5 exceeds cluster.replicas = 3");
    }

    #[test]
    fn zero_quorum_is_rejected() {
        let (field, _) = invalid(&CLUSTER.replace("write_quorum = 2", "write_quorum = 0"));
        assert_eq!(field, "cluster.write_quorum");
        let (field, _) = invalid(&CLUSTER.replace("replicas = 3", "replicas = 0"));
        assert_eq!(field, "cluster.replicas");
    }

    #[test]
    fn more_replicas_than_nodes_is_rejected() {
        let text =
            CLUSTER.replace("replicas = 3", "replicas = 4").replace("write_quorum = 2", "write_quorum = 3");
        let (field, msg) = invalid(&text);
        assert_eq!(field, "cluster.replicas");
        assert_eq!(msg, "cluster.replicas = 4 exceeds the number of cluster.nodes = 3");
    }

    #[test]
    fn this_node_must_be_listed() {
        let (field, msg) = invalid(&CLUSTER.replace("node_id = \"a\"", "node_id = \"z\""));
        assert_eq!(field, "node_id");
        assert!(msg.starts_with("node_id = \"z\" is not listed in cluster.nodes"));
    }

    #[test]
    fn duplicate_node_ids_are_rejected() {
        let (field, msg) = invalid(&CLUSTER.replace("id = \"c\"", "id = \"b\""));
        assert_eq!(field, "cluster.nodes[2].id");
        assert!(msg.contains("appears twice"), "{msg}");
    }

    #[test]
    fn duplicate_node_addrs_are_rejected() {
        let (field, _) = invalid(&CLUSTER.replace("127.0.0.1:7703", "127.0.0.1:7702"));
        assert_eq!(field, "cluster.nodes[2].addr");
    }

    #[test]
    fn empty_node_list_is_rejected() {
        let text = "node_id = \"a\"\n[cluster]\nreplicas = 1\n";
        let (field, _) = invalid(text);
        assert_eq!(field, "cluster.nodes");
    }

    #[test]
    fn zero_weight_is_rejected() {
        let (field, _) = invalid(&CLUSTER.replace("weight = 2", "weight = 0"));
        assert_eq!(field, "cluster.nodes[2].weight");
    }

    #[test]
    fn zero_vnodes_is_rejected() {
        let (field, _) = invalid(&CLUSTER.replace("vnodes = 64", "vnodes = 0"));
        assert_eq!(field, "cluster.vnodes");
    }

    #[test]
    fn bad_listen_address_is_named() {
        let (field, msg) = invalid(&BASE.replace("127.0.0.1:7701", "localhost"));
        assert_eq!(field, "listen");
        assert!(msg.starts_with("listen = \"localhost\" is not host:port"));
        let (field, _) = invalid(&CLUSTER.replace("127.0.0.1:7702", "127.0.0.1:99999"));
        assert_eq!(field, "cluster.nodes[1].addr");
    }

    #[test]
    fn empty_node_id_and_secret_are_rejected() {
        assert_eq!(invalid(&BASE.replace("node_id = \"a\"", "node_id = \"\"")).0, "node_id");
        assert_eq!(invalid(&format!("{BASE}auth_secret = \"\"\n")).0, "auth_secret");
    }

    #[test]
    fn missing_web_root_is_rejected() {
        let (field, _) = invalid(&format!("{BASE}web_root = \"/definitely/not/here\"\n"));
        assert_eq!(field, "web_root");
    }

    #[test]
    fn limits_are_validated() {
        let (field, msg) =
            invalid(&format!("{BASE}[limits]\nping_interval_secs = 30\nidle_timeout_secs = 30\n"));
        assert_eq!(field, "limits.idle_timeout_secs");
        assert_eq!(msg, "limits.idle_timeout_secs = 30 must exceed limits.ping_interval_secs = 30");
        let (field, _) = invalid(&format!("{BASE}[limits]\nsend_queue = 0\n"));
        assert_eq!(field, "limits.send_queue");
        let (field, _) = invalid(&format!("{BASE}[limits]\nmax_frame_bytes = 10\n"));
        assert_eq!(field, "limits.max_frame_bytes");
        let (field, _) = invalid(&format!("{BASE}[limits]\nmax_connections = 0\n"));
        assert_eq!(field, "limits.max_connections");
    }

    #[test]
    fn partial_limits_keep_the_other_defaults() {
        let cfg = parse(&format!("{BASE}[limits]\nsend_queue = 8\n")).unwrap();
        assert_eq!(cfg.limits.send_queue, 8);
        assert_eq!(cfg.limits.ping_interval_secs, 20);
        assert_eq!(cfg.limits.idle_timeout_secs, 40);
    }

    #[test]
    fn unknown_fields_are_errors_on_one_line() {
        let err = parse(&format!("{BASE}colour = \"blue\"\n")).unwrap_err();
        let line = err.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("unknown field `colour`"), "{line}");
        assert!(line.contains("colour: "), "{line}");

        let err = parse(&CLUSTER.replace("vnodes = 64", "vnodes = 64\nshards = 2")).unwrap_err();
        let line = err.to_string();
        assert!(line.contains("unknown field `shards`"), "{line}");
        assert!(line.contains("cluster.shards"), "{line}");

        let err = parse(&format!("{BASE}[limits]\nmax_conns = 3\n")).unwrap_err();
        assert!(err.to_string().contains("unknown field `max_conns`"));
    }

    #[test]
    fn wrong_types_name_the_key() {
        let err = parse(&CLUSTER.replace("replicas = 3", "replicas = \"three\"")).unwrap_err();
        let line = err.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("cluster.replicas"), "{line}");
    }

    #[test]
    fn invalid_toml_is_a_parse_error() {
        let err = parse("node_id = ").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let err = Config::load(Path::new("/no/such/relay.toml"), &Overrides::default());
        assert!(matches!(err, Err(ConfigError::Read { .. })));
    }

    #[test]
    fn open_relay_is_warned_about() {
        let cfg = parse(BASE).unwrap();
        assert!(cfg.warnings()[0].contains("OPEN"));
        let cfg = parse(&format!("{BASE}auth_secret = \"0123456789abcdef0123456789abcdef\"\n")).unwrap();
        assert!(cfg.warnings().is_empty());
    }

    #[test]
    fn auth_keys_are_checked_and_errors_name_the_field() {
        let pem = include_str!("../tests/fixtures/es256-a.pub.pem");
        let secret = "auth_secret = \"0123456789abcdef0123456789abcdef\"\n";
        let ok = format!("{BASE}{secret}[[auth.keys]]\nkid = \"idp-1\"\nalg = \"ES256\"\npublic_key = \"\"\"\n{pem}\"\"\"\n");
        let cfg = parse(&ok).unwrap();
        assert_eq!(cfg.verify_keys().unwrap()[0].kid(), "idp-1");
        let key = |body: &str| format!("{BASE}{secret}[[auth.keys]]\n{body}\n");
        assert_eq!(
            invalid(&format!(
                "{BASE}[[auth.keys]]\nkid = \"k\"\nalg = \"HS256\"\nsecret = \"0123456789abcdef\"\n"
            ))
            .0,
            "auth.keys"
        );
        assert_eq!(invalid(&key("kid = \"k\"\nalg = \"RS256\"\nsecret = \"x\"")).0, "auth.keys[0].alg");
        assert_eq!(
            invalid(&key("kid = \"\"\nalg = \"HS256\"\nsecret = \"0123456789abcdef\"")).0,
            "auth.keys[0].kid"
        );
        assert_eq!(
            invalid(&key("kid = \"k\"\nalg = \"ES256\"\nsecret = \"0123456789abcdef\"")).0,
            "auth.keys[0].secret"
        );
        assert_eq!(invalid(&key("kid = \"k\"\nalg = \"ES256\"")).0, "auth.keys[0].public_key");
        assert_eq!(
            invalid(&key("kid = \"k\"\nalg = \"EdDSA\"\npublic_key = \"garbage\"")).0,
            "auth.keys[0].public_key"
        );
        assert_eq!(
            invalid(&key("kid = \"k\"\nalg = \"ES256\"\npublic_key_file = \"/nonexistent/k.pem\"")).0,
            "auth.keys[0].public_key_file"
        );
        let twice = format!(
            "{}[[auth.keys]]\nkid = \"k\"\nalg = \"HS256\"\nsecret = \"0123456789abcdef\"\n",
            key("kid = \"k\"\nalg = \"HS256\"\nsecret = \"0123456789abcdef\"")
        );
        assert_eq!(invalid(&twice).0, "auth.keys[1].kid");
        assert!(matches!(
            parse(&key("kid = \"k\"\nalg = \"HS256\"\nsecrett = \"x\"")),
            Err(ConfigError::Parse { .. })
        ));
        assert!(!format!(
            "{:?}",
            parse(&key("kid = \"k\"\nalg = \"HS256\"\nsecret = \"0123456789abcdef-hidden\"")).unwrap().auth
        )
        .contains("hidden"));
    }

    #[test]
    fn admin_listen_is_parsed_strictly() {
        let cfg = parse(&format!("admin_listen = \"127.0.0.1:7801\"\n{BASE}")).unwrap();
        assert_eq!(cfg.admin_listen, "127.0.0.1:7801");
        let (field, _) = invalid(&format!("admin_listen = \"nope\"\n{BASE}"));
        assert_eq!(field, "admin_listen");
        assert!(parse(&format!("admin_listen = 7801\n{BASE}")).is_err());
        let public = parse(&format!("admin_listen = \"0.0.0.0:7801\"\n{BASE}")).unwrap();
        assert!(public.warnings().iter().any(|w| w.contains("admin_listen")));
    }

    #[test]
    fn connection_limits_have_defaults_and_must_be_positive() {
        let l = Limits::default();
        assert_eq!((l.head_timeout_ms, l.hello_timeout_ms), (2000, 5000));
        assert_eq!((l.max_connections_per_ip, l.max_pending_handshakes), (64, 256));
        let cfg = parse(&format!("{BASE}[limits]\nmax_connections_per_ip = 100000\nhead_timeout_ms = 500\n"))
            .unwrap();
        assert_eq!(cfg.limits.max_connections_per_ip, 100_000);
        assert_eq!(cfg.limits.head_timeout(), Duration::from_millis(500));
        for field in
            ["head_timeout_ms", "hello_timeout_ms", "max_connections_per_ip", "max_pending_handshakes"]
        {
            let (f, _) = invalid(&format!("{BASE}[limits]\n{field} = 0\n"));
            assert_eq!(f, format!("limits.{field}"));
        }
    }
}
