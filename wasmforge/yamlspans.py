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


# libyaml's parser when PyYAML has it (it does in the wheels): pure-Python parsing costs every
# command that reads recipes about 0.1 s per recipe.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Limits for an untrusted recipe: nesting deeper than any real recipe, and budgets that aliases cannot
# multiply a document past (a "billion laughs" document, or one long string aliased thousands of times,
# would otherwise hang every command that reads recipes): values, and characters of text (keys and
# scalars, counted again at every use of an alias). The largest real recipe (php) has 334 values and
# 6,439 characters.
MAX_DEPTH = 40
MAX_VALUES = 100_000
MAX_TEXT = 1 << 20
# And the file itself (comments included), read no further.
MAX_FILE_BYTES = 4 << 20
# The tags of plain YAML data; anything else (!!python/..., !custom, !!binary, !!timestamp) is refused.
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}


def load_spanned(file: Path) -> SpannedDoc:
    try:
        with file.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"cannot read recipe: {exc.strerror}", where=str(file)) from None
    if len(raw) > MAX_FILE_BYTES:
        raise RecipeError(f"the recipe file is larger than {MAX_FILE_BYTES:,} bytes", where=f"{file}:1",
                          hint="recipes are short YAML files (the largest real one has under 10,000 bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise RecipeError(f"the recipe is not UTF-8 text (byte 0x{raw[exc.start]:02x} cannot be decoded)",
                          where=f"{file}:{line}", hint="save the file as UTF-8") from None
    _check_depth(file, text)
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = exc.problem or exc.context or "invalid YAML"
        raise RecipeError(f"YAML syntax error: {problem}", where=f"{file}:{line}",
                          hint="fix the YAML syntax; quote values that contain ': ', '{', '[' or '#'") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"YAML error: {exc}", where=f"{file}:1") from None
    doc = SpannedDoc(file=file, data=None)
    if node is None:
        raise RecipeError("empty recipe file", where=f"{file}:1")
    doc.data = _Converter(doc).convert(node, (), 0)
    return doc


def _check_depth(file: Path, text: str) -> None:
    """Refuse deep nesting from the event stream (composing it would recurse past Python's limit)."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_LOADER):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise RecipeError(f"the YAML nests deeper than {MAX_DEPTH} levels",
                                      where=f"{file}:{event.start_mark.line + 1}")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.MarkedYAMLError as exc:
        if "nesting depth" in str(exc.problem):  # libyaml's own limit (1000) came first
            line = exc.problem_mark.line + 1 if exc.problem_mark else 1
            raise RecipeError(f"the YAML nests deeper than {MAX_DEPTH} levels", where=f"{file}:{line}") from None
        return  # compose() reports syntax errors with their line
    except yaml.YAMLError as exc:
        raise RecipeError(f"YAML error: {exc}", where=f"{file}:1") from None


class _Converter:
    """Nodes to plain values, counting every value made and every character of text (aliases included,
    at each use) against MAX_VALUES and MAX_TEXT."""

    def __init__(self, doc: SpannedDoc) -> None:
        self.doc = doc
        self.values = 0
        self.text = 0
        # Its own constructor: PyYAML's remembers every node it has constructed.
        self.constructor = yaml.constructor.SafeConstructor()

    def where(self, node: yaml.Node) -> str:
        return f"{self.doc.file}:{node.start_mark.line + 1}"

    def count(self, node: yaml.Node, path: KeyPath) -> None:
        self.values += 1
        if isinstance(node, yaml.ScalarNode):
            self.text += len(node.value)
        if self.values > MAX_VALUES:
            raise RecipeError(f"{format_path(path)}: the document expands to more than {MAX_VALUES:,} values "
                              "(through aliases?)", where=self.where(node),
                              hint="recipes do not need YAML aliases; write the values out")
        if self.text > MAX_TEXT:
            raise RecipeError(f"{format_path(path)}: the document expands to more than {MAX_TEXT:,} characters "
                              "of text (through aliases?)", where=self.where(node),
                              hint="recipes do not need YAML aliases, nor long texts; write the values out")

    def convert(self, node: yaml.Node, path: KeyPath, depth: int) -> Any:
        doc = self.doc
        self.count(node, path)
        if depth > MAX_DEPTH:
            raise RecipeError(f"{format_path(path)}: the YAML nests deeper than {MAX_DEPTH} levels (through aliases?)",
                              where=self.where(node))
        if node.tag not in _PLAIN_TAGS:
            raise RecipeError(f"{format_path(path)}: unsupported YAML tag {node.tag!r}", where=self.where(node),
                              hint='quote dates: "2022-11-03"' if node.tag.endswith(":timestamp") else
                              "recipes hold plain strings, numbers, booleans, lists and mappings")
        doc.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            result: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _PLAIN_TAGS:
                    raise RecipeError("mapping keys must be plain strings", where=self.where(key_node))
                self.text += len(key_node.value)
                key = self.scalar(key_node, path)
                if not isinstance(key, str):
                    raise RecipeError(
                        f"{format_path(path)}: key {key!r} must be a string", where=self.where(key_node),
                        hint='quote it, e.g. "5.4" instead of 5.4 (YAML reads unquoted versions as numbers)')
                if key in result:
                    raise RecipeError(f"{format_path(path + (key,))}: duplicate key", where=self.where(key_node))
                doc.lines[path + (key,)] = key_node.start_mark.line + 1
                result[key] = self.convert(value_node, path + (key,), depth + 1)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
        return self.scalar(node, path)

    def scalar(self, node: yaml.Node, path: KeyPath) -> Any:
        try:
            return self.constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            raise RecipeError(f"{format_path(path)}: cannot read this value ({exc})", where=self.where(node)) from None
