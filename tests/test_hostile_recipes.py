"""Hostile recipes: templates and YAML built to hang or exhaust the commands that read recipes. Each is
refused quickly with one recipe error (file:line and key path), never a hang or a traceback; the real
recipes stay well inside every limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_hostile import recipe_header

from wasmforge import yamlspans
from wasmforge.errors import RecipeError
from wasmforge.recipe import MAX_RECIPE_TEMPLATE_WORK, RecipeBook, load_recipe

HEADER = recipe_header()

# `invoke list` as it runs, on the recipes of a throw-away project (the checkout is where the
# configuration finds them).
INVOKE_LIST = """
import runpy, sys
from pathlib import Path
import wasmforge.config
root = Path(sys.argv[1])
wasmforge.config.project_root = lambda: root
sys.argv = ["invoke", "list"]
runpy.run_module("invoke", run_name="__main__")
"""


def _write(project, text: str, name: str = "bad") -> Path:
    path = project.root / "recipes" / f"{name}.yaml"
    path.write_text(text)
    return path


def _output(project, template: str) -> Path:
    """A recipe whose one output (line 8) is `template`."""
    return _write(project, HEADER + f"outputs: {{out: {json.dumps(template)}}}\n")


def _invoke_list(project, seconds: float = 10) -> str:
    """Run `invoke list`: it must fail within `seconds` with one message and no traceback."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", INVOKE_LIST, str(project.root)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "WASMFORGE_CACHE": str(project.config.cache_dir)})
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("error: ") == 1, result.stderr
    assert elapsed < seconds, f"invoke list took {elapsed:.1f} s"
    return result.stderr


def _resolve_error(path: Path, seconds: float = 5) -> RecipeError:
    start = time.monotonic()
    with pytest.raises(RecipeError) as info:
        load_recipe(path).resolve()
    assert time.monotonic() - start < seconds
    return info.value


# ----------------------------------------------------------------------------- templates (audit C)

@pytest.mark.parametrize("template, message", [
    # nested loops of 10^10 steps
    ("{% for a in 'x' * 100000 %}{% for b in 'x' * 100000 %}{% endfor %}{% endfor %}", "'{%' statements are not allowed"),
    # each power is allowed alone; together they make a number of 53 million bits
    ("${{ (((9**64)**64)**64)**64 > 1 }}", "exponent too large"),
    # strings of hundreds of megabytes, by widths
    ("${{ version.ljust(200000000) }}", "str.ljust: the number 200000000 is too large"),
    ("${{ '{:>500000000}'.format(1) }}", "access to attribute 'format' of 'str' object is unsafe"),
    ("${{ version|center(1000000000) }}", "center: the number 1000000000 is too large"),
    ("${{ version|indent(1000000000) }}", "indent: the number 1000000000 is too large"),
    ("${{ '%500000000d' % 1 }}", "%: the width 500000000 is too large"),
    ("${{ '%500000000d'|format(1) }}", "format: the width 500000000 is too large"),
])
def test_the_audited_templates_make_invoke_list_fail_fast(project, template, message):
    path = _output(project, template)
    stderr = _invoke_list(project)
    assert f"error: {path}:8: outputs.out: template refused: " in stderr and message in stderr, stderr
    assert "hint: " in stderr


