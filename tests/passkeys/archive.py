"""The audit trail as production runs it, for the restore test: the stream the app's
Auditor wrote, archived by the real exporter into signed segments, then the real CLI."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import redis
from cryptography.hazmat.primitives import serialization

from authz.audit.archive import ArchiveWriter
from authz.audit.chain import SigningKey
from authz.audit.exporter import Exporter
from authz.audit.service import mac_ring
from tests.passkeys.harness import Stack


async def archive_stream(stack: Stack, directory: Path) -> tuple[Path, Path]:
    """Archive everything in the stack's audit stream into ``directory``; (dir, pubkey)."""
    assert stack.audit_stream is not None
    key = SigningKey.generate()
    url = stack.settings.redis.url
    assert url is not None

    def run() -> None:
        client = redis.Redis.from_url(url)
        try:
            exporter = Exporter(
                client,
                ArchiveWriter(directory, key, checkpoint_every=1),
                stream_key=stack.audit_stream or "",
                ring=mac_ring(stack.settings),
                trim=False,
            )
            exporter.start()
            while exporter.poll(block_ms=None):
                pass
            exporter.close()
        finally:
            client.close()

    await asyncio.to_thread(run)
    pub = directory.parent / f"{directory.name}.pub.pem"
    pub.write_bytes(
        key.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return directory, pub


async def restore_cli(stack: Stack, archive: tuple[Path, Path]) -> str:
    """``stepup-authz passkeys restore --from-archive`` as an operator runs it."""
    directory, pub = archive
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "authz.cli",
        "passkeys",
        "restore",
        "--config",
        str(stack.settings_file),
        "--from-archive",
        str(directory),
        "--pubkey",
        str(pub),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()
