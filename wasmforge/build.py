"""Build step drivers (autotools, make, cmake, script) run in one explicit context.

Every step runs in a clean environment (no host CPATH, PKG_CONFIG_PATH, ...), with the WASI
toolchain's tools, the flags of the recipe, and the dependencies' install prefixes visible through
pkg-config and CFLAGS/LDFLAGS. Each step writes its own log under `logs/`; a failing step raises a
BuildError with the log's tail and path.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .config import Config
from .errors import BuildError
from .recipe import Package
from .toolchain import EH_CFLAGS, EH_LIBS, TARGET, CxxLibrary, HostToolchain, Toolchain
from .verified import file_sha256

Log = Callable[[str], None]
# Passed to the clang driver at link time: clang would otherwise run any wasm-opt found on PATH.
LINK_FLAGS = ("--no-wasm-opt",)
HOST_ENV_KEPT = ("PATH", "HOME", "TMPDIR", "TERM")


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str] = field(default_factory=dict)
    # The recipe key this step comes from, so that a failure points at its line.
    origin: tuple[str | int, ...] = ("build",)
    # A check done here instead of a command (argv is then empty): raises BuildError.
    check: Callable[[], None] | None = None


@dataclass(frozen=True)
class StepTiming:
    name: str
    seconds: float


class JobServer:
    """GNU make's jobserver: one budget of `jobs` slots shared by the makes of all concurrent builds.

    The pipe holds jobs - 1 tokens (every make has one slot of its own); builds get it through
    MAKEFLAGS, and make and its sub-makes take a token for each further job.
    """

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.read, self.write = os.pipe()
        os.write(self.write, b"+" * (jobs - 1))

    @property
    def makeflags(self) -> str:
        return f"-j{self.jobs} --jobserver-auth={self.read},{self.write}"

    @property
    def fds(self) -> tuple[int, int]:
        return (self.read, self.write)

    def close(self) -> None:
        os.close(self.read)
        os.close(self.write)


@dataclass(frozen=True)
class BuildContext:
    """Everything a build step needs; paths derived once, here."""

    package: Package
    config: Config
    toolchain: Toolchain | HostToolchain
    work: Path
    prefix: Path  # what the build is configured for: its store entry, or the guest prefix of the recipe
    deps: Mapping[str, Path]
    # The native builds whose programs this build runs (recipe `build_tools`), by recipe name.
    tools: Mapping[str, Path] = field(default_factory=dict)
    jobserver: JobServer | None = None
    cxx: CxxLibrary | None = None  # libc++ for a WASI build with C++ (the plan finds it); native builds use the machine's

    @property
    def src(self) -> Path:
        return self.work / "src"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def destdir(self) -> Path:
        return self.work / "destdir"

    @property
    def staged_prefix(self) -> Path:
        """Where `make install DESTDIR=...` puts the files meant for `prefix`."""
        return self.destdir / self.prefix.relative_to(self.prefix.anchor)

    @property
    def tools_dir(self) -> Path:
        """This build's own host tools (its pkg-config), first on its PATH."""
        return self.work / "tools"

    def write_pkg_config(self) -> None:
        """`pkg-config` (and `wasm32-wasip1-pkg-config`, which configure looks for first) that see
        only the dependencies' .pc files."""
        real = shutil.which("pkg-config")
        if self.package.native or real is None:
            return
        libdir = os.pathsep.join(str(p / "lib" / "pkgconfig") for p in self.deps.values()) \
            or str(self.work / "no-pkgconfig")
        # --static: a wasm module links every library statically, so a library's own dependencies
        # (libzip's -lbz2 -lcrypto, Libs.private) must be on the link line too.
        script = ("#!/bin/sh\n# pkg-config for this wasm build: the dependencies' .pc files only.\n"
                  f"PKG_CONFIG_LIBDIR={shlex.quote(libdir)}\nPKG_CONFIG_PATH=\n"
                  f"export PKG_CONFIG_LIBDIR PKG_CONFIG_PATH\nexec {shlex.quote(real)} --static \"$@\"\n")
        self.tools_dir.mkdir(parents=True, exist_ok=True)
        for name in ("pkg-config", f"{self.toolchain.target}-pkg-config"):
            path = self.tools_dir / name
            path.write_text(script)
            path.chmod(0o755)

    def write_cxx_aliases(self) -> None:
        """libstdc++.a, the name configure scripts link (PHP adds -lstdc++), as libc++ for WASI."""
        if not self.cxx:
            return
        lib = self.cxx.lib or self.toolchain.sysroot / "lib" / TARGET
        alias_dir = self.tools_dir / "cxx"
        alias_dir.mkdir(parents=True, exist_ok=True)
        (alias_dir / "libstdc++.a").unlink(missing_ok=True)
        (alias_dir / "libstdc++.a").symlink_to(lib / "libc++.a")

    @property
    def ccache_stats(self) -> Path:
        return self.work / "ccache-stats.log"

    @cached_property
    def ccache(self) -> str | None:
        """The ccache to compile through, if it is installed and wanted (wasm builds only)."""
        if self.package.native or not self.config.use_ccache:
            return None
        return shutil.which("ccache")

    @property
    def project_dir(self) -> Path:
        """The directory of the source that holds the build system (the recipe's `subdir`, or the top)."""
        return self.src / self.package.build.get("subdir", ".")

    @property
    def build_dir(self) -> Path:
        """Where the build runs, and what recipe `outputs` paths are relative to."""
        if self.package.build["system"] == "cmake" or not self.package.build.get("in_source", True):
            return self.work / "build"
        return self.project_dir

    @cached_property
    def flags(self) -> dict[str, list[str]]:
        build = self.package.build
        base = self._base_context()
        pkg = self.package
        cflags = list(pkg.render(("cflags",), build.get("cflags", []), base))
        link_flags = [] if pkg.native else list(LINK_FLAGS)
        ldflags = link_flags + list(pkg.render(("ldflags",), build.get("ldflags", []), base))
        libs = list(pkg.render(("libs",), build.get("libs", []), base))
        if self.package.exceptions:
            if not self.toolchain.has_setjmp:
                raise BuildError(f"{self.package.target} needs setjmp/longjmp (wasm exception handling), "
                                 f"which this toolchain lacks: {self.toolchain.clang_version}, {self.toolchain.libc}",
                                 hint="use clang >= 20 and a wasi-libc with setjmp: invoke toolchain --install")
            cflags += EH_CFLAGS
            libs += EH_LIBS
        for prefix in self.deps.values():
            cflags.append(f"-I{prefix / 'include'}")
            ldflags.append(f"-L{prefix / 'lib'}")
        if not pkg.native:
            # Host paths that reach a module (__FILE__ in assertions, debug info) are mapped to fixed
            # ones, so a build in another directory or store gives the same bytes.
            cflags += [f"-ffile-prefix-map={self.work}=/build"] + [
                f"-ffile-prefix-map={prefix}=/deps/{name}" for name, prefix in sorted(self.deps.items())]
        cxxflags = list(cflags)
        if self.cxx:
            cxxflags += self.cxx.cflags()
            if self.cxx.lib:
                ldflags.append(f"-L{self.cxx.lib}")
            # GNU's name for the C++ library, which configure scripts add (PHP's PHP_REQUIRE_CXX):
            # here it is libc++ (tools_dir/cxx, written by write_cxx_aliases).
            ldflags.append(f"-L{self.tools_dir / 'cxx'}")
            libs += ["-lc++", "-lc++abi"]
        return {"cflags": cflags, "cxxflags": cxxflags, "ldflags": ldflags, "libs": libs}

    def template_context(self) -> dict[str, Any]:
        """What build templates can use: tools, joined flags, paths, jobs, dependency prefixes."""
        return {**self._base_context(), **{k: " ".join(v) for k, v in self.flags.items()}}

    def _base_context(self) -> dict[str, Any]:
        tools = {k.lower(): v for k, v in self.toolchain.env().items()}
        return {
            **tools,
            "prefix": str(self.prefix),
            "destdir": str(self.destdir),
            "staged_prefix": str(self.staged_prefix),
            "src": str(self.src),
            "jobs": self.config.jobs,
            "host": self.toolchain.target,
            "sysroot": str(self.toolchain.sysroot),
            # Our autoconf answers for WASI (CONFIG_SITE of wasm builds), for a recipe that adds its own to them.
            "config_site": str(self.config.toolchain_dir / "config.site"),
            "deps": {name: str(p) for name, p in self.deps.items()},
            "build_tools": {name: str(p) for name, p in self.tools.items()},
        }

    def render(self, path: tuple[str | int, ...], value: Any) -> Any:
        return self.package.render(path, value, self.template_context())

    def environment(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in HOST_ENV_KEPT if k in os.environ}
        if self.ccache:
            # The user's ccache settings (CCACHE_DIR, CCACHE_REMOTE_STORAGE for a shared http or
            # redis cache, ...) pass through; the stats log counts this build's hits.
            env.update({k: v for k, v in os.environ.items() if k.startswith("CCACHE_")})
            env["WASMFORGE_CCACHE"] = self.ccache
            env["CCACHE_STATSLOG"] = str(self.ccache_stats)
            # Paths under the work directory hash relative: other checkouts share the results.
            env.setdefault("CCACHE_BASEDIR", str(self.work))
        flags = self.flags
        env.update(self.toolchain.env())
        env.update({
            "LANG": "C",
            "LC_ALL": "C",
            # Joined with plain spaces: configure scripts and makefiles split these on white space
            # and never undo shell quoting.
            "CFLAGS": " ".join(flags["cflags"]),
            "CXXFLAGS": " ".join(flags["cxxflags"]),
            "LDFLAGS": " ".join(flags["ldflags"]),
            "LIBS": " ".join(flags["libs"]),
            "PREFIX": str(self.prefix),
            "DESTDIR": str(self.destdir),
            "JOBS": str(self.config.jobs),
            # The version's release date: __DATE__/__TIME__ (PHP's "built:" date), archive dates.
            "SOURCE_DATE_EPOCH": str(self.package.source_date_epoch),
        })
        if self.jobserver:
            env["MAKEFLAGS"] = self.jobserver.makeflags
        if self.package.native:
            # The build machine's own libraries and pkg-config files are what a native build uses.
            env["PKG_CONFIG_PATH"] = ""
        else:
            # Only our wasm prefixes: a host .pc file must never be found. Through a pkg-config of
            # this build first on PATH, not PKG_CONFIG_LIBDIR in the environment: configure scripts
            # record such variables (PHP's `php -i` shows them) and the paths would make the build
            # differ from one directory or store to the next.
            env["PATH"] = f"{self.tools_dir}{os.pathsep}{env.get('PATH', os.defpath)}"
            env["CONFIG_SITE"] = str(self.config.toolchain_dir / "config.site")
        if self.tools:
            # The build tools' programs come before the machine's (a build python of the right version).
            env["PATH"] = os.pathsep.join([*(str(p / "bin") for _, p in sorted(self.tools.items())),
                                           env.get("PATH", os.defpath)])
        for key, value in self.render(("env",), dict(self.package.build.get("env", {}))).items():
            env[key] = str(value)
        return env


