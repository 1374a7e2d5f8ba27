// (c) A relay is killed while pages are editing: the pages on it fail over, nothing
// acknowledged is lost, the cluster panel shows the relay down and hints pending, and
// the hints drain once the relay is back.
//
// Four relays with N=3: with as many relays as replicas there is no substitute to hold a
// hint (every relay already owns every document), so hinted handoff needs a fourth.
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
  relayOf,
  screenshots,
  SOON,
  synced,
  waitOnline,
} from "./lib/browser.mjs";

let cluster;
let browser;

before(async () => {
  cluster = await startCluster({ nodes: 4, replicas: 3 });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await cluster?.stop();
});

const node = (id) => `[data-testid="node"][data-node="${id}"]`;

test("killing a relay loses no acknowledged write; its hints drain after restart", { timeout: 300_000 }, async () => {
  const doc = "board-failover";
  const { owners } = await cluster.owners(doc);
  assert.equal(owners.length, 3);
  const victim = owners[0];
  const spare = cluster.ids.find((id) => !owners.includes(id));

  // One page on the relay about to die, one on another owner, one on the non-owner.
  const onVictim = await openBoard(await browser.newContext(), cluster.url(victim, doc));
  const onOwner = await openBoard(await browser.newContext(), cluster.url(owners[1], doc));
  const onSpare = await openBoard(await browser.newContext(), cluster.url(spare, doc));
  const pages = [onVictim, onOwner, onSpare];
  await Promise.all(pages.map(waitOnline));
  assert.equal(await relayOf(onVictim), victim);

  let likes = 0;
  const tags = [];
  const round = async (n) => {
    for (const [i, p] of pages.entries()) {
      await like(p, 1);
      likes++;
      const tag = `p${i}-r${n}`;
      await addTag(p, tag);
      tags.push(tag);
    }
  };

  for (let n = 1; n <= 3; n++) await round(n);
  await Promise.all(pages.map(synced));
  const acked = { likes, tags: [...tags].sort() };

  // Kill it from the cluster panel (SIGKILL: a crash), and keep editing meanwhile.
  await onOwner.click(`${node(victim)} [data-testid="node-stop"]`);
  for (let n = 4; n <= 6; n++) await round(n);

  // The page on the dead relay moves to another one.
  await eventually(async () => (await onVictim.evaluate(() => window.demo.status())) === "online" && (await relayOf(onVictim)) !== victim, {
    what: "the page on the killed relay to fail over",
  });
  await Promise.all(pages.map(synced));
  const nowAcked = await board(onOwner);
  assert.ok(nowAcked.likes >= acked.likes, "acknowledged likes are still counted");
  for (const t of acked.tags) assert.ok(nowAcked.tags.includes(t), `acknowledged tag ${t} is still there`);

  // The panel shows the relay down, and the substitute holding hints for it.
  await onOwner.waitForSelector(`${node(victim)}[data-state="down"]`, { timeout: SOON });
  const hints = await eventually(async () => (await cluster.pendingHints()) > 0 && cluster.pendingHints(), {
    what: "pending hints for the killed relay",
  });
  assert.ok(hints > 0);
  await onOwner.waitForFunction(() => Number(document.querySelector('[data-testid="pending-hints"]').dataset.value) > 0, null, { timeout: SOON });
  await screenshots(onOwner, "failover-node-down");

  // Back up (from the panel): the hints are delivered and deleted.
  await onOwner.click(`${node(victim)} [data-testid="node-start"]`);
  await onOwner.waitForSelector(`${node(victim)}[data-state="up"]`, { timeout: SOON });
  await eventually(async () => (await cluster.pendingHints()) === 0, { what: "the hints to drain" });
  await onOwner.waitForFunction(() => document.querySelector('[data-testid="pending-hints"]').dataset.value === "0", null, { timeout: SOON });

  const final = await converged(pages);
  assert.equal(final.likes, likes, "every like counts, acknowledged or queued during the failover");
  assert.deepEqual(final.tags, [...tags].sort());

  // A new browser on the restarted relay reads the same board.
  const fresh = await openBoard(await browser.newContext(), cluster.url(victim, doc));
  await waitOnline(fresh);
  await synced(fresh);
  await converged([...pages, fresh]);

  await screenshots(onOwner, "failover");
  noPageErrors(...pages, fresh);
});
