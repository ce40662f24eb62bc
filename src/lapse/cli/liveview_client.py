"""The client side of ``lapse sessions --server``: a live view's JSON API.

Standard library only (``urllib``); see :class:`LiveViewClient`.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from lapse.cli.common import EXIT_FAILED, CommandError, _shown
from lapse.cli.parser import TOKEN_ENV

__all__ = ["LiveViewClient", "server_base"]

HTTP_TIMEOUT = 10.0
"""Seconds ``--server`` waits for each answer of the live view."""

SERVER_PAGE = 500
"""Rows per ``api/sessions`` request at most (the live view's own cap)."""

NO_INDEX = "the session store keeps no index of sessions by principal"
"""The live view's 501 error for a store without one (its ``_api.NO_INDEX``)."""

SERVER_THREADS = 8
"""``expire --server``: POST requests in flight at once."""


class LiveViewClient:
    """The JSON API of a live view at ``base`` (a URL ending in ``/``).

    Standard library only (urllib); redirects are not followed (the token
    would follow them); every failure is a one-line :class:`CommandError`.

    Without a token (a view open to loopback clients), a POST needs the CSRF
    pair a browser gets with the page: the view's CSRF cookie and the HMAC of
    it the page embeds. The client GETs the page once, as a browser does, and
    sends both; a cross-site browser form still cannot.
    """

    def __init__(self, base: str, token: str | None) -> None:
        import threading
        import urllib.request

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kw: Any) -> None:
                return None

        self.base = base
        self._token = token
        self._opener = urllib.request.build_opener(NoRedirect)
        self._csrf_lock = threading.Lock()
        self._csrf_pair: tuple[str, str] | None = None

    def _send(self, request: Any) -> tuple[int, Any, bytes]:
        """(status, headers, body) of ``request``; unreachable: CommandError."""
        import urllib.error

        if self._token is not None:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with self._opener.open(request, timeout=HTTP_TIMEOUT) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            raw = b""
            with contextlib.suppress(Exception):
                raw = exc.read()
            exc.close()
            return exc.code, exc.headers, raw
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CommandError(
                f"cannot reach the server at {self.base}: {reason}", EXIT_FAILED
            ) from None

    def _csrf(self) -> tuple[str, str]:
        """(CSRF cookie nonce, X-Lapse-CSRF value), from the view's page, once."""
        with self._csrf_lock:
            if self._csrf_pair is None:
                self._csrf_pair = self._fetch_csrf()
            return self._csrf_pair

    def _fetch_csrf(self) -> tuple[str, str]:
        import urllib.request
        from http.cookies import CookieError, SimpleCookie

        from lapse.web.liveview import CSRF_COOKIE

        request = urllib.request.Request(self.base, method="GET")
        request.add_header("Accept", "text/html")
        status, headers, raw = self._send(request)
        self._check(status, "", None, None)
        nonce = None
        for header in headers.get_all("set-cookie") or []:
            jar: SimpleCookie = SimpleCookie()
            with contextlib.suppress(CookieError):
                jar.load(header)
            if CSRF_COOKIE in jar:
                nonce = jar[CSRF_COOKIE].value
        found = re.search(rb'<meta name="lapse-csrf" content="([0-9a-f]{64})">', raw)
        if nonce is None or found is None:
            raise CommandError(
                f"the page at {self.base} has no CSRF token to send with a change "
                "(is it a lapse live view?)",
                EXIT_FAILED,
            )
        return nonce, found.group(1).decode("ascii")

    def request(
        self,
        path: str,
        body: Any = None,
        not_found: str | None = None,
    ) -> Any:
        """The JSON answer to GET ``path`` (POST ``body`` as JSON if given).

        A 404 whose JSON error is ``not_found`` returns None (the API's own
        "no such session"); any other failure is a :class:`CommandError`.
        """
        import json
        import urllib.request

        url = self.base + path
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
            if self._token is None:
                nonce, csrf = self._csrf()
                request.add_header("Cookie", f"{_csrf_cookie_name()}={nonce}")
                request.add_header("X-Lapse-CSRF", csrf)
        status, headers, raw = self._send(request)
        kind = headers.get("content-type", "")
        answer: Any = None
        if kind.split(";")[0].strip() == "application/json":
            with contextlib.suppress(ValueError):
                answer = json.loads(raw)
        return self._check(status, path, answer, not_found)

    def _check(self, status: int, path: str, answer: Any, not_found: str | None) -> Any:
        """``answer`` if ``status`` is a 200 with a JSON object (None for the
        404 ``not_found``); any other answer is a CommandError saying why."""
        error = answer.get("error") if isinstance(answer, dict) else None
        where = path.split("?")[0] or "the page"
        if status == 501 and error == NO_INDEX:
            raise CommandError(
                f"the server at {self.base} cannot list or end sessions by user: {error}",
                EXIT_FAILED,
            )
        if status == 400 and isinstance(error, str) and error.startswith(("user", "except")):
            raise CommandError(
                f"the live view at {self.base} refused it: {_shown(error)}", EXIT_FAILED
            )
        if status == 403:
            if isinstance(error, str) and "CSRF" in error:
                raise CommandError(
                    f"the live view at {self.base} refused the change (403 Forbidden: "
                    f"{error}): give its token with --token or ${TOKEN_ENV}",
                    EXIT_FAILED,
                )
            if self._token is not None:
                raise CommandError(
                    f"the live view at {self.base} refused the token given (403 Forbidden): "
                    f"check --token or ${TOKEN_ENV}",
                    EXIT_FAILED,
                )
            raise CommandError(
                f"the live view at {self.base} wants a token (403 Forbidden): give the "
                f"server's {TOKEN_ENV} with --token or in ${TOKEN_ENV}",
                EXIT_FAILED,
            )
        if status == 404:
            if not_found is not None and error == not_found:
                return None
            raise CommandError(
                f"no live view at {self.base} (404 Not Found for {where}): give "
                "the URL where the app mounts LiveView (e.g. http://HOST:PORT/_lapse/); "
                "a view without a token answers only loopback clients",
                EXIT_FAILED,
            )
        if 300 <= status < 400:
            raise CommandError(
                f"the server at {self.base} redirects (HTTP {status}) instead of answering: "
                "give the live view's own base URL",
                EXIT_FAILED,
            )
        if status == 200 and not path:
            return None  # the page (HTML)
        if status != 200 or not isinstance(answer, dict):
            detail = f": {error}" if isinstance(error, str) else ""
            what = f"HTTP {status}{detail}" if status != 200 else "something other than JSON"
            raise CommandError(
                f"the server at {self.base} answered {where} with {what} "
                "(is it a lapse live view?)",
                EXIT_FAILED,
            )
        return answer

    def summary(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("api/summary")
        return answer

    def page(self, cursor: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        from urllib.parse import urlencode

        query = {"limit": str(min(limit, SERVER_PAGE))}
        if cursor is not None:
            query["cursor"] = cursor
        answer = self.request("api/sessions?" + urlencode(query))
        rows = answer.get("sessions")
        following = answer.get("next")
        if not isinstance(rows, list) or not (following is None or isinstance(following, str)):
            raise CommandError(
                f"the server at {self.base} answered api/sessions with an unknown shape",
                EXIT_FAILED,
            )
        return rows, following

    def session(self, handle: str) -> dict[str, Any] | None:
        from urllib.parse import urlencode

        answer = self.request(
            "api/session?" + urlencode({"id": handle}), not_found="no such session"
        )
        if answer is None:
            return None
        row: dict[str, Any] = answer["session"]
        row["now"] = answer.get("now")
        return row

    def user_sessions(self, user: str, limit: int) -> tuple[list[dict[str, Any]], int]:
        """Up to ``limit`` (at most :data:`SERVER_PAGE`) rows of ``user``'s
        live sessions, and how many it has."""
        from urllib.parse import urlencode

        query = urlencode({"user": user, "limit": str(min(limit, SERVER_PAGE))})
        answer = self.request("api/sessions?" + query)
        rows, live = answer.get("sessions"), answer.get("live")
        if answer.get("user") != user:
            # A view without the filter answers every session: never show
            # those as this user's.
            raise CommandError(
                f"the live view at {self.base} does not list sessions by user "
                "(a lapse older than this one?)",
                EXIT_FAILED,
            )
        if not isinstance(rows, list) or not isinstance(live, int):
            raise CommandError(
                f"the server at {self.base} answered api/sessions with an unknown shape",
                EXIT_FAILED,
            )
        return rows, live

    def expire_user(self, user: str, keep: str | None) -> list[str]:
        """End ``user``'s live sessions but the row ``keep``; their short uids."""
        body: dict[str, str] = {"user": user}
        if keep is not None:
            body["except"] = keep
        answer = self.request("api/expire-user", body=body, not_found="not found")
        if answer is None:
            raise CommandError(
                f"the live view at {self.base} has no api/expire-user (a lapse older "
                "than this one?)",
                EXIT_FAILED,
            )
        uids = answer.get("uids")
        if not isinstance(uids, list) or not all(isinstance(uid, str) for uid in uids):
            raise CommandError(
                f"the server at {self.base} answered api/expire-user with an unknown shape",
                EXIT_FAILED,
            )
        return uids

    def expire(self, handle: str) -> bool:
        answer = self.request("api/expire", body={"id": handle}, not_found="no such session")
        return answer is not None and bool(answer.get("expired"))


def _csrf_cookie_name() -> str:
    from lapse.web.liveview import CSRF_COOKIE

    return CSRF_COOKIE


def server_base(url: str) -> str:
    """The ``--server`` URL, checked: http(s), a host, no query; ends in ``/``."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise CommandError(f"--server {url}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CommandError(
            f"--server {url}: give the live view's http(s) URL, e.g. http://127.0.0.1:8080/_lapse/"
        )
    if parts.query or parts.fragment:
        raise CommandError(
            f"--server: give the live view's base URL without a query "
            f"(the token goes in --token or ${TOKEN_ENV})"
        )
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return f"{parts.scheme}://{parts.netloc}{path}"
