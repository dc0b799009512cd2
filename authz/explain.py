"""`stepup-authz policy explain`: decide one request offline -- no token, Redis or IdP --
with the service's own pipeline (``authz.core.decision.decide``), and say why: the route,
the rules that fired (and shadow rules that would have), the signals and the risk score.

The request file is JSON; its schema is ``authz.config.explain_request.ExplainRequest``:
``method``, ``host``, ``path``, ``headers``, ``source_ip``, ``context_extensions``,
verified ``claims`` (iss, sub, sid, acr, amr, auth_time, iat, exp), and optionally
``grants`` (level, acr, amr, auth_time, expires_at, issued_at, device, ip), ``device`` (id,
source, managed, compliant, platform), ``state`` (device_known, ip_known, level_seen,
velocity, session_revoked, revoked_before, last_seen {at, ip, lat, lon}), ``geo``
(country, lat, lon), ``now`` and ``leeway``. A file that does not fit is refused with
every wrong field named (``RequestFileError``), never a Python message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from pydantic import ValidationError

from authz.config.explain_request import ExplainRequest, State
from authz.config.policy_file import LoadedPolicy
from authz.core.attributes import RequestAttributes, canonicalize_path, normalize_host, parse_ip
from authz.core.decision import CheckInputs, decide
from authz.core.session import Evidence, Grant, Identity, Sighting, UserState
from authz.core.signals import Device, Geo
from authz.errors import ConfigError

# The request file's schema is authz.config.explain_request (also what the CLI reads the
# file through, with line and column in its errors): one definition.
RequestFile = ExplainRequest


class RequestFileError(ConfigError):
    code = "request-file-invalid"


def read_request(doc: Any, source: str = "request") -> RequestFile:
    """Validate a parsed request document; RequestFileError names every wrong field."""
    try:
        return RequestFile.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(document)'}: {e['msg']}"
            for e in exc.errors()
        )
        raise RequestFileError(problems, source=source) from None


def attributes_of(req: RequestFile) -> RequestAttributes:
    path, query = canonicalize_path(req.path)
    return RequestAttributes(
        method=req.method,
        scheme=req.scheme,
        host=normalize_host(req.host),
        path=path,
        query=query,
        headers=MappingProxyType({k.lower(): v for k, v in req.headers.items()}),
        source_ip=parse_ip(req.source_ip),
        context_extensions=MappingProxyType(dict(req.context_extensions)),
    )


def _evidence(acr: str | None, amr: list[str], auth_time: int | None) -> Evidence:
    return Evidence(acr, tuple(amr), auth_time)


def inputs_of(req: RequestFile, now: int) -> CheckInputs:
    """What the service would have gathered: identity, state, device, GeoIP."""
    identity = None
    state = None
    c = req.claims
    if c is not None:
        identity = Identity(
            issuer=c.iss,
            subject=c.sub,
            session_id=c.sid or "",
            evidence=_evidence(c.acr, c.amr, c.auth_time),
            expires_at=c.exp if c.exp is not None else now + 3600,
            issued_at=c.iat if c.iat is not None else now,
        )
        grants = tuple(
            Grant(
                level=g.level,
                evidence=_evidence(g.acr, g.amr, g.auth_time),
                expires_at=g.expires_at,
                issued_at=g.issued_at if g.issued_at is not None else now,
                device=g.device,
                ip=g.ip,
            )
            for g in req.grants
        )
        s = req.state or State()
        last = s.last_seen
        state = UserState(
            grants=grants,
            session_revoked=s.session_revoked,
            revoked_before=s.revoked_before,
            device_known=s.device_known,
            ip_known=s.ip_known,
            level_seen=s.level_seen,
            velocity=s.velocity,
            last_seen=Sighting(last.at, last.ip, last.lat, last.lon) if last else None,
        )
    d = req.device
    device = Device(d.id, d.source, d.managed, d.compliant, d.platform) if d and d.id else None
    g = req.geo
    geo = Geo(g.country, g.lat, g.lon) if g is not None else None
    return CheckInputs(now, req.leeway, identity=identity, state=state, device=device, geo=geo)


def explain(
    loaded: LoadedPolicy, doc: Any, *, clock: Callable[[], float] | None = None
) -> dict[str, Any]:
    """The decision for one request document, as a JSON-ready mapping.

    Raises RequestFileError for a document that does not fit ``RequestFile``, RequestError
    for a path or host the service would refuse (with the reason it would give)."""
    req = read_request(doc)
    attrs = attributes_of(req)  # RequestError: a path or host the service would refuse
    now = req.now if req.now is not None else int((clock or time.time)())
    policy = loaded.policy
    decision = decide(policy, attrs, inputs_of(req, now))
    route = policy.route_for(attrs.host, attrs.method, attrs.path)
    return {
        "decision": decision.outcome.value,
        "reason": decision.slug,
        "level": decision.level.name if decision.level else None,
        "route": route.index if route is not None else None,
        "fired": list(decision.fired),
        "shadow": list(decision.shadow),
        "signals": sorted(decision.signals),
        "device_states": sorted(decision.device_states),
        "risk": decision.risk,
        "acr_values": list(decision.acr_values),
        "max_age": decision.max_age,
        "canonical_path": attrs.path,
        "policy_version": loaded.version,
    }


def render_text(out: dict[str, Any]) -> str:
    where = f"route #{out['route']}" if out["route"] is not None else "default level"
    lines = [
        f"decision: {out['decision']} ({out['reason']})",
        f"level:    {out['level']} (from {where}; path {out['canonical_path']})",
    ]
    if out["signals"]:
        lines.append(f"signals:  {', '.join(out['signals'])} (risk {out['risk']})")
    if out["fired"]:
        lines.append(f"fired:    {', '.join(out['fired'])}")
    if out["shadow"]:
        lines.append(f"shadow:   {', '.join(out['shadow'])} (would have applied; not enforced)")
    if out["decision"] == "step_up":
        lines.append(f"needs:    acr in [{' '.join(out['acr_values'])}], max_age {out['max_age']}")
    return "\n".join(lines)
