-- ack: forget a claimed session and announce its end. No time needed: no prelude.
-- KEYS: session hash, claim hash, leases, deadlines, events.
-- ARGV: uid, delivery_id, events maxlen.
-- -> 1 if acknowledged, 0 if the delivery id did not match

if redis.call('HGET', KEYS[2], 'id') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
if not redis.call('ZSCORE', KEYS[4], ARGV[1]) then redis.call('DEL', KEYS[1]) end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[3], '*', 'uid', ARGV[1])
return 1
