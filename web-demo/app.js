// The Concord board: one shared document holding every CRDT the package offers, plus a
// view of the relay cluster that stores it. No framework and no build step: the page
// imports `concord-sync` by name (see the import map in index.html) and uses only the
// public API of DESIGN.md.
//
// Keys of the document:
//   likes     G-Counter   doc.counter("likes")
//   votes     PN-Counter  doc.pnCounter("votes")
//   title     LWW-Register of { text, author, color, tab, at }
//   tags      OR-Set of strings
//   presence  OR-Set of { tab, name, color, at }: each tab re-adds its entry every
//             HEARTBEAT_MS and removes its older ones; any tab removes entries older than
//             EXPIRE_MS, so closed tabs disappear. Add-wins makes this safe: a removal only
//             takes the entries it saw, never a fresh heartbeat.

const HEARTBEAT_MS = 10_000;
const FRESH_MS = 30_000; // shown as "here" while the last heartbeat is this recent
const EXPIRE_MS = 60_000; // removed from the set by whoever notices
const POLL_MS = 1_500;
const LOG_MAX = 40;

const params = new URLSearchParams(location.search);
const DOC_ID = params.get("doc") || "board-1";

const $ = (id) => document.querySelector(`[data-testid="${id}"]`);
const el = (tag, props = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(e.dataset, v);
    else if (k === "style") e.style.cssText = v;
    else if (k in e && typeof v !== "string") e[k] = v;
    else e.setAttribute(k, v);
  }
  e.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
  return e;
};
const SVG = "http://www.w3.org/2000/svg";
const svg = (tag, attrs = {}, ...children) => {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  e.append(...children);
  return e;
};

// ---- who am I ---------------------------------------------------------------------------

const ADJECTIVES = ["Amber", "Brisk", "Calm", "Dapper", "Eager", "Fuzzy", "Gentle", "Happy", "Jolly", "Keen", "Lucky", "Merry", "Nimble", "Plucky", "Quiet", "Sunny", "Witty", "Zesty"];
const ANIMALS = ["Otter", "Falcon", "Panda", "Lynx", "Heron", "Koala", "Marten", "Puffin", "Gecko", "Bison", "Ibis", "Walrus", "Finch", "Tapir", "Yak", "Wombat"];
const COLORS = ["#6366f1", "#0ea5e9", "#14b8a6", "#22c55e", "#eab308", "#f97316", "#ef4444", "#ec4899", "#a855f7"];

function stored(area, key, make) {
  try {
    const storage = window[area];
    let v = storage.getItem(key);
    if (!v) storage.setItem(key, (v = make()));
    return v;
  } catch {
    return make(); // storage disabled: a fresh identity per load
  }
}
const pick = (list) => list[Math.floor(Math.random() * list.length)];
const randomHex = (n) => Array.from(crypto.getRandomValues(new Uint8Array(n)), (b) => b.toString(16).padStart(2, "0")).join("");

const me = {
  // One name per browser profile, one id per tab (sessionStorage survives a reload).
  name: stored("localStorage", "concord-demo-name", () => `${pick(ADJECTIVES)} ${pick(ANIMALS)}`),
  tab: stored("sessionStorage", "concord-demo-tab", () => randomHex(4)),
};
me.color = COLORS[hash(me.name) % COLORS.length];
function hash(s) {
  let h = 2166136261;
  for (const c of s) h = Math.imul(h ^ c.charCodeAt(0), 16777619);
  return h >>> 0;
}
const initials = (name) => name.split(/\s+/).map((w) => w[0] ?? "").join("").slice(0, 2).toUpperCase();

// ---- where the relays are ---------------------------------------------------------------

async function fetchJSON(url, timeoutMs = 2500) {
  try {
    const res = await fetch(url, { cache: "no-store", signal: AbortSignal.timeout(timeoutMs) });
    return res.ok ? await res.json() : null;
  } catch {
    return null;
  }
}

/** The launcher writes demo-config.json (relays, admin endpoint); a page served by a
 * plain relay asks the relay's /cluster instead, or just uses the relay it came from. */
