"""bench/protocol_micro.py: each case drives the real protocol object and gets an
answer per request (the touch case's requests carry a live session's cookie)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import protocol_micro  # noqa: E402


@pytest.mark.parametrize("case", protocol_micro.CASES)
def test_each_case_answers_every_request_and_reports_cpu_per_request(case: str) -> None:
    figures = asyncio.run(protocol_micro.run_case(case, requests=50, rounds=2))
    assert len(figures) == 2
    assert all(figure > 0 for figure in figures)


def test_the_touch_case_keeps_one_session() -> None:
    """Touch requests name the session the first request made: no new cookie is set
    (each response is written at the end of the loop's turn: the test lets one pass)."""

    async def scenario() -> bytes:
        protocol = protocol_micro.make_protocol("lapse touch")
        transport = protocol_micro.KeepingTransport()
        protocol.connection_made(transport)
        protocol.data_received(protocol_micro.GET)
        await asyncio.sleep(0)
        first, transport.last = transport.last, b""
        cookie = first.split(b"set-cookie: ")[1].split(b";")[0]
        protocol.data_received(
            protocol_micro.GET.replace(b"\r\n\r\n", b"\r\nCookie: " + cookie + b"\r\n\r\n")
        )
        await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport.last

    answer = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"set-cookie" not in answer
