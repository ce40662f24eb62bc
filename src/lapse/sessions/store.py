"""The session store protocol: where sessions live, knowing nothing of HTTP.

A store keeps, for each live session, its uid, its timeout (seconds of
inactivity), its absolute end (creation + lifetime, if it has a lifetime),
its deadline (in the store's own time: the earlier of the idle deadline and
the absolute end) and its data (a dict of JSON values). The site asks it to:

- ``load(uid, version=None)``: load *and touch* a live session in one round
  trip (its deadline becomes now + timeout, never past its absolute end);
  None for an unknown or ended session. A uid that was rotated away less
  than its grace ago loads the session under its new uid
  (``StoredSession.uid`` says which). A store may return the data as JSON
  texts (``StoredSession.encoded``), decoded only when read, and may keep a
  *version* of each session's data (1 at creation, one more at every
  ``save``): given the version the caller holds, a load whose data has not
  changed since returns none (``unchanged``), so a request costs the same
  whatever the size of a session it does not change;
- ``create(uid, timeout, data, lifetime=None)``;
- ``rotate(uid, new_uid, grace)``: move a live session, data, creation time
  and absolute end included, to a new uid, atomically; the old uid stays an
  alias of it for ``grace`` seconds, then is unknown. Announced in
  ``events()`` as a pair ``(old, new)``, so other processes re-key their
  copies. lapse's ``new_uid`` keeps the first two characters of ``uid``
  (the rest is new), so a store that places sessions by them (the Redis
  store's shards) can keep a rotation in one place;
- ``save(uid, changed, removed)``: write only the keys that changed, to the
  live session ``uid`` (or, within its grace, the session an old uid was
  rotated to); False if there is none (nothing written). A store that keeps
  versions returns the data's new version instead of True;
- ``exists(uid)``: whether a session is live, without touching it;
- ``expire(uid)``: end a session now (a logout);
- ``claim(owner, lease, limit)``: atomically take ended sessions (deadline
  passed, or expired by hand) for the durable expiry hook. A claim is a
  lease: until ``ack``, nobody else gets the session; if the lease runs out
  (the owner died mid-hook), the next ``claim`` by anyone hands it out again,
  with the same ``delivery_id`` and ``attempt`` + 1;
- ``renew(expiry, owner, lease)``: while the hook runs, extend the claim's
  lease to now + ``lease``, only if ``owner`` still holds that delivery (the
  same ``delivery_id`` and ``attempt``, not acknowledged); False if not (its
  lease ran out and it was claimed again, or it was acknowledged);
- ``ack(expiry)``: the hook ran; forget the session and announce its end;
- ``events(cursor)``: uids whose end was announced since ``cursor`` (and
  ``(old, new)`` pairs for rotations), so that every process can run its own
  ``notifyOnExpire`` callbacks;
- ``next_deadline()``: a time before which nothing ends, to sleep until then.

Principals (the user behind a session; :class:`PrincipalIndex`, optional for
a store written elsewhere, offered by every lapse store):

- ``set_principal(uid, principal, limit=None, refuse=False)``: bind the live
  session ``uid`` (or, within its grace, the session an old uid was rotated
  to) to ``principal`` (None: unbind it), in the store's index of sessions by
  principal; None if there is no such session (nothing changed). With
  ``limit``, at most ``limit`` live sessions may be bound to ``principal``
  once it is done, this one included (also when it was bound already and
  the limit has been lowered since): if more would be, ``refuse`` raises
  :class:`TooManySessions` changing nothing, else the least recently used of
  the others (earliest last access; then by uid) end at once as ``expire``
  ends a session, with cause ``"superseded"``. Returns the uids so ended, in
  one atomic step with the binding: two concurrent calls, from any
  processes, never leave more than ``limit`` live sessions bound;
- ``sessions_of(principal)``: its live sessions as :class:`SessionInfo`
  (``principal`` set), most recently used first, touching none;
- ``expire_principal(principal, except_uid=None)``: end each of its live
  sessions now, as ``expire`` does, but the one ``except_uid`` names (itself,
  or within its grace the session it was rotated to); the uids ended.

The index is the store's own: a rotation keeps a session's principal (the
new uid is bound, the old one not), and a session that ends by any cause
(timeout, lifetime, ``expire``, eviction, ``"superseded"``) leaves it at its
end: past its deadline it is neither listed nor counted, even before it is
claimed. ``load``, ``info`` and ``scan`` return a session's principal.

Inspection (operators' tools, a live view), none of which touches a session:

- ``scan(cursor, limit)``: live sessions as :class:`SessionInfo`, a page at
  a time; ``info(uid)``; ``count()``; ``deadlines(now, horizon, buckets)``:
  how many live sessions end in each slice of the coming ``horizon``.

Time: every deadline and lease is in the store's clock. A store given
``clock=`` (tests) uses that; otherwise its own source of truth (Redis: the
server's ``TIME``; SQLite and memory: this machine's wall clock), so clock
skew between nodes cannot end a live session early.

Errors: every failure to reach or use a store is a :class:`StoreUnavailable`
(raised ``from`` the driver's exception); a bad store URL is a
:class:`StoreConfigError` at construction.

Capabilities: every store declares, as plain attributes, what the site's
keeper needs to know of it (the keeper reads these and nothing else):

- ``shared``: other processes use the same sessions (SQLite, Redis). The
  keeper then writes rotations for them to see, reads their announcements,
  runs a plain (not async) expiry hook in a worker thread, polls at least
  every ``poll_interval`` (another process may make a session that ends
  sooner) and refuses ``max_sessions``. An in-process store says False.
- ``wait_for_news(seconds)`` (optional, a method): a shared store that tells
  processes of each other's writes. The keeper then sleeps in it until the
  next deadline it knows of instead of polling; it returns True, sooner,
  when another process announced an end or a rotation, ended a session by
  hand or made one that ends before every other, or when its listening
  connection was made again (what was said meanwhile is lost: the keeper
  reads the store).
- ``enforces_timeout``: every call fails with :class:`StoreUnavailable`
  rather than wait on an unresponsive backend much past the store's own
  timeout, so the keeper adds no timer per call. False: the keeper bounds
  each call by its ``store_timeout``.
- ``holds_sessions``: the store also offers :class:`LocalSessionStore`, a
  synchronous interface over the site's ``Session`` objects themselves (the
  memory store). A store written to this protocol alone says False: the
  keeper then drives it through the async calls above, sleeping until the
  ``next_deadline()`` it knows (woken sooner when it makes a session), and it
  is written to, touched, expired and inspected like any other.

A store can be checked against this contract with :mod:`lapse.testing`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from lapse.sessions._principals import (
    MAX_PRINCIPAL_LENGTH,
    PRINCIPAL_MEMBERS,
    TooManySessions,
    check_principal,
)

__all__ = [
    "INSPECTION_MEMBERS",
    "MAX_PRINCIPAL_LENGTH",
    "PRINCIPAL_MEMBERS",
    "REQUIRED_MEMBERS",
    "AlreadyDelivered",
    "Clock",
    "Event",
    "Expiry",
    "LocalSessionStore",
    "PrincipalIndex",
    "SessionConflict",
    "SessionInfo",
    "SessionStore",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailable",
    "StoredSession",
    "TooManySessions",
    "check_principal",
]

Clock = Callable[[], float]
"""A time source: seconds as a float."""

Event = str | tuple[str, str]
"""An announcement read by ``events()``: an ended session's uid, or a
rotation's ``(old_uid, new_uid)``."""


