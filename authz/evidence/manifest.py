"""``manifest.json``: the SHA-256 of every file of a pack, signed with the archive's
checkpoint key (Ed25519, the same canonical-bytes signature as a checkpoint), and
``verify_pack``, which an examiner runs with the public key.

A pack is exactly ``evidence.json``, ``report.html``, ``report.pdf`` and the manifest: a
changed, missing or added file, or a manifest not signed by a given key, fails.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from authz.audit.chain import SigningKey
from authz.audit.events import canonical_bytes

MANIFEST = "manifest.json"
PACK_FILES = ("evidence.json", "report.html", "report.pdf")
KIND = "evidence-manifest"


def file_entry(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"name": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def sign_manifest(
    directory: Path, key: SigningKey, *, created_ms: int, about: Mapping[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": KIND,
        "v": 1,
        "created_ms": created_ms,
        "files": [file_entry(directory / name) for name in PACK_FILES],
        "key_id": key.key_id,
        **about,
    }
    sig = key.private_key.sign(canonical_bytes(body))
    body["sig"] = base64.b64encode(sig).decode("ascii")
    (directory / MANIFEST).write_bytes(canonical_bytes(body) + b"\n")
    return body


@dataclass
class PackCheck:
    directory: Path
    key_id: str = ""
    problems: list[str] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_pack(directory: Path, keys: Mapping[str, Ed25519PublicKey]) -> PackCheck:
    check = PackCheck(directory)
    try:
        doc: Any = json.loads((directory / MANIFEST).read_bytes())
    except OSError as exc:
        check.problems.append(f"{MANIFEST}: cannot read: {exc.strerror}")
        return check
    except ValueError:
        check.problems.append(f"{MANIFEST}: not JSON")
        return check
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        check.problems.append(f"{MANIFEST}: not an evidence manifest")
        return check
    check.manifest = doc
    check.key_id = str(doc.get("key_id"))
    pub = keys.get(check.key_id)
    if pub is None:
        check.problems.append(f"{MANIFEST}: signed by key id {check.key_id!r}, not a given key")
    else:
        try:
            sig = base64.b64decode(str(doc.get("sig", "")), validate=True)
            pub.verify(sig, canonical_bytes({k: v for k, v in doc.items() if k != "sig"}))
        except (InvalidSignature, ValueError):
            check.problems.append(f"{MANIFEST}: bad signature (the manifest was changed)")
    listed = doc.get("files")
    if not isinstance(listed, list):
        check.problems.append(f"{MANIFEST}: no file list")
        return check
    names = [e.get("name") for e in listed if isinstance(e, dict)]
    if sorted(str(n) for n in names) != sorted(PACK_FILES):
        check.problems.append(f"{MANIFEST}: lists {names}, not {list(PACK_FILES)}")
    for entry in listed:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        name = entry["name"]
        path = directory / Path(name).name
        try:
            now = file_entry(path)
        except OSError as exc:
            check.problems.append(f"{name}: missing ({exc.strerror})")
            continue
        check.files.append(now)
        if now["sha256"] != entry.get("sha256") or now["bytes"] != entry.get("bytes"):
            check.problems.append(
                f"{name}: changed (sha256 {now['sha256'][:16]}..., not the signed one)"
            )
    extra = sorted(p.name for p in directory.iterdir() if p.name not in (*PACK_FILES, MANIFEST))
    if extra:
        check.problems.append(f"files not in the manifest: {', '.join(extra)}")
    return check
