"""`invoke serve`: a PHP application over HTTP/1.1, each PHP request run by php-cgi (wasm or native).

The HTTP side is waitress: pure Python with no dependencies of its own, well kept (Pylons), HTTP/1.1
with keep-alive and chunked request bodies, a thread pool, and a bound on request bodies (413) and
on malformed requests (400) before our code sees them. Our part is the WSGI application below: it
maps a request to a file of the document root (never outside it), serves static files itself
(types, Last-Modified/If-Modified-Since, single byte ranges), sends `.php` scripts, and unknown paths
through the front controller `index.php`, to php-cgi with the CGI/1.1 variables of RFC 3875, and
turns php-cgi's response back into HTTP (504 at the timeout, 502 for output that is not a response).
"""

from __future__ import annotations

import email.utils
import mimetypes
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .cgi import Backend, BadCgiResponse, CgiResult, parse_cgi_response

SERVER_SOFTWARE = "wasmforge"
INDEX_FILES = ("index.php", "index.html", "index.htm")
# Request headers that are not passed as HTTP_* variables: `Proxy` would become HTTP_PROXY, which
# many HTTP clients read as their proxy ("httpoxy"); the body's headers have their own variables.
NOT_PASSED = {"HTTP_PROXY", "HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"}

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class Route(NamedTuple):
    kind: str  # "script", "static", "redirect" or "missing"
    file: Path | None = None
    script_name: str = ""
    path_info: str = ""
    location: str = ""


def route(docroot: Path, path: str) -> Route:
    """Which file of `docroot` (resolved) answers the URL path `path` (decoded), and how.

    A path with `..`, a NUL, or a name starting `.ht` (Apache's convention for files such as
    .htaccess and WordPress's SQLite database) is missing, as is anything whose real path (symlinks
    followed) leaves the document root. `/a.php/b` runs a.php with PATH_INFO `/b`; a directory
    without its final slash is redirected to it; a directory runs or serves its index; anything
    else that does not exist goes to the front controller `/index.php` when there is one."""
    if "\0" in path or not path.startswith("/"):
        return Route("missing")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." or p.startswith(".ht") for p in parts):
        return Route("missing")
    current = docroot
    for i, part in enumerate(parts):
        current = current / part
        if current.is_dir():
            continue
        if not current.is_file():
            return _front_controller(docroot)
        if part.endswith(".php"):
            rest = parts[i + 1:]
            return _inside(docroot, Route("script", current, "/" + "/".join(parts[:i + 1]),
                                          "/" + "/".join(rest) if rest else ""))
        if i == len(parts) - 1:
            return _inside(docroot, Route("static", current))
        return _front_controller(docroot)
    if parts and not path.endswith("/"):
        return Route("redirect", location=path + "/")
    for index in INDEX_FILES:
        if (current / index).is_file():
            base = "/" + "".join(p + "/" for p in parts)
            kind = "script" if index.endswith(".php") else "static"
            return _inside(docroot, Route(kind, current / index, base + index))
    return _front_controller(docroot)


def _front_controller(docroot: Path) -> Route:
    index = docroot / "index.php"
    return _inside(docroot, Route("script", index, "/index.php")) if index.is_file() else Route("missing")


def _inside(docroot: Path, found: Route) -> Route:
    assert found.file is not None
    real = found.file.resolve()
    if real != docroot and docroot not in real.parents:
        return Route("missing")
    return found


