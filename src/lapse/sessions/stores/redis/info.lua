-- info: one live session, without touching it.
-- KEYS: deadlines, session hash. ARGV: now, uid. -> false or {score, {field, value, ...}}
-- include: prelude.lua

local d = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not d or tonumber(d) <= now_us(ARGV[1]) then return false end
return {d, redis.call('HGETALL', KEYS[2])}
