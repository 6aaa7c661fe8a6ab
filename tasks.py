"""wasmforge's command line: `invoke --list` shows the tasks, `invoke --help TASK` their options.

Thin on purpose: parse arguments, call wasmforge, print. Errors a user can fix are printed as one
message without a traceback.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import importlib
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wasmforge.stdio import reserve_std_fds

# Before anything opens a file: a closed stdin must not become the descriptor of a module or .cwasm.
reserve_std_fds()

from invoke import task  # noqa: E402
from invoke.exceptions import Exit  # noqa: E402

# Only what every command needs is imported here; each task imports its stages itself, so that
# `invoke run` does not pay for the build machinery (requests, the toolchain, benchmarks).
from wasmforge.config import MAX_SECONDS, Config, positive_number  # noqa: E402
from wasmforge.errors import WasmforgeError  # noqa: E402
from wasmforge.outputs import output_dir, read_manifest, stored_output  # noqa: E402


class _LazyImport:
    """`from MODULE import NAME`, done when a task first uses the name: the recipes (Jinja2, the recipe
    checks) are imported by the tasks that read them, not by `invoke run` of a stored build."""

    def __init__(self, module: str, name: str) -> None:
        self._module, self._name = module, name

    def __getattr__(self, attr: str) -> Any:
        return getattr(getattr(importlib.import_module(self._module), self._name), attr)


RecipeBook = _LazyImport("wasmforge.recipe", "RecipeBook")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cli(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a WasmforgeError into a clean message and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if any(a in ("--help", "-h") for a in [*args[1:], *kwargs.values()]):
            # invoke gives a task's positional argument the next word, even `--help`: show the help
            # that `invoke --help TASK` shows instead of looking for a package called --help.
            name = func.__name__.rstrip("_").replace("_", "-")
            os.execv(sys.executable, [sys.executable, "-m", "invoke", "--help", name])
        try:
            return func(*args, **kwargs)
        except WasmforgeError as exc:
            print(f"error: {exc.render()}", file=sys.stderr)
            raise Exit(code=1) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise Exit(code=130) from None
        except BrokenPipeError:
            # The reader went away (`invoke list | head`): nothing to say, nobody to say it to.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise Exit(code=141) from None
        except OSError as exc:
            # A read-only or full disk, a permission: one message with the path, no traceback.
            where = f" ({exc.filename})" if exc.filename else ""
            hint = {errno.ENOSPC: "free some space and run the command again",
                    errno.EROFS: "the file system is read-only: point WASMFORGE_CACHE/WASMFORGE_OUTPUT elsewhere",
                    errno.EACCES: "check the permissions of that path"}.get(exc.errno or 0)
            print(f"error: {exc.strerror or exc}{where}" + (f"\nhint: {hint}" if hint else ""), file=sys.stderr)
            raise Exit(code=1) from None

    return wrapper


def _number(option: str, value: Any, *, integer: bool = False, maximum: float | None = None) -> float | None:
    """An optional numeric option: None when not given, else positive (one message otherwise)."""
    if value is None:
        return None
    return positive_number(option, value, integer=integer, maximum=maximum)


def _config(jobs: Any = None, mirror: list[str] | None = None) -> Config:
    count = _number("--jobs", jobs, integer=True)
    config = Config.from_env(jobs=int(count) if count else None)
    if mirror:
        config = Config(**{**config.__dict__, "mirrors": tuple(mirror) + config.mirrors})
    return config


def _remainder(ctx: Any) -> list[str]:
    # invoke joins the words after `--` with spaces, losing their quoting; sys.argv still has them.
    if "--" in sys.argv:
        return sys.argv[sys.argv.index("--") + 1:]
    return shlex.split(ctx.remainder or "")


@task(name="list")
@cli
def list_(ctx):
    """List packages with their versions, flavors, dependencies and whether each is built."""
    config = _config()
    book = RecipeBook.load(config.recipes_dir)
    rows = [("package", "version", "flavors", "depends", "built")]
    for recipe in book.recipes.values():
        for version in recipe.versions:
            built = []
            variants = [(f, False) for f in [None, *recipe.flavors]] + ([(None, True)] if recipe.native else [])
            for flavor, native in variants:
                manifest = read_manifest(output_dir(config, recipe.resolve(version, flavor, native)))
                if manifest:
                    label = "native" if native else flavor or "default"
                    built.append(f"{label} ({manifest['built_at'][:10]})")
            rows.append((recipe.name, version, ", ".join(recipe.flavors) or "-",
                         ", ".join(recipe.depends) or "-", "; ".join(built) or "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@task(help={"install": "provision a toolchain if none is found",
            "from": "with --install: auto (the pinned WASI SDK, else Debian packages), sdk, or debian"})
@cli
def toolchain(ctx, install=False, from_="auto"):
    """Show the WASI toolchain that builds use (and why it was chosen); --install provisions one."""
    from wasmforge.toolchain import find_toolchain, install_toolchain
    config = _config()
    if install:
        tc = install_toolchain(config, source=from_, log=log)
        if from_ == "auto":
            tc = find_toolchain(config)
    else:
        tc = find_toolchain(config)
    print(tc.describe())


@task(name="host-packages", help={"missing": "only those not installed"})
@cli
def host_packages(ctx, missing=False):
    """Print the Debian packages builds need (the toolchain's pins and the recipes'), one per line."""
    from wasmforge.toolchain import deb_installed, host_packages
    config = _config()
    for name in host_packages(config, RecipeBook.load(config.recipes_dir)):
        if not (missing and deb_installed(name)):
            print(name)


@task(iterable=["mirror"], help={"mirror": "a directory or base URL to look in first (repeatable)"})
@cli
def fetch(ctx, target, mirror=None):
    """Fetch and verify a package's source (and its dependencies') without building."""
    from wasmforge.sources import fetch_sources
    config = _config(mirror=mirror)
    book = RecipeBook.load(config.recipes_dir)
    for t in book.build_order(book.parse_target(target)):
        package = book.package(t)
        fetched = fetch_sources(package.sources, config, log=log)
        print(f"{t}: {fetched.path} (sha256 {fetched.spec.sha256}, from {fetched.origin})")


@task(iterable=["mirror"], help={
    "flavor": "build a flavor of the package (see `invoke list`)",
    "native": "build for this machine with its own compiler (the reference for comparisons)",
    "jobs": "parallel compile jobs (default: the number of cores)",
    "force": "rebuild the target even if its output is up to date",
    "no-test": "skip the smoke tests",
    "mirror": "a directory or base URL to look in for sources first (repeatable)",
    "no-ccache": "do not compile through ccache (used by default when it is installed)",
    "debug": "keep debug information (DWARF, names) in the output modules",
    "explain": "build nothing: say for each package whether it is stored (a hit) and, if not, "
               "which inputs differ from the nearest stored build",
    "remote-cache": "a shared build cache on an OCI registry: oci://HOST[:PORT]/REPO (oci+http:// without TLS); "
                    "default $WASMFORGE_REMOTE_CACHE",
    "push-cache": "push what is built (or found locally) to the remote cache (default: on when CI is set)",
})
@cli
def build(ctx, target, flavor=None, jobs=None, force=False, no_test=False, mirror=None, native=False, explain=False,
          no_ccache=False, debug=False, remote_cache=None, push_cache=False):
    """Build a package and its dependencies, precompile its modules and run its smoke tests."""
    from wasmforge.pipeline import PackageOutcome, build_target
    from wasmforge.pipeline import explain as explain_build
    from wasmforge.remote_cache import RemoteCache
    from wasmforge.toolchain import find_toolchain, host_toolchain
    config = _config(jobs=jobs, mirror=mirror)
    # Options add to what the environment says (WASMFORGE_NO_CCACHE, WASMFORGE_REMOTE_CACHE, CI), never undo it.
    config = dataclasses.replace(config, use_ccache=config.use_ccache and not no_ccache, debug=config.debug or debug,
                                 remote_cache=remote_cache or config.remote_cache,
                                 push_cache=push_cache or config.push_cache)
    if config.remote_cache:
        RemoteCache.parse(config.remote_cache)  # a bad address is one message before anything is built
    book = RecipeBook.load(config.recipes_dir)
    t = book.parse_target(target, flavor)
    if native:
        t = dataclasses.replace(t, native=True)
    # A native target (--native or NAME-VERSION-native) is built with the build machine's compiler.
    tc = host_toolchain() if t.native else find_toolchain(config)
    if explain:
        print("\n".join(explain_build(book, t, config, tc)))
        return
    log(f"toolchain: {tc.kind} ({tc.clang_version}; {tc.libc})")
    summary: list[PackageOutcome] = []
    try:
        results = build_target(book, t, config, tc, log=log, force=force, run_tests=not no_test, summary=summary)
    finally:
        if len(summary) > 1 or any(not o.result for o in summary):
            log("summary:\n" + "\n".join(f"  {o.describe()}" for o in summary))
    final = results[-1]
    manifest = read_manifest(final.output) or {}
    print(f"{final.target}: {'up to date' if final.reused else 'built'} in {final.output}")
    for name, rel in manifest.get("programs", {}).items():
        size = manifest["outputs"][rel]["size"]
        hint = "" if t.native else f"  run: invoke run {final.target} --program {name} -- ARGS"
        print(f"  {rel}  ({size / 1024:.0f} KiB){hint}")


def _built(config: Config, book: RecipeBook, target: str, flavor: str | None = None, native: bool = False):
    """A finished build that a command is about to use, verified against its store entry's manifest."""
    t = book.parse_target(target, flavor)
    package = book.package(dataclasses.replace(t, native=True) if native else t)
    out, manifest = stored_output(config, package)
    return package, out, manifest


