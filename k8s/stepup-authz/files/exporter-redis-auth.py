"""The audit exporter's init container: its settings, with the Redis password.

ExporterSettings (authz/audit/config.py) takes one ``redis_url`` and no password file, so
the chart renders the settings without a password (ConfigMap) and this script writes a
copy with the password from the mounted Secret put into the URL, on an in-memory volume
that only the exporter's pod mounts. Nothing secret is in the ConfigMap or the pod spec.

    python exporter-redis-auth.py SETTINGS PASSWORD_FILE OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import yaml


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise SystemExit(f"exporter settings: redis_url must be redis:// or rediss:// "
                         f"to take a password, not {parts.scheme}://")
    if parts.password:
        raise SystemExit("exporter settings: a password is set both in redis_url and in "
                         "the Secret (redis.auth)")
    userinfo, _, host = parts.netloc.rpartition("@")  # userinfo: a username, already quoted
    netloc = f"{userinfo}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def main(argv: list[str]) -> int:
    src, password_file, out = (Path(a) for a in argv)
    doc = yaml.safe_load(src.read_text())
    password = password_file.read_text().strip()
    if not password:
        raise SystemExit(f"{password_file}: empty Redis password")
    doc["redis_url"] = with_password(doc["redis_url"], password)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
