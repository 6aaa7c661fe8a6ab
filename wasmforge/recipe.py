"""Recipes: load YAML, validate against the schema, render Jinja2 into immutable objects.

Stage one (`load_recipe`) validates the raw document and keeps line numbers. Stage two
(`Recipe.resolve`) renders the templated values for one version and flavor into a `Package`, the
plain value that the rest of the pipeline consumes. Build commands are rendered last, by the build
stage, because they see the toolchain and install prefixes (`Package.render`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import re
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.lexer
import jinja2.nodes
import jinja2.runtime
import jinja2.sandbox

from .config import MAX_SECONDS, default_cache_dir
from .errors import RecipeError
from .extract import ExtractLimits
from .outputs import plain_relative
from .yamlspans import KeyPath, SpannedDoc, load_spanned

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(-[a-z][a-z0-9_]*)*$")
BUILD_SYSTEMS = ("autotools", "make", "cmake", "script")
CR_PLACEHOLDER = "\x00wasmforge-cr\x00"

# A recipe may come from anywhere, and commands such as `invoke list` render its templates. So a
# template is expressions only (`${{ ... }}`: no `{% %}` statements, hence no loops, and no comments),
# runs in Jinja2's sandbox (no attribute of Python's internals is reachable), sees only our variables
# (no globals such as `range` or `lipsum`), may call only the filters and the methods of strings, lists
# and mappings listed below, and everything it makes is bounded: a template that would build a huge
# value or keep the machine busy is refused with one message before it does.
MAX_TEMPLATE_SOURCE = 64 << 10  # characters of one templated value (real ones: under 500)
MAX_TEMPLATE_TOKENS = 1000  # tokens of one, but spaces (real ones: under 20); compiling one takes ~30 µs
MAX_TEMPLATE_VALUE = 1 << 20  # the size of any value a template makes: characters, items, digits
MAX_TEMPLATE_INT = 1_000_000  # a width, count or other whole-number argument of a filter or method
MAX_TEMPLATE_BITS = 4096  # an integer made by `*` or `**`
# The work of rendering one value, and of all the values of one resolution of a recipe together, in
# units of roughly 10 ns: 8 per item (1 per character of a string) of every value read or made, 256 per
# operation (a call of a filter or method, an operator), 2048 per token compiled. Real recipes use
# 20,000-160,000 units in all (`invoke list` and every build command); these limits are well under a
# second of work.
MAX_TEMPLATE_WORK = 16 << 20
MAX_RECIPE_TEMPLATE_WORK = 32 << 20
_PER_OPERATION = 256
_PER_ITEM = 8
_PER_TOKEN = 2048
TEMPLATE_LIMITS_HINT = ("recipe templates are expressions (${{ ... }}) that make small values: strings and lists "
                        f"up to {MAX_TEMPLATE_VALUE:,} characters and items, integers up to {MAX_TEMPLATE_BITS} "
                        f"bits, widths and counts up to {MAX_TEMPLATE_INT:,}")
TEMPLATE_SANDBOX_HINT = ("recipe templates see only the recipe's variables and call only Jinja2's filters and "
                         "the plain methods of strings, lists and mappings (not format)")


class TemplateRefused(jinja2.sandbox.SecurityError):
    """A template asked for something recipes may not do (a statement, a huge value, too much work)."""

    def __init__(self, what: str, hint: str = TEMPLATE_LIMITS_HINT) -> None:
        super().__init__(what)
        self.hint = hint


@dataclass
class _RecipeWork:
    used: int = 0


class _Work:
    """The work budget of rendering one value, charged to its recipe's budget too."""

    def __init__(self, recipe_total: _RecipeWork) -> None:
        self.used = 0
        self.recipe_total = recipe_total

    def charge(self, units: int) -> None:
        self.used += units
        self.recipe_total.used += units
        if self.used > MAX_TEMPLATE_WORK:
            raise TemplateRefused(f"the template does too much work (more than {MAX_TEMPLATE_WORK:,} units)")
        if self.recipe_total.used > MAX_RECIPE_TEMPLATE_WORK:
            raise TemplateRefused(f"the recipe's templates together do too much work (more than "
                                  f"{MAX_RECIPE_TEMPLATE_WORK:,} units)")


_work: contextvars.ContextVar[_Work | None] = contextvars.ContextVar("wasmforge_template_work", default=None)


def _charge(units: int) -> None:
    work = _work.get()
    if work is not None:
        work.charge(units)


def _size(value: Any, limit: int = MAX_TEMPLATE_VALUE) -> int:
    """How big a value is, deeply: characters of strings, digits of numbers, one per item of lists
    and mappings. Counted only until past `limit` (a list may hold one big string many times)."""
    kind = type(value)
    if kind is str:
        return len(value)
    total = 0
    stack = [value]
    while stack and total <= limit:
        v = stack.pop()
        kind = type(v)
        if kind is str:
            total += len(v)
        elif kind is int:
            total += v.bit_length() // 3 + 1
        elif kind is list or kind is tuple:
            total += 1 + len(v)
            if total > limit:
                break
            kinds = set(map(type, v)) if len(v) > 16 else None  # long lists of strings or numbers: at C speed
            if kinds is not None and kinds <= {str}:
                total += sum(map(len, v))
            elif kinds is not None and kinds <= {int}:
                total += sum(map(int.bit_length, v)) // 3 + len(v)
            else:
                stack.extend(v)
        elif isinstance(v, str | bytes):
            total += len(v)
        elif isinstance(v, bool) or v is None:
            total += 1
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 1
        elif isinstance(v, float):
            total += 24
        elif isinstance(v, list | tuple | dict):
            total += 1 + len(v)
            if total <= limit:
                stack.extend(v.items() if isinstance(v, dict) else v)
        else:
            total += 1  # a method, a view of a mapping, an undefined value
    return total


def _refuse_over(name: str, estimate: int) -> None:
    if estimate > MAX_TEMPLATE_VALUE:
        raise TemplateRefused(f"{name}: value too large (about {estimate:,} characters or items, at most "
                              f"{MAX_TEMPLATE_VALUE:,})")


def _units(value: Any, size: int) -> int:
    # A string is copied or searched at memory speed; items of lists are handled one by one.
    return size if type(value) is str else _PER_ITEM * size


def _bounded(name: str, value: Any) -> Any:
    """What an operation made, counted and refused when too large."""
    size = _size(value)
    if size > MAX_TEMPLATE_VALUE:
        raise TemplateRefused(f"{name}: value too large (more than {MAX_TEMPLATE_VALUE:,} characters or items)")
    _charge(_PER_OPERATION + _units(value, size))
    return value


def _check_arguments(name: str, *values: Any) -> None:
    """Before a filter, test or method runs: its inputs are not huge, and its whole-number arguments (not
    the value it applies to, the first) are at most MAX_TEMPLATE_INT, and counted as work."""
    units, size = _PER_OPERATION, 0
    for i, v in enumerate(values):
        if i and isinstance(v, int) and not isinstance(v, bool):
            if abs(v) > MAX_TEMPLATE_INT:
                raise TemplateRefused(f"{name}: the number {v if v.bit_length() < 64 else 'given'} is too large "
                                      f"(at most {MAX_TEMPLATE_INT:,})")
            units += abs(v)  # a width or count: what it makes
        one = _size(v, MAX_TEMPLATE_VALUE - size)
        size += one
        units += _units(v, one)
        if size > MAX_TEMPLATE_VALUE:
            break
    _refuse_over(name, size)
    _charge(units)


_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.?)", re.DOTALL)


