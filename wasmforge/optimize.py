"""Post-link steps on output modules: wasm-opt, import audit and AOT precompilation for wasmtime."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import wasmtime

from .errors import BuildError
from .runtime import aot_key, make_engine, precompiled_path, uses_exceptions
from .toolchain import WasmOpt
from .verified import file_sha256


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
    """Write `<name>.cwasm` (wasmtime's serialized native code) and its key file next to `wasm`.

    The key binds the code to its own sha256, to the sha256 of the `.wasm` it was compiled from and
    to the engine (see runtime.load_precompiled); every runner checks all three before using it.
    """
    exceptions = uses_exceptions(wasm)
    data = (module or compile_module(wasm)).serialize()
    cwasm = precompiled_path(wasm)
    key = {
        "aot": aot_key(exceptions),
        "wasm_sha256": file_sha256(wasm),
        "wasm_size": wasm.stat().st_size,
        "cwasm_sha256": hashlib.sha256(data).hexdigest(),
        "cwasm_size": len(data),
    }
    key_file = cwasm.with_name(cwasm.name + ".json")
    for path, content in ((cwasm, data), (key_file, (json.dumps(key, indent=2) + "\n").encode())):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)
    return cwasm


DEFAULT_WASM_OPT_FLAGS = ("-O2",)
# LLVM's names in a module's target_features section -> wasm-opt's switches.
_FEATURE_SWITCHES = {
    "bulk-memory": "bulk-memory", "bulk-memory-opt": "bulk-memory-opt",
    "call-indirect-overlong": "call-indirect-overlong", "exception-handling": "exception-handling",
    "extended-const": "extended-const", "multimemory": "multimemory", "multivalue": "multivalue",
    "mutable-globals": "mutable-globals", "nontrapping-fptoint": "nontrapping-float-to-int",
    "reference-types": "reference-types", "sign-ext": "sign-ext", "simd128": "simd", "tail-call": "tail-call",
    "memory64": "memory64", "relaxed-simd": "relaxed-simd",
}


def _leb(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def _sections(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(id, start, end) of each section of a module, in order."""
    pos = 8
    while pos < len(data):
        kind = data[pos]
        size, pos = _leb(data, pos + 1)
        yield kind, pos, pos + size
        pos += size


def custom_sections(data: bytes) -> dict[str, bytes]:
    """The module's custom sections by name (the last one wins)."""
    sections: dict[str, bytes] = {}
    for kind, pos, end in _sections(data):
        if kind == 0:
            length, start = _leb(data, pos)
            sections[data[start:start + length].decode(errors="replace")] = data[start + length:end]
    return sections


def target_features(data: bytes) -> list[str]:
    """The features the linker recorded as used (`+name`) in the target_features section."""
    section = custom_sections(data).get("target_features", b"")
    if not section:
        return []
    count, pos = _leb(section, 0)
    used = []
    for _ in range(count):
        prefix = chr(section[pos])
        length, pos = _leb(section, pos + 1)
        if prefix == "+":
            used.append(section[pos:pos + length].decode())
        pos += length
    return used


# The parts of a module whose sizes are worth seeing apart: what is left to shrink, and where.
SIZE_PARTS = {10: "code", 11: "data", 0: "custom"}


def module_sizes(wasm: Path) -> dict[str, int]:
    """The module's size, gzipped size, and the bytes of its code, data and custom (names, debug,
    producers, target features) sections."""
    data = wasm.read_bytes()
    parts = dict.fromkeys(SIZE_PARTS.values(), 0)
    for kind, start, end in _sections(data):
        if kind in SIZE_PARTS:
            parts[SIZE_PARTS[kind]] += end - start
    return {"bytes": len(data), "gzip": len(gzip.compress(data, compresslevel=9, mtime=0)), **parts}


def optimize_module(wasm: Path, tool: WasmOpt, flags: list[str] | tuple[str, ...], *, debug: bool, log_file: Path) -> None:
    """Run wasm-opt on `wasm` in place, with the features its target_features section lists."""
    features = [f"--enable-{_FEATURE_SWITCHES.get(f, f)}" for f in target_features(wasm.read_bytes())]
    keep = ["-g"] if debug else ["--strip-debug", "--strip-producers"]
    tmp = wasm.with_name(wasm.name + ".opt")
    command = [*tool.command, *flags, *features, *keep, str(wasm), "-o", str(tmp)]
    with log_file.open("w") as out:
        out.write("$ " + " ".join(command) + "\n\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if result.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        raise BuildError(f"wasm-opt failed on {wasm.name} (exit code {result.returncode})",
                         details=f"{tail}\nfull log: {log_file}",
                         hint="build with `wasm_opt: []` in the recipe's build section to skip it, and report the module")
    os.replace(tmp, wasm)


def module_interface(data: bytes) -> tuple[list[str], list[str]]:
    """The names a module imports (`module/name`) and exports, read from its import and export
    sections without compiling it (PHP takes seconds to compile)."""
    imported: list[str] = []
    exported: list[str] = []

    def name(pos: int) -> tuple[str, int]:
        length, start = _leb(data, pos)
        return data[start:start + length].decode(errors="replace"), start + length

    def limits(pos: int) -> int:
        flags = data[pos]
        _, pos = _leb(data, pos + 1)
        return _leb(data, pos)[1] if flags & 1 else pos

    for kind, pos, _ in _sections(data):
        if kind == 2:
            count, p = _leb(data, pos)
            for _ in range(count):
                module, p = name(p)
                field, p = name(p)
                imported.append(f"{module}/{field}")
                desc = data[p]
                p += 1
                if desc == 0:  # function: a type index
                    _, p = _leb(data, p)
                elif desc == 1:  # table: a reference type, then limits
                    p = limits(p + 1)
                elif desc == 2:  # memory: limits
                    p = limits(p)
                elif desc == 3:  # global: a value type and mutability
                    p += 2
                elif desc == 4:  # tag: an attribute and a type index
                    _, p = _leb(data, p + 1)
                else:
                    raise ValueError(f"unknown import kind {desc}")
        elif kind == 7:
            count, p = _leb(data, pos)
            for _ in range(count):
                field, p = name(p)
                _, p = _leb(data, p + 1)
                exported.append(field)
    return imported, exported