@pytest.mark.parametrize("template, message", [
    # statements and comments of every spelling
    ("${{ version }} {%- if true %}x{% endif %}", "'{%' statements are not allowed"),
    ("{% raw %}${{ version }}{% endraw %}", "'{%' statements are not allowed"),
    ("${{ version }} {# a comment #}", "'{#' comments are not allowed"),
    # powers and products of numbers
    ("${{ 2 ** 4096 }}", "exponent too large"),
    ("${{ ('9' * 4000)|int * ('9' * 4000)|int }}", "number too large"),
    # sequences made long, directly or by replacing, joining, indenting, formatting, concatenating
    ("${{ [[1] * 1000] * 1000 * 1000 }}", "value too large"),
    ("${{ ('x' * 1000000)|replace('x', 'x' * 1000000) }}", "replace: value too large"),
    ("${{ ('x' * 1000000).replace('x', 'x' * 1000000) }}", "str.replace: value too large"),
    ("${{ ('x' * 1000).join(['y'] * 100000) }}", "str.join: value too large"),
    ("${{ ([1] * 250000)|join('x' * 500000) }}", "join: value too large"),
    ("${{ ('\\n' * 500000)|indent(1000000) }}", "indent: value too large"),
    ("${{ ('\\n' * 500000)|indent('y' * 500000) }}", "indent: value too large"),
    ("${{ '%(a)s%(a)s%(a)s' % {'a': 'x' * 1000000} }}", "%: value too large"),
    ("${{ '%*d' % (1000000000, 1) }}", "%: value too large"),
    ("${{ ('x' * 1000000) ~ ('x' * 1000000) }}", "~: value too large"),
    ("${{ ('x' * 1000000) + ('x' * 1000000) }}", "+: value too large"),
    ("${{ 'x'|center(1000000) }}${{ 'x'|center(1000000) }}", "renders to more than"),
    ("${{ ('x' * 1000000)|list }}", "list: value too large"),
    # work without a large value: long chains over long lists, adding up lists
    ("${{ ([0] * 100000)|batch(1)|batch(1)|batch(1)|batch(1)|batch(1)|batch(1)|batch(1)|list|length }}",
     "too much work"),
    ("${{ ([0] * 100000)|select('in', [0] * 100000)|list|length }}", "too much work"),
    ("${{ [[1] * 1000] * 1000|sum(start=[]) }}", "sum: only numbers can be added up"),
    # methods and filters that are not available
    ("${{ version.encode() }}", "access to attribute 'encode' of 'str' object is unsafe"),
    ("${{ version.translate({}) }}", "access to attribute 'translate' of 'str' object is unsafe"),
    ("${{ version.expandtabs(1000000) }}", "access to attribute 'expandtabs' of 'str' object is unsafe"),
    ("${{ (1).to_bytes(1000000000, 'big') }}", "access to attribute 'to_bytes' of 'int' object is unsafe"),
    ("${{ version|attr('format') }}", "access to attribute 'format' of 'str' object is unsafe"),
    ("${{ self._TemplateReference__context }}", "is unsafe"),
    ("${{ self() }}", "cannot be called in recipe templates"),
    # templates too long or too deep to compile
    ("${{ " + "(" * 300 + "1" + ")" * 300 + " }}", "nests too deeply"),
    ("${{ " + " + ".join(["1"] * 600) + " }}", "more than 1,000 tokens"),
    ("x" * (65 << 10) + "${{ version }}", "the templated value is too long"),
])
def test_hostile_templates_are_refused_quickly(project, template, message):
    path = _output(project, template)
    error = _resolve_error(path)
    assert message in error.what, error.render()
    assert error.where == f"{path}:8" and error.what.startswith("outputs.out: template refused: ")
    assert error.hint


@pytest.mark.parametrize("template, message", [
    ("${{ version|random }}", "No filter named 'random'"),
    ("${{ version|wordwrap(1) }}", "No filter named 'wordwrap'"),
])
def test_filters_without_bounds_are_not_available(project, template, message):
    path = _output(project, template)
    error = _resolve_error(path)
    assert message in error.what and error.where == f"{path}:8"


@pytest.mark.parametrize("template, rendered", [
    ("${{ '%02d' % minor|int }}-${{ version|replace('.', '[.]') }}", "00-1[.]0"),
    ("${{ version_parts|join('.') }}-${{ version.split('.')|first }}-${{ version.upper() }}", "1.0-1-1.0"),
    ("${{ '{%' }} ${{ '{#' }}", "{% {#"),
    ("${{ 2 ** 4095 > 2 ** 4094 }} ${{ 1 ** 1000000000000 }}", "True 1"),
    ("${{ version|center(9) }}|${{ version.zfill(5) }}|${{ 'a\\nb'|indent(2) }}", "   1.0   |001.0|a\n  b"),
    ("${{ [3, 1, 2]|sort|join(',') }} ${{ [1, 2, 2]|unique|list }} ${{ {'a': 1}|dictsort }}",
     "1,2,3 [1, 2] [('a', 1)]"),
    ("${{ version|map('upper')|join }} ${{ [1, 2]|sum }} ${{ '%s-%s'|format(name, version) }}", "1.0 3 bad-1.0"),
    ("${{ ('x' * 100000)|length }}", "100000"),
])
def test_ordinary_templates_still_render(project, template, rendered):
    path = _output(project, template)
    assert load_recipe(path).resolve().outputs == (("out", rendered),)


