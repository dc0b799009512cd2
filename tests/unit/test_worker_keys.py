"""The key a `serve --workers N` supervisor writes for its workers when the settings name
no step-up link key: every worker's signers must accept it, whatever random bytes it got."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.config.settings import Settings
from authz.ops import workers
from authz.ops.workers import CONTEXT_KEY_ENV, shared_keys_env
from authz.stepup.link import ContextSigner
from authz.stepup.passkeys.links import LinkSigner

ROOT = Path(__file__).resolve().parents[2]


def _settings() -> Settings:
    return Settings.model_validate(
        {
            "policy_file": str(ROOT / "examples" / "policy.yaml"),
            "oidc": {"issuer": "http://idp.test", "client_id": "c", "audience": "a"},
            "stepup": {"public_url": "http://app.test"},
        }
    )


@pytest.mark.parametrize("random", [b"\n" * 48, b" " + b"k" * 46 + b"\t", bytes(range(48))])
def test_the_shared_link_key_survives_any_random_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, random: bytes
) -> None:
    """Raw random bytes ending in whitespace were stripped below 32 bytes when a worker
    read the file, and that worker exited at start (about one start in twenty)."""
    monkeypatch.setattr(workers.os, "urandom", lambda n: random[:n].ljust(n, b"\n"))
    env = shared_keys_env(_settings(), tmp_path)
    path = Path(env[CONTEXT_KEY_ENV])
    assert path.stat().st_mode & 0o777 == 0o600
    a = ContextSigner.from_file(path, 300)
    b = ContextSigner.from_file(path, 300)
    assert a.derived_key() == b.derived_key()  # two workers, one key
    LinkSigner.from_file(path)
