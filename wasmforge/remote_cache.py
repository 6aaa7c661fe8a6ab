"""The shared build cache on an OCI registry: store entries pushed and pulled by build key.

`WASMFORGE_REMOTE_CACHE=oci://HOST[:PORT]/REPO` (`oci+http://` for a plain-HTTP registry) makes a
build whose key is not in the local store look for tag `build-<key>` in that repository first. An
entry travels as an OCI artifact: a config that lists every file with its sha256 and size, and one
deterministic tar.gz layer. What a pull does, in order, before anything is used:
- the manifest, config and layer are checked against their digests as they arrive, sizes capped;
- the layer is unpacked with our own extraction (nothing can land outside its directory);
- every file and link must be exactly what the config lists, and the config must name the key;
- the placeholder that stood for the pusher's store directory (pkg-config and libtool files name
  dependencies' entries by path) becomes this store's directory;
- the entry goes into the store and is then verified like every local entry before it is used.
Precompiled `.cwasm` files are native code: they are never shared. The puller compiles its own from the
verified `.wasm` (as a build would), so a registry can at worst hand us a WebAssembly module, which
runs sandboxed, never machine code.

A registry that is down, refuses, or serves anything that does not verify gives one warning and a local
build, never a wrong artifact.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import WasmforgeError
from .extract import ExtractLimits, extract_archive
from .oci import LAYER_TYPE, MANIFEST_TYPE, Blob
from .registry import Registry, RegistryError, Repository
from .store import MANIFEST, STORE_PLACEHOLDER, ArtifactStore, file_record, walk_entry
from .tarballs import deterministic_gzip, member

Log = Callable[[str], None]
ENTRY_TYPE = "application/vnd.wasmforge.store-entry.v1"
ENTRY_CONFIG_TYPE = "application/vnd.wasmforge.store-entry.config.v1+json"
MAX_LAYER = 4 << 30
MAX_CONFIG = 64 << 20
_PRECOMPILED = (".cwasm", ".cwasm.json")


class RemoteCacheError(WasmforgeError):
    """The remote cache cannot be used (a bad address)."""


@dataclass(frozen=True)
class RemoteCache:
    repo: Repository
    push: bool = False

    @classmethod
    def parse(cls, url: str, *, push: bool = False) -> RemoteCache:
        for scheme, insecure in (("oci://", False), ("oci+http://", True)):
            if url.startswith(scheme):
                return cls(Repository.parse(url[len(scheme):], insecure=insecure), push)
        raise RemoteCacheError(f"{url!r} is not a remote cache address",
                               hint="give oci://HOST[:PORT]/REPO (or oci+http://... for a registry without TLS)")


def cache_tag(key: str) -> str:
    return f"build-{key}"


def _roots(store: ArtifactStore) -> list[bytes]:
    """How this store's directory can appear inside its entries (as configured, and resolved)."""
    found = {str(store.root).encode(), str(store.root.resolve()).encode()}
    return sorted(found, key=len, reverse=True)


# ----------------------------------------------------------------------------- push

def pack_entry(store: ArtifactStore, key: str) -> tuple[bytes, bytes]:
    """(config, layer) of a verified entry, without precompiled code, the store directory replaced."""
    entry = store.entry(key)
    roots = _roots(store)
    files: dict[str, dict[str, Any]] = {}
    links: dict[str, str] = {}
    rewritten: list[str] = []
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(member("entry", tarfile.DIRTYPE, 0o755))
        for rel, kind in sorted(walk_entry(entry)):
            if rel.endswith(_PRECOMPILED):
                continue
            path = entry / rel
            if kind == "dir":
                tar.addfile(member(f"entry/{rel}", tarfile.DIRTYPE, 0o755))
            elif kind == "link":
                target = os.readlink(path)
                if any(r.decode() in target for r in roots):
                    raise RemoteCacheError(f"{rel} links into the store ({target}): the entry cannot be shared")
                links[rel] = target
                tar.addfile(member(f"entry/{rel}", tarfile.SYMTYPE, 0o777, linkname=target))
            elif kind == "file":
                data = path.read_bytes()
                if any(r in data for r in roots):
                    try:
                        if not rel.startswith("logs/"):  # a log is text even with a stray byte
                            data.decode()
                    except UnicodeDecodeError:
                        raise RemoteCacheError(f"{rel} is a binary file that names the store's directory: "
                                               "the entry cannot be shared") from None
                    for r in roots:
                        data = data.replace(r, STORE_PLACEHOLDER)
                    rewritten.append(rel)
                files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                mode = 0o755 if os.access(path, os.X_OK) else 0o644
                tar.addfile(member(f"entry/{rel}", tarfile.REGTYPE, mode, size=len(data)), io.BytesIO(data))
    config = {"key": key, "files": files, "links": links, "rewritten": rewritten, "wasmforge": __version__}
    return json.dumps(config, sort_keys=True, indent=1).encode(), deterministic_gzip(raw.getvalue())


