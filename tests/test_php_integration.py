"""PHP 7.4.33 built for real (once per session, with its four dependencies) and its native twin."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
import wasmtime
from conftest import ROOT

from wasmforge.compare import run_native, run_wasm, side_by_side
from wasmforge.errors import SourceError
from wasmforge.optimize import imports
from wasmforge.pipeline import build_target, output_dir, read_manifest
from wasmforge.runtime import Runner, make_engine
from wasmforge.sources import fetch_sources

pytestmark = pytest.mark.integration
DEMO = ROOT / "examples" / "php" / "docroot" / "index.php"


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
    # The dependencies come from the session's store; only the sources are looked for afresh.
    cfg = dataclasses.replace(config, mirrors=(str(mirror),), cache_dir=tmp_path / "cache", store_dir=config.artifacts)
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


def test_invoke_run_preopens_the_builds_icu_data_unless_told_not_to(php, tmp_path):
    config, _, out = php
    # The recipe's `run:` defaults, recorded in the manifest: ICU's data from the build, read-only.
    assert read_manifest(out)["run"]["php"] == {"dirs": {"/usr/local/share/icu": "share/icu"}, "env": {},
                                                 "script": ["-f"]}
    env = {**os.environ, "WASMFORGE_OUTPUT": str(config.outputs), "WASMFORGE_STORE": str(config.artifacts)}
    code = ("try { echo (new Collator('sv'))->compare('å', 'z'), PHP_EOL; } catch (IntlException $e) "
            "{ echo intl_get_error_message(), PHP_EOL; } "
            # (is_writable() says true: WASI's access() does not know the preopen is read-only.)
            "echo @file_put_contents('/usr/local/share/icu/x', 'y') === false ? 'ro' : 'rw', PHP_EOL;")

    def run(*options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "invoke", "run", "php-7.4.33", *options, "--", "-r", code],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    usual = run()
    assert (usual.returncode, usual.stdout, usual.stderr) == (0, "1\nro\n", "")  # å sorts after z in Swedish
    bare = run("--no-defaults")
    assert bare.returncode == 0 and "U_FILE_ACCESS_ERROR" in bare.stdout
    # What the user preopens at the same guest path wins over the default.
    mine = run("--dir", f"/usr/local/share/icu:{tmp_path}:ro")
    assert mine.returncode == 0 and "U_FILE_ACCESS_ERROR" in mine.stdout


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


def test_directory_listings_hold_while_another_process_changes_the_directory(php, tmp_path):
    """In wasmtime, fd_readdir fails with ENOENT when an entry goes away while the directory is read.
    With this churn, unpatched php.wasm failed 200 of 1000 scandir() calls; patched, 0 of 4000
    (2026-12-01). PHP's plain-files wrapper retries (patches/php/7.4/0021). 20 entries fit in one
    fd_readdir batch: across batches wasmtime may still skip or repeat entries under churn.
    The churn changes the directory every 5 ms. At every 1 ms, 39% of plain C listings (opendir and
    readdir, no retry) failed, and all 8 tries of one scandir() failed once in 500 in a CI run; at 5 ms,
    8% of plain listings fail (1000 each, 2026-12-08), so a build without the retry still fails here."""
    _, _, out = php
    listed = tmp_path / "listed"
    listed.mkdir()
    for i in range(20):
        (listed / f"keep{i:02}").touch()
    script = tmp_path / "list.php"
    script.write_text("""<?php
$failed = 0; $short = 0;
for ($i = 0; $i < 500; $i++) {
    $names = @scandir('/listed');
    if ($names === false) { $failed++; continue; }
    if (count(preg_grep('/^keep/', $names)) !== 20) $short++;
}
echo "failed $failed, short $short\n";
""")
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            (listed / f"tmp{i % 5}").touch()
            (listed / f"tmp{(i + 2) % 5}").unlink(missing_ok=True)
            i += 1
            time.sleep(0.005)

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        result = Runner().run(out / "bin" / "php.wasm", ["php", "-n", "/s/list.php"],
                              dirs=[("/listed", listed), ("/s", tmp_path)], timeout=120)
    finally:
        stop.set()
        churner.join()
    assert result.stdout == b"failed 0, short 0\n", f"{result.stdout!r}: {result.describe()}"
    gone = Runner().run(out / "bin" / "php.wasm", ["php", "-n", "-r", "var_dump(@scandir('/s/missing'));"],
                        dirs=[("/s", tmp_path)])
    assert gone.stdout == b"bool(false)\n"
