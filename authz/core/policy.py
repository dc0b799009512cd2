"""The policy: ordered levels, routes that map requests to a level, and context rules.

``load_policy(mapping)`` validates a parsed document into an immutable, precompiled
``Policy``; every route matcher (prefix, exact, regex) is built once here so a Check does
no parsing or compiling. Errors carry the location inside the document (``routes.2.level``);
``authz.policy_file`` turns that into a line and column of the YAML file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from authz.errors import PolicyError

_SLUG = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token (acr/amr values)
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Level:
    name: str
    rank: int
    public: bool
    acr: frozenset[str]
    amr_any: frozenset[str]
    max_age: int | None
    grant_ttl: int | None  # None => max_age, else the service default

    @property
    def needs_evidence(self) -> bool:
        return bool(self.acr or self.amr_any or self.max_age is not None)


@dataclass(frozen=True, slots=True)
class Route:
    index: int
    host: str | None  # exact host, or ".example.com" for a "*.example.com" wildcard
    exact: str | None
    prefix: str | None
    regex: re.Pattern[str] | None
    methods: frozenset[str] | None
    level: Level

    def matches(self, host: str, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.host is not None:
            if self.host.startswith("."):
                if not host.endswith(self.host):
                    return False
            elif host != self.host:
                return False
        if self.exact is not None:
            return path == self.exact
        if self.prefix is not None:
            return path.startswith(self.prefix)
        if self.regex is not None:
            return self.regex.fullmatch(path) is not None
        return True


@dataclass(frozen=True, slots=True)
class Rule:
    index: int
    name: str
    ip_in: tuple[Network, ...]
    ip_not_in: tuple[Network, ...]
    raise_to: Level | None
    deny: str | None

    def matches(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        if self.ip_in and (ip is None or not any(ip in n for n in self.ip_in)):
            return False
        return not (self.ip_not_in and ip is not None and any(ip in n for n in self.ip_not_in))


@dataclass(frozen=True, slots=True)
class Policy:
    levels: tuple[Level, ...]
    by_name: Mapping[str, Level]
    routes: tuple[Route, ...]
    default_level: Level
    rules: tuple[Rule, ...]
    version: str
    # Levels a grant can be recorded for (the ones that ask for evidence): the keys one
    # session read fetches.
    grant_levels: tuple[str, ...] = ()

    def route_for(self, host: str, method: str, path: str) -> Route | None:
        for route in self.routes:
            if route.matches(host, method, path):
                return route
        return None


def _fail(loc: Sequence[str | int], msg: str) -> PolicyError:
    return PolicyError(msg, location=".".join(str(p) for p in loc))


def _mapping(value: Any, loc: Sequence[str | int], allowed: set[str]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(loc, "must be a mapping")
    for key in value:
        if key not in allowed:
            raise _fail([*loc, str(key)], f"unknown field (allowed: {', '.join(sorted(allowed))})")
    return value


def _str_list(value: Any, loc: Sequence[str | int], pattern: re.Pattern[str]) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not value:
        raise _fail(loc, "must be a non-empty list")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not pattern.match(item):
            raise _fail([*loc, i], f"invalid value {item!r}")
    return frozenset(value)


def _int(value: Any, loc: Sequence[str | int], lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(loc, f"must be an integer between {lo} and {hi}")
    return value


def _levels(doc: Any) -> tuple[Level, ...]:
    levels_doc = _mapping(doc, ["levels"], set(doc or ()))
    if not levels_doc:
        raise _fail(["levels"], "at least one level is required")
    out: list[Level] = []
    for rank, (name, spec) in enumerate(levels_doc.items()):
        loc = ["levels", str(name)]
        if not isinstance(name, str) or not _SLUG.match(name):
            raise _fail(loc, "level names are lower-case slugs")
        spec = _mapping(spec, loc, {"acr", "amr_any", "max_age", "public", "grant_ttl", "bind"})
        if "bind" in spec:
            raise _fail([*loc, "bind"], "grant binding is not supported by this version")
        public = spec.get("public", False)
        if not isinstance(public, bool):
            raise _fail([*loc, "public"], "must be true or false")
        level = Level(
            name=name,
            rank=rank,
            public=public,
            acr=_str_list(spec.get("acr"), [*loc, "acr"], _TOKEN),
            amr_any=_str_list(spec.get("amr_any"), [*loc, "amr_any"], _TOKEN),
            max_age=None if spec.get("max_age") is None
            else _int(spec["max_age"], [*loc, "max_age"], 0, 86_400),
            grant_ttl=None if spec.get("grant_ttl") is None
            else _int(spec["grant_ttl"], [*loc, "grant_ttl"], 1, 86_400),
        )
        if public and level.needs_evidence:
            raise _fail(loc, "a public level cannot require acr, amr or max_age")
        if out and out[-1].public is False and public:
            raise _fail(loc, "public levels must come before the signed-in levels")
        out.append(level)
    return tuple(out)


def _level_ref(by_name: Mapping[str, Level], value: Any, loc: Sequence[str | int]) -> Level:
    if not isinstance(value, str) or value not in by_name:
        raise _fail(loc, f"unknown level {value!r} (known: {', '.join(by_name)})")
    return by_name[value]


def _route(i: int, doc: Any, by_name: Mapping[str, Level]) -> Route:
    loc: list[str | int] = ["routes", i]
    spec = _mapping(doc, loc, {"host", "path", "path_prefix", "path_regex", "methods", "level"})
    kinds = [k for k in ("path", "path_prefix", "path_regex") if k in spec]
    if len(kinds) > 1:
        raise _fail(loc, f"give one of path, path_prefix or path_regex, not {' and '.join(kinds)}")
    host = spec.get("host")
    if host is not None:
        if not isinstance(host, str) or not _HOST.match(host.lower().rstrip(".")):
            raise _fail([*loc, "host"], f"invalid host {host!r}")
        host = host.lower().rstrip(".")
        if host.startswith("*."):
            host = host[1:]
    exact = prefix = None
    regex = None
    for key in ("path", "path_prefix"):
        if key in spec:
            value = spec[key]
            if not isinstance(value, str) or not value.startswith("/"):
                raise _fail([*loc, key], "must be a string starting with '/'")
            if key == "path":
                exact = value
            else:
                prefix = value
    if "path_regex" in spec:
        pattern = spec["path_regex"]
        if not isinstance(pattern, str):
            raise _fail([*loc, "path_regex"], "must be a string")
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise _fail([*loc, "path_regex"], f"invalid regular expression: {exc}") from exc
    methods = None
    if "methods" in spec:
        m = spec["methods"]
        if not isinstance(m, list) or not m or not all(isinstance(x, str) for x in m):
            raise _fail([*loc, "methods"], "must be a non-empty list of HTTP methods")
        methods = frozenset(x.upper() for x in m)
        bad = sorted(methods - _METHODS)
        if bad:
            raise _fail([*loc, "methods"], f"unknown method(s) {', '.join(bad)}")
    if "level" not in spec:
        raise _fail(loc, "a route needs a level")
    level = _level_ref(by_name, spec["level"], [*loc, "level"])
    return Route(i, host, exact, prefix, regex, methods, level)


def _networks(value: Any, loc: Sequence[str | int]) -> tuple[Network, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise _fail(loc, "must be a non-empty list of CIDR blocks")
    out = []
    for j, item in enumerate(value):
        try:
            out.append(ipaddress.ip_network(str(item), strict=True))
        except ValueError as exc:
            raise _fail([*loc, j], f"invalid CIDR block: {exc}") from exc
    return tuple(out)


def _rule(i: int, doc: Any, by_name: Mapping[str, Level]) -> Rule:
    loc: list[str | int] = ["rules", i]
    spec = _mapping(doc, loc, {"name", "when", "raise_to", "deny"})
    when = _mapping(spec.get("when"), [*loc, "when"], {"ip_in", "ip_not_in"})
    if not when:
        raise _fail([*loc, "when"], "a rule needs at least one condition")
    if ("raise_to" in spec) == ("deny" in spec):
        raise _fail(loc, "a rule needs exactly one of raise_to or deny")
    deny = spec.get("deny")
    if deny is not None and (not isinstance(deny, str) or not _SLUG.match(deny)):
        raise _fail([*loc, "deny"], "the deny reason must be a lower-case slug")
    name = spec.get("name", f"rule-{i}")
    if not isinstance(name, str) or not _SLUG.match(name):
        raise _fail([*loc, "name"], "rule names are lower-case slugs")
    return Rule(
        index=i,
        name=name,
        ip_in=_networks(when.get("ip_in"), [*loc, "when", "ip_in"]),
        ip_not_in=_networks(when.get("ip_not_in"), [*loc, "when", "ip_not_in"]),
        raise_to=_level_ref(by_name, spec["raise_to"], [*loc, "raise_to"])
        if "raise_to" in spec else None,
        deny=deny,
    )


def load_policy(doc: Any, *, version: str = "") -> Policy:
    """Validate a parsed policy document. Raises PolicyError with the failing location."""
    top = _mapping(doc, [], {"version", "levels", "routes", "default_level", "rules"})
    if "levels" not in top:
        raise _fail(["levels"], "required")
    levels = _levels(top["levels"])
    by_name = {lv.name: lv for lv in levels}
    routes_doc = top.get("routes") or []
    if not isinstance(routes_doc, list):
        raise _fail(["routes"], "must be a list")
    rules_doc = top.get("rules") or []
    if not isinstance(rules_doc, list):
        raise _fail(["rules"], "must be a list")
    if "default_level" not in top:
        raise _fail(["default_level"], "required (the level of requests no route matches)")
    declared = top.get("version")
    if declared is not None and not isinstance(declared, str | int):
        raise _fail(["version"], "must be a string")
    return Policy(
        levels=levels,
        by_name=by_name,
        routes=tuple(_route(i, r, by_name) for i, r in enumerate(routes_doc)),
        default_level=_level_ref(by_name, top["default_level"], ["default_level"]),
        rules=tuple(_rule(i, r, by_name) for i, r in enumerate(rules_doc)),
        version=str(declared) if declared is not None else version,
        grant_levels=tuple(lv.name for lv in levels if lv.needs_evidence),
    )
