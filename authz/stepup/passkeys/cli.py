"""``stepup-authz passkeys ...``: the operator's view of the credential registry.

    stepup-authz passkeys check   --config S          durability of the credential Redis
    stepup-authz passkeys list    --config S [--user ISS SUB]
    stepup-authz passkeys revoke  --config S --user ISS SUB --credential-id ID [--reason R]
    stepup-authz passkeys export  --config S [--out FILE]        JSON Lines, one credential
    stepup-authz passkeys import  --config S FILE [--replace]
    stepup-authz passkeys restore --config S --from-archive DIR... [--pubkey PEM...]
                                  [--force] [--replace]
    stepup-authz passkeys reseal  --config S                     under the active key

All of them talk to the Redis the settings name, with the settings' keyring (so they need
``crypto.keys``: an ephemeral key cannot read what the service wrote). ``revoke`` writes its
audit record to the settings' audit stream before removing. ``restore`` verifies the archive
first (``audit verify``) and refuses a broken one unless ``--force``. Exit 0 on success, 1
with a one-line reason on stderr otherwise; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

from authz.errors import ConfigError, StepupError


class _Refused(Exception):
    pass


def add_passkeys_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("passkeys", help="operate the passkey credential registry")
    sub = p.add_subparsers(dest="passkeys_command", required=True)

    def cmd(
        name: str, help_: str, fn: Callable[..., Coroutine[Any, Any, int]]
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = sub.add_parser(name, help=help_)
        sp.add_argument("--config", required=True, type=Path, help="the service's settings")
        sp.set_defaults(func=_runner(fn))
        return sp

    cmd("check", "is the credential Redis durable (persists, never evicts)?", _check)
    ls = cmd("list", "list credentials (all users, or one)", _list)
    ls.add_argument("--user", nargs=2, metavar=("ISS", "SUB"))
    rv = cmd("revoke", "remove one credential of a user (audited)", _revoke)
    rv.add_argument("--user", nargs=2, metavar=("ISS", "SUB"), required=True)
    rv.add_argument("--credential-id", required=True, help="base64url, as `list` shows it")
    rv.add_argument("--reason", default="operator")
    ex = cmd("export", "write every credential as JSON Lines", _export)
    ex.add_argument("--out", type=Path, help="file (mode 0600); default stdout")
    im = cmd("import", "add the credentials of an export", _import)
    im.add_argument("file", type=Path)
    im.add_argument("--replace", action="store_true", help="overwrite credentials that exist")
    rs = cmd("restore", "rebuild the registry from the audit archive", _restore)
    rs.add_argument("--from-archive", nargs="+", required=True, type=Path, metavar="DIR")
    rs.add_argument("--pubkey", nargs="*", type=Path, default=[], help="archive signing keys")
    rs.add_argument("--force", action="store_true", help="restore from an unverified archive")
    rs.add_argument("--replace", action="store_true", help="overwrite credentials that exist")
    cmd("reseal", "re-encrypt every record under the active key", _reseal)


def _runner(
    fn: Callable[..., Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(fn(args))
        except (_Refused, ConfigError, StepupError, OSError, ValueError) as exc:
            print(f"passkeys {args.passkeys_command}: {exc}", file=sys.stderr)
            return 1

    return run


class _Ctx:
    def __init__(self, args: argparse.Namespace) -> None:
        from authz.config.settings import load_settings
        from authz.store.connections import make_redis
        from authz.store.credentials import RedisCredentialStore
        from authz.store.crypto import cipher_from_settings

        self.settings = load_settings(args.config)
        s = self.settings
        if s.redis.embedded:
            raise _Refused("the settings name no Redis (redis.url, sentinel or cluster)")
        if s.crypto.active_kid is None:
            raise _Refused("crypto.keys is not configured: the registry cannot be read")
        self.client = make_redis(s.redis)
        self.store = RedisCredentialStore(
            self.client,
            prefix=s.redis.key_prefix,
            deadline_ms=max(s.redis.deadline_ms, 2000),
            cipher=cipher_from_settings(s.crypto),
            max_credentials=s.passkeys.max_credentials,
        )

    async def aclose(self) -> None:
        await self.client.aclose()


async def _with(args: argparse.Namespace, fn: Callable[[_Ctx], Awaitable[int]]) -> int:
    ctx = _Ctx(args)
    try:
        return await fn(ctx)
    finally:
        await ctx.aclose()


def _summary(user: str, c: Any) -> dict[str, Any]:
    return {
        "user_key": user,
        "issuer": c.issuer,
        "subject": c.subject,
        "credential_id": c.id_b64,
        "name": c.name,
        "aaguid": c.aaguid,
        "device_bound": c.device_bound,
        "certified": c.certified,
        "sign_count": c.sign_count,
        "created_at": c.created_at,
        "last_used_at": c.last_used_at,
    }


async def _check(args: argparse.Namespace) -> int:
    async def go(ctx: _Ctx) -> int:
        d = await ctx.store.durability()
        print(
            json.dumps(
                {
                    "ok": d.ok,
                    "aof": d.aof,
                    "rdb": d.rdb,
                    "maxmemory_policy": d.eviction_policy,
                    "problems": list(d.problems),
                }
            )
        )
        return 0 if d.ok else 1

    return await _with(args, go)


async def _list(args: argparse.Namespace) -> int:
    from authz.core.session import user_key

    async def go(ctx: _Ctx) -> int:
        if args.user:
            uk = user_key(*args.user)
            for c in await ctx.store.credentials(uk):
                print(json.dumps(_summary(uk, c)))
            return 0
        async for uk, c in ctx.store.scan():
            print(json.dumps(_summary(uk, c)))
        return 0

    return await _with(args, go)


async def _audit_write(ctx: _Ctx, record: Any) -> None:
    """An operator action's record, durably, through a producer of its own (MAC'd and
    announced like the service's, so the exporter archives it as genuine)."""
    from authz.audit.metrics import AuditMetrics
    from authz.audit.service import build_auditor
    from authz.stepup.passkeys.records import to_audit_event

    if not ctx.settings.audit.enabled:
        return
    from prometheus_client import CollectorRegistry

    closers: list[object] = []
    auditor = build_auditor(
        ctx.settings, ctx.client, None, AuditMetrics(CollectorRegistry()), closers
    )
    try:
        if auditor is not None:
            await auditor.durable(to_audit_event(record))
    finally:
        for closer in reversed(closers):
            await closer.aclose()  # type: ignore[attr-defined]


