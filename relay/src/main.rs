//! `concord-relay`: parses flags, sets up logging and signals, runs the server.
//!
//! ```text
//! concord-relay [--config FILE] [--listen ADDR] [--admin-listen ADDR] [--data-dir DIR]
//!               [--node-id ID] [--log-json]
//! concord-relay token (--secret S | --config FILE) --doc PATTERN [--write] [--kid K] --ttl 1h
//! concord-relay token (--secret S | --config FILE) --admin --ttl 1h
//! ```

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use concord_relay::auth::{self, Access, Claims};
use concord_relay::config::{Config, Overrides};
use concord_relay::Relay;
use tokio::net::TcpListener;

const USAGE: &str = "\
usage:
  concord-relay [--config FILE] [--listen ADDR] [--admin-listen ADDR] [--data-dir DIR]
                [--node-id ID] [--log-json]
  concord-relay token (--secret S | --config FILE) --doc PATTERN [--write] [--kid K] --ttl TTL
  concord-relay token (--secret S | --config FILE) --admin --ttl TTL

  --config FILE   relay config (TOML, see DESIGN.md); without it: a standalone node
  --listen ADDR   override `listen` (e.g. 127.0.0.1:0 for any free port)
  --admin-listen ADDR
                  override `admin_listen`: /metrics, /cluster*, /healthz without
                  credentials (default 127.0.0.1:0, printed at start-up)
  --data-dir DIR  override `data_dir`
  --node-id ID    override `node_id`
  --log-json      log JSON lines instead of human-readable text (RUST_LOG filters)

  token: print a signed token (an HS256 JWT) as the last word of stdout
  --doc PATTERN   a document id, or a prefix ending in `*` (e.g. 'board-*')
  --write         grant read-write (default: read-only)
  --kid K         sign for the HS256 key K of [[auth.keys]] (its secret: --secret, or
                  looked up in --config) instead of auth_secret
  --admin         an admin credential (for the admin HTTP routes) instead of a client token
  --ttl TTL       lifetime: a number with unit s, m, h or d (e.g. 1h)";

#[derive(Debug, Default)]
struct ServeArgs {
    config: Option<PathBuf>,
    overrides: Overrides,
    log_json: bool,
}

#[derive(Debug, Default)]
struct TokenArgs {
    secret: Option<String>,
    config: Option<PathBuf>,
    doc: Option<String>,
    write: bool,
    kid: Option<String>,
    admin: bool,
    ttl: Option<String>,
}

#[derive(Debug)]
enum Command {
    Serve(ServeArgs),
    Token(TokenArgs),
    Help,
    Version,
}

