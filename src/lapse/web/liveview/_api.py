"""The live view's JSON API: ``api/`` and its children, one resource each.

- ``GET api/summary``: live count, counters, sessions created and ended per
  minute over the last hour, upcoming expiries in 5-minute buckets;
- ``GET api/sessions?cursor=&limit=``: a page of live sessions and the next
  cursor; with ``user=NAME``, that principal's live sessions (the store's
  ``sessions_of``), most recently used first, up to ``limit``;
- ``GET api/session?id=``: one row by its id, as it is now; 404 if not live;
- ``POST api/expire`` (JSON ``{"id": ...}``): end one session, as
  ``session.expire()`` does (its callbacks and the durable hook run);
- ``POST api/expire-user`` (JSON ``{"user": NAME}``, optionally ``"except":
  <row id>``): end every live session of that principal through the host's
  ``expire_principal``, as a logout ends each.

Every row carries its session's ``principal`` (None if unbound): text a user
chose, sent as JSON and shown by the page as text, never as markup.

Every resource here sits behind the view's access check (``LiveView``); a
method a resource does not answer is a JSON 405, a path under it a JSON 404.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from lapse.sessions import Session, short_uid
from lapse.sessions.store import PRINCIPAL_MEMBERS, check_principal
from lapse.web.error import UnsupportedMethod
from lapse.web.liveview._access import granted
from lapse.web.resource import Resource

if TYPE_CHECKING:
    from lapse.web.liveview._view import LiveView

__all__ = ["Api", "Endpoint", "NotFound", "json_answer"]

HORIZON = 3600.0
BUCKETS = 12
PAGE_LIMIT = 50
MAX_LIMIT = 500
MAX_BODY = 4096
"""The most bytes a POST to the API may carry (``{"id": ...}`` is about 70)."""
MAX_CURSOR = 1024
"""The longest cursor the view reads back."""
MAX_ID = 512
"""The longest row id the view reads back (a uid of 368 bytes; lapse's are 24)."""

_LIMIT = re.compile(rb"[0-9]{1,3}")
_ID_HELP = "id is not a row id this live view gave out (take one from api/sessions)"
NO_INDEX = "the session store keeps no index of sessions by principal"
"""The error (a 501) of ``?user=`` and ``expire-user`` on a store without one."""


def json_answer(request: Any, value: Any, status: int = 200) -> bytes:
    """``value`` as the JSON body of the answer, with ``status``. ``<``,
    ``>`` and ``&`` are sent as ``\\u`` escapes: text users chose (a
    principal) never appears as markup, even to a reader that sniffs."""
    if status != 200:
        request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return text.translate(_JSON_ESCAPES).encode("utf-8")


_JSON_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def _error(request: Any, message: str, status: int = 400) -> bytes:
    return json_answer(request, {"error": message}, status)


class NotFound(Resource):
    """A path under the view that it does not serve: a JSON 404."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return _error(request, "not found", 404)


NOT_FOUND = NotFound()


class Endpoint(Resource):
    """A resource of the view with no children: its ``render_<METHOD>``s
    answer, any other method is a JSON 405 (with ``Allow``), any path under
    it a JSON 404."""

    def __init__(self, view: LiveView) -> None:
        super().__init__()
        self.view = view

    def getChildWithDefault(self, path: bytes, request: Any) -> Any:
        return NOT_FOUND

    def render(self, request: Any) -> Any:
        try:
            return super().render(request)
        except UnsupportedMethod as exc:
            request.setHeader(b"allow", b", ".join(exc.allowedMethods))
            return _error(request, "method not allowed", 405)


class Api(Resource):
    """``api/``: its children are the API; itself, nothing (404)."""

    def __init__(self, view: LiveView) -> None:
        super().__init__()
        self.putChild(b"summary", Summary(view))
        self.putChild(b"sessions", Sessions(view))
        self.putChild(b"session", OneSession(view))
        self.putChild(b"expire", Expire(view))
        self.putChild(b"expire-user", ExpireUser(view))

    def getChild(self, path: bytes, request: Any) -> Any:
        return NOT_FOUND

    def render(self, request: Any) -> bytes:
        return NOT_FOUND.render(request)


# -- reading the store ---------------------------------------------------------


def _deadline(session: Session) -> float:
    deadline = session.lastModified + session.sessionTimeout
    ends = session._ends_at
    return deadline if ends is None or deadline <= ends else ends


def _created(session: Session) -> float | None:
    ends, lifetime = session._ends_at, session.absolute_timeout
    return None if ends is None or lifetime is None else ends - lifetime


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 3)


class _Reader(Endpoint):
    """An endpoint that reads the site's store."""

    async def call(self, operation: Any) -> Any:
        # Through the host (its timeout, outage log, latency stats) for a
        # shared store; the memory store answers at once.
        if self.view.site.store.shared:
            return await self.view.site.call_store(operation)
        return await operation

    async def now(self) -> float:
        site = self.view.site
        if site.store.shared:
            now: float = await self.call(site.store.now())
            return now
        return float(site.reactor.seconds())

    def memory_sessions(self) -> Iterable[Session]:
        # Sessions the store checks (not ones put in site.sessions by hand).
        return (s for s in list(self.view.site.sessions.values()) if s._state is not None)

    def row(
        self,
        uid: str,
        now: float,
        created: float | None,
        last: float,
        deadline: float,
        principal: str | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self.view._keys.ids.seal(uid),
            "uid": short_uid(uid),
            "age": _finite(None if created is None else now - created),
            "idle": _finite(now - last),
            "left": _finite(deadline - now),
            "principal": principal,
        }

    def info_row(self, info: Any, now: float) -> dict[str, Any]:
        """The row of a store's ``SessionInfo``."""
        principal = getattr(info, "principal", None)
        return self.row(info.uid, now, info.created, info.last_access, info.deadline, principal)

    def has_index(self) -> bool:
        """Whether the site's store keeps sessions by principal."""
        store = self.view.site.store
        return all(callable(getattr(store, name, None)) for name in PRINCIPAL_MEMBERS)

    def uid_of(self, raw: bytes) -> str | None:
        """The uid a row id names; None if it is no id this view gave out."""
        try:
            return self.view._keys.ids.open(raw, MAX_ID)
        except ValueError:
            return None


class Summary(_Reader):
    async def render_GET(self, request: Any) -> bytes:
        site = self.view.site
        store = site.store
        now = await self.now()
        if hasattr(store, "count"):
            live = int(await self.call(store.count()))
        else:
            live = sum(1 for _ in self.memory_sessions())
        if hasattr(store, "deadlines"):
            counts = list(await self.call(store.deadlines(now, HORIZON, BUCKETS)))
        else:
            counts = [0] * BUCKETS
            width = HORIZON / BUCKETS
            for session in self.memory_sessions():
                left = _deadline(session) - now
                if 0 <= left < HORIZON:
                    counts[int(left // width)] += 1
        return json_answer(
            request,
            {
                "now": now,
                "live": live,
                "store": store.url,
                "shared": bool(store.shared),
                "stats": site.stats.as_dict(),
                "expiries": {"horizon": HORIZON, "buckets": counts},
                "refresh": self.view.refresh_seconds,
            },
        )


class Sessions(_Reader):
    async def render_GET(self, request: Any) -> bytes:
        store = self.view.site.store
        args = request.args
        sealed: bytes = args.get(b"cursor", [b""])[0]
        raw_user: bytes | None = args.get(b"user", [None])[0]
        if raw_user is not None and sealed:
            return _error(request, "cursor does not go with user (one page has them all)")
        cursor_raw: str | None = None
        if sealed:
            try:
                cursor_raw = self.view._keys.cursors.open(sealed, MAX_CURSOR)
            except ValueError:
                return _error(
                    request, "cursor is not one this view gave out (start again without it)"
                )
        raw_limit: bytes | None = args.get(b"limit", [None])[0]
        limit = PAGE_LIMIT
        if raw_limit is not None:
            if not _LIMIT.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= MAX_LIMIT:
                return _error(request, f"limit is a whole number from 1 to {MAX_LIMIT}")
            limit = int(raw_limit)
        if raw_user is not None:
            return await self.of_user(request, raw_user, limit)
        now = await self.now()
        rows: list[dict[str, Any]] = []
        following: str | None
        if hasattr(store, "scan"):
            try:
                infos, following = await self.call(store.scan(cursor_raw, limit))
            except ValueError:
                # A cursor of ours the store no longer takes (too old a scan).
                return _error(request, "cursor has expired (start again without it)")
            rows = [self.info_row(info, now) for info in infos]
        else:
            offset = int(cursor_raw) if cursor_raw is not None else 0
            page = []
            for index, session in enumerate(self.memory_sessions()):
                if index >= offset + limit:
                    break
                if index >= offset:
                    page.append(session)
            for session in page:
                rows.append(
                    self.row(
                        session.uid,
                        now,
                        _created(session),
                        session.lastModified,
                        _deadline(session),
                        session.principal,
                    )
                )
            following = str(offset + limit) if len(page) == limit else None
        cursor = None if following is None else self.view._keys.cursors.seal(following)
        return json_answer(request, {"now": now, "sessions": rows, "next": cursor})

    async def of_user(self, request: Any, raw: bytes, limit: int) -> bytes:
        """``?user=NAME``: the principal's live sessions, most recently used
        first (up to ``limit``), and how many it has."""
        user = principal_of(raw)
        if not isinstance(user, str):
            return _error(request, user.message)
        if not self.has_index():
            return _error(request, NO_INDEX, 501)
        now = await self.now()
        infos = await self.view.site.sessions_of(user)
        rows = [self.info_row(info, now) for info in infos[:limit]]
        return json_answer(
            request,
            {"now": now, "user": user, "live": len(infos), "sessions": rows, "next": None},
        )


class BadPrincipal:
    """Why a given principal is not one (the 400's message)."""

    def __init__(self, message: str) -> None:
        self.message = message


def principal_of(raw: bytes | str) -> str | BadPrincipal:
    """The principal a request names, checked as stores check it."""
    try:
        text = raw if isinstance(raw, str) else raw.decode("utf-8")
        return check_principal(text)
    except UnicodeDecodeError:
        return BadPrincipal("user is not UTF-8")
    except (TypeError, ValueError) as exc:
        return BadPrincipal(f"user: {exc}")


class OneSession(_Reader):
    async def render_GET(self, request: Any) -> bytes:
        uid = self.uid_of(request.args.get(b"id", [b""])[0])
        if uid is None:
            return _error(request, _ID_HELP)
        row: dict[str, Any] | None = None
        now = await self.now()
        store = self.view.site.store
        if hasattr(store, "info"):
            info = await self.call(store.info(uid))
            if info is not None:
                row = self.info_row(info, now)
        else:
            session = self.view.site.sessions.get(uid)
            if session is not None and session._state is not None and not session.expired:
                row = self.row(
                    uid,
                    now,
                    _created(session),
                    session.lastModified,
                    _deadline(session),
                    session.principal,
                )
        if row is None:
            return _error(request, "no such session", 404)
        return json_answer(request, {"now": now, "session": row})


class _Action(_Reader):
    """A ``POST`` endpoint that changes sessions: the CSRF token checked (a
    bearer token needs none), its body a small JSON object."""

    def refusal(self, request: Any) -> bytes | None:
        """The answer refusing the request (403, 413), or None."""
        if granted(request) != "bearer" and not self.view._access.csrf_ok(request):
            return _error(request, "missing or wrong CSRF token", 403)
        if len(request.content.getvalue()) > MAX_BODY:
            return _error(request, f"the body is over {MAX_BODY} bytes", 413)
        return None

    @staticmethod
    def body(request: Any) -> dict[str, Any]:
        """The JSON object sent; empty if it is not one (not UTF-8, not JSON,
        nested too deep, not an object)."""
        raw: bytes = request.content.getvalue()
        try:
            body = json.loads(raw.decode("utf-8") or "{}")
        except (ValueError, RecursionError):
            return {}
        return body if isinstance(body, dict) else {}


class Expire(_Action):
    async def render_POST(self, request: Any) -> bytes:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        handle = self.body(request).get("id")
        if not isinstance(handle, str):
            return _error(request, 'send a JSON object {"id": "<row id>"}')
        uid = self.uid_of(handle.encode("utf-8", "replace"))
        if uid is None:
            return _error(request, _ID_HELP)
        site = self.view.site
        session = site.sessions.get(uid)
        live_here = session is not None and not session.expired
        # On a shared store the store says whether it was live: this
        # process's copy may be stale (another worker ended the session);
        # that copy is ended too, so its callbacks run now.
        shared = site.store.shared
        expired = bool(await self.call(site.store.expire(uid))) if shared else live_here
        if live_here:
            assert session is not None
            session.expire()
        if not expired:
            # Ended already (by its timeout, by another request, by another worker).
            return json_answer(request, {"error": "no such session", "expired": False}, 404)
        return json_answer(request, {"expired": True, "uid": short_uid(uid)})


class ExpireUser(_Action):
    """``POST api/expire-user``: log a principal out everywhere (but one)."""

    async def render_POST(self, request: Any) -> bytes:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        body = self.body(request)
        given = body.get("user")
        kept = body.get("except")
        if not isinstance(given, str) or not (kept is None or isinstance(kept, str)):
            return _error(
                request, 'send a JSON object {"user": "<name>"} (and "except": "<row id>")'
            )
        user = principal_of(given)
        if not isinstance(user, str):
            return _error(request, user.message)
        except_uid = None
        if kept is not None:
            except_uid = self.uid_of(kept.encode("utf-8", "replace"))
            if except_uid is None:
                return _error(request, "except: " + _ID_HELP)
        if not self.has_index():
            return _error(request, NO_INDEX, 501)
        # Through the host: this process's copies end at once (callbacks),
        # the durable hook runs for each, other processes hear of it.
        ended = await self.view.site.expire_principal(user, except_uid)
        return json_answer(
            request,
            {"user": user, "expired": len(ended), "uids": sorted(short_uid(u) for u in ended)},
        )
