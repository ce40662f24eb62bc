-- create: store a new live session.
-- KEYS: session hash, deadlines, ended.
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
redis.call('ZADD', KEYS[2], deadline, ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return deadline
