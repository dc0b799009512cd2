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


class Redirects:
    def __init__(
        self,
        path_prefix: str = "/_stepup",
        signer: ContextSigner | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.login_path = f"{path_prefix}/login"
        self.start_path = f"{path_prefix}/start"
        self.signer = signer
        self.clock = clock

    def target(self, d: Decision, attrs: RequestAttributes) -> str:
        rd = quote(attrs.path_and_query, safe="")
        if d.outcome is not Outcome.STEP_UP or d.level is None:
            return f"{self.login_path}?rd={rd}"
        target = f"{self.start_path}?level={quote(d.level.name)}&rd={rd}"
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