@task(help={"flavor": "test a flavor of the package",
            "runtime": "run them in another runtime: wasmtime (ours, the default), wasmtime-cli, wasmedge, wasmedge-aot, node "
                       "(see invoke runtimes)"})
@cli
def test(ctx, target, flavor=None, runtime="wasmtime"):
    """Run a built package's smoke tests again (in another runtime with --runtime)."""
    from wasmforge.runtime import Runner
    from wasmforge.smoke import run_smoke_tests
    config = _config()
    book = RecipeBook.load(config.recipes_dir)
    package, out, _ = _built(config, book, target, flavor)
    if runtime == "wasmtime":
        runner = Runner()
    else:
        from wasmforge.runtimes import CommandRunner, find_runtime
        runner = CommandRunner(find_runtime(config, runtime), config.cache_dir)
    outcomes = run_smoke_tests(package, out / "bin", runner, log=print)
    unsupported = [o for o in outcomes if o.unsupported]
    failed = [o for o in outcomes if not o.passed and not o.unsupported]
    print(f"{len(outcomes) - len(failed) - len(unsupported)} passed, {len(failed)} failed"
          + (f", {len(unsupported)} not supported by {runtime}" if unsupported else ""))
    if failed:
        raise Exit(code=1)


@task(help={"output": "the Markdown file the table is appended to (default: docs/runtimes.md)"})
@cli
def matrix_test(ctx, target, output="docs/runtimes.md"):
    """Run the smoke tests of every built flavor of a target in every runtime; append the table to docs/runtimes.md."""
    from wasmforge.matrix import matrix_test as run_matrix
    from wasmforge.matrix import render
    config = _config()
    book = RecipeBook.load(config.recipes_dir)
    parsed = book.parse_target(target)
    found, cells = run_matrix(book, parsed, config, log=print)
    if not any(c.outcomes for c in cells):
        raise WasmforgeError(f"no flavor of {parsed.name}-{parsed.version} is built",
                             hint=f"invoke build {parsed.name}-{parsed.version} (and --flavor F)")
    text = render(book.package(parsed), found, cells, f"invoke matrix-test {target}")
    path = Path(output) if Path(output).is_absolute() else Path(__file__).parent / output
    if not path.exists():
        path.write_text("# Which build runs where\n\nEach table: `invoke matrix-test <target>`, the recipe's smoke "
                        "tests of every built flavor in our runner and in every runtime `invoke runtimes` has "
                        "(n/a: a test the runtime cannot run as written; a failure gives the first one in the "
                        "runtime's own words).\n")
    with path.open("a") as handle:
        handle.write("\n" + text)
    print(text)
    print(f"appended to {path}")


