"""The Redis store: sessions shared by processes on many machines.

URL: ``redis://[[user]:password@]host[:port][/db][?prefix=name]``, or
``rediss://`` for TLS. The port defaults to 6379, the db to 0 and the key
prefix to ``lapse``. Needs the ``hiredis`` package (the reply parser of the
store's own client, :mod:`lapse.sessions.stores._resp`):
``pip install hiredis`` (from a lapse checkout: ``pip install '.[redis]'``).

Guarantees:

- **One round trip per operation.** Every operation is one Lua script
  (``EVALSHA`` by the SHA1 computed here; ``EVAL`` once, caching it again,
  if the server lost its scripts) or one plain command, so each runs
  atomically on the server: ``load`` touches and reads in one step, and
  ``claim`` never hands one session to two claimers while its lease holds,
  however many processes claim at once.
- **Server time.** Every deadline and lease is computed inside the scripts
  from the Redis server's ``TIME`` (microseconds), so clock skew between
  application nodes cannot end a live session early. A store given
  ``clock=`` (tests) passes ``clock()`` to the scripts instead.
- **One connection, pipelined.** Each store has one connection; the
  operations that concurrent requests issue in one event-loop tick go to
  Redis in one write, and their replies come back in order.
- **Fails fast.** Connecting times out after ``timeout`` seconds (1 by
  default), and so does the connection when the server leaves commands
  unanswered that long (every waiting operation fails then); any failure is
  a :class:`StoreUnavailable` naming ``host:port`` (never the password). The
  client reconnects on the next call once the server is back; an operation
  that finds the connection broken by a server restart since the previous
  one is sent once more on a new connection.
- **Per-key saves.** Each data key is its own hash field, so ``save`` writes
  only the changed keys and two requests changing different keys of one
  session both persist.
- **Data sent only when it changed.** ``load`` given the data's version a
  process holds returns no data if it is still that version, and data is
  returned as JSON texts, decoded by key when read: a request's cost does not
  grow with keys it does not read.

Keys (``P`` is the prefix): ``P:s:<uid>`` hash (``_t``: timeout in µs,
``_c``: creation time, ``_e``: absolute end, if any, ``_v``: the data's
version, 1 at creation and one more per save, ``d:<key>``: JSON value);
``P:deadlines`` sorted set (uid → deadline, µs, never past ``_e``);
``P:a:<old uid>`` hash (``to``: the uid it was rotated to, ``until``: end of
its grace; the key itself expires a minute after that);
``P:ended`` sorted set (uid → when ``expire()`` ended it); ``P:leases``
sorted set (uid → lease end) with ``P:c:<uid>`` hash (delivery id, attempt,
cause, owner); ``P:seq`` delivery counter; ``P:events`` stream of ended
uids (``uid``) and rotations (``uid`` the old uid, ``to`` the new),
trimmed to about 100,000 entries (a process that falls further behind
misses older announcements). Redis Cluster is not supported: the scripts
touch keys of many uids.

Persistence: a Redis that restarts without persistence comes back empty:
every session is gone (its users are logged out), sessions that had ended
but whose expiry hook had not run yet never get it, and the end
announcements are lost. To keep them, run Redis with the append-only file
(``appendonly yes`` with ``appendfsync everysec``: at most about a second of
writes is lost in a crash) or at least RDB snapshots (``save 60 1000``: a
crash loses the writes since the last snapshot). Sessions keep their
deadlines across a restart, because deadlines are absolute server times.
Keep ``maxmemory-policy noeviction`` (the default): an evicting policy drops
sessions, or parts of them, without any expiry hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from lapse.sessions.store import (
    Event,
    Expiry,
    SessionInfo,
    StoreConfigError,
    StoredSession,
    StoreUnavailable,
    _bucket_bounds,
)
from lapse.sessions.stores import check_no_control

try:
    from lapse.sessions.stores._resp import RedisClient, RedisError, ReplyError, Script

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    _IMPORT_ERROR = exc

__all__ = ["RedisStore"]

_US = 1_000_000
"""Microseconds per second: times are stored as integer microseconds."""

_EVENTS_MAXLEN = 100_000
_EVENTS_BATCH = 1000
_CURSOR = re.compile(r"\d+(-\d+)?")

# Every script starts with this: the time (the clock argument, else the
# server's TIME, in µs) and an exact integer-to-string conversion for scores.
_PRELUDE = """
local function now_us(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function n2s(n) return string.format('%.0f', n) end
"""

# Finds the live session a uid names: itself, or (an old uid in its grace,
# an alias) the session it was rotated to, followed up to 8 rotations.
# -> uid, its hash key, its deadline score; or false
_RESOLVE = """
local function resolve(uid, key, deadlines, now)
  local d = redis.call('ZSCORE', deadlines, uid)
  if not d then
    local prefix = string.sub(key, 1, #key - #uid - 3)
    for _ = 1, 8 do
      local a = redis.call('HMGET', prefix .. ':a:' .. uid, 'to', 'until')
      if not a[1] or tonumber(a[2]) <= now then return false end
      uid = a[1]
      d = redis.call('ZSCORE', deadlines, uid)
      if d then break end
    end
    key = prefix .. ':s:' .. uid
  end
  if not d or tonumber(d) <= now then return false end
  return uid, key, d
end
"""

# KEYS: session hash, deadlines. ARGV: now, uid, the version the caller holds
# ('' for none).
# -> false, or {deadline, timeout, {field, value, ...} or false (the data is
# at the version given), uid (the live session's, if an alias was followed)
# or false, version}
_LOAD = (
    _PRELUDE
    + _RESOLVE
    + """
local now = now_us(ARGV[1])
local uid, key = resolve(ARGV[2], KEYS[1], KEYS[2], now)
if not uid then return false end
local h = redis.call('HMGET', key, '_t', '_e', '_v')
if not h[1] then return false end
local deadline = now + tonumber(h[1])
if h[2] and tonumber(h[2]) < deadline then deadline = tonumber(h[2]) end
deadline = n2s(deadline)
redis.call('ZADD', KEYS[2], deadline, uid)
local moved = false
if uid ~= ARGV[2] then moved = uid end
local version = h[3] or '0'
if ARGV[3] ~= '' and ARGV[3] == version then return {deadline, h[1], false, moved, version} end
return {deadline, h[1], redis.call('HGETALL', key), moved, version}
"""
)

# KEYS: session hash, deadlines, ended.
# ARGV: now, uid, timeout, lifetime ('' for none), field, value, ... -> deadline
_CREATE = (
    _PRELUDE
    + """
local now = now_us(ARGV[1])
local deadline = now + tonumber(ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '_t', ARGV[3], '_c', n2s(now), '_v', 1)
if ARGV[4] ~= '' then
  local ends = now + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], '_e', n2s(ends))
  if ends < deadline then deadline = ends end
