"""Traversal and rendering: children, methods, return types, errors, streaming."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from conftest import Leaf, call, call_async

from lapse.internet.error import ConnectionDone
from lapse.internet.task import Clock
from lapse.web.resource import ErrorPage, NoResource, Resource
from lapse.web.server import NOT_DONE_YET, Site


def site_for(root: Any) -> Site:
    return Site(root, reactor=Clock())


def test_put_child_accepts_str_and_bytes() -> None:
    """putChild with a str path and with a bytes path serve the same segment."""
    root = Resource()
    root.putChild("text", Leaf(b"from str"))
    root.putChild(b"bytes", Leaf(b"from bytes"))
    site = site_for(root)
    assert call(site, "GET", "/text").body == b"from str"
    assert call(site, "GET", "/bytes").body == b"from bytes"
    assert root.children.keys() == {b"text", b"bytes"}


def test_put_child_with_non_path_is_type_error() -> None:
    """putChild refuses a path that is neither str nor bytes."""
    with pytest.raises(TypeError):
        Resource().putChild(3, Leaf())  # type: ignore[arg-type]


def test_unicode_child_is_utf8_segment() -> None:
    """A str child with non-ASCII characters answers its percent-encoded UTF-8 path."""
    root = Resource()
    root.putChild("caf\u00e9", Leaf(b"coffee"))
    assert call(site_for(root), "GET", "/caf%C3%A9").body == b"coffee"


def test_unknown_child_is_404_page() -> None:
    """An unknown child is a 404 with a short HTML page."""
    response = call(site_for(Resource()), "GET", "/missing")
    assert response.status == 404
    assert b"No Such Resource" in response.body
    assert response.header(b"content-type") == b"text/html; charset=utf-8"


def test_nested_traversal_sets_prepath_and_postpath() -> None:
    """Traversal walks segment by segment; a leaf receives the rest as postpath."""
    seen: dict[str, Any] = {}

    class Tail(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            seen["prepath"], seen["postpath"] = list(request.prepath), list(request.postpath)
            return b""

    root, mid = Resource(), Resource()
    root.putChild("a", mid)
    mid.putChild("b", Tail())
    call(site_for(root), "GET", "/a/b/c/d")
    assert seen == {"prepath": [b"a", b"b"], "postpath": [b"c", b"d"]}


def test_get_child_for_dynamic_children() -> None:
    """getChild makes children that are not static."""

    class Dynamic(Resource):
        def getChild(self, path: bytes, request: Any) -> Any:
            return Leaf(b"dynamic " + path)

    assert call(site_for(Dynamic()), "GET", "/anything").body == b"dynamic anything"


def test_method_without_handler_is_405_with_allow() -> None:
    """A method with no render_ method is answered 405 with an Allow header."""

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            return b"x"

        def render_POST(self, request: Any) -> bytes:
            return b"x"

    response = call(site_for(Page()), "DELETE", "/")
    assert response.status == 405
    assert response.header(b"allow") == b"GET, POST, HEAD"


def test_head_is_answered_from_get_without_body() -> None:
    """HEAD runs render_GET; the answer has GET's Content-Length and no body."""
    response = call(site_for(Leaf(b"twelve bytes")), "HEAD", "/")
    assert response.status == 200
    assert response.body == b""
    assert response.header(b"content-length") == b"12"


def test_str_body_is_sent_as_utf8() -> None:
    """A render that returns str sends it encoded as UTF-8."""
    response = call(site_for(Leaf("h\u00e9llo \u2603")), "GET", "/")
    assert response.body == "h\u00e9llo \u2603".encode()
    assert response.header(b"content-length") == str(len(response.body)).encode()


