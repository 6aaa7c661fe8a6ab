"""`invoke bench-serve`: requests per second, latency and memory of PHP pages served by `invoke serve`'s
server, php-cgi.wasm against the native php-cgi, under a bounded load from `wrk` on 127.0.0.1.

Both backends run behind the same server with the same settings, one after the other, so the numbers
differ only in how PHP runs. The memory of a worker is its resident set, sampled while the load runs:
a wasm worker process (Python, wasmtime and the instance), or a native php-cgi process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import requests

from .apps import App, install, prepare_site
from .bench import machine_description
from .config import Config
from .errors import WasmforgeError
from .runtime import wasmtime_version
from .serve import BackgroundServer, php_application

HELLO = "<?php echo 'Hello, world!';\n"


class Page(NamedTuple):
    name: str
    docroot: Path | None  # None: the application's site, assembled into each run's state directory
    path: str
    setup: Callable[[str], None] | None = None
    app: App | None = None


class Load(NamedTuple):
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    worker_mib: float


def pages(examples: Path, scratch: Path, app: App | None = None) -> list[Page]:
    hello = scratch / "hello"
    hello.mkdir(parents=True, exist_ok=True)
    (hello / "index.php").write_text(HELLO)
    found = [Page("seed demo (examples/php/docroot/index.php)", examples / "docroot", "/index.php"),
             Page("hello world", hello, "/"),
             Page("guestbook, 20 entries (examples/php/guestbook)", examples / "guestbook", "/", _sign_guestbook)]
    if app:
        found.append(Page(f"{app.name} {app.version} front page (apps/{app.file.name}, freshly installed)", None, "/",
                          app=app))
    return found


def _sign_guestbook(url: str) -> None:
    with requests.Session() as visitor:
        for i in range(20):
            token = re.search(r'name="token" value="([0-9a-f]+)"', visitor.get(url).text)
            if not token:
                raise WasmforgeError("the guestbook's page has no form token")
            visitor.post(url, data={"token": token.group(1), "name": f"visitor {i}", "message": "hello " * 20})


def wrk_command() -> str:
    wrk = shutil.which("wrk")
    if not wrk:
        raise WasmforgeError("the load comes from wrk, which is not installed", hint="apt-get install wrk")
    return wrk


def measure(build: Path, manifest: dict[str, Any], page: Page, *, native: bool, seconds: int, connections: int,
            workers: int, opcache: bool, scratch: Path, config: Config, log: Callable[[str], None]) -> Load:
    state = Path(tempfile.mkdtemp(prefix="state-", dir=scratch))
    docroot, writable = page.docroot, []
    if page.app:
        docroot = prepare_site(page.app, config, state, log)
        writable = [docroot / rel for rel in page.app.site.get("writable", [])]
    assert docroot is not None
    app = php_application(build, manifest, docroot, native=native, workers=workers, state=state, timeout=30,
                          memory_mib=512, max_body_mib=8, log=lambda line: None, opcache=opcache, writable=writable,
                          fixed_code=page.app is not None)
    server = BackgroundServer(app, threads=max(4, 2 * workers))
    url = server.url + page.path
    try:
        if page.app:
            install(page.app, server.url, state, log)
        if page.setup:
            page.setup(url)
        for _ in range(10):  # warm: the workers started, OPcache's file cache written
            answer = requests.get(url, timeout=60)
            if answer.status_code != 200:
                raise WasmforgeError(f"{url} answered {answer.status_code} before the load",
                                     details=answer.text[:500])
        sampler = _RssSampler()
        sampler.start()
        result = subprocess.run([wrk_command(), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
                                capture_output=True, text=True, timeout=seconds + 120)
        sampler.stop()
        if result.returncode != 0:
            raise WasmforgeError("wrk failed", details=result.stderr[-2000:])
        load = parse_wrk(result.stdout)
        return load._replace(worker_mib=sampler.peak_mib)
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)


def parse_wrk(output: str) -> Load:
    """Requests/s, p50 and p99 (ms) and the failed responses from `wrk --latency`'s report."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    if not (rate and p50 and p99):
        raise WasmforgeError("wrk's report is not what it should be", details=output[-2000:])
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", output))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return Load(float(rate.group(1)), float(p50.group(1)) * scale[p50.group(2)],
                float(p99.group(1)) * scale[p99.group(2)], errors, 0.0)


