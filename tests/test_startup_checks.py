"""Start-up checks: a store that can never work stops start-up with one line;
one merely down at start is logged and retried (503s until it answers).

Real SQLite files and directories, a real redis-server with a password, an
unresolvable host (under ``.invalid``), a loopback port nobody listens on;
the ASGI lifespan of a Site and of the middleware; ``reactor.run()`` in a
seed program and ``lapse serve``, as real processes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _asgi import lifespan_startup
from _redis_server import RedisServer
from _servers import free_port, request, running_server, write_script
from conftest import Leaf

from lapse.asgi import SessionMiddleware
from lapse.sessions import StoreUnavailable
from lapse.sessions.stores import store_from_url
from lapse.web.server import Site

PASSWORD = "s3cret-pw"


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[RedisServer]:
    """A real redis-server that wants a password (``--requirepass``)."""
    with RedisServer(args=["--requirepass", PASSWORD]) as server:
        yield server


def _not_a_database(tmp_path: Path) -> str:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are not the sessions you are looking for\n" * 40)
    return f"sqlite:///{path}"


def _newer_schema(tmp_path: Path) -> str:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    return f"sqlite:///{path}"


SQLITE_NEVER = {
    "no such directory": lambda tmp: f"sqlite:///{tmp}/missing/sessions.db",
    "a directory": lambda tmp: f"sqlite:///{tmp}",
    "not a database": _not_a_database,
    "newer schema": _newer_schema,
}


async def _open(url: str) -> StoreUnavailable | None:
    store = store_from_url(url)
    try:
        await store.open()
    except StoreUnavailable as exc:
        return exc
    finally:
        await store.aclose()
    return None


@pytest.mark.parametrize("case", list(SQLITE_NEVER))
def test_sqlite_paths_that_can_never_work_are_permanent_failures(case: str, tmp_path: Path) -> None:
    """A SQLite path no session database can be opened at is a permanent
    StoreUnavailable, and the message names the file and says why."""
    failure = asyncio.run(_open(SQLITE_NEVER[case](tmp_path)))
    assert failure is not None and failure.permanent, failure
    assert str(tmp_path) in str(failure)
    if case == "no such directory":
        assert "no such directory" in str(failure)


def test_redis_refusals_that_can_never_pass_are_permanent(locked_redis: RedisServer) -> None:
    """A wrong password (WRONGPASS), none (NOAUTH), a db index the server has
    not, an unknown host: permanent, the password never shown. Connection
    refused is not permanent (the server may come up)."""
    port = locked_redis.port
    never = {
        f"redis://:wrong-one@127.0.0.1:{port}/0": "WRONGPASS",
        f"redis://127.0.0.1:{port}/0": "NOAUTH",
        f"redis://:{PASSWORD}@127.0.0.1:{port}/99": "DB index",
        f"redis://:{PASSWORD}@no-such-host.invalid:{port}/0": "not known",
    }
    for url, said in never.items():
        failure = asyncio.run(_open(url))
        assert failure is not None and failure.permanent, (url, failure)
        assert said in str(failure)
        assert PASSWORD not in str(failure) and "wrong-one" not in str(failure)
    assert asyncio.run(_open(f"redis://:{PASSWORD}@127.0.0.1:{port}/0")) is None
    refused = asyncio.run(_open(f"redis://127.0.0.1:{free_port()}/0"))
    assert refused is not None and not refused.permanent


def test_site_lifespan_fails_startup_on_a_store_that_can_never_work(tmp_path: Path) -> None:
    """lifespan.startup.failed, its message naming the store's file."""
    site = Site(Leaf(), store=f"sqlite:///{tmp_path}/missing/s.db")
    sent = asyncio.run(lifespan_startup(site))
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert f"{tmp_path}/missing/s.db" in sent[0]["message"]
    assert "no such directory" in sent[0]["message"]


def test_site_lifespan_starts_on_a_store_that_is_only_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A store that refuses connections now starts anyway, and says so in the log."""
    port = free_port()
    site = Site(Leaf(), store=f"redis://127.0.0.1:{port}/0")
    with caplog.at_level(logging.ERROR, "lapse.sessions"):
        sent = asyncio.run(lifespan_startup(site))
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert any(f"127.0.0.1:{port}" in r.getMessage() for r in caplog.records)


def test_middleware_lifespan_fails_startup_before_the_app_starts(tmp_path: Path) -> None:
    """The middleware answers lifespan.startup.failed itself; the app's own
    startup never runs (and its report of the refusal is not sent)."""
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        seen.append(message["type"])
        await send({"type": "lifespan.startup.complete"})

    middleware = SessionMiddleware(app, store=_not_a_database(tmp_path))
    sent = asyncio.run(lifespan_startup(middleware))
    assert seen == []
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "not a database" in sent[0]["message"]


def test_middleware_serving_lifespan_itself_fails_startup(tmp_path: Path) -> None:
    """Around an app that does not take lifespan (it raises at once), the
    middleware serves lifespan itself, and fails its startup just the same."""

    async def http_only(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("lifespan? never heard of it")

    middleware = SessionMiddleware(http_only, store=f"sqlite:///{tmp_path}")
    sent = asyncio.run(lifespan_startup(middleware))
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "is a directory" in sent[0]["message"]


SEED = """
import sys
from lapse.internet import reactor
from lapse.web.resource import Resource
from lapse.web.server import Site

