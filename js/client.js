// The public API of `concord-sync` (see DESIGN.md, "JavaScript API"): `Client`, `Doc`
// and one small accessor class per CRDT, over the wasm replica (`Replica`, `DocHandle`).
//
// The replica is sans-IO: every data decision (what to send, what to apply, when a
// document is synced) is made in Rust. This file moves bytes and keeps time: the relay
// WebSocket (failover, backoff, liveness), the BroadcastChannel to the other tabs, and
// IndexedDB. They are written here rather than with web-sys because each DOM call costs
// one line of JS, where from Rust it costs wasm code plus generated glue.
import { Replica } from "./concord_wasm.js";

let loader = null;
let loaded = null;

/** Set by the entry point (browser.js / node.js): how to load the .wasm file. */
export function setLoader(fn) {
  loader = fn;
}

function ready() {
  return (loaded ??= loader());
}

/** Minimum time between two snapshots of a document. */
const SNAPSHOT_MS = 1000;
/** Period of the session tick. */
const TICK_MS = 1000;
/** A connection that has not said hello after this long is given up. */
const CONNECT_TIMEOUT_MS = 10_000;
/** An online connection silent for this long (while subscribed) is presumed dead. */
const SILENCE_MS = 75_000;

/** Delay before reconnect attempt `attempt` (0-based): 250 ms doubling up to 30 s, with
 * "equal jitter" (half fixed, half random) so a fleet of tabs does not reconnect in step. */
export function backoff(attempt, random) {
  const cap = Math.min(250 * 2 ** Math.min(attempt, 16), 30_000);
  return cap / 2 + (cap / 2) * random;
}

const closedError = () => new Error("this client is closed; call Client.connect() again");

/** The relay refused the token (protocol error UNAUTHORIZED, close 1008). The client
 * stops reconnecting until `client.reconnect()`: retrying the same token cannot help. */
export class UnauthorizedError extends Error {
  constructor(message) {
    super(message);
    this.name = "UnauthorizedError";
    /** Always "UNAUTHORIZED". */
    this.code = "UNAUTHORIZED";
  }
}

/** The relay refused writes to a document: too large for its limits (`code`
 * "TOO_LARGE"), malformed ("INVALID") or not allowed by the token ("FORBIDDEN"). Nothing
 * of the refused frame was applied there, and the writes that follow it in this replica
 * depend on it, so `synced()` on the document rejects with this error from now on;
 * reopen the document from the relay (e.g. in a fresh client) to continue. */
export class WriteRefusedError extends Error {
  constructor(doc, message) {
    super(message);
    this.name = "WriteRefusedError";
    /** The document. */
    this.doc = doc;
    /** "TOO_LARGE", "INVALID" or "FORBIDDEN". */
    this.code = (/^relay error \((\w+)\)/.exec(message)?.[1] ?? "invalid").toUpperCase();
  }
}

/** How the wasm replica reports the relay's UNAUTHORIZED error (see wasm/src/replica.rs). */
const UNAUTHORIZED_PREFIX = "relay error (unauthorized)";

// A listener that throws must not break the caller or the other listeners; rethrow it
// where it will be reported (an uncaught error in its own task).
function safeCall(fn, arg) {
  try {
    fn(arg);
  } catch (e) {
    queueMicrotask(() => {
      throw e;
    });
  }
}

function listeners() {
  const set = new Set();
  return {
    add(fn) {
      if (typeof fn !== "function") throw new TypeError("pass a function");
      set.add(fn);
      return () => set.delete(fn);
    },
    emit(arg) {
      if (set.size) for (const fn of [...set]) safeCall(fn, arg);
    },
    get size() {
      return set.size;
    },
    clear() {
      set.clear();
    },
  };
}

// ---- options ----

