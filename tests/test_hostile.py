"""Hostile inputs, built here (no network: servers on 127.0.0.1), each with its outcome: refused with
one message, nothing written outside its directory, nothing unverified used or run."""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import ROOT
from test_build import HELLO_C, HELLO_RECIPE, MAKEFILE, _build, _recipe, _source
from test_runtime import PROGRAM, _compile

from wasmforge import sources
from wasmforge.config import Config
from wasmforge.errors import PatchError, RecipeError, RunError, SourceError, WasmforgeError
from wasmforge.extract import ExtractLimits, extract_archive
from wasmforge.optimize import precompile
from wasmforge.patches import patch_series
from wasmforge.pipeline import stored_output
from wasmforge.recipe import RecipeBook, RunDefaults, SourceSpec, load_recipe
from wasmforge.runtime import Runner, precompiled_path
from wasmforge.sources import cache_path, fetch_sources

INVOKE = [sys.executable, "-m", "invoke"]


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ----------------------------------------------------------------------------- archives

def _tar(path: Path, members: list[tuple[str, str, str | bytes]]) -> Path:
    """members: (name, kind: file|dir|sym|hard|fifo, data or link target)."""
    kinds = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
             "fifo": tarfile.FIFOTYPE}
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            info.type = kinds[kind]
            data = None
            if kind == "file":
                data = value.encode() if isinstance(value, str) else value
                info.size = len(data)
            elif kind in ("sym", "hard"):
                info.linkname = str(value)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _refused(tmp_path: Path, members, reason: str, limits: ExtractLimits | None = None) -> None:
    box = tmp_path / "box"
    box.mkdir()
    archive = _tar(tmp_path / "evil.tar.gz", members)
    before = _files_under(tmp_path)
    with pytest.raises(SourceError) as info:
        extract_archive(archive, box / "out", limits)
    assert reason in info.value.what, info.value.render()
    assert "evil.tar.gz" in info.value.render()  # the archive is named, and the member
    assert _files_under(tmp_path) == before  # nothing left, nothing written outside


def test_a_chain_of_links_that_resolves_outside_is_refused(tmp_path):
    # Each link is harmless as text where it stands, but pkg/sub/up is "..", so pkg/sub/up/esc is
    # really pkg/esc, and its "../.." leaves the tree.
    _refused(tmp_path, [("pkg/sub/x", "file", "x"), ("pkg/sub/up", "sym", ".."),
                        ("pkg/sub/up/esc", "sym", "../.."), ("pkg/esc/evil", "file", "pwned")],
             "points outside the tree")


def test_a_link_made_harmful_by_a_later_link_is_refused(tmp_path):
    # "a" -> "b/../.." is inside while b is a directory ... until b becomes a link to "sub/deeper".
    _refused(tmp_path, [("pkg/x", "file", "x"), ("pkg/dir/a", "sym", "b/../../.."), ("pkg/dir/b", "sym", "../x/..")],
             "points outside the tree")


def test_the_long_name_link_chain_of_cve_2025_4517_is_refused(tmp_path):
    # The shape of the CVE: directories with 247-character names reached through one-letter links,
    # so that resolving a link exceeds PATH_MAX; realpath() then stops resolving and says "inside".
    long = "d" * 247
    members, path = [], ""
    for letter in "abcdefghijklmnop":
        members.append((f"{path}{long}", "dir", ""))
        members.append((f"{path}{letter}", "sym", long))
        path += f"{long}/"
    chain = "/".join("abcdefghijklmnop")
    members.append((f"{chain}/{'l' * 254}", "sym", "../" * 16))
    members.append(("escape", "sym", f"{chain}/{'l' * 254}/../../../../../../../../tmp"))
    members.append(("escape/wasmforge-cve-test", "file", "pwned"))
    box = tmp_path / "box"
    box.mkdir()
    archive = _tar(tmp_path / "evil.tar.gz", members)
    with pytest.raises(SourceError) as info:
        extract_archive(archive, box / "out")
    # Refused at the first member that cannot be placed safely: here the long link (its real path is
    # longer than the system allows) or, with a shorter tree, the escape.
    assert "unsafe archive member" in info.value.what or "File name too long" in info.value.what
    assert "member '" in info.value.what
    assert not Path("/tmp/wasmforge-cve-test").exists()
    assert list(box.iterdir()) == []


@pytest.mark.parametrize("members, reason", [
    ([("pkg/a", "file", "x"), ("pkg/h", "hard", "../../../etc/passwd")], "points outside the tree"),
    ([("pkg/h", "hard", "pkg/later"), ("pkg/later", "file", "x")], "not (yet) in the archive"),
    ([("pkg/d", "dir", ""), ("pkg/h", "hard", "pkg/d")], "not a regular file"),
    ([("pkg/l", "sym", "/etc"), ], "absolute path"),
    ([("pkg/a", "file", "x"), ("pkg/a/b", "file", "y")], "both a file and a directory"),
    ([("pkg/a/b", "file", "y"), ("pkg/a", "file", "x")], "appears twice"),
    ([("pkg/a", "file", "x"), ("pkg/a", "file", "y")], "appears twice"),
    ([("pkg/fifo", "fifo", "")], "FIFO"),
    ([("/abs", "file", "x")], "absolute path"),
    ([("pkg/../../x", "file", "x")], "'..'"),
])
def test_unsafe_members_are_refused(tmp_path, members, reason):
    _refused(tmp_path, members, reason)


