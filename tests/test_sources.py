"""Fetching and extraction against a local HTTP server: verified, atomic, and safe."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
from conftest import Route, make_tarball

from wasmforge.errors import SourceError
from wasmforge.recipe import SourceSpec
from wasmforge.sources import cache_path, extract_archive, fetch_sources

BODY = b"0123456789abcdef" * 4096  # 64 KiB
SHA = hashlib.sha256(BODY).hexdigest()


def _leftovers(config) -> list[str]:
    root = config.source_cache
    return [str(p) for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_download_verifies_and_caches(project, server):
    server.routes["/pkg-1.0.tar.gz"] = Route(BODY)
    spec = SourceSpec(sha256=SHA, url=server.url("/pkg-1.0.tar.gz"))
    fetched = fetch_sources([spec], project.config, log=lambda m: None)
    assert fetched.path == cache_path(project.config, SHA, "pkg-1.0.tar.gz")
    assert fetched.path.read_bytes() == BODY
    # Second time: from the cache, no request.
    again = fetch_sources([spec], project.config, log=lambda m: None)
    assert again.origin == "cache" and server.routes["/pkg-1.0.tar.gz"].hits == 1


def test_checksum_mismatch_keeps_nothing(project, server):
    server.routes["/pkg-1.0.tar.gz"] = Route(BODY + b"tampered")
    spec = SourceSpec(sha256=SHA, url=server.url("/pkg-1.0.tar.gz"))
    with pytest.raises(SourceError) as info:
        fetch_sources([spec], project.config, log=lambda m: None)
    assert "checksum mismatch" in info.value.details
    assert SHA in info.value.details
    assert "WASMFORGE_MIRRORS" in info.value.hint
    assert _leftovers(project.config) == []


def test_cut_off_download_leaves_no_partial_file_and_a_retry_works(project, server):
    route = Route(BODY, cut_at=1000, failures=100)
    server.routes["/pkg-1.0.tar.gz"] = route
    spec = SourceSpec(sha256=SHA, url=server.url("/pkg-1.0.tar.gz"))
    messages: list[str] = []
    with pytest.raises(SourceError) as info:
        fetch_sources([spec], project.config, log=messages.append)
    assert "after 3 attempts" in info.value.details
    assert any("retrying" in m for m in messages)
    assert _leftovers(project.config) == []
    # The network recovers: the next fetch succeeds.
    route.failures = 0
    fetched = fetch_sources([spec], project.config, log=lambda m: None)
    assert fetched.path.read_bytes() == BODY


def test_one_interruption_is_retried_within_the_same_fetch(project, server):
    server.routes["/pkg-1.0.tar.gz"] = Route(BODY, cut_at=5000, failures=1)
    spec = SourceSpec(sha256=SHA, url=server.url("/pkg-1.0.tar.gz"))
    fetched = fetch_sources([spec], project.config, log=lambda m: None)
    assert fetched.path.read_bytes() == BODY
    assert server.routes["/pkg-1.0.tar.gz"].hits == 2


def test_mirror_directory_is_used_and_a_wrong_file_there_is_refused(project, tmp_path):
    mirror = tmp_path / "mirror"
    spec = SourceSpec(sha256=SHA, url="http://127.0.0.1:9/pkg-1.0.tar.gz")
    (mirror / "pkg-1.0.tar.gz").write_bytes(b"not the file")
    with pytest.raises(SourceError) as info:
        fetch_sources([spec], project.config, log=lambda m: None)
    assert f"mirror {mirror}: checksum mismatch" in info.value.details
    assert _leftovers(project.config) == []
    (mirror / "pkg-1.0.tar.gz").write_bytes(BODY)
    fetched = fetch_sources([spec], project.config, log=lambda m: None)
    assert fetched.origin == f"mirror {mirror}"


def test_alternative_source_is_used_when_the_primary_fails(project, server):
    other = b"a repacked tarball"
    server.routes["/alt.tar.gz"] = Route(other)
    primary = SourceSpec(sha256=SHA, url=server.url("/missing.tar.gz"))
    alternative = SourceSpec(sha256=hashlib.sha256(other).hexdigest(), url=server.url("/alt.tar.gz"))
    fetched = fetch_sources([primary, alternative], project.config, log=lambda m: None)
    assert fetched.spec == alternative and fetched.path.read_bytes() == other


def test_unreachable_everywhere_says_what_was_tried(project):
    spec = SourceSpec(sha256=SHA, url="http://127.0.0.1:9/pkg-1.0.tar.gz")
    with pytest.raises(SourceError) as info:
        fetch_sources([spec], project.config, log=lambda m: None)
    text = info.value.render()
    assert "could not fetch pkg-1.0.tar.gz" in text
    assert "mirror" in text and "http://127.0.0.1:9/pkg-1.0.tar.gz: cannot connect" in text


# ----------------------------------------------------------------------------- extraction

def _tar_with(tmp_path, *members: tarfile.TarInfo, name="bad.tar.gz"):
    path = tmp_path / name
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            data = b"x" if info.isreg() else None
            if data:
                info.size = 1
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def _member(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize("member, reason", [
    (_member("pkg/../../evil"), "'..'"),
    (_member("/etc/evil"), "absolute path"),
    (_member("pkg/link", tarfile.SYMTYPE, "../../outside"), "points outside the tree"),
    (_member("pkg/link", tarfile.SYMTYPE, "/etc/passwd"), "link to absolute path"),
    (_member("pkg/hard", tarfile.LNKTYPE, "../outside"), "outside the tree"),
    (_member("pkg/dev", tarfile.CHRTYPE), "device"),
])
def test_unsafe_archives_are_refused(tmp_path, member, reason):
    archive = _tar_with(tmp_path, _member("pkg/ok.txt"), member)
    dest = tmp_path / "out"
    with pytest.raises(SourceError) as info:
        extract_archive(archive, dest)
    assert reason in info.value.what
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.tar.gz"]


def test_extraction_strips_the_top_directory_and_keeps_inner_links(tmp_path):
    archive = make_tarball(tmp_path / "good.tar.gz", {"src/a.c": "int a;", "configure": "#!/bin/sh\n"}, top="pkg-1.0")
    with tarfile.open(archive) as tar:
        assert len(tar.getmembers()) == 2
    dest = extract_archive(archive, tmp_path / "tree")
    assert (dest / "src" / "a.c").read_text() == "int a;"
    assert (dest / "configure").stat().st_mode & 0o100
    link_archive = _tar_with(tmp_path, _member("p/a.txt"), _member("p/dir/link", tarfile.SYMTYPE, "../a.txt"),
                             name="links.tar.gz")
    tree = extract_archive(link_archive, tmp_path / "tree2")
    assert (tree / "dir" / "link").resolve() == (tree / "a.txt").resolve()