class Application:
    """The WSGI application: one document root, one php-cgi backend."""

    def __init__(self, docroot: Path, backend: Backend, *, timeout: float = 30.0,
                 variables: dict[str, str] | None = None, log: Callable[[str], None] | None = None) -> None:
        self.docroot = docroot.resolve()
        self.variables = variables or {}
        self.backend = backend
        self.timeout = timeout
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start = time.perf_counter()
        status, headers, body, note = self.respond(environ)
        start_response(status, headers)
        size = sum(len(chunk) for chunk in body) if isinstance(body, list) else _length(headers)
        uri = environ.get("REQUEST_URI") or environ.get("PATH_INFO", "")
        self.log(f'{environ.get("REMOTE_ADDR", "-")} "{environ["REQUEST_METHOD"]} {uri} '
                 f'{environ.get("SERVER_PROTOCOL", "")}" {status.split()[0]} {size} '
                 f'{(time.perf_counter() - start) * 1000:.1f} ms' + (f" {note}" if note else ""))
        return body

    def respond(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], Iterable[bytes], str]:
        # WSGI gives the decoded path as latin-1 characters of its bytes (PEP 3333); names are UTF-8.
        try:
            path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
        except UnicodeError:
            return _plain("400 Bad Request", "the path is not UTF-8\n")
        found = route(self.docroot, path)
        if found.kind == "missing":
            return _plain("404 Not Found", "not found\n")
        if found.kind == "redirect":
            query = environ.get("QUERY_STRING")
            location = found.location + (f"?{query}" if query else "")
            status, headers, body, note = _plain("301 Moved Permanently", "moved\n")
            return status, [*headers, ("Location", location)], body, note
        assert found.file is not None
        if found.kind == "static":
            return static_file(found.file, environ)
        return self.script(found, environ)

    def script(self, found: Route, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], list[bytes], str]:
        body = environ["wsgi.input"].read() if environ.get("CONTENT_LENGTH") or environ.get(
            "HTTP_TRANSFER_ENCODING") else b""
        variables = {**self.variables, **cgi_variables(environ, found, self.backend, self.docroot, body)}
        result = self.backend.run(variables, body, self.timeout)
        for line in result.stderr.decode("utf-8", "replace").splitlines():
            self.log(f"  php: {line}")
        if result.timed_out:
            return _plain("504 Gateway Timeout", "the script ran past the time limit\n", f"({result.describe()})")
        if result.failure:
            return _plain("502 Bad Gateway", "the script's process failed\n", f"({result.describe()})")
        try:
            response = parse_cgi_response(result.stdout)
        except BadCgiResponse as exc:
            return _plain("502 Bad Gateway", "the script's output is not a CGI response\n", f"({exc})")
        headers = [*response.headers, ("Content-Length", str(len(response.body)))]
        body_out = [] if environ["REQUEST_METHOD"] == "HEAD" else [response.body]
        return response.status, headers, body_out, f"({self.backend.name} {_ms(result)})"


def cgi_variables(environ: dict[str, Any], found: Route, backend: Backend, docroot: Path,
                  body: bytes) -> dict[str, str]:
    """The request's meta-variables (RFC 3875, 4.1), with the paths as the backend's program sees them."""
    assert found.file is not None
    https = environ.get("wsgi.url_scheme") == "https"
    variables = {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": SERVER_SOFTWARE,
        "SERVER_NAME": environ.get("SERVER_NAME", "localhost"),
        "SERVER_PORT": str(environ.get("SERVER_PORT", "")),
        "SERVER_PROTOCOL": environ.get("SERVER_PROTOCOL", "HTTP/1.1"),
        "REQUEST_METHOD": environ["REQUEST_METHOD"],
        "REQUEST_URI": environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/"),
        "QUERY_STRING": environ.get("QUERY_STRING", ""),
        "SCRIPT_NAME": found.script_name,
        "SCRIPT_FILENAME": backend.path(found.file),
        "DOCUMENT_ROOT": backend.path(docroot),
        "REMOTE_ADDR": environ.get("REMOTE_ADDR", ""),
        "REMOTE_PORT": str(environ.get("REMOTE_PORT", "")),
        # php-cgi runs only with this set (cgi.force_redirect): it says a server, not a visitor, ran it.
        "REDIRECT_STATUS": "200",
    }
    if https:
        variables["HTTPS"] = "on"
    if found.path_info:
        variables["PATH_INFO"] = found.path_info
        variables["PATH_TRANSLATED"] = backend.path(docroot) + found.path_info
    if body or environ.get("CONTENT_LENGTH"):
        variables["CONTENT_LENGTH"] = str(len(body))
    if environ.get("CONTENT_TYPE"):
        variables["CONTENT_TYPE"] = environ["CONTENT_TYPE"]
    for key, value in environ.items():
        if key.startswith("HTTP_") and key not in NOT_PASSED and isinstance(value, str):
            variables[key] = value
    return variables


def static_file(file: Path, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], Iterable[bytes], str]:
    """A file of the document root: its type, Last-Modified (304 when unchanged), one byte range."""
    if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
        status, headers, body, note = _plain("405 Method Not Allowed", "a static file is only read\n")
        return status, [*headers, ("Allow", "GET, HEAD")], body, note
    try:
        handle = file.open("rb")
    except OSError:
        return _plain("404 Not Found", "not found\n")
    stat = os.fstat(handle.fileno())
    size = stat.st_size
    modified = email.utils.formatdate(int(stat.st_mtime), usegmt=True)
    kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    if kind.startswith("text/") or kind in ("application/javascript", "application/json"):
        kind += "; charset=utf-8"
    headers = [("Content-Type", kind), ("Last-Modified", modified), ("Accept-Ranges", "bytes")]
    since = environ.get("HTTP_IF_MODIFIED_SINCE")
    if since and "HTTP_RANGE" not in environ:
        try:
            if int(stat.st_mtime) <= email.utils.parsedate_to_datetime(since).timestamp():
                handle.close()
                return "304 Not Modified", [("Last-Modified", modified)], [], ""
        except (TypeError, ValueError, IndexError):
            pass  # an unreadable date is ignored (RFC 9110, 13.1.3)
    start, end, status = 0, size, "200 OK"
    if wanted := environ.get("HTTP_RANGE"):
        span = byte_range(wanted, size)
        if span == "unsatisfiable":
            handle.close()
            return "416 Range Not Satisfiable", [("Content-Range", f"bytes */{size}"),
                                                 ("Content-Length", "0")], [], ""
        if span:
            start, end = span
            status = "206 Partial Content"
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
    headers.append(("Content-Length", str(end - start)))
    if environ["REQUEST_METHOD"] == "HEAD":
        handle.close()
        return status, headers, [], ""
    return status, headers, _file_chunks(handle, start, end), ""


