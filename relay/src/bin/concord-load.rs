//! `concord-load`: parses flags and runs the relay load benchmark (see
//! `concord_relay::load`), or serves as its baseline broadcast server.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use concord_relay::load::scenario::{Load, Scenario};
use concord_relay::load::{self, baseline, report, Options};

const USAGE: &str = "\
usage:
  concord-load (--spawn PATH/TO/concord-relay | --url ws://HOST:PORT/sync [--relay-pid PID])
               [--scenario all|fanout|mixed|acks|idle[,...]] [--duration SECS] [--warmup SECS]
               [--clients K] [--docs M] [--rate FRAMES_PER_SEC|closed|idle] [--window N]
               [--ops counter|register|set|mix] [--batch N] [--config FILE] [--no-baseline]
               [--baseline-flush burst|each] [--baseline-ws-buffer BYTES] [--no-profile]
               [--connect-concurrency N]
               [--threads N] [--out FILE]
  concord-load baseline-server [--listen ADDR] [--flush burst|each] [--ws-buffer BYTES]

  --spawn PATH     start this relay for each scenario on 127.0.0.1:0 with a temp data dir
                   and a generated config (max_connections 20000, rate limit raised)
  --url URL        load a running relay instead; --relay-pid lets RSS and CPU be read
  --config FILE    config for spawned relays instead of the generated one
  --scenario LIST  which scenarios (default all); their defaults are the targets' setups:
                   fanout 100 clients/1 doc/1,700 writes/s; mixed 1,000 clients/500 docs/
                   2,000 writes/s; acks 500 writers closed loop; acks-batch the same with
                   8 deltas per frame; idle 10,000 connections
  --clients, --docs, --rate, --window, --ops, --batch   override the scenario defaults
  --duration SECS  measuring window per phase (default 10); --warmup SECS before it (2)
  --no-baseline    skip the baseline server phases
  --baseline-flush each   make the baseline flush after every frame, like the relay's
                   writer (default burst: one flush per burst of queued frames)
  --baseline-ws-buffer BYTES   the baseline's WebSocket buffers (default 16384, as the relay)
  --no-profile     skip the in-process handler profile after fanout
  --out FILE       also write the markdown report there

  baseline-server: the plain broadcast server the baselines are measured against";

enum Command {
    Run(Box<Options>, Option<PathBuf>, Option<usize>),
    Baseline(String, bool, usize),
    Help,
}

fn parse_args(args: &[String]) -> Result<Command, String> {
    let mut it = args.iter().peekable();
    if it.peek().map(|a| a.as_str()) == Some("baseline-server") {
        it.next();
        let mut listen = "127.0.0.1:0".to_string();
        let mut flush_each = false;
        let mut buffer = baseline::WS_BUFFER;
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--listen" => listen = it.next().ok_or("--listen needs a value")?.clone(),
                "--flush" => match it.next().map(String::as_str) {
                    Some("each") => flush_each = true,
                    Some("burst") => flush_each = false,
                    _ => return Err("--flush needs `each` or `burst`".into()),
                },
                "--ws-buffer" => {
                    let v = it.next().ok_or("--ws-buffer needs a value")?;
                    buffer = v.parse().map_err(|_| format!("--ws-buffer {v:?}: expected bytes"))?;
                }
                a if a.starts_with("--listen=") => listen = a["--listen=".len()..].to_string(),
                "-h" | "--help" => return Ok(Command::Help),
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        return Ok(Command::Baseline(listen, flush_each, buffer));
    }
    let direct =
        std::iter::once("concord-load".to_string()).chain(args.iter().cloned()).collect::<Vec<_>>().join(" ");
    let command = match std::env::var("CONCORD_LOAD_VIA") {
        Ok(via) => format!("{}\n# which ran:\n# {direct}", via.trim()),
        Err(_) => direct,
    };
    let mut o = Options { command, ..Options::default() };
    let mut out = None;
    let mut threads = None;
    let mut rate: Option<String> = None;
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || -> Result<String, String> {
            inline.clone().or_else(|| it.next().cloned()).ok_or_else(|| format!("{flag} needs a value"))
        };
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
            v.parse().map_err(|_| format!("{flag} {v:?}: expected a number"))
        }
        fn secs(flag: &str, v: String) -> Result<Duration, String> {
            let s: f64 = num(flag, v)?;
            if s.is_finite() && s >= 0.0 {
                Ok(Duration::from_secs_f64(s))
            } else {
                Err(format!("{flag}: expected seconds >= 0"))
            }
        }
        match flag {
            "-h" | "--help" => return Ok(Command::Help),
            "--spawn" => o.spawn = Some(value()?.into()),
            "--url" => o.url = Some(value()?),
            "--relay-pid" => o.relay_pid = Some(num(flag, value()?)?),
            "--config" => o.relay_config = Some(value()?.into()),
            "--scenario" => {
                let v = value()?;
                o.scenarios = if v == "all" {
                    Scenario::ALL.to_vec()
                } else {
                    v.split(',')
                        .map(|s| Scenario::parse(s.trim()).ok_or_else(|| format!("unknown scenario {s:?}")))
                        .collect::<Result<_, _>>()?
                };
            }
            "--clients" => o.clients = Some(num(flag, value()?)?),
            "--docs" => o.docs = Some(num(flag, value()?)?),
            "--rate" => rate = Some(value()?),
            "--window" => o.window = Some(num(flag, value()?)?),
            "--ops" => o.ops = Some(value()?.parse()?),
            "--batch" => o.batch = Some(num(flag, value()?)?),
            "--duration" => o.duration = secs(flag, value()?)?,
            "--warmup" => o.warmup = secs(flag, value()?)?,
            "--no-baseline" => o.baseline = false,
            "--baseline-flush" => {
                o.baseline_flush_each = match value()?.as_str() {
                    "each" => true,
                    "burst" => false,
                    v => return Err(format!("--baseline-flush {v:?}: expected each or burst")),
                }
            }
            "--no-profile" => o.profile = false,
            "--baseline-ws-buffer" => o.baseline_ws_buffer = Some(num(flag, value()?)?),
            "--connect-concurrency" => o.connect_concurrency = num(flag, value()?)?,
            "--threads" => threads = Some(num(flag, value()?)?),
            "--out" => out = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    o.load = match rate.as_deref() {
        None => None,
        Some("idle") => Some(Load::Idle),
        Some("closed") => Some(Load::Closed { window: o.window.unwrap_or(4) }),
        Some(r) => {
            let r: f64 = r.parse().map_err(|_| format!("--rate {r:?}: expected a number, closed or idle"))?;
            if !(r.is_finite() && r > 0.0) {
                return Err("--rate must be positive".into());
            }
            Some(Load::Rate(r))
        }
    };
    if o.spawn.is_none() && o.url.is_none() {
        return Err("give --spawn PATH/TO/concord-relay or --url ws://HOST:PORT/sync".into());
    }
    if o.duration.is_zero() {
        return Err("--duration must be positive".into());
    }
    Ok(Command::Run(Box::new(o), out, threads))
}

fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        b.worker_threads(n.max(1));
    }
    b.enable_all().build()
}

