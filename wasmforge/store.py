"""The artifact store: finished builds in the user cache, addressed by their build key.

An entry is `<cache>/artifacts/<key[:2]>/<key>/`: the installed prefix of one build and its
`manifest.json`, which lists every installed file with its sha256 and size. Libraries install with the
entry's path as their prefix, so what points into a prefix (pkg-config files) stays right for every
dependant, flavor and checkout that shares the entry; programs whose recipe sets `build.prefix`
install for that guest path instead (PHP's php.ini directory is /usr/local/lib, never a host path).

An entry is assembled under `.tmp/` and renamed into place, so an entry that exists is whole.
Every use checks the files against the manifest: an entry that does not match (a truncated or
edited file, a missing one, a broken manifest) is discarded and rebuilt, never used. An entry that
verified is remembered by the state of its tree (ArtifactStore.problem), as a file's digest is.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import BuildError
from .verified import fd_sha256, recall, remember

# shutil, tempfile and uuid are imported by the methods that write the store: starting a stored module
# (python -m wasmforge.run, invoke run) only verifies an entry, and should not pay for them.

Log = Callable[[str], None]
MANIFEST = "manifest.json"
# What stands for the store's own directory where entries are compared or shared between machines
# (pkg-config and libtool files name the entries of their dependencies by path).
STORE_PLACEHOLDER = b"@WASMFORGE_STORE@"


class StoreError(BuildError):
    """The artifact store cannot take a finished build (full, read-only)."""


def file_record(path: Path) -> dict[str, Any]:
    """sha256 and size of a file (the digest remembered per file state: see verified.py)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return {"sha256": fd_sha256(fd), "size": os.fstat(fd).st_size}
    finally:
        os.close(fd)


