"""Is every route of a live mesh checked? Read each Envoy's ``/config_dump`` and report,
per route: whether ext_authz applies, whether it fails open, its timeout against the
service's own deadline, and the status it answers when the check errors.

A route's status:

- ``covered``: an ext_authz filter that fails closed applies to it;
- ``fail-open``: ext_authz applies, but every filter that applies has
  ``failure_mode_allow: true`` (an authorizer outage lets requests through);
- ``uncovered``: no ext_authz filter applies (none in the chain, after the router, disabled
  for the route, its virtual host, its route table or one of its weighted clusters, off by
  default, sampled by ``filter_enabled`` below 100% or gated by metadata), or the route
  table could not be found or assessed;
- ``exempt``: ext_authz is disabled on a step-up endpoint prefix (``/_stepup/``), which
  the service authenticates itself;
- ``no-upstream``: not checked, but a redirect or a direct response reaches no upstream.

Per-route configuration resolves as Envoy does it: the most specific of weighted cluster,
route, virtual host and route table wins. The filter is found by its ``@type``, not its name.
Listeners without an HTTP connection manager are listed as notes (HTTP ext_authz cannot
apply to them). Exit: 0 all covered, 1 uncovered or fail-open routes, 2 an Envoy unread.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from authz.audit.export import iso_ms

_EXT_AUTHZ = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_PER_ROUTE = "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
_FILTER_CONFIG = "envoy.config.route.v3.FilterConfig"
_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "envoy.extensions.filters.http.router.v3.Router"
DEFAULT_GRPC_TIMEOUT_MS = 200  # Envoy's ext_authz default when grpc_service.timeout is unset
# envoy.type.v3.StatusCode names as the admin API prints them.
_STATUS = {
    "OK": 200, "Created": 201, "NoContent": 204, "MovedPermanently": 301, "Found": 302,
    "BadRequest": 400, "Unauthorized": 401, "Forbidden": 403, "NotFound": 404,
    "TooManyRequests": 429, "InternalServerError": 500, "BadGateway": 502,
    "ServiceUnavailable": 503, "GatewayTimeout": 504,
}  # fmt: skip
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CoverageError(Exception):
    """An Envoy admin endpoint could not be read or did not return a config dump."""


def _type(doc: Any) -> str:
    return str(doc.get("@type", "")).rsplit("/", 1)[-1] if isinstance(doc, dict) else ""


def duration_ms(text: Any) -> int | None:
    """``"0.250s"`` -> 250 (the admin API's Duration form)."""
    if not isinstance(text, str) or not re.fullmatch(r"\d+(\.\d+)?s", text):
        return None
    return round(float(text[:-1]) * 1000)


def status_code(value: Any) -> int | str:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value) if value.isdigit() else _STATUS.get(value, value)
    return 403


@dataclass(frozen=True)
class AuthzFilter:
    name: str
    position: int
    failure_mode_allow: bool
    timeout_ms: int | None
    timeout_default: bool
    status_on_error: int | str
    transport: str
    after_router: bool
    disabled_by_default: bool
    enabled_percent: float | None  # filter_enabled, None when unset (always)
    metadata_gated: bool


@dataclass(frozen=True)
class RouteResult:
    envoy: str
    listener: str
    route_config: str
    virtual_host: str
    domains: tuple[str, ...]
    route: str
    action: str
    status: str
    reason: str
    failure_mode_allow: bool | None
    timeout_ms: int | None
    timeout_ok: bool | None
    status_on_error: int | str | None
    filters: tuple[str, ...]

    @property
    def problem(self) -> bool:
        return self.status in ("uncovered", "fail-open")


@dataclass
class CoverageReport:
    deadline_ms: int
    checked_ms: int
    envoys: list[str] = field(default_factory=list)
    routes: list[RouteResult] = field(default_factory=list)
    filters: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    notes: list[dict[str, str]] = field(default_factory=list)

    def count(self, status: str, envoy: str | None = None) -> int:
        return sum(
            1 for r in self.routes if r.status == status and (envoy is None or r.envoy == envoy)
        )

    @property
    def uncovered(self) -> int:
        return self.count("uncovered")

    @property
    def fail_open(self) -> int:
        return self.count("fail-open")

    @property
    def ok(self) -> bool:
        return not self.uncovered and not self.fail_open and not self.errors

    @property
    def exit_code(self) -> int:
        if self.uncovered or self.fail_open:
            return 1
        return 2 if self.errors else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": "stepup-authz-coverage",
            "version": 1,
            "ok": self.ok,
            "checked_ms": self.checked_ms,
            "checked_utc": iso_ms(self.checked_ms),
            "deadline_ms": self.deadline_ms,
            "envoys": list(self.envoys),
            "routes_total": len(self.routes),
            "uncovered": self.uncovered,
            "fail_open": self.fail_open,
            "timeouts_below_deadline": sum(1 for r in self.routes if r.timeout_ok is False),
            "routes": [asdict(r) for r in self.routes],
            "filters": list(self.filters),
            "errors": list(self.errors),
            "notes": list(self.notes),
        }


