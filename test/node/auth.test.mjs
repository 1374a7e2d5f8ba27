// Tokens against a real relay with an auth_secret (target/debug/concord-relay): a token
// function is called on every connect, and a refused token stops reconnecting, is
// reported as an UnauthorizedError, and rejects pending synced().
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import { Client, UnauthorizedError } from "concord-sync";

const root = fileURLToPath(new URL("../..", import.meta.url));
const BIN = process.env.CONCORD_RELAY_BIN ?? join(root, "target", "debug", "concord-relay");
const SECRET = "node-auth-test-secret-0123456789";
const relays = new Set();
const dirs = [];
const clients = new Set();

after(() => {
  for (const c of clients) c.close();
  for (const r of relays) r.kill("SIGKILL");
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function ensureBinary() {
  if (existsSync(BIN)) return null;
  try {
    execFileSync("cargo", ["build", "-q", "-p", "concord-relay", "--bin", "concord-relay"], { cwd: root, stdio: "inherit" });
  } catch (e) {
    return `no relay binary at ${BIN} (${e.message})`;
  }
  return existsSync(BIN) ? null : `no relay binary at ${BIN}`;
}

/** A relay with SECRET; resolves with its URL once listening. */
function startRelay() {
  const dir = mkdtempSync(join(tmpdir(), "concord-auth-test-"));
  dirs.push(dir);
  const cfg = join(dir, "relay.toml");
  writeFileSync(cfg, `listen = "127.0.0.1:0"\ndata_dir = "${join(dir, "data")}"\nauth_secret = "${SECRET}"\n`);
  return new Promise((resolve, reject) => {
    const proc = spawn(BIN, ["--config", cfg], { stdio: ["ignore", "pipe", "pipe"] });
    relays.add(proc);
    let out = "";
    let err = "";
    const timer = setTimeout(() => reject(new Error(`relay did not start in 10 s: ${err}`)), 10_000);
    proc.stderr.on("data", (b) => (err += b));
    proc.stdout.on("data", (b) => {
      out += b;
      const m = /listening on (\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(`ws://${m[1]}/sync`);
      }
    });
    proc.on("exit", (code) => reject(new Error(`relay exited with ${code}: ${err}`)));
  });
}

/** A token from the CLI: its last word of stdout (the contract outside tools rely on). */
function mint(args) {
  const out = execFileSync(BIN, ["token", "--secret", SECRET, ...args], { encoding: "utf8" });
  return out.trim().split(/\s+/).pop();
}

/** A WebSocket constructor that counts the connections made with it. */
function countingWebSocket() {
  const counter = { n: 0 };
  class Counting extends WebSocket {
    constructor(...args) {
      super(...args);
      counter.n++;
    }
  }
  return [Counting, counter];
}

async function connect(options) {
  const c = await Client.connect({ persist: false, broadcast: false, ...options });
  clients.add(c);
  return c;
}

function within(ms, promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const skip = ensureBinary();
if (skip) console.log(`# skipping auth tests: ${skip}`);
const opts = { skip: skip ?? false, timeout: 60_000 };

test("an async token function is called on every connect", opts, async () => {
  const url = await startRelay();
  const [ws, count] = countingWebSocket();
  let calls = 0;
  const token = async () => {
    calls++;
    await new Promise((r) => setTimeout(r, 5));
    return mint(["--doc", "board-*", "--write", "--ttl", "1h"]);
  };
  const c = await connect({ urls: [url], token, webSocket: ws });
  const doc = await c.open("board-1");
  doc.counter("n").increment(3);
  await within(10_000, doc.synced(), "the first sync");
  assert.equal(calls, 1);
  assert.equal(count.n, 1);
  c.reconnect();
  doc.counter("n").increment(1);
  await within(10_000, doc.synced(), "the sync after reconnecting");
  assert.equal(calls, 2, "called again for the new connection");
  assert.equal(count.n, 2);
  assert.equal(doc.counter("n").value, 4);
});

test("a refused token stops reconnecting, is reported, and rejects synced()", opts, async () => {
  const url = await startRelay();
  const [ws, count] = countingWebSocket();
  const readOnlyOther = mint(["--doc", "other", "--ttl", "1h"]);
  let calls = 0;
  const tokens = ["not-a-token", readOnlyOther];
  const c = await connect({ urls: [url], token: () => tokens[Math.min(calls++, 1)], webSocket: ws });
  const errors = [];
  c.onError((e) => errors.push(e));
  const doc = await c.open("board-1");
  doc.counter("n").increment();
  const err = await within(10_000, doc.synced().then(() => null, (e) => e), "synced() to settle");
  assert.ok(err instanceof UnauthorizedError, `got ${err}`);
  assert.equal(err.code, "UNAUTHORIZED");
  assert.equal(errors.filter((e) => e instanceof UnauthorizedError).length, 1);
  assert.equal(c.status, "offline");
  // No retry loop: the reconnect backoff would have tried several times by now.
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal(count.n, 1, "connection attempts after the refusal");
  assert.equal(calls, 1);
  await assert.rejects(doc.synced(), UnauthorizedError, "synced() while refused");

  // An explicit reconnect asks the token function again; this token is valid, and the
  // document it does not cover is refused per document, not by closing.
  c.reconnect();
  await within(10_000, new Promise((ok) => c.onStatus((s) => s === "online" && ok())), "online again");
  assert.equal(calls, 2);
  assert.equal(count.n, 2);
});
