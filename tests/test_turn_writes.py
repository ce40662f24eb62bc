"""What is written to a connection is held until the end of the event loop's turn and
then written (src/lapse/internet/_turn.py, TurnTransport): one write per connection
per turn, and nothing that writes to or ends the connection before then may overtake
it or lose it.

These drive lapse's real protocol object (the one its reactor gives uvicorn) on a
real uvloop loop, through a transport that records what it is asked to do, so that
the order of writes and closes can be seen; tests/test_serve_now.py and
tests/test_http_edge.py see the same over real sockets."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
import uvloop

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.protocol_micro import GET, KeepingTransport, make_protocol  # noqa: E402
from lapse.internet._turn import TurnTransport  # noqa: E402


class Recording(KeepingTransport):
    """What the protocol asked of the transport, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, bytes]] = []

    def write(self, data: bytes) -> None:
        if self.closing:
            raise AssertionError("written after close")
        super().write(data)
        self.events.append(("write", bytes(data)))

    def close(self) -> None:
        super().close()
        self.events.append(("close", b""))

    def abort(self) -> None:
        self.closing = True
        self.events.append(("abort", b""))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.events.append(("write_eof", b""))

    def set_protocol(self, protocol: Any) -> None:
        self.events.append(("set_protocol", b""))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    def statuses(self) -> list[bytes]:
        """The status lines written, in order."""
        written = b"".join(data for kind, data in self.events if kind == "write")
        return [line.split(b"\r\n")[0] for line in written.split(b"HTTP/1.1 ")[1:]]


def run(scenario: Any) -> Any:
    return uvloop.run(scenario())


async def next_turn() -> None:
    await asyncio.sleep(0)


def connected(case: str = "lapse create") -> tuple[Any, Recording]:
    protocol = make_protocol(case)
    transport = Recording()
    protocol.connection_made(transport)
    return protocol, transport


def test_a_response_answered_now_is_written_at_the_end_of_the_turn_once_per_connection() -> None:
    """Two connections whose requests arrive in one turn: both are answered in
    their read's callback, neither is written then; when the turn ends each
    connection gets one write, its own response."""

    async def scenario() -> tuple[list[Any], list[Any]]:
        first, one = connected()
        second, two = connected()
        first.data_received(GET)
        second.data_received(GET)
        during = [one.kinds(), two.kinds()]
        await next_turn()
        return during, [one.statuses(), two.statuses(), one.kinds(), two.kinds()]

    during, after = run(scenario)
    assert during == [[], []]
    assert after == [[b"200 OK"], [b"200 OK"], ["write"], ["write"]]


def test_pipelined_responses_of_one_read_go_out_in_one_write_in_order() -> None:
    """Three requests in one read: one write, the three responses in the order asked."""

    async def scenario() -> Recording:
        protocol, transport = connected()
        protocol.data_received(
            GET + GET.replace(b"/logme", b"/nowhere") + GET.replace(b"GET", b"HEAD")
        )
        await next_turn()
        return transport

    transport = run(scenario)
    assert transport.kinds() == ["write"]
    assert transport.statuses() == [b"200 OK", b"404 Not Found", b"200 OK"]


def test_a_flood_of_pipelined_requests_is_not_held_past_the_flow_control_mark() -> None:
    """A read of 2,000 pipelined requests: what is held never passes 64 KiB
    (the rest is written as it comes, in order), and every one is answered."""
    from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

    async def scenario() -> tuple[Recording, int]:
        protocol, transport = connected()
        protocol.data_received(GET * 2000)
        held = protocol.transport.get_write_buffer_size()
        await next_turn()
        return transport, held

    transport, held = run(scenario)
    assert held <= HIGH_WATER_LIMIT
    assert len(transport.statuses()) == 2000
    assert 1 < transport.kinds().count("write") < 2000


@pytest.mark.parametrize(
    "ending",
    [
        "timeout_keep_alive_handler",
        "shutdown",
        "eof_received",
    ],
)
def test_what_ends_the_connection_in_the_same_turn_writes_the_held_response_first(
    ending: str,
) -> None:
    """The keep-alive timer ringing (a loop stalled past it), a graceful
    shutdown, or the client's end of stream, before the turn ends: the held
    response is written, then the connection closes (never closed with the
    response still held, which would lose it)."""

    async def scenario() -> Recording:
        protocol, transport = connected()
        protocol.data_received(GET)
        getattr(protocol, ending)()
        if ending == "eof_received":
            transport.close()  # (the loop closes its transport when that returns None)
        await next_turn()
        return transport

    transport = run(scenario)
    assert transport.statuses() == [b"200 OK"]
    assert transport.kinds() == ["write", "close"]


