-- fail: record a failed attempt as the host decided: retry after a delay, or fail for good.
-- A task whose cancellation was asked for while it ran ends canceled instead, never retried.
--
-- KEYS[1] task hash        {rebound:Q}:task:ID
-- KEYS[2] running zset     {rebound:Q}:running
-- KEYS[3] scheduled zset   {rebound:Q}:scheduled
-- KEYS[4] failed zset      {rebound:Q}:failed     finished tasks, by finish time
-- KEYS[5] counts hash      {rebound:Q}:counts
-- KEYS[6] canceled zset    {rebound:Q}:canceled   finished tasks, by finish time
-- KEYS[7] cancels set      {rebound:Q}:cancels    running tasks asked to stop
-- ARGV[1] id
-- ARGV[2] fencing token of the caller's lease
-- ARGV[3] error text
-- ARGV[4] retry delay in ms, or -1 to fail the task
-- ARGV[5] 1 if the on-exhausted hook ran, else 0
-- ARGV[6] progress reached (0-100)
-- ARGV[7] how many errors the history keeps
--
-- Returns the new state ("retrying", "failed" or "canceled"), or "lost:STATE" when the lease
-- is not held.

local lost = lease_not_held(KEYS[1], ARGV[2])
if lost then
  return lost
end

local now = now_ms()
local progress = math.max(tonumber(redis.call('HGET', KEYS[1], 'progress') or '0'), tonumber(ARGV[6]))

push_error(KEYS[1], ARGV[3], tonumber(ARGV[7]))
redis.call('HSET', KEYS[1], 'progress', progress, 'updated', now)
redis.call('HDEL', KEYS[1], 'owner', 'lease_deadline')
if ARGV[5] == '1' then
  redis.call('HINCRBY', KEYS[1], 'hook_runs', 1)
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[5], 'running', -1)

if redis.call('HGET', KEYS[1], 'cancel') then
  end_canceled(KEYS[1], ARGV[1], KEYS[6], KEYS[7], KEYS[5], now)
  return 'canceled'
end

local delay = tonumber(ARGV[4])
if delay < 0 then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished', now)
  redis.call('ZADD', KEYS[4], now, ARGV[1])
  redis.call('HINCRBY', KEYS[5], 'failed', 1)
  return 'failed'
end
local run_at = now + delay
redis.call('HSET', KEYS[1], 'state', 'retrying', 'run_at', run_at)
redis.call('ZADD', KEYS[3], run_at, ARGV[1])
redis.call('HINCRBY', KEYS[5], 'retrying', 1)
return 'retrying'
