"""The ``lapse`` command line: ``lapse serve`` and ``lapse sessions``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lapse import __version__, settings
from lapse.cli.common import _at_most, _port_number, _positive, _principal, _rate, _seconds

SCAN_BATCH = 1000
"""Sessions per scan page (and per batch of concurrent expires)."""

MAX_BUCKETS = 1000
"""``stats --buckets``: at most this many slices (each is a line of output)."""

MAX_HORIZON = 10 * 365 * 86400
"""``stats --horizon``: at most ten years, in seconds."""

MAX_BATCH = 100_000
"""``expire --all --batch``: at most this many sessions per page."""

TOKEN_ENV = settings.LIVEVIEW_TOKEN.name

GRACEFUL_TIMEOUT = 10.0
"""``--graceful-timeout``'s default: seconds requests in flight may take to
finish once a stop is asked (the reactor's ``graceful_timeout``)."""

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _trust_spec(text: str) -> int | str:
    """``--trusted-proxies N|ADDRESSES``, checked as ``trust_proxy_headers`` checks it."""
    from lapse.web._proxy import proxy_trust

    digits = text.strip()
    spec: int | str = int(digits) if digits.isascii() and digits.isdigit() else text
    try:
        proxy_trust(spec)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(
            f"{exc} (give a number of proxies, e.g. 2, or their addresses and networks, "
            "e.g. 10.0.0.0/8,192.0.2.7)"
        ) from None
    return spec


# The connection options of ``lapse serve``: (option, HTTPLimits/Site field, type).
_CONNECTION_OPTIONS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("--max-connections", "max_connections", lambda text: _positive(text)),
    ("--header-timeout", "header_timeout", _seconds),
    ("--body-timeout", "body_timeout", _seconds),
    ("--body-min-rate", "body_min_rate", _rate),
    ("--keep-alive-timeout", "keep_alive_timeout", _seconds),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``lapse`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="lapse",
        description="lapse: a web server whose core is the session lifecycle.",
        epilog="Run 'lapse serve --help' or 'lapse sessions --help' for their options.",
    )
    parser.add_argument("--version", action="version", version=f"lapse {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a lapse Site or an ASGI application",
        description=(
            "Import MODULE and serve its ATTR, a lapse Site or any ASGI 3 application, "
            "until SIGINT (Ctrl-C) or SIGTERM; requests in flight then finish (up to "
            "--graceful-timeout seconds, 10 by default)."
        ),
        epilog=(
            "Examples: 'lapse serve myapp:site', "
            "'lapse serve myapp:site --port 8000 --store sqlite:///sessions.db --workers 4'. "
            "The module must not listen or run the reactor when imported: keep "
            "reactor.listenTCP(...) and reactor.run() under 'if __name__ == \"__main__\":'. "
            "Exit status: 0 after a clean stop, 2 for a bad command line (options, "
            "MODULE:ATTR, store URL, TLS files), 1 if serving failed."
        ),
    )
    serve.add_argument(
        "target",
        metavar="MODULE:ATTR",
        help="the module to import and the Site or ASGI app in it, e.g. myapp:site",
    )
    serve.add_argument(
        "--host",
        "--interface",
        dest="host",
        default="127.0.0.1",
        help="the address to listen on (default: 127.0.0.1; 0.0.0.0 for every IPv4 one)",
    )
    serve.add_argument(
        "--port",
        type=_port_number,
        default=8080,
        help="the TCP port (default: 8080; 0 picks a free one, with one worker)",
    )
    serve.add_argument("--certfile", help="serve HTTPS with this PEM certificate (chain)")
    serve.add_argument("--keyfile", help="the PEM private key of --certfile (not encrypted)")
    serve.add_argument(
        "--store",
        metavar="URL",
        help=(
            "the session store: memory: (the default), sqlite:///path.db, "
            "redis://host:port/db or postgresql://user:password@host:port/dbname; set as "
            "LAPSE_SESSION_STORE before the module is "
            "imported, so it applies to every Site made without store= in its code"
        ),
    )
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help=(
            "N worker processes serving one socket the supervisor binds, each importing "
            "the app; a worker that dies is restarted. Sessions then need a shared store "
            "(sqlite://, redis:// or postgresql://). Default: 1"
        ),
    )
    serve.add_argument(
        "--fail-fast",
        action="store_true",
        help=(
            "with --workers: when a worker dies, stop the others and exit with status 1 "
            "instead of restarting it"
        ),
    )
    serve.add_argument(
        "--trust-proxy",
        action="store_const",
        const=True,
        default=False,
        help=(
            "believe X-Forwarded-For and X-Forwarded-Proto as set by one proxy in front "
            "(the right-most entry). A Site gets it as trust_proxy_headers; any other ASGI "
            "app gets its scope's client and scheme from them"
        ),
    )
    serve.add_argument(
        "--trusted-proxies",
        dest="trust_proxy",
        type=_trust_spec,
        metavar="N|ADDRESSES",
        help=(
            "as --trust-proxy, for a chain of N proxies (the N-th entry from the right), "
            "or for the proxies at these addresses or networks (e.g. 10.0.0.0/8,192.0.2.7: "
            "believed only from them)"
        ),
    )
    serve.add_argument(
        "--live-view",
        metavar="SEGMENT",
        help=(
            "serve the live view of the Site's sessions at /SEGMENT/ (e.g. _lapse); "
            "with LAPSE_LIVEVIEW_TOKEN set, only with that token (never put it on the "
            "command line), otherwise only to loopback clients. Off by default"
        ),
    )
    serve.add_argument(
        "--log-level",
        type=str.lower,
        choices=_LOG_LEVELS,
        help=(
            "log to stderr at this level (info: the access log too; debug: session "
            "events too), as LAPSE_LOG_LEVEL does; unless the app configures logging"
        ),
    )
    connection_help = {
        "--max-connections": (
            "N",
            "open connections at most; beyond, a new one gets 503 with Retry-After "
            "(default: the file limit, ulimit -n, less an eighth: 896 for 1024)",
        ),
        "--header-timeout": (
            "SECONDS",
            "for a request's line and headers to arrive, else 408 (default: 20)",
        ),
        "--body-timeout": (
            "SECONDS",
            "for a request body to arrive, plus a second per --body-min-rate bytes "
            "received, else 408 (default: 20)",
        ),
        "--body-min-rate": (
            "BYTES",
            "the body rate kept up indefinitely: bytes per second of --body-timeout (default: 500)",
        ),
        "--keep-alive-timeout": (
            "SECONDS",
            "an idle connection is closed after it, before its first request too (default: 5)",
        ),
    }
    for option, field_name, convert in _CONNECTION_OPTIONS:
        metavar, text = connection_help[option]
        serve.add_argument(option, dest=field_name, type=convert, metavar=metavar, help=text)
    serve.add_argument(
        "--graceful-timeout",
        type=_seconds,
        default=GRACEFUL_TIMEOUT,
        metavar="SECONDS",
        help=(
            "once a stop is asked, requests in flight may take this long to finish; "
            "those still running then are ended (503 if nothing was sent), and one "
            "line says how many (default: 10)"
        ),
    )
    serve.add_argument(
        "--app-dir",
        default=".",
        help="the directory to import MODULE from, put first on sys.path (default: .)",
    )
    # Internal: set by the supervisor on the command lines of its workers.
    serve.add_argument("--worker-ready-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    _add_sessions_parser(commands)
    return parser


def _add_sessions_parser(commands: Any) -> None:
    store_option = argparse.ArgumentParser(add_help=False)
    store_option.add_argument(
        "--store",
        metavar="URL",
        help=(
            "the shared session store: sqlite:///path.db, redis://host:port/db or "
            "postgresql://user:password@host:port/dbname (default: $LAPSE_SESSION_STORE)"
        ),
    )
    store_option.add_argument(
        "--server",
        metavar="URL",
        help=(
            "instead of --store: a running server's live view, by its base URL (e.g. "
            "http://127.0.0.1:8080/_lapse/), for any store, memory: included; the "
            "server expires sessions itself, so their callbacks and hooks run"
        ),
    )
    store_option.add_argument(
        "--token",
        metavar="TOKEN",
        help=(
            f"with --server: the live view's token, sent as 'Authorization: Bearer' "
            f"(default: ${TOKEN_ENV}; none for a view open to loopback clients)"
        ),
    )
    sessions = commands.add_parser(
        "sessions",
        help="list, show, expire sessions of a store or a server; their statistics",
        description=(
            "Inspect and end the sessions of a shared store (SQLite, Redis or PostgreSQL, with "
            "--store), from any machine that reaches it, or of any store through a running "
            "server's live view (with --server, the memory: store included). Reading never "
            "touches a session."
        ),
        epilog=(
            "Exit status: 0 on success, 2 for a bad command line or store URL (or the "
            "memory: store with --store: use --server), 1 if the store or the server cannot "
            "be reached, the server refuses (403) or has no live view there (404), or a "
            "session is not live."
        ),
    )
    actions = sessions.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        parents=[store_option],
        help="live sessions, latest deadline (most recent activity) first",
        description=(
            "Live sessions, the one ending last (for one timeout: the most recently "
            "active) first: uid, age, idle time, time left, principal (USER; - for none). "
            "With --user NAME: that principal's sessions. With --server: the rows of "
            "the live view, in its order, each with the ID that 'show' and 'expire' take "
            "(an HMAC of the uid: the live view never gives out uids, only their start)."
        ),
    )
    listing.add_argument(
        "--limit", type=_positive, default=50, metavar="N", help="at most N (default: 50)"
    )
    listing.add_argument(
        "--user",
        type=_principal,
        metavar="NAME",
        help=(
            "only the live sessions of this principal (session.set_principal), most "
            "recently used first, through the store's index of sessions by principal"
        ),
    )
    listing.add_argument(
        "--full", action="store_true", help="whole uids, not shortened (not with --server)"
    )
    listing.add_argument(
        "--json",
        action="store_true",
        help=(
            'one JSON object: {"sessions": [one object per session, as shown], "live": '
            'the live count, "store" or "server": where}'
        ),
    )
    show = actions.add_parser(
        "show",
        parents=[store_option],
        help="one session, data included (not with --server)",
        description=(
            "One live session: its times, its principal and its data. With --server: what "
            "the live view "
            "has for the row ID ('list' shows IDs): its times; the data is not exposed by "
            "the live view."
        ),
    )
    show.add_argument(
        "uid",
        metavar="UID|ID",
        help=(
            "the uid, whole (see 'list --full') or its start as 'list' shows it "
            "(at least 6 characters, one live session's); with --server, the row ID "
            "'list' shows"
        ),
    )
    show.add_argument("--json", action="store_true", help="one JSON object")
    expire = actions.add_parser(
        "expire",
        parents=[store_option],
        help="end sessions now, as a logout does",
        description=(
            "End sessions now through the store, as a logout does: the servers' durable "
            "expiry hook and notifyOnExpire callbacks still run for each. With --user NAME: "
            "every live session of that principal (log out everywhere), but --except's. "
            "With --server: through the server (POST api/expire per session, "
            "api/expire-user for --user), which runs them itself."
        ),
    )
    expire.add_argument(
        "uids",
        metavar="UID|ID",
        nargs="*",
        help=(
            "the sessions to end: uids, whole or their start as 'list' shows them (as "
            "show takes them); with --server, row IDs as 'list' shows them"
        ),
    )
    expire.add_argument("--all", action="store_true", help="end every live session")
    expire.add_argument(
        "--user",
        type=_principal,
        metavar="NAME",
        help="end every live session of this principal; prints how many and which",
    )
    expire.add_argument(
        "--except",
        dest="keep",
        metavar="UID|ID",
        help=(
            "with --user: keep this one session (its uid or start, as show takes it; "
            "with --server, its row ID)"
        ),
    )
    expire.add_argument("--yes", action="store_true", help="with --all: do not ask first")
    expire.add_argument(
        "--batch",
        type=_at_most(MAX_BATCH),
        default=SCAN_BATCH,
        metavar="N",
        help=f"with --all: sessions per batch (default: {SCAN_BATCH})",
    )
    stats = actions.add_parser(
        "stats",
        parents=[store_option],
        help="how many sessions are live, and when they end",
        description=(
            "The live count and a histogram of the upcoming expiries. With --server: the "
            "live view's summary, also sessions created and ended per minute; its "
            "histogram is fixed (one hour in 5-minute slices)."
        ),
    )
    stats.add_argument(
        "--horizon",
        type=_at_most(MAX_HORIZON),
        metavar="SECONDS",
        help=(
            f"how far ahead the histogram looks (default: 3600, at most {MAX_HORIZON}: "
            "ten years; not with --server)"
        ),
    )
    stats.add_argument(
        "--buckets",
        type=_at_most(MAX_BUCKETS),
        metavar="N",
        help=f"slices of the histogram (default: 12, at most {MAX_BUCKETS}; not with --server)",
    )
    stats.add_argument("--json", action="store_true", help="one JSON object")
    migrate = actions.add_parser(
        "migrate",
        help="make or upgrade a PostgreSQL store's tables now, or print their SQL",
        description=(
            "Make a PostgreSQL store's tables (in the URL's ?schema=, named by its "
            "?table_prefix=), or bring older ones up to this lapse's version, now: a deploy "
            "step run as a role that may create tables, so the servers' role need not. "
            "With --sql, print the script instead (one transaction; nothing is contacted), "
            "for teams that apply migrations themselves. The store does the same on first "
            "use when its role may. SQLite files and Redis need no such step."
        ),
    )
    migrate.add_argument(
        "--store",
        metavar="URL",
        help="the store: postgresql://user:password@host:port/dbname (default: "
        "$LAPSE_SESSION_STORE)",
    )
    migrate.add_argument("--sql", action="store_true", help="print the SQL, do not connect")
    migrate.add_argument(
        "--from-version",
        type=int,
        metavar="N",
        help="with --sql: only the steps from tables of version N (default: 0, none)",
    )
