"""The exporter's Redis settings: password_file and ca_file (ExporterSettings), resolved
like the other paths and turned into the client's options by make_exporter_client with the
service's rules (authz/store/connections.py make_client). No server here: the options are
read off the client's pool (tests/integration/test_exporter_auth.py connects for real)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from authz.audit.chain import SigningKey
from authz.audit.config import ExporterSettings, load_exporter_settings
from authz.audit.exporter import build_exporter, make_exporter_client
from authz.audit.testing import write_mac_key
from authz.errors import ConfigError
from tests.tlsutil import cert as tls_cert
from tests.tlsutil import pem

PASSWORD = "p@ss:w/rd#1?"


def _ca_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return pem(tls_cert("test CA", key, None, key, ca=True))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "secrets").mkdir()
    key = tmp_path / "secrets" / "audit-signing.pem"
    key.write_bytes(SigningKey.generate().private_pem())
    pw = tmp_path / "secrets" / "redis-password"
    pw.write_text(f"  {PASSWORD}\n")  # as a Secret mount or `echo` leaves it: stripped
    ca = tmp_path / "secrets" / "ca.crt"
    ca.write_bytes(_ca_pem())
    mac = write_mac_key(tmp_path / "secrets" / "audit-mac.key")
    return {"signing_key_file": key, "password_file": pw, "ca_file": ca, "mac_key": mac}


def settings(tmp_path: Path, **kw: Any) -> ExporterSettings:
    doc: dict[str, Any] = {
        "archive_dir": tmp_path / "archive",
        "signing_key_file": tmp_path / "secrets" / "audit-signing.pem",
        "mac_keys": {"k1": tmp_path / "secrets" / "audit-mac.key"},
    }
    return ExporterSettings.model_validate(doc | kw)


def pool_kwargs(s: ExporterSettings) -> dict[str, Any]:
    client = make_exporter_client(s)
    try:
        kwargs: dict[str, Any] = dict(client.connection_pool.connection_kwargs)
        return kwargs
    finally:
        client.close()


# -- loading ----------------------------------------------------------------------------------


def test_defaults_are_none(tmp_path: Path) -> None:
    s = settings(tmp_path)
    assert (s.password_file, s.ca_file) == (None, None)
    path = tmp_path / "exporter.yaml"
    path.write_text("archive_dir: archive\nsigning_key_file: key.pem\nmac_keys: {k1: mac.key}\n")
    s = load_exporter_settings(path)
    assert (s.password_file, s.ca_file) == (None, None)


def test_relative_paths_resolve_against_the_settings_folder(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    path = conf / "exporter.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "archive_dir": "archive",
                "signing_key_file": "secrets/audit-signing.pem",
                "mac_keys": {"k1": "secrets/audit-mac.key"},
                "password_file": "secrets/redis-password",
                "ca_file": "../ca/ca.crt",
            }
        )
    )
    s = load_exporter_settings(path)
    assert s.password_file == conf / "secrets" / "redis-password"
    assert s.ca_file == conf / ".." / "ca" / "ca.crt"
    assert s.archive_dir == conf / "archive"
    assert s.signing_key_file == conf / "secrets" / "audit-signing.pem"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "exporter.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "archive_dir": "/var/lib/a",
                "signing_key_file": "/etc/k.pem",
                "mac_keys": {"k1": "/etc/m.key"},
                "password_file": "/etc/stepup-authz/secrets/redis-auth/password",
                "ca_file": "/etc/stepup-authz/secrets/redis-tls/ca.crt",
            }
        )
    )
    s = load_exporter_settings(path)
    assert s.password_file == Path("/etc/stepup-authz/secrets/redis-auth/password")
    assert s.ca_file == Path("/etc/stepup-authz/secrets/redis-tls/ca.crt")


def test_unknown_keys_are_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "exporter.yaml"
    path.write_text("archive_dir: a\nsigning_key_file: k\nmac_keys: {k1: m}\npassword: hunter2\n")
    with pytest.raises(ConfigError, match="password"):
        load_exporter_settings(path)


# -- the client -------------------------------------------------------------------------------


def test_password_from_the_file_reaches_the_client(tmp_path: Path, files: dict[str, Path]) -> None:
    """Through build_exporter, as run_exporter builds it, from a settings file with a
    relative password_file."""
    path = tmp_path / "exporter.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "redis_url": "redis://redis.internal:6379/2",
                "archive_dir": "archive",
                "signing_key_file": "secrets/audit-signing.pem",
                "mac_keys": {"k1": "secrets/audit-mac.key"},
                "password_file": "secrets/redis-password",
                "block_ms": 2000,
            }
        )
    )
    exporter = build_exporter(load_exporter_settings(path))
    try:
        kwargs = exporter.client.connection_pool.connection_kwargs
        assert kwargs["password"] == PASSWORD
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("redis.internal", 6379, 2)
        # the timeouts as before: a blocking XREAD (block_ms) plus a margin
        assert kwargs["socket_timeout"] == pytest.approx(7.0)
        assert kwargs["socket_connect_timeout"] == 5
        assert "ssl_ca_certs" not in kwargs  # redis://: no TLS, ca_file or not
    finally:
        exporter.client.close()


def test_no_password_file_no_password(tmp_path: Path, files: dict[str, Path]) -> None:
    assert pool_kwargs(settings(tmp_path)).get("password") is None
    url = settings(tmp_path, redis_url="redis://:in-url@redis.internal:6379")
    assert pool_kwargs(url)["password"] == "in-url"  # a URL password alone still works


@pytest.mark.parametrize(
    "url",
    [
        "redis://:other@redis.internal:6379/0",
        "rediss://user:other@redis.internal:6380/0",
    ],
)
def test_password_in_the_url_and_in_the_file_is_refused(
    tmp_path: Path, files: dict[str, Path], url: str
) -> None:
    s = settings(tmp_path, redis_url=url, password_file=files["password_file"])
    with pytest.raises(ConfigError, match="both") as err:
        make_exporter_client(s)
    assert err.value.location == "password_file"
    with pytest.raises(ConfigError, match="both"):
        build_exporter(s)


def test_a_username_in_the_url_goes_with_the_file_password(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    s = settings(
        tmp_path,
        redis_url="redis://exporter@redis.internal:6379",
        password_file=files["password_file"],
    )
    kwargs = pool_kwargs(s)
    assert (kwargs["username"], kwargs["password"]) == ("exporter", PASSWORD)


def test_unreadable_password_file(tmp_path: Path, files: dict[str, Path]) -> None:
    missing = settings(tmp_path, password_file=tmp_path / "nope")
    with pytest.raises(ConfigError, match="nope") as err:
        make_exporter_client(missing)
    assert err.value.location == "password_file"
    assert "password_file" in str(err.value)
    a_dir = settings(tmp_path, password_file=tmp_path / "secrets")
    with pytest.raises(ConfigError) as err:
        make_exporter_client(a_dir)
    assert err.value.location == "password_file"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty") as err:
        make_exporter_client(settings(tmp_path, password_file=empty))
    assert err.value.location == "password_file"


def test_rediss_verifies_against_the_ca_file_with_host_name_check(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    s = settings(
        tmp_path,
        redis_url="rediss://redis.internal:6380/0",
        ca_file=files["ca_file"],
        password_file=files["password_file"],
    )
    kwargs = pool_kwargs(s)
    assert kwargs["ssl_ca_certs"] == str(files["ca_file"])
    assert kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_check_hostname"] is True
    assert kwargs["password"] == PASSWORD
    assert kwargs["socket_timeout"] == pytest.approx(6.0)  # block_ms 1000 + 5 s
    # no ca_file: still verified (the system store), host name checked
    kwargs = pool_kwargs(settings(tmp_path, redis_url="rediss://redis.internal:6380/0"))
    assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_check_hostname"] is True
    assert kwargs.get("ssl_ca_certs") is None


def test_ca_file_is_ignored_without_tls(tmp_path: Path, files: dict[str, Path]) -> None:
    """As the service ignores redis.ca_file for redis:// (the chart sets both from one
    redis.tls, whatever the audit stream's scheme)."""
    kwargs = pool_kwargs(
        settings(tmp_path, redis_url="redis://redis.internal:6379", ca_file=tmp_path / "absent.crt")
    )
    assert "ssl_ca_certs" not in kwargs and "ssl_cert_reqs" not in kwargs


