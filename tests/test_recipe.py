"""Recipe validation: every mistake is reported with file, line and key path."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from wasmforge.config import Config
from wasmforge.errors import RecipeError
from wasmforge.recipe import RecipeBook, load_recipe, spdx_problem

SHA = "a" * 64

GOOD = f"""\
name: tiny
summary: a tiny test package
license: MIT
versions:
  "1.0":
    sha256: {SHA}
  "1.1":
    sha256: {"b" * 64}
source:
  url: https://example.invalid/tiny-${{{{ version }}}}.tar.gz
build:
  system: make
  cflags: [-O2]
outputs:
  hello: hello
flavors:
  small:
    build: {{cflags: [-Os]}}
tests:
  - run: [hello, "${{{{ version }}}}"]
    stdout: "hi ${{{{ major }}}}\\n"
"""


def test_good_recipe_renders(project):
    project.recipe("tiny", GOOD)
    book = RecipeBook.load(project.config.recipes_dir)
    pkg = book.package(book.parse_target("tiny-1.1"))
    assert pkg.sources[0].url == "https://example.invalid/tiny-1.1.tar.gz"
    assert pkg.sources[0].sha256 == "b" * 64
    assert pkg.tests[0].steps[0].run == ("hello", "1.1")
    assert pkg.tests[0].steps[0].stdout.text == "hi 1\n"
    small = book.package(book.parse_target("tiny-1.0-small"))
    assert small.build["cflags"] == ["-O2", "-Os"]
    assert small.output_key == "1.0-small"
    assert book.parse_target("tiny").version == "1.0"


def _error(project, text: str) -> RecipeError:
    path = project.recipe("tiny", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return info.value


def test_unknown_key_names_file_line_and_path(project):
    err = _error(project, GOOD.replace("  cflags: [-O2]", "  cflags: [-O2]\n  cflgs: [-O3]"))
    assert err.where.endswith("tiny.yaml:14")
    assert "build.cflgs: unknown key" in err.what
    assert "allowed keys" in err.hint


def test_wrong_type(project):
    err = _error(project, GOOD.replace("cflags: [-O2]", "cflags: -O2"))
    assert "build.cflags: must be a list" in err.what
    assert err.where.endswith(":13")


def test_missing_sha256(project):
    err = _error(project, GOOD.replace(f"    sha256: {SHA}\n", "    patches: '1'\n"))
    assert 'versions."1.0"' in err.what and "missing required key 'sha256'" in err.what
    assert err.where.endswith(":5")


def test_bad_sha256(project):
    err = _error(project, GOOD.replace(SHA, "abc"))
    assert "sha256" in err.what and "64" in err.what


def test_unquoted_version_is_explained(project):
    err = _error(project, GOOD.replace('"1.0":', "1.0:"))
    assert "must be a string" in err.what and "quote" in err.hint


def test_yaml_syntax_error_has_line(project):
    err = _error(project, GOOD.replace("  system: make", "  system: [make"))
    assert "YAML syntax error" in err.what
    assert err.where.endswith((":12", ":13"))


def test_test_program_must_be_an_output(project):
    err = _error(project, GOOD.replace("run: [hello,", "run: [bye,"))
    assert "'bye' is not one of this recipe's outputs" in err.what


def test_name_must_match_file(project):
    err = _error(project, GOOD.replace("name: tiny", "name: other"))
    assert "does not match the file name" in err.what


def test_template_error_points_at_value(project):
    project.recipe("tiny", GOOD.replace("tiny-${{ version }}", "tiny-${{ verison }}"))
    book = RecipeBook.load(project.config.recipes_dir)
    with pytest.raises(RecipeError) as info:
        book.package(book.parse_target("tiny-1.0"))
    assert "source.url: template error" in info.value.what
    assert "verison" in info.value.what
    assert info.value.where.endswith(":10")


def test_unknown_dependency(project):
    project.recipe("tiny", GOOD.replace("build:\n", "depends: [nosuch]\nbuild:\n"))
    with pytest.raises(RecipeError) as info:
        RecipeBook.load(project.config.recipes_dir)
    assert "dependency 'nosuch'" in info.value.what
    assert info.value.where.endswith("tiny.yaml:11")


def test_dependency_cycle(project):
    project.recipe("tiny", GOOD.replace("build:\n", "depends: [other]\nbuild:\n"))
    project.recipe("other", GOOD.replace("name: tiny", "name: other").replace("build:\n", "depends: [tiny]\nbuild:\n"))
    with pytest.raises(RecipeError) as info:
        RecipeBook.load(project.config.recipes_dir)
    assert "dependency cycle" in info.value.what
    assert "other -> tiny -> other" in info.value.what or "tiny -> other -> tiny" in info.value.what


def test_unknown_package_version_and_flavor(project):
    project.recipe("tiny", GOOD)
    book = RecipeBook.load(project.config.recipes_dir)
    with pytest.raises(RecipeError, match="unknown package"):
        book.parse_target("huge-1.0")
    with pytest.raises(RecipeError, match="has no version '2.0'"):
        book.parse_target("tiny-2.0")
    with pytest.raises(RecipeError, match="no flavor 'big'"):
        book.parse_target("tiny-1.0-big")


def test_build_order_puts_dependencies_first(project):
    project.recipe("tiny", GOOD.replace("build:\n", "depends: [base]\nbuild:\n"))
    project.recipe("base", GOOD.replace("name: tiny", "name: base"))
    book = RecipeBook.load(project.config.recipes_dir)
    assert [str(t) for t in book.build_order(book.parse_target("tiny-1.1"))] == ["base-1.0", "tiny-1.1"]


def test_the_real_recipes_load_and_render():
    config = Config.from_env()
    book = RecipeBook.load(config.recipes_dir)
    assert {"zlib", "sqlite", "lua"} <= set(book.recipes)
    for recipe in book.recipes.values():
        for version in recipe.versions:
            for flavor in [None, *recipe.flavors]:
                pkg = recipe.resolve(version, flavor)
                assert pkg.sources[0].sha256 == recipe.versions[version]["sha256"]
    sqlite = book.package(book.parse_target("sqlite-3.46.1"))
    assert sqlite.sources[0].url.endswith("/sqlite-autoconf-3460100.tar.gz")


def test_flavor_replace_and_native_section(project):
    text = GOOD.replace("""flavors:
  small:
    build: {cflags: [-Os]}""", """flavors:
  small:
    build: {cflags: [-Os]}
  bare:
    replace: [cflags]
    build: {cflags: [-O0]}