end
deadline = n2s(deadline)
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], deadline, ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return deadline
"""
)

# KEYS: old session hash, new session hash, deadlines, old uid's alias, events.
# ARGV: now, old uid, new uid, grace (µs), events maxlen.
# -> 1 if the session was live (and moved), else 0
_ROTATE = (
    _PRELUDE
    + """
local now = now_us(ARGV[1])
local d = redis.call('ZSCORE', KEYS[3], ARGV[2])
if not d or tonumber(d) <= now then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return redis.error_reply('ERR new uid in use') end
redis.call('RENAME', KEYS[1], KEYS[2])
local h = redis.call('HMGET', KEYS[2], '_t', '_e')
local deadline = now + tonumber(h[1])
if h[2] and tonumber(h[2]) < deadline then deadline = tonumber(h[2]) end
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[3], n2s(deadline), ARGV[3])
local grace = tonumber(ARGV[4])
if grace > 0 then
  redis.call('HSET', KEYS[4], 'to', ARGV[3], 'until', n2s(now + grace))
  redis.call('PEXPIRE', KEYS[4], math.floor(grace / 1000) + 60000)
end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*', 'uid', ARGV[2], 'to', ARGV[3])
return 1
"""
)

# KEYS: session hash, deadlines. ARGV: now, uid, n, n x (field, value), removed fields...
# Writes to the live session the uid names (itself, or within its grace the
# session an old uid was rotated to).
# -> the data's new version if written, else 0
_SAVE = (
    _PRELUDE
    + _RESOLVE
    + """
local now = now_us(ARGV[1])
local uid, key = resolve(ARGV[2], KEYS[1], KEYS[2], now)
if not uid then return 0 end
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  i = i + 2
end
for j = i, #ARGV do redis.call('HDEL', key, ARGV[j]) end
return redis.call('HINCRBY', key, '_v', 1)
"""
)

# KEYS: deadlines. ARGV: now, uid. -> 1 if live, else 0
_EXISTS = (
    _PRELUDE
    + """
