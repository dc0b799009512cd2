"""`stepup-authz policy explain`: decide one request offline -- no token, Redis or IdP --
and say why: the route, the rules that fired (and shadow rules that would have), the
signals and the risk score.

The request file is JSON: ``method``, ``host``, ``path``, ``headers``, ``source_ip``,
``context_extensions``, verified ``claims`` (iss, sub, sid, acr, amr, auth_time, iat),
and optionally ``grants`` (level, acr, amr, auth_time, expires_at, device, ip),
``device`` (id, source, managed, compliant, platform), ``state`` (device_known, ip_known,
level_seen, velocity, session_revoked, revoked_before, last_seen {at, ip, lat, lon}),
``geo`` (country, lat, lon), ``now`` and ``leeway``.
"""

from __future__ import annotations

import time
from types import MappingProxyType
from typing import Any

from authz.config.policy_file import LoadedPolicy
from authz.core.attributes import RequestAttributes, canonicalize_path, normalize_host, parse_ip
from authz.core.decision import decide
from authz.core.policy import Context
from authz.core.session import Evidence, Grant, Identity, Sighting, UserState
from authz.core.signals import Device, Geo, compute_signals, device_states


def request_from_json(doc: dict[str, Any]) -> RequestAttributes:
    path, query = canonicalize_path(str(doc.get("path", "/")))
    headers = {str(k).lower(): str(v) for k, v in (doc.get("headers") or {}).items()}
    return RequestAttributes(
        method=str(doc.get("method", "GET")).upper(),
        scheme=str(doc.get("scheme", "https")),
        host=normalize_host(str(doc.get("host", ""))),
        path=path,
        query=query,
        headers=MappingProxyType(headers),
        source_ip=parse_ip(str(doc.get("source_ip", ""))),
        context_extensions=MappingProxyType(
            {str(k): str(v) for k, v in (doc.get("context_extensions") or {}).items()}
        ),
    )


def _evidence(doc: dict[str, Any]) -> Evidence:
    auth_time = doc.get("auth_time")
    return Evidence(
        doc.get("acr"),
        tuple(str(a) for a in doc.get("amr") or ()),
        int(auth_time) if auth_time is not None else None,
    )


def _state(doc: dict[str, Any] | None, grants: tuple[Grant, ...]) -> UserState:
    doc = doc or {}
    last = doc.get("last_seen")
    sighting = None
    if isinstance(last, dict):
        sighting = Sighting(
            int(last.get("at", 0)), str(last.get("ip", "")), last.get("lat"), last.get("lon")
        )
    rb = doc.get("revoked_before")
    return UserState(
        grants=grants,
        session_revoked=bool(doc.get("session_revoked", False)),
        revoked_before=int(rb) if rb is not None else None,
        device_known=doc.get("device_known", True),
        ip_known=doc.get("ip_known", True),
        level_seen=bool(doc.get("level_seen", True)),
        velocity=int(doc.get("velocity", 0)),
        last_seen=sighting,
    )


def explain(loaded: LoadedPolicy, doc: dict[str, Any]) -> dict[str, Any]:
    policy = loaded.policy
    attrs = request_from_json(doc)
    now = int(doc.get("now", time.time()))
    claims = doc.get("claims")
    identity = None
    if claims:
        identity = Identity(
            issuer=str(claims.get("iss", "")),
            subject=str(claims.get("sub", "")),
            session_id=str(claims.get("sid", "")),
            evidence=_evidence(claims),
            expires_at=int(claims.get("exp", now + 3600)),
            issued_at=int(claims.get("iat", now)),
        )
    grants = tuple(
        Grant(
            level=str(g.get("level", "")),
            evidence=_evidence(g),
            expires_at=int(g["expires_at"]),
            issued_at=int(g.get("issued_at", now)),
            device=g.get("device"),
            ip=g.get("ip"),
        )
        for g in doc.get("grants") or ()
    )
    state = _state(doc.get("state"), grants) if identity is not None else None
    d = doc.get("device")
    device = None
    if isinstance(d, dict) and d.get("id"):
        device = Device(
            str(d["id"]),
            str(d.get("source", "cookie")),
            d.get("managed"),
            d.get("compliant"),
            d.get("platform"),
        )
    g = doc.get("geo")
    geo = Geo(g.get("country"), g.get("lat"), g.get("lon")) if isinstance(g, dict) else None
    signals = compute_signals(policy.signals, device=device, state=state, geo=geo, now=now)
    ctx = Context(
        device=device_states(device, state),
        country=geo.country if geo is not None else None,
        signals=signals,
    )
    decision = decide(
        policy,
        attrs,
        identity,
        state,
        now,
        leeway=int(doc.get("leeway", 0)),
        ctx=ctx,
        device=device.id if device is not None else None,
    )
    route = policy.route_for(attrs.host, attrs.method, attrs.path)
    return {
        "decision": decision.outcome.value,
        "reason": str(decision.reason),
        "level": decision.level.name if decision.level else None,
        "route": route.index if route is not None else None,
        "fired": list(decision.fired),
        "shadow": list(decision.shadow),
        "signals": sorted(decision.signals),
        "device_states": sorted(ctx.device),
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
