"""examples/ws_chat.py, run as its README says: a WebSocket chat bound to
the session. With the websockets client; across two processes on a shared
store (a user on three devices, "sign out everywhere" from one process
closes the sockets held in the other); and in a real headless Chromium
(signing out in a second tab closes the first tab's socket: code 1008)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
from _examples import run_example, session_cookie
from _servers import HOST, request
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect


def sign_in(port: int, name: str) -> str:
    """Sign in as ``name``: the uid of the new session."""
    response = request(port, f"/login?name={name}")
    assert response.status == 302, response
    return session_cookie(response)


def chat_socket(port: int, uid: str) -> ClientConnection:
    return connect(
        f"ws://{HOST}:{port}/chat",
        additional_headers={"Origin": f"http://{HOST}:{port}", "Cookie": f"lapse_session={uid}"},
        open_timeout=5,
    )


def close_of(ws: ClientConnection, timeout: float) -> tuple[int, str, float]:
    """The close the server sends ``ws``: code, reason, when (monotonic)."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=timeout)
    received = closed.value.rcvd
    assert received is not None
    return received.code, received.reason, time.monotonic()


def test_chat_needs_a_name_relays_messages_and_closes_at_logout(tmp_path: Path) -> None:
    with run_example("ws_chat.py", tmp_path) as (_server, port):
        with chat_socket(port, "x" * 24) as anonymous:
            assert close_of(anonymous, 5)[:2] == (1008, "sign in first")
        ada, bob = sign_in(port, "ada"), sign_in(port, "bob")
        with chat_socket(port, ada) as ada_ws, chat_socket(port, bob) as bob_ws:
            ada_ws.send("hello")
            assert ada_ws.recv(timeout=5) == "ada: hello"
            assert bob_ws.recv(timeout=5) == "ada: hello"
            response = request(port, "/logout", headers={"Cookie": f"lapse_session={ada}"})
            assert response.status == 302
            assert close_of(ada_ws, 5)[:2] == (1008, "session ended")
            bob_ws.send("still here")
            assert bob_ws.recv(timeout=5) == "bob: still here"


@pytest.mark.slow
def test_sign_out_everywhere_closes_three_devices_sockets_across_processes(
    shared_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes on one store; ada signs in on three devices (three
    cookie jars: one through A, two through B) and opens a socket on each,
    in both processes; "sign out everywhere" through A (expire_principal)
    closes all three with 1008 within 0.5 s."""
    monkeypatch.setenv("LAPSE_SESSION_STORE", shared_store)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        run_example("ws_chat.py", tmp_path / "a") as (_a, a),
        run_example("ws_chat.py", tmp_path / "b") as (_b, b),
    ):
        devices = [(a, sign_in(a, "ada")), (b, sign_in(b, "ada")), (b, sign_in(b, "ada"))]
        assert len({uid for _, uid in devices}) == 3
        with contextlib.ExitStack() as stack:
            sockets = [
                stack.enter_context(chat_socket(b, devices[0][1])),
                stack.enter_context(chat_socket(a, devices[1][1])),
                stack.enter_context(chat_socket(b, devices[2][1])),
            ]
            for ws in sockets:
                ws.send("here")
                assert ws.recv(timeout=5) == "ada: here"
            response = request(
                a, "/logout-everywhere", headers={"Cookie": f"lapse_session={devices[0][1]}"}
            )
            signed_out = time.monotonic()
            assert response.status == 302
            closes: list[Any] = []
            for ws in sockets:
                code, reason, at = close_of(ws, 3)
                closes.append((code, reason, round(at - signed_out, 3)))
        assert all(code == 1008 and reason == "session ended" for code, reason, _ in closes)
        assert max(at for _, _, at in closes) < 0.5, closes
        for port, uid in devices:
            assert request(port, "/", headers={"Cookie": f"lapse_session={uid}"}).status == 200
            assert b"Sign in" in request(port, "/", headers={"Cookie": f"lapse_session={uid}"}).body
        print(f"{shared_store.split(':')[0]}: sockets closed after {[at for _, _, at in closes]} s")


@pytest.mark.slow
def test_sign_out_in_a_second_tab_closes_the_first_tabs_socket_in_chromium(
    tmp_path: Path,
) -> None:
    from _browser import chromium_binary

    executable = chromium_binary()
    from playwright.sync_api import sync_playwright

    with run_example("ws_chat.py", tmp_path) as (_server, port), sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        try:
            context = browser.new_context()
            first = context.new_page()
            first.goto(f"http://{HOST}:{port}/login?name=ada")
            first.wait_for_function("document.getElementById('status').textContent === 'open'")
            first.fill("#text", "hello from the first tab")
            first.click("button")
            first.wait_for_selector("#log li")
            assert first.text_content("#log li") == "ada: hello from the first tab"
            second = context.new_page()
            second.goto(f"http://{HOST}:{port}/logout")
            assert "Sign in" in second.content()
            first.wait_for_function(
                "document.getElementById('status').textContent.startsWith('closed')",
                timeout=5000,
            )
            assert first.text_content("#status") == "closed 1008 session ended"
        finally:
            browser.close()
