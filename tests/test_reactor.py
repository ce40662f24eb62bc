"""The real reactor (``AsyncioReactor``): binding, serving, timers, signals, TLS.

In-process tests use a fresh ``AsyncioReactor()`` each, run in the test thread
with ``run(installSignalHandlers=False)``; the client side runs in a thread
started once the reactor runs (see :func:`run_with_client`), and a guard
timer stops the reactor if a test goes wrong, so nothing can hang.
Signal tests run a server script in a subprocess.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn
from _servers import (
    HOST,
    Response,
    free_port,
    port_accepts,
    raw_exchange,
    request,
    running_server,
    self_signed_cert,
    write_script,
)

from lapse.internet._asyncio import (
    PYTHON_GC_THRESHOLD,
    SERVER_GC_THRESHOLD,
    AsyncioReactor,
    tune_gc,
)
from lapse.internet.error import CannotListenError, ReactorNotRunning
from lapse.internet.interfaces import AlreadyCalled, AlreadyCancelled
from lapse.web.resource import Resource
from lapse.web.server import Request, Session, Site

T = TypeVar("T")

GUARD_SECONDS = 10.0
UID = r"[A-Za-z0-9_-]{24}"


# -- helpers ----------------------------------------------------------------


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"hello from lapse"


class Whoami(Resource):
    """Says whether the request is secure, and its session's uid."""

    isLeaf = True

    def render_GET(self, request: Request) -> str:
        return f"secure={request.isSecure()} uid={request.getSession().uid}"


def hello_site(reactor: AsyncioReactor) -> Site:
    root = Resource()
    root.putChild("hello", Hello())
    root.putChild("whoami", Whoami())
    return Site(root, reactor=reactor)


@pytest.fixture
def reactor() -> Iterator[AsyncioReactor]:
    """A fresh reactor; afterwards its ports are closed and its loop too."""
    fresh = AsyncioReactor()
    try:
        yield fresh
    finally:
        assert not fresh.running
        for port in list(fresh._ports):
            port.stopListening()
        loop = fresh._loop
        if loop is not None and not loop.is_closed():
            loop.close()
        asyncio.set_event_loop(None)


def run_until_stopped(reactor: AsyncioReactor, timeout: float = GUARD_SECONDS) -> None:
    """``reactor.run()``; a guard stops it after ``timeout`` (a test failure)."""
    timed_out: list[bool] = []

    def guard() -> None:
        timed_out.append(True)
        reactor.stop()

    guard_call = reactor.callLater(timeout, guard)
    reactor.run(installSignalHandlers=False)
    if guard_call.active():
        guard_call.cancel()
    assert not timed_out, f"the reactor was still running after {timeout} s"


def run_with_client(
    reactor: AsyncioReactor, client: Callable[[], T], timeout: float = GUARD_SECONDS
) -> T:
    """Run the reactor while ``client()`` runs in a thread; stop it when the
    client returns; the client's result (or its exception, raised here)."""
    outcome: dict[str, Any] = {}

    def stop_if_running() -> None:
        if reactor.running:
            reactor.stop()

    def start() -> None:
        loop = asyncio.get_running_loop()

        def work() -> None:
            try:
                outcome["value"] = client()
            except BaseException as exc:
                outcome["error"] = exc
            finally:
                loop.call_soon_threadsafe(stop_if_running)

        threading.Thread(target=work, daemon=True).start()

    reactor.callWhenRunning(start)
    run_until_stopped(reactor, timeout)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


def call_in_reactor(reactor: AsyncioReactor, func: Callable[[], Any]) -> None:
    """From a client thread: run ``func`` on the running reactor's loop, and wait."""
    done = threading.Event()
    loop = reactor._loop
    assert loop is not None

    def call() -> None:
        try:
            func()
        finally:
            done.set()

    loop.call_soon_threadsafe(call)
    assert done.wait(5), "the reactor did not run the call"


