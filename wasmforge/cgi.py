"""CGI/1.1 (RFC 3875) between our HTTP server and php-cgi: the response's parse, and the backends that
run one request each in php-cgi.wasm (worker processes) or in the native php-cgi.

Why worker processes for wasm: a request that loops forever must be stopped without slowing the
others (wasmtime's epoch interruption would cost 35% of PHP's VM, docs/benchmarks.md), and a process
can be killed at its timeout and replaced. Each worker loads the precompiled module once and keeps
one fresh instance ready for the next request: instantiating php-cgi takes ~0.6 ms against ~6 ms for
PHP's own start-up (measured 2026-12-07). An instance of a WASI command runs `_start` once, so no
instance is ever used for two requests and nothing a script did can reach the next one.

The worker speaks a small protocol on its standard streams: each message is a 4-byte big-endian
length, a JSON header naming the sizes of the blobs that follow, then the blobs.
"""

from __future__ import annotations

import contextlib
import http
import json
import os
import queue
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

from .errors import RunError

# Response headers that belong to one connection (RFC 9110, 7.6.1): a CGI program may not set them
# and a WSGI server refuses them.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade"}
TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class CgiResult(NamedTuple):
    """What one run of php-cgi gave back."""
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    seconds: float
    timed_out: bool = False
    failure: str | None = None  # a trap, or a worker that died: not PHP's own exit

    def describe(self) -> str:
        if self.timed_out:
            return f"killed by the timeout after {self.seconds:.1f} s"
        return self.failure or f"exit code {self.exit_code}"


class CgiResponse(NamedTuple):
    status: str  # "200 OK"
    headers: list[tuple[str, str]]
    body: bytes


class BadCgiResponse(Exception):
    """php-cgi's output is not a CGI response (the server answers 502)."""


def parse_cgi_response(output: bytes) -> CgiResponse:
    """Split a CGI response (RFC 3875, 6) into status, headers and body.

    `Status` gives the status (its reason phrase filled in when missing), a `Location` without one
    is a redirect (302), and hop-by-hop headers are dropped; anything that is not a header block
    ended by an empty line is refused."""
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := output.find(sep)) >= 0]
    if not ends:
        raise BadCgiResponse("the output has no empty line ending its headers")
    end, width = min(ends)
    status = None
    headers: list[tuple[str, str]] = []
    for raw in output[:end].split(b"\n"):
        line = raw.rstrip(b"\r").decode("latin-1")
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= TOKEN:
            raise BadCgiResponse(f"not a header line: {line[:80]!r}")
        value = value.strip()
        if "\r" in value or "\n" in value:
            raise BadCgiResponse(f"a header value with a line break: {name}")
        if name.lower() == "status":
            status = _status_line(value)
        elif name.lower() not in HOP_BY_HOP:
            headers.append((name, value))
    if status is None:
        status = "302 Found" if any(n.lower() == "location" for n, _ in headers) else "200 OK"
    return CgiResponse(status, headers, output[end + width:])


def _status_line(value: str) -> str:
    code, _, reason = value.partition(" ")
    if not (code.isdigit() and len(code) == 3 and 100 <= int(code) <= 599):
        raise BadCgiResponse(f"not a status: {value[:40]!r}")
    if not reason.strip():
        try:
            reason = http.HTTPStatus(int(code)).phrase
        except ValueError:
            reason = "Unknown"
    return f"{code} {reason.strip()}"


# The worker protocol ---------------------------------------------------------------------------

def send_message(stream: IO[bytes], header: dict[str, Any], *blobs: bytes) -> None:
    header = {**header, "sizes": [len(b) for b in blobs]}
    data = json.dumps(header).encode()
    stream.write(struct.pack(">I", len(data)) + data + b"".join(blobs))
    stream.flush()


def read_message(stream: IO[bytes]) -> tuple[dict[str, Any], list[bytes]] | None:
    """The next message, or None at the end of the stream (the other side is gone)."""
    size = stream.read(4)
    if len(size) < 4:
        return None
    header = json.loads(_read_exactly(stream, struct.unpack(">I", size)[0]))
    return header, [_read_exactly(stream, n) for n in header["sizes"]]


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("the message ends early")
    return data


# Backends ------------------------------------------------------------------------------------------

class Backend:
    """Runs php-cgi for one request: `run(variables, body, timeout)`. `path()` maps a host path the
    program must see (docroot, state) to the name the program knows it by."""

    name = ""

    def path(self, host: Path) -> str:
        raise NotImplementedError

    def run(self, env: dict[str, str], body: bytes, timeout: float) -> CgiResult:
        raise NotImplementedError

    def close(self) -> None:
        pass


def guest_path(dirs: Sequence[tuple[str, Path, bool]], host: Path) -> str:
    """The name a module knows the host path `host` by, given its preopens (the deepest one wins)."""
    for guest, base, _ in sorted(dirs, key=lambda d: -len(Path(d[1]).parts)):
        if host == base or Path(base) in host.parents:
            return str(Path(guest, host.relative_to(base)))
    raise RunError(f"{host} is in no directory the module is given")


