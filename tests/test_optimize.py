"""The optimisation step: the pinned wasm-opt, its flags per recipe, debug sections, sizes in the manifest."""

from __future__ import annotations

import dataclasses

from test_build import HELLO_C, MAKEFILE, _build, _recipe, _source

from wasmforge.optimize import custom_sections
from wasmforge.pipeline import read_manifest
from wasmforge.runtime import Runner


def _hello(project, flags: str = "") -> None:
    sha = _source(project, "hello", "1.0", {"hello.c": HELLO_C, "Makefile": MAKEFILE})
    project.recipe("hello", _recipe("hello", sha, f"""\
        build:
          system: make
          cflags: [-O2, -g]
          make: [hello]
          install: []
          {flags}
        outputs:
          hello: hello
        """))


def test_the_toolchain_has_the_pinned_wasm_opt(toolchain):
    assert toolchain.wasm_opt is not None, "invoke toolchain --install provisions it"
    assert toolchain.wasm_opt.version.startswith("wasm-opt version 132")
    assert toolchain.identity()["wasm_opt"]["version"] == toolchain.wasm_opt.version


def test_outputs_are_optimised_and_stripped_with_sizes_in_the_manifest(project, toolchain):
    _hello(project)
    results, messages = _build(project, toolchain, "hello-1.0")
    wasm = results[-1].output / "bin" / "hello.wasm"
    manifest = read_manifest(results[-1].output)
    sizes = manifest["sizes"]["bin/hello.wasm"]
    assert sizes["optimized"]["bytes"] == wasm.stat().st_size < sizes["raw"]["bytes"]
    assert 0 < sizes["optimized"]["gzip"] < sizes["optimized"]["bytes"]
    # Where the bytes are: code, data and custom sections (with --debug, the custom ones grow).
    assert sizes["optimized"]["code"] > 0 and sizes["optimized"]["data"] > 0
    assert sizes["optimized"]["code"] + sizes["optimized"]["data"] + sizes["optimized"]["custom"] < sizes["optimized"]["bytes"]
    assert manifest["inputs"]["optimize"] == {"wasm_opt": ["-O2"], "debug": False}
    assert not [name for name in custom_sections(wasm.read_bytes()) if name.startswith(".debug")]
    assert any("wasm-opt -O2 on hello.wasm" in m for m in messages)
    assert (results[-1].output / "logs" / "wasm-opt-hello.log").exists()
    assert Runner().run(wasm, ["hello"]).stdout == b"hello world\n"

    # --debug keeps the debug sections, and is another build.
    project.config = dataclasses.replace(project.config, debug=True)
    debug, _ = _build(project, toolchain, "hello-1.0")
    assert debug[-1].key != results[-1].key
    assert ".debug_info" in custom_sections((debug[-1].output / "bin" / "hello.wasm").read_bytes())
    debug_sizes = read_manifest(debug[-1].output)["sizes"]["bin/hello.wasm"]["optimized"]
    assert debug_sizes["custom"] > 100 * sizes["optimized"]["custom"]


def test_a_recipe_chooses_its_flags_or_none(project, toolchain):
    _hello(project, "wasm_opt: [-Oz]")
    small, _ = _build(project, toolchain, "hello-1.0")
    assert read_manifest(small[-1].output)["inputs"]["optimize"]["wasm_opt"] == ["-Oz"]
    _hello(project, "wasm_opt: []")
    plain, messages = _build(project, toolchain, "hello-1.0")
    sizes = read_manifest(plain[-1].output)["sizes"]["bin/hello.wasm"]
    assert "optimized" not in sizes and not any("wasm-opt" in m for m in messages)
    assert ".debug_info" in custom_sections((plain[-1].output / "bin" / "hello.wasm").read_bytes())