class Hello(Resource):
    isLeaf = True
    def render_GET(self, request):
        return b"hi"

reactor.listenTCP(int(sys.argv[1]), Site(Hello(), store=sys.argv[2]), interface="127.0.0.1")
print("running", flush=True)
reactor.run()
"""


def test_reactor_run_exits_with_one_line_on_a_store_that_can_never_work(
    tmp_path: Path, locked_redis: RedisServer
) -> None:
    """A seed program's reactor.run() with a refused Redis password ends with
    status 1 and one line on stderr, naming the store, password hidden."""
    script = write_script(tmp_path, "seed.py", SEED)
    url = f"redis://:wrong-one@127.0.0.1:{locked_redis.port}/0"
    done = subprocess.run(
        [sys.executable, str(script), str(free_port()), url],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "WRONGPASS" in lines[0] and f"127.0.0.1:{locked_redis.port}" in lines[0]
    assert "wrong-one" not in done.stderr


def _lapse_serve(tmp_path: Path, *args: str) -> list[str]:
    write_script(
        tmp_path,
        "hello.py",
        "from lapse.web.resource import Resource\nfrom lapse.web.server import Site\n\n"
        "class Page(Resource):\n    isLeaf = True\n\n"
        "    def render_GET(self, request):\n        return request.getSession().uid\n\n"
        "site = Site(Page())\n",
    )
    return [
        sys.executable,
        "-m",
        "lapse",
        "serve",
        "hello:site",
        "--app-dir",
        str(tmp_path),
        *args,
    ]


def test_lapse_serve_refuses_a_store_that_can_never_work(tmp_path: Path) -> None:
    """``lapse serve --store`` with an unopenable SQLite path: exit 1, one
    error line naming the file, and no "serving" line before it."""
    command = _lapse_serve(tmp_path, "--port", "0", "--store", f"sqlite:///{tmp_path}/no/s.db")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=20, cwd=Path(__file__).parent
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"lapse: error: cannot start: the session store cannot work: SQLite session store "
        f"{tmp_path}/no/s.db: OperationalError: unable to open database file "
        f"(no such directory: {tmp_path}/no)"
    ]


def test_lapse_serve_stops_when_the_middleware_refuses_startup(tmp_path: Path) -> None:
    """``lapse serve`` of a Starlette app with the middleware on a store that
    can never work: the lifespan startup fails, the server says why (naming
    the file) and exits 1."""
    write_script(
        tmp_path,
        "mwapp.py",
        "from starlette.applications import Starlette\n"
        "from lapse.asgi import SessionMiddleware\n"
        "app = Starlette()\n"
        f"app.add_middleware(SessionMiddleware, store='sqlite:///{tmp_path}/no/s.db')\n",
    )
    command = [sys.executable, "-m", "lapse", "serve", "mwapp:app", "--port", "0"]
    done = subprocess.run(
        [*command, "--app-dir", str(tmp_path)], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 1, done.stderr
    assert f"no such directory: {tmp_path}/no" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("lapse: error: cannot start: ")
    assert "Traceback" not in done.stderr


def test_lapse_serve_workers_stop_on_a_store_that_can_never_work(tmp_path: Path) -> None:
    """With --workers, the first worker's refusal stops the supervisor (exit
    1) before it starts the others."""
    command = _lapse_serve(
        tmp_path,
        "--port",
        str(free_port()),
        "--workers",
        "3",
        "--store",
        _not_a_database(tmp_path),
    )
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent
    )
    assert done.returncode == 1
    assert done.stderr.count("file is not a database") == 1, done.stderr
    assert "serving" not in done.stderr


def test_lapse_serve_starts_on_a_store_that_is_only_down(tmp_path: Path) -> None:
    """A Redis that refuses connections at start: the server serves, logs the
    outage, and answers 503 where a session is needed, until it answers."""
    redis_port = free_port()
    port = free_port()
    server_script = tmp_path / "serve.py"
    server_script.write_text("import sys\nfrom lapse.cli import main\nsys.exit(main())\n")
    args = _lapse_serve(
        tmp_path, "--port", str(port), "--store", f"redis://127.0.0.1:{redis_port}/0"
    )
    with running_server(server_script, port, args=args[3:], cwd=Path(__file__).parent) as server:
        assert request(port, "/").status == 503
        assert f"127.0.0.1:{redis_port}" in server.stderr_text()
        with RedisServer(port=redis_port):
            for _ in range(50):
                answer = request(port, "/")
                if answer.status == 200:
                    break
                time.sleep(0.1)
            assert answer.status == 200
