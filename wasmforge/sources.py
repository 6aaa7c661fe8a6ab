"""Fetch source files, verify their sha256, keep them in a content-addressed cache, extract safely.

Look-up order for one pinned file (Spack's chain): the cache, each mirror, the upstream URL, then
Debian's source archive when the recipe names a Debian source package. A recipe may list
alternative files (each with its own sha256) for when the upstream file is unreachable, such as
Debian's repacked tarballs. Nothing unverified ever enters the cache: downloads go to a temporary
file in the cache directory and are renamed into place only after the checksum matched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import requests

from .config import Config
from .debian_archive import DebianArchive
from .errors import SourceError
from .recipe import SourceSpec

Log = Callable[[str], None]
CHUNK = 1 << 16
USER_AGENT = "wasmforge (+source fetcher)"


@dataclass(frozen=True)
class FetchedSource:
    path: Path
    spec: SourceSpec
    origin: str  # where the bytes came from this time: cache, mirror, url or debian


class _Miss(Exception):
    """One place in the chain did not have the file; the chain goes on."""


def cache_path(config: Config, sha256: str, filename: str) -> Path:
    return config.source_cache / sha256[:2] / sha256 / filename


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sources(specs: Sequence[SourceSpec], config: Config, *, log: Log = print,
                  progress: bool = True) -> FetchedSource:
    """Return the first of `specs` that can be had, verified, from the cache or elsewhere."""
    tried: list[str] = []
    for spec in specs:
        try:
            return _try_spec(spec, config, log=log, progress=progress, tried=tried)
        except _Miss:
            continue
    primary = specs[0]
    raise SourceError(
        f"could not fetch {primary.file_name()} (sha256 {primary.sha256})",
        details="tried:\n" + "\n".join(f"  - {t}" for t in tried),
        hint=(f"download {primary.url or primary.file_name()} yourself, check its sha256, put it in a "
              f"directory and run with WASMFORGE_MIRRORS=/that/directory (or --mirror /that/directory)"),
    )


def fetch_one(spec: SourceSpec, config: Config, *, log: Log = print, progress: bool = True) -> FetchedSource:
    return fetch_sources([spec], config, log=log, progress=progress)


def _try_spec(spec: SourceSpec, config: Config, *, log: Log, progress: bool, tried: list[str]) -> FetchedSource:
    name = spec.file_name()
    cached = cache_path(config, spec.sha256, name)
    if cached.exists():
        return FetchedSource(cached, spec, "cache")
    for mirror in config.mirrors:
        try:
            if "://" in mirror:
                _download(f"{mirror.rstrip('/')}/{name}", spec.sha256, cached, log=log, progress=progress)
            else:
                _copy_verified(Path(mirror) / name, spec.sha256, cached)
            log(f"fetched {name} from mirror {mirror}")
            return FetchedSource(cached, spec, f"mirror {mirror}")
        except _Miss as miss:
            tried.append(f"mirror {mirror}: {miss}")
    if spec.url:
        try:
            _download(spec.url, spec.sha256, cached, log=log, progress=progress)
            return FetchedSource(cached, spec, spec.url)
        except _Miss as miss:
            tried.append(f"{spec.url}: {miss}")
    if spec.debian and config.use_debian_archive:
        where = f"Debian source package {spec.debian.package}/{spec.debian.suite}"
        try:
            archive = DebianArchive(config.cache_dir / "apt")
            files = archive.source_files(spec.debian.package, spec.debian.suite)
            match = next((f for f in files if f.sha256 == spec.sha256), None)
            if match is None:
                have = ", ".join(f"{f.name} ({f.sha256[:12]}...)" for f in files if ".orig." in f.name)
                raise _Miss(f"no file with this sha256 there (it has: {have or 'no orig tarball'})")
            log(f"taking {match.name} from {where} (sha256 pinned by the recipe)")
            _download(match.url, spec.sha256, cached, log=log, progress=progress, label=match.name)
            return FetchedSource(cached, spec, where)
        except SourceError as exc:
            tried.append(f"{where}: {exc.what}")
        except _Miss as miss:
            tried.append(f"{where}: {miss}")
    raise _Miss(name)


def _copy_verified(src: Path, sha256: str, dest: Path) -> None:
    if not src.is_file():
        raise _Miss("not there")
    actual = sha256_file(src)
    if actual != sha256:
        raise _Miss(f"checksum mismatch: expected {sha256}, the file has {actual}; not used")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".partial-")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download_file(url: str, sha256: str, dest: Path, *, log: Log = print, progress: bool = True,
                  label: str | None = None) -> None:
    """Download `url` to `dest`, atomically and verified; raise SourceError on failure."""
    try:
        _download(url, sha256, dest, log=log, progress=progress, label=label)
    except _Miss as miss:
        raise SourceError(f"could not download {url}: {miss}") from None


def _download(url: str, sha256: str, dest: Path, *, log: Log, progress: bool, label: str | None = None,
              attempts: int = 3) -> None:
    last = ""
    for attempt in range(1, attempts + 1):
        try:
            _download_once(url, sha256, dest, progress=progress, label=label or dest.name)
            return
        except _Transient as exc:
            last = str(exc)
            if attempt < attempts:
                log(f"download of {label or dest.name} interrupted ({last}); retrying ({attempt}/{attempts - 1})")
    raise _Miss(f"{last} (after {attempts} attempts)")


class _Transient(Exception):
    """A failure worth retrying: the connection broke midway."""


def _download_once(url: str, sha256: str, dest: Path, *, progress: bool, label: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".partial-")
    tmp = Path(tmp_name)
    try:
        try:
            response = requests.get(url, stream=True, timeout=(15, 60), headers={"User-Agent": USER_AGENT})
        except requests.ConnectionError as exc:
            raise _Miss(f"cannot connect ({_reason(exc)})") from None
        except requests.RequestException as exc:
            raise _Miss(f"request failed ({_reason(exc)})") from None
        with response:
            if response.status_code != 200:
                raise _Miss(f"HTTP {response.status_code}")
            expected = int(response.headers.get("Content-Length") or 0) or None
            digest = hashlib.sha256()
            received = 0
            bar = _progress_bar(label, expected) if progress else None
            try:
                with os.fdopen(fd, "wb") as out:
                    fd = -1
                    for chunk in response.iter_content(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        if bar:
                            bar.update(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
            except (requests.RequestException, OSError) as exc:
                raise _Transient(f"connection broke after {received} bytes ({_reason(exc)})") from None
            finally:
                if bar:
                    bar.close()
        if expected is not None and received != expected:
            raise _Transient(f"got {received} of {expected} bytes")
        actual = digest.hexdigest()
        if actual != sha256:
            raise _Miss(f"checksum mismatch: expected {sha256}, got {actual}; the file was discarded")
        os.replace(tmp, dest)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp.exists():
            tmp.unlink()


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Failed to resolve", "Connection refused", "timed out", "IncompleteRead", "Connection reset"):
        if marker in text:
            return marker.lower()
    return text[:160]


def _progress_bar(label: str, total: int | None):  # type: ignore[no-untyped-def]
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False)


# ----------------------------------------------------------------------------- extraction

def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract a tarball into `dest` (which must not exist), dropping a single top directory.

    Refuses absolute paths, `..`, links that point outside the tree, and device files, naming the
    offending member. On any failure nothing is left at `dest`.
    """
    if dest.exists():
        raise SourceError(f"refusing to extract into existing directory {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-extract-"))
    try:
        try:
            with tarfile.open(archive) as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(archive, member)
                tar.extractall(staging, members=members, filter="data")
        except tarfile.TarError as exc:
            raise SourceError(f"cannot extract {archive.name}: {exc}", where=str(archive),
                              hint="the file is damaged or not a tarball; delete it from the cache and fetch again") from None
        entries = list(staging.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() else staging
        if root is staging:
            os.replace(staging, dest)
        else:
            os.replace(root, dest)
            staging.rmdir()
        return dest
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    path = PurePosixPath(name)

    def refuse(why: str) -> SourceError:
        return SourceError(f"unsafe archive member {name!r}: {why}", where=str(archive),
                           hint="the archive is not safe to extract; nothing was extracted")

    if path.is_absolute() or name.startswith("/"):
        raise refuse("absolute path")
    if ".." in path.parts:
        raise refuse("path contains '..'")
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise refuse("device or fifo")
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        if target.is_absolute():
            raise refuse(f"link to absolute path {member.linkname!r}")
        base = path.parent if member.issym() else PurePosixPath()
        depth = 0
        for part in (base / target).parts:
            depth += -1 if part == ".." else (0 if part == "." else 1)
            if depth < 0:
                raise refuse(f"link {member.linkname!r} points outside the tree")
