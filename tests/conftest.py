"""Shared fixtures: a real toolchain, throw-away projects, tarballs and a local HTTP server."""

from __future__ import annotations

import dataclasses
import http.server
import io
import shutil
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from wasmforge.config import Config, project_root
from wasmforge.errors import ToolchainError
from wasmforge.pipeline import BuildResult, build_target
from wasmforge.recipe import RecipeBook, Target
from wasmforge.runtime import Runner
from wasmforge.smoke import run_smoke_tests
from wasmforge.toolchain import HostToolchain, Toolchain, find_toolchain

ROOT = project_root()


@pytest.fixture(scope="session")
def toolchain() -> Toolchain:
    """The real WASI toolchain (CI provisions it with `invoke toolchain --install` first)."""
    try:
        return find_toolchain(Config.from_env())
    except ToolchainError as exc:
        pytest.fail(f"these tests need a WASI toolchain: {exc}")


@pytest.fixture(scope="session")
def integration_config(tmp_path_factory) -> Config:
    """The user's artifact store and ccache, with an output directory of the session's own: a package
    is built at most once per run (none when the store has it), and builds made by hand or by an
    earlier run are hits. Tests about the store itself make their own (the `project` fixture)."""
    return Config.from_env(output_dir=tmp_path_factory.mktemp("build-output"))


def build_and_test(book: RecipeBook, target: Target, config: Config, toolchain: Toolchain | HostToolchain,
                   ) -> list[BuildResult]:
    """`build_target`, then the smoke tests of every package it took from the store: they are not part
    of a build's key, so a hit says nothing about the recipe's tests as they are now."""
    results = build_target(book, target, config, toolchain, log=lambda m: print(m, flush=True))
    for result in results:
        package = book.package(book.parse_target(result.target))
        if result.reused and package.tests:
            outcomes = run_smoke_tests(package, result.output / "bin", Runner(), log=lambda m: print(m, flush=True))
            failed = [o.name for o in outcomes if not o.passed]
            assert not failed, f"smoke tests of the stored {result.target} failed: {failed}"
    return results


def _session_build(target: str, toolchain: Toolchain, config: Config) -> tuple[Config, RecipeBook, Path]:
    book = RecipeBook.load(config.recipes_dir)
    results = build_and_test(book, book.parse_target(target), config, toolchain)
    return config, book, results[-1].output


@pytest.fixture(scope="session")
def php(toolchain, integration_config):
    """PHP 7.4.33 (default flavor) and its dependencies, built once for the whole session."""
    return _session_build("php-7.4.33", toolchain, integration_config)


@pytest.fixture(scope="session")
def php_portable(toolchain, integration_config):
    """PHP 7.4.33's portable flavor (no exception handling), built once for the whole session."""
    return _session_build("php-7.4.33-portable", toolchain, integration_config)


@pytest.fixture(scope="session")
def php_native(integration_config):
    """PHP 7.4.33 built natively from the same sources (the reference), once for the whole session."""
    from wasmforge.toolchain import host_toolchain

    book = RecipeBook.load(integration_config.recipes_dir)
    target = dataclasses.replace(book.parse_target("php-7.4.33"), native=True)
    return build_and_test(book, target, integration_config, host_toolchain())[-1].output


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium through its chromedriver (never a driver Selenium would download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for program in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not Path(program).exists():
            pytest.fail(f"{program} is missing: ./bootstrap.sh installs chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def lua_build(toolchain, integration_config):
    """Lua 5.4.7, built once for the whole session."""
    config = integration_config
    book = RecipeBook.load(config.recipes_dir)
    build_and_test(book, book.parse_target("lua-5.4.7"), config, toolchain)
    return config, book


def make_tarball(path: Path, files: dict[str, str | bytes], top: str | None = None) -> Path:
    """A .tar.gz with `files` (name -> content) under an optional top directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith((".sh", "configure")) else 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


@dataclass
class Project:
    """A throw-away checkout: its own recipes/, patches/, outputs and caches."""

    root: Path
    config: Config

    def recipe(self, name: str, text: str) -> Path:
        path = self.root / "recipes" / f"{name}.yaml"
        path.write_text(text)
        return path

    def patch(self, package: str, series: str, name: str, text: str) -> Path:
        path = self.root / "patches" / package / series / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


@pytest.fixture
def project(tmp_path: Path) -> Project:
    root = tmp_path / "project"
    (root / "recipes").mkdir(parents=True)
    (root / "patches").mkdir()
    shutil.copytree(ROOT / "toolchain", root / "toolchain")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    # Sources of these projects go to their own cache (the real one holds the toolchain).
    config = Config.from_env(root=root, output_dir=root / "build-output", mirrors=(str(mirror),),
                             cache_dir=tmp_path / "cache", use_debian_archive=False)
    return Project(root=root, config=config)


@dataclass
class Route:
    body: bytes
    # Serve only this many bytes of the body (while announcing all of it) for the first
    # `failures` requests, then serve it whole.
    cut_at: int | None = None
    failures: int = 0
    status: int = 200
    hits: int = field(default=0)
    content_type: str | None = None


class LocalServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        routes = self.routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                route = routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                route.hits += 1
                self.send_response(route.status)
                self.send_header("Content-Length", str(len(route.body)))
                if route.content_type:
                    self.send_header("Content-Type", route.content_type)
                self.end_headers()
                if route.cut_at is not None and route.hits <= route.failures:
                    self.wfile.write(route.body[:route.cut_at])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(route.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    srv = LocalServer()
    yield srv
    srv.close()
