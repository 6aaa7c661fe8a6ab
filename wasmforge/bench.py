"""`invoke bench`: what a package costs to build and to run, natively and in wasm, measured here.

Build times come from builds into a scratch store and ccache (so "cold" is really cold; sources
come from the source cache), start-up and run times from the native reference build and the wasm
build, each the median of several runs. The table is printed and appended to docs/benchmarks.md
with the machine, the date, the command and the wasmtime version.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from .config import Config
from .errors import ToolchainError, WasmforgeError
from .outputs import plain_relative, run_defaults
from .pipeline import build_target, read_manifest
from .recipe import Package, RecipeBook, Target
from .run import build_launcher, launcher_options
from .runtime import Runner, wasmtime_version
from .runtimes import CommandRunner
from .smoke import Unsupported
from .sources import fetch_sources
from .toolchain import Toolchain, host_toolchain, npm_project

Log = Callable[[str], None]
BENCH_HEADER = """# Benchmarks

Appended by `invoke bench <package>`: each section is one run on the machine it names. Times are
medians of the stated number of runs; "in-process" means the module is already loaded in the
host (a new store, instantiation and the run are timed); "fresh process" includes starting the
host process. Build times use a scratch artifact store and ccache; sources come from the cache.
"""


@dataclass(frozen=True)
class Workload:
    """A longer program the recipe names (`bench.workloads`): run natively, in wasm and in the peer."""

    name: str
    run: tuple[str, ...]  # the program, then its arguments; the script's file name stands for the script
    source: str | None = None  # a path inside the source tarball
    file: str | None = None  # a path relative to the checkout

    @property
    def script(self) -> str:
        return (self.source or self.file or "").rsplit("/", 1)[-1]

    def argv(self, script_path: str) -> list[str]:
        return [script_path if a == self.script else a for a in self.run]


@dataclass(frozen=True)
class Peer:
    """Another project's build of the interpreter, installed from its npm lock and started by `run`."""

    name: str
    directory: Path
    run: tuple[str, ...]


def workloads_of(package) -> list[Workload]:
    return [Workload(w["name"], tuple(str(a) for a in w["run"]), w.get("source"), w.get("file"))
            for w in package.recipe.bench.get("workloads", [])]


@dataclass(frozen=True)
class Row:
    what: str
    native: float | None
    wasm: float | None
    unit: str  # "s", "ms", "bytes"
    # The peer's measure, or why it has none (e.g. "fails: exit code 1").
    peer: float | str | None = None
    # The same measure in other runtimes (`invoke bench --runtimes`), by runtime name, or why there is none.
    others: tuple[tuple[str, float | str], ...] = ()

    def cells(self, with_peer: bool = False, runtimes: tuple[str, ...] = ()) -> tuple[str, ...]:
        def fmt(v: float | str | None) -> str:
            if v is None:
                return "-"
            if isinstance(v, str):
                return v
            if self.unit == "bytes":
                return f"{v / 1024:,.0f} KiB"
            return f"{v * 1000:.1f} ms" if self.unit == "ms" else f"{v:.2f} s"

        def ratio(v: float | str | None) -> str:
            return f"{v / self.native:.2f}x" if self.native and isinstance(v, int | float) else ""
        cells = (self.what, fmt(self.native), fmt(self.wasm), ratio(self.wasm))
        cells += (fmt(self.peer), ratio(self.peer)) if with_peer else ()
        others = dict(self.others)
        for name in runtimes:
            cells += (fmt(others.get(name)), ratio(others.get(name)))
        return cells


