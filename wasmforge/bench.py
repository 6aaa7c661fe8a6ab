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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .config import Config
from .errors import WasmforgeError
from .pipeline import build_target, read_manifest
from .recipe import RecipeBook, Target
from .run import build_launcher
from .runtime import Runner, wasmtime_version
from .sources import fetch_sources
from .toolchain import Toolchain, host_toolchain

Log = Callable[[str], None]
BENCH_HEADER = """# Benchmarks

Appended by `invoke bench <package>`: each section is one run on the machine it names. Times are
medians of the stated number of runs; "in-process" means the module is already loaded in the
host (a new store, instantiation and the run are timed); "fresh process" includes starting the
host process. Build times use a scratch artifact store and ccache; sources come from the cache.
"""


@dataclass(frozen=True)
class Workload:
    """What to run: start-up arguments, and a longer program (from the source tree or the checkout)."""

    program: str
    startup: tuple[str, ...]
    script_in_source: str | None = None  # a path inside the source tarball
    script_in_checkout: str | None = None  # a path relative to the checkout
    script_args: tuple[str, ...] = ()


WORKLOADS = {
    "php": Workload("php", ("-n", "-r", "echo 1;"), script_in_source="Zend/bench.php", script_args=("-n",)),
    "lua": Workload("lua", ("-e", "io.write(1)"), script_in_checkout="examples/lua/bench.lua"),
}


@dataclass(frozen=True)
class Row:
    what: str
    native: float | None
    wasm: float | None
    unit: str  # "s", "ms", "bytes"

    def cells(self) -> tuple[str, str, str, str]:
        def fmt(v: float | None) -> str:
            if v is None:
                return "-"
            if self.unit == "bytes":
                return f"{v / 1024:,.0f} KiB"
            return f"{v * 1000:.1f} ms" if self.unit == "ms" else f"{v:.2f} s"
        ratio = f"{self.wasm / self.native:.2f}x" if self.native and self.wasm is not None else ""
        return (self.what, fmt(self.native), fmt(self.wasm), ratio)


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


def measure_sizes(output: Path) -> list[Row]:
    manifest = read_manifest(output) or {}
    rows = []
    for rel, sizes in sorted(manifest.get("sizes", {}).items()):
        name = Path(rel).name
        rows.append(Row(f"`{name}` raw", None, sizes["raw"]["bytes"], "bytes"))
        if "optimized" in sizes:
            rows.append(Row(f"`{name}` after wasm-opt", None, sizes["optimized"]["bytes"], "bytes"))
            rows.append(Row(f"`{name}` after wasm-opt, gzip -9", None, sizes["optimized"]["gzip"], "bytes"))
        else:
            rows.append(Row(f"`{name}` gzip -9", None, sizes["raw"]["gzip"], "bytes"))
    return rows


def _script(workload: Workload, package_sources, config: Config, dest: Path, log: Log) -> Path | None:
    if workload.script_in_checkout:
        path = config.root / workload.script_in_checkout
        shutil.copy(path, dest / path.name)
        return dest / path.name
    if workload.script_in_source:
        fetched = fetch_sources(package_sources, config, log=log)
        with tarfile.open(fetched.path) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.split("/", 1)[-1] == workload.script_in_source:
                    data = tar.extractfile(member)
                    assert data is not None
                    target = dest / Path(workload.script_in_source).name
                    target.write_bytes(data.read())
                    return target
        raise WasmforgeError(f"{workload.script_in_source} is not in {fetched.path.name}")
    return None


