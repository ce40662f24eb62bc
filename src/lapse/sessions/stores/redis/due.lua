-- due: when the oldest claimable entries became claimable, changing nothing
-- (a sharded store asks every shard first, then claims the oldest overall).
-- KEYS: deadlines, ended, leases. ARGV: now, limit.
-- -> {score, ...}: up to limit, ascending
-- include: prelude.lua

local now = n2s(now_us(ARGV[1]))
local limit = tonumber(ARGV[2])
local scores = {}
for i = 1, 3 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  for j = 2, #due, 2 do table.insert(scores, tonumber(due[j])) end
end
table.sort(scores)
local out = {}
for i = 1, math.min(limit, #scores) do out[i] = n2s(scores[i]) end
return out
