"""`invoke conformance`: upstream's own test suite, run by the driver the recipe names (its
`conformance:` section), in wasm and natively, so the report shows what the wasm build loses
against a native build of the same version.

Drivers (DRIVERS here; recipe.CONFORMANCE_DRIVERS names them and their programs for recipes):
- php-run-tests: the native reference PHP drives run-tests.php. The tested executable is a small
  wrapper that runs the wasm CLI in wasmtime (with wasmforge-run, see run.py) with the source tree
  preopened at its own path (run-tests writes each test's script next to its .phpt) plus /tmp, and
  passes on run-tests' environment, stdin and exit status; the CGI program likewise.
- python-regrtest: CPython's own `python -m test`, one module per process (WASI has no
  subprocesses for its workers), each writing a JUnit XML report of its tests; the wasm python
  runs with its standard library preopened read-only as `invoke run` gives it and a scratch /tmp.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from xml.etree import ElementTree

from .config import Config
from .errors import WasmforgeError
from .recipe import Package
from .run import build_launcher, launcher_options
from .sources import extract_archive, fetch_sources

Log = Callable[[str], None]
DIRECTORY_TIMEOUT = 2400  # seconds for one run-tests invocation
# run-tests' parallel mode can stop making progress when a worker dies (its master then spins):
# with no new output for this long (more than one test's timeout), the run is stopped.
STALL_TIMEOUT = 360
# run-tests prints progress and results on the same line when its output is not a terminal.
_RESULT = re.compile(r"\b(?P<kind>PASS|FAIL|SKIP|XFAIL|BORK|WARN|LEAK|XLEAK) .*?\[(?P<file>[^\]\[]+\.phpt)\]")
# PHP 8's run-tests colours its results ("\x1b[1;32mPASS\x1b[0m ...") even into a log file.
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")

WRAPPER = """#!/bin/sh
# Written by wasmforge: run {wasm} in wasmtime as if it were a native php binary, through
# wasmforge-run (no Python per test). php.wasm starts in $PWD (patches/php/7.4/0012): the
# directory run-tests runs it from.
PWD=$(pwd)
export PWD
exec {launcher} --inherit-env --timeout {timeout} --dir {tree}:{tree} --dir /tmp:/tmp{data} {wasm} "$@"
"""


@dataclass
class Counts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    other: int = 0
    failures: list[str] | None = None
    passes: list[str] | None = None
    # Tests of the directory that run-tests never reported (it hung, or was stopped).
    missing: int = 0
    # Why a test did not pass, where the report says (a skip's reason, a failure's exception), and
    # why a whole module ran no test (skipped at import, a trap): for the report's causes.
    reasons: dict[str, str] | None = None
    note: str = ""

    @property
    def run(self) -> int:
        return self.passed + self.failed


def prepare_tree(package: Package, config: Config, log: Log) -> Path:
    """A pristine source tree for the tests, extracted afresh for every run: tests leave files and
    directories behind when they fail, and those make the next run's tests fail (natively too)."""
    tree = config.outputs / ".conformance" / package.target / "src"
    fetched = fetch_sources(package.sources, config, log=log)
    if tree.exists():
        shutil.rmtree(tree)
    extract_archive(fetched.path, tree)
    return tree


