"""Extract a tarball so that nothing it contains can reach outside the directory it is extracted into.

We do not rely on `tarfile`'s extraction filters: Debian 12's Python (3.11.2) has none, and filters
that judge a link by its target *string* have been fooled by chains of links (CVE-2025-4517). Instead
each member's final place is decided against what is already on disk in our private staging tree:

- a member's parent directories are resolved by following the links already extracted, one component
  at a time (readlink, never realpath, so a path too long to resolve is refused, not cut short), and
  the result must stay inside the tree; files are created with O_EXCL|O_NOFOLLOW in that directory;
- every symbolic link is resolved when it is created, and again whenever a later link or file is
  created at a path its resolution looked up and did not find, so a later link cannot turn an earlier,
  harmless one into an exit (nothing that exists in the tree is ever replaced or removed, so no other
  member can change where a link leads); all links are resolved once more at the end;
- a hard link may only copy a regular file that was already extracted inside the tree;
- a path that is both a file and a directory, or that appears twice, is refused; so are devices and
  FIFOs, absolute names and `..`;
- the bytes written and the number of members are capped (a recipe can raise the caps), and so is the
  work of resolving links again;
- a modification time that is not a finite number in [0, 2**33) is replaced by 0.

Every failure is one SourceError naming the archive and the member; the staging tree is removed, so a
refused archive leaves nothing behind.
"""

from __future__ import annotations

import errno
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import SourceError

CHUNK = 1 << 20
MAX_LINK_HOPS = 40
# Resolving links again because later members changed them may look at this many components, plus
# RECHECK_FACTOR times as many as the rest of the extraction looked at (placing members and resolving
# each link once): real archives need less than once as many; a crafted one (many links each waiting
# on many later members) is refused instead of taking hours.
RECHECK_FLOOR = 1_000_000
RECHECK_FACTOR = 8
MAX_MTIME = 2 ** 33


@dataclass(frozen=True)
class ExtractLimits:
    """Caps on what one archive may unpack to; generous, and raised per source in a recipe."""

    max_bytes: int = 8 << 30
    max_members: int = 250_000


class _Refused(Exception):
    """A member that must not be extracted; turned into a SourceError that names it."""


def extract_archive(archive: Path, dest: Path, limits: ExtractLimits | None = None) -> Path:
    """Extract a tarball into `dest` (which must not exist), dropping a single top directory."""
    limits = limits or ExtractLimits()
    if dest.exists() or dest.is_symlink():
        raise SourceError(f"refusing to extract into existing directory {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-extract-"))
    member_name = None
    try:
        try:
            tree = _Tree(staging, limits)
            with tarfile.open(archive) as tar:
                for member in tar:
                    member_name = member.name
                    tree.add(tar, member)
            tree.finish()
        except _Refused as exc:
            raise SourceError(f"unsafe archive member {member_name!r}: {exc}", where=str(archive),
                              hint="the archive is not safe to extract; nothing was extracted") from None
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
            at = f" (at member {member_name!r})" if member_name else ""
            raise SourceError(f"cannot extract {archive.name}{at}: {exc or type(exc).__name__}", where=str(archive),
                              hint="the file is damaged or not a tarball; delete it from the cache and fetch again"
                              ) from None
        except OSError as exc:
            at = f" at member {member_name!r}" if member_name else ""
            raise SourceError(f"cannot extract {archive.name}{at}: {exc.strerror or exc}", where=str(archive),
                              hint="free some space" if exc.errno == errno.ENOSPC else None) from None
        entries = list(staging.iterdir())
        single = len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink()
        if single:
            os.replace(entries[0], dest)
            staging.rmdir()
        else:
            os.replace(staging, dest)
        return dest
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