local d = redis.call('ZSCORE', KEYS[1], ARGV[2])
if d and tonumber(d) > now_us(ARGV[1]) then return 1 end
return 0
"""
)

# KEYS: deadlines, ended. ARGV: now, uid. -> 1 if it was live (and is ended now)
_EXPIRE = (
    _PRELUDE
    + """
local now = now_us(ARGV[1])
local d = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not d or tonumber(d) <= now then return 0 end
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], n2s(now), ARGV[2])
return 1
"""
)

# KEYS: deadlines, ended, leases, seq. ARGV: now, prefix, owner, lease, limit.
# Candidates are the due entries of the three sets, oldest (smallest score:
# when each became claimable) first.
# -> {{uid, delivery_id, attempt, cause, {field, value, ...}}, ...}
_CLAIM = (
    _PRELUDE
    + """
local now = now_us(ARGV[1])
local prefix = ARGV[2]
local limit = tonumber(ARGV[5])
local lease_until = n2s(now + tonumber(ARGV[4]))
local candidates = {}
local sources = {{KEYS[1], 'timeout'}, {KEYS[2], 'expired'}, {KEYS[3], false}}
for _, source in ipairs(sources) do
  local due = redis.call('ZRANGEBYSCORE', source[1], '-inf', n2s(now),
                         'WITHSCORES', 'LIMIT', 0, limit)
  for i = 1, #due, 2 do
    table.insert(candidates, {due[i], tonumber(due[i + 1]), source[1], source[2]})
  end
end
table.sort(candidates, function(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  return a[1] < b[1]
end)
local out, seen = {}, {}
for _, c in ipairs(candidates) do
  if #out >= limit then break end
  local uid = c[1]
  if not seen[uid] then
    seen[uid] = true
    local ckey = prefix .. ':c:' .. uid
    local id, attempt, cause = false, 1, c[4]
    if not cause then
      local h = redis.call('HMGET', ckey, 'id', 'attempt', 'cause')
      if h[1] then
        id, attempt, cause = h[1], tonumber(h[2]) + 1, h[3]
      else
        cause = 'timeout'
      end
    else
      redis.call('ZREM', c[3], uid)
      if cause == 'timeout' then
        local e = redis.call('HGET', prefix .. ':s:' .. uid, '_e')
        if e and tonumber(e) <= c[2] then cause = 'lifetime' end
      end
    end
    if not id then id = uid .. ':' .. redis.call('INCR', KEYS[4]) end
    redis.call('ZADD', KEYS[3], lease_until, uid)
    redis.call('HSET', ckey, 'id', id, 'attempt', attempt, 'cause', cause, 'owner', ARGV[3])
    table.insert(out, {uid, id, tostring(attempt), cause,
                       redis.call('HGETALL', prefix .. ':s:' .. uid)})
  end
end
return out
"""
)

# KEYS: claim hash, leases. ARGV: now, uid, delivery_id, attempt, owner, lease.
# -> 1 if that claim still held and its lease now ends at now + lease, else 0
_RENEW = (
    _PRELUDE
    + """
local h = redis.call('HMGET', KEYS[1], 'id', 'attempt', 'owner')
if h[1] ~= ARGV[3] or h[2] ~= ARGV[4] or h[3] ~= ARGV[5] then return 0 end
if not redis.call('ZSCORE', KEYS[2], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], n2s(now_us(ARGV[1]) + tonumber(ARGV[6])), ARGV[2])
return 1
"""
)

# KEYS: session hash, claim hash, leases, deadlines, events. ARGV: uid, delivery_id.
# -> 1 if acknowledged, 0 if the delivery id did not match
_ACK = """
if redis.call('HGET', KEYS[2], 'id') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then redis.call('DEL', KEYS[1]) end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[3], '*', 'uid', ARGV[1])
return 1
"""

# KEYS: deadlines, leases, ended. ARGV: now. -> false or the earliest time
_NEXT_DEADLINE = (
    _PRELUDE
    + """
local best = false
for _, key in ipairs({KEYS[1], KEYS[2]}) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then
    local score = tonumber(first[2])
    if not best or score < best then best = score end
  end
end
if redis.call('ZCARD', KEYS[3]) > 0 then
  local now = now_us(ARGV[1])
  if not best or now < best then best = now end
