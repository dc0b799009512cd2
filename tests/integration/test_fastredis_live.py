"""FastRedis against the real Redis (REDIS_URL) and a private embedded Valkey: the store's
answers are the same through it as through redis-py, a killed server fails the calls in
flight (StoreError: fail closed) and the client recovers by itself when the server is back,
the caller's deadline bounds a call on a paused server, NOSCRIPT falls back to EVAL, and
AUTH/SELECT/CLIENT SETNAME happen on connect.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from envoy.service.auth.v3 import external_auth_pb2
from redis.exceptions import ResponseError

from authz.audit.testing import dev_mac_settings
from authz.config.settings import RedisSettings
from authz.core.session import Evidence, Grant, session_key, user_key
from authz.errors import StoreError
from authz.store.connections import EmbeddedValkey, make_client
from authz.store.crypto import FieldCipher
from authz.store.fastredis import FastRedis
from authz.store.sessions import RedisSessionStore

pytestmark = pytest.mark.integration

UK = user_key("https://idp.example", "alice")
SK = session_key("https://idp.example", "alice", "sid-1")
LEVELS = ["standard", "elevated", "high"]


def _grant(level: str, now: int, device: str | None = None) -> Grant:
    return Grant(
        level=level,
        evidence=Evidence("mfa", ("pwd", "otp"), now - 5),
        expires_at=now + 600,
        issued_at=now,
        device=device,
    )


@pytest.fixture(params=["redis", "embedded"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    if request.param == "redis":
        return request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
    server: EmbeddedValkey = request.getfixturevalue("embedded_valkey")
    return server.url, "test:"


@pytest.fixture
async def fast(backend: tuple[str, str]) -> AsyncIterator[FastRedis]:
    client = FastRedis.from_url(backend[0])
    yield client
    await client.aclose()


async def test_same_answers_as_redis_py(backend: tuple[str, str], fast: FastRedis) -> None:
    url, prefix = backend
    cipher = FieldCipher.generate()
    slow = RedisSessionStore(
        make_client(url, RedisSettings()), prefix=prefix, deadline_ms=2000, cipher=cipher
    )
    quick = RedisSessionStore(
        make_client(url, RedisSettings()),
        prefix=prefix,
        deadline_ms=2000,
        cipher=cipher,
        script_client=fast,
    )
    try:
        now = int(time.time())
        await quick.write_grant(UK, SK, _grant("elevated", now, device="dev-1"), now)
        await slow.write_grant(UK, SK, _grant("high", now), now)
        await quick.note_allow(
            user=UK,
            session=SK,
            level="elevated",
            ip="192.0.2.7",
            device="dev-1",
            now=now,
            lat=1.5,
            lon=2.5,
        )
        for sensitive in (False, True):
            kw = dict(
                user=UK,
                session=SK,
                levels=LEVELS,
                level="elevated",
                device="dev-1",
                ip="192.0.2.7",
                sensitive=sensitive,
                window_s=60,
                now=now,
            )
            a = await slow.read_check(**kw)  # type: ignore[arg-type]
            b = await quick.read_check(**kw)  # type: ignore[arg-type]
            # velocity counts each read: the second read sees one more
            assert a.velocity + (1 if sensitive else 0) == b.velocity
            assert dataclasses.replace(a, velocity=b.velocity) == b
            assert [g.level for g in b.grants] == ["elevated", "high"]
            assert b.device_known is True and b.level_seen
        # Raw replies of a script, byte for byte: ints, nil, bulk, nested arrays, errors.
        script = "return {1, false, 'x', {2, 'y'}, -3}"
        assert await fast.eval(script, 0) == await slow._client.eval(script, 0)
        with pytest.raises(ResponseError):
            await fast.eval("return redis.error_reply('boom')", 0)
    finally:
        await slow.aclose()
        await quick.aclose()


async def test_lessons_of_one_pass_are_one_call_and_write_what_one_call_each_writes(
    embedded_valkey: EmbeddedValkey,
) -> None:
    """note_allow over FastRedis: the lessons queued in one event-loop pass (here 20 users'
    allows) are written by one EVALSHA, and leave each user's state exactly as the one
    script per lesson (redis-py's path) does."""
    url = embedded_valkey.url
    cipher = FieldCipher.generate()
    fast = FastRedis.from_url(url)
    admin = aioredis.Redis.from_url(url)
    stores = {
        name: RedisSessionStore(
            make_client(url, RedisSettings()),
            prefix=f"{name}:",
            deadline_ms=2000,
            cipher=cipher,
            script_client=client,
        )
        for name, client in (("batched", fast), ("single", None))
    }
    users = [user_key("https://idp.example", f"u{i}") for i in range(20)]
    sessions = [session_key("https://idp.example", f"u{i}", "sid") for i in range(20)]
    now = int(time.time())

    def lesson(i: int) -> dict[str, object]:
        return dict(
            user=users[i],
            session=sessions[i],
            level="elevated",
            ip=f"192.0.2.{i}",
            device="dev-1" if i % 2 else None,
            now=now,
            lat=1.5,
            lon=2.5,
        )

    try:
        for store in stores.values():  # a known device and IP for each user: refreshed
            for i in range(20):
                await store.write_grant(
                    users[i],
                    sessions[i],
                    dataclasses.replace(_grant("elevated", now), ip=f"192.0.2.{i}", device="dev-1"),
                    now,
                )
        await admin.config_resetstat()
        await asyncio.gather(*(stores["batched"].note_allow(**lesson(i)) for i in range(20)))  # type: ignore[arg-type]
        stats = await admin.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 1  # 20 lessons, one round trip
        for i in range(20):
            await stores["single"].note_allow(**lesson(i))  # type: ignore[arg-type]
        for i in range(20):
            kw = dict(
                user=users[i],
                session=sessions[i],
                levels=LEVELS,
                level="elevated",
                device="dev-1",
                ip=f"192.0.2.{i}",
                sensitive=False,
                window_s=60,
                now=now,
            )
            a = await stores["batched"].read_check(**kw)  # type: ignore[arg-type]
            b = await stores["single"].read_check(**kw)  # type: ignore[arg-type]
            assert a == b and a.level_seen and a.last_seen is not None
            listed = [await store.list_sessions(users[i]) for store in stores.values()]
            assert listed[0] == listed[1] and listed[0]
    finally:
        for store in stores.values():
            await store.aclose()
        await fast.aclose()
        await admin.aclose()


async def test_noscript_falls_back_to_eval(embedded_valkey: EmbeddedValkey) -> None:
    fast = FastRedis.from_url(embedded_valkey.url)
    admin = aioredis.Redis.from_url(embedded_valkey.url)
    noscript = []
    store = RedisSessionStore(
        make_client(embedded_valkey.url, RedisSettings()),
        prefix="t:",
        deadline_ms=2000,
        script_client=fast,
        on_noscript=lambda: noscript.append(1),
    )
    try:
        await admin.script_flush()
        now = int(time.time())
        await store.write_grant(UK, SK, _grant("elevated", now), now)
        state = await store.read_check(
            user=UK,
            session=SK,
            levels=LEVELS,
            level="elevated",
            device=None,
            ip=None,
            sensitive=False,
            window_s=60,
            now=now,
        )
        assert [g.level for g in state.grants] == ["elevated"]
        assert len(noscript) == 2  # one per script, then cached by the EVAL
    finally:
        await store.aclose()
        await fast.aclose()
        await admin.aclose()


async def test_killed_server_fails_closed_then_recovers(
    embedded_valkey: EmbeddedValkey,
) -> None:
    fast = FastRedis.from_url(embedded_valkey.url, connections=2)
    store = RedisSessionStore(
        make_client(embedded_valkey.url, RedisSettings()),
        prefix="t:",
        deadline_ms=500,
        script_client=fast,
    )

    async def read() -> object:
        return await store.read_check(
            user=UK,
            session=SK,
            levels=LEVELS,
            level="high",
            device=None,
            ip=None,
            sensitive=True,
            window_s=60,
            now=int(time.time()),
        )

    try:
        await read()
        # Many reads in flight when the server dies: every one fails, none hangs.
        in_flight = [asyncio.ensure_future(read()) for _ in range(50)]
        await asyncio.to_thread(embedded_valkey.stop)
        results = await asyncio.gather(*in_flight, return_exceptions=True)
        assert all(isinstance(r, StoreError) or not isinstance(r, BaseException) for r in results)
        with pytest.raises(StoreError) as refused:
            await read()
        # Refused at once (the connection), not ended by the 500 ms deadline.
        assert not isinstance(refused.value.__cause__, TimeoutError), refused.value.__cause__
        await asyncio.to_thread(embedded_valkey.start)  # same port, empty
        await read()  # reconnected by itself
        assert fast.connects >= 2
    finally:
        await store.aclose()
        await fast.aclose()


async def test_deadline_bounds_a_call_on_a_paused_server(
    embedded_valkey: EmbeddedValkey,
) -> None:
    fast = FastRedis.from_url(embedded_valkey.url, connections=1)
    admin = aioredis.Redis.from_url(embedded_valkey.url)
    store = RedisSessionStore(
        make_client(embedded_valkey.url, RedisSettings()),
        prefix="t:",
        deadline_ms=50,
        script_client=fast,
    )
    try:
        assert await fast.ping()
        # Redis's own pause timer ends the pause (CLIENT UNPAUSE would wait behind it).
        await admin.client_pause(700, all=True)
        with pytest.raises(StoreError) as late:
            await store.read_check(
                user=UK,
                session=SK,
                levels=LEVELS,
                level="high",
                device=None,
                ip=None,
                sensitive=False,
                window_s=60,
                now=int(time.time()),
            )
        # The 50 ms deadline ended it: waiting out the pause, the read would have succeeded.
        assert isinstance(late.value.__cause__, TimeoutError), late.value.__cause__
        # Sent behind the late reply on the same connection: that reply is dropped, this
        # call gets its own once the pause is over.
        assert await asyncio.wait_for(fast.execute("ECHO", b"after"), 10) == b"after"
    finally:
        await store.aclose()
        await fast.aclose()
        await admin.aclose()


async def test_pipeline_within_one_connection_errors_as_values_and_its_deadline(
    embedded_valkey: EmbeddedValkey,
) -> None:
    """The audit write's form: commands on one connection (a WAIT among them covers the
    XADD before it), an error reply returned in place, the deadline a timer on the replies."""
    fast = FastRedis.from_url(embedded_valkey.url, connections=4)
    admin = aioredis.Redis.from_url(embedded_valkey.url)
    try:
        await admin.set("t:str", "x")
        for _ in range(4):  # whichever connection round-robin picks: one for all commands
            a, err, b = await fast.pipeline_within(
                1.0, ("CLIENT", "ID"), ("XADD", "t:str", "*", "r", "x"), ("CLIENT", "ID")
            )
            assert a == b and isinstance(err, ResponseError) and "WRONGTYPE" in str(err)
        await admin.client_pause(700, all=True)  # ended by Redis's own timer
        with pytest.raises(TimeoutError):  # the 50 ms timer on the replies, not the pause
            await fast.pipeline_within(0.05, ("PING",), ("PING",))
        # Behind the late replies: they are dropped; answers stay in order after the pause.
        assert await fast.pipeline_within(5.0, ("ECHO", b"x"), ("ECHO", b"y")) == [b"x", b"y"]
        assert [await fast.execute("ECHO", str(i)) for i in range(4)] == [b"0", b"1", b"2", b"3"]
    finally:
        await fast.aclose()
        await admin.aclose()


async def test_connect_handshake_auth_select_and_name() -> None:
    with EmbeddedValkey() as server:
        admin = aioredis.Redis.from_url(server.url)
        try:
            await admin.config_set("requirepass", "pw-1")
            await admin.auth("pw-1")
            fast = FastRedis.from_url(f"redis://:pw-1@127.0.0.1:{server.port}/5")
            try:
                await fast.set("k", "in-db-5")
                assert await fast.get("k") == b"in-db-5"
                await admin.select(5)
                assert await admin.get("k") == b"in-db-5"
                names = [c["name"] for c in await admin.client_list()]
                assert "stepup-authz" in names
            finally:
                await fast.aclose()
            wrong = FastRedis.from_url(f"redis://:nope@127.0.0.1:{server.port}")
            with pytest.raises(Exception, match=r"WRONGPASS|invalid"):
                await wrong.ping()
            await wrong.aclose()
        finally:
            await admin.aclose()


# -- the service wired with it ---------------------------------------------------------------


async def test_service_uses_it_and_a_revocation_applies_on_the_next_check(
    embedded_valkey: EmbeddedValkey,
) -> None:
    """The composition root runs the Check path's scripts over FastRedis; a session revoked
    between two Checks is refused by the second (no cache in between), and a repeated allow
    writes its lesson (note_allow) once, not on every Check."""
    import jwt

    from authz.app import start_service
    from authz.check.grpc_server import AuthorizationServicer
    from authz.check.response import ResponseBuilder
    from authz.config.settings import Settings
    from authz.devidp import DevClient, DevIdpConfig, base_url, bind, running
    from bench.inproc import grpc_check_request, password_token

    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    sock = bind()
    idp = base_url(sock)
    cfg = DevIdpConfig(
        issuer=idp,
        clients={"stepup-authz": DevClient("dev-secret", ("http://app.test/_stepup/callback",))},
    )
    async with running(cfg, sock):
        settings = Settings.model_validate(
            {
                "policy_file": str(root / "examples" / "policy.yaml"),
                "grpc": {"port": 0, "shutdown_delay_s": 0},
                "http": {"port": 0},
                "redis": {"url": embedded_valkey.url},
                "oidc": {
                    "issuer": idp,
                    "client_id": "stepup-authz",
                    "client_secret": "dev-secret",
                    "audience": "stepup-demo",
                    "algorithms": ["RS256"],
                    "token_typ": "at+jwt",
                },
                "stepup": {"public_url": "http://app.test", "cookie_secure": False},
                "audit": dev_mac_settings(),
            }
        )
        service = await start_service(settings)
        admin = aioredis.Redis.from_url(embedded_valkey.url)
        try:
            store = service.authorizer.store
            assert isinstance(store, RedisSessionStore)
            assert isinstance(store._scripts, FastRedis)
            # the dev IdP answers on this loop: the blocking client runs in a thread
            token = await asyncio.to_thread(password_token, settings)
            claims = jwt.decode(token, options={"verify_signature": False})
            uk = user_key(claims["iss"], claims["sub"])
            sk = session_key(claims["iss"], claims["sub"], claims["sid"])
            now = int(time.time())
            await store.write_grant(uk, sk, _grant("elevated", now), now)
            servicer = AuthorizationServicer(service.authorizer, ResponseBuilder())
            req = external_auth_pb2.CheckRequest.FromString(grpc_check_request(token))
            await admin.config_resetstat()
            for _ in range(5):
                assert (await servicer.Check(req, None)).status.code == 0
            await service.authorizer.drain()
            stats = await admin.info("commandstats")
            # 5 reads, 1 lesson: the 4 repeats find the sighting the first wrote (lesson_is_news)
            assert stats["cmdstat_evalsha"]["calls"] == 6
            # 8 concurrent Checks from 8 addresses: 8 lessons, written beside the 8 reads in
            # one or two calls (one round trip per Check, not two).
            many = []
            for i in range(8):
                r = external_auth_pb2.CheckRequest()
                r.CopyFrom(req)
                # the client address Envoy computed (authz.check.request reads only this)
                r.attributes.request.http.headers["x-stepup-peer-address"] = f"192.0.2.{i + 10}"
                many.append(r)
            await admin.config_resetstat()
            answers = await asyncio.gather(*(servicer.Check(r, None) for r in many))
            reasons = [a.dynamic_metadata["reason"] for a in answers if a.status.code]
            assert reasons == []
            await service.authorizer.drain()
            stats = await admin.info("commandstats")
            # The service's FastRedis has two connections: the reads' replies come back on
            # each in one read, in one event-loop pass or two, so the lessons are one call
            # or two (one per pass), never one per Check.
            assert 8 + 1 <= stats["cmdstat_evalsha"]["calls"] <= 8 + 2
            await store.revoke_session(uk, sk, int(time.time()))
            denied = await servicer.Check(req, None)
            assert denied.status.code != 0
            assert denied.dynamic_metadata["reason"] == "session-revoked"
        finally:
            await admin.aclose()
            await service.stop()
