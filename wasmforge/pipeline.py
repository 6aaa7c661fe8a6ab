"""Build a target and its dependencies: sources -> patched tree -> build -> outputs -> AOT -> tests.

A package's build key is the digest of everything that can change its output (`build_inputs`).
Finished builds live in the artifact store under their key (see store.py), and
`build-output/<pkg>/<version>[-<flavor>]` is a symlink to the entry: a build whose key is stored
(and verifies) is a cache hit and compiles nothing. A miss is built under a lock in a fresh work
directory, installed into a staged prefix, tested there, and only then moved into the store whole;
a build that fails or is killed leaves no entry and no output that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__
from .build import (
    BuildContext,
    CcacheStats,
    JobServer,
    StepTiming,
    plan_steps,
    read_ccache_stats,
    refresh_config_sub,
    run_steps,
    shell_steps,
    stop_running_steps,
)
from .config import Config
from .errors import BuildError, SmokeTestError, WasmforgeError
from .optimize import (
    DEFAULT_WASM_OPT_FLAGS,
    audit_imports,
    compile_module,
    module_sizes,
    optimize_module,
    precompile,
)
from .outputs import MANIFEST, output_dir, read_manifest, stored_output
from .patches import Patch, apply_series, patch_series
from .recipe import Package, RecipeBook, RunDefaults, Target
from .registry import Registry
from .remote_cache import RemoteCache, cache_tag, has_entry, pull_entry, push_entry
from .runtime import Runner, uses_exceptions
from .smoke import TestOutcome, run_smoke_tests
from .sources import FetchedSource, extract_source, fetch_sources
from .store import ArtifactStore, differences, exclusive_lock, file_record, walk_entry

__all__ = ["BuildResult", "PackageOutcome", "build_target", "explain", "output_dir", "plan", "read_manifest",
           "stored_output"]
from .toolchain import CxxLibrary, HostToolchain, Toolchain, cxx_library, ensure_host_packages, host_toolchain

Log = Callable[[str], None]
# Bump when the build logic changes in a way that changes outputs or entries.
# 3: manifests list logs and links too (an entry holds exactly what its manifest lists).
# 4: host paths mapped (-ffile-prefix-map), SOURCE_DATE_EPOCH from the recipe's release date.
# 5: pkg-config and CPP no longer in the environment (configure scripts record them).
BUILD_LOGIC_VERSION = "5"


@dataclass(frozen=True)
class BuildResult:
    target: str
    output: Path  # build-output/<pkg>/<version>: a symlink to `prefix`
    prefix: Path  # the artifact store entry, the path the build was installed for
    key: str
    reused: bool
    seconds: float


@dataclass(frozen=True)
class PlannedBuild:
    package: Package
    patches: list[Patch]
    inputs: dict[str, Any]
    key: str
    # What builds it: the WASI toolchain, or the build machine's compiler for a native build.
    toolchain: Toolchain | HostToolchain
    cxx: CxxLibrary | None = None  # libc++ for a WASI build with C++ (`build.cxx`), found once while planning
    depends: tuple[Target, ...] = ()  # the libraries it links
    build_tools: tuple[Target, ...] = ()  # the native builds whose programs it runs


def wasm_opt_flags(package: Package) -> list[str]:
    return [] if package.native else list(package.build.get("wasm_opt", DEFAULT_WASM_OPT_FLAGS))


def build_inputs(package: Package, toolchain: Toolchain | HostToolchain, patches: list[Patch], dep_keys: dict[str, str],
                 *, debug: bool = False, cxx: str | None = None, tool_keys: Mapping[str, str] | None = None,
                 ) -> dict[str, Any]:
    """Everything that can change a build's output; the build key is their digest.

    The recipe counts as rendered for this version and flavor (its build section and outputs), so
    editing a comment or another version does not rebuild; sources count by content (sha256), not
    by where they were fetched; jobs, ccache, mirrors and paths do not count. Smoke tests do not
    change outputs either: `invoke test` runs edited ones against a stored build.
    """
    return {
        "wasmforge_build_logic": BUILD_LOGIC_VERSION,
        "package": package.name,
        "version": package.version,
        "flavor": package.flavor,
        "native": package.native,
        "sources": [{"sha256": s.sha256, "prepare": list(s.prepare)} for s in package.sources],
        "patches": [{"name": p.name, "sha256": p.sha256} for p in patches],
        "toolchain": toolchain.identity(),
        "build": dict(package.build),
        "outputs": dict(package.outputs),
        "optimize": {"wasm_opt": wasm_opt_flags(package), "debug": debug},
        "dependencies": dep_keys,
        # The native builds it runs, by key (only where a recipe names some: other keys stay as they were).
        **({"build_tools": dict(tool_keys)} if tool_keys else {}),
        "source_date_epoch": package.source_date_epoch,
        # Only C++ builds name libc++ (an absent key leaves every other build's key as it was).
        **({"cxx": cxx} if cxx else {}),
        # How the programs are run by default is recorded in the manifest, so it is part of the build
        # (only where a recipe says it: other keys stay as they were).
        **({"run": run_record(package.recipe.run)} if package.recipe.run and not package.native else {}),
    }


def run_record(defaults: Mapping[str, RunDefaults]) -> dict[str, Any]:
    """A recipe's `run:` as the manifest keeps it, for `invoke run` and `invoke compare`."""
    return {program: {"dirs": dict(d.build_dirs), "env": dict(d.env), "script": list(d.script)}
            for program, d in defaults.items()}


