"""Fetch source files, verify their sha256, keep them in a content-addressed cache, extract safely.

Look-up order for one pinned file (Spack's chain): the cache, each mirror, the upstream URL, then
Debian's source archive when the recipe names a Debian source package. A recipe may list
alternative files (each with its own sha256) for when the upstream file is unreachable, such as
Debian's repacked tarballs. Nothing unverified ever enters the cache: downloads and mirror copies
are hashed while they are written to a temporary file in the cache directory, which is renamed into
place only after the checksum matched; and the cache is hashed again at every use, so bytes that
changed there are discarded, never built. Extraction is extract.py's.
"""

from __future__ import annotations

import email.utils
import errno
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import urllib3

from .config import DEFAULT_DOWNLOAD_DEADLINE as DEFAULT_DEADLINE
from .config import Config
from .debian_archive import DebianArchive
from .errors import SourceError
from .extract import extract_archive
from .recipe import SourceSpec
from .verified import file_sha256

__all__ = ["FetchedSource", "cache_path", "download_file", "extract_archive", "extract_source", "fetch_one",
           "fetch_sources"]

Log = Callable[[str], None]
CHUNK = 1 << 16
USER_AGENT = "wasmforge (+source fetcher)"
# A server that sends nothing for this long is given up on (the per-file deadline also applies).
READ_TIMEOUT = 60.0
# Server answers worth another try, after RETRY_PAUSE, 2 * RETRY_PAUSE, ... seconds (or Retry-After).
RETRIED_STATUSES = (429, 500, 502, 503, 504)
RETRY_PAUSE = 2.0
MAX_RETRY_AFTER = 120.0


@dataclass(frozen=True)
class FetchedSource:
    path: Path
    spec: SourceSpec
    origin: str  # where the bytes came from this time: cache, mirror, url or debian


class _Miss(Exception):
    """One place in the chain did not have the file; the chain goes on."""


def cache_path(config: Config, sha256: str, filename: str) -> Path:
    return config.source_cache / sha256[:2] / sha256 / filename


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
    if cached.is_file() and not cached.is_symlink():
        # The cache is re-hashed at every use: bytes that changed since they were verified are
        # never built (and never stored under the genuine key).
        actual = file_sha256(cached)
        if actual == spec.sha256:
            return FetchedSource(cached, spec, "cache")
        log(f"source cache: {cached} does not match its sha256 any more (it has {actual}); discarding it")
        cached.unlink()
    elif cached.is_symlink() or cached.exists():
        log(f"source cache: {cached} is not a regular file; discarding it")
        if cached.is_dir() and not cached.is_symlink():
            shutil.rmtree(cached)
        else:
            cached.unlink()
    deadline = config.download_deadline
    for mirror in config.mirrors:
        try:
            if "://" in mirror:
                _download(f"{mirror.rstrip('/')}/{name}", spec.sha256, cached, log=log, progress=progress,
                          deadline=deadline)
            else:
                _copy_verified(Path(mirror) / name, spec.sha256, cached)
            log(f"fetched {name} from mirror {mirror}")
            return FetchedSource(cached, spec, f"mirror {mirror}")
        except _Miss as miss:
            tried.append(f"mirror {mirror}: {miss}")
    if spec.url:
        try:
            _download(spec.url, spec.sha256, cached, log=log, progress=progress, deadline=deadline)
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
            _download(match.url, spec.sha256, cached, log=log, progress=progress, label=match.name,
                      deadline=deadline)
            return FetchedSource(cached, spec, where)
        except SourceError as exc:
            tried.append(f"{where}: {exc.what}")
        except _Miss as miss:
            tried.append(f"{where}: {miss}")
    raise _Miss(name)


def _copy_verified(src: Path, sha256: str, dest: Path) -> None:
    """Copy a mirror's file into the cache, hashing the very bytes copied (never hash, then re-read)."""
    try:
        handle = src.open("rb")
    except FileNotFoundError:
        raise _Miss("not there") from None
    except OSError as exc:
        raise _Miss(f"cannot read it ({exc.strerror})") from None
    with handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise _Miss("not a regular file")
        _write_verified(dest, sha256, iter(lambda: handle.read(CHUNK), b""))


