-- exists: whether a session is live, without touching it.
-- KEYS: deadlines. ARGV: now, uid. -> 1 if live, else 0
-- include: prelude.lua

local d = redis.call('ZSCORE', KEYS[1], ARGV[2])
if d and tonumber(d) > now_us(ARGV[1]) then return 1 end
return 0
