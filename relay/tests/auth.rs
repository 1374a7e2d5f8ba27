//! Credentials against the real binary: no client credential, however wrapped, becomes a
//! peer link (which would grant read-write on every document), and no refused credential
//! writes anything.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{free_port, tempdir, Client, Relay};
use concord_core::sync::ErrorCode;
use concord_relay::auth::{self, derive_key, Access, Claims, Keyring, PEER_KEY_LABEL};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const T: Duration = Duration::from_secs(15);
const SECRET: &str = "auth-test-secret-0123456789abcdef";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn client_token(pattern: &str, access: Access) -> String {
    auth::sign(SECRET.as_bytes(), &Claims::new(pattern, access, now() + 3600).unwrap()).unwrap()
}

/// Any claims, HS256-signed with `key`.
fn hs256(key: &[u8], claims: serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(key).unwrap())
        .unwrap()
}

/// Node `a` (started) in a two-node cluster with `b` (never started), W = R = 1 so `a`
/// serves alone.
fn cluster_config(dir: &Path, secret: Option<&str>) -> PathBuf {
    let (pa, pb) = (free_port(), free_port());
    let secret = secret.map(|s| format!("auth_secret = \"{s}\"\n")).unwrap_or_default();
    let text = format!(
        "node_id = \"a\"\nlisten = \"127.0.0.1:{pa}\"\ndata_dir = \"{}\"\n{secret}\n[cluster]\nreplicas = 2\n\
         write_quorum = 1\nread_quorum = 1\n\n[[cluster.nodes]]\nid = \"a\"\naddr = \"127.0.0.1:{pa}\"\n\n\
         [[cluster.nodes]]\nid = \"b\"\naddr = \"127.0.0.1:{pb}\"\n",
        dir.join("data").display()
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn unauthorized(c: &Client) -> bool {
    c.errors.iter().any(|e| e.code == ErrorCode::UNAUTHORIZED)
}

/// The counter `n` of `doc`, read with a valid read-write token.
async fn read_counter(relay: &Relay, doc: &str) -> u64 {
    let mut r = Client::new(900);
    r.open(doc).await;
    r.connect(relay.addr, Some(client_token(doc, Access::ReadWrite))).await;
    assert!(r.pump_until(T, |c| c.synced.contains(doc)).await, "reader errors {:?}", r.errors);
    r.docs[doc].counter("n")
}

#[tokio::test]
async fn no_client_credential_however_wrapped_becomes_a_peer_or_writes_the_vault() {
    let dir = tempdir("auth-escalation");
    let cfg = cluster_config(&dir, Some(SECRET));
    let relay = Relay::start_with(&dir, &["--config", &cfg.display().to_string()], false);

    // The owner seeds the vault.
    let mut owner = Client::new(1);
    owner.open("vault").await;
    owner.connect(relay.addr, Some(client_token("vault", Access::ReadWrite))).await;
    owner.increment("vault", "n", 5).await;
    assert!(owner.pump_until(T, |c| c.all_acked("vault")).await, "owner errors {:?}", owner.errors);
    drop(owner);

    // What the attacker holds: a read-only token for a public document.
    let ro = client_token("public-1", Access::Read);
    let keys = Keyring::new(SECRET.as_bytes(), Vec::new());
    let peer_key = derive_key(SECRET.as_bytes(), PEER_KEY_LABEL);
    let exp = now() + 60;
    let client_claiming_peer =
        hs256(SECRET.as_bytes(), serde_json::json!({ "kind": "peer", "node": "b", "exp": exp }));
    let client_claiming_peer_rw = hs256(
        SECRET.as_bytes(),
        serde_json::json!({ "kind": "peer", "node": "b", "doc": "*", "access": "rw", "exp": exp }),
    );
    let peer_as_client_claims =
        hs256(&peer_key, serde_json::json!({ "kind": "client", "doc": "*", "access": "rw", "exp": exp }));
    let alg_none = format!(
        "{}.{}.",
        auth::base64url_encode(br#"{"alg":"none","typ":"JWT"}"#),
        auth::base64url_encode(format!(r#"{{"kind":"peer","node":"b","exp":{exp}}}"#).as_bytes())
    );
    let attempts: Vec<(&str, String)> = vec![
        ("peer:<anything>:<client token>", format!("peer:x:{ro}")),
        ("peer:<member>:<client token>", format!("peer:b:{ro}")),
        ("peer:<client token>", format!("peer:{ro}")),
        ("peer:<member>", "peer:b".to_string()),
        ("peer: (empty)", "peer:".to_string()),
        ("peer:<client-signed JWT claiming kind peer>", format!("peer:{client_claiming_peer}")),
        ("client-signed JWT claiming kind peer", client_claiming_peer.clone()),
        ("client-signed JWT claiming kind peer and rw *", client_claiming_peer_rw.clone()),
        ("peer:<client-signed peer claiming rw *>", format!("peer:{client_claiming_peer_rw}")),
        ("peer-key-signed client claims", peer_as_client_claims),
        ("peer:<alg none>", format!("peer:{alg_none}")),
        ("alg none", alg_none),
        (
            "peer credential for a non-member",
            format!("peer:{}", keys.peer_credential("mallory", now()).unwrap()),
        ),
        (
            "peer credential for the node itself",
            format!("peer:{}", keys.peer_credential("a", now()).unwrap()),
        ),
        ("expired peer credential", format!("peer:{}", keys.peer_credential("b", now() - 1000).unwrap())),
        ("peer credential as a client token", keys.peer_credential("b", now()).unwrap()),
        ("admin credential as a client token", keys.admin_credential(now(), 600).unwrap()),
        ("peer:<admin credential>", format!("peer:{}", keys.admin_credential(now(), 600).unwrap())),
        (
            "peer credential of another cluster",
            format!(
                "peer:{}",
                Keyring::new(b"another-cluster-secret", Vec::new()).peer_credential("b", now()).unwrap()
            ),
        ),
    ];
    for (i, (what, token)) in attempts.into_iter().enumerate() {
        let mut c = Client::new(100 + i as u64);
        c.open("vault").await;
        c.connect(relay.addr, Some(token)).await;
        c.increment("vault", "n", 1000).await;
        assert!(
            c.pump_until(T, |c| unauthorized(c) && c.closed.is_some()).await,
            "{what}: not refused; errors {:?}",
            c.errors
        );
        assert!(!c.synced.contains("vault"), "{what}: synced the vault");
    }

    // The read-only token itself, as a client: it may not even read the vault.
    let mut c = Client::new(200);
    c.open("vault").await;
    c.connect(relay.addr, Some(ro)).await;
    c.increment("vault", "n", 1000).await;
    assert!(c.pump_until(T, |c| c.errors.iter().any(|e| e.code == ErrorCode::FORBIDDEN)).await);
    c.pump_for(Duration::from_millis(300)).await;
    assert!(!c.synced.contains("vault"));

    assert_eq!(read_counter(&relay, "vault").await, 5, "the vault was written");

    // A genuine peer credential of a member is accepted (the control).
    let mut peer = Client::new(300);
    peer.open("vault").await;
    peer.connect(relay.addr, Some(format!("peer:{}", keys.peer_credential("b", now()).unwrap()))).await;
    assert!(peer.pump_until(T, |c| c.synced.contains("vault")).await, "peer errors {:?}", peer.errors);
    assert!(!unauthorized(&peer));
}

#[tokio::test]
async fn without_a_secret_a_peer_link_must_still_name_a_cluster_member() {
    let dir = tempdir("auth-open-peer");
    let cfg = cluster_config(&dir, None);
    let relay = Relay::start_with(&dir, &["--config", &cfg.display().to_string()], false);
    for token in ["peer:mallory", "peer:a", "peer:"] {
        let mut c = Client::new(1);
        c.open("vault").await;
        c.connect(relay.addr, Some(token.to_string())).await;
        assert!(c.pump_until(T, |c| unauthorized(c) && c.closed.is_some()).await, "{token}: {:?}", c.errors);
    }
    let mut member = Client::new(2);
    member.open("vault").await;
    member.connect(relay.addr, Some("peer:b".to_string())).await;
    assert!(member.pump_until(T, |c| c.synced.contains("vault")).await, "{:?}", member.errors);
}

#[tokio::test]
async fn a_token_for_a_rotated_key_works_until_the_key_is_removed() {
    let dir = tempdir("auth-rotation");
    let port = free_port();
    let write = |keys: &str| {
        let text = format!(
            "node_id = \"a\"\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nauth_secret = \"{SECRET}\"\n{keys}",
            dir.join("data").display()
        );
        let path = dir.join("relay.toml");
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let key = |kid: &str, file: &str| {
        format!(
            "\n[[auth.keys]]\nkid = \"{kid}\"\nalg = \"ES256\"\npublic_key_file = \"{}\"\n",
            fixtures.join(file).display()
        )
    };
    let sign = |kid: &str, file: &str| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.to_string());
        let pem = std::fs::read(fixtures.join(file)).unwrap();
        let claims = serde_json::json!({ "doc": "board-*", "access": "rw", "exp": now() + 600 });
        jsonwebtoken::encode(&h, &claims, &EncodingKey::from_ec_pem(&pem).unwrap()).unwrap()
    };
    let (old, new) = (sign("old", "es256-a.key.pem"), sign("new", "es256-b.key.pem"));
    let accepted = |relay: &Relay, token: String| {
        let addr = relay.addr;
        async move {
            let mut c = Client::new(7);
            c.open("board-1").await;
            c.connect(addr, Some(token)).await;
            c.pump_until(T, |c| c.synced.contains("board-1") || unauthorized(c)).await;
            c.synced.contains("board-1")
        }
    };

    let both = write(&format!("{}{}", key("old", "es256-a.pub.pem"), key("new", "es256-b.pub.pem")));
    let mut relay = Relay::start_with(&dir, &["--config", &both], false);
    assert!(accepted(&relay, old.clone()).await, "old key, both configured");
    assert!(accepted(&relay, new.clone()).await, "new key, both configured");
    relay.kill9();

    let only_new = write(&key("new", "es256-b.pub.pem"));
    let relay = Relay::start_with(&dir, &["--config", &only_new], false);
    assert!(!accepted(&relay, old).await, "the removed key's token");
    assert!(accepted(&relay, new).await, "the remaining key's token");
}
