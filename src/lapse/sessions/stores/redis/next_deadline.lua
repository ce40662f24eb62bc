-- next_deadline: when the keeper has something to do next.
-- KEYS: deadlines, leases, ended. ARGV: now. -> false or the earliest time
-- include: prelude.lua

local best = false
for _, key in ipairs({KEYS[1], KEYS[2]}) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then
    local score = tonumber(first[2])
    if not best or score < best then best = score end
  end
end
if redis.call('ZCARD', KEYS[3]) > 0 then
  local now = now_us(ARGV[1])
  if not best or now < best then best = now end
end
if not best then return false end
return n2s(best)
