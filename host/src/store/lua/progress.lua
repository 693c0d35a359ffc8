-- progress: raise a running task's progress, if the caller still holds its lease.
--
-- KEYS[1] task hash        {rebound:Q}:task:ID
-- ARGV[1] fencing token of the caller's lease
-- ARGV[2] progress (0-100); lower than the stored value leaves it unchanged
--
-- Returns "ok", or "lost:STATE" when the lease is not held.

local lost = lease_not_held(KEYS[1], ARGV[1])
if lost then
  return lost
end
local stored = tonumber(redis.call('HGET', KEYS[1], 'progress') or '0')
if tonumber(ARGV[2]) > stored then
  redis.call('HSET', KEYS[1], 'progress', ARGV[2])
end
return 'ok'
