"""The policy: ordered levels, routes that map requests to a level, and context rules.

``load_policy(mapping)`` validates a parsed document into an immutable, precompiled
``Policy``; every route matcher (prefix, exact, regex) is built once here so a Check does
no parsing or compiling. Errors carry the location inside the document (``routes.2.level``);
``authz.config.policy_file`` turns that into a line and column of the YAML file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import re2
from re2 import _re2

from authz.core.policy_index import RouteIndex, RuleIndex
from authz.errors import PolicyError

_SLUG = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token (acr/amr values)
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Step-up methods a level may list in ``factors`` (the first is where a browser goes first).
FACTORS = frozenset({"idp", "passkey"})
USER_VERIFICATION = ("required", "preferred", "discouraged")  # WebAuthn section 5.8.6
_AAGUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,3}$")
_TITLE_MAX = 120
_DESCRIPTION_MAX = 300


@dataclass(frozen=True, slots=True)
class AuthenticatorPolicy:
    """Which authenticators a level's passkey factor accepts (checked at enrolment and at
    every authentication, so a credential enrolled under a laxer level never satisfies a
    stricter one).

    ``device_bound``: refuse credentials whose backup-eligible (BE) flag is set -- synced
    passkeys -- WebAuthn section 6.1.3. ``aaguids`` / ``mds``: when either is given, the
    authenticator must be listed by AAGUID *or* certified in the FIDO Metadata Service with
    a verified attestation chain (an AAGUID alone is only claimed by the authenticator;
    ``mds`` proves it). Both unset: any authenticator.
    """

    device_bound: bool = False
    aaguids: frozenset[str] = frozenset()
    mds: bool = False

    @property
    def wants_attestation(self) -> bool:
        return bool(self.aaguids) or self.mds


@dataclass(frozen=True, slots=True)
class TransactionBinding:
    """A level whose grant is for one exact request (dynamic linking): the passkey
    challenge commits to the request's digest, the page shows ``fields`` of its JSON body,
    and the grant is used once within ``ttl_s``. ``require_body``: refuse when Envoy did not
    send the (whole) body, instead of binding method, host and path only.
    ``max_body_bytes``: how much of the body Envoy buffers for the Check (``render``)."""

    fields: tuple[str, ...] = ()
    ttl_s: int = 120
    require_body: bool = False
    max_body_bytes: int = 16384


@dataclass(frozen=True, slots=True)
class Level:
    name: str
    rank: int
    public: bool
    acr: frozenset[str]
    amr_any: frozenset[str]
    max_age: int | None
    grant_ttl: int | None  # None => max_age, else the service default
    bind_device: bool = False  # a grant is honoured only from the device it was made on
    bind_ip: bool = False  # ... only from the IP it was made from
    ip_allow: tuple[Network, ...] = ()  # set => the level is reachable only from these
    ip_deny: tuple[Network, ...] = ()
    title: str | None = None  # the human name pages show ("Wire transfers")
    description: str | None = None  # what it asks, for pages ("a second factor, 15 min")
    factors: tuple[str, ...] = ("idp",)  # step-up methods, in the order a browser tries them
    user_verification: str = "preferred"  # passkey UV: required | preferred | discouraged
    passkey_acr: str | None = None  # the acr a passkey grant records (see _passkey_acr)
    authenticators: AuthenticatorPolicy | None = None  # None: any authenticator
    transaction: TransactionBinding | None = None  # set: grants are single-use, per request

    @property
    def needs_evidence(self) -> bool:
        return bool(self.acr or self.amr_any or self.max_age is not None)

    @property
    def label(self) -> str:
        return self.title or self.name

    def offers(self, factor: str) -> bool:
        return factor in self.factors


@dataclass(frozen=True, slots=True)
class Route:
    index: int
    host: str | None  # exact host, or ".example.com" for a "*.example.com" wildcard
    exact: str | None
    prefix: str | None
    regex: PathRegex | None  # RE2, as Envoy's safe_regex: linear in the path's length
    methods: frozenset[str] | None  # as written, upper case; GET brings HEAD
    level: Level
    title: str | None = None  # the human name pages show ("Client statements")
    description: str | None = None  # why it is protected, for pages (one short sentence)

    def matches(self, host: str, method: str, path: str) -> bool:
        """Whether the request is this route's. ``path_prefix: /wires/`` also covers the
        bare ``/wires`` (never ``/wiresx``): what Envoy's ``path_separated_prefix`` does in
        the rendered config, so a client cannot drop the slash to leave the route."""
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
            return path.startswith(self.prefix) or (
                len(self.prefix) > 1 and self.prefix[-1] == "/" and path == self.prefix[:-1]
            )
        if self.regex is not None:
            return self.regex.fullmatch(path)
        return True


SIGNALS = frozenset(
    {
        "new-device",  # a device id this user has not stepped up from
        "no-device",  # the request carried no device identity at all
        "device-noncompliant",  # the device assertion says compliant: false
        "device-unmanaged",  # the device assertion says managed: false
        "new-ip",  # an address this user has not stepped up from
        "first-level-access",  # the user has never been allowed at this level before
        "velocity",  # too many sensitive checks in the sliding window
        "impossible-travel",  # faster than max_kmh since the last allowed request
        "off-hours",  # outside the configured working hours
    }
)
DEVICE_STATES = frozenset({"known", "unknown", "absent", "noncompliant", "unmanaged"})
DEFAULT_RISK_WEIGHTS: Mapping[str, int] = {
    "new-device": 30,
    "no-device": 10,
    "device-noncompliant": 50,
    "device-unmanaged": 20,
    "new-ip": 20,
    "first-level-access": 10,
    "velocity": 30,
    "impossible-travel": 60,
    "off-hours": 10,
}
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


@dataclass(frozen=True, slots=True)
class Hours:
    timezone: ZoneInfo
    start_min: int  # minutes after midnight, local time
    end_min: int
    days: frozenset[int]  # 0 = Monday


@dataclass(frozen=True, slots=True)
class SignalSettings:
    """Thresholds for the behavioural signals (all pure rules over attributes and state)."""

    sensitive_level: str | None = None  # velocity counts checks at or above this level
    velocity_window_s: int = 60
    velocity_max: int | None = None
    max_kmh: float | None = None  # impossible travel, needs GeoIP coordinates
    hours: Hours | None = None
    risk_weights: Mapping[str, int] = field(default_factory=lambda: DEFAULT_RISK_WEIGHTS)


@dataclass(frozen=True, slots=True)
class Context:
    """What rules may look at besides the request: the device, the country and the
    signals that fired. Built by the service (or `policy explain`) before the rules run."""

    device: frozenset[str] = frozenset({"absent", "unknown"})  # states from DEVICE_STATES
    country: str | None = None  # ISO 3166 alpha-2 from GeoIP, None when unknown
    signals: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Rule:
    index: int
    name: str
    ip_in: tuple[Network, ...]
    ip_not_in: tuple[Network, ...]
    raise_to: Level | None
    deny: str | None
    shadow: bool = False  # evaluated and counted, never changes the decision
    country_in: frozenset[str] = frozenset()
    country_not_in: frozenset[str] = frozenset()
    device: frozenset[str] = frozenset()  # any of these device states
    signals_any: frozenset[str] = frozenset()
    signals_all: frozenset[str] = frozenset()
    level_at_least: Level | None = None

    def matches(
        self,
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
        ctx: Context | None = None,
        level: Level | None = None,
    ) -> bool:
        """All conditions must hold. An unknown IP or country never satisfies an *_in
        condition and always satisfies a *_not_in one: unknown is untrusted."""
        if self.ip_in and (ip is None or not any(ip in n for n in self.ip_in)):
            return False
        if self.ip_not_in and ip is not None and any(ip in n for n in self.ip_not_in):
            return False
        ctx = ctx or _NO_CONTEXT
        if self.country_in and ctx.country not in self.country_in:
            return False
        if self.country_not_in and ctx.country in self.country_not_in:
            return False
        if self.device and self.device.isdisjoint(ctx.device):
            return False
        if self.signals_any and self.signals_any.isdisjoint(ctx.signals):
            return False
        if self.signals_all and not self.signals_all <= ctx.signals:
            return False
        return not (
            self.level_at_least is not None
            and (level is None or level.rank < self.level_at_least.rank)
        )


_NO_CONTEXT = Context()


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
    signals: SignalSettings = field(default_factory=SignalSettings)
    # Whether any rule looks at device posture: then unattested posture counts as
    # noncompliant and unmanaged (authz.core.signals).
    uses_posture: bool = False
    # Built from routes and rules by __post_init__, so they cannot disagree with them.
    route_index: RouteIndex = field(init=False, repr=False, compare=False)
    rule_index: RuleIndex = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "route_index", RouteIndex(self.routes))
        object.__setattr__(self, "rule_index", RuleIndex(self.rules, _NO_CONTEXT))

    def is_sensitive(self, level: Level) -> bool:
        """Whether checks at ``level`` count towards the velocity signal."""
        name = self.signals.sensitive_level
        return name is not None and level.rank >= self.by_name[name].rank

    def route_for(self, host: str, method: str, path: str) -> Route | None:
        """The first route in file order that matches the request (``route_index``)."""
        return self.route_index.route_for(host, method, path)

    def route_for_scan(self, host: str, method: str, path: str) -> Route | None:
        """``route_for`` by trying every route in order: the reference the index is tested
        against."""
        for route in self.routes:
            if route.matches(host, method, path):
                return route
        return None

    def rules_for(
        self,
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
        ctx: Context | None = None,
    ) -> Sequence[Rule]:
        """The rules that could fire for this IP and context, in file order (a superset of
        those whose ``matches`` holds; ``rule_index``)."""
        return self.rule_index.candidates(ip, ctx)


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
    if doc is not None and not isinstance(doc, Mapping):
        raise _fail(["levels"], "must be a mapping")  # set(doc) of a list may not even hash
    levels_doc = _mapping(doc, ["levels"], set(doc or ()))
    if not levels_doc:
        raise _fail(["levels"], "at least one level is required")
    out: list[Level] = []
    for rank, (name, spec) in enumerate(levels_doc.items()):
        loc = ["levels", str(name)]
        if not isinstance(name, str) or not _SLUG.match(name):
            raise _fail(loc, "level names are lower-case slugs")
        spec = _mapping(
            spec,
            loc,
            {
                "acr",
                "amr_any",
                "max_age",
                "public",
                "grant_ttl",
                "bind",
                "ip_allow",
                "ip_deny",
                "description",
                *_PASSKEY_FIELDS,
            },
        )
        bind = spec.get("bind") or []
        if (
            not isinstance(bind, list)
            or not all(isinstance(b, str) for b in bind)
            or not set(bind) <= {"device", "ip"}
        ):
            raise _fail([*loc, "bind"], "bind is a list of: device, ip")
        public = spec.get("public", False)
        if not isinstance(public, bool):
            raise _fail([*loc, "public"], "must be true or false")
        level = Level(
            name=name,
            rank=rank,
            public=public,
            acr=_str_list(spec.get("acr"), [*loc, "acr"], _TOKEN),
            amr_any=_str_list(spec.get("amr_any"), [*loc, "amr_any"], _TOKEN),
            max_age=None
            if spec.get("max_age") is None
            else _int(spec["max_age"], [*loc, "max_age"], 0, 86_400),
            grant_ttl=None
            if spec.get("grant_ttl") is None
            else _int(spec["grant_ttl"], [*loc, "grant_ttl"], 1, 86_400),
            bind_device="device" in bind,
            bind_ip="ip" in bind,
            ip_allow=_networks(spec.get("ip_allow"), [*loc, "ip_allow"]),
            ip_deny=_networks(spec.get("ip_deny"), [*loc, "ip_deny"]),
            description=_description(spec.get("description"), [*loc, "description"]),
        )
        level = _with_factors(level, spec, loc)
        if public and level.needs_evidence:
            raise _fail(loc, "a public level cannot require acr, amr or max_age")
        if out and out[-1].public is False and public:
            raise _fail(loc, "public levels must come before the signed-in levels")
        out.append(level)
    return tuple(out)


_PASSKEY_FIELDS = (
    "title",
    "factors",
    "user_verification",
    "passkey_acr",
    "authenticators",
    "transaction_bound",
)


def _title(value: Any, loc: Sequence[str | int]) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > _TITLE_MAX
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    ):
        raise _fail(loc, f"a title is one line of 1 to {_TITLE_MAX} printable characters")
    return value.strip()


def _description(value: Any, loc: Sequence[str | int]) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > _DESCRIPTION_MAX
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    ):
        raise _fail(
            loc, f"a description is one line of 1 to {_DESCRIPTION_MAX} printable characters"
        )
    return value.strip()


def _bool(value: Any, loc: Sequence[str | int]) -> bool:
    if not isinstance(value, bool):
        raise _fail(loc, "must be true or false")
    return value


def _with_factors(level: Level, spec: Mapping[str, Any], loc: Sequence[str | int]) -> Level:
    """The level's title and step-up methods, and the passkey factor's settings."""
    title = _title(spec.get("title"), [*loc, "title"])
    factors_doc = spec.get("factors", ["idp"])
    if (
        not isinstance(factors_doc, list)
        or not factors_doc
        or not all(isinstance(f, str) and f in FACTORS for f in factors_doc)
        or len(set(factors_doc)) != len(factors_doc)
    ):
        raise _fail(
            [*loc, "factors"], f"a list of distinct step-up methods: {', '.join(sorted(FACTORS))}"
        )
    factors = tuple(factors_doc)
    passkey_only = ("user_verification", "passkey_acr", "authenticators", "transaction_bound")
    if "passkey" not in factors:
        for key in passkey_only:
            if key in spec:
                raise _fail([*loc, key], "only for a level whose factors include passkey")
        return replace(level, title=title, factors=factors)
    uv = spec.get("user_verification", "preferred")
    if uv not in USER_VERIFICATION:
        raise _fail([*loc, "user_verification"], f"one of {', '.join(USER_VERIFICATION)}")
    auth = None
    if spec.get("authenticators") is not None:
        aloc = [*loc, "authenticators"]
        a = _mapping(spec["authenticators"], aloc, {"device_bound", "aaguids", "mds"})
        aaguids: frozenset[str] = frozenset()
        if "aaguids" in a:
            raw = a["aaguids"]
            if not isinstance(raw, list) or not raw:
                raise _fail([*aloc, "aaguids"], "must be a non-empty list of AAGUIDs")
            for j, item in enumerate(raw):
                if not isinstance(item, str) or not _AAGUID.match(item.lower()):
                    raise _fail([*aloc, "aaguids", j], f"not an AAGUID (8-4-4-4-12 hex): {item!r}")
            aaguids = frozenset(x.lower() for x in raw)
        auth = AuthenticatorPolicy(
            device_bound=_bool(a.get("device_bound", False), [*aloc, "device_bound"]),
            aaguids=aaguids,
            mds=_bool(a.get("mds", False), [*aloc, "mds"]),
        )
    tx = None
    if "transaction_bound" in spec:
        tloc = [*loc, "transaction_bound"]
        t = spec["transaction_bound"]
        if t is True:
            t = {}
        t = _mapping(t, tloc, {"fields", "ttl_s", "require_body", "max_body_bytes"})
        fields = t.get("fields", [])
        if not isinstance(fields, list) or not all(
            isinstance(f, str) and _FIELD.match(f) for f in fields
        ):
            raise _fail([*tloc, "fields"], "a list of JSON body field names (a.b for nested)")
        tx = TransactionBinding(
            fields=tuple(fields),
            ttl_s=_int(t.get("ttl_s", 120), [*tloc, "ttl_s"], 10, 900),
            require_body=_bool(t.get("require_body", False), [*tloc, "require_body"]),
            max_body_bytes=_int(
                t.get("max_body_bytes", 16384), [*tloc, "max_body_bytes"], 1, 1024 * 1024
            ),
        )
        if "idp" in factors:
            # An IdP sign-in cannot commit to the request: its grant would allow any request
            # of the level, so the binding would be only as strong as the fallback.
            raise _fail([*loc, "factors"], "a transaction_bound level accepts only passkey")
    return replace(
        level,
        title=title,
        factors=factors,
        user_verification=str(uv),
        passkey_acr=_passkey_acr(level, spec.get("passkey_acr"), [*loc, "passkey_acr"]),
        authenticators=auth,
        transaction=tx,
    )


def _passkey_acr(level: Level, value: Any, loc: Sequence[str | int]) -> str:
    """The acr a passkey grant records: the configured one (which the level must accept),
    else the level's only acr, else ``phr`` (phishing-resistant) when the level lists it
    or lists none."""
    if value is not None:
        if not isinstance(value, str) or not _TOKEN.match(value):
            raise _fail(loc, f"invalid acr value {value!r}")
        if level.acr and value not in level.acr:
            raise _fail(loc, f"{value!r} is not one of the level's acr values")
        return value
    if len(level.acr) == 1:
        return next(iter(level.acr))
    if not level.acr or "phr" in level.acr:
        return "phr"
    raise _fail(loc, "required: the level lists several acr values and not phr")


def _level_ref(by_name: Mapping[str, Level], value: Any, loc: Sequence[str | int]) -> Level:
    if not isinstance(value, str) or value not in by_name:
        raise _fail(loc, f"unknown level {value!r} (known: {', '.join(by_name)})")
    return by_name[value]


def _route(i: int, doc: Any, by_name: Mapping[str, Level]) -> Route:
    loc: list[str | int] = ["routes", i]
    spec = _mapping(
        doc,
        loc,
        {"host", "path", "path_prefix", "path_regex", "methods", "level", "title", "description"},
    )
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
        regex = compile_regex(pattern, [*loc, "path_regex"])
    methods = None
    if "methods" in spec:
        methods = _methods(spec["methods"], [*loc, "methods"])
    if "level" not in spec:
        raise _fail(loc, "a route needs a level")
    level = _level_ref(by_name, spec["level"], [*loc, "level"])
    title = _title(spec.get("title"), [*loc, "title"])
    description = _description(spec.get("description"), [*loc, "description"])
    return Route(i, host, exact, prefix, regex, methods, level, title, description)


# Envoy refuses a safe_regex whose compiled RE2 program is larger than this (its runtime
# key re2.max_program_size.error_level, default 100): the policy refuses it first.
MAX_REGEX_PROGRAM_SIZE = 100


def _re2_options(*, capture: bool) -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # refusals are reported as policy errors, not on stderr
    options.never_capture = not capture
    return options


_AS_ENVOY = _re2_options(capture=True)  # how Envoy compiles it: the program size it sees
_FOR_MATCHING = _re2_options(capture=False)  # a yes/no answer needs no groups


class PathRegex:
    """A route's ``path_regex`` on RE2 (google-re2), the dialect of Envoy's ``safe_regex``:
    no lookaround, no backreferences, time linear in the path's length. ``fullmatch`` calls
    the RE2 object directly: google-re2's ``re``-style wrapper costs ~25 us a match, this
    ~5 us (Python's backtracking ``re`` ~1.5 us, and seconds on a hostile path)."""

    __slots__ = ("_match", "pattern", "programsize")
    _BOTH = _re2.RE2.Anchor.ANCHOR_BOTH

    def __init__(self, pattern: str) -> None:
        encoded = pattern.encode()
        sized = _re2.RE2(encoded, _AS_ENVOY)
        if not sized.ok():
            raise ValueError(sized.error().decode(errors="replace"))
        self.pattern = pattern
        self.programsize: int = sized.ProgramSize()
        self._match = _re2.RE2(encoded, _FOR_MATCHING).Match

    def fullmatch(self, path: str) -> bool:
        text = path.encode()
        return bool(self._match(self._BOTH, text, 0, len(text))[0][0] >= 0)

    def __repr__(self) -> str:
        return f"PathRegex({self.pattern!r})"


def compile_regex(pattern: str, loc: Sequence[str | int]) -> PathRegex:
    """``pattern`` compiled with RE2. What RE2 or Envoy would refuse is refused here, with
    the pattern."""
    try:
        regex = PathRegex(pattern)
    except ValueError as exc:
        raise _fail(loc, f"not an RE2 regular expression ({exc}): {pattern!r}") from None
    if regex.programsize > MAX_REGEX_PROGRAM_SIZE:
        raise _fail(
            loc,
            f"regular expression too large for Envoy (RE2 program size {regex.programsize} > "
            f"{MAX_REGEX_PROGRAM_SIZE}): {pattern!r}",
        )
    return regex


def _methods(value: Any, loc: Sequence[str | int]) -> frozenset[str]:
    """A route's methods, exactly as RFC 9110 spells them: methods are case-sensitive
    (section 9.1) and Envoy matches ``:method`` byte for byte, so ``get`` is refused rather
    than read as ``GET``. ``GET`` brings ``HEAD`` (section 9.3.2: a HEAD is answered by the
    GET handler, without the body)."""
    if not isinstance(value, list) or not value:
        raise _fail(loc, "must be a non-empty list of HTTP methods")
    for j, item in enumerate(value):
        if isinstance(item, str) and item in _METHODS:
            continue
        if isinstance(item, str) and item.upper() in _METHODS:
            raise _fail(
                [*loc, j], f"methods are case-sensitive: write {item.upper()!r}, not {item!r}"
            )
        raise _fail([*loc, j], f"unknown method {item!r} (known: {', '.join(sorted(_METHODS))})")
    methods = frozenset(value)
    return methods | {"HEAD"} if "GET" in methods else methods


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


def _codes(value: Any, loc: Sequence[str | int]) -> frozenset[str]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(c, str) and re.fullmatch(r"[A-Z]{2}", c) for c in value)
    ):
        raise _fail(loc, "must be a non-empty list of ISO 3166 alpha-2 codes (e.g. US)")
    return frozenset(value)


