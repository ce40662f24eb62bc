"""The Redis Cluster the ``lapse-redis-cluster`` system runs on: 3 primaries and 3 replicas,
real ``redis-server --cluster-enabled yes`` processes on free 127.0.0.1 ports, each in a
temporary directory of its own, formed by ``redis-cli --cluster create`` and stopped by
their PIDs (SIGTERM, then SIGKILL).

:class:`ClusterHandle` offers what :class:`~bench.redis_traffic.RedisHandle` offers for one
node (``url``, ``flush``, ``snapshot``, ``close``, the addresses to MONITOR), over the
cluster's primaries: a snapshot is the sum of their INFO counters (replicas only replay
what their primary ran, so they are not counted).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.redis_traffic import RedisSnapshot, combined, node_snapshot
from bench.systems import HOST, free_port, stop, suite_helpers


def _pings(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class ClusterNode:
    """One ``redis-server --cluster-enabled yes`` process, no persistence."""

    def __init__(self, binary: str, workdir: Path, free: Callable[[], int]) -> None:
        self.port = free()
        self.bus_port = free()  # not port + 10000: that may be taken
        self.dir = workdir / str(self.port)
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.args = [
            binary,
            "--bind", HOST,
            "--port", str(self.port),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(self.bus_port),
            "--cluster-node-timeout", "2000",
            "--repl-diskless-sync-delay", "0",  # a replica's first sync at once
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--logfile", "redis.log",
        ]  # fmt: skip

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, cwd=self.dir, stdin=subprocess.DEVNULL)

    def wait_answering(self, timeout: float) -> None:
        assert self.proc is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                log = self.dir / "redis.log"
                text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} exited:\n{text}")
            if _pings(self.port):
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def stop(self) -> None:
        """SIGTERM our process by its PID, SIGKILL it after 5 s."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop(proc)


class ClusterHandle:
    """A 6-node Redis Cluster (3 primaries, 3 replicas) started for the bench."""

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 1,
        timeout: float = 30.0,
        free: Callable[[], int] = free_port,
    ) -> None:
        """``free``: where the nodes' ports (client and bus) come from."""
        import redis

        binary = suite_helpers().redis_server_binary()  # installed if missing, as for one node
        cli = shutil.which("redis-cli")  # (Debian's redis-server depends on redis-tools)
        if cli is None:
            raise RuntimeError(
                "the Redis Cluster system needs redis-cli: apt-get install redis-tools"
            )
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-redis-cluster-")
        workdir = Path(self._tmp.name)
        count = primaries * (1 + replicas)
        self.nodes = [ClusterNode(binary, workdir, free) for _ in range(count)]
        self.owned = True
        self.clients: dict[int, Any] = {}
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                node.wait_answering(10)
            create = [
                cli, "--cluster", "create",
                *(f"{HOST}:{node.port}" for node in self.nodes),
                "--cluster-replicas", str(replicas), "--cluster-yes",
            ]  # fmt: skip
            done = subprocess.run(create, capture_output=True, text=True, timeout=timeout)
            if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
                raise RuntimeError(
                    f"redis-cli --cluster create failed:\n{done.stdout[-3000:]}\n{done.stderr}"
                )
            self.clients = {
                node.port: redis.Redis(host=HOST, port=node.port, decode_responses=True)
                for node in self.nodes
            }
            self._wait_ok(timeout)
            self.primary_ports = self._primaries()
        except BaseException:
            self.close()
            raise
        self.addresses = [(HOST, port) for port in self.primary_ports]
        """The primaries, each MONITORed and counted."""
        seeds = ",".join(f"{HOST}:{node.port}" for node in self.nodes[:2])
        self.url = f"redis+cluster://{seeds}/"
        first = self.clients[self.primary_ports[0]]
        self.version = str(first.info("server").get("redis_version", "?"))
        self.description = (
            f"a Redis Cluster of {primaries} primaries and {primaries * replicas} replicas "
            f"(redis-server {self.version}), started by the bench"
        )

    def _primaries(self) -> list[int]:
        entries = self.clients[self.nodes[0].port].execute_command("CLUSTER", "SLOTS")
        return sorted({int(entry[2][1]) for entry in entries})

    def _wait_ok(self, timeout: float) -> None:
        """Until every node says ``cluster_state:ok`` and every replica's link is up."""
        end = time.monotonic() + timeout
        problem = ""
        while time.monotonic() < end:
            problem = self._not_ok()
            if not problem:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the bench's Redis Cluster is not ok after {timeout:g} s: {problem}")

    def _not_ok(self) -> str:
        for port, client in self.clients.items():
            try:
                info = client.execute_command("CLUSTER", "INFO")
                if "cluster_state:ok" not in info:
                    return f"{port}: {info.splitlines()[0]}"
                replication = client.info("replication")
            except Exception as exc:
                return f"{port}: {exc}"
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return f"{port}: replica link down"
        return ""

    def flush(self) -> None:
        """Empty every primary (the replicas follow) and its script cache."""
        for port in self.primary_ports:
            self.clients[port].flushall()
            self.clients[port].script_flush()

    def node_snapshots(self) -> list[RedisSnapshot]:
        """Each primary's counters (one INFO each, in the order of ``addresses``)."""
        return [node_snapshot(self.clients[port]) for port in self.primary_ports]

    def snapshot(self) -> RedisSnapshot:
        """The primaries' counters summed."""
        return combined(self.node_snapshots())

    def close(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                client.close()
        for node in self.nodes:
            node.stop()
        self._tmp.cleanup()
