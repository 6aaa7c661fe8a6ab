"""PHP 7.4.33 built for real (once per session, with its four dependencies) and its native twin."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys

import pytest
import wasmtime
from conftest import ROOT

from wasmforge.compare import run_native, run_wasm, side_by_side
from wasmforge.errors import SourceError
from wasmforge.optimize import imports
from wasmforge.pipeline import build_target, output_dir, read_manifest
from wasmforge.recipe import RecipeBook
from wasmforge.runtime import Runner, make_engine
from wasmforge.sources import fetch_sources
from wasmforge.toolchain import host_toolchain

pytestmark = pytest.mark.integration
DEMO = ROOT / "examples" / "php" / "docroot" / "index.php"


@pytest.fixture(scope="session")
def php_native(integration_config):
    config = integration_config
    book = RecipeBook.load(config.recipes_dir)
    target = dataclasses.replace(book.parse_target("php-7.4.33"), native=True)
    results = build_target(book, target, config, host_toolchain(), log=lambda m: print(m, flush=True))
    return results[-1].output


def test_php_builds_with_all_smoke_tests_passing(php):
    _, _, out = php
    manifest = read_manifest(out)
    assert {t["name"] for t in manifest["tests"]} >= {"exit(3) gives exit code 3", "php-cgi serves a POST request"}
    failed = [t for t in manifest["tests"] if not t["passed"]]
    assert not failed
    assert set(manifest["programs"]) == {"php", "php-cgi"}


@pytest.mark.parametrize("program", ["php", "php-cgi"])
def test_plain_wasi_imports_and_minimal_exports(php, program):
    _, _, out = php
    wasm = out / "bin" / f"{program}.wasm"
    assert {module for module, _ in imports(wasm)} == {"wasi_snapshot_preview1"}
    module = wasmtime.Module.from_file(make_engine(True), str(wasm))
    assert sorted(e.name for e in module.exports) == ["_start", "memory"]


def test_a_script_that_loops_forever_is_stopped_by_the_timeout(php):
    _, _, out = php
    result = Runner().run(out / "bin" / "php.wasm", ["php", "-r", "while (true) {}"], timeout=2)
    assert result.timed_out and "killed by the timeout" in result.describe()


def test_php_7_4_32_refuses_a_renamed_7_4_33_tarball(php, toolchain, tmp_path):
    config, book, _ = php
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    fetched = fetch_sources(book.package(book.parse_target("php-7.4.33")).sources, config, log=lambda m: None)
    shutil.copyfile(fetched.path, mirror / "php-7.4.32.tar.xz")
    cfg = dataclasses.replace(config, mirrors=(str(mirror),), cache_dir=tmp_path / "cache")
    with pytest.raises(SourceError) as info:
        build_target(book, book.parse_target("php-7.4.32"), cfg, toolchain, log=lambda m: None)
    text = info.value.render()
    assert f"mirror {mirror}: checksum mismatch" in text
    assert "WASMFORGE_MIRRORS" in text
    assert not output_dir(cfg, book.package(book.parse_target("php-7.4.32"))).exists()


def test_cli_fetch_of_7_4_32_says_how_to_provide_the_file(php):
    config, _, _ = php
    env = {**os.environ, "WASMFORGE_OUTPUT": str(config.outputs)}
    result = subprocess.run([sys.executable, "-m", "invoke", "fetch", "php-7.4.32"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert "could not fetch php-7.4.32.tar.xz" in result.stderr
    assert "put it in a directory and run with WASMFORGE_MIRRORS" in result.stderr
    assert "Traceback" not in result.stderr


def test_seed_demo_native_versus_wasm(php, php_native):
    _, _, out = php
    native = run_native(php_native / "bin" / "php", ["-f", str(DEMO)])
    wasm = run_wasm(out / "bin" / "php.wasm", ["-f", str(DEMO)], dirs=[(str(DEMO.parent), DEMO.parent)])
    assert "PHP 7.4.33 on Linux" in native.text
    assert "PHP 7.4.33 on wasi" in wasm.text and "wasm32" in wasm.text
    # A whole line: the native count may itself end in 0 ("40 environment variables: ...").
    no_variables = re.compile(r"^0 environment variables$", re.MULTILINE)
    assert no_variables.search(wasm.text)
    assert not no_variables.search(native.text)
    assert "  usr\n" in native.text and "  usr\n" not in wasm.text
    assert "cannot list /" in wasm.text
    table = side_by_side(native, wasm, width=120)
    assert "|" in table.splitlines()[2]  # the first output line differs (uname) and is marked


@pytest.mark.parametrize("code, expected", [
    ("exit(3);", 3),
    ("throw new Exception('x');", 255),
    ("register_shutdown_function(function () { echo 'S'; }); undefined_fn();", 255),
])
def test_exit_statuses_match_the_native_build(php, php_native, code, expected):
    _, _, out = php
    native = subprocess.run([str(php_native / "bin" / "php"), "-n", "-r", code], capture_output=True)
    wasm = Runner().run(out / "bin" / "php.wasm", ["php", "-n", "-r", code])
    assert native.returncode == expected == wasm.exit_code
    assert native.stdout == wasm.stdout
