"""Sessions API settings: what an operator cannot configure by mistake."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from authz.admin.config import ApiSettings

PROOF = {"issuer": "push", "jwks_file": "push.jwks"}
GRANTER = {
    "name": "push",
    "mtls_names": ["spiffe://m/push"],
    "operations": ["record-grant"],
    "max_level": "elevated",
    "issuers": ["https://idp"],
    "acr": ["mfa"],
    "proof": PROOF,
}
TLS = {"cert_file": "c.pem", "key_file": "k.pem", "client_ca_file": "ca.pem"}


def api(**kw: Any) -> ApiSettings:
    return ApiSettings.model_validate({"enabled": True, "tls": TLS, "callers": [GRANTER], **kw})


def refused(match: str, **kw: Any) -> None:
    with pytest.raises(ValidationError, match=match):
        api(**kw)


def test_a_complete_caller_is_accepted() -> None:
    s = api()
    assert s.callers[0].name == "push" and s.reflection is False and s.port == 9194


def test_the_single_shared_credential_is_gone() -> None:
    refused("api.callers", allowed_peers=["x"])
    refused("api.callers", bearer_secret_file="secret")


def test_enabled_needs_callers() -> None:
    refused("at least one", callers=[])


def test_a_grant_caller_needs_its_scopes_and_proof_keys() -> None:
    for missing in ("max_level", "issuers", "acr", "proof"):
        caller = {k: v for k, v in GRANTER.items() if k != missing}
        refused(missing, callers=[caller])


def test_a_caller_has_exactly_one_credential() -> None:
    refused("one of", callers=[{**GRANTER, "bearer_secret_file": "s"}])
    caller = {k: v for k, v in GRANTER.items() if k != "mtls_names"}
    refused("one of", callers=[caller])


def test_mtls_callers_need_a_client_ca() -> None:
    refused("client_ca_file", tls={"cert_file": "c", "key_file": "k"})


def test_names_are_unique_and_an_mtls_name_belongs_to_one_caller() -> None:
    refused("unique", callers=[GRANTER, GRANTER])
    refused("two callers", callers=[GRANTER, {**GRANTER, "name": "other"}])


def test_a_bearer_secret_never_crosses_the_network_in_clear(tmp_path: Path) -> None:
    bearer = {"name": "ops", "bearer_secret_file": "s", "operations": ["list"]}
    ApiSettings.model_validate({"enabled": True, "callers": [bearer]})  # loopback: fine
    ApiSettings.model_validate({"enabled": True, "host": "::1", "callers": [bearer]})
    with pytest.raises(ValidationError, match="in clear"):
        ApiSettings.model_validate({"enabled": True, "host": "0.0.0.0", "callers": [bearer]})
    ApiSettings.model_validate(
        {"enabled": True, "host": "0.0.0.0", "tls": TLS, "callers": [bearer]}
    )