@contextmanager
def exclusive_lock(path: Path, waiting: str, log: Log) -> Iterator[None]:
    """Hold an flock on `path`; say `waiting` first when someone else holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    @contextmanager
    def lock(self, key: str, log: Log) -> Iterator[None]:
        """Held while a key is looked up and built: two builds that need it build it once."""
        with exclusive_lock(self._locks() / f"{key}.lock", f"another build is producing {key[:12]}; waiting for it",
                            log):
            yield

    def _locks(self) -> Path:
        """Lock files live in the store; a store we cannot write to (a read-only mount, another user's
        shared store) still serves hits, with its locks in a private directory of ours."""
        locks = self.root / ".locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
            if os.access(locks, os.W_OK):
                return locks
        except OSError:
            pass
        import tempfile

        digest = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
        private = Path(tempfile.gettempdir()) / f"wasmforge-locks-{os.getuid()}" / digest
        private.mkdir(parents=True, exist_ok=True, mode=0o700)
        return private

    def problem(self, key: str) -> str | None:
        """Why the entry for `key` cannot be used, or None when it holds exactly what its manifest lists:
        every file with its sha256 and size, every link with its target, and nothing else.

        An entry that verified is remembered by the state of its whole tree (every path with its kind,
        device, inode, size, mtime and ctime, and every link's target), as verified.py remembers one
        file's digest: an unchanged entry is then checked by one walk instead of opening its thousands
        of files (CPython's stdlib is ~7,800), and any change to any file or listing checks it fully."""
        entry = self.entry(key)
        try:
            found = _scan_entry(entry)
        except OSError as exc:
            return f"cannot be read ({exc.strerror}: {exc.filename})"
        tree_state = _tree_state(found)
        stamp = "tree-" + hashlib.sha256(f"{entry}\0{key}".encode()).hexdigest()[:40]
        if recall(stamp) == tree_state:
            return None
        if problem := self._check(key, entry, found):
            return problem
        remember(stamp, tree_state)
        return None

    def _check(self, key: str, entry: Path, found: list[tuple[str, str, os.stat_result, str]]) -> str | None:
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except FileNotFoundError:
            return "no manifest.json"
        except (OSError, ValueError) as exc:
            return f"manifest.json is unreadable ({exc})"
        if not isinstance(manifest, dict) or manifest.get("key") != key:
            return "manifest.json belongs to another build"
        files = {**_mapping(manifest.get("outputs")), **_mapping(manifest.get("logs"))}
        links = _mapping(manifest.get("links"))
        for rel, kind, _, target in found:
            if rel == MANIFEST:
                continue
            if kind == "link":
                if rel not in links:
                    return f"{rel} is a link that the manifest does not list"
                if target != links[rel]:
                    return f"{rel} points elsewhere than the manifest says"
            elif kind == "file":
                if rel not in files:
                    return f"{rel} is not in the manifest (an extra file)"
            elif kind != "dir":
                return f"{rel} is neither a file, a directory nor a link"
        present = {rel for rel, *_ in found}
        for rel in sorted(links):
            if rel not in present:
                return f"{rel} is missing"
        for rel, expected in sorted(files.items()):
            path = entry / rel
            if rel not in present or not path.is_file() or path.is_symlink():
                return f"{rel} is missing"
            if not isinstance(expected, dict):
                return "manifest.json is malformed"
            if path.stat().st_size != expected.get("size"):
                return f"{rel} has {path.stat().st_size} bytes, the manifest says {expected.get('size')}"
            if file_record(path)["sha256"] != expected.get("sha256"):
                return f"{rel} does not match its sha256"
        return None

    def lookup(self, key: str, log: Log) -> dict[str, Any] | None:
        """The manifest of a verified entry; a damaged entry is reported and discarded."""
        entry = self.entry(key)
        if not entry.exists():
            return None
        if problem := self.problem(key):
            log(f"artifact store: discarding the damaged entry {entry}: {problem}")
            try:
                self.discard(key)
            except OSError as exc:
                log(f"artifact store: cannot remove it ({exc.strerror}); it is not used")
            return None
        return json.loads((entry / MANIFEST).read_text())

    def discard(self, key: str) -> None:
        import shutil

        entry = self.entry(key)
        trash = self.scratch(f"discard-{key}")
        try:
            os.replace(entry, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def put(self, key: str, staged: Path) -> Path:
        """Move a finished prefix (with its manifest) into the store, atomically."""
        import shutil

        entry = self.entry(key)
        tmp: Path | None = None
        try:
            self._sweep()
            tmp = self.scratch(key)
            try:
                os.replace(staged, tmp)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                shutil.copytree(staged, tmp, symlinks=True)
            entry.parent.mkdir(parents=True, exist_ok=True)
            if entry.exists():  # a damaged entry: its replacement was built under the key's lock
                self.discard(key)
            os.replace(tmp, entry)
            tmp = None
            return entry
        except OSError as exc:
            reason, code = exc.strerror, exc.errno
            if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
                reason = str(exc.args[0][0][-1])  # copytree collects (src, dst, why) for each failure
                code = next((c for c, text in ((errno.ENOSPC, "No space left"), (errno.EROFS, "Read-only"))
                             if text in reason), None)
            raise StoreError(f"cannot put the build into the artifact store: {reason}",
                             where=str(exc.filename or entry),
                             hint={errno.ENOSPC: "free some space (or point WASMFORGE_STORE elsewhere) and build again",
                                   errno.EROFS: "the store is read-only: set WASMFORGE_STORE to a writable directory"}
                             .get(code or 0, "check the store directory's permissions")) from None
        finally:
            if tmp is not None and (tmp.exists() or tmp.is_symlink()):
                shutil.rmtree(tmp, ignore_errors=True)

    def manifests(self) -> Iterator[dict[str, Any]]:
        """Every entry's manifest (unverified: for explanations, not for use)."""
        for manifest in sorted(self.root.glob(f"??/*/{MANIFEST}")):
            try:
                data = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                yield data

    def nearest(self, target: str, name: str, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """The stored build most like `inputs`: the same target first, then the same package."""
        candidates = [m for m in self.manifests() if m.get("target") == target]
        candidates = candidates or [m for m in self.manifests() if m.get("name") == name]
        if not candidates:
            return None
        candidates.sort(key=lambda m: str(m.get("built_at", "")), reverse=True)  # newest wins a tie
        return min(candidates, key=lambda m: len(differences(m.get("inputs", {}), inputs)))

    def scratch(self, label: str) -> Path:
        """A fresh path in the store's .tmp/ (same file system as the entries: renamed into place)."""
        import uuid

        tmp = self.root / ".tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp / f"{label}.{os.getpid()}.{uuid.uuid4().hex[:8]}"

    def _sweep(self) -> None:
        """Remove what builds that were killed left in .tmp/ (their process is gone)."""
        import shutil

        for leftover in (self.root / ".tmp").glob("*.*.*"):
            pid = leftover.name.rsplit(".", 2)[1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


def entry_containing(path: Path) -> tuple[ArtifactStore, str] | None:
    """The store and key of the entry that `path` (or what it links to) lies in, if it is in one:
    `<store>/<key[:2]>/<key>/...`, whichever store that is. Known by the path's shape alone, so an
    entry whose manifest.json was deleted is still one (and damaged), not an ordinary directory."""
    try:
        resolved = path.resolve()
    except OSError:
        return None
    for entry in (resolved, *resolved.parents):
        key = entry.name
        if len(key) == 64 and all(c in "0123456789abcdef" for c in key) and entry.parent.name == key[:2]:
            return ArtifactStore(entry.parent.parent), key
    return None


def walk_entry(root: Path) -> Iterator[tuple[str, str]]:
    """(relative path, "file" | "dir" | "link" | "other") for everything under `root`, links not followed."""
    for rel, kind, _, _ in _scan_entry(root):
        yield rel, kind


def _scan_entry(root: Path) -> list[tuple[str, str, os.stat_result, str]]:
    """(relative path, kind, lstat, link target or "") for everything under `root`, links not followed;
    plain strings and scandir, since an entry can hold thousands of files and this runs at every start."""
    found: list[tuple[str, str, os.stat_result, str]] = []
    pending = [""]
    base = str(root)
    while pending:
        prefix = pending.pop()
        with os.scandir(os.path.join(base, prefix) if prefix else base) as listing:
            for item in listing:
                rel = prefix + item.name
                st = item.stat(follow_symlinks=False)
                mode = st.st_mode
                if stat.S_ISLNK(mode):
                    found.append((rel, "link", st, os.readlink(item.path)))
                elif stat.S_ISDIR(mode):
                    found.append((rel, "dir", st, ""))
                    pending.append(rel + "/")
                else:
                    found.append((rel, "file" if stat.S_ISREG(mode) else "other", st, ""))
    found.sort(key=lambda item: item[0])
    return found


def _tree_state(found: list[tuple[str, str, os.stat_result, str]]) -> str:
    """One digest of everything that changes when any file of a tree is edited, replaced, added,
    removed or relinked (ctime cannot be set by a user: see verified.py)."""
    hasher = hashlib.sha256()
    for rel, kind, st, target in found:
        hasher.update(f"{rel}\0{kind}\0{st.st_dev} {st.st_ino} {st.st_mode} {st.st_size} {st.st_mtime_ns} "
                      f"{st.st_ctime_ns}\0{target}\n".encode("utf-8", "surrogateescape"))
    return hasher.hexdigest()


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Inputs of a build that are recorded for information and are not part of its key.
_NOT_KEYED = ("source_used", "flags")


def _flatten(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{path}.{k}" if path else str(k)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        return _flatten({v["name"]: {k: x for k, x in v.items() if k != "name"} for v in value}, path)
    return {path: value}


def differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What changed from a stored build's inputs to the wanted ones, one line per input."""
    old = _flatten({k: v for k, v in stored.items() if k not in _NOT_KEYED})
    new = _flatten({k: v for k, v in wanted.items() if k not in _NOT_KEYED})
    lines = []
    for path in sorted(old.keys() | new.keys()):
        if path not in new:
            lines.append(f"{path}: removed (was {_short(old[path])})")
        elif path not in old:
            lines.append(f"{path}: added ({_short(new[path])})")
        elif old[path] != new[path]:
            lines.append(f"{path}: {_short(old[path])} -> {_short(new[path])}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        return text[:12]
    return text if len(text) <= 80 else text[:77] + "..."
