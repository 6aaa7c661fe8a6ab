"""Which build runs where: every built flavor of a target, its smoke tests in every available runtime.

`invoke matrix-test <target>` writes the table into docs/runtimes.md: per flavor and runtime, the
tests passed, failed and not supported, and for a runtime that fails, the first failure as the
runtime reported it (so the reason is the runtime's own words, not our guess).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from .config import Config
from .errors import WasmforgeError
from .outputs import stored_output
from .recipe import Package, RecipeBook, Target
from .runtime import Runner
from .runtimes import CommandRunner, Runtime, runtimes
from .smoke import TestOutcome, run_smoke_tests

Log = Callable[[str], None]
OURS = "wasmtime"


@dataclass(frozen=True)
class Cell:
    """One flavor in one runtime."""

    flavor: str
    runtime: str
    outcomes: tuple[TestOutcome, ...] = ()
    absent: str = ""  # why nothing ran (the flavor is not built, the runtime is missing)

    def passed(self) -> int:
        return sum(o.passed for o in self.outcomes)

    def failed(self) -> list[TestOutcome]:
        return [o for o in self.outcomes if not o.passed and not o.unsupported]

    def unsupported(self) -> list[TestOutcome]:
        return [o for o in self.outcomes if o.unsupported]

    def text(self) -> str:
        if self.absent:
            return f"– ({self.absent})"
        failed, unsupported = self.failed(), self.unsupported()
        # Nothing failed and nothing ran: the runtime cannot run this build at all, which is not a failure.
        verdict = "**fail**" if failed else "**pass**" if self.passed() else "**n/a**"
        parts = [f"{verdict} {self.passed()}/{len(self.outcomes)}"]
        if unsupported:
            parts.append(f"{len(unsupported)} n/a ({_short(unsupported[0].unsupported or '')})")
        if failed:
            parts.append(f"first failure: {failed[0].name}: {_short(failed[0].problems[0] if failed[0].problems else '')}")
        return "; ".join(parts)


def _short(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    return (line if len(line) <= limit else line[: limit - 1] + "…").replace("|", "/")


def matrix_test(book: RecipeBook, target: Target, config: Config, *, log: Log = print) -> tuple[list[Runtime], list[Cell]]:
    """Run the smoke tests of every built flavor of `target` in our runner and every runtime there is."""
    recipe = book[target.name]
    flavors = [None, *recipe.flavors]
    found = runtimes(config, log=log)
    labels = [OURS, *(r.name for r in found)]
    cells = []
    for flavor in flavors:
        name = flavor or "default"
        try:
            package = book.package(Target(target.name, target.version, flavor))
        except WasmforgeError as exc:
            cells += [Cell(name, label, absent=exc.what) for label in labels]
            continue
        try:
            out, _ = stored_output(config, package)
        except WasmforgeError:
            cells += [Cell(name, label, absent=f"not built: invoke build {package.target}") for label in labels]
            continue
        for runtime in [None, *found]:
            label = runtime.name if runtime else OURS
            if runtime is not None and not runtime.available:
                cells.append(Cell(name, label, absent=runtime.origin))
                continue
            log(f"{package.target} in {label}:")
            runner = CommandRunner(runtime, config.cache_dir, log=log) if runtime else Runner()
            outcomes = run_smoke_tests(package, out / "bin", runner, log=log)
            cells.append(Cell(name, label, tuple(outcomes)))
    return found, cells


def render(package: Package, found: list[Runtime], cells: list[Cell], command: str) -> str:
    names = [OURS, *(r.name for r in found)]
    flavors = list(dict.fromkeys(c.flavor for c in cells))
    by_key = {(c.flavor, c.runtime): c for c in cells}
    versions = "; ".join(f"{r.name} {r.version}" for r in found if r.available)
    lines = [f"## {package.name}-{package.version}: its smoke tests in each runtime", "",
             f"Run on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} with `{command}` "
             f"({OURS}: our runner, the wasmtime library of the Python package; {versions}).", "",
             "| flavor | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for flavor in flavors:
        lines.append(f"| {flavor} | " + " | ".join(by_key[flavor, n].text() if (flavor, n) in by_key else "–"
                                                  for n in names) + " |")
    return "\n".join(lines) + "\n"
