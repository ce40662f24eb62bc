"""Shared helpers for tests that talk to real servers over real sockets.

- :func:`free_port`: a port nobody listens on (bind port 0, read it, close).
- :func:`wait_for_port`: block until a TCP port accepts connections.
- :class:`ServerProcess`: a Python script run as a subprocess; its stdout is
  read line by line in a thread (each line stamped with ``time.monotonic()``),
  its stderr goes to a file; it is ended by its PID (SIGTERM, then SIGKILL).
  :class:`Lapse` is the same for ``python -m lapse ARGS``;
  :func:`wait_for_stderr` waits for a pattern in what it wrote to stderr.
- :func:`request`: one HTTP request with :mod:`http.client`.
- :func:`raw_exchange` / :func:`parse_response`: send bytes that
  ``http.client`` would refuse to send, and parse what comes back.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _ports import free_port as free_port  # (the tests import it from here)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
HOST = "127.0.0.1"


def port_accepts(port: int, host: str = HOST) -> bool:
    """Whether a TCP connection to ``host:port`` is accepted right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int,
    host: str = HOST,
    timeout: float = 10.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until ``host:port`` accepts a connection; fail after ``timeout``.

    With ``proc``, fail at once if the process exits meanwhile.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening")
        if port_accepts(port, host):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing answered on {host}:{port} within {timeout} s")


@dataclass
class Line:
    """A line a subprocess wrote to stdout, and when the test read it."""

    text: str
    at: float


@dataclass
class ServerProcess:
    """A Python script running as a server subprocess, stopped by its PID."""

    script: Path
    args: Sequence[str] = ()
    cwd: Path = REPO_ROOT
    stderr_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    lines: queue.Queue[Line] = field(default_factory=queue.Queue)
    _reader: threading.Thread | None = None
    _stderr_file: io.BufferedWriter | None = None

    def start(self) -> ServerProcess:
        """Start ``python -u script args...``; stdout is read in a thread."""
        stderr_path = self.stderr_path or self.script.with_suffix(".stderr")
        self.stderr_path = stderr_path
        self._stderr_file = open(stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
        )
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        return self

    def argv(self) -> list[str]:
        """The command line: ``python -u script args...``."""
        return [sys.executable, "-u", str(self.script), *self.args]

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self.lines.put(Line(raw.decode("utf-8", "replace").rstrip("\r\n"), time.monotonic()))

    @property
    def pid(self) -> int:
        """The subprocess's PID."""
        assert self.proc is not None
        return self.proc.pid

    def wait_for_line(self, timeout: float) -> Line | None:
        """The next stdout line, or None if none came within ``timeout``."""
        try:
            return self.lines.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def wait_for_match(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The next stdout line that matches ``pattern`` whole (others are
        skipped); AssertionError, with what was seen, if none comes in time."""
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            line = self.wait_for_line(deadline - time.monotonic())
            if line is None:
                break
            seen.append(line.text)
            found = re.fullmatch(pattern, line.text)
            if found:
                return found
        raise AssertionError(f"no line {pattern!r}; saw {seen}; stderr:\n{self.stderr_text()}")

    def stderr_text(self) -> str:
        """What the subprocess wrote to stderr so far."""
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        return self.stderr_path.read_text("utf-8", "replace")

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the subprocess (by its PID, and only if it runs)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the subprocess to exit; its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """End the subprocess: SIGTERM, then SIGKILL after ``timeout``."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
            if self._reader is not None:
                self._reader.join(timeout=timeout)
            if proc.stdout is not None:
                proc.stdout.close()
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None


class Lapse(ServerProcess):
    """``python -u -m lapse ARGS`` as a server subprocess (``script`` is not
    run: pass ``Path("lapse")``), stopped by its PID."""

    def argv(self) -> list[str]:
        return [sys.executable, "-u", "-m", "lapse", *self.args]


def wait_for_stderr(server: ServerProcess, pattern: str, timeout: float) -> re.Match[str]:
    """The first match of ``pattern`` in the server's stderr, waiting for it."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, server.stderr_text())
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {pattern!r} on stderr: {server.stderr_text()!r}")
        time.sleep(0.05)


@contextlib.contextmanager
def running_server(
    script: Path,
    port: int,
    args: Sequence[str] = (),
    cwd: Path = REPO_ROOT,
    timeout: float = 15.0,
) -> Iterator[ServerProcess]:
    """Run ``script`` until it listens on ``port``; stop it on exit."""
    server = ServerProcess(script, args=args, cwd=cwd).start()
    try:
        try:
            wait_for_port(port, timeout=timeout, proc=server.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; stderr:\n{server.stderr_text()}") from exc
        yield server
    finally:
        server.stop()


def write_script(directory: Path, name: str, source: str) -> Path:
    """Write ``source`` to ``directory/name``; its path."""
    path = directory / name
    path.write_text(source, encoding="utf-8")
    return path


@dataclass
class Response:
    """What a server answered."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (case-insensitive), or None."""
        found = None
        for key, value in self.headers:
            if key.lower() == name.lower():
                found = value
        return found

    def header_all(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive)."""
        return [value for key, value in self.headers if key.lower() == name.lower()]

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode("utf-8")


def _from_http_client(resp: http.client.HTTPResponse) -> Response:
    body = resp.read()
    return Response(resp.status, resp.reason, list(resp.getheaders()), body)


def request(
    port: int,
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    host: str = HOST,
    timeout: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> Response:
    """One request on a new connection, with :mod:`http.client`."""
    conn: http.client.HTTPConnection
    if ssl_context is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl_context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        return _from_http_client(conn.getresponse())
    finally:
        conn.close()


class _BytesSocket:
    """Enough of a socket for :class:`http.client.HTTPResponse` to parse bytes."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, *args: object, **kwargs: object) -> io.BytesIO:
        return io.BytesIO(self._data)


def parse_response(data: bytes, method: str = "GET") -> Response:
    """Parse the first HTTP response in ``data``; raise if it is not well formed."""
    resp = http.client.HTTPResponse(_BytesSocket(data), method=method)  # type: ignore[arg-type]
    resp.begin()
    return _from_http_client(resp)


def raw_exchange(
    port: int, data: bytes, host: str = HOST, timeout: float = 5.0, *, half_close: bool = True
) -> bytes:
    """Send ``data`` on a new connection; everything received until the server
    closes it (send ``Connection: close`` so that it does).

    A connection reset by the server counts as the end of what it sent. With
    ``half_close`` the client shuts its side for writing after ``data``;
    uvicorn takes that for a client gone if it comes before the answer (a
    page that awaits a store over the network), and sends none.
    """
    received = bytearray()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError as exc:
                raise TimeoutError(
                    f"the server neither answered nor closed in {timeout} s; "
                    f"got {bytes(received)[:200]!r}"
                ) from exc
            if not chunk:
                break
            received += chunk
    return bytes(received)


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
        env={**os.environ, "OPENSSL_CONF": os.devnull},
    )
    return cert, key