async function discover() {
  const config = await fetchJSON("./demo-config.json");
  let nodes = config?.nodes ?? null;
  if (!nodes) {
    const view = await fetchJSON("/cluster");
    if (view?.node) nodes = [{ id: view.node, addr: location.host }, ...(view.peers ?? []).map((p) => ({ id: p.id, addr: p.addr }))];
  }
  nodes ??= [{ id: "relay", addr: location.host }];
  // The relay that served this page first, then the others in order: the failover list.
  const port = location.port || (location.protocol === "https:" ? "443" : "80");
  const first = Math.max(0, nodes.findIndex((n) => n.addr === location.host || n.addr.endsWith(`:${port}`)));
  const ordered = [...nodes.slice(first), ...nodes.slice(0, first)];
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return {
    admin: config?.admin ?? null,
    quorum: config ? { n: config.replicas, w: config.write_quorum, r: config.read_quorum } : null,
    nodes: [...nodes].sort((a, b) => a.id.localeCompare(b.id)),
    urls: ordered.map((n) => `${scheme}//${n.addr}/sync`),
  };
}

// ---- the session: a client and the open document ----------------------------------------

let Client = null;
let setup = null;
let client = null;
let doc = null;
let unsubscribe = [];
let offline = params.get("offline") === "1" || safe(() => sessionStorage.getItem("concord-demo-offline") === "1", false);
let socket = null; // the WebSocket the client currently uses, to name the relay it is on
let saveState = "idle"; // "saving" | "saved" | "local" | "idle"
let catchingUp = false; // the first catch-up of an online session is summarized, not logged piecemeal
let sessions = 0;
let saveGen = 0;

/** A WebSocket that remembers which one is open, so the page can say which relay this
 * tab talks to. Passed as the documented `webSocket` option of Client.connect. */
class TrackedWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    this.addEventListener("open", () => {
      socket = this;
      scheduleRender();
    });
    this.addEventListener("close", () => {
      if (socket === this) socket = null;
      scheduleRender();
    });
  }
}

async function startSession() {
  // Offline is a client with no relay and no tab channel: it keeps editing and saving to
  // IndexedDB, and a later online client picks everything up from there. (The package has
  // no pause/resume yet; close + reconnect is the fallback.)
  const options = offline
    ? { urls: [], persist: true, broadcast: false }
    : { urls: setup.urls, persist: true, webSocket: TrackedWebSocket };
  const c = await Client.connect(options);
  let d;
  try {
    d = await c.open(DOC_ID);
  } catch (e) {
    c.close();
    throw e;
  }
  client = c;
  doc = d;
  last = read();
  unsubscribe = [
    d.subscribe(onChange),
    typeof c.onStatus === "function" ? c.onStatus(() => scheduleRender()) : null,
    typeof c.onError === "function" ? c.onError((e) => showError(e?.message ?? String(e))) : null,
  ].filter(Boolean);
  saveState = offline ? "local" : "idle";
  sessions++;
  if (!offline) catchUp(d, sessions > 1);
  heartbeat();
  if (!offline) watchSaved();
  scheduleRender();
}

/** Until this replica has caught up with the relay, remote changes are not logged one
 * by one: on a first load they are the whole board. Back from offline, one line sums up
 * what happened meanwhile. */
function catchUp(d, summarize) {
  catchingUp = true;
  const before = last;
  // No relay reachable: stop waiting, log changes from other tabs as they come.
  setTimeout(() => doc === d && (catchingUp = false), 10_000);
  d.synced().then(
    () => {
      if (doc !== d) return;
      catchingUp = false;
      lastHere = null;
      if (summarize && before && last) {
        const n = $("activity").children.length;
        logDiff(before, last);
        if ($("activity").children.length === n) addLog("sync", "Back online: nothing changed meanwhile");
        else addLog("sync", "Back online: caught up with the cluster");
      }
    },
    () => {},
  );
}

function endSession() {
  for (const off of unsubscribe) off();
  unsubscribe = [];
  const c = client;
  client = null;
  doc = null;
  socket = null;
  c?.close(); // flushes pending writes to IndexedDB
}

