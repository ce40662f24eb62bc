"""Which proxy headers to believe: the ``trust_proxy_headers`` option.

Behind a reverse proxy the socket peer is the proxy, and the client's address
and scheme come in ``X-Forwarded-For`` and ``X-Forwarded-Proto``. A proxy
*appends* the address it saw to ``X-Forwarded-For``, after whatever the
client sent, so only the right-most entries, the ones the trusted proxies
added, can be believed; the left-most is whatever the client wrote.

``trust_proxy_headers`` (on ``Site``, ``SessionMiddleware``, and
``lapse serve --trust-proxy``) is one of:

- ``False`` (the default): believe neither header;
- ``True``: one trusted proxy: the client is the right-most entry;
- an int N: a chain of N trusted proxies: the client is the N-th entry from
  the right (fewer entries than N: none is believed);
- addresses and networks of the trusted proxies (a collection, or a str,
  comma-separated: ``"10.0.0.0/8, 192.0.2.7"``): the headers are believed
  only if the socket peer is one of them, and the client is the right-most
  entry that is not one of them (the left-most if all are; none is believed
  past ``MAX_HOPS`` entries).

The chosen entry must be an IP address (``192.0.2.1``, ``192.0.2.1:5678``,
``2001:db8::1``, ``[2001:db8::1]:443``); anything else (``unknown``, a name,
garbage) is not believed, and the client is the socket peer.
``X-Forwarded-Proto`` is read under the same trust: the entry at the chosen
client's position if it has as many entries as ``X-Forwarded-For`` (each
proxy appended one), else its right-most (the nearest proxy set it).

:class:`ProxyTrust` does this for the site's requests, the session middleware
and :class:`ProxyHeaders` (``lapse serve --trust-proxy`` around a plain ASGI
app): one reading of the headers for all three.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lapse.web._types import ASGIApp, Receive, Scope, Send

__all__ = [
    "Forwarded",
    "ProxyHeaders",
    "ProxyTrust",
    "TrustSetting",
    "parse_address",
    "proxy_trust",
]

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

TrustSetting = bool | int | str | Iterable[Any] | None
"""What ``trust_proxy_headers`` takes (see the module)."""

_MAX_ENTRY = 64
"""Longer than any IP address with a port: not one."""

MAX_HOPS = 32
"""With a proxy list, how many entries from the right are looked at: a client
who pads the header with proxy addresses gets no more work done than this."""


def parse_address(entry: bytes | str) -> str | None:
    """The IP address an ``X-Forwarded-For`` entry (or a socket peer) names,
    in its canonical text form, or None. A port suffix and IPv6 brackets are
    allowed; names are not. (``inet_pton``: this runs on every request.)"""
    text = entry.decode("latin-1") if isinstance(entry, bytes) else entry
    text = text.strip(" \t")
    if not text or len(text) > _MAX_ENTRY or not text.isascii():
        return None
    if text[0] == "[":
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        text = host
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            return None
        text = host
    try:
        if ":" in text:
            return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))
        socket.inet_pton(socket.AF_INET, text)  # four decimal octets, no leading zeros
    except (OSError, ValueError):
        return None
    return text


@dataclass(frozen=True, slots=True)
class Forwarded:
    """What the trusted proxies say of a request."""

    client: str | None
    """The client's IP address, normalised; None if no entry is believed."""
    secure: bool | None
    """Whether the client's request was https; None if the proxies do not say."""