def write_wrapper(tree: Path, wasm: Path, config: Config, timeout: float = 300,
                  readonly_dirs: list[tuple[str, Path]] | None = None) -> Path:
    """An executable for the test runner that runs `wasm` as if it were native; `readonly_dirs` are the
    build's data directories (e.g. ICU's data)."""
    name = wasm.name.removesuffix(".wasm")
    path = tree.parent / f"{name}-wasm"
    launcher = build_launcher(config.cache_dir)
    data = "".join(f" {shlex.quote(a)}" for a in launcher_options(readonly_dirs or []))
    path.write_text(WRAPPER.format(launcher=shlex.quote(str(launcher)), tree=shlex.quote(str(tree)),
                                   wasm=shlex.quote(str(wasm)), timeout=timeout, data=data))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def run_directory(driver: Path, tested: Path, cgi: Path, tree: Path, directory: str, jobs: int,
                  log_file: Path) -> Counts:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env.update({"TEST_PHP_EXECUTABLE": str(tested), "TEST_PHP_CGI_EXECUTABLE": str(cgi), "NO_INTERACTION": "1", "SKIP_IO_CAPTURE_TESTS": "1",
                "SKIP_SLOW_TESTS": "1", "SKIP_ONLINE_TESTS": "1", "REPORT_EXIT_STATUS": "0"})
    cmd = [str(driver), "-n", "run-tests.php", "-q", "--offline", f"-j{jobs}", "-p", str(tested), directory]
    with log_file.open("w") as out:
        # run-tests' parallel mode can hang when its workers die; results so far are kept.
        process = subprocess.Popen(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        started = last_change = time.monotonic()
        size = -1
        while process.poll() is None:
            time.sleep(5)
            now = time.monotonic()
            if log_file.stat().st_size != size:
                size, last_change = log_file.stat().st_size, now
            if now - last_change > STALL_TIMEOUT or now - started > DIRECTORY_TIMEOUT:
                process.kill()
                process.wait()
    return read_results(log_file, tree, directory)


def plain_log(text: str) -> str:
    """A run-tests log without its colour codes."""
    return _COLOUR.sub("", text)


def read_results(log_file: Path, tree: Path, directory: str) -> Counts:
    """Counts of one run-tests log; tests of the directory it never reported count as missing."""
    counts = Counts(failures=[], passes=[])
    for m in _RESULT.finditer(plain_log(log_file.read_text(errors="replace"))):
        kind = m.group("kind")
        if kind == "PASS":
            counts.passed += 1
            counts.passes.append(m.group("file"))
        elif kind in ("FAIL", "BORK", "LEAK"):
            counts.failed += 1
            counts.failures.append(m.group("file"))
        elif kind == "SKIP":
            counts.skipped += 1
        else:
            counts.other += 1
    total = sum(1 for _ in (tree / directory).rglob("*.phpt"))
    counts.missing = max(0, total - counts.passed - counts.failed - counts.skipped - counts.other)
    return counts


def run_conformance(package: Package, config: Config, *, wasm: Mapping[str, Path], native: Mapping[str, Path],
                    dirs: list[str], jobs: int, log: Log = print,
                    readonly_dirs: Mapping[str, list[tuple[str, Path]]] | None = None,
                    ) -> dict[str, tuple[Counts, Counts]]:
    """The recipe's driver over `dirs`, natively and in wasm. `wasm` and `native` map each of the
    driver's roles to a program; `readonly_dirs` maps a role to the build's directories its program
    reads by default (the recipe's `run:`, as the manifest records them)."""
    for role, path in wasm.items():
        if not path.is_file():
            raise WasmforgeError(f"no wasm build of {role} at {path}", hint=f"invoke build {package.target}")
    for role, path in native.items():
        if not path.is_file():
            raise WasmforgeError(f"no native build of {role} at {path}", hint=f"invoke build {package.target} --native")
    driver = DRIVERS[package.recipe.conformance["driver"]]
    return driver.run(package, config, wasm=wasm, native=native, dirs=dirs, jobs=jobs, log=log,
                      readonly_dirs=readonly_dirs or {})


def _php_run_tests(package: Package, config: Config, *, wasm: Mapping[str, Path], native: Mapping[str, Path],
                   dirs: list[str], jobs: int, log: Log, readonly_dirs: Mapping[str, list[tuple[str, Path]]],
                   ) -> dict[str, tuple[Counts, Counts]]:
    tree = prepare_tree(package, config, log)
    wrapper = write_wrapper(tree, wasm["cli"], config, readonly_dirs=readonly_dirs.get("cli"))
    cgi_wrapper = write_wrapper(tree, wasm["cgi"], config, readonly_dirs=readonly_dirs.get("cgi"))
    logs = tree.parent / "logs"
    logs.mkdir(exist_ok=True)
    results: dict[str, tuple[Counts, Counts]] = {}
    for directory in dirs:
        if not (tree / directory).is_dir():
            raise WasmforgeError(f"no test directory {directory} in {tree}")
        slug = directory.replace("/", "_")
        start = time.perf_counter()
        # Native first: the wasm run's .diff/.out files then stay in the tree for inspection.
        native_counts = run_directory(native["cli"], native["cli"], native["cgi"], tree, directory, jobs,
                                      logs / f"{slug}.native.log")
        wasm_counts = run_directory(native["cli"], wrapper, cgi_wrapper, tree, directory, jobs,
                                    logs / f"{slug}.wasm.log")
        log(_suite_line(directory, wasm_counts, native_counts, time.perf_counter() - start))
        results[directory] = (wasm_counts, native_counts)
    return results


def _suite_line(suite: str, wasm: Counts, native: Counts, seconds: float) -> str:
    """The progress line of one suite's run, for every driver."""
    return (f"{suite}: wasm {wasm.passed} passed / {wasm.failed} failed / {wasm.skipped} skipped; "
            f"native {native.passed} / {native.failed} / {native.skipped} ({seconds:.0f} s)")


# One module's tests may run this long (seconds) before the process is stopped.
MODULE_TIMEOUT = 1200
# A JUnit report larger than this is not read (it is our tested program's output: not trusted).
MAX_REPORT_BYTES = 64 << 20


def _python_regrtest(package: Package, config: Config, *, wasm: Mapping[str, Path], native: Mapping[str, Path],
                     dirs: list[str], jobs: int, log: Log, readonly_dirs: Mapping[str, list[tuple[str, Path]]],
                     ) -> dict[str, tuple[Counts, Counts]]:
    del jobs  # one process at a time: each module's run is one wasm instance without workers
    root = config.outputs / ".conformance" / package.target
    logs = root / "logs"
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir(parents=True)
    launcher = build_launcher(config.cache_dir)
    results: dict[str, tuple[Counts, Counts]] = {}
    for module in dirs:
        start = time.perf_counter()
        counts = []
        for kind in ("native", "wasm"):
            scratch = root / "tmp" / kind
            if scratch.exists():
                shutil.rmtree(scratch)
            scratch.mkdir(parents=True)
            report = scratch / "junit.xml"
            if kind == "native":
                cmd = [str(native["interpreter"]), "-m", "test", "--junit-xml", str(report), module]
                env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(scratch), "TMPDIR": str(scratch),
                       "LANG": "C.UTF-8"}
            else:
                # TMPDIR one level below the preopen: os.makedirs() of a preopened directory itself
                # asks whether "/" exists, which WASI denies (nothing is preopened there).
                (scratch / "work").mkdir()
                cmd = [str(launcher), "--timeout", str(MODULE_TIMEOUT), "--dir", f"/tmp:{scratch}",
                       "--env", "TMPDIR=/tmp/work", "--env", "HOME=/tmp", "--env", "LANG=C.UTF-8"]
                cmd += launcher_options(readonly_dirs.get("interpreter", []))
                cmd += [str(wasm["interpreter"]), "-m", "test", "--junit-xml", "/tmp/junit.xml", module]
                env = {"PATH": os.environ.get("PATH", os.defpath)}
            log_file = logs / f"{module.replace('/', '_')}.{kind}.log"
            with log_file.open("w") as out:
                try:
                    subprocess.run(cmd, cwd=scratch, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, timeout=MODULE_TIMEOUT + 60)
                except subprocess.TimeoutExpired:
                    out.write(f"\nwasmforge: stopped after {MODULE_TIMEOUT + 60} s\n")
            if report.is_file():
                shutil.copyfile(report, log_file.with_suffix(".xml"))
            counts.append(_read_regrtest_run(log_file))
            shutil.rmtree(scratch, ignore_errors=True)
        native_counts, wasm_counts = counts
        log(_suite_line(module, wasm_counts, native_counts, time.perf_counter() - start))
        results[module] = (wasm_counts, native_counts)
    return results


