"""CPython 3.13.5 and 3.11.2 built for real (at most once per run) with their native build pythons."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, build_and_test

from wasmforge.conformance import run_conformance, wasm_rate
from wasmforge.outputs import read_manifest, run_defaults
from wasmforge.recipe import RecipeBook

pytestmark = pytest.mark.integration
VERSIONS = ("3.13.5", "3.11.2")


@pytest.fixture(scope="session")
def pythons(toolchain, integration_config):
    """Both versions and everything they need (their native builds first), smoke tests passing."""
    config = integration_config
    book = RecipeBook.load(config.recipes_dir)
    return config, {v: build_and_test(book, book.parse_target(f"python-{v}"), config, toolchain) for v in VERSIONS}


@pytest.mark.parametrize("version", VERSIONS)
def test_the_build_python_is_the_recipes_own_native_build_stored_before_it(pythons, version):
    _, results = pythons
    targets = [r.target for r in results[version]]
    assert targets[0] == f"python-{version}-native" and targets[-1] == f"python-{version}"
    assert {"zlib-1.3.1", "sqlite-3.46.1", "bzip2-1.0.8", "xz-5.8.1"} <= set(targets)
    native, wasm = results[version][0], results[version][-1]
    assert (native.output / "bin" / f"python{version.rsplit('.', 1)[0]}").is_file()
    manifest = read_manifest(wasm.output)
    assert manifest["inputs"]["build_tools"] == {f"python-{version}-native": native.key}
    assert all(t["passed"] for t in manifest["tests"]) and len(manifest["tests"]) >= 12
    # The standard library, compiled, and the data configure recorded (sysconfig) are in the build.
    lib = wasm.output / "lib" / f"python{version.rsplit('.', 1)[0]}"
    assert (lib / "os.py").is_file() and list(lib.glob("__pycache__/os.cpython-*.pyc"))
    assert list(lib.glob("_sysconfigdata_*wasi*.py"))


@pytest.mark.parametrize("version", VERSIONS)
def test_invoke_run_needs_no_arguments_but_the_code(pythons, version):
    config, _ = pythons
    env = {**os.environ, "WASMFORGE_OUTPUT": str(config.outputs)}
    code = "import sys, json, sqlite3; print(sys.platform, sys.version.split()[0], json.dumps([sqlite3.sqlite_version]))"
    result = subprocess.run([sys.executable, "-m", "invoke", "run", f"python-{version}", "--", "-c", code],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, f'wasi {version} ["3.46.1"]\n'), result.stderr
    bare = subprocess.run([sys.executable, "-m", "invoke", "run", f"python-{version}", "--no-defaults", "--",
                           "-c", "print(1)"], cwd=ROOT, env=env, capture_output=True, text=True)
    # Without its standard library the interpreter cannot start, and says why.
    assert bare.returncode != 0 and "encodings" in bare.stderr


def test_conformance_runs_regrtest_in_wasm_and_natively(pythons):
    config, results = pythons
    book = RecipeBook.load(config.recipes_dir)
    package = book.package(book.parse_target("python-3.13.5"))
    native, wasm = results["3.13.5"][0].output, results["3.13.5"][-1].output
    manifest = read_manifest(wasm)
    counts = run_conformance(package, config, wasm={"interpreter": wasm / "bin" / "python.wasm"},
                             native={"interpreter": native / "bin" / "python"}, dirs=["test_bisect"], jobs=1,
                             log=lambda m: print(m, flush=True),
                             readonly_dirs={"interpreter": run_defaults(wasm, manifest, "python")[0]})
    in_wasm, natively = counts["test_bisect"]
    assert natively.passed >= 20 and natively.failed == 0
    assert wasm_rate(in_wasm, natively) == 1.0
