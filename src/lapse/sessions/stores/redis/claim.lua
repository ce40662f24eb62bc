-- claim: lease up to limit ended sessions.
-- KEYS: deadlines, ended, leases, seq. ARGV: now, prefix, owner, lease, limit.
-- Candidates are the due entries of the three sets, oldest (smallest score:
-- when each became claimable) first.
-- -> {{uid, delivery_id, attempt, cause, {field, value, ...}}, ...}
-- include: prelude.lua

local now = now_us(ARGV[1])
local prefix = ARGV[2]
local limit = tonumber(ARGV[5])
local lease_until = n2s(now + tonumber(ARGV[4]))
local candidates = {}
local sources = {{KEYS[1], 'timeout'}, {KEYS[2], 'expired'}, {KEYS[3], false}}
for _, source in ipairs(sources) do
  local due = redis.call('ZRANGEBYSCORE', source[1], '-inf', n2s(now),
                         'WITHSCORES', 'LIMIT', 0, limit)
  for i = 1, #due, 2 do
    table.insert(candidates, {due[i], tonumber(due[i + 1]), source[1], source[2]})
  end
end
table.sort(candidates, function(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  return a[1] < b[1]
end)
local out, seen = {}, {}
for _, c in ipairs(candidates) do
  if #out >= limit then break end
  local uid = c[1]
  if not seen[uid] then
    seen[uid] = true
    local ckey = prefix .. ':c:' .. uid
    -- The session and claim hashes are not in KEYS: during a slot migration
    -- Redis refuses them with an error once moved (or when new), and an
    -- error does not undo the writes before it. So test both first; if
    -- refused, stop here (what was claimed so far stands; the rest waits).
    local here = redis.pcall('EXISTS', ckey, prefix .. ':s:' .. uid)
    if type(here) == 'table' and here.err then
      if #out == 0 then return redis.error_reply('TRYAGAIN claim meets a slot migration') end
      break
    end
    local id, attempt, cause = false, 1, c[4]
    if not cause then
      local h = redis.call('HMGET', ckey, 'id', 'attempt', 'cause')
      if h[1] then
        id, attempt, cause = h[1], tonumber(h[2]) + 1, h[3]
      else
        cause = 'timeout'
      end
    else
      redis.call('ZREM', c[3], uid)
      if cause == 'timeout' then
        local e = redis.call('HGET', prefix .. ':s:' .. uid, '_e')
        if e and tonumber(e) <= c[2] then cause = 'lifetime' end
      else
        -- ended by hand: by expire ("expired"), or as set_principal's victim
        local x = redis.call('HGET', prefix .. ':s:' .. uid, '_x')
        if x then cause = x end
      end
    end
    if not id then id = uid .. ':' .. redis.call('INCR', KEYS[4]) end
    redis.call('ZADD', KEYS[3], lease_until, uid)
    redis.call('HSET', ckey, 'id', id, 'attempt', attempt, 'cause', cause, 'owner', ARGV[3])
    table.insert(out, {uid, id, tostring(attempt), cause,
                       redis.call('HGETALL', prefix .. ':s:' .. uid)})
  end
end
return out
