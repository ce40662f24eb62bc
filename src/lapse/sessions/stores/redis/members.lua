-- members: the live sessions bound to a principal among some uids (or the
-- members of its index, given as KEYS[2]), touching none.
-- KEYS: deadlines[, index]. ARGV: now, base, principal, '1' for each
-- session's whole hash (its data) or '' for its times alone, uid, ...
-- -> {uid, deadline score, {field, value, ...}, ...}
-- include: prelude.lua
-- include: principal.lua

local now = now_us(ARGV[1])
local uids = {}
if KEYS[2] then
  uids = redis.call('SMEMBERS', KEYS[2])
else
  for i = 5, #ARGV do uids[#uids + 1] = ARGV[i] end
end
local out = {}
for _, uid in ipairs(uids) do
  local d, key = bound(ARGV[2], KEYS[1], uid, ARGV[3], now)
  if d then
    table.insert(out, uid)
    table.insert(out, d)
    if ARGV[4] == '1' then
      table.insert(out, redis.call('HGETALL', key))
    else
      local h = redis.call('HMGET', key, '_t', '_c')
      table.insert(out, {'_t', h[1] or '0', '_c', h[2] or '0', '_p', ARGV[3]})
    end
  end
end
return out
