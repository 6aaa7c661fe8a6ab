"""Builds of small real projects with the real toolchain: drivers, dependencies, failures, locks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, make_tarball

from wasmforge.errors import BuildError, PatchError, RecipeError, SmokeTestError
from wasmforge.pipeline import build_target, read_manifest
from wasmforge.recipe import RecipeBook
from wasmforge.runtime import Runner

HELLO_C = '#include <stdio.h>\nint main(int c, char **v){ printf("hello %s\\n", c > 1 ? v[1] : "world"); return 0; }\n'
MAKEFILE = "hello: hello.c\n\t$(CC) $(CFLAGS) $(LDFLAGS) hello.c -o hello $(LIBS)\n"


def _source(project, name: str, version: str, files: dict[str, str]) -> str:
    """Put `name-version.tar.gz` in the project's mirror; return its sha256."""
    mirror = Path(project.config.mirrors[0])
    path = make_tarball(mirror / f"{name}-{version}.tar.gz", files, top=f"{name}-{version}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recipe(name: str, sha: str, body: str, *, version: str = "1.0", extra_version: str = "") -> str:
    return textwrap.dedent(f"""\
        name: {name}
        summary: test package {name}
        license: MIT
        versions:
          "{version}":
            sha256: {sha}
        {extra_version}
        source:
          url: https://example.invalid/{name}-${{{{ version }}}}.tar.gz
        """) + textwrap.dedent(body)


def _build(project, toolchain, target: str, **kwargs):
    book = RecipeBook.load(project.config.recipes_dir)
    messages: list[str] = []
    results = build_target(book, book.parse_target(target), project.config, toolchain, log=messages.append, **kwargs)
    return results, messages


HELLO_RECIPE = """\
    build:
      system: make
      cflags: [-O2]
      make: [hello]
      install: []
    outputs:
      hello: hello
    tests:
      - run: [hello, wasm]
        stdout: "hello wasm\\n"
    """


def test_make_build_outputs_manifest_and_up_to_date(project, toolchain):
    sha = _source(project, "hello", "1.0", {"hello.c": HELLO_C, "Makefile": MAKEFILE})
    project.recipe("hello", _recipe("hello", sha, HELLO_RECIPE))
    results, messages = _build(project, toolchain, "hello-1.0")
    out = results[-1].output
    assert out == project.config.outputs / "hello" / "1.0"
    assert (out / "bin" / "hello.wasm").exists() and (out / "bin" / "hello.cwasm").exists()
    manifest = read_manifest(out)
    assert manifest["inputs"]["sources"][0]["sha256"] == sha
    assert manifest["inputs"]["toolchain"]["clang"] == toolchain.clang_version
    assert manifest["outputs"]["bin/hello.wasm"]["size"] == (out / "bin" / "hello.wasm").stat().st_size
    assert manifest["tests"] == [{"name": "hello wasm", "passed": True, "seconds": manifest["tests"][0]["seconds"],
                                  "problems": []}]
    assert {s["name"] for s in manifest["steps"]} >= {"fetch+extract", "patch", "make", "precompile"}
    assert manifest["needs"] == {"hello": []}  # nothing beyond WASI preview 1
    assert (out / "logs").is_dir()
    assert not (project.config.outputs / ".work" / "hello-1.0").exists()
    assert Runner().run(out / "bin" / "hello.wasm", ["hello"]).stdout == b"hello world\n"

    again, messages = _build(project, toolchain, "hello-1.0")
    assert again[-1].reused and any("up to date" in m for m in messages)
    forced, _ = _build(project, toolchain, "hello-1.0", force=True)
    assert not forced[-1].reused and forced[-1].key == results[-1].key


GREET = {
    "configure.ac": "AC_INIT([greet], [1.0])\nAM_INIT_AUTOMAKE([foreign])\nAC_PROG_CC\nAM_PROG_AR\nAC_PROG_RANLIB\n"
                    "AC_CONFIG_FILES([Makefile greet.pc])\nAC_OUTPUT\n",
    "Makefile.am": "lib_LIBRARIES = libgreet.a\nlibgreet_a_SOURCES = greet.c\ninclude_HEADERS = greet.h\n"
                   "pkgconfigdir = $(libdir)/pkgconfig\npkgconfig_DATA = greet.pc\n"
                   "lib_LIBRARIES += libshout.a\nlibshout_a_SOURCES = shout.c\n"
                   "bin_PROGRAMS = greeter\ngreeter_SOURCES = main.c\ngreeter_LDADD = libgreet.a libshout.a\n",
    # libshout only in Libs.private: a static link (all of wasm) needs it, so pkg-config must be --static.
    "greet.pc.in": "prefix=@prefix@\nlibdir=${prefix}/lib\nincludedir=${prefix}/include\n\n"
                   "Name: greet\nDescription: test\nVersion: 1.0\nLibs: -L${libdir} -lgreet\nLibs.private: -lshout\n"
                   "Cflags: -I${includedir}\n",
    "greet.h": "const char *greeting(void);\n",
    "greet.c": '#include "greet.h"\nconst char *shout(void);\n#ifdef GREET_LOUD\n'
               'const char *greeting(void) { return shout(); }\n#endif\n',
    "shout.c": 'const char *shout(void) { return "HELLO FROM AUTOTOOLS"; }\n',
    "main.c": '#include <stdio.h>\n#include "greet.h"\nint main(void) { puts(greeting()); return 0; }\n',
}

APP_MAKEFILE = ("app: app.c\n\t$(CC) $(CFLAGS) $$(pkg-config --cflags greet) $(LDFLAGS) app.c -o app "
                "$$(pkg-config --libs greet) $(LIBS)\n")
APP_C = '#include <stdio.h>\n#include <greet.h>\nint main(void) { printf("app says %s\\n", greeting()); return 0; }\n'


def test_the_manifest_says_a_module_needs_exception_handling(project, toolchain):
    """setjmp/longjmp through wasm exception handling: runtimes differ on it (WasmEdge's AOT compiler
    refuses it), so the manifest says which programs need it."""
    jump = ("#include <setjmp.h>\n#include <stdio.h>\nstatic jmp_buf env;\n"
            "int main(void) { if (!setjmp(env)) longjmp(env, 7); printf(\"hello jumped\\n\"); return 0; }\n")
    sha = _source(project, "hello", "1.0", {"hello.c": jump, "Makefile": MAKEFILE})
    project.recipe("hello", _recipe("hello", sha, HELLO_RECIPE.replace("      cflags: [-O2]",
                                                                       "      cflags: [-O2]\n      exceptions: true")
                                    .replace("hello wasm", "hello jumped").replace("[hello, wasm]", "[hello]")))
    results, _ = _build(project, toolchain, "hello-1.0")
    assert read_manifest(results[-1].output)["needs"] == {"hello": ["exception handling"]}


@pytest.mark.skipif(not shutil.which("autoreconf"), reason="needs autoconf and automake (CI installs them)")
def test_autotools_dependency_seen_through_pkg_config(project, toolchain, tmp_path):
    # A real autoconf project: generate its configure script as a release tarball would have it.
    src = tmp_path / "greet-src"
    src.mkdir()
    for name, text in GREET.items():
        (src / name).write_text(text)
    subprocess.run(["autoreconf", "-fi"], cwd=src, check=True, capture_output=True)
    files = {str(p.relative_to(src)): p.read_text() for p in src.rglob("*")
             if p.is_file() and "autom4te.cache" not in p.parts}
    sha = _source(project, "greet", "1.0", files)
    project.recipe("greet", _recipe("greet", sha, """\
        build:
          system: autotools
          cflags: [-DGREET_LOUD]
          configure: [--disable-dependency-tracking]
        outputs:
          greeter: greeter
        tests:
          - run: [greeter]
            stdout: "HELLO FROM AUTOTOOLS\\n"
        """))
    app_sha = _source(project, "app", "1.0", {"app.c": APP_C, "Makefile": APP_MAKEFILE})
    project.recipe("app", _recipe("app", app_sha, """\
        depends: [greet]
        build:
          system: make
          make: [app]
          install: []
        outputs:
          app: app
        tests:
          - run: [app]
            stdout: "app says HELLO FROM AUTOTOOLS\\n"
        """))
    results, _ = _build(project, toolchain, "app")
    greet_out, app_out = results[0].output, results[1].output
    assert (greet_out / "lib" / "libgreet.a").exists() and (greet_out / "include" / "greet.h").exists()
    pc = (greet_out / "lib" / "pkgconfig" / "greet.pc").read_text()
    # Installed with DESTDIR for its store entry (build-output/greet/1.0 links there).
    assert f"prefix={results[0].prefix}\n" in pc and greet_out.resolve() == results[0].prefix
    manifest = read_manifest(app_out)
    assert manifest["inputs"]["dependencies"] == {"greet": results[0].key}
    assert all(t["passed"] for t in manifest["tests"])
    # The configure log shows it cross-compiled.
    log = (greet_out / "logs").glob("*configure.log")
    assert "--host=wasm32-wasip1" in next(log).read_text()


def test_cmake_driver(project, toolchain):
    sha = _source(project, "cm", "1.0", {
        # Function checks link a real module: wasi-libc has strdup but no dup (libzip's configure
        # found everything when checks only compiled a static library).
        "CMakeLists.txt": "cmake_minimum_required(VERSION 3.13)\nproject(cm C)\ninclude(CheckFunctionExists)\n"
                          "check_function_exists(strdup HAVE_STRDUP)\ncheck_function_exists(dup HAVE_DUP)\n"
                          "add_executable(cm main.c)\ninstall(TARGETS cm DESTINATION bin)\n"
                          "foreach(f STRDUP DUP)\n  if(HAVE_${f})\n    target_compile_definitions(cm PRIVATE HAVE_${f})\n"
                          "  endif()\nendforeach()\n",
        "main.c": '#include <stdio.h>\nint main(void) {\n#ifdef __wasi__\nputs("cmake for wasi");\n#endif\n'
                  '#ifdef HAVE_STRDUP\nputs("strdup");\n#endif\n#ifdef HAVE_DUP\nputs("dup");\n#endif\nreturn 0; }\n',
    })
    project.recipe("cm", _recipe("cm", sha, """\
        build:
          system: cmake
        outputs:
          cm: cm
        tests:
          - run: [cm]
            stdout: "cmake for wasi\\nstrdup\\n"
        """))
    results, _ = _build(project, toolchain, "cm")
    assert all(t["passed"] for t in read_manifest(results[-1].output)["tests"])


CXX_MAIN = """\
#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>
int main(int argc, char **argv) {
    std::vector<std::string> words(argv + 1, argv + argc);
    std::sort(words.begin(), words.end());
    std::map<std::string, int> counts;
    for (const auto &w : words) counts[w]++;
    std::string out;
    for (const auto &[w, n] : counts) out += w + "=" + std::to_string(n) + " ";
    std::printf("%s\\n", out.c_str());
    return 0;
}
"""


def test_cxx_build_in_a_subdirectory_links_libcxx_even_when_asked_for_libstdcxx(project, toolchain):
    # A make project whose build system lives in src/ (`subdir`), written in C++ (`cxx`), linking
    # -lstdc++ as configure scripts do: libc++ for WASI stands behind that name.
    sha = _source(project, "words", "1.0", {
        "README": "top of the source tree\n",
        "src/words.cpp": CXX_MAIN,
        "src/Makefile": "words: words.cpp\n\t$(CXX) $(CXXFLAGS) $(LDFLAGS) words.cpp -o words -lstdc++ $(LIBS)\n",
    })
    project.recipe("words", _recipe("words", sha, """\
        build:
          system: make
          subdir: src
          cxx: true
          cflags: [-O2]
          make: [words]
          install: []
        outputs:
          words: words
        tests:
          - run: [words, wasi, c++, wasi]
            stdout: "c++=1 wasi=2 \\n"
        """))
    results, _ = _build(project, toolchain, "words")
    manifest = read_manifest(results[-1].output)
    assert all(t["passed"] for t in manifest["tests"])
    # libc++ counts in the key of a C++ build.
    assert "libc++" in manifest["inputs"]["cxx"]


def test_compile_failure_shows_log_tail_and_path_and_leaves_no_output(project, toolchain):
    sha = _source(project, "hello", "1.0", {"hello.c": "int main(void) { return undefined_thing; }\n",
                                            "Makefile": MAKEFILE})
    project.recipe("hello", _recipe("hello", sha, HELLO_RECIPE))
    with pytest.raises(BuildError) as info:
        _build(project, toolchain, "hello-1.0")
    err = info.value
    assert "make step of hello-1.0 failed" in err.what
    assert err.where.endswith("hello.yaml:13")  # the build.make line
    assert "undefined_thing" in err.details
    log = project.config.outputs / ".work" / "hello-1.0" / "logs"
    assert f"full log: {log}" in err.details
    assert not (project.config.outputs / "hello" / "1.0").exists()


GENERATED_RECIPE = """\
    build:
      system: make
      host_packages: [sed]
      pre_configure:
        - sed 's/@WHO@/generated/' hello.c.in > hello.c
      make: [hello]
      install: []
    outputs:
      hello: hello
    tests:
      - run: [hello]
        stdout: "hello generated\\n"
    """


def test_pre_configure_generates_sources_with_a_host_tool(project, toolchain):
    template = HELLO_C.replace('"world"', '"@WHO@"')
    sha = _source(project, "hello", "1.0", {"hello.c.in": template, "Makefile": MAKEFILE})
    project.recipe("hello", _recipe("hello", sha, GENERATED_RECIPE))
    results, _ = _build(project, toolchain, "hello-1.0")
    manifest = read_manifest(results[-1].output)
    assert all(t["passed"] for t in manifest["tests"])
    assert "pre_configure-1" in {s["name"] for s in manifest["steps"]}

    project.recipe("hello", _recipe("hello", sha, GENERATED_RECIPE.replace("sed 's/", "no-such-generator 's/")))
    with pytest.raises(BuildError) as info:
        _build(project, toolchain, "hello-1.0")
    assert "pre_configure-1 step of hello-1.0 failed" in info.value.what
    assert info.value.where.endswith("hello.yaml:14")  # the pre_configure command
    assert "no-such-generator: command not found" in info.value.details


GEN_FILES = {
    # gen runs on the build machine and writes a header the wasm program is compiled with.
    "gen.c": '#include <stdio.h>\nint main(void) { printf("#define MESSAGE \\"made by gen on the build machine\\"\\n"); '
             'return 0; }\n',
    "app.c": '#include <stdio.h>\n#include "message.h"\nint main(void) { puts(MESSAGE); return 0; }\n',
    "Makefile": "GEN ?= ./gen\ngen: gen.c\n\t$(CC) gen.c -o gen\n"
                # The tree's own gen when GEN names it (the native build), else the one on PATH.
                "message.h: $(filter ./%,$(GEN))\n\t$(GEN) > message.h\n"
                "app: app.c message.h\n\t$(CC) $(CFLAGS) $(LDFLAGS) app.c -o app $(LIBS)\n"
                "install-gen: gen\n\tmkdir -p $(DESTDIR)$(PREFIX)/bin && cp gen $(DESTDIR)$(PREFIX)/bin/gen\n",
}
GEN_RECIPE = """\
    build_tools: [native]
    build:
      system: make
      # The tool by its prefix, and on PATH (GEN=gen): both are the native build's.
      pre_configure: ["test -x ${{ build_tools.gen }}/bin/gen"]
      make: [app, GEN=gen]
      install: []
    outputs:
      app: app
    native:
      build: {pre_configure: [], make: [gen, app], install: [install-gen]}
    tests:
      - run: [app]
        stdout: "made by gen on the build machine\\n"
    """


def test_a_build_tool_is_the_recipes_own_native_build_made_and_stored_first(project, toolchain):
    sha = _source(project, "gen", "1.0", GEN_FILES)
    project.recipe("gen", _recipe("gen", sha, GEN_RECIPE))
    results, messages = _build(project, toolchain, "gen-1.0")
    assert [r.target for r in results] == ["gen-1.0-native", "gen-1.0"]
    native, wasm = results
    assert (native.output / "bin" / "gen").is_file() and native.output == project.config.outputs / "gen" / "1.0-native"
    assert Runner().run(wasm.output / "bin" / "app.wasm", ["app"]).stdout == b"made by gen on the build machine\n"
    # The tool's key is an input of the build: a changed tool is a changed build.
    assert read_manifest(wasm.output)["inputs"]["build_tools"] == {"gen-1.0-native": native.key}
    book = RecipeBook.load(project.config.recipes_dir)
    assert book.parse_target("gen-1.0-native") == dataclasses.replace(book.parse_target("gen-1.0"), native=True)
    assert book.parse_target("gen-native").native
    again, _ = _build(project, toolchain, "gen-1.0")
    assert [r.reused for r in again] == [True, True]
    # The native build alone is a target of its own, shared from the store.
    alone, _ = _build(project, toolchain, "gen-1.0-native")
    assert [(r.target, r.reused, r.key) for r in alone] == [("gen-1.0-native", True, native.key)]


def test_a_build_tool_that_fails_stops_the_build_and_is_named(project, toolchain):
    sha = _source(project, "gen", "1.0", GEN_FILES)
    project.recipe("gen", _recipe("gen", sha, GEN_RECIPE.replace("make: [gen, app]", "make: [no-such-target]")))
    summary: list = []
    with pytest.raises(BuildError) as info:
        _build(project, toolchain, "gen-1.0", summary=summary)
    assert "make step of gen-1.0-native failed" in info.value.what
    assert [o.describe() for o in summary][-1] == "gen-1.0: not built (gen-1.0-native failed)"


@pytest.mark.parametrize("tools, message", [
    ("[gen]", "build_tools[0]: 'gen' is not a native build"),
    ("[nosuch-native]", "build_tools[0]: build tool 'nosuch-native': unknown package"),
    ("[gen-9.9-native]", "build_tools[0]: build tool 'gen-9.9-native': gen has no version '9.9'"),
])
def test_a_build_tool_must_be_a_native_build_of_a_known_recipe(project, tools, message):
    project.recipe("gen", _recipe("gen", "a" * 64, GEN_RECIPE.replace("[native]", tools)))
    with pytest.raises(RecipeError) as info:
        RecipeBook.load(project.config.recipes_dir)
    assert message in info.value.what
    assert info.value.where.endswith("gen.yaml:10")


def test_generated_files_must_match_their_pins(project, toolchain):
    template = HELLO_C.replace('"world"', '"@WHO@"')
    sha = _source(project, "hello", "1.0", {"hello.c.in": template, "Makefile": MAKEFILE})
    good = hashlib.sha256(template.replace("@WHO@", "generated").encode()).hexdigest()
    pinned = GENERATED_RECIPE.replace("      make: [hello]", f"      generated: {{hello.c: {good}}}\n      make: [hello]")
    project.recipe("hello", _recipe("hello", sha, pinned))
    results, _ = _build(project, toolchain, "hello-1.0")
    assert all(t["passed"] for t in read_manifest(results[-1].output)["tests"])

    # Another generator output (as another version of the host tool would write) stops before configure.
    project.recipe("hello", _recipe("hello", sha, pinned.replace("/generated/", "/regenerated/")))
    with pytest.raises(BuildError) as info:
        _build(project, toolchain, "hello-1.0")
    assert info.value.what == "hello.c was generated differently from the recipe's pin"
    assert info.value.where.endswith("hello.yaml:15")  # the pin's line
    bad = hashlib.sha256(template.replace("@WHO@", "regenerated").encode()).hexdigest()
    assert info.value.details == f"expected sha256 {good}\ngot      sha256 {bad}"

    project.recipe("hello", _recipe("hello", sha, pinned.replace("> hello.c", "> other.c")))
    with pytest.raises(BuildError) as info:
        _build(project, toolchain, "hello-1.0")
    assert info.value.what == "hello.c was not generated (no such file in the source tree)"

    # A version's own pins (generated files that differ from version to version) are checked the same way.
    per_version = _recipe("hello", sha, GENERATED_RECIPE.replace("/generated/", "/regenerated/"),
                          extra_version=f"    generated: {{hello.c: {good}}}")
    project.recipe("hello", per_version)
    with pytest.raises(BuildError) as info:
        _build(project, toolchain, "hello-1.0")
    assert info.value.details == f"expected sha256 {good}\ngot      sha256 {bad}"
    assert info.value.where.endswith("hello.yaml:" + str(per_version.splitlines().index(
        f"    generated: {{hello.c: {good}}}") + 1))


def test_patch_failure_names_the_patch_and_the_next_build_starts_clean(project, toolchain):
    sha = _source(project, "hello", "1.0", {"hello.c": HELLO_C, "Makefile": MAKEFILE})
    recipe = _recipe("hello", sha, HELLO_RECIPE, extra_version='    patches: "1"')
    project.recipe("hello", recipe)
    bad = project.patch("hello", "1", "0001-greeting.patch", textwrap.dedent("""\
        Change the greeting.

        --- a/hello.c
        +++ b/hello.c
        @@ -1,2 +1,2 @@
         #include <stdio.h>
        -int main(int c, char **v){ printf("HELLO %s\\n", c > 1 ? v[1] : "world"); return 0; }
        +int main(int c, char **v){ printf("patched %s\\n", c > 1 ? v[1] : "world"); return 0; }
        """))
    with pytest.raises(PatchError) as info:
        _build(project, toolchain, "hello-1.0")
    assert "0001-greeting.patch does not apply cleanly" in info.value.what
    assert f"{bad}:5: hunk #1 for hello.c" in info.value.details
    assert not (project.config.outputs / "hello" / "1.0").exists()
    # Fixed patch: the build starts from a fresh tree (a half-patched one would fail or differ).
    bad.write_text(bad.read_text().replace('"HELLO %s', '"hello %s'))
    project.recipe("hello", recipe.replace("hello wasm", "patched wasm"))
    results, _ = _build(project, toolchain, "hello-1.0")
    assert Runner().run(results[-1].output / "bin" / "hello.wasm", ["hello", "x"]).stdout == b"patched x\n"


def test_hanging_smoke_test_is_killed_and_reported(project, toolchain):
    sha = _source(project, "hang", "1.0", {"hello.c": "int main(void) { volatile int i = 0; for (;;) i++; }\n",
                                           "Makefile": MAKEFILE})
    project.recipe("hang", _recipe("hang", sha, """\
        build:
          system: make
          make: [hello]
          install: []
        outputs:
          hello: hello
        tests:
          - name: never returns
            run: [hello]
            timeout: 1
        """))
    with pytest.raises(SmokeTestError) as info:
        _build(project, toolchain, "hang")
    assert "1 of 1 smoke tests of hang-1.0 failed: never returns" in info.value.what
    assert "killed by the timeout" in info.value.details
    assert not (project.config.outputs / "hang" / "1.0").exists()


def test_two_builds_of_the_same_target_at_once(project, toolchain):
    sha = _source(project, "slow", "1.0", {"hello.c": HELLO_C, "Makefile": MAKEFILE})
    project.recipe("slow", _recipe("slow", sha, """\
        build:
          system: script
          script:
            - sleep 3 && make hello
        outputs:
          hello: hello
        """))
    code = textwrap.dedent(f"""\
        import sys
        from wasmforge.config import Config
        from wasmforge.recipe import RecipeBook
        from wasmforge.pipeline import build_target
        from wasmforge.toolchain import find_toolchain
        cfg = Config.from_env(root={str(project.root)!r}, output_dir={str(project.config.outputs)!r},
                              cache_dir={str(project.config.cache_dir)!r}, mirrors=({project.config.mirrors[0]!r},),
                              use_debian_archive=False)
        book = RecipeBook.load(cfg.recipes_dir)
        build_target(book, book.parse_target("slow"), cfg, find_toolchain(Config.from_env()), log=print)
        """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    second = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    out1, _ = first.communicate(timeout=120)
    out2, _ = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0
    both = out1 + out2
    assert "another build of slow-1.0 is running" in both
    assert both.count("slow-1.0: building") == 1
    assert "slow-1.0: up to date" in both
    manifest = json.loads((project.config.outputs / "slow" / "1.0" / "manifest.json").read_text())
    assert manifest["target"] == "slow-1.0"


def test_cli_errors_have_no_traceback():
    result = subprocess.run([sys.executable, "-m", "invoke", "build", "no-such-package-1.0"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert "error: unknown package in 'no-such-package-1.0'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("task", ["build", "run", "bench-serve", "list"])
def test_a_task_given_help_after_its_name_shows_its_help(task):
    result = subprocess.run([sys.executable, "-m", "invoke", task, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"Usage: inv[oke] [--core-opts] {task}" in result.stdout and "Docstring:" in result.stdout


def test_a_failing_dependency_stops_the_build_before_the_dependant_starts(project, toolchain):
    dep_sha = _source(project, "base", "1.0", {"hello.c": "int main(void) { return broken_symbol; }\n",
                                               "Makefile": MAKEFILE})
    project.recipe("base", _recipe("base", dep_sha, HELLO_RECIPE))
    app_sha = _source(project, "hello", "1.0", {"hello.c": HELLO_C, "Makefile": MAKEFILE})
    project.recipe("hello", _recipe("hello", app_sha, "    depends: [base]\n" + HELLO_RECIPE))
    with pytest.raises(BuildError) as info:
        _build(project, toolchain, "hello-1.0")
    assert "make step of base-1.0 failed" in info.value.what
    assert "broken_symbol" in info.value.details
    assert not (project.config.outputs / ".work" / "hello-1.0").exists()


def _slow_recipe(project, name: str, *, depends: str = "", fails: bool = False) -> None:
    body = "int main(void) { return broken_symbol; }\n" if fails else HELLO_C
    sha = _source(project, name, "1.0", {"hello.c": body, "Makefile": MAKEFILE})
    project.recipe(name, _recipe(name, sha, f"""\
        {depends}
        build:
          system: script
          script:
            - sleep 2 && echo "MAKEFLAGS=$MAKEFLAGS" && make hello
        outputs:
          hello: hello
        """))


def test_independent_dependencies_build_at_the_same_time_within_the_jobs_budget(project, toolchain):
    _slow_recipe(project, "left")
    _slow_recipe(project, "right")
    _slow_recipe(project, "top", depends="depends: [left, right]")
    project.config = dataclasses.replace(project.config, jobs=2)
    summary: list = []
    book = RecipeBook.load(project.config.recipes_dir)
    messages: list[str] = []
    results = build_target(book, book.parse_target("top"), project.config, toolchain, log=messages.append,
                           summary=summary)
    assert [r.target for r in results] == ["left-1.0", "right-1.0", "top-1.0"]
    # Both dependencies started before either finished; the dependant only after both.
    started = [m for m in messages if m.endswith(": building")]
    assert started[:2] == ["left-1.0: building", "right-1.0: building"] or \
        started[:2] == ["right-1.0: building", "left-1.0: building"]
    first_done = min(i for i, m in enumerate(messages) if ": built in" in m)
    assert max(messages.index("left-1.0: building"), messages.index("right-1.0: building")) < first_done
    assert messages.index("top-1.0: building") > max(i for i, m in enumerate(messages)
                                                     if m.startswith(("left-1.0: built", "right-1.0: built")))
    # One budget: every build's make gets the shared jobserver, and its own log.
    for name in ("left", "right"):
        log = (results[0 if name == "left" else 1].prefix / "logs" / "02-script-1.log").read_text()
        assert "--jobserver-auth=" in log and "-j2" in log
    assert [o.describe().split(" in ")[0] for o in summary] == ["left-1.0: built", "right-1.0: built", "top-1.0: built"]


def test_a_failing_branch_does_not_stop_unrelated_ones(project, toolchain):
    _slow_recipe(project, "bad", fails=True)
    _slow_recipe(project, "good")
    _slow_recipe(project, "top", depends="depends: [bad, good]")
    project.config = dataclasses.replace(project.config, jobs=2)
    summary: list = []
    book = RecipeBook.load(project.config.recipes_dir)
    with pytest.raises(BuildError) as info:
        build_target(book, book.parse_target("top"), project.config, toolchain, log=lambda m: None, summary=summary)
    assert "script-1 step of bad-1.0 failed" in info.value.what
    lines = [o.describe() for o in summary]
    assert lines[0].startswith("bad-1.0: FAILED: script-1 step of bad-1.0 failed")
    assert lines[1].startswith("good-1.0: built in ")
    assert lines[2] == "top-1.0: not built (bad-1.0 failed)"
    assert (project.config.outputs / "good" / "1.0" / "bin" / "hello.wasm").exists()
    assert not (project.config.outputs / "top" / "1.0").exists()