def median_time(fn: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _invoke() -> str:
    return str(Path(sys.executable).with_name("invoke"))


def measure_builds(book: RecipeBook, target: Target, config: Config, toolchain: Toolchain, scratch: Path,
                   log: Log) -> tuple[list[Row], Path]:
    """Cold build, no-change rebuild (as users type it) and a rebuild after touching one patch."""
    rows = []
    cfg = dataclasses.replace(config, output_dir=scratch / "build-output", store_dir=scratch / "store")
    quiet: Log = lambda m: None  # noqa: E731
    with _environ(CCACHE_DIR=str(scratch / "ccache")):
        log(f"bench: cold build of {target} (empty store and ccache) ...")
        start = time.perf_counter()
        results = build_target(book, target, cfg, toolchain, log=quiet)
        rows.append(Row("cold build (empty store and ccache, sources cached)", None, time.perf_counter() - start, "s"))
        output = results[-1].output

        env = {**os.environ, "WASMFORGE_OUTPUT": str(cfg.outputs), "WASMFORGE_STORE": str(cfg.artifacts)}
        log("bench: no-change rebuild (invoke build) ...")

        def again() -> None:
            subprocess.run([_invoke(), "build", str(target)], env=env, cwd=config.root, check=True,
                           capture_output=True)
        rows.append(Row(f"no-change rebuild: `invoke build {target}` (median of 3)", None, median_time(again, 3), "s"))

        package = book.package(target)
        if package.patch_series:
            project = scratch / "project"
            # What builds read from a checkout (smoke tests use files under examples/ too).
            for part in ("recipes", "patches", "toolchain", "examples"):
                if (config.root / part).is_dir():
                    shutil.copytree(config.root / part, project / part)
            series = sorted((project / "patches" / package.name / package.patch_series).glob("*.patch"))
            series[-1].write_text("(touched by invoke bench)\n" + series[-1].read_text())
            log(f"bench: rebuild after touching {series[-1].name}, ccache warm ...")
            touched_cfg = dataclasses.replace(cfg, root=project)
            start = time.perf_counter()
            touched = build_target(RecipeBook.load(touched_cfg.recipes_dir), target, touched_cfg, toolchain, log=quiet)
            seconds = time.perf_counter() - start
            ccache = (read_manifest(touched[-1].output) or {}).get("ccache") or {}
            hits = f", ccache {ccache.get('hits')}/{ccache.get('hits', 0) + ccache.get('misses', 0)} hits" if ccache else ""
            rows.append(Row(f"rebuild after touching one patch{hits}", None, seconds, "s"))
    return rows, output


def measure_sizes(output: Path, package: Package | None = None) -> list[Row]:
    manifest = read_manifest(output) or {}
    rows = []
    for rel, sizes in sorted(manifest.get("sizes", {}).items()):
        name = Path(rel).name
        rows.append(Row(f"`{name}` raw", None, sizes["raw"]["bytes"], "bytes"))
        if "optimized" in sizes:
            rows.append(Row(f"`{name}` after wasm-opt", None, sizes["optimized"]["bytes"], "bytes"))
            rows.append(Row(f"`{name}` after wasm-opt, gzip -9", None, sizes["optimized"]["gzip"], "bytes"))
            for part in ("code", "data", "custom"):
                if part in sizes["optimized"]:
                    rows.append(Row(f"`{name}` after wasm-opt: {part} section{'s' if part == 'custom' else ''}", None,
                                    sizes["optimized"][part], "bytes"))
        else:
            rows.append(Row(f"`{name}` gzip -9", None, sizes["raw"]["gzip"], "bytes"))
    for label, spec in (package.recipe.bench.get("sizes", {}) if package else {}).items():
        rel = str(package.recipe.render_value(spec, package.base_context(), ("bench", "sizes", label)))
        raw, packed = tree_sizes(output, rel)
        rows.append(Row(f"{label} (`{rel}`) raw", None, raw, "bytes"))
        rows.append(Row(f"{label} (`{rel}`) gzip -9", None, packed, "bytes"))
    return rows


def tree_sizes(output: Path, rel: str) -> tuple[int, int]:
    """(bytes, gzip -9 bytes) of a file or directory of the build in `output`: a directory's regular
    files summed, and compressed as one tar stream of them in name order (what a download of it costs)."""
    import gzip

    root = output.resolve()
    path = (output / rel).resolve() if plain_relative(rel) else None
    if path is None or not path.is_relative_to(root) or not path.exists():
        raise WasmforgeError(f"bench: {rel} is not a file or directory of the build in {output}",
                             hint="the recipe's bench.sizes names paths inside the build")
    counter = _CountingSink()
    with gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=9, mtime=0) as packed:  # type: ignore[arg-type]
        if path.is_file():
            files = [path]
            with path.open("rb") as handle:
                shutil.copyfileobj(handle, packed)
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
            with tarfile.open(fileobj=packed, mode="w|") as tar:
                for file in files:
                    info = tar.gettarinfo(str(file), arcname=str(file.relative_to(path.parent)))
                    info.uid = info.gid = info.mtime = 0
                    info.uname = info.gname = ""
                    with file.open("rb") as handle:
                        tar.addfile(info, handle)
    return sum(f.stat().st_size for f in files), counter.size


