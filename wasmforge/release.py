"""Package a finished build for release: `invoke package` (stage: store entry -> dist/).

`dist/<pkg>-<version>[-<flavor>]-wasi.tar.gz` holds the modules (bin/*.wasm, never the engine-specific
.cwasm) and the data files they read (share/), a note per program on how to run it with wasmtime's
CLI, the licence texts of the package,
of every dependency linked into it and of our patches (licenses/), manifest.json, and the SBOMs and
provenance of sbom.py; those three are also written beside the tarball. Everything is a function of
the stored build, the recipes and the date: entries sorted, dates SOURCE_DATE_EPOCH (default: the
version's release date from its recipe), owner 0, no gzip timestamp, so packaging the same build
twice gives the same bytes. Files are written under temporary names and renamed; `dist/SHA256SUMS`
lists every file in dist/ and is rewritten last.

Nothing is built here: a target whose build is not in the store (or fails its check) is refused
with the command that builds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config
from .errors import WasmforgeError
from .pipeline import PlannedBuild, plan
from .recipe import LicenseFile, Package, RecipeBook, SourceSpec, Target
from .sources import fetch_one
from .store import MANIFEST, ArtifactStore, exclusive_lock
from .tarballs import deterministic_gzip, deterministic_tar
from .toolchain import Toolchain
from .verify import SUMS

Log = Callable[[str], None]
# A licence text larger than this is not a licence text.
MAX_LICENSE_BYTES = 4 << 20


class PackageError(WasmforgeError):
    """A build cannot be packaged (not built, damaged, a licence file missing)."""


@dataclass(frozen=True)
class PackagedFile:
    """A file of the package, in memory: packages are a few MiB."""

    path: str  # inside the tarball
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def sha1(self) -> str:
        return hashlib.sha1(self.data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class SourceRecord:
    """The source archive a build was made from, as the SBOM and provenance name it."""

    file: str
    sha256: str
    url: str | None  # the upstream download location, when this is the recipe's primary source
    purl: str | None  # a package URL when it came from Debian's source archive instead


@dataclass(frozen=True)
class PatchRecord:
    path: str  # relative to the wasmforge checkout: patches/<pkg>/<series>/<file>
    sha256: str
    sha1: str


@dataclass(frozen=True)
class Component:
    """One package of the closure: the one packaged, or a dependency linked into it."""

    name: str
    version: str
    flavor: str | None
    target: str
    key: str
    license: str
    summary: str
    homepage: str
    recipe: str  # relative to the checkout
    recipe_sha256: str
    source: SourceRecord
    patches: tuple[PatchRecord, ...]
    depends: tuple[str, ...]


@dataclass(frozen=True)
class Release:
    """Everything the package, its SBOMs and its provenance say: one typed value, built once."""

    name: str  # php-7.4.33-wasi
    main: Component
    dependencies: tuple[Component, ...]
    files: tuple[PackagedFile, ...]  # the tarball's content, without the SBOMs and provenance
    toolchain: dict[str, Any]
    epoch: int
    target: Target
    wasmforge: str = __version__
    programs: dict[str, str] = field(default_factory=dict)
    exceptions: bool = False  # the modules use WebAssembly exception handling (runtimes must enable it)
    prefix: str | None = None  # the guest prefix the programs were built for (their share/ lives under it)

    @property
    def components(self) -> tuple[Component, ...]:
        return (self.main, *self.dependencies)

    @property
    def spdx_name(self) -> str:
        return f"{self.name}.spdx.json"

    @property
    def cdx_name(self) -> str:
        return f"{self.name}.cdx.json"

    @property
    def provenance_name(self) -> str:
        return f"{self.name}.intoto.jsonl"


def package_name(package: Package) -> str:
    return f"{package.name}-{package.version}" + (f"-{package.flavor}" if package.flavor else "") + "-wasi"


def build_command(package: Package) -> str:
    return f"invoke build {package.name}-{package.version}" + (f" --flavor {package.flavor}" if package.flavor else "")


def source_date_epoch(package: Package) -> int:
    """SOURCE_DATE_EPOCH from the environment, else the version's release date from the recipe."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value:
        if not value.isdigit():
            raise PackageError(f"SOURCE_DATE_EPOCH={value!r} is not a Unix time",
                               hint="give whole seconds since 1970, or unset it to use the recipe's release date")
        return int(value)
    if not package.source_date_epoch:
        raise PackageError(f"the recipe gives no release date for {package.name} {package.version}",
                           where=package.recipe.where(("versions", package.version)),
                           hint="add `released: YYYY-MM-DD` to the version, or set SOURCE_DATE_EPOCH")
    return package.source_date_epoch


