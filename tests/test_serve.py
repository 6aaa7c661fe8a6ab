"""`invoke serve`: the CGI response parse and the routing on their own, then real servers (waitress on
127.0.0.1) running php-cgi.wasm and the native php-cgi, driven by real HTTP clients."""

from __future__ import annotations

import contextlib
import email.utils
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import ROOT

from wasmforge.cgi import BadCgiResponse, parse_cgi_response
from wasmforge.errors import WasmforgeError
from wasmforge.serve import BackgroundServer, Route, byte_range, php_application, php_arguments, route
from wasmforge.serve_bench import parse_wrk

GUESTBOOK = ROOT / "examples" / "php" / "guestbook"


# The CGI response -------------------------------------------------------------------------------

def test_a_cgi_response_gives_status_headers_and_body():
    response = parse_cgi_response(b"Status: 201 Created\r\nX-A: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
                                  b"Content-type: text/html\r\n\r\nbody\r\n\r\nmore")
    assert response.status == "201 Created"
    assert response.headers == [("X-A", "1"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                                ("Content-type", "text/html")]
    assert response.body == b"body\r\n\r\nmore"


def test_a_location_without_status_is_a_302_and_a_bare_code_gets_its_phrase():
    assert parse_cgi_response(b"Location: /x\n\n").status == "302 Found"
    assert parse_cgi_response(b"Status: 404\nContent-Type: text/plain\n\nno").status == "404 Not Found"


def test_hop_by_hop_headers_from_the_script_are_dropped():
    response = parse_cgi_response(b"Connection: close\r\nTransfer-Encoding: chunked\r\nX-B: 2\r\n\r\n")
    assert response.headers == [("X-B", "2")]


@pytest.mark.parametrize("output", [b"", b"just text", b"hello world\n\nbody", b"Status: 2000 OK\n\n",
                                    b"Status: abc\n\n", b"Bad Name: x\n\n", b": x\n\n"])
def test_output_that_is_not_a_cgi_response_is_refused(output):
    with pytest.raises(BadCgiResponse):
        parse_cgi_response(output)


WRK_REPORT = """Running 10s test @ http://127.0.0.1:8080/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    20.12ms    5.01ms  60.00ms   80.00%
  Latency Distribution
     50%   18.90ms
     75%   21.00ms
     90%   25.00ms
     99%    1.20s
  2016 requests in 10.00s, 1.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:    201.60
Transfer/sec:    102.40KB
"""


def test_wrks_report_is_read_with_its_units_and_failures():
    load = parse_wrk(WRK_REPORT)
    assert (load.requests_per_second, load.p50_ms, load.p99_ms, load.errors) == (201.6, 18.9, 1200.0, 7)
    with pytest.raises(WasmforgeError):
        parse_wrk("wrk: connection refused")


# Routing ------------------------------------------------------------------------------------------

def test_opcache_trusts_an_assembled_apps_scripts_and_starts_its_file_cache_afresh(tmp_path):
    stale = tmp_path / "opcache" / "old-build" / "index.php.bin"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"compiled from the files of an earlier site")
    own = php_arguments(str, tmp_path, 8, opcache=True)
    assert "opcache.validate_timestamps=1" in own and stale.exists()  # a docroot of the user's: edits count
    assembled = php_arguments(str, tmp_path, 8, opcache=True, fixed_code=True)
    assert "opcache.validate_timestamps=0" in assembled and f"opcache.file_cache={tmp_path / 'opcache'}" in assembled
    assert (tmp_path / "opcache").is_dir() and not any((tmp_path / "opcache").iterdir())
    # A cache that cannot be emptied (here a link to elsewhere) stops the start, with its path.
    (tmp_path / "opcache").rmdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "opcache").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(WasmforgeError, match="cannot empty OPcache's file cache .*opcache"):
        php_arguments(str, tmp_path, 8, opcache=True, fixed_code=True)