class _RssSampler:
    """The largest resident set of one of this process's children (the workers, or native php-cgi) other
    than wrk, sampled every 50 ms."""

    def __init__(self) -> None:
        import os

        self.parent = os.getpid()
        self.peak_kib = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024

    def _run(self) -> None:
        while not self.done.wait(0.05):
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    status = (proc / "status").read_text()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                if int(fields.get("PPid", "0").strip() or 0) != self.parent or fields.get("Name", "").strip() == "wrk":
                    continue
                rss = fields.get("VmRSS", "0 kB").split()[0]
                self.peak_kib = max(self.peak_kib, int(rss))


def render(target: str, rows: list[tuple[str, Load, Load]], command: str, seconds: int, connections: int,
           workers: int, opcache: bool, wrk_version: str) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Serving {target} over HTTP — {now}", "",
             f"- command: `{command}`",
             f"- machine: {machine_description()}",
             f"- server: `invoke serve`'s (waitress), {workers} PHP workers, OPcache file cache "
             f"{'on' if opcache else 'off'}; wasm: php-cgi.wasm precompiled, wasmtime {wasmtime_version()} "
             "(Python package), a fresh instance per request, each worker on one CPU; native: php-cgi of the same "
             "sources, one process "
             "per request (classic CGI)",
             f"- load: {wrk_version}, `-t1 -c{connections} -d{seconds}s --latency`, 127.0.0.1, the server and wrk "
             f"on the same {len(os.sched_getaffinity(0))} cores",
             "",
             "| page | native req/s | wasm req/s | wasm / native | native p50 | wasm p50 | native p99 | wasm p99 "
             "| p99 wasm / native | memory per worker (native / wasm) | failed (native / wasm) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, native, wasm in rows:
        rate = f"{wasm.requests_per_second / native.requests_per_second:.0%}" if native.requests_per_second else "n/a"
        tail = f"{wasm.p99_ms / native.p99_ms:.2f}x" if native.p99_ms else "n/a"
        lines.append(f"| {name} | {native.requests_per_second:.1f} | {wasm.requests_per_second:.1f} | {rate} | "
                     f"{native.p50_ms:.1f} ms | {wasm.p50_ms:.1f} ms | {native.p99_ms:.1f} ms | {wasm.p99_ms:.1f} ms | "
                     f"{tail} | {native.worker_mib:.0f} / {wasm.worker_mib:.0f} MiB | {native.errors} / {wasm.errors} |")
    return "\n".join(lines) + "\n"


def run_serve_bench(wasm: tuple[Path, dict[str, Any]], native: tuple[Path, dict[str, Any]], examples: Path, *,
                    seconds: int, connections: int, workers: int, opcache: bool, config: Config,
                    log: Callable[[str], None], app: App | None = None) -> list[tuple[str, Load, Load]]:
    wrk_command()
    scratch = Path(tempfile.mkdtemp(prefix="wasmforge-bench-serve-"))
    rows = []
    try:
        for page in pages(examples, scratch, app):
            measured = {}
            for kind, (build, manifest) in (("native", native), ("wasm", wasm)):
                log(f"{page.name}: {kind}, {seconds} s of load")
                measured[kind] = measure(build, manifest, page, native=kind == "native", seconds=seconds,
                                         connections=connections, workers=workers, opcache=opcache,
                                         scratch=scratch, config=config, log=log)
                log(f"  {measured[kind].requests_per_second:.1f} req/s, p50 {measured[kind].p50_ms:.1f} ms, "
                    f"p99 {measured[kind].p99_ms:.1f} ms")
            rows.append((page.name, measured["native"], measured["wasm"]))
        return rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def wrk_version() -> str:
    result = subprocess.run([wrk_command(), "--version"], capture_output=True, text=True)
    first = (result.stdout or result.stderr).splitlines()
    return " ".join(first[0].split()[:2]) if first else "wrk"

