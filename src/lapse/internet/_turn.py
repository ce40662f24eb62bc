"""A connection's transport whose writes wait for the end of the event loop's turn.

lapse's protocol answers most of a ``Site``'s requests in the parser's
callback (``_http_now.py``), and under load one turn of the loop reads the
requests of many connections (about 35 under wrk's 50 connections). Written
at once, each response's system call ran the loopback's whole send and
receive path, and woke the client, between two requests' Python, which then
ran on cold caches: ``strace`` showed read, write, read, write, where
uvicorn's own protocol (whose tasks run after the turn's reads) shows the
turn's reads, then its writes. :class:`TurnTransport` holds what is written
to a connection, by lapse's protocol or by uvicorn's task on the ASGI path,
until the end of the turn, then writes it in one write. On the seed's touch
under wrk -c50 (bench/rate_cost.py, this machine) that took lapse from 15k
to 24-25k requests/s, its user time per request from 44 to 31 µs and its
kernel time from 20-23 to 9-10 µs; on the Redis store, where uvicorn's
cycle writes each response's head and body apart, about a fifth more
requests/s.

What ends the connection (``close``, ``write_eof``; the protocol also
releases at the client's end of stream and before a WebSocket upgrade)
writes what is held first, so the connection's bytes keep their order.
What is held never grows past 64 KiB (the flow control's high-water mark:
a client pipelining thousands of requests): a write that would take it
past that is written at once, after what was held. A single write of more
than that, with nothing held, is held as it is (no copy) until the turn
ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

__all__ = ["TurnTransport"]


class TurnTransport(asyncio.Transport):
    """A connection's transport whose writes wait for the end of the event
    loop's turn (module doc).

    ``write`` (and ``writelines``) keeps the bytes and, the first time in a
    turn, asks the loop to call :meth:`release`
    (``call_soon``: after the callbacks of the turn's reads and the task
    steps it runs). ``write_eof``, ``close`` and :meth:`release` itself write
    what is held first; ``abort`` drops it. The rest is the transport's own.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: bytes | bytearray | None = None

    @property
    def inner(self) -> asyncio.Transport:
        """The transport this one writes to."""
        return self._transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at the end of this turn (at once, after what is
        held, if that would hold more than the flow control's high-water
        mark: a client that pipelines thousands of requests)."""
        if type(data) is not bytes:
            data = bytes(data)  # (a copy: the caller may reuse its buffer)
        held = self._held
        if held is None:
            self._held = data
            self._loop.call_soon(self.release)
        elif len(held) + len(data) > HIGH_WATER_LIMIT:
            self.release()
            self._transport.write(data)
        else:  # (pipelined requests: appended, not copied each time)
            if type(held) is bytes:
                self._held = held = bytearray(held)
            held += data

    def release(self) -> None:
        """Write what is held now (nothing if the connection is closing: its
        client is gone)."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        self.release()
        self._transport.write_eof()

    def close(self) -> None:
        self.release()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def get_write_buffer_size(self) -> int:
        held = self._held
        return self._transport.get_write_buffer_size() + (0 if held is None else len(held))