end
if not best then return false end
return n2s(best)
"""
)

# KEYS: deadlines. ARGV: now, prefix, cursor score ('' for the start),
# cursor uid, limit.
# Live entries (score > now) after the cursor in (score desc, uid desc)
# order, up to limit: by rank after the cursor's own entry if it is still
# where it was, else by score (ties at the cursor's score, then below).
# -> {uid, score, {field, value, ...}, ...}
_SCAN = (
    _PRELUDE
    + """
local now = now_us(ARGV[1])
local prefix, limit = ARGV[2], tonumber(ARGV[5])
local found = {}
if ARGV[3] == '' then
  found = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', '(' .. n2s(now),
                     'WITHSCORES', 'LIMIT', 0, limit)
else
  local mark, after = tonumber(ARGV[3]), ARGV[4]
  local s = redis.call('ZSCORE', KEYS[1], after)
  if s and tonumber(s) == mark then
    local r = redis.call('ZREVRANK', KEYS[1], after)
    found = redis.call('ZREVRANGE', KEYS[1], r + 1, r + limit, 'WITHSCORES')
  else
    local ties = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], ARGV[3], 'WITHSCORES')
    for i = #ties - 1, 1, -2 do
      if #found >= 2 * limit then break end
      if ties[i] < after then
        table.insert(found, ties[i])
        table.insert(found, ties[i + 1])
      end
    end
    if #found < 2 * limit then
      local rest = redis.call('ZREVRANGEBYSCORE', KEYS[1], '(' .. ARGV[3], '(' .. n2s(now),
                              'WITHSCORES', 'LIMIT', 0, limit - #found / 2)
      for _, v in ipairs(rest) do table.insert(found, v) end
    end
  end
end
local out = {}
for i = 1, #found, 2 do
  if tonumber(found[i + 1]) <= now then break end
  table.insert(out, found[i])
  table.insert(out, found[i + 1])
  table.insert(out, redis.call('HGETALL', prefix .. ':s:' .. found[i]))
end
return out
"""
)

# KEYS: deadlines, session hash. ARGV: now, uid. -> false or {score, {field, value, ...}}
_INFO = (
    _PRELUDE
    + """
local d = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not d or tonumber(d) <= now_us(ARGV[1]) then return false end
return {d, redis.call('HGETALL', KEYS[2])}
"""
)

# KEYS: deadlines. ARGV: now. -> live sessions
_COUNT = (
    _PRELUDE
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. n2s(now_us(ARGV[1])), '+inf')
"""
)

_SCRIPTS = {
    "scan": _SCAN,
    "info": _INFO,
    "count": _COUNT,
    "load": _LOAD,
    "create": _CREATE,
    "rotate": _ROTATE,
    "save": _SAVE,
    "exists": _EXISTS,
    "expire": _EXPIRE,
    "claim": _CLAIM,
    "renew": _RENEW,
    "ack": _ACK,
    "next_deadline": _NEXT_DEADLINE,
}


_PERMANENT_REPLIES = (
    "WRONGPASS",
    "NOAUTH",
    "NOPERM",
    "ERR invalid password",
    "ERR AUTH",
    "ERR DB index is out of range",
    "ERR invalid DB index",
)
"""Error replies that retrying does not mend: credentials the server refuses
(or a password it does not want), a db index it does not have."""

_PERMANENT_LOOKUPS = frozenset(
    code
    for code in (
        getattr(socket, "EAI_NONAME", None),
        getattr(socket, "EAI_NODATA", None),
        getattr(socket, "EAI_SERVICE", None),
    )
    if code is not None
)
"""Name lookup failures that say the host does not exist (not that the
resolver could not answer now: ``EAI_AGAIN`` passes)."""


def _permanent(exc: BaseException) -> bool:
    """Whether a client failure is one the store can never get past as configured."""
    if isinstance(exc, ReplyError):
        return str(exc).startswith(_PERMANENT_REPLIES)
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return seen.errno in _PERMANENT_LOOKUPS
        seen = seen.__cause__
    return False


@dataclass(frozen=True, slots=True)
class _Target:
    """A parsed store URL."""

    tls: bool
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    prefix: str | None
    redacted: str


