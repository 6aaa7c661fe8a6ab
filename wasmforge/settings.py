"""What the environment and the command line say, checked: the cache directory, positive numbers.

Light on purpose (no dataclasses): starting a module (run.py, runtime.py, verified.py) imports this, not
config.py, whose Config the other stages are given."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import WasmforgeError


def default_cache_dir() -> Path:
    if env := os.environ.get("WASMFORGE_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wasmforge"


# The longest timeout we accept (about 31 years, as wasmforge-run): the timers under it take no more.
MAX_SECONDS = 1e9


def positive_number(name: str, text: str | float | int, *, integer: bool = False, allow_zero: bool = False,
                    maximum: float | None = None) -> float:
    """A command-line or environment number, refused with one message unless it is positive (and finite,
    and at most `maximum`)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise WasmforgeError(f"{name}: {text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")) or value < 0 or (value == 0 and not allow_zero):
        raise WasmforgeError(f"{name}: {text!r} must be a positive number")
    if maximum is not None and value > maximum:
        raise WasmforgeError(f"{name}: {text!r} is too large (at most {maximum:g})")
    if integer and value != int(value):
        raise WasmforgeError(f"{name}: {text!r} must be a whole number")
    return value