async function setOffline(on) {
  const toggle = $("offline-toggle");
  toggle.disabled = true;
  offline = on;
  try {
    sessionStorage.setItem("concord-demo-offline", on ? "1" : "0");
  } catch {}
  endSession();
  scheduleRender();
  try {
    await startSession();
  } catch (e) {
    showError(`could not restart the client: ${e.message}`);
  } finally {
    toggle.disabled = false;
    toggle.checked = offline;
  }
}

/** Every local write: "saving…" until the relay has acknowledged it (a write quorum
 * persisted it), then "saved". Offline: saved in this browser only. */
function watchSaved() {
  if (!doc || offline) {
    saveState = "local";
    return;
  }
  const gen = ++saveGen;
  saveState = "saving";
  doc.synced().then(
    () => {
      if (gen === saveGen) {
        saveState = "saved";
        scheduleRender();
      }
    },
    () => {}, // closed or went offline meanwhile
  );
}

function write(fn) {
  if (!doc) return;
  try {
    fn(doc);
  } catch (e) {
    showError(e.message);
    return;
  }
  watchSaved();
  scheduleRender();
}

// ---- reading the document ----------------------------------------------------------------

function safe(fn, fallback) {
  try {
    return fn();
  } catch {
    return fallback; // e.g. a key of another type written by someone else's experiment
  }
}

function read() {
  if (!doc) return null;
  const title = safe(() => doc.register("title").get(), undefined);
  return {
    likes: safe(() => doc.counter("likes").value, 0),
    votes: safe(() => doc.pnCounter("votes").value, 0),
    title: typeof title === "string" ? { text: title } : title && typeof title === "object" ? title : null,
    tags: safe(() => doc.set("tags").values(), []).map(String),
    presence: safe(() => doc.set("presence").values(), []).filter((p) => p && typeof p === "object" && typeof p.tab === "string"),
  };
}

/** Tabs with a recent heartbeat, one entry per tab (its latest), this tab first. */
function hereNow(state) {
  const now = Date.now();
  const latest = new Map();
  for (const p of state?.presence ?? []) {
    if (now - p.at > FRESH_MS) continue;
    if (!latest.has(p.tab) || latest.get(p.tab).at < p.at) latest.set(p.tab, p);
  }
  if (doc) latest.set(me.tab, { tab: me.tab, name: me.name, color: me.color, at: now });
  return [...latest.values()].sort((a, b) => (a.tab === me.tab ? -1 : b.tab === me.tab ? 1 : a.name.localeCompare(b.name) || a.tab.localeCompare(b.tab)));
}

function heartbeat() {
  if (!doc) return;
  const set = safe(() => doc.set("presence"), null);
  if (!set) return;
  const now = Date.now();
  const entries = set.values().filter((p) => p && typeof p === "object");
  // Add before removing: other tabs apply our deltas in order, so they never see this
  // tab without an entry.
  set.add({ tab: me.tab, name: me.name, color: me.color, at: now });
  for (const p of entries) {
    if ((p.tab === me.tab && p.at !== now) || !(now - p.at < EXPIRE_MS)) set.remove(p);
  }
}

function leave() {
  const set = doc && safe(() => doc.set("presence"), null);
  if (!set) return;
  for (const p of set.values()) if (p?.tab === me.tab) set.remove(p);
}

// ---- activity log --------------------------------------------------------------------------

let last = null;
let lastHere = null;

function onChange(event) {
  const next = read();
  if (event.origin === "remote" && last && next && !catchingUp) logDiff(last, next);
  last = next;
  scheduleRender();
}

function logDiff(a, b) {
  const out = [];
  if (b.likes !== a.likes) out.push(["like", `♥ ${signed(b.likes - a.likes)} like${Math.abs(b.likes - a.likes) === 1 ? "" : "s"} → ${b.likes}`]);
  if (b.votes !== a.votes) out.push(["vote", `${b.votes > a.votes ? "▲" : "▼"} votes ${signed(b.votes - a.votes)} → ${b.votes}`]);
  if (JSON.stringify(b.title) !== JSON.stringify(a.title) && b.title) {
    out.push(["title", `Title → “${b.title.text ?? ""}”${b.title.author ? ` by ${b.title.author}` : ""}`]);
  }
  const before = new Set(a.tags);
  const after = new Set(b.tags);
  for (const t of b.tags) if (!before.has(t)) out.push(["tag", `+ tag “${t}”`]);
  for (const t of a.tags) if (!after.has(t)) out.push(["untag", `− tag “${t}”`]);
  for (const [kind, text] of out) addLog(kind, text);
}

