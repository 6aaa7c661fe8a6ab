"""Parsing and classifying the results of upstream test suites (PHP run-tests logs, CPython regrtest JUnit reports)."""

from __future__ import annotations

from pathlib import Path

from wasmforge.config import Config
from wasmforge.conformance import _RESULT, Counts, failure_cause, plain_log, report_path, wasm_rate
from wasmforge.recipe import RecipeBook

LOG = (
    "PASS Trivial [tests/basic/001.phpt] \n"
    "TEST 2/81 [2/2 concurrent test workers running]     FAIL Bug #1 [tests/basic/bug1.phpt] \n"
    "TEST 3/81 [2/2 concurrent test workers running]     SKIP POST [tests/basic/002.phpt] reason: CGI not available\n"
)


def test_results_are_read_even_behind_progress_text():
    found = [(m.group("kind"), m.group("file")) for m in _RESULT.finditer(LOG)]
    assert found == [("PASS", "tests/basic/001.phpt"), ("FAIL", "tests/basic/bug1.phpt"),
                     ("SKIP", "tests/basic/002.phpt")]


def test_results_are_read_from_php_8s_coloured_log():
    coloured = ("TEST 819/831 [1/2 concurrent test workers running]     \x1b[1;32mPASS\x1b[0m Test open_basedir "
                "[tests/security/open_basedir_opendir.phpt] \n"
                "TEST 820/831 [1/2 concurrent test workers running]     \x1b[1;31mFAIL\x1b[0m Bug [tests/basic/bug1.phpt] \n")
    assert not list(_RESULT.finditer(coloured))  # what the first PHP 8.2 run reported: nothing
    found = [(m.group("kind"), m.group("file")) for m in _RESULT.finditer(plain_log(coloured))]
    assert found == [("PASS", "tests/security/open_basedir_opendir.phpt"), ("FAIL", "tests/basic/bug1.phpt")]


def test_rate_is_the_share_of_native_passes_that_pass_in_wasm():
    native = Counts(passed=4, failed=1, failures=["e.phpt"], passes=["a.phpt", "b.phpt", "c.phpt", "d.phpt"])
    # c fails in wasm, d is skipped there, e fails in both: 2 of the 4 native passes are kept.
    wasm = Counts(passed=2, failed=2, failures=["c.phpt", "e.phpt"], passes=["a.phpt", "b.phpt"])
    assert wasm_rate(wasm, native) == 0.5
    assert wasm_rate(wasm, Counts()) is None


def test_failure_causes_are_classified():
    assert failure_cause("wasmforge: php.wasm trapped: wasm trap: indirect call type mismatch").startswith("trap")
    assert failure_cause("Warning: shell_exec(): Unable to execute 'ls'").startswith("processes")
    assert failure_cause("php_network_getaddresses: getaddrinfo failed").startswith("sockets")
    assert failure_cause("open(./x, O_RDWR) failed: No such file or directory").startswith("paths")
    assert failure_cause("Fatal error: Uncaught FiberError: Fibers are not available on WASI: ...").startswith("Fibers")
    assert failure_cause("int(1)\nint(2)") == "other (output differs)"


JUNIT = """<testsuites><testsuite tests="6">
<testcase name="test.test_x.A.test_ok" status="run" result="completed" time="0.1" />
<testcase name="test.test_x.A.test_fails" status="run" result="completed"><failure type="AssertionError" message="1 != 2">tb</failure></testcase>
<testcase name="test.test_x.A.test_errs" status="run" result="completed"><error type="OSError" message="no">tb</error></testcase>
<testcase name="test.test_x.A.test_skip" status="run" result="completed"><skipped>needs fork</skipped></testcase>
<testcase name="test.test_x.A.test_xfail" status="run" result="completed"><output type="E" message="m">tb</output></testcase>
<testcase name="test.test_x.A.test_subtests" />
</testsuite></testsuites>"""


def test_a_regrtest_junit_report_is_counted_per_test(tmp_path):
    from wasmforge.conformance import read_junit

    path = tmp_path / "r.xml"
    path.write_text(JUNIT)
    counts = read_junit(path)
    assert (counts.passed, counts.failed, counts.skipped, counts.other) == (1, 3, 1, 1)
    assert counts.passes == ["test.test_x.A.test_ok"]
    # A test whose subtests failed has no result of its own: it failed.
    assert counts.failures == ["test.test_x.A.test_fails", "test.test_x.A.test_errs", "test.test_x.A.test_subtests"]
    # No report (the process died), a damaged one, or one that declares entities: nothing counted.
    for text in (None, JUNIT[:200], '<!DOCTYPE x [<!ENTITY a "aaaa">]>' + JUNIT):
        if text is None:
            path.unlink()
        else:
            path.write_text(text)
        assert read_junit(path).run == 0


def test_why_native_passes_do_not_pass_in_wasm_comes_from_the_wasm_report(tmp_path):
    from wasmforge.conformance import _read_regrtest_run, lost_causes, read_junit

    path = tmp_path / "r.wasm.xml"
    path.write_text(JUNIT)
    wasm = read_junit(path)
    assert wasm.reasons == {"test.test_x.A.test_fails": "failed: 1 != 2", "test.test_x.A.test_errs": "failed: no",
                            "test.test_x.A.test_skip": "skipped: needs fork",
                            "test.test_x.A.test_subtests": "failed: a subtest failed"}
    native = Counts(passed=5, passes=["test.test_x.A.test_ok", "test.test_x.A.test_fails", "test.test_x.A.test_errs",
                                      "test.test_x.A.test_skip", "test.test_x.A.test_subtests"])
    assert sorted(lost_causes({"test_x": (wasm, native)})) == [
        ("failed: 1 != 2", 1), ("failed: a subtest failed", 1), ("failed: no", 1), ("skipped: needs fork", 1)]
    # A module that ran no test in wasm: its log says why, and every native pass is lost to that.
    log = tmp_path / "test_y.wasm.log"
    log.write_text("0:00:00 [1/1] test_y\ntest_y skipped -- No module named '_testcapi'\n")
    skipped = _read_regrtest_run(log)
    assert skipped.note == "the module is skipped: No module named '_testcapi'"
    log.write_text("Error: failed to run main module\nCaused by:\n    wasm trap: call stack exhausted\n")
    assert _read_regrtest_run(log).note == "the module stopped: wasm call stack exhausted"
    assert lost_causes({"test_y": (skipped, native)}) == [("the module is skipped: No module named '_testcapi'", 5)]
    # Quoted names (temporary files) are left out, so one cause is one group.
    path.write_text(JUNIT.replace('message="no"', "message=\"PermissionError: denied: '/tmp/tmpa8x2'\""))
    assert read_junit(path).reasons["test.test_x.A.test_errs"] == "failed: PermissionError: denied: '…'"


def test_a_run_of_some_suites_does_not_replace_the_published_report(tmp_path):
    config = Config.from_env(output_dir=tmp_path / "out")
    book = RecipeBook.load(config.recipes_dir)
    package = book.package(book.parse_target("php-7.4.33"))
    assert report_path(package, config, None, subset=False) == config.root / "docs" / "conformance.md"
    subset = report_path(package, config, None, subset=True)
    assert subset == tmp_path / "out" / ".conformance" / "php-7.4.33" / "report-subset.md"
    assert report_path(package, config, Path("x.md"), subset=True) == Path("x.md")