def _check_percent(name: str, fmt: str, args: Any) -> None:
    """`fmt % args` (and |format): refused when the widths, precisions and values it would print add up
    to more than MAX_TEMPLATE_VALUE (a mapping's value can be printed by every directive)."""
    items = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    largest = max((_size(v) for v in items), default=0)
    stars = max((abs(v) for v in items if isinstance(v, int)), default=0)
    estimate = len(fmt)
    for match in _PERCENT.finditer(fmt):
        width, precision, conversion = match.groups()
        if conversion == "%":
            continue
        for number in (width, precision):
            if number == "*":
                estimate += stars
            elif number:
                if len(number) > 7 or int(number) > MAX_TEMPLATE_INT:
                    raise TemplateRefused(f"{name}: the width {number[:20]} is too large (at most "
                                          f"{MAX_TEMPLATE_INT:,})")
                estimate += int(number)
        estimate += 400 + largest * (6 if conversion in ("r", "a") else 1)  # 400: digits of a float
        if estimate > MAX_TEMPLATE_VALUE:
            break
    _refuse_over(name, estimate)


def _check_replace(name: str, s: Any, old: Any, new: Any, count: Any = None) -> None:
    # The filter makes strings of whatever it is given; the method refuses what is not a string.
    s, old, new = (v if isinstance(v, str) else str(v) for v in (s, old, new))
    found = len(s) + 1 if not old else s.count(old)
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    _refuse_over(name, len(s) + found * max(len(new) - len(old), 0))


def _check_join(name: str, separator: Any, items: list[Any]) -> None:
    separator = separator if isinstance(separator, str) else str(separator)
    estimate = len(separator) * max(len(items) - 1, 0)
    for item in items:
        if estimate > MAX_TEMPLATE_VALUE:
            break
        estimate += _size(item)
    _refuse_over(name, estimate)


# The filters a recipe can use (Jinja2's, but random, slice, wordwrap, urlize, tojson, xmlattr, pprint,
# striptags and forceescape), some with a check of their arguments when what they make could grow
# faster than what they are given. Filters that return iterators return lists: each step is counted.
Arguments = tuple[tuple[Any, ...], dict[str, Any]]


def _filter_join(value: Any, d: Any = "", attribute: Any = None) -> Arguments:
    items = list(value)
    _check_join("join", d, items)
    return (items, d, attribute), {}


def _filter_replace(s: Any, old: Any, new: Any, count: Any = None) -> Arguments:
    _check_replace("replace", s, old, new, count)
    return (s, old, new, count), {}


def _filter_indent(s: Any, width: Any = 4, first: Any = False, blank: Any = False) -> Arguments:
    text = s if isinstance(s, str) else str(s)
    step = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    _refuse_over("indent", len(text) + (text.count("\n") + 1) * step)
    return (s, width, first, blank), {}


def _filter_format(value: Any, *args: Any, **kwargs: Any) -> Arguments:
    _check_percent("format", value if isinstance(value, str) else str(value), kwargs or args)
    return (value, *args), kwargs


def _filter_by_words(cost: int) -> Callable[..., Arguments]:
    # title and wordcount work word by word in Python: a character costs more than a copy.
    def check(s: Any, *args: Any, **kwargs: Any) -> Arguments:
        _charge(cost * _size(s))
        return (s, *args), kwargs
    return check


def _filter_sum(iterable: Any, attribute: Any = None, start: Any = 0) -> Arguments:
    # Numbers only: adding up lists or strings takes time that grows with the square of their number.
    if not isinstance(start, int | float):
        raise TemplateRefused("sum: only numbers can be added up")
    return (iterable, attribute, start), {}


_FILTER_CHECKS: dict[str, Callable[..., Arguments] | None] = {
    **dict.fromkeys(["abs", "attr", "batch", "capitalize", "center", "count", "d", "default", "dictsort", "e",
                     "escape", "filesizeformat", "first", "float", "groupby", "int", "items", "last", "length",
                     "list", "lower", "map", "max", "min", "reject", "rejectattr", "reverse", "round", "safe",
                     "select", "selectattr", "sort", "string", "trim", "truncate", "unique", "upper",
                     "urlencode"]),
    "format": _filter_format, "indent": _filter_indent, "join": _filter_join, "replace": _filter_replace,
    "sum": _filter_sum, "title": _filter_by_words(32), "wordcount": _filter_by_words(16),
}


