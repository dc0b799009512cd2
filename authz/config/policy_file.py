"""Reading a policy file: YAML (``authz.config.yamlfile``) -> load_policy, with errors
pointing at a line and column.

Also the hot-reload holder: a ``PolicyHolder`` keeps the current policy and swaps in a new
one atomically only when it validates; a bad file leaves the last good policy in force.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from authz.config.yamlfile import load_yaml
from authz.core.policy import Policy, load_policy
from authz.errors import ConfigError, PolicyError


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    policy: Policy
    sha256: str
    path: Path

    @property
    def version(self) -> str:
        return self.policy.version or self.sha256[:12]


def parse_policy_text(text: str | bytes, source: str) -> LoadedPolicy:
    raw = text.encode() if isinstance(text, str) else text
    digest = hashlib.sha256(raw).hexdigest()
    try:
        parsed = load_yaml(raw, source)
    except ConfigError as exc:
        raise PolicyError(exc.reason, source=source, location=exc.location) from None
    try:
        policy = load_policy(parsed.doc, version="")
    except PolicyError as exc:
        raise PolicyError(exc.reason, source=source, location=parsed.locate(exc.location)) from exc
    return LoadedPolicy(policy=policy, sha256=digest, path=Path(source))


def read_policy(path: Path | str) -> LoadedPolicy:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read: {exc.strerror}", source=str(path)) from exc
    return parse_policy_text(raw, str(path))


class PolicyHolder:
    """The policy in force. Readers take ``current`` (one attribute read: atomic)."""

    def __init__(
        self,
        path: Path,
        on_reload: Callable[[str, LoadedPolicy | None, LoadedPolicy | None, str], None]
        | None = None,
    ) -> None:
        self.path = path
        self.current = read_policy(path)
        self._on_reload = on_reload
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[float, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size, st.st_ino)

    def changed(self) -> bool:
        return self._file_stamp() != self._stamp

    def reload(self) -> bool:
        """Re-read the file. True if a new policy is in force; False keeps the last good."""
        self._stamp = self._file_stamp()
        old = self.current
        try:
            new = read_policy(self.path)
        except PolicyError as exc:
            if self._on_reload:
                self._on_reload("error", old, None, str(exc))
            return False
        if new.sha256 == old.sha256:
            return False
        self.current = new
        if self._on_reload:
            self._on_reload("success", old, new, "")
        return True
