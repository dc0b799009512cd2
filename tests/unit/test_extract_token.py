"""The bearer credential as the Check reads it (RFC 6750 section 2.1): the scheme in any
case, one space, a b64token; anything else is token-invalid, not absent."""

from __future__ import annotations

import re

import pytest

from authz.check.authorizer import extract_token
from authz.check.request import attributes_from_check
from authz.core.reasons import Reason
from tests.builders import check_request

# The pattern the Check used before (re.IGNORECASE over the whole header), for comparison.
_OLD = re.compile(r"Bearer ([A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln-_~+/" + "A" * 700 + "=="


def read(auth: str) -> tuple[str | None, Reason | None]:
    attrs = attributes_from_check(check_request("/", {"authorization": auth}))
    return extract_token(attrs, "stepup_token")


@pytest.mark.parametrize(
    "auth",
    [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"BeArEr {TOKEN}",
     f"  Bearer {TOKEN}  ", "Bearer a", "Bearer a=", "Bearer ===", "Bearer", "Bearer ",
     f"Bearer  {TOKEN}", f"Basic {TOKEN}", f"Bearer {TOKEN}, Bearer {TOKEN}",
     f"Bearer {TOKEN} x", "Bearer a=b", "Bearer a\u00e9", "Bearerx abc", "DPoP abc", ""],
)  # fmt: skip
def test_same_answers_as_the_ignorecase_pattern(auth: str) -> None:
    m = _OLD.fullmatch(auth.strip())
    expected = (m.group(1), None) if m else (None, Reason.TOKEN_INVALID)
    assert read(auth) == expected


@pytest.mark.parametrize("auth", ["Bearer \u212aey", "Bearer ab\u017f", "Bearer \u0130"])
def test_non_ascii_look_alikes_are_invalid(auth: str) -> None:
    # re.IGNORECASE folded the Kelvin sign to "k", the long s to "s" and the dotted capital I
    # to "i": all three were accepted before.
    assert read(auth) == (None, Reason.TOKEN_INVALID)
