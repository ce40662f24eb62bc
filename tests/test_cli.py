"""``lapse serve MODULE:ATTR`` (and ``python -m lapse``), run as real subprocesses.

Each test writes a small application module to a temporary directory, runs
``python -m lapse serve`` on a free port on 127.0.0.1 with ``--app-dir``
pointing there, drives it over HTTP and stops it by its PID. The command's
own messages go to stderr, one line each, prefixed ``lapse:``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli import (
    lapse_serving,
    make_app_dir,
    pid_alive,
    run_lapse,
    session_uid,
    visit,
    worker_pids,
)
from _servers import (
    EXAMPLES,
    HOST,
    free_port,
    port_accepts,
    request,
    self_signed_cert,
    wait_for_stderr,
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A directory holding ``cliapp.py`` (see APP) and ``broken.py``."""
    return make_app_dir(tmp_path)


# -- help ----------------------------------------------------------------------


def test_help_lists_the_command_and_its_options(tmp_path: Path) -> None:
    """``python -m lapse --help`` names ``serve``; ``lapse serve --help`` (the
    installed script, when there) lists every option; no command at all prints
    the help and exits 2."""
    top = run_lapse(["--help"], tmp_path)
    assert top.returncode == 0
    assert "serve" in top.stdout
    script = Path(sys.executable).parent / "lapse"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lapse"]
    serve = subprocess.run(
        [*command, "serve", "--help"], capture_output=True, text=True, timeout=30
    )
    assert serve.returncode == 0, serve.stderr
    for option in (
        "MODULE:ATTR",
        "--host",
        "--interface",
        "--port",
        "--certfile",
        "--keyfile",
        "--store",
        "--workers",
        "--trust-proxy",
        "--log-level",
        "--app-dir",
    ):
        assert option in serve.stdout, option
    bare = run_lapse([], tmp_path)
    assert bare.returncode == 2
    assert "serve" in bare.stderr


# -- serving ------------------------------------------------------------------------


def test_serves_a_site_with_sessions_trust_proxy_and_log_level(app_dir: Path) -> None:
    """``lapse serve cliapp:site`` serves the Site: the first visit sets a
    session cookie, the next with it is the same session (no new cookie,
    visits 2). With ``--trust-proxy`` the Site believes X-Forwarded-Proto and
    the right-most X-Forwarded-For entry (one proxy), not the spoofed left-most;
    with ``--log-level info`` the access log is on stderr, each line after
    its time (ISO 8601, UTC), level and logger. SIGTERM stops it with status 0."""
    port = free_port()
    args = ["cliapp:site", "--port", str(port), "--app-dir", str(app_dir), "--trust-proxy"]
    args += ["--log-level", "INFO"]
    with lapse_serving(args, port, app_dir) as server:
        first = request(port, "/")
        assert first.status == 200
        uid = session_uid(first)
        assert f"uid={uid} visits=1 secure=False client=127.0.0.1" in first.text
        second = request(port, "/", headers={"Cookie": f"lapse_session={uid}"})
        assert f"uid={uid} visits=2" in second.text
        assert second.header("set-cookie") is None
        proxied = visit(
            port,
            uid,
            headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "127.0.0.1, 203.0.113.9"},
        )
        assert proxied["secure"] == "True"
        assert proxied["client"] == "203.0.113.9"
        assert f"serving cliapp:site (a Site, store memory:) on http://{HOST}:{port}" in (
            server.stderr_text()
        )
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == 0
        errors = server.stderr_text()
        access = r'127\.0\.0\.1 - - \[.*\] "GET / HTTP/1\.1" 200 '
        stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO lapse\.access "
        assert re.search("^" + stamp + access, errors, re.M), errors
        assert "Received SIGTERM, shutting down" in errors
        assert errors.rstrip().endswith("lapse: stopped")
        assert "Traceback" not in errors
    assert not port_accepts(port)


