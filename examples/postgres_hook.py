"""Sessions in PostgreSQL, with an expiry hook that writes to the same
database in one transaction with its delivery: each ended session is
recorded exactly once, even if a process is killed in the middle of it.

    pip install '.[postgres]'
    LAPSE_SESSION_STORE=postgresql://app:secret@localhost/myapp python examples/postgres_hook.py
"""

import os

import asyncpg

from lapse.internet import reactor
from lapse.sessions.stores.postgres import PostgresStore
from lapse.web.resource import Resource
from lapse.web.server import Session, Site

DATABASE = os.environ["LAPSE_SESSION_STORE"]
store = PostgresStore.from_url(DATABASE)
pool = None


class ShortSession(Session):
    sessionTimeout = 5


async def on_expire(expiry):
    """Record the ended session's visits in the application's own table."""
    global pool
    if pool is None:
        pool = await asyncpg.create_pool(DATABASE.partition("?")[0], min_size=1, max_size=2)
        await pool.execute(
            "CREATE TABLE IF NOT EXISTS ended_sessions (uid text, visits int, at timestamptz)"
        )
    async with pool.acquire() as conn, conn.transaction():
        visits = expiry.data.get("visits", 0)
        await conn.execute("INSERT INTO ended_sessions VALUES ($1, $2, now())", expiry.uid, visits)
        # Last, just before the commit: the delivery is recorded with the row,
        # or (rolled back, the process killed) neither is, and it comes again.
        await store.acknowledge(conn, expiry)
    print("Session", expiry.uid, "ended after", visits, "visits.")


class Visits(Resource):
    isLeaf = True

    def render_GET(self, request):
        session = request.getSession()
        session.data["visits"] = session.data.get("visits", 0) + 1
        return f"visits: {session.data['visits']}"


factory = Site(Visits(), store=store, on_expire=on_expire)
factory.sessionFactory = ShortSession

reactor.listenTCP(8080, factory)
reactor.run()
