-- The statements of the SQLite store's operations, by name (see
-- lapse/sessions/stores/_package_text.py for the format). Each name is a
-- field of queries.Queries; a test prepares every statement against the
-- current schema. "now" below is the transaction's time, "now+" the same
-- plus the store's epsilon (a deadline that far ahead is due already).

-- Shared by several operations --------------------------------------------

-- name: is_live
-- (uid, now+) -> 1 if the session is live
SELECT 1 FROM sessions WHERE uid = ? AND ended = 0 AND deadline > ?;

-- name: select_live
-- (uid, now+) -> timeout, ends_at of a live session
SELECT timeout, ends_at FROM sessions WHERE uid = ? AND ended = 0 AND deadline > ?;

-- name: alias_target
-- (old uid, now) -> the uid it was rotated to, within its grace
SELECT target FROM aliases WHERE uid = ? AND until > ?;

-- name: read_data
-- (uid) -> key, JSON value
SELECT key, value FROM session_data WHERE uid = ?;

-- name: delete_data
-- (uid)
DELETE FROM session_data WHERE uid = ?;

-- name: prune_aliases
-- (now)
DELETE FROM aliases WHERE until <= ?;

-- load ------------------------------------------------------------------------

-- name: load_session
-- (uid) -> timeout, ends_at, version, principal
SELECT timeout, ends_at, version, principal FROM sessions WHERE uid = ?;

-- name: touch
-- (deadline, uid)
UPDATE sessions SET deadline = ? WHERE uid = ?;

-- create ----------------------------------------------------------------------

-- name: create_session
-- (uid, timeout, deadline, created, ends_at); replaces any row of that uid
INSERT OR REPLACE INTO sessions
    (uid, timeout, deadline, ended, attempt, created, ends_at, version)
    VALUES (?, ?, ?, 0, 0, ?, ?, 1);

-- name: insert_data
-- (uid, key, JSON value)
INSERT INTO session_data (uid, key, value) VALUES (?, ?, ?);

-- rotate ----------------------------------------------------------------------

-- name: rotate_session
-- (new uid, deadline, old uid)
UPDATE sessions SET uid = ?, deadline = ? WHERE uid = ?;

-- name: rotate_data
-- (new uid, old uid)
UPDATE session_data SET uid = ? WHERE uid = ?;

-- name: follow_aliases
-- (new uid, old uid): aliases of the old uid name the new one
UPDATE aliases SET target = ? WHERE target = ?;

-- name: add_alias
-- (old uid, new uid, end of the grace)
INSERT OR REPLACE INTO aliases (uid, target, until) VALUES (?, ?, ?);

-- name: add_rotation_event
-- (old uid, now, new uid)
INSERT INTO events (uid, at, target) VALUES (?, ?, ?);

-- save ------------------------------------------------------------------------

-- name: write_data
-- (uid, key, JSON value)
INSERT OR REPLACE INTO session_data (uid, key, value) VALUES (?, ?, ?);

-- name: delete_key
-- (uid, key)
DELETE FROM session_data WHERE uid = ? AND key = ?;

-- name: bump_version
-- (uid)
UPDATE sessions SET version = version + 1 WHERE uid = ?;

-- name: select_version
-- (uid) -> version
SELECT version FROM sessions WHERE uid = ?;

-- expire ----------------------------------------------------------------------

-- name: end_session
-- (cause, now, now, uid): ended by expire(), expire_principal() ("expired")
-- or set_principal()'s cap ("superseded"), claimable at once
UPDATE sessions SET ended = 1, cause = ?, deadline = ?,
    delivery_id = NULL, attempt = 0, lease_owner = NULL, lease_until = ?
    WHERE uid = ?;

-- principals -------------------------------------------------------------------

-- name: bind_principal
-- (principal or NULL, uid)
UPDATE sessions SET principal = ? WHERE uid = ?;

