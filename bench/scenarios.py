"""The benchmark scenarios (issues 6 and 18). Each names where its requests go, which token
they carry, the one status every response must have, whose CPU is charged to it, its role
(ceiling, reference, floor or the service itself) and, for ext_authz scenarios, the mode
(``grpc`` or ``http``): every service cell is reported as a ratio to the floor of its mode."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    id: str
    name: str
    title: str
    target: str  # "ceiling" | "jwt" | "stack" | "stack-http" | "floor-grpc" | "floor-http"
    # | "floor-grpc-await"
    credential: str | None  # "mfa" | "pwd-granted" | "pwd" | None
    expect_status: int  # every response must be this; anything else is counted as an error
    processes: tuple[str, ...]  # CPU reported for these ("envoy", "service", "redis")
    path: str = "/accounts/1"  # an `elevated` route in examples/policy.yaml
    role: str = "service"  # "ceiling" | "reference" | "floor" | "floor-await" | "service"
    mode: str | None = None  # ext_authz protocol: "grpc" | "http"; None without ext_authz
    spin_us: int = 0  # an awaiting floor: us of Python after its Redis reply (bench.floors)
    available: bool = True
    unavailable_reason: str = ""


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "0",
        "ceiling",
        "Envoy direct response, no authorization",
        "ceiling",
        None,
        200,
        ("envoy",),
        role="ceiling",
    ),
    Scenario(
        "1",
        "jwt-rbac",
        "Envoy jwt_authn + RBAC on acr (stateless, C++)",
        "jwt",
        "mfa",
        200,
        ("envoy",),
        role="reference",
    ),
    Scenario(
        "2",
        "allow-grant",
        "stepup-authz gRPC, allow via Redis grant",
        "stack",
        "pwd-granted",
        200,
        ("envoy", "service", "redis"),
        mode="grpc",
    ),
    Scenario(
        "3",
        "stepup",
        "stepup-authz gRPC, step-up challenge (401)",
        "stack",
        "pwd",
        401,
        ("envoy", "service", "redis"),
        mode="grpc",
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
        mode="grpc",
    ),
    Scenario(
        "5",
        "http-authz",
        "stepup-authz behind Envoy HTTP ext_authz",
        "stack-http",
        "pwd-granted",
        200,
        ("envoy", "service", "redis"),
        mode="http",
    ),
    # The floors (bench/floors.py): a Python server of each kind behind its own Envoy,
    # rendered from the same bootstrap as the service's in that mode, that decides nothing
    # and sends back the service's own allow answer (captured at start): what a Check costs
    # before any of the project's code runs. "service" is the floor's process here.
    Scenario(
        "6",
        "floor-grpc",
        "floor: no-op grpc.aio ext_authz, same answer",
        "floor-grpc",
        "pwd-granted",
        200,
        ("envoy", "service"),
        role="floor",
        mode="grpc",
    ),
    Scenario(
        "7",
        "floor-http",
        "floor: no-op asyncio HTTP ext_authz, same answer",
        "floor-http",
        "pwd-granted",
        200,
        ("envoy", "service"),
        role="floor",
        mode="http",
    ),
    # The gRPC floor whose Check awaits one GET on the stack's Valkey before answering (no
    # decision, reply discarded): how much of the service's gRPC cost "above the floor" is
    # grpc.aio's price for a handler that suspends, not the project's code.
    Scenario(
        "6r",
        "floor-grpc-await",
        "floor: grpc.aio ext_authz awaiting one Redis GET, same answer",
        "floor-grpc-await",
        "pwd-granted",
        200,
        ("envoy", "service", "redis"),
        role="floor-await",
        mode="grpc",
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
        mode="grpc",
    ),
)
# The awaiting gRPC floor that also spends SPIN_US of Python on the loop after its Redis
# reply (about what bench.micro measures of the project's gRPC-mode code on a quiet host):
# what grpc.aio charges for a handler of that cost, with no decision (off by default).
SPIN_US = 130
EXTRA += (
    Scenario(
        "6s",
        "floor-grpc-spin",
        f"floor: grpc.aio awaiting one Redis GET, then {SPIN_US} us of Python",
        "floor-grpc-spin",
        "pwd-granted",
        200,
        ("envoy", "service", "redis"),
        role="floor-await",
        mode="grpc",
        spin_us=SPIN_US,
    ),
)
BY_ID = {s.id: s for s in SCENARIOS + EXTRA}
DEFAULT_IDS = tuple(s.id for s in SCENARIOS if s.available)
FLOOR_OF = {s.mode: s.id for s in SCENARIOS if s.role == "floor"}  # mode -> floor scenario
JWT_ID = "1"  # the native reference every service cell is also compared with
