"""What a Check looks up in the policy, indexed once when the policy loads.

Routes are matched first-in-file-order and rules evaluated in file order; both used to be a
linear scan over every entry (``Policy.route_for_scan``, ``Policy.rules``), which is still
the reference the indexes are tested against (tests/unit/test_policy_index.py: random
policies and requests, index and scan agree). The indexes only narrow down which entries
*could* match; every candidate is confirmed with the entry's own ``matches``, so what
matches is decided by the same code as before.

Why they exist: ``python -m bench.growth --dimension policy --dimension rules`` (1,000 routes
with the match last, 100 rules none of which fires) -- see docs/performance.md, "The route
and rule indexes". Neither structure is worth its code for the 6 routes and 1 rule of the
example policy; both are for policies of hundreds.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from re2 import _re2

if TYPE_CHECKING:
    from authz.core.policy import Context, Route, Rule

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_NEVER = 1 << 62  # a route index no policy reaches: "no match yet"


def _sorted_tuples(groups: Mapping[str, list[Route]]) -> dict[str, tuple[Route, ...]]:
    return {k: tuple(sorted(v, key=lambda r: r.index)) for k, v in groups.items()}


class _RegexSet:
    """A group's ``path_regex`` routes as one RE2 set: one pass over the path names the
    routes whose pattern matches, instead of one RE2 match per route.

    RE2 reports a set's DFA running out of memory only as "no match"; the vendored RE2
    never gives up on a set scan after ``Compile`` succeeded (its cache is flushed and
    rebuilt instead: the give-up branch excludes sets), and ``Compile`` itself fails when the
    budget is too small. A set that does not compile is not used: its routes are then tried
    one by one, in file order, as the scan would."""

    __slots__ = ("_match", "first", "routes")

    def __init__(self, routes: Sequence[Route]) -> None:
        from authz.core.policy import _FOR_MATCHING  # the options each PathRegex uses

        self.routes = tuple(sorted(routes, key=lambda r: r.index))
        self.first = self.routes[0].index if self.routes else _NEVER
        self._match: Callable[[bytes], list[int]] | None = None
        if not self.routes:
            return
        rset = _re2.Set(_re2.RE2.Anchor.ANCHOR_BOTH, _FOR_MATCHING)
        for i, route in enumerate(self.routes):
            assert route.regex is not None
            if rset.Add(route.regex.pattern.encode()) != i:
                return  # refused: try each route's own regex instead
        if rset.Compile():
            self._match = rset.Match

    def candidates(self, path: str) -> Iterable[Route]:
        """The routes whose regex may match ``path``, in file order (a superset: the caller
        confirms each with the route's own ``matches``)."""
        if self._match is None:
            return self.routes
        hits = self._match(path.encode())
        if not hits:
            return ()
        routes = self.routes
        return [routes[i] for i in sorted(hits)]


class _PathGroup:
    """The routes of one host key (one exact host, one wildcard suffix, or any host),
    indexed by what their path tests: exact paths (and the bare segment a ``/x/`` prefix
    also covers) in one dict, prefixes in a dict per prefix length, regexes in one RE2 set,
    routes without a path condition in file order."""

    __slots__ = (
        "_any_path",
        "_any_path_first",
        "_exact",
        "_first",
        "_lengths",
        "_prefix_first",
        "_prefixes",
        "_regex",
    )

    def __init__(self, routes: Sequence[Route]) -> None:
        exact: dict[str, list[Route]] = {}
        prefixes: dict[str, list[Route]] = {}
        regexes: list[Route] = []
        any_path: list[Route] = []
        for r in routes:
            if r.exact is not None:
                exact.setdefault(r.exact, []).append(r)
            elif r.prefix is not None:
                prefixes.setdefault(r.prefix, []).append(r)
                if len(r.prefix) > 1 and r.prefix[-1] == "/":  # "/x/" covers "/x"
                    exact.setdefault(r.prefix[:-1], []).append(r)
            elif r.regex is not None:
                regexes.append(r)
            else:
                any_path.append(r)
        self._exact = _sorted_tuples(exact)
        self._prefixes = _sorted_tuples(prefixes)
        self._lengths = tuple(sorted({len(p) for p in prefixes}))
        self._prefix_first = min((rs[0].index for rs in self._prefixes.values()), default=_NEVER)
        self._regex = _RegexSet(regexes)
        self._any_path = tuple(sorted(any_path, key=lambda r: r.index))
        self._any_path_first = self._any_path[0].index if self._any_path else _NEVER
        self._first = min((r.index for r in routes), default=_NEVER)

    def first(self, host: str, method: str, path: str, best: Route | None) -> Route | None:
        """The first route of this group that matches, if it comes before ``best``. Each
        kind of route is looked at only if one of its routes comes before the best so far."""
        limit = _NEVER if best is None else best.index
        if self._first >= limit:
            return best
        hit = self._exact.get(path)
        if hit is not None:
            found = _first_of(hit, host, method, path, limit)
            if found is not None:
                best, limit = found, found.index
        if self._prefix_first < limit:
            n = len(path)
            prefixes = self._prefixes
            for length in self._lengths:
                if length > n:
                    break
                hit = prefixes.get(path[:length])
                if hit is not None:
                    found = _first_of(hit, host, method, path, limit)
                    if found is not None:
                        best, limit = found, found.index
        if self._regex.first < limit:
            found = _first_of(self._regex.candidates(path), host, method, path, limit)
            if found is not None:
                best, limit = found, found.index
        if self._any_path_first < limit:
            found = _first_of(self._any_path, host, method, path, limit)
            if found is not None:
                best = found
        return best


def _first_of(
    routes: Iterable[Route], host: str, method: str, path: str, limit: int
) -> Route | None:
    """The first of ``routes`` (in file order) before ``limit`` that matches, confirmed by
    the route itself."""
    for r in routes:
        if r.index >= limit:
            return None
        if r.matches(host, method, path):
            return r
    return None


class RouteIndex:
    """Routes by host, then by path (``_PathGroup``): the first route in file order that
    matches, as ``Policy.route_for_scan`` finds it, without trying every route.

    A route's host is an exact name, a ``.suffix`` (written ``*.suffix``: the request's host
    ends with it) or absent (any host). The request's host is looked up as given, exactly
    as ``Route.matches`` compares it. The answer is the lowest-indexed match over the
    any-host group, the exact host's group and each wildcard suffix the host ends with;
    each group skips what cannot come before the best so far.

    Kept for speed: ``python -m bench.growth --dimension policy`` (1,000 routes, the match
    last), docs/performance.md."""

    __slots__ = ("_any", "_hosts", "_wild", "_wild_lengths")

    def __init__(self, routes: Sequence[Route]) -> None:
        any_host: list[Route] = []
        hosts: dict[str, list[Route]] = {}
        wild: dict[str, list[Route]] = {}
        for r in routes:
            if r.host is None:
                any_host.append(r)
            elif r.host.startswith("."):
                wild.setdefault(r.host, []).append(r)
            else:
                hosts.setdefault(r.host, []).append(r)
        self._any = _PathGroup(any_host)
        self._hosts = {h: _PathGroup(rs) for h, rs in hosts.items()}
        self._wild = {h: _PathGroup(rs) for h, rs in wild.items()}
        self._wild_lengths = tuple(sorted({len(h) for h in wild}))

    def route_for(self, host: str, method: str, path: str) -> Route | None:
        best = self._any.first(host, method, path, None)
        group = self._hosts.get(host)
        if group is not None:
            best = group.first(host, method, path, best)
        n = len(host)
        for length in self._wild_lengths:
            if length > n:
                break
            group = self._wild.get(host[n - length :])
            if group is not None:
                best = group.first(host, method, path, best)
        return best


class _NetTable:
    """Rule bit masks by network: which rules list a network that holds an address, found
    with one dict lookup per prefix length in use (the address's top bits) instead of
    ``address in network`` for every network of every rule."""

    __slots__ = ("_by_version",)

    def __init__(self) -> None:
        # version -> {shift (address bits - prefix length): {network bits: rule mask}}
        self._by_version: dict[int, dict[int, dict[int, int]]] = {}

    def add(self, net: Network, bit: int) -> None:
        shift = net.max_prefixlen - net.prefixlen
        table = self._by_version.setdefault(net.version, {}).setdefault(shift, {})
        key = int(net.network_address) >> shift
        table[key] = table.get(key, 0) | bit

    def __bool__(self) -> bool:
        return bool(self._by_version)

    def holding(self, ip: IpAddress) -> int:
        """The rules with a network that holds ``ip`` (a bit mask)."""
        tables = self._by_version.get(ip.version)
        if not tables:
            return 0
        n = int(ip)
        mask = 0
        for shift, table in tables.items():
            mask |= table.get(n >> shift, 0)
        return mask


class RuleIndex:
    """Which rules could fire for a request's IP and context, so a Check evaluates only
    those (in file order, each confirmed with ``Rule.matches``).

    Each rule is filed under one condition it cannot fire without (every condition must
    hold): a signal of ``signals_all`` or ``signals_any``, a country of ``country_in``, a
    network of ``ip_in``, a device state -- looked up by what the request has; or, when it
    has only exclusions, under ``ip_not_in`` / ``country_not_in`` -- a candidate unless the
    request is in one of them. A rule with only ``level_at_least`` is always a candidate:
    the level rises while rules run, so that condition is left to ``Rule.matches``. Missing
    values follow ``Rule.matches``: no IP or country never satisfies an ``*_in`` and never
    excludes by an ``*_not_in``; no context is the default ``Context()``.

    Kept for speed: ``python -m bench.growth --dimension rules`` (100 rules, none fires),
    docs/performance.md."""

    __slots__ = (
        "_always",
        "_by_country",
        "_by_device",
        "_by_signal",
        "_country_out",
        "_country_out_all",
        "_ip_in",
        "_ip_out",
        "_ip_out_all",
        "_no_context",
        "_rules",
    )

    def __init__(self, rules: Sequence[Rule], no_context: Context) -> None:
        self._rules = tuple(rules)
        self._no_context = no_context
        self._always = 0
        self._by_signal: dict[str, int] = {}
        self._by_country: dict[str, int] = {}
        self._by_device: dict[str, int] = {}
        self._ip_in = _NetTable()
        self._ip_out = _NetTable()
        self._ip_out_all = 0
        self._country_out: dict[str, int] = {}
        self._country_out_all = 0
        for pos, rule in enumerate(self._rules):
            self._file(rule, 1 << pos)

    def _file(self, rule: Rule, bit: int) -> None:
        def under(table: dict[str, int], keys: Iterable[str]) -> None:
            for key in keys:
                table[key] = table.get(key, 0) | bit

        if rule.signals_all:
            under(self._by_signal, [min(rule.signals_all)])  # any one of them is needed
        elif rule.signals_any:
            under(self._by_signal, rule.signals_any)
        elif rule.country_in:
            under(self._by_country, rule.country_in)
        elif rule.ip_in:
            for net in rule.ip_in:
                self._ip_in.add(net, bit)
        elif rule.device:
            under(self._by_device, rule.device)
        elif rule.ip_not_in:
            self._ip_out_all |= bit
            for net in rule.ip_not_in:
                self._ip_out.add(net, bit)
        elif rule.country_not_in:
            self._country_out_all |= bit
            under(self._country_out, rule.country_not_in)
        else:
            self._always |= bit

    def candidates(self, ip: IpAddress | None, ctx: Context | None) -> Sequence[Rule]:
        """The rules that could fire, in file order: a superset of those whose ``matches``
        holds (whatever the level), never missing one."""
        if not self._rules:
            return ()
        ctx = ctx or self._no_context
        mask = self._always
        if self._by_signal:
            for s in ctx.signals:
                mask |= self._by_signal.get(s, 0)
        if self._by_device:
            for d in ctx.device:
                mask |= self._by_device.get(d, 0)
        country = ctx.country
        if country is not None:
            mask |= self._by_country.get(country, 0)
            mask |= self._country_out_all & ~self._country_out.get(country, 0)
        else:
            mask |= self._country_out_all
        if ip is not None:
            if self._ip_in:
                mask |= self._ip_in.holding(ip)
            if self._ip_out_all:
                mask |= self._ip_out_all & ~self._ip_out.holding(ip)
        else:
            mask |= self._ip_out_all
        if not mask:
            return ()
        rules = self._rules
        out = []
        while mask:
            low = mask & -mask
            out.append(rules[low.bit_length() - 1])
            mask ^= low
        return out