function logPresence(here) {
  const ids = new Map(here.map((p) => [p.tab, p]));
  if (lastHere && !catchingUp) {
    for (const [tab, p] of ids) if (!lastHere.has(tab) && tab !== me.tab) addLog("join", `${p.name} joined`);
    for (const [tab, p] of lastHere) if (!ids.has(tab) && tab !== me.tab) addLog("leave", `${p.name} left`);
  }
  lastHere = ids;
}

const signed = (n) => (n > 0 ? `+${n}` : `${n}`);

function addLog(kind, text) {
  const list = $("activity");
  const time = new Date().toLocaleTimeString([], { hour12: false });
  list.prepend(el("li", { dataset: { testid: "activity-item", kind } }, el("time", {}, time), el("span", {}, text)));
  while (list.children.length > LOG_MAX) list.lastElementChild.remove();
  document.querySelector(".empty-log").hidden = true;
}

// ---- rendering the board -------------------------------------------------------------------

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  queueMicrotask(() => {
    renderQueued = false;
    render();
  });
}

let titleDirty = false;

function relayOf(ws) {
  if (!ws || !setup) return null;
  const addr = new URL(ws.url).host;
  return setup.nodes.find((n) => n.addr === addr) ?? { id: addr, addr };
}

function render() {
  const state = read();
  const live = !!doc;
  document.body.dataset.ready = live ? "true" : "false";
  for (const b of document.querySelectorAll(".board button, .board input")) b.disabled = !live;

  // Connection badge.
  const status = offline ? "offline" : (client?.status ?? "connecting");
  const relay = status === "online" ? relayOf(socket) : null;
  const badge = $("status");
  badge.dataset.status = status;
  badge.dataset.relay = relay?.id ?? "";
  badge.querySelector(".label").textContent =
    offline ? "offline (switched off)" : status === "online" ? `online · relay ${relay?.id ?? "?"}` : status === "connecting" ? "connecting…" : "offline · retrying";
  $("offline-toggle").checked = offline;
  document.body.classList.toggle("is-offline", offline);

  if (!state) return;

  $("likes").textContent = state.likes;
  $("votes").textContent = state.votes;
  $("votes").dataset.sign = Math.sign(state.votes);

  // Title: never overwrite what the user is typing.
  const input = $("title-input");
  const text = state.title?.text ?? "";
  if (!(titleDirty && document.activeElement === input)) {
    titleDirty = false;
    if (input.value !== text) input.value = text;
  }
  const author = $("title-author");
  author.replaceChildren();
  if (state.title?.author) {
    const you = state.title.tab === me.tab ? " (you)" : state.title.author === me.name ? " (you, in another tab)" : "";
    author.append(
      "Last written by ",
      el("span", { class: "who", style: `--c:${state.title.color ?? "#888"}` }, `${state.title.author}${you}`),
      state.title.at ? ` · ${ago(state.title.at)}` : "",
    );
  } else {
    author.append(state.title ? "Written by someone unnamed." : "Nobody has named this board yet.");
  }

  // Tags.
  const list = $("tags");
  const have = new Map([...list.children].map((li) => [li.dataset.tag, li]));
  const want = new Set(state.tags);
  for (const [tag, li] of have) if (!want.has(tag)) li.remove();
  state.tags.forEach((tag, i) => {
    let li = have.get(tag);
    if (!li) {
      li = el(
        "li",
        { class: "tag", dataset: { testid: "tag", tag } },
        el("span", {}, tag),
        el("button", { class: "untag", type: "button", "aria-label": `Remove ${tag}`, dataset: { testid: "tag-remove" }, onclick: () => write((d) => d.set("tags").remove(tag)) }, "×"),
      );
    }
    if (list.children[i] !== li) list.insertBefore(li, list.children[i] ?? null);
  });
  if (!state.tags.length && !list.querySelector(".none")) list.append(el("li", { class: "none" }, "No tags yet."));
  if (state.tags.length) list.querySelector(".none")?.remove();

  // Presence.
  const here = hereNow(state);
  logPresence(here);
  const box = $("presence");
  box.replaceChildren(
    ...here.slice(0, 6).map((p) =>
      el("span", { class: `avatar${p.tab === me.tab ? " me" : ""}`, title: p.tab === me.tab ? `${p.name} (this tab)` : p.name, style: `--c:${p.color ?? "#888"}`, dataset: { testid: "presence-tab", tab: p.tab } }, initials(p.name)),
    ),
    el("span", { class: "here", dataset: { testid: "presence-count" } }, `${here.length} here`),
  );

  // Save state.
  const sync = $("sync-state");
  sync.dataset.state = offline ? "local" : saveState;
  sync.textContent = offline
    ? "edits saved in this browser; they sync when you go online"
    : saveState === "saving"
      ? "saving… (waiting for a write quorum)"
      : saveState === "saved"
        ? "✓ every edit acknowledged by the cluster"
        : "";
}

