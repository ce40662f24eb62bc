-- expire: end a live session now (cause "expired"), claimable at once.
-- KEYS: deadlines, ended, events (announced in). ARGV: now, uid. -> 1 if it was live (and is ended now)
-- include: prelude.lua

local now = now_us(ARGV[1])
local d = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not d or tonumber(d) <= now then return 0 end
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], n2s(now), ARGV[2])
announce(KEYS[3], 'ended')
return 1
