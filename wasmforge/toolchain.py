"""Find or provision a WASI toolchain, and expose its environment and identity.

Resolution order (first match wins, and the choice is reported with its reason):
  1. WASI_SDK_PATH pointing at an official WASI SDK layout;
  2. the pinned official WASI SDK release, already downloaded into the cache;
  3. the SDK-shaped directory assembled from Debian packages, already in the cache.
`install_toolchain` provisions 2 (download, sha256-checked) or, when that cannot be had, 3.

Every toolchain is used through small wrapper scripts (`wasm32-wasip1-clang` ...) that fix the
target and sysroot: libtool and some configure scripts dislike multi-word CC values.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import Config
from .debian_archive import DebianArchive, RemoteFile
from .errors import SourceError, ToolchainError
from .recipe import RecipeBook, SourceSpec
from .sources import download_file, extract_archive, extract_source, fetch_one
from .verified import file_sha256

TARGET = "wasm32-wasip1"
# Flags that turn on real setjmp/longjmp through WebAssembly exception handling (exnref encoding).
EH_CFLAGS = ("-mllvm", "-wasm-enable-sjlj", "-mllvm", "-wasm-use-legacy-eh=false", "-mexception-handling")
EH_LIBS = ("-lsetjmp",)
TOOLS = {"clang": "clang", "clang++": "clang++", "wasm-ld": "wasm-ld", "ar": "llvm-ar",
         "ranlib": "llvm-ranlib", "nm": "llvm-nm", "strip": "llvm-strip"}
IDENTITY_FILE = "wasmforge-toolchain.json"
Log = Callable[[str], None]


@dataclass(frozen=True)
class WasmOpt:
    """Binaryen's wasm-opt: how to run it, its version, and where it came from."""

    command: tuple[str, ...]
    version: str
    origin: str

    def identity(self) -> dict[str, str]:
        return {"version": self.version, "origin": self.origin}


@dataclass(frozen=True)
class Toolchain:
    kind: str
    root: Path
    reason: str
    clang_version: str
    libc: str
    has_setjmp: bool
    wrappers: Path
    target: str = TARGET
    wasm_opt: WasmOpt | None = None

    @property
    def sysroot(self) -> Path:
        return self.root / "share" / "wasi-sysroot"

    @property
    def clang_major(self) -> int:
        m = re.search(r"clang version (\d+)", self.clang_version)
        return int(m.group(1)) if m else 0

    def tool(self, name: str) -> str:
        return str(self.wrappers / f"{TARGET}-{name}") if name in ("clang", "clang++") else str(self.root / "bin" / TOOLS[name])

    def env(self) -> dict[str, str]:
        return {
            "CC": self.tool("clang"),
            "CXX": self.tool("clang++"),
            # No CPP: configure finds "$CC -E" itself, and records a CPP given in the environment
            # (PHP's configure line would name the wrappers' host directory).
            "LD": self.tool("wasm-ld"),
            "AR": self.tool("ar"),
            "RANLIB": self.tool("ranlib"),
            "NM": self.tool("nm"),
            "STRIP": self.tool("strip"),
            "WASI_SYSROOT": str(self.sysroot),
        }

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "clang": self.clang_version, "libc": self.libc, "target": self.target,
                "setjmp": self.has_setjmp, "wasm_opt": self.wasm_opt.identity() if self.wasm_opt else None}

    def describe(self) -> str:
        setjmp = ("yes (wasm exception handling, exnref encoding)" if self.has_setjmp
                  else "no (needs clang >= 20 and a wasi-libc with setjmp.h and libsetjmp.a)")
        return "\n".join([
            f"toolchain:  {self.kind}",
            f"chosen:     {self.reason}",
            f"root:       {self.root}",
            f"clang:      {self.clang_version}",
            f"wasi-libc:  {self.libc}",
            f"target:     {self.target}",
            f"sysroot:    {self.sysroot}",
            f"setjmp:     {setjmp}",
            "wasm-opt:   " + (f"{self.wasm_opt.version} ({self.wasm_opt.origin}): {' '.join(self.wasm_opt.command)}"
                              if self.wasm_opt else "not installed: outputs are not optimised (invoke toolchain --install)"),
        ])


