// The built package (pkg/, `npm run build`) through its public API in Node: every CRDT,
// toJSON per the contract, change events, validation and errors, and tab-style sync of
// two in-process clients over BroadcastChannel (Node has one) with no relay.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Client } from "concord-sync";

let n = 0;
const channel = () => `concord-test-${process.pid}-${++n}`;
const local = (extra = {}) => Client.connect({ broadcast: false, ...extra });

async function eventually(f, what) {
  for (let i = 0; i < 100; i++) {
    if (f()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.fail(`timed out waiting for ${what}`);
}

test("the contract example gives the documented toJSON", async () => {
  const client = await Client.connect({ urls: [], persist: true, broadcast: false });
  const doc = await client.open("board-1");
  doc.counter("likes").increment(1);
  doc.pnCounter("votes").increment(2);
  doc.pnCounter("votes").decrement(1);
  doc.register("title").set("Hello");
  doc.set("tags").add("rust");
  assert.equal(doc.counter("likes").value, 1);
  assert.deepEqual(doc.toJSON(), { likes: 1, votes: 1, title: "Hello", tags: ["rust"] });
  assert.equal(JSON.stringify(doc), '{"likes":1,"tags":["rust"],"title":"Hello","votes":1}');
  assert.equal(client.status, "offline");
  assert.match(client.replicaId, /^[0-9a-f]{16}$/);
  client.close();
});

test("every CRDT reads back what was written", async () => {
  const client = await local();
  const doc = await client.open("crdts");
  const likes = doc.counter("likes");
  assert.equal(likes.value, 0);
  likes.increment();
  likes.increment(41);
  assert.equal(likes.value, 42);

  const votes = doc.pnCounter("votes");
  votes.decrement(5);
  votes.increment();
  assert.equal(votes.value, -4);

  const title = doc.register("title");
  assert.equal(title.get(), undefined);
  title.set({ text: "Hi", size: 1.5, tags: ["a", null, true] });
  assert.deepEqual(title.get(), { text: "Hi", size: 1.5, tags: ["a", null, true] });
  title.set(null);
  assert.equal(title.get(), null);

  const tags = doc.set("tags");
  tags.add("rust");
  tags.add("wasm");
  tags.add(3);
  tags.add({ deep: [1] });
  tags.remove("wasm");
  tags.remove("absent");
  assert.equal(tags.has("rust"), true);
  assert.equal(tags.has("wasm"), false);
  assert.equal(tags.has({ deep: [1] }), true);
  assert.equal(tags.size, 3);
  assert.deepEqual(tags.values(), [3, "rust", { deep: [1] }]); // sorted: numbers, strings, objects
  assert.deepEqual(doc.keys(), ["likes", "tags", "title", "votes"]);
  client.close();
});

test("integers and floats keep their JSON form", async () => {
  const client = await local();
  const doc = await client.open("numbers");
  for (const v of [0, -7, 2 ** 53 - 1, 0.1, -2.5e-8, 1e300]) {
    doc.register("n").set(v);
    assert.equal(doc.register("n").get(), v);
  }
  doc.set("s").add(1);
  assert.equal(doc.set("s").has(1.0), true);
  assert.equal(doc.set("s").has(1.5), false);
  client.close();
});

test("values keep their JSON form at the edges: big integers, unicode, __proto__, undefined", async () => {
  const client = await local();
  const doc = await client.open("edges");
  const r = doc.register("r");
  for (const v of [-1, -64, 64, -65, 2 ** 52, -(2 ** 52) - 1, -(2 ** 53 - 1), 2 ** 53 - 1, "h\u00e9llo \u{1f600}", ""]) {
    r.set(v);
    assert.equal(r.get(), v);
  }
  r.set(-0);
  assert.ok(Object.is(r.get(), 0), "-0 is the integer 0");
  r.set(JSON.parse('{"__proto__": 5, "a": [1, {"b": null}]}'));
  const got = r.get();
  assert.equal(Object.getPrototypeOf(got), Object.prototype);
  assert.deepEqual(Object.keys(got), ["__proto__", "a"]);
  assert.equal(Object.getOwnPropertyDescriptor(got, "__proto__").value, 5);
  r.set({ gone: undefined, kept: [undefined, 1], bare: Object.assign(Object.create(null), { x: 1 }) });
  assert.deepEqual(r.get(), { kept: [null, 1], bare: { x: 1 } });
  let deep = 1;
  for (let i = 0; i < 32; i++) deep = [deep];
  r.set(deep);
  assert.throws(() => r.set([deep]), { name: "RangeError", message: /nested/ });
  client.close();
});

test("subscribe reports local changes with their keys, and off stops it", async () => {
  const client = await local();
  const doc = await client.open("events");
  const seen = [];
  const off = doc.subscribe((e) => seen.push(e));
  doc.counter("a").increment();
  doc.set("b").add("x");
  doc.set("b").remove("nothing"); // a no-op: no event
  off();
  doc.counter("a").increment();
  assert.deepEqual(seen, [
    { origin: "local", keys: ["a"] },
    { origin: "local", keys: ["b"] },
  ]);
  client.close();
});

test("a throwing listener does not break the write or other listeners", async () => {
  const client = await local();
  const doc = await client.open("throwing");
  let other = 0;
  doc.subscribe(() => {
    throw new Error("listener bug");
  });
  doc.subscribe(() => other++);
  // The error is rethrown in a microtask of its own; catch it there.
  const queue = globalThis.queueMicrotask;
  let rethrown;
  globalThis.queueMicrotask = (f) => {
    try {
      f();
    } catch (e) {
      rethrown = e;
    }
  };
  try {
    doc.counter("c").increment();
  } finally {
    globalThis.queueMicrotask = queue;
  }
  assert.equal(doc.counter("c").value, 1);
  assert.equal(other, 1);
  assert.equal(rethrown?.message, "listener bug");
  client.close();
});

test("wrong types and bad values throw errors that say what to do", async () => {
  const client = await local();
  const doc = await client.open("errors");
  doc.counter("likes").increment();

  assert.throws(() => doc.register("likes"), { name: "TypeError", message: /holds a counter, not a register; use another key/ });
  assert.throws(() => doc.counter("likes").increment(-1), { name: "RangeError", message: /pnCounter/ });
  assert.throws(() => doc.counter("likes").increment(1.5), { name: "RangeError" });
  assert.throws(() => doc.counter("likes").increment("1"), { name: "TypeError" });
  assert.throws(() => doc.pnCounter("v").increment(2 ** 60), { name: "RangeError" });
  assert.throws(() => doc.register("r").set(NaN), { name: "RangeError", message: /null or a string/ });
  assert.throws(() => doc.register("r").set(undefined), { name: "TypeError", message: /use null/ });
  assert.throws(() => doc.register("r").set(10n), { name: "TypeError", message: /JSON-compatible/ });
  assert.throws(() => doc.register("r").set(new Date()), { name: "TypeError" });
  assert.throws(() => doc.set("s").add(() => 1), { name: "TypeError" });
  const cyclic = {};
  cyclic.self = cyclic;
  assert.throws(() => doc.register("r").set(cyclic), { name: "RangeError", message: /nested/ });
  assert.throws(() => doc.counter(7), { name: "TypeError" });
  assert.deepEqual(doc.toJSON(), { likes: 1 }, "nothing invalid was written");

  await assert.rejects(doc.synced(), { message: /needs a relay/ });
  await assert.rejects(client.open(""), { name: "RangeError" });
  await assert.rejects(client.open("x".repeat(513)), { name: "RangeError" });
  await assert.rejects(client.open(42), { name: "TypeError" });
  client.close();
  assert.throws(() => doc.counter("likes").increment(), { message: /closed/ });
  await assert.rejects(client.open("again"), { message: /closed/ });
});

test("options are checked", async () => {
  await assert.rejects(Client.connect({ urls: ["http://x"] }), { name: "TypeError", message: /ws:\/\// });
  await assert.rejects(Client.connect({ urls: "ws://x" }), { name: "TypeError" });
  await assert.rejects(Client.connect({ urls: ["ws://127.0.0.1:9/sync"] }), {
    name: "TypeError",
    message: /webSocket.*ws/,
  });
  await assert.rejects(Client.connect({ persist: "yes" }), { name: "TypeError" });
  await assert.rejects(Client.connect(null), { name: "TypeError" });
});

test("open returns the same Doc for the same id", async () => {
  const client = await local();
  const [a, b] = await Promise.all([client.open("same"), client.open("same")]);
  assert.equal(a, b);
  assert.equal(a.id, "same");
  client.close();
});

test("two clients converge over BroadcastChannel with no relay", async () => {
  const name = channel();
  const a = await Client.connect({ broadcast: name });
  const b = await Client.connect({ broadcast: name });
  const da = await a.open("tabs");
  da.counter("likes").increment(2);
  da.set("tags").add("before-b-opened");
  const db = await b.open("tabs");
  await eventually(() => db.counter("likes").value === 2, "b to catch up on open");

  const remote = [];
  da.subscribe((e) => remote.push(e));
  db.pnCounter("votes").decrement(3);
  db.register("title").set("from b");
  da.set("tags").remove("before-b-opened");
  await eventually(() => JSON.stringify(da) === JSON.stringify(db), "convergence");
  assert.deepEqual(da.toJSON(), { likes: 2, tags: [], title: "from b", votes: -3 });
  assert.ok(remote.some((e) => e.origin === "remote" && e.keys.includes("title")));

  // A concurrent add wins over a remove that did not see it (OR-Set).
  db.set("tags").add("x");
  await eventually(() => da.set("tags").has("x"), "x at a");
  a.close(); // a stops hearing b
  db.set("tags").remove("x");
  assert.equal(db.set("tags").has("x"), false);
  b.close();
});

test("remote change events name every changed key exactly, whatever characters it holds", async () => {
  const [a, b] = [await local(), await local()];
  const [da, db] = [await a.open("keys"), await b.open("keys")];
  const odd = ['say "hi"', "back\\slash", "line\nbreak\ttab\u0001", "ünï 😀", "", "plain"];
  for (const k of odd) da.counter(k).increment(1);
  const heard = [];
  db.subscribe((e) => heard.push(e));
  db.applyUpdate(da.encodeUpdate());
  assert.equal(heard.length, 1);
  assert.equal(heard[0].origin, "remote");
  assert.deepEqual([...heard[0].keys].sort(), [...odd].sort());
  a.close();
  b.close();
});

test("remote changes reach listeners that come and go; leaving after close is quiet", async () => {
  const [a, b] = [await local(), await local()];
  const [da, db] = [await a.open("from"), await b.open("to")];
  const heard = [];
  const sync = (n) => {
    da.counter("likes").increment(n);
    db.applyUpdate(da.encodeUpdate(db.version()));
  };
  sync(1); // nobody listens yet
  const off1 = db.subscribe((e) => heard.push(["one", e.keys]));
  const off2 = db.subscribe((e) => heard.push(["two", e.keys]));
  sync(2);
  off1();
  off1(); // twice: harmless
  sync(3); // the second listener still hears
  off2();
  sync(4); // nobody again
  const off3 = db.subscribe((e) => heard.push(["three", e.keys]));
  sync(5);
  assert.deepEqual(heard, [
    ["one", ["likes"]],
    ["two", ["likes"]],
    ["two", ["likes"]],
    ["three", ["likes"]],
  ]);
  assert.equal(db.counter("likes").value, 15, "every update applied, listened to or not");
  a.close();
  b.close();
  off3();
  assert.doesNotThrow(() => db.subscribe(() => {})());
});

test("encodeUpdate / applyUpdate carry what the other replica lacks, over any transport", async () => {
  const [a, b] = [await local(), await local()];
  const [da, db] = [await a.open("left"), await b.open("right")];
  da.counter("likes").increment(3);
  da.set("tags").add("rust");
  db.pnCounter("votes").decrement(2);

  const heard = [];
  db.subscribe((e) => heard.push(e));
  const full = da.encodeUpdate();
  assert.ok(full instanceof Uint8Array && full.length > 0);
  db.applyUpdate(full);
  assert.deepEqual(db.toJSON(), { likes: 3, tags: ["rust"], votes: -2 });
  assert.equal(heard.length, 1);
  assert.equal(heard[0].origin, "remote");

  // Incremental: a asks for what it lacks since its own version.
  const back = db.encodeUpdate(da.version());
  const everything = db.encodeUpdate();
  assert.ok(back.length < everything.length, `since a's version: ${back.length} B, not all ${everything.length} B`);
  da.applyUpdate(back);
  assert.deepEqual(da.toJSON(), db.toJSON());
  // Nothing lacking: an update that changes nothing, applied twice harmlessly.
  const none = da.encodeUpdate(db.version());
  da.applyUpdate(none);
  da.applyUpdate(back);
  assert.deepEqual(da.toJSON(), { likes: 3, tags: ["rust"], votes: -2 });

  // Bad input throws a TypeError that says what to pass, and changes nothing.
  const before = JSON.stringify(db);
  assert.throws(() => db.applyUpdate(new Uint8Array([3, 1, 2, 3])), (e) => e instanceof TypeError && /encodeUpdate/.test(e.message));
  assert.throws(() => db.applyUpdate(full.subarray(0, full.length - 2)), TypeError);
  assert.throws(() => db.applyUpdate("nope"), TypeError);
  assert.throws(() => da.encodeUpdate(new Uint8Array([9, 9])), (e) => e instanceof TypeError && /version/.test(e.message));
  assert.equal(JSON.stringify(db), before);
  a.close();
  b.close();
  assert.throws(() => da.encodeUpdate(), /closed/);
});