def byte_range(header: str, size: int) -> tuple[int, int] | str | None:
    """(start, end) of a single `bytes=` range, "unsatisfiable", or None to send the whole file
    (several ranges, or a header we do not understand: RFC 9110 lets a server ignore Range)."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()) or (first and not first.isdigit()) \
            or (last and not last.isdigit()):
        return None
    if not first:  # the last N bytes
        count = int(last)
        return (max(0, size - count), size) if count and size else "unsatisfiable"
    begin = int(first)
    if begin >= size:
        return "unsatisfiable"
    stop = min(size, int(last) + 1) if last else size
    return (begin, stop) if stop > begin else None


def _file_chunks(handle: Any, start: int, end: int, chunk: int = 1 << 16) -> Iterable[bytes]:
    with handle:
        handle.seek(start)
        left = end - start
        while left > 0 and (data := handle.read(min(chunk, left))):
            left -= len(data)
            yield data


def _plain(status: str, text: str, note: str = "") -> tuple[str, list[tuple[str, str]], list[bytes], str]:
    data = text.encode()
    return status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))], [data], note


def _length(headers: list[tuple[str, str]]) -> int:
    return next((int(v) for k, v in headers if k == "Content-Length"), 0)


def _ms(result: CgiResult) -> str:
    return f"php {result.seconds * 1000:.1f} ms"


def php_arguments(to_program: Callable[[Path], str], state: Path, max_body_mib: int, opcache: bool,
                  fixed_code: bool = False) -> list[str]:
    """php-cgi's settings for serving (no php.ini is read: the same for wasm and native). Errors go to
    the server's log, not the page; a 4 KiB output buffer lets a fatal error still send status 500;
    uploads, sessions and temporary files live in the state directory's tmp/. With `opcache`, compiled
    scripts are kept in the state directory's opcache/ (file cache only: neither a wasm instance nor a
    CGI process outlives its request, so shared memory would be lost each time). With `fixed_code` (an
    application we assembled, whose scripts PHP cannot change), OPcache does not check each script's
    timestamp: that saves a file system call per included file and made a WordPress page cost 26% less
    CPU in wasm (docs/benchmarks.md); the file cache is emptied instead each time the server starts, so
    a site assembled again never runs what was compiled from its old files."""
    tmp = to_program(state / "tmp")
    settings = {"display_errors": "0", "log_errors": "1", "html_errors": "0", "output_buffering": "4096",
                "memory_limit": "128M", "date.timezone": "UTC",
                "post_max_size": f"{max_body_mib}M", "upload_max_filesize": f"{max_body_mib}M",
                "upload_tmp_dir": tmp, "sys_temp_dir": tmp, "session.save_path": tmp}
    if opcache:
        if fixed_code and (state / "opcache").exists():
            # Not ignore_errors: a cache left half removed would be trusted.
            try:
                shutil.rmtree(state / "opcache")
            except OSError as exc:
                from .errors import WasmforgeError

                raise WasmforgeError(f"cannot empty OPcache's file cache {state / 'opcache'}: {exc.strerror or exc}",
                                     hint="remove that directory yourself, or give another --state") from None
        (state / "opcache").mkdir(exist_ok=True)
        settings |= {"opcache.enable": "1", "opcache.file_cache": to_program(state / "opcache"),
                     "opcache.file_cache_only": "1", "opcache.validate_timestamps": "0" if fixed_code else "1"}
    return ["-n", *(arg for key, value in settings.items() for arg in ("-d", f"{key}={value}"))]


def run_server(app: Application, host: str, port: int, threads: int, max_body: int,
               on_ready: Callable[[str], None]) -> None:
    """Serve `app` until interrupted; `on_ready` is told the address once the socket listens."""
    import waitress.server

    try:
        server = waitress.server.create_server(app, host=host, port=port, threads=threads,
                                               max_request_body_size=max_body, ident=SERVER_SOFTWARE,
                                               clear_untrusted_proxy_headers=True)
    except OSError as exc:
        app.backend.close()
        from .errors import WasmforgeError

        raise WasmforgeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                             hint="choose another --port (0 picks a free one) or --host") from None
    on_ready(f"http://{host}:{server.effective_port}/")  # type: ignore[union-attr]
    try:
        server.run()
    finally:
        server.close()
        app.backend.close()


class BackgroundServer:
    """The server on a thread of this process, for tests and benchmarks: `url`, then `stop()`."""

    def __init__(self, app: Application, threads: int = 6, max_body: int = 64 << 20) -> None:
        import threading

        import waitress.server

        self.app = app
        self.server = waitress.server.create_server(app, host="127.0.0.1", port=0, threads=threads,
                                                    max_request_body_size=max_body, ident=SERVER_SOFTWARE)
        self.port: int = self.server.effective_port  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        # The request threads first (none may wake the loop once its sockets are closed), then every
        # socket of the loop, which then ends; then the PHP workers.
        import logging

        # Closing the sockets from this thread makes waitress log "unhandled close event": expected here.
        logging.getLogger("waitress").setLevel(logging.ERROR)
        self.server.task_dispatcher.shutdown()  # type: ignore[union-attr]
        for channel in list(self.server._map.values()):  # type: ignore[union-attr]
            channel.handle_close()
        self.thread.join(timeout=10)
        self.app.backend.close()


def serve_php(out: Path, manifest: dict[str, Any], docroot: Path, *, native: bool, host: str, port: int,
              workers: int, state: Path, timeout: float, memory_mib: int, max_body_mib: int, opcache: bool,
              log: Callable[[str], None], writable: Sequence[Path] = (), fixed_code: bool = False,
              when_listening: Callable[[str], None] | None = None) -> None:
    """Serve `docroot` with the php-cgi of the build in `out` until interrupted; `when_listening` is
    called on a thread of its own with the server's address once it listens."""
    app = php_application(out, manifest, docroot, native=native, workers=workers, state=state, timeout=timeout,
                          memory_mib=memory_mib, max_body_mib=max_body_mib, log=log, opcache=opcache,
                          writable=writable, fixed_code=fixed_code)
    log(f"serving {app.docroot} with {app.backend.name} php-cgi, {workers} workers, state in {state}")

    def ready(url: str) -> None:
        log(f"listening on {url}  (Ctrl-C stops)")
        if when_listening:
            import threading

            threading.Thread(target=when_listening, args=(url,), daemon=True).start()

    run_server(app, host, port, threads=max(4, 2 * workers), max_body=max_body_mib << 20, on_ready=ready)


