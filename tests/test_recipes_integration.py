"""The real recipes, built for real from pinned upstream sources (or Debian's identical/alternative
files) with the real toolchain, once per test session, into a throw-away output directory."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from conftest import ROOT, build_and_test

from wasmforge.pipeline import build_target, read_manifest
from wasmforge.recipe import Expect, RecipeBook, RunDefaults, SmokeTest
from wasmforge.recipe import TestStep as Step  # (not a test class: pytest would try to collect it)
from wasmforge.runtime import Runner
from wasmforge.smoke import run_smoke_test

pytestmark = pytest.mark.integration
TARGETS = ("zlib-1.3.1", "sqlite-3.46.1", "lua-5.4.7")


@pytest.fixture(scope="session")
def built(toolchain, integration_config):
    """The three recipes, built at most once (the store and caches are the user's, outputs temporary)."""
    config = integration_config
    book = RecipeBook.load(config.recipes_dir)
    results = {}
    for target in TARGETS:
        results[target] = build_and_test(book, book.parse_target(target), config, toolchain)[-1]
    return config, results


@pytest.mark.parametrize("target", TARGETS)
def test_recipe_builds_and_passes_its_smoke_tests(built, target):
    _, results = built
    manifest = read_manifest(results[target].output)
    assert manifest is not None
    assert manifest["tests"], "every recipe has smoke tests"
    assert all(t["passed"] for t in manifest["tests"])
    for rel in manifest["programs"].values():
        wasm = results[target].output / rel
        assert wasm.read_bytes()[:4] == b"\0asm"
        assert wasm.with_suffix(".cwasm").exists()
        assert manifest["outputs"][rel]["size"] == wasm.stat().st_size


def test_libraries_install_headers_and_pkg_config(built):
    _, results = built
    zlib = results["zlib-1.3.1"].output
    assert (zlib / "lib" / "libz.a").exists() and (zlib / "include" / "zlib.h").exists()
    # Installed for its artifact store entry, which build-output links to.
    assert f"prefix={results['zlib-1.3.1'].prefix}\n" in (zlib / "lib" / "pkgconfig" / "zlib.pc").read_text()
    assert zlib.resolve() == results["zlib-1.3.1"].prefix
    sqlite = results["sqlite-3.46.1"].output
    assert (sqlite / "lib" / "libsqlite3.a").exists() and (sqlite / "include" / "sqlite3.h").exists()
    assert "Version: 3.46.1" in (sqlite / "lib" / "pkgconfig" / "sqlite3.pc").read_text()


def test_lua_error_handling_needs_and_has_exception_handling(built):
    _, results = built
    lua = results["lua-5.4.7"].output / "bin" / "lua.wasm"
    result = Runner().run(lua, ["lua", "-e", "local ok, e = pcall(error, {code = 7}); os.exit(e.code)"])
    assert result.exit_code == 7


def test_smoke_tests_start_programs_with_the_recipes_run_defaults(built):
    _, results = built
    bin_dir = results["lua-5.4.7"].output / "bin"
    # The build's include/ read-only, an environment variable, and a directory it does not install (left out).
    defaults = {"lua": RunDefaults(build_dirs=(("/inc", "include"), ("/none", "share/none")), env=(("A", "from-recipe"),))}
    probe = ("local f = io.open('/inc/lua.h'); print(os.getenv('A'), os.getenv('B'), f ~= nil, "
             "io.open('/inc/x', 'w') == nil, io.open('/none/x') == nil)")
    test = SmokeTest(name="defaults", where="here", env=(("B", "from-test"),), steps=(
        Step(run=("lua", "-e", probe), stdin=None, stdout=Expect("exact", "from-recipe\tfrom-test\ttrue\ttrue\ttrue\n"),
                 stderr=None, exit=0),))
    outcome = run_smoke_test(test, bin_dir, Runner(), defaults)
    assert outcome.passed, outcome.problems
    # A test's own env wins; `defaults: false` leaves the defaults out.
    mine = dataclasses.replace(test, env=(("A", "from-test"), ("B", "from-test")), steps=(dataclasses.replace(
        test.steps[0], stdout=Expect("exact", "from-test\tfrom-test\ttrue\ttrue\ttrue\n")),))
    assert run_smoke_test(mine, bin_dir, Runner(), defaults).passed
    bare = dataclasses.replace(test, defaults=False, steps=(dataclasses.replace(
        test.steps[0], stdout=Expect("exact", "nil\tfrom-test\tfalse\ttrue\ttrue\n")),))
    outcome = run_smoke_test(bare, bin_dir, Runner(), defaults)
    assert outcome.passed, outcome.problems


def test_invoke_run_prints_2(built):
    config, _ = built
    env = {**os.environ, "WASMFORGE_OUTPUT": str(config.outputs)}
    result = subprocess.run([sys.executable, "-m", "invoke", "run", "lua-5.4.7", "--", "-e", "print(1+1)"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.stdout == "2\n", result.stderr
    assert result.returncode == 0
    exit3 = subprocess.run([sys.executable, "-m", "invoke", "run", "lua-5.4.7", "--", "-e", "os.exit(3)"], cwd=ROOT, env=env)
    assert exit3.returncode == 3


def test_invoke_run_with_stdin_closed_gives_the_module_an_empty_stdin(built):
    config, _ = built
    env = {**os.environ, "WASMFORGE_OUTPUT": str(config.outputs)}
    command = [sys.executable, "-m", "invoke", "run", "lua-5.4.7", "--", "-e", "io.write('[', io.read('a'), ']')"]
    result = subprocess.run(["bash", "-c", 'exec "$@" <&-', "bash", *command], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.stdout == "[]" and result.returncode == 0, result.stderr


def test_rebuild_with_nothing_changed_is_up_to_date(built, toolchain):
    config, results = built
    book = RecipeBook.load(config.recipes_dir)
    again = build_target(book, book.parse_target("lua-5.4.7"), config, toolchain, log=lambda m: None)
    assert again[-1].reused and again[-1].key == results["lua-5.4.7"].key


def test_conformance_of_a_recipe_without_a_suite_says_so(built):
    config, _ = built
    env = {**os.environ, "WASMFORGE_OUTPUT": str(config.outputs)}
    result = subprocess.run([sys.executable, "-m", "invoke", "conformance", "lua-5.4.7"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "the recipe of lua declares no conformance suite" in result.stderr
    assert "lua.yaml" in result.stderr and "add conformance:" in result.stderr and "Traceback" not in result.stderr


def test_commands_refuse_an_edited_stored_module(built):
    # Last in this file: it damages the stored lua build for a moment and puts it back.
    config, results = built
    env = {**os.environ, "WASMFORGE_OUTPUT": str(config.outputs)}
    wasm = results["lua-5.4.7"].prefix / "bin" / "lua.wasm"
    original = wasm.read_bytes()
    stat = wasm.stat()
    edited = bytearray(original)
    edited[len(edited) // 2] ^= 0x01
    wasm.write_bytes(bytes(edited))
    os.utime(wasm, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    try:
        script = str(ROOT / "recipes" / "fixtures" / "lua" / "hello.lua")
        for command in (["run", "lua-5.4.7", "--", "-e", "print(1+1)"], ["test", "lua-5.4.7"],
                        ["compare", "lua-5.4.7", script], ["conformance", "lua-5.4.7", "--output", os.devnull]):
            result = subprocess.run([sys.executable, "-m", "invoke", *command], cwd=ROOT, env=env,
                                    capture_output=True, text=True)
            assert result.returncode == 1 and result.stdout == ""
            assert "the stored build of lua-5.4.7 is damaged: bin/lua.wasm does not match its sha256" in result.stderr
            assert "Traceback" not in result.stderr
    finally:
        wasm.write_bytes(original)
        os.utime(wasm, ns=(stat.st_atime_ns, stat.st_mtime_ns))
