"""The session lifecycle: sessions, their data, and the stores that keep them.
Knows nothing of HTTP.

A session is born (``makeSession``), touched by each visit (its deadline
becomes now + ``sessionTimeout``), and ends when the deadline passes without
a touch, or at once by ``expire()``. Ending removes it from its owner's
``sessions`` first, then runs each expiry callback once; the store then
hands the ended session, with its final data, to the durable expiry hook.
"""

from lapse.sessions._data import SessionData
from lapse.sessions._factory import make_keeper
from lapse.sessions._keeper import ExpiryHook, Keeper, KeeperOwner
from lapse.sessions._local import LocalKeeper
from lapse.sessions._session import Session, SessionOwner, short_uid
from lapse.sessions._shared import SharedKeeper
from lapse.sessions._stats import SessionStats
from lapse.sessions._visit import Visit, current_visit
from lapse.sessions.store import (
    AlreadyDelivered,
    Expiry,
    LocalSessionStore,
    PrincipalIndex,
    SessionConflict,
    SessionInfo,
    SessionStore,
    StoreConfigError,
    StoredSession,
    StoreError,
    StoreUnavailable,
    TooManySessions,
    check_principal,
)

__all__ = [
    "AlreadyDelivered",
    "Expiry",
    "ExpiryHook",
    "Keeper",
    "KeeperOwner",
    "LocalKeeper",
    "LocalSessionStore",
    "PrincipalIndex",
    "Session",
    "SessionConflict",
    "SessionData",
    "SessionInfo",
    "SessionOwner",
    "SessionStats",
    "SessionStore",
    "SharedKeeper",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailable",
    "StoredSession",
    "TooManySessions",
    "Visit",
    "check_principal",
    "current_visit",
    "make_keeper",
    "short_uid",
]
