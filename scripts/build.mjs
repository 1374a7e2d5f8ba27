#!/usr/bin/env node
// Builds the npm package into pkg/:
//   cargo build (wasm-release profile) -> wasm-bindgen --target web -> wasm-opt -Oz
//   -> the hand-written glue and types from js/ -> minified JS.
// Usage: node scripts/build.mjs [--debug]   (--debug: dev profile, no wasm-opt; faster)
import { execFileSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const pkg = join(root, "pkg");
const debug = process.argv.includes("--debug");
const profile = debug ? "dev" : "wasm-release";
const profileDir = debug ? "debug" : "wasm-release";

function run(cmd, args) {
  console.log(`$ ${cmd} ${args.join(" ")}`);
  try {
    execFileSync(cmd, args, { cwd: root, stdio: "inherit" });
  } catch (e) {
    console.error(`build failed: \`${cmd}\` exited with ${e.status ?? e.message}`);
    process.exit(1);
  }
}

function which(cmd) {
  for (const dir of (process.env.PATH ?? "").split(":")) {
    if (dir && existsSync(join(dir, cmd))) return join(dir, cmd);
  }
  const home = join(process.env.HOME ?? "", ".cargo", "bin", cmd);
  return existsSync(home) ? home : null;
}

// 1. Rust -> wasm32.
run("cargo", ["build", "-p", "concord-wasm", "--target", "wasm32-unknown-unknown", "--profile", profile]);
const targetDir = process.env.CARGO_TARGET_DIR ?? join(root, "target");
const wasm = join(targetDir, "wasm32-unknown-unknown", profileDir, "concord_wasm.wasm");

// 2. wasm-bindgen: the low-level JS bindings (concord_wasm.js + concord_wasm_bg.wasm).
const wasmBindgen = which("wasm-bindgen");
if (!wasmBindgen) {
  console.error("build failed: wasm-bindgen not found; run `bash scripts/setup.sh` (installs wasm-bindgen-cli)");
  process.exit(1);
}
rmSync(pkg, { recursive: true, force: true });
mkdirSync(pkg, { recursive: true });
run(wasmBindgen, [wasm, "--out-dir", pkg, "--target", "web", "--no-typescript", "--omit-default-module-path"]);

// 3. wasm-opt -Oz (binaryen from node_modules). Features: what rustc's wasm32 target
// enables by default; all are baseline in current browsers and Node 20.
// --low-memory-unused: rustc's wasm32 layout puts the 1 MiB stack first (data starts at
// 1 MiB), so addresses below 1 KiB are reached only by a stack that already overflowed;
// assuming so lets wasm-opt fold more address offsets (~0.8 KB gzipped).
const bg = join(pkg, "concord_wasm_bg.wasm");
const FEATURES = [
  "--enable-bulk-memory",
  "--enable-sign-ext",
  "--enable-mutable-globals",
  "--enable-nontrapping-float-to-int",
  "--enable-reference-types",
  "--enable-multivalue",
];
if (!debug) {
  const wasmOpt = join(root, "node_modules", ".bin", "wasm-opt");
  if (!existsSync(wasmOpt)) {
    console.error("build failed: node_modules/.bin/wasm-opt missing; run `npm ci` (binaryen)");
    process.exit(1);
  }
  run(wasmOpt, [
    "-Oz",
    "--converge",
    "--low-memory-unused",
    ...FEATURES,
    "--strip-debug",
    "--strip-producers",
    bg,
    "-o",
    bg,
  ]);
  minifyNames(wasmOpt, bg, join(pkg, "concord_wasm.js"));
}

// 3b. Short import, export and module names. wasm-bindgen names each import after its
// function plus a 16-hex-digit hash (`__wbg_relay_b96eaf1e91bc60f0`); the names sit in
// the .wasm and again in the JS glue, and hashes do not compress (~1.3 KB gzipped in
// all). binaryen renames imports and exports to `a`, `b`, ..., puts every import in
// module "a", and prints the mapping, with which the glue is rewritten: the keys and
// module name of its import object, and its `wasm.<export>` references (the only way it
// reaches the exports).
function minifyNames(wasmOpt, wasmFile, glueFile) {
  const fail = (msg) => {
    console.error(`build failed: minifying wasm names: ${msg}`);
    process.exit(1);
  };
  console.log(`$ ${wasmOpt} --minify-imports-and-exports-and-modules ${wasmFile}`);
  let map;
  try {
    const out = execFileSync(
      wasmOpt,
      [...FEATURES, "--minify-imports-and-exports-and-modules", wasmFile, "-o", wasmFile],
      { cwd: root, encoding: "utf8", maxBuffer: 1 << 24 },
    );
    map = JSON.parse(out.slice(out.indexOf("{")));
  } catch (e) {
    fail(e.message);
  }
  const name = (n) => n.replace(/\$/g, "\\$");
  let glue = readFileSync(glueFile, "utf8");
  const modules = new Set(map.imports.map(([module]) => module));
  if (modules.size !== 1 || !glue.includes(`"${[...modules][0]}": import0`)) fail("expected one import module");
  glue = glue.replace(`"${[...modules][0]}": import0`, `a: import0`);
  for (const [, base, short] of map.imports) {
    const re = new RegExp(`(?<![\\w$])${name(base)}(?=: function\\()`, "g");
    if ((glue.match(re) ?? []).length !== 1) fail(`import ${base} is not defined once in the glue`);
    glue = glue.replace(re, short);
  }
  for (const [base, short] of map.exports) {
    glue = glue.replace(new RegExp(`(?<![\\w$])wasm\\.${name(base)}(?![\\w$])`, "g"), `wasm.${short}`);
  }
  const left = glue.match(/(?<![\w$])wasm\.[\w$]{3,}/);
  if (left) fail(`the glue still uses ${left[0]}`);
  writeFileSync(glueFile, glue);
}

// 4. The hand-written glue and types.
const js = join(root, "js");
for (const f of readdirSync(js)) {
  if (/\.(m?js|d\.ts)$/.test(f)) copyFileSync(join(js, f), join(pkg, f));
}

// 5. Minify the JS a browser downloads (the sources in js/ keep their comments; apps
// that bundle minify again, which is harmless). vite's `minify` is oxc's.
if (!debug) {
  const { minify } = await import("vite");
  for (const f of readdirSync(pkg)) {
    if (!f.endsWith(".js")) continue;
    const file = join(pkg, f);
    const { code, errors } = await minify(f, readFileSync(file, "utf8"), { module: true, compress: true, mangle: true });
    if (errors?.length) {
      console.error(`build failed: minifying ${f}: ${errors.map((e) => e.message).join("; ")}`);
      process.exit(1);
    }
    writeFileSync(file, code);
  }
}

const size = (f) => statSync(join(pkg, f)).size;
console.log(`built pkg/ (${profile}): concord_wasm_bg.wasm ${size("concord_wasm_bg.wasm")} B, concord_wasm.js ${size("concord_wasm.js")} B`);
