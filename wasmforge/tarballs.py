"""Deterministic tar and gzip: bytes that depend on the content only (no clock, no owner, no host).

Shared by the release tarball (release.py), the image layers (oci.py) and the store entries of the
shared build cache (remote_cache.py).
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterable


def member(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, *, mtime: int = 0, size: int = 0,
           linkname: str = "") -> tarfile.TarInfo:
    """A tar header with nothing of the machine in it: owner 0, no user or group name, the given date."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = mtime
    info.size = size
    info.linkname = linkname
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def deterministic_gzip(data: bytes) -> bytes:
    """gzip without a file name or date in its header (level 9)."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return out.getvalue()


def deterministic_tar(files: Iterable[tuple[str, bytes]], epoch: int, top: str) -> bytes:
    """An uncompressed tar of (path, data) under `top/`, whose bytes depend on the files only: sorted,
    dated `epoch`, owner 0, with an entry for every directory (an OCI layer's diff_id is its digest)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = sorted(files)
        directories = sorted({"/".join(path.split("/")[:i]) for path, _ in entries for i in range(1, path.count("/") + 1)})
        for directory in ["", *directories]:
            tar.addfile(member(f"{top}/{directory}".rstrip("/"), tarfile.DIRTYPE, 0o755, mtime=epoch))
        for path, data in entries:
            tar.addfile(member(f"{top}/{path}", mtime=epoch, size=len(data)), io.BytesIO(data))
    return raw.getvalue()
