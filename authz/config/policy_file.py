"""Reading a policy file: YAML -> load_policy, with errors pointing at a line and column.

Also the hot-reload holder: a ``PolicyHolder`` keeps the current policy and swaps in a new
one atomically only when it validates; a bad file leaves the last good policy in force.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from authz.core.policy import Policy, load_policy
from authz.errors import PolicyError


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    policy: Policy
    sha256: str
    path: Path

    @property
    def version(self) -> str:
        return self.policy.version or self.sha256[:12]


def _locate(node: yaml.Node | None, location: str) -> str:
    """Follow a dotted location (``routes.2.level``) through the YAML node tree."""
    if node is None or not location:
        return f"line {node.start_mark.line + 1}" if node is not None else ""
    for part in location.split("."):
        nxt: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == part:
                    nxt = value
                    break
        elif isinstance(node, yaml.SequenceNode) and part.isdigit():
            idx = int(part)
            nxt = node.value[idx] if idx < len(node.value) else None
        if nxt is None:
            break
        node = nxt
    mark = node.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1} ({location})"


def parse_policy_text(text: str | bytes, source: str) -> LoadedPolicy:
    raw = text.encode() if isinstance(text, str) else text
    digest = hashlib.sha256(raw).hexdigest()
    try:
        node = yaml.compose(raw, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"invalid YAML: {problem}", source=source, location=where) from exc
    try:
        policy = load_policy(doc, version="")
    except PolicyError as exc:
        raise PolicyError(exc.reason, source=source, location=_locate(node, exc.location)) from exc
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
