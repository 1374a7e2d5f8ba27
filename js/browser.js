// Entry point for browsers and bundlers (Vite, webpack, Rollup): the .wasm file is
// referenced with `new URL(..., import.meta.url)`, which bundlers copy as an asset.
import init from "./concord_wasm.js";
import { setLoader } from "./client.js";

setLoader(() => init({ module_or_path: new URL("./concord_wasm_bg.wasm", import.meta.url) }));

export { Client, Doc, Counter, PnCounter, Register, CrdtSet, UnauthorizedError, WriteRefusedError } from "./client.js";
