"""Load YAML into plain Python values while remembering where every value came from.

Stage one of recipe loading: the result is the raw document plus a map from key path to line, so
that every later validation or rendering error can point into the file (rattler-build's idea of
keeping spans).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

KeyPath = tuple[str | int, ...]


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if part.replace("_", "").replace("-", "").isalnum() else f'"{part}"'
            out += f".{text}" if out else text
    return out or "(top level)"


@dataclass
class SpannedDoc:
    """A YAML document as plain values plus the line of each key path (1-based)."""

    file: Path
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line_of(self, path: KeyPath) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def where(self, path: KeyPath) -> str:
        return f"{self.file}:{self.line_of(path)}"

    def error(self, path: KeyPath, what: str, hint: str | None = None) -> RecipeError:
        where = self.where(path)
        label = format_path(path)
        return RecipeError(f"{label}: {what}", where=where, hint=hint)


def load_spanned(file: Path) -> SpannedDoc:
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read recipe: {exc.strerror}", where=str(file)) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = exc.problem or exc.context or "invalid YAML"
        raise RecipeError(f"YAML syntax error: {problem}", where=f"{file}:{line}",
                          hint="fix the YAML syntax; quote values that contain ': ', '{', '[' or '#'") from exc
    doc = SpannedDoc(file=file, data=None)
    if node is None:
        raise RecipeError("empty recipe file", where=f"{file}:1")
    doc.data = _convert(node, (), doc)
    return doc


_constructor = yaml.SafeLoader("")


def _convert(node: yaml.Node, path: KeyPath, doc: SpannedDoc) -> Any:
    doc.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise RecipeError("mapping keys must be plain strings",
                                  where=f"{doc.file}:{key_node.start_mark.line + 1}")
            key = _constructor.construct_object(key_node)
            if not isinstance(key, str):
                raise RecipeError(
                    f"{format_path(path)}: key {key!r} must be a string",
                    where=f"{doc.file}:{key_node.start_mark.line + 1}",
                    hint='quote it, e.g. "5.4" instead of 5.4 (YAML reads unquoted versions as numbers)')
            if key in result:
                raise RecipeError(f"{format_path(path + (key,))}: duplicate key",
                                  where=f"{doc.file}:{key_node.start_mark.line + 1}")
            doc.lines[path + (key,)] = key_node.start_mark.line + 1
            result[key] = _convert(value_node, path + (key,), doc)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, path + (i,), doc) for i, item in enumerate(node.value)]
    return _constructor.construct_object(node)
