"""One client address, Envoy's: the request adapters of both ext_authz modes and the step-up
endpoints take the downstream address Envoy computed (``x-stepup-peer-address``, set by the
rendered config), never a derivation of their own from X-Forwarded-For.

The through-Envoy proof (two real Envoys in a chain, both modes) is
``tests/e2e/test_client_address.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from pydantic import ValidationError

from authz.check.request import PEER_HEADER, attributes_from_check, attributes_from_http
from authz.config.settings import Settings
from authz.core.policy import load_policy
from authz.core.reasons import Reason
from authz.errors import RequestError
from authz.render import render_envoy
from authz.render.envoy import ext_authz_filter
from authz.stepup import presented as presented_module
from authz.stepup.ciba import handlers as ciba_handlers
from authz.stepup.endpoints import StepupApp
from authz.stepup.presented import client_address, presented
from tests.builders import check_request

# What a client (or a proxy in front of the edge) may write into forwarding headers.
FORGED: list[dict[str, str]] = [
    {"x-forwarded-for": "198.51.100.7"},
    {"x-forwarded-for": "198.51.100.7, 10.0.0.1"},
    {"x-forwarded-for": "not-an-ip, 198.51.100.7"},
    {"x-forwarded-for": "10.0.0.1, 203.0.113.9, 127.0.0.1"},
    {"x-real-ip": "198.51.100.7", "x-envoy-external-address": "198.51.100.7"},
]
ENVOYS = "203.0.113.9"  # the address Envoy computed (its access log's downstream address)


def _grpc(headers: dict[str, str], *, peer: str = "10.0.0.1", **kw: Any) -> Any:
    return attributes_from_check(check_request("/x", headers, ip=peer), **kw)


def _http(headers: dict[str, str]) -> Any:
    return attributes_from_http(
        "GET", "/check/x", {"host": "app.test", **headers}, path_prefix="/check"
    )


@pytest.mark.parametrize("forged", FORGED)
def test_grpc_takes_envoys_address_and_never_xff(forged: dict[str, str]) -> None:
    # The connection's peer (attributes.source) is the last proxy; the header is Envoy's
    # own computed client address, and that is the one used.
    attrs = _grpc({**forged, PEER_HEADER: ENVOYS}, peer="10.0.0.1")
    assert str(attrs.source_ip) == ENVOYS


@pytest.mark.parametrize("forged", FORGED)
def test_http_takes_envoys_address_and_never_xff(forged: dict[str, str]) -> None:
    """The HTTP-mode peer header already is Envoy's derived client: no hop is counted a
    second time (before, every user behind a load balancer appeared as the balancer)."""
    attrs = _http({**forged, PEER_HEADER: ENVOYS})
    assert str(attrs.source_ip) == ENVOYS


@pytest.mark.parametrize("value", [None, "", "junk", "203.0.113.9, 10.0.0.1", "203.0.113.9:443"])
def test_without_envoys_address_the_check_is_refused_in_both_modes(value: str | None) -> None:
    headers = {} if value is None else {PEER_HEADER: value}
    with pytest.raises(RequestError) as grpc_exc:
        attributes_from_check(check_request("/x", headers, ip=""))
    with pytest.raises(RequestError) as http_exc:
        _http(headers)
    for exc in (grpc_exc.value, http_exc.value):
        assert exc.reason == Reason.BAD_REQUEST and PEER_HEADER in str(exc)


def test_addresses_are_normalised_alike() -> None:
    for raw, expected in (("::ffff:198.51.100.1", "198.51.100.1"), ("2001:db8::1", "2001:db8::1")):
        assert str(_grpc({PEER_HEADER: raw}).source_ip) == expected
        assert str(_http({PEER_HEADER: raw}).source_ip) == expected


def test_peer_header_none_reads_only_the_connection_peer() -> None:
    """``grpc.peer_header: null``: for a proxy that trusts no hop and cannot set the header;
    the connection peer then is Envoy's client, and nothing a client sends moves it."""
    forged = {PEER_HEADER: "198.51.100.7", "x-forwarded-for": "198.51.100.8"}
    attrs = _grpc(forged, peer="192.0.2.10", peer_header=None)
    assert str(attrs.source_ip) == "192.0.2.10"