@pytest.fixture
def docroot(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    (root / "sub").mkdir(parents=True)
    (root / "index.php").write_text("<?php echo 'front';")
    (root / "page.php").write_text("<?php echo 'page';")
    (root / "sub" / "index.php").write_text("<?php echo 'sub';")
    (root / "style.css").write_text("body {}")
    (root / ".htaccess").write_text("secret")
    (tmp_path / "outside.txt").write_text("outside")
    (root / "link.txt").symlink_to(tmp_path / "outside.txt")
    return root.resolve()


def test_routes_of_scripts_static_files_directories_and_the_front_controller(docroot):
    assert route(docroot, "/page.php") == Route("script", docroot / "page.php", "/page.php")
    assert route(docroot, "/page.php/a/b") == Route("script", docroot / "page.php", "/page.php", "/a/b")
    assert route(docroot, "/style.css") == Route("static", docroot / "style.css")
    assert route(docroot, "/sub/") == Route("script", docroot / "sub" / "index.php", "/sub/index.php")
    assert route(docroot, "/sub") == Route("redirect", location="/sub/")
    assert route(docroot, "/") == Route("script", docroot / "index.php", "/index.php")
    assert route(docroot, "/2026/12/a-post/") == Route("script", docroot / "index.php", "/index.php")
    assert route(docroot, "/style.css/x") == Route("script", docroot / "index.php", "/index.php")


@pytest.mark.parametrize("path", ["/../outside.txt", "/sub/../../outside.txt", "/..", "/.htaccess",
                                  "/sub/.ht.sqlite", "/link.txt", "/page.php\0.txt", "relative"])
def test_traversal_hidden_files_and_links_out_of_the_docroot_are_missing(docroot, path):
    assert route(docroot, path).kind == "missing"


def test_without_a_front_controller_an_unknown_path_is_missing(docroot):
    (docroot / "index.php").unlink()
    assert route(docroot, "/nothing").kind == "missing"


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=0-3", (0, 4)), ("bytes=5-", (5, 10)), ("bytes=-3", (7, 10)), ("bytes=8-100", (8, 10)),
    ("bytes=10-", "unsatisfiable"), ("bytes=-0", "unsatisfiable"), ("bytes=0-1,3-4", None),
    ("lines=1-2", None), ("bytes=x-y", None), ("bytes=5-2", None)])
def test_byte_ranges(header, expected):
    assert byte_range(header, 10) == expected


# Real servers -----------------------------------------------------------------------------------

