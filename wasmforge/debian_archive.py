"""Debian's package archive as a source of upstream tarballs and of toolchain packages.

Debian keeps many upstream tarballs byte for byte (`<srcpkg>_<version>.orig.tar.*`), and newer
suites carry packages (trixie's wasi-libc) that the host's suite lacks. We use apt itself, with a
scratch configuration in our cache that copies the archive address from the system's own apt
sources, so no host name is written anywhere. apt only tells us *what* to download (`--print-uris`
lists URL, size and sha256); the download itself goes through our own verified downloader.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError

SYSTEM_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
SYSTEM_SOURCES_LIST = Path("/etc/apt/sources.list")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# deb-src for the suites whose tarballs recipes use; binary packages only from trixie (wasi-libc).
SOURCE_SUITES = ("bullseye", "bookworm", "trixie")
BINARY_SUITES = ("trixie",)
LISTS_MAX_AGE = 24 * 3600

_URI_LINE = re.compile(r"^'(?P<url>[^']+)' (?P<name>\S+) (?P<size>\d+) SHA256:(?P<sha>[0-9a-f]{64})", re.M)


@dataclass(frozen=True)
class RemoteFile:
    url: str
    name: str
    size: int
    sha256: str


def _archive_uri() -> str:
    """The main archive's URI, as the system's apt configuration names it."""
    if SYSTEM_SOURCES.exists():
        for block in SYSTEM_SOURCES.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", block, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", block, re.M)
            if uris and suites and "security" not in uris.group(1) and "-security" not in suites.group(1):
                return uris.group(1)
    if SYSTEM_SOURCES_LIST.exists():
        for line in SYSTEM_SOURCES_LIST.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] in ("deb", "deb-src") and "security" not in parts[1]:
                return parts[1].split("]")[-1] if parts[1].startswith("[") else parts[1]
    raise SourceError("no Debian archive is configured on this machine",
                      hint=f"the Debian source-archive fallback needs apt with {SYSTEM_SOURCES}")


class DebianArchive:
    """A scratch apt state under `state_dir`; lists are refreshed at most once a day."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def _options(self) -> list[str]:
        d = self.state_dir
        return [
            "-o", "Dir::Etc::SourceList=/dev/null",
            "-o", f"Dir::Etc::SourceParts={d / 'sources.list.d'}",
            "-o", f"Dir::State::Lists={d / 'lists'}",
            "-o", f"Dir::Cache={d / 'cache'}",
            "-o", "APT::Sandbox::User=root",
            "-o", "Debug::NoLocking=1",
            "-q",
        ]

    def _apt(self, *args: str) -> subprocess.CompletedProcess[str]:
        if not shutil.which("apt-get"):
            raise SourceError("apt-get is not available, so Debian's archive cannot be used")
        return subprocess.run(["apt-get", *self._options(), *args], capture_output=True, text=True)

    def ensure_lists(self) -> None:
        stamp = self.state_dir / "updated"
        if stamp.exists() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE:
            return
        uri = _archive_uri()
        parts = self.state_dir / "sources.list.d"
        for sub in ("sources.list.d", "lists/partial", "cache/archives/partial"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        blocks = []
        for suite in SOURCE_SUITES:
            types = "deb deb-src" if suite in BINARY_SUITES else "deb-src"
            blocks.append(f"Types: {types}\nURIs: {uri}\nSuites: {suite}\nComponents: main\nSigned-By: {KEYRING}\n")
        (parts / "wasmforge.sources").write_text("\n".join(blocks))
        result = self._apt("update")
        if result.returncode != 0:
            raise SourceError("could not read Debian's archive index (apt-get update failed)",
                              details=_tail(result.stderr or result.stdout))
        stamp.touch()

    def source_files(self, package: str, suite: str) -> list[RemoteFile]:
        self.ensure_lists()
        result = self._apt("source", "--print-uris", f"{package}/{suite}")
        files = [RemoteFile(m["url"], m["name"], int(m["size"]), m["sha"]) for m in _URI_LINE.finditer(result.stdout)]
        if result.returncode != 0 or not files:
            raise SourceError(f"Debian has no source package {package} in {suite}",
                              details=_tail(result.stderr))
        return files

    def binary_file(self, package: str, suite: str, version: str | None = None) -> RemoteFile:
        """The newest `package` of `suite`, or exactly `version` of it (binaries come from one suite)."""
        self.ensure_lists()
        result = self._apt("download", "--print-uris", f"{package}={version}" if version else f"{package}/{suite}")
        files = [RemoteFile(m["url"], m["name"], int(m["size"]), m["sha"]) for m in _URI_LINE.finditer(result.stdout)]
        if result.returncode != 0 or not files:
            what = f"{package} {version}" if version else package
            raise SourceError(f"Debian has no package {what} in {suite}", details=_tail(result.stderr),
                              hint="the archive keeps only the current version of each package: if a newer one "
                                   "replaced it, the app's recipe must be updated" if version else None)
        return files[0]


def _tail(text: str, lines: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