def test_a_hard_link_to_a_file_of_the_tree_is_a_copy(tmp_path):
    archive = _tar(tmp_path / "ok.tar.gz", [("pkg/a", "file", "data"), ("pkg/b", "hard", "pkg/a"),
                                            ("pkg/sub/l", "sym", "../a")])
    tree = extract_archive(archive, tmp_path / "out")
    assert (tree / "b").read_text() == "data" and (tree / "b").stat().st_ino != (tree / "a").stat().st_ino
    assert (tree / "sub" / "l").read_text() == "data"


def test_size_and_member_caps(tmp_path):
    # A decompression bomb: 64 MiB of zeros in a small .tar.gz, against a 16 MiB cap.
    _refused(tmp_path, [("pkg/zeros", "file", bytes(64 << 20))], "unpacks to more than 16 MiB",
             ExtractLimits(max_bytes=16 << 20))
    shutil.rmtree(tmp_path / "box")
    (tmp_path / "evil.tar.gz").unlink()
    _refused(tmp_path, [(f"pkg/f{i}", "file", "x") for i in range(20)], "more than 10 members",
             ExtractLimits(max_members=10))


@pytest.mark.parametrize("content", [b"not a tarball at all", None])
def test_damaged_archives_are_one_message(tmp_path, content):
    archive = tmp_path / "bad.tar.gz"
    if content is None:  # a real tarball cut in half
        _tar(tmp_path / "whole.tar.gz", [(f"pkg/f{i}", "file", os.urandom(4096)) for i in range(30)])
        archive.write_bytes((tmp_path / "whole.tar.gz").read_bytes()[:40000])
    else:
        archive.write_bytes(content)
    with pytest.raises(SourceError) as info:
        extract_archive(archive, tmp_path / "out")
    assert "cannot extract bad.tar.gz" in info.value.what
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_recipe_extract_limits_are_validated_and_used(project):
    project.recipe("cap", textwrap.dedent(f"""\
        name: cap
        summary: capped
        license: MIT
        versions: {{"1.0": {{sha256: {"a" * 64}}}}}
        source: {{url: "https://example.invalid/cap.tar.gz", extract: {{max_mib: 1, max_members: 5}}}}
        build: {{system: make}}
        """))
    spec = load_recipe(project.root / "recipes" / "cap.yaml").resolve().sources[0]
    assert spec.extract_limits() == ExtractLimits(max_bytes=1 << 20, max_members=5)
    (project.root / "recipes" / "cap.yaml").write_text(
        (project.root / "recipes" / "cap.yaml").read_text().replace("max_mib: 1", "max_mib: -1"))
    with pytest.raises(RecipeError, match="must be a positive whole number"):
        load_recipe(project.root / "recipes" / "cap.yaml")


# ----------------------------------------------------------------------------- recipes

def recipe_header(name: str = "bad") -> str:
    """The seven lines of a valid recipe that hostile bodies are added to."""
    return textwrap.dedent(f"""\
        name: {name}
        summary: s
        license: MIT
        versions:
          "1.0": {{sha256: {"a" * 64}}}
        source: {{url: "https://example.invalid/x.tar.gz"}}
        build: {{system: make}}
        """)


def _recipe_file(project, body: str, name: str = "bad") -> Path:
    path = project.root / "recipes" / f"{name}.yaml"
    path.write_text(recipe_header(name) + textwrap.dedent(body))
    return path


def test_a_yaml_alias_bomb_is_refused_quickly(project):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = project.root / "recipes" / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nname: bomb\n")
    start = time.monotonic()
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert time.monotonic() - start < 5
    assert "more than" in info.value.what and "bomb.yaml:" in info.value.where


