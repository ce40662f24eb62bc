-- Version 2: ended sessions waiting for their first claim (expired by hand)
-- found by an index of their own; next_deadline() asks for them at every
-- round, and without it read every ended row.
CREATE INDEX IF NOT EXISTS {p}sessions_unclaimed ON {t}sessions (uid)
    WHERE ended AND delivery_id IS NULL;
