"""The PostgreSQL store's statements. ``{t}`` is ``schema.prefix``; ``$1`` is
always the store's clock (NULL: the database's ``clock_timestamp()``), read
once per statement in the CTE ``t``; a deadline within EPSILON of now is due
(as in the other stores)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, fields

__all__ = ["EPSILON", "Queries", "channel_name"]

EPSILON = 1e-6

_NOW = "t AS (SELECT COALESCE($1::float8, extract(epoch FROM clock_timestamp())::float8) AS now)"

_LIVE = "NOT s.ended AND s.deadline > (SELECT now FROM t) + 1e-6"

# The live session a uid names: itself, or within its grace the session an
# old uid was rotated to.
_RESOLVE = f"""
target AS (
    SELECT uid FROM (
        SELECT s.uid, 0 AS rank FROM {{t}}sessions s WHERE s.uid = $2 AND {_LIVE}
        UNION ALL
        SELECT s.uid, 1 FROM {{t}}aliases a JOIN {{t}}sessions s ON s.uid = a.target
            WHERE a.uid = $2 AND a.until > (SELECT now FROM t) AND {_LIVE}
    ) found ORDER BY rank LIMIT 1
)"""

# Writers of announcements take turns (a transaction-scoped advisory lock,
# taken before the id is drawn and held to the commit), so ids commit in
# order and a reader's cursor never passes an id still to come. {lock} is a
# number of this schema and prefix.
_TURN = "turn AS (SELECT pg_advisory_xact_lock({lock}) IS NOT NULL)"

_CLAMPED = "LEAST((SELECT now FROM t) + s.timeout, COALESCE(s.ends_at, 'infinity'::float8))"

# Wakes every process that listens on this schema and prefix's channel (sent
# when the transaction commits; identical ones of one transaction are sent
# once). {channel} is a name of this schema and prefix.
_TELL = "pg_notify('{channel}', '')::text"

# A session's last access as SessionInfo has it: its last touch, or its creation.
_LAST = "GREATEST(s.deadline - s.timeout, s.created)"

# Ends the sessions a WHERE clause names as expire() ends one (anyone may
# claim them now); the statement then wakes the listening processes.
_END = """UPDATE {{t}}sessions s SET ended = true, cause = '{cause}',
            deadline = (SELECT now FROM t), delivery_id = NULL, attempt = 0,
            lease_owner = NULL, lease_until = (SELECT now FROM t)"""


@dataclass(frozen=True, slots=True)
class Queries:
    """Every statement, for one schema and prefix."""

    now: str = f"WITH {_NOW} SELECT now FROM t"
    # (now, uids, versions) -> for each uid asked that names a live session
    # (itself or, within its grace, the one it was rotated to): the uid
    # asked, the session's uid, timeout, deadline, version and principal, then the
    # data's keys and the JSON text of each value (in key order), or NULLs if
    # its version is still the one asked with. One statement for the loads
    # of one event-loop tick (a touch each); the rows are locked in uid
    # order (FOR UPDATE), so two batches never wait on each other in a circle.
    load: str = f"""WITH {_NOW},
        asked AS (SELECT * FROM unnest($2::text[], $3::bigint[]) AS a(uid, version)),
        target AS (
            SELECT a.uid AS asked, a.version, (
                SELECT found.uid FROM (
                    SELECT s.uid, 0 AS rank FROM {{t}}sessions s
                        WHERE s.uid = a.uid AND {_LIVE}
                    UNION ALL
                    SELECT s.uid, 1 FROM {{t}}aliases al JOIN {{t}}sessions s ON s.uid = al.target
                        WHERE al.uid = a.uid AND al.until > (SELECT now FROM t) AND {_LIVE}
                ) found ORDER BY rank LIMIT 1) AS uid
            FROM asked a
        ),
        locked AS (
            SELECT s.uid FROM {{t}}sessions s
            WHERE s.uid IN (SELECT uid FROM target) AND {_LIVE}
            ORDER BY s.uid FOR UPDATE OF s
        ),
        touched AS (
            UPDATE {{t}}sessions s SET deadline = {_CLAMPED}
            FROM locked WHERE s.uid = locked.uid
            RETURNING s.uid, s.timeout, s.deadline, s.version, s.data, s.principal
        )
        SELECT target.asked, x.uid, x.timeout, x.deadline, x.version, x.principal,
            CASE WHEN x.version IS DISTINCT FROM target.version THEN (SELECT COALESCE(
                array_agg(key ORDER BY key), '{{}}') FROM jsonb_each(x.data)) END,
            CASE WHEN x.version IS DISTINCT FROM target.version THEN (SELECT COALESCE(
                array_agg(value::text ORDER BY key), '{{}}') FROM jsonb_each(x.data)) END
        FROM target JOIN touched x ON x.uid = target.uid"""
    # (now, uids, timeouts, lifetimes, data texts) -> uid, deadline of each:
    # the creates of one event-loop tick (distinct uids: a statement cannot
    # write a row twice). A session that ends before every other live one
    # wakes the listening processes (a process asleep until the earliest
    # deadline it knew must not miss it if the one that made it dies).
    create: str = f"""WITH {_NOW},
        earliest AS (SELECT min(deadline) AS at FROM {{t}}sessions WHERE NOT ended),
        made AS (
            INSERT INTO {{t}}sessions AS s
                (uid, timeout, deadline, created, ends_at, version, data)
            SELECT c.uid, c.timeout,
                LEAST(now + c.timeout, COALESCE(now + c.lifetime, 'infinity')),
                now, now + c.lifetime, 1, c.data::jsonb
            FROM unnest($2::text[], $3::float8[], $4::float8[], $5::text[])
                AS c(uid, timeout, lifetime, data), t
            ON CONFLICT (uid) DO UPDATE SET timeout = excluded.timeout,
                deadline = excluded.deadline, ended = false, cause = NULL, delivery_id = NULL,
                attempt = 0, lease_owner = NULL, lease_until = NULL, created = excluded.created,
                ends_at = excluded.ends_at, version = 1, data = excluded.data, principal = NULL
            RETURNING s.uid, s.deadline
        )
        SELECT made.uid, made.deadline, CASE WHEN made.deadline
            < COALESCE((SELECT at FROM earliest), 'infinity') THEN {_TELL} END FROM made"""
    # (now, uid) -> the live row, locked
    lock_live: str = f"""WITH {_NOW} SELECT s.timeout FROM {{t}}sessions s
        WHERE s.uid = $2 AND {_LIVE} FOR UPDATE OF s"""
    # (now, old uid, new uid): the locked row moved and touched
    rotate_session: str = f"""WITH {_NOW} UPDATE {{t}}sessions s SET uid = $3,
        deadline = {_CLAMPED} WHERE s.uid = $2"""
    # (now, old uid): aliases whose grace ended
    prune_aliases: str = f"""WITH {_NOW} DELETE FROM {{t}}aliases
        WHERE until <= (SELECT now FROM t) OR uid = $2"""
    # (new uid, old uid): aliases of the old uid name the new one
    follow_aliases: str = "UPDATE {t}aliases SET target = $1 WHERE target = $2"
    # (now, old uid, new uid, grace)
    add_alias: str = f"""WITH {_NOW} INSERT INTO {{t}}aliases (uid, target, until)
        SELECT $2, $3, now + $4::float8 FROM t WHERE $4::float8 > 0"""
    # (now, old uid, new uid)
    add_rotation: str = f"""WITH {_NOW}, {_TURN},
        added AS (INSERT INTO {{t}}events (uid, at, target)
            SELECT $2, now, $3 FROM t WHERE (SELECT true FROM turn) RETURNING 1)
        SELECT count(*) FROM (SELECT {_TELL} FROM added) told"""
    # (now, uid, changes jsonb text, removed keys) -> new version
    save: str = f"""WITH {_NOW}, {_RESOLVE}
        UPDATE {{t}}sessions s SET data = (s.data || $3::text::jsonb) - $4::text[],
            version = s.version + 1
        FROM target WHERE s.uid = target.uid AND {_LIVE} RETURNING s.version"""
    # (now, uid) -> 1 if live
    exists: str = f"WITH {_NOW} SELECT 1 FROM {{t}}sessions s WHERE s.uid = $2 AND {_LIVE}"
    # (now, uid) -> 1 if it was live. Wakes the listening processes: anyone
    # may claim it now.
    expire: str = f"""WITH {_NOW},
        ended AS (UPDATE {{t}}sessions s SET ended = true, cause = 'expired',
            deadline = (SELECT now FROM t), delivery_id = NULL, attempt = 0,
            lease_owner = NULL, lease_until = (SELECT now FROM t)
            WHERE s.uid = $2 AND {_LIVE} RETURNING 1)
        SELECT {_TELL} FROM ended"""
    # (now, owner, lease, limit) -> uid, data, delivery_id, attempt, cause, deadline
    claim: str = f"""WITH {_NOW},
        due AS (
            SELECT s.uid FROM {{t}}sessions s
            WHERE (NOT s.ended AND s.deadline <= (SELECT now FROM t) + 1e-6)
               OR (s.ended AND s.lease_until <= (SELECT now FROM t) + 1e-6)
            ORDER BY s.deadline, s.uid LIMIT $4 FOR UPDATE OF s SKIP LOCKED
        )
        UPDATE {{t}}sessions s SET ended = true,
            cause = CASE WHEN s.ended THEN s.cause
                WHEN s.ends_at IS NOT NULL AND s.deadline >= s.ends_at THEN 'lifetime'
                ELSE 'timeout' END,
            delivery_id = COALESCE(s.delivery_id,
                s.uid || ':' || substr(md5(random()::text || clock_timestamp()::text), 1, 16)),
            attempt = s.attempt + 1, lease_owner = $2,
            lease_until = (SELECT now FROM t) + $3::float8
        FROM due WHERE s.uid = due.uid
        RETURNING s.uid, s.data::text, s.delivery_id, s.attempt, s.cause, s.deadline"""
    # (now, lease, uid, delivery_id, attempt, owner) -> 1 if still held
    renew: str = f"""WITH {_NOW}
        UPDATE {{t}}sessions SET lease_until = (SELECT now FROM t) + $2::float8
        WHERE uid = $3 AND ended AND delivery_id = $4 AND attempt = $5 AND lease_owner = $6
        RETURNING 1"""
    # (now, uids, delivery_ids, oldest event time kept, attempts) -> how many
    # sessions this forgot (each announced, the listening processes woken):
    # the acknowledgements of one event-loop tick, or one inside the
    # application's transaction (acknowledge(), with its claim's attempt:
    # NULL attempts match any). Old announcements are trimmed too.
    ack: str = f"""WITH {_NOW},
        {_TURN},
        gone AS (DELETE FROM {{t}}sessions s
            USING unnest($2::text[], $3::text[], $5::int[]) AS a(uid, delivery_id, attempt)
            WHERE s.uid = a.uid AND s.ended AND s.delivery_id = a.delivery_id
            AND (a.attempt IS NULL OR s.attempt = a.attempt)
            AND (SELECT true FROM turn) RETURNING s.uid),
        announced AS (INSERT INTO {{t}}events (uid, at) SELECT uid, now FROM gone, t
            RETURNING 1),
        trimmed AS (DELETE FROM {{t}}events WHERE at < (SELECT now FROM t) - $4::float8)
        SELECT count(*) FROM (SELECT {_TELL} FROM announced) told"""
    # (principal): the principal's turn, to the end of the transaction: the
    # two-key advisory locks (a key space of their own, apart from the
    # one-key locks of the schema and the announcements), {plock} a number
    # of this schema and prefix. Two principals of one hashtext() only take
    # turns with each other.
    principal_turn: str = "SELECT pg_advisory_xact_lock({plock}, hashtext($1))"
    # (now, uid, principal) -> uid, principal, last access, whether it is the
    # session the uid names: that session and the principal's other live
    # ones, locked in uid order (as the loads lock theirs)
    principal_rows: str = f"""WITH {_NOW}, {_RESOLVE}
        SELECT s.uid, s.principal, {_LAST}, s.uid = (SELECT uid FROM target)
        FROM {{t}}sessions s
        WHERE {_LIVE} AND (s.uid = (SELECT uid FROM target) OR s.principal = $3)
        ORDER BY s.uid FOR UPDATE OF s"""
    # (now, superseded uids, uid, principal) -> bound: the superseded end
    # (cause "superseded"), then the session is bound
    bind_principal: str = f"""WITH {_NOW},
        ended AS ({_END.format(cause="superseded")}
            WHERE s.uid = ANY($2::text[]) AND {_LIVE} RETURNING 1),
        bound AS (UPDATE {{t}}sessions s SET principal = $4 WHERE s.uid = $3 RETURNING 1)
        SELECT (SELECT count(*) FROM bound),
            (SELECT count(*) FROM (SELECT {_TELL} FROM ended) told)"""
    # (now, principal) -> uid, created, timeout, deadline, data, principal;
    # most recently used first (the partial index sessions_principal)
    sessions_of: str = f"""WITH {_NOW} SELECT s.uid, s.created, s.timeout, s.deadline,
        s.data::text, s.principal FROM {{t}}sessions s WHERE s.principal = $2 AND {_LIVE}
        ORDER BY {_LAST} DESC, s.uid"""
    # (now, except uid, principal) -> uid of each session ended: the
    # principal's live sessions but the one the except uid names
    expire_principal: str = f"""WITH {_NOW}, {_RESOLVE},
        ended AS ({_END.format(cause="expired")}
            WHERE s.principal = $3 AND {_LIVE} AND s.uid IS DISTINCT FROM $2
            AND NOT EXISTS (SELECT 1 FROM target WHERE target.uid = s.uid) RETURNING s.uid)
        SELECT uid, {_TELL} FROM ended"""
    last_event_id: str = "SELECT COALESCE(max(id), 0) FROM {t}events"
    # (cursor, limit) -> id, uid, target
    events_after: str = "SELECT id, uid, target FROM {t}events WHERE id > $1 ORDER BY id LIMIT $2"
    # (now) -> earliest live deadline, earliest lease end, now if one waits unclaimed
    next_deadline: str = f"""WITH {_NOW} SELECT
        (SELECT min(deadline) FROM {{t}}sessions WHERE NOT ended),
        (SELECT min(lease_until) FROM {{t}}sessions WHERE ended AND delivery_id IS NOT NULL),
        (SELECT now FROM t WHERE EXISTS (
            SELECT 1 FROM {{t}}sessions WHERE ended AND delivery_id IS NULL))"""
    # (now, limit) -> uid, created, timeout, deadline, data, principal; latest
    # deadline first
    scan_first: str = f"""WITH {_NOW} SELECT s.uid, s.created, s.timeout, s.deadline,
        s.data::text, s.principal FROM {{t}}sessions s WHERE {_LIVE}
        ORDER BY s.deadline DESC, s.uid DESC LIMIT $2"""
    # (now, limit, cursor deadline, cursor uid): the same, strictly after the cursor
    scan_after: str = f"""WITH {_NOW} SELECT s.uid, s.created, s.timeout, s.deadline,
        s.data::text, s.principal FROM {{t}}sessions s
        WHERE {_LIVE} AND (s.deadline, s.uid) < ($3, $4)
        ORDER BY s.deadline DESC, s.uid DESC LIMIT $2"""
    # (now, uid)
    info: str = f"""WITH {_NOW} SELECT s.uid, s.created, s.timeout, s.deadline, s.data::text,
        s.principal FROM {{t}}sessions s WHERE s.uid = $2 AND {_LIVE}"""
    # (now) -> live sessions
    count: str = f"WITH {_NOW} SELECT count(*) FROM {{t}}sessions s WHERE {_LIVE}"
    # (start, width, end) -> bucket, live sessions ending in it
    by_deadline: str = """SELECT floor((deadline - $1) / $2)::int, count(*) FROM {t}sessions
        WHERE NOT ended AND deadline > $1 AND deadline <= $3 GROUP BY 1"""

    @classmethod
    def for_tables(cls, schema: str, prefix: str) -> Queries:
        """The statements on ``schema.prefix*`` (checked identifiers)."""
        tables = f"{schema}.{prefix}"
        lock = str(zlib.crc32(f"lapse-events:{tables}".encode()))
        principals = zlib.crc32(f"lapse-principals:{tables}".encode())
        names = {
            "{t}": tables,
            "{lock}": lock,
            "{plock}": str(principals - (1 << 32) if principals >= 1 << 31 else principals),
            "{channel}": channel_name(schema, prefix),
        }
        made = {}
        for f in fields(cls):
            text = str(f.default)
            for name, value in names.items():
                text = text.replace(name, value)
            made[f.name] = text
        return cls(**made)


def channel_name(schema: str, prefix: str) -> str:
    """The LISTEN/NOTIFY channel of the tables ``schema.prefix*``: a plain
    identifier (a schema and a prefix may together pass the 63 bytes a name
    can have)."""
    return f"lapse_{zlib.crc32(f'{schema}.{prefix}'.encode()):08x}"
