"""The Redis store: sessions shared by processes on many machines.

URLs (the whole reference, with the TLS options, is :mod:`.url`):
``redis://[[user]:password@]host[:port][/db][?prefix=name]`` (one node;
``rediss://`` for TLS), ``redis+cluster://host:port[,host:port...]/`` (a
Redis Cluster, from seed nodes) and
``redis+sentinel://host:port[,host:port...]/SERVICE[/db]`` (the primary a set
of sentinels names). The port defaults to 6379 (sentinels: 26379), the db to
0 and the key prefix to ``lapse``. Needs the ``hiredis`` package (the reply
parser of the store's own client, :mod:`lapse.sessions.stores.redis.client`):
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
- **One connection, pipelined.** Each store has one connection per node;
  the operations that concurrent requests issue in one event-loop tick go to
  each node in one write, and their replies come back in order.
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
- **Idle processes sleep.** ``wait_for_news`` blocks in ``XREAD`` on each
  shard's events stream, on connections of its own (:mod:`.news`): a
  process with nothing due sends one command per shard every 30 s, and is
  woken at once by another process's end, rotation, logout, or new session
  that ends before every other of its shard.
- **Data sent only when it changed.** ``load`` given the data's version a
  process holds returns no data if it is still that version, and data is
  returned as JSON texts, decoded by key when read: a request's cost does not
  grow with keys it does not read.

Keys (``P`` is a shard's key base, see :mod:`.layout`: the prefix itself
on one node without ``shards=``, else a hash tag like ``{lapse:3}``):
``P:s:<uid>`` hash (``_t``: timeout in µs, ``_c``: creation time, ``_e``:
absolute end, if any, ``_v``: the data's version, 1 at creation and one more
per save, ``d:<key>``: JSON value); ``P:deadlines`` sorted set (uid →
deadline, µs, never past ``_e``); ``P:a:<old uid>`` hash (``to``: the uid it
was rotated to, ``until``: end of its grace; the key itself expires a minute
after that); ``P:ended`` sorted set (uid → when ``expire()`` ended it);
``P:leases`` sorted set (uid → lease end) with ``P:c:<uid>`` hash (delivery
id, attempt, cause, owner); ``P:seq`` delivery counter; ``P:events`` stream
of ended uids (``uid``) and rotations (``uid`` the old uid, ``to`` the new),
and wake-ups without a uid (``news``: a session ended by hand, or made to end
first), trimmed to about 100,000 entries a shard (a process that falls further
behind misses older announcements). ``{prefix}:shards`` holds the
deployment's shard count. Every key a script touches is in one shard, so on
a Redis Cluster each operation is one script on one node.

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

The package: :mod:`.store` (the operations), :mod:`.inspection` (read-only
inspection), :mod:`.layout` (shards and their key names), :mod:`.scripts`
(the Lua scripts, one ``.lua`` file each, read once at import),
:mod:`.client` (the auto-pipelined RESP client: EVALSHA, EVAL on NOSCRIPT),
:mod:`.cluster` (routing by slot over one such client per node),
:mod:`.sentinel` (the primary the sentinels name), :mod:`.news` (the
blocking reads that wake an idle process), :mod:`.slots` (hash slots
and the interface the three offer the store), :mod:`.url` (the URL check,
TLS options), :mod:`.values` (times in µs, data as JSON fields).
"""

from __future__ import annotations

from lapse.sessions.stores.redis.store import RedisStore

__all__ = ["RedisStore"]
