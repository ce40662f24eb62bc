-- sessions_principal: the index of sessions by principal, bound rows only
-- (an unbound session costs it nothing). It holds the principal alone, so a
-- touch (a new deadline) never writes to it; a lookup filters the rows it
-- finds by ended and deadline. Made by schema.sql and by migrate_3_to_4.sql.
CREATE INDEX IF NOT EXISTS sessions_principal ON sessions (principal)
    WHERE principal IS NOT NULL;
