// Runs a WASI preview 1 command module in Node.js's node:wasi (Node.js >= 24: see toolchain/pins.yaml).
// Written by wasmforge; `invoke runtimes` reports it as the `node` runtime.
//
//   node node-wasi.mjs [--dir GUEST:HOST]... [--env K=V]... [--argv0 NAME] MODULE.wasm [ARGS...]
//
// argv[0] of the module is NAME, or MODULE's file name without .wasm, as our other runners give it; the
// environment holds only what --env gives; the exit status is the module's. node:wasi has no
// read-only preopens, so GUEST:HOST:ro is refused rather than silently made writable.
import { readFile } from "node:fs/promises";
import { basename } from "node:path";
import { argv, exit, stderr } from "node:process";
import { WASI } from "node:wasi";

function fail(message) {
  stderr.write(`node-wasi: ${message}\n`);
  exit(2);
}

const preopens = {};
const env = {};
let argv0 = null;
let rest = argv.slice(2);
while (rest.length && rest[0].startsWith("--")) {
  const [option, value] = rest;
  if (value === undefined) fail(`${option} needs a value`);
  if (option === "--dir") {
    const colon = value.indexOf(":");
    if (colon <= 0 || !value.startsWith("/")) fail(`--dir ${value}: expected GUEST:HOST with an absolute guest path`);
    const host = value.slice(colon + 1);
    if (host.endsWith(":ro")) fail(`--dir ${value}: node:wasi cannot preopen a directory read-only`);
    preopens[value.slice(0, colon)] = host;
  } else if (option === "--env") {
    const eq = value.indexOf("=");
    if (eq <= 0) fail(`--env ${value}: expected K=V`);
    env[value.slice(0, eq)] = value.slice(eq + 1);
  } else if (option === "--argv0") {
    argv0 = value;
  } else {
    fail(`unknown option ${option}`);
  }
  rest = rest.slice(2);
}
if (!rest.length) fail("usage: node node-wasi.mjs [--dir GUEST:HOST]... [--env K=V]... [--argv0 NAME] MODULE.wasm [ARGS...]");
const [module, ...args] = rest;

const wasi = new WASI({
  version: "preview1",
  args: [argv0 ?? basename(module).replace(/\.wasm$/, ""), ...args],
  env,
  preopens,
  returnOnExit: true,
});
let compiled;
try {
  compiled = await WebAssembly.compile(await readFile(module));
} catch (error) {
  fail(`cannot compile ${module}: ${error.message}`);
}
const instance = await WebAssembly.instantiate(compiled, wasi.getImportObject());
exit(wasi.start(instance));
