"""Apply a recipe version's patch series into a fresh tree, strictly.

GNU patch runs with --fuzz=0: a hunk whose context does not match exactly fails (an offset, i.e. the
same context a few lines away, is accepted and logged). Any failed hunk stops the build with the
patch file, the file it patches and the hunk (with the patch line where that hunk starts). The
caller throws the tree away, so a half-patched tree is never reused.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import PatchError, RecipeError
from .extract import links_leaving

_PATCHING = re.compile(r"^(?:patching|checking) file (?:'(?P<q>[^']+)'|(?P<f>\S+))")
_FAILED = re.compile(r"^Hunk #(\d+) FAILED at (\d+)")
_OFFSET = re.compile(r"^Hunk #(\d+) succeeded at (\d+) \(offset (-?\d+) lines?\)")


@dataclass(frozen=True)
class Patch:
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name


def patch_series(patches_dir: Path, package: str, series: str | None, *, where: str) -> list[Patch]:
    if series is None:
        return []
    directory = patches_dir / package / series
    if not directory.is_dir():
        raise RecipeError(f"patch series {series!r} not found: no directory {directory}", where=where,
                          hint=f"create {directory}/0001-what-it-does.patch or fix the version's 'patches' key")
    patches = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") and path.is_file():
            continue  # an editor's swap or backup file
        if not path.name.endswith(".patch") or not path.is_file() or path.is_symlink():
            raise PatchError(f"{path.name} in the patch series {series!r} is not a patch file",
                             where=str(path),
                             hint="a series directory holds only NNNN-title.patch files; move other files elsewhere")
        data = path.read_bytes()
        if not any(line.startswith(b"@@") for line in data.splitlines()):
            raise PatchError(f"patch {path.name} is empty (it has no hunk)", where=str(path),
                             hint="remove the file, or write the change it is meant to make")
        patches.append(Patch(path, hashlib.sha256(data).hexdigest()))
    return patches


def apply_series(tree: Path, patches: list[Patch], log_file: Path) -> None:
    if patches and not shutil.which("patch"):
        raise PatchError("GNU patch is not installed", hint="install it: apt-get install patch")
    with log_file.open("a") as log:
        for patch in patches:
            result = subprocess.run(
                ["patch", "-p1", "--forward", "--fuzz=0", "--batch", "--no-backup-if-mismatch",
                 "--reject-file=-", "-d", str(tree), "-i", str(patch.path)],
                capture_output=True, text=True,
            )
            log.write(f"$ patch -p1 --fuzz=0 < {patch.path}\n{result.stdout}{result.stderr}\n")
            if result.returncode != 0:
                raise _failure(patch, result.stdout + result.stderr, log_file)
    # A git-style patch can create symbolic links: none may lead out of the tree (GNU patch does not
    # write through links, so checking once after the series is enough).
    if patches and (escaping := links_leaving(tree)):
        raise PatchError("the patch series leaves links that point outside the source tree",
                         where=str(patches[0].path.parent), details="\n".join(escaping[:10]),
                         hint="the tree was discarded; a patch must not link outside the source")


def _failure(patch: Patch, output: str, log_file: Path) -> PatchError:
    current = None
    failures: list[str] = []
    for line in output.splitlines():
        if m := _PATCHING.match(line):
            current = m.group("q") or m.group("f")
        elif m := _FAILED.match(line):
            hunk, at = int(m.group(1)), int(m.group(2))
            patch_line = _hunk_line(patch.path, current, hunk)
            failures.append(f"{patch.path}:{patch_line}: hunk #{hunk} for {current} does not apply "
                            f"(expected near line {at})")
        elif "Reversed (or previously applied) patch detected" in line:
            failures.append(f"{patch.path}: {current} already looks patched (reversed or applied twice)")
        elif "can't find file to patch" in line or "No file to patch" in line:
            failures.append(f"{patch.path}: the file it patches does not exist in the source tree")
    if not failures:
        failures.append(output.strip().splitlines()[-1] if output.strip() else "patch failed")
    return PatchError(
        f"patch {patch.name} does not apply cleanly",
        where=str(patch.path),
        details="\n".join(failures) + f"\nfull output: {log_file}",
        hint="refresh the patch against this version's source (no fuzz is accepted); the tree was discarded",
    )


def _hunk_line(patch_file: Path, target: str | None, hunk: int) -> int:
    """Line number in the patch file where hunk `hunk` of the diff for `target` starts."""
    in_target = False
    count = 0
    for number, line in enumerate(patch_file.read_text(errors="replace").splitlines(), 1):
        if line.startswith("+++ "):
            path = line[4:].split("\t")[0].strip()
            in_target = target is not None and (path == target or path.split("/", 1)[-1] == target)
            count = 0
        elif in_target and line.startswith("@@"):
            count += 1
            if count == hunk:
                return number
    return 1
