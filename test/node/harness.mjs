// Shared by the node tests that run real relays (target/debug/concord-relay): start one
// with a config, connect clients that talk only through it, wait with a bound, clean up.
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after } from "node:test";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import { Client } from "concord-sync";

const root = fileURLToPath(new URL("../..", import.meta.url));
export const BIN = process.env.CONCORD_RELAY_BIN ?? join(root, "target", "debug", "concord-relay");
const procs = new Set();
const dirs = [];
const clients = new Set();

after(() => {
  for (const c of clients) c.close();
  for (const p of procs) p.kill("SIGKILL");
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** Why the relay binary is unavailable (after trying to build it), or null. */
export function missingBinary() {
  if (existsSync(BIN)) return null;
  try {
    execFileSync("cargo", ["build", "-q", "-p", "concord-relay", "--bin", "concord-relay"], { cwd: root, stdio: "inherit" });
  } catch (e) {
    return `no relay binary at ${BIN} (${e.message})`;
  }
  return existsSync(BIN) ? null : `no relay binary at ${BIN}`;
}

/** A relay whose config is `toml` (plus listen and data_dir); resolves with
 * `{ url, admin, proc }` (the WebSocket URL, the admin listener's base URL) once it
 * printed both addresses. */
export function startRelay(toml = "") {
  const dir = mkdtempSync(join(tmpdir(), "concord-node-test-"));
  dirs.push(dir);
  const cfg = join(dir, "relay.toml");
  writeFileSync(cfg, `listen = "127.0.0.1:0"\ndata_dir = "${join(dir, "data")}"\n${toml}\n`);
  return new Promise((resolve, reject) => {
    const proc = spawn(BIN, ["--config", cfg], { stdio: ["ignore", "pipe", "pipe"] });
    procs.add(proc);
    let out = "";
    let err = "";
    let started = false;
    const timer = setTimeout(() => reject(new Error(`relay did not start in 10 s: ${err}`)), 10_000);
    proc.stderr.on("data", (b) => (err += b));
    proc.stdout.on("data", (b) => {
      out += b;
      const pub = /^listening on (\S+)/m.exec(out);
      const admin = /^admin listening on (\S+)/m.exec(out);
      if (pub && admin && !started) {
        started = true;
        clearTimeout(timer);
        resolve({ url: `ws://${pub[1]}/sync`, admin: `http://${admin[1]}`, proc });
      }
    });
    proc.on("exit", (code) => {
      procs.delete(proc);
      if (!started) {
        clearTimeout(timer);
        reject(new Error(`relay exited with ${code}: ${err}`));
      }
    });
  });
}

/** Kills a relay; resolves once it exited. */
export function stop(relay) {
  return new Promise((resolve) => {
    relay.proc.once("exit", resolve);
    relay.proc.kill("SIGKILL");
  });
}

/** A client that talks only through the relay (no BroadcastChannel, no IndexedDB). */
export async function connect(url, options = {}) {
  const c = await Client.connect({ urls: [url], webSocket: WebSocket, broadcast: false, persist: false, ...options });
  clients.add(c);
  return c;
}

/** Closes a client made by `connect`. */
export function close(c) {
  c.close();
  clients.delete(c);
}

/** `promise`, or a rejection naming `what` after `ms`. */
export function within(ms, promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
