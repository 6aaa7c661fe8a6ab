"""Parsing and classifying PHP run-tests results (the runs themselves are measured, not tested here)."""

from __future__ import annotations

from wasmforge.conformance import _RESULT, Counts, failure_cause, plain_log, wasm_rate

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