class StoreError(Exception):
    """The family of session store errors.

    - :class:`StoreConfigError`: the store URL or options are wrong (a
      start-up error, never raised by a request).
    - :class:`StoreUnavailable`: the store cannot be reached or used now; the
      site answers 503 and retries on the next request.
    """


class AlreadyDelivered(StoreError):
    """An expiry hook acknowledged a delivery that was no longer its claim's
    (``PostgresStore.acknowledge`` in the application's transaction): its
    lease ran out and another process took it, or it was acknowledged. The
    transaction that tried must roll back; the keeper then leaves the
    session to whoever holds it."""


class StoreConfigError(StoreError, ValueError):
    """A store URL or option that cannot work."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or used right now.

    ``permanent`` says the store says it can never work as configured (a
    SQLite path no file can be opened at, a file that is not a session
    database; a Redis password refused, a host name that does not exist, a
    db index out of range): retrying will not help, so start-up stops on it.
    Any other failure (refused, timed out, busy) may pass.
    """

    def __init__(self, *args: object, permanent: bool = False) -> None:
        super().__init__(*args)
        self.permanent = permanent


class SessionConflict(Exception):
    """A request's changes to a session cannot be written: since the request
    loaded it, another request rotated it away (without a grace) or ended it.
    Nothing of the request's changes was written; the site answers 409."""


