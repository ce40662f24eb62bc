"""Bad input over a real socket to a lapse server running in a subprocess.

Every test checks two things: the server answers the input with a
well-formed HTTP response (4xx where the input is an error, 200 where it is
acceptable), and afterwards a normal request on a new connection still gets
200: the server keeps serving.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import pytest
from _servers import (
    Response,
    ServerProcess,
    free_port,
    parse_response,
    raw_exchange,
    request,
    running_server,
    write_script,
)

APP = '''
import sys

from lapse.internet import reactor
from lapse.web.resource import Resource
from lapse.web.server import Site


class SessionPage(Resource):
    isLeaf = True

    def render_GET(self, request):
        return request.getSession().uid


class Echo(Resource):
    """The length of the request body, as read by the resource."""

    isLeaf = True

    def render_GET(self, request):
        return str(len(request.content.read()))

    render_POST = render_GET


class Page(Resource):
    def render_GET(self, request):
        return "this is the page"


class Args(Resource):
    isLeaf = True

    def render_GET(self, request):
        return "%d args" % sum(len(v) for v in request.args.values())


root = Resource()
root.putChild("session", SessionPage())
root.putChild("echo", Echo())
root.putChild("page", Page())
root.putChild("args", Args())
site = Site(root, max_body_size=1024)
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
reactor.run()
'''

PAGE_BODY = b"this is the page"
UID = re.compile(r"[A-Za-z0-9_-]{24}")
SESSION_COOKIE = re.compile(r"^lapse_session=([^;]*)(;|$)")


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The port of one lapse server (max_body_size=1024) for the whole module."""
    directory = tmp_path_factory.mktemp("bad_input")
    script = write_script(directory, "app.py", APP)
    server_port = free_port()
    with running_server(script, server_port, args=[str(server_port)]) as server:
        yield server_port
        _assert_alive(server)


def _assert_alive(server: ServerProcess) -> None:
    assert server.proc is not None
    assert server.proc.poll() is None, f"the server died:\n{server.stderr_text()}"
    assert "Traceback" not in server.stderr_text(), server.stderr_text()


def raw(port: int, head: bytes, body: bytes = b"", method: str = "GET") -> Response:
    """Send ``head`` (request line and headers, no final blank line) and
    ``body`` as they are; parse the answer, which must be well-formed HTTP."""
    data = head + b"\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" + body
    return parse_response(raw_exchange(port, data), method=method)


def assert_still_serving(port: int) -> None:
    """A normal request on a new connection gets 200 and the page."""
    response = request(port, "/page")
    assert response.status == 200
    assert response.body == PAGE_BODY


def new_session_uid(response: Response) -> str:
    """The uid of the one fresh session cookie the response sets."""
    cookies = response.header_all("set-cookie")
    assert len(cookies) == 1, cookies
    match = SESSION_COOKIE.match(cookies[0])
    assert match is not None, cookies[0]
    uid = match.group(1)
    assert UID.fullmatch(uid), uid
    assert response.text == uid
    return uid


# -- cookies ----------------------------------------------------------------


@pytest.mark.parametrize(
    "cookie",
    [
        pytest.param(b";;;=; lapse_session", id="separators-only"),
        pytest.param(b'lapse_session="unterminated', id="unterminated-quote"),
        pytest.param(b"lapse_session=\xff\xfe\xfd\x80", id="non-utf8"),
        pytest.param(b"lapse_session=\xc3(\xa0\xa1; other=\xff", id="invalid-utf8-seq"),
        pytest.param(b"lapse_session=", id="empty-value"),
        pytest.param(b"lapse_session==" + b"a" * 24, id="value-starting-with-equals"),
    ],
)
def test_malformed_cookie_gets_200_and_a_fresh_session(port: int, cookie: bytes) -> None:
    """A malformed Cookie header is not an error: 200, and a fresh session
    (a new Set-Cookie with a well-formed uid), never one adopting the value."""
    response = raw(port, b"GET /session HTTP/1.1\r\nCookie: " + cookie)
    assert response.status == 200
    uid = new_session_uid(response)
    assert uid.encode("latin-1") not in cookie
    assert_still_serving(port)


def test_cookie_of_1000_random_bytes_gets_a_fresh_session(port: int) -> None:
    """A session cookie whose value is 1000 random bytes (printable ASCII and
    bytes >= 0x80, anything an HTTP parser lets through) gets 200 and a fresh
    session, not one named by those bytes."""
    rng = random.Random(20261125)
    alphabet = bytes([*range(0x20, 0x7F), *range(0x80, 0x100)])
    value = bytes(rng.choice(alphabet) for _ in range(1000))
    response = raw(port, b"GET /session HTTP/1.1\r\nCookie: lapse_session=" + value)
    assert response.status == 200
    uid = new_session_uid(response)
    assert uid.encode("ascii") not in value
    assert_still_serving(port)


