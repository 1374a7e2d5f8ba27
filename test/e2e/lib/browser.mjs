// Headless Chromium driving the demo page through its data-testid hooks, and helpers to
// wait for a condition (never for a fixed time).
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { ROOT } from "./cluster.mjs";

export const CHROMIUM = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";
export const OUTPUT = join(ROOT, "test-output", "e2e");

/** A generous bound for anything that should happen "soon" (sync, failover, restart):
 * long enough to cover a write whose quorum ack was missed and is retried by the
 * client's periodic resync (30 ticks of 1 s). */
export const SOON = 90_000;

export async function launchBrowser() {
  const { chromium } = await import("playwright-core");
  return chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--no-first-run",
      "--disable-sync",
      "--disable-quic",
    ],
  });
}

const tid = (id) => `[data-testid="${id}"]`;

/** Opens the board at `url` in `context`; resolves once the document is open. Page
 * errors are collected on `page.errors` so a test can assert there were none. */
export async function openBoard(context, url) {
  const page = await context.newPage();
  page.errors = [];
  page.on("pageerror", (e) => page.errors.push(e.message));
  page.setDefaultTimeout(SOON);
  await page.goto(url);
  await waitReady(page);
  return page;
}

export async function waitReady(page) {
  await page.waitForFunction(() => window.demo && document.body.dataset.ready === "true", null, { timeout: SOON });
}

export async function waitOnline(page) {
  await page.waitForFunction(() => window.demo.status() === "online", null, { timeout: SOON });
}

export const board = (page) => page.evaluate(() => window.demo.board());
export const relayOf = (page) => page.evaluate(() => window.demo.relay());
/** Resolves once the cluster acknowledged every write this page made so far. */
export const synced = (page) => page.evaluate(() => window.demo.synced());

// ---- what a user does ----

export async function like(page, times = 1) {
  for (let i = 0; i < times; i++) await page.click(tid("like"));
}
export async function upvote(page, times = 1) {
  for (let i = 0; i < times; i++) await page.click(tid("upvote"));
}
export async function downvote(page, times = 1) {
  for (let i = 0; i < times; i++) await page.click(tid("downvote"));
}
export async function setTitle(page, text) {
  await page.fill(tid("title-input"), text);
  await page.press(tid("title-input"), "Enter");
}
export async function addTag(page, tag) {
  await page.fill(tid("tag-input"), tag);
  await page.press(tid("tag-input"), "Enter");
  await page.waitForSelector(`${tid("tag")}[data-tag="${tag}"]`);
}
export async function removeTag(page, tag) {
  await page.click(`${tid("tag")}[data-tag="${tag}"] ${tid("tag-remove")}`);
  await page.waitForSelector(`${tid("tag")}[data-tag="${tag}"]`, { state: "detached" });
}
export async function setOffline(page, on) {
  // The switch's input is visually hidden; click its label like a user would.
  if ((await page.evaluate(() => window.demo.offline())) !== on) await page.click(".switch");
  await page.waitForFunction((want) => window.demo.offline() === want && document.body.dataset.ready === "true", on, { timeout: SOON });
}

/** What the board shows, read from the DOM (not from the document). */
export async function shown(page) {
  return page.evaluate(() => ({
    likes: Number(document.querySelector('[data-testid="likes"]').textContent),
    votes: Number(document.querySelector('[data-testid="votes"]').textContent),
    title: document.querySelector('[data-testid="title-input"]').value,
    tags: [...document.querySelectorAll('[data-testid="tag"]')].map((li) => li.dataset.tag),
  }));
}

/** Waits until `check()` returns a truthy value; returns it. Fails after `timeout` with
 * the last value seen. */
export async function eventually(check, { timeout = SOON, interval = 200, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}; last seen: ${last instanceof Error ? last.stack : JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, interval));
  }
}

/** Waits until every page shows the same board (document and DOM agree); returns it. */
export async function converged(pages, { timeout = SOON, what = "the pages to converge" } = {}) {
  let boards;
  try {
    await eventually(
    async () => {
      boards = await Promise.all(pages.map(board));
      const doms = await Promise.all(pages.map(shown));
      const same = boards.every((b) => JSON.stringify(b) === JSON.stringify(boards[0]));
      const domOk = doms.every((d, i) => d.likes === boards[i].likes && d.votes === boards[i].votes && JSON.stringify(d.tags) === JSON.stringify(boards[i].tags));
      return same && domOk ? boards[0] : null;
    },
    { timeout, what },
    );
  } catch (e) {
    e.message += `\nboards: ${JSON.stringify(boards)}`;
    throw e;
  }
  return boards[0];
}

/** Saves the whole page and the cluster panel under test-output/e2e/. */
export async function screenshots(page, name) {
  mkdirSync(OUTPUT, { recursive: true });
  const board = join(OUTPUT, `${name}-board.png`);
  const panel = join(OUTPUT, `${name}-cluster.png`);
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: board, fullPage: true });
  // Unstick the top bar and the panel so that neither covers the other when the panel is
  // scrolled into view.
  const unstick = await page.addStyleTag({ content: ".topbar, .cluster { position: static !important; }" });
  await page.locator(tid("cluster-panel")).screenshot({ path: panel });
  await unstick.evaluate((e) => e.remove());
  return { board, panel };
}

export function noPageErrors(...pages) {
  for (const p of pages) assert.deepEqual(p.errors, [], `page errors on ${p.url()}`);
}
