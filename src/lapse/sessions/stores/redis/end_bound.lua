-- end_bound: end now, as expire.lua does, each of some uids (or each member
-- of the principal's index, given as KEYS[3]: then the index keeps only the
-- excepted uid) that is live and bound to the principal.
-- KEYS: deadlines, ended[, index]. ARGV: now, base, principal, cause ('' for
-- "expired"), the uid to spare ('' for none), '1' if that uid is of this
-- shard (an old uid in its grace then spares the session it names), uid, ...
-- -> the uids ended
-- include: prelude.lua
-- include: resolve.lua
-- include: principal.lua

local now = now_us(ARGV[1])
local uids = {}
if KEYS[3] then
  uids = redis.call('SMEMBERS', KEYS[3])
else
  for i = 7, #ARGV do uids[#uids + 1] = ARGV[i] end
end
local spare = ARGV[5]
if spare ~= '' and ARGV[6] == '1' then
  local live = resolve(spare, ARGV[2] .. ':s:' .. spare, KEYS[1], now)
  if live then spare = live end
end
local out = {}
for _, uid in ipairs(uids) do
  if uid ~= spare then
    local d, key = bound(ARGV[2], KEYS[1], uid, ARGV[3], now)
    if d then
      finish(KEYS[1], KEYS[2], key, uid, now, ARGV[4])
      table.insert(out, uid)
    end
    if KEYS[3] then redis.call('SREM', KEYS[3], uid) end
  end
end
if #out > 0 then announce(ARGV[2] .. ':events', 'ended') end
return out
