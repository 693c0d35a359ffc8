-- heartbeat: extend the lease of a running task, if the caller still holds it.
--
-- KEYS[1] task hash        {rebound:Q}:task:ID
-- KEYS[2] running zset     {rebound:Q}:running
-- ARGV[1] id
-- ARGV[2] fencing token of the caller's lease
-- ARGV[3] new lease length in ms, from now
--
-- Returns "ok", or "lost:STATE" when the lease is not held.

local lost = lease_not_held(KEYS[1], ARGV[2])
if lost then
  return lost
end
local now = now_ms()
local deadline = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'lease_deadline', deadline)
redis.call('ZADD', KEYS[2], deadline, ARGV[1])
return 'ok'