function parseOptions(o) {
  const t = (msg) => new TypeError(`options.${msg}`);
  const urls = o.urls ?? [];
  if (!Array.isArray(urls)) throw t("urls must be an array of ws:// or wss:// URLs");
  for (const u of urls) {
    if (typeof u !== "string" || !/^wss?:\/\//.test(u)) throw t("urls must hold ws:// or wss:// URL strings");
  }
  if (o.token != null && typeof o.token !== "string" && typeof o.token !== "function") {
    throw t("token must be a string or a function returning one (or a promise of one)");
  }
  if (o.persist !== undefined && typeof o.persist !== "boolean") throw t("persist must be a boolean");
  const webSocket = o.webSocket ?? globalThis.WebSocket;
  if (typeof webSocket !== "function" && urls.length) {
    throw new TypeError(
      'this runtime has no WebSocket: pass options.webSocket (in Node: `import WebSocket from "ws"`)',
    );
  }
  const b = o.broadcast;
  if (!(b === undefined || typeof b === "boolean" || typeof b === "string")) {
    throw t("broadcast must be a boolean or a channel name");
  }
  if (o.database !== undefined && typeof o.database !== "string") throw t("database must be a string");
  return {
    urls: [...urls],
    token: o.token ?? undefined,
    persist: o.persist ?? true,
    webSocket,
    channel: b === false ? null : typeof b === "string" ? b : "concord",
    database: o.database ?? "concord",
  };
}

// ---- IndexedDB ----
//
// Schema (database `concord` by default, version 1, two object stores):
// - `snapshots`: key [docId, replicaHex] -> Uint8Array of `Document::encode()`; one per
//   document per client session that wrote it, so tabs never overwrite each other.
// - `outbox`: key [docId, replicaHex, seq] -> Uint8Array of `Delta::encode()`; every local
//   write, persisted at once (one small put), until a snapshot covers it.
// A snapshot, the deletion of the outbox entries it covers and of the older snapshots
// merged into it are written in one transaction, so at every instant each write is
// durable in an outbox entry or a snapshot. The replica id is part of every key: it is
// written in the same transaction as the data it minted.

const STORES = ["snapshots", "outbox"];

const done = (r) =>
  new Promise((ok, ko) => {
    r.onsuccess = () => ok(r.result);
    r.onerror = () => ko(r.error);
  });

async function openStore(name) {
  const idb = globalThis.indexedDB;
  if (!idb) return null; // Node: documents stay in memory
  const r = idb.open(name, 1);
  r.onupgradeneeded = () => {
    for (const s of STORES) if (!r.result.objectStoreNames.contains(s)) r.result.createObjectStore(s);
  };
  const db = await done(r);
  return {
    /** Every snapshot and outbox entry of `doc`: `[[[key, bytes]...], [[key, bytes]...]]`. */
    async load(doc) {
      const tx = db.transaction(STORES, "readonly");
      // Keys [doc, ...] sort between [doc] and [doc, []] (arrays sort after strings).
      const range = IDBKeyRange.bound([doc], [doc, []]);
      // Issue every request before awaiting any: the transaction commits once it has no
      // pending request, and an await may return after that.
      const reqs = STORES.map((s) => [done(tx.objectStore(s).getAllKeys(range)), done(tx.objectStore(s).getAll(range))]);
      const out = [];
      for (const [keys, values] of reqs) {
        const [k, v] = [await keys, await values];
        out.push(k.map((key, i) => [key, v[i]]));
      }
      return out;
    },
    /** Writes `b` in one transaction; resolves once it is durable. */
    write(b) {
      return new Promise((ok, ko) => {
        const tx = db.transaction(STORES, "readwrite");
        const [snaps, outbox] = STORES.map((s) => tx.objectStore(s));
        for (const k of b.dropSnapshots) snaps.delete(k);
        for (const k of b.dropOutbox) outbox.delete(k);
        for (const [k, v] of b.snapshots) snaps.put(v, k);
        for (const [k, v] of b.outbox) outbox.put(v, k);
        tx.oncomplete = ok;
        tx.onerror = tx.onabort = () => ko(tx.error);
      });
    },
    close() {
      db.close(); // pending transactions still complete
    },
  };
}

// ---- values ----
//
// Register and set values cross into wasm as bytes in the core's `Value` encoding
// (core/src/value.rs, `impl Wire for Value`): a kind byte (0 null, 1 bool, 2 integer,
// 3 float, 4 string, 5 array, 6 object), then a 0/1 byte, a zig-zag LEB128 varint, 8
// little-endian bytes, or a length (LEB128) and the UTF-8 bytes / items / key-value
// pairs. Walking a JS value here costs a few lines; from Rust it costs wasm code and one
// imported glue function per JS operation. Safe integers are integers, other finite
// numbers floats; like JSON.stringify, `undefined` properties are skipped and
// `undefined` array items are null.

const MAX_DEPTH = 32; // MAX_VALUE_DEPTH in core/src/value.rs
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();
const f64 = new DataView(new ArrayBuffer(8));

// The encoder's buffer, reused across calls (the glue copies the result into wasm memory
// at once), and its length.
let buf = new Uint8Array(256);
let len = 0;

/** Room for `k` more bytes. */
function room(k) {
  if (len + k > buf.length) {
    const b = new Uint8Array(2 * (len + k));
    b.set(buf.subarray(0, len));
    buf = b;
  }
}

/** A non-negative integer below 2^53, as a LEB128 varint. */
function putVarint(x) {
  room(8);
  for (; x >= 128; x = Math.floor(x / 128)) buf[len++] = (x % 128) | 128;
  buf[len++] = x;
}

function putStr(s) {
  const n = s.length;
  room(n + 1);
  if (n < 128) {
    // ASCII fast path: one length byte, one byte per character.
    let i = 0;
    const at = len++;
    for (; i < n; i++) {
      const c = s.charCodeAt(i);
      if (c > 127) break;
      buf[len++] = c;
    }
    if (i === n) return void (buf[at] = n);
    len = at;
  }
  const u = utf8.encode(s);
  putVarint(u.length);
  room(u.length);
  buf.set(u, len);
  len += u.length;
}

function putValue(v, depth) {
  room(10);
  if (v === null) return void (buf[len++] = 0);
  switch (typeof v) {
    case "boolean":
      buf[len++] = 1;
      buf[len++] = v ? 1 : 0;
      return;
    case "number":
      if (Number.isSafeInteger(v)) {
        // Zig-zag (2v, or 2|v| - 1 for v < 0) without forming it: 2|v| - 1 may not be a
        // double. Its low 7 bits first, then the rest as a varint.
        const k = v < 0 ? -v - 1 : v;
        const rest = Math.floor(k / 64);
        buf[len++] = 2;
        buf[len++] = (2 * (k % 64) + (v < 0)) | (rest ? 128 : 0);
        if (rest) putVarint(rest);
        return;
      }
      if (!Number.isFinite(v)) throw new RangeError("NaN and Infinity are not JSON values; store null or a string instead");
      buf[len++] = 3;
      f64.setFloat64(0, v, true);
      for (let i = 0; i < 8; i++) buf[len++] = f64.getUint8(i);
      return;
    case "string":
      buf[len++] = 4;
      return putStr(v);
    case "undefined":
      throw new TypeError("undefined is not a JSON value; use null");
    case "object": {
      if (depth >= MAX_DEPTH) throw new RangeError("value is nested more than 32 levels deep (or is circular); flatten it");
      if (Array.isArray(v)) {
        buf[len++] = 5;
        putVarint(v.length);
        for (let i = 0; i < v.length; i++) putValue(v[i] === undefined ? null : v[i], depth + 1);
        return;
      }
      const p = Object.getPrototypeOf(v);
      if (p === null || Object.getPrototypeOf(p) === null) {
        // The count goes first but is known only after the walk (undefined values are
        // skipped): reserve as many bytes as the key count takes, then fill them in as a
        // varint padded with continuation bytes (which the core reads as the same number).
        const keys = Object.keys(v);
        let w = 1;
        for (let m = keys.length; m >= 128; m = Math.floor(m / 128)) w++;
        buf[len++] = 6;
        const at = len;
        room(w);
        len += w;
        let count = 0;
        for (const k of keys) {
          const x = v[k];
          if (x !== undefined) putStr(k), putValue(x, depth + 1), count++;
        }
        for (let i = 0; i < w; i++, count = Math.floor(count / 128)) buf[at + i] = (count % 128) | (i < w - 1 ? 128 : 0);
        return;
      }
    }
  }
  throw new TypeError(
    "values must be JSON-compatible (null, boolean, number, string, array or plain object); " +
      "convert BigInt, Date, Map, Set, class instances and functions first",
  );
}

/** The bytes of a JSON-compatible value, valid until the next call; throws
 * TypeError/RangeError as JSON would. A getter of `v` that encodes a value itself
 * (re-entrance) gets a buffer of its own. */
function encodeValue(v) {
  const [outer, outerLen] = [buf, len];
  if (outerLen) buf = new Uint8Array(64); // re-entered from a getter
  len = 0;
  try {
    putValue(v, 0);
    return buf.subarray(0, len);
  } finally {
    if (outerLen) [buf, len] = [outer, outerLen];
    else len = 0;
  }
}

// The decoder's input and position.
let inp;
let pos = 0;

function getVarint() {
  let x = 0;
  let scale = 1;
  for (; inp[pos] & 128; scale *= 128) x += (inp[pos++] & 127) * scale;
  return x + inp[pos++] * scale;
}

function getStr() {
  const n = getVarint();
  if (n < 32) {
    // Short ASCII fast path (TextDecoder has a fixed cost per call).
    let s = "";
    for (let i = pos; i < pos + n; i++) {
      if (inp[i] > 127) return fromUtf8.decode(inp.subarray(pos, (pos += n)));
      s += String.fromCharCode(inp[i]);
    }
    pos += n;
    return s;
  }
  return fromUtf8.decode(inp.subarray(pos, (pos += n)));
}

function getValue() {
  switch (inp[pos++]) {
    case 0:
      return null;
    case 1:
      return inp[pos++] === 1;
    case 2: {
      // Zig-zag: the low bit of the first byte is the sign; |v| (or |v| - 1) is the
      // rest. Exact below 2^53 (all JS writes), the nearest double or so beyond.
      const c = inp[pos++];
      const k = ((c & 127) >> 1) + (c & 128 ? 64 * getVarint() : 0);
      return c & 1 ? -k - 1 : k;
    }
    case 3:
      for (let k = 0; k < 8; k++) f64.setUint8(k, inp[pos++]);
      return f64.getFloat64(0, true);
    case 4:
      return getStr();
    case 5: {
      const a = new Array(getVarint());
      for (let k = 0; k < a.length; k++) a[k] = getValue();
      return a;
    }
    default: {
      const o = {};
      for (let k = getVarint(); k > 0; k--) {
        const key = getStr();
        const x = getValue();
        // `o[key] = x` would set the prototype for "__proto__".
        if (key === "__proto__") Object.defineProperty(o, key, { value: x, writable: true, enumerable: true, configurable: true });
        else o[key] = x;
      }
      return o;
    }
  }
}

/** The JS value of bytes written by the core (plain data; `undefined` for no bytes). */
function decodeValue(b) {
  if (!b.length) return undefined;
  [inp, pos] = [b, 0];
  const v = getValue();
  inp = null;
  return v;
}

// ---- the public API ----

// Operation codes of the wasm `DocHandle` (`op` in wasm/src/api.rs): `write(op, key, n,
// value)`, `number(op, key, value)`, `bytes(op, key)`.
const INCREMENT = 0;
const PN_ADD = 1;
const SET_REGISTER = 2;
const SET_ADD = 3;
const SET_REMOVE = 4;
const LISTEN = 5;
const COUNTER = 0;
const PN_COUNTER = 1;
const KIND = 2;
const SET_HAS = 3;
const REGISTER = 0;
const SET_VALUES = 1;
const DOCUMENT = 2;
const KEYS = 3;
const VERSION = 4;
const NONE = undefined; // no value: wasm-bindgen passes a null pointer, no allocation
const EMPTY = new Uint8Array(0); // `since` of a replica that has nothing
/** Names of the types `number(KIND, ..)` reports, from 1. */
const KINDS = [, "counter", "pn-counter", "register", "set"];

function amount(n, what) {
  if (n === undefined) return 1;
  if (typeof n !== "number") throw new TypeError(`${what} takes a number (default 1)`);
  return n;
}

/** G-Counter: grows only. */
export class Counter {
  #h;
  #key;
  constructor(h, key) {
    this.#h = h;
    this.#key = key;
  }
  /** Adds `n` (default 1, must be >= 0). */
  increment(n) {
    this.#h.write(INCREMENT, this.#key, amount(n, "increment"), NONE);
  }
  get value() {
    return this.#h.number(COUNTER, this.#key, NONE);
  }
}

/** PN-Counter: up and down. */
export class PnCounter {
  #h;
  #key;
  constructor(h, key) {
    this.#h = h;
    this.#key = key;
  }
  increment(n) {
    this.#h.write(PN_ADD, this.#key, amount(n, "increment"), NONE);
  }
  decrement(n) {
    this.#h.write(PN_ADD, this.#key, -amount(n, "decrement"), NONE);
  }
  get value() {
    return this.#h.number(PN_COUNTER, this.#key, NONE);
  }
}

/** Last-writer-wins register of a JSON-compatible value. */
export class Register {
  #h;
  #key;
  constructor(h, key) {
    this.#h = h;
    this.#key = key;
  }
  set(value) {
    this.#h.write(SET_REGISTER, this.#key, 0, encodeValue(value));
  }
  /** The value, or `undefined` when never set. */
  get() {
    return decodeValue(this.#h.bytes(REGISTER, this.#key));
  }
  get value() {
    return this.get();
  }
}

/** Add-wins set of JSON-compatible values. */
export class CrdtSet {
  #h;
  #key;
  constructor(h, key) {
    this.#h = h;
    this.#key = key;
  }
  add(value) {
    this.#h.write(SET_ADD, this.#key, 0, encodeValue(value));
  }
  remove(value) {
    this.#h.write(SET_REMOVE, this.#key, 0, encodeValue(value));
  }
  has(value) {
    return this.#h.number(SET_HAS, this.#key, encodeValue(value)) === 1;
  }
  /** The elements, sorted. */
  values() {
    return decodeValue(this.#h.bytes(SET_VALUES, this.#key));
  }
  get size() {
    return this.values().length;
  }
}

const INTERNAL = Symbol("concord");

/** One open document. */
export class Doc {
  #h;
  #id;
  #synced;
  #changes = listeners();
  /** What the accessors call: the handle, with local writes reported to the listeners
   * here (the wasm side only says whether the write changed anything). */
  #ops;
  constructor(key, id, handle, synced, wrote) {
    if (key !== INTERNAL) throw new TypeError("use `await client.open(id)`");
    this.#id = id;
    this.#h = handle;
    this.#synced = synced;
    const changes = this.#changes;
    this.#ops = {
      write(op, k, n, v) {
        if (!handle.write(op, k, n, v)) return;
        wrote();
        if (changes.size) changes.emit({ origin: "local", keys: [k] });
      },
      number: (op, k, v) => handle.number(op, k, v),
      bytes: (op, k) => handle.bytes(op, k),
    };
  }

  /** A remote change at `keys` (a JSON array of strings), parsed only when listened to. */
  [INTERNAL](keys) {
    if (this.#changes.size) this.#changes.emit({ origin: "remote", keys: JSON.parse(keys) });
  }

  get id() {
    return this.#id;
  }

  /** An accessor of type `kind` (an index of KINDS) for `key`. */
  #typed(key, kind, Cls) {
    if (typeof key !== "string") throw new TypeError("keys are strings");
    const holds = this.#h.number(KIND, key, NONE);
    if (holds && holds !== kind) {
      throw new TypeError(`key ${JSON.stringify(key)} holds a ${KINDS[holds]}, not a ${KINDS[kind]}; use another key`);
    }
    return new Cls(this.#ops, key);
  }

  counter(key) {
    return this.#typed(key, 1, Counter);
  }
  pnCounter(key) {
    return this.#typed(key, 2, PnCounter);
  }
  register(key) {
    return this.#typed(key, 3, Register);
  }
  set(key) {
    return this.#typed(key, 4, CrdtSet);
  }

  /** Keys written so far, sorted. */
  keys() {
    return decodeValue(this.#h.bytes(KEYS, ""));
  }

  /** Calls `fn({ origin: "local" | "remote", keys })` after every change; returns `off`.
   * The wasm side builds remote changes only while a document has listeners. */
  subscribe(fn) {
    const [changes, h] = [this.#changes, this.#h];
    const off = changes.add(fn);
    if (changes.size === 1) h.write(LISTEN, "", 1, NONE);
    return () => {
      if (off() && !changes.size) h.write(LISTEN, "", 0, NONE);
    };
  }

  /** Resolves once the relay holds everything this replica has now, and this replica
   * has caught up with what the relay held when it subscribed. */
  synced() {
    try {
      return this.#synced(this.#h);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** The whole document as plain data. */
  toJSON() {
    return decodeValue(this.#h.bytes(DOCUMENT, ""));
  }

  /** This replica's version vector of the document, encoded: give it to another replica's
   * `encodeUpdate` to learn what this one lacks. */
  version() {
    return this.#h.bytes(VERSION, "");
  }

  /** What a replica at `since` (a `version()` from it; omitted: a replica with nothing)
   * lacks of this document, as bytes for its `applyUpdate`: the missing deltas, or the
   * state when the delta log does not reach back that far. Any transport will do. */
  encodeUpdate(since) {
    if (since !== undefined && !(since instanceof Uint8Array)) throw new TypeError("since must be a Uint8Array from doc.version()");
    return this.#h.update(since ?? EMPTY);
  }

  /** Joins an update made by `encodeUpdate` (of this document on another replica, or of
   * any document) into this one. Listeners hear of the change (origin "remote"); the
   * relay, the other tabs and storage get what is new. Bytes that are not an update throw
   * a TypeError and change nothing. */
  applyUpdate(bytes) {
    if (!(bytes instanceof Uint8Array)) throw new TypeError("applyUpdate takes the Uint8Array of encodeUpdate()");
    this.#h.applyUpdate(bytes);
  }
}

/** A replica: documents, their persistence, and the connection to the relays. */
export class Client {
  #r;
  #hex;
  #opts;
  #store;
  #bc = null;
  #closed = false;
  /** id -> Promise<Doc> */
  #docs = new Map();
  /** id -> Doc, once open */
  #open = new Map();
  #statusL = listeners();
  #errors = listeners();
  /** synced() waiter id -> [resolve, reject] */
  #waiters = new Map();
  /** Document id -> the WriteRefusedError that fails its `synced()`. */
  #refused = new Map();
  // the relay connection
  #ws = null;
  #gen = 0;
  #idx = 0;
  #attempt = 0;
  #online = false;
  #reported = "offline";
  #lastRx = 0;
  #retry = null;
  #tick = null;
  /** The UnauthorizedError that stopped reconnecting, or null. */
  #denied = null;
  // persistence
  #toPersist = []; // [doc, key, bytes] of local writes not yet in IndexedDB
  #dirty = new Set(); // documents changed since their last snapshot
  #unsnapped = new Map(); // doc -> outbox keys written and not yet covered by our snapshot
  #stale = new Map(); // doc -> snapshot keys merged in, to delete with our next snapshot
  #writing = false;
  #lastSnapshot = 0;
  #flushTimer = null;
  #flushAt = 0;
  /** Local writes wait for the end of the task that made them (see `#wrote`). */
  #unsent = false;

  constructor(key, opts, store) {
    if (key !== INTERNAL) throw new TypeError("use `await Client.connect(options)`");
    this.#opts = opts;
    this.#store = store;
    this.#r = new Replica(this.#host());
    this.#hex = this.#r.replicaId;
    if (opts.channel !== null && typeof BroadcastChannel === "function") {
      this.#bc = new BroadcastChannel(opts.channel);
      this.#bc.onmessage = (ev) => ev.data instanceof Uint8Array && !this.#closed && this.#r.tab(ev.data);
    }
    this.#r.configure(this.#bc !== null, store !== null);
    this.#connect();
  }

  /** Resolves at once (offline-first): connecting happens in the background. */
  static async connect(options = {}) {
    if (options === null || typeof options !== "object") throw new TypeError("Client.connect takes an options object");
    const opts = parseOptions(options);
    await ready();
    let store = null;
    if (opts.persist) {
      try {
        store = await openStore(opts.database);
      } catch (e) {
        throw new Error(`could not open IndexedDB (${e?.message ?? e}); pass persist: false to keep documents in memory`);
      }
    }
    return new Client(INTERNAL, opts, store);
  }

  /** Opens a document; its stored state is available when this resolves. */
  async open(id) {
    if (typeof id !== "string") throw new TypeError("document ids are strings");
    let doc = this.#docs.get(id);
    if (!doc) {
      doc = this.#load(id);
      this.#docs.set(id, doc);
      doc.catch(() => this.#docs.delete(id));
    }
    return doc;
  }

  /** "connecting" | "online" | "offline" */
  get status() {
    return this.#ws ? (this.#online ? "online" : "connecting") : "offline";
  }

  /** This session's replica id (16 hex digits). */
  get replicaId() {
    return this.#hex;
  }

  /** Calls `fn(status)` whenever the status changes; returns `off`. */
  onStatus(fn) {
    return this.#statusL.add(fn);
  }

  /** Calls `fn(error)` for errors that happen in the background; returns `off`. */
  onError(fn) {
    return this.#errors.add(fn);
  }

  /** Connects again at once after the relay refused the token (the token function, if
   * any, is called again), or after a disconnection without waiting for the backoff. */
  reconnect() {
    if (this.#closed) throw closedError();
    this.#denied = null;
    this.#attempt = 0;
    clearTimeout(this.#retry);
    this.#gen++;
    this.#drop();
    this.#connect();
  }

  /** Disconnects; writes made so far are still saved. Pending `synced()` reject. */
  close() {
    if (this.#closed) return;
    this.#sendWrites(); // what was written in this task still goes out before the close
    for (const t of [this.#retry, this.#tick, this.#flushTimer]) clearTimeout(t);
    this.#drop();
    this.#closed = true;
    this.#bc?.close();
    for (const [, [, reject]] of this.#waiters) reject(closedError());
    this.#waiters.clear();
    const store = this.#store;
    if (store) {
      const batch = this.#takeBatch(true);
      if (batch) store.write(batch).catch(() => {});
      store.close();
    }
    this.#r.close();
    this.#statusL.clear();
    this.#errors.clear();
  }

  // ---- documents ----

  async #load(id) {
    const n = new TextEncoder().encode(id).length;
    if (n < 1 || n > 512) throw new RangeError("document ids must be 1 to 512 bytes long");
    // The relay's rule too (a refused id could never sync).
    // eslint-disable-next-line no-control-regex
    if (/[\u0000-\u001f\u007f-\u009f]/.test(id) || id.split("/").some((s) => s === "." || s === ".."))
      throw new RangeError("document ids may not hold control characters or \".\"/\"..\" path segments");
    if (this.#closed) throw closedError();
    const stored = this.#store ? await this.#store.load(id) : [[], []];
    if (this.#closed) throw closedError();
    const r = this.#r;
    const h = r.open(id);
    const [stale, unsnapped] = [[], []];
    stored.forEach((entries, outbox) => {
      for (const [key, bytes] of entries) {
        if (r.restore(id, bytes, !outbox)) (outbox ? unsnapped : stale).push(key);
        // Left in place: a newer version of concord may read it.
        else this.#error(`a stored ${outbox ? "write" : "snapshot"} could not be read; it was left in place`);
      }
    });
    this.#stale.set(id, stale);
    this.#unsnapped.set(id, unsnapped);
    r.announce(id);
    const doc = new Doc(INTERNAL, id, h, (handle) => this.#syncedPromise(handle, id), () => this.#wrote());
    this.#open.set(id, doc);
    return doc;
  }

  /** A local write was made: the replica sends the writes of this task together once it
   * is done (a microtask), as a few frames rather than one per write — 100,000 `add`s
   * in a loop would otherwise be 100,000 frames, over the relay's rate limit. */
  #wrote() {
    if (this.#unsent) return;
    this.#unsent = true;
    queueMicrotask(() => this.#sendWrites());
  }

  #sendWrites() {
    if (!this.#unsent || this.#closed) return;
    this.#unsent = false;
    this.#r.flush();
  }

  #syncedPromise(handle, doc) {
    if (!this.#opts.urls.length) throw new Error("synced() needs a relay: pass options.urls to Client.connect()");
    const refused = this.#refused.get(doc);
    if (refused) return Promise.reject(refused);
    const id = handle.waitSynced();
    if (id === undefined) return Promise.resolve();
    if (this.#denied) return Promise.reject(this.#denied);
    return new Promise((ok, ko) => this.#waiters.set(id, [ok, ko, doc]));
  }

  #error(message) {
    this.#errors.emit(message instanceof Error ? message : new Error(message));
  }

  /** Where the replica's outputs go (see `Host` in wasm/src/api.rs). Byte arguments are
   * views of wasm memory: copied before they are kept. */
  #host() {
    return {
      relay: (frame) => this.#ws?.send(frame.slice()),
      tab: (frame) => this.#bc?.postMessage(frame.slice()),
      change: (doc, keys) => this.#open.get(doc)?.[INTERNAL](keys),
      persist: (doc, seq, bytes) => {
        if (!this.#store) return;
        this.#toPersist.push([doc, [doc, this.#hex, seq], bytes.slice()]);
        this.#scheduleFlush(0);
      },
      dirty: (doc) => {
        this.#dirty.add(doc);
        this.#scheduleFlush(SNAPSHOT_MS);
      },
      online: () => {
        this.#attempt = 0;
        clearTimeout(this.#retry);
        this.#online = true;
        this.#report();
      },
      settled: (id) => {
        this.#waiters.get(id)?.[0]();
        this.#waiters.delete(id);
      },
      error: (message) => {
        // Reported when the connection closes: then reconnecting stops.
        if (message.startsWith(UNAUTHORIZED_PREFIX)) this.#denied ??= new UnauthorizedError(message);
        else this.#error(message);
      },
      refused: (doc, message) => {
        const err = new WriteRefusedError(doc, message);
        if (!this.#refused.has(doc)) this.#errors.emit(err);
        this.#refused.set(doc, err);
        for (const [id, [, ko, d]] of this.#waiters) {
          if (d !== doc) continue;
          ko(err);
          this.#waiters.delete(id);
        }
      },
      reidentified: (old) => {
        this.#hex = this.#r.replicaId;
        for (const [doc, keys] of this.#stale) keys.push([doc, old]);
        this.#attempt = 0;
        this.#fail(this.#gen);
      },
    };
  }

  // ---- the relay ----

  #report() {
    const s = this.status;
    if (s !== this.#reported) {
      this.#reported = s;
      this.#statusL.emit(s);
    }
  }

  #connect() {
    const { urls, token } = this.#opts;
    if (this.#closed || !urls.length || this.#denied) return;
    const gen = ++this.#gen;
    if (typeof token !== "function") return this.#dial(gen, token);
    // A token function runs on every (re)connect, so an expired token is replaced.
    clearTimeout(this.#retry);
    this.#retry = setTimeout(() => this.#fail(gen), CONNECT_TIMEOUT_MS);
    let value;
    try {
      value = token();
    } catch (e) {
      return this.#tokenFailed(gen, e);
    }
    if (value && typeof value.then === "function") {
      value.then(
        (t) => this.#dial(gen, t),
        (e) => this.#tokenFailed(gen, e),
      );
    } else this.#dial(gen, value);
  }

  #tokenFailed(gen, e) {
    if (gen !== this.#gen || this.#closed) return;
    this.#error(new Error(`options.token() failed: ${e?.message ?? e}; will retry`));
    this.#fail(gen);
  }

  #dial(gen, token) {
    if (gen !== this.#gen || this.#closed) return;
    if (token != null && typeof token !== "string") {
      return this.#tokenFailed(gen, new TypeError("it must return a string (or a promise of one)"));
    }
    const { urls, webSocket } = this.#opts;
    let ws;
    try {
      ws = new webSocket(urls[this.#idx % urls.length]);
    } catch (e) {
      this.#error(e);
      this.#fail(gen);
      return;
    }
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      if (gen !== this.#gen) return;
      this.#lastRx = Date.now();
      this.#r.connected(token ?? undefined);
      this.#tick = setTimeout(() => this.#onTick(), TICK_MS);
    };
    ws.onmessage = (ev) => {
      if (gen !== this.#gen || !(ev.data instanceof ArrayBuffer)) return;
      this.#lastRx = Date.now();
      this.#r.relay(new Uint8Array(ev.data));
    };
    ws.onclose = (ev) => {
      // The relay closes a refused Hello with 1008 "unauthorized" (after its Error frame).
      if (gen === this.#gen && ev?.code === 1008 && ev.reason === "unauthorized") {
        this.#denied ??= new UnauthorizedError("the relay refused the token (unauthorized)");
      }
      this.#fail(gen);
    };
    ws.onerror = () => this.#fail(gen);
    this.#ws = ws;
    this.#online = false;
    clearTimeout(this.#retry);
    this.#retry = setTimeout(() => this.#fail(gen), CONNECT_TIMEOUT_MS);
    this.#report();
  }

  /** Closes the current connection, if any. */
  #drop() {
    const ws = this.#ws;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      ws.onerror = () => {}; // `ws` in Node throws on an error event nobody listens to
      try {
        ws.close();
      } catch {
        // already closing
      }
    }
    this.#ws = null;
    this.#online = false;
    clearTimeout(this.#tick);
    this.#r.disconnected();
    this.#report();
  }

  /** Connection `gen` failed or closed: try the next URL after a backoff. */
  #fail(gen) {
    if (gen !== this.#gen || this.#closed) return;
    this.#gen++;
    this.#drop();
    clearTimeout(this.#retry);
    if (this.#denied) {
      // Another attempt with the same credentials would be refused again: stop, and
      // say so once, to the error listeners and to whoever waits for `synced()`.
      const err = this.#denied;
      for (const [, [, reject]] of this.#waiters) reject(err);
      this.#waiters.clear();
      this.#errors.emit(err);
      return;
    }
    this.#idx++;
    this.#retry = setTimeout(() => this.#connect(), backoff(this.#attempt++, Math.random()));
  }

  #onTick() {
    this.#r.tick();
    if (Date.now() - this.#lastRx > SILENCE_MS && this.#open.size) return this.#fail(this.#gen);
    this.#tick = setTimeout(() => this.#onTick(), TICK_MS);
  }

  // ---- persistence ----

  #scheduleFlush(delay) {
    if (!this.#store || this.#closed || (!this.#dirty.size && !this.#toPersist.length)) return;
    const at = Date.now() + delay;
    if (this.#flushTimer === null || at < this.#flushAt) {
      clearTimeout(this.#flushTimer);
      this.#flushAt = at;
      this.#flushTimer = setTimeout(() => this.#flush(), delay);
    }
  }

  /** What is due for IndexedDB: queued outbox entries, and snapshots of dirty documents
   * (at most every SNAPSHOT_MS, or all of them when `force`); null when nothing. */
  #takeBatch(force) {
    const now = Date.now();
    const snap = force || now - this.#lastSnapshot >= SNAPSHOT_MS ? [...this.#dirty] : [];
    if (snap.length) {
      this.#dirty.clear();
      this.#lastSnapshot = now;
    }
    const b = { snapshots: [], outbox: [], dropSnapshots: [], dropOutbox: [] };
    for (const [doc, key, bytes] of this.#toPersist.splice(0)) {
      if (snap.includes(doc)) continue; // a snapshot in this same transaction covers it
      this.#unsnapped.get(doc)?.push(key);
      b.outbox.push([key, bytes]);
    }
    for (const doc of snap) {
      if (!this.#open.has(doc)) continue;
      b.snapshots.push([[doc, this.#hex], this.#r.snapshot(doc)]);
      b.dropOutbox.push(...this.#unsnapped.get(doc).splice(0));
      b.dropSnapshots.push(...this.#stale.get(doc).splice(0));
    }
    return b.snapshots.length + b.outbox.length + b.dropSnapshots.length + b.dropOutbox.length ? b : null;
  }

  #flush() {
    this.#flushTimer = null;
    if (this.#writing || this.#closed) return;
    const batch = this.#takeBatch(false);
    if (this.#dirty.size) this.#scheduleFlush(Math.max(0, this.#lastSnapshot + SNAPSHOT_MS - Date.now()));
    if (!batch) return;
    this.#writing = true;
    this.#store.write(batch).then(
      () => this.#written(),
      () => {
        // Nothing of the batch is known to be durable: snapshot everything again.
        for (const doc of this.#open.keys()) this.#dirty.add(doc);
        this.#error("could not save to IndexedDB (is the disk full?); will retry");
        this.#written();
      },
    );
  }

  #written() {
    this.#writing = false;
    if (this.#toPersist.length) this.#scheduleFlush(0);
    else if (this.#dirty.size) this.#scheduleFlush(SNAPSHOT_MS);
  }
}
