-- From schema version 1 to 2: the absolute lifetime and rotation.
ALTER TABLE sessions ADD COLUMN created REAL;
ALTER TABLE sessions ADD COLUMN ends_at REAL;
ALTER TABLE events ADD COLUMN target TEXT;
-- include: aliases.sql