fn main() -> ExitCode {
    // Maps in the core are keyed by remote input (document keys, set elements): seed their
    // hasher before any is built, so nobody can predict collisions.
    concord_core::hash::set_map_seed(concord_relay::node::random_u64() | 1);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("usage error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("concord-relay {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Token(t) => match token(t) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Serve(s) => serve(s),
    }
}

/// Hand-rolled flag parsing (no clap: the relay builds lean). Accepts `--flag value`
/// and `--flag=value`.
fn parse_args(args: &[String]) -> Result<Command, String> {
    let mut it = args.iter().peekable();
    let is_token = it.peek().map(|a| a.as_str()) == Some("token");
    if is_token {
        it.next();
    }
    let mut serve = ServeArgs::default();
    let mut tok = TokenArgs::default();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline.clone().or_else(|| it.next().cloned()).ok_or_else(|| format!("{name} needs a value"))
        };
        match (is_token, flag) {
            (_, "-h" | "--help") => return Ok(Command::Help),
            (_, "-V" | "--version") => return Ok(Command::Version),
            (false, "--config") => serve.config = Some(value(flag)?.into()),
            (false, "--listen") => serve.overrides.listen = Some(value(flag)?),
            (false, "--admin-listen") => serve.overrides.admin_listen = Some(value(flag)?),
            (false, "--data-dir") => serve.overrides.data_dir = Some(value(flag)?.into()),
            (false, "--node-id") => serve.overrides.node_id = Some(value(flag)?),
            (false, "--log-json") => serve.log_json = true,
            (true, "--secret") => tok.secret = Some(value(flag)?),
            (true, "--config") => tok.config = Some(value(flag)?.into()),
            (true, "--doc") => tok.doc = Some(value(flag)?),
            (true, "--write") => tok.write = true,
            (true, "--kid") => tok.kid = Some(value(flag)?),
            (true, "--admin") => tok.admin = true,
            (true, "--ttl") => tok.ttl = Some(value(flag)?),
            (_, other) => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(if is_token { Command::Token(tok) } else { Command::Serve(serve) })
}

/// Parses `90`, `90s`, `15m`, `1h`, `7d` into seconds.
fn parse_ttl(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 =
        digits.parse().map_err(|_| format!("--ttl {text:?}: expected a number with unit s, m, h or d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("--ttl {text:?}: unknown unit {unit:?}; use s, m, h or d")),
    };
    match n.checked_mul(mult) {
        Some(0) => Err("--ttl must be positive".to_string()),
        Some(secs) => Ok(secs),
        None => Err(format!("--ttl {text:?} is too large")),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn token(t: TokenArgs) -> anyhow::Result<String> {
    let config = match &t.config {
        Some(path) => Some(
            Config::load(path, &Overrides::default()).map_err(|e| anyhow::anyhow!("config error: {e}"))?,
        ),
        None => None,
    };
    let secret = match (t.secret, &config, &t.kid) {
        (Some(s), _, _) => s,
        (None, Some(config), Some(kid)) => {
            let key = config
                .auth
                .keys
                .iter()
                .find(|k| &k.kid == kid)
                .with_context(|| format!("the config has no [[auth.keys]] with kid = {kid:?}"))?;
            key.secret.clone().with_context(|| {
                format!("key {kid:?} is {}: the relay only has its public key; tokens for it come from its issuer", key.alg)
            })?
        }
        (None, Some(config), None) => config.auth_secret.clone().context("the config has no auth_secret")?,
        (None, None, _) => anyhow::bail!("token needs --secret S or --config FILE"),
    };
    anyhow::ensure!(!secret.is_empty(), "--secret must not be empty");
    let ttl = parse_ttl(&t.ttl.context("token needs --ttl (e.g. 1h)")?).map_err(anyhow::Error::msg)?;
    let now = unix_now();
    if t.admin {
        anyhow::ensure!(t.doc.is_none() && !t.write, "--admin takes no --doc nor --write");
        anyhow::ensure!(
            t.kid.is_none(),
            "--admin takes no --kid: admin credentials are keyed by auth_secret"
        );
        return Ok(auth::Keyring::new(secret.as_bytes(), Vec::new()).admin_credential(now, ttl)?);
    }
    let doc = t.doc.context("token needs --doc PATTERN (e.g. 'board-*')")?;
    let access = if t.write { Access::ReadWrite } else { Access::Read };
    let mut claims = Claims::new(doc, access, now.saturating_add(ttl))?;
    claims.issued_at = Some(now);
    Ok(match &t.kid {
        Some(kid) => auth::sign_with_kid(secret.as_bytes(), kid, &claims)?,
        None => auth::sign(secret.as_bytes(), &claims)?,
    })
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    init_logging(args.log_json);
    let loaded = match &args.config {
        Some(path) => Config::load(path, &args.overrides),
        None => Config::from_overrides(&args.overrides),
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("config error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    if config.auth_secret.is_none() {
        eprintln!("WARNING: concord-relay is running WITHOUT AUTH (no auth_secret in the config)");
    }
    // The store first: a data dir another process holds fails before any address is
    // printed.
    let relay = Relay::open(config.clone()).await?;
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let admin_listener = TcpListener::bind(&config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin_listen)", config.admin_listen))?;
    let admin_addr = admin_listener.local_addr()?;
    let shutdown = shutdown_signal();
    tracing::info!(
        node_id = %config.node_id,
        %addr,
        %admin_addr,
        data_dir = %config.data_dir.display(),
        replicas = config.cluster.replicas,
        nodes = config.cluster.nodes.len(),
        "listening"
    );
    // Supervisors read the first line for the public address; the admin one follows.
    println!("listening on {addr}");
    println!("admin listening on {admin_addr}");
    std::io::stdout().flush()?;
    relay.run(listener, admin_listener, shutdown).await;
    Ok(())
}

/// Starts listening for SIGINT (Ctrl-C) and SIGTERM at once — before the address is
/// printed, so a supervisor that signals as soon as it reads it is never missed — and
/// returns a future that resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        async fn recv(s: Option<Signal>) {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        let int = signal(SignalKind::interrupt()).ok();
        let term = signal(SignalKind::terminate()).ok();
        async move {
            tokio::select! {
                _ = recv(int) => tracing::info!("SIGINT received"),
                _ = recv(term) => tracing::info!("SIGTERM received"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("Ctrl-C received");
        } else {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn serve_flags_parse() {
        let Command::Serve(s) =
            parse_args(&args(
                "--config c.toml --listen=127.0.0.1:0 --admin-listen 127.0.0.1:9 --data-dir d --node-id b --log-json",
            ))
            .unwrap()
        else {
            panic!("expected serve")
        };
        assert_eq!(s.config, Some(PathBuf::from("c.toml")));
        assert_eq!(s.overrides.listen.as_deref(), Some("127.0.0.1:0"));
        assert_eq!(s.overrides.admin_listen.as_deref(), Some("127.0.0.1:9"));
        assert_eq!(s.overrides.data_dir, Some(PathBuf::from("d")));
        assert_eq!(s.overrides.node_id.as_deref(), Some("b"));
        assert!(s.log_json);
    }

    #[test]
    fn token_flags_parse() {
        let Command::Token(t) = parse_args(&args("token --secret s --doc board-* --write --ttl 1h")).unwrap()
        else {
            panic!("expected token")
        };
        assert_eq!(t.doc.as_deref(), Some("board-*"));
        assert!(t.write);
        let token = token(t).unwrap();
        let claims = auth::verify(b"s", &token, unix_now()).unwrap();
        assert_eq!(claims.access, Access::ReadWrite);
        assert!(claims.expires_at > unix_now() + 3500);
    }

    #[test]
    fn an_admin_credential_is_minted_for_the_admin_key_only() {
        let Command::Token(t) = parse_args(&args("token --secret s --admin --ttl 10m")).unwrap() else {
            panic!("expected token")
        };
        let credential = token(t).unwrap();
        let keys = auth::Keyring::new(b"s", Vec::new());
        assert!(keys.verify_admin(&credential, unix_now()).is_ok());
        assert!(keys.verify_client(&credential, unix_now()).is_err());
        let Command::Token(t) = parse_args(&args("token --secret s --admin --doc x --ttl 10m")).unwrap()
        else {
            panic!("expected token")
        };
        assert!(token(t).is_err());
    }

    #[test]
    fn a_token_for_a_kid_is_checked_by_that_key() {
        let Command::Token(t) =
            parse_args(&args("token --secret rotated-secret-0001 --kid hs-2 --doc d --ttl 1h")).unwrap()
        else {
            panic!("expected token")
        };
        let token = token(t).unwrap();
        let key = auth::VerifyKey::hs256("hs-2", b"rotated-secret-0001").unwrap();
        let keys = auth::Keyring::new(b"s", vec![key]);
        assert_eq!(keys.verify_client(&token, unix_now()).unwrap().pattern, "d");
        assert!(auth::verify(b"s", &token, unix_now()).is_err());
    }

    #[test]
    fn bad_arguments_are_reported() {
        assert!(parse_args(&args("--bogus")).is_err());
        assert!(parse_args(&args("--listen")).is_err());
        assert!(parse_args(&args("token --listen x")).is_err());
    }

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("15m"), Ok(900));
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("7d"), Ok(604_800));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("0s").is_err());
    }
}