def _write_verified(dest: Path, sha256: str, chunks: Iterable[bytes], on_chunk: Callable[[int], None] | None = None
                    ) -> None:
    """Write `chunks` to a temporary file beside `dest`, hashing them; rename it to `dest` only when the
    sha256 matches. Raises _Miss on a mismatch (and keeps nothing)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".partial-")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                digest.update(chunk)
                if on_chunk:
                    on_chunk(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != sha256:
            raise _Miss(f"checksum mismatch: expected {sha256}, got {actual}; the file was discarded")
        os.replace(tmp_name, dest)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise SourceError(f"cannot write {dest}: {exc.strerror}",
                              hint="free some space or make the cache writable (WASMFORGE_CACHE)") from None
        raise
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def download_file(url: str, sha256: str, dest: Path, *, log: Log = print, progress: bool = True,
                  label: str | None = None, deadline: float = DEFAULT_DEADLINE) -> None:
    """Download `url` to `dest`, atomically and verified; raise SourceError on failure."""
    try:
        _download(url, sha256, dest, log=log, progress=progress, label=label, deadline=deadline)
    except _Miss as miss:
        raise SourceError(f"could not download {url}: {miss}") from None


def _download(url: str, sha256: str, dest: Path, *, log: Log, progress: bool, label: str | None = None,
              attempts: int = 3, deadline: float = DEFAULT_DEADLINE) -> None:
    """Up to `attempts` tries: a broken connection or a server error (5xx, 429) is retried after a
    growing pause (the server's Retry-After when it gives one); a wrong checksum, a 404 or a server too
    slow to finish within `deadline` seconds is not."""
    last = ""
    for attempt in range(1, attempts + 1):
        try:
            _download_once(url, sha256, dest, progress=progress, label=label or dest.name, deadline=deadline)
            return
        except _Transient as exc:
            last = str(exc)
            if attempt < attempts:
                pause = exc.retry_after if exc.retry_after is not None else RETRY_PAUSE * 2 ** (attempt - 1)
                log(f"download of {label or dest.name} failed ({last}); retrying in {pause:g} s "
                    f"({attempt}/{attempts - 1})")
                time.sleep(pause)
    raise _Miss(f"{last} (after {attempts} attempts)")


class _Transient(Exception):
    """A failure worth retrying: the connection broke midway, or the server said to come back."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _download_once(url: str, sha256: str, dest: Path, *, progress: bool, label: str, deadline: float) -> None:
    started = time.monotonic()
    try:
        # Identity encoding: we verify and keep the bytes of the file itself, never a re-encoding
        # (a .tar.gz served with Content-Encoding: gzip must not be unpacked on the way).
        response = _get_within(url, deadline, timeout=(15, min(READ_TIMEOUT, deadline)),
                               headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    except requests.ConnectionError as exc:
        raise _Miss(f"cannot connect ({network_reason(exc)})") from None
    except requests.RequestException as exc:
        raise _Miss(f"request failed ({network_reason(exc)})") from None
    with response:
        if response.status_code in RETRIED_STATUSES:
            raise _Transient(f"HTTP {response.status_code}", retry_after(response.headers.get("Retry-After")))
        if response.status_code != 200:
            raise _Miss(f"HTTP {response.status_code}")
        expected = _content_length(response.headers.get("Content-Length"))
        bar = progress_bar(label, expected) if progress else None
        received = 0

        def chunks() -> Iterator[bytes]:
            nonlocal received
            while True:
                if time.monotonic() - started > deadline:
                    raise _Miss(f"gave up after {deadline:g} s (the deadline for one file); "
                                f"{received} bytes had arrived")
                try:
                    # read1: at most one read from the socket, so a trickling server cannot keep us
                    # inside one call past the deadline.
                    chunk = response.raw.read1(CHUNK, decode_content=False)
                except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                    raise _Transient(f"connection broke after {received} bytes ({network_reason(exc)})") from None
                if not chunk:
                    return
                received += len(chunk)
                if expected is not None and received > expected:
                    raise _Transient(f"the server sent more than the {expected} bytes it announced")
                yield chunk

        try:
            try:
                _write_verified(dest, sha256, chunks(), on_chunk=bar.update if bar else None)
            except _Miss as miss:
                if expected is not None and received != expected and "checksum" in str(miss):
                    raise _Transient(f"got {received} of {expected} bytes") from None
                raise
        finally:
            if bar:
                bar.close()


def _get_within(url: str, deadline: float, **kwargs: Any) -> requests.Response:
    """requests.get(url, stream=True) that gives up at `deadline` seconds even while the server is still
    trickling its status line and headers (requests' read timeout is per read, so it cannot): the
    request runs in a daemon thread that is abandoned at the deadline (its response, if one ever
    arrives, is closed)."""
    box: dict[str, Any] = {}
    lock = threading.Lock()
    done = threading.Event()

    def fetch() -> None:
        try:
            response = requests.get(url, stream=True, **kwargs)
        except BaseException as exc:  # noqa: BLE001 (handed to the waiting thread)
            box["error"] = exc
        else:
            with lock:
                if box.get("abandoned"):
                    response.close()
                else:
                    box["response"] = response
        finally:
            done.set()

    threading.Thread(target=fetch, name="wasmforge-download", daemon=True).start()
    if not done.wait(deadline):
        with lock:
            box["abandoned"] = True
            if "response" in box:
                box["response"].close()
        raise _Miss(f"gave up after {deadline:g} s (the deadline for one file): the server had not finished "
                    "sending its headers")
    if "error" in box:
        raise box["error"]
    return box["response"]


def _content_length(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        raise _Miss(f"the server sent a malformed Content-Length ({value[:40]!r})")
    return int(value)


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (a number or an HTTP date), capped; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, min((when - datetime.now(UTC)).total_seconds(), MAX_RETRY_AFTER))


# What a failed connection says, shortened to the words that matter (requests' messages nest several
# exceptions' texts); shared with the registry client.
_NETWORK_MARKERS = ("Failed to resolve", "Name or service not known", "Connection refused", "timed out",
                    "IncompleteRead", "Connection reset", "Connection aborted", "RemoteDisconnected", "BrokenPipe",
                    "certificate verify failed", "wrong version number")


def network_reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in _NETWORK_MARKERS:
        if marker in text:
            return marker.lower()
    return text[:160]


def progress_bar(label: str, total: int | None):  # type: ignore[no-untyped-def]
    """A byte-counting progress bar on a terminal (None elsewhere: logs stay clean)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False)


# ----------------------------------------------------------------------------- extraction

def extract_source(fetched: FetchedSource, dest: Path) -> Path:
    """Extract a fetched source with the limits its recipe gives (see extract.py)."""
    return extract_archive(fetched.path, dest, fetched.spec.extract_limits())
