//! The `concord-relay` binary as a real process: flags, config errors, start-up line,
//! SIGTERM, the token subcommand.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_concord-relay");

fn temp_dir(tag: &str) -> PathBuf {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    let dir = std::env::temp_dir().join(format!("concord-bin-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_bad_config_exits_non_zero_with_one_clear_line() {
    let dir = temp_dir("badcfg");
    let cfg = dir.join("relay.toml");
    std::fs::write(
        &cfg,
        r#"
node_id = "a"
listen = "127.0.0.1:0"
data_dir = "data/a"

[cluster]
replicas = 3
write_quorum = 4
read_quorum = 2

[[cluster.nodes]]
id = "a"
addr = "127.0.0.1:7701"
[[cluster.nodes]]
id = "b"
addr = "127.0.0.1:7702"
[[cluster.nodes]]
id = "c"
addr = "127.0.0.1:7703"
"#,
    )
    .unwrap();
    let out = Command::new(BIN).arg("--config").arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr, "config error: cluster.write_quorum = 4 exceeds cluster.replicas = 3\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unknown_flags_are_usage_errors() {
    let out = Command::new(BIN).arg("--frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("usage error: unknown argument `--frobnicate`"));
}

#[test]
fn the_relay_prints_its_address_serves_health_and_stops_on_sigterm() {
    let dir = temp_dir("run");
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--node-id", "bin-test", "--data-dir"])
        .arg(dir.join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{addr}");

    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.contains("\"node_id\":\"bin-test\""), "{response}");

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "relay did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(stderr.contains("WITHOUT AUTH"), "an open relay says so:\n{stderr}");
    assert!(dir.join("data").join("concord.redb").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_token_subcommand_prints_a_verifiable_token() {
    let out = Command::new(BIN)
        .args(["token", "--secret", "s3cret", "--doc", "board-*", "--write", "--ttl", "1h"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = concord_relay::auth::authorize(
        b"s3cret",
        token.trim(),
        "board-9",
        concord_relay::auth::Access::ReadWrite,
        now,
    )
    .unwrap();
    assert!(claims.expires_at >= now + 3599 && claims.expires_at <= now + 3601);

    let out = Command::new(BIN)
        .args(["token", "--secret", "s3cret", "--doc", "x", "--ttl", "1y"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"));
}
