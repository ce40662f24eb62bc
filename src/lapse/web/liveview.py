"""The live view: a page showing a site's sessions as they come and go.

Mount it (it is off unless mounted)::

    root.putChild(b"_lapse", LiveView(site, token="a long random secret"))

and open ``/_lapse/?token=...`` once: the view answers with a cookie of its
own (HttpOnly, SameSite=Strict, path of the view) and a redirect to the page
without the token. Programs send ``Authorization: Bearer <token>`` instead.
Without a token (``LiveView(site)``) only loopback clients may look, as
``request.getClientAddress()`` says (so ``X-Forwarded-For`` counts only as
the site's ``trust_proxy_headers`` says); a request that carries proxy
headers (``X-Forwarded-For``, ``Forwarded``, ``Via``, ...) from which the
site's trusted proxies name no client is refused too (a proxy on this
machine would otherwise make every client look local), and so is one whose
``Host`` is not a loopback name or address (a page using DNS rebinding to
reach the view from a browser on this machine). Refused: 403 with a token
configured, 404 without. The ``?token=`` value never appears in the site's
access log (nor any ``token`` query argument, on any path of the site).

The page (inline CSS and JavaScript, charts drawn as SVG, no external
resource) refreshes every few seconds from a JSON API:

- ``GET api/summary``: live count, counters, sessions created and ended per
  minute over the last hour, upcoming expiries in 5-minute buckets;
- ``GET api/sessions?cursor=&limit=``: a page of live sessions (shortened
  uid, age, idle, time left) and the next cursor;
- ``GET api/session?id=``: one row of ``api/sessions`` by its ``id`` (an id
  this view gave out), as it is now; 404 if it is not live;
- ``POST api/expire`` (JSON ``{"id": ...}``): end one session through
  ``session.expire()`` (or the store's ``expire``), so its callbacks and the
  durable hook run.

A malformed parameter (a cursor the view did not give out or one too old, a
``limit`` that is not 1 to 500, an ``id`` that is not 32 hex digits, a body
that is not a JSON object with a string ``id``) is a 400 with a JSON
``error``; a body over 4 KiB is a 413.

Full uids never leave the server: each row has an ``id``, an HMAC of its uid
under the view's secret. A POST authenticated by cookie (or loopback) must
carry the header ``X-Lapse-CSRF``: an HMAC, under the view's secret, of a
nonce kept in a SameSite=Strict cookie the page set; the page embeds it.
Without it the answer is 403. Viewing never creates a session.

``python -m lapse.web.liveview --demo`` serves a demo site with sessions.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import json
import math
import re
import secrets
from collections.abc import Iterable
from html import escape
from typing import Any

from lapse.sessions import Session, short_uid
from lapse.web._mounted import MountedResource
from lapse.web.resource import Resource

__all__ = ["LiveView", "liveview_app", "mount"]

AUTH_COOKIE = "lapse_liveview"
CSRF_COOKIE = "lapse_liveview_csrf"
CSRF_HEADER = b"x-lapse-csrf"
HORIZON = 3600.0
BUCKETS = 12
MAX_HANDLES = 100_000
PAGE_LIMIT = 50
MAX_LIMIT = 500
MAX_BODY = 4096
"""The most bytes a POST to the API may carry (``{"id": ...}`` is 45)."""
MAX_CURSOR = 1024
"""The longest cursor the view reads back."""

_HANDLE = re.compile(rb"[0-9a-f]{32}")
_LIMIT = re.compile(rb"[0-9]{1,3}")
_ID_HELP = "id is a row id from api/sessions: 32 hex digits"


_PROXY_MARKS = (
    b"x-forwarded-for",
    b"forwarded",
    b"x-real-ip",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"via",
)
"""Headers that say a request came through a proxy."""


def _loopback_host(header: bytes | None) -> bool:
    """Whether a ``Host`` header names this machine's loopback: ``localhost``,
    a name under ``.localhost``, an address in 127.0.0.0/8 or ``[::1]``, with
    or without a port. No header at all passes: browsers always send one."""
    if header is None:
        return True
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return False
    else:
        name, colon, port = text.partition(":")
        if colon and not port.isdigit():
            return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _hmac(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).hexdigest()


def _deadline(session: Session) -> float:
    deadline = session._lastModified + session.sessionTimeout
    ends = session._ends_at
    return deadline if ends is None or deadline <= ends else ends


def _created(session: Session) -> float | None:
    ends, lifetime = session._ends_at, session.absolute_timeout
    return None if ends is None or lifetime is None else ends - lifetime


class LiveView(Resource):
    """The live view of ``site``'s sessions (see the module)."""

    isLeaf = True
    refresh_seconds = 3

    def __init__(self, site: Any, token: str | None = None) -> None:
        super().__init__()
        if token is not None and len(token) < 8:
            raise ValueError("a live view token is a secret of at least 8 characters")
        self.site = site
        self.token = token
        self._secret = secrets.token_bytes(32)
        self._auth_value = None if token is None else _hmac(token.encode(), "lapse-liveview")
        self._handles: dict[str, str] = {}
        # The token in a query (?token=) never reaches the site's logs.
        site._log_redact = frozenset(getattr(site, "_log_redact", frozenset()) | {b"token"})

    # -- access ---------------------------------------------------------------

    def _access(self, request: Any) -> str | None:
        """How the request may look: "bearer", "cookie", "loopback" or None."""
        token = self.token
        if token is None:
            if not _loopback_host(request.getHeader(b"host")):
                return None  # DNS rebinding: a page of another name, resolved to us
            if any(request.getHeader(name) is not None for name in _PROXY_MARKS):
                # Proxied: only the client the site's trusted proxies name counts
                # (a proxy on this machine would otherwise make everyone local).
                said = request._forwarded()
                if said is None or said.client is None:
                    return None
            try:
                host = ipaddress.ip_address(request.getClientAddress().host)
            except ValueError:
                return None
            return "loopback" if host.is_loopback else None
        authorization = request.getHeader(b"authorization") or b""
        scheme, _, presented = authorization.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(
            presented.strip(), token.encode("utf-8")
        ):
            return "bearer"
        cookie = request.getCookie(AUTH_COOKIE.encode())
        assert self._auth_value is not None
        if cookie is not None and hmac.compare_digest(cookie, self._auth_value.encode()):
            return "cookie"
        return None

    def _base(self, request: Any) -> str:
        return "/" + "/".join(p.decode("utf-8", "replace") for p in request.prepath) + "/"

    def render(self, request: Any) -> Any:
        how = self._access(request)
        if how is None:
            query_token = request.args.get(b"token", [None])[0] if self.token else None
            if query_token is not None and hmac.compare_digest(
                query_token, self.token.encode("utf-8") if self.token else b""
            ):
                assert self._auth_value is not None
                request.addCookie(
                    AUTH_COOKIE,
                    self._auth_value,
                    path=self._base(request),
                    httpOnly=True,
                    sameSite="strict",
                    secure=request.isSecure() or None,
                )
                request.setResponseCode(303)
                request.setHeader(b"location", self._base(request).encode("utf-8"))
                request.setHeader(b"cache-control", b"no-store")
                request.setHeader(b"referrer-policy", b"no-referrer")
                return b""
            return self._refuse(request)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"referrer-policy", b"no-referrer")
        path = request.postpath
        method = request.method
        if not path:
            request.setResponseCode(301)
            request.setHeader(b"location", self._base(request).encode("utf-8"))
            return b""
        if path == [b""] and method in (b"GET", b"HEAD"):
            return self._page(request)
        if path == [b"api", b"summary"] and method in (b"GET", b"HEAD"):
            return self._summary(request)
        if path == [b"api", b"sessions"] and method in (b"GET", b"HEAD"):
            return self._sessions(request)
        if path == [b"api", b"session"] and method in (b"GET", b"HEAD"):
            return self._session(request)
        if path == [b"api", b"expire"] and method == b"POST":
            if how != "bearer" and not self._csrf_ok(request):
                request.setResponseCode(403)
                return self._json(request, {"error": "missing or wrong CSRF token"})
            return self._expire(request)
        if path in (
            [b""],
            [b"api", b"summary"],
            [b"api", b"sessions"],
            [b"api", b"session"],
            [b"api", b"expire"],
        ):
            request.setResponseCode(405)
            return self._json(request, {"error": "method not allowed"})
        request.setResponseCode(404)
        return self._json(request, {"error": "not found"})

    def _refuse(self, request: Any) -> bytes:
        request.setResponseCode(404 if self.token is None else 403)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"Not found.\n" if self.token is None else b"Forbidden.\n"

    # -- CSRF -----------------------------------------------------------------

    def _csrf_for(self, nonce: str) -> str:
        return _hmac(self._secret, "csrf:" + nonce)

    def _csrf_ok(self, request: Any) -> bool:
        nonce = request.getCookie(CSRF_COOKIE.encode())
        presented = request.getHeader(CSRF_HEADER)
        if not nonce or not presented:
            return False
        expected = self._csrf_for(nonce.decode("latin-1"))
        return hmac.compare_digest(presented, expected.encode())

    # -- handles: what the page calls a session --------------------------------

    def _handle(self, uid: str) -> str:
        handle = _hmac(self._secret, "uid:" + uid)[:32]
        handles = self._handles
        if handle not in handles:
            if len(handles) >= MAX_HANDLES:
                del handles[next(iter(handles))]
            handles[handle] = uid
        return handle

    # -- JSON -----------------------------------------------------------------

    def _json(self, request: Any, value: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")

    def _error(self, request: Any, message: str, status: int = 400) -> bytes:
        request.setResponseCode(status)
        return self._json(request, {"error": message})

    # -- cursors: the store's, sealed, so only those this view gave out come back

    def _seal(self, cursor: str | None) -> str | None:
        if cursor is None:
            return None
        payload = base64.urlsafe_b64encode(cursor.encode("utf-8")).decode("ascii")
        return payload + "." + _hmac(self._secret, "cursor:" + payload)[:32]

    def _unseal(self, sealed: bytes) -> str:
        """The store cursor in ``sealed``; ValueError unless this view made it."""
        if len(sealed) > MAX_CURSOR or not sealed.isascii():
            raise ValueError(sealed)
        payload, _, mac = sealed.decode("ascii").rpartition(".")
        if not hmac.compare_digest(mac, _hmac(self._secret, "cursor:" + payload)[:32]):
            raise ValueError(sealed)
        try:
            return base64.urlsafe_b64decode(payload).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):  # pragma: no cover - sealed by us
            raise ValueError(sealed) from None

    async def _call(self, operation: Any) -> Any:
        # Through the keeper (its timeout, outage log, latency stats) for a
        # shared store; the memory store answers at once.
        if self.site.store.shared:
            return await self.site.call_store(operation)
        return await operation

    async def _now(self) -> float:
        store = self.site.store
        if store.shared:
            now: float = await self._call(store.now())
            return now
        return float(self.site.reactor.seconds())

    def _memory_sessions(self) -> Iterable[Session]:
        # Sessions the store checks (not ones put in site.sessions by hand).
        return (s for s in list(self.site.sessions.values()) if s._state is not None)

    async def _summary(self, request: Any) -> bytes:
        site = self.site
        store = site.store
        now = await self._now()
        if hasattr(store, "count"):
            live = int(await self._call(store.count()))
        else:
            live = sum(1 for _ in self._memory_sessions())
        if hasattr(store, "deadlines"):
            counts = list(await self._call(store.deadlines(now, HORIZON, BUCKETS)))
        else:
            counts = [0] * BUCKETS
            width = HORIZON / BUCKETS
            for session in self._memory_sessions():
                left = _deadline(session) - now
                if 0 <= left < HORIZON:
                    counts[int(left // width)] += 1
        stats = site.stats.as_dict()
        return self._json(
            request,
            {
                "now": now,
                "live": live,
                "store": store.url,
                "shared": bool(store.shared),
                "stats": stats,
                "expiries": {"horizon": HORIZON, "buckets": counts},
                "refresh": self.refresh_seconds,
            },
        )

    async def _sessions(self, request: Any) -> bytes:
        site = self.site
        store = site.store
        args = request.args
        sealed: bytes = args.get(b"cursor", [b""])[0]
        cursor_raw: str | None = None
        if sealed:
            try:
                cursor_raw = self._unseal(sealed)
            except ValueError:
                return self._error(
                    request, "cursor is not one this view gave out (start again without it)"
                )
        raw_limit: bytes | None = args.get(b"limit", [None])[0]
        limit = PAGE_LIMIT
        if raw_limit is not None:
            if not _LIMIT.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= MAX_LIMIT:
                return self._error(request, f"limit is a whole number from 1 to {MAX_LIMIT}")
            limit = int(raw_limit)
        now = await self._now()
        rows: list[dict[str, Any]] = []
        following: str | None
        if hasattr(store, "scan"):
            try:
                infos, following = await self._call(store.scan(cursor_raw, limit))
            except ValueError:
                # A cursor of ours the store no longer takes (too old a scan).
                return self._error(request, "cursor has expired (start again without it)")
            for info in infos:
                rows.append(self._row(info.uid, now, info.created, info.last_access, info.deadline))
        else:
            offset = int(cursor_raw) if cursor_raw is not None else 0
            page = []
            for index, session in enumerate(self._memory_sessions()):
                if index >= offset + limit:
                    break
                if index >= offset:
                    page.append(session)
            for session in page:
                rows.append(
                    self._row(
                        session.uid,
                        now,
                        _created(session),
                        session._lastModified,
                        _deadline(session),
                    )
                )
            following = str(offset + limit) if len(page) == limit else None
        return self._json(request, {"now": now, "sessions": rows, "next": self._seal(following)})

    async def _session(self, request: Any) -> bytes:
        raw: bytes = request.args.get(b"id", [b""])[0]
        if not _HANDLE.fullmatch(raw):
            return self._error(request, _ID_HELP)
        uid = self._handles.get(raw.decode("ascii"))
        row: dict[str, Any] | None = None
        now = await self._now()
        if uid is not None:
            store = self.site.store
            if hasattr(store, "info"):
                info = await self._call(store.info(uid))
                if info is not None:
                    row = self._row(uid, now, info.created, info.last_access, info.deadline)
            else:
                session = self.site.sessions.get(uid)
                if session is not None and session._state is not None and not session.expired:
                    row = self._row(
                        uid, now, _created(session), session._lastModified, _deadline(session)
                    )
        if row is None:
            request.setResponseCode(404)
            return self._json(request, {"error": "no such session"})
        return self._json(request, {"now": now, "session": row})

    def _row(
        self, uid: str, now: float, created: float | None, last: float, deadline: float
    ) -> dict[str, Any]:
        def finite(value: float | None) -> float | None:
            return None if value is None or not math.isfinite(value) else round(value, 3)

        return {
            "id": self._handle(uid),
            "uid": short_uid(uid),
            "age": finite(None if created is None else now - created),
            "idle": finite(now - last),
            "left": finite(deadline - now),
        }

    async def _expire(self, request: Any) -> bytes:
        raw: bytes = request.content.getvalue()
        if len(raw) > MAX_BODY:
            return self._error(request, f"the body is over {MAX_BODY} bytes", 413)
        try:
            body = json.loads(raw.decode("utf-8") or "{}")
        except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
            body = None
        handle = body.get("id") if isinstance(body, dict) else None
        if not isinstance(handle, str):
            return self._error(request, 'send a JSON object {"id": "<row id>"}')
        if not _HANDLE.fullmatch(handle.encode("utf-8", "replace")):
            return self._error(request, _ID_HELP)
        uid = self._handles.get(handle)
        if uid is None:
            request.setResponseCode(404)
            return self._json(request, {"error": "no such session", "expired": False})
        site = self.site
        session = site.sessions.get(uid)
        expired = False
        if session is not None and not session.expired:
            session.expire()
            expired = True
        elif site.store.shared:
            expired = bool(await self._call(site.store.expire(uid)))
        del self._handles[handle]
        return self._json(request, {"expired": expired, "uid": short_uid(uid)})

    # -- the page -------------------------------------------------------------

    def _page(self, request: Any) -> bytes:
        nonce_cookie = request.getCookie(CSRF_COOKIE.encode())
        nonce = nonce_cookie.decode("latin-1") if nonce_cookie else ""
        if not nonce or len(nonce) > 64 or not nonce.isalnum():
            nonce = secrets.token_hex(16)
            request.addCookie(
                CSRF_COOKIE,
                nonce,
                path=self._base(request),
                httpOnly=True,
                sameSite="strict",
                secure=request.isSecure() or None,
            )
        script_nonce = secrets.token_urlsafe(16)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(
            b"content-security-policy",
            (
                f"default-src 'none'; script-src 'nonce-{script_nonce}'; "
                f"style-src 'nonce-{script_nonce}'; connect-src 'self'; img-src 'self' data:; "
                "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
            ).encode("ascii"),
        )
        page = (
            _PAGE.replace("{{nonce}}", script_nonce)
            .replace("{{csrf}}", escape(self._csrf_for(nonce)))
            .replace("{{base}}", escape(self._base(request)))
            .replace("{{refresh}}", str(int(self.refresh_seconds * 1000)))
        )
        return page.encode("utf-8")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="lapse-csrf" content="{{csrf}}">
<meta name="lapse-base" content="{{base}}">
<link rel="icon" href="data:,">
<title>lapse: live sessions</title>
<style nonce="{{nonce}}">
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
header{background:#1d232b;color:#fff;padding:10px 20px;display:flex;flex-wrap:wrap;gap:4px 24px;
align-items:baseline}
header h1{font-size:18px;margin:0}
header .store{opacity:.7;font-family:monospace;overflow-wrap:anywhere}
main{padding:16px 20px;display:grid;grid-template-columns:1fr 1fr;gap:16px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:12px 16px}
section.wide{grid-column:1/3}
@media (max-width:720px){main{grid-template-columns:1fr;padding:12px 8px;gap:12px}
section.wide{grid-column:auto}section{padding:10px 10px;min-width:0}
th,td{padding:4px 4px}.big{font-size:32px}}
h2{font-size:14px;margin:0 0 8px;color:#4a5563;font-weight:600}
.big{font-size:40px;font-weight:700}
.counters{display:flex;gap:24px;flex-wrap:wrap}
.counters div span{display:block;font-size:20px;font-weight:600}
svg{width:100%;height:180px;display:block}
svg text{font-size:10px;fill:#6b7480}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eef0f3}
th.num,td.num{text-align:right;font-variant-numeric:tabular-nums}
td.uid{font-family:monospace}
button{cursor:pointer}
.legend span{display:inline-block;margin-right:12px}
.sw{display:inline-block;width:10px;height:10px;margin-right:4px}
#error{color:#b42318}
</style></head>
<body>
<header><h1>lapse &middot; live sessions</h1><span class="store" id="store"></span>
<span id="error"></span></header>
<main>
<section><h2>Live sessions now</h2><div class="big" id="live">&ndash;</div>
<div class="counters">
<div>created<span id="created">&ndash;</span></div>
<div>timed out<span id="ended-timeout">&ndash;</span></div>
<div>expired<span id="ended-expired">&ndash;</span></div>
<div>lifetime<span id="ended-lifetime">&ndash;</span></div>
<div>evicted<span id="ended-evicted">&ndash;</span></div>
<div>callback errors<span id="callback-errors">&ndash;</span></div>
<div>hook failures<span id="hook-failures">&ndash;</span></div>
</div></section>
<section><h2>Upcoming expiries (next hour, 5-minute buckets)</h2>
<svg id="expiries" viewBox="0 0 600 180"></svg></section>
<section class="wide"><h2>Sessions created and ended per minute (last hour)</h2>
<div class="legend"><span><i class="sw" id="sw-created"></i>created</span>
<span><i class="sw" id="sw-ended"></i>ended</span></div>
<svg id="minutes" viewBox="0 0 1200 180"></svg></section>
<section class="wide"><h2>Sessions <span id="page-info"></span></h2>
<table><thead><tr><th>session</th><th class="num">age</th><th class="num">idle</th>
<th class="num">time left</th><th></th></tr>
</thead><tbody id="rows"></tbody></table>
<p><button id="first">First page</button> <button id="next">Next page</button></p>
</section>
</main>
<script nonce="{{nonce}}">
"use strict";
const meta = n => document.querySelector('meta[name="' + n + '"]').content;
const BASE = meta("lapse-base"), CSRF = meta("lapse-csrf"), REFRESH = {{refresh}};
const SVGNS = "http://www.w3.org/2000/svg";
const COLORS = {created: "#2f6fdf", ended: "#e8772e", expiry: "#7a5af8"};
document.getElementById("sw-created").style.background = COLORS.created;
document.getElementById("sw-ended").style.background = COLORS.ended;
let cursor = null, nextCursor = null;

function el(name, attrs, text) {
  const node = document.createElementNS(SVGNS, name);
  for (const k in attrs) node.setAttribute(k, attrs[k]);
  if (text !== undefined) node.textContent = text;
  return node;
}
function setText(id, value) { document.getElementById(id).textContent = String(value); }
function duration(s) {
  if (s === null || s === undefined) return "\\u2013";
  s = Math.max(0, s);
  if (s < 60) return s.toFixed(0) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
function axes(svg, W, H, max) {
  svg.appendChild(el("line", {x1: 30, y1: H - 20, x2: W, y2: H - 20, stroke: "#ccd"}));
  svg.appendChild(el("text", {x: 2, y: 14}, String(max)));
  svg.appendChild(el("text", {x: 2, y: H - 22}, "0"));
}
// Drawn in the SVG's own pixels (its viewBox is its size: text is never
// stretched), with as many axis labels as fit side by side: on a phone,
// fewer labels, none overlapping.
function bars(svg, series, labels) {
  svg.replaceChildren();
  const W = Math.max(120, Math.round(svg.getBoundingClientRect().width) || 600);
  const H = 180;
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  const n = series[0].values.length;
  const max = Math.max(1, ...series.flatMap(s => s.values));
  axes(svg, W, H, max);
  const slot = (W - 34) / n, bw = Math.max(1, slot / series.length - 1);
  series.forEach((s, j) => s.values.forEach((v, i) => {
    const h = (H - 30) * v / max;
    const r = el("rect", {x: 34 + i * slot + j * (bw + 1), y: H - 20 - h, width: bw,
                          height: h, fill: s.color, "data-value": v});
    r.appendChild(el("title", {}, s.name + ": " + v + " (" + labels[i] + ")"));
    svg.appendChild(r);
  }));
  const texts = labels.map((label, i) => el("text", {x: 34 + i * slot, y: H - 6}, label));
  let widest = 0;
  for (const t of texts) {
    svg.appendChild(t);
    widest = Math.max(widest, t.getComputedTextLength());
    t.remove();
  }
  const step = Math.max(1, Math.ceil((widest + 8) / slot));
  for (let i = 0; i < n; i += step)
    if (34 + i * slot + widest <= W) svg.appendChild(texts[i]);
}
let lastSummary = null;
function charts(s) {
  lastSummary = s;
  const m = s.stats.minutes;
  const mlabels = m.created.map((_, i) => (i - m.created.length + 1) + " min");
  bars(document.getElementById("minutes"),
       [{name: "created", values: m.created, color: COLORS.created},
        {name: "ended", values: m.ended, color: COLORS.ended}], mlabels);
  const e = s.expiries, width = e.horizon / e.buckets.length / 60;
  bars(document.getElementById("expiries"),
       [{name: "ending", values: e.buckets, color: COLORS.expiry}],
       e.buckets.map((_, i) => (i * width) + "\\u2013" + ((i + 1) * width) + " min"));
}
window.addEventListener("resize", () => { if (lastSummary) charts(lastSummary); });
async function getJSON(path) {
  const r = await fetch(BASE + path, {credentials: "same-origin", cache: "no-store"});
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}
async function refresh() {
  try {
    const s = await getJSON("api/summary");
    setText("live", s.live);
    setText("store", s.store);
    setText("created", s.stats.created);
    for (const c of ["timeout", "expired", "lifetime", "evicted"])
      setText("ended-" + c, s.stats.ended[c] || 0);
    setText("callback-errors", s.stats.callback_errors);
    setText("hook-failures", s.stats.hook_failures);
    charts(s);
    let page;
    try {
      page = await getJSON("api/sessions?limit=50" +
                           (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
    } catch (err) {
      if (!cursor) throw err;
      cursor = null;  // refused (the server restarted, the scan is too old): page one
      page = await getJSON("api/sessions?limit=50");
    }
    nextCursor = page.next;
    const tbody = document.getElementById("rows");
    tbody.replaceChildren();
    for (const row of page.sessions) {
      const tr = document.createElement("tr");
      tr.dataset.id = row.id;
      const cells = [[row.uid, "uid"], [duration(row.age), "num age"],
                     [duration(row.idle), "num idle"], [duration(row.left), "num left"]];
      for (const [text, cls] of cells) {
        const td = document.createElement("td");
        td.className = cls; td.textContent = text; tr.appendChild(td);
      }
      const td = document.createElement("td"), b = document.createElement("button");
      b.textContent = "End"; b.className = "end";
      b.addEventListener("click", () => end(row.id, b));
      td.appendChild(b); tr.appendChild(td); tbody.appendChild(tr);
    }
    setText("page-info", "(" + page.sessions.length + " shown of " + s.live + ")");
    document.getElementById("next").disabled = !nextCursor;
    setText("error", "");
    document.body.dataset.loaded = "1";
  } catch (err) { setText("error", String(err)); }
}
async function end(id, button) {
  button.disabled = true;
  const r = await fetch(BASE + "api/expire", {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-Lapse-CSRF": CSRF},
    body: JSON.stringify({id: id})});
  if (!r.ok) setText("error", "End failed: HTTP " + r.status);
  await refresh();
}
document.getElementById("first").addEventListener("click", () => { cursor = null; refresh(); });
document.getElementById("next").addEventListener("click", () => {
  if (nextCursor) { cursor = nextCursor; refresh(); } });
refresh();
setInterval(refresh, REFRESH);
</script></body></html>
"""


# -- the demo -----------------------------------------------------------------


class _InFront(Resource):
    """The site's root with the live view in front of it, at one segment."""

    def __init__(self, root: Any, segment: bytes, view: LiveView) -> None:
        super().__init__()
        self.root = root
        self.segment = segment
        self.view = view

    def getChildWithDefault(self, path: bytes, request: Any) -> Any:
        if path == self.segment:
            return self.view
        # Not ours: give the segment back and let the real root traverse.
        request.prepath.pop()
        request.postpath.insert(0, path)
        return self.root

    def render(self, request: Any) -> Any:
        return self.root.render(request)


def mount(site: Any, segment: bytes | str, token: str | None = None) -> LiveView:
    """Serve the live view of ``site`` at ``/<segment>/``, in front of the
    site's own resource tree (which keeps every other path, even if its root
    is a leaf). What ``lapse serve --live-view`` does; returns the view."""
    raw = segment.encode("ascii") if isinstance(segment, str) else segment
    raw = raw.strip(b"/")
    if not raw or b"/" in raw or not all(32 < c < 127 for c in raw) or raw in (b".", b".."):
        raise ValueError(f"{segment!r} is not one path segment (e.g. '_lapse')")
    view = LiveView(site, token=token)
    site.resource = _InFront(site.resource, raw, view)
    return view


def liveview_app(middleware: Any, token: str | None = None) -> MountedResource:
    """The live view of ``middleware``'s sessions (a
    ``lapse.asgi.SessionMiddleware``) as an ASGI app, for a Starlette or
    FastAPI app to mount at a path of its own::

        sessions = SessionMiddleware(app, store=...)
        app.mount("/_lapse", liveview_app(sessions, token=os.environ["LIVEVIEW_TOKEN"]))

    Access is the view's: with ``token``, a bearer token (or the page's
    cookie); without it, loopback clients only. The view is ``.resource``.
    """
    return MountedResource(
        LiveView(middleware, token=token), middleware, redact=frozenset({b"token"})
    )


def _demo(port: int, sessions: int, token: str | None) -> None:  # pragma: no cover - manual
    import random
    import sys

    from lapse.internet import reactor
    from lapse.sessions import Expiry

    rng = random.Random(7)

    class DemoSession(Session):
        def __init__(self, site: Any, uid: str) -> None:
            super().__init__(site, uid)
            self.sessionTimeout = rng.choice([300, 900, 1800, 3600])

    class Home(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            return f"your session: {short_uid(request.getSession().uid)}\n".encode()

    def hook(expiry: Expiry) -> None:
        print(f"HOOK {short_uid(expiry.uid)} {expiry.cause}", flush=True)

    from lapse.web.server import Site

    root = Resource()
    root.putChild(b"", Home())
    site = Site(root, on_expire=hook)
    site.sessionFactory = DemoSession
    root.putChild(b"_lapse", LiveView(site, token=token))
    now = reactor.seconds()
    # An hour of history for the chart (the counters of a demo, not real).
    for minutes_ago in range(59, 0, -1):
        at = now - minutes_ago * 60
        for _ in range(rng.randint(2, 14)):
            site.stats.session_created(at)
        for _ in range(rng.randint(1, 10)):
            site.stats.session_ended(rng.choice(["timeout", "timeout", "expired"]), at)
    for _ in range(sessions):
        session = site.makeSession()
        short = short_uid(session.uid)
        session.notifyOnExpire(functools.partial(print, f"CALLBACK {short}", flush=True))
    reactor.listenTCP(port, site, interface="127.0.0.1")
    query = f"?token={token}" if token else ""
    print(f"LIVEVIEW http://127.0.0.1:{port}/_lapse/{query}", flush=True)
    sys.stdout.flush()
    reactor.run()


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - manual
    parser = argparse.ArgumentParser(prog="python -m lapse.web.liveview")
    parser.add_argument("--demo", action="store_true", help="serve a demo site with sessions")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    if not args.demo:
        parser.error("only --demo is offered: mount LiveView(site) in your own resource tree")
    _demo(args.port, args.sessions, args.token)


if __name__ == "__main__":  # pragma: no cover
    main()