def test_a_malformed_request_after_an_answered_one_gets_its_400_after_that_answer() -> None:
    """A good request and garbage in one read: the 200 first, then the 400, then the close."""

    async def scenario() -> Recording:
        protocol, transport = connected()
        protocol.data_received(GET + b"NOT HTTP AT ALL\r\n\r\n")
        await next_turn()
        return transport

    transport = run(scenario)
    assert transport.statuses()[:2] == [b"200 OK", b"400 Bad Request"]
    assert transport.kinds()[-1] == "close"


def test_a_head_too_large_after_an_answered_request_is_refused_after_that_answer() -> None:
    """A good request and, in the same read, a head over the budget: 200, then
    431, then the sending side shut (the refusal's linger)."""

    async def scenario() -> Recording:
        protocol, transport = connected()
        flood = b"GET / HTTP/1.1\r\nHost: x\r\nX-Flood: " + b"a" * (3 * protocol._head_limit)
        protocol.data_received(GET + flood)
        await next_turn()
        return transport

    transport = run(scenario)
    assert transport.statuses() == [b"200 OK", b"431 Request Header Fields Too Large"]
    assert transport.kinds() == ["write", "write_eof"]


def test_a_client_gone_before_the_turn_ends_gets_nothing_written_and_no_error() -> None:
    """The connection is lost (reset) after its request was answered and before
    the turn ends: nothing is written to the closed transport, nothing raises."""

    async def scenario() -> Recording:
        protocol, transport = connected()
        protocol.data_received(GET)
        transport.closing = True
        protocol.connection_lost(ConnectionResetError())
        await next_turn()
        return transport

    transport = run(scenario)
    assert transport.events == []


def test_abort_drops_what_is_held() -> None:
    async def scenario() -> Recording:
        protocol, transport = connected()
        protocol.data_received(GET)
        protocol.transport.abort()
        await next_turn()
        return transport

    assert run(scenario).kinds() == ["abort"]


def test_a_response_that_ends_the_connection_is_written_and_closed_at_once() -> None:
    """``Connection: close``: written in the callback, after what was held (in
    one write), then closed."""

    async def scenario() -> list[str]:
        protocol, transport = connected()
        protocol.data_received(GET + GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        return transport.kinds()

    assert run(scenario) == ["write", "close"]


def test_the_protocol_writes_through_the_turn_transport_and_uvicorns_cycle_does_too() -> None:
    """A request uvicorn's task answers (an upgrade-less POST of an unknown
    length) writes through the same transport, so it cannot overtake a held one."""

    async def scenario() -> tuple[bool, list[bytes]]:
        protocol, transport = connected()
        chunked = (
            b"POST /logme HTTP/1.1\r\nHost: bench\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
        )
        protocol.data_received(GET + chunked)
        wrapped = type(protocol.transport) is TurnTransport
        for _ in range(5):
            await next_turn()
        return wrapped, transport.statuses()

    wrapped, statuses = run(scenario)
    assert wrapped
    assert statuses[0] == b"200 OK"
    assert len(statuses) == 2


def test_an_upgrade_behind_an_answered_request_writes_that_answer_before_handing_over() -> None:
    """A page request and a WebSocket handshake in one read: before the connection
    goes to the WebSocket protocol the held answer is written, and that protocol
    gets the transport itself (its own writes need no holding)."""

    async def scenario() -> tuple[list[str], Any, Recording]:
        protocol, transport = connected()
        protocol.data_received(
            GET + b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        at_handover = transport.kinds()
        upgraded = protocol.transport
        for _ in range(5):
            await next_turn()
        return at_handover, upgraded, transport

    at_handover, upgraded, transport = run(scenario)
    assert at_handover == ["write", "set_protocol"]
    assert transport.statuses()[0] == b"200 OK"
    assert upgraded is transport


def test_a_response_uvicorns_task_writes_goes_out_in_one_write_at_the_end_of_the_turn() -> None:
    """A request served by a task (a chunked body; the page has no POST, so
    405): its head and body, which uvicorn writes apart, reach the socket as
    one write."""

    async def scenario() -> Recording:
        protocol, transport = connected()
        protocol.data_received(
            b"POST /logme HTTP/1.1\r\nHost: bench\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
        )
        for _ in range(5):
            await next_turn()
        return transport

    transport = run(scenario)
    assert transport.statuses() == [b"405 Method Not Allowed"]
    assert transport.kinds() == ["write"]


def test_a_buffer_written_and_then_reused_by_its_writer_goes_out_as_it_was() -> None:
    """A writer that hands the transport a bytearray and then changes it: what
    is written later is what was handed over (the held bytes are a copy)."""

    async def scenario() -> Recording:
        protocol, transport = connected()
        buffer = bytearray(b"first")
        protocol.transport.write(buffer)
        buffer[:] = b"XXXXX"
        protocol.transport.writelines([b" then", bytearray(b" more")])
        await next_turn()
        return transport

    assert run(scenario).events == [("write", b"first then more")]