@task(iterable=["dir", "env"], help={
    "dir": "GUEST:HOST directory to preopen, e.g. /data:./data; GUEST:HOST:ro read-only (repeatable)",
    "env": "K=V environment variable for the module (repeatable; the environment is empty otherwise)",
    "program": "which program of the package (default: its first output)",
    "timeout": "stop the module after this many seconds",
    "memory": "memory limit in MiB",
    "no-precompiled": "compile the module instead of using its precompiled form",
    "no-defaults": "leave out the recipe's defaults for the program (the build's data directories, environment)",
})
@cli
def run(ctx, target, dir=None, env=None, program=None, timeout=None, memory=None, no_precompiled=False,
        no_defaults=False):
    """Run a built program: invoke run lua-5.4.7 -- -e "print(1+1)"."""
    from wasmforge.outputs import built_target, run_defaults
    from wasmforge.run import parse_dir, parse_env, split_dirs, unless_given
    from wasmforge.runtime import Runner
    seconds = _number("--timeout", timeout, maximum=MAX_SECONDS)
    mib = _number("--memory", memory, integer=True, maximum=4096)  # wasm32 addresses 4 GiB
    config = _config()
    # A stored build named in full (as `invoke build` prints it) is found by its manifest, verified as
    # _built verifies it; anything else (no version, not built, unknown) is resolved through the recipes.
    if found := built_target(config, target):
        out, manifest = found
    else:
        package, out, manifest = _built(config, RecipeBook.load(config.recipes_dir), target)
        target = package.target
    programs = manifest.get("programs", {})
    name = program or next(iter(programs), None)
    if name not in programs:
        raise WasmforgeError(f"{target} has no program {name!r}",
                             hint=f"programs: {', '.join(programs) or 'none'}")
    dirs, readonly = split_dirs([parse_dir(spec) for spec in dir or []])
    variables = dict(parse_env(item) for item in env or [])
    if not no_defaults:
        # The recipe's `run:` defaults, as the build's manifest records them; what the user gives wins.
        usual_dirs, usual_env, _ = run_defaults(out, manifest, name)
        readonly += unless_given(usual_dirs, dirs + readonly)
        variables = {**usual_env, **variables}
    runner = Runner(use_precompiled=not no_precompiled)
    result = runner.run(out / programs[name], [name, *_remainder(ctx)], env=variables, dirs=dirs,
                        timeout=seconds, memory_limit=int(mib) * 1024 * 1024 if mib else None, capture=False,
                        readonly_dirs=readonly)
    if result.timed_out or result.trap:
        print(f"{name}: {result.describe()}", file=sys.stderr)
    raise Exit(code=result.status)


