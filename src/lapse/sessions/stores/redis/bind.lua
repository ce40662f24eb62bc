-- bind: set_principal's step in a session's shard (a sharded layout; the
-- caller holds the principal's lock when binding).
-- KEYS: session hash, deadlines. ARGV: now, uid, principal ('' unbinds),
-- dry ('1': change nothing, only say).
-- -> false if no live session, else {its uid (an alias followed), the
-- principal it was bound to or false}
-- include: prelude.lua
-- include: resolve.lua

local now = now_us(ARGV[1])
local uid, key = resolve(ARGV[2], KEYS[1], KEYS[2], now)
if not uid then return false end
local old = redis.call('HGET', key, '_p')
if ARGV[4] ~= '1' then
  if ARGV[3] == '' then
    redis.call('HDEL', key, '_p')
  else
    redis.call('HSET', key, '_p', ARGV[3])
  end
end
return {uid, old}
