-- principal.lua: included by the scripts of the index of sessions by
-- principal, after prelude.lua. A session's principal is the field _p of its
-- hash; an index (a set of uids, {base}:p:<principal>) may hold more than
-- the principal's live sessions (ended ones, ones bound elsewhere since):
-- a member counts only if bound() says so.
-- bound(base, deadlines, uid, principal, now): the deadline score and hash
-- key of uid if it is live and bound to principal, else false.
-- finish(deadlines, ended, key, uid, now, cause): end a live session now, as
-- expire.lua does; a cause other than '' ('superseded') is kept in its hash
-- (_x) for claim.lua to report.

local function bound(base, deadlines, uid, principal, now)
  local d = redis.call('ZSCORE', deadlines, uid)
  if not d or tonumber(d) <= now then return false end
  local key = base .. ':s:' .. uid
  if redis.call('HGET', key, '_p') ~= principal then return false end
  return d, key
end
local function finish(deadlines, ended, key, uid, now, cause)
  redis.call('ZREM', deadlines, uid)
  redis.call('ZADD', ended, n2s(now), uid)
  if cause ~= '' then redis.call('HSET', key, '_x', cause) end
end
