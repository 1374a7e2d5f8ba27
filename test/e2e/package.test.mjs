// The built package (pkg/) in headless Chromium through its public API, with no relay:
// every CRDT, IndexedDB persistence across closing and reopening a client, and tabs of
// one origin converging over BroadcastChannel. (The transports are the package's
// JavaScript, js/client.js; wasm/tests/web.rs covers the wasm replica on its own.)
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { createServer } from "node:http";
import { extname, join, normalize } from "node:path";
import { after, before, test } from "node:test";
import { ROOT } from "./lib/cluster.mjs";
import { launchBrowser } from "./lib/browser.mjs";

const PAGE = `<!doctype html><meta charset="utf-8"><title>concord-sync</title>
<script type="importmap">{ "imports": { "concord-sync": "/pkg/browser.js" } }</script>
<script type="module">
  import { Client } from "concord-sync";
  window.Client = Client;
  window.until = async (f, what) => {
    for (let i = 0; i < 200; i++) {
      if (await f()) return;
      await new Promise((r) => setTimeout(r, 20));
    }
    throw new Error("timed out waiting for " + what);
  };
  window.sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  document.body.dataset.ready = "true";
</script><body></body>`;

let server;
let base;
let browser;
let context;

before(async () => {
  if (!existsSync(join(ROOT, "pkg", "browser.js"))) throw new Error("pkg/ missing: run `npm run build` first");
  const types = { ".js": "text/javascript", ".wasm": "application/wasm" };
  server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    if (path === "/") {
      res.writeHead(200, { "content-type": "text/html" }).end(PAGE);
      return;
    }
    const file = normalize(join(ROOT, path));
    if (!file.startsWith(join(ROOT, "pkg")) || !existsSync(file)) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" });
    res.end(readFileSync(file));
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  base = `http://127.0.0.1:${server.address().port}/`;
  browser = await launchBrowser();
  context = await browser.newContext();
});

after(async () => {
  await browser?.close();
  server?.close();
});

async function page() {
  const p = await context.newPage();
  p.errors = [];
  p.on("pageerror", (e) => p.errors.push(e.message));
  await p.goto(base);
  await p.waitForFunction(() => document.body.dataset.ready === "true");
  return p;
}

const unique = (prefix) => `${prefix}-${Date.now()}-${Math.random().toString(36).slice(2)}`;

test("every CRDT works through the JS API in Chromium", async () => {
  const p = await page();
  const out = await p.evaluate(async () => {
    const client = await Client.connect({ broadcast: false, persist: false });
    const doc = await client.open("board-1");
    doc.counter("likes").increment(1);
    doc.counter("likes").increment(2);
    doc.pnCounter("votes").increment(2);
    doc.pnCounter("votes").decrement(3);
    doc.register("title").set("Hello");
    doc.register("title").set({ text: "Hello, world", size: 1.5 });
    doc.set("tags").add("rust");
    doc.set("tags").add("wasm");
    doc.set("tags").remove("wasm");
    doc.set("tags").remove("never-added");
    const errors = [];
    for (const f of [() => doc.set("likes").add("x"), () => doc.counter("likes").increment(-1), () => doc.register("r").set(NaN)]) {
      try {
        f();
      } catch (e) {
        errors.push(e.name);
      }
    }
    const r = {
      json: doc.toJSON(),
      has: [doc.set("tags").has("rust"), doc.set("tags").has("wasm")],
      status: client.status,
      errors,
    };
    client.close();
    return r;
  });
  assert.deepEqual(out, {
    json: { likes: 3, tags: ["rust"], title: { size: 1.5, text: "Hello, world" }, votes: -1 },
    has: [true, false],
    status: "offline",
    errors: ["TypeError", "RangeError", "RangeError"],
  });
  assert.deepEqual(p.errors, []);
  await p.close();
});

