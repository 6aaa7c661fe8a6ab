"""OCI images of a release: `invoke image` (stage: release -> dist/oci/<name>/, an OCI image layout).

One image index holds, for every program of the package:
- the runnable image that Docker+Wasm and containerd's runwasi shims run: platform wasi/wasm, one
  layer with the module at /<program>.wasm, Entrypoint ["/<program>.wasm"], annotated
  `module.wasm.image/variant=compat-smart`;
- the wasm artifact of the CNCF TAG-Runtime specification: config `application/vnd.wasm.config.v0+json`
  (with the module's imports and exports), one `application/wasm` layer holding the module itself;
- the package's SBOMs and provenance as referrers of both (OCI 1.1 `subject`, what `oras discover` lists);
and once per package, the release files of `invoke package` (tarball, SBOMs, provenance) as one OCI
artifact whose layers carry their file names (what `oras pull` writes).

Everything is a function of the release (no clock: `created` is SOURCE_DATE_EPOCH; gzip without a
date; tar entries fixed), so the same build gives the same digests. registry.py pushes these.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import WasmforgeError
from .optimize import module_interface
from .registry import Registry, RegistryError, check_tag
from .sources import progress_bar
from .tarballs import deterministic_gzip, deterministic_tar, member

if TYPE_CHECKING:  # the remote cache uses this module from inside the build pipeline
    from .release import Release

Log = Callable[[str], None]

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
IMAGE_CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
WASM_CONFIG_TYPE = "application/vnd.wasm.config.v0+json"
WASM_LAYER_TYPE = "application/wasm"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
RELEASE_TYPE = "application/vnd.wasmforge.release.v1"
DOCUMENT_TYPES = {".spdx.json": "application/spdx+json", ".cdx.json": "application/vnd.cyclonedx+json",
                  ".intoto.jsonl": "application/vnd.in-toto+json", ".tar.gz": "application/vnd.wasmforge.package.v1.tar+gzip"}
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"
VARIANT = "module.wasm.image/variant"
EMPTY = b"{}"


class ImageError(WasmforgeError):
    """An image layout cannot be written or read."""


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data),
                **{k: v for k, v in extra.items() if v}}


@dataclass(frozen=True)
class Tagged:
    """A manifest of the set and the name it goes by (`php`, `php-wasm`, `release`); referrers have none."""

    ref: str | None
    manifest: Blob
    platform: dict[str, str] | None = None
    subject: str | None = None  # the digest of the manifest this one refers to


@dataclass
class ImageSet:
    name: str  # php-7.4.33-wasi
    blobs: dict[str, Blob] = field(default_factory=dict)
    manifests: list[Tagged] = field(default_factory=list)

    def add(self, blob: Blob) -> Blob:
        self.blobs[blob.digest] = blob
        return blob

    def index(self) -> Blob:
        """The layout's index.json: every manifest, the named ones with their ref name."""
        entries = []
        for t in self.manifests:
            extra: dict[str, Any] = {"platform": t.platform}
            if t.ref:
                extra["annotations"] = {REF_NAME: t.ref}
            manifest = json.loads(t.manifest.data)
            if "artifactType" in manifest:
                extra["artifactType"] = manifest["artifactType"]
            entries.append(t.manifest.descriptor(**extra))
        return Blob(INDEX_TYPE, _json({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": entries}))


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def created(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _revision(root: Path) -> str | None:
    """The wasmforge commit the images were made with (none outside a git checkout)."""
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def annotations(release: Release, program: str | None, revision: str | None) -> dict[str, str]:
    main = release.main
    found = {
        "org.opencontainers.image.created": created(release.epoch),
        "org.opencontainers.image.version": main.version + (f"-{main.flavor}" if main.flavor else ""),
        "org.opencontainers.image.licenses": main.license,
        "org.opencontainers.image.description": main.summary,
        "org.opencontainers.image.url": main.homepage,
        "org.opencontainers.image.source": main.source.url or main.source.purl or "",
        "org.opencontainers.image.revision": revision or "",
        "org.opencontainers.image.vendor": "wasmforge",
        "dev.wasmforge.build-key": main.key,
        "dev.wasmforge.package": release.name,
    }
    if program:
        found[TITLE] = f"{program}.wasm"
    if release.exceptions:
        found["dev.wasmforge.requires"] = (
            "WebAssembly exception handling (exnref): wasmtime >= 47 runs it by default (older: -W exceptions=y); "
            "for runtimes without it use the image of the portable flavor")
    return {k: v for k, v in sorted(found.items()) if v}


def _layer_tar(name: str, data: bytes, epoch: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(member(name, mode=0o755, mtime=epoch, size=len(data)), io.BytesIO(data))
    return raw.getvalue()


def _data_layer_tar(release: Release) -> bytes | None:
    """The package's data files (share/) at the guest prefix the programs look in, or None."""
    data = [f for f in release.files if f.path.startswith("share/")]
    if not data or not release.prefix:
        return None
    return deterministic_tar([(f.path, f.data) for f in data], release.epoch, release.prefix.strip("/"))


def image_set(release: Release, documents: dict[str, bytes], tarball: bytes, root: Path) -> ImageSet:
    """Every image, artifact and referrer of a release, in memory (a package is a few MiB)."""
    revision = _revision(root)
    images = ImageSet(release.name)
    empty = images.add(Blob(EMPTY_TYPE, EMPTY))
    files = {f.path: f.data for f in release.files}
    doc_blobs = {name: images.add(Blob(_document_type(name), data)) for name, data in sorted(documents.items())}
    # The data files are a layer of their own, below the module's: one blob for every program's image.
    data_tar = _data_layer_tar(release)
    data_layer = images.add(Blob(LAYER_TYPE, deterministic_gzip(data_tar))) if data_tar else None
    data_ids = ["sha256:" + hashlib.sha256(data_tar).hexdigest()] if data_tar else []
    for program, rel in release.programs.items():
        module = files[rel]
        notes = annotations(release, program, revision)
        # The runnable image (Docker+Wasm, runwasi).
        tar = _layer_tar(f"{program}.wasm", module, release.epoch)
        layer = images.add(Blob(LAYER_TYPE, deterministic_gzip(tar)))
        config = images.add(Blob(IMAGE_CONFIG_TYPE, _json({
            "architecture": "wasm", "os": "wasi", "created": created(release.epoch),
            "config": {"Entrypoint": [f"/{program}.wasm"], "Labels": notes},
            "rootfs": {"type": "layers", "diff_ids": [*data_ids, "sha256:" + hashlib.sha256(tar).hexdigest()]},
            "history": [{"created": created(release.epoch), "created_by": f"wasmforge image {release.main.target}"}],
        })))
        image = images.add(Blob(MANIFEST_TYPE, _json({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config.descriptor(),
            "layers": [*([data_layer.descriptor()] if data_layer else []), layer.descriptor()],
            "annotations": {**notes, VARIANT: "compat-smart"},
        })))
        images.manifests.append(Tagged(program, image, {"architecture": "wasm", "os": "wasi"}))
        # The CNCF wasm artifact.
        wasm = images.add(Blob(WASM_LAYER_TYPE, module))
        imported, exported = module_interface(module)
        wasm_config = images.add(Blob(WASM_CONFIG_TYPE, _json({
            "created": created(release.epoch), "author": "wasmforge", "architecture": "wasm", "os": "wasip1",
            "layerDigests": [wasm.digest], "component": {"imports": imported, "exports": exported},
        })))
        artifact = images.add(Blob(MANIFEST_TYPE, _json({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": wasm_config.descriptor(),
            "layers": [wasm.descriptor(annotations={TITLE: f"{program}.wasm"})], "annotations": notes,
        })))
        images.manifests.append(Tagged(f"{program}-wasm", artifact, {"architecture": "wasm", "os": "wasip1"}))
        for subject in (image, artifact):
            for name, blob in doc_blobs.items():
                referrer = images.add(Blob(MANIFEST_TYPE, _json({
                    "schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": blob.media_type,
                    "config": empty.descriptor(), "layers": [blob.descriptor(annotations={TITLE: name})],
                    "subject": subject.descriptor(),
                    "annotations": {"org.opencontainers.image.created": created(release.epoch), TITLE: name},
                })))
                images.manifests.append(Tagged(None, referrer, subject=subject.digest))
    package = images.add(Blob(DOCUMENT_TYPES[".tar.gz"], tarball))
    layers = [package.descriptor(annotations={TITLE: f"{release.name}.tar.gz"})]
    layers += [blob.descriptor(annotations={TITLE: name}) for name, blob in doc_blobs.items()]
    bundle = images.add(Blob(MANIFEST_TYPE, _json({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": RELEASE_TYPE,
        "config": empty.descriptor(), "layers": layers, "annotations": annotations(release, None, revision),
    })))
    images.manifests.append(Tagged("release", bundle))
    return images


def _document_type(name: str) -> str:
    return next((t for suffix, t in DOCUMENT_TYPES.items() if name.endswith(suffix)), "application/octet-stream")


def write_layout(images: ImageSet, dest: Path) -> Path:
    """Write the set as an OCI image layout in `dest` (replaced whole: built beside it, then renamed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        blobs = staging / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        for digest, blob in sorted(images.blobs.items()):
            (blobs / digest.split(":", 1)[1]).write_bytes(blob.data)
        (staging / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))
        (staging / "index.json").write_bytes(images.index().data)
        staging.chmod(0o755)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(staging, dest)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def publish_tags(images: ImageSet, tag: str, main_program: str) -> dict[str, str]:
    """Registry tag of each named manifest: the main program's image gets `tag`, the others `tag-<ref>`."""
    return {t.ref: check_tag(tag if t.ref == main_program else f"{tag}-{t.ref}") for t in images.manifests if t.ref}


def publish(images: ImageSet, registry: Registry, tag: str, main_program: str, *, force: bool = False,
            mount_from: str | None = None, log: Log = print) -> dict[str, str]:
    """Push every blob, then every manifest by digest, then the referrers, then the tags (last, so a
    push that fails midway leaves no tag naming what is missing). Returns tag -> digest."""
    tags = publish_tags(images, tag, main_program)
    by_ref = {t.ref: t for t in images.manifests if t.ref}
    conflicts = []
    for ref, name in tags.items():
        found = registry.get_manifest(name)
        if found and found[2] != by_ref[ref].manifest.digest:
            conflicts.append(f"{registry.repo}:{name} is {found[2][:19]}, ours is {by_ref[ref].manifest.digest[:19]}")
    if conflicts and not force:
        raise RegistryError(f"{len(conflicts)} tag(s) already exist with other content; nothing was pushed",
                            where=str(registry.repo), details="\n".join(f"  {c}" for c in conflicts),
                            hint="publish under another --tag, or replace them with --force")
    manifests = {t.manifest.digest for t in images.manifests}
    blobs = [b for d, b in sorted(images.blobs.items()) if d not in manifests]
    missing = [b for b in blobs if not registry.has_blob(b.digest)]
    total = sum(len(b.data) for b in missing)
    log(f"publish: {len(blobs)} blobs ({len(blobs) - len(missing)} already there), "
        f"{total / 1048576:.1f} MiB to send to {registry.repo}")
    bar = progress_bar(f"push {registry.repo}", total) if total else None
    try:
        for blob in missing:
            registry.push_blob(blob.data, blob.digest, mount_from=mount_from, progress=bar.update if bar else None,
                               check=False)
    finally:
        if bar:
            bar.close()
    subjects = [t for t in images.manifests if t.subject is None]
    referrers = [t for t in images.manifests if t.subject is not None]
    for t in subjects + referrers:
        registry.put_manifest(t.manifest.digest, MANIFEST_TYPE, t.manifest.data)
    if referrers and not registry.supports_referrers():
        by_subject: dict[str, list[dict[str, Any]]] = {}
        for t in referrers:
            manifest = json.loads(t.manifest.data)
            by_subject.setdefault(t.subject or "", []).append(t.manifest.descriptor(
                artifactType=manifest.get("artifactType"), annotations=manifest.get("annotations")))
        for subject, descriptors in by_subject.items():
            registry.add_referrers_fallback(subject, descriptors)
    published = {}
    for ref, name in tags.items():
        published[name] = registry.put_manifest(name, MANIFEST_TYPE, by_ref[ref].manifest.data)
    return published
