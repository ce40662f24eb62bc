-- scan: one page of live sessions, latest deadline first.
-- KEYS: deadlines. ARGV: now, prefix, cursor score ('' for the start),
-- cursor uid, limit.
-- Live entries (score > now) after the cursor in (score desc, uid desc)
-- order, up to limit: by rank after the cursor's own entry if it is still
-- where it was, else by score (ties at the cursor's score, then below).
-- -> {uid, score, {field, value, ...}, ...}
-- include: prelude.lua

local now = now_us(ARGV[1])
local prefix, limit = ARGV[2], tonumber(ARGV[5])
local found = {}
if ARGV[3] == '' then
  found = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', '(' .. n2s(now),
                     'WITHSCORES', 'LIMIT', 0, limit)
else
  local mark, after = tonumber(ARGV[3]), ARGV[4]
  local s = redis.call('ZSCORE', KEYS[1], after)
  if s and tonumber(s) == mark then
    local r = redis.call('ZREVRANK', KEYS[1], after)
    found = redis.call('ZREVRANGE', KEYS[1], r + 1, r + limit, 'WITHSCORES')
  else
    local ties = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], ARGV[3], 'WITHSCORES')
    for i = #ties - 1, 1, -2 do
      if #found >= 2 * limit then break end
      if ties[i] < after then
        table.insert(found, ties[i])
        table.insert(found, ties[i + 1])
      end
    end
    if #found < 2 * limit then
      local rest = redis.call('ZREVRANGEBYSCORE', KEYS[1], '(' .. ARGV[3], '(' .. n2s(now),
                              'WITHSCORES', 'LIMIT', 0, limit - #found / 2)
      for _, v in ipairs(rest) do table.insert(found, v) end
    end
  end
end
local out = {}
for i = 1, #found, 2 do
  if tonumber(found[i + 1]) <= now then break end
  table.insert(out, found[i])
  table.insert(out, found[i + 1])
  table.insert(out, redis.call('HGETALL', prefix .. ':s:' .. found[i]))
end
return out