fn main() -> ExitCode {
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
        Command::Baseline(listen, flush_each, buffer) => {
            let served = runtime(None).and_then(|rt| {
                rt.block_on(async {
                    let listener = tokio::net::TcpListener::bind(&listen).await?;
                    println!("listening on {}", listener.local_addr()?);
                    baseline::serve(listener, flush_each, buffer).await
                })
            });
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: baseline server on {listen}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(o, out, threads) => {
            let rt = match runtime(threads) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let outcomes = match rt.block_on(load::run(&o)) {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let text = report::render(&o, &outcomes);
            println!("{text}");
            if let Some(path) = out {
                if let Err(e) = std::fs::write(&path, &text) {
                    eprintln!("error: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            // Client tasks may still be closing sockets; do not wait for them.
            rt.shutdown_timeout(Duration::from_millis(100));
            ExitCode::SUCCESS
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
    fn flags_parse() {
        let Ok(Command::Run(o, out, threads)) = parse_args(&args(
            "--spawn target/release/concord-relay --scenario fanout,acks --clients 7 --rate=closed \
             --window 3 --duration 1.5 --out r.md --threads 2 --ops mix --no-baseline",
        )) else {
            panic!("expected a run")
        };
        assert_eq!(o.scenarios, vec![Scenario::Fanout, Scenario::Acks]);
        assert_eq!(o.clients, Some(7));
        assert_eq!(o.load, Some(Load::Closed { window: 3 }));
        assert_eq!(o.duration, Duration::from_millis(1500));
        assert!(!o.baseline);
        assert_eq!(out, Some(PathBuf::from("r.md")));
        assert_eq!(threads, Some(2));
        assert!(o.command.starts_with("concord-load --spawn"));
    }

    #[test]
    fn bad_flags_are_reported() {
        assert!(parse_args(&args("--scenario fanout")).is_err(), "no target");
        assert!(parse_args(&args("--spawn x --scenario nope")).is_err());
        assert!(parse_args(&args("--spawn x --rate -3")).is_err());
        assert!(parse_args(&args("--spawn x --bogus")).is_err());
        assert!(matches!(
            parse_args(&args("baseline-server --listen 127.0.0.1:0 --flush each")),
            Ok(Command::Baseline(_, true, baseline::WS_BUFFER))
        ));
    }
}
