"""`invoke verify`: check what `invoke package` wrote, as a downstream user would receive it.

SHA256SUMS must list every file of dist/ with its digest; each tarball must be well formed (plain
files and directories under one top directory) and its manifest, both SBOMs and its provenance must
describe exactly the files it holds; the loose SBOMs and provenance beside it must be the ones inside;
a signed provenance must verify with the key given. Every problem is collected and named; any
problem is a failure.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import WasmforgeError
from .sbom import (
    SignatureError,
    check_signature,
    cyclonedx_package_files,
    read_provenance,
    spdx_package_files,
)

SUMS = "SHA256SUMS"
MAX_PACKAGE_BYTES = 4 << 30
MAX_MEMBERS = 10_000
SUM_LINE = re.compile(r"^([0-9a-f]{64}) [ *]([^/\0]+)$")


class VerifyError(WasmforgeError):
    """A package or dist directory that does not verify."""


@dataclass
class Report:
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    packages: list[dict[str, Any]] = field(default_factory=list)  # each verified package's manifest


def verify_dist(path: Path, key: Path | None = None) -> Report:
    """Verify a dist directory (every file) or one tarball in it; raise VerifyError naming every problem."""
    report = Report()
    if path.is_dir():
        dist, tarballs = path, sorted(p for p in path.glob("*.tar.gz") if not p.name.startswith("."))
        if not tarballs:
            raise VerifyError(f"no package (*.tar.gz) in {dist}", hint="write one with: invoke package TARGET")
    elif path.is_file() and path.name.endswith(".tar.gz"):
        dist, tarballs = path.parent, [path]
    else:
        raise VerifyError(f"{path} is neither a dist directory nor a package (.tar.gz)",
                          hint="give dist/ or dist/<package>.tar.gz")
    _check_sums(dist, [p.name for p in tarballs] if not path.is_dir() else None, report)
    for tarball in tarballs:
        _check_package(tarball, key, report)
    if report.problems:
        raise VerifyError(f"{path} does not verify: {len(report.problems)} problem(s)",
                          details="\n".join(f"  - {p}" for p in report.problems),
                          hint="do not use these files; package them again from a verified build")
    return report


def _check_sums(dist: Path, only: list[str] | None, report: Report) -> None:
    sums = dist / SUMS
    if not sums.is_file():
        report.problems.append(f"{sums} is missing")
        return
    listed: dict[str, str] = {}
    for number, line in enumerate(sums.read_text(errors="replace").splitlines(), 1):
        match = SUM_LINE.match(line)
        if not match or match.group(2) in (".", ".."):
            report.problems.append(f"{SUMS} line {number} is not '<sha256>  <file name>': {line[:80]!r}")
            continue
        listed[match.group(2)] = match.group(1)
    present = {p.name for p in dist.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != SUMS}
    wanted = set(listed) if only is None else {n for n in listed if any(n.startswith(o[:-7]) for o in only)}
    if only is not None:
        wanted |= set(only)
    for name in sorted(wanted):
        if name not in listed:
            report.problems.append(f"{name} is not listed in {SUMS}")
            continue
        file = dist / name
        if name not in present:
            report.problems.append(f"{name} is listed in {SUMS} but missing")
            continue
        actual = hashlib.sha256(file.read_bytes()).hexdigest()
        if actual != listed[name]:
            report.problems.append(f"{name} does not match {SUMS} (sha256 {actual}, listed {listed[name]}): "
                                   "it was changed or damaged")
    if only is None:
        for name in sorted(present - set(listed)):
            report.problems.append(f"{name} is in {dist} but not listed in {SUMS}")
    report.checked.append(f"{SUMS}: {len(wanted)} file(s) checked")


def read_tarball(tarball: Path) -> tuple[str, dict[str, bytes]]:
    """The files of a package tarball (top directory stripped); anything but plain files and
    directories under one top directory is refused."""
    top = tarball.name.removesuffix(".tar.gz")
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise VerifyError(f"{tarball.name} has more than {MAX_MEMBERS} members")
                name = member.name
                parts = name.split("/")
                if parts[0] != top or any(p in ("", ".", "..") for p in parts[1:]) or name.startswith("/"):
                    raise VerifyError(f"{tarball.name}: member {name!r} is not inside {top}/")
                if member.isdir():
                    continue
                if not member.isreg():
                    raise VerifyError(f"{tarball.name}: member {name!r} is not a plain file (a link or device)")
                total += member.size
                if total > MAX_PACKAGE_BYTES:
                    raise VerifyError(f"{tarball.name} unpacks to more than {MAX_PACKAGE_BYTES >> 30} GiB")
                handle = tar.extractfile(member)
                rel = "/".join(parts[1:])
                if handle is None or rel in files:
                    raise VerifyError(f"{tarball.name}: member {name!r} is unreadable or repeated")
                files[rel] = handle.read()
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise VerifyError(f"{tarball.name} is not a readable .tar.gz: {exc}", where=str(tarball)) from None
    return top, files


def _check_package(tarball: Path, key: Path | None, report: Report) -> None:
    try:
        top, files = read_tarball(tarball)
    except VerifyError as exc:
        report.problems.append(exc.what)
        return
    docs = {"manifest": "manifest.json", "spdx": f"{top}.spdx.json", "cdx": f"{top}.cdx.json",
            "provenance": f"{top}.intoto.jsonl"}
    missing = [name for name in docs.values() if name not in files]
    if missing:
        report.problems.append(f"{tarball.name} lacks {', '.join(missing)}")
        return
    content = {p: hashlib.sha256(d).hexdigest() for p, d in files.items()
               if p not in (docs["spdx"], docs["cdx"], docs["provenance"])}
    described: dict[str, dict[str, str]] = {}
    try:
        manifest = json.loads(files[docs["manifest"]])
        listing = {p: r["sha256"] for p, r in manifest["files"].items()}
        listing[docs["manifest"]] = content[docs["manifest"]]  # a manifest cannot list its own digest
        described[docs["manifest"]] = listing
        described[docs["spdx"]] = spdx_package_files(json.loads(files[docs["spdx"]]))
        described[docs["cdx"]] = cyclonedx_package_files(json.loads(files[docs["cdx"]]))
        statement, envelope = read_provenance(files[docs["provenance"]])
        described[docs["provenance"]] = {s["name"]: s["digest"]["sha256"] for s in statement.get("subject", [])}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        report.problems.append(f"{tarball.name}: a manifest, SBOM or provenance is malformed ({type(exc).__name__}: {exc})")
        return
    for doc, listed in described.items():
        for path in sorted(set(content) | set(listed)):
            if path not in listed:
                report.problems.append(f"{tarball.name}: {path} is in the package but not in {doc}")
            elif path not in content:
                report.problems.append(f"{tarball.name}: {doc} lists {path}, which is not in the package")
            elif listed[path] != content[path]:
                report.problems.append(f"{tarball.name}: {path} does not match its sha256 in {doc} "
                                       "(the file or the document was changed)")
    for name in (docs["spdx"], docs["cdx"], docs["provenance"]):
        loose = tarball.parent / name
        if not loose.is_file():
            report.problems.append(f"{name} is missing beside {tarball.name}")
        elif loose.read_bytes() != files[name]:
            report.problems.append(f"{name} beside {tarball.name} differs from the one inside it")
    if envelope is not None and key is not None:
        try:
            if problem := check_signature(envelope, key):
                report.problems.append(f"{docs['provenance']}: {problem}")
            else:
                report.checked.append(f"{docs['provenance']}: signature verified with {key}")
        except (SignatureError, ValueError) as exc:
            report.problems.append(f"{docs['provenance']}: {exc}")
    elif envelope is not None:
        report.checked.append(f"{docs['provenance']}: signed, signature not checked (give --key PUBLIC_KEY)")
    elif key is not None:
        report.problems.append(f"{docs['provenance']} is not signed, but a key was given")
    report.checked.append(f"{tarball.name}: {len(content)} files match the manifest, SPDX, CycloneDX and provenance")
    report.packages.append(manifest)
