"""The live view's page and routes: the page is package data filled in with
escaped values; every path under the view is a child resource behind one
access check, with JSON 404s and 405s (with ``Allow``) of its own."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from _liveview import TOKEN, get_json, make_site
from conftest import call

from lapse.internet.task import Clock
from lapse.web.liveview import LiveView
from lapse.web.liveview._page import PageTemplate
from lapse.web.resource import Resource
from lapse.web.server import Site

REPO = Path(__file__).resolve().parent.parent


def test_the_page_is_its_files_filled_in(clock: Clock) -> None:
    """The page served is page.html with page.css and page.js inlined, read
    from the package's data; no placeholder is left; the base path (from
    the request's path) is HTML-escaped where it is filled in."""
    root = Resource()
    site = Site(root, reactor=clock)
    root.putChild(b'_la"<b>', LiveView(site))
    page = call(site, "GET", "/_la%22%3Cb%3E/")
    assert page.status == 200
    body = page.body.decode("utf-8")
    folder = resources.files("lapse.web.liveview")
    css = folder.joinpath("page.css").read_text(encoding="utf-8")
    script = folder.joinpath("page.js").read_text(encoding="utf-8")
    assert css in body
    assert script.replace("{{refresh}}", "3000") in body
    assert re.search(r"\{\{[a-z.]*\}\}", body) is None
    assert '<meta name="lapse-base" content="/_la&quot;&lt;b&gt;/">' in body
    assert '"<b>' not in body
    nonce = re.search(
        r"script-src 'nonce-([^']+)'", page.header(b"content-security-policy").decode()
    )
    assert nonce is not None and f'<script nonce="{nonce.group(1)}">' in body


def test_the_page_files_are_package_data() -> None:
    """Every file of the live view's package that is not Python is named by
    pyproject's package-data, so a wheel ships it."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = config["tool"]["setuptools"]["package-data"]["lapse.web.liveview"]
    folder = REPO / "src" / "lapse" / "web" / "liveview"
    data = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix != ".py")
    assert data == sorted(["page.html", "page.css", "page.js"])
    assert all(any(Path(name).match(pattern) for pattern in shipped) for name in data)


def test_a_page_template_with_an_unknown_field_is_refused() -> None:
    """A field the view does not fill (a typo in page.html) fails when the
    page is read, not by sending ``{{...}}`` to browsers."""
    with pytest.raises(ValueError, match="fields"):
        PageTemplate("{{nonce}} {{csrf}} {{base}} {{refresh}} {{nonse}}")
    with pytest.raises(ValueError, match="fields"):
        PageTemplate("{{nonce}} {{csrf}} {{base}}")


def test_405s_are_json_and_say_what_is_allowed(clock: Clock) -> None:
    """A method a route does not answer is a JSON 405 with an ``Allow``
    header naming what it does answer, behind the view's headers."""
    site, _ = make_site(clock)
    for path, allowed in [
        ("/_lapse/", b"GET, HEAD"),
        ("/_lapse/api/summary", b"GET, HEAD"),
        ("/_lapse/api/sessions", b"GET, HEAD"),
        ("/_lapse/api/session", b"GET, HEAD"),
        ("/_lapse/api/expire", b"POST"),
    ]:
        method = "GET" if allowed == b"POST" else "PUT"
        answer = call(site, method, path)
        assert answer.status == 405, path
        assert answer.header(b"allow") == allowed
        assert get_json(answer) == {"error": "method not allowed"}
        assert answer.header(b"x-frame-options") == b"DENY"


@pytest.mark.parametrize(
    "path",
    [
        "/_lapse/api",
        "/_lapse/api/",
        "/_lapse/api/nothing",
        "/_lapse/api/summary/more",
        "/_lapse//",
        "/_lapse/x/y",
        "/_lapse/api/expire/x",
    ],
)
def test_paths_the_view_does_not_serve_are_json_404s_after_access(clock: Clock, path: str) -> None:
    """Under the view, a path it does not serve is a JSON 404 for those it
    lets in; for others the refusal comes first (403 with a token), so a
    refused client cannot tell which paths exist."""
    site, _ = make_site(clock)
    answer = call(site, "GET", path)
    assert answer.status == 404 and get_json(answer) == {"error": "not found"}
    tokened, _ = make_site(clock, token=TOKEN)
    refused = call(tokened, "GET", path)
    assert refused.status == 403 and refused.body == b"Forbidden.\n"
    bearer = [(b"authorization", b"Bearer " + TOKEN.encode())]
    assert call(tokened, "GET", path, headers=bearer).status == 404


def test_the_view_and_metrics_use_only_public_session_names() -> None:
    """The live view's modules and lapse.metrics import nothing private of
    lapse.sessions and reach no site's keeper: they go through the host's
    public ``store``, ``call_store`` and ``stats``."""
    sources = [*(REPO / "src" / "lapse" / "web" / "liveview").glob("*.py")]
    sources.append(REPO / "src" / "lapse" / "metrics.py")
    assert len(sources) >= 8
    for source in sources:
        text = source.read_text(encoding="utf-8")
        assert "lapse.sessions._" not in text, source
        assert "_keeper" not in text, source
