"""`invoke run` of a stored build: found by its full name in build-output, its store entry verified first."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import wasmtime

from wasmforge.config import Config, project_root
from wasmforge.errors import WasmforgeError
from wasmforge.outputs import built_target, verified_output
from wasmforge.recipe import RecipeBook
from wasmforge.store import ArtifactStore

ROOT = project_root()

# A WASI command that writes "hello\n": a real module, without the toolchain.
HELLO_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def _store_build(config: Config, name: str, version: str, flavor: str | None = None, native: bool = False) -> Path:
    """A finished build as the pipeline leaves it: a store entry and build-output/NAME/KEY linking to it."""
    module = wasmtime.wat2wasm(HELLO_WAT)
    output_key = version + (f"-{flavor}" if flavor else "") + ("-native" if native else "")
    key = hashlib.sha256(f"{name}-{output_key}".encode()).hexdigest()
    store = ArtifactStore(config.artifacts)
    staged = store.scratch("staged")
    (staged / "bin").mkdir(parents=True)
    (staged / "bin" / f"{name}.wasm").write_bytes(module)
    manifest = {"name": name, "version": version, "flavor": flavor, "target": f"{name}-{output_key}", "key": key,
                "native": native, "programs": {name: f"bin/{name}.wasm"},
                "outputs": {f"bin/{name}.wasm": {"sha256": hashlib.sha256(module).hexdigest(), "size": len(module)}},
                "logs": {}, "links": {}}
    (staged / "manifest.json").write_text(json.dumps(manifest))
    entry = store.put(key, staged)
    out = config.outputs / name / output_key
    out.parent.mkdir(parents=True, exist_ok=True)
    out.symlink_to(entry)
    return out


@pytest.fixture
def config(tmp_path) -> Config:
    return Config.from_env(output_dir=tmp_path / "build-output", store_dir=tmp_path / "store",
                           cache_dir=tmp_path / "cache")


def _invoke(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WASMFORGE_OUTPUT": str(config.outputs), "WASMFORGE_STORE": str(config.artifacts),
           "WASMFORGE_CACHE": str(config.cache_dir)}
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_a_stored_build_is_found_by_its_full_name(config):
    out = _store_build(config, "hello", "1.0")
    flavored = _store_build(config, "hello", "1.0", flavor="small")
    dashed = _store_build(config, "my-tool", "2.1")
    assert built_target(config, "hello-1.0") == verified_output(out, "hello-1.0")
    assert built_target(config, "hello-1.0-small") == verified_output(flavored, "hello-1.0-small")
    assert built_target(config, "my-tool-2.1") == verified_output(dashed, "my-tool-2.1")


def test_what_is_not_a_stored_build_named_in_full_is_left_to_the_recipes(config):
    _store_build(config, "hello", "1.0")
    _store_build(config, "hello", "1.0", native=True)
    (config.outputs / "other").symlink_to(config.outputs / "hello")  # a manifest that names another target
    for target in ("hello", "hello-2.0", "hello-1.0-native", "other-1.0", "hello-1.0-", "-hello-1.0",
                   "hello-../hello/1.0", "../build-output/hello-1.0"):
        assert built_target(config, target) is None, target


def test_a_damaged_stored_build_is_refused_not_skipped(config):
    out = _store_build(config, "hello", "1.0")
    (out / "bin" / "planted.wasm").write_bytes(b"\0asm\1\0\0\0")
    with pytest.raises(WasmforgeError, match="the stored build of hello-1.0 is damaged: bin/planted.wasm is not in "
                                             "the manifest"):
        built_target(config, "hello-1.0")


def test_invoke_run_starts_a_stored_build_and_refuses_a_damaged_one(config):
    lua = RecipeBook.load(ROOT / "recipes")["lua"]
    version = lua.default_version
    out = _store_build(config, "lua", version)
    for target in (f"lua-{version}", "lua"):  # found in build-output, or through the recipes (no version)
        result = _invoke(config, "run", target)
        assert (result.returncode, result.stdout, result.stderr) == (0, "hello\n", ""), target
    missing = _invoke(config, "run", "lua-0.0.1")
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
    module = out / "bin" / "lua.wasm"
    module.write_bytes(module.read_bytes()[:-1] + b"\x01")  # the same size, other bytes
    for target in (f"lua-{version}", "lua"):
        result = _invoke(config, "run", target)
        assert result.returncode == 1 and result.stdout == "", target
        assert f"the stored build of lua-{version} is damaged: bin/lua.wasm does not match its sha256" in result.stderr
        assert "nothing was run" in result.stderr and "Traceback" not in result.stderr


def test_run_defaults_are_the_manifests_and_stay_inside_the_build(config, tmp_path):
    from wasmforge.outputs import run_defaults
    out = _store_build(config, "hello", "1.0")
    entry = out.resolve()
    (entry / "share" / "data").mkdir(parents=True)
    manifest = {"run": {"hello": {"dirs": {"/usr/local/share/data": "share/data"}, "env": {"A": "1"},
                                  "script": ["-f"]}}}
    assert run_defaults(out, manifest, "hello") == ([("/usr/local/share/data", entry / "share" / "data")],
                                                    {"A": "1"}, ["-f"])
    assert run_defaults(out, manifest, "other") == ([], {}, [])
    assert run_defaults(out, {}, "hello") == ([], {}, [])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (entry / "share" / "link").symlink_to(outside)
    for rel in ("../../..", "/etc", "share/../share/data", "share/link", "share/missing", ""):
        bad = {"run": {"hello": {"dirs": {"/data": rel}, "env": {}, "script": []}}}
        with pytest.raises(WasmforgeError, match="which is not a directory inside the build"):
            run_defaults(out, bad, "hello")
    for spec in ("x", {"dirs": [], "env": {}, "script": []}, {"dirs": {}, "env": {"A": 1}, "script": []},
                 {"dirs": {}, "env": {}}):
        with pytest.raises(WasmforgeError, match="malformed run entry for 'hello'"):
            run_defaults(out, {"run": {"hello": spec}}, "hello")
