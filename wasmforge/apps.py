"""Applications for `invoke serve --app NAME`: a site assembled from the pinned packages that
`apps/NAME.yaml` names, into a state directory, and installed there on its first start.

The recipe says where every file comes from (Debian binary packages by version and sha256, npm
packages by integrity, zips inside them by sha256), what to leave out, what to write, which
directories PHP may write, and the request that installs the application. Links inside the Debian
packages are replaced by the files they lead to, and only when those are inside the unpacked
packages: the site is plain files, the same in wasm and natively.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from .config import Config
from .errors import RecipeError, SourceError, WasmforgeError
from .outputs import plain_relative
from .verified import file_sha256

SITE = "site"
MARKER = ".wasmforge-app.json"
MAX_UNZIPPED = 256 << 20


@dataclass(frozen=True)
class App:
    name: str
    version: str
    file: Path
    spec: dict[str, Any]

    @property
    def site(self) -> dict[str, Any]:
        return self.spec["site"]

    def digest(self) -> str:
        return file_sha256(self.file)


def load_app(apps_dir: Path, name: str) -> App:
    """apps/NAME.yaml, checked for the keys the assembly reads."""
    known = sorted(p.stem for p in apps_dir.glob("*.yaml"))
    file = apps_dir / f"{name}.yaml"
    if not plain_relative(name) or "/" in name or not file.is_file():
        raise WasmforgeError(f"no application named {name!r}", hint=f"applications: {', '.join(known) or 'none'}")
    try:
        spec = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"not valid YAML: {exc}", where=str(file)) from None

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise RecipeError(f"the application recipe needs {what}", where=str(file))

    need(isinstance(spec, dict) and spec.get("name") == name, f"name: {name}")
    need(isinstance(spec.get("version"), str), "a version (a string)")
    debian = spec.get("debian", {})
    need(isinstance(debian, dict) and isinstance(debian.get("suite", ""), str)
         and all(isinstance(p, dict) and {"package", "version", "sha256"} <= set(p)
                 for p in debian.get("packages", [])), "debian: {suite, packages: [{package, version, sha256}]}")
    need(all(isinstance(p, dict) and {"package", "version", "integrity"} <= set(p) for p in spec.get("npm", [])),
         "npm: [{package, version, integrity}]")
    site = spec.get("site")
    need(isinstance(site, dict) and isinstance(site.get("from"), str) and plain_relative(site["from"]),
         "site: {from: a relative path in the unpacked packages}")
    paths = [*site.get("leave_out", []), *site.get("writable", []), *site.get("files", {}),
             *(u.get("to", "") for u in site.get("unzip", [])),
             *(p for c in site.get("copy", []) for p in (c.get("from", ""), c.get("to", "")))]
    need(all(isinstance(p, str) and plain_relative(p) for p in paths),
         "relative paths inside the site (no /, .., or empty parts) in leave_out, writable, files, unzip and copy")
    need(all(isinstance(u, dict) and {"archive", "sha256", "to"} <= set(u) for u in site.get("unzip", [])),
         "site.unzip: [{archive, sha256, to}]")
    install = spec.get("install")
    need(isinstance(install, dict) and isinstance(install.get("post"), str) and install["post"].startswith("/")
         and isinstance(install.get("form"), dict), "install: {post: /PATH, form: {...}, expect: TEXT}")
    need(all(isinstance(s, str) and s.isidentifier() for s in spec.get("secrets", [])), "secrets: [NAME...]")
    return App(name, spec["version"], file, spec)


def prepare_site(app: App, config: Config, state: Path, log: Any) -> Path:
    """The site in `state`/site, assembled unless it is there for this very recipe; its path."""
    site = state / SITE
    marker = site / MARKER
    try:
        if json.loads(marker.read_text()).get("recipe") == app.digest():
            _write_secrets(app, state)
            return site
    except (OSError, ValueError, AttributeError):
        pass
    state.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=state, prefix=".assemble-"))
    try:
        built = _assemble(app, config, staging, log)
        (built / MARKER).write_text(json.dumps({"app": app.name, "version": app.version, "recipe": app.digest()}))
        if site.exists():
            # A site from another recipe: its uploads are kept, the rest is replaced.
            for rel in app.site.get("writable", []):
                if (site / rel).is_dir():
                    shutil.rmtree(built / rel)
                    os.replace(site / rel, built / rel)
            shutil.rmtree(site)
        os.replace(built, site)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _write_secrets(app, state)
    log(f"{app.name} {app.version}: site assembled in {site}")
    return site


def _assemble(app: App, config: Config, work: Path, log: Any) -> Path:
    from .debian_archive import DebianArchive
    from .extract import extract_archive
    from .toolchain import fetch_deb, npm_pack

    root = work / "packages"
    root.mkdir()
    debian = app.spec.get("debian", {})
    archive = DebianArchive(config.cache_dir / "apt")
    for pin in debian.get("packages", []):
        remote = archive.binary_file(pin["package"], debian["suite"], pin["version"])
        if remote.sha256 != pin["sha256"]:
            raise SourceError(f"Debian's {remote.name} is not the one {app.file.name} pins",
                              where=str(app.file), details=f"expected {pin['sha256']}\ngot      {remote.sha256}")
        deb = fetch_deb(config, remote, debian["suite"], log)
        result = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True)
        if result.returncode != 0:
            raise SourceError(f"cannot unpack {deb.name}", where=str(deb), details=result.stderr[-2000:])
    npm_dirs: dict[str, Path] = {}
    npm = shutil.which("npm")
    for pin in app.spec.get("npm", []):
        if not npm:
            raise WasmforgeError(f"{app.name} needs npm to fetch {pin['package']}", hint="apt-get install npm")
        packed = work / f"npm-{len(npm_dirs)}"
        packed.mkdir()
        log(f"fetching {pin['package']}@{pin['version']} from npm's registry")
        tarball = npm_pack(npm, f"{pin['package']}@{pin['version']}", pin["integrity"], packed)
        npm_dirs[pin["package"]] = extract_archive(tarball, packed / "package")
    site_spec = app.site
    site = work / SITE
    _copy_resolved(root, root / site_spec["from"], site, set(site_spec.get("leave_out", [])))
    for item in site_spec.get("unzip", []):
        _unzip(_npm_file(item["archive"], npm_dirs, app), item["sha256"], item.get("top"), site / item["to"], app)
    for item in site_spec.get("copy", []):
        source = site / item["from"]
        if not source.is_file():
            raise RecipeError(f"site.copy: {item['from']} is not a file of the site", where=str(app.file))
        (site / item["to"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, site / item["to"])
    for rel, text in site_spec.get("files", {}).items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    for rel in site_spec.get("writable", []):
        (site / rel).mkdir(parents=True, exist_ok=True)
    return site


def _copy_resolved(root: Path, top: Path, dest: Path, leave_out: set[str]) -> None:
    """Copy the tree `top` to `dest`, each link replaced by what it leads to inside `root` (an absolute
    target is read as a path in `root`: the packages' own file system); a link leading elsewhere or
    nowhere is an error unless left out."""
    if not top.is_dir():
        raise SourceError(f"the packages have no {top.relative_to(root)}")
    for directory, subdirs, files in os.walk(top):
        base = Path(directory)
        for name in sorted(subdirs + files):
            path = base / name
            rel = path.relative_to(top).as_posix()
            if rel in leave_out:
                if name in subdirs:
                    subdirs.remove(name)
                continue
            real = _inside(root, path)
            if real is None:
                raise SourceError(f"{rel} links to {os.readlink(path)!r}, which is not in the packages",
                                  hint="leave it out (site.leave_out) or add the package that has it")
            target = dest / rel
            if real.is_dir():
                if path.is_symlink():  # its files, each resolved in turn: os.walk does not go through links
                    _copy_resolved(root, real, target, set())
                else:
                    target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(real, target)


def _inside(root: Path, path: Path, hops: int = 40) -> Path | None:
    """Where `path` leads, following links with `root` as their file system; None if it leaves it."""
    for _ in range(hops):
        if not path.is_symlink():
            return path if path.exists() else None
        link = os.readlink(path)
        path = Path(os.path.normpath(root / link.lstrip("/") if link.startswith("/") else path.parent / link))
        if path != root and root not in path.parents:
            return None
    return None


def _npm_file(reference: str, npm_dirs: dict[str, Path], app: App) -> Path:
    """`npm:<package>/<path>`: a file of a fetched npm package."""
    body = reference.removeprefix("npm:")
    for package, directory in npm_dirs.items():
        if body.startswith(package + "/"):
            rel = body[len(package) + 1:]
            if plain_relative(rel) and (directory / rel).is_file():
                return directory / rel
    raise RecipeError(f"{reference} is not a file of the npm packages it names", where=str(app.file))


def _unzip(archive: Path, sha256: str, top: str | None, dest: Path, app: App) -> None:
    """Extract a zip checked against `sha256`: regular files and directories only, inside `dest`,
    its single `top` directory dropped, at most MAX_UNZIPPED bytes."""
    if file_sha256(archive) != sha256:
        raise SourceError(f"{archive.name} does not match the sha256 {app.file.name} pins", where=str(archive))
    written = 0
    with zipfile.ZipFile(archive) as zipped:
        for info in zipped.infolist():
            parts = PurePosixPath(info.filename).parts
            if top:
                if not parts or parts[0] != top:
                    raise SourceError(f"{info.filename} is outside its top directory {top}", where=str(archive))
                parts = parts[1:]
            if not parts:
                continue
            rel = "/".join(parts)
            mode = info.external_attr >> 16
            if not plain_relative(rel) or "\\" in rel or (mode and (mode & 0o170000) not in (0, 0o100000, 0o040000)):
                raise SourceError(f"unsafe member {info.filename!r} (a link, device or path out)", where=str(archive))
            written += info.file_size
            if written > MAX_UNZIPPED:
                raise SourceError(f"{archive.name} unpacks to more than {MAX_UNZIPPED >> 20} MiB", where=str(archive))
            target = dest / rel
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zipped.open(info) as src, open(target, "xb") as out:
                shutil.copyfileobj(src, out)


def _write_secrets(app: App, state: Path) -> None:
    """state/secrets.php: the recipe's secrets as PHP constants, made once (mode 0600)."""
    file = state / "secrets.php"
    names = app.spec.get("secrets", [])
    if file.exists() or not names:
        return
    lines = ["<?php", "// Made once by wasmforge for this state directory; keep it private."]
    lines += [f"define('{name}', '{secrets.token_hex(32)}');" for name in names]
    tmp = state / ".secrets.php.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(tmp, file)


def install(app: App, url: str, state: Path, log: Any) -> str | None:
    """Run the application's installer through the server at `url` once per state directory; the new
    administrator's password, or None when it was installed before."""
    import requests

    done = state / "installed.json"
    if done.exists():
        return None
    spec = app.spec["install"]
    password = secrets.token_urlsafe(18)
    form = {k: str(v).replace("{password}", password) for k, v in spec["form"].items()}
    log(f"{app.name}: installing (POST {spec['post']})")
    answer = requests.post(url.rstrip("/") + spec["post"], data=form, timeout=300, allow_redirects=False)
    if answer.status_code != 200 or (spec.get("expect") and spec["expect"] not in answer.text):
        raise WasmforgeError(f"{app.name}'s installer answered {answer.status_code} without "
                             f"{spec.get('expect')!r}", details=answer.text[-1500:],
                             hint="the server's log above has PHP's errors; the state directory is unchanged "
                                  "except its database: remove it to start again")
    fd = os.open(state / "admin-password", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    done.write_text(json.dumps({"app": app.name, "version": app.version, "user": spec.get("user")}))
    return password