def plan_steps(ctx: BuildContext) -> list[Step]:
    build = ctx.package.build
    system = build["system"]
    env = ctx.environment()
    jobs = str(ctx.config.jobs)
    # With a jobserver, make takes its parallelism from MAKEFLAGS (a -j here would leave the budget).
    make_jobs = () if ctx.jobserver else (f"-j{jobs}",)
    make_args = [str(a) for a in ctx.render(("make",), build.get("make", []))]
    install_args = [str(a) for a in ctx.render(("install",), build.get("install", ["install"]))]
    bdir = ctx.build_dir
    write_env_script(ctx, env)
    ctx.write_pkg_config()
    ctx.write_cxx_aliases()
    # Installs run one job at a time: many projects' install rules race when run in parallel.
    install_env = {k: v for k, v in env.items() if k != "MAKEFLAGS"}
    steps: list[Step] = []
    steps += shell_steps("pre_configure", ctx.render(("pre_configure",), build.get("pre_configure", [])), ctx.src, env,
                         ("build", "pre_configure"))
    if build.get("generated"):
        steps.append(Step("check-generated", (), ctx.src, origin=("build", "generated"),
                          check=lambda: check_generated(ctx, build["generated"])))
    if system == "autotools":
        cross = [] if ctx.package.native else [f"--host={TARGET}", f"--build={_build_triple()}"]
        # Relative when it can be: PHP records its configure line (php -i), which must not name the host.
        script = "./configure" if bdir == ctx.project_dir else str(ctx.project_dir / "configure")
        configure = [script, *cross, f"--prefix={ctx.prefix}", *[str(a) for a in ctx.render(("configure",), build.get("configure", []))]]
        steps += [Step("configure", tuple(configure), bdir, env, ("build", "configure")),
                  Step("make", ("make", *make_jobs, *make_args), bdir, env, ("build", "make"))]
        if install_args:
            steps.append(Step("install", ("make", *install_args, f"DESTDIR={ctx.destdir}"), bdir, install_env,
                              ("build", "install")))
    elif system == "make":
        steps.append(Step("make", ("make", *make_jobs, *make_args), bdir, env, ("build", "make")))
        if install_args:
            steps.append(Step("install", ("make", *install_args, f"DESTDIR={ctx.destdir}"), bdir, install_env,
                              ("build", "install")))
    elif system == "cmake":
        toolchain_file = write_cmake_toolchain(ctx)
        build_dir = ctx.build_dir
        configure = ["cmake", "-S", str(ctx.project_dir), "-B", str(build_dir), "-G", "Unix Makefiles",
                     f"-DCMAKE_TOOLCHAIN_FILE={toolchain_file}", f"-DCMAKE_INSTALL_PREFIX={ctx.prefix}",
                     "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
                     *[str(a) for a in ctx.render(("configure",), build.get("configure", []))]]
        targets = [a for t in make_args for a in ("--target", t)]
        steps += [Step("configure", tuple(configure), ctx.src, env, ("build", "configure")),
                  Step("build", ("cmake", "--build", str(build_dir), *(("-j", jobs) if make_jobs else ()), *targets),
                       ctx.src, env,
                       ("build", "make")),
                  Step("install", ("cmake", "--install", str(build_dir)), ctx.src, install_env, ("build", "install"))]
    steps += shell_steps("script", ctx.render(("script",), build.get("script", [])), bdir, env, ("build", "script"))
    return steps


