"""Free loopback ports for the servers tests start, without races.

A port the kernel hands out for ``bind(("127.0.0.1", 0))`` lies in the
ephemeral range, which outgoing connections draw from too: between the
moment a test learns the port and the moment its server binds it, a client
socket of any test (a Redis connection, an HTTP request) may take it, and
the server fails with "Address already in use". So ports come from below the
ephemeral range, and each pytest-xdist worker has a slice of its own; a port
is handed out once per run of a worker, after checking that it binds.
"""

from __future__ import annotations

import itertools
import os
import socket

__all__ = ["free_port"]

_LOW = 20000
_SLICE = 1500
"""Ports per xdist worker (gw0: 20000-21499, gw1: 21500-22999, ...)."""


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as text:
            return int(text.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    start = _LOW + (index * _SLICE) % max(_ephemeral_start() - _LOW - _SLICE, _SLICE)
    return range(start, start + _SLICE)


_candidates = itertools.cycle(_worker_slice())


def _binds(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1, free now, that no other test of this run's
    workers is given and no outgoing connection takes."""
    for _ in range(_SLICE):
        port = next(_candidates)
        if _binds(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # all taken: any
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
