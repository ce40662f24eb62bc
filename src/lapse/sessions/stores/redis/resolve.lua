-- resolve.lua: included, after prelude.lua, by the scripts that follow aliases (load, save, and the index's bind, login, end_bound).
-- resolve(uid, key, deadlines, now): the live session a uid names: itself,
-- or (an old uid in its grace, an alias) the session it was rotated to,
-- followed up to 8 rotations.
-- -> uid, its hash key, its deadline score; or false

local function resolve(uid, key, deadlines, now)
  local d = redis.call('ZSCORE', deadlines, uid)
  if not d then
    local prefix = string.sub(key, 1, #key - #uid - 3)
    for _ = 1, 8 do
      local a = redis.call('HMGET', prefix .. ':a:' .. uid, 'to', 'until')
      if not a[1] or tonumber(a[2]) <= now then return false end
      uid = a[1]
      d = redis.call('ZSCORE', deadlines, uid)
      if d then break end
    end
    key = prefix .. ':s:' .. uid
  end
  if not d or tonumber(d) <= now then return false end
  return uid, key, d
end