function ago(t) {
  const s = Math.max(0, Math.round((Date.now() - t) / 1000));
  if (s < 5) return "just now";
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return new Date(t).toLocaleString();
}

let errorTimer = null;
function showError(message) {
  const banner = $("error");
  banner.textContent = message;
  banner.hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => (banner.hidden = true), 8000);
}

// ---- the cluster panel ---------------------------------------------------------------------

const cluster = {
  ring: null, // [[fraction, node], ...]
  owners: null, // { doc, position, owners }
  nodes: [], // [{ id, addr, state, hints, running, connections, docs, owner }]
  quorum: null,
  adminUp: false,
  hints: null,
};

function nodeColor(id) {
  const ids = setup?.nodes.map((n) => n.id) ?? [];
  const palette = ["#6366f1", "#14b8a6", "#f59e0b", "#ec4899", "#0ea5e9", "#84cc16", "#a855f7", "#ef4444"];
  const i = ids.indexOf(id);
  return palette[(i < 0 ? id.charCodeAt(0) : i) % palette.length];
}

async function pollCluster() {
  const admin = setup.admin;
  if (!cluster.ring) {
    const ring = (await fetchJSON("/cluster/ring")) ?? (admin ? await fetchJSON(`${admin}/admin/cluster/ring`) : null);
    if (Array.isArray(ring?.tokens)) cluster.ring = ring.tokens.slice().sort((a, b) => a[0] - b[0]);
  }
  if (!cluster.owners) {
    const q = `doc=${encodeURIComponent(DOC_ID)}`;
    const owners = (await fetchJSON(`/cluster/owners?${q}`)) ?? (admin ? await fetchJSON(`${admin}/admin/cluster/owners?${q}`) : null);
    if (Array.isArray(owners?.owners)) cluster.owners = owners;
  }
  const fromAdmin = admin ? await fetchJSON(`${admin}/admin/nodes`) : null;
  cluster.adminUp = !!fromAdmin;
  if (fromAdmin) {
    cluster.quorum = { n: fromAdmin.replicas, w: fromAdmin.write_quorum, r: fromAdmin.read_quorum };
    const views = fromAdmin.nodes.filter((n) => n.cluster?.peers);
    cluster.nodes = fromAdmin.nodes.map((n) => {
      const seen = views.filter((v) => v.id !== n.id).map((v) => v.cluster.peers.find((p) => p.id === n.id)?.state).filter(Boolean);
      let state;
      if (!n.running) state = "down";
      else if (!n.health) state = n.listening ? "suspect" : "starting";
      else state = seen.every((s) => s === "up") ? "up" : "suspect";
      const hints = n.health?.pending_hints ?? n.cluster?.pending_hints;
      return { id: n.id, addr: n.addr, state, running: n.running, hints: typeof hints === "number" ? hints : null, connections: n.health?.connections, docs: n.health?.documents_loaded, pid: n.pid };
    });
  } else {
    // No launcher: this relay's own view of its peers.
    const [view, health] = await Promise.all([fetchJSON("/cluster"), fetchJSON("/healthz")]);
    cluster.quorum = view ? { n: view.replicas, w: view.write_quorum, r: view.read_quorum } : setup.quorum;
    const byId = new Map(setup.nodes.map((n) => [n.id, { id: n.id, addr: n.addr, state: "unknown", hints: null }]));
    if (view?.node) {
      byId.set(view.node, { ...(byId.get(view.node) ?? { addr: location.host }), id: view.node, state: "up", hints: view.pending_hints ?? null, connections: health?.connections, docs: health?.documents_loaded });
      for (const p of view.peers ?? []) byId.set(p.id, { ...(byId.get(p.id) ?? {}), id: p.id, addr: p.addr, state: p.state ?? "unknown", hints: null });
    } else if (health?.node_id) {
      byId.set(health.node_id, { ...(byId.get(health.node_id) ?? { addr: location.host }), id: health.node_id, state: "up", hints: health.pending_hints ?? null, connections: health.connections, docs: health.documents_loaded });
    }
    cluster.nodes = [...byId.values()].sort((a, b) => a.id.localeCompare(b.id));
  }
  const known = cluster.nodes.filter((n) => typeof n.hints === "number");
  cluster.hints = known.length ? known.reduce((s, n) => s + n.hints, 0) : null;
  renderCluster();
}

