#!/usr/bin/env node
// Concord against Yjs, Automerge and Loro, in one Node process (`npm run bench`).
//
// Four rows, each run per library as warm-up + N measured runs (median reported), the
// libraries interleaved round by round so background load hits them alike:
//
//   1. counter   64 replicas x 1,000 increments, then all merged into one replica
//   2. or-set    one replica adds 10,000 elements and removes 5,000, then a fresh peer syncs
//   3. lww       1,540 writers set one register key once each, then all merged into one
//   4. delta     a 10,000-key doc; a peer 100 ops behind catches up (payload bytes + time)
//
// Time is end to end (local ops + encode + transfer + apply) unless a row says otherwise;
// "bytes" is what crosses the wire for the sync step. The table goes to stdout and to
// bench/results/compare.md.
//
// How Concord is driven: like the peers, through its public API. Every replica is a
// `Client` with no relay, no persistence and no BroadcastChannel; state and deltas move
// with `doc.encodeUpdate(since?)` and `doc.applyUpdate(bytes)` (the peers' counterparts:
// `encodeStateAsUpdate`/`applyUpdate`, `save`/`saveSince`/`loadIncremental`,
// `export`/`import`). An update is the sync protocol's own `Deltas` frame, or a state
// frame without the delta log when the log does not reach back to `since`.
//
// Usage: node bench/compare.mjs [--runs N] [--warmup N] [--rows 1,2,3,4]
//          [--libs concord,yjs,automerge,loro] [--pkg DIR] [--write | --no-write]
//   --pkg DIR   another build of the package (default pkg/), e.g. to compare wasm builds
//   A full run (all rows, all libraries, pkg/) writes bench/results/compare.md; a partial
//   one only with --write.

import { readFileSync, statSync, writeFileSync, mkdirSync } from "node:fs";
import { execFileSync } from "node:child_process";
import os from "node:os";
import v8 from "node:v8";
import vm from "node:vm";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import * as Y from "yjs";
import * as A from "@automerge/automerge";
import { LoroDoc } from "loro-crdt";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const argv = process.argv.slice(2);
function opt(name, dflt) {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : dflt;
}
const RUNS = Number(opt("--runs", 5));
const WARMUP = Number(opt("--warmup", 1));
const ROWS = opt("--rows", "1,2,3,4").split(",").map(Number);
const LIBS = opt("--libs", "concord,yjs,automerge,loro").split(",");
if (LIBS[0] !== "concord" || LIBS.length < 2) throw new Error("--libs: concord first, then at least one peer");
const PKG = resolve(opt("--pkg", join(root, "pkg")));
const FULL = ROWS.join() === "1,2,3,4" && LIBS.length === 4 && PKG === join(root, "pkg");
const WRITE = argv.includes("--write") || (FULL && !argv.includes("--no-write"));

let Client;
try {
  ({ Client } = await import(pathToFileURL(join(PKG, "node.js")).href));
} catch (e) {
  console.error(`cannot load ${join(PKG, "node.js")} (${e.message}); run \`npm run build\` first`);
  process.exit(1);
}

v8.setFlagsFromString("--expose-gc");
const gc = vm.runInNewContext("gc");

// ---------------------------------------------------------------- helpers

