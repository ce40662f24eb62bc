"""The real reactor (``AsyncioReactor``): binding, serving, timers (signals,
TLS and plain uvicorn: test_reactor_serving.py).

In-process tests use a fresh ``AsyncioReactor()`` each (the conftest fixture
``reactor``), run in the test thread with ``run(installSignalHandlers=False)``;
the client side runs in a thread started once the reactor runs (see
``_reactor.run_with_client``), and a guard timer stops the reactor if a test
goes wrong, so nothing can hang.
"""

from __future__ import annotations

import functools
import re
import socket
import threading
import time

import pytest
from _reactor import (
    UID,
    call_in_reactor,
    hello_site,
    run_until_stopped,
    run_with_client,
    wait_until_refused,
)
from _servers import (
    HOST,
    Response,
    port_accepts,
    request,
)

from lapse.internet._asyncio import AsyncioReactor
from lapse.internet.error import CannotListenError, ReactorNotRunning
from lapse.internet.interfaces import AlreadyCalled, AlreadyCancelled
from lapse.web.resource import Resource
from lapse.web.server import Session, Site

# -- listening --------------------------------------------------------------


def test_listenTCP_binds_at_once_before_run(reactor: AsyncioReactor) -> None:
    """``listenTCP(0, ...)`` binds at the call: ``getHost().port`` is a real
    nonzero port before ``run()``, a raw socket can connect (the backlog holds
    it), and a request sent then is answered once the reactor runs."""
    port = reactor.listenTCP(0, hello_site(reactor), interface=HOST)
    host = port.getHost()
    assert host.host == HOST
    assert host.port != 0
    assert host.type == "TCP"
    assert not reactor.running

    early = socket.create_connection((HOST, host.port), timeout=5)
    early.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    def client() -> bytes:
        received = bytearray()
        with early:
            while chunk := early.recv(65536):
                received += chunk
        return bytes(received)

    answer = run_with_client(reactor, client)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\nhello from lapse")


