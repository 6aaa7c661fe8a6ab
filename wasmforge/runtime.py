"""Run a WASI command module in wasmtime: argv, env, preopened dirs, stdio, timeout, memory limit.

The environment is empty unless variables are given, and only the directories named are visible:
the module sees exactly what the caller grants. Exception handling is enabled when the module
uses it (it has a tag section).

A precompiled module (`<name>.cwasm`, made by optimize.py) is native machine code that wasmtime maps
and runs without checks of its own, so it is used only when it is exactly what we wrote: its sha256
matches its key file (`<name>.cwasm.json`), the key names the sha256 of the `.wasm` beside it and this
wasmtime, engine and CPU, and wasmtime loads the very file that was checked (its open descriptor).
Digests are remembered per file state (verified.py), so an unchanged module is not hashed again.
Otherwise the `.wasm` is compiled on the fly.

A timeout stops a run whose output is captured through wasmtime's epoch interruption (that run's
module is compiled for it); a run on our own standard streams ends the process at its timeout, so
it keeps the faster uninterruptible code (see engine_settings).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import sys
import threading
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import NamedTuple

import wasmtime

from .errors import RunError
from .stdio import reserve_std_fds
from .verified import fd_sha256

__all__ = ["ProcExit", "RunResult", "Runner", "call_start", "load_precompiled", "reserve_std_fds", "uses_exceptions", "wasi_linker"]

TAG_SECTION = 13


class RunResult(NamedTuple):
    # A named tuple, like the Runner a plain class: dataclasses imports inspect, a cost at every start.
    exit_code: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    trap: str | None = None
    duration: float = 0.0
    precompiled: bool = False

    @property
    def status(self) -> int:
        """The status a shell would see: the exit code, or 134 for a trap (as wasmtime's CLI)."""
        return self.exit_code if self.exit_code is not None else 134

    def describe(self) -> str:
        if self.timed_out:
            return f"killed by the timeout after {self.duration:.1f} s"
        if self.trap:
            return f"trapped: {self.trap.strip().splitlines()[-1]}"
        return f"exit code {self.exit_code}"


class ProcExit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@cache
def wasmtime_version() -> str:
    """The version of the wasmtime package that is imported: it keys precompiled code, so it is exact.

    Read from the METADATA of the package's dist-info beside it (the file importlib.metadata reads), as
    importing importlib.metadata costs every start of a module tens of milliseconds; importlib.metadata
    answers when that is not one clear dist-info."""
    found = installed_version(Path(wasmtime.__file__).parent.parent, "wasmtime")
    if found is None:
        from importlib.metadata import version

        found = version("wasmtime")
    return found


def installed_version(site: Path, name: str) -> str | None:
    """The Version of the one `<name>-*.dist-info` in `site` whose METADATA names `name`; None when there
    is no such dist-info, more than one, or its METADATA does not say."""
    prefix = name.lower() + "-"
    versions = []
    try:
        candidates = [e for e in os.listdir(site) if e.lower().startswith(prefix) and e.endswith(".dist-info")]
        for entry in candidates:
            headers: dict[str, str] = {}
            with open(site / entry / "METADATA", encoding="utf-8") as metadata:
                for line in metadata:
                    if not line.strip():
                        break  # the headers end at the first empty line (the description follows)
                    key, sep, value = line.partition(":")
                    if sep and not line[0].isspace():
                        headers.setdefault(key.strip().lower(), value.strip())
            if re.sub(r"[-_.]+", "-", headers.get("name", "")).lower() == name.lower():
                versions.append(headers.get("version"))
    except (OSError, UnicodeDecodeError):
        return None
    return versions[0] if len(versions) == 1 and versions[0] else None


@cache
def cpu_fingerprint() -> str:
    """Precompiled code may use CPU features: key it by the host's feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{flags}".encode()).hexdigest()[:16]


# How deep compiled wasm may recurse on the host's stack before wasmtime traps ("call stack
# exhausted"). wasmtime's default, 512 KiB, is less than interpreters assume: CPython sizes its C
# recursion limit for WASI (5000) on 8 MiB and trapped in 14 of its test modules (deep ASTs, json,
# copy, repr of nested lists) before it could raise RecursionError. 4 MiB passes them all and still
# fits the 8 MiB stack a Linux main thread and a default thread get, with room for the host's frames.
WASM_STACK_BYTES = 4 << 20


def engine_settings(exceptions: bool, interruptible: bool = False) -> dict[str, object]:
    # Epoch interruption lets a run be stopped in this process at its timeout, but its check on every
    # loop back-edge cost 35% of Zend/bench.php with PHP's SWITCH VM (docs/benchmarks.md). So only
    # runs that need it use it: a timeout on a run whose output we capture. A run that shares our
    # standard streams owns the process and ends it at the timeout instead (as the launcher does).
    return {"wasm_exceptions": exceptions, "epoch_interruption": interruptible}


def aot_key(exceptions: bool) -> dict[str, object]:
    """Precompiled code is for the uninterruptible engine (wasmtime refuses code compiled with other
    settings): the one every run without a timeout, and every command-line run, uses."""
    return {"wasmtime": wasmtime_version(), "engine": engine_settings(exceptions),
            "arch": platform.machine(), "cpu": cpu_fingerprint()}


def aot_value_text(exceptions: bool) -> str:
    """How the `"aot"` value appears in a key file that precompile writes (json, indent 2, first key):
    wasmforge-run compares this text, so it must follow precompile's format."""
    text = json.dumps({"aot": aot_key(exceptions)}, indent=2)
    return text[text.index('"aot": ') + len('"aot": '):text.rindex("\n}")]


@cache
def make_engine(exceptions: bool, interruptible: bool = False) -> wasmtime.Engine:
    config = wasmtime.Config()
    # wasmtime refuses a wasm stack larger than the stack it would give async calls (2 MiB by
    # default; we make none), and the Python package has no property for that one: the C API call.
    from wasmtime import _bindings

    _bindings.wasmtime_config_async_stack_size_set(config.ptr(), WASM_STACK_BYTES + (1 << 20))
    for name, value in engine_settings(exceptions, interruptible).items():
        setattr(config, name, value)
    # Not a setting of the precompiled code's key: wasmtime applies the stack limit when it runs,
    # and code compiled without it loads with it.
    config.max_wasm_stack = WASM_STACK_BYTES
    return wasmtime.Engine(config)


def uses_exceptions(wasm: Path) -> bool:
    """True when the module defines exception tags (setjmp/longjmp via exception handling)."""
    try:
        with wasm.open("rb") as f:
            if f.read(8)[:4] != b"\0asm":
                raise RunError(f"{wasm} is not a WebAssembly module")
            while header := f.read(1):
                section = header[0]
                size = _read_leb(f)
                if section == TAG_SECTION:
                    return True
                f.seek(size, 1)
    except (IndexError, ValueError):
        raise RunError(f"{wasm} is truncated or damaged (its sections do not parse)",
                       hint="rebuild it: invoke build <package>-<version> --force") from None
    except OSError as exc:
        raise RunError(f"cannot read {wasm}: {exc.strerror}") from None
    return False


def _read_leb(f) -> int:  # type: ignore[no-untyped-def]
    result = shift = 0
    while True:
        byte = f.read(1)[0]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result
        shift += 7
        if shift > 35:
            raise ValueError("LEB128 too long")


def precompiled_path(wasm: Path) -> Path:
    return wasm.with_suffix(".cwasm")


def load_precompiled(wasm: Path, engine: wasmtime.Engine, exceptions: bool) -> wasmtime.Module | None:
    """The precompiled form of `wasm`, or None unless it is exactly the one we wrote for it and this engine.

    Both files are checked through descriptors we keep open, and wasmtime is handed that very open
    file (/proc/self/fd/N), so a file renamed into place after the check is never the one loaded.
    """
    cwasm = precompiled_path(wasm)
    key_file = cwasm.with_name(cwasm.name + ".json")
    try:
        key = json.loads(key_file.read_text())
        if not isinstance(key, dict) or key.get("aot") != aot_key(exceptions):
            return None
        with open(wasm, "rb") as module_file:
            if fd_sha256(module_file.fileno()) != key.get("wasm_sha256"):
                return None  # the key (and its code) belongs to another module
        with open(cwasm, "rb") as code_file:
            if fd_sha256(code_file.fileno()) != key.get("cwasm_sha256"):
                return None  # edited, truncated or replaced native code: never run it
            own = f"/proc/self/fd/{code_file.fileno()}"
            if os.path.exists(own):
                return wasmtime.Module.deserialize_file(engine, own)
            code = code_file.read()
            if _sha256(code) != key.get("cwasm_sha256"):
                return None
            return wasmtime.Module.deserialize(engine, code)
    except (OSError, ValueError, wasmtime.WasmtimeError):
        return None


def wasi_linker(engine: wasmtime.Engine) -> wasmtime.Linker:
    """WASI preview 1 for a module of `engine`, with a proc_exit that keeps every exit status."""
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    # wasmtime rejects proc_exit statuses >= 126 with an error that loses the code (PHP exits 255 on
    # fatal errors); our own proc_exit keeps every status, raised as ProcExit out of the module's
    # call. Like a POSIX parent, we see its low 8 bits: exit(-1) is 255.
    linker.allow_shadowing = True

    def proc_exit(code: int) -> None:
        raise ProcExit(code & 0xFF)

    linker.define_func("wasi_snapshot_preview1", "proc_exit",
                       wasmtime.FuncType([wasmtime.ValType.i32()], []), proc_exit)
    return linker


def call_start(start: wasmtime.Func, store: wasmtime.Store) -> tuple[int | None, str | None]:
    """Run a command's `_start`: (its exit status, None), or (None, wasmtime's text) when it traps."""
    try:
        start(store)
    except ProcExit as exc:
        return exc.code, None
    except wasmtime.ExitTrap as exc:
        return exc.code, None
    except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
        return None, str(exc)
    return 0, None


class Runner:
    """Loads modules once per process (compiled or precompiled) and runs them."""

    def __init__(self, use_precompiled: bool = True) -> None:
        self.use_precompiled = use_precompiled
        self._modules: dict[tuple[Path, bool], tuple[wasmtime.Module, bool, bool]] = {}

    def prepare(self, modules: Sequence[Path]) -> None:
        """Nothing to make ahead: a build precompiles its modules (runtimes.CommandRunner has work here)."""

    def load(self, wasm: Path, interruptible: bool = False) -> tuple[wasmtime.Module, bool, bool]:
        """(module, needs exceptions, came from a precompiled file). Precompiled code exists for the
        uninterruptible engine only: an interruptible run compiles the module (once per Runner)."""
        wasm = wasm.resolve()
        if (wasm, interruptible) in self._modules:
            return self._modules[wasm, interruptible]
        if not wasm.is_file():
            raise RunError(f"no module at {wasm}", hint="build it first: invoke build <package>-<version>")
        exceptions = uses_exceptions(wasm)
        engine = make_engine(exceptions, interruptible)
        use_precompiled = self.use_precompiled and not interruptible
        module = load_precompiled(wasm, engine, exceptions) if use_precompiled else None
        precompiled = module is not None
        if module is None:
            try:
                module = wasmtime.Module.from_file(engine, str(wasm))
            except wasmtime.WasmtimeError as exc:
                raise RunError(f"wasmtime cannot compile {wasm}", details=str(exc)) from None
        self._modules[wasm, interruptible] = (module, exceptions, precompiled)
        return self._modules[wasm, interruptible]

    def run(self, wasm: Path, argv: list[str], *, env: dict[str, str] | None = None,
            dirs: list[tuple[str, Path]] | None = None, stdin: bytes | None = None,
            timeout: float | None = None, memory_limit: int | None = None,
            capture: bool = True, readonly_dirs: list[tuple[str, Path]] | None = None) -> RunResult:
        reserve_std_fds()
        # Captured output belongs to our caller, who lives on: such a run is stopped inside the
        # process. A run on our own standard streams owns the process and ends it at the timeout.
        interruptible = bool(timeout) and capture
        module, exceptions, precompiled = self.load(wasm, interruptible)
        engine = make_engine(exceptions, interruptible)
        store = wasmtime.Store(engine)
        if memory_limit:
            store.set_limits(memory_size=memory_limit)
        with _io_dir(capture or stdin is not None) as tmp:
            wasi = wasmtime.WasiConfig()
            wasi.argv = argv
            wasi.env = list((env or {}).items())
            preopens = [(g, h, True) for g, h in dirs or []] + [(g, h, False) for g, h in readonly_dirs or []]
            for guest, host, writable in preopens:
                if not Path(host).is_dir():
                    raise RunError(f"cannot preopen {host} as {guest}: not a directory")
                wasi.preopen_dir(str(host), guest, fs_mutable=writable)
            out, err = (Path(tmp, "stdout"), Path(tmp, "stderr")) if tmp and capture else (None, None)
            if tmp and stdin is not None:
                Path(tmp, "stdin").write_bytes(stdin)
                wasi.stdin_file = str(Path(tmp, "stdin"))
            elif not capture:
                wasi.inherit_stdin()
            if out and err:
                wasi.stdout_file = str(out)
                wasi.stderr_file = str(err)
            else:
                wasi.inherit_stdout()
                wasi.inherit_stderr()
            store.set_wasi(wasi)

            linker = wasi_linker(engine)

            fired = threading.Event()
            timer = None
            if timeout:
                if interruptible:
                    store.set_epoch_deadline(1)

                    def on_timeout() -> None:
                        # With captured I/O the module's input is a file, which cannot block it in a
                        # host call past the epoch check.
                        fired.set()
                        engine.increment_epoch()
                else:

                    def on_timeout() -> None:
                        # As a shell's timeout would: running or blocked in a host call (an idle stdin).
                        sys.stdout.flush()
                        os.write(2, f"{Path(argv[0]).name}: killed by the timeout after {timeout:g} s\n".encode())
                        os._exit(134)

                timer = threading.Timer(timeout, on_timeout)
                timer.daemon = True
            start = time.perf_counter()
            try:
                instance = linker.instantiate(store, module)
            except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
                text = str(exc).strip()
                limited = memory_limit and ("memory" in text.lower() or "limit" in text.lower())
                raise RunError(f"wasmtime cannot instantiate {wasm}", details=text[:2000],
                               hint=f"the module needs more memory than the limit of {memory_limit / 1048576:g} MiB"
                               if limited else "does it import something other than WASI preview 1?") from None
            start_func = instance.exports(store).get("_start")
            if not isinstance(start_func, wasmtime.Func):
                raise RunError(f"{wasm} has no _start function: it is not a WASI command module")
            try:
                if timer:
                    timer.start()
                exit_code, trap = call_start(start_func, store)
            finally:
                if timer:
                    timer.cancel()
            duration = time.perf_counter() - start
            return RunResult(
                exit_code=exit_code,
                stdout=out.read_bytes() if out and out.exists() else b"",
                stderr=err.read_bytes() if err and err.exists() else b"",
                timed_out=fired.is_set() and exit_code is None,
                trap=trap,
                duration=duration,
                precompiled=precompiled,
            )


def _io_dir(needed: bool) -> contextlib.AbstractContextManager[str | None]:
    """A temporary directory for captured output and given input; None for a program that shares our
    standard streams (which then does not import tempfile, nor shutil under it, at every start)."""
    if not needed:
        return contextlib.nullcontext()
    import tempfile

    return tempfile.TemporaryDirectory(prefix="wasmforge-run-")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