@pytest.mark.slow
def test_serves_a_plain_asgi_app_and_trust_proxy_wraps_it(app_dir: Path) -> None:
    """A plain ASGI 3 app (an async function) is served as it is; with
    ``--trust-proxy`` its scope's scheme and client come from
    X-Forwarded-Proto/-For as lapse reads them: the right-most entry for one
    proxy (not the spoofed left-most), the N-th from the right with
    ``--trusted-proxies N``."""
    port = free_port()
    args = ["cliapp:asgi", "--port", str(port), "--app-dir", str(app_dir)]
    with lapse_serving(args, port, app_dir):
        response = request(port, "/", headers={"X-Forwarded-Proto": "https"})
        assert response.status == 200
        assert response.text == "plain asgi scheme=http client=127.0.0.1"
    port = free_port()
    with lapse_serving(
        ["cliapp:asgi", "--port", str(port), "--app-dir", str(app_dir), "--trust-proxy"],
        port,
        app_dir,
    ):
        headers = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "6.6.6.6, 203.0.113.9"}
        response = request(port, "/", headers=headers)
        assert response.text == "plain asgi scheme=https client=203.0.113.9"
    port = free_port()
    with lapse_serving(
        ["--trusted-proxies", "2", "cliapp:asgi", "--port", str(port), "--app-dir", str(app_dir)],
        port,
        app_dir,
    ):
        headers = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9, 10.0.0.2"}
        response = request(port, "/", headers=headers)
        assert response.text == "plain asgi scheme=http client=203.0.113.9"


@pytest.mark.parametrize(
    ("argv", "expected", "worker_argv"),
    [
        (["x:y", "--trust-proxy"], True, ["--trust-proxy"]),
        (["--trust-proxy", "x:y"], True, ["--trust-proxy"]),
        (["x:y"], False, []),
        (["--trusted-proxies", "2", "x:y"], 2, ["--trusted-proxies", "2"]),
        (["x:y", "--trusted-proxies=3"], 3, ["--trusted-proxies", "3"]),
        (
            ["x:y", "--trusted-proxies", "10.0.0.0/8,::1"],
            "10.0.0.0/8,::1",
            ["--trusted-proxies", "10.0.0.0/8,::1"],
        ),
    ],
)
def test_trust_proxy_takes_a_count_or_addresses(
    argv: list[str], expected: object, worker_argv: list[str], tmp_path: Path
) -> None:
    """``--trust-proxy`` is one proxy, wherever it stands; ``--trusted-proxies N``
    a chain of N, ``--trusted-proxies ADDRESSES`` the proxies' addresses and
    networks; workers get the same option."""
    from lapse.cli import build_parser
    from lapse.cli.serve import _check
    from lapse.cli.supervisor import _worker_command

    args = build_parser().parse_args(["serve", *argv, "--app-dir", str(tmp_path)])
    assert args.trust_proxy == expected
    command = _worker_command(_check(args))
    if not worker_argv:
        assert not [part for part in command if part.startswith("--trust")]
    else:
        at = command.index(worker_argv[0])
        assert command[at : at + len(worker_argv)] == worker_argv