function arc(r, a0, a1) {
  const p = (a) => [r * Math.sin(2 * Math.PI * a), -r * Math.cos(2 * Math.PI * a)];
  const [x0, y0] = p(a0);
  const [x1, y1] = p(a1);
  const large = a1 - a0 > 0.5 ? 1 : 0;
  return `M${x0.toFixed(2)} ${y0.toFixed(2)}A${r} ${r} 0 ${large} 1 ${x1.toFixed(2)} ${y1.toFixed(2)}`;
}

const polar = (r, a) => [r * Math.sin(2 * Math.PI * a), -r * Math.cos(2 * Math.PI * a)];

function renderRing() {
  const ring = $("ring");
  const R = 84;
  const parts = [];
  const state = new Map(cluster.nodes.map((n) => [n.id, n.state]));
  parts.push(svg("circle", { r: R, class: "ring-base" }));
  const tokens = cluster.ring;
  if (tokens?.length) {
    // A key belongs to the first token clockwise from it: the arc (previous, token] is
    // that token's node's. Neighbouring arcs of one node are drawn as one.
    let start = tokens[tokens.length - 1][0] - 1;
    for (let i = 0; i < tokens.length; i++) {
      const [end, node] = tokens[i];
      if (i + 1 < tokens.length && tokens[i + 1][1] === node) continue;
      if (end > start) {
        parts.push(svg("path", { d: arc(R, start, end), class: `ring-arc state-${state.get(node) ?? "unknown"}`, stroke: nodeColor(node), "data-node": node }));
      }
      start = end;
    }
  } else {
    parts.push(svg("text", { class: "ring-empty", y: 44 }, "ring unknown"));
  }
  const o = cluster.owners;
  if (o && typeof o.position === "number") {
    // The preference list: walking clockwise from the document, the first token of each
    // owner. Tokens are dense, so the numbered badges are spread out a little and point
    // at their token with a leader line.
    if (tokens?.length) {
      const walk = [...tokens.filter((t) => t[0] >= o.position), ...tokens.filter((t) => t[0] < o.position).map(([t, n]) => [t + 1, n])];
      const seen = new Set();
      let shown = o.position;
      let reach = o.position;
      const badges = [];
      for (const [t, node] of walk) {
        if (seen.has(node) || !o.owners.includes(node)) continue;
        seen.add(node);
        reach = t;
        shown = Math.max(t, shown + (badges.length ? 0.045 : 0.03));
        const [tx, ty] = polar(R + 7, t);
        const [bx, by] = polar(R + 24, shown);
        badges.push(svg("line", { x1: tx, y1: ty, x2: bx, y2: by, class: "leader" }));
        badges.push(
          svg("g", { class: "owner-badge", transform: `translate(${bx.toFixed(2)} ${by.toFixed(2)})`, "data-node": node },
            svg("circle", { r: 8.5, fill: nodeColor(node) }),
            svg("text", { y: 3.2 }, String(seen.size))),
        );
        if (seen.size === o.owners.length) break;
      }
      parts.push(svg("path", { d: arc(R, o.position, Math.max(reach, o.position + 0.004)), class: "walk" }));
      parts.push(...badges);
    }
    const [x, y] = polar(R, o.position);
    parts.push(svg("circle", { cx: x, cy: y, r: 6, class: "doc-marker", "data-testid": "doc-marker" }));
  }
  const q = cluster.quorum;
  parts.push(svg("text", { class: "ring-center", y: -6 }, DOC_ID.length > 16 ? `${DOC_ID.slice(0, 15)}…` : DOC_ID));
  parts.push(svg("text", { class: "ring-sub", y: 10 }, o ? `at ${(o.position * 100).toFixed(1)}% of the ring` : "position unknown"));
  if (tokens?.length) parts.push(svg("text", { class: "ring-sub", y: 23 }, `${tokens.length} tokens · ${new Set(tokens.map((t) => t[1])).size} relays`));
  ring.replaceChildren(...parts);
}

