"""Run one script with the native reference build and with the wasm build; show both side by side.

The native program runs as any host program does: the user's environment, the whole file system.
The wasm module runs in wasmtime with an empty environment and only the script's directory
preopened (at the same path, so file names in the output match). What differs is marked.
"""

from __future__ import annotations

import difflib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import RunError
from .runtime import Runner


@dataclass(frozen=True)
class Side:
    title: str
    text: str
    status: int


def run_native(program: Path, argv: list[str], *, timeout: float = 60) -> Side:
    if not program.is_file():
        raise RunError(f"no native build at {program}",
                       hint="build the reference first: invoke build <package>-<version> --native")
    try:
        result = subprocess.run([str(program), *argv], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Side(f"native {program.name}", f"(killed after {timeout:.0f} s)", 124)
    text = (result.stdout + result.stderr).decode(errors="replace")
    return Side(f"native {program.name}", text, result.returncode)


def run_wasm(module: Path, argv: list[str], *, dirs: list[tuple[str, Path]], timeout: float = 60,
             readonly_dirs: list[tuple[str, Path]] | None = None, env: dict[str, str] | None = None) -> Side:
    result = Runner().run(module, [module.stem, *argv], dirs=dirs, timeout=timeout, readonly_dirs=readonly_dirs,
                          env=env)
    text = (result.stdout + result.stderr).decode(errors="replace")
    if result.trap or result.timed_out:
        text += f"\n({result.describe()})"
    return Side(f"wasm {module.name} (wasmtime)", text, result.status)


def side_by_side(left: Side, right: Side, width: int = 160) -> str:
    """Two columns; the marker between them: ' ' same, '|' changed, '<' only left, '>' only right."""
    column = max(20, (width - 3) // 2)

    def cell(text: str) -> str:
        text = text.expandtabs(4)
        return text if len(text) <= column else text[: column - 1] + "…"

    def row(a: str, mark: str, b: str) -> str:
        return f"{cell(a):<{column}} {mark} {cell(b)}".rstrip()

    a_lines, b_lines = left.text.splitlines(), right.text.splitlines()
    out = [row(left.title, " ", right.title), row("-" * column, " ", "-" * column)]
    matcher = difflib.SequenceMatcher(a=a_lines, b=b_lines, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            out += [row(a_lines[i], " ", b_lines[b0 + i - a0]) for i in range(a0, a1)]
        elif op == "replace":
            for i in range(max(a1 - a0, b1 - b0)):
                a = a_lines[a0 + i] if a0 + i < a1 else None
                b = b_lines[b0 + i] if b0 + i < b1 else None
                mark = "|" if a is not None and b is not None else ("<" if b is None else ">")
                out.append(row(a or "", mark, b or ""))
        elif op == "delete":
            out += [row(a_lines[i], "<", "") for i in range(a0, a1)]
        else:
            out += [row("", ">", b_lines[i]) for i in range(b0, b1)]
    out.append(row(f"(exit status {left.status})", " " if left.status == right.status else "|",
                   f"(exit status {right.status})"))
    return "\n".join(out)
