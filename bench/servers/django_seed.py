"""The seed's ``GET /logme`` on Django's database session backend, on PostgreSQL.

Usage: python bench/servers/django_seed.py PORT --database URL [--interface wsgi|asgi]
       python bench/servers/django_seed.py migrate --database URL

``django.contrib.sessions.backends.db`` (the default ``SESSION_ENGINE``) keeps
each session as a row of ``django_session`` (key, signed JSON, expire date) in
the ``default`` database: here PostgreSQL through psycopg 3. ``migrate`` creates
that table (the bench runs it once per run).

Django has no expiry callback, so the view only marks the session on first
sight (``seen``). ``SESSION_COOKIE_AGE = 5`` is the seed's timeout, and
``SESSION_SAVE_EVERY_REQUEST = True`` makes it an idle timeout: every request
saves the session with a fresh expire date (an ``UPDATE`` in a transaction) and
re-sends the cookie, as Django's docs say to do for that. A touch is therefore
Django's load (``SELECT ... WHERE session_key = %s AND expire_date > now``) plus
that save; a create is a key check (``SELECT``), an ``INSERT`` in a
transaction, and the cookie. Expired rows stay until ``clearsessions`` runs
(Django does not remove them itself).

Served the way a production Django in one process would be, with what this
machine has (no gunicorn): ``wsgi`` (default) is Django's WSGI handler on
uvicorn's WSGI interface (httptools, uvloop), whose pool of 10 threads runs the
views, each thread keeping its own persistent connection (``CONN_MAX_AGE =
None``): what gunicorn's threaded worker does. ``asgi`` (for comparison only)
is Django's ASGI handler on uvicorn: Django then runs each request's sync code
(the session middleware, the view) in a thread of its own per request, so a
persistent connection is never reused without psycopg's connection pool
(``psycopg_pool``, not installed): each request connects anew, the old
connections linger until collected, and under wrk the server runs out of
connections (measured once: about 120 requests/s, with "too many clients" errors).

Only the session middleware, ``DEBUG = False`` (no query log), no access log,
no ``Server`` header, 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import secrets
from typing import Any
from urllib.parse import unquote, urlsplit

from django.http import HttpRequest, HttpResponse
from django.urls import path

MAX_AGE = 5


def database_settings(url: str) -> dict[str, Any]:
    """Django's ``DATABASES['default']`` for a ``postgresql://user[:pw]@host:port/db`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise SystemExit(f"--database: not a postgresql://user@host:port/dbname URL: {url!r}")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")) or "postgres",
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname,
        "PORT": str(parts.port or 5432),
        "CONN_MAX_AGE": None,  # persistent: one connection per thread, kept
        "CONN_HEALTH_CHECKS": False,
    }


def configure(url: str) -> None:
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        SECRET_KEY=secrets.token_hex(32),
        ALLOWED_HOSTS=["127.0.0.1"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=["django.contrib.sessions"],
        MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware"],
        DATABASES={"default": database_settings(url)},
        SESSION_ENGINE="django.contrib.sessions.backends.db",
        SESSION_COOKIE_AGE=MAX_AGE,
        SESSION_SAVE_EVERY_REQUEST=True,
        USE_TZ=True,
        USE_I18N=False,
        LOGGING_CONFIG=None,
    )
    import django

    django.setup()


def logme(request: HttpRequest) -> HttpResponse:
    session = request.session
    if "seen" not in session:  # first sight: no expiry callback in Django
        session["seen"] = True
    return HttpResponse(b"")


urlpatterns = [path("logme", logme)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("port", help="the TCP port, or 'migrate' to create the session table")
    parser.add_argument("--database", required=True, help="postgresql://user@host:port/dbname")
    parser.add_argument("--interface", choices=("wsgi", "asgi"), default="wsgi")
    args = parser.parse_args()
    configure(args.database)
    if args.port == "migrate":
        from django.core.management import call_command

        call_command("migrate", "sessions", verbosity=0, interactive=False)
        return
    if args.interface == "wsgi":
        from django.core.wsgi import get_wsgi_application

        app: Any = get_wsgi_application()
    else:
        from django.core.asgi import get_asgi_application

        app = get_asgi_application()
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(args.port),
        interface="wsgi" if args.interface == "wsgi" else "asgi3",
        log_level="warning",
        access_log=False,
        http="httptools",
        loop="uvloop",
        proxy_headers=False,
        server_header=False,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