def _read_regrtest_run(log_file: Path) -> Counts:
    """The counts of one module's run (its report beside its log), and why it ran no test, if so."""
    counts = read_junit(log_file.with_suffix(".xml"))
    if counts.passed + counts.failed == 0 and log_file.is_file():
        with log_file.open(errors="replace") as handle:
            text = handle.read(MAX_REPORT_BYTES)
        if found := re.search(r"^\S+ skipped -- (.+)$", text, re.M):  # the module's own words: names matter
            counts.note = f"the module is skipped: {found.group(1).strip()[:100]}"
        elif "call stack exhausted" in text:
            counts.note = "the module stopped: wasm call stack exhausted"
        elif found := re.search(r"wasm trap: (.+)$", text, re.M):
            counts.note = f"the module stopped: wasm trap: {_short(found.group(1))}"
        elif "killed by the timeout" in text or "wasmforge: stopped after" in text:
            counts.note = "the module stopped: the runner's timeout"
    return counts


def _short(text: str) -> str:
    """A reason as a group name: quoted names (temporary files, values) left out, one line, bounded."""
    text = re.sub(r"'[^'\n]*'|\"[^\"\n]*\"", "'…'", text.strip().splitlines()[0] if text.strip() else "")
    return text if len(text) <= 100 else text[:99] + "…"