def describe_release(book: RecipeBook, target: Target, config: Config, toolchain: Toolchain, *,
                     log: Log = print) -> Release:
    """Collect what the package of `target` holds and says, from its stored build (never built here)."""
    if target.native:
        raise PackageError("native builds are references for comparisons, not packages", hint="drop --native")
    # What the package holds: the target and the libraries linked into it; build tools (native
    # builds the build ran, recipe `build_tools`) are not part of it.
    *linked, last = plan(book, target, config, toolchain)
    planned = [item for item in linked if not item.package.native] + [last]
    store = ArtifactStore(config.artifacts)
    main_item = planned[-1]
    # Each entry is checked once (every file hashed), then its manifest serves the SBOM and the licences.
    manifests = [_stored_manifest(store, item, main_item) for item in planned]
    main_manifest = manifests[-1]
    components = [_component(item, m, config) for item, m in zip(planned, manifests, strict=True)]
    package = main_item.package
    epoch = source_date_epoch(package)
    entry = store.entry(main_item.key)
    files: list[PackagedFile] = []
    programs: dict[str, str] = {}
    def stored_file(rel: str) -> PackagedFile:
        data = (entry / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != main_manifest["outputs"][rel]["sha256"]:
            raise PackageError(f"{rel} of the stored build of {package.target} changed while it was read",
                               where=str(entry), hint=f"run `{build_command(package)}` and package again")
        return PackagedFile(rel, data)

    # Data files the programs read at run time (ICU's for PHP's intl), as the build installed them.
    data_files = [stored_file(rel) for rel in sorted(main_manifest.get("outputs", {})) if rel.startswith("share/")]
    for name, rel in main_manifest.get("programs", {}).items():
        files.append(stored_file(rel))
        note = f"bin/{name}.run.txt"
        files.append(PackagedFile(note, run_note(package, name, rel, has_data=bool(data_files)).encode()))
        programs[name] = rel
    files += data_files
    files += license_files(planned, manifests, config, log)
    release = Release(name=package_name(package), main=components[-1], dependencies=tuple(components[:-1]),
                      files=(), toolchain=main_item.inputs["toolchain"], epoch=epoch, target=target,
                      programs=programs, exceptions=package.exceptions, prefix=package.build.get("prefix"))
    files.append(PackagedFile(MANIFEST, package_manifest(release, files)))
    return dataclasses.replace(release, files=tuple(sorted(files, key=lambda f: f.path)))


def _stored_manifest(store: ArtifactStore, item: PlannedBuild, main: PlannedBuild) -> dict[str, Any]:
    build = build_command(main.package)
    entry = store.entry(item.key)
    if not entry.is_dir():
        raise PackageError(f"{item.package.target} is not built as the recipes and toolchain now describe it "
                           f"(no stored build {item.key[:12]})",
                           hint=f"build it first: {build} (`{build} --explain` says what changed)")
    if problem := store.problem(item.key):
        raise PackageError(f"the stored build of {item.package.target} is damaged: {problem}", where=str(entry),
                           hint=f"nothing was packaged; `{build}` discards it and builds again")
    return json.loads((entry / MANIFEST).read_text())


def _source_used(package: Package, manifest: dict[str, Any]) -> SourceSpec:
    """The source (primary or an alternative) the stored build was made from."""
    used = manifest.get("inputs", {}).get("source_used", {}).get("sha256")
    return next((s for s in package.sources if s.sha256 == used), package.sources[0])


def _component(item: PlannedBuild, manifest: dict[str, Any], config: Config) -> Component:
    package = item.package
    spec = _source_used(package, manifest)
    primary = spec is package.sources[0]
    purl = None
    if spec.debian and not primary:
        purl = f"pkg:deb/debian/{spec.debian.package}?arch=source&distro={spec.debian.suite}"
    return Component(
        name=package.name, version=package.version, flavor=package.flavor, target=package.target, key=item.key,
        license=package.recipe.license, summary=package.recipe.summary, homepage=package.recipe.homepage,
        recipe=_relative(package.recipe.file, config.root), recipe_sha256=package.recipe.digest,
        source=SourceRecord(spec.file_name(), spec.sha256, spec.url if primary or not purl else None, purl),
        patches=tuple(PatchRecord(_relative(p.path, config.root), p.sha256,
                                  hashlib.sha1(p.path.read_bytes(), usedforsecurity=False).hexdigest())
                      for p in item.patches),
        depends=tuple(package.depends))


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return path.name


def run_note(package: Package, program: str, rel: str, *, has_data: bool = False) -> str:
    """How to run one program with wasmtime's CLI: what the module needs, from its recipe."""
    flags = ["-W exceptions=y"] if package.exceptions else []
    prefix = package.build.get("prefix")
    lines = [
        f"{program}.wasm: {program} from {package.name} {package.version}"
        + (f" ({package.flavor} flavor)" if package.flavor else "") + ", built for WASI (wasm32-wasip1) by wasmforge.",
        "",
        "Run it with wasmtime's command line (wasmtime run), for example:",
        "",
        f"  wasmtime run {' '.join(flags + ['--dir', '.::/work'])} {rel} ARGS...",
        "",
    ]
    if package.exceptions:
        lines.append("-W exceptions=y    required: the module uses WebAssembly exception handling "
                     "(setjmp/longjmp); runtimes without it refuse the module.")
    lines += [
        "--dir HOST::GUEST  the module sees no file system but the directories you preopen; above, the",
        "                   current directory appears as /work (give paths to the program as /work/...).",
        "--env NAME=VALUE   the module's environment is empty but for the variables you pass.",
    ]
    if prefix:
        lines.append(f"Its built-in paths are under {prefix} (configuration, include paths): preopen a "
                     f"directory there, e.g. --dir ./etc::{prefix}/lib, to give it configuration files.")
    if has_data:
        lines.append("The package's share/ holds data files it reads at run time: preopen it where the program "
                     + (f"looks for them, --dir ./share::{prefix}/share." if prefix else "looks for them."))
    return "\n".join(lines) + "\n"


def license_files(planned: list[PlannedBuild], manifests: list[dict[str, Any]], config: Config,
                  log: Log) -> list[PackagedFile]:
    """licenses/<pkg>/...: each package's licence files, read from the source archive it was built from
    (`manifests`: the stored builds' manifests, in plan order), and our patches' licence when any applied."""
    found: list[PackagedFile] = []
    for item, manifest in zip(planned, manifests, strict=True):
        package = item.package
        if not package.recipe.license_files:
            raise PackageError(f"the recipe of {package.name} does not say where its licence text is",
                               where=str(package.recipe.file),
                               hint="add license_files: [LICENSE] (paths in the source tree)")
        where = package.recipe.where(("license_files",))
        fetched = fetch_one(_source_used(package, manifest), config, log=log, progress=False)
        texts = read_license_texts(fetched.path, package.recipe.license_files)
        if not texts:
            listed = ", ".join(f.describe() for f in package.recipe.license_files)
            raise PackageError(f"none of the licence files of {package.name} ({listed}) is in {fetched.path.name}",
                               where=where, hint="list the file that holds the licence in this source")
        found += [PackagedFile(f"licenses/{package.name}/{name}", data) for name, data in texts]
    if any(item.patches for item in planned):
        text = (config.root / "LICENSE").read_bytes()
        found.append(PackagedFile("licenses/wasmforge-patches/LICENSE", text))
    return found


def read_license_texts(archive: Path, wanted: Iterable[LicenseFile]) -> list[tuple[str, bytes]]:
    """The wanted files (below the archive's top directory) that the archive has, as regular files.
    Only their bytes are read: nothing is extracted, links and oversized members are ignored."""
    by_path = {w.path: w for w in wanted}
    texts: dict[str, bytes] = {}
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = member.name.split("/", 1)
                rel = parts[1] if len(parts) == 2 else parts[0]
                want = by_path.get(rel)
                if want is None or not member.isreg() or member.size > MAX_LICENSE_BYTES:
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                data = handle.read(MAX_LICENSE_BYTES + 1)
                if want.lines:
                    first, last = want.lines
                    data = b"".join(data.splitlines(keepends=True)[first - 1:last])
                    texts[f"{rel.replace('/', '_')}.lines-{first}-{last}"] = data
                else:
                    texts[rel] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise PackageError(f"cannot read licence files from {archive.name}: {exc}", where=str(archive),
                           hint="delete it from the source cache; the next build fetches it again") from None
    return sorted(texts.items())


def package_manifest(release: Release, files: list[PackagedFile]) -> bytes:
    main = release.main
    manifest = {
        "name": main.name,
        "version": main.version,
        "flavor": main.flavor,
        "target": main.target,
        "package": release.name,
        "license": main.license,
        "build_key": main.key,
        "source_date_epoch": release.epoch,
        "wasmforge": release.wasmforge,
        "programs": release.programs,
        "dependencies": [{"name": d.name, "version": d.version, "license": d.license, "build_key": d.key}
                         for d in release.dependencies],
        "toolchain": release.toolchain,
        "files": {f.path: {"sha256": f.sha256, "size": len(f.data)} for f in sorted(files, key=lambda f: f.path)},
        "sbom": [release.spdx_name, release.cdx_name],
        "provenance": release.provenance_name,
    }
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def deterministic_tarball(files: Iterable[PackagedFile], epoch: int, top: str) -> bytes:
    """A .tar.gz whose bytes depend on the files only: sorted, dated `epoch`, owner 0, no gzip date."""
    return deterministic_gzip(deterministic_tar([(f.path, f.data) for f in files], epoch, top))


def package_tarball(release: Release, documents: dict[str, bytes]) -> bytes:
    """The release tarball: the package's files and its SBOMs and provenance under <name>/."""
    return deterministic_tarball([*release.files, *(PackagedFile(n, d) for n, d in documents.items())],
                                 release.epoch, release.name)


def write_package(release: Release, documents: dict[str, bytes], dist: Path, *, log: Log = print) -> list[Path]:
    """Write the tarball and the loose SBOMs/provenance into `dist`, then SHA256SUMS (all atomically)."""
    outputs = {f"{release.name}.tar.gz": package_tarball(release, documents), **documents}
    dist.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with exclusive_lock(dist / ".lock", f"another `invoke package` is writing {dist}; waiting for it", log):
        temporary = []
        try:
            for name, data in outputs.items():
                tmp = dist / f".{name}.tmp-{os.getpid()}"
                temporary.append(tmp)
                tmp.write_bytes(data)
            for tmp, name in zip(temporary, outputs, strict=True):
                os.replace(tmp, dist / name)
                written.append(dist / name)
        finally:
            for tmp in temporary:
                tmp.unlink(missing_ok=True)
        write_sums(dist)
    return written


def write_sums(dist: Path) -> Path:
    """dist/SHA256SUMS: every file in dist/ (sha256sum's format, sorted), written atomically."""
    lines = []
    for path in sorted(dist.iterdir()):
        if path.name == SUMS or path.name.startswith(".") or not path.is_file() or path.is_symlink():
            continue
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    tmp = dist / f".{SUMS}.tmp-{os.getpid()}"
    tmp.write_text("".join(lines))
    os.replace(tmp, dist / SUMS)
    return dist / SUMS
