// Starts the dev cluster (scripts/cluster.mjs) for one test: free ports, a temporary data
// folder, no build (the test suite runs after `npm run build` and `cargo test`).
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

export const ROOT = fileURLToPath(new URL("../../..", import.meta.url));
const LAUNCHER = join(ROOT, "scripts", "cluster.mjs");
const START_TIMEOUT_MS = 60_000;

/** Starts `nodes` relays; resolves to a handle once the launcher printed its URL. */
export async function startCluster({ nodes = 3, replicas } = {}) {
  const data = mkdtempSync(join(tmpdir(), "concord-e2e-"));
  let lastError = null;
  for (let attempt = 0; attempt < 6; attempt++) {
    const base = 20_000 + Math.floor(Math.random() * 30_000);
    try {
      return await launch({ base, nodes, replicas, data });
    } catch (e) {
      lastError = e;
      if (!/in use/.test(e.message)) break; // only a port clash is worth another try
    }
  }
  rmSync(data, { recursive: true, force: true });
  throw lastError;
}

function launch({ base, nodes, replicas, data }) {
  const args = [LAUNCHER, "--base-port", String(base), "--nodes", String(nodes), "--data", data, "--no-build"];
  if (replicas) args.push("--replicas", String(replicas));
  const child = spawn(process.execPath, args, { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"] });
  const output = [];
  const remember = (line) => {
    output.push(line);
    if (process.env.CONCORD_E2E_VERBOSE) console.error(`[cluster] ${line}`);
  };
  createInterface({ input: child.stderr }).on("line", remember);
  const exited = new Promise((done) => child.once("exit", (code, signal) => done({ code, signal })));
  return new Promise((ok, ko) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      ko(new Error(`the cluster did not start within ${START_TIMEOUT_MS} ms:\n${output.join("\n")}`));
    }, START_TIMEOUT_MS);
    createInterface({ input: child.stdout }).on("line", (line) => {
      remember(line);
      if (line.startsWith("Open http")) {
        clearTimeout(timer);
        ok(handle({ child, exited, base, nodes, data, output }));
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      ko(new Error(`the cluster launcher exited (${signal ?? code}) before starting:\n${output.join("\n")}`));
    });
  });
}

function handle({ child, exited, base, nodes, data, output }) {
  const admin = `http://127.0.0.1:${base - 1}`;
  const ids = Array.from({ length: nodes }, (_, i) => String.fromCharCode(97 + i));
  const adminJSON = async (method, path) => {
    const res = await fetch(`${admin}${path}`, { method, signal: AbortSignal.timeout(30_000) });
    const body = await res.json();
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(body)}`);
    return body;
  };
  return {
    ids,
    admin,
    data,
    output,
    /** The page's URL on relay `id` (default the first). */
    url(id = "a", doc = undefined) {
      const port = base + ids.indexOf(id);
      return `http://127.0.0.1:${port}/${doc ? `?doc=${encodeURIComponent(doc)}` : ""}`;
    },
    nodes: () => adminJSON("GET", "/admin/nodes"),
    owners: (doc) => adminJSON("GET", `/admin/cluster/owners?doc=${encodeURIComponent(doc)}`),
    stopNode: (id, signal = "KILL") => adminJSON("POST", `/admin/nodes/${id}/stop?signal=${signal}`),
    startNode: (id) => adminJSON("POST", `/admin/nodes/${id}/start`),
    /** Pending hints summed over the running relays (from their /healthz). */
    async pendingHints() {
      const { nodes: list } = await adminJSON("GET", "/admin/nodes");
      return list.reduce((s, n) => s + (n.health?.pending_hints ?? 0), 0);
    },
    /** Ctrl-C equivalent: SIGTERM, wait for the relays to flush, remove the data. */
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGTERM");
        const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
        await exited;
        clearTimeout(timer);
      }
      if (!process.env.CONCORD_E2E_KEEP) rmSync(data, { recursive: true, force: true });
    },
  };
}