def build_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def plan(book: RecipeBook, target: Target, config: Config, toolchain: Toolchain | HostToolchain) -> list[PlannedBuild]:
    """The packages `target` needs, dependencies first, each with its inputs and key (nothing is built)."""
    planned: list[PlannedBuild] = []
    # By target: a recipe's native build (a build tool) and its wasm build are two entries.
    keys: dict[Target, str] = {}
    libcxx: CxxLibrary | None = None  # looked up (and installed, the first time) once per plan
    host = toolchain if isinstance(toolchain, HostToolchain) else None
    for t in book.build_order(target):
        package = book.package(t)
        deps = tuple(book.dependency_targets(package.recipe, t.native, t.flavor))
        tools = tuple(book.tool_targets(t))
        tc: Toolchain | HostToolchain = toolchain
        if t.native:
            # Native builds (the target, or build tools of a wasm build) use the build machine's compiler.
            tc = host = host or host_toolchain()
        patches = patch_series(config.patches_dir, package.name, package.patch_series,
                               where=package.recipe.where(("versions", package.version, "patches")))
        cxx = None
        if package.build.get("cxx") and isinstance(tc, Toolchain):
            # Native builds use the build machine's C++ library.
            cxx = libcxx = libcxx or cxx_library(config, tc)
        inputs = build_inputs(package, tc, patches, {d.name: keys[d] for d in deps}, debug=config.debug,
                              cxx=cxx.identity if cxx else None, tool_keys={str(d): keys[d] for d in tools})
        keys[t] = build_key(inputs)
        planned.append(PlannedBuild(package, patches, inputs, keys[t], tc, cxx, deps, tools))
    return planned


def explain(book: RecipeBook, target: Target, config: Config, toolchain: Toolchain | HostToolchain) -> list[str]:
    """For each package of a build: stored (a hit) or not, and on a miss what differs from the nearest stored build."""
    store = ArtifactStore(config.artifacts)
    remote = remote_registry(config, lambda _: None)
    lines = []
    for item in plan(book, target, config, toolchain):
        label = f"{item.package.target} [{item.key[:12]}]"
        if store.entry(item.key).is_dir() and not store.problem(item.key):
            lines.append(f"{label}: hit ({store.entry(item.key)})")
            continue
        if store.entry(item.key).is_dir():
            lines.append(f"{label}: miss: the stored entry is damaged ({store.problem(item.key)}); it will be rebuilt")
            continue
        if remote and has_entry(remote, item.key):
            lines.append(f"{label}: remote hit ({remote.repo}:{cache_tag(item.key)})")
            continue
        nearest = store.nearest(item.package.target, item.package.name, item.inputs)
        if nearest is None:
            lines.append(f"{label}: miss: no stored build of {item.package.name}")
            continue
        diffs = differences(nearest.get("inputs", {}), item.inputs)
        lines.append(f"{label}: miss: differs from the stored build {str(nearest.get('key'))[:12]} "
                     f"({nearest.get('target')}, built {nearest.get('built_at')}) in:")
        lines += [f"    {d}" for d in diffs]
    return lines


