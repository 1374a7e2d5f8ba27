// (d) A page reloaded while offline still has its unsent edits (IndexedDB), and they
// reach the other pages once it is back online.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { startCluster } from "./lib/cluster.mjs";
import {
  addTag,
  board,
  converged,
  eventually,
  launchBrowser,
  like,
  noPageErrors,
  openBoard,
  screenshots,
  setOffline,
  setTitle,
  shown,
  SOON,
  upvote,
  waitOnline,
  waitReady,
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

test("edits made offline survive a reload and sync once online", { timeout: 240_000 }, async () => {
  const doc = "board-reload";
  const page = await openBoard(await browser.newContext(), cluster.url("a", doc));
  const other = await openBoard(await browser.newContext(), cluster.url("c", doc));
  await Promise.all([waitOnline(page), waitOnline(other)]);
  await like(page, 1);
  await addTag(page, "synced-before");
  await converged([page, other]);

  await setOffline(page, true);
  await like(page, 2);
  await upvote(page, 3);
  await addTag(page, "written-offline");
  await setTitle(page, "Saved in this browser");
  const before = await board(page);

  // Reload only once the edits are durable. The package has no "saved" signal, so ask a
  // second offline tab of the same browser, which loads from IndexedDB alone, until it
  // sees them. (An edit made a few milliseconds before an unload can be lost: the write
  // to IndexedDB is started in a later task.)
  const probe = await openBoard(page.context(), `${cluster.url("a", doc)}&offline=1`);
  await eventually(
    async () => {
      await probe.reload();
      await waitReady(probe);
      return JSON.stringify(await board(probe)) === JSON.stringify(before);
    },
    { what: "the offline edits to be in IndexedDB" },
  );
  await probe.close();

  await page.reload();
  await waitReady(page);
  assert.equal(await page.evaluate(() => window.demo.offline()), true, "the tab stays offline across the reload");
  const after = await board(page);
  assert.deepEqual(after, before, "the unsent edits are back after the reload");
  assert.deepEqual(await shown(page), { likes: 3, votes: 3, title: "Saved in this browser", tags: ["synced-before", "written-offline"] });

  // Nothing reached the other page.
  const theirs = await board(other);
  assert.equal(theirs.likes, 1);
  assert.deepEqual(theirs.tags, ["synced-before"]);

  await setOffline(page, false);
  await waitOnline(page);
  const final = await converged([page, other]);
  assert.deepEqual(
    { likes: final.likes, votes: final.votes, title: final.title, tags: final.tags },
    { likes: 3, votes: 3, title: "Saved in this browser", tags: ["synced-before", "written-offline"] },
  );
  await page.evaluate(() => window.demo.synced());

  // A fresh browser that never saw either page gets the same board from the relays.
  const late = await openBoard(await browser.newContext(), cluster.url("b", doc));
  await waitOnline(late);
  await late.evaluate(() => window.demo.synced());
  await converged([page, other, late], { timeout: SOON });

  await screenshots(page, "reload-offline");
  noPageErrors(page, other, late);
});