@dataclass(slots=True)
class StoredSession:
    """A live session as a store's ``load`` returns it."""

    uid: str
    timeout: float
    deadline: float
    data: Mapping[str, Any] = field(default_factory=dict)
    """The data, decoded (empty when ``encoded`` or ``unchanged`` says)."""
    encoded: Mapping[str, str] | None = None
    """The data as the JSON text of each key, decoded only when read (the
    SQLite and Redis stores return this rather than ``data``)."""
    version: int | None = None
    """The data's version, for a store that keeps one."""
    unchanged: bool = False
    """The data is that of the version ``load`` was given: none returned."""
    principal: str | None = None
    """The principal the session is bound to (``set_principal``), if any."""

    def decoded(self) -> dict[str, Any]:
        """The data returned, decoded (whether as ``data`` or ``encoded``)."""
        if self.encoded is None:
            return dict(self.data)
        return {key: json.loads(text) for key, text in self.encoded.items()}


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A live session as inspection sees it (read without touching it).

    Times are store times. ``last_access`` is the last touch (or the
    creation); ``deadline`` is when the session ends if not touched again:
    the earlier of its idle deadline and its absolute end.
    """

    uid: str
    created: float | None
    """When it was created; None if the store does not know."""
    last_access: float
    deadline: float
    data: Mapping[str, Any]
    principal: str | None = None
    """The principal the session is bound to, if any."""


@dataclass(slots=True, frozen=True)
class Expiry:
    """An ended session, claimed for its durable expiry hook.

    ``delivery_id`` is the same on every delivery of one expiry (a hook can
    drop duplicates by it); ``attempt`` counts deliveries from 1; ``cause``
    is ``"timeout"`` (idle for ``sessionTimeout``), ``"lifetime"`` (its
    ``absolute_timeout`` since creation ran out), ``"expired"`` (ended by
    ``expire()`` or ``expire_principal()``), ``"evicted"`` (the memory
    store's ``max_sessions`` cap made room for a new session) or
    ``"superseded"`` (its principal logged in once more than
    ``max_sessions_per_principal`` allows, and it was the least recently
    used).
    """

    uid: str
    data: Mapping[str, Any]
    delivery_id: str
    attempt: int
    cause: str


@runtime_checkable
class SessionStore(Protocol):
    """What the site needs of a session backend. All methods are async."""

    url: str
    """Where the sessions live, safe to log (no password)."""
    shared: bool
    """Whether other processes may use the same sessions (SQLite, Redis)."""
    enforces_timeout: bool
    """Whether every call fails with :class:`StoreUnavailable` rather than
    wait much past the store's own timeout (the site then adds no timer per
    call)."""
    holds_sessions: bool
    """Whether the store also offers :class:`LocalSessionStore` (it holds
    the site's ``Session`` objects and answers synchronously: the memory
    store). False for a store written to this protocol alone."""

    async def open(self) -> None:
        """Connect and prepare (create tables, load scripts). Idempotent."""

    async def aclose(self) -> None:
        """Release connections. Idempotent."""

    async def now(self) -> float:
        """The store's current time."""

    async def load(self, uid: str, version: int | None = None) -> StoredSession | None:
        """Touch and return the live session ``uid``, in one round trip;
        without its data if that is still at ``version``."""

    async def create(
        self, uid: str, timeout: float, data: Mapping[str, Any], lifetime: float | None = None
    ) -> float:
        """Store a new live session; its deadline. With ``lifetime``, the
        session ends ``lifetime`` seconds from now at the latest, however
        often it is touched."""

    async def rotate(self, uid: str, new_uid: str, grace: float) -> bool:
        """Move the live session ``uid`` to ``new_uid`` (data, timeout,
        creation time and absolute end kept; touched), atomically; ``uid``
        loads it for ``grace`` more seconds, then is unknown. Announced as
        ``(uid, new_uid)`` in :meth:`events`. False if ``uid`` was not live."""

    async def save(
        self, uid: str, changed: Mapping[str, Any], removed: Iterable[str]
    ) -> bool | int:
        """Write the changed keys and delete the removed ones, in the live
        session ``uid`` or the one an old ``uid`` was rotated to within its
        grace; False if there is none (nothing is written then). True, or
        the data's new version if the store keeps versions."""

    async def exists(self, uid: str) -> bool:
        """Whether ``uid`` is live, without touching it."""

    async def expire(self, uid: str) -> bool:
        """End the live session ``uid`` now; False if it was not live."""

    async def claim(self, owner: str, lease: float, limit: int) -> list[Expiry]:
        """Take up to ``limit`` ended sessions for ``lease`` seconds."""

    async def renew(self, expiry: Expiry, owner: str, lease: float) -> bool:
        """Extend the lease of ``expiry`` (claimed by ``owner``) to now +
        ``lease``; False, changing nothing, unless it is still that claim
        (same ``delivery_id`` and ``attempt``, same owner, not acknowledged)."""

    async def ack(self, expiry: Expiry) -> None:
        """The hook for ``expiry`` ran: forget the session, announce its end."""

    async def events(self, cursor: str | None) -> tuple[list[Event], str]:
        """Uids announced ended after ``cursor`` (None: from now on), with
        ``(old, new)`` pairs for rotations, in order; and the new cursor."""

    async def next_deadline(self) -> float | None:
        """When to look again: the earliest deadline or lease end in store
        time, or an earlier time (nothing ends before it); None if nothing
        is live or pending."""

    # -- inspection: none of these touches a session ------------------------

    async def scan(self, cursor: str | None, limit: int) -> tuple[list[SessionInfo], str | None]:
        """Up to ``limit`` live sessions from ``cursor`` (None: the start),
        and the cursor of the next page, None at the end. A full scan
        returns no session twice; each store documents its order and what it
        does with sessions created or touched during the scan. A cursor not
        made by this store is a ValueError."""

    async def info(self, uid: str) -> SessionInfo | None:
        """The live session ``uid`` (not an alias), or None."""

    async def count(self) -> int:
        """How many sessions are live now."""

    async def deadlines(self, now: float, horizon: float, buckets: int) -> list[int]:
        """How many live sessions end in each of ``buckets`` equal slices of
        ``(now, now + horizon]`` (store time): slice ``i`` counts deadlines
        ``d`` with ``now + i*w <= d < now + (i+1)*w`` (``w = horizon /
        buckets``; the last slice includes its end). Sessions ending later
        are not counted, nor those already due. ValueError unless
        ``buckets >= 1`` and ``horizon > 0``."""


