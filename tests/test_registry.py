"""Images and registries: `invoke image`, `invoke publish` and the shared build cache, against a real
registry (Debian's docker-registry, distribution 2.8) started on 127.0.0.1 by these tests, without auth,
with htpasswd Basic auth and with Bearer tokens, and read back with skopeo and oras."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from conftest import ROOT

from wasmforge.config import Config
from wasmforge.oci import image_set
from wasmforge.registry import Registry, RegistryError, Repository
from wasmforge.release import describe_release, package_tarball
from wasmforge.remote_cache import RemoteCache, cache_tag, pack_entry
from wasmforge.runtime import Runner
from wasmforge.sbom import documents
from wasmforge.store import ArtifactStore
from wasmforge.toolchain import debian_tool

LUA = "lua-5.4.7"
USER, PASSWORD = "wasmforge", "correct horse"
TOOLS = ("docker-registry", "skopeo", "htpasswd")


def _need_tools() -> None:
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        pytest.fail(f"these tests need {', '.join(missing)}: run ./bootstrap.sh (it installs docker-registry, "
                    "skopeo and apache2-utils)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RegistryServer:
    """docker-registry on a free port of 127.0.0.1, its storage in `root`."""

    def __init__(self, root: Path, auth: dict | None = None) -> None:
        _need_tools()
        self.root = root
        self.port = _free_port()
        config = {
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.port}"},
        }
        if auth:
            config["auth"] = auth
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = (root / "registry.log").open("w")
        self.process = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(100):
            try:
                if requests.get(f"http://{self.host}/v2/", timeout=1).status_code in (200, 401):
                    return
            except requests.RequestException:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"docker-registry did not start: {(root / 'registry.log').read_text()}")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_file(self, digest: str) -> Path:
        hexdigest = digest.split(":", 1)[1]
        return self.root / "data/docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    server = RegistryServer(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry-basic")
    _need_tools()
    hashed = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], capture_output=True, text=True, check=True).stdout
    (root / "htpasswd").write_text(hashed)
    server = RegistryServer(root, {"htpasswd": {"realm": "wasmforge-test", "path": str(root / "htpasswd")}})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oras() -> Path:
    """oras from Debian trixie's package, unpacked into the cache like the toolchain's trixie packages."""
    return debian_tool(Config.from_env(), "oras")


def _env(config: Config, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WASMFORGE_REGISTRY_", "WASMFORGE_REMOTE"))}
    env.update({"WASMFORGE_OUTPUT": str(config.outputs), "WASMFORGE_STORE": str(config.artifacts),
                "DOCKER_CONFIG": "/nonexistent", "WASMFORGE_PUSH_CACHE": "0"})
    env.update(extra)
    return env


def _invoke(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def _skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, check=True)


def _layout_manifest(layout: Path, ref: str) -> bytes:
    index = json.loads((layout / "index.json").read_text())
    digest = next(m["digest"] for m in index["manifests"] if m.get("annotations", {}).get(
        "org.opencontainers.image.ref.name") == ref)
    return (layout / "blobs/sha256" / digest.split(":")[1]).read_bytes()


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs/sha256" / digest.split(":")[1]).read_bytes()


def _module_of_image(layout: Path, manifest: dict) -> bytes:
    # The module is the top layer (below it: the package's data files, when it has any).
    layer = gzip.decompress(_blob(layout, manifest["layers"][-1]["digest"]))
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = tar.getmembers()
        assert len(members) == 1 and members[0].isreg()
        return tar.extractfile(members[0]).read()


# ----------------------------------------------------------------------------- the image layout

@pytest.mark.integration
def test_image_layout_is_deterministic_and_what_runtimes_expect(lua_build, tmp_path):
    config, _ = lua_build
    for name in ("first", "second"):
        result = _invoke("image", LUA, "--dist", str(tmp_path / name), env=_env(config))
        assert result.returncode == 0, result.stderr
    first, second = tmp_path / "first/oci/lua-5.4.7", tmp_path / "second/oci/lua-5.4.7"
    assert (first / "index.json").read_bytes() == (second / "index.json").read_bytes(), "same build, same digests"
    for blob in (first / "blobs/sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"{blob} is not content-addressed"
    module = (config.outputs / "lua/5.4.7/bin/lua.wasm").read_bytes()

    # The runnable image: wasi/wasm, the module at /lua.wasm, its entrypoint, the compat-smart variant.
    inspect = json.loads(_skopeo("inspect", f"oci:{first}:lua").stdout)
    assert (inspect["Os"], inspect["Architecture"]) == ("wasi", "wasm")
    manifest = json.loads(_layout_manifest(first, "lua"))
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat-smart"
    assert manifest["annotations"]["org.opencontainers.image.created"] == "2024-06-25T00:00:00Z"
    assert manifest["annotations"]["org.opencontainers.image.licenses"] == "MIT"
    assert "exception handling" in manifest["annotations"]["dev.wasmforge.requires"]
    image_config = json.loads(_blob(first, manifest["config"]["digest"]))
    assert image_config["config"]["Entrypoint"] == ["/lua.wasm"]
    assert _module_of_image(first, manifest) == module

    # The CNCF wasm artifact: its config media type and fields, one application/wasm layer.
    artifact = json.loads(_layout_manifest(first, "lua-wasm"))
    assert artifact["config"]["mediaType"] == "application/vnd.wasm.config.v0+json"
    wasm_config = json.loads(_blob(first, artifact["config"]["digest"]))
    assert (wasm_config["architecture"], wasm_config["os"]) == ("wasm", "wasip1")
    assert wasm_config["layerDigests"] == [artifact["layers"][0]["digest"]]
    assert "wasi_snapshot_preview1/fd_write" in wasm_config["component"]["imports"]
    assert set(wasm_config["component"]["exports"]) == {"_start", "memory"}
    assert artifact["layers"][0]["mediaType"] == "application/wasm"
    assert _blob(first, artifact["layers"][0]["digest"]) == module

    # SBOMs and provenance refer to both (subject).
    index = json.loads((first / "index.json").read_text())
    subjects = {}
    for entry in index["manifests"]:
        body = json.loads(_blob(first, entry["digest"]))
        if "subject" in body:
            subjects.setdefault(body["subject"]["digest"], set()).add(body["artifactType"])
    kinds = {"application/spdx+json", "application/vnd.cyclonedx+json", "application/vnd.in-toto+json"}
    lua_image = next(m["digest"] for m in index["manifests"] if m.get("annotations", {}).get(
        "org.opencontainers.image.ref.name") == "lua")
    assert subjects[lua_image] == kinds


# ----------------------------------------------------------------------------- publish

@pytest.mark.integration
def test_publish_is_read_back_byte_for_byte_by_skopeo_and_oras(lua_build, registry, oras, tmp_path):
    config, _ = lua_build
    env = _env(config)
    repo = f"{registry.host}/wasmforge/lua"
    result = _invoke("publish", LUA, "--registry", repo, "--insecure", env=env)
    assert result.returncode == 0, result.stderr
    assert f"{repo}:5.4.7  sha256:" in result.stdout and f"{repo}:5.4.7-release" in result.stdout
    assert _invoke("image", LUA, "--dist", str(tmp_path / "dist"), env=env).returncode == 0
    assert _invoke("package", LUA, "--dist", str(tmp_path / "dist"), env=env).returncode == 0
    layout = tmp_path / "dist/oci/lua-5.4.7"

    # The registry holds exactly the manifests of the layout; skopeo copies the image whole.
    raw = _skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{repo}:5.4.7").stdout.encode()
    assert raw == _layout_manifest(layout, "lua")
    raw = _skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{repo}:5.4.7-luac-wasm").stdout.encode()
    assert raw == _layout_manifest(layout, "luac-wasm")
    _skopeo("copy", "--src-tls-verify=false", f"docker://{repo}:5.4.7", f"dir:{tmp_path / 'copied'}")
    for blob in (layout / "blobs/sha256").iterdir():
        copied = tmp_path / "copied" / blob.name
        if copied.exists():
            assert copied.read_bytes() == blob.read_bytes()
    assert (tmp_path / "copied/manifest.json").read_bytes() == _layout_manifest(layout, "lua")

    # oras pulls the release files as `invoke package` wrote them, and the wasm artifact's module.
    pulled = tmp_path / "pulled"
    subprocess.run([str(oras), "pull", "--plain-http", f"{repo}:5.4.7-release", "-o", str(pulled)],
                   check=True, capture_output=True)
    names = sorted(p.name for p in pulled.iterdir())
    assert names == sorted(["lua-5.4.7-wasi.tar.gz", "lua-5.4.7-wasi.spdx.json", "lua-5.4.7-wasi.cdx.json",
                            "lua-5.4.7-wasi.intoto.jsonl"])
    for name in names:
        assert (pulled / name).read_bytes() == (tmp_path / "dist" / name).read_bytes(), name
    subprocess.run([str(oras), "pull", "--plain-http", f"{repo}:5.4.7-lua-wasm", "-o", str(tmp_path / "wasm")],
                   check=True, capture_output=True)
    assert (tmp_path / "wasm/lua.wasm").read_bytes() == (config.outputs / "lua/5.4.7/bin/lua.wasm").read_bytes()

    # oras discover finds the SBOMs and provenance (distribution 2.8 has no referrers API: the tag schema).
    found = subprocess.run([str(oras), "discover", "--plain-http", "-o", "json", f"{repo}:5.4.7"],
                           check=True, capture_output=True, text=True).stdout
    listed = json.loads(found)
    referrers = listed.get("manifests") or listed.get("referrers") or []
    assert {r["artifactType"] for r in referrers} == {
        "application/spdx+json", "application/vnd.cyclonedx+json", "application/vnd.in-toto+json"}

    # Publishing the same build again sends nothing and changes nothing.
    again = _invoke("publish", LUA, "--registry", repo, "--insecure", env=env)
    assert again.returncode == 0, again.stderr
    assert "sent 0.0 MiB" in again.stdout


@pytest.mark.integration
def test_the_php_image_runs_after_a_round_trip_through_the_registry(php, registry, tmp_path):
    config, _, out = php
    repo = f"{registry.host}/wasmforge/php"
    result = _invoke("publish", "php-7.4.33", "--registry", repo, "--insecure", env=_env(config))
    assert result.returncode == 0, result.stderr
    for tag, program in (("7.4.33", "php"), ("7.4.33-php-cgi", "php-cgi")):
        layout = tmp_path / program
        _skopeo("copy", "--src-tls-verify=false", f"docker://{repo}:{tag}", f"oci:{layout}:{program}")
        manifest = json.loads(_layout_manifest(layout, program))
        assert json.loads(_blob(layout, manifest["config"]["digest"]))["config"]["Entrypoint"] == [f"/{program}.wasm"]
        module = tmp_path / f"{program}.wasm"
        module.write_bytes(_module_of_image(layout, manifest))
        size = sum(layer["size"] for layer in manifest["layers"])
        print(f"{program} image: {size:,} bytes compressed (module {module.stat().st_size:,} bytes)")
        assert module.read_bytes() == (out / f"bin/{program}.wasm").read_bytes()
        # Below it, ICU's data file where intl looks for it (/usr/local/share/icu/72.1).
        data = gzip.decompress(_blob(layout, manifest["layers"][0]["digest"]))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            files = [m for m in tar.getmembers() if m.isreg()]
            assert [m.name for m in files] == ["usr/local/share/icu/72.1/icudt72l.dat"]
            target = tmp_path / f"{program}-root" / files[0].name
            target.parent.mkdir(parents=True)
            target.write_bytes(tar.extractfile(files[0]).read())
    run = Runner().run(tmp_path / "php.wasm", ["php", "-r", "echo 6*7;"])
    assert (run.exit_code, run.stdout) == (0, b"42")
    share = tmp_path / "php-root" / "usr" / "local" / "share"
    assert (share / "icu" / "72.1" / "icudt72l.dat").read_bytes() == (out / "share/icu/72.1/icudt72l.dat").read_bytes()
    run = Runner().run(tmp_path / "php.wasm", ["php", "-r", "echo Locale::getDisplayName('de_CH', 'fr');"],
                       readonly_dirs=[("/usr/local/share", share)])
    assert (run.exit_code, run.stdout.decode()) == (0, "allemand (Suisse)")


def test_a_bad_registry_address_or_tag_is_one_message_before_any_work(tmp_path):
    # An empty store: the address and the tag are refused before the build is even looked for.
    env = {**_env(Config.from_env()), "WASMFORGE_STORE": str(tmp_path / "empty")}
    result = _invoke("publish", LUA, "--registry", "127.0.0.1:5000/Not_Lower", env=env)
    assert result.returncode == 1
    assert "is not a registry repository" in result.stderr and "Traceback" not in result.stderr
    result = _invoke("publish", LUA, "--registry", "127.0.0.1:5000/ok", "--tag", "-bad:tag", env=env)
    assert result.returncode == 1
    assert "is not a valid tag" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_an_unreachable_registry_is_one_message(lua_build):
    config, _ = lua_build
    result = _invoke("publish", LUA, "--registry", f"127.0.0.1:{_free_port()}/wasmforge/lua", "--insecure",
                     env=_env(config))
    assert result.returncode == 1
    assert "cannot reach the registry" in result.stderr and "connection refused" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_basic_auth_from_the_environment_or_docker_config(lua_build, basic_registry, tmp_path):
    config, _ = lua_build
    repo = f"{basic_registry.host}/wasmforge/lua"
    anonymous = _invoke("publish", LUA, "--registry", repo, "--insecure", env=_env(config))
    assert anonymous.returncode == 1
    assert "refused our credentials (401)" in anonymous.stderr and "WASMFORGE_REGISTRY_USER" in anonymous.stderr
    wrong = _invoke("publish", LUA, "--registry", repo, "--insecure",
                    env=_env(config, WASMFORGE_REGISTRY_USER=USER, WASMFORGE_REGISTRY_PASSWORD="wrong"))
    assert wrong.returncode == 1 and "(401)" in wrong.stderr and "Traceback" not in wrong.stderr
    ok = _invoke("publish", LUA, "--registry", repo, "--insecure", "--tag", "from-env",
                 env=_env(config, WASMFORGE_REGISTRY_USER=USER, WASMFORGE_REGISTRY_PASSWORD=PASSWORD))
    assert ok.returncode == 0, ok.stderr
    docker = tmp_path / "docker"
    docker.mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (docker / "config.json").write_text(json.dumps({"auths": {basic_registry.host: {"auth": auth}}}))
    ok = _invoke("publish", LUA, "--registry", repo, "--insecure", "--tag", "from-docker-config",
                 env=_env(config, DOCKER_CONFIG=str(docker)))
    assert ok.returncode == 0, ok.stderr
    tags = requests.get(f"http://{basic_registry.host}/v2/wasmforge/lua/tags/list", auth=(USER, PASSWORD)).json()
    assert {"from-env", "from-docker-config"} <= set(tags["tags"])
    assert not any(t.startswith("5.4.7") for t in tags["tags"]), "the refused pushes tagged nothing"


@pytest.mark.integration
def test_blobs_are_mounted_from_another_repository(lua_build, registry):
    config, _ = lua_build
    env = _env(config)
    first = _invoke("publish", LUA, "--registry", f"{registry.host}/mount/source", "--insecure", env=env)
    assert first.returncode == 0, first.stderr
    second = _invoke("publish", LUA, "--registry", f"{registry.host}/mount/target", "--insecure",
                     "--mount-from", "mount/source", env=env)
    assert second.returncode == 0, second.stderr
    assert "sent 0.0 MiB, mounted 13 blobs" in second.stdout


@pytest.mark.integration
def test_a_tag_with_other_content_is_refused_unless_forced(lua_build, registry):
    config, _ = lua_build
    repo = f"{registry.host}/wasmforge/conflict"
    assert _invoke("publish", LUA, "--registry", repo, "--insecure", env=_env(config)).returncode == 0
    before = requests.get(f"http://{repo.split('/', 1)[0]}/v2/wasmforge/conflict/manifests/5.4.7",
                          headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).content
    other = _env(config, SOURCE_DATE_EPOCH="1700000000")  # another date: other annotations, other digests
    refused = _invoke("publish", LUA, "--registry", repo, "--insecure", env=other)
    assert refused.returncode == 1
    assert "already exist with other content; nothing was pushed" in refused.stderr and "--force" in refused.stderr
    after = requests.get(f"http://{repo.split('/', 1)[0]}/v2/wasmforge/conflict/manifests/5.4.7",
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).content
    assert after == before
    forced = _invoke("publish", LUA, "--registry", repo, "--insecure", "--force", env=other)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(requests.get(f"http://{repo.split('/', 1)[0]}/v2/wasmforge/conflict/manifests/5.4.7",
                                   headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).content
                      )["annotations"]["org.opencontainers.image.created"] == "2023-11-14T22:13:20Z"


# ----------------------------------------------------------------------------- failures midway

@dataclass
class Fault:
    method: str
    path_part: str
    action: str  # "status", "drop", "digest"
    status: int = 500
    times: int | None = None  # None: every time
    seen: int = field(default=0)


class FaultProxy:
    """A proxy in front of the real registry that fails the requests its faults match."""

    def __init__(self, upstream: str) -> None:
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                proxy.requests.append((self.command, self.path))
                fault = next((f for f in proxy.faults if f.method == self.command and f.path_part in self.path
                              and (f.times is None or f.seen < f.times)), None)
                if fault:
                    fault.seen += 1
                    if fault.action == "drop":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if fault.action == "status":
                        data = json.dumps({"errors": [{"code": "INJECTED", "message": "injected by the test"}]})
                        self.send_response(fault.status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data.encode())
                        return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("content-length", "connection")}
                answer = requests.request(self.command, f"http://{upstream}{self.path}", headers=headers, data=body,
                                          allow_redirects=False, timeout=30)
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        continue
                    if fault and fault.action == "digest" and key.lower() == "docker-content-digest":
                        value = "sha256:" + "0" * 64
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer.content)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxy(registry):
    server = FaultProxy(registry.host)
    yield server
    server.close()


@pytest.fixture(scope="module")
def lua_images(lua_build, toolchain):
    config, book = lua_build
    release = describe_release(book, book.parse_target(LUA), config, toolchain, log=lambda m: None)
    docs = documents(release)
    return image_set(release, docs, package_tarball(release, docs), ROOT)


def _publish(images, host: str, repo: str, **kwargs):
    from wasmforge.oci import publish

    client = Registry(Repository.parse(f"{host}/{repo}", insecure=True), log=lambda m: None, backoff=0.01)
    return publish(images, client, "5.4.7", "lua", **kwargs), client


def _tags(registry: RegistryServer, repo: str) -> list[str]:
    answer = requests.get(f"http://{registry.host}/v2/{repo}/tags/list")
    return (answer.json().get("tags") or []) if answer.status_code == 200 else []


FAULTS = {
    "a 500 on every manifest": (Fault("PUT", "/manifests/", "status", 500), "HTTP 500"),
    "403 on uploads": (Fault("POST", "/blobs/uploads/", "status", 403), "forbids this (403)"),
    "404 on uploads": (Fault("POST", "/blobs/uploads/", "status", 404), "not found (404)"),
    "the connection dropped during every upload": (Fault("PUT", "/blobs/uploads/", "drop"), "failed 4 times"),
    "another digest for a blob": (Fault("PUT", "/blobs/uploads/", "digest"), "under another digest"),
    "another digest for a manifest": (Fault("PUT", "/manifests/", "digest"), "under another digest"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(FAULTS))
def test_a_registry_failing_midway_is_one_message_and_tags_nothing(lua_images, registry, proxy, case):
    fault, message = FAULTS[case]
    proxy.faults.append(fault)
    repo = f"faults/{uuid.uuid4().hex[:8]}"
    with pytest.raises(RegistryError) as raised:
        _publish(lua_images, proxy.host, repo)
    assert message in raised.value.render()
    assert fault.seen >= 1
    assert _tags(registry, repo) == [], "a failed push leaves no tag"


@pytest.mark.integration
def test_transient_failures_are_retried(lua_images, registry, proxy):
    proxy.faults += [Fault("PUT", "/blobs/uploads/", "drop", times=1), Fault("PUT", "/manifests/", "status", 503, times=2),
                     Fault("HEAD", "/blobs/", "status", 502, times=1)]
    repo = f"faults/{uuid.uuid4().hex[:8]}"
    published, _ = _publish(lua_images, proxy.host, repo)
    assert "5.4.7" in published
    assert all(f.seen == f.times for f in proxy.faults)
    assert set(_tags(registry, repo)) >= {"5.4.7", "5.4.7-release"}


@pytest.mark.integration
def test_large_blobs_go_up_in_chunks(lua_images, registry, proxy, monkeypatch):
    from wasmforge import registry as registry_module

    monkeypatch.setattr(registry_module, "CHUNK", 64 << 10)
    repo = f"chunks/{uuid.uuid4().hex[:8]}"
    published, client = _publish(lua_images, proxy.host, repo)
    patches = [path for method, path in proxy.requests if method == "PATCH"]
    largest = max(len(b.data) for b in lua_images.blobs.values())
    assert len(patches) >= largest // (64 << 10)
    module = next(b for b in lua_images.blobs.values() if b.media_type == "application/wasm")
    pulled = Registry(Repository.parse(f"{registry.host}/{repo}", insecure=True), log=lambda m: None)
    assert pulled.get_blob(module.digest, limit=len(module.data)) == module.data
    assert set(_tags(registry, repo)) >= {"5.4.7", "5.4.7-lua-wasm"}


# ----------------------------------------------------------------------------- bearer tokens

class TokenService:
    """A registry token service (the Docker token protocol): ES256 JWTs whose x5c chain the registry trusts."""

    def __init__(self, root: Path, service: str, issuer: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wasmforge test token signer")])
        now = time.time()
        import datetime as dt

        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(dt.datetime.fromtimestamp(now - 3600, dt.UTC))
                     .not_valid_after(dt.datetime.fromtimestamp(now + 86400, dt.UTC))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.bundle = root / "token-ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.service, self.issuer = service, issuer
        self.requests: list[dict] = []
        service_self = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                from urllib.parse import parse_qs, urlparse

                query = parse_qs(urlparse(self.path).query)
                auth = self.headers.get("Authorization", "")
                user = None
                if auth.startswith("Basic "):
                    given = base64.b64decode(auth[6:]).decode()
                    if given != f"{USER}:{PASSWORD}":
                        self.send_error(401)
                        return
                    user = USER
                service_self.requests.append({"scopes": query.get("scope", []), "user": user})
                access = []
                for scope in query.get("scope", []):
                    kind, repo, actions = scope.split(":")
                    allowed = actions.split(",") if user else [a for a in actions.split(",") if a == "pull"]
                    access.append({"type": kind, "name": repo, "actions": allowed})
                body = json.dumps({"token": service_self.token(user or "", access)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    def token(self, subject: str, access: list[dict]) -> str:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.integration
def test_bearer_tokens_from_the_registry_token_service(lua_build, tmp_path):
    config, _ = lua_build
    tokens = TokenService(tmp_path, "wasmforge-registry", "wasmforge-test-issuer")
    server = RegistryServer(tmp_path / "registry", {"token": {
        "realm": tokens.realm, "service": tokens.service, "issuer": tokens.issuer,
        "rootcertbundle": str(tokens.bundle)}})
    try:
        repo = f"{server.host}/wasmforge/lua"
        anonymous = _invoke("publish", LUA, "--registry", repo, "--insecure", env=_env(config))
        assert anonymous.returncode == 1 and "Traceback" not in anonymous.stderr
        ok = _invoke("publish", LUA, "--registry", repo, "--insecure",
                     env=_env(config, WASMFORGE_REGISTRY_USER=USER, WASMFORGE_REGISTRY_PASSWORD=PASSWORD))
        assert ok.returncode == 0, ok.stderr
        assert any(r["user"] == USER and "repository:wasmforge/lua:pull,push" in r["scopes"] for r in tokens.requests)
        wrong = _invoke("publish", LUA, "--registry", repo, "--insecure", "--tag", "x",
                        env=_env(config, WASMFORGE_REGISTRY_USER=USER, WASMFORGE_REGISTRY_PASSWORD="wrong"))
        assert wrong.returncode == 1 and "token service refused" in wrong.stderr
    finally:
        server.stop()
        tokens.close()


# ----------------------------------------------------------------------------- the shared build cache

def _build(config: Config, store: Path, out: Path, remote: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**_env(config), "WASMFORGE_STORE": str(store), "WASMFORGE_OUTPUT": str(out)}
    return _invoke("build", LUA, "--remote-cache", remote, *extra, env=env)


def _modules(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "lua/5.4.7/bin").glob("*.wasm"))}


@pytest.mark.integration
def test_a_team_shares_builds_through_the_registry(lua_build, registry, tmp_path):
    config, _ = lua_build
    remote = f"oci+http://{registry.host}/cache/lua"
    # Store A (the session's build) pushes.
    pushed = _build(config, config.artifacts, config.outputs, remote, "--push-cache")
    assert pushed.returncode == 0, pushed.stderr
    assert "remote cache: pushed lua-5.4.7" in pushed.stderr
    original = _modules(config.outputs)

    # An empty store B gets it from the registry: nothing compiled, the same modules, its own .cwasm.
    explain = _invoke("build", LUA, "--remote-cache", remote, "--explain",
                      env={**_env(config), "WASMFORGE_STORE": str(tmp_path / "B")})
    assert "remote hit" in explain.stdout
    pulled = _build(config, tmp_path / "B", tmp_path / "outB", remote)
    assert pulled.returncode == 0, pulled.stderr
    assert "remote hit" in pulled.stderr and "building" not in pulled.stderr
    assert _modules(tmp_path / "outB") == original
    key_file = json.loads((tmp_path / "outB/lua/5.4.7/bin/lua.cwasm.json").read_text())
    assert key_file["wasm_sha256"] == original["lua.wasm"]
    ran = _invoke("run", LUA, "--", "-e", "print(6*7)",
                  env={**_env(config), "WASMFORGE_STORE": str(tmp_path / "B"), "WASMFORGE_OUTPUT": str(tmp_path / "outB")})
    assert ran.stdout == "42\n"

    # A blob corrupted in the registry's storage: one warning, a local build, the right modules.
    store = ArtifactStore(config.artifacts)
    key = json.loads((config.outputs / "lua/5.4.7/manifest.json").read_text())["key"]
    manifest = json.loads(requests.get(f"http://{registry.host}/v2/cache/lua/manifests/{cache_tag(key)}",
                                       headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).content)
    layer = registry.blob_file(manifest["layers"][0]["digest"])
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.write_bytes(bytes(data))
    corrupted = _build(config, tmp_path / "C", tmp_path / "outC", remote)
    assert corrupted.returncode == 0, corrupted.stderr
    assert corrupted.stderr.count("remote cache: warning") == 1
    assert "does not match its digest" in corrupted.stderr and "building" in corrupted.stderr
    assert _modules(tmp_path / "outC") == original
    assert store.problem(key) is None

    # A registry that is down: one warning, a local build.
    down = _build(config, tmp_path / "D", tmp_path / "outD", f"oci+http://127.0.0.1:{_free_port()}/cache/lua")
    assert down.returncode == 0, down.stderr
    assert down.stderr.count("remote cache: warning") == 1 and "connection refused" in down.stderr
    assert _modules(tmp_path / "outD") == original


@pytest.mark.integration
def test_shared_entries_carry_no_native_code_and_name_no_store_path(lua_build):
    config, _ = lua_build
    store = ArtifactStore(config.artifacts)
    key = json.loads((config.outputs / "lua/5.4.7/manifest.json").read_text())["key"]
    config_data, layer = pack_entry(store, key)
    listed = json.loads(config_data)
    assert not any(name.endswith((".cwasm", ".cwasm.json")) for name in listed["files"])
    assert str(store.root).encode() not in gzip.decompress(layer)
    assert pack_entry(store, key) == (config_data, layer), "packing is deterministic"


def test_a_bad_remote_cache_address_is_one_message():
    result = _invoke("build", LUA, "--remote-cache", "http://example.invalid/x", env=_env(Config.from_env()))
    assert result.returncode == 1 and "is not a remote cache address" in result.stderr
    assert RemoteCache.parse("oci://127.0.0.1:5000/team/cache").repo.insecure is False


@pytest.mark.parametrize("field, value", [("rewritten", ["../outside.txt"]), ("programs", {"evil": "../outside.txt"})])
def test_a_pulled_entry_cannot_make_us_touch_files_outside_it(tmp_path, field, value):
    from wasmforge.remote_cache import RemoteCacheError, _check_against, _localise
    from wasmforge.store import file_record

    root = tmp_path / "entry"
    (root / "bin").mkdir(parents=True)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"@WASMFORGE_STORE@ untouched\n")
    manifest = {"outputs": {"bin/x.wasm": {}}, "programs": {"x": "bin/x.wasm"}}
    if field == "programs":
        manifest["programs"] = value
        manifest["outputs"]["../outside.txt"] = {}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "bin/x.wasm").write_bytes(b"\0asm\1\0\0\0")
    config = {"files": {rel: file_record(root / rel) for rel in ("manifest.json", "bin/x.wasm")}, "links": {},
              "rewritten": value if field == "rewritten" else []}
    _check_against(root, config)  # the tree is exactly what the config lists
    compiled: list[Path] = []
    with pytest.raises(RemoteCacheError, match="not a file of the entry|does not hold"):
        _localise(root, config, ArtifactStore(tmp_path / "store"), compiled.append)
    assert outside.read_bytes() == b"@WASMFORGE_STORE@ untouched\n" and compiled == []