@dataclass
class PackageOutcome:
    target: str
    result: BuildResult | None = None
    error: BaseException | None = None
    skipped_for: str | None = None  # the failed dependency

    def describe(self) -> str:
        if self.result:
            how = "up to date" if self.result.reused else "built"
            return f"{self.target}: {how} in {self.result.seconds:.1f} s"
        if self.error:
            what = self.error.what if isinstance(self.error, WasmforgeError) else repr(self.error)
            return f"{self.target}: FAILED: {what}"
        return f"{self.target}: not built ({self.skipped_for} failed)"


def build_target(book: RecipeBook, target: Target, config: Config, toolchain: Toolchain | HostToolchain, *,
                 log: Log = print, force: bool = False, run_tests: bool = True,
                 summary: list[PackageOutcome] | None = None) -> list[BuildResult]:
    """Build `target` after its dependencies; returns one result per package, target last.

    Packages whose dependencies are done build at the same time, within one budget of
    `config.jobs` compile jobs (GNU make's jobserver); each keeps its own logs. A failure stops
    only what depends on it: the others finish, then the first failure is raised. `summary`, if
    given, receives every package's outcome.
    """
    planned = plan(book, target, config, toolchain)
    outcomes = {item.package.target: PackageOutcome(item.package.target) for item in planned}
    deps = {item.package.target: [str(d) for d in item.depends + item.build_tools] for item in planned}
    waiting = {item.package.target: item for item in planned}
    jobserver = JobServer(config.jobs) if config.jobs > 1 else None
    remote = remote_registry(config, log)  # one per command: a registry found down is not asked again
    try:
        with ThreadPoolExecutor(max_workers=max(1, config.jobs)) as pool:
            running: dict[Future[BuildResult], str] = {}
            try:
                while waiting or running:
                    for name, item in list(waiting.items()):
                        failed = next((d for d in deps[name] if outcomes[d].error or outcomes[d].skipped_for), None)
                        if failed:
                            outcomes[name].skipped_for = outcomes[failed].skipped_for or outcomes[failed].target
                            log(f"{item.package.target}: not built: {outcomes[name].skipped_for} failed")
                            del waiting[name]
                        elif all(outcomes[d].result for d in deps[name]):
                            prefixes = {d.name: outcomes[str(d)].result.prefix  # type: ignore[union-attr]
                                        for d in item.depends}
                            tools = {d.name: outcomes[str(d)].result.prefix  # type: ignore[union-attr]
                                     for d in item.build_tools}
                            running[pool.submit(build_package, item, config, dep_prefixes=prefixes, tool_prefixes=tools, log=log,
                                                force=force and item.package.target == str(target),
                                                run_tests=run_tests, jobserver=jobserver, remote=remote)] = name
                            del waiting[name]
                    if not running:
                        continue
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        name = running.pop(future)
                        try:
                            outcomes[name].result = future.result()
                        except Exception as exc:  # noqa: BLE001 (kept and re-raised once the others finish)
                            outcomes[name].error = exc
                            log(f"{outcomes[name].target}: failed")
            except BaseException:
                # Leaving the pool waits for its threads, which wait for their steps: stop those first.
                stop_running_steps()
                raise
    finally:
        if jobserver:
            jobserver.close()
    if summary is not None:
        summary.extend(outcomes.values())
    if failure := next((o.error for o in outcomes.values() if o.error), None):
        raise failure
    return [o.result for o in outcomes.values() if o.result]