def load_pins(config: Config) -> dict[str, Any]:
    return yaml.safe_load((config.toolchain_dir / "pins.yaml").read_text())


def sdk_source(config: Config, pins: dict[str, Any] | None = None) -> SourceSpec | None:
    """The pinned WASI SDK tarball for this host, or None when we have no pin for it."""
    pins = pins or load_pins(config)
    sdk = pins["wasi_sdk"]
    arch = platform.machine()
    sha = sdk["sha256"].get(arch)
    if not sha:
        return None
    return SourceSpec(sha256=sha, url=sdk["url"].format(arch=arch))


def _toolchains_dir(config: Config) -> Path:
    return config.cache_dir / "toolchains"


def find_toolchain(config: Config, *, environ: dict[str, str] | None = None) -> Toolchain:
    environ = dict(os.environ) if environ is None else environ
    if path := environ.get("WASI_SDK_PATH"):
        root = Path(path).expanduser()
        _check_layout(root, f"WASI_SDK_PATH={path}")
        return _make(config, "WASI_SDK_PATH", root, f"WASI_SDK_PATH is set to {path}")
    spec = sdk_source(config)
    if spec is not None:
        root = _toolchains_dir(config) / spec.file_name().removesuffix(".tar.gz")
        if (root / "bin" / "clang").exists():
            return _make(config, "wasi-sdk", root, f"the pinned WASI SDK is installed in {root}")
    debian = _debian_root(config)
    if debian is not None:
        return _make(config, "debian", debian, f"assembled from Debian packages in {debian} "
                     "(the pinned WASI SDK is not installed)")
    raise ToolchainError(
        "no WASI toolchain found",
        details="looked for: WASI_SDK_PATH (not set); the pinned WASI SDK in "
                f"{_toolchains_dir(config)} (not downloaded); a Debian-assembled toolchain (not assembled)",
        hint="run `invoke toolchain --install` (downloads the pinned WASI SDK, or assembles one from "
             "Debian packages when that cannot be downloaded), or set WASI_SDK_PATH to a WASI SDK (>= 22)",
    )


def _debian_root(config: Config) -> Path | None:
    base = _toolchains_dir(config)
    for candidate in sorted(base.glob("debian-*"), reverse=True):
        if (candidate / IDENTITY_FILE).exists() and (candidate / "bin" / "clang").exists():
            return candidate
    return None


def _check_layout(root: Path, origin: str) -> None:
    missing = [p for p in ("bin/clang", "bin/wasm-ld", "bin/llvm-ar", f"share/wasi-sysroot/include/{TARGET}",
                           f"share/wasi-sysroot/lib/{TARGET}") if not (root / p).exists()]
    if missing:
        raise ToolchainError(f"{origin} is not a usable WASI SDK: missing {', '.join(missing)}",
                             hint=f"point it at an official WASI SDK (>= 22, with the {TARGET} sysroot)")


