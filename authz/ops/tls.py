"""Server TLS for the HTTP listeners (the HTTP ext_authz port and the ``/_stepup`` port).

``TlsSettings`` as the gRPC listener takes them: a certificate chain and its key, and
optionally ``client_ca_file``: then every client must present a certificate from that CA
(mTLS: only the proxies holding one reach the port). TLS 1.2 at least; HTTP/1.1 by ALPN.
"""

from __future__ import annotations

import ssl

from authz.config.settings import TlsSettings
from authz.errors import ConfigError


def server_context(tls: TlsSettings, where: str) -> ssl.SSLContext:
    """An ``SSLContext`` for a listener; a file that cannot be read or used is a
    ``ConfigError`` naming ``where`` (the settings path) and the file, never a traceback."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot use the certificate {tls.cert_file} with the key {tls.key_file}: {exc}",
            location=f"{where}.tls",
        ) from None
    if tls.client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(tls.client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot read the client CA {tls.client_ca_file}: {exc}",
                location=f"{where}.tls.client_ca_file",
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
