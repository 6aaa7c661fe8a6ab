"""Where finished builds are (build-output/<pkg>/<version>, a link to a store entry), for the commands
that use them. Light on purpose: `invoke run` imports this, not the build machinery."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Config
from .errors import WasmforgeError
from .recipe import Package
from .store import MANIFEST, entry_containing


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
    out = output_dir(config, package)
    manifest = read_manifest(out)
    if manifest is None:
        raise WasmforgeError(f"{package.target} is not built (no {out / MANIFEST})",
                             hint=f"build it first: invoke build {package.target}")
    found = entry_containing(out)
    if found is None or found[0].entry(found[1]) != out.resolve():
        raise WasmforgeError(f"{out} is not an artifact store entry (made by an older wasmforge?)",
                             hint=f"rebuild it: invoke build {package.target}")
    store, key = found
    if problem := store.problem(key):
        raise WasmforgeError(f"the stored build of {package.target} is damaged: {problem}", where=str(store.entry(key)),
                             hint=f"nothing was run; `invoke build {package.target}` discards it and builds again")
    return out, read_manifest(out) or manifest