@task(help={"docroot": "the application's directory (its index.php is the front controller)",
            "host": "the address to listen on (default: 127.0.0.1)",
            "port": "the port (default: 8080; 0 picks a free one)",
            "workers": "how many requests run PHP at once (default: the number of cores)",
            "native": "serve with the native php-cgi of the same version, for comparison",
            "state": "the directory the application may write: /state in the module, tmp/ for sessions and "
                     "uploads (default: one per document root in the cache)",
            "timeout": "seconds a request may run PHP before it is answered with 504 (default: 30)",
            "memory": "MiB of memory each wasm request may use (default: 512; PHP's memory_limit is 128M)",
            "max-body": "MiB a request body may have; larger ones get 413 (default: 64)",
            "opcache": "keep compiled scripts in OPcache's file cache in the state directory (on by default: it "
                       "multiplies WordPress's requests per second, docs/benchmarks.md; --no-opcache turns it off)",
            "app": "an application of apps/ (wordpress): assembled from its pinned sources into the state "
                   "directory and installed there on the first start",
            "flavor": "serve a flavor of the package"})
@cli
def serve(ctx, target, docroot=None, app=None, host="127.0.0.1", port="8080", workers=None, native=False, state=None,
          timeout="30", memory="512", max_body="64", opcache=True, flavor=None):
    """Serve a PHP application over HTTP: invoke serve php-7.4.33 --docroot examples/php/guestbook, or --app wordpress."""
    import hashlib

    from wasmforge.serve import serve_php
    if bool(docroot) == bool(app):
        raise WasmforgeError("which application? give its directory with --docroot DIR, or --app NAME",
                             hint="invoke serve php-7.4.33 --docroot examples/php/guestbook; "
                                  "invoke serve php-7.4.33 --app wordpress")
    listen_port = 0 if str(port) == "0" else int(_number("--port", port, integer=True, maximum=65535) or 0)
    count = int(_number("--workers", workers, integer=True, maximum=64) or (os.cpu_count() or 2))
    config = _config()
    _, out, manifest = _built(config, RecipeBook.load(config.recipes_dir), target, flavor, native)
    writable: list[Path] = []
    when_listening = None
    if app:
        from wasmforge.apps import install, load_app, prepare_site
        application = load_app(config.apps_dir, app)
        where = (Path(state) if state else config.cache_dir / "serve" / app).resolve()
        root = prepare_site(application, config, where, log)
        writable = [root / rel for rel in application.site.get("writable", [])]

        def when_listening(url: str) -> None:
            try:
                if install(application, url, where, log):
                    steps = application.spec["install"]
                    log(f"{app} installed: log in at {url.rstrip('/')}{steps.get('login', '/')} as "
                        f"{steps.get('user')} with the password in {where / 'admin-password'}")
            except WasmforgeError as exc:
                log(f"error: {exc.render()}")
    else:
        root = Path(docroot).resolve()
        where = Path(state) if state else config.cache_dir / "serve" / (
            f"{root.name}-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}")
    serve_php(out, manifest, root, native=native, host=host, port=listen_port, workers=count, state=where,
              writable=writable, when_listening=when_listening, fixed_code=bool(app),
              timeout=float(_number("--timeout", timeout, maximum=MAX_SECONDS) or 30),
              memory_mib=int(_number("--memory", memory, integer=True, maximum=4096) or 512),
              max_body_mib=int(_number("--max-body", max_body, integer=True, maximum=2048) or 64), opcache=opcache,
              log=log)


