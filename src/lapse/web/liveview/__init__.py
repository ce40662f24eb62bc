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
  uid, age, idle, time left, principal) and the next cursor; with
  ``?user=NAME`` instead of a cursor, that principal's live sessions (the
  store's ``sessions_of``: most recently used first, up to ``limit``) and
  their count in ``live``;
- ``GET api/session?id=``: one row of ``api/sessions`` by its ``id``, as it
  is now; 404 if it is not live;
- ``POST api/expire`` (JSON ``{"id": ...}``): end one session through
  ``session.expire()`` (or the store's ``expire``), so its callbacks and the
  durable hook run; 404 if it is not live;
- ``POST api/expire-user`` (JSON ``{"user": NAME}``, optionally ``"except":
  <row id>``): end every live session of that principal, but the one kept,
  through the site's ``expire_principal`` (each as a logout: callbacks, the
  durable hook, in every process); the count and short uids ended. A store
  that keeps no index of principals: a JSON 501 for this and ``?user=``.

A malformed parameter (a cursor the view did not give out or one too old, a
``limit`` that is not 1 to 500, an ``id`` the view did not give out, a body
that is not a JSON object with a string ``id``, a ``user`` that is not a
principal as ``check_principal`` says) is a 400 with a JSON ``error``; a
body over 4 KiB is a 413. A principal is text users chose: the page only
ever puts it in text nodes, and JSON answers send ``<``, ``>`` and ``&`` as
Unicode escapes.

Full uids never leave the server: a row's ``id`` is its uid encrypted and
authenticated under the view's secret ("r" and URL-safe base64, 55 characters for
lapse's uids; see :mod:`._keys`), and so are cursors. Any view with the same
secret reads them back, so with ``LAPSE_LIVEVIEW_SECRET`` (hex, at least 32
bytes) shared by the workers of one server, an id or a cursor from one
worker works in every other; without it each view has a random secret of
its own. A POST authenticated by cookie (or loopback) must carry the header
``X-Lapse-CSRF``: an HMAC, under the view's secret, of a nonce kept in a
SameSite=Strict cookie the page set; the page embeds it. Without it the
answer is 403. Viewing never creates a session.

The package: :mod:`._view` (the view and its access gate), :mod:`._access`
(who may look), :mod:`._keys` (the secret, ids, cursors, CSRF tokens),
:mod:`._api` (the JSON API), :mod:`._page` (the page; ``page.html``,
``page.css``, ``page.js``), :mod:`._mount` (mounting), :mod:`._demo`
(``python -m lapse.web.liveview --demo``).
"""

# The cookies and limits stay importable from here, as before the package.
from lapse.web.liveview._access import AUTH_COOKIE as AUTH_COOKIE
from lapse.web.liveview._access import CSRF_COOKIE as CSRF_COOKIE
from lapse.web.liveview._access import CSRF_HEADER as CSRF_HEADER
from lapse.web.liveview._api import BUCKETS as BUCKETS
from lapse.web.liveview._api import HORIZON as HORIZON
from lapse.web.liveview._api import MAX_BODY as MAX_BODY
from lapse.web.liveview._api import MAX_CURSOR as MAX_CURSOR
from lapse.web.liveview._api import MAX_ID as MAX_ID
from lapse.web.liveview._api import MAX_LIMIT as MAX_LIMIT
from lapse.web.liveview._api import PAGE_LIMIT as PAGE_LIMIT
from lapse.web.liveview._demo import main as main
from lapse.web.liveview._keys import SECRET_ENV as SECRET_ENV
from lapse.web.liveview._mount import liveview_app, mount
from lapse.web.liveview._view import LiveView

__all__ = ["LiveView", "liveview_app", "mount"]