native:
  packages: [zlib1g-dev]
  build: {cflags: [-O3], libs: []}""")
    project.recipe("tiny", text)
    book = RecipeBook.load(project.config.recipes_dir)
    assert book.package(book.parse_target("tiny-1.0-bare")).build["cflags"] == ["-O0"]
    native = book.package(dataclasses.replace(book.parse_target("tiny-1.0"), native=True))
    assert native.native and native.build["cflags"] == ["-O3"] and native.depends == ()
    assert native.tests == () and native.output_key == "1.0-native"


@pytest.mark.parametrize("license, message", [
    ("Foo-1.0", "Unknown license key"),
    ("MIT AND", "AND requires two or more licenses"),
    ("mit", "write it as 'MIT'"),
    ("MIT OR (Zlib", "not a valid SPDX license expression"),
])
def test_the_licence_must_be_a_valid_spdx_expression(project, license, message):
    path = project.recipe("lic", textwrap.dedent(f"""\
        name: lic
        summary: s
        license: "{license}"
        versions: {{"1.0": {{sha256: {"a" * 64}}}}}
        source: {{url: "https://example.invalid/x.tar.gz"}}
        build: {{system: make}}
        """))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert message in info.value.what and info.value.where == f"{path}:3"


def test_the_recipes_licences_are_spdx(project):
    for name in ("MIT", "PHP-3.01", "blessing", "Zlib", "BSD-2-Clause", "MIT AND Zlib"):
        assert spdx_problem(name) is None


def test_a_flavor_links_a_subset_of_the_dependencies(tmp_path):
    from conftest import ROOT

    book = RecipeBook.load(ROOT / "recipes")
    assert [str(t) for t in book.build_order(book.parse_target("php-7.4.33-slim"))] == ["php-7.4.33-slim"]
    assert [str(t) for t in book.build_order(book.parse_target("php-7.4.33-portable"))][-2:] == [
        "icu-72.1", "php-7.4.33-portable"]
    assert book.package(book.parse_target("php-7.4.33-slim")).depends == ()
    path = tmp_path / "app.yaml"
    path.write_text("name: app\nsummary: s\nlicense: MIT\nversions: {'1.0': {sha256: " + "ab" * 32 + "}}\n"
                    "source: {url: 'https://example.invalid/app.tar.gz'}\nbuild: {system: make}\n"
                    "depends: [zlib]\nflavors:\n  small:\n    depends: [sqlite]\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}:10: flavors.small.depends[0]" in info.value.render() and "'sqlite' is not in the recipe's depends" in info.value.render()


BENCH = """\
bench:
  startup: [hello, -q]
  workloads:
    - {name: the loop, file: examples/loop.txt, run: [hello, loop.txt]}
  peer: {name: another build, versions: ["1.0"], npm: toolchain/peers/x, run: [node, run.mjs]}
