"""Who is calling the Sessions API, and may they do this.

Each caller is one entry of ``api.callers`` (``authz.admin.config``), identified by one of:

- mTLS: the listener verifies the certificate chain against ``api.tls.client_ca_file``;
  here the certificate's URI or DNS subject alternative names must include one of the
  caller's ``mtls_names``. The subject CN is never used: any certificate the CA signs may
  carry any CN, and Envoy and other mesh clients share that CA.
- a bearer secret of its own (``authorization: Bearer <secret>``), compared in constant
  time against every caller's secret (the time taken does not say which one matched).

``identify`` answers the caller or None; ``Callers.allows`` answers whether the caller's
scopes include an operation. A per-caller token bucket (``RateLimiter``) bounds how often
each caller may call (a leaked credential cannot sweep the user base).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc

from authz.admin.config import CallerSettings, Operation

_BEARER = b"bearer "
_MIN_SECRET = 16


@dataclass(frozen=True, slots=True)
class Caller:
    settings: CallerSettings
    secret: bytes | None = None

    @property
    def name(self) -> str:
        return self.settings.name


class Callers:
    """The configured callers, with their secrets read once from their files."""

    def __init__(self, callers: Iterable[Caller]) -> None:
        self.callers = tuple(callers)
        self._by_san: dict[str, Caller] = {
            n: c for c in self.callers for n in c.settings.mtls_names
        }
        self._bearers = [c for c in self.callers if c.secret is not None]
        for c in self._bearers:
            assert c.secret is not None
            if len(c.secret) < _MIN_SECRET:
                raise ValueError(f"caller {c.name}: the bearer secret needs >= 16 bytes")

    @classmethod
    def from_settings(cls, settings: Iterable[CallerSettings]) -> Callers:
        out = []
        for s in settings:
            secret = None
            if s.bearer_secret_file is not None:
                secret = s.bearer_secret_file.read_bytes().strip()
            out.append(Caller(s, secret))
        return cls(out)

    def identify(self, context: grpc.aio.ServicerContext) -> Caller | None:
        for name in peer_sans(context):
            found = self._by_san.get(name)
            if found is not None:
                return found
        presented = _bearer(context)
        if presented is None:
            return None
        match = None
        for c in self._bearers:  # every secret is compared: no early exit
            assert c.secret is not None
            if hmac.compare_digest(presented, c.secret):
                match = c
        return match

    @staticmethod
    def allows(caller: Caller, operation: Operation) -> bool:
        return operation in caller.settings.operations


def _bearer(context: grpc.aio.ServicerContext) -> bytes | None:
    for key, value in context.invocation_metadata() or ():
        if key != "authorization":
            continue
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if raw[: len(_BEARER)].lower() == _BEARER:
            return raw[len(_BEARER) :].strip()
    return None


def peer_sans(context: grpc.aio.ServicerContext) -> list[str]:
    """The verified client certificate's subject alternative names (empty without mTLS).
    Never the CN."""
    auth = context.auth_context() or {}
    if b"ssl" not in auth.get("transport_security_type", []):
        return []
    return [v.decode(errors="replace") for v in auth.get("x509_subject_alternative_name", [])]


@dataclass
class RateLimiter:
    """A token bucket per caller: ``per_minute`` calls, bursts up to a tenth of a minute's
    worth (at least one)."""

    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def allow(self, name: str, per_minute: int) -> bool:
        now = self.clock()
        capacity = max(1.0, per_minute / 10)
        tokens, last = self._buckets.get(name, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * per_minute / 60)
        if tokens < 1:
            self._buckets[name] = (tokens, now)
            return False
        self._buckets[name] = (tokens - 1, now)
        return True