def test_the_work_of_all_a_recipes_templates_is_bounded(project):
    # Each value stays under its own budget; together they exhaust the recipe's.
    outputs = "\n".join(f"  o{i}: \"${{{{ ([0] * 150{i:03d})|sort|length }}}}\"" for i in range(300))
    path = _write(project, HEADER + "outputs:\n" + outputs + "\n")
    error = _resolve_error(path, seconds=10)
    assert "the recipe's templates together do too much work" in error.what
    assert error.where.startswith(f"{path}:") and error.what.startswith("outputs.o")


def test_the_real_recipes_are_far_inside_the_limits():
    book = RecipeBook.load(ROOT / "recipes")
    context = {"cc": "cc", "ar": "ar", "ranlib": "ranlib", "cflags": "-O2", "ldflags": "", "libs": "", "prefix": "/p",
               "destdir": "/d", "staged_prefix": "/d/p", "src": "/s", "jobs": 8, "host": "wasm32-wasi",
               "sysroot": "/sysroot", "config_site": "/c/config.site", "deps": {name: f"/deps/{name}" for name in book.recipes},
               "build_tools": {name: f"/tools/{name}" for name in book.recipes}}
    for recipe in book.recipes.values():
        for version in recipe.versions:
            for flavor in [None, *recipe.flavors]:
                package = recipe.resolve(version, flavor)
                for key, value in package.build.items():
                    package.render((key,), value, context)
        assert recipe.template_work.used < MAX_RECIPE_TEMPLATE_WORK // 50, (recipe.name, recipe.template_work.used)
        converter = yamlspans._Converter(yamlspans.SpannedDoc(file=recipe.file, data=None))
        converter.convert(yamlspans.yaml.compose(recipe.file.read_text(), Loader=yamlspans._LOADER), (), 0)
        assert converter.values < yamlspans.MAX_VALUES // 50 and converter.text < yamlspans.MAX_TEXT // 50


# ----------------------------------------------------------------------------- YAML (audit D)

def _aliased(project, text: str, uses: int) -> Path:
    """A recipe whose source.prepare lists one long string (line 9), then `uses` aliases of it."""
    head = HEADER.replace("name: bad", "name: bomb").replace('source: {url: "https://example.invalid/x.tar.gz"}\n', "")
    head = head.replace("build: {system: make}\n", "")
    body = (f'source:\n  url: "https://example.invalid/x.tar.gz"\n  prepare:\n    - &long "{text}"\n'
            + "".join("    - *long\n" for _ in range(uses)) + "build: {system: make}\n")
    path = _write(project, head + body, name="bomb")
    assert path.read_text().splitlines()[8].startswith("    - &long")
    return path


@pytest.mark.parametrize("uses", [1000, 20000])
@pytest.mark.parametrize("template", ["", "${{ version }}"])
def test_a_long_string_aliased_many_times_is_refused_quickly(project, uses, template):
    path = _aliased(project, template + "x" * 100_000, uses)
    stderr = _invoke_list(project, seconds=10)
    assert f"error: {path}:9: source.prepare[" in stderr, stderr
    assert f"expands to more than {yamlspans.MAX_TEXT:,} characters of text" in stderr


def test_a_few_aliases_of_a_short_string_are_fine(project):
    _aliased(project, "echo ${{ version }}", 100)
    recipe = RecipeBook.load(project.config.recipes_dir)["bomb"]
    assert recipe.resolve().sources[0].prepare == ("echo 1.0",) * 101


def test_a_long_text_without_aliases_and_a_huge_file_are_refused(project):
    path = _write(project, HEADER + f'summary2: "{"x" * (yamlspans.MAX_TEXT + 1)}"\n')
    start = time.monotonic()
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "characters of text" in info.value.what and info.value.where == f"{path}:8"
    path.write_text(HEADER + "# " + "x" * yamlspans.MAX_FILE_BYTES + "\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "is larger than" in info.value.what and info.value.where == f"{path}:1"
    assert time.monotonic() - start < 5
