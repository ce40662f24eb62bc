-- From schema version 2 to 3: data versions (0 in the rows already there).
ALTER TABLE sessions ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
