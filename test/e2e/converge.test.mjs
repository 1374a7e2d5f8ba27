// (a) Three pages (two browser contexts, one with two tabs) edit every widget of the
// board; all of them converge to the same board, through the relays and between tabs.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { startCluster } from "./lib/cluster.mjs";
import {
  addTag,
  converged,
  downvote,
  launchBrowser,
  like,
  noPageErrors,
  openBoard,
  removeTag,
  screenshots,
  setTitle,
  shown,
  SOON,
  upvote,
  waitOnline,
} from "./lib/browser.mjs";

let cluster;
let browser;

before(async () => {
  cluster = await startCluster({ nodes: 3 });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await cluster?.stop();
});

test("every widget converges across tabs, browsers and relays", { timeout: 240_000 }, async () => {
  const doc = "board-converge";
  const alice = await browser.newContext();
  const bob = await browser.newContext();
  // Alice has two tabs of one origin (they also sync over a BroadcastChannel); Bob uses
  // another relay.
  const a1 = await openBoard(alice, cluster.url("a", doc));
  const a2 = await openBoard(alice, cluster.url("a", doc));
  const b = await openBoard(bob, cluster.url("b", doc));
  const pages = [a1, a2, b];
  await Promise.all(pages.map(waitOnline));

  await like(a1, 3);
  await upvote(a1, 2);
  await setTitle(a1, "Groceries");
  await addTag(a1, "milk");
  await addTag(a1, "rust");

  await like(a2, 2);
  await downvote(a2, 1);
  await addTag(a2, "eggs");

  await like(b, 4);
  await upvote(b, 1);
  await addTag(b, "bread");

  // Bob removes a tag he has seen, and renames the board after seeing Alice's title: a
  // causally later write, so last-writer-wins must pick his.
  await b.waitForSelector('[data-testid="tag"][data-tag="milk"]', { timeout: SOON });
  await removeTag(b, "milk");
  await b.waitForFunction(() => window.demo.board().title === "Groceries", null, { timeout: SOON });
  await setTitle(b, "Groceries for the weekend");

  const final = await converged(pages);
  assert.deepEqual(
    { likes: final.likes, votes: final.votes, title: final.title, tags: final.tags },
    { likes: 9, votes: 2, title: "Groceries for the weekend", tags: ["bread", "eggs", "rust"] },
  );
  assert.equal(final.titleAuthor, await b.evaluate(() => window.demo.me.name), "the title shows who wrote it last");
  for (const p of pages) {
    assert.deepEqual(await shown(p), { likes: 9, votes: 2, title: "Groceries for the weekend", tags: ["bread", "eggs", "rust"] });
  }

  // Everything is acknowledged by a write quorum, and every page sees the three tabs.
  await Promise.all(pages.map((p) => p.evaluate(() => window.demo.synced())));
  for (const p of pages) {
    await p.waitForFunction(() => document.querySelectorAll('[data-testid="presence-tab"]').length === 3, null, { timeout: SOON });
  }
  // Remote changes were logged on the page that did not make them.
  const log = await a1.locator('[data-testid="activity-item"]').allTextContents();
  assert.ok(log.some((l) => l.includes("bread")), `a1's activity log mentions Bob's tag: ${JSON.stringify(log)}`);

  await screenshots(a1, "converge");
  // And at a phone's width: one column, nothing wider than the screen.
  await b.setViewportSize({ width: 390, height: 844 });
  assert.ok(await b.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth), "no horizontal scrolling on a phone");
  await screenshots(b, "converge-phone");
  noPageErrors(...pages);
});
