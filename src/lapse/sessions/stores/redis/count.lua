-- count: live sessions now.
-- KEYS: deadlines. ARGV: now. -> live sessions
-- include: prelude.lua

return redis.call('ZCOUNT', KEYS[1], '(' .. n2s(now_us(ARGV[1])), '+inf')