class _CountingSink:
    """A write-only file that only counts what is written to it."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _script(workload: Workload, package_sources, config: Config, dest: Path, log: Log) -> Path:
    target = dest / workload.script
    if workload.file:
        path = config.root / workload.file
        if not path.is_file():
            raise WasmforgeError(f"the workload {workload.name!r} names {workload.file}, which is not in the checkout")
        shutil.copyfile(path, target)
        return target
    fetched = fetch_sources(package_sources, config, log=log)
    with tarfile.open(fetched.path) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.split("/", 1)[-1] == workload.source:
                data = tar.extractfile(member)
                assert data is not None
                target.write_bytes(data.read())
                return target
    raise WasmforgeError(f"{workload.source} is not in {fetched.path.name}")


WORKLOAD_TIMEOUT = 1800  # seconds one run of a workload may take


def _timed_process(argv: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[bytes] | None]:
    """Wall time of one fresh process and its result (None when it ran out of time)."""
    start = time.perf_counter()
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=WORKLOAD_TIMEOUT)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, None
    return time.perf_counter() - start, result


def _run_timed(argv: list[str], cwd: Path, what: str) -> float:
    """Wall time of one fresh process; a failure stops the benchmark with its output."""
    seconds, result = _timed_process(argv, cwd)
    if result is None:
        raise WasmforgeError(f"{what} took more than {WORKLOAD_TIMEOUT // 60} minutes: {' '.join(argv)}")
    if result.returncode != 0:
        raise WasmforgeError(f"{what} failed (exit code {result.returncode}): {' '.join(argv)}",
                             details=(result.stderr or result.stdout).decode(errors="replace")[-2000:])
    return seconds


def _peer_timed(argv: list[str], cwd: Path) -> float | str:
    """The peer's wall time, or what went wrong: a peer that fails a workload is reported, not fatal."""
    seconds, result = _timed_process(argv, cwd)
    if result is None:
        return f"fails (over {WORKLOAD_TIMEOUT // 60} min)"
    if result.returncode != 0:
        return _fails(f"exit code {result.returncode}", result.stderr or result.stdout)
    return seconds


def _fails(how: str, output: bytes) -> str:
    """A cell for a run that failed: how, and the last line it printed."""
    last = output.decode(errors="replace").strip().splitlines()
    return f"fails ({how}" + (f": {last[-1][:80]}" if last else "") + ")"


def _runtime_timed(runner: CommandRunner, wasm: Path, argv: list[str], readonly_dirs: list[tuple[str, Path]],
                   env: dict[str, str]) -> float | str:
    """One fresh process of another runtime (the time of its process alone, without the copies some
    runtimes need for read-only directories), or why it gave none: not supported, failed, too slow."""
    try:
        result = runner.run(wasm, argv, readonly_dirs=readonly_dirs, env=env, timeout=WORKLOAD_TIMEOUT)
    except Unsupported as exc:
        return f"n/a ({exc})"
    if result.timed_out:
        return f"over {WORKLOAD_TIMEOUT // 60} min"
    if result.exit_code != 0:
        return _fails(result.describe(), result.stderr or result.stdout)
    return result.duration


def alternating_medians(commands: dict[str, Callable[[], float | str]], rounds: int) -> dict[str, float | str]:
    """Run the commands in turn, round after round (so a slower spell of the machine touches all
    alike), and take each one's median; a command that once reports a failure keeps that report."""
    samples: dict[str, list[float]] = {name: [] for name in commands}
    failed: dict[str, str] = {}
    for _ in range(rounds):
        for name, command in commands.items():
            if name in failed:
                continue
            value = command()
            if isinstance(value, str):
                failed[name] = value
            else:
                samples[name].append(value)
    return {name: failed.get(name) or statistics.median(samples[name]) for name in commands}


def peer_command(peer: Peer, args: list[str]) -> list[str]:
    program = shutil.which(peer.run[0]) or peer.run[0]
    return [program, *(str(peer.directory / a) if (peer.directory / a).is_file() else a for a in peer.run[1:]), *args]


