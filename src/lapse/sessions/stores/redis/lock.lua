-- lock: take a principal's lock (sharded layout) and read its index.
-- KEYS: lock, index. ARGV: token, lease (ms).
-- -> false if another holds it, else the index's members
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('SMEMBERS', KEYS[2])
