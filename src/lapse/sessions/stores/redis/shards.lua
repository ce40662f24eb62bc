-- shards: the deployment's shard count, checked once by every store.
-- KEYS: the count's key, then (a sharded store on a single node or a
-- Sentinel's primary) the keys of lapse's untagged one-shard layout.
-- ARGV: this store's count.
-- -> the stored count (stored now if there was none); or, if the one-shard
-- layout holds sessions and this store is sharded, {the key found}

local stored = redis.call('GET', KEYS[1])
if stored then return stored end
if ARGV[1] ~= '1' then
  for i = 2, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then return {KEYS[i]} end
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
