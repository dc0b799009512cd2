"""Where a browser is sent when it must sign in or step up; shared by the gRPC and the
HTTP ext_authz response builders so the two modes cannot drift."""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import quote

from authz.core.attributes import RequestAttributes
from authz.core.decision import Decision, Outcome
from authz.core.session import session_key
from authz.stepup.link import ContextSigner
from authz.stepup.passkeys.rules import stepup_path


class Redirects:
    def __init__(
        self,
        path_prefix: str = "/_stepup",
        signer: ContextSigner | None = None,
        clock: Callable[[], float] = time.time,
        passkeys: bool = False,
    ) -> None:
        self.login_path = f"{path_prefix}/login"
        self.start_path = f"{path_prefix}/start"
        self.signer = signer
        self.clock = clock
        # passkeys.enabled: a level listing passkey first goes to the passkey page (which
        # falls back to the IdP start when the user has no usable key and the level allows).
        self.path_prefix = path_prefix if passkeys else None

    def target(self, d: Decision, attrs: RequestAttributes) -> str:
        rd = quote(attrs.path_and_query, safe="")
        if d.outcome is not Outcome.STEP_UP or d.level is None:
            return f"{self.login_path}?rd={rd}"
        start = self.start_path
        if self.path_prefix is not None:
            start = stepup_path(d.level, self.path_prefix)
        target = f"{start}?level={quote(d.level.name)}&rd={rd}"
        if self.signer is not None and d.identity is not None:
            ip = str(attrs.source_ip) if attrs.source_ip is not None else None
            ident = d.identity
            ctx = self.signer.sign(
                level=d.level.name,
                session_key=session_key(ident.issuer, ident.subject, ident.session_id),
                device=d.device,
                ip=ip,
                now=int(self.clock()),
            )
            target += f"&ctx={ctx}"
        return target
