"""The real reactor (``AsyncioReactor``) serving: signals (a server script in
a subprocess), TLS, and a Site under plain uvicorn. Helpers: tests/_reactor.py.
"""

from __future__ import annotations

import gc
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from _reactor import (
    UID,
    Hello,
    Whoami,
    hello_site,
    run_until_stopped,
    run_with_client,
)
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

from lapse.internet._asyncio import AsyncioReactor
from lapse.internet._process import PYTHON_GC_THRESHOLD, SERVER_GC_THRESHOLD, tune_gc
from lapse.web.resource import Resource
from lapse.web.server import Site

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


def test_a_delayed_call_that_ran_is_freed_without_the_collector(reactor: AsyncioReactor) -> None:
    """A call that ran leaves no reference cycle with its loop handle: reference
    counting frees it (the pacer freezes survivors, so cyclic garbage would wait
    for a full collection)."""
    import weakref

    ran: list[bool] = []
    call = reactor.callLater(0, ran.append, True)
    gone = weakref.ref(call)
    reactor.callLater(0.05, reactor.stop)
    gc.disable()
    try:
        run_until_stopped(reactor)
        del call
        assert ran == [True]
        assert gone() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("tuning", ["1", "0"])
def test_run_paces_the_collector_only_when_it_tuned_it(
    reactor: AsyncioReactor, gc_state: None, monkeypatch: pytest.MonkeyPatch, tuning: str
) -> None:
    """reactor.run() runs a CollectorPacer while it serves and stops it after,
    only when tune_gc() set the collector up (not with LAPSE_GC_TUNING=0)."""
    from lapse.internet import _asyncio

    made: list[Any] = []
    seen_running: list[bool] = []

    class Recording(_asyncio.CollectorPacer):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(_asyncio, "CollectorPacer", Recording)
    monkeypatch.setenv("LAPSE_GC_TUNING", tuning)
    gc.set_threshold(*PYTHON_GC_THRESHOLD)
    reactor.callLater(0.02, lambda: seen_running.extend(p.running for p in made))
    reactor.callLater(0.05, reactor.stop)
    run_until_stopped(reactor)
    if tuning == "1":
        assert len(made) == 1
        assert seen_running == [True]
        assert not made[0].running
    else:
        assert made == []