test("IndexedDB persistence survives closing and reopening the client", async () => {
  const p = await page();
  const database = unique("concord-test");
  const out = await p.evaluate(async (database) => {
    const opts = { database, broadcast: false };
    let c = await Client.connect(opts);
    const firstId = c.replicaId;
    let d = await c.open("board");
    d.counter("likes").increment(2);
    d.set("tags").add("rust");
    await sleep(50); // the outbox write (no snapshot yet: under a second old)
    d.register("title").set("saved by close");
    c.close();

    c = await Client.connect(opts);
    const newId = c.replicaId !== firstId;
    d = await c.open("board");
    const reopened = d.toJSON();
    d.counter("likes").increment(1); // on top, under the new id
    await sleep(1200); // long enough for a snapshot that folds the outbox in
    c.close();

    c = await Client.connect(opts);
    d = await c.open("board");
    const third = d.toJSON();
    const other = (await c.open("other")).toJSON();
    c.close();
    return { newId, reopened, third, other };
  }, database);
  assert.deepEqual(out, {
    newId: true,
    reopened: { likes: 2, tags: ["rust"], title: "saved by close" },
    third: { likes: 3, tags: ["rust"], title: "saved by close" },
    other: {},
  });
  assert.deepEqual(p.errors, []);
  await p.close();
});

test("two tabs sharing one database lose nothing of each other", async () => {
  const p = await page();
  const database = unique("concord-tabs");
  const broadcast = unique("concord-tabs-channel");
  const out = await p.evaluate(
    async ({ database, broadcast }) => {
      const a = await Client.connect({ database, broadcast });
      const b = await Client.connect({ database, broadcast });
      const da = await a.open("board");
      const db = await b.open("board");
      da.counter("likes").increment(1);
      db.counter("likes").increment(10);
      da.set("tags").add("a");
      await until(() => JSON.stringify(da) === JSON.stringify(db), "a and b to converge");
      await sleep(1200); // both write snapshots of their own
      db.set("tags").add("b"); // only in b's outbox
      await sleep(50);
      a.close();
      b.close();

      const c = await Client.connect({ database, broadcast: false });
      const first = (await c.open("board")).toJSON();
      await sleep(1200); // c folds both snapshots and the outbox into one
      c.close();
      const d = await Client.connect({ database, broadcast: false });
      const second = (await d.open("board")).toJSON();
      d.close();
      return { first, second };
    },
    { database, broadcast },
  );
  const want = { likes: 11, tags: ["a", "b"] };
  assert.deepEqual(out, { first: want, second: want });
  assert.deepEqual(p.errors, []);
  await p.close();
});

test("a second client on the same origin receives deltas over BroadcastChannel with no relay", async () => {
  const broadcast = unique("concord-channel");
  const opts = { broadcast, persist: false };
  const [pa, pb, pc] = [await page(), await page(), await page()];
  const json = (p) => p.evaluate(() => JSON.stringify(window.doc));
  const open = (p) =>
    p.evaluate(async (opts) => {
      window.client = await Client.connect(opts);
      window.doc = await client.open("shared");
      window.events = [];
      doc.subscribe((e) => events.push(e));
    }, opts);

  await open(pa);
  await pa.evaluate(() => doc.counter("likes").increment(5)); // before b opens: b catches up
  await open(pb);
  await pb.evaluate(() => until(() => doc.counter("likes").value === 5, "catch-up on open"));

  await pa.evaluate(() => doc.set("tags").add("live"));
  await pb.evaluate(() => {
    doc.pnCounter("votes").decrement(2);
    doc.register("title").set("from b");
  });
  const want = '{"likes":5,"tags":["live"],"title":"from b","votes":-2}';
  for (const p of [pa, pb]) await p.evaluate((want) => until(() => JSON.stringify(doc) === want, want), want);
  const seen = await pa.evaluate(() => events.map((e) => `${e.origin}:${e.keys.join(",")}`));
  // b's two writes, made in one task, travel together: one remote change naming both keys.
  assert.deepEqual(seen, ["local:likes", "local:tags", "remote:title,votes"]);

  // A third tab with its own write converges with both (subscribe back).
  await open(pc);
  await pc.evaluate(() => doc.counter("likes").increment(1));
  for (const p of [pa, pb, pc]) await p.evaluate(() => until(() => doc.counter("likes").value === 6, "likes 6"));
  assert.equal(await json(pa), await json(pc));
  assert.equal(await json(pb), await json(pc));
  for (const p of [pa, pb, pc]) {
    assert.deepEqual(p.errors, []);
    await p.evaluate(() => client.close());
    await p.close();
  }
});