def read_junit(path: Path) -> Counts:
    """Counts of one regrtest --junit-xml report; no report (the process died) counts nothing."""
    counts = Counts(failures=[], passes=[], reasons={})
    if not path.is_file() or path.stat().st_size > MAX_REPORT_BYTES:
        return counts
    text = path.read_text(errors="replace")
    if "<!DOCTYPE" in text or "<!ENTITY" in text:  # regrtest writes none: entities are not expanded here
        return counts
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError:
        return counts
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        children = {child.tag: child for child in case}
        if "skipped" in children:
            counts.skipped += 1
            counts.reasons[name] = f"skipped: {_short(children['skipped'].text or '')}"
        elif {"failure", "error"} & children.keys() or case.get("status") is None:
            # No result recorded: a subtest failed (regrtest records only whole tests' results).
            counts.failed += 1
            counts.failures.append(name)
            problem = children.get("error", children.get("failure"))
            counts.reasons[name] = ("failed: " + _short(problem.get("message") or problem.get("type") or "")
                                    if problem is not None else "failed: a subtest failed")
        elif {"output", "outcome"} & children.keys():  # an expected failure, an unexpected success
            counts.other += 1
        else:
            counts.passed += 1
            counts.passes.append(name)
    return counts


# First match wins: (cause, pattern in the wasm run's actual output of a failed test).
CAUSES = (
    ("trap in wasm (e.g. indirect call signature mismatch)", re.compile(r"wasm trap|trapped:")),
    ("killed by the runner's timeout", re.compile(r"killed by the timeout")),
    ("Fibers (WebAssembly cannot switch C stacks; patches/php/8.2/0014)",
     re.compile(r"Fibers are not available on WASI")),
    ("processes (exec, shell_exec, proc_open, popen, mail)",
     re.compile(r"Unable to (execute|fork)|proc_open|shell_exec|popen|sendmail|Cannot execute", re.I)),
    ("sockets and name resolution",
     re.compile(r"getaddrinfo|php_network_getaddresses|socket|fsockopen|Name or service|gethostby", re.I)),
    ("function not implemented (ENOSYS)", re.compile(r"Function not implemented|not supported", re.I)),
    ("file permissions, owners, links", re.compile(r"chmod|chown|chgrp|fileperms|Permission denied|symlink|link\(",
                                                   re.I)),
    ("paths outside the preopened directories (relative paths, /, cwd)",
     re.compile(r"No such file or directory|failed to open|getcwd|Capabilities insufficient", re.I)),
)


def failure_cause(output: str) -> str:
    for cause, pattern in CAUSES:
        if pattern.search(output):
            return cause
    return "other (output differs)"


def classify_failures(tree: Path, tests: list[str]) -> dict[str, list[str]]:
    """Group failed tests by the likely cause, read from each test's .out file."""
    groups: dict[str, list[str]] = {}
    for test in tests:
        out = tree / test.replace(".phpt", ".out")
        text = out.read_text(errors="replace") if out.exists() else ""
        groups.setdefault(failure_cause(text), []).append(test)
    return groups


