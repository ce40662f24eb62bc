-- Version 3: the principal a session is bound to (set_principal; NULL: none)
-- and a partial index of the bound sessions, for sessions_of, the cap and
-- expire_principal. Adding a nullable column without a default rewrites no
-- row; the index holds bound sessions only, so a touch of an unbound one
-- (every anonymous visitor's) writes no entry in it.
ALTER TABLE {t}sessions ADD COLUMN IF NOT EXISTS principal text;
CREATE INDEX IF NOT EXISTS {p}sessions_principal ON {t}sessions (principal)
    WHERE principal IS NOT NULL;
