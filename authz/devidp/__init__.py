"""A development OpenID Connect provider for the demo and the tests: authorization code flow
with PKCE S256, a TOTP second factor, SSO sessions, and a DEV-ONLY password grant.

In-memory and single-process; never for production. The stepup-authz service does not import
this package. Run it with ``python -m authz.devidp serve`` (see ``__main__``).
"""

from authz.devidp.app import base_url, bind, create_app, running
from authz.devidp.config import (
    ALICE_TOTP_SECRET,
    BOB_TOTP_SECRET,
    DevClient,
    DevIdpConfig,
    DevUser,
    default_users,
)

__all__ = [
    "ALICE_TOTP_SECRET",
    "BOB_TOTP_SECRET",
    "DevClient",
    "DevIdpConfig",
    "DevUser",
    "base_url",
    "bind",
    "create_app",
    "default_users",
    "running",
]
