-- rotate: move a live session to a new uid; the old one becomes an alias.
-- KEYS: old session hash, new session hash, deadlines, old uid's alias, events.
-- ARGV: now, old uid, new uid, grace (µs), events maxlen, '1' if the
-- principals' indexes are on this node (the one-shard layout: the uid is
-- moved in its principal's index here) else '', the principal whose lock
-- the caller holds ('' for none).
-- -> 1 if the session was live (and moved), else 0; or, on a sharded layout,
-- {principal} (nothing changed) if the session is bound to a principal
-- whose lock the caller does not hold
-- include: prelude.lua

local now = now_us(ARGV[1])
local d = redis.call('ZSCORE', KEYS[3], ARGV[2])
if not d or tonumber(d) <= now then return 0 end
local p = redis.call('HGET', KEYS[1], '_p')
if p and ARGV[6] ~= '1' and p ~= ARGV[7] then return {p} end
if redis.call('EXISTS', KEYS[2]) == 1 then return redis.error_reply('ERR new uid in use') end
redis.call('RENAME', KEYS[1], KEYS[2])
local h = redis.call('HMGET', KEYS[2], '_t', '_e')
local deadline = now + tonumber(h[1])
if h[2] and tonumber(h[2]) < deadline then deadline = tonumber(h[2]) end
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[3], n2s(deadline), ARGV[3])
local grace = tonumber(ARGV[4])
if grace > 0 then
  redis.call('HSET', KEYS[4], 'to', ARGV[3], 'until', n2s(now + grace))
  redis.call('PEXPIRE', KEYS[4], math.floor(grace / 1000) + 60000)
end
if p and ARGV[6] == '1' then
  local index = string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[2] - 3) .. ':p:' .. p
  redis.call('SREM', index, ARGV[2])
  redis.call('SADD', index, ARGV[3])
end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*', 'uid', ARGV[2], 'to', ARGV[3])
return 1
