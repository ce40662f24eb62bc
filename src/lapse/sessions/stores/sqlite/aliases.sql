-- aliases: the old uids of rotated sessions, each with the uid it now names
-- until its grace ends. Made by schema.sql and by migrate_1_to_2.sql.
CREATE TABLE IF NOT EXISTS aliases (
    uid TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    until REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS aliases_target ON aliases (target);
CREATE INDEX IF NOT EXISTS aliases_until ON aliases (until);
