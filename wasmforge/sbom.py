"""What a package is made of and how: SPDX 2.3 and CycloneDX 1.6 SBOMs, and an in-toto statement with
the SLSA provenance v1 predicate (signed as a DSSE envelope with an ed25519 key when one is given).

All three are functions of a `release.Release` and nothing else (no clock, no host path, no random
number), so packaging a build twice gives the same bytes. They are checked against the formats'
own validators in the tests (spdx-tools, cyclonedx-python-lib).
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import WasmforgeError

if TYPE_CHECKING:  # at run time this module stays light: `invoke verify` needs no build machinery
    from .release import Component, PackagedFile, Release

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
# Our own identifiers: URNs, since wasmforge has no web address of its own to name them by.
BUILD_TYPE = "urn:wasmforge:build-type:recipe:v1"
# The licence of our own patches (and of wasmforge): shipped with every package that has patches.
PATCHES_LICENSE = "Apache-2.0"
NAMESPACE = uuid.UUID("6f1c1c0e-3a57-4f4e-9a53-77617366f267")  # for deterministic document ids


class SignatureError(WasmforgeError):
    """A signing key or signature that cannot be used."""


def documents(release: Release, sign_key: Path | None = None) -> dict[str, bytes]:
    """The SBOMs and provenance of a release, by file name."""
    statement = provenance_statement(release)
    line = json.dumps(dsse_envelope(statement, sign_key) if sign_key else statement, sort_keys=True,
                      separators=(",", ":"))
    return {
        release.spdx_name: _json(spdx_document(release)),
        release.cdx_name: _json(cyclonedx_document(release)),
        release.provenance_name: (line + "\n").encode(),
    }


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _timestamp(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ref(*parts: str) -> str:
    """An SPDX identifier: letters, digits, '.' and '-' only."""
    return "SPDXRef-" + "-".join("".join(c if c.isalnum() or c in ".-" else "-" for c in p) for p in parts)


def _tools(release: Release) -> list[tuple[str, str, str]]:
    """The toolchain as (name, version, where it came from)."""
    tc = release.toolchain
    tools = [("clang", str(tc.get("clang", "")), str(tc.get("kind", ""))),
             ("wasi-libc", str(tc.get("libc", "")), str(tc.get("kind", "")))]
    if opt := tc.get("wasm_opt"):
        tools.append(("wasm-opt", str(opt.get("version", "")), str(opt.get("origin", ""))))
    return tools


def _file_type(path: str) -> str:
    return "BINARY" if path.endswith(".wasm") else "TEXT" if not path.endswith(".json") else "OTHER"


# ----------------------------------------------------------------------------- SPDX 2.3

def spdx_document(release: Release) -> dict[str, Any]:
    main = release.main
    main_ref = _ref("Package", main.name)
    packages: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    relationships = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                      "relatedSpdxElement": main_ref}]
    verification = hashlib.sha1("".join(sorted(f.sha1 for f in release.files)).encode(),
                                usedforsecurity=False).hexdigest()
    for c in release.components:
        ref = _ref("Package", c.name)
        package: dict[str, Any] = {
            "SPDXID": ref, "name": c.name, "versionInfo": c.version, "downloadLocation": "NOASSERTION",
            "licenseConcluded": "NOASSERTION", "licenseDeclared": c.license, "copyrightText": "NOASSERTION",
            "summary": c.summary, "comment": f"built by wasmforge as {c.target} (build key {c.key})",
            "primaryPackagePurpose": "APPLICATION" if c is main else "LIBRARY",
        }
        if c.homepage:
            package["homepage"] = c.homepage
        if c is main:
            package["filesAnalyzed"] = True
            package["packageVerificationCode"] = {"packageVerificationCodeValue": verification}
            package["packageFileName"] = f"{release.name}.tar.gz"
        else:
            package["filesAnalyzed"] = False
        packages.append(package)
        source_ref = _ref("Source", c.name)
        source: dict[str, Any] = {
            "SPDXID": source_ref, "name": c.source.file, "versionInfo": c.version,
            "downloadLocation": c.source.url or "NOASSERTION", "filesAnalyzed": False,
            "checksums": [{"algorithm": "SHA256", "checksumValue": c.source.sha256}],
            "licenseConcluded": "NOASSERTION", "licenseDeclared": c.license, "copyrightText": "NOASSERTION",
            "primaryPackagePurpose": "SOURCE", "packageFileName": c.source.file,
        }
        if c.source.purl:
            source["externalRefs"] = [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                                       "referenceLocator": c.source.purl}]
            source["comment"] = "taken from Debian's source archive (the recipe's alternative source)"
        packages.append(source)
        relationships.append({"spdxElementId": ref, "relationshipType": "GENERATED_FROM",
                              "relatedSpdxElement": source_ref})
        for dep in c.depends:
            relationships.append({"spdxElementId": ref, "relationshipType": "STATIC_LINK",
                                  "relatedSpdxElement": _ref("Package", dep)})
        for i, patch in enumerate(c.patches):
            patch_ref = _ref("Patch", c.name, str(i + 1))
            files.append({"SPDXID": patch_ref, "fileName": patch.path,
                          "checksums": [{"algorithm": "SHA1", "checksumValue": patch.sha1},
                                        {"algorithm": "SHA256", "checksumValue": patch.sha256}],
                          "licenseConcluded": PATCHES_LICENSE, "copyrightText": "NOASSERTION",
                          "fileTypes": ["SOURCE"], "comment": "a wasmforge patch"})
            relationships.append({"spdxElementId": patch_ref, "relationshipType": "PATCH_APPLIED",
                                  "relatedSpdxElement": source_ref})
    for i, f in enumerate(release.files):
        file_ref = _ref("File", str(i + 1))
        files.append({"SPDXID": file_ref, "fileName": f"./{f.path}",
                      "checksums": [{"algorithm": "SHA1", "checksumValue": f.sha1},
                                    {"algorithm": "SHA256", "checksumValue": f.sha256}],
                      "licenseConcluded": "NOASSERTION", "copyrightText": "NOASSERTION",
                      "fileTypes": [_file_type(f.path)]})
        relationships.append({"spdxElementId": main_ref, "relationshipType": "CONTAINS",
                              "relatedSpdxElement": file_ref})
    for name, version, origin in _tools(release):
        tool_ref = _ref("Tool", name)
        packages.append({"SPDXID": tool_ref, "name": name, "versionInfo": version, "downloadLocation": "NOASSERTION",
                         "filesAnalyzed": False, "licenseConcluded": "NOASSERTION",
                         "licenseDeclared": "NOASSERTION", "copyrightText": "NOASSERTION",
                         "comment": f"from: {origin}", "primaryPackagePurpose": "APPLICATION"})
        for c in release.components:
            relationships.append({"spdxElementId": tool_ref, "relationshipType": "BUILD_TOOL_OF",
                                  "relatedSpdxElement": _ref("Package", c.name)})
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": release.name,
        "documentNamespace": f"https://spdx.org/spdxdocs/{release.name}-{uuid.uuid5(NAMESPACE, main.key)}",
        "creationInfo": {"created": _timestamp(release.epoch), "creators": [f"Tool: wasmforge-{release.wasmforge}"]},
        "packages": packages,
        "files": files,
        "relationships": relationships,
    }


def spdx_package_files(document: dict[str, Any]) -> dict[str, str]:
    """The files an SPDX document says its package contains: path -> sha256."""
    described = {r["relatedSpdxElement"] for r in document.get("relationships", [])
                 if r.get("relationshipType") == "DESCRIBES"}
    contained = {r["relatedSpdxElement"] for r in document.get("relationships", [])
                 if r.get("relationshipType") == "CONTAINS" and r.get("spdxElementId") in described}
    found = {}
    for f in document.get("files", []):
        if f.get("SPDXID") in contained:
            sums = {c["algorithm"]: c["checksumValue"] for c in f.get("checksums", [])}
            found[str(f.get("fileName", "")).removeprefix("./")] = sums.get("SHA256", "")
    return found


# ----------------------------------------------------------------------------- CycloneDX 1.6

def _cdx_ref(c: Component) -> str:
    return f"component:{c.name}@{c.version}"


def _cdx_component(c: Component, kind: str) -> dict[str, Any]:
    references: list[dict[str, Any]] = [{"type": "source-distribution", "url": c.source.url or c.source.purl
                                         or c.source.file,
                                         "hashes": [{"alg": "SHA-256", "content": c.source.sha256}],
                                         "comment": c.source.file}]
    if c.homepage:
        references.append({"type": "website", "url": c.homepage})
    component: dict[str, Any] = {
        "type": kind, "bom-ref": _cdx_ref(c), "name": c.name, "version": c.version, "description": c.summary,
        "licenses": [{"expression": c.license}], "externalReferences": references,
        "properties": [{"name": "wasmforge:build-key", "value": c.key},
                       {"name": "wasmforge:target", "value": c.target},
                       {"name": "wasmforge:recipe", "value": f"{c.recipe} sha256:{c.recipe_sha256}"}],
    }
    if c.patches:
        component["pedigree"] = {"patches": [{"type": "unofficial", "diff": {"url": p.path}} for p in c.patches]}
        component["properties"] += [{"name": "wasmforge:patch", "value": f"{p.path} sha256:{p.sha256}"}
                                    for p in c.patches]
    return component


def _cdx_file(f: PackagedFile) -> dict[str, Any]:
    return {"type": "file", "bom-ref": f"file:{f.path}", "name": f.path,
            "hashes": [{"alg": "SHA-1", "content": f.sha1}, {"alg": "SHA-256", "content": f.sha256}]}


def cyclonedx_document(release: Release) -> dict[str, Any]:
    main = _cdx_component(release.main, "application")
    main["components"] = [_cdx_file(f) for f in release.files]
    tools = [{"type": "application", "name": "wasmforge", "version": release.wasmforge}]
    tools += [{"type": "application" if name != "wasi-libc" else "library", "name": name, "version": version,
               "description": f"from: {origin}"} for name, version, origin in _tools(release)]
    dependencies = [{"ref": _cdx_ref(c), "dependsOn": sorted(_cdx_ref(d) for d in release.dependencies
                                                              if d.name in c.depends)}
                    for c in release.components]
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": f"urn:uuid:{uuid.uuid5(NAMESPACE, 'cyclonedx:' + release.main.key)}",
        "version": 1,
        "metadata": {"timestamp": _timestamp(release.epoch), "tools": {"components": tools}, "component": main},
        "components": [_cdx_component(d, "library") for d in release.dependencies],
        "dependencies": dependencies,
    }


def cyclonedx_package_files(document: dict[str, Any]) -> dict[str, str]:
    component = document.get("metadata", {}).get("component", {})
    found = {}
    for f in component.get("components", []):
        if f.get("type") == "file":
            sums = {h["alg"]: h["content"] for h in f.get("hashes", [])}
            found[str(f.get("name", ""))] = sums.get("SHA-256", "")
    return found


# ----------------------------------------------------------------------------- provenance

def provenance_statement(release: Release) -> dict[str, Any]:
    main = release.main
    resolved: list[dict[str, Any]] = []
    for c in release.components:
        source: dict[str, Any] = {"name": f"{c.name}: {c.source.file}", "digest": {"sha256": c.source.sha256}}
        if c.source.url or c.source.purl:
            source["uri"] = c.source.url or c.source.purl
        resolved.append(source)
        resolved += [{"name": f"{c.name}: {p.path}", "digest": {"sha256": p.sha256}} for p in c.patches]
        resolved.append({"name": f"{c.name}: {c.recipe}", "digest": {"sha256": c.recipe_sha256}})
    tools = {name: version for name, version, _ in _tools(release)}
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f.path, "digest": {"sha256": f.sha256}} for f in release.files],
        "predicateType": SLSA_PROVENANCE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"target": str(release.target), "flavor": main.flavor,
                                       "package": release.name},
                "internalParameters": {"build_key": main.key, "source_date_epoch": release.epoch,
                                       "dependency_keys": {d.name: d.key for d in release.dependencies}},
                "resolvedDependencies": resolved,
            },
            "runDetails": {
                "builder": {"id": f"urn:wasmforge:builder:{release.wasmforge}",
                            "version": {"wasmforge": release.wasmforge, **tools}},
                "metadata": {"invocationId": main.key},
            },
        },
    }


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _load_private_key(path: Path):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise SignatureError(f"cannot read the signing key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not an unencrypted PEM private key ({exc})",
                             hint="make one with: openssl genpkey -algorithm ed25519 -out key.pem") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an ed25519 key", hint="openssl genpkey -algorithm ed25519 -out key.pem")
    return key


def load_public_key(path: Path):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read the key {path}: {exc.strerror}") from None
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError):
        try:
            private = load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"{path} is not a PEM public key ({exc})",
                                 hint="openssl pkey -in key.pem -pubout -out key.pub") from None
        key = private.public_key() if isinstance(private, Ed25519PrivateKey) else private
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an ed25519 key")
    return key


def key_id(public_key) -> str:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


def dsse_envelope(statement: dict[str, Any], key_file: Path) -> dict[str, Any]:
    key = _load_private_key(key_file)
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    signature = key.sign(pae(PAYLOAD_TYPE, payload))  # ed25519 signatures are deterministic
    return {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": key_id(key.public_key()), "sig": base64.b64encode(signature).decode()}]}


def read_provenance(line: bytes) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The statement of a .intoto.jsonl line and, when signed, its DSSE envelope."""
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    if "payloadType" in value:
        if value.get("payloadType") != PAYLOAD_TYPE:
            raise ValueError(f"payloadType is {value.get('payloadType')!r}, not {PAYLOAD_TYPE}")
        statement = json.loads(base64.b64decode(value.get("payload", ""), validate=True))
        return statement, value
    return value, None


def check_signature(envelope: dict[str, Any], key_file: Path) -> str | None:
    """None when one of the envelope's signatures verifies with the key; else what is wrong."""
    from cryptography.exceptions import InvalidSignature
    key = load_public_key(key_file)
    payload = base64.b64decode(envelope.get("payload", ""), validate=True)
    signatures = envelope.get("signatures") or []
    if not signatures:
        return "the envelope has no signature"
    for entry in signatures:
        try:
            key.verify(base64.b64decode(entry.get("sig", ""), validate=True), pae(PAYLOAD_TYPE, payload))
            return None
        except (InvalidSignature, ValueError):
            continue
    return f"no signature verifies with the key {key_file} (key id {key_id(key)[:16]})"
