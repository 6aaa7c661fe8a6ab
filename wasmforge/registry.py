"""A client for the OCI distribution API (any OCI registry: distribution, Zot, Harbor, GHCR, Docker Hub).

What `invoke publish` and the shared build cache need, in Python with `requests`:
- blobs: existence (HEAD), cross-repository mounts, monolithic uploads and chunked ones for large
  blobs, downloads checked against their digest while they stream (never trusted, never kept unchecked);
- manifests: pushed last, so a failed push never leaves a tag pointing at missing blobs; the digest the
  registry reports must be the one we computed;
- referrers: the OCI 1.1 referrers API, and the tag-schema fallback (`sha256-<hex>` index) for
  registries without it (distribution 2.8);
- auth as registries do it: a 401 carries `WWW-Authenticate`: Basic (credentials sent) or Bearer (a
  token fetched from the realm, with the credentials if any, for the scope asked). Credentials come from
  WASMFORGE_REGISTRY_USER/_PASSWORD or `~/.docker/config.json` (`auths`; `$DOCKER_CONFIG`);
- retries with backoff on 429/5xx and broken connections; plain HTTP only when asked (`insecure`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from .errors import WasmforgeError
from .sources import network_reason, retry_after

Log = Callable[[str], None]
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json")
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
# Blobs larger than this go up in chunks of this size (a dropped connection costs one chunk's retry).
CHUNK = 8 << 20
MAX_MANIFEST = 4 << 20
RETRIES = 4
TIMEOUT = (10, 60)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_REPO = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class RegistryError(WasmforgeError):
    """A registry refused, failed or answered what it must not."""


@dataclass(frozen=True)
class Repository:
    host: str  # host[:port]
    name: str  # the repository path
    insecure: bool = False

    @classmethod
    def parse(cls, text: str, *, insecure: bool = False) -> Repository:
        host, _, name = text.partition("/")
        if not host or not name or not _REPO.match(name) or not re.match(r"^[A-Za-z0-9.-]+(:\d{1,5})?$", host):
            raise RegistryError(f"{text!r} is not a registry repository",
                                hint="give HOST[:PORT]/REPO, e.g. 127.0.0.1:5000/wasmforge/php "
                                     "(the repository in lower case)")
        return cls(host, name, insecure)

    @property
    def base(self) -> str:
        return f"{'http' if self.insecure else 'https'}://{self.host}/v2/"

    def __str__(self) -> str:
        return f"{self.host}/{self.name}"


def check_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise RegistryError(f"{tag!r} is not a valid tag",
                            hint="tags are letters, digits, '_', '.' and '-' (at most 128, not starting with '.' or '-')")
    return tag


def credentials(host: str, environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """User and password for `host`: the environment first, then Docker's config file."""
    env = os.environ if environ is None else environ
    if env.get("WASMFORGE_REGISTRY_USER"):
        return env["WASMFORGE_REGISTRY_USER"], env.get("WASMFORGE_REGISTRY_PASSWORD", "")
    config = Path(env.get("DOCKER_CONFIG") or Path.home() / ".docker") / "config.json"
    try:
        auths = json.loads(config.read_text()).get("auths", {})
    except (OSError, ValueError, AttributeError):
        return None
    for name in (host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"):
        auth = auths.get(name, {}).get("auth") if isinstance(auths.get(name), dict) else None
        if auth:
            try:
                user, _, password = base64.b64decode(auth).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise RegistryError(f"the credentials for {host} in {config} are not base64 user:password") from None
            return user, password
    return None


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class Registry:
    """One repository of one registry, with its auth state."""

    def __init__(self, repo: Repository, *, log: Log = print, environ: dict[str, str] | None = None,
                 backoff: float = 1.0, retries: int = RETRIES) -> None:
        self.repo = repo
        self.log = log
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "wasmforge"
        self.creds = credentials(repo.host, environ)
        self.backoff = backoff
        self.retries = retries
        self.unreachable: str | None = None  # why the registry could not be reached, once it could not
        self._auth: dict[str, str] = {}  # scope -> Authorization header value
        self.uploaded = 0  # bytes of blobs sent (the rest existed or was mounted)
        self.mounted = 0  # blobs mounted from another repository

    # ------------------------------------------------------------------ transport
    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.repo.base + path

    def _scope(self, method: str, repo: str | None = None) -> str:
        action = "pull" if method in ("GET", "HEAD") else "pull,push"
        return f"repository:{repo or self.repo.name}:{action}"

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), scope: str | None = None,
                retry: bool = True, headers: dict[str, str] | None = None, _reauth: bool = False,
                **kwargs: Any) -> requests.Response:
        """One call, with auth challenges answered and transient failures retried; any status outside
        `ok` is a RegistryError naming what the registry said."""
        scope = scope or self._scope(method)
        kwargs.setdefault("timeout", TIMEOUT)
        attempts = self.retries if retry else 1
        for attempt in range(1, attempts + 1):
            sent = dict(headers or {})
            if scope in self._auth:
                sent["Authorization"] = self._auth[scope]
            try:
                response = self.session.request(method, self._url(path), headers=sent, allow_redirects=True, **kwargs)
            except requests.RequestException as exc:
                if attempt < attempts:
                    self._wait(attempt, f"{method} {path}: {network_reason(exc)}")
                    continue
                self.unreachable = network_reason(exc)
                raise RegistryError(f"cannot reach the registry {self.repo.host}: {network_reason(exc)}",
                                    where=self._url(path),
                                    hint="check the address and that it is running"
                                         + ("" if self.repo.insecure else "; a plain-HTTP registry needs --insecure")
                                    ) from None
            # A 401 is answered once (credentials sent, or a fresh token: the last one may have expired).
            if response.status_code == 401 and not _reauth and self._authenticate(response, scope):
                return self.request(method, path, ok=ok, scope=scope, retry=retry, headers=headers, _reauth=True,
                                    **kwargs)
            if (response.status_code == 429 or response.status_code >= 500) and attempt < attempts:
                self._wait(attempt, f"{method} {path}: HTTP {response.status_code}", response.headers.get("Retry-After"))
                continue
            if response.status_code not in ok:
                raise self._failure(method, path, response)
            return response
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, why: str, retry_after_header: str | None = None) -> None:
        asked = retry_after(retry_after_header)  # seconds or an HTTP date, as downloads read it
        delay = min(asked, 60.0) if asked is not None else self.backoff * 2 ** (attempt - 1)
        self.log(f"registry: {why}; retrying in {delay:.0f} s")
        time.sleep(delay)

    def _authenticate(self, response: requests.Response, scope: str) -> bool:
        scheme, params = _challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if not self.creds:
                return False
            token = base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
            self._auth[scope] = f"Basic {token}"
            return True
        if scheme == "bearer" and params.get("realm"):
            query: dict[str, str | list[str]] = {"scope": scope.split()}
            if params.get("service"):
                query["service"] = params["service"]
            try:
                answer = self.session.get(params["realm"], params=query, auth=self.creds, timeout=TIMEOUT)
            except requests.RequestException as exc:
                raise RegistryError(f"cannot reach the registry's token service: {network_reason(exc)}",
                                    where=params["realm"]) from None
            if answer.status_code != 200:
                raise RegistryError(f"the registry's token service refused ({answer.status_code})",
                                    where=params["realm"], hint=_credentials_hint(self.repo.host))
            try:
                body = answer.json()
                token = body.get("token") or body.get("access_token")
            except (ValueError, AttributeError):
                token = None
            if not isinstance(token, str) or not token:
                raise RegistryError("the registry's token service answered no token", where=params["realm"])
            self._auth[scope] = f"Bearer {token}"
            return True
        return False

    def _failure(self, method: str, path: str, response: requests.Response) -> RegistryError:
        status = response.status_code
        try:
            errors = response.json().get("errors") or []
            said = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
        except (ValueError, AttributeError):
            said = response.text[:200].strip()
        what = {401: "the registry refused our credentials (401)",
                403: "the registry forbids this (403)",
                404: "not found (404)"}.get(status, f"HTTP {status}")
        hint = {401: _credentials_hint(self.repo.host), 403: "the account needs push rights to this repository",
                404: f"check the repository name ({self.repo.name})"}.get(status)
        return RegistryError(f"{method} {path}: {what}", where=str(self.repo),
                             details=f"the registry said: {said}" if said else None, hint=hint)

    # ------------------------------------------------------------------ blobs
    def has_blob(self, digest: str) -> bool:
        return self.request("HEAD", f"{self.repo.name}/blobs/{digest}", ok=(200, 404)).status_code == 200

    def mount(self, digest: str, source: str) -> bool:
        """Mount a blob that repository `source` of the same registry has; False if it had to be uploaded."""
        response = self.request("POST", f"{self.repo.name}/blobs/uploads/", ok=(201, 202),
                                params={"mount": digest, "from": source},
                                scope=f"{self._scope('POST')} repository:{source}:pull")
        if response.status_code == 201:
            self.mounted += 1
            return True
        # 202: the registry started an ordinary upload instead; cancel it (ours starts fresh).
        if location := response.headers.get("Location"):
            with contextlib.suppress(RegistryError):
                self.request("DELETE", self._location(location), ok=(204, 404, 405), retry=False)
        return False

    def push_blob(self, data: bytes, digest: str, *, mount_from: str | None = None,
                  progress: Callable[[int], None] | None = None, check: bool = True) -> None:
        """Upload a blob unless the registry has it (`check=False`: the caller just asked)."""
        if check and self.has_blob(digest):
            return
        if mount_from and self.mount(digest, mount_from):
            return
        for attempt in range(1, RETRIES + 1):
            try:
                self._upload(data, digest, progress)
                return
            except _Broken as exc:
                if attempt == RETRIES:
                    raise RegistryError(f"the upload of {digest[:19]} failed {RETRIES} times: {exc}",
                                        where=str(self.repo), hint="try again; nothing was tagged") from None
                self._wait(attempt, f"upload of {digest[:19]}: {exc}")

    def _upload(self, data: bytes, digest: str, progress: Callable[[int], None] | None) -> None:
        start = self.request("POST", f"{self.repo.name}/blobs/uploads/", ok=(202,))
        location = self._location(start.headers.get("Location", ""))
        try:
            if len(data) <= CHUNK:
                done = self.request("PUT", location, ok=(201,), retry=False, params={"digest": digest}, data=data,
                                    headers={"Content-Type": "application/octet-stream"})
            else:
                offset = 0
                while offset < len(data):
                    chunk = data[offset:offset + CHUNK]
                    answer = self.request("PATCH", location, ok=(202,), retry=False, data=chunk, headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + len(chunk) - 1}", "Content-Length": str(len(chunk))})
                    location = self._location(answer.headers.get("Location", location))
                    offset += len(chunk)
                    if progress:
                        progress(len(chunk))
                done = self.request("PUT", location, ok=(201,), retry=False, params={"digest": digest},
                                    headers={"Content-Length": "0"})
        except RegistryError as exc:
            if "HTTP 5" in exc.what or "cannot reach" in exc.what:
                raise _Broken(exc.what) from None
            raise
        if len(data) <= CHUNK and progress:
            progress(len(data))
        self.uploaded += len(data)
        reported = done.headers.get("Docker-Content-Digest")
        if reported and reported != digest:
            raise RegistryError(f"the registry stored the blob under another digest ({reported}, we sent {digest})",
                                where=str(self.repo), hint="the registry or a proxy altered the bytes; nothing was tagged")

    def _location(self, location: str) -> str:
        if not location:
            raise RegistryError("the registry started an upload without saying where to send it (no Location)",
                                where=str(self.repo))
        if location.startswith(("http://", "https://")):
            return location
        return f"{'http' if self.repo.insecure else 'https'}://{self.repo.host}{location}"

    def get_blob(self, digest: str, *, limit: int, into: Path | None = None) -> bytes:
        """A blob, checked against its digest while it streams (at most `limit` bytes); written to
        `into` instead of returned when given (then b"" is returned). A blob that does not verify is
        never returned, and `into` is removed."""
        if not _DIGEST.match(digest):
            raise RegistryError(f"{digest!r} is not a sha256 digest", where=str(self.repo))
        response = self.request("GET", f"{self.repo.name}/blobs/{digest}", stream=True)
        hasher = hashlib.sha256()
        parts: list[bytes] = []
        size = 0
        try:
            with response, (into.open("wb") if into else contextlib.nullcontext()) as sink:
                for chunk in response.iter_content(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise RegistryError(f"blob {digest[:19]} is larger than the {limit} bytes it should have",
                                            where=str(self.repo))
                    hasher.update(chunk)
                    (sink.write if sink else parts.append)(chunk)
            if "sha256:" + hasher.hexdigest() != digest:
                raise RegistryError(f"blob {digest[:19]} does not match its digest (corrupted in the registry or "
                                    "on the way)", where=str(self.repo), hint="it was not used")
        except (requests.RequestException, RegistryError) as exc:
            if into:
                into.unlink(missing_ok=True)
            if isinstance(exc, RegistryError):
                raise
            raise RegistryError(f"the download of blob {digest[:19]} broke off: {network_reason(exc)}",
                                where=str(self.repo)) from None
        return b"".join(parts)

    # ------------------------------------------------------------------ manifests
    def get_manifest(self, reference: str) -> tuple[str, bytes, str] | None:
        """(media type, bytes, digest) of a manifest by tag or digest; None when there is none."""
        response = self.request("GET", f"{self.repo.name}/manifests/{reference}", ok=(200, 404),
                                headers={"Accept": ", ".join(MANIFEST_TYPES)})
        if response.status_code == 404:
            return None
        data = response.content
        if len(data) > MAX_MANIFEST:
            raise RegistryError(f"the manifest {reference} is larger than {MAX_MANIFEST} bytes", where=str(self.repo))
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"the manifest {reference[:19]} does not match its digest", where=str(self.repo))
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return media_type, data, digest

    def put_manifest(self, reference: str, media_type: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        response = self.request("PUT", f"{self.repo.name}/manifests/{reference}", ok=(201,), data=data,
                                headers={"Content-Type": media_type})
        reported = response.headers.get("Docker-Content-Digest")
        if reported and reported != digest:
            raise RegistryError(f"the registry stored manifest {reference} under another digest ({reported})",
                                where=str(self.repo))
        return digest

    # ------------------------------------------------------------------ referrers
    def supports_referrers(self) -> bool:
        empty = "sha256:" + hashlib.sha256(b"").hexdigest()
        response = self.request("GET", f"{self.repo.name}/referrers/{empty}", ok=(200, 404, 400, 405))
        return response.status_code == 200 and "json" in response.headers.get("Content-Type", "")

    def add_referrers_fallback(self, subject: str, descriptors: list[dict[str, Any]]) -> None:
        """The tag schema of OCI distribution 1.1 for registries without the referrers API: the index
        tagged `sha256-<hex>` lists the subject's referrers (merged with what it lists already)."""
        tag = subject.replace(":", "-")
        current = self.get_manifest(tag)
        existing: list[dict[str, Any]] = []
        if current:
            try:
                existing = [m for m in json.loads(current[1]).get("manifests", []) if isinstance(m, dict)]
            except (ValueError, AttributeError):
                existing = []
        known = {m.get("digest") for m in existing}
        merged = existing + [d for d in descriptors if d["digest"] not in known]
        if current and len(merged) == len(existing):
            return
        index = json.dumps({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": merged},
                           sort_keys=True, separators=(",", ":")).encode()
        self.put_manifest(tag, INDEX_TYPE, index)



class _Broken(Exception):
    """An upload that broke off (a dropped connection, a 5xx): started again from the beginning."""


def _credentials_hint(host: str) -> str:
    return (f"set WASMFORGE_REGISTRY_USER and WASMFORGE_REGISTRY_PASSWORD, or log in to {host} "
            "so that ~/.docker/config.json has its credentials")