@runtime_checkable
class PrincipalIndex(Protocol):
    """Sessions by principal (see the module's "Principals"): offered by
    every lapse store; a store without it cannot serve
    ``set_principal``, ``sessions_of`` or ``expire_principal`` (each then
    raises ``TypeError`` naming the store)."""

    async def set_principal(
        self, uid: str, principal: str | None, limit: int | None = None, refuse: bool = False
    ) -> list[str] | None:
        """Bind ``uid`` to ``principal`` (None: unbind), keeping at most
        ``limit`` live sessions bound to it; the uids superseded to make
        room, or None if ``uid`` is not live. :class:`TooManySessions` if
        ``refuse`` and it would take more than ``limit``."""

    async def sessions_of(self, principal: str) -> list[SessionInfo]:
        """The live sessions bound to ``principal``, most recently used first."""

    async def expire_principal(self, principal: str, except_uid: str | None = None) -> list[str]:
        """End every live session bound to ``principal`` but ``except_uid``."""


INSPECTION_MEMBERS = ("scan", "info", "count", "deadlines")
"""The protocol's inspection methods: a store may leave them out (the live
view and the metrics then show only this process's sessions)."""

REQUIRED_MEMBERS: tuple[str, ...] = tuple(
    name
    for name in (
        *(name for name, value in vars(SessionStore).items() if callable(value)),
        *SessionStore.__annotations__,
    )
    if not name.startswith("_") and name not in INSPECTION_MEMBERS
)
"""What every store object has: the protocol's declarations and its
methods but inspection (read from :class:`SessionStore`, so the check
cannot drift from the protocol)."""


