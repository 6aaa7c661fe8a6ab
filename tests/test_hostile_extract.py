"""Hostile archives for wasmforge.extract: dates the system cannot set, link targets with a NUL, and
many links (extraction stays near-linear, and a link is still refused whenever a later member makes it
lead outside the tree)."""

from __future__ import annotations

import io
import math
import os
import random
import tarfile
import time
from pathlib import Path

import pytest

from wasmforge import extract
from wasmforge.errors import SourceError
from wasmforge.extract import extract_archive

KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE}


def _tar(path: Path, members: list[tuple], fmt: int = tarfile.GNU_FORMAT) -> Path:
    """members: (name, kind: file|dir|sym|hard, link target or "", optionally {mtime, pax})."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, kind, value, *more in members:
            extra = more[0] if more else {}
            info = tarfile.TarInfo(name)
            info.type = KINDS[kind]
            info.mtime = extra.get("mtime", 1_000_000_000)
            info.pax_headers = extra.get("pax", {})
            if kind in ("sym", "hard"):
                info.linkname = value
            data = b"data" if kind == "file" else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _refused(tmp_path: Path, members: list[tuple], reason: str, member: str) -> None:
    """The archive is refused at `member`: a harmless last member tells that from a refusal at the end."""
    box = tmp_path / "box"
    box.mkdir()
    archive = _tar(tmp_path / "evil.tar", [*members, ("pkg/zz-end", "file", "")])
    before = _files_under(tmp_path)
    with pytest.raises(SourceError) as info:
        extract_archive(archive, box / "out")
    assert reason in info.value.what, info.value.render()
    assert f"unsafe archive member {member!r}" in info.value.what, info.value.render()
    assert "evil.tar" in info.value.render()
    assert _files_under(tmp_path) == before  # nothing left, nothing written outside


# ----------------------------------------------------------------------------- dates

@pytest.mark.parametrize("fmt, mtime, pax", [
    (tarfile.GNU_FORMAT, 10 ** 20, {}),  # base-256 in the header
    (tarfile.GNU_FORMAT, -(10 ** 20), {}),
    (tarfile.PAX_FORMAT, 0, {"mtime": "nan"}),
    (tarfile.PAX_FORMAT, 0, {"mtime": "inf"}),
    (tarfile.PAX_FORMAT, 0, {"mtime": "-inf"}),
    (tarfile.PAX_FORMAT, 0, {"mtime": "1e400"}),
    (tarfile.PAX_FORMAT, 0, {"mtime": "1e20"}),
    (tarfile.PAX_FORMAT, 0, {"mtime": "-1"}),
    (tarfile.PAX_FORMAT, 0, {"mtime": str(2 ** 33)}),
], ids=["gnu-1e20", "gnu-minus-1e20", "pax-nan", "pax-inf", "pax-minus-inf", "pax-1e400", "pax-1e20", "pax-minus-1",
        "pax-2**33"])
@pytest.mark.parametrize("kind", ["file", "dir", "hard"])
def test_a_date_the_system_cannot_set_is_replaced_by_0(tmp_path, fmt, mtime, pax, kind):
    odd = {"mtime": mtime, "pax": pax}
    members = [("pkg/ok.txt", "file", ""), ("pkg/keep", "dir", "")]
    members += {"file": [("pkg/odd", "file", "", odd)],
                "dir": [("pkg/odd", "dir", "", odd), ("pkg/odd/inner.txt", "file", "")],
                "hard": [("pkg/odd", "hard", "pkg/ok.txt", odd)]}[kind]
    archive = _tar(tmp_path / "odd.tar", members, fmt)
    with tarfile.open(archive) as tar:  # the archive really says what the test means
        stored = tar.getmember("pkg/odd").mtime
        wanted = float(pax["mtime"]) if pax else mtime
        assert stored == wanted or (math.isnan(stored) and math.isnan(wanted))
    tree = extract_archive(archive, tmp_path / "out")
    assert os.lstat(tree / "odd").st_mtime == 0
    assert os.lstat(tree / "ok.txt").st_mtime == 1_000_000_000  # a date that can be set is kept
    assert os.lstat(tree / "keep").st_mtime == 1_000_000_000


def test_a_date_just_inside_the_range_is_kept(tmp_path):
    archive = _tar(tmp_path / "late.tar", [("pkg/late", "file", "", {"mtime": 2 ** 33 - 1})])
    tree = extract_archive(archive, tmp_path / "out")
    assert os.lstat(tree / "late").st_mtime == 2 ** 33 - 1


@pytest.mark.parametrize("kind", ["sym", "hard"])
def test_a_nul_in_a_link_target_is_refused(tmp_path, kind):
    box = tmp_path / "box"
    box.mkdir()
    archive = _tar(tmp_path / "evil.tar", [("pkg/a", "file", ""), ("pkg/l", kind, "", {"pax": {"linkpath": "a\0b"}})],
                   tarfile.PAX_FORMAT)
    with pytest.raises(SourceError) as info:
        extract_archive(archive, box / "out")
    assert "unsafe archive member 'pkg/l': NUL in its link target" in info.value.what
    assert list(box.iterdir()) == []


# ----------------------------------------------------------------------------- many links

def _count_link_checks(monkeypatch) -> list[int]:
    calls = [0]
    check = extract._Tree._check_link

    def counting(self, index):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return check(self, index)
    monkeypatch.setattr(extract._Tree, "_check_link", counting)
    return calls


def test_thousands_of_links_extract_in_near_linear_time(tmp_path, monkeypatch):
    # The usual shape: links to files in other directories, a third of them before their target.
    members = []
    for k in range(3000):
        link = (f"pkg/links{k % 30}/l{k}", "sym", f"../src{k % 50}/sub/f{k}.c")
        target = (f"pkg/src{k % 50}/sub/f{k}.c", "file", "")
        members += [link, target] if k % 3 == 0 else [target, link]
    archive = _tar(tmp_path / "links.tar", members)
    calls = _count_link_checks(monkeypatch)
    start = time.monotonic()
    tree = extract_archive(archive, tmp_path / "out")
    print(f"3000 links: {time.monotonic() - start:.2f} s, {calls[0]} link resolutions")
    # Each link is resolved when made, again when its target appears (if made first), and at the end;
    # not once per later link.
    assert calls[0] <= 3 * 3000
    assert (tree / "links0" / "l0").read_text() == "data" and (tree / "links29" / "l2999").read_text() == "data"


def test_links_made_before_the_directory_link_they_go_through(tmp_path, monkeypatch):
    # Every link waits on lib/current, which is made last; each is resolved again once, then.
    members = [(f"pkg/include/h{k}.h", "sym", f"../lib/current/include/h{k}.h") for k in range(3000)]
    members += [(f"pkg/lib/v1.2/include/h{k}.h", "file", "") for k in range(3000)]
    members += [("pkg/lib/v1", "sym", "v1.2"), ("pkg/lib/current", "sym", "v1")]
    archive = _tar(tmp_path / "late.tar", members)
    calls = _count_link_checks(monkeypatch)
    start = time.monotonic()
    tree = extract_archive(archive, tmp_path / "out")
    print(f"3000 links waiting on one late link: {time.monotonic() - start:.2f} s, {calls[0]} link resolutions")
    assert calls[0] <= 3 * 3002
    assert (tree / "include" / "h2999.h").read_text() == "data"


@pytest.mark.parametrize("members, reason, member", [
    # the link waits on a path it looks up after a "..": not only the first missing one counts
    ([("pkg/dir/x", "file", ""), ("pkg/dir/a", "sym", "gone/../b/../.."), ("pkg/dir/b", "sym", "../..")],
     "link pkg/dir/a -> 'gone/../b/../..' points outside the tree", "pkg/dir/b"),
    # ... beneath a missing directory, which is made (as a directory) before the link in it
    ([("pkg/a", "sym", "d/e/../../.."), ("pkg/d/x", "file", ""), ("pkg/d/e", "sym", "..")],
     "link pkg/a -> 'd/e/../../..' points outside the tree", "pkg/d/e"),
    # ... reached through a link, and made under a name that goes through that link
    ([("pkg/sub/x", "file", ""), ("pkg/l", "sym", "sub"), ("pkg/a", "sym", "l/m/../../.."),
      ("pkg/l/m", "sym", "../..")],
     "link pkg/a -> 'l/m/../../..' points outside the tree", "pkg/l/m"),
    # a chain made one link at a time: c0 waits on c1, then on c2, ..., harmless until its last link
    ([("pkg/c0", "sym", "c1/../..")] + [(f"pkg/c{i}", "sym", f"c{i + 1}") for i in range(1, 30)]
     + [("pkg/c30", "sym", ".")],
     "link pkg/c0 -> 'c1/../..' points outside the tree", "pkg/c30"),
    # a link that looks beneath what becomes a file cannot be resolved
    ([("pkg/l", "sym", "f/x"), ("pkg/f", "file", "")], "cannot be resolved (Not a directory)", "pkg/f"),
    # what a resolved link went through cannot be replaced: a directory, even one made for a deeper member...
    ([("pkg/dir/x", "file", ""), ("pkg/a", "sym", "dir/../.."), ("pkg/dir", "sym", "../..")],
     "appears twice", "pkg/dir"),
    ([("pkg/a", "sym", "d/../.."), ("pkg/d/x", "file", ""), ("pkg/d", "sym", "../..")], "appears twice", "pkg/d"),
    ([("pkg/a", "sym", "d/../.."), ("pkg/d/x", "file", ""), ("pkg/d", "file", "")], "appears twice", "pkg/d"),
    # ... a link, or a file
    ([("pkg/x", "file", ""), ("pkg/l", "sym", "x"), ("pkg/a", "sym", "l/.."), ("pkg/l", "sym", "../..")],
     "appears twice", "pkg/l"),
    ([("pkg/f", "file", ""), ("pkg/a", "sym", "f/.."), ("pkg/f", "sym", "../..")], "appears twice", "pkg/f"),
    ([("pkg/f", "file", ""), ("pkg/g", "file", ""), ("pkg/f", "hard", "pkg/g")], "appears twice", "pkg/f"),
    ([("pkg/sub/x", "file", ""), ("pkg/l", "sym", "sub"), ("pkg/l", "dir", "")], "appears twice", "pkg/l"),
], ids=["after-dotdot", "beneath-a-later-directory", "through-a-link", "a-growing-chain", "beneath-a-file",
        "dir-to-link", "made-dir-to-link", "made-dir-to-file", "link-to-link", "file-to-link", "file-to-hard-link",
        "link-to-dir"])
def test_a_link_made_harmful_later_is_refused_when_it_becomes_harmful(tmp_path, members, reason, member):
    _refused(tmp_path, members, reason, member)


def test_links_that_keep_waiting_on_later_members_are_refused_not_resolved_for_hours(tmp_path, monkeypatch):
    # 40 links each look up 30 missing names, then a file appears at each name: 1200 resolutions again.
    target = "../" + "/".join(f"m{j}/.." for j in range(30))
    members = [(f"pkg/w/l{i}", "sym", target) for i in range(40)] + [(f"pkg/m{j}", "file", "") for j in range(30)]
    tree = extract_archive(_tar(tmp_path / "ok.tar", members), tmp_path / "out")  # within the default cap
    assert (tree / "w" / "l0").is_symlink()
    monkeypatch.setattr(extract, "RECHECK_FLOOR", 1000)
    monkeypatch.setattr(extract, "RECHECK_FACTOR", 1)
    (tmp_path / "ok.tar").rename(tmp_path / "evil.tar")
    box = tmp_path / "box"
    box.mkdir()
    with pytest.raises(SourceError) as info:
        extract_archive(tmp_path / "evil.tar", box / "out")
    assert "its links take too long to check" in info.value.what and "unsafe archive member 'pkg/m" in info.value.what
    assert list(box.iterdir()) == []


# ----------------------------------------------------------------------------- against the plain rule

class _CheckEverything(extract._Tree):
    """The plain rule the index must match: after every member, resolve every link made so far."""

    def add(self, tar, member):  # type: ignore[no-untyped-def]
        super().add(tar, member)
        for link in self.links:
            if self._resolve(link, follow_last=True) is None:
                target = os.readlink(self.root.joinpath(*link))
                raise extract._Refused(f"link {'/'.join(link)} -> {target!r} points outside the tree")


def _random_members(rng: random.Random) -> list[tuple]:
    """A few files, directories and mostly links, among few names; each link's target is a walk that
    ends at the top of the tree or at pkg, so that a later link on its way easily makes it leave. A
    last harmless member makes a link found harmful only at the end be blamed on the wrong member."""
    names = ["a", "b", "c", "l", "m"]
    members, used = [], set()
    for _ in range(rng.randint(3, 9)):
        name = rng.choice(names) if rng.random() < 0.85 else f"{rng.choice(names)}/{rng.choice(names)}"
        if name in used:
            continue
        used.add(name)
        kind = rng.choices(["file", "dir", "sym"], [20, 10, 70])[0]
        target = ""
        if kind == "sym":
            depth, steps = name.count("/") + 1, []  # the link's directory is this deep, pkg counted
            for _ in range(rng.randint(0, 4)):
                if depth and rng.random() < 0.5:
                    steps.append("..")
                    depth -= 1
                else:
                    steps.append(rng.choice(names))
                    depth += 1
            steps += [".."] * (depth - rng.choice([0, 1]))
            target = "/".join(steps) or "."
        members.append((f"pkg/{name}", kind, target))
    return [*members, ("pkg/zz-end", "file", "")]


def _outcome(archive: Path, dest: Path) -> str:
    try:
        extract_archive(archive, dest)
        return "extracted"
    except SourceError as exc:
        return exc.what


def test_random_archives_are_judged_as_if_every_link_were_checked_after_every_member(tmp_path, monkeypatch):
    outcomes = {"extracted": 0, "outside": 0}
    for seed in range(800):
        archive = _tar(tmp_path / f"r{seed}.tar", _random_members(random.Random(seed)))
        ours = _outcome(archive, tmp_path / f"ours{seed}")
        with monkeypatch.context() as patch:
            patch.setattr(extract, "_Tree", _CheckEverything)
            plain = _outcome(archive, tmp_path / f"plain{seed}")
        assert ours == plain, f"seed {seed}: {ours!r} != {plain!r}"
        outcomes["extracted"] += ours == "extracted"
        outcomes["outside"] += "points outside the tree" in ours
    print(outcomes)
    assert outcomes["extracted"] > 100 and outcomes["outside"] > 100  # the archives exercise both
