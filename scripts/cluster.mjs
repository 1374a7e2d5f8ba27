#!/usr/bin/env node
// The local dev cluster behind `npm start`: N relays on 127.0.0.1, the demo page served by
// every one of them, and a small admin endpoint (this launcher only, never the relay) that
// lets the page stop and start relays.
//
//   node scripts/cluster.mjs [--base-port 7701] [--nodes 3] [--replicas 3] [--data DIR]
//                            [--relay PATH] [--no-build]
//
// Relays listen on base-port .. base-port+nodes-1, the admin endpoint on base-port-1.
// Each relay's own admin listener (/cluster*, /metrics, /healthz; loopback only, not
// reachable from the page) is on its port + 100; the endpoint below proxies it.
// Everything lives under DIR (default <repo>/data, gitignored): DIR/<id>/ the relay's
// storage, DIR/<id>.toml its config, DIR/logs/<id>.log its log, DIR/www/ the served page.
// A second start reuses DIR, so documents survive restarts.
//
// The served folder holds a copy of web-demo/ and of the built package pkg/ (the relay
// serves files under its web_root only and refuses symlinks that lead out of it); the
// page imports `concord-sync` through an import map pointing at ./pkg/browser.js, exactly
// as an app without a bundler would. Both are copied again whenever they change.
//
// Admin API (CORS open to the relays' origins only):
//   GET  /admin/nodes               every relay: id, addr, url, ws, pid, running, and the
//                                   relay's own /healthz and /cluster answers (or null)
//   POST /admin/nodes/<id>/stop     SIGKILL (a crash); ?signal=TERM for a clean shutdown
//   POST /admin/nodes/<id>/start    start it again with the same config and data
//   GET  /admin/cluster/ring        /cluster/ring of any running relay
//   GET  /admin/cluster/owners?doc= /cluster/owners of any running relay
import { spawn, spawnSync } from "node:child_process";
import { cpSync, createWriteStream, existsSync, mkdirSync, readdirSync, rmSync, statSync, watch, writeFileSync } from "node:fs";
import { createServer, request } from "node:http";
import { createServer as createTcpServer } from "node:net";
import { dirname, join, relative, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const HOST = "127.0.0.1";
const READY_TIMEOUT_MS = 20_000;
const STOP_GRACE_MS = 15_000;
const PROBE_TIMEOUT_MS = 800;
/** A relay's admin listener is on its port + this. */
const RELAY_ADMIN_OFFSET = 100;

const USAGE = `usage: node scripts/cluster.mjs [options]
  --base-port P   first relay port (default 7701); the admin endpoint takes P-1
  --nodes N       number of relays (default 3)
  --replicas N    replicas per document (default min(3, nodes)); W = R = a majority
  --data DIR      data folder (default <repo>/data); reused across starts
  --relay PATH    relay binary (default: the newer of target/release and target/debug)
  --no-build      never build: fail if the relay binary or pkg/ is missing
  -h, --help      this text`;

function parseArgs(argv) {
  const o = { basePort: 7701, nodes: 3, replicas: null, data: join(ROOT, "data"), relay: null, build: true };
  for (let i = 0; i < argv.length; i++) {
    let [flag, inline] = argv[i].startsWith("--") && argv[i].includes("=") ? argv[i].split(/=(.*)/s) : [argv[i]];
    const value = () => {
      const v = inline ?? argv[++i];
      if (v === undefined) fail(`${flag} needs a value\n\n${USAGE}`);
      return v;
    };
    const int = (name, min, max) => {
      const v = value();
      const n = Number(v);
      if (!Number.isInteger(n) || n < min || n > max) fail(`${name} ${v}: expected a whole number from ${min} to ${max}`);
      return n;
    };
    switch (flag) {
      case "--base-port": o.basePort = int(flag, 2, 65_000); break;
      case "--nodes": o.nodes = int(flag, 1, 26); break;
      case "--replicas": o.replicas = int(flag, 1, 26); break;
      case "--data": o.data = resolve(value()); break;
      case "--relay": o.relay = resolve(value()); break;
      case "--no-build": o.build = false; break;
      case "-h": case "--help": console.log(USAGE); process.exit(0); break;
      default: fail(`unknown argument ${flag}\n\n${USAGE}`);
    }
  }
  o.replicas ??= Math.min(3, o.nodes);
  if (o.replicas > o.nodes) fail(`--replicas ${o.replicas} exceeds --nodes ${o.nodes}`);
  if (o.basePort + o.nodes - 1 + RELAY_ADMIN_OFFSET > 65_535) fail(`--base-port ${o.basePort} leaves no room for ${o.nodes} relays`);
  return o;
}

function fail(msg) {
  console.error(`cluster: ${msg}`);
  process.exit(2);
}

const log = (msg) => console.log(`cluster: ${msg}`);

// ---- what to run ----------------------------------------------------------------------

function mtime(p) {
  try {
    return statSync(p).mtimeMs;
  } catch {
    return 0;
  }
}

/** The relay binary: --relay, else the newer of the release and debug builds (npm start
 * has just built release; the test suite has just built debug). */
function findRelay(opts) {
  if (opts.relay) {
    if (!existsSync(opts.relay)) fail(`--relay ${opts.relay}: no such file`);
    return opts.relay;
  }
  const release = join(ROOT, "target", "release", "concord-relay");
  const debug = join(ROOT, "target", "debug", "concord-relay");
  const newest = [release, debug].filter(existsSync).sort((a, b) => mtime(b) - mtime(a))[0];
  if (newest) return newest;
  if (!opts.build) fail("no relay binary in target/release or target/debug; build it: cargo build --release -p concord-relay");
  log("building the relay: cargo build --release -p concord-relay");
  const r = spawnSync("cargo", ["build", "--release", "-p", "concord-relay"], { cwd: ROOT, stdio: "inherit" });
  if (r.status !== 0) fail("cargo build failed");
  return release;
}

function ensurePackage(opts) {
  if (existsSync(join(ROOT, "pkg", "browser.js"))) return;
  if (!opts.build) fail("pkg/ is not built; run: npm run build");
  log("building the npm package: npm run build");
  const r = spawnSync("npm", ["run", "build", "--silent"], { cwd: ROOT, stdio: "inherit" });
  if (r.status !== 0 || !existsSync(join(ROOT, "pkg", "browser.js"))) fail("npm run build did not produce pkg/browser.js");
}

// ---- the served folder ----------------------------------------------------------------

/** Copies web-demo/ and pkg/ into www/ (replacing what was there) and writes the
 * launcher's demo-config.json, which tells the page where the relays and the admin
 * endpoint are. A page served by a plain relay has no such file and does without. */
function publish(www, demoConfig) {
  rmSync(www, { recursive: true, force: true });
  mkdirSync(www, { recursive: true });
  cpSync(join(ROOT, "web-demo"), www, { recursive: true });
  cpSync(join(ROOT, "pkg"), join(www, "pkg"), { recursive: true });
  writeFileSync(join(www, "demo-config.json"), JSON.stringify(demoConfig, null, 2) + "\n");
}

/** Re-publishes when web-demo/ or pkg/ change (an `npm run build` in another terminal,
 * an edit of the page), so a reload picks the change up. */
function watchSources(www, demoConfig) {
  let timer = null;
  const again = () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      try {
        if (!existsSync(join(ROOT, "pkg", "browser.js"))) return; // mid-build: wait for the next event
        publish(www, demoConfig);
        log("web-demo/ or pkg/ changed: republished; reload the page");
      } catch (e) {
        log(`could not republish the page: ${e.message}`);
      }
    }, 300);
  };
  const watchers = [];
  for (const dir of ["web-demo", "pkg"]) {
    try {
      watchers.push(watch(join(ROOT, dir), again));
    } catch {
      // Not watchable (e.g. missing): the page is still served as published.
    }
  }
  return () => {
    clearTimeout(timer);
    for (const w of watchers) w.close();
  };
}

