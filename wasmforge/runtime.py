"""Run a WASI command module in wasmtime: argv, env, preopened dirs, stdio, timeout, memory limit.

The environment is empty unless variables are given, and only the directories named are visible:
the module sees exactly what the caller grants. Exception handling is enabled when the module
uses it (it has a tag section), and precompiled modules (`<name>.cwasm`, made by optimize.py) are
used when their key matches this wasmtime and engine configuration; otherwise the module is
compiled on the fly.
"""

from __future__ import annotations

import hashlib
import json
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import version as package_version
from pathlib import Path

import wasmtime

from .errors import RunError

TAG_SECTION = 13
NO_DEADLINE = 1 << 62


@dataclass(frozen=True)
class RunResult:
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


class _ProcExit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@cache
def wasmtime_version() -> str:
    return package_version("wasmtime")


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


def engine_settings(exceptions: bool) -> dict[str, object]:
    # Epoch interruption is always on so that every run can have a timeout; it is part of the
    # precompiled module's key because wasmtime refuses code compiled with other settings.
    return {"wasm_exceptions": exceptions, "epoch_interruption": True}


def aot_key(exceptions: bool) -> dict[str, object]:
    return {"wasmtime": wasmtime_version(), "engine": engine_settings(exceptions),
            "arch": platform.machine(), "cpu": cpu_fingerprint()}


@cache
def make_engine(exceptions: bool) -> wasmtime.Engine:
    config = wasmtime.Config()
    for name, value in engine_settings(exceptions).items():
        setattr(config, name, value)
    return wasmtime.Engine(config)


def uses_exceptions(wasm: Path) -> bool:
    """True when the module defines exception tags (setjmp/longjmp via exception handling)."""
    with wasm.open("rb") as f:
        if f.read(8)[:4] != b"\0asm":
            raise RunError(f"{wasm} is not a WebAssembly module")
        while header := f.read(1):
            section = header[0]
            size = _read_leb(f)
            if section == TAG_SECTION:
                return True
            f.seek(size, 1)
    return False


def _read_leb(f) -> int:  # type: ignore[no-untyped-def]
    result = shift = 0
    while True:
        byte = f.read(1)[0]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result
        shift += 7


def precompiled_path(wasm: Path) -> Path:
    return wasm.with_suffix(".cwasm")


@dataclass
class Runner:
    """Loads modules once per process (compiled or precompiled) and runs them."""

    use_precompiled: bool = True
    _modules: dict[Path, tuple[wasmtime.Module, bool, bool]] = field(default_factory=dict)

    def load(self, wasm: Path) -> tuple[wasmtime.Module, bool, bool]:
        """(module, needs exceptions, came from a precompiled file)."""
        wasm = wasm.resolve()
        if wasm in self._modules:
            return self._modules[wasm]
        if not wasm.is_file():
            raise RunError(f"no module at {wasm}", hint="build it first: invoke build <package>-<version>")
        exceptions = uses_exceptions(wasm)
        engine = make_engine(exceptions)
        module = self._load_precompiled(wasm, engine, exceptions) if self.use_precompiled else None
        precompiled = module is not None
        if module is None:
            try:
                module = wasmtime.Module.from_file(engine, str(wasm))
            except wasmtime.WasmtimeError as exc:
                raise RunError(f"wasmtime cannot compile {wasm}", details=str(exc)) from None
        self._modules[wasm] = (module, exceptions, precompiled)
        return self._modules[wasm]

    @staticmethod
    def _load_precompiled(wasm: Path, engine: wasmtime.Engine, exceptions: bool) -> wasmtime.Module | None:
        cwasm = precompiled_path(wasm)
        key_file = cwasm.with_name(cwasm.name + ".json")
        if not cwasm.is_file() or not key_file.is_file():
            return None
        try:
            key = json.loads(key_file.read_text())
        except (OSError, ValueError):
            return None
        # The key must match this wasmtime, engine and CPU, and the precompiled file must belong to
        # this very .wasm; wasmtime would refuse a mismatch anyway, but we never hand it one. Size
        # and modification time are checked at every start; the sha256 only when they moved.
        if key.get("aot") != aot_key(exceptions):
            return None
        for path, prefix in ((wasm, "wasm"), (cwasm, "cwasm")):
            st = path.stat()
            if st.st_size != key.get(f"{prefix}_size"):
                return None
            if st.st_mtime_ns != key.get(f"{prefix}_mtime_ns") and _sha256(path) != key.get(f"{prefix}_sha256"):
                return None
        try:
            return wasmtime.Module.deserialize_file(engine, str(cwasm))
        except wasmtime.WasmtimeError:
            return None

    def run(self, wasm: Path, argv: list[str], *, env: dict[str, str] | None = None,
            dirs: list[tuple[str, Path]] | None = None, stdin: bytes | None = None,
            timeout: float | None = None, memory_limit: int | None = None,
            capture: bool = True) -> RunResult:
        module, exceptions, precompiled = self.load(wasm)
        engine = make_engine(exceptions)
        store = wasmtime.Store(engine)
        if memory_limit:
            store.set_limits(memory_size=memory_limit)
        with tempfile.TemporaryDirectory(prefix="wasmforge-run-") as tmp:
            wasi = wasmtime.WasiConfig()
            wasi.argv = argv
            wasi.env = list((env or {}).items())
            for guest, host in dirs or []:
                if not Path(host).is_dir():
                    raise RunError(f"cannot preopen {host} as {guest}: not a directory")
                wasi.preopen_dir(str(host), guest)
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            if stdin is not None:
                Path(tmp, "stdin").write_bytes(stdin)
                wasi.stdin_file = str(Path(tmp, "stdin"))
            elif not capture:
                wasi.inherit_stdin()
            if capture:
                wasi.stdout_file = str(out)
                wasi.stderr_file = str(err)
            else:
                wasi.inherit_stdout()
                wasi.inherit_stderr()
            store.set_wasi(wasi)

            linker = wasmtime.Linker(engine)
            linker.define_wasi()
            # wasmtime rejects proc_exit statuses >= 126 with an error that loses the code (PHP
            # exits 255 on fatal errors); our own proc_exit keeps every status. Like a POSIX
            # parent, we see its low 8 bits: exit(-1) is 255.
            linker.allow_shadowing = True

            def proc_exit(code: int) -> None:
                raise _ProcExit(code & 0xFF)

            linker.define_func("wasi_snapshot_preview1", "proc_exit",
                               wasmtime.FuncType([wasmtime.ValType.i32()], []), proc_exit)

            fired = threading.Event()
            timer = None
            if timeout:
                store.set_epoch_deadline(1)

                def interrupt() -> None:
                    fired.set()
                    engine.increment_epoch()

                timer = threading.Timer(timeout, interrupt)
                timer.daemon = True
            else:
                store.set_epoch_deadline(NO_DEADLINE)
            start = time.perf_counter()
            exit_code: int | None = 0
            trap = None
            try:
                instance = linker.instantiate(store, module)
                if timer:
                    timer.start()
                instance.exports(store)["_start"](store)
            except _ProcExit as exc:
                exit_code = exc.code
            except wasmtime.ExitTrap as exc:
                exit_code = exc.code
            except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
                exit_code = None
                trap = str(exc)
            finally:
                if timer:
                    timer.cancel()
            duration = time.perf_counter() - start
            return RunResult(
                exit_code=exit_code,
                stdout=out.read_bytes() if capture and out.exists() else b"",
                stderr=err.read_bytes() if capture and err.exists() else b"",
                timed_out=fired.is_set() and exit_code is None,
                trap=trap,
                duration=duration,
                precompiled=precompiled,
            )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
