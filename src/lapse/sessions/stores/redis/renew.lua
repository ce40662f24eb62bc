-- renew: extend a claim's lease, if it is still held.
-- KEYS: claim hash, leases. ARGV: now, uid, delivery_id, attempt, owner, lease.
-- -> 1 if that claim still held and its lease now ends at now + lease, else 0
-- include: prelude.lua

local h = redis.call('HMGET', KEYS[1], 'id', 'attempt', 'owner')
if h[1] ~= ARGV[3] or h[2] ~= ARGV[4] or h[3] ~= ARGV[5] then return 0 end
if not redis.call('ZSCORE', KEYS[2], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], n2s(now_us(ARGV[1]) + tonumber(ARGV[6])), ARGV[2])
return 1