def test_control_bytes_in_cookie_are_a_400_from_the_http_parser(port: int) -> None:
    """Control bytes in a header value are refused by the HTTP parser itself
    (uvicorn's 400); the server keeps serving."""
    response = raw(port, b"GET /session HTTP/1.1\r\nCookie: lapse_session=\x01\x02\x7f")
    assert response.status == 400
    assert response.header("set-cookie") is None
    assert_still_serving(port)


def test_unknown_well_formed_uid_gets_a_different_fresh_uid(port: int) -> None:
    """A cookie naming a well-formed uid the server never issued: 200 and a
    new, different uid (the server does not adopt client-chosen uids)."""
    forged = "0123456789abcdef_-ABCDEF"
    response = request(port, "/session", headers={"Cookie": f"lapse_session={forged}"})
    assert response.status == 200
    uid = new_session_uid(response)
    assert uid != forged
    # The issued uid is honoured on the next visit: no new cookie, same uid.
    again = request(port, "/session", headers={"Cookie": f"lapse_session={uid}"})
    assert again.status == 200
    assert again.text == uid
    assert again.header("set-cookie") is None
    assert_still_serving(port)


def test_cookie_header_over_8_kib_is_431(port: int) -> None:
    """A Cookie header over 8 KiB is answered 431, and no session is made."""
    response = raw(port, b"GET /session HTTP/1.1\r\nCookie: lapse_session=" + b"a" * (8 * 1024 + 1))
    assert response.status == 431
    assert response.header("set-cookie") is None
    assert_still_serving(port)


# -- paths ------------------------------------------------------------------


def test_raw_non_utf8_bytes_in_path_are_a_4xx(port: int) -> None:
    """``GET /\\xff\\xfe`` sent raw: a well-formed 4xx (uvicorn refuses the
    non-ASCII target with 400), not a 500 or a dropped connection."""
    response = raw(port, b"GET /\xff\xfe HTTP/1.1")
    assert response.status in (400, 404)
    assert response.status == 400  # what it gives today: uvicorn's parser refuses it
    assert_still_serving(port)


def test_percent_encoded_non_utf8_path_is_a_404(port: int) -> None:
    """``GET /%ff%fe``: the segment decodes to bytes that are not UTF-8, and
    there is no such child: 404 (not a 500)."""
    response = raw(port, b"GET /%ff%fe HTTP/1.1")
    assert response.status in (400, 404)
    assert response.status == 404  # what it gives today
    assert_still_serving(port)


def test_dot_dot_segment_is_resolved_like_a_browser(port: int) -> None:
    """``GET /a/../page`` sent raw is resolved as RFC 3986 says: /page."""
    response = raw(port, b"GET /a/../page HTTP/1.1")
    assert response.status == 200
    assert response.body == PAGE_BODY
    assert_still_serving(port)


def test_dot_dot_above_the_root_stays_at_the_root(port: int) -> None:
    """``GET /../../page``: climbing above the root stays at the root: /page."""
    response = raw(port, b"GET /../../page HTTP/1.1")
    assert response.status == 200
    assert response.body == PAGE_BODY
    assert_still_serving(port)


@pytest.mark.parametrize(
    "target",
    [b"/a/%2e%2e/page", b"/%2E%2E/page", b"/a/%2e/page", b"/.%2e/page"],
    ids=["lower", "upper", "single-dot", "mixed"],
)
def test_encoded_dot_segments_are_400(port: int, target: bytes) -> None:
    """Percent-encoded dot segments (``%2e%2e``) are a traversal attempt: 400."""
    response = raw(port, b"GET " + target + b" HTTP/1.1")
    assert response.status == 400
    assert_still_serving(port)


def test_encoded_slash_stays_inside_its_segment(port: int) -> None:
    """``/pa%2Fge`` is one segment named ``pa/ge``, not ``pa`` then ``ge``: 404."""
    response = raw(port, b"GET /pa%2Fge HTTP/1.1")
    assert response.status == 404
    assert_still_serving(port)


# -- headers, URI, body -----------------------------------------------------


def test_non_utf8_bytes_in_a_header_value_are_accepted(port: int) -> None:
    """``User-Agent: \\xff\\xfe`` is obs-text, not an error: 200."""
    response = raw(port, b"GET /page HTTP/1.1\r\nUser-Agent: \xff\xfe")
    assert response.status == 200
    assert response.body == PAGE_BODY
    assert_still_serving(port)


def test_uri_over_16_kib_is_414(port: int) -> None:
    """A query string that makes the URI longer than 16 KiB: 414."""
    query = b"&".join(b"a%d=%d" % (i, i) for i in range(3000))
    assert len(query) > 16 * 1024
    response = raw(port, b"GET /args?" + query + b" HTTP/1.1")
    assert response.status == 414
    assert_still_serving(port)


