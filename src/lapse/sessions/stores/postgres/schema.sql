-- The PostgreSQL store's tables, version 1 (each later version: a
-- migrate_*.sql). {t} is the schema and table prefix (schema.prefix, e.g.
-- public.lapse_), {p} the prefix, filled in by schema.py; run in
-- one transaction under an advisory lock, so processes starting together
-- create them once. Times are seconds since the epoch (double precision) in
-- the store's clock.

-- sessions: one row per session, live (ended false) or ended and waiting for
-- its expiry hook to be acknowledged. data is one jsonb object (a save
-- writes data || changes - removed, under the row lock, so concurrent saves
-- of different keys all persist); version counts those writes.
CREATE TABLE IF NOT EXISTS {t}sessions (
    uid text PRIMARY KEY,
    timeout double precision NOT NULL,
    deadline double precision NOT NULL,
    ended boolean NOT NULL DEFAULT false,
    cause text,
    delivery_id text,
    attempt integer NOT NULL DEFAULT 0,
    lease_owner text,
    lease_until double precision,
    created double precision,
    ends_at double precision,
    version bigint NOT NULL DEFAULT 1,
    data jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS {p}sessions_live ON {t}sessions (ended, deadline, uid);
CREATE INDEX IF NOT EXISTS {p}sessions_lease ON {t}sessions (ended, lease_until);

-- aliases: old uids of rotated sessions, each naming the uid it now is,
-- until its grace ends.
CREATE TABLE IF NOT EXISTS {t}aliases (
    uid text PRIMARY KEY,
    target text NOT NULL,
    until double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS {p}aliases_target ON {t}aliases (target);

-- events: ends acknowledged (target NULL) and rotations (uid the old uid,
-- target the new one); id is the events cursor. The statements that add
-- one also NOTIFY the store's channel (queries.py).
CREATE TABLE IF NOT EXISTS {t}events (
    id bigserial PRIMARY KEY,
    uid text NOT NULL,
    at double precision NOT NULL,
    target text
);
CREATE INDEX IF NOT EXISTS {p}events_at ON {t}events (at);

-- schema_version: one row, the version of these tables.
CREATE TABLE IF NOT EXISTS {t}schema_version (
    version integer NOT NULL
);