def _checked_filter(name: str, func: Callable[..., Any], check: Callable[..., Arguments] | None,
                    result_bounded: bool = True) -> Callable[..., Any]:
    """`func` (a filter or test) behind the checks of every call and its own `check`. The wrapper takes
    the context, which also keeps Jinja2 from running it while compiling (folding constants), where its
    result could be joined to others unchecked."""
    passes = getattr(getattr(func, "jinja_pass_arg", None), "name", None)

    def wrapper(context: jinja2.runtime.Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        _check_arguments(name, value, *args, *kwargs.values())
        if check is not None:
            (value, *args), kwargs = check(value, *args, **kwargs)
        lead = {"context": (context,), "eval_context": (context.eval_ctx,),
                "environment": (context.environment,)}.get(passes or "", ())
        result = func(*lead, value, *args, **kwargs)
        if not result_bounded:
            return result
        if isinstance(result, Iterator):
            result = list(result)
        return _bounded(name, result)
    return jinja2.pass_context(functools.wraps(func)(wrapper))


# Methods a template may call, by the type of the object: those of strings that make values no larger
# than their inputs or their number arguments, and replace and join, checked first (str.format is not
# one: its fields could read attributes, and its widths make huge strings).
_PLAIN_STR_METHODS = frozenset([
    "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha", "isascii",
    "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric", "isprintable", "isspace", "istitle",
    "isupper", "lower", "lstrip", "partition", "removeprefix", "removesuffix", "rfind", "rindex",
    "rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith", "strip", "swapcase", "title",
    "upper", "center", "ljust", "rjust", "zfill",
])


def _method_check(owner: Any, name: str) -> Callable[..., Arguments] | None | bool:
    """The check of a method a template may call (None: the checks of every call suffice), or False."""
    if isinstance(owner, str):
        if name in _PLAIN_STR_METHODS:
            return None
        if name == "replace":
            def replace(old: Any, new: Any, count: Any = -1) -> Arguments:
                _check_replace("str.replace", owner, old, new, count)
                return (old, new, count), {}
            return replace
        if name == "join":
            def join(iterable: Any) -> Arguments:
                items = list(iterable)
                _check_join("str.join", owner, items)
                return (items,), {}
            return join
        return False
    if isinstance(owner, list | tuple):
        return None if name in ("count", "index") else False
    if isinstance(owner, dict):
        return None if name in ("get", "items", "keys", "values") else False
    return False


class _Codegen(jinja2.compiler.CodeGenerator):
    def visit_Concat(self, node: jinja2.nodes.Concat, frame: jinja2.compiler.Frame) -> None:
        # `a ~ b ~ ...` through the environment, which checks the size first.
        self.write("environment.recipe_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _RecipeTemplates(jinja2.sandbox.ImmutableSandboxedEnvironment):
    code_generator_class = _Codegen
    intercepted_binops = frozenset(["*", "**", "%", "+"])

    def call_binop(self, context, operator, left, right):  # type: ignore[no-untyped-def,override]
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if (abs(left).bit_length() - 1) * right >= MAX_TEMPLATE_BITS:
                raise TemplateRefused(f"exponent too large (the result would have more than "
                                      f"{MAX_TEMPLATE_BITS} bits)")
        elif operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > MAX_TEMPLATE_BITS:
                    raise TemplateRefused(f"number too large (more than {MAX_TEMPLATE_BITS} bits)")
            else:
                for seq, count in ((left, right), (right, left)):
                    if isinstance(seq, str | list | tuple) and isinstance(count, int) and count > 0:
                        _refuse_over("*", _size(seq) * count)
        elif operator == "%" and isinstance(left, str):
            _check_percent("%", left, right)
        elif operator == "+" and not (isinstance(left, int | float) and isinstance(right, int | float)):
            _refuse_over("+", _size(left) + _size(right))
        return _bounded(operator, super().call_binop(context, operator, left, right))

    def recipe_concat(self, parts: tuple[Any, ...]) -> str:
        _refuse_over("~", sum(_size(p) for p in parts))
        return _bounded("~", jinja2.runtime.str_join(parts))  # type: ignore[no-any-return]

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(argument, slice):
            return _bounded("[:]", super().getitem(obj, argument))
        _charge(_PER_OPERATION)
        return super().getitem(obj, argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _charge(_PER_OPERATION)
        return super().getattr(obj, attribute)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return False  # only the methods that wrap_str_format lets through

    def wrap_str_format(self, value: Any) -> Callable[..., Any] | None:
        # Jinja2's hook for every attribute a template reads (meant for str.format): a method of the
        # lists above comes back wrapped in its checks; anything else is refused (is_safe_attribute).
        owner, name = getattr(value, "__self__", None), getattr(value, "__name__", None)
        if not isinstance(value, types.BuiltinMethodType | types.MethodType) or not isinstance(name, str):
            return None
        check = _method_check(owner, name)
        if check is False:
            return None
        label = f"{type(owner).__name__}.{name}"

        def method(*args: Any, **kwargs: Any) -> Any:
            _check_arguments(label, owner, *args, *kwargs.values())
            if callable(check):
                args, kwargs = check(*args, **kwargs)
            return _bounded(label, value(*args, **kwargs))
        method.recipe_checked = True  # type: ignore[attr-defined]
        return method

    def call(self, context, obj, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        if getattr(obj, "recipe_checked", False) or isinstance(obj, jinja2.Undefined):
            return obj(*args, **kwargs)
        raise jinja2.sandbox.SecurityError(f"{type(obj).__name__} objects cannot be called in recipe templates")


def _finalize(value: Any) -> Any:
    return _bounded("${{ }}", value)  # what `${{ ... }}` prints: bounded before it is made a string


_jinja = _RecipeTemplates(
    variable_start_string="${{",
    variable_end_string="}}",
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
    finalize=_finalize,
    # No folding of constants while compiling: everything runs, checked, when the value is rendered.
    optimized=False,
)
_jinja.globals.clear()
_jinja.filters = {name: _checked_filter(name, _jinja.filters[name], check) for name, check in _FILTER_CHECKS.items()}
_jinja.tests = {name: _checked_filter(f"is {name}", test, None, result_bounded=False)
                for name, test in _jinja.tests.items()}
assert _jinja.line_statement_prefix is None and _jinja.line_comment_prefix is None

# What the lexer finds at the start of a statement or comment: refused, whatever follows.
_STATEMENT_TOKENS = {jinja2.lexer.TOKEN_BLOCK_BEGIN: "'{%' statements", jinja2.lexer.TOKEN_RAW_BEGIN: "'{%' statements",
                     jinja2.lexer.TOKEN_COMMENT_BEGIN: "'{#' comments",
                     jinja2.lexer.TOKEN_LINESTATEMENT_BEGIN: "line statements",
                     jinja2.lexer.TOKEN_LINECOMMENT_BEGIN: "line comments"}


@functools.lru_cache(maxsize=256)
def _template(source: str) -> jinja2.Template:
    """A templated value compiled (once: aliases and versions render the same ones again), refused
    if it holds a statement or comment, or is too long to compile quickly."""
    tokens = 0
    for lineno, token, _ in _jinja.lex(source):
        if token in _STATEMENT_TOKENS:
            raise TemplateRefused(
                f"{_STATEMENT_TOKENS[token]} are not allowed in recipe templates (line {lineno} of the value)",
                hint="a recipe value holds text and ${{ expressions }} only; write a literal '{%' or '{#' as "
                     "${{ '{%' }} or ${{ '{#' }}")
        tokens += token != jinja2.lexer.TOKEN_WHITESPACE
        if tokens > MAX_TEMPLATE_TOKENS:
            raise TemplateRefused(f"the template is too long (more than {MAX_TEMPLATE_TOKENS:,} tokens)")
    _charge(_PER_TOKEN * tokens + len(source))
    return _jinja.from_string(source)


def _render(template: jinja2.Template, context: Mapping[str, Any]) -> str:
    pieces: list[str] = []
    size = 0
    for piece in template.generate(**context):
        size += len(piece)
        _charge(len(piece))
        if size > MAX_TEMPLATE_VALUE:
            raise TemplateRefused(f"the value renders to more than {MAX_TEMPLATE_VALUE:,} characters")
        pieces.append(piece)
    return "".join(pieces)


# ----------------------------------------------------------------------------- typed recipe parts

@dataclass(frozen=True)
class DebianSource:
    """A source package in Debian's archive that carries the file (see sources.py)."""

    package: str
    suite: str


@dataclass(frozen=True)
class SourceSpec:
    sha256: str
    url: str | None = None
    filename: str | None = None
    debian: DebianSource | None = None
    # Host commands run in the extracted tree to bring a differently shaped source (e.g. a full
    # source tree instead of an amalgamation) into the shape the build expects.
    prepare: tuple[str, ...] = ()
    # Caps on extraction (`extract: {max_mib, max_members}`); None: the defaults of extract.py.
    max_extract_mib: int | None = None
    max_members: int | None = None

    def extract_limits(self) -> ExtractLimits:
        default = ExtractLimits()
        return ExtractLimits(
            max_bytes=self.max_extract_mib << 20 if self.max_extract_mib else default.max_bytes,
            max_members=self.max_members or default.max_members)

    def file_name(self) -> str:
        if self.filename:
            return self.filename
        if self.url:
            return self.url.rstrip("/").rsplit("/", 1)[-1]
        return f"{self.sha256[:16]}.tar"


@dataclass(frozen=True)
class Expect:
    """How a captured text is compared: exact, contains or regex."""

    kind: str
    text: str

    def matches(self, actual: str) -> bool:
        if self.kind == "exact":
            return actual == self.text
        if self.kind == "contains":
            return self.text in actual
        return re.search(self.text, actual, re.MULTILINE) is not None

    def describe(self) -> str:
        return {"exact": "exactly", "contains": "containing", "regex": "matching"}[self.kind] + f" {self.text!r}"


@dataclass(frozen=True)
class TestStep:
    run: tuple[str, ...]
    stdin: str | None = None
    stdout: Expect | None = None
    stderr: Expect | None = None
    exit: int = 0


BUILD_DIR_PREFIX = "build:"
# A target built for the build machine: NAME-VERSION-native; in build_tools, "native" alone is the
# recipe's own native build.
NATIVE = "native"
NATIVE_SUFFIX = "-" + NATIVE


@dataclass(frozen=True)
class SmokeTest:
    name: str
    steps: tuple[TestStep, ...]
    where: str
    dirs: tuple[tuple[str, Path], ...] = ()
    # Directories of the build's own install (guest path, path relative to the install), e.g. the
    # data files a program reads at run time: `dirs: {/usr/local/share/icu: "build:share/icu"}`.
    build_dirs: tuple[tuple[str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    scratch: tuple[tuple[str, str], ...] = ()
    files: tuple[tuple[str, Expect], ...] = ()
    timeout: float = 60.0
    defaults: bool = True  # the recipe's `run:` defaults apply (its own dirs and env come on top)


@dataclass(frozen=True)
class RunDefaults:
    """How a program is run when nothing else is said (a recipe's `run:`): `invoke run`, `invoke
    compare` and the smoke tests start it with these."""

    # Directories of the build's own install preopened read-only (guest path, path relative to the
    # install), where the program looks for its data: PHP's ICU data at /usr/local/share/icu.
    build_dirs: tuple[tuple[str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    script: tuple[str, ...] = ()  # the arguments before a script's path (PHP: -f; Lua: none)


NO_RUN_DEFAULTS = RunDefaults()


@dataclass(frozen=True)
class LicenseFile:
    """A file of the source tree (relative to its top directory) that holds the licence, or some of
    its lines when the licence is a comment in a source file."""

    path: str
    lines: tuple[int, int] | None = None

    def describe(self) -> str:
        return self.path + (f" (lines {self.lines[0]}-{self.lines[1]})" if self.lines else "")


@dataclass(frozen=True)
class Package:
    """One recipe rendered for one version and flavor: what the pipeline builds."""

    recipe: Recipe
    version: str
    flavor: str | None
    sources: tuple[SourceSpec, ...]
    patch_series: str | None
    depends: tuple[str, ...]
    build: Mapping[str, Any]
    outputs: tuple[tuple[str, str], ...]
    tests: tuple[SmokeTest, ...]
    # Built for the build machine with its own compiler: the reference for comparisons.
    native: bool = False
    # The version's release date as a Unix time: SOURCE_DATE_EPOCH of its builds and packages.
    source_date_epoch: int = 0

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def target(self) -> str:
        return f"{self.name}-{self.output_key}"

    @property
    def output_key(self) -> str:
        return self.version + (f"-{self.flavor}" if self.flavor else "") + ("-native" if self.native else "")

    @property
    def exceptions(self) -> bool:
        return bool(self.build.get("exceptions", False))

    def render(self, path: KeyPath, value: Any, context: Mapping[str, Any]) -> Any:
        """Render a build-section value with the build context (toolchain, prefixes)."""
        return self.recipe.render_value(value, {**self.base_context(), **context}, ("build",) + path)

    def base_context(self) -> dict[str, Any]:
        return self.recipe.context(self.version, self.flavor)

    def conformance_suites(self) -> list[str]:
        """The suites `invoke conformance` runs by default, rendered for this version (test modules
        are renamed between releases)."""
        suites = []
        for i, suite in enumerate(self.recipe.conformance.get("suites", [])):
            path: KeyPath = ("conformance", "suites", i)
            rendered = str(self.recipe.render_value(suite, self.base_context(), path))
            if not plain_relative(rendered):
                raise self.recipe.doc.error(path, f"{rendered!r} is not a plain relative path",
                                            hint="a test directory or module of the source tree")
            suites.append(rendered)
        return suites

    def conformance_report(self) -> str:
        """Where `invoke conformance` writes its report by default: the recipe's `conformance.report`,
        rendered for this version, a plain path inside the checkout."""
        path: KeyPath = ("conformance", "report")
        report = self.recipe.render_value(self.recipe.conformance["report"], self.base_context(), path)
        if not plain_relative(report):
            raise self.recipe.doc.error(path, f"{report!r} is not a plain relative path",
                                        hint="a file of the checkout, e.g. docs/conformance.md")
        return str(report)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe file (stage one): raw values plus where they came from."""

    name: str
    summary: str
    license: str
    homepage: str
    license_files: tuple[LicenseFile, ...]
    file: Path
    digest: str
    versions: Mapping[str, Mapping[str, Any]]
    source: Mapping[str, Any]
    depends: tuple[str, ...]
    # Native builds whose programs the build runs (see _recipe_check); none for a native build itself.
    build_tools: tuple[str, ...]
    build: Mapping[str, Any]
    outputs: Mapping[str, str]
    flavors: Mapping[str, Mapping[str, Any]]
    tests: tuple[Mapping[str, Any], ...]
    native: Mapping[str, Any]
    # What `invoke bench` runs (start-up, workloads) and the peer it measures against, if any.
    bench: Mapping[str, Any]
    run: Mapping[str, RunDefaults]
    # Upstream's test suite and the driver that runs it (`invoke conformance`); empty: none declared.
    conformance: Mapping[str, Any]
    doc: SpannedDoc = field(repr=False, compare=False)
    # What its templates have done since the last resolve() (bounded: MAX_RECIPE_TEMPLATE_WORK).
    template_work: _RecipeWork = field(default_factory=_RecipeWork, init=False, repr=False, compare=False)

    @property
    def default_version(self) -> str:
        return next(iter(self.versions))

    def where(self, path: KeyPath) -> str:
        return self.doc.where(path)

    def context(self, version: str, flavor: str | None) -> dict[str, Any]:
        parts = version.split(".")
        return {
            "name": self.name,
            "version": version,
            "version_parts": parts,
            "major": parts[0],
            "minor": parts[1] if len(parts) > 1 else "",
            "patch": parts[2] if len(parts) > 2 else "",
            "flavor": flavor or "",
        }

    def render_value(self, value: Any, context: Mapping[str, Any], path: KeyPath) -> Any:
        if isinstance(value, str):
            if "${{" not in value and "{%" not in value:
                return value
            work = _work.set(_Work(self.template_work))
            try:
                if len(value) > MAX_TEMPLATE_SOURCE:
                    raise TemplateRefused(f"the templated value is too long ({len(value):,} characters, at most "
                                          f"{MAX_TEMPLATE_SOURCE:,})")
                # Jinja turns every line ending into "\n"; keep carriage returns the recipe wrote.
                source = value.replace("\r", CR_PLACEHOLDER)
                _charge(len(source))
                return _render(_template(source), context).replace(CR_PLACEHOLDER, "\r")
            except TemplateRefused as exc:
                raise self.doc.error(path, f"template refused: {exc}", hint=exc.hint) from None
            except jinja2.UndefinedError as exc:
                names = ", ".join(sorted(context))
                raise self.doc.error(path, f"template error: {exc.message}",
                                     hint=f"variables available here: {names}") from None
            except jinja2.TemplateSyntaxError as exc:
                raise self.doc.error(path, f"template syntax error: {exc.message}") from None
            except jinja2.sandbox.SecurityError as exc:
                raise self.doc.error(path, f"template refused: {exc}", hint=TEMPLATE_SANDBOX_HINT) from None
            except jinja2.TemplateError as exc:
                raise self.doc.error(path, f"template error: {exc}") from None
            except (RecursionError, SyntaxError):  # Python's limits, met compiling or running a template
                raise self.doc.error(path, "template refused: the expression nests too deeply",
                                     hint=TEMPLATE_LIMITS_HINT) from None
            except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError, MemoryError) as exc:
                raise self.doc.error(path, f"template error: {type(exc).__name__}: {exc}") from None
            finally:
                _work.reset(work)
        if isinstance(value, list):
            return [self.render_value(v, context, path + (i,)) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.render_value(v, context, path + (k,)) for k, v in value.items()}
        return value

    def resolve(self, version: str | None = None, flavor: str | None = None, native: bool = False) -> Package:
        # The recipe's template budget is per resolution (and the renders of its build that follow), so a
        # long-lived process that resolves it again and again never runs out.
        self.template_work.used = 0
        version = version or self.default_version
        if version not in self.versions:
            known = ", ".join(self.versions)
            raise RecipeError(f"{self.name} has no version {version!r}", where=str(self.file),
                              hint=f"known versions: {known}")
        if flavor is not None and flavor not in self.flavors:
            known = ", ".join(self.flavors) or "none"
            raise RecipeError(f"{self.name} has no flavor {flavor!r}", where=str(self.file),
                              hint=f"known flavors: {known}")
        ctx = self.context(version, flavor)
        vspec = self.versions[version]
        vpath: KeyPath = ("versions", version)

        primary = self.render_value(dict(self.source), ctx, ("source",))
        primary["sha256"] = vspec["sha256"]
        sources = [self._source_spec(primary, ("source",))]
        for i, alt in enumerate(vspec.get("alternatives", [])):
            apath = vpath + ("alternatives", i)
            sources.append(self._source_spec(self.render_value(dict(alt), ctx, apath), apath))

        build = dict(self.build)
        if "generated" in vspec:
            # This version's pins of generated files join the build section's.
            build["generated"] = {**build.get("generated", {}), **vspec["generated"]}
        if flavor:
            spec = self.flavors[flavor]
            build = merge_build(build, spec.get("build", {}), replace=tuple(spec.get("replace", ())))
        depends = self.dependencies(flavor, native)
        if native:
            # A native build takes the keys its `native` section gives instead of the WASI ones,
            # and links the build machine's libraries (found by pkg-config), not our wasm builds.
            build = {**build, "exceptions": False, **self.native.get("build", {})}

        opath: KeyPath = ("native", "outputs") if native and "outputs" in self.native else ("outputs",)
        outputs = tuple((k, self.render_value(v, ctx, opath + (k,)))
                        for k, v in (self.native["outputs"] if opath[0] == "native" else self.outputs).items())
        tests = tuple(self._smoke_test(i, t, ctx) for i, t in enumerate(self.tests)
                      if _test_applies(t, flavor))
        released = vspec.get("released")
        epoch = int(datetime.combine(date.fromisoformat(released), time(), UTC).timestamp()) if released else 0
        return Package(recipe=self, version=version, flavor=flavor, sources=tuple(sources),
                       patch_series=vspec.get("patches"), depends=depends, build=build,
                       outputs=outputs, tests=() if native else tests, native=native, source_date_epoch=epoch)

    def dependencies(self, flavor: str | None = None, native: bool = False) -> tuple[str, ...]:
        """What this build links: the recipe's depends, or the flavor's own (a subset), none natively
        (a native build links the build machine's libraries)."""
        if native:
            return ()
        if flavor and "depends" in self.flavors.get(flavor, {}):
            return tuple(self.flavors[flavor]["depends"])
        return self.depends

    def _smoke_test(self, index: int, raw: Mapping[str, Any], ctx: Mapping[str, Any]) -> SmokeTest:
        path: KeyPath = ("tests", index)
        t = self.render_value(dict(raw), ctx, path)
        steps_raw = t.get("steps") or [{k: t[k] for k in ("run", "stdin", "stdout", "stderr", "exit") if k in t}]
        steps = tuple(
            TestStep(run=tuple(str(a) for a in s["run"]), stdin=s.get("stdin"),
                     stdout=_expect(s.get("stdout")), stderr=_expect(s.get("stderr")),
                     exit=int(s.get("exit", 0)))
            for s in steps_raw)
        fixtures = self.file.parent
        checkout = fixtures.parent.resolve()
        own = {g: h.removeprefix(BUILD_DIR_PREFIX) for g, h in t.get("dirs", {}).items()
               if str(h).startswith(BUILD_DIR_PREFIX)}
        for guest in own:
            _check_build_dir(self.doc, path + ("dirs", guest), t["dirs"][guest])
        for guest, host in t.get("dirs", {}).items():
            if guest in own:
                continue
            if Path(host).is_absolute() or not (fixtures / host).resolve().is_relative_to(checkout):
                raise self.doc.error(path + ("dirs", guest), f"{host!r} is outside this checkout",
                                     hint="smoke tests may preopen directories of the checkout only "
                                          "(relative to the recipes directory)")
        for key in ("scratch", "files"):
            for name in t.get(key, {}):
                parts = Path(name).parts
                if not parts or Path(name).is_absolute() or ".." in parts:
                    raise self.doc.error(path + (key, name), f"{name!r} must be a relative path inside /scratch")
        return SmokeTest(
            name=t.get("name") or " ".join(steps[0].run)[:60],
            steps=steps,
            where=self.where(path),
            dirs=tuple((g, (fixtures / h).resolve()) for g, h in t.get("dirs", {}).items() if g not in own),
            build_dirs=tuple(own.items()),
            env=tuple((k, str(v)) for k, v in t.get("env", {}).items()),
            scratch=tuple((k, str(v)) for k, v in t.get("scratch", {}).items()),
            files=tuple((k, e) for k, v in t.get("files", {}).items() if (e := _expect(v)) is not None),
            timeout=float(t.get("timeout", 60)),
            defaults=bool(t.get("defaults", True)),
        )


    def _source_spec(self, raw: Mapping[str, Any], path: KeyPath) -> SourceSpec:
        deb = raw.get("debian")
        limits = raw.get("extract", {})
        spec = SourceSpec(sha256=raw["sha256"], url=raw.get("url"), filename=raw.get("filename"),
                          debian=DebianSource(deb["package"], deb["suite"]) if deb else None,
                          prepare=tuple(raw.get("prepare", ())), max_extract_mib=limits.get("max_mib"),
                          max_members=limits.get("max_members"))
        # The name is a path component in the source cache and in mirrors: it must be a plain name.
        name = spec.file_name()
        if not is_plain_file_name(name):
            key = "filename" if spec.filename else "url"
            raise self.doc.error(path + (key,), f"the file name {name!r} is not a plain file name",
                                 hint="a file name has no '/', is not '.' or '..' and does not start with '.'")
        return spec


def is_plain_file_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and "\0" not in name and not name.startswith(".") \
        and len(name) <= 255 and name.isprintable()


def _test_applies(raw: Mapping[str, Any], flavor: str | None) -> bool:
    flavors = raw.get("flavors")
    return flavors is None or (flavor or "default") in flavors


def _expect(raw: Any) -> Expect | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return Expect("exact", raw)
    (kind, text), = raw.items()
    return Expect(kind, str(text))


def merge_build(base: Mapping[str, Any], extra: Mapping[str, Any], replace: tuple[str, ...] = ()) -> dict[str, Any]:
    """A flavor's build section extends lists and maps and replaces scalars (and the keys in `replace`)."""
    merged = dict(base)
    for key, value in extra.items():
        if key in replace:
            merged[key] = value
        elif isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = merged[key] + value
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


# ----------------------------------------------------------------------------- schema

Check = Callable[[SpannedDoc, KeyPath, Any], None]


def _is_str(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    if not isinstance(value, str):
        raise doc.error(path, f"must be a string, not {type(value).__name__}")


def _is_bool(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    if not isinstance(value, bool):
        raise doc.error(path, f"must be true or false, not {type(value).__name__}")


def _is_int(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise doc.error(path, f"must be an integer, not {type(value).__name__}")


def _is_number(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise doc.error(path, f"must be a number, not {type(value).__name__}")


def _is_positive(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    _is_number(doc, path, value)
    if not 0 < value < float("inf"):
        raise doc.error(path, f"must be a positive number, not {value!r}")


def _is_timeout(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    _is_positive(doc, path, value)
    if value > MAX_SECONDS:
        raise doc.error(path, f"must be at most {MAX_SECONDS:g} seconds, not {value!r}")


def _is_positive_int(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    _is_int(doc, path, value)
    if value <= 0:
        raise doc.error(path, f"must be a positive whole number, not {value!r}")


@cache
def _spdx_licensing():  # type: ignore[no-untyped-def]
    from license_expression import get_spdx_licensing

    return get_spdx_licensing()


def spdx_problem(expression: str) -> str | None:
    """Why `expression` is not a valid SPDX license expression in its canonical spelling, or None.

    Loading the SPDX licence list takes a quarter of a second, which every command that reads recipes
    would pay: expressions found valid are remembered (per version of the library) in the cache."""
    from importlib.metadata import version

    marker = default_cache_dir() / "spdx-valid" / hashlib.sha256(
        f"{version('license-expression')}\0{expression}".encode()).hexdigest()
    if marker.is_file():
        return None
    problem = _spdx_check(expression)
    if problem is None:
        with contextlib.suppress(OSError):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(expression + "\n")
    return problem


def _spdx_check(expression: str) -> str | None:
    licensing = _spdx_licensing()
    try:
        licensing.parse(expression, validate=True, strict=True)  # its messages are the clearest
        info = licensing.validate(expression, strict=True)
    except Exception as exc:  # noqa: BLE001 (the library raises several kinds for malformed input)
        return str(exc) or type(exc).__name__
    if info.errors:
        return "; ".join(str(e) for e in info.errors)
    if info.normalized_expression != expression:
        return f"write it as {info.normalized_expression!r}"
    return None


def _is_spdx(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    _is_str(doc, path, value)
    if problem := spdx_problem(value):
        raise doc.error(path, f"{value!r} is not a valid SPDX license expression: {problem}",
                        hint="use identifiers from https://spdx.org/licenses/ joined by AND, OR, WITH")


def _is_file_name(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    _is_str(doc, path, value)
    if "${{" not in value and not is_plain_file_name(value):
        raise doc.error(path, f"{value!r} is not a plain file name",
                        hint="a file name has no '/', is not '.' or '..' and does not start with '.'")


def _is_sha256(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    _is_str(doc, path, value)
    if not SHA256_RE.match(value):
        raise doc.error(path, "must be 64 lowercase hex digits (a sha256)")


def _list_of(item: Check) -> Check:
    def check(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
        if not isinstance(value, list):
            raise doc.error(path, f"must be a list, not {type(value).__name__}")
        for i, v in enumerate(value):
            item(doc, path + (i,), v)
    return check


def _is_scalar_arg(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise doc.error(path, f"must be a string or number, not {type(value).__name__}")


def _map_of(item: Check) -> Check:
    def check(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
        if not isinstance(value, dict):
            raise doc.error(path, f"must be a mapping, not {type(value).__name__}")
        for k, v in value.items():
            item(doc, path + (k,), v)
    return check


def _record(fields: Mapping[str, Check], required: tuple[str, ...] = (),
            rule: Callable[[SpannedDoc, KeyPath, dict[str, Any]], None] | None = None) -> Check:
    def check(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
        if not isinstance(value, dict):
            raise doc.error(path, f"must be a mapping, not {type(value).__name__}")
        for key in value:
            if key not in fields:
                raise doc.error(path + (key,), "unknown key",
                                hint=f"allowed keys here: {', '.join(fields)}")
        for key in required:
            if key not in value:
                raise doc.error(path, f"missing required key {key!r}")
        for key, v in value.items():
            fields[key](doc, path + (key,), v)
        if rule:
            rule(doc, path, value)
    return check


def _one_of(allowed: tuple[str, ...]) -> Check:
    def check(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
        _is_str(doc, path, value)
        if value not in allowed:
            raise doc.error(path, f"{value!r} is not one of: {', '.join(allowed)}")
    return check


def _expect_check(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, dict) and len(value) == 1:
        kind = next(iter(value))
        if kind in ("exact", "contains", "regex"):
            _is_scalar_arg(doc, path + (kind,), value[kind])
            return
    raise doc.error(path, "must be a string (exact match) or one of {exact: ..}, {contains: ..}, {regex: ..}")


_debian = _record({"package": _is_str, "suite": _is_str}, required=("package", "suite"))


def _source_rule(doc: SpannedDoc, path: KeyPath, value: dict[str, Any]) -> None:
    if "url" not in value and "debian" not in value:
        raise doc.error(path, "a source needs a url or a debian source package")


_source_fields: dict[str, Check] = {
    "url": _is_str, "filename": _is_file_name, "debian": _debian, "prepare": _list_of(_is_str),
    # Caps on what the archive may unpack to (defaults: 8 GiB, 250,000 members).
    "extract": _record({"max_mib": _is_positive_int, "max_members": _is_positive_int}),
}
_source_check = _record(_source_fields, rule=_source_rule)
_alternative_check = _record({**_source_fields, "sha256": _is_sha256}, required=("sha256",), rule=_source_rule)

def _is_date(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    _is_str(doc, path, value)
    try:
        date.fromisoformat(value)
    except ValueError:
        raise doc.error(path, f"{value!r} is not a date", hint="write it as YYYY-MM-DD") from None
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) or value < "1980-01-01":
        raise doc.error(path, f"{value!r} is not a release date",
                        hint="write it as YYYY-MM-DD, not before 1980 (zip and tar tools need no earlier dates)")


def _is_relative_path(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    _is_str(doc, path, value)
    if not plain_relative(value):
        raise doc.error(path, f"{value!r} is not a relative path inside the source tree",
                        hint="write it relative to the archive's top directory, e.g. LICENSE or src/lua.h")


def _is_guest_path(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    _is_str(doc, path, value)
    parts = value.split("/")[1:]
    if not value.startswith("/") or "\0" in value or any(p in ("", ".", "..") for p in parts) or value == "/":
        raise doc.error(path, f"{value!r} is not an absolute guest path", hint="e.g. /usr/local")


def _is_license_file(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    if isinstance(value, str):
        _is_relative_path(doc, path, value)
        return
    _record({"file": _is_relative_path, "lines": _list_of(_is_positive_int)}, required=("file", "lines"))(
        doc, path, value)
    lines = value["lines"]
    if len(lines) != 2 or lines[0] > lines[1]:
        raise doc.error(path + ("lines",), "lines are [first, last], first <= last")


def _generated_check(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    if not isinstance(value, dict):
        raise doc.error(path, f"must be a mapping of file -> sha256, not {type(value).__name__}")
    for file, digest in value.items():
        _is_relative_path(doc, path + (file,), file)
        _is_sha256(doc, path + (file,), digest)


_version_check = _record(
    {"sha256": _is_sha256, "patches": _is_str, "alternatives": _list_of(_alternative_check),
     # The release date: builds and packages of this version are dated with it (SOURCE_DATE_EPOCH).
     "released": _is_date,
     # Pins of files pre_configure generates that differ from version to version (see build.generated).
     "generated": _generated_check},
    required=("sha256",),
)


def _build_rule(doc: SpannedDoc, path: KeyPath, value: dict[str, Any]) -> None:
    system = value.get("system")
    if system == "script" and "script" not in value:
        raise doc.error(path, "system 'script' needs a 'script' list of shell commands")


_build_fields: dict[str, Check] = {
    "system": _one_of(BUILD_SYSTEMS),
    "cflags": _list_of(_is_str),
    "ldflags": _list_of(_is_str),
    "libs": _list_of(_is_str),
    # Shell commands run in the source tree after the patches, before configure (e.g. to
    # regenerate sources with a host tool).
    "pre_configure": _list_of(_is_str),
    # Files pre_configure generates, with their pinned sha256: a generator that writes anything else
    # (another version of the host tool) stops the build before configure, naming both digests.
    "generated": _generated_check,
    # Debian packages whose programs the build runs (installed when missing, as root).
    "host_packages": _list_of(_is_str),
    "configure": _list_of(_is_str),
    "make": _list_of(_is_str),
    "install": _list_of(_is_str),
    "script": _list_of(_is_str),
    "env": _map_of(_is_scalar_arg),
    "exceptions": _is_bool,
    "in_source": _is_bool,
    # The directory of the unpacked source that holds the build system (ICU's is source/).
    "subdir": _is_relative_path,
    # The package has C++: CXXFLAGS name libc++ for WASI, and links take libc++ and libc++abi.
    "cxx": _is_bool,
    # wasm-opt's flags for the outputs (default [-O2]; [-Oz] for size; [] for none).
    "wasm_opt": _list_of(_is_str),
    # The install prefix as the module will see it (e.g. /usr/local): what a program compiles in
    # (PHP's php.ini directory, include_path) must be a guest path, not the host directory of the
    # build. Without it, libraries install for their store entry (dependants link them from there).
    "prefix": _is_guest_path,
}
_build_check = _record(_build_fields, required=("system",), rule=_build_rule)
_flavor_build_check = _record(_build_fields)

_step_fields: dict[str, Check] = {
    "run": _list_of(_is_scalar_arg),
    "stdin": _is_str,
    "stdout": _expect_check,
    "stderr": _expect_check,
    "exit": _is_int,
}


def _test_rule(doc: SpannedDoc, path: KeyPath, value: dict[str, Any]) -> None:
    if ("run" in value) == ("steps" in value):
        raise doc.error(path, "a test has either 'run' (one command) or 'steps' (several), not both or neither")


_test_check = _record(
    {**_step_fields, "name": _is_str, "steps": _list_of(_record(_step_fields, required=("run",))),
     "dirs": _map_of(_is_str), "env": _map_of(_is_scalar_arg), "scratch": _map_of(_is_str),
     "files": _map_of(_expect_check), "timeout": _is_timeout, "flavors": _list_of(_is_str),
     # false: the program runs without the recipe's `run:` defaults (a test of what happens without them)
     "defaults": _is_bool},
    rule=_test_rule,
)

def _bench_workload_rule(doc: SpannedDoc, path: KeyPath, value: dict[str, Any]) -> None:
    if ("source" in value) == ("file" in value):
        raise doc.error(path, "a workload's script is either 'source' (a file of the source tree) or 'file' "
                              "(a file of this checkout), not both or neither")
    script = (value.get("source") or value["file"]).rsplit("/", 1)[-1]
    if script not in value["run"][1:]:
        raise doc.error(path + ("run",), f"does not run the script {script!r}",
                        hint=f"a program, then its arguments with the script by its file name: run: [PROGRAM, {script}]")


_bench_check = _record({
    # The start-up measure: a program and its arguments.
    "startup": _list_of(_is_scalar_arg),
    # Longer programs: run is a program and its arguments, where the script's file name stands for it.
    "workloads": _list_of(_record({"name": _is_str, "source": _is_relative_path, "file": _is_relative_path,
                                   "run": _list_of(_is_scalar_arg)},
                                  required=("name", "run"), rule=_bench_workload_rule)),
    # More of the build to measure than its modules: a label, and a file or directory of the build
    # (templated), whose size `invoke bench` gives raw and gzip -9 (a directory as a tar stream).
    "sizes": _map_of(_is_relative_path),
    # Another project's build of the same interpreter that `invoke bench --peer` runs beside ours:
    # an npm project (a directory under toolchain/ with package.json, a package-lock.json that pins
    # every package's integrity, and the script that runs it) and the versions it is the peer for.
    "peer": _record({"name": _is_str, "versions": _list_of(_is_str), "npm": _is_relative_path,
                     "run": _list_of(_is_scalar_arg)}, required=("name", "versions", "npm", "run")),
})

def _run_dirs_check(doc: SpannedDoc, path: KeyPath, value: Any) -> None:
    if not isinstance(value, dict):
        raise doc.error(path, f"must be a mapping, not {type(value).__name__}")
    for guest, host in value.items():
        _is_guest_path(doc, path + (guest,), guest)
        # Only the build's own directories: a default must mean the same on every machine.
        _check_build_dir(doc, path + (guest,), host)


def _check_build_dir(doc: SpannedDoc, path: KeyPath, host: Any) -> None:
    """`host` must be build:REL, REL a plain relative path: a directory of the build's own install."""
    if not isinstance(host, str) or not host.startswith(BUILD_DIR_PREFIX) \
            or not plain_relative(host.removeprefix(BUILD_DIR_PREFIX)):
        raise doc.error(path, f"{host!r} is not a directory of the build",
                        hint=f"write {BUILD_DIR_PREFIX}REL, a directory the build installs, "
                             f"e.g. {BUILD_DIR_PREFIX}share/icu")


# The conformance drivers `invoke conformance` knows, and the programs each one drives, by role: a
# recipe's `conformance.programs` names one of its outputs for each role.
CONFORMANCE_DRIVERS: Mapping[str, tuple[str, ...]] = {
    # PHP's run-tests.php: the CLI runs the tests, the CGI program the tests with --GET--/--POST-- sections.
    "php-run-tests": ("cli", "cgi"),
    # CPython's regrtest (python -m test), a module per process.
    "python-regrtest": ("interpreter",),
}


def _conformance_rule(doc: SpannedDoc, path: KeyPath, value: dict[str, Any]) -> None:
    roles = CONFORMANCE_DRIVERS[value["driver"]]
    given = value.get("programs", {})
    for role in given:
        if role not in roles:
            raise doc.error(path + ("programs", role), f"the {value['driver']} driver has no program {role!r}",
                            hint=f"its programs: {', '.join(roles)}")
    for role in roles:
        if role not in given:
            raise doc.error(path + ("programs",), f"the {value['driver']} driver needs a program for {role!r}",
                            hint=f"programs: {{{', '.join(f'{r}: OUTPUT' for r in roles)}}}")


# Upstream's own test suite, run by a named driver in wasm and natively (`invoke conformance`).
_conformance_check = _record({
    "driver": _one_of(tuple(CONFORMANCE_DRIVERS)),
    "programs": _map_of(_is_str),
    # What is run when the command names nothing: directories or modules of the suite.
    "suites": _list_of(_is_relative_path),
    # Where the report goes, relative to the checkout (templated: a file per version series).
    "report": _is_str,
}, required=("driver", "programs", "suites", "report"), rule=_conformance_rule)


# How each program is run by default: the build's directories it reads, its environment, and the
# arguments that come before a script's path.
_run_check = _map_of(_record({"dirs": _run_dirs_check, "env": _map_of(_is_scalar_arg),
                              "script": _list_of(_is_scalar_arg)}))

_recipe_check = _record(
    {
        "name": _is_str,
        "summary": _is_str,
        "license": _is_spdx,
        "homepage": _is_str,
        # Where the licence text is in the source tree (packaged into licenses/ by `invoke package`):
        # a path, or {file, lines: [first, last]} when it is a comment in a source file. Those present
        # in the source that was built are packaged; list one for each source shape.
        "license_files": _list_of(_is_license_file),
        "versions": _map_of(_version_check),
        "source": _source_check,
        "depends": _list_of(_is_str),
        # Programs the build runs on the build machine: native builds, made (and stored) before this
        # one. "native" is this recipe's own native build of the same version (CPython's build
        # python); NAME-native or NAME-VERSION-native another recipe's. A build finds each at
        # ${{ build_tools.NAME }} (its install prefix), and their bin/ directories on its PATH.
        "build_tools": _list_of(_is_str),
        "build": _build_check,
        "outputs": _map_of(_is_str),
        "flavors": _map_of(_record({"summary": _is_str, "build": _flavor_build_check,
                                    "replace": _list_of(_one_of(tuple(_build_fields))),
                                    # what this flavor links, when less than the recipe's depends
                                    "depends": _list_of(_is_str)})),
        "tests": _list_of(_test_check),
        # How to build for the build machine (--native): build keys that replace the WASI ones,
        # and the build machine's packages that provide the dependencies.
        "native": _record({"build": _flavor_build_check, "packages": _list_of(_is_str),
                           # where the programs are when the build machine's names differ (no .wasm suffix)
                           "outputs": _map_of(_is_str)}),
        "bench": _bench_check,
        "run": _run_check,
        "conformance": _conformance_check,
    },
    required=("name", "summary", "license", "versions", "source", "build"),
)


def _check_output(doc: SpannedDoc, path: KeyPath, program: str, outputs: Mapping[str, str]) -> None:
    """A program a recipe names (in a test, `run:`, `conformance:`) must be one of its outputs."""
    if program not in outputs:
        raise doc.error(path, f"{program!r} is not one of this recipe's outputs",
                        hint=f"outputs: {', '.join(outputs) or 'none'}")


def load_recipe(file: Path) -> Recipe:
    if file.is_symlink() and not file.resolve().is_relative_to(file.parent.resolve()):
        # A recipe is read and quoted in messages: a link must not make it another file of the machine.
        raise RecipeError(f"{file.name} is a link to {file.resolve()}, outside {file.parent}",
                          where=str(file), hint="recipes are files of the recipes directory; copy it there")
    doc = load_spanned(file)
    _recipe_check(doc, (), doc.data)
    data = doc.data
    name = data["name"]
    if name != file.stem:
        raise doc.error(("name",), f"name {name!r} does not match the file name {file.name!r}")
    if not NAME_RE.match(name):
        raise doc.error(("name",), "names are lowercase letters, digits and '_', words joined by '-'")
    if not data["versions"]:
        raise doc.error(("versions",), "a recipe needs at least one version")
    outputs = data.get("outputs", {})
    for i, test in enumerate(data.get("tests", [])):
        steps = test.get("steps") or [test]
        for j, step in enumerate(steps):
            spath: KeyPath = ("tests", i) + (("steps", j) if "steps" in test else ()) + ("run",)
            if not step.get("run"):
                raise doc.error(spath, "needs at least the program to run")
            _check_output(doc, spath + (0,), step["run"][0], outputs)
        for flavor in test.get("flavors", []):
            if flavor != "default" and flavor not in data.get("flavors", {}):
                raise doc.error(("tests", i, "flavors"), f"unknown flavor {flavor!r}")
    for i, tool in enumerate(data.get("build_tools", [])):
        if tool != NATIVE and not tool.endswith(NATIVE_SUFFIX):
            raise doc.error(("build_tools", i), f"{tool!r} is not a native build",
                            hint="a build tool runs on the build machine: write 'native' (this recipe's own native "
                                 "build of the same version), NAME-native or NAME-VERSION-native")
    if "outputs" in data.get("native", {}) and set(data["native"]["outputs"]) != set(outputs):
        raise doc.error(("native", "outputs"), "names other programs than the recipe's outputs",
                        hint=f"the same programs, built for the build machine: {', '.join(outputs) or 'none'}")
    for program in data.get("run", {}):
        _check_output(doc, ("run", program), program, outputs)
    for role, program in data.get("conformance", {}).get("programs", {}).items():
        _check_output(doc, ("conformance", "programs", role), program, outputs)
    bench = data.get("bench", {})
    for bpath, argv in [(("bench", "startup"), bench.get("startup"))] + [
            (("bench", "workloads", i, "run"), w["run"]) for i, w in enumerate(bench.get("workloads", []))]:
        if argv is not None and (not argv or argv[0] not in outputs):
            raise doc.error(bpath, "must start with one of this recipe's outputs",
                            hint=f"outputs: {', '.join(outputs) or 'none'}")
    for flavor, spec in data.get("flavors", {}).items():
        for j, dep in enumerate(spec.get("depends", [])):
            if dep not in data.get("depends", []):
                raise doc.error(("flavors", flavor, "depends", j), f"{dep!r} is not in the recipe's depends",
                                hint="a flavor can link fewer dependencies than the recipe, not others")
    return Recipe(
        name=name,
        summary=data["summary"],
        license=data["license"],
        homepage=data.get("homepage", ""),
        license_files=tuple(LicenseFile(f) if isinstance(f, str) else LicenseFile(f["file"], tuple(f["lines"]))
                            for f in data.get("license_files", [])),
        file=file,
        digest=hashlib.sha256(file.read_bytes()).hexdigest(),
        versions=data["versions"],
        source=data["source"],
        depends=tuple(data.get("depends", [])),
        build_tools=tuple(data.get("build_tools", [])),
        build=data["build"],
        outputs=outputs,
        flavors=data.get("flavors", {}),
        tests=tuple(data.get("tests", [])),
        native=data.get("native", {}),
        bench=data.get("bench", {}),
        conformance=data.get("conformance", {}),
        run={program: RunDefaults(
                build_dirs=tuple((g, h.removeprefix(BUILD_DIR_PREFIX)) for g, h in spec.get("dirs", {}).items()),
                env=tuple((k, str(v)) for k, v in spec.get("env", {}).items()),
                script=tuple(str(a) for a in spec.get("script", ())))
             for program, spec in data.get("run", {}).items()},
        doc=doc,
    )


# ----------------------------------------------------------------------------- the recipe set

@dataclass(frozen=True)
class Target:
    name: str
    version: str
    flavor: str | None
    native: bool = False

    def __str__(self) -> str:
        return f"{self.name}-{self.version}" + (f"-{self.flavor}" if self.flavor else "") + \
            ("-native" if self.native else "")


class RecipeBook:
    """All recipes of a checkout, cross-checked (dependencies exist, no cycles)."""

    def __init__(self, recipes: Mapping[str, Recipe]) -> None:
        self.recipes = dict(sorted(recipes.items()))
        self._check_dependencies()

    @classmethod
    def load(cls, recipes_dir: Path) -> RecipeBook:
        if not recipes_dir.is_dir():
            raise RecipeError(f"no recipes directory at {recipes_dir}")
        return cls({f.stem: load_recipe(f) for f in sorted(recipes_dir.glob("*.yaml"))})

    def __getitem__(self, name: str) -> Recipe:
        try:
            return self.recipes[name]
        except KeyError:
            raise RecipeError(f"unknown package {name!r}",
                              hint=f"known packages: {', '.join(self.recipes)}") from None

    def parse_target(self, text: str, flavor: str | None = None) -> Target:
        """'lua', 'lua-5.4.7', 'php-7.4.33-portable' or 'php-7.4.33-native' (built for the build machine) -> Target."""
        if text.endswith(NATIVE_SUFFIX) and text not in self.recipes:
            if flavor:
                raise RecipeError(f"target {text!r} is a native build, which has no flavors (--flavor {flavor})")
            base = self.parse_target(text.removesuffix(NATIVE_SUFFIX))
            if base.flavor:
                raise RecipeError(f"target {text!r} names a flavor and a native build",
                                  hint=f"native builds have no flavors: {base.name}-{base.version}-native")
            return dataclasses.replace(base, native=True)
        names = sorted((n for n in self.recipes if text == n or text.startswith(n + "-")), key=len, reverse=True)
        if not names:
            raise RecipeError(f"unknown package in {text!r}",
                              hint=f"known packages: {', '.join(self.recipes)}; write NAME-VERSION, e.g. lua-5.4.7")
        recipe = self.recipes[names[0]]
        rest = text[len(recipe.name) + 1:]
        if not rest:
            return Target(recipe.name, recipe.default_version, flavor)
        for version in sorted(recipe.versions, key=len, reverse=True):
            if rest == version:
                return Target(recipe.name, version, flavor)
            if rest.startswith(version + "-"):
                suffix = rest[len(version) + 1:]
                if suffix not in recipe.flavors:
                    raise RecipeError(f"{recipe.name} {version} has no flavor {suffix!r}", where=str(recipe.file),
                                      hint=f"flavors: {', '.join(recipe.flavors) or 'none'}")
                if flavor and flavor != suffix:
                    raise RecipeError(f"target {text!r} names flavor {suffix!r} but --flavor says {flavor!r}")
                return Target(recipe.name, version, suffix)
        raise RecipeError(f"{recipe.name} has no version {rest!r}", where=str(recipe.file),
                          hint=f"known versions: {', '.join(recipe.versions)}")

    def package(self, target: Target) -> Package:
        return self[target.name].resolve(target.version, target.flavor, target.native)

    def dependency_targets(self, recipe: Recipe, native: bool = False, flavor: str | None = None) -> list[Target]:
        return [self.parse_target(dep) for dep in recipe.dependencies(flavor, native)]

    def tool_targets(self, target: Target) -> list[Target]:
        """The native builds whose programs the build of `target` runs (none for a native build)."""
        if target.native:
            return []
        return [Target(target.name, target.version, None, native=True) if tool == NATIVE else self.parse_target(tool)
                for tool in self.recipes[target.name].build_tools]

    def build_order(self, target: Target) -> list[Target]:
        """The target's dependencies, depth first, then the target itself."""
        order: list[Target] = []

        def visit(t: Target) -> None:
            for dep in self.tool_targets(t) + self.dependency_targets(self.recipes[t.name], t.native, t.flavor):
                if dep not in order:
                    visit(dep)
            if t not in order:
                order.append(t)

        visit(target)
        return order

    def _check_dependencies(self) -> None:
        for recipe in self.recipes.values():
            for i, dep in enumerate(recipe.depends):
                try:
                    self.parse_target(dep)
                except RecipeError as exc:
                    raise recipe.doc.error(("depends", i), f"dependency {dep!r}: {exc.what}",
                                           hint=exc.hint) from None
            for i, tool in enumerate(recipe.build_tools):
                if tool == NATIVE:
                    continue
                try:
                    self.parse_target(tool)
                except RecipeError as exc:
                    raise recipe.doc.error(("build_tools", i), f"build tool {tool!r}: {exc.what}",
                                           hint=exc.hint) from None
        state: dict[str, int] = {}

        def visit(name: str, chain: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = " -> ".join(chain[chain.index(name):] + [name])
                first = self.recipes[chain[chain.index(name)]]
                raise RecipeError(f"dependency cycle: {cycle}", where=first.where(("depends",)))
            state[name] = 1
            for dep in self.recipes[name].depends:
                visit(self.parse_target(dep).name, chain + [name])
            state[name] = 2

        for name in self.recipes:
            visit(name, [])