async def _revoke(args: argparse.Namespace) -> int:
    from authz.core.encoding import unb64u
    from authz.core.session import user_key
    from authz.stepup.passkeys.records import removed

    async def go(ctx: _Ctx) -> int:
        uk = user_key(*args.user)
        cid = unb64u(args.credential_id)
        got = await ctx.store.get(uk, cid)
        if got is None:
            raise _Refused("no such credential for that user")
        record = removed(
            got[0],
            by=f"operator:{args.reason}",
            session=None,
            decision_id=os.urandom(16).hex(),
            now_ms=int(time.time() * 1000),
        )
        await _audit_write(ctx, record)  # audit before the change
        await ctx.store.remove(uk, cid)
        print(json.dumps({"revoked": args.credential_id, "user_key": uk}))
        return 0

    return await _with(args, go)


async def _export(args: argparse.Namespace) -> int:
    async def go(ctx: _Ctx) -> int:
        out: TextIO
        if args.out is not None:
            fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            out = os.fdopen(fd, "w", encoding="utf-8")
        else:
            out = sys.stdout
        n = 0
        try:
            async for _uk, c in ctx.store.scan():
                out.write(json.dumps(c.to_json(), sort_keys=True) + "\n")
                n += 1
        finally:
            if out is not sys.stdout:
                out.close()
        print(f"exported {n} credential(s)", file=sys.stderr)
        return 0

    return await _with(args, go)


async def _put_all(ctx: _Ctx, creds: list[Any], replace: bool, what: str) -> int:
    from authz.core.session import user_key

    added = exists = full = 0
    for c in creds:
        result = await ctx.store.add(user_key(c.issuer, c.subject), c, replace_existing=replace)
        if result == 1:
            added += 1
        elif result == -1:
            exists += 1
        else:
            full += 1
    print(
        f"{what} {added} credential(s); {exists} already present"
        + (f"; {full} refused (registry full)" if full else "")
    )
    return 0 if not full else 1


async def _import(args: argparse.Namespace) -> int:
    from authz.store.credentials import Credential

    creds = []
    for i, line in enumerate(args.file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            creds.append(Credential.from_json(json.loads(line)))
        except ValueError as exc:
            raise _Refused(f"{args.file}:{i}: {exc}") from exc

    async def go(ctx: _Ctx) -> int:
        return await _put_all(ctx, creds, args.replace, "imported")

    return await _with(args, go)


async def _restore(args: argparse.Namespace) -> int:
    from authz.audit.chain import load_public_keys
    from authz.audit.export import read_records
    from authz.audit.verify import verify
    from authz.stepup.passkeys.records import replay

    keys = load_public_keys(args.pubkey)
    report = verify(args.from_archive, public_keys=keys)
    if not report.ok and not args.force:
        raise _Refused(f"the archive does not verify ({report.error}); --force to use it anyway")
    records = read_records(args.from_archive)
    records.sort(key=lambda r: r.get("seq", 0) if isinstance(r.get("seq"), int) else 0)
    result = replay(records)
    if result.malformed:
        print(f"skipped {result.malformed} malformed passkey record(s)", file=sys.stderr)

    async def go(ctx: _Ctx) -> int:
        return await _put_all(ctx, result.credentials, args.replace, "restored")

    return await _with(args, go)


async def _reseal(args: argparse.Namespace) -> int:
    async def go(ctx: _Ctx) -> int:
        print(f"resealed {await ctx.store.reseal()} credential(s)")
        return 0

    return await _with(args, go)