// ---- relays -----------------------------------------------------------------------------

function tomlString(s) {
  return JSON.stringify(s); // a JSON string is a valid TOML basic string
}

function relayConfig(node, nodes, opts, www) {
  const majority = Math.floor(opts.replicas / 2) + 1;
  const lines = [
    "# Written by scripts/cluster.mjs at every start; edits are overwritten.",
    `node_id = ${tomlString(node.id)}`,
    `listen = ${tomlString(node.addr)}`,
    `admin_listen = ${tomlString(node.adminAddr)}`,
    `data_dir = ${tomlString(node.dataDir)}`,
    `web_root = ${tomlString(www)}`,
    "",
    "[cluster]",
    `replicas = ${opts.replicas}`,
    `write_quorum = ${majority}`,
    `read_quorum = ${majority}`,
    "vnodes = 64",
  ];
  for (const n of nodes) lines.push("", "[[cluster.nodes]]", `id = ${tomlString(n.id)}`, `addr = ${tomlString(n.addr)}`, "weight = 1");
  return lines.join("\n") + "\n";
}

/** Resolves when `port` can be bound on HOST, rejects with a clear message otherwise. */
function checkPortFree(port) {
  return new Promise((ok, ko) => {
    const srv = createTcpServer();
    srv.once("error", (e) =>
      ko(new Error(`port ${port} is in use (${e.code}): is another cluster running? Stop it, or pass --base-port`)),
    );
    srv.listen(port, HOST, () => srv.close(ok));
  });
}

