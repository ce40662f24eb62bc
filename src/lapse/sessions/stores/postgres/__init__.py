"""The PostgreSQL store: sessions in tables of a PostgreSQL database, shared
by the processes of every machine that uses it (driver: asyncpg, ``pip
install asyncpg``; from a lapse checkout ``pip install '.[postgres]'``).

URL: ``postgresql://user:password@host:port/dbname`` (or ``postgres://``),
options ``?schema=`` (default ``public``: it exists in every database, so
the role needs no right to create a schema), ``?table_prefix=`` (default
``lapse_``), ``?sslmode=`` (disable, require, verify-ca, verify-full;
default disable), ``?timeout=`` (seconds, default 1) and ``?pool_size=``
(default 10).

Guarantees:

- **One round trip per request.** ``load`` is one ``UPDATE ... RETURNING``
  (it follows a rotation alias within its grace in the same statement);
  ``save`` is one ``UPDATE`` writing ``data || changes - removed`` to the
  session's ``jsonb`` under its row lock, so concurrent saves of different
  keys all persist; each bumps a version, so a load whose data the caller
  holds returns none.
- **Time is the database's.** Deadlines and leases are in
  ``clock_timestamp()`` of the server (or ``clock=``, for tests), so clock
  skew between application servers cannot end a session early.
- **Claims once per lease.** ``claim`` takes due rows ``FOR UPDATE SKIP
  LOCKED``: concurrent claimers in any processes never take the same
  session; a lease that ran out hands it out again (same ``delivery_id``,
  ``attempt`` + 1). ``rotate`` is one transaction.
- **Bounded calls.** Each call is bounded client-side (the timeout and a
  half, connecting included, not counting time this process's event loop
  was held: stores/_deadline.py); connections have the server's
  ``lock_timeout`` of the timeout and ``statement_timeout`` of ten times it
  (a backstop). A stuck or stopped server is a
  :class:`~lapse.sessions.store.StoreUnavailable`, never a hang
  (``permanent`` for bad credentials, an unknown database, no privilege). A
  pool (0 to ``pool_size`` connections) reconnects once the server is back.
- **Schema.** ``schema.sql`` and the ``migrate_*.sql`` steps (schema.py)
  make or upgrade the tables on first use under an advisory lock; tables of
  a newer version are refused (permanent).
- **Events.** ``schema.prefix_events`` has a ``bigserial`` id (the cursor);
  rows older than ten minutes are trimmed by ``ack``. Writers of
  announcements (``ack``, ``rotate``) take turns on a transaction-scoped
  advisory lock, so ids commit in order and a reader's cursor never passes
  an announcement still to commit.
- **Wake-ups.** The writes another process must hear of send a NOTIFY;
  ``wait_for_news`` sleeps on a LISTEN connection of its own (listener.py),
  so an idle keeper sends no statement until its next deadline.
- **The hook in the application's transaction.** ``acknowledge(conn,
  expiry)`` on the application's connection: the delivery commits with the
  hook's own writes.
"""

from __future__ import annotations

from lapse.sessions.stores.postgres.config import PostgresConfig, parse_url
from lapse.sessions.stores.postgres.store import PostgresStore

__all__ = ["PostgresConfig", "PostgresStore", "parse_url"]