def test_listening_on_a_port_in_use_raises_at_the_call(reactor: AsyncioReactor) -> None:
    """A port another socket listens on: ``CannotListenError`` at the
    ``listenTCP`` call, naming the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind((HOST, 0))
        blocker.listen()
        busy = blocker.getsockname()[1]
        with pytest.raises(CannotListenError) as info:
            reactor.listenTCP(busy, hello_site(reactor), interface=HOST)
        assert str(busy) in str(info.value)
        assert info.value.port == busy
        assert reactor._ports == []


def test_listening_twice_on_the_same_port_raises(reactor: AsyncioReactor) -> None:
    """A second ``listenTCP`` on the port a first one holds (both set
    SO_REUSEADDR) is a ``CannotListenError`` naming the port."""
    first = reactor.listenTCP(0, hello_site(reactor), interface=HOST)
    number = first.getHost().port
    with pytest.raises(CannotListenError, match=str(number)):
        reactor.listenTCP(number, hello_site(reactor), interface=HOST)


def test_run_serves_a_site_and_stop_makes_run_return(reactor: AsyncioReactor) -> None:
    """``run()`` serves the Site (GET: 200 and the body); ``stop()`` makes
    ``run()`` return, and afterwards the port is closed."""
    port = reactor.listenTCP(0, hello_site(reactor), interface=HOST)
    number = port.getHost().port

    def client() -> tuple[Response, Response]:
        return request(number, "/hello"), request(number, "/nothing-here")

    started = time.monotonic()
    hello, missing = run_with_client(reactor, client)
    assert time.monotonic() - started < 5
    assert hello.status == 200
    assert hello.body == b"hello from lapse"
    assert missing.status == 404
    assert not reactor.running
    assert not port_accepts(number)
    with pytest.raises(ReactorNotRunning):
        reactor.stop()


def test_stopListening_closes_the_port_while_others_serve(reactor: AsyncioReactor) -> None:
    """``stopListening()`` on a running reactor closes that port (connections
    refused); another port of the same reactor keeps serving."""
    site = hello_site(reactor)
    closing = reactor.listenTCP(0, site, interface=HOST)
    staying = reactor.listenTCP(0, site, interface=HOST)
    closing_number, staying_number = closing.getHost().port, staying.getHost().port

    def client() -> tuple[int, bool, int]:
        before = request(closing_number, "/hello").status
        call_in_reactor(reactor, closing.stopListening)
        refused = wait_until_refused(closing_number)
        after = request(staying_number, "/hello").status
        return before, refused, after

    before, refused, after = run_with_client(reactor, client)
    assert before == 200
    assert refused, "the port still accepted connections after stopListening()"
    assert after == 200
    assert not closing.listening


def test_stopListening_before_run_closes_the_port(reactor: AsyncioReactor) -> None:
    """``stopListening()`` before ``run()`` closes the bound socket at once."""
    port = reactor.listenTCP(0, hello_site(reactor), interface=HOST)
    number = port.getHost().port
    assert port_accepts(number)
    port.stopListening()
    assert not port_accepts(number)
    assert not port.listening


# -- time -------------------------------------------------------------------


def test_seconds_is_wall_clock_time(reactor: AsyncioReactor) -> None:
    """``seconds()`` is ``time.time()`` (epoch seconds), as in Twisted."""
    before = time.time()
    now = reactor.seconds()
    after = time.time()
    assert before <= now <= after


def test_callLater_handle_cancel_reset_delay(reactor: AsyncioReactor) -> None:
    """Calls made before ``run()`` fire once it runs, in due order; a
    cancelled call never fires; ``reset`` and ``delay`` move a call; the
    handle reports ``getTime`` and ``active``, and refuses to cancel twice or
    after the call ran."""
    fired: list[tuple[str, float]] = []

    def record(name: str) -> None:
        fired.append((name, time.time()))

    t0 = time.time()
    late = reactor.callLater(0.25, record, "late")
    soon = reactor.callLater(0.05, record, "soon")
    cancelled = reactor.callLater(0.05, record, "cancelled")
    moved_earlier = reactor.callLater(30, record, "moved-earlier")
    delayed = reactor.callLater(0.05, record, "delayed")
    kw = reactor.callLater(0.01, lambda *, name: record(name), name="kw")

    assert abs(soon.getTime() - (t0 + 0.05)) < 0.05
    assert soon.active()
    cancelled.cancel()
    assert not cancelled.active()
    with pytest.raises(AlreadyCancelled):
        cancelled.cancel()
    with pytest.raises(AlreadyCancelled):
        cancelled.reset(1)

    moved_earlier.reset(0.1)
    assert abs(moved_earlier.getTime() - (time.time() + 0.1)) < 0.05
    old_time = delayed.getTime()
    delayed.delay(0.1)
    assert delayed.getTime() == pytest.approx(old_time + 0.1, abs=0.01)

    reactor.callLater(0.35, reactor.stop)
    run_until_stopped(reactor)

    names = [name for name, _ in fired]
    assert names == ["kw", "soon", "moved-earlier", "delayed", "late"]
    due = {
        "kw": kw.getTime(),
        "soon": soon.getTime(),
        "moved-earlier": moved_earlier.getTime(),
        "delayed": delayed.getTime(),
        "late": late.getTime(),
    }
    for name, at in fired:
        # libuv timers have millisecond resolution: allow 5 ms early.
        assert at >= due[name] - 0.005, (name, at - due[name])
        assert at - due[name] < 0.25, (name, at - due[name])
    for handle in (late, soon, moved_earlier, delayed, kw):
        assert not handle.active()
        with pytest.raises(AlreadyCalled):
            handle.cancel()


def test_callLater_while_running_and_callWhenRunning(reactor: AsyncioReactor) -> None:
    """``callWhenRunning`` runs its callable once the reactor runs; a
    ``callLater`` made while running fires; one cancelled while running does not."""
    fired: list[str] = []

    def when_running() -> None:
        fired.append("running")
        reactor.callLater(0.02, fired.append, "later")
        reactor.callLater(0.02, fired.append, "cancelled").cancel()
        reactor.callLater(0.1, reactor.stop)

    reactor.callWhenRunning(when_running)
    run_until_stopped(reactor)
    assert fired == ["running", "later"]


class QuickSession(Session):
    sessionTimeout = 0.3


def test_session_expires_on_time_on_the_real_reactor(reactor: AsyncioReactor) -> None:
    """A session's expiry callbacks run within 50 ms after its last touch +
    sessionTimeout (0.3 s), once; the session leaves ``site.sessions`` first.
    Three sessions touched at different times each expire on their own time."""
    site = Site(Resource(), reactor=reactor)
    site.sessionFactory = QuickSession
    expired: dict[str, list[tuple[float, bool]]] = {}
    sessions: dict[str, Session] = {}

    def on_expire(name: str) -> None:
        session = sessions[name]
        expired.setdefault(name, []).append((time.time(), session.uid in site.sessions))
        if len(expired) == 3:
            reactor.callLater(0.1, reactor.stop)  # and see no second call meanwhile

    def start() -> None:
        for name in ("untouched", "touched-once", "touched-twice"):
            session = sessions[name] = site.makeSession()
            session.notifyOnExpire(functools.partial(on_expire, name))
        reactor.callLater(0.1, sessions["touched-once"].touch)
        reactor.callLater(0.1, sessions["touched-twice"].touch)
        reactor.callLater(0.2, sessions["touched-twice"].touch)

    reactor.callWhenRunning(start)
    run_until_stopped(reactor, timeout=5)

    assert sorted(expired) == ["touched-once", "touched-twice", "untouched"]
    for name, calls in expired.items():
        assert len(calls) == 1, (name, calls)
        (fired_at, still_listed) = calls[0]
        session = sessions[name]
        deadline = session.lastModified + QuickSession.sessionTimeout
        assert not still_listed, f"{name} was still in site.sessions during its callbacks"
        assert fired_at >= deadline - 0.005, (name, fired_at - deadline)
        assert fired_at - deadline <= 0.05, (name, fired_at - deadline)
        assert session.expired
    order = sorted(expired, key=lambda name: expired[name][0][0])
    assert order == ["untouched", "touched-once", "touched-twice"]
    assert site.sessions == {}


def test_session_over_http_expires_on_time(reactor: AsyncioReactor) -> None:
    """A session made and touched by real requests expires once, within 50 ms
    of its last touch + sessionTimeout; its cookie then gets a new session."""
    site = hello_site(reactor)
    site.sessionFactory = QuickSession
    port = reactor.listenTCP(0, site, interface=HOST)
    number = port.getHost().port
    fired: list[float] = []
    expired_event = threading.Event()
    found: list[Session] = []

    def on_expire() -> None:
        fired.append(time.time())
        expired_event.set()

    def client() -> tuple[str, str, str]:
        first = request(number, "/whoami")
        match = re.search(UID, first.header("set-cookie") or "")
        assert match is not None
        uid = match.group(0)

        def watch() -> None:
            found.append(site.sessions[uid])
            found[0].notifyOnExpire(on_expire)

        call_in_reactor(reactor, watch)
        time.sleep(0.1)
        again = request(number, "/whoami", headers={"Cookie": f"lapse_session={uid}"})
        assert expired_event.wait(3), "the session never expired"
        time.sleep(0.1)  # no second expiry call
        after = request(number, "/whoami", headers={"Cookie": f"lapse_session={uid}"})
        return uid, again.text, after.text

    uid, again, after = run_with_client(reactor, client)
    assert again == f"secure=False uid={uid}"
    assert len(fired) == 1
    deadline = found[0].lastModified + QuickSession.sessionTimeout
    assert fired[0] >= deadline - 0.005, fired[0] - deadline
    assert fired[0] - deadline <= 0.05, fired[0] - deadline
    assert re.fullmatch(f"secure=False uid={UID}", after), after
    assert uid not in after
