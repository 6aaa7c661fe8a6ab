"""One exception family for every failure a user can cause or fix.

The CLI prints these without a traceback: the message says what failed, where (file:line, patch
and hunk, log path) and what to do about it.
"""

from __future__ import annotations


class WasmforgeError(Exception):
    """A failure with a message meant for the user."""

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None,
                 details: str | None = None) -> None:
        self.what = what
        self.where = where
        self.hint = hint
        self.details = details
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.where}: {self.what}" if self.where else self.what
        parts = [head]
        if self.details:
            parts.append(self.details.rstrip())
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)


class RecipeError(WasmforgeError):
    """A recipe file is malformed or refers to something that does not exist."""


class SourceError(WasmforgeError):
    """A source could not be fetched, verified or extracted."""


class PatchError(WasmforgeError):
    """A patch did not apply cleanly."""


class ToolchainError(WasmforgeError):
    """No usable WASI toolchain, or a toolchain that is not what we support."""


class BuildError(WasmforgeError):
    """A build step failed."""


class RunError(WasmforgeError):
    """A module could not be loaded or run."""


class SmokeTestError(WasmforgeError):
    """A recipe's smoke tests failed."""