def push_entry(registry: Registry, store: ArtifactStore, key: str, target: str, *, log: Log = print) -> bool:
    """Push a stored entry (if the registry lacks it); a failure is a warning. True when it is there now."""
    tag = cache_tag(key)
    if registry.unreachable:
        return False  # said once already
    try:
        if registry.get_manifest(tag):
            return True
        if problem := store.problem(key):
            log(f"remote cache: not pushing {target}: its stored entry is damaged ({problem})")
            return False
        config_data, layer_data = pack_entry(store, key)
        config = Blob(ENTRY_CONFIG_TYPE, config_data)
        layer = Blob(LAYER_TYPE, layer_data)
        for blob in (config, layer):
            registry.push_blob(blob.data, blob.digest)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": ENTRY_TYPE,
            "config": config.descriptor(), "layers": [layer.descriptor()],
            "annotations": {"dev.wasmforge.target": target, "dev.wasmforge.build-key": key},
        }, sort_keys=True, separators=(",", ":")).encode()
        registry.put_manifest(tag, MANIFEST_TYPE, manifest)
    except (RegistryError, RemoteCacheError, OSError) as exc:
        log(f"remote cache: warning: could not push {target} to {registry.repo}: {_one_line(exc)}")
        return False
    log(f"remote cache: pushed {target} ({len(layer_data) / 1048576:.1f} MiB) to {registry.repo}:{tag}")
    return True


# ----------------------------------------------------------------------------- pull

def has_entry(registry: Registry, key: str) -> bool:
    if registry.unreachable:
        return False
    try:
        return registry.get_manifest(cache_tag(key)) is not None
    except RegistryError:
        return False


def pull_entry(registry: Registry, store: ArtifactStore, key: str, target: str, *, log: Log = print,
               precompile: Callable[[Path], None] | None = None) -> bool:
    """Fetch, check and store the entry of `key`; False (after one warning, if it was not a plain miss)
    when the registry does not give a verified entry. `precompile` writes a module's .cwasm."""
    if registry.unreachable:
        return False  # said once already; every package builds locally
    scratch = store.scratch(f"remote-{key}")
    try:
        found = registry.get_manifest(cache_tag(key))
        if found is None:
            return False
        manifest = _checked_manifest(found[1])
        config_ref, layer_ref = manifest["config"], manifest["layers"][0]
        config = json.loads(registry.get_blob(config_ref["digest"], limit=min(config_ref["size"], MAX_CONFIG)))
        if not isinstance(config, dict) or config.get("key") != key:
            raise RemoteCacheError("its config names another build key")
        scratch.mkdir(parents=True)
        archive = scratch / "entry.tar.gz"
        registry.get_blob(layer_ref["digest"], limit=min(layer_ref["size"], MAX_LAYER), into=archive)
        unpacked = extract_archive(archive, scratch / "entry", ExtractLimits(max_bytes=MAX_LAYER * 4))
        _check_against(unpacked, config)
        _localise(unpacked, config, store, precompile)
        store.put(key, unpacked)
    except (RegistryError, RemoteCacheError, WasmforgeError, OSError, ValueError, KeyError, TypeError,
            IndexError) as exc:
        log(f"remote cache: warning: not using {target} from {registry.repo}: {_one_line(exc)}; building it here")
        return False
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if problem := store.problem(key):
        store.discard(key)
        log(f"remote cache: warning: the entry of {target} from {registry.repo} does not verify ({problem}); "
            "building it here")
        return False
    return True


