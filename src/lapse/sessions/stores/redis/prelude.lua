-- prelude.lua: included first by every script that reads the time (all but
-- ack.lua and shards.lua).
-- now_us(arg): the time in µs: the clock argument if given (a store made
-- with clock=), else the server's TIME; n2s(n): an exact integer-to-string
-- conversion for scores.

local function now_us(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function n2s(n) return string.format('%.0f', n) end