class Relay {
  constructor(node, binary, logsDir) {
    Object.assign(this, node);
    this.binary = binary;
    this.logPath = join(logsDir, `${node.id}.log`);
    this.child = null;
    this.listening = false;
    this.stopping = false;
    this.exited = Promise.resolve();
  }

  get running() {
    return this.child !== null;
  }

  /** Starts the relay and resolves once it prints `listening on ADDR`. */
  start() {
    if (this.child) return this.ready;
    const child = spawn(this.binary, ["--config", this.configPath], {
      cwd: ROOT,
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "info" },
    });
    this.child = child;
    this.listening = false;
    this.stopping = false;
    const logFile = createWriteStream(this.logPath, { flags: "a" });
    logFile.write(`\n---- ${new Date().toISOString()} start pid ${child.pid}\n`);
    child.stderr.pipe(logFile, { end: false });
    // Errors are worth a line on the console; the rest stays in the log file.
    createInterface({ input: child.stderr }).on("line", (line) => {
      if (/\bERROR\b|panicked/.test(line)) console.error(`[${this.id}] ${line}`);
    });
    this.ready = new Promise((ok, ko) => {
      const timer = setTimeout(() => ko(new Error(`relay ${this.id} did not print "listening on" within ${READY_TIMEOUT_MS} ms; see ${this.logPath}`)), READY_TIMEOUT_MS);
      createInterface({ input: child.stdout }).on("line", (line) => {
        logFile.write(`[stdout] ${line}\n`);
        if (line.startsWith("listening on ")) {
          this.listening = true;
          clearTimeout(timer);
          ok();
        }
      });
      child.once("exit", () => {
        clearTimeout(timer);
        ko(new Error(`relay ${this.id} exited before listening; see ${this.logPath}`));
      });
    });
    this.ready.catch(() => {}); // observed by whoever awaits it
    this.exited = new Promise((done) => {
      child.once("exit", (code, signal) => {
        if (this.child === child) {
          this.child = null;
          this.listening = false;
        }
        logFile.end(`---- exit ${signal ?? code}\n`);
        if (!this.stopping && !shuttingDown) {
          console.error(`cluster: relay ${this.id} exited unexpectedly (${signal ?? `code ${code}`}); see ${this.logPath}`);
        }
        done();
      });
    });
    return this.ready;
  }

  /** Sends `signal`; resolves when the process is gone (SIGKILL after the grace time). */
  async stop(signal = "SIGTERM") {
    const child = this.child;
    if (!child) return;
    this.stopping = true;
    child.kill(signal);
    const timer = setTimeout(() => child.kill("SIGKILL"), STOP_GRACE_MS);
    await this.exited;
    clearTimeout(timer);
  }

  info() {
    return {
      id: this.id,
      addr: this.addr,
      url: `http://${this.addr}/`,
      ws: `ws://${this.addr}/sync`,
      pid: this.child?.pid ?? null,
      running: this.running,
      listening: this.listening,
      log: this.logPath,
    };
  }
}

// ---- admin endpoint ---------------------------------------------------------------------

