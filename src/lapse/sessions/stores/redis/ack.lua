-- ack: forget a claimed session and announce its end. No time needed: no prelude.
-- KEYS: session hash, claim hash, leases, deadlines, events.
-- ARGV: uid, delivery_id, events maxlen, '1' if the principals' indexes are
-- on this node (the one-shard layout: the uid leaves its principal's here).
-- -> 0 if the delivery id did not match; else the principal the session was
-- bound to (for a sharded caller to take the uid out of its index), or 1

if redis.call('HGET', KEYS[2], 'id') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
local p = false
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then
  p = redis.call('HGET', KEYS[1], '_p')
  redis.call('DEL', KEYS[1])
end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[3], '*', 'uid', ARGV[1])
if not p then return 1 end
if ARGV[4] == '1' then
  local prefix = string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[1] - 3)
  redis.call('SREM', prefix .. ':p:' .. p, ARGV[1])
  return 1
end
return p