@pytest.mark.parametrize(
    "argv",
    [
        ["cliapp:site", "--trusted-proxies", "-1"],
        ["cliapp:site", "--trusted-proxies=10.0.0.0/33"],
        ["cliapp:site", "--trusted-proxies", "proxy.internal"],
    ],
)
def test_a_bad_trust_proxy_value_exits_2(argv: list[str], tmp_path: Path) -> None:
    """A --trusted-proxies value that is no count nor addresses exits 2 with
    argparse's message (which says what to give), no traceback."""
    result = run_lapse(["serve", *argv], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "argument --trusted-proxies: " in result.stderr and "e.g. 2" in result.stderr


@pytest.mark.slow
def test_store_option_reaches_the_site_made_at_import_and_survives_restart(
    app_dir: Path,
) -> None:
    """``--store sqlite:///<tmp>/x.db`` applies to the Site the module makes at
    import (set as LAPSE_SESSION_STORE before the import): a session made by
    one server is still there, with its data, after the server is stopped and
    another started."""
    db = app_dir / "x.db"
    port = free_port()
    args = ["cliapp:site", "--port", str(port), "--app-dir", str(app_dir)]
    args += ["--store", f"sqlite:///{db}"]
    with lapse_serving(args, port, app_dir) as server:
        first = request(port, "/")
        uid = session_uid(first)
        assert "visits=1" in first.text
        assert visit(port, uid)["visits"] == "2"
        assert f"store sqlite:///{db}" in server.stderr_text()
    assert db.exists()
    with lapse_serving(args, port, app_dir):
        again = visit(port, uid)
        assert again["uid"] == uid
        assert again["visits"] == "3"


def test_store_option_does_not_override_a_store_given_in_code(app_dir: Path) -> None:
    """A Site made with ``store=`` in its code keeps that store; ``--store``
    then says, on one warning line, that it does not apply to that Site."""
    port = free_port()
    args = ["cliapp:memory_site", "--port", str(port), "--app-dir", str(app_dir)]
    args += ["--store", f"sqlite:///{app_dir / 'unused.db'}"]
    with lapse_serving(args, port, app_dir) as server:
        assert "visits=1" in request(port, "/").text
        warning = wait_for_stderr(server, "lapse: warning: .*", 5).group(0)
        assert "cliapp:memory_site was made with its own store (memory:)" in warning
        assert "does not apply to it" in warning
        assert "(a Site, store memory:)" in server.stderr_text()


def test_tls_with_a_self_signed_certificate(app_dir: Path, tmp_path: Path) -> None:
    """``--certfile``/``--keyfile`` serve HTTPS (listenSSL): the request is
    secure and the session cookie is ``__Host-lapse_session`` with Secure."""
    cert, key = self_signed_cert(tmp_path)
    port = free_port()
    args = ["cliapp:site", "--port", str(port), "--app-dir", str(app_dir)]
    args += ["--certfile", str(cert), "--keyfile", str(key)]
    context = ssl.create_default_context(cafile=str(cert))
    with lapse_serving(args, port, app_dir) as server:
        assert f"on https://{HOST}:{port}" in server.stderr_text()
        first = request(port, "/", ssl_context=context)
        assert first.status == 200
        uid = session_uid(first, "__Host-lapse_session")
        assert "Secure" in first.header("set-cookie")  # type: ignore[operator]
        assert f"uid={uid} visits=1 secure=True" in first.text
        again = request(
            port, "/", ssl_context=context, headers={"Cookie": f"__Host-lapse_session={uid}"}
        )
        assert f"uid={uid} visits=2 secure=True" in again.text


# -- workers ----------------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_share_the_port_and_the_sessions(app_dir: Path) -> None:
    """``--workers 2 --store sqlite:///...``: two worker processes (children of
    the supervisor) answer on the one port, and a session made by either is
    the same session in the other (its visit count goes on across them)."""
    port = free_port()
    args = ["cliapp:site", "--port", str(port), "--app-dir", str(app_dir), "--workers", "2"]
    args += ["--store", f"sqlite:///{app_dir / 'shared.db'}"]
    with lapse_serving(args, port, app_dir) as server:
        pids = worker_pids(server)
        assert len(set(pids)) == 2 and server.pid not in pids
        uid = session_uid(request(port, "/"))
        answered: dict[str, int] = {}
        # Each request is a new connection, accepted by whichever worker
        # takes it from the shared socket first: both answer within a few.
        for attempt in range(2, 200):
            fields = visit(port, uid)
            assert fields["uid"] == uid
            assert fields["visits"] == str(attempt)
            answered[fields["pid"]] = answered.get(fields["pid"], 0) + 1
            if len(answered) == 2 and attempt >= 6:
                break
        assert set(answered) == {str(pid) for pid in pids}, answered


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.slow
def test_a_signal_stops_the_supervisor_and_every_worker(app_dir: Path, sig: signal.Signals) -> None:
    """SIGTERM (or SIGINT) to the supervisor reaches every worker: all of them
    exit, the supervisor exits 0 once they have, and the port is closed."""
    port = free_port()
    args = ["cliapp:site", "--port", str(port), "--app-dir", str(app_dir), "--workers", "2"]
    args += ["--store", f"sqlite:///{app_dir / 'shared.db'}"]
    with lapse_serving(args, port, app_dir) as server:
        pids = worker_pids(server)
        assert all(pid_alive(pid) for pid in pids)
        server.send_signal(sig)
        assert server.wait(20) == 0, server.stderr_text()
        assert not any(pid_alive(pid) for pid in pids)
        assert "lapse: stopped" in server.stderr_text()
        assert "Traceback" not in server.stderr_text()
    assert not port_accepts(port)


@pytest.mark.slow
def test_workers_stop_when_the_supervisor_is_killed(app_dir: Path) -> None:
    """A supervisor killed with SIGKILL cannot pass anything on: its workers
    notice (they check every second) and stop by themselves."""
    port = free_port()
    args = ["cliapp:site", "--port", str(port), "--app-dir", str(app_dir), "--workers", "2"]
    args += ["--store", f"sqlite:///{app_dir / 'shared.db'}"]
    with lapse_serving(args, port, app_dir) as server:
        pids = worker_pids(server)
        server.send_signal(signal.SIGKILL)
        server.wait(5)
        deadline = time.monotonic() + 15
        while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(pid_alive(pid) for pid in pids)
        assert "the supervisor" in server.stderr_text() and "is gone; stopping" in (
            server.stderr_text()
        )
    assert not port_accepts(port)


@pytest.mark.slow
def test_with_fail_fast_a_dead_worker_stops_the_others(app_dir: Path) -> None:
    """With --fail-fast, if a worker dies on its own (SIGKILL), the supervisor
    says so, stops the other workers and exits with status 1."""
    port = free_port()
    args = ["cliapp:site", "--port", str(port), "--app-dir", str(app_dir), "--workers", "2"]
    args += ["--fail-fast"]
    args += ["--store", f"sqlite:///{app_dir / 'shared.db'}"]
    with lapse_serving(args, port, app_dir) as server:
        doomed, other = worker_pids(server)
        os.kill(doomed, signal.SIGKILL)
        assert server.wait(20) == 1
        assert f"worker {doomed} exited" in server.stderr_text()
        assert not pid_alive(other)


@pytest.mark.parametrize(
    ("target", "store"),
    [("cliapp:site", None), ("cliapp:site", "memory:"), ("cliapp:memory_site", None)],
    ids=["default-store", "store-option", "store-in-code"],
)
def test_several_workers_with_the_memory_store_are_refused(
    app_dir: Path, target: str, store: str | None
) -> None:
    """``--workers 2`` with the memory store (the default, named by --store, or
    given in the Site's code) exits 2 with one line saying why (each worker
    would have its own sessions) and what to use (sqlite:// or redis://),
    and nothing keeps serving."""
    port = free_port()
    args = ["serve", target, "--port", str(port), "--app-dir", str(app_dir), "--workers", "2"]
    if store is not None:
        args += ["--store", store]
    result = run_lapse(args, app_dir)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("lapse: error: 2 workers cannot share the memory session store")
    assert "each worker process would keep its own sessions" in lines[0]
    assert "--store sqlite:///" in lines[0] and "--store redis://" in lines[0]
    assert not port_accepts(port)


# -- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://relative.db", "--store sqlite://relative.db: bad SQLite"),
        ("sqlite:///" + "a" * 5000, "(5010 characters): the SQLite store path is too long"),
        ("sqlite:///a\x1b[2Jb.db", "--store sqlite:///a\\x1b[2Jb.db: a session store URL cannot"),
    ],
    ids=["no-host", "path-too-long", "control-character"],
)
def test_bad_store_url_exits_2_before_importing(
    app_dir: Path, tmp_path: Path, url: str, message: str
) -> None:
    """A store URL that names no store (or no file: a path too long, a
    control character) exits 2 with the StoreConfigError's message on one
    short line, the URL cut and escaped, before the module is imported."""
    marker = tmp_path / "imported"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lapse",
            "serve",
            "cliapp:site",
            "--app-dir",
            str(app_dir),
            "--store",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "CLIAPP_IMPORTED": str(marker)},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("lapse: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and len(result.stderr) < 400
    assert not marker.exists()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("cliapp", r"'cliapp' is not MODULE:ATTR"),
        ("nosuchmodule:app", r"no module named 'nosuchmodule'"),
        ("cliapp:missing", r"module 'cliapp' \(.*cliapp.py\) has no attribute 'missing'; "),
        ("cliapp:not_an_app", r"cliapp:not_an_app is not a lapse Site nor an ASGI application"),
        ("cliapp:Visits", r"cliapp:Visits is not .*: it is a class; name an instance"),
        ("cliapp:two_args", r".*: it cannot be called with \(scope, receive, send\)"),
        ("cliapp:root", r"cliapp:root is a Resource, not a Site"),
        ("broken:app", r"importing 'broken' failed at .*broken.py:2: RuntimeError: the data"),
    ],
)
def test_bad_module_attr_is_one_line_and_exit_2(app_dir: Path, target: str, message: str) -> None:
    """A MODULE:ATTR that names nothing servable (no colon, no such module or
    attribute, not a Site or ASGI app, a module that fails to import) exits 2
    with one line on stderr, never a traceback."""
    result = run_lapse(["serve", target, "--app-dir", str(app_dir)], app_dir)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search("^lapse: error: " + message, lines[0]), lines[0]


