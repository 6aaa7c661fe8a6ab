"""Deterministic tar and gzip: bytes that depend on the content only (no clock, no owner, no host).

Shared by the release tarball (release.py), the image layers (oci.py) and the store entries of the
shared build cache (remote_cache.py).
"""

from __future__ import annotations

import gzip
import io
import tarfile


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
