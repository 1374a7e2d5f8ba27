// The public API of `concord-sync` (see DESIGN.md, "JavaScript API"): `Client`, `Doc`
// and one small accessor class per CRDT, over the wasm shim (`Replica`, `DocHandle`).
// Only API shape lives here; every decision is made in Rust.
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
      for (const fn of [...set]) safeCall(fn, arg);
    },
  };
}

const KIND_NAMES = { counter: "counter", pnCounter: "pn-counter", register: "register", set: "set" };

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
    this.#h.increment(this.#key, amount(n, "increment"));
  }
  get value() {
    return this.#h.counter(this.#key);
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
    this.#h.pnAdd(this.#key, amount(n, "increment"));
  }
  decrement(n) {
    this.#h.pnAdd(this.#key, -amount(n, "decrement"));
  }
  get value() {
    return this.#h.pnCounter(this.#key);
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
    this.#h.setRegister(this.#key, value);
  }
  /** The value, or `undefined` when never set. */
  get() {
    return this.#h.register(this.#key);
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
    this.#h.setAdd(this.#key, value);
  }
  remove(value) {
    this.#h.setRemove(this.#key, value);
  }
  has(value) {
    return this.#h.setHas(this.#key, value);
  }
  /** The elements, sorted. */
  values() {
    return this.#h.setValues(this.#key);
  }
  get size() {
    return this.values().length;
  }
}

/** One open document. */
export class Doc {
  #h;
  #changes = listeners();
  constructor(handle) {
    this.#h = handle;
    handle.setListener((local, keys) => this.#changes.emit({ origin: local ? "local" : "remote", keys }));
  }

  get id() {
    return this.#h.id;
  }

  #typed(key, kind, Cls) {
    if (typeof key !== "string") throw new TypeError("keys are strings");
    const holds = this.#h.kindOf(key);
    if (holds !== undefined && holds !== KIND_NAMES[kind]) {
      throw new TypeError(`key ${JSON.stringify(key)} holds a ${holds}, not a ${KIND_NAMES[kind]}; use another key`);
    }
    return new Cls(this.#h, key);
  }

  counter(key) {
    return this.#typed(key, "counter", Counter);
  }
  pnCounter(key) {
    return this.#typed(key, "pnCounter", PnCounter);
  }
  register(key) {
    return this.#typed(key, "register", Register);
  }
  set(key) {
    return this.#typed(key, "set", CrdtSet);
  }

  /** Keys written so far, sorted. */
  keys() {
    return this.#h.keys();
  }

  /** Calls `fn({ origin: "local" | "remote", keys })` after every change; returns `off`. */
  subscribe(fn) {
    return this.#changes.add(fn);
  }

  /** Resolves once the relay holds everything this replica has now, and this replica
   * has caught up with what the relay held when it subscribed. */
  synced() {
    try {
      return this.#h.synced();
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** The whole document as plain data. */
  toJSON() {
    return this.#h.toJSON();
  }
}

/** A replica: documents, their persistence, and the connection to the relays. */
export class Client {
  #r;
  #docs = new Map();
  #status = listeners();
  #errors = listeners();

  constructor(replica) {
    if (!(replica instanceof Replica)) throw new TypeError("use `await Client.connect(options)`");
    this.#r = replica;
    replica.setListener((kind, detail) => (kind === "status" ? this.#status : this.#errors).emit(detail));
  }

  /** Resolves at once (offline-first): connecting happens in the background. */
  static async connect(options = {}) {
    if (options === null || typeof options !== "object") throw new TypeError("Client.connect takes an options object");
    await ready();
    return new Client(await Replica.start(options));
  }

  /** Opens a document; its stored state is available when this resolves. */
  async open(id) {
    if (typeof id !== "string") throw new TypeError("document ids are strings");
    let doc = this.#docs.get(id);
    if (!doc) {
      doc = this.#r.open(id).then((h) => new Doc(h));
      this.#docs.set(id, doc);
      doc.catch(() => this.#docs.delete(id));
    }
    return doc;
  }

  /** "connecting" | "online" | "offline" */
  get status() {
    return this.#r.status;
  }

  /** This session's replica id (16 hex digits). */
  get replicaId() {
    return this.#r.replicaId;
  }

  /** Calls `fn(status)` whenever the status changes; returns `off`. */
  onStatus(fn) {
    return this.#status.add(fn);
  }

  /** Calls `fn(error)` for errors that happen in the background; returns `off`. */
  onError(fn) {
    return this.#errors.add(fn);
  }

  /** Disconnects; writes made so far are still saved. */
  close() {
    this.#r.close();
  }
}
