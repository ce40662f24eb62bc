-- save: write and delete data keys of a live session.
-- KEYS: session hash, deadlines. ARGV: now, uid, n, n x (field, value), removed fields...
-- Writes to the live session the uid names (itself, or within its grace the
-- session an old uid was rotated to).
-- -> the data's new version if written, else 0
-- include: prelude.lua
-- include: resolve.lua

local now = now_us(ARGV[1])
local uid, key = resolve(ARGV[2], KEYS[1], KEYS[2], now)
if not uid then return 0 end
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  i = i + 2
end
for j = i, #ARGV do redis.call('HDEL', key, ARGV[j]) end
return redis.call('HINCRBY', key, '_v', 1)