def measure_runs(book: RecipeBook, target: Target, config: Config, wasm_output: Path, scratch: Path, runs: int,
                 log: Log) -> list[Row]:
    workload = WORKLOADS[target.name]
    native_target = dataclasses.replace(target, flavor=None, native=True)
    log(f"bench: native reference build {native_target} (from the store if it is there) ...")
    native_out = build_target(book, native_target, config, host_toolchain(), log=lambda m: None)[-1].output
    native = native_out / "bin" / workload.program
    wasm = wasm_output / "bin" / f"{workload.program}.wasm"
    argv = [workload.program, *workload.startup]
    rows = []

    log(f"bench: start-up, {runs} runs each ...")
    native_start = median_time(lambda: subprocess.run([str(native), *workload.startup], capture_output=True), runs)
    runner = Runner()
    first = runner.run(wasm, argv)
    if not first.precompiled:
        raise WasmforgeError(f"the precompiled module next to {wasm} was not used",
                             hint="rebuild with --force to precompile it for this wasmtime")
    in_process = median_time(lambda: runner.run(wasm, argv), runs)
    jit_runs = max(1, min(3, runs))
    on_the_fly = median_time(lambda: Runner(use_precompiled=False).run(wasm, argv), jit_runs)
    quote = " ".join(workload.startup)
    rows.append(Row(f"start-up `{workload.program} {quote}`, in-process: module loaded, new store + instantiate + run",
                    native_start, in_process, "ms"))
    rows.append(Row(f"start-up, in-process, compiled on the fly (compile + instantiate + run, median of {jit_runs})",
                    native_start, on_the_fly, "ms"))
    env = {**os.environ, "WASMFORGE_OUTPUT": str(wasm_output.parent.parent)}
    cli = median_time(lambda: subprocess.run([_invoke(), "run", str(target), "--", *workload.startup],
                                             env=env, cwd=config.root, capture_output=True), runs)
    rows.append(Row("start-up, fresh process: `invoke run` (precompiled)", native_start, cli, "ms"))
    direct = median_time(lambda: subprocess.run([sys.executable, "-m", "wasmforge.run", str(wasm), "--", *workload.startup],
                                                cwd=config.root, capture_output=True), runs)
    rows.append(Row("start-up, fresh process: `python -m wasmforge.run MODULE` (precompiled)", native_start, direct, "ms"))
    launcher = build_launcher(config.cache_dir)
    fast = median_time(lambda: subprocess.run([str(launcher), str(wasm), *workload.startup], capture_output=True), runs)
    rows.append(Row("start-up, fresh process: `wasmforge-run MODULE` (`invoke launcher`; precompiled, no Python)",
                    native_start, fast, "ms"))

    scripts = scratch / "scripts"
    scripts.mkdir(exist_ok=True)
    script = _script(workload, book.package(target).sources, config, scripts, log)
    if script:
        log(f"bench: {script.name}, {min(runs, 3)} runs each ...")
        slow_runs = min(runs, 3)
        native_run = median_time(lambda: subprocess.run([str(native), *workload.script_args, str(script)],
                                                        capture_output=True, check=True), slow_runs)
        wasm_argv = [workload.program, *workload.script_args, f"/bench/{script.name}"]

        def wasm_run() -> None:
            result = runner.run(wasm, wasm_argv, dirs=[("/bench", scripts)], timeout=900)
            if result.exit_code != 0:
                raise WasmforgeError(f"{script.name} failed in wasm: {result.describe()}",
                                     details=result.stderr.decode(errors="replace")[-2000:])
        wasm_time = median_time(wasm_run, slow_runs)
        where = workload.script_in_source or workload.script_in_checkout
        rows.append(Row(f"run time of `{where}` (precompiled, median of {slow_runs})", native_run, wasm_time, "s"))
    return rows


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


def render(target: Target, rows: list[Row], command: str, toolchain: Toolchain) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    wasm_opt = toolchain.wasm_opt.version if toolchain.wasm_opt else "none"
    lines = [
        f"## {target} — {now}",
        "",
        f"- command: `{command}`",
        f"- machine: {machine_description()}",
        f"- wasmtime {wasmtime_version()} (Python package), {toolchain.clang_version}, {wasm_opt}",
        "",
        "| measure | native | wasm | wasm / native |",
        "|---|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run_bench(book: RecipeBook, target: Target, config: Config, toolchain: Toolchain, *, runs: int, builds: bool,
              log: Log) -> list[Row]:
    if target.name not in WORKLOADS:
        raise WasmforgeError(f"no benchmark workload for {target.name}",
                             hint=f"benchmarks exist for: {', '.join(sorted(WORKLOADS))}")
    scratch = Path(tempfile.mkdtemp(prefix="wasmforge-bench-"))
    try:
        rows: list[Row] = []
        if builds:
            build_rows, output = measure_builds(book, target, config, toolchain, scratch, log)
            rows += build_rows
        else:
            output = build_target(book, target, config, toolchain, log=lambda m: None)[-1].output
        rows += measure_sizes(output)
        rows += measure_runs(book, target, config, output, scratch, runs, log)
        return rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
