-- complete: record a successful attempt, if the caller still holds the task's lease.
--
-- KEYS[1] task hash        {rebound:Q}:task:ID
-- KEYS[2] running zset     {rebound:Q}:running
-- KEYS[3] completed zset   {rebound:Q}:completed  finished tasks, by finish time
-- KEYS[4] counts hash      {rebound:Q}:counts
-- KEYS[5] cancels set      {rebound:Q}:cancels    running tasks asked to stop
-- ARGV[1] id
-- ARGV[2] fencing token of the caller's lease
-- ARGV[3] result (JSON text)
-- ARGV[4] progress reached (0-100)
--
-- Returns "ok", or "lost:STATE" when the lease is not held (nothing is changed then).

local lost = lease_not_held(KEYS[1], ARGV[2])
if lost then
  return lost
end

local now = now_ms()
local progress = math.max(tonumber(redis.call('HGET', KEYS[1], 'progress') or '0'), tonumber(ARGV[4]))

redis.call('HSET', KEYS[1], 'state', 'completed', 'result', ARGV[3], 'progress', progress,
  'finished', now, 'updated', now)
-- Work that finished before a cancel request took effect is kept: the task is completed.
redis.call('HDEL', KEYS[1], 'owner', 'lease_deadline', 'cancel')
redis.call('SREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], now, ARGV[1])
redis.call('HINCRBY', KEYS[4], 'running', -1)
redis.call('HINCRBY', KEYS[4], 'completed', 1)
return 'ok'