def _make(config: Config, kind: str, root: Path, reason: str) -> Toolchain:
    _check_layout(root, str(root))
    clang = root / "bin" / "clang"
    try:
        out = subprocess.run([str(clang), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ToolchainError(f"{clang} does not run: {exc}",
                             hint="reinstall the toolchain: invoke toolchain --install") from exc
    clang_version = out.splitlines()[0].strip()
    sysroot = root / "share" / "wasi-sysroot"
    libc = _libc_version(root)
    major = int(m.group(1)) if (m := re.search(r"clang version (\d+)", clang_version)) else 0
    has_setjmp = (sysroot / "include" / TARGET / "setjmp.h").exists() and \
        (sysroot / "lib" / TARGET / "libsetjmp.a").exists() and major >= 20
    wrappers = _write_wrappers(config, root, sysroot)
    return Toolchain(kind=kind, root=root, reason=reason, clang_version=clang_version, libc=libc,
                     has_setjmp=has_setjmp, wrappers=wrappers, wasm_opt=find_wasm_opt(config))


def _libc_version(root: Path) -> str:
    ident = root / IDENTITY_FILE
    if ident.exists():
        return json.loads(ident.read_text()).get("libc", "unknown")
    version = root / "VERSION"
    if version.exists():
        lines = version.read_text().split()
        return "wasi-sdk " + " ".join(lines[:1]) + ("; " + " ".join(lines[1:]) if len(lines) > 1 else "")
    return "unknown (no VERSION file)"


def _write_wrappers(config: Config, root: Path, sysroot: Path) -> Path:
    """Wrapper scripts with the target and sysroot built in, in the cache (the SDK may be read-only)."""
    key = hashlib.sha256(f"{root.resolve()}|{sysroot}".encode()).hexdigest()[:16]
    directory = config.cache_dir / "wrappers" / key
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("clang", "clang++"):
        # Builds set WASMFORGE_CCACHE to compile through ccache: the compiler's name (CC) stays
        # the same with and without it, so nothing that records CC changes.
        command = f'"{root}/bin/{name}" --target={TARGET} --sysroot="{sysroot}" "$@"'
        script = (f'#!/bin/sh\nif [ -n "$WASMFORGE_CCACHE" ]; then exec "$WASMFORGE_CCACHE" {command}; fi\n'
                  f'exec {command}\n')
        path = directory / f"{TARGET}-{name}"
        if not path.exists() or path.read_text() != script:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(script)
            tmp.chmod(0o755)
            os.replace(tmp, path)
    return directory


# ----------------------------------------------------------------------------- C++

@dataclass(frozen=True)
class CxxLibrary:
    """The C++ standard library for WASI builds: libc++ and libc++abi, without exceptions or threads."""

    include: Path | None  # None: clang finds the headers in the sysroot (a WASI SDK)
    lib: Path | None
    identity: str  # what goes into the build key of a C++ build

    def cflags(self) -> list[str]:
        # libc++ for WASI is built without exceptions: C++ code compiled with them would need
        # __cxa_throw, which it lacks.
        flags = ["-fno-exceptions"]
        if self.include:
            flags = ["-nostdinc++", "-isystem", str(self.include), *flags]
        return flags


def cxx_library(config: Config, toolchain: Toolchain, *, log: Log = print) -> CxxLibrary:
    """libc++ for `toolchain`: the WASI SDK's own, or Debian's libc++-NN-dev-wasm32 (installed on first use)."""
    if (toolchain.sysroot / "include" / TARGET / "c++" / "v1").is_dir():
        return CxxLibrary(include=None, lib=None, identity=f"the sysroot's libc++ ({toolchain.kind})")
    if toolchain.kind != "debian":
        raise ToolchainError(f"the toolchain in {toolchain.root} has no C++ standard library for WASI",
                             hint="use a WASI SDK (it ships libc++) or the Debian toolchain: invoke toolchain --install")
    pins = load_pins(config)["debian"]
    packages = pins.get("cxx_packages", [])
    ensure_host_packages(packages, why="C++ for WASI (libc++)", log=log)
    llvm = Path(f"/usr/lib/llvm-{pins['llvm']}")
    # Debian's multiarch name for the target (the sysroot's is wasm32-wasip1: the same ABI).
    include, lib = llvm / "include" / "wasm32-wasi" / "c++" / "v1", llvm / "lib" / "wasm32-wasi"
    if not (include / "__config_site").is_file() or not (lib / "libc++.a").is_file():
        raise ToolchainError(f"{' '.join(packages)} are installed but {include} or {lib / 'libc++.a'} is missing",
                             hint=f"reinstall them: apt-get install --reinstall {' '.join(packages)}")
    return CxxLibrary(include=include, lib=lib,
                      identity=" ".join(f"{p} {_deb_version(p)}" for p in packages))


# ----------------------------------------------------------------------------- wasm-opt

TOOL_IDENTITY = "wasmforge-tool.json"


def _wasm_opt_dir(config: Config) -> Path:
    pin = load_pins(config)["wasm_opt"]
    return config.cache_dir / "tools" / f"{pin['package']}-{pin['version']}"


def find_wasm_opt(config: Config, *, environ: dict[str, str] | None = None) -> WasmOpt | None:
    """WASMFORGE_WASM_OPT if set, else the pinned npm build if installed and Node.js is there."""
    environ = dict(os.environ) if environ is None else environ
    if path := environ.get("WASMFORGE_WASM_OPT"):
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ToolchainError(f"WASMFORGE_WASM_OPT={path} does not run: {exc}",
                                 hint="point it at Binaryen's wasm-opt (>= 117), or unset it") from None
        return WasmOpt((path,), out.stdout.strip(), "WASMFORGE_WASM_OPT")
    ident = _wasm_opt_dir(config) / TOOL_IDENTITY
    node = shutil.which("node")
    if not ident.exists() or not node:
        return None
    data = json.loads(ident.read_text())
    return WasmOpt((node, str(ident.parent / "package" / "bin" / "wasm-opt")), data["version"], data["origin"])


def install_wasm_opt(config: Config, *, log: Log = print) -> WasmOpt:
    """Fetch the pinned wasm-opt from npm (`npm pack`), check its integrity, unpack it into the cache."""
    if found := find_wasm_opt(config):
        return found
    pin = load_pins(config)["wasm_opt"]
    spec = f"{pin['package']}@{pin['version']}"
    npm, node = shutil.which("npm"), shutil.which("node")
    if not npm or not node:
        raise ToolchainError(f"the pinned wasm-opt ({spec} from npm) needs Node.js and npm, which are not installed",
                             hint="apt-get install nodejs npm, or set WASMFORGE_WASM_OPT to a wasm-opt (Binaryen >= 117)")
    dest = _wasm_opt_dir(config)

    def unpack(staging: Path) -> str:
        log(f"fetching wasm-opt: npm pack {spec}")
        tarball = npm_pack(npm, spec, pin["integrity"], staging, hint="or set WASMFORGE_WASM_OPT")
        extract_archive(tarball, staging / "tree")
        (staging / "tree").rename(staging / "package")
        tarball.unlink()
        return f"npm {spec}, {pin['integrity'][:20]}..."

    assemble_tool(dest, unpack, lambda staging: [node, str(staging / "package" / "bin" / "wasm-opt"), "--version"],
                  lambda origin, reported: {"version": reported, "origin": origin}, TOOL_IDENTITY,
                  hint="Node.js >= 18 is needed")
    log(f"wasm-opt installed in {dest}")
    found = find_wasm_opt(config)
    assert found is not None
    return found


# ----------------------------------------------------------------------------- provisioning

def install_toolchain(config: Config, *, source: str = "auto", log: Log = print) -> Toolchain:
    """Provision a toolchain: the pinned WASI SDK, or one assembled from Debian packages; and wasm-opt."""
    try:
        install_wasm_opt(config, log=log)
    except ToolchainError as exc:
        # Builds work without it (their outputs are not optimised, and they say so).
        log(f"warning: wasm-opt was not installed: {exc.render()}")
    if source in ("auto", "sdk"):
        try:
            return install_sdk(config, log=log)
        except (SourceError, ToolchainError) as exc:
            if source == "sdk":
                raise
            log(f"the pinned WASI SDK cannot be had here ({exc.what}); assembling one from Debian packages")
    return install_debian(config, log=log)


def install_sdk(config: Config, *, spec: SourceSpec | None = None, log: Log = print) -> Toolchain:
    spec = spec or sdk_source(config)
    if spec is None:
        raise ToolchainError(f"no pinned WASI SDK for this machine ({platform.machine()})",
                             hint="add its sha256 to toolchain/pins.yaml, set WASI_SDK_PATH, or use --from debian")
    root = _toolchains_dir(config) / spec.file_name().removesuffix(".tar.gz")
    if not (root / "bin" / "clang").exists():
        log(f"downloading {spec.url}")
        fetched = fetch_one(spec, config, log=log)
        if root.exists():
            shutil.rmtree(root)
        extract_source(fetched, root)
    return _make(config, "wasi-sdk", root, f"the pinned WASI SDK is installed in {root}")


def install_debian(config: Config, *, log: Log = print) -> Toolchain:
    pins = load_pins(config)["debian"]
    llvm = pins["llvm"]
    ensure_host_packages(pins["packages"], why="the WASI toolchain", log=log)
    libc_pin = pins["wasi_libc"]
    archive = DebianArchive(config.cache_dir / "apt")
    deb = archive.binary_file(libc_pin["package"], libc_pin["suite"])
    libc_version = deb.name.split("_")[1]
    root = _toolchains_dir(config) / f"debian-llvm{llvm}-wasi-libc-{libc_version.replace('~', '_')}"
    if (root / IDENTITY_FILE).exists():
        return _make(config, "debian", root, f"assembled from Debian packages in {root}")
    deb_path = fetch_deb(config, deb, libc_pin["suite"], log)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".assemble-"))
    try:
        unpacked = staging / "deb"
        subprocess.run(["dpkg-deb", "-x", str(deb_path), str(unpacked)], check=True, capture_output=True)
        tree = staging / "sdk"
        (tree / "bin").mkdir(parents=True)
        for name, tool in {"clang": f"clang-{llvm}", "clang++": f"clang++-{llvm}", "wasm-ld": f"wasm-ld-{llvm}",
                           "llvm-ar": f"llvm-ar-{llvm}", "llvm-ranlib": f"llvm-ranlib-{llvm}",
                           "llvm-nm": f"llvm-nm-{llvm}", "llvm-strip": f"llvm-strip-{llvm}"}.items():
            found = shutil.which(tool)
            if not found:
                raise ToolchainError(f"{tool} not found after installing {' '.join(pins['packages'])}")
            (tree / "bin" / name).symlink_to(found)
        # trixie's wasi-libc names its multiarch directories wasm32-wasi; clang 22 looks for
        # wasm32-wasip1 (the same ABI), so the sysroot uses that name.
        sysroot = tree / "share" / "wasi-sysroot"
        for kind in ("include", "lib"):
            (sysroot / kind).mkdir(parents=True)
            shutil.copytree(unpacked / "usr" / kind / "wasm32-wasi", sysroot / kind / TARGET, symlinks=True)
        clang_pkg = _deb_version(f"clang-{llvm}")
        (tree / IDENTITY_FILE).write_text(json.dumps({
            "libc": f"wasi-libc {libc_version} (Debian {libc_pin['suite']})",
            "clang_package": f"clang-{llvm} {clang_pkg}",
        }, indent=2))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tree, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"assembled a WASI toolchain in {root}")
    return _make(config, "debian", root, f"assembled from Debian packages in {root}")