def test_a_module_that_serves_itself_at_import_is_refused(tmp_path: Path) -> None:
    """examples/session_endings.py calls reactor.listenTCP(8080) and
    reactor.run() when imported: ``lapse serve session_endings:factory``
    refuses it (exit 2) before it binds anything, naming the call and its
    line, and saying to run it with python or guard the calls."""
    result = run_lapse(
        ["serve", "session_endings:factory", "--app-dir", str(EXAMPLES), "--port", "0"], tmp_path
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "module 'session_endings' serves itself when imported" in line
    assert f"reactor.listenTCP() at {EXAMPLES / 'session_endings.py'}:" in line
    assert 'if __name__ == "__main__":' in line


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--certfile", "cert.pem"], "--certfile without --keyfile"),
        (["--keyfile", "key.pem"], "--keyfile without --certfile"),
        (["--certfile", "nope.pem", "--keyfile", "nope.pem"], "--certfile nope.pem: no such file"),
        (["--fail-fast"], "--fail-fast goes with --workers N"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(
    app_dir: Path, options: list[str], message: str
) -> None:
    """TLS needs both files and they must exist; several workers need a fixed port."""
    result = run_lapse(["serve", "cliapp:site", "--app-dir", str(app_dir), *options], app_dir)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("lapse: error: ") and message in line, line


def test_a_port_in_use_exits_1(app_dir: Path) -> None:
    """A port someone listens on already: one line, exit 1 (one worker or several)."""
    port = free_port()
    with socket.socket() as taken:
        taken.bind((HOST, port))
        taken.listen()
        for workers in ("1", "2"):
            result = run_lapse(
                [
                    "serve",
                    "cliapp:site",
                    "--app-dir",
                    str(app_dir),
                    "--port",
                    str(port),
                    "--workers",
                    workers,
                    "--store",
                    f"sqlite:///{app_dir / 'x.db'}",
                ],
                app_dir,
            )
            assert result.returncode == 1, result.stderr
            (line,) = result.stderr.strip().splitlines()
            assert line.startswith(f"lapse: error: Couldn't listen on {HOST}:{port}"), line


def test_live_view_option_mounts_the_view_in_front_of_the_site(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--live-view _lapse`` serves the live view at /_lapse/ with the token
    from LAPSE_LIVEVIEW_TOKEN (a request without it is refused), while every
    other path still reaches the Site, whose root is a leaf. The access log
    on stderr never shows the token, sent right or wrong in a query."""
    token = "a-long-live-view-token"
    monkeypatch.setenv("LAPSE_LIVEVIEW_TOKEN", token)
    port = free_port()
    args = ["cliapp:site", "--port", str(port), "--app-dir", str(app_dir), "--live-view", "_lapse"]
    with lapse_serving([*args, "--log-level", "info"], port, app_dir) as server:
        assert request(port, f"/_lapse/?token={token}").status == 303
        assert request(port, f"/_lapse/api/summary?token={token}x").status == 403
        wait_for_stderr(server, r"summary\?token=\[redacted\] HTTP/1.1\" 403", 10)
        assert '"GET /_lapse/?token=[redacted] HTTP/1.1" 303' in server.stderr_text()
        visit = request(port, "/anything")
        assert visit.status == 200 and "visits=1" in visit.text
        summary = request(port, "/_lapse/api/summary", headers={"Authorization": f"Bearer {token}"})
        assert summary.status == 200, summary.text
        assert '"live": 1' in summary.text.replace('"live":1', '"live": 1')
        refused = request(port, "/_lapse/api/summary")
        assert refused.status in (403, 404)
        assert "live view at /_lapse/, with the token in LAPSE_LIVEVIEW_TOKEN" in (
            server.stderr_text()
        )
        assert token not in server.stderr_text()


def test_live_view_without_a_token_wants_a_loopback_host(app_dir: Path) -> None:
    """Without LAPSE_LIVEVIEW_TOKEN the view answers loopback clients only,
    and only under a loopback Host: over a real socket from 127.0.0.1, Host
    127.0.0.1:PORT or localhost is served, a DNS-rebinding Host
    (evil.example:PORT) gets the 404 of any refused request."""
    port = free_port()
    args = ["cliapp:site", "--port", str(port), "--app-dir", str(app_dir), "--live-view", "_lapse"]
    with lapse_serving(args, port, app_dir):
        assert request(port, "/_lapse/api/summary").status == 200
        local = request(port, "/_lapse/api/summary", headers={"Host": f"localhost:{port}"})
        assert local.status == 200
        rebound = request(port, "/_lapse/api/summary", headers={"Host": f"evil.example:{port}"})
        assert rebound.status == 404
        assert request(port, "/anything", headers={"Host": "evil.example"}).status == 200


def test_live_view_option_is_refused_for_a_plain_asgi_app(app_dir: Path) -> None:
    """The live view needs a lapse Site: with another ASGI app, --live-view
    exits 2 with one line saying what to do instead."""
    result = run_lapse(
        ["serve", "cliapp:asgi", "--port", "0", "--app-dir", str(app_dir), "--live-view", "_lapse"],
        app_dir,
    )
    assert result.returncode == 2, result.stderr
    assert "--live-view needs a lapse Site" in result.stderr
    assert "Traceback" not in result.stderr