def php_application(out: Path, manifest: dict[str, Any], docroot: Path, *, native: bool, workers: int,
                    state: Path, timeout: float, memory_mib: int, max_body_mib: int,
                    log: Callable[[str], None], opcache: bool = False,
                    writable: Sequence[Path] = (), fixed_code: bool = False) -> Application:
    """The application serving `docroot` with the php-cgi of the build in `out`.

    The wasm module sees the document root read-only at /srv, the state directory read-write at
    /state (scripts find it in the CGI variable WASMFORGE_STATE) and nothing else but the build's
    own data (ICU's); the native php-cgi sees the host's paths."""
    from .cgi import NativeBackend, WasmBackend, guest_path
    from .errors import WasmforgeError
    from .outputs import run_defaults

    if not docroot.is_dir():
        raise WasmforgeError(f"the document root {docroot} is not a directory",
                             hint="give the application's directory: --docroot DIR")
    program = manifest.get("programs", {}).get("php-cgi")
    if not program:
        raise WasmforgeError(f"the build in {out} has no php-cgi", hint="serve a PHP build: invoke serve php-7.4.33 ...")
    docroot, state = docroot.resolve(), state.resolve()
    (state / "tmp").mkdir(parents=True, exist_ok=True)
    backend: Backend
    if native:
        args = php_arguments(str, state, max_body_mib, opcache, fixed_code)
        backend = NativeBackend(out / program, args, docroot)
        variables = {"WASMFORGE_STATE": str(state), "TMPDIR": str(state / "tmp")}
    else:
        usual, _, _ = run_defaults(out, manifest, "php-cgi")
        dirs = [*((guest, host_dir, False) for guest, host_dir in usual), ("/srv", docroot, False),
                ("/state", state, True)]
        # Directories of the site the application writes (uploads): read-write within the read-only
        # document root (wasi-libc resolves a path through the deepest preopen that holds it).
        dirs += [(f"/srv/{d.resolve().relative_to(docroot).as_posix()}", d.resolve(), True) for d in writable]
        args = php_arguments(lambda p: guest_path(dirs, p), state, max_body_mib, opcache, fixed_code)
        backend = WasmBackend(out / program, args, dirs, workers, memory_mib << 20, log=log, lock_root=state)
        # TMPDIR: where C libraries put temporary files (SQLite its statement journals), as anywhere.
        variables = {"WASMFORGE_STATE": "/state", "TMPDIR": "/state/tmp"}
    return Application(docroot, backend, timeout=timeout, variables=variables, log=log)
