// A minimal app: nothing but `import { Client } from "concord-sync"`, no Vite plugins or
// wasm settings. test/node/vite.test.mjs builds it and runs it in headless Chromium.
import { Client } from "concord-sync";

const out = document.getElementById("out");

async function main() {
  const client = await Client.connect({ database: `vite-${Date.now()}` });
  const doc = await client.open("board-1");
  doc.counter("likes").increment(1);
  doc.pnCounter("votes").increment(2);
  doc.pnCounter("votes").decrement(1);
  doc.register("title").set("Hello");
  doc.set("tags").add("rust");
  out.textContent = JSON.stringify({ status: client.status, doc: doc.toJSON() });
  client.close();
}

main().catch((e) => {
  out.textContent = `error: ${e && e.stack ? e.stack : e}`;
});
