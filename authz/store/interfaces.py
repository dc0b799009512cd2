"""What the rest of the service needs from a store, declared once.

Each consumer names the role it uses, so what it can do to the state is visible in its
signature: the Check path reads and learns (``CheckStore``), the step-up endpoints keep a
one-time state and write grants (``StepupStore``), the Sessions API writes grants, revokes
and lists (``AdminStore``). ``SessionStore`` is all of them: ``RedisSessionStore``
(``authz.store.sessions``) and the in-memory fake ``MemorySessionStore``
(``authz.store.memory``) both implement it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from authz.core.session import Grant, UserState

if TYPE_CHECKING:
    from authz.store.credentials import TransactionGrant


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One entry of a user's sessions index, with its live grants."""

    session: str  # the session key (hash), never the raw sid
    created: int
    last_seen: int
    ip: str | None
    device: str | None
    grants: tuple[Grant, ...]


class CheckStore(Protocol):
    """The Check path: one read per Check, and what an allow teaches (off the path)."""

    async def read_check(
        self,
        *,
        user: str,
        session: str,
        levels: Sequence[str],
        level: str,
        device: str | None,
        ip: str | None,
        sensitive: bool,
        window_s: int,
        now: int,
    ) -> UserState: ...

    async def note_allow(
        self,
        *,
        user: str,
        session: str,
        level: str,
        ip: str | None,
        device: str | None,
        now: int,
        lat: float | None = None,
        lon: float | None = None,
    ) -> None: ...


class TransactionGrants(Protocol):
    """The Check's part of transaction binding: take the grant for exactly one request
    (GETDEL: once, across replicas). ``authz.store.credentials`` implements it."""

    async def consume_transaction_grant(
        self, user: str, session: str, level: str, digest: str, now: int
    ) -> TransactionGrant | None: ...


class GrantStore(Protocol):
    """Recording a grant that ``authz.core.grants.grant_for`` produced."""

    async def write_grant(
        self, user: str, session: str, grant: Grant, now: int, *, remember_device: bool = True
    ) -> None: ...


class OnceStore(Protocol):
    async def remember_once(self, key: str, ttl_s: int) -> bool:
        """True the first time ``key`` is seen within ``ttl_s`` (a nonce, a proof's jti)."""
        ...


class StateStore(OnceStore, Protocol):
    """One-time step-up state: stored once (SET NX), consumed once (GETDEL); one-time
    nonces of step-up links."""

    async def put_state(self, state_id: str, payload: Mapping[str, Any], ttl_s: int) -> None: ...
    async def take_state(self, state_id: str) -> dict[str, Any] | None: ...


class StepupStore(GrantStore, StateStore, Protocol):
    """The step-up endpoints."""


class AdminStore(GrantStore, OnceStore, Protocol):
    """The Sessions API."""

    async def revoke_session(self, user: str, session: str, now: int) -> bool: ...
    async def revoke_user(self, user: str, now: int) -> int: ...
    async def list_sessions(self, user: str) -> list[SessionInfo]: ...


class SessionStore(CheckStore, StepupStore, AdminStore, Protocol):
    """Everything: what the composition root builds and hands out by role."""

    async def ping(self) -> bool: ...
    async def aclose(self) -> None: ...
