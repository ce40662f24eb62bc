"""The live view across processes: row ids, cursors and CSRF tokens that every
view sharing the secret (LAPSE_LIVEVIEW_SECRET, as the workers of one
``lapse serve --workers N`` do) reads back, with no per-process table; ids
and cursors from anyone else (another secret, altered, forged) are a 400.

Two workers are two Sites, each with its own LiveView, over one SQLite file.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from _liveview import csrf_of, get_json, make_site
from _servers import free_port, request
from conftest import Response, SessionPage, call, call_async

from lapse.internet.task import Clock
from lapse.web.liveview import CSRF_COOKIE, LiveView
from lapse.web.resource import Resource
from lapse.web.server import Site

SECRET = "5e" * 32
OTHER_SECRET = "a7" * 32
ENV = "LAPSE_LIVEVIEW_SECRET"


def worker(db: Path) -> Site:
    """A Site over the SQLite file ``db`` with a live view at /_lapse/ (under
    the secret in the environment now) and a page at / that makes a session
    and answers its uid."""
    root = Resource()
    site = Site(root, store=f"sqlite:///{db}")
    root.putChild(b"", SessionPage())
    root.putChild(b"_lapse", LiveView(site))
    return site


def run_workers(
    db: Path, secrets: tuple[str | None, str | None], body: Callable[..., Awaitable[None]]
) -> None:
    """Run ``body(a, b)`` with two workers over ``db``, the first made under
    ``secrets[0]`` in LAPSE_LIVEVIEW_SECRET, the second under ``secrets[1]``
    (None: unset)."""

    async def main() -> None:
        sites = []
        with pytest.MonkeyPatch.context() as patch:
            for secret in secrets:
                if secret is None:
                    patch.delenv(ENV, raising=False)
                else:
                    patch.setenv(ENV, secret)
                sites.append(worker(db))
        try:
            await body(*sites)
        finally:
            for site in sites:
                await site._keeper.aclose()

    asyncio.run(main())


async def make_sessions(site: Site, count: int) -> list[str]:
    """``count`` sessions made by visits to ``site``: their uids."""
    return [(await call_async(site, "GET", "/")).body.decode() for _ in range(count)]


async def expire(site: Site, row_id: str, page: Response) -> Response:
    """POST api/expire for ``row_id`` with the CSRF pair of ``page`` (from any worker)."""
    nonce, csrf = csrf_of(page)
    return await call_async(
        site,
        "POST",
        "/_lapse/api/expire",
        body=json.dumps({"id": row_id}).encode(),
        headers=[(b"x-lapse-csrf", csrf)],
        cookies={CSRF_COOKIE.encode(): nonce},
    )


def decoded(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_ids_cursors_and_csrf_of_one_worker_work_in_another(tmp_path: Path) -> None:
    """Two workers sharing the secret: every session has the same id in
    both; an id from one's api/sessions answers in the other's api/session
    and ends the session through the other's api/expire (with the CSRF pair
    of the first one's page: a browser's page and its POST may reach
    different workers); a cursor from one pages on in the other, every
    session listed exactly once. Neither ids nor cursors hold a uid in clear,
    nor in their base64 decoding."""

    async def body(a: Site, b: Site) -> None:
        uids = await make_sessions(a, 5)
        first = get_json(await call_async(a, "GET", "/_lapse/api/sessions?limit=2"))
        rest = get_json(
            await call_async(b, "GET", f"/_lapse/api/sessions?limit=10&cursor={first['next']}")
        )
        rows = first["sessions"] + rest["sessions"]
        assert len(rows) == 5 and rest["next"] is None
        assert len({row["id"] for row in rows}) == 5
        listed_by_b = get_json(await call_async(b, "GET", "/_lapse/api/sessions"))["sessions"]
        assert sorted(r["id"] for r in listed_by_b) == sorted(r["id"] for r in rows)
        for row in rows:
            one = await call_async(b, "GET", f"/_lapse/api/session?id={row['id']}")
            assert one.status == 200, one.body
            assert get_json(one)["session"]["uid"] == row["uid"]
        for uid in uids:
            for sealed in [first["next"], *(row["id"] for row in rows)]:
                assert uid not in sealed and uid.encode() not in decoded(sealed)
        ended = rows[0]
        done = await expire(b, ended["id"], await call_async(a, "GET", "/_lapse/"))
        assert done.status == 200 and get_json(done) == {"expired": True, "uid": ended["uid"]}
        gone = await call_async(a, "GET", f"/_lapse/api/session?id={ended['id']}")
        assert gone.status == 404 and get_json(gone) == {"error": "no such session"}
        again = await expire(a, ended["id"], await call_async(b, "GET", "/_lapse/"))
        assert again.status == 404 and get_json(again)["expired"] is False
        assert get_json(await call_async(a, "GET", "/_lapse/api/summary"))["live"] == 4

    run_workers(tmp_path / "shared.db", (SECRET, SECRET), body)


def test_two_workers_ending_one_session_at_once_one_of_them_ends_it(tmp_path: Path) -> None:
    """Both workers get api/expire for the same id at the same time (a
    double click, two operators): one answers it ended the session, the
    other that it is not live (404); the session ends once."""

    async def body(a: Site, b: Site) -> None:
        await make_sessions(a, 2)
        row_id = get_json(await call_async(a, "GET", "/_lapse/api/sessions"))["sessions"][0]["id"]
        pages = [await call_async(site, "GET", "/_lapse/") for site in (a, b)]
        answers = await asyncio.gather(expire(a, row_id, pages[0]), expire(b, row_id, pages[1]))
        assert sorted(answer.status for answer in answers) == [200, 404]
        assert get_json(await call_async(b, "GET", "/_lapse/api/summary"))["live"] == 1

    run_workers(tmp_path / "shared.db", (SECRET, SECRET), body)


@pytest.mark.parametrize(
    "secrets", [(SECRET, OTHER_SECRET), (None, None)], ids=["other-secret", "no-secret"]
)
def test_ids_cursors_and_csrf_under_another_secret_are_refused(
    tmp_path: Path, secrets: tuple[str | None, str | None]
) -> None:
    """Workers with different secrets (or none: each view then has a random
    secret of its own, as before) refuse each other's ids and cursors with a
    400 saying so, and each other's CSRF tokens with a 403; nothing ends."""

    async def body(a: Site, b: Site) -> None:
        await make_sessions(a, 3)
        page = get_json(await call_async(a, "GET", "/_lapse/api/sessions?limit=1"))
        row_id, cursor = page["sessions"][0]["id"], page["next"]
        one = await call_async(b, "GET", f"/_lapse/api/session?id={row_id}")
        assert one.status == 400 and "not a row id" in get_json(one)["error"]
        more = await call_async(b, "GET", f"/_lapse/api/sessions?cursor={cursor}")
        assert more.status == 400 and "cursor" in get_json(more)["error"]
        ended = await expire(b, row_id, await call_async(b, "GET", "/_lapse/"))
        assert ended.status == 400 and "not a row id" in get_json(ended)["error"]
        forged_csrf = await expire(a, row_id, await call_async(b, "GET", "/_lapse/"))
        assert forged_csrf.status == 403
        assert get_json(await call_async(a, "GET", "/_lapse/api/summary"))["live"] == 3

    run_workers(tmp_path / "shared.db", secrets, body)


