"""The passkey rules that are not cryptography: where a step-up goes, who may enrol, which
credentials may answer which step-up. Pure: time comes in as ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import quote

from authz.core.policy import Level, Policy
from authz.core.reasons import Reason
from authz.core.session import Evidence, unmet
from authz.stepup.passkeys import attestation
from authz.stepup.passkeys.attestation import Authenticator, PasskeyRefused
from authz.store.credentials import Credential


def stepup_path(level: Level, path_prefix: str = "/_stepup") -> str:
    """Where the Check sends a browser that must step up to ``level``: the passkey page
    when the level lists passkey first, else the IdP start (the passkey page itself falls
    back to the IdP when the user has no usable credential and the level lists idp)."""
    if level.factors and level.factors[0] == "passkey":
        return f"{path_prefix}/passkey"
    return f"{path_prefix}/start"


def stepup_link(
    level: Level,
    rd: str,
    *,
    path_prefix: str = "/_stepup",
    ctx: str | None = None,
    tx: str | None = None,
) -> str:
    """The whole redirect target (``rd`` is the same-origin path to come back to)."""
    url = f"{stepup_path(level, path_prefix)}?level={quote(level.name)}&rd={quote(rd, safe='')}"
    if ctx:
        url += f"&ctx={quote(ctx, safe='')}"
    if tx:
        url += f"&tx={quote(tx, safe='')}"
    return url


def enrolment_allowed(
    policy: Policy,
    enrol_level: str | None,
    evidence: Iterable[tuple[str | None, Evidence]],
    *,
    now: int,
    window_s: int,
    leeway: int,
) -> bool:
    """Whether a user may add or remove a credential now: some evidence (the token's own,
    level None; or a live grant of this session at a level) was proved within
    ``window_s`` and satisfies ``enrol_level``. Either an IdP step-up or a passkey one."""
    if enrol_level is None:
        return False
    level = policy.by_name.get(enrol_level)
    if level is None or not level.needs_evidence:
        return False  # misconfigured: nobody enrols (fail closed)
    for at_level, ev in evidence:
        if at_level is not None:
            granted = policy.by_name.get(at_level)
            if granted is None or granted.rank < level.rank:
                continue
        if ev.auth_time is None or ev.auth_time < now - window_s or ev.auth_time > now + leeway:
            continue
        if unmet(ev, level, now=now, leeway=leeway) is None:
            return True
    return False


def authenticator_of(cred: Credential) -> Authenticator:
    return Authenticator(cred.aaguid, cred.backup_eligible, cred.certified)


def refuse_for_stepup(level: Level, cred: Credential, started_at: int) -> None:
    """Raise PasskeyRefused when ``cred`` may not answer this step-up of ``level``:
    enrolled at or after the step-up began (CVE-2023-3597), or outside the level's
    authenticator policy."""
    if cred.created_at >= started_at:
        raise PasskeyRefused(
            Reason.ENROLLED_DURING_STEPUP,
            "enrolment.same_stepup",
            "a key added during this step-up cannot complete it; go back to the page you "
            "wanted and step up again",
        )
    attestation.check(level.authenticators, authenticator_of(cred))


def usable(level: Level, creds: Sequence[Credential], started_at: int) -> list[Credential]:
    out = []
    for c in creds:
        try:
            refuse_for_stepup(level, c, started_at)
        except PasskeyRefused:
            continue
        out.append(c)
    return out


def accepting_levels(policy: Policy, auth: Authenticator) -> list[Level]:
    """The passkey levels whose authenticator policy ``auth`` meets."""
    out = []
    for level in policy.levels:
        if not level.offers("passkey"):
            continue
        try:
            attestation.check(level.authenticators, auth)
        except PasskeyRefused:
            continue
        out.append(level)
    return out