def test_large_allowed_query_string_is_served(port: int) -> None:
    """A ~8 KiB query string with many arguments (under the limit): 200, and
    the resource sees every argument."""
    query = "&".join(f"k{i}=v{i}" for i in range(800))
    assert 7 * 1024 < len(query) < 10 * 1024
    response = request(port, "/args?" + query)
    assert response.status == 200
    assert response.text == "800 args"
    assert_still_serving(port)


@pytest.mark.parametrize(
    ("query", "count"),
    [
        (b"q=caf%C3%A9", 1),
        (b"q=%ff%fe&%e9=1", 2),
        (b"q=%E2%82%AC+%F0%9F%98%80&q=%", 2),
        (b"%C3%A9=%C3%A9&a&b=", 3),
    ],
    ids=["utf8", "latin1", "emoji-and-stray-percent", "non-ascii-key-and-blanks"],
)
def test_non_ascii_query_is_read_as_bytes(port: int, query: bytes, count: int) -> None:
    """Percent-encoded non-ASCII query data, UTF-8 or not: 200, and the
    resource reads every argument from request.args (bytes, as Twisted)."""
    response = raw(port, b"GET /args?" + query + b" HTTP/1.1")
    assert response.status == 200
    assert response.text == f"{count} args"
    assert_still_serving(port)


def test_body_on_get_is_readable_by_the_resource(port: int) -> None:
    """A GET with ``Content-Length: 5`` and body ``hello``: 200, and the
    resource reads the 5 bytes from ``request.content``."""
    response = raw(port, b"GET /echo HTTP/1.1\r\nContent-Length: 5", body=b"hello")
    assert response.status == 200
    assert response.text == "5"
    assert_still_serving(port)


def test_body_within_max_body_size_is_read(port: int) -> None:
    """A POST body of exactly max_body_size (1024) bytes is accepted and read."""
    response = request(port, "/echo", method="POST", body=b"x" * 1024)
    assert response.status == 200
    assert response.text == "1024"
    assert_still_serving(port)


def test_body_over_max_body_size_is_413(port: int) -> None:
    """A Content-Length over the site's max_body_size (1024): 413."""
    response = raw(
        port, b"POST /echo HTTP/1.1\r\nContent-Length: 2000", body=b"x" * 2000, method="POST"
    )
    assert response.status == 413
    assert_still_serving(port)


def test_chunked_body_over_max_body_size_is_413(port: int) -> None:
    """A chunked body (no Content-Length) that grows past max_body_size: 413."""
    body = b"7d0\r\n" + b"x" * 2000 + b"\r\n0\r\n\r\n"
    response = raw(
        port, b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked", body=body, method="POST"
    )
    assert response.status == 413
    assert_still_serving(port)


def test_non_numeric_content_length_is_400(port: int) -> None:
    """``Content-Length: abc`` is refused with a well-formed 400 (by the HTTP
    parser or by the site)."""
    response = raw(port, b"POST /echo HTTP/1.1\r\nContent-Length: abc", method="POST")
    assert response.status == 400
    assert_still_serving(port)


# -- methods ----------------------------------------------------------------


def test_unsupported_method_is_405_with_allow(port: int) -> None:
    """DELETE on a resource with only render_GET: 405, ``Allow: GET, HEAD``."""
    response = raw(port, b"DELETE /page HTTP/1.1")
    assert response.status == 405
    assert response.header("allow") == "GET, HEAD"
    assert_still_serving(port)


def test_head_on_a_get_resource_has_the_get_length_and_no_body(port: int) -> None:
    """HEAD on a GET resource: 200, Content-Length of the GET body, no body
    (the raw bytes end right after the headers)."""
    data = raw_exchange(
        port, b"HEAD /page HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert data.endswith(b"\r\n\r\n"), data
    response = parse_response(data, method="HEAD")
    assert response.status == 200
    assert response.header("content-length") == str(len(PAGE_BODY))
    assert response.body == b""
    assert_still_serving(port)


# -- not HTTP at all --------------------------------------------------------


def test_garbage_that_is_not_http_is_400_or_closed(port: int) -> None:
    """Bytes that are not HTTP: a 400 from uvicorn, or a closed connection;
    either way the server keeps serving."""
    data = raw_exchange(port, b"\x00\x01\x02 garbage\r\n\r\n")
    if data:
        assert parse_response(data).status == 400
    assert_still_serving(port)


def test_server_survived_every_input(port: int) -> None:
    """After all the above, the server still serves sessions."""
    response = request(port, "/session")
    assert response.status == 200
    uid = new_session_uid(response)
    assert request(port, "/session", headers={"Cookie": f"lapse_session={uid}"}).text == uid
