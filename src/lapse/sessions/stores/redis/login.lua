-- login: set_principal on the one-shard layout (a single node, a Sentinel's
-- primary), the whole of it in one script.
-- KEYS: session hash, deadlines, ended, then (binding) the principal's index.
-- ARGV: now, uid, principal ('' unbinds), limit ('' for none), refuse ('1'
-- or ''), base.
-- -> false if no live session; 'refused' (nothing changed); else the uids
-- superseded (least recently used first).
-- include: prelude.lua
-- include: resolve.lua
-- include: principal.lua

local now = now_us(ARGV[1])
local uid, key = resolve(ARGV[2], KEYS[1], KEYS[2], now)
if not uid then return false end
local principal, base = ARGV[3], ARGV[6]
local old = redis.call('HGET', key, '_p')
if principal == '' then
  if old then
    redis.call('HDEL', key, '_p')
    redis.call('SREM', base .. ':p:' .. old, uid)
  end
  return {}
end
local index = KEYS[4]
local others = {}
for _, m in ipairs(redis.call('SMEMBERS', index)) do
  if m ~= uid then
    local d, mkey = bound(base, KEYS[2], m, principal, now)
    if d then
      local h = redis.call('HMGET', mkey, '_t', '_c')
      local last = tonumber(d) - tonumber(h[1] or '0')
      if h[2] and tonumber(h[2]) > last then last = tonumber(h[2]) end
      table.insert(others, {m, last, mkey})
    else
      redis.call('SREM', index, m)
    end
  end
end
local excess = 0
if ARGV[4] ~= '' then excess = #others + 1 - tonumber(ARGV[4]) end
if excess > 0 and ARGV[5] == '1' then return 'refused' end
local victims = {}
if excess > 0 then
  table.sort(others, function(a, b)
    if a[2] ~= b[2] then return a[2] < b[2] end
    return a[1] < b[1]
  end)
  for i = 1, excess do
    local o = others[i]
    finish(KEYS[2], KEYS[3], o[3], o[1], now, 'superseded')
    redis.call('SREM', index, o[1])
    table.insert(victims, o[1])
  end
  announce(base .. ':events', 'ended')
end
if old and old ~= principal then redis.call('SREM', base .. ':p:' .. old, uid) end
redis.call('HSET', key, '_p', principal)
redis.call('SADD', index, uid)
return victims
