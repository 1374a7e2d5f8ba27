// The package in a Vite app with no extra setup: `npm pack` the built package, install it
// into a copy of test/vite/, `vite build` it, and run the bundle in headless Chromium.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { extname, join, normalize } from "node:path";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("../..", import.meta.url));
const work = mkdtempSync(join(tmpdir(), "concord-vite-"));
after(() => rmSync(work, { recursive: true, force: true }));

const CHROMIUM = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";

/** `npm pack` the repo and unpack it as app/node_modules/concord-sync. */
function install(app) {
  const tgz = execFileSync("npm", ["pack", "--silent", "--pack-destination", work], { cwd: root, encoding: "utf8" })
    .trim()
    .split("\n")
    .pop();
  const dest = join(app, "node_modules", "concord-sync");
  mkdirSync(dest, { recursive: true });
  execFileSync("tar", ["-xzf", join(work, tgz), "-C", dest, "--strip-components=1"]);
  return dest;
}

function serve(dir) {
  const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm" };
  const server = createServer((req, res) => {
    const path = normalize(join(dir, decodeURIComponent(new URL(req.url, "http://x").pathname)));
    const file = path.endsWith("/") ? join(path, "index.html") : path;
    if (!file.startsWith(dir) || !existsSync(file)) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" });
    res.end(readFileSync(file));
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

test("a Vite app that imports concord-sync builds and runs in Chromium", { timeout: 120_000 }, async (t) => {
  const app = join(work, "app");
  mkdirSync(app, { recursive: true });
  for (const f of ["index.html", "main.js", "vite.config.js"]) copyFileSync(join(root, "test", "vite", f), join(app, f));
  const pkg = install(app);
  assert.ok(existsSync(join(pkg, "pkg", "concord_wasm_bg.wasm")), "the packed package ships the .wasm");
  assert.ok(existsSync(join(pkg, "pkg", "index.d.ts")), "the packed package ships its types");

  const { build } = await import("vite");
  await build({ root: app, logLevel: "warn", configFile: join(app, "vite.config.js") });
  const assets = readdirSync(join(app, "dist", "assets"));
  assert.ok(assets.some((f) => f.endsWith(".wasm")), `a .wasm asset is emitted (got ${assets.join(", ")})`);

  if (!existsSync(CHROMIUM)) {
    t.skip(`built, but not run: no Chromium at ${CHROMIUM}`);
    return;
  }
  const { chromium } = await import("playwright-core");
  const server = await serve(join(app, "dist"));
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--disable-gpu", "--no-sandbox", "--disable-background-networking", "--disable-component-update"],
  });
  try {
    const page = await browser.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(e.message));
    await page.goto(`http://127.0.0.1:${server.address().port}/`);
    await page.waitForFunction(() => document.getElementById("out").textContent !== "loading…", null, {
      timeout: 30_000,
    });
    const text = await page.textContent("#out");
    assert.deepEqual(errors, []);
    assert.deepEqual(JSON.parse(text), {
      status: "offline",
      doc: { likes: 1, votes: 1, title: "Hello", tags: ["rust"] },
    });
  } finally {
    await browser.close();
    server.close();
  }
});
