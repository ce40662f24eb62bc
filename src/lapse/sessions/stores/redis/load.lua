-- load: touch a live session and read it.
-- KEYS: session hash, deadlines. ARGV: now, uid, the version the caller holds
-- ('' for none).
-- -> false, or {deadline, timeout, {field, value, ...} or false (the data is
-- at the version given), uid (the live session's, if an alias was followed)
-- or false, version, principal or false}
-- include: prelude.lua
-- include: resolve.lua

local now = now_us(ARGV[1])
local uid, key = resolve(ARGV[2], KEYS[1], KEYS[2], now)
if not uid then return false end
local h = redis.call('HMGET', key, '_t', '_e', '_v', '_p')
if not h[1] then return false end
local deadline = now + tonumber(h[1])
if h[2] and tonumber(h[2]) < deadline then deadline = tonumber(h[2]) end
deadline = n2s(deadline)
redis.call('ZADD', KEYS[2], deadline, uid)
local moved = false
if uid ~= ARGV[2] then moved = uid end
local version = h[3] or '0'
if ARGV[3] ~= '' and ARGV[3] == version then return {deadline, h[1], false, moved, version, h[4]} end
return {deadline, h[1], redis.call('HGETALL', key), moved, version, h[4]}