def _redact(url: str) -> str:
    """``url`` with the password (if any) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = len(rest)
    for stop in "/?#":
        pos = rest.find(stop)
        if pos != -1:
            end = min(end, pos)
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hostport = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostport}{tail}"


def _parse_url(url: str) -> _Target:
    """Check a store URL; :class:`StoreConfigError` naming what is wrong."""
    if not isinstance(url, str):
        raise StoreConfigError(f"a Redis store URL is a string, not {type(url).__name__}")
    check_no_control(url, "a Redis store URL")
    redacted = _redact(url)

    def bad(why: str) -> StoreConfigError:
        return StoreConfigError(f"bad Redis store URL {redacted!r}: {why}")

    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise bad(str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise bad(f"the scheme must be redis:// or rediss://, not {parts.scheme + ':'!r}")
    if parts.fragment:
        raise bad("a fragment (#...) means nothing here")
    host = parts.hostname
    if not host:
        raise bad("no host")
    try:
        port = parts.port
    except ValueError:
        raise bad("the port must be a number from 1 to 65535") from None
    if port == 0:
        raise bad("the port must be a number from 1 to 65535")
    path = parts.path
    if path in ("", "/"):
        db = 0
    elif re.fullmatch(r"/\d+", path):
        db = int(path[1:])
    else:
        raise bad(f"the path must be /<db number>, not {path!r}")
    prefix: str | None = None
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise bad(f"bad query: {exc}") from None
    for name, values in query.items():
        if name != "prefix":
            raise bad(f"unknown option {name!r} (the only option is prefix)")
        if len(values) != 1 or not values[0]:
            raise bad("prefix must be given once, not empty")
        prefix = values[0]
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return _Target(
        tls=scheme == "rediss",
        host=host,
        port=port or 6379,
        db=db,
        username=username,
        password=password or None,
        prefix=prefix,
        redacted=redacted,
    )


def _us(seconds: float, what: str) -> int:
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be a finite number of seconds, not {seconds!r}")
    return round(seconds * _US)


def _data(flat: list[str]) -> dict[str, Any]:
    """Session data from a flat HGETALL reply (``d:<key>`` fields only)."""
    data: dict[str, Any] = {}
    for i in range(0, len(flat) - 1, 2):
        name = flat[i]
        if name.startswith("d:"):
            data[name[2:]] = json.loads(flat[i + 1])
    return data


def _encoded(flat: list[str]) -> dict[str, str]:
    """Session data as JSON texts by key, from a flat HGETALL reply."""
    return {
        flat[i][2:]: flat[i + 1] for i in range(0, len(flat) - 1, 2) if flat[i].startswith("d:")
    }


def _session_info(uid: str, score: str, flat: list[str]) -> SessionInfo:
    """A :class:`SessionInfo` from a deadline score and the session's HGETALL."""
    timeout = _field(flat, "_t")
    created_us = _field(flat, "_c")
    deadline = int(score) / _US
    created = None if created_us is None else int(created_us) / _US
    last = deadline if timeout is None else deadline - int(timeout) / _US
    if created is not None and last < created:
        last = created
    return SessionInfo(uid, created, last, deadline, _data(flat))


def _field(flat: list[str], name: str) -> str | None:
    """The value of ``name`` in a flat field/value list (a stream entry)."""
    for i in range(0, len(flat) - 1, 2):
        if flat[i] == name:
            return flat[i + 1]
    return None


