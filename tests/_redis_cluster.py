"""A real Redis Cluster for tests: N ``redis-server --cluster-enabled yes``
processes on free loopback ports, formed by ``redis-cli --cluster create``.

:class:`RedisCluster` (a context manager) starts ``primaries * (1 +
replicas)`` nodes (3 primaries and 3 replicas by default), each a
:class:`~_redis_server.RedisServer` in a temporary directory of its own
(``nodes-<port>.conf`` there, no persistence), forms the cluster, waits until
every node reports ``cluster_state:ok`` and every replica's link to its
primary is up, and stops every process by its PID on exit (also when the
test failed). Starting it takes about 1-2 s (``redis-cli`` polls the join
once a second), so share one per test module or per xdist worker, e.g.::

    @pytest.fixture(scope="module")
    def cluster() -> Iterator[RedisCluster]:
        with RedisCluster() as running:
            yield running

and call :meth:`~RedisCluster.flushall` between tests instead of starting
another. Tests that kill, fail over or migrate should leave it usable
(:meth:`~RedisCluster.restart` a killed node, :meth:`~RedisCluster.wait_ok`)
or use a cluster of their own.

With ``tls_dir`` (a directory holding ``ca.crt``, ``server.crt`` and
``server.key``) each node also has a TLS port (:attr:`~RedisCluster.tls_seeds`),
and the cluster bus and replication use TLS; the plain ports stay open for
the helper itself (a node tells a TLS client the TLS ports of the others).

What it offers: :attr:`~RedisCluster.seeds`, :meth:`~RedisCluster.url`
(``redis+cluster://...?prefix=``), :meth:`~RedisCluster.command` (one
command to one node, synchronously), :meth:`~RedisCluster.primaries`,
:meth:`~RedisCluster.replicas_of`, :meth:`~RedisCluster.node_for_slot`,
:meth:`~RedisCluster.kill` (SIGKILL) and :meth:`~RedisCluster.restart`,
:meth:`~RedisCluster.failover` (``CLUSTER FAILOVER`` on a replica),
:meth:`~RedisCluster.wait_ok`, :meth:`~RedisCluster.flushall`, and slot
migration done step by step as the cluster's own tools do it:
:meth:`~RedisCluster.begin_migration` (``SETSLOT IMPORTING`` on the target,
``MIGRATING`` on the source), :meth:`~RedisCluster.move_keys`
(``GETKEYSINSLOT`` + ``MIGRATE ... KEYS`` in batches),
:meth:`~RedisCluster.finish_migration` (the remaining keys, then ``SETSLOT
NODE`` on the target, the source and every other primary), and
:meth:`~RedisCluster.migrate_slot` (all of it at once).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hiredis
from _ports import free_port
from _redis_server import RedisServer, Running, redis_server_binary

__all__ = ["RedisCluster", "command"]


_MANUAL_FAILOVER_WINDOW = 6.0
"""Seconds after which a CLUSTER FAILOVER that did not happen is asked
again (Redis gives a manual failover 5 s)."""


def command(port: int, *args: str | int | bytes, password: str | None = None) -> Any:
    """One command to the node on ``port`` (a new connection, AUTH first if a
    password is given); its reply (an error reply is returned, not raised)."""
    reader = hiredis.Reader(encoding="utf-8")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        commands = [("AUTH", password)] if password is not None else []
        commands.append(args)
        sock.sendall(b"".join(hiredis.pack_command(each) for each in commands))  # type: ignore[arg-type]
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = reader.gets()
            if reply is False:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError(f"node {port} closed the connection")
                reader.feed(data)
                continue
            replies.append(reply)
    return replies[-1]


class RedisCluster(Running):
    """A Redis Cluster of real processes on 127.0.0.1 (see the module)."""

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 1,
        *,
        password: str | None = None,
        node_timeout_ms: int = 1000,
        args: Sequence[str] = (),
        tls_dir: Path | None = None,
    ) -> None:
        self.password = password
        self.node_timeout_ms = node_timeout_ms
        self.replicas_per_primary = replicas
        self.ports = [free_port() for _ in range(primaries * (1 + replicas))]
        self.tls_dir = tls_dir
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        self.servers: dict[int, RedisServer] = {}
        self.tls_ports: dict[int, int] = {}
        for port in self.ports:
            tls: list[str] = []
            if tls_dir is not None:
                self.tls_ports[port] = free_port()
                tls = [
                    "--tls-port", str(self.tls_ports[port]),
                    "--tls-cluster", "yes",
                    "--tls-replication", "yes",
                    "--tls-cert-file", str(tls_dir / "server.crt"),
                    "--tls-key-file", str(tls_dir / "server.key"),
                    "--tls-ca-cert-file", str(tls_dir / "ca.crt"),
                    "--tls-auth-clients", "no",
                ]  # fmt: skip
            self.servers[port] = RedisServer(
                port,
                [
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf",
                    # Not port + 10000, which may lie in the ephemeral range.
                    "--cluster-port", str(free_port()),
                    "--cluster-node-timeout", str(node_timeout_ms),
                    # A replica's first sync starts at once, not 5 s later.
                    "--repl-diskless-sync-delay", "0",
                    *auth,
                    *tls,
                    *args,
                ],
            )  # fmt: skip
        self._migrating: dict[int, tuple[int, int]] = {}

    @property
    def seeds(self) -> list[tuple[str, int]]:
        """Every node's address (the client needs only one that answers)."""
        return [("127.0.0.1", port) for port in self.ports]

    @property
    def tls_seeds(self) -> list[tuple[str, int]]:
        """Every node's TLS address (a cluster made with ``tls_dir``)."""
        return [("127.0.0.1", self.tls_ports[port]) for port in self.ports]

    def url(self, prefix: str = "lapse", *, seeds: int = 2) -> str:
        """A ``redis+cluster://`` store URL naming the first ``seeds`` nodes."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports[:seeds])
        auth = f":{self.password}@" if self.password else ""
        return f"redis+cluster://{auth}{hosts}/?prefix={prefix}"

    # -- starting and stopping ----------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        for server in self.servers.values():
            server.start()
        env = dict(os.environ)
        if self.password:
            env["REDISCLI_AUTH"] = self.password  # not on the command line
        # With tls-cluster, create (and so MEET) through the TLS ports.
        tls = ["--tls", "--cacert", str(self.tls_dir / "ca.crt")] if self.tls_dir else []
        create = [
            os.path.join(os.path.dirname(redis_server_binary()), "redis-cli"),
            *tls,
            "--cluster", "create",
            *(f"127.0.0.1:{self.tls_ports.get(port, port)}" for port in self.ports),
            "--cluster-replicas", str(self.replicas_per_primary),
            "--cluster-yes",
        ]  # fmt: skip
        done = subprocess.run(create, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
        self.wait_ok(timeout)

    def close(self) -> None:
        for server in self.servers.values():
            server.close()

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (no goodbye to the cluster)."""
        server = self.servers[port]
        if server.pid is not None:
            os.kill(server.pid, signal.SIGKILL)
        server.stop()  # reaps it

    def restart(self, port: int) -> None:
        """Start a killed node again (it rejoins with its nodes.conf)."""
        self.servers[port].start()

    def alive(self) -> list[int]:
        return [port for port, server in self.servers.items() if server.pid is not None]

    # -- asking the nodes ---------------------------------------------------------------

    def command(self, port: int, *args: str | int | bytes) -> Any:
        return command(port, *args, password=self.password)

    def node_id(self, port: int) -> str:
        return str(self.command(port, "CLUSTER", "MYID"))

    def slot_map(self, port: int | None = None) -> dict[int, int]:
        """Slot -> primary port, as the node on ``port`` (any live one) sees it."""
        asked = port if port is not None else self.alive()[0]
        owners: dict[int, int] = {}
        for entry in self.command(asked, "CLUSTER", "SLOTS"):
            for slot in range(entry[0], entry[1] + 1):
                owners[slot] = int(entry[2][1])
        return owners

    def node_for_slot(self, slot: int) -> int:
        """The port of the primary owning ``slot``."""
        return self.slot_map()[slot]

    def primaries(self) -> list[int]:
        """The ports of the primaries that own slots, sorted."""
        return sorted(set(self.slot_map().values()))

    def replicas_of(self, primary: int, timeout: float = 5.0) -> list[int]:
        """The ports of the replicas replicating from ``primary`` now, as the
        primary itself says (``INFO replication``: not gossip, which another
        node may not have heard yet); waits up to ``timeout`` for one to be
        online if the cluster was made with replicas."""
        end = time.monotonic() + timeout
        while True:
            info = self.command(primary, "INFO", "replication")
            found = sorted(
                int(line.split("port=", 1)[1].split(",", 1)[0])
                for line in info.splitlines()
                if line.startswith("slave") and "state=online" in line
            )
            if found or not self.replicas_per_primary or time.monotonic() > end:
                return found
            time.sleep(0.05)

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Until every live node says ``cluster_state:ok``, agrees on who owns
        every slot, and every live replica's link to its primary is up."""
        end = time.monotonic() + timeout
        problem = ""
        while time.monotonic() < end:
            problem = self._not_ok()
            if not problem:
                return
            time.sleep(0.05)
        raise RuntimeError(f"cluster not ok after {timeout:g}s: {problem}")

    def _not_ok(self) -> str:
        maps = []
        for port in self.alive():
            try:
                info = self.command(port, "CLUSTER", "INFO")
                if "cluster_state:ok" not in info:
                    return f"{port}: {info.splitlines()[0]}"
                replication = self.command(port, "INFO", "replication")
                if "role:slave" in replication and "master_link_status:up" not in replication:
                    return f"{port}: replica link down"
                maps.append(self.slot_map(port))
            except (OSError, hiredis.ProtocolError) as exc:
                return f"{port}: {exc}"
        if any(each != maps[0] or len(each) != 16384 for each in maps):
            return "nodes disagree on the slot map"
        return ""

    def flushall(self) -> None:
        """Empty every primary (replicas follow) and its script cache."""
        for port in self.primaries():
            self.command(port, "FLUSHALL")
            self.command(port, "SCRIPT", "FLUSH")

    def failover(self, replica: int, timeout: float = 20.0) -> None:
        """``CLUSTER FAILOVER`` on ``replica``, waiting until it owns its
        primary's slots and the cluster is ok."""
        reply = self.command(replica, "CLUSTER", "FAILOVER")
        if reply != "OK":
            raise RuntimeError(f"CLUSTER FAILOVER on {replica}: {reply}")
        end = time.monotonic() + timeout
        again = time.monotonic() + _MANUAL_FAILOVER_WINDOW
        while replica not in self.primaries():
            now = time.monotonic()
            if now > end:
                raise RuntimeError(f"{replica} did not become a primary")
            if now > again:
                # Redis drops a manual failover not done within 5 s (a busy
                # machine: the replica's offset did not catch up): ask again.
                self.command(replica, "CLUSTER", "FAILOVER")
                again = now + _MANUAL_FAILOVER_WINDOW
            time.sleep(0.05)
        self.wait_ok(timeout)

    # -- slot migration, step by step ------------------------------------------------

    def begin_migration(self, slot: int, to_port: int) -> int:
        """Mark ``slot`` IMPORTING on ``to_port`` and MIGRATING on its owner
        (moving no key yet); the owner's port."""
        source = self.node_for_slot(slot)
        if source == to_port:
            raise ValueError(f"slot {slot} is already on {to_port}")
        self._ok(
            self.command(to_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        )
        self._ok(
            self.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(to_port))
        )
        self._migrating[slot] = (source, to_port)
        return source

    def move_keys(self, slot: int, limit: int | None = None, batch: int = 100) -> int:
        """MIGRATE keys of ``slot`` (at most ``limit``) from the source to the
        target of its migration; how many were moved."""
        source, target = self._migrating[slot]
        moved = 0
        while limit is None or moved < limit:
            count = batch if limit is None else min(batch, limit - moved)
            keys = self.command(source, "CLUSTER", "GETKEYSINSLOT", slot, count)
            if not keys:
                break
            auth = ["AUTH", self.password] if self.password else []
            self._ok(
                self.command(
                    source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, *auth, "KEYS", *keys
                )
            )
            moved += len(keys)
        return moved

    def finish_migration(self, slot: int) -> None:
        """Move the slot's remaining keys and give it to the target everywhere."""
        source, target = self._migrating[slot]
        self.move_keys(slot)
        owner = self.node_id(target)
        self._ok(self.command(target, "CLUSTER", "SETSLOT", slot, "NODE", owner))
        self._ok(self.command(source, "CLUSTER", "SETSLOT", slot, "NODE", owner))
        for port in self.primaries():
            if port not in (source, target):
                self._ok(self.command(port, "CLUSTER", "SETSLOT", slot, "NODE", owner))
        del self._migrating[slot]

    def migrate_slot(self, slot: int, to_port: int) -> None:
        """Move ``slot`` and its keys to the primary on ``to_port``."""
        self.begin_migration(slot, to_port)
        self.finish_migration(slot)

    @staticmethod
    def _ok(reply: Any) -> None:
        if reply != "OK" and reply != "NOKEY":
            raise RuntimeError(f"cluster command failed: {reply!r}")