@contextmanager
def build_lock(config: Config, package: Package, log: Log) -> Iterator[None]:
    path = config.outputs / ".locks" / f"{package.target}.lock"
    with exclusive_lock(path, f"another build of {package.target} is running (lock {path}); waiting for it to finish", log):
        yield


def build_package(item: PlannedBuild, config: Config, *, dep_prefixes: dict[str, Path], tool_prefixes: Mapping[str, Path] | None = None,
                  log: Log = print, force: bool = False,
                  run_tests: bool = True, jobserver: JobServer | None = None,
                  remote: Registry | None = None) -> BuildResult:
    package, key = item.package, item.key
    store = ArtifactStore(config.artifacts)
    entry = store.entry(key)
    final = output_dir(config, package)
    start = time.perf_counter()
    with build_lock(config, package, log), store.lock(key, log):
        if not force and store.lookup(key, log) is not None:
            link_output(final, entry)
            log(f"{package.target}: up to date (stored build {key[:12]}, {final} -> {entry})")
            if remote and config.push_cache:
                push_entry(remote, store, key, package.target, log=log)
            return BuildResult(package.target, final, entry, key, True, time.perf_counter() - start)
        if remote and not force and pull_entry(remote, store, key, package.target, log=log,
                                               precompile=_precompile_here):
            link_output(final, entry)
            log(f"{package.target}: remote hit (build {key[:12]} pulled from {remote.repo} and verified, "
                f"{final} -> {entry})")
            return BuildResult(package.target, final, entry, key, True, time.perf_counter() - start)
        log(f"{package.target}: building")
        # The Debian packages whose programs the build runs, and for a native build those that provide its libraries.
        ensure_host_packages([*package.build.get("host_packages", []),
                              *(package.recipe.native.get("packages", []) if package.native else [])],
                             why=f"the build of {package.target}", log=log)
        work = config.outputs / ".work" / package.target
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        # Installed for the store entry (dependants find it there), or for the guest prefix the recipe
        # chooses: then the staged prefix, not its host path, becomes the entry.
        install_prefix = Path(package.build["prefix"]) if package.build.get("prefix") else entry
        ctx = BuildContext(package=package, config=config, toolchain=item.toolchain, work=work, prefix=install_prefix,
                           deps=dep_prefixes, tools=tool_prefixes or {}, jobserver=jobserver, cxx=item.cxx)
        ctx.logs.mkdir()
        timings: list[StepTiming] = []

        t0 = time.perf_counter()
        fetched = fetch_sources(package.sources, config, log=log)
        extract_source(fetched, ctx.src)
        timings.append(StepTiming("fetch+extract", time.perf_counter() - t0))
        if fetched.spec.prepare:
            timings += _prepare(ctx, fetched, log)
        t0 = time.perf_counter()
        apply_series(ctx.src, item.patches, ctx.logs / "00-patch.log")
        if package.build["system"] == "autotools" and not package.native:
            refresh_config_sub(ctx.src, log)
        timings.append(StepTiming("patch", time.perf_counter() - t0))

        steps = plan_steps(ctx)
        timings += run_steps(ctx, steps, log=log, first_index=len(timings))
        ccache = read_ccache_stats(ctx.ccache_stats)
        if ccache:
            log(f"  [{package.target}] {ccache.describe()}")
        outputs = _collect_outputs(ctx)
        sizes: dict[str, dict[str, dict[str, int]]] = {}
        if not package.native:
            timings += _optimize(ctx, outputs, sizes, log)
            t0 = time.perf_counter()
            for wasm in outputs:
                module = compile_module(wasm)  # once: compiling PHP takes seconds
                audit_imports(wasm, module=module)
                precompile(wasm, module)
            timings.append(StepTiming("precompile", time.perf_counter() - t0))

        tests: list[TestOutcome] = []
        if run_tests and package.tests:
            log(f"{package.target}: smoke tests")
            tests = run_smoke_tests(package, ctx.staged_prefix / "bin", Runner(), log=log)
            failed = [t for t in tests if not t.passed]
            if failed:
                raise SmokeTestError(
                    f"{len(failed)} of {len(tests)} smoke tests of {package.target} failed: "
                    + ", ".join(t.name for t in failed),
                    where=failed[0].where,
                    details="\n".join(f"{t.name}:\n  " + "\n  ".join(t.problems) for t in failed),
                    hint=f"the build's files are kept in {work} for inspection; nothing was installed")
        shutil.copytree(ctx.logs, ctx.staged_prefix / "logs")
        _write_manifest(ctx, key, item.inputs, fetched, timings, tests, ccache, sizes)
        store.put(key, ctx.staged_prefix)
        link_output(final, entry)
        shutil.rmtree(work, ignore_errors=True)
        if remote and config.push_cache:
            push_entry(remote, store, key, package.target, log=log)
    seconds = time.perf_counter() - start
    log(f"{package.target}: built in {seconds:.1f} s -> {final}")
    return BuildResult(package.target, final, entry, key, False, seconds)