@task(name="bench-serve", help={
    "seconds": "seconds of load per page and backend (default: 10)",
    "connections": "concurrent connections wrk keeps open (default: 4)",
    "workers": "PHP workers of the server (default: the number of cores)",
    "opcache": "with OPcache's file cache, as invoke serve by default (--no-opcache: without)",
    "app": "also an application's front page (apps/NAME.yaml: wordpress), installed afresh for each backend",
    "output": "the Markdown file the table is appended to (default: docs/benchmarks.md)"})
@cli
def bench_serve(ctx, target, seconds="10", connections="4", workers=None, opcache=True, app=None,
                output="docs/benchmarks.md"):
    """Requests/s and latency of pages served from php-cgi.wasm and the native php-cgi: invoke bench-serve php-7.4.33."""
    from wasmforge.serve_bench import render, run_serve_bench, wrk_version
    config = _config()
    book = RecipeBook.load(config.recipes_dir)
    _, out, manifest = _built(config, book, target)
    _, native_out, native_manifest = _built(config, book, target, native=True)
    duration = int(_number("--seconds", seconds, integer=True, maximum=600) or 10)
    clients = int(_number("--connections", connections, integer=True, maximum=256) or 4)
    count = int(_number("--workers", workers, integer=True, maximum=64) or (os.cpu_count() or 2))
    application = None
    if app:
        from wasmforge.apps import load_app
        application = load_app(config.apps_dir, app)
    rows = run_serve_bench((out, manifest), (native_out, native_manifest), Path(__file__).parent / "examples" / "php",
                           seconds=duration, connections=clients, workers=count, opcache=opcache, config=config,
                           log=log, app=application)
    command = "invoke bench-serve " + " ".join(sys.argv[sys.argv.index("bench-serve") + 1:])
    text = render(target, rows, command, duration, clients, count, opcache, wrk_version())
    print(text)
    report = Path(output)
    with report.open("a") as f:
        f.write("\n" + text)
    print(f"appended to {report}")


@task(help={"program": "which program of the package (default: its first output)",
            "width": "total width of the two columns (default: the terminal's)"})
@cli
def compare(ctx, target, script, program=None, width=0):
    """Run a script natively and in wasm, side by side: invoke compare php-7.4.33 examples/php/docroot/index.php."""
    from wasmforge.compare import run_native, run_wasm, side_by_side
    from wasmforge.outputs import run_defaults
    config = _config()
    book = RecipeBook.load(config.recipes_dir)
    package, out, manifest = _built(config, book, target)
    name = program or next(iter(manifest.get("programs", {})), None)
    if name not in manifest.get("programs", {}):
        raise WasmforgeError(f"{package.target} has no program {name!r}")
    _, native_dir, _ = _built(config, book, target, native=True)
    path = Path(script).resolve()
    if not path.is_file():
        raise WasmforgeError(f"no script at {path}")
    # The recipe says how the program takes a script (PHP: -f) and what it reads from its own build.
    usual_dirs, usual_env, before = run_defaults(out, manifest, name)
    left = run_native(native_dir / "bin" / name, [*before, str(path)])
    right = run_wasm(out / manifest["programs"][name], [*before, str(path)], dirs=[(str(path.parent), path.parent)],
                     readonly_dirs=usual_dirs, env=usual_env)
    print(side_by_side(left, right, width or shutil.get_terminal_size((160, 40)).columns))


