// Writes the relay refuses (over a configured limit, malformed) reject `synced()` with a
// typed WriteRefusedError within seconds instead of hanging, and are reported to
// onError; nothing of them reaches other clients.
import assert from "node:assert/strict";
import { test } from "node:test";
import { WriteRefusedError } from "concord-sync";
import { connect, missingBinary, startRelay, within } from "./harness.mjs";

const skip = missingBinary() ?? false;

test("a set over max_set_elements rejects synced() with TOO_LARGE, and others never see it", { skip }, async () => {
  const relay = await startRelay("[limits]\nmax_set_elements = 1000\nmax_value_bytes = 256");
  const writer = await connect(relay.url);
  const errors = [];
  writer.onError((e) => errors.push(e));
  const doc = await writer.open("board");
  const set = doc.set("tags");
  for (let i = 0; i < 1000; i++) set.add(`t${i}`);
  await within(10_000, doc.synced(), "1000 elements to be acknowledged");

  set.add("one-too-many");
  const err = await within(10_000, doc.synced().then(() => null, (e) => e), "the refusal");
  assert.ok(err instanceof WriteRefusedError, `${err}`);
  assert.equal(err.code, "TOO_LARGE");
  assert.equal(err.doc, "board");
  assert.match(err.message, /1001 elements; the limit is 1000/);
  // Sticky: the writes after it depend on it.
  await assert.rejects(doc.synced(), WriteRefusedError);
  assert.ok(errors.some((e) => e instanceof WriteRefusedError), "reported to onError");

  // A fresh reader gets the 1000 acknowledged elements, not the refused one.
  const reader = await connect(relay.url);
  const view = await reader.open("board");
  await within(10_000, view.synced(), "a fresh reader to sync");
  assert.equal(view.set("tags").values().length, 1000);
  assert.ok(!view.set("tags").has("one-too-many"));

  // A value over max_value_bytes, in another document.
  const other = await writer.open("notes");
  other.register("body").set("x".repeat(300));
  const big = await within(10_000, other.synced().then(() => null, (e) => e), "the refusal");
  assert.ok(big instanceof WriteRefusedError && big.code === "TOO_LARGE", `${big}`);
});

test("document ids the relay would refuse are refused locally", async () => {
  const c = await connect("ws://127.0.0.1:9/sync");
  for (const id of ["", "a\u0000b", "../x", "a/./b", "tab\tid", "x".repeat(513)]) {
    await assert.rejects(c.open(id), RangeError, JSON.stringify(id));
  }
  await c.open("org/team.v2/..x");
});