def remote_registry(config: Config, log: Log) -> Registry | None:
    """The registry of the shared build cache, when one is configured."""
    if not config.remote_cache:
        return None
    # Few retries: a cache that does not answer soon is not worth waiting for (the build goes on locally).
    return Registry(RemoteCache.parse(config.remote_cache).repo, log=log, retries=2)


def _precompile_here(wasm: Path) -> None:
    """A pulled module is audited and compiled on this machine, like a built one (no shared native code)."""
    module = compile_module(wasm)
    audit_imports(wasm, module=module)
    precompile(wasm, module)


def _prepare(ctx: BuildContext, fetched: FetchedSource, log: Log) -> list[StepTiming]:
    """Host commands that bring an alternative source into the shape the build expects."""
    env = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    steps = shell_steps("prepare", fetched.spec.prepare, ctx.src, env, ("versions", ctx.package.version),
                        per_line_origin=False)
    log(f"  [{ctx.package.target}] preparing the source from {fetched.origin} on the host")
    return run_steps(ctx, steps, log=log, first_index=1)


def _optimize(ctx: BuildContext, outputs: list[Path], sizes: dict[str, dict[str, dict[str, int]]],
              log: Log) -> list[StepTiming]:
    """wasm-opt on every output module (at once, within the jobs budget); sizes before and after."""
    root = ctx.staged_prefix
    for wasm in outputs:
        sizes[str(wasm.relative_to(root))] = {"raw": module_sizes(wasm)}
    flags = wasm_opt_flags(ctx.package)
    tool = ctx.toolchain.wasm_opt if isinstance(ctx.toolchain, Toolchain) else None
    if not flags or not outputs:
        return []
    if tool is None:
        log(f"  [{ctx.package.target}] wasm-opt is not installed: outputs are not optimised "
            "(invoke toolchain --install)")
        return []
    log(f"  [{ctx.package.target}] wasm-opt {' '.join(flags)} on {', '.join(w.name for w in outputs)}"
        f" (logs: {ctx.logs}/wasm-opt-*.log)")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(ctx.config.jobs, len(outputs)))) as pool:
        for future in [pool.submit(optimize_module, wasm, tool, flags, debug=ctx.config.debug,
                                   log_file=ctx.logs / f"wasm-opt-{wasm.stem}.log") for wasm in outputs]:
            future.result()
    for wasm in outputs:
        entry = sizes[str(wasm.relative_to(root))]
        entry["optimized"] = module_sizes(wasm)
        log(f"  [{ctx.package.target}] {wasm.name}: {entry['raw']['bytes']:,} -> {entry['optimized']['bytes']:,} bytes "
            f"({entry['raw']['gzip']:,} -> {entry['optimized']['gzip']:,} gzipped)")
    return [StepTiming("wasm-opt", time.perf_counter() - t0)]


