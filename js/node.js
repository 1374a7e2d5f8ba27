// Entry point for Node.js (20+): the .wasm file is read from disk. Pass a WebSocket
// constructor (e.g. `import WebSocket from "ws"`) where the runtime has none.
import { readFile } from "node:fs/promises";
import init from "./concord_wasm.js";
import { setLoader } from "./client.js";

setLoader(async () => init({ module_or_path: await readFile(new URL("./concord_wasm_bg.wasm", import.meta.url)) }));

export { Client, Doc, Counter, PnCounter, Register, CrdtSet, UnauthorizedError, WriteRefusedError } from "./client.js";
