"""The sha256 of a file, hashed once per state of the file and remembered outside it.

Checking a store entry or a precompiled module means hashing tens of megabytes at every start. A file
whose content changed always has a new change time (ctime), which no user can set, so the digest is
remembered per file state: `<cache>/verified/<dev>-<inode>` holds `size mtime_ns ctime_ns sha256`,
taken from the *open* file (fstat before reading), and trusted only while all four still match and the
directory is private to this user (mode 0700, ours). An edit, a truncation, a file renamed into place
or copied over: each changes the state, and the file is hashed again. wasmforge-run (launcher/) reads
and writes the same stamps.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path

from .settings import default_cache_dir

CHUNK = 1 << 20


def stamps_dir() -> Path:
    return default_cache_dir() / "verified"


def is_private(directory: Path) -> bool:
    """A directory of ours that no one else may write to or read: where remembered facts can be trusted."""
    try:
        st = os.stat(directory)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def fd_sha256(fd: int) -> str:
    """The sha256 of an open file's content (from its start), remembered for its current state."""
    st = os.fstat(fd)
    state = f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"
    stamp = f"{st.st_dev}-{st.st_ino}"
    if stat.S_ISREG(st.st_mode) and (text := recall(stamp)):
        remembered, _, digest = text.rpartition(" ")
        if remembered == state and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
            return digest
    hasher = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        hasher.update(chunk)
        offset += len(chunk)
    digest = hasher.hexdigest()
    if stat.S_ISREG(st.st_mode):
        remember(stamp, f"{state} {digest}")
    return digest


def file_sha256(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return fd_sha256(fd)
    finally:
        os.close(fd)


def recall(name: str) -> str | None:
    """The text of the stamp `name` (one line), when the stamps directory is private to this user."""
    directory = stamps_dir()
    if not is_private(directory):
        return None
    try:
        with open(directory / name, encoding="utf-8") as handle:
            return handle.read(4096).strip()
    except (OSError, ValueError):
        return None


def remember(name: str, text: str) -> None:
    """Write a stamp atomically; a cache we cannot write only costs speed."""
    import tempfile  # here: an unchanged file, the common case, needs no stamp written

    directory = stamps_dir()
    with contextlib.suppress(OSError):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not is_private(directory):
            return
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".stamp-")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text + "\n")
            os.replace(tmp, directory / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
