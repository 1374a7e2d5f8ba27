// Types of `concord-sync`. Authored by hand (not generated): this is the contract.

/** A JSON-compatible value: what registers and sets hold. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export type Status = "connecting" | "online" | "offline";

export interface ConnectOptions {
  /** Relay URLs (`ws://` or `wss://`), in failover order. Empty: local only. */
  urls?: string[];
  /** Auth token sent to the relay in its Hello, or a function (sync or async) returning
   * one, called on every (re)connect so an expired token can be replaced. */
  token?: string | (() => string | Promise<string>);
  /** Persist documents in IndexedDB where available (default true). */
  persist?: boolean;
  /** WebSocket constructor; default `globalThis.WebSocket` (in Node pass `ws`'s). */
  webSocket?: unknown;
  /** Sync tabs of this origin over a BroadcastChannel: `true` (default, channel
   * "concord"), a channel name, or `false`. */
  broadcast?: boolean | string;
  /** IndexedDB database name (default "concord"). */
  database?: string;
}

export interface ChangeEvent {
  /** Made by this client, or received from another tab or the relay. */
  origin: "local" | "remote";
  /** Keys that changed. */
  keys: string[];
}

/** G-Counter: grows only. */
export class Counter {
  private constructor();
  /** Adds `n` (default 1); `n` must be a whole number >= 0. */
  increment(n?: number): void;
  readonly value: number;
}

/** PN-Counter. */
export class PnCounter {
  private constructor();
  increment(n?: number): void;
  decrement(n?: number): void;
  readonly value: number;
}

/** Last-writer-wins register. */
export class Register<T extends Json = Json> {
  private constructor();
  set(value: T): void;
  /** `undefined` when never set. */
  get(): T | undefined;
  readonly value: T | undefined;
}

/** Add-wins observed-remove set. */
export class CrdtSet<T extends Json = Json> {
  private constructor();
  add(value: T): void;
  remove(value: T): void;
  has(value: T): boolean;
  /** Elements, sorted. */
  values(): T[];
  readonly size: number;
}

export class Doc {
  private constructor();
  readonly id: string;
  counter(key: string): Counter;
  pnCounter(key: string): PnCounter;
  register<T extends Json = Json>(key: string): Register<T>;
  set<T extends Json = Json>(key: string): CrdtSet<T>;
  keys(): string[];
  /** Called after every local or remote change; returns a function that unsubscribes. */
  subscribe(fn: (event: ChangeEvent) => void): () => void;
  /** Resolves once the relay has acknowledged every write this replica has now and this
   * replica has caught up with what the relay held when it subscribed. */
  synced(): Promise<void>;
  /** Counters as numbers, registers as their value, sets as sorted arrays. */
  toJSON(): { [key: string]: Json };
  /** This replica's version vector of the document, encoded (for another's `encodeUpdate`). */
  version(): Uint8Array;
  /** What a replica at `since` (its `version()`; omitted: nothing) lacks, for its
   * `applyUpdate`: the missing deltas, or the state when the log does not reach back. */
  encodeUpdate(since?: Uint8Array): Uint8Array;
  /** Joins an update from `encodeUpdate`; throws a TypeError (changing nothing) for bytes
   * that are not one. Listeners, the relay, other tabs and storage hear of what is new. */
  applyUpdate(update: Uint8Array): void;
}

export class Client {
  private constructor();
  /** Resolves at once (offline-first); it connects in the background. */
  static connect(options?: ConnectOptions): Promise<Client>;
  open(id: string): Promise<Doc>;
  readonly status: Status;
  readonly replicaId: string;
  onStatus(fn: (status: Status) => void): () => void;
  /** Background errors. A `WriteRefusedError` names a document whose writes the relay
   * refused. An `UnauthorizedError` means the relay refused the token: the
   * client stopped reconnecting (status "offline") until `reconnect()`. */
  onError(fn: (error: Error) => void): () => void;
  /** Connects again now: after an `UnauthorizedError` (the token function, if any, is
   * called again), or to skip the reconnect backoff. */
  reconnect(): void;
  close(): void;
}

/** The relay refused the token (its protocol error UNAUTHORIZED, close code 1008).
 * Pending `doc.synced()` promises reject with it and reconnecting stops until
 * `client.reconnect()`. */
export class UnauthorizedError extends Error {
  readonly name: "UnauthorizedError";
  readonly code: "UNAUTHORIZED";
}

/** The relay refused writes to a document: over a limit (`TOO_LARGE`: document size,
 * set elements, value size), malformed (`INVALID`: NaN, a skipped sequence number, a bad
 * id) or not allowed by the token (`FORBIDDEN`). Nothing of the refused frame was
 * applied. `doc.synced()` on that document rejects with it from now on (the writes after
 * it depend on it); it is also reported to `onError` once. */
export class WriteRefusedError extends Error {
  readonly name: "WriteRefusedError";
  readonly code: "TOO_LARGE" | "INVALID" | "FORBIDDEN";
  /** The document. */
  readonly doc: string;
}