-- name: sessions_of
-- (principal, now+) -> uid, created, timeout, deadline, principal of its
-- live sessions. Through sessions_principal, always (the principal = ? term
-- implies its principal IS NOT NULL): with no statistics the planner would
-- rather range over sessions_live, every live session of the file; INDEXED
-- BY makes this cost the principal's rows only, or fail if the index is gone.
SELECT uid, created, timeout, deadline, principal FROM sessions
    INDEXED BY sessions_principal
    WHERE principal = ? AND ended = 0 AND deadline > ?;

-- claim, renew, ack -----------------------------------------------------------

-- name: due_live
-- (now+, limit) -> live sessions past their deadline, earliest first
SELECT uid, deadline, ended, cause, delivery_id, attempt, ends_at FROM sessions
    WHERE ended = 0 AND deadline <= ? ORDER BY deadline LIMIT ?;

-- name: due_ended
-- (now+, limit) -> ended sessions unclaimed or whose lease ran out
SELECT uid, deadline, ended, cause, delivery_id, attempt, ends_at FROM sessions
    WHERE ended = 1 AND lease_until <= ? ORDER BY deadline LIMIT ?;

-- name: lease_session
-- (cause, delivery_id, attempt, owner, lease end, uid)
UPDATE sessions SET ended = 1, cause = ?, delivery_id = ?, attempt = ?,
    lease_owner = ?, lease_until = ? WHERE uid = ?;

-- name: renew_lease
-- (lease end, uid, delivery_id, attempt, owner) -> 1 row if still held
UPDATE sessions SET lease_until = ? WHERE uid = ? AND ended = 1
    AND delivery_id = ? AND attempt = ? AND lease_owner = ?;

-- name: forget_session
-- (uid, delivery_id) -> 1 row if that delivery was still the session's
DELETE FROM sessions WHERE uid = ? AND ended = 1 AND delivery_id = ?;

-- name: add_end_event
-- (uid, now)
INSERT INTO events (uid, at) VALUES (?, ?);

-- name: prune_events
-- (the oldest time kept)
DELETE FROM events WHERE at < ?;

-- events ----------------------------------------------------------------------

-- name: last_event_id
-- () -> the last id given to an event (no row before the first event)
SELECT seq FROM sqlite_sequence WHERE name = 'events';

-- name: events_after
-- (cursor, limit) -> id, uid, target
SELECT id, uid, target FROM events WHERE id > ? ORDER BY id LIMIT ?;

-- next_deadline ---------------------------------------------------------------

-- name: first_deadline
SELECT MIN(deadline) FROM sessions WHERE ended = 0;

-- name: first_lease_end
SELECT MIN(lease_until) FROM sessions WHERE ended = 1 AND delivery_id IS NOT NULL;

-- name: any_unclaimed
SELECT 1 FROM sessions WHERE ended = 1 AND delivery_id IS NULL LIMIT 1;

-- inspection: read only -------------------------------------------------------

-- name: scan_first
-- (now+, limit) -> uid, created, timeout, deadline, principal; latest
-- deadline first
SELECT uid, created, timeout, deadline, principal FROM sessions
    WHERE ended = 0 AND deadline > ?
    ORDER BY deadline DESC, uid DESC LIMIT ?;

-- name: scan_after
-- (now+, cursor deadline, cursor deadline, cursor uid, limit): the same,
-- strictly after the cursor in that order
SELECT uid, created, timeout, deadline, principal FROM sessions
    WHERE ended = 0 AND deadline > ? AND (deadline < ? OR (deadline = ? AND uid < ?))
    ORDER BY deadline DESC, uid DESC LIMIT ?;

-- name: info
-- (uid, now+) -> uid, created, timeout, deadline, principal
SELECT uid, created, timeout, deadline, principal FROM sessions
    WHERE uid = ? AND ended = 0 AND deadline > ?;

-- name: count_live
-- (now+) -> live sessions
SELECT COUNT(*) FROM sessions WHERE ended = 0 AND deadline > ?;

-- name: count_by_deadline
-- (start, bucket width, start, end) -> bucket, live sessions ending in it
SELECT CAST((deadline - ?) / ? AS INTEGER), COUNT(*) FROM sessions
    WHERE ended = 0 AND deadline > ? AND deadline <= ? GROUP BY 1;