def test_a_service_side_hop_count_is_refused_naming_its_replacement() -> None:
    base: dict[str, Any] = {
        "policy_file": "p.yaml",
        "oidc": {"issuer": "https://idp.test", "client_id": "c", "audience": "a"},
    }
    for hops in (0, 1):
        with pytest.raises(ValidationError) as exc:
            Settings.model_validate({**base, "network": {"trusted_xff_hops": hops}})
        assert "--xff-num-trusted-hops" in str(exc.value)
        assert "xff_num_trusted_hops" in str(exc.value)
    settings = Settings.model_validate(base)
    assert settings.grpc.peer_header == PEER_HEADER  # fail closed by default
    assert settings.http_authz.peer_header == settings.stepup.peer_header == PEER_HEADER
    none = Settings.model_validate({**base, "grpc": {"peer_header": None}})
    assert none.grpc.peer_header is None


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_render_sends_envoys_address_to_the_check_in_both_modes(mode: str) -> None:
    policy = load_policy({"levels": {"standard": {}}, "default_level": "standard"})
    doc = render_envoy(policy, mode=mode, hosts=["app.test"], xff_num_trusted_hops=2)  # type: ignore[arg-type]
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["use_remote_address"] is True and hcm["xff_num_trusted_hops"] == 2
    names = [f["name"] for f in hcm["http_filters"]]
    authz = ext_authz_filter(hcm)["typed_config"]
    envoys = {"key": PEER_HEADER, "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}
    if mode == "grpc":
        # In front of ext_authz, overwriting a client-sent copy.
        assert names.index("envoy.filters.http.header_mutation") < names.index(
            "envoy.filters.http.ext_authz"
        )
        (mutation,) = hcm["http_filters"][0]["typed_config"]["mutations"]["request_mutations"]
        assert mutation["append"] == {
            "header": envoys,
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    else:
        assert "envoy.filters.http.header_mutation" not in names
        added = authz["http_service"]["authorization_request"]["headers_to_add"]
        assert envoys in added
    # The step-up endpoints get the same address on their own route.
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    stepup = vhost["routes"][0]
    assert stepup["name"] == "stepup-endpoints"
    (header,) = stepup["request_headers_to_add"]
    assert header["header"] == envoys and header["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"


# -- the step-up endpoints ---------------------------------------------------------------------


def _request(headers: dict[str, str]) -> Any:
    return make_mocked_request("POST", "/_stepup/ciba", headers=CIMultiDict(headers))


@pytest.mark.parametrize("forged", FORGED)
async def test_the_stepup_endpoints_take_envoys_address_and_never_xff(
    forged: dict[str, str],
) -> None:
    req = _request({**forged, PEER_HEADER: ENVOYS})
    assert client_address(req, PEER_HEADER) == ENVOYS
    assert await presented(req, 0, peer_header=PEER_HEADER, devices=None) == (None, ENVOYS)
    # Nothing Envoy set: no address (a bound level's grant then cannot be written).
    assert client_address(_request(forged), PEER_HEADER) is None
    assert client_address(_request({PEER_HEADER: "::ffff:10.0.0.1"}), PEER_HEADER) == "10.0.0.1"


def test_browser_and_push_stepups_share_one_reading() -> None:
    """One function reads the device and the address for every step-up endpoint: the
    browser flow and the push (CIBA) flow import the same one and keep no copy."""
    assert not hasattr(StepupApp, "_presented")
    assert not hasattr(ciba_handlers.CibaRoutes, "_presented")
    assert ciba_handlers.presented is presented_module.presented
    from authz.stepup import endpoints

    assert endpoints.presented is presented_module.presented