def altered(row_id: str) -> list[str]:
    """``row_id`` with each character changed, cut short, made longer."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    changed = []
    for i, char in enumerate(row_id):
        other = alphabet[(alphabet.index(char) + 1 + i) % len(alphabet)]
        changed.append(row_id[:i] + other + row_id[i + 1 :])
    return [*changed, row_id[:-1], row_id[:-4], row_id + "A", row_id + "AAAA", row_id[:22]]


def test_an_altered_or_forged_id_is_400_without_a_store_lookup(tmp_path: Path) -> None:
    """Every one-character change of a real id, a truncated or extended one,
    and a cursor given as an id are 400s on api/session and api/expire, with
    the session left alone and no call to the store (a forged id costs no
    lookup); the real id still answers."""

    async def body(a: Site, b: Site) -> None:
        await make_sessions(a, 2)
        page = get_json(await call_async(a, "GET", "/_lapse/api/sessions?limit=1"))
        row_id = page["sessions"][0]["id"]
        forged = [*altered(row_id), page["next"]]
        csrf_page = await call_async(a, "GET", "/_lapse/")
        calls = a.stats.store_calls
        before = {op: calls[op].count for op in ("info", "expire") if op in calls}
        for bad in forged:
            one = await call_async(a, "GET", f"/_lapse/api/session?id={bad}")
            assert one.status == 400, (bad, one.status, one.body)
            ended = await expire(a, bad, csrf_page)
            assert ended.status == 400, (bad, ended.status, ended.body)
        after = {op: calls[op].count for op in ("info", "expire") if op in calls}
        assert after == before
        assert (await call_async(a, "GET", f"/_lapse/api/session?id={row_id}")).status == 200
        assert get_json(await call_async(a, "GET", "/_lapse/api/summary"))["live"] == 2

    run_workers(tmp_path / "one.db", (SECRET, SECRET), body)


def test_ids_are_one_per_session_and_stable(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the memory store too: a session's id is the same on every listing
    and in a second view made with the same secret (no table of handles that
    could be evicted or differ), and distinct sessions have distinct ids."""
    monkeypatch.setenv(ENV, SECRET)
    site, _ = make_site(clock)
    site.resource.putChild(b"_again", LiveView(site))
    for _ in range(20):
        site.makeSession()
    first = get_json(call(site, "GET", "/_lapse/api/sessions"))["sessions"]
    second = get_json(call(site, "GET", "/_again/api/sessions"))["sessions"]
    assert [r["id"] for r in first] == [r["id"] for r in second]
    assert len({r["id"] for r in first}) == 20
    for row in first:
        one = call(site, "GET", f"/_again/api/session?id={row['id']}")
        assert get_json(one)["session"]["id"] == row["id"]