def shell_steps(name: str, lines: list[str] | tuple[str, ...], cwd: Path, env: Mapping[str, str],
                origin: tuple[str | int, ...], *, per_line_origin: bool = True) -> list[Step]:
    """One step per shell command (bash, stopping at the first failing command of a line), named
    name-1, name-2, ...; a failure points at its own line of the recipe list unless the list has no
    lines of its own to point at (`per_line_origin=False`)."""
    return [Step(f"{name}-{i + 1}", ("bash", "-e", "-o", "pipefail", "-c", line), cwd, env,
                 (*origin, i) if per_line_origin else origin)
            for i, line in enumerate(lines)]


SYSTEM_CONFIG_SCRIPTS = Path("/usr/share/misc")


def refresh_config_sub(tree: Path, log: Log) -> None:
    """Replace each config.sub that rejects wasm32-wasip1 with the system's (Debian's autotools-dev).

    Release tarballs carry the copy current when they were made; those from before 2019 reject any
    wasm32 host. Debian's dh_update_autotools_config does the same for native packages.
    """
    fresh = SYSTEM_CONFIG_SCRIPTS / "config.sub"
    for old in tree.rglob("config.sub"):
        if subprocess.run(["sh", str(old), TARGET], capture_output=True).returncode == 0:
            continue
        if not fresh.exists():
            raise BuildError(f"{old} does not know {TARGET} and no newer config.sub is installed",
                             hint="install Debian's autotools-dev (it provides /usr/share/misc/config.sub)")
        shutil.copyfile(fresh, old)
        log(f"  updated {old.relative_to(tree)} from {fresh}: the old one does not know {TARGET}")