def wait_until_refused(port: int, timeout: float = 3.0) -> bool:
    """Whether connections to ``port`` are refused within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_accepts(port):
            return True
        time.sleep(0.02)
    return False


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


# -- signals (subprocess) -----------------------------------------------------

SLOW_SERVER = """
import sys

from lapse.internet import reactor
from lapse.web.resource import Resource
from lapse.web.server import NOT_DONE_YET, Site


class Slow(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.write(b"slow page, ")
        reactor.callLater(0.5, self._finish, request)
        print("slow request started", flush=True)
        return NOT_DONE_YET

    def _finish(self, request):
        request.write(b"finished")
        request.finish()


class Fast(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"fast"


root = Resource()
root.putChild("slow", Slow())
root.putChild("fast", Fast())
reactor.listenTCP(int(sys.argv[1]), Site(root), interface="127.0.0.1")
reactor.run()
print("run returned", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_shuts_down_gracefully(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM or SIGINT makes the server exit with code 0, and a request in
    flight when the signal arrives (NOT_DONE_YET, finished 0.5 s later by
    ``reactor.callLater``) still completes with 200 and its whole body."""
    script = write_script(tmp_path, "slow_server.py", SLOW_SERVER)
    port = free_port()
    with running_server(script, port, args=[str(port)]) as server:
        assert request(port, "/fast").body == b"fast"
        outcome: dict[str, Any] = {}

        def slow_client() -> None:
            try:
                outcome["response"] = request(port, "/slow", timeout=10)
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=slow_client, daemon=True)
        thread.start()
        line = server.wait_for_line(5)
        assert line is not None and line.text == "slow request started", line
        server.send_signal(sig)
        thread.join(10)
        assert not thread.is_alive()
        assert "error" not in outcome, outcome.get("error")
        response: Response = outcome["response"]
        assert response.status == 200
        assert response.body == b"slow page, finished"
        assert server.wait(10) == 0, server.stderr_text()
        line = server.wait_for_line(1)
        assert line is not None and line.text == "run returned"
        assert "Traceback" not in server.stderr_text()
    assert not port_accepts(port)


# -- TLS ----------------------------------------------------------------------


def test_listenSSL_serves_https_with_secure_session_cookie(
    reactor: AsyncioReactor, tmp_path: Path
) -> None:
    """``listenSSL`` serves HTTPS: ``isSecure()`` is True there, and the
    session cookie is ``__Host-lapse_session`` with ``Secure`` and ``Path=/``;
    on plain HTTP (same site, same reactor) it is ``lapse_session`` without
    ``Secure``."""
    cert, key = self_signed_cert(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))

    site = hello_site(reactor)
    tls = reactor.listenSSL(0, site, server_context, interface=HOST).getHost().port
    plain = reactor.listenTCP(0, site, interface=HOST).getHost().port

    def client() -> tuple[Response, Response, Response, bytes]:
        secure = request(tls, "/whoami", ssl_context=client_context)
        cookie = secure.header("set-cookie") or ""
        uid = cookie.split(";")[0].partition("=")[2]
        secure_again = request(
            tls,
            "/whoami",
            ssl_context=client_context,
            headers={"Cookie": f"__Host-lapse_session={uid}"},
        )
        insecure = request(plain, "/whoami")
        # Plain HTTP to the TLS port is not served as a page.
        try:
            garbled = raw_exchange(tls, b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
        except OSError as exc:
            garbled = repr(exc).encode()
        return secure, secure_again, insecure, garbled

    secure, secure_again, insecure, garbled = run_with_client(reactor, client)

    assert secure.status == 200
    assert re.fullmatch(f"secure=True uid={UID}", secure.text), secure.text
    cookies = secure.header_all("set-cookie")
    assert len(cookies) == 1, cookies
    name_value, *attributes = [part.strip() for part in cookies[0].split(";")]
    uid = secure.text.rpartition("=")[2]
    assert name_value == f"__Host-lapse_session={uid}"
    assert "Secure" in attributes
    assert "Path=/" in attributes
    assert not any(a.lower().startswith("domain") for a in attributes)

    assert secure_again.text == f"secure=True uid={uid}"
    assert secure_again.header("set-cookie") is None

    assert insecure.status == 200
    assert re.fullmatch(f"secure=False uid={UID}", insecure.text), insecure.text
    plain_cookies = insecure.header_all("set-cookie")
    assert len(plain_cookies) == 1, plain_cookies
    plain_name_value, *plain_attributes = [p.strip() for p in plain_cookies[0].split(";")]
    assert plain_name_value.startswith("lapse_session=")
    assert plain_name_value != f"lapse_session={uid}"
    assert "Secure" not in plain_attributes

    assert b"secure=" not in garbled


# -- plain uvicorn ----------------------------------------------------------------


def test_site_served_by_plain_uvicorn_with_lifespan(tmp_path: Path) -> None:
    """A Site is a standard ASGI app: plain ``uvicorn.Server`` (no lapse
    reactor) with ``lifespan="on"`` starts it, serves GET, and sessions work
    (the cookie brings back the same session); then it shuts down cleanly."""
    root = Resource()
    root.putChild("hello", Hello())
    root.putChild("whoami", Whoami())
    site = Site(root)  # the default (global) reactor: timers go on uvicorn's loop

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    number = sock.getsockname()[1]
    config = uvicorn.Config(site, host=HOST, port=number, lifespan="on", log_config=None)
    server = uvicorn.Server(config)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started, f"uvicorn did not start (lifespan refused?) {errors}"

        hello = request(number, "/hello")
        assert hello.status == 200
        assert hello.body == b"hello from lapse"

        first = request(number, "/whoami")
        cookie = first.header("set-cookie") or ""
        assert re.match(f"lapse_session={UID};", cookie), cookie
        uid = cookie.split(";")[0].partition("=")[2]
        assert first.text == f"secure=False uid={uid}"
        second = request(number, "/whoami", headers={"Cookie": f"lapse_session={uid}"})
        assert second.text == f"secure=False uid={uid}"
        assert second.header("set-cookie") is None
        assert uid in site.sessions
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert not thread.is_alive()
    assert errors == []
    assert not port_accepts(number)


@pytest.fixture
def gc_state() -> Iterator[None]:
    """Put the collector back as it was after a tune_gc test."""
    saved = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*saved)
        gc.unfreeze()


def test_tune_gc_freezes_and_raises_thresholds_from_defaults(
    gc_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With CPython's default thresholds, tune_gc freezes what exists and sets
    the server thresholds, so full collections over live sessions are rare."""
    monkeypatch.delenv("LAPSE_GC_TUNING", raising=False)
    gc.set_threshold(*PYTHON_GC_THRESHOLD)
    gc.unfreeze()
    assert tune_gc() is True
    assert gc.get_threshold() == SERVER_GC_THRESHOLD
    assert gc.get_freeze_count() > 0


def test_tune_gc_leaves_thresholds_someone_chose(
    gc_state: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thresholds already changed by the application are not overridden."""
    monkeypatch.delenv("LAPSE_GC_TUNING", raising=False)
    gc.set_threshold(1234, 5, 6)
    assert tune_gc() is False
    assert gc.get_threshold() == (1234, 5, 6)


def test_tune_gc_is_off_with_env_zero(gc_state: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """LAPSE_GC_TUNING=0 keeps CPython's collector exactly as it is."""
    monkeypatch.setenv("LAPSE_GC_TUNING", "0")
    gc.set_threshold(*PYTHON_GC_THRESHOLD)
    gc.unfreeze()
    assert tune_gc() is False
    assert gc.get_threshold() == PYTHON_GC_THRESHOLD
    assert gc.get_freeze_count() == 0