def report_path(package: Package, config: Config, output: Path | None, subset: bool) -> Path:
    """Where a run's report goes: --output if given; the recipe's report (a file of this checkout,
    wherever invoke was started) for a run of every suite; for a run of some suites only, a file beside
    the logs, because its table would replace the published one with those suites' rows."""
    if output is not None:
        return output
    if subset:
        return config.outputs / ".conformance" / package.target / "report-subset.md"
    return config.root / package.conformance_report()


def results_from_logs(package: Package, config: Config, dirs: list[str]) -> dict[str, tuple[Counts, Counts]]:
    """Re-read the logs of the last run (to rewrite the report without running the tests again)."""
    root = config.outputs / ".conformance" / package.target
    driver = DRIVERS[package.recipe.conformance["driver"]]
    results = {suite: counts for suite in dirs if (counts := driver.read_logs(root, suite)) is not None}
    if not results:
        raise WasmforgeError(f"no conformance logs in {root / 'logs'}",
                             hint=f"run them first: invoke conformance {package.target}")
    return results


def wasm_rate(wasm: Counts, native: Counts) -> float | None:
    """Share of the tests that pass natively which also pass in wasm (a wasm skip counts as lost)."""
    if not native.passes:
        return None
    return len(set(native.passes) & set(wasm.passes or [])) / len(set(native.passes))


MAX_CAUSES = 30