function renderCluster() {
  const q = cluster.quorum;
  $("quorum").textContent = q?.n ? `N=${q.n} · W=${q.w} · R=${q.r}` : "N=? · W=? · R=?";
  renderRing();
  const owners = cluster.owners?.owners ?? null;
  const ownersEl = $("owners");
  ownersEl.replaceChildren(
    owners
      ? el("span", {}, "This document lives on ", ...owners.flatMap((id, i) => [i ? (i === owners.length - 1 ? " then " : ", ") : "", el("b", { style: `color:${nodeColor(id)}` }, id)]), " (preference order).")
      : "Where this document lives: unknown (the relay has no /cluster/owners).",
  );
  ownersEl.dataset.owners = owners ? owners.join(",") : "";
  const mine = offline ? null : relayOf(socket)?.id;
  const admin = cluster.adminUp;
  $("admin-note").hidden = !admin;
  const list = $("nodes");
  list.replaceChildren(
    ...cluster.nodes.map((n) => {
      const rank = owners ? owners.indexOf(n.id) : -1;
      const stats = [
        typeof n.hints === "number" ? `${n.hints} hint${n.hints === 1 ? "" : "s"}` : null,
        typeof n.connections === "number" ? `${n.connections} conn` : null,
        typeof n.docs === "number" ? `${n.docs} doc${n.docs === 1 ? "" : "s"} loaded` : null,
      ].filter(Boolean);
      if (n.running === false) stats.unshift("process stopped");
      const button = admin
        ? n.running
          ? el("button", { class: "btn small danger", type: "button", dataset: { testid: "node-stop" }, onclick: (e) => adminAction(e.currentTarget, n.id, "stop") }, "Stop")
          : el("button", { class: "btn small", type: "button", dataset: { testid: "node-start" }, onclick: (e) => adminAction(e.currentTarget, n.id, "start") }, "Start")
        : null;
      return el(
        "li",
        { class: `node state-${n.state}`, dataset: { testid: "node", node: n.id, state: n.state, hints: n.hints ?? "" }, style: `--c:${nodeColor(n.id)}` },
        el("span", { class: "swatch" }, n.id),
        el(
          "div",
          { class: "node-main" },
          el(
            "div",
            { class: "node-line" },
            el("code", {}, n.addr ?? "?"),
            el("span", { class: `pill state ${n.state}`, dataset: { testid: "node-state" } }, n.state),
            rank >= 0 ? el("span", { class: "pill owner", title: "holds this document" }, `replica #${rank + 1}`) : null,
            mine === n.id ? el("span", { class: "pill you", dataset: { testid: "node-you" } }, "this tab") : null,
          ),
          el("div", { class: "node-stats" }, stats.join(" · ") || "\u00a0"),
        ),
        button,
      );
    }),
  );
  const hints = $("pending-hints");
  hints.textContent = cluster.hints === null ? "unknown" : String(cluster.hints);
  hints.dataset.value = cluster.hints ?? "";
}