@pytest.mark.parametrize(
    "value",
    ["not-hex-at-all", "ab" * 31, "zz" * 32, "abc", "5e" * 32 + "5"],
    ids=["words", "31-bytes", "not-hex", "short", "odd-length"],
)
def test_a_malformed_secret_is_a_clear_error_when_the_view_is_made(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A LAPSE_LIVEVIEW_SECRET that is not hex or under 32 bytes is a
    ValueError naming the variable and what it needs, not the value; an
    empty one counts as unset."""
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=r"LAPSE_LIVEVIEW_SECRET must be at least 64 hex") as info:
        LiveView(Site(Resource(), reactor=Clock()))
    assert value not in str(info.value)
    monkeypatch.setenv(ENV, "")
    LiveView(Site(Resource(), reactor=Clock()))


@pytest.mark.slow
def test_lapse_serve_workers_live_view_over_real_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lapse serve --workers 2 --live-view`` over SQLite, the workers given
    one LAPSE_LIVEVIEW_SECRET: each request is a new connection (either
    worker may answer), yet ``lapse sessions show ID --server`` finds every
    listed session and ``expire --all --yes --server`` ends all of them."""
    from _cli import APP, lapse_serving

    from lapse.cli import main

    monkeypatch.setenv(ENV, SECRET)
    monkeypatch.delenv("LAPSE_LIVEVIEW_TOKEN", raising=False)
    monkeypatch.delenv("LAPSE_SESSION_STORE", raising=False)
    (tmp_path / "cliapp.py").write_text(APP, encoding="utf-8")
    port = free_port()
    args = ["cliapp:site", "--port", str(port), "--app-dir", str(tmp_path), "--workers", "2"]
    args += ["--store", f"sqlite:///{tmp_path / 'shared.db'}", "--live-view", "_lapse"]
    url = f"http://127.0.0.1:{port}/_lapse/"

    def lapse(*argv: str) -> tuple[int, str]:
        status = main(["sessions", *argv, "--server", url])
        out, err = capsys.readouterr()
        assert status == 0, err
        return status, out

    with lapse_serving(args, port, tmp_path):
        for _ in range(20):
            assert request(port, "/").status == 200
        listed = json.loads(lapse("list", "--json")[1])["sessions"]
        assert len(listed) == 20
        for row in listed[:8]:
            assert json.loads(lapse("show", row["id"], "--json")[1])["uid"] == row["uid"]
        assert lapse("expire", "--all", "--yes")[1] == f"expired 20 sessions at {url}\n"
        assert json.loads(lapse("list", "--json")[1])["sessions"] == []
