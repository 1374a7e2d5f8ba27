// Tokens against a real relay with an auth_secret (target/debug/concord-relay): a token
// function is called on every connect, and a refused token stops reconnecting, is
// reported as an UnauthorizedError, and rejects pending synced().
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { test } from "node:test";
import WebSocket from "ws";
import { UnauthorizedError } from "concord-sync";
import { BIN, connect as connectTo, missingBinary, startRelay as start, within } from "./harness.mjs";

const SECRET = "node-auth-test-secret-0123456789";

/** A relay with SECRET; resolves with its URL once listening. */
async function startRelay() {
  return (await start(`auth_secret = "${SECRET}"`)).url;
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
  const { urls, ...rest } = options;
  return connectTo(urls[0], rest);
}

const skip = missingBinary();
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