@task(help={"jobs": "parallel test workers (default: the number of cores)",
            "output": "where to write the report (default: the recipe's conformance.report; a run of some "
                      "suites only: beside its logs, so that it does not replace the published report)",
            "from-logs": "rewrite the report from the last run's logs instead of running the tests"})
@cli
def conformance(ctx, target, jobs=None, output=None, from_logs=False):
    """Run upstream's own tests (the recipe's driver) on the wasm and native builds: invoke conformance php-7.4.33 [-- DIRS...]."""
    from wasmforge.conformance import render_report, report_path, results_from_logs, run_conformance
    from wasmforge.outputs import run_defaults
    config = _config(jobs=jobs)
    book = RecipeBook.load(config.recipes_dir)
    package, out, manifest = _built(config, book, target)
    spec = package.recipe.conformance
    if not spec:
        raise WasmforgeError(f"the recipe of {package.name} declares no conformance suite",
                             where=package.recipe.where(()),
                             hint="add conformance: {driver: php-run-tests, programs: {...}, suites: [...], report: ...}")
    programs: dict[str, str] = spec["programs"]
    _, native, _ = _built(config, book, target, native=True)
    chosen = _remainder(ctx)  # suites named after `--`: a run of those only
    dirs = chosen or package.conformance_suites()
    if from_logs:
        results = results_from_logs(package, config, dirs)
    else:
        results = run_conformance(package, config, wasm={r: out / manifest["programs"][p] for r, p in programs.items()},
                                  native={r: native / "bin" / p for r, p in programs.items()}, dirs=dirs,
                                  jobs=config.jobs, log=log,
                                  readonly_dirs={r: run_defaults(out, manifest, p)[0] for r, p in programs.items()})
    command = "invoke conformance " + target + (" -- " + " ".join(chosen) if chosen else "")
    report = report_path(package, config, Path(output) if output else None, subset=bool(chosen))
    report.parent.mkdir(parents=True, exist_ok=True)
    tree = config.outputs / ".conformance" / package.target / "src"
    report.write_text(render_report(package, results, command, tree))
    print(f"wrote {report}" + ("" if output or not chosen else
                               f" (some suites only: the full run writes {package.conformance_report()})"))


@task(help={"runs": "runs per start-up measurement (the median is reported; long workloads use at most 3)",
            "no-builds": "skip the build-time measurements (cold, no-change, touched patch)",
            "output": "the Markdown file the table is appended to",
            "peer": "also run the recipe's peer (another project's build, e.g. WordPress Playground's PHP under "
                    "Node.js) on the same workloads: a column of its own",
            "runtimes": "also run the start-up and the workloads in these runtimes (comma-separated: wasmedge, "
                        "wasmedge-aot, wasmtime-cli, node; see invoke runtimes): a column each"})
@cli
def bench(ctx, target, runs="21", no_builds=False, output="docs/benchmarks.md", peer=False, runtimes=""):
    """Measure build times, sizes, start-up and run time against the native build (and a peer); append to docs/benchmarks.md."""
    from wasmforge.bench import BENCH_HEADER, find_peer, render, run_bench
    from wasmforge.toolchain import find_toolchain
    config = _config()
    book = RecipeBook.load(config.recipes_dir)
    t = book.parse_target(target)
    tc = find_toolchain(config)
    command = "invoke bench " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("bench") + 1:])
    the_peer = find_peer(book.package(t), config, log) if peer else None
    others = {}
    if runtimes:
        from wasmforge.runtimes import CommandRunner, find_runtime
        for name in [n.strip() for n in runtimes.split(",") if n.strip()]:
            others[name] = CommandRunner(find_runtime(config, name), config.cache_dir, log=log)
    rows = run_bench(book, t, config, tc, runs=int(_number("--runs", runs, integer=True) or 21),
                     builds=not no_builds, log=log, peer=the_peer, others=others)
    text = render(t, rows, command, tc, the_peer, {n: r.runtime.version or "?" for n, r in others.items()})
    print(text)
    path = config.root / output
    if not path.exists():
        path.write_text(BENCH_HEADER)
    with path.open("a") as handle:
        handle.write("\n" + text)
    log(f"appended to {path}")


