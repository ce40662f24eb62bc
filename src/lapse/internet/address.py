"""Network addresses, as Twisted's ``IPv4Address`` and ``IPv6Address``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class IPv4Address:
    """An IPv4 endpoint: ``type`` is ``"TCP"``."""

    type: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class IPv6Address:
    """An IPv6 endpoint: ``type`` is ``"TCP"``."""

    type: str
    host: str
    port: int


def address_for(host: str, port: int) -> IPv4Address | IPv6Address:
    """The address object for ``host``: IPv6 when it has a colon."""
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)
