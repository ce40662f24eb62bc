-- event_ids: the ids of an events stream's entries after a mark, without
-- their fields: an entry another program wrote that is not UTF-8 fails a
-- whole XRANGE reply, so the store then reads the others one by one.
-- KEYS: events. ARGV: start ('(' and the mark), count. -> {id, ...}

local out = {}
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])) do
  out[#out + 1] = entry[1]
end
return out
