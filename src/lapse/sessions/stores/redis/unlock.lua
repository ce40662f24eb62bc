-- unlock: release a principal's lock if it is still this token's.
-- KEYS: lock. ARGV: token. -> 1 if released
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
