"""Run a recipe's smoke tests against built modules and say exactly what differed."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .outputs import directory_of_build
from .recipe import NO_RUN_DEFAULTS, Expect, Package, RunDefaults, SmokeTest
from .run import unless_given
from .runtime import Runner, RunResult


class Unsupported(Exception):
    """A run that a runtime cannot give as a test asks (a feature it lacks): reported, never a pass."""

SCRATCH = "/scratch"
Log = Callable[[str], None]


@dataclass(frozen=True)
class TestOutcome:
    name: str
    passed: bool
    duration: float
    where: str
    problems: tuple[str, ...] = ()
    # Why the runtime could not run the test as written (a feature it lacks): neither a pass nor a failure.
    unsupported: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "passed": self.passed, "seconds": round(self.duration, 3),
                "problems": list(self.problems), **({"unsupported": self.unsupported} if self.unsupported else {})}


def run_smoke_tests(package: Package, bin_dir: Path, runner: Runner, *, log: Log = print) -> list[TestOutcome]:
    # What a runtime must make of the modules before running them (WasmEdge's AOT forms), made for all
    # the tests' programs at once rather than one by one as the tests reach them.
    runner.prepare(sorted({bin_dir / f"{step.run[0]}.wasm" for test in package.tests for step in test.steps}))
    outcomes = []
    for test in package.tests:
        outcome = run_smoke_test(test, bin_dir, runner, package.recipe.run)
        if outcome.unsupported:
            log(f"  n/a  {test.name}: {outcome.unsupported}")
            outcomes.append(outcome)
            continue
        mark = "ok  " if outcome.passed else "FAIL"
        log(f"  {mark} {test.name} ({outcome.duration:.2f} s)")
        for problem in outcome.problems:
            log("       " + problem.replace("\n", "\n       "))
        outcomes.append(outcome)
    return outcomes


def run_smoke_test(test: SmokeTest, bin_dir: Path, runner: Runner,
                   defaults: Mapping[str, RunDefaults] | None = None) -> TestOutcome:
    """Run `test` against the modules in `bin_dir`; each program starts with the recipe's `run:`
    defaults (`defaults`) unless the test says `defaults: false`, and the test's own dirs and env on top."""
    problems: list[str] = []
    total = 0.0
    with tempfile.TemporaryDirectory(prefix="wasmforge-smoke-") as tmp:
        scratch = Path(tmp)
        for name, content in test.scratch:
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            (scratch / name).write_text(content)
        dirs = [(SCRATCH, scratch)] + [(g, h) for g, h in test.dirs]
        # bin_dir is <install>/bin: the build's own directories are beside it, read-only (a stored
        # build must not change under a test).
        build = bin_dir.parent
        resolved = [(g, rel, directory_of_build(build, rel)) for g, rel in test.build_dirs]
        own = [(g, host) for g, _, host in resolved if host is not None]
        problems += [f"build:{rel} is not a directory inside the build {build}" for _, rel, host in resolved
                     if host is None]
        for index, step in enumerate([] if problems else test.steps):
            label = f"step {index + 1} `{' '.join(step.run)}`" if len(test.steps) > 1 else f"`{' '.join(step.run)}`"
            usual = (defaults or {}).get(step.run[0], NO_RUN_DEFAULTS) if test.defaults else NO_RUN_DEFAULTS
            # A default directory that this build does not install (a flavor without the data), or
            # that a link takes outside the build, is left out.
            usual_dirs = unless_given([(g, host) for g, rel in usual.build_dirs
                                       if (host := directory_of_build(build, rel)) is not None], dirs + own)
            try:
                result = runner.run(bin_dir / f"{step.run[0]}.wasm", list(step.run),
                                    env={**dict(usual.env), **dict(test.env)}, dirs=dirs, readonly_dirs=own + usual_dirs,
                                    stdin=step.stdin.encode() if step.stdin is not None else None,
                                    timeout=test.timeout)
            except Unsupported as exc:
                return TestOutcome(test.name, False, total, test.where, (), unsupported=str(exc))
            total += result.duration
            problems += _check_step(label, step.exit, step.stdout, step.stderr, result)
            if problems:
                break
        if not problems:
            for name, expect in test.files:
                path = scratch / name
                if not path.exists():
                    problems.append(f"file {SCRATCH}/{name}: expected to exist, it does not")
                elif not expect.matches(path.read_text(errors="replace")):
                    problems.append(f"file {SCRATCH}/{name}: expected {expect.describe()}, "
                                    f"got {_show(path.read_text(errors='replace'))}")
    return TestOutcome(test.name, not problems, total, test.where, tuple(problems))


def _check_step(label: str, exit_code: int, stdout: Expect | None, stderr: Expect | None,
                result: RunResult) -> list[str]:
    problems = []
    out = result.stdout.decode(errors="replace")
    err = result.stderr.decode(errors="replace")
    if result.timed_out or result.trap or result.exit_code != exit_code:
        problems.append(f"{label}: expected exit code {exit_code}, got {result.describe()}")
    if stdout is not None and not stdout.matches(out):
        problems.append(f"{label}: expected stdout {stdout.describe()}\n  actual stdout: {_show(out)}")
    if stderr is not None and not stderr.matches(err):
        problems.append(f"{label}: expected stderr {stderr.describe()}\n  actual stderr: {_show(err)}")
    if problems and err and stderr is None:
        problems.append(f"  stderr was: {_show(err)}")
    return problems


def _show(text: str, limit: int = 400) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