/** GET http://addr/path as JSON, or null (not running, no such route, not JSON, slow). */
function probe(addr, path) {
  return new Promise((done) => {
    const [host, port] = [addr.slice(0, addr.lastIndexOf(":")), Number(addr.slice(addr.lastIndexOf(":") + 1))];
    const req = request({ host, port, path, method: "GET", timeout: PROBE_TIMEOUT_MS }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (c) => (body += c));
      res.on("end", () => {
        if (res.statusCode !== 200) return done(null);
        try {
          done(JSON.parse(body));
        } catch {
          done(null);
        }
      });
    });
    req.on("timeout", () => req.destroy());
    req.on("error", () => done(null));
    req.end();
  });
}

async function fromAnyRunning(relays, path) {
  for (const r of relays) {
    if (!r.listening) continue;
    const body = await probe(r.adminAddr, path);
    if (body) return body;
  }
  return null;
}

function adminServer(relays, opts) {
  const origins = new Set(relays.flatMap((r) => [`http://${r.addr}`, `http://localhost:${r.port}`]));
  const byId = new Map(relays.map((r) => [r.id, r]));

  async function route(method, url) {
    const parts = url.pathname.split("/").filter(Boolean);
    if (method === "GET" && url.pathname === "/admin/nodes") {
      const nodes = await Promise.all(
        relays.map(async (r) => {
          const [health, cluster] = r.listening
            ? await Promise.all([probe(r.adminAddr, "/healthz"), probe(r.adminAddr, "/cluster")])
            : [null, null];
          return { ...r.info(), health, cluster };
        }),
      );
      const majority = Math.floor(opts.replicas / 2) + 1;
      return [200, { replicas: opts.replicas, write_quorum: majority, read_quorum: majority, nodes }];
    }
    if (method === "GET" && url.pathname === "/admin/cluster/ring") {
      const ring = await fromAnyRunning(relays, "/cluster/ring");
      return ring ? [200, ring] : [503, { error: "no running relay answered /cluster/ring" }];
    }
    if (method === "GET" && url.pathname === "/admin/cluster/owners") {
      const doc = url.searchParams.get("doc");
      if (!doc) return [400, { error: "pass ?doc=ID" }];
      const owners = await fromAnyRunning(relays, `/cluster/owners?doc=${encodeURIComponent(doc)}`);
      return owners ? [200, owners] : [503, { error: "no running relay answered /cluster/owners" }];
    }
    if (parts.length === 4 && parts[0] === "admin" && parts[1] === "nodes") {
      const relay = byId.get(parts[2]);
      if (!relay) return [404, { error: `no relay ${parts[2]}; relays: ${[...byId.keys()].join(", ")}` }];
      if (method !== "POST") return [405, { error: "use POST" }];
      if (parts[3] === "stop") {
        const sig = (url.searchParams.get("signal") ?? "KILL").toUpperCase();
        if (sig !== "KILL" && sig !== "TERM") return [400, { error: "signal must be KILL or TERM" }];
        log(`admin: stopping relay ${relay.id} (SIG${sig})`);
        await relay.stop(`SIG${sig}`);
        return [200, relay.info()];
      }
      if (parts[3] === "start") {
        log(`admin: starting relay ${relay.id}`);
        try {
          await relay.start();
        } catch (e) {
          return [500, { error: e.message, ...relay.info() }];
        }
        return [200, relay.info()];
      }
    }
    return [404, { error: "unknown admin route" }];
  }

  return createServer(async (req, res) => {
    const origin = req.headers.origin;
    const headers = { "Content-Type": "application/json", "Cache-Control": "no-store", Vary: "Origin" };
    if (origin && origins.has(origin)) {
      headers["Access-Control-Allow-Origin"] = origin;
      headers["Access-Control-Allow-Methods"] = "GET, POST";
      headers["Access-Control-Max-Age"] = "600";
    }
    if (req.method === "OPTIONS") {
      res.writeHead(204, headers).end();
      return;
    }
    req.resume(); // no request bodies
    let status, body;
    try {
      [status, body] = await route(req.method, new URL(req.url, `http://${HOST}`));
    } catch (e) {
      [status, body] = [500, { error: String(e?.message ?? e) }];
    }
    res.writeHead(status, headers).end(JSON.stringify(body) + "\n");
  });
}