class NativeBackend(Backend):
    """The native php-cgi, one process per request as classic CGI: the reference that wasm is compared with."""

    name = "native"

    def __init__(self, program: Path, args: Sequence[str], cwd: Path) -> None:
        self.program, self.args, self.cwd = program, list(args), cwd

    def path(self, host: Path) -> str:
        return str(host)

    def run(self, env: dict[str, str], body: bytes, timeout: float) -> CgiResult:
        start = time.perf_counter()
        # Its own session: at the timeout the whole group is killed, whatever PHP started.
        proc = subprocess.Popen([str(self.program), *self.args], env=env, cwd=self.cwd, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(body, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return CgiResult(None, out, err, time.perf_counter() - start, timed_out=True)
        code = proc.returncode
        failure = f"killed by signal {-code}" if code < 0 else None
        return CgiResult(code if code >= 0 else None, out, err, time.perf_counter() - start, failure=failure)


class WasmBackend(Backend):
    """php-cgi.wasm in a pool of worker processes, each with the module loaded once."""

    name = "wasm"

    def __init__(self, module: Path, args: Sequence[str], dirs: Sequence[tuple[str, Path, bool]],
                 workers: int, memory_limit: int, log: Any = None, lock_root: Path | None = None) -> None:
        self.config = {"module": str(module), "argv": ["php-cgi", *args], "memory_limit": memory_limit,
                       "dirs": [[guest, str(host), writable] for guest, host, writable in dirs]}
        self.dirs = dirs
        self.log = log or (lambda message: None)
        self.idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self.all: set[_Worker] = set()
        self.lock = threading.Lock()
        self.closed = False
        self.size = workers
        self.lock_root = lock_root
        self.recovering = threading.Lock()
        # Each worker runs on one CPU of ours, in turn: wasmtime's WASI does each file operation on a
        # thread of its own pool and waits for it, and that hand-over costs far less when both threads
        # share a CPU (a WordPress page does ~6,000 of them: 0.34 s pinned against 0.55 s not, measured
        # 2026-12-07 on this 2-core VM under load). A replacement takes the CPU of the worker it replaces.
        cpus = sorted(os.sched_getaffinity(0))
        for i in range(workers):
            self.idle.put(self._spawn(cpus[i % len(cpus)]))

    def path(self, host: Path) -> str:
        return guest_path(self.dirs, host)

    def _spawn(self, cpu: int) -> _Worker:
        worker = _Worker(self.config, cpu)
        with self.lock:
            self.all.add(worker)
        return worker

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        with self.lock:
            self.all.discard(worker)

    def run(self, env: dict[str, str], body: bytes, timeout: float) -> CgiResult:
        start = time.perf_counter()
        try:
            worker = self.idle.get(timeout=timeout)
        except queue.Empty:
            return CgiResult(None, b"", b"", time.perf_counter() - start, timed_out=True,
                             failure="no worker became free")
        result = worker.run(env, body, timeout)
        if result.timed_out or result.failure:
            # A worker past its timeout is stopped where it is; one that failed is not trusted again.
            self._retire(worker)
            self.log(f"worker {worker.pid} replaced: {result.describe()}")
            if not self.closed:
                self.idle.put(self._spawn(worker.cpu))
                if self.lock_root:
                    threading.Thread(target=self._clear_stale_locks, daemon=True).start()
        else:
            self.idle.put(worker)
        return result

    def _clear_stale_locks(self) -> None:
        """Remove the SQLite locks a stopped worker held. WASI has no file locks, so SQLite locks with
        directories (`<database>.lock`), which outlive a process killed at its timeout: every later
        request would wait for them and fail. Once every worker is idle, no lock is held by anyone,
        so each one found then is stale."""
        with self.recovering:
            held: list[_Worker] = []
            try:
                deadline = time.monotonic() + 120
                while len(held) < self.size:
                    held.append(self.idle.get(timeout=max(0.1, deadline - time.monotonic())))
                assert self.lock_root is not None
                if removed := remove_dot_locks(self.lock_root):
                    self.log(f"removed the SQLite locks the stopped worker held: {', '.join(map(str, removed))}")
            except queue.Empty:
                self.log("the other workers stayed busy for 2 minutes: SQLite locks a stopped worker held "
                         "may remain (restart the server if requests wait for a database)")
            finally:
                for worker in held:
                    self.idle.put(worker)

    def close(self) -> None:
        self.closed = True
        with self.lock:
            workers = list(self.all)
        for worker in workers:
            self._retire(worker)


def remove_dot_locks(root: Path) -> list[Path]:
    """Remove the SQLite lock directories (`X.lock`, empty, beside a file `X`) under `root`."""
    removed = []
    for directory, subdirs, _ in os.walk(root):
        for name in subdirs:
            lock = Path(directory, name)
            if name.endswith(".lock") and Path(directory, name[:-len(".lock")]).is_file():
                with contextlib.suppress(OSError):  # not empty: not SQLite's
                    lock.rmdir()
                    removed.append(lock)
    return removed


class _Worker:
    def __init__(self, config: dict[str, Any], cpu: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "wasmforge.cgi"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, start_new_session=True)
        self.pid, self.cpu = self.proc.pid, cpu
        # Pinned at once, while its interpreter starts and before it has made any thread (the threads it
        # makes inherit this), so no worker that the pool holds ever runs elsewhere.
        with contextlib.suppress(OSError):  # it died at once: its first request says so
            os.sched_setaffinity(self.pid, {self.cpu})
        assert self.proc.stdin and self.proc.stdout
        self.to_worker, self.from_worker = self.proc.stdin, self.proc.stdout
        self.ready = False
        with contextlib.suppress(OSError):  # a worker that died at once says so at its first request
            send_message(self.to_worker, config)

    def run(self, env: dict[str, str], body: bytes, timeout: float) -> CgiResult:
        start = time.perf_counter()
        try:
            if not self.ready:
                # Its first message says the module is loaded (or why it is not).
                hello = self._receive(start + max(timeout, 60))
                if hello is None:
                    return CgiResult(None, b"", b"", time.perf_counter() - start, failure="the worker did not start")
                if "error" in hello[0]:
                    return CgiResult(None, b"", b"", time.perf_counter() - start, failure=hello[0]["error"])
                self.ready = True
                start = time.perf_counter()
            send_message(self.to_worker, {"env": env}, body)
            reply = self._receive(start + timeout)
        except (OSError, EOFError, ValueError) as exc:
            return CgiResult(None, b"", b"", time.perf_counter() - start, failure=f"the worker failed: {exc}")
        if reply is None:
            timed_out = time.perf_counter() - start >= timeout
            return CgiResult(None, b"", b"", time.perf_counter() - start, timed_out=timed_out,
                             failure=None if timed_out else "the worker exited")
        header, (out, err) = reply
        return CgiResult(header["exit_code"], out, err, header["seconds"], failure=header.get("trap"))

    def _receive(self, deadline: float) -> tuple[dict[str, Any], list[bytes]] | None:
        """The worker's next message, or None when it exits or the deadline passes first."""
        ready, _, _ = select.select([self.from_worker], [], [], max(0.0, deadline - time.perf_counter()))
        if not ready:
            return None
        return read_message(self.from_worker)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.to_worker.close()
        self.from_worker.close()


def trap_summary(text: str) -> str:
    """wasmtime's trap text in one line: its cause (the last line) and the innermost frames."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    frames = [line for line in lines if re.match(r"\d+:", line)][:3]
    cause = lines[-1] if lines else "unknown"
    return f"trapped: {cause[:300]}" + (f" (at {'; '.join(f[:120] for f in frames)})" if frames else "")


def worker_main() -> None:
    """A worker: load the module, then run one request per message until our parent closes the pipe."""
    import wasmtime

    from .runtime import Runner, call_start, make_engine, wasi_linker

    requests = os.fdopen(0, "rb")
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # nothing but replies may reach the pipe
    first = read_message(requests)
    if first is None:
        return
    config = first[0]
    try:
        module, exceptions, _ = Runner().load(Path(config["module"]))
        engine = make_engine(exceptions, False)
        linker = wasi_linker(engine)
    except Exception as exc:  # noqa: BLE001 (said to the parent, which logs it)
        send_message(replies, {"error": f"cannot load {config['module']}: {exc}"})
        return

    def fresh() -> tuple[wasmtime.Store, wasmtime.Instance]:
        store = wasmtime.Store(engine)
        store.set_limits(memory_size=config["memory_limit"])
        return store, linker.instantiate(store, module)

    with tempfile.TemporaryDirectory(prefix="wasmforge-cgi-") as tmp:
        files = {name: os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr")}
        ready = fresh()
        send_message(replies, {"ready": True})
        while (message := read_message(requests)) is not None:
            header, (body,) = message
            store, instance = ready
            with open(files["stdin"], "wb") as stdin:
                stdin.write(body)
            wasi = wasmtime.WasiConfig()
            wasi.argv = config["argv"]
            wasi.env = list(header["env"].items())
            for guest, host, writable in config["dirs"]:
                wasi.preopen_dir(host, guest, fs_mutable=writable)
            wasi.stdin_file, wasi.stdout_file, wasi.stderr_file = files["stdin"], files["stdout"], files["stderr"]
            store.set_wasi(wasi)
            start = time.perf_counter()
            exit_code, trap_text = call_start(instance.exports(store)["_start"], store)
            trap = trap_summary(trap_text) if trap_text is not None else None
            seconds = time.perf_counter() - start
            with open(files["stdout"], "rb") as out, open(files["stderr"], "rb") as err:
                send_message(replies, {"exit_code": exit_code, "trap": trap, "seconds": seconds},
                             out.read(), err.read())
            # The next request's instance is made now, while this worker waits.
            ready = fresh()


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        worker_main()