@task
@cli
def launcher(ctx):
    """Build wasmforge-run, the fastest way to start a built module from a shell (no Python), and print its path."""
    from wasmforge.run import build_launcher
    path = build_launcher(_config().cache_dir)
    print(path)
    log(f"usage: {path.name} [--dir GUEST:HOST]... [--env K=V]... build-output/<pkg>/<version>/bin/<program>.wasm [ARGS...]")


@task(help={"install": "provision the runtimes that can be (WasmEdge from Debian trixie's packages, wasmtime's CLI "
                       "from its pinned wheel) into the cache"})
@cli
def runtimes(ctx, install=False):
    """Show the WebAssembly runtimes besides our own (WasmEdge, wasmtime's CLI, Node.js's WASI): version, origin or why not."""
    from wasmforge.runtimes import runtimes as find_runtimes
    found = find_runtimes(_config(), install=install, log=log)
    width = max(len(r.name) for r in found)
    for runtime in found:
        state = runtime.version if runtime.available else "missing"
        print(f"{runtime.name:<{width}}  {state:<9}  {runtime.origin}")
    if install and not all(r.available for r in found):
        raise WasmforgeError("not every runtime could be provisioned (see above)")


@task(help={"flavor": "package a flavor of the package",
            "dist": "the directory to write to (default: dist/)",
            "sign-key": "an ed25519 private key (PEM) to sign the provenance with (a DSSE envelope)"})
@cli
def package(ctx, target, flavor=None, dist="dist", sign_key=None):
    """Package a finished build for release: dist/<pkg>-<version>[-<flavor>]-wasi.tar.gz, SBOMs, provenance, SHA256SUMS."""
    from wasmforge.release import describe_release, write_package
    from wasmforge.sbom import documents
    from wasmforge.toolchain import find_toolchain
    config = _config()
    book = RecipeBook.load(config.recipes_dir)
    release = describe_release(book, book.parse_target(target, flavor), config, find_toolchain(config), log=log)
    written = write_package(release, documents(release, Path(sign_key) if sign_key else None), Path(dist), log=log)
    for path in written:
        print(f"{path}  ({path.stat().st_size / 1024:.0f} KiB)")
    print(f"{Path(dist) / 'SHA256SUMS'}")


@task(help={"flavor": "the image of a flavor of the package",
            "dist": "where to write (default dist/; the layout goes to DIST/oci/<package>/)",
            "sign-key": "sign the provenance attached to the images with this ed25519 private key (PEM)"})
@cli
def image(ctx, target, flavor=None, dist="dist", sign_key=None):
    """Write OCI images of a finished build: runnable wasi/wasm images, CNCF wasm artifacts, SBOM referrers."""
    from wasmforge.oci import write_layout
    images, release = _images(target, flavor, sign_key)
    dest = write_layout(images, Path(dist) / "oci" / release.name.removesuffix("-wasi"))
    print(f"{dest}  (OCI image layout)")
    for tagged in images.manifests:
        if tagged.ref:
            print(f"  {tagged.ref:<16} {tagged.manifest.digest}")


@task(help={"registry": "HOST[:PORT]/REPO to push to",
            "flavor": "publish a flavor of the package",
            "tag": "the tag of the main program's image (default: the version[-flavor]); the others get TAG-<name>",
            "insecure": "talk plain HTTP (a local registry without TLS)",
            "force": "replace tags that exist with other content",
            "mount-from": "a repository of the same registry to mount blobs from instead of uploading them",
            "sign-key": "sign the provenance with this ed25519 private key (PEM)"})