# -- reading a config dump --------------------------------------------------------------------


def _listeners(dump: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for cfg in dump.get("configs", []):
        if _type(cfg) != "envoy.admin.v3.ListenersConfigDump":
            continue
        for entry in cfg.get("static_listeners", []):
            if isinstance(entry.get("listener"), dict):
                yield entry["listener"]
        for entry in cfg.get("dynamic_listeners", []):
            state = entry.get("active_state") or {}
            if isinstance(state.get("listener"), dict):
                yield state["listener"]


def _route_configs(dump: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for cfg in dump.get("configs", []):
        if _type(cfg) != "envoy.admin.v3.RoutesConfigDump":
            continue
        for key in ("static_route_configs", "dynamic_route_configs"):
            for entry in cfg.get(key, []):
                rc = entry.get("route_config")
                if isinstance(rc, dict):
                    out[str(rc.get("name", ""))] = rc
    return out


def _ecds(dump: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for cfg in dump.get("configs", []):
        if _type(cfg) != "envoy.admin.v3.EcdsConfigDump":
            continue
        for entry in cfg.get("ecds_filters", []):
            f = entry.get("ecds_filter")
            if isinstance(f, dict) and isinstance(f.get("typed_config"), dict):
                out[str(f.get("name", ""))] = f["typed_config"]
    return out


def _percent(fe: Any) -> float | None:
    if not isinstance(fe, dict):
        return None
    dv = fe.get("default_value") or {}
    num = int(dv.get("numerator", 0))
    denom = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}.get(
        str(dv.get("denominator", "HUNDRED")), 100
    )
    return 100.0 * num / denom


def _authz_filters(hcm: Mapping[str, Any], ecds: Mapping[str, Any]) -> list[AuthzFilter]:
    out: list[AuthzFilter] = []
    router_at: int | None = None
    chain = hcm.get("http_filters") or []
    for i, f in enumerate(chain):
        cfg = f.get("typed_config")
        if cfg is None and isinstance(f.get("config_discovery"), dict):
            cd = f["config_discovery"]
            cfg = ecds.get(str(f.get("name"))) or cd.get("default_config")
        if _type(cfg) == _ROUTER and router_at is None:
            router_at = i
        if _type(cfg) != _EXT_AUTHZ:
            continue
        assert isinstance(cfg, dict)
        if "http_service" in cfg:
            transport = "http"
            raw = (cfg["http_service"].get("server_uri") or {}).get("timeout")
        else:
            transport = "grpc"
            raw = (cfg.get("grpc_service") or {}).get("timeout")
        ms = duration_ms(raw)
        out.append(
            AuthzFilter(
                name=str(f.get("name", "")),
                position=i,
                failure_mode_allow=bool(cfg.get("failure_mode_allow", False)),
                timeout_ms=ms if ms is not None else DEFAULT_GRPC_TIMEOUT_MS,
                timeout_default=ms is None,
                status_on_error=status_code((cfg.get("status_on_error") or {}).get("code")),
                transport=transport,
                after_router=router_at is not None and router_at < i,
                disabled_by_default=bool(f.get("disabled", False)),
                enabled_percent=_percent(cfg.get("filter_enabled")),
                metadata_gated="filter_enabled_metadata" in cfg,
            )
        )
    return out


def _per_filter(node: Mapping[str, Any] | None, name: str) -> dict[str, Any] | None:
    """The per-filter config for ``name`` at one level: {"disabled": bool} or None."""
    if not node:
        return None
    cfg = (node.get("typed_per_filter_config") or {}).get(name)
    if not isinstance(cfg, dict):
        return None
    if _type(cfg) == _FILTER_CONFIG:
        inner = cfg.get("config") or {}
        return {"disabled": bool(cfg.get("disabled", False) or inner.get("disabled", False))}
    return {"disabled": bool(cfg.get("disabled", False))}


def _match_text(route: Mapping[str, Any]) -> str:
    m = route.get("match") or {}
    for key in ("path", "prefix", "path_separated_prefix"):
        if key in m:
            text = f"{key} {m[key]}"
            break
    else:
        regex = (m.get("safe_regex") or {}).get("regex")
        text = f"regex {regex}" if regex is not None else json.dumps(m, sort_keys=True)[:120]
    heads = [h.get("name") for h in m.get("headers", []) if isinstance(h, dict)]
    return text + (f" (+headers {','.join(map(str, heads))})" if heads else "")


def _action(route: Mapping[str, Any]) -> str:
    if "redirect" in route:
        return "redirect"
    if "direct_response" in route:
        return "direct_response"
    act = route.get("route") or {}
    if "cluster" in act:
        return f"cluster {act['cluster']}"
    if "weighted_clusters" in act:
        names = [c.get("name") for c in act["weighted_clusters"].get("clusters", [])]
        return "weighted " + ",".join(map(str, names))
    return "route " + ",".join(sorted(act)) if act else "unknown"


def _exempt(route: Mapping[str, Any], prefixes: Sequence[str]) -> bool:
    m = route.get("match") or {}
    path = m.get("prefix", m.get("path"))
    return isinstance(path, str) and any(path.startswith(p) for p in prefixes)


def _assess(
    route: Mapping[str, Any],
    vhost: Mapping[str, Any],
    table: Mapping[str, Any],
    filters: Sequence[AuthzFilter],
    exempt_prefixes: Sequence[str],
) -> tuple[str, str, list[AuthzFilter]]:
    applying: list[AuthzFilter] = []
    why: list[str] = []
    clusters = ((route.get("route") or {}).get("weighted_clusters") or {}).get("clusters", [])
    for f in filters:
        if f.after_router:
            why.append(f"{f.name} comes after the router")
            continue
        if f.enabled_percent is not None and f.enabled_percent < 100:
            why.append(f"{f.name} is sampled (filter_enabled {f.enabled_percent:g}%)")
            continue
        if f.metadata_gated:
            why.append(f"{f.name} is gated by filter_enabled_metadata")
            continue
        specific = next(
            (
                c
                for c in (
                    _per_filter(route, f.name),
                    _per_filter(vhost, f.name),
                    _per_filter(table, f.name),
                )
                if c is not None
            ),
            None,
        )
        if specific is not None and specific["disabled"]:
            why.append(f"{f.name} disabled for this route")
            continue
        if f.disabled_by_default and specific is None:
            why.append(f"{f.name} is disabled by default and not enabled here")
            continue
        off = [
            str(c.get("name"))
            for c in clusters
            if (pc := _per_filter(c, f.name)) is not None and pc["disabled"]
        ]
        if off:
            why.append(f"{f.name} disabled for weighted cluster(s) {','.join(off)}")
            continue
        applying.append(f)
    if applying:
        strict = [f for f in applying if not f.failure_mode_allow]
        if strict:
            return "covered", "", strict
        return "fail-open", "every ext_authz filter here has failure_mode_allow: true", applying
    reason = "; ".join(why) or "no ext_authz filter in this HTTP connection manager"
    if _exempt(route, exempt_prefixes):
        return "exempt", f"step-up endpoints ({reason})", []
    if "redirect" in route or "direct_response" in route:
        return "no-upstream", reason, []
    return "uncovered", reason, []


def _hcms(listener: Mapping[str, Any]) -> Iterator[tuple[int, dict[str, Any] | None]]:
    chains = list(listener.get("filter_chains") or [])
    if isinstance(listener.get("default_filter_chain"), dict):
        chains.append(listener["default_filter_chain"])
    for i, chain in enumerate(chains):
        found = False
        for nf in chain.get("filters") or []:
            if _type(nf.get("typed_config")) == _HCM:
                found = True
                yield i, nf["typed_config"]
        if not found:
            yield i, None


def assess_dump(
    envoy: str,
    dump: Mapping[str, Any],
    *,
    deadline_ms: int,
    exempt_prefixes: Sequence[str] = ("/_stepup/",),
) -> tuple[list[RouteResult], list[dict[str, Any]], list[dict[str, str]]]:
    """Routes, ext_authz filters and notes of one Envoy's config dump."""
    tables = _route_configs(dump)
    ecds = _ecds(dump)
    routes: list[RouteResult] = []
    filters_out: list[dict[str, Any]] = []
    notes: list[dict[str, str]] = []
    for listener in _listeners(dump):
        lname = str(listener.get("name", ""))
        for chain_no, hcm in _hcms(listener):
            if hcm is None:
                notes.append(
                    {"envoy": envoy, "listener": lname, "note": f"filter chain {chain_no} has no "
                     "HTTP connection manager: HTTP ext_authz cannot apply to it"}
                )  # fmt: skip
                continue
            filters = _authz_filters(hcm, ecds)
            for f in filters:
                filters_out.append(
                    {"envoy": envoy, "listener": lname, "chain": chain_no, **asdict(f)}
                )
            if isinstance(hcm.get("route_config"), dict):
                table: dict[str, Any] | None = hcm["route_config"]
            elif isinstance(hcm.get("rds"), dict):
                table = tables.get(str(hcm["rds"].get("route_config_name")))
            else:
                table = None
            if table is None:
                what = (
                    "scoped routes are not assessed"
                    if "scoped_routes" in hcm
                    else f"route table {((hcm.get('rds') or {}).get('route_config_name'))!r} "
                    "is not in the config dump"
                )
                routes.append(
                    RouteResult(envoy, lname, "", "", (), "(all)", "unknown", "uncovered", what,
                                None, None, None, None, ())
                )  # fmt: skip
                continue
            tname = str(table.get("name", ""))
            for vh in table.get("virtual_hosts") or []:
                for rt in vh.get("routes") or []:
                    status, reason, applying = _assess(rt, vh, table, filters, exempt_prefixes)
                    first = applying[0] if applying else None
                    timeout = first.timeout_ms if first else None
                    routes.append(
                        RouteResult(
                            envoy=envoy,
                            listener=lname,
                            route_config=tname,
                            virtual_host=str(vh.get("name", "")),
                            domains=tuple(str(d) for d in vh.get("domains") or ()),
                            route=str(rt.get("name") or _match_text(rt)),
                            action=_action(rt),
                            status=status,
                            reason=reason,
                            failure_mode_allow=first.failure_mode_allow if first else None,
                            timeout_ms=timeout,
                            timeout_ok=None if timeout is None else timeout > deadline_ms,
                            status_on_error=first.status_on_error if first else None,
                            filters=tuple(f.name for f in applying),
                        )
                    )
    return routes, filters_out, notes


# -- fetching ---------------------------------------------------------------------------------


def admin_base(url: str) -> str:
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://", url):
        url = "http://" + url
    return url


def fetch_config_dump(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET <admin>/config_dump (never through a proxy from the environment)."""
    target = admin_base(url) + "/config_dump"
    try:
        with _opener.open(target, timeout=timeout_s) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        raise CoverageError(f"{target}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", None) or exc
        raise CoverageError(f"{target}: unreachable ({why})") from exc
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise CoverageError(f"{target}: not JSON (is this an Envoy admin address?)") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("configs"), list):
        raise CoverageError(f"{target}: not an Envoy config dump")
    return doc


def check_mesh(
    admin_urls: Iterable[str],
    *,
    deadline_ms: int,
    exempt_prefixes: Sequence[str] = ("/_stepup/",),
    timeout_s: float = 5.0,
    fetch: Callable[[str, float], Mapping[str, Any]] = fetch_config_dump,
    clock: Callable[[], float] = time.time,
) -> CoverageReport:
    report = CoverageReport(deadline_ms=deadline_ms, checked_ms=int(clock() * 1000))
    for url in admin_urls:
        report.envoys.append(url)
        try:
            dump = fetch(url, timeout_s)
        except CoverageError as exc:
            report.errors.append({"envoy": url, "error": str(exc)})
            continue
        routes, filters, notes = assess_dump(
            url, dump, deadline_ms=deadline_ms, exempt_prefixes=exempt_prefixes
        )
        report.routes.extend(routes)
        report.filters.extend(filters)
        report.notes.extend(notes)
    return report


def render_text(report: CoverageReport) -> str:
    lines = []
    for r in report.routes:
        extra = (
            f" fail_open={r.failure_mode_allow} timeout={r.timeout_ms}ms"
            f"{'' if r.timeout_ok else ' (NOT above the service deadline)'}"
            f" status_on_error={r.status_on_error}"
            if r.timeout_ms is not None
            else ""
        )
        why = f"  -- {r.reason}" if r.reason else ""
        lines.append(
            f"{r.status.upper():11} {r.envoy} {r.listener}/{r.virtual_host} {r.route}"
            f" -> {r.action}{extra}{why}"
        )
    for f in report.filters:
        if f["failure_mode_allow"]:
            lines.append(
                f"FAIL-OPEN   filter {f['name']} on {f['envoy']} listener {f['listener']}: "
                "failure_mode_allow is true"
            )
    for n in report.notes:
        lines.append(f"note: {n['envoy']} listener {n['listener']}: {n['note']}")
    for e in report.errors:
        lines.append(f"ERROR {e['envoy']}: {e['error']}")
    lines.append(
        f"{len(report.routes)} routes on {len(report.envoys)} Envoy(s): "
        f"{report.count('covered')} covered, {report.count('exempt')} exempt, "
        f"{report.uncovered} uncovered, {report.fail_open} fail open, "
        f"{len(report.errors)} unreachable; service deadline {report.deadline_ms} ms"
    )
    return "\n".join(lines)