SCRIPTS = {
    "env.php": "<?php header('Content-Type: application/json'); setcookie('a', '1'); setcookie('b', '2');"
               " echo json_encode(['server' => $_SERVER, 'get' => $_GET, 'post' => $_POST,"
               " 'input' => file_get_contents('php://input'), 'cookie' => $_COOKIE]);",
    "loop.php": "<?php while (true) {}",
    "memory.php": "<?php $a = []; while (true) { $a[] = str_repeat('x', 1 << 20); }",
    "noheaders.php": "<?php $out = fopen('php://stdout', 'w'); fwrite($out, \"not a CGI response\\n\"); exit;",
    "global.php": "<?php $GLOBALS['n'] = ($GLOBALS['n'] ?? 0) + 1; echo getmypid() > 0 ? $GLOBALS['n'] : 0;",
    "sleep.php": "<?php usleep(300000); echo 'slept';",
    "index.php": "<?php echo 'front controller: ', $_SERVER['REQUEST_URI'];",
    "lock.php": "<?php $db = new PDO('sqlite:' . $_SERVER['WASMFORGE_STATE'] . '/locked.sqlite');"
                " $db->exec('CREATE TABLE IF NOT EXISTS t (x)'); $db->exec('BEGIN IMMEDIATE');"
                " $db->exec('INSERT INTO t VALUES (1)'); while (true) {}",
    "count.php": "<?php $db = new PDO('sqlite:' . $_SERVER['WASMFORGE_STATE'] . '/locked.sqlite');"
                 " $db->setAttribute(PDO::ATTR_ERRMODE, PDO::ERRMODE_EXCEPTION); $db->setAttribute(PDO::ATTR_TIMEOUT, 1);"
                 " $db->exec('INSERT INTO t VALUES (2)'); echo $db->query('SELECT count(*) FROM t')->fetchColumn();",
    "write.php": "<?php echo json_encode([@file_put_contents(__DIR__ . '/written.txt', 'x') !== false,"
                 " @file_put_contents($_SERVER['WASMFORGE_STATE'] . '/written.txt', 'x') !== false]);",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    for name, text in SCRIPTS.items():
        (root / name).write_text(text)
    (root / "data.bin").write_bytes(bytes(range(256)) * 4)
    return root


def _start(build, site: Path, state: Path, native: bool, lines: list[str]) -> BackgroundServer:
    from wasmforge.pipeline import read_manifest

    out = build
    app = php_application(out, read_manifest(out) or {}, site, native=native, workers=2, state=state, timeout=3,
                          memory_mib=256, max_body_mib=1, log=lines.append)
    return BackgroundServer(app, max_body=1 << 20)


@pytest.fixture(scope="module", params=["wasm", "native"])
def served(request, tmp_path_factory, site) -> Iterator[tuple[BackgroundServer, list[str], str]]:
    kind = request.param
    build = request.getfixturevalue("php")[2] if kind == "wasm" else request.getfixturevalue("php_native")
    lines: list[str] = []
    server = _start(build, site, tmp_path_factory.mktemp(f"state-{kind}"), kind == "native", lines)
    yield server, lines, kind
    server.stop()


@pytest.mark.integration
def test_the_cgi_variables_of_rfc_3875_reach_the_script(served):
    server, lines, kind = served
    response = requests.post(f"{server.url}/env.php/extra/path?q=1&r=two", data={"name": "wasi"},
                             headers={"X-Custom": "yes", "Proxy": "http://evil", "Cookie": "c=3"})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.cookies.get("a") == "1" and response.cookies.get("b") == "2"
    seen = response.json()
    s = seen["server"]
    assert (s["REQUEST_METHOD"], s["QUERY_STRING"], s["SCRIPT_NAME"], s["PATH_INFO"]) == \
        ("POST", "q=1&r=two", "/env.php", "/extra/path")
    assert s["REQUEST_URI"] == "/env.php/extra/path?q=1&r=two"
    assert s["SCRIPT_FILENAME"].endswith("/env.php") and s["GATEWAY_INTERFACE"] == "CGI/1.1"
    assert s["SERVER_PORT"] == str(server.port) and s["REMOTE_ADDR"] == "127.0.0.1"
    assert s["CONTENT_TYPE"] == "application/x-www-form-urlencoded" and s["CONTENT_LENGTH"] == "9"
    assert s["HTTP_X_CUSTOM"] == "yes" and "HTTP_PROXY" not in s
    # The state directory, as the program knows it: the guest path in wasm, the host's natively.
    assert s["WASMFORGE_STATE"] == "/state" if kind == "wasm" else "/state-native" in s["WASMFORGE_STATE"]
    assert s["TMPDIR"] == ("/state/tmp" if kind == "wasm" else s["WASMFORGE_STATE"] + "/tmp")
    assert seen["get"] == {"q": "1", "r": "two"} and seen["post"] == {"name": "wasi"}
    assert seen["input"] == "name=wasi" and seen["cookie"] == {"c": "3"}
    assert any(re.search(r'"POST /env.php/extra/path\?q=1&r=two HTTP/1.1" 200 \d+ [\d.]+ ms', line) for line in lines)


@pytest.mark.integration
def test_keep_alive_front_controller_and_no_state_between_requests(served):
    server, _, _ = served
    with requests.Session() as session:
        answers = [session.get(f"{server.url}/global.php").text for _ in range(3)]
        assert answers == ["1", "1", "1"]
        assert session.get(f"{server.url}/2026/12/a-post/?x=1").text == "front controller: /2026/12/a-post/?x=1"
    # Two requests on one connection, as a browser sends them.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        request = b"GET /global.php HTTP/1.1\r\nHost: x\r\n\r\n"
        conn.sendall(request + request)
        data = _read_until(conn, lambda d: d.count(b"HTTP/1.1 200 OK") == 2 and d.endswith(b"1"))
        assert data.count(b"HTTP/1.1 200 OK") == 2


@pytest.mark.integration
def test_the_module_writes_its_state_directory_and_not_the_docroot(served, site):
    server, _, kind = served
    if kind == "native":
        pytest.skip("the native php-cgi has the host's file system, as any native CGI program")
    assert requests.get(f"{server.url}/write.php").json() == [False, True]
    assert not (site / "written.txt").exists()


@pytest.mark.integration
def test_static_files_with_types_dates_and_ranges(served, site):
    server, _, _ = served
    full = requests.get(f"{server.url}/data.bin")
    assert full.status_code == 200 and full.content == (site / "data.bin").read_bytes()
    assert full.headers["Content-Type"] == "application/octet-stream"
    modified = full.headers["Last-Modified"]
    assert email.utils.parsedate_to_datetime(modified).timestamp() == int((site / "data.bin").stat().st_mtime)
    assert requests.get(f"{server.url}/data.bin", headers={"If-Modified-Since": modified}).status_code == 304
    part = requests.get(f"{server.url}/data.bin", headers={"Range": "bytes=256-511"})
    assert part.status_code == 206 and part.content == bytes(range(256))
    assert part.headers["Content-Range"] == "bytes 256-511/1024"
    assert requests.get(f"{server.url}/data.bin", headers={"Range": "bytes=5000-"}).status_code == 416
    assert requests.post(f"{server.url}/data.bin").status_code == 405


@pytest.mark.integration
def test_a_script_that_loops_forever_gets_504_while_others_are_served(served):
    server, lines, kind = served
    looping: dict[str, object] = {}
    thread = threading.Thread(target=lambda: looping.update(r=requests.get(f"{server.url}/loop.php", timeout=30)))
    start = time.monotonic()
    thread.start()
    time.sleep(0.5)
    # Meanwhile the other worker answers.
    assert requests.get(f"{server.url}/sleep.php", timeout=10).text == "slept"
    thread.join()
    assert looping["r"].status_code == 504  # type: ignore[attr-defined]
    assert 3 <= time.monotonic() - start < 20
    assert any('"GET /loop.php HTTP/1.1" 504' in line for line in lines)
    # The replaced worker serves again: more requests than workers.
    assert [requests.get(f"{server.url}/global.php").text for _ in range(3)] == ["1", "1", "1"]


@pytest.mark.integration
def test_each_wasm_worker_runs_with_all_its_threads_on_one_cpu_in_turn(served):
    server, _, kind = served
    if kind == "native":
        return  # a native php-cgi is a process per request, placed by the kernel
    assert requests.get(f"{server.url}/global.php").text == "1"  # wasmtime's WASI threads exist now
    placed = []
    for worker in list(server.app.backend.all):
        allowed = set()
        for task in os.listdir(f"/proc/{worker.pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # a pool thread that ended meanwhile
                allowed.add(frozenset(os.sched_getaffinity(int(task))))
        assert len(allowed) == 1 and len(cpus := next(iter(allowed))) == 1, allowed
        placed.append(next(iter(cpus)))
    ours = sorted(os.sched_getaffinity(0))
    assert sorted(placed) == sorted(ours[i % len(ours)] for i in range(len(placed)))


@pytest.mark.integration
def test_a_worker_stopped_inside_a_sqlite_transaction_leaves_no_lock_behind(served):
    server, lines, kind = served
    assert requests.get(f"{server.url}/lock.php", timeout=30).status_code == 504
    # The database is written again at once: its lock went with the stopped worker, and its transaction
    # was never committed.
    deadline = time.monotonic() + 30
    while (answer := requests.get(f"{server.url}/count.php", timeout=30)).status_code != 200 \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert answer.status_code == 200 and answer.text == "1"
    if kind == "wasm":
        assert any("removed the SQLite locks the stopped worker held" in line for line in lines)


@pytest.mark.integration
def test_a_script_that_exhausts_memory_gets_500_and_is_logged(served):
    server, lines, _ = served
    assert requests.get(f"{server.url}/memory.php").status_code == 500
    assert any("php: PHP Fatal error:" in line and "memory" in line.lower() for line in lines)
    assert requests.get(f"{server.url}/global.php").text == "1"


@pytest.mark.integration
def test_output_that_is_not_a_cgi_response_gets_502(served):
    server, lines, _ = served
    assert requests.get(f"{server.url}/noheaders.php").status_code == 502
    assert any('"GET /noheaders.php HTTP/1.1" 502' in line and "not a header line" in line for line in lines)
    assert requests.get(f"{server.url}/global.php").text == "1"


@pytest.mark.integration
def test_bodies_over_the_limit_get_413_and_malformed_requests_400(served):
    server, _, _ = served
    assert requests.post(f"{server.url}/env.php", data=b"x" * (2 << 20)).status_code == 413
    for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(raw)
            assert re.match(rb"HTTP/1\.[01] 400 ", _read_until(conn, lambda d: b"\r\n\r\n" in d))
    assert requests.get(f"{server.url}/global.php").text == "1"


@pytest.mark.integration
@pytest.mark.parametrize("path", ["/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc%2fpasswd",
                                  "/data.bin/..%2f..%2f..%2fetc/passwd", "/%2e%2e%5c..%5cetc/passwd"])
def test_traversal_never_reaches_a_file_outside_the_docroot(served, path):
    server, _, _ = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = _read_until(conn, lambda d: False)
    assert b"root:" not in data
    assert data.startswith((b"HTTP/1.1 404 ", b"HTTP/1.1 200 OK")), data[:100]
    if data.startswith(b"HTTP/1.1 200"):  # sent to the front controller, which sees the path only
        assert b"front controller:" in data


@pytest.mark.integration
def test_a_client_that_disconnects_mid_request_does_not_stop_the_server(served):
    server, _, _ = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(b"POST /env.php HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\npartial")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(b"GET /sleep.php HTTP/1.1\r\nHost: x\r\n\r\n")
    assert requests.get(f"{server.url}/global.php").text == "1"


@pytest.mark.integration
def test_the_guestbook_with_a_session_and_a_redirect_after_post(php, php_native, tmp_path):
    for kind, build in (("wasm", php[2]), ("native", php_native)):
        server = _start(build, GUESTBOOK, tmp_path / kind, kind == "native", [])
        try:
            with requests.Session() as visitor:
                page = visitor.get(server.url + "/")
                assert page.status_code == 200 and "0 entries" in page.text
                assert "on WASI" in page.text if kind == "wasm" else "on Linux" in page.text
                token = re.search(r'name="token" value="([0-9a-f]+)"', page.text).group(1)  # type: ignore[union-attr]
                posted = visitor.post(server.url + "/", data={"token": token, "name": "Ann", "message": "héllo <b>"},
                                      allow_redirects=False)
                assert posted.status_code == 303 and posted.headers["Location"] == "/"
                after = visitor.get(server.url + "/")
                assert "Thank you, Ann!" in after.text and "héllo &lt;b&gt;" in after.text
                assert "1 entry" in after.text
                assert "Thank you" not in visitor.get(server.url + "/").text  # the message was for one page
                assert requests.post(server.url + "/", data={"token": "forged", "name": "x", "message": "y"}
                                     ).status_code == 403
            assert (tmp_path / kind / "guestbook.sqlite").is_file()
            assert requests.get(server.url + "/style.css").headers["Content-Type"] == "text/css; charset=utf-8"
        finally:
            server.stop()


@pytest.mark.integration
def test_invoke_serve_without_a_docroot_says_what_to_give():
    result = subprocess.run([sys.executable, "-m", "invoke", "serve", "php-7.4.33"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "--docroot DIR" in result.stderr and "Traceback" not in result.stderr


def session_env(config) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The environment in which `invoke` finds the session's builds (its output directory and store)."""
    return {**os.environ, "WASMFORGE_OUTPUT": str(config.outputs), "WASMFORGE_STORE": str(config.artifacts)}


def _read_until(conn: socket.socket, done) -> bytes:  # type: ignore[no-untyped-def]
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while not done(data):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    return data



@pytest.mark.integration
def test_invoke_serve_on_a_port_in_use_says_so(php):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "invoke", "serve", "php-7.4.33", "--docroot", str(GUESTBOOK),
                                 "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env=session_env(php[0]))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


@pytest.mark.integration
def test_the_guestbook_in_a_real_browser(php, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = _start(php[2], GUESTBOOK, tmp_path / "state", False, [])
    try:
        browser.delete_all_cookies()
        browser.get(server.url + "/")
        assert browser.title == "Guestbook" and "0 entries" in browser.find_element(By.ID, "count").text
        browser.find_element(By.NAME, "name").send_keys("Browser")
        browser.find_element(By.NAME, "message").send_keys("Signed in Chromium")
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        # The redirect after the POST lands on the page again, with the message of the session (the
        # click returns before that navigation ends, so the test waits for the new page).
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.ID, "flash"))
        assert browser.find_element(By.ID, "flash").text == "Thank you, Browser!"
        assert browser.find_element(By.CSS_SELECTOR, "#entries .message").text == "Signed in Chromium"
        assert browser.current_url == server.url + "/"
        browser.refresh()  # a reload after the redirect does not post again
        assert "1 entry" in browser.find_element(By.ID, "count").text and not browser.find_elements(By.ID, "flash")
        assert browser.save_screenshot(str(tmp_path / "guestbook.png"))
    finally:
        server.stop()


def test_the_load_table_says_n_a_where_native_served_nothing():
    from wasmforge.serve_bench import Load, render

    table = render("php-7.4.33", [("page", Load(0.0, 0.0, 0.0, 3, 40.0), Load(2.0, 500.0, 900.0, 0, 60.0))],
                   "invoke bench-serve php-7.4.33", 10, 4, 2, False, "wrk 4.1.0")
    assert "| page | 0.0 | 2.0 | n/a | 0.0 ms | 500.0 ms | 0.0 ms | 900.0 ms | n/a | 40 / 60 MiB | 3 / 0 |" in table
