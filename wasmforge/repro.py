"""Bit-identical rebuilds: `invoke verify-repro` and `invoke verify --rebuild`.

A target is built twice from nothing (an empty store, no ccache, smoke tests skipped): the second
time in another directory with another umask, time zone and locale. Then every output file of every
package of the build is compared byte for byte. One difference is expected and mapped before the
comparison: a library installs for its store entry (see store.py), so its pkg-config and libtool
files name that directory (and their dependencies' entries); those are compared with the store's
path replaced by a placeholder.
Modules and libraries themselves must be identical. A difference names the files and the first
differing offset, and `diffoscope` (when installed) says more.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .outputs import read_manifest
from .pipeline import BuildResult, build_target
from .recipe import RecipeBook, Target
from .store import STORE_PLACEHOLDER
from .toolchain import Toolchain

Log = Callable[[str], None]
# The second build's conditions differ from the first's in every way that must not matter.
SECOND_UMASK = 0o027
SECOND_ENV = {"TZ": "Pacific/Chatham", "LANG": "fr_FR.UTF-8", "LC_ALL": "fr_FR.UTF-8"}


@dataclass(frozen=True)
class Difference:
    package: str
    path: str
    what: str  # "only in the first build", "differs at offset N (sizes a and b)", ...


@dataclass(frozen=True)
class ReproResult:
    target: str
    compared: dict[str, int]  # package -> number of files compared
    differences: tuple[Difference, ...]
    kept: Path | None  # the two trees, kept for inspection when they differ
    diffoscope: Path | None = None

    @property
    def identical(self) -> bool:
        return not self.differences

    def report(self) -> list[str]:
        """What `invoke verify-repro` prints: per package, the files compared and those that differ."""
        lines = []
        for name, count in self.compared.items():
            bad = [d for d in self.differences if d.package == name]
            lines.append(f"{name}: {count} files compared, " + ("identical" if not bad else f"{len(bad)} differ"))
            lines += [f"  {d.path}: {d.what}" for d in bad]
        if self.kept:
            lines.append(f"both builds are kept in {self.kept}")
        return lines


def fresh_build(book: RecipeBook, target: Target, config: Config, toolchain: Toolchain, root: Path,
                log: Log) -> list[BuildResult]:
    """Build `target` and its dependencies from nothing under `root`: empty store, no ccache."""
    cfg = dataclasses.replace(config, output_dir=root / "build-output", store_dir=root / "store", use_ccache=False)
    return build_target(book, target, cfg, toolchain, log=log, run_tests=False)


@contextmanager
def other_conditions() -> Iterator[None]:
    """Another umask, time zone and locale for the second build (restored afterwards)."""
    saved = {k: os.environ.get(k) for k in SECOND_ENV}
    old_umask = os.umask(SECOND_UMASK)
    os.environ.update(SECOND_ENV)
    try:
        yield
    finally:
        os.umask(old_umask)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def verify_repro(book: RecipeBook, target: Target, config: Config, toolchain: Toolchain, *,
                 log: Log = print, keep: bool = False) -> ReproResult:
    base = config.outputs / ".repro" / str(target)
    if base.exists():
        shutil.rmtree(base)
    first_root = base / "first"
    # Another directory, of another length: paths that leak show up as differences.
    second_root = base / "second-build-in-another-directory"
    log(f"verify-repro {target}: first build in {first_root}")
    first = fresh_build(book, target, config, toolchain, first_root, log)
    log(f"verify-repro {target}: second build in {second_root} (umask {SECOND_UMASK:03o}, "
        + ", ".join(f"{k}={v}" for k, v in SECOND_ENV.items()) + ")")
    with other_conditions():
        second = fresh_build(book, target, config, toolchain, second_root, log)
    differences: list[Difference] = []
    compared: dict[str, int] = {}
    for a, b in zip(first, second, strict=True):
        found, count = compare_entries(a, b)
        differences += found
        compared[a.target] = count
    diffoscope = None
    if differences and shutil.which("diffoscope"):
        diffoscope = run_diffoscope(first, second, differences, base, log)
    identical = not differences
    if identical and not keep:
        shutil.rmtree(base, ignore_errors=True)
    return ReproResult(str(target), compared, tuple(differences), None if identical and not keep else base,
                       diffoscope)


def compare_entries(a: BuildResult, b: BuildResult) -> tuple[list[Difference], int]:
    """Compare two builds of one package file by file (their manifests' outputs; logs differ by nature)."""
    ma, mb = read_manifest(a.prefix) or {}, read_manifest(b.prefix) or {}
    fa, fb = ma.get("outputs", {}), mb.get("outputs", {})
    la, lb = ma.get("links", {}), mb.get("links", {})
    found: list[Difference] = []
    for rel in sorted(set(fa) | set(fb)):
        if rel not in fb:
            found.append(Difference(a.target, rel, "only in the first build"))
        elif rel not in fa:
            found.append(Difference(a.target, rel, "only in the second build"))
        elif fa[rel]["sha256"] != fb[rel]["sha256"]:
            da, db = (a.prefix / rel).read_bytes(), (b.prefix / rel).read_bytes()
            # A file that names store entries (its own or a dependency's: pkg-config, libtool files) is
            # compared with the store's directory mapped.
            store_a, store_b = bytes(a.prefix.parent.parent), bytes(b.prefix.parent.parent)
            if da.replace(store_a, STORE_PLACEHOLDER) == db.replace(store_b, STORE_PLACEHOLDER):
                continue
            found.append(Difference(a.target, rel, f"differs at offset {first_difference(da, db)} "
                                                   f"(sizes {len(da)} and {len(db)})"))
    for rel in sorted(set(la) | set(lb)):
        if la.get(rel) != lb.get(rel):
            found.append(Difference(a.target, rel, f"link targets differ: {la.get(rel)!r} and {lb.get(rel)!r}"))
    return found, len(set(fa) | set(la))


def first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    step = 1 << 16
    for start in range(0, n, step):
        if a[start:start + step] != b[start:start + step]:
            return next(i for i in range(start, min(start + step, n)) if a[i] != b[i])
    return n


def run_diffoscope(first: list[BuildResult], second: list[BuildResult], differences: list[Difference], base: Path,
                   log: Log) -> Path:
    report = base / "diffoscope.txt"
    prefixes = {a.target: (a.prefix, b.prefix) for a, b in zip(first, second, strict=True)}
    with report.open("w") as out:
        for d in differences[:20]:
            if d.package not in prefixes or not d.what.startswith("differs"):
                continue
            pa, pb = prefixes[d.package]
            out.write(f"==== {d.package}: {d.path}\n")
            out.flush()
            try:
                subprocess.run(["diffoscope", "--text", "-", str(pa / d.path), str(pb / d.path)], stdout=out,
                               stderr=subprocess.STDOUT, timeout=600, check=False)
            except subprocess.TimeoutExpired:
                out.write("(diffoscope took more than 10 minutes; stopped)\n")
    log(f"diffoscope's report: {report}")
    return report


def rebuild_package(book: RecipeBook, manifest: dict[str, Any], files: dict[str, str], config: Config,
                    toolchain: Toolchain, *, log: Log = print) -> list[str]:
    """`invoke verify --rebuild`: build a package's target from nothing and compare its modules with the
    package's (`files`: path -> sha256). Returns the problems (none: the package is reproduced)."""
    from .pipeline import plan
    target = book.parse_target(str(manifest.get("target", "")))
    planned = plan(book, target, config, toolchain)
    if planned[-1].key != manifest.get("build_key"):
        return [f"{target}: this checkout describes another build (key {planned[-1].key[:12]}, the package was "
                f"built as {str(manifest.get('build_key'))[:12]}): check out the commit it was made from, with the "
                "same toolchain (see its provenance)"]
    root = config.outputs / ".verify-rebuild" / str(target)
    if root.exists():
        shutil.rmtree(root)
    log(f"rebuilding {target} from nothing in {root}")
    results = fresh_build(book, target, config, toolchain, root, log)
    rebuilt = read_manifest(results[-1].prefix) or {}
    problems = []
    for rel in sorted(p for p in files if p.startswith("bin/") and p.endswith(".wasm")):
        record = rebuilt.get("outputs", {}).get(rel)
        if record is None:
            problems.append(f"{target}: the rebuild has no {rel}")
        elif record["sha256"] != files[rel]:
            problems.append(f"{target}: {rel} rebuilt differs (sha256 {record['sha256']}, packaged {files[rel]})")
    if not problems:
        shutil.rmtree(root, ignore_errors=True)
    return problems