def write_cmake_toolchain(ctx: BuildContext) -> Path:
    tc = ctx.toolchain
    flags = ctx.flags
    text = "\n".join([
        "# Written by wasmforge for this build: cross-compile to WASI with the chosen toolchain.",
        f'list(APPEND CMAKE_MODULE_PATH "{ctx.config.toolchain_dir / "cmake"}")',
        "set(CMAKE_SYSTEM_NAME WASI)",
        "set(CMAKE_SYSTEM_VERSION 1)",
        "set(CMAKE_SYSTEM_PROCESSOR wasm32)",
        f'set(CMAKE_C_COMPILER "{tc.tool("clang")}")',
        f'set(CMAKE_CXX_COMPILER "{tc.tool("clang++")}")',
        f'set(CMAKE_AR "{tc.tool("ar")}" CACHE FILEPATH "")',
        f'set(CMAKE_RANLIB "{tc.tool("ranlib")}" CACHE FILEPATH "")',
        "set(CMAKE_C_COMPILER_TARGET wasm32-wasip1)",
        f'set(CMAKE_SYSROOT "{tc.sysroot}")',
        f'set(CMAKE_C_FLAGS_INIT "{" ".join(flags["cflags"])}")',
        f'set(CMAKE_EXE_LINKER_FLAGS_INIT "{" ".join(flags["ldflags"] + flags["libs"])}")',
        f'set(CMAKE_FIND_ROOT_PATH "{tc.sysroot}" {" ".join(chr(34) + str(p) + chr(34) for p in ctx.deps.values())})',
        "set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)",
        # Checks link a real module: built as static libraries they are never linked, so every
        # check_function_exists would find functions that wasi-libc lacks (clonefile, dup, ...).
        "set(CMAKE_TRY_COMPILE_TARGET_TYPE EXECUTABLE)",
        "",
    ])
    path = ctx.work / "wasi-toolchain.cmake"
    path.write_text(text)
    return path


