-- create: store a new live session.
-- KEYS: session hash, deadlines, ended, events (announced in if it ends
-- before every other live session of the shard: idle keepers sleep until then).
-- ARGV: now, uid, timeout, lifetime ('' for none), field, value, ... -> deadline
-- include: prelude.lua

local now = now_us(ARGV[1])
local deadline = now + tonumber(ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '_t', ARGV[3], '_c', n2s(now), '_v', 1)
if ARGV[4] ~= '' then
  local ends = now + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], '_e', n2s(ends))
  if ends < deadline then deadline = ends end
end
deadline = n2s(deadline)
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
redis.call('ZADD', KEYS[2], deadline, ARGV[2])
if not first[2] or tonumber(deadline) < tonumber(first[2]) then announce(KEYS[4], 'first') end
redis.call('ZREM', KEYS[3], ARGV[2])
return deadline
