-- release: hand a running task back without charging it the attempt, claimable at once (its
-- host is shutting down) or after a delay (the GPU gate held it back), if the caller still
-- holds the lease. A task whose cancellation was asked for ends canceled instead.
--
-- KEYS[1] task hash        {rebound:Q}:task:ID
-- KEYS[2] ready zset       {rebound:Q}:ready
-- KEYS[7] scheduled zset   {rebound:Q}:scheduled
-- KEYS[3] running zset     {rebound:Q}:running
-- KEYS[4] counts hash      {rebound:Q}:counts
-- KEYS[5] canceled zset    {rebound:Q}:canceled   finished tasks, by finish time
-- KEYS[6] cancels set      {rebound:Q}:cancels    running tasks asked to stop
-- ARGV[1] id
-- ARGV[2] fencing token of the caller's lease
-- ARGV[3] MAX_PRIORITY, for the ready score
-- ARGV[4] progress reached (0-100)
-- ARGV[5] delay in ms before it is claimable again (0 = at once)
--
-- Returns "ok" (or "canceled"), or "lost:STATE" when the lease is not held.

local lost = lease_not_held(KEYS[1], ARGV[2])
if lost then
  return lost
end
local now = now_ms()
local progress = math.max(tonumber(redis.call('HGET', KEYS[1], 'progress') or '0'), tonumber(ARGV[4]))
local priority = tonumber(redis.call('HGET', KEYS[1], 'priority'))

redis.call('HSET', KEYS[1], 'progress', progress, 'updated', now)
redis.call('HDEL', KEYS[1], 'owner', 'lease_deadline')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'running', -1)
if redis.call('HGET', KEYS[1], 'cancel') then
  end_canceled(KEYS[1], ARGV[1], KEYS[5], KEYS[6], KEYS[4], now)
  return 'canceled'
end
redis.call('HINCRBY', KEYS[1], 'attempt', -1)
local run_at = now + tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'state', 'pending', 'run_at', run_at)
if run_at <= now then
  redis.call('ZADD', KEYS[2], ready_score(tonumber(ARGV[3]), priority, now), ARGV[1])
else
  redis.call('ZADD', KEYS[7], run_at, ARGV[1])
end
redis.call('HINCRBY', KEYS[4], 'pending', 1)
return 'ok'
