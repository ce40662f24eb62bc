"""bench/cpu_profile.py's summary: each py-spy sample goes to the layer of its innermost
frame; a line that calls ``transport.write`` is the send syscall below it, in lapse's
protocol and in uvicorn's alike; a sample inside ``Site._serve_now`` (the answer given in
the parser's callback) counts as inside the site, as one inside ``Site.__call__`` does."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import uvicorn  # noqa: E402

from bench.cpu_profile import WRITE, layer, summarise  # noqa: E402

NOW = REPO / "src" / "lapse" / "internet" / "_http_now.py"
TURN = REPO / "src" / "lapse" / "internet" / "_turn.py"
UVICORN_HTTP = Path(uvicorn.__file__).parent / "protocols" / "http" / "httptools_impl.py"


def line_with(path: Path, text: str) -> int:
    """The number of the first line of ``path`` that contains ``text``."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if text in line:
            return number
    raise AssertionError(f"no {text!r} in {path}")


def frame(function: str, path: Path | str, line: int) -> str:
    return f"{function} ({path}:{line})"


def test_a_line_calling_transport_write_is_the_socket_write_in_lapse_and_in_uvicorn() -> None:
    """The send syscall has no Python frame: the line that calls transport.write is it,
    whichever server's; the line before it in the same function is not."""
    at = line_with(TURN, "self._transport.write(held)")
    assert layer(frame("TurnTransport.release", TURN, at)) == WRITE
    assert layer(frame("TurnTransport.release", TURN, at - 1)).startswith("lapse's HTTP edge")
    uv = line_with(UVICORN_HTTP, "self.transport.write(")
    assert layer(frame("RequestResponseCycle.send", UVICORN_HTTP, uv)) == WRITE


def test_frames_go_to_lapse_s_edge_site_sessions_uvicorn_the_loop_or_the_app() -> None:
    """Each of lapse's packages is a layer of its own, found by where the lapse package
    is (not by a "lapse" in the path); the reactor's run() is the loop's."""
    src = REPO / "src" / "lapse"
    assert layer(frame("Site._serve_now", src / "web" / "server.py", 1)).startswith("lapse's site")
    assert layer(frame("LocalKeeper.load_now", src / "sessions" / "_local.py", 1)).startswith(
        "lapse's sessions"
    )
    assert layer(frame("AsyncioReactor.run", src / "internet" / "_asyncio.py", 1)).startswith(
        "event loop"
    )
    assert layer(frame("HttpToolsProtocol.data_received", UVICORN_HTTP, 1)).startswith("uvicorn")
    assert layer(frame("Logger.isEnabledFor", "/usr/lib/python3.11/logging/__init__.py", 1)) == (
        "other (standard library)"
    )
    assert layer(frame("render_GET", "/tmp/x/seed.py", 1)).startswith("the app itself")
    # A checkout in a directory named lapse: its virtualenv's packages are not lapse's.
    elsewhere = "/home/me/lapse/.venv/lib/python3.11/site-packages"
    uvicorn_there = f"{elsewhere}/uvicorn/protocols/http/httptools_impl.py"
    assert layer(frame("HttpToolsProtocol.on_url", uvicorn_there, 1)).startswith("uvicorn")


def test_the_summary_gives_shares_by_layer_and_counts_serve_now_as_inside_the_site(
    tmp_path: Path,
) -> None:
    """Three samples of four in the site (two under _serve_now, one under __call__), one
    of them at the write line, one in the loop alone: the shares and the in-site figure
    follow from the counts."""
    write = frame("TurnTransport.release", TURN, line_with(TURN, "self._transport.write(held)"))
    site = frame("Site._serve_now", REPO / "src" / "lapse" / "web" / "server.py", 1)
    call = frame("Site.__call__", REPO / "src" / "lapse" / "web" / "server.py", 2)
    loop = frame("AsyncioReactor.run", REPO / "src" / "lapse" / "internet" / "_asyncio.py", 1)
    raw = tmp_path / "profile.txt"
    raw.write_text(f"{loop};{site} 1\n{loop};{site};{write} 1\n{loop};{call} 1\n{loop} 1\n")
    lines = summarise(raw, 5)
    text = "\n".join(lines)
    assert "Samples: 4" in text
    assert f"| {WRITE} | 25.0 % |" in lines
    assert any(line.startswith("| event loop") and line.endswith("| 25.0 % |") for line in lines)
    assert any(line.startswith("| lapse's site") and line.endswith("| 50.0 % |") for line in lines)
    assert "75.0 % of samples" in text


def test_a_frame_whose_path_is_no_files_is_placed_by_its_path_not_a_crash() -> None:
    """py-spy sometimes reports a garbled path (a NUL byte in it): the frame still gets
    a layer (not the socket write), and summarising does not stop there."""
    assert layer("f (/tmp/x\x00y.py:3)") != WRITE