def test_deep_nesting_is_refused_with_its_line(project):
    path = project.root / "recipes" / "deep.yaml"
    path.write_text("name: deep\nx: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "nests deeper than" in info.value.what and info.value.where == f"{path}:2"


def test_a_recipe_that_is_not_utf8_is_one_message(project):
    path = project.root / "recipes" / "latin.yaml"
    path.write_bytes(b"name: latin\nsummary: caf\xe9\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "not UTF-8" in info.value.what and info.value.where == f"{path}:2"


@pytest.mark.parametrize("body, message", [
    ("x: !!python/object/apply:os.system ['touch /tmp/wasmforge-pwned']\n", "unsupported YAML tag"),
    ("x: !custom value\n", "unsupported YAML tag"),
    ("x: !!binary aGVsbG8=\n", "unsupported YAML tag"),
    ("x: 2024-01-01\n", "unsupported YAML tag"),
])
def test_odd_yaml_tags_are_refused(project, body, message):
    path = _recipe_file(project, body)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert message in info.value.what and info.value.where.startswith(f"{path}:")
    assert not Path("/tmp/wasmforge-pwned").exists()


@pytest.mark.parametrize("template, message", [
    ("${{ ''.__class__.__mro__[1].__subclasses__() }}", "template refused"),
    ("${{ cycler.__init__.__globals__.os.system('id') }}", "template refused"),
    ("${{ lipsum }}", "is undefined"),
    ("${{ no_such_variable }}", "is undefined"),
    ("${{ 1 / 0 }}", "ZeroDivisionError"),
    ("${{ version + 1 }}", "TypeError"),
    ("${{ 'a' * 100000000 }}", "value too large"),
    ("${{ 2 ** 100000 }}", "exponent too large"),
    ("${{ version", "template syntax error"),
])
def test_templates_are_sandboxed_and_errors_point_into_the_recipe(project, template, message):
    path = _recipe_file(project, f'outputs: {{out: "{template}"}}\n')
    recipe = load_recipe(path)
    with pytest.raises(RecipeError) as info:
        recipe.resolve()
    assert message in info.value.what, info.value.render()
    assert info.value.where == f"{path}:8" and "outputs.out" in info.value.what


@pytest.mark.parametrize("body, message", [
    ('tests: [{run: [x], timeout: -1}]\noutputs: {x: x}\n', "must be a positive number"),
    ('tests: [{run: [x], timeout: 0}]\noutputs: {x: x}\n', "must be a positive number"),
    ('tests: [{run: [x], timeout: "soon"}]\noutputs: {x: x}\n', "must be a number"),
    ('tests: [{run: [x], timeout: 10000000000}]\noutputs: {x: x}\n', "must be at most 1e.09 seconds"),
])
def test_bad_numbers_in_recipes(project, body, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe_file(project, body))


def test_a_recipe_that_links_outside_the_recipes_directory_is_refused(project, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:$6$not-for-your-eyes\n")
    (project.root / "recipes" / "evil.yaml").symlink_to(secret)
    with pytest.raises(RecipeError) as info:
        load_recipe(project.root / "recipes" / "evil.yaml")
    assert "is a link to" in info.value.what and "not-for-your-eyes" not in info.value.render()


@pytest.mark.parametrize("source, message", [
    ('{url: "https://example.invalid/x.tar.gz", filename: "../../x.tar.gz"}', "not a plain file name"),
    ('{url: "https://example.invalid/x.tar.gz", filename: ".hidden"}', "not a plain file name"),
    ('{url: "https://example.invalid/.."}', "not a plain file name"),
    ('{url: "https://example.invalid/${{ \'..\' }}"}', "not a plain file name"),
])
def test_source_file_names_must_be_plain(project, source, message):
    path = _recipe_file(project, "")
    path.write_text(path.read_text().replace('source: {url: "https://example.invalid/x.tar.gz"}', f"source: {source}"))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path).resolve()


@pytest.mark.parametrize("test, message", [
    ("{run: [x], dirs: {/etc: /etc}}", "outside this checkout"),
    ("{run: [x], dirs: {/up: ../../..}}", "outside this checkout"),
    ("{run: [x], dirs: {/up: 'build:../..'}}", "'build:../..' is not a directory of the build"),
    ("{run: [x], dirs: {/etc: 'build:/etc'}}", "'build:/etc' is not a directory of the build"),
    ("{run: [x], scratch: {../../escape.txt: hi}}", "must be a relative path inside /scratch"),
    ("{run: [x], files: {/etc/passwd: root}}", "must be a relative path inside /scratch"),
])
def test_smoke_tests_cannot_reach_outside(project, test, message):
    path = _recipe_file(project, f"outputs: {{x: x}}\ntests:\n  - {test}\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(path).resolve()


@pytest.mark.parametrize("run, message", [
    ("{y: {script: [-f]}}", "'y' is not one of this recipe's outputs"),
    ("{x: {dirs: {/data: /etc}}}", "'/etc' is not a directory of the build"),
    ("{x: {dirs: {/data: ../share}}}", "'../share' is not a directory of the build"),
    ("{x: {dirs: {/data: 'build:../..'}}}", "'build:../..' is not a directory of the build"),
    ("{x: {dirs: {/data: 'build:'}}}", "'build:' is not a directory of the build"),
    ("{x: {dirs: {data: 'build:share'}}}", "'data' is not an absolute guest path"),
    ("{x: {dirs: {/a/../b: 'build:share'}}}", "is not an absolute guest path"),
    ("{x: {env: {A: [1]}}}", "must be a string or number"),
    ("{x: {stdin: hello}}", "unknown key"),
])
def test_a_programs_run_defaults_name_only_its_own_build(project, run, message):
    path = _recipe_file(project, f"outputs: {{x: x}}\nrun: {run}\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_a_programs_run_defaults_are_read(project):
    path = _recipe_file(project, "outputs: {x: x}\nrun: {x: {dirs: {/d: 'build:share/d'}, env: {A: 1}, script: [-f]}}\n")
    assert load_recipe(path).run["x"] == RunDefaults(build_dirs=(("/d", "share/d"),), env=(("A", "1"),), script=("-f",))


def test_a_smoke_tests_build_directory_that_a_link_takes_outside_the_build_is_not_preopened(tmp_path):
    from wasmforge.recipe import SmokeTest, TestStep
    from wasmforge.smoke import run_smoke_test

    build = tmp_path / "build"
    (build / "bin").mkdir(parents=True)
    (build / "share").mkdir()
    (build / "share" / "data").symlink_to(tmp_path)  # store content, edited: a link out of the build
    test = SmokeTest(name="t", where="here", build_dirs=(("/data", "share/data"),), steps=(
        TestStep(run=("x",)),))
    outcome = run_smoke_test(test, build / "bin", Runner())
    assert not outcome.passed and outcome.duration == 0  # nothing was run
    assert outcome.problems == (f"build:share/data is not a directory inside the build {build}",)


@pytest.mark.parametrize("subdir", ["../..", "/etc", "source/../..", ""])
def test_a_build_subdir_stays_inside_the_source_tree(project, subdir):
    path = _recipe_file(project, "outputs: {x: x}\n")
    path.write_text(path.read_text().replace("build: {system: make}", f"build: {{system: make, subdir: '{subdir}'}}"))
    with pytest.raises(RecipeError, match="is not a relative path inside the source tree"):
        load_recipe(path)


def test_an_empty_patch_or_a_stray_file_in_a_series_is_an_error(project):
    project.patch("p", "1", "0001-real.patch", "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n")
    assert len(patch_series(project.root / "patches", "p", "1", where="w")) == 1
    empty = project.patch("p", "1", "0002-empty.patch", "Just a description, no hunks.\n")
    with pytest.raises(PatchError, match="is empty"):
        patch_series(project.root / "patches", "p", "1", where="w")
    empty.unlink()
    project.patch("p", "1", "0002-notes.txt", "forgotten notes\n")
    with pytest.raises(PatchError, match="is not a patch file"):
        patch_series(project.root / "patches", "p", "1", where="w")


# ----------------------------------------------------------------------------- downloads

class Server:
    """A 127.0.0.1 HTTP server whose answers are functions of the request handler."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]] = {}
        self.hits: dict[str, int] = {}
        routes, hits = self.routes, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                hits[self.path] = hits.get(self.path, 0) + 1
                route = routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                route(self)

            def log_message(self, *args: object) -> None:
                pass

        class Quiet(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
                pass  # a client that gave up on a trickle or a bad header is expected here

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def http_server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _answer(status: int, body: bytes, headers: dict[str, str] | None = None):
    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return handle


TARBALL = gzip.compress(b"pretend this is a tar file " * 1000, mtime=0)
TARBALL_SHA = hashlib.sha256(TARBALL).hexdigest()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(sources, "RETRY_PAUSE", 0.01)


def test_a_tarball_served_with_content_encoding_gzip_arrives_as_the_file(project, http_server):
    seen: list[str] = []

    def handle(h):
        seen.append(h.headers.get("Accept-Encoding", ""))
        _answer(200, TARBALL, {"Content-Encoding": "gzip", "Content-Type": "application/x-tar"})(h)
    http_server.routes["/x.tar.gz"] = handle
    fetched = fetch_sources([SourceSpec(sha256=TARBALL_SHA, url=http_server.url("/x.tar.gz"))], project.config,
                            log=lambda m: None)
    assert fetched.path.read_bytes() == TARBALL
    assert seen == ["identity"]


@pytest.mark.parametrize("status", [503, 500, 429])
def test_server_errors_are_retried_honouring_retry_after(project, http_server, fast_retries, status):
    def handle(h):
        if http_server.hits["/x.tar.gz"] == 1:
            _answer(status, b"busy", {"Retry-After": "1"})(h)
        else:
            _answer(200, TARBALL)(h)
    http_server.routes["/x.tar.gz"] = handle
    messages: list[str] = []
    start = time.monotonic()
    fetched = fetch_sources([SourceSpec(sha256=TARBALL_SHA, url=http_server.url("/x.tar.gz"))], project.config,
                            log=messages.append)
    assert fetched.path.read_bytes() == TARBALL and http_server.hits["/x.tar.gz"] == 2
    assert time.monotonic() - start >= 1.0  # Retry-After: 1
    assert any(f"HTTP {status}" in m and "retrying in 1 s" in m for m in messages)


def test_retry_after_as_an_http_date_is_honoured(project, http_server, fast_retries):
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)

    def handle(h):
        if http_server.hits["/x.tar.gz"] == 1:
            _answer(503, b"busy", {"Retry-After": when})(h)
        else:
            _answer(200, TARBALL)(h)
    http_server.routes["/x.tar.gz"] = handle
    messages: list[str] = []
    start = time.monotonic()
    fetch_sources([SourceSpec(sha256=TARBALL_SHA, url=http_server.url("/x.tar.gz"))], project.config,
                  log=messages.append)
    assert time.monotonic() - start >= 0.9  # the date is whole seconds: between 1 and 2 s away
    assert any("retrying in" in m for m in messages)


def test_a_server_that_keeps_failing_is_given_up_on(project, http_server, fast_retries):
    http_server.routes["/x.tar.gz"] = _answer(503, b"down")
    with pytest.raises(SourceError) as info:
        fetch_sources([SourceSpec(sha256=TARBALL_SHA, url=http_server.url("/x.tar.gz"))], project.config,
                      log=lambda m: None)
    assert "HTTP 503 (after 3 attempts)" in info.value.details
    assert http_server.hits["/x.tar.gz"] == 3


def test_a_trickling_server_is_given_up_on_at_the_deadline(project, http_server):
    def trickle(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(TARBALL)))
        h.end_headers()
        for byte in TARBALL[:200]:
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            time.sleep(0.1)
    http_server.routes["/x.tar.gz"] = trickle
    config = Config(**{**project.config.__dict__, "download_deadline": 1.5})
    start = time.monotonic()
    with pytest.raises(SourceError) as info:
        fetch_sources([SourceSpec(sha256=TARBALL_SHA, url=http_server.url("/x.tar.gz"))], config, log=lambda m: None)
    assert "gave up after 1.5 s" in info.value.details
    assert time.monotonic() - start < 6 and http_server.hits["/x.tar.gz"] == 1
    assert not any(p.is_file() for p in config.source_cache.rglob("*"))


def test_a_server_trickling_its_headers_is_given_up_on_at_the_deadline(project, http_server):
    def trickle(h):
        h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(100):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.2)
    http_server.routes["/x.tar.gz"] = trickle
    config = Config(**{**project.config.__dict__, "download_deadline": 1.5})
    start = time.monotonic()
    with pytest.raises(SourceError) as info:
        fetch_sources([SourceSpec(sha256=TARBALL_SHA, url=http_server.url("/x.tar.gz"))], config, log=lambda m: None)
    assert "gave up after 1.5 s" in info.value.details and "headers" in info.value.details
    assert time.monotonic() - start < 6
    assert not any(p.is_file() for p in config.source_cache.rglob("*"))


def test_a_malformed_content_length_is_one_message(project, http_server):
    http_server.routes["/x.tar.gz"] = _answer(200, TARBALL, {"Content-Length": "12abc"})
    with pytest.raises(SourceError) as info:
        fetch_sources([SourceSpec(sha256=TARBALL_SHA, url=http_server.url("/x.tar.gz"))], project.config,
                      log=lambda m: None)
    assert "x.tar.gz" in info.value.render()
    assert not any(p.is_file() for p in project.config.source_cache.rglob("*"))


def test_the_source_cache_is_checked_at_every_use(project, http_server):
    spec = SourceSpec(sha256=TARBALL_SHA, url=http_server.url("/x.tar.gz"))
    http_server.routes["/x.tar.gz"] = _answer(200, TARBALL)
    cached = cache_path(project.config, TARBALL_SHA, "x.tar.gz")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"bad bytes planted at the cache path")
    messages: list[str] = []
    fetched = fetch_sources([spec], project.config, log=messages.append)
    assert fetched.origin != "cache" and fetched.path.read_bytes() == TARBALL
    assert any("does not match its sha256" in m for m in messages)
    assert fetch_sources([spec], project.config, log=lambda m: None).origin == "cache"


# ----------------------------------------------------------------------------- running modules

@pytest.fixture(scope="module")
def prog(toolchain, tmp_path_factory) -> Path:
    return _compile(toolchain, tmp_path_factory.mktemp("hostile-modules"), "prog", PROGRAM)


@pytest.fixture
def precompiled(prog, tmp_path) -> Path:
    wasm = tmp_path / "prog.wasm"
    shutil.copyfile(prog, wasm)
    precompile(wasm)
    return wasm


def _edit_keeping_size_and_mtime(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_an_edited_cwasm_with_the_same_size_and_mtime_is_not_run(precompiled):
    assert Runner().run(precompiled, ["prog", "exit", "4"]).precompiled
    _edit_keeping_size_and_mtime(precompiled_path(precompiled))
    result = Runner().run(precompiled, ["prog", "exit", "4"])
    assert not result.precompiled and result.exit_code == 4


def test_another_programs_cwasm_and_key_are_not_run(precompiled, toolchain, tmp_path):
    other = _compile(toolchain, tmp_path, "other", '#include <stdio.h>\nint main(void){puts("other");return 9;}\n')
    precompile(other)
    shutil.copyfile(precompiled_path(other), precompiled_path(precompiled))
    shutil.copyfile(other.with_suffix(".cwasm.json"), precompiled.with_suffix(".cwasm.json"))
    result = Runner().run(precompiled, ["prog", "exit", "4"])
    assert not result.precompiled and result.exit_code == 4 and result.stdout == b"bye\n"


@pytest.fixture(scope="module")
def launcher() -> Path:
    from wasmforge.run import build_launcher

    return build_launcher(Config.from_env().cache_dir)


def test_the_launcher_runs_only_verified_precompiled_code(precompiled, launcher, toolchain, tmp_path):
    env = {"WASMFORGE_RUN_DEBUG": "1"}
    run = [str(launcher), str(precompiled), "exit", "4"]
    result = subprocess.run(run, capture_output=True, text=True, env=env)
    assert result.returncode == 4 and "precompiled" in result.stderr
    _edit_keeping_size_and_mtime(precompiled_path(precompiled))
    result = subprocess.run(run, capture_output=True, text=True, env=env)
    assert result.returncode == 4 and "does not match its key" in result.stderr and "compiling" in result.stderr
    other = _compile(toolchain, tmp_path, "other", '#include <stdio.h>\nint main(void){puts("other");return 9;}\n')
    precompile(other)
    shutil.copyfile(precompiled_path(other), precompiled_path(precompiled))
    shutil.copyfile(other.with_suffix(".cwasm.json"), precompiled.with_suffix(".cwasm.json"))
    result = subprocess.run(run, capture_output=True, text=True, env=env)
    assert result.returncode == 4 and result.stdout == "bye\n" and "compiling" in result.stderr


def test_the_launcher_uses_precompiled_code_only_for_this_engine_and_cpu(precompiled, launcher):
    env = {"WASMFORGE_RUN_DEBUG": "1"}
    key_file = precompiled.with_suffix(".cwasm.json")
    for field, value in (("arch", "sparc"), ("cpu", "0123456789abcdef"), ("wasmtime", "1.0.0")):
        key = json.loads(key_file.read_text())
        original = key["aot"][field]
        key["aot"][field] = value
        key_file.write_text(json.dumps(key, indent=2) + "\n")
        result = subprocess.run([str(launcher), str(precompiled), "exit", "4"], capture_output=True, text=True, env=env)
        assert result.returncode == 4 and "made for another engine or CPU" in result.stderr, field
        assert "compiling" in result.stderr and "precompiled" not in result.stderr.replace("no usable", "")
        key["aot"][field] = original
        key_file.write_text(json.dumps(key, indent=2) + "\n")
    result = subprocess.run([str(launcher), str(precompiled), "exit", "4"], capture_output=True, text=True, env=env)
    assert result.returncode == 4 and "wasmforge-run: precompiled" in result.stderr


def test_the_memory_limit_is_named_when_a_module_does_not_fit(prog):
    with pytest.raises(RunError) as info:
        Runner().run(prog, ["prog"], memory_limit=1 << 16)  # one page
    assert "more memory than the limit of 0.0625 MiB" in info.value.render()


@pytest.mark.parametrize("how", ["python", "launcher"])
def test_a_closed_stdin_reads_as_empty_not_as_a_file_we_opened(precompiled, launcher, how):
    command = [sys.executable, "-m", "wasmforge.run", str(precompiled), "--", "cat"] if how == "python" \
        else [str(launcher), str(precompiled), "cat"]
    result = subprocess.run(["bash", "-c", 'exec "$@" <&-', "bash", *command], capture_output=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""


@pytest.mark.parametrize("how", ["python", "launcher"])
@pytest.mark.parametrize("closed", ["1", "2"])
def test_a_closed_stdout_or_stderr_is_not_a_file_we_opened(precompiled, launcher, how, closed):
    # The module writes to the closed descriptor: it must go nowhere (not into a .cwasm or key file we
    # opened on that number), and the run ends normally.
    command = [sys.executable, "-m", "wasmforge.run", str(precompiled), "--", "cat"] if how == "python" \
        else [str(launcher), str(precompiled), "cat"]
    before = {p: p.read_bytes() for p in precompiled.parent.iterdir()}
    result = subprocess.run(["bash", "-c", f'exec "$@" {closed}>&-', "bash", *command], input=b"written\n",
                            capture_output=True, cwd=ROOT)
    assert result.returncode == 0
    assert {p: p.read_bytes() for p in precompiled.parent.iterdir()} == before


@pytest.mark.parametrize("how", ["python", "launcher"])
def test_the_timeout_stops_a_module_blocked_on_input(precompiled, launcher, how):
    command = [sys.executable, "-m", "wasmforge.run", str(precompiled), "--timeout", "1", "--", "cat"] \
        if how == "python" else [str(launcher), "--timeout", "1", str(precompiled), "cat"]
    idle, writer = os.pipe()  # we keep the writing end open and write nothing: the module blocks reading
    proc = subprocess.Popen(command, stdin=idle, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    os.close(idle)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        os.close(writer)
    assert proc.returncode == 134 and b"killed by the timeout" in err


def test_truncated_modules_and_modules_without_start_are_one_message(prog, tmp_path):
    truncated = tmp_path / "truncated.wasm"
    truncated.write_bytes(prog.read_bytes()[:1000])
    with pytest.raises(RunError):
        Runner().run(truncated, ["truncated"])
    empty = tmp_path / "empty.wasm"
    empty.write_bytes(b"\0asm\x01\0\0\0")
    with pytest.raises(RunError, match="has no _start function"):
        Runner().run(empty, ["empty"])
    for module in (truncated, empty):
        result = subprocess.run([sys.executable, "-m", "wasmforge.run", str(module)], capture_output=True, text=True)
        assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "lua", "--timeout", "abc"], "--timeout: 'abc' is not a number"),
    (["run", "lua", "--timeout", "-3"], "--timeout: '-3' must be a positive number"),
    (["run", "lua", "--memory", "-1"], "--memory: '-1' must be a positive number"),
    (["run", "lua", "--memory", "1.5"], "--memory: '1.5' must be a whole number"),
    (["build", "lua", "--jobs", "many"], "--jobs: 'many' is not a number"),
    (["build", "lua", "--jobs", "0"], "--jobs: '0' must be a positive number"),
    (["run", "lua", "--timeout", "1e10"], "--timeout: '1e10' is too large (at most 1e+09)"),
    (["run", "lua", "--timeout", ""], "--timeout: '' is not a number"),
    (["run", "lua", "--memory", "1e30"], "--memory: '1e30' is too large (at most 4096)"),
])
def test_bad_numbers_on_the_command_line_are_one_message(args, message):
    result = subprocess.run([*INVOKE, *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_python_m_wasmforge_run_refuses_a_bad_timeout(prog):
    result = subprocess.run([sys.executable, "-m", "wasmforge.run", str(prog), "--timeout", "x", "--"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "--timeout: 'x' is not a number" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- the store

def _hello(project, toolchain):
    sha = _source(project, "hello", "1.0", {"hello.c": HELLO_C, "Makefile": MAKEFILE})
    project.recipe("hello", _recipe("hello", sha, HELLO_RECIPE))
    results, _ = _build(project, toolchain, "hello-1.0")
    return results[-1]


def test_an_entry_with_an_extra_or_edited_file_is_not_used(project, toolchain):
    result = _hello(project, toolchain)
    book = RecipeBook.load(project.config.recipes_dir)
    package = book.package(book.parse_target("hello-1.0"))
    out, manifest = stored_output(project.config, package)
    assert manifest["key"] == result.key and manifest["logs"]
    (result.prefix / "bin" / "planted.sh").write_text("#!/bin/sh\necho planted\n")
    with pytest.raises(WasmforgeError, match="planted.sh is not in the manifest"):
        stored_output(project.config, package)
    # python -m wasmforge.run refuses a module of a damaged entry too
    run = subprocess.run([sys.executable, "-m", "wasmforge.run", str(out / "bin" / "hello.wasm")],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "damaged artifact store entry" in run.stderr and run.stdout == ""
    (result.prefix / "bin" / "planted.sh").unlink()
    _edit_keeping_size_and_mtime(result.prefix / "bin" / "hello.wasm")
    with pytest.raises(WasmforgeError, match="hello.wasm does not match its sha256"):
        stored_output(project.config, package)
    # the next build notices, discards and rebuilds it
    again, messages = _build(project, toolchain, "hello-1.0")
    assert not again[-1].reused and any("discarding the damaged entry" in m for m in messages)
    stored_output(project.config, package)


def test_the_launcher_refuses_modules_of_a_damaged_entry(project, toolchain, launcher):
    result = _hello(project, toolchain)
    book = RecipeBook.load(project.config.recipes_dir)
    out, _ = stored_output(project.config, book.package(book.parse_target("hello-1.0")))
    module = out / "bin" / "hello.wasm"
    ok = subprocess.run([str(launcher), str(module)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == "hello world\n"
    bin_dir = result.prefix / "bin"
    commands = {"launcher": [str(launcher)], "python": [sys.executable, "-m", "wasmforge.run"]}
    # A module planted in the entry (not in its manifest) is not run.
    shutil.copyfile(module, bin_dir / "planted.wasm")
    for how, command in commands.items():
        run = subprocess.run([*command, str(out / "bin" / "planted.wasm")], capture_output=True, text=True)
        assert run.returncode == 1 and "damaged artifact store entry" in run.stderr and run.stdout == "", how
    (bin_dir / "planted.wasm").unlink()
    # Precompiled code swapped for other code with a key of its own: refused, not just skipped.
    other = bin_dir / "other.wasm"
    shutil.copyfile(module, other)
    with other.open("ab") as f:
        f.write(b"\x00\x04\x03abc")  # a custom section named "abc": another module, the same behaviour
    precompile(other)
    os.replace(bin_dir / "other.cwasm", bin_dir / "hello.cwasm")
    os.replace(bin_dir / "other.cwasm.json", bin_dir / "hello.cwasm.json")
    other.unlink()
    data = json.loads((bin_dir / "hello.cwasm.json").read_text())
    data["wasm_sha256"] = hashlib.sha256(module.read_bytes()).hexdigest()
    (bin_dir / "hello.cwasm.json").write_text(json.dumps(data, indent=2) + "\n")
    for how, command in commands.items():
        run = subprocess.run([*command, str(module)], capture_output=True, text=True)
        assert run.returncode == 1 and "damaged artifact store entry" in run.stderr and run.stdout == "", how
    # Without its manifest.json an entry is still an entry, and damaged.
    again, _ = _build(project, toolchain, "hello-1.0")
    (again[-1].prefix / "manifest.json").unlink()
    for how, command in commands.items():
        run = subprocess.run([*command, str(again[-1].prefix / "bin" / "hello.wasm")], capture_output=True, text=True)
        assert run.returncode == 1 and "damaged artifact store entry" in run.stderr and run.stdout == "", how


def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and \
        subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


needs_mounts = pytest.mark.skipif(not _unshare_works(), reason="needs user and mount namespaces (unshare -rm)")

BUILD_SCRIPT = """
import json, sys
from wasmforge.config import Config
from wasmforge.errors import WasmforgeError
from wasmforge.pipeline import build_target
from wasmforge.recipe import RecipeBook
from wasmforge.toolchain import find_toolchain
args = json.loads(sys.argv[1])
config = Config(root=args["root"], output_dir=args["out"], store_dir=args["store"], cache_dir=args["cache"],
                mirrors=tuple(args["mirrors"]), use_debian_archive=False)
book = RecipeBook.load(config.recipes_dir)
try:
    result = build_target(book, book.parse_target("hello-1.0"), config, find_toolchain(Config.from_env()),
                          log=lambda m: print(m, flush=True))[-1]
except WasmforgeError as exc:
    print("error: " + exc.render())
    sys.exit(1)
print("reused" if result.reused else "built")
"""


def _build_in_namespace(project, mount: str, store: Path, out: Path) -> subprocess.CompletedProcess[str]:
    args = json.dumps({"root": str(project.root), "out": str(out), "store": str(store),
                       "cache": str(project.config.cache_dir), "mirrors": list(project.config.mirrors)})
    # After the build, list what the store holds besides its lock and scratch directories (inside the
    # namespace: a tmpfs store vanishes with it).
    script = (f"{mount} && {sys.executable} -c \"$0\" \"$1\"; rc=$?; "
              f"find {store} -mindepth 1 -not -path '*/.locks*' -not -name .tmp | sed 's/^/STORED: /'; exit $rc")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, BUILD_SCRIPT, args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


@needs_mounts
def test_a_read_only_store_still_serves_hits(project, toolchain, tmp_path):
    result = _hello(project, toolchain)
    store = project.config.artifacts
    ro = f"mount --bind {store} {store} && mount -o remount,bind,ro {store} {store}"
    run = _build_in_namespace(project, ro, store, tmp_path / "other-output")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "\nreused\n" in run.stdout and "Traceback" not in run.stderr
    assert (tmp_path / "other-output" / "hello" / "1.0").resolve() == result.prefix


@needs_mounts
def test_a_full_store_is_one_message_and_leaves_nothing_half_written(project, toolchain, tmp_path):
    _source(project, "hello", "1.0", {"hello.c": HELLO_C, "Makefile": MAKEFILE})
    sha = hashlib.sha256((Path(project.config.mirrors[0]) / "hello-1.0.tar.gz").read_bytes()).hexdigest()
    project.recipe("hello", _recipe("hello", sha, HELLO_RECIPE))
    store = tmp_path / "tiny-store"
    store.mkdir()
    run = _build_in_namespace(project, f"mount -t tmpfs -o size=48k tmpfs {store}", store, tmp_path / "out")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "error: " in run.stdout and "No space left on device" in run.stdout and "Traceback" not in run.stderr
    assert "hint: free some space" in run.stdout
    assert "STORED: " not in run.stdout  # no entry, nothing half-written


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_a_killed_build_leaves_no_compiler_running(project, toolchain, tmp_path, how):
    marker = f"{os.getpid() % 1000 + 98000 + 1000 * int(how)}"
    sha = _source(project, "slow", "1.0", {"Makefile": f"all:\n\tsleep {marker} & sleep {marker}.5; wait\n"})
    project.recipe("slow", _recipe("slow", sha, """\
        build:
          system: make
          install: []
        outputs:
          slow: slow
        """))
    args = json.dumps({"root": str(project.root), "out": str(project.config.outputs),
                       "store": str(project.config.artifacts), "cache": str(project.config.cache_dir),
                       "mirrors": list(project.config.mirrors)})
    script = BUILD_SCRIPT.replace("hello-1.0", "slow-1.0")
    # A build started from a terminal has SIGINT at its default, so Python turns Ctrl-C into KeyboardInterrupt.
    # Whoever started this test run may have ignored SIGINT (a shell's `cmd &` does), and an ignored signal is
    # inherited across exec and kept by Python: restore the default so the child is the build a user has.
    proc = subprocess.Popen([sys.executable, "-c", script, args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def sleepers() -> list[str]:
        out = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True).stdout
        return out.split()
    deadline = time.monotonic() + 60
    while len(sleepers()) < 2 and time.monotonic() < deadline:  # the shell and its two sleeps
        time.sleep(0.2)
    assert len(sleepers()) >= 2, "the build's make step did not start"
    proc.send_signal(how)  # SIGINT: as Ctrl-C would (the steps are in process groups of their own)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while sleepers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sleepers() == []


def _forge_stamp(directory: Path, path: Path, digest: str) -> None:
    st = path.stat()
    (directory / f"{st.st_dev}-{st.st_ino}").write_text(f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {digest}\n")


def test_digests_are_remembered_per_file_state_and_only_in_a_private_directory(precompiled, launcher, tmp_path,
                                                                              monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("WASMFORGE_CACHE", str(cache))
    assert Runner().run(precompiled, ["prog", "exit", "4"]).precompiled
    cwasm = precompiled_path(precompiled)
    key = json.loads(cwasm.with_name(cwasm.name + ".json").read_text())
    st = cwasm.stat()
    stamp = cache / "verified" / f"{st.st_dev}-{st.st_ino}"
    assert stamp.read_text() == f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {key['cwasm_sha256']}\n"
    assert (cache / "verified").stat().st_mode & 0o777 == 0o700
    # An edit changes the file's ctime, so the stamp no longer applies: the code is hashed again.
    _edit_keeping_size_and_mtime(cwasm)
    assert not Runner().run(precompiled, ["prog", "exit", "4"]).precompiled
    # A stamp that claims the edited file is fine is believed only from a directory private to us.
    (cache / "verified").chmod(0o777)
    _forge_stamp(cache / "verified", cwasm, key["cwasm_sha256"])
    assert not Runner().run(precompiled, ["prog", "exit", "4"]).precompiled
    result = subprocess.run([str(launcher), str(precompiled), "exit", "4"], capture_output=True, text=True,
                            env={**os.environ, "WASMFORGE_RUN_DEBUG": "1"})
    assert result.returncode == 4 and "does not match its key" in result.stderr


def test_a_patch_that_creates_a_link_out_of_the_tree_is_refused(project, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("a\n")
    patch = project.patch("p", "1", "0001-link.patch", textwrap.dedent("""\
        diff --git a/escape b/escape
        new file mode 120000
        --- /dev/null
        +++ b/escape
        @@ -0,0 +1 @@
        +../../../../etc
        \\ No newline at end of file
        """))
    from wasmforge.patches import apply_series

    with pytest.raises(PatchError) as info:
        apply_series(tree, patch_series(project.root / "patches", "p", "1", where="w"), tmp_path / "patch.log")
    assert "point outside the source tree" in info.value.what and "escape -> ../../../../etc" in info.value.details
    assert patch.exists()
