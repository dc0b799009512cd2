"""TLS settings of the HTTP listeners: relative files resolve against the settings file,
and a file that cannot be used is a clear ConfigError naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.config.settings import TlsSettings, load_settings
from authz.errors import ConfigError
from authz.ops.tls import server_context


def test_relative_tls_files_resolve_against_the_settings_file(tmp_path: Path) -> None:
    tls = "{cert_file: tls/c.pem, key_file: tls/k.pem, client_ca_file: tls/ca.pem}"
    (tmp_path / "config.yaml").write_text(
        "policy_file: policy.yaml\noidc: {issuer: 'https://idp', client_id: x, audience: api}\n"
        f"http: {{tls: {tls}}}\nhttp_authz: {{enabled: true, tls: {tls}}}\n"
    )
    s = load_settings(tmp_path / "config.yaml", env={})
    for listener in (s.http, s.http_authz):
        assert listener.tls is not None
        assert listener.tls.cert_file == tmp_path / "tls/c.pem"
        assert listener.tls.key_file == tmp_path / "tls/k.pem"
        assert listener.tls.client_ca_file == tmp_path / "tls/ca.pem"


def test_unusable_files_are_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError) as info:
        server_context(
            TlsSettings(cert_file=tmp_path / "junk.pem", key_file=tmp_path / "k"), "http"
        )
    assert info.value.location == "http.tls" and "junk.pem" in str(info.value)
