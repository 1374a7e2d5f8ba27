#!/usr/bin/env node
// Prints the gzip -9 size of what a browser downloads from the package (the .wasm and
// every JS file the browser entry loads) and checks it against the budget.
// Usage: node scripts/size.mjs   (after `npm run build`); exits 1 over the budget.
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const BUDGET = 60 * 1024; // fail above this
const GOAL = 48 * 1024; // what we aim for

const pkg = join(dirname(fileURLToPath(import.meta.url)), "..", "pkg");
const files = ["concord_wasm_bg.wasm", "concord_wasm.js", "client.js", "browser.js"];
const missing = files.filter((f) => !existsSync(join(pkg, f)));
if (missing.length) {
  console.error(`size: missing ${missing.map((f) => `pkg/${f}`).join(", ")}; run \`npm run build\` first`);
  process.exit(2);
}

const kb = (n) => `${(n / 1024).toFixed(1)} KB`;
const rows = files.map((f) => {
  const bytes = readFileSync(join(pkg, f));
  return { file: `pkg/${f}`, raw: bytes.length, gz: gzipSync(bytes, { level: 9 }).length };
});
const total = { file: "total", raw: rows.reduce((s, r) => s + r.raw, 0), gz: rows.reduce((s, r) => s + r.gz, 0) };

const w = Math.max(...rows.map((r) => r.file.length), 5);
const line = (r) => `${r.file.padEnd(w)}  ${kb(r.raw).padStart(9)}  ${kb(r.gz).padStart(9)}`;
console.log(`${"file".padEnd(w)}  ${"raw".padStart(9)}  ${"gzip -9".padStart(9)}`);
for (const r of rows) console.log(line(r));
console.log("-".repeat(w + 22));
console.log(line(total));

const ok = total.gz <= BUDGET;
const verdict = ok ? "PASS" : "FAIL";
const goal = total.gz <= GOAL ? "goal met" : `goal ${kb(GOAL)} not met (${kb(total.gz - GOAL)} over)`;
console.log(`${verdict}: ${kb(total.gz)} gzipped against a budget of ${kb(BUDGET)}; ${goal}`);
process.exit(ok ? 0 : 1);
