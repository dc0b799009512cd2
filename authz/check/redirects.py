"""Where a browser is sent when it must sign in or step up; shared by the gRPC and the
HTTP ext_authz response builders so the two modes cannot drift."""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import quote, urlsplit

from authz.core.attributes import RequestAttributes
from authz.core.decision import Decision, Outcome
from authz.core.session import session_key
from authz.core.transactions import of_request
from authz.stepup.link import ContextSigner
from authz.stepup.passkeys.links import LinkSigner
from authz.stepup.passkeys.rules import stepup_path

_REPLAYABLE = frozenset({"GET", "HEAD"})


class Redirects:
    def __init__(
        self,
        path_prefix: str = "/_stepup",
        signer: ContextSigner | None = None,
        clock: Callable[[], float] = time.time,
        passkeys: bool = False,
        links: LinkSigner | None = None,
    ) -> None:
        self.login_path = f"{path_prefix}/login"
        self.start_path = f"{path_prefix}/start"
        self.signer = signer
        self.clock = clock
        # passkeys.enabled: a level listing passkey first goes to the passkey page (which
        # falls back to the IdP start when the user has no usable key and the level allows).
        self.path_prefix = path_prefix if passkeys else None
        # Signs a transaction-bound level's ``tx`` (the passkey pages verify it, same key).
        self.links = links if passkeys else None

    def target(self, d: Decision, attrs: RequestAttributes) -> str:
        rd = quote(attrs.path_and_query, safe="")
        if d.outcome is not Outcome.STEP_UP or d.level is None:
            return f"{self.login_path}?rd={rd}"
        start = self.start_path
        if self.path_prefix is not None:
            start = stepup_path(d.level, self.path_prefix)
        tx = self._transaction(d, attrs)
        if tx is not None:
            rd = quote(resubmit_from(attrs), safe="")
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
        if tx is not None:
            target += f"&tx={tx}"
        return target

    def _transaction(self, d: Decision, attrs: RequestAttributes) -> str | None:
        """A transaction-bound level's ``tx``: the request (digest, method, host, path and
        the level's shown body fields), the device and IP, for this session only."""
        level, ident = d.level, d.identity
        if self.links is None or level is None or level.transaction is None or ident is None:
            return None
        return self.links.sign_transaction(
            level=level.name,
            session=session_key(ident.issuer, ident.subject, ident.session_id),
            request=of_request(attrs),
            fields=level.transaction.fields,
            now=int(self.clock()),
            device=d.device,
            ip=str(attrs.source_ip) if attrs.source_ip is not None else None,
        )


def resubmit_from(attrs: RequestAttributes) -> str:
    """Where a browser goes back after approving a transaction: the request itself when a
    browser can simply load it again (GET, HEAD), else the same-origin page it was sent
    from (its ``Referer``), where the user submits it again -- a redirect cannot replay a
    POST. Without a same-origin referer: the request's path (often the form's own page)."""
    if attrs.method in _REPLAYABLE:
        return attrs.path_and_query
    try:
        ref = urlsplit(attrs.headers.get("referer", ""))
        host = (ref.hostname or "").rstrip(".")
    except ValueError:  # not a URL (a bracketed host that is no IPv6 address ...)
        return attrs.path
    if host == attrs.host and ref.scheme in ("http", "https") and ref.path.startswith("/"):
        return f"{ref.path}?{ref.query}" if ref.query else ref.path
    return attrs.path
