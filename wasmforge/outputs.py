"""Where finished builds are (build-output/<pkg>/<version>, a link to a store entry), for the commands
that use them. Light on purpose: `invoke run` imports this, not the build machinery (nor the recipes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config
from .errors import WasmforgeError
from .store import MANIFEST, entry_containing

if TYPE_CHECKING:
    from .recipe import Package


def output_dir(config: Config, package: Package) -> Path:
    return config.outputs / package.name / package.output_key


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def stored_output(config: Config, package: Package) -> tuple[Path, dict[str, Any]]:
    """build-output/<pkg>/<version> and its manifest, for commands that use a finished build: the store
    entry it points to is verified first (every file, nothing extra), and a damaged one is refused."""
    return verified_output(output_dir(config, package), package.target)


def verified_output(out: Path, target: str) -> tuple[Path, dict[str, Any]]:
    """`out` (the output directory of `target`) and its manifest, once the store entry it links to verifies."""
    manifest = read_manifest(out)
    if manifest is None:
        raise WasmforgeError(f"{target} is not built (no {out / MANIFEST})",
                             hint=f"build it first: invoke build {target}")
    found = entry_containing(out)
    if found is None or found[0].entry(found[1]) != out.resolve():
        raise WasmforgeError(f"{out} is not an artifact store entry (made by an older wasmforge?)",
                             hint=f"rebuild it: invoke build {target}")
    store, key = found
    if problem := store.problem(key):
        raise WasmforgeError(f"the stored build of {target} is damaged: {problem}", where=str(store.entry(key)),
                             hint=f"nothing was run; `invoke build {target}` discards it and builds again")
    return out, read_manifest(out) or manifest


def built_target(config: Config, target: str) -> tuple[Path, dict[str, Any]] | None:
    """The finished WASI build that `target` names exactly as `invoke build` prints it (NAME-VERSION or
    NAME-VERSION-FLAVOR), found by the manifest of build-output/NAME/VERSION[-FLAVOR] without reading the
    recipes, and verified as stored_output verifies it. None when no such build is there (a target
    without a version, a native build, one not built): the caller then resolves it through the recipes."""
    parts = target.split("-")
    for i in range(len(parts) - 1, 0, -1):  # the longest name first, as RecipeBook.parse_target
        name, output_key = "-".join(parts[:i]), "-".join(parts[i:])
        if not (_plain(name) and _plain(output_key)):
            continue
        out = config.outputs / name / output_key
        manifest = read_manifest(out)
        if (manifest is None or manifest.get("target") != target or manifest.get("name") != name
                or manifest.get("native") is not False or not isinstance(manifest.get("version"), str)):
            continue
        flavor = manifest.get("flavor")
        if output_key == manifest["version"] + (f"-{flavor}" if isinstance(flavor, str) and flavor else ""):
            return verified_output(out, target)
    return None


def _plain(name: str) -> bool:
    """A single path component: no separator, not `.` or `..`, nothing hidden."""
    return bool(name) and "/" not in name and "\0" not in name and not name.startswith(".")


def run_defaults(out: Path, manifest: dict[str, Any], program: str) -> tuple[list[tuple[str, Path]], dict[str, str],
                                                                            list[str]]:
    """How the manifest of the build in `out` says to start `program`: the build's own directories to
    preopen read-only (guest path, host directory), its environment, and the arguments before a script.

    The manifest is store content: each directory must be a plain relative path that stays inside the
    build once links are followed, or nothing is run."""
    spec = manifest.get("run", {}).get(program) if isinstance(manifest.get("run"), dict) else None
    if spec is None:
        return [], {}, []
    dirs, env, script = (spec.get(k) if isinstance(spec, dict) else None for k in ("dirs", "env", "script"))
    if not (isinstance(dirs, dict) and isinstance(env, dict) and isinstance(script, list)
            and all(isinstance(v, str) for v in [*dirs, *dirs.values(), *env, *env.values(), *script])):
        raise WasmforgeError(f"the manifest of {out} has a malformed run entry for {program!r}",
                             where=str(out / MANIFEST), hint="rebuild it: invoke build --force ...")
    preopens = []
    for guest, rel in dirs.items():
        host = directory_of_build(out, rel)
        if not guest.startswith("/") or host is None:
            raise WasmforgeError(f"the manifest of {out} asks to preopen {rel!r} at {guest!r}, "
                                 "which is not a directory inside the build", where=str(out / MANIFEST),
                                 hint="nothing was run; rebuild it: invoke build --force ...")
        preopens.append((guest, host))
    return preopens, dict(env), list(script)


def directory_of_build(out: Path, rel: str) -> Path | None:
    """The directory `rel` of the build installed in `out`, resolved; None unless `rel` is a plain
    relative path that names a directory and stays inside the build once links are followed (a build
    is store content: a link in it must not make a preopen of some other directory of the machine)."""
    if not plain_relative(rel):
        return None
    host = (out / rel).resolve()
    return host if host.is_relative_to(out.resolve()) and host.is_dir() else None


def plain_relative(value: str) -> bool:
    """A relative path that stays where it starts: no leading /, no empty, . or .. parts, no NUL."""
    return bool(value) and not value.startswith("/") and "\0" not in value and \
        not any(p in ("", ".", "..") for p in value.split("/"))