@cli
def publish(ctx, target, registry, flavor=None, tag=None, insecure=False, force=False, mount_from=None,
            sign_key=None):
    """Push a finished build's images, wasm artifacts, SBOMs, provenance and release files to an OCI registry."""
    from wasmforge.oci import publish as push
    from wasmforge.registry import Registry, Repository, check_tag
    repo = Repository.parse(registry, insecure=insecure)  # a bad address is refused before any work
    if tag:
        check_tag(tag)
    images, release = _images(target, flavor, sign_key)
    main = next(iter(release.programs))
    version = release.main.version + (f"-{release.main.flavor}" if release.main.flavor else "")
    client = Registry(repo, log=log)
    pushed = push(images, client, tag or version, main, force=force, mount_from=mount_from, log=log)
    for name, digest in pushed.items():
        print(f"{repo}:{name}  {digest}")
    print(f"sent {client.uploaded / 1048576:.1f} MiB" + (f", mounted {client.mounted} blobs" if client.mounted else ""))


def _images(target, flavor, sign_key):
    from wasmforge.oci import image_set
    from wasmforge.release import describe_release, package_tarball
    from wasmforge.sbom import documents
    from wasmforge.toolchain import find_toolchain
    config = _config()
    book = RecipeBook.load(config.recipes_dir)
    release = describe_release(book, book.parse_target(target, flavor), config, find_toolchain(config), log=log)
    docs = documents(release, Path(sign_key) if sign_key else None)
    return image_set(release, docs, package_tarball(release, docs), config.root), release


@task(help={"key": "the ed25519 public key (PEM) the provenance must be signed with",
            "rebuild": "also rebuild each package from its recorded inputs and compare the modules"})
@cli
def verify(ctx, path, key=None, rebuild=False):
    """Verify packages: SHA256SUMS, SBOMs and provenance against the files, the signature, optionally a rebuild."""
    from wasmforge.verify import VerifyError, verify_dist
    report = verify_dist(Path(path), Path(key) if key else None)
    for line in report.checked:
        print(f"ok: {line}")
    if rebuild:
        from wasmforge.repro import rebuild_package
        from wasmforge.toolchain import find_toolchain
        config = _config()
        book = RecipeBook.load(config.recipes_dir)
        tc = find_toolchain(config)
        problems = []
        for manifest in report.packages:
            files = {p: r["sha256"] for p, r in manifest["files"].items()}
            found = rebuild_package(book, manifest, files, config, tc, log=log)
            problems += found
            if not found:
                print(f"ok: {manifest['target']}: rebuilt from nothing, its modules are identical")
        if problems:
            raise VerifyError(f"{path}: the rebuild does not reproduce the package",
                              details="\n".join(f"  - {p}" for p in problems))


@task(name="verify-repro", help={"flavor": "check a flavor of the package",
                                 "keep": "keep both builds (in build-output/.repro/) even when they are identical"})
@cli
def verify_repro(ctx, target, flavor=None, keep=False):
    """Build a target twice from nothing (another directory, umask, TZ, locale) and compare every output byte."""
    from wasmforge.repro import verify_repro as check
    from wasmforge.toolchain import find_toolchain
    config = _config()
    book = RecipeBook.load(config.recipes_dir)
    result = check(book, book.parse_target(target, flavor), config, find_toolchain(config), log=log, keep=keep)
    print("\n".join(result.report()))
    if not result.identical:
        raise WasmforgeError(f"{result.target} is not reproducible: {len(result.differences)} file(s) differ",
                             hint=f"diffoscope's report: {result.diffoscope}" if result.diffoscope
                             else "install diffoscope for a report of what differs")
    print(f"{result.target}: reproducible (two builds from nothing are bit-identical)")


@task(help={"package": "only this package (repeatable)"}, iterable=["package"])
@cli
def matrix(ctx, package=None):
    """Print the build matrix (package, version, flavor, target) as JSON for CI systems."""
    import json
    config = _config()
    book = RecipeBook.load(config.recipes_dir)
    unknown = [p for p in package or [] if p not in book.recipes]
    if unknown:
        raise WasmforgeError(f"no recipe for {', '.join(unknown)}", hint=f"recipes: {', '.join(book.recipes)}")
    include = []
    for recipe in book.recipes.values():
        if package and recipe.name not in package:
            continue
        for version in recipe.versions:
            for flavor in [None, *recipe.flavors]:
                include.append({"package": recipe.name, "version": version, "flavor": flavor or "",
                                "target": f"{recipe.name}-{version}",
                                "name": recipe.resolve(version, flavor).target})
    print(json.dumps({"include": include}))
