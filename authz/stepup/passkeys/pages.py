"""The passkey pages: the step-up page, the security-keys page, and error pages.

Plain server-rendered HTML, every value escaped, one stylesheet and one script served from
the step-up port (``static/``), so the Content-Security-Policy allows no inline code. What a
page needs to say:

- why a second factor is asked: the route's and the level's titles from the policy;
- for a transaction-bound step-up, the action in words (method, host, path and the
  configured body fields) -- what the user approves is what the signature commits to;
- on an error, what happened in words, the decision id to quote, and a way back;
- a browser without WebAuthn: the IdP flow, when the level lists it (the script sends the
  browser there; without script a link says so).

Accessibility: a ``lang``, a ``<main>`` landmark, one ``<h1>``, labelled inputs, native
buttons (keyboard and screen readers work without ARIA tricks), focus moved to the status
region (``role=alert``) when it changes, and colour never the only signal.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from importlib import resources

from authz.store.credentials import Credential

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def static_file(name: str) -> bytes:
    return resources.files("authz.stepup.passkeys").joinpath("static", name).read_bytes()


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _layout(title: str, body: str, static: str, data: dict[str, str] | None = None) -> str:
    attrs = "".join(f' data-{k}="{_e(v)}"' for k, v in (data or {}).items())
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title>"
        f'<link rel="stylesheet" href="{_e(static)}/passkey.css"></head>'
        f'<body><main id="main"{attrs}>{body}</main>'
        f'<script src="{_e(static)}/passkey.js" defer></script></body></html>'
    )


@dataclass(frozen=True, slots=True)
class StepupView:
    level_label: str
    route_label: str | None
    return_to: str
    fallback_url: str | None  # the IdP flow, when the level lists idp
    keys_url: str
    action: tuple[str, str, str] | None = None  # method, host, path of a transaction
    shown: Sequence[tuple[str, str]] = ()
    body_bound: bool = False
    uv_required: bool = False
    data: dict[str, str] | None = None


def stepup_page(v: StepupView, static: str) -> str:
    why = (
        f"<strong>{_e(v.route_label)}</strong> needs <strong>{_e(v.level_label)}</strong>."
        if v.route_label
        else f"This page needs <strong>{_e(v.level_label)}</strong>."
    )
    uv = (
        " Your key will ask for its PIN or your fingerprint."
        if v.uv_required
        else " Touch your key when it blinks."
    )
    action = ""
    if v.action is not None:
        method, host, path = v.action
        rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(val)}</dd>" for k, val in v.shown)
        bound = (
            "Your approval is for this request only, and only once."
            if v.body_bound
            else "Your approval is for this address only, and only once."
        )
        action = (
            '<section class="action" aria-labelledby="action-h">'
            '<h2 id="action-h">You are approving</h2>'
            f'<p class="request"><code>{_e(method)} {_e(host)}{_e(path)}</code></p>'
            f"{f'<dl>{rows}</dl>' if rows else ''}<p>{bound}</p>"
            f'<p id="resubmit" hidden><a href="{_e(v.return_to)}">Go back and submit it '
            "again</a></p></section>"
        )
    fallback = (
        f'<p><a id="fallback" href="{_e(v.fallback_url)}">Use your sign-in provider instead</a></p>'
        if v.fallback_url
        else ""
    )
    body = (
        "<h1>Confirm it is you</h1>"
        f'<p id="why">{why} Use your security key or passkey to continue.{uv}</p>'
        f"{action}"
        '<p><button type="button" id="go" autofocus>Use my security key</button></p>'
        '<p id="status" role="alert" tabindex="-1"></p>'
        '<noscript><p class="error">This page needs JavaScript for your security key.'
        f"{' Use the link below to sign in another way.' if v.fallback_url else ''}"
        "</p></noscript>"
        f"{fallback}"
        f'<nav><a href="{_e(v.return_to)}">Go back</a> · '
        f'<a href="{_e(v.keys_url)}">Manage security keys</a></nav>'
    )
    return _layout("Confirm it is you", body, static, {"page": "stepup", **(v.data or {})})


def _when(ts: int | None) -> str:
    if ts is None:
        return "never"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True, slots=True)
class KeysView:
    credentials: Sequence[Credential]
    describe: dict[str, str]  # aaguid -> authenticator name (MDS), when known
    can_change: bool  # the enrolment rule holds now
    stepup_url: str | None  # where to step up first, when it does not
    enrol_level_label: str | None
    window_min: int
    return_to: str
    notice: str | None = None
    data: dict[str, str] | None = None


def keys_page(v: KeysView, static: str) -> str:
    rows = []
    for c in v.credentials:
        kind = "Bound to one device" if c.device_bound else "Synced passkey"
        model = v.describe.get(c.aaguid, "Unknown model")
        rows.append(
            "<li>"
            f'<span class="name">{_e(c.name)}</span>'
            f'<span class="meta">{_e(kind)} · {_e(model)} · added {_e(_when(c.created_at))}'
            f" · last used {_e(_when(c.last_used_at))}</span>"
            + (
                f'<button type="button" class="remove" data-credential="{_e(c.id_b64)}" '
                f'aria-label="Remove {_e(c.name)}">Remove</button>'
                if v.can_change
                else ""
            )
            + "</li>"
        )
    listing = (
        f'<ul class="keys">{"".join(rows)}</ul>'
        if rows
        else "<p>You have no security keys or passkeys yet.</p>"
    )
    if v.can_change:
        change = (
            '<form id="enrol" novalidate><h2>Add a security key</h2>'
            '<label for="key-name">Name for this key</label>'
            '<input id="key-name" name="name" maxlength="64" required '
            'autocomplete="off" value="Security key">'
            '<button type="submit" id="add">Add security key</button></form>'
        )
    elif v.enrol_level_label is None:
        change = "<p>Adding security keys is not enabled on this service.</p>"
    else:
        change = (
            "<p>To add or remove a key, first confirm your sign-in at "
            f"<strong>{_e(v.enrol_level_label)}</strong>; you then have "
            f"{v.window_min} minutes.</p>"
            + (
                f'<p><a href="{_e(v.stepup_url)}">Confirm my sign-in</a></p>'
                if v.stepup_url
                else ""
            )
        )
    notice = f'<p class="notice">{_e(v.notice)}</p>' if v.notice else ""
    body = (
        "<h1>Your security keys</h1>"
        f"{notice}{listing}{change}"
        '<p id="status" role="alert" tabindex="-1"></p>'
        f'<nav><a href="{_e(v.return_to)}">Go back</a></nav>'
    )
    return _layout("Your security keys", body, static, {"page": "keys", **(v.data or {})})


def error_page(
    title: str, detail: str, *, decision_id: str, back: str, static: str, retry: str | None = None
) -> str:
    again = f'<a href="{_e(retry)}">Try again</a> · ' if retry else ""
    body = (
        f"<h1>{_e(title)}</h1>"
        f'<p class="error">{_e(detail)}</p>'
        f'<p class="ref">Reference: <code>{_e(decision_id)}</code> (quote it if you '
        "contact support)</p>"
        f'<nav>{again}<a href="{_e(back)}">Go back</a></nav>'
    )
    return _layout(title, body, static, {"page": "error"})
