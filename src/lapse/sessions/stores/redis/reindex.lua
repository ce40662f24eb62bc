-- reindex: change a principal's index, only while its lock is this token's.
-- KEYS: lock, index. ARGV: token, uid to add ('' for none), uids to remove...
-- -> 1, or 0 (nothing changed) if the lock is not, or no longer, the token's
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('SADD', KEYS[2], ARGV[2]) end
for i = 3, #ARGV do redis.call('SREM', KEYS[2], ARGV[i]) end
return 1
