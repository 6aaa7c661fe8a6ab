"""The artifact store: build keys, hits without compiling, atomic entries, damaged entries, kills."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_build import HELLO_C, HELLO_RECIPE, MAKEFILE, _build, _recipe, _source

from wasmforge import pipeline
from wasmforge.config import Config
from wasmforge.pipeline import explain, plan
from wasmforge.recipe import RecipeBook
from wasmforge.runtime import Runner
from wasmforge.store import ArtifactStore

PATCH = """\
Say hi instead of hello.

--- a/hello.c
+++ b/hello.c
@@ -1,2 +1,2 @@
 #include <stdio.h>
-int main(int c, char **v){ printf("hello %s\\n", c > 1 ? v[1] : "world"); return 0; }
+int main(int c, char **v){ printf("hi %s\\n", c > 1 ? v[1] : "world"); return 0; }
"""


def _keys(project, toolchain, target="app", config=None) -> dict[str, str]:
    config = config or project.config
    book = RecipeBook.load(config.recipes_dir)
    return {p.package.name: p.key for p in plan(book, book.parse_target(target), config, toolchain)}


def _two_packages(project, *, lib_flags="-O2", app_extra="", lib_version_extra="", patch=PATCH):
    """`lib` (patched) and `app`, which depends on it; nothing needs to be fetched to plan them."""
    project.patch("lib", "1", "0001-hi.patch", patch)
    project.recipe("lib", textwrap.dedent(f"""\
        name: lib
        summary: a library
        license: MIT
        versions:
          "1.0":
            sha256: {"a" * 64}
            patches: "1"
          {lib_version_extra}
        source:
          url: https://example.invalid/lib-${{{{ version }}}}.tar.gz
        build:
          system: make
          cflags: [{lib_flags}]
          make: [hello]
          install: []
        outputs:
          hello: hello
        flavors:
          small:
            summary: smaller
            build:
              cflags: [-Oz]
        """))
    project.recipe("app", textwrap.dedent(f"""\
        name: app
        summary: an application
        license: MIT
        versions:
          "1.0":
            sha256: {"b" * 64}
        source:
          url: https://example.invalid/app-${{{{ version }}}}.tar.gz
        depends: [lib]
        build:
          system: make
          make: [hello]
          install: []
        outputs:
          hello: hello
        {app_extra}
        """))


def test_each_input_class_changes_the_key_and_nothing_else_does(project, toolchain, monkeypatch):
    _two_packages(project)
    base = _keys(project, toolchain)

    def changed(**kwargs) -> dict[str, str]:
        _two_packages(project, **kwargs)
        keys = _keys(project, toolchain)
        _two_packages(project)
        return keys

    # The rendered recipe: a flag of the library changes its key and, through it, the app's.
    flags = changed(lib_flags="-O3")
    assert flags["lib"] != base["lib"] and flags["app"] != base["app"]
    # A patch's content.
    patched = changed(patch=PATCH.replace("hi %s", "hey %s"))
    assert patched["lib"] != base["lib"] and patched["app"] != base["app"]
    # The source (by sha256).
    text = (project.root / "recipes" / "app.yaml").read_text()
    (project.root / "recipes" / "app.yaml").write_text(text.replace("b" * 64, "c" * 64))
    source = _keys(project, toolchain)
    assert source["lib"] == base["lib"] and source["app"] != base["app"]
    (project.root / "recipes" / "app.yaml").write_text(text)
    # The flavor.
    assert _keys(project, toolchain, "lib-1.0-small")["lib"] != base["lib"]
    # The toolchain's identity.
    other = dataclasses.replace(toolchain, clang_version=toolchain.clang_version + " (patched)")
    assert _keys(project, other) != base and _keys(project, other)["lib"] != base["lib"]
    # wasmforge's build logic.
    monkeypatch.setattr(pipeline, "BUILD_LOGIC_VERSION", "test")
    assert _keys(project, toolchain)["lib"] != base["lib"]
    monkeypatch.undo()
    assert _keys(project, toolchain) == base

    # Nothing else: comments, another version of the recipe, smoke tests, and where, how fast and
    # with what cache the build runs.
    assert changed(app_extra="# a comment\n        tests:\n          - run: [hello]\n            stdout: \"x\\n\"") == base
    assert changed(lib_version_extra=f'"2.0": {{sha256: {"d" * 64}, patches: "1"}}') == base
    elsewhere = Config.from_env(root=project.root, output_dir=project.root / "elsewhere", jobs=1,
                                mirrors=("/nowhere",), cache_dir=project.root / "other-cache", use_ccache=False)
    assert _keys(project, toolchain, config=elsewhere) == base


def _hello(project):
    sha = _source(project, "hello", "1.0", {"hello.c": HELLO_C, "Makefile": MAKEFILE})
    project.recipe("hello", _recipe("hello", sha, HELLO_RECIPE))


def test_a_stored_build_is_a_hit_for_another_output_directory(project, toolchain):
    _hello(project)
    first, _ = _build(project, toolchain, "hello-1.0")
    entry = first[-1].prefix
    assert entry.parent.parent == project.config.artifacts and entry.name == first[-1].key
    assert first[-1].output.is_symlink() and first[-1].output.resolve() == entry

    project.config = dataclasses.replace(project.config, output_dir=project.root / "second-checkout")
    again, messages = _build(project, toolchain, "hello-1.0")
    assert again[-1].reused and not any("building" in m for m in messages)
    assert any("up to date (stored build" in m for m in messages)
    assert again[-1].output == project.root / "second-checkout" / "hello" / "1.0"
    assert Runner().run(again[-1].output / "bin" / "hello.wasm", ["hello"]).stdout == b"hello world\n"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_a_damaged_entry_is_discarded_and_rebuilt(project, toolchain, damage):
    _hello(project)
    first, _ = _build(project, toolchain, "hello-1.0")
    wasm = first[-1].prefix / "bin" / "hello.wasm"
    data = wasm.read_bytes()
    if damage == "truncate":
        wasm.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        wasm.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage == "delete":
        wasm.unlink()
    else:
        (first[-1].prefix / "manifest.json").write_text("{")
    again, messages = _build(project, toolchain, "hello-1.0")
    reason = {"truncate": "bin/hello.wasm has", "flip": "bin/hello.wasm does not match its sha256",
              "delete": "bin/hello.wasm is missing", "manifest": "manifest.json is unreadable"}[damage]
    assert any("discarding the damaged entry" in m and reason in m for m in messages), messages
    assert not again[-1].reused and again[-1].key == first[-1].key
    assert ArtifactStore(project.config.artifacts).problem(first[-1].key) is None
    assert Runner().run(again[-1].output / "bin" / "hello.wasm", ["hello"]).stdout == b"hello world\n"


def _build_process(project, target: str, output_dir) -> subprocess.Popen:
    code = textwrap.dedent(f"""\
        from wasmforge.config import Config
        from wasmforge.recipe import RecipeBook
        from wasmforge.pipeline import build_target
        from wasmforge.toolchain import find_toolchain
        cfg = Config.from_env(root={str(project.root)!r}, output_dir={str(output_dir)!r},
                              cache_dir={str(project.config.cache_dir)!r}, mirrors=({project.config.mirrors[0]!r},),
                              use_debian_archive=False)
        book = RecipeBook.load(cfg.recipes_dir)
        build_target(book, book.parse_target({target!r}), cfg, find_toolchain(Config.from_env()),
                     log=lambda m: print(m, flush=True))
        """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)


SLOW_LIB = """\
    build:
      system: script
      script:
        - sleep 3 && make hello
    outputs:
      hello: hello
    """


def test_a_build_killed_midway_leaves_store_and_output_consistent(project, toolchain):
    sha = _source(project, "slow", "1.0", {"hello.c": HELLO_C, "Makefile": MAKEFILE})
    project.recipe("slow", _recipe("slow", sha, SLOW_LIB))
    proc = _build_process(project, "slow", project.config.outputs)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "[slow-1.0] script-1" in line:
            break
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    key = _keys(project, toolchain, "slow")["slow"]
    store = ArtifactStore(project.config.artifacts)
    assert not store.entry(key).exists()
    assert not (project.config.outputs / "slow" / "1.0").exists()

    results, messages = _build(project, toolchain, "slow")
    assert not results[-1].reused and store.problem(key) is None
    assert not any(store.root.joinpath(".tmp").iterdir())  # what the killed build left is swept
    assert Runner().run(results[-1].output / "bin" / "hello.wasm", ["hello"]).stdout == b"hello world\n"


def test_two_builds_sharing_a_dependency_build_it_once(project, toolchain):
    sha = _source(project, "slow", "1.0", {"hello.c": HELLO_C, "Makefile": MAKEFILE})
    project.recipe("slow", _recipe("slow", sha, SLOW_LIB))
    for app in ("one", "two"):
        app_sha = _source(project, app, "1.0", {"hello.c": HELLO_C, "Makefile": MAKEFILE})
        project.recipe(app, _recipe(app, app_sha, "    depends: [slow]\n" + HELLO_RECIPE))
    # Two checkouts (own build-output each) sharing one store, building different dependants.
    first = _build_process(project, "one", project.root / "out-one")
    second = _build_process(project, "two", project.root / "out-two")
    out1, _ = first.communicate(timeout=120)
    out2, _ = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, out1 + out2
    both = out1 + out2
    assert both.count("slow-1.0: building") == 1
    assert "slow-1.0: up to date (stored build" in both
    assert (project.root / "out-one" / "slow" / "1.0").resolve() == (project.root / "out-two" / "slow" / "1.0").resolve()


def test_explain_names_hits_and_the_inputs_that_differ(project, toolchain):
    sha = _source(project, "base", "1.0", {"hello.c": HELLO_C, "Makefile": MAKEFILE})
    project.recipe("base", _recipe("base", sha, HELLO_RECIPE))
    app_sha = _source(project, "hello", "1.0", {"hello.c": HELLO_C, "Makefile": MAKEFILE})
    project.recipe("hello", _recipe("hello", app_sha, "    depends: [base]\n" + HELLO_RECIPE))
    book = RecipeBook.load(project.config.recipes_dir)
    lines = explain(book, book.parse_target("hello"), project.config, toolchain)
    assert lines[0].startswith("base-1.0 [") and lines[0].endswith("miss: no stored build of base")
    _build(project, toolchain, "hello-1.0")
    lines = explain(book, book.parse_target("hello"), project.config, toolchain)
    assert len(lines) == 2 and all(": hit (" in line for line in lines)

    project.recipe("hello", _recipe("hello", app_sha, "    depends: [base]\n" + HELLO_RECIPE.replace("-O2", "-O1")))
    book = RecipeBook.load(project.config.recipes_dir)
    text = "\n".join(explain(book, book.parse_target("hello"), project.config, toolchain))
    assert ": hit (" in text.splitlines()[0]
    assert "hello-1.0 [" in text and "miss: differs from the stored build" in text
    assert 'build.cflags: ["-O2"] -> ["-O1"]' in text


def test_ccache_serves_a_forced_rebuild_and_does_not_change_outputs(project, toolchain, monkeypatch, tmp_path):
    monkeypatch.setenv("CCACHE_DIR", str(tmp_path / "ccache"))
    # ccache caches compiling (-c), not linking: compile and link in two steps.
    makefile = "hello: hello.o\n\t$(CC) $(LDFLAGS) hello.o -o hello $(LIBS)\nhello.o: hello.c\n\t$(CC) $(CFLAGS) -c hello.c\n"
    sha = _source(project, "hello", "1.0", {"hello.c": HELLO_C, "Makefile": makefile})
    project.recipe("hello", _recipe("hello", sha, HELLO_RECIPE))
    first, messages = _build(project, toolchain, "hello-1.0")
    assert any("ccache: 0 of 1 compilations from the cache" in m for m in messages), messages
    again, messages = _build(project, toolchain, "hello-1.0", force=True)
    assert any("ccache: 1 of 1 compilations from the cache (100.0%)" in m for m in messages), messages
    manifest = json.loads((again[-1].prefix / "manifest.json").read_text())
    assert manifest["ccache"] == {"hits": 1, "misses": 0, "uncacheable": 1}  # the link
    wasm = manifest["outputs"]["bin/hello.wasm"]["sha256"]

    project.config = dataclasses.replace(project.config, use_ccache=False)
    plain, messages = _build(project, toolchain, "hello-1.0", force=True)
    assert not any("ccache:" in m for m in messages) and plain[-1].key == first[-1].key
    assert json.loads((plain[-1].prefix / "manifest.json").read_text())["outputs"]["bin/hello.wasm"]["sha256"] == wasm


class _CacheServer(http.server.BaseHTTPRequestHandler):
    """A minimal HTTP store for ccache's remote storage: PUT stores, GET/HEAD serve."""

    blobs: dict[str, bytes] = {}

    def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
        self.blobs[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(201)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        body = self.blobs.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        if body is not None and self.command == "GET":
            self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


def test_ccache_remote_storage_settings_pass_through(project, toolchain, monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CacheServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("CCACHE_REMOTE_STORAGE", f"http://127.0.0.1:{server.server_address[1]}/cache")
        makefile = "hello: hello.o\n\t$(CC) $(LDFLAGS) hello.o -o hello $(LIBS)\nhello.o: hello.c\n\t$(CC) $(CFLAGS) -c hello.c\n"
        sha = _source(project, "hello", "1.0", {"hello.c": HELLO_C, "Makefile": makefile})
        project.recipe("hello", _recipe("hello", sha, HELLO_RECIPE))
        monkeypatch.setenv("CCACHE_DIR", str(tmp_path / "worker-1"))
        _build(project, toolchain, "hello-1.0")
        assert _CacheServer.blobs, "the first build stored its result remotely"
        # Another worker (empty local cache) gets the compile result from the shared storage.
        monkeypatch.setenv("CCACHE_DIR", str(tmp_path / "worker-2"))
        _, messages = _build(project, toolchain, "hello-1.0", force=True)
        assert any("ccache: 1 of 1 compilations from the cache (100.0%)" in m for m in messages), messages
    finally:
        server.shutdown()
        server.server_close()


def _hand_made_entry(store: ArtifactStore, key: str) -> Path:
    """An entry written the way the store writes one: files, a link, and a manifest listing them."""
    from wasmforge.store import file_record
    entry = store.entry(key)
    (entry / "lib" / "python").mkdir(parents=True)
    for i in range(50):
        (entry / "lib" / "python" / f"m{i}.py").write_text(f"x = {i}\n")
    (entry / "bin").mkdir()
    (entry / "bin" / "prog.wasm").write_bytes(b"\0asm\1\0\0\0")
    (entry / "bin" / "alias.wasm").symlink_to("prog.wasm")
    outputs = {str(p.relative_to(entry)): file_record(p) for p in entry.rglob("*") if p.is_file() and not p.is_symlink()}
    (entry / "manifest.json").write_text(json.dumps({"key": key, "outputs": outputs,
                                                     "links": {"bin/alias.wasm": "prog.wasm"}}))
    return entry


@pytest.mark.parametrize("change", ["same size, same mtime", "extra file", "relinked", "removed", "manifest"])
def test_a_remembered_verification_does_not_survive_a_change(tmp_path, monkeypatch, change):
    monkeypatch.setenv("WASMFORGE_CACHE", str(tmp_path / "cache"))
    store = ArtifactStore(tmp_path / "store")
    key = "ab" + "0" * 62
    entry = _hand_made_entry(store, key)
    assert store.problem(key) is None
    assert any(p.name.startswith("tree-") for p in (tmp_path / "cache" / "verified").iterdir())
    assert store.problem(key) is None  # the remembered state
    module = entry / "lib" / "python" / "m7.py"
    if change == "same size, same mtime":  # only ctime tells: the content must be hashed again
        st = module.stat()
        module.write_text("y = 7\n")
        os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns))
        expected = "lib/python/m7.py does not match its sha256"
    elif change == "extra file":
        (entry / "lib" / "python" / "evil.py").write_text("import os\n")
        expected = "lib/python/evil.py is not in the manifest"
    elif change == "relinked":
        (entry / "bin" / "alias.wasm").unlink()
        (entry / "bin" / "alias.wasm").symlink_to("/bin/sh")
        expected = "bin/alias.wasm points elsewhere"
    elif change == "removed":
        module.unlink()
        expected = "lib/python/m7.py is missing"
    else:
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["outputs"]["lib/python/m7.py"]["sha256"] = "0" * 64
        (entry / "manifest.json").write_text(json.dumps(manifest))
        expected = "lib/python/m7.py does not match its sha256"
    assert expected in (store.problem(key) or "")


def test_a_verification_is_not_remembered_in_a_shared_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WASMFORGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "verified").mkdir(parents=True, mode=0o777)
    os.chmod(tmp_path / "cache" / "verified", 0o777)
    store = ArtifactStore(tmp_path / "store")
    key = "cd" + "1" * 62
    _hand_made_entry(store, key)
    assert store.problem(key) is None
    assert not list((tmp_path / "cache" / "verified").iterdir())