class LocalSessionStore(SessionStore, Protocol):
    """The synchronous interface of a store that holds the site's sessions
    (``holds_sessions = True``: the memory store).

    The keeper binds it to one site (``bind``): its live records are the
    site's ``Session`` objects and its dict of live sessions is
    ``site.sessions``. The keeper then calls these synchronously, so a
    request costs no await, and on a fake ``Clock`` expiry happens inside
    ``clock.advance()``: one timer on the site's reactor, kept at the
    earliest deadline the store reports through ``wake``. Each ``*_now``
    method is the async method of the same name, answered at once.
    """

    clock: Clock
    max_live: int | None
    """At most this many live sessions (``max_sessions``); None: no cap."""
    evicted: bool
    """Sessions were ended by ``max_live`` since the last ``claim_now``."""

    def bind(
        self,
        live: MutableMapping[str, Any],
        make: Callable[[str, float, Mapping[str, Any]], Any],
        wake: Callable[[float], None] | None = None,
    ) -> None:
        """Serve one site: ``live`` is its ``sessions``, ``make(uid, timeout,
        data)`` makes a session created through the store API, ``wake(when)``
        hears of each deadline set."""

    def start_now(self, record: Any) -> float | None:
        """Begin checking a session of the bound site; its deadline."""

    def touched_now(self, record: Any) -> None:
        """The session was touched (its ``_lastModified`` just set)."""

    def load_now(self, uid: str) -> Any:
        """Touch and return the live session ``uid``, or None."""

    def rotate_record_now(self, record: Any, new_uid: str, grace: float) -> bool:
        """Give the session the uid ``new_uid``; False if not checked here."""

    def expire_record_now(self, record: Any) -> bool:
        """End the session now; False if not checked here."""

    def ended_record(self, uid: str) -> Any:
        """The session object of an ended, unacknowledged ``uid``, or None."""

    def bind_record_now(
        self, record: Any, principal: str | None, limit: int | None = None, refuse: bool = False
    ) -> list[str] | None:
        """``set_principal`` of the session itself; None if not checked here."""

    def claim_now(self, owner: str, lease: float, limit: int) -> list[Expiry]: ...
    def renew_now(self, expiry: Expiry, owner: str, lease: float) -> bool: ...
    def ack_now(self, expiry: Expiry) -> None: ...
    def next_deadline_now(self) -> float | None: ...


def _bucket_bounds(now: float, horizon: float, buckets: int) -> float:
    """Check the arguments of ``deadlines()``; the width of one slice."""
    if not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"deadlines() needs at least one bucket, not {buckets!r}")
    if not 0 < horizon < float("inf"):
        raise ValueError(f"deadlines() needs a positive finite horizon, not {horizon!r}")
    return horizon / buckets


def _histogram(deadlines: Iterable[float], now: float, horizon: float, buckets: int) -> list[int]:
    """How many of ``deadlines`` fall in each of ``buckets`` equal slices of
    ``(now, now + horizon]``: slice ``i`` holds ``now + i*w <= d < now +
    (i+1)*w`` (the first excludes ``now`` itself: ended; the last includes
    the end). A helper of the stores' ``deadlines()``."""
    width = _bucket_bounds(now, horizon, buckets)
    counts = [0] * buckets
    end = now + horizon
    last = buckets - 1
    for deadline in deadlines:
        if now < deadline <= end:
            counts[min(last, int((deadline - now) / width))] += 1
    return counts
