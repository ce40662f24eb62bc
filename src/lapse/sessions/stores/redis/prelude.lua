-- prelude.lua: included first by every script that reads the time (all but
-- ack.lua and shards.lua).
-- now_us(arg): the time in µs: the clock argument if given (a store made
-- with clock=), else the server's TIME; n2s(n): an exact integer-to-string
-- conversion for scores; announce(events, what): an entry of the events
-- stream that events() skips (no uid), to wake the processes that sleep until
-- their next deadline (blocked in XREAD on the stream): a session ended by
-- hand, or made to end before every other of its shard.

local function now_us(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function n2s(n) return string.format('%.0f', n) end
local function announce(events, what)
  redis.call('XADD', events, 'MAXLEN', '~', 100000, '*', 'news', what)
end
