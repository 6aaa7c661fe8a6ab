"""The explicit configuration object passed down to every stage (no global state)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# Re-exported: the stages and tasks.py import them from here.
from .settings import MAX_SECONDS, default_cache_dir, positive_number  # noqa: F401

# How long one file may take to download before it is given up on (WASMFORGE_DOWNLOAD_DEADLINE).
DEFAULT_DOWNLOAD_DEADLINE = 1800.0


def project_root() -> Path:
    """The checkout that holds recipes/, patches/ and toolchain/."""
    return Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Config:
    root: Path = field(default_factory=project_root)
    output_dir: Path | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Local directories or base URLs searched for source files before upstream.
    mirrors: tuple[str, ...] = ()
    # Whether a miss at upstream may fall back to Debian's source archive.
    use_debian_archive: bool = True
    # The artifact store (finished builds by key); default: <cache_dir>/artifacts.
    store_dir: Path | None = None
    # Compile through ccache when it is installed.
    use_ccache: bool = True
    # Keep debug information in output modules (wasm-opt strips it otherwise).
    debug: bool = False
    # Seconds one download may take in all (a trickling server is given up on).
    download_deadline: float = DEFAULT_DOWNLOAD_DEADLINE
    # A shared build cache on an OCI registry (oci://HOST[:PORT]/REPO), and whether builds push to it.
    remote_cache: str | None = None
    push_cache: bool = False

    def __post_init__(self) -> None:
        # Accept strings for paths (e.g. from the command line or a script).
        for name in ("root", "output_dir", "cache_dir", "store_dir"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "mirrors", tuple(self.mirrors))

    @classmethod
    def from_env(cls, root: Path | None = None, **overrides: object) -> Config:
        root = root or project_root()
        mirrors = tuple(m for m in re.split(r"[\s,]+", os.environ.get("WASMFORGE_MIRRORS", "")) if m)
        values: dict[str, object] = {"root": root, "mirrors": mirrors}
        if out := os.environ.get("WASMFORGE_OUTPUT"):
            values["output_dir"] = Path(out)
        if store := os.environ.get("WASMFORGE_STORE"):
            values["store_dir"] = Path(store)
        if os.environ.get("WASMFORGE_NO_DEBIAN_ARCHIVE"):
            values["use_debian_archive"] = False
        if os.environ.get("WASMFORGE_NO_CCACHE"):
            values["use_ccache"] = False
        if deadline := os.environ.get("WASMFORGE_DOWNLOAD_DEADLINE"):
            values["download_deadline"] = positive_number("WASMFORGE_DOWNLOAD_DEADLINE", deadline)
        if remote := os.environ.get("WASMFORGE_REMOTE_CACHE"):
            values["remote_cache"] = remote
        # Pushing is on by default in CI (where shared builds come from); WASMFORGE_PUSH_CACHE=0/1 decides.
        push = os.environ.get("WASMFORGE_PUSH_CACHE")
        values["push_cache"] = push not in ("", "0", "no", "false") if push is not None else bool(os.environ.get("CI"))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    @property
    def recipes_dir(self) -> Path:
        return self.root / "recipes"

    @property
    def apps_dir(self) -> Path:
        return self.root / "apps"

    @property
    def patches_dir(self) -> Path:
        return self.root / "patches"

    @property
    def toolchain_dir(self) -> Path:
        return self.root / "toolchain"

    @property
    def outputs(self) -> Path:
        return self.output_dir or (self.root / "build-output")

    @property
    def artifacts(self) -> Path:
        return self.store_dir or (self.cache_dir / "artifacts")

    @property
    def source_cache(self) -> Path:
        return self.cache_dir / "sources"