class _Tree:
    """The staging tree, and what has been put into it so far."""

    def __init__(self, root: Path, limits: ExtractLimits) -> None:
        self.root = root
        self.limits = limits
        self.members = 0
        self.written = 0
        self.links: list[tuple[str, ...]] = []
        # The paths each link's resolution looked up and did not find, and the reverse index, by _key():
        # only a link or file created at one of them later can change what resolving that link gives.
        self.waits_on: list[frozenset[str]] = []
        self.waiting: dict[str, set[int]] = {}
        self.steps = 0  # components looked at by _resolve
        self.recheck_steps = 0
        self.dir_times: list[tuple[Path, float]] = []

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise _Refused(f"the archive has more than {self.limits.max_members} members "
                           "(raise source.extract.max_members in the recipe if this is expected)")
        parts = _parts(member.name)
        if not parts:
            if member.isdir():
                return  # "./": the tree itself
            raise _Refused("empty name")
        mtime = _mtime(member.mtime)
        if "\0" in member.linkname:  # of a symbolic or hard link (empty for other members)
            raise _Refused("NUL in its link target")
        resolved = self._directory(parts[:-1])
        final = self.root.joinpath(*resolved, parts[-1])
        if member.isdir():
            if final.is_dir() and not final.is_symlink():
                return
            self._must_be_new(final)
            final.mkdir(mode=0o755)
            self.dir_times.append((final, mtime))
        elif member.isreg():
            self._must_be_new(final)
            source = tar.extractfile(member)
            if source is None:
                raise _Refused("has no data")
            self._write(final, source, member.mode, mtime)
            self._created((*resolved, parts[-1]))
        elif member.issym():
            self._must_be_new(final)
            if PurePosixPath(member.linkname).is_absolute() or not member.linkname:
                raise _Refused(f"link to absolute path {member.linkname!r}")
            os.symlink(member.linkname, final)
            self._created((*resolved, parts[-1]))
            self.links.append((*resolved, parts[-1]))
            self.waits_on.append(frozenset())
            self._check_link(len(self.links) - 1)
        elif member.islnk():
            self._must_be_new(final)
            if PurePosixPath(member.linkname).is_absolute():
                raise _Refused(f"hard link to absolute path {member.linkname!r}")
            target = self._resolve(tuple(member.linkname.split("/")), follow_last=True)
            if target is None:
                raise _Refused(f"hard link to {member.linkname!r} points outside the tree")
            path = self.root.joinpath(*target)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                raise _Refused(f"hard link to {member.linkname!r}, which is not (yet) in the archive") from None
            if not stat.S_ISREG(info.st_mode):
                raise _Refused(f"hard link to {member.linkname!r}, which is not a regular file")
            with open(path, "rb") as source:
                self._write(final, source, info.st_mode, mtime)
            self._created((*resolved, parts[-1]))
        else:
            raise _Refused("device, FIFO or other special file")

    def finish(self) -> None:
        for index in range(len(self.links)):  # the tree as it is left, whatever the bookkeeping says
            self._check_link(index)
        for path, mtime in reversed(self.dir_times):  # files added to a directory change its time
            os.utime(path, (mtime, mtime), follow_symlinks=False)

    def _created(self, path: tuple[str, ...]) -> None:
        """Resolve again, in the order they were made, the links whose resolution looked up `path` and
        did not find it: a link created there changes where they lead, a file makes looking beneath it
        fail. Nothing else can change where a link leads: nothing in the tree is replaced or removed,
        and a directory made where a path was missing resolves as the missing path did."""
        for index in sorted(self.waiting.pop(_key(path), ())):
            before = self.steps
            self._check_link(index)
            self.recheck_steps += self.steps - before
            if self.recheck_steps > RECHECK_FLOOR + RECHECK_FACTOR * (self.steps - self.recheck_steps):
                raise _Refused(f"its links take too long to check ({self.recheck_steps} steps resolving links "
                               "again that later members change)")

    def _must_be_new(self, path: Path) -> None:
        if os.path.lexists(path):
            kind = "a directory" if path.is_dir() and not path.is_symlink() else "a file or link"
            raise _Refused(f"appears twice in the archive (already extracted as {kind})")

    def _directory(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        """The real directory for `parts` (made as needed, reached only through links inside the tree),
        as components of a path in the tree that has no link in it."""
        resolved = self._resolve(parts, follow_last=True)
        if resolved is None:
            raise _Refused("its directory leads outside the tree through a link")
        path = self.root
        for part in resolved:
            path = path / part
            try:
                path.mkdir(mode=0o755)
            except FileExistsError:
                if not path.is_dir() or path.is_symlink():
                    raise _Refused(f"{'/'.join(resolved)} is both a file and a directory") from None
            except NotADirectoryError:
                raise _Refused(f"{'/'.join(resolved)} is both a file and a directory") from None
        return resolved

    def _resolve(self, parts: tuple[str, ...], *, follow_last: bool,
                 missing: set[str] | None = None) -> tuple[str, ...] | None:
        """Where `parts` lead inside the tree, following extracted links; None when they leave it.

        The paths looked up and not found are added to `missing` (as _key()s)."""
        done: list[str] = []
        todo = list(reversed(parts))  # a stack: the next component last
        hops = 0
        root = str(self.root)
        while todo:
            part = todo.pop()
            self.steps += 1
            if part in ("", "."):
                continue
            if part == "..":
                if not done:
                    return None
                done.pop()
                continue
            candidate = os.path.join(root, *done, part)
            try:
                is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
            except FileNotFoundError:
                is_link = False
                if missing is not None:
                    missing.add(_key((*done, part)))
            except OSError as exc:  # a name too long, a loop: never guess
                raise _Refused(f"cannot be resolved ({exc.strerror})") from None
            if is_link and (todo or follow_last):
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise _Refused("too many levels of links")
                target = os.readlink(candidate)
                if target.startswith("/"):
                    return None
                todo.extend(reversed(target.split("/")))
                continue
            done.append(part)
        return tuple(done)

    def _check_link(self, index: int) -> None:
        """Resolve link number `index`; refuse it if it leads outside, else note what it waits on."""
        link = self.links[index]
        missing: set[str] = set()
        if self._resolve(link, follow_last=True, missing=missing) is None:
            target = os.readlink(self.root.joinpath(*link))
            raise _Refused(f"link {'/'.join(link)} -> {target!r} points outside the tree")
        for path in self.waits_on[index] - missing:
            waiters = self.waiting.get(path)
            if waiters is not None:
                waiters.discard(index)
                if not waiters:
                    del self.waiting[path]
        for path in missing:
            self.waiting.setdefault(path, set()).add(index)
        self.waits_on[index] = frozenset(missing)

    def _write(self, path: Path, source, mode: int, mtime: float) -> None:  # type: ignore[no-untyped-def]
        # Owner read/write always; executable bits kept; no setuid, setgid, sticky or group/other write.
        mode = (mode & 0o755) | 0o600
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK):
                self.written += len(chunk)
                if self.written > self.limits.max_bytes:
                    raise _Refused(f"the archive unpacks to more than {self.limits.max_bytes >> 20} MiB "
                                   "(raise source.extract.max_mib in the recipe if this is expected)")
                out.write(chunk)
        os.chmod(path, mode)  # umask may have removed bits
        os.utime(path, (mtime, mtime))


def links_leaving(root: Path) -> list[str]:
    """The links under `root` that resolve outside it (e.g. made by a git-style patch), as "path -> target"."""
    tree = _Tree(root, ExtractLimits())
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                rel = tuple(path.relative_to(root).parts)
                try:
                    inside = tree._resolve(rel, follow_last=True) is not None
                except _Refused:
                    inside = False
                if not inside:
                    found.append(f"{'/'.join(rel)} -> {os.readlink(path)}")
    return found


def _key(parts: tuple[str, ...]) -> str:
    """A path in the tree as the index of waiting links knows it: "/"-joined, and folded so that two
    names a case- or normalization-insensitive file system takes for one are one key (only ever more
    links are resolved again, never fewer)."""
    return unicodedata.normalize("NFD", "/".join(parts)).casefold()


def _mtime(value: object) -> float:
    """A member's modification time as one the system can set: 0 unless a finite number in [0, 2**33)."""
    try:
        mtime = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 0
    return mtime if 0 <= mtime < MAX_MTIME else 0  # NaN fails both comparisons


def _parts(name: str) -> tuple[str, ...]:
    if "\0" in name:
        raise _Refused("NUL in its name")
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        raise _Refused("absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _Refused("path contains '..'")
    return parts
