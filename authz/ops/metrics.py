"""Prometheus collectors (prefix ``stepup_authz_``), one set per service instance.

Each instance owns a registry so several services can live in one process (tests) and the
``/metrics`` endpoint exposes exactly this service's series. Label values are the stable
reason slugs from ``authz.core.reasons`` and the policy's level names: bounded sets.
"""

from __future__ import annotations

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from authz.core.reasons import Reason

# Buckets centred on the budget: a Check should take well under 2 ms.
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)


class TokenCacheMetrics:
    """The access-token cache as the verifier changes it (``TokenVerifier.observe_cache``):
    ``token_cache_lookups_total{result="hit|miss"}``, ``token_cache_entries`` and
    ``token_cache_capacity`` (``oidc.token_cache_size``). Plain counters and gauges, so
    ``serve --workers N`` reports them too (summed / per worker). A hit costs one
    pre-bound counter increment; the size is set only when it changes (on a miss)."""

    def __init__(self, lookups: Counter, entries_gauge: Gauge, capacity: Gauge) -> None:
        self.hit = lookups.labels(result="hit").inc
        self.miss = lookups.labels(result="miss").inc
        self._entries = entries_gauge
        self._capacity = capacity

    def entries(self, n: int) -> None:
        self._entries.set(n)

    def capacity(self, n: int) -> None:
        self._capacity.set(n)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        ns = "stepup_authz"
        # The process's own CPU, memory, fds, GC and Python version (process_*, python_*),
        # as on the default registry: the service runs on a registry of its own.
        if r is not REGISTRY:  # the default registry has its own already
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.checks = Counter(
            "checks", "Check decisions.", ["outcome", "reason", "level"], namespace=ns, registry=r
        )
        self.check_duration = Histogram(
            "check_duration_seconds",
            "Time to decide one Check, inside the service.",
            namespace=ns,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.challenges = Counter(
            "stepup_challenges",
            "Step-up challenges issued.",
            ["level", "mode"],
            namespace=ns,
            registry=r,
        )
        self.completions = Counter(
            "stepup_completions",
            "Step-up round trips completed at the callback.",
            ["level", "result", "factor"],
            namespace=ns,
            registry=r,
        )
        self.redis_errors = Counter(
            "redis_errors", "Session store errors and timeouts.", ["op"], namespace=ns, registry=r
        )
        self.fail_closed = Counter(
            "fail_closed",
            "Requests denied because something failed.",
            ["cause"],
            namespace=ns,
            registry=r,
        )
        self.policy_reloads = Counter(
            "policy_reloads", "Policy reload attempts.", ["result"], namespace=ns, registry=r
        )
        self.shed = Counter(
            "checks_shed",
            "Checks refused as overloaded: Envoy's deadline had passed before the session "
            "read (no Redis call made).",
            namespace=ns,
            registry=r,
        )
        self.policy_info = Info("policy", "The policy in force.", namespace=ns, registry=r)
        self.token_cache_size = Gauge(
            "token_cache_entries", "Verified tokens cached.", namespace=ns, registry=r
        )
        self.token_cache = TokenCacheMetrics(
            Counter(
                "token_cache_lookups",
                "Access-token cache lookups by the verifier: a hit skips the signature check.",
                ["result"],
                namespace=ns,
                registry=r,
            ),
            self.token_cache_size,
            Gauge(
                "token_cache_capacity",
                "Verified tokens the cache may hold (oidc.token_cache_size).",
                namespace=ns,
                registry=r,
            ),
        )
        self.shadow_matches = Counter(
            "shadow_matches",
            "Shadow rules that matched: what they would have done, counted but not enforced.",
            ["rule"],
            namespace=ns,
            registry=r,
        )
        self.signals = Counter(
            "signals",
            "Context and behavioural signals that fired.",
            ["signal"],
            namespace=ns,
            registry=r,
        )
        self.noscript = Counter(
            "redis_noscript",
            "EVALSHA answered NOSCRIPT (script cache flushed): re-sent with EVAL.",
            namespace=ns,
            registry=r,
        )
        self.corrupt_grants = Counter(
            "corrupt_grants",
            "Grant values in the store that did not decode (ignored).",
            namespace=ns,
            registry=r,
        )
        # Mesh coverage (authz.evidence.monitor), per Envoy admin address checked.
        self.routes_uncovered = Gauge(
            "routes_uncovered",
            "Routes of a live Envoy that no fail-closed ext_authz filter checks.",
            ["envoy"],
            namespace=ns,
            registry=r,
        )
        self.routes_fail_open = Gauge(
            "routes_fail_open",
            "Routes of a live Envoy checked only by ext_authz with failure_mode_allow.",
            ["envoy"],
            namespace=ns,
            registry=r,
        )
        self.coverage_unreachable = Gauge(
            "coverage_unreachable",
            "1 when the last coverage check could not read this Envoy's config dump.",
            ["envoy"],
            namespace=ns,
            registry=r,
        )
        self.passkey_ceremonies = Counter(
            "passkey_ceremonies",
            "Passkey ceremonies: started, success, or the refusal's reason slug.",
            ["kind", "result", "level"],
            namespace=ns,
            registry=r,
        )
        self.passkey_credentials = Counter(
            "passkey_credentials",
            "Passkey registry changes (enrolled, removed, revoked, imported, restored).",
            ["op"],
            namespace=ns,
            registry=r,
        )
        self.passkey_clones = Counter(
            "passkey_clone_suspected",
            "Assertions refused because the signature counter did not grow (WebAuthn 6.1.1).",
            namespace=ns,
            registry=r,
        )
        self.ciba = Counter(
            "ciba_requests",
            "Push step-ups (OpenID CIBA): started, approved, denied, expired, failed, refused.",
            ["outcome", "reason", "level"],
            namespace=ns,
            registry=r,
        )
        for op in ("enrolled", "removed", "revoked", "imported", "restored"):
            self.passkey_credentials.labels(op=op)
        # Pre-create the fail-closed series so alerts see a 0 before the first failure.
        for cause in (
            Reason.SESSION_STORE_UNAVAILABLE,
            Reason.KEYS_UNAVAILABLE,
            Reason.INTERNAL_ERROR,
            Reason.DEADLINE_EXCEEDED,
            Reason.AUDIT_UNAVAILABLE,
            Reason.OVERLOADED,
        ):
            self.fail_closed.labels(cause=cause)
        for op in ("read", "write", "state", "note"):
            self.redis_errors.labels(op=op)
        for result in ("success", "error"):
            self.policy_reloads.labels(result=result)