def fetch_deb(config: Config, deb: RemoteFile, suite: str, log: Log) -> Path:
    """A .deb in our cache, checked against the sha256 Debian's signed index gives (again at every use)."""
    deb_path = config.cache_dir / "debs" / deb.name
    if deb_path.is_file() and file_sha256(deb_path) != deb.sha256:
        log(f"{deb_path} does not match Debian's sha256 any more; fetching it again")
        deb_path.unlink()
    if not deb_path.exists():
        log(f"downloading {deb.name} ({suite}) from Debian's archive")
        download_file(deb.url, deb.sha256, deb_path, log=log, deadline=config.download_deadline)
    return deb_path


def debian_tool(config: Config, name: str, *, log: Log = print) -> Path:
    """A statically linked tool from a newer Debian suite (`debian.tools` in toolchain/pins.yaml: oras from
    trixie), unpacked into the cache without touching the system; its path."""
    pin = load_pins(config)["debian"].get("tools", {}).get(name)
    if not isinstance(pin, dict):
        raise ToolchainError(f"no pinned Debian tool named {name!r}", where=str(config.toolchain_dir / "pins.yaml"))
    archive = DebianArchive(config.cache_dir / "apt")
    deb = archive.binary_file(pin["package"], pin["suite"])
    root = _toolchains_dir(config).parent / "tools" / deb.name.removesuffix(".deb")
    binary = root / pin["binary"]
    if binary.is_file():
        return binary
    deb_path = fetch_deb(config, deb, pin["suite"], log)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".unpack-"))
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb_path), str(staging)], check=True, capture_output=True)
        if not (staging / pin["binary"]).is_file():
            raise ToolchainError(f"{deb.name} has no {pin['binary']}", where=str(config.toolchain_dir / "pins.yaml"))
        os.replace(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return binary


def assemble_tool(dest: Path, unpack: Callable[[Path], str], probe: Callable[[Path], list[str]],
                  identity: Callable[[str, str], dict[str, Any]], identity_file: str, *, hint: str = "") -> None:
    """Put a fetched tool into `dest` whole or not at all: `unpack` fills a directory beside it (and says
    where the files came from), `probe` is the command that must start there (`--version`: what it
    reports goes into the identity file), and the directory is renamed into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".assemble-"))
    try:
        origin = unpack(staging)
        argv = probe(staging)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise ToolchainError(f"{dest.name} does not start ({Path(argv[-2]).name} --version)",
                                 details=(result.stderr or result.stdout)[-2000:], hint=hint)
        (staging / identity_file).write_text(json.dumps(identity(origin, result.stdout.strip()), indent=2))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def npm_pack(npm: str, spec: str, integrity: str, directory: Path, *, hint: str = "") -> Path:
    """`npm pack spec` into `directory`: the package tarball, once it matches the pinned `integrity`
    (npm's "sha512-<base64>")."""
    result = subprocess.run([npm, "pack", spec, "--silent", "--pack-destination", str(directory)],
                            capture_output=True, text=True, timeout=900)
    tarballs = list(directory.glob("*.tgz"))
    if result.returncode != 0 or len(tarballs) != 1:
        raise ToolchainError(f"npm pack {spec} failed (exit code {result.returncode})",
                             details=(result.stderr or result.stdout)[-2000:],
                             hint=f"check that npm can reach its registry{', ' + hint if hint else ''}")
    algorithm, expected = integrity.split("-", 1)
    hasher = hashlib.new(algorithm)
    with tarballs[0].open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    digest = base64.b64encode(hasher.digest()).decode()
    if digest != expected:
        raise ToolchainError(f"{tarballs[0].name} does not match the pinned integrity",
                             details=f"expected {integrity}\ngot      {algorithm}-{digest}",
                             hint="the file npm served is not the pinned one: nothing was installed")
    return tarballs[0]


def npm_project(config: Config, project: Path, *, log: Log = print) -> Path:
    """An npm project of the checkout (package.json, a package-lock.json with every package's integrity,
    its scripts) installed into the cache with `npm ci`, which checks each package against the lock and
    runs no install scripts; the installed directory, named by a digest of the project's files."""
    npm = shutil.which("npm")
    if not npm or not shutil.which("node"):
        raise ToolchainError(f"{project.name} needs Node.js and npm, which are not installed", hint="apt-get install nodejs npm")
    lock = project / "package-lock.json"
    if not lock.is_file() or not (project / "package.json").is_file():
        raise ToolchainError(f"{project} has no package.json and package-lock.json", hint="an npm project pins every package in its lock")
    files = sorted(p for p in project.iterdir() if p.is_file())
    digest = hashlib.sha256(b"".join(p.name.encode() + b"\0" + file_sha256(p).encode() for p in files)).hexdigest()
    dest = config.cache_dir / "tools" / f"{project.name}-{digest[:16]}"
    if (dest / TOOL_IDENTITY).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".npm-"))
    try:
        for p in files:
            shutil.copyfile(p, staging / p.name)
        log(f"installing {project.name} with npm ci (pinned by {lock})")
        try:
            result = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                                    cwd=staging, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise ToolchainError(f"npm ci of {project.name} took more than 15 minutes",
                                 hint="check that npm can reach its registry") from None
        if result.returncode != 0:
            raise ToolchainError(f"npm ci of {project.name} failed (exit code {result.returncode})",
                                 details=(result.stderr or result.stdout)[-2000:],
                                 hint="check that npm can reach its registry; EINTEGRITY means a package is not the pinned one")
        (staging / TOOL_IDENTITY).write_text(json.dumps({"project": str(project.name), "files": digest}))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def deb_installed(package: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return result.returncode == 0 and "install ok installed" in result.stdout


def _deb_version(package: str) -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


# ----------------------------------------------------------------------------- the build machine

@dataclass(frozen=True)
class HostToolchain:
    """The build machine's own C compiler, for native reference builds (--native)."""

    cc: str
    clang_version: str
    target: str
    kind: str = "host"
    libc: str = "the build machine's libc"
    has_setjmp: bool = True
    reason: str = "native build: the build machine's compiler"

    @property
    def sysroot(self) -> Path:
        return Path("/")

    def tool(self, name: str) -> str:
        return {"clang": self.cc, "clang++": "c++", "wasm-ld": "ld", "ar": "ar", "ranlib": "ranlib",
                "nm": "nm", "strip": "strip"}[name]

    def env(self) -> dict[str, str]:
        return {"CC": self.cc, "CXX": "c++", "CPP": f"{self.cc} -E", "LD": "ld", "AR": "ar",
                "RANLIB": "ranlib", "NM": "nm", "STRIP": "strip"}

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "cc": self.clang_version, "target": self.target}

    def describe(self) -> str:
        return f"toolchain:  host\ncc:         {self.clang_version}\ntarget:     {self.target}"