def measure_runs(book: RecipeBook, target: Target, config: Config, wasm_output: Path, scratch: Path, runs: int,
                 log: Log, peer: Peer | None = None, others: Mapping[str, CommandRunner] | None = None) -> list[Row]:
    package = book.package(target)
    startup = [str(a) for a in package.recipe.bench.get("startup", [])]
    if not startup:
        raise WasmforgeError(f"the recipe of {target.name} names no start-up measure",
                             where=package.recipe.where(()), hint="add bench.startup: [PROGRAM, ARGS...]")
    program, startup_args = startup[0], startup[1:]
    native_target = dataclasses.replace(target, flavor=None, native=True)
    log(f"bench: native reference build {native_target} (from the store if it is there) ...")
    native_out = build_target(book, native_target, config, host_toolchain(), log=lambda m: None)[-1].output
    native = native_out / "bin" / program
    wasm = wasm_output / "bin" / f"{program}.wasm"
    argv = [program, *startup_args]
    # The program starts as `invoke run` starts it: with the recipe's default directories and
    # environment (python's standard library, PHP's ICU data), as the build's manifest records them.
    usual_dirs, usual_env, _ = run_defaults(wasm_output, read_manifest(wasm_output) or {}, program)
    usual = launcher_options(usual_dirs, usual_env)
    rows = []

    log(f"bench: start-up, {runs} runs each ...")
    native_start = median_time(lambda: subprocess.run([str(native), *startup_args], capture_output=True), runs)
    runner = Runner()
    first = runner.run(wasm, argv, readonly_dirs=usual_dirs, env=usual_env)
    if not first.precompiled:
        raise WasmforgeError(f"the precompiled module next to {wasm} was not used",
                             hint="rebuild with --force to precompile it for this wasmtime")
    in_process = median_time(lambda: runner.run(wasm, argv, readonly_dirs=usual_dirs, env=usual_env), runs)
    jit_runs = max(1, min(3, runs))
    on_the_fly = median_time(lambda: Runner(use_precompiled=False).run(wasm, argv, readonly_dirs=usual_dirs,
                                                                       env=usual_env), jit_runs)
    quote = " ".join(startup_args)
    rows.append(Row(f"start-up `{program} {quote}`, in-process: module loaded, new store + instantiate + run",
                    native_start, in_process, "ms"))
    rows.append(Row(f"start-up, in-process, compiled on the fly (compile + instantiate + run, median of {jit_runs})",
                    native_start, on_the_fly, "ms"))
    env = {**os.environ, "WASMFORGE_OUTPUT": str(wasm_output.parent.parent)}
    cli = median_time(lambda: subprocess.run([_invoke(), "run", str(target), "--", *startup_args],
                                             env=env, cwd=config.root, capture_output=True), runs)
    rows.append(Row("start-up, fresh process: `invoke run` (precompiled)", native_start, cli, "ms"))
    direct = median_time(lambda: subprocess.run([sys.executable, "-m", "wasmforge.run", *usual, str(wasm), "--",
                                                 *startup_args],
                                                cwd=config.root, capture_output=True), runs)
    rows.append(Row("start-up, fresh process: `python -m wasmforge.run MODULE` (precompiled)", native_start, direct, "ms"))
    launcher = build_launcher(config.cache_dir)
    fast = median_time(lambda: subprocess.run([str(launcher), *usual, str(wasm), *startup_args], capture_output=True),
                       runs)
    peer_start = None
    if peer:
        peer_start = alternating_medians({"peer": lambda: _peer_timed(peer_command(peer, startup_args), scratch)},
                                         min(runs, 5))["peer"]
    other_start = alternating_medians(
        {name: partial(_runtime_timed, runner, wasm, argv, usual_dirs, usual_env) for name, runner in (others or {}).items()},
        min(runs, 5)) if others else {}
    rows.append(Row("start-up, fresh process: `wasmforge-run MODULE` (`invoke launcher`; precompiled, no Python)"
                    + ("; the peer: `node` + its module, fresh process" if peer else "")
                    + ("; other runtimes: their command line, fresh process" if others else ""),
                    native_start, fast, "ms", peer_start, tuple(other_start.items())))

    scripts = scratch / "scripts"
    scripts.mkdir(exist_ok=True)
    slow_runs = min(runs, 3)
    for workload in workloads_of(package):
        script = _script(workload, package.sources, config, scripts, log)
        log(f"bench: {workload.name}, {slow_runs} alternating runs each ...")
        native_argv = [str(native), *workload.argv(str(script))[1:]]
        wasm_argv = [str(launcher), *usual, "--dir", f"/bench:{scripts}", str(wasm),
                     *workload.argv(f"/bench/{script.name}")[1:]]
        commands: dict[str, Callable[[], float | str]] = {
            "native": partial(_run_timed, native_argv, scripts, f"{workload.name} natively"),
            "wasm": partial(_run_timed, wasm_argv, scripts, f"{workload.name} in wasm"),
        }
        if peer:
            commands["peer"] = partial(_peer_timed, peer_command(peer, workload.argv(str(script))[1:]), scripts)
        for name, runner in (others or {}).items():
            commands[name] = partial(_runtime_timed, runner, wasm, workload.argv(f"/bench/{script.name}"),
                                     [*usual_dirs, ("/bench", scripts)], usual_env)
        times = alternating_medians(commands, slow_runs)
        rows.append(Row(f"run time of {workload.name} (fresh process each, precompiled, median of {slow_runs} alternating runs)",
                        float(times["native"]), float(times["wasm"]), "s", times.get("peer"),
                        tuple((name, times[name]) for name in others or {})))
    return rows