def _checked_manifest(data: bytes) -> dict[str, Any]:
    manifest = json.loads(data)
    if not isinstance(manifest, dict) or manifest.get("artifactType") != ENTRY_TYPE:
        raise RemoteCacheError("the tag holds something other than a wasmforge store entry")
    config, layers = manifest.get("config"), manifest.get("layers")
    if not isinstance(config, dict) or config.get("mediaType") != ENTRY_CONFIG_TYPE \
            or not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict) \
            or layers[0].get("mediaType") != LAYER_TYPE:
        raise RemoteCacheError("its manifest is not shaped like a store entry's")
    for ref in (config, layers[0]):
        if not isinstance(ref.get("size"), int) or ref["size"] < 0 or not isinstance(ref.get("digest"), str):
            raise RemoteCacheError("its manifest has a malformed descriptor")
    return manifest


def _check_against(root: Path, config: dict[str, Any]) -> None:
    """The unpacked entry holds exactly the files and links its config lists, byte for byte."""
    files, links = config.get("files"), config.get("links")
    if not isinstance(files, dict) or not isinstance(links, dict):
        raise RemoteCacheError("its config lists no files")
    seen = set()
    for rel, kind in walk_entry(root):
        if kind == "dir":
            continue
        seen.add(rel)
        if kind == "link":
            if links.get(rel) != os.readlink(root / rel):
                raise RemoteCacheError(f"{rel} is a link its config does not list")
        elif kind == "file":
            record = files.get(rel)
            if not isinstance(record, dict) or file_record(root / rel) != record:
                raise RemoteCacheError(f"{rel} does not match its config")
        else:
            raise RemoteCacheError(f"{rel} is a special file")
    if missing := sorted((set(files) | set(links)) - seen):
        raise RemoteCacheError(f"{missing[0]} is missing from the layer")


def _localise(root: Path, config: dict[str, Any], store: ArtifactStore,
              precompile: Callable[[Path], None] | None) -> None:
    """Name this store's directory where the pusher's was, compile the modules here, re-record them."""
    local = str(store.root).encode()
    # Only paths of the verified file list (_check_against: exactly the files in the tree) are touched:
    # the lists below come from the pusher and could name `../` anything.
    files = config["files"]
    changed = []
    for rel in config.get("rewritten", []):
        path = root / rel
        if not isinstance(rel, str) or rel not in files:
            raise RemoteCacheError(f"its config rewrites {rel!r}, which is not a file of the entry")
        path.write_bytes(path.read_bytes().replace(STORE_PLACEHOLDER, local))
        changed.append(rel)
    manifest = json.loads((root / MANIFEST).read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("outputs"), dict):
        raise RemoteCacheError("its manifest.json is malformed")
    outputs: dict[str, Any] = {rel: rec for rel, rec in manifest["outputs"].items() if not rel.endswith(_PRECOMPILED)}
    if not manifest.get("native") and precompile is not None:
        for rel in manifest.get("programs", {}).values():
            if not isinstance(rel, str) or rel not in outputs or rel not in files:
                raise RemoteCacheError(f"its manifest names a program {rel!r} that the entry does not hold")
            precompile(root / rel)
            changed += [rel.removesuffix(".wasm") + suffix for suffix in _PRECOMPILED]
    logs = manifest.get("logs") if isinstance(manifest.get("logs"), dict) else {}
    for rel in changed:
        if rel != MANIFEST:
            (logs if rel.startswith("logs/") else outputs)[rel] = file_record(root / rel)
    manifest["outputs"], manifest["logs"] = outputs, logs
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _one_line(exc: BaseException) -> str:
    text = exc.what if isinstance(exc, WasmforgeError) else (str(exc) or type(exc).__name__)
    return text.splitlines()[0] if text else type(exc).__name__