const now = () => performance.now();
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
function check(cond, what) {
  if (!cond) throw new Error(`wrong result: ${what}`);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Collects garbage and lets FinalizationRegistry callbacks run: closed Concord clients
 * give their wasm memory back only then (wasm-bindgen frees on finalization). */
async function settle() {
  gc();
  await sleep(20);
  gc();
  await sleep(20);
}

/** A Concord replica with no relay, no persistence and no BroadcastChannel. */
async function concordReplica() {
  return Client.connect({ urls: [], persist: false, broadcast: false });
}

// ---------------------------------------------------------------- rows

// Each implementation returns { ms, bytes, phases: {name: ms}, extra: {...} }.
// `local` = the writes, `sync` = encode + transfer + apply.

const ROW1 = { replicas: 64, incs: 1000 };
const ROW2 = { adds: 10_000, removes: 5_000 };
const ROW3 = { writers: 1540 };
const ROW4 = { keys: 10_000, behind: 100, rounds: 10 };

const el = (i) => `item-${i}`;
const removed = (i) => i % 2 === 0 && i < 2 * ROW2.removes; // every other element

const rows = {
  1: {
    title: `counter: ${ROW1.replicas} replicas x ${ROW1.incs.toLocaleString("en")} increments, then merge all into one`,
    short: "64 replicas x 1,000 increments (local + merge)",
    bytesMeaning: "sum of the merge payloads",
    impl: {
      async concord() {
        const { replicas, incs } = ROW1;
        const t0 = now();
        const clients = [];
        const docs = [];
        for (let i = 0; i < replicas; i++) {
          const c = await concordReplica();
          const d = await c.open("doc");
          const ctr = d.counter("c");
          for (let k = 0; k < incs; k++) ctr.increment(1);
          clients.push(c);
          docs.push(d);
        }
        const t1 = now();
        const m = await concordReplica();
        const md = await m.open("doc");
        let bytes = 0;
        for (const d of docs) {
          const u = d.encodeUpdate();
          bytes += u.byteLength;
          md.applyUpdate(u);
        }
        const v = md.counter("c").value;
        const t2 = now();
        check(v === replicas * incs, `concord counter ${v}`);
        m.close();
        for (const c of clients) c.close();
        return { ms: t2 - t0, bytes, phases: { local: t1 - t0, sync: t2 - t1 } };
      },
      async yjs() {
        const { replicas, incs } = ROW1;
        const t0 = now();
        const docs = [];
        for (let i = 0; i < replicas; i++) {
          const doc = new Y.Doc();
          const map = doc.getMap("counts");
          const key = String(doc.clientID);
          for (let k = 0; k < incs; k++) map.set(key, (map.get(key) ?? 0) + 1);
          docs.push(doc);
        }
        const t1 = now();
        const merged = new Y.Doc();
        let bytes = 0;
        for (const d of docs) {
          const u = Y.encodeStateAsUpdate(d);
          bytes += u.byteLength;
          Y.applyUpdate(merged, u);
        }
        let sum = 0;
        for (const v of merged.getMap("counts").values()) sum += v;
        const t2 = now();
        check(sum === replicas * incs, `yjs sum ${sum}`);
        return { ms: t2 - t0, bytes, phases: { local: t1 - t0, sync: t2 - t1 } };
      },
      async automerge() {
        const { replicas, incs } = ROW1;
        const t0 = now();
        // A counter is one object: replicas share it by starting from a common base.
        const base = A.change(A.init(), (d) => {
          d.c = new A.Counter(0);
        });
        const baseHeads = A.getHeads(base);
        const docs = [];
        for (let i = 0; i < replicas; i++) {
          let d = A.clone(base);
          for (let k = 0; k < incs; k++) d = A.change(d, (x) => x.c.increment(1));
          docs.push(d);
        }
        const t1 = now();
        let merged = A.clone(base);
        let bytes = 0;
        for (const d of docs) {
          const u = A.saveSince(d, baseHeads);
          bytes += u.byteLength;
          merged = A.loadIncremental(merged, u);
        }
        const v = merged.c.value;
        const t2 = now();
        check(v === replicas * incs, `automerge counter ${v}`);
        return { ms: t2 - t0, bytes, phases: { local: t1 - t0, sync: t2 - t1 } };
      },
      async loro() {
        const { replicas, incs } = ROW1;
        const t0 = now();
        const docs = [];
        for (let i = 0; i < replicas; i++) {
          const doc = new LoroDoc();
          const ctr = doc.getCounter("c");
          for (let k = 0; k < incs; k++) {
            ctr.increment(1);
            doc.commit();
          }
          docs.push(doc);
        }
        const t1 = now();
        const merged = new LoroDoc();
        let bytes = 0;
        for (const d of docs) {
          const u = d.export({ mode: "update" });
          bytes += u.byteLength;
          merged.import(u);
        }
        const v = merged.getCounter("c").value;
        const t2 = now();
        check(v === replicas * incs, `loro counter ${v}`);
        return { ms: t2 - t0, bytes, phases: { local: t1 - t0, sync: t2 - t1 } };
      },
    },
  },

  2: {
    title: `or-set churn: +${ROW2.adds.toLocaleString("en")} / -${ROW2.removes.toLocaleString("en")} elements on one replica, then a fresh peer syncs it`,
    short: "OR-Set churn +10,000 / -5,000 (ops + sync to a fresh peer)",
    bytesMeaning: "full-state payload to the fresh peer",
    impl: {
      async concord() {
        const { adds } = ROW2;
        const t0 = now();
        const ca = await concordReplica();
        const ad = await ca.open("doc");
        const s = ad.set("s");
        for (let i = 0; i < adds; i++) s.add(el(i));
        for (let i = 0; i < adds; i++) if (removed(i)) s.remove(el(i));
        const t1 = now();
        const cb = await concordReplica();
        const bd = await cb.open("doc");
        const u = ad.encodeUpdate();
        bd.applyUpdate(u);
        const bs = bd.set("s");
        const ok = bs.has(el(adds - 1));
        const t2 = now();
        check(ok && bs.size === adds - ROW2.removes && !bs.has(el(0)) && bs.has(el(1)), `concord set size ${bs.size}`);
        ca.close();
        cb.close();
        return { ms: t2 - t0, bytes: u.byteLength, phases: { local: t1 - t0, sync: t2 - t1 } };
      },
      async yjs() {
        const { adds } = ROW2;
        const t0 = now();
        const doc = new Y.Doc();
        const m = doc.getMap("s");
        for (let i = 0; i < adds; i++) m.set(el(i), true);
        for (let i = 0; i < adds; i++) if (removed(i)) m.delete(el(i));
        const t1 = now();
        const u = Y.encodeStateAsUpdate(doc);
        const peer = new Y.Doc();
        Y.applyUpdate(peer, u);
        const pm = peer.getMap("s");
        const ok = pm.has(el(adds - 1));
        const t2 = now();
        check(ok && pm.size === adds - ROW2.removes && !pm.has(el(0)), `yjs size ${pm.size}`);
        return { ms: t2 - t0, bytes: u.byteLength, phases: { local: t1 - t0, sync: t2 - t1 } };
      },
      async automerge() {
        const { adds } = ROW2;
        const t0 = now();
        let d = A.change(A.init(), (x) => {
          x.s = {};
        });
        for (let i = 0; i < adds; i++) d = A.change(d, (x) => (x.s[el(i)] = true));
        for (let i = 0; i < adds; i++)
          if (removed(i))
            d = A.change(d, (x) => {
              delete x.s[el(i)];
            });
        const t1 = now();
        const u = A.save(d);
        const peer = A.load(u);
        const ok = peer.s[el(adds - 1)] === true;
        const t2 = now();
        const n = Object.keys(peer.s).length;
        check(ok && n === adds - ROW2.removes && !(el(0) in peer.s), `automerge size ${n}`);
        return { ms: t2 - t0, bytes: u.byteLength, phases: { local: t1 - t0, sync: t2 - t1 } };
      },
      async loro() {
        const { adds } = ROW2;
        const t0 = now();
        const doc = new LoroDoc();
        const m = doc.getMap("s");
        for (let i = 0; i < adds; i++) {
          m.set(el(i), true);
          doc.commit();
        }
        for (let i = 0; i < adds; i++)
          if (removed(i)) {
            m.delete(el(i));
            doc.commit();
          }
        const t1 = now();
        const u = doc.export({ mode: "update" });
        const peer = new LoroDoc();
        peer.import(u);
        const pm = peer.getMap("s");
        const ok = pm.get(el(adds - 1)) === true;
        const t2 = now();
        check(ok && pm.size === adds - ROW2.removes && pm.get(el(0)) === undefined, `loro size ${pm.size}`);
        return { ms: t2 - t0, bytes: u.byteLength, phases: { local: t1 - t0, sync: t2 - t1 } };
      },
    },
  },

  3: {
    title: `lww: ${ROW3.writers.toLocaleString("en")} writers (one replica each) set one register key once, then merge all into one`,
    short: "1,540 writers set one LWW key (write + merge all)",
    bytesMeaning: "sum of the merge payloads",
    impl: {
      async concord() {
        const { writers } = ROW3;
        const t0 = now();
        const clients = [];
        const docs = [];
        for (let i = 0; i < writers; i++) {
          const c = await concordReplica();
          const d = await c.open("doc");
          d.register("k").set(i);
          clients.push(c);
          docs.push(d);
        }
        const t1 = now();
        const m = await concordReplica();
        const md = await m.open("doc");
        let bytes = 0;
        for (const d of docs) {
          const u = d.encodeUpdate();
          bytes += u.byteLength;
          md.applyUpdate(u);
        }
        const v = md.register("k").get();
        const t2 = now();
        check(Number.isInteger(v) && v >= 0 && v < writers, `concord register ${v}`);
        m.close();
        for (const c of clients) c.close();
        return { ms: t2 - t0, bytes, phases: { local: t1 - t0, sync: t2 - t1 }, extra: { winner: v } };
      },
      async yjs() {
        const { writers } = ROW3;
        const t0 = now();
        const docs = [];
        for (let i = 0; i < writers; i++) {
          const d = new Y.Doc();
          d.getMap("m").set("k", i);
          docs.push(d);
        }
        const t1 = now();
        const merged = new Y.Doc();
        let bytes = 0;
        for (const d of docs) {
          const u = Y.encodeStateAsUpdate(d);
          bytes += u.byteLength;
          Y.applyUpdate(merged, u);
        }
        const v = merged.getMap("m").get("k");
        const t2 = now();
        check(Number.isInteger(v), `yjs register ${v}`);
        return { ms: t2 - t0, bytes, phases: { local: t1 - t0, sync: t2 - t1 }, extra: { winner: v } };
      },
      async automerge() {
        const { writers } = ROW3;
        const t0 = now();
        const docs = [];
        for (let i = 0; i < writers; i++) docs.push(A.change(A.init(), (x) => (x.k = i)));
        const t1 = now();
        let merged = A.init();
        let bytes = 0;
        for (const d of docs) {
          const u = A.save(d);
          bytes += u.byteLength;
          merged = A.loadIncremental(merged, u);
        }
        const v = merged.k;
        const t2 = now();
        check(Number.isInteger(v) && A.getConflicts(merged, "k") !== undefined, `automerge register ${v}`);
        return { ms: t2 - t0, bytes, phases: { local: t1 - t0, sync: t2 - t1 }, extra: { winner: v } };
      },
      async loro() {
        const { writers } = ROW3;
        const t0 = now();
        const docs = [];
        for (let i = 0; i < writers; i++) {
          const d = new LoroDoc();
          d.getMap("m").set("k", i);
          d.commit();
          docs.push(d);
        }
        const t1 = now();
        const merged = new LoroDoc();
        let bytes = 0;
        for (const d of docs) {
          const u = d.export({ mode: "update" });
          bytes += u.byteLength;
          merged.import(u);
        }
        const v = merged.getMap("m").get("k");
        const t2 = now();
        check(Number.isInteger(v), `loro register ${v}`);
        return { ms: t2 - t0, bytes, phases: { local: t1 - t0, sync: t2 - t1 }, extra: { winner: v } };
      },
    },
  },

  4: {
    title: `delta sync: a ${ROW4.keys.toLocaleString("en")}-key doc, the peer ${ROW4.behind} ops behind; time = request + encode + apply of the catch-up only (median of ${ROW4.rounds} catch-ups per run)`,
    short: "delta sync, 10,000-key doc, 100 ops behind (sync only)",
    bytesMeaning: "catch-up payload",
    // Each run builds the two peers once (untimed), then ROW4.rounds times: the first peer
    // makes ROW4.behind writes (untimed, each its own op) and the second catches up (timed).
    impl: {
      async concord() {
        const { keys, behind, rounds } = ROW4;
        const ca = await concordReplica();
        const ad = await ca.open("doc");
        for (let i = 0; i < keys; i++) ad.register(`k${i}`).set(i);
        const cb = await concordReplica();
        const bd = await cb.open("doc");
        bd.applyUpdate(ad.encodeUpdate());
        const regsA = Array.from({ length: behind }, (_, i) => ad.register(`k${i}`));
        const regsB = Array.from({ length: behind }, (_, i) => bd.register(`k${i}`));
        check(bd.register(`k${keys - 1}`).get() === keys - 1, "concord setup");
        const ms = [];
        const bytes = [];
        let request = 0;
        for (let r = 1; r <= rounds; r++) {
          for (let i = 0; i < behind; i++) regsA[i].set(keys * (r + 1) + i);
          const t0 = now();
          const v = bd.version();
          const u = ad.encodeUpdate(v);
          bd.applyUpdate(u);
          const t1 = now();
          ms.push(t1 - t0);
          bytes.push(u.byteLength);
          request = v.byteLength;
          check(regsB.every((x, i) => x.get() === keys * (r + 1) + i), "concord catch-up");
        }
        check(bd.keys().length === keys, "concord keys");
        ca.close();
        cb.close();
        return { ms: median(ms), bytes: median(bytes), phases: { sync: median(ms) }, extra: { request } };
      },
      async yjs() {
        const { keys, behind, rounds } = ROW4;
        const a = new Y.Doc();
        const am = a.getMap("m");
        a.transact(() => {
          for (let i = 0; i < keys; i++) am.set(`k${i}`, i);
        });
        const b = new Y.Doc();
        Y.applyUpdate(b, Y.encodeStateAsUpdate(a));
        const bm = b.getMap("m");
        const ms = [];
        const bytes = [];
        let request = 0;
        for (let r = 1; r <= rounds; r++) {
          for (let i = 0; i < behind; i++) am.set(`k${i}`, keys * (r + 1) + i);
          const t0 = now();
          const sv = Y.encodeStateVector(b);
          const u = Y.encodeStateAsUpdate(a, sv);
          Y.applyUpdate(b, u);
          const t1 = now();
          ms.push(t1 - t0);
          bytes.push(u.byteLength);
          request = sv.byteLength;
          check(bm.get("k0") === keys * (r + 1) && bm.get(`k${behind - 1}`) === keys * (r + 1) + behind - 1, "yjs catch-up");
        }
        check(bm.size === keys, "yjs keys");
        return { ms: median(ms), bytes: median(bytes), phases: { sync: median(ms) }, extra: { request } };
      },
      async automerge() {
        const { keys, behind, rounds } = ROW4;
        let a = A.change(A.init(), (x) => {
          for (let i = 0; i < keys; i++) x[`k${i}`] = i;
        });
        let b = A.load(A.save(a));
        const ms = [];
        const bytes = [];
        let request = 0;
        for (let r = 1; r <= rounds; r++) {
          for (let i = 0; i < behind; i++) a = A.change(a, (x) => (x[`k${i}`] = keys * (r + 1) + i));
          const t0 = now();
          const heads = A.getHeads(b);
          const u = A.saveSince(a, heads);
          b = A.loadIncremental(b, u);
          const t1 = now();
          ms.push(t1 - t0);
          bytes.push(u.byteLength);
          request = heads.length * 32;
          check(b.k0 === keys * (r + 1) && b[`k${behind - 1}`] === keys * (r + 1) + behind - 1, "automerge catch-up");
        }
        return { ms: median(ms), bytes: median(bytes), phases: { sync: median(ms) }, extra: { request } };
      },
      async loro() {
        const { keys, behind, rounds } = ROW4;
        const a = new LoroDoc();
        const am = a.getMap("m");
        for (let i = 0; i < keys; i++) am.set(`k${i}`, i);
        a.commit();
        const b = new LoroDoc();
        b.import(a.export({ mode: "update" }));
        const bm = b.getMap("m");
        const ms = [];
        const bytes = [];
        let request = 0;
        for (let r = 1; r <= rounds; r++) {
          for (let i = 0; i < behind; i++) {
            am.set(`k${i}`, keys * (r + 1) + i);
            a.commit();
          }
          const t0 = now();
          const v = b.oplogVersion();
          const u = a.export({ mode: "update", from: v });
          b.import(u);
          const t1 = now();
          ms.push(t1 - t0);
          bytes.push(u.byteLength);
          request = v.encode().byteLength;
          check(bm.get("k0") === keys * (r + 1) && bm.get(`k${behind - 1}`) === keys * (r + 1) + behind - 1, "loro catch-up");
        }
        return { ms: median(ms), bytes: median(bytes), phases: { sync: median(ms) }, extra: { request } };
      },
    },
  },
};

// ---------------------------------------------------------------- runner

const PEERS = LIBS.slice(1);
// A library whose warm-up run takes longer than this gets one measured run, not RUNS.
const SLOW_MS = 5000;

function libVersion(name) {
  try {
    return JSON.parse(readFileSync(join(root, "node_modules", name, "package.json"), "utf8")).version;
  } catch {
    return "?";
  }
}

async function measureRow(n) {
  const row = rows[n];
  const results = Object.fromEntries(LIBS.map((l) => [l, []]));
  const slow = new Set();
  const total = WARMUP + RUNS;
  for (let r = 0; r < total; r++) {
    // Rotate the order each round: no library always runs first (or right after a GC).
    const order = LIBS.map((_, i) => LIBS[(i + r) % LIBS.length]);
    for (const lib of order) {
      if (slow.has(lib) && results[lib].length >= 1) continue;
      await settle();
      const res = await row.impl[lib]();
      if (r < WARMUP && res.ms > SLOW_MS) slow.add(lib);
      if (r >= WARMUP) results[lib].push(res);
      process.stderr.write(
        `  row ${n} ${r < WARMUP ? "warm-up" : `run ${r - WARMUP + 1}/${RUNS}`} ${lib}: ${res.ms.toFixed(1)} ms, ${res.bytes} B\n`,
      );
    }
  }
  const summary = {};
  for (const lib of LIBS) {
    const rs = results[lib];
    const phases = {};
    for (const k of Object.keys(rs[0].phases)) phases[k] = median(rs.map((x) => x.phases[k]));
    summary[lib] = {
      ms: median(rs.map((x) => x.ms)),
      min: Math.min(...rs.map((x) => x.ms)),
      max: Math.max(...rs.map((x) => x.ms)),
      bytes: median(rs.map((x) => x.bytes)),
      runs: rs.length,
      phases,
      extra: rs[rs.length - 1].extra ?? {},
    };
  }
  return summary;
}

function fmtMs(ms) {
  if (ms >= 1000) return `${(ms / 1000).toFixed(2)} s`;
  if (ms >= 10) return `${ms.toFixed(0)} ms`;
  if (ms >= 1) return `${ms.toFixed(1)} ms`;
  return `${(ms * 1000).toFixed(0)} µs`;
}
function fmtBytes(b) {
  if (b >= 1024 * 1024) return `${(b / 1024 / 1024).toFixed(2)} MiB`;
  if (b >= 10 * 1024) return `${(b / 1024).toFixed(1)} KiB`;
  return `${Math.round(b).toLocaleString("en")} B`;
}
const fmtRatio = (x) => (x >= 10 ? x.toFixed(0) : x >= 1 ? x.toFixed(1) : x.toFixed(2));

function verdict(s) {
  const fastest = PEERS.reduce((a, b) => (s[b].ms < s[a].ms ? b : a));
  const smallest = PEERS.reduce((a, b) => (s[b].bytes < s[a].bytes ? b : a));
  const timeRatio = s.concord.ms / s[fastest].ms;
  const sizeRatio = s.concord.bytes / s[smallest].bytes;
  const sizeVsFastest = s.concord.bytes / s[fastest].bytes;
  const fast = timeRatio <= 0.1;
  const small = sizeRatio <= 1;
  return { fastest, smallest, timeRatio, sizeRatio, sizeVsFastest, fast, small, pass: fast && small };
}

function speedWords(r) {
  return r <= 1 ? `${fmtRatio(1 / r)}x faster` : `${fmtRatio(r)}x slower`;
}

function render(summaries, meta) {
  const L = [];
  L.push("# Concord vs Yjs, Automerge, Loro (`npm run bench`)");
  L.push("");
  L.push("Produced by:");
  L.push("");
  L.push("```sh");
  L.push(`npm run bench   # = ${meta.command}`);
  L.push("```");
  L.push("");
  L.push(
    `${meta.date} · ${meta.cores} cores · ${meta.platform} · Node ${process.versions.node} · ` +
      `concord ${meta.pkg} built ${meta.pkgBuilt} (wasm ${fmtBytes(meta.wasmBytes)}) from tree ${meta.tree} · ` +
      `yjs ${libVersion("yjs")}, @automerge/automerge ${libVersion("@automerge/automerge")}, loro-crdt ${libVersion("loro-crdt")} · ` +
      `median of ${RUNS} runs after ${WARMUP} warm-up (a library whose warm-up took over ${SLOW_MS / 1000} s: 1 run), libraries interleaved · load average when the run began: ${meta.load} ` +
      "(other processes share these cores: compare within a row, not across runs).",
  );
  L.push("");
  L.push(
    "Target: Concord **≥ 10x faster than the fastest peer on every row, and no larger on the wire**. " +
      "time ratio = Concord time / fastest peer time (≤ 0.10 meets the target); " +
      "size ratio = Concord bytes / smallest peer payload (≤ 1.00 meets it).",
  );
  L.push("");
  const NAMES = { concord: "Concord", yjs: "Yjs", automerge: "Automerge", loro: "Loro" };
  L.push(`| row | ${LIBS.map((l) => NAMES[l]).join(" | ")} | fastest peer | time ratio | size ratio | target |`);
  L.push(`|---|${LIBS.map(() => "---:").join("|")}|---|---:|---:|:-:|`);
  for (const [n, s] of summaries) {
    const v = verdict(s);
    const cell = (lib) => `${fmtMs(s[lib].ms)}<br>${fmtBytes(s[lib].bytes)}`;
    L.push(
      `| **${n}** ${rows[n].short} | ${LIBS.map(cell).join(" | ")} | ` +
        `${v.fastest} | ${fmtRatio(v.timeRatio)} (${speedWords(v.timeRatio)}) | ${fmtRatio(v.sizeRatio)} (vs ${v.smallest}) | ` +
        `${v.pass ? "yes" : `**NO** (${[!v.fast && "time", !v.small && "size"].filter(Boolean).join(", ")})`} |`,
    );
  }
  const all = summaries.every(([, s]) => verdict(s).pass);
  L.push("");
  L.push(
    `Target met on every row: **${all ? "yes" : "NO"}** ` +
      `(${summaries.filter(([, s]) => verdict(s).pass).length} of ${summaries.length} rows).`,
  );
  L.push("");
  L.push("Cells: median time, then the bytes of the sync payload (" +
    summaries.map(([n]) => `row ${n}: ${rows[n].bytesMeaning}`).join("; ") + ").");
  L.push("");
  L.push("## Details");
  for (const [n, s] of summaries) {
    const v = verdict(s);
    L.push("");
    L.push(`### ${n}. ${rows[n].title}`);
    L.push("");
    const phaseNames = Object.keys(s.concord.phases);
    L.push(`| library | runs | median | min – max | ${phaseNames.map((p) => `${p} (median)`).join(" | ")} | payload |`);
    L.push(`|---|---:|---:|---:|${phaseNames.map(() => "---:").join("|")}|---:|`);
    for (const lib of LIBS) {
      const x = s[lib];
      L.push(
        `| ${lib} | ${x.runs} | ${fmtMs(x.ms)} | ${fmtMs(x.min)} – ${fmtMs(x.max)} | ${phaseNames.map((p) => fmtMs(x.phases[p] ?? NaN)).join(" | ")} | ${x.bytes.toLocaleString("en")} B |`,
      );
    }
    L.push("");
    const c = s.concord;
    const notes = [];
    notes.push(
      `Concord / fastest peer (${v.fastest}): time ${fmtRatio(v.timeRatio)}, bytes ${fmtRatio(v.sizeVsFastest)}; ` +
        `bytes vs smallest peer (${v.smallest}): ${fmtRatio(v.sizeRatio)}.`,
    );
    const ex = c.extra;
    if (ex.request !== undefined)
      notes.push(
        `Catch-up request (the lagging peer's version): Concord ${ex.request} B; ` +
          `${PEERS.map((p) => `${p} ${s[p].extra.request} B`).join(", ")}.`,
      );
    if (n === 3)
      notes.push(`LWW winners (writer index): ${LIBS.map((l) => `${l} ${s[l].extra.winner}`).join(", ")} (each library has its own tie-break).`);
    for (const t of notes) L.push(`- ${t}`);
  }
  L.push("");
  L.push("## How each library is driven");
  L.push("");
  L.push(
    [
      "- Every operation is its own change: Yjs one transaction per `set`/`delete` (rows 1–3; row 4's 10,000-key base is one transaction), Automerge one `change` per op, Loro `commit()` after each op, Concord one accessor call per op. Results are checked (counter sums, set sizes, register values) after every run.",
      "- Row 1: Yjs emulates the counter with a `Y.Map` key per replica holding its count (value = sum); Automerge clones a base doc holding `new Counter(0)` and merges with `saveSince(replica, baseHeads)` + `loadIncremental`; Loro uses a root `LoroCounter` and `export({mode: 'update'})` + `import`; Concord uses `doc.counter('c')` (G-Counter).",
      "- Row 2: the peers emulate the set with a map (set key / delete key); Concord uses `doc.set('s')` (add-wins OR-Set). The fresh peer gets `encodeStateAsUpdate` (Yjs), `save`/`load` (Automerge), `export({mode: 'update'})` (Loro), `encodeUpdate()` (Concord: a state frame without the delta log).",
      "- Row 3: every writer is its own replica/doc (Concord: its own `Client`); payloads are applied one at a time to the merging replica.",
      "- Row 4: the peers use `encodeStateAsUpdate(doc, stateVectorOfPeer)`, `saveSince(doc, heads)` + `loadIncremental`, `export({mode: 'update', from: version})`; Concord `encodeUpdate(peer.version())` + `applyUpdate` (one `Deltas` frame). Only the catch-up is timed (setup untimed).",
      "- Concord replicas: `Client.connect({ urls: [], persist: false, broadcast: false })`; full updates with `encodeUpdate()` and `applyUpdate(bytes)`, the counterparts of the peers' calls. Closed clients give their wasm memory back when the garbage collector finalizes them, so the bench forces a GC between runs.",
    ].join("\n"),
  );
  return L.join("\n") + "\n";
}

// ---------------------------------------------------------------- main

function gitTree() {
  try {
    const rev = execFileSync("git", ["rev-parse", "--short", "HEAD"], { cwd: root, encoding: "utf8" }).trim();
    const dirty = execFileSync("git", ["status", "--porcelain"], { cwd: root, encoding: "utf8" })
      .split("\n")
      .filter(Boolean).length;
    return `${rev} + ${dirty} uncommitted paths`;
  } catch {
    return "unknown";
  }
}

const wasmPath = join(PKG, "concord_wasm_bg.wasm");
const meta = {
  command: `node bench/compare.mjs${argv.length ? " " + argv.join(" ") : ""}`,
  date: new Date().toISOString().slice(0, 16).replace("T", " ") + " UTC",
  cores: os.cpus().length,
  platform: `${os.type()} ${os.release()}`,
  load: os.loadavg().map((x) => x.toFixed(2)).join(" "),
  pkg: PKG === join(root, "pkg") ? "pkg/" : PKG,
  pkgBuilt: statSync(wasmPath).mtime.toISOString().slice(0, 16).replace("T", " "),
  wasmBytes: statSync(wasmPath).size,
  tree: gitTree(),
};

const summaries = [];
for (const n of ROWS) {
  process.stderr.write(`row ${n}: ${rows[n].title}\n`);
  summaries.push([n, await measureRow(n)]);
}
const md = render(summaries, meta);
process.stdout.write(md);
if (WRITE) {
  mkdirSync(join(root, "bench", "results"), { recursive: true });
  writeFileSync(join(root, "bench", "results", "compare.md"), md);
  process.stderr.write("written to bench/results/compare.md\n");
}