def ensure_host_packages(packages: list[str] | tuple[str, ...], *, why: str = "the native build",
                         log: Log = print) -> None:
    """Install the Debian packages that `why` needs (as root), or say how to.

    One install at a time: builds running in parallel in this process wait for each other, and apt
    waits for dpkg's lock when another process (another build, the user's apt) holds it."""
    if not [p for p in packages if not deb_installed(p)]:
        return
    with _APT_LOCK:
        _install_host_packages(packages, why=why, log=log)


# Serialises the installs of this process (parallel builds of one `invoke build`).
_APT_LOCK = threading.Lock()
# How long apt-get waits for dpkg's lock held by another process before it gives up.
DPKG_LOCK_TIMEOUT = 600


def _install_host_packages(packages: list[str] | tuple[str, ...], *, why: str, log: Log) -> None:
    missing = [p for p in packages if not deb_installed(p)]  # again: a build before us may have installed them
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ToolchainError(f"{why} needs these Debian packages: {' '.join(missing)}",
                             hint=f"install them: sudo apt-get install -y {' '.join(missing)}")
    log(f"installing {' '.join(missing)} for {why} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "-o", f"DPkg::Lock::Timeout={DPKG_LOCK_TIMEOUT}", "install", "-y", "-q", *missing]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        # A machine that never ran `apt-get update` has no package lists yet.
        subprocess.run(["apt-get", "-o", f"DPkg::Lock::Timeout={DPKG_LOCK_TIMEOUT}", "update", "-q"],
                       capture_output=True, env=env)
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise ToolchainError("apt-get install failed", details="\n".join(result.stderr.splitlines()[-8:]),
                             hint=f"run: apt-get update && apt-get install -y {' '.join(missing)}")


def host_packages(config: Config, book: RecipeBook) -> list[str]:
    """The Debian packages builds may install (what bootstrap.sh installs up front): the WASI toolchain's
    from its pins, and every recipe's `build.host_packages` (flavors' too) and `native.packages`."""
    pins = load_pins(config).get("debian", {})
    found = [*pins.get("packages", []), *pins.get("cxx_packages", [])]
    for recipe in book.recipes.values():
        found += recipe.build.get("host_packages", [])
        for flavor in recipe.flavors.values():
            found += flavor.get("build", {}).get("host_packages", [])
        found += recipe.native.get("packages", [])
        found += recipe.native.get("build", {}).get("host_packages", [])
    return list(dict.fromkeys(str(p) for p in found))


def host_toolchain() -> HostToolchain:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise ToolchainError("native builds need a C compiler on the build machine",
                             hint="install one: apt-get install build-essential")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0].strip()
    triple = subprocess.run([cc, "-dumpmachine"], capture_output=True, text=True).stdout.strip()
    return HostToolchain(cc=cc, clang_version=version, target=triple)
