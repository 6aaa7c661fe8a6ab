"""`invoke bench --peer`: the peer (WordPress Playground's PHP for Node.js) installed from its npm lock,
run on the same arguments as our builds; left out, with one line, when it cannot be had."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from conftest import ROOT

from wasmforge.bench import Row, Workload, alternating_medians, find_peer, peer_command, workloads_of
from wasmforge.config import Config
from wasmforge.errors import ToolchainError
from wasmforge.recipe import RecipeBook
from wasmforge.toolchain import npm_project

needs_node = pytest.mark.skipif(not shutil.which("node") or not shutil.which("npm"), reason="Node.js and npm")


def _php(version: str = "7.4.33"):
    book = RecipeBook.load(ROOT / "recipes")
    return book.package(book.parse_target(f"php-{version}"))


@needs_node
def test_the_peer_runs_what_our_php_runs(tmp_path):
    lines: list[str] = []
    peer = find_peer(_php(), Config.from_env(), lines.append)
    assert peer is not None, lines
    assert "@php-wasm/node-7-4 3.1.54" in peer.name
    # The workloads' argument shape: a script by its name, in the current directory.
    script = tmp_path / "six.php"
    script.write_text("<?php echo 6 * 7, ' ', PHP_VERSION, ' ', $argv[1], PHP_EOL; exit(3);")
    result = subprocess.run(peer_command(peer, ["-n", "six.php", "arg"]), cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert (result.stdout, result.returncode) == ("42 7.4.33 arg\n", 3), result.stderr
    # The JSON workload of the recipe gives the same answer there as natively and in wasm.
    workload = next(w for w in workloads_of(_php()) if w.file)
    shutil.copyfile(ROOT / workload.file, tmp_path / workload.script)
    result = subprocess.run(peer_command(peer, workload.argv(workload.script)[1:]), cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.stdout == "1939581 bytes, 20 round trips\n", result.stderr


def test_without_node_the_peer_column_is_left_out(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither node nor npm
    lines: list[str] = []
    assert find_peer(_php(), Config.from_env(cache_dir=tmp_path / "cache"), lines.append) is None
    assert len(lines) == 1
    assert lines[0].startswith("bench: the peer (WordPress Playground's PHP 7.4")
    assert "needs Node.js and npm, which are not installed; the peer column is left out" in lines[0]
    assert not (tmp_path / "cache").exists()


def test_a_version_without_a_peer_says_so():
    book = RecipeBook.load(ROOT / "recipes")
    lines: list[str] = []
    assert find_peer(book.package(book.parse_target("lua-5.4.7")), Config.from_env(), lines.append) is None
    assert lines == ["bench: no peer for lua-5.4.7 (the recipe names none for this version); the peer column is left out"]


@needs_node
def test_a_package_that_is_not_the_pinned_one_is_refused(tmp_path):
    project = tmp_path / "peer"
    shutil.copytree(ROOT / "toolchain" / "peers" / "php-wasm-7.4", project)
    lock = json.loads((project / "package-lock.json").read_text())
    entry = lock["packages"]["node_modules/wasm-feature-detect"]
    # Another package's integrity: what a registry serving other bytes under this name would look like.
    entry["integrity"] = lock["packages"]["node_modules/ini"]["integrity"]
    (project / "package-lock.json").write_text(json.dumps(lock))
    cache = tmp_path / "cache"
    with pytest.raises(ToolchainError) as info:
        npm_project(Config.from_env(cache_dir=cache), project, log=lambda m: None)
    assert info.value.what == "npm ci of peer failed (exit code 1)"
    assert "EINTEGRITY" in info.value.details
    assert [p.name for p in (cache / "tools").iterdir()] == []  # nothing half-installed


def test_alternating_medians_keep_a_failure_and_the_table_shows_it():
    calls: list[str] = []

    def timed(name, value):
        def run():
            calls.append(name)
            return value
        return run
    medians = alternating_medians({"a": timed("a", 1.0), "b": timed("b", "fails (exit code 1)")}, 3)
    assert medians == {"a": 1.0, "b": "fails (exit code 1)"}
    assert calls == ["a", "b", "a", "a"]  # in turn; a failed command is not run again
    row = Row("run time", 0.5, 1.0, "s", "fails (exit code 1)")
    assert row.cells(with_peer=True) == ("run time", "0.50 s", "1.00 s", "2.00x", "fails (exit code 1)", "")
    assert Row("run time", 0.5, 1.0, "s", 2.0).cells(with_peer=True)[-2:] == ("2.00 s", "4.00x")
    assert Row("run time", 0.5, 1.0, "s").cells() == ("run time", "0.50 s", "1.00 s", "2.00x")


def test_workload_arguments_name_the_script():
    workload = Workload("bench", ("php", "-n", "bench.php", "x"), source="Zend/bench.php")
    assert workload.script == "bench.php"
    assert workload.argv("/bench/bench.php") == ["php", "-n", "/bench/bench.php", "x"]


def test_the_sizes_of_a_builds_files_and_directories_raw_and_gzipped(tmp_path):
    import gzip

    from wasmforge.bench import tree_sizes
    from wasmforge.errors import WasmforgeError

    out = tmp_path / "build"
    (out / "lib" / "std" / "pkg").mkdir(parents=True)
    (out / "lib" / "std" / "a.py").write_text("x = 1\n" * 1000)
    (out / "lib" / "std" / "pkg" / "b.py").write_text("y = 2\n")
    (out / "lib" / "std" / "link.py").symlink_to("a.py")  # a link is not counted twice
    (out / "share").mkdir()
    (out / "share" / "std.zip").write_bytes(bytes(range(256)) * 40)
    raw, packed = tree_sizes(out, "lib/std")
    assert raw == 6000 + 6
    assert 0 < packed < 6000  # one compressed tar stream of both files
    assert tree_sizes(out, "share/std.zip") == (10240, len(gzip.compress(bytes(range(256)) * 40, 9, mtime=0)))
    (out / "escape").symlink_to(tmp_path)
    for bad in ("lib/missing", "../build", "/etc", "escape"):
        with pytest.raises(WasmforgeError, match="is not a file or directory of the build"):
            tree_sizes(out, bad)


def test_other_runtimes_get_a_column_pair_each_and_say_why_a_cell_is_empty():
    row = Row("n-body", 0.5, 1.0, "s", others=(("wasmedge-aot", 1.5), ("node", "n/a (node: no memory limit)")))
    assert row.cells(runtimes=("wasmedge-aot", "node")) == (
        "n-body", "0.50 s", "1.00 s", "2.00x", "1.50 s", "3.00x", "n/a (node: no memory limit)", "")
    assert row.cells() == ("n-body", "0.50 s", "1.00 s", "2.00x")
    # A runtime that measured nothing for this row (sizes, builds) shows "-".
    assert Row("size", None, 100 * 1024, "bytes").cells(runtimes=("node",))[-2:] == ("-", "")


def test_a_runtime_that_cannot_run_a_workload_is_reported_in_its_cell(tmp_path):
    from wasmforge.bench import WORKLOAD_TIMEOUT, _runtime_timed
    from wasmforge.runtime import RunResult
    from wasmforge.smoke import Unsupported

    class Fake:
        def __init__(self, result):
            self.result = result

        def run(self, *args, **kwargs):
            assert kwargs["timeout"] == WORKLOAD_TIMEOUT and kwargs["env"] == {"A": "1"}
            if isinstance(self.result, Exception):
                raise self.result
            return self.result

    def timed(result):
        return _runtime_timed(Fake(result), tmp_path / "m.wasm", ["m"], [], {"A": "1"})

    assert timed(RunResult(0, duration=1.25)) == 1.25
    assert timed(Unsupported("x: no memory limit")) == "n/a (x: no memory limit)"
    assert timed(RunResult(1, stderr=b"boom\nlast line\n", duration=0.1)) == "fails (exit code 1: last line)"
    assert timed(RunResult(None, timed_out=True, duration=1800.0)) == f"over {WORKLOAD_TIMEOUT // 60} min"