class ProxyTrust:
    """A ``trust_proxy_headers`` setting that believes something (see the
    module); :func:`proxy_trust` makes one from a setting."""

    __slots__ = ("count", "networks")

    def __init__(self, count: int = 0, networks: tuple[_Network, ...] = ()) -> None:
        self.count = count
        """N trusted proxies in a chain (0 with ``networks``)."""
        self.networks = networks
        """The trusted proxies' addresses and networks (empty with ``count``)."""

    def _trusted(self, text: str | None) -> bool:
        """Whether ``text`` (from :func:`parse_address`) is a trusted proxy."""
        if text is None:
            return False
        address = ipaddress.ip_address(text)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def read(self, peer: str | None, headers: Iterable[tuple[bytes, bytes]]) -> Forwarded | None:
        """What the proxy headers of a request from ``peer`` say; None if they
        are not to be believed at all (the peer is not a trusted proxy)."""
        networks = self.networks
        if networks and not self._trusted(None if peer is None else parse_address(peer)):
            return None
        chain: list[bytes] = []
        protos: list[bytes] = []
        for name, value in headers:
            if name == b"x-forwarded-for":
                chain += value.split(b",")
            elif name == b"x-forwarded-proto":
                protos += value.split(b",")
        index: int | None = None
        client: str | None = None
        if networks:
            for at in range(len(chain) - 1, max(-1, len(chain) - 1 - MAX_HOPS), -1):
                index = at
                client = parse_address(chain[at])
                if not self._trusted(client):
                    break
            else:
                if index != 0:  # padded past MAX_HOPS with proxy addresses
                    index = client = None
        elif len(chain) >= self.count:
            index = len(chain) - self.count
            client = parse_address(chain[index])
        secure: bool | None = None
        if protos:
            aligned = index is not None and len(protos) == len(chain)
            proto = protos[index if aligned and index is not None else -1].strip(b" \t").lower()
            if proto in (b"https", b"wss"):
                secure = True
            elif proto in (b"http", b"ws"):
                secure = False
        return Forwarded(client, secure)


def proxy_trust(setting: TrustSetting) -> ProxyTrust | None:
    """The :class:`ProxyTrust` of a ``trust_proxy_headers`` setting, None for
    one that believes nothing (``False``, ``None``, ``0``); ``TypeError`` or
    ``ValueError`` naming what is wrong with any other."""
    if setting is None or setting is False or (type(setting) is int and setting == 0):
        return None
    if setting is True:
        return ProxyTrust(count=1)
    if isinstance(setting, int) and not isinstance(setting, bool):
        if setting < 0:
            raise ValueError(
                f"trust_proxy_headers={setting}: a number of trusted proxies is at least 0"
            )
        return ProxyTrust(count=setting)
    entries: list[Any]
    if isinstance(setting, str):
        entries = [part.strip() for part in setting.split(",")]
    elif isinstance(setting, bytes | bytearray) or not isinstance(setting, Iterable):
        raise TypeError(
            "trust_proxy_headers is False, True, a number of proxies, or the proxies' "
            f"addresses and networks, not {type(setting).__name__}"
        )
    else:
        entries = list(setting)
    networks: list[_Network] = []
    for entry in entries:
        if not isinstance(entry, str | _Address | _Network):
            raise TypeError(
                f"trust_proxy_headers: a proxy is an address or network (str), not "
                f"{type(entry).__name__}"
            )
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(
                f"trust_proxy_headers: {str(entry)[:80]!r} is not an IP address or network "
                "(e.g. 10.0.0.7, 10.0.0.0/8, ::1)"
            ) from None
    if not networks:
        raise ValueError("trust_proxy_headers: name at least one proxy address or network")
    return ProxyTrust(networks=tuple(networks))


class ProxyHeaders:
    """An ASGI app ``app`` whose scopes' ``client`` and ``scheme`` are what the
    trusted proxies say (``lapse serve --trust-proxy`` around a plain app)."""

    def __init__(self, app: ASGIApp, trust: TrustSetting) -> None:
        self.app = app
        found = proxy_trust(trust)
        if found is None:
            raise ValueError("ProxyHeaders needs a setting that trusts some proxy")
        self.trust = found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind in ("http", "websocket"):
            peer = scope.get("client")
            said = self.trust.read(peer[0] if peer else None, scope["headers"])
            if said is not None and (said.client is not None or said.secure):
                scope = dict(scope)
                if said.client is not None:
                    scope["client"] = (said.client, 0)
                if said.secure:  # (a TLS connection stays https, as for a Site)
                    scope["scheme"] = "https" if kind == "http" else "wss"
        await self.app(scope, receive, send)