def test_render_exception_is_500_with_traceback_only_in_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A render that raises gives a short 500 page; the traceback goes to the log only."""

    class Broken(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader("x-partial", "yes")
            raise ValueError("secret internals")

    with caplog.at_level(logging.ERROR, logger="lapse.web"):
        response = call(site_for(Broken()), "GET", "/")
    assert response.status == 500
    assert b"secret internals" not in response.body
    assert b"Traceback" not in response.body
    assert response.header(b"x-partial") is None
    (record,) = caplog.records
    assert record.exc_info is not None and "secret internals" in str(record.exc_info[1])


@pytest.mark.parametrize("result", [None, 5, {"a": 1}, ["x"], 1.5])
def test_render_returning_wrong_type_is_500_naming_resource(
    caplog: pytest.LogCaptureFixture, result: Any
) -> None:
    """A render that returns something other than str, bytes or NOT_DONE_YET is a 500,
    with a log line naming the resource."""

    class Odd(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> Any:
            return result

        def __repr__(self) -> str:
            return "<Odd resource>"

    with caplog.at_level(logging.ERROR, logger="lapse.web"):
        response = call(site_for(Odd()), "GET", "/")
    assert response.status == 500
    assert any("<Odd resource>" in r.getMessage() for r in caplog.records)


def test_async_render_is_awaited() -> None:
    """An async def render_GET is awaited and its result sent."""

    class AsyncPage(Resource):
        isLeaf = True

        async def render_GET(self, request: Any) -> str:
            await asyncio.sleep(0)
            return "awaited " + request.getSession().uid[:4]

    response = call(site_for(AsyncPage()), "GET", "/")
    assert response.body.startswith(b"awaited ")
    assert b"lapse_session" in response.set_cookies


def test_not_done_yet_streams_writes_until_finish() -> None:
    """A render returning NOT_DONE_YET streams what it writes later, then finishes."""

    class Later(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> int:
            loop = asyncio.get_running_loop()
            request.write("first ")
            loop.call_later(0.01, request.write, b"second ")
            loop.call_later(0.02, request.write, "third")
            loop.call_later(0.03, request.finish)
            return NOT_DONE_YET

    response = call(site_for(Later()), "GET", "/")
    assert response.status == 200
    assert response.body == b"first second third"
    bodies = [m for m in response.messages if m["type"] == "http.response.body"]
    assert len(bodies) >= 2
    assert bodies[-1]["more_body"] is False
    assert all(m["more_body"] for m in bodies[:-1])


def test_not_done_yet_finished_before_any_write_sends_empty_body() -> None:
    """NOT_DONE_YET then finish() with no writes sends an empty 200."""

    class Later(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> int:
            asyncio.get_running_loop().call_later(0.01, request.finish)
            return NOT_DONE_YET

    response = call(site_for(Later()), "GET", "/")
    assert (response.status, response.body) == (200, b"")


def test_client_disconnect_fails_notify_finish() -> None:
    """If the client goes away during a NOT_DONE_YET response, notifyFinish
    fails with ConnectionDone and later writes are ignored."""
    outcome: list[Any] = []
    requests: list[Any] = []

    class Hanging(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> int:
            requests.append(request)
            request.notifyFinish().addCallbacks(outcome.append, outcome.append)
            return NOT_DONE_YET

    async def scenario() -> None:
        site = site_for(Hanging())
        messages = [
            {"type": "http.request", "body": b"", "more_body": False},
            {"type": "http.disconnect"},
        ]

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(0.01)
            return messages.pop(0)

        sent: list[Any] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        from conftest import make_scope

        await asyncio.wait_for(site(make_scope(), receive, send), 2)
        requests[0].write(b"too late")  # ignored, no error

    asyncio.run(scenario())
    (failure,) = outcome
    assert failure.check(ConnectionDone)


def test_await_notify_finish() -> None:
    """notifyFinish() can be awaited by async code."""
    done: list[str] = []

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> int:
            async def wait() -> None:
                await request.notifyFinish()
                done.append("finished")

            asyncio.get_running_loop().create_task(wait())
            asyncio.get_running_loop().call_later(0.01, request.finish)
            return NOT_DONE_YET

    async def scenario() -> None:
        await call_async(site_for(Page()))
        await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert done == ["finished"]


def test_query_and_form_args() -> None:
    """request.args holds query arguments and urlencoded form fields, as bytes."""
    seen: dict[bytes, list[bytes]] = {}

    class Form(Resource):
        isLeaf = True

        def render_POST(self, request: Any) -> bytes:
            seen.update(request.args)
            return b""

    call(
        site_for(Form()),
        "POST",
        "/?a=1&a=2&empty=",
        headers=[(b"content-type", b"application/x-www-form-urlencoded")],
        body=b"b=x+y&a=3",
    )
    assert seen == {b"a": [b"1", b"2", b"3"], b"empty": [b""], b"b": [b"x y"]}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"q=caf%C3%A9", {b"q": [b"caf\xc3\xa9"]}),
        (b"q=caf\xc3\xa9", {b"q": [b"caf\xc3\xa9"]}),
        (b"q=%ff%fe", {b"q": [b"\xff\xfe"]}),
        (b"%ff=1&%C3%A9=%e9", {b"\xff": [b"1"], b"\xc3\xa9": [b"\xe9"]}),
        (b"q=\xff\x80&r=%", {b"q": [b"\xff\x80"], b"r": [b"%"]}),
        (b"q=%zz%4&q=%2B+x", {b"q": [b"%zz%4", b"+ x"]}),
        (b"a+b=c+d&flag&e=&&=v", {b"a b": [b"c d"], b"flag": [b""], b"e": [b""], b"": [b"v"]}),
    ],
    ids=[
        "utf8-escaped",
        "utf8-raw",
        "latin1",
        "non-ascii-keys",
        "raw-bytes",
        "bad-escapes",
        "blanks",
    ],
)
def test_args_are_any_bytes_as_twisted_gives_them(
    query: bytes, expected: dict[bytes, list[bytes]]
) -> None:
    """request.args takes any query bytes (UTF-8 or not, escaped or raw, bad
    escapes): bytes keys and values, ``+`` a space, blank values kept, never
    a 500; the same for an urlencoded form body."""
    seen: list[dict[bytes, list[bytes]]] = []

    class Args(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            seen.append(request.args)
            return b""

        render_POST = render_GET

    site = site_for(Args())
    assert call(site, "GET", b"/?" + query).status == 200
    form = [(b"content-type", b"application/x-www-form-urlencoded; charset=utf-8")]
    assert call(site, "POST", b"/", headers=form, body=query).status == 200
    assert seen == [expected, expected]


def test_str_api_on_non_ascii_names_and_paths() -> None:
    """getHeader with a str name no header can have is None (not a 500);
    getCookie takes a non-ASCII str name (UTF-8); prePathURL percent-encodes
    each segment (non-ASCII bytes, an encoded slash) as Twisted does."""
    seen: list[Any] = []

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            seen.extend(
                [
                    request.getHeader("x-\u20ac"),
                    request.getHeader("\u00e9"),
                    request.getCookie("caf\u00e9"),
                    request.prePathURL(),
                ]
            )
            return b""

    root = Resource()
    root.putChild("caf\u00e9", Resource())
    root.children["caf\u00e9".encode()].putChild(b"a/b", Page())
    response = call(
        site_for(root),
        "GET",
        b"/caf%C3%A9/a%2Fb",
        headers=[(b"host", b"example.com:8080"), (b"cookie", b"caf\xc3\xa9=cr\xc3\xa8me")],
    )
    assert response.status == 200
    assert seen == [None, None, "cr\u00e8me", b"http://example.com:8080/caf%C3%A9/a%2Fb"]


def test_body_is_readable_from_content() -> None:
    """request.content holds the request body, also on GET."""

    class Echo(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            return request.content.read()

    assert call(site_for(Echo()), "GET", "/", body=b"hello").body == b"hello"


def test_headers_by_str_and_bytes() -> None:
    """getHeader returns bytes for a bytes name and str for a str name; a value
    that is not UTF-8 still reads (as Latin-1)."""
    seen: list[Any] = []

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            seen.extend(
                [
                    request.getHeader(b"X-Thing"),
                    request.getHeader("x-thing"),
                    request.getHeader("x-raw"),
                    request.getHeader("absent"),
                ]
            )
            return b""

    call(site_for(Page()), headers=[(b"x-thing", b"caf\xc3\xa9"), (b"x-raw", b"\xff")])
    assert seen == [b"caf\xc3\xa9", "caf\u00e9", "\u00ff", None]


def test_set_header_folds_line_breaks() -> None:
    """A header value with CR/LF cannot inject another header."""

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader(b"x-a", b"one\r\nx-injected: yes")
            return b""

    response = call(site_for(Page()))
    assert response.header(b"x-injected") is None
    assert response.header(b"x-a") == b"one x-injected: yes"


def test_response_code_and_cookies() -> None:
    """setResponseCode and addCookie shape the response."""

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setResponseCode(201)
            request.addCookie("theme", "dark", path="/", max_age=60, sameSite="strict")
            return b"made"

    response = call(site_for(Page()))
    assert response.status == 201
    assert response.set_cookies[b"theme"] == b"theme=dark; Path=/; Max-Age=60; SameSite=Strict"


def test_write_after_finish_is_500() -> None:
    """Writing after finish() is a programming error: the request gets a 500."""

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.finish()
            request.write(b"late")
            return b""

    assert call(site_for(Page())).status == 500


def test_error_page_resource() -> None:
    """ErrorPage and NoResource render their status and message at any path."""
    root = Resource()
    root.putChild("gone", ErrorPage(410, "Gone", "It left."))
    root.putChild("none", NoResource("Not here."))
    site = site_for(root)
    gone = call(site, "GET", "/gone/deeper")
    assert gone.status == 410 and b"It left." in gone.body
    assert call(site, "POST", "/none").status == 404


def test_options_star() -> None:
    """OPTIONS * is answered 200 with an empty body."""
    response = call(site_for(Resource()), "OPTIONS", "*")
    assert (response.status, response.body) == (200, b"")


def test_access_log_line_is_combined_format(caplog: pytest.LogCaptureFixture) -> None:
    """Each request logs one access line in the combined log format, escaping quotes."""
    with caplog.at_level(logging.INFO, logger="lapse.access"):
        call(
            site_for(Leaf(b"12345")),
            "GET",
            "/x?y=1",
            headers=[(b"user-agent", b'evil"agent'), (b"referer", b"http://r/")],
        )
    (record,) = caplog.records
    line = record.getMessage()
    assert line.startswith("127.0.0.1 - - [")
    assert line.endswith('] "GET /x?y=1 HTTP/1.1" 200 5 "http://r/" "evil\\"agent"')


def test_many_headers_over_total_budget_is_431() -> None:
    """Headers that are each small but together over max_headers_total get a 431."""
    site = Site(Leaf(b"ok"), reactor=Clock(), max_headers_total=4096)
    headers = [(b"x-filler-%d" % i, b"v" * 500) for i in range(10)]
    assert call(site, headers=headers).status == 431
    assert call(site, headers=headers[:5]).status == 200


def test_access_log_cuts_long_fields(caplog: pytest.LogCaptureFixture) -> None:
    """A huge URI is cut in the access log, so one request cannot flood it."""
    with caplog.at_level(logging.INFO, logger="lapse.access"):
        response = call(site_for(Leaf(b"x")), "GET", "/?" + "a" * 20000)
    assert response.status == 414
    (record,) = caplog.records
    assert len(record.getMessage()) < 2300


class StreamedNow(Resource):
    """A NOT_DONE_YET response finished within the render."""

    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        request.write(b"streamed")
        request.finish()
        return NOT_DONE_YET


def test_a_streamed_response_logs_one_access_line(caplog: pytest.LogCaptureFixture) -> None:
    """A NOT_DONE_YET response is logged once, when it ends (it was logged twice)."""
    with caplog.at_level(logging.INFO, logger="lapse.access"):
        response = call(site_for(StreamedNow()), "GET", "/s")
    assert response.body == b"streamed"
    (record,) = caplog.records
    assert '"GET /s HTTP/1.1" 200 8' in record.getMessage()