async function adminAction(button, id, action) {
  button.disabled = true;
  button.textContent = action === "stop" ? "Stopping…" : "Starting…";
  try {
    const res = await fetch(`${setup.admin}/admin/nodes/${encodeURIComponent(id)}/${action}`, { method: "POST" });
    if (!res.ok) showError(`could not ${action} relay ${id}: ${(await res.json().catch(() => ({}))).error ?? res.status}`);
  } catch (e) {
    showError(`could not reach the launcher's admin endpoint: ${e.message}`);
  }
  await pollCluster();
}

async function clusterLoop() {
  for (;;) {
    try {
      await pollCluster();
    } catch (e) {
      console.warn("cluster panel:", e);
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

// ---- wiring ---------------------------------------------------------------------------------

function commitTitle() {
  const input = $("title-input");
  const text = input.value.trim();
  titleDirty = false;
  const current = last?.title?.text ?? "";
  if (text === current) return;
  write((d) => d.register("title").set({ text, author: me.name, color: me.color, tab: me.tab, at: Date.now() }));
}

function wire() {
  $("like").addEventListener("click", () => write((d) => d.counter("likes").increment(1)));
  $("upvote").addEventListener("click", () => write((d) => d.pnCounter("votes").increment(1)));
  $("downvote").addEventListener("click", () => write((d) => d.pnCounter("votes").decrement(1)));
  const title = $("title-input");
  title.addEventListener("input", () => (titleDirty = true));
  title.addEventListener("blur", () => titleDirty && commitTitle());
  title.addEventListener("keydown", (e) => {
    if (e.key === "Escape") {
      titleDirty = false;
      title.blur();
      scheduleRender();
    }
  });
  $("title-form").addEventListener("submit", (e) => {
    e.preventDefault();
    commitTitle();
  });
  $("tag-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("tag-input");
    const tag = input.value.trim().replace(/\s+/g, " ");
    if (!tag) return;
    input.value = "";
    write((d) => d.set("tags").add(tag));
  });
  $("offline-toggle").addEventListener("change", (e) => setOffline(e.currentTarget.checked));
  addEventListener("pagehide", (e) => {
    if (!e.persisted) leave();
    endSession();
  });
  addEventListener("pageshow", (e) => {
    if (e.persisted) startSession().catch((err) => showError(err.message));
  });
  setInterval(heartbeat, HEARTBEAT_MS);
  setInterval(scheduleRender, 1000); // presence freshness, "x s ago"
}

/** Hooks for the end-to-end tests (test/e2e): read-only views and the ack promise. */
function exposeHooks(ready) {
  window.demo = {
    ready,
    docId: DOC_ID,
    me,
    /** The board's shared state (presence left out: it changes with every heartbeat). */
    board() {
      const s = read();
      return s && { likes: s.likes, votes: s.votes, title: s.title?.text ?? null, titleAuthor: s.title?.author ?? null, tags: s.tags };
    },
    status: () => (offline ? "offline" : (client?.status ?? "connecting")),
    relay: () => (offline ? null : (relayOf(socket)?.id ?? null)),
    /** Resolves once the relay acknowledged every write made so far (doc.synced()). */
    synced: () => (doc ? doc.synced() : Promise.reject(new Error("no open document"))),
    offline: () => offline,
    setOffline,
  };
}

async function main() {
  $("doc-id").textContent = DOC_ID;
  document.title = `${DOC_ID} · Concord board`;
  wire();
  render();
  try {
    ({ Client } = await import("concord-sync"));
  } catch (e) {
    showError(`could not load the concord-sync package (${e.message}); build it with: npm run build`);
    throw e;
  }
  setup = await discover();
  cluster.quorum = setup.quorum;
  cluster.nodes = setup.nodes.map((n) => ({ ...n, state: "unknown", hints: null }));
  renderCluster();
  clusterLoop();
  await startSession();
}

const ready = main();
exposeHooks(ready);
ready.catch((e) => {
  console.error(e);
  showError(e.message ?? String(e));
});