def test_unreadable_or_empty_ca_file(tmp_path: Path, files: dict[str, Path]) -> None:
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    for ca in (tmp_path / "absent.crt", garbage):
        s = settings(tmp_path, redis_url="rediss://redis.internal:6380", ca_file=ca)
        with pytest.raises(ConfigError, match=ca.name) as err:
            make_exporter_client(s)
        assert err.value.location == "ca_file"


def test_ca_in_the_url_and_in_ca_file_is_refused(tmp_path: Path, files: dict[str, Path]) -> None:
    s = settings(
        tmp_path,
        redis_url="rediss://redis.internal:6380/0?ssl_ca_certs=/x.crt",
        ca_file=files["ca_file"],
    )
    with pytest.raises(ConfigError, match="both") as err:
        make_exporter_client(s)
    assert err.value.location == "ca_file"


def test_the_cli_reports_a_config_error_and_exits_2(tmp_path: Path, files: dict[str, Path]) -> None:
    path = tmp_path / "exporter.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "redis_url": "redis://127.0.0.1:1",
                "archive_dir": "archive",
                "signing_key_file": "secrets/audit-signing.pem",
                "mac_keys": {"k1": "secrets/audit-mac.key"},
                "password_file": "missing-password",
            }
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "authz.audit", "exporter", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr  # a configuration error: exit 2 (usage/config)
    assert "password_file" in r.stderr and "missing-password" in r.stderr
