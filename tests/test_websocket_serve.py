"""A FastAPI app's WebSocket and StreamingResponse bound to the session,
served by ``lapse serve`` with two workers on a shared SQLite store: the
endpoint reads ``websocket.session``; a logout (on whichever worker) closes
the socket with 1008 and ends the stream within 0.5 s."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from _servers import HOST, Lapse, request, wait_for_stderr, write_script
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = pytest.mark.slow  # a supervisor and two workers

APP = r"""
import asyncio

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse, StreamingResponse

from lapse.asgi import SessionMiddleware, get_session

app = FastAPI()
app.add_middleware(SessionMiddleware)


@app.get("/login", response_class=PlainTextResponse)
async def login(request: Request):
    request.session["name"] = "ada"
    return get_session(request).uid


@app.get("/logout", response_class=PlainTextResponse)
async def logout(request: Request):
    get_session(request).expire()
    return "bye"


@app.get("/feed")
async def feed(request: Request):
    get_session(request)

    async def ticks():
        while True:
            yield b"tick;"
            await asyncio.sleep(0.05)

    return StreamingResponse(ticks(), media_type="text/plain")


@app.websocket("/ws")
async def chat(websocket: WebSocket):
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"{websocket.session.get('name')}: {text}")
    except WebSocketDisconnect:
        pass
"""


def test_lapse_serve_websocket_and_stream_end_with_the_session(tmp_path: Path) -> None:
    write_script(tmp_path, "wsapp.py", APP)
    args = ["serve", "wsapp:app", "--port", "0", "--app-dir", str(tmp_path), "--workers", "2"]
    args += ["--store", f"sqlite:///{tmp_path / 'shared.db'}"]
    server = Lapse(Path("lapse"), args=args, cwd=tmp_path, stderr_path=tmp_path / "lapse.err")
    server.start()
    try:
        found = wait_for_stderr(server, r"on http://127\.0\.0\.1:(\d+) with 2 workers", 20)
        port = int(found.group(1))
        uid = request(port, "/login").text
        cookie = f"lapse_session={uid}"
        with socket.create_connection((HOST, port), timeout=5) as feed:
            feed.sendall(f"GET /feed HTTP/1.1\r\nHost: {HOST}\r\nCookie: {cookie}\r\n\r\n".encode())
            seen = b""
            while b"tick;" not in seen:
                seen += feed.recv(4096)
            headers = {"Origin": f"http://{HOST}:{port}", "Cookie": cookie}
            with connect(f"ws://{HOST}:{port}/ws", additional_headers=headers) as ws:
                ws.send("hi")
                assert ws.recv(timeout=5) == "ada: hi"
                assert request(port, "/logout", headers={"Cookie": cookie}).text == "bye"
                logged_out = time.monotonic()
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=3)
                socket_latency = time.monotonic() - logged_out
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "session ended")
            while not seen.endswith(b"0\r\n\r\n"):
                chunk = feed.recv(4096)
                assert chunk, seen[-200:]
                seen += chunk
            stream_latency = time.monotonic() - logged_out
        assert socket_latency < 0.5 and stream_latency < 0.5, (socket_latency, stream_latency)
    finally:
        server.stop(timeout=20)
