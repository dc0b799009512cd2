"""Push step-up for API clients: start, poll, and the grant an approval earns.

    identify   the bearer token, verified as the Check verifies it -> the session, and the
               ``login_hint`` (a claim of that token, never anything the client sends)
    start      the level and action the client names -> one pending request per session,
               starts counted per session and per user -> the IdP's backchannel endpoint
               (``login_hint``, ``acr_values``, a binding message naming the action,
               ``requested_expiry``) -> the sealed record -> ``ciba.started``
    poll       at most once per ``interval`` (a lease across replicas): pending, slow_down
               (the interval grows by 5 s), denied, expired, tokens; an IdP that does not
               answer is asked again later, backing off; the request's expiry ends it
    approve    the ID token (no nonce; its ``auth_req_id`` claim, when present, names this
               request) -> the one grant rule (``authz.core.grants``) for the session that
               started, the user matched by the profile's claim pair -> ``ciba.completed``,
               durably -> the grant -> "approved"
    status     what the starting session may read of its own request (nothing else may)

A request ends once: a remember-once marker decides which outcome is written (an approval
racing the expiry, two replicas polling), and an ``auth_req_id`` earns at most one grant.
"""

from __future__ import annotations

from authz.stepup.ciba.base import (
    SLOW_DOWN_S,
    BackchannelIdTokens,
    Caller,
    CibaRefused,
    Started,
    Who,
    audit_id,
)
from authz.stepup.ciba.outcome import OutcomeFlow
from authz.stepup.ciba.start import StartFlow

__all__ = [
    "SLOW_DOWN_S",
    "BackchannelIdTokens",
    "Caller",
    "CibaFlow",
    "CibaRefused",
    "Started",
    "Who",
    "audit_id",
]


class CibaFlow(StartFlow, OutcomeFlow):
    """The whole flow: ``identify`` and ``start`` (``start.py``), ``status`` and
    ``poll_if_due`` (``outcome.py``), over the parts ``base.FlowBase`` holds."""