def _collect_outputs(ctx: BuildContext) -> list[Path]:
    bin_dir = ctx.staged_prefix / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    found = []
    for name, rel in ctx.package.outputs:
        source = ctx.build_dir / rel if not Path(rel).is_absolute() else Path(rel)
        if not source.is_file():
            raise BuildError(f"output {name!r} was not produced: no file at {source}",
                             where=ctx.package.recipe.where(("outputs", name)),
                             hint="check the build logs in " + str(ctx.logs))
        if ctx.package.native:
            dest = bin_dir / name
            if source.resolve() != dest.resolve():
                shutil.copy2(source, dest)
            found.append(dest)
            continue
        if source.read_bytes()[:4] != b"\0asm":
            raise BuildError(f"output {name!r} ({source}) is not a WebAssembly module",
                             where=ctx.package.recipe.where(("outputs", name)))
        dest = bin_dir / f"{name}.wasm"
        shutil.copyfile(source, dest)
        # `make install` may have put the same module in bin/ without the suffix.
        stray = bin_dir / name
        if stray.is_file() and stray.read_bytes()[:4] == b"\0asm":
            stray.unlink()
        found.append(dest)
    return found


def _write_manifest(ctx: BuildContext, key: str, inputs: dict[str, Any], fetched: FetchedSource,
                    timings: list[StepTiming], tests: list[TestOutcome], ccache: CcacheStats | None,
                    sizes: dict[str, dict[str, dict[str, int]]]) -> None:
    root = ctx.staged_prefix
    # Everything in the entry is listed (the store treats anything else as damage): installed files
    # with their sha256, the build's logs likewise, and links with their targets.
    found = sorted(walk_entry(root))
    unexpected = [rel for rel, kind in found if kind == "other"]
    if unexpected:
        raise BuildError(f"the install of {ctx.package.target} made special files (FIFOs, sockets, devices): "
                         + ", ".join(unexpected[:5]), hint="remove them in the recipe's install step")
    files = {rel: file_record(root / rel) for rel, kind in found if kind == "file" and not rel.startswith("logs/")}
    logs = {rel: file_record(root / rel) for rel, kind in found if kind == "file" and rel.startswith("logs/")}
    links = {rel: os.readlink(root / rel) for rel, kind in found if kind == "link"}
    manifest = {
        "name": ctx.package.name,
        "version": ctx.package.version,
        "flavor": ctx.package.flavor,
        "target": ctx.package.target,
        "key": key,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wasmforge": __version__,
        "inputs": {
            **inputs,
            "source_used": {"file": fetched.path.name, "sha256": fetched.spec.sha256, "origin": fetched.origin},
            "flags": ctx.flags,
        },
        "programs": {name: f"bin/{name}" + ("" if ctx.package.native else ".wasm") for name, _ in ctx.package.outputs},
        "native": ctx.package.native,
        # What a runtime must support beyond WASI preview 1 to run each module: exception handling is the
        # one runtimes differ on (WasmEdge's AOT compiler refuses it: such a module has no WasmEdge AOT
        # form; docs/runtimes.md has the matrix).
        "needs": {} if ctx.package.native else {
            name: ["exception handling"] if uses_exceptions(root / "bin" / f"{name}.wasm") else []
            for name, _ in ctx.package.outputs},
        # How each program is started by default: the build's own directories it reads (of those in
        # the recipe's `run:`, the ones this build installed), its environment, how a script is passed.
        "run": {program: {**spec, "dirs": {g: rel for g, rel in spec["dirs"].items() if (root / rel).is_dir()}}
                for program, spec in inputs.get("run", {}).items()},
        "outputs": files,
        "logs": logs,
        "links": links,
        "tests": [t.as_dict() for t in tests],
        "steps": [{"name": t.name, "seconds": round(t.seconds, 2)} for t in timings],
        "ccache": asdict(ccache) if ccache else None,
        "sizes": sizes,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def link_output(final: Path, entry: Path) -> None:
    """Point build-output/<pkg>/<version> at a store entry; the switch is one atomic rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_symlink() and Path(os.readlink(final)) == entry:
        return
    link = final.with_name(f".{final.name}.link-{os.getpid()}")
    link.unlink(missing_ok=True)
    link.symlink_to(entry, target_is_directory=True)
    if final.is_dir() and not final.is_symlink():  # a directory left by an older wasmforge
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(link, final)
