"""Toolchain resolution: WASI_SDK_PATH, the pinned SDK (served locally), Debian; clear errors."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile

import pytest
from conftest import Route

from wasmforge.config import Config
from wasmforge.errors import SourceError, ToolchainError
from wasmforge.recipe import SourceSpec
from wasmforge.runtime import Runner
from wasmforge.toolchain import TARGET, find_toolchain, find_wasm_opt, install_sdk, install_wasm_opt


def test_no_toolchain_says_how_to_get_one(tmp_path):
    config = Config.from_env(cache_dir=tmp_path / "empty-cache")
    with pytest.raises(ToolchainError) as info:
        find_toolchain(config, environ={})
    assert "no WASI toolchain found" in info.value.what
    assert "invoke toolchain --install" in info.value.hint
    assert "WASI_SDK_PATH" in info.value.hint


def test_wasi_sdk_path_must_be_an_sdk(tmp_path):
    config = Config.from_env(cache_dir=tmp_path / "cache")
    with pytest.raises(ToolchainError) as info:
        find_toolchain(config, environ={"WASI_SDK_PATH": str(tmp_path)})
    assert f"WASI_SDK_PATH={tmp_path} is not a usable WASI SDK" in info.value.what
    assert "bin/clang" in info.value.what


def _sdk_tarball(toolchain) -> bytes:
    """An SDK-shaped tarball (official layout) whose tools are the real ones of `toolchain`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(f"wasi-sdk-99.0-test/{name}")
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        for tool in ("clang", "clang++", "wasm-ld", "llvm-ar", "llvm-ranlib", "llvm-nm", "llvm-strip"):
            add(f"bin/{tool}", f'#!/bin/sh\nexec "{toolchain.root}/bin/{tool}" "$@"\n'.encode(), 0o755)
        add("VERSION", b"99.0\nwasi-libc: test\n")
        sysroot = toolchain.sysroot
        for path in sorted(sysroot.rglob("*")):
            if path.is_file():
                add(f"share/wasi-sysroot/{path.relative_to(sysroot)}", path.read_bytes())
    return buf.getvalue()


def test_pinned_sdk_is_downloaded_verified_and_usable(tmp_path, server, toolchain):
    body = _sdk_tarball(toolchain)
    server.routes["/wasi-sdk-99.0-test.tar.gz"] = Route(body)
    config = Config.from_env(cache_dir=tmp_path / "cache")
    spec = SourceSpec(sha256=hashlib.sha256(body).hexdigest(), url=server.url("/wasi-sdk-99.0-test.tar.gz"))
    tc = install_sdk(config, spec=spec, log=lambda m: None)
    assert tc.kind == "wasi-sdk"
    assert tc.libc.startswith("wasi-sdk 99.0")
    assert tc.has_setjmp and tc.target == TARGET
    # It really compiles and links a WASI program.
    src = tmp_path / "hello.c"
    src.write_text('#include <stdio.h>\nint main(void){puts("hello from the sdk");return 0;}\n')
    out = tmp_path / "hello.wasm"
    subprocess.run([tc.tool("clang"), "-O2", str(src), "-o", str(out), "--no-wasm-opt"], check=True)
    assert Runner().run(out, ["hello"]).stdout == b"hello from the sdk\n"


def test_pinned_sdk_with_wrong_checksum_is_not_installed(tmp_path, server, toolchain):
    server.routes["/sdk.tar.gz"] = Route(b"not an sdk")
    config = Config.from_env(cache_dir=tmp_path / "cache", use_debian_archive=False)
    spec = SourceSpec(sha256="0" * 64, url=server.url("/sdk.tar.gz"))
    with pytest.raises(SourceError) as info:
        install_sdk(config, spec=spec, log=lambda m: None)
    assert "checksum mismatch" in info.value.details
    assert not (tmp_path / "cache" / "toolchains").exists() or not any((tmp_path / "cache" / "toolchains").iterdir())


def test_toolchain_identity(toolchain):
    ident = toolchain.identity()
    assert "clang version" in ident["clang"]
    assert ident["target"] == "wasm32-wasip1"
    assert toolchain.has_setjmp, "the supported toolchains all have setjmp/longjmp"
    env = toolchain.env()
    for key in ("CC", "CXX", "LD", "AR", "RANLIB", "NM", "STRIP"):
        assert env[key]
    text = toolchain.describe()
    assert "chosen:" in text and "setjmp:     yes" in text


def test_wasm_opt_from_npm_is_refused_when_it_does_not_match_the_pin(project):
    pins = project.root / "toolchain" / "pins.yaml"
    pinned = pins.read_text()
    assert "integrity: sha512-" in pinned
    pins.write_text(pinned.replace("integrity: sha512-", "integrity: sha512-AAAA"))
    with pytest.raises(ToolchainError) as info:
        install_wasm_opt(project.config, log=lambda m: None)
    assert "does not match the pinned integrity" in info.value.what
    assert "nothing was installed" in info.value.hint
    tools = project.config.cache_dir / "tools"
    assert not [p for p in tools.iterdir()]  # no entry, no staging left behind
    assert find_wasm_opt(project.config, environ={}) is None


def test_wasm_opt_from_the_environment(tmp_path, toolchain):
    config = Config.from_env(cache_dir=tmp_path / "cache")
    with pytest.raises(ToolchainError) as info:
        find_wasm_opt(config, environ={"WASMFORGE_WASM_OPT": str(tmp_path / "missing")})
    assert "does not run" in info.value.what
    # The pinned one, called through a script, stands in for "another wasm-opt".
    script = tmp_path / "wasm-opt"
    script.write_text("#!/bin/sh\nexec " + " ".join(toolchain.wasm_opt.command) + ' "$@"\n')
    script.chmod(0o755)
    found = find_wasm_opt(config, environ={"WASMFORGE_WASM_OPT": str(script)})
    assert found is not None and found.origin == "WASMFORGE_WASM_OPT" and "version 132" in found.version


def test_the_host_packages_are_the_toolchains_and_those_the_recipes_name(project):
    # bootstrap.sh installs what `invoke host-packages` prints: a package a recipe names must be there.
    from wasmforge.recipe import RecipeBook
    from wasmforge.toolchain import host_packages, load_pins

    project.recipe("tool", "name: tool\nsummary: s\nlicense: MIT\nversions: {'1.0': {sha256: " + "ab" * 32 + "}}\n"
                   "source: {url: 'https://example.invalid/tool.tar.gz'}\n"
                   "build: {system: make, host_packages: [bison, pkgconf]}\n"
                   "flavors: {big: {build: {host_packages: [flex]}}}\n"
                   "native: {packages: [libfoo-dev, pkgconf], build: {host_packages: [gperf]}}\n")
    pins = load_pins(project.config)["debian"]
    found = host_packages(project.config, RecipeBook.load(project.config.recipes_dir))
    assert found == [*pins["packages"], *pins["cxx_packages"], "bison", "pkgconf", "flex", "libfoo-dev", "gperf"]
