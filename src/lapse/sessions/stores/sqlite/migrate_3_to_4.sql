-- From schema version 3 to 4: the principal (NULL, unbound, in the rows
-- already there) and its index.
ALTER TABLE sessions ADD COLUMN principal TEXT;
-- include: principals.sql