def _names(value: Any, loc: Sequence[str | int], allowed: frozenset[str]) -> frozenset[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise _fail(loc, f"must name one or more of: {', '.join(sorted(allowed))}")
    for j, item in enumerate(items):
        if not isinstance(item, str) or item not in allowed:  # a list or dict item: unhashable
            raise _fail([*loc, j], f"unknown {item!r} (known: {', '.join(sorted(allowed))})")
    return frozenset(items)


_CONDITIONS = {
    "ip_in",
    "ip_not_in",
    "country_in",
    "country_not_in",
    "device",
    "signals_any",
    "signals_all",
    "level_at_least",
}


def _rule(i: int, doc: Any, by_name: Mapping[str, Level]) -> Rule:
    loc: list[str | int] = ["rules", i]
    spec = _mapping(doc, loc, {"name", "when", "raise_to", "deny", "mode"})
    when = _mapping(spec.get("when"), [*loc, "when"], _CONDITIONS)
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
    mode = spec.get("mode", "enforce")
    if mode not in ("enforce", "shadow"):
        raise _fail([*loc, "mode"], "mode is enforce (the default) or shadow")
    w = [*loc, "when"]
    return Rule(
        index=i,
        name=name,
        ip_in=_networks(when.get("ip_in"), [*w, "ip_in"]),
        ip_not_in=_networks(when.get("ip_not_in"), [*w, "ip_not_in"]),
        raise_to=_level_ref(by_name, spec["raise_to"], [*loc, "raise_to"])
        if "raise_to" in spec
        else None,
        deny=deny,
        shadow=mode == "shadow",
        country_in=_codes(when["country_in"], [*w, "country_in"])
        if "country_in" in when
        else frozenset(),
        country_not_in=_codes(when["country_not_in"], [*w, "country_not_in"])
        if "country_not_in" in when
        else frozenset(),
        device=_names(when["device"], [*w, "device"], DEVICE_STATES)
        if "device" in when
        else frozenset(),
        signals_any=_names(when["signals_any"], [*w, "signals_any"], SIGNALS)
        if "signals_any" in when
        else frozenset(),
        signals_all=_names(when["signals_all"], [*w, "signals_all"], SIGNALS)
        if "signals_all" in when
        else frozenset(),
        level_at_least=_level_ref(by_name, when["level_at_least"], [*w, "level_at_least"])
        if "level_at_least" in when
        else None,
    )


def _signals(doc: Any, by_name: Mapping[str, Level]) -> SignalSettings:
    loc = ["signals"]
    spec = _mapping(
        doc, loc, {"sensitive_level", "velocity", "impossible_travel", "hours", "risk_weights"}
    )
    sensitive = None
    if "sensitive_level" in spec:
        sensitive = _level_ref(by_name, spec["sensitive_level"], [*loc, "sensitive_level"]).name
    vel = _mapping(spec.get("velocity"), [*loc, "velocity"], {"window_s", "max"})
    window = _int(vel.get("window_s", 60), [*loc, "velocity", "window_s"], 1, 86_400)
    vmax = _int(vel["max"], [*loc, "velocity", "max"], 1, 1_000_000) if "max" in vel else None
    if vmax is not None and sensitive is None:
        raise _fail([*loc, "velocity"], "velocity needs signals.sensitive_level")
    travel = _mapping(spec.get("impossible_travel"), [*loc, "impossible_travel"], {"max_kmh"})
    kmh = None
    if "max_kmh" in travel:
        kmh = float(_int(travel["max_kmh"], [*loc, "impossible_travel", "max_kmh"], 1, 100_000))
    hours = None
    if spec.get("hours") is not None:
        h = _mapping(spec["hours"], [*loc, "hours"], {"timezone", "start", "end", "days"})
        hloc = [*loc, "hours"]
        tz = h.get("timezone")
        try:
            zone = ZoneInfo(tz) if isinstance(tz, str) and tz else None
        except (ValueError, ZoneInfoNotFoundError):
            zone = None
        if zone is None:
            raise _fail([*hloc, "timezone"], "an IANA time zone name, e.g. America/New_York")
        times = []
        for key in ("start", "end"):
            v = h.get(key)
            if not isinstance(v, str) or not _HHMM.match(v):
                raise _fail([*hloc, key], "a time as HH:MM (24 h)")
            times.append(int(v[:2]) * 60 + int(v[3:]))
        days = _names(h.get("days", list(_DAYS[:5])), [*hloc, "days"], frozenset(_DAYS))
        hours = Hours(zone, times[0], times[1], frozenset(_DAYS.index(d) for d in days))
    weights = dict(DEFAULT_RISK_WEIGHTS)
    rw = _mapping(spec.get("risk_weights"), [*loc, "risk_weights"], set(SIGNALS))
    for key, value in rw.items():
        weights[key] = _int(value, [*loc, "risk_weights", key], 0, 100)
    return SignalSettings(sensitive, window, vmax, kmh, hours, MappingProxyType(weights))


def _posture_rule(rule: Rule) -> bool:
    return bool(
        rule.device & {"noncompliant", "unmanaged"}
        or (rule.signals_any | rule.signals_all) & {"device-noncompliant", "device-unmanaged"}
    )


def load_policy(doc: Any, *, version: str = "") -> Policy:
    """Validate a parsed policy document. Raises PolicyError with the failing location."""
    top = _mapping(doc, [], {"version", "levels", "routes", "default_level", "rules", "signals"})
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
    rules = tuple(_rule(i, r, by_name) for i, r in enumerate(rules_doc))
    return Policy(
        levels=levels,
        by_name=by_name,
        routes=tuple(_route(i, r, by_name) for i, r in enumerate(routes_doc)),
        default_level=_level_ref(by_name, top["default_level"], ["default_level"]),
        rules=rules,
        uses_posture=any(_posture_rule(r) for r in rules),
        version=str(declared) if declared is not None else version,
        grant_levels=tuple(lv.name for lv in levels if lv.needs_evidence),
        signals=_signals(top.get("signals"), by_name),
    )