def find_peer(package, config: Config, log: Log) -> Peer | None:
    """The recipe's peer for this version, installed from its npm lock; None (with one line saying why)
    when there is none or it cannot be had here."""
    spec = package.recipe.bench.get("peer")
    if not spec or package.version not in spec["versions"]:
        log(f"bench: no peer for {package.name}-{package.version} (the recipe names none for this version); "
            "the peer column is left out")
        return None
    try:
        directory = npm_project(config, config.root / spec["npm"], log=log)
    except ToolchainError as exc:
        log(f"bench: the peer ({spec['name']}) cannot be run here: {exc.what}; the peer column is left out")
        return None
    return Peer(spec["name"], directory, tuple(str(a) for a in spec["run"]))


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{platform.system()} {platform.release()} {platform.machine()}, {cpu}, {os.cpu_count()} cores{memory}"


def _node_version() -> str:
    try:
        return subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def render(target: Target, rows: list[Row], command: str, toolchain: Toolchain, peer: Peer | None = None,
           runtimes: Mapping[str, str] | None = None) -> str:
    """The table; `runtimes`: the other runtimes measured (name: version), a column pair each."""
    names = tuple(runtimes or {})
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    wasm_opt = toolchain.wasm_opt.version if toolchain.wasm_opt else "none"
    lines = [
        f"## {target} — {now}",
        "",
        f"- command: `{command}`",
        f"- machine: {machine_description()}",
        f"- wasmtime {wasmtime_version()} (Python package), {toolchain.clang_version}, {wasm_opt}",
    ]
    if peer:
        lines.append(f"- peer: {peer.name}, run by `{' '.join(peer.run)}` under Node.js {_node_version()}")
    if runtimes:
        lines.append("- other runtimes: " + ", ".join(f"{n} {v}" for n, v in runtimes.items())
                     + " (`invoke runtimes`; workloads and start-up through each one's command line)")
    header = ("| measure | native | wasm | wasm / native |" + (" peer | peer / native |" if peer else "")
              + "".join(f" {n} | {n} / native |" for n in names))
    lines += ["", header, "|---|---:|---:|---:|" + ("---:|---:|" if peer else "") + "---:|---:|" * len(names)]
    lines += ["| " + " | ".join(row.cells(with_peer=peer is not None, runtimes=names)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run_bench(book: RecipeBook, target: Target, config: Config, toolchain: Toolchain, *, runs: int, builds: bool,
              log: Log, peer: Peer | None = None, others: Mapping[str, CommandRunner] | None = None) -> list[Row]:
    package = book.package(target)
    if not package.recipe.bench.get("startup"):
        raise WasmforgeError(f"the recipe of {target.name} says nothing to benchmark", where=package.recipe.where(()),
                             hint="add a bench section: startup: [PROGRAM, ARGS...] and workloads")
    scratch = Path(tempfile.mkdtemp(prefix="wasmforge-bench-"))
    try:
        rows: list[Row] = []
        if builds:
            build_rows, output = measure_builds(book, target, config, toolchain, scratch, log)
            rows += build_rows
        else:
            output = build_target(book, target, config, toolchain, log=lambda m: None)[-1].output
        rows += measure_sizes(output, book.package(target))
        rows += measure_runs(book, target, config, output, scratch, runs, log, peer, others)
        return rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
