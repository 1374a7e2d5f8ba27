// (b) One page goes offline and edits while another edits concurrently; when the first
// comes back, the OR-Set keeps concurrent adds, counters sum every increment, and the
// title follows last-writer-wins.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { startCluster } from "./lib/cluster.mjs";
import {
  addTag,
  board,
  converged,
  downvote,
  launchBrowser,
  like,
  noPageErrors,
  openBoard,
  removeTag,
  screenshots,
  setOffline,
  setTitle,
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

test("edits made offline merge with concurrent edits when the page comes back", { timeout: 240_000 }, async () => {
  const doc = "board-offline";
  const away = await openBoard(await browser.newContext(), cluster.url("a", doc));
  const here = await openBoard(await browser.newContext(), cluster.url("b", doc));
  await Promise.all([waitOnline(away), waitOnline(here)]);

  // A common starting point.
  await like(away, 1);
  await addTag(away, "base");
  await setTitle(away, "v0");
  const start = await converged([away, here]);
  assert.deepEqual(start.tags, ["base"]);

  await setOffline(away, true);
  assert.equal(await away.evaluate(() => window.demo.status()), "offline");
  assert.equal(await away.getAttribute('[data-testid="status"]', "data-status"), "offline");

  // Concurrently: the online page re-adds "base" (a new add the offline page never saw)
  // and writes the title first...
  await like(here, 3);
  await downvote(here, 2);
  await addTag(here, "from-online");
  await addTag(here, "base"); // already there: a no-op for the set's value, but a new dot
  await setTitle(here, "online title");
  await here.evaluate(() => window.demo.synced());

  // ...while the offline page removes the "base" it saw, adds its own tag, and writes the
  // title later (a later hybrid-logical-clock timestamp: it wins).
  await like(away, 2);
  await upvote(away, 1);
  await removeTag(away, "base");
  await addTag(away, "from-offline");
  await away.waitForFunction((t) => Date.now() > t, await here.evaluate(() => Date.now()));
  await setTitle(away, "offline title");

  // The online page sees none of it.
  const meanwhile = await board(here);
  assert.equal(meanwhile.likes, 4);
  assert.ok(!meanwhile.tags.includes("from-offline"));
  assert.equal(meanwhile.title, "online title");

  await setOffline(away, false);
  await waitOnline(away);
  const final = await converged([away, here]);
  assert.equal(final.likes, 1 + 3 + 2, "every increment counts");
  assert.equal(final.votes, -2 + 1, "increments minus decrements");
  assert.deepEqual(final.tags, ["base", "from-offline", "from-online"], "the concurrent add of 'base' survives the offline remove");
  assert.equal(final.title, "offline title", "last writer wins");

  await away.waitForSelector('[data-testid="activity-item"][data-kind="sync"]', { timeout: SOON });
  await Promise.all([away.evaluate(() => window.demo.synced()), here.evaluate(() => window.demo.synced())]);
  await screenshots(away, "offline");
  noPageErrors(away, here);
});