def _build_triple() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        out = subprocess.run([cc, "-dumpmachine"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return f"{os.uname().machine}-pc-linux-gnu"


def write_env_script(ctx: BuildContext, env: Mapping[str, str]) -> Path:
    """`build-env.sh` in the work directory: source it to rerun a failed step by hand."""
    path = ctx.work / "build-env.sh"
    lines = ["# Environment of this build's steps: `. build-env.sh` to rerun one by hand."]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


# A step runs in a process group of its own, watched by a small guard process that kills the whole
# group once our end of its pipe closes: when the step is over (stray children), or when wasmforge
# dies in any way, SIGKILL included. No compiler outlives the build that started it.
_GUARD = (
    "import os, signal, sys\n"
    "group = int(sys.stdin.readline() or 0)\n"
    "sys.stdin.read()\n"
    "if group > 0:\n"
    "    try:\n"
    "        os.killpg(group, signal.SIGKILL)\n"
    "    except OSError:\n"
    "        pass\n"
)
# The groups of the steps running now (this process's children), so that an interrupt of the main
# thread (Ctrl-C reaches only our own group) can stop them.
_running_groups: set[int] = set()
_running_lock = threading.Lock()


def stop_running_steps() -> None:
    """Kill every step this process is running (after Ctrl-C, or when a build is abandoned)."""
    with _running_lock:
        groups = list(_running_groups)
    for group in groups:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)


def run_in_group(argv: tuple[str, ...] | list[str], *, cwd: Path, env: Mapping[str, str], stdout,  # type: ignore[no-untyped-def]
                 pass_fds: tuple[int, ...] = ()) -> int:
    """Run a command in its own process group under a guard; return its exit status."""
    guard = subprocess.Popen([sys.executable, "-c", _GUARD], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    assert guard.stdin is not None
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdout=stdout, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, pass_fds=pass_fds, start_new_session=True)
    except BaseException:
        guard.stdin.close()
        guard.wait()
        raise
    with _running_lock:
        _running_groups.add(proc.pid)
    try:
        guard.stdin.write(f"{proc.pid}\n")
        guard.stdin.flush()
        return proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        with _running_lock:
            _running_groups.discard(proc.pid)
        guard.stdin.close()  # the guard now kills what the step left running
        guard.wait()


def check_generated(ctx: BuildContext, pins: Mapping[str, str]) -> None:
    """The files pre_configure generated are the ones the recipe pins (they are part of the build key)."""
    for rel, expected in pins.items():
        path = ctx.src / rel
        pinned_by_version = rel in ctx.package.recipe.versions[ctx.package.version].get("generated", {})
        where = ctx.package.recipe.where(("versions", ctx.package.version, "generated", rel) if pinned_by_version
                                         else ("build", "generated", rel))
        if not path.is_file() or path.is_symlink():
            raise BuildError(f"{rel} was not generated (no such file in the source tree)", where=where,
                             hint="check the pre_configure steps' logs")
        got = file_sha256(path)
        if got != expected:
            raise BuildError(f"{rel} was generated differently from the recipe's pin", where=where,
                             details=f"expected sha256 {expected}\ngot      sha256 {got}",
                             hint="the generator (a pre_configure step or its host tool) is not the one the pin was "
                                  "made with: compare the file with a known-good build's before updating the pin")


def run_steps(ctx: BuildContext, steps: list[Step], *, log: Log = print, first_index: int = 1) -> list[StepTiming]:
    ctx.logs.mkdir(parents=True, exist_ok=True)
    timings = []
    for index, step in enumerate(steps, first_index):
        if step.check:
            start = time.perf_counter()
            step.check()
            timings.append(StepTiming(step.name, time.perf_counter() - start))
            continue
        log_file = ctx.logs / f"{index:02d}-{step.name}.log"
        step.cwd.mkdir(parents=True, exist_ok=True)
        log(f"  [{ctx.package.target}] {step.name} (log: {log_file})")
        start = time.perf_counter()
        with log_file.open("w") as out:
            out.write(f"$ cd {step.cwd}\n$ {shlex.join(step.argv)}\n\n")
            out.flush()
            try:
                returncode = run_in_group(step.argv, cwd=step.cwd, env=step.env, stdout=out,
                                          pass_fds=ctx.jobserver.fds if ctx.jobserver else ())
            except OSError as exc:
                raise BuildError(f"{step.name} step could not start: {exc}",
                                 where=ctx.package.recipe.where(step.origin), details=f"log: {log_file}") from exc
        seconds = time.perf_counter() - start
        timings.append(StepTiming(step.name, seconds))
        if returncode != 0:
            raise BuildError(
                f"{step.name} step of {ctx.package.target} failed (exit code {returncode})",
                where=ctx.package.recipe.where(step.origin),
                details=f"last lines of {log_file}:\n" + tail(log_file) + f"\nfull log: {log_file}",
                hint="read the log; fix the recipe or add a patch, then build again",
            )
    return timings


def tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").rstrip().splitlines()
    return "\n".join("    " + line for line in text[-lines:])


@dataclass(frozen=True)
class CcacheStats:
    hits: int
    misses: int
    uncacheable: int

    def describe(self) -> str:
        cacheable = self.hits + self.misses
        if not cacheable:
            return f"ccache: no cacheable compilations ({self.uncacheable} other calls)"
        return f"ccache: {self.hits} of {cacheable} compilations from the cache ({100 * self.hits / cacheable:.1f}%)"


def read_ccache_stats(path: Path) -> CcacheStats | None:
    """Count one build's results in ccache's stats log (one `# file` record per call)."""
    if not path.exists():
        return None
    hits = misses = other = 0
    for record in path.read_text(errors="replace").split("# ")[1:]:
        counters = set(record.splitlines()[1:])
        if counters & {"direct_cache_hit", "preprocessed_cache_hit"}:
            hits += 1
        elif "cache_miss" in counters:
            misses += 1
        else:
            other += 1
    return CcacheStats(hits, misses, other)