def _encode(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class RedisStore:
    """Sessions in Redis, shared by every process that uses the same URL.

    Construction only checks the URL (no network): a malformed one is a
    :class:`StoreConfigError`. The connection is made by :meth:`open` or the
    first operation. ``url`` is the URL with its password replaced by ``***``,
    safe to log.
    """

    shared = True
    enforces_timeout = True
    """The client fails every pending call once the server has been silent
    for ``timeout`` seconds (one watchdog per connection)."""
    holds_sessions = False

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] | None = None,
        prefix: str = "lapse",
        timeout: float = 1.0,
    ) -> None:
        target = _parse_url(url)
        if _IMPORT_ERROR is not None:
            raise StoreConfigError(
                "the Redis session store needs the hiredis package: `pip install hiredis` "
                "(or, from a lapse checkout, `pip install '.[redis]'`)"
            ) from _IMPORT_ERROR
        if not isinstance(timeout, int | float) or not (0 < timeout < math.inf):
            raise StoreConfigError(f"the Redis timeout must be positive seconds, not {timeout!r}")
        prefix = target.prefix or prefix
        if not isinstance(prefix, str) or not prefix:
            raise StoreConfigError(f"the Redis key prefix must be a non-empty string: {prefix!r}")
        self.url = target.redacted
        self.prefix = prefix
        self.timeout = float(timeout)
        self.clock = clock
        self._target = target
        self._where = f"{target.host}:{target.port}"
        self._client = RedisClient(
            target.host,
            target.port,
            db=target.db,
            username=target.username,
            password=target.password,
            tls=target.tls,
            timeout=self.timeout,
        )
        self._scripts = {name: Script(source) for name, source in _SCRIPTS.items()}
        self._load_script = self._scripts["load"]
        self._k_deadlines = f"{prefix}:deadlines"
        self._k_ended = f"{prefix}:ended"
        self._k_leases = f"{prefix}:leases"
        self._k_seq = f"{prefix}:seq"
        self._k_events = f"{prefix}:events"

    @classmethod
    def from_url(cls, url: str, clock: Callable[[], float] | None = None) -> RedisStore:
        """The store for ``url`` (``?prefix=`` sets the key prefix)."""
        return cls(url, clock=clock)

    def __repr__(self) -> str:
        return f"<RedisStore {self.url} prefix={self.prefix!r}>"

    # -- plumbing -----------------------------------------------------------

    def _scrub(self, text: str) -> str:
        password = self._target.password
        if password:
            text = text.replace(password, "***")
        return text

    def _unavailable(self, op: str, exc: Exception) -> StoreUnavailable:
        """The :class:`StoreUnavailable` for a client failure (raise it ``from exc``);
        permanent if it is one that retrying does not mend (see :func:`_permanent`)."""
        detail = self._scrub(str(exc)) or "timed out"
        return StoreUnavailable(
            f"Redis session store at {self._where} unavailable ({op}): "
            f"{type(exc).__name__}: {detail}",
            permanent=_permanent(exc),
        )

    def _now_arg(self) -> str:
        return "" if self.clock is None else str(_us(self.clock(), "clock()"))

    def _key(self, uid: str) -> str:
        return f"{self.prefix}:s:{uid}"

    async def _call(self, op: str, keys: list[str], args: list[str | int]) -> Any:
        try:
            return await self._client.evalsha(self._scripts[op], keys, args)
        except (RedisError, OSError) as exc:
            raise self._unavailable(op, exc) from exc

    async def _command(self, op: str, *args: str | int) -> Any:
        try:
            return await self._client.execute(*args)
        except (RedisError, OSError) as exc:
            raise self._unavailable(op, exc) from exc

    # -- the protocol -------------------------------------------------------

    async def open(self) -> None:
        """Connect and load the scripts (one pipelined round trip). Idempotent."""
        loads = [self._command("open", "SCRIPT", "LOAD", s.source) for s in self._scripts.values()]
        await asyncio.gather(*loads)

    async def aclose(self) -> None:
        """Close the connection. Idempotent; never raises a client error.
        The store stays usable: the next operation connects again."""
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    async def now(self) -> float:
        """The store's time: ``clock()`` if given, else the server's ``TIME``."""
        if self.clock is not None:
            return self.clock()
        seconds, micros = await self._command("now", "TIME")
        return int(seconds) + int(micros) / _US

    async def load(self, uid: str, version: int | None = None) -> StoredSession | None:
        """Touch (deadline = now + timeout) and read a live session in one
        script; None if unknown or past its deadline (never revived). Its
        data as JSON texts, or none (``unchanged``) if still at ``version``."""
        # The hot path (one call per request): no helper coroutine in between.
        clock = self.clock
        now = "" if clock is None else str(_us(clock(), "clock()"))
        try:
            reply = await self._client.evalsha(
                self._load_script,
                (f"{self.prefix}:s:{uid}", self._k_deadlines),
                (now, uid, "" if version is None else version),
            )
        except (RedisError, OSError) as exc:
            raise self._unavailable("load", exc) from exc
        if not reply:
            return None
        deadline, timeout, flat, moved, current = reply
        if moved:  # loaded through an alias: the session's uid now
            uid = moved
        stored = StoredSession(uid, int(timeout) / _US, int(deadline) / _US, version=int(current))
        if flat is None:
            stored.unchanged = True
        else:
            stored.encoded = _encoded(flat)
        return stored

    async def create(
        self, uid: str, timeout: float, data: Mapping[str, Any], lifetime: float | None = None
    ) -> float:
        """Store a new live session (replacing any live one of that uid);
        its deadline, now + ``timeout`` (or now + ``lifetime``, its absolute
        end, if that is earlier)."""
        args: list[str | int] = [
            self._now_arg(),
            uid,
            _us(timeout, "timeout"),
            "" if lifetime is None else _us(lifetime, "lifetime"),
        ]
        for key, value in data.items():
            args += ["d:" + key, _encode(value)]
        keys = [self._key(uid), self._k_deadlines, self._k_ended]
        return int(await self._call("create", keys, args)) / _US

    async def rotate(self, uid: str, new_uid: str, grace: float) -> bool:
        """Move the live session ``uid`` (hash and deadline) to ``new_uid``
        and touch it, in one script; ``uid`` stays an alias of it for
        ``grace`` seconds; the rotation is announced in the events stream.
        False if ``uid`` was not live."""
        keys = [
            self._key(uid),
            self._key(new_uid),
            self._k_deadlines,
            f"{self.prefix}:a:{uid}",
            self._k_events,
        ]
        args: list[str | int] = [
            self._now_arg(),
            uid,
            new_uid,
            max(0, _us(grace, "grace")),
            _EVENTS_MAXLEN,
        ]
        return bool(await self._call("rotate", keys, args))

    async def save(
        self, uid: str, changed: Mapping[str, Any], removed: Iterable[str]
    ) -> bool | int:
        """Write the changed keys, then delete the removed ones (a key in
        both ends up deleted), in the live session ``uid`` (or the one an old
        ``uid`` was rotated to, within its grace); the data's new version.
        The deadline does not move. False, with nothing written, if there is
        no such session."""
        args: list[str | int] = [self._now_arg(), uid, len(changed)]
        for key, value in changed.items():
            args += ["d:" + key, _encode(value)]
        args += ["d:" + key for key in removed]
        version = int(await self._call("save", [self._key(uid), self._k_deadlines], args))
        return version if version else False

    async def exists(self, uid: str) -> bool:
        """Whether ``uid`` is live (deadline in the future); no touch."""
        return bool(await self._call("exists", [self._k_deadlines], [self._now_arg(), uid]))

    async def expire(self, uid: str) -> bool:
        """End a live session now, with cause ``"expired"``; claimable at once."""
        keys = [self._k_deadlines, self._k_ended]
        return bool(await self._call("expire", keys, [self._now_arg(), uid]))

    async def claim(self, owner: str, lease: float, limit: int) -> list[Expiry]:
        """Atomically lease up to ``limit`` ended sessions, oldest first (by
        when each became claimable): live ones past their deadline (cause
        ``"timeout"``), ones ended by :meth:`expire` (``"expired"``), and
        leased ones whose lease ran out (same delivery id, attempt + 1).
        Each comes with its final data."""
        if limit <= 0:
            return []
        keys = [self._k_deadlines, self._k_ended, self._k_leases, self._k_seq]
        args: list[str | int] = [
            self._now_arg(),
            self.prefix,
            owner,
            _us(lease, "lease"),
            int(limit),
        ]
        reply = await self._call("claim", keys, args)
        return [
            Expiry(uid, _data(flat), delivery_id, int(attempt), cause)
            for uid, delivery_id, attempt, cause, flat in reply
        ]

    async def renew(self, expiry: Expiry, owner: str, lease: float) -> bool:
        """Move the claim's lease end to now + ``lease`` (server time), if
        ``owner`` still holds this delivery (same delivery id and attempt);
        False, changing nothing, if not. One script."""
        keys = [f"{self.prefix}:c:{expiry.uid}", self._k_leases]
        args: list[str | int] = [
            self._now_arg(),
            expiry.uid,
            expiry.delivery_id,
            str(expiry.attempt),
            owner,
            _us(lease, "lease"),
        ]
        return bool(await self._call("renew", keys, args))

    async def ack(self, expiry: Expiry) -> None:
        """Forget the session and append its uid to the events stream, if
        ``expiry.delivery_id`` is still its delivery (else nothing)."""
        uid = expiry.uid
        keys = [
            self._key(uid),
            f"{self.prefix}:c:{uid}",
            self._k_leases,
            self._k_deadlines,
            self._k_events,
        ]
        await self._call("ack", keys, [uid, expiry.delivery_id, _EVENTS_MAXLEN])

    async def events(self, cursor: str | None) -> tuple[list[Event], str]:
        """Uids acked after ``cursor`` (a stream id; at most 1000 a call;
        ``(old, new)`` pairs for rotations), and the new cursor. ``None``:
        no uids, and the stream's last id (or ``"0-0"``), to read from now
        on."""
        if cursor is not None and not _CURSOR.fullmatch(cursor):
            raise ValueError(f"not a Redis events cursor: {cursor!r}")
        if cursor is None:
            last = await self._command("events", "XREVRANGE", self._k_events, "+", "-", "COUNT", 1)
            return [], str(last[0][0]) if last else "0-0"
        entries = await self._command(
            "events", "XRANGE", self._k_events, "(" + cursor, "+", "COUNT", _EVENTS_BATCH
        )
        entries = entries or []
        found: list[Event] = []
        for _, flat in entries:
            uid = _field(flat, "uid") if flat else None
            if uid is not None:
                to = _field(flat, "to")
                found.append(uid if to is None else (uid, to))
        return found, str(entries[-1][0]) if entries else cursor

    # -- inspection: no touch, never KEYS nor SCAN ---------------------------

    async def scan(self, cursor: str | None, limit: int) -> tuple[list[SessionInfo], str | None]:
        """Live sessions from the deadlines sorted set, latest deadline first
        (for sessions of one timeout: the most recently active first), ties
        by uid descending, ``limit`` at a time: one script per page (the
        range, then each session's hash), never ``KEYS`` or ``SCAN``.

        The cursor is the (deadline, uid) of the last session returned; the
        next page starts right after it. So a full scan returns no session
        twice: a session touched during the scan moves to a later deadline,
        behind the cursor (left out if not returned yet, as are sessions
        created during the scan). Sessions live throughout the scan and not
        touched are all returned.
        """
        if limit < 1:
            raise ValueError(f"a scan limit is at least 1, not {limit!r}")
        mark, after = "", ""
        if cursor is not None:
            mark, sep, after = cursor.partition(":")
            if not sep or not mark.isdigit():
                raise ValueError(f"not a scan cursor of this store: {cursor!r}")
        keys = [self._k_deadlines]
        args: list[str | int] = [self._now_arg(), self.prefix, mark, after, int(limit) + 1]
        flat = await self._call("scan", keys, args)
        rows = [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]
        infos = [_session_info(uid, score, data) for uid, score, data in rows[:limit]]
        if len(rows) <= limit:
            return infos, None
        uid, score, _ = rows[limit - 1]
        return infos, f"{score}:{uid}"

    async def info(self, uid: str) -> SessionInfo | None:
        """The live session ``uid`` (not an alias), or None; one script.
        ``last_access`` is ``deadline - timeout``, or the creation if later:
        exact, except that a session whose deadline is its absolute end
        records no later touch (it is then the earliest that touch can be)."""
        keys = [self._k_deadlines, self._key(uid)]
        reply = await self._call("info", keys, [self._now_arg(), uid])
        return None if not reply else _session_info(uid, reply[0], reply[1])

    async def count(self) -> int:
        """Live sessions now: ``ZCOUNT`` of the deadlines after now."""
        return int(await self._call("count", [self._k_deadlines], [self._now_arg()]))

    async def deadlines(self, now: float, horizon: float, buckets: int) -> list[int]:
        """One ``ZCOUNT`` of the deadlines sorted set per slice, pipelined in
        one round trip."""
        _bucket_bounds(now, horizon, buckets)
        start = _us(now, "now")
        span = _us(horizon, "horizon")
        bounds = [start + span * i // buckets for i in range(buckets + 1)]
        calls = []
        for i in range(buckets):
            low = f"({start}" if i == 0 else str(bounds[i])
            high = str(bounds[i + 1]) if i == buckets - 1 else f"({bounds[i + 1]}"
            calls.append(self._command("deadlines", "ZCOUNT", self._k_deadlines, low, high))
        return [int(n) for n in await asyncio.gather(*calls)]

    async def next_deadline(self) -> float | None:
        """The earliest of: the live sessions' deadlines (possibly past, if
        due but unclaimed), the leases' ends, and now if a session ended by
        :meth:`expire` awaits a claim. None if there is nothing."""
        keys = [self._k_deadlines, self._k_leases, self._k_ended]
        reply = await self._call("next_deadline", keys, [self._now_arg()])
        return None if reply is None else int(reply) / _US
