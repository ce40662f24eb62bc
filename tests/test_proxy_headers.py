"""``trust_proxy_headers``: which X-Forwarded-For / -Proto entries to believe.

A proxy appends the address it saw to X-Forwarded-For, after what the client
sent; so the client controls the left-most entries and only the right-most
ones, added by the trusted proxies, can be believed. One reading of the
headers serves the site's requests, the session middleware and the wrapper
``lapse serve --trust-proxy`` puts around a plain ASGI app.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
from _asgi import fetch, set_cookies, wrapped
from conftest import call

from lapse.asgi import SessionMiddleware
from lapse.internet.address import IPv6Address
from lapse.internet.task import Clock
from lapse.web._proxy import ProxyHeaders, TrustSetting
from lapse.web.resource import Resource
from lapse.web.server import Site

PEER = ("10.0.0.5", 4000)
"""The socket peer: the proxy nearest to the server."""


class Probe(Resource):
    """Answers ``<isSecure> <client address> <address type>``."""

    isLeaf = True

    def render_GET(self, request: Any) -> str:
        address = request.getClientAddress()
        return f"{request.isSecure()} {address.host} {type(address).__name__}"


def seen(
    trust: TrustSetting,
    forwarded_for: list[bytes] | bytes | None = None,
    proto: list[bytes] | bytes | None = None,
    peer: tuple[str, int] = PEER,
) -> tuple[bool, str]:
    """(isSecure, client host) of one request with these headers, on a Site
    with ``trust_proxy_headers=trust``, from ``peer``. A list is several
    header lines."""
    headers: list[tuple[bytes, bytes]] = []
    for name, value in ((b"x-forwarded-for", forwarded_for), (b"x-forwarded-proto", proto)):
        lines = [] if value is None else value if isinstance(value, list) else [value]
        headers += [(name, line) for line in lines]
    site = Site(Probe(), reactor=Clock(), trust_proxy_headers=trust)
    secure, host, _ = call(site, headers=headers, client=peer).body.decode().split(" ")
    return secure == "True", host


# -- X-Forwarded-For ---------------------------------------------------------------


def test_one_proxy_takes_the_right_most_entry_not_the_spoofed_left_most() -> None:
    """With one trusted proxy (True) the client is the entry that proxy
    appended, the right-most; what the client wrote to the left is ignored,
    in one header line or several."""
    assert seen(True, b"127.0.0.1, 203.0.113.9")[1] == "203.0.113.9"
    assert seen(True, [b"127.0.0.1", b"6.6.6.6, 203.0.113.9"])[1] == "203.0.113.9"
    assert seen(True, b"203.0.113.9")[1] == "203.0.113.9"
    assert seen(True)[1] == "10.0.0.5"  # no header: the socket peer
    assert seen(False, b"203.0.113.9")[1] == "10.0.0.5"  # not trusted at all


def test_a_chain_of_n_proxies_takes_the_nth_entry_from_the_right() -> None:
    """trust_proxy_headers=N: the client is the N-th entry from the right
    (each of the N proxies appended one); with fewer entries than N, none is
    believed and the client is the socket peer."""
    chain = b"127.0.0.1, 203.0.113.9, 10.0.0.2"
    assert seen(2, chain)[1] == "203.0.113.9"
    assert seen(3, chain)[1] == "127.0.0.1"
    assert seen(1, chain)[1] == "10.0.0.2"
    assert seen(2, b"203.0.113.9")[1] == "10.0.0.5"
    assert seen(4, chain)[1] == "10.0.0.5"


@pytest.mark.parametrize(
    "entry",
    [
        b"unknown",
        b"",
        b" ",
        b"evil.example",
        b"localhost",
        b"1.2.3.4.5",
        b"999.1.1.1",
        b"1.2.3.4:port",
        b"1.2.3.4:",
        b"[::1",
        b"[::1]x",
        b"::1]",
        b"_hidden",
        b"<script>",
        b"\xff\xfe",
        b"127.0.0.1" + b"0" * 100,
        b"\xd9\xa1.1.1.1",
    ],
)
def test_an_entry_that_is_not_an_address_falls_back_to_the_socket_peer(entry: bytes) -> None:
    """The chosen entry must parse as an IP address (``unknown``, a name,
    garbage, a bad port, non-ASCII digits are not): otherwise the client is
    the socket peer, and no 500."""
    assert seen(True, b"203.0.113.1, " + entry)[1] == "10.0.0.5"
    assert seen(True, entry)[1] == "10.0.0.5"


@pytest.mark.parametrize(
    ("entry", "host"),
    [
        (b"2001:db8::1", "2001:db8::1"),
        (b"2001:DB8:0:0::1", "2001:db8::1"),
        (b"[2001:db8::1]", "2001:db8::1"),
        (b"[2001:db8::1]:443", "2001:db8::1"),
        (b"192.0.2.1:5678", "192.0.2.1"),
        (b"\t192.0.2.1 ", "192.0.2.1"),
    ],
)
def test_ipv6_brackets_and_ports_are_read(entry: bytes, host: str) -> None:
    """IPv6 entries (bare or in brackets, with a port) and IPv4 with a port
    are addresses, normalised; an IPv6 client is an IPv6Address."""
    assert seen(True, b"6.6.6.6, " + entry)[1] == host
    site = Site(Probe(), reactor=Clock(), trust_proxy_headers=True)
    response = call(site, headers=[(b"x-forwarded-for", b"[2001:db8::1]:443")])
    assert response.body.decode().endswith(IPv6Address.__name__)


def test_proxy_list_believes_headers_only_from_a_listed_peer() -> None:
    """trust_proxy_headers as addresses and networks: a request from a peer
    not among them is taken as it is (its headers are the client's own); from
    a listed peer, the client is the right-most entry that is not a listed
    proxy (the left-most if all are)."""
    proxies = ["10.0.0.0/24", "192.0.2.7", "2001:db8::/32"]
    outsider = ("198.51.100.50", 4000)
    assert seen(proxies, b"127.0.0.1", b"https", peer=outsider) == (False, "198.51.100.50")
    chain = b"127.0.0.1, 203.0.113.9, 192.0.2.7, 10.0.0.9"
    assert seen(proxies, chain) == (False, "203.0.113.9")
    assert seen(proxies, b"10.0.0.1, 192.0.2.7") == (False, "10.0.0.1")
    assert seen(proxies, b"203.0.113.1, garbage, 10.0.0.9")[1] == "10.0.0.5"
    assert seen(proxies, b"2001:db8::99", peer=("2001:db8::1", 1)) == (False, "2001:db8::99")
    assert seen(proxies, b"203.0.113.9", peer=("::ffff:10.0.0.5", 1))[1] == "203.0.113.9"
    assert seen("10.0.0.5, 192.0.2.7", chain)[1] == "10.0.0.9"
    assert seen([ipaddress.ip_network("10.0.0.0/8")], chain)[1] == "192.0.2.7"


def test_padding_with_proxy_addresses_stops_the_walk() -> None:
    """A client that pads X-Forwarded-For with the proxies' own addresses (to
    make the server parse thousands, or to pass as a proxy) gets at most
    MAX_HOPS entries looked at; past them nothing is believed."""
    from lapse.web._proxy import MAX_HOPS

    padding = b", ".join([b"10.0.0.1"] * (MAX_HOPS - 1))
    assert seen(["10.0.0.0/8"], b"203.0.113.9, " + padding)[1] == "203.0.113.9"
    assert seen(["10.0.0.0/8"], b"203.0.113.9, 10.0.0.1, " + padding)[1] == "10.0.0.5"
    flood = b",".join([b"10.0.0.1"] * 800)
    assert len(flood) < 8 * 1024
    assert seen(["10.0.0.0/8"], flood)[1] == "10.0.0.5"
    assert seen(["10.0.0.0/8"], b"10.0.0.7, " + padding)[1] == "10.0.0.7"


# -- X-Forwarded-Proto ---------------------------------------------------------------


def test_forwarded_proto_is_read_under_the_same_trust() -> None:
    """X-Forwarded-Proto: the entry at the chosen client's position when each
    proxy appended one, else the right-most (the nearest proxy set it); only
    from trusted proxies; http or anything else is not secure."""
    assert seen(True, None, b"https") == (True, "10.0.0.5")
    assert seen(True, b"203.0.113.9", b"HTTPS") == (True, "203.0.113.9")
    # The client sent "https" itself; the proxy appended what it saw: http.
    assert seen(True, b"6.6.6.6, 203.0.113.9", b"https, http")[0] is False
    assert seen(True, b"6.6.6.6, 203.0.113.9", b"http")[0] is False
    assert seen(True, b"6.6.6.6, 203.0.113.9", [b"http", b"https"])[0] is True
    # Two proxies: the outer one saw the client's https, the inner one http.
    assert seen(2, b"203.0.113.9, 10.0.0.2", b"https, http") == (True, "203.0.113.9")
    assert seen(True, None, b"ftp")[0] is False
    assert seen(True, None, b"")[0] is False
    assert seen(False, None, b"https")[0] is False
    assert seen(["10.0.0.0/24"], None, b"https", peer=("198.51.100.1", 1))[0] is False
    assert seen(["10.0.0.0/24"], None, b"https")[0] is True


def test_the_middleware_reads_forwarded_proto_the_same_way() -> None:
    """SessionMiddleware gives the secure (__Host-) cookie only when the
    trusted proxies say https, as the Site does: not for a spoofed left-most
    entry, not from an untrusted peer."""

    async def cookie(trust: TrustSetting, proto: str, forwarded_for: str = "") -> str:
        headers = {"x-forwarded-proto": proto}
        if forwarded_for:
            headers["x-forwarded-for"] = forwarded_for
        response = await fetch(
            wrapped(reactor=Clock(), trust_proxy_headers=trust), "/put?n=1", headers=headers
        )
        (value,) = set_cookies(response)
        return value.split("=", 1)[0]

    async def main() -> None:
        assert await cookie(True, "https") == "__Host-lapse_session"
        assert await cookie(True, "https, http", "6.6.6.6, 203.0.113.9") == "lapse_session"
        assert await cookie(2, "https, http", "203.0.113.9, 10.0.0.2") == "__Host-lapse_session"
        # httpx's ASGI transport connects from 127.0.0.1.
        assert await cookie(["127.0.0.1"], "https") == "__Host-lapse_session"
        assert await cookie(["10.0.0.0/8"], "https") == "lapse_session"
        assert await cookie(False, "https") == "lapse_session"

    asyncio.run(main())


# -- the setting ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "error", "message"),
    [
        (-1, ValueError, "at least 0"),
        ("nonsense", ValueError, "'nonsense' is not an IP address or network"),
        ("10.0.0.0/33", ValueError, "is not an IP address or network"),
        ([], ValueError, "at least one proxy"),
        ("", ValueError, "is not an IP address"),
        (1.5, TypeError, "not float"),
        (b"10.0.0.1", TypeError, "not bytes"),
        ([object()], TypeError, "not object"),
    ],
)
def test_a_bad_setting_is_refused_at_construction(
    setting: Any, error: type[Exception], message: str
) -> None:
    """A trust_proxy_headers that is no count, no address list, is an error
    naming what is wrong when the Site or middleware is made (or set)."""
    with pytest.raises(error, match=message):
        Site(Resource(), reactor=Clock(), trust_proxy_headers=setting)
    with pytest.raises(error, match=message):
        SessionMiddleware(Resource(), reactor=Clock(), trust_proxy_headers=setting)
    site = Site(Resource(), reactor=Clock())
    with pytest.raises(error, match=message):
        site.trust_proxy_headers = setting
    assert site.trust_proxy_headers is False


def test_proxy_headers_wrapper_sets_client_and_scheme_of_a_plain_app() -> None:
    """ProxyHeaders (what ``lapse serve --trust-proxy`` puts around a plain
    ASGI app) sets the scope's client and scheme from the same reading: the
    right-most entry, not the spoofed left-most; untouched from an untrusted
    peer; ws/wss for websockets; a TLS connection stays https."""
    scopes: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)

    def through(
        trust: TrustSetting,
        headers: list[tuple[bytes, bytes]],
        kind: str = "http",
        scheme: str | None = None,
    ) -> tuple[Any, str]:
        scope = {
            "type": kind,
            "scheme": scheme or ("http" if kind == "http" else "ws"),
            "client": PEER,
            "headers": headers,
        }
        asyncio.run(ProxyHeaders(app, trust)(scope, None, None))  # type: ignore[arg-type]
        last = scopes[-1]
        return last["client"][0], last["scheme"]

    spoofed = [(b"x-forwarded-for", b"127.0.0.1, 203.0.113.9"), (b"x-forwarded-proto", b"https")]
    assert through(True, spoofed) == ("203.0.113.9", "https")
    assert through(True, spoofed, "websocket") == ("203.0.113.9", "wss")
    assert through(["192.0.2.0/24"], spoofed) == ("10.0.0.5", "http")
    assert through(True, [(b"x-forwarded-for", b"junk")]) == ("10.0.0.5", "http")
    assert through(True, [(b"x-forwarded-proto", b"http")], scheme="https") == ("10.0.0.5", "https")
    with pytest.raises(ValueError):
        ProxyHeaders(app, False)
