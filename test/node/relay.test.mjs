// The built package against real relay processes (target/debug/concord-relay, built by
// `cargo build -p concord-relay` or `cargo test --workspace`): convergence through the
// relay, offline writes that sync when the relay comes back, `synced()` waiting for the
// relay's ack, and failover to the second URL when the first relay is killed.
// Skipped, with the reason, when the binary is missing or does not speak the protocol.
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import { Client } from "concord-sync";

const root = fileURLToPath(new URL("../..", import.meta.url));
const BIN = process.env.CONCORD_RELAY_BIN ?? join(root, "target", "debug", "concord-relay");
const relays = new Set();
const dirs = [];
const clients = new Set();

after(() => {
  for (const c of clients) c.close();
  for (const r of relays) r.proc.kill("SIGKILL");
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function tempDir() {
  const d = mkdtempSync(join(tmpdir(), "concord-relay-test-"));
  dirs.push(d);
  return d;
}

/** Starts a relay; resolves once it printed `listening on ADDR`. */
function startRelay({ dataDir = tempDir(), listen = "127.0.0.1:0" } = {}) {
  return new Promise((resolve, reject) => {
    const proc = spawn(BIN, ["--listen", listen, "--data-dir", dataDir], { stdio: ["ignore", "pipe", "pipe"] });
    const relay = { proc, dataDir };
    relays.add(relay);
    let out = "";
    let err = "";
    const timer = setTimeout(() => reject(new Error(`relay did not start in 10 s: ${err}`)), 10_000);
    proc.stderr.on("data", (b) => (err += b));
    proc.stdout.on("data", (b) => {
      out += b;
      const m = /listening on (\S+)/.exec(out);
      if (m && !relay.addr) {
        clearTimeout(timer);
        relay.addr = m[1];
        relay.url = `ws://${m[1]}/sync`;
        resolve(relay);
      }
    });
    proc.on("exit", (code) => {
      relays.delete(relay);
      if (!relay.addr) {
        clearTimeout(timer);
        reject(new Error(`relay exited with ${code}: ${err}`));
      }
    });
  });
}

function kill(relay) {
  return new Promise((resolve) => {
    relay.proc.once("exit", resolve);
    relay.proc.kill("SIGKILL");
  });
}

async function connect(urls) {
  const c = await Client.connect({ urls, webSocket: WebSocket, broadcast: false });
  clients.add(c);
  return c;
}

function close(c) {
  c.close();
  clients.delete(c);
}

function within(ms, promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function eventually(f, what, ms = 10_000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (f()) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  assert.fail(`timed out after ${ms} ms waiting for ${what}`);
}

/** Why the relay tests cannot run, or null. */
async function unavailable() {
  if (!existsSync(BIN) && !process.env.CONCORD_RELAY_BIN) {
    try {
      execFileSync("cargo", ["build", "-q", "-p", "concord-relay", "--bin", "concord-relay"], { cwd: root, stdio: "inherit" });
    } catch (e) {
      return `no relay binary at ${BIN} and \`cargo build -p concord-relay\` failed (${e.message})`;
    }
  }
  if (!existsSync(BIN)) return `no relay binary at ${BIN} (run \`cargo build -p concord-relay\`)`;
  let relay;
  let c;
  try {
    relay = await startRelay();
    c = await connect([relay.url]);
    const doc = await c.open("probe");
    doc.counter("n").increment();
    await within(5000, doc.synced(), "the relay to ack a write");
    return null;
  } catch (e) {
    return `the relay does not answer the sync protocol yet (${e.message})`;
  } finally {
    if (c) close(c);
    if (relay) await kill(relay);
  }
}

const skip = await unavailable();
if (skip) console.log(`# skipping relay tests: ${skip}`);
const opts = { skip: skip ?? false, timeout: 60_000 };

test("two clients converge through the relay", opts, async () => {
  const relay = await startRelay();
  const a = await connect([relay.url]);
  const b = await connect([relay.url]);
  const da = await a.open("board");
  const db = await b.open("board");
  await eventually(() => a.status === "online" && b.status === "online", "both online");

  const remote = [];
  db.subscribe((e) => e.origin === "remote" && remote.push(...e.keys));
  da.counter("likes").increment(2);
  da.pnCounter("votes").decrement(1);
  db.register("title").set("Hello");
  db.set("tags").add("rust");
  da.set("tags").add("wasm");
  await eventually(() => JSON.stringify(da) === JSON.stringify(db), "convergence");
  assert.deepEqual(db.toJSON(), { likes: 2, votes: -1, title: "Hello", tags: ["rust", "wasm"] });
  assert.ok(remote.includes("likes"), "b saw a's write as a remote change");
  await within(10_000, Promise.all([da.synced(), db.synced()]), "synced()");
  close(a);
  close(b);
  await kill(relay);
});

test("offline writes reach the relay when it comes back; synced() waits for its ack", opts, async () => {
  const dataDir = tempDir();
  let relay = await startRelay({ dataDir });
  const addr = relay.addr;
  await kill(relay);

  const a = await connect([`ws://${addr}/sync`]);
  const doc = await a.open("offline");
  doc.counter("likes").increment(3);
  doc.set("tags").add("written offline");
  assert.equal(doc.counter("likes").value, 3, "local state is there at once");
  let acked = false;
  const synced = doc.synced().then(() => (acked = true));
  await new Promise((r) => setTimeout(r, 800));
  assert.equal(acked, false, "synced() must not resolve while no relay has the writes");
  assert.notEqual(a.status, "online");

  relay = await startRelay({ dataDir, listen: addr });
  await within(20_000, synced, "synced() after the relay came back");
  assert.equal(a.status, "online");

  const b = await connect([relay.url]);
  const other = await b.open("offline");
  await within(10_000, other.synced(), "b to sync");
  assert.deepEqual(other.toJSON(), { likes: 3, tags: ["written offline"] });
  close(a);
  close(b);
  await kill(relay);
});

test("a client fails over to the second URL when the first relay is killed", opts, async () => {
  const first = await startRelay();
  const second = await startRelay();
  const a = await connect([first.url, second.url]);
  const statuses = [];
  a.onStatus((s) => statuses.push(s));
  const doc = await a.open("failover");
  doc.counter("likes").increment();
  await within(10_000, doc.synced(), "synced() on the first relay");

  await kill(first);
  doc.counter("likes").increment();
  doc.register("where").set("second relay");
  await eventually(() => a.status === "online" && statuses.includes("offline"), "reconnect after the kill", 15_000);
  await within(15_000, doc.synced(), "synced() on the second relay");

  // The second relay never saw the first one: everything reached it through the client.
  const b = await connect([second.url]);
  const seen = await b.open("failover");
  await within(10_000, seen.synced(), "b to sync");
  assert.deepEqual(seen.toJSON(), { likes: 2, where: "second relay" });
  close(a);
  close(b);
  await kill(second);
});

test("status goes connecting -> online, and offline when closed", opts, async () => {
  const relay = await startRelay();
  const a = await connect([relay.url]);
  assert.equal(a.status, "connecting");
  await eventually(() => a.status === "online", "online");
  close(a);
  assert.equal(a.status, "offline");
  await kill(relay);
});
