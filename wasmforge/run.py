"""The shortest way to run a built module from a shell: `python -m wasmforge.run MODULE [options] -- ARGS`.

It loads only the runner (no recipes, no invoke), uses the precompiled module next to MODULE when
its key matches, and exits with the program's status. Options: --dir GUEST:HOST[:ro] (:ro: read-only), --env K=V,
--timeout SECONDS.
"""

from __future__ import annotations

import sys
from pathlib import Path

import wasmtime

from .errors import ToolchainError, WasmforgeError
from .runtime import WASM_STACK_BYTES, Runner, aot_value_text, reserve_std_fds, wasmtime_version
from .settings import MAX_SECONDS, positive_number
from .store import entry_containing

LAUNCHER_SOURCE = Path(__file__).parent / "launcher" / "wasmforge-run.c"


def build_launcher(cache_dir: Path) -> Path:
    """Compile `wasmforge-run` (launcher/wasmforge-run.c) against the wasmtime library of the Python
    package, once per wasmtime version: a fresh process that starts a precompiled module without Python."""
    # Imported here: `python -m wasmforge.run` starts modules and should not pay for them.
    import ctypes.util
    import hashlib
    import shutil
    import subprocess

    libraries = sorted(Path(wasmtime.__file__).parent.glob("*/_libwasmtime.so"))
    if not libraries:
        raise ToolchainError(f"the wasmtime package has no _libwasmtime.so in {Path(wasmtime.__file__).parent}")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise ToolchainError("building wasmforge-run needs a C compiler", hint="apt-get install gcc")
    # The launcher uses a .cwasm only when its key names this wasmtime, engine settings, architecture and
    # CPU, compared as the very text precompile writes; those texts are compiled in (and name the binary,
    # so another CPU sharing this cache gets its own launcher).
    header = _aot_header()
    digest = hashlib.sha256(header.encode()).hexdigest()[:12]
    launcher = cache_dir / "bin" / f"wasmforge-run-wasmtime-{wasmtime_version()}-{digest}"
    library = libraries[0]
    # The launcher finds the library by its absolute path (rpath): a recreated virtualenv moves it,
    # so the path it was linked against is kept beside it and a change relinks it.
    linked_against = launcher.with_name(launcher.name + ".library")
    if (launcher.exists() and launcher.stat().st_mtime >= LAUNCHER_SOURCE.stat().st_mtime
            and linked_against.exists() and linked_against.read_text() == str(library)):
        return launcher
    launcher.parent.mkdir(parents=True, exist_ok=True)
    tmp = launcher.with_name(launcher.name + ".tmp")
    # OpenSSL's libcrypto hashes the precompiled code before it is run (with the CPU's SHA instructions).
    crypto = ctypes.util.find_library("crypto")
    if not crypto:
        raise ToolchainError("building wasmforge-run needs OpenSSL's libcrypto", hint="apt-get install libssl3")
    header_file = launcher.with_name(launcher.name + ".h")
    header_file.write_text(header)
    result = subprocess.run([compiler, "-O2", "-Wall", "-include", str(header_file), "-o", str(tmp),
                             str(LAUNCHER_SOURCE), f"-L{library.parent}", f"-l:{library.name}", f"-l:{crypto}",
                             "-lpthread", f"-Wl,-rpath,{library.parent}"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ToolchainError("could not compile wasmforge-run", details=result.stderr[-2000:])
    tmp.replace(launcher)
    linked_against.write_text(str(library))
    return launcher


def _aot_header() -> str:
    """C definitions of the `"aot": ...` value texts that precompile writes for this machine."""
    lines = []
    for exceptions, name in ((True, "AOT_WITH_EXCEPTIONS"), (False, "AOT_WITHOUT_EXCEPTIONS")):
        text = aot_value_text(exceptions)
        literal = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        lines.append(f'#define {name} "{literal}"')
    lines.append(f"#define WASM_STACK_BYTES {WASM_STACK_BYTES}")
    return "\n".join(lines) + "\n"


def parse_dir(spec: str) -> tuple[str, Path, bool]:
    """--dir GUEST:HOST[:ro]: the guest path, the host directory, and whether the guest may change it."""
    guest, sep, host = spec.partition(":")
    if not sep or not guest.startswith("/"):
        raise WasmforgeError(f"--dir {spec!r}: expected GUEST:HOST[:ro] with an absolute guest path, e.g. /data:./data")
    host, readonly = (host[:-3], True) if host.endswith(":ro") else (host, False)
    return guest, Path(host).resolve(), not readonly


def split_dirs(specs: list[tuple[str, Path, bool]]) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """Parsed --dir options as (writable, read-only) lists for Runner.run."""
    return [(g, h) for g, h, w in specs if w], [(g, h) for g, h, w in specs if not w]


def unless_given(defaults: list[tuple[str, Path]], given: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """The default preopens whose guest path the caller did not preopen itself (what is given wins)."""
    taken = {guest for guest, _ in given}
    return [(guest, host) for guest, host in defaults if guest not in taken]


def launcher_options(readonly_dirs: list[tuple[str, Path]], env: dict[str, str] | None = None) -> list[str]:
    """The options of wasmforge-run (and of `python -m wasmforge.run`) that preopen `readonly_dirs`
    read-only and set `env`: how the commands pass a program's run defaults to a runner process."""
    return ([a for guest, host in readonly_dirs for a in ("--dir", f"{guest}:{host}:ro")]
            + [a for k, v in (env or {}).items() for a in ("--env", f"{k}={v}")])


def parse_env(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise WasmforgeError(f"--env {item!r}: expected K=V")
    return key, value


def check_stored_module(module: Path) -> None:
    """A module that lives in an artifact store entry is run only while the whole entry verifies."""
    found = entry_containing(module)
    if found is None:
        return
    store, key = found
    if problem := store.problem(key):
        raise WasmforgeError(f"{module} belongs to a damaged artifact store entry: {problem}",
                             where=str(store.entry(key)),
                             hint="nothing was run; rebuild it: invoke build <package>-<version>")


def main(args: list[str]) -> int:
    reserve_std_fds()
    if "--" in args:
        options, program_args = args[: args.index("--")], args[args.index("--") + 1:]
    else:
        options, program_args = args[:1], args[1:]
    if not options:
        print(__doc__, file=sys.stderr)
        return 2
    module = Path(options[0])
    dirs: list[tuple[str, Path, bool]] = []
    env: dict[str, str] = {}
    timeout: float | None = None
    rest = iter(options[1:])
    try:
        for option in rest:
            value = next(rest, None)
            if value is None or option not in ("--dir", "--env", "--timeout"):
                raise WasmforgeError(f"unknown option or missing value: {option}", hint="see: python -m wasmforge.run")
            if option == "--dir":
                dirs.append(parse_dir(value))
            elif option == "--env":
                env.update([parse_env(value)])
            else:
                timeout = positive_number("--timeout", value, maximum=MAX_SECONDS)
        check_stored_module(module)
        writable, readonly = split_dirs(dirs)
        result = Runner().run(module, [module.stem, *program_args], env=env, dirs=writable, timeout=timeout,
                              capture=False, readonly_dirs=readonly)
    except WasmforgeError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return 1
    if result.exit_code is None:
        print(f"{module.name}: {result.describe()}", file=sys.stderr)
    return result.status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
