"""The TLS options of Redis store URLs against real redis-servers speaking TLS
(certificates made with openssl): the context a URL's options build is the
one the store's client connects with, and each option does what it says."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import uvloop
from _servers import self_signed_cert
from _tls import Certificates, TLSRedisServer, make_certificates

from lapse.sessions.stores.redis.client import RedisClient, RedisConnectionError
from lapse.sessions.stores.redis.url import parse_url


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def mutual(certificates: Certificates) -> Iterator[TLSRedisServer]:
    """A server whose certificate the test CA signed, requiring client certificates."""
    with TLSRedisServer(
        certificates.server_cert, certificates.server_key, certificates.ca, auth_clients=True
    ) as server:
        yield server


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    """Each test on asyncio's own loop and on uvloop (the server's): their TLS differ."""
    if request.param == "uvloop":
        return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)
    return asyncio.new_event_loop


def _ping(url: str, loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> str:
    """PING over a RedisClient made as the store makes it: from the URL's target."""
    target = parse_url(url)

    async def ping() -> str:
        client = RedisClient(target.host, target.port, ssl_context=target.ssl_context, timeout=2.0)
        try:
            return str(await client.execute("PING"))
        finally:
            await client.aclose()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(ping())


def test_ca_and_client_certificate_from_the_url_connect_with_mutual_tls(
    mutual: TLSRedisServer,
    certificates: Certificates,
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    c = certificates
    url = (
        f"rediss://127.0.0.1:{mutual.tls_port}/?ssl_ca_certs={c.ca}"
        f"&ssl_certfile={c.client_cert}&ssl_keyfile={c.client_key}"
    )
    assert _ping(url, loop_factory) == "PONG"


def test_a_server_requiring_a_client_certificate_refuses_a_client_without_one(
    mutual: TLSRedisServer,
    certificates: Certificates,
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    url = f"rediss://127.0.0.1:{mutual.tls_port}/?ssl_ca_certs={certificates.ca}"
    with pytest.raises(RedisConnectionError, match=r"(?i)certificate required"):
        _ping(url, loop_factory)


def test_required_verification_against_the_wrong_ca_fails_clearly(
    mutual: TLSRedisServer,
    certificates: Certificates,
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ssl_ca_certs replaces the system's CAs: the server is refused even
    though the system's CAs (here SSL_CERT_FILE) would trust it."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificates.ca))
    c = certificates
    url = (
        f"rediss://127.0.0.1:{mutual.tls_port}/?ssl_ca_certs={c.other_ca}"
        f"&ssl_certfile={c.client_cert}&ssl_keyfile={c.client_key}"
    )
    with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        _ping(url, loop_factory)


def test_the_hostname_is_checked_unless_ssl_check_hostname_is_no(
    mutual: TLSRedisServer,
    certificates: Certificates,
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """The server's certificate names 127.0.0.1 only: connecting as localhost
    fails the hostname check, and ssl_check_hostname=no (the CA still
    verified) lets it through."""
    c = certificates
    url = (
        f"rediss://localhost:{mutual.tls_port}/?ssl_ca_certs={c.ca}"
        f"&ssl_certfile={c.client_cert}&ssl_keyfile={c.client_key}"
    )
    with pytest.raises(RedisConnectionError, match=r"(?i)hostname mismatch"):
        _ping(url, loop_factory)
    assert _ping(url + "&ssl_check_hostname=no", loop_factory) == "PONG"


def test_cert_reqs_none_connects_to_a_self_signed_server_that_required_refuses(
    tmp_path: Path, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    cert, key = self_signed_cert(tmp_path)
    with TLSRedisServer(cert, key, cert, auth_clients=False) as server:
        url = f"rediss://127.0.0.1:{server.tls_port}/0"
        with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            _ping(url, loop_factory)  # the default: required, against the system's CAs
        assert _ping(url + "?ssl_cert_reqs=none", loop_factory) == "PONG"
