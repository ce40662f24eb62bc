-- members: the live sessions bound to a principal among some uids (or the
-- members of its index, given as KEYS[2]), touching none.
-- KEYS: deadlines[, index]. ARGV: now, base, principal, uid, ...
-- -> {uid, deadline score, {field, value, ...}, ...}
-- include: prelude.lua
-- include: principal.lua

local now = now_us(ARGV[1])
local uids = {}
if KEYS[2] then
  uids = redis.call('SMEMBERS', KEYS[2])
else
  for i = 4, #ARGV do uids[#uids + 1] = ARGV[i] end
end
local out = {}
for _, uid in ipairs(uids) do
  local d, key = bound(ARGV[2], KEYS[1], uid, ARGV[3], now)
  if d then
    table.insert(out, uid)
    table.insert(out, d)
    table.insert(out, redis.call('HGETALL', key))
  end
end
return out