"""


@pytest.mark.parametrize("change, where, message", [
    (("run: [hello, loop.txt]", "run: [hello, other.txt]"), ":25", "does not run the script 'loop.txt'"),
    (("file: examples/loop.txt,", "file: examples/loop.txt, source: loop.txt,"), ":25",
     "a workload's script is either 'source' (a file of the source tree) or 'file' (a file of this checkout)"),
    (("startup: [hello, -q]", "startup: [bye]"), ":23", "must start with one of this recipe's outputs"),
    (("startup: [hello, -q]", "startup: []"), ":23", "must start with one of this recipe's outputs"),
    (("run: [hello, loop.txt]", "run: []"), ":25", "does not run the script 'loop.txt'"),
    (("npm: toolchain/peers/x", "npm: ../x"), ":26", "is not a relative path"),
    (("versions: [\"1.0\"], ", ""), ":26", "missing required key 'versions'"),
])
def test_the_bench_section_is_checked(project, change, where, message):
    err = _error(project, GOOD + BENCH.replace(*change))
    assert message in err.what
    assert err.where.endswith(where), err.where


def test_the_bench_section_is_read(project):
    project.recipe("tiny", GOOD + BENCH)
    book = RecipeBook.load(project.config.recipes_dir)
    bench = book.package(book.parse_target("tiny-1.0")).recipe.bench
    assert bench["startup"] == ["hello", "-q"] and bench["peer"]["run"] == ["node", "run.mjs"]


CONFORMANCE = """\
conformance:
  driver: php-run-tests
  programs: {cli: hello, cgi: hello}
  suites: [tests, ext/a/tests]
  report: "docs/conformance-${{ major }}.md"
"""


@pytest.mark.parametrize("change, where, message", [
    (("driver: php-run-tests", "driver: make-check"), ":23", "'make-check' is not one of: php-run-tests"),
    (("{cli: hello, cgi: hello}", "{cli: hello}"), ":24", "the php-run-tests driver needs a program for 'cgi'"),
    (("{cli: hello, cgi: hello}", "{cli: hello, cgi: hello, web: hello}"), ":24",
     "the php-run-tests driver has no program 'web'"),
    (("{cli: hello, cgi: hello}", "{cli: hello, cgi: bye}"), ":24", "'bye' is not one of this recipe's outputs"),
    (("[tests, ext/a/tests]", "[tests, ../elsewhere]"), ":25", "is not a relative path"),
    (('  report: "docs/conformance-${{ major }}.md"\n', ""), ":22", "missing required key 'report'"),
])
def test_the_conformance_section_is_checked(project, change, where, message):
    err = _error(project, GOOD + CONFORMANCE.replace(*change))
    assert message in err.what
    assert err.where.endswith(where), err.where


def test_the_conformance_report_is_rendered_per_version_and_stays_in_the_checkout(project):
    project.recipe("tiny", GOOD + CONFORMANCE)
    book = RecipeBook.load(project.config.recipes_dir)
    package = book.package(book.parse_target("tiny-1.1"))
    assert package.recipe.conformance["suites"] == ["tests", "ext/a/tests"]
    assert package.conformance_report() == "docs/conformance-1.md"
    # Suites are rendered per version too (upstream renames test modules between releases).
    project.recipe("tiny", GOOD + CONFORMANCE.replace("ext/a/tests", "\"ext/${{ 'new' if minor == '1' else 'old' }}\""))
    book = RecipeBook.load(project.config.recipes_dir)
    assert book.package(book.parse_target("tiny-1.1")).conformance_suites() == ["tests", "ext/new"]
    project.recipe("tiny", GOOD + CONFORMANCE.replace("ext/a/tests", "\"${{ '/etc' }}\""))
    book = RecipeBook.load(project.config.recipes_dir)
    with pytest.raises(RecipeError) as info:
        book.package(book.parse_target("tiny-1.1")).conformance_suites()
    assert "'/etc' is not a plain relative path" in info.value.what
    project.recipe("tiny", GOOD + CONFORMANCE.replace("docs/conformance-${{ major }}.md", "/etc/${{ name }}"))
    book = RecipeBook.load(project.config.recipes_dir)
    with pytest.raises(RecipeError) as info:
        book.package(book.parse_target("tiny-1.1")).conformance_report()
    assert "conformance.report: '/etc/tiny' is not a plain relative path" in info.value.what
    assert info.value.where.endswith(":26")


def test_every_conformance_driver_a_recipe_may_name_is_implemented():
    from wasmforge.conformance import DRIVERS
    from wasmforge.recipe import CONFORMANCE_DRIVERS

    assert set(DRIVERS) == set(CONFORMANCE_DRIVERS)


def test_native_outputs_name_the_same_programs(project):
    err = _error(project, GOOD + "native:\n  outputs: {hello: hello, extra: x}\n")
    assert "native.outputs: names other programs than the recipe's outputs" in err.what
    project.recipe("tiny", GOOD + "native:\n  outputs: {hello: build/hello}\n")
    book = RecipeBook.load(project.config.recipes_dir)
    native = book.package(dataclasses.replace(book.parse_target("tiny-1.0"), native=True))
    assert native.outputs == (("hello", "build/hello"),)
    assert book.package(book.parse_target("tiny-1.0")).outputs == (("hello", "hello"),)
