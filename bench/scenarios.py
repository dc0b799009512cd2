"""The benchmark scenarios (issue 6). Each names where its requests go, which token they
carry, the one status every response must have, and whose CPU is charged to it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    id: str
    name: str
    title: str
    target: str  # "ceiling" | "jwt" | "stack": which Envoy receives the load
    credential: str | None  # "mfa" | "pwd-granted" | "pwd" | None
    expect_status: int  # every response must be this; anything else is counted as an error
    processes: tuple[str, ...]  # CPU reported for these ("envoy", "service", "redis")
    path: str = "/accounts/1"  # an `elevated` route in examples/policy.yaml
    available: bool = True
    unavailable_reason: str = ""


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "0", "ceiling", "Envoy direct response, no authorization", "ceiling", None, 200, ("envoy",)
    ),
    Scenario(
        "1",
        "jwt-rbac",
        "Envoy jwt_authn + RBAC on acr (stateless, C++)",
        "jwt",
        "mfa",
        200,
        ("envoy",),
    ),
    Scenario(
        "2",
        "allow-grant",
        "stepup-authz gRPC, allow via Redis grant",
        "stack",
        "pwd-granted",
        200,
        ("envoy", "service", "redis"),
    ),
    Scenario(
        "3",
        "stepup",
        "stepup-authz gRPC, step-up challenge (401)",
        "stack",
        "pwd",
        401,
        ("envoy", "service", "redis"),
    ),
    # GET /wires/1 is `high` in examples/policy.yaml; the bench stack audits allows at `high`
    # and above before access (bench.stackctl.AUDIT_DURABLE_LEVEL): one durable XADD more.
    Scenario(
        "4",
        "audit",
        "stepup-authz gRPC, audit-before-access (high)",
        "stack",
        "pwd-granted",
        200,
        ("envoy", "service", "redis", "exporter"),
        path="/wires/1",
    ),
    Scenario(
        "5",
        "http-authz",
        "stepup-authz behind Envoy HTTP ext_authz",
        "stack-http",
        "pwd-granted",
        200,
        ("envoy", "service", "redis"),
    ),
)
# Not part of the list, off by default (--scenarios 0,1,2,2t,3): the allow path when
# the token's own acr satisfies the level, so no Redis read — separates token cost from Redis.
EXTRA = (
    Scenario(
        "2t",
        "allow-token",
        "stepup-authz gRPC, allow by token acr (no Redis)",
        "stack",
        "mfa",
        200,
        ("envoy", "service", "redis"),
    ),
)
BY_ID = {s.id: s for s in SCENARIOS + EXTRA}
DEFAULT_IDS = tuple(s.id for s in SCENARIOS if s.available)
