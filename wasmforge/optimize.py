"""Post-link steps on output modules: import audit and AOT precompilation for wasmtime."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import wasmtime

from .errors import BuildError
from .runtime import aot_key, make_engine, precompiled_path, uses_exceptions


def compile_module(wasm: Path) -> wasmtime.Module:
    """Compile `wasm` once with the engine the runner will use; audit and precompile take the result."""
    try:
        return wasmtime.Module.from_file(make_engine(uses_exceptions(wasm)), str(wasm))
    except wasmtime.WasmtimeError as exc:
        raise BuildError(f"wasmtime cannot compile {wasm.name}", details=str(exc)) from None


def imports(wasm: Path, module: wasmtime.Module | None = None) -> list[tuple[str, str]]:
    module = module or compile_module(wasm)
    return [(imp.module, imp.name or "") for imp in module.imports]


def audit_imports(wasm: Path, allowed_modules: tuple[str, ...] = ("wasi_snapshot_preview1",),
                  module: wasmtime.Module | None = None) -> None:
    """Fail when a module imports anything a plain WASI runtime does not provide."""
    foreign = [f"{m}.{n}" for m, n in imports(wasm, module) if m not in allowed_modules]
    if foreign:
        raise BuildError(f"{wasm.name} imports functions that plain WASI does not provide",
                         details="\n".join(f"  {f}" for f in foreign[:20]),
                         hint="these are usually undefined symbols: add a stub, a library, or compile the feature out")


def precompile(wasm: Path, module: wasmtime.Module | None = None) -> Path:
    """Write `<name>.cwasm` (wasmtime's serialized code) and its key file next to `wasm`."""
    exceptions = uses_exceptions(wasm)
    data = (module or compile_module(wasm)).serialize()
    cwasm = precompiled_path(wasm)
    tmp = cwasm.with_name(cwasm.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, cwasm)
    key = {
        "aot": aot_key(exceptions),
        "wasm_sha256": hashlib.sha256(wasm.read_bytes()).hexdigest(),
        "wasm_size": wasm.stat().st_size,
        "wasm_mtime_ns": wasm.stat().st_mtime_ns,
        "cwasm_sha256": hashlib.sha256(data).hexdigest(),
        "cwasm_size": cwasm.stat().st_size,
        "cwasm_mtime_ns": cwasm.stat().st_mtime_ns,
    }
    key_file = cwasm.with_name(cwasm.name + ".json")
    key_file.write_text(json.dumps(key, indent=2) + "\n")
    return cwasm
