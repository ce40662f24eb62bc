"""The statements of the SQLite store's operations (``queries.sql``, read once
at import) and the small reads several operations share. All run in the
store's worker thread, inside the transaction of one call."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from lapse.sessions.store import SessionInfo
from lapse.sessions.stores._package_text import read_statements

__all__ = [
    "EPSILON",
    "SQL",
    "clamp",
    "dumps",
    "is_live",
    "last_access",
    "read_data",
    "resolve",
    "session_info",
]

EPSILON = 1e-6
"""Slack when comparing a deadline with the clock (as the memory store does),
so that a timer firing at a deadline rounded down by one ulp finds it due."""


@dataclass(frozen=True, slots=True)
class Queries:
    """The statements of ``queries.sql`` by name (their parameters are
    documented there). Reading the file fails at import if its names are
    not exactly these."""

    is_live: str
    select_live: str
    alias_target: str
    read_data: str
    delete_data: str
    prune_aliases: str
    load_session: str
    touch: str
    create_session: str
    insert_data: str
    rotate_session: str
    rotate_data: str
    follow_aliases: str
    add_alias: str
    add_rotation_event: str
    write_data: str
    delete_key: str
    bump_version: str
    select_version: str
    end_session: str
    bind_principal: str
    sessions_of: str
    due_live: str
    due_ended: str
    lease_session: str
    renew_lease: str
    forget_session: str
    add_end_event: str
    prune_events: str
    last_event_id: str
    events_after: str
    first_deadline: str
    first_lease_end: str
    any_unclaimed: str
    scan_first: str
    scan_after: str
    info: str
    count_live: str
    count_by_deadline: str


SQL = Queries(**read_statements(__name__.rpartition(".")[0], "queries.sql"))


def dumps(value: Any) -> str:
    """A data value as the JSON text stored for it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def clamp(deadline: float, ends_at: float | None) -> float:
    """An idle deadline, never past the absolute end."""
    return deadline if ends_at is None or deadline <= ends_at else ends_at


def is_live(conn: sqlite3.Connection, uid: str, now: float) -> bool:
    """Whether ``uid`` is a live session (its deadline ahead)."""
    return conn.execute(SQL.is_live, (uid, now + EPSILON)).fetchone() is not None


def resolve(conn: sqlite3.Connection, uid: str, now: float) -> str | None:
    """The uid of the live session ``uid`` names: itself, or the session an
    old uid was rotated to (within its grace); None if there is none."""
    if is_live(conn, uid, now):
        return uid
    alias = conn.execute(SQL.alias_target, (uid, now)).fetchone()
    if alias is None or not is_live(conn, alias[0], now):
        return None
    target: str = alias[0]
    return target


def read_data(conn: sqlite3.Connection, uid: str) -> dict[str, Any]:
    """The session's data, decoded."""
    rows = conn.execute(SQL.read_data, (uid,))
    return {key: json.loads(value) for key, value in rows}


def last_access(created: float | None, timeout: float, deadline: float) -> float:
    """A session's last touch: ``deadline - timeout``, or its creation if
    later (a deadline clamped to the absolute end records no later touch)."""
    last = deadline - timeout
    return created if created is not None and last < created else last


def session_info(conn: sqlite3.Connection, row: tuple[Any, ...]) -> SessionInfo:
    """A :class:`SessionInfo` from a ``(uid, created, timeout, deadline,
    principal)`` row."""
    uid, created, timeout, deadline, principal = row
    last = last_access(created, timeout, deadline)
    return SessionInfo(uid, created, last, deadline, read_data(conn, uid), principal)