def lost_causes(results: dict[str, tuple[Counts, Counts]]) -> list[tuple[str, int]]:
    """(cause, tests) of the tests that pass natively and not in wasm, most first, where the wasm run
    says why (drivers whose reports give reasons); [] when none does."""
    counts: dict[str, int] = {}
    for w, n in results.values():
        if w.reasons is None:
            continue
        for test in set(n.passes or []) - set(w.passes or []):
            cause = w.reasons.get(test) or w.note or "not run in wasm (the module stopped before it)"
            counts[cause] = counts.get(cause, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def render_report(package: Package, results: dict[str, tuple[Counts, Counts]], command: str,
                  tree: Path | None = None) -> str:
    driver = DRIVERS[package.recipe.conformance["driver"]]
    lines = [
        f"# {driver.title} against the wasm build ({package.target})",
        "",
        f"Run on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} with `{command}`: {driver.method} "
        "Percentages: of the tests that pass natively, the share that also passes in wasm.",
        "",
        f"| {driver.unit} | wasm pass | wasm fail | wasm skip | native pass | native fail | native skip | "
        "native passes kept in wasm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    incomplete = []
    for directory, (w, n) in results.items():
        rate = wasm_rate(w, n)
        lines.append(f"| `{directory}` | {w.passed} | {w.failed} | {w.skipped} | {n.passed} | {n.failed} | "
                     f"{n.skipped} | {'-' if rate is None else f'{rate:.1%}'} |")
        for label, c in (("wasm", w), ("native", n)):
            if c.missing:
                incomplete.append(f"`{directory}` ({label}): {c.missing} tests not reported")
    kept = sum(len(set(n.passes or []) & set(w.passes or [])) for w, n in results.values())
    native_passes = sum(len(set(n.passes or [])) for _, n in results.values())
    if native_passes:
        lines += ["", f"All {len(results)} {driver.unit}s together: {kept:,} of the {native_passes:,} tests that pass "
                      f"natively pass in wasm (**{kept / native_passes:.1%}**)."]
    if incomplete:
        lines += ["", "Tests that run-tests did not report (files it does not collect; where wasm has more, run-tests'",
                  "parallel mode hung near the end of the directory and was stopped): " + "; ".join(incomplete)
                  + ". They count as neither passed nor failed."]
    lost_all = sorted({f for w, n in results.values() for f in set(w.failures or []) & set(n.passes or [])})
    if tree is not None and lost_all and driver.classify is not None:
        lines += ["", "## Why tests that pass natively fail in wasm", "",
                  "Classified from each failed test's actual output (first matching cause):", "",
                  "| cause | tests |", "|---|---:|"]
        groups = driver.classify(tree, lost_all)
        for cause, tests in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"| {cause} | {len(tests)} |")
    elif causes := lost_causes(results):
        lines += ["", "## Why tests that pass natively do not pass in wasm", "",
                  "From the wasm run's report: a skip's reason, a failure's exception, or why the module ran no "
                  "test (quoted names left out):", "", "| cause | tests |", "|---|---:|"]
        for cause, count in causes[:MAX_CAUSES]:
            lines.append(f"| {cause.replace('|', '/')} | {count} |")
        if len(causes) > MAX_CAUSES:
            lines.append(f"| {len(causes) - MAX_CAUSES} other causes | {sum(c for _, c in causes[MAX_CAUSES:])} |")
    lines += ["", "Tests that pass natively but do not pass in wasm (failed, or skipped because a feature is",
              f"missing), per {driver.unit}:", ""]
    for directory, (w, n) in results.items():
        lost = sorted(set(n.passes or []) - set(w.passes or []))
        lines.append(f"<details><summary><code>{directory}</code>: {len(lost)}</summary>\n")
        lines += [f"- `{f}`" for f in lost] or ["- none"]
        lines.append("\n</details>\n")
    return "\n".join(lines) + "\n"


def _suite_logs(root: Path, suite: str) -> tuple[Path, Path] | None:
    """The wasm and native logs of a suite's last run, if it has both."""
    wasm, native = (root / "logs" / f"{suite.replace('/', '_')}.{kind}.log" for kind in ("wasm", "native"))
    return (wasm, native) if wasm.exists() and native.exists() else None


def _read_run_tests_logs(root: Path, suite: str) -> tuple[Counts, Counts] | None:
    if (logs := _suite_logs(root, suite)) is None:
        return None
    return read_results(logs[0], root / "src", suite), read_results(logs[1], root / "src", suite)


def _read_regrtest_logs(root: Path, suite: str) -> tuple[Counts, Counts] | None:
    if (logs := _suite_logs(root, suite)) is None:
        return None
    return _read_regrtest_run(logs[0]), _read_regrtest_run(logs[1])


@dataclass(frozen=True)
class Driver:
    """How one kind of upstream test suite is run, read back from its logs, and described."""

    run: Callable[..., dict[str, tuple[Counts, Counts]]]
    read_logs: Callable[[Path, str], tuple[Counts, Counts] | None]  # (.conformance/<target>, suite)
    title: str
    unit: str  # what a suite is: a directory of tests, a test module
    method: str  # how the run was made, for the report
    # Why failed tests failed, from their output in the source tree; None: not classified.
    classify: Callable[[Path, list[str]], dict[str, list[str]]] | None = None


DRIVERS: Mapping[str, Driver] = {
    "php-run-tests": Driver(
        run=_php_run_tests, read_logs=_read_run_tests_logs, title="PHP's own tests", unit="directory",
        classify=classify_failures,
        method="PHP's `run-tests.php` driven by the native reference build; the tested executable is php.wasm in "
               "wasmtime with the source tree and /tmp preopened, the build's data directories read-only as "
               "`invoke run` gives them (ICU's data for intl), and `PWD` set to run-tests' directory (php-cgi.wasm "
               "likewise for CGI tests); the same directories run again with the native build as the tested "
               "executable. Slow, online and I/O-capture tests are skipped (SKIP_SLOW_TESTS, --offline)."),
    "python-regrtest": Driver(
        run=_python_regrtest, read_logs=_read_regrtest_logs, title="CPython's own tests", unit="module",
        method="CPython's `python -m test` (regrtest), one test module per process, each writing a JUnit XML "
               "report: python.wasm in wasmtime (through wasmforge-run) with its standard library preopened "
               "read-only as `invoke run` gives it and an empty scratch directory as /tmp, then the native "
               "build of the same recipe the same way. No resources are enabled (`-u`: no network, no large "
               "memory tests); a test whose subtests failed counts as failed."),
}
