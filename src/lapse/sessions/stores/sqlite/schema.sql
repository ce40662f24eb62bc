-- The current schema (PRAGMA user_version = 4), made in a new file.
--
-- sessions: one row per session, live (ended = 0) or ended and waiting for
-- its expiry hook to be acknowledged (ended = 1). An ended row's lease_until
-- is when it may be claimed (again). created and ends_at (the absolute end,
-- NULL for none) are kept by a rotation; deadline never passes ends_at.
-- version counts the writes of the session's data (1 at creation).
-- principal: the user it is bound to (set_principal), NULL when unbound.
CREATE TABLE IF NOT EXISTS sessions (
    uid TEXT PRIMARY KEY,
    timeout REAL NOT NULL,
    deadline REAL NOT NULL,
    ended INTEGER NOT NULL DEFAULT 0,
    cause TEXT,
    delivery_id TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    created REAL,
    ends_at REAL,
    version INTEGER NOT NULL DEFAULT 0,
    principal TEXT
);
CREATE INDEX IF NOT EXISTS sessions_live ON sessions (ended, deadline);
CREATE INDEX IF NOT EXISTS sessions_lease ON sessions (ended, lease_until);
-- session_data: one row per key (value is JSON), so that a save writes only
-- the keys that changed.
CREATE TABLE IF NOT EXISTS session_data (
    uid TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (uid, key)
) WITHOUT ROWID;
-- events: ends acknowledged (target NULL) and rotations (uid the old uid,
-- target the new one), with an increasing id: the events cursor.
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT NOT NULL,
    at REAL NOT NULL,
    target TEXT
);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
-- include: aliases.sql
-- include: principals.sql