// ---- main -------------------------------------------------------------------------------

let shuttingDown = false;

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const binary = findRelay(opts);
  ensurePackage(opts);
  if (!existsSync(join(ROOT, "web-demo", "index.html"))) fail("web-demo/index.html is missing");

  const adminPort = opts.basePort - 1;
  const ids = Array.from({ length: opts.nodes }, (_, i) => String.fromCharCode(97 + i));
  const nodes = ids.map((id, i) => ({
    id,
    port: opts.basePort + i,
    addr: `${HOST}:${opts.basePort + i}`,
    adminPort: opts.basePort + i + RELAY_ADMIN_OFFSET,
    adminAddr: `${HOST}:${opts.basePort + i + RELAY_ADMIN_OFFSET}`,
    dataDir: join(opts.data, id),
    configPath: join(opts.data, `${id}.toml`),
  }));
  try {
    await Promise.all([adminPort, ...nodes.flatMap((n) => [n.port, n.adminPort])].map(checkPortFree));
  } catch (e) {
    fail(e.message);
  }

  const www = join(opts.data, "www");
  const logs = join(opts.data, "logs");
  mkdirSync(logs, { recursive: true });
  const majority = Math.floor(opts.replicas / 2) + 1;
  const demoConfig = {
    admin: `http://${HOST}:${adminPort}`,
    replicas: opts.replicas,
    write_quorum: majority,
    read_quorum: majority,
    nodes: nodes.map((n) => ({ id: n.id, addr: n.addr })),
  };
  publish(www, demoConfig);
  for (const n of nodes) {
    mkdirSync(n.dataDir, { recursive: true });
    writeFileSync(n.configPath, relayConfig(n, nodes, opts, www));
  }
  const reused = nodes.some((n) => readdirSync(n.dataDir).length > 0);

  const relays = nodes.map((n) => new Relay(n, binary, logs));
  const admin = adminServer(relays, opts);
  await new Promise((ok, ko) => admin.once("error", ko).listen(adminPort, HOST, ok));
  const unwatch = watchSources(www, demoConfig);

  let stopping = null;
  const shutdown = (why) => {
    if (stopping) {
      log("second signal: killing the relays");
      for (const r of relays) r.child?.kill("SIGKILL");
      return stopping;
    }
    shuttingDown = true;
    log(`${why}: stopping the relays (SIGTERM) and waiting for them to flush`);
    unwatch();
    admin.close();
    admin.closeAllConnections?.();
    stopping = Promise.all(relays.map((r) => r.stop("SIGTERM"))).then(() => {
      log("stopped");
      process.exit(0);
    });
    return stopping;
  };
  process.on("SIGINT", () => shutdown("Ctrl-C"));
  process.on("SIGTERM", () => shutdown("SIGTERM"));
  process.on("SIGHUP", () => shutdown("SIGHUP"));
  // If whoever started the launcher dies without stopping it (a crashed test run), do
  // not leave relays behind.
  const parent = process.ppid;
  setInterval(() => process.ppid !== parent && shutdown("the parent process exited"), 2000).unref();

  try {
    await Promise.all(relays.map((r) => r.start()));
  } catch (e) {
    console.error(`cluster: ${e.message}`);
    await shutdown("start-up failed");
    return;
  }

  const rel = (p) => {
    const r = relative(process.cwd(), p);
    return r === "" ? "." : r.startsWith("..") ? p : r;
  };
  console.log("");
  console.log(`Concord dev cluster: ${opts.nodes} relays, N=${opts.replicas} W=${majority} R=${majority}`);
  console.log(`  relay binary  ${rel(binary)}`);
  console.log(`  data          ${rel(opts.data)}${reused ? " (reused: documents from earlier runs are back)" : ""}`);
  for (const r of relays) console.log(`  relay ${r.id}       ${r.addr}  pid ${r.child?.pid}  log ${rel(r.logPath)}`);
  console.log(`  admin         ${HOST}:${adminPort} (dev only: the page's stop/start buttons)`);
  console.log("");
  console.log(`Open http://${relays[0].addr}/`);
  console.log("Stop with Ctrl-C.");
}

main().catch((e) => {
  console.error(`cluster: ${e?.stack ?? e}`);
  process.exit(1);
});
